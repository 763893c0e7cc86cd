//! `tether exec`: agent, session, proxy, then the user's command with the layer preloaded.
//!
//! Exit codes: the command's own; 125 when tether itself fails before or around the command;
//! 126 when the command cannot be run, 127 when it is not found (as `env` and `docker run` do).

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::json;
use tether_config::{Config, Loaded, Target, model::OnLinkLost};
use tether_session::carrier::Io;
use tokio::{
    io::AsyncBufReadExt as _,
    net::TcpStream,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    cli::ExecArgs,
    proxy::{
        Event, Opened, Proxy,
        link::{Connect, ConnectError, Dialer, StillThere},
    },
    ui::Ui,
};

/// tether's own failure (not the command's).
const TETHER_FAILED: i32 = 125;

pub(crate) async fn run(
    args: ExecArgs,
    config_file: Option<PathBuf>,
    ui: Ui,
) -> anyhow::Result<i32> {
    let config = match load_config(&args, config_file.as_deref()) {
        Ok(loaded) => {
            for notice in &loaded.notices {
                ui.info(&notice.to_string());
            }
            loaded.config
        }
        Err(problems) => {
            eprint!("{}", crate::commands::config::render(&problems));
            return Ok(TETHER_FAILED);
        }
    };
    match exec(&args, &config, ui).await {
        Ok(code) => Ok(code),
        Err(error) => {
            eprintln!("error: {error:#}");
            Ok(TETHER_FAILED)
        }
    }
}

fn load_config(args: &ExecArgs, file: Option<&Path>) -> Result<Loaded, tether_config::Problems> {
    let mut loader = crate::commands::config::loader(file);
    let flags = &args.target;
    if let Some(target) = &flags.target {
        loader = loader.flag("--target", "/target", json!(target));
    }
    if let Some(namespace) = &flags.namespace {
        loader = loader.flag("--namespace", "/target/namespace", json!(namespace));
    }
    if let Some(context) = &flags.context {
        loader = loader.flag("--context", "/kube_context", json!(context));
    }
    if let Some(how) = &args.interception {
        loader = loader.flag("--interception", "/interception", json!(how));
    }
    if args.steal {
        loader = loader.flag("--steal", "/feature/network/incoming/mode", json!("steal"));
    }
    loader.load()
}

/// The target: `netns/NAME` and `pid/PID` run a local agent; Kubernetes targets an agent pod.
fn target(config: &Config) -> anyhow::Result<Target> {
    let Some(path) = &config.target.path else {
        bail!(
            "no target: give one with --target (deploy/NAME, pod/NAME, netns/NAME, pid/PID, …) \
             or target.path in the config"
        );
    };
    Ok(path.parse()?)
}

/// The preloaded library: `TETHER_LAYER_PATH`, else next to the `tether` executable.
fn layer_path() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(tether_intercept::channel::LIBRARY_ENV) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("cannot find the tether executable")?;
    let dir = exe
        .parent()
        .context("the tether executable has no directory")?;
    let candidates = [
        dir.join("libtether_layer.so"),
        dir.join("deps/libtether_layer.so"),
    ];
    candidates.iter().find(|p| p.is_file()).cloned().with_context(|| {
        format!(
            "the preload library libtether_layer.so is not next to {} (build it with `cargo build -p tether-layer`, in the same profile as tether, or set {})",
            exe.display(),
            tether_intercept::channel::LIBRARY_ENV
        )
    })
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

