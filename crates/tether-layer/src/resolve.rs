//! Names: `getaddrinfo`, `freeaddrinfo` and the `gethostbyname` family (`gethostbyname2`, the
//! `_r` forms) resolve in the target unless the DNS
//! filter keeps a name local. glibc's own DNS sockets inside `getaddrinfo` cannot be seen from
//! here, so the whole call is replaced.
//!
//! Every address handed out (by the target or by the local resolver) is remembered with its name,
//! so the outgoing filter can match names and a name resolved in the target always connects
//! through it.

// The hooks are exported by symbol name (`no_mangle`), not by Rust path.
#![allow(unreachable_pub)]

use std::{
    collections::HashSet,
    ffi::{CStr, CString, c_char, c_int},
    net::{IpAddr, SocketAddr},
    sync::Mutex,
};

use crate::{Answer, Request, addr, enter, policy, policy::Names, real, set_errno};

static NAMES: Mutex<Option<Names>> = Mutex::new(None);

/// Lists this library allocated (heads), so `freeaddrinfo` frees them itself.
static OURS: Mutex<Option<HashSet<usize>>> = Mutex::new(None);

/// The locks of this module, held across `fork` (see `lib.rs`).
pub(crate) struct ForkLocks {
    _names: std::sync::MutexGuard<'static, Option<Names>>,
    _ours: std::sync::MutexGuard<'static, Option<HashSet<usize>>>,
}

pub(crate) fn lock_for_fork() -> ForkLocks {
    ForkLocks {
        _names: NAMES.lock().unwrap_or_else(|p| p.into_inner()),
        _ours: OURS.lock().unwrap_or_else(|p| p.into_inner()),
    }
}

/// The name `ip` was resolved from, and whether in the target.
pub(crate) fn name_of(ip: IpAddr) -> Option<(String, bool)> {
    let names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
    names.as_ref()?.get(ip).map(|(n, r)| (n.to_owned(), r))
}

fn remember(ips: impl IntoIterator<Item = IpAddr>, name: &str, remote: bool) {
    let mut names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
    let names = names.get_or_insert_with(Names::default);
    for ip in ips {
        names.remember(ip, name, remote);
    }
}

/// Resolves `name` in the target: `None` when it stays local, else the addresses (empty: no
/// such name) or `Err` for a temporary failure.
fn resolve_remote(name: &str, family: c_int) -> Option<Result<(Vec<IpAddr>, String), ()>> {
    if !policy()?.dns(name) {
        return None;
    }
    let family = match family {
        libc::AF_INET => 4,
        libc::AF_INET6 => 6,
        _ => 0,
    };
    let request = Request::Resolve {
        name: name.to_owned(),
        family,
    };
    Some(match crate::ask(&request) {
        Ok(Answer::Resolved {
            addresses,
            canonical,
        }) => {
            remember(addresses.iter().copied(), name, true);
            Ok((addresses, canonical))
        }
        _ => Err(()),
    })
}

/// One `addrinfo` with the address it points to, allocated together.
#[repr(C)]
struct Entry {
    info: libc::addrinfo,
    storage: libc::sockaddr_storage,
}

