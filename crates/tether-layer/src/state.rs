//! What the layer remembers about file descriptors, and what it decides from that. Safe code,
//! unit-tested without preloading anything.
//!
//! - `bound`: the port each socket asked for in `bind` (to keep port-0 listeners local).
//! - `listeners`: sockets whose traffic comes from the target.
//! - `peers`: accepted sockets and the real remote client each stands for.
//!
//! Every table follows the fd through `dup`/`dup2`/`dup3`/`F_DUPFD` and forgets it on `close`.

use std::{collections::HashMap, net::SocketAddr, sync::Mutex};

#[derive(Debug, Default)]
pub struct Tables {
    pub bound: HashMap<i32, u16>,
    pub listeners: HashMap<i32, SocketAddr>,
    pub peers: HashMap<i32, SocketAddr>,
}

impl Tables {
    pub fn is_empty(&self) -> bool {
        self.bound.is_empty() && self.listeners.is_empty() && self.peers.is_empty()
    }

    /// `new` now refers to what `old` refers to (and no longer to what it referred to). Returns
    /// the listener that was implicitly closed, if `new` was its last fd.
    pub fn dup(&mut self, old: i32, new: i32) -> Option<SocketAddr> {
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
        closed.filter(|addr| !self.listeners.values().any(|a| a == addr))
    }

    /// The fd is closed; returns the listener address if it was the last fd of a listener.
    pub fn forget(&mut self, fd: i32) -> Option<SocketAddr> {
        self.bound.remove(&fd);
        self.peers.remove(&fd);
        let addr = self.listeners.remove(&fd)?;
        let still_open = self.listeners.values().any(|a| *a == addr);
        (!still_open).then_some(addr)
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
        assert_eq!(t.forget(3), None, "fd 7 still holds the listener");
        assert_eq!(t.forget(7), Some(addr("0.0.0.0:8080")));
        assert!(t.is_empty());
    }

    #[test]
    fn dup2_over_a_tracked_fd_replaces_it() {
        let mut t = Tables::default();
        t.peers.insert(5, addr("10.0.0.1:4000"));
        t.listeners.insert(6, addr("0.0.0.0:80"));
        assert_eq!(
            t.dup(5, 6),
            Some(addr("0.0.0.0:80")),
            "the listener's last fd was replaced"
        );
        assert_eq!(t.peers.get(&6), Some(&addr("10.0.0.1:4000")));
        assert!(t.listeners.is_empty(), "the listener fd 6 was replaced");
    }
}
