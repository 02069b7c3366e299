//! `mailtrail log <address|receipt>`: what happened to a message, per recipient, with every
//! remote reply verbatim. Pure functions from arguments to a [`LogQuery`] and from
//! [`MessageLog`] records to text or JSON lines; `main.rs` does the I/O.

use std::fmt::Write as _;

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};

use crate::receipt::ReceiptId;
use crate::store::{EventLog, LogKey, LogQuery, MessageLog, RecipientLog, Stage};

/// Messages shown when `--limit` is not given.
pub const DEFAULT_LIMIT: usize = 20;

#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// A recipient or sender address (case-insensitive), or a receipt id.
    pub key: String,
    /// One JSON object per message instead of text.
    #[arg(long)]
    pub json: bool,
    /// Only messages received at or after: RFC 3339, YYYY-MM-DD (UTC, from the start of that
    /// day), or a duration ago (2h, 3d).
    #[arg(long)]
    pub since: Option<String>,
    /// Only messages received at or before (same forms as --since; a date alone means the
    /// end of that day, so --until 2026-11-23 includes all of the 23rd).
    #[arg(long)]
    pub until: Option<String>,
    /// At most this many messages, newest first (0 = all); a line says when more exist.
    #[arg(long, default_value_t = DEFAULT_LIMIT)]
    pub limit: usize,
    /// Only messages older than this receipt id's (the next page: the line under a cut
    /// list names the oldest shown).
    #[arg(long)]
    pub before: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogArgError {
    #[error(
        "not a time: {0:?} (expected RFC 3339 like 2026-11-23T18:00:00Z, a date like 2026-11-23, \
         or a duration ago like 2h or 3d)"
    )]
    Time(String),
    #[error("not an address or receipt id: {0:?}")]
    Key(String),
    #[error("--before {0:?}: not a receipt id")]
    Before(String),
}

/// Parses a `--since` value into milliseconds since the epoch. Relative durations count
/// back from `now`; a bare date means its first millisecond (midnight UTC).
pub fn parse_time(s: &str, now: DateTime<Utc>) -> Result<i64, LogArgError> {
    parse_bound(s, now, false)
}

/// Parses an `--until` value (inclusive) as [`parse_time`] does, except that a bare date
/// means its last millisecond: `--until 2026-12-08` takes in all of that day (its midnight
/// left the whole day out).
pub fn parse_until(s: &str, now: DateTime<Utc>) -> Result<i64, LogArgError> {
    parse_bound(s, now, true)
}

fn parse_bound(s: &str, now: DateTime<Utc>, end_of_day: bool) -> Result<i64, LogArgError> {
    let s = s.trim();
    let err = || LogArgError::Time(s.to_string());
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        let midnight = d.and_hms_opt(0, 0, 0).ok_or_else(err)?;
        let start = midnight.and_utc().timestamp_millis();
        return Ok(if end_of_day {
            start + 86_400_000 - 1
        } else {
            start
        });
    }
    let ago = humantime::parse_duration(s).map_err(|_| err())?;
    let ago = chrono::Duration::from_std(ago).map_err(|_| err())?;
    now.checked_sub_signed(ago)
        .map(|t| t.timestamp_millis())
        .ok_or_else(err)
}

/// The address between the angle brackets of `<addr>` or `Name <addr>` (RFC 5322
/// name-addr; a display name may be quoted, `"Mixed, Bob" <addr>`, and hold `<` there),
/// or `None` when `s` (trimmed) ends in no such bracketed address.
fn angle_addr(s: &str) -> Option<&str> {
    let s = s.trim().strip_suffix('>')?;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '<' if !quoted => return Some(&s[i + 1..]),
            _ => {}
        }
    }
    None
}

/// An address as pasted from a log or a header: trimmed, without its angle brackets, and
/// without the display name of `Name <addr>` or `"Quoted, Name" <addr>`.
pub fn unbracketed(s: &str) -> &str {
    angle_addr(s).unwrap_or(s).trim()
}

/// An argument with `@` is an address; otherwise it must be a receipt id. The null sender
/// is looked up as `<>` (or `Name <>`).
pub fn parse_key(s: &str) -> Result<LogKey, LogArgError> {
    let s = s.trim();
    if angle_addr(s).is_some_and(|a| a.trim().is_empty()) {
        return Ok(LogKey::Address(String::new()));
    }
    let unbracketed = unbracketed(s);
    // `postmaster` without a domain is a recipient SMTP must take (RFC 5321 4.5.1).
    if unbracketed.contains('@') || unbracketed.eq_ignore_ascii_case("postmaster") {
        return Ok(LogKey::Address(unbracketed.to_string()));
    }
    unbracketed
        .parse::<ReceiptId>()
        .map(LogKey::Receipt)
        .map_err(|_| LogArgError::Key(s.to_string()))
}

