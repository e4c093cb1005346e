#![no_main]
//! `cargo +nightly fuzz run recovery`: see chunkbus::fuzzing::recovery.

libfuzzer_sys::fuzz_target!(|data: &[u8]| chunkbus::fuzzing::recovery(data));
