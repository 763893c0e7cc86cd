//! A session's frames over successive links, so a dropped link is a non-event.
//!
//! The [`Carrier`] sits between a session (the agent's or the local proxy's) and whatever link
//! currently carries it. The session sends [`Body`]s and receives [`Frame`]s as if the link never
//! broke; the carrier
//!
//! - numbers the session's frames (`seq`, from 1) and keeps each one until the peer acknowledges
//!   it ([`Replay`], bounded by [`Settings::buffer`]: when full, the session waits);
//! - acknowledges the peer's frames in every frame it writes (and with an `Ack` frame every
//!   [`ACK_EVERY`] frames when it has nothing else to say), delivers them in order, once, and
//!   drops duplicates by `seq`;
//! - pings every [`Settings::keepalive_interval`] and declares the link dead when nothing at all
//!   arrived for [`Settings::keepalive_timeout`] (a half-dead link looks exactly like that);
//! - on a new link ([`Attach`]), resends every kept frame the peer did not receive, in order,
//!   before anything new;
//! - gives up after [`Settings::grace`] without a link (or at once when there is no grace: a
//!   session without resume ends with its link). Then `incoming` closes and the session ends.
//!
//! Finding a new link is not its business: the local proxy reconnects (`proxy::link`), the
//! agent's accept loop hands over links whose hello resumes this session.
//!
//! Tasks: one driver owns the session's queue and the replay buffer; each link gets a reader and
//! a writer task, so neither side can deadlock by writing into a full socket while not reading.
//! A reader marks a frame received only after the session took it: a link that dies in between
//! leaves the frame unacknowledged and the peer sends it again.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use futures_util::{SinkExt as _, StreamExt as _};
use tether_protocol::{Ack, Body, Frame, Ping, Pong, Welcome};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{Notify, mpsc, oneshot, watch},
    task::JoinHandle,
    time::Instant,
};

use crate::{
    link::FramedLink,
    replay::{Replay, body_size},
    settings::Settings,
};

/// Anything a link can run over: TCP, a Kubernetes port-forward stream, a test's cutting proxy.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A link after its preface, over any [`Io`].
pub type Link = FramedLink<Box<dyn Io>>;

/// A reader that received this many frames without writing any acknowledges them with an
/// `Ack` frame, so a peer that only sends can free its replay buffer.
pub const ACK_EVERY: u64 = 32;

/// Round-trip samples kept for the link's round trip as flow control sees it.
const RTT_SAMPLES: usize = 8;

/// Frames written at most before a flush.
const WRITE_BATCH: usize = 64;

/// A new link for the session.
pub struct Attach {
    pub link: Link,
    /// The highest `seq` of ours the peer received (from its `Hello::resume` or `Welcome`).
    pub peer_received: u64,
    /// Agent side: the welcome to send first; the carrier fills in what it received.
    pub welcome: Option<Welcome>,
}

impl std::fmt::Debug for Attach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attach")
            .field("peer_received", &self.peer_received)
            .field("welcome", &self.welcome)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    Up,
    /// No link since `since`; the session waits (within its grace).
    Down {
        since: Instant,
        reason: String,
    },
    /// The session is over: the grace expired, the link ended without resume, or it was closed.
    Ended {
        reason: String,
    },
}

/// What `tether status` shows about the link.
#[derive(Debug, Clone)]
pub struct Status {
    pub state: LinkState,
    /// The last ping's round trip.
    pub rtt: Option<Duration>,
    /// Links the session ran over (1 + reconnects).
    pub links: u64,
    /// Frames kept for replay, and their size.
    pub buffered_frames: usize,
    pub buffered_bytes: usize,
}

/// The session's side of a carrier.
/// Hands a carrier new links, or ends its session; cheap to clone.
#[derive(Debug, Clone)]
pub struct Control {
    tx: mpsc::Sender<Command>,
}

#[derive(Debug)]
enum Command {
    Attach(Attach),
    End(String),
    Ping(oneshot::Sender<Duration>),
}

