//! `tether ls`: what `--target` can name in a namespace.

use serde_json::json;

use crate::ui::{self, Ui};

pub(crate) async fn run(
    namespace: Option<String>,
    context: Option<String>,
    config_file: Option<&std::path::Path>,
    ui: Ui,
) -> anyhow::Result<i32> {
    let mut loader = crate::commands::config::loader(config_file);
    if let Some(context) = &context {
        loader = loader.flag("--context", "/kube_context", json!(context));
    }
    if let Some(namespace) = &namespace {
        loader = loader.flag("--namespace", "/target/namespace", json!(namespace));
    }
    let config = match loader.load() {
        Ok(loaded) => loaded.config,
        Err(problems) => {
            eprint!("{}", crate::commands::config::render(&problems));
            return Ok(1);
        }
    };
    let (client, namespace) = crate::kube_agent::client(&config).await?;
    let targets = tether_kube::target::list(&client, &namespace).await?;
    if ui.is_json() {
        for target in &targets {
            ui::emit(json!({
                "namespace": namespace,
                "target": target.target,
                "ready": target.ready,
                "usable": target.usable,
            }));
        }
        return Ok(0);
    }
    if targets.is_empty() {
        eprintln!("nothing to target in namespace {namespace}");
        return Ok(0);
    }
    let width = targets
        .iter()
        .map(|t| t.target.len())
        .max()
        .unwrap_or(6)
        .max(6);
    println!("{:width$}  READY", "TARGET");
    for target in &targets {
        println!("{:width$}  {}", target.target, target.ready);
    }
    Ok(0)
}
