//! Issue 5's benchmark: HTTP through tether's steal against the pod's app directly and against a
//! relay chain with as many hops, in one run, interleaved.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use tether_testkit::{Network, Pod};

/// One wrk run's figures.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Figures {
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) requests_per_s: f64,
    /// Requests completed in the run.
    pub(crate) requests: u64,
    /// wrk's socket errors (connect, read, write, timeout), summed.
    pub(crate) errors: u64,
}

/// Milliseconds from wrk's `1.23ms` / `456.78us` / `1.02s`.
fn millis(text: &str) -> Option<f64> {
    let (number, factor) = if let Some(n) = text.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    number.parse::<f64>().ok().map(|n| n * factor)
}

fn parse_wrk(output: &str) -> Option<Figures> {
    let field = |prefix: &str| {
        output
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
    };
    let requests = output
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())?;
    // "Socket errors: connect 0, read 0, write 0, timeout 0" (absent when there were none).
    let errors = output
        .lines()
        .find(|l| l.trim_start().starts_with("Socket errors:"))
        .map_or(0, |l| {
            l.split(|c: char| !c.is_ascii_digit())
                .filter_map(|n| n.parse::<u64>().ok())
                .sum()
        });
    Some(Figures {
        errors,
        p50_ms: millis(&field("50%")?)?,
        p99_ms: millis(&field("99%")?)?,
        requests_per_s: field("Requests/sec:")?.parse().ok()?,
        requests,
    })
}

pub(crate) fn wrk(
    net: &Network,
    url: &str,
    seconds: u32,
    connections: u32,
    header: Option<&str>,
    close: bool,
) -> anyhow::Result<Figures> {
    let (duration, conns) = (format!("{seconds}s"), connections.to_string());
    let mut args = vec!["wrk", "-t", "1", "-c", &conns, "-d", &duration, "--latency"];
    if let Some(header) = header {
        args.extend(["-H", header]);
    }
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(url);
    let output = net.exec(net.client(), &args);
    let text = String::from_utf8_lossy(&output.stdout);
    // (With `Connection: close`, wrk counts the server's closes as read errors: only wrong
    // answers fail the run.)
    if text.contains("Non-2xx") {
        bail!("wrk saw errors against {url}:\n{text}");
    }
    parse_wrk(&text).with_context(|| format!("cannot read wrk's output:\n{text}"))
}

/// One load run against `url`: wrk for keep-alive connections, ab for a new connection per
/// request.
///
/// wrk starts a request's clock once its connection is up, so a SYN the app's listener dropped
/// (a full accept queue; the client retries after 1 s) never shows in its latencies when the
/// client connects to the app itself — but it does when a relay accepted the connection and
/// then meets the full queue, which makes a relayed path look worse than it is. ab times each
/// request from the start of its connect to the end of its answer, on every path alike.
pub(crate) fn load(
    net: &Network,
    url: &str,
    seconds: u32,
    connections: u32,
    header: Option<&str>,
    close: bool,
) -> anyhow::Result<Figures> {
    Client::pick(None, close).run(net, url, seconds, connections, header)
}

/// A load client and its connection mode.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Client {
    /// wrk; `close`: a new connection per request.
    Wrk { close: bool },
    /// ab: always a new connection per request.
    Ab,
}

impl Client {
    /// `name` ("wrk" or "ab"), or by default wrk for keep-alive and ab for a new connection
    /// per request.
    pub(crate) fn pick(name: Option<&str>, close: bool) -> Client {
        match name {
            Some("wrk") => Client::Wrk { close },
            Some(_) => Client::Ab,
            None if close => Client::Ab,
            None => Client::Wrk { close },
        }
    }

    fn close(self) -> bool {
        matches!(self, Client::Ab | Client::Wrk { close: true })
    }

    pub(crate) fn describe(self, connections: u32, seconds: u32) -> String {
        match self {
            Client::Ab => {
                format!("ab -c{connections} -t{seconds} (latency from connect to answer)")
            }
            Client::Wrk { .. } => {
                format!("wrk -t1 -c{connections} -d{seconds}s (latency from the request's write)")
            }
        }
    }

