//! Per-stream flow control, shared by the agent and the local proxy.
//!
//! A sender may have at most a window of unacknowledged bytes in flight on a stream; the receiver
//! grants more with `WindowUpdate` as it writes bytes to its socket. So a slow reader at one end
//! slows the writer at the other end, through TCP's own backpressure on both sockets, and nothing
//! in between buffers more than a window per stream.
//!
//! Every window starts at [`INITIAL_STREAM_WINDOW`]. A window caps a stream at window ÷ round
//! trip, so on a long link the receiver grows it (as HTTP/2 implementations auto-tune): when the
//! sender used half the window within one round trip — it was waiting for credit, not for the
//! receiver — the window doubles, up to [`MAX_STREAM_WINDOW`], out of a budget the session's
//! streams share ([`Tuning`]). A receiver that writes slowly grants slowly, and its window never
//! grows. The sender needs nothing new: growth is just a larger `WindowUpdate`.
//!
//! Time is an argument here (`now`), never read: the caller's clock decides.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tether_protocol::INITIAL_STREAM_WINDOW;

/// The largest window one stream grows to.
pub const MAX_STREAM_WINDOW: u32 = 16 << 20;

/// Below this round trip windows stay as they start: the initial window already carries a
/// stream at hundreds of MB/s there (loopback, a LAN, inside a cluster), and a grown one would
/// only hold more of the sender's memory (its replay buffer keeps what is in flight).
pub const MIN_TUNED_RTT: Duration = Duration::from_millis(1);

/// What a session's grown windows may add up to beyond their initial windows, together (and at
/// most half the session's replay buffer: a sender keeps what it sent until it is acknowledged,
/// and a window bigger than that buffer would stall the whole session on it, see
/// [`session_budget`]).
pub const SESSION_WINDOW_BUDGET: u64 = 64 << 20;

/// The growth budget of a session whose replay buffer holds `replay_buffer` bytes.
pub fn session_budget(replay_buffer: usize) -> u64 {
    SESSION_WINDOW_BUDGET.min(replay_buffer as u64 / 2)
}

/// What the receivers of one session share to grow their windows: the link's round trip, as the
/// carrier last measured it, and the memory budget.
#[derive(Debug)]
pub struct Tuning {
    /// Microseconds; 0 while unknown.
    rtt_micros: Arc<AtomicU64>,
    /// Bytes of growth left.
    budget: AtomicU64,
}

impl Tuning {
    /// `rtt_micros`: the carrier's measurement (`Carrier::rtt_micros`), shared.
    pub fn new(rtt_micros: Arc<AtomicU64>, budget: u64) -> Tuning {
        Tuning {
            rtt_micros,
            budget: AtomicU64::new(budget),
        }
    }

    fn rtt(&self) -> Option<Duration> {
        match self.rtt_micros.load(Ordering::Relaxed) {
            0 => None,
            micros => Some(Duration::from_micros(micros)),
        }
    }

    /// Takes up to `want` bytes of the budget; how many it got.
    fn take(&self, want: u64) -> u64 {
        let mut taken = 0;
        let _ = self
            .budget
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                taken = left.min(want);
                Some(left - taken)
            });
        taken
    }

    fn give(&self, bytes: u64) {
        self.budget.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Bytes of growth left to the session.
    pub fn budget_left(&self) -> u64 {
        self.budget.load(Ordering::Acquire)
    }
}

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

/// Counts the bytes a receiver wrote out, and says when to grant them back to the sender (and
/// how much more, when the window grows).
#[derive(Debug)]
pub struct RecvCredit {
    /// The window the sender has now.
    window: u32,
    consumed: u32,
    /// When the last `WindowUpdate` was due.
    last_grant: Option<Instant>,
    /// `None`: the window never grows.
    tuning: Option<Arc<Tuning>>,
}

impl Default for RecvCredit {
    fn default() -> Self {
        RecvCredit {
            window: INITIAL_STREAM_WINDOW,
            consumed: 0,
            last_grant: None,
            tuning: None,
        }
    }
}

impl RecvCredit {
    /// A receiver whose window grows with the link, within the session's budget.
    pub fn tuned(tuning: Arc<Tuning>) -> RecvCredit {
        RecvCredit {
            tuning: Some(tuning),
            ..RecvCredit::default()
        }
    }

    /// The window the sender has now.
    pub fn window(&self) -> u32 {
        self.window
    }

