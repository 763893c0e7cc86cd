//! `tether config check` and `tether config schema`.

use predicates::prelude::*;

use crate::tether;

const MIRRORD_STEAL: &str = r#"{
  "target": { "path": "deployment/api", "namespace": "shop" },
  "feature": {
    "network": {
      "incoming": {
        "mode": "steal",
        "http_filter": { "header_filter": "^X-Dev: alice$" }
      }
    }
  }
}"#;

fn project(file: &str, text: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(file);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    dir
}

#[test]
fn a_mirrord_style_steal_with_a_header_filter_checks_clean() {
    let dir = project("mirrord.json", MIRRORD_STEAL);
    tether()
        .current_dir(dir.path())
        .args(["config", "check", "mirrord.json"])
        .assert()
        .success()
        .stdout(predicate::str::contains("mirrord.json is valid"))
        .stdout(predicate::str::contains(
            "incoming: steal with an HTTP filter",
        ));
}

#[test]
fn a_typo_names_the_key_the_line_and_the_suggestion() {
    let typo = MIRRORD_STEAL.replace("\"mode\"", "\"mdoe\"");
    let dir = project(".tether/config.json", &typo);
    tether()
        .current_dir(dir.path())
        .args(["config", "check"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "unknown key `mdoe` in `feature.network.incoming`",
        ))
        .stderr(predicate::str::contains("config.json:6:9"))
        .stderr(predicate::str::contains("did you mean `mode`?"));
}

#[test]
fn json_output_lists_the_problems_for_programs() {
    let typo = MIRRORD_STEAL.replace("\"mode\"", "\"mdoe\"");
    let dir = project("c.json", &typo);
    let output = tether()
        .current_dir(dir.path())
        .args(["--output", "json", "-f", "c.json", "config", "check"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["valid"], false);
    let problem = &report["problems"][0];
    assert_eq!(problem["key"], "feature.network.incoming.mdoe");
    assert_eq!(problem["line"], 6);
    assert_eq!(problem["column"], 9);
    assert_eq!(problem["help"], "did you mean `mode`?");
}

#[test]
fn environment_variables_are_checked_too() {
    let dir = tempfile::tempdir().unwrap();
    tether()
        .current_dir(dir.path())
        .env("TETHER_FEATURE__NETWORK__INCOMING__MODE", "steel")
        .args(["config", "check"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "environment variable TETHER_FEATURE__NETWORK__INCOMING__MODE",
        ))
        .stderr(predicate::str::contains("did you mean \"steal\"?"));
}

#[test]
fn the_printed_schema_is_the_committed_one() {
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/config.schema.json"
    ))
    .unwrap();
    tether()
        .args(["config", "schema"])
        .assert()
        .success()
        .stdout(committed);
}
