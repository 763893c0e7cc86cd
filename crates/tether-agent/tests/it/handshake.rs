//! Authentication, version checks, and clean answers to what the agent does not support.

use bytes::BufMut;
use futures_util::{SinkExt as _, StreamExt as _};
use tether_protocol::{Body, ErrorCode, Frame, Hello, Ping, Preface, Request, response};
use tether_session::link::{self, LinkError};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::{TOKEN, connect, start_agent};

fn hello(token: &str) -> Hello {
    Hello {
        token: token.into(),
        client: "test".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_right_token_opens_a_session() {
    let addr = start_agent().await;
    let (mut session, welcome) = link::client_handshake(connect(addr).await, hello(TOKEN))
        .await
        .unwrap();
    assert_eq!(welcome.session_id.len(), 16);
    assert!(welcome.agent.starts_with("tether-agent/"));
    session
        .send(Frame {
            seq: 0,
            ack: 0,
            body: Some(Body::Ping(Ping { nonce: 77 })),
        })
        .await
        .unwrap();
    // The agent pings a new link at once (keepalive), then answers ours.
    let mut kinds = Vec::new();
    loop {
        let frame = session.next().await.unwrap().unwrap();
        match frame.body {
            Some(Body::Pong(pong)) => {
                assert_eq!(pong.nonce, 77);
                break;
            }
            Some(other) => kinds.push(other.kind()),
            None => panic!("an unknown frame"),
        }
        assert!(kinds.len() < 3, "no pong, got {kinds:?}");
    }
    assert_eq!(kinds, ["ping"], "the agent's own keepalive ping");
}

#[tokio::test]
async fn a_wrong_or_missing_token_gets_an_error_frame_then_the_link_closes() {
    let addr = start_agent().await;
    for token in ["wrong", ""] {
        let mut link = link::exchange_preface(connect(addr).await).await.unwrap();
        link.send(Frame {
            seq: 0,
            ack: 0,
            body: Some(Body::Hello(hello(token))),
        })
        .await
        .unwrap();
        let reply = link.next().await.unwrap().unwrap();
        let Some(Body::Error(error)) = reply.body else {
            panic!("expected an error frame, got {reply:?}")
        };
        assert_eq!(error.code(), ErrorCode::Unauthorized);
        assert!(error.message.contains("token"), "{}", error.message);
        assert!(
            link.next().await.is_none(),
            "the agent must close the link after refusing"
        );
    }
    let refused = link::client_handshake(connect(addr).await, hello("wrong"))
        .await
        .unwrap_err();
    assert!(
        matches!(refused, LinkError::Refused(ref m) if m.contains("token is wrong")),
        "{refused}"
    );
}

#[tokio::test]
async fn a_first_frame_other_than_hello_is_refused() {
    let addr = start_agent().await;
    let mut link = link::exchange_preface(connect(addr).await).await.unwrap();
    link.send(Frame {
        seq: 1,
        ack: 0,
        body: Some(Body::Ping(Ping { nonce: 1 })),
    })
    .await
    .unwrap();
    let reply = link.next().await.unwrap().unwrap();
    let Some(Body::Error(error)) = reply.body else {
        panic!("{reply:?}")
    };
    assert_eq!(error.code(), ErrorCode::BadRequest);
    assert!(link.next().await.is_none());
}

#[tokio::test]
async fn another_major_version_is_refused_at_the_preface() {
    let addr = start_agent().await;
    let mut stream = connect(addr).await;
    stream
        .write_all(&Preface { major: 9, minor: 0 }.encode())
        .await
        .unwrap();
    let mut preface = [0u8; 8];
    stream.read_exact(&mut preface).await.unwrap();
    assert_eq!(Preface::decode(&preface).unwrap(), Some(Preface::CURRENT));
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "nothing follows a refused preface");
}

#[tokio::test]
async fn a_client_that_is_not_tether_is_dropped_and_the_agent_keeps_serving() {
    let addr = start_agent().await;
    let mut stream = connect(addr).await;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // The agent closes with our unread bytes in its buffer, so the kernel may answer with a reset
    // instead of a clean end of stream: either way, nothing but its preface may arrive.
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest).await {
        Ok(_) => {}
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    assert!(
        rest.len() <= 8 && b"TTHR\x00\x01\x00\x00".starts_with(&rest),
        "{rest:?}"
    );
    link::client_handshake(connect(addr).await, hello(TOKEN))
        .await
        .expect("still serving");
}

#[tokio::test]
async fn an_unknown_message_kind_gets_an_unsupported_reply_not_a_dropped_link() {
    let addr = start_agent().await;
    let (session, _) = link::client_handshake(connect(addr).await, hello(TOKEN))
        .await
        .unwrap();
    let mut stream = session.into_inner();
    // Frame { seq: 1, field 60 (a kind from the future) } written by hand.
    let payload = [0x08, 0x01, 0xe2, 0x03, 0x00];
    let mut raw = Vec::new();
    raw.put_u32(payload.len() as u32);
    raw.extend_from_slice(&payload);
    stream.write_all(&raw).await.unwrap();
    let mut session = tokio_util::codec::Framed::new(stream, tether_protocol::FrameCodec);
    let reply = session.next().await.unwrap().unwrap();
    assert_eq!(reply.ack, 1, "the unknown frame is still acknowledged");
    let Some(Body::Error(error)) = reply.body else {
        panic!("{reply:?}")
    };
    assert_eq!(error.code(), ErrorCode::Unsupported);
    assert_eq!(error.in_reply_to_seq, 1);

    // An operation from a newer client (unknown here, so decoded as no operation): a clean
    // response with the request's id.
    let request = Request { id: 5, op: None };
    session
        .send(Frame {
            seq: 2,
            ack: 0,
            body: Some(Body::Request(request)),
        })
        .await
        .unwrap();
    let reply = session.next().await.unwrap().unwrap();
    let Some(Body::Response(response)) = reply.body else {
        panic!("{reply:?}")
    };
    assert_eq!(response.id, 5);
    let Some(response::Result::Error(error)) = response.result else {
        panic!()
    };
    assert_eq!(error.code(), ErrorCode::Unsupported);

    // The link is still up.
    session
        .send(Frame {
            seq: 0,
            ack: 0,
            body: Some(Body::Ping(Ping { nonce: 3 })),
        })
        .await
        .unwrap();
    assert!(matches!(
        session.next().await.unwrap().unwrap().body,
        Some(Body::Pong(_))
    ));
}
