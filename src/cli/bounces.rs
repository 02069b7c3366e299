//! `mailtrail bounces`, `mailtrail suppress` and `mailtrail bounce ingest` output: pure
//! functions from store records to text tables or JSON lines.

use std::fmt::Write as _;

use super::log::{add_times, format_time, sanitize};
use crate::bounce::ingest::Ingested;
use crate::store::{StoredBounce, Suppression};

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref()
        .map(ToString::to_string)
        .unwrap_or_else(|| "-".into())
}

/// A bounce as `bounces --json` prints it and `/api/bounces` lists it: each `*_ms` time also
/// as RFC 3339 text.
pub fn bounce_json(b: &StoredBounce) -> serde_json::Value {
    let mut v = serde_json::to_value(b).unwrap_or_default();
    add_times(&mut v, &[("at_ms", "at"), ("handled_at_ms", "handled_at")]);
    v
}

/// One line per bounce, newest first as the store returns them. Times are as `mailtrail
/// log` shows them (UTC, milliseconds, `Z`); in JSON, each `*_ms` also as that text.
pub fn render_bounces(bounces: &[StoredBounce], json: bool) -> String {
    let mut out = String::new();
    if json {
        for b in bounces {
            let _ = writeln!(out, "{}", bounce_json(b));
        }
        return out;
    }
    if bounces.is_empty() {
        return "no bounces\n".to_string();
    }
    let _ = writeln!(
        out,
        "{:>6}  {:<24}  {:<32}  {:<15}  {:<12}  {:<9}  {:<6}  {:<26}  {:<10}  {:<9}  diagnostic",
        "id",
        "time",
        "recipient",
        "reason",
        "type",
        "action",
        "status",
        "receipt",
        "match",
        "handled"
    );
    for b in bounces {
        let f = &b.facts;
        let handled = match (&b.handled_by, b.handled_at_ms) {
            // Stored before names were checked, or written into the store by other means.
            (Some(by), Some(_)) => sanitize(by),
            _ => "no".to_string(),
        };
        let diagnostic = sanitize(f.diagnostic.as_deref().unwrap_or(""))
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(100)
            .collect::<String>();
        let _ = writeln!(
            out,
            "{:>6}  {:<24}  {:<32}  {:<15}  {:<12}  {:<9}  {:<6}  {:<26}  {:<10}  {:<9}  {}",
            b.id,
            format_time(f.at_ms),
            sanitize(&f.recipient),
            f.reason,
            f.bounce_type,
            // A delay notice (`delayed`, 4.4.1 reads `expired`, soft) is no failure.
            sanitize(f.action.as_deref().unwrap_or("-")),
            opt(&f.status),
            f.receipt
                .map(|r| r.to_string())
                .unwrap_or_else(|| "(unmatched)".into()),
            match (f.receipt, f.verified) {
                (None, _) => "-",
                (Some(_), true) => "verified",
                // Matched by what every recipient of the message saw: it suppressed nothing.
                (Some(_), false) => "unverified",
            },
            handled,
            diagnostic
        );
    }
    out
}

/// One line per suppressed address; times as in [`render_bounces`].
pub fn render_suppressions(list: &[Suppression], json: bool) -> String {
    let mut out = String::new();
    if json {
        for s in list {
            let mut v = serde_json::to_value(s).unwrap_or_default();
            add_times(
                &mut v,
                &[
                    ("first_at_ms", "first_at"),
                    ("last_at_ms", "last_at"),
                    ("expires_at_ms", "expires_at"),
                ],
            );
            let _ = writeln!(out, "{v}");
        }
        return out;
    }
    if list.is_empty() {
        return "suppression list is empty\n".to_string();
    }
    let _ = writeln!(
        out,
        "{:<36}  {:<15}  {:<9}  {:>5}  {:<24}  {:<24}  expires",
        "address", "reason", "source", "count", "first", "last"
    );
    for s in list {
        let _ = writeln!(
            out,
            "{:<36}  {:<15}  {:<9}  {:>5}  {:<24}  {:<24}  {}",
            sanitize(&s.address),
            sanitize(&s.reason),
            sanitize(&s.source),
            s.count,
            format_time(s.first_at_ms),
            format_time(s.last_at_ms),
            s.expires_at_ms
                .map(format_time)
                .unwrap_or_else(|| "never".into())
        );
    }
    out
}

