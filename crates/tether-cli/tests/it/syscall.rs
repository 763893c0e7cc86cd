//! Syscall-level interception (the seccomp supervisor): unmodified Go programs (a static and a
//! cgo build), a static busybox, and ordinary programs forced through it.
//!
//! The target is the pod process of [`PodContext`]: pod-only files, `/etc/hosts`,
//! `/etc/resolv.conf`, a variable, and services reachable only from the pod. Every run is in a
//! mount namespace whose `/etc/resolv.conf` names loopback only, so a program that escaped
//! interception cannot reach the host's resolver.

use tether_testkit::{
    go::{GoBuild, go_app},
    require_root,
};

use super::{
    context::{PodContext, check_node_with, check_python_with},
    exec::{Exec, Scenario, node_app, pod_url, python_http_server, rules, scenario_with},
    http_filter::curl,
};

/// What the Go program prints of the pod (see `apps/go_app`), as the pod would show it: the
/// pod's DNS server names the pod-only service `only-dns.pod.internal`.
fn expected_context(pod: &PodContext) -> String {
    let db = pod.net.pod(1).ip;
    let port = pod.http_port;
    format!(
        "env only-in-the-pod\n\
         file secret-from-pod\n\
         stat 16\n\
         readdir absolute-link,big.bin,hosts,relative-link,resolv.conf,script.py,secret.txt\n\
         hosts [{db}]\n\
         dns [{db}]\n\
         http-ip pod-service {port} GET /go-ip\n\
         peer {db}\n\
         http-name pod-service {port} GET /go-name\n\
         http-dns pod-service {port} GET /go-dns\n\
         udp echo hello\n"
    )
}

/// The pod's DNS server, knowing the pod-only service by a name of its own.
fn start_pod_dns(pod: &PodContext) {
    let db = pod.net.pod(1).ip.to_string();
    pod.net.start_dns_server(
        pod.net.pod(1),
        53,
        &[("only-dns.pod.internal", db.as_str())],
    );
}

