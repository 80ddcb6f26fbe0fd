//! Signing keys as text.

use anyhow::{Context, Result, anyhow, ensure};
use ed25519_dalek::{SigningKey, VerifyingKey};

const PUBLIC_TAG: &str = "strata-ed25519-public";
const SECRET_TAG: &str = "strata-ed25519-secret";

pub fn format_public(key: &VerifyingKey) -> String {
    use base64::Engine;
    format!(
        "{PUBLIC_TAG} {}\n",
        base64::engine::general_purpose::STANDARD.encode(key.as_bytes())
    )
}

pub fn format_secret(key: &SigningKey) -> String {
    use base64::Engine;
    format!(
        "{SECRET_TAG} {}\n",
        base64::engine::general_purpose::STANDARD.encode(key.to_bytes())
    )
}

fn decode_key<const N: usize>(text: &str, tag: &str) -> Result<[u8; N]> {
    use base64::Engine;
    let mut words = text.split_whitespace();
    ensure!(
        words.next() == Some(tag),
        "not a {tag} key (the file should start with {tag:?})"
    );
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(words.next().unwrap_or(""))
        .context("the key is not valid base64")?;
    bytes
        .try_into()
        .map_err(|_| anyhow!("the key has the wrong length"))
}

pub fn parse_public(text: &str) -> Result<VerifyingKey> {
    VerifyingKey::from_bytes(&decode_key::<32>(text, PUBLIC_TAG)?)
        .map_err(|_| anyhow!("not a valid ed25519 public key"))
}

pub fn parse_secret(text: &str) -> Result<SigningKey> {
    Ok(SigningKey::from_bytes(&decode_key::<32>(text, SECRET_TAG)?))
}

/// A new signing key from the operating system's random source.
pub fn generate_key() -> Result<SigningKey> {
    let mut seed = [0u8; 32];
    let mut filled = 0;
    while filled < seed.len() {
        filled +=
            rustix::rand::getrandom(&mut seed[filled..], rustix::rand::GetRandomFlags::empty())
                .context("reading random bytes")?;
    }
    Ok(SigningKey::from_bytes(&seed))
}
