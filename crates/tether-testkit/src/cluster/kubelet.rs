//! The simulated kubelet and Job controller: a Job's pod, its container really running, its
//! status and events as a real cluster reports them.

use std::{process::Stdio, sync::Arc, time::Duration};

use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt as _;

use super::{
    NODE, State, checked,
    store::{EVENTS, JOBS, Key, PODS, now},
};

/// An agent pod's process: the leader of its own process group (the `ip netns exec` chain, and
/// `unshare` with the PID namespace's init for pods without `hostPID`).
#[derive(Debug)]
pub(crate) struct Running {
    group: i32,
    grace: Duration,
}

impl Running {
    /// As the kubelet stops a container: SIGTERM to all of it, SIGKILL after the grace period
    /// (`terminationGracePeriodSeconds`, 30 s by default) if it still runs.
    pub(crate) fn kill(&self) {
        let group = nix::unistd::Pid::from_raw(self.group);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGTERM);
        let grace = self.grace;
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + grace;
            while std::time::Instant::now() < deadline {
                if nix::sys::signal::killpg(group, None).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        });
    }
}

/// Five lowercase letters and digits, as the API server's `generateName` and the ReplicaSet
/// controller use.
pub(crate) fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// The Job controller: creates the Job's pod, then runs it.
pub(crate) fn start_job(state: &Arc<State>, job: &Value) {
    let namespace = job["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_owned();
    let job_name = job["metadata"]["name"].as_str().unwrap_or("").to_owned();
    let template = &job["spec"]["template"];
    let mut labels = template["metadata"]["labels"].clone();
    if !labels.is_object() {
        labels = json!({});
    }
    labels["job-name"] = json!(job_name);
    labels["batch.kubernetes.io/job-name"] = json!(job_name);
    labels["controller-uid"] = job["metadata"]["uid"].clone();
    labels["batch.kubernetes.io/controller-uid"] = job["metadata"]["uid"].clone();
    let pod_name = format!("{job_name}-{}", random_suffix());
    let pod = json!({
        "metadata": {
            "name": pod_name, "namespace": namespace, "labels": labels,
            "annotations": template["metadata"]["annotations"],
            "ownerReferences": [{
                "apiVersion": "batch/v1", "kind": "Job", "name": job_name,
                "uid": job["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true
            }]
        },
        "spec": template["spec"],
        "status": {
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "True"}],
        }
    });
    let pod = state
        .store
        .lock()
        .unwrap()
        .put(PODS, checked::<k8s_openapi::api::core::v1::Pod>(pod));
    event(
        state,
        &pod,
        "Normal",
        "Scheduled",
        &format!("Successfully assigned {namespace}/{pod_name} to {NODE}"),
    );
    let deadline = job["spec"]["activeDeadlineSeconds"].as_u64();
    let ttl = job["spec"]["ttlSecondsAfterFinished"].as_u64();
    let state = Arc::clone(state);
    let job_key = Key {
        resource: JOBS,
        namespace: namespace.clone(),
        name: job_name,
    };
    tokio::spawn(async move {
        let code = run_pod(&state, &pod, deadline).await;
        let Some(code) = code else { return };
        finish_job(&state, &job_key, code);
        if let Some(ttl) = ttl {
            tokio::time::sleep(Duration::from_secs(ttl)).await;
            // The TTL controller deletes the Job with its pods.
            let removed = state.store.lock().unwrap().delete(&job_key).is_some();
            if removed {
                let pod_key = Key {
                    resource: PODS,
                    namespace: namespace.clone(),
                    name: pod["metadata"]["name"].as_str().unwrap_or("").to_owned(),
                };
                state.store.lock().unwrap().delete(&pod_key);
                state.changed.send_modify(|v| *v += 1);
            }
        }
    });
}

