//! tether's preloaded library (`LD_PRELOAD`): interposes the libc calls of the local process and
//! asks the local proxy what must happen in the target.
//!
//! - Incoming traffic (this file): when the process listens on a TCP port, the proxy subscribes
//!   the matching port in the target; every remote connection is then made by the proxy to the
//!   process's real local listener, so `accept` returns a real socket, and `accept` and
//!   `getpeername` report the remote client instead of the proxy.
//! - Outgoing traffic (`outgoing`), names (`resolve`), files (`file_hooks`): decided by the
//!   `policy` the proxy hands out once, carried out by the agent in the target.
//!
//! File descriptors are followed through `dup`, `dup2`, `dup3`, `fcntl(F_DUPFD…)`, `close` and
//! `close_range`; `fork` is bracketed so a child never inherits a held lock and opens its own
//! channel; `execve` keeps the layer's variables in a replaced environment.
//!
//! Layout: the decisions (the `policy`) and the proxy protocol (`channel`) come from
//! `tether-intercept`, shared with the proxy; `files` and `state` (fd tables) are safe code,
//! unit-tested without preloading; `addr` converts addresses; this file holds the
//! infrastructure (real functions, the re-entry guard, the channels) and the incoming hooks.
//!
//! Architecture Invariant: unsafe code lives in this crate (and nowhere else in the workspace),
//! every block with a `SAFETY:` comment. A hook never panics across the FFI boundary, never calls
//! `setenv`, and when the proxy is unreachable fails the call with an errno and one message on
//! stderr instead of silently staying local.

mod addr;
mod file_hooks;
mod files;
mod outgoing;
mod resolve;
mod state;

use tether_intercept::{channel, policy, program};

mod alloc;

/// Rust allocations in the layer use glibc's allocator, never the program's (see `alloc.rs`).
#[global_allocator]
static ALLOCATOR: alloc::LibcAllocator = alloc::LibcAllocator;

use std::{
    cell::Cell,
    ffi::{CStr, CString, c_char, c_int, c_void},
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicBool, AtomicPtr, Ordering},
    },
};

use libc::{sockaddr, socklen_t};

use crate::channel::{Answer, Channel, LIBRARY_ENV, Request, SOCKET_ENV};

// ---------------------------------------------------------------------------------------------
// Real functions.

/// A libc function found with `dlsym(RTLD_NEXT)`, cached atomically (hooks run on any thread).
struct Real {
    name: &'static CStr,
    ptr: AtomicPtr<c_void>,
}

impl Real {
    const fn new(name: &'static CStr) -> Real {
        Real {
            name,
            ptr: AtomicPtr::new(std::ptr::null_mut()),
        }
    }

    /// The function, or `None` when this libc does not have it.
    fn try_get(&self) -> Option<*mut c_void> {
        let cached = self.ptr.load(Ordering::Acquire);
        if !cached.is_null() {
            return Some(cached);
        }
        // SAFETY: `name` is a NUL-terminated symbol name; RTLD_NEXT asks for the next definition
        // after this library, i.e. libc's.
        let found = unsafe { libc::dlsym(libc::RTLD_NEXT, self.name.as_ptr()) };
        if found.is_null() {
            return None;
        }
        self.ptr.store(found, Ordering::Release);
        Some(found)
    }

    fn get(&self) -> *mut c_void {
        let found = self.try_get().unwrap_or(std::ptr::null_mut());
        if found.is_null() {
            // Without the real function nothing can work; dying loudly beats corrupting state.
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                b"tether: libc function missing, aborting\n",
            );
            std::process::abort();
        }
        found
    }
}

