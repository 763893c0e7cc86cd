//! Stolen HTTP, request by request: hyper serves the stolen connection, each request goes to the
//! local process (over the session) when the port's [`filter::Route`] takes it, and to the
//! original app (through a hyper client connection from the agent, marked so the redirect leaves
//! it alone) otherwise. One keep-alive connection may carry both kinds.
//!
//! Bodies stream in both directions within the session's flow-control windows, never held whole.
//! If the local process does not answer (it reset the stream, or the session ended), the client
//! gets a 502 with a one-line reason.
//!
//! HTTP/2 with prior knowledge (h2c) is served the same way, stream by stream, over one
//! multiplexed connection to the original app. Upgrades (WebSocket) hand the connection to
//! whichever side the upgrade request was routed to.

pub(crate) mod filter;
pub(crate) mod sniff;

use std::{
    convert::Infallible,
    net::{SocketAddr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use futures_util::StreamExt as _;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, StreamBody, combinators::UnsyncBoxBody};
use hyper::{
    body::{Frame, Incoming},
    client::conn::http1::SendRequest,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tether_protocol::{
    Body, HttpRequestHead, MAX_DATA_CHUNK, StreamData, StreamEnd, StreamReset, WindowUpdate,
};
use tokio::{net::TcpStream, sync::mpsc};

use tether_session::{
    flow::SendWindow,
    http::{from_wire, is_upgrade, to_wire, wire_version},
    stream::{Relay, Stream, StreamInput, Streams, pump},
};

use crate::{netns::Netns, steal::connect_marked};

use self::filter::Route;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type AnyBody = UnsyncBoxBody<Bytes, BoxError>;

/// What request handlers need from their session.
#[derive(Debug, Clone)]
pub(crate) struct HttpContext {
    pub(crate) out: mpsc::Sender<Body>,
    pub(crate) next_stream: Arc<AtomicU64>,
    pub(crate) streams: Arc<Streams>,
    pub(crate) netns: Netns,
    /// False while the session has no link: requests then go to the original app.
    pub(crate) connected: Arc<std::sync::atomic::AtomicBool>,
}

/// The agent's connection to the original app for one stolen connection's left requests.
enum AppConnection {
    /// HTTP/1: one request at a time.
    Http1(tokio::sync::Mutex<Option<SendRequest<AnyBody>>>),
    /// HTTP/2: one multiplexed connection.
    Http2(tokio::sync::Mutex<Option<hyper::client::conn::http2::SendRequest<AnyBody>>>),
}

/// Routes each request of one stolen connection: to the local process when the route takes it,
/// to the original app otherwise. Shared by the HTTP/1 and HTTP/2 servers.
struct Router {
    original: SocketAddrV4,
    peer: SocketAddr,
    connection_id: u64,
    route: Arc<Route>,
    ctx: HttpContext,
    app_connection: AppConnection,
}

impl Router {
    fn new(
        original: SocketAddrV4,
        peer: SocketAddr,
        route: Arc<Route>,
        ctx: HttpContext,
        app_connection: AppConnection,
    ) -> Arc<Router> {
        let connection_id = ctx.next_stream.fetch_add(2, Ordering::Relaxed);
        Arc::new(Router {
            original,
            peer,
            connection_id,
            route,
            ctx,
            app_connection,
        })
    }

    async fn route(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> Result<Response<AnyBody>, Infallible> {
        let (original, ctx) = (self.original, &self.ctx);
        Ok(
            if ctx.connected.load(std::sync::atomic::Ordering::Acquire)
                && self
                    .route
                    .takes(request.method(), request.uri(), request.headers())
            {
                to_local(request, original, self.peer, self.connection_id, ctx).await
            } else if is_upgrade(request.headers()) {
                // Only HTTP/1 has upgrades (HTTP/2 forbids `Connection` headers).
                upgrade_to_original(request, original, ctx).await
            } else {
                to_original(request, original, ctx, &self.app_connection).await
            },
        )
    }
}

/// Serves one stolen HTTP/2 (h2c, prior knowledge) connection: every stream is routed on its own,
/// so one connection may carry both kinds concurrently.
pub(crate) async fn serve_http2(
    stream: TcpStream,
    original: SocketAddrV4,
    peer: SocketAddr,
    route: Arc<Route>,
    ctx: HttpContext,
) {
    let router = Router::new(
        original,
        peer,
        route,
        ctx,
        AppConnection::Http2(tokio::sync::Mutex::new(None)),
    );
    let service = service_fn(move |request| Arc::clone(&router).route(request));
    let served = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(error) = served {
        tracing::debug!(%peer, %error, "stolen HTTP/2 connection ended");
    }
}

/// Serves one stolen HTTP/1 connection until either side closes it.
pub(crate) async fn serve_http1(
    stream: TcpStream,
    original: SocketAddrV4,
    peer: SocketAddr,
    route: Arc<Route>,
    ctx: HttpContext,
) {
    let router = Router::new(
        original,
        peer,
        route,
        ctx,
        AppConnection::Http1(tokio::sync::Mutex::new(None)),
    );
    let service = service_fn(move |request| Arc::clone(&router).route(request));
    // Half-close: a client may shut its side after sending a request and still want the answer.
    let served = hyper::server::conn::http1::Builder::new()
        .half_close(true)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
    if let Err(error) = served {
        tracing::debug!(%peer, %error, "stolen HTTP connection ended");
    }
}

fn bad_gateway(reason: &str) -> Response<AnyBody> {
    let body = format!("tether: {reason}\n");
    let mut response = Response::new(
        http_body_util::Full::new(Bytes::from(body))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
}

/// The original app's answer, over a connection of the agent's (one per stolen connection), in
/// the client's HTTP version.
async fn to_original(
    request: Request<Incoming>,
    original: SocketAddrV4,
    ctx: &HttpContext,
    app_connection: &AppConnection,
) -> Response<AnyBody> {
    let request = request.map(|body| body.map_err(BoxError::from).boxed_unsync());
    let unreachable = |error: String| {
        bad_gateway(&format!(
            "cannot reach the original app at {original}: {error}"
        ))
    };
    let answered = match app_connection {
        AppConnection::Http1(sender) => {
            let mut sender = sender.lock().await;
            if sender.as_ref().is_none_or(SendRequest::is_closed) {
                let tcp = match connect_marked(&ctx.netns, SocketAddr::V4(original)).await {
                    Ok(tcp) => tcp,
                    Err(error) => return unreachable(error.to_string()),
                };
                match hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await {
                    Ok((send, connection)) => {
                        tokio::spawn(connection);
                        *sender = Some(send);
                    }
                    Err(error) => return unreachable(error.to_string()),
                }
            }
            let send = sender.as_mut().expect("connected above");
            if send.ready().await.is_err() {
                *sender = None;
                return bad_gateway("the original app closed the connection");
            }
            send.send_request(request).await
        }
        AppConnection::Http2(sender) => {
            let mut send = {
                let mut sender = sender.lock().await;
                if sender.as_ref().is_none_or(|s| s.is_closed()) {
                    let tcp = match connect_marked(&ctx.netns, SocketAddr::V4(original)).await {
                        Ok(tcp) => tcp,
                        Err(error) => return unreachable(error.to_string()),
                    };
                    match hyper::client::conn::http2::handshake(
                        hyper_util::rt::TokioExecutor::new(),
                        TokioIo::new(tcp),
                    )
                    .await
                    {
                        Ok((send, connection)) => {
                            tokio::spawn(connection);
                            *sender = Some(send);
                        }
                        Err(error) => return unreachable(error.to_string()),
                    }
                }
                sender.clone().expect("connected above")
            };
            if send.ready().await.is_err() {
                return bad_gateway("the original app closed the connection");
            }
            send.send_request(request).await
        }
    };
    match answered {
        Ok(response) => response.map(|body| body.map_err(BoxError::from).boxed_unsync()),
        Err(error) => bad_gateway(&format!("the original app failed: {error}")),
    }
}

/// An upgrade the route leaves to the original app: on its own connection (an upgraded connection
/// cannot serve further requests), and after the app's 101 both upgraded sides are spliced.
async fn upgrade_to_original(
    mut request: Request<Incoming>,
    original: SocketAddrV4,
    ctx: &HttpContext,
) -> Response<AnyBody> {
    let client_side = hyper::upgrade::on(&mut request);
    let connected = match connect_marked(&ctx.netns, SocketAddr::V4(original)).await {
        Ok(tcp) => hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let (mut send, connection) = match connected {
        Ok(pair) => pair,
        Err(error) => {
            return bad_gateway(&format!(
                "cannot reach the original app at {original}: {error}"
            ));
        }
    };
    tokio::spawn(connection.with_upgrades());
    let request = request.map(|body| body.map_err(BoxError::from).boxed_unsync());
    let mut response = match send.send_request(request).await {
        Ok(response) => response,
        Err(error) => return bad_gateway(&format!("the original app failed: {error}")),
    };
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let app_side = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            if let (Ok(client), Ok(app)) = (client_side.await, app_side.await) {
                let _ = tokio::io::copy_bidirectional(
                    &mut TokioIo::new(client),
                    &mut TokioIo::new(app),
                )
                .await;
            }
        });
    }
    response.map(|body| body.map_err(BoxError::from).boxed_unsync())
}

/// The local process's answer, over the session.
async fn to_local(
    mut request: Request<Incoming>,
    original: SocketAddrV4,
    peer: SocketAddr,
    connection_id: u64,
    ctx: &HttpContext,
) -> Response<AnyBody> {
    let id = ctx.next_stream.fetch_add(2, Ordering::Relaxed);
    let mut stream = ctx.streams.open(id);
    let upgrade = is_upgrade(request.headers()).then(|| hyper::upgrade::on(&mut request));
    let (parts, body) = request.into_parts();
    let head = HttpRequestHead {
        stream_id: id,
        connection_id,
        local: Some(SocketAddr::V4(original).into()),
        remote: Some(peer.into()),
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        version: wire_version(parts.version) as i32,
        headers: to_wire(&parts.headers),
        mode: tether_protocol::SubscriptionMode::Steal as i32,
    };
    if ctx.out.send(Body::HttpRequestHead(head)).await.is_err() {
        return bad_gateway("the session with the local process is closed");
    }
    // An upgrade request has no body, and its stream must stay open for the upgraded bytes.
    if upgrade.is_none() {
        tokio::spawn(send_request_body(
            body,
            id,
            ctx.out.clone(),
            Some(Arc::clone(&stream.window)),
        ));
    }
    let head = loop {
        match stream.input.recv().await {
            Some(StreamInput::ResponseHead(head)) => break head,
            Some(StreamInput::Reset(reason)) => {
                return bad_gateway(&format!("the local process did not answer: {reason}"));
            }
            None => return bad_gateway("the local process did not answer: the session ended"),
            Some(_) => continue,
        }
    };
    if let (Some(upgrade), 101) = (upgrade, head.status) {
        // The local process switched protocols: the connection is its from here on.
        let out = ctx.out.clone();
        tokio::spawn(async move {
            let mut stream = stream;
            match upgrade.await {
                Ok(upgraded) => {
                    let (mut reader, mut writer) = tokio::io::split(TokioIo::new(upgraded));
                    pump(
                        &mut reader,
                        &mut writer,
                        id,
                        &mut stream.input,
                        &stream.window,
                        &out,
                        Relay::Windowed,
                    )
                    .await;
                }
                Err(error) => {
                    let reset = StreamReset {
                        stream_id: id,
                        reason: format!("the client's upgrade failed: {error}"),
                        errno: 0,
                    };
                    let _ = out.send(Body::StreamReset(reset)).await;
                }
            }
        });
        let mut response = Response::new(
            http_body_util::Empty::new()
                .map_err(|e| match e {})
                .boxed_unsync(),
        );
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        *response.headers_mut() = from_wire(&head.headers);
        return response;
    }
    let mut response = Response::new(response_body(stream, ctx.out.clone()));
    *response.status_mut() =
        StatusCode::from_u16(head.status as u16).unwrap_or(StatusCode::BAD_GATEWAY);
    *response.headers_mut() = from_wire(&head.headers);
    response
}

/// Request body → session: within the stream's window, or (mirrored copies, which must never hold
/// up the pod's traffic) without one.
async fn send_request_body(
    mut body: Incoming,
    id: u64,
    out: mpsc::Sender<Body>,
    window: Option<Arc<SendWindow>>,
) {
    let mut trailers = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(error) => {
                let reset = StreamReset {
                    stream_id: id,
                    reason: format!("the client's request body failed: {error}"),
                    errno: 0,
                };
                let _ = out.send(Body::StreamReset(reset)).await;
                return;
            }
        };
        match frame.into_data() {
            Ok(mut data) => {
                while !data.is_empty() {
                    let most = data.len().min(MAX_DATA_CHUNK);
                    let allowed = match &window {
                        Some(window) => window.reserve(most).await,
                        None => most,
                    };
                    let chunk = data.split_to(allowed);
                    if out
                        .send(Body::StreamData(StreamData {
                            stream_id: id,
                            data: chunk,
                        }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
            Err(frame) => {
                if let Ok(map) = frame.into_trailers() {
                    trailers = to_wire(&map);
                }
            }
        }
    }
    let _ = out
        .send(Body::StreamEnd(StreamEnd {
            stream_id: id,
            trailers,
        }))
        .await;
}

/// Session → response body, granting the window back as hyper takes the bytes.
fn response_body(stream: Stream, out: mpsc::Sender<Body>) -> AnyBody {
    struct State {
        stream: Stream,
        out: mpsc::Sender<Body>,
        done: bool,
    }
    let id = stream.id;
    let state = State {
        stream,
        out,
        done: false,
    };
    let frames = futures_util::stream::unfold(state, move |mut state| async move {
        if state.done {
            return None;
        }
        loop {
            match state.stream.input.recv().await {
                Some(StreamInput::Data(data)) => {
                    if let Some(increment) = state.stream.input.consumed(data.len()) {
                        let _ = state
                            .out
                            .send(Body::WindowUpdate(WindowUpdate {
                                stream_id: id,
                                increment,
                            }))
                            .await;
                    }
                    return Some((Ok(Frame::data(data)), state));
                }
                Some(StreamInput::End(trailers)) => {
                    state.done = true;
                    if trailers.is_empty() {
                        return None;
                    }
                    return Some((Ok(Frame::trailers(from_wire(&trailers))), state));
                }
                Some(StreamInput::Reset(reason)) => {
                    state.done = true;
                    return Some((
                        Err(BoxError::from(format!(
                            "the local process aborted its answer: {reason}"
                        ))),
                        state,
                    ));
                }
                Some(StreamInput::ResponseHead(_)) => continue,
                None => return None,
            }
        }
    });
    StreamBody::new(frames.boxed()).boxed_unsync()
}

/// A filtered mirror of one connection: its reassembled client → server bytes are parsed as
/// HTTP/1 by hyper (fed through an in-memory pipe; hyper's answers are read and dropped), and
/// only the requests the route takes are copied to the client, marked as mirrored. Mirrored
/// bodies are not flow-controlled: the pod's traffic must never wait for the local process (the
/// proxy bounds what it queues instead).
pub(crate) async fn mirror_http_flow(
    mut bytes: mpsc::UnboundedReceiver<Bytes>,
    server: SocketAddrV4,
    client: SocketAddrV4,
    route: Arc<Route>,
    out: mpsc::Sender<Body>,
    next_stream: Arc<AtomicU64>,
) {
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
    let (mut answers, mut feed) = tokio::io::split(theirs);
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt as _;
        while let Some(chunk) = bytes.recv().await {
            if feed.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = feed.shutdown().await;
    });
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut answers, &mut tokio::io::sink()).await;
    });
    let service = service_fn(move |request: Request<Incoming>| {
        let (route, out, next_stream) = (Arc::clone(&route), out.clone(), Arc::clone(&next_stream));
        async move {
            if route.takes(request.method(), request.uri(), request.headers()) {
                copy_request(request, server, client, &out, &next_stream).await;
            }
            Ok::<_, Infallible>(Response::new(http_body_util::Empty::<Bytes>::new()))
        }
    });
    // A mirrored flow ends with the client's FIN right after its request: with half-close off,
    // hyper would drop a request still being copied when it reads that end.
    let _ = hyper::server::conn::http1::Builder::new()
        .half_close(true)
        .serve_connection(TokioIo::new(ours), service)
        .await;
}

async fn copy_request(
    request: Request<Incoming>,
    server: SocketAddrV4,
    client: SocketAddrV4,
    out: &mpsc::Sender<Body>,
    next_stream: &AtomicU64,
) {
    let id = next_stream.fetch_add(2, Ordering::Relaxed);
    let (parts, body) = request.into_parts();
    let head = HttpRequestHead {
        stream_id: id,
        connection_id: 0,
        local: Some(SocketAddr::V4(server).into()),
        remote: Some(SocketAddr::V4(client).into()),
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        version: wire_version(parts.version) as i32,
        headers: to_wire(&parts.headers),
        mode: tether_protocol::SubscriptionMode::Mirror as i32,
    };
    if out.send(Body::HttpRequestHead(head)).await.is_err() {
        return;
    }
    send_request_body(body, id, out.clone(), None).await;
}
