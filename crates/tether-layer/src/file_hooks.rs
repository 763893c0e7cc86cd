//! Files: the open family, reads and writes, seeks, the stat family, directories, links and
//! (in write mode) changes, each sent to the target when the policy says so.
//!
//! A file opened in the target is represented in the process by a placeholder fd (an empty
//! memfd), so fd numbers stay unique, `dup`/`fork`/`close` keep working, and a read that bypasses
//! these hooks sees an empty file rather than someone else's data. Before serving an fd from the
//! table the hook checks it still is that memfd (its inode), so a placeholder closed behind the
//! layer's back (a raw syscall) can never redirect a later, unrelated fd.

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

use crate::{enter, files::RemoteFile, fs, policy, policy::FsRoute, real, set_errno, state, track};

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
// Opening.

fn portable_flags(flags: c_int) -> u32 {
    let mut portable = match flags & libc::O_ACCMODE {
        libc::O_WRONLY => open_flags::WRITE,
        libc::O_RDWR => open_flags::READ | open_flags::WRITE,
        _ => open_flags::READ,
    };
    for (flag, bit) in [
        (libc::O_CREAT, open_flags::CREATE),
        (libc::O_TRUNC, open_flags::TRUNCATE),
        (libc::O_APPEND, open_flags::APPEND),
        (libc::O_EXCL, open_flags::EXCLUSIVE),
        (libc::O_DIRECTORY, open_flags::DIRECTORY),
        (libc::O_NOFOLLOW, open_flags::NOFOLLOW),
    ] {
        if flags & flag != 0 {
            portable |= bit;
        }
    }
    portable
}

fn writes(flags: c_int) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & (libc::O_CREAT | libc::O_TRUNC) != 0
}

/// Opens `path` in the target; returns the placeholder fd.
fn open_remote(path: &Path, flags: c_int, mode: libc::mode_t) -> c_int {
    let text = path.to_string_lossy().into_owned();
    let op = Op::Open(FsOpen {
        path: text.clone(),
        flags: portable_flags(flags),
        // Without O_CREAT the (variadic) mode argument is whatever was in the register.
        mode: if flags & libc::O_CREAT != 0 {
            mode & 0o7777
        } else {
            0
        },
    });
    let handle = match fs(op) {
        Ok(FsResult::Opened(opened)) => opened.handle,
        Ok(_) => return fail(libc::EIO, -1),
        Err(errno) => return fail(errno, -1),
    };
    let memfd_flags = if flags & libc::O_CLOEXEC != 0 {
        libc::MFD_CLOEXEC
    } else {
        0
    };
    // SAFETY: a C string name and valid flags.
    let mut fd = unsafe { libc::memfd_create(c"tether-remote-file".as_ptr(), memfd_flags) };
    if fd < 0 {
        let _ = fs(Op::Close(FsHandle { handle }));
        return fail(libc::EMFILE, -1);
    }
    let mut snapshot = None;
    if !writes(flags) && flags & libc::O_DIRECTORY == 0 {
        match copy_small_file(handle, fd, flags) {
            Ok(Some((read_only, stat))) => {
                fd = read_only;
                snapshot = Some(stat);
            }
            Ok(None) => {}
            Err(errno) => {
                let _ = fs(Op::Close(FsHandle { handle }));
                // SAFETY: our own memfd.
                unsafe { real::close(fd) };
                return fail(errno, -1);
            }
        }
    }
    let Some(placeholder) = inode(fd) else {
        let _ = fs(Op::Close(FsHandle { handle }));
        return fail(libc::EMFILE, -1);
    };
    let mut file = RemoteFile::new(handle, text, flags & libc::O_APPEND != 0, placeholder);
    if snapshot.is_some() {
        // The copy is complete: the target's file is not needed any more.
        let _ = fs(Op::Close(FsHandle { handle }));
        file.handle = 0;
        file.snapshot = snapshot;
    }
    track(fd, |t| t.files.insert(fd, Arc::new(Mutex::new(file))));
    ACTIVE.store(true, Ordering::Release);
    fd
}

/// For a small regular file opened read-only: copies it into the memfd `fd`, and returns a
/// read-only fd of that memfd (replacing `fd`) with the file's metadata. `None`: too big (or not
/// a regular file) to copy; it is then read through the layer.
fn copy_small_file(
    handle: u64,
    fd: c_int,
    flags: c_int,
) -> Result<Option<(c_int, FileStat)>, c_int> {
    let stat = stat_remote(String::new(), handle, true)?;
    if stat.mode & libc::S_IFMT != libc::S_IFREG || stat.size > crate::files::SNAPSHOT_MAX {
        return Ok(None);
    }
    let mut offset = 0u64;
    loop {
        let (data, eof) = fetch(handle)(offset, tether_protocol::MAX_DATA_CHUNK * 8)?;
        let mut written = 0;
        while written < data.len() {
            // SAFETY: `data[written..]` is readable; `fd` is our memfd.
            let n =
                unsafe { real::write(fd, data[written..].as_ptr().cast(), data.len() - written) };
            if n <= 0 {
                return Err(libc::EIO);
            }
            written += n as usize;
        }
        offset += data.len() as u64;
        if eof || data.is_empty() {
            break;
        }
    }
    // A read-only fd of the copy (the memfd itself is read-write), at offset 0.
    let path = CString::new(format!("/proc/self/fd/{fd}")).map_err(|_| libc::EINVAL)?;
    let reopen = libc::O_RDONLY | (flags & libc::O_CLOEXEC);
    // SAFETY: a valid C path; `fd` is our memfd.
    let read_only = unsafe { real::open(path.as_ptr(), reopen, 0) };
    if read_only < 0 {
        return Err(libc::EMFILE); // the caller closes `fd`
    }
    // SAFETY: our memfd, replaced by `read_only`.
    unsafe { real::close(fd) };
    Ok(Some((read_only, stat)))
}

/// The shared logic of the open family: `None` when the call stays local.
fn open_hook(
    dirfd: Option<c_int>,
    path: *const c_char,
    flags: c_int,
    mode: libc::mode_t,
) -> Option<c_int> {
    let path = path_of(path)?;
    if dirfd.is_some_and(|d| d != libc::AT_FDCWD) && !path.is_absolute() {
        return None;
    }
    if flags & libc::O_TMPFILE == libc::O_TMPFILE || surely_local(path, writes(flags)) {
        return None;
    }
    let _entered = enter()?;
    match route(path, writes(flags)) {
        FsRoute::Local => None,
        FsRoute::NotFound => Some(fail(libc::ENOENT, -1)),
        FsRoute::Remote => Some(open_remote(path, flags, mode)),
    }
}

/// `open` is variadic in C; its optional `mode` is passed like a fixed third argument on the
/// x86_64 and aarch64 Linux calling conventions.
///
/// # Safety
/// As libc's `open`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn open(path: *const c_char, flags: c_int, mode: libc::mode_t) -> c_int {
    open_hook(None, path, flags, mode)
        // SAFETY: arguments passed through.
        .unwrap_or_else(|| unsafe { real::open(path, flags, mode) })
}

/// # Safety
/// As libc's `open64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn open64(path: *const c_char, flags: c_int, mode: libc::mode_t) -> c_int {
    open_hook(None, path, flags, mode)
        // SAFETY: arguments passed through.
        .unwrap_or_else(|| unsafe { real::open64(path, flags, mode) })
}

/// # Safety
/// As libc's `openat`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn openat(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mode: libc::mode_t,
) -> c_int {
    open_hook(Some(dirfd), path, flags, mode)
        // SAFETY: arguments passed through.
        .unwrap_or_else(|| unsafe { real::openat(dirfd, path, flags, mode) })
}