/// Declares the real function `$name` with its C signature and a caller `real::$name(...)`.
macro_rules! real_fns {
    ($($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {
        mod real {
            use super::*;
            $(
                #[allow(clippy::too_many_arguments, reason = "libc's signature")]
                pub(crate) unsafe fn $name($($arg: $ty),*) -> $ret {
                    static REAL: Real = Real::new(match CStr::from_bytes_with_nul(concat!(stringify!($name), "\0").as_bytes()) {
                        Ok(name) => name,
                        Err(_) => panic!("symbol names have no NUL"),
                    });
                    // SAFETY: dlsym returned libc's definition of this very symbol, whose C
                    // signature is the one declared here.
                    let f: unsafe extern "C" fn($($ty),*) -> $ret = unsafe { std::mem::transmute(REAL.get()) };
                    // SAFETY: the caller upholds libc's contract for the call.
                    unsafe { f($($arg),*) }
                }
            )*
        }
    };
}

real_fns! {
    bind(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int;
    listen(fd: c_int, backlog: c_int) -> c_int;
    accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int;
    accept4(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t, flags: c_int) -> c_int;
    getpeername(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int;
    getsockname(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int;
    close(fd: c_int) -> c_int;
    syscall(number: libc::c_long, a1: libc::c_long, a2: libc::c_long, a3: libc::c_long, a4: libc::c_long, a5: libc::c_long, a6: libc::c_long) -> libc::c_long;
    dup(fd: c_int) -> c_int;
    dup2(old: c_int, new: c_int) -> c_int;
    dup3(old: c_int, new: c_int, flags: c_int) -> c_int;
    fcntl(fd: c_int, cmd: c_int, arg: libc::c_ulong) -> c_int;
    execve(path: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int;
    close_range(first: libc::c_uint, last: libc::c_uint, flags: c_int) -> c_int;
    connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int;
    sendto(fd: c_int, buf: *const c_void, n: libc::size_t, flags: c_int, addr: *const sockaddr, len: socklen_t) -> libc::ssize_t;
    sendmsg(fd: c_int, msg: *const libc::msghdr, flags: c_int) -> libc::ssize_t;
    recvfrom(fd: c_int, buf: *mut c_void, n: libc::size_t, flags: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> libc::ssize_t;
    recvmsg(fd: c_int, msg: *mut libc::msghdr, flags: c_int) -> libc::ssize_t;
    sendmmsg(fd: c_int, msgs: *mut libc::mmsghdr, count: libc::c_uint, flags: c_int) -> c_int;
    getaddrinfo(node: *const c_char, service: *const c_char, hints: *const libc::addrinfo, res: *mut *mut libc::addrinfo) -> c_int;
    freeaddrinfo(res: *mut libc::addrinfo) -> ();
    gethostbyname2(name: *const c_char, family: c_int) -> *mut libc::hostent;
    gethostbyaddr(address: *const c_void, len: socklen_t, family: c_int) -> *mut libc::hostent;
    gethostbyaddr_r(address: *const c_void, len: socklen_t, family: c_int, ret: *mut libc::hostent, buf: *mut c_char, buflen: libc::size_t, result: *mut *mut libc::hostent, h_errnop: *mut c_int) -> c_int;
    getnameinfo(address: *const sockaddr, len: socklen_t, host: *mut c_char, host_len: socklen_t, service: *mut c_char, service_len: socklen_t, flags: c_int) -> c_int;
    gethostbyname2_r(name: *const c_char, family: c_int, ret: *mut libc::hostent, buf: *mut c_char, buflen: libc::size_t, result: *mut *mut libc::hostent, h_errnop: *mut c_int) -> c_int;
    open(path: *const c_char, flags: c_int, mode: libc::mode_t) -> c_int;
    open64(path: *const c_char, flags: c_int, mode: libc::mode_t) -> c_int;
    openat(dirfd: c_int, path: *const c_char, flags: c_int, mode: libc::mode_t) -> c_int;
    openat64(dirfd: c_int, path: *const c_char, flags: c_int, mode: libc::mode_t) -> c_int;
    __open_2(path: *const c_char, flags: c_int) -> c_int;
    __open64_2(path: *const c_char, flags: c_int) -> c_int;
    creat(path: *const c_char, mode: libc::mode_t) -> c_int;
    fopen(path: *const c_char, mode: *const c_char) -> *mut libc::FILE;
    fopen64(path: *const c_char, mode: *const c_char) -> *mut libc::FILE;
    read(fd: c_int, buf: *mut c_void, n: libc::size_t) -> libc::ssize_t;
    pread(fd: c_int, buf: *mut c_void, n: libc::size_t, offset: libc::off_t) -> libc::ssize_t;
    pread64(fd: c_int, buf: *mut c_void, n: libc::size_t, offset: libc::off64_t) -> libc::ssize_t;
    readv(fd: c_int, iov: *const libc::iovec, count: c_int) -> libc::ssize_t;
    write(fd: c_int, buf: *const c_void, n: libc::size_t) -> libc::ssize_t;
    pwrite(fd: c_int, buf: *const c_void, n: libc::size_t, offset: libc::off_t) -> libc::ssize_t;
    pwrite64(fd: c_int, buf: *const c_void, n: libc::size_t, offset: libc::off64_t) -> libc::ssize_t;
    lseek(fd: c_int, offset: libc::off_t, whence: c_int) -> libc::off_t;
    lseek64(fd: c_int, offset: libc::off64_t, whence: c_int) -> libc::off64_t;
    access(path: *const c_char, mode: c_int) -> c_int;
    faccessat(dirfd: c_int, path: *const c_char, mode: c_int, flags: c_int) -> c_int;
    opendir(path: *const c_char) -> *mut libc::DIR;
    readdir(dir: *mut libc::DIR) -> *mut libc::dirent;
    readdir64(dir: *mut libc::DIR) -> *mut libc::dirent64;
    closedir(dir: *mut libc::DIR) -> c_int;
    dirfd(dir: *mut libc::DIR) -> c_int;
    rewinddir(dir: *mut libc::DIR) -> ();
    telldir(dir: *mut libc::DIR) -> libc::c_long;
    seekdir(dir: *mut libc::DIR, position: libc::c_long) -> ();
    fdopendir(fd: c_int) -> *mut libc::DIR;
    scandir64(path: *const c_char, list: *mut *mut *mut libc::dirent64, filter: Option<unsafe extern "C" fn(*const libc::dirent64) -> c_int>, compare: Option<unsafe extern "C" fn(*mut *const libc::dirent64, *mut *const libc::dirent64) -> c_int>) -> c_int;
    readlink(path: *const c_char, buf: *mut c_char, size: libc::size_t) -> libc::ssize_t;
    realpath(path: *const c_char, resolved: *mut c_char) -> *mut c_char;
    unlink(path: *const c_char) -> c_int;
    mkdir(path: *const c_char, mode: libc::mode_t) -> c_int;
    rename(from: *const c_char, to: *const c_char) -> c_int;
    writev(fd: c_int, iov: *const libc::iovec, count: c_int) -> libc::ssize_t;
    preadv(fd: c_int, iov: *const libc::iovec, count: c_int, offset: libc::off_t) -> libc::ssize_t;
    preadv64(fd: c_int, iov: *const libc::iovec, count: c_int, offset: libc::off64_t) -> libc::ssize_t;
    pwritev(fd: c_int, iov: *const libc::iovec, count: c_int, offset: libc::off_t) -> libc::ssize_t;
    pwritev64(fd: c_int, iov: *const libc::iovec, count: c_int, offset: libc::off64_t) -> libc::ssize_t;
    sendfile(out: c_int, input: c_int, offset: *mut libc::off_t, count: libc::size_t) -> libc::ssize_t;
    sendfile64(out: c_int, input: c_int, offset: *mut libc::off64_t, count: libc::size_t) -> libc::ssize_t;
    copy_file_range(input: c_int, off_in: *mut libc::off64_t, out: c_int, off_out: *mut libc::off64_t, len: libc::size_t, flags: libc::c_uint) -> libc::ssize_t;
    mmap(addr: *mut c_void, len: libc::size_t, prot: c_int, flags: c_int, fd: c_int, offset: libc::off_t) -> *mut c_void;
    mmap64(addr: *mut c_void, len: libc::size_t, prot: c_int, flags: c_int, fd: c_int, offset: libc::off64_t) -> *mut c_void;
}

// ---------------------------------------------------------------------------------------------
// Guard against re-entry: the layer's own work (the channel's socket, allocations) calls libc too.

thread_local! {
    static IN_LAYER: Cell<bool> = const { Cell::new(false) };
}

struct Entered;

impl Drop for Entered {
    fn drop(&mut self) {
        let _ = IN_LAYER.try_with(|flag| flag.set(false));
    }
}

/// `Some` when this thread may run layer logic now (not already inside it, and thread-locals are
/// available: they are not during thread teardown).
fn enter() -> Option<Entered> {
    IN_LAYER
        // `then`, not `then_some`: an `Entered` built and dropped here would clear the flag.
        .try_with(|flag| (!flag.replace(true)).then(|| Entered))
        .ok()
        .flatten()
}

/// True once any fd is tracked: lets `close`/`dup` skip the table lock in processes that never
/// listened remotely.
static TRACKING: AtomicBool = AtomicBool::new(false);

/// Makes records for `fd`, noting what it refers to now (see [`revalidate`]).
/// Records of another object still under `fd`'s number (closed where no hook saw it) are
/// forgotten first, not re-stamped with the new identity. Called inside the layer (entered).
fn track<T>(fd: c_int, f: impl FnOnce(&mut state::Tables) -> T) -> T {
    TRACKING.store(true, Ordering::Relaxed);
    let identity = identity(fd);
    let (result, stale) = state::with(|t| {
        let stale = identity.and_then(|now| t.revalidate(fd, Some(now)));
        t.identify(fd, identity);
        (f(t), stale)
    });
    if let Some(stale) = stale {
        ended(stale);
    }
    result
}

/// Forgets `fd`'s records if it no longer refers to the object they were made for: it was closed
/// where no hook saw it (`syscall(SYS_close)`, a raw syscall) and its number was reused. Called
/// before a record of `fd` is trusted; `_entered` because what that ends is told to the proxy.
fn revalidate(_entered: &Entered, fd: c_int) {
    if !TRACKING.load(Ordering::Relaxed) || !state::with(|t| t.identities.contains_key(&fd)) {
        return;
    }
    let now = identity(fd);
    if let Some(forgotten) = state::with(|t| t.revalidate(fd, now)) {
        ended(forgotten);
    }
}

/// What `fd` refers to now (`st_dev`, `st_ino`), or `None` if it is not open.
fn identity(fd: c_int) -> Option<state::Identity> {
    // SAFETY: zeroed storage is a valid out-buffer for fstat.
    let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out-buffer.
    (unsafe { libc::fstat64(fd, &mut st) } == 0).then_some((st.st_dev, st.st_ino))
}

// ---------------------------------------------------------------------------------------------
// The channel to the proxy: one per process, re-opened after fork.

static CHANNEL: Mutex<Option<Channel>> = Mutex::new(None);
static SOCKET: OnceLock<Option<PathBuf>> = OnceLock::new();
static WARNED: AtomicBool = AtomicBool::new(false);

fn socket_path() -> Option<&'static PathBuf> {
    SOCKET
        .get_or_init(|| std::env::var_os(SOCKET_ENV).map(PathBuf::from))
        .as_ref()
}

/// The channel's fd (-1: none), so `close`/`dup2` can tell when the process closes it (daemons
/// close every fd they did not open).
static CHANNEL_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Channels live on a high fd number, out of the way of programs that reuse low ones.
const CHANNEL_FD_MIN: c_int = 512;

fn open_channel(path: &std::path::Path, shared: bool) -> std::io::Result<Channel> {
    use std::os::fd::{FromRawFd as _, IntoRawFd as _};
    let stream = std::os::unix::net::UnixStream::connect(path)?;
    let low = stream.into_raw_fd();
    // SAFETY: `low` is the socket just opened; F_DUPFD_CLOEXEC takes an int argument.
    let high = unsafe { real::fcntl(low, libc::F_DUPFD_CLOEXEC, CHANNEL_FD_MIN as libc::c_ulong) };
    let fd = if high >= 0 {
        // SAFETY: `low` is ours and replaced by `high`.
        unsafe { real::close(low) };
        high
    } else {
        low
    };
    // SAFETY: `fd` is an open socket owned by nobody else.
    let stream = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
    let mut channel = Channel::from_stream(stream)?;
    channel.ino = socket_inode(fd).unwrap_or(0);
    if shared {
        CHANNEL_FD.store(channel.fd(), Ordering::Release);
    }
    Ok(channel)
}

/// The process is closing (or replacing) `fd`: if it is the channel, the layer lets go of it.
fn channel_fd_closing(fd: c_int) {
    if fd < 0 || CHANNEL_FD.load(Ordering::Acquire) != fd {
        return;
    }
    let Some(_entered) = enter() else { return };
    let mut guard = CHANNEL.lock().unwrap_or_else(|p| p.into_inner());
    if guard.as_ref().is_some_and(|c| c.fd() == fd) {
        // The caller closes the fd itself; the next request opens a new channel.
        std::mem::forget(guard.take());
        CHANNEL_FD.store(-1, Ordering::Release);
    }
}

// ---------------------------------------------------------------------------------------------
// fork: the layer's locks are taken before the fork and released on both sides after it, so a
// child never inherits a lock held by a thread that does not exist in it.

/// In the order they are taken: a readdir holds the directory table while it asks the proxy, so
/// that table comes before the channel.
struct ForkLocks {
    _dirs: file_hooks::ForkLocks,
    _names: resolve::ForkLocks,
    channel: std::sync::MutexGuard<'static, Option<Channel>>,
    tables: std::sync::MutexGuard<'static, Option<state::Tables>>,
}

thread_local! {
    static FORK_LOCKS: std::cell::RefCell<Option<ForkLocks>> = const { std::cell::RefCell::new(None) };
}

#[used]
#[unsafe(link_section = ".init_array")]
static REGISTER_FORK_HANDLERS: extern "C" fn() = register_fork_handlers;

extern "C" fn register_fork_handlers() {
    // SAFETY: registers plain `extern "C"` functions; nothing else is required.
    unsafe {
        libc::pthread_atfork(
            Some(before_fork),
            Some(after_fork_in_parent),
            Some(after_fork_in_child),
        )
    };
}

extern "C" fn before_fork() {
    if socket_path().is_none() {
        return;
    }
    let Some(entered) = enter() else { return };
    // Finish a policy fetch first: it needs the channel.
    let _ = policy();
    let locks = ForkLocks {
        _dirs: file_hooks::lock_for_fork(),
        _names: resolve::lock_for_fork(),
        channel: CHANNEL.lock().unwrap_or_else(|p| p.into_inner()),
        tables: state::TABLES.lock().unwrap_or_else(|p| p.into_inner()),
    };
    drop(entered);
    let _ = FORK_LOCKS.try_with(|slot| *slot.borrow_mut() = Some(locks));
}

extern "C" fn after_fork_in_parent() {
    let _ = FORK_LOCKS.try_with(|slot| slot.borrow_mut().take());
}

extern "C" fn after_fork_in_child() {
    let Ok(Some(mut locks)) = FORK_LOCKS.try_with(|slot| slot.borrow_mut().take()) else {
        return;
    };
    // The parent's channel is shared with the child through the inherited fd: the child must not
    // talk on it. Forget it (the parent keeps its own) and let the child open a new one.
    std::mem::forget(locks.channel.take());
    CHANNEL_FD.store(-1, Ordering::Release);
    // So is the forking thread's own channel, if it has one.
    let _ = THREAD_CHANNEL.try_with(|own| std::mem::forget(own.borrow_mut().take()));
    // Files opened in the target belong to the parent: the child's copies never close them.
    if let Some(tables) = locks.tables.as_mut() {
        for file in tables.files.values() {
            if let Ok(mut file) = file.try_lock() {
                file.inherited = true;
            }
        }
    }
}

/// Asks the proxy; `Err(errno)` when it cannot be reached.
fn ask(request: &Request) -> Result<Answer, c_int> {
    ask_with(request, &[]).map(|(answer, _)| answer)
}

/// Asks the proxy with a payload; the answer comes with its own. A request is sent again on a
/// new channel only when it never reached the proxy (a channel broken before it was written):
/// one whose answer was lost may have been carried out, so it fails with EIO instead.
fn ask_with(request: &Request, payload: &[u8]) -> Result<(Answer, Vec<u8>), c_int> {
    let Some(path) = socket_path() else {
        let inactive = Answer::Local {
            reason: "the layer is not active".into(),
        };
        return Ok((inactive, Vec::new()));
    };
    // One thread waiting for a slow answer (a DNS lookup, a connect) must not hold up the
    // others: a thread that finds the process's channel busy uses one of its own.
    match CHANNEL.try_lock() {
        Ok(mut guard) => ask_on(&mut guard, true, path, request, payload),
        Err(std::sync::TryLockError::Poisoned(poisoned)) => {
            ask_on(&mut poisoned.into_inner(), true, path, request, payload)
        }
        Err(std::sync::TryLockError::WouldBlock) => THREAD_CHANNEL
            .try_with(|own| ask_on(&mut own.borrow_mut(), false, path, request, payload))
            .unwrap_or(Err(libc::EIO)),
    }
}

thread_local! {
    /// A thread's own channel, used while the process's is busy.
    static THREAD_CHANNEL: std::cell::RefCell<Option<Channel>> = const { std::cell::RefCell::new(None) };
}

fn ask_on(
    slot: &mut Option<Channel>,
    shared: bool,
    path: &std::path::Path,
    request: &Request,
    payload: &[u8],
) -> Result<(Answer, Vec<u8>), c_int> {
    // The process may have closed the channel's fd (and reused the number) without the layer
    // seeing it: check it still is the socket the layer opened.
    if slot
        .as_ref()
        .is_some_and(|c| socket_inode(c.fd()) != Some(c.ino))
    {
        std::mem::forget(slot.take());
        if shared {
            CHANNEL_FD.store(-1, Ordering::Release);
        }
    }
    for attempt in 0..2 {
        if slot.is_none() {
            match open_channel(path, shared) {
                Ok(channel) => *slot = Some(channel),
                Err(error) => {
                    unreachable_proxy(path, &error);
                    return Err(libc::EIO);
                }
            }
        }
        let Some(channel) = slot.as_mut() else {
            return Err(libc::EIO);
        };
        match channel.ask_with(request, payload) {
            Ok(answer) => return Ok(answer),
            Err(channel::AskError::NotSent(error)) if attempt == 1 => {
                drop_channel(slot, shared, &error);
                unreachable_proxy(path, &error);
                return Err(libc::EIO);
            }
            // A broken channel: open a new one and send once more.
            Err(channel::AskError::NotSent(error)) => drop_channel(slot, shared, &error),
            Err(channel::AskError::Lost(error)) => {
                drop_channel(slot, shared, &error);
                unreachable_proxy(path, &error);
                return Err(libc::EIO);
            }
        }
    }
    Err(libc::EIO)
}

fn socket_inode(fd: c_int) -> Option<u64> {
    identity(fd).map(|(_, ino)| ino)
}

/// Lets go of a broken channel. If its fd was closed behind the layer's back (EBADF: a
/// `close_range`, a raw syscall), it is not closed again: the number may belong to someone else
/// by now.
fn drop_channel(slot: &mut Option<Channel>, shared: bool, error: &std::io::Error) {
    let channel = slot.take();
    if error.raw_os_error() == Some(libc::EBADF) {
        std::mem::forget(channel);
    }
    if shared {
        CHANNEL_FD.store(-1, Ordering::Release);
    }
}

fn unreachable_proxy(path: &std::path::Path, error: &std::io::Error) {
    if !WARNED.swap(true, Ordering::Relaxed) {
        eprintln!(
            "tether: cannot reach the local proxy at {} ({error}); is `tether exec` still running? The call fails instead of silently staying local.",
            path.display()
        );
    }
}

fn set_errno(errno: c_int) {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() = errno };
}

fn local_addr(fd: c_int) -> Option<SocketAddr> {
    // SAFETY: zeroed storage is a valid out-buffer; its size is passed along.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as socklen_t;
    // SAFETY: `storage` has `len` writable bytes.
    let rc = unsafe { real::getsockname(fd, (&raw mut storage).cast(), &mut len) };
    // SAFETY: the kernel wrote `len` bytes into `storage`.
    (rc == 0)
        .then(|| unsafe { addr::read((&raw const storage).cast(), len) })
        .flatten()
}

fn peer_addr(fd: c_int) -> Option<SocketAddr> {
    // SAFETY: as in `local_addr`.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as socklen_t;
    // SAFETY: as in `local_addr`.
    let rc = unsafe { real::getpeername(fd, (&raw mut storage).cast(), &mut len) };
    // SAFETY: as in `local_addr`.
    (rc == 0)
        .then(|| unsafe { addr::read((&raw const storage).cast(), len) })
        .flatten()
}

fn is_tcp(fd: c_int) -> bool {
    let mut kind: c_int = 0;
    let mut len = size_of::<c_int>() as socklen_t;
    // SAFETY: `kind` is a c_int-sized out-buffer.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&raw mut kind).cast(),
            &mut len,
        )
    };
    rc == 0 && kind == libc::SOCK_STREAM
}

fn family(addr: &SocketAddr) -> c_int {
    if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    }
}

// ---------------------------------------------------------------------------------------------
// Hooks. Each calls the real function first and adds the layer's work only on success.

/// # Safety
/// As libc's `bind`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bind(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    // SAFETY: the caller's arguments are passed through unchanged.
    let rc = unsafe { real::bind(fd, addr, len) };
    if rc == 0
        && let Some(_entered) = enter()
    {
        // SAFETY: `addr` points to `len` bytes, per bind's contract (and bind succeeded).
        if let Some(requested) = unsafe { addr::read(addr, len) } {
            track(fd, |t| t.bound.insert(fd, requested.port()));
        }
    }
    rc
}

/// # Safety
/// As libc's `listen`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn listen(fd: c_int, backlog: c_int) -> c_int {
    // SAFETY: arguments passed through.
    let rc = unsafe { real::listen(fd, backlog) };
    if rc != 0 {
        return rc;
    }
    let Some(entered) = enter() else { return rc };
    if !is_tcp(fd) {
        return rc;
    }
    revalidate(&entered, fd);
    let Some(addr) = local_addr(fd) else {
        return rc;
    };
    let requested = state::with(|t| t.bound.get(&fd).copied()).unwrap_or(addr.port());
    match ask(&Request::Listen {
        pid: std::process::id(),
        addr,
        requested_port: requested,
    }) {
        Ok(Answer::Remote { .. }) => {
            track(fd, |t| t.listeners.insert(fd, addr));
            rc
        }
        Ok(Answer::Error { message }) => {
            eprintln!(
                "tether: cannot receive the target's traffic on port {}: {message}",
                addr.port()
            );
            set_errno(libc::EADDRNOTAVAIL);
            -1
        }
        Ok(_) => rc,
        Err(errno) => {
            set_errno(errno);
            -1
        }
    }
}

