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

/// What the agent knows of its session token: only its SHA-256. An agent pod is given the
/// digest in its spec, so whoever can read the pod (or the Job) cannot present the token.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenDigest([u8; 32]);

impl TokenDigest {
    /// The digest of `token` (as the client presents it).
    pub fn of(token: &str) -> TokenDigest {
        use sha2::Digest as _;
        TokenDigest(sha2::Sha256::digest(token.as_bytes()).into())
    }

    /// Parses 64 hex digits.
    pub fn from_hex(hex: &str) -> Option<TokenDigest> {
        let hex = hex.trim().as_bytes();
        if hex.len() != 64 {
            return None;
        }
        let mut digest = [0u8; 32];
        for (byte, pair) in digest.iter_mut().zip(hex.chunks_exact(2)) {
            let pair = std::str::from_utf8(pair).ok()?;
            *byte = u8::from_str_radix(pair, 16).ok()?;
        }
        Some(TokenDigest(digest))
    }

    /// 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenDigest({})", self.to_hex())
    }
}

/// Checks the client's hello against the agent's token digest, in constant time.
pub fn check_hello(hello: &Hello, expected: &TokenDigest) -> Result<(), HandshakeError> {
    if hello.token.is_empty() {
        return Err(HandshakeError::MissingToken);
    }
    if bool::from(TokenDigest::of(&hello.token).0.ct_eq(&expected.0)) {
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
