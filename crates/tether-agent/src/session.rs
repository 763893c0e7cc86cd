//! Accepting links and running one session per authenticated link: subscriptions, stolen and
//! mirrored streams, and the session's rules.

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::SinkExt as _;
use tether_protocol::{
    Body, ErrorCode, ErrorInfo, Frame, HandshakeError, IncomingConnection, MAX_DATA_CHUNK,
    PortSubscribe, Request, Response, StreamData, StreamEnd, StreamReset, Subscribed,
    SubscriptionMode, TokenDigest, Welcome, WindowUpdate, check_hello, hello_error, request,
    response,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    task::JoinSet,
};

use tether_session::{
    carrier::{Attach, Carrier, Control, Endpoints, Io, LinkState, Status},
    flow::{RecvCredit, SendWindow},
    link::{self, LinkError},
    settings::Settings,
};

use crate::{
    dns::Dns,
    fs::{Files, Root},
    http::{
        HttpContext,
        filter::Route,
        serve_http1,
        sniff::{self, Sniff},
    },
    mirror,
    netns::Netns,
    rules::{self, Backend, Owner, SessionRules},
    steal::{PortClaim, PortTable, Stolen},
};

/// What every session of one agent shares.
#[derive(Debug)]
pub struct Agent {
    pub(crate) token: TokenDigest,
    pub(crate) netns: Netns,
    pub(crate) owner: Owner,
    pub(crate) backend: Backend,
    /// Said to each session when it first steals: why `backend` is a fallback.
    backend_note: Option<&'static str>,
    pub(crate) steal_port: u16,
    pub(crate) ports: PortTable,
    /// The target's filesystem root, opened once at start (`None`: it could not be opened, and
    /// file requests fail with the reason).
    pub(crate) root: Result<Arc<Root>, String>,
    /// The resolver, started on the first lookup.
    dns: std::sync::OnceLock<Result<Dns, String>>,
    /// The service mesh in the target, found at start from its rules.
    pub(crate) mesh: Option<rules::Mesh>,
    /// Live sessions that can be resumed, by id: where a resuming link goes, and how their link
    /// is.
    sessions: Mutex<HashMap<String, (Control, watch::Receiver<Status>)>>,
}

impl Agent {
    /// Prepares an agent for `netns`: picks the rules backend and starts the steal listener.
    pub async fn start(
        token: TokenDigest,
        netns: Netns,
        owner: Owner,
        nftables: Option<bool>,
    ) -> anyhow::Result<Arc<Agent>> {
        let (backend, backend_note) = rules::choose_backend(&netns, nftables).await?;
        if let Some(note) = backend_note {
            // The user hears it from the first session that steals (a `Log`), not twice.
            tracing::info!("{note}");
        }
        let mesh = rules::detect_mesh(&netns).await;
        if let Some(mesh) = mesh {
            tracing::info!(%mesh, "service mesh found: steals take its sidecar's plaintext hop to the app");
            if let Some(source) = mesh.inbound_source() {
                crate::steal::set_passthrough_source(source);
            }
        }
        let listener = crate::steal::bind(&netns).await?;
        let steal_port = listener.local_addr()?.port();
        let ports = PortTable::default();
        tokio::spawn(crate::steal::accept_loop(
            listener,
            Arc::clone(&ports),
            netns.clone(),
        ));
        let root_path = netns.root_path();
        let root = Root::open(&root_path)
            .map(Arc::new)
            .map_err(|e| format!("cannot open the target's root {}: {e}", root_path.display()));
        if let Err(message) = &root {
            tracing::warn!("{message}; file requests will fail");
        }
        tracing::info!(target = %netns.label, %backend, steal_port, "agent ready");
        Ok(Arc::new(Agent {
            token,
            netns,
            owner,
            backend,
            backend_note,
            steal_port,
            ports,
            root,
            dns: std::sync::OnceLock::new(),
            mesh,
            sessions: Mutex::default(),
        }))
    }

    fn root(&self) -> Result<Arc<Root>, ErrorInfo> {
        self.root
            .clone()
            .map_err(|message| error(ErrorCode::TargetGone, message))
    }

    /// The resolver for the target (started on first use).
    fn dns(&self) -> Result<Dns, ErrorInfo> {
        self.dns
            .get_or_init(|| {
                let root = self.root.as_ref().map_err(Clone::clone)?;
                let etc = self
                    .netns
                    .name()
                    .map(|name| std::path::Path::new("/etc/netns").join(name))
                    .filter(|dir| dir.is_dir());
                Dns::start(&self.netns, root, etc.as_deref())
                    .map_err(|e| format!("cannot start the resolver in the target: {e}"))
            })
            .clone()
            .map_err(|message| error(ErrorCode::Internal, message))
    }

