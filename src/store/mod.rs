//! The outcome store: messages, recipients with their current status, and an append-only
//! event history per recipient. SQLite (WAL) is the embedded default behind the [`Store`]
//! trait so other backends can follow.

/// A recipient's current status (ARCHITECTURE.md "Outcome model").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecipientStatus {
    Queued,
    Delivered,
    Deferred,
    Failed,
    Expired,
    Suppressed,
    Bounced,
    Complained,
    Rejected,
}

impl RecipientStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Delivered => "delivered",
            Self::Deferred => "deferred",
            Self::Failed => "failed",
            Self::Expired => "expired",
            Self::Suppressed => "suppressed",
            Self::Bounced => "bounced",
            Self::Complained => "complained",
            Self::Rejected => "rejected",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Self::Queued,
            "delivered" => Self::Delivered,
            "deferred" => Self::Deferred,
            "failed" => Self::Failed,
            "expired" => Self::Expired,
            "suppressed" => Self::Suppressed,
            "bounced" => Self::Bounced,
            "complained" => Self::Complained,
            "rejected" => Self::Rejected,
            _ => return None,
        })
    }

    /// Still waiting for a delivery attempt.
    /// The receiving server took the message for this recipient (a `250`), so a bounce or a
    /// complaint about it can follow.
    pub fn was_handed_over(self) -> bool {
        matches!(
            self,
            RecipientStatus::Delivered | RecipientStatus::Bounced | RecipientStatus::Complained
        )
    }

    pub fn is_pending(self) -> bool {
        matches!(self, Self::Queued | Self::Deferred)
    }
}

impl std::fmt::Display for RecipientStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

pub mod sqlite;

use crate::receipt::ReceiptId;
use crate::spool::{AcceptedMessage, DsnRet, Notify};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Disk full, I/O, corruption: callers map it to `451 4.3.0` on the SMTP side.
    #[error("store: {0}")]
    Storage(String),
    /// SQLite found the database file damaged (`SQLITE_CORRUPT`, `SQLITE_NOTADB`). The
    /// server's store turns it into a refusal of every write (see `SqliteStore`), so no
    /// `250` is given for mail that could not be delivered from it.
    #[error("store: {0} (the database file is damaged: restore it from a backup)")]
    Corrupt(String),
    #[error("store: not found: {0}")]
    NotFound(String),
    #[error("store is closed")]
    Closed,
}

/// Which SMTP step a recorded reply answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// DNS lookup / route selection (no remote reply).
    Dns,
    /// TCP connect, banner, EHLO, STARTTLS, AUTH, MAIL (the reply applies to every recipient).
    Connect,
    Mail,
    Rcpt,
    Data,
    /// Decided locally: suppression, queue delete, expiry, submission checks.
    Local,
    /// An asynchronous bounce or complaint that came back later.
    Bounce,
}

/// The `RCPT TO` reply of a recipient the server accepted at RCPT, kept beside the DATA reply
/// that decided its attempt, so the log shows both.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RcptReply {
    pub code: u16,
    pub enhanced_status: Option<String>,
    pub text: String,
}

/// A next hop tried in an attempt before the one whose result the attempt records, and why
/// it was left (a refused connection, a `421` greeting, a `4xx` to EHLO, a failed STARTTLS).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HopFailure {
    /// `host[ip]:port`, as the server log names a next hop.
    pub hop: String,
    /// The step it failed at: `connect`, `tls`, `greeting`, `ehlo`, `helo`, `starttls`,
    /// `auth`.
    pub step: String,
    pub reply_code: Option<u16>,
    pub enhanced_status: Option<String>,
    /// The reply verbatim (multi-line joined with `\n`), or the local error, at most
    /// [`HopFailure::MAX_TEXT`] bytes.
    pub text: String,
}

impl HopFailure {
    /// Longest `text` kept: a hop that was left has its reason shown, not a whole essay.
    pub const MAX_TEXT: usize = 1024;

    /// `text` cut to [`HopFailure::MAX_TEXT`] bytes at a character boundary, marked cut.
    pub fn bounded(text: &str) -> String {
        if text.len() <= Self::MAX_TEXT {
            return text.to_string();
        }
        let mut end = Self::MAX_TEXT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &text[..end])
    }
}