/// # Safety
/// As libc's `openat64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn openat64(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mode: libc::mode_t,
) -> c_int {
    open_hook(Some(dirfd), path, flags, mode)
        // SAFETY: arguments passed through.
        .unwrap_or_else(|| unsafe { real::openat64(dirfd, path, flags, mode) })
}

/// The fortified `open` (`_FORTIFY_SOURCE`), without a mode.
///
/// # Safety
/// As glibc's `__open_2`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __open_2(path: *const c_char, flags: c_int) -> c_int {
    open_hook(None, path, flags, 0)
        // SAFETY: arguments passed through.
        .unwrap_or_else(|| unsafe { real::__open_2(path, flags) })
}

/// # Safety
/// As glibc's `__open64_2`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __open64_2(path: *const c_char, flags: c_int) -> c_int {
    open_hook(None, path, flags, 0)
        // SAFETY: arguments passed through.
        .unwrap_or_else(|| unsafe { real::__open64_2(path, flags) })
}

/// # Safety
/// As libc's `creat`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn creat(path: *const c_char, mode: libc::mode_t) -> c_int {
    let flags = libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC;
    open_hook(None, path, flags, mode)
        // SAFETY: arguments passed through.
        .unwrap_or_else(|| unsafe { real::creat(path, mode) })
}

/// `fopen`'s mode string as open flags.
fn fopen_flags(mode: &[u8]) -> Option<c_int> {
    let mut flags = match mode.first()? {
        b'r' => libc::O_RDONLY,
        b'w' => libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
        b'a' => libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND,
        _ => return None,
    };
    for c in &mode[1..] {
        match c {
            b'+' => flags = (flags & !libc::O_ACCMODE) | libc::O_RDWR,
            b'e' => flags |= libc::O_CLOEXEC,
            b'x' => flags |= libc::O_EXCL,
            _ => {}
        }
    }
    Some(flags)
}

/// glibc's `cookie_io_functions_t`.
#[repr(C)]
struct CookieFunctions {
    read: Option<unsafe extern "C" fn(*mut c_void, *mut c_char, libc::size_t) -> libc::ssize_t>,
    write: Option<unsafe extern "C" fn(*mut c_void, *const c_char, libc::size_t) -> libc::ssize_t>,
    seek: Option<unsafe extern "C" fn(*mut c_void, *mut libc::off64_t, c_int) -> c_int>,
    close: Option<unsafe extern "C" fn(*mut c_void) -> c_int>,
}

unsafe extern "C" {
    fn fopencookie(
        cookie: *mut c_void,
        mode: *const c_char,
        functions: CookieFunctions,
    ) -> *mut libc::FILE;
}

// The cookie is the placeholder fd; each callback runs the matching hook on it.
unsafe extern "C" fn cookie_read(
    cookie: *mut c_void,
    buf: *mut c_char,
    n: libc::size_t,
) -> libc::ssize_t {
    // SAFETY: stdio's buffer of `n` bytes.
    unsafe { read(cookie as usize as c_int, buf.cast(), n) }
}
unsafe extern "C" fn cookie_write(
    cookie: *mut c_void,
    buf: *const c_char,
    n: libc::size_t,
) -> libc::ssize_t {
    // SAFETY: stdio's buffer of `n` bytes.
    unsafe { write(cookie as usize as c_int, buf.cast(), n) }
}
unsafe extern "C" fn cookie_seek(
    cookie: *mut c_void,
    offset: *mut libc::off64_t,
    whence: c_int,
) -> c_int {
    // SAFETY: stdio passes a valid offset in/out pointer.
    unsafe {
        let position = lseek64(cookie as usize as c_int, *offset, whence);
        if position < 0 {
            return -1;
        }
        *offset = position;
    }
    0
}
unsafe extern "C" fn cookie_close(cookie: *mut c_void) -> c_int {
    // SAFETY: the placeholder fd this stream owns.
    unsafe { crate::close(cookie as usize as c_int) }
}

fn fopen_hook(path: *const c_char, mode: *const c_char) -> Option<*mut libc::FILE> {
    if mode.is_null() {
        return None;
    }
    // SAFETY: `mode` is a C string, per fopen's contract.
    let flags = fopen_flags(unsafe { CStr::from_ptr(mode) }.to_bytes())?;
    let fd = open_hook(None, path, flags, 0o666)?;
    if fd < 0 {
        return Some(std::ptr::null_mut());
    }
    let copied = state::with(|t| {
        t.files.get(&fd).is_some_and(|f| {
            f.lock()
                .unwrap_or_else(|p| p.into_inner())
                .snapshot
                .is_some()
        })
    });
    if copied {
        // A real file: stdio reads it directly, and `fileno` works.
        // SAFETY: our placeholder fd and the caller's mode string.
        let stream = unsafe { libc::fdopen(fd, mode) };
        if stream.is_null() {
            // SAFETY: our placeholder.
            unsafe { crate::close(fd) };
        }
        return Some(stream);
    }
    let functions = CookieFunctions {
        read: Some(cookie_read),
        write: Some(cookie_write),
        seek: Some(cookie_seek),
        close: Some(cookie_close),
    };
    // SAFETY: valid mode string and callbacks; the cookie is a plain integer.
    let stream = unsafe { fopencookie(fd as usize as *mut c_void, mode, functions) };
    if stream.is_null() {
        // SAFETY: our placeholder.
        unsafe { crate::close(fd) };
    }
    Some(stream)
}

/// # Safety
/// As libc's `fopen`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fopen(path: *const c_char, mode: *const c_char) -> *mut libc::FILE {
    fopen_hook(path, mode)
        // SAFETY: arguments passed through.
        .unwrap_or_else(|| unsafe { real::fopen(path, mode) })
}

/// # Safety
/// As libc's `fopen64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fopen64(path: *const c_char, mode: *const c_char) -> *mut libc::FILE {
    fopen_hook(path, mode)
        // SAFETY: arguments passed through.
        .unwrap_or_else(|| unsafe { real::fopen64(path, mode) })
}

// ---------------------------------------------------------------------------------------------
// Reading, writing, seeking.

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

fn ssize(result: Result<usize, c_int>) -> libc::ssize_t {
    match result {
        Ok(n) => n as libc::ssize_t,
        Err(errno) => fail(errno, -1),
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

/// # Safety
/// `buf` must be null or `n` readable bytes.
unsafe fn in_slice<'a>(buf: *const c_void, n: libc::size_t) -> &'a [u8] {
    if buf.is_null() || n == 0 {
        return &[];
    }
    // SAFETY: per the contract.
    unsafe { std::slice::from_raw_parts(buf.cast(), n) }
}

/// # Safety
/// As libc's `read`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn read(fd: c_int, buf: *mut c_void, n: libc::size_t) -> libc::ssize_t {
    // SAFETY: the caller's buffer of `n` bytes.
    let out = || unsafe { out_slice(buf, n) };
    with_remote(fd, |file| {
        let handle = file.handle;
        ssize(file.read(out(), fetch(handle)))
    })
    // SAFETY: arguments passed through.
    .unwrap_or_else(|| unsafe { real::read(fd, buf, n) })
}

/// # Safety
/// As libc's `pread`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pread(
    fd: c_int,
    buf: *mut c_void,
    n: libc::size_t,
    offset: libc::off_t,
) -> libc::ssize_t {
    // SAFETY: as `pread64`.
    unsafe { pread_impl(fd, buf, n, offset, real::pread) }
}

/// # Safety
/// As libc's `pread64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pread64(
    fd: c_int,
    buf: *mut c_void,
    n: libc::size_t,
    offset: libc::off64_t,
) -> libc::ssize_t {
    // SAFETY: the caller's arguments.
    unsafe { pread_impl(fd, buf, n, offset, real::pread64) }
}

