//! Consumer positions as a CRDT.
//!
//! A position says "everything of owner X before (chunk index, offset) is
//! processed". Per (consumer, category, owner) it is a max-register ordered
//! by (generation, index, offset): merging two replicas' values keeps the
//! larger, so positions only move forward and every node converges whatever
//! the order in which updates arrive. A rewind (`PUT .../position`) writes
//! the next generation, which is the one way to move backwards. Deleting a
//! consumer records a tombstone generation: positions of that generation or
//! older are void everywhere, and the name starts afresh above it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One owner's position of one consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    /// Bumped by each rewind; compared first.
    pub generation: u64,
    /// Chunk index in the owner's sequence.
    pub index: u32,
    /// Byte offset in that chunk.
    pub offset: u64,
}

/// Everything known of one consumer in one category.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerEntry {
    /// Per owner.
    #[serde(default)]
    pub positions: BTreeMap<String, Position>,
    /// Positions of this generation or older are void (the consumer was deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tombstone: Option<u64>,
}

impl ConsumerEntry {
    /// The generation new positions are written with.
    pub fn generation(&self) -> u64 {
        let above_tombstone = self.tombstone.map_or(0, |t| t + 1);
        self.positions
            .values()
            .map(|p| p.generation)
            .max()
            .unwrap_or(0)
            .max(above_tombstone)
    }

    /// Raises `owner`'s position to `p` if it is larger and not void.
    /// Returns true when something changed.
    pub fn raise(&mut self, owner: &str, p: Position) -> bool {
        if self.tombstone.is_some_and(|t| p.generation <= t) {
            return false;
        }
        match self.positions.get_mut(owner) {
            Some(cur) if *cur >= p => false,
            Some(cur) => {
                *cur = p;
                true
            }
            None => {
                self.positions.insert(owner.to_owned(), p);
                true
            }
        }
    }

    /// Deletes the consumer: every position so far becomes void.
    pub fn delete(&mut self) -> bool {
        let g = self.generation();
        let t = self.tombstone.map_or(g, |t| t.max(g));
        let changed = self.tombstone != Some(t) || !self.positions.is_empty();
        self.tombstone = Some(t);
        self.positions.clear();
        changed
    }

    /// Merges another replica's view of the same consumer. Returns true when
    /// something changed here.
    pub fn merge(&mut self, other: &ConsumerEntry) -> bool {
        let mut changed = false;
        if let Some(t) = other.tombstone
            && self.tombstone.is_none_or(|mine| mine < t)
        {
            self.tombstone = Some(t);
            self.positions.retain(|_, p| p.generation > t);
            changed = true;
        }
        for (owner, p) in &other.positions {
            changed |= self.raise(owner, *p);
        }
        changed
    }

    /// True when the consumer exists (has a position that is not void).
    pub fn is_live(&self) -> bool {
        !self.positions.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pos(generation: u64, index: u32, offset: u64) -> Position {
        Position {
            generation,
            index,
            offset,
        }
    }

    #[test]
    fn moves_forward_only_and_rewinds_by_generation() {
        let mut e = ConsumerEntry::default();
        assert!(e.raise("eu1", pos(0, 3, 100)));
        assert!(!e.raise("eu1", pos(0, 3, 50)));
        assert!(!e.raise("eu1", pos(0, 2, 900)));
        assert!(e.raise("eu1", pos(0, 4, 0)));
        // A rewind is the next generation.
        assert!(e.raise("eu1", pos(1, 0, 0)));
        assert_eq!(e.positions["eu1"], pos(1, 0, 0));
        assert_eq!(e.generation(), 1);
    }

    #[test]
    fn delete_voids_older_generations_everywhere() {
        let mut a = ConsumerEntry::default();
        a.raise("eu1", pos(0, 5, 10));
        let mut b = a.clone();
        assert!(a.delete());
        assert!(!a.is_live());
        // A replica that has not heard of the delete cannot resurrect it.
        assert!(!a.raise("eu1", pos(0, 9, 0)));
        assert!(b.merge(&a));
        assert!(!b.is_live());
        // The name starts afresh above the tombstone.
        assert_eq!(a.generation(), 1);
        assert!(a.raise("eu1", pos(a.generation(), 0, 0)));
    }

    fn entry() -> impl Strategy<Value = ConsumerEntry> {
        let p = (0u64..3, 0u32..4, 0u64..4).prop_map(|(g, i, o)| pos(g, i, o));
        (
            prop::collection::btree_map("[ab]", p, 0..3),
            prop::option::of(0u64..3),
        )
            .prop_map(|(positions, tombstone)| {
                let mut e = ConsumerEntry {
                    positions: BTreeMap::new(),
                    tombstone,
                };
                for (o, p) in positions {
                    e.raise(&o, p);
                }
                e
            })
    }

    proptest! {
        /// Merge is commutative, associative and idempotent: replicas that
        /// saw the same updates in any order hold the same positions.
        #[test]
        fn merge_is_a_join(a in entry(), b in entry(), c in entry()) {
            let m = |x: &ConsumerEntry, y: &ConsumerEntry| { let mut r = x.clone(); r.merge(y); r };
            prop_assert_eq!(m(&a, &b), m(&b, &a));
            prop_assert_eq!(m(&m(&a, &b), &c), m(&a, &m(&b, &c)));
            prop_assert_eq!(m(&a, &a), a.clone());
        }
    }
}
