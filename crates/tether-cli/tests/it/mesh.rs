//! Steal under a service mesh (issue 9): the Istio sidecar fixture of the testkit — the real
//! istio-iptables nat rules and a stand-in Envoy as uid 1337 — with each iptables backend.

use std::process::Command;

use tether_testkit::{Network, require_root};

use crate::exec::{Exec, free_port, pod_url, tokio_app};

fn curl(net: &Network, url: &str, headers: &[&str]) -> String {
    let mut args = vec!["curl", "-s", "-m", "5", url];
    for header in headers {
        args.extend(["-H", header]);
    }
    net.exec_ok(net.client(), &args).trim().to_owned()
}

/// A filtered steal under the Istio fixture: marked requests reach the local app, the rest the app
/// behind the sidecar; 500 keep-alive and 500 one-shot requests are all answered; the pod's nat
/// table is exactly what it was once the session ends.
fn filtered_steal_under_istio(backend: &str) {
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    net.start_http_app(&pod, "original", &[80]);
    net.install_istio(&pod, backend);
    let url = pod_url(&pod);
    assert_eq!(
        curl(&net, &url, &[]),
        "original 80 GET /hello",
        "the fixture serves through its sidecar before tether"
    );
    let before = net.nat_rules(&pod, backend);

    let port = free_port();
    let app = tokio_app(port);
    let mut exec = Exec::start_with(
        &pod,
        "steal",
        port,
        &[(
            "TETHER_FEATURE__NETWORK__INCOMING__HTTP_FILTER__HEADER_FILTER",
            "^x-dev: alice$",
        )],
        &app.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    exec.wait_for(&format!(":{port} ("));
    for _ in 0..3 {
        let marked = curl(&net, &url, &["X-Dev: alice"]);
        // Taken on the sidecar's hop to the app: the local app sees the sidecar (127.0.0.6) as
        // the peer, as the pod's app does under Istio.
        assert!(
            marked.starts_with("local-tokio ") && marked.ends_with("from 127.0.0.6"),
            "{marked}\n{}",
            exec.seen_lines()
        );
        assert_eq!(curl(&net, &url, &[]), "original 80 GET /hello");
    }
    for keepalive in [true, false] {
        let answers = net.http_requests(&url, 500, keepalive);
        let wrong: Vec<&String> = answers
            .iter()
            .filter(|a| !a.starts_with("original 80 GET /hello?n="))
            .collect();
        assert!(
            answers.len() == 500 && wrong.is_empty(),
            "keep-alive {keepalive}: {} answers, unexpected: {:?}",
            answers.len(),
            wrong.iter().take(5).collect::<Vec<_>>()
        );
    }
    assert!(exec.interrupt().is_some(), "{}", exec.seen_lines());
    assert_eq!(
        net.nat_rules(&pod, backend),
        before,
        "the nat table after the session is the one before it"
    );
    // (The nft backend's own table is not in iptables-nft-save's listing.)
    assert_eq!(crate::exec::rules(&net, &pod), "", "no tether table left");
    assert_eq!(
        curl(&net, &url, &["X-Dev: alice"]),
        "original 80 GET /hello"
    );
}

#[test]
fn filtered_steal_under_istio_with_iptables_legacy() {
    if require_root("filtered_steal_under_istio_with_iptables_legacy") {
        filtered_steal_under_istio("legacy");
    }
}

#[test]
fn filtered_steal_under_istio_with_iptables_nft() {
    if require_root("filtered_steal_under_istio_with_iptables_nft") {
        filtered_steal_under_istio("nft");
    }
}

/// Whole-port steal and mirror under the Istio fixture, then an agent killed with SIGKILL: its
/// guard's cleanup leaves the nat table exactly as it was.
fn whole_port_mirror_and_kill_under_istio(backend: &str) {
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    net.start_http_app(&pod, "original", &[80]);
    net.install_istio(&pod, backend);
    let url = pod_url(&pod);
    let before = net.nat_rules(&pod, backend);

    // Whole-port steal: everything (probes aside) reaches the local app.
    let port = free_port();
    let app = tokio_app(port);
    let mut exec = Exec::start_with(
        &pod,
        "steal",
        port,
        &[],
        &app.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    exec.wait_for(&format!(":{port} ("));
    let answers = net.http_requests(&url, 20, true);
    assert!(
        answers.len() == 20 && answers.iter().all(|a| a.starts_with("local-tokio ")),
        "{answers:?}"
    );
    assert!(exec.interrupt().is_some());
    assert_eq!(net.nat_rules(&pod, backend), before);

    // Mirror: each request is copied once — from the sidecar's plaintext hop on `lo`, not a
    // second time from the pod's interface (where a real mesh's bytes are encrypted).
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen");
    let mut exec = Exec::start_with(
        &pod,
        "mirror",
        port,
        &[],
        &["python3", "-c", &crate::exec::recording_app(port, &seen)],
    );
    exec.wait_for("target port 80");
    let base = format!("http://{}:80", pod.ip);
    for path in ["/m1", "/m2", "/m3"] {
        assert_eq!(
            curl(&net, &format!("{base}{path}"), &[]),
            format!("original 80 GET {path}")
        );
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let copies = loop {
        let copies = std::fs::read_to_string(&seen).unwrap_or_default();
        if ["/m1", "/m2", "/m3"].iter().all(|p| copies.contains(p)) {
            break copies;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "copies missing after 10 s: {copies:?}\n{}",
            exec.seen_lines()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    // A duplicate (a copy from the pod's interface as well as from lo) may trail its original:
    // wait until the file has not changed for a second (bounded) before counting.
    let mut copies = copies;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        let now = std::fs::read_to_string(&seen).unwrap_or_default();
        if now == copies || std::time::Instant::now() > deadline {
            break;
        }
        copies = now;
    }
    assert!(exec.interrupt().is_some());
    let mut lines: Vec<&str> = copies.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines, ["/m1", "/m2", "/m3"], "each request copied once");

    // SIGKILL of the agent's worker: the guard removes the rules.
    let port = free_port();
    let app = tokio_app(port);
    let mut exec = Exec::start_with(
        &pod,
        "steal",
        port,
        &[],
        &app.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    exec.wait_for(&format!(":{port} ("));
    // (The nft backend keeps its rules in a table of its own, which iptables-nft-save does not
    // list: look for tether's rules in both places.)
    let present = || {
        net.nat_rules(&pod, backend).contains("TTH_") || !crate::exec::rules(&net, &pod).is_empty()
    };
    assert!(present(), "the steal's rules are in place");
    let pattern = format!("agent --target netns/{} .*--worker-of", pod.netns);
    let pids = Command::new("pgrep")
        .args(["-f", &pattern])
        .output()
        .unwrap();
    let pids = String::from_utf8_lossy(&pids.stdout).trim().to_owned();
    assert!(!pids.is_empty(), "the agent worker runs");
    Command::new("kill")
        .arg("-9")
        .args(pids.split_whitespace())
        .status()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while present() || net.nat_rules(&pod, backend) != before {
        assert!(
            std::time::Instant::now() < deadline,
            "rules still there 10 s after the worker was killed:\n{}",
            net.nat_rules(&pod, backend)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    drop(exec);
    assert_eq!(curl(&net, &url, &[]), "original 80 GET /hello");
}

#[test]
fn whole_port_mirror_and_kill_under_istio_with_iptables_legacy() {
    if require_root("whole_port_mirror_and_kill_under_istio_with_iptables_legacy") {
        whole_port_mirror_and_kill_under_istio("legacy");
    }
}

#[test]
fn whole_port_mirror_and_kill_under_istio_with_iptables_nft() {
    if require_root("whole_port_mirror_and_kill_under_istio_with_iptables_nft") {
        whole_port_mirror_and_kill_under_istio("nft");
    }
}

/// `flush_connections` under the Istio fixture: a keep-alive connection opened before the steal
/// (client → sidecar → app) gets its next request stolen after one reconnect; the app's side of
/// the sidecar's hop is what gets closed.
#[test]
fn flush_connections_moves_a_keepalive_client_under_istio() {
    if !require_root("flush_connections_moves_a_keepalive_client_under_istio") {
        return;
    }
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    net.start_http_app(&pod, "original", &[80]);
    net.install_istio(&pod, "nft");
    let mut client = net.keepalive_client(net.client(), &pod_url(&pod));
    assert_eq!(client.get("/before"), "original 80 GET /before");
    let port = free_port();
    let app = tokio_app(port);
    let mut exec = Exec::start_with(
        &pod,
        "steal",
        port,
        &[("TETHER_AGENT__FLUSH_CONNECTIONS", "true")],
        &app.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    exec.wait_for(&format!(":{port} ("));
    let moved = client.get("/after");
    assert!(
        moved.starts_with("reconnected: local-tokio "),
        "{moved}\n{}",
        exec.seen_lines()
    );
    // Now on a stolen connection: it stays there.
    assert!(client.get("/again").starts_with("local-tokio "));
    exec.wait_for("flush_connections: closed");
}

/// A filtered steal under the Linkerd fixture: the proxy's hop to the app (uid 2102, `lo`) is
/// where requests are taken; the rest reach the app.
#[test]
fn filtered_steal_under_linkerd() {
    if !require_root("filtered_steal_under_linkerd") {
        return;
    }
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    net.start_http_app(&pod, "original", &[80]);
    net.install_linkerd(&pod, "legacy");
    let url = pod_url(&pod);
    assert_eq!(curl(&net, &url, &[]), "original 80 GET /hello");
    let before = net.nat_rules(&pod, "legacy");
    let port = free_port();
    let app = tokio_app(port);
    let mut exec = Exec::start_with(
        &pod,
        "steal",
        port,
        &[(
            "TETHER_FEATURE__NETWORK__INCOMING__HTTP_FILTER__HEADER_FILTER",
            "^x-dev: alice$",
        )],
        &app.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    exec.wait_for(&format!(":{port} ("));
    for _ in 0..3 {
        let marked = curl(&net, &url, &["X-Dev: alice"]);
        assert!(
            marked.starts_with("local-tokio "),
            "{marked}\n{}",
            exec.seen_lines()
        );
        assert_eq!(curl(&net, &url, &[]), "original 80 GET /hello");
    }
    let answers = net.http_requests(&url, 100, true);
    assert!(
        answers
            .iter()
            .all(|a| a.starts_with("original 80 GET /hello")),
        "{answers:?}"
    );
    assert!(exec.interrupt().is_some());
    assert_eq!(net.nat_rules(&pod, "legacy"), before);
}
