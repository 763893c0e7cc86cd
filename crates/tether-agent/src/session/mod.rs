//! One session per authenticated link: its frames dispatched, subscriptions, stolen and mirrored
//! streams, and the session's rules. `server` accepts the links; `subscribe`, `ops` and `stolen`
//! hold what the session does for each kind of work.

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use futures_util::SinkExt as _;
use tether_protocol::{
    Body, ErrorCode, ErrorInfo, Frame, HandshakeError, IncomingConnection, PortSubscribe, Request,
    Response, Subscribed, SubscriptionMode, TokenDigest, Welcome, check_hello, hello_error,
    request, response,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    task::JoinSet,
};

use tether_session::{
    carrier::{Attach, Carrier, Control, Endpoints, Io, LinkState, Status},
    flow::{Tuning, session_budget},
    link::{self, LinkError},
    settings::Settings,
    stream::{Routed, Stream, Streams},
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

mod ops;
mod server;
mod stolen;
mod subscribe;

pub(crate) use server::serve_until_idle;
pub use server::{Agent, serve};

use self::{ops::OpContext, stolen::route_stolen, subscribe::ActiveRules};

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

impl Session {
    /// `tuning`: how the windows this side grants grow (the carrier's round trip, a budget).
    fn new(
        agent: Arc<Agent>,
        id: String,
        out: mpsc::Sender<Body>,
        pressure: mirror::Pressure,
        tuning: Tuning,
    ) -> Session {
        let (stolen_tx, stolen_rx) = mpsc::channel(256);
        Session {
            agent,
            id,
            out,
            // The agent opens even stream ids.
            next_stream: Arc::new(AtomicU64::new(2)),
            streams: Arc::new(Streams::tuned(Arc::new(tuning))),
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
            Some(
                body @ (Body::WindowUpdate(_)
                | Body::Datagram(_)
                | Body::StreamData(_)
                | Body::StreamEnd(_)
                | Body::HttpResponseHead(_)
                | Body::StreamReset(_)),
            ) => {
                // The client never sends without credit: no stream of this side is bounded.
                let _: Routed = self.streams.route(body);
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
        // The client is gone: its stolen connections cannot be answered any more. Tasks not in
        // `stream_tasks` (an upgraded request's pump) see their input end.
        self.stream_tasks.abort_all();
        self.streams.clear();
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
