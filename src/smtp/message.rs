//! Turns a completed SMTP transaction (envelope + raw content) into the [`AcceptedMessage`]
//! handed to the store: prepends our `Received:` trace header (RFC 5321 4.4, with-protocol
//! per RFC 3848), extracts Message-ID and Subject, and removes `X-Mailtrail-Context`.

use std::net::IpAddr;

use chrono::{DateTime, Utc};

use crate::receipt::ReceiptId;
use crate::spool::{AcceptedMessage, AcceptedRecipient, DsnRet};

/// The header an application uses to tag a message for later lookup; never relayed.
pub const CONTEXT_HEADER: &str = "X-Mailtrail-Context";

/// What the session knows about a transaction when its content is complete.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub client_ip: IpAddr,
    pub helo: String,
    /// EHLO (ESMTP) rather than HELO.
    pub esmtp: bool,
    pub tls_version: Option<String>,
    pub auth_user: Option<String>,
    pub envelope_sender: String,
    pub recipients: Vec<AcceptedRecipient>,
    pub envid: Option<String>,
    pub ret: Option<DsnRet>,
    pub eight_bit: bool,
    pub smtputf8: bool,
    pub inbound_bounce: bool,
}

impl Envelope {
    /// RFC 3848 with-protocol: SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA.
    pub fn with_protocol(&self) -> &'static str {
        match (
            self.esmtp,
            self.tls_version.is_some(),
            self.auth_user.is_some(),
        ) {
            (false, _, _) => "SMTP",
            (true, false, false) => "ESMTP",
            (true, true, false) => "ESMTPS",
            (true, false, true) => "ESMTPA",
            (true, true, true) => "ESMTPSA",
        }
    }
}

/// Builds the stored message. `raw` is the content as received (CRLF line ends, unstuffed).
pub fn build(
    envelope: Envelope,
    raw: &[u8],
    receipt: ReceiptId,
    received_at: DateTime<Utc>,
    hostname: &str,
) -> AcceptedMessage {
    let (header_block, rest, unseparated) = split_header(raw);
    let (kept_headers, context) = remove_context(header_block);
    let (message_id, subject) = identify(&kept_headers);

    let received = received_header(&envelope, receipt, received_at, hostname);
    let mut body = Vec::with_capacity(received.len() + kept_headers.len() + rest.len() + 2);
    body.extend_from_slice(received.as_bytes());
    body.extend_from_slice(&kept_headers);
    if unseparated {
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(rest);

    AcceptedMessage {
        receipt,
        received_at_ms: received_at.timestamp_millis(),
        client_ip: envelope.client_ip,
        helo: envelope.helo,
        tls_version: envelope.tls_version,
        auth_user: envelope.auth_user,
        envelope_sender: envelope.envelope_sender,
        recipients: envelope.recipients,
        envid: envelope.envid,
        ret: envelope.ret,
        eight_bit: envelope.eight_bit,
        smtputf8: envelope.smtputf8,
        message_id,
        subject,
        context,
        body,
        inbound_bounce: envelope.inbound_bounce,
    }
}

/// `Received: from <helo> ([ip]) by <host> (mailtrail) with <proto> id <receipt> [for
/// <rcpt>]; <date>`. `for` is only given for a single recipient, so that one recipient's copy
/// does not disclose the others.
pub fn received_header(
    envelope: &Envelope,
    receipt: ReceiptId,
    received_at: DateTime<Utc>,
    hostname: &str,
) -> String {
    let ip = match envelope.client_ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("IPv6:{v6}"),
    };
    let helo: String = envelope
        .helo
        .chars()
        .filter(|c| c.is_ascii_graphic() && !matches!(c, '(' | ')' | ';'))
        .collect();
    let mut header = format!(
        "Received: from {helo} ([{ip}])\r\n\tby {hostname} (mailtrail) with {} id {receipt}",
        envelope.with_protocol()
    );
    if let [only] = envelope.recipients.as_slice() {
        header.push_str(&format!("\r\n\tfor <{}>", only.address));
    }
    header.push_str(&format!("; {}\r\n", received_at.to_rfc2822()));
    header
}

