//! A session's streams, as both ends hold them: the table that routes the peer's stream frames
//! to the task serving each stream, and the one pump between a stream and a byte socket.
//!
//! Streams (incoming connections, HTTP exchanges, outgoing connections) share one id space; a
//! [`Stream`] is registered in its session's [`Streams`] for as long as it lives (dropping it
//! removes it), so a frame for a stream that is gone finds nothing and is dropped.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use tether_protocol::{
    Body, Header, HttpResponseHead, MAX_DATA_CHUNK, StreamData, StreamEnd, StreamReset,
    WindowUpdate,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    sync::{Notify, mpsc},
};

use crate::flow::{RecvCredit, SendWindow, Tuning};

/// What the peer sends into one stream.
#[derive(Debug)]
pub enum StreamInput {
    Data(Bytes),
    /// The end of the peer's direction, with HTTP trailers if any.
    End(Vec<Header>),
    Reset(String),
    /// The answer's head, for an HTTP request this side sent on the stream.
    ResponseHead(HttpResponseHead),
}

/// One stream of the session. Its parts may go separate ways (an HTTP request's body to one
/// task, the credit for its answer to another); the stream stays in its session's table until
/// its `registration` is dropped.
#[derive(Debug)]
pub struct Stream {
    pub id: u64,
    /// What the peer sends into it.
    pub input: Input,
    /// Credit for what this side sends on it.
    pub window: Arc<SendWindow>,
    pub registration: Registration,
}

/// What the peer sends into one stream, in order, and the credit this side grants back.
#[derive(Debug)]
pub struct Input {
    rx: mpsc::UnboundedReceiver<StreamInput>,
    /// Bytes routed here and not yet taken.
    queued: Arc<AtomicUsize>,
    credit: RecvCredit,
}

impl Input {
    /// Records `bytes` of the peer's data written out; the `WindowUpdate` increment when one is
    /// due (the window grows on a long link, see [`crate::flow`]).
    pub fn consumed(&mut self, bytes: usize) -> Option<u32> {
        self.credit
            .consumed(bytes, tokio::time::Instant::now().into_std())
    }

    /// The next item; `None` once the stream is closed (or its session gone).
    pub async fn recv(&mut self) -> Option<StreamInput> {
        let item = self.rx.recv().await;
        if let Some(StreamInput::Data(data)) = &item {
            self.queued.fetch_sub(data.len(), Ordering::Relaxed);
        }
        item
    }
}

/// Keeps a stream in its session's table; dropping it removes the stream, whose input then ends.
#[derive(Debug)]
pub struct Registration {
    id: u64,
    table: Arc<Streams>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.table.close(self.id);
    }
}

#[derive(Debug)]
struct Entry {
    input: mpsc::UnboundedSender<StreamInput>,
    window: Arc<SendWindow>,
    queued: Arc<AtomicUsize>,
    /// For data the peer sends without credit (a mirrored copy): the most it may queue.
    limit: Option<usize>,
}

/// The session's open streams: where the peer's frames for each go, and the credit for what this
/// side sends on each.
#[derive(Debug, Default)]
pub struct Streams {
    entries: Mutex<HashMap<u64, Entry>>,
    /// How the windows this side grants grow; `None`: they never do.
    tuning: Option<Arc<Tuning>>,
}

/// What [`Streams::route`] did with a frame.
#[derive(Debug)]
pub enum Routed {
    /// Given to its stream (or dropped: no such stream any more).
    Taken,
    /// The stream's queue passed its limit: the stream was closed, and its task sees its input end.
    Overflow { id: u64, queued: usize },
    /// Not a stream frame.
    Other(Body),
}

impl Streams {
    /// A table whose streams grant windows that grow with the link (see [`crate::flow`]).
    pub fn tuned(tuning: Arc<Tuning>) -> Streams {
        Streams {
            entries: Mutex::default(),
            tuning: Some(tuning),
        }
    }

    /// Registers stream `id`, whose peer sends within this side's credit.
    pub fn open(self: &Arc<Self>, id: u64) -> Stream {
        self.register(id, None)
    }

    /// Registers stream `id`, whose peer sends without credit (a mirrored copy, which must never
    /// wait for this side): more than `limit` bytes queued closes it.
    pub fn open_bounded(self: &Arc<Self>, id: u64, limit: usize) -> Stream {
        self.register(id, Some(limit))
    }

