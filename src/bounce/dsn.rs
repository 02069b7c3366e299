//! RFC 3464 / RFC 6533 delivery-status fields: the per-message block and one block per
//! recipient, as found in a `message/delivery-status` (or `message/global-delivery-status`)
//! part or, for MTAs that inline them, in plain text.

use std::borrow::Cow;

/// One field block (per-message or per-recipient), names lowercased (the known ones as
/// static spellings), folded lines joined (a one-line value borrowed from the text).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldBlock<'a> {
    pub fields: Vec<(Cow<'static, str>, Cow<'a, str>)>,
}

impl FieldBlock<'_> {
    /// The first value of `name` (lowercase), trimmed, if non-empty.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    }

    fn is_recipient_block(&self) -> bool {
        self.get("final-recipient").is_some()
            || self.get("original-recipient").is_some()
            || (self.get("status").is_some() && self.get("action").is_some())
    }
}

/// A parsed delivery-status body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryStatus<'a> {
    pub per_message: FieldBlock<'a>,
    pub recipients: Vec<FieldBlock<'a>>,
}

const MESSAGE_FIELDS: &[&str] = &[
    "reporting-mta",
    "original-envelope-id",
    "arrival-date",
    "received-from-mta",
    "dsn-gateway",
    "x-postfix-queue-id",
    "x-postfix-sender",
    "x-original-message-id",
];

const RECIPIENT_FIELDS: &[&str] = &[
    "final-recipient",
    "original-recipient",
    "action",
    "status",
    "remote-mta",
    "diagnostic-code",
    "last-attempt-date",
    "will-retry-until",
    "x-actual-recipient",
    "final-log-id",
];

/// Whether `name` (lowercase) is a DSN field name this parser knows.
pub fn is_dsn_field(name: &str) -> bool {
    MESSAGE_FIELDS.contains(&name) || RECIPIENT_FIELDS.contains(&name)
}

/// `name` lowercased: the static spelling of a field this parser knows, else a copy.
fn field_name(name: &str) -> Cow<'static, str> {
    MESSAGE_FIELDS
        .iter()
        .chain(RECIPIENT_FIELDS)
        .find(|known| known.eq_ignore_ascii_case(name))
        .map_or_else(
            || Cow::Owned(name.to_ascii_lowercase()),
            |&known| Cow::Borrowed(known),
        )
}

/// Limits that keep hostile input linear: no real report has more recipients or fields.
/// (The per-message block and up to 1,000 recipients, SMTP's usual recipient limit.)
const MAX_BLOCKS: usize = 1001;
const MAX_FIELDS: usize = 64;

/// Splits `text` into header-style field blocks separated by blank lines. Lines that are
/// not `Name: value` nor continuations are skipped, so stray prose does not end a block.
fn blocks(text: &str) -> Vec<FieldBlock<'_>> {
    let mut out = Vec::new();
    let mut cur = FieldBlock::default();
    for raw in super::text::lines(text) {
        let line = raw.trim_end_matches('\r');
        if super::text::is_blank_line(line) {
            if !cur.fields.is_empty() {
                out.push(std::mem::take(&mut cur));
                if out.len() >= MAX_BLOCKS {
                    return out;
                }
            }
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = cur.fields.last_mut() {
                let v = v.to_mut();
                v.push(' ');
                v.push_str(line.trim());
            }
            continue;
        }
        if let Some((name, value)) = super::text::split_at_colon(line) {
            let name = name.trim();
            if !name.is_empty()
                && cur.fields.len() < MAX_FIELDS
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                cur.fields
                    .push((field_name(name), Cow::Borrowed(value.trim())));
            }
        }
    }
    if !cur.fields.is_empty() {
        out.push(cur);
    }
    out
}

/// Parses a delivery-status body. Every block that names a recipient is a recipient block;
/// per-message fields are gathered from the other blocks (some MTAs run them together).
pub fn parse_delivery_status(text: &str) -> DeliveryStatus<'_> {
    let mut ds = DeliveryStatus::default();
    for block in blocks(text) {
        if block.is_recipient_block() {
            // A recipient block that also carries per-message fields (no blank line between
            // them, as some MTAs write) lends those to the message.
            for (n, v) in &block.fields {
                if MESSAGE_FIELDS.contains(&n.as_ref()) && ds.per_message.get(n).is_none() {
                    ds.per_message.fields.push((n.clone(), v.clone()));
                }
            }
            // Several recipients without blank lines between them: a recipient field seen
            // a second time starts the next recipient.
            let mut cur = FieldBlock::default();
            for (n, v) in block.fields {
                let repeated = matches!(
                    n.as_ref(),
                    "final-recipient" | "original-recipient" | "action" | "status"
                ) && cur.get(&n).is_some();
                if repeated {
                    ds.recipients.push(std::mem::take(&mut cur));
                    if ds.recipients.len() >= MAX_BLOCKS {
                        return ds;
                    }
                }
                cur.fields.push((n, v));
            }
            if !cur.fields.is_empty() {
                ds.recipients.push(cur);
            }
        } else {
            for (n, v) in block.fields {
                if ds.per_message.fields.len() < MAX_FIELDS && ds.per_message.get(&n).is_none() {
                    ds.per_message.fields.push((n, v));
                }
            }
        }
    }
    ds
}

