//! The carrier between two sessions over real loopback links that the testkit's `LinkCutter`
//! resets again and again while frames flow both ways: every frame arrives once and in order.
//! Needs no root.

use std::time::Duration;

use bytes::Bytes;
use rand::{Rng as _, SeedableRng as _};
use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};
use tether_session::{
    carrier::{Attach, Carrier, Control, Endpoints, Io, LinkState},
    link,
    settings::Settings,
};

use tether_protocol::{Body, Frame, Hello, Resume, StreamData, StreamEnd, Welcome};
use tether_testkit::cutter::LinkCutter;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};

const CHUNK: usize = 1024;

fn settings() -> Settings {
    Settings {
        keepalive_interval: Duration::from_millis(200),
        keepalive_timeout: Duration::from_secs(2),
        grace: Some(Duration::from_secs(30)),
        buffer: 4 << 20,
    }
}

/// With a replay buffer of `buffer` bytes.
fn settings_with(buffer: usize) -> Settings {
    Settings {
        buffer,
        ..settings()
    }
}

/// The agent's side: the first hello opens the session, later ones resume it.
fn serve(listener: TcpListener) -> (oneshot::Receiver<(Carrier, Endpoints)>, JoinHandle<()>) {
    serve_with(listener, settings())
}

fn serve_with(
    listener: TcpListener,
    settings: Settings,
) -> (oneshot::Receiver<(Carrier, Endpoints)>, JoinHandle<()>) {
    let (opened, session) = oneshot::channel();
    let task = tokio::spawn(async move {
        let mut opened = Some(opened);
        let mut control: Option<Control> = None;
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let Ok(mut link) = link::exchange_preface(Box::new(stream) as Box<dyn Io>).await else {
                continue;
            };
            let Ok(Frame {
                body: Some(Body::Hello(hello)),
                ..
            }) = link::next_frame(&mut link).await
            else {
                continue;
            };
            let welcome = Welcome {
                session_id: "s1".into(),
                resumed: hello.resume.is_some(),
                ..Default::default()
            };
            match (hello.resume, &control) {
                (None, None) => {
                    let (carrier, endpoints) = Carrier::spawn(
                        settings,
                        Attach {
                            link,
                            peer_received: 0,
                            welcome: Some(welcome),
                        },
                    );
                    control = Some(carrier.control());
                    let _ = opened.take().unwrap().send((carrier, endpoints));
                }
                (Some(resume), Some(control)) => {
                    let _ = control
                        .attach(Attach {
                            link,
                            peer_received: resume.received,
                            welcome: Some(welcome),
                        })
                        .await;
                }
                _ => {}
            }
        }
    });
    (session, task)
}

async fn handshake(
    addr: std::net::SocketAddr,
    resume: Option<Resume>,
) -> Option<(link::FramedLink<Box<dyn Io>>, Welcome)> {
    let stream = TcpStream::connect(addr).await.ok()?;
    let hello = Hello {
        token: "t".into(),
        resume,
        link: Some(settings().to_options()),
        ..Default::default()
    };
    link::client_handshake(Box::new(stream) as Box<dyn Io>, hello)
        .await
        .ok()
}

/// The client's side of a new session.
async fn open(addr: std::net::SocketAddr, settings: Settings) -> (Carrier, Endpoints) {
    let (link, _welcome) = handshake(addr, None).await.unwrap();
    Carrier::spawn(
        settings,
        Attach {
            link,
            peer_received: 0,
            welcome: None,
        },
    )
}

/// The client's side: reconnects (a few ms apart) whenever the link is down.
fn reconnect(addr: std::net::SocketAddr, carrier: &Carrier) -> JoinHandle<()> {
    let control = carrier.control();
    let mut status = carrier.status();
    let received = carrier.received_counter();
    tokio::spawn(async move {
        loop {
            let down = status
                .wait_for(|s| !matches!(s.state, LinkState::Up))
                .await
                .map(|s| matches!(s.state, LinkState::Down { .. }));
            if !matches!(down, Ok(true)) {
                return;
            }
            let links = status.borrow().links;
            let resume = Resume {
                session_id: "s1".into(),
                received: received.load(std::sync::atomic::Ordering::Acquire),
            };
            let Some((link, welcome)) = handshake(addr, Some(resume)).await else {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            };
            let attach = Attach {
                link,
                peer_received: welcome.received,
                welcome: None,
            };
            if control.attach(attach).await.is_err() {
                return;
            }
            let _ = status
                .wait_for(|s| s.links > links || matches!(s.state, LinkState::Ended { .. }))
                .await;
        }
    })
}

/// Sends numbered chunks of `size` bytes on `stream_id`: at least `count`, and more until
/// `until` is set (if given); then a `StreamEnd`. Returns how many it sent.
fn send(
    out: tokio::sync::mpsc::Sender<Body>,
    stream_id: u64,
    count: u64,
    size: usize,
    until: Option<Arc<AtomicBool>>,
) -> JoinHandle<u64> {
    tokio::spawn(async move {
        let mut n = 0;
        while n < count || until.as_ref().is_some_and(|u| !u.load(Ordering::Relaxed)) {
            let mut data = vec![0u8; size];
            data[..8].copy_from_slice(&n.to_be_bytes());
            let body = Body::StreamData(StreamData {
                stream_id,
                data: Bytes::from(data),
            });
            out.send(body).await.unwrap();
            n += 1;
        }
        let end = Body::StreamEnd(StreamEnd {
            stream_id,
            trailers: Vec::new(),
        });
        out.send(end).await.unwrap();
        n
    })
}

