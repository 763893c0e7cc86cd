//! Both ends of a link: preface exchange and the framed stream that follows.
//!
//! Shared by the agent (server side) and the local proxy (client side), so the two cannot drift.

use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use tether_protocol::{
    Body, Frame, FrameCodec, Hello, PREFACE_LEN, Preface, PrefaceError, Welcome,
};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio_util::codec::Framed;

/// A link after the preface exchange: frames both ways.
pub type FramedLink<S> = Framed<S, FrameCodec>;

/// How long a peer may take to send its preface and first frame.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a handshake failed. The message says what failed; the cause, if any, is the `source`
/// (print the chain, as `anyhow`'s `{:#}` does).
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the link failed")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Preface(#[from] PrefaceError),
    #[error("the peer sent nothing for {0:?} during the handshake")]
    Timeout(Duration),
    #[error("the peer closed the link during the handshake")]
    Closed,
    #[error("the agent refused the session: {0}")]
    Refused(String),
    #[error("unexpected {0} frame during the handshake")]
    Unexpected(&'static str),
}

/// Sends our preface, reads and checks the peer's, and returns the framed stream.
pub async fn exchange_preface<S>(mut stream: S) -> Result<FramedLink<S>, LinkError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(&Preface::CURRENT.encode()).await?;
    stream.flush().await?;
    let mut peer = [0u8; PREFACE_LEN];
    let mut filled = 0;
    // Read byte ranges until the preface is complete, so a non-tether peer is named after its
    // first bytes instead of waiting for all eight.
    while filled < PREFACE_LEN {
        let n = tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.read(&mut peer[filled..]))
            .await
            .map_err(|_| LinkError::Timeout(HANDSHAKE_TIMEOUT))??;
        if n == 0 {
            return Err(LinkError::Closed);
        }
        filled += n;
        Preface::decode(&peer[..filled])?;
    }
    let theirs = Preface::decode(&peer)?.expect("a full preface decodes");
    Preface::CURRENT.check_compatible(theirs)?;
    Ok(Framed::new(stream, FrameCodec))
}

/// Reads the next frame within the handshake timeout.
pub async fn next_frame<S>(link: &mut FramedLink<S>) -> Result<Frame, LinkError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, link.next()).await {
        Err(_) => Err(LinkError::Timeout(HANDSHAKE_TIMEOUT)),
        Ok(None) => Err(LinkError::Closed),
        Ok(Some(frame)) => Ok(frame?),
    }
}

/// Client side: preface, hello, and the agent's welcome.
pub async fn client_handshake<S>(
    stream: S,
    hello: Hello,
) -> Result<(FramedLink<S>, Welcome), LinkError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut link = exchange_preface(stream).await?;
    link.send(Frame {
        seq: 0,
        ack: 0,
        body: Some(Body::Hello(hello)),
    })
    .await?;
    let frame = next_frame(&mut link).await?;
    match frame.body {
        Some(Body::Welcome(welcome)) => Ok((link, welcome)),
        Some(Body::Error(error)) => Err(LinkError::Refused(error.message)),
        Some(other) => Err(LinkError::Unexpected(other.kind())),
        None => Err(LinkError::Unexpected("unknown")),
    }
}
