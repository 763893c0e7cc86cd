//! Finding a container's process from its id, the way a node-level agent sees it.
//!
//! A pod's status names each container as `containerd://<id>`, `cri-o://<id>` or
//! `docker://<id>`. Every process of that container has the id in its `/proc/PID/cgroup`
//! (field-notes.md §6), whatever the cgroup version and driver:
//!
//! ```text
//! v1 cgroupfs:   4:memory:/kubepods/besteffort/pod<uid>/<id>
//! v1 systemd:    4:memory:/kubepods.slice/…/cri-containerd-<id>.scope
//! v2 systemd:    0::/kubepods.slice/…/crio-<id>.scope
//! docker:        0::/system.slice/docker-<id>.scope   or   …:/docker/<id>
//! ```
//!
//! So the agent scans `/proc` (it runs with `hostPID`) and needs no runtime socket, whose path
//! differs between k3s, k0s, microk8s and the rest. cri-o's monitor lives in
//! `crio-conmon-<id>.scope`: a different component, so it never matches.

use std::path::Path;

/// A container id as pod status gives it, with or without its runtime prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerId {
    /// The runtime, when the id had a prefix (`containerd`, `cri-o`, `docker`).
    pub runtime: Option<String>,
    /// The hex id.
    pub id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error(
        "`{0}` is not a container id: expected RUNTIME://HEX as in a pod's \
         status.containerStatuses[].containerID (e.g. containerd://3f4c…), 64 hex digits"
    )]
    Syntax(String),
    #[error(
        "no process of container {0} runs on this host (is the agent on the pod's node, with \
         hostPID? has the container restarted with a new id?)"
    )]
    NotFound(String),
    #[error("cannot read {0}")]
    Proc(String, #[source] std::io::Error),
}

impl std::str::FromStr for ContainerId {
    type Err = ContainerError;

    fn from_str(given: &str) -> Result<ContainerId, ContainerError> {
        let (runtime, id) = match given.split_once("://") {
            Some((runtime, id)) => (Some(runtime), id),
            None => (None, given),
        };
        let known_runtime = runtime.is_none_or(|r| matches!(r, "containerd" | "cri-o" | "docker"));
        // Pod status always gives the full 64-digit id; a short id could never match a cgroup.
        let hex = id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit());
        if !known_runtime || !hex {
            return Err(ContainerError::Syntax(given.to_owned()));
        }
        Ok(ContainerId {
            runtime: runtime.map(str::to_owned),
            id: id.to_ascii_lowercase(),
        })
    }
}

impl std::fmt::Display for ContainerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.runtime {
            Some(runtime) => write!(f, "{runtime}://{}", self.id),
            None => f.write_str(&self.id),
        }
    }
}

impl ContainerId {
    /// True when a `/proc/PID/cgroup` text puts its process in this container.
    pub fn in_cgroup_file(&self, cgroup: &str) -> bool {
        cgroup.lines().any(|line| {
            // `hierarchy-ID:controllers:path`; the path may itself contain ':'.
            let path = line.splitn(3, ':').nth(2).unwrap_or("");
            path.split('/').any(|part| self.names(part))
        })
    }

    /// One path component that names this container: the bare id (containerd and docker with
    /// the cgroupfs driver), `crio-<id>` (cri-o with cgroupfs), or a container runtime's
    /// systemd scope (`cri-containerd-<id>.scope`, `crio-<id>.scope`, …).
    fn names(&self, part: &str) -> bool {
        let unit = part.strip_suffix(".scope").unwrap_or(part);
        unit == self.id
            || ["cri-containerd-", "crio-", "docker-", "libpod-"]
                .iter()
                .any(|prefix| unit.strip_prefix(prefix) == Some(self.id.as_str()))
    }

    /// The container's main process under `proc` (normally `/proc`): of the processes in the
    /// container, the one whose parent is outside it (the runtime's shim); the one that started
    /// first if several are (a `kubectl exec` shell's parent is outside too, but it started
    /// later; pids can wrap, start times cannot).
    pub fn find_pid(&self, proc: &Path) -> Result<u32, ContainerError> {
        let entries = std::fs::read_dir(proc)
            .map_err(|e| ContainerError::Proc(proc.display().to_string(), e))?;
        let mut members: Vec<Member> = entries
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(|pid| {
                // Processes come and go during the scan: unreadable ones are skipped.
                let cgroup = std::fs::read_to_string(proc.join(format!("{pid}/cgroup"))).ok()?;
                self.in_cgroup_file(&cgroup)
                    .then(|| stat_of(&proc.join(format!("{pid}/stat")), pid))
            })
            .collect();
        members.sort_unstable_by_key(|m| (m.started, m.pid));
        let inside = |pid: u32| members.iter().any(|m| m.pid == pid);
        members
            .iter()
            .find(|m| m.parent.is_none_or(|p| !inside(p)))
            .map(|m| m.pid)
            .ok_or_else(|| ContainerError::NotFound(self.to_string()))
    }
}

/// A process of the container.
#[derive(Debug)]
struct Member {
    pid: u32,
    parent: Option<u32>,
    /// Start time in clock ticks since boot (`u64::MAX` when unknown: sorts last).
    started: u64,
}

