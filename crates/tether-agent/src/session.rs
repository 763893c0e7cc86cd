//! Accepting links and running one session per authenticated link: subscriptions, stolen and
//! mirrored streams, and the session's rules.

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use tether_protocol::{
    Body, ErrorCode, ErrorInfo, Frame, HandshakeError, IncomingConnection, MAX_DATA_CHUNK, Pong,
    PortSubscribe, Response, StreamData, StreamEnd, StreamReset, Subscribed, SubscriptionMode,
    Welcome, WindowUpdate, check_hello, hello_error, request, response,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinSet,
};

use crate::{
    flow::{RecvCredit, SendWindow},
    link::{self, LinkError},
    mirror,
    netns::Netns,
    rules::{self, Backend, Owner, SessionRules},
    steal::{PortClaim, PortTable, Stolen},
};

/// What every session of one agent shares.
#[derive(Debug)]
pub struct Agent {
    pub(crate) token: Arc<str>,
    pub(crate) netns: Netns,
    pub(crate) owner: Owner,
    pub(crate) backend: Backend,
    pub(crate) steal_port: u16,
    pub(crate) ports: PortTable,
}

impl Agent {
    /// Prepares an agent for `netns`: picks the rules backend and starts the steal listener.
    pub async fn start(
        token: Arc<str>,
        netns: Netns,
        owner: Owner,
        nftables: Option<bool>,
    ) -> anyhow::Result<Arc<Agent>> {
        let backend = rules::choose_backend(&netns, nftables).await?;
        let listener = crate::steal::bind(&netns).await?;
        let steal_port = listener.local_addr()?.port();
        let ports = PortTable::default();
        tokio::spawn(crate::steal::accept_loop(
            listener,
            Arc::clone(&ports),
            netns.clone(),
        ));
        tracing::info!(target = %netns.label, %backend, steal_port, "agent ready");
        Ok(Arc::new(Agent {
            token,
            netns,
            owner,
            backend,
            steal_port,
            ports,
        }))
    }
}

/// Accepts links forever; each runs on its own task, so one bad client never stops the others.
pub async fn serve(listener: TcpListener, agent: Arc<Agent>) {
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
        tokio::spawn(async move {
            match handle_link(stream, agent).await {
                Ok(()) => tracing::debug!(%peer, "link closed"),
                Err(error) => tracing::warn!(%peer, error = %error_chain(&error), "link ended"),
            }
        });
    }
}

async fn handle_link(stream: TcpStream, agent: Arc<Agent>) -> Result<(), LinkError> {
    stream.set_nodelay(true)?;
    let mut link = link::exchange_preface(stream).await?;
    let first = link::next_frame(&mut link).await?;
    let checked = match &first.body {
        Some(Body::Hello(hello)) => check_hello(hello, &agent.token),
        Some(other) => Err(HandshakeError::NotHello(other.kind())),
        None => Err(HandshakeError::NotHello("unknown")),
    };
    if let Err(refusal) = checked {
        link.send(hello_error(&refusal)).await?;
        link.close().await?;
        return Err(LinkError::Refused(refusal.to_string()));
    }
    let session_id = new_session_id();
    tracing::info!(%session_id, "session started");
    let welcome = Welcome {
        session_id: session_id.clone(),
        agent: concat!("tether-agent/", env!("CARGO_PKG_VERSION")).to_owned(),
        resumed: false,
        received: 0,
        capabilities: Vec::new(),
    };
    link.send(Frame {
        seq: 0,
        ack: 0,
        body: Some(Body::Welcome(welcome)),
    })
    .await?;

    let (mut sink, mut frames) = link.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Body>(1024);
    let received = Arc::new(AtomicU64::new(0));
    let writer_received = Arc::clone(&received);
    let writer = tokio::spawn(async move {
        let mut sent = 0u64;
        while let Some(body) = out_rx.recv().await {
            let seq = if body.is_link_local() {
                0
            } else {
                sent += 1;
                sent
            };
            let ack = writer_received.load(Ordering::Relaxed);
            if sink
                .send(Frame {
                    seq,
                    ack,
                    body: Some(body),
                })
                .await
                .is_err()
            {
                break;
            }
        }
    });

    let mut session = Session::new(agent, session_id.clone(), out_tx);
    let result = loop {
        tokio::select! {
            frame = frames.next() => match frame {
                None => break Ok(()),
                Some(Err(error)) => break Err(LinkError::Io(error)),
                Some(Ok(frame)) => {
                    if frame.seq != 0 {
                        received.store(frame.seq, Ordering::Relaxed);
                    }
                    if !session.on_frame(frame).await {
                        break Ok(());
                    }
                }
            },
            Some(stolen) = session.stolen_rx.recv() => session.on_stolen(stolen),
            Some(id) = session.done_rx.recv() => {
                session.streams.remove(&id);
                session.windows.remove(&id);
            }
        }
    };
    session.end().await;
    writer.abort();
    tracing::info!(%session_id, "session ended");
    result
}