impl Control {
    /// Gives the session a new link. `Err` gives the link back when the session is over.
    pub async fn attach(&self, attach: Attach) -> Result<(), Attach> {
        self.tx
            .send(Command::Attach(attach))
            .await
            .map_err(|mpsc::error::SendError(command)| match command {
                Command::Attach(attach) => attach,
                _ => unreachable!("an attach was sent"),
            })
    }

    /// Ends the session now (e.g. the peer says it no longer exists).
    pub async fn end(&self, reason: String) {
        let _ = self.tx.send(Command::End(reason)).await;
    }

    /// Pings the peer now; the round trip, or `None` without a link or an answer within
    /// `timeout`.
    pub async fn ping(&self, timeout: Duration) -> Option<Duration> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Ping(tx)).await.ok()?;
        tokio::time::timeout(timeout, rx).await.ok()?.ok()
    }
}

#[derive(Debug)]
pub struct Carrier {
    control: Control,
    status: watch::Receiver<Status>,
    received: Arc<AtomicU64>,
    connected: Arc<AtomicBool>,
    rtt_micros: Arc<AtomicU64>,
    settings: Settings,
    close: Option<oneshot::Sender<()>>,
    driver: Option<JoinHandle<()>>,
}

/// Where the session sends and receives.
#[derive(Debug)]
pub struct Endpoints {
    /// The session's frames to the peer (link-local kinds go out on the current link only).
    pub out: mpsc::Sender<Body>,
    /// The peer's session frames, in order, each once. Closes when the session is over.
    /// Unbounded so the link's reader never waits for the session: it keeps reading the
    /// acknowledgements that free this side's replay buffer (a bounded queue here could close a
    /// cycle: session waits for replay space, replay waits for acks, acks wait behind the
    /// session). What the peer sends is bounded by flow control (stream data) and by what the
    /// session asked for (responses).
    pub incoming: mpsc::UnboundedReceiver<Frame>,
}

impl Carrier {
    /// Starts carrying a session over its first link.
    pub fn spawn(settings: Settings, first: Attach) -> (Carrier, Endpoints) {
        let (out_tx, out_rx) = mpsc::channel(1024);
        let (in_tx, in_rx) = mpsc::unbounded_channel();
        let (control_tx, control_rx) = mpsc::channel(4);
        let (close_tx, close_rx) = oneshot::channel();
        // Up from the start: the first link is attached before anything else happens.
        let (status_tx, status_rx) = watch::channel(Status {
            state: LinkState::Up,
            rtt: None,
            links: 0,
            buffered_frames: 0,
            buffered_bytes: 0,
        });
        let received = Arc::new(AtomicU64::new(0));
        let connected = Arc::new(AtomicBool::new(false));
        let rtt_micros = Arc::new(AtomicU64::new(0));
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let driver = Driver {
            settings,
            out_rx: Arc::new(tokio::sync::Mutex::new(out_rx)),
            out_probe: out_tx.downgrade(),
            in_tx,
            control_rx,
            close_rx,
            replay: Arc::new(Mutex::new(Replay::default())),
            space: Arc::new(Notify::new()),
            received: Arc::clone(&received),
            connected: Arc::clone(&connected),
            status: status_tx,
            link: None,
            generation: 0,
            events_tx,
            events_rx,
            epoch: Instant::now(),
            rtt: None,
            rtt_samples: std::collections::VecDeque::with_capacity(RTT_SAMPLES),
            rtt_micros: Arc::clone(&rtt_micros),
            links: 0,
            last_ping: Instant::now(),
            ping_waiters: Vec::new(),
        };
        let driver = tokio::spawn(driver.run(first));
        (
            Carrier {
                control: Control { tx: control_tx },
                status: status_rx,
                received,
                connected,
                rtt_micros,
                settings,
                close: Some(close_tx),
                driver: Some(driver),
            },
            Endpoints {
                out: out_tx,
                incoming: in_rx,
            },
        )
    }

