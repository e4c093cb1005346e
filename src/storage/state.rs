//! Durable per-category state: `<data>/<category>/.state.json`.
//!
//! ```json
//! {"version":1,"complete_through":{"eu2":41}}
//! ```
//!
//! `complete_through[owner] = i` records that every chunk of `owner` up to
//! index `i` held here is complete. It is needed for other owners' chunks
//! only: a replica learns completeness from the owner (or from
//! `forget-node`) and must remember it across restarts, while this node's
//! own chunks are all complete at start-up by construction. Owners complete
//! their chunks in index order, so one number per owner is enough.
//! `next_own_index` keeps chunk names unique after this node's own chunks
//! were deleted.
//!
//! Written atomically: temp file, fsync, rename, fsync of the directory. A
//! crash leaves the old or the new file, never a mix; a leftover temp file is
//! ignored.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{StorageError, fsync_dir};

/// File name of the state inside a category directory.
pub const STATE_FILE: &str = ".state.json";
const STATE_TMP_FILE: &str = ".state.json.tmp";

/// Version of the state format written by this build.
pub const STATE_VERSION: u32 = 1;

/// The on-disk form, versioned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CategoryState {
    /// Format version ([`STATE_VERSION`]).
    pub version: u32,
    /// Per owner, the highest index up to which its chunks are complete.
    pub complete_through: BTreeMap<String, u32>,
    /// The lowest index this node may use for its next chunk: recorded when
    /// its own chunks are deleted, so that chunk names are never reused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_own_index: Option<u32>,
}

impl Default for CategoryState {
    fn default() -> Self {
        Self {
            version: STATE_VERSION,
            complete_through: BTreeMap::new(),
            next_own_index: None,
        }
    }
}

impl CategoryState {
    /// Raises `owner`'s mark to `index`; returns true when it changed.
    pub fn raise(&mut self, owner: &str, index: u32) -> bool {
        match self.complete_through.get_mut(owner) {
            Some(cur) if *cur >= index => false,
            Some(cur) => {
                *cur = index;
                true
            }
            None => {
                self.complete_through.insert(owner.to_owned(), index);
                true
            }
        }
    }

    /// True when `owner`'s chunk `index` is recorded complete.
    pub fn is_complete(&self, owner: &str, index: u32) -> bool {
        self.complete_through
            .get(owner)
            .is_some_and(|&through| index <= through)
    }
}

/// Reads the state of the category at `dir` (default when absent).
pub fn load(dir: &Path) -> Result<CategoryState, StorageError> {
    Ok(read_versioned(&dir.join(STATE_FILE), |s: &CategoryState| s.version)?.unwrap_or_default())
}

/// Reads a versioned JSON file written by [`write_atomic`]; `None` when
/// absent, an error naming the file when unreadable or of another version.
fn read_versioned<T: serde::de::DeserializeOwned>(
    path: &Path,
    version: impl Fn(&T) -> u32,
) -> Result<Option<T>, StorageError> {
    let invalid = |msg: String| {
        StorageError::io(
            format!("cannot use {}", path.display()),
            std::io::Error::new(std::io::ErrorKind::InvalidData, msg),
        )
    };
    match std::fs::read(path) {
        Ok(bytes) => {
            let value: T = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
            let v = version(&value);
            if v != STATE_VERSION {
                return Err(invalid(format!(
                    "version {v} is not supported by this build (expected {STATE_VERSION})"
                )));
            }
            Ok(Some(value))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StorageError::io(
            format!("cannot read {}", path.display()),
            e,
        )),
    }
}

/// Writes the state of the category at `dir` atomically.
pub fn save(dir: &Path, state: &CategoryState) -> Result<(), StorageError> {
    write_atomic(dir, STATE_FILE, STATE_TMP_FILE, state)
        .map_err(|e| StorageError::io(format!("cannot write state of {}", dir.display()), e))
}

/// Writes `value` as JSON to `dir/name`: temp file, fsync, rename, fsync
/// of the directory.
fn write_atomic<T: Serialize>(dir: &Path, name: &str, tmp: &str, value: &T) -> std::io::Result<()> {
    let tmp = dir.join(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(value).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    fsync_dir(dir)
}

/// File name, in the data directory, of the owners this node treats as
/// lost (forgotten, or unreachable past `--owner-lost-after`).
pub const FORGOTTEN_FILE: &str = ".forgotten.json";
const FORGOTTEN_TMP_FILE: &str = ".forgotten.json.tmp";

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
    let file = read_versioned(&data_dir.join(FORGOTTEN_FILE), |f: &ForgottenOwners| {
        f.version
    })?;
    Ok(file.map(|f| f.owners).unwrap_or_default())
}

/// Records `owners` as the lost owners of `data_dir`, atomically.
pub fn save_forgotten(
    data_dir: &Path,
    owners: &std::collections::BTreeSet<String>,
) -> Result<(), StorageError> {
    let value = ForgottenOwners {
        version: STATE_VERSION,
        owners: owners.clone(),
    };
    write_atomic(data_dir, FORGOTTEN_FILE, FORGOTTEN_TMP_FILE, &value).map_err(|e| {
        StorageError::io(
            format!("cannot write {}", data_dir.join(FORGOTTEN_FILE).display()),
            e,
        )
    })
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
    fn round_trips_and_only_rises() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), CategoryState::default());
        let mut st = CategoryState::default();
        assert!(st.raise("eu2", 3));
        assert!(!st.raise("eu2", 1));
        save(dir.path(), &st).unwrap();
        let back = load(dir.path()).unwrap();
        assert!(back.is_complete("eu2", 3) && back.is_complete("eu2", 0));
        assert!(!back.is_complete("eu2", 4) && !back.is_complete("eu3", 0));
        let text = std::fs::read_to_string(dir.path().join(STATE_FILE)).unwrap();
        assert_eq!(text, r#"{"version":1,"complete_through":{"eu2":3}}"#);
        std::fs::write(
            dir.path().join(STATE_FILE),
            r#"{"version":9,"complete_through":{}}"#,
        )
        .unwrap();
        assert!(
            load(dir.path())
                .unwrap_err()
                .to_string()
                .contains("version 9")
        );
    }
}