/// # Safety
/// As libc's `getaddrinfo`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getaddrinfo(
    node: *const c_char,
    service: *const c_char,
    hints: *const libc::addrinfo,
    res: *mut *mut libc::addrinfo,
) -> c_int {
    // SAFETY: `hints` is null or a valid addrinfo, per getaddrinfo's contract.
    let hints_copy = (!hints.is_null()).then(|| unsafe { *hints });
    let (family, socktype, protocol, flags) = hints_copy.map_or((libc::AF_UNSPEC, 0, 0, 0), |h| {
        (h.ai_family, h.ai_socktype, h.ai_protocol, h.ai_flags)
    });
    if !node.is_null()
        && !res.is_null()
        && flags & libc::AI_NUMERICHOST == 0
        && let Some(_entered) = enter()
        // SAFETY: `node` is a C string, per the contract.
        && let Ok(name) = unsafe { CStr::from_ptr(node) }.to_str()
        // AF_INET6 with AI_V4MAPPED takes IPv4 answers too (mapped): ask for every family.
        && let Some(resolved) = resolve_remote(
            name,
            if family == libc::AF_INET6 && flags & libc::AI_V4MAPPED != 0 {
                libc::AF_UNSPEC
            } else {
                family
            },
        )
    {
        let (addresses, canonical) = match resolved {
            Ok(found) => found,
            Err(()) => return libc::EAI_AGAIN,
        };
        // SAFETY: `service` is null or a C string.
        let port = match unsafe { service_port(service, socktype) } {
            Some(port) => port,
            None => return libc::EAI_SERVICE,
        };
        let mut ips: Vec<IpAddr> = addresses
            .into_iter()
            .filter(|ip| match family {
                libc::AF_INET => ip.is_ipv4(),
                libc::AF_INET6 => ip.is_ipv6() || flags & libc::AI_V4MAPPED != 0,
                _ => true,
            })
            .collect();
        if family == libc::AF_INET6 && ips.iter().any(IpAddr::is_ipv6) {
            ips.retain(IpAddr::is_ipv6);
        }
        if ips.is_empty() {
            return libc::EAI_NONAME;
        }
        let kinds: Vec<(c_int, c_int)> = match socktype {
            0 => vec![
                (libc::SOCK_STREAM, libc::IPPROTO_TCP),
                (libc::SOCK_DGRAM, libc::IPPROTO_UDP),
            ],
            libc::SOCK_STREAM if protocol == 0 => vec![(libc::SOCK_STREAM, libc::IPPROTO_TCP)],
            libc::SOCK_DGRAM if protocol == 0 => vec![(libc::SOCK_DGRAM, libc::IPPROTO_UDP)],
            kind => vec![(kind, protocol)],
        };
        let canonical = (flags & libc::AI_CANONNAME != 0)
            .then(|| {
                CString::new(if canonical.is_empty() {
                    name
                } else {
                    &canonical
                })
                .ok()
            })
            .flatten();
        // SAFETY: `res` is valid per the contract.
        unsafe { *res = build(&ips, port, &kinds, family, canonical) };
        return 0;
    }
    // SAFETY: arguments passed through.
    let rc = unsafe { real::getaddrinfo(node, service, hints, res) };
    if rc == 0
        && !node.is_null()
        && let Some(_entered) = enter()
        // SAFETY: as above.
        && let Ok(name) = unsafe { CStr::from_ptr(node) }.to_str()
        && name.parse::<IpAddr>().is_err()
    {
        let mut ips = Vec::new();
        // SAFETY: libc returned a valid list.
        let mut cursor = unsafe { *res };
        while !cursor.is_null() {
            // SAFETY: each node is valid until freeaddrinfo.
            let info = unsafe { &*cursor };
            // SAFETY: ai_addr points to ai_addrlen bytes.
            if let Some(addr) = unsafe { addr::read(info.ai_addr, info.ai_addrlen) } {
                ips.push(addr.ip());
            }
            cursor = info.ai_next;
        }
        remember(ips, name, false);
    }
    rc
}

