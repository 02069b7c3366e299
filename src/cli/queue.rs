//! `mailtrail queue list|retry|delete`: the pending recipients as a table and the one-line
//! results of queue actions. Pure functions over store records; `main.rs` does the I/O.

use crate::receipt::ReceiptId;
use crate::store::QueueEntry;

use super::log::{format_time, sanitize};

/// Longest last reply shown in the table; the full text is in `mailtrail log`.
const REPLY_WIDTH: usize = 60;

/// The first line of a reply, shortened to `width` characters.
fn short_reply(reply: &str, width: usize) -> String {
    let first = sanitize(reply.lines().next().unwrap_or(""));
    if first.chars().count() <= width {
        return first;
    }
    let mut s: String = first.chars().take(width.saturating_sub(1)).collect();
    s.push('…');
    s
}

/// Seconds as `45s`, `12m`, `3h`, `2d` (the largest unit that fits).
fn short_duration(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        s if s < 60 => format!("{s}s"),
        s if s < 3_600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h", s / 3_600),
        s => format!("{}d", s / 86_400),
    }
}

/// When the next attempt is, relative to `now_ms`: `now` when already due.
fn next_attempt(next_ms: i64, now_ms: i64) -> String {
    if next_ms <= now_ms {
        "now".to_string()
    } else {
        format!("in {}", short_duration(next_ms - now_ms))
    }
}

