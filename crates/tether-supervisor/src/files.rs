//! Paths: `open` of the target's files as real kernel objects the program holds, and the stat
//! family, `access` and `readlink` answered from the target.
//!
//! A file opened write-only is the write end of a pipe the supervisor copies to the target's
//! file. A file opened read-only is copied whole into a memfd (up to
//! [`plan::SNAPSHOT_MAX`](tether_intercept::plan::SNAPSHOT_MAX)) and the program gets a
//! read-only descriptor of it: `read`, `pread`, `mmap`, `fstat`'s size and `sendfile` need no
//! trap. A directory becomes a directory of empty placeholders with the target's names and
//! types, so `getdents64` lists it; a path relative to it is mapped back to the target.

use std::{
    io::Write as _,
    os::{fd::OwnedFd, unix::fs::symlink},
    path::{Component, Path, PathBuf},
    sync::Arc,
    sync::atomic::{AtomicU64, Ordering},
};

use tether_intercept::{
    plan::{self, Open, OpenPlan, RemoteOpen, RenamePlan},
    policy::FsRoute,
};
use tether_protocol::{
    FsAccess, FsHandle, FsMkdir, FsOpen, FsPath, FsRead, FsRename, FsStat, FsWrite, fs_request::Op,
    fs_response::Result as FsResult,
};
use tether_sys::seccomp::Reply;

use crate::{Answered, Call, Outcome, Shared};

/// The most bytes asked for in one read.
const READ_CHUNK: u32 = 1 << 20;

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

impl Shared {
    /// The path a call names, as the policy sees it: absolute as given, or relative to a
    /// stand-in directory (mapped to the target's). `None`: a path relative to a local
    /// directory, which stays local.
    fn path_arg(
        &self,
        call: &Call,
        dirfd_arg: Option<usize>,
        path_arg: usize,
    ) -> std::io::Result<Option<PathBuf>> {
        let path = call.memory().path(call.arg(path_arg))?;
        if path.is_absolute() {
            return Ok(Some(path));
        }
        let Some(dirfd_arg) = dirfd_arg else {
            return Ok(None);
        };
        let dirfd = call.fd_arg(dirfd_arg);
        if dirfd == libc::AT_FDCWD || path.as_os_str().is_empty() {
            return Ok(None);
        }
        // Only a stand-in directory (in the scratch directory, which the policy keeps local)
        // maps anywhere.
        let Ok(dir) = std::fs::read_link(format!("/proc/{}/fd/{dirfd}", call.notification.pid))
        else {
            return Ok(None);
        };
        if !dir.starts_with(&self.setup.scratch) {
            return Ok(None);
        }
        let state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(state.dirs.get(&dir).map(|remote| remote.join(path)))
    }

    /// Waits (bounded) until what the program wrote to `path` has reached the target.
    fn written(&self, path: &Path) {
        if !self
            .writers
            .wait(Some(path), std::time::Duration::from_secs(10))
        {
            tracing::warn!(path = %path.display(), "still being written after 10 s");
        }
    }

    fn route(&self, path: &Path, write: bool) -> FsRoute {
        self.policy.file(path, write)
    }

