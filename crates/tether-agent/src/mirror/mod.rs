//! Mirror: copies of the target's incoming TCP streams, without touching its traffic path.
//!
//! An `AF_PACKET` socket in the target namespace, with a BPF filter for the port ([`bpf`]),
//! feeds [`reassembly`]; each reassembled client → server stream goes to the session as an
//! `IncomingConnection` (mode mirror) followed by its bytes.

mod bpf;
mod reassembly;

use std::{
    io::Read as _,
    net::{SocketAddr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use socket2::{Domain, Protocol, Socket, Type};
use tether_protocol::{
    Body, IncomingConnection, Log, LogLevel, StreamData, StreamEnd, StreamReset, SubscriptionMode,
};
use tokio::sync::mpsc;

use crate::{
    http::{filter::Route, mirror_http_flow},
    netns::Netns,
};

use self::reassembly::{Event, FlowKey, Reassembler, Segment};

const ETH_P_IP: u16 = 0x0800;
/// Out-of-order bytes kept per flow before a gap is skipped.
const MAX_PENDING_PER_FLOW: usize = 4 << 20;
const MAX_FLOWS: usize = 16_384;
const RECV_BUFFER: usize = 16 << 20;

/// When the session's link is down and its replay buffer fills, a mirrored copy is ended (the
/// local process sees a reset; the pod's own connection is not touched) rather than making the
/// capture wait. Stolen connections need no such thing: their window bounds what they buffer.
#[derive(Debug, Clone)]
pub(crate) struct Pressure {
    pub(crate) connected: Arc<AtomicBool>,
    pub(crate) status: tokio::sync::watch::Receiver<tether_session::carrier::Status>,
    /// The replay buffer's size (`resume.buffer`).
    pub(crate) limit: usize,
}

impl Pressure {
    /// No link, and what waits for it (`queued`: what this capture sent since the link went
    /// down, plus the replay buffer) is half the limit, or the session's queue is half full.
    fn high(&self, out: &mpsc::Sender<Body>, queued: usize) -> bool {
        !self.connected.load(Ordering::Acquire)
            && (out.capacity() < out.max_capacity() / 2
                || queued + self.status.borrow().buffered_bytes >= self.limit / 2)
    }
}

/// A running capture; dropping it stops the capture thread (within 200 ms).
#[derive(Debug)]
pub(crate) struct Capture {
    stop: Arc<AtomicBool>,
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Opens a packet socket for `port` inside the namespace and mirrors what it sees to `out`, on a
/// thread of its own (a blocking socket needs no `unsafe` fd registration with the runtime).
/// `loopback_only`: under a mesh, only the sidecar's plaintext hop to the app on `lo`.
pub(crate) async fn start(
    netns: &Netns,
    port: u16,
    out: mpsc::Sender<Body>,
    next_stream: Arc<AtomicU64>,
    route: Option<Arc<Route>>,
    loopback_only: bool,
    pressure: Pressure,
) -> std::io::Result<Capture> {
    let socket = netns
        .run_in(move || {
            let protocol = Protocol::from(i32::from(ETH_P_IP.to_be()));
            let socket = Socket::new(Domain::PACKET, Type::DGRAM, Some(protocol))?;
            let interface = loopback_only.then_some(bpf::LOOPBACK_IFINDEX);
            socket.attach_filter(&bpf::program(&[port], interface))?;
            // Bursts must not overflow the queue while the session is busy.
            let _ = socket.set_recv_buffer_size(RECV_BUFFER);
            socket.set_read_timeout(Some(Duration::from_millis(200)))?;
            Ok(socket)
        })
        .await?;
    let stop = Arc::new(AtomicBool::new(false));
    let thread_stop = Arc::clone(&stop);
    let filtered = route.map(|route| (route, tokio::runtime::Handle::current()));
    std::thread::Builder::new()
        .name(format!("mirror-{port}"))
        .spawn(move || {
            capture(
                socket,
                &out,
                &next_stream,
                &thread_stop,
                filtered,
                &pressure,
            )
        })?;
    Ok(Capture { stop })
}

/// With a route, every flow goes through [`mirror_http_flow`] (on the runtime) and only the
/// requests the route takes are copied; without one, whole connections are copied.
fn capture(
    mut socket: Socket,
    out: &mpsc::Sender<Body>,
    next_stream: &Arc<AtomicU64>,
    stop: &AtomicBool,
    filtered: Option<(Arc<Route>, tokio::runtime::Handle)>,
    pressure: &Pressure,
) {
    let mut flows = std::collections::HashMap::<FlowKey, mpsc::UnboundedSender<Bytes>>::new();
    let mut reassembler = Reassembler::new(MAX_PENDING_PER_FLOW, MAX_FLOWS);
    let mut ids = std::collections::HashMap::<FlowKey, u64>::new();
    // Bytes copied since the link went down (they wait in the session's queue).
    let mut sent_while_down = 0usize;
    let mut last_outage = None;
    let mut buf = vec![0u8; 65_536];
    let mut events = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let len = match socket.read(&mut buf) {
            Ok(len) => len,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(error) => {
                tracing::warn!(%error, "mirror capture failed");
                return;
            }
        };
        // Each outage counts from zero.
        let outage = match pressure.status.borrow().state {
            tether_session::carrier::LinkState::Down { since, .. } => Some(since),
            _ => None,
        };
        if outage != last_outage {
            last_outage = outage;
            sent_while_down = 0;
        }
        let Some(segment) = parse(&buf[..len]) else {
            continue;
        };
        reassembler.on_segment(segment, &mut events);
        if let Some((route, runtime)) = &filtered {
            for event in events.drain(..) {
                match event {
                    Event::Open(key) => {
                        let (tx, rx) = mpsc::unbounded_channel();
                        flows.insert(key, tx);
                        let flow = mirror_http_flow(
                            rx,
                            key.server,
                            key.client,
                            Arc::clone(route),
                            out.clone(),
                            Arc::clone(next_stream),
                        );
                        runtime.spawn(flow);
                    }
                    Event::Data(key, data) => {
                        if pressure.high(out, sent_while_down) && flows.remove(&key).is_some() {
                            // The flow's task ends with its channel; its copy stops here.
                            let _ = out.try_send(copy_ended(&key, "stopped"));
                            continue;
                        }
                        if let Some(tx) = flows.get(&key) {
                            if !pressure.connected.load(Ordering::Acquire) {
                                sent_while_down += data.len();
                            }
                            let _ = tx.send(data);
                        }
                    }
                    Event::Close(key) => {
                        flows.remove(&key);
                    }
                    Event::Gap(..) => {}
                }
            }
            continue;
        }
        for event in events.drain(..) {
            let body = match event {
                Event::Open(key) => {
                    let stream_id = next_stream.fetch_add(2, Ordering::Relaxed);
                    ids.insert(key, stream_id);
                    Body::IncomingConnection(IncomingConnection {
                        stream_id,
                        mode: SubscriptionMode::Mirror as i32,
                        local: Some(SocketAddr::V4(key.server).into()),
                        remote: Some(SocketAddr::V4(key.client).into()),
                    })
                }
                Event::Data(key, data) => {
                    let Some(&stream_id) = ids.get(&key) else {
                        continue;
                    };
                    if pressure.high(out, sent_while_down) {
                        // This copy ends here; the rest of the session keeps its buffer.
                        ids.remove(&key);
                        let reset = Body::StreamReset(StreamReset {
                            stream_id,
                            reason: "the link to tether is down and its buffer is half full".into(),
                            errno: libc::ECONNRESET,
                        });
                        let warning = copy_ended(&key, "was reset");
                        if out.blocking_send(reset).is_err() || out.blocking_send(warning).is_err()
                        {
                            return;
                        }
                        continue;
                    }
                    if !pressure.connected.load(Ordering::Acquire) {
                        sent_while_down += data.len();
                    }
                    Body::StreamData(StreamData { stream_id, data })
                }
                Event::Close(key) => {
                    let Some(stream_id) = ids.remove(&key) else {
                        continue;
                    };
                    Body::StreamEnd(StreamEnd {
                        stream_id,
                        trailers: Vec::new(),
                    })
                }
                Event::Gap(key, lost) => Body::Log(Log {
                    level: LogLevel::Warn as i32,
                    message: format!(
                        "mirror: {lost} bytes of {} → {} were lost; the copy skips them",
                        key.client, key.server
                    ),
                    target: "mirror".into(),
                }),
            };
            if out.blocking_send(body).is_err() {
                return;
            }
        }
    }
}

/// The warning for a mirrored copy ended under pressure (`how`: "was reset", "stopped").
fn copy_ended(key: &FlowKey, how: &str) -> Body {
    Body::Log(Log {
        level: LogLevel::Warn as i32,
        message: format!(
            "mirror: the copy of {} → {} {how} while the link was down (its buffer was half full); the pod's connection is not affected",
            key.client, key.server
        ),
        target: "mirror".into(),
    })
}

fn parse(packet: &[u8]) -> Option<Segment> {
    let sliced = SlicedPacket::from_ip(packet).ok()?;
    let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(tcp))) =
        (&sliced.net, &sliced.transport)
    else {
        return None;
    };
    let header = ip.header();
    Some(Segment {
        key: FlowKey {
            client: SocketAddrV4::new(header.source_addr(), tcp.source_port()),
            server: SocketAddrV4::new(header.destination_addr(), tcp.destination_port()),
        },
        seq: tcp.sequence_number(),
        syn: tcp.syn(),
        fin: tcp.fin(),
        rst: tcp.rst(),
        payload: Bytes::copy_from_slice(tcp.payload()),
    })
}