    /// The environment of the target's process (none for a bare network namespace).
    fn environment(&self) -> Result<tether_protocol::Env, ErrorInfo> {
        let Some(pid) = self.netns.pid() else {
            return Ok(tether_protocol::Env::default());
        };
        let raw = std::fs::read(format!("/proc/{pid}/environ")).map_err(|e| {
            error(
                ErrorCode::TargetGone,
                format!("cannot read the environment of process {pid}: {e}"),
            )
        })?;
        let vars = raw
            .split(|b| *b == 0)
            .filter_map(|entry| {
                let text = String::from_utf8_lossy(entry);
                let (name, value) = text.split_once('=')?;
                (!name.is_empty()).then(|| tether_protocol::EnvVar {
                    name: name.to_owned(),
                    value: value.to_owned(),
                })
            })
            .collect();
        Ok(tether_protocol::Env { vars })
    }
}

/// Accepts links forever; each runs on its own task, so one bad client never stops the others.
pub async fn serve(listener: TcpListener, agent: Arc<Agent>) {
    serve_until_idle(listener, agent, None).await;
}

/// Serves sessions; with `idle`, returns once no session (and no link) has existed for that
/// long, counted from the start too. An agent pod uses it so that it exits on its own when the
/// CLI that started it is gone.
pub(crate) async fn serve_until_idle(
    listener: TcpListener,
    agent: Arc<Agent>,
    idle: Option<Duration>,
) {
    // Links being handled; the first link of a session is handled until the session ends
    // (its grace included), so zero means no session either.
    let (busy_tx, mut busy) = watch::channel(0usize);
    let busy_tx = Arc::new(busy_tx);
    let idle_for = async move {
        let Some(idle) = idle else {
            return std::future::pending().await;
        };
        loop {
            if *busy.borrow_and_update() == 0 {
                tokio::select! {
                    () = tokio::time::sleep(idle) => return,
                    changed = busy.changed() => if changed.is_err() { return },
                }
            } else if busy.changed().await.is_err() {
                return;
            }
        }
    };
    let accept = async {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Per-connection accept errors (ECONNABORTED, EMFILE) must not end the agent.
                    tracing::warn!(%error, "accept failed");
                    continue;
                }
            };
            let agent = Arc::clone(&agent);
            let busy = Busy::enter(Arc::clone(&busy_tx));
            tokio::spawn(async move {
                // Counted until the task ends, whichever way (a panic included).
                let _busy = busy;
                match handle_link(stream, agent).await {
                    Ok(()) => tracing::debug!(%peer, "link closed"),
                    Err(error) => tracing::warn!(%peer, error = %error_chain(&error), "link ended"),
                }
            });
        }
    };
    tokio::select! {
        () = accept => {}
        () = idle_for => {
            tracing::info!(?idle, "no session for the idle time; exiting");
        }
    }
}

/// One link being handled, counted for the idle exit.
struct Busy(Arc<watch::Sender<usize>>);