/// Runs the pod's first container to its end; its exit code (`None` if it never started).
async fn run_pod(state: &Arc<State>, pod: &Value, deadline: Option<u64>) -> Option<i32> {
    let namespace = pod["metadata"]["namespace"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let name = pod["metadata"]["name"].as_str().unwrap_or("").to_owned();
    let container = &pod["spec"]["containers"][0];
    let container_name = container["name"].as_str().unwrap_or("agent").to_owned();
    let image = container["image"].as_str().unwrap_or("").to_owned();

    let pull_error = state.faults.lock().unwrap().image_pull_error.clone();
    let pulled = match pull_error {
        Some(message) => Err(format!(
            "failed to pull and unpack image \"{image}\": {message}"
        )),
        None => super::images::pull_entrypoint(&image, state.image_dir.path()).await,
    };
    let entrypoint = match pulled {
        Ok(entrypoint) => entrypoint,
        Err(message) => {
            update_pod(state, &namespace, &name, |pod| {
                pod["status"]["containerStatuses"] = json!([{
                    "name": container_name, "image": image, "imageID": "", "ready": false,
                    "restartCount": 0, "started": false,
                    "state": {"waiting": {"reason": "ErrImagePull", "message": message}}
                }]);
            });
            let pod = current(state, &namespace, &name)?;
            event(
                state,
                &pod,
                "Normal",
                "Pulling",
                &format!("Pulling image \"{image}\""),
            );
            event(
                state,
                &pod,
                "Warning",
                "Failed",
                &format!("Failed to pull image \"{image}\": {message}"),
            );
            return None;
        }
    };

    let n = state
        .next_netns
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // A pod of its own on the test network, as an agent pod gets a pod IP.
    let prefix = state.network_prefix.clone();
    let agent_pod = tokio::task::spawn_blocking(move || {
        crate::netns::add_pod(&prefix, &format!("ag{n}"), n as u8)
    })
    .await
    .expect("create the agent pod's namespace");
    let netns = agent_pod.netns.clone();
    // Its resolv.conf and hosts (`ip netns exec` bind-mounts /etc/netns/NAME/*): the cluster's.
    let etc = std::path::Path::new("/etc/netns").join(&netns);
    std::fs::create_dir_all(&etc).expect("create /etc/netns/NAME");
    std::fs::write(etc.join("hosts"), &state.hosts).expect("write the agent pod's hosts");
    std::fs::write(etc.join("resolv.conf"), &state.resolv_conf).expect("write resolv.conf");
    state.etc_dirs.lock().unwrap().push(etc);

    let host_pid = pod["spec"]["hostPID"].as_bool() == Some(true);
    let mut wrapper = vec!["netns", "exec", netns.as_str()];
    if !host_pid {
        // A pod without hostPID has a PID namespace (and /proc) of its own.
        wrapper.extend([
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child=SIGTERM",
        ]);
    }
    let mut command = container_command(state, &wrapper, container, entrypoint.as_deref());
    if let Some(pod) = current(state, &namespace, &name) {
        let pulled = match &entrypoint {
            Some(_) => {
                state.pulled.lock().unwrap().push(image.clone());
                format!("Successfully pulled image \"{image}\"")
            }
            None => format!("Container image \"{image}\" already present on machine"),
        };
        event(state, &pod, "Normal", "Pulled", &pulled);
        event(
            state,
            &pod,
            "Normal",
            "Created",
            &format!("Created container {container_name}"),
        );
    }
    let mut child = command.spawn().expect("start the agent pod's command");
    let pid = child.id().expect("a child that just started has a pid") as i32;
    let grace = Duration::from_secs(
        pod["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(30),
    );
    let key = format!("{namespace}/{name}");
    state.pod_netns.lock().unwrap().insert(key.clone(), netns);
    state
        .running
        .lock()
        .unwrap()
        .insert(key.clone(), Running { group: pid, grace });
    let id = format!("containerd://{:064x}", rand::random::<u128>());
    update_pod(state, &namespace, &name, |pod| {
        pod["status"]["phase"] = json!("Running");
        pod["status"]["podIP"] = json!(agent_pod.ip.to_string());
        pod["status"]["hostIP"] = json!("10.213.255.1");
        pod["status"]["startTime"] = json!(now());
        pod["status"]["containerStatuses"] = json!([{
            "name": container_name, "image": image, "imageID": format!("{image}@sha256:{:064x}", 2),
            "containerID": id, "ready": true, "started": true, "restartCount": 0,
            "state": {"running": {"startedAt": now()}}
        }]);
        pod["status"]["conditions"] = json!([
            {"type": "PodScheduled", "status": "True"},
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": "True"},
            {"type": "Ready", "status": "True"}
        ]);
    });
    if let Some(pod) = current(state, &namespace, &name) {
        event(
            state,
            &pod,
            "Normal",
            "Started",
            &format!("Started container {container_name}"),
        );
    }
    keep_logs(state, &key, &mut child);
    let mut deadline_exceeded = false;
    let status = match deadline {
        Some(secs) => {
            tokio::select! {
                status = child.wait() => status,
                () = tokio::time::sleep(Duration::from_secs(secs)) => {
                    deadline_exceeded = true;
                    if let Some(running) = state.running.lock().unwrap().get(&key) {
                        running.kill();
                    }
                    child.wait().await
                }
            }
        }
        None => child.wait().await,
    };
    state.running.lock().unwrap().remove(&key);
    // Killed by a signal: 128 + its number, as the runtime reports it.
    let code = status.ok().map_or(137, |s| {
        use std::os::unix::process::ExitStatusExt as _;
        s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(9))
    });
    // terminationMessagePolicy: FallbackToLogsOnError puts the log's end in the status.
    let message = (code != 0
        && container["terminationMessagePolicy"].as_str() == Some("FallbackToLogsOnError"))
    .then(|| {
        let logs = state.logs.lock().unwrap();
        let lines = logs.get(&key).map(Vec::as_slice).unwrap_or_default();
        lines[lines.len().saturating_sub(80)..].join("\n")
    });
    update_pod(state, &namespace, &name, |pod| {
        pod["status"]["phase"] = json!(if code == 0 { "Succeeded" } else { "Failed" });
        pod["status"]["containerStatuses"][0]["ready"] = json!(false);
        pod["status"]["containerStatuses"][0]["state"] = json!({"terminated": {
            "exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" },
            "finishedAt": now(), "message": message,
        }});
        pod["status"]["conditions"][3]["status"] = json!("False");
    });
    Some(if deadline_exceeded {
        DEADLINE_EXCEEDED
    } else {
        code
    })
}