/// The port of `service` (a number or a name from the services database); `None`: unknown.
///
/// # Safety
/// `service` must be null or a C string.
unsafe fn service_port(service: *const c_char, socktype: c_int) -> Option<u16> {
    if service.is_null() {
        return Some(0);
    }
    // SAFETY: per the contract.
    let text = unsafe { CStr::from_ptr(service) };
    if let Ok(port) = text.to_str().unwrap_or("").parse::<u16>() {
        return Some(port);
    }
    let proto: &CStr = if socktype == libc::SOCK_DGRAM {
        c"udp"
    } else {
        c"tcp"
    };
    // The reentrant form: getaddrinfo runs on many threads at once (curl's, libuv's).
    // SAFETY: plain old data.
    let mut entry: libc::servent = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::servent = std::ptr::null_mut();
    let mut buf = [0 as c_char; 1024];
    // SAFETY: C strings, our own out-buffers with their sizes.
    let rc = unsafe {
        getservbyname_r(
            text.as_ptr(),
            proto.as_ptr(),
            &mut entry,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    (rc == 0 && !found.is_null()).then(|| u16::from_be(entry.s_port as u16))
}

unsafe extern "C" {
    fn getservbyname_r(
        name: *const c_char,
        proto: *const c_char,
        result_buf: *mut libc::servent,
        buf: *mut c_char,
        buflen: libc::size_t,
        result: *mut *mut libc::servent,
    ) -> c_int;
}

/// Allocates the list: every address × socket kind.
fn build(
    ips: &[IpAddr],
    port: u16,
    kinds: &[(c_int, c_int)],
    family: c_int,
    canonical: Option<CString>,
) -> *mut libc::addrinfo {
    let mut canonical = canonical.map(CString::into_raw);
    let mut head: *mut libc::addrinfo = std::ptr::null_mut();
    let mut tail: *mut *mut libc::addrinfo = &raw mut head;
    for ip in ips {
        let as_family = match (family, ip) {
            (libc::AF_INET6, IpAddr::V4(_)) => libc::AF_INET6,
            (_, IpAddr::V4(_)) => libc::AF_INET,
            (_, IpAddr::V6(_)) => libc::AF_INET6,
        };
        for &(socktype, protocol) in kinds {
            let (storage, len) = addr::encode(SocketAddr::new(*ip, port), as_family);
            let entry = Box::into_raw(Box::new(Entry {
                info: libc::addrinfo {
                    ai_flags: 0,
                    ai_family: as_family,
                    ai_socktype: socktype,
                    ai_protocol: protocol,
                    ai_addrlen: len,
                    ai_addr: std::ptr::null_mut(),
                    ai_canonname: canonical.take().unwrap_or(std::ptr::null_mut()),
                    ai_next: std::ptr::null_mut(),
                },
                storage,
            }));
            // SAFETY: `entry` was just allocated; `tail` points to the last `ai_next` (or head).
            unsafe {
                (*entry).info.ai_addr = (&raw mut (*entry).storage).cast();
                *tail = entry.cast();
                tail = &raw mut (*entry).info.ai_next;
            }
        }
    }
    OURS.lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashSet::new)
        .insert(head as usize);
    head
}

/// # Safety
/// As libc's `freeaddrinfo`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn freeaddrinfo(res: *mut libc::addrinfo) {
    let ours = !res.is_null()
        && OURS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
            .is_some_and(|set| set.remove(&(res as usize)));
    if !ours {
        // SAFETY: a list from libc's getaddrinfo.
        return unsafe { real::freeaddrinfo(res) };
    }
    let mut cursor = res;
    while !cursor.is_null() {
        // SAFETY: every node of this list is an `Entry` allocated by `build`, freed once.
        let entry = unsafe { Box::from_raw(cursor.cast::<Entry>()) };
        if !entry.info.ai_canonname.is_null() {
            // SAFETY: allocated by CString::into_raw in `build`.
            drop(unsafe { CString::from_raw(entry.info.ai_canonname) });
        }
        cursor = entry.info.ai_next;
    }
}

/// `h_errno` values (netdb.h).
const HOST_NOT_FOUND: c_int = 1;
const TRY_AGAIN: c_int = 2;
const NO_DATA: c_int = 4;
const NETDB_INTERNAL: c_int = -1;

unsafe extern "C" {
    /// glibc's per-thread `h_errno`.
    fn __h_errno_location() -> *mut c_int;
}

/// A name and its addresses as a `hostent` lists them (4 or 16 bytes each).
type Host = (CString, Vec<Vec<u8>>);