/// After a successful accept on `listener`: if the proxy made the connection for a remote
/// client, remember and report that client.
fn after_accept(listener: c_int, accepted: c_int, addr: *mut sockaddr, len: *mut socklen_t) {
    if !TRACKING.load(Ordering::Relaxed) {
        return;
    }
    let Some(entered) = enter() else { return };
    // Most listeners are local: they cost one lookup here, nothing more.
    if !state::with(|t| t.listeners.contains_key(&listener)) {
        return;
    }
    revalidate(&entered, listener);
    // The accepted fd is new: whatever was recorded under its number is stale.
    revalidate(&entered, accepted);
    let Some(listen_addr) = state::with(|t| t.listeners.get(&listener).copied()) else {
        return;
    };
    let (Some(local), Some(peer)) = (local_addr(accepted), peer_addr(accepted)) else {
        return;
    };
    if !peer.ip().is_loopback()
        && !matches!(peer.ip(), std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()))
    {
        return;
    }
    if let Ok(Answer::Peer { addr: Some(remote) }) = ask(&Request::Peer { local, peer }) {
        track(accepted, |t| t.peers.insert(accepted, remote));
        // SAFETY: `addr`/`len` are the caller's accept buffers (or null), valid per accept's
        // contract.
        unsafe { addr::write(remote, family(&listen_addr), addr, len) };
    }
}

