//! What the process asks of the target: outgoing connections, names, files (environment is read
//! once by `exec`, see [`Proxy::environment`](super::Proxy::environment)).
//!
//! Outgoing TCP: the layer asks `Connect` with the loopback address its socket is bound to; the
//! agent opens the connection in the target; the answer names this proxy's outgoing listener,
//! where the socket then connects. The accepted connection is matched to the open stream by the
//! socket's port and pumped like a stolen connection. A pending stream whose socket never comes
//! is reset after [`CLAIM_TIMEOUT`].
//!
//! Outgoing UDP: one relay socket per destination, connected to the process's socket; each
//! datagram is one `Datagram` frame.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use prost::Message as _;
use tether_config::{Config, model::FsMode};
use tether_intercept::channel::{self, Answer, PolicySpec, Transport};
use tether_protocol::{
    AddressFamily, Body, Datagram, DnsLookup, ErrorCode, OutgoingConnect, StreamEnd, StreamReset,
    request, response,
};
use tether_session::stream::{Relay, Stream, StreamInput, pump};
use tokio::net::{TcpListener, UdpSocket};

use super::{Session, Shared};

/// How long an outgoing stream waits for the process's socket to connect to the proxy.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(10);

/// A UDP relay nobody used for this long is closed. Relays end when the process closes its
/// socket (`Release`); this only bounds those of a process that died without closing.
const UDP_IDLE: Duration = Duration::from_secs(30 * 60);

/// An outgoing stream open in the target, waiting for the process's socket.
#[derive(Debug)]
pub(super) struct PendingOutgoing {
    up: Arc<Session>,
    stream: Stream,
}

/// The layer's part of the configuration. `target_files`: the target has a filesystem of its
/// own (a process target); a bare network namespace has only this host's, so files stay local.
pub(super) fn policy_spec(config: &Config, target_files: bool) -> PolicySpec {
    let feature = &config.feature;
    let outgoing = &feature.network.outgoing;
    let dns = &feature.network.dns;
    PolicySpec {
        fs_mode: match feature.fs.mode {
            _ if !target_files => channel::FsMode::Local,
            FsMode::Local => channel::FsMode::Local,
            FsMode::Read => channel::FsMode::Read,
            FsMode::Write => channel::FsMode::Write,
            FsMode::LocalWithOverrides => channel::FsMode::LocalWithOverrides,
        },
        fs_read_write: feature.fs.read_write.clone(),
        fs_read_only: feature.fs.read_only.clone(),
        fs_local: feature.fs.local.clone(),
        fs_not_found: feature.fs.not_found.clone(),
        outgoing_tcp: outgoing.tcp,
        outgoing_udp: outgoing.udp,
        outgoing_ignore_localhost: outgoing.ignore_localhost,
        outgoing_remote: outgoing.filter.remote.clone(),
        outgoing_local: outgoing.filter.local.clone(),
        dns_enabled: dns.enabled,
        dns_remote: dns.filter.remote.clone(),
        dns_local: dns.filter.local.clone(),
    }
}

fn errno_answer(error: &tether_protocol::ErrorInfo, fallback: i32) -> Answer {
    Answer::Errno {
        errno: if error.errno != 0 {
            error.errno
        } else {
            fallback
        },
        message: error.message.clone(),
    }
}

impl Shared {
    fn new_stream_id(&self) -> u64 {
        self.next_stream
            .fetch_add(2, std::sync::atomic::Ordering::Relaxed)
    }

