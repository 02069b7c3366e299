//! Returned mail → stored bounce records: correlation with the message we sent, the
//! recipient's status change, the suppression list and metrics.
//!
//! Correlation, in order of trust: the VERP address the bounce was sent to (MAC verified
//! before the mail was even accepted) or that the returned message names as its envelope
//! sender, our receipt id in the returned message's `Received:` header, its `Message-ID`,
//! its ENVID. Only a VERP match is verified; over SMTP only a verified one acts, in mail an
//! admin feeds in any match does (see [`Match::effect`]). A record
//! that matches nothing is still stored under its recipient address, so it can be found by
//! address.

use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{BounceKind, BounceRecord, BounceType, Classifier, verp};
use crate::config::Config;
use crate::metrics::{BounceLabel, Metrics};
use crate::receipt::ReceiptId;
use crate::store::{
    BounceFacts, Correlation, LogKey, LogQuery, NewBounce, RecipientRef, RecipientStatus, Store,
    StoreError, Suppression,
};

/// Where a record was matched: the message and recipient it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    pub receipt: ReceiptId,
    pub rcpt_index: u32,
    pub correlation: Correlation,
    /// The recipient as stored; `None` when the store no longer has the message (a VERP
    /// tag outlives the log purge).
    pub recipient: Option<RecipientRef>,
}

/// What a matched record may do to its recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Stored against the message and shown in its log; the recipient stays as it is.
    Record,
    /// Moves the recipient's status (`bounced`, `complained`) and may suppress the address.
    MoveAndSuppress,
}

impl Match {
    /// Whether this match is proof that the record is about the copy it names: a VERP
    /// address whose MAC verifies, which only we and the holder of that one copy know. The
    /// receipt id (in the `Received:` field), the Message-ID and the ENVID are seen by every
    /// recipient of the message and by whoever it is forwarded to.
    pub fn verified(&self) -> bool {
        self.correlation == Correlation::Verp
    }

    /// What a record matched here may do. Over SMTP (anyone may write to `bounces@`,
    /// `fbl@`) only a verified match acts: there every real bounce comes to the VERP
    /// address we sent from, and knowing a message's Message-ID was enough to have any of
    /// its recipients marked `complained` and suppressed. In bounce mail an admin feeds in
    /// (`bounce ingest`: a mailbox the admin chose and vouches for, the only way bounces
    /// reach mailtrail without `bounce_domain`) an unverified match acts as well, as the
    /// issue's correlation by receipt id, Message-ID and ENVID means it to; it stays marked
    /// unverified. No record acts on a recipient the receiving server never took (queued,
    /// refused, suppressed, failed): there was nothing to bounce.
    fn effect(&self, from_smtp: bool) -> Effect {
        let handed_over = self
            .recipient
            .as_ref()
            .is_some_and(|r| r.status.was_handed_over());
        if handed_over && (self.verified() || !from_smtp) {
            Effect::MoveAndSuppress
        } else {
            Effect::Record
        }
    }

    /// Why a record that would change its recipient leaves it as it is (`None` when it
    /// acts, or would not act anyway).
    fn left_because(&self, from_smtp: bool) -> Option<Left> {
        let r = self.recipient.as_ref()?;
        if !r.status.was_handed_over() {
            Some(Left::NotHandedOver(r.status))
        } else if from_smtp && !self.verified() {
            Some(Left::Unverified)
        } else {
            None
        }
    }
}

/// Why a record left its recipient as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Left {
    /// No receiving server took the message for it (queued, deferred, failed...).
    NotHandedOver(crate::store::RecipientStatus),
    /// Over SMTP, and nothing proved it is about that copy.
    Unverified,
}

impl std::fmt::Display for Left {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Left::NotHandedOver(status) => write!(
                f,
                "recipient {}, never taken by a receiving server: left as it is",
                status.as_str()
            ),
            Left::Unverified => f.write_str("unverified over SMTP: recipient left as it is"),
        }
    }
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
    /// Matched by proof (see [`Match::verified`]).
    pub verified: bool,
    pub suppressed: bool,
    /// Stored before (the same returned mail again): nothing changed.
    pub duplicate: bool,
    /// Why the matched recipient's status stayed, when the record would have changed it.
    pub left: Option<String>,
}

