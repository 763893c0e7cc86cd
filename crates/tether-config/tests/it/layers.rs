//! File, then environment, then flags.

use serde_json::json;
use tether_config::{Loader, Origin, Problems, model::IncomingMode};

use crate::write;

fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
    vars.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn environment_overrides_the_file_and_flags_override_both() {
    let file = write(
        "c.json",
        r#"{ "target": { "path": "deploy/api", "namespace": "shop" }, "agent": { "ttl": 5 } }"#,
    );
    let loaded = Loader::new()
        .file(&file.path)
        .env(env(&[
            ("TETHER_TARGET__NAMESPACE", "staging"),
            ("TETHER_FEATURE__NETWORK__INCOMING__MODE", "steal"),
            ("TETHER_AGENT__TTL", "\"1m\""),
            ("TETHER_E2E_KUBECONFIG", "/ignored"),
            ("PATH", "/usr/bin"),
        ]))
        .flag("--target", "/target", json!("deploy/web"))
        .load()
        .expect("valid");
    let config = loaded.config;
    assert_eq!(
        config.target.path.as_deref(),
        Some("deploy/web"),
        "flag wins"
    );
    assert_eq!(
        config.target.namespace.as_deref(),
        Some("staging"),
        "env wins over file, flag's short form keeps it"
    );
    assert_eq!(config.feature.network.incoming.mode, IncomingMode::Steal);
    assert_eq!(config.agent.ttl.get().as_secs(), 60);
}

#[test]
fn a_bad_environment_variable_is_named() {
    let Err(Problems(found)) = Loader::new()
        .env(env(&[
            ("TETHER_FEATURE__NETWORK__INCOMING__MOD", "steal"),
            ("TETHER_AGENT__TTL", "forever"),
        ]))
        .load()
    else {
        panic!("expected problems")
    };
    assert_eq!(found.len(), 2, "{found:#?}");
    let unknown = found.iter().find(|p| p.key.ends_with("mod")).unwrap();
    assert_eq!(
        unknown.origin,
        Origin::Env {
            var: "TETHER_FEATURE__NETWORK__INCOMING__MOD".into()
        }
    );
    assert_eq!(
        unknown.help.as_deref(),
        Some("did you mean TETHER_FEATURE__NETWORK__INCOMING__MODE?")
    );
    assert!(
        unknown
            .to_string()
            .contains("environment variable TETHER_FEATURE__NETWORK__INCOMING__MOD")
    );
    let ttl = found.iter().find(|p| p.key == "agent.ttl").unwrap();
    assert_eq!(
        ttl.origin,
        Origin::Env {
            var: "TETHER_AGENT__TTL".into()
        }
    );
}

#[test]
fn a_top_level_typo_in_the_environment_gets_a_suggestion() {
    let Err(Problems(found)) = Loader::new()
        .env(env(&[("TETHER_KUBE_CONTXT", "x")]))
        .load()
    else {
        panic!("expected problems")
    };
    assert_eq!(
        found[0].help.as_deref(),
        Some("did you mean TETHER_KUBE_CONTEXT?")
    );
}

#[test]
fn a_flag_with_a_bad_value_is_named() {
    let Err(Problems(found)) = Loader::new()
        .flag("--target", "/target", json!("deploy"))
        .load()
    else {
        panic!("expected problems")
    };
    assert_eq!(
        found[0].origin,
        Origin::Flag {
            flag: "--target".into()
        }
    );
    assert!(found[0].message.contains("not a target"), "{found:?}");
}

#[test]
fn the_default_file_is_found_and_two_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join(".tether")).unwrap();
    let loaded = Loader::new()
        .default_file(dir.path())
        .load()
        .expect("no file is fine");
    assert_eq!(loaded.file, None);
    std::fs::write(
        dir.path().join(".tether/config.toml"),
        "target = \"pid/1\"\n",
    )
    .unwrap();
    let loaded = Loader::new()
        .default_file(dir.path())
        .load()
        .expect("valid");
    assert_eq!(loaded.config.target.path.as_deref(), Some("pid/1"));
    std::fs::write(dir.path().join(".tether/config.json"), "{}").unwrap();
    let err = Loader::new().default_file(dir.path()).load().unwrap_err();
    assert!(
        err.0
            .iter()
            .any(|p| p.message.contains("more than one default config file")),
        "{err:?}"
    );
}