/// One delivery attempt's result for one recipient (delivery → store).
#[derive(Debug, Clone, serde::Serialize)]
pub struct AttemptRecord {
    pub receipt: ReceiptId,
    /// Recipient position in the message (0-based), as in [`QueuedRecipient::index`].
    pub rcpt_index: u32,
    pub at_ms: i64,
    /// New current status: delivered, deferred, failed, expired.
    pub status: RecipientStatus,
    /// For deferred: when to try again.
    pub next_attempt_at_ms: Option<i64>,
    pub stage: Stage,
    pub remote_host: Option<String>,
    pub remote_ip: Option<String>,
    /// The next hop's TCP port (schema v9; none in older rows).
    pub remote_port: Option<u16>,
    pub tls_version: Option<String>,
    pub tls_cipher: Option<String>,
    /// `None` when no reply was received (connect failure, timeout, DNS).
    pub reply_code: Option<u16>,
    pub enhanced_status: Option<String>,
    /// Full reply text verbatim (multi-line joined with `\n`), or the local error text.
    pub reply_text: String,
    /// The RCPT reply when `stage` is `Data` (the recipient was accepted at RCPT).
    pub rcpt_reply: Option<RcptReply>,
    pub duration_ms: u64,
    /// Classifier verdict (Sisimai vocabulary) and bounce type for non-2xx replies.
    pub reason: Option<String>,
    pub bounce_type: Option<String>,
    /// This attempt queued a delay DSN for its recipient (in the same commit): marked sent
    /// with it, so the next deferral does not send another.
    pub delay_dsn: bool,
    /// Next hops tried before the one whose result this is, in the order tried (schema
    /// v11): they do not change the outcome, but the log shows them.
    pub tried_first: Vec<HopFailure>,
    /// The suppression-list entry a hard failure adds for the recipient's address, in the
    /// same commit (a receiving server's `550 5.1.1` at RCPT is a hard bounce as much as
    /// the DSN of one that accepted first).
    pub suppress: Option<Suppression>,
}

/// A DSN to queue in the same commit as what caused it, and the recipients of the original
/// message it reports: each gets a `dsn_sent` event (a delay DSN's: `delay_dsn_sent`) naming
/// the DSN's receipt, so the log shows whether, and by which message, the sender was told.
#[derive(Debug, Clone)]
pub struct DsnNotice {
    pub dsn: AcceptedMessage,
    /// The message it reports on.
    pub original: ReceiptId,
    pub reported: Vec<ReportedRecipient>,
}

/// One recipient a [`DsnNotice`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportedRecipient {
    /// Position in the original message, as in [`QueuedRecipient::index`].
    pub rcpt_index: u32,
    /// `failed`, `delayed`, `relayed`, `delivered`, or `expired` (failed by running out of
    /// queue lifetime).
    pub action: &'static str,
}

/// A queued or deferred message with the recipients that are due.
#[derive(Debug, Clone)]
pub struct QueuedMessage {
    pub receipt: ReceiptId,
    pub received_at_ms: i64,
    pub envelope_sender: String,
    pub auth_user: Option<String>,
    pub envid: Option<String>,
    pub ret: Option<DsnRet>,
    pub eight_bit: bool,
    pub smtputf8: bool,
    pub size: u64,
    pub message_id: Option<String>,
    pub subject: Option<String>,
    pub recipients: Vec<QueuedRecipient>,
}

#[derive(Debug, Clone)]
pub struct QueuedRecipient {
    pub index: u32,
    pub address: String,
    pub orcpt: Option<String>,
    pub notify: Option<Notify>,
    pub status: RecipientStatus,
    /// Delivery attempts so far.
    pub attempts: u32,
    pub next_attempt_at_ms: i64,
    /// When the first deferral happened (for delay DSNs).
    pub first_deferred_at_ms: Option<i64>,
    pub delay_dsn_sent: bool,
    pub last_reply_code: Option<u16>,
    pub last_enhanced_status: Option<String>,
    pub last_reply_text: Option<String>,
    /// When an admin made it due again (`mailtrail queue retry`) after an attempt: such mail
    /// may probe a suspended destination, once per retry. Read as `queue retry` leaves the
    /// row (due at the moment it was changed); an attempt's record always puts the next one
    /// later.
    pub retry_requested_at: Option<i64>,
}