impl Busy {
    fn enter(count: Arc<watch::Sender<usize>>) -> Busy {
        count.send_modify(|n| *n += 1);
        Busy(count)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

async fn handle_link(stream: TcpStream, agent: Arc<Agent>) -> Result<(), LinkError> {
    stream.set_nodelay(true)?;
    let mut link = link::exchange_preface(Box::new(stream) as Box<dyn Io>).await?;
    let first = link::next_frame(&mut link).await?;
    let hello = match first.body {
        Some(Body::Hello(hello)) => match check_hello(&hello, &agent.token) {
            Ok(()) => Ok(hello),
            Err(refusal) => Err(refusal),
        },
        Some(other) => Err(HandshakeError::NotHello(other.kind())),
        None => Err(HandshakeError::NotHello("unknown")),
    };
    let hello = match hello {
        Ok(hello) => hello,
        Err(refusal) => {
            link.send(hello_error(&refusal)).await?;
            link.close().await?;
            return Err(LinkError::Refused(refusal.to_string()));
        }
    };
    let welcome = |session_id: &str, resumed: bool| Welcome {
        session_id: session_id.to_owned(),
        agent: concat!("tether-agent/", env!("CARGO_PKG_VERSION")).to_owned(),
        resumed,
        received: 0,
        capabilities: vec!["resume".to_owned()],
    };
    if let Some(resume) = &hello.resume {
        // A client back after a dropped link: hand the link to its session's carrier.
        let attacher = agent
            .sessions
            .lock()
            .expect("sessions lock")
            .get(&resume.session_id)
            .map(|(control, _)| control.clone());
        let attach = Attach {
            link,
            peer_received: resume.received,
            welcome: Some(welcome(&resume.session_id, true)),
        };
        let refused = match attacher {
            Some(control) => match control.attach(attach).await {
                Ok(()) => {
                    tracing::info!(session_id = %resume.session_id, "session resumed on a new link");
                    return Ok(());
                }
                Err(attach) => attach.link,
            },
            None => attach.link,
        };
        let mut link = refused;
        let expired = ErrorInfo {
            code: ErrorCode::SessionExpired as i32,
            message: format!(
                "session {} is over (its reconnect grace expired or the agent restarted)",
                resume.session_id
            ),
            in_reply_to_seq: 0,
            errno: 0,
        };
        link.send(Frame {
            seq: 0,
            ack: 0,
            body: Some(Body::Error(expired)),
        })
        .await?;
        link.close().await?;
        return Err(LinkError::Refused(format!(
            "session {} is unknown",
            resume.session_id
        )));
    }

    let session_id = new_session_id();
    let settings = Settings::from_options(hello.link.as_ref());
    tracing::info!(%session_id, client = %hello.client, grace = ?settings.grace, "session started");
    let (carrier, endpoints) = Carrier::spawn(
        settings,
        Attach {
            link,
            peer_received: 0,
            welcome: Some(welcome(&session_id, false)),
        },
    );
    if settings.grace.is_some() {
        agent
            .sessions
            .lock()
            .expect("sessions lock")
            .insert(session_id.clone(), (carrier.control(), carrier.status()));
    }
    run_session(
        Arc::clone(&agent),
        session_id.clone(),
        settings,
        carrier,
        endpoints,
    )
    .await;
    agent
        .sessions
        .lock()
        .expect("sessions lock")
        .remove(&session_id);
    Ok(())
}

/// Serves one session until the client says goodbye or the carrier gives up on it.
async fn run_session(
    agent: Arc<Agent>,
    id: String,
    settings: Settings,
    mut carrier: Carrier,
    endpoints: Endpoints,
) {
    let Endpoints { out, mut incoming } = endpoints;
    let pressure = mirror::Pressure {
        connected: carrier.connected(),
        status: carrier.status(),
        limit: settings.buffer,
    };
    let mut session = Session::new(agent, id.clone(), out, pressure);
    let status = carrier.status();
    let reason = loop {
        tokio::select! {
            frame = incoming.recv() => match frame {
                None => break match &status.borrow().state {
                    LinkState::Ended { reason } => reason.clone(),
                    _ => "the link ended".to_owned(),
                },
                Some(frame) => {
                    if !session.on_frame(frame).await {
                        break "the client said goodbye".to_owned();
                    }
                }
            },
            Some(stolen) = session.stolen_rx.recv() => session.on_stolen(stolen),
            Some(_) = session.stream_tasks.join_next() => {}
        }
    };
    session.end().await;
    drop(session);
    carrier.close().await;
    tracing::info!(session_id = %id, %reason, "session ended");
}

/// What the client sends into one stream.
#[derive(Debug)]
pub(crate) enum StreamInput {
    Data(Bytes),
    /// End of the client's direction, with HTTP trailers if any.
    End(Vec<tether_protocol::Header>),
    Reset(String),
    /// The answer's head, for a stolen HTTP request.
    ResponseHead(tether_protocol::HttpResponseHead),
}

/// The session's open streams: where the client's frames for each go, and the credit for what
/// this side sends on each. Shared with the tasks that serve the streams (they register and
/// remove their own entries).
#[derive(Debug, Default)]
pub(crate) struct Streams {
    inputs: Mutex<HashMap<u64, mpsc::UnboundedSender<StreamInput>>>,
    windows: Mutex<HashMap<u64, Arc<SendWindow>>>,
}

impl Streams {
    pub(crate) fn insert(
        &self,
        id: u64,
        input: mpsc::UnboundedSender<StreamInput>,
        window: Arc<SendWindow>,
    ) {
        self.inputs.lock().expect("streams lock").insert(id, input);
        self.windows
            .lock()
            .expect("windows lock")
            .insert(id, window);
    }

    pub(crate) fn remove(&self, id: u64) {
        self.inputs.lock().expect("streams lock").remove(&id);
        self.windows.lock().expect("windows lock").remove(&id);
    }

    fn forward(&self, id: u64, input: StreamInput) {
        if let Some(tx) = self.inputs.lock().expect("streams lock").get(&id) {
            let _ = tx.send(input);
        }
    }

    fn grant(&self, id: u64, bytes: u64) {
        if let Some(window) = self.windows.lock().expect("windows lock").get(&id) {
            window.grant(bytes);
        }
    }
}

struct Session {
    agent: Arc<Agent>,
    id: String,
    out: mpsc::Sender<Body>,
    next_stream: Arc<AtomicU64>,
    streams: Arc<Streams>,
    /// How each stolen port's HTTP requests are routed.
    routes: HashMap<u16, Arc<Route>>,
    stream_tasks: JoinSet<()>,
    stolen_tx: mpsc::Sender<Stolen>,
    stolen_rx: mpsc::Receiver<Stolen>,
    rules: Option<ActiveRules>,
    mirrors: HashMap<u16, mirror::Capture>,
    /// Files the client opened in the target.
    files: Arc<Files>,
    /// False while the session has no link: new stolen connections and requests then go to the
    /// original app.
    connected: Arc<AtomicBool>,
    /// For mirrored copies: when to end one instead of filling the replay buffer.
    pressure: mirror::Pressure,
}

struct ActiveRules {
    rules: SessionRules,
    ports: Arc<Mutex<BTreeSet<u16>>>,
    refresher: Option<tokio::task::JoinHandle<()>>,
}

impl Session {
    fn new(
        agent: Arc<Agent>,
        id: String,
        out: mpsc::Sender<Body>,
        pressure: mirror::Pressure,
    ) -> Session {
        let (stolen_tx, stolen_rx) = mpsc::channel(256);
        Session {
            agent,
            id,
            out,
            // The agent opens even stream ids.
            next_stream: Arc::new(AtomicU64::new(2)),
            streams: Arc::default(),
            routes: HashMap::new(),
            stream_tasks: JoinSet::new(),
            stolen_tx,
            stolen_rx,
            rules: None,
            mirrors: HashMap::new(),
            files: Arc::default(),
            connected: Arc::clone(&pressure.connected),
            pressure,
        }
    }

    async fn send(&self, body: Body) {
        let _ = self.out.send(body).await;
    }

    /// Handles one frame; false ends the session.
    async fn on_frame(&mut self, frame: Frame) -> bool {
        match frame.body {
            Some(Body::Goodbye(_)) => return false,
            Some(Body::WindowUpdate(update)) => {
                self.streams
                    .grant(update.stream_id, u64::from(update.increment));
            }
            Some(Body::Pong(_) | Body::Ack(_)) => {}
            Some(Body::Request(Request {
                id,
                op:
                    Some(
                        op @ (request::Op::OutgoingConnect(_)
                        | request::Op::DnsLookup(_)
                        | request::Op::EnvGet(_)
                        | request::Op::Fs(_)),
                    ),
            })) => {
                // These take their time (a connect, a lookup, disk): each runs on its own task so
                // the session keeps serving everything else meanwhile.
                let ctx = OpContext {
                    agent: Arc::clone(&self.agent),
                    out: self.out.clone(),
                    streams: Arc::clone(&self.streams),
                    files: Arc::clone(&self.files),
                    session: self.id.clone(),
                };
                self.stream_tasks.spawn(ctx.run(id, op));
            }
            Some(Body::Datagram(datagram)) => {
                self.forward_to_stream(datagram.stream_id, StreamInput::Data(datagram.data))
            }
            Some(Body::Request(request)) => {
                let result = match request.op {
                    Some(request::Op::PortSubscribe(subscribe)) => self.subscribe(subscribe).await,
                    Some(request::Op::PortUnsubscribe(unsubscribe)) => {
                        self.unsubscribe(unsubscribe.port).await
                    }
                    other => Err(unsupported_op(other.as_ref())),
                };
                if let Err(refused) = &result {
                    tracing::warn!(session = %self.id, error = %refused.message, "request refused");
                }
                let result = result.unwrap_or_else(response::Result::Error);
                self.send(Body::Response(Response {
                    id: request.id,
                    result: Some(result),
                }))
                .await;
            }
            Some(Body::StreamData(data)) => {
                self.forward_to_stream(data.stream_id, StreamInput::Data(data.data))
            }
            Some(Body::StreamEnd(end)) => {
                self.forward_to_stream(end.stream_id, StreamInput::End(end.trailers))
            }
            Some(Body::HttpResponseHead(head)) => {
                self.forward_to_stream(head.stream_id, StreamInput::ResponseHead(head))
            }
            Some(Body::StreamReset(reset)) => {
                self.forward_to_stream(reset.stream_id, StreamInput::Reset(reset.reason))
            }
            Some(other) => {
                self.send(Body::Error(unsupported(other.kind(), frame.seq)))
                    .await
            }
            None => {
                self.send(Body::Error(unsupported("unknown", frame.seq)))
                    .await
            }
        }
        true
    }

    fn forward_to_stream(&mut self, id: u64, input: StreamInput) {
        self.streams.forward(id, input);
    }

    async fn subscribe(&mut self, subscribe: PortSubscribe) -> Result<response::Result, ErrorInfo> {
        let port = u16::try_from(subscribe.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                error(
                    ErrorCode::BadRequest,
                    format!("{} is not a port", subscribe.port),
                )
            })?;
        if !self.agent.netns.exists() {
            return Err(error(
                ErrorCode::TargetGone,
                format!("the target {} is gone", self.agent.netns.label),
            ));
        }
        match subscribe.mode() {
            SubscriptionMode::Steal => {
                let route = Route::new(subscribe.http_filter.as_ref(), subscribe.steal_probes)
                    .map_err(|e| error(ErrorCode::BadRequest, e))?;
                self.steal(port, subscribe.flush_connections).await?;
                self.routes.insert(port, Arc::new(route));
            }
            SubscriptionMode::Mirror => {
                let route = subscribe
                    .http_filter
                    .as_ref()
                    .map(|filter| Route::new(Some(filter), subscribe.steal_probes).map(Arc::new))
                    .transpose()
                    .map_err(|e| error(ErrorCode::BadRequest, e))?;
                self.mirror(port, route).await?
            }
            SubscriptionMode::Unspecified => {
                return Err(error(
                    ErrorCode::BadRequest,
                    "a subscription needs a mode: mirror or steal",
                ));
            }
        }
        Ok(response::Result::Subscribed(Subscribed {
            port: u32::from(port),
        }))
    }

    async fn steal(&mut self, port: u16, flush: bool) -> Result<(), ErrorInfo> {
        {
            let mut ports = self.agent.ports.lock().expect("port table lock");
            if let Some(claim) = ports.get(&port) {
                let whose = if claim.session == self.id {
                    "this session".to_owned()
                } else {
                    let waiting = self
                        .agent
                        .sessions
                        .lock()
                        .expect("sessions lock")
                        .get(&claim.session)
                        .and_then(|(_, status)| match status.borrow().state {
                            LinkState::Down { since, .. } => Some(since.elapsed()),
                            _ => None,
                        });
                    match waiting {
                        Some(down) => format!(
                            "session {}, whose client has been gone for {} s; the agent keeps it for its reconnect grace, then releases the port",
                            claim.session,
                            down.as_secs()
                        ),
                        None => format!("session {}", claim.session),
                    }
                };
                return Err(error(
                    ErrorCode::PortInUse,
                    format!("port {port} is already stolen by {whose}"),
                ));
            }
            ports.insert(
                port,
                PortClaim {
                    session: self.id.clone(),
                    tx: self.stolen_tx.clone(),
                },
            );
        }
        let added = self.add_rule(port).await;
        if let Err(e) = added {
            self.agent
                .ports
                .lock()
                .expect("port table lock")
                .remove(&port);
            return Err(e);
        }
        tracing::info!(session = %self.id, port, "stealing");
        if flush {
            let closed = crate::flush::flush_port(&self.agent.netns, port).await;
            self.send(Body::Log(tether_protocol::Log {
                level: tether_protocol::LogLevel::Info as i32,
                message: format!("flush_connections: closed {closed} existing connection(s) to port {port}; their clients reconnect into the steal"),
                target: "steal".into(),
            }))
            .await;
        }
        Ok(())
    }

    async fn add_rule(&mut self, port: u16) -> Result<(), ErrorInfo> {
        let rules_error = |e: rules::RulesError| {
            error(
                ErrorCode::Internal,
                format!("cannot set up the redirect: {e}"),
            )
        };
        if self.rules.is_none() {
            let rules = SessionRules {
                backend: self.agent.backend,
                owner: self.agent.owner.clone(),
                session: self.id.clone(),
                listen_port: self.agent.steal_port,
                mesh: self.agent.mesh,
            };
            rules::apply(&self.agent.netns, &rules.setup())
                .await
                .map_err(rules_error)?;
            if let Some(note) = self.agent.backend_note {
                self.send(Body::Log(tether_protocol::Log {
                    level: tether_protocol::LogLevel::Warn as i32,
                    message: note.into(),
                    target: "steal".into(),
                }))
                .await;
            }
            let ports = Arc::new(Mutex::new(BTreeSet::new()));
            let refresher = (rules.backend == Backend::Nft).then(|| {
                tokio::spawn(refresh_loop(
                    self.agent.netns.clone(),
                    rules.clone(),
                    Arc::clone(&ports),
                ))
            });
            self.rules = Some(ActiveRules {
                rules,
                ports,
                refresher,
            });
        }
        let active = self.rules.as_ref().expect("set up above");
        rules::apply(&self.agent.netns, &active.rules.add_port(port))
            .await
            .map_err(rules_error)?;
        active.ports.lock().expect("ports lock").insert(port);
        Ok(())
    }

    async fn mirror(&mut self, port: u16, route: Option<Arc<Route>>) -> Result<(), ErrorInfo> {
        if self.mirrors.contains_key(&port) {
            return Err(error(
                ErrorCode::PortInUse,
                format!("port {port} is already mirrored by this session"),
            ));
        }
        let capture = mirror::start(
            &self.agent.netns,
            port,
            self.out.clone(),
            Arc::clone(&self.next_stream),
            route,
            self.agent.mesh.is_some(),
            self.pressure.clone(),
        )
        .await
        .map_err(|e| {
            error(
                ErrorCode::PermissionDenied,
                format!("cannot capture port {port}: {e} (the agent needs CAP_NET_RAW)"),
            )
        })?;
        self.mirrors.insert(port, capture);
        tracing::info!(session = %self.id, port, "mirroring");
        Ok(())
    }

    async fn unsubscribe(&mut self, port: u32) -> Result<response::Result, ErrorInfo> {
        let port = u16::try_from(port)
            .map_err(|_| error(ErrorCode::BadRequest, format!("{port} is not a port")))?;
        if self.mirrors.remove(&port).is_some() {
            return Ok(response::Result::Done(Default::default()));
        }
        let owned = self
            .agent
            .ports
            .lock()
            .expect("port table lock")
            .get(&port)
            .is_some_and(|c| c.session == self.id);
        if !owned {
            return Err(error(
                ErrorCode::NotFound,
                format!("port {port} is not subscribed in this session"),
            ));
        }
        if let Some(active) = &self.rules {
            active.ports.lock().expect("ports lock").remove(&port);
            if let Err(e) = rules::apply(&self.agent.netns, &active.rules.remove_port(port)).await {
                tracing::warn!(port, error = %e, "cannot remove the redirect");
            }
        }
        self.routes.remove(&port);
        // Connections already stolen keep going; only new ones reach the original app again.
        self.agent
            .ports
            .lock()
            .expect("port table lock")
            .remove(&port);
        Ok(response::Result::Done(Default::default()))
    }

    fn on_stolen(&mut self, stolen: Stolen) {
        if !self.connected.load(Ordering::Acquire) {
            // No client to answer it now: the original app does, as if nothing were stolen.
            tracing::debug!(session = %self.id, peer = %stolen.peer, "no link: connection left to the original app");
            // Not one of the session's tasks: ending the session must not cut it.
            tokio::spawn(crate::steal::passthrough(stolen, self.agent.netns.clone()));
            return;
        }
        let route = self
            .routes
            .get(&stolen.original.port())
            .cloned()
            .unwrap_or_else(|| Arc::new(Route::new(None, false).expect("no filter compiles")));
        let ctx = HttpContext {
            out: self.out.clone(),
            next_stream: Arc::clone(&self.next_stream),
            streams: Arc::clone(&self.streams),
            netns: self.agent.netns.clone(),
            connected: Arc::clone(&self.connected),
        };
        self.stream_tasks.spawn(route_stolen(stolen, route, ctx));
    }

    /// Removes everything the session set up.
    async fn end(&mut self) {
        self.agent
            .ports
            .lock()
            .expect("port table lock")
            .retain(|_, claim| claim.session != self.id);
        self.mirrors.clear();
        if let Some(active) = self.rules.take() {
            if let Some(refresher) = active.refresher {
                refresher.abort();
            }
            if let Err(e) = rules::apply(&self.agent.netns, &active.rules.teardown()).await {
                tracing::warn!(error = %e, "cannot remove the session's rules");
            }
        }
        // The client is gone: its stolen connections cannot be answered any more.
        self.stream_tasks.abort_all();
    }
}

/// What a request served on its own task needs.
struct OpContext {
    agent: Arc<Agent>,
    out: mpsc::Sender<Body>,
    streams: Arc<Streams>,
    files: Arc<Files>,
    session: String,
}

impl OpContext {
    async fn run(self, id: u64, op: request::Op) {
        let result = match op {
            request::Op::OutgoingConnect(connect) => return self.connect(id, connect).await,
            request::Op::DnsLookup(lookup) => match self.agent.dns() {
                Ok(dns) if lookup.address.is_empty() => dns
                    .lookup(lookup.name.clone(), lookup.family())
                    .await
                    .map(response::Result::DnsAnswer),
                Ok(dns) => match ip_of(&lookup.address) {
                    Some(ip) => dns.reverse(ip).await.map(response::Result::DnsAnswer),
                    None => Err(error(
                        ErrorCode::Unsupported,
                        "an address of neither 4 nor 16 bytes",
                    )),
                },
                Err(e) => Err(e),
            },
            request::Op::EnvGet(_) => self.agent.environment().map(response::Result::Env),
            request::Op::Fs(fs) => self.fs(fs).await,
            other => Err(unsupported_op(Some(&other))),
        };
        self.respond(id, result).await;
    }