    fn register(self: &Arc<Self>, id: u64, limit: Option<usize>) -> Stream {
        let (tx, input) = mpsc::unbounded_channel();
        let window = Arc::new(SendWindow::default());
        let queued = Arc::new(AtomicUsize::new(0));
        let entry = Entry {
            input: tx,
            window: Arc::clone(&window),
            queued: Arc::clone(&queued),
            limit,
        };
        self.entries.lock().expect("streams lock").insert(id, entry);
        // A bounded stream's peer sends without credit (a mirrored copy): growing its window
        // would only spend the session's budget.
        let credit = match (&self.tuning, limit) {
            (Some(tuning), None) => RecvCredit::tuned(Arc::clone(tuning)),
            _ => RecvCredit::default(),
        };
        Stream {
            id,
            input: Input {
                rx: input,
                queued,
                credit,
            },
            window,
            registration: Registration {
                id,
                table: Arc::clone(self),
            },
        }
    }

    /// Forgets stream `id`: its task sees its input end.
    pub fn close(&self, id: u64) {
        self.entries.lock().expect("streams lock").remove(&id);
    }

    /// Forgets every stream (the session is over).
    pub fn clear(&self) {
        self.entries.lock().expect("streams lock").clear();
    }

    /// How many streams are open.
    pub fn len(&self) -> usize {
        self.entries.lock().expect("streams lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Gives one frame of the peer to its stream: data, ends, resets, datagrams, response
    /// heads, and credit ([`WindowUpdate`]). Anything else comes back as [`Routed::Other`].
    pub fn route(&self, body: Body) -> Routed {
        let (id, input) = match body {
            Body::WindowUpdate(update) => {
                let entries = self.entries.lock().expect("streams lock");
                if let Some(entry) = entries.get(&update.stream_id) {
                    entry.window.grant(u64::from(update.increment));
                }
                return Routed::Taken;
            }
            Body::StreamData(data) => (data.stream_id, StreamInput::Data(data.data)),
            Body::Datagram(datagram) => (datagram.stream_id, StreamInput::Data(datagram.data)),
            Body::StreamEnd(end) => (end.stream_id, StreamInput::End(end.trailers)),
            Body::StreamReset(reset) => (reset.stream_id, StreamInput::Reset(reset.reason)),
            Body::HttpResponseHead(head) => (head.stream_id, StreamInput::ResponseHead(head)),
            other => return Routed::Other(other),
        };
        let mut entries = self.entries.lock().expect("streams lock");
        let Some(entry) = entries.get(&id) else {
            return Routed::Taken;
        };
        if let StreamInput::Data(data) = &input {
            let queued = entry.queued.fetch_add(data.len(), Ordering::Relaxed) + data.len();
            if entry.limit.is_some_and(|limit| queued > limit) {
                entries.remove(&id);
                return Routed::Overflow { id, queued };
            }
        }
        let _ = entry.input.send(input);
        Routed::Taken
    }
}

/// What the pump does with the socket's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relay {
    /// Sends them to the peer, within the stream's window.
    Windowed,
    /// Reads and drops them (a mirrored copy's local answer: the target's app answers the real
    /// client).
    Discard,
}

/// How a pumped stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The peer ended its direction cleanly and the socket's side is done.
    Clean,
    /// The peer reset the stream, the socket failed, or the session went away: whoever holds
    /// the socket should abort it (a reset, not a clean close).
    Aborted,
}