async fn exec(args: &ExecArgs, config: &Config, ui: Ui) -> anyhow::Result<i32> {
    let target = target(config)?;
    // Targetless: no pod to take traffic from, and the agent pod's files and variables are not
    // the user's business.
    let targetless;
    let config = if target == Target::Targetless {
        let mut adjusted = config.clone();
        adjusted.feature.network.incoming.mode = tether_config::model::IncomingMode::Off;
        adjusted.feature.env.enabled = false;
        targetless = adjusted;
        &targetless
    } else {
        config
    };
    let is_local = matches!(target, Target::Netns(_) | Target::Pid(_));
    if is_local && args.agent_addr.is_none() && !is_root() {
        bail!(
            "local targets need root (network namespaces and iptables): run `sudo tether exec …`"
        );
    }
    let dir = tempfile::Builder::new().prefix("tether-").tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;

    let mut agent = match (&args.agent_addr, &target) {
        (Some(addr), _) => {
            let file = args
                .agent_token_file
                .as_deref()
                .context("--agent-addr needs --agent-token-file")?;
            let token = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read the token file {}", file.display()))?
                .trim()
                .to_owned();
            Agent::Local(Box::new(AgentChild {
                child: None,
                addr: *addr,
                token,
            }))
        }
        (None, Target::Kube(_) | Target::Targetless) => match crate::kube_agent::start(
            config,
            match &target {
                Target::Kube(kube) => Some(kube),
                _ => None,
            },
            ui,
        )
        .await
        {
            Ok(agent) => Agent::Kube(Box::new(agent), None),
            Err(error) => {
                tracing::debug!("{error:#}");
                return Ok(TETHER_FAILED);
            }
        },
        (None, _) => {
            let step = ui.step(&format!("starting the agent for {target}"));
            let started = Instant::now();
            match start_agent(&target.to_string(), config, dir.path()).await {
                Ok(agent) => {
                    step.done(&format!("ready in {} ms", started.elapsed().as_millis()));
                    Agent::Local(Box::new(agent))
                }
                Err(error) => {
                    step.fail(&format!("{error:#}"));
                    return Ok(TETHER_FAILED);
                }
            }
        }
    };

    let outcome = with_agent(args, config, ui, &mut agent, &target, dir.path()).await;
    if outcome.is_err() {
        // The normal paths stop the agent themselves, in order (proxy first).
        agent.stop().await;
    }
    outcome
}

/// Everything once the agent runs: the session, the proxy, the command.
async fn with_agent(
    args: &ExecArgs,
    config: &Config,
    ui: Ui,
    agent: &mut Agent,
    target: &Target,
    dir: &Path,
) -> anyhow::Result<i32> {
    let step = ui.step("opening the session");
    let dialer = Arc::new(agent.dialer(target, config));
    let opened = match agent {
        Agent::Kube(..) => {
            // Ctrl-C while waiting for the agent: give up (and remove it), as before it started.
            tokio::select! {
                opened = crate::kube_agent::open_session(&dialer, config) => opened,
                _ = tokio::signal::ctrl_c() => Err(crate::proxy::link::DialError::Gone("interrupted".into())),
            }
        }
        Agent::Local(_) => dialer.open().await,
    };
    let (link, welcome) = match opened {
        Ok(opened) => opened,
        Err(error) => {
            step.fail(&error.describe());
            agent.stop().await;
            return Ok(TETHER_FAILED);
        }
    };
    step.done(&format!("session {}", welcome.session_id));

    let socket = dir.join("layer.sock");
    let (events_tx, mut events) = mpsc::unbounded_channel();
    // A bare network namespace has no files of its own (they are this host's), nor has a
    // targetless session: files stay local.
    let target_files = matches!(target, Target::Pid(_) | Target::Kube(_));
    let pod = match agent {
        Agent::Kube(kube, _) => kube.target.clone(),
        Agent::Local(_) => None,
    };
    let opened = Opened {
        dialer,
        link,
        welcome,
        pod: pod.as_ref().map(|p| p.pod.clone()).unwrap_or_default(),
        key: pod.map(|p| p.uid).unwrap_or_default(),
    };
    let proxy = Proxy::start(opened, config, target_files, &socket, events_tx).await?;
    match (&mut *agent, target) {
        (Agent::Kube(kube, follower), Target::Kube(kube_target)) => {
            *follower =
                Some(crate::follow::Follower::start(kube, kube_target, config, &proxy, ui).await);
        }
        _ if config.feature.network.incoming.mirror_all_replicas => {
            ui.warn("mirror_all_replicas applies to workload targets in a cluster (deploy/, statefulset/, replicaset/); ignored");
        }
        _ => {}
    }

    let env = if config.feature.env.enabled || !config.feature.env.overrides.is_empty() {
        // Targetless, there is no target process: only the overrides apply.
        let target_env = if *target == Target::Targetless {
            Ok(Vec::new())
        } else {
            proxy.environment().await
        };
        let target_env = match target_env {
            Ok(vars) => vars,
            Err(message) => {
                ui.warn(&format!("cannot read the target's environment: {message}"));
                Vec::new()
            }
        };
        let count = target_env.len();
        let merged = crate::environment::merge(target_env, &config.feature.env)
            .context("feature.env has a bad pattern")?;
        if count > 0 {
            ui.info(&format!(
                "environment: {} of the target's {count} variables",
                merged.len()
            ));
        }
        merged
    } else {
        Vec::new()
    };

    let spawned = match interception(config, &args.command, ui) {
        // Blocking work (the supervisor asks the proxy, which runs on this runtime, and waits
        // for the child's listener): off the runtime's workers.
        Ok(mechanism) => tokio::task::block_in_place(|| {
            start_interception(mechanism, config, &args.command, &socket, dir, &env, ui)
        }),
        Err(message) => Err((TETHER_FAILED, message)),
    };
    let (mut child, supervisor) = match spawned {
        Ok(spawned) => spawned,
        Err((code, message)) => {
            eprintln!("error: {message}");
            agent.halt().await;
            proxy.shutdown().await;
            agent.stop().await;
            return Ok(code);
        }
    };
    let child_pid = child.id();
    let _status = proxy.status_socket(crate::proxy::status::RunInfo {
        target: match agent {
            Agent::Kube(kube, _) => match &kube.target {
                Some(pod) => format!("{target} (pod {})", pod.pod),
                None => format!("{target} (namespace {})", kube.pod.namespace),
            },
            Agent::Local(_) => target.to_string(),
        },
        command: args.command.join(" "),
    });
    ui.info(&format!(
        "running {} (pid {})",
        args.command.join(" "),
        child_pid.unwrap_or(0)
    ));

    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status?,
            _ = interrupt.recv() => {
                // From a terminal, Ctrl-C already reached the command (same foreground process
                // group); forward only a SIGINT sent to tether alone.
                if !interrupt_came_from_terminal() {
                    forward(child_pid, nix::sys::signal::Signal::SIGINT);
                }
            }
            _ = terminate.recv() => forward(child_pid, nix::sys::signal::Signal::SIGTERM),
            _ = hangup.recv() => forward(child_pid, nix::sys::signal::Signal::SIGHUP),
            Some(event) = events.recv() => {
                if let Event::SessionLost { .. } = event
                    && config.on_link_lost == OnLinkLost::Stop
                {
                    ui.warn("stopping the command (on_link_lost: stop)");
                    forward(child_pid, nix::sys::signal::Signal::SIGTERM);
                }
                show(event, ui);
            }
        }
    };
    while let Ok(event) = events.try_recv() {
        show(event, ui);
    }
    // What supervised programs wrote to the target's files reaches it before the session ends.
    if let Some(supervisor) = supervisor {
        let finished =
            tokio::task::spawn_blocking(move || supervisor.finish(Duration::from_secs(30))).await;
        if !matches!(finished, Ok(true)) {
            ui.warn("some writes to the target's files were still going on after 30 s; they may be lost");
        }
    }
    let step = ui.step("cleaning up");
    agent.halt().await;
    proxy.shutdown().await;
    let said = agent.stop().await;
    if said.starts_with("cannot") {
        step.fail(&said);
    } else {
        step.done(&said);
    }
    use std::os::unix::process::ExitStatusExt as _;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

