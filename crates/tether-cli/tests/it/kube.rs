//! `tether exec --target deploy/api` through the cluster simulator (tether-testkit `cluster`):
//! the real kube-rs client against a real HTTP API server, an agent Job whose pod really runs
//! the agent (found the target container through its cgroup), and a WebSocket port-forward
//! spoken byte for byte as the kubelet does.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use tether_testkit::require_root;

use crate::{
    context::{PodContext, check_node, check_python},
    exec::{Exec, free_port, node_app, pod_url, python_http_server, rules},
    http_filter::curl,
};

/// `tether exec` on `deploy/api -n shop` with `mode` for the pod's port 80 (the local app on
/// `port`), once the port is taken.
fn exec_in_cluster(
    ctx: &PodContext,
    mode: &str,
    port: u16,
    env: &[(&str, &str)],
    command: &[String],
) -> Exec {
    let mut all_env: Vec<(&str, String)> = vec![
        ("TETHER_FEATURE__NETWORK__INCOMING__MODE", mode.to_owned()),
        (
            "TETHER_FEATURE__NETWORK__INCOMING__PORT_MAPPING",
            format!("[[{port}, 80]]"),
        ),
    ];
    all_env.extend(ctx.target_env.iter().map(|(k, v)| (k.as_str(), v.clone())));
    all_env.extend(env.iter().map(|(k, v)| (*k, (*v).to_owned())));
    let target: Vec<&str> = ctx.target.iter().map(String::as_str).collect();
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let mut exec = Exec::spawn(&target, &all_env, &command);
    exec.wait_for_within(&format!(":{port} ("), Duration::from_secs(60));
    exec
}

/// No agent Job, pod or process, and no rule in the pod, once tether is gone. The agent's exit
/// (SIGTERM from the simulated kubelet, rules removed by its guard) is waited for, at most 15 s.
fn assert_nothing_left(ctx: &PodContext) {
    let cluster = ctx.cluster.as_ref().unwrap();
    assert_eq!(
        cluster.jobs("shop"),
        Vec::<serde_json::Value>::new(),
        "agent Jobs left"
    );
    assert_eq!(
        cluster.pods("shop", "app.kubernetes.io/name=tether-agent"),
        Vec::<(String, String)>::new(),
        "agent pods left"
    );
    wait_agents_gone(ctx, "after tether exited");
}

/// Waits (at most 15 s) until no agent process runs, then checks no rule is left in the pod.
fn wait_agents_gone(ctx: &PodContext, when: &str) {
    let cluster = ctx.cluster.as_ref().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while cluster.running_agents() > 0 {
        assert!(
            Instant::now() < deadline,
            "agent processes still run 15 s {when}:\n{}",
            cluster.logs("shop")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(rules(&ctx.net, ctx.net.pod(0)), "", "rules left in the pod");
}

#[test]
fn python_on_a_deployment_sees_its_pod_s_network_names_files_and_environment() {
    if !require_root("python_on_a_deployment_sees_its_pod_s_network_names_files_and_environment") {
        return;
    }
    let ctx = PodContext::in_cluster();
    check_python(&ctx);
    assert_nothing_left(&ctx);
}

#[test]
fn node_on_a_deployment_sees_its_pod_s_network_names_files_and_environment() {
    if !require_root("node_on_a_deployment_sees_its_pod_s_network_names_files_and_environment") {
        return;
    }
    let ctx = PodContext::in_cluster();
    check_node(&ctx);
    assert_nothing_left(&ctx);
}

#[test]
fn a_deployment_s_traffic_is_stolen_or_mirrored_into_python_and_node() {
    if !require_root("a_deployment_s_traffic_is_stolen_or_mirrored_into_python_and_node") {
        return;
    }
    let ctx = PodContext::in_cluster();
    let pod = ctx.net.pod(0).clone();
    type App = fn(u16) -> Vec<String>;
    let cases: [(&str, App, &str); 4] = [
        ("steal", python_http_server, "local python"),
        ("steal", node_app, "local node"),
        ("mirror", python_http_server, "original 80"),
        ("mirror", node_app, "original 80"),
    ];
    for (mode, app, answer) in cases {
        let port = free_port();
        let mut exec = exec_in_cluster(&ctx, mode, port, &[], &app(port));
        let answers = ctx.net.http_requests(&pod_url(&pod), 5, false);
        assert!(
            answers.iter().all(|a| a.contains(answer)),
            "{mode}: answers {answers:?}\ntether said:\n{}",
            exec.seen_lines()
        );
        let said = exec.seen_lines();
        assert!(
            said.contains("pod api-"),
            "tether names the pod it chose:\n{said}"
        );
        assert!(exec.interrupt().is_some(), "tether exits");
        assert_nothing_left(&ctx);
    }
}

/// `TCP_NODELAY` of each TCP socket of process `pid` whose peer is `peer`, read from copies of
/// them taken from outside (`pidfd_getfd`, as root).
fn nodelay_towards(pid: u32, peer: std::net::SocketAddr) -> Vec<bool> {
    let pidfd = rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::PidfdFlags::empty(),
    )
    .unwrap();
    let mut found = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        let Some(number) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if !is_socket {
            continue;
        }
        let Ok(copy) =
            rustix::process::pidfd_getfd(&pidfd, number, rustix::process::PidfdGetfdFlags::empty())
        else {
            continue;
        };
        let connected_to_peer = rustix::net::getpeername(&copy)
            .ok()
            .flatten()
            .and_then(|addr| std::net::SocketAddr::try_from(addr).ok())
            == Some(peer);
        if connected_to_peer {
            found.push(rustix::net::sockopt::tcp_nodelay(&copy).unwrap());
        }
    }
    found
}

