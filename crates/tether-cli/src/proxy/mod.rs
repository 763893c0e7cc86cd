//! The local proxy: holds the one session to the agent and serves every process of a
//! `tether exec` run through the layer's channel (a Unix socket).
//!
//! - Layer asks `Listen` → [`ports::decide`] → the agent subscribes the target port.
//! - The agent sends `IncomingConnection` → the proxy connects to the process's real listener and
//!   pumps bytes both ways (mirror: the process's answers are read and dropped).
//! - Layer asks `Peer` for an accepted connection → the remote client the proxy connected for.
//!
//! Flow control: the proxy reads from the app only within the window the agent granted, and
//! grants back what it wrote to the app, so a slow app slows the remote client (steal). Mirrored
//! bytes cannot slow the pod's real traffic: their queue per connection is bounded
//! ([`MIRROR_QUEUE_LIMIT`]) and a connection the app cannot keep up with is dropped, with a
//! warning.
//!
//! The session runs over a [`Carrier`]: when the link drops, `link.rs` reconnects and the
//! session resumes with nothing lost; the proxy's own code never sees the drop.

mod context;
pub(crate) mod link;
pub(crate) mod ports;
pub(crate) mod status;
mod upstream;

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use tether_config::model::IncomingConfig;
use tether_intercept::channel::{Answer, Delivery, Request as LayerRequest};
use tether_protocol::{
    Body, Frame, IncomingConnection, LogLevel, PortSubscribe, PortUnsubscribe, StreamData,
    StreamEnd, StreamReset, SubscriptionMode, request, response,
};
use tether_session::carrier::{Attach, Carrier, Endpoints, LinkState};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpStream, UnixListener, UnixStream},
    sync::mpsc,
    task::JoinSet,
};
pub(crate) use upstream::Upstream;

use self::ports::Decision;

/// What the proxy tells the user about.
#[derive(Debug, Clone)]
pub(crate) enum Event {
    /// A listener of the process now gets the target's traffic.
    Subscribed {
        local: SocketAddr,
        remote_port: u16,
        steal: bool,
    },
    /// A listener stays local, and why.
    StaysLocal { local: SocketAddr, reason: String },
    /// A warning the user must see (from the agent or the proxy).
    Warning(String),
    /// Something the agent did that the user should know (not a problem).
    Notice(String),
    /// The link dropped; reconnecting.
    LinkLost { reason: String },
    /// A reconnect attempt failed; the next one follows after `next`.
    Reconnecting {
        attempt: u32,
        next: Duration,
        error: String,
    },
    /// The session runs on a new link; nothing was lost.
    LinkResumed { after: Duration, attempts: u32 },
    /// The session with the agent is over (it cannot be resumed, or the agent ended it).
    SessionLost { reason: String },
}

type AppSender = hyper::client::conn::http1::SendRequest<
    http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>,
>;

/// Idle connections to the app kept at most.
const MAX_POOLED: usize = 1024;

/// Mirrored bytes queued for one connection before it is dropped as too slow.
const MIRROR_QUEUE_LIMIT: usize = 16 << 20;

#[derive(Debug)]
struct StreamEntry {
    tx: mpsc::UnboundedSender<ToStream>,
    /// Bytes queued for the app (mirror streams only; steal streams are bounded by the window).
    queued: Arc<std::sync::atomic::AtomicUsize>,
    mirror: bool,
}

#[derive(Debug)]
enum ToStream {
    Data(Bytes),
    End(Vec<tether_protocol::Header>),
    Reset(String),
}

#[derive(Debug, Clone)]
struct Listener {
    local: SocketAddr,
    /// What was asked of the agent, asked again of every new upstream.
    subscribe: PortSubscribe,
    /// The processes that called `listen` for this port. A forked child that inherited the socket
    /// and closes its copy is not among them, so it cannot end the subscription.
    owners: std::collections::BTreeSet<u32>,
}

#[derive(Debug)]
struct Shared {
    incoming: IncomingConfig,
    /// What the layer decides by itself.
    policy: tether_intercept::channel::PolicySpec,
    /// Where the process's sockets connect for their outgoing connections (IPv4, IPv6).
    outgoing_v4: SocketAddr,
    outgoing_v6: Option<SocketAddr>,
    /// Outgoing connections open in the target, waiting for the process's socket (by the local
    /// port it connects from).
    pending_outgoing: Mutex<HashMap<SocketAddr, context::PendingOutgoing>>,
    /// Stream ids this side opens (odd), unique across upstreams.
    next_stream: AtomicU64,
    /// Also steal kubelet probes (`probes.steal`).
    steal_probes: bool,
    /// Close the connections already open to a port when its steal starts
    /// (`agent.flush_connections`).
    flush_connections: bool,
    /// The session everything goes through (see `upstream.rs`).
    primary: tokio::sync::watch::Sender<Arc<Upstream>>,
    /// Sessions with the workload's other replicas, which only mirror (`mirror_all_replicas`).
    mirrors: Mutex<Vec<Arc<Upstream>>>,
    next_upstream: std::sync::atomic::AtomicU32,
    /// Held by whatever changes subscriptions (a listen, an unlisten, a session taking over, a
    /// mirror added), so each session sees every port exactly once.
    subscribing: tokio::sync::Mutex<()>,
    /// Sessions being closed after a move, awaited at shutdown.
    closing: Mutex<JoinSet<()>>,
    /// Where the end of the primary session goes when something follows the target (it may be
    /// the pod's replacement, not news for the user); else it is `Event::SessionLost`.
    primary_lost: Mutex<Option<mpsc::UnboundedSender<Lost>>>,
    /// By target port.
    listeners: Mutex<HashMap<u16, Listener>>,
    /// Each connection the proxy made to the app, as the app's `accept` sees it (its peer and
    /// local address: the source port alone is not unique, `connect` shares it between
    /// destinations) → the remote client it stands for, and which delivery registered it.
    peers: Mutex<HashMap<PeerKey, (SocketAddr, u64)>>,
    /// Numbers the registrations in `peers`.
    peer_marks: AtomicU64,
    /// Idle HTTP/1 connections to the app, by upstream, stolen client connection and listener.
    app_pool: Mutex<HashMap<(u32, u64, SocketAddr), AppSender>>,
    events: mpsc::UnboundedSender<Event>,
}

