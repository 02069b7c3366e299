//! The write commands, each a function over the writer's connection. They run inside the
//! writer's batch transaction (their own savepoint), so they never begin or commit.

use rusqlite::{Connection, OptionalExtension, params};

use crate::receipt::ReceiptId;
use crate::spool::{AcceptedMessage, DsnRet};
use crate::store::{
    AttemptRecord, DsnNotice, HandledChange, NewBounce, RcptReply, RecipientStatus, RecordedBounce,
    Stage, StoreError, Suppression,
};

use super::{address_key, correlation_str, stage_str, storage};

/// An event row to append.
#[derive(Default)]
struct Event<'a> {
    at: i64,
    kind: &'a str,
    status: &'a str,
    stage: Option<&'a str>,
    remote_host: Option<&'a str>,
    remote_ip: Option<&'a str>,
    remote_port: Option<u16>,
    tls_version: Option<&'a str>,
    tls_cipher: Option<&'a str>,
    reply_code: Option<u16>,
    enhanced_status: Option<&'a str>,
    reply_text: Option<&'a str>,
    duration_ms: Option<u64>,
    reason: Option<&'a str>,
    rcpt_reply: Option<&'a RcptReply>,
    dsn_action: Option<&'a str>,
    dsn_receipt: Option<&'a str>,
    /// JSON array of `HopFailure`.
    tried_first: Option<String>,
}

fn append_event(conn: &Connection, receipt: &str, idx: u32, e: &Event) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO events (receipt, idx, at, kind, status, stage, remote_host, remote_ip,
             tls_version, tls_cipher, reply_code, enhanced_status, reply_text, duration_ms, reason,
             rcpt_reply_code, rcpt_enhanced_status, rcpt_reply_text, remote_port, dsn_action,
             dsn_receipt, tried_first)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18,
             ?19, ?20, ?21, ?22)",
    )
    .and_then(|mut st| {
        st.execute(params![
            receipt,
            idx,
            e.at,
            e.kind,
            e.status,
            e.stage,
            e.remote_host,
            e.remote_ip,
            e.tls_version,
            e.tls_cipher,
            e.reply_code,
            e.enhanced_status,
            e.reply_text,
            e.duration_ms.map(|d| d.min(i64::MAX as u64) as i64),
            e.reason,
            e.rcpt_reply.map(|r| r.code),
            e.rcpt_reply.and_then(|r| r.enhanced_status.as_deref()),
            e.rcpt_reply.map(|r| r.text.as_str()),
            e.remote_port,
            e.dsn_action,
            e.dsn_receipt,
            e.tried_first,
        ])
    })
    .map_err(storage)?;
    Ok(())
}

/// `Message-ID` as looked up: without surrounding whitespace and angle brackets.
pub fn message_id_key(id: &str) -> String {
    let t = id.trim();
    let t = t.strip_prefix('<').unwrap_or(t);
    let t = t.strip_suffix('>').unwrap_or(t);
    t.trim().to_string()
}

pub fn ret_str(ret: DsnRet) -> &'static str {
    match ret {
        DsnRet::Full => "full",
        DsnRet::Hdrs => "hdrs",
    }
}

/// Text an inbound bounce recipient's status records: the mail reached us, its destination.
const INBOUND_BOUNCE_TEXT: &str = "accepted for bounce processing";