    async fn respond(&self, id: u64, result: Result<response::Result, ErrorInfo>) {
        if let Err(refused) = &result {
            tracing::debug!(session = %self.session, error = %refused.message, "request failed");
        }
        let result = result.unwrap_or_else(response::Result::Error);
        let _ = self
            .out
            .send(Body::Response(Response {
                id,
                result: Some(result),
            }))
            .await;
    }

    async fn fs(&self, request: tether_protocol::FsRequest) -> Result<response::Result, ErrorInfo> {
        let root = self.agent.root()?;
        let op = request
            .op
            .ok_or_else(|| error(ErrorCode::Unsupported, "an unknown file operation"))?;
        let files = Arc::clone(&self.files);
        let outcome = tokio::task::spawn_blocking(move || files.run(&root, op))
            .await
            .map_err(|_| error(ErrorCode::Internal, "a file operation panicked"))?;
        if let Some(warning) = outcome.warning {
            tracing::warn!(session = %self.session, "{warning}");
            let log = tether_protocol::Log {
                level: tether_protocol::LogLevel::Warn as i32,
                message: warning,
                target: "fs".into(),
            };
            let _ = self.out.send(Body::Log(log)).await;
        }
        outcome.result.map(response::Result::Fs)
    }

    /// Opens the connection, answers, then serves the stream (the answer goes out before any of
    /// the stream's bytes: the link keeps order).
    async fn connect(self, id: u64, connect: tether_protocol::OutgoingConnect) {
        let Some(remote) = connect
            .remote
            .as_ref()
            .and_then(|r| SocketAddr::try_from(r).ok())
        else {
            let bad = error(
                ErrorCode::BadRequest,
                "an outgoing connection needs a remote address",
            );
            return self.respond(id, Err(bad)).await;
        };
        let stream_id = connect.stream_id;
        if stream_id.is_multiple_of(2) {
            let bad = error(ErrorCode::BadRequest, "client streams have odd ids");
            return self.respond(id, Err(bad)).await;
        }
        let connected = |local: std::io::Result<SocketAddr>| {
            response::Result::Connected(tether_protocol::Connected {
                stream_id,
                local: local.ok().map(Into::into),
                remote: Some(remote.into()),
            })
        };
        match connect.transport() {
            tether_protocol::Transport::Udp => {
                match crate::outgoing::connect_udp(&self.agent.netns, remote).await {
                    Ok(socket) => {
                        self.respond(id, Ok(connected(socket.local_addr()))).await;
                        crate::outgoing::run_udp(socket, stream_id, self.out, self.streams).await;
                    }
                    Err(e) => self.respond(id, Err(e)).await,
                }
            }
            _ => match crate::outgoing::connect_tcp(&self.agent.netns, remote).await {
                Ok(stream) => {
                    tracing::debug!(%remote, host = %connect.hostname, "outgoing connection");
                    self.respond(id, Ok(connected(stream.local_addr()))).await;
                    crate::outgoing::run_tcp(stream, stream_id, self.out, self.streams).await;
                }
                Err(e) => self.respond(id, Err(e)).await,
            },
        }
    }
}

/// How long a stolen connection may take to show its first bytes before it is taken for a
/// protocol that is not HTTP (one where the server speaks first, say).
const SNIFF_TIMEOUT: Duration = Duration::from_millis(500);

/// Decides what a stolen connection is and serves it: HTTP/1 request by request; anything else
/// whole on a whole-port steal, or passed through to the original app on a filtered one.
async fn route_stolen(stolen: Stolen, route: Arc<Route>, ctx: HttpContext) {
    let kind = sniff_stream(&stolen.stream).await;
    match kind {
        Sniff::Http1 => serve_http1(stolen.stream, stolen.original, stolen.peer, route, ctx).await,
        Sniff::Http2 => {
            crate::http::serve_http2(stolen.stream, stolen.original, stolen.peer, route, ctx).await
        }
        _ if route.is_filtered() => crate::steal::passthrough(stolen, ctx.netns).await,
        _ => {
            let id = ctx.next_stream.fetch_add(2, Ordering::Relaxed);
            let (input_tx, input_rx) = mpsc::unbounded_channel();
            let window = Arc::new(SendWindow::default());
            ctx.streams.insert(id, input_tx, Arc::clone(&window));
            run_stolen(stolen, id, ctx.out.clone(), input_rx, window).await;
            ctx.streams.remove(id);
        }
    }
}

/// Peeks (without consuming) until the first bytes tell the protocol, within [`SNIFF_TIMEOUT`].
async fn sniff_stream(stream: &TcpStream) -> Sniff {
    let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
    let mut buf = [0u8; sniff::DECIDING_BYTES];
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await;
        let n = match peeked {
            Ok(Ok(n)) if n > 0 => n,
            _ => return Sniff::Other,
        };
        match sniff::sniff(&buf[..n]) {
            Sniff::NeedMore => {
                // `peek` returns at once while any byte is queued: wait a little for the rest of
                // a split first segment (rare), bounded by the deadline.
                if tokio::time::timeout_at(deadline, tokio::time::sleep(Duration::from_millis(2)))
                    .await
                    .is_err()
                {
                    return Sniff::Other;
                }
            }
            decided => return decided,
        }
    }
}

