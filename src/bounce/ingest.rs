//! Returned mail → stored bounce records: correlation with the message we sent, the
//! recipient's status change, the suppression list and metrics.
//!
//! Correlation, in order of trust: the VERP address the bounce was sent to (MAC verified
//! before the mail was even accepted), our receipt id in the returned message's `Received:`
//! header, its `Message-ID`, its ENVID. A record that matches nothing is still stored under
//! its recipient address, so it can be found by address.

use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{BounceKind, BounceRecord, BounceType, Classifier, verp};
use crate::config::Config;
use crate::metrics::{BounceLabel, Metrics};
use crate::receipt::ReceiptId;
use crate::store::{
    BounceFacts, Correlation, LogKey, LogQuery, NewBounce, RecipientStatus, Store, StoreError,
    Suppression,
};

/// Where a record was matched: the message and recipient index it is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Match {
    pub receipt: ReceiptId,
    pub rcpt_index: Option<u32>,
    pub correlation: Correlation,
}

/// What one stored record turned into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ingested {
    pub bounce_id: i64,
    pub recipient: String,
    pub reason: String,
    pub bounce_type: String,
    pub correlation: Correlation,
    pub receipt: Option<ReceiptId>,
    pub suppressed: bool,
}

/// The recipient status a record moves its matched recipient to: a failed DSN or prose
/// bounce → `bounced`, a complaint → `complained`; auto-replies and delay notices leave it.
pub fn new_status(record: &BounceRecord) -> Option<RecipientStatus> {
    match record.kind {
        BounceKind::Arf => Some(RecipientStatus::Complained),
        BounceKind::Autoreply => None,
        BounceKind::Dsn | BounceKind::Heuristic => {
            let delayed = record
                .action
                .as_deref()
                .is_some_and(|a| a.eq_ignore_ascii_case("delayed"));
            let not_failure = matches!(
                record.bounce_type,
                BounceType::Autoreply | BounceType::Complaint
            ) || record.reason == super::BounceReason::Delivered;
            (!delayed && !not_failure).then_some(RecipientStatus::Bounced)
        }
    }
}

/// Whether a record puts its address on the suppression list right away: hard bounces and
/// complaints do; soft ones only after a run (see [`soft_run_reached`]).
pub fn suppresses_at_once(record: &BounceRecord) -> bool {
    matches!(record.bounce_type, BounceType::Hard | BounceType::Complaint)
        && new_status(record).is_some()
}

/// True when the newest `threshold` bounce types (newest first) are all soft: N soft bounces
/// in a row, with no hard one or other kind in between.
pub fn soft_run_reached(recent_newest_first: &[String], threshold: u32) -> bool {
    threshold > 0
        && recent_newest_first.len() >= threshold as usize
        && recent_newest_first
            .iter()
            .take(threshold as usize)
            .all(|t| t == "soft")
}

/// Turns parsed records into stored bounces, matched against what we sent.
pub struct BounceIngest {
    config: Arc<Config>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    classifier: Arc<Classifier>,
    verp_key: Option<Vec<u8>>,
    /// Told when this stage suppresses an address, so the next RCPT sees it at once.
    suppressions: Option<Arc<crate::checks::SuppressionCache>>,
}

impl BounceIngest {
    pub fn new(
        config: Arc<Config>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        classifier: Arc<Classifier>,
        verp_key: Option<Vec<u8>>,
    ) -> Self {
        Self {
            config,
            store,
            metrics,
            classifier,
            verp_key,
            suppressions: None,
        }
    }

    /// Invalidates `cache` whenever this stage adds to the suppression list.
    pub fn on_suppress(mut self, cache: Arc<crate::checks::SuppressionCache>) -> Self {
        self.suppressions = Some(cache);
        self
    }