/// # Safety
/// As libc's `accept`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    // SAFETY: arguments passed through.
    let accepted = unsafe { real::accept(fd, addr, len) };
    if accepted >= 0 {
        after_accept(fd, accepted, addr, len);
    }
    accepted
}

/// # Safety
/// As libc's `accept4`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn accept4(
    fd: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> c_int {
    // SAFETY: arguments passed through.
    let accepted = unsafe { real::accept4(fd, addr, len, flags) };
    if accepted >= 0 {
        after_accept(fd, accepted, addr, len);
    }
    accepted
}

/// # Safety
/// As libc's `getpeername`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getpeername(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    if TRACKING.load(Ordering::Relaxed)
        && let Some(entered) = enter()
        && let Some(remote) = {
            revalidate(&entered, fd);
            state::with(|t| t.peers.get(&fd).copied())
        }
    {
        let family = local_addr(fd).map_or(family(&remote), |l| family(&l));
        // SAFETY: the caller's buffers, valid per getpeername's contract.
        unsafe { addr::write(remote, family, addr, len) };
        return 0;
    }
    // SAFETY: arguments passed through.
    unsafe { real::getpeername(fd, addr, len) }
}

/// # Safety
/// As libc's `getsockname`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getsockname(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    // The process really listens where it thinks it does: nothing to change.
    // SAFETY: arguments passed through.
    unsafe { real::getsockname(fd, addr, len) }
}