/// What [`run_pod`] returns when the Job's `activeDeadlineSeconds` ended the pod.
const DEADLINE_EXCEEDED: i32 = -1;

/// `ip WRAPPER… AGENT_COMMAND… ARGS…` with the container's environment, in a process group of
/// its own (so the whole container can be signalled), output piped for [`keep_logs`].
/// The container's process under `wrapper`: the image's `entrypoint` when it was pulled, else
/// the simulator's agent command; then the container's `args`.
fn container_command(
    state: &State,
    wrapper: &[&str],
    container: &Value,
    entrypoint: Option<&std::path::Path>,
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new("ip");
    command.args(wrapper);
    match entrypoint {
        Some(entrypoint) => command.arg(entrypoint),
        None => command.args(&state.agent_command),
    };
    if let Some(args) = container["args"].as_array() {
        command.args(args.iter().filter_map(Value::as_str));
    }
    if let Some(env) = container["env"].as_array() {
        for var in env {
            if let (Some(k), Some(v)) = (var["name"].as_str(), var["value"].as_str()) {
                command.env(k, v);
            }
        }
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    command
}

/// The container's output is its log: kept by `key` ([`super::Cluster::logs`]), and shown live
/// with TETHER_SIM_LOGS=1.
fn keep_logs(state: &Arc<State>, key: &str, child: &mut tokio::process::Child) {
    let show = std::env::var_os("TETHER_SIM_LOGS").is_some();
    let stdout = child
        .stdout
        .take()
        .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>);
    let stderr = child
        .stderr
        .take()
        .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>);
    for output in [stdout, stderr].into_iter().flatten() {
        let state = Arc::clone(state);
        let key = key.to_owned();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(output).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if show {
                    eprintln!("[{key}] {line}");
                }
                state
                    .logs
                    .lock()
                    .unwrap()
                    .entry(key.clone())
                    .or_default()
                    .push(line);
            }
        });
    }
}

/// The kubelet starting an ephemeral container added to `pod`: it joins the pod's network and,
/// with `targetContainerName`, the PID namespace of that container (entered with nsenter, with
/// a `/proc` of that namespace mounted for it).
pub(crate) fn start_ephemeral(state: &Arc<State>, namespace: &str, pod: &str, container: Value) {
    let name = container["name"].as_str().unwrap_or("").to_owned();
    let image = container["image"].as_str().unwrap_or("").to_owned();
    let waiting = |reason: &str, message: &str| {
        json!({"name": name, "image": image, "imageID": "", "ready": false, "restartCount": 0,
               "state": {"waiting": {"reason": reason, "message": message}}})
    };
    let pull_error = state.faults.lock().unwrap().image_pull_error.clone();
    if let Some(message) = pull_error {
        let status = waiting(
            "ErrImagePull",
            &format!("failed to pull and unpack image \"{image}\": {message}"),
        );
        set_ephemeral_status(state, namespace, pod, status);
        return;
    }
    let key = format!("{namespace}/{pod}");
    let netns = super::netns_of(state, namespace, pod);
    let main = state.pod_pids.lock().unwrap().get(&key).copied();
    let (Some(netns), Some(main)) = (netns, main) else {
        set_ephemeral_status(
            state,
            namespace,
            pod,
            waiting("CreateContainerError", "no such container"),
        );
        return;
    };
    let main = main.to_string();
    // Its own filesystem stays the node's (the simulator has no images), but its /proc is the
    // target's PID namespace's, so `/proc/1/root` is the target container's root, not its own.
    let wrapper = [
        "netns",
        "exec",
        &netns,
        "nsenter",
        "--target",
        &main,
        "--pid",
        "--",
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--mount-proc",
        "--",
    ];
    let mut command = container_command(state, &wrapper, &container, None);
    let mut child = command
        .spawn()
        .expect("start the ephemeral container's command");
    let group = child.id().expect("a child that just started has a pid") as i32;
    let process_key = format!("{key}/{name}");
    state.running.lock().unwrap().insert(
        process_key.clone(),
        Running {
            group,
            grace: Duration::from_secs(30),
        },
    );
    keep_logs(state, &process_key, &mut child);
    let id = format!("containerd://{:064x}", rand::random::<u128>());
    set_ephemeral_status(
        state,
        namespace,
        pod,
        json!({"name": name, "image": image, "imageID": format!("{image}@sha256:{:064x}", 3),
               "containerID": id, "ready": false, "restartCount": 0,
               "state": {"running": {"startedAt": now()}}}),
    );
    let state = Arc::clone(state);
    let (namespace, pod) = (namespace.to_owned(), pod.to_owned());
    tokio::spawn(async move {
        let status = child.wait().await;
        state.running.lock().unwrap().remove(&process_key);
        let code = status.ok().and_then(|s| s.code()).unwrap_or(137);
        set_ephemeral_status(
            &state,
            &namespace,
            &pod,
            json!({"name": name, "image": image, "imageID": "", "containerID": id, "ready": false,
                   "restartCount": 0,
                   "state": {"terminated": {"exitCode": code, "finishedAt": now(),
                                            "reason": if code == 0 { "Completed" } else { "Error" }}}}),
        );
    });
}

