//! Frames on the wire: `[u32 big-endian payload length][protobuf Frame]`.
//!
//! The decoder never guesses: a length above [`MAX_FRAME_LEN`](crate::MAX_FRAME_LEN) or a payload
//! that is not a valid [`Frame`] is an error, after which the link must be closed (the byte stream
//! has no resynchronisation point). Memory is reserved only for lengths within the cap.

use bytes::{Buf, BufMut, BytesMut};
use prost::Message;

use crate::{
    Body, Frame, HttpFilter, MAX_FILTER_DEPTH, MAX_FRAME_LEN, http_filter::Rule, request::Op,
};

const LEN_PREFIX: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed frame of {len} bytes")]
    Malformed {
        len: usize,
        #[source]
        source: prost::DecodeError,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error(
        "frame of {len} bytes exceeds the limit of {max} bytes; split the data into smaller chunks"
    )]
    TooLarge { len: usize, max: usize },
    #[error("HTTP filter nested {depth} levels deep; the limit is {max}")]
    FilterTooDeep { depth: usize, max: usize },
}

/// Appends `frame` to `dst`, length prefix first.
pub fn encode_frame(frame: &Frame, dst: &mut BytesMut) -> Result<(), EncodeError> {
    // The decoder refuses messages nested deeper than protobuf's recursion limit; refuse them here
    // first, so a peer never sends what the other side must reject (found by fuzzing).
    if let Some(Body::Request(request)) = &frame.body
        && let Some(Op::PortSubscribe(subscribe)) = &request.op
        && let Some(filter) = &subscribe.http_filter
    {
        let depth = filter_depth(filter);
        if depth > MAX_FILTER_DEPTH {
            return Err(EncodeError::FilterTooDeep {
                depth,
                max: MAX_FILTER_DEPTH,
            });
        }
    }
    let len = frame.encoded_len();
    if len > MAX_FRAME_LEN {
        return Err(EncodeError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    dst.reserve(LEN_PREFIX + len);
    // `len <= MAX_FRAME_LEN`, which fits in a u32.
    dst.put_u32(len as u32);
    frame.encode_raw(dst);
    Ok(())
}

/// Levels of `all_of`/`any_of` nesting, counting the filter itself.
fn filter_depth(filter: &HttpFilter) -> usize {
    match &filter.rule {
        Some(Rule::AllOf(list) | Rule::AnyOf(list)) => {
            1 + list.filters.iter().map(filter_depth).max().unwrap_or(0)
        }
        _ => 1,
    }
}

/// Takes one whole frame from the front of `src`. `Ok(None)`: not enough bytes yet (`src` keeps
/// them, with room reserved for the rest of the frame).
pub fn decode_frame(src: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
    let Some(prefix) = src.get(..LEN_PREFIX) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(DecodeError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    if src.len() < LEN_PREFIX + len {
        src.reserve(LEN_PREFIX + len - src.len());
        return Ok(None);
    }
    src.advance(LEN_PREFIX);
    // `freeze` lets `bytes` fields of the frame point into this buffer instead of copying.
    let payload = src.split_to(len).freeze();
    Frame::decode(payload)
        .map(Some)
        .map_err(|source| DecodeError::Malformed { len, source })
}

/// `tokio_util::codec` adapter over [`encode_frame`] / [`decode_frame`]. It handles frames only;
/// the preface is read and written before the codec takes over the stream.
#[cfg(feature = "codec")]
#[derive(Debug, Default, Clone, Copy)]
pub struct FrameCodec;

#[cfg(feature = "codec")]
impl tokio_util::codec::Decoder for FrameCodec {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, std::io::Error> {
        decode_frame(src).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}

#[cfg(feature = "codec")]
impl tokio_util::codec::Encoder<Frame> for FrameCodec {
    type Error = std::io::Error;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        encode_frame(&frame, dst)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    }
}