/// nft: restarts the ports' timeouts every second; if the agent dies, they expire.
async fn refresh_loop(netns: Netns, rules: SessionRules, ports: Arc<Mutex<BTreeSet<u16>>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let current = ports.lock().expect("ports lock").clone();
        if let Some(plan) = rules.refresh(&current)
            && let Err(e) = rules::apply(&netns, &plan).await
        {
            tracing::warn!(error = %e, "cannot refresh the redirect; it expires in {}s", rules::plan::PORT_TIMEOUT_SECS);
        }
    }
}

/// Streams one stolen connection to the client and the client's answer back.
/// The client's bytes are unbounded in the channel only in principle: the client may not send
/// more than the window this side grants back as it writes them out.
async fn run_stolen(
    stolen: Stolen,
    id: u64,
    out: mpsc::Sender<Body>,
    mut input: mpsc::UnboundedReceiver<StreamInput>,
    window: Arc<SendWindow>,
) {
    let Stolen {
        stream,
        original,
        peer,
    } = stolen;
    let opened = Body::IncomingConnection(IncomingConnection {
        stream_id: id,
        mode: SubscriptionMode::Steal as i32,
        local: Some(SocketAddr::V4(original).into()),
        remote: Some(peer.into()),
    });
    if out.send(opened).await.is_err() {
        return;
    }
    let (mut reader, mut writer) = stream.into_split();
    let clean = pump(&mut reader, &mut writer, id, &out, &mut input, &window).await;
    if !clean {
        // Abort the connection: the peer sees a reset, not a clean close.
        if let Ok(stream) = reader.reunite(writer) {
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        }
    }
}

