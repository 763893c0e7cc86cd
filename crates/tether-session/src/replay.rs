//! The frames a session sent and the peer has not acknowledged yet: what a new link replays.
//! Pure state, no IO.

use std::collections::VecDeque;

use tether_protocol::{Body, Frame};

/// Frames sent and not yet acknowledged, oldest first.
#[derive(Debug, Default)]
pub struct Replay {
    frames: VecDeque<(u64, Body, usize)>,
    bytes: usize,
    /// The last `seq` handed out.
    last: u64,
    /// The highest `seq` the peer acknowledged.
    acked: u64,
}

/// Why a resume cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    #[error(
        "the peer asks to resume after frame {asked}, but frames up to {acked} were acknowledged and dropped"
    )]
    AlreadyDropped { asked: u64, acked: u64 },
    #[error("the peer claims frame {asked}, but only {last} were sent")]
    NeverSent { asked: u64, last: u64 },
}

impl Replay {
    /// Numbers `body` and, when `keep`, keeps it for replay. Returns its `seq`.
    pub fn push(&mut self, body: &Body, keep: bool) -> u64 {
        self.last += 1;
        if keep {
            let size = body_size(body);
            self.bytes += size;
            self.frames.push_back((self.last, body.clone(), size));
        }
        self.last
    }

    /// Drops what the peer acknowledged. True when anything was dropped.
    pub fn ack(&mut self, upto: u64) -> bool {
        let upto = upto.min(self.last);
        if upto <= self.acked {
            return false;
        }
        self.acked = upto;
        let mut dropped = false;
        while let Some((seq, _, size)) = self.frames.front() {
            if *seq > upto {
                break;
            }
            self.bytes -= size;
            self.frames.pop_front();
            dropped = true;
        }
        dropped
    }

    /// Whether a peer that received up to `received` can be served by [`Replay::after`].
    pub fn check(&self, received: u64) -> Result<(), ReplayError> {
        if received > self.last {
            return Err(ReplayError::NeverSent {
                asked: received,
                last: self.last,
            });
        }
        if received < self.acked {
            return Err(ReplayError::AlreadyDropped {
                asked: received,
                acked: self.acked,
            });
        }
        Ok(())
    }

    /// The kept frames after `received` (what the peer lacks), in order.
    ///
    /// A `received` below what the peer already acknowledged is served from the acknowledgement
    /// (the peer has those frames; it drops duplicates anyway): only [`Replay::check`] refuses it.
    pub fn after(&mut self, received: u64) -> Result<Vec<Frame>, ReplayError> {
        let received = received.max(self.acked);
        self.check(received)?;
        self.ack(received);
        Ok(self
            .frames
            .iter()
            .map(|(seq, body, _)| Frame {
                seq: *seq,
                ack: 0,
                body: Some(body.clone()),
            })
            .collect())
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

/// What a kept frame costs: its encoded size plus bookkeeping.
pub(crate) fn body_size(body: &Body) -> usize {
    body.encoded_len() + 32
}

#[cfg(test)]
mod tests {
    use tether_protocol::{StreamData, WindowUpdate};

    use super::*;

    fn data(n: u8) -> Body {
        Body::StreamData(StreamData {
            stream_id: 1,
            data: bytes::Bytes::from(vec![n; 100]),
        })
    }

    #[test]
    fn replay_keeps_what_the_peer_did_not_acknowledge() {
        let mut replay = Replay::default();
        for n in 1..=5 {
            assert_eq!(replay.push(&data(n), true), u64::from(n));
        }
        assert!(replay.ack(2));
        assert!(!replay.ack(2), "an old ack frees nothing");
        let again = replay.after(3).unwrap();
        assert_eq!(
            again.iter().map(|f| f.seq).collect::<Vec<_>>(),
            vec![4, 5],
            "only what the peer lacks, in order"
        );
        assert_eq!(replay.len(), 2);
        assert!(replay.ack(5));
        assert_eq!((replay.len(), replay.bytes()), (0, 0));
    }

    #[test]
    fn replay_refuses_a_resume_it_cannot_serve() {
        let mut replay = Replay::default();
        replay.push(&data(1), true);
        replay.push(&data(2), true);
        replay.ack(2);
        assert_eq!(
            replay.check(1),
            Err(ReplayError::AlreadyDropped { asked: 1, acked: 2 }),
            "a resume older than an acknowledgement is stale"
        );
        assert_eq!(
            replay.after(1),
            Ok(Vec::new()),
            "once accepted, it is served from the acknowledgement"
        );
        assert_eq!(
            replay.check(7),
            Err(ReplayError::NeverSent { asked: 7, last: 2 })
        );
        assert_eq!(
            replay.after(7),
            Err(ReplayError::NeverSent { asked: 7, last: 2 })
        );
    }

    #[test]
    fn replay_counts_bytes_and_ignores_acks_beyond_what_was_sent() {
        let mut replay = Replay::default();
        let update = Body::WindowUpdate(WindowUpdate {
            stream_id: 3,
            increment: 10,
        });
        replay.push(&update, true);
        replay.push(&data(9), false);
        assert_eq!(replay.len(), 1, "a frame not kept is numbered only");
        assert!(replay.bytes() > 0);
        assert!(replay.ack(100));
        assert_eq!(replay.after(2).unwrap(), Vec::new());
    }
}
