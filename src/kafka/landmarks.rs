//! Where some lines of chunks start, learnt while scanning for them, so
//! that finding a line (a fetch from a new connection, a commit) or
//! counting the lines before a byte (OffsetFetch) scans from the nearest
//! known line below rather than from the chunk's start. A consumer that
//! commits every few hundred lines then costs a scan of what it read since
//! its last commit, not of the chunk up to its position. Chunk bytes never
//! change, so a landmark stays true.

use std::collections::HashMap;
use std::sync::Mutex;

use chunkbus_client::ChunkName;

/// Landmarks kept per chunk (the lowest go first).
const PER_CHUNK: usize = 64;
/// Chunks with landmarks; past it, all are forgotten.
const CHUNKS: usize = 4096;

/// (line in the chunk, byte it starts at), by line.
type Starts = Vec<(u64, u64)>;

#[derive(Debug, Default)]
pub struct Landmarks {
    /// Per (topic, chunk).
    map: Mutex<HashMap<(String, ChunkName), Starts>>,
}

impl Landmarks {
    /// The known line start at or before line `line` of the chunk
    /// (`(0, 0)` when none is).
    pub fn at_or_before_line(&self, topic: &str, chunk: &ChunkName, line: u64) -> (u64, u64) {
        self.find(topic, chunk, |&(l, _)| l <= line)
    }

    /// The known line start at or before byte `byte` of the chunk.
    pub fn at_or_before_byte(&self, topic: &str, chunk: &ChunkName, byte: u64) -> (u64, u64) {
        self.find(topic, chunk, |&(_, b)| b <= byte)
    }

    fn find(&self, topic: &str, chunk: &ChunkName, ok: impl Fn(&(u64, u64)) -> bool) -> (u64, u64) {
        let map = self.map.lock().unwrap();
        map.get(&(topic.to_owned(), chunk.clone()))
            .and_then(|v| v.iter().rev().find(|m| ok(m)).copied())
            .unwrap_or((0, 0))
    }

    /// Records that line `line` of the chunk starts at byte `byte`.
    pub fn note(&self, topic: &str, chunk: &ChunkName, line: u64, byte: u64) {
        if line == 0 {
            return;
        }
        let mut map = self.map.lock().unwrap();
        let key = (topic.to_owned(), chunk.clone());
        if !map.contains_key(&key) && map.len() >= CHUNKS {
            map.clear();
        }
        let v = map.entry(key).or_default();
        if let Err(i) = v.binary_search_by_key(&line, |&(l, _)| l) {
            v.insert(i, (line, byte));
            if v.len() > PER_CHUNK {
                v.remove(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nearest_landmark_below_is_found_and_the_lowest_go_first() {
        let m = Landmarks::default();
        let c: ChunkName = "a-chunk000000001".parse().unwrap();
        assert_eq!(m.at_or_before_line("t", &c, 10), (0, 0));
        m.note("t", &c, 10, 100);
        m.note("t", &c, 5, 50);
        assert_eq!(m.at_or_before_line("t", &c, 9), (5, 50));
        assert_eq!(m.at_or_before_line("t", &c, 10), (10, 100));
        assert_eq!(m.at_or_before_byte("t", &c, 99), (5, 50));
        assert_eq!(m.at_or_before_line("u", &c, 10), (0, 0));
        for l in 11..(11 + PER_CHUNK as u64) {
            m.note("t", &c, l, l * 10);
        }
        assert_eq!(
            m.at_or_before_line("t", &c, 9),
            (0, 0),
            "the lowest were dropped"
        );
        assert_eq!(m.at_or_before_line("t", &c, 1000), (74, 740));
    }
}