/// `name`'s addresses of `family` in the target; `Err(h_errno)` when it has none. `None`: the
/// name is not the target's to resolve.
fn remote_host(name: *const c_char, family: c_int) -> Option<Result<Host, c_int>> {
    if name.is_null() || !matches!(family, libc::AF_INET | libc::AF_INET6) {
        return None;
    }
    // SAFETY: `name` is a C string, per the callers' contract.
    let text = unsafe { CStr::from_ptr(name) }.to_str().ok()?;
    let resolved = resolve_remote(text, family)?;
    // The target could not be asked (or did not answer): try again, not "unknown host".
    let Ok((addresses, _)) = resolved else {
        return Some(Err(TRY_AGAIN));
    };
    if addresses.is_empty() {
        return Some(Err(HOST_NOT_FOUND));
    }
    let addresses: Vec<Vec<u8>> = addresses
        .iter()
        .filter_map(|ip| match (ip, family) {
            (IpAddr::V4(v4), libc::AF_INET) => Some(v4.octets().to_vec()),
            (IpAddr::V6(v6), libc::AF_INET6) => Some(v6.octets().to_vec()),
            _ => None,
        })
        .collect();
    if addresses.is_empty() {
        return Some(Err(NO_DATA));
    }
    Some(
        CString::new(text)
            .map(|n| (n, addresses))
            .map_err(|_| HOST_NOT_FOUND),
    )
}

/// Storage behind the `hostent` `gethostbyname`/`gethostbyname2` return (per thread; valid
/// until the next call on that thread, which is more than libc promises).
struct HostStorage {
    entry: libc::hostent,
    _name: CString,
    _addresses: Vec<Vec<u8>>,
    _list: Vec<*mut c_char>,
    _aliases: Vec<*mut c_char>,
}

thread_local! {
    static HOST: std::cell::RefCell<Option<Box<HostStorage>>> = const { std::cell::RefCell::new(None) };
}

/// # Safety
/// As libc's `gethostbyname`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gethostbyname(name: *const c_char) -> *mut libc::hostent {
    // SAFETY: the caller's contract is gethostbyname2's with AF_INET.
    unsafe { gethostbyname2(name, libc::AF_INET) }
}

/// `getent hosts` asks for AF_INET6 first, then AF_INET.
///
/// # Safety
/// As libc's `gethostbyname2`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gethostbyname2(name: *const c_char, family: c_int) -> *mut libc::hostent {
    if let Some(_entered) = enter()
        && let Some(found) = remote_host(name, family)
    {
        let (owned_name, mut addresses) = match found {
            Ok(found) => found,
            Err(code) => {
                // SAFETY: glibc's per-thread h_errno.
                unsafe { *__h_errno_location() = code };
                return std::ptr::null_mut();
            }
        };
        let length = addresses[0].len() as c_int;
        let mut list: Vec<*mut c_char> = addresses
            .iter_mut()
            .map(|a| a.as_mut_ptr().cast())
            .collect();
        list.push(std::ptr::null_mut());
        let mut aliases = vec![std::ptr::null_mut()];
        let mut storage = Box::new(HostStorage {
            entry: libc::hostent {
                h_name: owned_name.as_ptr().cast_mut(),
                h_aliases: aliases.as_mut_ptr(),
                h_addrtype: family,
                h_length: length,
                h_addr_list: list.as_mut_ptr(),
            },
            _name: owned_name,
            _addresses: addresses,
            _list: list,
            _aliases: aliases,
        });
        let pointer = &raw mut storage.entry;
        // The storage lives in this thread's slot; without the slot (the thread is ending)
        // there is nowhere to keep it: no result rather than a dangling one.
        if HOST
            .try_with(|slot| *slot.borrow_mut() = Some(storage))
            .is_err()
        {
            // SAFETY: glibc's per-thread h_errno.
            unsafe { *__h_errno_location() = NETDB_INTERNAL };
            return std::ptr::null_mut();
        }
        return pointer;
    }
    // SAFETY: arguments passed through.
    unsafe { real::gethostbyname2(name, family) }
}

/// The caller's buffers of the `_r` forms (`gethostbyname_r`, `gethostbyaddr_r`, …).
struct HostOut {
    ret: *mut libc::hostent,
    buf: *mut c_char,
    buflen: libc::size_t,
    result: *mut *mut libc::hostent,
    h_errnop: *mut c_int,
}

