//! What tether decides for an intercepted program, apart from how the program was intercepted.
//!
//! The preloaded layer (`tether-layer`, libc hooks) and the syscall supervisor
//! (`tether-supervisor`, seccomp user notification) carry out the same decisions. The local proxy (the `tether` binary)
//! answers the channel. Neither end has to link the other: the `tether` binary depends on this
//! crate, never on the preloaded library.
//!
//! - [`channel`]: the interceptor ↔ proxy protocol (one JSON line per message, a binary payload
//!   for file operations) and its blocking client.
//! - [`policy`]: what stays local and what goes to the target — files by path, outgoing traffic by
//!   destination, names by name.
//! - [`plan`]: one file operation decided from what the program asked (`open` flags, `fopen`
//!   modes, `rename`, `lseek`) — the interceptor carries the plan out.
//! - [`program`]: whether the preloaded layer can reach an executable at all.
//! - [`syscalls`]: which system calls the syscall-level interceptor decides on.
//! - [`stat`]: the target's file metadata as Linux's `struct stat` / `struct statx`.
//!
//! Architecture Invariant: no `unsafe` here (the workspace forbids it); what needs the process's
//! memory or libc's symbols lives in the interceptor.

pub mod channel;
pub mod plan;
pub mod policy;
pub mod program;
pub mod stat;
pub mod syscalls;
