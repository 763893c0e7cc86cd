//! Files of the target, for the local process: opened, read, written and listed under the
//! target's root (`/proc/PID/root` for a process target, `/` for a bare network namespace).
//!
//! Architecture Invariant: no path given by a client is ever resolved outside the root. Every
//! lookup goes through `openat2(root, path, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`: the kernel
//! refuses a `..` that would climb above the root and every absolute symlink (EXDEV), which this
//! module answers with EACCES and a warning. Operations on the last component (unlink, mkdir,
//! rename) open its parent that way and then act on one plain name, never a path.

use std::{
    collections::{HashMap, VecDeque},
    fs::File,
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    os::{
        fd::{AsFd as _, OwnedFd},
        unix::fs::FileExt as _,
    },
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use nix::{
    errno::Errno,
    fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat2},
    sys::stat::Mode,
};
use tether_protocol::{
    DirEntries, DirEntry, ErrorCode, ErrorInfo, FileStat, FsData, FsHandle, FsResponse, Whence,
    fs_request::Op, fs_response::Result as FsResult, open_flags,
};

/// The most bytes one read returns (a frame holds at most 1 MiB).
pub const MAX_READ: u32 = 512 * 1024;

/// Directory entries per answer.
const DIR_BATCH: usize = 1024;

/// The root every path is resolved under.
#[derive(Debug)]
pub struct Root {
    dir: OwnedFd,
    /// For messages: `/proc/42/root`, `/`.
    pub label: PathBuf,
}

impl Root {
    /// Opens `path` (a directory: the target's root) once; later lookups start from it even if
    /// the path would name something else by then.
    pub fn open(path: impl Into<PathBuf>) -> std::io::Result<Root> {
        let label = path.into();
        let dir = nix::fcntl::open(
            &label,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Root { dir, label })
    }

    /// Reads a whole (small) file under the root, with the same checks as every client request.
    pub fn read(&self, path: &str) -> std::io::Result<Vec<u8>> {
        let fd = self
            .resolve(path, OFlag::O_RDONLY, 0)
            .map_err(|refusal| match refusal {
                Refusal::Errno(errno) => std::io::Error::from(errno),
                Refusal::Escape(_) => std::io::Error::from_raw_os_error(libc::EACCES),
            })?;
        let mut bytes = Vec::new();
        File::from(fd).read_to_end(&mut bytes)?;
        Ok(bytes)
    }

    /// Resolves the absolute `path` under the root and opens it with `flags`.
    fn resolve(&self, path: &str, flags: OFlag, mode: u32) -> Result<OwnedFd, Refusal> {
        let relative = relative(path)?;
        // openat2 refuses a mode without O_CREAT (open ignores it).
        let mode = if flags.contains(OFlag::O_CREAT) {
            mode
        } else {
            0
        };
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .mode(Mode::from_bits_truncate(mode))
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        openat2(self.dir.as_fd(), relative, how).map_err(|errno| match errno {
            Errno::EXDEV => Refusal::Escape(path.to_owned()),
            other => Refusal::Errno(other),
        })
    }

    /// The parent directory of `path` (resolved safely) and its last component.
    fn parent_of<'p>(&self, path: &'p str) -> Result<(OwnedFd, &'p str), Refusal> {
        let trimmed = path.trim_end_matches('/');
        let (parent, name) = trimmed
            .rsplit_once('/')
            .ok_or(Refusal::Errno(Errno::EINVAL))?;
        if name.is_empty() || name == "." || name == ".." {
            return Err(Refusal::Errno(Errno::EINVAL));
        }
        let parent = if parent.is_empty() { "/" } else { parent };
        let dir = self.resolve(parent, OFlag::O_PATH | OFlag::O_DIRECTORY, 0)?;
        Ok((dir, name))
    }

    /// `realpath` inside the root: every symlink followed (relative ones only: absolute ones are
    /// refused like everywhere else), `.`/`..` folded, the result as the target sees it.
    fn real_path(&self, path: &str) -> Result<String, Refusal> {
        let mut pending: VecDeque<String> = relative(path)?
            .split('/')
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect();
        let mut done: Vec<String> = Vec::new();
        let mut links = 0;
        while let Some(component) = pending.pop_front() {
            match component.as_str() {
                "." => continue,
                ".." => {
                    if done.pop().is_none() {
                        return Err(Refusal::Escape(path.to_owned()));
                    }
                    continue;
                }
                _ => {}
            }
            let candidate = format!(
                "/{}",
                [done.as_slice(), std::slice::from_ref(&component)]
                    .concat()
                    .join("/")
            );
            let fd = self.resolve(&candidate, OFlag::O_PATH | OFlag::O_NOFOLLOW, 0)?;
            let stat = nix::sys::stat::fstat(fd.as_fd()).map_err(Refusal::Errno)?;
            if stat.st_mode & libc::S_IFMT == libc::S_IFLNK {
                links += 1;
                if links > 40 {
                    return Err(Refusal::Errno(Errno::ELOOP));
                }
                let target = nix::fcntl::readlinkat(fd.as_fd(), "").map_err(Refusal::Errno)?;
                let target = target.to_string_lossy().into_owned();
                if target.starts_with('/') {
                    return Err(Refusal::Escape(path.to_owned()));
                }
                for (i, part) in target.split('/').filter(|c| !c.is_empty()).enumerate() {
                    pending.insert(i, part.to_owned());
                }
            } else {
                done.push(component);
            }
        }
        Ok(format!("/{}", done.join("/")))
    }
}

