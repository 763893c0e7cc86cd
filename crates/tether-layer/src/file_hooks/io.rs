//! Reads, writes and seeks on files opened in the target; the kernel-copy calls that cannot serve them refuse.

use super::*;

fn ssize(result: Result<usize, c_int>) -> libc::ssize_t {
    match result {
        Ok(n) => n as libc::ssize_t,
        Err(errno) => fail(errno, -1),
    }
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
    let handle = file.handle;
    let end = || stat_remote(String::new(), handle, true).map(|stat| stat.size);
    match plan::seek(file.position, offset, whence, end) {
        Ok(position) => {
            file.position = position;
            position as i64
        }
        Err(errno) => fail(errno, -1),
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
