//! A session that survives its link (issue 8). `tether exec --agent-addr` talks to a real agent
//! through the testkit's [`LinkCutter`], which cuts the link (resets, mid-frame while traffic
//! flows), silences it (open but nothing arrives), refuses new links (an outage), or closes links
//! idle for 60 s (a load balancer). Clients run in the client namespace; the local app is
//! unmodified python3.

use std::{
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use rand::{Rng as _, SeedableRng as _};
use tether_testkit::{Network, Pod, agent::AgentProcess, cutter::LinkCutter, require_root};

use super::exec::{Exec, free_port, rules};

/// Everything one test runs. Fields drop in order: tether first, then the cutter, the agent (its
/// guard removes its rules), the runtime the cutter ran on, the namespaces.
struct Fixture {
    exec: Exec,
    cutter: LinkCutter,
    _agent: AgentProcess,
    _runtime: tokio::runtime::Runtime,
    pod: Pod,
    net: Network,
}

impl Fixture {
    /// An agent for `target`, a cutter in front of it (closing links idle for `idle`, if given),
    /// and `tether exec` through the cutter running `command` with `env`.
    fn start(
        net: Network,
        target: &str,
        idle: Option<Duration>,
        env: &[(&str, String)],
        command: &[&str],
    ) -> Fixture {
        let pod = net.pod(0).clone();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let agent = AgentProcess::start_tether(env!("CARGO_BIN_EXE_tether").as_ref(), target, &[]);
        let cutter = runtime.block_on(async {
            match idle {
                Some(idle) => LinkCutter::with_idle_timeout(agent.addr, idle).await,
                None => LinkCutter::start(agent.addr).await,
            }
        });
        let addr = cutter.addr().to_string();
        let token_file = agent.token_file().to_str().unwrap().to_owned();
        let exec = Exec::spawn(
            &[
                "--target",
                target,
                "--agent-addr",
                &addr,
                "--agent-token-file",
                &token_file,
            ],
            env,
            command,
        );
        Fixture {
            exec,
            cutter,
            _agent: agent,
            _runtime: runtime,
            pod,
            net,
        }
    }

    /// A steal of the pod's port 80 (its original app answers `original …`) by a local python
    /// HTTP server (answers with its directory listing).
    fn http_steal(idle: Option<Duration>, extra: &[(&str, String)]) -> (Fixture, String) {
        let net = Network::new(1);
        let pod = net.pod(0).clone();
        net.start_http_app(&pod, "original", &[80]);
        let port = free_port();
        let mut env = vec![
            (
                "TETHER_FEATURE__NETWORK__INCOMING__MODE",
                "steal".to_owned(),
            ),
            (
                "TETHER_FEATURE__NETWORK__INCOMING__PORT_MAPPING",
                format!("[[{port}, 80]]"),
            ),
        ];
        env.extend(extra.iter().cloned());
        let command = [
            "python3",
            "-m",
            "http.server",
            "--bind",
            "0.0.0.0",
            &port.to_string(),
        ]
        .map(str::to_owned);
        let target = format!("netns/{}", pod.netns);
        let mut fixture = Fixture::start(
            net,
            &target,
            idle,
            &env,
            &command.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        fixture.exec.wait_for(&format!(":{port} (stolen)"));
        let url = format!("http://{}:80/", pod.ip);
        (fixture, url)
    }

    /// Who answers one request from the client namespace: "local", "original", or the error.
    fn who_answers(&self, url: &str) -> String {
        let answer = self.net.http_requests(url, 1, false).join("\n");
        if answer.contains("Directory listing") {
            "local".into()
        } else if answer.starts_with("original") {
            "original".into()
        } else {
            answer
        }
    }

    /// Waits (at most `limit`) until a new link went through the cutter since `before` links.
    fn wait_reconnected(&self, before: u64, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.cutter.connections() <= before {
            assert!(
                Instant::now() < deadline,
                "tether did not reconnect within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

#[test]
fn a_session_survives_100_link_cuts_with_every_byte_in_order() {
    if !require_root("a_session_survives_100_link_cuts_with_every_byte_in_order") {
        return;
    }
    const CUTS: usize = 100;
    const STREAM_MIB: usize = 1024;
    let net = Network::new(2);
    let dir = tempfile::Builder::new()
        .prefix("tether-link-")
        .tempdir()
        .unwrap();
    let stop = dir.path().join("stop");
    let result = dir.path().join("result.json");
    // The target: a process in pod 0 with a file only its mount namespace has.
    let pod_dir = format!(
        "/var/lib/{}",
        dir.path().file_name().unwrap().to_str().unwrap()
    );
    std::fs::create_dir_all(&pod_dir).unwrap();
    let _pod_dir = RemoveOnDrop(pod_dir.clone());
    let pid = net.spawn_pod_process(
        net.pod(0),
        &format!(
            "mount -t tmpfs tmpfs {pod_dir}; head -c 4000000 /dev/urandom > {pod_dir}/data.bin"
        ),
        &[],
    );
    let md5 = Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-m", "md5sum"])
        .arg(format!("{pod_dir}/data.bin"))
        .output()
        .unwrap();
    let md5 = String::from_utf8_lossy(&md5.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    // Pod 0's own app on the HTTP port (it answers while the link is down); pod 1 echoes.
    let (stream_port, http_port, echo_port) = (free_port(), free_port(), free_port());
    net.start_http_app(net.pod(0), "original", &[http_port]);
    let script = tether_testkit::netns::apps_dir().join("link_load.py");
    net.spawn(
        &net.pod(1).netns,
        &[
            "python3",
            script.to_str().unwrap(),
            "echo",
            &echo_port.to_string(),
        ],
    );
    net.wait_listening(&net.pod(1).netns, echo_port);
    let (local_stream, local_http) = (free_port(), free_port());
    let env = vec![
        (
            "TETHER_FEATURE__NETWORK__INCOMING__MODE",
            "steal".to_owned(),
        ),
        (
            "TETHER_FEATURE__NETWORK__INCOMING__PORT_MAPPING",
            format!("[[{local_stream}, {stream_port}], [{local_http}, {http_port}]]"),
        ),
        ("STREAM_PORT", local_stream.to_string()),
        ("HTTP_PORT", local_http.to_string()),
        ("ECHO_ADDR", format!("{}:{echo_port}", net.pod(1).ip)),
        ("ECHO_MIB", "64".to_owned()),
        ("STREAM_MIB", STREAM_MIB.to_string()),
        ("FILE", format!("{pod_dir}/data.bin")),
        ("FILE_MD5", md5),
        ("STOP", stop.display().to_string()),
        ("RESULT", result.display().to_string()),
    ];
    let pod_ip = net.pod(0).ip;
    let mut fixture = Fixture::start(
        net,
        &format!("pid/{pid}"),
        None,
        &env,
        &["python3", script.to_str().unwrap(), "app"],
    );
    fixture.exec.wait_for(&format!(":{local_stream} (stolen)"));
    fixture.exec.wait_for(&format!(":{local_http} (stolen)"));
    let app_pid = fixture.exec.seen_lines();
    let app_pid: u32 = app_pid
        .lines()
        .find_map(|l| l.split("(pid ").nth(1))
        .and_then(|rest| rest.trim_end_matches(')').parse().ok())
        .expect("tether names the app's pid");

    // The client: one stolen stream both ways, and HTTP requests at a steady rate.
    let client_pid;
    let client = {
        let (tx, rx) = mpsc::channel();
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", fixture.net.client(), "python3"])
            .arg(&script)
            .arg("client")
            .env("STREAM_HOST", pod_ip.to_string())
            .env("STREAM_PORT", stream_port.to_string())
            .env("HTTP_URL", format!("http://{pod_ip}:{http_port}"))
            .env("STREAM_MIB", STREAM_MIB.to_string())
            .env("STOP", &stop)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = command.spawn().unwrap();
        client_pid = KillOnDrop(child.id());
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        rx
    };

    // 100 cuts at random moments, each on a live link carrying all four loads.
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut cuts = 0;
    while cuts < CUTS {
        assert!(Instant::now() < deadline, "only {cuts} cuts in 240 s");
        std::thread::sleep(Duration::from_millis(rng.random_range(20..200)));
        if fixture.cutter.cut() > 0 {
            cuts += 1;
            // The next cut hits a link the session resumed on.
            fixture
                .exec
                .wait_for_count("nothing lost", cuts, Duration::from_secs(30));
        }
    }
    std::fs::write(&stop, "").unwrap();

    let client = client
        .recv_timeout(Duration::from_secs(300))
        .expect("the client finished within 300 s")
        .unwrap();
    drop(client_pid);
    assert!(
        client.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&client.stderr)
    );
    let client: serde_json::Value = serde_json::from_slice(&client.stdout).unwrap();
    eprintln!("client: {client}");
    let code = fixture.exec.wait_exit(Duration::from_secs(120));
    let said = fixture.exec.seen_lines();
    assert_eq!(code, Some(0), "the app ended well; tether said:\n{said}");
    let app: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&result).unwrap()).unwrap();
    let report = format!("app: {app}\nclient: {client}\ntether said:\n{said}");

    assert_eq!(app["pid"], app_pid, "the app never restarted\n{report}");
    for (side, value) in [("app", &app), ("client", &client)] {
        for key in ["stream_error", "echo_error"] {
            assert!(value.get(key).is_none(), "{side}: {key}\n{report}");
        }
    }
    let mib = (STREAM_MIB as u64) << 20;
    assert!(app["stream_sent"].as_u64().unwrap() >= mib, "{report}");
    assert!(client["stream_sent"].as_u64().unwrap() >= mib, "{report}");
    assert_eq!(
        app["stream_received"], client["stream_sent"],
        "every byte from the client arrived, checked in order\n{report}"
    );
    assert_eq!(
        client["stream_received"], app["stream_sent"],
        "every byte from the app arrived, checked in order\n{report}"
    );
    assert_eq!(
        app["echo_received"], app["echo_sent"],
        "the outgoing connection through the pod carried every byte back\n{report}"
    );
    assert!(app["file_reads"].as_u64().unwrap() >= 1, "{report}");
    assert_eq!(
        app["file_wrong"], 0,
        "every read of the pod's file was right\n{report}"
    );
    assert_eq!(
        client["http_failure_count"], 0,
        "no request failed\n{report}"
    );
    assert!(
        client["http_answers"]["local"].as_u64().unwrap_or(0) > 0,
        "requests reached the local app\n{report}"
    );
    let lost = fixture.exec.count("link to agent lost");
    let resumed = fixture.exec.count("nothing lost");
    assert_eq!(lost, CUTS, "one line per drop\n{report}");
    assert_eq!(resumed, CUTS, "one line per resume\n{report}");
    assert_eq!(
        fixture.exec.count("session with the agent is over"),
        0,
        "{report}"
    );
}

#[test]
fn a_silent_link_is_declared_dead_and_recovered() {
    if !require_root("a_silent_link_is_declared_dead_and_recovered") {
        return;
    }
    let settings = [
        ("TETHER_KEEPALIVE__INTERVAL", "500ms".to_owned()),
        ("TETHER_KEEPALIVE__TIMEOUT", "2s".to_owned()),
    ];
    let (mut fixture, url) = Fixture::http_steal(None, &settings);
    assert_eq!(fixture.who_answers(&url), "local");
    let before = fixture.cutter.connections();
    // Both ends keep their sockets; nothing arrives any more.
    fixture.cutter.silence();
    fixture.exec.wait_for_within(
        "link to agent lost (nothing arrived for",
        Duration::from_secs(10),
    );
    fixture
        .exec
        .wait_for_within("nothing lost", Duration::from_secs(20));
    assert!(fixture.cutter.connections() > before, "a new link");
    assert_eq!(fixture.who_answers(&url), "local", "the steal works again");
}

#[test]
fn while_the_link_is_down_new_requests_get_the_original_app() {
    if !require_root("while_the_link_is_down_new_requests_get_the_original_app") {
        return;
    }
    let (mut fixture, url) = Fixture::http_steal(None, &[]);
    assert_eq!(fixture.who_answers(&url), "local");
    fixture.cutter.refuse(true);
    fixture.cutter.cut();
    fixture.exec.wait_for("link to agent lost");
    // Ten seconds without a link: every new request is answered, by the pod's own app.
    let start = Instant::now();
    let mut answers = Vec::new();
    while start.elapsed() < Duration::from_secs(10) && answers.len() < 100 {
        answers.push(fixture.who_answers(&url));
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(answers.len() >= 10, "{answers:?}");
    assert!(answers.iter().all(|a| a == "original"), "{answers:?}");
    fixture.cutter.refuse(false);
    fixture
        .exec
        .wait_for_within("nothing lost", Duration::from_secs(30));
    assert_eq!(fixture.who_answers(&url), "local", "stolen again");
}

#[test]
fn when_the_grace_expires_the_agent_removes_its_rules_and_tether_says_so() {
    if !require_root("when_the_grace_expires_the_agent_removes_its_rules_and_tether_says_so") {
        return;
    }
    let settings = [("TETHER_RECONNECT__GRACE", "3s".to_owned())];
    let (mut fixture, url) = Fixture::http_steal(None, &settings);
    assert_eq!(fixture.who_answers(&url), "local");
    assert!(
        !rules(&fixture.net, &fixture.pod).is_empty(),
        "steal rules are in place"
    );
    fixture.cutter.refuse(true);
    fixture.cutter.cut();
    fixture.exec.wait_for_within(
        "the session with the agent is over",
        Duration::from_secs(20),
    );
    // The agent's own grace ends at about the same time; its rules go with the session.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !rules(&fixture.net, &fixture.pod).is_empty() {
        assert!(
            Instant::now() < deadline,
            "rules left 10 s after the grace:\n{}",
            rules(&fixture.net, &fixture.pod)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(fixture.who_answers(&url), "original");
    assert!(
        fixture.exec.is_running(),
        "on_link_lost: keep (the default) keeps the command running"
    );
}

#[test]
fn on_link_lost_stop_stops_the_command_when_the_session_is_over() {
    if !require_root("on_link_lost_stop_stops_the_command_when_the_session_is_over") {
        return;
    }
    let settings = [
        ("TETHER_RECONNECT__GRACE", "2s".to_owned()),
        ("TETHER_ON_LINK_LOST", "stop".to_owned()),
    ];
    let (mut fixture, _url) = Fixture::http_steal(None, &settings);
    fixture.cutter.refuse(true);
    fixture.cutter.cut();
    let code = fixture.exec.wait_exit(Duration::from_secs(30));
    let said = fixture.exec.seen_lines();
    assert!(
        said.contains("the session with the agent is over"),
        "{said}"
    );
    assert!(said.contains("on_link_lost: stop"), "{said}");
    // python's http.server dies of the SIGTERM; tether reports 128 + 15.
    assert_eq!(code, Some(143), "{said}");
}

#[test]
fn a_vanished_target_ends_the_reconnect_with_a_clear_reason() {
    if !require_root("a_vanished_target_ends_the_reconnect_with_a_clear_reason") {
        return;
    }
    let (mut fixture, _url) = Fixture::http_steal(None, &[]);
    fixture.cutter.refuse(true);
    fixture.cutter.cut();
    fixture.exec.wait_for("link to agent lost");
    let netns = fixture.pod.netns.clone();
    let deleted = Command::new("ip")
        .args(["netns", "del", &netns])
        .status()
        .unwrap();
    assert!(deleted.success());
    fixture.exec.wait_for_within(
        &format!("the session with the agent is over: the target netns/{netns} is gone"),
        Duration::from_secs(20),
    );
}

/// The local app of the mirror test: accepts one mirrored connection on PORT and reads it to the
/// end, then says on stderr how it ended.
const MIRROR_READER: &str = r#"
import os, socket, sys
server = socket.create_server(("0.0.0.0", int(os.environ["PORT"])))
conn, _ = server.accept()
total = 0
try:
    while data := conn.recv(65536):
        total += len(data)
    print(f"copy: ended after {total} bytes", file=sys.stderr, flush=True)
except ConnectionResetError:
    print(f"copy: reset after {total} bytes", file=sys.stderr, flush=True)
"#;

/// The pod's client of the mirror test: 8 MiB up to the pod's echo app and back.
const UPLOAD: &str = r#"
import socket, sys, threading
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
size, got = 8 << 20, 0
threading.Thread(target=lambda: (sock.sendall(b"m" * size), sock.shutdown(socket.SHUT_WR))).start()
while data := sock.recv(65536):
    got += len(data)
print("echoed", got)
"#;

#[test]
fn a_mirrored_copy_that_would_fill_the_replay_buffer_is_reset_and_the_rest_resumes() {
    if !require_root(
        "a_mirrored_copy_that_would_fill_the_replay_buffer_is_reset_and_the_rest_resumes",
    ) {
        return;
    }
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    let (remote, local) = (free_port(), free_port());
    let script = tether_testkit::netns::apps_dir().join("link_load.py");
    net.spawn(
        &pod.netns,
        &[
            "python3",
            script.to_str().unwrap(),
            "echo",
            &remote.to_string(),
        ],
    );
    net.wait_listening(&pod.netns, remote);
    let env = [
        (
            "TETHER_FEATURE__NETWORK__INCOMING__MODE",
            "mirror".to_owned(),
        ),
        (
            "TETHER_FEATURE__NETWORK__INCOMING__PORT_MAPPING",
            format!("[[{local}, {remote}]]"),
        ),
        ("TETHER_RESUME__BUFFER", (2 << 20).to_string()),
        ("PORT", local.to_string()),
    ];
    let target = format!("netns/{}", pod.netns);
    let mut fixture = Fixture::start(net, &target, None, &env, &["python3", "-c", MIRROR_READER]);
    fixture.exec.wait_for(&format!(":{local} (mirrored)"));
    // The link goes down; then a client uploads 8 MiB to the pod while nothing can reach tether.
    fixture.cutter.refuse(true);
    fixture.cutter.cut();
    fixture.exec.wait_for("link to agent lost");
    let output = fixture.net.exec(
        fixture.net.client(),
        &[
            "python3",
            "-c",
            UPLOAD,
            &pod.ip.to_string(),
            &remote.to_string(),
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("echoed {}", 8 << 20),
        "the pod's own connection is not affected: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    fixture.cutter.refuse(false);
    fixture
        .exec
        .wait_for_within("nothing lost", Duration::from_secs(30));
    fixture.exec.wait_for("mirror: the copy of");
    fixture.exec.wait_for("copy: reset after");
    assert!(fixture.exec.is_running(), "tether keeps running");
    assert_eq!(fixture.exec.count("session with the agent is over"), 0);
}

/// `tether status` for the session of `pid`.
fn status_of(pid: u32) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["status", "--output", "json"])
        .output()
        .unwrap();
    assert!(output.status.success());
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|status| status["pid"] == pid)
        .unwrap_or_else(|| {
            panic!(
                "no status for tether {pid}: {}",
                String::from_utf8_lossy(&output.stdout)
            )
        })
}

#[test]
fn status_and_doctor_latency_show_the_link() {
    if !require_root("status_and_doctor_latency_show_the_link") {
        return;
    }
    let (mut fixture, _url) = Fixture::http_steal(None, &[]);
    let pid = fixture.exec.pid();
    let status = status_of(pid);
    assert_eq!(status["link"], "up", "{status}");
    assert_eq!(status["reconnects"], 0, "{status}");
    assert!(
        status["target"].as_str().unwrap().starts_with("netns/"),
        "{status}"
    );
    let before = fixture.cutter.connections();
    fixture.cutter.cut();
    fixture.exec.wait_for("nothing lost");
    fixture.wait_reconnected(before, Duration::from_secs(10));
    let status = status_of(pid);
    assert_eq!(status["link"], "up", "{status}");
    assert_eq!(status["reconnects"], 1, "{status}");
    let latency = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args([
            "doctor",
            "latency",
            "--pid",
            &pid.to_string(),
            "--count",
            "5",
        ])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&latency.stderr);
    assert!(latency.status.success(), "{said}");
    assert!(said.contains("round trip min"), "{said}");
    assert!(!said.contains("lost"), "{said}");
}

#[test]
fn an_idle_session_behind_a_60s_idle_timeout_stays_up_for_5_minutes() {
    if !require_root("an_idle_session_behind_a_60s_idle_timeout_stays_up_for_5_minutes") {
        return;
    }
    let (mut fixture, url) = Fixture::http_steal(Some(Duration::from_secs(60)), &[]);
    let links = fixture.cutter.connections();
    // The subject of the test is five idle minutes.
    std::thread::sleep(Duration::from_secs(300));
    assert_eq!(
        fixture.cutter.idle_closes(),
        0,
        "the keepalive kept the link busy"
    );
    assert_eq!(
        fixture.cutter.connections(),
        links,
        "not a single reconnect"
    );
    assert_eq!(fixture.exec.count("link to agent lost"), 0);
    assert_eq!(fixture.who_answers(&url), "local");
}

/// Kills a process when the test ends (also on failure).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", &self.0.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

/// Removes a directory when the test ends (also on failure).
struct RemoveOnDrop(String);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