pub fn query(args: &LogArgs, now: DateTime<Utc>) -> Result<LogQuery, LogArgError> {
    Ok(LogQuery {
        key: parse_key(&args.key)?,
        since_ms: args
            .since
            .as_deref()
            .map(|s| parse_time(s, now))
            .transpose()?,
        until_ms: args
            .until
            .as_deref()
            .map(|s| parse_until(s, now))
            .transpose()?,
        limit: args.limit,
        before: args
            .before
            .as_deref()
            .map(|b| {
                unbracketed(b)
                    .parse::<ReceiptId>()
                    .map_err(|_| LogArgError::Before(b.to_string()))
            })
            .transpose()?,
    })
}

/// The query to send the store for `limit` rows shown: one more, so that a list the limit
/// cut can say so. A limit of 0 (all) stays.
pub fn one_more(limit: usize) -> usize {
    if limit == 0 {
        0
    } else {
        limit.saturating_add(1)
    }
}

/// Drops what `one_more` asked for past `limit`; true when there was such a row, so more
/// exist than are shown.
pub fn cut_to<T>(rows: &mut Vec<T>, limit: usize) -> bool {
    let cut = limit > 0 && rows.len() > limit;
    rows.truncate(if cut { limit } else { rows.len() });
    cut
}

/// The line after a `log` list that `--limit` cut: that more exist and how to see them.
/// `--before` the oldest shown is the next page exactly (an inclusive `--until` of its time
/// showed it again, with every other message of that millisecond).
pub fn more_messages_notice(shown: usize, oldest_shown: ReceiptId) -> String {
    format!(
        "(the newest {shown} messages shown; more exist: --limit {} shows more, --limit 0 all, \
         --before {oldest_shown} the next {shown})\n",
        shown.saturating_mul(2),
    )
}

/// RFC 3339 in UTC with milliseconds (`2026-11-23T18:00:00.123Z`).
pub fn format_time(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_else(|| format!("@{ms}ms"))
}

/// Text from remote servers and clients for one line of a terminal: control characters
/// (escape sequences could rewrite the screen; a line break in a subject made a line that
/// passed for a recipient's, `to <x>: delivered`) and the bidirectional controls (which
/// reorder what is shown, "Trojan Source") are shown escaped.
pub fn sanitize(s: &str) -> String {
    escaped(s, false)
}

/// As [`sanitize`], line breaks kept: for a multi-line reply, which [`push_indented`]
/// indents under its event.
pub fn sanitize_lines(s: &str) -> String {
    escaped(s, true)
}

fn escaped(s: &str, keep_line_breaks: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\n' if keep_line_breaks => out.push('\n'),
            '\t' => out.push('\t'),
            c if c.is_control() || is_bidi_control(c) => out.extend(c.escape_default()),
            c => out.push(c),
        }
    }
    out
}

/// The Unicode bidirectional formatting characters (UAX #9): marks, embeddings, overrides,
/// isolates.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// `code enhanced text`, whichever parts exist.
/// A text that already starts with the code (a bounce's diagnostic, `550 5.1.1 ...`) is
/// shown as it is.
fn reply(code: Option<u16>, enhanced: Option<&str>, text: Option<&str>) -> String {
    if let (Some(c), Some(t)) = (code, text)
        && t.strip_prefix(c.to_string().as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '-']))
    {
        return t.to_string();
    }
    let mut parts = Vec::new();
    if let Some(c) = code {
        parts.push(c.to_string());
    }
    if let Some(e) = enhanced {
        parts.push(e.to_string());
    }
    if let Some(t) = text {
        parts.push(t.to_string());
    }
    parts.join(" ")
}

/// Writes `text` with every line after the first indented by `indent`, so a multi-line
/// reply stays visibly one reply.
fn push_indented(out: &mut String, text: &str, indent: &str) {
    let text = sanitize_lines(text);
    let mut lines = text.split('\n');
    if let Some(first) = lines.next() {
        out.push_str(first.trim_end_matches('\r'));
    }
    for line in lines {
        out.push('\n');
        out.push_str(indent);
        out.push_str(line.trim_end_matches('\r'));
    }
}