/// The end of a primary session, for whoever follows the target.
#[derive(Debug)]
pub(crate) struct Lost {
    /// Which session ended ([`Opened::key`]).
    pub(crate) key: String,
    pub(crate) reason: String,
}

/// A session just opened with an agent, to be attached to the proxy.
pub(crate) struct Opened {
    pub(crate) dialer: Arc<link::Dialer>,
    pub(crate) link: tether_session::carrier::Link,
    pub(crate) welcome: tether_protocol::Welcome,
    /// The pod the agent serves (empty for local targets), for messages.
    pub(crate) pod: String,
    /// What identifies the session for whoever follows the target: the pod's uid (a
    /// StatefulSet's replacement pod has the same name).
    pub(crate) key: String,
}

/// A running proxy; dropping it ends the session and the layer server.
#[derive(Debug)]
pub(crate) struct Proxy {
    tasks: JoinSet<()>,
    shared: Arc<Shared>,
}

/// What follows the target holds of the proxy: moving the session, adding and removing
/// mirroring replicas.
#[derive(Debug, Clone)]
pub(crate) struct Handle {
    shared: Arc<Shared>,
}

impl Proxy {
    /// Starts serving the layer on `socket` over the session just opened; when its link drops,
    /// its dialer reconnects and the session resumes.
    pub(crate) async fn start(
        opened: Opened,
        config: &tether_config::Config,
        target_files: bool,
        socket: &Path,
        events: mpsc::UnboundedSender<Event>,
    ) -> std::io::Result<Proxy> {
        let layer_listener = UnixListener::bind(socket)?;
        let outgoing_v4 = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        // IPv6 loopback may be disabled on this machine: then IPv6 destinations fail to connect.
        let outgoing_v6 = tokio::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0))
            .await
            .ok();
        let (first, start_first) = Shared::upstream(0, opened);
        let shared = Arc::new(Shared {
            incoming: config.feature.network.incoming.clone(),
            policy: context::policy_spec(config, target_files),
            outgoing_v4: outgoing_v4.local_addr()?,
            outgoing_v6: outgoing_v6.as_ref().and_then(|l| l.local_addr().ok()),
            pending_outgoing: Mutex::default(),
            next_stream: AtomicU64::new(1),
            steal_probes: config.probes.steal,
            flush_connections: config.agent.flush_connections,
            primary: tokio::sync::watch::channel(Arc::clone(&first)).0,
            mirrors: Mutex::default(),
            next_upstream: 1.into(),
            subscribing: tokio::sync::Mutex::new(()),
            closing: Mutex::default(),
            primary_lost: Mutex::default(),
            listeners: Mutex::default(),
            peers: Mutex::default(),
            peer_marks: AtomicU64::new(0),
            app_pool: Mutex::default(),
            events,
        });
        start_first(&shared);
        let mut tasks = JoinSet::new();
        let server = Arc::clone(&shared);
        tasks.spawn(async move {
            while let Ok((stream, _)) = layer_listener.accept().await {
                tokio::spawn(Arc::clone(&server).serve_layer(stream));
            }
        });
        for listener in std::iter::once(outgoing_v4).chain(outgoing_v6) {
            tasks.spawn(Arc::clone(&shared).accept_outgoing(listener));
        }
        Ok(Proxy { tasks, shared })
    }

    /// For following the target: the end of the primary session goes to the returned receiver
    /// instead of ending the run's session.
    pub(crate) fn follow(&self) -> (Handle, mpsc::UnboundedReceiver<Lost>) {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.shared.primary_lost.lock().expect("lost lock") = Some(tx);
        (
            Handle {
                shared: Arc::clone(&self.shared),
            },
            rx,
        )
    }

    /// The target process's environment.
    pub(crate) async fn environment(&self) -> Result<Vec<(String, String)>, String> {
        match self
            .shared
            .request(request::Op::EnvGet(Default::default()))
            .await
        {
            Ok(response::Result::Env(env)) => {
                Ok(env.vars.into_iter().map(|v| (v.name, v.value)).collect())
            }
            Ok(_) => Err("unexpected answer from the agent".into()),
            Err(error) => Err(error.message),
        }
    }

    /// Serves `tether status` and `tether doctor latency` for this run, about the session of
    /// the moment.
    pub(crate) fn status_socket(&self, info: status::RunInfo) -> Option<status::StatusSocket> {
        let primary = self.shared.primary.subscribe();
        status::StatusSocket::start(info, primary)
    }

    /// Tells the agents the session ends on purpose, then stops.
    pub(crate) async fn shutdown(mut self) {
        self.tasks.abort_all();
        let mirrors = std::mem::take(&mut *self.shared.mirrors.lock().expect("mirrors lock"));
        let primary = self.shared.primary();
        let closing = std::iter::once(primary)
            .chain(mirrors)
            .map(|up| async move { up.close("the command exited").await });
        futures_util::future::join_all(closing).await;
        // Sessions of replaced pods still saying goodbye.
        let mut moved = std::mem::take(&mut *self.shared.closing.lock().expect("closing lock"));
        while moved.join_next().await.is_some() {}
    }
}

/// Without a shutdown (tether failing on its way), the sessions end with the proxy: their tasks
/// hold them (and the proxy's state) until aborted.
impl Drop for Proxy {
    fn drop(&mut self) {
        let mirrors = self.shared.mirrors.lock().expect("mirrors lock").clone();
        for up in std::iter::once(self.shared.primary()).chain(mirrors) {
            up.tasks.lock().expect("tasks lock").abort_all();
        }
    }
}

