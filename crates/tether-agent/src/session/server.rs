//! Accepting links: the handshake, authentication, and one session per authenticated link
//! (or the link handed to the session it resumes); what every session of one agent shares.

use super::*;

/// What every session of one agent shares.
#[derive(Debug)]
pub struct Agent {
    pub(crate) token: TokenDigest,
    pub(crate) netns: Netns,
    pub(crate) owner: Owner,
    pub(crate) backend: Backend,
    /// Said to each session when it first steals: why `backend` is a fallback.
    pub(super) backend_note: Option<&'static str>,
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
    pub(super) sessions: Mutex<HashMap<String, (Control, watch::Receiver<Status>)>>,
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

    pub(super) fn root(&self) -> Result<Arc<Root>, ErrorInfo> {
        self.root
            .clone()
            .map_err(|message| error(ErrorCode::TargetGone, message))
    }

    /// The resolver for the target (started on first use).
    pub(super) fn dns(&self) -> Result<Dns, ErrorInfo> {
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
    pub(super) fn environment(&self) -> Result<tether_protocol::Env, ErrorInfo> {
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
pub(super) struct Busy(Arc<watch::Sender<usize>>);

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

pub(super) async fn handle_link(stream: TcpStream, agent: Arc<Agent>) -> Result<(), LinkError> {
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
pub(super) async fn run_session(
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
    let tuning = Tuning::new(carrier.rtt_micros(), session_budget(settings.buffer));
    let mut session = Session::new(agent, id.clone(), out, pressure, tuning);
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

pub(super) fn new_session_id() -> String {
    let bytes: [u8; 8] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