/// Strips an RFC 3464 type prefix (`rfc822;`, `dns;`, `smtp;`, `utf-8;`) from a field value.
pub fn strip_type(value: &str) -> &str {
    split_type(value).1
}

/// Whether `t` has the form of a registered type or a short extension (`smtp`, `rfc822`,
/// `x-unix`, `x-postfix`): one word of letters, digits and `-`, at most 12 bytes.
pub fn is_registered_type(t: &str) -> bool {
    !t.is_empty() && t.len() <= 12 && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// A field value's RFC 3464 type prefix (as written) and the rest, both trimmed; no type when
/// the text before the first `;` is not one. Registered types are short atoms (`smtp`,
/// `rfc822`, `dns`, `x400`, `utf-8`); an extension type starts with `X-` (§2.1.2: MTAs write
/// `X-Postfix`, `X-Unix`, but also `X-Outbound-Mail-Relay` or `X-mPOP-Fallback_MX`), so it
/// may be longer and hold `_` and `.`. A word of prose before a `;` has spaces, or is neither.
pub fn split_type(value: &str) -> (Option<&str>, &str) {
    let Some((t, rest)) = value.split_once(';') else {
        return (None, value.trim());
    };
    let t = t.trim();
    let registered = is_registered_type(t);
    let extension = t.len() <= 40
        && t.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("x-"))
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !t.is_empty() && (registered || extension) {
        (Some(t), rest.trim())
    } else {
        (None, value.trim())
    }
}

/// The address in a recipient field value: type prefix and angle brackets removed.
pub fn address_of(value: &str) -> Option<String> {
    let (kind, v) = split_type(value);
    let unescaped;
    let v = if kind.is_some_and(|k| k.eq_ignore_ascii_case("utf-8")) && v.contains("\\x{") {
        unescaped = unescape_unicode(v);
        unescaped.as_str()
    } else {
        v
    };
    let v = v.trim().trim_start_matches('<');
    // A quoted local part (RFC 5321 4.1.2: `"john doe"@example.org`) may hold spaces and
    // `>`; the address runs past its closing quote.
    if let Some(quoted) = quoted_local_part_address(v) {
        return Some(quoted.to_string());
    }
    let v = v.split(['>', ' ', '\t']).next().unwrap_or("").trim();
    let v = v.trim_matches(|c| c == '"' || c == '\'');
    if v.contains('@') || (!v.is_empty() && !v.contains(char::is_whitespace)) {
        Some(v.to_string())
    } else {
        None
    }
}

/// `"local part"@domain` at the start of `v` (backslash escapes inside the quotes), as
/// written; `None` when `v` does not start so.
fn quoted_local_part_address(v: &str) -> Option<&str> {
    let rest = v.strip_prefix('"')?;
    let mut escaped = false;
    let close = rest.char_indices().find_map(|(i, c)| {
        let end = !escaped && c == '"';
        escaped = !escaped && c == '\\';
        end.then_some(i)
    })?;
    let after = rest.get(close + 1..)?.strip_prefix('@')?;
    let domain_len = after
        .find(|c: char| c == '>' || c.is_whitespace())
        .unwrap_or(after.len());
    (domain_len > 0)
        .then(|| v.get(..close + 3 + domain_len))
        .flatten()
}

