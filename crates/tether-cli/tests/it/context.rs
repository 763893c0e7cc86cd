//! The pod's context through `tether exec` (issue 6): outgoing connections, names, files and
//! environment, seen by unmodified python3, node and curl.
//!
//! The target is a process in pod 0 with a mount namespace of its own: a tmpfs at a test-unique
//! directory holding files the host does not have, its own `/etc/hosts` (naming pod 1 as
//! `db.pod.internal`) and `/etc/resolv.conf`, and an environment variable set only for it. Pod 1
//! runs an HTTP app and a UDP echo, reachable only from the pods' network (the test range is
//! blackholed in the root namespace).

use std::{
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use tether_testkit::{
    Network,
    cluster::{AppPod, Cluster},
    require_root,
};

use super::exec::free_port;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Pod 0's process (the target) and pod 1's services. With [`PodContext::in_cluster`] pod 0 is
/// the pod of `deploy/api` in namespace `shop` of a simulated cluster. Fields drop in order:
/// the simulator (and its agent pods) before the namespaces.
pub(crate) struct PodContext {
    pub(crate) cluster: Option<Cluster>,
    /// How `tether exec` names the target, and the environment it needs for it.
    pub(crate) target: Vec<String>,
    pub(crate) target_env: Vec<(String, String)>,
    pub(crate) net: Network,
    pub(crate) pid: u32,
    /// The pod-only directory (a tmpfs in the target's mount namespace; empty on the host).
    pub(crate) dir: String,
    pub(crate) http_port: u16,
    pub(crate) udp_port: u16,
}

impl Drop for PodContext {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl PodContext {
    pub(crate) fn new() -> PodContext {
        PodContext::with_pid_namespace(false)
    }

    /// With `pid_namespace`, the pod's process is PID 1 of a PID namespace of its own, as a
    /// container's main process is.
    fn with_pid_namespace(pid_namespace: bool) -> PodContext {
        let net = Network::new(2);
        let dir = format!(
            "/var/lib/tether-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        // The mount point exists on the host too, but what the pod mounts there it does not see.
        std::fs::create_dir_all(&dir).unwrap();
        let http_port = free_port();
        let udp_port = free_port();
        net.start_http_app(net.pod(1), "pod-service", &[http_port]);
        net.start_udp_echo(net.pod(1), udp_port);
        let db = net.pod(1).ip;
        let setup = format!(
            "mount -t tmpfs tmpfs {dir}; \
             echo secret-from-pod > {dir}/secret.txt; \
             printf '127.0.0.1 localhost\\n{db} db.pod.internal\\n' > {dir}/hosts; \
             mount --bind {dir}/hosts /etc/hosts; \
             printf 'nameserver {db}\\noptions timeout:1 attempts:1\\n' > {dir}/resolv.conf; \
             mount --bind {dir}/resolv.conf /etc/resolv.conf; \
             echo 'print(\"script-from-pod\")' > {dir}/script.py; \
             head -c 20000000 /dev/urandom > {dir}/big.bin; \
             ln -s /etc/shadow {dir}/absolute-link; \
             ln -s ../../../../../../etc/shadow {dir}/relative-link"
        );
        let env = [("POD_ONLY_VAR", "only-in-the-pod")];
        let pid = if pid_namespace {
            net.spawn_container_process(net.pod(0), &setup, &env)
        } else {
            net.spawn_pod_process(net.pod(0), &setup, &env)
        };
        PodContext {
            cluster: None,
            target: vec!["--target".into(), format!("pid/{pid}")],
            target_env: Vec::new(),
            net,
            pid,
            dir,
            http_port,
            udp_port,
        }
    }

    /// The same pod as the one pod of `deploy/api` in namespace `shop` of a simulated cluster,
    /// with an HTTP app on port 80 (answering `original 80 …`); `tether exec` names it
    /// `deploy/api -n shop` through the simulator's kubeconfig.
    pub(crate) fn in_cluster() -> PodContext {
        let mut ctx = PodContext::with_pid_namespace(true);
        ctx.net.start_http_app(ctx.net.pod(0), "original", &[80]);
        // Pod 1's service, as the cluster DNS names it for agent pods (targetless sessions).
        let hosts = format!("{} db.shop.svc\n", ctx.net.pod(1).ip);
        let cluster =
            Cluster::start_with_hosts(&ctx.net, &[env!("CARGO_BIN_EXE_tether"), "agent"], &hosts);
        cluster.add_deployment("shop", "api", &[AppPod::new(ctx.net.pod(0), ctx.pid)]);
        ctx.target = ["--target", "deploy/api", "-n", "shop"]
            .map(String::from)
            .to_vec();
        ctx.target_env = vec![(
            "KUBECONFIG".into(),
            cluster.kubeconfig().display().to_string(),
        )];
        ctx.cluster = Some(cluster);
        ctx
    }

    /// Runs `command` through `tether exec` against the pod process; at most 60 s.
    pub(crate) fn exec(&self, env: &[(&str, &str)], command: &[&str]) -> Output {
        self.exec_with(&[], env, command)
    }

    /// As [`PodContext::exec`], with `tether exec` options, and the whole run in a mount
    /// namespace of its own whose `/etc/resolv.conf` names only loopback: a program that
    /// escaped interception (a Go binary, with its own resolver) cannot reach the host's real
    /// resolver.
    pub(crate) fn exec_with(
        &self,
        options: &[&str],
        env: &[(&str, &str)],
        command: &[&str],
    ) -> Output {
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg("mount --bind \"$0\" /etc/resolv.conf && exec \"$@\"")
            .arg(super::exec::loopback_resolv_conf())
            .arg(env!("CARGO_BIN_EXE_tether"))
            .arg("exec")
            .args(options)
            .args(&self.target)
            .arg("--")
            .args(command)
            .env_remove("TETHER_CONFIG")
            .env_remove("RUST_LOG")
            .envs(self.target_env.iter().map(|(k, v)| (k, v)))
            .env("POD_DIR", &self.dir)
            .env("HTTP_PORT", self.http_port.to_string())
            .env("UDP_PORT", self.udp_port.to_string())
            .envs(env.iter().copied())
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
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(output) => output.unwrap(),
            Err(_) => {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                panic!("`tether exec {command:?}` did not finish in 60 s");
            }
        }
    }

    pub(crate) fn exec_ok(&self, env: &[(&str, &str)], command: &[&str]) -> String {
        self.exec_ok_with(&[], env, command)
    }

    pub(crate) fn exec_ok_with(
        &self,
        options: &[&str],
        env: &[(&str, &str)],
        command: &[&str],
    ) -> String {
        let output = self.exec_with(options, env, command);
        assert!(
            output.status.success(),
            "{command:?} failed ({:?}):\nstdout: {}\nstderr: {}\nagent pods: {}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.cluster
                .as_ref()
                .map_or_else(|| "(no cluster)".into(), |c| c.logs("shop"))
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// What the pod process sees at `path` (read inside its mount namespace).
    pub(crate) fn pod_file(&self, path: &str) -> Option<String> {
        let output = Command::new("nsenter")
            .args(["-t", &self.pid.to_string(), "-m", "cat", path])
            .output()
            .unwrap();
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

const PYTHON: &str = r#"
import os, socket, urllib.request
d, port, udp = os.environ["POD_DIR"], int(os.environ["HTTP_PORT"]), int(os.environ["UDP_PORT"])
print("env", os.environ.get("POD_ONLY_VAR"))
print("file", open(d + "/secret.txt").read().strip())
print("listdir", sorted(os.listdir(d)))
print("stat", os.stat(d + "/secret.txt").st_size)
ip = socket.gethostbyname("db.pod.internal")
print("dns", ip)
body = urllib.request.urlopen(f"http://db.pod.internal:{port}/py", timeout=10).read().decode().strip()
print("http", body)
s = socket.create_connection((ip, port), timeout=10)
print("peer", s.getpeername()[0])
s.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(10)
u.sendto(b"hello", ("db.pod.internal", udp))
data, source = u.recvfrom(100)
print("udp", data.decode(), source[0], source[1] == udp)
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
c.settimeout(10)
c.connect((ip, udp))
c.send(b"again")
print("udp-connected", c.recv(100).decode())
try:
    socket.socket().connect((ip, 1))  # blocking
except OSError as e:
    print("refused", e.errno)
"#;

#[test]
fn python_sees_the_pod_s_network_names_files_and_environment() {
    if !require_root("python_sees_the_pod_s_network_names_files_and_environment") {
        return;
    }
    let pod = PodContext::new();
    check_python(&pod);
}

/// Runs [`PYTHON`] through `tether exec` and checks every line of what it saw.
pub(crate) fn check_python(pod: &PodContext) {
    check_python_with(pod, &[]);
}

/// [`check_python`] with `tether exec` options (e.g. `--interception syscall`).
pub(crate) fn check_python_with(pod: &PodContext, options: &[&str]) {
    let out = pod.exec_ok_with(options, &[], &["python3", "-c", PYTHON]);
    let db = pod.net.pod(1).ip;
    let lines: Vec<&str> = out.lines().collect();
    let expected = [
        "env only-in-the-pod".to_owned(),
        "file secret-from-pod".to_owned(),
        "listdir ['absolute-link', 'big.bin', 'hosts', 'relative-link', 'resolv.conf', 'script.py', 'secret.txt']"
            .to_owned(),
        "stat 16".to_owned(),
        format!("dns {db}"),
        format!("http pod-service {} GET /py", pod.http_port),
        format!("peer {db}"),
        format!("udp echo hello {db} True"),
        "udp-connected echo again".to_owned(),
        format!("refused {}", libc::ECONNREFUSED),
    ];
    assert_eq!(lines, expected, "whole output:\n{out}");
}

#[test]
fn python_runs_a_script_and_streams_a_big_file_from_the_pod() {
    if !require_root("python_runs_a_script_and_streams_a_big_file_from_the_pod") {
        return;
    }
    let pod = PodContext::new();
    let script = format!("{}/script.py", pod.dir);
    assert_eq!(pod.exec_ok(&[], &["python3", &script]), "script-from-pod\n");
    // 20 MB: read through the layer (not copied at open), in 1 MiB reads, then from its end.
    let reader = r#"
import hashlib, os
with open(os.environ["POD_DIR"] + "/big.bin", "rb") as f:
    h = hashlib.sha256()
    while chunk := f.read(1 << 20):
        h.update(chunk)
    print(h.hexdigest())
    f.seek(-10, 2)
    print(f.tell(), len(f.read()))
"#;
    let out = pod.exec_ok(&[], &["python3", "-c", reader]);
    let copy = format!("/tmp/tether-copy-{}", pod.pid);
    // shutil copies with sendfile, which cannot see a file read through the layer: it must fall
    // back to read/write and still copy every byte.
    let copier = format!(
        "import os, shutil, hashlib; shutil.copyfile(os.environ['POD_DIR'] + '/big.bin', '{copy}'); print(hashlib.sha256(open('{copy}', 'rb').read()).hexdigest())"
    );
    let copied = pod.exec_ok(&[], &["python3", "-c", &copier]);
    let _ = std::fs::remove_file(&copy);
    let expected = Command::new("nsenter")
        .args([
            "-t",
            &pod.pid.to_string(),
            "-m",
            "sha256sum",
            &format!("{}/big.bin", pod.dir),
        ])
        .output()
        .unwrap();
    let expected = String::from_utf8_lossy(&expected.stdout);
    let digest = expected.split_whitespace().next().unwrap();
    assert_eq!(out, format!("{digest}\n19999990 10\n"));
    assert_eq!(copied, format!("{digest}\n"));
}

const FORKS: &str = r#"
import os, socket, threading
d = os.environ["POD_DIR"]
big = open(d + "/big.bin", "rb")
big.read(10)
stop = False
def resolve():
    for _ in range(200):
        if stop:
            break
        socket.gethostbyname("db.pod.internal")
t = threading.Thread(target=resolve)
t.start()
ok = 0
for i in range(20):
    pid = os.fork()
    if pid == 0:
        big.close()
        code = 0 if open(d + "/secret.txt").read() == "secret-from-pod\n" else 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    ok += status == 0
stop = True
t.join()
print("children", ok)
print("parent still reads", len(big.read(1000)))
os.closerange(3, 4096)
print("after closerange", open(d + "/secret.txt").read().strip())
"#;

#[test]
fn forks_threads_and_closed_fds_keep_working() {
    if !require_root("forks_threads_and_closed_fds_keep_working") {
        return;
    }
    let pod = PodContext::new();
    // Forks while another thread resolves names through the layer: no child inherits a held
    // lock; a child closing an inherited file does not close the parent's; a process that closes
    // every fd (as daemons do) gets a new channel to the proxy.
    let out = pod.exec_ok(&[], &["python3", "-c", FORKS]);
    assert_eq!(
        out,
        "children 20\nparent still reads 1000\nafter closerange secret-from-pod\n"
    );
}

const NODE: &str = r#"
const fs = require("fs"), dns = require("dns"), http = require("http");
const d = process.env.POD_DIR, port = process.env.HTTP_PORT;
console.log("env", process.env.POD_ONLY_VAR);
console.log("file", fs.readFileSync(d + "/secret.txt", "utf8").trim());
dns.lookup("db.pod.internal", { family: 4 }, (err, address) => {
  if (err) throw err;
  console.log("dns", address);
  http.get(`http://db.pod.internal:${port}/node`, (res) => {
    let body = "";
    res.on("data", (c) => (body += c));
    res.on("end", () => {
      console.log("http", body.trim());
      const udp = require("dgram").createSocket("udp4");
      udp.on("message", (msg, rinfo) => {
        console.log("udp", msg.toString(), rinfo.address);
        udp.close();
      });
      udp.send("from-node", Number(process.env.UDP_PORT), "db.pod.internal");
    });
  }).on("error", (e) => { console.log("http error", e.message); process.exit(1); });
});
"#;

#[test]
fn node_sees_the_pod_s_network_names_files_and_environment() {
    if !require_root("node_sees_the_pod_s_network_names_files_and_environment") {
        return;
    }
    let pod = PodContext::new();
    check_node(&pod);
}

/// Runs [`NODE`] through `tether exec` and checks every line of what it saw.
pub(crate) fn check_node(pod: &PodContext) {
    check_node_with(pod, &[]);
}

/// [`check_node`] with `tether exec` options (e.g. `--interception syscall`).
pub(crate) fn check_node_with(pod: &PodContext, options: &[&str]) {
    let out = pod.exec_ok_with(options, &[], &["node", "-e", NODE]);
    let db = pod.net.pod(1).ip;
    let lines: Vec<&str> = out.lines().collect();
    let expected = [
        "env only-in-the-pod".to_owned(),
        "file secret-from-pod".to_owned(),
        format!("dns {db}"),
        format!("http pod-service {} GET /node", pod.http_port),
        format!("udp echo from-node {db}"),
    ];
    assert_eq!(lines, expected, "whole output:\n{out}");
}

/// Regression: libuv closes sockets with `syscall(SYS_close)`, which no `close` hook sees; the
/// next socket with the same fd number was taken for the closed one ("a repeated connect") and
/// sent to a proxy address nobody listened on any more, so every request after the first one
/// or two failed with `ECONNRESET socket hang up`. 20 `http.get` in a row (a new connection
/// each) and 20 `fetch`, all to a host and port only the pod reaches.
#[test]
fn node_makes_many_requests_in_a_row_to_a_pod_only_service() {
    if !require_root("node_makes_many_requests_in_a_row_to_a_pod_only_service") {
        return;
    }
    let pod = PodContext::new();
    let script = r#"
const http = require("http");
const url = `http://db.pod.internal:${process.env.HTTP_PORT}`;
const get = (i) => new Promise((ok, fail) => {
  http.get(`${url}/get-${i}`, { agent: false }, (res) => {
    let body = "";
    res.on("data", (c) => (body += c));
    res.on("end", () => ok(body.trim()));
  }).on("error", fail);
});
(async () => {
  for (let i = 0; i < 20; i++) console.log(await get(i));
  for (let i = 0; i < 20; i++) {
    const res = await fetch(`${url}/fetch-${i}`, { headers: { connection: "close" } });
    console.log((await res.text()).trim());
  }
})().catch((e) => { console.log("error", e.message, e.cause && e.cause.code); process.exit(1); });
"#;
    let out = pod.exec_ok(&[], &["node", "-e", script]);
    let expected: Vec<String> = (0..20)
        .map(|i| format!("pod-service {} GET /get-{i}", pod.http_port))
        .chain((0..20).map(|i| format!("pod-service {} GET /fetch-{i}", pod.http_port)))
        .collect();
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        expected,
        "whole output:\n{out}"
    );
}

/// The same with python closing its sockets through a raw `syscall(SYS_close)` (ctypes), so the
/// layer's `close` hook never runs: each new socket reuses the closed one's fd number.
#[test]
fn sockets_closed_with_a_raw_syscall_do_not_haunt_the_next_socket() {
    if !require_root("sockets_closed_with_a_raw_syscall_do_not_haunt_the_next_socket") {
        return;
    }
    let pod = PodContext::new();
    let script = r#"
import ctypes, os, socket
libc = ctypes.CDLL(None, use_errno=True)
port = int(os.environ["HTTP_PORT"])
for i in range(10):
    s = socket.create_connection(("db.pod.internal", port), timeout=10)
    s.sendall(f"GET /raw-{i} HTTP/1.0\r\nHost: db\r\n\r\n".encode())
    answer = b""
    while chunk := s.recv(65536):
        answer += chunk
    fd = s.detach()
    assert libc.syscall(3, fd) == 0  # SYS_close on x86_64
    print(fd, answer.split(b"\r\n\r\n", 1)[1].decode().strip())
"#;
    let out = pod.exec_ok(&[], &["python3", "-c", script]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 10, "whole output:\n{out}");
    let first_fd = lines[0].split_whitespace().next().unwrap();
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(
            *line,
            format!("{first_fd} pod-service {} GET /raw-{i}", pod.http_port),
            "the same fd number each time, a new connection each time:\n{out}"
        );
    }
}

/// Regression: `getent hosts` (glibc's `gethostbyname2`, AF_INET6 then AF_INET) and python's
/// `socket.gethostbyname` (`gethostbyname_r`) resolved locally and did not find a name only the
/// pod's `/etc/hosts` has; reverse lookups of the pod's addresses neither.
#[test]
fn getent_and_python_s_gethostbyname_find_a_name_only_the_pod_has() {
    if !require_root("getent_and_python_s_gethostbyname_find_a_name_only_the_pod_has") {
        return;
    }
    let pod = PodContext::new();
    let db = pod.net.pod(1).ip;
    let out = pod.exec_ok(&[], &["getent", "hosts", "db.pod.internal"]);
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        [db.to_string().as_str(), "db.pod.internal"],
        "{out}"
    );
    let script = "import socket; print(socket.gethostbyname('db.pod.internal')); print(socket.gethostbyname_ex('db.pod.internal'))";
    let out = pod.exec_ok(&[], &["python3", "-c", script]);
    assert_eq!(
        out,
        format!("{db}\n('db.pod.internal', [], ['{db}'])\n"),
        "{out}"
    );
    // Reverse: the pod's address has a name only in the pod's hosts file (gethostbyaddr,
    // gethostbyaddr_r, getnameinfo).
    let out = pod.exec_ok(&[], &["getent", "hosts", &db.to_string()]);
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        [db.to_string().as_str(), "db.pod.internal"],
        "{out}"
    );
    let script = format!(
        "import socket; print(socket.gethostbyaddr('{db}')[0]); print(socket.getnameinfo(('{db}', 80), 0)); print(socket.getnameinfo(('{db}', 80), socket.NI_NUMERICHOST))"
    );
    let out = pod.exec_ok(&[], &["python3", "-c", &script]);
    assert_eq!(
        out,
        format!("db.pod.internal\n('db.pod.internal', 'http')\n('{db}', 'http')\n"),
        "{out}"
    );
}

/// dig and nslookup (bind9's tools: their own resolver, reading `/etc/resolv.conf`, UDP to its
/// nameserver) find a name only the pod's DNS server knows. Regression: they hung before `main`,
/// jemalloc's start-up calling `readlink` into a hook that allocated through jemalloc.
#[test]
fn dig_and_nslookup_ask_the_pod_s_dns_server() {
    if !require_root("dig_and_nslookup_ask_the_pod_s_dns_server") {
        return;
    }
    let pod = PodContext::new();
    let answer = "10.213.77.7";
    pod.net
        .start_dns_server(pod.net.pod(1), 53, &[("only-dns.pod.internal", answer)]);
    let out = pod.exec_ok(
        &[],
        &[
            "dig",
            "+short",
            "+time=3",
            "+tries=1",
            "only-dns.pod.internal",
        ],
    );
    assert_eq!(out.trim(), answer, "{out}");
    let out = pod.exec_ok(&[], &["nslookup", "-timeout=3", "only-dns.pod.internal"]);
    assert!(
        out.contains(&format!("Address: {answer}")),
        "nslookup's answer:\n{out}"
    );
}

/// node's `fs.statSync` (libuv: `syscall(SYS_statx)`), `fs.readdirSync` (glibc's `scandir`,
/// whose `opendir` is internal) and `fs.promises.readdir` (`opendir`/`readdir`) see pod-only
/// files. Regression: the first two gave ENOENT while `fs.existsSync` said true.
#[test]
fn node_stats_and_lists_pod_only_files() {
    if !require_root("node_stats_and_lists_pod_only_files") {
        return;
    }
    let pod = PodContext::new();
    let script = r#"
const fs = require("fs"), d = process.env.POD_DIR;
console.log("stat", fs.statSync(d + "/secret.txt").size, fs.statSync(d).isDirectory());
console.log("readdir", fs.readdirSync(d).sort().join(","));
fs.promises.readdir(d).then((l) => console.log("promises", l.sort().join(",")));
"#;
    let out = pod.exec_ok(&[], &["node", "-e", script]);
    let listing = POD_LISTING.join(",");
    assert_eq!(
        out,
        format!("stat 16 true\nreaddir {listing}\npromises {listing}\n"),
        "{out}"
    );
}

/// The names in the pod-only directory, sorted.
const POD_LISTING: [&str; 7] = [
    "absolute-link",
    "big.bin",
    "hosts",
    "relative-link",
    "resolv.conf",
    "script.py",
    "secret.txt",
];

/// Java 17, a single-file program: `Files.list` and `Files.walk` (`open(O_DIRECTORY)` then
/// `fdopendir`: regression, they threw NotDirectoryException), `Files.readString`, and
/// `java.net.http.HttpClient` to a name only the pod resolves.
#[test]
fn java_lists_reads_and_calls_what_only_the_pod_has() {
    if !require_root("java_lists_reads_and_calls_what_only_the_pod_has") {
        return;
    }
    let pod = PodContext::new();
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("App.java");
    std::fs::write(
        &source,
        r#"
import java.net.URI;
import java.net.http.*;
import java.nio.file.*;
import java.util.stream.Collectors;

public class App {
    public static void main(String[] args) throws Exception {
        Path d = Paths.get(System.getenv("POD_DIR"));
        try (var s = Files.list(d)) {
            System.out.println("list " + s.map(p -> p.getFileName().toString()).sorted().collect(Collectors.joining(",")));
        }
        try (var s = Files.walk(d)) {
            System.out.println("walk " + s.count());
        }
        System.out.println("read " + Files.readString(d.resolve("secret.txt")).trim());
        var client = HttpClient.newHttpClient();
        var uri = URI.create("http://db.pod.internal:" + System.getenv("HTTP_PORT") + "/java");
        var response = client.send(HttpRequest.newBuilder(uri).build(), HttpResponse.BodyHandlers.ofString());
        System.out.println("http " + response.body().trim());
    }
}
"#,
    )
    .unwrap();
    let out = pod.exec_ok(&[], &["java", source.to_str().unwrap()]);
    assert_eq!(
        out,
        format!(
            "list {}\nwalk 8\nread secret-from-pod\nhttp pod-service {} GET /java\n",
            POD_LISTING.join(","),
            pod.http_port
        ),
        "{out}"
    );
}

/// Ruby: `Dir.children` and `Dir.glob` of a pod-only directory (regression: `[]`, Ruby rewinds a
/// directory before it reads it), and 20 `Net::HTTP` requests in a row to a pod-only name.
#[test]
fn ruby_lists_and_calls_what_only_the_pod_has() {
    if !require_root("ruby_lists_and_calls_what_only_the_pod_has") {
        return;
    }
    let pod = PodContext::new();
    let script = r##"
require "net/http"
d = ENV["POD_DIR"]
puts "children #{Dir.children(d).sort.join(",")}"
puts "glob #{Dir.glob("#{d}/*.txt").map { |f| File.basename(f) }.join(",")}"
Dir.open(d) { |dir| puts "fileno #{dir.fileno.is_a?(Integer)} #{dir.each_child.count}" }
Dir.open(d) { |dir| dir.read; at = dir.tell; name = dir.read; dir.read; dir.seek(at); puts "seek #{!name.nil? && dir.read == name}" }
20.times { |i| puts Net::HTTP.get(URI("http://db.pod.internal:#{ENV["HTTP_PORT"]}/ruby-#{i}")).strip }
"##;
    let out = pod.exec_ok(&[], &["ruby", "-e", script]);
    let mut expected = format!(
        "children {}\nglob secret.txt\nfileno true 7\nseek true\n",
        POD_LISTING.join(",")
    );
    for i in 0..20 {
        expected.push_str(&format!("pod-service {} GET /ruby-{i}\n", pod.http_port));
    }
    assert_eq!(out, expected, "{out}");
}

#[test]
fn curl_sees_the_pod_s_network_names_files_and_environment() {
    if !require_root("curl_sees_the_pod_s_network_names_files_and_environment") {
        return;
    }
    let pod = PodContext::new();
    // The shell is preloaded too: `$POD_ONLY_VAR` is the pod's, and curl resolves and connects
    // through the pod.
    let script = r#"curl -sS --max-time 10 "http://db.pod.internal:$HTTP_PORT/curl-$POD_ONLY_VAR" && curl -sS --max-time 10 "file://$POD_DIR/secret.txt""#;
    let out = pod.exec_ok(&[], &["sh", "-c", script]);
    assert_eq!(
        out,
        format!(
            "pod-service {} GET /curl-only-in-the-pod\nsecret-from-pod\n",
            pod.http_port
        )
    );
}

#[test]
fn an_outgoing_local_entry_keeps_that_destination_local() {
    if !require_root("an_outgoing_local_entry_keeps_that_destination_local") {
        return;
    }
    let pod = PodContext::new();
    // The same port on loopback, on both sides: who answers tells where the connection went.
    let port = free_port();
    pod.net
        .start_http_app(pod.net.pod(0), "pod-loopback", &[port]);
    let mut host = Command::new("python3")
        .args([
            "-c",
            "import http.server as h, sys\nclass H(h.BaseHTTPRequestHandler):\n  def do_GET(s):\n    b=b'host-loopback\\n'; s.send_response(200); s.send_header('Content-Length', str(len(b))); s.end_headers(); s.wfile.write(b)\n  def log_message(s,*a): pass\nh.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()",
            &port.to_string(),
        ])
        .spawn()
        .unwrap();
    let wait = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < wait,
            "the host app did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("http://127.0.0.1:{port}/");
    let curl = ["curl", "-sS", "--max-time", "10", url.as_str()];
    // Loopback through the pod (ignore_localhost off): the pod's own app answers.
    let remote = pod.exec_ok(
        &[(
            "TETHER_FEATURE__NETWORK__OUTGOING__IGNORE_LOCALHOST",
            "false",
        )],
        &curl,
    );
    // …unless a `local` entry names it.
    let local_entry = format!("[\"tcp://127.0.0.1:{port}\"]");
    let local = pod.exec_ok(
        &[
            (
                "TETHER_FEATURE__NETWORK__OUTGOING__IGNORE_LOCALHOST",
                "false",
            ),
            (
                "TETHER_FEATURE__NETWORK__OUTGOING__FILTER__LOCAL",
                &local_entry,
            ),
        ],
        &curl,
    );
    let _ = host.kill();
    let _ = host.wait();
    assert_eq!(remote, format!("pod-loopback {port} GET /\n"));
    assert_eq!(local, "host-loopback\n");
}

#[test]
fn write_mode_writes_in_the_pod_and_read_mode_writes_locally() {
    if !require_root("write_mode_writes_in_the_pod_and_read_mode_writes_locally") {
        return;
    }
    let pod = PodContext::new();
    let write = r#"import os; open(os.environ["POD_DIR"] + "/written.txt", "w").write("by-"); fd = os.open(os.environ["POD_DIR"] + "/written.txt", os.O_WRONLY | os.O_APPEND); os.writev(fd, [b"tet", b"her\n"]); os.close(fd)"#;
    pod.exec_ok(
        &[("TETHER_FEATURE__FS__MODE", "write")],
        &["python3", "-c", write],
    );
    assert_eq!(
        pod.pod_file(&format!("{}/written.txt", pod.dir)).as_deref(),
        Some("by-tether\n")
    );
    assert!(
        !std::path::Path::new(&format!("{}/written.txt", pod.dir)).exists(),
        "write mode wrote locally"
    );

    let local = r#"import os; open(os.environ["POD_DIR"] + "/local.txt", "w").write("stays-here\n"); print(open(os.environ["POD_DIR"] + "/secret.txt").read().strip())"#;
    let out = pod.exec_ok(&[], &["python3", "-c", local]);
    assert_eq!(out, "secret-from-pod\n", "reads still come from the pod");
    assert_eq!(
        std::fs::read_to_string(format!("{}/local.txt", pod.dir)).unwrap(),
        "stays-here\n"
    );
    assert_eq!(
        pod.pod_file(&format!("{}/local.txt", pod.dir)),
        None,
        "read mode wrote in the pod"
    );
}

#[test]
fn paths_that_leave_the_pod_s_root_are_refused_and_reported() {
    if !require_root("paths_that_leave_the_pod_s_root_are_refused_and_reported") {
        return;
    }
    let pod = PodContext::new();
    let script = r#"
import os
d = os.environ["POD_DIR"]
# Two symlinks out of the root, and more `..` than the directory is deep.
for name in ["absolute-link", "relative-link", "../../../../srv/anything"]:
    try:
        open(d + "/" + name).read()
        print(name, "READ")
    except OSError as e:
        print(name, e.errno)
"#;
    let output = pod.exec(&[], &["python3", "-c", script]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        stdout,
        format!(
            "absolute-link {0}\nrelative-link {0}\n../../../../srv/anything {0}\n",
            libc::EACCES
        ),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("leads outside the target's root"),
        "the refusal is reported to the user: {stderr}"
    );
}