impl HostOut {
    fn set_h_errno(&self, code: c_int) {
        if !self.h_errnop.is_null() {
            // SAFETY: a valid out-pointer (or null), per the `_r` contract.
            unsafe { *self.h_errnop = code };
        }
    }

    /// Writes `found` (or its h_errno) as the `_r` forms do; returns their result code.
    ///
    /// # Safety
    /// `ret`, `result` valid out-pointers; `buf` has `buflen` writable bytes.
    unsafe fn fill(&self, family: c_int, found: Result<Host, c_int>) -> c_int {
        // SAFETY: `result` is a valid out-pointer, per the contract.
        unsafe { *self.result = std::ptr::null_mut() };
        let (owned_name, addresses) = match found {
            Ok(found) => found,
            // As glibc: no such host is a success with no result (h_errno says why); a
            // resolver that could not be asked is EAGAIN.
            Err(TRY_AGAIN) => {
                self.set_h_errno(TRY_AGAIN);
                return libc::EAGAIN;
            }
            Err(code) => {
                self.set_h_errno(code);
                return 0;
            }
        };
        // The caller's buffer holds, pointer-aligned: the alias list (one null), the address
        // list (a pointer per address and a null), the addresses, the name.
        let pointer = size_of::<*mut c_char>();
        let skip = self.buf.align_offset(align_of::<*mut c_char>());
        let pointers = 1 + addresses.len() + 1;
        let bytes: usize = addresses.iter().map(Vec::len).sum();
        let name_bytes = owned_name.as_bytes_with_nul();
        let needed = skip + pointers * pointer + bytes + name_bytes.len();
        if needed > self.buflen || addresses.is_empty() {
            self.set_h_errno(NETDB_INTERNAL);
            set_errno(libc::ERANGE);
            return libc::ERANGE;
        }
        // SAFETY: `buf` has `buflen` ≥ `needed` writable bytes, per the contract; `skip` makes
        // the pointer arrays aligned; every write below stays within `needed`.
        unsafe {
            let aliases = self.buf.add(skip).cast::<*mut c_char>();
            *aliases = std::ptr::null_mut();
            let list = aliases.add(1);
            let mut data = list.add(addresses.len() + 1).cast::<c_char>();
            for (i, address) in addresses.iter().enumerate() {
                std::ptr::copy_nonoverlapping(address.as_ptr().cast(), data, address.len());
                *list.add(i) = data;
                data = data.add(address.len());
            }
            *list.add(addresses.len()) = std::ptr::null_mut();
            std::ptr::copy_nonoverlapping(name_bytes.as_ptr().cast(), data, name_bytes.len());
            *self.ret = libc::hostent {
                h_name: data,
                h_aliases: aliases,
                h_addrtype: family,
                h_length: addresses[0].len() as c_int,
                h_addr_list: list,
            };
            *self.result = self.ret;
        }
        self.set_h_errno(0);
        0
    }
}

/// # Safety
/// As libc's `gethostbyname_r` (what Python's `socket.gethostbyname` calls).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gethostbyname_r(
    name: *const c_char,
    ret: *mut libc::hostent,
    buf: *mut c_char,
    buflen: libc::size_t,
    result: *mut *mut libc::hostent,
    h_errnop: *mut c_int,
) -> c_int {
    // SAFETY: the caller's contract is gethostbyname2_r's with AF_INET.
    unsafe { gethostbyname2_r(name, libc::AF_INET, ret, buf, buflen, result, h_errnop) }
}

/// # Safety
/// As libc's `gethostbyname2_r`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gethostbyname2_r(
    name: *const c_char,
    family: c_int,
    ret: *mut libc::hostent,
    buf: *mut c_char,
    buflen: libc::size_t,
    result: *mut *mut libc::hostent,
    h_errnop: *mut c_int,
) -> c_int {
    if !ret.is_null()
        && !buf.is_null()
        && !result.is_null()
        && let Some(_entered) = enter()
        && let Some(found) = remote_host(name, family)
    {
        let out = HostOut {
            ret,
            buf,
            buflen,
            result,
            h_errnop,
        };
        // SAFETY: the caller's buffers, per gethostbyname2_r's contract.
        return unsafe { out.fill(family, found) };
    }
    // SAFETY: arguments passed through.
    unsafe { real::gethostbyname2_r(name, family, ret, buf, buflen, result, h_errnop) }
}

