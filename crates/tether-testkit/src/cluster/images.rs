//! The kubelet's image pulls. An image in a registry on loopback (one a test started, such as
//! Debian's `docker-registry`) is really pulled: its manifest and layers are fetched, and the
//! entrypoint is taken out of the layers and run as the agent pod's command, so a test sees
//! exactly what the pushed image holds. Any other image counts as present on the node: the
//! simulator's own agent command runs.

use std::{io::Read as _, path::PathBuf};

use oci_client::{
    Client, Reference,
    client::{ClientConfig, ClientProtocol},
    manifest::{
        IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE, IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE,
        IMAGE_LAYER_GZIP_MEDIA_TYPE, IMAGE_LAYER_MEDIA_TYPE,
    },
    secrets::RegistryAuth,
};

/// The image's entrypoint as a file on this machine, if the image lives in a loopback registry;
/// `Err` with the message containerd would give when the pull fails.
pub(crate) async fn pull_entrypoint(
    image: &str,
    into: &std::path::Path,
) -> Result<Option<PathBuf>, String> {
    let Ok(reference) = image.parse::<Reference>() else {
        return Err(format!(
            "failed to pull and unpack image \"{image}\": invalid reference format"
        ));
    };
    let registry = reference.resolve_registry().to_owned();
    let host = registry.split(':').next().unwrap_or_default();
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return Ok(None);
    }
    let failed = |error: &dyn std::fmt::Display| {
        format!("failed to pull and unpack image \"{image}\": {error}")
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(vec![registry]),
        ..ClientConfig::default()
    });
    let pulled = client
        .pull(
            &reference,
            &RegistryAuth::Anonymous,
            vec![
                IMAGE_LAYER_GZIP_MEDIA_TYPE,
                IMAGE_LAYER_MEDIA_TYPE,
                IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE,
                IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE,
            ],
        )
        .await
        .map_err(|e| failed(&e))?;
    let config: serde_json::Value =
        serde_json::from_slice(&pulled.config.data).map_err(|e| failed(&e))?;
    let entrypoint = config["config"]["Entrypoint"][0]
        .as_str()
        .ok_or_else(|| failed(&"the image has no entrypoint"))?
        .trim_start_matches('/')
        .to_owned();
    // The last layer that holds the entrypoint wins, as in an unpacked root filesystem.
    let mut found = None;
    for layer in &pulled.layers {
        let data: Box<dyn std::io::Read> = if layer.media_type.ends_with("gzip") {
            Box::new(flate2::read::GzDecoder::new(&layer.data[..]))
        } else {
            Box::new(&layer.data[..])
        };
        let mut archive = tar::Archive::new(data);
        for entry in archive.entries().map_err(|e| failed(&e))? {
            let mut entry = entry.map_err(|e| failed(&e))?;
            let path = entry.path().map_err(|e| failed(&e))?;
            if path.to_string_lossy().trim_start_matches("./") == entrypoint {
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes).map_err(|e| failed(&e))?;
                found = Some(bytes);
            }
        }
    }
    let bytes = found.ok_or_else(|| failed(&format!("no /{entrypoint} in the image's layers")))?;
    let digest = pulled.digest.unwrap_or_default().replace(':', "-");
    let file = into.join(format!("entrypoint-{digest}-{}", rand::random::<u32>()));
    std::fs::write(&file, bytes).map_err(|e| failed(&e))?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| failed(&e))?;
    Ok(Some(file))
}
