//! seccomp user notification (`seccomp_unotify(2)`): the filter a supervised program runs
//! under, and the supervisor's side of its listener.
//!
//! The filter is compiled before `fork` ([`Filter::trapping`]) and installed by the child
//! between `fork` and `execve` ([`Filter::install`], async-signal-safe: no allocation, no lock),
//! which hands the listener to the supervisor ([`Listener::take`], a copy through
//! `pidfd_getfd`) and closes its own. From
//! then on every trapped system call of the program, its threads and its children waits for
//! the supervisor's [`Listener::reply`].
//!
//! Architecture Invariant: everything here is a thin, checked wrapper over one kernel interface;
//! what to do with a call is decided by the supervisor, in safe code.

#![allow(unsafe_code)]

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
};

/// `AUDIT_ARCH_X86_64`: the only architecture the filter traps on (others pass untouched, and
/// [`support`] says the supervisor is unavailable there).
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// System call numbers at or above this are the x32 ABI's.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// A seccomp program that asks the supervisor about the given system calls and lets every other
/// one run.
#[derive(Debug, Clone)]
pub struct Filter {
    program: Vec<libc::sock_filter>,
}

/// Where a filter instruction jumps.
#[derive(Debug, Clone, Copy)]
enum To {
    Next,
    Allow,
    Notify,
    /// The argument check of the `n`th conditional trap.
    Check(usize),
}

impl Filter {
    /// Traps `calls` (x86_64 numbers) for the supervisor: each `(nr, None)` always, each
    /// `(nr, Some(i))` only when argument `i` is not zero (a pointer the decision needs, such as
    /// `sendto`'s destination).
    pub fn trapping(calls: &[(i64, Option<usize>)]) -> Filter {
        const LOAD: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
        const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
        const JGE: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
        const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
        // Offsets in `struct seccomp_data` (little-endian: an argument's low half first).
        const NR: u32 = 0;
        const ARCH: u32 = 4;
        let arg = |i: usize| 16 + 8 * i as u32;
        let mut code: Vec<(u16, u32, To, To)> = vec![
            (LOAD, ARCH, To::Next, To::Next),
            (JEQ, AUDIT_ARCH_X86_64, To::Next, To::Allow),
            (LOAD, NR, To::Next, To::Next),
            (JGE, X32_SYSCALL_BIT, To::Allow, To::Next),
        ];
        let mut checks = Vec::new();
        for &(nr, when_set) in calls {
            let to = match when_set {
                None => To::Notify,
                Some(i) => {
                    checks.push(i);
                    To::Check(checks.len() - 1)
                }
            };
            code.push((JEQ, nr as u32, to, To::Next));
        }
        // Classic BPF jumps only forward: the checks come after the allow the compares fall
        // through to, each with an allow of its own, and the notify comes last.
        let allow = code.len();
        code.push((RET, libc::SECCOMP_RET_ALLOW, To::Next, To::Next));
        let first_check = code.len();
        for &i in &checks {
            code.push((LOAD, arg(i), To::Next, To::Next));
            code.push((JEQ, 0, To::Next, To::Notify));
            code.push((LOAD, arg(i) + 4, To::Next, To::Next));
            code.push((JEQ, 0, To::Next, To::Notify));
            code.push((RET, libc::SECCOMP_RET_ALLOW, To::Next, To::Next));
        }
        let notify = code.len();
        code.push((RET, libc::SECCOMP_RET_USER_NOTIF, To::Next, To::Next));
        let program = code
            .iter()
            .enumerate()
            .map(|(at, &(op, k, jt, jf))| {
                let offset = |to: To| {
                    let target = match to {
                        To::Next => at + 1,
                        To::Allow => allow,
                        To::Notify => notify,
                        To::Check(n) => first_check + 5 * n,
                    };
                    u8::try_from(target - (at + 1)).expect("a filter short enough for 8-bit jumps")
                };
                libc::sock_filter {
                    code: op,
                    jt: offset(jt),
                    jf: offset(jf),
                    k,
                }
            })
            .collect();
        Filter { program }
    }