/// The name of `ip` as the target knows it, when `ip` is the target's business: a name it
/// resolved (remembered, no question asked), or an address the outgoing policy sends to the
/// target (asked: its hosts file, then a PTR query). `None`: a local matter; `Err(h_errno)`:
/// the target has no name for it.
fn remote_name(ip: IpAddr) -> Option<Result<String, c_int>> {
    if let Some((name, true)) = name_of(ip) {
        return Some(Ok(name));
    }
    let policy = policy()?;
    let addr = SocketAddr::new(ip, 0);
    if !policy.may_go_remote(addr)
        || !policy.outgoing(crate::channel::Transport::Tcp, addr, None, false)
    {
        return None;
    }
    Some(match crate::ask(&Request::ResolveAddress { address: ip }) {
        Ok(Answer::Resolved { canonical, .. }) if !canonical.is_empty() => Ok(canonical),
        Ok(Answer::Resolved { .. }) => Err(HOST_NOT_FOUND),
        _ => Err(TRY_AGAIN),
    })
}

/// The address `gethostbyaddr` is given, if it is one (AF_INET, 4 bytes; AF_INET6, 16).
///
/// # Safety
/// `address` is null or points to `len` bytes.
unsafe fn host_address(
    address: *const libc::c_void,
    len: libc::socklen_t,
    family: c_int,
) -> Option<IpAddr> {
    if address.is_null() {
        return None;
    }
    match (family, len) {
        // SAFETY: `address` points to `len` bytes, per the contract.
        (libc::AF_INET, 4) => Some(IpAddr::from(unsafe {
            address.cast::<[u8; 4]>().read_unaligned()
        })),
        // SAFETY: as above.
        (libc::AF_INET6, 16) => Some(IpAddr::from(unsafe {
            address.cast::<[u8; 16]>().read_unaligned()
        })),
        _ => None,
    }
}

/// # Safety
/// As libc's `gethostbyaddr_r` (what Python's `socket.gethostbyaddr` calls).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gethostbyaddr_r(
    address: *const libc::c_void,
    len: libc::socklen_t,
    family: c_int,
    ret: *mut libc::hostent,
    buf: *mut c_char,
    buflen: libc::size_t,
    result: *mut *mut libc::hostent,
    h_errnop: *mut c_int,
) -> c_int {
    if !ret.is_null()
        && !buf.is_null()
        && !result.is_null()
        // SAFETY: the caller's address, per the contract.
        && let Some(ip) = unsafe { host_address(address, len, family) }
        && let Some(_entered) = enter()
        && let Some(found) = remote_name(ip)
    {
        let out = HostOut {
            ret,
            buf,
            buflen,
            result,
            h_errnop,
        };
        let found = found.and_then(|name| {
            let name = CString::new(name).map_err(|_| HOST_NOT_FOUND)?;
            Ok((name, vec![ip_octets(ip)]))
        });
        // SAFETY: the caller's buffers, per gethostbyaddr_r's contract.
        return unsafe { out.fill(family, found) };
    }
    // SAFETY: arguments passed through.
    unsafe { real::gethostbyaddr_r(address, len, family, ret, buf, buflen, result, h_errnop) }
}

