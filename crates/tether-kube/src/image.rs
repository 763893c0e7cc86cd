//! The agent image as a tarball, written without a container engine: for clusters that cannot
//! pull from a registry (`ctr -n k8s.io images import agent.tar`, `docker load -i agent.tar`,
//! `kind load image-archive agent.tar`).
//!
//! One uncompressed layer holds the agent (`/tether-agent`), the programs it runs (iptables in
//! both backends, nft, nsenter, ss, conntrack) and every shared library they load: what `ldd`
//! lists, plus iptables' extensions, which it loads with `dlopen` from the xtables directory
//! (field-notes.md §9). The archive is both an OCI image layout (`oci-layout`, `index.json`,
//! `blobs/sha256/…`) and a docker-archive (`manifest.json` naming the same blobs), as
//! `docker save` writes since Docker 25, so either kind of tool reads it.

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use serde_json::json;
use sha2::{Digest as _, Sha256};

/// Programs the agent runs, by the name it runs them with, and where they live on Debian.
const TOOLS: [&str; 4] = [
    "/usr/sbin/nft",
    "/usr/bin/nsenter",
    "/usr/bin/ss",
    "/usr/sbin/conntrack",
];
/// iptables front-ends: all links to the two multi-call binaries.
const IPTABLES: [(&str, &str); 9] = [
    ("iptables", "xtables-nft-multi"),
    ("iptables-save", "xtables-nft-multi"),
    ("iptables-restore", "xtables-nft-multi"),
    ("iptables-nft", "xtables-nft-multi"),
    ("iptables-nft-save", "xtables-nft-multi"),
    ("iptables-nft-restore", "xtables-nft-multi"),
    ("iptables-legacy", "xtables-legacy-multi"),
    ("iptables-legacy-save", "xtables-legacy-multi"),
    ("iptables-legacy-restore", "xtables-legacy-multi"),
];
/// Where iptables finds its extensions on Debian (amd64).
pub const XTABLES_DIR: &str = "/usr/lib/x86_64-linux-gnu/xtables";

/// What goes into the layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A file copied from this machine.
    File {
        source: PathBuf,
        mode: u32,
    },
    Symlink {
        target: String,
    },
    Dir {
        mode: u32,
    },
}

/// The layer's contents, by absolute path in the image.
pub type Contents = BTreeMap<String, Entry>;

/// The agent, its tools and their libraries, from this machine.
pub fn agent_contents(agent: &Path) -> anyhow::Result<Contents> {
    let mut contents = Contents::new();
    for dir in ["/tmp", "/run", "/etc", "/proc", "/sys", "/dev", "/var/run"] {
        let mode = if dir == "/tmp" { 0o1777 } else { 0o755 };
        contents.insert(dir.into(), Entry::Dir { mode });
    }
    add_binary(&mut contents, agent, "/tether-agent")?;
    for tool in TOOLS {
        add_binary(&mut contents, Path::new(tool), tool)?;
    }
    for multi in ["xtables-nft-multi", "xtables-legacy-multi"] {
        let path = format!("/usr/sbin/{multi}");
        add_binary(&mut contents, Path::new(&path), &path)?;
    }
    for (name, multi) in IPTABLES {
        contents.insert(
            format!("/usr/sbin/{name}"),
            Entry::Symlink {
                target: multi.into(),
            },
        );
    }
    let extensions = std::fs::read_dir(XTABLES_DIR)
        .with_context(|| format!("cannot read iptables' extensions in {XTABLES_DIR}"))?;
    for extension in extensions {
        let extension = extension?.path();
        let dest = extension.to_string_lossy().into_owned();
        add_binary(&mut contents, &extension, &dest)?;
    }
    Ok(contents)
}