    pub(super) async fn connect_out(
        self: &Arc<Self>,
        transport: Transport,
        remote: SocketAddr,
        from: SocketAddr,
        hostname: Option<String>,
    ) -> Answer {
        let stream_id = self.new_stream_id();
        // The connection stays with the agent it was opened through, even when the primary
        // session moves to another pod's agent.
        let up = self.primary();
        // Registered before asking: the remote side may speak first, right after `Connected`.
        let stream = up.open_stream(stream_id, false);
        let connect = OutgoingConnect {
            stream_id,
            transport: match transport {
                Transport::Tcp => tether_protocol::Transport::Tcp,
                Transport::Udp => tether_protocol::Transport::Udp,
            } as i32,
            remote: Some(remote.into()),
            hostname: hostname.unwrap_or_default(),
        };
        let local = match up.request(request::Op::OutgoingConnect(connect)).await {
            Ok(response::Result::Connected(connected)) => connected
                .local
                .as_ref()
                .and_then(|l| SocketAddr::try_from(l).ok()),
            Ok(_) => None,
            Err(error) => {
                up.close_stream(stream_id);
                tracing::debug!(%remote, error = %error.message, "outgoing connection refused in the target");
                return errno_answer(&error, libc::ECONNREFUSED);
            }
        };
        match transport {
            Transport::Tcp => {
                let via = if from.is_ipv4() {
                    Some(self.outgoing_v4)
                } else {
                    self.outgoing_v6
                };
                let Some(via) = via else {
                    end_stream(&up, stream_id).await;
                    return Answer::Errno {
                        errno: libc::ENETUNREACH,
                        message: "IPv6 loopback is not available to the proxy".into(),
                    };
                };
                let replaced = self.pending_outgoing.lock().expect("pending lock").insert(
                    from,
                    PendingOutgoing {
                        up: Arc::clone(&up),
                        stream,
                    },
                );
                if let Some(replaced) = replaced {
                    // The socket asked again before connecting: its first stream is not needed.
                    end_stream(&replaced.up, replaced.stream.id).await;
                }
                let shared = Arc::clone(self);
                tokio::spawn(async move {
                    tokio::time::sleep(CLAIM_TIMEOUT).await;
                    let unclaimed = {
                        let mut pending = shared.pending_outgoing.lock().expect("pending lock");
                        let ours = pending.get(&from).is_some_and(|p| p.stream.id == stream_id);
                        ours && pending.remove(&from).is_some()
                    };
                    if unclaimed {
                        end_stream(&up, stream_id).await;
                    }
                });
                Answer::Connected {
                    via,
                    local,
                    stream: stream_id,
                }
            }
            Transport::Udp => match self.udp_relay(&up, from, stream).await {
                Ok(via) => Answer::Connected {
                    via,
                    local,
                    stream: stream_id,
                },
                Err(error) => {
                    end_stream(&up, stream_id).await;
                    Answer::Errno {
                        errno: error.raw_os_error().unwrap_or(libc::EIO),
                        message: format!("cannot open a UDP relay: {error}"),
                    }
                }
            },
        }
    }

