//! The data directory lock: `<data>/.lock`, held with `flock` for the life of
//! the process, holding the owner's pid for the error message of a second
//! server. The kernel releases it when the process dies, even by SIGKILL.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::Path;

use super::StorageError;

/// Name of the lock file inside the data directory.
pub const LOCK_FILE: &str = ".lock";

/// Holds the data directory lock until dropped.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock or explains who holds it.
    pub fn acquire(dir: &Path) -> Result<Self, StorageError> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| {
                StorageError::io(format!("cannot open lock file {}", path.display()), e)
            })?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(StorageError::Locked {
                    dir: dir.to_owned(),
                    pid: (!pid.is_empty()).then(|| pid.to_owned()),
                });
            }
            Err(TryLockError::Error(e)) => {
                return Err(StorageError::io(
                    format!("cannot lock {}", path.display()),
                    e,
                ));
            }
        }
        let write_pid = |file: &mut File| -> std::io::Result<()> {
            file.set_len(0)?;
            file.rewind()?;
            writeln!(file, "{}", std::process::id())
        };
        write_pid(&mut file).map_err(|e| {
            StorageError::io(format!("cannot write lock file {}", path.display()), e)
        })?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path()).unwrap();
        let err = DirLock::acquire(dir.path()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("in use by another chunkbus process"), "{msg}");
        assert!(msg.contains(&std::process::id().to_string()), "{msg}");
        drop(first);
        DirLock::acquire(dir.path()).unwrap();
    }
}