/// # Safety
/// As libc's `pread`.
unsafe fn pread_impl(
    fd: c_int,
    buf: *mut c_void,
    n: libc::size_t,
    offset: i64,
    local: unsafe fn(c_int, *mut c_void, libc::size_t, i64) -> libc::ssize_t,
) -> libc::ssize_t {
    if offset < 0 {
        // SAFETY: libc reports the error.
        return unsafe { local(fd, buf, n, offset) };
    }
    // SAFETY: the caller's buffer of `n` bytes.
    let out = || unsafe { out_slice(buf, n) };
    with_remote(fd, |file| {
        let handle = file.handle;
        ssize(file.read_at(offset as u64, out(), fetch(handle)))
    })
    // SAFETY: arguments passed through.
    .unwrap_or_else(|| unsafe { local(fd, buf, n, offset) })
}

/// # Safety
/// As libc's `readv`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn readv(fd: c_int, iov: *const libc::iovec, count: c_int) -> libc::ssize_t {
    let vectors = || {
        if iov.is_null() || count <= 0 {
            return &[][..];
        }
        // SAFETY: `count` iovecs, per readv's contract.
        unsafe { std::slice::from_raw_parts(iov, count as usize) }
    };
    with_remote(fd, |file| {
        let handle = file.handle;
        let mut total = 0;
        for vector in vectors() {
            // SAFETY: each iovec describes a writable buffer.
            let out = unsafe { out_slice(vector.iov_base, vector.iov_len) };
            match file.read(out, fetch(handle)) {
                Ok(n) => {
                    total += n;
                    if n < vector.iov_len {
                        break;
                    }
                }
                Err(errno) if total == 0 => return fail(errno, -1),
                Err(_) => break,
            }
        }
        total as libc::ssize_t
    })
    // SAFETY: arguments passed through.
    .unwrap_or_else(|| unsafe { real::readv(fd, iov, count) })
}

/// The iovecs of a vectored call.
///
/// # Safety
/// `iov` must be null or `count` valid iovecs.
unsafe fn vectors<'a>(iov: *const libc::iovec, count: c_int) -> &'a [libc::iovec] {
    if iov.is_null() || count <= 0 {
        return &[];
    }
    // SAFETY: per the contract.
    unsafe { std::slice::from_raw_parts(iov, count as usize) }
}

/// Reads into `vectors` at `offset` (without moving the position) until one comes back short.
fn read_vectors_at(
    file: &mut RemoteFile,
    vectors: &[libc::iovec],
    mut offset: u64,
) -> libc::ssize_t {
    let handle = file.handle;
    let mut total = 0usize;
    for vector in vectors {
        // SAFETY: each iovec describes a writable buffer, per the caller's contract.
        let out = unsafe { out_slice(vector.iov_base, vector.iov_len) };
        match file.read_at(offset, out, fetch(handle)) {
            Ok(n) => {
                total += n;
                offset += n as u64;
                if n < vector.iov_len {
                    break;
                }
            }
            Err(errno) if total == 0 => return fail(errno, -1),
            Err(_) => break,
        }
    }
    total as libc::ssize_t
}

/// The bytes of `vectors`, gathered.
fn gather(vectors: &[libc::iovec]) -> Vec<u8> {
    let mut data = Vec::new();
    for vector in vectors {
        // SAFETY: each iovec describes a readable buffer, per the caller's contract.
        data.extend_from_slice(unsafe { in_slice(vector.iov_base, vector.iov_len) });
    }
    data
}

/// # Safety
/// As libc's `writev`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn writev(fd: c_int, iov: *const libc::iovec, count: c_int) -> libc::ssize_t {
    // SAFETY: the caller's iovecs.
    let data = || gather(unsafe { vectors(iov, count) });
    with_remote(fd, |file| ssize(write_remote(file, &data(), None)))
        // SAFETY: arguments passed through.
        .unwrap_or_else(|| unsafe { real::writev(fd, iov, count) })
}

/// # Safety
/// As libc's `preadv`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn preadv(
    fd: c_int,
    iov: *const libc::iovec,
    count: c_int,
    offset: libc::off_t,
) -> libc::ssize_t {
    // SAFETY: the caller's arguments.
    unsafe { preadv_impl(fd, iov, count, offset, real::preadv) }
}
/// # Safety
/// As libc's `preadv64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn preadv64(
    fd: c_int,
    iov: *const libc::iovec,
    count: c_int,
    offset: libc::off64_t,
) -> libc::ssize_t {
    // SAFETY: the caller's arguments.
    unsafe { preadv_impl(fd, iov, count, offset, real::preadv64) }
}

/// `preadv` and `preadv64`.
///
/// # Safety
/// As libc's `preadv`.
unsafe fn preadv_impl(
    fd: c_int,
    iov: *const libc::iovec,
    count: c_int,
    offset: i64,
    local: unsafe fn(c_int, *const libc::iovec, c_int, i64) -> libc::ssize_t,
) -> libc::ssize_t {
    with_remote(fd, |file| match u64::try_from(offset) {
        // SAFETY: the caller's iovecs.
        Ok(offset) => read_vectors_at(file, unsafe { vectors(iov, count) }, offset),
        Err(_) => fail(libc::EINVAL, -1),
    })
    // SAFETY: arguments passed through.
    .unwrap_or_else(|| unsafe { local(fd, iov, count, offset) })
}

/// # Safety
/// As libc's `pwritev`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pwritev(
    fd: c_int,
    iov: *const libc::iovec,
    count: c_int,
    offset: libc::off_t,
) -> libc::ssize_t {
    // SAFETY: the caller's arguments.
    unsafe { pwritev_impl(fd, iov, count, offset, real::pwritev) }
}
/// # Safety
/// As libc's `pwritev64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pwritev64(
    fd: c_int,
    iov: *const libc::iovec,
    count: c_int,
    offset: libc::off64_t,
) -> libc::ssize_t {
    // SAFETY: the caller's arguments.
    unsafe { pwritev_impl(fd, iov, count, offset, real::pwritev64) }
}

/// `pwritev` and `pwritev64`.
///
/// # Safety
/// As libc's `pwritev`.
unsafe fn pwritev_impl(
    fd: c_int,
    iov: *const libc::iovec,
    count: c_int,
    offset: i64,
    local: unsafe fn(c_int, *const libc::iovec, c_int, i64) -> libc::ssize_t,
) -> libc::ssize_t {
    // SAFETY: the caller's iovecs.
    let data = || gather(unsafe { vectors(iov, count) });
    with_remote(fd, |file| match u64::try_from(offset) {
        Ok(offset) => ssize(write_remote(file, &data(), Some(offset))),
        Err(_) => fail(libc::EINVAL, -1),
    })
    // SAFETY: arguments passed through.
    .unwrap_or_else(|| unsafe { local(fd, iov, count, offset) })
}

/// True when `fd` is a file read or written through the layer: the kernel's in-place copies
/// (`sendfile`, `copy_file_range`) and `mmap` cannot see its data, so they fail on it (EINVAL,
/// ENODEV) and callers such as Python's `shutil` fall back to read/write.
fn streamed(fd: c_int) -> bool {
    fd >= 0 && with_remote(fd, |_| ()).is_some()
}

/// # Safety
/// As libc's `sendfile`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendfile(
    out: c_int,
    input: c_int,
    offset: *mut libc::off_t,
    count: libc::size_t,
) -> libc::ssize_t {
    if streamed(out) || streamed(input) {
        return fail(libc::EINVAL, -1);
    }
    // SAFETY: arguments passed through.
    unsafe { real::sendfile(out, input, offset, count) }
}