/// Regression (field-notes §10): kube's client leaves Nagle on for its connections to the API
/// server, and a stolen request then waits ~40 ms per exchange for the server's delayed ACK on
/// a real cluster. Every connection tether holds to the API server, the port-forward carrying
/// the session among them, has TCP_NODELAY.
#[test]
fn tether_s_connections_to_the_api_server_have_nagle_off() {
    if !require_root("tether_s_connections_to_the_api_server_have_nagle_off") {
        return;
    }
    let ctx = PodContext::in_cluster();
    let port = free_port();
    let mut exec = exec_in_cluster(&ctx, "steal", port, &[], &python_http_server(port));
    let answers = ctx.net.http_requests(&pod_url(ctx.net.pod(0)), 1, false);
    assert!(answers[0].contains("local python"), "{answers:?}");
    let nodelay = nodelay_towards(exec.pid(), ctx.cluster.as_ref().unwrap().addr());
    assert!(
        !nodelay.is_empty(),
        "tether holds no connection to the API server"
    );
    assert!(
        nodelay.iter().all(|on| *on),
        "TCP_NODELAY of tether's connections to the API server: {nodelay:?}"
    );
    assert!(exec.interrupt().is_some(), "tether exits");
}

#[test]
fn a_filtered_steal_on_a_deployment_takes_only_matching_requests() {
    if !require_root("a_filtered_steal_on_a_deployment_takes_only_matching_requests") {
        return;
    }
    let ctx = PodContext::in_cluster();
    type App = fn(u16) -> Vec<String>;
    let apps: [(App, &str); 2] = [
        (node_app, "local node"),
        (python_http_server, "local python"),
    ];
    for (app, answer) in apps {
        let port = free_port();
        let mut exec = exec_in_cluster(
            &ctx,
            "steal",
            port,
            &[(
                "TETHER_FEATURE__NETWORK__INCOMING__HTTP_FILTER__HEADER_FILTER",
                "^X-Dev: alice$",
            )],
            &app(port),
        );
        check_filtered(&ctx, answer);
        assert!(exec.interrupt().is_some(), "tether exits");
        assert_nothing_left(&ctx);
    }
}

/// Marked requests reach the local app (answering `answer`), the rest and probes the pod.
fn check_filtered(ctx: &PodContext, answer: &str) {
    let url = pod_url(ctx.net.pod(0));
    for _ in 0..3 {
        let marked = curl(&ctx.net, &url, &["X-Dev: alice"]);
        assert!(marked.contains(answer), "{marked}");
        let other = curl(&ctx.net, &url, &[]);
        assert!(other.starts_with("original 80 GET /hello"), "{other}");
        let probe = curl(
            &ctx.net,
            &url,
            &["X-Dev: alice", "User-Agent: kube-probe/1.35"],
        );
        assert!(
            probe.starts_with("original 80"),
            "probes stay with the pod: {probe}"
        );
    }
}

