//! The host's kernel, as every part of tether reads it.
//!
//! - [`process`]: whether a process lives (a zombie does not).
//! - [`seccomp`]: seccomp user notification, `pidfd_getfd`, the kernel's `stat` layouts: what
//!   the syscall supervisor needs and no safe crate wraps.
//!
//! Architecture Invariant: outside the preloaded layer's hooks, this is the one crate where
//! `unsafe` is allowed, and only in [`seccomp`], with a `SAFETY:` comment per block.

pub mod process;
pub mod seccomp;
