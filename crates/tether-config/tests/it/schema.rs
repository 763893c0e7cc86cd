//! The committed JSON Schema matches the code.

use std::path::Path;

#[test]
fn the_committed_schema_is_current() {
    let committed_path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/config.schema.json");
    let current = tether_config::schema_text();
    if std::env::var_os("TETHER_TEST_UPDATE_SCHEMA").is_some() {
        std::fs::write(&committed_path, &current).unwrap();
    }
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    assert!(
        committed == current,
        "docs/config.schema.json is stale; regenerate it with\n  \
         TETHER_TEST_UPDATE_SCHEMA=1 cargo test -p tether-config --test it schema\n\
         (or `cargo run -p tether -- config schema > docs/config.schema.json`)"
    );
}

#[test]
fn the_schema_accepts_the_short_forms() {
    let schema = tether_config::schema();
    let incoming = &schema["$defs"]["NetworkConfig"]["properties"]["incoming"];
    assert!(
        incoming["anyOf"].as_array().is_some_and(|a| a.len() == 2),
        "{incoming:#}"
    );
    assert!(incoming["description"].is_string());
    assert_eq!(schema["title"], "tether configuration");
}