/// An RFC 6533 `utf-8-addr-xtext` / `utf-8-addr-unitext` value with its `\\x{HEX}` escapes
/// (EmbeddedUnicodeChar) read as the characters they name; an escape that names none, or is
/// not closed, stays as written.
fn unescape_unicode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut rest = v;
    while let Some(at) = rest.find("\\x{") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 3..];
        let decoded = after.split_once('}').and_then(|(hex, tail)| {
            let c = (1..=6)
                .contains(&hex.len())
                .then(|| u32::from_str_radix(hex, 16).ok())
                .flatten()
                .and_then(char::from_u32)?;
            Some((c, tail))
        });
        match decoded {
            Some((c, tail)) => {
                out.push(c);
                rest = tail;
            }
            None => {
                out.push_str("\\x{");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_addresses_lose_their_escapes() {
        assert_eq!(
            address_of("utf-8; j\\x{F6}rg\\x{2B}tag@b\\x{FC}ro.example").as_deref(),
            Some("j\u{f6}rg+tag@b\u{fc}ro.example")
        );
        assert_eq!(
            address_of("utf-8; j\u{f6}rg@example.org").as_deref(),
            Some("j\u{f6}rg@example.org")
        );
        // Broken escapes stay as they were; rfc822 addresses are never unescaped.
        assert_eq!(unescape_unicode("a\\x{D800}b\\x{41"), "a\\x{D800}b\\x{41");
        assert_eq!(
            address_of("rfc822; a\\x{41}@example.org").as_deref(),
            Some("a\\x{41}@example.org")
        );
    }

    const TWO_RECIPIENTS: &str = "Reporting-MTA: dns; mx.example.org\r\n\
Original-Envelope-Id: env-42\r\n\
Arrival-Date: Mon, 2 Jun 2025 10:00:00 +0000\r\n\
\r\n\
Final-Recipient: rfc822; alice@example.net\r\n\
Original-Recipient: rfc822;Alice@example.net\r\n\
Action: failed\r\n\
Status: 5.1.1\r\n\
Remote-MTA: dns; mx.example.net\r\n\
Diagnostic-Code: smtp; 550 5.1.1 <alice@example.net>:\r\n    Recipient address rejected: User unknown\r\n\
\r\n\
Final-Recipient: rfc822; bob@example.net\r\n\
Action: delayed\r\n\
Status: 4.4.1\r\n\
Will-Retry-Until: Tue, 3 Jun 2025 10:00:00 +0000\r\n";

    #[test]
    fn parses_per_message_and_every_recipient_block() {
        let ds = parse_delivery_status(TWO_RECIPIENTS);
        assert_eq!(
            ds.per_message.get("reporting-mta"),
            Some("dns; mx.example.org")
        );
        assert_eq!(ds.per_message.get("original-envelope-id"), Some("env-42"));
        assert_eq!(ds.recipients.len(), 2);
        let a = &ds.recipients[0];
        assert_eq!(a.get("status"), Some("5.1.1"));
        assert_eq!(
            a.get("diagnostic-code"),
            Some("smtp; 550 5.1.1 <alice@example.net>: Recipient address rejected: User unknown")
        );
        assert_eq!(ds.recipients[1].get("action"), Some("delayed"));
    }

    #[test]
    fn splits_recipients_written_without_blank_lines() {
        let text = "Final-Recipient: rfc822; a@x.example\nAction: failed\nStatus: 5.0.0\n\
Final-Recipient: rfc822; b@x.example\nAction: failed\nStatus: 5.2.2\n";
        let ds = parse_delivery_status(text);
        assert_eq!(ds.recipients.len(), 2);
        assert_eq!(ds.recipients[1].get("status"), Some("5.2.2"));
    }

    #[test]
    fn keeps_fields_that_come_before_final_recipient() {
        let text = "Action: failed\nFinal-Recipient: rfc822; a@x.example\n\
Original-Recipient: rfc822; a@x.example\nStatus: 5.1.1\n";
        let ds = parse_delivery_status(text);
        assert_eq!(ds.recipients.len(), 1);
        assert_eq!(ds.recipients[0].get("status"), Some("5.1.1"));
        assert_eq!(ds.recipients[0].get("action"), Some("failed"));
    }

    #[test]
    fn strips_types_and_brackets_from_addresses() {
        assert_eq!(
            address_of("rfc822; <a@b.example>").as_deref(),
            Some("a@b.example")
        );
        assert_eq!(
            address_of("RFC822;a@b.example").as_deref(),
            Some("a@b.example")
        );
        assert_eq!(address_of("   ").as_deref(), None);
        // A quoted local part, spaces and all (RFC 5321 4.1.2).
        assert_eq!(
            address_of("rfc822; \"john doe\"@dest.example").as_deref(),
            Some("\"john doe\"@dest.example")
        );
        assert_eq!(
            address_of("rfc822; <\"a \\\" b\"@d.example> (x)").as_deref(),
            Some("\"a \\\" b\"@d.example")
        );
        assert_eq!(
            address_of("rfc822; \"not closed@d.example").as_deref(),
            Some("not")
        );
        assert_eq!(strip_type("smtp; 550 no"), "550 no");
        assert_eq!(strip_type("550 no; really"), "550 no; really");
        assert_eq!(
            split_type("X-Outbound-Mail-Relay; Host not found"),
            (Some("X-Outbound-Mail-Relay"), "Host not found")
        );
        assert_eq!(
            split_type(" X-mPOP-Fallback_MX ; connect to x: timed out"),
            (Some("X-mPOP-Fallback_MX"), "connect to x: timed out")
        );
        // Not a type: an unregistered word that is not an extension, or prose.
        assert_eq!(
            split_type("Mailbox_unavailable; try later"),
            (None, "Mailbox_unavailable; try later")
        );
        assert_eq!(split_type("x- y; z"), (None, "x- y; z"));
        assert_eq!(split_type("smtp;550 no"), (Some("smtp"), "550 no"));
    }
}