    /// The link's round trip in microseconds, the least of the last few pings (0 until the first
    /// pong); shared, for the receivers that size their windows to it ([`crate::flow::Tuning`]).
    /// Pings wait behind bulk data on the link: the least sample is the link's own.
    pub fn rtt_micros(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.rtt_micros)
    }

    /// How this session lives through link trouble.
    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// Where new links for this session go.
    pub fn control(&self) -> Control {
        self.control.clone()
    }

    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// The highest `seq` received from the peer in order (what a resuming hello announces);
    /// shared, for the task that reconnects.
    pub fn received_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.received)
    }

    /// True while a link is up; shared, so hot paths can check it without a lock.
    pub fn connected(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.connected)
    }

    /// Writes what the session queued so far on the current link (bounded wait), then ends.
    pub async fn close(&mut self) {
        if let Some(close) = self.close.take() {
            let _ = close.send(());
        }
        if let Some(mut driver) = self.driver.take()
            && tokio::time::timeout(Duration::from_secs(2), &mut driver)
                .await
                .is_err()
        {
            driver.abort();
        }
    }
}

impl Drop for Carrier {
    fn drop(&mut self) {
        if let Some(driver) = &self.driver {
            driver.abort();
        }
    }
}

enum LinkEvent {
    Dead(String),
    Pong(u64),
    /// The session dropped its queue.
    SessionGone,
}

/// The current link's tasks.
struct LinkTasks {
    /// `None` once closed for writing.
    writer_tx: Option<mpsc::UnboundedSender<Frame>>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
    /// When the last frame arrived, in milliseconds since the driver's epoch.
    last_rx: Arc<AtomicU64>,
}

/// A link's tasks never outlive it (nor a dropped carrier): they would keep answering pings.
impl Drop for LinkTasks {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

impl LinkTasks {
    fn write(&self, frame: Frame) {
        if let Some(writer) = &self.writer_tx {
            let _ = writer.send(frame);
        }
    }

    /// Stops both tasks and waits until they are gone (so nothing of this link reaches the
    /// session after this returns).
    async fn stop(mut self) {
        self.reader.abort();
        self.writer.abort();
        let _ = (&mut self.reader).await;
        let _ = (&mut self.writer).await;
    }

