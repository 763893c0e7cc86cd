//! Filtered steal through `tether exec`: the agent routes each HTTP request on its own.

use std::process::Command;

use tether_testkit::{Network, Pod, require_root};

use crate::exec::{Exec, free_port, pod_url, tokio_app};

/// One request with curl from the client namespace; the answer's body.
fn curl(net: &Network, url: &str, headers: &[&str]) -> String {
    let mut args = vec!["curl", "-s", "-m", "5", url];
    for header in headers {
        args.extend(["-H", header]);
    }
    net.exec_ok(net.client(), &args).trim().to_owned()
}

fn setup(filter: Option<&str>, probes: bool) -> (Network, Pod, Exec) {
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    net.start_http_app(&pod, "original", &[80]);
    let port = free_port();
    let mut env = Vec::new();
    if let Some(filter) = filter {
        env.push((
            "TETHER_FEATURE__NETWORK__INCOMING__HTTP_FILTER__HEADER_FILTER",
            filter,
        ));
    }
    if probes {
        env.push(("TETHER_PROBES__STEAL", "true"));
    }
    let app = tokio_app(port);
    let mut exec = Exec::start_with(
        &pod,
        "steal",
        port,
        &env,
        &app.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    exec.wait_for("target port 80");
    (net, pod, exec)
}

#[test]
fn only_marked_requests_reach_the_local_app() {
    if !require_root("only_marked_requests_reach_the_local_app") {
        return;
    }
    let (net, pod, _exec) = setup(Some("^X-Dev: alice$"), false);
    let url = pod_url(&pod);
    for _ in 0..3 {
        let marked = curl(&net, &url, &["X-Dev: alice"]);
        assert!(marked.starts_with("local-tokio "), "{marked}");
        assert!(
            marked.ends_with(&format!("from {}", net.client_ip())),
            "the local app sees the real client: {marked}"
        );
        assert!(curl(&net, &url, &[]).starts_with("original 80 GET /hello"));
        assert!(curl(&net, &url, &["X-Dev: bob"]).starts_with("original 80"));
    }
}

#[test]
fn one_keepalive_connection_carries_both_kinds_in_order() {
    if !require_root("one_keepalive_connection_carries_both_kinds_in_order") {
        return;
    }
    let (net, pod, _exec) = setup(Some("^x-dev: alice$"), false);
    let mut client = net.keepalive_client(net.client(), &pod_url(&pod));
    let local = |answer: String, path: &str| {
        assert!(
            answer.starts_with("local-tokio") && answer.contains(&format!("GET {path} ")),
            "{answer}"
        );
    };
    local(client.get("/a|X-Dev: alice"), "/a");
    assert_eq!(client.get("/b"), "original 80 GET /b");
    local(client.get("/c|X-Dev: alice"), "/c");
    assert_eq!(client.get("/d"), "original 80 GET /d");
}

#[test]
fn kubelet_probes_stay_with_the_pod_unless_probe_stealing_is_on() {
    if !require_root("kubelet_probes_stay_with_the_pod_unless_probe_stealing_is_on") {
        return;
    }
    let probe = "User-Agent: kube-probe/1.30";
    for (filter, probes, expect_local) in [
        (Some("^x-dev: alice$"), false, false),
        (None, false, false),
        (None, true, true),
    ] {
        let (net, pod, _exec) = setup(filter, probes);
        let url = pod_url(&pod);
        let answer = curl(&net, &url, &[probe, "X-Dev: alice"]);
        assert_eq!(
            answer.starts_with("local-tokio"),
            expect_local,
            "filter {filter:?}, probes.steal {probes}: {answer}"
        );
        if filter.is_none() && !probes {
            // A whole-port steal still takes everything else.
            assert!(curl(&net, &url, &[]).starts_with("local-tokio"));
        }
    }
}

#[test]
fn non_http_bytes_on_a_filtered_port_reach_the_pod_unchanged() {
    if !require_root("non_http_bytes_on_a_filtered_port_reach_the_pod_unchanged") {
        return;
    }
    let (net, pod, _exec) = setup(Some("^x-dev: alice$"), false);
    // A TLS ClientHello's first bytes: the pod's HTTP server answers it with its own 400.
    let script = format!(
        "import socket\ns = socket.create_connection(('{}', 80), timeout=5)\n\
         s.sendall(bytes.fromhex('160301002a010000260303') + b'x' * 40 + b'\\r\\n\\r\\n')\n\
         reply = b''\n\
         while chunk := s.recv(4096): reply += chunk\n\
         print(reply.decode(errors='replace'))\n",
        pod.ip
    );
    let output = Command::new("ip")
        .args(["netns", "exec", net.client(), "python3", "-c", &script])
        .output()
        .unwrap();
    let reply = String::from_utf8_lossy(&output.stdout);
    // Python's http.server answers bytes it cannot parse with its error page (code 400).
    assert!(
        reply.contains("Error code: 400") && !reply.contains("local-tokio"),
        "the pod's own server must answer: {reply:?}"
    );
    assert!(
        curl(&net, &pod_url(&pod), &["X-Dev: alice"]).starts_with("local-tokio"),
        "the filter still works afterwards"
    );
}
