//! Whether the database and its log are still the files a restart would open. A deleted
//! (or replaced) file stays writable through the descriptors SQLite holds, so commits and
//! fsyncs succeed into a file nobody can reach: without this check, mail acknowledged after
//! `rm -r data_dir` was lost at the next start while `/healthz` said ok.

use std::fs::{File, Metadata};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::store::StoreError;

/// What tells one file from another: an inode on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(m: &Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
        }
    }
}

/// The database file, its write-ahead log and its shared-memory index as the store opened
/// them. The index counts too: a process that opens the database after `-shm` was deleted
/// (`mailtrail queue delete` beside the server) makes a new one, the two index the log
/// differently, and the file was seen to become malformed within seconds.
pub(crate) struct StoreFiles {
    db: PathBuf,
    db_id: FileId,
    wal: PathBuf,
    wal_id: FileId,
    shm: PathBuf,
    shm_id: FileId,
}

impl StoreFiles {
    /// `db` as its path names it now (call it right after SQLite opened it: SQLite does not
    /// hand out its descriptor), the log as the handle the syncer fsyncs.
    /// `shm` is there from the first read of a connection in WAL mode (the migration's).
    pub(crate) fn new(
        db: &Path,
        wal_path: &Path,
        wal: &File,
        shm: &Path,
    ) -> Result<Self, StoreError> {
        let stat_error = |path: &Path, e: std::io::Error| {
            StoreError::Storage(format!("cannot stat {}: {e}", path.display()))
        };
        let db_id = std::fs::metadata(db).map_err(|e| stat_error(db, e))?;
        let wal_id = wal.metadata().map_err(|e| stat_error(wal_path, e))?;
        let shm_id = std::fs::metadata(shm).map_err(|e| stat_error(shm, e))?;
        Ok(Self {
            db: db.to_path_buf(),
            db_id: FileId::of(&db_id),
            wal: wal_path.to_path_buf(),
            wal_id: FileId::of(&wal_id),
            shm: shm.to_path_buf(),
            shm_id: FileId::of(&shm_id),
        })
    }

    /// `Err(reason)` when a path no longer names the file the store uses. Three `stat`s; the
    /// syncer runs it once per fsync, which covers a whole group of commits.
    pub(crate) fn check(&self) -> Result<(), String> {
        const LOST: &str = "what the store writes now would be lost at the next start";
        still_there(&self.db, self.db_id, LOST)?;
        still_there(&self.wal, self.wal_id, LOST)?;
        still_there(
            &self.shm,
            self.shm_id,
            "a mailtrail command opening the database now would index its log apart from \
             this server and damage it",
        )
    }
}

fn still_there(path: &Path, id: FileId, consequence: &str) -> Result<(), String> {
    let what = match std::fs::metadata(path) {
        Ok(m) if FileId::of(&m) == id => return Ok(()),
        Ok(_) => "was replaced by another file".to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "was deleted".to_string(),
        // Whatever hides the file (a directory made unreadable) hides it from a restart too.
        Err(e) => format!("cannot be checked ({e})"),
    };
    Err(format!(
        "{} {what} while mailtrail ran: {consequence}, so it accepts no more writes until \
         mailtrail is restarted",
        path.display()
    ))
}
