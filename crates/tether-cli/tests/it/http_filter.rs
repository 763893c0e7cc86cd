//! Filtered steal through `tether exec`: the agent routes each HTTP request on its own.

use std::process::Command;

use tether_testkit::{Network, Pod, require_root};

use crate::exec::{Exec, Scenario, free_port, pod_url, scenario_with, tokio_app};

/// One request with curl from the client namespace; the answer's body.
pub(crate) fn curl(net: &Network, url: &str, headers: &[&str]) -> String {
    let mut args = vec!["curl", "-s", "-m", "5", url];
    for header in headers {
        args.extend(["-H", header]);
    }
    net.exec_ok(net.client(), &args).trim().to_owned()
}

fn setup(filter: Option<&str>, probes: bool) -> (Network, Pod, Exec) {
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
    let Scenario { exec, pod, net, .. } = scenario_with("steal", &env, tokio_app);
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

/// Peak resident memory (VmHWM, KiB) of the running agent worker for `pod`.
fn agent_worker_peak_kib(pod: &Pod) -> u64 {
    let pattern = format!("tether agent --target netns/{} .*--worker-of", pod.netns);
    let pids = Command::new("pgrep")
        .args(["-f", &pattern])
        .output()
        .unwrap();
    let pid = String::from_utf8_lossy(&pids.stdout)
        .split_whitespace()
        .next()
        .expect("the agent worker runs")
        .to_owned();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_1_gib_upload_streams_through_a_filtered_steal_in_bounded_memory() {
    if !require_root("a_1_gib_upload_streams_through_a_filtered_steal_in_bounded_memory") {
        return;
    }
    const SIZE: u64 = 1 << 30;
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    net.start_http_app(&pod, "original", &[80]);
    let port = free_port();
    // The local app reads the body in chunks and answers with its size and SHA-256.
    let app = format!(
        "import hashlib, http.server\n\
         class H(http.server.BaseHTTPRequestHandler):\n\
         \x20   protocol_version = 'HTTP/1.1'\n\
         \x20   def do_POST(self):\n\
         \x20       left = int(self.headers['Content-Length']); h = hashlib.sha256(); n = 0\n\
         \x20       while left:\n\
         \x20           b = self.rfile.read(min(left, 1 << 20)); h.update(b); n += len(b); left -= len(b)\n\
         \x20       body = f'{{n}} {{h.hexdigest()}}'.encode()\n\
         \x20       self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers(); self.wfile.write(body)\n\
         \x20   def log_message(self, *a): pass\n\
         http.server.HTTPServer(('0.0.0.0', {port}), H).serve_forever()\n"
    );
    let mut exec = Exec::start_with(
        &pod,
        "steal",
        port,
        &[(
            "TETHER_FEATURE__NETWORK__INCOMING__HTTP_FILTER__HEADER_FILTER",
            "^x-dev: alice$",
        )],
        &["python3", "-c", &app],
    );
    exec.wait_for("target port 80");
    let baseline = agent_worker_peak_kib(&pod);
    // The client streams 1 GiB (a generator: never held whole) and checks the answer.
    let client = format!(
        "import hashlib, http.client\n\
         block = bytes(range(256)) * 4096; h = hashlib.sha256()\n\
         def body():\n\
         \x20   for i in range({SIZE} // len(block)):\n\
         \x20       h.update(block); yield block\n\
         c = http.client.HTTPConnection('{ip}', 80, timeout=120)\n\
         c.request('POST', '/upload', body=body(), headers={{'Content-Length': str({SIZE}), 'X-Dev': 'alice'}})\n\
         print(c.getresponse().read().decode(), h.hexdigest())\n",
        ip = pod.ip
    );
    let started = std::time::Instant::now();
    let output = net.exec_ok(net.client(), &["python3", "-c", &client]);
    let took = started.elapsed();
    let fields: Vec<&str> = output.split_whitespace().collect();
    assert_eq!(fields.len(), 3, "{output}");
    assert_eq!(
        fields[0],
        SIZE.to_string(),
        "every byte reached the local app"
    );
    assert_eq!(fields[1], fields[2], "checksums match");
    let peak = agent_worker_peak_kib(&pod);
    eprintln!(
        "1 GiB through a filtered steal in {took:?}; agent worker peak RSS {} MiB (before: {} MiB)",
        peak / 1024,
        baseline / 1024
    );
    assert!(
        peak < 64 * 1024,
        "the agent's peak RSS must stay under 64 MiB, was {} MiB",
        peak / 1024
    );
}

#[test]
fn a_local_app_that_does_not_answer_gets_the_client_a_502_not_a_hang() {
    if !require_root("a_local_app_that_does_not_answer_gets_the_client_a_502_not_a_hang") {
        return;
    }
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    net.start_http_app(&pod, "original", &[80]);
    let port = free_port();
    // Accepts and hangs up at once, without a word.
    let app = format!(
        "import socket\n\
         s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', {port})); s.listen()\n\
         while True:\n\
         \x20   c, _ = s.accept(); c.close()\n"
    );
    let mut exec = Exec::start_with(
        &pod,
        "steal",
        port,
        &[(
            "TETHER_FEATURE__NETWORK__INCOMING__HTTP_FILTER__HEADER_FILTER",
            "^x-dev: alice$",
        )],
        &["python3", "-c", &app],
    );
    exec.wait_for("target port 80");
    let url = pod_url(&pod);
    let status = net.exec_ok(
        net.client(),
        &[
            "curl",
            "-s",
            "-m",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "X-Dev: alice",
            &url,
        ],
    );
    assert_eq!(status, "502");
    let body = curl(&net, &url, &["X-Dev: alice"]);
    assert!(
        body.starts_with("tether: the local process did not answer") && body.lines().count() == 1,
        "{body}"
    );
    assert!(
        curl(&net, &url, &[]).starts_with("original 80"),
        "the pod keeps serving everything else"
    );
}

#[test]
fn path_method_all_of_and_any_of_filters_route_per_request() {
    if !require_root("path_method_all_of_and_any_of_filters_route_per_request") {
        return;
    }
    let base = |pod: &Pod, path: &str| format!("http://{}:80{path}", pod.ip);
    // (filter, [a request it takes, a request it leaves]), each request (method, path, headers).
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str, &'a [&'a str])]);
    let cases: &[Case<'_>] = &[
        (
            r#"{"path_filter": "^/api/"}"#,
            &[("GET", "/api/x", &[]), ("GET", "/web", &[])],
        ),
        (
            r#"{"method_filter": "^POST$"}"#,
            &[("POST", "/x", &[]), ("GET", "/x", &[])],
        ),
        (
            r#"{"all_of": [{"header": "^x-dev: a$"}, {"path": "^/api"}]}"#,
            &[("GET", "/api", &["X-Dev: a"]), ("GET", "/api", &[])],
        ),
        (
            r#"{"any_of": [{"header": "^x-dev: a$"}, {"path": "^/api"}]}"#,
            &[("GET", "/web", &["X-Dev: a"]), ("GET", "/web", &[])],
        ),
    ];
    for (filter, [(m1, p1, h1), (m2, p2, h2)]) in cases.iter().map(|(f, r)| (f, [r[0], r[1]])) {
        let net = Network::new(1);
        let pod = net.pod(0).clone();
        net.start_http_app(&pod, "original", &[80]);
        let port = free_port();
        let app = tokio_app(port);
        let mut exec = Exec::start_with(
            &pod,
            "steal",
            port,
            &[("TETHER_FEATURE__NETWORK__INCOMING__HTTP_FILTER", filter)],
            &app.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        exec.wait_for("target port 80");
        let request = |method: &str, path: &str, headers: &[&str]| {
            let mut args = vec!["curl", "-s", "-m", "5", "-X", method];
            for header in headers {
                args.extend(["-H", header]);
            }
            let url = base(&pod, path);
            args.push(&url);
            net.exec_ok(net.client(), &args)
        };
        let taken = request(m1, p1, h1);
        let left = request(m2, p2, h2);
        assert!(
            taken.starts_with("local-tokio"),
            "{filter}: {m1} {p1} {h1:?} → {taken}"
        );
        assert!(
            left.starts_with("original 80"),
            "{filter}: {m2} {p2} {h2:?} → {left}"
        );
    }
}

