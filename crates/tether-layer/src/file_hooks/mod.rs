//! Files: the open family, reads and writes, seeks, the stat family, directories, links and
//! (in write mode) changes, each sent to the target when the policy says so.
//!
//! A file opened in the target is represented in the process by a placeholder fd (an empty
//! memfd), so fd numbers stay unique, `dup`/`fork`/`close` keep working, and a read that bypasses
//! these hooks sees an empty file rather than someone else's data. Before serving an fd from the
//! table the hook checks it still is that memfd (its inode), so a placeholder closed behind the
//! layer's back (a raw syscall) can never redirect a later, unrelated fd.
//!
//! What happens to an operation is decided by `tether_intercept::plan` and the policy; these
//! modules carry it out, one hook family each: `open`, `io` (reads, writes, seeks), `stat`,
//! `dir`, `path` (access, links, changes). What they share is here.

// The hooks are exported by symbol name (`no_mangle`), not by Rust path.
#![allow(unreachable_pub)]

use std::{
    ffi::{CStr, CString, OsStr, c_char, c_int, c_void},
    os::unix::ffi::OsStrExt as _,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use tether_protocol::{
    FileStat, FsAccess, FsHandle, FsMkdir, FsOpen, FsPath, FsRead, FsRename, FsStat, FsWrite,
    fs_request::Op, fs_response::Result as FsResult, open_flags,
};

use tether_intercept::plan::{self, Open, OpenPlan, RemoteOpen, RenamePlan};

use crate::{enter, files::RemoteFile, fs, policy, policy::FsRoute, real, set_errno, state, track};

mod dir;
mod io;
mod open;
mod path;
mod stat;

pub(crate) use dir::{ForkLocks, lock_for_fork};
pub(crate) use stat::statx;

/// True once a remote file or directory was opened: until then the data-path hooks (`read`,
/// `write`, …) go straight to libc without looking anything up.
static ACTIVE: AtomicBool = AtomicBool::new(false);

fn path_of<'a>(path: *const c_char) -> Option<&'a Path> {
    if path.is_null() {
        return None;
    }
    // SAFETY: non-null paths handed to these hooks are C strings, per libc's contracts.
    let bytes = unsafe { CStr::from_ptr(path) }.to_bytes();
    Some(Path::new(OsStr::from_bytes(bytes)))
}

fn route(path: &Path, write: bool) -> FsRoute {
    policy().map_or(FsRoute::Local, |p| p.file(path, write))
}

/// True when the policy is known and keeps `path` local: decided without the re-entry guard
/// (the decision is pure), which keeps the common case — a local file — cheap.
fn surely_local(path: &Path, write: bool) -> bool {
    match crate::ready_policy() {
        Some(Some(policy)) => policy.file(path, write) == FsRoute::Local,
        Some(None) => true,
        None => false,
    }
}

fn fail<T>(errno: c_int, value: T) -> T {
    set_errno(errno);
    value
}

/// The placeholder's identity, to tell it apart from a reused fd number.
fn inode(fd: c_int) -> Option<u64> {
    crate::identity(fd).map(|(_, ino)| ino)
}

/// The remote file behind `fd`, if `fd` still is its placeholder.
fn remote_file(fd: c_int) -> Option<state::SharedFile> {
    let file = state::with(|t| t.files.get(&fd).cloned())?;
    let expected = file.lock().unwrap_or_else(|p| p.into_inner()).placeholder;
    if inode(fd) == Some(expected) {
        return Some(file);
    }
    // The fd was closed and reused behind the layer's back: forget the stale entry.
    state::with(|t| t.files.remove(&fd));
    None
}

// ---------------------------------------------------------------------------------------------
// Shared by the families below.

/// Runs `f` on the file opened in the target behind `fd` (a copied one too); `None` when `fd` is
/// not one.
fn with_file<T>(fd: c_int, f: impl FnOnce(&mut RemoteFile) -> T) -> Option<T> {
    if !ACTIVE.load(Ordering::Acquire) {
        return None;
    }
    let _entered = enter()?;
    // Looking `fd` up takes locks, which may touch errno: a call that passes through must see
    // errno as its caller left it (readdir's end of directory is told by errno alone).
    let saved = errno();
    let Some(file) = remote_file(fd) else {
        set_errno(saved);
        return None;
    };
    let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
    Some(f(&mut file))
}

fn errno() -> c_int {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

/// Runs `f` on the file read through the layer behind `fd`; `None` when `fd` is not one (a
/// copied file is read, written and seeked as the real file it is).
fn with_remote<T>(fd: c_int, f: impl FnOnce(&mut RemoteFile) -> T) -> Option<T> {
    with_file(fd, |file| file.snapshot.is_none().then(|| f(file))).flatten()
}

fn fetch(handle: u64) -> impl FnOnce(u64, usize) -> Result<(Vec<u8>, bool), c_int> {
    move |offset, len| {
        let op = Op::Read(FsRead {
            handle,
            len: u32::try_from(len).unwrap_or(u32::MAX),
            offset: Some(offset),
        });
        match fs(op)? {
            FsResult::Data(data) => Ok((data.data.to_vec(), data.eof)),
            _ => Err(libc::EIO),
        }
    }
}

/// # Safety
/// `buf` must be null or `n` writable bytes.
unsafe fn out_slice<'a>(buf: *mut c_void, n: libc::size_t) -> &'a mut [u8] {
    if buf.is_null() || n == 0 {
        return &mut [];
    }
    // SAFETY: per the contract.
    unsafe { std::slice::from_raw_parts_mut(buf.cast(), n) }
}

fn stat_remote(path: String, handle: u64, follow: bool) -> Result<FileStat, c_int> {
    let op = Op::Stat(FsStat {
        path,
        handle,
        follow_symlinks: follow,
    });
    match fs(op)? {
        FsResult::Stat(stat) => Ok(stat),
        _ => Err(libc::EIO),
    }
}