/// The line after a `bounces` list that `--limit` cut: that more exist and how to see them.
pub fn more_bounces_notice(shown: usize) -> String {
    format!(
        "(the newest {shown} bounce records shown; more exist: --limit {} shows more, \
         --limit 0 all)\n",
        shown.saturating_mul(2)
    )
}

/// `mailtrail bounce ingest` result line for one record.
pub fn render_ingested(file: &str, i: &Ingested) -> String {
    format!(
        "{file}: {} {} {} {} (bounce {}{})\n",
        sanitize(&i.recipient),
        i.reason,
        i.bounce_type,
        match i.receipt {
            Some(r) if i.verified => format!("matched {r} by {:?}", i.correlation),
            Some(r) => format!("matched {r} by {:?}, unverified", i.correlation),
            None => "unmatched".to_string(),
        },
        i.bounce_id,
        if i.duplicate {
            ", stored before: unchanged".to_string()
        } else if i.suppressed {
            ", address suppressed".to_string()
        } else if let Some(why) = &i.left {
            format!(", {why}")
        } else {
            String::new()
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{BounceFacts, Correlation};

    fn bounce(handled: bool) -> StoredBounce {
        let facts = BounceFacts {
            at_ms: 0,
            receipt: None,
            rcpt_index: None,
            correlation: Correlation::Unmatched,
            recipient: "a@example.org".into(),
            reported_recipient: None,
            kind: "dsn".into(),
            action: Some("failed".into()),
            status: Some("5.1.1".into()),
            reply_code: Some(550),
            diagnostic: Some("550 5.1.1 no such user\x1b[2J".into()),
            remote_mta: None,
            reporting_mta: None,
            reason: "userunknown".into(),
            bounce_type: "hard".into(),
            source_receipt: None,
            verified: false,
        };
        StoredBounce {
            id: 7,
            facts,
            handled_by: handled.then(|| "alice".into()),
            handled_at_ms: handled.then_some(1),
        }
    }

    #[test]
    fn bounce_table_shows_reason_handled_and_escapes_control_bytes() {
        let text = render_bounces(&[bounce(false), bounce(true)], false);
        assert!(text.contains("userunknown"), "{text}");
        assert!(text.contains("(unmatched)"));
        assert!(text.contains("alice"));
        assert!(!text.contains('\x1b'), "{text:?}");
        let header = text.lines().next().unwrap();
        let row = text.lines().nth(1).unwrap();
        let column = header.find("action").expect("an action column");
        assert_eq!(&row[column..column + 7], "failed ", "{text}");
        let json = render_bounces(&[bounce(false)], true);
        let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
        assert_eq!(v["reason"], "userunknown");
    }

    #[test]
    fn bounce_and_suppression_times_are_shown_as_the_log_shows_them() {
        let mut b = bounce(true);
        b.facts.at_ms = 1_796_000_955_729;
        let text = render_bounces(std::slice::from_ref(&b), false);
        assert!(text.contains("  2026-11-30T01:09:15.729Z  "), "{text}");
        let v: serde_json::Value = serde_json::from_str(render_bounces(&[b], true).trim()).unwrap();
        assert_eq!(v["at"], "2026-11-30T01:09:15.729Z");
        assert_eq!(v["at_ms"], 1_796_000_955_729_i64);
        assert_eq!(v["handled_at"], "1970-01-01T00:00:00.001Z");
        let s = Suppression {
            address: "a@example.org".into(),
            reason: "userunknown".into(),
            source: "bounce".into(),
            first_at_ms: 1_796_000_955_729,
            last_at_ms: 1_796_000_956_000,
            count: 2,
            expires_at_ms: Some(1_796_000_957_001),
        };
        let text = render_suppressions(std::slice::from_ref(&s), false);
        for t in [
            "2026-11-30T01:09:15.729Z",
            "2026-11-30T01:09:16.000Z",
            "2026-11-30T01:09:17.001Z",
        ] {
            assert!(text.contains(t), "{t}: {text}");
        }
        let v: serde_json::Value =
            serde_json::from_str(render_suppressions(&[s], true).trim()).unwrap();
        assert_eq!(v["first_at"], "2026-11-30T01:09:15.729Z");
        assert_eq!(v["expires_at"], "2026-11-30T01:09:17.001Z");
    }
}