/// `path` without its leading `/`, or `.` for the root; relative paths are refused (the client
/// resolves them against its own working directory first).
fn relative(path: &str) -> Result<&str, Refusal> {
    if !path.starts_with('/') || path.contains('\0') {
        return Err(Refusal::Errno(Errno::EINVAL));
    }
    let relative = path.trim_start_matches('/');
    Ok(if relative.is_empty() { "." } else { relative })
}

/// Why an operation failed.
#[derive(Debug)]
enum Refusal {
    Errno(Errno),
    /// The path tried to leave the root.
    Escape(String),
}

enum Handle {
    File(Arc<File>),
    /// A listed directory: the entries not yet sent, and the directory itself (for `fstat`).
    Dir(Mutex<VecDeque<DirEntry>>, OwnedFd),
}

/// One session's open files, by handle. Dropped with the session: every file closes.
pub struct Files {
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next: AtomicU64,
}

impl Default for Files {
    /// Handles start at a random point (below 2^48), so a handle of another session (the
    /// session of a pod that was replaced, whose files the process still holds) is unknown
    /// here, and answered with EBADF, instead of naming another file.
    fn default() -> Files {
        Files {
            handles: Mutex::default(),
            next: AtomicU64::new(u64::from(rand::random::<u32>()) << 16),
        }
    }
}

impl std::fmt::Debug for Files {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let open = self.handles.lock().map_or(0, |h| h.len());
        f.debug_struct("Files").field("open", &open).finish()
    }
}

#[derive(Debug)]
/// What one operation produced, plus a warning for the user when it was an escape attempt.
pub struct Outcome {
    pub result: Result<FsResponse, ErrorInfo>,
    pub warning: Option<String>,
}

impl Files {
    /// Runs one operation (blocking: call it off the runtime's threads).
    pub fn run(&self, root: &Root, op: Op) -> Outcome {
        match self.dispatch(root, op) {
            Ok(result) => Outcome {
                result: Ok(FsResponse {
                    result: Some(result),
                }),
                warning: None,
            },
            Err(Refusal::Errno(errno)) => Outcome {
                result: Err(errno_error(errno)),
                warning: None,
            },
            Err(Refusal::Escape(path)) => {
                let message = format!(
                    "refused {path:?}: it leads outside the target's root ({}) through `..` or an absolute symlink",
                    root.label.display()
                );
                Outcome {
                    result: Err(ErrorInfo {
                        code: ErrorCode::PermissionDenied as i32,
                        message: message.clone(),
                        in_reply_to_seq: 0,
                        errno: libc::EACCES,
                    }),
                    warning: Some(message),
                }
            }
        }
    }