/// `source` at `dest`, and every library it loads (as `ldd` resolves them on this machine),
/// each at the path `ldd` names, which is where the loader looks in the image too.
fn add_binary(contents: &mut Contents, source: &Path, dest: &str) -> anyhow::Result<()> {
    let real = source.canonicalize().with_context(|| {
        format!(
            "{} is missing (apt-get install iptables nftables conntrack iproute2 util-linux)",
            source.display()
        )
    })?;
    contents.insert(
        dest.to_owned(),
        Entry::File {
            source: real.clone(),
            mode: 0o755,
        },
    );
    let output = std::process::Command::new("ldd")
        .arg(&real)
        .output()
        .context("cannot run ldd")?;
    for path in ldd_paths(&String::from_utf8_lossy(&output.stdout)) {
        if let std::collections::btree_map::Entry::Vacant(slot) = contents.entry(path) {
            let source = Path::new(slot.key()).canonicalize().with_context(|| {
                format!("{}, which {} loads, is missing", slot.key(), real.display())
            })?;
            slot.insert(Entry::File {
                source,
                mode: 0o755,
            });
        }
    }
    Ok(())
}

/// True when `binary` is an ELF executable without a program interpreter (`PT_INTERP`): it
/// loads no shared library, so it runs whatever C library the image or node has.
pub fn is_static(binary: &Path) -> anyhow::Result<bool> {
    use object::read::elf::{ElfFile64, ProgramHeader as _};
    let data =
        std::fs::read(binary).with_context(|| format!("cannot read {}", binary.display()))?;
    let elf = ElfFile64::<object::Endianness>::parse(data.as_slice())
        .with_context(|| format!("{} is not a 64-bit ELF executable", binary.display()))?;
    let endian = elf.endian();
    Ok(!elf
        .elf_program_headers()
        .iter()
        .any(|header| header.p_type(endian) == object::elf::PT_INTERP))
}

/// The absolute paths in `ldd` output (`libc.so.6 => /lib/…/libc.so.6 (0x…)`, `/lib64/ld-…`).
pub fn ldd_paths(ldd: &str) -> Vec<String> {
    ldd.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, resolved)) => resolved.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| path.to_owned())
        })
        .collect()
}

/// The agent image, built in memory: one layer, its config and its manifest. Written to a
/// tarball by [`write`], pushed to a registry by [`crate::registry::push`].
#[derive(Debug, Clone)]
pub struct Image {
    /// The uncompressed layer (a tar of the contents); its digest is the config's `diff_id`.
    pub layer: Vec<u8>,
    /// The OCI image config (JSON).
    pub config: Vec<u8>,
    /// How many paths the layer holds.
    pub files: usize,
}

impl Image {
    /// The image of `contents`: the agent is its entrypoint.
    pub fn build(contents: &Contents) -> anyhow::Result<Image> {
        let layer = layer(contents)?;
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Entrypoint": ["/tether-agent"],
                "Env": [
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    format!("XTABLES_LIBDIR={XTABLES_DIR}"),
                ],
                "Labels": {"org.opencontainers.image.title": "tether-agent"},
            },
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256(&layer))]},
            "history": [{"created_by": "tether agent-image"}],
        }))?;
        Ok(Image {
            layer,
            config,
            files: contents.len(),
        })
    }
}

/// The tag of an image name: what follows the last ':' after the last '/'
/// (`localhost:5000/repo` has none).
pub fn tag(name: &str) -> Option<&str> {
    let last = name.rsplit('/').next().unwrap_or(name);
    last.rsplit_once(':')
        .filter(|(repo, tag)| !repo.is_empty() && !tag.is_empty())
        .map(|(_, tag)| tag)
}

/// What [`write`] made.
#[derive(Debug, Clone)]
pub struct Written {
    /// `sha256:…` of the OCI manifest.
    pub manifest_digest: String,
    pub layer_bytes: u64,
    pub files: usize,
}

