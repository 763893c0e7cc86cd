//! Issue 6's benchmark: reading a 100 MB file line by line and 10,000 `stat`s of a small file,
//! by python3, in the target through `tether exec` against the same on a local copy, in one run,
//! interleaved.
//!
//! The target is a process in a pod namespace with its own mount namespace (a tmpfs holding the
//! files); the local copies live in a tmpfs too, so both sides read from memory.

use std::process::Command;

use anyhow::bail;
use tether_testkit::Network;

/// The workload: seconds for the line-by-line read, microseconds per stat, and the line count
/// (a check that both sides read the same file).
const WORKLOAD: &str = r#"
import os, sys, time
path, small = sys.argv[1], sys.argv[2]
t = time.perf_counter()
lines = 0
with open(path, "rb") as f:
    for _ in f:
        lines += 1
read_s = time.perf_counter() - t
t = time.perf_counter()
for _ in range(10000):
    os.stat(small)
stat_us = (time.perf_counter() - t) / 10000 * 1e6
print(read_s, stat_us, lines)
"#;

struct Sample {
    read_s: f64,
    stat_us: f64,
    lines: u64,
}

fn parse(output: &std::process::Output, what: &str) -> anyhow::Result<Sample> {
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "{what} failed: {}{}",
            text,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let fields: Vec<&str> = text
        .lines()
        .last()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let [read, stat, lines] = fields[..] else {
        bail!("{what}: unexpected output {text:?}");
    };
    Ok(Sample {
        read_s: read.parse()?,
        stat_us: stat.parse()?,
        lines: lines.parse()?,
    })
}

fn median(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (
        values[values.len() / 2],
        values[0],
        values[values.len() - 1],
    )
}

pub(crate) fn run(rounds: usize, megabytes: u64) -> anyhow::Result<()> {
    if !tether_testkit::require_root("tether-bench fs-remote") {
        bail!("run it as root: it builds namespaces");
    }
    let tether = crate::tether_binary()?;
    let net = Network::new(1);
    let dir = format!("/var/lib/tether-bench-{}", std::process::id());
    std::fs::create_dir_all(&dir)?;
    let local = tempfile::Builder::new()
        .prefix("tether-bench-")
        .tempdir_in("/dev/shm")?;
    let result = (|| {
        // 100-byte lines; the same content on both sides.
        let make = format!(
            "python3 -c \"import sys; line=b'x'*99+b'\\n'; f=open(sys.argv[1],'wb'); [f.write(line*10000) for _ in range({megabytes}*1000*1000//(100*10000))]\" "
        );
        let setup = format!(
            "mount -t tmpfs -o size={}m tmpfs {dir}; {make} {dir}/big.txt; echo small > {dir}/small.txt",
            megabytes + 16
        );
        let pid = net.spawn_pod_process(net.pod(0), &setup, &[]);
        let local_dir = local.path().display().to_string();
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{make} {local_dir}/big.txt && echo small > {local_dir}/small.txt"
            ))
            .status()?;
        anyhow::ensure!(status.success(), "cannot write the local copy");

        let (mut read, mut stat) = (vec![Vec::new(); 2], vec![Vec::new(); 2]);
        for round in 0..rounds {
            eprintln!("round {} of {rounds}", round + 1);
            let base = Command::new("python3")
                .args([
                    "-c",
                    WORKLOAD,
                    &format!("{local_dir}/big.txt"),
                    &format!("{local_dir}/small.txt"),
                ])
                .output()?;
            let base = parse(&base, "the local run")?;
            let remote = Command::new(&tether)
                .args([
                    "exec",
                    "--target",
                    &format!("pid/{pid}"),
                    "--",
                    "python3",
                    "-c",
                    WORKLOAD,
                ])
                .args([format!("{dir}/big.txt"), format!("{dir}/small.txt")])
                .output()?;
            let remote = parse(&remote, "the run through tether")?;
            anyhow::ensure!(
                base.lines == remote.lines,
                "the two sides read different files ({} vs {} lines)",
                base.lines,
                remote.lines
            );
            for (i, sample) in [base, remote].into_iter().enumerate() {
                read[i].push(sample.read_s);
                stat[i].push(sample.stat_us);
            }
        }
        let mb = megabytes as f64;
        let (r0, r1) = (median(read[0].clone()), median(read[1].clone()));
        let (s0, s1) = (median(stat[0].clone()), median(stat[1].clone()));
        println!(
            "python3; {megabytes} MB file of 100-byte lines read line by line; 10,000 os.stat of a small file; {rounds} interleaved rounds; medians [min–max]\n"
        );
        println!("| workload | local file | in the target through tether | ratio |");
        println!("|---|---|---|---|");
        println!(
            "| read {megabytes} MB line by line (MB/s) | {:.0} [{:.0}–{:.0}] | {:.0} [{:.0}–{:.0}] | {:.2} |",
            mb / r0.0,
            mb / r0.2,
            mb / r0.1,
            mb / r1.0,
            mb / r1.2,
            mb / r1.1,
            r0.0 / r1.0
        );
        println!(
            "| stat (µs per call) | {:.2} [{:.2}–{:.2}] | {:.1} [{:.1}–{:.1}] | {:.0}× slower |",
            s0.0,
            s0.1,
            s0.2,
            s1.0,
            s1.1,
            s1.2,
            s1.0 / s0.0
        );
        Ok(())
    })();
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
    result
}
