//! Files the program writes in the target: the write end of a pipe in the program, a thread
//! here copying what arrives to the target's file (see `files.rs`). This module counts them, so
//! that
//! - the run waits until what was written has reached the target before it ends, and
//! - an open or stat of a path waits until what the program wrote to it so far has reached the
//!   target (a program that writes a file and then reads it back sees what it wrote), without
//!   waiting for a writer that is merely idle (a log file held open).

use std::{
    collections::HashMap,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

#[derive(Debug, Default)]
pub(crate) struct Writers {
    paths: Mutex<HashMap<PathBuf, Vec<Arc<Pipe>>>>,
    changed: Condvar,
}

/// One written file's pipe, as its copying thread reads it.
#[derive(Debug)]
pub(crate) struct Pipe {
    /// The read end.
    pub(crate) end: OwnedFd,
    /// Set from the moment data (or the end) is seen until it has been written to the target.
    busy: AtomicBool,
}

impl Pipe {
    /// Waits for data or the end, then marks the pipe busy: from then until [`Pipe::idle`], a
    /// waiter knows bytes are in flight even once they have left the pipe.
    pub(crate) fn wait_for_data(&self) {
        let mut fds = [PollFd::new(self.end.as_fd(), PollFlags::POLLIN)];
        while let Err(nix::errno::Errno::EINTR) = poll(&mut fds, PollTimeout::NONE) {}
        self.busy.store(true, Ordering::SeqCst);
    }

    pub(crate) fn idle(&self, writers: &Writers) {
        self.busy.store(false, Ordering::SeqCst);
        writers.changed.notify_all();
    }

    /// Nothing of what was written so far is still on its way: the pipe is empty (checked
    /// first) and no copy is in flight.
    fn settled(&self) -> bool {
        let mut fds = [PollFd::new(self.end.as_fd(), PollFlags::POLLIN)];
        let empty = matches!(poll(&mut fds, PollTimeout::ZERO), Ok(0));
        empty && !self.busy.load(Ordering::SeqCst)
    }
}

/// A registered pipe; unregistered when dropped (after the target's file was closed).
#[derive(Debug)]
pub(crate) struct Registration {
    writers: Arc<Writers>,
    path: PathBuf,
    pub(crate) pipe: Arc<Pipe>,
}

impl Writers {
    pub(crate) fn register(self: &Arc<Self>, path: &Path, end: OwnedFd) -> Registration {
        let pipe = Arc::new(Pipe {
            end,
            busy: AtomicBool::new(false),
        });
        let path = tether_intercept::policy::normalize(path);
        self.paths
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(path.clone())
            .or_default()
            .push(pipe.clone());
        Registration {
            writers: self.clone(),
            path,
            pipe,
        }
    }

    /// Waits, at most `limit`, until what was written to `path` has reached the target (or,
    /// with `None`, until no file is being written any more); false if that did not happen.
    pub(crate) fn wait(&self, path: Option<&Path>, limit: Duration) -> bool {
        let path = path.map(tether_intercept::policy::normalize);
        let deadline = Instant::now() + limit;
        let mut paths = self.paths.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let done = match &path {
                Some(path) => paths
                    .get(path)
                    .is_none_or(|pipes| pipes.iter().all(|pipe| pipe.settled())),
                None => paths.is_empty(),
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if done || left.is_zero() {
                return done;
            }
            // A pipe filling up does not notify: look again soon.
            paths = self
                .changed
                .wait_timeout(paths, left.min(Duration::from_millis(5)))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut paths = self
            .writers
            .paths
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(pipes) = paths.get_mut(&self.path) {
            pipes.retain(|pipe| !Arc::ptr_eq(pipe, &self.pipe));
            if pipes.is_empty() {
                paths.remove(&self.path);
            }
        }
        self.writers.changed.notify_all();
    }
}