#[test]
fn a_websocket_upgrade_goes_where_its_request_is_routed() {
    if !require_root("a_websocket_upgrade_goes_where_its_request_is_routed") {
        return;
    }
    let apps = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tether-testkit/src/apps/ws_echo.py");
    let apps = apps.to_str().unwrap().to_owned();
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    net.spawn(&pod.netns, &["python3", &apps, "pod", "80"]);
    net.wait_listening(&pod.netns, 80);
    let port = free_port();
    let mut exec = Exec::start_with(
        &pod,
        "steal",
        port,
        &[(
            "TETHER_FEATURE__NETWORK__INCOMING__HTTP_FILTER__HEADER_FILTER",
            "^x-dev: alice$",
        )],
        &["python3", &apps, "local", &port.to_string()],
    );
    exec.wait_for("target port 80");
    // Handshake, check the accept key, then two messages over the upgraded connection.
    let client = |marked: bool| {
        let script = format!(
            "import base64, hashlib, socket\n\
             s = socket.create_connection(('{ip}', 80), timeout=5)\n\
             key = base64.b64encode(b'0123456789abcdef').decode()\n\
             s.sendall(('GET /ws HTTP/1.1\\r\\nHost: pod\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\n'\n\
             \x20          'Sec-WebSocket-Key: ' + key + '\\r\\nSec-WebSocket-Version: 13\\r\\n{mark}\\r\\n').encode())\n\
             head = b''\n\
             while b'\\r\\n\\r\\n' not in head: head += s.recv(1)\n\
             expected = base64.b64encode(hashlib.sha1((key + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11').encode()).digest()).decode()\n\
             assert head.startswith(b'HTTP/1.1 101') and expected.encode() in head, head\n\
             for word in (b'one', b'two'):\n\
             \x20   s.sendall(word); print(s.recv(100).decode())\n",
            ip = pod.ip,
            mark = if marked { "X-Dev: alice\\r\\n" } else { "" }
        );
        net.exec_ok(net.client(), &["python3", "-c", &script])
    };
    assert_eq!(
        client(true).lines().collect::<Vec<_>>(),
        ["local: one", "local: two"]
    );
    assert_eq!(
        client(false).lines().collect::<Vec<_>>(),
        ["pod: one", "pod: two"]
    );
}

