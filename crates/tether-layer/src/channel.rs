//! The layer's side of the local channel to the proxy: one JSON object per line over a Unix
//! socket, request then answer, blocking. Safe code only.
//!
//! File operations carry the wire protocol's own messages (`FsRequest` / `FsResponse`,
//! protobuf) as a binary payload of `len` bytes right after their line, so file data is never
//! escaped into JSON and the op set is defined once.
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
    /// What the layer decides by itself (files, outgoing traffic, names): asked once.
    Policy,
    /// Open a connection to `remote` from the target. The layer's socket is bound to `from` (on
    /// loopback) and connects to the answer's `via` once the remote side is open.
    Connect {
        transport: Transport,
        remote: SocketAddr,
        from: SocketAddr,
        /// The name `remote` was resolved from, if the layer knows it (for logs).
        hostname: Option<String>,
    },
    /// Resolve `name` in the target (`family`: 0 any, 4, 6).
    Resolve { name: String, family: u8 },
    /// A file operation: a protobuf `FsRequest` of `len` bytes follows the line.
    Fs { len: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    Tcp,
    Udp,
}

/// The configuration the layer applies itself (see `policy`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySpec {
    /// `local`, `read`, `write` or `localwithoverrides`.
    pub fs_mode: String,
    pub fs_read_write: Vec<String>,
    pub fs_read_only: Vec<String>,
    pub fs_local: Vec<String>,
    pub fs_not_found: Vec<String>,
    pub outgoing_tcp: bool,
    pub outgoing_udp: bool,
    pub outgoing_ignore_localhost: bool,
    pub outgoing_remote: Option<Vec<String>>,
    pub outgoing_local: Option<Vec<String>>,
    pub dns_enabled: bool,
    pub dns_remote: Option<Vec<String>>,
    pub dns_local: Option<Vec<String>>,
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
    Policy(PolicySpec),
    /// The remote side is open: connect to `via`. `local` is the socket's address in the target.
    Connected {
        via: SocketAddr,
        local: Option<SocketAddr>,
    },
    Resolved {
        addresses: Vec<std::net::IpAddr>,
        canonical: String,
    },
    /// A protobuf `FsResponse` of `len` bytes follows the line.
    Fs {
        len: usize,
    },
    /// The operation failed in the target with this errno (what the process should see).
    Errno {
        errno: i32,
        message: String,
    },
}

impl Request {
    /// How many payload bytes follow this message's line.
    pub fn payload_len(&self) -> usize {
        match self {
            Request::Fs { len } => *len,
            _ => 0,
        }
    }
}

impl Answer {
    /// How many payload bytes follow this message's line.
    pub fn payload_len(&self) -> usize {
        match self {
            Answer::Fs { len } => *len,
            _ => 0,
        }
    }

    /// The answer's line and payload as one buffer, for the proxy to write.
    pub fn encode(&self, payload: &[u8]) -> Vec<u8> {
        let mut bytes = serde_json::to_vec(self).expect("answers serialise");
        bytes.push(b'\n');
        bytes.extend_from_slice(payload);
        bytes
    }
}

/// The largest payload either side accepts (a frame's size).
pub const MAX_PAYLOAD: usize = 1 << 20;

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
        self.ask_with(request, &[]).map(|(answer, _)| answer)
    }

    /// Sends `request` with its payload; returns the answer with its payload.
    pub fn ask_with(
        &mut self,
        request: &Request,
        payload: &[u8],
    ) -> std::io::Result<(Answer, Vec<u8>)> {
        let mut bytes = serde_json::to_vec(request).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        bytes.extend_from_slice(payload);
        self.writer.write_all(&bytes)?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the proxy closed the channel",
            ));
        }
        let answer: Answer = serde_json::from_str(&line).map_err(std::io::Error::other)?;
        let mut payload = vec![0; answer.payload_len().min(MAX_PAYLOAD)];
        std::io::Read::read_exact(&mut self.reader, &mut payload)?;
        Ok((answer, payload))
    }
}
