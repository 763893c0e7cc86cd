//! `tether exec` end to end: a real pod namespace, a real client, unmodified local apps.
//!
//! Every local app listens on a port of its own (tests run in parallel on one machine), mapped
//! to the pod's port 80 with `port_mapping`.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use tether_testkit::{Network, Pod, require_root};

pub(crate) use tether_testkit::netns::free_port;

/// A running `tether exec`, with its stderr lines.
pub(crate) struct Exec {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Exec {
    fn start(pod: &Pod, mode: &str, local_port: u16, command: &[&str]) -> Exec {
        Exec::start_with(pod, mode, local_port, &[], command)
    }

    /// With extra `TETHER_*` settings.
    pub(crate) fn start_with(
        pod: &Pod,
        mode: &str,
        local_port: u16,
        env: &[(&str, &str)],
        command: &[&str],
    ) -> Exec {
        let mut all_env = vec![
            ("TETHER_FEATURE__NETWORK__INCOMING__MODE", mode.to_owned()),
            (
                "TETHER_FEATURE__NETWORK__INCOMING__PORT_MAPPING",
                format!("[[{local_port}, 80]]"),
            ),
        ];
        all_env.extend(env.iter().map(|(k, v)| (*k, (*v).to_owned())));
        let target = format!("netns/{}", pod.netns);
        Exec::spawn(&["--target", &target], &all_env, command)
    }

