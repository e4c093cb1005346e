#![no_main]
//! `cargo +nightly fuzz run lines`: see chunkbus::fuzzing::lines.

libfuzzer_sys::fuzz_target!(|data: &[u8]| chunkbus::fuzzing::lines(data));