#[test]
fn concurrent_h2c_streams_on_one_connection_split_between_local_and_pod() {
    if !require_root("concurrent_h2c_streams_on_one_connection_split_between_local_and_pod") {
        return;
    }
    let apps = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tether-testkit/src/apps");
    let (server, client) = (apps.join("h2_app.js"), apps.join("h2_client.js"));
    let (server, client) = (
        server.to_str().unwrap().to_owned(),
        client.to_str().unwrap().to_owned(),
    );
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    net.spawn(&pod.netns, &["node", &server, "pod", "80"]);
    net.wait_listening(&pod.netns, 80);
    let port = free_port();
    let mut exec = Exec::start_with(
        &pod,
        "steal",
        port,
        &[(
            "TETHER_FEATURE__NETWORK__INCOMING__HTTP_FILTER__HEADER_FILTER",
            "^x-dev: alice$",
        )],
        &["node", &server, "local", &port.to_string()],
    );
    exec.wait_for("target port 80");
    let output = net.exec_ok(
        net.client(),
        &["node", &client, &format!("http://{}:80", pod.ip)],
    );
    assert_eq!(
        output.lines().collect::<Vec<_>>(),
        [
            "local /r0 alice",
            "pod /r1 -",
            "local /r2 alice",
            "pod /r3 -",
            "local /r4 alice",
            "pod /r5 -"
        ],
        "{}",
        exec.seen_lines()
    );
}

#[test]
fn a_filtered_mirror_copies_only_matching_requests() {
    if !require_root("a_filtered_mirror_copies_only_matching_requests") {
        return;
    }
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    net.start_http_app(&pod, "original", &[80]);
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen");
    let app = crate::exec::recording_app(port, &seen);
    let mut exec = Exec::start_with(
        &pod,
        "mirror",
        port,
        &[(
            "TETHER_FEATURE__NETWORK__INCOMING__HTTP_FILTER__HEADER_FILTER",
            "^x-dev: alice$",
        )],
        &["python3", "-c", &app],
    );
    exec.wait_for("target port 80");
    let base = format!("http://{}:80", pod.ip);
    for (path, marked) in [("/u1", false), ("/m1", true), ("/u2", false), ("/m2", true)] {
        let headers: &[&str] = if marked { &["X-Dev: alice"] } else { &[] };
        let answer = curl(&net, &format!("{base}{path}"), headers);
        assert_eq!(
            answer,
            format!("original 80 GET {path}"),
            "the pod answers every request"
        );
    }
    // Copies arrive asynchronously: wait (bounded) for both marked ones.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let copies = loop {
        let copies = std::fs::read_to_string(&seen).unwrap_or_default();
        if copies.contains("/m1") && copies.contains("/m2") {
            break copies;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "marked copies missing after 10 s: {copies:?}\n{}",
            exec.seen_lines()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut lines: Vec<&str> = copies.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines, ["/m1", "/m2"], "only the marked requests are copied");
}
