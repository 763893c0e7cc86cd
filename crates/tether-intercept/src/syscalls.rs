//! The system calls the syscall-level interceptor (the seccomp supervisor) is asked about: the
//! ones whose arguments carry a decision of [`policy`](crate::policy) — where a connection or a
//! datagram goes, which listener takes the target's traffic, which paths are the target's, and
//! the addresses the program is shown. Every other call never leaves the kernel.
//!
//! x86_64 numbers.

/// A trapped call: always, or only when one of its pointer arguments is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trapped {
    pub nr: i64,
    /// Trapped only when this argument is not null (`sendto`'s destination, `recvfrom`'s
    /// source buffer: without them the call decides nothing).
    pub when_set: Option<usize>,
}

const fn always(nr: i64) -> Trapped {
    Trapped { nr, when_set: None }
}

/// The trapped calls, as the filter tests them (most frequent first).
pub const TRAPPED: &[Trapped] = &[
    always(libc::SYS_openat),
    always(libc::SYS_newfstatat),
    always(libc::SYS_statx),
    always(libc::SYS_readlinkat),
    always(libc::SYS_faccessat),
    always(libc::SYS_faccessat2),
    always(libc::SYS_connect),
    Trapped {
        nr: libc::SYS_sendto,
        when_set: Some(4),
    },
    Trapped {
        nr: libc::SYS_recvfrom,
        when_set: Some(4),
    },
    always(libc::SYS_sendmsg),
    always(libc::SYS_recvmsg),
    always(libc::SYS_sendmmsg),
    always(libc::SYS_getpeername),
    always(libc::SYS_accept4),
    always(libc::SYS_accept),
    always(libc::SYS_bind),
    always(libc::SYS_listen),
    always(libc::SYS_openat2),
    always(libc::SYS_mkdirat),
    always(libc::SYS_unlinkat),
    always(libc::SYS_renameat),
    always(libc::SYS_renameat2),
    always(libc::SYS_open),
    always(libc::SYS_mkdir),
    always(libc::SYS_rmdir),
    always(libc::SYS_unlink),
    always(libc::SYS_rename),
    always(libc::SYS_stat),
    always(libc::SYS_lstat),
    always(libc::SYS_access),
    always(libc::SYS_readlink),
];

/// [`TRAPPED`] as the filter takes it: `(number, argument that must be set)`.
pub fn filter_spec() -> Vec<(i64, Option<usize>)> {
    TRAPPED
        .iter()
        .map(|call| (call.nr, call.when_set))
        .collect()
}
