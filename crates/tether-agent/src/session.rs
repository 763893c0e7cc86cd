//! Accepting links and running one session per authenticated link.

use std::sync::Arc;

use futures_util::{SinkExt as _, StreamExt as _};
use tether_protocol::{
    Body, ErrorCode, ErrorInfo, Frame, HandshakeError, Pong, Response, Welcome, check_hello,
    hello_error, request, response,
};
use tokio::net::{TcpListener, TcpStream};

use crate::link::{self, FramedLink, LinkError};

/// Accepts links forever; each runs on its own task, so one bad client never stops the others.
pub async fn serve(listener: TcpListener, token: Arc<str>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Per-connection accept errors (ECONNABORTED, EMFILE) must not end the agent.
                tracing::warn!(%error, "accept failed");
                continue;
            }
        };
        let token = Arc::clone(&token);
        tokio::spawn(async move {
            match handle_link(stream, &token).await {
                Ok(()) => tracing::debug!(%peer, "link closed"),
                Err(error) => tracing::warn!(%peer, error = %error_chain(&error), "link ended"),
            }
        });
    }
}

async fn handle_link(stream: TcpStream, token: &str) -> Result<(), LinkError> {
    stream.set_nodelay(true)?;
    let mut link = link::exchange_preface(stream).await?;
    let first = link::next_frame(&mut link).await?;
    let checked = match &first.body {
        Some(Body::Hello(hello)) => check_hello(hello, token),
        Some(other) => Err(HandshakeError::NotHello(other.kind())),
        None => Err(HandshakeError::NotHello("unknown")),
    };
    if let Err(refusal) = checked {
        link.send(hello_error(&refusal)).await?;
        link.close().await?;
        return Err(LinkError::Refused(refusal.to_string()));
    }
    let session_id = new_session_id();
    tracing::info!(%session_id, "session started");
    let welcome = Welcome {
        session_id,
        agent: concat!("tether-agent/", env!("CARGO_PKG_VERSION")).to_owned(),
        resumed: false,
        received: 0,
        capabilities: Vec::new(),
    };
    link.send(Frame {
        seq: 0,
        ack: 0,
        body: Some(Body::Welcome(welcome)),
    })
    .await?;
    run_session(link).await
}

async fn run_session(mut link: FramedLink<TcpStream>) -> Result<(), LinkError> {
    let mut sent_seq = 0u64;
    let mut received_seq = 0u64;
    while let Some(frame) = link.next().await {
        let frame = frame?;
        if frame.seq != 0 {
            received_seq = frame.seq;
        }
        let reply = match frame.body {
            Some(Body::Ping(ping)) => Some(Body::Pong(Pong { nonce: ping.nonce })),
            Some(Body::Goodbye(_)) => break,
            Some(Body::Request(request)) => Some(Body::Response(Response {
                id: request.id,
                result: Some(response::Result::Error(unsupported_op(request.op.as_ref()))),
            })),
            Some(Body::Pong(_) | Body::Ack(_)) => None,
            Some(other) => Some(Body::Error(unsupported(other.kind(), frame.seq))),
            None => Some(Body::Error(unsupported("unknown", frame.seq))),
        };
        if let Some(body) = reply {
            let seq = if body.is_link_local() {
                0
            } else {
                sent_seq += 1;
                sent_seq
            };
            link.send(Frame {
                seq,
                ack: received_seq,
                body: Some(body),
            })
            .await?;
        }
    }
    Ok(())
}

fn unsupported(kind: &str, seq: u64) -> ErrorInfo {
    ErrorInfo {
        code: ErrorCode::Unsupported as i32,
        message: format!("this agent does not support {kind} frames"),
        in_reply_to_seq: seq,
        errno: 0,
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
    ErrorInfo {
        code: ErrorCode::Unsupported as i32,
        message: format!("this agent does not support {what} yet"),
        in_reply_to_seq: 0,
        errno: 0,
    }
}

fn new_session_id() -> String {
    let bytes: [u8; 8] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