/// Writes `image` as `name` (`registry/repo:tag`) to `out`.
pub fn write(out: &Path, name: &str, image: &Image) -> anyhow::Result<Written> {
    let Some(tag) = tag(name) else {
        bail!("the image name {name} has no tag (NAME:TAG)");
    };
    let Image { layer, config, .. } = image;
    let layer_digest = sha256(layer);
    let config_digest = sha256(config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_digest}"),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": format!("sha256:{layer_digest}"),
            "size": layer.len(),
        }],
    }))?;
    let manifest_digest = sha256(&manifest);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest.len(),
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    }))?;
    let docker_manifest = serde_json::to_vec(&json!([{
        "Config": format!("blobs/sha256/{config_digest}"),
        "RepoTags": [name],
        "Layers": [format!("blobs/sha256/{layer_digest}")],
    }]))?;

    let file =
        std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut archive = tar::Builder::new(std::io::BufWriter::new(file));
    let mut add = |path: &str, data: &[u8]| -> std::io::Result<()> {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        archive.append_data(&mut header, path, data)
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add(&format!("blobs/sha256/{layer_digest}"), layer)?;
    add(&format!("blobs/sha256/{config_digest}"), config)?;
    add(&format!("blobs/sha256/{manifest_digest}"), &manifest)?;
    add("index.json", &index)?;
    add("manifest.json", &docker_manifest)?;
    archive.into_inner()?.flush()?;
    Ok(Written {
        manifest_digest: format!("sha256:{manifest_digest}"),
        layer_bytes: layer.len() as u64,
        files: image.files,
    })
}

/// The layer: an uncompressed tar of `contents`, parents first, reproducible (mtime 0, root).
fn layer(contents: &Contents) -> anyhow::Result<Vec<u8>> {
    let mut archive = tar::Builder::new(Vec::new());
    let mut made: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    for (path, entry) in contents {
        let relative = path.trim_start_matches('/');
        // Parent directories of every entry, once.
        let mut parent = String::new();
        for part in Path::new(relative)
            .parent()
            .into_iter()
            .flat_map(Path::iter)
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(&part.to_string_lossy());
            if made.insert(parent.clone()) && !contents.contains_key(&format!("/{parent}")) {
                append_dir(&mut archive, &parent, 0o755)?;
            }
        }
        match entry {
            Entry::Dir { mode } => {
                if made.insert(relative.to_owned()) {
                    append_dir(&mut archive, relative, *mode)?;
                }
            }
            Entry::Symlink { target } => {
                let mut header = header(tar::EntryType::Symlink, 0o777, 0);
                archive.append_link(&mut header, relative, target)?;
            }
            Entry::File { source, mode } => {
                let data = std::fs::read(source)
                    .with_context(|| format!("cannot read {}", source.display()))?;
                let mut header = header(tar::EntryType::Regular, *mode, data.len() as u64);
                archive.append_data(&mut header, relative, data.as_slice())?;
            }
        }
    }
    Ok(archive.into_inner()?)
}

fn append_dir(archive: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32) -> std::io::Result<()> {
    let mut header = header(tar::EntryType::Directory, mode, 0);
    archive.append_data(&mut header, format!("{path}/"), std::io::empty())
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header
}

fn sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_and_dynamic_executables_are_told_apart() {
        // Debian's ldconfig is static-pie; coreutils are dynamic.
        assert!(is_static(Path::new("/sbin/ldconfig")).unwrap());
        assert!(!is_static(Path::new("/usr/bin/true")).unwrap());
        assert!(is_static(Path::new("/etc/hostname")).is_err());
    }

    #[test]
    fn ldd_output_is_parsed() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibxtables.so.12 => /lib/x86_64-linux-gnu/libxtables.so.12 (0x00007f)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            ldd_paths(ldd),
            [
                "/lib/x86_64-linux-gnu/libxtables.so.12",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
        assert!(ldd_paths("\tnot a dynamic executable\n").is_empty());
        assert!(ldd_paths("\tstatically linked\n").is_empty());
    }
}