/// # Safety
/// As libc's `sendfile64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendfile64(
    out: c_int,
    input: c_int,
    offset: *mut libc::off64_t,
    count: libc::size_t,
) -> libc::ssize_t {
    if streamed(out) || streamed(input) {
        return fail(libc::EINVAL, -1);
    }
    // SAFETY: arguments passed through.
    unsafe { real::sendfile64(out, input, offset, count) }
}

/// # Safety
/// As libc's `copy_file_range`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn copy_file_range(
    input: c_int,
    off_in: *mut libc::off64_t,
    out: c_int,
    off_out: *mut libc::off64_t,
    len: libc::size_t,
    flags: libc::c_uint,
) -> libc::ssize_t {
    if streamed(out) || streamed(input) {
        return fail(libc::EINVAL, -1);
    }
    // SAFETY: arguments passed through.
    unsafe { real::copy_file_range(input, off_in, out, off_out, len, flags) }
}

/// # Safety
/// As libc's `mmap`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: libc::size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: libc::off_t,
) -> *mut c_void {
    // Anonymous mappings (every malloc arena) take the first test.
    if fd >= 0 && ACTIVE.load(Ordering::Acquire) && streamed(fd) {
        return fail(libc::ENODEV, libc::MAP_FAILED);
    }
    // SAFETY: arguments passed through.
    unsafe { real::mmap(addr, len, prot, flags, fd, offset) }
}

/// # Safety
/// As libc's `mmap64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: libc::size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: libc::off64_t,
) -> *mut c_void {
    if fd >= 0 && ACTIVE.load(Ordering::Acquire) && streamed(fd) {
        return fail(libc::ENODEV, libc::MAP_FAILED);
    }
    // SAFETY: arguments passed through.
    unsafe { real::mmap64(addr, len, prot, flags, fd, offset) }
}

fn write_remote(file: &mut RemoteFile, data: &[u8], offset: Option<u64>) -> Result<usize, c_int> {
    file.invalidate();
    let mut written = 0;
    for chunk in data.chunks(crate::files::MAX_WRITE) {
        let at = match offset {
            Some(offset) => Some(offset + written as u64),
            None if file.append => None,
            None => Some(file.position),
        };
        let op = Op::Write(FsWrite {
            handle: file.handle,
            data: bytes::Bytes::copy_from_slice(chunk),
            offset: at,
        });
        match fs(op) {
            Ok(_) => {
                written += chunk.len();
                if offset.is_none() {
                    file.position += chunk.len() as u64;
                }
            }
            Err(errno) if written == 0 => return Err(errno),
            Err(_) => break,
        }
    }
    Ok(written)
}

/// # Safety
/// As libc's `write`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, n: libc::size_t) -> libc::ssize_t {
    // SAFETY: the caller's buffer of `n` bytes.
    let data = || unsafe { in_slice(buf, n) };
    with_remote(fd, |file| ssize(write_remote(file, data(), None)))
        // SAFETY: arguments passed through.
        .unwrap_or_else(|| unsafe { real::write(fd, buf, n) })
}

/// # Safety
/// As libc's `pwrite`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pwrite(
    fd: c_int,
    buf: *const c_void,
    n: libc::size_t,
    offset: libc::off_t,
) -> libc::ssize_t {
    // SAFETY: the caller's arguments.
    unsafe { pwrite_impl(fd, buf, n, offset, real::pwrite) }
}
/// # Safety
/// As libc's `pwrite64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pwrite64(
    fd: c_int,
    buf: *const c_void,
    n: libc::size_t,
    offset: libc::off64_t,
) -> libc::ssize_t {
    // SAFETY: the caller's arguments.
    unsafe { pwrite_impl(fd, buf, n, offset, real::pwrite64) }
}

/// `pwrite` and `pwrite64` (the same on 64-bit Linux).
///
/// # Safety
/// As libc's `pwrite`.
unsafe fn pwrite_impl(
    fd: c_int,
    buf: *const c_void,
    n: libc::size_t,
    offset: i64,
    local: unsafe fn(c_int, *const c_void, libc::size_t, i64) -> libc::ssize_t,
) -> libc::ssize_t {
    // SAFETY: the caller's buffer of `n` bytes.
    let data = || unsafe { in_slice(buf, n) };
    with_remote(fd, |file| match u64::try_from(offset) {
        Ok(offset) => ssize(write_remote(file, data(), Some(offset))),
        Err(_) => fail(libc::EINVAL, -1),
    })
    // SAFETY: arguments passed through.
    .unwrap_or_else(|| unsafe { local(fd, buf, n, offset) })
}

fn seek_remote(file: &mut RemoteFile, offset: i64, whence: c_int) -> i64 {
    let base = match whence {
        libc::SEEK_SET => 0,
        libc::SEEK_CUR => file.position as i64,
        libc::SEEK_END => match stat_remote(String::new(), file.handle, true) {
            Ok(stat) => stat.size as i64,
            Err(errno) => return fail(errno, -1),
        },
        _ => return fail(libc::EINVAL, -1),
    };
    match base.checked_add(offset) {
        Some(position) if position >= 0 => {
            file.position = position as u64;
            position
        }
        _ => fail(libc::EINVAL, -1),
    }
}

/// # Safety
/// As libc's `lseek`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lseek(fd: c_int, offset: libc::off_t, whence: c_int) -> libc::off_t {
    with_remote(fd, |file| seek_remote(file, offset, whence))
        // SAFETY: arguments passed through.
        .unwrap_or_else(|| unsafe { real::lseek(fd, offset, whence) })
}

/// # Safety
/// As libc's `lseek64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lseek64(fd: c_int, offset: libc::off64_t, whence: c_int) -> libc::off64_t {
    with_remote(fd, |file| seek_remote(file, offset, whence))
        // SAFETY: arguments passed through.
        .unwrap_or_else(|| unsafe { real::lseek64(fd, offset, whence) })
}

// ---------------------------------------------------------------------------------------------
// The stat family. On 64-bit Linux `struct stat` and `struct stat64` are the same; the local
// calls go to `stat64` & co. (glibc ≥ 2.33) or the older `__xstat64` entry points.

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

fn split_ns(ns: i64) -> (i64, i64) {
    (ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000))
}

/// # Safety
/// `out` must be a valid `struct stat64` out-buffer.
unsafe fn fill_stat(stat: &FileStat, out: *mut libc::stat64) {
    // SAFETY: plain old data.
    let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
    st.st_dev = stat.dev;
    st.st_ino = stat.ino;
    st.st_nlink = stat.nlink as _;
    st.st_mode = stat.mode;
    st.st_uid = stat.uid;
    st.st_gid = stat.gid;
    st.st_rdev = stat.rdev;
    st.st_size = stat.size as i64;
    st.st_blksize = stat.blksize as _;
    st.st_blocks = stat.blocks as i64;
    (st.st_atime, st.st_atime_nsec) = split_ns(stat.atime_ns);
    (st.st_mtime, st.st_mtime_nsec) = split_ns(stat.mtime_ns);
    (st.st_ctime, st.st_ctime_nsec) = split_ns(stat.ctime_ns);
    // SAFETY: per the contract.
    unsafe { out.write(st) };
}

/// A path stat: `None` when it stays local, else the return value (errno set).
fn path_stat(path: *const c_char, follow: bool, out: *mut libc::stat64) -> Option<c_int> {
    let path = path_of(path)?;
    if surely_local(path, false) {
        return None;
    }
    let _entered = enter()?;
    match route(path, false) {
        FsRoute::Local => None,
        FsRoute::NotFound => Some(fail(libc::ENOENT, -1)),
        FsRoute::Remote => Some(
            match stat_remote(path.to_string_lossy().into_owned(), 0, follow) {
                Ok(stat) => {
                    // SAFETY: the caller's out-buffer.
                    unsafe { fill_stat(&stat, out) };
                    0
                }
                Err(errno) => fail(errno, -1),
            },
        ),
    }
}