    /// Closes the link after writing what is queued (bounded). The reader goes first: it holds
    /// a sender of the writer's queue (for pongs and acks), which would keep the queue open.
    async fn finish(mut self) {
        self.reader.abort();
        let _ = (&mut self.reader).await;
        self.writer_tx = None;
        let _ = tokio::time::timeout(Duration::from_secs(1), &mut self.writer).await;
    }
}

struct Driver {
    settings: Settings,
    /// The session's queue. The current link's writer holds the lock and numbers what it takes;
    /// without a link, frames wait here (unnumbered) and in the replay buffer.
    out_rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Body>>>,
    /// To see how much waits in the queue (without keeping it open).
    out_probe: mpsc::WeakSender<Body>,
    in_tx: mpsc::UnboundedSender<Frame>,
    control_rx: mpsc::Receiver<Command>,
    close_rx: oneshot::Receiver<()>,
    replay: Arc<Mutex<Replay>>,
    /// Signalled when acknowledgements free replay space.
    space: Arc<Notify>,
    received: Arc<AtomicU64>,
    connected: Arc<AtomicBool>,
    status: watch::Sender<Status>,
    link: Option<LinkTasks>,
    generation: u64,
    events_tx: mpsc::UnboundedSender<(u64, LinkEvent)>,
    events_rx: mpsc::UnboundedReceiver<(u64, LinkEvent)>,
    epoch: Instant,
    rtt: Option<Duration>,
    /// The last few round trips, for [`Carrier::rtt_micros`] (their least).
    rtt_samples: std::collections::VecDeque<Duration>,
    rtt_micros: Arc<AtomicU64>,
    links: u64,
    last_ping: Instant,
    /// Explicit pings (`Control::ping`) waiting for their pong, by nonce.
    ping_waiters: Vec<(u64, oneshot::Sender<Duration>)>,
}

impl Driver {
    async fn run(mut self, first: Attach) {
        self.attach(first).await;
        let tick_every = self
            .settings
            .keepalive_interval
            .min(self.settings.keepalive_timeout / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut tick = tokio::time::interval(tick_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if let LinkState::Ended { .. } = self.status.borrow().state {
                break;
            }
            tokio::select! {
                biased;
                _ = &mut self.close_rx => {
                    self.close("closed by this side").await;
                    break;
                }
                Some(command) = self.control_rx.recv() => match command {
                    Command::Attach(attach) => self.attach(attach).await,
                    Command::End(reason) => {
                        if let Some(link) = self.link.take() {
                            link.stop().await;
                        }
                        self.end(reason);
                    }
                    Command::Ping(reply) => {
                        self.ping_waiters.retain(|(_, waiter)| !waiter.is_closed());
                        if self.link.is_some() {
                            let nonce = self.ping();
                            self.ping_waiters.push((nonce, reply));
                        }
                    }
                },
                Some((generation, event)) = self.events_rx.recv() => {
                    if generation == self.generation {
                        match event {
                            LinkEvent::Dead(reason) => self.down(reason).await,
                            LinkEvent::SessionGone => {
                                self.close("the session ended").await;
                                break;
                            }
                            LinkEvent::Pong(nonce) => {
                                let sent = Duration::from_micros(nonce);
                                self.rtt = self.epoch.elapsed().checked_sub(sent);
                                if let Some(rtt) = self.rtt {
                                    // The least of the recent samples: a pong that waited behind
                                    // bulk data measures the queue, not the link.
                                    if self.rtt_samples.len() == RTT_SAMPLES {
                                        self.rtt_samples.pop_front();
                                    }
                                    self.rtt_samples.push_back(rtt);
                                    let least = self.rtt_samples.iter().min().copied().unwrap_or(rtt);
                                    let micros = u64::try_from(least.as_micros()).unwrap_or(u64::MAX).max(1);
                                    self.rtt_micros.store(micros, Ordering::Relaxed);
                                    for (_, waiter) in self.ping_waiters.extract_if(.., |(n, _)| *n == nonce) {
                                        let _ = waiter.send(rtt);
                                    }
                                }
                            }
                        }
                    }
                }
                _ = tick.tick() => self.keepalive().await,
            }
            self.publish();
        }
        self.connected.store(false, Ordering::Release);
    }

    /// A link-local frame on the current link (session frames go through the writer).
    fn send_local(&mut self, body: Body) {
        if let Some(link) = &self.link {
            link.write(Frame {
                seq: 0,
                ack: 0,
                body: Some(body),
            });
        }
    }

    async fn attach(&mut self, attach: Attach) {
        let Attach {
            mut link,
            peer_received,
            welcome,
        } = attach;
        // Can this link resume the session at all? Checked before anything changes, so a stale
        // or bogus resume costs only its own link, never the live one.
        let usable = self
            .replay
            .lock()
            .expect("replay lock")
            .check(peer_received);
        if let Err(error) = usable {
            if welcome.is_some() {
                tracing::warn!(%error, "a resume that cannot be served; refusing that link only");
                let refusal = Frame {
                    seq: 0,
                    ack: 0,
                    body: Some(Body::Error(tether_protocol::ErrorInfo {
                        code: tether_protocol::ErrorCode::SessionExpired as i32,
                        message: format!("cannot resume the session: {error}"),
                        in_reply_to_seq: 0,
                        errno: 0,
                    })),
                };
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        let _ = link.send(refusal).await;
                        let _ = link.close().await;
                    })
                    .await;
                });
            } else {
                self.end(format!("cannot resume the session: {error}"));
            }
            return;
        }
        if let Some(old) = self.link.take() {
            old.stop().await;
        }
        let (mut sink, stream) = link.split();
        if let Some(mut welcome) = welcome {
            welcome.received = self.received.load(Ordering::Acquire);
            let sent = tokio::time::timeout(
                self.settings.keepalive_timeout,
                sink.send(Frame {
                    seq: 0,
                    ack: 0,
                    body: Some(Body::Welcome(welcome)),
                }),
            )
            .await;
            if !matches!(sent, Ok(Ok(()))) {
                if self.links == 0 {
                    // The client never learned the session's id: nobody can resume it.
                    self.end("the client went away before the session started".into());
                } else {
                    self.down("the new link failed during the welcome".into())
                        .await;
                }
                return;
            }
        }
        let backlog = self
            .replay
            .lock()
            .expect("replay lock")
            .after(peer_received);
        let backlog = match backlog {
            Ok(backlog) => backlog,
            Err(error) => {
                self.end(format!("cannot resume the session: {error}"));
                return;
            }
        };
        self.generation += 1;
        let (writer_tx, writer_rx) = mpsc::unbounded_channel();
        for frame in backlog {
            let _ = writer_tx.send(frame);
        }
        let last_rx = Arc::new(AtomicU64::new(self.now_ms()));
        let writer = tokio::spawn(
            Writer {
                local: writer_rx,
                session: Arc::clone(&self.out_rx),
                replay: Arc::clone(&self.replay),
                space: Arc::clone(&self.space),
                limit: self.settings.buffer,
                keep: self.settings.grace.is_some(),
                received: Arc::clone(&self.received),
                events: self.events_tx.clone(),
                generation: self.generation,
            }
            .run(sink),
        );
        let reader = tokio::spawn(
            Reader {
                in_tx: self.in_tx.clone(),
                received: Arc::clone(&self.received),
                replay: Arc::clone(&self.replay),
                space: Arc::clone(&self.space),
                writer_tx: writer_tx.clone(),
                events: self.events_tx.clone(),
                generation: self.generation,
                last_rx: Arc::clone(&last_rx),
                epoch: self.epoch,
                ack_bytes: (self.settings.buffer / 4).max(1),
            }
            .run(stream),
        );
        self.link = Some(LinkTasks {
            writer_tx: Some(writer_tx),
            reader,
            writer,
            last_rx,
        });
        self.links += 1;
        self.connected.store(true, Ordering::Release);
        self.status.send_modify(|s| s.state = LinkState::Up);
        self.ping();
    }

    async fn down(&mut self, reason: String) {
        if let Some(link) = self.link.take() {
            link.stop().await;
        }
        self.connected.store(false, Ordering::Release);
        if self.settings.grace.is_none() {
            self.end(format!("the link ended ({reason})"));
            return;
        }
        tracing::debug!(%reason, "link down; waiting for a new one");
        self.status.send_modify(|s| {
            // A failed new link does not restart the grace: it counts from the first drop.
            let since = match s.state {
                LinkState::Down { since, .. } => since,
                _ => Instant::now(),
            };
            s.state = LinkState::Down { since, reason }
        });
    }

    fn end(&mut self, reason: String) {
        self.connected.store(false, Ordering::Release);
        self.status
            .send_modify(|s| s.state = LinkState::Ended { reason });
    }

    /// Sends what the session queued (the writer drains the queue), closes the link, ends.
    async fn close(&mut self, reason: &str) {
        if let Some(link) = self.link.take() {
            link.finish().await;
        }
        self.end(reason.to_owned());
    }

    async fn keepalive(&mut self) {
        let state = self.status.borrow().state.clone();
        match state {
            LinkState::Up => {
                let Some(link) = &self.link else { return };
                let silent = self
                    .now_ms()
                    .saturating_sub(link.last_rx.load(Ordering::Relaxed));
                if silent > self.settings.keepalive_timeout.as_millis() as u64 {
                    let reason = format!(
                        "nothing arrived for {:.1} s",
                        Duration::from_millis(silent).as_secs_f64()
                    );
                    self.down(reason).await;
                } else if self.last_ping.elapsed() >= self.settings.keepalive_interval {
                    self.ping();
                }
            }
            LinkState::Down { since, .. } => {
                if self.out_probe.upgrade().is_none() {
                    // The session is gone; nothing will ever be sent again.
                    self.end("the session ended".into());
                    return;
                }
                if let Some(grace) = self.settings.grace
                    && since.elapsed() >= grace
                {
                    self.end(format!(
                        "no link for {:.1} s (reconnect.grace)",
                        grace.as_secs_f64()
                    ));
                }
            }
            LinkState::Ended { .. } => {}
        }
    }

    /// Sends a ping; its nonce is the send time (microseconds since the epoch).
    fn ping(&mut self) -> u64 {
        self.last_ping = Instant::now();
        let nonce = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.send_local(Body::Ping(Ping { nonce }));
        nonce
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn publish(&self) {
        let queued = self
            .out_probe
            .upgrade()
            .map_or(0, |out| out.max_capacity() - out.capacity());
        let (frames, bytes) = {
            let replay = self.replay.lock().expect("replay lock");
            (replay.len() + queued, replay.bytes())
        };
        self.status.send_if_modified(|s| {
            let changed = s.rtt != self.rtt
                || s.links != self.links
                || s.buffered_frames != frames
                || s.buffered_bytes != bytes;
            s.rtt = self.rtt;
            s.links = self.links;
            s.buffered_frames = frames;
            s.buffered_bytes = bytes;
            changed
        });
    }
}

