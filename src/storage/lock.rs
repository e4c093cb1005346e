//! The data directory lock: `<data>/.lock`, held with `flock` for the life of
//! the process, holding the owner's pid for the error message of a second
//! server. The kernel releases it when the process dies, even by SIGKILL.
//!
//! A lock is held by an open file description, and a child process shares
//! the parent's until it calls `exec` (which closes it: the file is
//! close-on-exec). So a process that releases the lock while another of its
//! threads starts a program, and takes it again at once (a restart inside
//! one process, as tests do), may find it still held for that moment. A
//! lock file naming this very process, for a directory this process does not
//! hold, is that case: it is tried again for a short while.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::StorageError;

/// Name of the lock file inside the data directory.
pub const LOCK_FILE: &str = ".lock";

/// How long a lock that only a starting child of this process holds is
/// tried again (a child holds it until its `exec`, normally microseconds).
const INHERITED_LOCK_WAIT: Duration = Duration::from_secs(2);

/// Data directories this process holds, by canonical path.
static HELD: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// Holds the data directory lock until dropped.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    /// Key in `HELD`.
    held: PathBuf,
}

impl DirLock {
    /// Takes the lock or explains who holds it. Blocks for a moment at most
    /// (see the module documentation).
    pub fn acquire(dir: &Path) -> Result<Self, StorageError> {
        let started = Instant::now();
        Self::acquire_with(dir, || {
            let again = started.elapsed() < INHERITED_LOCK_WAIT;
            if again {
                std::thread::sleep(Duration::from_millis(5));
            }
            again
        })
    }

    /// `acquire`, calling `wait` each time the lock is held by a child of
    /// this process only; it answers whether to try again.
    fn acquire_with(dir: &Path, mut wait: impl FnMut() -> bool) -> Result<Self, StorageError> {
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
        let held = dir.canonicalize().map_err(|e| {
            StorageError::io(
                format!("cannot resolve data directory {}", dir.display()),
                e,
            )
        })?;
        let own_pid = std::process::id().to_string();
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) => {
                    let mut pid = String::new();
                    let _ = file.rewind();
                    let _ = file.read_to_string(&mut pid);
                    let pid = pid.trim();
                    if pid == own_pid && !lock_held().contains(&held) && wait() {
                        continue;
                    }
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
        }
        let write_pid = |file: &mut File| -> std::io::Result<()> {
            file.set_len(0)?;
            file.rewind()?;
            writeln!(file, "{own_pid}")
        };
        write_pid(&mut file).map_err(|e| {
            StorageError::io(format!("cannot write lock file {}", path.display()), e)
        })?;
        lock_held().insert(held.clone());
        Ok(Self { _file: file, held })
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // Before the file closes: a new holder registers only after its
        // flock succeeded, which is after this.
        lock_held().remove(&self.held);
    }
}

fn lock_held() -> std::sync::MutexGuard<'static, BTreeSet<PathBuf>> {
    HELD.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
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

    #[test]
    fn a_lock_only_a_starting_child_holds_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path()).unwrap();
        // What a child between fork and exec holds: another descriptor of
        // the same open file description, here one the test can close.
        let mut inherited = Some(first._file.try_clone().unwrap());
        drop(first);
        let mut waits = 0;
        let lock = DirLock::acquire_with(dir.path(), || {
            waits += 1;
            // The child execs: its copy closes.
            inherited = None;
            true
        });
        lock.unwrap();
        assert_eq!(waits, 1);
    }

    #[test]
    fn a_lock_this_process_holds_is_not_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let _first = DirLock::acquire(dir.path()).unwrap();
        let err = DirLock::acquire_with(dir.path(), || panic!("waited")).unwrap_err();
        assert!(matches!(err, StorageError::Locked { .. }), "{err}");
    }
}