fn show(event: Event, ui: Ui) {
    match event {
        Event::Subscribed {
            local,
            remote_port,
            steal,
        } => {
            let mode = if steal { "stolen" } else { "mirrored" };
            ui.info(&format!("target port {remote_port} → {local} ({mode})"));
        }
        Event::StaysLocal { local, reason } => tracing::info!(%local, "stays local: {reason}"),
        Event::Warning(message) => ui.warn(&message),
        Event::Notice(message) => ui.info(&message),
        Event::LinkLost { reason } => {
            ui.warn(&format!("link to agent lost ({reason}); reconnecting…"));
        }
        Event::Reconnecting {
            attempt,
            next,
            error,
        } => {
            // Short outages need no running commentary; long ones show they are being worked on.
            if next >= Duration::from_secs(1) {
                ui.info(&format!(
                    "still reconnecting: attempt {attempt} failed ({error}); next try in {:.1} s",
                    next.as_secs_f64()
                ));
            } else {
                tracing::info!(attempt, ?next, %error, "reconnect attempt failed");
            }
        }
        Event::LinkResumed { after, attempts } => ui.info(&format!(
            "resumed after {:.1} s ({attempts} attempt{}); nothing lost",
            after.as_secs_f64(),
            if attempts == 1 { "" } else { "s" }
        )),
        Event::SessionLost { reason } => ui.warn(&format!(
            "the session with the agent is over: {reason}; the command runs on without the target"
        )),
    }
}

