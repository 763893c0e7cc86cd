//! Requests that take their time (outgoing connects, name lookups, files, the environment), each
//! run on a task of its own so the session keeps serving meanwhile.

use super::*;

/// What a request served on its own task needs.
pub(super) struct OpContext {
    pub(super) agent: Arc<Agent>,
    pub(super) out: mpsc::Sender<Body>,
    pub(super) streams: Arc<Streams>,
    pub(super) files: Arc<Files>,
    pub(super) session: String,
}

impl OpContext {
    pub(super) async fn run(self, id: u64, op: request::Op) {
        let result = match op {
            request::Op::OutgoingConnect(connect) => return self.connect(id, connect).await,
            request::Op::DnsLookup(lookup) => match self.agent.dns() {
                Ok(dns) if lookup.address.is_empty() => dns
                    .lookup(lookup.name.clone(), lookup.family())
                    .await
                    .map(response::Result::DnsAnswer),
                Ok(dns) => match ip_of(&lookup.address) {
                    Some(ip) => dns.reverse(ip).await.map(response::Result::DnsAnswer),
                    None => Err(error(
                        ErrorCode::Unsupported,
                        "an address of neither 4 nor 16 bytes",
                    )),
                },
                Err(e) => Err(e),
            },
            request::Op::EnvGet(_) => self.agent.environment().map(response::Result::Env),
            request::Op::Fs(fs) => self.fs(fs).await,
            other => Err(unsupported_op(Some(&other))),
        };
        self.respond(id, result).await;
    }

    async fn respond(&self, id: u64, result: Result<response::Result, ErrorInfo>) {
        if let Err(refused) = &result {
            tracing::debug!(session = %self.session, error = %refused.message, "request failed");
        }
        let result = result.unwrap_or_else(response::Result::Error);
        let _ = self
            .out
            .send(Body::Response(Response {
                id,
                result: Some(result),
            }))
            .await;
    }

    async fn fs(&self, request: tether_protocol::FsRequest) -> Result<response::Result, ErrorInfo> {
        let root = self.agent.root()?;
        let op = request
            .op
            .ok_or_else(|| error(ErrorCode::Unsupported, "an unknown file operation"))?;
        let files = Arc::clone(&self.files);
        let outcome = tokio::task::spawn_blocking(move || files.run(&root, op))
            .await
            .map_err(|_| error(ErrorCode::Internal, "a file operation panicked"))?;
        if let Some(warning) = outcome.warning {
            tracing::warn!(session = %self.session, "{warning}");
            let log = tether_protocol::Log {
                level: tether_protocol::LogLevel::Warn as i32,
                message: warning,
                target: "fs".into(),
            };
            let _ = self.out.send(Body::Log(log)).await;
        }
        outcome.result.map(response::Result::Fs)
    }

    /// Opens the connection, answers, then serves the stream (the answer goes out before any of
    /// the stream's bytes: the link keeps order).
    async fn connect(self, id: u64, connect: tether_protocol::OutgoingConnect) {
        let Some(remote) = connect
            .remote
            .as_ref()
            .and_then(|r| SocketAddr::try_from(r).ok())
        else {
            let bad = error(
                ErrorCode::BadRequest,
                "an outgoing connection needs a remote address",
            );
            return self.respond(id, Err(bad)).await;
        };
        let stream_id = connect.stream_id;
        if stream_id.is_multiple_of(2) {
            let bad = error(ErrorCode::BadRequest, "client streams have odd ids");
            return self.respond(id, Err(bad)).await;
        }
        let connected = |local: std::io::Result<SocketAddr>| {
            response::Result::Connected(tether_protocol::Connected {
                stream_id,
                local: local.ok().map(Into::into),
                remote: Some(remote.into()),
            })
        };
        match connect.transport() {
            tether_protocol::Transport::Udp => {
                match crate::outgoing::connect_udp(&self.agent.netns, remote).await {
                    Ok(socket) => {
                        // Registered first: the client may send as soon as it is answered.
                        let session_stream = self.streams.open(stream_id);
                        self.respond(id, Ok(connected(socket.local_addr()))).await;
                        crate::outgoing::run_udp(socket, session_stream, self.out).await;
                    }
                    Err(e) => self.respond(id, Err(e)).await,
                }
            }
            _ => match crate::outgoing::connect_tcp(&self.agent.netns, remote).await {
                Ok(stream) => {
                    tracing::debug!(%remote, host = %connect.hostname, "outgoing connection");
                    let session_stream = self.streams.open(stream_id);
                    self.respond(id, Ok(connected(stream.local_addr()))).await;
                    crate::outgoing::run_tcp(stream, session_stream, self.out).await;
                }
                Err(e) => self.respond(id, Err(e)).await,
            },
        }
    }
}

/// An address on the wire: 4 or 16 bytes.
pub(super) fn ip_of(bytes: &[u8]) -> Option<std::net::IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        _ => None,
    }
}
