#![no_main]
//! `cargo +nightly fuzz run kafka`: see chunkbus::fuzzing::kafka_frame.

libfuzzer_sys::fuzz_target!(|data: &[u8]| chunkbus::fuzzing::kafka_frame(data));
