//! Durable per-category state: `<data>/<category>/.state.json`.
//!
//! ```json
//! {"version":2,"complete":{"eu2":[[0,41],[43,44]]}}
//! ```
//!
//! `complete[owner]` is the set of `owner`'s chunk indices whose copies held
//! here are recorded complete, as inclusive ranges. It is needed for other
//! owners' chunks only: a replica learns completeness from the owner (or
//! from `forget-node`) and must remember it across restarts, while this
//! node's own chunks are all complete at start-up by construction.
//!
//! Each index is recorded by itself, only after that copy was fsynced at the
//! owner's final size: a completed later chunk never vouches for an earlier
//! one (a copy that missed its owner's restart can be short, and must stay
//! incomplete until it is repaired). An index may be recorded while no copy
//! is held (the owner was forgotten, a copy was deleted); before a copy of a
//! recorded index is created again, or a short complete copy is reopened for
//! repair, the index is removed durably first. So at start-up a copy whose
//! index is recorded is complete at its size on disk.
//!
//! `next_own_index` keeps chunk names unique after this node's own chunks
//! were deleted, or after it learned from its peers which names it used
//! before it lost its disk; `next_own_line` does the same for the numbers
//! of its lines.
//!
//! Version 1 (`{"version":1,"complete_through":{"eu2":41}}`, one watermark
//! per owner) is read as the range `[0, 41]` and written back as version 2.
//!
//! Written atomically: temp file, fsync, rename, fsync of the directory. A
//! crash leaves the old or the new file, never a mix; a leftover temp file is
//! ignored.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::StorageError;

/// File name of the state inside a category directory.
pub const STATE_FILE: &str = ".state.json";

/// Version of the state format written by this build.
pub const STATE_VERSION: u32 = 2;
/// The first format, with one completion watermark per owner; still read.
const STATE_VERSION_WATERMARK: u32 = 1;

/// A set of chunk indices, kept as sorted, disjoint, non-adjacent inclusive
/// ranges (serialised as `[[first, last], ...]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IndexSet(Vec<(u32, u32)>);

impl IndexSet {
    /// True when `index` is in the set.
    pub fn contains(&self, index: u32) -> bool {
        let i = self.0.partition_point(|&(_, last)| last < index);
        self.0.get(i).is_some_and(|&(first, _)| first <= index)
    }

    /// Adds `index`; returns true when it was not in the set.
    pub fn insert(&mut self, index: u32) -> bool {
        if self.contains(index) {
            return false;
        }
        let i = self.0.partition_point(|&(_, last)| last < index);
        let joins_prev = i > 0 && self.0[i - 1].1.checked_add(1) == Some(index);
        let joins_next = self
            .0
            .get(i)
            .is_some_and(|&(first, _)| index.checked_add(1) == Some(first));
        match (joins_prev, joins_next) {
            (true, true) => {
                self.0[i - 1].1 = self.0[i].1;
                self.0.remove(i);
            }
            (true, false) => self.0[i - 1].1 = index,
            (false, true) => self.0[i].0 = index,
            (false, false) => self.0.insert(i, (index, index)),
        }
        true
    }

    /// Removes `index`; returns true when it was in the set.
    pub fn remove(&mut self, index: u32) -> bool {
        if !self.contains(index) {
            return false;
        }
        let i = self.0.partition_point(|&(_, last)| last < index);
        let (first, last) = self.0[i];
        match (first == index, last == index) {
            (true, true) => {
                self.0.remove(i);
            }
            (true, false) => self.0[i].0 = index + 1,
            (false, true) => self.0[i].1 = index - 1,
            (false, false) => {
                self.0[i].1 = index - 1;
                self.0.insert(i + 1, (index + 1, last));
            }
        }
        true
    }

    /// The ranges, in order.
    pub fn ranges(&self) -> &[(u32, u32)] {
        &self.0
    }

    /// False when the ranges are not sorted, disjoint and non-adjacent (a
    /// hand-edited or corrupt file).
    fn well_formed(&self) -> bool {
        self.0.iter().all(|&(a, b)| a <= b)
            && self
                .0
                .windows(2)
                .all(|w| w[0].1.checked_add(1).is_some_and(|n| n < w[1].0))
    }
}

