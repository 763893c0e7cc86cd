//! OCI registries: pushing the agent image, and asking whether an image is there.
//!
//! Credentials are found as docker and podman keep them: `$DOCKER_CONFIG/config.json` (or
//! `~/.docker/config.json`) with its `auths`, `credsStore` and `credHelpers`, then podman's
//! `auth.json` (`REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`); none found means
//! anonymous. A registry on a loopback address is spoken to in plain HTTP (as docker treats
//! `localhost:5000`), any other over HTTPS unless `plain_http` says otherwise.

use std::io::Write as _;

use docker_credential::{CredentialRetrievalError, DockerCredential};
use oci_client::{
    Client, Reference,
    client::{ClientConfig, ClientProtocol, Config, ImageLayer},
    errors::OciDistributionError,
    manifest::{IMAGE_LAYER_GZIP_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE, OciImageManifest},
    secrets::RegistryAuth,
};

use crate::image::Image;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{name} is not an image reference (REGISTRY/REPOSITORY:TAG): {reason}")]
    BadReference { name: String, reason: String },
    #[error("{name} has no tag; give one (REGISTRY/REPOSITORY:TAG)")]
    NoTag { name: String },
    #[error("cannot read the credentials for {registry}")]
    Credentials {
        registry: String,
        #[source]
        source: CredentialRetrievalError,
    },
    #[error(
        "the credentials for {registry} are an identity token, which tether cannot use; \
         log in with a user name and password or access token (docker login {registry})"
    )]
    IdentityToken { registry: String },
    #[error("cannot compress the image layer")]
    Compress(#[source] std::io::Error),
    #[error("cannot {what} {reference}")]
    Registry {
        what: &'static str,
        reference: String,
        #[source]
        source: OciDistributionError,
    },
}

impl RegistryError {
    /// True when no registry answered (no route, refused, TLS): from elsewhere, a node say, it
    /// may still be reachable.
    pub fn unreachable(&self) -> bool {
        matches!(
            self,
            RegistryError::Registry {
                source: OciDistributionError::RequestError(_) | OciDistributionError::IoError(_),
                ..
            }
        )
    }
}

/// What [`push`] put in the registry.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// The name as given (`registry/repo:tag`).
    pub name: String,
    /// `sha256:…` of the manifest, as the registry reports it.
    pub digest: String,
    /// The compressed layer's size.
    pub layer_bytes: u64,
}

impl Pushed {
    /// `registry/repo:tag@sha256:…`: pins exactly what was pushed.
    pub fn pinned(&self) -> String {
        format!("{}@{}", self.name, self.digest)
    }
}

/// Pushes `image` as `name`.
pub async fn push(image: &Image, name: &str, plain_http: bool) -> Result<Pushed, RegistryError> {
    let reference = parse_tagged(name)?;
    let auth = credentials(&reference).await?;
    let client = client(&reference, plain_http);
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzip.write_all(&image.layer)
        .map_err(RegistryError::Compress)?;
    let compressed = gzip.finish().map_err(RegistryError::Compress)?;
    let layer_bytes = compressed.len() as u64;
    let layers = [ImageLayer::new(
        compressed,
        IMAGE_LAYER_GZIP_MEDIA_TYPE.into(),
        None,
    )];
    let config = Config::oci_v1(image.config.clone(), None);
    let mut manifest = OciImageManifest::build(&layers, &config, None);
    manifest.media_type = Some(OCI_IMAGE_MEDIA_TYPE.into());
    let registry_error = |what, source| RegistryError::Registry {
        what,
        reference: name.into(),
        source,
    };
    client
        .push(&reference, &layers, config, &auth, Some(manifest))
        .await
        .map_err(|e| registry_error("push", e))?;
    let digest = client
        .fetch_manifest_digest(&reference, &auth)
        .await
        .map_err(|e| registry_error("read the manifest of", e))?;
    Ok(Pushed {
        name: name.into(),
        digest,
        layer_bytes,
    })
}

