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

mod deliver;
mod layer;
pub(crate) mod link;
mod peers;
pub(crate) mod ports;
mod requests;
mod session;
pub(crate) mod status;
mod target;

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
pub(crate) use session::Session;
use tether_config::model::IncomingConfig;
use tether_intercept::channel::{Answer, Delivery, Request as LayerRequest};
use tether_protocol::{
    Body, Frame, IncomingConnection, LogLevel, PortSubscribe, PortUnsubscribe, StreamData,
    StreamEnd, StreamReset, SubscriptionMode, request, response,
};
use tether_session::{
    carrier::{Attach, Carrier, Endpoints, LinkState},
    flow::SendWindow,
    stream::{Input, Relay, Routed, Stream, StreamInput, pump},
};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpStream, UnixListener, UnixStream},
    sync::mpsc,
    task::JoinSet,
};

use self::{peers::PeerKey, requests::AppSender};

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

/// Mirrored bytes queued for one connection before it is dropped as too slow.
pub(super) const MIRROR_QUEUE_LIMIT: usize = 16 << 20;

#[derive(Debug, Clone)]
struct Listener {
    local: SocketAddr,
    /// What was asked of the agent, asked again of every new session.
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
    pending_outgoing: Mutex<HashMap<SocketAddr, target::PendingOutgoing>>,
    /// Stream ids this side opens (odd), unique across sessions.
    next_stream: AtomicU64,
    /// Also steal kubelet probes (`probes.steal`).
    steal_probes: bool,
    /// Close the connections already open to a port when its steal starts
    /// (`agent.flush_connections`).
    flush_connections: bool,
    /// The session everything goes through (see `session.rs`).
    primary: tokio::sync::watch::Sender<Arc<Session>>,
    /// Sessions with the workload's other replicas, which only mirror (`mirror_all_replicas`).
    mirrors: Mutex<Vec<Arc<Session>>>,
    next_session: std::sync::atomic::AtomicU32,
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
    /// Idle HTTP/1 connections to the app, by session, stolen client connection and listener.
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
        let (first, start_first) = Shared::new_session(0, opened);
        let shared = Arc::new(Shared {
            incoming: config.feature.network.incoming.clone(),
            policy: target::policy_spec(config, target_files),
            outgoing_v4: outgoing_v4.local_addr()?,
            outgoing_v6: outgoing_v6.as_ref().and_then(|l| l.local_addr().ok()),
            pending_outgoing: Mutex::default(),
            next_stream: AtomicU64::new(1),
            steal_probes: config.probes.steal,
            flush_connections: config.agent.flush_connections,
            primary: tokio::sync::watch::channel(Arc::clone(&first)).0,
            mirrors: Mutex::default(),
            next_session: 1.into(),
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
    fn primary(&self) -> Arc<Session> {
        self.primary.borrow().clone()
    }

    /// A new session over `opened`; the returned function starts its tasks (once the proxy's
    /// state exists).
    fn new_session(id: u32, opened: Opened) -> (Arc<Session>, impl FnOnce(&Arc<Shared>)) {
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
        let up = Arc::new(Session::new(
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
                reader.session_ended(&up, reason);
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

    /// A new session over `opened`, running.
    fn attach(self: &Arc<Self>, opened: Opened) -> Arc<Session> {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let (up, start) = Shared::new_session(id, opened);
        start(self);
        up
    }

    /// Subscribes `up` to the ports the process listens on whose subscription `wanted` picks.
    async fn subscribe_all(
        &self,
        up: &Session,
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

    /// A session is over: nobody will answer what waits on it, and its streams
    /// end. Unless the proxy ended it on purpose, that is news: for the primary, the run's
    /// session is lost (or, when something follows the target, that decides).
    fn session_ended(&self, up: &Arc<Session>, reason: String) {
        up.mark_ended();
        up.pending.lock().expect("pending lock").clear();
        up.streams.clear();
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

    fn on_frame(self: &Arc<Self>, up: &Arc<Session>, frame: Frame) {
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
                let stream =
                    up.open_stream(info.stream_id, info.mode() == SubscriptionMode::Mirror);
                tokio::spawn(Arc::clone(self).deliver(Arc::clone(up), info, stream));
            }
            Some(
                body @ (Body::WindowUpdate(_)
                | Body::StreamData(_)
                | Body::StreamEnd(_)
                | Body::StreamReset(_)
                | Body::Datagram(_)),
            ) => {
                if let Routed::Overflow { queued, .. } = up.streams.route(body) {
                    let message = format!(
                        "the local process reads a mirrored connection too slowly ({} MiB queued); that copy was dropped, the pod is not affected",
                        queued >> 20
                    );
                    let _ = self.events.send(Event::Warning(message));
                }
            }
            Some(Body::HttpRequestHead(head)) => {
                // A mirrored request's body cannot be slowed: its queue is bounded instead.
                let mirror = head.mode() == SubscriptionMode::Mirror;
                let stream = up.open_stream(head.stream_id, mirror);
                tokio::spawn(Arc::clone(self).deliver_http(Arc::clone(up), head, stream, mirror));
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
    fn who(&self, up: &Arc<Session>) -> String {
        if Arc::ptr_eq(&self.primary(), up) {
            "agent".into()
        } else {
            format!("agent for pod {}", up.pod)
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
}
