//! The syscall supervisor: tether's interception for programs the preloaded layer cannot enter
//! (Go programs, static executables), at the level of system calls.
//!
//! `tether exec` starts such a program under a seccomp filter that traps only the calls listed
//! in [`tether_intercept::syscalls`] and hands their notifications to a [`Supervisor`] thread
//! in the `tether` process. For each call the supervisor reads the arguments from the program's
//! memory, takes the same decision the preloaded layer would ([`tether_intercept::policy`],
//! [`tether_intercept::plan`]) and either lets the call run as made (most calls: a local file,
//! a loopback connection) or carries it out on the program's own objects:
//!
//! - `connect` to a destination in the target: the program's socket (a copy through
//!   `pidfd_getfd`, the same open socket) is bound to loopback and connected to the proxy's
//!   relay for a stream opened in the target; `getpeername` reports the destination. Datagrams
//!   sent to the target on an unconnected socket go through a relay too, and come back as from
//!   their destination.
//! - `listen`: the listener is subscribed to the target's port like the layer's; `accept` of a
//!   connection the proxy delivered reports the real remote client.
//! - `open` of a target file: a real kernel object the program holds — a sealed copy (memfd) of
//!   a file, a directory of placeholders for a directory — installed with
//!   `SECCOMP_ADDFD_FLAG_SEND`; the stat family, `access` and `readlink` are answered from the
//!   target.
//!
//! Stolen and mirrored bytes never pass through the supervisor: they flow on real sockets
//! between the proxy and the program.
//!
//! Architecture Invariant: no `unsafe` here; the kernel interface is `tether_sys::seccomp`.
//! Architecture Invariant: every decision comes from `tether-intercept`; this crate only
//! carries decisions out, and speaks to the proxy on the layer's channel.

mod files;
mod memory;
mod net;
mod proxy;
mod udp;
mod writers;

use std::{
    collections::{HashMap, HashSet},
    io,
    net::SocketAddr,
    os::fd::OwnedFd,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use tether_intercept::{
    channel::{Answer, Request},
    policy::{LocalPlaces, Policy},
};
pub use tether_sys::seccomp::{Filter, Listener, Support, support};
use tether_sys::seccomp::{Notification, Readiness, Reply};

use crate::memory::Memory;

/// The filter a supervised program runs under.
pub fn filter() -> Filter {
    Filter::trapping(&tether_intercept::syscalls::filter_spec())
}

/// What the supervisor needs from its run.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The proxy's channel socket (as the layer's `TETHER_LAYER_SOCKET`).
    pub socket: PathBuf,
    /// A private directory for stand-ins of the target's directories (the caller removes it).
    pub scratch: PathBuf,
    /// The supervised program's own places (its executable, working directory, home), which
    /// stay local.
    pub places: LocalPlaces,
}

/// Serves the notifications of supervised programs (one [`Listener`] per program tree).
#[derive(Clone)]
pub struct Supervisor {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("socket", &self.shared.setup.socket)
            .finish_non_exhaustive()
    }
}

struct Shared {
    setup: Setup,
    policy: Policy,
    proxy: proxy::Proxy,
    state: Mutex<State>,
    /// Tells the user something once (by key).
    warn: Box<dyn Fn(&str) + Send + Sync>,
    warned: Mutex<HashSet<&'static str>>,
    /// Copies of written files to the target still going on.
    writers: Arc<writers::Writers>,
}

/// What the supervisor remembers about the program's sockets and stand-ins. Sockets are known
/// by inode (a number the program may reuse after a close the supervisor never sees is checked
/// against the socket's real peer before it is trusted).
#[derive(Debug, Default)]
struct State {
    /// Requested port of each socket's last `bind` (0: the kernel picks).
    bound: HashMap<u64, u16>,
    /// Listeners subscribed in the target.
    listeners: HashSet<u64>,
    /// Sockets whose peer the program must see as another address: (what it reports, the
    /// socket's real peer).
    peers: HashMap<u64, (SocketAddr, SocketAddr)>,
    /// Stand-in directories, by their local path: the target directory each stands for.
    dirs: HashMap<PathBuf, PathBuf>,
    /// UDP relays of unconnected sockets: (destination, the proxy's relay address).
    relays: HashMap<u64, Vec<(SocketAddr, SocketAddr)>>,
}