impl Handle {
    /// Makes `opened` the primary session: every port is subscribed again on it first, then it
    /// takes over and the old session ends (its stolen connections close, as the old pod's
    /// would). With `mirror_all_replicas` a session that already mirrors that pod is promoted
    /// instead (`opened` is `None`, `key` names it).
    pub(crate) async fn replace_primary(
        &self,
        opened: Option<Opened>,
        key: &str,
    ) -> Result<(), String> {
        let shared = &self.shared;
        let _subscribing = shared.subscribing.lock().await;
        let new = match opened {
            Some(opened) => {
                let up = shared.attach(opened);
                if let Err(error) = shared.subscribe_all(&up, |_| true).await {
                    up.close("cannot take over the session").await;
                    return Err(error);
                }
                up
            }
            None => {
                let up = {
                    let mut mirrors = shared.mirrors.lock().expect("mirrors lock");
                    let index = mirrors
                        .iter()
                        .position(|m| m.key == key)
                        .ok_or_else(|| format!("no mirroring session {key}"))?;
                    mirrors.remove(index)
                };
                // It mirrors already; what only the primary has (steals) it takes now.
                let steals = |s: &PortSubscribe| s.mode() != SubscriptionMode::Mirror;
                if let Err(error) = shared.subscribe_all(&up, steals).await {
                    // Half a primary is no mirror either: it goes (and is mirrored again).
                    up.close("cannot take over the session").await;
                    return Err(error);
                }
                up
            }
        };
        let old = shared.primary.send_replace(new);
        // Its end is no news from now on (it is closed below, in the background).
        old.retired.store(true, Ordering::Release);
        shared
            .closing
            .lock()
            .expect("closing lock")
            .spawn(async move { old.close("the target pod was replaced").await });
        Ok(())
    }

    /// Adds a session that mirrors every mirrored port of another replica.
    pub(crate) async fn add_mirror(&self, opened: Opened) -> Result<(), String> {
        let _subscribing = self.shared.subscribing.lock().await;
        let up = self.shared.attach(opened);
        let mirrored = |s: &PortSubscribe| s.mode() == SubscriptionMode::Mirror;
        if let Err(error) = self.shared.subscribe_all(&up, mirrored).await {
            up.close("cannot mirror").await;
            return Err(error);
        }
        self.shared.mirrors.lock().expect("mirrors lock").push(up);
        Ok(())
    }

    /// Ends the mirroring session `key` (its pod scaled away or replaced).
    pub(crate) async fn remove_mirror(&self, key: &str) {
        let removed = {
            let mut mirrors = self.shared.mirrors.lock().expect("mirrors lock");
            mirrors
                .iter()
                .position(|m| m.key == key)
                .map(|index| mirrors.remove(index))
        };
        if let Some(up) = removed {
            up.close("the pod left the workload").await;
        }
    }

    /// The mirroring sessions: key and pod.
    pub(crate) fn mirrored(&self) -> Vec<(String, String)> {
        let mirrors = self.shared.mirrors.lock().expect("mirrors lock");
        mirrors
            .iter()
            .map(|m| (m.key.clone(), m.pod.clone()))
            .collect()
    }

    /// Ends the run's session (the target is gone for good): `Event::SessionLost` with `reason`.
    pub(crate) async fn end(&self, reason: String) {
        *self.shared.primary_lost.lock().expect("lost lock") = None;
        let primary = self.shared.primary();
        // A session that already ended on its own told only the follower: say it now.
        let ended = matches!(primary.status.borrow().state, LinkState::Ended { .. });
        if ended {
            let _ = self.shared.events.send(Event::SessionLost { reason });
        } else {
            primary.control.end(reason).await;
        }
    }

    /// Tells the user (as the proxy's own events).
    pub(crate) fn event(&self, event: Event) {
        let _ = self.shared.events.send(event);
    }
}

impl Shared {
    /// The session of the moment.
    fn primary(&self) -> Arc<Upstream> {
        self.primary.borrow().clone()
    }

    /// A new upstream over `opened`; the returned function starts its tasks (once the proxy's
    /// state exists).
    fn upstream(id: u32, opened: Opened) -> (Arc<Upstream>, impl FnOnce(&Arc<Shared>)) {
        let Opened {
            dialer,
            link,
            welcome,
            pod,
            key,
        } = opened;
        let (carrier, endpoints) = Carrier::spawn(
            dialer.settings,
            Attach {
                link,
                peer_received: 0,
                welcome: None,
            },
        );
        let Endpoints { out, mut incoming } = endpoints;
        let received = carrier.received_counter();
        let up = Arc::new(Upstream::new(
            id,
            pod,
            key,
            welcome.session_id.clone(),
            carrier,
            out,
        ));
        let this = Arc::clone(&up);
        let start = move |shared: &Arc<Shared>| {
            let mut tasks = this.tasks.lock().expect("tasks lock");
            let reader = Arc::clone(shared);
            let up = Arc::clone(&this);
            tasks.spawn(async move {
                while let Some(frame) = incoming.recv().await {
                    reader.on_frame(&up, frame);
                }
                let reason = match &up.status.borrow().state {
                    LinkState::Ended { reason } => reason.clone(),
                    _ => "the link closed".to_owned(),
                };
                reader.upstream_ended(&up, reason);
            });
            if dialer.settings.grace.is_some() {
                tasks.spawn(link::reconnect_forever(
                    Arc::clone(&dialer),
                    welcome.session_id.clone(),
                    this.control.clone(),
                    this.status.clone(),
                    move || received.load(Ordering::Acquire),
                    shared.events.clone(),
                ));
            }
        };
        (up, start)
    }

    /// A new upstream over `opened`, running.
    fn attach(self: &Arc<Self>, opened: Opened) -> Arc<Upstream> {
        let id = self.next_upstream.fetch_add(1, Ordering::Relaxed);
        let (up, start) = Shared::upstream(id, opened);
        start(self);
        up
    }

    /// Subscribes `up` to the ports the process listens on whose subscription `wanted` picks.
    async fn subscribe_all(
        &self,
        up: &Upstream,
        wanted: impl Fn(&PortSubscribe) -> bool,
    ) -> Result<(), String> {
        let subscriptions: Vec<PortSubscribe> = self
            .listeners
            .lock()
            .expect("listeners lock")
            .values()
            .map(|l| l.subscribe.clone())
            .filter(|s| wanted(s))
            .collect();
        for subscribe in subscriptions {
            let port = subscribe.port;
            up.request(request::Op::PortSubscribe(subscribe))
                .await
                .map_err(|e| {
                    format!(
                        "cannot subscribe port {port} in pod {}: {}",
                        up.pod, e.message
                    )
                })?;
        }
        Ok(())
    }