/// A column-aligned table with a header; an explanatory line when the queue is empty.
pub fn render_list(entries: &[QueueEntry], now_ms: i64) -> String {
    if entries.is_empty() {
        return "queue is empty\n".to_string();
    }
    let header = [
        "RECEIPT",
        "AGE",
        "SENDER",
        "RECIPIENT",
        "STATUS",
        "ATTEMPTS",
        "NEXT",
        "LAST REPLY",
    ];
    let rows: Vec<[String; 8]> = entries
        .iter()
        .map(|e| {
            [
                e.receipt.to_string(),
                short_duration(now_ms - e.received_at_ms),
                format!("<{}>", sanitize(&e.envelope_sender)),
                sanitize(&e.recipient),
                e.status.to_string(),
                e.attempts.to_string(),
                next_attempt(e.next_attempt_at_ms, now_ms),
                e.last_reply
                    .as_deref()
                    .map(|r| short_reply(r, REPLY_WIDTH))
                    .unwrap_or_default(),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut push_row = |cells: &[&str]| {
        let last = cells.len() - 1;
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            out.push_str(cell);
            if i < last {
                let pad = w - cell.chars().count() + 2;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        // The last column is not padded: no trailing spaces.
        while out.ends_with(' ') {
            out.pop();
        }
        out.push('\n');
    };
    push_row(&header);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        push_row(&cells);
    }
    let messages = {
        let mut r: Vec<ReceiptId> = entries.iter().map(|e| e.receipt).collect();
        r.sort();
        r.dedup();
        r.len()
    };
    out.push_str(&format!(
        "{} pending recipient{} in {} message{}\n",
        entries.len(),
        plural(entries.len()),
        messages,
        plural(messages)
    ));
    out
}

/// One JSON object per pending recipient, with RFC 3339 times added.
pub fn render_list_json(entries: &[QueueEntry]) -> String {
    let mut out = String::new();
    for e in entries {
        let mut v = serde_json::to_value(e).unwrap_or(serde_json::Value::Null);
        if let Some(map) = v.as_object_mut() {
            map.insert("received_at".into(), format_time(e.received_at_ms).into());
            map.insert(
                "next_attempt_at".into(),
                format_time(e.next_attempt_at_ms).into(),
            );
        }
        out.push_str(&v.to_string());
        out.push('\n');
    }
    out
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

pub fn render_retry(count: usize, receipt: Option<ReceiptId>) -> String {
    match receipt {
        Some(r) => format!("{r}: {count} pending recipient{} due now\n", plural(count)),
        None => format!("{count} pending recipient{} due now\n", plural(count)),
    }
}

pub fn render_delete(count: usize, receipt: ReceiptId) -> String {
    if count == 0 {
        format!("{receipt}: no pending recipients (nothing deleted)\n")
    } else {
        // The CLI cannot see the server's connections: say what an attempt under way does.
        format!(
            "{receipt}: {count} pending recipient{} deleted from the queue (status failed); \
             an attempt already under way still ends, and a final reply from it (250, 5xx) \
             is recorded over the delete (see mailtrail log {receipt})\n",
            plural(count)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RecipientStatus;

    fn entry(recipient: &str, status: RecipientStatus, last: Option<&str>) -> QueueEntry {
        QueueEntry {
            receipt: "01JD0000000000000000000000".parse().unwrap(),
            received_at_ms: 1_000_000,
            envelope_sender: "app@example.com".into(),
            recipient: recipient.into(),
            status,
            attempts: 2,
            next_attempt_at_ms: 1_300_000,
            last_reply: last.map(str::to_string),
        }
    }

    #[test]
    fn list_is_an_aligned_table_with_a_summary() {
        let entries = [
            entry(
                "bob@example.net",
                RecipientStatus::Deferred,
                Some("451 4.7.1 Greylisted\nplease retry"),
            ),
            entry("c@x.org", RecipientStatus::Queued, None),
        ];
        let out = render_list(&entries, 1_000_000 + 7_200_000);
        let expected = "\
RECEIPT                     AGE  SENDER             RECIPIENT        STATUS    ATTEMPTS  NEXT  LAST REPLY
01JD0000000000000000000000  2h   <app@example.com>  bob@example.net  deferred  2         now   451 4.7.1 Greylisted
01JD0000000000000000000000  2h   <app@example.com>  c@x.org          queued    2         now
2 pending recipients in 1 message
";
        assert_eq!(out, expected);
    }

    #[test]
    fn list_shows_when_the_next_attempt_is() {
        let out = render_list(
            &[entry("a@b", RecipientStatus::Deferred, None)],
            1_300_000 - 90_000,
        );
        assert!(out.contains("in 1m"), "{out}");
        assert!(out.ends_with("1 pending recipient in 1 message\n"));
        assert_eq!(render_list(&[], 0), "queue is empty\n");
    }

    #[test]
    fn long_replies_are_cut_and_control_characters_escaped() {
        let long = "5".repeat(100);
        assert_eq!(short_reply(&long, 10).chars().count(), 10);
        assert!(short_reply(&long, 10).ends_with('…'));
        assert_eq!(short_reply("a\x1bb\nsecond", 10), "a\\u{1b}b");
    }

    #[test]
    fn json_list_has_one_object_per_recipient() {
        let out = render_list_json(&[entry("a@b", RecipientStatus::Queued, None)]);
        let v: serde_json::Value = serde_json::from_str(out.trim_end()).unwrap();
        assert_eq!(v["recipient"], "a@b");
        assert_eq!(v["status"], "queued");
        assert_eq!(v["next_attempt_at"], "1970-01-01T00:21:40.000Z");
    }

    #[test]
    fn retry_and_delete_lines() {
        let r: ReceiptId = "01JD0000000000000000000000".parse().unwrap();
        assert_eq!(render_retry(3, None), "3 pending recipients due now\n");
        assert_eq!(
            render_retry(1, Some(r)),
            "01JD0000000000000000000000: 1 pending recipient due now\n"
        );
        assert_eq!(
            render_delete(2, r),
            "01JD0000000000000000000000: 2 pending recipients deleted from the queue (status \
             failed); an attempt already under way still ends, and a final reply from it \
             (250, 5xx) is recorded over the delete (see mailtrail log \
             01JD0000000000000000000000)\n"
        );
        assert_eq!(
            render_delete(0, r),
            "01JD0000000000000000000000: no pending recipients (nothing deleted)\n"
        );
    }
}
