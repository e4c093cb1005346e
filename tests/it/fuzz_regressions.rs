//! Replays every input kept under `fuzz/regressions/<target>/` (inputs that
//! once broke a property, and seeds) through the fuzz targets' checks.

use std::path::Path;

/// A fuzz target's checks.
type Check = fn(&[u8]);

fn replay(target: &str, check: Check) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let run = std::panic::catch_unwind(|| check(&data));
        assert!(run.is_ok(), "{} fails again", path.display());
        n += 1;
    }
    n
}

#[test]
fn kept_fuzz_inputs_still_pass() {
    let targets: [(&str, Check); 9] = [
        ("lines", chunkbus::fuzzing::lines),
        ("kafka", chunkbus::fuzzing::kafka_frame),
        ("decoders", chunkbus::fuzzing::decoders),
        ("names", chunkbus::fuzzing::names),
        ("recovery", chunkbus::fuzzing::recovery),
        ("es_bulk", chunkbus::fuzzing::es_bulk),
        ("hec_events", chunkbus::fuzzing::hec_events),
        ("otlp_logs", chunkbus::fuzzing::otlp_logs),
        ("loki_push", chunkbus::fuzzing::loki_push),
    ];
    for (target, check) in targets {
        assert!(replay(target, check) > 0, "no inputs kept for {target}");
    }
}
