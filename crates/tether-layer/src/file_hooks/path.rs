//! Paths: access, links, changes.

use super::*;

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
        match plan::rename(policy(), from_path, to_path) {
            RenamePlan::Local => None,
            RenamePlan::Remote => Some(unit(fs(Op::Rename(FsRename {
                from: from_path.to_string_lossy().into_owned(),
                to: to_path.to_string_lossy().into_owned(),
            })))),
            RenamePlan::Fail(errno) => Some(fail(errno, -1)),
        }
    })();
    // SAFETY: arguments passed through.
    remote.unwrap_or_else(|| unsafe { real::rename(from, to) })
}