#[test]
fn a_session_survives_every_port_forward_dropping() {
    if !require_root("a_session_survives_every_port_forward_dropping") {
        return;
    }
    let ctx = PodContext::in_cluster();
    let cluster = ctx.cluster.as_ref().unwrap();
    let port = free_port();
    let mut exec = exec_in_cluster(&ctx, "steal", port, &[], &node_app(port));
    let url = pod_url(ctx.net.pod(0));
    for round in 1..=3 {
        assert_eq!(
            cluster.drop_port_forwards(),
            1,
            "one port-forward carries the session"
        );
        exec.wait_for_count("resumed after", round, Duration::from_secs(20));
        let answer = curl(&ctx.net, &url, &[]);
        assert!(answer.starts_with("local node"), "round {round}: {answer}");
    }
    assert_eq!(exec.count("link to agent lost"), 3, "{}", exec.seen_lines());
}

#[test]
fn while_port_forwards_are_refused_the_pod_s_app_serves_and_the_session_resumes_after() {
    if !require_root(
        "while_port_forwards_are_refused_the_pod_s_app_serves_and_the_session_resumes_after",
    ) {
        return;
    }
    let ctx = PodContext::in_cluster();
    let cluster = ctx.cluster.as_ref().unwrap();
    let port = free_port();
    let mut exec = exec_in_cluster(&ctx, "steal", port, &[], &node_app(port));
    let url = pod_url(ctx.net.pod(0));
    assert!(curl(&ctx.net, &url, &[]).starts_with("local node"));
    // The apiserver goes away (no upgrades, open port-forwards dropped) ...
    cluster.refuse_port_forwards(true);
    cluster.drop_port_forwards();
    exec.wait_for("link to agent lost");
    // ... so new requests go to the pod's own app meanwhile, not into a black hole.
    for _ in 0..3 {
        let answer = curl(&ctx.net, &url, &[]);
        assert!(
            answer.starts_with("original 80"),
            "during the outage: {answer}"
        );
    }
    // It comes back slow: upgrades answered a second late.
    cluster.delay_port_forwards(Some(Duration::from_secs(1)));
    cluster.refuse_port_forwards(false);
    exec.wait_for_within("resumed after", Duration::from_secs(30));
    let answer = curl(&ctx.net, &url, &[]);
    assert!(
        answer.starts_with("local node"),
        "after the outage: {answer}"
    );
    assert_eq!(
        exec.count("session with the agent is over"),
        0,
        "{}",
        exec.seen_lines()
    ); // Only tether's own lines at default verbosity: no library's log lines.
    let said = exec.seen_lines();
    for library in [
        "kube_client",
        "kube_runtime",
        "hyper",
        "rustls",
        "tungstenite",
    ] {
        assert!(
            !said.contains(library),
            "{library} on the terminal:\n{said}"
        );
    }
}

/// Runs `command` to its end, at most 60 s (then kills it and fails the test).
fn bounded(mut command: Command) -> std::process::Output {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("{command:?} did not end in 60 s");
        })
        .unwrap()
}

