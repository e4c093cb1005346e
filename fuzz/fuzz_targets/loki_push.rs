#![no_main]
//! `cargo +nightly fuzz run loki_push`: see chunkbus::fuzzing::loki_push.

libfuzzer_sys::fuzz_target!(|data: &[u8]| chunkbus::fuzzing::loki_push(data));
