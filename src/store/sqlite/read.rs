//! The read queries, each a function over a (read-only) connection. Multi-statement reads
//! run in one read transaction so they see a single committed snapshot.

use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::receipt::ReceiptId;
use crate::spool::{DsnRet, Notify};
use crate::store::{
    BounceFacts, BounceQuery, Correlation, EventLog, LogKey, LogQuery, MessageLog, QueueEntry,
    QueuedMessage, QueuedRecipient, RcptReply, RecipientLog, RecipientRef, RecipientStatus, Stage,
    StoreError, StoredBounce, Suppression,
};

use super::write::message_id_key;
use super::{address_key, parse_correlation, parse_stage, storage};

fn conversion(idx: usize, msg: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        idx,
        rusqlite::types::Type::Text,
        Box::<dyn std::error::Error + Send + Sync>::from(msg),
    )
}

fn receipt_at(row: &Row, idx: usize) -> rusqlite::Result<ReceiptId> {
    let s: String = row.get(idx)?;
    s.parse()
        .map_err(|e: crate::receipt::ParseReceiptError| conversion(idx, e.to_string()))
}

fn opt_receipt_at(row: &Row, idx: usize) -> rusqlite::Result<Option<ReceiptId>> {
    let s: Option<String> = row.get(idx)?;
    s.map(|s| {
        s.parse()
            .map_err(|e: crate::receipt::ParseReceiptError| conversion(idx, e.to_string()))
    })
    .transpose()
}

fn u64_at(row: &Row, idx: usize) -> rusqlite::Result<u64> {
    let v: i64 = row.get(idx)?;
    u64::try_from(v).map_err(|_| conversion(idx, format!("negative count {v}")))
}

fn status_at(row: &Row, idx: usize) -> rusqlite::Result<RecipientStatus> {
    let s: String = row.get(idx)?;
    RecipientStatus::parse(&s).ok_or_else(|| conversion(idx, format!("unknown status {s:?}")))
}

fn ret_at(row: &Row, idx: usize) -> rusqlite::Result<Option<DsnRet>> {
    let s: Option<String> = row.get(idx)?;
    Ok(match s.as_deref() {
        Some("full") => Some(DsnRet::Full),
        Some("hdrs") => Some(DsnRet::Hdrs),
        _ => None,
    })
}

fn notify_at(row: &Row, idx: usize) -> rusqlite::Result<Option<Notify>> {
    let s: Option<String> = row.get(idx)?;
    Ok(s.and_then(|s| Notify::from_param(&s)))
}

fn stage_at(row: &Row, idx: usize) -> rusqlite::Result<Option<Stage>> {
    let s: Option<String> = row.get(idx)?;
    Ok(s.and_then(|s| parse_stage(&s)))
}

/// `LIMIT` value: 0 means no limit.
fn sql_limit(limit: usize) -> i64 {
    if limit == 0 {
        -1
    } else {
        i64::try_from(limit).unwrap_or(i64::MAX)
    }
}

const PENDING: &str = "status IN ('queued', 'deferred')";

/// Receipts with a due recipient, oldest first. MATERIALIZED keeps the planner on the
/// partial `recipients_due` index instead of walking the whole primary key in receipt order.
pub(super) const DUE_RECEIPTS: &str = "
    WITH due AS MATERIALIZED (
        SELECT receipt FROM recipients
        WHERE status IN ('queued', 'deferred') AND next_attempt_at <= ?1)
    SELECT DISTINCT receipt FROM due ORDER BY receipt LIMIT ?2";

/// Due receipts after a given one: a range scan of the primary key, cheap when few messages
/// are newer (the scheduler's way to pick up fresh mail).
pub(super) const DUE_RECEIPTS_AFTER: &str = "
    SELECT DISTINCT receipt FROM recipients
    WHERE receipt > ?3 AND status IN ('queued', 'deferred') AND next_attempt_at <= ?1
    ORDER BY receipt LIMIT ?2";

/// Messages that name an address as a recipient or as the envelope sender.
pub(super) const BY_ADDRESS: &str = "
    receipt IN (SELECT receipt FROM recipients WHERE address_lc = ?1
                UNION SELECT receipt FROM messages WHERE envelope_sender_lc = ?1)";