fn sender(s: &str) -> String {
    format!("<{}>", sanitize(s))
}

fn render_recipient(out: &mut String, r: &RecipientLog) {
    let _ = write!(out, "  to {}: {}", sender(&r.address), r.status);
    match (&r.reason, &r.bounce_type) {
        (Some(reason), Some(kind)) => {
            let _ = write!(out, " ({}, {})", sanitize(reason), sanitize(kind));
        }
        (Some(reason), None) => {
            let _ = write!(out, " ({})", sanitize(reason));
        }
        _ => {}
    }
    // What a pending recipient waits for: how often it was tried, when it is tried next.
    if r.status.is_pending() {
        let plural = if r.attempts == 1 { "" } else { "s" };
        let _ = write!(out, ", {} attempt{plural}", r.attempts);
        if let Some(next) = r.next_attempt_at_ms {
            let _ = write!(out, ", next attempt {}", format_time(next));
        }
    }
    let last = reply(
        r.last_reply_code,
        r.last_enhanced_status.as_deref(),
        r.last_reply_text.as_deref(),
    );
    if !last.is_empty() {
        out.push_str(": ");
        push_indented(out, &last, "      ");
    }
    out.push('\n');
    for e in &r.events {
        render_event(out, e);
    }
}

fn render_event(out: &mut String, e: &EventLog) {
    let _ = write!(out, "    {}  {}", format_time(e.at_ms), e.kind);
    // "rejected", "suppressed": the event says the status already. A record of a bounce
    // stage that is no bounce or complaint (an auto-reply, a delay notice, an unverified
    // DSN) left the status as it was.
    let status = e.status.to_string();
    let changed = !matches!(e.stage, Some(crate::store::Stage::Bounce))
        || ["bounce", "complaint"].contains(&e.kind.as_str());
    if !changed {
        let _ = write!(out, " (recipient stays {status})");
    } else if status != e.kind {
        let _ = write!(out, " {status}");
    }
    if let Some(stage) = e.stage {
        let _ = write!(out, " at {}", serde_plain(&stage));
    }
    match (&e.remote_host, &e.remote_ip) {
        (Some(h), Some(ip)) => {
            let _ = write!(out, " {} [{}]", sanitize(h), sanitize(ip));
            // Postfix's `[ip]:port` off port 25: one address can serve several routes.
            if let Some(port) = e.remote_port.filter(|p| *p != 25) {
                let _ = write!(out, ":{port}");
            }
        }
        (Some(h), None) => {
            let _ = write!(out, " {}", sanitize(h));
        }
        (None, Some(ip)) => {
            let _ = write!(out, " [{}]", sanitize(ip));
        }
        (None, None) => {}
    }
    if let Some(tls) = &e.tls_version {
        let _ = write!(out, " {}", sanitize(tls));
    }
    if let Some(d) = e.duration_ms {
        let _ = write!(out, " {d}ms");
    }
    // What the bounce said happened: `delayed` and `delivered` are no failures.
    if let Some(action) = &e.action {
        let _ = write!(out, " action={}", sanitize(action));
    }
    if let Some(reason) = &e.reason {
        let _ = write!(out, " reason={}", sanitize(reason));
    }
    // A DSN about this recipient: its action and its own receipt, which `log` finds it by.
    if let Some(action) = &e.dsn_action {
        let _ = write!(out, " action={}", sanitize(action));
    }
    if let Some(dsn) = &e.dsn_receipt {
        let _ = write!(out, " dsn={}", sanitize(dsn));
    }
    out.push('\n');
    // An attempt decided at DATA: the recipient's RCPT reply first, then the DATA reply.
    if let Some(r) = &e.rcpt_reply {
        let text = reply(Some(r.code), r.enhanced_status.as_deref(), Some(&r.text));
        out.push_str("      RCPT: ");
        push_indented(out, &text, "            ");
        out.push('\n');
    }
    let text = reply(
        e.reply_code,
        e.enhanced_status.as_deref(),
        e.reply_text.as_deref(),
    );
    if !text.is_empty() {
        // After a RCPT reply, the reply that decided: DATA's, or a 421 that ended the
        // session before DATA (at another recipient's RCPT), which is no DATA reply.
        out.push_str(match (&e.rcpt_reply, e.stage) {
            (None, _) => "      ",
            (Some(_), Some(Stage::Data)) => "      DATA: ",
            (Some(_), _) => "      then: ",
        });
        push_indented(out, &text, "      ");
        out.push('\n');
    }
    // Next hops this attempt tried before the one that answered, and why each was left.
    for hop in &e.tried_first {
        let _ = write!(
            out,
            "      tried first: {} at {}: ",
            sanitize(&hop.hop),
            sanitize(&hop.step)
        );
        push_indented(out, &hop.text, "        ");
        out.push('\n');
    }
}