    pub(crate) fn open(
        &self,
        call: &Call,
        dirfd_arg: Option<usize>,
        path_arg: usize,
    ) -> std::io::Result<Outcome> {
        let Some(path) = self.path_arg(call, dirfd_arg, path_arg)? else {
            return Ok(Outcome::Now(Reply::Continue));
        };
        let open = Open {
            flags: call.arg(path_arg + 1) as i32,
            mode: call.arg(path_arg + 2) as u32,
        };
        match open.plan(Some(&self.policy), &path, false) {
            OpenPlan::Local => Ok(Outcome::Now(Reply::Continue)),
            OpenPlan::NotFound => Ok(Outcome::Now(Reply::Errno(libc::ENOENT))),
            OpenPlan::Remote if open.writes() && open.flags & libc::O_ACCMODE != libc::O_WRONLY => {
                self.warn_once(
                    "writes",
                    &format!(
                        "opening the target's files for reading and writing at once is not supported under the \
                         syscall supervisor yet: {} (and any other) fails with EROFS; write-only opens work",
                        path.display()
                    ),
                );
                Ok(Outcome::Now(Reply::Errno(libc::EROFS)))
            }
            OpenPlan::Remote if open.writes() => {
                let how = open.remote();
                Ok(Outcome::Later(Box::new(
                    move |shared: &Arc<Shared>| match shared.open_for_writing(&path, how) {
                        Ok(fd) => Answered::Fd {
                            fd,
                            cloexec: how.cloexec,
                        },
                        Err(errno) => Reply::Errno(errno).into(),
                    },
                )))
            }
            OpenPlan::Remote => {
                let how = open.remote();
                Ok(Outcome::Later(Box::new(
                    move |shared: &Arc<Shared>| match shared.open_remote(&path, how) {
                        Ok(fd) => Answered::Fd {
                            fd,
                            cloexec: how.cloexec,
                        },
                        Err(errno) => Reply::Errno(errno).into(),
                    },
                )))
            }
        }
    }

