//! Incoming connections from the target, delivered to the app's real listener and pumped.

use super::*;

impl Shared {
    /// Connects to the process's listener for one incoming connection and pumps it.
    pub(super) async fn deliver(
        self: Arc<Self>,
        up: Arc<Session>,
        info: IncomingConnection,
        mut stream: Stream,
    ) {
        let id = info.stream_id;
        let remote = info
            .remote
            .as_ref()
            .and_then(|r| SocketAddr::try_from(r).ok());
        let port = info
            .local
            .as_ref()
            .and_then(|l| SocketAddr::try_from(l).ok())
            .map(|a| a.port());
        let listener = port.and_then(|p| {
            self.listeners
                .lock()
                .expect("listeners lock")
                .get(&p)
                .cloned()
        });
        let mirror = info.mode() == SubscriptionMode::Mirror;
        let connected = match (&listener, remote) {
            (Some(listener), Some(remote)) => self.connect_for(listener.local, remote).await,
            _ => Err(std::io::Error::other("no local listener for this port")),
        };
        let (mut app, our_end) = match connected {
            Ok(connected) => connected,
            Err(error) => {
                if !mirror {
                    let reset = StreamReset {
                        stream_id: id,
                        reason: format!("the local process did not accept: {error}"),
                        errno: 0,
                    };
                    let _ = up.out.send(Body::StreamReset(reset)).await;
                }
                return;
            }
        };
        let (mut app_read, mut app_write) = app.split();
        // A mirrored copy: the pod's app answers the real client; the local answer is dropped.
        let relay = if mirror {
            Relay::Discard
        } else {
            Relay::Windowed
        };
        pump(
            &mut app_read,
            &mut app_write,
            id,
            &mut stream.input,
            &stream.window,
            &up.out,
            relay,
        )
        .await;
        drop(stream);
        self.forget_peer(our_end);
    }
}
