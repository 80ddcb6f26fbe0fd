//! The keys a store trusts for bundles: `keys/NAME.pub`, read, added and removed through the
//! folder's handle (a `keys/` that is a symlink is refused, never read or written through).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, ensure};
use ed25519_dalek::VerifyingKey;
use serde::Serialize;

use crate::bundle::{format_public, format_secret, generate_key, parse_public};
use crate::store::{Folder, Store};

/// A trusted key as `keys list` shows it.
#[derive(Debug, Serialize)]
pub struct Listed {
    pub name: String,
    /// The key in the `.pub` file's form.
    pub key: String,
}

/// The trusted keys, by name, as `keys list` shows them.
pub fn list(store: &Store) -> Result<Vec<Listed>> {
    Ok(trusted(store)?
        .into_iter()
        .map(|(name, key)| Listed {
            name,
            key: format_public(&key).trim_end().to_owned(),
        })
        .collect())
}

/// The trusted keys, by name. None when the store has no `keys/`.
pub fn trusted(store: &Store) -> Result<Vec<(String, VerifyingKey)>> {
    let Some(keys) = store.handle().existing_folder(Folder::Keys)? else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    for file in keys.names()? {
        let Some(name) = file.to_str().and_then(|f| f.strip_suffix(".pub")) else {
            continue;
        };
        let path = keys.child_path(&file);
        let Some(bytes) = keys.read(&file)? else {
            continue;
        };
        let text =
            String::from_utf8(bytes).map_err(|_| anyhow!("{} is not text", path.display()))?;
        let key = parse_public(&text).with_context(|| format!("reading {}", path.display()))?;
        found.push((name.to_owned(), key));
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(found)
}

/// The pair of files `keys generate` wrote.
#[derive(Debug, Serialize)]
pub struct Generated {
    pub secret: PathBuf,
    pub public: PathBuf,
}

/// Writes a new signing key to `output` (readable by its owner only) and its public half to
/// `output.pub`; neither may exist.
pub fn generate(output: &Path) -> Result<Generated> {
    let key = generate_key()?;
    let public = PathBuf::from(format!("{}.pub", output.display()));
    ensure!(
        !output.exists() && !public.exists(),
        "{} or {} exists; nothing was written",
        output.display(),
        public.display()
    );
    let mut secret = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(output)
        .with_context(|| format!("creating {}", output.display()))?;
    secret
        .write_all(format_secret(&key).as_bytes())
        .with_context(|| format!("writing {}", output.display()))?;
    std::fs::write(&public, format_public(&key.verifying_key()))
        .with_context(|| format!("writing {}", public.display()))?;
    Ok(Generated {
        secret: output.to_owned(),
        public,
    })
}

/// Trusts the public key in `file`, under `name` or the file's name without `.pub`.
pub fn add(store: &Store, file: &Path, name: Option<&str>) -> Result<String> {
    let _lock = store.lock()?;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let key = parse_public(&text).with_context(|| format!("reading {}", file.display()))?;
    let name = match name {
        Some(n) => n.to_owned(),
        None => file
            .file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(".pub").to_owned())
            .unwrap_or_default(),
    };
    check_name(&name)?;
    let keys = store.folder(Folder::Keys)?;
    let file_name = format!("{name}.pub");
    ensure!(
        keys.kind(&file_name)?.is_none(),
        "a key named {name} is already trusted"
    );
    keys.write_new(&file_name, format_public(&key).as_bytes(), 0o644)?;
    keys.sync()?;
    Ok(name)
}

/// Stops trusting the key named `name`.
pub fn remove(store: &Store, name: &str) -> Result<()> {
    check_name(name)?;
    let _lock = store.lock()?;
    let keys = store.folder(Folder::Keys)?;
    let file = format!("{name}.pub");
    ensure!(
        keys.kind(&file)?.is_some(),
        "no trusted key is named {name}"
    );
    keys.remove(&file)?;
    keys.sync()?;
    Ok(())
}

fn check_name(name: &str) -> Result<()> {
    layers_spec::check_name(name).map_err(|p| anyhow!("key name {name:?} is not valid: {p}"))
}