fn forget(fd: c_int) {
    if !TRACKING.load(Ordering::Relaxed) {
        return;
    }
    let Some(entered) = enter() else { return };
    forget_entered(&entered, fd);
}

/// What `close` does for the layer's records, from inside the layer (`closedir` closing the fd
/// its DIR owns): forget the fd, and end at the proxy what it was the last fd of.
fn forget_entered(_entered: &Entered, fd: c_int) {
    let forgotten = state::with(|t| t.forget(fd));
    ended(forgotten);
}

/// Closes an fd the layer itself holds for the process (a DIR's), with its records.
fn close_entered(entered: &Entered, fd: c_int) -> c_int {
    channel_fd_closing(fd);
    forget_entered(entered, fd);
    // SAFETY: an fd the caller owns.
    unsafe { real::close(fd) }
}

fn duplicated(old: c_int, new: c_int) {
    if new < 0 || !TRACKING.load(Ordering::Relaxed) {
        return;
    }
    let Some(_entered) = enter() else { return };
    let forgotten = state::with(|t| t.dup(old, new));
    ended(forgotten);
}

/// Tells the proxy (and the target) about what the last fd of was closed.
fn ended(forgotten: state::Forgotten) {
    if !forgotten.released.is_empty() {
        let _ = ask(&Request::Release {
            streams: forgotten.released,
        });
    }
    if let Some(addr) = forgotten.listener {
        let _ = ask(&Request::Unlisten {
            pid: std::process::id(),
            addr,
        });
    }
    if let Some(file) = forgotten.file {
        let handle = file.lock().unwrap_or_else(|p| p.into_inner()).handle;
        let _ = fs(tether_protocol::fs_request::Op::Close(
            tether_protocol::FsHandle { handle },
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// What the layer decides by itself, fetched from the proxy once.

static POLICY: OnceLock<Option<policy::Policy>> = OnceLock::new();

/// The policy, or `None` when the layer is inactive or the proxy unreachable (then everything
/// stays local). Call only inside the layer (`enter`).
fn policy() -> Option<&'static policy::Policy> {
    POLICY
        .get_or_init(|| {
            socket_path()?;
            match ask(&Request::Policy) {
                Ok(Answer::Policy(spec)) => {
                    Some(policy::Policy::new(&spec, &policy::LocalPlaces::current()))
                }
                _ => None,
            }
        })
        .as_ref()
}

/// The policy if it was fetched already (`Some(None)`: the layer is inactive), without fetching
/// it: callable outside the re-entry guard.
fn ready_policy() -> Option<Option<&'static policy::Policy>> {
    POLICY.get().map(Option::as_ref)
}

/// Runs one file operation in the target; `Err(errno)` as the process should see it.
fn fs(op: tether_protocol::fs_request::Op) -> Result<tether_protocol::fs_response::Result, c_int> {
    use prost::Message as _;
    let request = tether_protocol::FsRequest { op: Some(op) };
    let payload = request.encode_to_vec();
    let (answer, payload) = ask_with(&Request::Fs { len: payload.len() }, &payload)?;
    match answer {
        Answer::Fs { .. } => tether_protocol::FsResponse::decode(payload.as_slice())
            .ok()
            .and_then(|r| r.result)
            .ok_or(libc::EIO),
        Answer::Errno { errno, .. } => Err(errno),
        _ => Err(libc::EIO),
    }
}

/// # Safety
/// As libc's `close`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    channel_fd_closing(fd);
    forget(fd);
    // SAFETY: argument passed through.
    unsafe { real::close(fd) }
}

/// `syscall(SYS_close, fd)`, libuv's (node's) way to close, does what `close` does, and
/// `syscall(SYS_statx, …)` (libuv's `fs.stat*`) is the `statx` hook; every other number passes
/// through untouched. A backstop: records of an fd closed where no hook saw it are
/// also caught when the number is reused ([`revalidate`]).
///
/// `syscall` is variadic in C. It is defined here with the six argument registers a system call
/// can use: on x86_64 and aarch64 Linux a variadic caller passes its integer arguments exactly
/// where these parameters are read from, and the kernel ignores those a call does not take.
///
/// # Safety
/// As libc's `syscall`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn syscall(
    number: libc::c_long,
    a1: libc::c_long,
    a2: libc::c_long,
    a3: libc::c_long,
    a4: libc::c_long,
    a5: libc::c_long,
    a6: libc::c_long,
) -> libc::c_long {
    if number == libc::SYS_close {
        let fd = a1 as c_int;
        channel_fd_closing(fd);
        forget(fd);
    } else if number == libc::SYS_statx {
        // libuv (node's `fs.stat*`) calls statx this way.
        // SAFETY: statx's arguments, as the caller passed them to the kernel.
        return unsafe {
            file_hooks::statx(
                a1 as c_int,
                a2 as *const c_char,
                a3 as c_int,
                a4 as libc::c_uint,
                a5 as *mut libc::statx,
            )
        }
        .into();
    }
    // SAFETY: arguments passed through.
    unsafe { real::syscall(number, a1, a2, a3, a4, a5, a6) }
}

