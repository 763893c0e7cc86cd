//! Stolen connections: sniffed for HTTP (routed request by request) or pumped whole to the client.

use super::*;

/// How long a stolen connection may take to show its first bytes before it is taken for a
/// protocol that is not HTTP (one where the server speaks first, say).
pub(super) const SNIFF_TIMEOUT: Duration = Duration::from_millis(500);

/// Decides what a stolen connection is and serves it: HTTP/1 request by request; anything else
/// whole on a whole-port steal, or passed through to the original app on a filtered one.
pub(super) async fn route_stolen(stolen: Stolen, route: Arc<Route>, ctx: HttpContext) {
    let kind = sniff_stream(&stolen.stream).await;
    match kind {
        Sniff::Http1 => serve_http1(stolen.stream, stolen.original, stolen.peer, route, ctx).await,
        Sniff::Http2 => {
            crate::http::serve_http2(stolen.stream, stolen.original, stolen.peer, route, ctx).await
        }
        _ if route.is_filtered() => crate::steal::passthrough(stolen, ctx.netns).await,
        _ => {
            let id = ctx.next_stream.fetch_add(2, Ordering::Relaxed);
            run_stolen(stolen, ctx.streams.open(id), ctx.out.clone()).await;
        }
    }
}

/// Peeks (without consuming) until the first bytes tell the protocol, within [`SNIFF_TIMEOUT`].
pub(super) async fn sniff_stream(stream: &TcpStream) -> Sniff {
    let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
    let mut buf = [0u8; sniff::DECIDING_BYTES];
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await;
        let n = match peeked {
            Ok(Ok(n)) if n > 0 => n,
            _ => return Sniff::Other,
        };
        match sniff::sniff(&buf[..n]) {
            Sniff::NeedMore => {
                // `peek` returns at once while any byte is queued: wait a little for the rest of
                // a split first segment (rare), bounded by the deadline.
                if tokio::time::timeout_at(deadline, tokio::time::sleep(Duration::from_millis(2)))
                    .await
                    .is_err()
                {
                    return Sniff::Other;
                }
            }
            decided => return decided,
        }
    }
}

/// Streams one stolen connection to the client and the client's answer back.
/// The client's bytes are unbounded in the channel only in principle: the client may not send
/// more than the window this side grants back as it writes them out.
pub(super) async fn run_stolen(stolen: Stolen, session_stream: Stream, out: mpsc::Sender<Body>) {
    let id = session_stream.id;
    let Stolen {
        stream,
        original,
        peer,
    } = stolen;
    let opened = Body::IncomingConnection(IncomingConnection {
        stream_id: id,
        mode: SubscriptionMode::Steal as i32,
        local: Some(SocketAddr::V4(original).into()),
        remote: Some(peer.into()),
    });
    if out.send(opened).await.is_err() {
        return;
    }
    crate::outgoing::run_tcp(stream, session_stream, out).await;
}
