//! One process per data directory: an advisory lock on `sluice.lock`, held for the store's life.
//!
//! Two processes on one SQLite file would each run crash recovery on the other's live runs and
//! interleave their writes. The lock is taken before the database is opened, so a second
//! process changes nothing; the holder's PID is written into the file so that the refusal can
//! name it. The lock is the kernel's (`flock`): it goes with the process, however it dies.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use crate::StoreError;

/// The data directory's lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock on `dir` (created if missing), or says which process holds it.
    pub fn acquire(dir: &Path) -> Result<DirLock, StoreError> {
        let data_dir = |source| StoreError::DataDir {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(data_dir)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("sluice.lock"))
            .map_err(data_dir)?;
        match file.try_lock() {
            Ok(()) => {
                // Only the holder writes: the PID of a process that died is simply overwritten.
                let pid = format!("{}\n", std::process::id());
                file.set_len(0)
                    .and_then(|()| file.seek(SeekFrom::Start(0)))
                    .and_then(|_| file.write_all(pid.as_bytes()))
                    .map_err(data_dir)?;
                Ok(DirLock { _file: file })
            }
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let pid = file
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| text.trim().parse().ok());
                Err(StoreError::Locked {
                    path: dir.display().to_string(),
                    pid,
                })
            }
            Err(TryLockError::Error(e)) => Err(data_dir(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused_and_names_the_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = DirLock::acquire(dir.path()).expect("first lock");
        match DirLock::acquire(dir.path()) {
            Err(StoreError::Locked { path, pid }) => {
                assert_eq!(path, dir.path().display().to_string());
                assert_eq!(pid, Some(std::process::id()));
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(first);
        DirLock::acquire(dir.path()).expect("free again once the holder is gone");
    }
}
