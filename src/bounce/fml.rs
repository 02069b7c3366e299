//! Notices from the fml mailing-list manager (`X-MLServer: fml ...`): the list refused a post
//! (the sender is not a member, a spammer) or stopped a mail loop. Each line of the notice
//! that ends in `<address>.`, before "Original mail as follows:", names the address the
//! notice is about; the notice text goes to the classifier (rules for fml's wording are in
//! `rules.toml`).

use super::message::View;
use super::{BounceKind, BounceRecord};

/// At most this many addresses per notice (hostile input stays linear).
const MAX_RECIPIENTS: usize = 100;
/// At most this much notice text per record.
const MAX_DIAGNOSTIC: usize = 500;

pub(crate) fn records(view: &View) -> Vec<BounceRecord> {
    let is_fml = view
        .header("x-mlserver")
        .is_some_and(|v| v.to_ascii_lowercase().contains("fml"));
    if !is_fml {
        return Vec::new();
    }
    let notice = view
        .human
        .split("Original mail as follows:")
        .next()
        .unwrap_or("");
    let text = clip(&notice.split_whitespace().collect::<Vec<_>>().join(" "));
    notice
        .lines()
        .filter_map(named_address)
        .take(MAX_RECIPIENTS)
        .map(|address| {
            let mut r = BounceRecord::new(address.to_string(), BounceKind::Heuristic);
            r.action = Some("failed".to_string());
            // The subject carries fml's verdict when the line does not ("Loop Alert: ...").
            r.diagnostic = Some(format!("{text} ({})", view.subject.trim()));
            r
        })
        .collect()
}

/// The address of a line that ends in `<local@domain>.`.
fn named_address(line: &str) -> Option<&str> {
    let inner = line.trim_end().strip_suffix(">.")?;
    let (_, address) = inner.rsplit_once('<')?;
    let valid = address.contains('@') && !address.contains(char::is_whitespace);
    valid.then_some(address)
}

fn clip(text: &str) -> String {
    let mut end = text.len().min(MAX_DIAGNOSTIC);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or("").to_string()
}

#[cfg(test)]
mod tests {
    use crate::bounce::{BounceReason, BounceType, parse};

    fn notice(subject: &str, body: &str) -> Vec<u8> {
        format!(
            "From: list-admin@lists.example\r\nTo: poster@example.net\r\nSubject: {subject}\r\n\
             Message-ID: <20260101.FML00001.list@lists.example>\r\n\
             X-MLServer: fml [fml 4.0.3 release]\r\n\r\n{body}\r\n\
             Original mail as follows:\r\n\r\nFrom: poster@example.net\r\nSubject: hi\r\n\r\nhello\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn a_post_from_a_non_member_is_rejected() {
        let raw = notice(
            "You poster@example.net are not member (list ML)",
            "You are not a member of this mailing list <list@lists.example>.\r\n\
             To subscribe, send \"guide\" to the control address.",
        );
        let records = parse(&raw);
        assert_eq!(records.len(), 1, "{records:#?}");
        assert_eq!(records[0].recipient, "list@lists.example");
        assert_eq!(records[0].reason, BounceReason::Rejected);
        assert_eq!(records[0].bounce_type, BounceType::Soft);
    }

    #[test]
    fn a_loop_alert_is_a_system_error() {
        let raw = notice(
            "Loop Alert: Duplicated Message-ID (list ML)",
            "Duplicated Message-ID in <list@lists.example>.",
        );
        let records = parse(&raw);
        assert_eq!(records.len(), 1, "{records:#?}");
        assert_eq!(records[0].reason, BounceReason::SystemError);
    }

    #[test]
    fn without_the_fml_header_nothing_is_read_this_way() {
        let raw = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hello\r\n\r\n\
                    You are not a member of this mailing list <list@lists.example>.\r\n";
        assert!(parse(raw).is_empty());
    }
}