/// The recipient status a record moves its matched recipient to: a failed DSN or prose
/// bounce → `bounced`, a complaint → `complained`; auto-replies and delay notices leave it.
pub fn new_status(record: &BounceRecord) -> Option<RecipientStatus> {
    match record.kind {
        BounceKind::Arf => {
            (record.bounce_type == BounceType::Complaint).then_some(RecipientStatus::Complained)
        }
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
        let verp_tag = self.verp_tag(envelope_recipients);
        // Sent to a copy's VERP address, a failure notice is about that copy even when its
        // text names no recipient the parser finds.
        // The copy the envelope's VERP address names, looked up once for every record.
        let envelope_copy = match verp_tag {
            Some(tag) => Some(Match {
                receipt: tag.receipt,
                rcpt_index: tag.rcpt_index,
                correlation: Correlation::Verp,
                recipient: self.store.recipient(tag.receipt, tag.rcpt_index).await?,
            }),
            None => None,
        };
        let about = envelope_copy
            .as_ref()
            .and_then(|m| m.recipient.as_ref())
            .map(|r| r.address.as_str());
        let records = match about {
            Some(address) => super::parse_about(raw, &self.classifier, address),
            None => super::parse_with(raw, &self.classifier),
        };
        let now = chrono::Utc::now().timestamp_millis();
        let own = OwnHeader::of(raw);
        // Returned mail without a Message-ID is known by its content instead.
        let mail_key = match &own.message_id {
            Some(id) => id.clone(),
            None => content_key(raw, &own),
        };
        // What the bounce is about was sent before it was written (its Date), else before now.
        let dated_ms = own.date_ms.map_or(now, |d| d.min(now));
        let mut matches = Vec::with_capacity(records.len());
        for record in &records {
            matches.push(
                self.correlate(record, envelope_copy.as_ref(), dated_ms)
                    .await?,
            );
        }
        let acting = one_acting_per_verp_copy(&records, &matches);
        let mut bounces: Vec<NewBounce> = Vec::with_capacity(records.len());
        let mut left = Vec::with_capacity(records.len());
        for (position, (record, matched)) in records.iter().zip(matches).enumerate() {
            let effect = matched
                .as_ref()
                .filter(|_| acting.get(position).copied().unwrap_or(true))
                .map_or(Effect::Record, |m| m.effect(source.is_some()));
            let why_left = matched
                .as_ref()
                .filter(|_| new_status(record).is_some())
                .and_then(|m| m.left_because(source.is_some()));
            left.push(why_left.map(|w| w.to_string()));
            // Only a record that may act suppresses, and then the address we sent to: an
            // unmatched bounce proves nothing about any address of ours.
            let suppress = match (effect, matched.as_ref().and_then(|m| m.recipient.as_ref())) {
                (Effect::MoveAndSuppress, Some(r)) => {
                    self.suppression(record, &r.address, now).await?
                }
                _ => None,
            };
            let status = new_status(record).filter(|_| effect != Effect::Record);
            let mut bounce = new_bounce(record, matched, status, source, suppress, now);
            bounce.held_unverified = why_left == Some(Left::Unverified);
            // The same record again adds nothing; a copy that may do more is not the same
            // as one that did less (a copy first sent to a plain address must not block the
            // real one).
            let acts = effect == Effect::MoveAndSuppress;
            let about = bounce.facts.recipient.to_lowercase();
            bounce.dedup_key = Some(format!("{mail_key}\n{position}\n{about}\n{acts}"));
            bounces.push(bounce);
        }
        if records.is_empty()
            && let Some(receipt) = source
        {
            // Kept (the mail is stored like any message), but nothing came of it: said, as
            // Postfix logs what it cannot deliver, so an unreadable bounce is not lost unseen.
            self.metrics.bounce_mail_without_records.inc();
            tracing::info!(%receipt, "mail to the bounce domain gave no bounce record");
        }
        let recorded = self.store.record_bounces(bounces.clone(), source).await?;
        let suppressed_any = recorded
            .iter()
            .zip(&bounces)
            .any(|(r, b)| !r.duplicate && b.suppress.is_some());
        if suppressed_any && let Some(cache) = &self.suppressions {
            cache.invalidate();
        }
        Ok(recorded
            .into_iter()
            .zip(bounces)
            .zip(left)
            .map(|((r, b), left)| self.recorded(r, b, left))
            .collect())
    }

    /// Counts and logs a committed bounce (a duplicate is only logged).
    fn recorded(
        &self,
        r: crate::store::RecordedBounce,
        b: NewBounce,
        left: Option<String>,
    ) -> Ingested {
        let f = b.facts;
        let suppressed = !r.duplicate && b.suppress.is_some();
        if r.duplicate {
            tracing::info!(recipient = %f.recipient, bounce_id = r.id, "bounce already recorded");
        } else {
            self.metrics
                .bounces
                .get_or_create(&BounceLabel {
                    reason: f.reason.clone(),
                    bounce_type: f.bounce_type.clone(),
                })
                .inc();
            if f.bounce_type == BounceType::Complaint.as_str() {
                self.metrics.complaints.inc();
            }
            if f.correlation == Correlation::Unmatched {
                self.metrics.unmatched_bounces.inc();
            }
            tracing::info!(
                recipient = %f.recipient, reason = %f.reason, bounce_type = %f.bounce_type,
                correlation = ?f.correlation, receipt = ?f.receipt.map(|r| r.to_string()),
                suppressed, left = left.as_deref().unwrap_or(""), "bounce recorded"
            );
        }
        Ingested {
            bounce_id: r.id,
            recipient: f.recipient,
            reason: f.reason,
            bounce_type: f.bounce_type,
            correlation: f.correlation,
            receipt: f.receipt,
            verified: f.verified,
            suppressed,
            duplicate: r.duplicate,
            left,
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
        envelope_copy: Option<&Match>,
        dated_ms: i64,
    ) -> Result<Option<Match>, StoreError> {
        // The copy the envelope's VERP address names, else the one whose VERP address the
        // report gives as the returned message's envelope sender (ARF `Original-Mail-From`,
        // Postfix's `X-Postfix-Sender`, the returned `Return-Path`): only we and that copy's
        // recipient know its MAC.
        if let Some(copy) = envelope_copy {
            return Ok(Some(copy.clone()));
        }
        let verp_tag = self.verp_key.as_deref().and_then(|key| {
            let d = &self.config.delivery;
            let sender = record.original_sender.as_deref()?;
            verp::decode(key, &d.bounce_local_part, &d.bounce_domain, sender).ok()
        });
        if let Some(tag) = verp_tag {
            // The VERP address names the copy, whatever address the bounce reports (a
            // forwarded or rewritten one, or, forged by that recipient, another's).
            return Ok(Some(Match {
                receipt: tag.receipt,
                rcpt_index: tag.rcpt_index,
                correlation: Correlation::Verp,
                recipient: self.store.recipient(tag.receipt, tag.rcpt_index).await?,
            }));
        }
        let addresses: Vec<&str> = std::iter::once(record.recipient.as_str())
            .chain(record.original_recipient.as_deref())
            .filter(|a| !a.is_empty())
            .collect();
        // Each way needs the reported address among the message's recipients; a Message-ID
        // or ENVID may name several messages (an application resending), of which the one
        // sent to that address, the newest before the bounce, is meant.
        for correlation in [
            Correlation::ReceiptHeader,
            Correlation::MessageId,
            Correlation::Envid,
        ] {
            for a in &addresses {
                let receipt = match (correlation, &record.message_id, &record.envid) {
                    (Correlation::ReceiptHeader, _, _) => record.receipt,
                    (Correlation::MessageId, Some(id), _) => {
                        self.store
                            .find_by_message_id(trim_angle(id), a, dated_ms)
                            .await?
                    }
                    (Correlation::Envid, _, Some(envid)) => {
                        self.store.find_by_envid(envid, a, dated_ms).await?
                    }
                    _ => None,
                };
                let Some(receipt) = receipt else { continue };
                if let Some(r) = self.store.find_recipient(receipt, a).await? {
                    return Ok(Some(Match {
                        receipt,
                        rcpt_index: r.index,
                        correlation,
                        recipient: Some(r),
                    }));
                }
            }
        }
        Ok(None)
    }

    /// The suppression-list entry `record` adds for `address` (the matched recipient's), if
    /// any. A soft bounce counts toward the run with the stored bounces that changed the
    /// status of a recipient with this address, one per returned message: the other records
    /// of this message are the same event (a DSN with six blocks for one address, an alias
    /// expanded to six mailboxes, put a year's suppression on one "mailbox full").
    async fn suppression(
        &self,
        record: &BounceRecord,
        address: &str,
        now: i64,
    ) -> Result<Option<Suppression>, StoreError> {
        let s = &self.config.suppression;
        if !s.enabled || !address.contains('@') {
            return Ok(None);
        }
        // How many bounces suppressed it: one hard bounce or complaint, or the whole run of
        // soft ones (the list said 1 after five 4.2.2 DSNs).
        let mut count = 1;
        // The first bounce that suppressed it: this one, or the oldest of the soft run.
        let mut first_at_ms = now;
        let suppress = if suppresses_at_once(record) {
            true
        } else if record.bounce_type == BounceType::Soft && new_status(record).is_some() {
            count = s.soft_bounce_threshold;
            let since =
                now.saturating_sub(i64::try_from(s.soft_window.as_millis()).unwrap_or(i64::MAX));
            let stored = self.store.recent_bounce_types(address, since).await?;
            // Newest first: this message's, then the store's.
            let run = usize::try_from(s.soft_bounce_threshold).unwrap_or(usize::MAX);
            if let Some((_, at)) = run.checked_sub(2).and_then(|i| stored.get(i)) {
                first_at_ms = (*at).min(now);
            }
            let recent: Vec<String> = std::iter::once(record.bounce_type.as_str().to_string())
                .chain(stored.into_iter().map(|(bounce_type, _)| bounce_type))
                .collect();
            soft_run_reached(&recent, s.soft_bounce_threshold)
        } else {
            false
        };
        let expires_at_ms = s.expires_at(now);
        Ok(suppress.then(|| Suppression {
            address: address.to_string(),
            reason: record.reason.as_str().to_string(),
            source: if record.kind == BounceKind::Arf {
                "complaint".to_string()
            } else {
                "bounce".to_string()
            },
            first_at_ms,
            last_at_ms: now,
            count,
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
                before: None,
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

/// Which records may act on their recipient: all, but of those a VERP address ties to one
/// copy only one: the record that reports that copy's own address, else the first that
/// would change its status, else the first. The VERP address names one copy, so one
/// returned message about it is one bounce; the other records (an alias the copy was
/// expanded to, a forwarding target) are stored against it but neither move it nor add to
/// its suppression count.
fn one_acting_per_verp_copy(records: &[BounceRecord], matches: &[Option<Match>]) -> Vec<bool> {
    let copy = |i: usize| {
        matches
            .get(i)
            .and_then(Option::as_ref)
            .filter(|m| m.verified())
            .map(|m| (m.receipt, m.rcpt_index))
    };
    let names_copy = |i: usize| {
        let address = matches
            .get(i)
            .and_then(Option::as_ref)
            .and_then(|m| m.recipient.as_ref())
            .map(|r| r.address.as_str());
        records.get(i).is_some_and(|r| {
            address.is_some_and(|a| {
                r.recipient.eq_ignore_ascii_case(a)
                    || r.original_recipient
                        .as_deref()
                        .is_some_and(|o| o.eq_ignore_ascii_case(a))
            })
        })
    };
    let mut acting = vec![true; records.len()];
    for i in 0..records.len() {
        let Some(key) = copy(i) else { continue };
        let group: Vec<usize> = (0..records.len())
            .filter(|&j| copy(j) == Some(key))
            .collect();
        if group.first() != Some(&i) {
            continue;
        }
        let chosen = group
            .iter()
            .copied()
            .find(|&j| names_copy(j))
            .or_else(|| {
                group
                    .iter()
                    .copied()
                    .find(|&j| records.get(j).and_then(new_status).is_some())
            })
            .unwrap_or(i);
        for j in group {
            if let Some(a) = acting.get_mut(j) {
                *a = j == chosen;
            }
        }
    }
    acting
}

/// The bounce to store for `record`, matched (or not) to what we sent.
fn new_bounce(
    record: &BounceRecord,
    matched: Option<Match>,
    new_status: Option<RecipientStatus>,
    source: Option<ReceiptId>,
    suppress: Option<Suppression>,
    now: i64,
) -> NewBounce {
    let verified = matched.as_ref().is_some_and(Match::verified);
    // Filed under the recipient it matched (what it acts on and counts toward).
    let matched_address = matched
        .as_ref()
        .and_then(|m| m.recipient.as_ref())
        .map(|r| r.address.clone());
    let reported_recipient = matched_address
        .as_ref()
        .filter(|a| !a.eq_ignore_ascii_case(&record.recipient))
        .map(|_| record.recipient.clone());
    NewBounce {
        facts: BounceFacts {
            at_ms: now,
            receipt: matched.as_ref().map(|m| m.receipt),
            rcpt_index: matched.as_ref().map(|m| m.rcpt_index),
            correlation: matched.map_or(Correlation::Unmatched, |m| m.correlation),
            recipient: matched_address.unwrap_or_else(|| record.recipient.clone()),
            reported_recipient,
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
            verified,
        },
        new_status,
        suppress,
        dedup_key: None,
        held_unverified: false,
    }
}

/// The addresses a stored-away bounce names as where it was delivered (`Delivered-To`,
/// `X-Original-To`, `Envelope-To`, `X-Envelope-To`, `To` of its own header): for bounce mail
/// fed in from a mailbox, whose envelope is gone, the place a VERP address still shows.
/// Anything that looks like an address is listed; [`verp::decode`]'s MAC check sorts them.
pub fn delivered_to(raw: &[u8]) -> Vec<String> {
    const FIELDS: [&str; 5] = [
        "delivered-to",
        "x-original-to",
        "envelope-to",
        "x-envelope-to",
        "to",
    ];
    let Some(header) = mail_parser::MessageParser::default().parse_headers(raw) else {
        return Vec::new();
    };
    header
        .headers_raw()
        .filter(|(name, _)| FIELDS.iter().any(|f| name.eq_ignore_ascii_case(f)))
        .flat_map(|(_, value)| {
            value
                .split(|c: char| c.is_whitespace() || matches!(c, ',' | ';' | '<' | '>' | '"'))
                .filter(|t| t.contains('@'))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// What the returned mail's own header says about it.
#[derive(Default)]
struct OwnHeader {
    /// Its `Message-ID` (what a reporting MTA sends again unchanged when it retries, and
    /// what a mailbox keeps), angle brackets stripped.
    message_id: Option<String>,
    /// Its `Date`, in ms since the Unix epoch (the end of its second).
    date_ms: Option<i64>,
    /// The `Date`, `From` and `Subject` fields as written (for [`content_key`]).
    date_from_subject: [Option<String>; 3],
}

impl OwnHeader {
    fn of(raw: &[u8]) -> Self {
        let Some(header) = mail_parser::MessageParser::default().parse_headers(raw) else {
            return Self::default();
        };
        let field = |name: &str| header.header_raw(name).map(|v| v.trim().to_string());
        Self {
            message_id: header
                .message_id()
                .map(|id| trim_angle(id).to_string())
                .filter(|id| !id.is_empty()),
            date_from_subject: [field("Date"), field("From"), field("Subject")],
            date_ms: header
                .date()
                .map(|d| d.to_timestamp().saturating_mul(1000).saturating_add(999)),
        }
    }
}

/// Names returned mail that has no `Message-ID` by what the sender wrote: a SHA-256 of its
/// `Date`, `From` and `Subject` and of its body (everything after the header, line breaks
/// read as LF). A reporting MTA that sends it again, or a mailbox fed to `bounce ingest`
/// again, gives the same bytes; the trace fields above it (our own `Received:`, a
/// mailbox's `Delivered-To`) are left out, as they differ between copies.
fn content_key(raw: &[u8], own: &OwnHeader) -> String {
    use sha2::Digest as _;
    let mut hash = sha2::Sha256::new();
    for field in &own.date_from_subject {
        hash.update(field.as_deref().unwrap_or("").as_bytes());
        hash.update(b"\n");
    }
    for run in body_of(raw).split(|&b| b == b'\r') {
        hash.update(run);
    }
    let digest = hash.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("content sha256:{hex}")
}

/// What follows the first empty line of `raw` (nothing when there is none).
fn body_of(raw: &[u8]) -> &[u8] {
    let mut line_start = 0;
    for line in raw.split_inclusive(|&b| b == b'\n') {
        line_start += line.len();
        if line == b"\n" || line == b"\r\n" {
            return raw.get(line_start..).unwrap_or(&[]);
        }
    }
    &[]
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

    /// The bounce stage with the default config and no VERP key, over `store`.
    fn default_ingest(store: Arc<crate::store::sqlite::SqliteStore>) -> BounceIngest {
        BounceIngest::new(
            Arc::new(Config::default()),
            store,
            Arc::new(Metrics::new()),
            Arc::new(Classifier::with_user_rules("").unwrap()),
            None,
        )
    }

    /// Inbound bounce mail for `bounces@bounce.example` with `body`, stored in `store`.
    async fn inbound(store: &crate::store::sqlite::SqliteStore, body: &str) -> ReceiptId {
        inbound_to(store, "bounces@bounce.example", body).await
    }

    /// Inbound bounce mail for `rcpt` with `body`, stored in `store`.
    async fn inbound_to(
        store: &crate::store::sqlite::SqliteStore,
        rcpt: &str,
        body: &str,
    ) -> ReceiptId {
        let mut msg = crate::test_support::accepted_message(&[rcpt], body.as_bytes());
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
        let ingest = default_ingest(store.clone());

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
        let ingest = default_ingest(store.clone());
        // The processed mark, written last, is refused: the records before it could each
        // have been committed on their own.
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TRIGGER refuse BEFORE UPDATE OF inbound_processed_at ON messages
             BEGIN SELECT RAISE(ABORT, 'refused'); END",
        )
        .unwrap();

        assert_eq!(ingest.process_pending().await.unwrap(), 0);
        let none = store.bounces(&Default::default()).await.unwrap();
        assert!(none.is_empty(), "half a message stored: {none:?}");
        assert_eq!(store.pending_inbound_bounces().await.unwrap(), [receipt]);

        // Once the store takes the write, the next run stores each record once.
        conn.execute_batch("DROP TRIGGER refuse").unwrap();
        assert_eq!(ingest.process_pending().await.unwrap(), 1);
        let bounces = store.bounces(&Default::default()).await.unwrap();
        let mut recipients: Vec<&str> =
            bounces.iter().map(|b| b.facts.recipient.as_str()).collect();
        recipients.sort_unstable();
        assert_eq!(recipients, ["also-gone@example.org", "gone@example.org"]);
        assert!(store.pending_inbound_bounces().await.unwrap().is_empty());
    }

    /// A DSN (`multipart/report`) with Message-ID `<id@mx.remote.test>`, the per-recipient
    /// `blocks` and, when given, a returned header section.
    fn report(id: &str, blocks: &str, returned: Option<&str>) -> String {
        let returned = returned.map_or(String::new(), |h| {
            format!("--b1\r\nContent-Type: text/rfc822-headers\r\n\r\n{h}\r\n")
        });
        format!(
            "From: MAILER-DAEMON@mx.remote.test\r\nMessage-ID: <{id}@mx.remote.test>\r\n\
             Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n\
             Content-Type: multipart/report; report-type=delivery-status; boundary=b1\r\n\r\n\
             --b1\r\nContent-Type: message/delivery-status\r\n\r\n\
             Reporting-MTA: dns; mx.remote.test\r\n\r\n{blocks}{returned}--b1--\r\n"
        )
    }

    /// A DSN saying `rcpt` does not exist, its returned headers naming our `receipt`.
    fn dsn(rcpt: &str, receipt: ReceiptId) -> String {
        report(
            &format!("dsn.{rcpt}"),
            &format!(
                "Final-Recipient: rfc822; {rcpt}\r\nAction: failed\r\nStatus: 5.1.1\r\n\
                 Diagnostic-Code: smtp; 550 5.1.1 <{rcpt}>: User unknown\r\n\r\n"
            ),
            Some(&format!(
                "Received: from app by mt.test (mailtrail) with ESMTP id {receipt}; \
                 Mon, 23 Nov 2026 10:00:00 +0000\r\nTo: {rcpt}\r\n"
            )),
        )
    }

    /// A DSN with `blocks` "mailbox full" blocks for `rcpt`, numbered `n` (its own Message-ID).
    fn mailbox_full(rcpt: &str, blocks: usize, n: usize) -> String {
        let block = format!(
            "Final-Recipient: rfc822; {rcpt}\r\nAction: failed\r\nStatus: 5.2.2\r\n\
             Diagnostic-Code: smtp; 552 5.2.2 <{rcpt}>: Mailbox full\r\n\r\n"
        );
        report(&format!("full.{n}"), &block.repeat(blocks), None)
    }

    /// A store in `dir` and a bounce stage over it with bounce domain `bounce.test` and a
    /// VERP key (returned for encoding addresses).
    /// Stores `sent` with its first `delivered` recipients taken by the receiving server.
    async fn accept_delivered(
        store: &crate::store::sqlite::SqliteStore,
        dir: &tempfile::TempDir,
        sent: crate::spool::AcceptedMessage,
        delivered: u32,
    ) {
        let receipt = sent.receipt;
        store.accept(sent).await.unwrap();
        rusqlite::Connection::open(dir.path().join("m.db"))
            .unwrap()
            .execute(
                "UPDATE recipients SET status = 'delivered' WHERE receipt = ?1 AND idx < ?2",
                rusqlite::params![receipt.to_string(), delivered],
            )
            .unwrap();
    }

    /// The statuses of the message's recipients, in order.
    async fn recipient_statuses(
        store: &crate::store::sqlite::SqliteStore,
        receipt: ReceiptId,
    ) -> Vec<String> {
        message_log(store, receipt)
            .await
            .recipients
            .iter()
            .map(|r| r.status.as_str().to_string())
            .collect()
    }

    /// The log of one message.
    async fn message_log(
        store: &crate::store::sqlite::SqliteStore,
        receipt: ReceiptId,
    ) -> crate::store::MessageLog {
        let query = LogQuery {
            key: LogKey::Receipt(receipt),
            since_ms: None,
            until_ms: None,
            limit: 1,
            before: None,
        };
        store.log(&query).await.unwrap().remove(0)
    }

    /// The addresses on the suppression list now.
    async fn suppressed_addresses(store: &crate::store::sqlite::SqliteStore) -> Vec<String> {
        let now = chrono::Utc::now().timestamp_millis();
        let list = store.suppression_list(now).await.unwrap();
        list.into_iter().map(|s| s.address).collect()
    }

    fn verp_ingest(
        dir: &tempfile::TempDir,
    ) -> (
        Arc<crate::store::sqlite::SqliteStore>,
        BounceIngest,
        Vec<u8>,
    ) {
        let store = Arc::new(
            crate::store::sqlite::SqliteStore::open_path(&dir.path().join("m.db")).unwrap(),
        );
        let mut config = Config::default();
        config.delivery.bounce_domain = "bounce.test".into();
        let key = b"test key".to_vec();
        let ingest = BounceIngest::new(
            Arc::new(config),
            store.clone(),
            Arc::new(Metrics::new()),
            Arc::new(Classifier::with_user_rules("").unwrap()),
            Some(key.clone()),
        );
        (store, ingest, key)
    }

    #[tokio::test]
    async fn a_returned_message_counts_once_toward_the_soft_bounce_run() {
        let dir = tempfile::TempDir::new().unwrap();
        let (store, ingest, key) = verp_ingest(&dir);
        let sent =
            crate::test_support::accepted_message(&["full@ex.test"], b"Subject: hi\r\n\r\nhi\r\n");
        let receipt = sent.receipt;
        accept_delivered(&store, &dir, sent, 3).await;
        let verp = verp::encode(&key, "bounces", "bounce.test", receipt, 0);
        let now = chrono::Utc::now().timestamp_millis();
        let suppressed = || async { !store.suppression_list(now).await.unwrap().is_empty() };

        // One DSN with six soft blocks for the address: one event, not six.
        inbound_to(&store, &verp, &mailbox_full("full@ex.test", 6, 0)).await;
        assert_eq!(ingest.process_pending().await.unwrap(), 1);
        assert!(!suppressed().await);
        // Four more returned messages make five in a row (the default threshold).
        for n in 1..4 {
            inbound_to(&store, &verp, &mailbox_full("full@ex.test", 1, n)).await;
            ingest.process_pending().await.unwrap();
            assert!(!suppressed().await, "after message {n}");
        }
        inbound_to(&store, &verp, &mailbox_full("full@ex.test", 1, 4)).await;
        ingest.process_pending().await.unwrap();
        assert!(suppressed().await);
        // The entry counts the run that suppressed it, from its first bounce.
        let list = store.suppression_list(now).await.unwrap();
        assert_eq!(list[0].count, 5, "{list:?}");
        let bounces = store.bounces(&Default::default()).await.unwrap();
        let first_bounce = bounces.iter().map(|b| b.facts.at_ms).min().unwrap();
        assert_eq!(list[0].first_at_ms, first_bounce, "{list:?}");
    }

    /// [`verp_ingest`], and a message to `r1@ex.test` and `r2@ex.test` that both reached
    /// the receiving server.
    async fn two_delivered(
        dir: &tempfile::TempDir,
    ) -> (
        Arc<crate::store::sqlite::SqliteStore>,
        BounceIngest,
        Vec<u8>,
        ReceiptId,
    ) {
        let (store, ingest, key) = verp_ingest(dir);
        let sent = crate::test_support::accepted_message(
            &["r1@ex.test", "r2@ex.test"],
            b"Subject: hi\r\n\r\nhi\r\n",
        );
        let receipt = sent.receipt;
        accept_delivered(&store, dir, sent, 2).await;
        (store, ingest, key, receipt)
    }

    #[tokio::test]
    async fn one_returned_message_at_a_verp_address_is_one_bounce_of_that_copy() {
        let dir = tempfile::TempDir::new().unwrap();
        let (store, ingest, key, receipt) = two_delivered(&dir).await;
        let verp = verp::encode(&key, "bounces", "bounce.test", receipt, 0);
        // r1's copy was expanded (an alias) and its report names a target first, then r1.
        let blocks = "Final-Recipient: rfc822; target@elsewhere.test\r\nAction: failed\r\n\
                      Status: 5.1.2\r\nDiagnostic-Code: smtp; 550 5.1.2 Host unknown\r\n\r\n\
                      Final-Recipient: rfc822; r1@ex.test\r\nAction: failed\r\n\
                      Status: 5.1.1\r\nDiagnostic-Code: smtp; 550 5.1.1 User unknown\r\n\r\n";
        inbound_to(&store, &verp, &report("alias", blocks, None)).await;
        assert_eq!(ingest.process_pending().await.unwrap(), 1);
        // Both records are kept against r1's copy; the one about r1 itself acts, once.
        let bounces = store.bounces(&Default::default()).await.unwrap();
        assert_eq!(bounces.len(), 2, "{bounces:?}");
        assert!(bounces.iter().all(|b| b.facts.rcpt_index == Some(0)));
        assert_eq!(
            recipient_statuses(&store, receipt).await,
            ["bounced", "delivered"]
        );
        let now = chrono::Utc::now().timestamp_millis();
        let list = store.suppression_list(now).await.unwrap();
        assert_eq!(list.len(), 1, "{list:?}");
        assert_eq!(
            (
                list[0].address.as_str(),
                list[0].reason.as_str(),
                list[0].count
            ),
            ("r1@ex.test", "userunknown", 1)
        );
    }

    #[tokio::test]
    async fn a_notice_at_a_verp_address_naming_no_recipient_is_about_that_copy() {
        let dir = tempfile::TempDir::new().unwrap();
        let (store, ingest, key, receipt) = two_delivered(&dir).await;
        // An Exchange-style notice that quotes only the remote reply.
        let notice = "From: MAILER-DAEMON@mx.remote.test\r\nMessage-ID: <n1@mx.remote.test>\r\n\
                      Subject: Undeliverable: newsletter\r\n\r\nDelivery has failed to these \
                      recipients or groups:\r\n\r\nYour message wasn't delivered.\r\n\r\n\
                      Diagnostic information for administrators:\r\n\r\n\
                      Remote Server returned '550 5.1.1 RESOLVER.ADR.RecipNotFound; not found'\r\n";
        let verp = verp::encode(&key, "bounces", "bounce.test", receipt, 1);
        inbound_to(&store, &verp, notice).await;
        // To the plain bounce address nothing says whom it is about: no record.
        inbound_to(&store, "bounces@bounce.test", &notice.replace("n1@", "n2@")).await;
        assert_eq!(ingest.process_pending().await.unwrap(), 2);
        let bounces = store.bounces(&Default::default()).await.unwrap();
        assert_eq!(bounces.len(), 1, "{bounces:?}");
        let b = &bounces[0].facts;
        assert_eq!(
            (
                b.recipient.as_str(),
                b.reason.as_str(),
                b.bounce_type.as_str()
            ),
            ("r2@ex.test", "userunknown", "hard")
        );
        assert!(b.verified);
        assert_eq!(
            recipient_statuses(&store, receipt).await,
            ["delivered", "bounced"]
        );
        assert_eq!(suppressed_addresses(&store).await, ["r2@ex.test"]);
        // The one that gave nothing is counted.
        assert_eq!(ingest.metrics.bounce_mail_without_records.get(), 1);
    }

    #[tokio::test]
    async fn only_bounces_that_prove_themselves_change_recipients_or_suppress() {
        let dir = tempfile::TempDir::new().unwrap();
        let (store, ingest, key) = verp_ingest(&dir);
        let recipients = [
            "alice@ex.test",
            "bob@ex.test",
            "carol@ex.test",
            "dave@ex.test",
        ];
        let sent = crate::test_support::accepted_message(&recipients, b"Subject: hi\r\n\r\nhi\r\n");
        let receipt = sent.receipt;
        // The receiving server took the first three; dave is still queued.
        accept_delivered(&store, &dir, sent, 3).await;
        let statuses = || recipient_statuses(&store, receipt);
        let suppressed = || suppressed_addresses(&store);

        // Anyone can write to bounces@: a DSN about an address we never mailed, and one that
        // names our receipt id for a recipient of it. Both are kept; neither acts.
        inbound_to(
            &store,
            "bounces@bounce.test",
            &dsn("ceo@bigcorp.test", receipt),
        )
        .await;
        inbound_to(
            &store,
            "bounces@bounce.test",
            &dsn("alice@ex.test", receipt),
        )
        .await;
        assert_eq!(ingest.process_pending().await.unwrap(), 2);
        let kept = store.bounces(&Default::default()).await.unwrap();
        let correlations: Vec<Correlation> = kept.iter().map(|b| b.facts.correlation).collect();
        assert!(
            correlations.contains(&Correlation::Unmatched),
            "{correlations:?}"
        );
        assert!(
            correlations.contains(&Correlation::ReceiptHeader),
            "{correlations:?}"
        );
        assert_eq!(
            statuses().await,
            ["delivered", "delivered", "delivered", "queued"]
        );
        assert!(suppressed().await.is_empty());
        // Alice's log says what came and that it was not taken as her bounce.
        let log = message_log(&store, receipt).await;
        let last = log.recipients[0].events.last().unwrap();
        assert_eq!(
            (last.kind.as_str(), last.status),
            ("unverified dsn", RecipientStatus::Delivered)
        );

        // Carol's VERP address proves the bounce is about her copy, whoever it names; the
        // same bytes sent to bounces@ first (stored, acting on nothing) do not hold it up.
        let carol_verp = verp::encode(&key, "bounces", "bounce.test", receipt, 2);
        inbound_to(&store, &carol_verp, &dsn("alice@ex.test", receipt)).await;
        assert_eq!(ingest.process_pending().await.unwrap(), 1);
        assert_eq!(
            statuses().await,
            ["delivered", "delivered", "bounced", "queued"]
        );
        assert_eq!(suppressed().await, ["carol@ex.test"]);
        // Filed under carol, whom it acted on, with the address it named beside.
        let carols = store
            .bounces(&crate::store::BounceQuery {
                address: Some("carol@ex.test".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(carols.len(), 1, "{carols:?}");
        assert_eq!(
            carols[0].facts.reported_recipient.as_deref(),
            Some("alice@ex.test")
        );

        // Bounce mail an admin feeds in (and so vouches for) acts by the receipt id it
        // names, marked unverified.
        let fed = ingest
            .ingest(dsn("bob@ex.test", receipt).as_bytes(), &[], None)
            .await
            .unwrap();
        assert_eq!(fed[0].correlation, Correlation::ReceiptHeader);
        assert!(!fed[0].verified && fed[0].suppressed, "{fed:?}");
        assert_eq!(
            statuses().await,
            ["delivered", "bounced", "bounced", "queued"]
        );
        let mut list = suppressed().await;
        list.sort_unstable();
        assert_eq!(list, ["bob@ex.test", "carol@ex.test"]);

        // Even trusted, a bounce about a recipient never handed over has nothing to bounce.
        let fed = ingest
            .ingest(dsn("dave@ex.test", receipt).as_bytes(), &[], None)
            .await
            .unwrap();
        assert_eq!(fed[0].correlation, Correlation::ReceiptHeader);
        assert!(!fed[0].suppressed);
        assert_eq!(
            statuses().await,
            ["delivered", "bounced", "bounced", "queued"]
        );
        // And the admin is told why.
        assert_eq!(
            fed[0].left.as_deref(),
            Some("recipient queued, never taken by a receiving server: left as it is")
        );
        // Its event names what came, not a verification it did not lack.
        let log = message_log(&store, receipt).await;
        assert_eq!(log.recipients[3].events.last().unwrap().kind, "dsn");
        let alice = ingest
            .ingest(dsn("alice@ex.test", receipt).as_bytes(), &[], None)
            .await
            .unwrap();
        assert_eq!(
            alice[0].left, None,
            "one that acts leaves nothing to explain"
        );
        assert_eq!(statuses().await[0], "bounced");
    }

    #[tokio::test]
    async fn a_bounce_is_tied_to_the_resent_message_it_is_about() {
        let dir = tempfile::TempDir::new().unwrap();
        let (store, ingest, _) = verp_ingest(&dir);
        let at = |t: &str| {
            chrono::DateTime::parse_from_rfc3339(&format!("2026-11-23T{t}:00Z"))
                .unwrap()
                .timestamp_millis()
        };
        // An application sends invoice 7 to ann and ben, then again under the same
        // Message-ID to ben alone, then to ann alone.
        let mut sent = Vec::new();
        for (to, time) in [
            (&["ann@ex.test", "ben@ex.test"][..], "09:00"),
            (&["ben@ex.test"][..], "11:00"),
            (&["ann@ex.test"][..], "12:00"),
        ] {
            let mut msg = crate::test_support::accepted_message(to, b"Subject: 7\r\n\r\nhi\r\n");
            msg.message_id = Some("<inv-7@app.test>".into());
            msg.received_at_ms = at(time);
            sent.push(msg.receipt);
            store.accept(msg).await.unwrap();
        }
        // Bounces fed in from the application's mailbox, naming no receipt id: only the
        // returned Message-ID and the bounce's own date say which copy.
        let bounce = |rcpt: &str, date: &str| {
            report(
                &format!("{rcpt}.{date}"),
                &format!(
                    "Final-Recipient: rfc822; {rcpt}\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n"
                ),
                Some(&format!("Message-ID: <inv-7@app.test>\r\nTo: {rcpt}\r\n")),
            )
            .replacen(
                "Subject:",
                &format!("Date: Mon, 23 Nov 2026 {date}:00 +0000\r\nSubject:"),
                1,
            )
        };
        for (rcpt, date, copy) in [
            ("ann@ex.test", "10:00", 0),
            ("ben@ex.test", "10:30", 0),
            ("ben@ex.test", "11:30", 1),
            ("ann@ex.test", "12:30", 2),
        ] {
            let fed = ingest
                .ingest(bounce(rcpt, date).as_bytes(), &[], None)
                .await
                .unwrap();
            assert_eq!(fed.len(), 1, "{fed:?}");
            assert_eq!(fed[0].correlation, Correlation::MessageId, "{rcpt} {date}");
            assert_eq!(fed[0].receipt, Some(sent[copy]), "{rcpt} at {date}");
        }
    }

    #[tokio::test]
    async fn returned_mail_without_a_message_id_is_stored_once() {
        let dir = tempfile::TempDir::new().unwrap();
        let (store, ingest, _) = verp_ingest(&dir);
        let receipt = ReceiptId::new();
        let no_id = dsn("gone@ex.test", receipt).replacen(
            "Message-ID: <dsn.gone@ex.test@mx.remote.test>\r\n",
            "Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n",
            1,
        );
        assert!(!no_id.contains("Message-ID"), "{no_id}");
        // The reporting MTA sends it again after a lost 250 (each copy under its own
        // Received field of ours), and a mailbox holding it, with LF line ends, is fed in.
        for hop in ["a", "b"] {
            let copy = format!("Received: from mx.remote.test by mt.test id {hop}\r\n{no_id}");
            inbound_to(&store, "bounces@bounce.test", &copy).await;
        }
        assert_eq!(ingest.process_pending().await.unwrap(), 2);
        let fed = ingest
            .ingest(no_id.replace("\r\n", "\n").as_bytes(), &[], None)
            .await
            .unwrap();
        assert!(fed.iter().all(|i| i.duplicate), "{fed:?}");
        assert_eq!(store.bounces(&Default::default()).await.unwrap().len(), 1);
        // Another bounce that differs only in its Date is another bounce.
        let later = no_id.replace("Mon, 23 Nov 2026", "Tue, 24 Nov 2026");
        let fed = ingest.ingest(later.as_bytes(), &[], None).await.unwrap();
        assert!(fed.iter().all(|i| !i.duplicate), "{fed:?}");
        assert_eq!(store.bounces(&Default::default()).await.unwrap().len(), 2);
    }

    /// An ARF complaint (report Message-ID `<arf.{n}@isp.test>`) about `rcpt`, with
    /// `Original-Mail-From: <{mail_from}>` when given, returning a message whose header
    /// has `returned` (with `To: rcpt`).
    fn complaint(n: usize, rcpt: &str, mail_from: Option<&str>, returned: &str) -> String {
        let mail_from =
            mail_from.map_or(String::new(), |a| format!("Original-Mail-From: <{a}>\r\n"));
        format!(
            "From: feedback@isp.test\r\nTo: fbl@bounce.test\r\nMessage-ID: <arf.{n}@isp.test>\r\n\
             Subject: Abuse report\r\nMIME-Version: 1.0\r\n\
             Content-Type: multipart/report; report-type=feedback-report; boundary=f1\r\n\r\n\
             --f1\r\nContent-Type: text/plain\r\n\r\nThis is an email abuse report.\r\n\r\n\
             --f1\r\nContent-Type: message/feedback-report\r\n\r\n\
             Feedback-Type: abuse\r\nUser-Agent: ExampleFBL/1.0\r\nVersion: 1\r\n{mail_from}\
             Original-Rcpt-To: {rcpt}\r\n\r\n\
             --f1\r\nContent-Type: message/rfc822\r\n\r\n\
             {returned}From: app@example.com\r\nTo: {rcpt}\r\nSubject: newsletter\r\n\r\n\
             Buy now.\r\n--f1--\r\n"
        )
    }

    #[tokio::test]
    async fn over_smtp_a_complaint_without_proof_marks_and_suppresses_no_one() {
        let dir = tempfile::TempDir::new().unwrap();
        let (store, ingest, key) = verp_ingest(&dir);
        let recipients = ["alice@ex.test", "bob@ex.test", "carol@ex.test"];
        let mut sent =
            crate::test_support::accepted_message(&recipients, b"Subject: hi\r\n\r\nhi\r\n");
        sent.message_id = Some("<news-1@app.test>".into());
        let receipt = sent.receipt;
        accept_delivered(&store, &dir, sent, 3).await;
        let statuses = || recipient_statuses(&store, receipt);
        let suppressed = || suppressed_addresses(&store);
        let by_message_id = "Message-ID: <news-1@app.test>\r\n".to_string();
        let by_receipt = format!(
            "Received: from app by mt.test (mailtrail) with ESMTP id {receipt}; Mon, 23 Nov 2026 10:00:00 +0000\r\n"
        );
        let forged_verp = format!("bounces+{receipt}-0-aaaaaaaa@bounce.test");

        // Anyone who knows the Message-ID or the receipt id (every recipient does) writes a
        // complaint about alice to fbl@, one with a made-up VERP sender too: each is kept,
        // tied to the message, and changes nothing.
        inbound_to(
            &store,
            "fbl@bounce.test",
            &complaint(1, "alice@ex.test", None, &by_message_id),
        )
        .await;
        inbound_to(
            &store,
            "fbl@bounce.test",
            &complaint(2, "alice@ex.test", None, &by_receipt),
        )
        .await;
        inbound_to(
            &store,
            "fbl@bounce.test",
            &complaint(3, "alice@ex.test", Some(&forged_verp), &by_message_id),
        )
        .await;
        assert_eq!(ingest.process_pending().await.unwrap(), 3);
        let kept = store.bounces(&Default::default()).await.unwrap();
        assert_eq!(kept.len(), 3, "{kept:?}");
        assert!(
            kept.iter()
                .all(|b| b.facts.receipt == Some(receipt) && !b.facts.verified),
            "{kept:?}"
        );
        assert_eq!(statuses().await, ["delivered", "delivered", "delivered"]);
        assert!(suppressed().await.is_empty());

        // A feedback loop's report gives the complained-of copy's envelope sender, our VERP
        // address for bob: proof, whatever address it names.
        let bob_verp = verp::encode(&key, "bounces", "bounce.test", receipt, 1);
        inbound_to(
            &store,
            "fbl@bounce.test",
            &complaint(4, "alice@ex.test", Some(&bob_verp), &by_message_id),
        )
        .await;
        // Or only the returned message's Return-Path does.
        let carol_verp = verp::encode(&key, "bounces", "bounce.test", receipt, 2);
        let return_path = format!("Return-Path: <{carol_verp}>\r\n");
        inbound_to(
            &store,
            "fbl@bounce.test",
            &complaint(5, "carol@ex.test", None, &return_path),
        )
        .await;
        assert_eq!(ingest.process_pending().await.unwrap(), 2);
        assert_eq!(statuses().await, ["delivered", "complained", "complained"]);
        let mut list = suppressed().await;
        list.sort_unstable();
        assert_eq!(list, ["bob@ex.test", "carol@ex.test"]);

        // Fed in by an admin, who vouches for the mailbox, the same complaint acts, marked
        // unverified.
        let fed = ingest
            .ingest(
                complaint(6, "alice@ex.test", None, &by_message_id).as_bytes(),
                &[],
                None,
            )
            .await
            .unwrap();
        assert_eq!(fed[0].correlation, Correlation::MessageId);
        assert!(!fed[0].verified && fed[0].suppressed, "{fed:?}");
        assert_eq!(statuses().await, ["complained", "complained", "complained"]);
        assert!(suppressed().await.contains(&"alice@ex.test".to_string()));
    }

    #[test]
    fn delivered_to_lists_the_addresses_of_the_delivery_fields() {
        let raw = b"Return-Path: <>\r\nDelivered-To: bounces+x-1-y@bounce.test\r\n\
                    To: App <app@example.com>,\r\n\tother@example.com\r\n\
                    X-Original-To: <orig@bounce.test>\r\nFrom: MAILER-DAEMON@mx.test\r\n\
                    \r\nTo: body@example.com\r\n";
        assert_eq!(
            delivered_to(raw),
            [
                "bounces+x-1-y@bounce.test",
                "app@example.com",
                "other@example.com",
                "orig@bounce.test"
            ]
        );
        assert!(delivered_to(b"").is_empty());
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