/// Pumps one stream to and from a byte socket (a TCP connection, an upgraded HTTP connection):
/// the peer's bytes into `writer` (granting credit back as they are written), `reader`'s bytes to
/// the peer within the stream's window. A reset, a failed write or a session that goes away
/// stops both directions at once: the socket would otherwise wait for its other end to speak.
pub async fn pump<R, W>(
    reader: &mut R,
    writer: &mut W,
    id: u64,
    input: &mut Input,
    window: &SendWindow,
    out: &mpsc::Sender<Body>,
    relay: Relay,
) -> Ended
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Each fires once: `aborted` when the peer's side is over abnormally (so the socket's
    // read stops), `copied` when the socket's side is done, `broke` when it ended abnormally
    // (a read error or a session gone: the peer was reset, it sends nothing more).
    let aborted = Notify::new();
    let copied = Notify::new();
    let broke = Notify::new();
    let into_socket = async {
        loop {
            let item = tokio::select! {
                item = input.recv() => item,
                () = broke.notified() => break,
            };
            let Some(item) = item else { break };
            match item {
                StreamInput::Data(data) => {
                    if writer.write_all(&data).await.is_err() {
                        // The socket's side is closed: the peer hears so, and nothing more is
                        // read from the socket for it.
                        let reset = StreamReset {
                            stream_id: id,
                            reason: "the connection was closed on this side".into(),
                            errno: 0,
                        };
                        let _ = out.send(Body::StreamReset(reset)).await;
                        break;
                    }
                    if let Some(increment) = input.consumed(data.len()) {
                        let update = WindowUpdate {
                            stream_id: id,
                            increment,
                        };
                        let _ = out.send(Body::WindowUpdate(update)).await;
                    }
                }
                StreamInput::End(_) => {
                    let _ = writer.shutdown().await;
                    // Half-closed: the socket may still answer, unless the stream is reset or
                    // its session ends meanwhile.
                    let reset = async {
                        while let Some(item) = input.recv().await {
                            if matches!(item, StreamInput::Reset(_)) {
                                return;
                            }
                        }
                    };
                    tokio::select! {
                        biased;
                        () = broke.notified() => {}
                        () = reset => {}
                        () = copied.notified() => return Ended::Clean,
                    }
                    break;
                }
                StreamInput::Reset(_) => break,
                StreamInput::ResponseHead(_) => {}
            }
        }
        aborted.notify_one();
        Ended::Aborted
    };
    let from_socket = async {
        // True when it ended normally (end of the socket's bytes).
        let copy = async {
            let mut buf = vec![0u8; MAX_DATA_CHUNK];
            loop {
                let allowed = match relay {
                    Relay::Windowed => window.reserve(buf.len()).await,
                    Relay::Discard => buf.len(),
                };
                let read = reader.read(&mut buf[..allowed]).await;
                if let (Relay::Windowed, Ok(n)) = (relay, &read) {
                    window.grant((allowed - n) as u64);
                }
                let body = match read {
                    Ok(0) if relay == Relay::Windowed => Body::StreamEnd(StreamEnd {
                        stream_id: id,
                        trailers: Vec::new(),
                    }),
                    Ok(0) => return true,
                    Ok(_) if relay == Relay::Discard => continue,
                    Ok(n) => Body::StreamData(StreamData {
                        stream_id: id,
                        data: Bytes::copy_from_slice(&buf[..n]),
                    }),
                    // A mirrored copy's local answer failing is the local side's business.
                    Err(_) if relay == Relay::Discard => return true,
                    Err(e) => Body::StreamReset(StreamReset {
                        stream_id: id,
                        reason: e.to_string(),
                        errno: e.raw_os_error().unwrap_or(0),
                    }),
                };
                let normal = !matches!(body, Body::StreamReset(_));
                let last = !matches!(body, Body::StreamData(_));
                if out.send(body).await.is_err() {
                    return false;
                }
                if last {
                    return normal;
                }
            }
        };
        tokio::select! {
            normal = copy => {
                if !normal {
                    broke.notify_one();
                }
            }
            () = aborted.notified() => {}
        }
        copied.notify_one();
    };
    let (ended, ()) = tokio::join!(into_socket, from_socket);
    ended
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(id: u64, bytes: &'static [u8]) -> Body {
        Body::StreamData(StreamData {
            stream_id: id,
            data: Bytes::from_static(bytes),
        })
    }

    #[tokio::test]
    async fn frames_reach_their_stream_until_it_is_dropped() {
        let streams = Arc::new(Streams::default());
        let mut one = streams.open(1);
        let two = streams.open(3);
        assert!(matches!(streams.route(data(1, b"a")), Routed::Taken));
        assert!(matches!(streams.route(data(5, b"nobody")), Routed::Taken));
        assert!(matches!(
            one.input.recv().await,
            Some(StreamInput::Data(d)) if d == "a"
        ));
        drop(two);
        assert_eq!(streams.len(), 1, "a dropped stream leaves the table");
        let ping = Body::Ping(tether_protocol::Ping { nonce: 1 });
        assert!(matches!(streams.route(ping), Routed::Other(Body::Ping(_))));
    }

    #[tokio::test]
    async fn a_bounded_stream_that_queues_too_much_is_closed() {
        let streams = Arc::new(Streams::default());
        let mut copy = streams.open_bounded(2, 3);
        assert!(matches!(streams.route(data(2, b"ab")), Routed::Taken));
        assert!(matches!(
            streams.route(data(2, b"cd")),
            Routed::Overflow { id: 2, queued: 4 }
        ));
        assert!(matches!(
            copy.input.recv().await,
            Some(StreamInput::Data(_))
        ));
        assert!(copy.input.recv().await.is_none(), "its input ends");
    }

    #[tokio::test]
    async fn credit_from_the_peer_reaches_the_stream_s_window() {
        let streams = Arc::new(Streams::default());
        let stream = streams.open(7);
        let initial = u64::from(tether_protocol::INITIAL_STREAM_WINDOW);
        let taken = stream.window.reserve(usize::MAX).await;
        assert_eq!(taken as u64, initial);
        let update = Body::WindowUpdate(WindowUpdate {
            stream_id: 7,
            increment: 100,
        });
        assert!(matches!(streams.route(update), Routed::Taken));
        assert_eq!(stream.window.reserve(usize::MAX).await, 100);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_from_the_peer_stops_the_pump_without_waiting_for_the_socket() {
        let streams = Arc::new(Streams::default());
        let mut stream = streams.open(9);
        let (out, mut sent) = mpsc::channel(16);
        // A socket whose other end never speaks nor closes.
        let (socket, _silent) = tokio::io::duplex(1024);
        let (mut reader, mut writer) = tokio::io::split(socket);
        let reset = Body::StreamReset(StreamReset {
            stream_id: 9,
            reason: "gone".into(),
            errno: 0,
        });
        assert!(matches!(streams.route(reset), Routed::Taken));
        let ended = pump(
            &mut reader,
            &mut writer,
            9,
            &mut stream.input,
            &stream.window,
            &out,
            Relay::Windowed,
        )
        .await;
        assert_eq!(ended, Ended::Aborted);
        assert!(
            sent.try_recv().is_err(),
            "nothing is sent for a reset stream"
        );
    }

    /// A socket that fails its reads (a reset connection) and accepts every write.
    struct Broken;

    impl AsyncRead for Broken {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_socket_that_breaks_resets_the_stream_and_ends_the_pump() {
        let streams = Arc::new(Streams::default());
        let mut stream = streams.open(13);
        let (out, mut sent) = mpsc::channel(16);
        // The peer stays silent: its input never ends on its own.
        let (mut writer, _other) = tokio::io::duplex(1024);
        let ended = tokio::time::timeout(
            std::time::Duration::from_secs(3600),
            pump(
                &mut Broken,
                &mut writer,
                13,
                &mut stream.input,
                &stream.window,
                &out,
                Relay::Windowed,
            ),
        )
        .await;
        assert_eq!(ended, Ok(Ended::Aborted), "the pump ends by itself");
        assert!(matches!(
            sent.recv().await,
            Some(Body::StreamReset(StreamReset { stream_id: 13, .. }))
        ));
    }

    #[tokio::test]
    async fn both_directions_flow_and_a_clean_end_is_clean() {
        let streams = Arc::new(Streams::default());
        let mut stream = streams.open(11);
        let (out, mut sent) = mpsc::channel(16);
        let (socket, mut app) = tokio::io::duplex(1024);
        let (mut reader, mut writer) = tokio::io::split(socket);
        let app_side = async {
            let mut got = [0u8; 5];
            app.read_exact(&mut got).await.unwrap();
            app.write_all(b"world").await.unwrap();
            app.shutdown().await.unwrap();
            let mut rest = Vec::new();
            app.read_to_end(&mut rest).await.unwrap();
            (got, rest)
        };
        assert!(matches!(streams.route(data(11, b"hello")), Routed::Taken));
        let end = Body::StreamEnd(StreamEnd {
            stream_id: 11,
            trailers: Vec::new(),
        });
        assert!(matches!(streams.route(end), Routed::Taken));
        let (ended, (got, rest)) = tokio::join!(
            pump(
                &mut reader,
                &mut writer,
                11,
                &mut stream.input,
                &stream.window,
                &out,
                Relay::Windowed
            ),
            app_side
        );
        assert_eq!(ended, Ended::Clean);
        assert_eq!((&got, rest.len()), (b"hello", 0));
        assert!(matches!(sent.recv().await, Some(Body::StreamData(d)) if d.data == "world"));
        assert!(matches!(sent.recv().await, Some(Body::StreamEnd(_))));
    }
}