fn error(code: ErrorCode, message: impl Into<String>) -> ErrorInfo {
    ErrorInfo {
        code: code as i32,
        message: message.into(),
        in_reply_to_seq: 0,
        errno: 0,
    }
}

fn unsupported(kind: &str, seq: u64) -> ErrorInfo {
    ErrorInfo {
        in_reply_to_seq: seq,
        ..error(
            ErrorCode::Unsupported,
            format!("this agent does not support {kind} frames"),
        )
    }
}

fn unsupported_op(op: Option<&request::Op>) -> ErrorInfo {
    let what = match op {
        Some(request::Op::PortSubscribe(_)) => "port subscriptions",
        Some(request::Op::PortUnsubscribe(_)) => "port unsubscriptions",
        Some(request::Op::OutgoingConnect(_)) => "outgoing connections",
        Some(request::Op::DnsLookup(_)) => "DNS lookups",
        Some(request::Op::EnvGet(_)) => "environment requests",
        Some(request::Op::Fs(_)) => "file operations",
        None => "this request (unknown to this agent version)",
    };
    error(
        ErrorCode::Unsupported,
        format!("this agent does not support {what} yet"),
    )
}

fn new_session_id() -> String {
    let bytes: [u8; 8] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Pumps one byte stream both ways: its bytes to the client within the stream's window, the
/// client's bytes into it with credit granted back as they are written. Returns true when the
/// client ended its direction cleanly (false: reset, or the session went away). Shared by stolen
/// TCP connections and upgraded HTTP connections.
pub(crate) async fn pump<R, W>(
    reader: &mut R,
    writer: &mut W,
    id: u64,
    out: &mpsc::Sender<Body>,
    input: &mut mpsc::UnboundedReceiver<StreamInput>,
    window: &SendWindow,
) -> bool
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let upstream = async {
        let mut buf = vec![0u8; MAX_DATA_CHUNK];
        loop {
            let allowed = window.reserve(MAX_DATA_CHUNK).await;
            let read = reader.read(&mut buf[..allowed]).await;
            if let Ok(n) = &read {
                window.grant((allowed - n) as u64);
            }
            match read {
                Ok(0) => {
                    let _ = out
                        .send(Body::StreamEnd(StreamEnd {
                            stream_id: id,
                            trailers: Vec::new(),
                        }))
                        .await;
                    return;
                }
                Ok(n) => {
                    let data = Bytes::copy_from_slice(&buf[..n]);
                    if out
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
                Err(e) => {
                    let reset = StreamReset {
                        stream_id: id,
                        reason: e.to_string(),
                        errno: e.raw_os_error().unwrap_or(0),
                    };
                    let _ = out.send(Body::StreamReset(reset)).await;
                    return;
                }
            }
        }
    };
    let downstream = async {
        let mut credit = RecvCredit::default();
        while let Some(item) = input.recv().await {
            match item {
                StreamInput::Data(data) => {
                    if writer.write_all(&data).await.is_err() {
                        return false;
                    }
                    if let Some(increment) = credit.consumed(data.len()) {
                        let update = WindowUpdate {
                            stream_id: id,
                            increment,
                        };
                        let _ = out.send(Body::WindowUpdate(update)).await;
                    }
                }
                StreamInput::End(_) => {
                    let _ = writer.shutdown().await;
                    return true;
                }
                StreamInput::Reset(_) => return false,
                StreamInput::ResponseHead(_) => {}
            }
        }
        false
    };
    let (_, clean) = tokio::join!(upstream, downstream);
    clean
}

/// An address on the wire: 4 or 16 bytes.
fn ip_of(bytes: &[u8]) -> Option<std::net::IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        _ => None,
    }
}