    /// Parses one returned message and stores a bounce per record, all in one commit
    /// together with the suppressions they add and, when `source` (its own receipt, when it
    /// arrived over SMTP) is given, the mark that it is processed. `envelope_recipients` are
    /// the addresses it was sent to (VERP addresses at the bounce domain).
    pub async fn ingest(
        &self,
        raw: &[u8],
        envelope_recipients: &[String],
        source: Option<ReceiptId>,
    ) -> Result<Vec<Ingested>, StoreError> {
        let records = super::parse_with(raw, &self.classifier);
        let verp_tag = self.verp_tag(envelope_recipients);
        let now = chrono::Utc::now().timestamp_millis();
        let mut bounces: Vec<NewBounce> = Vec::with_capacity(records.len());
        for record in &records {
            let matched = self.correlate(record, verp_tag).await?;
            let suppress = self.suppression(record, &bounces, now).await?;
            bounces.push(new_bounce(record, matched, source, suppress, now));
        }
        let ids = self.store.record_bounces(bounces.clone(), source).await?;
        if bounces.iter().any(|b| b.suppress.is_some())
            && let Some(cache) = &self.suppressions
        {
            cache.invalidate();
        }
        Ok(ids
            .into_iter()
            .zip(bounces)
            .map(|(bounce_id, b)| self.recorded(bounce_id, b))
            .collect())
    }

    /// Counts and logs a committed bounce.
    fn recorded(&self, bounce_id: i64, b: NewBounce) -> Ingested {
        let f = b.facts;
        self.metrics
            .bounces
            .get_or_create(&BounceLabel {
                reason: f.reason.clone(),
                bounce_type: f.bounce_type.clone(),
            })
            .inc();
        if f.kind == BounceKind::Arf.as_str() {
            self.metrics.complaints.inc();
        }
        if f.correlation == Correlation::Unmatched {
            self.metrics.unmatched_bounces.inc();
        }
        let suppressed = b.suppress.is_some();
        tracing::info!(
            recipient = %f.recipient, reason = %f.reason, bounce_type = %f.bounce_type,
            correlation = ?f.correlation, receipt = ?f.receipt.map(|r| r.to_string()), suppressed,
            "bounce recorded"
        );
        Ingested {
            bounce_id,
            recipient: f.recipient,
            reason: f.reason,
            bounce_type: f.bounce_type,
            correlation: f.correlation,
            receipt: f.receipt,
            suppressed,
        }
    }

    fn verp_tag(&self, envelope_recipients: &[String]) -> Option<verp::VerpTag> {
        let key = self.verp_key.as_deref()?;
        let d = &self.config.delivery;
        envelope_recipients
            .iter()
            .find_map(|a| verp::decode(key, &d.bounce_local_part, &d.bounce_domain, a).ok())
    }

    async fn correlate(
        &self,
        record: &BounceRecord,
        verp_tag: Option<verp::VerpTag>,
    ) -> Result<Option<Match>, StoreError> {
        let addresses: Vec<&str> = std::iter::once(record.recipient.as_str())
            .chain(record.original_recipient.as_deref())
            .filter(|a| !a.is_empty())
            .collect();
        if let Some(tag) = verp_tag {
            // The VERP address names the recipient even when the bounce reports a forwarded
            // or rewritten address.
            let idx = self
                .index_in(tag.receipt, &addresses)
                .await?
                .unwrap_or(tag.rcpt_index);
            return Ok(Some(Match {
                receipt: tag.receipt,
                rcpt_index: Some(idx),
                correlation: Correlation::Verp,
            }));
        }
        let mut candidates: Vec<(ReceiptId, Correlation)> = Vec::new();
        if let Some(r) = record.receipt {
            candidates.push((r, Correlation::ReceiptHeader));
        }
        if let Some(id) = record.message_id.as_deref()
            && let Some(r) = self.store.find_by_message_id(trim_angle(id)).await?
        {
            candidates.push((r, Correlation::MessageId));
        }
        if let Some(envid) = record.envid.as_deref()
            && let Some(r) = self.store.find_by_envid(envid).await?
        {
            candidates.push((r, Correlation::Envid));
        }
        for (receipt, correlation) in candidates {
            if let Some(idx) = self.index_in(receipt, &addresses).await? {
                return Ok(Some(Match {
                    receipt,
                    rcpt_index: Some(idx),
                    correlation,
                }));
            }
        }
        Ok(None)
    }