/// The digest of `name`'s manifest in its registry: proof that the image is there for whoever
/// has this machine's credentials.
pub async fn manifest_digest(name: &str, plain_http: bool) -> Result<String, RegistryError> {
    let reference = parse(name)?;
    let auth = credentials(&reference).await?;
    client(&reference, plain_http)
        .fetch_manifest_digest(&reference, &auth)
        .await
        .map_err(|source| RegistryError::Registry {
            what: "read the manifest of",
            reference: name.into(),
            source,
        })
}

/// `name` as a reference to push to: it must name a tag.
pub fn parse_tagged(name: &str) -> Result<Reference, RegistryError> {
    let reference = parse(name)?;
    if crate::image::tag(name).is_none() {
        return Err(RegistryError::NoTag { name: name.into() });
    }
    Ok(reference)
}

fn parse(name: &str) -> Result<Reference, RegistryError> {
    name.parse::<Reference>()
        .map_err(|e| RegistryError::BadReference {
            name: name.into(),
            reason: e.to_string(),
        })
}

fn client(reference: &Reference, plain_http: bool) -> Client {
    // reqwest finds no crypto provider of its own in this build: ring, as kube's client uses.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let registry = reference.resolve_registry().to_owned();
    let protocol = if plain_http || is_loopback(&registry) {
        ClientProtocol::HttpsExcept(vec![registry])
    } else {
        ClientProtocol::Https
    };
    Client::new(ClientConfig {
        protocol,
        ..ClientConfig::default()
    })
}

/// `localhost[:port]`, `127.x.x.x[:port]`, `[::1][:port]`.
fn is_loopback(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => registry.split(':').next().unwrap_or_default(),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The credentials docker (then podman) keeps for the reference's registry; anonymous if none.
async fn credentials(reference: &Reference) -> Result<RegistryAuth, RegistryError> {
    let registry = reference.resolve_registry().to_owned();
    let lookup = registry.clone();
    // Credential helpers are programs, run and waited for: off the runtime's threads.
    let found =
        tokio::task::spawn_blocking(move || match docker_credential::get_credential(&lookup) {
            Err(
                CredentialRetrievalError::ConfigNotFound
                | CredentialRetrievalError::ConfigReadError
                | CredentialRetrievalError::NoCredentialConfigured,
            ) => docker_credential::get_podman_credential(&lookup),
            found => found,
        })
        .await
        .unwrap_or(Err(CredentialRetrievalError::NoCredentialConfigured));
    match found {
        Ok(DockerCredential::UsernamePassword(user, password)) => {
            Ok(RegistryAuth::Basic(user, password))
        }
        Ok(DockerCredential::IdentityToken(_)) => Err(RegistryError::IdentityToken { registry }),
        Err(
            CredentialRetrievalError::ConfigNotFound
            | CredentialRetrievalError::ConfigReadError
            | CredentialRetrievalError::NoCredentialConfigured,
        ) => Ok(RegistryAuth::Anonymous),
        Err(source) => Err(RegistryError::Credentials { registry, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_are_recognised() {
        for registry in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5055",
            "127.1.2.3",
            "[::1]:5000",
        ] {
            assert!(is_loopback(registry), "{registry}");
        }
        for registry in [
            "ghcr.io",
            "registry.example.com:5000",
            "10.0.0.1:5000",
            "index.docker.io",
        ] {
            assert!(!is_loopback(registry), "{registry}");
        }
    }

    #[test]
    fn references_without_a_tag_or_with_a_bad_name_are_refused() {
        let image = Image {
            layer: Vec::new(),
            config: b"{}".to_vec(),
            files: 0,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let error = runtime
            .block_on(push(&image, "127.0.0.1:5000/tether-agent", false))
            .unwrap_err();
        assert!(matches!(error, RegistryError::NoTag { .. }), "{error}");
        let error = runtime
            .block_on(push(&image, "UPPER/Case:tag", false))
            .unwrap_err();
        assert!(
            matches!(error, RegistryError::BadReference { .. }),
            "{error}"
        );
    }
}