/// `tether exec` that must fail: its exit code and stderr, within 60 s.
fn failing_exec(ctx: &PodContext, target: &str) -> (Option<i32>, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tether"));
    command
        .args(["exec", "--target", target, "-n", "shop", "--", "true"])
        .env_remove("TETHER_CONFIG")
        .envs(ctx.target_env.iter().map(|(k, v)| (k, v)));
    let output = bounded(command);
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn unknown_targets_are_refused_with_what_exists() {
    if !require_root("unknown_targets_are_refused_with_what_exists") {
        return;
    }
    let ctx = PodContext::in_cluster();
    let (code, stderr) = failing_exec(&ctx, "deploy/apii");
    assert_eq!(code, Some(125), "{stderr}");
    assert!(
        stderr.contains("deploy/apii not found in namespace shop; deployments there: api"),
        "{stderr}"
    );
    let (code, stderr) = failing_exec(&ctx, "deploy/api/container/db");
    assert_eq!(code, Some(125), "{stderr}");
    assert!(
        stderr.contains("no container db; containers: app"),
        "{stderr}"
    );
    let (_, stderr) = failing_exec(&ctx, "pod/nope");
    assert!(
        stderr.contains("pod/nope not found in namespace shop; pods there: api-"),
        "{stderr}"
    );
    assert!(
        ctx.cluster.as_ref().unwrap().jobs("shop").is_empty(),
        "no agent was started"
    );
}

#[test]
fn an_agent_image_that_cannot_be_pulled_fails_at_once_with_the_pod_s_events() {
    if !require_root("an_agent_image_that_cannot_be_pulled_fails_at_once_with_the_pod_s_events") {
        return;
    }
    let ctx = PodContext::in_cluster();
    let cluster = ctx.cluster.as_ref().unwrap();
    cluster.fail_image_pulls(Some("not found"));
    let (code, stderr) = failing_exec(&ctx, "deploy/api");
    assert_eq!(code, Some(125), "{stderr}");
    assert!(
        stderr.contains("cannot be pulled (ErrImagePull)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("Warning Failed: Failed to pull image \"ghcr.io/tether-dev/tether-agent:"),
        "the pod's events are shown: {stderr}"
    );
    assert_nothing_left(&ctx);
}

/// `tether doctor -n shop` against the simulator: exit code and everything it printed.
pub(crate) fn doctor(ctx: &PodContext, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["doctor", "-n", "shop"])
        .env_remove("TETHER_CONFIG")
        .envs(ctx.target_env.iter().map(|(k, v)| (k, v)))
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        output.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[test]
fn doctor_names_the_permission_the_cluster_denies() {
    if !require_root("doctor_names_the_permission_the_cluster_denies") {
        return;
    }
    let ctx = PodContext::in_cluster();
    let (code, said) = doctor(&ctx, &[]);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("✓ may create jobs.batch"), "{said}");
    assert!(!said.contains("missing"), "{said}");

    let cluster = ctx.cluster.as_ref().unwrap();
    cluster.deny("create", "pods/portforward");
    cluster.deny("delete", "jobs");
    let (code, said) = doctor(&ctx, &[]);
    assert_eq!(code, Some(1), "{said}");
    for line in [
        "✗ may create pods/portforward (reach the agent (WebSocket, Kubernetes 1.35+)): missing",
        "✗ may delete jobs.batch (remove the agent): missing",
    ] {
        assert!(said.contains(line), "no {line:?} in:\n{said}");
    }
    assert_eq!(said.matches(": missing").count(), 2, "{said}");
}

#[test]
fn ls_lists_the_namespace_s_targets_but_not_tether_s_agents() {
    if !require_root("ls_lists_the_namespace_s_targets_but_not_tether_s_agents") {
        return;
    }
    let ctx = PodContext::in_cluster();
    let ls = |extra: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(["ls", "-n", "shop"])
            .args(extra)
            .env_remove("TETHER_CONFIG")
            .envs(ctx.target_env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let table = ls(&[]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[0].starts_with("TARGET") && lines[0].ends_with("READY"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("deploy/api ") && lines[1].ends_with("1/1"),
        "{table}"
    );
    assert!(
        lines[2].starts_with("pod/api-") && lines[2].ends_with("Running, ready"),
        "{table}"
    );

    // While a session runs, its agent pod exists but is not a target.
    let port = free_port();
    let _exec = exec_in_cluster(&ctx, "mirror", port, &[], &node_app(port));
    let json = ls(&["--output", "json"]);
    let objects: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let targets: Vec<&str> = objects
        .iter()
        .map(|o| o["target"].as_str().unwrap())
        .collect();
    assert_eq!(targets.len(), 2, "{json}");
    assert_eq!(targets[0], "deploy/api");
    assert!(targets[1].starts_with("pod/api-"), "{json}");
    assert_eq!(objects[0]["usable"], true);
    assert_eq!(
        ctx.cluster
            .as_ref()
            .unwrap()
            .pods("shop", "app.kubernetes.io/name=tether-agent")
            .len(),
        1,
        "the session's agent pod exists meanwhile"
    );
}

#[test]
fn a_targetless_session_connects_and_resolves_from_an_agent_pod_in_the_namespace() {
    if !require_root(
        "a_targetless_session_connects_and_resolves_from_an_agent_pod_in_the_namespace",
    ) {
        return;
    }
    let ctx = PodContext::in_cluster();
    let service = ctx.net.pod(1).ip;
    // The names the cluster DNS gives pods (the simulator's agent pods get them in /etc/hosts).
    let script = format!(
        "import os, socket, urllib.request\n\
         print(socket.gethostbyname('db.shop.svc'))\n\
         print(urllib.request.urlopen('http://db.shop.svc:{}/tl', timeout=10).read().decode().strip())\n\
         print(os.environ.get('POD_ONLY_VAR'))\n",
        ctx.http_port
    );
    let mut command = Command::new(env!("CARGO_BIN_EXE_tether"));
    command
        .args([
            "exec",
            "--target",
            "targetless",
            "-n",
            "shop",
            "--",
            "python3",
            "-c",
        ])
        .arg(&script)
        .env_remove("TETHER_CONFIG")
        .envs(ctx.target_env.iter().map(|(k, v)| (k, v)));
    let output = bounded(command);
    let said = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{said}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], service.to_string(), "{said}");
    assert!(
        lines[1].starts_with(&format!("pod-service {} GET /tl", ctx.http_port)),
        "{said}"
    );
    assert_eq!(
        lines[2], "None",
        "no pod's environment in a targetless session: {said}"
    );
    assert_nothing_left(&ctx);
}

