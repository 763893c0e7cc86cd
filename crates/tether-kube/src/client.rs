//! A client for the user's cluster, found as kubectl finds it.

use std::path::PathBuf;

use anyhow::Context as _;
use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};

/// Where the cluster is: every field optional, as in tether's config.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// A kubeconfig file (default: `$KUBECONFIG`, then `~/.kube/config`, then in-cluster).
    pub kubeconfig: Option<PathBuf>,
    /// The context (default: the kubeconfig's current context).
    pub context: Option<String>,
    pub accept_invalid_certificates: bool,
}

/// A client and the namespace of the context (`default` when it names none).
pub async fn connect(settings: &Settings) -> anyhow::Result<(Client, String)> {
    let options = KubeConfigOptions {
        context: settings.context.clone(),
        ..KubeConfigOptions::default()
    };
    let mut config = match (&settings.kubeconfig, &settings.context) {
        (Some(path), _) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read the kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(file, &options)
                .await
                .with_context(|| format!("cannot use the kubeconfig {}", path.display()))?
        }
        (None, Some(context)) => Config::from_kubeconfig(&options)
            .await
            .with_context(|| format!("cannot use the kubeconfig context {context}"))?,
        (None, None) => Config::infer().await.context(
            "no cluster: no kubeconfig ($KUBECONFIG, ~/.kube/config) and not inside a pod",
        )?,
    };
    if settings.accept_invalid_certificates {
        config.accept_invalid_certs = true;
    }
    let namespace = config.default_namespace.clone();
    let client = Client::try_from(config).context("cannot build the Kubernetes client")?;
    Ok((client, namespace))
}