impl Supervisor {
    /// Asks the proxy for the policy. `warn` tells the user one line.
    pub fn start(
        setup: Setup,
        warn: impl Fn(&str) + Send + Sync + 'static,
    ) -> io::Result<Supervisor> {
        let proxy = proxy::Proxy::new(setup.socket.clone());
        let spec = match proxy.ask(&Request::Policy)? {
            Answer::Policy(spec) => spec,
            other => {
                return Err(io::Error::other(format!(
                    "the proxy answered {other:?} when asked for the policy"
                )));
            }
        };
        let policy = Policy::new(&spec, &setup.places);
        let supervisor = Supervisor {
            shared: Arc::new(Shared {
                setup,
                policy,
                proxy,
                state: Mutex::new(State::default()),
                warn: Box::new(warn),
                warned: Mutex::new(HashSet::new()),
                writers: Arc::default(),
            }),
        };
        if supervisor.shared.policy.filters_by_name() {
            supervisor.shared.warn_once(
                "names",
                "outgoing and DNS filters that name hosts apply to programs under the syscall supervisor \
                 by address only (such a program resolves names itself)",
            );
        }
        Ok(supervisor)
    }

    /// Takes programs handed over by the preloaded layer (its `execve` of a program it cannot
    /// enter) on a Unix socket at `path`, and serves each.
    pub fn accept_handoffs(&self, path: &std::path::Path) -> io::Result<()> {
        let sockets = std::os::unix::net::UnixListener::bind(path)?;
        let supervisor = self.clone();
        std::thread::Builder::new()
            .name("tether-supervisor-handoffs".into())
            .spawn(move || {
                for stream in sockets.incoming() {
                    let Ok(mut stream) = stream else { continue };
                    let supervisor = supervisor.clone();
                    // The process that connected is the one that must hand itself over.
                    let peer = nix::sys::socket::getsockopt(
                        &stream,
                        nix::sys::socket::sockopt::PeerCredentials,
                    )
                    .map(|credentials| credentials.pid() as u32)
                    .unwrap_or(0);
                    std::thread::spawn(move || match Listener::take(&mut stream, Some(peer)) {
                        Ok(listener) => drop(supervisor.serve(listener)),
                        Err(error) => tracing::debug!(%error, "a hand-over failed"),
                    });
                }
            })?;
        Ok(())
    }

    /// Waits (at most `limit`) until what supervised programs wrote to the target's files has
    /// been written there; false if some is still being written.
    pub fn finish(&self, limit: std::time::Duration) -> bool {
        self.shared.writers.wait(None, limit)
    }

    /// Serves `listener` on a thread of its own until every process under it has exited.
    pub fn serve(&self, listener: Listener) -> std::thread::JoinHandle<()> {
        let shared = self.shared.clone();
        std::thread::Builder::new()
            .name("tether-supervisor".into())
            .spawn(move || shared.run(Arc::new(listener)))
            .expect("a thread for the supervisor")
    }
}

/// One trapped call.
#[derive(Clone)]
struct Call {
    notification: Notification,
    listener: Arc<Listener>,
}

/// What to answer, now or after work that waits on the proxy.
enum Outcome {
    Now(Reply),
    /// Carried out on a thread of its own (it asks the proxy, or waits on a socket).
    Later(Work),
}

/// A call's work off the receiving thread.
type Work = Box<dyn FnOnce(&Arc<Shared>) -> Answered + Send>;