/// `close_range` (what Python's `os.closerange` and daemons use): the layer forgets what it knew
/// about the fds in the range, and lets go of its channel if it is among them.
///
/// # Safety
/// As libc's `close_range`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn close_range(
    first: libc::c_uint,
    last: libc::c_uint,
    flags: c_int,
) -> c_int {
    // With CLOSE_RANGE_CLOEXEC nothing is closed now.
    if flags & (libc::CLOSE_RANGE_CLOEXEC as c_int) == 0 {
        let in_range = |fd: c_int| fd >= 0 && (first..=last).contains(&(fd as libc::c_uint));
        let channel = CHANNEL_FD.load(Ordering::Acquire);
        if in_range(channel) {
            channel_fd_closing(channel);
        }
        if TRACKING.load(Ordering::Relaxed) {
            let tracked: Vec<c_int> = state::with(|t| {
                let mut fds: Vec<c_int> = t
                    .bound
                    .keys()
                    .chain(t.listeners.keys())
                    .chain(t.peers.keys())
                    .chain(t.files.keys())
                    .chain(t.relays.keys())
                    .copied()
                    .filter(|fd| in_range(*fd))
                    .collect();
                fds.sort_unstable();
                fds.dedup();
                fds
            });
            for fd in tracked {
                forget(fd);
            }
        }
    }
    // SAFETY: arguments passed through.
    unsafe { real::close_range(first, last, flags) }
}