/// The agent of this run.
enum Agent {
    Local(Box<AgentChild>),
    /// The first agent; once the session runs, what follows the target (and holds every agent
    /// it started).
    Kube(
        Box<crate::kube_agent::KubeAgent>,
        Option<crate::follow::Follower>,
    ),
}

impl Agent {
    /// How to reach the agent now and after every drop.
    fn dialer(&self, target: &Target, config: &Config) -> Dialer {
        let (connect, token, still_there) = match self {
            Agent::Local(agent) => (
                local_connect(agent.addr),
                agent.token.clone(),
                local_still_there(agent, &target.to_string()),
            ),
            Agent::Kube(agent, _) => return agent.dialer(config),
        };
        Dialer::new(config, connect, token, still_there)
    }

    /// Stops following the target (before the proxy shuts down: nothing may start a session
    /// then).
    async fn halt(&mut self) {
        if let Agent::Kube(_, Some(follower)) = self {
            follower.halt().await;
        }
    }

    /// Stops the agent; what became of it, for the user.
    async fn stop(&mut self) -> String {
        match self {
            Agent::Local(agent) => {
                agent.stop().await;
                "rules removed, agent stopped".into()
            }
            Agent::Kube(agent, follower) => match follower.take() {
                Some(follower) => follower.stop().await,
                None => agent.stop().await,
            },
        }
    }
}

fn local_connect(addr: std::net::SocketAddr) -> Connect {
    Arc::new(move || {
        Box::pin(async move {
            let tcp = |source| ConnectError::Tcp { addr, source };
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
                .await
                .map_err(|_| ConnectError::TimedOut(CONNECT_TIMEOUT))?
                .map_err(tcp)?;
            stream.set_nodelay(true).map_err(tcp)?;
            Ok(Box::new(stream) as Box<dyn Io>)
        })
    })
}

fn local_still_there(agent: &AgentChild, target: &str) -> StillThere {
    let agent_pid = agent.child.as_ref().and_then(tokio::process::Child::id);
    let target_owned = target.to_owned();
    Arc::new(move || {
        if let Some(pid) = agent_pid
            && !tether_sys::process::alive(pid)
        {
            return Err(format!("the agent (pid {pid}) exited"));
        }
        let there = match target_owned.split_once('/') {
            Some(("netns", name)) => Path::new("/run/netns").join(name).exists(),
            Some(("pid", pid)) => pid.parse().is_ok_and(tether_sys::process::alive),
            _ => true,
        };
        if there {
            Ok(())
        } else {
            Err(format!("the target {target_owned} is gone"))
        }
    })
}

/// How long one connection attempt to the agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn forward(pid: Option<u32>, signal: nix::sys::signal::Signal) {
    if let Some(pid) = pid {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
    }
}

fn interrupt_came_from_terminal() -> bool {
    use std::os::fd::AsFd as _;
    let stdin = std::io::stdin();
    nix::unistd::tcgetpgrp(stdin.as_fd()).is_ok_and(|group| group == nix::unistd::getpgrp())
}

/// How the command is intercepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mechanism {
    /// The preloaded library.
    Preload,
    /// The syscall supervisor.
    Syscall,
}

/// Picks the mechanism for the command (`interception`). Never a silent local run: a program
/// neither can reach is named before it runs, and a forced `syscall` the kernel cannot do fails.
fn interception(config: &Config, command: &[String], ui: Ui) -> Result<Mechanism, String> {
    use tether_config::model::Interception;
    use tether_intercept::program::Unreachable;
    let program = command.first().map(String::as_str).unwrap_or_default();
    let unreachable = crate::commands::doctor::find_in_path(program)
        .and_then(|path| tether_intercept::program::unreachable(&path));
    let support = tether_supervisor::support();
    match config.interception {
        Interception::Preload => {
            if let Some(unreachable) = unreachable {
                ui.warn(&unreachable.explain(program));
            }
            Ok(Mechanism::Preload)
        }
        Interception::Syscall => match support {
            tether_supervisor::Support::Available => Ok(Mechanism::Syscall),
            missing => Err(format!(
                "interception: syscall is not possible here: {} (use --interception preload)",
                missing
            )),
        },
        Interception::Auto => match (unreachable, support) {
            (
                Some(why @ (Unreachable::Static | Unreachable::Go)),
                tether_supervisor::Support::Available,
            ) => {
                ui.info(&format!(
                    "{program} {}: intercepting its system calls (seccomp supervisor)",
                    why.what()
                ));
                Ok(Mechanism::Syscall)
            }
            (Some(why), support) => {
                ui.warn(&why.explain(program));
                if support != tether_supervisor::Support::Available {
                    ui.warn(&format!("the syscall supervisor cannot help: {}", support));
                }
                Ok(Mechanism::Preload)
            }
            (None, _) => Ok(Mechanism::Preload),
        },
    }
}

