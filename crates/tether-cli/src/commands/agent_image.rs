//! `tether agent-image --push REF` / `--output agent.tar`: the agent image, pushed to a registry
//! or written as a tarball for clusters without one.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use tether_kube::image::Image;

use crate::ui::Ui;

/// Where the image goes: a tarball (file, name inside it), a registry (reference, plain HTTP),
/// or both.
#[derive(Debug)]
pub(crate) struct Destination<'a> {
    pub(crate) tarball: Option<(&'a Path, &'a str)>,
    pub(crate) push: Option<(String, bool)>,
}

pub(crate) fn run(
    destination: Destination<'_>,
    agent: Option<PathBuf>,
    ui: Ui,
) -> anyhow::Result<i32> {
    // A name that cannot be pushed is said before the packing, not after.
    if let Some((reference, _)) = &destination.push {
        tether_kube::registry::parse_tagged(reference)?;
    }
    let agent = match agent {
        Some(path) => path,
        None => default_agent()?,
    };
    let step = ui.step(&format!(
        "packing {} and the tools it runs",
        agent.display()
    ));
    let image = match tether_kube::image::agent_contents(&agent).and_then(|c| Image::build(&c)) {
        Ok(image) => image,
        Err(error) => {
            step.fail(&format!("{error:#}"));
            return Ok(1);
        }
    };
    step.done(&format!(
        "{} files, {:.1} MB",
        image.files,
        image.layer.len() as f64 / 1e6
    ));
    if !tether_kube::image::is_static(&agent)? {
        ui.info(&format!(
            "{} is dynamically linked: its libraries from this machine are packed with it. \
             A static agent needs none: RUSTFLAGS='-C target-feature=+crt-static' cargo build --release \
             --target x86_64-unknown-linux-gnu -p tether-agent, then --agent target/x86_64-unknown-linux-gnu/release/tether-agent",
            agent.display()
        ));
    }

    if let Some((output, name)) = destination.tarball {
        let written = match tether_kube::image::write(output, name, &image) {
            Ok(written) => written,
            Err(error) => {
                ui.warn(&format!("cannot write {}: {error:#}", output.display()));
                return Ok(1);
            }
        };
        ui.info(&format!(
            "wrote {} ({name}, {})",
            output.display(),
            written.manifest_digest
        ));
        ui.info(&format!(
            "load it on each node:   ctr -n k8s.io images import {0}   (or: docker load -i {0})",
            output.display()
        ));
        ui.info(&format!(
            "then use it:            agent.image: \"{name}\", agent.image_pull_policy: IfNotPresent"
        ));
    }

    if let Some((reference, plain_http)) = destination.push {
        let step = ui.step(&format!("pushing to {reference}"));
        let runtime = tokio::runtime::Runtime::new()?;
        match runtime.block_on(tether_kube::registry::push(&image, &reference, plain_http)) {
            Ok(pushed) => {
                step.done(&format!(
                    "{}, layer {:.1} MB compressed",
                    pushed.digest,
                    pushed.layer_bytes as f64 / 1e6
                ));
                if ui.is_json() {
                    crate::ui::emit(serde_json::json!({
                        "event": "pushed", "reference": pushed.name, "digest": pushed.digest,
                        "pinned": pushed.pinned(),
                    }));
                } else {
                    println!("{}", pushed.pinned());
                }
                ui.info(&format!(
                    "use it: agent.image: \"{}\" (or the tag alone: \"{}\")",
                    pushed.pinned(),
                    pushed.name
                ));
            }
            Err(error) => {
                step.fail(&format!("{:#}", anyhow::Error::from(error)));
                return Ok(1);
            }
        }
    }
    Ok(0)
}

/// The agent to pack when none is named: a static build from this workspace if there is one
/// (`target/x86_64-unknown-linux-gnu/release/tether-agent`, beside this tether's `target/release`
/// or `target/debug`), else the `tether-agent` next to this tether.
fn default_agent() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the tether executable")?;
    let next_to = exe.with_file_name("tether-agent");
    let static_build = exe
        .parent()
        .and_then(Path::parent)
        .map(|target| target.join("x86_64-unknown-linux-gnu/release/tether-agent"));
    if let Some(static_build) = static_build.filter(|p| p.is_file()) {
        return Ok(static_build);
    }
    anyhow::ensure!(
        next_to.is_file(),
        "no tether-agent next to {} (build it: cargo build --release -p tether-agent), \
         or name one with --agent",
        exe.display()
    );
    Ok(next_to)
}