/// A link's writer. It takes the session's frames straight from the session's queue (numbering
/// and keeping each), so a frame costs one task hop from the session to the socket, and
/// link-local frames (pings, pongs, acks, and first the replayed backlog) from its own queue.
/// Every frame acknowledges what was received so far; a burst goes out in one flush. When its
/// own queue closes, it writes what the session still queued and closes the link cleanly.
struct Writer {
    local: mpsc::UnboundedReceiver<Frame>,
    session: Arc<tokio::sync::Mutex<mpsc::Receiver<Body>>>,
    replay: Arc<Mutex<Replay>>,
    space: Arc<Notify>,
    limit: usize,
    /// Keep frames for replay (the session can be resumed).
    keep: bool,
    received: Arc<AtomicU64>,
    events: mpsc::UnboundedSender<(u64, LinkEvent)>,
    generation: u64,
}

impl Writer {
    async fn run(mut self, mut sink: futures_util::stream::SplitSink<Link, Frame>) {
        let session = Arc::clone(&self.session);
        // Only one link writes at a time; the old writer was stopped before this one started.
        let mut queue = session.lock().await;
        loop {
            let Some(frame) = self.next(&mut queue).await else {
                return;
            };
            let frame = match frame {
                Next::Frame(frame) => frame,
                Next::Finish => {
                    while let Ok(body) = queue.try_recv() {
                        let frame = self.number(body);
                        if sink.feed(self.with_ack(frame)).await.is_err() {
                            return;
                        }
                    }
                    let _ = sink.close().await;
                    return;
                }
            };
            if let Err(error) = sink.feed(self.with_ack(frame)).await {
                return self.failed(&error);
            }
            for _ in 1..WRITE_BATCH {
                let frame = match self.local.try_recv() {
                    Ok(frame) => frame,
                    Err(_) if !self.full() => match queue.try_recv() {
                        Ok(body) => self.number(body),
                        Err(_) => break,
                    },
                    Err(_) => break,
                };
                if let Err(error) = sink.feed(self.with_ack(frame)).await {
                    return self.failed(&error);
                }
            }
            if let Err(error) = sink.flush().await {
                return self.failed(&error);
            }
        }
    }

