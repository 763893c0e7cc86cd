//! The target's network namespace: finding it, and doing things inside it.
//!
//! `setns` moves only the calling thread, and sockets keep the namespace they were created in.
//! So sockets for the target are created on a short-lived thread that entered the namespace
//! ([`Netns::run_in`]); they then serve on the runtime's threads like any other socket. Rule
//! commands run as child processes through `nsenter --net` ([`Netns::command`]).

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use nix::sched::CloneFlags;

/// A network namespace to work in.
#[derive(Debug, Clone)]
pub struct Netns {
    /// A file naming the namespace, to enter it: `/run/netns/NAME`, or for a process's
    /// namespace this agent's own open descriptor of it (`/proc/SELF/fd/N`), which stays valid
    /// when the process exits (a pod's namespace outlives its app container while the pod
    /// terminates; the agent must still be able to remove its rules there).
    pub path: PathBuf,
    /// How the target names it: `/run/netns/NAME` or `/proc/PID/ns/net`; gone with the target.
    origin: PathBuf,
    /// The open namespace `path` refers to, for a process's namespace.
    held: Option<std::sync::Arc<File>>,
    /// How the user named it (`netns/NAME`, `pid/PID`, `container/ID`).
    pub label: String,
    /// The target's process, for `pid/PID` and `container/ID` targets.
    pid: Option<u32>,
    /// The agent's own namespace (no target): nothing to enter.
    current: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(
        "`{0}` is not a local target: use netns/NAME (a namespace from `ip netns`), pid/PID or \
         container/RUNTIME://ID"
    )]
    Syntax(String),
    #[error(transparent)]
    Container(#[from] crate::container::ContainerError),
    #[error("the target {label} does not exist ({path} is missing){hint}")]
    Missing {
        label: String,
        path: String,
        hint: &'static str,
    },
    #[error("cannot open the network namespace of {label}")]
    Open {
        label: String,
        #[source]
        source: std::io::Error,
    },
}

impl Netns {
    /// Resolves `netns/NAME`, `pid/PID` or `container/RUNTIME://ID` (the container's main
    /// process, found through `/proc/*/cgroup`) and checks it can be opened.
    pub fn resolve(target: &str) -> Result<Netns, TargetError> {
        let process = |pid: u32| {
            (
                PathBuf::from(format!("/proc/{pid}/ns/net")),
                Some(pid),
                "; is the process still running?",
            )
        };
        let (path, pid, hint) = match target.split_once('/') {
            Some(("netns", name)) if !name.is_empty() && !name.contains('/') => (
                PathBuf::from("/run/netns").join(name),
                None,
                "; `ip netns list` shows the namespaces",
            ),
            Some(("pid", pid)) => match pid.parse::<u32>() {
                Ok(pid) if pid > 0 => process(pid),
                _ => return Err(TargetError::Syntax(target.to_owned())),
            },
            Some(("container", id)) => {
                let id: crate::container::ContainerId = id.parse()?;
                process(id.find_pid(Path::new("/proc"))?)
            }
            _ => return Err(TargetError::Syntax(target.to_owned())),
        };
        let mut netns = Netns {
            path: path.clone(),
            origin: path,
            held: None,
            label: target.to_owned(),
            pid,
            current: false,
        };
        if !netns.exists() {
            return Err(TargetError::Missing {
                label: netns.label,
                path: netns.origin.display().to_string(),
                hint,
            });
        }
        let file = File::open(&netns.origin).map_err(|source| TargetError::Open {
            label: netns.label.clone(),
            source,
        })?;
        if netns.pid.is_some() {
            use std::os::fd::AsRawFd as _;
            netns.path = PathBuf::from(format!(
                "/proc/{}/fd/{}",
                std::process::id(),
                file.as_raw_fd()
            ));
            netns.held = Some(std::sync::Arc::new(file));
        }
        Ok(netns)
    }

    /// The agent's own namespace, for running without a target.
    pub fn current() -> Netns {
        Netns {
            path: PathBuf::from("/proc/self/ns/net"),
            origin: PathBuf::from("/proc/self/ns/net"),
            held: None,
            label: "the agent's own namespace".into(),
            pid: None,
            current: true,
        }
    }

    /// The target's process, for `pid/PID` and `container/ID` targets.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// The namespace's name, for `netns/NAME` targets.
    pub fn name(&self) -> Option<&str> {
        self.label.strip_prefix("netns/")
    }

    /// True when this is the agent's own namespace.
    pub fn is_current(&self) -> bool {
        self.current
    }

    /// The target's filesystem root: the process's root (its mount namespace) for a process, the
    /// agent's own root otherwise.
    pub fn root_path(&self) -> PathBuf {
        match self.pid() {
            Some(pid) => PathBuf::from(format!("/proc/{pid}/root")),
            None => PathBuf::from("/"),
        }
    }

    /// True while the target is there (its process runs, its named namespace exists).
    pub fn exists(&self) -> bool {
        self.origin.exists()
    }

    /// True while the namespace can still be entered: a process's namespace as long as this
    /// agent holds it, even after the process exited.
    pub fn reachable(&self) -> bool {
        self.held.is_some() || self.path.exists()
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> tokio::process::Command {
        let mut command = if self.current {
            tokio::process::Command::new(program)
        } else {
            let mut nsenter = tokio::process::Command::new("nsenter");
            nsenter
                .arg(format!("--net={}", self.path.display()))
                .arg("--")
                .arg(program);
            nsenter
        };
        command.kill_on_drop(true);
        command
    }

    /// Runs `f` on a new thread that entered the namespace, and returns its result.
    pub async fn run_in<T, F>(&self, f: F) -> std::io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> std::io::Result<T> + Send + 'static,
    {
        let path = (!self.current).then(|| self.path.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let entered = path.as_deref().map_or(Ok(()), enter);
            let _ = tx.send(entered.and_then(|()| f()));
        });
        rx.await
            .unwrap_or_else(|_| Err(std::io::Error::other("the namespace thread panicked")))
    }
}

/// Moves the calling thread into the namespace named by `path`.
pub(crate) fn enter(path: &Path) -> std::io::Result<()> {
    let file = File::open(path)?;
    nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
}
