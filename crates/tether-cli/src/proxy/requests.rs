//! Stolen HTTP requests, delivered one by one to the app over a hyper client connection (pooled
//! per stolen client connection), the answer streamed back within the window.

use super::*;

pub(super) type AppSender = hyper::client::conn::http1::SendRequest<
    http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>,
>;

/// Idle connections to the app kept at most.
pub(super) const MAX_POOLED: usize = 1024;

pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body as it arrives over the session, granting the window back as hyper takes it.
pub(super) fn request_body(
    from_agent: Input,
    id: u64,
    out: mpsc::Sender<Body>,
) -> http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError> {
    use http_body_util::BodyExt as _;
    use hyper::body::Frame;
    struct State {
        from_agent: Input,
        out: mpsc::Sender<Body>,
        done: bool,
    }
    let state = State {
        from_agent,
        out,
        done: false,
    };
    let frames = futures_util::stream::unfold(state, move |mut state| async move {
        if state.done {
            return None;
        }
        match state.from_agent.recv().await {
            Some(StreamInput::Data(data)) => {
                if let Some(increment) = state.from_agent.consumed(data.len()) {
                    let update = tether_protocol::WindowUpdate {
                        stream_id: id,
                        increment,
                    };
                    let _ = state.out.send(Body::WindowUpdate(update)).await;
                }
                Some((Ok(Frame::data(data)), state))
            }
            Some(StreamInput::End(trailers)) => {
                state.done = true;
                (!trailers.is_empty()).then(|| {
                    (
                        Ok(Frame::trailers(tether_session::http::from_wire(&trailers))),
                        state,
                    )
                })
            }
            Some(StreamInput::Reset(reason)) => {
                state.done = true;
                Some((
                    Err(BoxError::from(format!(
                        "the client's request broke off: {reason}"
                    ))),
                    state,
                ))
            }
            // An agent never sends an answer's head into a request it forwards.
            Some(StreamInput::ResponseHead(_)) => {
                state.done = true;
                Some((
                    Err(BoxError::from(
                        "the agent sent a response head inside a request",
                    )),
                    state,
                ))
            }
            // The stream went without its end (its session closed: the pod was replaced):
            // the app must not take a cut-off body for a whole one.
            None => {
                state.done = true;
                Some((
                    Err(BoxError::from(
                        "the session ended before the request's body did",
                    )),
                    state,
                ))
            }
        }
    });
    http_body_util::StreamBody::new(futures_util::StreamExt::boxed(frames)).boxed_unsync()
}

impl Shared {
    /// One stolen HTTP request: sent to the app, its answer streamed back. A failure becomes a
    /// stream reset, which the agent answers with a 502 and the reason.
    pub(super) async fn deliver_http(
        self: Arc<Self>,
        up: Arc<Session>,
        head: tether_protocol::HttpRequestHead,
        stream: Stream,
        mirror: bool,
    ) {
        let id = head.stream_id;
        // The request's body goes to hyper, the credit to the answer; the stream stays
        // registered until both are done.
        let Stream {
            input,
            window,
            registration,
            ..
        } = stream;
        if let Err(reason) = self.http_exchange(&up, &head, input, &window, mirror).await {
            let reset = StreamReset {
                stream_id: id,
                reason,
                errno: 0,
            };
            let _ = up.out.send(Body::StreamReset(reset)).await;
        }
        drop(registration);
    }