    /// Installs the filter in the calling process and hands its listener to the supervisor:
    /// writes `[pid, listener fd]` to `report` (a Unix socket), waits for one byte back (the
    /// supervisor has taken a copy with `pidfd_getfd`), then closes its own. Meant for the child
    /// between `fork` and `execve`: it allocates nothing and takes no lock, and it only makes
    /// calls no filter traps (`write`, `read`, `close`). Without `CAP_SYS_ADMIN`, sets
    /// `PR_SET_NO_NEW_PRIVS` first (as the kernel requires).
    pub fn install(&self, report: BorrowedFd<'_>) -> Result<(), InstallError> {
        let program = libc::sock_fprog {
            len: self.program.len() as u16,
            filter: self.program.as_ptr().cast_mut(),
        };
        let seccomp = || {
            // SAFETY: `program` points to `len` valid instructions that outlive the call; the
            // kernel copies them.
            unsafe {
                libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
                    &raw const program,
                )
            }
        };
        let mut listener = seccomp();
        if listener < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EACCES) {
            // SAFETY: a plain prctl with integer arguments.
            if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                return Err(InstallError::Refused(io::Error::last_os_error()));
            }
            listener = seccomp();
        }
        if listener < 0 {
            return Err(InstallError::Refused(io::Error::last_os_error()));
        }
        // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
        let listener = unsafe { OwnedFd::from_raw_fd(listener as RawFd) };
        // SAFETY: getpid cannot fail.
        let pid = unsafe { libc::getpid() } as u32;
        let mut message = [0u8; 8];
        message[..4].copy_from_slice(&pid.to_ne_bytes());
        message[4..].copy_from_slice(&listener.as_raw_fd().to_ne_bytes());
        let interrupted = || io::Error::last_os_error().raw_os_error() == Some(libc::EINTR);
        loop {
            // SAFETY: writes from a live 8-byte buffer.
            let written = unsafe { libc::write(report.as_raw_fd(), message.as_ptr().cast(), 8) };
            match written {
                8 => break,
                -1 if interrupted() => continue,
                -1 => return Err(InstallError::HandOver(io::Error::last_os_error())),
                // A Unix stream socket takes 8 bytes at once unless it is broken.
                _ => {
                    return Err(InstallError::HandOver(io::Error::from_raw_os_error(
                        libc::EPIPE,
                    )));
                }
            }
        }
        let mut ack = [0u8; 1];
        loop {
            // SAFETY: reads into a live 1-byte buffer.
            let read = unsafe { libc::read(report.as_raw_fd(), ack.as_mut_ptr().cast(), 1) };
            match read {
                1 => return Ok(()),
                -1 if interrupted() => continue,
                -1 => return Err(InstallError::HandOver(io::Error::last_os_error())),
                _ => {
                    return Err(InstallError::HandOver(io::Error::from_raw_os_error(
                        libc::ECONNRESET,
                    )));
                }
            }
        }
    }
}

/// Why [`Filter::install`] failed.
#[derive(Debug)]
pub enum InstallError {
    /// The kernel refused the filter: the process is as it was.
    Refused(io::Error),
    /// The filter is installed but its listener did not reach the supervisor: every trapped
    /// call of the process now fails with `ENOSYS`. The process must not run its program.
    HandOver(io::Error),
}

impl InstallError {
    pub fn into_io(self) -> io::Error {
        match self {
            InstallError::Refused(error) | InstallError::HandOver(error) => error,
        }
    }
}

impl std::fmt::Display for InstallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InstallError::Refused(error) => write!(f, "the kernel refused the filter: {error}"),
            InstallError::HandOver(error) => {
                write!(
                    f,
                    "the filter's listener did not reach the supervisor: {error}"
                )
            }
        }
    }
}