/// A row of `mailtrail queue list`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QueueEntry {
    pub receipt: ReceiptId,
    pub received_at_ms: i64,
    pub envelope_sender: String,
    pub recipient: String,
    pub status: RecipientStatus,
    pub attempts: u32,
    pub next_attempt_at_ms: i64,
    pub last_reply: Option<String>,
}

/// `mailtrail log` selection: an address (recipient or sender, case-insensitive) or a receipt.
#[derive(Debug, Clone)]
pub enum LogKey {
    Address(String),
    Receipt(ReceiptId),
}

#[derive(Debug, Clone)]
pub struct LogQuery {
    pub key: LogKey,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub limit: usize,
    /// Only messages after this one in the log's order (older, or as old and with a smaller
    /// receipt id): the next page, exact where `until_ms` repeats messages of one millisecond.
    pub before: Option<ReceiptId>,
}

/// One message as `mailtrail log` and the API show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MessageLog {
    pub receipt: ReceiptId,
    pub received_at_ms: i64,
    pub client_ip: String,
    pub helo: String,
    pub tls_version: Option<String>,
    pub auth_user: Option<String>,
    pub envelope_sender: String,
    pub size: u64,
    pub message_id: Option<String>,
    pub subject: Option<String>,
    pub context: Option<String>,
    pub envid: Option<String>,
    pub ret: Option<DsnRet>,
    pub recipients: Vec<RecipientLog>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RecipientLog {
    pub index: u32,
    pub address: String,
    pub orcpt: Option<String>,
    pub notify: Option<String>,
    pub status: RecipientStatus,
    pub reason: Option<String>,
    pub bounce_type: Option<String>,
    pub last_reply_code: Option<u16>,
    pub last_enhanced_status: Option<String>,
    pub last_reply_text: Option<String>,
    pub updated_at_ms: i64,
    /// Delivery attempts made so far (as `queue list` counts them).
    pub attempts: u32,
    /// When the next delivery attempt is due: only while pending (queued, deferred).
    pub next_attempt_at_ms: Option<i64>,
    /// Every event, oldest first (accepted, attempts, bounces, queue actions).
    pub events: Vec<EventLog>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EventLog {
    pub at_ms: i64,
    /// `accepted`, `attempt`, `bounce`, `complaint`, `deleted`, `retry`, `expired`, `dsn_sent`, ...
    pub kind: String,
    pub status: RecipientStatus,
    pub stage: Option<Stage>,
    pub remote_host: Option<String>,
    pub remote_ip: Option<String>,
    /// The next hop's TCP port (schema v9; none in older rows).
    pub remote_port: Option<u16>,
    pub tls_version: Option<String>,
    pub reply_code: Option<u16>,
    pub enhanced_status: Option<String>,
    pub reply_text: Option<String>,
    /// For an attempt decided at DATA: the recipient's RCPT reply.
    pub rcpt_reply: Option<RcptReply>,
    pub duration_ms: Option<u64>,
    pub reason: Option<String>,
    /// For a bounce-stage event, the DSN action of the bounce record it stored (`failed`,
    /// `delayed`, `delivered`, `relayed`, `expanded`): a delay notice is no failure.
    pub action: Option<String>,
    /// For `dsn_sent` / `delay_dsn_sent`: the DSN's action (`failed`, `delayed`, `relayed`,
    /// `expired`) and its own receipt (schema v10; none in older rows), which `mailtrail log`
    /// finds it by.
    pub dsn_action: Option<String>,
    pub dsn_receipt: Option<String>,
    /// For an attempt: the next hops tried before the one that answered (schema v11; empty
    /// in older rows).
    pub tried_first: Vec<HopFailure>,
}

/// Where a bounce record was matched (bounce → store).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Correlation {
    Verp,
    ReceiptHeader,
    MessageId,
    Envid,
    Unmatched,
}

