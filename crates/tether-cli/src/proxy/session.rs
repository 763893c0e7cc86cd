//! One session with one agent. A run has a primary session, which carries everything (incoming
//! ports, outgoing connections, names, files, environment); with `mirror_all_replicas` it has one
//! more per other replica of the workload, which only mirrors. Following a replaced pod swaps the
//! primary for a session with the new pod's agent (`Shared::replace_primary`).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tether_protocol::{Body, ErrorInfo, Request, Response, request, response};
use tether_session::carrier::{Carrier, Control, LinkState, Status};
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinSet,
};

use tether_session::{
    flow::{Tuning, session_budget},
    stream::{Stream, Streams},
};

use super::MIRROR_QUEUE_LIMIT;

/// A session with one agent, and the streams it carries.
#[derive(Debug)]
pub(crate) struct Session {
    /// Unique in this run: pooled connections to the app are kept per session, since two
    /// agents' connection ids may be equal.
    pub(crate) id: u32,
    /// The pod this agent serves (empty for local targets), for messages.
    pub(crate) pod: String,
    /// Its identity for whoever follows the target ([`super::Opened::key`]).
    pub(crate) key: String,
    pub(crate) session_id: String,
    pub(super) out: mpsc::Sender<Body>,
    /// True while the session has a link.
    connected: Arc<AtomicBool>,
    next_request: AtomicU64,
    pub(super) pending: Mutex<HashMap<u64, oneshot::Sender<Response>>>,
    pub(super) streams: Arc<Streams>,
    pub(crate) status: watch::Receiver<Status>,
    pub(crate) control: Control,
    carrier: tokio::sync::Mutex<Option<Carrier>>,
    pub(super) tasks: Mutex<JoinSet<()>>,
    /// Set when the proxy ends this session on purpose (its pod was replaced or scaled away):
    /// its end is then no news.
    pub(super) retired: AtomicBool,
    /// True once the session is over (closed, or ended on its own).
    ended: watch::Sender<bool>,
}

impl Session {
    pub(super) fn new(
        id: u32,
        pod: String,
        key: String,
        session_id: String,
        carrier: Carrier,
        out: mpsc::Sender<Body>,
    ) -> Session {
        Session {
            id,
            pod,
            key,
            session_id,
            out,
            connected: carrier.connected(),
            next_request: AtomicU64::new(1),
            pending: Mutex::default(),
            // The windows this side grants grow to the link's bandwidth-delay product.
            streams: Arc::new(Streams::tuned(Arc::new(Tuning::new(
                carrier.rtt_micros(),
                session_budget(carrier.settings().buffer),
            )))),
            status: carrier.status(),
            control: carrier.control(),
            carrier: tokio::sync::Mutex::new(Some(carrier)),
            tasks: Mutex::default(),
            retired: AtomicBool::new(false),
            ended: watch::Sender::new(false),
        }
    }

    /// The session is over: whatever waits on it (credit, say) stops waiting.
    pub(super) fn mark_ended(&self) {
        self.ended.send_replace(true);
    }

    /// Resolves once the session is over.
    pub(super) async fn ended(&self) {
        let mut ended = self.ended.subscribe();
        let _ = ended.wait_for(|over| *over).await;
    }

    /// Registers a stream; its frames reach the returned receiver.
    /// Registers a stream the agent opened (or this side is about to): a mirrored copy's data
    /// comes without credit and is bounded instead ([`MIRROR_QUEUE_LIMIT`]).
    pub(super) fn open_stream(&self, id: u64, mirror: bool) -> Stream {
        if mirror {
            self.streams.open_bounded(id, MIRROR_QUEUE_LIMIT)
        } else {
            self.streams.open(id)
        }
    }

    /// Forgets a stream (both directions).
    pub(super) fn close_stream(&self, id: u64) {
        self.streams.close(id);
    }

    /// Asks the agent and waits for its answer: up to 30 s of link time (while the link is down
    /// the request waits for the resume).
    pub(super) async fn request(&self, op: request::Op) -> Result<response::Result, ErrorInfo> {
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending lock").insert(id, tx);
        let lost = || ErrorInfo {
            message: "the link to the agent is closed".into(),
            ..Default::default()
        };
        self.out
            .send(Body::Request(Request { id, op: Some(op) }))
            .await
            .map_err(|_| lost())?;
        let mut rx = std::pin::pin!(rx);
        let mut waited = Duration::ZERO;
        let response = loop {
            const STEP: Duration = Duration::from_secs(1);
            match tokio::time::timeout(STEP, &mut rx).await {
                Ok(answer) => break answer.map_err(|_| lost())?,
                Err(_) if self.connected.load(Ordering::Acquire) => {
                    waited += STEP;
                    if waited >= Duration::from_secs(30) {
                        return Err(ErrorInfo {
                            message: "the agent did not answer within 30 s".into(),
                            ..Default::default()
                        });
                    }
                }
                Err(_) => {}
            }
        };
        match response.result {
            Some(response::Result::Error(error)) => Err(error),
            Some(result) => Ok(result),
            None => Err(ErrorInfo {
                message: "empty response from the agent".into(),
                ..Default::default()
            }),
        }
    }

    /// Ends the session on purpose with a goodbye (when the link is up), bounded; its streams
    /// end, which closes their local connections.
    pub(super) async fn close(&self, reason: &str) {
        self.retired.store(true, Ordering::Release);
        // Marked over at the end, below: the goodbye is still to be sent.
        let mut status = self.status.clone();
        // During an outage, give the reconnect a moment, so the agent learns the session is over
        // (and frees its ports) now rather than at the end of its grace.
        let up = matches!(
            tokio::time::timeout(
                Duration::from_secs(2),
                status.wait_for(|s| !matches!(s.state, LinkState::Down { .. })),
            )
            .await,
            Ok(Ok(s)) if s.state == LinkState::Up
        );
        self.tasks.lock().expect("tasks lock").abort_all();
        if up {
            let goodbye = Body::Goodbye(tether_protocol::Goodbye {
                reason: reason.to_owned(),
            });
            let _ = tokio::time::timeout(Duration::from_secs(1), self.out.send(goodbye)).await;
        }
        // Writes what is queued (the goodbye last) on the current link, bounded.
        if let Some(mut carrier) = self.carrier.lock().await.take() {
            carrier.close().await;
        }
        self.pending.lock().expect("pending lock").clear();
        self.streams.clear();
        self.mark_ended();
    }
}
