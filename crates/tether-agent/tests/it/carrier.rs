//! The carrier between two sessions over real loopback links that the testkit's `LinkCutter`
//! resets again and again while frames flow both ways: every frame arrives once and in order.
//! Needs no root.

use std::time::Duration;

use bytes::Bytes;
use rand::{Rng as _, SeedableRng as _};
use tether_agent::{
    carrier::{Attach, Carrier, Control, Endpoints, Io, LinkState, Settings},
    link,
};
use tether_protocol::{Body, Frame, Hello, Resume, StreamData, Welcome};
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

/// The agent's side: the first hello opens the session, later ones resume it.
fn serve(listener: TcpListener) -> (oneshot::Receiver<(Carrier, Endpoints)>, JoinHandle<()>) {
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
                        settings(),
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

/// Sends `count` numbered chunks on `stream_id`.
fn send(out: tokio::sync::mpsc::Sender<Body>, stream_id: u64, count: u64) -> JoinHandle<()> {
    tokio::spawn(async move {
        for n in 0..count {
            let mut data = vec![0u8; CHUNK];
            data[..8].copy_from_slice(&n.to_be_bytes());
            let body = Body::StreamData(StreamData {
                stream_id,
                data: Bytes::from(data),
            });
            out.send(body).await.unwrap();
        }
    })
}

/// Receives `count` chunks on `stream_id` and checks their numbers: each once, in order.
fn receive(
    mut incoming: tokio::sync::mpsc::UnboundedReceiver<Frame>,
    stream_id: u64,
    count: u64,
) -> JoinHandle<Result<(), String>> {
    tokio::spawn(async move {
        let mut next = 0u64;
        let mut last_seq = 0;
        while next < count {
            let frame = incoming
                .recv()
                .await
                .ok_or_else(|| format!("the session ended after {next} of {count} chunks"))?;
            if frame.seq != last_seq + 1 {
                return Err(format!("frame {} after frame {last_seq}", frame.seq));
            }
            last_seq = frame.seq;
            if let Some(Body::StreamData(data)) = frame.body {
                assert_eq!(data.stream_id, stream_id);
                let n = u64::from_be_bytes(data.data[..8].try_into().unwrap());
                if n != next {
                    return Err(format!("chunk {n} where {next} was due"));
                }
                next += 1;
            }
        }
        Ok(())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_frame_arrives_once_and_in_order_across_50_cuts() {
    const COUNT: u64 = 100_000;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cutter = LinkCutter::start(listener.local_addr().unwrap()).await;
    let (opened, server) = serve(listener);
    let (link, _welcome) = handshake(cutter.addr(), None).await.unwrap();
    let (client, client_ends) = Carrier::spawn(
        settings(),
        Attach {
            link,
            peer_received: 0,
            welcome: None,
        },
    );
    let (agent, agent_ends) = opened.await.unwrap();
    let reconnector = reconnect(cutter.addr(), &client);

    let senders = [
        send(client_ends.out.clone(), 1, COUNT),
        send(agent_ends.out.clone(), 2, COUNT),
    ];
    let at_agent = receive(agent_ends.incoming, 1, COUNT);
    let at_client = receive(client_ends.incoming, 2, COUNT);

    let mut rng = rand::rngs::StdRng::seed_from_u64(50);
    let mut cuts = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while cuts < 50 && !(at_agent.is_finished() && at_client.is_finished()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{cuts} cuts in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(rng.random_range(1..20))).await;
        if cutter.cut() > 0 {
            cuts += 1;
        }
    }
    let results = tokio::time::timeout(Duration::from_secs(60), async {
        (at_agent.await.unwrap(), at_client.await.unwrap())
    })
    .await
    .expect("both sides received everything within 60 s");
    assert_eq!(results, (Ok(()), Ok(())), "after {cuts} cuts");
    assert_eq!(cuts, 50, "every cut landed while frames flowed");
    for sender in senders {
        sender.await.unwrap();
    }
    assert!(client.status().borrow().links > 1);
    drop((reconnector, server, agent, client));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_resume_is_refused_without_touching_the_live_link() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (opened, _server) = serve(listener);
    let (link, _welcome) = handshake(addr, None).await.unwrap();
    let (client, client_ends) = Carrier::spawn(
        settings(),
        Attach {
            link,
            peer_received: 0,
            welcome: None,
        },
    );
    let (agent, agent_ends) = opened.await.unwrap();
    // Frames the client acknowledges, so the agent drops them from its replay buffer.
    send(agent_ends.out.clone(), 2, 100).await.unwrap();
    let at_client = receive(client_ends.incoming, 2, 100);
    at_client.await.unwrap().unwrap();
    let mut agent_status = agent.status();
    agent_status
        .wait_for(|s| s.buffered_frames == 0)
        .await
        .unwrap();
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
    let out = client_ends.out.clone();
    let mut incoming = agent_ends.incoming;
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
