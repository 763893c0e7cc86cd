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
fn exec_explains_what_it_cannot_do_and_exits_125() {
    let dir = tempfile::tempdir().unwrap();
    tether()
        .current_dir(dir.path())
        .args(["exec", "--", "true"])
        .assert()
        .code(125)
        .stderr(predicate::str::contains(
            "no target: give one with --target (deploy/NAME, pod/NAME, netns/NAME, pid/PID, …)",
        ));
    // No kubeconfig anywhere, not inside a pod.
    tether()
        .current_dir(dir.path())
        .env("HOME", dir.path())
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .args(["exec", "--target", "deploy/api", "--", "true"])
        .assert()
        .code(125)
        .stderr(predicate::str::contains(
            "no cluster: no kubeconfig ($KUBECONFIG, ~/.kube/config) and not inside a pod",
        ));
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
    // Root, five programs, the kernel, the syscall supervisor's kernel support (and, as root
    // with nft, nftables in the kernel).
    let checked: Vec<&str> = finished
        .iter()
        .filter_map(|e| e["step"].as_str()?.split_whitespace().next())
        .collect();
    assert_eq!(
        checked[..8],
        [
            "running",
            "ip",
            "iptables",
            "iptables-legacy",
            "nft",
            "conntrack",
            "kernel",
            "syscall"
        ],
        "{events:#?}"
    );
    assert!(finished.len() <= 9, "{events:#?}");
    let supervisor = finished
        .iter()
        .find(|e| {
            e["step"]
                .as_str()
                .is_some_and(|s| s.starts_with("syscall supervisor"))
        })
        .expect("the supervisor's check");
    // This machine's kernel (6.x, x86_64) has every piece.
    assert_eq!(supervisor["detail"], "available", "{supervisor:#?}");
    let all_ok = finished.iter().all(|e| e["ok"] == true);
    assert_eq!(
        output.status.success(),
        all_ok,
        "exit code follows the checks"
    );
}