/// The on-disk form, versioned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CategoryState {
    /// Format version ([`STATE_VERSION`]).
    pub version: u32,
    /// Per owner, the indices of the copies recorded complete.
    #[serde(default)]
    pub complete: BTreeMap<String, IndexSet>,
    /// The lowest index this node may use for its next chunk: recorded when
    /// its own chunks are deleted, or learned from its peers, so that chunk
    /// names are never reused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_own_index: Option<u32>,
    /// The lowest number the first line of this node's next chunk may
    /// take: learned from its peers after it lost its disk (their records
    /// include chunks deleted since), so that a restart before its chunks
    /// are restored, or after the highest were deleted, numbers no line
    /// twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_own_line: Option<u64>,
}

/// Version 1 of the file, read for upgrades.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CategoryStateV1 {
    #[allow(dead_code)]
    version: u32,
    complete_through: BTreeMap<String, u32>,
    #[serde(default)]
    next_own_index: Option<u32>,
}

impl Default for CategoryState {
    fn default() -> Self {
        Self {
            version: STATE_VERSION,
            complete: BTreeMap::new(),
            next_own_index: None,
            next_own_line: None,
        }
    }
}

impl CategoryState {
    /// Records `owner`'s chunk `index` complete; returns true when it changed.
    pub fn mark_complete(&mut self, owner: &str, index: u32) -> bool {
        self.complete
            .entry(owner.to_owned())
            .or_default()
            .insert(index)
    }

    /// Removes the record of `owner`'s chunk `index` (a copy of it is about
    /// to be written again); returns true when it changed.
    pub fn unmark_complete(&mut self, owner: &str, index: u32) -> bool {
        let Some(set) = self.complete.get_mut(owner) else {
            return false;
        };
        let changed = set.remove(index);
        if set.ranges().is_empty() {
            self.complete.remove(owner);
        }
        changed
    }

    /// True when `owner`'s chunk `index` is recorded complete.
    pub fn is_complete(&self, owner: &str, index: u32) -> bool {
        self.complete.get(owner).is_some_and(|s| s.contains(index))
    }
}

/// Reads the state of the category at `dir` (default when absent); a
/// version 1 file is converted.
pub fn load(dir: &Path) -> Result<CategoryState, StorageError> {
    let path = dir.join(STATE_FILE);
    let invalid = |msg: String| invalid_file(&path, msg);
    let Some(bytes) = read_if_present(&path)? else {
        return Ok(CategoryState::default());
    };
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    let v: Version = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
    let state = match v.version {
        STATE_VERSION => {
            serde_json::from_slice::<CategoryState>(&bytes).map_err(|e| invalid(e.to_string()))?
        }
        STATE_VERSION_WATERMARK => {
            let old: CategoryStateV1 =
                serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
            CategoryState {
                version: STATE_VERSION,
                complete: old
                    .complete_through
                    .into_iter()
                    .map(|(owner, through)| (owner, IndexSet(vec![(0, through)])))
                    .collect(),
                next_own_index: old.next_own_index,
                next_own_line: None,
            }
        }
        other => {
            return Err(invalid(format!(
                "version {other} is not supported by this build (expected {STATE_VERSION})"
            )));
        }
    };
    if let Some((owner, _)) = state.complete.iter().find(|(_, s)| !s.well_formed()) {
        return Err(invalid(format!(
            "the completed chunks of {owner} are not sorted, disjoint ranges"
        )));
    }
    Ok(state)
}

/// Reads a versioned JSON file written by [`write_atomic`]; `None` when
/// absent, an error naming the file when unreadable or of another version.
fn read_versioned<T: serde::de::DeserializeOwned>(
    path: &Path,
    expected: u32,
    version: impl Fn(&T) -> u32,
) -> Result<Option<T>, StorageError> {
    let Some(bytes) = read_if_present(path)? else {
        return Ok(None);
    };
    let value: T = serde_json::from_slice(&bytes).map_err(|e| invalid_file(path, e.to_string()))?;
    let v = version(&value);
    if v != expected {
        return Err(invalid_file(
            path,
            format!("version {v} is not supported by this build (expected {expected})"),
        ));
    }
    Ok(Some(value))
}

