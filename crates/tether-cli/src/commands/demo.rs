//! `tether demo`: the newcomer's first taste, no cluster needed.
//!
//! Builds a throw-away "pod" (a network namespace running tether's built-in HTTP service), a
//! client namespace, and a bridge between them; sends requests before, during and after a
//! `tether exec --steal` of a local built-in service; shows who answered; removes everything.
//!
//! Network safety as in the tests: the demo range 10.213.250.0/24 lives only on the demo's own
//! bridge, the namespaces have no default route, 10.213.0.0/16 is blackholed in the root
//! namespace, and every name carries `tether-demo-<pid>`.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tether_agent::netns::Netns;

use crate::ui::Ui;

const POD_IP: &str = "10.213.250.10";
const CLIENT_IP: &str = "10.213.250.100";
const POD_PORT: u16 = 80;

/// The demo's namespaces and processes; removed on drop, also after an error or Ctrl-C.
struct Demo {
    prefix: String,
    children: Vec<Child>,
}

impl Demo {
    fn name(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        for child in &mut self.children {
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for role in ["client", "pod", "node"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name(role)])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (install iproute2)")?;
    if !output.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

pub(crate) fn run(ui: Ui) -> anyhow::Result<i32> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "tether demo creates network namespaces and redirect rules: run it as root (sudo tether demo)"
        );
    }
    check_prerequisites(ui)?;
    let exe = std::env::current_exe()?;
    let mut demo = Demo {
        prefix: format!("tether-demo-{}", std::process::id()),
        children: Vec::new(),
    };
    // Stop cleanly on Ctrl-C: the handler only asks; `Demo`'s drop does the removing.
    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
    ] {
        let flag = std::sync::Arc::clone(&interrupted);
        let _ = signal_hook_flag(signal, flag);
    }

    if !ui.is_json() {
        println!(
            "tether demo: a local \"pod\" with a web service, and your own process stealing its traffic.\n"
        );
    }
    let step = ui.step("creating the demo pod and client (network namespaces)");
    build_topology(&demo)?;
    let pod = demo.name("pod");
    demo.children.push(spawn_in(
        &pod,
        &exe,
        &[
            "serve-http",
            "--name",
            "the pod",
            "--port",
            &POD_PORT.to_string(),
        ],
    )?);
    let client = Netns::resolve(&format!("netns/{}", demo.name("client")))?;
    wait_answering(&client)?;
    step.done(&format!("pod {POD_IP}:{POD_PORT}, client {CLIENT_IP}"));

    let runtime = tokio::runtime::Runtime::new()?;
    let get = |path: &str, dev: bool| runtime.block_on(request(&client, path, dev));
    show(ui, "before tether", &get("/hello", true)?);

    let step = ui.step(
        "tether exec --steal, filtered: a local process takes the requests marked `X-Dev: you`",
    );
    let local_port = free_port()?;
    let mut exec = Command::new(&exe)
        .args(["exec", "--target", &format!("netns/{pod}"), "--steal", "--"])
        .arg(&exe)
        .args([
            "serve-http",
            "--name",
            "your local process",
            "--port",
            &local_port.to_string(),
        ])
        .env(
            "TETHER_FEATURE__NETWORK__INCOMING__PORT_MAPPING",
            format!("[[{local_port}, {POD_PORT}]]"),
        )
        .env(
            "TETHER_FEATURE__NETWORK__INCOMING__HTTP_FILTER__HEADER_FILTER",
            "^X-Dev: you$",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = exec.stderr.take().context("no stderr")?;
    demo.children.push(exec);
    if let Err(error) = wait_for_steal(stderr) {
        step.fail("");
        return Err(error);
    }
    step.done(&format!(
        "local port {local_port} now gets the pod's port {POD_PORT} requests marked X-Dev: you"
    ));
    let mut misrouted = Vec::new();
    for (path, dev) in [
        ("/hello", true),
        ("/hello", false),
        ("/orders/42", true),
        ("/health", false),
    ] {
        if interrupted.load(std::sync::atomic::Ordering::Relaxed) {
            bail!("interrupted");
        }
        let answer = get(path, dev)?;
        let when = if dev { "X-Dev: you" } else { "no header" };
        show(ui, when, &answer);
        if answer.starts_with("your local process") != dev {
            misrouted.push(format!("{when} GET {path}"));
        }
    }
    // The demo's whole point: a steal that did not happen is a failure, never a quiet ✓.
    if !misrouted.is_empty() {
        bail!(
            "the steal did not route as configured ({}); run `tether exec --target netns/NAME --steal -v -- …` to see why, \
             or `tether doctor` to check this machine",
            misrouted.join(", ")
        );
    }

    let step = ui.step("stopping tether exec");
    if let Some(exec) = demo.children.last_mut() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(exec.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = exec.wait();
    }
    demo.children.pop();
    step.done("its rules are gone");
    show(ui, "after tether", &get("/hello", true)?);

    let step = ui.step("removing the demo namespaces");
    drop(demo);
    step.done("");
    if !ui.is_json() {
        println!(
            "\nNext: `tether exec --target netns/NAME --steal -- <your app>` against a namespace of yours,"
        );
        println!("or `tether exec --help` for everything else.");
    }
    Ok(0)
}