    /// The next frame to write: link-local ones first, then the session's (while the replay
    /// buffer has room). `None`: the session is gone (reported to the driver).
    async fn next(&mut self, queue: &mut mpsc::Receiver<Body>) -> Option<Next> {
        loop {
            let full = self.full();
            tokio::select! {
                biased;
                frame = self.local.recv() => {
                    return Some(frame.map_or(Next::Finish, Next::Frame));
                }
                body = queue.recv(), if !full => {
                    let Some(body) = body else {
                        let _ = self.events.send((self.generation, LinkEvent::SessionGone));
                        return None;
                    };
                    return Some(Next::Frame(self.number(body)));
                }
                () = self.space.notified(), if full => {}
            }
        }
    }

    fn full(&self) -> bool {
        self.replay.lock().expect("replay lock").bytes() >= self.limit
    }

    fn number(&self, body: Body) -> Frame {
        let seq = if body.is_link_local() {
            0
        } else {
            self.replay
                .lock()
                .expect("replay lock")
                .push(&body, self.keep)
        };
        Frame {
            seq,
            ack: 0,
            body: Some(body),
        }
    }

    fn with_ack(&self, mut frame: Frame) -> Frame {
        frame.ack = self.received.load(Ordering::Acquire);
        frame
    }

    fn failed(&self, error: &std::io::Error) {
        let _ = self.events.send((
            self.generation,
            LinkEvent::Dead(format!("write failed: {error}")),
        ));
    }
}

