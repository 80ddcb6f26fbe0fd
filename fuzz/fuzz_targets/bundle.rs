//! Fuzzes bundle files as `Bundle::open` reads them (`BundleHead::read`, `check`); the checks are `tests::fuzz_checks::bundle`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tests::fuzz_checks::bundle(data));
