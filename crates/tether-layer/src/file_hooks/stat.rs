//! The stat family, `statx` included. On 64-bit Linux `struct stat` and `struct stat64` are the
//! same; the local calls go to `stat64` & co. (glibc ≥ 2.33) or the older `__xstat64` entry points.

use super::*;

/// # Safety
/// `out` must be a valid `struct stat64` out-buffer.
unsafe fn fill_stat(stat: &FileStat, out: *mut libc::stat64) {
    // On 64-bit Linux `struct stat64` is `struct stat`.
    const _: () = assert!(size_of::<libc::stat64>() == size_of::<libc::stat>());
    // SAFETY: plain old data.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    tether_intercept::stat::fill_stat(stat, &mut st);
    // SAFETY: per the contract; the two structs have one layout (checked above).
    unsafe { out.cast::<libc::stat>().write(st) };
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
