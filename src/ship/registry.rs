//! The shipper's durable registry: where it stopped in every file.
//!
//! ```json
//! {"version":1,"files":[{"path":"/var/log/app.log","dev":2049,"inode":1234,"fingerprint":"7b2274...","offset":4096}]}
//! ```
//!
//! A file is recognised by device and inode, and its fingerprint (the hex of
//! its first bytes, up to [`FINGERPRINT_BYTES`]) guards against an inode
//! reused by another file. `offset` only moves past lines the server has
//! acknowledged. Written atomically (temp, fsync, rename, fsync of the dir).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Bytes of a file's start kept as its fingerprint.
pub const FINGERPRINT_BYTES: usize = 64;
const REGISTRY_VERSION: u32 = 1;

/// One file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Last path it was seen at.
    pub path: PathBuf,
    /// Device id.
    pub dev: u64,
    /// Inode number.
    pub inode: u64,
    /// Hex of the first bytes.
    pub fingerprint: String,
    /// Acknowledged up to here.
    pub offset: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    version: u32,
    files: Vec<FileEntry>,
}

/// Loads the registry at `path` (empty when absent).
pub fn load(path: &Path) -> Result<Vec<FileEntry>, String> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let r: RegistryFile = serde_json::from_slice(&bytes)
                .map_err(|e| format!("registry {} is not valid: {e}", path.display()))?;
            if r.version != REGISTRY_VERSION {
                return Err(format!(
                    "registry {} has version {}, this build reads {REGISTRY_VERSION}",
                    path.display(),
                    r.version
                ));
            }
            Ok(r.files)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(format!("cannot read registry {}: {e}", path.display())),
    }
}

/// Writes the registry at `path` atomically.
pub fn save(path: &Path, files: &[FileEntry]) -> Result<(), String> {
    let body = RegistryFile {
        version: REGISTRY_VERSION,
        files: files.to_vec(),
    };
    crate::durable::write_json(path, &body)
        .map_err(|e| format!("cannot write registry {}: {e}", path.display()))
}

/// Hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// True when two fingerprints agree on their common prefix (a file that
/// was shorter than [`FINGERPRINT_BYTES`] when first seen may have grown).
pub fn same_start(a: &str, b: &str) -> bool {
    let n = a.len().min(b.len());
    a[..n] == b[..n]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reg.json");
        assert!(load(&path).unwrap().is_empty());
        let files = vec![FileEntry {
            path: "/var/log/a".into(),
            dev: 1,
            inode: 2,
            fingerprint: hex(b"ab"),
            offset: 3,
        }];
        save(&path, &files).unwrap();
        assert_eq!(load(&path).unwrap(), files);
        assert!(same_start("6162", "616263"));
        assert!(!same_start("6162", "6163"));
    }
}