/// The bytes of `path`; `None` when it does not exist.
fn read_if_present(path: &Path) -> Result<Option<Vec<u8>>, StorageError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StorageError::io(
            format!("cannot read {}", path.display()),
            e,
        )),
    }
}

/// The error for a file whose content cannot be used.
fn invalid_file(path: &Path, msg: String) -> StorageError {
    StorageError::io(
        format!("cannot use {}", path.display()),
        std::io::Error::new(std::io::ErrorKind::InvalidData, msg),
    )
}

/// Writes the state of the category at `dir` atomically.
pub fn save(dir: &Path, state: &CategoryState) -> Result<(), StorageError> {
    write_atomic(dir, STATE_FILE, state)
        .map_err(|e| StorageError::io(format!("cannot write state of {}", dir.display()), e))
}

/// Writes `value` as JSON to `dir/name` atomically (see [`crate::durable`]).
pub(super) fn write_atomic<T: Serialize>(dir: &Path, name: &str, value: &T) -> std::io::Result<()> {
    crate::durable::write_json(&dir.join(name), value)
}

/// File name, in the data directory, of the owners this node treats as
/// lost (forgotten, or unreachable past `--owner-lost-after`).
pub const FORGOTTEN_FILE: &str = ".forgotten.json";
/// Version of the forgotten owners' file.
const FORGOTTEN_VERSION: u32 = 1;

/// The on-disk form of the forgotten owners, versioned:
/// `{"version":1,"owners":["eu3"]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForgottenOwners {
    version: u32,
    owners: std::collections::BTreeSet<String>,
}

/// The owners recorded as lost in `data_dir` (none when absent).
pub fn load_forgotten(data_dir: &Path) -> Result<std::collections::BTreeSet<String>, StorageError> {
    let file = read_versioned(
        &data_dir.join(FORGOTTEN_FILE),
        FORGOTTEN_VERSION,
        |f: &ForgottenOwners| f.version,
    )?;
    Ok(file.map(|f| f.owners).unwrap_or_default())
}

/// Records `owners` as the lost owners of `data_dir`, atomically.
pub fn save_forgotten(
    data_dir: &Path,
    owners: &std::collections::BTreeSet<String>,
) -> Result<(), StorageError> {
    let value = ForgottenOwners {
        version: FORGOTTEN_VERSION,
        owners: owners.clone(),
    };
    save_file(data_dir, FORGOTTEN_FILE, &value)
}

/// Writes `value` as JSON to `dir/name` atomically; the error names the file.
fn save_file<T: Serialize>(dir: &Path, name: &str, value: &T) -> Result<(), StorageError> {
    write_atomic(dir, name, value)
        .map_err(|e| StorageError::io(format!("cannot write {}", dir.join(name).display()), e))
}

/// File name, in a category directory, of the ends of other owners' line
/// numbers as their full listings gave them, for when no chunk of theirs is
/// held here to say it (retention deleted them before this node joined or
/// lost its disk; see `numbering`). A file of its own, so that a version
/// before it, which ignores the category's dot files, still starts.
pub const LINE_ENDS_FILE: &str = ".line_ends.json";
/// Version of the line ends' file.
const LINE_ENDS_VERSION: u32 = 1;

/// The on-disk form of the learned line ends: `{"version":1,"ends":{"eu2":40}}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LineEnds {
    version: u32,
    ends: BTreeMap<String, u64>,
}

/// The line ends learned in the category at `dir` (none when absent).
pub fn load_line_ends(dir: &Path) -> Result<BTreeMap<String, u64>, StorageError> {
    let file = read_versioned(
        &dir.join(LINE_ENDS_FILE),
        LINE_ENDS_VERSION,
        |f: &LineEnds| f.version,
    )?;
    Ok(file.map(|f| f.ends).unwrap_or_default())
}

