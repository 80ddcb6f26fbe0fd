//! The menu lock (`[boot] menu_lock`): an argon2id password hash in PHC form. The plan stores
//! only the hash; the menu verifies what a person types against it.

/// True when `password` matches the PHC hash `hash` (argon2).
pub fn verify_password(hash: &str, password: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    PasswordHash::new(hash).is_ok_and(|parsed| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

/// A PHC argon2id hash of `password` for `[boot] menu_lock`, with a random salt.
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("hashing the password: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_verifies_its_password_only() {
        let hash = hash_password("kiosk").unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(verify_password(&hash, "kiosk"));
        assert!(!verify_password(&hash, "kiosK"));
        assert!(!verify_password("not a hash", "kiosk"));
        assert_ne!(hash, hash_password("kiosk").unwrap(), "salted");
    }
}
