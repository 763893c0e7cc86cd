//! What the layer remembers about file descriptors, and what it decides from that. Safe code,
//! unit-tested without preloading anything.
//!
//! - `bound`: the port each socket asked for in `bind` (to keep port-0 listeners local).
//! - `listeners`: sockets whose traffic comes from the target.
//! - `peers`: accepted sockets and the real remote client each stands for; outgoing sockets and
//!   the remote destination each is connected to through the proxy.
//! - `files`: placeholder fds of files opened in the target.
//! - `relays`: UDP sockets that send to remote destinations through proxy relays:
//!   (relay, destination) pairs, to report the destination as the source of what arrives.
//!
//! Every table follows the fd through `dup`/`dup2`/`dup3`/`F_DUPFD` and forgets it on `close`.
//! Not every close passes through a hook (libuv closes with `syscall(SYS_close)`), so each fd's
//! records also keep the identity of what the fd referred to when they were made: a record is
//! trusted only while the fd still refers to that object ([`Tables::revalidate`]).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use crate::files::RemoteFile;

pub(crate) type SharedFile = Arc<Mutex<RemoteFile>>;

/// What an fd refers to: `(st_dev, st_ino)` from `fstat`. Socket inode numbers come from a
/// counter, so a new socket on a reused fd number has another identity.
pub(crate) type Identity = (u64, u64);

#[derive(Debug, Default)]
pub(crate) struct Tables {
    pub bound: HashMap<i32, u16>,
    pub listeners: HashMap<i32, SocketAddr>,
    pub peers: HashMap<i32, SocketAddr>,
    pub files: HashMap<i32, SharedFile>,
    pub relays: HashMap<i32, Vec<Relay>>,
    /// Outgoing TCP sockets: where they really connected (the proxy), for a repeated `connect`.
    pub vias: HashMap<i32, SocketAddr>,
    /// The identity of what each tracked fd referred to when its records were made.
    pub identities: HashMap<i32, Identity>,
}

/// A UDP destination reached through a relay socket of the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Relay {
    pub via: SocketAddr,
    pub remote: SocketAddr,
    /// The session stream behind the relay (released when the socket closes).
    pub stream: u64,
}

/// What closing an fd ended.
#[derive(Debug, Default)]
pub(crate) struct Forgotten {
    /// A listener whose last fd this was.
    pub listener: Option<SocketAddr>,
    /// A remote file whose last fd this was (to close in the target).
    pub file: Option<SharedFile>,
    /// UDP relay streams no fd uses any more.
    pub released: Vec<u64>,
}

impl Tables {
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.bound.is_empty()
            && self.listeners.is_empty()
            && self.peers.is_empty()
            && self.files.is_empty()
            && self.relays.is_empty()
            && self.vias.is_empty()
            && self.identities.is_empty()
    }

    /// Notes what `fd` refers to, as its records are made. A record made for an fd whose
    /// identity could not be read is trusted as before (no identity, nothing to compare).
    pub(crate) fn identify(&mut self, fd: i32, identity: Option<Identity>) {
        if let Some(identity) = identity {
            self.identities.insert(fd, identity);
        }
    }

    /// `fd` refers to `now` (`None`: it is not open): if its records were made for another
    /// object, the fd was closed behind the hooks' back and reused, so they are forgotten.
    /// Returns what that ended.
    pub(crate) fn revalidate(&mut self, fd: i32, now: Option<Identity>) -> Option<Forgotten> {
        match self.identities.get(&fd) {
            Some(recorded) if Some(*recorded) != now => Some(self.forget(fd)),
            _ => None,
        }
    }

    /// `new` now refers to what `old` refers to (and no longer to what it referred to). Returns
    /// what was implicitly closed, if `new` was the last fd of something.
    pub(crate) fn dup(&mut self, old: i32, new: i32) -> Forgotten {
        let closed = self.forget(new);
        if let Some(port) = self.bound.get(&old).copied() {
            self.bound.insert(new, port);
        }
        if let Some(addr) = self.listeners.get(&old).copied() {
            self.listeners.insert(new, addr);
        }
        if let Some(addr) = self.peers.get(&old).copied() {
            self.peers.insert(new, addr);
        }
        if let Some(file) = self.files.get(&old).cloned() {
            self.files.insert(new, file);
        }
        if let Some(relays) = self.relays.get(&old).cloned() {
            self.relays.insert(new, relays);
        }
        if let Some(via) = self.vias.get(&old).copied() {
            self.vias.insert(new, via);
        }
        if let Some(identity) = self.identities.get(&old).copied() {
            self.identities.insert(new, identity);
        }
        closed
    }

    /// The fd is closed; returns what it was the last fd of.
    pub(crate) fn forget(&mut self, fd: i32) -> Forgotten {
        self.bound.remove(&fd);
        self.peers.remove(&fd);
        self.vias.remove(&fd);
        self.identities.remove(&fd);
        let released = self
            .relays
            .remove(&fd)
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.stream)
            .filter(|stream| !self.relays.values().flatten().any(|r| r.stream == *stream))
            .collect();
        let file = self
            .files
            .remove(&fd)
            .filter(|file| !self.files.values().any(|f| Arc::ptr_eq(f, file)));
        let listener = self
            .listeners
            .remove(&fd)
            .filter(|addr| !self.listeners.values().any(|a| a == addr));
        Forgotten {
            listener,
            file,
            released,
        }
    }
}

