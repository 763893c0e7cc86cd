//! `tether-bench all`: every scenario with its baselines, interleaved, in one run (issue 10).
//! Writes the raw figures as JSON and the tables as Markdown, and replaces the generated part of
//! BENCHMARKS.md (between its `suite:begin`/`suite:end` markers).
//!
//! Scenarios: P1 steal latency (direct, a two-relay socat chain, tether whole-port and filtered
//! steal; with tether's tokio service as the apps, keep-alive and a new connection per request,
//! 1 and 64 connections; and in the issue's reference setup, `python3 -m http.server` as the
//! apps, a new connection per request, 16 connections), P2 steal
//! throughput (iperf3, 1 and 16 streams: direct, relay chain, tether), P3 mirror under load, P4
//! layer overhead, P5 `tether exec` start-up, P6 reconnect time after a link cut, and the
//! agent's and proxy's memory.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;
use tether_testkit::{Network, Pod};

use crate::http_steal::{Exec, Figures, app_command, load, median, steal, wrk};

mod report;

use self::report::{render, update_benchmarks};

/// How long and how often each measurement runs.
#[derive(Debug, Clone, Copy, Serialize)]
struct Sizes {
    rounds: usize,
    wrk_seconds: u32,
    iperf_seconds: u32,
    mirror_seconds: u32,
    layer_reps: usize,
    layer_iters: u32,
    startups: usize,
    cuts: usize,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                rounds: 1,
                wrk_seconds: 1,
                iperf_seconds: 1,
                mirror_seconds: 2,
                layer_reps: 3,
                layer_iters: 2_000,
                startups: 3,
                cuts: 5,
            }
        } else {
            Sizes {
                rounds: 3,
                wrk_seconds: 4,
                iperf_seconds: 4,
                mirror_seconds: 15,
                layer_reps: 31,
                layer_iters: 20_000,
                startups: 10,
                cuts: 100,
            }
        }
    }
}

/// A figure as median [min–max].
#[derive(Debug, Clone, Copy, Serialize)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(values: Vec<f64>) -> Spread {
        let (median, min, max) = median(values);
        Spread { median, min, max }
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let digits = if self.median >= 100.0 { 0 } else { 2 };
        write!(
            f,
            "{:.d$} [{:.d$}–{:.d$}]",
            self.median,
            self.min,
            self.max,
            d = digits
        )
    }
}

#[derive(Debug, Serialize)]
struct LatencyRow {
    /// The app on both sides (the pod's and the local one).
    app: &'static str,
    connection: &'static str,
    connections: u32,
    path: &'static str,
    p50_ms: Spread,
    p99_ms: Spread,
    requests_per_s: Spread,
    p50_ratio: f64,
    p99_ratio: f64,
    throughput_ratio: f64,
    /// The load client's errors over all rounds: wrk's socket errors (timeouts leave requests
    /// out of the latencies), ab's failed requests.
    socket_errors: u64,
}

#[derive(Debug, Serialize)]
struct ThroughputRow {
    streams: u32,
    path: &'static str,
    gbit_per_s: Spread,
    ratio: f64,
}

#[derive(Debug, Serialize)]
struct Mirror {
    seconds: u32,
    rounds: usize,
    requests_without: u64,
    requests_with: u64,
    requests_per_s_with: f64,
    seen_by_local_process: u64,
    share_seen: f64,
    in_flight_allowance: u64,
    p99_ms_without: f64,
    p99_ms_with: f64,
    p99_ratio: f64,
    agent_cpu_percent: f64,
    agent_peak_rss_mib: f64,
}

#[derive(Debug, Serialize)]
struct LayerRow {
    workload: &'static str,
    without_ns: Spread,
    with_ns: Spread,
    ratio: f64,
}

#[derive(Debug, Serialize)]
struct Startup {
    runs: usize,
    direct_ms: Spread,
    tether_ms: Spread,
}