    /// Accepts the process's sockets for outgoing connections and pumps each to its stream.
    pub(super) async fn accept_outgoing(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (socket, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and the like: do not spin; the process's connect waits meanwhile.
                    tracing::warn!(%error, "cannot accept an outgoing connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let pending = self
                .pending_outgoing
                .lock()
                .expect("pending lock")
                .remove(&peer);
            let Some(pending) = pending else {
                // Not one of ours (a stray local client): close it.
                continue;
            };
            let _ = socket.set_nodelay(true);
            tokio::spawn(async move {
                let PendingOutgoing { up, mut stream } = pending;
                let (mut read, mut write) = socket.into_split();
                pump(
                    &mut read,
                    &mut write,
                    stream.id,
                    &mut stream.input,
                    &stream.window,
                    &up.out,
                    Relay::Windowed,
                )
                .await;
            });
        }
    }

    /// A relay socket for one UDP destination, connected to the process's socket `app`.
    async fn udp_relay(
        self: &Arc<Self>,
        up: &Arc<Session>,
        app: SocketAddr,
        stream: Stream,
    ) -> std::io::Result<SocketAddr> {
        let stream_id = stream.id;
        let bind: SocketAddr = if app.is_ipv4() {
            (std::net::Ipv4Addr::LOCALHOST, 0).into()
        } else {
            (std::net::Ipv6Addr::LOCALHOST, 0).into()
        };
        let socket = UdpSocket::bind(bind).await?;
        socket.connect(app).await?;
        let via = socket.local_addr()?;
        let up = Arc::clone(up);
        tokio::spawn(async move {
            // The whole stream moves in (its registration too, which a closure capturing only
            // `stream.input` would leave behind to be dropped at once).
            let mut stream = stream;
            let mut buf = vec![0u8; 65_536];
            loop {
                tokio::select! {
                    received = socket.recv(&mut buf) => {
                        // ECONNREFUSED: the process's socket is gone for now; keep the relay.
                        if let Ok(n) = received {
                            let datagram = Datagram {
                                stream_id,
                                data: Bytes::copy_from_slice(&buf[..n]),
                                peer: None,
                            };
                            if up.out.send(Body::Datagram(datagram)).await.is_err() {
                                break;
                            }
                        }
                    }
                    item = stream.input.recv() => match item {
                        Some(StreamInput::Data(data)) => {
                            let _ = socket.send(&data).await;
                        }
                        // Released by the process (the entry was removed): end it in the agent.
                        None => {
                            let end = StreamEnd { stream_id, trailers: Vec::new() };
                            let _ = up.out.send(Body::StreamEnd(end)).await;
                            break;
                        }
                        // Ended or reset by the agent.
                        Some(_) => break,
                    },
                    () = tokio::time::sleep(UDP_IDLE) => {
                        let end = StreamEnd { stream_id, trailers: Vec::new() };
                        let _ = up.out.send(Body::StreamEnd(end)).await;
                        break;
                    }
                }
            }
        });
        Ok(via)
    }

    /// The process closed the sockets of these UDP relays.
    pub(super) fn release(&self, streams: &[u64]) -> Answer {
        // The ids this side opens are unique across sessions.
        let mirrors = self.mirrors.lock().expect("mirrors lock").clone();
        for up in std::iter::once(self.primary()).chain(mirrors) {
            for &stream in streams {
                // Closing the stream ends the relay's task, which ends the stream in the agent.
                up.close_stream(stream);
            }
        }
        Answer::Done
    }

    pub(super) async fn resolve(&self, name: String, family: u8) -> Answer {
        let lookup = DnsLookup {
            name,
            family: match family {
                4 => AddressFamily::Ipv4,
                6 => AddressFamily::Ipv6,
                _ => AddressFamily::Any,
            } as i32,
            address: Default::default(),
        };
        self.dns(lookup).await
    }

    /// The name of `address` in the target.
    pub(super) async fn resolve_address(&self, address: std::net::IpAddr) -> Answer {
        let address = match address {
            std::net::IpAddr::V4(v4) => bytes::Bytes::copy_from_slice(&v4.octets()),
            std::net::IpAddr::V6(v6) => bytes::Bytes::copy_from_slice(&v6.octets()),
        };
        self.dns(DnsLookup {
            address,
            ..Default::default()
        })
        .await
    }

    async fn dns(&self, lookup: DnsLookup) -> Answer {
        match self.request(request::Op::DnsLookup(lookup)).await {
            Ok(response::Result::DnsAnswer(answer)) => Answer::Resolved {
                addresses: answer
                    .addresses
                    .iter()
                    .filter_map(|bytes| match bytes.len() {
                        4 => <[u8; 4]>::try_from(&bytes[..])
                            .ok()
                            .map(std::net::IpAddr::from),
                        16 => <[u8; 16]>::try_from(&bytes[..])
                            .ok()
                            .map(std::net::IpAddr::from),
                        _ => None,
                    })
                    .collect(),
                canonical: answer.canonical_name,
            },
            // No such name: an empty answer (the layer says EAI_NONAME).
            Err(error) if error.code() == ErrorCode::NotFound => Answer::Resolved {
                addresses: Vec::new(),
                canonical: String::new(),
            },
            Ok(_) => errno_answer(&Default::default(), libc::EIO),
            Err(error) => errno_answer(&error, libc::EAGAIN),
        }
    }

    /// A file operation: the payload is a protobuf `FsRequest`, the answer's a `FsResponse`.
    pub(super) async fn fs(&self, payload: &[u8]) -> (Answer, Vec<u8>) {
        let Ok(request) = tether_protocol::FsRequest::decode(payload) else {
            let bad = Answer::Errno {
                errno: libc::EINVAL,
                message: "a malformed file request from the layer".into(),
            };
            return (bad, Vec::new());
        };
        match self.request(request::Op::Fs(request)).await {
            Ok(response::Result::Fs(response)) => {
                let bytes = response.encode_to_vec();
                (Answer::Fs { len: bytes.len() }, bytes)
            }
            Ok(_) => (errno_answer(&Default::default(), libc::EIO), Vec::new()),
            Err(error) => (errno_answer(&error, libc::EIO), Vec::new()),
        }
    }
}

/// Closes a stream this side opened (both directions).
async fn end_stream(up: &Session, stream_id: u64) {
    up.close_stream(stream_id);
    let reset = StreamReset {
        stream_id,
        reason: "closed by the local process".into(),
        errno: 0,
    };
    let _ = up.out.send(Body::StreamReset(reset)).await;
}
