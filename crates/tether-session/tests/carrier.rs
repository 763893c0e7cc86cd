//! The carrier, deterministically: in-memory links (`tokio::io::duplex`), tokio's paused clock
//! (timers fire when every task waits, not after real time), no sockets and no sleeps.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use tether_protocol::{Body, FrameCodec, StreamData};
use tether_session::{
    carrier::{Attach, Carrier, Endpoints, Io, Link, LinkState},
    settings::Settings,
};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio_util::codec::Framed;

/// One end of an in-memory link that can go dead the way a real one does when a NAT drops it:
/// once cut, what is written vanishes and nothing more arrives.
struct Wire {
    inner: DuplexStream,
    /// What this end writes vanishes.
    write_cut: Arc<AtomicBool>,
    /// Nothing more arrives at this end.
    read_cut: Arc<AtomicBool>,
}

impl AsyncRead for Wire {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.read_cut.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Wire {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.write_cut.load(Ordering::SeqCst) {
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.write_cut.load(Ordering::SeqCst) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The switches that kill a link, one per direction.
#[derive(Default)]
struct Cuts {
    client_to_server: Arc<AtomicBool>,
    server_to_client: Arc<AtomicBool>,
}

impl Cuts {
    fn both(&self) {
        self.client_to_server.store(true, Ordering::SeqCst);
        self.server_to_client.store(true, Ordering::SeqCst);
    }
}

/// Two ends of a fresh link (client's, server's), and its switches.
fn link_pair() -> (Link, Link, Cuts) {
    let (a, b) = tokio::io::duplex(1 << 20);
    let cuts = Cuts::default();
    let end = |inner, write_cut: &Arc<AtomicBool>, read_cut: &Arc<AtomicBool>| {
        let wire = Wire {
            inner,
            write_cut: Arc::clone(write_cut),
            read_cut: Arc::clone(read_cut),
        };
        Framed::new(Box::new(wire) as Box<dyn Io>, FrameCodec)
    };
    let client = end(a, &cuts.client_to_server, &cuts.server_to_client);
    let server = end(b, &cuts.server_to_client, &cuts.client_to_server);
    (client, server, cuts)
}

fn settings() -> Settings {
    Settings {
        keepalive_interval: Duration::from_secs(1),
        keepalive_timeout: Duration::from_secs(3),
        grace: Some(Duration::from_secs(30)),
        buffer: 1 << 20,
    }
}

/// Two carriers of one session over one link: (client, server).
fn session() -> ((Carrier, Endpoints), (Carrier, Endpoints), Cuts) {
    let (a, b, cuts) = link_pair();
    let attach = |link| Attach {
        link,
        peer_received: 0,
        welcome: None,
    };
    (
        Carrier::spawn(settings(), attach(a)),
        Carrier::spawn(settings(), attach(b)),
        cuts,
    )
}

/// A numbered frame of the session: `n` in stream `stream`'s data.
fn data(stream: u64, n: u8) -> Body {
    Body::StreamData(StreamData {
        stream_id: stream,
        data: Bytes::from(vec![n; 16]),
    })
}

fn number(body: &Body) -> (u64, u8) {
    match body {
        Body::StreamData(d) => (d.stream_id, d.data[0]),
        other => panic!("unexpected {}", other.kind()),
    }
}

async fn send(ends: &Endpoints, stream: u64, numbers: std::ops::RangeInclusive<u8>) {
    for n in numbers {
        ends.out.send(data(stream, n)).await.unwrap();
    }
}

/// The next `count` session frames, as (stream, number).
async fn take(ends: &mut Endpoints, count: usize) -> Vec<(u64, u8)> {
    let mut got = Vec::new();
    while got.len() < count {
        let frame = ends.incoming.recv().await.expect("the session goes on");
        got.push(number(frame.body.as_ref().unwrap()));
    }
    got
}

async fn wait_for(carrier: &Carrier, wanted: fn(&LinkState) -> bool) -> LinkState {
    let mut status = carrier.status();
    status
        .wait_for(|s| wanted(&s.state))
        .await
        .expect("the carrier runs")
        .state
        .clone()
}

/// Re-links both carriers over a new link, each telling the other what it received (as the
/// hello's resume and the welcome do).
async fn relink(client: &Carrier, server: &Carrier, client_says: u64, server_says: u64) {
    let (a, b, _) = link_pair();
    client
        .control()
        .attach(Attach {
            link: a,
            peer_received: server_says,
            welcome: None,
        })
        .await
        .unwrap();
    server
        .control()
        .attach(Attach {
            link: b,
            peer_received: client_says,
            welcome: None,
        })
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn frames_lost_in_a_dead_link_arrive_once_and_in_order_after_the_resume_both_ways() {
    let ((client, mut client_ends), (server, mut server_ends), cuts) = session();
    send(&client_ends, 1, 1..=5).await;
    send(&server_ends, 2, 1..=5).await;
    assert_eq!(
        take(&mut server_ends, 5).await,
        (1..=5).map(|n| (1, n)).collect::<Vec<_>>()
    );
    assert_eq!(
        take(&mut client_ends, 5).await,
        (1..=5).map(|n| (2, n)).collect::<Vec<_>>()
    );

    // The link dies silently; both sides keep sending into it.
    cuts.both();
    send(&client_ends, 1, 6..=10).await;
    send(&server_ends, 2, 6..=10).await;

    // Keepalive: nothing arrives for the timeout, both sides declare the link down.
    for carrier in [&client, &server] {
        let state = wait_for(carrier, |s| matches!(s, LinkState::Down { .. })).await;
        let LinkState::Down { reason, .. } = state else {
            unreachable!()
        };
        assert!(reason.contains("nothing arrived"), "{reason}");
    }
    assert!(
        client_ends.incoming.try_recv().is_err(),
        "nothing got through the dead link"
    );

    let client_got = client.received_counter().load(Ordering::SeqCst);
    let server_got = server.received_counter().load(Ordering::SeqCst);
    assert_eq!((client_got, server_got), (5, 5));
    relink(&client, &server, client_got, server_got).await;

    assert_eq!(
        take(&mut server_ends, 5).await,
        (6..=10).map(|n| (1, n)).collect::<Vec<_>>()
    );
    assert_eq!(
        take(&mut client_ends, 5).await,
        (6..=10).map(|n| (2, n)).collect::<Vec<_>>()
    );
    // And the session goes on over the new link.
    send(&client_ends, 1, 11..=11).await;
    assert_eq!(take(&mut server_ends, 1).await, vec![(1, 11)]);
    assert_eq!(client.status().borrow().links, 2);
}

#[tokio::test(start_paused = true)]
async fn a_resume_that_replays_what_the_peer_already_has_delivers_nothing_twice() {
    let ((client, client_ends), (server, mut server_ends), cuts) = session();
    // Only the way back dies: the server gets every frame, its acknowledgements are lost.
    cuts.server_to_client.store(true, Ordering::SeqCst);
    send(&client_ends, 1, 1..=8).await;
    assert_eq!(take(&mut server_ends, 8).await.len(), 8);
    wait_for(&client, |s| matches!(s, LinkState::Down { .. })).await;
    assert_eq!(
        client.status().borrow().buffered_frames,
        8,
        "nothing was acknowledged"
    );

    // The server's resume claims less than it got (a hello written before the old link's last
    // frames were read): the client resends all 8, and the server must drop every one.
    relink(&client, &server, 0, 0).await;
    send(&client_ends, 1, 9..=9).await;
    assert_eq!(
        take(&mut server_ends, 1).await,
        vec![(1, 9)],
        "the first frame after the resume is the new one, not a replayed duplicate"
    );
    assert!(server_ends.incoming.try_recv().is_err());
    assert_eq!(server.received_counter().load(Ordering::SeqCst), 9);
}

#[tokio::test(start_paused = true)]
async fn without_a_new_link_the_session_ends_when_its_grace_runs_out() {
    let ((client, mut client_ends), (_server, _server_ends), cuts) = session();
    cuts.both();
    wait_for(&client, |s| matches!(s, LinkState::Down { .. })).await;
    let down_at = tokio::time::Instant::now();
    let state = wait_for(&client, |s| matches!(s, LinkState::Ended { .. })).await;
    let LinkState::Ended { reason } = state else {
        unreachable!()
    };
    assert!(reason.contains("reconnect.grace"), "{reason}");
    let waited = down_at.elapsed();
    assert!(
        waited >= Duration::from_secs(27) && waited <= Duration::from_secs(31),
        "the grace counts from the drop: {waited:?}"
    );
    assert!(
        client_ends.incoming.recv().await.is_none(),
        "the session's queue closes"
    );
}