fn fd_stat(fd: c_int, out: *mut libc::stat64) -> Option<c_int> {
    with_file(fd, |file| {
        let stat = match &file.snapshot {
            Some(stat) => Ok(stat.clone()),
            None => stat_remote(String::new(), file.handle, true),
        };
        match stat {
            Ok(stat) => {
                // SAFETY: the caller's out-buffer.
                unsafe { fill_stat(&stat, out) };
                0
            }
            Err(errno) => fail(errno, -1),
        }
    })
}

static STAT64: crate::Real = crate::Real::new(c"stat64");
static LSTAT64: crate::Real = crate::Real::new(c"lstat64");
static FSTAT64: crate::Real = crate::Real::new(c"fstat64");
static FSTATAT64: crate::Real = crate::Real::new(c"fstatat64");
static XSTAT64: crate::Real = crate::Real::new(c"__xstat64");
static LXSTAT64: crate::Real = crate::Real::new(c"__lxstat64");
static FXSTAT64: crate::Real = crate::Real::new(c"__fxstat64");
static FXSTATAT64: crate::Real = crate::Real::new(c"__fxstatat64");
static STATX: crate::Real = crate::Real::new(c"statx");

type PathStat = unsafe extern "C" fn(*const c_char, *mut libc::stat64) -> c_int;
type PathXstat = unsafe extern "C" fn(c_int, *const c_char, *mut libc::stat64) -> c_int;

/// # Safety
/// As libc's `stat64`.
unsafe fn local_path_stat(
    modern: &crate::Real,
    old: &crate::Real,
    path: *const c_char,
    out: *mut libc::stat64,
) -> c_int {
    if let Some(f) = modern.try_get() {
        // SAFETY: libc's `stat64`/`lstat64`, whose signature this is.
        let f: PathStat = unsafe { std::mem::transmute(f) };
        // SAFETY: the caller's arguments.
        return unsafe { f(path, out) };
    }
    if let Some(f) = old.try_get() {
        // SAFETY: libc's `__xstat64`/`__lxstat64`, version 1 on x86_64 and 0 elsewhere.
        let f: PathXstat = unsafe { std::mem::transmute(f) };
        // SAFETY: the caller's arguments.
        return unsafe { f(XSTAT_VERSION, path, out) };
    }
    fail(libc::ENOSYS, -1)
}

#[cfg(target_arch = "x86_64")]
const XSTAT_VERSION: c_int = 1;
#[cfg(not(target_arch = "x86_64"))]
const XSTAT_VERSION: c_int = 0;

/// # Safety
/// As libc's `fstat64`.
unsafe fn local_fstat(fd: c_int, out: *mut libc::stat64) -> c_int {
    if let Some(f) = FSTAT64.try_get() {
        // SAFETY: libc's `fstat64`.
        let f: unsafe extern "C" fn(c_int, *mut libc::stat64) -> c_int =
            unsafe { std::mem::transmute(f) };
        // SAFETY: the caller's arguments.
        return unsafe { f(fd, out) };
    }
    if let Some(f) = FXSTAT64.try_get() {
        // SAFETY: libc's `__fxstat64`.
        let f: unsafe extern "C" fn(c_int, c_int, *mut libc::stat64) -> c_int =
            unsafe { std::mem::transmute(f) };
        // SAFETY: the caller's arguments.
        return unsafe { f(XSTAT_VERSION, fd, out) };
    }
    fail(libc::ENOSYS, -1)
}

/// # Safety
/// As libc's `fstatat64`.
unsafe fn local_fstatat(
    dirfd: c_int,
    path: *const c_char,
    out: *mut libc::stat64,
    flags: c_int,
) -> c_int {
    if let Some(f) = FSTATAT64.try_get() {
        // SAFETY: libc's `fstatat64`.
        let f: unsafe extern "C" fn(c_int, *const c_char, *mut libc::stat64, c_int) -> c_int =
            unsafe { std::mem::transmute(f) };
        // SAFETY: the caller's arguments.
        return unsafe { f(dirfd, path, out, flags) };
    }
    if let Some(f) = FXSTATAT64.try_get() {
        // SAFETY: libc's `__fxstatat64`.
        let f: unsafe extern "C" fn(
            c_int,
            c_int,
            *const c_char,
            *mut libc::stat64,
            c_int,
        ) -> c_int = unsafe { std::mem::transmute(f) };
        // SAFETY: the caller's arguments.
        return unsafe { f(XSTAT_VERSION, dirfd, path, out, flags) };
    }
    fail(libc::ENOSYS, -1)
}

fn stat_impl(path: *const c_char, out: *mut libc::stat64) -> c_int {
    path_stat(path, true, out)
        // SAFETY: the caller's arguments.
        .unwrap_or_else(|| unsafe { local_path_stat(&STAT64, &XSTAT64, path, out) })
}

fn lstat_impl(path: *const c_char, out: *mut libc::stat64) -> c_int {
    path_stat(path, false, out)
        // SAFETY: the caller's arguments.
        .unwrap_or_else(|| unsafe { local_path_stat(&LSTAT64, &LXSTAT64, path, out) })
}

fn fstat_impl(fd: c_int, out: *mut libc::stat64) -> c_int {
    fd_stat(fd, out)
        // SAFETY: the caller's arguments.
        .unwrap_or_else(|| unsafe { local_fstat(fd, out) })
}

fn fstatat_impl(dirfd: c_int, path: *const c_char, out: *mut libc::stat64, flags: c_int) -> c_int {
    let empty = path_of(path).is_some_and(|p| p.as_os_str().is_empty());
    let remote = if empty && flags & libc::AT_EMPTY_PATH != 0 {
        fd_stat(dirfd, out)
    } else if path_of(path).is_some_and(Path::is_absolute) || dirfd == libc::AT_FDCWD {
        path_stat(path, flags & libc::AT_SYMLINK_NOFOLLOW == 0, out)
    } else {
        None
    };
    // SAFETY: the caller's arguments.
    remote.unwrap_or_else(|| unsafe { local_fstatat(dirfd, path, out, flags) })
}

macro_rules! stat_hooks {
    ($($name:ident($($arg:ident: $ty:ty),*) => $body:expr;)*) => {$(
        /// # Safety
        /// As libc's function of the same name (64-bit `struct stat`).
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> c_int {
            $body
        }
    )*};
}

stat_hooks! {
    stat(path: *const c_char, out: *mut libc::stat64) => stat_impl(path, out);
    stat64(path: *const c_char, out: *mut libc::stat64) => stat_impl(path, out);
    lstat(path: *const c_char, out: *mut libc::stat64) => lstat_impl(path, out);
    lstat64(path: *const c_char, out: *mut libc::stat64) => lstat_impl(path, out);
    fstat(fd: c_int, out: *mut libc::stat64) => fstat_impl(fd, out);
    fstat64(fd: c_int, out: *mut libc::stat64) => fstat_impl(fd, out);
    fstatat(dirfd: c_int, path: *const c_char, out: *mut libc::stat64, flags: c_int) => fstatat_impl(dirfd, path, out, flags);
    fstatat64(dirfd: c_int, path: *const c_char, out: *mut libc::stat64, flags: c_int) => fstatat_impl(dirfd, path, out, flags);
    __xstat(_ver: c_int, path: *const c_char, out: *mut libc::stat64) => stat_impl(path, out);
    __xstat64(_ver: c_int, path: *const c_char, out: *mut libc::stat64) => stat_impl(path, out);
    __lxstat(_ver: c_int, path: *const c_char, out: *mut libc::stat64) => lstat_impl(path, out);
    __lxstat64(_ver: c_int, path: *const c_char, out: *mut libc::stat64) => lstat_impl(path, out);
    __fxstat(_ver: c_int, fd: c_int, out: *mut libc::stat64) => fstat_impl(fd, out);
    __fxstat64(_ver: c_int, fd: c_int, out: *mut libc::stat64) => fstat_impl(fd, out);
    __fxstatat(_ver: c_int, dirfd: c_int, path: *const c_char, out: *mut libc::stat64, flags: c_int) => fstatat_impl(dirfd, path, out, flags);
    __fxstatat64(_ver: c_int, dirfd: c_int, path: *const c_char, out: *mut libc::stat64, flags: c_int) => fstatat_impl(dirfd, path, out, flags);
}

