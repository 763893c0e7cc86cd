//! `tether-bench`: benchmarks with their baselines, run side by side (interleaved A B A B so
//! machine noise hits both), reported as medians with min/max and a ratio to the baseline.
//!
//! Scenarios so far: `layer-overhead` (P4: the preloaded layer on calls it passes through).

use std::{
    fs::File,
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};

mod fs_remote;
mod http_steal;
mod suite;
mod supervisor;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "tether-bench",
    about = "tether's benchmarks, each with its baseline in the same run"
)]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// P4: time of open+close of a local file and of a loopback connect+close, with the layer
    /// preloaded (active, nothing redirected) vs without it.
    LayerOverhead {
        /// Repetitions of each variant (interleaved).
        #[arg(long, default_value_t = 31)]
        reps: usize,
        /// Calls per repetition.
        #[arg(long, default_value_t = 20_000)]
        iters: u32,
    },
    /// Issue 5: HTTP request latency (p50/p99) and throughput through (a) the pod's app directly,
    /// (b) a two-relay socat chain in the pod, (c) a tether whole-port steal, (d) a tether
    /// header-filtered steal, from a client namespace: wrk for keep-alive, ab (which times the
    /// connect too) for a new connection per request. Needs root.
    HttpSteal {
        /// Interleaved rounds (a b c d, a b c d, …).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Seconds per load run.
        #[arg(long, default_value_t = 4)]
        seconds: u32,
        /// Concurrent connections.
        #[arg(long, default_value_t = 16)]
        connections: u32,
        /// The app on both sides: tether's built-in tokio service, or `python3 -m http.server`
        /// (the setup the reference figures used).
        #[arg(long, default_value = "tokio", value_parser = ["tokio", "python"])]
        app: String,
        /// A new connection per request (`Connection: close`) instead of keep-alive.
        #[arg(long)]
        close: bool,
        /// The load client: wrk for keep-alive and ab for a new connection per request by default
        /// (ab times the connect too; wrk starts its clock after it).
        #[arg(long, value_parser = ["wrk", "ab"])]
        client: Option<String>,
        /// Instead of the rounds: N runs back to back against the pod's app, then N against
        /// one whole-port steal, each run's figures printed (shows whether a long stream of
        /// connections wears something down, e.g. ephemeral ports).
        #[arg(long, value_name = "N")]
        back_to_back: Option<usize>,
    },
    /// Issue 6: python3 reading a 100 MB file line by line and stat-ing a small file 10,000
    /// times, in the target through `tether exec` vs on a local copy. Needs root.
    FsRemote {
        /// Interleaved rounds (local, remote, local, remote, …).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Size of the big file.
        #[arg(long, default_value_t = 100)]
        megabytes: u64,
    },
    /// P3 alone (mirror under load, the suite's full sizes), printed as JSON: for profiling it
    /// (e.g. under `perf record -a`). Needs root.
    Mirror,
    /// Issue 10: every scenario (P1 steal latency, P2 throughput, P3 mirror under load, P4 layer
    /// overhead, P5 start-up, P6 reconnect time, memory) with its baselines in one run; writes the raw figures as
    /// JSON and the tables into BENCHMARKS.md. Needs root; about 10 minutes (`--quick`: under 2,
    /// for CI, and BENCHMARKS.md is left alone).
    All {
        /// Short runs that check the suite works, not the numbers.
        #[arg(long)]
        quick: bool,
        /// Where bench-results.json and suite.md go.
        #[arg(long, default_value = "target/bench")]
        out_dir: PathBuf,
        /// The BENCHMARKS.md whose generated section is replaced (default: ./BENCHMARKS.md for a
        /// full run, none with --quick).
        #[arg(long)]
        benchmarks: Option<PathBuf>,
    },
    /// One timed loop of a workload (run by `layer-overhead`, with and without the layer).
    #[command(hide = true)]
    /// Issue 26: the syscall supervisor's cost per trapped and untrapped call (vs none and the
    /// preloaded library), then steal latency into a tokio app (library, supervisor) and a Go
    /// app (supervisor) against the pod's app directly. Needs root and Go (golang-go).
    Supervisor {
        /// Repetitions of each per-call variant (interleaved).
        #[arg(long, default_value_t = 15)]
        reps: usize,
        /// Calls per repetition.
        #[arg(long, default_value_t = 20_000)]
        iters: u32,
        /// Interleaved rounds of the latency runs.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Seconds per latency run.
        #[arg(long, default_value_t = 4)]
        seconds: u32,
        /// Concurrent connections of the latency runs.
        #[arg(long, default_value_t = 1)]
        connections: u32,
        /// A new connection per request (ab) instead of keep-alive (wrk).
        #[arg(long)]
        close: bool,
    },
    Workload {
        #[arg(long)]
        kind: String,
        #[arg(long)]
        iters: u32,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Bench::LayerOverhead { reps, iters } => layer_overhead(reps, iters),
        Bench::HttpSteal {
            rounds,
            seconds,
            connections,
            app,
            close,
            client,
            back_to_back,
        } => {
            let (python, client) = (
                app == "python",
                http_steal::Client::pick(client.as_deref(), close),
            );
            match back_to_back {
                Some(runs) => http_steal::back_to_back(runs, seconds, connections, python, client),
                None => http_steal::run(rounds, seconds, connections, python, client),
            }
        }
        Bench::FsRemote { rounds, megabytes } => fs_remote::run(rounds, megabytes),
        Bench::Mirror => suite::mirror_only(),
        Bench::All {
            quick,
            out_dir,
            benchmarks,
        } => suite::run(
            quick,
            &out_dir,
            benchmarks
                .or_else(|| suite::default_benchmarks(quick))
                .as_deref(),
        ),
        Bench::Supervisor {
            reps,
            iters,
            rounds,
            seconds,
            connections,
            close,
        } => {
            supervisor::print_calls(supervisor::call_rows(reps, iters)?);
            println!();
            let client = http_steal::Client::pick(None, close);
            let results = supervisor::steal_latency(rounds, seconds, connections, client)?;
            supervisor::print_latency(&results, client, connections, seconds);
            Ok(())
        }
        Bench::Workload { kind, iters } => {
            println!("{}", workload(&kind, iters)?);
            Ok(())
        }
    }
}

