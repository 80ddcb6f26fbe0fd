//! Fuzzes the plan (`Plan::parse`, `check`, `to_toml`, `resolve`); the checks are `tests::fuzz_checks::plan`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tests::fuzz_checks::plan(data));