/// The answer to a call carried out later.
enum Answered {
    Reply(Reply),
    /// The call returns a new descriptor in the program: a copy of this one.
    Fd {
        fd: OwnedFd,
        cloexec: bool,
    },
}

impl From<Reply> for Answered {
    fn from(reply: Reply) -> Answered {
        Answered::Reply(reply)
    }
}

fn errno_of(error: &io::Error) -> i32 {
    error.raw_os_error().unwrap_or(libc::EIO)
}

impl Call {
    fn arg(&self, i: usize) -> u64 {
        self.notification.args[i]
    }

    /// An argument that is a file descriptor (the kernel takes the low 32 bits).
    fn fd_arg(&self, i: usize) -> i32 {
        self.arg(i) as u32 as i32
    }

    fn memory(&self) -> Memory {
        let (listener, id) = (self.listener.clone(), self.notification.id);
        Memory {
            tid: self.notification.pid,
            valid: Some(Arc::new(move || listener.valid(id))),
        }
    }

    /// The calling process (its thread group), for descriptor copies.
    fn process(&self) -> io::Result<u32> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.notification.pid))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("Tgid:"))
            .and_then(|tgid| tgid.trim().parse().ok())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))
    }

    /// A copy of the program's descriptor in argument `i`; checked to still belong to this call
    /// (the thread id may have been reused).
    fn fd(&self, i: usize) -> io::Result<OwnedFd> {
        let fd = match tether_sys::seccomp::thread_fd(self.notification.pid, self.fd_arg(i)) {
            Some(fd) => fd?,
            None => tether_sys::seccomp::process_fd(self.process()?, self.fd_arg(i))?,
        };
        if !self.valid() {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(fd)
    }

    fn valid(&self) -> bool {
        self.listener.valid(self.notification.id)
    }

    fn answer(&self, answered: Answered) {
        let id = self.notification.id;
        let result = match answered {
            Answered::Reply(reply) => self.listener.reply(id, reply),
            Answered::Fd { fd, cloexec } => {
                use std::os::fd::AsFd as _;
                self.listener
                    .reply_with_fd(id, fd.as_fd(), cloexec)
                    .map(drop)
            }
        };
        // ENOENT: the caller was interrupted or died meanwhile; nothing waits for the answer.
        if let Err(error) = result
            && error.raw_os_error() != Some(libc::ENOENT)
        {
            tracing::debug!(%error, nr = self.notification.nr, "answering a trapped call failed");
        }
    }
}