    /// The index of the first of `addresses` among the recipients of `receipt`.
    async fn index_in(
        &self,
        receipt: ReceiptId,
        addresses: &[&str],
    ) -> Result<Option<u32>, StoreError> {
        for a in addresses {
            if let Some(i) = self.store.find_recipient(receipt, a).await? {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    /// The suppression-list entry `record` adds, if any. A soft bounce counts toward the
    /// run with the stored bounces of its address and those of `earlier`, the records of the
    /// same message stored with it.
    async fn suppression(
        &self,
        record: &BounceRecord,
        earlier: &[NewBounce],
        now: i64,
    ) -> Result<Option<Suppression>, StoreError> {
        let s = &self.config.suppression;
        if !s.enabled || record.recipient.is_empty() || !record.recipient.contains('@') {
            return Ok(None);
        }
        let suppress = if suppresses_at_once(record) {
            true
        } else if record.bounce_type == BounceType::Soft && new_status(record).is_some() {
            let since =
                now.saturating_sub(i64::try_from(s.soft_window.as_millis()).unwrap_or(i64::MAX));
            let stored = self
                .store
                .recent_bounce_types(&record.recipient, since)
                .await?;
            // Newest first: this record, the same message's earlier ones, then the store's.
            let recent: Vec<String> = std::iter::once(record.bounce_type.as_str().to_string())
                .chain(
                    earlier
                        .iter()
                        .rev()
                        .filter(|b| b.facts.recipient.eq_ignore_ascii_case(&record.recipient))
                        .map(|b| b.facts.bounce_type.clone()),
                )
                .chain(stored)
                .collect();
            soft_run_reached(&recent, s.soft_bounce_threshold)
        } else {
            false
        };
        let expires_at_ms = (!s.expiry.is_zero())
            .then(|| now.saturating_add(i64::try_from(s.expiry.as_millis()).unwrap_or(i64::MAX)));
        Ok(suppress.then(|| Suppression {
            address: record.recipient.clone(),
            reason: record.reason.as_str().to_string(),
            source: if record.kind == BounceKind::Arf {
                "complaint".to_string()
            } else {
                "bounce".to_string()
            },
            first_at_ms: now,
            last_at_ms: now,
            count: 1,
            expires_at_ms,
        }))
    }

    /// Parses every inbound bounce message accepted over SMTP and not yet processed (also
    /// those accepted before a crash). One the store cannot give back or record is left
    /// pending for the next run and does not hold up the ones after it. Returns how many
    /// messages were processed.
    pub async fn process_pending(&self) -> Result<usize, StoreError> {
        let pending = self.store.pending_inbound_bounces().await?;
        let mut processed = 0;
        for receipt in pending {
            match self.process_one(receipt).await {
                Ok(()) => processed += 1,
                Err(e) => tracing::warn!(
                    %receipt,
                    error = %e,
                    "cannot process inbound bounce mail; the rest go on, it is tried again later"
                ),
            }
        }
        Ok(processed)
    }

    async fn process_one(&self, receipt: ReceiptId) -> Result<(), StoreError> {
        let body = match self.store.body(receipt).await {
            Ok(body) => body,
            Err(StoreError::NotFound(what)) => {
                // Nothing will ever be parsed: said once, and not asked for again.
                tracing::error!(%receipt, %what, "inbound bounce mail without a body; marked processed");
                return self.store.mark_inbound_processed(receipt).await;
            }
            Err(e) => return Err(e),
        };
        let envelope_recipients: Vec<String> = self
            .store
            .log(&LogQuery {
                key: LogKey::Receipt(receipt),
                since_ms: None,
                until_ms: None,
                limit: 1,
            })
            .await?
            .into_iter()
            .flat_map(|m| m.recipients.into_iter().map(|r| r.address))
            .collect();
        self.ingest(&body, &envelope_recipients, Some(receipt))
            .await
            .map(drop)
    }

    /// Runs [`BounceIngest::process_pending`] at start, whenever `wake` is notified, and
    /// every minute as a safety net, until `shutdown`.
    pub fn spawn(
        self: Arc<Self>,
        wake: Arc<Notify>,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                if let Err(e) = self.process_pending().await {
                    tracing::warn!(error = %e, "processing inbound bounces failed; will retry");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => {}
                }
            }
        })
    }
}

