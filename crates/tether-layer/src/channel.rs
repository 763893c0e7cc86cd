//! The layer's side of the local channel to the proxy: one JSON object per line over a Unix
//! socket, request then answer, blocking. Safe code only.
//!
//! The message types are shared with the proxy (it depends on this crate as a library), so the
//! two sides cannot drift.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// The variable naming the proxy's socket, set by `tether exec` for the process it starts.
pub const SOCKET_ENV: &str = "TETHER_LAYER_SOCKET";

/// Layer → proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The process listens on `addr` (a TCP socket). `requested_port` is the port it asked for in
    /// `bind` (0: the kernel picked one).
    Listen {
        pid: u32,
        addr: SocketAddr,
        requested_port: u16,
    },
    /// The listener on `addr` was closed.
    Unlisten { pid: u32, addr: SocketAddr },
    /// A connection accepted on `local` from `peer`: if the proxy made it on behalf of a remote
    /// client, which client?
    Peer { local: SocketAddr, peer: SocketAddr },
}

/// Proxy → layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum Answer {
    /// The listener gets the target's traffic of `remote_port`.
    Remote {
        remote_port: u16,
        mode: String,
    },
    /// The listener stays local (the reason is for logs).
    Local {
        reason: String,
    },
    /// The real remote peer of an accepted connection.
    Peer {
        addr: Option<SocketAddr>,
    },
    Done,
    Error {
        message: String,
    },
}

#[derive(Debug)]
pub struct Channel {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Channel {
    pub fn connect(path: &Path) -> std::io::Result<Channel> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Channel {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    pub fn ask(&mut self, request: &Request) -> std::io::Result<Answer> {
        let mut line = serde_json::to_string(request).map_err(std::io::Error::other)?;
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the proxy closed the channel",
            ));
        }
        serde_json::from_str(&answer).map_err(std::io::Error::other)
    }
}