/// The process's tables. A plain mutex: hooks that touch it are not on data paths.
pub(crate) static TABLES: Mutex<Option<Tables>> = Mutex::new(None);

/// Runs `f` on the tables.
pub(crate) fn with<T>(f: impl FnOnce(&mut Tables) -> T) -> T {
    let mut guard = TABLES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    f(guard.get_or_insert_with(Tables::default))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn dup_copies_and_close_forgets_the_last_copy_only() {
        let mut t = Tables::default();
        t.listeners.insert(3, addr("0.0.0.0:8080"));
        t.dup(3, 7);
        assert_eq!(t.forget(3).listener, None, "fd 7 still holds the listener");
        assert_eq!(t.forget(7).listener, Some(addr("0.0.0.0:8080")));
        assert!(t.is_empty());
    }

    #[test]
    fn dup2_over_a_tracked_fd_replaces_it() {
        let mut t = Tables::default();
        t.peers.insert(5, addr("10.0.0.1:4000"));
        t.listeners.insert(6, addr("0.0.0.0:80"));
        assert_eq!(
            t.dup(5, 6).listener,
            Some(addr("0.0.0.0:80")),
            "the listener's last fd was replaced"
        );
        assert_eq!(t.peers.get(&6), Some(&addr("10.0.0.1:4000")));
        assert!(t.listeners.is_empty(), "the listener fd 6 was replaced");
    }

    #[test]
    fn records_of_an_fd_reused_behind_the_hooks_back_are_forgotten() {
        let mut t = Tables::default();
        t.peers.insert(9, addr("10.0.0.1:80"));
        t.vias.insert(9, addr("127.0.0.1:41000"));
        t.identify(9, Some((8, 1001)));
        t.dup(9, 10);
        assert!(
            t.revalidate(9, Some((8, 1001))).is_none(),
            "the same socket"
        );
        // fd 9 was closed with a raw syscall and a new socket got its number.
        assert!(t.revalidate(9, Some((8, 1002))).is_some());
        assert!(!t.peers.contains_key(&9) && !t.vias.contains_key(&9));
        assert_eq!(
            t.peers.get(&10),
            Some(&addr("10.0.0.1:80")),
            "its dup still is the old socket"
        );
        // Closed and not reused yet.
        assert!(t.revalidate(10, None).is_some());
        assert!(t.is_empty());
        // Records made without an identity stay trusted.
        t.listeners.insert(3, addr("0.0.0.0:80"));
        t.identify(3, None);
        assert!(t.revalidate(3, Some((8, 5))).is_none());
    }

    #[test]
    fn a_remote_file_closes_with_its_last_fd() {
        let mut t = Tables::default();
        let file: SharedFile = Arc::new(Mutex::new(RemoteFile::new(9, "/f".into(), false, 0)));
        t.files.insert(4, file);
        assert!(t.dup(4, 8).file.is_none());
        assert!(t.forget(4).file.is_none(), "fd 8 still refers to it");
        assert_eq!(t.forget(8).file.map(|f| f.lock().unwrap().handle), Some(9));
        assert!(t.is_empty());
    }
}
