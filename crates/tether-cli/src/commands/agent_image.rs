//! `tether agent-image --output agent.tar`: the agent image, for clusters without a registry.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::ui::Ui;

pub(crate) fn run(
    output: &Path,
    agent: Option<PathBuf>,
    name: &str,
    ui: Ui,
) -> anyhow::Result<i32> {
    let agent = match agent {
        Some(path) => path,
        None => {
            let exe = std::env::current_exe().context("cannot find the tether executable")?;
            let next_to = exe.with_file_name("tether-agent");
            anyhow::ensure!(
                next_to.is_file(),
                "no tether-agent next to {} (build it: cargo build --release -p tether-agent), \
                 or name one with --agent",
                exe.display()
            );
            next_to
        }
    };
    let step = ui.step(&format!(
        "packing {} and the tools it runs",
        agent.display()
    ));
    let contents = match tether_kube::image::agent_contents(&agent) {
        Ok(contents) => contents,
        Err(error) => {
            step.fail(&format!("{error:#}"));
            return Ok(1);
        }
    };
    let written = match tether_kube::image::write(output, name, &contents) {
        Ok(written) => written,
        Err(error) => {
            step.fail(&format!("{error:#}"));
            return Ok(1);
        }
    };
    step.done(&format!(
        "{} files, {:.1} MB",
        written.files,
        written.layer_bytes as f64 / 1e6
    ));
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
    Ok(0)
}