/// # Safety
/// As libc's `statx`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn statx(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mask: libc::c_uint,
    out: *mut libc::statx,
) -> c_int {
    // SAFETY: plain old data.
    let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
    let empty = path_of(path).is_some_and(|p| p.as_os_str().is_empty());
    let remote = if empty && flags & libc::AT_EMPTY_PATH != 0 {
        fd_stat(dirfd, &mut st)
    } else if path_of(path).is_some_and(Path::is_absolute) || dirfd == libc::AT_FDCWD {
        path_stat(path, flags & libc::AT_SYMLINK_NOFOLLOW == 0, &mut st)
    } else {
        None
    };
    match remote {
        Some(0) => {
            // SAFETY: plain old data.
            let mut x: libc::statx = unsafe { std::mem::zeroed() };
            x.stx_mask = libc::STATX_BASIC_STATS;
            x.stx_blksize = st.st_blksize as u32;
            x.stx_nlink = st.st_nlink as u32;
            x.stx_uid = st.st_uid;
            x.stx_gid = st.st_gid;
            x.stx_mode = st.st_mode as u16;
            x.stx_ino = st.st_ino;
            x.stx_size = st.st_size as u64;
            x.stx_blocks = st.st_blocks as u64;
            let time = |sec: i64, nsec: i64| {
                // SAFETY: plain old data.
                let mut t: libc::statx_timestamp = unsafe { std::mem::zeroed() };
                t.tv_sec = sec;
                t.tv_nsec = nsec as u32;
                t
            };
            x.stx_atime = time(st.st_atime, st.st_atime_nsec);
            x.stx_mtime = time(st.st_mtime, st.st_mtime_nsec);
            x.stx_ctime = time(st.st_ctime, st.st_ctime_nsec);
            x.stx_rdev_major = libc::major(st.st_rdev);
            x.stx_rdev_minor = libc::minor(st.st_rdev);
            x.stx_dev_major = libc::major(st.st_dev);
            x.stx_dev_minor = libc::minor(st.st_dev);
            // SAFETY: the caller's out-buffer.
            unsafe { out.write(x) };
            0
        }
        Some(rc) => rc,
        None => match STATX.try_get() {
            Some(f) => {
                type Statx = unsafe extern "C" fn(
                    c_int,
                    *const c_char,
                    c_int,
                    libc::c_uint,
                    *mut libc::statx,
                ) -> c_int;
                // SAFETY: libc's `statx`.
                let f: Statx = unsafe { std::mem::transmute(f) };
                // SAFETY: the caller's arguments.
                unsafe { f(dirfd, path, flags, mask, out) }
            }
            None => fail(libc::ENOSYS, -1),
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Directories.

/// A directory opened in the target; its address is the `DIR *` handed out.
struct RemoteDir {
    handle: u64,
    /// Every entry listed so far, and where the next `readdir` reads: `rewinddir` (Ruby rewinds
    /// before it iterates) starts over without asking the target again.
    listed: Vec<tether_protocol::DirEntry>,
    cursor: usize,
    done: bool,
    /// Its fd: the placeholder `opendir` made or the fd `fdopendir` was given (the `DIR` owns
    /// it, `closedir` closes it); -1 for `scandir`'s own listing.
    fd: c_int,
    current: libc::dirent64,
}

/// Hands out a `DIR *` for the directory open in the target as `handle`.
fn register_dir(handle: u64, fd: c_int) -> *mut libc::DIR {
    let dir = Box::new(RemoteDir {
        handle,
        listed: Vec::new(),
        cursor: 0,
        done: false,
        fd,
        // SAFETY: plain old data.
        current: unsafe { std::mem::zeroed() },
    });
    let pointer = (&raw const *dir).cast_mut().cast::<libc::DIR>();
    DIRS.lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(Default::default)
        .insert(pointer as usize, dir);
    DIRS_ACTIVE.store(true, Ordering::Release);
    pointer
}

/// Opens `path` in the target as a directory.
fn open_remote_dir(path: String) -> Result<u64, c_int> {
    let op = Op::Open(FsOpen {
        path,
        flags: open_flags::READ | open_flags::DIRECTORY,
        mode: 0,
    });
    match fs(op) {
        Ok(FsResult::Opened(opened)) => Ok(opened.handle),
        Ok(_) => Err(libc::EIO),
        Err(errno) => Err(errno),
    }
}

/// The `DIR *`s this library handed out.
static DIRS: Mutex<Option<std::collections::HashMap<usize, Box<RemoteDir>>>> = Mutex::new(None);
static DIRS_ACTIVE: AtomicBool = AtomicBool::new(false);

/// The locks of this module, held across `fork` (see `lib.rs`).
pub(crate) struct ForkLocks {
    _dirs: std::sync::MutexGuard<'static, Option<std::collections::HashMap<usize, Box<RemoteDir>>>>,
}

pub(crate) fn lock_for_fork() -> ForkLocks {
    ForkLocks {
        _dirs: DIRS.lock().unwrap_or_else(|p| p.into_inner()),
    }
}

fn with_dir<T>(dir: *mut libc::DIR, f: impl FnOnce(&mut RemoteDir) -> T) -> Option<T> {
    if !DIRS_ACTIVE.load(Ordering::Acquire) {
        return None;
    }
    let _entered = enter()?;
    let saved = errno();
    let mut dirs = DIRS.lock().unwrap_or_else(|p| p.into_inner());
    let Some(found) = dirs.as_mut().and_then(|d| d.get_mut(&(dir as usize))) else {
        set_errno(saved);
        return None;
    };
    Some(f(found))
}

/// # Safety
/// As libc's `opendir`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn opendir(path: *const c_char) -> *mut libc::DIR {
    let remote = (|| {
        let _entered = enter()?;
        let path = path_of(path)?;
        match route(path, false) {
            FsRoute::Local => None,
            FsRoute::NotFound => Some(fail(libc::ENOENT, std::ptr::null_mut())),
            FsRoute::Remote => {
                // A placeholder fd first, so `dirfd` (Ruby's `Dir#fileno`) has one to give; the
                // DIR owns it, as one from `fdopendir` does.
                let fd = open_remote(
                    path,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
                    0,
                );
                if fd < 0 {
                    return Some(std::ptr::null_mut());
                }
                Some(match open_remote_dir(path.to_string_lossy().into_owned()) {
                    Ok(handle) => register_dir(handle, fd),
                    Err(errno) => {
                        crate::close_entered(&_entered, fd);
                        fail(errno, std::ptr::null_mut())
                    }
                })
            }
        }
    })();
    // SAFETY: argument passed through.
    remote.unwrap_or_else(|| unsafe { real::opendir(path) })
}

fn next_entry(dir: &mut RemoteDir) -> *mut libc::dirent64 {
    // After a `seekdir` the cursor may lie beyond what was listed so far.
    while dir.cursor >= dir.listed.len() && !dir.done {
        match fs(Op::ReadDir(FsHandle { handle: dir.handle })) {
            Ok(FsResult::Entries(batch)) => {
                dir.done = batch.done;
                dir.listed.extend(batch.entries);
            }
            Ok(_) => return fail(libc::EIO, std::ptr::null_mut()),
            Err(errno) => return fail(errno, std::ptr::null_mut()),
        }
    }
    let Some(entry) = dir.listed.get(dir.cursor) else {
        return std::ptr::null_mut(); // the end: errno untouched
    };
    dir.cursor += 1;
    let current = &mut dir.current;
    current.d_ino = entry.ino;
    current.d_off = dir.cursor as i64;
    current.d_reclen = size_of::<libc::dirent64>() as u16;
    current.d_type = entry.kind as u8;
    let name = entry.name.as_bytes();
    let n = name.len().min(current.d_name.len() - 1);
    for (slot, byte) in current.d_name.iter_mut().zip(&name[..n]) {
        *slot = *byte as c_char;
    }
    current.d_name[n] = 0;
    &raw mut dir.current
}

/// # Safety
/// As libc's `readdir`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn readdir(dir: *mut libc::DIR) -> *mut libc::dirent {
    // `struct dirent` and `struct dirent64` are the same on 64-bit Linux.
    with_dir(dir, |d| next_entry(d).cast())
        // SAFETY: argument passed through.
        .unwrap_or_else(|| unsafe { real::readdir(dir) })
}

/// # Safety
/// As libc's `readdir64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn readdir64(dir: *mut libc::DIR) -> *mut libc::dirent64 {
    with_dir(dir, next_entry)
        // SAFETY: argument passed through.
        .unwrap_or_else(|| unsafe { real::readdir64(dir) })
}

