//! Fuzzes bundle manifests (TOML), wrapped in a bundle and read as `Bundle::open` does; the checks are `tests::fuzz_checks::bundle_manifest`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tests::fuzz_checks::bundle_manifest(data));
