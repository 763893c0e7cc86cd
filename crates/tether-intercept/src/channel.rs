//! The layer's side of the local channel to the proxy: one JSON object per line over a Unix
//! socket, request then answer, blocking. Safe code only.
//!
//! File operations carry the wire protocol's own messages (`FsRequest` / `FsResponse`,
//! protobuf) as a binary payload of `len` bytes right after their line, so file data is never
//! escaped into JSON and the op set is defined once.
//!
//! The message types are shared by the interceptors and the proxy (all depend on this crate), so
//! the sides cannot drift.

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

/// The variable naming the syscall supervisor's socket: the preloaded layer hands a program it
/// cannot enter (a Go program, a static executable) over to the supervisor there, as it
/// executes it.
pub const SUPERVISOR_ENV: &str = "TETHER_SUPERVISOR_SOCKET";

/// The variable holding the preloaded library's own path, so its `execve` hook can keep it
/// preloaded in a replaced environment.
pub const LIBRARY_ENV: &str = "TETHER_LAYER_PATH";

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
    /// The name of `address` in the target (its hosts file, then a PTR query); answered with
    /// `Resolved`, whose `canonical` is the name (empty: none).
    ResolveAddress { address: std::net::IpAddr },
    /// A file operation: a protobuf `FsRequest` of `len` bytes follows the line.
    Fs { len: usize },
    /// The process closed the sockets using these UDP relay streams.
    Release { streams: Vec<u64> },
}

/// The loopback address an interceptor binds a socket of `family` (`AF_INET`, `AF_INET6`) to
/// before a [`Request::Connect`] to `remote`: IPv4, IPv4-mapped on an IPv6 socket for an IPv4
/// destination, else `::1`.
pub fn loopback_for(family: i32, remote: SocketAddr) -> std::net::IpAddr {
    use std::net::{Ipv4Addr, Ipv6Addr};
    match (family, remote) {
        (libc::AF_INET, _) => Ipv4Addr::LOCALHOST.into(),
        (_, SocketAddr::V4(_)) => Ipv4Addr::LOCALHOST.to_ipv6_mapped().into(),
        _ => Ipv6Addr::LOCALHOST.into(),
    }
}

/// The `from` of a [`Request::Connect`] for a socket bound to `local`: its loopback address
/// (an unspecified address means `loopback`), without IPv4 mapping.
pub fn connect_source(local: SocketAddr, loopback: std::net::IpAddr) -> SocketAddr {
    let from = if local.ip().is_unspecified() {
        SocketAddr::new(loopback, local.port())
    } else {
        local
    };
    match from {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => from,
        },
        v4 => v4,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    Tcp,
    Udp,
}

/// How the target's files are used, when no list names a path (`feature.fs.mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsMode {
    /// Every file is local.
    Local,
    /// Read from the target, written locally.
    #[default]
    Read,
    /// Read from and written to the target.
    Write,
    /// Local, except what the lists send to the target.
    LocalWithOverrides,
}

/// What the target's traffic to a port does for a listener of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// The target's connections come here instead of to the target's app.
    Steal,
    /// Copies of the target's connections come here; the target's app still answers.
    Mirror,
}

impl Delivery {
    /// The verb, for messages ("cannot steal target port 80").
    pub fn verb(self) -> &'static str {
        match self {
            Delivery::Steal => "steal",
            Delivery::Mirror => "mirror",
        }
    }
}

/// The configuration the layer applies itself (see `policy`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySpec {
    pub fs_mode: FsMode,
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
        mode: Delivery,
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
        /// The session stream carrying it.
        stream: u64,
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

/// Why a request got no answer.
#[derive(Debug)]
pub enum AskError {
    /// The request did not reach the proxy (the channel was already broken): sending it again on
    /// a new channel is safe.
    NotSent(std::io::Error),
    /// The request may have been carried out, but its answer was lost: never send it again.
    Lost(std::io::Error),
}

impl std::fmt::Display for AskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AskError::NotSent(e) | AskError::Lost(e) => e.fmt(f),
        }
    }
}

/// One connection to the proxy, on a single fd (so the layer can recognise it).
#[derive(Debug)]
pub struct Channel {
    stream: BufReader<UnixStream>,
    /// The socket's inode, to tell it from a reused fd number.
    pub ino: u64,
}

impl Channel {
    pub fn connect(path: &Path) -> std::io::Result<Channel> {
        Channel::from_stream(UnixStream::connect(path)?)
    }

    pub fn from_stream(stream: UnixStream) -> std::io::Result<Channel> {
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Channel {
            stream: BufReader::new(stream),
            ino: 0,
        })
    }

    /// The channel's file descriptor.
    pub fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd as _;
        self.stream.get_ref().as_raw_fd()
    }

    pub fn ask(&mut self, request: &Request) -> Result<Answer, AskError> {
        self.ask_with(request, &[]).map(|(answer, _)| answer)
    }

    /// Sends `request` with its payload; returns the answer with its payload.
    pub fn ask_with(
        &mut self,
        request: &Request,
        payload: &[u8],
    ) -> Result<(Answer, Vec<u8>), AskError> {
        let mut bytes =
            serde_json::to_vec(request).map_err(|e| AskError::NotSent(std::io::Error::other(e)))?;
        bytes.push(b'\n');
        bytes.extend_from_slice(payload);
        self.stream
            .get_mut()
            .write_all(&bytes)
            .map_err(AskError::NotSent)?;
        let mut line = String::new();
        match self.stream.read_line(&mut line) {
            Ok(0) => {
                return Err(AskError::Lost(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the proxy closed the channel",
                )));
            }
            Ok(_) => {}
            Err(e) => return Err(AskError::Lost(e)),
        }
        let answer: Answer =
            serde_json::from_str(&line).map_err(|e| AskError::Lost(std::io::Error::other(e)))?;
        let mut payload = vec![0; answer.payload_len().min(MAX_PAYLOAD)];
        std::io::Read::read_exact(&mut self.stream, &mut payload).map_err(AskError::Lost)?;
        Ok((answer, payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_keep_their_wire_names() {
        // The layer of an older tether build may still run in a process: the JSON must not move.
        let spec = PolicySpec {
            fs_mode: FsMode::LocalWithOverrides,
            ..PolicySpec::default()
        };
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["fs_mode"], "localwithoverrides");
        let answer = Answer::Remote {
            remote_port: 80,
            mode: Delivery::Mirror,
        };
        assert_eq!(
            serde_json::to_string(&answer).unwrap(),
            r#"{"answer":"remote","remote_port":80,"mode":"mirror"}"#
        );
        assert!(
            serde_json::from_str::<Answer>(r#"{"answer":"remote","remote_port":80,"mode":"copy"}"#)
                .is_err()
        );
    }
}