pub fn due(
    conn: &Connection,
    now_ms: i64,
    limit: usize,
    after: Option<ReceiptId>,
) -> Result<Vec<QueuedMessage>, StoreError> {
    let tx = conn.unchecked_transaction().map_err(storage)?;
    let receipts: Vec<String> = match after {
        None => {
            let mut st = tx.prepare_cached(DUE_RECEIPTS).map_err(storage)?;
            st.query_map(params![now_ms, sql_limit(limit)], |r| r.get(0))
                .and_then(|rows| rows.collect::<Result<_, _>>())
                .map_err(storage)?
        }
        Some(after) => {
            let mut st = tx.prepare_cached(DUE_RECEIPTS_AFTER).map_err(storage)?;
            st.query_map(params![now_ms, sql_limit(limit), after.to_string()], |r| {
                r.get(0)
            })
            .and_then(|rows| rows.collect::<Result<_, _>>())
            .map_err(storage)?
        }
    };
    let mut out = Vec::with_capacity(receipts.len());
    let mut msg_st = tx
        .prepare_cached(
            "SELECT receipt, received_at, envelope_sender, auth_user, envid, ret, eight_bit,
                 smtputf8, size, message_id, subject
             FROM messages WHERE receipt = ?1",
        )
        .map_err(storage)?;
    let mut rcpt_st = tx
        .prepare_cached(&format!(
            "SELECT idx, address, orcpt, notify, status, attempts, next_attempt_at,
                 first_deferred_at, delay_dsn_sent, last_reply_code, last_enhanced,
                 last_reply_text,
                 CASE WHEN attempts > 0 AND next_attempt_at = updated_at THEN updated_at END
             FROM recipients
             WHERE receipt = ?1 AND {PENDING} AND next_attempt_at <= ?2 ORDER BY idx"
        ))
        .map_err(storage)?;
    for receipt in receipts {
        let recipients = rcpt_st
            .query_map(params![receipt, now_ms], |r| {
                Ok(QueuedRecipient {
                    index: r.get(0)?,
                    address: r.get(1)?,
                    orcpt: r.get(2)?,
                    notify: notify_at(r, 3)?,
                    status: status_at(r, 4)?,
                    attempts: r.get(5)?,
                    next_attempt_at_ms: r.get(6)?,
                    first_deferred_at_ms: r.get(7)?,
                    delay_dsn_sent: r.get(8)?,
                    last_reply_code: r.get(9)?,
                    last_enhanced_status: r.get(10)?,
                    last_reply_text: r.get(11)?,
                    retry_requested_at: r.get(12)?,
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(storage)?;
        let msg = msg_st
            .query_row(params![receipt], |r| {
                Ok(QueuedMessage {
                    receipt: receipt_at(r, 0)?,
                    received_at_ms: r.get(1)?,
                    envelope_sender: r.get(2)?,
                    auth_user: r.get(3)?,
                    envid: r.get(4)?,
                    ret: ret_at(r, 5)?,
                    eight_bit: r.get(6)?,
                    smtputf8: r.get(7)?,
                    size: u64_at(r, 8)?,
                    message_id: r.get(9)?,
                    subject: r.get(10)?,
                    recipients: Vec::new(),
                })
            })
            .map_err(storage)?;
        out.push(QueuedMessage { recipients, ..msg });
    }
    Ok(out)
}

pub fn next_due_at(conn: &Connection) -> Result<Option<i64>, StoreError> {
    conn.query_row(
        &format!("SELECT MIN(next_attempt_at) FROM recipients WHERE {PENDING}"),
        [],
        |r| r.get(0),
    )
    .map_err(storage)
}

pub fn body(conn: &Connection, receipt: ReceiptId) -> Result<Vec<u8>, StoreError> {
    conn.prepare_cached("SELECT body FROM bodies WHERE receipt = ?1")
        .and_then(|mut st| {
            st.query_row(params![receipt.to_string()], |r| r.get(0))
                .optional()
        })
        .map_err(storage)?
        .ok_or_else(|| StoreError::NotFound(format!("body of {receipt}")))
}

/// "250 2.0.0 text" from a recipient's last reply columns.
fn last_reply(code: Option<u16>, enhanced: Option<String>, text: Option<String>) -> Option<String> {
    let parts: Vec<String> = [code.map(|c| c.to_string()), enhanced, text]
        .into_iter()
        .flatten()
        .collect();
    (!parts.is_empty()).then(|| parts.join(" "))
}

pub fn queue_list(conn: &Connection) -> Result<Vec<QueueEntry>, StoreError> {
    let mut st = conn
        .prepare_cached(&format!(
            "SELECT r.receipt, m.received_at, m.envelope_sender, r.address, r.status, r.attempts,
                 r.next_attempt_at, r.last_reply_code, r.last_enhanced, r.last_reply_text
             FROM recipients r JOIN messages m ON m.receipt = r.receipt
             WHERE r.{PENDING} ORDER BY r.next_attempt_at, r.receipt, r.idx"
        ))
        .map_err(storage)?;
    st.query_map([], |r| {
        Ok(QueueEntry {
            receipt: receipt_at(r, 0)?,
            received_at_ms: r.get(1)?,
            envelope_sender: r.get(2)?,
            recipient: r.get(3)?,
            status: status_at(r, 4)?,
            attempts: r.get(5)?,
            next_attempt_at_ms: r.get(6)?,
            last_reply: last_reply(r.get(7)?, r.get(8)?, r.get(9)?),
        })
    })
    .and_then(|rows| rows.collect())
    .map_err(storage)
}

pub fn queue_stats(conn: &Connection) -> Result<(u64, Option<i64>), StoreError> {
    conn.query_row(
        &format!(
            "SELECT COUNT(*), MIN(m.received_at)
             FROM recipients r JOIN messages m ON m.receipt = r.receipt WHERE r.{PENDING}"
        ),
        [],
        |r| Ok((u64_at(r, 0)?, r.get(1)?)),
    )
    .map_err(storage)
}

pub fn pending_inbound_bounces(conn: &Connection) -> Result<Vec<ReceiptId>, StoreError> {
    let mut st = conn
        .prepare_cached(
            "SELECT receipt FROM messages
             WHERE inbound_bounce = 1 AND inbound_processed_at IS NULL ORDER BY receipt",
        )
        .map_err(storage)?;
    st.query_map([], |r| receipt_at(r, 0))
        .and_then(|rows| rows.collect())
        .map_err(storage)
}

pub fn log(conn: &Connection, q: &LogQuery) -> Result<Vec<MessageLog>, StoreError> {
    let tx = conn.unchecked_transaction().map_err(storage)?;
    let since = q.since_ms.unwrap_or(i64::MIN);
    let until = q.until_ms.unwrap_or(i64::MAX);
    let columns = "receipt, received_at, client_ip, helo, tls_version, auth_user, envelope_sender,
                   size, message_id, subject, context, envid, ret";
    let (sql, key) = match &q.key {
        LogKey::Address(a) => (
            format!(
                "SELECT {columns} FROM messages
                 WHERE {BY_ADDRESS}
                   AND received_at >= ?2 AND received_at <= ?3
                   AND (?5 IS NULL OR (received_at, receipt)
                        < (SELECT received_at, receipt FROM messages WHERE receipt = ?5))
                 ORDER BY received_at DESC, receipt DESC LIMIT ?4"
            ),
            address_key(a),
        ),
        LogKey::Receipt(r) => (
            format!(
                "SELECT {columns} FROM messages
                 WHERE receipt = ?1 AND received_at >= ?2 AND received_at <= ?3
                   AND (?5 IS NULL OR receipt < ?5) LIMIT ?4"
            ),
            r.to_string(),
        ),
    };
    let before = q.before.map(|r| r.to_string());
    if let Some(b) = &before {
        let known: bool = tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM messages WHERE receipt = ?1)",
                [b],
                |r| r.get(0),
            )
            .map_err(storage)?;
        if !known {
            return Err(StoreError::NotFound(format!(
                "no message with receipt {b} (before)"
            )));
        }
    }
    let mut messages: Vec<MessageLog> = {
        let mut st = tx.prepare(&sql).map_err(storage)?;
        st.query_map(
            params![key, since, until, sql_limit(q.limit), before],
            |r| {
                Ok(MessageLog {
                    receipt: receipt_at(r, 0)?,
                    received_at_ms: r.get(1)?,
                    client_ip: r.get(2)?,
                    helo: r.get(3)?,
                    tls_version: r.get(4)?,
                    auth_user: r.get(5)?,
                    envelope_sender: r.get(6)?,
                    size: u64_at(r, 7)?,
                    message_id: r.get(8)?,
                    subject: r.get(9)?,
                    context: r.get(10)?,
                    envid: r.get(11)?,
                    ret: ret_at(r, 12)?,
                    recipients: Vec::new(),
                })
            },
        )
        .and_then(|rows| rows.collect::<Result<_, _>>())
        .map_err(storage)?
    };
    let mut rcpt_st = tx
        .prepare_cached(
            "SELECT idx, address, orcpt, notify, status, reason, bounce_type, last_reply_code,
                 last_enhanced, last_reply_text, updated_at, attempts, next_attempt_at
             FROM recipients WHERE receipt = ?1 ORDER BY idx",
        )
        .map_err(storage)?;
    let mut event_st = tx
        .prepare_cached(
            "SELECT at, kind, status, stage, remote_host, remote_ip, tls_version, reply_code,
                 enhanced_status, reply_text, duration_ms, reason,
                 rcpt_reply_code, rcpt_enhanced_status, rcpt_reply_text, remote_port,
                 dsn_action, dsn_receipt, tried_first,
                 -- A bounce event is written with its bounce record, at the same moment.
                 CASE WHEN stage = 'bounce' THEN
                     (SELECT b.action FROM bounces b
                      WHERE b.receipt = e.receipt AND b.idx = e.idx AND b.at = e.at
                        AND b.reason IS e.reason
                        AND b.status IS e.enhanced_status AND b.reply_code IS e.reply_code
                      ORDER BY b.id LIMIT 1)
                 END
             FROM events e WHERE receipt = ?1 AND idx = ?2 ORDER BY at, id",
        )
        .map_err(storage)?;
    for m in &mut messages {
        let receipt = m.receipt.to_string();
        let mut recipients: Vec<RecipientLog> = rcpt_st
            .query_map(params![receipt], |r| {
                let status = status_at(r, 4)?;
                Ok(RecipientLog {
                    index: r.get(0)?,
                    address: r.get(1)?,
                    orcpt: r.get(2)?,
                    notify: r.get(3)?,
                    status,
                    reason: r.get(5)?,
                    bounce_type: r.get(6)?,
                    last_reply_code: r.get(7)?,
                    last_enhanced_status: r.get(8)?,
                    last_reply_text: r.get(9)?,
                    updated_at_ms: r.get(10)?,
                    attempts: r.get(11)?,
                    // A final recipient keeps the column's last value, which means nothing.
                    next_attempt_at_ms: if status.is_pending() {
                        r.get(12)?
                    } else {
                        None
                    },
                    events: Vec::new(),
                })
            })
            .and_then(|rows| rows.collect::<Result<_, _>>())
            .map_err(storage)?;
        for rc in &mut recipients {
            rc.events = event_st
                .query_map(params![receipt, rc.index], |r| {
                    Ok(EventLog {
                        at_ms: r.get(0)?,
                        kind: r.get(1)?,
                        status: status_at(r, 2)?,
                        stage: stage_at(r, 3)?,
                        remote_host: r.get(4)?,
                        remote_ip: r.get(5)?,
                        remote_port: r.get(15)?,
                        tls_version: r.get(6)?,
                        reply_code: r.get(7)?,
                        enhanced_status: r.get(8)?,
                        reply_text: r.get(9)?,
                        duration_ms: r.get::<_, Option<i64>>(10)?.map(|d| d.max(0) as u64),
                        reason: r.get(11)?,
                        action: r.get(19)?,
                        rcpt_reply: match r.get::<_, Option<u16>>(12)? {
                            Some(code) => Some(RcptReply {
                                code,
                                enhanced_status: r.get(13)?,
                                text: r.get::<_, Option<String>>(14)?.unwrap_or_default(),
                            }),
                            None => None,
                        },
                        dsn_action: r.get(16)?,
                        dsn_receipt: r.get(17)?,
                        // A row this build cannot read shows no earlier hops rather than
                        // hiding the whole log.
                        tried_first: r
                            .get::<_, Option<String>>(18)?
                            .and_then(|j| serde_json::from_str(&j).ok())
                            .unwrap_or_default(),
                    })
                })
                .and_then(|rows| rows.collect::<Result<_, _>>())
                .map_err(storage)?;
        }
        m.recipients = recipients;
    }
    Ok(messages)
}

pub fn find_recipient(
    conn: &Connection,
    receipt: ReceiptId,
    address: &str,
) -> Result<Option<RecipientRef>, StoreError> {
    conn.query_row(
        "SELECT idx, address, status FROM recipients WHERE receipt = ?1 AND address_lc = ?2
         ORDER BY idx LIMIT 1",
        params![receipt.to_string(), address_key(address)],
        recipient_ref,
    )
    .optional()
    .map_err(storage)
}

pub fn recipient(
    conn: &Connection,
    receipt: ReceiptId,
    idx: u32,
) -> Result<Option<RecipientRef>, StoreError> {
    conn.query_row(
        "SELECT idx, address, status FROM recipients WHERE receipt = ?1 AND idx = ?2",
        params![receipt.to_string(), idx],
        recipient_ref,
    )
    .optional()
    .map_err(storage)
}

/// A row of `idx, address, status`.
fn recipient_ref(r: &Row) -> rusqlite::Result<RecipientRef> {
    Ok(RecipientRef {
        index: r.get(0)?,
        address: r.get(1)?,
        status: status_at(r, 2)?,
    })
}

/// The sent message with Message-ID `message_id` that has `address` among its recipients:
/// of those, the newest received at or before `before_ms` (the bounce's date), else (a
/// clock ahead of ours) the oldest after it. An application that resends under the same
/// Message-ID has several; the newest alone tied a bounce for the older copy to the newer.
pub fn find_by_message_id(
    conn: &Connection,
    message_id: &str,
    address: &str,
    before_ms: i64,
) -> Result<Option<ReceiptId>, StoreError> {
    sent_to(
        conn,
        "m.message_id_key = ?1",
        &message_id_key(message_id),
        address,
        before_ms,
    )
}

/// As [`find_by_message_id`], by the ENVID given at submission.
pub fn find_by_envid(
    conn: &Connection,
    envid: &str,
    address: &str,
    before_ms: i64,
) -> Result<Option<ReceiptId>, StoreError> {
    sent_to(conn, "m.envid = ?1", envid, address, before_ms)
}

/// The receipt of the sent message matching `filter` (on `?1` = `value`) with `address`
/// among its recipients: the newest received at or before `before_ms`, else the oldest after.
fn sent_to(
    conn: &Connection,
    filter: &str,
    value: &str,
    address: &str,
    before_ms: i64,
) -> Result<Option<ReceiptId>, StoreError> {
    conn.prepare_cached(&format!(
        "SELECT m.receipt FROM messages m JOIN recipients r ON r.receipt = m.receipt
         WHERE {filter} AND m.inbound_bounce = 0 AND r.address_lc = ?2
         ORDER BY m.received_at <= ?3 DESC,
             CASE WHEN m.received_at <= ?3 THEN m.received_at END DESC, m.received_at,
             m.receipt DESC
         LIMIT 1"
    ))
    .and_then(|mut st| {
        st.query_row(params![value, address_key(address), before_ms], |r| {
            receipt_at(r, 0)
        })
        .optional()
    })
    .map_err(storage)
}

fn bounce_row(r: &Row) -> rusqlite::Result<StoredBounce> {
    let correlation: String = r.get(3)?;
    let facts = BounceFacts {
        at_ms: r.get(1)?,
        receipt: opt_receipt_at(r, 2)?,
        correlation: parse_correlation(&correlation).unwrap_or(Correlation::Unmatched),
        rcpt_index: r.get(4)?,
        recipient: r.get(5)?,
        kind: r.get(6)?,
        action: r.get(7)?,
        status: r.get(8)?,
        reply_code: r.get(9)?,
        diagnostic: r.get(10)?,
        remote_mta: r.get(11)?,
        reporting_mta: r.get(12)?,
        reason: r.get(13)?,
        bounce_type: r.get(14)?,
        source_receipt: opt_receipt_at(r, 15)?,
        reported_recipient: r.get(18)?,
        verified: r.get(19)?,
    };
    Ok(StoredBounce {
        id: r.get(0)?,
        facts,
        handled_by: r.get(16)?,
        handled_at_ms: r.get(17)?,
    })
}

/// Bounces matching every filter, newest first; with `first_only`, the oldest matching
/// bounce of each address. A success report (reason `delivered`, a DSN saying the mail
/// arrived) is listed, but is no unhandled bounce and no address's first bounce: there is
/// nothing to handle. (Auto-replies and delay notices stay on the unhandled list: the
/// issue's admin handles what came back, and a delay may turn into a failure.) A `limit`
/// of 0 means no limit.
pub fn bounces(conn: &Connection, q: &BounceQuery) -> Result<Vec<StoredBounce>, StoreError> {
    let sql = "
        WITH matching AS (
            SELECT *, ROW_NUMBER() OVER (PARTITION BY recipient_lc ORDER BY at, id) AS nth
            FROM bounces
            WHERE (?1 IS NULL OR recipient_lc = ?1)
              AND (?2 IS NULL OR reason = ?2)
              AND (NOT ?3 OR handled_at IS NULL)
              AND (NOT (?3 OR ?4) OR reason <> 'delivered')
        )
        SELECT id, at, receipt, correlation, idx, recipient, kind, action, status, reply_code,
               diagnostic, remote_mta, reporting_mta, reason, bounce_type, source_receipt,
               handled_by, handled_at, reported_recipient, verified
        FROM matching WHERE (NOT ?4 OR nth = 1)
        ORDER BY at DESC, id DESC LIMIT ?5";
    let mut st = conn.prepare_cached(sql).map_err(storage)?;
    st.query_map(
        params![
            q.address.as_deref().map(address_key),
            q.reason,
            q.unhandled_only,
            q.first_only,
            sql_limit(q.limit),
        ],
        bounce_row,
    )
    .and_then(|rows| rows.collect())
    .map_err(storage)
}

pub fn recent_bounce_types(
    conn: &Connection,
    address: &str,
    since_ms: i64,
) -> Result<Vec<(String, i64)>, StoreError> {
    let mut st = conn
        // One row per returned message (its receipt; a record fed in by `bounce ingest` has
        // none and counts alone), the type of its newest record (SQLite takes the bare column
        // from the row of the MAX). Records that acted before schema 8 include unverified
        // ones over SMTP (a source receipt, not verified), which no longer may.
        .prepare_cached(
            "SELECT bounce_type, MAX(at) AS last FROM bounces
             WHERE recipient_lc = ?1 AND at >= ?2 AND acted = 1
               AND (verified = 1 OR source_receipt IS NULL)
             GROUP BY COALESCE(source_receipt, 'row ' || id)
             ORDER BY last DESC",
        )
        .map_err(storage)?;
    st.query_map(params![address_key(address), since_ms], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .and_then(|rows| rows.collect())
    .map_err(storage)
}

fn suppression_row(r: &Row) -> rusqlite::Result<Suppression> {
    Ok(Suppression {
        address: r.get(0)?,
        reason: r.get(1)?,
        source: r.get(2)?,
        first_at_ms: r.get(3)?,
        last_at_ms: r.get(4)?,
        count: r.get(5)?,
        expires_at_ms: r.get(6)?,
    })
}

const SUPPRESSION_COLUMNS: &str =
    "address, reason, source, first_at, last_at, count, expires_at FROM suppressions";

pub fn suppressed(
    conn: &Connection,
    address: &str,
    now_ms: i64,
) -> Result<Option<Suppression>, StoreError> {
    // Under the address as written or in its domain's other IDN spelling.
    let [key, other] = super::address_key_spellings(address);
    conn.query_row(
        &format!(
            "SELECT {SUPPRESSION_COLUMNS}
             WHERE address_lc IN (?1, ?3) AND (expires_at IS NULL OR expires_at > ?2)
             ORDER BY last_at DESC LIMIT 1"
        ),
        params![key, now_ms, other],
        suppression_row,
    )
    .optional()
    .map_err(storage)
}

pub fn suppression_list(conn: &Connection, now_ms: i64) -> Result<Vec<Suppression>, StoreError> {
    let mut st = conn
        .prepare_cached(&format!(
            "SELECT {SUPPRESSION_COLUMNS}
             WHERE expires_at IS NULL OR expires_at > ?1 ORDER BY last_at DESC, address_lc"
        ))
        .map_err(storage)?;
    st.query_map(params![now_ms], suppression_row)
        .and_then(|rows| rows.collect())
        .map_err(storage)
}