/// Replaces (or adds) one entry of the pod's `ephemeralContainerStatuses`.
fn set_ephemeral_status(state: &State, namespace: &str, pod: &str, status: Value) {
    update_pod(state, namespace, pod, |pod| {
        let statuses = &mut pod["status"]["ephemeralContainerStatuses"];
        if !statuses.is_array() {
            *statuses = json!([]);
        }
        let list = statuses.as_array_mut().expect("an array");
        list.retain(|s| s["name"] != status["name"]);
        list.push(status);
    });
}

fn finish_job(state: &State, key: &Key, code: i32) {
    let mut store = state.store.lock().unwrap();
    let Some(mut job) = store.get(key).cloned() else {
        return;
    };
    let succeeded = code == 0;
    let (condition, reason, message) = match code {
        0 => ("Complete", "Completed", "Job completed"),
        DEADLINE_EXCEEDED => (
            "Failed",
            "DeadlineExceeded",
            "Job was active longer than specified deadline",
        ),
        _ => (
            "Failed",
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit",
        ),
    };
    job["status"] = json!({
        "active": 0,
        "succeeded": i32::from(succeeded),
        "failed": i32::from(!succeeded),
        "completionTime": if succeeded { json!(now()) } else { json!(null) },
        "conditions": [{"type": condition, "status": "True", "reason": reason, "message": message,
                        "lastTransitionTime": now()}],
    });
    store.put(JOBS, job);
    drop(store);
    state.changed.send_modify(|v| *v += 1);
}

/// The kubelet stopping a deleted pod's containers (its ephemeral ones too).
pub(crate) fn stop_pod(state: &State, namespace: &str, name: &str) {
    let key = format!("{namespace}/{name}");
    for (process, running) in state.running.lock().unwrap().iter() {
        if *process == key || process.starts_with(&format!("{key}/")) {
            running.kill();
        }
    }
}

fn current(state: &State, namespace: &str, name: &str) -> Option<Value> {
    state.pod(namespace, name)
}

fn update_pod(state: &State, namespace: &str, name: &str, change: impl FnOnce(&mut Value)) {
    let mut store = state.store.lock().unwrap();
    let key = Key {
        resource: PODS,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    };
    // A pod deleted meanwhile stays deleted.
    let Some(mut pod) = store.get(&key).cloned() else {
        return;
    };
    change(&mut pod);
    store.put(PODS, checked::<k8s_openapi::api::core::v1::Pod>(pod));
    drop(store);
    state.changed.send_modify(|v| *v += 1);
}

/// A core/v1 Event about `pod`, as the scheduler and kubelet record them.
fn event(state: &State, pod: &Value, kind: &str, reason: &str, message: &str) {
    let name = pod["metadata"]["name"].as_str().unwrap_or("");
    let event = json!({
        "metadata": {
            "name": format!("{name}.{:016x}", rand::random::<u64>()),
            "namespace": pod["metadata"]["namespace"],
        },
        "involvedObject": {
            "kind": "Pod", "apiVersion": "v1", "name": name,
            "namespace": pod["metadata"]["namespace"], "uid": pod["metadata"]["uid"],
        },
        "reason": reason,
        "message": message,
        "type": kind,
        "source": {"component": if reason == "Scheduled" { "default-scheduler" } else { "kubelet" }, "host": NODE},
        "firstTimestamp": now(),
        "lastTimestamp": now(),
        "count": 1,
    });
    state
        .store
        .lock()
        .unwrap()
        .put(EVENTS, checked::<k8s_openapi::api::core::v1::Event>(event));
    state.changed.send_modify(|v| *v += 1);
}
