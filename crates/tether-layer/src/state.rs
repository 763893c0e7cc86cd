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

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use crate::files::RemoteFile;

pub type SharedFile = Arc<Mutex<RemoteFile>>;

#[derive(Debug, Default)]
pub struct Tables {
    pub bound: HashMap<i32, u16>,
    pub listeners: HashMap<i32, SocketAddr>,
    pub peers: HashMap<i32, SocketAddr>,
    pub files: HashMap<i32, SharedFile>,
    pub relays: HashMap<i32, Vec<Relay>>,
    /// Outgoing TCP sockets: where they really connected (the proxy), for a repeated `connect`.
    pub vias: HashMap<i32, SocketAddr>,
}

/// A UDP destination reached through a relay socket of the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relay {
    pub via: SocketAddr,
    pub remote: SocketAddr,
    /// The session stream behind the relay (released when the socket closes).
    pub stream: u64,
}

/// What closing an fd ended.
#[derive(Debug, Default)]
pub struct Forgotten {
    /// A listener whose last fd this was.
    pub listener: Option<SocketAddr>,
    /// A remote file whose last fd this was (to close in the target).
    pub file: Option<SharedFile>,
    /// UDP relay streams no fd uses any more.
    pub released: Vec<u64>,
}

impl Tables {
    pub fn is_empty(&self) -> bool {
        self.bound.is_empty()
            && self.listeners.is_empty()
            && self.peers.is_empty()
            && self.files.is_empty()
            && self.relays.is_empty()
            && self.vias.is_empty()
    }

    /// `new` now refers to what `old` refers to (and no longer to what it referred to). Returns
    /// what was implicitly closed, if `new` was the last fd of something.
    pub fn dup(&mut self, old: i32, new: i32) -> Forgotten {
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
        closed
    }

    /// The fd is closed; returns what it was the last fd of.
    pub fn forget(&mut self, fd: i32) -> Forgotten {
        self.bound.remove(&fd);
        self.peers.remove(&fd);
        self.vias.remove(&fd);
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
pub static TABLES: Mutex<Option<Tables>> = Mutex::new(None);

/// Runs `f` on the tables.
pub fn with<T>(f: impl FnOnce(&mut Tables) -> T) -> T {
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