/// Makes `command`'s child install `filter` just before `execve` and hand its listener over
/// `report` (the child's end of a Unix socket pair). The parent takes it with
/// [`Listener::take`] on its own end, on another thread: `spawn` returns only once the child
/// has executed its program, which it does only after the hand-over. A failure to install fails
/// the `spawn`.
pub fn install_before_exec(command: &mut std::process::Command, filter: Filter, report: OwnedFd) {
    use std::os::unix::process::CommandExt as _;
    let hook = move || {
        use std::os::fd::AsFd as _;
        filter
            .install(report.as_fd())
            .map_err(InstallError::into_io)
    };
    // SAFETY: the hook runs between fork and exec; `install` is async-signal-safe (no
    // allocation, no lock: it only makes system calls on memory allocated before the fork).
    unsafe {
        command.pre_exec(hook);
    }
}

/// What a trapped system call asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notification {
    /// The request's cookie: every answer names it.
    pub id: u64,
    /// The calling thread (a thread id, in the supervisor's PID namespace).
    pub pid: u32,
    /// The system call number.
    pub nr: i64,
    /// Its raw arguments.
    pub args: [u64; 6],
}

/// How the supervisor answers a trapped call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// The call runs in the kernel as the program made it.
    Continue,
    /// The call returns this value without running.
    Value(i64),
    /// The call fails with this errno without running.
    Errno(i32),
}

/// The supervisor's end of a filter.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
}

/// What [`Listener::wait`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// A notification waits.
    Ready,
    /// Every process under the filter has exited.
    Gone,
    /// Nothing within the timeout.
    Idle,
}

impl Listener {
    /// Takes the listener a child hands over with [`Filter::install`] on `socket` (the
    /// parent's end): reads the child's pid and listener number, copies the listener with
    /// `pidfd_getfd`, and lets the child go on. Fails when the child closed the socket first
    /// (it failed before installing the filter).
    ///
    /// `peer`: the pid the socket's peer credentials name (a connected socket's; a socket pair's
    /// name its creator, so it is `None` there); the child must be that process.
    pub fn take(
        socket: &mut std::os::unix::net::UnixStream,
        peer: Option<u32>,
    ) -> io::Result<Listener> {
        use std::io::{Read as _, Write as _};
        let mut message = [0u8; 8];
        socket.read_exact(&mut message)?;
        let pid = u32::from_ne_bytes([message[0], message[1], message[2], message[3]]);
        let fd = i32::from_ne_bytes([message[4], message[5], message[6], message[7]]);
        if peer.is_some_and(|peer| peer != pid) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("the hand-over names process {pid}, but it comes from {peer:?}"),
            ));
        }
        let fd = process_fd(pid, fd)?;
        // Only a seccomp listener is taken for one.
        let kind = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
        if kind.as_os_str() != "anon_inode:seccomp notify" {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the hand-over named a descriptor that is not a seccomp listener ({})",
                    kind.display()
                ),
            ));
        }
        socket.write_all(&[1])?;
        let listener = Listener { fd };
        listener.wake_synchronously();
        Ok(listener)
    }

    /// Asks the kernel (6.6+) to switch to the supervisor on the caller's CPU when a call is
    /// trapped, instead of waking it on another (`SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP`): a
    /// trapped call then costs a few microseconds less. Older kernels refuse; nothing changes.
    fn wake_synchronously(&self) {
        /// `SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP` (linux/seccomp.h).
        const SYNC_WAKE_UP: libc::c_ulong = 1;
        // SAFETY: this ioctl takes its flags as the argument's value.
        let _ = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_SET_FLAGS,
                SYNC_WAKE_UP,
            )
        };
    }

    /// Waits up to `timeout_ms` for a notification.
    pub fn wait(&self, timeout_ms: i32) -> io::Result<Readiness> {
        let mut poll = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&raw mut poll, 1, timeout_ms) };
        if n < 0 {
            let error = io::Error::last_os_error();
            return if error.kind() == io::ErrorKind::Interrupted {
                Ok(Readiness::Idle)
            } else {
                Err(error)
            };
        }
        Ok(if poll.revents & libc::POLLIN != 0 {
            Readiness::Ready
        } else if poll.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            Readiness::Gone
        } else {
            Readiness::Idle
        })
    }

    /// Takes the next notification (blocks until one comes). `ENOENT`: the caller went away
    /// meanwhile.
    pub fn receive_notification(&self) -> io::Result<Notification> {
        // SAFETY: all-zero is a valid seccomp_notif, and the kernel requires it zeroed.
        let mut notif: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        // SAFETY: a seccomp_notif buffer of the size this ioctl expects.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_RECV,
                &raw mut notif,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Notification {
            id: notif.id,
            pid: notif.pid,
            nr: i64::from(notif.data.nr),
            args: notif.data.args,
        })
    }

    /// Whether notification `id` still waits for an answer (its caller has not died or been
    /// interrupted). Check after reading the caller's memory: the thread id may have been
    /// reused.
    pub fn valid(&self, id: u64) -> bool {
        // SAFETY: a u64 in, nothing out.
        unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_ID_VALID,
                &raw const id,
            ) == 0
        }
    }

    /// Answers notification `id`.
    pub fn reply(&self, id: u64, reply: Reply) -> io::Result<()> {
        let (val, error, flags) = match reply {
            Reply::Continue => (0, 0, libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32),
            Reply::Value(value) => (value, 0, 0),
            Reply::Errno(errno) => (0, -errno, 0),
        };
        let response = libc::seccomp_notif_resp {
            id,
            val,
            error,
            flags,
        };
        // SAFETY: a valid seccomp_notif_resp, read by the kernel.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_SEND,
                &raw const response,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Installs a copy of `fd` in the caller and makes it the trapped call's result, atomically
    /// (`SECCOMP_ADDFD_FLAG_SEND`); returns the number the caller got.
    pub fn reply_with_fd(&self, id: u64, fd: BorrowedFd<'_>, cloexec: bool) -> io::Result<i32> {
        let add = libc::seccomp_notif_addfd {
            id,
            flags: libc::SECCOMP_ADDFD_FLAG_SEND as u32,
            srcfd: fd.as_raw_fd() as u32,
            newfd: 0,
            newfd_flags: if cloexec { libc::O_CLOEXEC as u32 } else { 0 },
        };
        // SAFETY: a valid seccomp_notif_addfd, read by the kernel.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_ADDFD,
                &raw const add,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(rc)
    }
}