enum Next {
    Frame(Frame),
    /// The link's own queue closed: write what is left and close.
    Finish,
}

struct Reader {
    in_tx: mpsc::UnboundedSender<Frame>,
    received: Arc<AtomicU64>,
    replay: Arc<Mutex<Replay>>,
    space: Arc<Notify>,
    writer_tx: mpsc::UnboundedSender<Frame>,
    events: mpsc::UnboundedSender<(u64, LinkEvent)>,
    generation: u64,
    last_rx: Arc<AtomicU64>,
    epoch: Instant,
    /// Acknowledge at least every this many bytes received.
    ack_bytes: usize,
}

impl Reader {
    async fn run(self, mut stream: futures_util::stream::SplitStream<Link>) {
        let reason = self.read(&mut stream).await;
        let _ = self.events.send((self.generation, LinkEvent::Dead(reason)));
    }

    /// Reads until the link fails; returns why.
    async fn read(&self, stream: &mut futures_util::stream::SplitStream<Link>) -> String {
        let mut unacked = 0u64;
        let mut unacked_bytes = 0usize;
        loop {
            let frame = match stream.next().await {
                None => return "the peer closed the link".into(),
                Some(Err(error)) => return format!("read failed: {error}"),
                Some(Ok(frame)) => frame,
            };
            let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.last_rx.store(now, Ordering::Relaxed);
            if frame.ack > 0 && self.replay.lock().expect("replay lock").ack(frame.ack) {
                self.space.notify_one();
            }
            match &frame.body {
                Some(Body::Ping(ping)) => {
                    let pong = Body::Pong(Pong { nonce: ping.nonce });
                    let _ = self.writer_tx.send(Frame {
                        seq: 0,
                        ack: 0,
                        body: Some(pong),
                    });
                    continue;
                }
                Some(Body::Pong(pong)) => {
                    let _ = self
                        .events
                        .send((self.generation, LinkEvent::Pong(pong.nonce)));
                    continue;
                }
                Some(body) if body.is_link_local() => continue,
                _ => {}
            }
            let received = self.received.load(Ordering::Acquire);
            if frame.seq == 0 {
                if frame.body.is_none() {
                    // A link-local kind from a newer peer: not ours to understand.
                    continue;
                }
                return "the peer sent a session frame without a sequence number".into();
            }
            if frame.seq <= received {
                // Sent again after a reconnect, but it had arrived: drop the duplicate.
                continue;
            }
            if frame.seq != received + 1 {
                return format!(
                    "frame {} arrived after frame {received}: frames were lost",
                    frame.seq
                );
            }
            let seq = frame.seq;
            let size = frame.body.as_ref().map_or(0, body_size);
            if self.in_tx.send(frame).is_err() {
                return "the session ended".into();
            }
            self.received.store(seq, Ordering::Release);
            unacked += 1;
            unacked_bytes += size;
            // The peer frees its replay buffer on acks: every ACK_EVERY frames, and every
            // quarter of its buffer, so one-way traffic never waits for a ping to be acked.
            if unacked >= ACK_EVERY || unacked_bytes >= self.ack_bytes {
                unacked = 0;
                unacked_bytes = 0;
                let _ = self.writer_tx.send(Frame {
                    seq: 0,
                    ack: 0,
                    body: Some(Body::Ack(Ack {})),
                });
            }
        }
    }
}
