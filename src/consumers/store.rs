//! Durable consumer positions: `<data>/<category>/.consumers.json`.
//!
//! ```json
//! {"version":1,"consumers":{"billing":{"positions":{"eu1":{"generation":0,"index":42,"offset":4096}}}}}
//! ```
//!
//! Written atomically (temp file, fsync, rename, fsync of the directory)
//! after every change, group-committed: a writer that finds a newer snapshot
//! already written returns at once.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::position::ConsumerEntry;
use crate::storage::StorageError;

/// File name inside a category directory.
pub const CONSUMERS_FILE: &str = ".consumers.json";
/// Version of the format written by this build.
pub const CONSUMERS_VERSION: u32 = 1;

/// The on-disk form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumersFile {
    /// Format version.
    pub version: u32,
    /// Per consumer name.
    pub consumers: BTreeMap<String, ConsumerEntry>,
}

fn invalid(path: &Path, msg: String) -> StorageError {
    StorageError::io(
        format!("cannot use {}", path.display()),
        std::io::Error::new(std::io::ErrorKind::InvalidData, msg),
    )
}

/// Loads the consumers of the category at `dir` (none when absent).
pub fn load(dir: &Path) -> Result<BTreeMap<String, ConsumerEntry>, StorageError> {
    let path = dir.join(CONSUMERS_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let f: ConsumersFile =
                serde_json::from_slice(&bytes).map_err(|e| invalid(&path, e.to_string()))?;
            if f.version != CONSUMERS_VERSION {
                return Err(invalid(
                    &path,
                    format!(
                        "consumers format version {} is not supported by this build",
                        f.version
                    ),
                ));
            }
            Ok(f.consumers)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(StorageError::io(
            format!("cannot read {}", path.display()),
            e,
        )),
    }
}

/// Writes the consumers of the category at `dir` atomically.
pub fn save(dir: &Path, consumers: &BTreeMap<String, ConsumerEntry>) -> Result<(), StorageError> {
    let file = ConsumersFile {
        version: CONSUMERS_VERSION,
        consumers: consumers.clone(),
    };
    crate::durable::write_json(&dir.join(CONSUMERS_FILE), &file)
        .map_err(|e| StorageError::io(format!("cannot write consumers of {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumers::position::Position;

    #[test]
    fn round_trips() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_empty());
        let mut m = BTreeMap::new();
        let mut e = ConsumerEntry::default();
        e.raise(
            "eu1",
            Position {
                generation: 0,
                index: 42,
                offset: 4096,
            },
        );
        m.insert("billing".to_string(), e);
        save(dir.path(), &m).unwrap();
        assert_eq!(load(dir.path()).unwrap(), m);
        let text = std::fs::read_to_string(dir.path().join(CONSUMERS_FILE)).unwrap();
        assert_eq!(
            text,
            r#"{"version":1,"consumers":{"billing":{"positions":{"eu1":{"generation":0,"index":42,"offset":4096}}}}}"#
        );
    }
}
