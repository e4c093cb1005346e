#![no_main]
//! `cargo +nightly fuzz run otlp_logs`: see chunkbus::fuzzing::otlp_logs.

libfuzzer_sys::fuzz_target!(|data: &[u8]| chunkbus::fuzzing::otlp_logs(data));