#[derive(Debug, Default, Serialize)]
struct Memory {
    proxy_idle_mib: f64,
    agent_idle_mib: f64,
    proxy_peak_p1_mib: f64,
    agent_peak_p1_mib: f64,
    proxy_peak_p2_mib: f64,
    agent_peak_p2_mib: f64,
}

#[derive(Debug, Serialize)]
struct Results {
    date: String,
    machine: String,
    quick: bool,
    sizes: Sizes,
    p1_latency: Vec<LatencyRow>,
    p2_throughput: Vec<ThroughputRow>,
    p3_mirror: Mirror,
    p4_layer: Vec<LayerRow>,
    p5_startup: Startup,
    memory: Memory,
    p6_reconnect: Reconnect,
}

#[derive(Debug, Serialize)]
struct Reconnect {
    cuts: usize,
    /// From each cut to the first round trip completed after it, in ms.
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// The same gap between two round trips without a cut (the baseline), in ms.
    steady_p50_ms: f64,
    round_trips: usize,
}

pub(crate) fn run(quick: bool, out_dir: &Path, benchmarks: Option<&Path>) -> anyhow::Result<()> {
    if !tether_testkit::require_root("tether-bench all") {
        bail!("run it as root: it builds network namespaces");
    }
    for tool in ["wrk", "ab", "iperf3", "socat"] {
        if Command::new(tool).arg("-V").output().is_err() {
            bail!("{tool} is missing: scripts/install-deps installs it");
        }
    }
    let tether = crate::tether_binary()?;
    let sizes = Sizes::new(quick);
    let started = Instant::now();
    let mut memory = Memory::default();

    eprintln!("P4: layer overhead");
    let p4_layer = layer(sizes)?;
    // The second pod serves P1's reference setup (python apps).
    let net = Network::new(2);
    let pod = net.pod(0).clone();
    eprintln!("P5: exec start-up");
    let p5_startup = startup(&tether, &pod, sizes, &mut memory)?;
    eprintln!("P1: steal latency");
    let p1_latency = latency(
        &net,
        [&pod, &net.pod(1).clone()],
        &tether,
        sizes,
        &mut memory,
    )?;
    eprintln!("P2: steal throughput");
    let p2_throughput = throughput(&net, &pod, &tether, sizes, &mut memory)?;
    eprintln!("P3: mirror under load");
    let p3_mirror = mirror(&net, &pod, &tether, sizes)?;
    eprintln!("P6: reconnect after link cuts");
    let p6_reconnect = reconnect(&net, &pod, &tether, sizes)?;
    drop(net);

    let results = Results {
        date: command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        machine: machine(),
        quick,
        sizes,
        p1_latency,
        p2_throughput,
        p3_mirror,
        p4_layer,
        p5_startup,
        memory,
        p6_reconnect,
    };
    std::fs::create_dir_all(out_dir)?;
    let json = out_dir.join("bench-results.json");
    std::fs::write(&json, serde_json::to_string_pretty(&results)?)?;
    let markdown = render(&results, started.elapsed());
    std::fs::write(out_dir.join("suite.md"), &markdown)?;
    println!("{markdown}");
    eprintln!("raw figures: {}", json.display());
    if let Some(path) = benchmarks {
        update_benchmarks(path, &markdown)?;
        eprintln!("updated {}", path.display());
    }
    Ok(())
}

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let memory = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|m| m.trim().to_owned()))
        .unwrap_or_default();
    format!(
        "{cpus} CPUs ({model}), {memory} memory, Linux {}",
        command_output("uname", &["-r"])
    )
}