/// Nanoseconds per iteration of the workload.
fn workload(kind: &str, iters: u32) -> anyhow::Result<f64> {
    let started;
    match kind {
        "file" => {
            let path = std::env::temp_dir().join(format!("tether-bench-{}", std::process::id()));
            std::fs::write(&path, b"x")?;
            started = Instant::now();
            for _ in 0..iters {
                drop(File::open(&path)?);
            }
            let elapsed = started.elapsed();
            std::fs::remove_file(&path)?;
            return Ok(elapsed.as_nanos() as f64 / f64::from(iters));
        }
        "getppid" => {
            started = Instant::now();
            for _ in 0..iters {
                std::hint::black_box(nix::unistd::getppid());
            }
        }
        "connect" => {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let addr = listener.local_addr()?;
            started = Instant::now();
            for _ in 0..iters {
                let stream = TcpStream::connect(addr)?;
                drop(listener.accept()?);
                drop(stream);
            }
        }
        other => bail!("unknown workload {other}"),
    }
    Ok(started.elapsed().as_nanos() as f64 / f64::from(iters))
}

/// The release `tether` next to this benchmark binary.
pub(crate) fn tether_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let tether = exe.parent().context("no directory")?.join("tether");
    if !tether.is_file() {
        bail!(
            "{} is missing: cargo build --release -p tether -p tether-layer -p tether-bench",
            tether.display()
        );
    }
    Ok(tether)
}

pub(crate) fn layer_path() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("no directory")?;
    [dir.join("libtether_layer.so"), dir.join("deps/libtether_layer.so")]
        .into_iter()
        .find(|p| p.is_file())
        .context("libtether_layer.so is not built next to tether-bench (cargo build --release -p tether-layer -p tether-bench)")
}

