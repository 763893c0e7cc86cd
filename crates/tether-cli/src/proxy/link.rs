//! The local proxy's side of the link: opening the session, and when the link drops,
//! reconnecting with capped exponential backoff and jitter (backon) and resuming the session on
//! the new link. The [`Carrier`](tether_session::carrier::Carrier) replays what the agent missed.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use backon::{ExponentialBuilder, Retryable as _};
use tether_protocol::{Hello, Resume, Welcome};
use tether_session::{
    carrier::{Attach, Control, Io, Link, LinkState, Status},
    link::{self, LinkError},
    settings::Settings,
};
use tokio::sync::watch;

use super::Event;

/// Opens a new byte stream to the agent: a TCP connection for a local agent, a port-forward for
/// a pod.
pub(crate) type Connect = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<Box<dyn Io>, ConnectError>> + Send>>
        + Send
        + Sync,
>;

/// Why a new link's transport could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    /// A local agent's TCP port.
    #[error("cannot connect to {addr}")]
    Tcp {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Forward(#[from] tether_kube::agent::ForwardError),
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
}

impl ConnectError {
    fn retryable(&self) -> bool {
        match self {
            ConnectError::Tcp { .. } | ConnectError::TimedOut(_) => true,
            // A pod that is gone, or a port-forward that is forbidden, stays so.
            ConnectError::Forward(e) => e.retryable(),
        }
    }
}

/// Whether reconnecting still makes sense: `Err(reason)` when the target (or the agent) is gone.
pub(crate) type StillThere = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// How to reach the agent, again and again.
pub(crate) struct Dialer {
    pub(crate) connect: Connect,
    pub(crate) token: String,
    pub(crate) settings: Settings,
    /// Delay before the first retry, and the longest delay.
    pub(crate) initial: Duration,
    pub(crate) max_delay: Duration,
    pub(crate) still_there: StillThere,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Why a reconnect attempt failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DialError {
    #[error(transparent)]
    Connect(ConnectError),
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The agent no longer knows the session.
    #[error("{0}")]
    Expired(String),
    #[error("{0}")]
    Gone(String),
}

impl DialError {
    /// The message and every cause, for the user ("the link failed: connection reset").
    pub(crate) fn describe(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }

    pub(crate) fn retryable(&self) -> bool {
        match self {
            DialError::Connect(e) => e.retryable(),
            // A refusal that is not about the session (e.g. the agent is shutting down) is final;
            // everything else on the link is the network's fault.
            DialError::Link(LinkError::Refused(_)) => false,
            DialError::Link(_) => true,
            DialError::Expired(_) | DialError::Gone(_) => false,
        }
    }
}

impl Dialer {
    /// A dialer with the link settings of `config` (keepalive, resume buffer, reconnect).
    pub(crate) fn new(
        config: &tether_config::Config,
        connect: Connect,
        token: String,
        still_there: StillThere,
    ) -> Dialer {
        Dialer {
            connect,
            token,
            settings: Settings {
                keepalive_interval: config.keepalive.interval.get(),
                keepalive_timeout: config.keepalive.timeout.get(),
                grace: Some(config.reconnect.grace.get()),
                buffer: usize::try_from(config.resume.buffer).unwrap_or(usize::MAX),
            },
            initial: config.reconnect.initial.get(),
            max_delay: config.reconnect.max_delay.get(),
            still_there,
        }
    }

    fn hello(&self, resume: Option<Resume>) -> Hello {
        Hello {
            token: self.token.clone(),
            client: concat!("tether/", env!("CARGO_PKG_VERSION")).into(),
            resume,
            capabilities: vec!["resume".into()],
            link: Some(self.settings.to_options()),
        }
    }

    async fn handshake(&self, resume: Option<Resume>) -> Result<(Link, Welcome), DialError> {
        let stream = (self.connect)().await.map_err(DialError::Connect)?;
        let resuming = resume.is_some();
        match link::client_handshake(stream, self.hello(resume)).await {
            Err(LinkError::Refused(message)) if resuming => Err(DialError::Expired(message)),
            other => Ok(other?),
        }
    }

    /// Opens a new session.
    pub(crate) async fn open(&self) -> Result<(Link, Welcome), DialError> {
        self.handshake(None).await
    }

    /// One attempt to re-attach to `session_id`.
    async fn resume(&self, session_id: &str, received: u64) -> Result<(Link, Welcome), DialError> {
        (self.still_there)().map_err(DialError::Gone)?;
        let resume = Resume {
            session_id: session_id.to_owned(),
            received,
        };
        let (link, welcome) = self.handshake(Some(resume)).await?;
        if !welcome.resumed {
            return Err(DialError::Expired(
                "the agent started a new session instead of resuming ours".into(),
            ));
        }
        Ok((link, welcome))
    }
}

/// Watches the session's link; whenever it is down, reconnects and re-attaches it. Ends when the
/// session ends (or cannot be resumed: then it ends the session, with the reason).
pub(crate) async fn reconnect_forever(
    dialer: Arc<Dialer>,
    session_id: String,
    control: Control,
    mut status: watch::Receiver<Status>,
    received: impl Fn() -> u64,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
) {
    loop {
        let since = loop {
            match &status.borrow_and_update().state {
                LinkState::Down { since, reason } => {
                    let _ = events.send(Event::LinkLost {
                        reason: reason.clone(),
                    });
                    break *since;
                }
                LinkState::Ended { .. } => return,
                _ => {}
            }
            if status.changed().await.is_err() {
                return;
            }
        };
        let attempts = AtomicU32::new(0);
        let grace = dialer.settings.grace.unwrap_or(Duration::ZERO);
        let max_delay = dialer.max_delay;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(dialer.initial)
            .with_max_delay(max_delay)
            .with_jitter()
            .without_max_times();
        let received_now = received();
        let attempt = || async {
            attempts.fetch_add(1, Ordering::Relaxed);
            if since.elapsed() >= grace {
                return Err(DialError::Gone(format!(
                    "no link for {} s (reconnect.grace)",
                    grace.as_secs()
                )));
            }
            dialer.resume(&session_id, received_now).await
        };
        let result = attempt
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(DialError::retryable)
            // Jitter may add up to the delay again: keep every wait within `max_delay`, and the
            // last one within the grace (the attempt after it reports the expiry).
            .adjust(|_, delay| {
                let left = grace.saturating_sub(since.elapsed());
                delay.map(|d| d.min(max_delay).min(left))
            })
            .notify(|error, next| {
                let _ = events.send(Event::Reconnecting {
                    attempt: attempts.load(Ordering::Relaxed),
                    next,
                    error: error.describe(),
                });
            })
            .await;
        match result {
            Ok((link, welcome)) => {
                let links = status.borrow().links;
                let attach = Attach {
                    link,
                    peer_received: welcome.received,
                    welcome: None,
                };
                if control.attach(attach).await.is_err() {
                    return;
                }
                // Resumed once the carrier took the link (it counts it); the new link may
                // already have dropped again by then, which the outer loop handles next.
                let taken = status
                    .wait_for(|s| s.links > links || matches!(s.state, LinkState::Ended { .. }))
                    .await
                    .map(|s| s.links > links);
                match taken {
                    Ok(true) => {
                        let _ = events.send(Event::LinkResumed {
                            after: since.elapsed(),
                            attempts: attempts.load(Ordering::Relaxed),
                        });
                    }
                    _ => return,
                }
            }
            Err(error) => {
                let reason = match error {
                    DialError::Gone(reason) | DialError::Expired(reason) => reason,
                    other => format!(
                        "gave up after {} attempts in {:.0} s: {}",
                        attempts.load(Ordering::Relaxed),
                        since.elapsed().as_secs_f64(),
                        other.describe()
                    ),
                };
                control.end(reason).await;
                return;
            }
        }
    }
}