/// Resident memory (`VmRSS` or the peak `VmHWM`) of a process, in MiB.
fn rss_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The agent worker serving `pod`.
fn agent_worker(pod: &Pod) -> Option<u32> {
    let pattern = format!("agent --target netns/{} .*--worker-of", pod.netns);
    command_output("pgrep", &["-f", &pattern])
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// CPU seconds (user + system) a process used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    (ticks(11) + ticks(12)) / clock_ticks()
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`; 100 on Linux unless told otherwise).
fn clock_ticks() -> f64 {
    command_output("getconf", &["CLK_TCK"])
        .parse()
        .unwrap_or(100.0)
}

fn layer(sizes: Sizes) -> anyhow::Result<Vec<LayerRow>> {
    Ok(crate::layer_rows(sizes.layer_reps, sizes.layer_iters)?
        .into_iter()
        .map(|(workload, without, with)| {
            let (without, with) = (Spread::of(without), Spread::of(with));
            LayerRow {
                workload,
                ratio: with.median / without.median,
                without_ns: without,
                with_ns: with,
            }
        })
        .collect())
}

fn startup(tether: &Path, pod: &Pod, sizes: Sizes, memory: &mut Memory) -> anyhow::Result<Startup> {
    let time_to_line = |command: &mut Command| -> anyhow::Result<f64> {
        let start = Instant::now();
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("no stdout")?).read_line(&mut line)?;
        let elapsed = start.elapsed().as_secs_f64() * 1000.0;
        child.wait()?;
        anyhow::ensure!(line.trim() == "ready", "unexpected output {line:?}");
        Ok(elapsed)
    };
    let (mut direct, mut through) = (Vec::new(), Vec::new());
    for _ in 0..sizes.startups {
        direct.push(time_to_line(Command::new("/bin/echo").arg("ready"))?);
        through.push(time_to_line(
            Command::new(tether)
                .args([
                    "exec",
                    "--target",
                    &format!("netns/{}", pod.netns),
                    "--",
                    "/bin/echo",
                    "ready",
                ])
                .env_remove("TETHER_CONFIG"),
        )?);
    }
    // Idle memory: a session with nothing to do.
    let mut idle = Command::new(tether)
        .args([
            "exec",
            "--target",
            &format!("netns/{}", pod.netns),
            "--",
            "sleep",
            "30",
        ])
        .env_remove("TETHER_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(idle.stderr.take().context("no stderr")?).lines();
    for line in lines.by_ref() {
        if line?.contains("running sleep") {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    memory.proxy_idle_mib = rss_mib(idle.id(), "VmRSS:");
    memory.agent_idle_mib = agent_worker(pod).map_or(0.0, |pid| rss_mib(pid, "VmRSS:"));
    let _ = Command::new("kill")
        .args(["-TERM", &idle.id().to_string()])
        .status();
    let _ = idle.wait();
    Ok(Startup {
        runs: sizes.startups,
        direct_ms: Spread::of(direct),
        tether_ms: Spread::of(through),
    })
}

/// P1 on `pods[0]` with tether's tokio service as the apps, and on `pods[1]` with python's.
fn latency(
    net: &Network,
    pods: [&Pod; 2],
    tether: &Path,
    sizes: Sizes,
    memory: &mut Memory,
) -> anyhow::Result<Vec<LatencyRow>> {
    crate::http_steal::start_pod_paths(net, pods[0], tether, false);
    crate::http_steal::start_pod_paths(net, pods[1], tether, true);
    let paths = [
        "direct",
        "socat relay chain (2 hops)",
        "tether whole-port steal",
        "tether filtered steal",
    ];
    let mut rows = Vec::new();
    // (python, close, connections); the last is the issue's reference setup.
    let setups = [
        (false, false, 1),
        (false, false, 64),
        (false, true, 1),
        (false, true, 64),
        (true, true, 16),
    ];
    for (python, close, connections) in setups {
        let pod = pods[usize::from(python)];
        let url = |port: u16| format!("http://{}:{port}/", pod.ip);
        let mut runs: Vec<Vec<Figures>> = vec![Vec::new(); 4];
        for _ in 0..sizes.rounds {
            let seconds = sizes.wrk_seconds;
            runs[0].push(load(net, &url(80), seconds, connections, None, close)?);
            runs[1].push(load(net, &url(81), seconds, connections, None, close)?);
            for (i, filter) in [(2, None), (3, Some("^x-dev: bench$"))] {
                let steal = steal(tether, pod, filter, python)?;
                let header = filter.map(|_| "X-Dev: bench");
                runs[i].push(load(net, &url(80), seconds, connections, header, close)?);
                memory.proxy_peak_p1_mib = memory
                    .proxy_peak_p1_mib
                    .max(rss_mib(steal.0.id(), "VmHWM:"));
                if let Some(agent) = agent_worker(pod) {
                    memory.agent_peak_p1_mib =
                        memory.agent_peak_p1_mib.max(rss_mib(agent, "VmHWM:"));
                }
            }
        }
        let spreads: Vec<(Spread, Spread, Spread)> = runs
            .iter()
            .map(|r| {
                (
                    Spread::of(r.iter().map(|f| f.p50_ms).collect()),
                    Spread::of(r.iter().map(|f| f.p99_ms).collect()),
                    Spread::of(r.iter().map(|f| f.requests_per_s).collect()),
                )
            })
            .collect();
        let base = spreads[0];
        let errors: Vec<u64> = runs
            .iter()
            .map(|r| r.iter().map(|f| f.errors).sum())
            .collect();
        for ((path, (p50, p99, rps)), socket_errors) in paths.iter().zip(spreads).zip(errors) {
            rows.push(LatencyRow {
                app: if python { "python" } else { "tokio" },
                socket_errors,
                connection: if close {
                    "new per request"
                } else {
                    "keep-alive"
                },
                connections,
                path,
                p50_ratio: p50.median / base.0.median,
                p99_ratio: p99.median / base.1.median,
                throughput_ratio: rps.median / base.2.median,
                p50_ms: p50,
                p99_ms: p99,
                requests_per_s: rps,
            });
        }
    }
    Ok(rows)
}

/// iperf3's received rate in Gbit/s, from its JSON report.
fn iperf(net: &Network, pod: &Pod, port: u16, seconds: u32, streams: u32) -> anyhow::Result<f64> {
    let output = net.exec(
        net.client(),
        &[
            "iperf3",
            "-c",
            &pod.ip.to_string(),
            "-p",
            &port.to_string(),
            "-t",
            &seconds.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ],
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .with_context(|| format!("iperf3 said: {}", String::from_utf8_lossy(&output.stdout)))?;
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|bps| bps / 1e9)
        .with_context(|| format!("no rate in iperf3's report: {}", report["error"]))
}

fn throughput(
    net: &Network,
    pod: &Pod,
    tether: &Path,
    sizes: Sizes,
    memory: &mut Memory,
) -> anyhow::Result<Vec<ThroughputRow>> {
    net.spawn(&pod.netns, &["iperf3", "-s", "-p", "5201"]);
    net.spawn(
        &pod.netns,
        &[
            "socat",
            "TCP-LISTEN:5203,fork,reuseaddr",
            "TCP:127.0.0.1:5201",
        ],
    );
    net.spawn(
        &pod.netns,
        &[
            "socat",
            "TCP-LISTEN:5202,fork,reuseaddr",
            "TCP:127.0.0.1:5203",
        ],
    );
    for port in [5201, 5202, 5203] {
        net.wait_listening(&pod.netns, port);
    }
    let paths = [
        "direct",
        "socat relay chain (2 hops)",
        "tether whole-port steal",
    ];
    let mut rows = Vec::new();
    for streams in [1, 16] {
        let mut runs: Vec<Vec<f64>> = vec![Vec::new(); 3];
        for _ in 0..sizes.rounds {
            runs[0].push(iperf(net, pod, 5201, sizes.iperf_seconds, streams)?);
            runs[1].push(iperf(net, pod, 5202, sizes.iperf_seconds, streams)?);
            let local = tether_testkit::netns::free_port();
            let server = vec!["iperf3".into(), "-s".into(), "-p".into(), local.to_string()];
            let exec = Exec::start(tether, pod, "steal", (local, 5201), &[], &server)?;
            runs[2].push(iperf(net, pod, 5201, sizes.iperf_seconds, streams)?);
            memory.proxy_peak_p2_mib = memory.proxy_peak_p2_mib.max(rss_mib(exec.0.id(), "VmHWM:"));
            if let Some(agent) = agent_worker(pod) {
                memory.agent_peak_p2_mib = memory.agent_peak_p2_mib.max(rss_mib(agent, "VmHWM:"));
            }
        }
        let spreads: Vec<Spread> = runs.into_iter().map(Spread::of).collect();
        let base = spreads[0].median;
        for (path, spread) in paths.iter().zip(spreads) {
            rows.push(ThroughputRow {
                streams,
                path,
                ratio: spread.median / base,
                gbit_per_s: spread,
            });
        }
    }
    Ok(rows)
}

fn mirror(net: &Network, pod: &Pod, tether: &Path, sizes: Sizes) -> anyhow::Result<Mirror> {
    let url = format!("http://{}:80/", pod.ip);
    let seconds = sizes.mirror_seconds;
    let rounds = sizes.rounds.min(2);
    let (mut without, mut with) = (Vec::new(), Vec::new());
    let (mut seen, mut cpu, mut wall, mut agent_peak) = (0u64, 0.0, 0.0, 0.0f64);
    // Interleaved: without, with, without, with.
    for _ in 0..rounds {
        without.push(wrk(net, &url, seconds, 16, None, false)?);
        let dir = tempfile::tempdir()?;
        let count_file = dir.path().join("count");
        let local = tether_testkit::netns::free_port();
        let mut app = app_command(tether, "local", local, false);
        app.extend(["--count-file".into(), count_file.display().to_string()]);
        let exec = Exec::start(tether, pod, "mirror", (local, 80), &[], &app)?;
        let agent = agent_worker(pod).context("no agent worker")?;
        let (cpu_before, started) = (cpu_seconds(agent), Instant::now());
        with.push(wrk(net, &url, seconds, 16, None, false)?);
        // Copies arrive after the answers: wait until the count stops moving (bounded), and
        // count the agent's work until then.
        let read = || -> u64 {
            std::fs::read_to_string(&count_file)
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0)
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut count = read();
        loop {
            std::thread::sleep(Duration::from_millis(1000));
            let now = read();
            if now == count || Instant::now() > deadline {
                count = now;
                break;
            }
            count = now;
        }
        cpu += cpu_seconds(agent) - cpu_before;
        wall += started.elapsed().as_secs_f64();
        agent_peak = agent_peak.max(rss_mib(agent, "VmHWM:"));
        seen += count;
        drop(exec);
    }
    let requests: u64 = with.iter().map(|f| f.requests).sum();
    let p99 = |runs: &[Figures]| Spread::of(runs.iter().map(|f| f.p99_ms).collect()).median;
    let (p99_without, p99_with) = (p99(&without), p99(&with));
    Ok(Mirror {
        seconds,
        rounds,
        requests_without: without.iter().map(|f| f.requests).sum(),
        requests_with: requests,
        requests_per_s_with: Spread::of(with.iter().map(|f| f.requests_per_s).collect()).median,
        seen_by_local_process: seen,
        share_seen: seen as f64 / requests as f64,
        // wrk counts completed requests only: up to one per connection (16) may be in flight,
        // answered and copied, when it stops.
        in_flight_allowance: 16 * rounds as u64,
        p99_ms_without: p99_without,
        p99_ms_with: p99_with,
        p99_ratio: p99_with / p99_without,
        agent_cpu_percent: cpu / wall * 100.0,
        agent_peak_rss_mib: agent_peak,
    })
}

/// `tether-bench mirror`: P3 alone, with the suite's full sizes.
pub(crate) fn mirror_only() -> anyhow::Result<()> {
    if !tether_testkit::require_root("tether-bench mirror") {
        bail!("run it as root: it builds network namespaces");
    }
    let tether = crate::tether_binary()?;
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    crate::http_steal::start_pod_paths(&net, &pod, &tether, false);
    let result = mirror(&net, &pod, &tether, Sizes::new(false))?;
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(())
}

/// P6: the agent started on its own, the link through a `LinkCutter`, a stolen connection
/// carrying round trips back to back; each cut's time to the next completed round trip.
fn reconnect(net: &Network, pod: &Pod, tether: &Path, sizes: Sizes) -> anyhow::Result<Reconnect> {
    use tether_testkit::{agent::AgentProcess, cutter::LinkCutter};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let agent = AgentProcess::start_tether(tether, &format!("netns/{}", pod.netns), &[]);
    let cutter = runtime.block_on(LinkCutter::start(agent.addr));
    let script = tether_testkit::netns::apps_dir().join("link_load.py");
    let (local, remote) = (
        tether_testkit::netns::free_port(),
        tether_testkit::netns::free_port(),
    );
    let addr = cutter.addr().to_string();
    let token = agent.token_file().display().to_string();
    let exec = Exec::start_with(
        tether,
        pod,
        &["--agent-addr", &addr, "--agent-token-file", &token],
        "steal",
        (local, remote),
        &[],
        &[
            "python3".to_owned(),
            script.display().to_string(),
            "echo".to_owned(),
            local.to_string(),
        ],
    )?;
    let dir = tempfile::tempdir()?;
    let (out, stop) = (dir.path().join("times"), dir.path().join("stop"));
    let mut client = Command::new("ip")
        .args(["netns", "exec", net.client(), "python3"])
        .arg(&script)
        .arg("pingpong")
        .arg(pod.ip.to_string())
        .arg(remote.to_string())
        .arg(&out)
        .arg(&stop)
        .stdout(Stdio::null())
        .spawn()?;
    let monotonic = || -> anyhow::Result<f64> {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
        Ok(now.tv_sec() as f64 + now.tv_nsec() as f64 / 1e9)
    };
    let mut cut_times = Vec::new();
    for _ in 0..sizes.cuts {
        // Steady traffic first, then the cut, then wait for the new link (bounded).
        std::thread::sleep(Duration::from_millis(200));
        let links = cutter.connections();
        cut_times.push(monotonic()?);
        anyhow::ensure!(cutter.cut() > 0, "no link to cut");
        let deadline = Instant::now() + Duration::from_secs(30);
        while cutter.connections() <= links {
            anyhow::ensure!(
                Instant::now() < deadline,
                "tether did not reconnect in 30 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(&stop, "")?;
    let status = client.wait()?;
    anyhow::ensure!(status.success(), "the round-trip client failed");
    drop(exec);
    drop(cutter);
    drop(agent);
    let times: Vec<f64> = std::fs::read_to_string(&out)?
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
    anyhow::ensure!(times.len() > 1, "no round trips were timed");
    let mut gaps: Vec<f64> = cut_times
        .iter()
        .filter_map(|cut| times.iter().find(|t| *t > cut).map(|t| (t - cut) * 1000.0))
        .collect();
    anyhow::ensure!(
        gaps.len() == cut_times.len(),
        "traffic did not resume after every cut"
    );
    let mut steady: Vec<f64> = times.windows(2).map(|w| (w[1] - w[0]) * 1000.0).collect();
    gaps.sort_by(f64::total_cmp);
    steady.sort_by(f64::total_cmp);
    let pick = |sorted: &[f64], q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
    Ok(Reconnect {
        cuts: gaps.len(),
        p50_ms: pick(&gaps, 0.5),
        p99_ms: pick(&gaps, 0.99),
        max_ms: pick(&gaps, 1.0),
        steady_p50_ms: pick(&steady, 0.5),
        round_trips: times.len(),
    })
}

/// Where the suite writes by default: the repository's BENCHMARKS.md for a full run, nothing for
/// `--quick` (CI checks the suite works, not the numbers).
pub(crate) fn default_benchmarks(quick: bool) -> Option<PathBuf> {
    (!quick).then(|| PathBuf::from("BENCHMARKS.md"))
}
