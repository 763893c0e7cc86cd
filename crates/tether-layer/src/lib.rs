//! tether's preloaded library (`LD_PRELOAD`): interposes the libc calls of the local process and
//! forwards what must happen in the target to the local proxy.
//!
//! Empty until the exec issue lands. Architecture Invariant: unsafe code lives only here and in the
//! agent's `sys` module, every block with a `SAFETY:` comment.
