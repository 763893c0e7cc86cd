//! `tether agent-image --output agent.tar`: a tarball that image tools read (its OCI layout and
//! docker-archive manifests, every digest checked; skopeo reads both), and whose programs run:
//! its layer, unpacked as a root filesystem, runs the agent and sets redirect rules with the
//! packed iptables (both backends, extensions loaded with dlopen) and nft, in a test namespace.

use std::{collections::HashMap, io::Read as _, path::Path, process::Command};

use sha2::Digest as _;
use tether_testkit::{Network, require_root};

const NAME: &str = "registry.example.invalid/tether-agent:test";

fn sha256(data: &[u8]) -> String {
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Every file of a tar, by path.
fn entries(data: &[u8]) -> HashMap<String, Vec<u8>> {
    let mut archive = tar::Archive::new(data);
    let mut out = HashMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        out.insert(path, bytes);
    }
    out
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap()
}

/// The blob a descriptor names, its digest and size checked.
fn blob<'a>(files: &'a HashMap<String, Vec<u8>>, descriptor: &serde_json::Value) -> &'a [u8] {
    let digest = descriptor["digest"].as_str().unwrap();
    let hex = digest.strip_prefix("sha256:").unwrap();
    let data = files
        .get(&format!("blobs/sha256/{hex}"))
        .unwrap_or_else(|| panic!("no blob {digest}"));
    assert_eq!(sha256(data), hex, "blob {digest} does not match its digest");
    assert_eq!(descriptor["size"], data.len(), "size of {digest}");
    data
}

/// The static agent `tether agent-image` packs by default (`scripts/test` builds it).
fn require_static_agent() {
    let agent = Path::new(env!("CARGO_BIN_EXE_tether"))
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("x86_64-unknown-linux-gnu/release/tether-agent");
    assert!(
        agent.is_file(),
        "build the static agent first (scripts/test does): RUSTFLAGS='-C target-feature=+crt-static' \
         cargo build --release --target x86_64-unknown-linux-gnu -p tether-agent"
    );
}

#[test]
fn the_agent_image_is_a_valid_oci_and_docker_archive_whose_tools_run() {
    if !require_root("the_agent_image_is_a_valid_oci_and_docker_archive_whose_tools_run") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tarball = dir.path().join("agent.tar");
    require_static_agent();
    let output = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["agent-image", "--name", NAME, "--output"])
        .arg(&tarball)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(said.contains("ctr -n k8s.io images import"), "{said}");

    let files = entries(&std::fs::read(&tarball).unwrap());
    assert_eq!(json(&files["oci-layout"])["imageLayoutVersion"], "1.0.0");
    let index = json(&files["index.json"]);
    let descriptor = &index["manifests"][0];
    assert_eq!(descriptor["annotations"]["io.containerd.image.name"], NAME);
    assert_eq!(
        descriptor["annotations"]["org.opencontainers.image.ref.name"],
        "test"
    );
    let manifest = json(blob(&files, descriptor));
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let config = json(blob(&files, &manifest["config"]));
    let layer = blob(&files, &manifest["layers"][0]);
    assert_eq!(
        config["rootfs"]["diff_ids"][0],
        format!("sha256:{}", sha256(layer)),
        "an uncompressed layer's diff id is its digest"
    );
    assert_eq!(config["config"]["Entrypoint"][0], "/tether-agent");
    assert_eq!(
        (config["os"].as_str(), config["architecture"].as_str()),
        (Some("linux"), Some("amd64"))
    );
    // docker load's view: the same blobs.
    let docker = json(&files["manifest.json"]);
    assert_eq!(docker[0]["RepoTags"][0], NAME);
    for path in [&docker[0]["Config"], &docker[0]["Layers"][0]] {
        assert!(files.contains_key(path.as_str().unwrap()), "{path}");
    }

    // Tools that read images: skopeo, as docker-archive and as OCI archive.
    for transport in ["docker-archive", "oci-archive"] {
        let inspect = Command::new("skopeo")
            .args(["inspect", &format!("{transport}:{}", tarball.display())])
            .output()
            .expect("skopeo (scripts/install-deps installs it)");
        assert!(
            inspect.status.success(),
            "skopeo cannot read it as {transport}: {}",
            String::from_utf8_lossy(&inspect.stderr)
        );
        let seen = json(&inspect.stdout);
        assert_eq!(
            seen["Layers"][0], manifest["layers"][0]["digest"],
            "{transport}"
        );
    }

    // Its programs run from the image's own files, in a test namespace.
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    tar::Archive::new(layer).unpack(&root).unwrap();
    let net = Network::new(1);
    let pod = net.pod(0).netns.clone();
    let run = |args: &[&str]| -> String {
        let output = Command::new("ip")
            .args(["netns", "exec", &pod, "chroot"])
            .arg(&root)
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{args:?} in the image failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    assert!(run(&["/tether-agent", "--version"]).starts_with("tether-agent "));
    assert!(
        tether_kube::image::is_static(&root.join("tether-agent")).unwrap(),
        "the image's agent depends on no library of the building machine"
    );
    run(&[
        "/usr/sbin/iptables-legacy",
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-p",
        "tcp",
        "--dport",
        "80",
        "-j",
        "REDIRECT",
        "--to-ports",
        "81",
    ]);
    let legacy = run(&["/usr/sbin/iptables-legacy-save", "-t", "nat"]);
    assert!(
        legacy.contains("--dport 80 -j REDIRECT --to-ports 81"),
        "{legacy}"
    );
    run(&[
        "/usr/sbin/iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "--dport",
        "80",
        "-m",
        "owner",
        "--uid-owner",
        "1337",
        "-j",
        "REDIRECT",
        "--to-ports",
        "81",
    ]);
    let nft = run(&["/usr/sbin/nft", "list", "ruleset"]);
    assert!(
        nft.contains("skuid 1337") && nft.contains("redirect to :81"),
        "{nft}"
    );
}