pub fn accept(conn: &Connection, msg: &AcceptedMessage) -> Result<(), StoreError> {
    let receipt = msg.receipt.to_string();
    let at = msg.received_at_ms;
    conn.prepare_cached(
        "INSERT INTO messages (receipt, received_at, client_ip, helo, tls_version, auth_user,
             envelope_sender, envelope_sender_lc, size, message_id, message_id_key, subject,
             context, envid, ret, eight_bit, smtputf8, inbound_bounce)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
    )
    .and_then(|mut st| {
        st.execute(params![
            receipt,
            at,
            msg.client_ip.to_string(),
            msg.helo,
            msg.tls_version,
            msg.auth_user,
            msg.envelope_sender,
            address_key(&msg.envelope_sender),
            msg.body.len() as i64,
            msg.message_id,
            msg.message_id.as_deref().map(message_id_key),
            msg.subject,
            msg.context,
            msg.envid,
            msg.ret.map(ret_str),
            msg.eight_bit,
            msg.smtputf8,
            msg.inbound_bounce,
        ])
    })
    .map_err(storage)?;
    conn.prepare_cached("INSERT INTO bodies (receipt, body) VALUES (?1, ?2)")
        .and_then(|mut st| st.execute(params![receipt, msg.body]))
        .map_err(storage)?;

    let mut insert = conn
        .prepare_cached(
            "INSERT INTO recipients (receipt, idx, address, address_lc, orcpt, notify, status,
                 reason, bounce_type, last_reply_text, next_attempt_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        )
        .map_err(storage)?;
    for (i, r) in msg.recipients.iter().enumerate() {
        let idx =
            u32::try_from(i).map_err(|_| StoreError::Storage("too many recipients".into()))?;
        // Preset outcomes are final; inbound bounce mail is never relayed (the bounce stage
        // processes it via `pending_inbound_bounces`): neither is ever due.
        let (status, kind, reason, text, next) = match (&r.preset, msg.inbound_bounce) {
            (Some(p), _) => (
                p.status,
                p.status.as_str(),
                Some(p.reason.as_str()),
                Some(p.text.as_str()),
                None,
            ),
            (None, true) => (
                RecipientStatus::Delivered,
                "accepted",
                None,
                Some(INBOUND_BOUNCE_TEXT),
                None,
            ),
            (None, false) => (RecipientStatus::Queued, "accepted", None, None, Some(at)),
        };
        insert
            .execute(params![
                receipt,
                idx,
                r.address,
                address_key(&r.address),
                r.orcpt,
                r.notify.map(|n| n.to_param()),
                status.as_str(),
                reason,
                r.preset.as_ref().map(|p| p.bounce_type.as_str()),
                text,
                next,
                at,
            ])
            .map_err(storage)?;
        append_event(
            conn,
            &receipt,
            idx,
            &Event {
                at,
                kind,
                status: status.as_str(),
                stage: r.preset.as_ref().map(|_| stage_str(Stage::Local)),
                reply_text: text,
                reason,
                ..Event::default()
            },
        )?;
    }
    Ok(())
}

fn update_after_attempt(
    conn: &Connection,
    receipt: &str,
    a: &AttemptRecord,
    counted: i64,
) -> Result<(), StoreError> {
    let deferred = a.status == RecipientStatus::Deferred;
    let next = if a.status.is_pending() {
        Some(a.next_attempt_at_ms.unwrap_or(a.at_ms))
    } else {
        None
    };
    conn.prepare_cached(
        "UPDATE recipients SET status = ?3, reason = ?4, bounce_type = ?5,
             last_reply_code = ?6, last_enhanced = ?7, last_reply_text = ?8,
             attempts = attempts + ?9, next_attempt_at = ?10,
             first_deferred_at = CASE WHEN ?11 THEN COALESCE(first_deferred_at, ?12)
                                      ELSE first_deferred_at END,
             updated_at = ?12
         WHERE receipt = ?1 AND idx = ?2",
    )
    .and_then(|mut st| {
        st.execute(params![
            receipt,
            a.rcpt_index,
            a.status.as_str(),
            a.reason,
            a.bounce_type,
            a.reply_code,
            a.enhanced_status,
            a.reply_text,
            counted,
            next,
            deferred,
            a.at_ms,
        ])
    })
    .map_err(storage)?;
    Ok(())
}

