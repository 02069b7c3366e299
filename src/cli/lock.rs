//! One `mailtrail serve` per data_dir. Two servers on one store both deliver every queued
//! message (each scans the queue and knows nothing of the other's work in flight: a review
//! saw 44 deliveries for 22 recipients), so `serve` holds an exclusive lock on
//! `data_dir/mailtrail.lock` for its whole life, as Postfix's master holds its pid file,
//! and one on the data_dir directory itself: a lock file removed by hand (and made anew
//! by the next start) let a second server in beside the first, which delivered every
//! message twice; the directory cannot go while it holds the store. The CLI commands do
//! not take either: they run beside the server by design.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Write};
use std::path::Path;

/// The lock file's name in data_dir.
pub const LOCK_FILE: &str = "mailtrail.lock";

/// The held lock; released when dropped (or when the process ends, however it ends: the
/// kernel drops a `flock` with its last descriptor, so a `kill -9` leaves no stale lock).
#[derive(Debug)]
pub struct DataDirLock {
    _dir: File,
    _file: File,
}

/// Takes the lock of `data_dir` (which must exist) without waiting, and writes our pid into
/// the file for the message a second server shows. Fails at once when another process holds it.
pub fn acquire(data_dir: &Path) -> anyhow::Result<DataDirLock> {
    let path = data_dir.join(LOCK_FILE);
    let in_use = |who: String| {
        anyhow::anyhow!(
            "data_dir {} is in use by another mailtrail serve ({who}): run one server per \
             data_dir",
            data_dir.display()
        )
    };
    let holds = |holder: String| format!("{holder} holds {}", path.display());
    let dir = File::open(data_dir)
        .map_err(|e| anyhow::anyhow!("cannot open data_dir {}: {e}", data_dir.display()))?;
    match dir.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            // The lock file names the holder, unless it was removed by hand.
            let who = File::open(&path).map_or_else(
                |_| format!("its pid is unknown: {} was removed", path.display()),
                |mut f| holds(holder(&mut f)),
            );
            return Err(in_use(who));
        }
        Err(TryLockError::Error(e)) => {
            anyhow::bail!("cannot lock data_dir {}: {e}", data_dir.display())
        }
    }
    // Not truncated on open: the file may be the holder's, whose pid we want to show.
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot open the lock file {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Err(in_use(holds(holder(&mut file)))),
        Err(TryLockError::Error(e)) => {
            anyhow::bail!("cannot lock {}: {e}", path.display())
        }
    }
    if let Err(e) = write_pid(&mut file) {
        // The lock is what matters; the pid only makes a second start's message clearer.
        tracing::warn!(path = %path.display(), error = %e, "cannot write our pid into the lock file");
    }
    Ok(DataDirLock {
        _dir: dir,
        _file: file,
    })
}

fn write_pid(file: &mut File) -> std::io::Result<()> {
    file.set_len(0)?;
    file.write_all(format!("{}\n", std::process::id()).as_bytes())
}

/// `pid N` as the holder wrote it, or `a process` when it has not yet (or could not).
fn holder(file: &mut File) -> String {
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    match text.trim().parse::<u32>() {
        Ok(pid) => format!("pid {pid}"),
        Err(_) => "a process".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_data_dir_is_refused_naming_it_and_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let held = acquire(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap();
        assert_eq!(text, format!("{}\n", std::process::id()));
        // A lock belongs to an open file, so a second one in this process conflicts as a
        // second process would.
        let err = acquire(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        assert!(
            err.contains(&format!("pid {} holds", std::process::id())),
            "{err}"
        );
        drop(held);
        acquire(dir.path()).expect("free again once the holder is gone");
    }

    #[test]
    fn a_lock_file_removed_by_hand_lets_no_second_server_in() {
        let dir = tempfile::tempdir().unwrap();
        let _held = acquire(dir.path()).unwrap();
        std::fs::remove_file(dir.path().join(LOCK_FILE)).unwrap();
        let err = acquire(dir.path()).unwrap_err().to_string();
        assert!(err.contains("in use by another mailtrail serve"), "{err}");
        assert!(err.contains("its pid is unknown"), "{err}");
    }
}