/// The number of `Received:` fields in the header of `raw` (the hops it has made).
pub fn received_count(raw: &[u8]) -> usize {
    fields(split_header(raw).0)
        .iter()
        .filter(|f| {
            f.get(..9)
                .is_some_and(|name| name.eq_ignore_ascii_case(b"received:"))
        })
        .count()
}

/// Splits at the end of the header section: the blank line, which the rest starts with,
/// or the first line that is no header field (RFC 5322 2.2: a name of printable characters
/// but `:`, then `:`; or a continuation of one), where the body starts without a blank
/// line: `true` then, and the stored message gets one there, as Postfix's cleanup does
/// (without, a message of body lines only was relayed and returned in DSNs with
/// `second: line` of its body read as a header field). The header block keeps its final
/// CRLF. A message of header fields only is all header.
fn split_header(raw: &[u8]) -> (&[u8], &[u8], bool) {
    let mut pos = 0;
    while pos < raw.len() {
        let end = raw[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(raw.len(), |i| pos + i + 1);
        let line = &raw[pos..end];
        if line == b"\r\n" {
            return (&raw[..pos], &raw[pos..], false);
        }
        let field = match line.first() {
            Some(b' ' | b'\t') => pos > 0,
            _ => is_field_start(line),
        };
        if !field {
            return (&raw[..pos], &raw[pos..], true);
        }
        pos = end;
    }
    (raw, &[], false)
}

/// Whether `line` starts a header field: a name of printable US-ASCII but `:`, white space
/// allowed before the colon (RFC 5322 4.5.8, obsolete syntax still sent).
fn is_field_start(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return false;
    };
    let name = line[..colon].trim_ascii_end();
    !name.is_empty() && name.iter().all(|b| (b'!'..=b'~').contains(b))
}

/// Removes every `X-Mailtrail-Context` field (with its folded lines); returns the remaining
/// header block and the first field's unfolded, trimmed value.
fn remove_context(header_block: &[u8]) -> (Vec<u8>, Option<String>) {
    let mut kept = Vec::with_capacity(header_block.len());
    let mut context = None;
    for field in fields(header_block) {
        let name_end = field.iter().position(|&b| b == b':');
        let is_context = name_end.is_some_and(|end| {
            field.get(..end).is_some_and(|name| {
                name.trim_ascii()
                    .eq_ignore_ascii_case(CONTEXT_HEADER.as_bytes())
            })
        });
        if !is_context {
            kept.extend_from_slice(field);
            continue;
        }
        if context.is_none() {
            let value = name_end.and_then(|end| field.get(end + 1..)).unwrap_or(&[]);
            let unfolded: Vec<u8> = value
                .iter()
                .copied()
                .filter(|&b| b != b'\r' && b != b'\n')
                .collect();
            let text = String::from_utf8_lossy(&unfolded).trim().to_string();
            if !text.is_empty() {
                context = Some(text);
            }
        }
    }
    (kept, context)
}

/// Header fields: each a line plus its continuation lines (starting with SP or HT).
fn fields(block: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    while pos < block.len() {
        let line_end = block[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| pos + i + 1)
            .unwrap_or(block.len());
        let continues = matches!(block.get(line_end), Some(b' ' | b'\t'));
        if !continues {
            out.push(&block[start..line_end]);
            start = line_end;
        }
        pos = line_end;
    }
    out
}