    /// `tether exec ARGS -- COMMAND` with `env` (and nothing of the caller's TETHER_CONFIG), in
    /// a mount namespace of its own whose `/etc/resolv.conf` names only loopback (a program
    /// that escaped interception cannot reach the host's resolver).
    pub(crate) fn spawn(args: &[&str], env: &[(&str, String)], command: &[&str]) -> Exec {
        let mut child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg("mount --bind \"$0\" /etc/resolv.conf && exec \"$@\"")
            .arg(loopback_resolv_conf())
            .arg(env!("CARGO_BIN_EXE_tether"))
            .arg("exec")
            .args(args)
            .arg("--")
            .args(command)
            .env_remove("TETHER_CONFIG")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Exec {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (at most 20 s) for a stderr line containing `needle`: tether's readiness signals.
    pub(crate) fn wait_for(&mut self, needle: &str) {
        self.wait_for_within(needle, Duration::from_secs(20));
    }

    /// Waits (at most `limit`) for a stderr line containing `needle`.
    pub(crate) fn wait_for_within(&mut self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.seen.iter().any(|l| l.contains(needle)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!(
                    "no line with {needle:?} in {limit:?}; tether said:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// What tether said so far (for failure messages).
    pub(crate) fn seen_lines(&mut self) -> String {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        self.seen.join("\n")
    }

    /// tether's pid.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while tether runs.
    pub(crate) fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits (at most `limit`) for tether to exit on its own; its exit code.
    pub(crate) fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(line);
                }
                return status.code();
            }
            match self.lines.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => self.seen.push(line),
                Err(_) => assert!(
                    Instant::now() < deadline,
                    "tether did not exit within {limit:?}; it said:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits (at most `limit`) until `count` lines containing `needle` were said.
    pub(crate) fn wait_for_count(&mut self, needle: &str, count: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.seen.iter().filter(|l| l.contains(needle)).count() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!(
                    "fewer than {count} lines with {needle:?} in {limit:?}; tether said:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Lines said so far that contain `needle`.
    pub(crate) fn count(&mut self, needle: &str) -> usize {
        self.seen_lines();
        self.seen.iter().filter(|l| l.contains(needle)).count()
    }

    /// SIGINT to tether alone (as a supervisor would send it), then its exit code (bounded).
    pub(crate) fn interrupt(&mut self) -> Option<i32> {
        nix_kill(self.child.id(), "-INT");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(line);
                }
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "tether did not exit 20 s after SIGINT"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Stops tether as a user would (SIGTERM, which it forwards to the app), so the app does not
/// outlive the test; SIGKILL only if that takes longer than 10 s.
impl Drop for Exec {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            nix_kill(self.child.id(), "-TERM");
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A pod with its original app on port 80, and `tether exec` running `app` (given its free local
/// port, mapped to the pod's port 80) until port 80 is taken. Fields drop in order: tether stops
/// before the namespaces go.
pub(crate) struct Scenario {
    pub(crate) exec: Exec,
    pub(crate) port: u16,
    pub(crate) pod: Pod,
    pub(crate) net: Network,
}

pub(crate) fn scenario_with(
    mode: &str,
    env: &[(&str, &str)],
    app: impl FnOnce(u16) -> Vec<String>,
) -> Scenario {
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    net.start_http_app(&pod, "original", &[80]);
    let port = free_port();
    let command = app(port);
    let mut exec = Exec::start_with(
        &pod,
        mode,
        port,
        env,
        &command.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    exec.wait_for(&format!(":{port} ("));
    Scenario {
        exec,
        port,
        pod,
        net,
    }
}

/// A `resolv.conf` naming only loopback, written once per test process.
pub(crate) fn loopback_resolv_conf() -> &'static std::path::Path {
    static FILE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("tether-test-resolv-{}", std::process::id()));
        std::fs::write(
            &path,
            "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
        )
        .unwrap();
        path
    })
}

fn nix_kill(pid: u32, signal: &str) {
    Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
}

pub(crate) fn pod_url(pod: &Pod) -> String {
    format!("http://{}:80/hello", pod.ip)
}

/// Runs `app` (listening on the local port) through `tether exec` in `mode` and checks who answers
/// requests from the client namespace.
fn scenario(mode: &str, app: impl Fn(u16) -> Vec<String>, local_answer: &str) {
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    net.start_http_app(&pod, "original", &[80]);
    let port = free_port();
    let command = app(port);
    let mut exec = Exec::start(
        &pod,
        mode,
        port,
        &command.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    exec.wait_for(&format!(":{port} ("));
    let answers = net.http_requests(&pod_url(&pod), 5, false);
    match mode {
        "steal" => assert!(
            answers.iter().all(|a| a.contains(local_answer)),
            "stolen requests must be answered by the local app: {answers:?}\ntether said:\n{}",
            exec.seen.join("\n")
        ),
        _ => assert!(
            answers.iter().all(|a| a.starts_with("original 80")),
            "mirrored requests are answered by the pod: {answers:?}"
        ),
    }
    if mode == "mirror" && command[0] == "socat" {
        // Every copy handled before tether stops: a copy still arriving while it shuts down
        // starts a script that finds no proxy any more, and says so (by design, loudly).
        let served = socat_served(port);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&served).map_or(0, |s| s.lines().count()) < answers.len() {
            assert!(
                std::time::Instant::now() < deadline,
                "the local socat answered fewer than {} mirrored copies in 10 s",
                answers.len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let code = exec.interrupt();
    assert!(code.is_some(), "tether must exit with the app's code");
    assert!(
        !exec.seen.iter().any(|l| l.contains("error")),
        "{}",
        exec.seen.join("\n")
    );
    assert_eq!(rules(&net, &pod), "", "no rule left after tether exits");
}

pub(crate) fn rules(net: &Network, pod: &Pod) -> String {
    let nft = net.exec_ok(&pod.netns, &["nft", "list", "ruleset"]);
    nft.lines()
        .filter(|l| l.contains("tether_"))
        .collect::<Vec<_>>()
        .join("\n")
}

pub(crate) fn python_http_server(port: u16) -> Vec<String> {
    let dir = std::env::temp_dir().join(format!("tether-exec-test-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("hello"), "local python\n").unwrap();
    [
        "python3",
        "-m",
        "http.server",
        "--directory",
        dir.to_str().unwrap(),
        &port.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

pub(crate) fn node_app(port: u16) -> Vec<String> {
    let script = format!(
        "require('http').createServer((q, s) => s.end('local node ' + q.socket.remoteAddress)).listen({port})"
    );
    vec!["node".into(), "-e".into(), script]
}

/// Where the socat app notes each connection it answered.
fn socat_served(port: u16) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("tether-socat-served-{port}"))
}

fn socat_app(port: u16) -> Vec<String> {
    // socat's address syntax mangles quotes and spaces: the reply lives in a script it execs. The
    // script reads the request head first: closing with unread input makes the kernel send a
    // reset, which would drop the answer (for any client, with or without tether).
    let script = std::env::temp_dir().join(format!("tether-socat-reply-{port}.sh"));
    let served = socat_served(port);
    let _ = std::fs::remove_file(&served);
    std::fs::write(&script, format!("#!/bin/sh\nsed -u -n '/^\\r\\?$/q'\nprintf 'HTTP/1.1 200 OK\\r\\nContent-Length: 12\\r\\nConnection: close\\r\\n\\r\\nlocal socat\\n'\necho served >> {}\n", served.display())).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    vec![
        "socat".into(),
        format!("TCP-LISTEN:{port},fork,reuseaddr"),
        format!("EXEC:{}", script.display()),
    ]
}

/// A local python app on `port` that appends every path it gets to `seen`, one per line, and
/// answers `local`.
pub(crate) fn recording_app(port: u16, seen: &std::path::Path) -> String {
    format!(
        "import http.server\n\
         class H(http.server.BaseHTTPRequestHandler):\n\
         \x20   protocol_version = 'HTTP/1.1'\n\
         \x20   def do_GET(self):\n\
         \x20       open('{seen}', 'a').write(self.path + '\\n')\n\
         \x20       self.send_response(200); self.send_header('Content-Length', '5'); self.end_headers(); self.wfile.write(b'local')\n\
         \x20   def log_message(self, *a): pass\n\
         http.server.ThreadingHTTPServer(('0.0.0.0', {port}), H).serve_forever()\n",
        seen = seen.display()
    )
}

pub(crate) fn tokio_app(port: u16) -> Vec<String> {
    vec![
        env!("CARGO_BIN_EXE_tether").into(),
        "serve-http".into(),
        "--name".into(),
        "local-tokio".into(),
        "--port".into(),
        port.to_string(),
    ]
}

macro_rules! matrix {
    ($($name:ident: $mode:literal, $app:ident, $answer:literal;)*) => {$(
        #[test]
        fn $name() {
            if require_root(stringify!($name)) {
                scenario($mode, $app, $answer);
            }
        }
    )*};
}

matrix! {
    steal_into_python_http_server: "steal", python_http_server, "local python";
    mirror_into_python_http_server: "mirror", python_http_server, "local python";
    steal_into_node: "steal", node_app, "local node";
    mirror_into_node: "mirror", node_app, "local node";
    steal_into_socat: "steal", socat_app, "local socat";
    mirror_into_socat: "mirror", socat_app, "local socat";
    steal_into_a_tokio_app: "steal", tokio_app, "local-tokio";
    mirror_into_a_tokio_app: "mirror", tokio_app, "local-tokio";
}

#[test]
fn the_local_app_sees_the_remote_client_as_its_peer() {
    if !require_root("the_local_app_sees_the_remote_client_as_its_peer") {
        return;
    }
    // `exec` bound last: bindings drop in reverse, so tether stops before the namespaces go.
    let Scenario {
        net,
        pod,
        exec: _exec,
        ..
    } = scenario_with("steal", &[], tokio_app);
    let answers = net.http_requests(&pod_url(&pod), 3, false);
    let client = net.client_ip().to_string();
    assert!(
        answers
            .iter()
            .all(|a| a.ends_with(&format!("from {client}"))),
        "accept/getpeername must return {client}: {answers:?}"
    );
}

#[test]
fn a_forking_server_serves_stolen_traffic_from_its_children() {
    if !require_root("a_forking_server_serves_stolen_traffic_from_its_children") {
        return;
    }
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    net.start_http_app(&pod, "original", &[80]);
    let port = free_port();
    let script = format!(
        "import os, socketserver\n\
         class H(socketserver.StreamRequestHandler):\n\
         \x20   def handle(self):\n\
         \x20       while self.rfile.readline().strip(): pass\n\
         \x20       body = f'child {{os.getpid()}} parent {{os.getppid()}} peer {{self.client_address[0]}}'.encode()\n\
         \x20       self.wfile.write(b'HTTP/1.1 200 OK\\r\\nConnection: close\\r\\nContent-Length: %d\\r\\n\\r\\n%s' % (len(body), body))\n\
         socketserver.ForkingTCPServer.allow_reuse_address = True\n\
         socketserver.ForkingTCPServer(('0.0.0.0', {port}), H).serve_forever()\n"
    );
    let mut exec = Exec::start(&pod, "steal", port, &["python3", "-c", &script]);
    exec.wait_for("target port 80");
    let answers = net.http_requests(&pod_url(&pod), 10, false);
    let client = net.client_ip().to_string();
    let pids: std::collections::BTreeSet<&str> = answers
        .iter()
        .filter_map(|a| a.split_whitespace().nth(1))
        .collect();
    assert!(
        answers
            .iter()
            .all(|a| a.starts_with("child ") && a.ends_with(&client)),
        "{answers:?}"
    );
    assert!(
        pids.len() > 1,
        "each request is served by its own child: {answers:?}"
    );
    // The children closing their copy of the listener must not end the steal.
    let again = net.http_requests(&pod_url(&pod), 3, false);
    assert!(again.iter().all(|a| a.starts_with("child ")), "{again:?}");
}

#[test]
fn the_apps_exit_code_is_tethers_and_nothing_is_left_behind() {
    if !require_root("the_apps_exit_code_is_tethers_and_nothing_is_left_behind") {
        return;
    }
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    net.start_http_app(&pod, "original", &[80]);
    let port = free_port();
    // An app that listens, then exits with 7 on SIGINT.
    let script = format!(
        "import signal, socket, sys\n\
         signal.signal(signal.SIGINT, lambda *a: sys.exit(7))\n\
         s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', {port})); s.listen()\n\
         signal.pause()\n"
    );
    let mut exec = Exec::start(&pod, "steal", port, &["python3", "-c", &script]);
    exec.wait_for("target port 80");
    assert_eq!(exec.interrupt(), Some(7));
    assert!(
        exec.seen
            .iter()
            .any(|l| l.contains("rules removed, agent stopped")),
        "{}",
        exec.seen.join("\n")
    );
    assert_eq!(rules(&net, &pod), "");
    let leftover = Command::new("pgrep")
        .args(["-f", &format!("netns/{} ", pod.netns)])
        .output()
        .unwrap();
    assert!(
        leftover.stdout.is_empty(),
        "agent processes left: {}",
        String::from_utf8_lossy(&leftover.stdout)
    );
    // And the pod's own app has its port back.
    assert!(net.http_requests(&pod_url(&pod), 1, false)[0].starts_with("original 80"));
}

#[test]
fn a_killed_tether_takes_its_agent_and_rules_with_it() {
    if !require_root("a_killed_tether_takes_its_agent_and_rules_with_it") {
        return;
    }
    let Scenario {
        net,
        pod,
        port,
        mut exec,
    } = scenario_with("steal", &[], tokio_app);
    nix_kill(exec.child.id(), "-KILL");
    let _ = exec.child.wait();
    let agents = format!("tether agent --target netns/{} ", pod.netns);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let running = !Command::new("pgrep")
            .args(["-f", &agents])
            .output()
            .unwrap()
            .stdout
            .is_empty();
        if !running && rules(&net, &pod).is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "5 s after tether was killed: agent running {running}, rules {:?}",
            rules(&net, &pod)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(net.http_requests(&pod_url(&pod), 1, false)[0].starts_with("original 80"));
    // tether was killed, so nobody forwarded a signal to the app: stop it here.
    let _ = Command::new("pkill")
        .args([
            "-f",
            &format!("serve-http --name local-tokio --port {port}"),
        ])
        .status();
}

#[test]
fn a_missing_command_exits_127_and_cleans_up() {
    if !require_root("a_missing_command_exits_127_and_cleans_up") {
        return;
    }
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    let output = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args([
            "exec",
            "--target",
            &format!("netns/{}", pod.netns),
            "--",
            "tether-no-such-command",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(127));
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("command not found: tether-no-such-command")
    );
}

#[test]
fn the_demo_shows_the_steal_and_cleans_up() {
    if !require_root("the_demo_shows_the_steal_and_cleans_up") {
        return;
    }
    let demo = Command::new(env!("CARGO_BIN_EXE_tether"))
        .arg("demo")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = demo.id();
    let output = demo.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    // Marked requests go to the local process, the others stay with the pod.
    assert_eq!(
        stdout.matches("answered by your local process").count(),
        2,
        "{stdout}"
    );
    assert!(
        stdout.contains("X-Dev: you     GET /orders/42  → answered by your local process"),
        "{stdout}"
    );
    assert!(
        stdout.contains("no header      GET /health     → answered by the pod"),
        "{stdout}"
    );
    assert!(
        stdout.contains("before tether  GET /hello      → answered by the pod"),
        "{stdout}"
    );
    assert!(
        stdout.contains("after tether   GET /hello      → answered by the pod"),
        "{stdout}"
    );
    assert!(
        stdout.contains("it saw the client as 10.213.250.100"),
        "the local process sees the real client: {stdout}"
    );
    assert_no_demo_namespaces(pid);
}

/// `tether demo` on a machine where `hidden` programs are not installed: they are bind-mounted
/// over with `/dev/null` in a mount namespace of the demo's own.
fn demo_without(hidden: &[&str]) -> std::process::Output {
    let mut script = String::new();
    for program in hidden {
        script.push_str(&format!(
            "mount --bind /dev/null \"$(command -v {program})\" || exit 99; "
        ));
    }
    script.push_str("exec \"$0\" demo");
    // unshare and sh exec: the demo keeps the pid of the process spawned here.
    let demo = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .arg(env!("CARGO_BIN_EXE_tether"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = demo.id();
    let output = demo.wait_with_output().unwrap();
    assert_ne!(output.status.code(), Some(99), "cannot hide {hidden:?}");
    assert_no_demo_namespaces(pid);
    output
}

/// The namespaces of the demo run by process `pid` are gone (other tests' demos may still run).
fn assert_no_demo_namespaces(pid: u32) {
    let left = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let left = String::from_utf8_lossy(&left.stdout);
    assert!(
        !left.contains(&format!("tether-demo-{pid}-")),
        "demo namespaces left: {left}"
    );
}

/// Regression: without `nft` the demo printed ✓ everywhere and showed every marked request
/// answered by the pod. It now steals with the iptables-legacy backend, and says so.
#[test]
fn the_demo_without_nft_steals_with_iptables_legacy_and_says_so() {
    if !require_root("the_demo_without_nft_steals_with_iptables_legacy_and_says_so") {
        return;
    }
    let output = demo_without(&["nft"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert_eq!(
        stdout.matches("answered by your local process").count(),
        2,
        "{stdout}"
    );
    assert!(
        stderr.contains("`nft` is not installed: the demo redirects with iptables-legacy"),
        "{stderr}"
    );
}

/// With neither `nft` nor iptables-legacy the demo stops before building anything, exits
/// non-zero and names the package to install.
#[test]
fn the_demo_without_any_redirect_tool_fails_naming_the_package() {
    if !require_root("the_demo_without_any_redirect_tool_fails_naming_the_package") {
        return;
    }
    let output = demo_without(&["nft", "iptables-legacy"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("apt-get install nftables"),
        "names the fix: {stderr}"
    );
    assert!(!stdout.contains("answered by"), "nothing ran: {stdout}");
}

/// A slow local app slows the remote client: nothing between them buffers the whole upload.
#[test]
fn a_slow_local_app_slows_the_stolen_connection() {
    if !require_root("a_slow_local_app_slows_the_stolen_connection") {
        return;
    }
    const TOTAL_MIB: usize = 96;
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    net.start_http_app(&pod, "original", &[80]);
    let port = free_port();
    let go = std::env::temp_dir().join(format!("tether-slow-app-go-{port}"));
    let _ = std::fs::remove_file(&go);
    // Accepts, then reads nothing until the test creates the `go` file; then reads it all and
    // answers with the byte count and checksum.
    let app = format!(
        "import hashlib, os, socket, time\n\
         s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', {port})); s.listen()\n\
         c, _ = s.accept()\n\
         while not os.path.exists('{go}'): time.sleep(0.02)\n\
         h = hashlib.sha256(); n = 0\n\
         while True:\n\
         \x20   b = c.recv(1 << 20)\n\
         \x20   if not b: break\n\
         \x20   h.update(b); n += len(b)\n\
         c.sendall(f'{{n}} {{h.hexdigest()}}'.encode()); c.close()\n",
        go = go.display()
    );
    let mut exec = Exec::start(&pod, "steal", port, &["python3", "-c", &app]);
    exec.wait_for("target port 80");
    // The uploader prints the bytes sent after each MiB, then the answer and its own checksum.
    let uploader = format!(
        "import hashlib, socket, sys\n\
         s = socket.create_connection(('{ip}', 80), timeout=60)\n\
         h = hashlib.sha256(); block = bytes(range(256)) * 4096\n\
         for i in range({TOTAL_MIB}):\n\
         \x20   chunk = block[i % 256:] + block[:i % 256]\n\
         \x20   s.sendall(chunk); h.update(chunk); print(i + 1, flush=True)\n\
         s.shutdown(socket.SHUT_WR)\n\
         print('answer', s.recv(200).decode(), 'sent', h.hexdigest(), flush=True)\n",
        ip = pod.ip
    );
    let mut client = Command::new("ip")
        .args(["netns", "exec", net.client(), "python3", "-c", &uploader])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, progress) = mpsc::channel();
    let stdout = client.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // While the app does not read, the upload must stall well short of the total (kernel
    // socket buffers on both ends plus one flow-control window: about 20 MiB at most).
    let mut sent_mib = 0;
    while let Ok(line) = progress.recv_timeout(Duration::from_secs(2)) {
        sent_mib = line.parse().unwrap_or(sent_mib);
        assert!(
            sent_mib < 40,
            "{sent_mib} MiB went out while the local app read nothing: nothing slows the client"
        );
    }
    eprintln!(
        "upload stalled at {sent_mib} MiB of {TOTAL_MIB} while the local app was not reading"
    );
    std::fs::write(&go, "").unwrap();
    let mut last = String::new();
    while let Ok(line) = progress.recv_timeout(Duration::from_secs(60)) {
        last = line;
        if last.starts_with("answer") {
            break;
        }
    }
    let _ = client.wait();
    let _ = std::fs::remove_file(&go);
    let fields: Vec<&str> = last.split_whitespace().collect();
    assert_eq!(fields.len(), 5, "uploader said {last:?}");
    assert_eq!(
        fields[1],
        (TOTAL_MIB << 20).to_string(),
        "every byte arrived"
    );
    assert_eq!(fields[2], fields[4], "checksums match");
}

/// The preload library next to the tether binary under test.
fn layer_library() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_BIN_EXE_tether"))
        .parent()
        .unwrap()
        .to_owned();
    [
        dir.join("libtether_layer.so"),
        dir.join("deps/libtether_layer.so"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .expect("libtether_layer.so is built next to the tether binary (cargo build -p tether-layer)")
}

#[test]
fn an_unreachable_proxy_fails_listen_loudly_instead_of_staying_local() {
    // The interpreter itself, not a shim (pyenv's is a shell script whose every process would
    // rightly print its own line).
    let python = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .unwrap();
    let python = String::from_utf8(python.stdout).unwrap();
    let output = Command::new(python.trim())
        .args(["-c", "import socket\ns = socket.socket(); s.bind(('0.0.0.0', 0))\ntry:\n    s.listen(); print('listening')\nexcept OSError as e:\n    print('errno', e.errno)\n"])
        .env("LD_PRELOAD", layer_library())
        .env("TETHER_LAYER_SOCKET", "/nonexistent/tether-proxy.sock")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stdout.trim(),
        "errno 5",
        "listen must fail with EIO, not succeed locally"
    );
    assert_eq!(
        stderr
            .matches("tether: cannot reach the local proxy")
            .count(),
        1,
        "{stderr}"
    );
}

#[test]
fn a_process_that_execs_with_an_empty_environment_keeps_the_layer() {
    if !require_root("a_process_that_execs_with_an_empty_environment_keeps_the_layer") {
        return;
    }
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    net.start_http_app(&pod, "original", &[80]);
    let port = free_port();
    // Replaces itself with a server, handing it an empty environment.
    let server = format!(
        "import socket\n\
         s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', {port})); s.listen()\n\
         while True:\n\
         \x20   c, _ = s.accept(); c.recv(65536)\n\
         \x20   c.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Length: 11\\r\\nConnection: close\\r\\n\\r\\nafter exec\\n'); c.close()\n"
    );
    let launcher = format!(
        "import os, sys\nos.execve(sys.executable, [sys.executable, '-c', {server:?}], {{}})\n"
    );
    let mut exec = Exec::start(&pod, "steal", port, &["python3", "-c", &launcher]);
    exec.wait_for("target port 80");
    let answers = net.http_requests(&pod_url(&pod), 2, false);
    assert_eq!(answers, ["after exec"; 2], "{}", exec.seen.join("\n"));
}

/// Ctrl-C typed in a real terminal (tmux): it reaches the command through the terminal's
/// foreground process group; tether does not send it a second time, waits for the command,
/// cleans up, and exits with the command's code.
#[test]
fn ctrl_c_in_a_terminal_stops_the_app_once_and_cleans_up() {
    if !require_root("ctrl_c_in_a_terminal_stops_the_app_once_and_cleans_up") {
        return;
    }
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    net.start_http_app(&pod, "original", &[80]);
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("interrupts");
    // Counts the SIGINTs it gets (one expected), exits 3 on the first.
    let app = format!(
        "import signal, socket, sys\n\
         def stop(*_):\n\
         \x20   open('{log}', 'a').write('SIGINT\\n'); sys.exit(3)\n\
         signal.signal(signal.SIGINT, stop)\n\
         s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', {port})); s.listen()\n\
         signal.pause()\n",
        log = log.display()
    );
    let script = dir.path().join("app.py");
    std::fs::write(&script, app).unwrap();
    let done = dir.path().join("exit-code");
    let session = format!("tether-test-{}", std::process::id());
    let command = format!(
        "TETHER_FEATURE__NETWORK__INCOMING__MODE=steal TETHER_FEATURE__NETWORK__INCOMING__PORT_MAPPING='[[{port}, 80]]' {tether} exec --target netns/{ns} -- python3 {script}; echo $? > {done}",
        tether = env!("CARGO_BIN_EXE_tether"),
        ns = pod.netns,
        script = script.display(),
        done = done.display(),
    );
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .args(["-L", &session])
            .args(args)
            .status()
            .unwrap()
    };
    assert!(tmux(&["new-session", "-d", "-x", "200", "-y", "50", &command]).success());
    // Ready when the port is stolen (the pod's port answers nobody until the app is reached).
    let deadline = Instant::now() + Duration::from_secs(20);
    while !rules(&net, &pod).contains("tether_") {
        assert!(
            Instant::now() < deadline,
            "tether did not take the port within 20 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    net.wait_listening(&pod.netns, 80);
    tmux(&["send-keys", "C-c"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done.exists() {
        assert!(
            Instant::now() < deadline,
            "tether did not exit 20 s after Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = tmux(&["kill-server"]);
    assert_eq!(
        std::fs::read_to_string(&done).unwrap().trim(),
        "3",
        "tether exits with the app's code"
    );
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "SIGINT\n",
        "the app got Ctrl-C exactly once"
    );
    assert_eq!(rules(&net, &pod), "", "no rule left");
}