impl Shared {
    fn run(self: Arc<Self>, listener: Arc<Listener>) {
        loop {
            match listener.wait(-1) {
                Ok(Readiness::Ready) => {}
                Ok(Readiness::Idle) => continue,
                Ok(Readiness::Gone) => return,
                Err(error) => {
                    (self.warn)(&format!("the syscall supervisor stopped: {error}"));
                    return;
                }
            }
            let notification = match listener.receive_notification() {
                Ok(notification) => notification,
                // The caller went away between poll and receive.
                Err(error) if matches!(error.raw_os_error(), Some(libc::ENOENT | libc::EINTR)) => {
                    continue;
                }
                Err(error) => {
                    (self.warn)(&format!("the syscall supervisor stopped: {error}"));
                    return;
                }
            };
            let call = Call {
                notification,
                listener: listener.clone(),
            };
            match self.decide(&call) {
                Outcome::Now(reply) => call.answer(Answered::Reply(reply)),
                Outcome::Later(work) => {
                    let shared = self.clone();
                    let caller = call.clone();
                    let spawned = std::thread::Builder::new()
                        .name("tether-supervised-call".into())
                        .spawn(move || {
                            // A bug here must not leave the program's thread waiting forever.
                            let answered =
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                    work(&shared)
                                }))
                                .unwrap_or(Answered::Reply(Reply::Errno(libc::EIO)));
                            call.answer(answered);
                        });
                    if let Err(error) = spawned {
                        tracing::warn!(%error, "no thread for a trapped call");
                        caller.answer(Answered::Reply(Reply::Errno(libc::EAGAIN)));
                    }
                }
            }
        }
    }

    /// What to do with one call. Reading the program's memory may fail (a bad pointer): the
    /// call then runs as made, and the kernel gives the program its own error.
    fn decide(&self, call: &Call) -> Outcome {
        let outcome = match call.notification.nr {
            libc::SYS_connect => self.connect(call),
            libc::SYS_getpeername => self.getpeername(call),
            libc::SYS_sendto => self.sendto(call),
            libc::SYS_recvfrom => self.recvfrom(call),
            libc::SYS_sendmsg => self.sendmsg(call),
            libc::SYS_recvmsg => self.recvmsg(call),
            libc::SYS_sendmmsg => self.sendmmsg(call),
            libc::SYS_bind => self.bind(call),
            libc::SYS_listen => self.listen(call),
            libc::SYS_accept | libc::SYS_accept4 => self.accept(call),
            libc::SYS_open => self.open(call, None, 0),
            libc::SYS_openat => self.open(call, Some(0), 1),
            libc::SYS_stat => self.stat(call, None, 0, true),
            libc::SYS_lstat => self.stat(call, None, 0, false),
            libc::SYS_newfstatat => {
                let follow = call.arg(3) as i32 & libc::AT_SYMLINK_NOFOLLOW == 0;
                self.stat(call, Some(0), 1, follow)
            }
            libc::SYS_statx => {
                let follow = call.arg(2) as i32 & libc::AT_SYMLINK_NOFOLLOW == 0;
                self.stat(call, Some(0), 1, follow)
            }
            libc::SYS_access => self.access(call, None, 0),
            libc::SYS_faccessat | libc::SYS_faccessat2 => self.access(call, Some(0), 1),
            libc::SYS_readlink => self.readlink(call, None, 0),
            libc::SYS_openat2 => self.openat2(call),
            libc::SYS_mkdir => self.mkdir(call, None, 0),
            libc::SYS_mkdirat => self.mkdir(call, Some(0), 1),
            libc::SYS_unlink => self.unlink(call, None, 0, false),
            libc::SYS_rmdir => self.unlink(call, None, 0, true),
            libc::SYS_unlinkat => {
                let directory = call.arg(2) as i32 & libc::AT_REMOVEDIR != 0;
                self.unlink(call, Some(0), 1, directory)
            }
            libc::SYS_rename => self.rename(call, None, 0, None, 1, 0),
            libc::SYS_renameat => self.rename(call, Some(0), 1, Some(2), 3, 0),
            libc::SYS_renameat2 => self.rename(call, Some(0), 1, Some(2), 3, call.arg(4) as u32),
            libc::SYS_readlinkat => self.readlink(call, Some(0), 1),
            _ => Ok(Outcome::Now(Reply::Continue)),
        };
        outcome.unwrap_or_else(|error| {
            // Never silent: a process whose memory or descriptors the supervisor may not reach
            // (no ptrace permission: say, `kernel.yama.ptrace_scope` and a process that left
            // tether's tree) is named.
            if matches!(error.raw_os_error(), Some(libc::EPERM | libc::EACCES)) {
                self.warn_once(
                    "permission",
                    &format!(
                        "the syscall supervisor may not read process {}'s calls ({error}): they run on this machine \
                         (run tether as root, or lower kernel.yama.ptrace_scope)",
                        call.notification.pid
                    ),
                );
            }
            Outcome::Now(Reply::Continue)
        })
    }

    fn warn_once(&self, key: &'static str, message: &str) {
        if self
            .warned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key)
        {
            (self.warn)(message);
        }
    }
}

/// A socket's inode (its identity while open).
fn inode(fd: &OwnedFd) -> io::Result<u64> {
    Ok(nix::sys::stat::fstat(fd)?.st_ino)
}
