//! Directories: a remote `DIR` lists its entries and keeps a cursor; `scandir`.

use super::{open::open_remote, *};

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
                let fd = open_remote(path, RemoteOpen::directory());
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
