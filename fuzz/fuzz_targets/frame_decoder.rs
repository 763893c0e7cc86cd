//! Bytes from the network: a preface, then frames, fed in arbitrary chunk sizes (as reads return
//! them). Nothing may panic, and the buffer never grows past one maximum-sized frame.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tether_protocol::{MAX_FRAME_LEN, PREFACE_LEN, Preface, decode_frame};

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else { return };
    let chunk = usize::from(chunk.max(1));
    let _ = Preface::decode(&rest[..rest.len().min(PREFACE_LEN)]);
    let mut buf = BytesMut::new();
    for piece in rest.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match decode_frame(&mut buf) {
                Ok(Some(frame)) => {
                    let _ = frame.body.as_ref().map(|b| (b.kind(), b.is_link_local()));
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(buf.capacity() <= MAX_FRAME_LEN + 4 + rest.len());
    }
});