/// A copy of descriptor `fd` of process `pid` (the same open file: a socket's options and state
/// are shared), through `pidfd_getfd`.
pub fn process_fd(pid: u32, fd: i32) -> io::Result<OwnedFd> {
    pidfd_getfd(pid, fd, 0)
}

/// As [`process_fd`], named by one of the process's threads (`PIDFD_THREAD`, Linux 6.9); `None`
/// when the kernel cannot (the caller then finds the process's id itself).
pub fn thread_fd(tid: u32, fd: i32) -> Option<io::Result<OwnedFd>> {
    /// `PIDFD_THREAD` (linux/pidfd.h): `O_EXCL`.
    const PIDFD_THREAD: libc::c_int = libc::O_EXCL;
    match pidfd_getfd(tid, fd, PIDFD_THREAD) {
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => None,
        result => Some(result),
    }
}

fn pidfd_getfd(pid: u32, fd: i32, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: integer arguments; the result is a new fd or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, flags) };
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just gave us.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    // SAFETY: integer arguments; the result is a new fd or -1.
    let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if copy < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(copy as RawFd) })
}

/// `struct stat` as the kernel writes it, filled by `fill` over all-zero.
pub fn stat_bytes(fill: impl FnOnce(&mut libc::stat)) -> Vec<u8> {
    // SAFETY: all-zero is a valid `struct stat` (integers only).
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    fill(&mut stat);
    // SAFETY: a plain struct without references, viewed as its bytes.
    unsafe { std::slice::from_raw_parts((&raw const stat).cast::<u8>(), size_of::<libc::stat>()) }
        .to_vec()
}