/// # Safety
/// As libc's `closedir`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn closedir(dir: *mut libc::DIR) -> c_int {
    if DIRS_ACTIVE.load(Ordering::Acquire)
        && let Some(entered) = enter()
    {
        let removed = DIRS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
            .and_then(|dirs| dirs.remove(&(dir as usize)));
        if let Some(removed) = removed {
            let _ = fs(Op::Close(FsHandle {
                handle: removed.handle,
            }));
            if removed.fd >= 0 {
                // The fd the DIR owns goes with it, with its records (its placeholder's remote
                // handle closes too).
                return crate::close_entered(&entered, removed.fd);
            }
            return 0;
        }
    }
    // SAFETY: argument passed through.
    unsafe { real::closedir(dir) }
}

/// # Safety
/// As libc's `dirfd`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dirfd(dir: *mut libc::DIR) -> c_int {
    // The placeholder fd `opendir` made, or the one `fdopendir` was given.
    with_dir(dir, |d| d.fd)
        // SAFETY: argument passed through.
        .unwrap_or_else(|| unsafe { real::dirfd(dir) })
}

/// # Safety
/// As libc's `rewinddir`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rewinddir(dir: *mut libc::DIR) {
    if with_dir(dir, |d| d.cursor = 0).is_none() {
        // SAFETY: argument passed through.
        unsafe { real::rewinddir(dir) }
    }
}

/// # Safety
/// As libc's `telldir`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn telldir(dir: *mut libc::DIR) -> libc::c_long {
    with_dir(dir, |d| d.cursor as libc::c_long)
        // SAFETY: argument passed through.
        .unwrap_or_else(|| unsafe { real::telldir(dir) })
}

/// # Safety
/// As libc's `seekdir` (`position` from `telldir`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn seekdir(dir: *mut libc::DIR, position: libc::c_long) {
    if with_dir(dir, |d| d.cursor = usize::try_from(position).unwrap_or(0)).is_none() {
        // SAFETY: arguments passed through.
        unsafe { real::seekdir(dir, position) }
    }
}

/// `open(dir, O_DIRECTORY)` then `fdopendir` is how Java's `Files.list` and `Files.walk` list a
/// directory: an fd standing for a directory in the target becomes a `DIR` listed there.
///
/// # Safety
/// As libc's `fdopendir`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdopendir(fd: c_int) -> *mut libc::DIR {
    let remote = (|| {
        let _entered = enter()?;
        let path = remote_file(fd)?
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .path
            .clone();
        Some(match open_remote_dir(path) {
            Ok(handle) => register_dir(handle, fd),
            Err(errno) => fail(errno, std::ptr::null_mut()),
        })
    })();
    // SAFETY: argument passed through.
    remote.unwrap_or_else(|| unsafe { real::fdopendir(fd) })
}

/// `scandir` lists with glibc's internal `opendir`, which no hook sees (node's `fs.readdirSync`
/// calls it): a directory in the target is listed here with the hooks above, then filtered and
/// sorted with the caller's functions. The list and its entries come from `malloc`: the caller
/// frees them.
///
/// `scandir`'s filter and comparison.
type ScanFilter = Option<unsafe extern "C" fn(*const libc::dirent64) -> c_int>;
type ScanCompare =
    Option<unsafe extern "C" fn(*mut *const libc::dirent64, *mut *const libc::dirent64) -> c_int>;

/// `struct dirent` and `struct dirent64` are the same on 64-bit Linux, where glibc's `scandir`
/// is `scandir64`.
///
/// # Safety
/// As libc's `scandir`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn scandir(
    path: *const c_char,
    list: *mut *mut *mut libc::dirent64,
    filter: ScanFilter,
    compare: ScanCompare,
) -> c_int {
    // SAFETY: the same contract.
    unsafe { scandir64(path, list, filter, compare) }
}

/// # Safety
/// As libc's `scandir64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn scandir64(
    path: *const c_char,
    list: *mut *mut *mut libc::dirent64,
    filter: ScanFilter,
    compare: ScanCompare,
) -> c_int {
    // The listing is made inside the layer; the caller's filter and comparison run outside it,
    // so their own libc calls (a `stat` of an entry) are hooked as usual.
    let listed = (|| {
        let _entered = enter()?;
        let path = path_of(path)?;
        Some(match route(path, false) {
            FsRoute::Local => return None,
            FsRoute::NotFound => Err(libc::ENOENT),
            FsRoute::Remote => {
                open_remote_dir(path.to_string_lossy().into_owned()).and_then(list_remote)
            }
        })
    })();
    match listed {
        // SAFETY: arguments passed through.
        None => unsafe { real::scandir64(path, list, filter, compare) },
        Some(Err(errno)) => fail(errno, -1),
        // SAFETY: the caller's out-pointer and functions, per scandir's contract.
        Some(Ok(entries)) => unsafe { hand_out(&entries, list, filter, compare) },
    }
}

/// Every entry of the directory open in the target as `handle`, which is closed after.
fn list_remote(handle: u64) -> Result<Vec<libc::dirent64>, c_int> {
    let mut dir = RemoteDir {
        handle,
        listed: Vec::new(),
        cursor: 0,
        done: false,
        fd: -1,
        // SAFETY: plain old data.
        current: unsafe { std::mem::zeroed() },
    };
    let saved = errno();
    let mut entries = Vec::new();
    let outcome = loop {
        set_errno(0);
        let entry = next_entry(&mut dir);
        if entry.is_null() {
            break if errno() == 0 { Ok(()) } else { Err(errno()) };
        }
        // SAFETY: `next_entry` returns a pointer to the DIR's current entry.
        entries.push(unsafe { entry.read() });
    };
    let _ = fs(Op::Close(FsHandle { handle }));
    set_errno(saved);
    outcome.map(|()| entries)
}

