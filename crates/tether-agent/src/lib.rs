//! The tether agent: runs next to the target and serves sessions from the local proxy.
//!
//! It runs as two processes. The **guard** (what was started) resolves the target, sweeps rules
//! left by dead agents, starts the **worker** (the same binary with `--worker-of`), and when the
//! worker ends for any reason (a crash, SIGKILL, OOM) removes every rule the worker created. The
//! worker serves sessions: authentication, steal (redirect rules + a listener in the target's
//! namespace), mirror (packet capture + TCP reassembly). With the nft backend, redirected ports
//! expire 3 s after the worker stops refreshing them, so even the death of both processes
//! leaves no blackhole. See ARCHITECTURE.md for the three cleanup layers.
//!
//! Entry points: [`AgentArgs`] (shared by the `tether-agent` binary and the hidden
//! `tether agent` subcommand), [`run`], and [`Agent`] + [`serve`] for embedding in tests.

pub mod container;
mod dns;
mod flush;
pub mod fs;
pub mod http;
mod mirror;
pub mod netns;
mod outgoing;
pub mod rules;
mod session;
mod steal;

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context as _;
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
};

pub use session::{Agent, serve};

use crate::{netns::Netns, rules::Owner};

/// `tether agent --target netns/NAME --listen ADDR --token-file FILE`.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// The target whose traffic the agent serves: `netns/NAME` (from `ip netns`), `pid/PID`, or
    /// `container/RUNTIME://ID` (a container on this node, found through `/proc/*/cgroup`).
    /// Without it, the agent works in its own network namespace.
    #[arg(long, value_name = "TARGET")]
    pub target: Option<String>,
    /// Address to serve sessions on (in the agent's own namespace).
    #[arg(long, default_value = "127.0.0.1:44128")]
    pub listen: SocketAddr,
    /// File holding the session token clients must present (whitespace around it is ignored).
    /// A file, not a flag or variable, so the token does not show in `ps` or `/proc/PID/environ`.
    #[arg(
        long,
        required_unless_present = "token_sha256",
        conflicts_with = "token_sha256"
    )]
    pub token_file: Option<PathBuf>,
    /// The SHA-256 (64 hex digits) of the session token, instead of the token: how an agent pod
    /// is started, so the token is not in the pod's spec.
    #[arg(long, value_name = "HEX")]
    pub token_sha256: Option<String>,
    /// Exit once no session has existed for this long (also counted from the start), e.g.
    /// `30s`: an agent pod ends on its own when the CLI that started it is gone.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub idle_exit: Option<std::time::Duration>,
    /// Force the nftables (true) or iptables-legacy (false) backend. Default: legacy when the
    /// target already has legacy rules, nftables otherwise.
    #[arg(long, value_name = "BOOL")]
    pub nftables: Option<bool>,
    /// Stop (cleanly) when this process exits: set by `tether exec` for the agent it starts, so
    /// the agent never outlives it, even when tether is killed.
    #[arg(long, value_name = "PID")]
    pub parent_pid: Option<u32>,
    /// Remove no rules but this agent's own: for an agent in a container's PID namespace (an
    /// ephemeral container), which cannot see other agents' processes and so cannot tell a dead
    /// one from a live one.
    #[arg(long)]
    pub no_sweep: bool,
    /// Internal: run as the worker of the guard with this owner tag.
    #[arg(long, hide = true, value_name = "OWNER")]
    pub worker_of: Option<String>,
}

/// Runs the guard or, with `--worker-of`, the worker. Returns the exit code.
pub async fn run(args: AgentArgs) -> anyhow::Result<i32> {
    match &args.worker_of {
        Some(owner) => {
            let owner: Owner = owner
                .parse()
                .map_err(|()| anyhow::anyhow!("bad owner tag {owner}"))?;
            worker(args, owner).await
        }
        None => guard(args).await,
    }
}

fn resolve(target: Option<&str>) -> anyhow::Result<Netns> {
    Ok(match target {
        Some(target) => Netns::resolve(target)?,
        None => Netns::current(),
    })
}

async fn guard(args: AgentArgs) -> anyhow::Result<i32> {
    use std::os::unix::process::ExitStatusExt as _;
    if let Some(parent) = args.parent_pid {
        // SIGTERM when the parent dies: handled below like any stop, rules included.
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)?;
        if nix::unistd::getppid().as_raw() as u32 != parent {
            anyhow::bail!("the process that started the agent ({parent}) is gone");
        }
    }
    let netns = resolve(args.target.as_deref())?;
    token_digest(&args)?;
    let owner = Owner::current();
    let swept = if args.no_sweep {
        0
    } else {
        rules::sweep(&netns, |o| !o.is_alive()).await
    };
    if swept > 0 {
        tracing::warn!(target = %netns.label, "removed {swept} rule set(s) left by agents that no longer run");
    }
    let exe = std::env::current_exe().context("cannot find the agent's own executable")?;
    let mut worker = tokio::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .arg("--worker-of")
        .arg(owner.to_string())
        .spawn()
        .context("cannot start the agent worker")?;
    let worker_pid = worker.id().context("the worker exited at once")?;
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let status = loop {
        tokio::select! {
            status = worker.wait() => break status?,
            _ = term.recv() => forward_sigterm(worker_pid),
            _ = interrupt.recv() => forward_sigterm(worker_pid),
        }
    };
    // Whatever ended the worker, its rules go with it (also when the target's process is gone
    // but its namespace is not: a pod terminating).
    if netns.reachable() {
        let removed = rules::sweep(&netns, |o| *o == owner).await;
        if removed > 0 && !status.success() {
            tracing::warn!(
                ?status,
                "the agent worker stopped; removed its {removed} rule set(s)"
            );
        }
    }
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

fn forward_sigterm(pid: u32) {
    use nix::{
        sys::signal::{Signal, kill},
        unistd::Pid,
    };
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
}

async fn worker(args: AgentArgs, owner: Owner) -> anyhow::Result<i32> {
    // If the guard dies, so does the worker: rules are never left with a live worker and a dead
    // owner (which a sweep would remove under the worker's feet).
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)?;
    if nix::unistd::getppid().as_raw() as u32 != owner.pid {
        anyhow::bail!("the agent guard exited before its worker started");
    }
    let netns = resolve(args.target.as_deref())?;
    let token = token_digest(&args)?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let agent = Agent::start(token, netns, owner.clone(), args.nftables).await?;
    let addr = listener.local_addr()?;
    // One JSON line on stdout: the readiness signal for whoever started the agent.
    println!(
        r#"{{"event":"listening","addr":"{addr}","worker_pid":{},"owner":"{owner}"}}"#,
        std::process::id()
    );
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        () = session::serve_until_idle(listener, agent, args.idle_exit) => {}
        _ = term.recv() => tracing::info!("stopping"),
    }
    Ok(0)
}

fn token_digest(args: &AgentArgs) -> anyhow::Result<tether_protocol::TokenDigest> {
    match (&args.token_file, &args.token_sha256) {
        (_, Some(hex)) => tether_protocol::TokenDigest::from_hex(hex)
            .context("--token-sha256 must be 64 hex digits (the SHA-256 of the session token)"),
        (Some(file), None) => read_token(file).map(|t| tether_protocol::TokenDigest::of(&t)),
        (None, None) => anyhow::bail!("give --token-file or --token-sha256"),
    }
}

fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    let raw = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    let token = raw.trim();
    anyhow::ensure!(
        !token.is_empty(),
        "the token file {} is empty",
        path.display()
    );
    Ok(token.to_owned())
}
