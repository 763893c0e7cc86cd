//! The open family: `open`, `openat`, `creat`, `fopen` (through `fopencookie` unless the file was copied whole).

use super::{
    io::{lseek64, read, write},
    *,
};

/// Opens `path` in the target as `how` says; returns the placeholder fd.
pub(super) fn open_remote(path: &Path, how: RemoteOpen) -> c_int {
    let text = path.to_string_lossy().into_owned();
    let op = Op::Open(FsOpen {
        path: text.clone(),
        flags: how.flags,
        mode: how.mode,
    });
    let handle = match fs(op) {
        Ok(FsResult::Opened(opened)) => opened.handle,
        Ok(_) => return fail(libc::EIO, -1),
        Err(errno) => return fail(errno, -1),
    };
    let memfd_flags = if how.cloexec { libc::MFD_CLOEXEC } else { 0 };
    // SAFETY: a C string name and valid flags.
    let mut fd = unsafe { libc::memfd_create(c"tether-remote-file".as_ptr(), memfd_flags) };
    if fd < 0 {
        let _ = fs(Op::Close(FsHandle { handle }));
        return fail(libc::EMFILE, -1);
    }
    let mut snapshot = None;
    if how.snapshot {
        match copy_small_file(handle, fd, how.cloexec) {
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
    let mut file = RemoteFile::new(handle, text, how.append, placeholder);
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
    cloexec: bool,
) -> Result<Option<(c_int, FileStat)>, c_int> {
    let stat = stat_remote(String::new(), handle, true)?;
    if !plan::snapshot_fits(stat.mode, stat.size) {
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
    let reopen = libc::O_RDONLY | if cloexec { libc::O_CLOEXEC } else { 0 };
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
    let open = Open { flags, mode };
    let relative_to_dirfd = dirfd.is_some_and(|d| d != libc::AT_FDCWD);
    // Decided without the re-entry guard while the policy is known: most opens stay local.
    if let Some(policy) = crate::ready_policy()
        && open.plan(policy, path, relative_to_dirfd) == OpenPlan::Local
    {
        return None;
    }
    let _entered = enter()?;
    match open.plan(policy(), path, relative_to_dirfd) {
        OpenPlan::Local => None,
        OpenPlan::NotFound => Some(fail(libc::ENOENT, -1)),
        OpenPlan::Remote => Some(open_remote(path, open.remote())),
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
    let open = Open::from_fopen(unsafe { CStr::from_ptr(mode) }.to_bytes())?;
    let fd = open_hook(None, path, open.flags, open.mode as libc::mode_t)?;
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
