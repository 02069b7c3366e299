//! `mailtrail bounces`, `mailtrail suppress` and `mailtrail bounce ingest` output: pure
//! functions from store records to text tables or JSON lines.

use std::fmt::Write as _;

use super::log::{format_time, sanitize};
use crate::bounce::ingest::Ingested;
use crate::store::{StoredBounce, Suppression};

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref()
        .map(ToString::to_string)
        .unwrap_or_else(|| "-".into())
}

/// One line per bounce, oldest first as the store returns them.
pub fn render_bounces(bounces: &[StoredBounce], json: bool) -> String {
    let mut out = String::new();
    if json {
        for b in bounces {
            let _ = writeln!(out, "{}", serde_json::to_string(b).unwrap_or_default());
        }
        return out;
    }
    if bounces.is_empty() {
        return "no bounces\n".to_string();
    }
    let _ = writeln!(
        out,
        "{:>6}  {:<20}  {:<32}  {:<15}  {:<10}  {:<6}  {:<26}  {:<10}  {:<9}  diagnostic",
        "id", "time", "recipient", "reason", "type", "status", "receipt", "match", "handled"
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
            "{:>6}  {:<20}  {:<32}  {:<15}  {:<10}  {:<6}  {:<26}  {:<10}  {:<9}  {}",
            b.id,
            format_time(f.at_ms).get(..19).unwrap_or(""),
            sanitize(&f.recipient),
            f.reason,
            f.bounce_type,
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

pub fn render_suppressions(list: &[Suppression], json: bool) -> String {
    let mut out = String::new();
    if json {
        for s in list {
            let _ = writeln!(out, "{}", serde_json::to_string(s).unwrap_or_default());
        }
        return out;
    }
    if list.is_empty() {
        return "suppression list is empty\n".to_string();
    }
    let _ = writeln!(
        out,
        "{:<36}  {:<15}  {:<9}  {:>5}  {:<20}  {:<20}  expires",
        "address", "reason", "source", "count", "first", "last"
    );
    for s in list {
        let _ = writeln!(
            out,
            "{:<36}  {:<15}  {:<9}  {:>5}  {:<20}  {:<20}  {}",
            sanitize(&s.address),
            sanitize(&s.reason),
            sanitize(&s.source),
            s.count,
            format_time(s.first_at_ms).get(..19).unwrap_or(""),
            format_time(s.last_at_ms).get(..19).unwrap_or(""),
            s.expires_at_ms
                .map(format_time)
                .unwrap_or_else(|| "never".into())
        );
    }
    out
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
        let json = render_bounces(&[bounce(false)], true);
        let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
        assert_eq!(v["reason"], "userunknown");
    }
}
