//! Redirect rules in the target: choosing a backend, applying plans, and sweeping what dead
//! agents left behind.
//!
//! Architecture Invariant: every table or chain tether creates carries its owner (the agent
//! instance) and its session in its name; nothing is added without a matching removal in
//! [`SessionRules::teardown`], and [`sweep`] removes only what belongs to dead owners (or to one
//! named owner, for the guard's cleanup).

pub mod plan;

use std::process::Stdio;

pub use plan::{AGENT_MARK, Backend, Leftover, Mesh, Owner, Plan, SessionRules};

use tether_sys::process;

use crate::netns::Netns;

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("`{program}` is not installed where the agent runs; install {package}")]
    Missing {
        program: &'static str,
        package: &'static str,
    },
    #[error("`{command}` failed in {target}: {stderr}")]
    Failed {
        command: String,
        target: String,
        stderr: String,
    },
    #[error("cannot run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
}

fn program(backend: Backend) -> (&'static str, &'static str) {
    match backend {
        Backend::Nft => (
            "nft",
            "nftables (apt-get install nftables; or iptables, for the iptables-legacy backend)",
        ),
        Backend::Legacy => ("iptables-legacy", "iptables (apt-get install iptables)"),
    }
}

/// Applies a plan inside the target's namespace.
pub async fn apply(netns: &Netns, plan: &Plan) -> Result<(), RulesError> {
    match plan {
        Plan::Nft(script) => run(netns, Backend::Nft, &["-f", "-"], Some(script))
            .await
            .map(drop),
        Plan::Iptables(commands) => {
            for args in commands {
                if legacy_present(netns, args).await {
                    continue;
                }
                let mut full = vec!["-w"];
                full.extend(args.iter().map(String::as_str));
                run(netns, Backend::Legacy, &full, None).await?;
            }
            Ok(())
        }
        Plan::LegacyRemoveChain(chain) => {
            let listing = run_save(netns).await?;
            if !listing.lines().any(|l| {
                l.strip_prefix(':')
                    .is_some_and(|c| c.split_whitespace().next() == Some(chain))
            }) {
                return Ok(());
            }
            // Every removal is tried even if one fails; the first failure is reported.
            let mut first_error = None;
            for args in plan::legacy_jump_removals(&listing, chain) {
                let mut full = vec!["-w"];
                full.extend(args.iter().map(String::as_str));
                if let Err(e) = run(netns, Backend::Legacy, &full, None).await {
                    first_error.get_or_insert(e);
                }
            }
            for action in ["-F", "-X"] {
                if let Err(e) = run(
                    netns,
                    Backend::Legacy,
                    &["-w", "-t", "nat", action, chain],
                    None,
                )
                .await
                {
                    first_error.get_or_insert(e);
                }
            }
            first_error.map_or(Ok(()), Err)
        }
    }
}

/// True when what `args` would add (`-N` chain, `-I`/`-A` rule) is there already.
async fn legacy_present(netns: &Netns, args: &[String]) -> bool {
    let Some(at) = args
        .iter()
        .position(|a| matches!(a.as_str(), "-N" | "-I" | "-A"))
    else {
        return false;
    };
    let mut check: Vec<String> = args[..at].to_vec();
    match args[at].as_str() {
        "-N" => {
            // `-L CHAIN` succeeds when the chain exists.
            check.extend(["-L".to_owned(), args[at + 1].clone(), "-n".to_owned()]);
        }
        "-I" => {
            // `-I CHAIN [POS] rule…` → `-C CHAIN rule…`
            check.extend(["-C".to_owned(), args[at + 1].clone()]);
            let rest = &args[at + 2..];
            let rest = match rest.first() {
                Some(pos) if pos.parse::<u32>().is_ok() => &rest[1..],
                _ => rest,
            };
            check.extend(rest.iter().cloned());
        }
        _ => {
            check.push("-C".to_owned());
            check.extend(args[at + 1..].iter().cloned());
        }
    }
    let mut full = vec!["-w"];
    full.extend(check.iter().map(String::as_str));
    run(netns, Backend::Legacy, &full, None).await.is_ok()
}

