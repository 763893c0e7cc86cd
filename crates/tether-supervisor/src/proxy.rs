//! The supervisor's channels to the local proxy: the same protocol the preloaded layer speaks
//! (the proxy cannot tell the two apart), one channel per request in flight, kept for reuse.

use std::{path::PathBuf, sync::Mutex};

use prost::Message as _;
use tether_intercept::channel::{Answer, AskError, Channel, Request};
use tether_protocol::{FsRequest, FsResponse, fs_request, fs_response};

#[derive(Debug)]
pub(crate) struct Proxy {
    socket: PathBuf,
    idle: Mutex<Vec<Channel>>,
}

/// Idle channels kept beyond this many are closed.
const KEEP_IDLE: usize = 8;

impl Proxy {
    pub(crate) fn new(socket: PathBuf) -> Proxy {
        Proxy {
            socket,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Asks once; a request that never reached the proxy (a stale idle channel) is sent again on
    /// a new channel, one whose answer was lost is not.
    pub(crate) fn ask_with(
        &self,
        request: &Request,
        payload: &[u8],
    ) -> std::io::Result<(Answer, Vec<u8>)> {
        let taken = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        let mut channel = match taken {
            Some(channel) => channel,
            None => Channel::connect(&self.socket)?,
        };
        let answer = match channel.ask_with(request, payload) {
            Ok(answer) => answer,
            Err(AskError::NotSent(_)) => {
                channel = Channel::connect(&self.socket)?;
                channel.ask_with(request, payload).map_err(|e| match e {
                    AskError::NotSent(e) | AskError::Lost(e) => e,
                })?
            }
            Err(AskError::Lost(e)) => return Err(e),
        };
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.len() < KEEP_IDLE {
            idle.push(channel);
        }
        Ok(answer)
    }

    pub(crate) fn ask(&self, request: &Request) -> std::io::Result<Answer> {
        self.ask_with(request, &[]).map(|(answer, _)| answer)
    }

    /// Runs one file operation in the target; `Err(errno)` as the program should see it.
    pub(crate) fn fs(&self, op: fs_request::Op) -> Result<fs_response::Result, i32> {
        let payload = FsRequest { op: Some(op) }.encode_to_vec();
        let (answer, payload) = self
            .ask_with(&Request::Fs { len: payload.len() }, &payload)
            .map_err(|_| libc::EIO)?;
        match answer {
            Answer::Fs { .. } => FsResponse::decode(payload.as_slice())
                .ok()
                .and_then(|r| r.result)
                .ok_or(libc::EIO),
            Answer::Errno { errno, .. } => Err(errno),
            _ => Err(libc::EIO),
        }
    }
}