    pub(super) async fn http_exchange(
        &self,
        up: &Session,
        head: &tether_protocol::HttpRequestHead,
        from_agent: Input,
        window: &SendWindow,
        mirror: bool,
    ) -> Result<(), String> {
        use http_body_util::BodyExt as _;
        let id = head.stream_id;
        let port = head
            .local
            .as_ref()
            .and_then(|l| SocketAddr::try_from(l).ok())
            .map(|a| a.port());
        let remote = head
            .remote
            .as_ref()
            .and_then(|r| SocketAddr::try_from(r).ok())
            .ok_or("no remote address")?;
        let listener = port
            .and_then(|p| {
                self.listeners
                    .lock()
                    .expect("listeners lock")
                    .get(&p)
                    .cloned()
            })
            .ok_or("the local process no longer listens on this port")?;
        // HTTP/1 connections to the app are kept per stolen client connection, so a keep-alive
        // client's requests reuse one (and the app still sees that client as the peer).
        let pool_key = (up.id, head.connection_id, listener.local);
        let mut our_end = None;
        let mut reusable = None;
        let result = async {
            let uri: http::Uri = head
                .uri
                .parse()
                .map_err(|e| format!("bad request target {:?}: {e}", head.uri))?;
            let path = uri
                .path_and_query()
                .map_or("/", |pq| pq.as_str())
                .to_owned();
            let headers = tether_session::http::from_wire(&head.headers);
            let upgrade = tether_session::http::is_upgrade(&headers);
            // An upgrade request has no body; its stream stays open for the upgraded bytes.
            let (body, mut from_agent) = if upgrade {
                let empty = http_body_util::Empty::new()
                    .map_err(|e: std::convert::Infallible| match e {})
                    .boxed_unsync();
                (empty, Some(from_agent))
            } else if !headers.contains_key(http::header::CONTENT_LENGTH)
                && !headers.contains_key(http::header::TRANSFER_ENCODING)
            {
                // No body (a GET, say): send none, rather than an empty chunked one.
                let empty = http_body_util::Empty::new()
                    .map_err(|e: std::convert::Infallible| match e {})
                    .boxed_unsync();
                (empty, None)
            } else {
                (request_body(from_agent, id, up.out.clone()), None)
            };
            let mut request = http::Request::builder()
                .method(head.method.as_str())
                .uri(path)
                .body(body)
                .map_err(|e| format!("cannot rebuild the request: {e}"))?;
            *request.headers_mut() = headers;
            // The local app is spoken to in the client's HTTP version (h2c for h2, as a gRPC
            // server expects).
            let answered = if head.version() == tether_protocol::HttpVersion::Http2 {
                let (app, end) = self
                    .connect_for(listener.local, remote)
                    .await
                    .map_err(|e| format!("the local process did not accept: {e}"))?;
                our_end = Some(end);
                let io = hyper_util::rt::TokioIo::new(app);
                let (mut send, connection) =
                    hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                        .await
                        .map_err(|e| {
                            format!("HTTP/2 handshake with the local process failed: {e}")
                        })?;
                tokio::spawn(connection);
                if request.uri().scheme().is_none() {
                    let absolute = format!("http://localhost{}", request.uri());
                    *request.uri_mut() = absolute
                        .parse()
                        .map_err(|e| format!("bad request target: {e}"))?;
                }
                send.send_request(request).await
            } else {
                let pooled = if upgrade {
                    None
                } else {
                    self.app_pool.lock().expect("pool lock").remove(&pool_key)
                };
                let ready = match pooled {
                    Some(mut send) => send.ready().await.is_ok().then_some(send),
                    None => None,
                };
                let mut send = match ready {
                    Some(send) => send,
                    None => {
                        let (app, end) = self
                            .connect_for(listener.local, remote)
                            .await
                            .map_err(|e| format!("the local process did not accept: {e}"))?;
                        our_end = Some(end);
                        let (send, connection) = hyper::client::conn::http1::handshake(
                            hyper_util::rt::TokioIo::new(app),
                        )
                        .await
                        .map_err(|e| {
                            format!("HTTP handshake with the local process failed: {e}")
                        })?;
                        tokio::spawn(connection.with_upgrades());
                        send
                    }
                };
                let answered = send.send_request(request).await;
                if !upgrade {
                    reusable = Some(send);
                }
                answered
            };
            let mut response =
                answered.map_err(|e| format!("the local process failed to answer: {e}"))?;
            if let (true, Some(from_agent)) = (
                response.status() == http::StatusCode::SWITCHING_PROTOCOLS,
                from_agent.as_mut(),
            ) {
                let upgraded = hyper::upgrade::on(&mut response);
                let response_head = tether_protocol::HttpResponseHead {
                    stream_id: id,
                    status: 101,
                    version: tether_session::http::wire_version(response.version()) as i32,
                    headers: tether_session::http::to_wire(response.headers()),
                };
                up.out
                    .send(Body::HttpResponseHead(response_head))
                    .await
                    .map_err(|_| "the session closed")?;
                let upgraded = upgraded
                    .await
                    .map_err(|e| format!("the local process's upgrade failed: {e}"))?;
                let (mut read, mut write) =
                    tokio::io::split(hyper_util::rt::TokioIo::new(upgraded));
                pump(
                    &mut read,
                    &mut write,
                    id,
                    from_agent,
                    window,
                    &up.out,
                    Relay::Windowed,
                )
                .await;
                return Ok(());
            }
            if mirror {
                // The pod's app answered the real client; the local answer is read and dropped.
                let _ = response.into_body().collect().await;
                return Ok(());
            }
            let (parts, mut body) = response.into_parts();
            let response_head = tether_protocol::HttpResponseHead {
                stream_id: id,
                status: u32::from(parts.status.as_u16()),
                version: tether_session::http::wire_version(parts.version) as i32,
                headers: tether_session::http::to_wire(&parts.headers),
            };
            up.out
                .send(Body::HttpResponseHead(response_head))
                .await
                .map_err(|_| "the session closed")?;
            let mut trailers = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame =
                    frame.map_err(|e| format!("the local process's answer broke off: {e}"))?;
                match frame.into_data() {
                    Ok(mut data) => {
                        while !data.is_empty() {
                            // Credit never comes once the session is over (a move closed it).
                            let allowed = tokio::select! {
                                allowed = window
                                    .reserve(data.len().min(tether_protocol::MAX_DATA_CHUNK)) => allowed,
                                () = up.ended() => return Err("the session ended".into()),
                            };
                            let chunk = data.split_to(allowed);
                            up.out
                                .send(Body::StreamData(StreamData {
                                    stream_id: id,
                                    data: chunk,
                                }))
                                .await
                                .map_err(|_| "the session closed")?;
                        }
                    }
                    Err(frame) => {
                        if let Ok(map) = frame.into_trailers() {
                            trailers = tether_session::http::to_wire(&map);
                        }
                    }
                }
            }
            up.out
                .send(Body::StreamEnd(StreamEnd {
                    stream_id: id,
                    trailers,
                }))
                .await
                .map_err(|_| "the session closed")?;
            Ok(())
        }
        .await;
        if let Some(end) = our_end {
            self.forget_peer(end);
        }
        if let (Ok(()), Some(send)) = (&result, reusable) {
            let mut pool = self.app_pool.lock().expect("pool lock");
            // Bounded: a client that opened many connections must not grow this without limit.
            if !send.is_closed() && pool.len() < MAX_POOLED {
                pool.insert(pool_key, send);
            }
        }
        result
    }
}