/// What one bounce record says and where correlation placed it: written by the bounce stage
/// ([`NewBounce`]) and read back as it was ([`StoredBounce`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BounceFacts {
    pub at_ms: i64,
    pub receipt: Option<ReceiptId>,
    pub rcpt_index: Option<u32>,
    pub correlation: Correlation,
    /// The recipient it is about: for a matched bounce the address we sent to, else the
    /// address the bounce names.
    pub recipient: String,
    /// The address the bounce named, when it matched a recipient with another address (a
    /// forward, or a forgery by another recipient of the same message).
    pub reported_recipient: Option<String>,
    /// `dsn`, `arf`, `autoreply`, `heuristic`.
    pub kind: String,
    pub action: Option<String>,
    pub status: Option<String>,
    pub reply_code: Option<u16>,
    pub diagnostic: Option<String>,
    pub remote_mta: Option<String>,
    pub reporting_mta: Option<String>,
    pub reason: String,
    pub bounce_type: String,
    /// The stored inbound message (bounce mail) it was parsed from, if any.
    pub source_receipt: Option<ReceiptId>,
    /// Correlation proved it is about the copy it is filed under: a VERP address whose MAC
    /// verifies (the envelope's, or the returned message's envelope sender). Only a
    /// verified bounce suppresses; the receipt id, Message-ID and ENVID are known to every
    /// recipient of the message, so a match by them alone is kept but does not.
    pub verified: bool,
}

/// A stored bounce record with its handled state.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoredBounce {
    pub id: i64,
    #[serde(flatten)]
    pub facts: BounceFacts,
    pub handled_by: Option<String>,
    pub handled_at_ms: Option<i64>,
}

/// A bounce record to store.
#[derive(Debug, Clone)]
pub struct NewBounce {
    pub facts: BounceFacts,
    /// New recipient status when matched (`bounced`, `complained`); `None` leaves it (autoreply).
    pub new_status: Option<RecipientStatus>,
    /// The suppression-list entry it adds or refreshes, if it suppresses its address.
    pub suppress: Option<Suppression>,
    /// Names this record among all returned mail (its message's own Message-ID, or a hash
    /// of its content when it has none, and its place in it): one already stored under it
    /// is not stored again.
    pub dedup_key: Option<String>,
    /// It would have moved its recipient but came over SMTP unverified: its event says so
    /// (`unverified dsn`).
    pub held_unverified: bool,
}

/// One recipient of a stored message, as correlation needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientRef {
    pub index: u32,
    /// As stored (the case the client used).
    pub address: String,
    pub status: RecipientStatus,
}

/// What [`Store::record_bounces`] did with one bounce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordedBounce {
    pub id: i64,
    /// Stored before under the same [`NewBounce::dedup_key`]: nothing was written, `id` is
    /// the earlier one's.
    pub duplicate: bool,
}

#[derive(Debug, Clone, Default)]
pub struct BounceQuery {
    pub address: Option<String>,
    pub reason: Option<String>,
    pub unhandled_only: bool,
    /// Only the first (oldest) bounce per address.
    pub first_only: bool,
    pub limit: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Suppression {
    pub address: String,
    pub reason: String,
    /// `bounce`, `complaint`, `manual`.
    pub source: String,
    pub first_at_ms: i64,
    pub last_at_ms: i64,
    pub count: u32,
    /// `None` = never expires.
    pub expires_at_ms: Option<i64>,
}

/// The outcome store. Writes are durable when the future resolves (group commit: one fsync
/// shared by every write queued meanwhile). Reads see every committed write.
/// What marking a bounce handled (or unhandled) did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandledChange {
    Changed,
    /// It was so already: who marked it and when (both `None` when it is unhandled). The
    /// first handler's name and time are kept, not overwritten.
    Already {
        by: Option<String>,
        at_ms: Option<i64>,
    },
    NoSuchBounce,
}