/// # Safety
/// As libc's `dup`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    // SAFETY: argument passed through.
    let new = unsafe { real::dup(fd) };
    duplicated(fd, new);
    new
}

/// # Safety
/// As libc's `dup2`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    if old != new {
        channel_fd_closing(new);
    }
    // SAFETY: arguments passed through.
    let rc = unsafe { real::dup2(old, new) };
    if old != new {
        duplicated(old, rc);
    }
    rc
}

/// # Safety
/// As libc's `dup3`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    channel_fd_closing(new);
    // SAFETY: arguments passed through.
    let rc = unsafe { real::dup3(old, new, flags) };
    duplicated(old, rc);
    rc
}

/// `fcntl` is variadic in C; its optional third argument is an int or a pointer, which the
/// x86_64 and aarch64 Linux calling conventions pass exactly like a fixed `unsigned long`.
///
/// # Safety
/// As libc's `fcntl`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: libc::c_ulong) -> c_int {
    // SAFETY: arguments passed through with the same register layout.
    let rc = unsafe { real::fcntl(fd, cmd, arg) };
    if cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC {
        duplicated(fd, rc);
    }
    rc
}

/// # Safety
/// As libc's `execve`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execve(
    path: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    if let Some(_entered) = enter() {
        // Never a silent local run: a program the layer cannot enter is handed over to the
        // syscall supervisor, or named as it starts.
        if socket_path().is_some() && !path.is_null() {
            // SAFETY: `path` is a C string, per execve's contract.
            let program = unsafe { CStr::from_ptr(path) }.to_string_lossy();
            if let Some(unreachable) = program::unreachable(std::path::Path::new(&*program)) {
                use std::io::Write as _;
                match hand_over(unreachable) {
                    Ok(()) => {
                        let _ = writeln!(
                            std::io::stderr(),
                            "tether: {program} {}: intercepting its system calls (seccomp supervisor)",
                            unreachable.what()
                        );
                        // The supervisor serves it: the library must not be loaded in it too.
                        // SAFETY: `envp` is a NULL-terminated array of C strings, per execve's
                        // contract.
                        let kept = unsafe { without_layer(envp) };
                        let mut pointers: Vec<*const c_char> =
                            kept.iter().map(|s| s.as_ptr()).collect();
                        pointers.push(std::ptr::null());
                        // SAFETY: `pointers` is a NULL-terminated array of valid C strings that
                        // outlives the call.
                        return unsafe { real::execve(path, argv, pointers.as_ptr()) };
                    }
                    Err(why) => {
                        let _ = writeln!(
                            std::io::stderr(),
                            "tether: warning: {}{why}",
                            unreachable.explain(&program)
                        );
                    }
                }
            }
        }
        // SAFETY: `envp` is a NULL-terminated array of C strings, per execve's contract.
        if let Some(fixed) = unsafe { keep_layer_in(envp) } {
            let mut pointers: Vec<*const c_char> = fixed.iter().map(|s| s.as_ptr()).collect();
            pointers.push(std::ptr::null());
            // SAFETY: `pointers` is a NULL-terminated array of valid C strings that outlives the
            // call (on success the image is replaced; on failure it is dropped after).
            return unsafe { real::execve(path, argv, pointers.as_ptr()) };
        }
    }
    // SAFETY: arguments passed through.
    unsafe { real::execve(path, argv, envp) }
}