    pub(crate) fn run(
        self,
        net: &Network,
        url: &str,
        seconds: u32,
        connections: u32,
        header: Option<&str>,
    ) -> anyhow::Result<Figures> {
        match self {
            Client::Ab => ab(net, url, seconds, connections, header),
            Client::Wrk { close } => wrk(net, url, seconds, connections, header, close),
        }
    }
}

/// One ab run (HTTP/1.0, a new connection per request), with its latencies from ab's CSV of
/// percentiles (ab prints whole milliseconds otherwise).
fn ab(
    net: &Network,
    url: &str,
    seconds: u32,
    connections: u32,
    header: Option<&str>,
) -> anyhow::Result<Figures> {
    let csv = tempfile::Builder::new()
        .prefix("tether-bench-ab")
        .suffix(".csv")
        .tempfile()?;
    let csv_path = csv
        .path()
        .to_str()
        .context("a temporary path that is not UTF-8")?;
    let (duration, conns) = (seconds.to_string(), connections.to_string());
    // `-t` implies `-n 50000`; a later `-n` lifts that, so the time limit alone ends the run.
    // ab allocates 32 bytes per request of `-n` up front: room for 200,000 requests a second,
    // ten times what it reaches here.
    let most = (u64::from(seconds) * 200_000).to_string();
    let mut args = vec![
        "ab", "-q", "-r", "-c", &conns, "-t", &duration, "-n", &most, "-e", csv_path,
    ];
    if let Some(header) = header {
        args.extend(["-H", header]);
    }
    args.push(url);
    let output = net.exec(net.client(), &args);
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() || text.contains("Non-2xx") {
        bail!(
            "ab failed or saw errors against {url}:\n{text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let percentiles = std::fs::read_to_string(csv.path())?;
    parse_ab(&text, &percentiles).with_context(|| format!("cannot read ab's output:\n{text}"))
}

fn parse_ab(output: &str, percentiles: &str) -> Option<Figures> {
    let field = |prefix: &str| {
        output
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
    };
    let percentile = |p: &str| {
        percentiles
            .lines()
            .find_map(|l| l.strip_prefix(p)?.strip_prefix(','))
            .and_then(|ms| ms.trim().parse::<f64>().ok())
    };
    Some(Figures {
        p50_ms: percentile("50")?,
        p99_ms: percentile("99")?,
        requests_per_s: field("Requests per second:")?.parse().ok()?,
        requests: field("Complete requests:")?.parse().ok()?,
        errors: field("Failed requests:")?.parse().ok()?,
    })
}

/// `tether exec` against `pod` running `command`, with its settings, until `remote_port` is taken.
pub(crate) struct Exec(pub(crate) Child);

impl Exec {
    pub(crate) fn start(
        tether: &std::path::Path,
        pod: &Pod,
        mode: &str,
        mapping: (u16, u16),
        settings: &[(&str, &str)],
        command: &[String],
    ) -> anyhow::Result<Exec> {
        Exec::start_with(tether, pod, &[], mode, mapping, settings, command)
    }

    /// With `extra` arguments for `tether exec` (e.g. `--agent-addr`).
    pub(crate) fn start_with(
        tether: &std::path::Path,
        pod: &Pod,
        extra: &[&str],
        mode: &str,
        mapping: (u16, u16),
        settings: &[(&str, &str)],
        command: &[String],
    ) -> anyhow::Result<Exec> {
        let mut child = Command::new(tether)
            .args(["exec", "--target", &format!("netns/{}", pod.netns)])
            .args(extra)
            .arg("--")
            .args(command)
            .env("TETHER_FEATURE__NETWORK__INCOMING__MODE", mode)
            .env(
                "TETHER_FEATURE__NETWORK__INCOMING__PORT_MAPPING",
                format!("[[{}, {}]]", mapping.0, mapping.1),
            )
            .envs(settings.iter().copied())
            .env_remove("TETHER_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().context("no stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let needle = format!("target port {}", mapping.1);
        let mut said = Vec::new();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains(&needle) => break,
                Some(Ok(line)) => said.push(line),
                _ => bail!("tether exec stopped early; it said:\n{}", said.join("\n")),
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Ok(Exec(child))
    }
}

impl Drop for Exec {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// `tether exec` stealing the pod's port 80 into a local app (`filter`: a header filter);
/// stopped on drop.
pub(crate) fn steal(
    tether: &std::path::Path,
    pod: &Pod,
    filter: Option<&str>,
    python: bool,
) -> anyhow::Result<Exec> {
    let port = tether_testkit::netns::free_port();
    let settings: Vec<(&str, &str)> = filter
        .map(|f| {
            (
                "TETHER_FEATURE__NETWORK__INCOMING__HTTP_FILTER__HEADER_FILTER",
                f,
            )
        })
        .into_iter()
        .collect();
    let app = app_command(tether, "local", port, python);
    Exec::start(tether, pod, "steal", (port, 80), &settings, &app)
}

/// Starts the pod's app on port 80 and a two-relay socat chain to it on port 81 (81 → 82 → 80),
/// and waits until all three listen: the direct path and the relay baseline of the steal
/// benchmarks.
pub(crate) fn start_pod_paths(net: &Network, pod: &Pod, tether: &std::path::Path, python: bool) {
    let pod_app = app_command(tether, "pod", 80, python);
    net.spawn(
        &pod.netns,
        &pod_app.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    for (listen, to) in [(82, 80), (81, 82)] {
        net.spawn(
            &pod.netns,
            &[
                "socat",
                &format!("TCP-LISTEN:{listen},fork,reuseaddr,backlog=1024"),
                &format!("TCP:127.0.0.1:{to}"),
            ],
        );
    }
    for port in [80, 81, 82] {
        net.wait_listening(&pod.netns, port);
    }
}

/// The command of the app that answers on `port`.
pub(crate) fn app_command(
    tether: &std::path::Path,
    name: &str,
    port: u16,
    python: bool,
) -> Vec<String> {
    if python {
        // Quiet: it logs every request to stderr.
        let quiet = format!("exec python3 -m http.server --bind 0.0.0.0 {port} 2>/dev/null");
        ["sh", "-c", &quiet].map(String::from).to_vec()
    } else {
        [
            tether.to_str().unwrap_or("tether"),
            "serve-http",
            "--name",
            name,
            "--port",
            &port.to_string(),
        ]
        .map(String::from)
        .to_vec()
    }
}

pub(crate) fn median(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (
        values[values.len() / 2],
        values[0],
        values[values.len() - 1],
    )
}

/// As root: tether's binary, and a pod with the direct and relay-chain paths running.
fn pod_with_paths(python: bool) -> anyhow::Result<(std::path::PathBuf, Network, Pod)> {
    if !tether_testkit::require_root("tether-bench http-steal") {
        bail!("run it as root: it builds network namespaces");
    }
    let tether = crate::tether_binary()?;
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    start_pod_paths(&net, &pod, &tether, python);
    Ok((tether, net, pod))
}

fn app_name(python: bool) -> &'static str {
    if python {
        "python3 -m http.server"
    } else {
        "tether serve-http (tokio)"
    }
}

/// `runs` load runs back to back against the pod's app, then as many against one whole-port
/// steal, each run's figures printed as it ends.
pub(crate) fn back_to_back(
    runs: usize,
    seconds: u32,
    connections: u32,
    python: bool,
    client: Client,
) -> anyhow::Result<()> {
    let (tether, net, pod) = pod_with_paths(python)?;
    let url = format!("http://{}:80/", pod.ip);
    let app = app_name(python);
    println!("apps: {app}; {}\n", client.describe(connections, seconds));
    println!("| path | run | started after (s) | p50 ms | p99 ms | requests/s |");
    println!("|---|---|---|---|---|---|");
    for path in ["direct", "tether whole-port steal"] {
        let _steal = if path == "direct" {
            None
        } else {
            Some(steal(&tether, &pod, None, python)?)
        };
        let start = std::time::Instant::now();
        for run in 1..=runs {
            let after = start.elapsed().as_secs_f64();
            let f = client.run(&net, &url, seconds, connections, None)?;
            println!(
                "| {path} | {run} | {after:.0} | {:.2} | {:.2} | {:.0} |",
                f.p50_ms, f.p99_ms, f.requests_per_s
            );
        }
    }
    Ok(())
}

pub(crate) fn run(
    rounds: usize,
    seconds: u32,
    connections: u32,
    python: bool,
    client: Client,
) -> anyhow::Result<()> {
    let (tether, net, pod) = pod_with_paths(python)?;
    let url = |port: u16| format!("http://{}:{port}/", pod.ip);
    let names = [
        "(a) direct to the pod's app",
        "(b) socat relay chain, 2 hops",
        "(c) tether whole-port steal",
        "(d) tether filtered steal",
    ];
    let mut results: Vec<Vec<Figures>> = vec![Vec::new(); 4];
    for round in 0..rounds {
        eprintln!("round {} of {rounds}", round + 1);
        results[0].push(client.run(&net, &url(80), seconds, connections, None)?);
        results[1].push(client.run(&net, &url(81), seconds, connections, None)?);
        {
            let _steal = steal(&tether, &pod, None, python)?;
            results[2].push(client.run(&net, &url(80), seconds, connections, None)?);
        }
        {
            let _steal = steal(&tether, &pod, Some("^x-dev: bench$"), python)?;
            results[3].push(client.run(
                &net,
                &url(80),
                seconds,
                connections,
                Some("X-Dev: bench"),
            )?);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let summary: Vec<_> = results
        .iter()
        .map(|runs| {
            (
                median(runs.iter().map(|f| f.p50_ms).collect()),
                median(runs.iter().map(|f| f.p99_ms).collect()),
                median(runs.iter().map(|f| f.requests_per_s).collect()),
            )
        })
        .collect();
    let base = summary[0];
    let app = app_name(python);
    let connection = if client.close() {
        "a new connection per request"
    } else {
        "keep-alive"
    };
    println!(
        "apps: {app}; {}, {connection}, {rounds} interleaved rounds; medians [min–max]\n",
        client.describe(connections, seconds)
    );
    println!(
        "| path | p50 ms | p99 ms | requests/s | p50 ratio (goal ≤ 1.5) | p99 ratio (goal ≤ 2) | throughput ratio (goal ≥ 0.7) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, (p50, p99, rps)) in names.iter().zip(&summary) {
        println!(
            "| {name} | {:.2} [{:.2}–{:.2}] | {:.2} [{:.2}–{:.2}] | {:.0} [{:.0}–{:.0}] | {:.2} | {:.2} | {:.2} |",
            p50.0,
            p50.1,
            p50.2,
            p99.0,
            p99.1,
            p99.2,
            rps.0,
            rps.1,
            rps.2,
            p50.0 / base.0.0,
            p99.0 / base.1.0,
            rps.0 / base.2.0
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ab_figures_come_from_its_report_and_its_percentile_csv() {
        let report = "Concurrency Level:      4\n\
            Complete requests:      2058\n\
            Failed requests:        3\n   (Connect: 0, Receive: 0, Length: 3, Exceptions: 0)\n\
            Requests per second:    2056.63 [#/sec] (mean)\n\
            Percentage of the requests served within a certain time (ms)\n  50%      2\n  99%      4\n";
        let csv = "Percentage served,Time in ms\n0,0.446\n5,0.9\n50,1.845\n98,3.341\n99,3.593\n100,6.153\n";
        let figures = parse_ab(report, csv).expect("figures");
        assert_eq!(figures.requests, 2058);
        assert_eq!(figures.errors, 3);
        assert!((figures.requests_per_s - 2056.63).abs() < 1e-9);
        // The CSV's precise figures, not the whole milliseconds of the report; "5," is not "50,".
        assert!((figures.p50_ms - 1.845).abs() < 1e-9);
        assert!((figures.p99_ms - 3.593).abs() < 1e-9);
        assert!(parse_ab(report, "Percentage served,Time in ms\n").is_none());
    }
}