/// Records one attempt. The reply always becomes an event; the recipient's current status
/// follows it, except that a temporary result never reopens a recipient that became final
/// meanwhile (deleted from the queue or bounced while the attempt was in flight).
/// `delay_dsn` is the receipt of the delay DSN queued with it, when the caller knows it.
pub fn record_attempt(
    conn: &Connection,
    a: &AttemptRecord,
    delay_dsn: Option<&str>,
) -> Result<(), StoreError> {
    let receipt = a.receipt.to_string();
    let Some(current) = current_status(conn, &receipt, a.rcpt_index)? else {
        return Err(StoreError::NotFound(format!(
            "recipient {} of {receipt}",
            a.rcpt_index
        )));
    };
    let current_is_final = RecipientStatus::parse(&current).is_some_and(|s| !s.is_pending());
    // A locally decided outcome (expiry, suppression) is not a delivery attempt.
    let counted = i64::from(a.stage != Stage::Local);
    let kept_final = current_is_final && a.status.is_pending();
    if kept_final {
        conn.execute(
            "UPDATE recipients SET attempts = attempts + ?3, updated_at = ?4
             WHERE receipt = ?1 AND idx = ?2",
            params![receipt, a.rcpt_index, counted, a.at_ms],
        )
        .map_err(storage)?;
    } else {
        update_after_attempt(conn, &receipt, a, counted)?;
    }
    let kind = if a.status == RecipientStatus::Expired {
        "expired"
    } else {
        "attempt"
    };
    append_event(
        conn,
        &receipt,
        a.rcpt_index,
        &Event {
            at: a.at_ms,
            kind,
            status: a.status.as_str(),
            stage: Some(stage_str(a.stage)),
            remote_host: a.remote_host.as_deref(),
            remote_ip: a.remote_ip.as_deref(),
            remote_port: a.remote_port,
            tls_version: a.tls_version.as_deref(),
            tls_cipher: a.tls_cipher.as_deref(),
            reply_code: a.reply_code,
            enhanced_status: a.enhanced_status.as_deref(),
            reply_text: Some(&a.reply_text),
            duration_ms: Some(a.duration_ms),
            reason: a.reason.as_deref(),
            rcpt_reply: a.rcpt_reply.as_ref(),
            tried_first: if a.tried_first.is_empty() {
                None
            } else {
                Some(
                    serde_json::to_string(&a.tried_first)
                        .map_err(|e| StoreError::Storage(format!("tried_first: {e}")))?,
                )
            },
            ..Event::default()
        },
    )?;
    if let Some(entry) = &a.suppress {
        suppress(conn, entry)?;
        // Said on the recipient, so that its log shows why the next message to the address
        // is not relayed.
        append_event(
            conn,
            &receipt,
            a.rcpt_index,
            &Event {
                at: a.at_ms,
                kind: "address_suppressed",
                status: a.status.as_str(),
                reason: Some(&entry.reason),
                reply_text: Some("address put on the suppression list"),
                ..Event::default()
            },
        )?;
    }
    if a.delay_dsn {
        let status = if kept_final {
            current.as_str()
        } else {
            a.status.as_str()
        };
        mark_delay_dsn_sent(conn, &receipt, a.rcpt_index, status, a.at_ms, delay_dsn)?;
    }
    Ok(())
}

pub fn record_attempts(
    conn: &Connection,
    attempts: &[AttemptRecord],
    dsns: &[DsnNotice],
) -> Result<(), StoreError> {
    // A delay DSN's recipients get their `delay_dsn_sent` event from their attempt (which
    // marks it sent); it names the DSN found here.
    let delay_dsn_of = |a: &AttemptRecord| {
        dsns.iter().find_map(|n| {
            (n.original == a.receipt
                && n.reported
                    .iter()
                    .any(|r| r.rcpt_index == a.rcpt_index && r.action == "delayed"))
            .then(|| n.dsn.receipt.to_string())
        })
    };
    for a in attempts {
        let dsn = a.delay_dsn.then(|| delay_dsn_of(a)).flatten();
        record_attempt(conn, a, dsn.as_deref())?;
    }
    for n in dsns {
        accept(conn, &n.dsn)?;
        let marked = |idx: u32| {
            attempts
                .iter()
                .any(|a| a.delay_dsn && a.receipt == n.original && a.rcpt_index == idx)
        };
        record_notice(conn, n, |r| r.action == "delayed" && marked(r.rcpt_index))?;
    }
    Ok(())
}

