#![no_main]
//! `cargo +nightly fuzz run hec_events`: see chunkbus::fuzzing::hec_events.

libfuzzer_sys::fuzz_target!(|data: &[u8]| chunkbus::fuzzing::hec_events(data));
