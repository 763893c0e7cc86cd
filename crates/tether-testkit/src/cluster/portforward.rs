//! `pods/NAME/portforward` over WebSocket, as the kubelet speaks it (field-notes.md §1):
//!
//! - subprotocols `v4.channel.k8s.io` (binary) or none; a client offering only others gets 400
//!   (`v4.base64.channel.k8s.io`, text, is the one real protocol the simulator lacks);
//! - every message is `[channel][payload]`; the i-th port has data channel `2i` and error
//!   channel `2i+1`; the first message on each is the port as u16 little-endian;
//! - one TCP connection per port per WebSocket, dialled to `localhost:PORT` inside the pod's
//!   network namespace; a failed dial is reported on the error channel as the kubelet words it;
//! - no half-close: when the pod side ends, the WebSocket closes.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::mpsc,
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, handshake::derive_accept_key, protocol::Role},
};

use super::{
    State,
    rest::{Body, Query, status},
};

const BINARY: &str = "v4.channel.k8s.io";

pub(crate) fn handle(
    req: Request<Incoming>,
    query: &Query,
    state: &Arc<State>,
    namespace: &str,
    name: &str,
) -> Response<Body> {
    if state.faults.lock().unwrap().refuse_port_forwards {
        return status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "error dialing backend: dial tcp 10.213.255.1:10250: connect: connection refused"
                .into(),
        );
    }
    let Some(pod) = state.pod(namespace, name) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("pods \"{name}\" not found"),
        );
    };
    if pod["status"]["phase"] != "Running" {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!(
                "unable to upgrade connection: pod {name} is not running (phase {})",
                pod["status"]["phase"]
            ),
        );
    }
    let ports: Result<Vec<u16>, _> = query
        .all("ports")
        .iter()
        .map(|p| p.parse::<u16>())
        .collect();
    let ports = match ports {
        Ok(ports) if !ports.is_empty() && !ports.contains(&0) => ports,
        _ => {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "unable to upgrade connection: at least 1 valid port (1-65535) must be specified"
                    .into(),
            );
        }
    };
    let header = |h: http::header::HeaderName| {
        req.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let is_websocket = header(http::header::UPGRADE)
        .is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
        && header(http::header::SEC_WEBSOCKET_VERSION).as_deref() == Some("13");
    let Some(key) = header(http::header::SEC_WEBSOCKET_KEY).filter(|_| is_websocket) else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "unable to upgrade connection: the simulator speaks WebSocket port-forward only".into(),
        );
    };
    // The client's list, in its order of preference; the first one spoken here wins.
    let offered: Vec<String> = header(http::header::SEC_WEBSOCKET_PROTOCOL)
        .map(|h| {
            h.split(',')
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let protocol = if offered.is_empty() {
        None
    } else if offered.iter().any(|p| p == BINARY) {
        Some(BINARY)
    } else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!(
                "unable to upgrade connection: requested protocol(s) are not supported: {offered:?}; supports [\"{BINARY}\"]"
            ),
        );
    };
    let Some(netns) = super::netns_of(state, namespace, name) else {
        return status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            format!("the simulator has no namespace for pod {name}"),
        );
    };

    let uid = pod["metadata"]["uid"].as_str().unwrap_or("").to_owned();
    let pod_name = name.to_owned();
    let task = tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(req).await else {
            return;
        };
        let ws = WebSocketStream::from_raw_socket(
            hyper_util::rt::TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        forward(ws, &ports, &netns, &pod_name, &uid).await;
    });
    state
        .port_forwards
        .lock()
        .unwrap()
        .push(task.abort_handle());

    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(http::header::UPGRADE, "websocket")
        .header(http::header::CONNECTION, "Upgrade")
        .header(
            http::header::SEC_WEBSOCKET_ACCEPT,
            derive_accept_key(key.as_bytes()),
        );
    if let Some(protocol) = protocol {
        response = response.header(http::header::SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    response
        .body(
            Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap()
}

async fn forward<S>(ws: WebSocketStream<S>, ports: &[u16], netns: &str, pod: &str, uid: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    // The initial frames: the port on its data and its error channel.
    for (i, port) in ports.iter().enumerate() {
        for channel in [2 * i as u8, 2 * i as u8 + 1] {
            let [lo, hi] = port.to_le_bytes();
            if sink
                .send(Message::binary(vec![channel, lo, hi]))
                .await
                .is_err()
            {
                return;
            }
        }
    }
    let (to_ws, mut from_pods) = mpsc::channel::<Message>(16);
    let mut writers = Vec::new();
    // The pod-side readers end with this task (also when it is aborted).
    let mut readers = tokio::task::JoinSet::new();
    for (i, port) in ports.iter().enumerate() {
        match dial(netns, *port).await {
            Ok(stream) => {
                let (mut read, write) = stream.into_split();
                writers.push(Some(write));
                let to_ws = to_ws.clone();
                let channel = 2 * i as u8;
                readers.spawn(async move {
                    let mut buf = vec![0u8; 32 * 1024];
                    loop {
                        match read.read(&mut buf[1..]).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                buf[0] = channel;
                                if to_ws
                                    .send(Message::binary(buf[..=n].to_vec()))
                                    .await
                                    .is_err()
                                {
                                    return;
                                }
                            }
                        }
                    }
                    // No half-close on a port-forward: the pod side ending ends the stream.
                    let _ = to_ws.send(Message::Close(None)).await;
                });
            }
            Err(error) => {
                writers.push(None);
                let mut message = vec![2 * i as u8 + 1];
                message.extend_from_slice(
                    format!(
                        "error forwarding port {port} to pod {pod}, uid {uid}: failed to connect to localhost:{port} inside namespace: dial tcp4 127.0.0.1:{port}: connect: {error}"
                    )
                    .as_bytes(),
                );
                let _ = to_ws.send(Message::binary(message)).await;
                let _ = to_ws.send(Message::Close(None)).await;
            }
        }
    }
    drop(to_ws);
    loop {
        tokio::select! {
            outgoing = from_pods.recv() => match outgoing {
                Some(message) => {
                    let close = message.is_close();
                    if sink.send(message).await.is_err() || close {
                        return;
                    }
                }
                None => return,
            },
            incoming = stream.next() => match incoming {
                Some(Ok(Message::Binary(data))) if data.len() > 1 => {
                    let channel = usize::from(data[0]);
                    // Data goes to even channels; anything else from the client is ignored.
                    if channel % 2 == 0
                        && let Some(Some(writer)) = writers.get_mut(channel / 2)
                        && writer.write_all(&data[1..]).await.is_err()
                    {
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) => {
                    // Answer the closing handshake, then close the pod side.
                    let _ = sink.send(Message::Close(None)).await;
                    return;
                }
                None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

/// A TCP connection to `127.0.0.1:port` made from inside `netns` (as the kubelet's runtime
/// dials into the pod's namespace): a short-lived thread enters the namespace, and the socket
/// keeps it.
async fn dial(netns: &str, port: u16) -> std::io::Result<TcpStream> {
    let path = std::path::Path::new("/run/netns").join(netns);
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let dialed = std::fs::File::open(&path)
            .and_then(|namespace| {
                nix::sched::setns(&namespace, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
            })
            .and_then(|()| std::net::TcpStream::connect(("127.0.0.1", port)))
            .and_then(|stream| stream.set_nonblocking(true).map(|()| stream));
        let _ = tx.send(dialed);
    });
    let stream = rx
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("the namespace thread panicked")))?;
    let stream = TcpStream::from_std(stream)?;
    stream.set_nodelay(true)?;
    Ok(stream)
}