/// Receives chunks on `stream_id` until its `StreamEnd` and checks their numbers: each once, in
/// order. Returns how many arrived.
fn receive(
    mut incoming: tokio::sync::mpsc::UnboundedReceiver<Frame>,
    stream_id: u64,
) -> JoinHandle<Result<u64, String>> {
    tokio::spawn(async move {
        let mut next = 0u64;
        let mut last_seq = 0;
        loop {
            let frame = incoming
                .recv()
                .await
                .ok_or_else(|| format!("the session ended after {next} chunks"))?;
            if frame.seq != last_seq + 1 {
                return Err(format!("frame {} after frame {last_seq}", frame.seq));
            }
            last_seq = frame.seq;
            match frame.body {
                Some(Body::StreamData(data)) => {
                    assert_eq!(data.stream_id, stream_id);
                    let n = u64::from_be_bytes(data.data[..8].try_into().unwrap());
                    if n != next {
                        return Err(format!("chunk {n} where {next} was due"));
                    }
                    next += 1;
                }
                Some(Body::StreamEnd(_)) => return Ok(next),
                _ => {}
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_frame_arrives_once_and_in_order_across_50_cuts() {
    const COUNT: u64 = 10_000;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cutter = LinkCutter::start(listener.local_addr().unwrap()).await;
    let (opened, server) = serve(listener);
    let (client, client_ends) = open(cutter.addr(), settings()).await;
    let (agent, agent_ends) = opened.await.unwrap();
    let reconnector = reconnect(cutter.addr(), &client);

    // Both sides send until the cuts are done.
    let cutting = Arc::new(AtomicBool::new(false));
    let senders = [
        send(
            client_ends.out.clone(),
            1,
            COUNT,
            CHUNK,
            Some(Arc::clone(&cutting)),
        ),
        send(
            agent_ends.out.clone(),
            2,
            COUNT,
            CHUNK,
            Some(Arc::clone(&cutting)),
        ),
    ];
    let at_agent = receive(agent_ends.incoming, 1);
    let at_client = receive(client_ends.incoming, 2);

    let mut rng = rand::rngs::StdRng::seed_from_u64(50);
    let mut cuts = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while cuts < 50 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{cuts} cuts in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(rng.random_range(1..20))).await;
        if cutter.cut() > 0 {
            cuts += 1;
        }
    }
    cutting.store(true, Ordering::Relaxed);
    let results = tokio::time::timeout(Duration::from_secs(60), async {
        (at_agent.await.unwrap(), at_client.await.unwrap())
    })
    .await
    .expect("both sides received everything within 60 s");
    let [to_agent, to_client] = senders;
    let sent = (to_agent.await.unwrap(), to_client.await.unwrap());
    assert_eq!(results, (Ok(sent.0), Ok(sent.1)), "after {cuts} cuts");
    assert!(sent.0 >= COUNT && sent.1 >= COUNT);
    assert!(client.status().borrow().links > 1);
    drop((reconnector, server, agent, client));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_resume_is_refused_without_touching_the_live_link() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (opened, _server) = serve(listener);
    let (client, client_ends) = open(addr, settings()).await;
    let (agent, agent_ends) = opened.await.unwrap();
    // Frames the client receives; a frame back from the client then carries its acknowledgement
    // (an ack is read before the frame it rides on is delivered), so the agent dropped them.
    let mut incoming = agent_ends.incoming;
    send(agent_ends.out.clone(), 2, 100, CHUNK, None)
        .await
        .unwrap();
    let at_client = receive(client_ends.incoming, 2);
    assert_eq!(at_client.await.unwrap(), Ok(100));
    let out = client_ends.out.clone();
    out.send(Body::StreamData(StreamData {
        stream_id: 1,
        data: Bytes::from_static(b"ack carrier"),
    }))
    .await
    .unwrap();
    incoming.recv().await.unwrap();
    // A resume that claims nothing was received: the agent can no longer serve it.
    let refused = handshake(
        addr,
        Some(Resume {
            session_id: "s1".into(),
            received: 0,
        }),
    )
    .await;
    assert!(
        refused.is_none(),
        "a resume that cannot be served is refused"
    );
    // The live link still carries the session.
    out.send(Body::StreamData(StreamData {
        stream_id: 1,
        data: Bytes::from_static(b"still here"),
    }))
    .await
    .unwrap();
    let frame = tokio::time::timeout(Duration::from_secs(5), incoming.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(frame.body, Some(Body::StreamData(_))));
    assert_eq!(client.status().borrow().links, 1, "no reconnect happened");
    assert_eq!(agent.status().borrow().state, LinkState::Up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_traffic_through_a_small_replay_buffer_never_waits_for_a_ping() {
    // 64 KiB of replay buffer, 16 KiB frames: fewer than 32 frames fit, so only acknowledgements
    // by bytes keep it flowing (pings come every 200 ms and would make this take minutes).
    let small = settings_with(64 << 10);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (opened, _server) = serve_with(listener, small);
    let (_client, client_ends) = open(addr, small).await;
    let (_agent, agent_ends) = opened.await.unwrap();
    let sender = send(agent_ends.out.clone(), 2, 2_000, 16 << 10, None);
    let received = tokio::time::timeout(Duration::from_secs(30), receive(client_ends.incoming, 2))
        .await
        .expect("32 MiB through a 64 KiB replay buffer within 30 s")
        .unwrap();
    assert_eq!(received, Ok(sender.await.unwrap()));
}
