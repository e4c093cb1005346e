#![no_main]
//! `cargo +nightly fuzz run names`: see chunkbus::fuzzing::names.

libfuzzer_sys::fuzz_target!(|data: &[u8]| chunkbus::fuzzing::names(data));