/// A stand-in for the local proxy that keeps every listener local (as the real one does for
/// loopback listeners) and hands out the default policy, under which the workloads' local files
/// and loopback connections stay local: the layer is active and decides, nothing is redirected.
pub(crate) fn stand_in_proxy() -> anyhow::Result<PathBuf> {
    use std::io::{BufRead as _, BufReader, Write as _};
    let path = std::env::temp_dir().join(format!("tether-bench-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path)?;
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut writer = stream.try_clone().expect("clone");
                for request in BufReader::new(stream).lines().map_while(Result::ok) {
                    let answer = if request.contains("\"policy\"") {
                        policy_answer()
                    } else {
                        "{\"answer\":\"local\",\"reason\":\"benchmark\"}\n".to_owned()
                    };
                    let _ = writer.write_all(answer.as_bytes());
                }
            });
        }
    });
    Ok(path)
}

/// The policy `tether exec` hands out with a default configuration.
fn policy_answer() -> String {
    let spec = tether_intercept::channel::PolicySpec {
        fs_mode: tether_intercept::channel::FsMode::Read,
        outgoing_tcp: true,
        outgoing_udp: true,
        outgoing_ignore_localhost: true,
        dns_enabled: true,
        ..Default::default()
    };
    let answer = tether_intercept::channel::Answer::Policy(spec);
    String::from_utf8(answer.encode(&[])).expect("JSON is UTF-8")
}

pub(crate) fn run_once(
    kind: &str,
    iters: u32,
    layer: Option<(&PathBuf, &PathBuf)>,
) -> anyhow::Result<f64> {
    let mut command = Command::new(std::env::current_exe()?);
    command.args(["workload", "--kind", kind, "--iters", &iters.to_string()]);
    command
        .env_remove("LD_PRELOAD")
        .env_remove(tether_intercept::channel::SOCKET_ENV);
    if let Some((layer, socket)) = layer {
        command
            .env("LD_PRELOAD", layer)
            .env(tether_intercept::channel::SOCKET_ENV, socket);
    }
    let output = command.output()?;
    if !output.status.success() {
        bail!(
            "workload failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?.trim().parse()?)
}

pub(crate) struct Stats {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

pub(crate) fn stats(mut values: Vec<f64>) -> Stats {
    values.sort_by(f64::total_cmp);
    Stats {
        median: values[values.len() / 2],
        min: values[0],
        max: values[values.len() - 1],
    }
}

/// One P4 workload: its label, and ns/op without and with the layer, one value per repetition.
pub(crate) type LayerRow = (&'static str, Vec<f64>, Vec<f64>);

/// P4's measurements.
pub(crate) fn layer_rows(reps: usize, iters: u32) -> anyhow::Result<Vec<LayerRow>> {
    let layer = layer_path()?;
    let socket = stand_in_proxy()?;
    let with_layer = Some((&layer, &socket));
    let mut rows = Vec::new();
    for (kind, label) in [
        ("file", "open + close of a local file"),
        ("connect", "loopback connect + accept + close"),
    ] {
        let (mut base, mut with) = (Vec::new(), Vec::new());
        // Warm-up, then interleave: A B A B …
        run_once(kind, iters, None)?;
        run_once(kind, iters, with_layer)?;
        for _ in 0..reps {
            base.push(run_once(kind, iters, None)?);
            with.push(run_once(kind, iters, with_layer)?);
        }
        rows.push((label, base, with));
    }
    Ok(rows)
}

fn layer_overhead(reps: usize, iters: u32) -> anyhow::Result<()> {
    println!(
        "| workload | without layer (ns/op, median [min–max]) | with layer (ns/op, median [min–max]) | ratio (goal ≤ 1.05) |"
    );
    println!("|---|---|---|---|");
    for (label, base, with) in layer_rows(reps, iters)? {
        let (b, w) = (stats(base), stats(with));
        println!(
            "| {label} | {:.0} [{:.0}–{:.0}] | {:.0} [{:.0}–{:.0}] | {:.3} |",
            b.median,
            b.min,
            b.max,
            w.median,
            w.min,
            w.max,
            w.median / b.median
        );
    }
    Ok(())
}