/// What the client sends into one stream.
#[derive(Debug)]
enum StreamInput {
    Data(Bytes),
    End,
    Reset,
}

struct Session {
    agent: Arc<Agent>,
    id: String,
    out: mpsc::Sender<Body>,
    next_stream: Arc<AtomicU64>,
    streams: HashMap<u64, mpsc::UnboundedSender<StreamInput>>,
    /// Credit for the bytes this side sends on each stolen stream.
    windows: HashMap<u64, Arc<SendWindow>>,
    stream_tasks: JoinSet<()>,
    done_tx: mpsc::UnboundedSender<u64>,
    done_rx: mpsc::UnboundedReceiver<u64>,
    stolen_tx: mpsc::Sender<Stolen>,
    stolen_rx: mpsc::Receiver<Stolen>,
    rules: Option<ActiveRules>,
    mirrors: HashMap<u16, mirror::Capture>,
}

struct ActiveRules {
    rules: SessionRules,
    ports: Arc<Mutex<BTreeSet<u16>>>,
    refresher: Option<tokio::task::JoinHandle<()>>,
}

impl Session {
    fn new(agent: Arc<Agent>, id: String, out: mpsc::Sender<Body>) -> Session {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let (stolen_tx, stolen_rx) = mpsc::channel(256);
        Session {
            agent,
            id,
            out,
            // The agent opens even stream ids.
            next_stream: Arc::new(AtomicU64::new(2)),
            streams: HashMap::new(),
            windows: HashMap::new(),
            stream_tasks: JoinSet::new(),
            done_tx,
            done_rx,
            stolen_tx,
            stolen_rx,
            rules: None,
            mirrors: HashMap::new(),
        }
    }

    async fn send(&self, body: Body) {
        let _ = self.out.send(body).await;
    }

    /// Handles one frame; false ends the session.
    async fn on_frame(&mut self, frame: Frame) -> bool {
        match frame.body {
            Some(Body::Ping(ping)) => self.send(Body::Pong(Pong { nonce: ping.nonce })).await,
            Some(Body::Goodbye(_)) => return false,
            Some(Body::WindowUpdate(update)) => {
                if let Some(window) = self.windows.get(&update.stream_id) {
                    window.grant(u64::from(update.increment));
                }
            }
            Some(Body::Pong(_) | Body::Ack(_)) => {}
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
            Some(Body::StreamEnd(end)) => self.forward_to_stream(end.stream_id, StreamInput::End),
            Some(Body::StreamReset(reset)) => {
                self.forward_to_stream(reset.stream_id, StreamInput::Reset)
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
        if let Some(tx) = self.streams.get(&id) {
            let _ = tx.send(input);
        }
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
            SubscriptionMode::Steal => self.steal(port, subscribe.flush_connections).await?,
            SubscriptionMode::Mirror => self.mirror(port).await?,
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
                    format!("session {}", claim.session)
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
            };
            rules::apply(&self.agent.netns, &rules.setup())
                .await
                .map_err(rules_error)?;
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

    async fn mirror(&mut self, port: u16) -> Result<(), ErrorInfo> {
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
        // Connections already stolen keep going; only new ones reach the original app again.
        self.agent
            .ports
            .lock()
            .expect("port table lock")
            .remove(&port);
        Ok(response::Result::Done(Default::default()))
    }

    fn on_stolen(&mut self, stolen: Stolen) {
        let id = self.next_stream.fetch_add(2, Ordering::Relaxed);
        let (input_tx, input_rx) = mpsc::unbounded_channel();
        self.streams.insert(id, input_tx);
        let window = Arc::new(SendWindow::default());
        self.windows.insert(id, Arc::clone(&window));
        let out = self.out.clone();
        let done = self.done_tx.clone();
        self.stream_tasks.spawn(async move {
            run_stolen(stolen, id, out, input_rx, window).await;
            let _ = done.send(id);
        });
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
                StreamInput::End => {
                    let _ = writer.shutdown().await;
                    return true;
                }
                StreamInput::Reset => return false,
            }
        }
        false
    };
    let (_, clean) = tokio::join!(upstream, downstream);
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
