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
    let client = without_nagle(config).context("cannot build the Kubernetes client")?;
    Ok((client, namespace))
}

/// kube's own client stack (TLS from the kubeconfig, base URI, retries of 429/503/504 as kube
/// does by default, authentication with refresh, extra headers), except that its connections to
/// the API server set `TCP_NODELAY`.
/// hyper-util's `HttpConnector` leaves Nagle on, which kube's default builder keeps: a session's
/// small frames then wait for the server's delayed ACK, ~40 ms per exchange on a real cluster
/// (field-notes §10). The port-forward's WebSocket is an upgrade of such a connection, so the
/// whole session path inherits the option.
///
/// Left out of kube's stack: its per-request debug tracing, and the expiry of a client
/// certificate an exec plugin returned (kube keeps that API internal; the API server refuses an
/// expired one). Through a proxy (`proxy-url`), kube's own builder is used as it is (its tunnels
/// are not rebuilt here).
fn without_nagle(config: Config) -> Result<Client, kube::Error> {
    use hyper_util::client::legacy::connect::HttpConnector;
    use kube::client::{ClientBuilder, ConfigExt as _};
    use tower::{ServiceBuilder, ServiceExt as _};

    if config.proxy_url.is_some() {
        return Client::try_from(config);
    }
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(config.connect_timeout);
    let https = config.rustls_https_connector_with_connector(http)?;
    let hyper =
        hyper_util::client::legacy::Builder::new(hyper_util::rt::TokioExecutor::new()).build(https);
    let retry = config
        .default_retry
        .then(|| tower::retry::RetryLayer::new(kube::client::retry::RetryPolicy::server_retry()));
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(retry)
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(tower::BoxError::from)
        .service(hyper)
        .map_response(|response: http::Response<hyper::body::Incoming>| {
            response.map(|body| {
                Box::new(http_body_util::BodyExt::map_err(
                    body,
                    tower::BoxError::from,
                )) as Box<kube::client::DynBody>
            })
        })
        .boxed();
    Ok(ClientBuilder::new(service, config.default_namespace.clone()).build())
}
