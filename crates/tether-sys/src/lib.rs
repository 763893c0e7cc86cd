//! The host's kernel, as every part of tether reads it.
//!
//! - [`process`]: whether a process lives (a zombie does not).
//!
//! Architecture Invariant: outside the preloaded layer's hooks, this is the one crate where
//! `unsafe` may ever be allowed (for system calls no safe crate wraps), in a module of its own
//! with a `SAFETY:` comment per block. Today it holds none.

pub mod process;