/// The lowercase name serde gives a unit enum variant (`rcpt`, `data`, ...).
fn serde_plain<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

/// One block per message: receipt, time, sender, subject, context, each recipient's status
/// and last reply, then its events (attempts with the remote replies) oldest first.
pub fn render_text(logs: &[MessageLog]) -> String {
    let mut out = String::new();
    for (i, m) in logs.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "{}  {}  from {}",
            m.receipt,
            format_time(m.received_at_ms),
            sender(&m.envelope_sender)
        );
        let mut client = format!(
            "client {} helo {}",
            sanitize(&m.client_ip),
            sanitize(&m.helo)
        );
        if let Some(user) = &m.auth_user {
            let _ = write!(client, " auth {}", sanitize(user));
        }
        if let Some(tls) = &m.tls_version {
            let _ = write!(client, " {}", sanitize(tls));
        }
        let _ = writeln!(out, "  {client}, {} bytes", m.size);
        if let Some(s) = &m.subject {
            let _ = writeln!(out, "  subject: {}", sanitize(s));
        }
        if let Some(c) = &m.context {
            let _ = writeln!(out, "  context: {}", sanitize(c));
        }
        if let Some(id) = &m.message_id {
            let _ = writeln!(out, "  message-id: {}", sanitize(id));
        }
        if let Some(envid) = &m.envid {
            let _ = writeln!(out, "  envid: {}", sanitize(envid));
        }
        for r in &m.recipients {
            render_recipient(&mut out, r);
        }
    }
    out
}

fn add_time(obj: &mut serde_json::Value, ms_key: &str, key: &str) {
    if let Some(map) = obj.as_object_mut()
        && let Some(ms) = map.get(ms_key)
    {
        let text = match ms.as_i64() {
            Some(ms) => serde_json::Value::String(format_time(ms)),
            None => serde_json::Value::Null,
        };
        map.insert(key.to_string(), text);
    }
}

/// Beside each `(ms_key, key)` of a JSON object that has a time in milliseconds, the same
/// time as [`format_time`] text (a `null` time, `null`).
pub fn add_times(obj: &mut serde_json::Value, keys: &[(&str, &str)]) {
    for (ms_key, key) in keys {
        add_time(obj, ms_key, key);
    }
}

/// A [`MessageLog`] as JSON, with every `*_ms` time also given as RFC 3339 (`received_at`,
/// `updated_at`, `next_attempt_at`, `at`).
/// What `log` and the API say of a receipt the store has no message for.
pub fn no_such_receipt(key: &str) -> String {
    format!(
        "no message with receipt {}: never accepted here, or its log was purged \
         ([delivery] log_retention)",
        sanitize(key.trim())
    )
}

pub fn to_json(m: &MessageLog) -> serde_json::Value {
    let mut v = serde_json::to_value(m).unwrap_or(serde_json::Value::Null);
    add_time(&mut v, "received_at_ms", "received_at");
    if let Some(rcpts) = v.get_mut("recipients").and_then(|r| r.as_array_mut()) {
        for r in rcpts {
            add_time(r, "updated_at_ms", "updated_at");
            add_time(r, "next_attempt_at_ms", "next_attempt_at");
            if let Some(events) = r.get_mut("events").and_then(|e| e.as_array_mut()) {
                for e in events {
                    add_time(e, "at_ms", "at");
                }
            }
        }
    }
    v
}

/// One JSON object per line per message.
pub fn render_json(logs: &[MessageLog]) -> String {
    let mut out = String::new();
    for m in logs {
        out.push_str(&to_json(m).to_string());
        out.push('\n');
    }
    out
}

