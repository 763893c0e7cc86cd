//! Test "pods": network namespaces with their own addresses, on a private bridge.
//!
//! ```text
//!   <prefix>-node   (bridge br0, no address)
//!     ├── veth ── <prefix>-pod0    10.213.0.10/24 (eth0)
//!     ├── veth ── <prefix>-pod1    10.213.0.11/24
//!     └── veth ── <prefix>-client  10.213.0.100/24
//! ```
//!
//! Network safety (DEVELOPERS.md): pods and the client have no default route, only their /24 on
//! the private bridge; the root namespace gets a `blackhole` route for 10.213.0.0/16 so nothing
//! sent there can leave the machine; every namespace carries a prefix unique to this fixture
//! (`tt-<pid>-<n>`) and is deleted on drop (also during a panic), and [`Network::new`] first
//! sweeps namespaces left by test processes that no longer exist (a killed test run).

use std::{
    net::Ipv4Addr,
    path::Path,
    process::{Child, Command, Output, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

/// The range every test pod lives in; blackholed in the root namespace.
pub const TEST_RANGE: &str = "10.213.0.0/16";
const SUBNET: [u8; 3] = [10, 213, 0];
const CLIENT_HOST: u8 = 100;
const FIRST_POD_HOST: u8 = 10;
/// Pods added later ([`add_pod`]) get 10.213.0.200 upwards.
const EXTRA_FIRST_HOST: u8 = 200;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A set of namespaces: one node (bridge), some pods, one client.
#[derive(Debug)]
pub struct Network {
    prefix: String,
    node: String,
    pods: Vec<Pod>,
    client: String,
    children: Mutex<Vec<Child>>,
}

/// A pod: a network namespace with one address.
#[derive(Debug, Clone)]
pub struct Pod {
    pub netns: String,
    pub ip: Ipv4Addr,
}

impl Network {
    /// Creates a node, `pods` pods and a client. Panics with the failing command on error.
    pub fn new(pods: usize) -> Network {
        sweep_leftovers();
        // Idempotent: every fixture adds the same route.
        run(&["ip", "route", "replace", "blackhole", TEST_RANGE]);
        let prefix = format!(
            "tt-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut network = Network {
            node: format!("{prefix}-node"),
            client: format!("{prefix}-client"),
            pods: Vec::new(),
            prefix,
            children: Mutex::new(Vec::new()),
        };
        // From here on, Drop removes whatever was created, even if a later step panics.
        run(&["ip", "netns", "add", &network.node]);
        network.exec_ok(
            &network.node.clone(),
            &["ip", "link", "add", "br0", "type", "bridge"],
        );
        network.exec_ok(&network.node.clone(), &["ip", "link", "set", "br0", "up"]);
        network.exec_ok(&network.node.clone(), &["ip", "link", "set", "lo", "up"]);
        for i in 0..pods {
            let netns = format!("{}-pod{i}", network.prefix);
            let ip = Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], FIRST_POD_HOST + i as u8);
            network.attach(&netns, &format!("vp{i}"), ip);
            network.pods.push(Pod { netns, ip });
        }
        let client = network.client.clone();
        network.attach(&client, "vc", network.client_ip());
        network
    }

    /// Creates `netns` and links it to the bridge through a veth pair created directly inside the
    /// two namespaces (no interface ever appears in the root namespace).
    fn attach(&self, netns: &str, node_side: &str, ip: Ipv4Addr) {
        run(&["ip", "netns", "add", netns]);
        self.exec_ok(
            netns,
            &[
                "ip", "link", "add", "eth0", "type", "veth", "peer", "name", node_side, "netns",
                &self.node,
            ],
        );
        self.exec_ok(
            &self.node,
            &["ip", "link", "set", node_side, "master", "br0", "up"],
        );
        self.exec_ok(
            netns,
            &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        );
        self.exec_ok(netns, &["ip", "link", "set", "eth0", "up"]);
        self.exec_ok(netns, &["ip", "link", "set", "lo", "up"]);
    }

    /// The prefix of every namespace of this network (`tt-<pid>-<n>`); namespaces named with
    /// it are removed with the network.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn pod(&self, i: usize) -> &Pod {
        &self.pods[i]
    }

    pub fn client(&self) -> &str {
        &self.client
    }

    pub fn client_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], CLIENT_HOST)
    }

    /// Runs a command in a namespace and waits for it.
    pub fn exec(&self, netns: &str, args: &[&str]) -> Output {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", netns]).args(args);
        command
            .output()
            .unwrap_or_else(|e| panic!("cannot run {args:?} in {netns}: {e}"))
    }

    /// Like [`exec`](Self::exec), panicking with stderr when the command fails.
    pub fn exec_ok(&self, netns: &str, args: &[&str]) -> String {
        let output = self.exec(netns, args);
        assert!(
            output.status.success(),
            "{args:?} in {netns} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Starts a long-running program in a namespace; it is killed when the network is dropped.
    pub fn spawn(&self, netns: &str, args: &[&str]) -> u32 {
        let child = Command::new("ip")
            .args(["netns", "exec", netns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {args:?} in {netns}: {e}"));
        let pid = child.id();
        self.children.lock().unwrap().push(child);
        pid
    }

    /// Starts a long-running process in `pod` that also has a mount namespace of its own, as a
    /// container's main process has: `setup` (shell) runs inside that namespace first (mount a
    /// tmpfs, write files the host never sees, bind-mount an `/etc/hosts`), then the process
    /// waits with `env` set only for it. Returns its pid once the setup is done (the process
    /// then runs `sleep`: its command line is the readiness signal, polled for at most 10 s).
    pub fn spawn_pod_process(&self, pod: &Pod, setup: &str, env: &[(&str, &str)]) -> u32 {
        let vars: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let script = format!("set -e; {setup}; exec env {} sleep 3600", vars.join(" "));
        let pid = self.spawn(
            &pod.netns,
            &[
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                &script,
            ],
        );
        wait_for_sleep(setup, || Some(pid))
    }

    /// Like [`spawn_pod_process`](Self::spawn_pod_process), with a PID namespace of its own
    /// too (its `/proc` remounted for it), as a container has: the process is PID 1 inside.
    /// Returns its pid as this host sees it.
    pub fn spawn_container_process(&self, pod: &Pod, setup: &str, env: &[(&str, &str)]) -> u32 {
        let vars: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let script = format!("set -e; {setup}; exec env {} sleep 3600", vars.join(" "));
        let unshare = self.spawn(
            &pod.netns,
            &[
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--pid",
                "--fork",
                "--mount-proc",
                "--kill-child",
                "--",
                "sh",
                "-c",
                &script,
            ],
        );
        // `unshare --fork` waits for its one child, PID 1 of the new namespace.
        wait_for_sleep(setup, || {
            std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children"))
                .ok()?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
    }

    /// Gives `pod` an Istio sidecar, for real: the nat rules of istio-iptables (REDIRECT mode, as
    /// field-notes §4 lists them) applied with the real `iptables-legacy-restore` or
    /// `iptables-nft-restore` (`backend`: "legacy" or "nft"), and a stand-in Envoy
    /// (`apps/sidecar.py`) as uid 1337 on 15006/15001 that forwards to each connection's original
    /// destination, inbound from 127.0.0.6. What it does not model: mTLS (its bytes on the wire
    /// are plaintext) and Envoy's HTTP handling. Waits until the sidecar listens.
    pub fn install_istio(&self, pod: &Pod, backend: &str) {
        let rules = "\
*nat
:ISTIO_INBOUND - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
";
        self.install_mesh(
            pod,
            backend,
            rules,
            &["1337", "15006", "15001", "127.0.0.6"],
        );
    }

    /// Gives `pod` a Linkerd proxy: proxy-init's nat rules (`PROXY_INIT_REDIRECT` to 4143,
    /// `PROXY_INIT_OUTPUT` letting uid 2102 and all `lo` traffic through, the rest to 4140) and the
    /// stand-in sidecar as uid 2102 on 4143/4140. Not modelled: mTLS, the proxy's protocol
    /// detection.
    pub fn install_linkerd(&self, pod: &Pod, backend: &str) {
        let rules = "\
*nat
:PROXY_INIT_REDIRECT - [0:0]
:PROXY_INIT_OUTPUT - [0:0]
-A PREROUTING -j PROXY_INIT_REDIRECT
-A OUTPUT -j PROXY_INIT_OUTPUT
-A PROXY_INIT_REDIRECT -p tcp -m multiport --dports 4190,4191,4567,4568 -j RETURN
-A PROXY_INIT_REDIRECT -p tcp -j REDIRECT --to-ports 4143
-A PROXY_INIT_OUTPUT -m owner --uid-owner 2102 -j RETURN
-A PROXY_INIT_OUTPUT -o lo -j RETURN
-A PROXY_INIT_OUTPUT -p tcp -j REDIRECT --to-ports 4140
COMMIT
";
        self.install_mesh(pod, backend, rules, &["2102", "4143", "4140"]);
    }

    fn install_mesh(&self, pod: &Pod, backend: &str, rules: &str, sidecar: &[&str]) {
        let restore = format!("iptables-{backend}-restore");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &pod.netns, &restore, "--noflush"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {restore}: {e}"));
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), rules.as_bytes()).unwrap();
        drop(child.stdin.take());
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{restore} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let script = apps_dir().join("sidecar.py");
        let mut args = vec!["python3", script.to_str().unwrap()];
        args.extend(sidecar);
        self.spawn(&pod.netns, &args);
        for port in &sidecar[1..3] {
            self.wait_listening(&pod.netns, port.parse().unwrap());
        }
    }

    /// The pod's nat table as `iptables-<backend>-save` prints it, without packet counters.
    pub fn nat_rules(&self, pod: &Pod, backend: &str) -> String {
        let listing = self.exec_ok(
            &pod.netns,
            &[&format!("iptables-{backend}-save"), "-t", "nat"],
        );
        listing
            .lines()
            .filter(|line| !line.starts_with('#'))
            .map(|line| match line.rfind(" [") {
                Some(at) if line.starts_with(':') => &line[..at],
                _ => line,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Starts a UDP echo server on `port` in `pod` (answers `echo <data>`); waits until it is
    /// bound.
    pub fn start_udp_echo(&self, pod: &Pod, port: u16) -> u32 {
        let script = apps_dir().join("udp_echo.py");
        let pid = self.spawn(
            &pod.netns,
            &["python3", script.to_str().unwrap(), &port.to_string()],
        );
        self.wait_udp_bound(pod, port, "the UDP echo");
        pid
    }

    /// Waits (at most 10 s) until a UDP socket is bound to `port` in `pod`.
    fn wait_udp_bound(&self, pod: &Pod, port: u16, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let filter = format!("sport = :{port}");
        while self
            .exec_ok(&pod.netns, &["ss", "-Hlun", &filter])
            .trim()
            .is_empty()
        {
            assert!(
                Instant::now() < deadline,
                "{what} on {port} did not start in 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts a DNS server (UDP `port`) in `pod` that knows `records` (`(name, ipv4)`); waits
    /// until it is bound.
    pub fn start_dns_server(&self, pod: &Pod, port: u16, records: &[(&str, &str)]) -> u32 {
        let script = apps_dir().join("dns_server.py");
        let mut args = vec![
            "python3".to_owned(),
            script.display().to_string(),
            port.to_string(),
        ];
        args.extend(records.iter().map(|(name, ip)| format!("{name}={ip}")));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let pid = self.spawn(&pod.netns, &args);
        self.wait_udp_bound(pod, port, "the DNS server");
        pid
    }

    /// Starts the testkit's HTTP app in `pod`, answering `"<name> <port> <method> <path>"` on each
    /// port, and waits until every port listens.
    pub fn start_http_app(&self, pod: &Pod, name: &str, ports: &[u16]) -> u32 {
        let script = apps_dir().join("http_app.py");
        let mut args = vec![
            "python3".to_owned(),
            script.display().to_string(),
            name.to_owned(),
        ];
        args.extend(ports.iter().map(u16::to_string));
        let pid = self.spawn(
            &pod.netns,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        for port in ports {
            self.wait_listening(&pod.netns, *port);
        }
        pid
    }

    /// Sends `count` HTTP GETs from the client namespace, each on a new connection (or all on one
    /// keep-alive connection), and returns each answer's body (`ERROR …` for a failed request).
    pub fn http_requests(&self, url: &str, count: usize, keepalive: bool) -> Vec<String> {
        self.http_requests_in(&self.client, url, count, keepalive)
    }

    /// Like [`http_requests`](Self::http_requests), from another namespace (e.g. a pod talking to
    /// itself over loopback), each on a new connection.
    pub fn http_requests_from(&self, netns: &str, url: &str, count: usize) -> Vec<String> {
        self.http_requests_in(netns, url, count, false)
    }

    fn http_requests_in(
        &self,
        netns: &str,
        url: &str,
        count: usize,
        keepalive: bool,
    ) -> Vec<String> {
        let script = apps_dir().join("http_client.py");
        let count = count.to_string();
        let mut args = vec!["python3", script.to_str().unwrap(), url, &count];
        if keepalive {
            args.push("keepalive");
        }
        let output = self.exec(netns, &args);
        assert!(
            output.status.success(),
            "http client failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Starts a loop in `netns` sending a GET to `url` on a new connection every `interval`
    /// (each with a 3 s timeout), bounded: at most 2000 requests and 120 s.
    pub fn request_loop(&self, netns: &str, url: &str, interval: Duration) -> RequestLoop {
        let interval = format!("{}", interval.as_secs_f64());
        let mut child = piped_app(netns, "request_loop.py", &[url, &interval, "2000", "120"]);
        let stdout = child.stdout.take().unwrap();
        let (tx, answers) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Some((at, body)) = line.split_once(' ')
                    && let Ok(at) = at.parse()
                {
                    let _ = tx.send((at, body.to_owned()));
                }
            }
        });
        RequestLoop {
            child,
            answers,
            reader: Some(reader),
            seen: Vec::new(),
        }
    }

    /// Opens one keep-alive HTTP connection from `netns` to `url`, driven request by request.
    pub fn keepalive_client(&self, netns: &str, url: &str) -> KeepaliveClient {
        let mut child = piped_app(netns, "http_keepalive.py", &[url]);
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        KeepaliveClient { child, stdout }
    }

    /// Waits until something listens on TCP `port` in `netns` (polling `ss`, at most 10 s).
    pub fn wait_listening(&self, netns: &str, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let filter = format!("sport = :{port}");
        loop {
            let out = self.exec_ok(netns, &["ss", "-Hltn", &filter]);
            if !out.trim().is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nothing listens on port {port} in {netns} after 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A request loop in a namespace ([`Network::request_loop`]); stopped on drop.
#[derive(Debug)]
pub struct RequestLoop {
    child: Child,
    answers: std::sync::mpsc::Receiver<(u64, String)>,
    reader: Option<std::thread::JoinHandle<()>>,
    seen: Vec<(u64, String)>,
}

impl RequestLoop {
    /// Waits (at most `limit`) until an answer sent at or after `since_ms` (Unix epoch) satisfies
    /// `wanted`; returns it. Panics with every answer seen on timeout.
    pub fn wait_for(
        &mut self,
        since_ms: u64,
        limit: Duration,
        wanted: impl Fn(&str) -> bool,
    ) -> (u64, String) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(found) = self
                .seen
                .iter()
                .find(|(at, body)| *at >= since_ms && wanted(body))
            {
                return found.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.answers.recv_timeout(left) {
                Ok(answer) => self.seen.push(answer),
                Err(_) => panic!(
                    "no wanted answer within {limit:?}; answers:\n{}",
                    self.describe()
                ),
            }
        }
    }

    /// Waits (at most `limit`) for `count` answers to requests sent at or after `since_ms`;
    /// returns their bodies.
    pub fn answers_after(&mut self, since_ms: u64, count: usize, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        loop {
            let after: Vec<String> = self
                .seen
                .iter()
                .filter(|(at, _)| *at >= since_ms)
                .map(|(_, body)| body.clone())
                .collect();
            if after.len() >= count {
                return after;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.answers.recv_timeout(left) {
                Ok(answer) => self.seen.push(answer),
                Err(_) => panic!(
                    "{count} answers after {since_ms} not seen within {limit:?}; answers:\n{}",
                    self.describe()
                ),
            }
        }
    }

    /// Stops the loop; every answer: when it was sent (ms, Unix epoch) and its body.
    pub fn stop(mut self) -> Vec<(u64, String)> {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
        // Every line the loop printed has been read once its reader ends.
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        while let Ok(answer) = self.answers.try_recv() {
            self.seen.push(answer);
        }
        std::mem::take(&mut self.seen)
    }

    fn describe(&self) -> String {
        self.seen
            .iter()
            .map(|(at, body)| format!("{at} {body}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for RequestLoop {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One keep-alive HTTP connection in a namespace; killed on drop.
#[derive(Debug)]
pub struct KeepaliveClient {
    child: Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl KeepaliveClient {
    /// Sends `GET path` on the connection and returns the answer's body.
    pub fn get(&mut self, path: &str) -> String {
        use std::io::{BufRead as _, Write as _};
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{path}").expect("the keep-alive client is running");
        stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("an answer");
        line.trim().to_owned()
    }
}

impl Drop for KeepaliveClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for child in self
            .children
            .get_mut()
            .map(std::mem::take)
            .unwrap_or_default()
            .iter_mut()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        delete_namespaces(|name| name.starts_with(&format!("{}-", self.prefix)));
    }
}

/// Where the test apps (`link_load.py`, `http_app.py`, …) live.
/// Starts the testkit's python app `script` in `netns` with `args`, its stdin and stdout piped.
fn piped_app(netns: &str, script: &str, args: &[&str]) -> Child {
    let script = apps_dir().join(script);
    Command::new("ip")
        .args(["netns", "exec", netns, "python3"])
        .arg(&script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", script.display()))
}

pub fn apps_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src/apps"))
}

fn run(args: &[&str]) {
    let output = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        output.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Deletes namespaces whose name matches, killing what still runs in them.
fn delete_namespaces(matches: impl Fn(&str) -> bool) {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if matches(name) {
            let _ = Command::new("ip")
                .args(["netns", "pids", name])
                .output()
                .map(|o| {
                    for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                        let _ = Command::new("kill").args(["-9", pid]).status();
                    }
                });
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// Removes namespaces of test processes that no longer run (`tt-<pid>-…` with a dead pid).
pub fn sweep_leftovers() {
    delete_namespaces(|name| {
        let Some(rest) = name.strip_prefix("tt-") else {
            return false;
        };
        let pid = rest.split('-').next().unwrap_or_default();
        pid.parse()
            .is_ok_and(|pid| !tether_sys::process::alive(pid))
    });
}

/// A free TCP port for a local app, outside the kernel's ephemeral range (32768–60999), so an
/// outgoing connection (the proxy makes many) cannot take it between this check and the app's
/// `bind`. Checked by binding it.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher as _, RandomState};
    let mut seed = RandomState::new().hash_one(std::process::id());
    loop {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let port = 20_000 + (seed >> 33) as u16 % 10_000;
        if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
}

/// Waits (at most 10 s) until the process `pid()` names runs `sleep`: a pod process's setup is
/// done. Returns its pid.
fn wait_for_sleep(setup: &str, pid: impl Fn() -> Option<u32>) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(pid) = pid() {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmdline.starts_with(b"sleep\0") {
                return pid;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the pod process did not finish its setup in 10 s: {setup}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Adds pod number `n` (0–49) to the network whose namespaces start with `prefix`, after the
/// network was made: `<prefix>-<suffix>` at 10.213.0.(200 + n), on the same bridge, removed with
/// the network. For the cluster simulator's agent pods, which it creates on its own thread.
pub fn add_pod(prefix: &str, suffix: &str, n: u8) -> Pod {
    assert!(n < 50, "at most 50 pods can be added to a test network");
    let netns = format!("{prefix}-{suffix}");
    let node = format!("{prefix}-node");
    let ip = Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], EXTRA_FIRST_HOST + n);
    let node_side = format!("vx{n}");
    run(&["ip", "netns", "add", &netns]);
    let exec = |ns: &str, args: &[&str]| {
        let mut all = vec!["ip", "netns", "exec", ns];
        all.extend_from_slice(args);
        run(&all);
    };
    exec(
        &netns,
        &[
            "ip", "link", "add", "eth0", "type", "veth", "peer", "name", &node_side, "netns", &node,
        ],
    );
    exec(
        &node,
        &["ip", "link", "set", &node_side, "master", "br0", "up"],
    );
    exec(
        &netns,
        &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
    );
    exec(&netns, &["ip", "link", "set", "eth0", "up"]);
    exec(&netns, &["ip", "link", "set", "lo", "up"]);
    Pod { netns, ip }
}