/// Starts the command with its interception: preloaded (with the supervisor taking the
/// programs the library hands over, where the kernel allows it) or supervised.
fn start_interception(
    mechanism: Mechanism,
    config: &Config,
    command: &[String],
    socket: &Path,
    dir: &Path,
    env: &[(String, String)],
    ui: Ui,
) -> Result<(tokio::process::Child, Option<tether_supervisor::Supervisor>), (i32, String)> {
    let program = command.first().map(String::as_str).unwrap_or_default();
    let supervise = mechanism == Mechanism::Syscall
        || (config.interception == tether_config::model::Interception::Auto
            && tether_supervisor::support() == tether_supervisor::Support::Available);
    let supervisor = match supervise {
        false => None,
        true => match start_supervisor(program, socket, &dir.join("supervisor"), env, ui) {
            Ok(supervisor) => Some(supervisor),
            Err(failed) if mechanism == Mechanism::Syscall => return Err(failed),
            // Only for hand-overs: the command itself goes on with the library.
            Err((_, message)) => {
                ui.warn(&format!(
                    "{message}; programs the preloaded library cannot enter will not be intercepted"
                ));
                None
            }
        },
    };
    match (mechanism, supervisor) {
        (Mechanism::Syscall, Some(supervisor)) => {
            let child = spawn_supervised(command, socket, env, &supervisor)?;
            Ok((child, Some(supervisor)))
        }
        (_, supervisor) => {
            let layer = layer_path()
                .and_then(|p| Ok(p.canonicalize()?))
                .map_err(|e| (TETHER_FAILED, format!("{e:#}")))?;
            let handoff = dir.join("supervisor.sock");
            let handoff = match &supervisor {
                Some(supervisor) => match supervisor.accept_handoffs(&handoff) {
                    Ok(()) => Some(handoff),
                    Err(error) => {
                        tracing::warn!(%error, "no hand-over socket for the syscall supervisor");
                        None
                    }
                },
                None => None,
            };
            let child = spawn_command(command, &layer, socket, env, handoff.as_deref())?;
            Ok((child, supervisor))
        }
    }
}

/// The supervisor of this run, asking the proxy at `socket`.
fn start_supervisor(
    program: &str,
    socket: &Path,
    scratch: &Path,
    env: &[(String, String)],
    ui: Ui,
) -> Result<tether_supervisor::Supervisor, (i32, String)> {
    let failed = |what: &str, error: std::io::Error| {
        (
            TETHER_FAILED,
            format!("cannot supervise {program}: {what}: {error}"),
        )
    };
    std::fs::create_dir_all(scratch).map_err(|e| failed("no scratch directory", e))?;
    // The program's own places, as it will see them (its environment may come from the target).
    let from_env = |name: &str| {
        env.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| PathBuf::from(v))
            .or_else(|| std::env::var_os(name).map(PathBuf::from))
    };
    let places = tether_intercept::policy::LocalPlaces {
        home: from_env("HOME"),
        cwd: std::env::current_dir().ok(),
        exe: crate::commands::doctor::find_in_path(program),
        tmpdir: from_env("TMPDIR"),
    };
    let setup = tether_supervisor::Setup {
        socket: socket.to_path_buf(),
        scratch: scratch.to_path_buf(),
        places,
    };
    tether_supervisor::Supervisor::start(setup, move |message| {
        ui.warn(message);
    })
    .map_err(|e| failed("the local proxy did not answer", e))
}

