//! The menu lock (`[boot] menu_lock`): an argon2id password hash in PHC form. The plan stores
//! only the hash; the menu verifies what a person types against it.

/// The most memory (KiB) a lock hash may ask for: it is spent in the initramfs, as process 1.
const MAX_MEMORY_KIB: u32 = 256 * 1024;
const MAX_PASSES: u32 = 16;
const MAX_LANES: u32 = 8;

/// Checks that `hash` is an argon2id PHC string whose cost an initramfs can pay; says what is
/// wrong otherwise.
pub fn check_hash(hash: &str) -> Result<(), String> {
    use argon2::password_hash::PasswordHash;
    let parsed = PasswordHash::new(hash).map_err(|e| format!("not a PHC password hash ({e})"))?;
    if parsed.algorithm.as_str() != "argon2id" {
        return Err(format!(
            "the hash is {}, not argon2id",
            parsed.algorithm.as_str()
        ));
    }
    if parsed.hash.is_none() || parsed.salt.is_none() {
        return Err("the hash lacks its salt or its output".into());
    }
    let params = argon2::Params::try_from(&parsed)
        .map_err(|e| format!("its argon2 parameters are invalid ({e})"))?;
    if params.m_cost() > MAX_MEMORY_KIB
        || params.t_cost() > MAX_PASSES
        || params.p_cost() > MAX_LANES
    {
        return Err(format!(
            "its cost (m={}, t={}, p={}) is more than a boot can pay (at most m={MAX_MEMORY_KIB}, t={MAX_PASSES}, p={MAX_LANES})",
            params.m_cost(),
            params.t_cost(),
            params.p_cost()
        ));
    }
    Ok(())
}

/// True when `password` matches the argon2id hash `hash`; false for a hash [`check_hash`]
/// refuses.
pub fn verify_password(hash: &str, password: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    check_hash(hash).is_ok()
        && PasswordHash::new(hash).is_ok_and(|parsed| {
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

    #[test]
    fn hashes_a_boot_cannot_use_are_refused() {
        assert!(check_hash(&hash_password("x").unwrap()).is_ok());
        let cases = [
            ("hunter2", "not a PHC password hash"),
            (
                "$argon2i$v=19$m=16,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",
                "not argon2id",
            ),
            (
                "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ",
                "lacks its salt or its output",
            ),
            (
                "$argon2id$v=19$m=4194304,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",
                "more than a boot can pay",
            ),
        ];
        for (hash, want) in cases {
            let e = check_hash(hash).unwrap_err();
            assert!(e.contains(want), "{hash}: {e}");
            assert!(!verify_password(hash, "x"));
        }
    }
}
