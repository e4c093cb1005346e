#![no_main]
//! `cargo +nightly fuzz run es_bulk`: see chunkbus::fuzzing::es_bulk.

libfuzzer_sys::fuzz_target!(|data: &[u8]| chunkbus::fuzzing::es_bulk(data));
