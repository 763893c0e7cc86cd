//! Connections the local process opens, made from the target's network namespace.
//!
//! The socket is created on a thread inside the namespace (that fixes its namespace for good)
//! and then connected and served on the runtime like any other. TCP streams carry bytes with the
//! same window as stolen connections; UDP flows carry one [`Datagram`] per datagram, unbounded
//! in count but each dropped rather than queued when the socket cannot take it (UDP semantics).

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use tether_protocol::{Body, Datagram, ErrorCode, ErrorInfo, StreamEnd};
use tokio::{
    net::{TcpSocket, TcpStream, UdpSocket},
    sync::mpsc,
};

use tether_session::stream::{Ended, Relay, Stream, StreamInput, pump};

use crate::netns::Netns;

/// How long a TCP connect may take before the client is told ETIMEDOUT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// A UDP flow nobody used for this long is closed (the client ends flows whose socket closed;
/// this only bounds those of a client that went away without saying so).
const UDP_IDLE: Duration = Duration::from_secs(30 * 60);

/// Opens a TCP connection to `remote` from the target's namespace.
pub(crate) async fn connect_tcp(netns: &Netns, remote: SocketAddr) -> Result<TcpStream, ErrorInfo> {
    let socket = netns
        .run_in(move || {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(remote),
                socket2::Type::STREAM.cloexec(),
                None,
            )?;
            socket.set_nonblocking(true)?;
            Ok(std::net::TcpStream::from(socket))
        })
        .await
        .map_err(|e| io_error(&e, remote))?;
    let socket = TcpSocket::from_std_stream(socket);
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(remote))
        .await
        .map_err(|_| io_error(&std::io::Error::from_raw_os_error(libc::ETIMEDOUT), remote))?
        .map_err(|e| io_error(&e, remote))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Opens a UDP socket in the target's namespace, connected to `remote`.
pub(crate) async fn connect_udp(netns: &Netns, remote: SocketAddr) -> Result<UdpSocket, ErrorInfo> {
    let socket = netns
        .run_in(move || {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(remote),
                socket2::Type::DGRAM.cloexec(),
                None,
            )?;
            socket.set_nonblocking(true)?;
            socket.connect(&remote.into())?;
            Ok(std::net::UdpSocket::from(socket))
        })
        .await
        .map_err(|e| io_error(&e, remote))?;
    UdpSocket::from_std(socket).map_err(|e| io_error(&e, remote))
}

/// Serves a TCP connection's stream (an outgoing one, or a stolen one) until both sides are
/// done; a stream that ended abnormally resets the connection (`SO_LINGER` 0), so its other end
/// sees a reset, not a clean close.
pub(crate) async fn run_tcp(
    stream: TcpStream,
    mut session_stream: Stream,
    out: mpsc::Sender<Body>,
) {
    let id = session_stream.id;
    let (mut reader, mut writer) = stream.into_split();
    let ended = pump(
        &mut reader,
        &mut writer,
        id,
        &mut session_stream.input,
        &session_stream.window,
        &out,
        Relay::Windowed,
    )
    .await;
    if ended == Ended::Aborted
        && let Ok(stream) = reader.reunite(writer)
    {
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    }
}

/// Serves an outgoing UDP flow: the client's datagrams out, the answers back, until the client
/// ends the stream or the flow idles for [`UDP_IDLE`].
pub(crate) async fn run_udp(
    socket: UdpSocket,
    mut session_stream: Stream,
    out: mpsc::Sender<Body>,
) {
    let id = session_stream.id;
    let mut buf = vec![0u8; 65_536];
    loop {
        tokio::select! {
            item = session_stream.input.recv() => match item {
                Some(StreamInput::Data(data)) => {
                    // A refused or dropped datagram is UDP's business, not the session's.
                    let _ = socket.send(&data).await;
                }
                Some(StreamInput::ResponseHead(_)) => {}
                Some(StreamInput::End(_) | StreamInput::Reset(_)) | None => break,
            },
            received = socket.recv(&mut buf) => {
                // ECONNREFUSED from an ICMP error is reported by the next recv: skip it.
                if let Ok(n) = received {
                    let datagram = Datagram {
                        stream_id: id,
                        data: Bytes::copy_from_slice(&buf[..n]),
                        peer: None,
                    };
                    if out.send(Body::Datagram(datagram)).await.is_err() {
                        break;
                    }
                }
            }
            () = tokio::time::sleep(UDP_IDLE) => {
                let _ = out
                    .send(Body::StreamEnd(StreamEnd { stream_id: id, trailers: Vec::new() }))
                    .await;
                break;
            }
        }
    }
}

fn io_error(error: &std::io::Error, remote: SocketAddr) -> ErrorInfo {
    ErrorInfo {
        code: ErrorCode::Io as i32,
        message: format!("cannot connect to {remote} from the target: {error}"),
        in_reply_to_seq: 0,
        errno: error.raw_os_error().unwrap_or(libc::EIO),
    }
}