fn go_sees_the_pod(build: GoBuild) {
    let pod = PodContext::new();
    start_pod_dns(&pod);
    let app = go_app(build).display().to_string();
    let output = pod.exec_with(
        &[],
        &[("DNS_NAME", "only-dns.pod.internal")],
        &[&app, "context"],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert_eq!(stdout, expected_context(&pod), "tether said:\n{stderr}");
    assert!(
        stderr.contains("is a Go program: intercepting its system calls"),
        "{stderr}"
    );
}

#[test]
fn a_static_go_program_sees_the_pod_s_network_names_files_and_environment() {
    if !require_root("a_static_go_program_sees_the_pod_s_network_names_files_and_environment") {
        return;
    }
    go_sees_the_pod(GoBuild::Static);
}

#[test]
fn a_cgo_program_sees_the_pod_s_network_names_files_and_environment() {
    if !require_root("a_cgo_program_sees_the_pod_s_network_names_files_and_environment") {
        return;
    }
    go_sees_the_pod(GoBuild::Cgo);
}

fn go_server(build: GoBuild, mode: &'static str) -> impl FnOnce(u16) -> Vec<String> {
    move |port| {
        vec![
            go_app(build).display().to_string(),
            mode.to_owned(),
            "go-local".to_owned(),
            port.to_string(),
        ]
    }
}

/// The pid tether said it started (`running … (pid N)`).
fn app_pid(exec: &mut Exec) -> u32 {
    let lines = exec.seen_lines();
    let line = lines
        .lines()
        .find(|l| l.contains("running "))
        .expect("tether names the command it runs");
    line.rsplit_once("(pid ")
        .and_then(|(_, rest)| rest.trim_end_matches(')').parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"))
}

/// A Go server (static, cgo, and one serving from a child process it forks) gets the stolen
/// port and sees the real client; SIGINT reaches it, tether exits with its status, and neither
/// a rule nor the program is left.
#[test]
fn a_go_server_gets_the_stolen_port_and_sees_the_real_client() {
    if !require_root("a_go_server_gets_the_stolen_port_and_sees_the_real_client") {
        return;
    }
    for (build, mode) in [
        (GoBuild::Static, "serve"),
        (GoBuild::Cgo, "serve"),
        (GoBuild::Static, "spawn"),
    ] {
        let Scenario {
            mut exec,
            port,
            pod,
            net,
        } = scenario_with("steal", &[], go_server(build, mode));
        let url = pod_url(&pod);
        for _ in 0..3 {
            let answer = curl(&net, &url, &[]);
            assert_eq!(
                answer,
                format!("go-local {port} GET /hello from {}", net.client_ip()),
                "{build:?} {mode}; tether said:\n{}",
                exec.seen_lines()
            );
        }
        let pid = app_pid(&mut exec);
        let code = exec.interrupt();
        assert!(code.is_some(), "tether exits with the program's status");
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "the Go program is gone"
        );
        assert_eq!(rules(&net, &pod), "", "no rule left after tether exits");
    }
}

/// Under a header filter only marked requests reach the Go server (static and cgo builds);
/// unmarked ones and kubelet probes stay with the pod.
#[test]
fn a_go_server_gets_only_marked_requests_and_probes_stay_with_the_pod() {
    if !require_root("a_go_server_gets_only_marked_requests_and_probes_stay_with_the_pod") {
        return;
    }
    let env = [(
        "TETHER_FEATURE__NETWORK__INCOMING__HTTP_FILTER__HEADER_FILTER",
        "^X-Dev: go$",
    )];
    for build in [GoBuild::Static, GoBuild::Cgo] {
        let Scenario {
            mut exec,
            port,
            pod,
            net,
        } = scenario_with("steal", &env, go_server(build, "serve"));
        let url = pod_url(&pod);
        for _ in 0..3 {
            let marked = curl(&net, &url, &["X-Dev: go"]);
            assert!(
                marked.starts_with(&format!("go-local {port} GET /hello")),
                "{build:?}: {marked}; tether said:\n{}",
                exec.seen_lines()
            );
            assert_eq!(curl(&net, &url, &[]), "original 80 GET /hello");
            let probe = curl(&net, &url, &["X-Dev: go", "User-Agent: kube-probe/1.26"]);
            assert_eq!(probe, "original 80 GET /hello", "{build:?}");
        }
    }
}

/// Mirrored: the pod answers every request and the Go server (static and cgo builds) gets a
/// copy of each.
#[test]
fn a_go_server_gets_mirrored_copies() {
    if !require_root("a_go_server_gets_mirrored_copies") {
        return;
    }
    for build in [GoBuild::Static, GoBuild::Cgo] {
        let seen =
            std::env::temp_dir().join(format!("tether-go-seen-{}-{build:?}", std::process::id()));
        let _ = std::fs::remove_file(&seen);
        let seen_text = seen.display().to_string();
        let Scenario {
            mut exec, pod, net, ..
        } = scenario_with(
            "mirror",
            &[("SEEN_FILE", seen_text.as_str())],
            go_server(build, "serve"),
        );
        let answers = net.http_requests(&pod_url(&pod), 3, false);
        assert!(
            answers.iter().all(|a| a.starts_with("original 80")),
            "{answers:?}"
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let copies = std::fs::read_to_string(&seen).unwrap_or_default();
            if copies.lines().count() >= 3 {
                assert!(
                    copies.lines().all(|l| l.contains("GET /hello from")),
                    "{copies}"
                );
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{build:?}: the Go server saw {} of 3 mirrored copies in 10 s; tether said:\n{}",
                copies.lines().count(),
                exec.seen_lines()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = std::fs::remove_file(&seen);
    }
}

/// Ordinary programs forced through the supervisor see the pod as they do with the preloaded
/// library (the same checks, line for line).
#[test]
fn python_and_node_under_the_syscall_supervisor_see_the_pod() {
    if !require_root("python_and_node_under_the_syscall_supervisor_see_the_pod") {
        return;
    }
    let pod = PodContext::new();
    check_python_with(&pod, &["--interception", "syscall"]);
    check_node_with(&pod, &["--interception", "syscall"]);
}

/// python's and node's servers forced through the supervisor get the stolen port and see the
/// real client, as with the preloaded library.
#[test]
fn python_and_node_servers_under_the_syscall_supervisor_get_the_stolen_port() {
    if !require_root("python_and_node_servers_under_the_syscall_supervisor_get_the_stolen_port") {
        return;
    }
    let env = [("TETHER_INTERCEPTION", "syscall")];
    type App = fn(u16) -> Vec<String>;
    let apps: [(App, &str); 2] = [
        (python_http_server, "local python"),
        (node_app, "local node"),
    ];
    for (app, answer) in apps {
        let Scenario {
            mut exec, pod, net, ..
        } = scenario_with("steal", &env, app);
        let url = pod_url(&pod);
        let got = curl(&net, &url, &[]);
        assert!(
            got.starts_with(answer),
            "{got}; tether said:\n{}",
            exec.seen_lines()
        );
        if answer == "local node" {
            // node prints the connection's remote address: the real client, IPv4-mapped.
            assert!(
                got.ends_with(&net.client_ip().to_string()),
                "the node app sees the real client: {got}"
            );
        }
        let code = exec.interrupt();
        assert!(code.is_some(), "tether exits with the program's status");
        assert_eq!(rules(&net, &pod), "", "no rule left after tether exits");
    }
}

/// A Go program started by a preloaded shell is handed over to the supervisor by the library's
/// `execve` (and sees the pod as when tether starts it); a static busybox is supervised too.
#[test]
fn programs_started_by_a_preloaded_shell_are_handed_over_to_the_supervisor() {
    if !require_root("programs_started_by_a_preloaded_shell_are_handed_over_to_the_supervisor") {
        return;
    }
    let pod = PodContext::new();
    start_pod_dns(&pod);
    let app = go_app(GoBuild::Cgo).display().to_string();
    let output = pod.exec_with(
        &[],
        &[("DNS_NAME", "only-dns.pod.internal")],
        &["sh", "-c", &format!("{app} context")],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert_eq!(stdout, expected_context(&pod), "tether said:\n{stderr}");
    assert!(
        stderr.contains(&format!(
            "tether: {app} is a Go program: intercepting its system calls"
        )),
        "{stderr}"
    );

    // Debian's busybox-static (glibc linked in): its nc (by a name in the pod's hosts file)
    // and cat. (Its wget crashes on its own on Debian 12, with or without tether.)
    let script = r#"printf 'GET /busybox HTTP/1.0\r\n\r\n' | busybox nc db.pod.internal "$HTTP_PORT" | busybox grep -o 'pod-service.*' && busybox cat "$POD_DIR/secret.txt""#;
    for (how, command) in [
        ("started by tether", vec!["busybox", "sh", "-c", script]),
        ("started by a preloaded shell", vec!["sh", "-c", script]),
    ] {
        let output = pod.exec(&[], &command);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{how}: {stdout}\n{stderr}");
        assert_eq!(
            stdout,
            format!(
                "pod-service {} GET /busybox\nsecret-from-pod\n",
                pod.http_port
            ),
            "{how}; tether said:\n{stderr}"
        );
        assert!(
            stderr.contains("is statically linked: intercepting its system calls"),
            "{how}: {stderr}"
        );
    }
}

/// Never silent: a program neither mechanism reaches is named, with what stays local, before
/// it runs (`--interception preload` on a Go program; a static program from a shell whose
/// supervisor hand-over socket is gone).
#[test]
fn a_program_that_cannot_be_intercepted_is_named_before_it_runs() {
    if !require_root("a_program_that_cannot_be_intercepted_is_named_before_it_runs") {
        return;
    }
    let pod = PodContext::new();
    let app = go_app(GoBuild::Static).display().to_string();
    let output = pod.exec_with(&["--interception", "preload"], &[], &[&app, "context"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "warning: {app} is a Go program, whose network and file calls are raw system calls the preloaded layer does not see"
        )),
        "{stderr}"
    );
    // And it indeed ran locally: the pod's file is not on this machine.
    assert!(stdout.contains("file error:"), "{stdout}");

    // The inner shell starts with a supervisor socket that is not there.
    let output = pod.exec(
        &[],
        &[
            "sh",
            "-c",
            "TETHER_SUPERVISOR_SOCKET=/nonexistent exec sh -c '/sbin/ldconfig --version'",
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "tether: warning: /sbin/ldconfig is statically linked, so the preloaded layer cannot enter it"
        ) && stderr.contains("(the syscall supervisor is not reachable:"),
        "{stderr}"
    );
}

/// In write mode a Go program's writes land in the pod (and read back at once); in the default
/// read mode they stay local (and reads still come from the pod), as with the library.
#[test]
fn a_go_program_s_writes_land_in_the_pod_in_write_mode() {
    if !require_root("a_go_program_s_writes_land_in_the_pod_in_write_mode") {
        return;
    }
    let pod = PodContext::new();
    let app = go_app(GoBuild::Static).display().to_string();
    let path = format!("{}/written-by-go.txt", pod.dir);
    let out = pod.exec_ok_with(
        &[],
        &[("TETHER_FEATURE__FS__MODE", "write")],
        &[&app, "write", &path, "hello from go"],
    );
    assert_eq!(out, "write done\nread-back hello from go\n");
    assert_eq!(pod.pod_file(&path).as_deref(), Some("hello from go\n"));
    assert!(
        !std::path::Path::new(&path).exists(),
        "nothing written on this machine"
    );
    // mkdir, rename, unlink in the pod too.
    let out = pod.exec_ok_with(
        &[],
        &[("TETHER_FEATURE__FS__MODE", "write")],
        &[&app, "move", &path],
    );
    assert_eq!(
        out,
        "mkdir done\nrename done\ncreate done\nremove done\nlisted moved\n"
    );
    assert_eq!(
        pod.pod_file(&format!("{path}.d/moved")).as_deref(),
        Some("hello from go\n")
    );
    assert_eq!(pod.pod_file(&path), None, "moved away in the pod");
    assert!(!std::path::Path::new(&format!("{path}.d")).exists());

    let local = format!("{}/written-locally.txt", pod.dir);
    let out = pod.exec_ok(&[], &[&app, "write", &local, "stays here"]);
    // Read mode: the write stays here, reads come from the pod (which has no such file).
    assert!(
        out.starts_with("write done\nread-back error:") && out.contains("no such file"),
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(&local).ok().as_deref(),
        Some("stays here\n")
    );
    assert_eq!(pod.pod_file(&local), None, "the pod never saw it");
}