    /// Opens `path` in the target for writing; the program gets the write end of a pipe whose
    /// bytes a thread of the supervisor writes to the file in order, and which closes the file
    /// once every copy of that end is closed. The run waits for these writers before it ends
    /// ([`Supervisor::finish`](crate::Supervisor::finish)).
    fn open_for_writing(self: &Arc<Self>, path: &Path, how: RemoteOpen) -> Result<OwnedFd, i32> {
        let text = path.to_string_lossy().into_owned();
        let handle = match self.proxy.fs(Op::Open(FsOpen {
            path: text.clone(),
            flags: how.flags,
            mode: how.mode,
        }))? {
            FsResult::Opened(opened) => opened.handle,
            _ => return Err(libc::EIO),
        };
        let (read_end, write_end) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
            Ok(ends) => ends,
            Err(errno) => {
                let _ = self.proxy.fs(Op::Close(FsHandle { handle }));
                return Err(errno as i32);
            }
        };
        // Registered before the program gets its end: an open of the path after its first
        // write already waits for it.
        let registration = self.writers.register(path, read_end);
        let shared = self.clone();
        std::thread::Builder::new()
            .name("tether-supervised-write".into())
            .spawn(move || {
                shared.write_through(&registration.pipe, handle, &text);
                drop(registration);
            })
            .map_err(|_| libc::EAGAIN)?;
        Ok(write_end)
    }

    /// Copies what the program writes into the pipe to the target's file, then closes it.
    fn write_through(&self, pipe: &crate::writers::Pipe, handle: u64, path: &str) {
        let mut buffer = vec![0; tether_protocol::MAX_DATA_CHUNK];
        let mut failed = None;
        loop {
            pipe.wait_for_data();
            let n = match nix::unistd::read(&pipe.end, &mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => {
                    pipe.idle(&self.writers);
                    continue;
                }
                Err(errno) => {
                    failed = Some(errno as i32);
                    break;
                }
            };
            // Once a write failed the rest is drained, so the program never blocks on a pipe
            // nobody reads.
            if failed.is_none() {
                let write = Op::Write(FsWrite {
                    handle,
                    data: bytes::Bytes::copy_from_slice(&buffer[..n]),
                    offset: None,
                });
                if let Err(errno) = self.proxy.fs(write) {
                    failed = Some(errno);
                }
            }
            pipe.idle(&self.writers);
        }
        let _ = self.proxy.fs(Op::Close(FsHandle { handle }));
        if let Some(errno) = failed {
            (self.warn)(&format!(
                "writing {path} in the target failed ({}): what the program wrote after that is lost",
                std::io::Error::from_raw_os_error(errno)
            ));
        }
    }

    /// Opens `path` in the target and makes it a local kernel object.
    fn open_remote(&self, path: &Path, how: RemoteOpen) -> Result<OwnedFd, i32> {
        self.written(path);
        let text = path.to_string_lossy().into_owned();
        let handle = match self.proxy.fs(Op::Open(FsOpen {
            path: text.clone(),
            flags: how.flags,
            mode: how.mode,
        }))? {
            FsResult::Opened(opened) => opened.handle,
            _ => return Err(libc::EIO),
        };
        let made = self.materialize(path, handle);
        let _ = self.proxy.fs(Op::Close(FsHandle { handle }));
        made
    }

    fn materialize(&self, path: &Path, handle: u64) -> Result<OwnedFd, i32> {
        let stat = match self.proxy.fs(Op::Stat(FsStat {
            path: String::new(),
            handle,
            follow_symlinks: true,
        }))? {
            FsResult::Stat(stat) => stat,
            _ => return Err(libc::EIO),
        };
        if stat.mode & libc::S_IFMT == libc::S_IFDIR {
            // Listed through a handle opened as a directory.
            let how = RemoteOpen::directory();
            let listing = match self.proxy.fs(Op::Open(FsOpen {
                path: path.to_string_lossy().into_owned(),
                flags: how.flags,
                mode: how.mode,
            }))? {
                FsResult::Opened(opened) => opened.handle,
                _ => return Err(libc::EIO),
            };
            let made = self.stand_in_directory(path, listing);
            let _ = self.proxy.fs(Op::Close(FsHandle { handle: listing }));
            return made;
        }
        if !plan::snapshot_fits(stat.mode, stat.size) {
            self.warn_once(
                "big",
                &format!(
                    "{} is larger than {} MiB (or not a regular file): the syscall supervisor copies only smaller files \
                     from the target; the program gets EFBIG",
                    path.display(),
                    plan::SNAPSHOT_MAX >> 20
                ),
            );
            return Err(libc::EFBIG);
        }
        let memfd = nix::sys::memfd::memfd_create(
            c"tether-remote-file",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )
        .map_err(|e| e as i32)?;
        let mut file = std::fs::File::from(memfd);
        let mut offset = 0u64;
        loop {
            let data = match self.proxy.fs(Op::Read(FsRead {
                handle,
                len: READ_CHUNK,
                offset: Some(offset),
            }))? {
                FsResult::Data(data) => data,
                _ => return Err(libc::EIO),
            };
            file.write_all(&data.data).map_err(|_| libc::EIO)?;
            offset += data.data.len() as u64;
            if data.eof || data.data.is_empty() {
                break;
            }
        }
        // A read-only descriptor of the copy (the memfd itself is writable), at offset 0.
        use std::os::fd::AsRawFd as _;
        let read_only = std::fs::File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(|_| libc::EMFILE)?;
        Ok(read_only.into())
    }

    /// A local directory with the target directory's entries as placeholders, opened.
    fn stand_in_directory(&self, path: &Path, handle: u64) -> Result<OwnedFd, i32> {
        let dir = self
            .setup
            .scratch
            .join(format!("dir-{}", NEXT_DIR.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir_all(&dir).map_err(|_| libc::EIO)?;
        loop {
            let entries = match self.proxy.fs(Op::ReadDir(FsHandle { handle }))? {
                FsResult::Entries(entries) => entries,
                _ => return Err(libc::EIO),
            };
            for entry in &entries.entries {
                // A name from the network never leaves the stand-in.
                let name = Path::new(&entry.name);
                if !matches!(
                    name.components().collect::<Vec<_>>()[..],
                    [Component::Normal(_)]
                ) {
                    continue;
                }
                let place = dir.join(name);
                let made = match u8::try_from(entry.kind).unwrap_or(0) {
                    libc::DT_DIR => std::fs::create_dir(&place),
                    libc::DT_LNK => symlink(path.join(name), &place),
                    _ => std::fs::File::create(&place).map(drop),
                };
                if let Err(error) = made {
                    tracing::debug!(%error, place = %place.display(), "a placeholder was not made");
                }
            }
            if entries.done || entries.entries.is_empty() {
                break;
            }
        }
        let opened = std::fs::File::open(&dir).map_err(|_| libc::EIO)?;
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .dirs
            .insert(dir, path.to_path_buf());
        Ok(opened.into())
    }

    /// The path a call names when it goes to the target; otherwise what the call gets at once
    /// (run as made, or `ENOENT` for a path the policy hides).
    fn remote_path(
        &self,
        call: &Call,
        dirfd_arg: Option<usize>,
        path_arg: usize,
        write: bool,
    ) -> std::io::Result<Result<PathBuf, Outcome>> {
        let Some(path) = self.path_arg(call, dirfd_arg, path_arg)? else {
            return Ok(Err(Outcome::Now(Reply::Continue)));
        };
        Ok(match self.route(&path, write) {
            FsRoute::Local => Err(Outcome::Now(Reply::Continue)),
            FsRoute::NotFound => Err(Outcome::Now(Reply::Errno(libc::ENOENT))),
            FsRoute::Remote => Ok(path),
        })
    }

    pub(crate) fn stat(
        &self,
        call: &Call,
        dirfd_arg: Option<usize>,
        path_arg: usize,
        follow: bool,
    ) -> std::io::Result<Outcome> {
        let path = match self.remote_path(call, dirfd_arg, path_arg, false)? {
            Ok(path) => path,
            Err(now) => return Ok(now),
        };
        let statx = call.notification.nr == libc::SYS_statx;
        // statx(dirfd, path, flags, mask, buf); the others have the buffer right after the path.
        let out = if statx {
            call.arg(4)
        } else {
            call.arg(path_arg + 1)
        };
        let memory = call.memory();
        Ok(Outcome::Later(Box::new(move |shared: &Arc<Shared>| {
            shared.written(&path);
            let stat = match shared.proxy.fs(Op::Stat(FsStat {
                path: path.to_string_lossy().into_owned(),
                handle: 0,
                follow_symlinks: follow,
            })) {
                Ok(FsResult::Stat(stat)) => stat,
                Ok(_) => return Reply::Errno(libc::EIO).into(),
                Err(errno) => return Reply::Errno(errno).into(),
            };
            let bytes = if statx {
                tether_sys::seccomp::statx_bytes(|x| tether_intercept::stat::fill_statx(&stat, x))
            } else {
                tether_sys::seccomp::stat_bytes(|st| tether_intercept::stat::fill_stat(&stat, st))
            };
            match memory.write(out, &bytes) {
                Ok(()) => Reply::Value(0).into(),
                Err(_) => Reply::Errno(libc::EFAULT).into(),
            }
        })))
    }

    /// A call the target answers with success or an errno: `op` built from the path.
    fn remote_change(
        &self,
        call: &Call,
        dirfd_arg: Option<usize>,
        path_arg: usize,
        write: bool,
        op: impl FnOnce(String) -> Op + Send + 'static,
    ) -> std::io::Result<Outcome> {
        let path = match self.remote_path(call, dirfd_arg, path_arg, write)? {
            Ok(path) => path,
            Err(now) => return Ok(now),
        };
        Ok(Outcome::Later(Box::new(move |shared: &Arc<Shared>| {
            match shared.proxy.fs(op(path.to_string_lossy().into_owned())) {
                Ok(_) => Reply::Value(0),
                Err(errno) => Reply::Errno(errno),
            }
            .into()
        })))
    }

    pub(crate) fn access(
        &self,
        call: &Call,
        dirfd_arg: Option<usize>,
        path_arg: usize,
    ) -> std::io::Result<Outcome> {
        let mode = call.arg(path_arg + 1) as u32;
        let write = mode & libc::W_OK as u32 != 0;
        self.remote_change(call, dirfd_arg, path_arg, write, move |path| {
            Op::Access(FsAccess { path, mode })
        })
    }

    pub(crate) fn readlink(
        &self,
        call: &Call,
        dirfd_arg: Option<usize>,
        path_arg: usize,
    ) -> std::io::Result<Outcome> {
        let path = match self.remote_path(call, dirfd_arg, path_arg, false)? {
            Ok(path) => path,
            Err(now) => return Ok(now),
        };
        let (out, size) = (call.arg(path_arg + 1), call.arg(path_arg + 2) as usize);
        let memory = call.memory();
        Ok(Outcome::Later(Box::new(move |shared: &Arc<Shared>| {
            let target = match shared.proxy.fs(Op::ReadLink(FsPath {
                path: path.to_string_lossy().into_owned(),
            })) {
                Ok(FsResult::Path(target)) => target,
                Ok(_) => return Reply::Errno(libc::EIO).into(),
                Err(errno) => return Reply::Errno(errno).into(),
            };
            // readlink truncates silently and writes no NUL.
            let bytes = &target.as_bytes()[..target.len().min(size)];
            match memory.write(out, bytes) {
                Ok(()) => Reply::Value(bytes.len() as i64).into(),
                Err(_) => Reply::Errno(libc::EFAULT).into(),
            }
        })))
    }

    /// `openat2`: the supervisor cannot honour its resolve flags for a target path, so such a
    /// call fails with `ENOSYS` (callers fall back to `openat`); local paths run as made.
    pub(crate) fn openat2(&self, call: &Call) -> std::io::Result<Outcome> {
        Ok(match self.remote_path(call, Some(0), 1, false)? {
            Ok(_) => Outcome::Now(Reply::Errno(libc::ENOSYS)),
            Err(now) => now,
        })
    }

    pub(crate) fn mkdir(
        &self,
        call: &Call,
        dirfd_arg: Option<usize>,
        path_arg: usize,
    ) -> std::io::Result<Outcome> {
        let mode = call.arg(path_arg + 1) as u32 & 0o7777;
        self.remote_change(call, dirfd_arg, path_arg, true, move |path| {
            Op::Mkdir(FsMkdir { path, mode })
        })
    }

    pub(crate) fn unlink(
        &self,
        call: &Call,
        dirfd_arg: Option<usize>,
        path_arg: usize,
        directory: bool,
    ) -> std::io::Result<Outcome> {
        if !directory {
            return self.remote_change(call, dirfd_arg, path_arg, true, |path| {
                Op::Unlink(FsPath { path })
            });
        }
        Ok(match self.remote_path(call, dirfd_arg, path_arg, true)? {
            Ok(path) => {
                self.warn_once(
                    "rmdir",
                    &format!(
                        "removing the target's directories is not supported yet: {} (and any other) fails with EROFS",
                        path.display()
                    ),
                );
                Outcome::Now(Reply::Errno(libc::EROFS))
            }
            Err(now) => now,
        })
    }

    pub(crate) fn rename(
        &self,
        call: &Call,
        from_dirfd: Option<usize>,
        from_arg: usize,
        to_dirfd: Option<usize>,
        to_arg: usize,
        flags: u32,
    ) -> std::io::Result<Outcome> {
        let from = self.path_arg(call, from_dirfd, from_arg)?;
        let to = self.path_arg(call, to_dirfd, to_arg)?;
        // A path relative to a local directory is local; the plan decides the pair.
        let (from_path, to_path) = match (&from, &to) {
            (Some(from), Some(to)) => (from.clone(), to.clone()),
            (None, None) => return Ok(Outcome::Now(Reply::Continue)),
            (Some(one), None) | (None, Some(one)) => match self.route(one, true) {
                FsRoute::Local => return Ok(Outcome::Now(Reply::Continue)),
                FsRoute::NotFound => return Ok(Outcome::Now(Reply::Errno(libc::ENOENT))),
                FsRoute::Remote => return Ok(Outcome::Now(Reply::Errno(libc::EXDEV))),
            },
        };
        Ok(
            match plan::rename(Some(&self.policy), &from_path, &to_path) {
                RenamePlan::Local => Outcome::Now(Reply::Continue),
                RenamePlan::Fail(errno) => Outcome::Now(Reply::Errno(errno)),
                // RENAME_NOREPLACE and friends: as a kernel without them.
                RenamePlan::Remote if flags != 0 => Outcome::Now(Reply::Errno(libc::EINVAL)),
                RenamePlan::Remote => Outcome::Later(Box::new(move |shared: &Arc<Shared>| {
                    let op = Op::Rename(FsRename {
                        from: from_path.to_string_lossy().into_owned(),
                        to: to_path.to_string_lossy().into_owned(),
                    });
                    match shared.proxy.fs(op) {
                        Ok(_) => Reply::Value(0),
                        Err(errno) => Reply::Errno(errno),
                    }
                    .into()
                })),
            },
        )
    }
}