pub fn render(logs: &[MessageLog], json: bool) -> String {
    if json {
        render_json(logs)
    } else {
        render_text(logs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{RecipientStatus, Stage};

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-23T18:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn parse_time_accepts_rfc3339_dates_and_durations_ago() {
        let n = now();
        assert_eq!(
            parse_time("2026-11-23T17:00:00Z", n),
            Ok(n.timestamp_millis() - 3_600_000)
        );
        assert_eq!(
            parse_time("2026-11-23T19:00:00+02:00", n),
            Ok(n.timestamp_millis() - 3_600_000)
        );
        assert_eq!(
            parse_time("2026-11-23", n),
            Ok(n.timestamp_millis() - 18 * 3_600_000)
        );
        assert_eq!(parse_time("2h", n), Ok(n.timestamp_millis() - 7_200_000));
        assert_eq!(
            parse_time(" 3d ", n),
            Ok(n.timestamp_millis() - 3 * 86_400_000)
        );
        assert_eq!(parse_time("90s", n), Ok(n.timestamp_millis() - 90_000));
        for bad in ["", "yesterday", "2026-13-01", "2h ago", "-2h", "17:00"] {
            assert!(
                matches!(parse_time(bad, n), Err(LogArgError::Time(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_date_alone_is_the_start_of_its_day_for_since_and_its_end_for_until() {
        let n = now();
        let day = DateTime::parse_from_rfc3339("2026-12-08T00:00:00Z")
            .unwrap()
            .timestamp_millis();
        assert_eq!(parse_time("2026-12-08", n), Ok(day));
        assert_eq!(parse_until("2026-12-08", n), Ok(day + 86_400_000 - 1));
        // Other forms mean the same instant either way.
        assert_eq!(
            parse_until("2026-12-08T01:09:15Z", n),
            parse_time("2026-12-08T01:09:15Z", n)
        );
        assert_eq!(parse_until("2h", n), parse_time("2h", n));
        let args = LogArgs {
            key: "a@b".into(),
            json: false,
            since: Some("2026-12-08".into()),
            until: Some("2026-12-08".into()),
            limit: 5,
            before: None,
        };
        let q = query(&args, n).unwrap();
        assert_eq!(q.since_ms, Some(day));
        assert_eq!(q.until_ms, Some(day + 86_400_000 - 1));
    }

    #[test]
    fn a_list_cut_by_its_limit_knows_more_exist() {
        assert_eq!(one_more(20), 21);
        assert_eq!(one_more(0), 0);
        let mut rows: Vec<u32> = (0..21).collect();
        assert!(cut_to(&mut rows, 20));
        assert_eq!(rows.len(), 20);
        let mut rows: Vec<u32> = (0..20).collect();
        assert!(!cut_to(&mut rows, 20));
        assert_eq!(rows.len(), 20);
        let mut rows: Vec<u32> = (0..50).collect();
        assert!(!cut_to(&mut rows, 0));
        assert_eq!(rows.len(), 50);
        let r = ReceiptId::new();
        assert_eq!(
            more_messages_notice(20, r),
            format!(
                "(the newest 20 messages shown; more exist: --limit 40 shows more, --limit 0 \
                 all, --before {r} the next 20)\n"
            )
        );
    }

    #[test]
    fn parse_key_tells_addresses_from_receipts() {
        let r = ReceiptId::new();
        assert!(matches!(parse_key(&r.to_string()), Ok(LogKey::Receipt(x)) if x == r));
        assert!(
            matches!(parse_key(&r.to_string().to_lowercase()), Ok(LogKey::Receipt(x)) if x == r)
        );
        assert!(
            matches!(parse_key("<Alice@Example.net>"), Ok(LogKey::Address(a)) if a == "Alice@Example.net")
        );
        assert!(matches!(parse_key("a@b"), Ok(LogKey::Address(a)) if a == "a@b"));
        assert!(matches!(parse_key("<>"), Ok(LogKey::Address(a)) if a.is_empty()));
        assert!(matches!(parse_key("<Postmaster>"), Ok(LogKey::Address(a)) if a == "Postmaster"));
        for pasted in [
            "Bob Mixed <Bob.Mixed@OK.test>",
            "\"Mixed, Bob\" <Bob.Mixed@OK.test>",
            "\"Bob <the boss>\" <Bob.Mixed@OK.test> ",
            "\"Bob \\\" Mixed\" <Bob.Mixed@OK.test>",
            "Bob<Bob.Mixed@OK.test>",
        ] {
            assert!(
                matches!(parse_key(pasted), Ok(LogKey::Address(a)) if a == "Bob.Mixed@OK.test"),
                "{pasted}"
            );
        }
        assert!(matches!(parse_key("Mailer Daemon <>"), Ok(LogKey::Address(a)) if a.is_empty()));
        assert!(matches!(parse_key(&format!("Receipt <{r}>")), Ok(LogKey::Receipt(x)) if x == r));
        assert_eq!(
            parse_key("alice").map(|_| ()),
            Err(LogArgError::Key("alice".into()))
        );
    }

    #[test]
    fn query_combines_key_times_and_limit() {
        let args = LogArgs {
            key: "a@b".into(),
            json: false,
            since: Some("1h".into()),
            until: None,
            limit: 5,
            before: None,
        };
        let q = query(&args, now()).unwrap();
        assert_eq!(q.since_ms, Some(now().timestamp_millis() - 3_600_000));
        assert_eq!(q.until_ms, None);
        assert_eq!(q.limit, 5);
        let bad = LogArgs {
            until: Some("soon".into()),
            ..args
        };
        assert!(query(&bad, now()).is_err());
    }

    fn sample() -> MessageLog {
        let at = now().timestamp_millis();
        MessageLog {
            receipt: "01JD0000000000000000000000".parse().unwrap(),
            received_at_ms: at,
            client_ip: "192.0.2.1".into(),
            helo: "app.example".into(),
            tls_version: Some("TLSv1_3".into()),
            auth_user: Some("app".into()),
            envelope_sender: "app@example.com".into(),
            size: 1234,
            message_id: Some("<m1@app.example>".into()),
            subject: Some("Welcome\x1b[2J".into()),
            context: Some("signup-42".into()),
            envid: None,
            ret: None,
            recipients: vec![RecipientLog {
                index: 0,
                address: "bob@example.net".into(),
                orcpt: None,
                notify: None,
                status: RecipientStatus::Deferred,
                reason: Some("greylisting".into()),
                bounce_type: None,
                last_reply_code: Some(451),
                last_enhanced_status: Some("4.7.1".into()),
                last_reply_text: Some("Greylisted\nplease retry".into()),
                updated_at_ms: at + 2_000,
                attempts: 1,
                next_attempt_at_ms: Some(at + 302_000),
                events: vec![
                    EventLog {
                        at_ms: at,
                        kind: "accepted".into(),
                        status: RecipientStatus::Queued,
                        stage: None,
                        remote_host: None,
                        remote_ip: None,
                        remote_port: None,
                        tls_version: None,
                        reply_code: None,
                        enhanced_status: None,
                        reply_text: None,
                        duration_ms: None,
                        reason: None,
                        rcpt_reply: None,
                        action: None,
                        dsn_action: None,
                        dsn_receipt: None,
                        tried_first: Vec::new(),
                    },
                    EventLog {
                        at_ms: at + 2_000,
                        kind: "attempt".into(),
                        status: RecipientStatus::Deferred,
                        stage: Some(Stage::Rcpt),
                        remote_host: Some("mx1.example.net".into()),
                        remote_ip: Some("192.0.2.25".into()),
                        remote_port: Some(2525),
                        tls_version: Some("TLSv1_3".into()),
                        reply_code: Some(451),
                        enhanced_status: Some("4.7.1".into()),
                        reply_text: Some("Greylisted\nplease retry".into()),
                        duration_ms: Some(87),
                        reason: Some("greylisting".into()),
                        rcpt_reply: None,
                        action: None,
                        dsn_action: None,
                        dsn_receipt: None,
                        tried_first: Vec::new(),
                    },
                ],
            }],
        }
    }

    #[test]
    fn a_text_that_starts_with_its_code_is_not_prefixed_again() {
        assert_eq!(
            reply(Some(550), Some("5.1.1"), Some("550 5.1.1 <a@b>: unknown")),
            "550 5.1.1 <a@b>: unknown"
        );
        assert_eq!(
            reply(Some(550), Some("5.1.1"), Some("unknown")),
            "550 5.1.1 unknown"
        );
        assert_eq!(
            reply(Some(550), None, Some("5501 is no code")),
            "550 5501 is no code"
        );
    }

    #[test]
    fn text_shows_message_recipient_and_verbatim_remote_replies() {
        let text = render_text(&[sample()]);
        let expected = "\
01JD0000000000000000000000  2026-11-23T18:00:00.000Z  from <app@example.com>
  client 192.0.2.1 helo app.example auth app TLSv1_3, 1234 bytes
  subject: Welcome\\u{1b}[2J
  context: signup-42
  message-id: <m1@app.example>
  to <bob@example.net>: deferred (greylisting), 1 attempt, next attempt 2026-11-23T18:05:02.000Z: 451 4.7.1 Greylisted
      please retry
    2026-11-23T18:00:00.000Z  accepted queued
    2026-11-23T18:00:02.000Z  attempt deferred at rcpt mx1.example.net [192.0.2.25]:2525 TLSv1_3 87ms reason=greylisting
      451 4.7.1 Greylisted
      please retry
";
        assert_eq!(text, expected);
    }

    #[test]
    fn a_421_after_this_recipients_250_is_no_data_reply() {
        let mut m = sample();
        let event = &mut m.recipients[0].events[1];
        event.rcpt_reply = Some(crate::store::RcptReply {
            code: 250,
            enhanced_status: Some("2.1.5".into()),
            text: "ok".into(),
        });
        (event.reply_code, event.enhanced_status, event.reply_text) =
            (Some(421), Some("4.7.0".into()), Some("go away".into()));
        let text = render_text(std::slice::from_ref(&m));
        assert!(
            text.contains("      RCPT: 250 2.1.5 ok\n      then: 421 4.7.0 go away\n"),
            "{text}"
        );
        m.recipients[0].events[1].stage = Some(Stage::Data);
        let text = render_text(&[m]);
        assert!(text.contains("      DATA: 421 4.7.0 go away\n"), "{text}");
    }

    #[test]
    fn an_event_named_as_its_status_names_it_once() {
        let mut m = sample();
        let event = &mut m.recipients[0].events[1];
        event.kind = "rejected".into();
        event.status = RecipientStatus::Rejected;
        event.stage = Some(Stage::Local);
        let text = render_text(&[m]);
        assert!(text.contains("  rejected at local mx1"), "{text}");
        assert!(text.contains("  accepted queued\n"), "{text}");
    }

    #[test]
    fn a_bounce_record_that_changed_nothing_says_the_status_stayed() {
        let mut m = sample();
        let event = &mut m.recipients[0].events[1];
        event.kind = "unverified dsn".into();
        event.status = RecipientStatus::Delivered;
        event.stage = Some(Stage::Bounce);
        let text = render_text(&[m.clone()]);
        assert!(
            text.contains("  unverified dsn (recipient stays delivered) at bounce mx1"),
            "{text}"
        );
        let event = &mut m.recipients[0].events[1];
        event.kind = "bounce".into();
        event.status = RecipientStatus::Bounced;
        let text = render_text(&[m]);
        assert!(text.contains("  bounce bounced at bounce mx1"), "{text}");
    }

    #[test]
    fn text_names_the_bounce_type_next_to_the_reason() {
        let mut m = sample();
        m.recipients[0].status = RecipientStatus::Failed;
        m.recipients[0].reason = Some("userunknown".into());
        m.recipients[0].bounce_type = Some("hard".into());
        let text = render_text(&[m]);
        assert!(
            text.contains("to <bob@example.net>: failed (userunknown, hard): 451"),
            "{text}"
        );
    }

    #[test]
    fn a_pending_recipient_shows_its_attempts_and_next_attempt() {
        let mut m = sample();
        m.recipients[0].status = RecipientStatus::Queued;
        m.recipients[0].reason = None;
        m.recipients[0].attempts = 0;
        let text = render_text(std::slice::from_ref(&m));
        assert!(
            text.contains(
                "to <bob@example.net>: queued, 0 attempts, next attempt 2026-11-23T18:05:02.000Z:"
            ),
            "{text}"
        );
        let v = to_json(&m);
        assert_eq!(v["recipients"][0]["attempts"], 0);
        assert_eq!(
            v["recipients"][0]["next_attempt_at"],
            "2026-11-23T18:05:02.000Z"
        );
        assert_eq!(
            v["recipients"][0]["next_attempt_at_ms"],
            now().timestamp_millis() + 302_000
        );
        // A final recipient waits for nothing.
        m.recipients[0].status = RecipientStatus::Delivered;
        m.recipients[0].attempts = 2;
        m.recipients[0].next_attempt_at_ms = None;
        let text = render_text(std::slice::from_ref(&m));
        assert!(
            text.contains("to <bob@example.net>: delivered: 451"),
            "{text}"
        );
        let v = to_json(&m);
        assert_eq!(v["recipients"][0]["attempts"], 2);
        assert!(v["recipients"][0]["next_attempt_at"].is_null());
    }

    #[test]
    fn text_separates_messages_with_a_blank_line() {
        let text = render_text(&[sample(), sample()]);
        assert_eq!(text.matches("\n\n01JD").count(), 1);
        assert_eq!(render_text(&[]), "");
    }

    #[test]
    fn json_is_one_message_per_line_with_rfc3339_times() {
        let out = render(&[sample(), sample()], true);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["receipt"], "01JD0000000000000000000000");
        assert_eq!(v["received_at"], "2026-11-23T18:00:00.000Z");
        assert_eq!(v["received_at_ms"], now().timestamp_millis());
        let r = &v["recipients"][0];
        assert_eq!(r["status"], "deferred");
        assert_eq!(r["updated_at"], "2026-11-23T18:00:02.000Z");
        let e = &r["events"][1];
        assert_eq!(e["at"], "2026-11-23T18:00:02.000Z");
        assert_eq!(e["stage"], "rcpt");
        assert_eq!(e["reply_text"], "Greylisted\nplease retry");
        assert_eq!(e["remote_ip"], "192.0.2.25");
        assert_eq!(e["remote_port"], 2525);
    }

    #[test]
    fn the_remote_port_is_shown_only_off_port_25() {
        let mut m = sample();
        m.recipients[0].events[1].remote_port = Some(25);
        let text = render_text(&[m.clone()]);
        assert!(
            text.contains(" mx1.example.net [192.0.2.25] TLSv1_3"),
            "{text}"
        );
        m.recipients[0].events[1].remote_port = None;
        let text = render_text(&[m]);
        assert!(
            text.contains(" mx1.example.net [192.0.2.25] TLSv1_3"),
            "{text}"
        );
    }

    #[test]
    fn a_dsn_event_names_its_action_and_receipt_in_text_and_json() {
        let mut m = sample();
        let mut e = m.recipients[0].events[0].clone();
        e.kind = "dsn_sent".into();
        e.stage = Some(crate::store::Stage::Local);
        e.dsn_action = Some("failed".into());
        e.dsn_receipt = Some("01M84TQJYPE2DRCRGB1667C64N".into());
        m.recipients[0].events.push(e);
        let text = render_text(&[m.clone()]);
        assert!(
            text.contains("at local action=failed dsn=01M84TQJYPE2DRCRGB1667C64N\n"),
            "{text}"
        );
        let v = to_json(&m);
        let e = &v["recipients"][0]["events"][2];
        assert_eq!(e["dsn_action"], "failed");
        assert_eq!(e["dsn_receipt"], "01M84TQJYPE2DRCRGB1667C64N");
    }

    #[test]
    fn hops_tried_first_are_shown_under_the_attempt_and_in_json() {
        let mut m = sample();
        m.recipients[0].events[1].tried_first = vec![crate::store::HopFailure {
            hop: "mx0.example.net[192.0.2.24]:2526".into(),
            step: "greeting".into(),
            reply_code: Some(421),
            enhanced_status: Some("4.3.2".into()),
            text: "421 4.3.2 busy\x1b[2J, try later".into(),
        }];
        let text = render_text(&[m.clone()]);
        assert!(
            text.contains(
                "\n      tried first: mx0.example.net[192.0.2.24]:2526 at greeting: \
                 421 4.3.2 busy\\u{1b}[2J, try later\n"
            ),
            "{text}"
        );
        let v = to_json(&m);
        let hop = &v["recipients"][0]["events"][1]["tried_first"][0];
        assert_eq!(hop["hop"], "mx0.example.net[192.0.2.24]:2526");
        assert_eq!(hop["step"], "greeting");
        assert_eq!(hop["reply_code"], 421);
        assert_eq!(hop["text"], "421 4.3.2 busy\u{1b}[2J, try later");
    }

    #[test]
    fn sanitize_escapes_control_characters_and_line_breaks_but_for_replies() {
        assert_eq!(
            sanitize_lines("a\x1b[31mb\nc\td\x07"),
            "a\\u{1b}[31mb\nc\td\\u{7}"
        );
        assert_eq!(
            sanitize("hello\n  to <v@x.test>: delivered"),
            "hello\\n  to <v@x.test>: delivered"
        );
        assert_eq!(sanitize("evil\u{202E}gpj.exe"), "evil\\u{202e}gpj.exe");
    }
}