    /// Records `bytes` written at `now`; `Some(increment)` when a `WindowUpdate` is due (every
    /// half window): what was written, plus the window's growth.
    pub fn consumed(&mut self, bytes: usize, now: Instant) -> Option<u32> {
        self.consumed = self
            .consumed
            .saturating_add(u32::try_from(bytes).unwrap_or(u32::MAX));
        if self.consumed < self.window / 2 {
            return None;
        }
        let mut increment = std::mem::take(&mut self.consumed);
        if let Some(tuning) = &self.tuning {
            let window_limited = match (self.last_grant, tuning.rtt()) {
                (Some(last), Some(rtt)) if rtt >= MIN_TUNED_RTT => {
                    now.saturating_duration_since(last) < rtt
                }
                _ => false,
            };
            if window_limited && self.window < MAX_STREAM_WINDOW {
                let want = self.window.min(MAX_STREAM_WINDOW - self.window);
                let grown = tuning.take(u64::from(want)) as u32;
                self.window += grown;
                increment += grown;
            }
            self.last_grant = Some(now);
        }
        Some(increment)
    }
}

/// A stream's growth goes back to its session when the stream ends.
impl Drop for RecvCredit {
    fn drop(&mut self) {
        if let Some(tuning) = &self.tuning {
            tuning.give(u64::from(self.window - INITIAL_STREAM_WINDOW));
        }
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
            if let Some(increment) = credit.consumed(n, Instant::now()) {
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
        let now = Instant::now();
        assert_eq!(credit.consumed(100, now), None);
        let half = (INITIAL_STREAM_WINDOW / 2) as usize;
        assert_eq!(credit.consumed(half, now), Some(half as u32 + 100));
        assert_eq!(credit.consumed(1, now), None);
    }

    fn tuning(rtt: Duration, budget: u64) -> Arc<Tuning> {
        let micros = Arc::new(AtomicU64::new(rtt.as_micros() as u64));
        Arc::new(Tuning::new(micros, budget))
    }

    /// Consumes half the current window at `now`; the grant.
    fn half(credit: &mut RecvCredit, now: Instant) -> u32 {
        let half = (credit.window() / 2) as usize;
        credit.consumed(half, now).expect("a grant is due")
    }

    #[test]
    fn a_window_the_sender_uses_within_a_round_trip_doubles_up_to_its_cap() {
        let tuning = tuning(Duration::from_millis(30), SESSION_WINDOW_BUDGET);
        let mut credit = RecvCredit::tuned(Arc::clone(&tuning));
        let start = Instant::now();
        let initial = INITIAL_STREAM_WINDOW;
        // The first grant only starts the clock.
        assert_eq!(half(&mut credit, start), initial / 2);
        assert_eq!(credit.window(), initial);
        // Half a window again 5 ms later: the sender was waiting for credit.
        assert_eq!(
            half(&mut credit, start + Duration::from_millis(5)),
            initial / 2 + initial
        );
        assert_eq!(credit.window(), 2 * initial);
        let mut at = start + Duration::from_millis(5);
        for _ in 0..20 {
            at += Duration::from_millis(5);
            half(&mut credit, at);
        }
        assert_eq!(credit.window(), MAX_STREAM_WINDOW, "it stops at its cap");
        assert_eq!(
            tuning.budget_left(),
            SESSION_WINDOW_BUDGET - u64::from(MAX_STREAM_WINDOW - initial)
        );
        drop(credit);
        assert_eq!(
            tuning.budget_left(),
            SESSION_WINDOW_BUDGET,
            "its growth went back"
        );
    }

    #[test]
    fn a_receiver_slower_than_the_round_trip_never_grows_its_window() {
        let mut credit =
            RecvCredit::tuned(tuning(Duration::from_millis(30), SESSION_WINDOW_BUDGET));
        let mut at = Instant::now();
        for _ in 0..50 {
            at += Duration::from_millis(40);
            assert_eq!(half(&mut credit, at), INITIAL_STREAM_WINDOW / 2);
        }
        assert_eq!(credit.window(), INITIAL_STREAM_WINDOW);
        // On a short link (under MIN_TUNED_RTT) the initial window is enough.
        let mut near = RecvCredit::tuned(tuning(Duration::from_micros(300), SESSION_WINDOW_BUDGET));
        let start = Instant::now();
        half(&mut near, start);
        half(&mut near, start + Duration::from_micros(10));
        assert_eq!(near.window(), INITIAL_STREAM_WINDOW);
        // Without a measured round trip nothing grows either.
        let unknown = Arc::new(Tuning::new(
            Arc::new(AtomicU64::new(0)),
            SESSION_WINDOW_BUDGET,
        ));
        let mut blind = RecvCredit::tuned(unknown);
        let start = Instant::now();
        half(&mut blind, start);
        half(&mut blind, start + Duration::from_micros(1));
        assert_eq!(blind.window(), INITIAL_STREAM_WINDOW);
    }

    #[test]
    fn the_session_budget_bounds_every_stream_s_growth_together() {
        let budget = u64::from(INITIAL_STREAM_WINDOW) + 1000;
        let tuning = tuning(Duration::from_millis(30), budget);
        let (mut one, mut two) = (
            RecvCredit::tuned(Arc::clone(&tuning)),
            RecvCredit::tuned(Arc::clone(&tuning)),
        );
        let start = Instant::now();
        for credit in [&mut one, &mut two] {
            half(credit, start);
            half(credit, start + Duration::from_millis(1));
        }
        assert_eq!(one.window(), 2 * INITIAL_STREAM_WINDOW);
        assert_eq!(
            two.window(),
            INITIAL_STREAM_WINDOW + 1000,
            "only what was left"
        );
        assert_eq!(tuning.budget_left(), 0);
        drop(one);
        assert_eq!(tuning.budget_left(), u64::from(INITIAL_STREAM_WINDOW));
    }

    /// One stream over a simulated link with a 30 ms round trip (tokio's paused clock: the delays
    /// are the link's, no real time passes): bytes delivered in 2 s, and the most in flight.
    #[cfg(feature = "tokio")]
    async fn over_a_long_link(tuned: bool, receiver_bytes_per_s: Option<u64>) -> (u64, u64) {
        use tokio::time::{Instant as Clock, sleep, sleep_until};

        const ONE_WAY: Duration = Duration::from_millis(15);
        let rtt = Arc::new(AtomicU64::new((2 * ONE_WAY).as_micros() as u64));
        let window = Arc::new(SendWindow::default());
        let (data_tx, mut data_rx) = tokio::sync::mpsc::unbounded_channel::<(Clock, u64)>();
        let (grant_tx, mut grant_rx) = tokio::sync::mpsc::unbounded_channel::<(Clock, u32)>();
        let in_flight = Arc::new(AtomicU64::new(0));
        let most = Arc::new(AtomicU64::new(0));
        let sender = tokio::spawn({
            let (window, in_flight, most) = (
                Arc::clone(&window),
                Arc::clone(&in_flight),
                Arc::clone(&most),
            );
            async move {
                loop {
                    let n = window.reserve(64 * 1024).await as u64;
                    let now = in_flight.fetch_add(n, Ordering::Relaxed) + n;
                    most.fetch_max(now, Ordering::Relaxed);
                    if data_tx.send((Clock::now() + ONE_WAY, n)).is_err() {
                        return;
                    }
                }
            }
        });
        let granter = tokio::spawn({
            let window = Arc::clone(&window);
            async move {
                while let Some((at, increment)) = grant_rx.recv().await {
                    sleep_until(at).await;
                    window.grant(u64::from(increment));
                }
            }
        });
        let mut credit = if tuned {
            RecvCredit::tuned(Arc::new(Tuning::new(rtt, SESSION_WINDOW_BUDGET)))
        } else {
            RecvCredit::default()
        };
        let end = Clock::now() + Duration::from_secs(2);
        let mut delivered = 0;
        while let Some((at, n)) = data_rx.recv().await {
            sleep_until(at).await;
            if let Some(rate) = receiver_bytes_per_s {
                sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
            }
            if Clock::now() >= end {
                break;
            }
            delivered += n;
            in_flight.fetch_sub(n, Ordering::Relaxed);
            if let Some(increment) = credit.consumed(n as usize, Clock::now().into_std()) {
                let _ = grant_tx.send((Clock::now() + ONE_WAY, increment));
            }
        }
        sender.abort();
        granter.abort();
        (delivered, most.load(Ordering::Relaxed))
    }

    #[cfg(feature = "tokio")]
    #[tokio::test(start_paused = true)]
    async fn a_grown_window_lets_one_stream_fill_a_long_link() {
        let (fixed, _) = over_a_long_link(false, None).await;
        let (grown, _) = over_a_long_link(true, None).await;
        println!("2 s over a 30 ms round trip: fixed window {fixed} B, grown window {grown} B");
        // A fixed window caps the stream at window ÷ round trip (256 KiB / 30 ms ≈ 8.7 MB/s).
        let cap = 2 * u64::from(INITIAL_STREAM_WINDOW) * 1000 / 30;
        assert!(
            fixed <= cap + u64::from(INITIAL_STREAM_WINDOW),
            "{fixed} ≤ {cap}"
        );
        assert!(
            grown >= 20 * fixed,
            "grown {grown} B vs fixed {fixed} B in 2 s"
        );
    }

    #[cfg(feature = "tokio")]
    #[tokio::test(start_paused = true)]
    async fn a_slow_receiver_still_holds_its_sender_to_the_initial_window() {
        // 1 MB/s: far below what the window allows over 30 ms.
        let (delivered, most) = over_a_long_link(true, Some(1_000_000)).await;
        assert!(
            most <= u64::from(INITIAL_STREAM_WINDOW),
            "{most} bytes in flight"
        );
        assert!(delivered <= 2_100_000, "{delivered}");
    }
}