    /// An upstream's session is over: nobody will answer what waits on it, and its streams
    /// end. Unless the proxy ended it on purpose, that is news: for the primary, the run's
    /// session is lost (or, when something follows the target, that decides).
    fn upstream_ended(&self, up: &Arc<Upstream>, reason: String) {
        up.mark_ended();
        up.pending.lock().expect("pending lock").clear();
        up.streams.lock().expect("streams lock").clear();
        if up.retired.load(Ordering::Acquire) {
            return;
        }
        if Arc::ptr_eq(&self.primary(), up) {
            let follower = self.primary_lost.lock().expect("lost lock").clone();
            let lost = Lost {
                key: up.key.clone(),
                reason: reason.clone(),
            };
            if follower.is_none_or(|tx| tx.send(lost).is_err()) {
                let _ = self.events.send(Event::SessionLost { reason });
            }
        } else {
            let removed = {
                let mut mirrors = self.mirrors.lock().expect("mirrors lock");
                let before = mirrors.len();
                mirrors.retain(|m| !Arc::ptr_eq(m, up));
                mirrors.len() < before
            };
            if removed {
                let _ = self.events.send(Event::Warning(format!(
                    "mirroring pod {} stopped: {reason}",
                    up.pod
                )));
                // Whoever follows the target starts it again.
                let follower = self.primary_lost.lock().expect("lost lock").clone();
                if let Some(tx) = follower {
                    let _ = tx.send(Lost {
                        key: up.key.clone(),
                        reason,
                    });
                }
            }
        }
    }

    fn on_frame(self: &Arc<Self>, up: &Arc<Upstream>, frame: Frame) {
        match frame.body {
            Some(Body::Response(response)) => {
                if let Some(waiter) = up
                    .pending
                    .lock()
                    .expect("pending lock")
                    .remove(&response.id)
                {
                    let _ = waiter.send(response);
                }
            }
            Some(Body::IncomingConnection(info)) => {
                let (rx, queued) =
                    up.open_stream(info.stream_id, info.mode() == SubscriptionMode::Mirror);
                tokio::spawn(Arc::clone(self).deliver(Arc::clone(up), info, rx, queued));
            }
            Some(Body::WindowUpdate(update)) => {
                if let Some(window) = up
                    .windows
                    .lock()
                    .expect("windows lock")
                    .get(&update.stream_id)
                {
                    window.grant(u64::from(update.increment));
                }
            }
            Some(Body::StreamData(data)) => {
                self.to_stream(up, data.stream_id, ToStream::Data(data.data))
            }
            Some(Body::StreamEnd(end)) => {
                self.to_stream(up, end.stream_id, ToStream::End(end.trailers))
            }
            Some(Body::StreamReset(reset)) => {
                self.to_stream(up, reset.stream_id, ToStream::Reset(reset.reason))
            }
            Some(Body::Datagram(datagram)) => {
                self.to_stream(up, datagram.stream_id, ToStream::Data(datagram.data))
            }
            Some(Body::HttpRequestHead(head)) => {
                // A mirrored request's body cannot be slowed: its queue is bounded instead.
                let mirror = head.mode() == SubscriptionMode::Mirror;
                let (rx, queued) = up.open_stream(head.stream_id, mirror);
                tokio::spawn(Arc::clone(self).deliver_http(
                    Arc::clone(up),
                    head,
                    rx,
                    mirror.then_some(queued),
                ));
            }
            Some(Body::Log(log)) if log.level() >= LogLevel::Warn => {
                let _ =
                    self.events
                        .send(Event::Warning(format!("{}: {}", self.who(up), log.message)));
            }
            Some(Body::Log(log)) if log.level() == LogLevel::Info => {
                let _ = self.events.send(Event::Notice(log.message));
            }
            Some(Body::Error(error)) => {
                let _ = self.events.send(Event::Warning(format!(
                    "{}: {}",
                    self.who(up),
                    error.message
                )));
            }
            _ => {}
        }
    }

    /// Who speaks, in messages: the agent, or with several, which one.
    fn who(&self, up: &Arc<Upstream>) -> String {
        if Arc::ptr_eq(&self.primary(), up) {
            "agent".into()
        } else {
            format!("agent for pod {}", up.pod)
        }
    }

    fn to_stream(&self, up: &Upstream, id: u64, item: ToStream) {
        let mut streams = up.streams.lock().expect("streams lock");
        let Some(entry) = streams.get(&id) else {
            return;
        };
        if let (true, ToStream::Data(data)) = (entry.mirror, &item) {
            let queued = entry.queued.fetch_add(data.len(), Ordering::Relaxed) + data.len();
            if queued > MIRROR_QUEUE_LIMIT {
                streams.remove(&id);
                let message = format!(
                    "the local process reads a mirrored connection too slowly ({} MiB queued); that copy was dropped, the pod is not affected",
                    queued >> 20
                );
                let _ = self.events.send(Event::Warning(message));
                return;
            }
        }
        let _ = entry.tx.send(item);
    }

