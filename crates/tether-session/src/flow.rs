//! Per-stream flow control, shared by the agent and the local proxy.
//!
//! A sender may have at most [`INITIAL_STREAM_WINDOW`] unacknowledged bytes in flight on a
//! stream; the receiver grants more with `WindowUpdate` as it writes bytes to its socket. So a
//! slow reader at one end slows the writer at the other end, through TCP's own backpressure on
//! both sockets, and nothing in between buffers more than a window per stream.

use tether_protocol::INITIAL_STREAM_WINDOW;

#[cfg(feature = "tokio")]
pub use send::SendWindow;

#[cfg(feature = "tokio")]
mod send {
    use std::sync::Mutex;

    use tether_protocol::INITIAL_STREAM_WINDOW;
    use tokio::sync::Notify;

    /// The credit a sender has on one stream.
    #[derive(Debug)]
    pub struct SendWindow {
        credit: Mutex<u64>,
        granted: Notify,
    }

    impl Default for SendWindow {
        fn default() -> Self {
            SendWindow {
                credit: Mutex::new(u64::from(INITIAL_STREAM_WINDOW)),
                granted: Notify::new(),
            }
        }
    }

    impl SendWindow {
        /// Waits for credit and takes up to `max` bytes of it.
        pub async fn reserve(&self, max: usize) -> usize {
            loop {
                {
                    let mut credit = self.credit.lock().expect("window lock");
                    if *credit > 0 {
                        let taken = (*credit).min(max as u64);
                        *credit -= taken;
                        return taken as usize;
                    }
                }
                // `notify_one` keeps a permit when nobody waits, so a grant between the check above
                // and this wait is not lost.
                self.granted.notified().await;
            }
        }

        /// Gives back credit: granted by the peer, or reserved and not used.
        pub fn grant(&self, bytes: u64) {
            *self.credit.lock().expect("window lock") += bytes;
            self.granted.notify_one();
        }
    }
}

/// Counts the bytes a receiver wrote out, and says when to grant them back to the sender.
#[derive(Debug, Default)]
pub struct RecvCredit {
    consumed: u32,
}

impl RecvCredit {
    /// Records `bytes` written; `Some(increment)` when a `WindowUpdate` is due (every half window).
    pub fn consumed(&mut self, bytes: usize) -> Option<u32> {
        self.consumed = self.consumed.saturating_add(bytes as u32);
        (self.consumed >= INITIAL_STREAM_WINDOW / 2).then(|| std::mem::take(&mut self.consumed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "tokio")]
    #[tokio::test]
    async fn a_sender_stops_at_the_window_and_resumes_on_a_grant() {
        use std::{sync::Arc, time::Duration};

        let window = Arc::new(SendWindow::default());
        let mut sent = 0;
        while sent < INITIAL_STREAM_WINDOW as usize {
            sent += window.reserve(64 * 1024).await;
        }
        let blocked = tokio::time::timeout(Duration::from_millis(50), window.reserve(1)).await;
        assert!(blocked.is_err(), "no credit left: the sender must wait");
        let waiter = tokio::spawn({
            let window = Arc::clone(&window);
            async move { window.reserve(64 * 1024).await }
        });
        window.grant(1000);
        assert_eq!(waiter.await.unwrap(), 1000);
    }

    /// A sender and a slow receiver joined by the window only: the bytes in flight never exceed
    /// the window, and every byte arrives.
    #[cfg(feature = "tokio")]
    #[tokio::test(start_paused = true)]
    async fn in_flight_bytes_stay_within_the_window_and_all_arrive() {
        use std::sync::Arc;

        let window = Arc::new(SendWindow::default());
        let (wire, mut arrived) = tokio::sync::mpsc::unbounded_channel::<usize>();
        const TOTAL: usize = 5 << 20;
        let sender = tokio::spawn({
            let window = Arc::clone(&window);
            async move {
                let mut sent = 0;
                while sent < TOTAL {
                    let n = window.reserve((TOTAL - sent).min(48 * 1024)).await;
                    wire.send(n).unwrap();
                    sent += n;
                }
            }
        });
        let (mut received, mut in_flight, mut most) = (0, 0usize, 0usize);
        let mut credit = RecvCredit::default();
        while received < TOTAL {
            // Everything the sender could send is queued before the receiver takes one chunk.
            tokio::task::yield_now().await;
            while let Ok(n) = arrived.try_recv() {
                in_flight += n;
            }
            most = most.max(in_flight);
            let Some(n) = (in_flight > 0).then_some(in_flight.min(10_000)) else {
                continue;
            };
            in_flight -= n;
            received += n;
            if let Some(increment) = credit.consumed(n) {
                window.grant(u64::from(increment));
            }
        }
        sender.await.unwrap();
        assert_eq!(received, TOTAL);
        assert!(
            most <= INITIAL_STREAM_WINDOW as usize,
            "{most} bytes in flight"
        );
        assert!(
            most > INITIAL_STREAM_WINDOW as usize / 2,
            "the window was used: {most}"
        );
    }

    #[test]
    fn the_receiver_grants_every_half_window() {
        let mut credit = RecvCredit::default();
        assert_eq!(credit.consumed(100), None);
        let half = (INITIAL_STREAM_WINDOW / 2) as usize;
        assert_eq!(credit.consumed(half), Some(half as u32 + 100));
        assert_eq!(credit.consumed(1), None);
    }
}
