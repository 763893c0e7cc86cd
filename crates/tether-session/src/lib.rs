//! The session between the local proxy and the agent, shared by both ends so they cannot drift.
//!
//! Without features this crate does no IO and needs no runtime (as `quinn-proto` under `quinn`):
//! - [`replay`]: frames sent and not yet acknowledged, what a new link replays;
//! - [`settings`]: keepalive, grace and replay buffer, as negotiated in the hello;
//! - [`flow`]: per-stream credit (the receiver's side; the sender's with `tokio`);
//! - [`http`]: HTTP heads to and from the wire.
//!
//! The `tokio` feature adds what runs: [`link`] (preface and handshake, both sides),
//! [`carrier`] (a session's frames over successive links: numbering, acknowledgements,
//! keepalive, resume) and [`stream`] (the streams' table and the one pump between a stream and
//! a socket).
//!
//! Architecture Invariant: nothing outside the `tokio` feature touches a socket, a clock or a
//! task; what depends on time takes it as an argument.

#[cfg(feature = "tokio")]
pub mod carrier;
pub mod flow;
pub mod http;
#[cfg(feature = "tokio")]
pub mod link;
pub mod replay;
pub mod settings;
#[cfg(feature = "tokio")]
pub mod stream;
