//! Whether the data_dir's file system has room for another message: Postfix's
//! `queue_minfree`. Without it a full disk was noticed only at the end of DATA, after the
//! client had sent the whole message, to be told `451` and send it all again later.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// How long one look at the free space stands (a `statvfs` per second at most).
const RECHECK_MS: u64 = 1000;

/// The free-space check the sessions of one server share; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct FreeSpace(Option<Arc<Watched>>);

#[derive(Debug)]
struct Watched {
    path: PathBuf,
    min_free: u64,
    start: Instant,
    /// Milliseconds after `start` of the last look, plus one (0: never looked).
    looked_at: AtomicU64,
    low: AtomicBool,
}

impl FreeSpace {
    /// Keeps `min_free` bytes free on the file system of `path`; 0 checks nothing.
    pub fn keep(path: PathBuf, min_free: u64) -> Self {
        if min_free == 0 {
            return Self(None);
        }
        Self(Some(Arc::new(Watched {
            path,
            min_free,
            start: Instant::now(),
            looked_at: AtomicU64::new(0),
            low: AtomicBool::new(false),
        })))
    }

    /// Whether less than the minimum is free: looked up at most once a second. A file
    /// system that cannot be asked counts as having room (the store's own errors remain).
    pub fn is_low(&self) -> bool {
        let Some(w) = &self.0 else {
            return false;
        };
        let now = w.start.elapsed().as_millis() as u64 + 1;
        let last = w.looked_at.load(Ordering::Relaxed);
        // `last` may be ahead of `now`: another session read the clock after this one.
        if last != 0 && now.saturating_sub(last) < RECHECK_MS {
            return w.low.load(Ordering::Relaxed);
        }
        // One session looks; the others take the last answer meanwhile.
        if w.looked_at
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return w.low.load(Ordering::Relaxed);
        }
        let free = match rustix::fs::statvfs(&w.path) {
            Ok(s) => s.f_bavail.saturating_mul(s.f_frsize),
            Err(_) => u64::MAX,
        };
        let low = free < w.min_free;
        if w.low.swap(low, Ordering::Relaxed) != low {
            if low {
                tracing::warn!(
                    path = %w.path.display(),
                    free,
                    min_free = w.min_free,
                    "free space below [smtp] min_free_space: MAIL gets 452 4.3.1 until there is room"
                );
            } else {
                tracing::info!(path = %w.path.display(), free, "free space back: mail is taken again");
            }
        }
        low
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimum_no_disk_has_is_low_and_none_is_never() {
        let dir = tempfile::TempDir::new().unwrap();
        assert!(FreeSpace::keep(dir.path().to_path_buf(), u64::MAX).is_low());
        assert!(!FreeSpace::keep(dir.path().to_path_buf(), 1).is_low());
        assert!(!FreeSpace::keep(dir.path().to_path_buf(), 0).is_low());
        assert!(!FreeSpace::default().is_low());
        // A path that cannot be asked does not refuse mail.
        assert!(!FreeSpace::keep("/no/such/dir".into(), u64::MAX).is_low());
    }

    #[test]
    fn a_look_stamped_after_this_callers_clock_reading_is_taken_as_fresh() {
        // Another session read the clock later and stamped its look first.
        let dir = tempfile::TempDir::new().unwrap();
        let space = FreeSpace::keep(dir.path().to_path_buf(), 1);
        let w = space.0.as_ref().unwrap();
        w.looked_at.store(
            w.start.elapsed().as_millis() as u64 + 60_000,
            Ordering::Relaxed,
        );
        assert!(!space.is_low());
    }
}
