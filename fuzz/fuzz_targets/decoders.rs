#![no_main]
//! `cargo +nightly fuzz run decoders`: see chunkbus::fuzzing::decoders.

libfuzzer_sys::fuzz_target!(|data: &[u8]| chunkbus::fuzzing::decoders(data));