    fn dispatch(&self, root: &Root, op: Op) -> Result<FsResult, Refusal> {
        match op {
            Op::Open(open) => {
                let flags = oflags(open.flags);
                let fd = root.resolve(&open.path, flags, open.mode)?;
                let handle = if open.flags & open_flags::DIRECTORY != 0 {
                    let dir = fd.try_clone().map_err(|e| io_refusal(&e))?;
                    Handle::Dir(Mutex::new(list_dir(fd)?), dir)
                } else {
                    let file = File::from(fd);
                    // Directories opened without asking for one are listed too (`opendir` in
                    // some libcs opens first and checks after).
                    Handle::File(Arc::new(file))
                };
                let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
                self.handles
                    .lock()
                    .expect("files lock")
                    .insert(id, Arc::new(handle));
                Ok(FsResult::Opened(FsHandle { handle: id }))
            }
            Op::Read(read) => {
                let file = self.file(read.handle)?;
                let len = read.len.min(MAX_READ) as usize;
                let mut buf = vec![0u8; len];
                let mut filled = 0;
                // Fill the buffer: a short answer then means the end of the file.
                while filled < len {
                    let n = match read.offset {
                        Some(offset) => file.read_at(&mut buf[filled..], offset + filled as u64),
                        None => (&*file).read(&mut buf[filled..]),
                    };
                    match n {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(io_refusal(&e)),
                    }
                }
                buf.truncate(filled);
                Ok(FsResult::Data(FsData {
                    eof: filled < len,
                    data: Bytes::from(buf),
                }))
            }
            Op::Write(write) => {
                let file = self.file(write.handle)?;
                match write.offset {
                    Some(offset) => file.write_all_at(&write.data, offset),
                    None => (&*file).write_all(&write.data),
                }
                .map_err(|e| io_refusal(&e))?;
                Ok(FsResult::Written(write.data.len() as u64))
            }
            Op::Seek(seek) => {
                let file = self.file(seek.handle)?;
                let to = match seek.whence() {
                    Whence::Set => SeekFrom::Start(
                        u64::try_from(seek.offset).map_err(|_| Refusal::Errno(Errno::EINVAL))?,
                    ),
                    Whence::Current => SeekFrom::Current(seek.offset),
                    Whence::End => SeekFrom::End(seek.offset),
                };
                let position = (&*file).seek(to).map_err(|e| io_refusal(&e))?;
                Ok(FsResult::Position(position))
            }
            Op::Close(close) => {
                self.handles
                    .lock()
                    .expect("files lock")
                    .remove(&close.handle)
                    .ok_or(Refusal::Errno(Errno::EBADF))?;
                Ok(FsResult::Written(0))
            }
            Op::Stat(stat) => {
                let raw = if stat.path.is_empty() {
                    match &*self.handle(stat.handle)? {
                        Handle::File(file) => nix::sys::stat::fstat(file.as_fd()),
                        Handle::Dir(_, dir) => nix::sys::stat::fstat(dir.as_fd()),
                    }
                } else {
                    let mut flags = OFlag::O_PATH;
                    if !stat.follow_symlinks {
                        flags |= OFlag::O_NOFOLLOW;
                    }
                    let fd = root.resolve(&stat.path, flags, 0)?;
                    nix::sys::stat::fstat(fd.as_fd())
                }
                .map_err(Refusal::Errno)?;
                Ok(FsResult::Stat(file_stat(&raw)))
            }
            Op::ReadDir(handle) => {
                let found = self.handle(handle.handle)?;
                let Handle::Dir(entries, _) = &*found else {
                    return Err(Refusal::Errno(Errno::ENOTDIR));
                };
                let mut entries = entries.lock().expect("dir lock");
                let take = entries.len().min(DIR_BATCH);
                let batch: Vec<DirEntry> = entries.drain(..take).collect();
                Ok(FsResult::Entries(DirEntries {
                    entries: batch,
                    done: entries.is_empty(),
                }))
            }
            Op::ReadLink(path) => {
                let fd = root.resolve(&path.path, OFlag::O_PATH | OFlag::O_NOFOLLOW, 0)?;
                let target = nix::fcntl::readlinkat(fd.as_fd(), "").map_err(|e| {
                    // readlink on something that is not a link.
                    Refusal::Errno(if e == Errno::ENOENT { Errno::EINVAL } else { e })
                })?;
                Ok(FsResult::Path(target.to_string_lossy().into_owned()))
            }
            Op::Access(access) => {
                let fd = root.resolve(&access.path, OFlag::O_PATH, 0)?;
                let mode = nix::unistd::AccessFlags::from_bits_truncate(access.mode as i32);
                nix::unistd::faccessat(fd.as_fd(), "", mode, AtFlags::AT_EMPTY_PATH)
                    .map_err(Refusal::Errno)?;
                Ok(FsResult::Written(0))
            }
            Op::Unlink(path) => {
                let (dir, name) = root.parent_of(&path.path)?;
                nix::unistd::unlinkat(dir.as_fd(), name, nix::unistd::UnlinkatFlags::NoRemoveDir)
                    .map_err(Refusal::Errno)?;
                Ok(FsResult::Written(0))
            }
            Op::Mkdir(mkdir) => {
                let (dir, name) = root.parent_of(&mkdir.path)?;
                nix::sys::stat::mkdirat(dir.as_fd(), name, Mode::from_bits_truncate(mkdir.mode))
                    .map_err(Refusal::Errno)?;
                Ok(FsResult::Written(0))
            }
            Op::Rename(rename) => {
                let (from_dir, from) = root.parent_of(&rename.from)?;
                let (to_dir, to) = root.parent_of(&rename.to)?;
                nix::fcntl::renameat(from_dir.as_fd(), from, to_dir.as_fd(), to)
                    .map_err(Refusal::Errno)?;
                Ok(FsResult::Written(0))
            }
            Op::RealPath(path) => Ok(FsResult::Path(root.real_path(&path.path)?)),
        }
    }