fn build_topology(demo: &Demo) -> anyhow::Result<()> {
    ip(&["route", "replace", "blackhole", "10.213.0.0/16"])?;
    let node = demo.name("node");
    ip(&["netns", "add", &node])?;
    ip(&["-n", &node, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", &node, "link", "set", "br0", "up"])?;
    for (role, address, peer) in [("pod", POD_IP, "vpod"), ("client", CLIENT_IP, "vclient")] {
        let netns = demo.name(role);
        ip(&["netns", "add", &netns])?;
        ip(&[
            "-n", &netns, "link", "add", "eth0", "type", "veth", "peer", "name", peer, "netns",
            &node,
        ])?;
        ip(&["-n", &node, "link", "set", peer, "master", "br0", "up"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
    }
    Ok(())
}

fn spawn_in(netns: &str, exe: &std::path::Path, args: &[&str]) -> anyhow::Result<Child> {
    Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start the pod's service")
}

/// Waits (at most 10 s) until the pod answers from the client namespace.
fn wait_answering(client: &Netns) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let last = match runtime.block_on(request(client, "/ready", false)) {
            Ok(_) => return Ok(()),
            Err(error) => error,
        };
        if Instant::now() > deadline {
            bail!("the demo pod's service did not answer within 10 s (last attempt: {last:#})");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (at most 20 s) until `tether exec` says the pod's port is stolen; fails with what it said
/// if it cannot steal it (a missing tool, say) or stops first.
fn wait_for_steal(stderr: std::process::ChildStderr) -> anyhow::Result<()> {
    use std::io::BufRead as _;
    let stolen = format!("target port {POD_PORT} →");
    let refused = format!("target port {POD_PORT}:");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut said = Vec::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains(&stolen) {
                let _ = tx.send(Ok(()));
            } else if line.contains(&refused) {
                let _ = tx.send(Err(line.clone()));
            }
            said.push(line);
        }
        let _ = tx.send(Err(said.join("\n")));
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(said)) => bail!("tether exec could not steal the pod's port:\n{said}"),
        Err(_) => bail!("tether exec did not take the port within 20 s"),
    }
}

/// What the demo needs on this machine, checked before anything is built: each missing piece is
/// named with the package that brings it.
fn check_prerequisites(ui: Ui) -> anyhow::Result<()> {
    use tether_agent::rules::{self, Backend};
    let mut missing = Vec::new();
    for (program, package) in [("ip", "iproute2"), ("nsenter", "util-linux")] {
        if !rules::on_path(program) {
            missing.push(format!("`{program}` (apt-get install {package})"));
        }
    }
    match (rules::installed(Backend::Nft), rules::installed(Backend::Legacy)) {
        (true, _) => {}
        (false, true) => ui.warn(
            "`nft` is not installed: the demo redirects with iptables-legacy instead (apt-get install nftables for the default backend)",
        ),
        (false, false) => missing.push(
            "`nft` to redirect the pod's traffic (apt-get install nftables; or iptables, for the iptables-legacy backend)"
                .into(),
        ),
    }
    if !missing.is_empty() {
        bail!(
            "tether demo cannot run on this machine; it needs {}",
            missing.join(", and ")
        );
    }
    Ok(())
}

/// One HTTP GET to the pod, from inside the client namespace.
async fn request(client: &Netns, path: &str, dev: bool) -> anyhow::Result<String> {
    let path = path.to_owned();
    let mark = if dev { "X-Dev: you\r\n" } else { "" };
    let answer = client
        .run_in(move || {
            let addr: SocketAddr = format!("{POD_IP}:{POD_PORT}")
                .parse()
                .expect("valid address");
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            stream.set_read_timeout(Some(Duration::from_secs(3)))?;
            write!(
                stream,
                "GET {path} HTTP/1.1\r\nHost: {POD_IP}\r\n{mark}Connection: close\r\n\r\n"
            )?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })
        .await?;
    let body = answer
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .trim()
        .to_owned();
    Ok(body)
}

fn show(ui: Ui, when: &str, body: &str) {
    // The built-in service answers "NAME PORT METHOD PATH from PEER".
    let (head, peer) = body.rsplit_once(" from ").unwrap_or((body, "?"));
    let mut fields = head.rsplitn(4, ' ');
    let (path, _method, _port, who) = (fields.next(), fields.next(), fields.next(), fields.next());
    let (path, who) = (path.unwrap_or("?"), who.unwrap_or(head));
    if ui.is_json() {
        crate::ui::emit(
            serde_json::json!({ "event": "request", "when": when, "path": path, "answered_by": who, "peer": peer }),
        );
    } else {
        println!("  {when:<14} GET {path:<11} → answered by {who} (it saw the client as {peer})");
    }
}

/// A free port for the local service, outside the ephemeral range (32768–60999) so no outgoing
/// connection takes it between this check and the service's `bind`.
fn free_port() -> anyhow::Result<u16> {
    (20_000..30_000)
        .map(|offset| 20_000 + (offset * 7919 + std::process::id() as usize) % 10_000)
        .find(|&port| std::net::TcpListener::bind(("0.0.0.0", port as u16)).is_ok())
        .map(|port| port as u16)
        .context("no free port between 20000 and 30000")
}

/// Sets `flag` when `signal` arrives (no handler code runs in signal context).
fn signal_hook_flag(
    signal: nix::sys::signal::Signal,
    flag: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        runtime.block_on(async move {
            let kind = tokio::signal::unix::SignalKind::from_raw(signal as i32);
            if let Ok(mut stream) = tokio::signal::unix::signal(kind) {
                stream.recv().await;
                flag.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        });
    });
    Ok(())
}