#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    // --- accept (spool) ---
    /// Durably stores body, envelope, recipients (`queued`, or their preset outcome) and an
    /// `accepted` event per recipient.
    async fn accept(&self, msg: AcceptedMessage) -> Result<(), StoreError>;

    /// [`Store::accept`] of `msg` with `notices` (the DSNs about its recipients decided at
    /// accept) in the same commit, so neither is kept without the other.
    async fn accept_with_notices(
        &self,
        msg: AcceptedMessage,
        notices: Vec<DsnNotice>,
    ) -> Result<(), StoreError>;

    /// Drops message bodies no longer needed: received before `before_ms`, every recipient
    /// final (inbound bounce mail: processed). The record of what happened stays. Returns how
    /// many were dropped.
    async fn purge_bodies(&self, before_ms: i64) -> Result<usize, StoreError>;

    /// Deletes the log of finished mail received before `before_ms` (message, body,
    /// recipients, events; pending mail and unprocessed inbound bounce mail stay) and the
    /// bounce records recorded before it. Returns (messages, bounces) deleted.
    async fn purge_log(&self, before_ms: i64) -> Result<(usize, usize), StoreError>;

    /// Counters of the backend's commits, when it keeps them (exported at `/metrics`).
    fn commit_counters(&self) -> Option<sqlite::WriterStats> {
        None
    }

    /// Why every write fails until a restart (a failed fsync; the database file deleted or
    /// replaced), when that is so; `/healthz` reports it. May look at the disk: call it off
    /// the async workers.
    fn write_refusal(&self) -> Option<String> {
        None
    }

    /// Called once when `serve` stops, after its last write: folds the write-ahead log into
    /// the database file, so that a copy of the database file alone, taken while mailtrail is
    /// stopped, holds every message. Blocking: call it off the async workers.
    fn checkpoint(&self) -> Result<(), StoreError> {
        Ok(())
    }

    // --- delivery ---
    /// Messages with at least one recipient `queued`/`deferred` whose next attempt is due at
    /// `now_ms`, oldest first; only the due recipients are listed. With `after`, only
    /// messages whose receipt sorts after it (newer mail: a cheap range scan, for picking up
    /// what was just accepted without rereading the whole queue).
    async fn due(
        &self,
        now_ms: i64,
        limit: usize,
        after: Option<ReceiptId>,
    ) -> Result<Vec<QueuedMessage>, StoreError>;
    /// Earliest `next_attempt_at_ms` among pending recipients (for the scheduler's sleep).
    async fn next_due_at(&self) -> Result<Option<i64>, StoreError>;
    async fn body(&self, receipt: ReceiptId) -> Result<Vec<u8>, StoreError>;
    /// Records attempts (each updates the recipient's current status and appends an event)
    /// and, in the same commit, queues the DSNs they caused with an event on each recipient
    /// they report.
    async fn record_attempts(
        &self,
        attempts: Vec<AttemptRecord>,
        dsns: Vec<DsnNotice>,
    ) -> Result<(), StoreError>;
    async fn queue_list(&self) -> Result<Vec<QueueEntry>, StoreError>;
    /// Makes pending recipients due now; `None` = all. Returns how many.
    async fn queue_retry(&self, receipt: Option<ReceiptId>) -> Result<usize, StoreError>;
    /// Removes a message's pending recipients from the queue (status `failed`, event
    /// `deleted`). Returns how many.
    async fn queue_delete(&self, receipt: ReceiptId) -> Result<usize, StoreError>;
    /// (pending recipients, oldest pending receipt time) for metrics.
    async fn queue_stats(&self) -> Result<(u64, Option<i64>), StoreError>;

    // --- inbound bounce mail (bounce stage) ---
    /// Inbound bounce messages (`inbound_bounce = true`) stored but not yet marked processed,
    /// oldest first. Their recipients are never due for delivery; the bounce stage reads the
    /// body with [`Store::body`], records what it found, then calls
    /// [`Store::mark_inbound_processed`]. At start it calls this so bounce mail accepted
    /// before a crash is still parsed.
    async fn pending_inbound_bounces(&self) -> Result<Vec<ReceiptId>, StoreError>;
    /// Marks an inbound bounce message parsed (`NotFound` if it is not one).
    async fn mark_inbound_processed(&self, receipt: ReceiptId) -> Result<(), StoreError>;

    // --- log ---
    async fn log(&self, query: &LogQuery) -> Result<Vec<MessageLog>, StoreError>;

    // --- bounces ---
    /// Finds `address` (case-insensitive) among the recipients of `receipt`.
    async fn find_recipient(
        &self,
        receipt: ReceiptId,
        address: &str,
    ) -> Result<Option<RecipientRef>, StoreError>;
    /// Recipient `idx` of `receipt`, if the store has it.
    async fn recipient(
        &self,
        receipt: ReceiptId,
        idx: u32,
    ) -> Result<Option<RecipientRef>, StoreError>;
    /// Receipt of the sent message with this `Message-ID` (angle brackets stripped) that
    /// has `address` (case-insensitive) among its recipients: of several (an application
    /// resending under one Message-ID), the newest received at or before `before_ms` (the
    /// bounce's date), else the oldest after it.
    async fn find_by_message_id(
        &self,
        message_id: &str,
        address: &str,
        before_ms: i64,
    ) -> Result<Option<ReceiptId>, StoreError>;
    /// As [`Store::find_by_message_id`], by the ENVID given at submission.
    async fn find_by_envid(
        &self,
        envid: &str,
        address: &str,
        before_ms: i64,
    ) -> Result<Option<ReceiptId>, StoreError>;
    /// Stores the bounces parsed from one returned message, in one commit or not at all:
    /// each moves its matched recipient's status and appends its event, and adds its
    /// suppression; `processed`, the inbound bounce mail they came from, is marked processed
    /// in the same commit (`NotFound` if it is not one), so a crash or a refused write never
    /// leaves half of a message's records stored, to be stored again by the next run. A
    /// bounce whose `dedup_key` is stored already changes nothing. Returns what became of
    /// each, in order.
    async fn record_bounces(
        &self,
        bounces: Vec<NewBounce>,
        processed: Option<ReceiptId>,
    ) -> Result<Vec<RecordedBounce>, StoreError>;
    async fn bounces(&self, query: &BounceQuery) -> Result<Vec<StoredBounce>, StoreError>;
    /// Sets or clears the handled flag (see [`HandledChange`]).
    async fn set_handled(
        &self,
        id: i64,
        by: Option<&str>,
        at_ms: i64,
    ) -> Result<HandledChange, StoreError>;
    /// Types of the recent bounces that changed the status of a recipient with this
    /// address (failures matched to mail we sent that may act; not delay notices,
    /// auto-replies, unmatched records or unverified ones over SMTP), newest first, one per
    /// returned message, each with when it was stored: the soft-bounce run.
    async fn recent_bounce_types(
        &self,
        address: &str,
        since_ms: i64,
    ) -> Result<Vec<(String, i64)>, StoreError>;

    // --- suppression ---
    /// Adds or refreshes (count + 1, last time) an entry.
    async fn suppress(&self, entry: Suppression) -> Result<(), StoreError>;
    async fn unsuppress(&self, address: &str) -> Result<bool, StoreError>;
    /// The live (unexpired at `now_ms`) entry for an address, case-insensitive.
    async fn suppressed(
        &self,
        address: &str,
        now_ms: i64,
    ) -> Result<Option<Suppression>, StoreError>;
    async fn suppression_list(&self, now_ms: i64) -> Result<Vec<Suppression>, StoreError>;
    /// A number that changes whenever the suppression list changes (any process), so callers
    /// can cache the list and reload it only then.
    async fn suppression_version(&self) -> Result<i64, StoreError>;
}

/// `address` with a domain holding `xn--` labels in its Unicode form (RFC 5890: the same
/// domain); `None` when it holds none, is an address literal, or does not convert.
pub fn idn_unicode_spelling(address: &str) -> Option<String> {
    let (local, domain) = address.rsplit_once('@')?;
    if domain.starts_with('[') || !domain.contains("xn--") {
        return None;
    }
    let (unicode, errors) = idna::domain_to_unicode(domain);
    errors.ok()?;
    Some(format!("{local}@{unicode}"))
}

/// `address` (lowercased) with its domain in the other IDN spelling: the A-label form of a
/// Unicode domain, the Unicode form of one with `xn--` labels; `None` when the domain has
/// neither (plain ASCII, an address literal) or does not convert.
pub fn other_idn_spelling(address: &str) -> Option<String> {
    let (local, domain) = address.rsplit_once('@')?;
    if domain.starts_with('[') {
        return None;
    }
    let other = if domain.is_ascii() {
        idn_unicode_spelling(address)?
    } else {
        format!("{local}@{}", idna::domain_to_ascii(domain).ok()?)
    };
    (other != address).then_some(other)
}
