//! Durable consumer positions: one file per category, where storage says
//! (`<data>/<category>/.consumers.json`).
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

/// Loads the consumers kept in `path` (none when absent).
pub fn load(path: &Path) -> Result<BTreeMap<String, ConsumerEntry>, StorageError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let f: ConsumersFile =
                serde_json::from_slice(&bytes).map_err(|e| invalid(path, e.to_string()))?;
            if f.version != CONSUMERS_VERSION {
                return Err(invalid(
                    path,
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

/// Writes the consumers to `path` atomically.
pub fn save(path: &Path, consumers: &BTreeMap<String, ConsumerEntry>) -> Result<(), StorageError> {
    let file = ConsumersFile {
        version: CONSUMERS_VERSION,
        consumers: consumers.clone(),
    };
    crate::durable::write_json(path, &file)
        .map_err(|e| StorageError::io(format!("cannot write {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumers::position::Position;

    #[test]
    fn round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".consumers.json");
        assert!(load(&path).unwrap().is_empty());
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
        save(&path, &m).unwrap();
        assert_eq!(load(&path).unwrap(), m);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            r#"{"version":1,"consumers":{"billing":{"positions":{"eu1":{"generation":0,"index":42,"offset":4096}}}}}"#
        );
    }
}
