//! OCI images as layers: an image's layers unpacked into the store in image order (or merged
//! into one), from an image layout directory, an `oci-archive` or `docker-archive` tar, or a
//! registry (docs/oci.md).

pub mod image;
pub mod layer;
pub mod pull;
pub mod registry;

use std::path::Path;

use anyhow::{Result, anyhow};

use image::{DockerArchive, LayoutArchive, LayoutDir, Source};
use registry::{Access, Reference, Registry};

/// Opens the image `text` names, as skopeo names them: `oci:DIR[:REF]`,
/// `oci-archive:FILE[:REF]`, `docker-archive:FILE[:REPO:TAG]`, or a registry's
/// `[docker://]REGISTRY/REPO[:TAG][@DIGEST]`. Returns it with a short name for its layers.
/// Registry blobs download into `downloads`.
pub fn open_source(
    text: &str,
    access: &Access,
    downloads: &Path,
) -> Result<(Box<dyn Source>, String)> {
    let split = |rest: &str| -> (String, Option<String>) {
        match rest.split_once(':') {
            Some((path, reference)) if !reference.is_empty() => {
                (path.to_owned(), Some(reference.to_owned()))
            }
            _ => (rest.trim_end_matches(':').to_owned(), None),
        }
    };
    let short = |path: &str, reference: Option<&str>| {
        let base = Path::new(path)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("image");
        short_name(reference.map_or(base, |r| {
            r.rsplit_once(':')
                .map_or(r, |(repo, _)| repo)
                .rsplit('/')
                .next()
                .unwrap_or(r)
        }))
    };
    if let Some(rest) = text.strip_prefix("oci:") {
        let (path, reference) = split(rest);
        let name = short(&path, None);
        return Ok((
            Box::new(LayoutDir::new(Path::new(&path), reference.as_deref())),
            name,
        ));
    }
    if let Some(rest) = text.strip_prefix("oci-archive:") {
        let (path, reference) = split(rest);
        let name = short(&path, None);
        return Ok((
            Box::new(LayoutArchive::open(Path::new(&path), reference.as_deref())?),
            name,
        ));
    }
    if let Some(rest) = text.strip_prefix("docker-archive:") {
        let (path, reference) = split(rest);
        let name = short(&path, reference.as_deref());
        return Ok((
            Box::new(DockerArchive::open(Path::new(&path), reference.as_deref())?),
            name,
        ));
    }
    // skopeo's other transports, which are no place a device pulls from.
    if let Some((transport, _)) = text.split_once(':')
        && [
            "dir",
            "containers-storage",
            "docker-daemon",
            "ostree",
            "sif",
            "tarball",
        ]
        .contains(&transport)
    {
        return Err(anyhow!(
            "{text:?}: the transport {transport:?} is not read; use oci:, oci-archive:, docker-archive: or a registry reference"
        ));
    }
    let reference = Reference::parse(text)?;
    let name = short_name(reference.short_name());
    Ok((Box::new(Registry::new(reference, access, downloads)?), name))
}

/// A layer name's start from an image's name: its letters, digits, `.`, `_`, `+` and `-`,
/// at most 40.
fn short_name(from: &str) -> String {
    let name: String = from
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._+-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    let name = name.trim_start_matches('.');
    if name.is_empty() || name.contains("..") {
        "image".to_owned()
    } else {
        name.to_owned()
    }
}