/// Records `ends` as the line ends learned in the category at `dir`,
/// atomically.
pub fn save_line_ends(dir: &Path, ends: &BTreeMap<String, u64>) -> Result<(), StorageError> {
    let value = LineEnds {
        version: LINE_ENDS_VERSION,
        ends: ends.clone(),
    };
    save_file(dir, LINE_ENDS_FILE, &value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgotten_owners_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load_forgotten(dir.path()).unwrap().is_empty());
        let owners: std::collections::BTreeSet<String> = ["eu3".to_owned()].into();
        save_forgotten(dir.path(), &owners).unwrap();
        assert_eq!(load_forgotten(dir.path()).unwrap(), owners);
        let text = std::fs::read_to_string(dir.path().join(FORGOTTEN_FILE)).unwrap();
        assert_eq!(text, r#"{"version":1,"owners":["eu3"]}"#);
        std::fs::write(dir.path().join(FORGOTTEN_FILE), r#"{"version":1}"#).unwrap();
        assert!(load_forgotten(dir.path()).is_err());
    }

    #[test]
    fn round_trips_and_records_each_index_alone() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), CategoryState::default());
        let mut st = CategoryState::default();
        assert!(st.mark_complete("eu2", 3));
        assert!(!st.mark_complete("eu2", 3));
        assert!(st.mark_complete("eu2", 5));
        save(dir.path(), &st).unwrap();
        let back = load(dir.path()).unwrap();
        assert!(back.is_complete("eu2", 3) && back.is_complete("eu2", 5));
        // A later completion never vouches for an earlier chunk.
        assert!(!back.is_complete("eu2", 4) && !back.is_complete("eu2", 0));
        assert!(!back.is_complete("eu3", 3));
        let text = std::fs::read_to_string(dir.path().join(STATE_FILE)).unwrap();
        assert_eq!(text, r#"{"version":2,"complete":{"eu2":[[3,3],[5,5]]}}"#);
        std::fs::write(
            dir.path().join(STATE_FILE),
            r#"{"version":9,"complete":{}}"#,
        )
        .unwrap();
        assert!(
            load(dir.path())
                .unwrap_err()
                .to_string()
                .contains("version 9")
        );
        std::fs::write(
            dir.path().join(STATE_FILE),
            r#"{"version":2,"complete":{"eu2":[[5,9],[1,2]]}}"#,
        )
        .unwrap();
        assert!(load(dir.path()).unwrap_err().to_string().contains("eu2"));
    }

    #[test]
    fn version_1_watermarks_are_read_as_ranges() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(STATE_FILE),
            r#"{"version":1,"complete_through":{"eu2":41},"next_own_index":7}"#,
        )
        .unwrap();
        let st = load(dir.path()).unwrap();
        assert!(st.is_complete("eu2", 0) && st.is_complete("eu2", 41));
        assert!(!st.is_complete("eu2", 42));
        assert_eq!(st.next_own_index, Some(7));
        assert_eq!(st.version, STATE_VERSION);
    }

    #[test]
    fn unmarking_splits_ranges() {
        let mut st = CategoryState::default();
        for i in 0..=10 {
            st.mark_complete("eu2", i);
        }
        assert_eq!(st.complete["eu2"].ranges(), &[(0, 10)]);
        assert!(st.unmark_complete("eu2", 4));
        assert!(!st.unmark_complete("eu2", 4));
        assert_eq!(st.complete["eu2"].ranges(), &[(0, 3), (5, 10)]);
        assert!(st.unmark_complete("eu2", 0) && st.unmark_complete("eu2", 10));
        assert_eq!(st.complete["eu2"].ranges(), &[(1, 3), (5, 9)]);
        assert!(st.mark_complete("eu2", 4));
        assert_eq!(st.complete["eu2"].ranges(), &[(1, 9)]);
        for i in 1..=9 {
            st.unmark_complete("eu2", i);
        }
        assert!(st.complete.is_empty());
        assert!(!st.unmark_complete("eu9", 1));
    }

    proptest::proptest! {
        /// The range set behaves as a set of indices.
        #[test]
        fn index_set_matches_a_model(ops in proptest::collection::vec((proptest::bool::ANY, 0u32..40), 0..200)) {
            let mut set = IndexSet::default();
            let mut model = std::collections::BTreeSet::new();
            for (add, i) in ops {
                if add {
                    proptest::prop_assert_eq!(set.insert(i), model.insert(i));
                } else {
                    proptest::prop_assert_eq!(set.remove(i), model.remove(&i));
                }
                proptest::prop_assert!(set.well_formed(), "{:?}", set);
                for j in 0..41 {
                    proptest::prop_assert_eq!(set.contains(j), model.contains(&j));
                }
            }
        }
    }
}
