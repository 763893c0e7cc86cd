//! Issue 26's benchmarks: what the syscall supervisor costs.
//!
//! - Per call: a tight loop of an untrapped call (`getppid`), of open + close of a local file
//!   (`openat` trapped, answered "run as made") and of a loopback connect + accept + close
//!   (`connect` and `accept4` trapped), without interception, with the preloaded library, and
//!   under the supervisor (the policy `tether exec` hands out by default; nothing redirected).
//! - Steal latency: the pod's app directly; a whole-port steal into tether's tokio service with
//!   the library; the same service under the supervisor; a Go server under the supervisor. The
//!   stolen bytes flow on real sockets in every case, so the supervisor's cost is per connection
//!   (`accept`), not per byte.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::{
    http_steal::{Client, Exec, Figures, app_command, median},
    stats,
};

/// Nanoseconds per iteration of `kind`, the workload run under the supervisor.
fn supervised_once(
    supervisor: &tether_supervisor::Supervisor,
    kind: &str,
    iters: u32,
) -> anyhow::Result<f64> {
    let (mut ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let taking = std::thread::spawn(move || tether_supervisor::Listener::take(&mut ours, None));
    let mut command = Command::new(std::env::current_exe()?);
    command
        .args(["workload", "--kind", kind, "--iters", &iters.to_string()])
        .env_remove("LD_PRELOAD")
        .stdout(std::process::Stdio::piped());
    tether_sys::seccomp::install_before_exec(
        &mut command,
        tether_supervisor::filter(),
        theirs.into(),
    );
    let child = command.spawn();
    drop(command);
    let listener = taking
        .join()
        .map_err(|_| anyhow::anyhow!("the thread taking the listener panicked"))??;
    let served = supervisor.serve(listener);
    let output = child?.wait_with_output()?;
    let _ = served.join();
    if !output.status.success() {
        bail!("supervised workload failed");
    }
    Ok(String::from_utf8(output.stdout)?.trim().parse()?)
}

/// One workload: label, and ns/op without, with the library, under the supervisor.
pub(crate) type CallRow = (&'static str, Vec<f64>, Vec<f64>, Vec<f64>);

/// The per-call costs, interleaved (none, library, supervisor) `reps` times after a warm-up.
pub(crate) fn call_rows(reps: usize, iters: u32) -> anyhow::Result<Vec<CallRow>> {
    let layer = crate::layer_path()?;
    let socket = crate::stand_in_proxy()?;
    let scratch = tempfile::tempdir()?;
    let supervisor = tether_supervisor::Supervisor::start(
        tether_supervisor::Setup {
            socket: socket.clone(),
            scratch: scratch.path().to_path_buf(),
            places: tether_intercept::policy::LocalPlaces::current(),
        },
        |message| eprintln!("supervisor: {message}"),
    )?;
    let with_layer = Some((&layer, &socket));
    let mut rows = Vec::new();
    for (kind, label) in [
        ("getppid", "getppid (never trapped)"),
        ("file", "open + close of a local file (openat trapped)"),
        (
            "connect",
            "loopback connect + accept + close (connect, accept4 trapped)",
        ),
    ] {
        let (mut none, mut library, mut supervised) = (Vec::new(), Vec::new(), Vec::new());
        crate::run_once(kind, iters, None)?;
        crate::run_once(kind, iters, with_layer)?;
        supervised_once(&supervisor, kind, iters)?;
        for _ in 0..reps {
            none.push(crate::run_once(kind, iters, None)?);
            library.push(crate::run_once(kind, iters, with_layer)?);
            supervised.push(supervised_once(&supervisor, kind, iters)?);
        }
        rows.push((label, none, library, supervised));
    }
    Ok(rows)
}

pub(crate) fn print_calls(rows: Vec<CallRow>) {
    println!(
        "| workload | none (ns/op) | preloaded library (ns/op) | supervisor (ns/op) | supervisor − none (µs/op) |"
    );
    println!("|---|---|---|---|---|");
    for (label, none, library, supervised) in rows {
        let (n, l, s) = (stats(none), stats(library), stats(supervised));
        println!(
            "| {label} | {:.0} [{:.0}–{:.0}] | {:.0} [{:.0}–{:.0}] | {:.0} [{:.0}–{:.0}] | {:.2} |",
            n.median,
            n.min,
            n.max,
            l.median,
            l.min,
            l.max,
            s.median,
            s.min,
            s.max,
            (s.median - n.median) / 1000.0
        );
    }
}

/// The Go server (`tether-testkit`'s), built once.
fn go_server() -> PathBuf {
    tether_testkit::go::go_app(tether_testkit::go::GoBuild::Static).to_path_buf()
}

/// Steal latency through each interception, `rounds` interleaved rounds.
pub(crate) fn steal_latency(
    rounds: usize,
    seconds: u32,
    connections: u32,
    client: Client,
) -> anyhow::Result<Vec<(&'static str, Vec<Figures>)>> {
    if !tether_testkit::require_root("tether-bench supervisor") {
        bail!("run it as root: it builds network namespaces");
    }
    let tether = crate::tether_binary()?;
    let net = tether_testkit::Network::new(1);
    let pod = net.pod(0).clone();
    crate::http_steal::start_pod_paths(&net, &pod, &tether, false);
    let go = go_server();
    let url = format!("http://{}:80/", pod.ip);
    let paths: [&'static str; 4] = [
        "(a) direct to the pod's app (tokio)",
        "(b) steal → tokio app, preloaded library",
        "(c) steal → tokio app, syscall supervisor",
        "(d) steal → Go app, syscall supervisor",
    ];
    let mut results: Vec<(&'static str, Vec<Figures>)> =
        paths.iter().map(|p| (*p, Vec::new())).collect();
    for round in 0..rounds {
        eprintln!("round {} of {rounds}", round + 1);
        results[0]
            .1
            .push(client.run(&net, &url, seconds, connections, None)?);
        for (i, how) in [(1, "preload"), (2, "syscall"), (3, "auto")] {
            let port = tether_testkit::netns::free_port();
            let app = if i == 3 {
                vec![
                    go.display().to_string(),
                    "serve".into(),
                    "local".into(),
                    port.to_string(),
                ]
            } else {
                app_command(&tether, "local", port, false)
            };
            let _steal = Exec::start_with(
                &tether,
                &pod,
                &["--interception", how],
                "steal",
                (port, 80),
                &[],
                &app,
            )
            .with_context(|| format!("path {}", paths[i]))?;
            results[i]
                .1
                .push(client.run(&net, &url, seconds, connections, None)?);
        }
    }
    Ok(results)
}

pub(crate) fn print_latency(
    results: &[(&'static str, Vec<Figures>)],
    client: Client,
    connections: u32,
    seconds: u32,
) {
    println!(
        "{}; medians [min–max] of the rounds\n",
        client.describe(connections, seconds)
    );
    println!("| path | p50 ms | p99 ms | requests/s | p50 ratio to (b) |");
    println!("|---|---|---|---|---|");
    let base = median(results[1].1.iter().map(|f| f.p50_ms).collect()).0;
    for (name, runs) in results {
        let p50 = median(runs.iter().map(|f| f.p50_ms).collect());
        let p99 = median(runs.iter().map(|f| f.p99_ms).collect());
        let rps = median(runs.iter().map(|f| f.requests_per_s).collect());
        println!(
            "| {name} | {:.3} [{:.3}–{:.3}] | {:.3} [{:.3}–{:.3}] | {:.0} [{:.0}–{:.0}] | {:.2} |",
            p50.0,
            p50.1,
            p50.2,
            p99.0,
            p99.1,
            p99.2,
            rps.0,
            rps.1,
            rps.2,
            p50.0 / base
        );
    }
}