fn ip_octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// Reverse names of the target's addresses (`getent hosts ADDRESS`).
///
/// # Safety
/// As libc's `gethostbyaddr`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gethostbyaddr(
    address: *const libc::c_void,
    len: libc::socklen_t,
    family: c_int,
) -> *mut libc::hostent {
    // SAFETY: the caller's address, per the contract.
    if let Some(ip) = unsafe { host_address(address, len, family) }
        && let Some(_entered) = enter()
        && let Some(found) = remote_name(ip)
    {
        let name = match found.and_then(|name| CString::new(name).map_err(|_| HOST_NOT_FOUND)) {
            Ok(name) => name,
            Err(code) => {
                // SAFETY: glibc's per-thread h_errno.
                unsafe { *__h_errno_location() = code };
                return std::ptr::null_mut();
            }
        };
        let mut addresses = vec![ip_octets(ip)];
        let mut list: Vec<*mut c_char> =
            vec![addresses[0].as_mut_ptr().cast(), std::ptr::null_mut()];
        let mut aliases = vec![std::ptr::null_mut()];
        let mut storage = Box::new(HostStorage {
            entry: libc::hostent {
                h_name: name.as_ptr().cast_mut(),
                h_aliases: aliases.as_mut_ptr(),
                h_addrtype: family,
                h_length: len as c_int,
                h_addr_list: list.as_mut_ptr(),
            },
            _name: name,
            _addresses: std::mem::take(&mut addresses),
            _list: list,
            _aliases: aliases,
        });
        let pointer = &raw mut storage.entry;
        // The storage lives in this thread's slot; without the slot (the thread is ending)
        // there is nowhere to keep it: no result rather than a dangling one.
        if HOST
            .try_with(|slot| *slot.borrow_mut() = Some(storage))
            .is_err()
        {
            // SAFETY: glibc's per-thread h_errno.
            unsafe { *__h_errno_location() = NETDB_INTERNAL };
            return std::ptr::null_mut();
        }
        return pointer;
    }
    // SAFETY: arguments passed through.
    unsafe { real::gethostbyaddr(address, len, family) }
}

/// The host part of an address's name from the target (`NI_NUMERICHOST` keeps it numeric, as
/// ever); the service part is libc's.
///
/// # Safety
/// As libc's `getnameinfo`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getnameinfo(
    address: *const libc::sockaddr,
    len: libc::socklen_t,
    host: *mut c_char,
    host_len: libc::socklen_t,
    service: *mut c_char,
    service_len: libc::socklen_t,
    flags: c_int,
) -> c_int {
    if !host.is_null()
        && host_len > 0
        && flags & libc::NI_NUMERICHOST == 0
        && let Some(_entered) = enter()
        // SAFETY: `address` points to `len` bytes, per the contract.
        && let Some(socket_address) = unsafe { addr::read(address, len) }
        && let Some(found) = remote_name(socket_address.ip())
    {
        let name = match found {
            Ok(name) => name,
            Err(TRY_AGAIN) if flags & libc::NI_NAMEREQD != 0 => return libc::EAI_AGAIN,
            Err(_) if flags & libc::NI_NAMEREQD != 0 => return libc::EAI_NONAME,
            // No name in the target: the numeric form, as libc gives when DNS has none.
            Err(_) => {
                // SAFETY: arguments passed through, the host asked for numerically.
                return unsafe {
                    real::getnameinfo(
                        address,
                        len,
                        host,
                        host_len,
                        service,
                        service_len,
                        flags | libc::NI_NUMERICHOST,
                    )
                };
            }
        };
        let name = if flags & libc::NI_NOFQDN != 0 {
            name.split('.').next().unwrap_or(&name).to_owned()
        } else {
            name
        };
        if name.len() + 1 > host_len as usize {
            return libc::EAI_OVERFLOW;
        }
        if !service.is_null() && service_len > 0 {
            // SAFETY: the caller's service buffer; no host asked of libc.
            let rc = unsafe {
                real::getnameinfo(
                    address,
                    len,
                    std::ptr::null_mut(),
                    0,
                    service,
                    service_len,
                    flags,
                )
            };
            if rc != 0 {
                return rc;
            }
        }
        // SAFETY: `host` has `host_len` > `name.len()` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(name.as_ptr().cast::<c_char>(), host, name.len());
            *host.add(name.len()) = 0;
        }
        return 0;
    }
    // SAFETY: arguments passed through.
    unsafe { real::getnameinfo(address, len, host, host_len, service, service_len, flags) }
}
