//! The suppression list in memory, for the RCPT-time check: a lookup per recipient must not
//! cost a database round trip (measured: ~75 µs of CPU per message through the blocking pool,
//! a third of the accept path). The list changes rarely; the store keeps a version number
//! that moves on every change (SQLite triggers, so changes by `mailtrail suppress` in another
//! process count too). The cache asks for that number at most every [`RECHECK`] and reloads
//! the list only when it moved.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::store::{Store, StoreError, Suppression};

/// How stale the cache may be for changes made by another process. Changes made in this
/// process (bounce ingest) call [`SuppressionCache::invalidate`] and count at once.
pub const RECHECK: Duration = Duration::from_millis(500);

type Entries = Arc<HashMap<String, Suppression>>;

pub struct SuppressionCache {
    store: Arc<dyn Store>,
    entries: RwLock<Entries>,
    /// Version of the loaded list; `i64::MIN` before the first load.
    version: AtomicI64,
    /// When the version was last asked for; `None` forces a check.
    checked_at: Mutex<Option<Instant>>,
    /// One refresher at a time; the others keep answering from the current list.
    refresh: tokio::sync::Mutex<()>,
}

/// An address as the list is looked up by: lowercased, an IDN domain in its Unicode form
/// (so `dave@xn--bcher-kva.test` and `dave@bücher.test` are one entry, RFC 5890).
fn key(address: &str) -> String {
    let lower = address.trim().to_lowercase();
    crate::store::idn_unicode_spelling(&lower).unwrap_or(lower)
}

/// The live entry for `address` in `entries` at `now_ms` (expired entries do not count).
pub fn live_entry<'a>(
    entries: &'a HashMap<String, Suppression>,
    address: &str,
    now_ms: i64,
) -> Option<&'a Suppression> {
    entries
        .get(&key(address))
        .filter(|s| s.expires_at_ms.is_none_or(|e| e > now_ms))
}

impl SuppressionCache {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            entries: RwLock::new(Arc::new(HashMap::new())),
            version: AtomicI64::new(i64::MIN),
            checked_at: Mutex::new(None),
            refresh: tokio::sync::Mutex::new(()),
        }
    }

    /// Makes the next lookup check the store's version (after a change in this process).
    pub fn invalidate(&self) {
        if let Ok(mut at) = self.checked_at.lock() {
            *at = None;
        }
    }

    fn check_due(&self) -> bool {
        self.checked_at
            .lock()
            .map(|at| at.is_none_or(|t| t.elapsed() >= RECHECK))
            .unwrap_or(true)
    }

    async fn refresh_if_due(&self) -> Result<(), StoreError> {
        if !self.check_due() {
            return Ok(());
        }
        let _one = self.refresh.lock().await;
        if !self.check_due() {
            return Ok(());
        }
        let version = self.store.suppression_version().await?;
        if version != self.version.load(Ordering::Acquire) {
            let now = chrono::Utc::now().timestamp_millis();
            let list = self.store.suppression_list(now).await?;
            let map: HashMap<String, Suppression> =
                list.into_iter().map(|s| (key(&s.address), s)).collect();
            if let Ok(mut entries) = self.entries.write() {
                *entries = Arc::new(map);
            }
            self.version.store(version, Ordering::Release);
        }
        if let Ok(mut at) = self.checked_at.lock() {
            *at = Some(Instant::now());
        }
        Ok(())
    }

    /// The live suppression entry for `address`, if any.
    pub async fn lookup(
        &self,
        address: &str,
        now_ms: i64,
    ) -> Result<Option<Suppression>, StoreError> {
        self.refresh_if_due().await?;
        let entries: Entries = match self.entries.read() {
            Ok(e) => e.clone(),
            Err(_) => return Err(StoreError::Storage("suppression cache poisoned".into())),
        };
        Ok(live_entry(&entries, address, now_ms).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(address: &str, expires: Option<i64>) -> Suppression {
        Suppression {
            address: address.into(),
            reason: "userunknown".into(),
            source: "bounce".into(),
            first_at_ms: 0,
            last_at_ms: 0,
            count: 1,
            expires_at_ms: expires,
        }
    }

    #[test]
    fn lookup_is_case_insensitive_and_ignores_expired_entries() {
        let map: HashMap<String, Suppression> = [
            entry("Gone@Example.org", None),
            entry("old@example.org", Some(1_000)),
        ]
        .into_iter()
        .map(|s| (key(&s.address), s))
        .collect();
        assert!(live_entry(&map, "gone@EXAMPLE.org", 5_000).is_some());
        assert!(live_entry(&map, "old@example.org", 999).is_some());
        assert!(live_entry(&map, "old@example.org", 1_000).is_none());
        assert!(live_entry(&map, "other@example.org", 0).is_none());
    }

    #[tokio::test]
    async fn an_idn_domain_is_one_entry_in_either_spelling() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            crate::store::sqlite::SqliteStore::open_path(&dir.path().join("t.db")).unwrap(),
        );
        let cache = SuppressionCache::new(store.clone());
        store
            .suppress(entry("dave@B\u{dc}cher.test", None))
            .await
            .unwrap();
        store
            .suppress(entry("eve@xn--bcher-kva.test", None))
            .await
            .unwrap();
        cache.invalidate();
        for (address, other) in [
            ("dave@xn--bcher-kva.test", "dave@b\u{fc}cher.test"),
            ("eve@b\u{fc}cher.test", "eve@XN--BCHER-KVA.test"),
        ] {
            // At RCPT (the cache) and by `suppress check` (the store).
            assert!(
                cache.lookup(address, 0).await.unwrap().is_some(),
                "{address}"
            );
            assert!(cache.lookup(other, 0).await.unwrap().is_some(), "{other}");
            assert!(
                store.suppressed(address, 0).await.unwrap().is_some(),
                "{address}"
            );
            assert!(
                store.suppressed(other, 0).await.unwrap().is_some(),
                "{other}"
            );
        }
        // Removed under the other spelling, it is gone.
        assert!(store.unsuppress("dave@xn--bcher-kva.test").await.unwrap());
        assert!(
            store
                .suppressed("dave@b\u{fc}cher.test", 0)
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(crate::store::other_idn_spelling("a@example.org"), None);
        assert_eq!(crate::store::other_idn_spelling("a@[192.0.2.1]"), None);
    }

    #[tokio::test]
    async fn reloads_when_the_store_version_moves_and_not_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            crate::store::sqlite::SqliteStore::open_path(&dir.path().join("t.db")).unwrap(),
        );
        let cache = SuppressionCache::new(store.clone());
        assert!(cache.lookup("a@example.org", 0).await.unwrap().is_none());
        let v0 = store.suppression_version().await.unwrap();
        store.suppress(entry("a@example.org", None)).await.unwrap();
        assert_ne!(store.suppression_version().await.unwrap(), v0);
        // Within RECHECK the cache may still answer from the old list; after invalidate (what
        // the bounce stage does) it must see the change.
        cache.invalidate();
        assert!(cache.lookup("A@example.org", 0).await.unwrap().is_some());
        store.unsuppress("a@example.org").await.unwrap();
        cache.invalidate();
        assert!(cache.lookup("a@example.org", 0).await.unwrap().is_none());
    }
}