/// Message-ID (angle brackets stripped) and Subject (encoded words decoded).
fn identify(header_block: &[u8]) -> (Option<String>, Option<String>) {
    if header_block.is_empty() {
        return (None, None);
    }
    let mut with_end = header_block.to_vec();
    with_end.extend_from_slice(b"\r\n");
    match mail_parser::MessageParser::default().parse_headers(&with_end) {
        Some(parsed) => (
            parsed.message_id().map(str::to_string),
            parsed.subject().map(str::to_string),
        ),
        None => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(recipients: &[&str]) -> Envelope {
        Envelope {
            client_ip: "192.0.2.7".parse().unwrap(),
            helo: "client.example".into(),
            esmtp: true,
            tls_version: None,
            auth_user: None,
            envelope_sender: "app@example.com".into(),
            recipients: recipients
                .iter()
                .map(|a| AcceptedRecipient {
                    address: a.to_string(),
                    orcpt: None,
                    notify: None,
                    preset: None,
                })
                .collect(),
            envid: None,
            ret: None,
            eight_bit: false,
            smtputf8: false,
            inbound_bounce: false,
        }
    }

    fn at() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap()
    }

    #[test]
    fn prepends_received_header_with_receipt_id() {
        let id = ReceiptId::new();
        let raw = b"Subject: hi\r\n\r\nbody\r\n";
        let msg = build(envelope(&["a@example.net"]), raw, id, at(), "mx.test");
        let text = String::from_utf8(msg.body).unwrap();
        let expected = format!(
            "Received: from client.example ([192.0.2.7])\r\n\tby mx.test (mailtrail) with ESMTP id {id}\r\n\tfor <a@example.net>; Tue, 14 Nov 2023 22:13:20 +0000\r\nSubject: hi\r\n\r\nbody\r\n"
        );
        assert_eq!(text, expected);
        assert_eq!(msg.received_at_ms, 1_700_000_000_000);
    }

    #[test]
    fn omits_for_clause_with_several_recipients() {
        let h = received_header(&envelope(&["a@x", "b@x"]), ReceiptId::new(), at(), "h");
        assert!(!h.contains("for <"), "{h}");
    }

    #[test]
    fn names_rfc3848_protocols() {
        let mut e = envelope(&[]);
        assert_eq!(e.with_protocol(), "ESMTP");
        e.tls_version = Some("TLSv1_3".into());
        assert_eq!(e.with_protocol(), "ESMTPS");
        e.auth_user = Some("u".into());
        assert_eq!(e.with_protocol(), "ESMTPSA");
        e.tls_version = None;
        assert_eq!(e.with_protocol(), "ESMTPA");
        e.esmtp = false;
        assert_eq!(e.with_protocol(), "SMTP");
    }

    #[test]
    fn brackets_ipv6_literal() {
        let mut e = envelope(&[]);
        e.client_ip = "::1".parse().unwrap();
        let h = received_header(&e, ReceiptId::new(), at(), "h");
        assert!(h.contains("([IPv6:::1])"), "{h}");
    }

    #[test]
    fn extracts_message_id_and_decoded_subject() {
        let raw =
            b"Message-ID: <abc@example.com>\r\nSubject: =?UTF-8?B?SGVsbG8gd29ybGQ=?=\r\n\r\nx\r\n";
        let msg = build(envelope(&["a@x"]), raw, ReceiptId::new(), at(), "h");
        assert_eq!(msg.message_id.as_deref(), Some("abc@example.com"));
        assert_eq!(msg.subject.as_deref(), Some("Hello world"));
    }

    /// Japanese business mail names its charset in encoded words (ISO-2022-JP here): the
    /// mail log shows the subject as written, not the escape sequences.
    #[test]
    fn decodes_a_subject_in_a_multi_byte_charset() {
        let raw = b"Subject: =?ISO-2022-JP?B?GyRCQEE1YT1xJE4kNDBGRmIbKEI=?=\r\n\r\nx\r\n";
        let msg = build(envelope(&["a@x"]), raw, ReceiptId::new(), at(), "h");
        assert_eq!(msg.subject.as_deref(), Some("請求書のご案内"));
    }

    #[test]
    fn removes_context_header_and_keeps_its_value() {
        let raw = b"From: a@x\r\nX-Mailtrail-Context: order=42\r\n  user=7\r\nSubject: s\r\n\r\nX-Mailtrail-Context: in body\r\n";
        let msg = build(envelope(&["a@x"]), raw, ReceiptId::new(), at(), "h");
        assert_eq!(msg.context.as_deref(), Some("order=42  user=7"));
        let text = String::from_utf8(msg.body).unwrap();
        let after_received = text.split_once("+0000\r\n").unwrap().1;
        assert_eq!(
            after_received,
            "From: a@x\r\nSubject: s\r\n\r\nX-Mailtrail-Context: in body\r\n"
        );
    }

    #[test]
    fn context_header_name_is_case_insensitive() {
        let raw = b"x-mailtrail-context: c1\r\n\r\nb\r\n";
        let msg = build(envelope(&["a@x"]), raw, ReceiptId::new(), at(), "h");
        assert_eq!(msg.context.as_deref(), Some("c1"));
        assert!(
            !String::from_utf8_lossy(&msg.body)
                .to_lowercase()
                .contains("x-mailtrail-context")
        );
    }

    #[test]
    fn counts_received_fields_of_the_header_only() {
        let raw = b"Received: from a by b; Mon, 1 Jan 2026 00:00:00 +0000\r\n\
                    RECEIVED:\r\n  from c by d\r\nX-Received: no\r\nReceived-SPF: pass\r\n\
                    Subject: x\r\n\r\nReceived: in the body\r\n";
        assert_eq!(received_count(raw), 2);
        assert_eq!(received_count(b""), 0);
        assert_eq!(received_count(b"\r\nReceived: x\r\n"), 0);
    }

    #[test]
    fn a_body_that_starts_without_a_blank_line_gets_one() {
        let after_received = |raw: &[u8]| {
            let msg = build(envelope(&["a@x"]), raw, ReceiptId::new(), at(), "h");
            let text = String::from_utf8(msg.body).unwrap();
            text.split_once("+0000\r\n").unwrap().1.to_string()
        };
        // Body lines only: the second must not become a header field.
        assert_eq!(
            after_received(b"Just a body line\r\nBcc: victim@ok.test\r\n"),
            "\r\nJust a body line\r\nBcc: victim@ok.test\r\n"
        );
        // Header fields, then a line that is none: the body starts there.
        assert_eq!(
            after_received(b"Subject: s\r\n folded\r\nnot a field\r\nTo: x\r\n\r\nb\r\n"),
            "Subject: s\r\n folded\r\n\r\nnot a field\r\nTo: x\r\n\r\nb\r\n"
        );
        // A continuation with nothing to continue, a name with a space: body.
        assert_eq!(after_received(b" indented\r\n"), "\r\n indented\r\n");
        assert_eq!(after_received(b"Two words: x\r\n"), "\r\nTwo words: x\r\n");
        // A leading mbox From line is no field either (as in Postfix's cleanup): a Bcc:
        // after it must not become a header downstream.
        assert_eq!(
            after_received(b"From x Mon Dec  7 00:00:00 2026\r\nBcc: v@ok.test\r\n\r\nb\r\n"),
            "\r\nFrom x Mon Dec  7 00:00:00 2026\r\nBcc: v@ok.test\r\n\r\nb\r\n"
        );
        // Obsolete white space before the colon is still a field.
        assert_eq!(
            after_received(b"Subject : s\r\n\r\nb\r\n"),
            "Subject : s\r\n\r\nb\r\n"
        );
    }

    #[test]
    fn handles_message_without_headers_or_blank_line() {
        for raw in [&b""[..], b"\r\nbody only\r\n", b"Subject: only headers\r\n"] {
            let msg = build(envelope(&["a@x"]), raw, ReceiptId::new(), at(), "h");
            assert!(msg.body.starts_with(b"Received: "));
            assert!(msg.body.ends_with(raw));
        }
    }

    #[test]
    fn strips_comment_characters_from_helo() {
        let mut e = envelope(&[]);
        e.helo = "evil(x);y".into();
        let h = received_header(&e, ReceiptId::new(), at(), "h");
        assert!(h.starts_with("Received: from evilxy ("), "{h}");
    }
}
