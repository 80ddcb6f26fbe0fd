//! Fuzzes legacy XO plans (`legacy::import`); the checks are `tests::fuzz_checks::legacy`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tests::fuzz_checks::legacy(data));