/// [`accept`] of `msg` and of the DSNs about its recipients decided at accept, each with its
/// `dsn_sent` events.
pub fn accept_with_notices(
    conn: &Connection,
    msg: &AcceptedMessage,
    notices: &[DsnNotice],
) -> Result<(), StoreError> {
    accept(conn, msg)?;
    for n in notices {
        accept(conn, &n.dsn)?;
        record_notice(conn, n, |_| false)?;
    }
    Ok(())
}

/// Appends a `dsn_sent` event, naming the DSN, to each recipient `n` reports (but those
/// `recorded` already); it keeps the recipient's status. A recipient the store no longer
/// has is skipped: the DSN is mail of its own either way.
fn record_notice(
    conn: &Connection,
    n: &DsnNotice,
    recorded: impl Fn(&crate::store::ReportedRecipient) -> bool,
) -> Result<(), StoreError> {
    let original = n.original.to_string();
    let dsn_receipt = n.dsn.receipt.to_string();
    for r in n.reported.iter().filter(|r| !recorded(r)) {
        let Some(status) = current_status(conn, &original, r.rcpt_index)? else {
            continue;
        };
        append_event(
            conn,
            &original,
            r.rcpt_index,
            &Event {
                at: n.dsn.received_at_ms,
                kind: "dsn_sent",
                status: &status,
                stage: Some(stage_str(Stage::Local)),
                dsn_action: Some(r.action),
                dsn_receipt: Some(&dsn_receipt),
                ..Event::default()
            },
        )?;
    }
    Ok(())
}

/// How grave a recipient's bounce outcome is: a complaint, then a hard bounce, then a soft
/// one; any other status (delivered, deferred, ...) none.
fn gravity(status: &str, bounce_type: &str) -> u8 {
    match (status, bounce_type) {
        ("complained", _) => 3,
        ("bounced", "hard") => 2,
        ("bounced", _) => 1,
        _ => 0,
    }
}

