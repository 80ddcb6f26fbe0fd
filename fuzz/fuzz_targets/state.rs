//! Fuzzes boot state (`BootState::parse`, `check`); the checks are `tests::fuzz_checks::state`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tests::fuzz_checks::state(data));
