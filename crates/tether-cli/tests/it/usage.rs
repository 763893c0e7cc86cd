//! Help, errors of usage, and what is not built yet.

use predicates::prelude::*;

use crate::tether;

#[test]
fn help_teaches_with_examples() {
    tether()
        .arg("--help")
        .assert()
        .success()
        .stdout(predicate::str::contains("Examples:"))
        .stdout(predicate::str::contains(
            "tether exec --target deploy/api -- cargo run",
        ));
    tether()
        .args(["exec", "--help"])
        .assert()
        .success()
        .stdout(predicate::str::contains("--steal"))
        .stdout(predicate::str::contains(
            "exit code is the command's exit code",
        ));
}

#[test]
fn exec_without_a_command_is_a_usage_error() {
    tether()
        .arg("exec")
        .assert()
        .code(2)
        .stderr(predicate::str::contains("COMMAND"));
}

#[test]
fn unbuilt_commands_say_so_plainly() {
    tether()
        .args(["exec", "--", "true"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("not implemented yet"));
}

#[test]
fn doctor_reports_each_check() {
    let output = tether()
        .args(["--output", "json", "doctor"])
        .output()
        .unwrap();
    let events: Vec<serde_json::Value> = output
        .stdout
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| serde_json::from_slice(line).unwrap())
        .collect();
    let finished: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "step_finished")
        .collect();
    assert_eq!(finished.len(), 6, "{events:#?}");
    let all_ok = finished.iter().all(|e| e["ok"] == true);
    assert_eq!(
        output.status.success(),
        all_ok,
        "exit code follows the checks"
    );
}