#[test]
fn an_ephemeral_agent_serves_the_session_from_inside_the_target_pod() {
    if !require_root("an_ephemeral_agent_serves_the_session_from_inside_the_target_pod") {
        return;
    }
    let mut ctx = PodContext::in_cluster();
    ctx.target_env.extend([
        ("TETHER_AGENT__EPHEMERAL".to_owned(), "true".to_owned()),
        ("TETHER_AGENT__TTL".to_owned(), "3s".to_owned()),
    ]);
    // The pod's environment, files, names and network, through an agent that sees the target
    // container's processes as its own PID namespace (the target is PID 1 there).
    check_python(&ctx);
    let port = free_port();
    let mut exec = exec_in_cluster(&ctx, "steal", port, &[], &node_app(port));
    let answer = curl(&ctx.net, &pod_url(ctx.net.pod(0)), &[]);
    assert!(answer.starts_with("local node"), "{answer}");
    let said = exec.seen_lines();
    assert!(said.contains("(ephemeral container)"), "{said}");
    assert!(exec.interrupt().is_some());

    let said = exec.seen_lines();
    assert!(said.contains("ends on its own in 3s"), "{said}");
    let cluster = ctx.cluster.as_ref().unwrap();
    assert!(
        cluster.jobs("shop").is_empty(),
        "no Job for an ephemeral agent"
    );
    let (pod, _) = &cluster.pods("shop", "app=api")[0];
    let spec = &cluster.pod("shop", pod).unwrap()["spec"];
    let agents = spec["ephemeralContainers"].as_array().unwrap();
    assert_eq!(agents.len(), 2, "one ephemeral agent per session: {spec}");
    assert!(
        agents.iter().all(|a| a["targetContainerName"] == "app"),
        "{spec}"
    );
    // It cannot be removed; it ends on its own once idle (agent.ttl: 3 s here).
    wait_agents_gone(&ctx, "after the sessions");
}

#[test]
fn a_job_agent_starting_on_a_pod_keeps_the_rules_of_its_ephemeral_agent() {
    if !require_root("a_job_agent_starting_on_a_pod_keeps_the_rules_of_its_ephemeral_agent") {
        return;
    }
    let mut ctx = PodContext::in_cluster();
    let job_env = ctx.target_env.clone();
    ctx.target_env
        .push(("TETHER_AGENT__EPHEMERAL".to_owned(), "true".to_owned()));
    // One developer steals through an ephemeral agent: its rules carry its pid in the target
    // container's PID namespace.
    let port = free_port();
    let _stealing = exec_in_cluster(&ctx, "steal", port, &[], &node_app(port));
    let url = pod_url(ctx.net.pod(0));
    assert!(curl(&ctx.net, &url, &[]).starts_with("local node"));
    // Another starts a Job agent on the same pod, whose start sweeps rules of dead agents: the
    // ephemeral agent is alive, only not in the Job agent's PID namespace.
    let mut command = Command::new(env!("CARGO_BIN_EXE_tether"));
    command
        .args(["exec", "--target", "deploy/api", "-n", "shop", "--", "true"])
        .env_remove("TETHER_CONFIG")
        .envs(job_env.iter().map(|(k, v)| (k, v)));
    let other = bounded(command);
    assert!(other.status.success(), "{other:?}");
    for _ in 0..3 {
        let answer = curl(&ctx.net, &url, &[]);
        assert!(
            answer.starts_with("local node"),
            "the steal was swept away: {answer}"
        );
    }
}