/// `tether agent-image --push` to a registry the test runs (Debian's docker-registry on
/// loopback): another client (skopeo) sees the image under the digest tether printed, and the
/// cluster simulator pulls that reference, runs the agent out of the pulled layer, and the
/// session works through it.
#[test]
fn a_pushed_agent_image_is_pulled_and_run_by_the_cluster() {
    if !require_root("a_pushed_agent_image_is_pulled_and_run_by_the_cluster") {
        return;
    }
    let registry = tether_testkit::registry::Registry::start();
    let name = format!("{}/team/tether-agent:test", registry.host);
    require_static_agent();
    // No credentials: the test never reads the developer's own.
    let docker_config = tempfile::tempdir().unwrap();
    std::fs::write(docker_config.path().join("config.json"), "{}").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["agent-image", "--push", &name])
        .env("DOCKER_CONFIG", docker_config.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let pinned = stdout.trim();
    let digest = pinned
        .strip_prefix(&format!("{name}@"))
        .unwrap_or_else(|| panic!("prints NAME@DIGEST, not {pinned}"));
    assert!(
        stderr.contains("agent.image"),
        "says where to put it: {stderr}"
    );
    assert!(
        !stderr.contains("dynamically linked"),
        "the static agent was packed: {stderr}"
    );

    let inspect = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", &format!("docker://{name}")])
        .output()
        .expect("skopeo (scripts/install-deps installs it)");
    assert!(
        inspect.status.success(),
        "skopeo cannot read the pushed image: {}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    let seen = json(&inspect.stdout);
    assert_eq!(
        seen["Digest"], digest,
        "the registry serves what was pushed"
    );
    assert_eq!(seen["Layers"].as_array().map(Vec::len), Some(1), "{seen}");

    let ctx = crate::context::PodContext::in_cluster();
    let (code, said) = crate::kube::doctor(&ctx, &[("TETHER_AGENT__IMAGE", pinned)]);
    assert!(
        said.contains(&format!("✓ agent image {pinned} in its registry: {digest}")),
        "doctor finds the image: {said}"
    );
    assert_eq!(code, Some(0), "{said}");
    let out = ctx.exec_ok(
        &[("TETHER_AGENT__IMAGE", pinned)],
        &["sh", "-c", "cat \"$POD_DIR/secret.txt\""],
    );
    assert_eq!(out.trim(), "secret-from-pod");
    assert_eq!(
        ctx.cluster.as_ref().unwrap().pulled_images(),
        [pinned],
        "the agent ran from the pulled image"
    );
}

/// An agent image nobody pushed: `tether exec` stops with one line that says so and names both
/// ways out.
#[test]
fn an_agent_image_missing_from_its_registry_is_named_with_both_ways_out() {
    if !require_root("an_agent_image_missing_from_its_registry_is_named_with_both_ways_out") {
        return;
    }
    let registry = tether_testkit::registry::Registry::start();
    let missing = format!("{}/team/tether-agent:never-pushed", registry.host);
    let ctx = crate::context::PodContext::in_cluster();
    let output = ctx.exec(&[("TETHER_AGENT__IMAGE", &missing)], &["true"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(125), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("cannot be pulled"))
        .unwrap_or_else(|| panic!("no line says the image cannot be pulled:\n{stderr}"));
    for needed in [
        missing.as_str(),
        "ErrImagePull",
        "tether agent-image --push",
        "tether agent-image --output agent.tar",
    ] {
        assert!(line.contains(needed), "{needed:?} missing from: {line}");
    }
    assert!(ctx.cluster.as_ref().unwrap().pulled_images().is_empty());
    // tether doctor says it before anyone trips on it.
    let (code, said) = crate::kube::doctor(&ctx, &[("TETHER_AGENT__IMAGE", &missing)]);
    assert_eq!(code, Some(1), "{said}");
    let line = said
        .lines()
        .find(|l| l.contains(&format!("✗ agent image {missing} in its registry")))
        .unwrap_or_else(|| panic!("doctor does not report the image: {said}"));
    assert!(line.contains("tether agent-image --push"), "{line}");
}
