//! Test "containers": real cgroup directories named as a kubelet names them, holding a process.
//!
//! This machine has a cgroup v1 `pids` hierarchy at `/sys/fs/cgroup/pids`; a container's
//! directory there is `kubepods/besteffort/pod<uid>/<64-hex id>` as with the cgroupfs driver, so
//! the process's `/proc/PID/cgroup` reads `N:pids:/kubepods/besteffort/pod<uid>/<id>` — what
//! the agent's PID lookup searches for. Directories carry the test process's pid in the pod uid
//! (`tt<pid>…`), are removed on drop, and leftovers of dead test processes are swept.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

const HIERARCHY: &str = "/sys/fs/cgroup/pids";
const PARENT: &str = "kubepods/besteffort";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A container id and its cgroup directory.
#[derive(Debug)]
pub struct Container {
    /// `containerd://<64 hex>`, as pod status gives it.
    pub id: String,
    dir: PathBuf,
}

impl Container {
    /// Creates the cgroup directory of a new container and moves `pid` into it.
    pub fn adopt(pid: u32) -> Container {
        sweep_leftovers();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let me = std::process::id();
        // 64 hex digits, unique per test process and container.
        let hex = format!("{me:08x}{n:08x}{:016x}{:032x}", rand_u64(), 0x7e7e_u128);
        let pod = Path::new(HIERARCHY)
            .join(PARENT)
            .join(format!("podtt{me}-{n}"));
        let dir = pod.join(&hex);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create the cgroup {}: {e}", dir.display()));
        let container = Container {
            id: format!("containerd://{hex}"),
            dir,
        };
        std::fs::write(container.dir.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("cannot move {pid} into {}: {e}", container.dir.display()));
        container
    }

    /// The bare hex id.
    pub fn hex(&self) -> &str {
        self.id.trim_start_matches("containerd://")
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        remove(&self.dir);
    }
}

/// Moves whatever still runs in `dir` to the root cgroup, then removes `dir` and its pod
/// directory.
fn remove(dir: &Path) {
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.split_whitespace() {
            let _ = std::fs::write(Path::new(HIERARCHY).join("cgroup.procs"), pid);
        }
    }
    let _ = std::fs::remove_dir(dir);
    if let Some(pod) = dir.parent() {
        let _ = std::fs::remove_dir(pod);
    }
}

/// Removes container directories of test processes that no longer run.
fn sweep_leftovers() {
    let parent = Path::new(HIERARCHY).join(PARENT);
    let Ok(pods) = std::fs::read_dir(&parent) else {
        return;
    };
    for pod in pods.flatten() {
        let name = pod.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("podtt")
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if pid.parse().is_ok_and(tether_sys::process::alive) {
            continue;
        }
        if let Ok(containers) = std::fs::read_dir(pod.path()) {
            for container in containers.flatten().filter(|c| c.path().is_dir()) {
                remove(&container.path());
            }
        }
        let _ = std::fs::remove_dir(pod.path());
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher as _, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}
