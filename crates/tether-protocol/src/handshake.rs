//! The agent's side of the handshake, without IO: is this [`Hello`] allowed in?

use subtle::ConstantTimeEq;

use crate::{Body, ErrorCode, ErrorInfo, Frame, Hello, PrefaceError};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("no session token was presented; the agent only serves authenticated sessions")]
    MissingToken,
    #[error("the session token is wrong; the agent only serves the session it was started for")]
    WrongToken,
    #[error("the first frame must be a hello, got {0}")]
    NotHello(&'static str),
    #[error(transparent)]
    Preface(#[from] PrefaceError),
}

impl HandshakeError {
    pub fn code(&self) -> ErrorCode {
        match self {
            HandshakeError::MissingToken | HandshakeError::WrongToken => ErrorCode::Unauthorized,
            HandshakeError::NotHello(_)
            | HandshakeError::Preface(PrefaceError::BadMagic { .. }) => ErrorCode::BadRequest,
            HandshakeError::Preface(PrefaceError::VersionMismatch { .. }) => {
                ErrorCode::VersionMismatch
            }
        }
    }
}

/// Checks the client's hello against the agent's token, in constant time.
pub fn check_hello(hello: &Hello, token: &str) -> Result<(), HandshakeError> {
    if hello.token.is_empty() {
        return Err(HandshakeError::MissingToken);
    }
    if bool::from(hello.token.as_bytes().ct_eq(token.as_bytes())) {
        Ok(())
    } else {
        Err(HandshakeError::WrongToken)
    }
}

/// The error frame the agent sends before closing a link whose handshake failed.
pub fn hello_error(error: &HandshakeError) -> Frame {
    Frame {
        seq: 0,
        ack: 0,
        body: Some(Body::Error(ErrorInfo {
            code: error.code() as i32,
            message: error.to_string(),
            in_reply_to_seq: 0,
            errno: 0,
        })),
    }
}
