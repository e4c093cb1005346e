//! Small files written whole and atomically: a temp file beside the target
//! (`<name>.tmp`), fsync, rename over the target, fsync of the directory.
//! A crash leaves the old file or the new one, never a mix; a leftover temp
//! file is overwritten by the next write and ignored by every reader.
//! Used for the category state, consumer positions, the upload log's
//! compaction, multipart progress and the shipper's registry.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically and durably, creating its directory
/// if needed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = tmp_path(path);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Writes `value` as JSON to `path` (see [`write_atomic`]).
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    write_atomic(
        path,
        &serde_json::to_vec(value).map_err(std::io::Error::other)?,
    )
}

/// `<path>.tmp`.
fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".tmp");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_whole_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join(".state.json");
        write_json(&path, &serde_json::json!({"version": 1})).unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [".state.json"]);
        assert_eq!(tmp_path(&path).file_name().unwrap(), ".state.json.tmp");
    }
}