    async fn serve_layer(self: Arc<Self>, stream: UnixStream) {
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let (answer, payload) = match serde_json::from_str::<LayerRequest>(&line) {
                Ok(request) => {
                    // Checked before allocating: the length comes from the process's memory.
                    if request.payload_len() > tether_intercept::channel::MAX_PAYLOAD {
                        return;
                    }
                    let mut payload = vec![0; request.payload_len()];
                    if reader.read_exact(&mut payload).await.is_err() {
                        return;
                    }
                    self.on_layer(request, payload).await
                }
                Err(e) => (
                    Answer::Error {
                        message: format!("bad request from the layer: {e}"),
                    },
                    Vec::new(),
                ),
            };
            if write.write_all(&answer.encode(&payload)).await.is_err() {
                return;
            }
        }
    }

    async fn on_layer(
        self: &Arc<Self>,
        request: LayerRequest,
        payload: Vec<u8>,
    ) -> (Answer, Vec<u8>) {
        let answer = match request {
            LayerRequest::Listen {
                pid,
                addr,
                requested_port,
            } => self.listen(pid, addr, requested_port).await,
            LayerRequest::Unlisten { pid, addr } => {
                self.unlisten(pid, addr).await;
                Answer::Done
            }
            LayerRequest::Peer { peer, local } => Answer::Peer {
                addr: self
                    .peers
                    .lock()
                    .expect("peers lock")
                    .get(&(peer, local))
                    .map(|(remote, _)| *remote),
            },
            LayerRequest::Policy => Answer::Policy(self.policy.clone()),
            LayerRequest::Connect {
                transport,
                remote,
                from,
                hostname,
            } => self.connect_out(transport, remote, from, hostname).await,
            LayerRequest::Resolve { name, family } => self.resolve(name, family).await,
            LayerRequest::ResolveAddress { address } => self.resolve_address(address).await,
            LayerRequest::Fs { .. } => return self.fs(&payload).await,
            LayerRequest::Release { streams } => self.release(&streams),
        };
        (answer, Vec::new())
    }

    async fn listen(&self, pid: u32, local: SocketAddr, requested_port: u16) -> Answer {
        let (remote_port, steal) = match ports::decide(&self.incoming, local, requested_port) {
            Decision::Local(reason) => {
                let _ = self.events.send(Event::StaysLocal {
                    local,
                    reason: reason.clone(),
                });
                return Answer::Local { reason };
            }
            Decision::Remote { remote_port, steal } => (remote_port, steal),
        };
        let mode = if steal {
            Delivery::Steal
        } else {
            Delivery::Mirror
        };
        let _subscribing = self.subscribing.lock().await;
        {
            let mut listeners = self.listeners.lock().expect("listeners lock");
            if let Some(existing) = listeners.get_mut(&remote_port) {
                existing.owners.insert(pid);
                return Answer::Remote { remote_port, mode };
            }
        }
        let subscribe = PortSubscribe {
            port: u32::from(remote_port),
            mode: if steal {
                SubscriptionMode::Steal
            } else {
                SubscriptionMode::Mirror
            } as i32,
            http_filter: ports::wire_filter(&self.incoming.http_filter, remote_port),
            steal_probes: self.steal_probes,
            flush_connections: steal && self.flush_connections,
        };
        match self
            .primary()
            .request(request::Op::PortSubscribe(subscribe.clone()))
            .await
        {
            Ok(_) => {
                self.listeners.lock().expect("listeners lock").insert(
                    remote_port,
                    Listener {
                        local,
                        subscribe: subscribe.clone(),
                        owners: [pid].into(),
                    },
                );
                if !steal {
                    // The other replicas mirror it too.
                    let what = format!("cannot mirror target port {remote_port}");
                    self.ask_mirrors(request::Op::PortSubscribe(subscribe), &what)
                        .await;
                }
                let _ = self.events.send(Event::Subscribed {
                    local,
                    remote_port,
                    steal,
                });
                Answer::Remote { remote_port, mode }
            }
            Err(error) => {
                let _ = self.events.send(Event::Warning(format!(
                    "cannot {} target port {remote_port}: {}",
                    mode.verb(),
                    error.message
                )));
                Answer::Error {
                    message: error.message,
                }
            }
        }
    }

    async fn unlisten(&self, pid: u32, local: SocketAddr) {
        let _subscribing = self.subscribing.lock().await;
        let port = {
            let mut listeners = self.listeners.lock().expect("listeners lock");
            let Some((&port, listener)) = listeners.iter_mut().find(|(_, l)| l.local == local)
            else {
                return;
            };
            if !listener.owners.remove(&pid) || !listener.owners.is_empty() {
                return;
            }
            listeners.remove(&port);
            port
        };
        let unsubscribe = request::Op::PortUnsubscribe(PortUnsubscribe {
            port: u32::from(port),
        });
        let _ = self.primary().request(unsubscribe.clone()).await;
        self.ask_mirrors(
            unsubscribe,
            &format!("cannot stop mirroring target port {port}"),
        )
        .await;
    }

    /// Asks every mirroring session at once, each for at most 5 s (a replica whose link is down
    /// must not hold up the process's `listen`); failures are warnings.
    async fn ask_mirrors(&self, op: request::Op, what: &str) {
        let mirrors = self.mirrors.lock().expect("mirrors lock").clone();
        let asks = mirrors.iter().map(|up| {
            let op = op.clone();
            async move {
                let asked = tokio::time::timeout(Duration::from_secs(5), up.request(op)).await;
                (up, asked)
            }
        });
        for (up, asked) in futures_util::future::join_all(asks).await {
            let message = match asked {
                Ok(Ok(_)) => continue,
                Ok(Err(error)) => error.message,
                Err(_) => "no answer within 5 s".to_owned(),
            };
            let _ = self.events.send(Event::Warning(format!(
                "{what} in pod {}: {message}",
                up.pod
            )));
        }
    }

    /// Asks the primary session; a request caught by a move (its session closed under it) is
    /// asked again of the session that took over.
    async fn request(
        &self,
        op: request::Op,
    ) -> Result<response::Result, tether_protocol::ErrorInfo> {
        let up = self.primary();
        match up.request(op.clone()).await {
            Err(_) if up.retired.load(Ordering::Acquire) && !Arc::ptr_eq(&up, &self.primary()) => {
                self.primary().request(op).await
            }
            answered => answered,
        }
    }

    /// Connects to the process's listener for one incoming connection and pumps it.
    async fn deliver(
        self: Arc<Self>,
        up: Arc<Upstream>,
        info: IncomingConnection,
        mut from_agent: mpsc::UnboundedReceiver<ToStream>,
        queued: Arc<std::sync::atomic::AtomicUsize>,
    ) {
        let id = info.stream_id;
        let remote = info
            .remote
            .as_ref()
            .and_then(|r| SocketAddr::try_from(r).ok());
        let port = info
            .local
            .as_ref()
            .and_then(|l| SocketAddr::try_from(l).ok())
            .map(|a| a.port());
        let listener = port.and_then(|p| {
            self.listeners
                .lock()
                .expect("listeners lock")
                .get(&p)
                .cloned()
        });
        let mirror = info.mode() == SubscriptionMode::Mirror;
        let connected = match (&listener, remote) {
            (Some(listener), Some(remote)) => self.connect_for(listener.local, remote).await,
            _ => Err(std::io::Error::other("no local listener for this port")),
        };
        let (mut app, our_end) = match connected {
            Ok(connected) => connected,
            Err(error) => {
                if !mirror {
                    let reset = StreamReset {
                        stream_id: id,
                        reason: format!("the local process did not accept: {error}"),
                        errno: 0,
                    };
                    let _ = up.out.send(Body::StreamReset(reset)).await;
                }
                up.close_stream(id);
                return;
            }
        };
        let window = Arc::new(tether_session::flow::SendWindow::default());
        if !mirror {
            up.windows
                .lock()
                .expect("windows lock")
                .insert(id, Arc::clone(&window));
        }
        let (mut app_read, mut app_write) = app.split();
        self.pump(
            &up,
            &mut app_read,
            &mut app_write,
            id,
            &mut from_agent,
            mirror,
            &window,
            &queued,
        )
        .await;
        up.close_stream(id);
        self.forget_peer(our_end);
    }

    /// Pumps one connection to the app both ways: the agent's bytes into it (granting credit back
    /// as they are written), its bytes to the agent within the window — or, for a mirror, read and
    /// dropped. Shared by delivered TCP connections and upgraded HTTP connections.
    #[allow(clippy::too_many_arguments)]
    async fn pump<R, W>(
        &self,
        up: &Upstream,
        app_read: &mut R,
        app_write: &mut W,
        id: u64,
        from_agent: &mut mpsc::UnboundedReceiver<ToStream>,
        mirror: bool,
        window: &tether_session::flow::SendWindow,
        queued: &std::sync::atomic::AtomicUsize,
    ) where
        R: tokio::io::AsyncRead + Unpin,
        W: tokio::io::AsyncWrite + Unpin,
    {
        // A reset, or a stream whose session is gone, closes the app's connection at once (it
        // would otherwise wait for the app to speak).
        let aborted = tokio::sync::Notify::new();
        let copied = tokio::sync::Notify::new();
        let to_app = async {
            let mut credit = tether_session::flow::RecvCredit::default();
            while let Some(item) = from_agent.recv().await {
                match item {
                    ToStream::Data(data) => {
                        if app_write.write_all(&data).await.is_err() {
                            // The app closed its side: the remote end hears so, and nothing
                            // more is read from the app for it.
                            let reset = StreamReset {
                                stream_id: id,
                                reason: "the local process closed the connection".into(),
                                errno: 0,
                            };
                            let _ = up.out.send(Body::StreamReset(reset)).await;
                            break;
                        }
                        queued.fetch_sub(data.len(), Ordering::Relaxed);
                        if let Some(increment) = credit.consumed(data.len()) {
                            let update = tether_protocol::WindowUpdate {
                                stream_id: id,
                                increment,
                            };
                            let _ = up.out.send(Body::WindowUpdate(update)).await;
                        }
                    }
                    ToStream::End(_) => {
                        let _ = app_write.shutdown().await;
                        // Half-closed: the app may still answer, unless the stream is reset
                        // or its session ends meanwhile.
                        let reset = async {
                            while let Some(item) = from_agent.recv().await {
                                if matches!(item, ToStream::Reset(_)) {
                                    break;
                                }
                            }
                        };
                        tokio::select! {
                            () = reset => aborted.notify_one(),
                            () = copied.notified() => {}
                        }
                        return;
                    }
                    ToStream::Reset(_) => break,
                }
            }
            aborted.notify_one();
        };
        let copy = async {
            let mut buf = vec![0u8; tether_protocol::MAX_DATA_CHUNK];
            loop {
                // Mirror answers are dropped, so they need no credit.
                let allowed = if mirror {
                    buf.len()
                } else {
                    window.reserve(buf.len()).await
                };
                let read = app_read.read(&mut buf[..allowed]).await;
                if let (false, Ok(n)) = (mirror, &read) {
                    window.grant((allowed - n) as u64);
                }
                match read {
                    Ok(0) | Err(_) => break,
                    // Mirror: the target's app answers the client; the local answer is dropped.
                    Ok(_) if mirror => {}
                    Ok(n) => {
                        let data = Bytes::copy_from_slice(&buf[..n]);
                        if up
                            .out
                            .send(Body::StreamData(StreamData {
                                stream_id: id,
                                data,
                            }))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
            if !mirror {
                let _ = up
                    .out
                    .send(Body::StreamEnd(StreamEnd {
                        stream_id: id,
                        trailers: Vec::new(),
                    }))
                    .await;
            }
        };
        let from_app = async {
            tokio::select! {
                () = copy => {}
                () = aborted.notified() => {}
            }
            copied.notify_one();
        };
        tokio::join!(to_app, from_app);
    }

    /// One stolen HTTP request: sent to the app, its answer streamed back. A failure becomes a
    /// stream reset, which the agent answers with a 502 and the reason.
    async fn deliver_http(
        self: Arc<Self>,
        up: Arc<Upstream>,
        head: tether_protocol::HttpRequestHead,
        from_agent: mpsc::UnboundedReceiver<ToStream>,
        mirror_queue: Option<Arc<std::sync::atomic::AtomicUsize>>,
    ) {
        let id = head.stream_id;
        if let Err(reason) = self
            .http_exchange(&up, &head, from_agent, mirror_queue)
            .await
        {
            let reset = StreamReset {
                stream_id: id,
                reason,
                errno: 0,
            };
            let _ = up.out.send(Body::StreamReset(reset)).await;
        }
        up.close_stream(id);
    }

    async fn http_exchange(
        &self,
        up: &Upstream,
        head: &tether_protocol::HttpRequestHead,
        from_agent: mpsc::UnboundedReceiver<ToStream>,
        mirror_queue: Option<Arc<std::sync::atomic::AtomicUsize>>,
    ) -> Result<(), String> {
        let mirror = mirror_queue.is_some();
        use http_body_util::BodyExt as _;
        let id = head.stream_id;
        let port = head
            .local
            .as_ref()
            .and_then(|l| SocketAddr::try_from(l).ok())
            .map(|a| a.port());
        let remote = head
            .remote
            .as_ref()
            .and_then(|r| SocketAddr::try_from(r).ok())
            .ok_or("no remote address")?;
        let listener = port
            .and_then(|p| {
                self.listeners
                    .lock()
                    .expect("listeners lock")
                    .get(&p)
                    .cloned()
            })
            .ok_or("the local process no longer listens on this port")?;
        // HTTP/1 connections to the app are kept per stolen client connection, so a keep-alive
        // client's requests reuse one (and the app still sees that client as the peer).
        let pool_key = (up.id, head.connection_id, listener.local);
        let mut our_end = None;
        let mut reusable = None;
        let result = async {
            let uri: http::Uri = head
                .uri
                .parse()
                .map_err(|e| format!("bad request target {:?}: {e}", head.uri))?;
            let path = uri
                .path_and_query()
                .map_or("/", |pq| pq.as_str())
                .to_owned();
            let headers = tether_session::http::from_wire(&head.headers);
            let upgrade = tether_session::http::is_upgrade(&headers);
            // An upgrade request has no body; its stream stays open for the upgraded bytes.
            let (body, mut from_agent) = if upgrade {
                let empty = http_body_util::Empty::new()
                    .map_err(|e: std::convert::Infallible| match e {})
                    .boxed_unsync();
                (empty, Some(from_agent))
            } else if !headers.contains_key(http::header::CONTENT_LENGTH)
                && !headers.contains_key(http::header::TRANSFER_ENCODING)
            {
                // No body (a GET, say): send none, rather than an empty chunked one.
                let empty = http_body_util::Empty::new()
                    .map_err(|e: std::convert::Infallible| match e {})
                    .boxed_unsync();
                (empty, None)
            } else {
                (
                    request_body(from_agent, id, up.out.clone(), mirror_queue),
                    None,
                )
            };
            let mut request = http::Request::builder()
                .method(head.method.as_str())
                .uri(path)
                .body(body)
                .map_err(|e| format!("cannot rebuild the request: {e}"))?;
            *request.headers_mut() = headers;
            // The local app is spoken to in the client's HTTP version (h2c for h2, as a gRPC
            // server expects).
            let answered = if head.version() == tether_protocol::HttpVersion::Http2 {
                let (app, end) = self
                    .connect_for(listener.local, remote)
                    .await
                    .map_err(|e| format!("the local process did not accept: {e}"))?;
                our_end = Some(end);
                let io = hyper_util::rt::TokioIo::new(app);
                let (mut send, connection) =
                    hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                        .await
                        .map_err(|e| {
                            format!("HTTP/2 handshake with the local process failed: {e}")
                        })?;
                tokio::spawn(connection);
                if request.uri().scheme().is_none() {
                    let absolute = format!("http://localhost{}", request.uri());
                    *request.uri_mut() = absolute
                        .parse()
                        .map_err(|e| format!("bad request target: {e}"))?;
                }
                send.send_request(request).await
            } else {
                let pooled = if upgrade {
                    None
                } else {
                    self.app_pool.lock().expect("pool lock").remove(&pool_key)
                };
                let ready = match pooled {
                    Some(mut send) => send.ready().await.is_ok().then_some(send),
                    None => None,
                };
                let mut send = match ready {
                    Some(send) => send,
                    None => {
                        let (app, end) = self
                            .connect_for(listener.local, remote)
                            .await
                            .map_err(|e| format!("the local process did not accept: {e}"))?;
                        our_end = Some(end);
                        let (send, connection) = hyper::client::conn::http1::handshake(
                            hyper_util::rt::TokioIo::new(app),
                        )
                        .await
                        .map_err(|e| {
                            format!("HTTP handshake with the local process failed: {e}")
                        })?;
                        tokio::spawn(connection.with_upgrades());
                        send
                    }
                };
                let answered = send.send_request(request).await;
                if !upgrade {
                    reusable = Some(send);
                }
                answered
            };
            let mut response =
                answered.map_err(|e| format!("the local process failed to answer: {e}"))?;
            if let (true, Some(from_agent)) = (
                response.status() == http::StatusCode::SWITCHING_PROTOCOLS,
                from_agent.as_mut(),
            ) {
                let upgraded = hyper::upgrade::on(&mut response);
                let response_head = tether_protocol::HttpResponseHead {
                    stream_id: id,
                    status: 101,
                    version: tether_session::http::wire_version(response.version()) as i32,
                    headers: tether_session::http::to_wire(response.headers()),
                };
                up.out
                    .send(Body::HttpResponseHead(response_head))
                    .await
                    .map_err(|_| "the session closed")?;
                let upgraded = upgraded
                    .await
                    .map_err(|e| format!("the local process's upgrade failed: {e}"))?;
                let window = Arc::new(tether_session::flow::SendWindow::default());
                up.windows
                    .lock()
                    .expect("windows lock")
                    .insert(id, Arc::clone(&window));
                let (mut read, mut write) =
                    tokio::io::split(hyper_util::rt::TokioIo::new(upgraded));
                let queued = std::sync::atomic::AtomicUsize::new(0);
                self.pump(
                    up, &mut read, &mut write, id, from_agent, false, &window, &queued,
                )
                .await;
                return Ok(());
            }
            if mirror {
                // The pod's app answered the real client; the local answer is read and dropped.
                let _ = response.into_body().collect().await;
                return Ok(());
            }
            let (parts, mut body) = response.into_parts();
            let response_head = tether_protocol::HttpResponseHead {
                stream_id: id,
                status: u32::from(parts.status.as_u16()),
                version: tether_session::http::wire_version(parts.version) as i32,
                headers: tether_session::http::to_wire(&parts.headers),
            };
            let window = Arc::new(tether_session::flow::SendWindow::default());
            up.windows
                .lock()
                .expect("windows lock")
                .insert(id, Arc::clone(&window));
            up.out
                .send(Body::HttpResponseHead(response_head))
                .await
                .map_err(|_| "the session closed")?;
            let mut trailers = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame =
                    frame.map_err(|e| format!("the local process's answer broke off: {e}"))?;
                match frame.into_data() {
                    Ok(mut data) => {
                        while !data.is_empty() {
                            // Credit never comes once the session is over (a move closed it).
                            let allowed = tokio::select! {
                                allowed = window
                                    .reserve(data.len().min(tether_protocol::MAX_DATA_CHUNK)) => allowed,
                                () = up.ended() => return Err("the session ended".into()),
                            };
                            let chunk = data.split_to(allowed);
                            up.out
                                .send(Body::StreamData(StreamData {
                                    stream_id: id,
                                    data: chunk,
                                }))
                                .await
                                .map_err(|_| "the session closed")?;
                        }
                    }
                    Err(frame) => {
                        if let Ok(map) = frame.into_trailers() {
                            trailers = tether_session::http::to_wire(&map);
                        }
                    }
                }
            }
            up.out
                .send(Body::StreamEnd(StreamEnd {
                    stream_id: id,
                    trailers,
                }))
                .await
                .map_err(|_| "the session closed")?;
            Ok(())
        }
        .await;
        if let Some(end) = our_end {
            self.forget_peer(end);
        }
        if let (Ok(()), Some(send)) = (&result, reusable) {
            let mut pool = self.app_pool.lock().expect("pool lock");
            // Bounded: a client that opened many connections must not grow this without limit.
            if !send.is_closed() && pool.len() < MAX_POOLED {
                pool.insert(pool_key, send);
            }
        }
        result
    }

    /// Connects to `listener` from a socket whose address is registered as standing for `remote`
    /// before the connection exists, so the process's `accept` always finds it.
    ///
    /// The source port is picked by `connect` (`IP_BIND_ADDRESS_NO_PORT`), not by `bind`: with
    /// a new connection per request, `bind(127.0.0.1:0)` has to search an ephemeral range
    /// crowded with recently closed connections for a port free for *every* destination, which
    /// took the proxy to a full core and the app to a third of its requests per second after some
    /// 25,000 connections. `connect` needs only a 4-tuple no other socket has.
    async fn connect_for(
        &self,
        listener: SocketAddr,
        remote: SocketAddr,
    ) -> std::io::Result<(TcpStream, PeerMark)> {
        use socket2::{Domain, Protocol, SockAddr, Socket, Type};
        let source: IpAddr = if listener.is_ipv4() {
            Ipv4Addr::LOCALHOST.into()
        } else {
            Ipv6Addr::LOCALHOST.into()
        };
        // A listener on every address is reached on loopback.
        let target = if listener.ip().is_unspecified() {
            SocketAddr::new(source, listener.port())
        } else {
            listener
        };
        let socket = Socket::new(
            Domain::for_address(target),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        socket.set_nonblocking(true)?;
        // (An IPv6 socket takes this IP-level option too. A kernel without it only makes `bind`
        // pick the port: slower, still correct.)
        let _ = nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::IpBindAddressNoPort,
            &true,
        );
        socket.bind(&SocketAddr::new(source, 0).into())?;
        // The port exists once `connect` is called; it is registered before the lock is let go,
        // and the process's `Peer` question takes the same lock, so it cannot come first.
        let mark = {
            let mut peers = self.peers.lock().expect("peers lock");
            match socket.connect(&SockAddr::from(target)) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => return Err(e),
            }
            let ours = socket
                .local_addr()?
                .as_socket()
                .ok_or_else(|| std::io::Error::other("a TCP socket without an IP address"))?;
            let mark = PeerMark {
                key: (ours, target),
                number: self.peer_marks.fetch_add(1, Ordering::Relaxed),
            };
            peers.insert(mark.key, (remote, mark.number));
            mark
        };
        let connected = async {
            let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
            stream.writable().await?;
            if let Some(error) = stream.take_error()? {
                return Err(error);
            }
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        .await;
        match connected {
            Ok(stream) => Ok((stream, mark)),
            Err(error) => {
                self.forget_peer(mark);
                Err(error)
            }
        }
    }

    /// Drops a registration of [`connect_for`](Self::connect_for), unless its 4-tuple already
    /// belongs to a newer connection (the socket may have closed before this runs).
    fn forget_peer(&self, mark: PeerMark) {
        let mut peers = self.peers.lock().expect("peers lock");
        if peers.get(&mark.key).is_some_and(|(_, n)| *n == mark.number) {
            peers.remove(&mark.key);
        }
    }
}

/// A connection the proxy made to the app, as the app's `accept` sees it: (its peer, its local
/// address).
type PeerKey = (SocketAddr, SocketAddr);

/// One registration in `Shared::peers`.
#[derive(Debug, Clone, Copy)]
struct PeerMark {
    key: PeerKey,
    number: u64,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body as it arrives over the session, granting the window back as hyper takes it.
fn request_body(
    from_agent: mpsc::UnboundedReceiver<ToStream>,
    id: u64,
    out: mpsc::Sender<Body>,
    mirror_queue: Option<Arc<std::sync::atomic::AtomicUsize>>,
) -> http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError> {
    use http_body_util::BodyExt as _;
    use hyper::body::Frame;
    struct State {
        from_agent: mpsc::UnboundedReceiver<ToStream>,
        credit: tether_session::flow::RecvCredit,
        out: mpsc::Sender<Body>,
        done: bool,
        mirror_queue: Option<Arc<std::sync::atomic::AtomicUsize>>,
    }
    let state = State {
        from_agent,
        mirror_queue,
        credit: Default::default(),
        out,
        done: false,
    };
    let frames = futures_util::stream::unfold(state, move |mut state| async move {
        if state.done {
            return None;
        }
        match state.from_agent.recv().await {
            Some(ToStream::Data(data)) => {
                if let Some(queued) = &state.mirror_queue {
                    queued.fetch_sub(data.len(), Ordering::Relaxed);
                }
                if let Some(increment) = state.credit.consumed(data.len()) {
                    let update = tether_protocol::WindowUpdate {
                        stream_id: id,
                        increment,
                    };
                    let _ = state.out.send(Body::WindowUpdate(update)).await;
                }
                Some((Ok(Frame::data(data)), state))
            }
            Some(ToStream::End(trailers)) => {
                state.done = true;
                (!trailers.is_empty()).then(|| {
                    (
                        Ok(Frame::trailers(tether_session::http::from_wire(&trailers))),
                        state,
                    )
                })
            }
            Some(ToStream::Reset(reason)) => {
                state.done = true;
                Some((
                    Err(BoxError::from(format!(
                        "the client's request broke off: {reason}"
                    ))),
                    state,
                ))
            }
            // The stream went without its end (its session closed: the pod was replaced):
            // the app must not take a cut-off body for a whole one.
            None => {
                state.done = true;
                Some((
                    Err(BoxError::from(
                        "the session ended before the request's body did",
                    )),
                    state,
                ))
            }
        }
    });
    http_body_util::StreamBody::new(futures_util::StreamExt::boxed(frames)).boxed_unsync()
}