/// `struct statx` as the kernel writes it, filled by `fill` over all-zero.
pub fn statx_bytes(fill: impl FnOnce(&mut libc::statx)) -> Vec<u8> {
    // SAFETY: all-zero is a valid `struct statx` (integers only).
    let mut statx: libc::statx = unsafe { std::mem::zeroed() };
    fill(&mut statx);
    // SAFETY: a plain struct without references, viewed as its bytes.
    unsafe { std::slice::from_raw_parts((&raw const statx).cast::<u8>(), size_of::<libc::statx>()) }
        .to_vec()
}

/// What this kernel offers the supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    Available,
    /// Not an x86_64 build: the filter's numbers are x86_64's.
    Architecture,
    /// The kernel lacks a piece (user notification 5.0, `pidfd_getfd` 5.6, `ADDFD` 5.9,
    /// `ADDFD_FLAG_SEND` 5.14); the text names it.
    Missing(&'static str),
}

impl std::fmt::Display for Support {
    /// What the kernel offers or lacks, for the user.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Support::Available => f.write_str("available"),
            Support::Architecture => {
                f.write_str("it traps x86_64 system calls and this is another architecture")
            }
            Support::Missing(what) => write!(f, "this kernel lacks {what}"),
        }
    }
}

/// Whether the kernel has every piece the supervisor uses, asked without installing anything.
pub fn support() -> Support {
    if !cfg!(target_arch = "x86_64") {
        return Support::Architecture;
    }
    let action = libc::SECCOMP_RET_USER_NOTIF;
    // SAFETY: SECCOMP_GET_ACTION_AVAIL reads one u32.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_GET_ACTION_AVAIL,
            0,
            &raw const action,
        )
    };
    if rc != 0 {
        return Support::Missing("seccomp user notification (Linux 5.0)");
    }
    // pidfd_getfd on a bad pidfd: EBADF when the call exists, ENOSYS when not.
    // SAFETY: integer arguments; nothing is created.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_getfd, -1, 0, 0) };
    if rc < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
        return Support::Missing("pidfd_getfd (Linux 5.6)");
    }
    // ADDFD_FLAG_SEND cannot be probed without a notification to answer: the version tells.
    match kernel_version() {
        Some(version) if version < (5, 14) => {
            Support::Missing("SECCOMP_ADDFD_FLAG_SEND (Linux 5.14)")
        }
        _ => Support::Available,
    }
}

/// The running kernel's (major, minor), from `/proc/sys/kernel/osrelease`.
fn kernel_version() -> Option<(u32, u32)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_jumps_land_on_allow_notify_or_an_argument_check() {
        let filter = Filter::trapping(&[(42, None), (44, Some(4))]);
        let p = &filter.program;
        // load arch, jeq arch, load nr, jge x32, 2 × jeq, allow, 5 for the check, notify.
        assert_eq!(p.len(), 13);
        let target = |at: usize, offset: u8| at + 1 + usize::from(offset);
        let (allow, check, notify) = (6, 7, 12);
        assert_eq!(p[allow].k, libc::SECCOMP_RET_ALLOW);
        assert_eq!(p[notify].k, libc::SECCOMP_RET_USER_NOTIF);
        assert_eq!(target(1, p[1].jf), allow);
        assert_eq!(target(3, p[3].jt), allow);
        assert_eq!(target(4, p[4].jt), notify);
        assert_eq!(target(5, p[5].jt), check);
        assert_eq!(target(5, p[5].jf), allow);
        // Argument 4's halves at 16 + 8 * 4 and 4 bytes on; either set: notify.
        assert_eq!((p[check].k, p[check + 2].k), (48, 52));
        assert_eq!(target(check + 1, p[check + 1].jf), notify);
        assert_eq!(target(check + 3, p[check + 3].jf), notify);
        assert_eq!(p[check + 4].k, libc::SECCOMP_RET_ALLOW);
    }
}