/// Puts this process (about to execute a program the library cannot enter) under the syscall
/// supervisor's filter: the filter is installed on the calling thread, which `execve` turns
/// into the program, and its listener handed to the supervisor at `TETHER_SUPERVISOR_SOCKET`.
/// `Err`: why not, as the end of the warning line.
fn hand_over(unreachable: program::Unreachable) -> Result<(), String> {
    if unreachable == program::Unreachable::SetId {
        return Err(String::new());
    }
    let Some(socket) = std::env::var_os(channel::SUPERVISOR_ENV) else {
        return Err(String::new());
    };
    let stream = std::os::unix::net::UnixStream::connect(&socket)
        .map_err(|e| format!(" (the syscall supervisor is not reachable: {e})"))?;
    // The supervisor answers within the time it takes to copy a descriptor.
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    let filter = tether_sys::seccomp::Filter::trapping(&tether_intercept::syscalls::filter_spec());
    use std::os::fd::AsFd as _;
    match filter.install(stream.as_fd()) {
        Ok(()) => Ok(()),
        Err(tether_sys::seccomp::InstallError::Refused(e)) => Err(format!(
            " (the syscall supervisor's filter was refused: {e})"
        )),
        Err(error @ tether_sys::seccomp::InstallError::HandOver(_)) => {
            // The filter stays, with nobody to answer it: running the program now would make
            // each of its trapped calls fail. Stop here, as a failed exec does in a child.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "tether: cannot hand the program over to the syscall supervisor ({error}); not running it"
            );
            // SAFETY: ends the process at once, as a child whose exec failed does.
            unsafe { libc::_exit(126) }
        }
    }
}

/// The entries of `envp`, copied.
///
/// # Safety
/// `envp` must be null or a NULL-terminated array of valid C strings.
unsafe fn env_of(envp: *const *const c_char) -> Vec<CString> {
    let mut vars = Vec::new();
    let mut i = 0;
    while !envp.is_null() {
        // SAFETY: within the NULL-terminated array, per the contract.
        let entry = unsafe { *envp.add(i) };
        if entry.is_null() {
            break;
        }
        // SAFETY: each entry is a valid C string.
        vars.push(unsafe { CStr::from_ptr(entry) }.to_owned());
        i += 1;
    }
    vars
}

/// `envp` without the library in `LD_PRELOAD` (other preloaded libraries stay).
///
/// # Safety
/// `envp` must be null or a NULL-terminated array of valid C strings.
unsafe fn without_layer(envp: *const *const c_char) -> Vec<CString> {
    let library = std::env::var_os(LIBRARY_ENV).unwrap_or_default();
    let mut vars = Vec::new();
    // SAFETY: per the contract.
    for var in unsafe { env_of(envp) } {
        let Some(list) = var.to_bytes().strip_prefix(b"LD_PRELOAD=") else {
            vars.push(var);
            continue;
        };
        use std::os::unix::ffi::OsStrExt as _;
        let others: Vec<&[u8]> = list
            .split(|b| *b == b':' || *b == b' ')
            .filter(|entry| !entry.is_empty() && *entry != library.as_bytes())
            .collect();
        if !others.is_empty() {
            let mut kept = b"LD_PRELOAD=".to_vec();
            kept.extend_from_slice(&others.join(&b':'));
            vars.extend(CString::new(kept));
        }
    }
    vars
}

/// The environment `envp` plus the layer's variables, when a replaced environment dropped them.
///
/// # Safety
/// `envp` must be null or a NULL-terminated array of valid C strings.
unsafe fn keep_layer_in(envp: *const *const c_char) -> Option<Vec<CString>> {
    let socket = socket_path()?;
    let library = std::env::var_os(LIBRARY_ENV)?;
    // SAFETY: per the contract.
    let mut vars = unsafe { env_of(envp) };
    let has = |prefix: &str, needle: &[u8]| {
        vars.iter().any(|v| {
            v.to_bytes().starts_with(prefix.as_bytes())
                && v.to_bytes().windows(needle.len()).any(|w| w == needle)
        })
    };
    use std::os::unix::ffi::OsStrExt as _;
    let library = library.as_bytes();
    let socket = socket.as_os_str().as_bytes();
    if has("LD_PRELOAD=", library) && has(&format!("{SOCKET_ENV}="), socket) {
        return None;
    }
    vars.retain(|v| {
        !v.to_bytes().starts_with(b"LD_PRELOAD=")
            && !v
                .to_bytes()
                .starts_with(format!("{SOCKET_ENV}=").as_bytes())
    });
    let join = |key: &str, value: &[u8]| {
        let mut bytes = key.as_bytes().to_vec();
        bytes.push(b'=');
        bytes.extend_from_slice(value);
        CString::new(bytes).ok()
    };
    vars.push(join("LD_PRELOAD", library)?);
    vars.push(join(SOCKET_ENV, socket)?);
    vars.push(join(LIBRARY_ENV, library)?);
    Some(vars)
}
