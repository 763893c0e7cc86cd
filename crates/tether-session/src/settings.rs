//! How a session lives through link trouble: keepalive, grace, replay buffer. Pure values.

use std::time::Duration;

use tether_protocol::LinkOptions;

/// The most replay buffer a peer may ask this side to keep.
pub const MAX_BUFFER: usize = 1 << 30;

/// How a session lives through link trouble. Both sides use the client's settings (sent in
/// [`Hello::link`](tether_protocol::Hello::link)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// How long the session waits for a new link; `None`: it ends with its link (no resume).
    pub grace: Option<Duration>,
    /// Bytes of unacknowledged frames kept for replay, at most.
    pub buffer: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(15),
            grace: None,
            buffer: 64 << 20,
        }
    }
}

impl Settings {
    /// The settings a client asked for; zero fields take the defaults, and a hello without
    /// link options gets a session that ends with its link.
    pub fn from_options(options: Option<&LinkOptions>) -> Settings {
        let default = Settings::default();
        let Some(options) = options else {
            return default;
        };
        let millis = |ms: u64, default: Duration| {
            if ms == 0 {
                default
            } else {
                Duration::from_millis(ms)
            }
        };
        Settings {
            keepalive_interval: millis(options.keepalive_interval_ms, default.keepalive_interval),
            keepalive_timeout: millis(options.keepalive_timeout_ms, default.keepalive_timeout),
            grace: (options.grace_ms > 0).then(|| Duration::from_millis(options.grace_ms)),
            // The client chooses, within what this side is willing to hold.
            buffer: if options.buffer_bytes == 0 {
                default.buffer
            } else {
                usize::try_from(options.buffer_bytes)
                    .unwrap_or(usize::MAX)
                    .min(MAX_BUFFER)
            },
        }
    }

    pub fn to_options(self) -> LinkOptions {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        LinkOptions {
            keepalive_interval_ms: ms(self.keepalive_interval),
            keepalive_timeout_ms: ms(self.keepalive_timeout),
            grace_ms: self.grace.map_or(0, ms),
            buffer_bytes: self.buffer as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_round_trip_through_the_hello() {
        let settings = Settings {
            keepalive_interval: Duration::from_millis(250),
            keepalive_timeout: Duration::from_secs(2),
            grace: Some(Duration::from_secs(30)),
            buffer: 1 << 20,
        };
        assert_eq!(
            Settings::from_options(Some(&settings.to_options())),
            settings
        );
        assert_eq!(Settings::from_options(None).grace, None);
        let zeros = LinkOptions::default();
        assert_eq!(Settings::from_options(Some(&zeros)), Settings::default());
    }
}