/// The bounce to store for `record`, matched (or not) to what we sent.
fn new_bounce(
    record: &BounceRecord,
    matched: Option<Match>,
    source: Option<ReceiptId>,
    suppress: Option<Suppression>,
    now: i64,
) -> NewBounce {
    NewBounce {
        facts: BounceFacts {
            at_ms: now,
            receipt: matched.map(|m| m.receipt),
            rcpt_index: matched.and_then(|m| m.rcpt_index),
            correlation: matched.map_or(Correlation::Unmatched, |m| m.correlation),
            recipient: record.recipient.clone(),
            kind: record.kind.as_str().to_string(),
            action: record.action.clone(),
            status: record.status.clone(),
            reply_code: record.reply_code,
            diagnostic: record.diagnostic.clone(),
            remote_mta: record.remote_mta.clone(),
            reporting_mta: record.reporting_mta.clone(),
            reason: record.reason.as_str().to_string(),
            bounce_type: record.bounce_type.as_str().to_string(),
            source_receipt: source,
        },
        new_status: matched.and(new_status(record)),
        suppress,
    }
}

fn trim_angle(id: &str) -> &str {
    id.trim().trim_start_matches('<').trim_end_matches('>')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bounce::BounceReason;

    fn record(kind: BounceKind, reason: BounceReason, bounce_type: BounceType) -> BounceRecord {
        let mut r = BounceRecord::new("a@example.org".into(), kind);
        r.reason = reason;
        r.bounce_type = bounce_type;
        r.action = Some("failed".into());
        r
    }

    #[test]
    fn failed_dsn_bounces_and_hard_ones_suppress() {
        let r = record(BounceKind::Dsn, BounceReason::UserUnknown, BounceType::Hard);
        assert_eq!(new_status(&r), Some(RecipientStatus::Bounced));
        assert!(suppresses_at_once(&r));
        let soft = record(BounceKind::Dsn, BounceReason::MailboxFull, BounceType::Soft);
        assert_eq!(new_status(&soft), Some(RecipientStatus::Bounced));
        assert!(!suppresses_at_once(&soft));
    }

    #[test]
    fn delay_notices_and_autoreplies_change_nothing() {
        let mut delayed = record(BounceKind::Dsn, BounceReason::Expired, BounceType::Soft);
        delayed.action = Some("delayed".into());
        assert_eq!(new_status(&delayed), None);
        assert!(!suppresses_at_once(&delayed));
        let auto = record(
            BounceKind::Autoreply,
            BounceReason::Vacation,
            BounceType::Autoreply,
        );
        assert_eq!(new_status(&auto), None);
        assert!(!suppresses_at_once(&auto));
    }

    #[test]
    fn complaints_complain_and_suppress() {
        let r = record(
            BounceKind::Arf,
            BounceReason::Feedback,
            BounceType::Complaint,
        );
        assert_eq!(new_status(&r), Some(RecipientStatus::Complained));
        assert!(suppresses_at_once(&r));
    }

    /// Inbound bounce mail for `bounces@bounce.example` with `body`, stored in `store`.
    async fn inbound(store: &crate::store::sqlite::SqliteStore, body: &str) -> ReceiptId {
        let mut msg =
            crate::test_support::accepted_message(&["bounces@bounce.example"], body.as_bytes());
        msg.envelope_sender = String::new();
        msg.inbound_bounce = true;
        let receipt = msg.receipt;
        store.accept(msg).await.unwrap();
        receipt
    }

    #[tokio::test]
    async fn one_unreadable_bounce_message_does_not_hold_up_the_others() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("mailtrail.db");
        let store = Arc::new(crate::store::sqlite::SqliteStore::open_path(&path).unwrap());
        let bounce = "From: MAILER-DAEMON@mx.example.net\r\nSubject: Undelivered Mail\r\n\r\n\
                      <gone@example.org>: host mx.example.org said: 550 5.1.1 User unknown\r\n";
        let damaged = inbound(&store, bounce).await;
        let gone = inbound(&store, bounce).await;
        let good = inbound(&store, bounce).await;
        // A body the store cannot read back (a BLOB turned into text), and one missing.
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute(
            "UPDATE bodies SET body = 'not a blob' WHERE receipt = ?1",
            [damaged.to_string()],
        )
        .unwrap();
        conn.execute("DELETE FROM bodies WHERE receipt = ?1", [gone.to_string()])
            .unwrap();
        let ingest = BounceIngest::new(
            Arc::new(Config::default()),
            store.clone(),
            Arc::new(Metrics::new()),
            Arc::new(Classifier::with_user_rules("").unwrap()),
            None,
        );

        assert_eq!(ingest.process_pending().await.unwrap(), 2);
        let bounces = store.bounces(&Default::default()).await.unwrap();
        assert_eq!(bounces.len(), 1, "{bounces:?}");
        assert_eq!(bounces[0].facts.source_receipt, Some(good));
        // The missing body is given up on; the unreadable one waits for the next run.
        assert_eq!(store.pending_inbound_bounces().await.unwrap(), [damaged]);
    }

    #[tokio::test]
    async fn a_bounce_message_is_stored_whole_or_not_at_all() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("mailtrail.db");
        let store = Arc::new(crate::store::sqlite::SqliteStore::open_path(&path).unwrap());
        let receipt = inbound(
            &store,
            "From: MAILER-DAEMON@mx.example.net\r\nSubject: Undelivered Mail\r\n\r\n\
             <gone@example.org>: host mx.example.org said: 550 5.1.1 User unknown\r\n\
             <also-gone@example.org>: host mx.example.org said: 550 5.1.1 User unknown\r\n",
        )
        .await;
        let ingest = BounceIngest::new(
            Arc::new(Config::default()),
            store.clone(),
            Arc::new(Metrics::new()),
            Arc::new(Classifier::with_user_rules("").unwrap()),
            None,
        );
        // The suppression list cannot be written: each record's bounce row could be, its
        // suppression not.
        let conn = rusqlite::Connection::open(&path).unwrap();
        let schema: String = conn
            .query_row(
                "SELECT sql FROM sqlite_master WHERE name = 'suppressions'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        conn.execute_batch("DROP TABLE suppressions").unwrap();

        assert_eq!(ingest.process_pending().await.unwrap(), 0);
        let none = store.bounces(&Default::default()).await.unwrap();
        assert!(none.is_empty(), "half a message stored: {none:?}");
        assert_eq!(store.pending_inbound_bounces().await.unwrap(), [receipt]);

        // Once the store takes writes again, the next run stores each record once.
        conn.execute_batch(&schema).unwrap();
        assert_eq!(ingest.process_pending().await.unwrap(), 1);
        let bounces = store.bounces(&Default::default()).await.unwrap();
        let mut recipients: Vec<&str> =
            bounces.iter().map(|b| b.facts.recipient.as_str()).collect();
        recipients.sort_unstable();
        assert_eq!(recipients, ["also-gone@example.org", "gone@example.org"]);
        assert!(store.pending_inbound_bounces().await.unwrap().is_empty());
        let now = chrono::Utc::now().timestamp_millis();
        assert_eq!(store.suppression_list(now).await.unwrap().len(), 2);
    }

    #[test]
    fn soft_run_needs_n_soft_in_a_row() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(soft_run_reached(&s(&["soft", "soft", "soft"]), 3));
        assert!(!soft_run_reached(&s(&["soft", "soft"]), 3));
        assert!(!soft_run_reached(&s(&["soft", "hard", "soft", "soft"]), 3));
        assert!(soft_run_reached(&s(&["soft", "soft", "soft", "hard"]), 3));
        assert!(!soft_run_reached(&s(&["soft"]), 0));
    }
}