/// Parent pid (field 4) and start time (field 22) from `/proc/PID/stat`; the command name may
/// hold spaces and parentheses, so fields are counted after its last `)`.
fn stat_of(stat: &Path, pid: u32) -> Member {
    let text = std::fs::read_to_string(stat).unwrap_or_default();
    let fields: Vec<&str> = text
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    Member {
        pid,
        parent: fields.get(1).and_then(|f| f.parse().ok()),
        started: fields
            .get(19)
            .and_then(|f| f.parse().ok())
            .unwrap_or(u64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4c1b8e9a0d2c7f6e5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a3928170615";

    fn id(s: &str) -> ContainerId {
        s.parse().unwrap()
    }

    #[test]
    fn parses_the_forms_pod_status_uses() {
        for runtime in ["containerd", "cri-o", "docker"] {
            let parsed = id(&format!("{runtime}://{ID}"));
            assert_eq!(parsed.runtime.as_deref(), Some(runtime));
            assert_eq!(parsed.id, ID);
            assert_eq!(parsed.to_string(), format!("{runtime}://{ID}"));
        }
        assert_eq!(id(&ID.to_uppercase()).id, ID);
        for bad in [
            "",
            "containerd://",
            "abc",
            "rkt://3f4c1b8e9a0d2c7f",
            "containerd://3f4c1b8e9a0d",
            "containerd://3f4c1b8e9a0d2c7z",
            "containerd://../../etc",
        ] {
            assert!(bad.parse::<ContainerId>().is_err(), "{bad:?} parsed");
        }
    }

    /// Recorded `/proc/PID/cgroup` files of container processes, one per layout.
    #[test]
    fn finds_the_id_in_every_recorded_layout() {
        let recorded = [
            // cgroup v1, cgroupfs driver (k3s, kubeadm with cgroupfs).
            format!(
                "12:pids:/kubepods/besteffort/pod5b6f2f4e-08e9-4a0e-9d4b-3f0c2c1e7a11/{ID}\n\
                 11:memory:/kubepods/besteffort/pod5b6f2f4e-08e9-4a0e-9d4b-3f0c2c1e7a11/{ID}\n\
                 1:name=systemd:/kubepods/besteffort/pod5b6f2f4e-08e9-4a0e-9d4b-3f0c2c1e7a11/{ID}\n"
            ),
            // cgroup v1, systemd driver, containerd.
            format!(
                "4:memory:/kubepods.slice/kubepods-burstable.slice/\
                 kubepods-burstable-pod5b6f2f4e_08e9_4a0e_9d4b_3f0c2c1e7a11.slice/cri-containerd-{ID}.scope\n"
            ),
            // cgroup v2, systemd driver, containerd.
            format!(
                "0::/kubepods.slice/kubepods-besteffort.slice/\
                 kubepods-besteffort-pod5b6f2f4e_08e9_4a0e_9d4b_3f0c2c1e7a11.slice/cri-containerd-{ID}.scope\n"
            ),
            // cgroup v1, cri-o with the cgroupfs driver.
            format!(
                "7:pids:/kubepods/besteffort/pod5b6f2f4e-08e9-4a0e-9d4b-3f0c2c1e7a11/crio-{ID}\n"
            ),
            // cgroup v2, cri-o.
            format!(
                "0::/kubepods.slice/kubepods-pod5b6f2f4e_08e9_4a0e_9d4b_3f0c2c1e7a11.slice/crio-{ID}.scope\n"
            ),
            // cgroup v2, a container that made its own sub-cgroup (systemd inside).
            format!(
                "0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-{ID}.scope/init.scope\n"
            ),
            // docker, both drivers.
            format!("0::/system.slice/docker-{ID}.scope\n"),
            format!("9:cpu,cpuacct:/docker/{ID}\n"),
        ];
        for file in &recorded {
            assert!(
                id(&format!("containerd://{ID}")).in_cgroup_file(file),
                "{file}"
            );
        }
    }

    #[test]
    fn other_containers_and_monitors_do_not_match() {
        let container = id(&format!("cri-o://{ID}"));
        let other = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        for file in [
            // cri-o's conmon watches the container from its own scope.
            format!("0::/kubepods.slice/kubepods-pod1.slice/crio-conmon-{ID}.scope\n"),
            format!("0::/kubepods.slice/kubepods-pod1.slice/crio-{other}.scope\n"),
            // A prefix of the id is not the id.
            format!("0::/kubepods/besteffort/pod1/{}\n", &ID[..40]),
            // The id inside a longer name.
            format!("0::/kubepods/besteffort/pod1/x{ID}\n"),
            "0::/\n".to_owned(),
            String::new(),
        ] {
            assert!(!container.in_cgroup_file(&file), "{file}");
        }
    }

    #[test]
    fn picks_the_process_whose_parent_is_outside_the_container() {
        let proc = tempfile::tempdir().unwrap();
        let write = |pid: u32, ppid: u32, started: u64, cgroup: &str| {
            let dir = proc.path().join(pid.to_string());
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("cgroup"), cgroup).unwrap();
            std::fs::write(
                dir.join("stat"),
                format!(
                    "{pid} (odd) name) S {ppid} 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {started} 0\n"
                ),
            )
            .unwrap();
        };
        let inside = format!("0::/kubepods/besteffort/pod1/{ID}\n");
        write(1, 0, 1, "0::/init.scope\n");
        write(40, 1, 90, "0::/system.slice/containerd.service\n"); // the shim
        write(57, 41, 120, &inside); // a child of the main process (parent listed below)
        write(41, 40, 100, &inside); // the main process
        // A `kubectl exec` shell: its parent is the shim too, and pids wrapped since.
        write(30, 40, 5000, &inside);
        write(60, 1, 100, "0::/kubepods/besteffort/pod2/other\n");
        std::fs::create_dir(proc.path().join("self")).unwrap();
        let container = id(&format!("containerd://{ID}"));
        assert_eq!(container.find_pid(proc.path()).unwrap(), 41);

        let missing = id(&format!("containerd://{}", "0".repeat(64)));
        let error = missing.find_pid(proc.path()).unwrap_err().to_string();
        assert!(
            error.contains("no process of container containerd://0000"),
            "{error}"
        );
    }
}
