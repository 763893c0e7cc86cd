//! What a running `tether exec` tells `tether status` and `tether doctor latency`: a Unix socket
//! per run in the status directory (`$XDG_RUNTIME_DIR/tether`, else `/run/tether` for root, else
//! `/tmp/tether-<uid>`), named after tether's pid. A client writes one request line (`status`,
//! or `latency N`) and reads one JSON line back.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};
use tether_session::carrier::{Control, LinkState, Status};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::watch,
};

use super::Session;

/// Where running sessions put their status sockets.
pub(crate) fn dir() -> PathBuf {
    if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR") {
        return Path::new(&runtime).join("tether");
    }
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        PathBuf::from("/run/tether")
    } else {
        PathBuf::from(format!("/tmp/tether-{uid}"))
    }
}

/// What does not change during a run.
#[derive(Debug, Clone)]
pub(crate) struct RunInfo {
    pub(crate) target: String,
    pub(crate) command: String,
}

/// The status socket of this run; removed when dropped.
#[derive(Debug)]
pub(crate) struct StatusSocket {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StatusSocket {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

impl StatusSocket {
    /// Starts serving; `None` (with a debug log) when the directory cannot be used: status is a
    /// convenience, never a reason to fail a run.
    pub(crate) fn start(
        info: RunInfo,
        primary: watch::Receiver<Arc<Session>>,
    ) -> Option<StatusSocket> {
        let dir = dir();
        let bound = std::fs::create_dir_all(&dir)
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            })
            .and_then(|()| {
                let path = dir.join(format!("{}.sock", std::process::id()));
                let _ = std::fs::remove_file(&path);
                UnixListener::bind(&path).map(|listener| (path, listener))
            });
        let (path, listener) = match bound {
            Ok(bound) => bound,
            Err(error) => {
                tracing::debug!(dir = %dir.display(), %error, "no status socket");
                return None;
            }
        };
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                // The session of the moment: following the target replaces it.
                let (info, up) = (info.clone(), primary.borrow().clone());
                tokio::spawn(async move {
                    let _ = answer(stream, &info, started, &up).await;
                });
            }
        });
        Some(StatusSocket { path, task })
    }
}

async fn answer(
    stream: UnixStream,
    info: &RunInfo,
    started: u64,
    up: &Session,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(read).read_line(&mut line),
    )
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let mut words = line.split_whitespace();
    let reply = match words.next() {
        Some("latency") => {
            let count = words
                .next()
                .and_then(|n| n.parse::<u32>().ok())
                .unwrap_or(10)
                .clamp(1, 1000);
            latency(&up.control, count).await
        }
        _ => report(info, started, up, &up.status.borrow()),
    };
    write.write_all(format!("{reply}\n").as_bytes()).await
}

fn report(info: &RunInfo, started: u64, up: &Session, status: &Status) -> Value {
    let (state, down_ms, reason) = match &status.state {
        LinkState::Up => ("up", None, None),
        LinkState::Down { since, reason } => (
            "reconnecting",
            Some(since.elapsed().as_millis() as u64),
            Some(reason.clone()),
        ),
        LinkState::Ended { reason } => ("ended", None, Some(reason.clone())),
    };
    json!({
        "pid": std::process::id(),
        "target": info.target,
        "session": up.session_id,
        "pod": (!up.pod.is_empty()).then_some(&up.pod),
        "command": info.command,
        "started_unix": started,
        "link": state,
        "down_ms": down_ms,
        "reason": reason,
        "rtt_us": status.rtt.map(|rtt| rtt.as_micros() as u64),
        "reconnects": status.links.saturating_sub(1),
        "buffered_frames": status.buffered_frames,
        "buffered_bytes": status.buffered_bytes,
    })
}

/// `count` pings one after the other over the session.
async fn latency(control: &Control, count: u32) -> Value {
    let mut samples = Vec::new();
    let mut lost = 0;
    for _ in 0..count {
        match control.ping(Duration::from_secs(5)).await {
            Some(rtt) => samples.push(rtt.as_micros() as u64),
            None => lost += 1,
        }
    }
    json!({ "pid": std::process::id(), "rtt_us": samples, "lost": lost })
}

/// Asks one running session; `None` when it does not answer (a stale socket).
pub(crate) async fn ask(path: &Path, request: &str) -> Option<Value> {
    let exchange = async {
        let mut stream = UnixStream::connect(path).await.ok()?;
        stream
            .write_all(format!("{request}\n").as_bytes())
            .await
            .ok()?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).await.ok()?;
        serde_json::from_str(&line).ok()
    };
    tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .ok()
        .flatten()
}

/// The status sockets present, oldest pid first.
pub(crate) fn sockets() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir()) else {
        return Vec::new();
    };
    let mut found: Vec<(u32, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let path = entry.path();
            let pid = path
                .file_name()?
                .to_str()?
                .strip_suffix(".sock")?
                .parse()
                .ok()?;
            Some((pid, path))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, path)| path).collect()
}