    fn handle(&self, id: u64) -> Result<Arc<Handle>, Refusal> {
        self.handles
            .lock()
            .expect("files lock")
            .get(&id)
            .cloned()
            .ok_or(Refusal::Errno(Errno::EBADF))
    }

    fn file(&self, id: u64) -> Result<Arc<File>, Refusal> {
        match &*self.handle(id)? {
            Handle::File(file) => Ok(Arc::clone(file)),
            Handle::Dir(..) => Err(Refusal::Errno(Errno::EISDIR)),
        }
    }
}

fn oflags(portable: u32) -> OFlag {
    let has = |bit| portable & bit != 0;
    let mut flags = match (has(open_flags::READ), has(open_flags::WRITE)) {
        (true, true) => OFlag::O_RDWR,
        (false, true) => OFlag::O_WRONLY,
        _ => OFlag::O_RDONLY,
    };
    for (bit, flag) in [
        (open_flags::CREATE, OFlag::O_CREAT),
        (open_flags::TRUNCATE, OFlag::O_TRUNC),
        (open_flags::APPEND, OFlag::O_APPEND),
        (open_flags::EXCLUSIVE, OFlag::O_EXCL),
        (open_flags::DIRECTORY, OFlag::O_DIRECTORY),
        (open_flags::NOFOLLOW, OFlag::O_NOFOLLOW),
    ] {
        if has(bit) {
            flags |= flag;
        }
    }
    flags
}

fn list_dir(fd: OwnedFd) -> Result<VecDeque<DirEntry>, Refusal> {
    let mut dir = nix::dir::Dir::from_fd(fd).map_err(Refusal::Errno)?;
    let mut entries = VecDeque::new();
    for entry in dir.iter() {
        let entry = entry.map_err(Refusal::Errno)?;
        let kind = match entry.file_type() {
            Some(nix::dir::Type::Fifo) => libc::DT_FIFO,
            Some(nix::dir::Type::CharacterDevice) => libc::DT_CHR,
            Some(nix::dir::Type::Directory) => libc::DT_DIR,
            Some(nix::dir::Type::BlockDevice) => libc::DT_BLK,
            Some(nix::dir::Type::File) => libc::DT_REG,
            Some(nix::dir::Type::Symlink) => libc::DT_LNK,
            Some(nix::dir::Type::Socket) => libc::DT_SOCK,
            None => libc::DT_UNKNOWN,
        };
        entries.push_back(DirEntry {
            name: entry.file_name().to_string_lossy().into_owned(),
            ino: entry.ino(),
            kind: u32::from(kind),
        });
    }
    Ok(entries)
}

fn file_stat(raw: &libc::stat) -> FileStat {
    let ns = |secs: i64, nanos: i64| secs.saturating_mul(1_000_000_000).saturating_add(nanos);
    FileStat {
        mode: raw.st_mode,
        size: raw.st_size as u64,
        nlink: raw.st_nlink,
        uid: raw.st_uid,
        gid: raw.st_gid,
        atime_ns: ns(raw.st_atime, raw.st_atime_nsec),
        mtime_ns: ns(raw.st_mtime, raw.st_mtime_nsec),
        ctime_ns: ns(raw.st_ctime, raw.st_ctime_nsec),
        ino: raw.st_ino,
        dev: raw.st_dev,
        rdev: raw.st_rdev,
        blksize: raw.st_blksize as u64,
        blocks: raw.st_blocks as u64,
    }
}

fn io_refusal(error: &std::io::Error) -> Refusal {
    Refusal::Errno(Errno::from_raw(error.raw_os_error().unwrap_or(libc::EIO)))
}

/// An errno as the wire's error: `NotFound` for ENOENT, `Io` with the number otherwise.
pub(crate) fn errno_error(errno: Errno) -> ErrorInfo {
    ErrorInfo {
        code: if errno == Errno::ENOENT {
            ErrorCode::NotFound
        } else {
            ErrorCode::Io
        } as i32,
        message: errno.desc().to_owned(),
        in_reply_to_seq: 0,
        errno: errno as i32,
    }
}

#[cfg(test)]
mod tests;