async fn run(
    netns: &Netns,
    backend: Backend,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, RulesError> {
    let (program, package) = program(backend);
    if !on_path(program) {
        return Err(RulesError::Missing { program, package });
    }
    let shown = format!("{program} {}", args.join(" "));
    let mut command = netns.command(program);
    command.args(args).stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|source| RulesError::Spawn {
        command: shown.clone(),
        source,
    })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        use tokio::io::AsyncWriteExt as _;
        pipe.write_all(text.as_bytes())
            .await
            .map_err(|source| RulesError::Spawn {
                command: shown.clone(),
                source,
            })?;
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|source| RulesError::Spawn {
            command: shown.clone(),
            source,
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        return Err(RulesError::Failed {
            command: shown,
            target: netns.label.clone(),
            stderr,
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// True when the program `backend` runs is installed (on `PATH`) where the agent runs.
pub fn installed(backend: Backend) -> bool {
    on_path(program(backend).0)
}

/// True when `program` is a file in one of `PATH`'s directories.
pub fn on_path(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| dir.join(program).is_file())
}

/// Why the backend is not the one the agent prefers, when it had to fall back.
pub const NFT_MISSING_FALLBACK: &str = "`nft` is not installed where the agent runs: redirecting with iptables-legacy instead. \
     Its rules are removed by the agent's guard and by the next agent's sweep, but do not expire on their own \
     if every agent process is killed; install nftables (apt-get install nftables) for that";

/// The backend for this target: `forced` if given; else legacy when the target already has legacy
/// iptables rules (a mesh's, say); else nft, or iptables-legacy when only that is installed (with
/// [`NFT_MISSING_FALLBACK`] as the note to show the user).
pub async fn choose_backend(
    netns: &Netns,
    forced: Option<bool>,
) -> Result<(Backend, Option<&'static str>), RulesError> {
    if let Some(nft) = forced {
        return Ok((if nft { Backend::Nft } else { Backend::Legacy }, None));
    }
    if on_path("iptables-legacy-save") {
        let listing = run_save(netns).await.unwrap_or_default();
        if plan::legacy_has_rules(&listing) {
            return Ok((Backend::Legacy, None));
        }
    }
    if !installed(Backend::Nft) && installed(Backend::Legacy) {
        return Ok((Backend::Legacy, Some(NFT_MISSING_FALLBACK)));
    }
    Ok((Backend::Nft, None))
}

async fn run_save(netns: &Netns) -> Result<String, RulesError> {
    save(netns, "iptables-legacy-save", &[]).await
}

/// `PROGRAM ARGS` in the target (`iptables-legacy-save` or `iptables-nft-save`).
async fn save(netns: &Netns, program: &'static str, args: &[&str]) -> Result<String, RulesError> {
    let mut command = netns.command(program);
    command.args(args);
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    let output = command.output().await.map_err(|source| RulesError::Spawn {
        command: program.into(),
        source,
    })?;
    if !output.status.success() {
        return Err(RulesError::Failed {
            command: format!("{program} {}", args.join(" ")),
            target: netns.label.clone(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The service mesh whose rules the target holds, in either iptables backend. Listings only: no
/// `-t nat` (asking for a table by name creates it, and may load `iptable_nat` on the node).
pub async fn detect_mesh(netns: &Netns) -> Option<Mesh> {
    let mut looked = false;
    for (program, args) in [
        ("iptables-legacy-save", &[][..]),
        ("nft", &["list", "ruleset"][..]),
        ("iptables-nft-save", &[][..]),
    ] {
        if !on_path(program) {
            continue;
        }
        looked = true;
        if let Ok(listing) = save(netns, program, args).await
            && let Some(mesh) = plan::detect_mesh(&listing)
        {
            return Some(mesh);
        }
    }
    if !looked {
        tracing::warn!(
            "cannot look for a service mesh (no iptables-save or nft in the agent's image); steals assume there is none"
        );
    }
    None
}

/// Every tether table or chain in the target, in both backends.
pub async fn leftovers(netns: &Netns) -> Vec<Leftover> {
    let mut found = Vec::new();
    if on_path("nft")
        && let Ok(listing) = run(netns, Backend::Nft, &["list", "tables"], None).await
    {
        found.extend(plan::nft_leftovers(&listing));
    }
    if on_path("iptables-legacy-save")
        && let Ok(listing) = run_save(netns).await
    {
        found.extend(plan::legacy_leftovers(&listing));
    }
    found
}

/// Removes the leftovers whose owner `doomed` says must go; returns how many were removed.
pub async fn sweep(netns: &Netns, doomed: impl Fn(&Owner) -> bool) -> usize {
    let mut removed = 0;
    for leftover in leftovers(netns).await {
        if !doomed(&leftover.owner) {
            continue;
        }
        match apply(netns, &leftover.teardown()).await {
            Ok(()) => {
                tracing::info!(name = %leftover.name, backend = %leftover.backend, "removed rules left by agent {}", leftover.owner);
                removed += 1;
            }
            // Gone already (a session's own teardown raced this sweep): nothing left to do.
            Err(_)
                if !leftovers(netns)
                    .await
                    .iter()
                    .any(|l| l.name == leftover.name) =>
            {
                removed += 1
            }
            Err(error) => {
                tracing::warn!(name = %leftover.name, %error, "cannot remove leftover rules")
            }
        }
    }
    removed
}

impl Owner {
    /// The owner tag of this process.
    pub fn current() -> Owner {
        let pid = std::process::id();
        Owner {
            pid,
            start_time: process::stat(pid).map_or(0, |s| s.start_time),
        }
    }

    /// True while the process that owns these rules runs: in this PID namespace, or in one
    /// nested in it (an agent in a container's PID namespace, as an ephemeral container is,
    /// tags its rules with its pid *there*; start times count from boot in every namespace).
    /// A zombie is dead: its rules are swept although its parent has not reaped it yet.
    pub fn is_alive(&self) -> bool {
        self.is(self.pid) || self.alive_in_nested_namespace()
    }

    /// True when `pid` (in this PID namespace) is this owner's process and has not exited.
    fn is(&self, pid: u32) -> bool {
        process::stat(pid).is_some_and(|s| s.running() && s.start_time == self.start_time)
    }

    fn alive_in_nested_namespace(&self) -> bool {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return false;
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| self.is(*pid))
            .any(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .ok()
                    .and_then(|status| plan::innermost_pid(&status))
                    == Some(self.pid)
            })
    }
}