/// `scandir`'s result from `entries`: filtered, each copied into a `malloc`ed block, the array
/// `malloc`ed and sorted; the caller frees them.
///
/// # Safety
/// `list` is a valid out-pointer; `filter` and `compare` follow scandir's contract.
unsafe fn hand_out(
    entries: &[libc::dirent64],
    list: *mut *mut *mut libc::dirent64,
    filter: ScanFilter,
    compare: ScanCompare,
) -> c_int {
    let mut kept: Vec<*mut libc::dirent64> = Vec::new();
    let release = |kept: &[*mut libc::dirent64]| {
        for entry in kept {
            // SAFETY: each came from `malloc` below.
            unsafe { libc::free(entry.cast()) };
        }
    };
    for entry in entries {
        // SAFETY: the caller's filter, given a whole entry.
        if filter.is_some_and(|keep| unsafe { keep(entry) } == 0) {
            continue;
        }
        // SAFETY: a `dirent64`-sized block, freed by the caller (or below on failure).
        let copy = unsafe { libc::malloc(size_of::<libc::dirent64>()) }.cast::<libc::dirent64>();
        if copy.is_null() {
            release(&kept);
            return fail(libc::ENOMEM, -1);
        }
        // SAFETY: `copy` has room for a whole `dirent64`.
        unsafe { copy.write(*entry) };
        kept.push(copy);
    }
    // SAFETY: room for every pointer (at least one byte, as malloc(0) may return null).
    let array = unsafe { libc::malloc(kept.len().max(1) * size_of::<*mut libc::dirent64>()) }
        .cast::<*mut libc::dirent64>();
    if array.is_null() {
        release(&kept);
        return fail(libc::ENOMEM, -1);
    }
    // SAFETY: `array` has room for `kept.len()` pointers.
    unsafe { std::ptr::copy_nonoverlapping(kept.as_ptr(), array, kept.len()) };
    if let Some(compare) = compare {
        // SAFETY: `array` holds `kept.len()` pointers; the caller's comparison takes two
        // pointers to elements, which is what qsort passes.
        unsafe {
            libc::qsort(
                array.cast(),
                kept.len(),
                size_of::<*mut libc::dirent64>(),
                Some(std::mem::transmute::<
                    unsafe extern "C" fn(
                        *mut *const libc::dirent64,
                        *mut *const libc::dirent64,
                    ) -> c_int,
                    unsafe extern "C" fn(*const libc::c_void, *const libc::c_void) -> c_int,
                >(compare)),
            )
        };
    }
    // SAFETY: the caller's out-pointer.
    unsafe { *list = array };
    kept.len() as c_int
}

// ---------------------------------------------------------------------------------------------
// Paths: access, links, changes.

/// `None` when `path` stays local for this kind of operation; else the remote result.
fn remote_path_op<T>(
    path: *const c_char,
    write: bool,
    not_found: T,
    f: impl FnOnce(String) -> T,
) -> Option<T> {
    let _entered = enter()?;
    let path = path_of(path)?;
    match route(path, write) {
        FsRoute::Local => None,
        FsRoute::NotFound => Some(fail(libc::ENOENT, not_found)),
        FsRoute::Remote => Some(f(path.to_string_lossy().into_owned())),
    }
}

fn unit(result: Result<FsResult, c_int>) -> c_int {
    match result {
        Ok(_) => 0,
        Err(errno) => fail(errno, -1),
    }
}

/// # Safety
/// As libc's `access`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn access(path: *const c_char, mode: c_int) -> c_int {
    remote_path_op(path, false, -1, |path| {
        unit(fs(Op::Access(FsAccess {
            path,
            mode: mode as u32,
        })))
    })
    // SAFETY: arguments passed through.
    .unwrap_or_else(|| unsafe { real::access(path, mode) })
}

/// # Safety
/// As libc's `faccessat`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn faccessat(
    dirfd: c_int,
    path: *const c_char,
    mode: c_int,
    flags: c_int,
) -> c_int {
    let absolute = dirfd == libc::AT_FDCWD || path_of(path).is_some_and(Path::is_absolute);
    absolute
        .then(|| {
            remote_path_op(path, false, -1, |path| {
                unit(fs(Op::Access(FsAccess {
                    path,
                    mode: mode as u32,
                })))
            })
        })
        .flatten()
        // SAFETY: arguments passed through.
        .unwrap_or_else(|| unsafe { real::faccessat(dirfd, path, mode, flags) })
}

/// # Safety
/// As libc's `readlink`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn readlink(
    path: *const c_char,
    buf: *mut c_char,
    size: libc::size_t,
) -> libc::ssize_t {
    remote_path_op(path, false, -1, |path| {
        match fs(Op::ReadLink(FsPath { path })) {
            Ok(FsResult::Path(target)) => {
                // SAFETY: the caller's buffer of `size` bytes.
                let out = unsafe { out_slice(buf.cast(), size) };
                let n = target.len().min(out.len());
                out[..n].copy_from_slice(&target.as_bytes()[..n]);
                n as libc::ssize_t
            }
            Ok(_) => fail(libc::EIO, -1),
            Err(errno) => fail(errno, -1),
        }
    })
    // SAFETY: arguments passed through.
    .unwrap_or_else(|| unsafe { real::readlink(path, buf, size) })
}

/// # Safety
/// As libc's `realpath`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn realpath(path: *const c_char, resolved: *mut c_char) -> *mut c_char {
    remote_path_op(path, false, std::ptr::null_mut(), |path| {
        match fs(Op::RealPath(FsPath { path })) {
            Ok(FsResult::Path(real_path)) => {
                let Ok(text) = CString::new(real_path) else {
                    return fail(libc::EINVAL, std::ptr::null_mut());
                };
                let bytes = text.as_bytes_with_nul();
                if bytes.len() > libc::PATH_MAX as usize {
                    return fail(libc::ENAMETOOLONG, std::ptr::null_mut());
                }
                let out = if resolved.is_null() {
                    // SAFETY: the caller frees the result with `free`, so it comes from `malloc`.
                    unsafe { libc::malloc(bytes.len()) }.cast::<c_char>()
                } else {
                    resolved
                };
                if out.is_null() {
                    return fail(libc::ENOMEM, std::ptr::null_mut());
                }
                // SAFETY: `out` has room for PATH_MAX (caller's) or `bytes.len()` (ours) bytes.
                unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr().cast(), out, bytes.len()) };
                out
            }
            Ok(_) => fail(libc::EIO, std::ptr::null_mut()),
            Err(errno) => fail(errno, std::ptr::null_mut()),
        }
    })
    // SAFETY: arguments passed through.
    .unwrap_or_else(|| unsafe { real::realpath(path, resolved) })
}

/// # Safety
/// As libc's `unlink`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn unlink(path: *const c_char) -> c_int {
    remote_path_op(path, true, -1, |path| unit(fs(Op::Unlink(FsPath { path }))))
        // SAFETY: argument passed through.
        .unwrap_or_else(|| unsafe { real::unlink(path) })
}

/// # Safety
/// As libc's `mkdir`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mkdir(path: *const c_char, mode: libc::mode_t) -> c_int {
    remote_path_op(path, true, -1, |path| {
        unit(fs(Op::Mkdir(FsMkdir { path, mode })))
    })
    // SAFETY: arguments passed through.
    .unwrap_or_else(|| unsafe { real::mkdir(path, mode) })
}

/// # Safety
/// As libc's `rename`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rename(from: *const c_char, to: *const c_char) -> c_int {
    let remote = (|| {
        let _entered = enter()?;
        let (from_path, to_path) = (path_of(from)?, path_of(to)?);
        match (route(from_path, true), route(to_path, true)) {
            (FsRoute::Local, FsRoute::Local) => None,
            (FsRoute::Remote, FsRoute::Remote) => Some(unit(fs(Op::Rename(FsRename {
                from: from_path.to_string_lossy().into_owned(),
                to: to_path.to_string_lossy().into_owned(),
            })))),
            (FsRoute::NotFound, _) | (_, FsRoute::NotFound) => Some(fail(libc::ENOENT, -1)),
            // One side local, the other in the target: like two filesystems.
            _ => Some(fail(libc::EXDEV, -1)),
        }
    })();
    // SAFETY: arguments passed through.
    remote.unwrap_or_else(|| unsafe { real::rename(from, to) })
}