/// Starts the command under the seccomp filter, served by `supervisor`.
fn spawn_supervised(
    command: &[String],
    socket: &Path,
    env: &[(String, String)],
    supervisor: &tether_supervisor::Supervisor,
) -> Result<tokio::process::Child, (i32, String)> {
    let (program, rest) = command
        .split_first()
        .ok_or((126, "no command given".to_owned()))?;
    let failed = |what: &str, error: std::io::Error| {
        (
            TETHER_FAILED,
            format!("cannot supervise {program}: {what}: {error}"),
        )
    };
    let (mut ours, theirs) =
        std::os::unix::net::UnixStream::pair().map_err(|e| failed("no socket pair", e))?;
    // The child waits for its listener to be taken before it executes the program, and `spawn`
    // returns only then: it is taken on a thread of its own.
    let taking = std::thread::spawn(move || tether_supervisor::Listener::take(&mut ours, None));
    let mut child = tokio::process::Command::new(program);
    child
        .args(rest)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env(tether_intercept::channel::SOCKET_ENV, socket);
    tether_sys::seccomp::install_before_exec(
        child.as_std_mut(),
        tether_supervisor::filter(),
        theirs.into(),
    );
    let spawned = child.spawn();
    // The child's end of the pair lives in the command's hook: closed with it (so a child that
    // failed before the hand-over ends the taking thread's wait).
    drop(child);
    let taken = taking.join().unwrap_or_else(|_| {
        Err(std::io::Error::other(
            "the thread taking the listener panicked",
        ))
    });
    let spawned = spawned.map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => (127, format!("command not found: {program}")),
        _ => (
            126,
            format!("cannot run {program} under the syscall supervisor: {e}"),
        ),
    })?;
    let listener = taken.map_err(|e| failed("its seccomp listener was not handed over", e))?;
    supervisor.serve(listener);
    Ok(spawned)
}

fn spawn_command(
    command: &[String],
    layer: &Path,
    socket: &Path,
    env: &[(String, String)],
    handoff: Option<&Path>,
) -> Result<tokio::process::Child, (i32, String)> {
    let (program, rest) = command
        .split_first()
        .ok_or((126, "no command given".to_owned()))?;
    let preload = match std::env::var_os("LD_PRELOAD") {
        Some(existing) if !existing.is_empty() => {
            let mut joined = layer.as_os_str().to_owned();
            joined.push(":");
            joined.push(existing);
            joined
        }
        _ => layer.as_os_str().to_owned(),
    };
    let mut child = tokio::process::Command::new(program);
    child
        .args(rest)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("LD_PRELOAD", preload)
        .env(tether_intercept::channel::SOCKET_ENV, socket)
        .env(tether_intercept::channel::LIBRARY_ENV, layer);
    if let Some(handoff) = handoff {
        child.env(tether_intercept::channel::SUPERVISOR_ENV, handoff);
    }
    child.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => (127, format!("command not found: {program}")),
        _ => (126, format!("cannot run {program}: {e}")),
    })
}

/// The agent of this run: started by tether, or given with `--agent-addr`.
struct AgentChild {
    child: Option<tokio::process::Child>,
    addr: std::net::SocketAddr,
    token: String,
}

async fn start_agent(target: &str, config: &Config, dir: &Path) -> anyhow::Result<AgentChild> {
    let token: String = rand::random::<[u8; 16]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let token_file = dir.join("token");
    std::fs::write(&token_file, &token)?;
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))?;
    let exe = std::env::current_exe()?;
    let mut command = tokio::process::Command::new(exe);
    command
        .args([
            "agent",
            "--target",
            target,
            "--listen",
            "127.0.0.1:0",
            "--token-file",
        ])
        .arg(&token_file)
        .args(["--parent-pid", &std::process::id().to_string()])
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        // Its own process group: a terminal's Ctrl-C goes to the command, not to the agent, which
        // tether stops itself once the command has exited.
        .process_group(0)
        .kill_on_drop(true);
    if let Some(nft) = config.agent.nftables {
        command.args(["--nftables", if nft { "true" } else { "false" }]);
    }
    let mut child = command.spawn().context("cannot start the agent")?;
    let stdout = child.stdout.take().context("no agent stdout")?;
    let timeout = config.agent.startup_timeout.get();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(stdout);
    if tokio::time::timeout(timeout, reader.read_line(&mut line))
        .await
        .is_err()
    {
        bail!(
            "the agent did not start within {} (agent.startup_timeout)",
            config.agent.startup_timeout
        );
    }
    let ready: serde_json::Value = serde_json::from_str(&line)
        .map_err(|_| anyhow::anyhow!("the agent failed to start (see its message above)"))?;
    let addr = ready["addr"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .context("the agent's readiness line has no address")?;
    Ok(AgentChild {
        child: Some(child),
        addr,
        token,
    })
}

impl AgentChild {
    /// SIGTERM, then wait (bounded) for the guard to remove the rules and exit.
    async fn stop(&mut self) {
        let Some(child) = &mut self.child else {
            return;
        };
        if let Some(pid) = child.id() {
            forward(Some(pid), nix::sys::signal::Signal::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }
}