/// A recipient's status and bounce type (hard, soft), if the store has it.
fn current_bounce_state(
    conn: &Connection,
    receipt: &str,
    idx: u32,
) -> Result<Option<(String, Option<String>)>, StoreError> {
    conn.prepare_cached(
        "SELECT status, bounce_type FROM recipients WHERE receipt = ?1 AND idx = ?2",
    )
    .and_then(|mut st| {
        st.query_row(params![receipt, idx], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
    })
    .map_err(storage)
}

fn current_status(
    conn: &Connection,
    receipt: &str,
    idx: u32,
) -> Result<Option<String>, StoreError> {
    conn.prepare_cached("SELECT status FROM recipients WHERE receipt = ?1 AND idx = ?2")
        .and_then(|mut st| {
            st.query_row(params![receipt, idx], |r| r.get::<_, String>(0))
                .optional()
        })
        .map_err(storage)
}

/// Marks the delay DSN of recipient `idx` sent (the attempt that queued it is recorded in
/// the same commit, so the next deferral does not send another).
fn mark_delay_dsn_sent(
    conn: &Connection,
    receipt: &str,
    idx: u32,
    status: &str,
    at_ms: i64,
    dsn_receipt: Option<&str>,
) -> Result<(), StoreError> {
    conn.prepare_cached("UPDATE recipients SET delay_dsn_sent = 1 WHERE receipt = ?1 AND idx = ?2")
        .and_then(|mut st| st.execute(params![receipt, idx]))
        .map_err(storage)?;
    append_event(
        conn,
        receipt,
        idx,
        &Event {
            at: at_ms,
            kind: "delay_dsn_sent",
            status,
            stage: Some(stage_str(Stage::Local)),
            dsn_action: Some("delayed"),
            dsn_receipt,
            ..Event::default()
        },
    )
}

/// Pending recipients of one message (or all), as (receipt, idx, status).
fn pending(
    conn: &Connection,
    receipt: Option<&str>,
) -> Result<Vec<(String, u32, String)>, StoreError> {
    let mut st = conn
        .prepare_cached(
            "SELECT receipt, idx, status FROM recipients
             WHERE status IN ('queued', 'deferred') AND (?1 IS NULL OR receipt = ?1)
             ORDER BY receipt, idx",
        )
        .map_err(storage)?;
    let rows = st
        .query_map(params![receipt], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(storage)?;
    Ok(rows)
}

pub fn queue_retry(
    conn: &Connection,
    receipt: Option<ReceiptId>,
    now_ms: i64,
) -> Result<usize, StoreError> {
    let receipt = receipt.map(|r| r.to_string());
    let rows = pending(conn, receipt.as_deref())?;
    for (receipt, idx, status) in &rows {
        conn.execute(
            "UPDATE recipients SET next_attempt_at = ?3, updated_at = ?3
             WHERE receipt = ?1 AND idx = ?2",
            params![receipt, idx, now_ms],
        )
        .map_err(storage)?;
        append_event(
            conn,
            receipt,
            *idx,
            &Event {
                at: now_ms,
                kind: "retry",
                status,
                stage: Some(stage_str(Stage::Local)),
                reply_text: Some("retry requested by admin"),
                ..Event::default()
            },
        )?;
    }
    Ok(rows.len())
}

pub fn queue_delete(
    conn: &Connection,
    receipt: ReceiptId,
    now_ms: i64,
) -> Result<usize, StoreError> {
    let receipt = receipt.to_string();
    let rows = pending(conn, Some(&receipt))?;
    let text = "deleted from the queue by admin";
    for (receipt, idx, _) in &rows {
        conn.execute(
            "UPDATE recipients SET status = 'failed', reason = 'deleted', bounce_type = NULL,
                 next_attempt_at = NULL,
                 last_reply_code = NULL, last_enhanced = NULL, last_reply_text = ?3,
                 updated_at = ?4
             WHERE receipt = ?1 AND idx = ?2",
            params![receipt, idx, text, now_ms],
        )
        .map_err(storage)?;
        append_event(
            conn,
            receipt,
            *idx,
            &Event {
                at: now_ms,
                kind: "deleted",
                status: RecipientStatus::Failed.as_str(),
                stage: Some(stage_str(Stage::Local)),
                reply_text: Some(text),
                reason: Some("deleted"),
                ..Event::default()
            },
        )?;
    }
    Ok(rows.len())
}

pub fn mark_inbound_processed(
    conn: &Connection,
    receipt: ReceiptId,
    now_ms: i64,
) -> Result<(), StoreError> {
    let changed = conn
        .execute(
            "UPDATE messages SET inbound_processed_at = ?2
             WHERE receipt = ?1 AND inbound_bounce = 1",
            params![receipt.to_string(), now_ms],
        )
        .map_err(storage)?;
    if changed == 0 {
        return Err(StoreError::NotFound(format!(
            "inbound bounce message {receipt}"
        )));
    }
    Ok(())
}

pub fn record_bounces(
    conn: &Connection,
    bounces: &[NewBounce],
    processed: Option<ReceiptId>,
    now_ms: i64,
) -> Result<Vec<RecordedBounce>, StoreError> {
    let ids = bounces
        .iter()
        .map(|b| {
            if let Some(id) = stored_under(conn, b.dedup_key.as_deref())? {
                return Ok(RecordedBounce {
                    id,
                    duplicate: true,
                });
            }
            let id = record_bounce(conn, b)?;
            if let Some(entry) = &b.suppress {
                suppress(conn, entry)?;
            }
            Ok(RecordedBounce {
                id,
                duplicate: false,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    if let Some(receipt) = processed {
        mark_inbound_processed(conn, receipt, now_ms)?;
    }
    Ok(ids)
}

/// The id of the bounce stored under `dedup_key`, if any.
fn stored_under(conn: &Connection, dedup_key: Option<&str>) -> Result<Option<i64>, StoreError> {
    let Some(key) = dedup_key else {
        return Ok(None);
    };
    conn.prepare_cached("SELECT id FROM bounces WHERE dedup_key = ?1")
        .and_then(|mut st| st.query_row(params![key], |r| r.get(0)).optional())
        .map_err(storage)
}

fn record_bounce(conn: &Connection, new: &NewBounce) -> Result<i64, StoreError> {
    let b = &new.facts;
    let receipt = b.receipt.map(|r| r.to_string());
    // The matched recipient, when the store still has it (a bounce may outlive its message).
    let matched = match (&receipt, b.rcpt_index) {
        (Some(receipt), Some(idx)) => {
            current_bounce_state(conn, receipt, idx)?.map(|(s, t)| (receipt, idx, s, t))
        }
        _ => None,
    };
    // A later, milder report does not undo a graver one: a soft bounce after a complaint or a
    // hard bounce leaves the recipient complained or hard-bounced (as its suppression stays),
    // while a hard bounce after a soft one, or a complaint after a bounce, takes over.
    let takes_over = matched
        .as_ref()
        .is_some_and(|(_, _, current, current_type)| {
            new.new_status.is_some_and(|s| {
                gravity(s.as_str(), &b.bounce_type)
                    >= gravity(current, current_type.as_deref().unwrap_or(""))
            })
        });
    let acted = takes_over;
    conn.execute(
        "INSERT INTO bounces (at, receipt, idx, correlation, recipient, recipient_lc, kind,
             action, status, reply_code, diagnostic, remote_mta, reporting_mta, reason,
             bounce_type, source_receipt, acted, dedup_key, reported_recipient, verified)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18,
             ?19, ?20)",
        params![
            b.at_ms,
            receipt,
            b.rcpt_index,
            correlation_str(b.correlation),
            b.recipient,
            address_key(&b.recipient),
            b.kind,
            b.action,
            b.status,
            b.reply_code,
            b.diagnostic,
            b.remote_mta,
            b.reporting_mta,
            b.reason,
            b.bounce_type,
            b.source_receipt.map(|r| r.to_string()),
            acted,
            new.dedup_key,
            b.reported_recipient,
            b.verified,
        ],
    )
    .map_err(storage)?;
    let id = conn.last_insert_rowid();

    let Some((receipt, idx, current, _)) = matched else {
        // Unmatched, or matched to a message this store no longer has: the bounce only.
        return Ok(id);
    };
    let status = match new.new_status.filter(|_| takes_over) {
        Some(new) => {
            // The bounce's code, status and diagnostic become the recipient's last reply:
            // the log's summary line then says why it bounced, not the 250 before it.
            conn.execute(
                "UPDATE recipients SET status = ?3, reason = ?4, bounce_type = ?5,
                     next_attempt_at = NULL, updated_at = ?6, last_reply_code = ?7,
                     last_enhanced = ?8, last_reply_text = ?9
                 WHERE receipt = ?1 AND idx = ?2",
                params![
                    receipt,
                    idx,
                    new.as_str(),
                    b.reason,
                    b.bounce_type,
                    b.at_ms,
                    b.reply_code,
                    b.status,
                    b.diagnostic
                ],
            )
            .map_err(storage)?;
            new.as_str().to_string()
        }
        None => current,
    };
    // A record held back for want of proof says so by its kind: an unverified DSN over
    // SMTP is not the recipient's bounce.
    let kind = match new.new_status {
        Some(RecipientStatus::Complained) => "complaint".to_string(),
        Some(_) => "bounce".to_string(),
        None if new.held_unverified => format!("unverified {}", b.kind),
        None => b.kind.clone(),
    };
    append_event(
        conn,
        receipt,
        idx,
        &Event {
            at: b.at_ms,
            kind: &kind,
            status: &status,
            stage: Some(stage_str(Stage::Bounce)),
            remote_host: b.remote_mta.as_deref().or(b.reporting_mta.as_deref()),
            reply_code: b.reply_code,
            enhanced_status: b.status.as_deref(),
            reply_text: b.diagnostic.as_deref(),
            reason: Some(&b.reason),
            ..Event::default()
        },
    )?;
    Ok(id)
}

/// Marks bounce `id` handled by `by` at `at_ms`, or unhandled (`by` None), unless it is so
/// already: then who handled it first, and when, stay.
pub fn set_handled(
    conn: &Connection,
    id: i64,
    by: Option<&str>,
    at_ms: i64,
) -> Result<HandledChange, StoreError> {
    let changed = conn
        .execute(
            "UPDATE bounces SET handled_by = ?2, handled_at = CASE WHEN ?2 IS NULL THEN NULL ELSE ?3 END
             WHERE id = ?1 AND (handled_at IS NULL) = (?2 IS NOT NULL)",
            params![id, by, at_ms],
        )
        .map_err(storage)?;
    if changed > 0 {
        return Ok(HandledChange::Changed);
    }
    let now = conn
        .query_row(
            "SELECT handled_by, handled_at FROM bounces WHERE id = ?1",
            params![id],
            |r| Ok((r.get::<_, Option<String>>(0)?, r.get::<_, Option<i64>>(1)?)),
        )
        .optional()
        .map_err(storage)?;
    Ok(match now {
        Some((by, at_ms)) => HandledChange::Already { by, at_ms },
        None => HandledChange::NoSuchBounce,
    })
}

/// Adds an entry, or refreshes the one there: reason, source and last time from `s`; while
/// that one is live it keeps its first time and counts one more, and lasts until the later
/// of the two expiries (never, if either never expires); an expired one starts afresh.
pub fn suppress(conn: &Connection, s: &Suppression) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO suppressions (address_lc, address, reason, source, first_at, last_at, count,
             expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (address_lc) DO UPDATE SET
             -- A bounce does not overwrite a complaint that stands (the recipient stays
             -- complained too); a complaint, or an admin's entry, overwrites anything.
             reason = CASE WHEN source = 'complaint' AND excluded.source = 'bounce'
                                AND (expires_at IS NULL OR expires_at > excluded.last_at)
                           THEN reason ELSE excluded.reason END,
             source = CASE WHEN source = 'complaint' AND excluded.source = 'bounce'
                                AND (expires_at IS NULL OR expires_at > excluded.last_at)
                           THEN source ELSE excluded.source END,
             last_at = excluded.last_at,
             first_at = CASE WHEN expires_at <= excluded.last_at THEN excluded.first_at
                             ELSE first_at END,
             count = CASE WHEN expires_at <= excluded.last_at THEN excluded.count
                          ELSE count + 1 END,
             expires_at = CASE WHEN expires_at <= excluded.last_at THEN excluded.expires_at
                               WHEN expires_at IS NULL OR excluded.expires_at IS NULL THEN NULL
                               ELSE max(expires_at, excluded.expires_at) END",
        params![
            address_key(&s.address),
            s.address,
            s.reason,
            s.source,
            s.first_at_ms,
            s.last_at_ms,
            s.count.max(1),
            s.expires_at_ms,
        ],
    )
    .map_err(storage)?;
    Ok(())
}

/// Takes `address` off the suppression list. Its earlier bounces no longer count toward a
/// soft-bounce run (`acted` cleared): removed by hand once the address was fixed, it starts
/// from zero, not one soft bounce short of being suppressed again.
pub fn unsuppress(conn: &Connection, address: &str) -> Result<bool, StoreError> {
    // Under either IDN spelling of its domain.
    let [key, other] = super::address_key_spellings(address);
    let changed = conn
        .execute(
            "DELETE FROM suppressions WHERE address_lc IN (?1, ?2)",
            params![key, other],
        )
        .map_err(storage)?;
    if changed > 0 {
        conn.execute(
            "UPDATE bounces SET acted = 0 WHERE recipient_lc IN (?1, ?2) AND acted = 1",
            params![key, other],
        )
        .map_err(storage)?;
    }
    Ok(changed > 0)
}

/// [`purge_messages`]: the oldest finished messages received before `?1`, at most `?2`.
pub(super) const PURGE_MESSAGES: &str = "DELETE FROM messages WHERE receipt IN (
     SELECT m.receipt FROM messages m
     WHERE m.received_at < ?1
       AND (m.inbound_bounce = 0 OR m.inbound_processed_at IS NOT NULL)
       AND NOT EXISTS (SELECT 1 FROM recipients r
                       WHERE r.receipt = m.receipt
                         AND r.status IN ('queued', 'deferred'))
     ORDER BY m.received_at
     LIMIT ?2)";

/// [`purge_bounces`]: the oldest bounce records recorded before `?1`, at most `?2`.
pub(super) const PURGE_BOUNCES: &str =
    "DELETE FROM bounces WHERE id IN (SELECT id FROM bounces WHERE at < ?1 ORDER BY at LIMIT ?2)";

/// Deletes the log of messages received before `before_ms` whose recipients are all final
/// (inbound bounce mail: processed): the message row, and with it (foreign-key cascade) its
/// body, recipients and events; at most `limit` messages, oldest first. Returns how many.
pub fn purge_messages(
    conn: &Connection,
    before_ms: i64,
    limit: usize,
) -> Result<usize, StoreError> {
    conn.prepare_cached(PURGE_MESSAGES)
        .and_then(|mut st| st.execute(params![before_ms, limit.min(i64::MAX as usize) as i64]))
        .map_err(storage)
}

/// Deletes bounce records recorded before `before_ms`, handled or not; at most `limit`,
/// oldest first. The suppression list keeps its own entries. Returns how many.
pub fn purge_bounces(conn: &Connection, before_ms: i64, limit: usize) -> Result<usize, StoreError> {
    conn.prepare_cached(PURGE_BOUNCES)
        .and_then(|mut st| st.execute(params![before_ms, limit.min(i64::MAX as usize) as i64]))
        .map_err(storage)
}

/// Drops the bodies of messages received before `before_ms` whose recipients are all final
/// (and, for inbound bounce mail, that the bounce stage has processed). Envelope, recipients,
/// events and bounces stay, so `mailtrail log` still tells the whole story. Returns how many.
pub fn purge_bodies(conn: &Connection, before_ms: i64, limit: usize) -> Result<usize, StoreError> {
    // Walks the bodies still present (the retained window and pending mail), not the whole
    // history of messages; at most `limit` per call so one purge never holds the writer long.
    conn.prepare_cached(
        "DELETE FROM bodies WHERE receipt IN (
             SELECT b.receipt FROM bodies b JOIN messages m ON m.receipt = b.receipt
             WHERE m.received_at < ?1
               AND (m.inbound_bounce = 0 OR m.inbound_processed_at IS NOT NULL)
               AND NOT EXISTS (SELECT 1 FROM recipients r
                               WHERE r.receipt = m.receipt
                                 AND r.status IN ('queued', 'deferred'))
             LIMIT ?2)",
    )
    .and_then(|mut st| st.execute(params![before_ms, limit.min(i64::MAX as usize) as i64]))
    .map_err(storage)
}
