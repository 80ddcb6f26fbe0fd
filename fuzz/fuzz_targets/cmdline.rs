//! Fuzzes the kernel command line (`BootOverrides::parse`); the checks are `tests::fuzz_checks::cmdline`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tests::fuzz_checks::cmdline(data));
