//! 8-bit to 7-bit conversion of a message for a next hop that does not offer 8BITMIME
//! (RFC 6152 §3: the client converts the message or does not send it; Postfix converts).
//!
//! Every leaf part whose body holds 8-bit bytes under an identity transfer encoding (`7bit`,
//! `8bit`, `binary` or none) is encoded: quoted-printable for text, base64 for anything else
//! (RFC 2045 §6), its `Content-Transfer-Encoding` field replaced. Multipart and `message/*`
//! parts are never encoded themselves (RFC 2046 §5): the parts inside them are, and their
//! boundaries and headers stay byte for byte, and 8-bit bytes in their preambles and
//! epilogues, which readers ignore, become `?`. Once nothing 8-bit is left, a container's
//! `8bit` or `binary` label becomes `7bit`. A message without `MIME-Version`
//! gets one, or its reader would not decode the new encoding (RFC 2045 §4). Nothing else
//! changes: 8-bit bytes in header fields (which only SMTPUTF8 allows) stay, as in Postfix,
//! and so do those in a part already declared base64 or quoted-printable, which is broken
//! and whose reader would decode something else if it were encoded again.
//!
//! For a next hop without SMTPUTF8 either, the parts of an internationalised message or
//! report (RFC 6532/6533: `message/global`, `message/global-headers`,
//! `message/global-delivery-status`, which hold UTF-8 header fields) are encoded whole,
//! quoted-printable, as RFC 6532 §3.5 and RFC 6533 §6 allow where 8-bit cannot go: without
//! it those parts kept their 8-bit octets, labelled `8bit`, on a 7-bit path.

use std::borrow::Cow;

use base64::Engine;
use mail_parser::{HeaderName, Message, MessageParser, MessagePart, MimeHeaders, PartType};

/// The message with every 8-bit leaf part encoded; the message itself when it is ASCII,
/// nothing in it can be encoded, or the encoding would grow it past [`max_size`] (then it
/// goes as it is, as before there was a conversion: thousands of tiny 8-bit parts, each
/// given a header field, could make a message many times its size in memory).
/// `peer_smtputf8`: the next hop offers SMTPUTF8, so the UTF-8 inside `message/global*`
/// parts may stay as it is; without it they are encoded too.
pub fn to_7bit(raw: &[u8], peer_smtputf8: bool) -> Cow<'_, [u8]> {
    if raw.is_ascii() {
        return Cow::Borrowed(raw);
    }
    let Some(message) = MessageParser::new().with_mime_headers().parse(raw) else {
        return Cow::Borrowed(raw);
    };
    let needs_version = message.header(HeaderName::MimeVersion).is_none();
    let mut edits = Vec::new();
    let mut labels = Vec::new();
    let mut room = max_size(raw.len()) - raw.len();
    let global = !peer_smtputf8;
    if !collect(
        &message,
        raw,
        needs_version,
        global,
        &mut room,
        &mut edits,
        &mut labels,
    ) || edits.is_empty()
    {
        return Cow::Borrowed(raw);
    }
    if needs_version
        && !edits.iter().any(|e| e.start == 0)
        && let Some(top) = message.parts.first()
    {
        // The top header is not rewritten (the message is multipart): the version goes
        // at its end.
        let at = fields_end(raw.get(..top.offset_body as usize).unwrap_or_default());
        edits.push(Edit {
            start: at,
            end: at,
            replacement: MIME_VERSION.to_vec(),
        });
    }
    let out = apply(raw, &mut edits);
    if labels.is_empty() || !out.is_ascii() {
        return Cow::Owned(out);
    }
    // Nothing 8-bit is left: a multipart or attached message labelled `8bit` or `binary`
    // is now `7bit` (RFC 2046 §5: their label says what is inside them; Postfix relabels).
    edits.append(&mut labels);
    Cow::Owned(apply(raw, &mut edits))
}

/// `raw` with `edits` applied in the order of their start.
fn apply(raw: &[u8], edits: &mut [Edit]) -> Vec<u8> {
    edits.sort_by_key(|e| e.start);
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 4);
    let mut copied = 0;
    for e in edits.iter() {
        // mail-parser's parts never overlap; a range that did would be left as it is.
        if e.start < copied || e.end > raw.len() {
            continue;
        }
        out.extend_from_slice(&raw[copied..e.start]);
        out.extend_from_slice(&e.replacement);
        copied = e.end;
    }
    out.extend_from_slice(&raw[copied..]);
    out
}

const MIME_VERSION: &[u8] = b"MIME-Version: 1.0\r\n";

/// `raw[start..end]` becomes `replacement`.
struct Edit {
    start: usize,
    end: usize,
    replacement: Vec<u8>,
}

/// The largest a message of `len` bytes may become: quoted-printable of text that is all
/// 8-bit (Cyrillic, CJK) is three times its size, plus a header field per part.
pub fn max_size(len: usize) -> usize {
    len.saturating_mul(4).saturating_add(64 * 1024)
}

/// The edits for every leaf of `message` (and of the messages attached to it: their
/// parts' offsets are into the same buffer) that needs encoding. `add_version`: the top
/// header, when rewritten (the message is a single part), takes a `MIME-Version` field.
/// False when the edits would grow the message by more than `room` bytes.
/// `labels`: the edits that relabel containers as `7bit`, for when nothing 8-bit is left.
/// `global`: encode `message/global*` parts whole ([`is_global`]).
fn collect(
    message: &Message<'_>,
    raw: &[u8],
    add_version: bool,
    global: bool,
    room: &mut usize,
    edits: &mut Vec<Edit>,
    labels: &mut Vec<Edit>,
) -> bool {
    for part in &message.parts {
        let global_part = global && is_global(part);
        match &part.body {
            _ if global_part => {}
            PartType::Multipart(children) => {
                blank_preamble_and_epilogue(message, part, children, raw, edits);
                relabel(part, raw, labels);
                continue;
            }
            PartType::Message(attached) => {
                relabel(part, raw, labels);
                if !collect(attached, raw, false, global, room, edits, labels) {
                    return false;
                }
                continue;
            }
            PartType::Text(_)
            | PartType::Html(_)
            | PartType::Binary(_)
            | PartType::InlineBinary(_) => {}
        }
        // By the declared type, not by mail-parser's reading: it reads the last part of a
        // multipart that never closes as text (a JPEG went out quoted-printable), and a
        // multipart whose boundary never comes as one text part (which may not be encoded).
        // `message/*` other than an attached message (which mail-parser parses as one):
        // partial, external-body, delivery-status, which RFC 2046 5.2 allows no encoding.
        let ctype = part.content_type().map(|ct| ct.ctype());
        let container = ctype.is_some_and(|t| {
            t.eq_ignore_ascii_case("multipart") || t.eq_ignore_ascii_case("message")
        });
        if (container && !global_part) || !has_identity_encoding(part) {
            continue;
        }
        // A `message/global*` part is UTF-8 text: quoted-printable keeps it readable.
        let base64 = !global_part && ctype.is_some_and(|t| !t.eq_ignore_ascii_case("text"));
        let (start, body_start, end) = (
            part.offset_header as usize,
            part.offset_body as usize,
            part.offset_end as usize,
        );
        let (Some(header), Some(body)) = (raw.get(start..body_start), raw.get(body_start..end))
        else {
            continue;
        };
        if body.is_ascii() {
            continue;
        }
        let (name, encoded) = if base64 {
            ("base64", encode_base64(body))
        } else {
            ("quoted-printable", encode_quoted_printable(body))
        };
        let mut replacement = Vec::with_capacity(header.len() + encoded.len() + 48);
        rewrite_header(header, add_version && start == 0, name, &mut replacement);
        replacement.extend_from_slice(&encoded);
        let growth = replacement.len().saturating_sub(end - start);
        if growth > *room {
            return false;
        }
        *room -= growth;
        edits.push(Edit {
            start,
            end,
            replacement,
        });
    }
    true
}

/// `message/global`, `message/global-headers` or `message/global-delivery-status` (RFC
/// 6532 §3.7, RFC 6533 §6): UTF-8 header fields in a body part, which only quoted-printable
/// or base64 carries over a path without 8BITMIME and SMTPUTF8.
fn is_global(part: &MessagePart<'_>) -> bool {
    part.content_type().is_some_and(|ct| {
        ct.ctype().eq_ignore_ascii_case("message")
            && ct.subtype().is_some_and(|s| {
                ["global", "global-headers", "global-delivery-status"]
                    .iter()
                    .any(|g| s.eq_ignore_ascii_case(g))
            })
    })
}

/// A multipart's preamble and epilogue, which its reader ignores (RFC 2046 §5.1.1), with
/// every 8-bit byte written `?`: nothing can declare their encoding. Only under a boundary
/// that is ASCII, as RFC 2046 requires, so that the delimiter lines stay as they were.
fn blank_preamble_and_epilogue(
    message: &Message<'_>,
    part: &MessagePart<'_>,
    children: &[u32],
    raw: &[u8],
    edits: &mut Vec<Edit>,
) {
    let boundary_is_ascii = part
        .content_type()
        .and_then(|ct| ct.attribute("boundary"))
        .is_some_and(|b| b.is_ascii());
    let first = children
        .first()
        .and_then(|i| message.parts.get(*i as usize));
    let last = children.last().and_then(|i| message.parts.get(*i as usize));
    let (Some(first), Some(last), true) = (first, last, boundary_is_ascii) else {
        return;
    };
    for (from, to) in [
        (part.offset_body, first.offset_header),
        (last.offset_end, part.offset_end),
    ] {
        let (from, to) = (from as usize, to as usize);
        let Some(gap) = raw.get(from..to) else {
            continue;
        };
        let mut i = 0;
        while let Some(run) = gap[i..].iter().position(|b| *b >= 0x80) {
            let start = i + run;
            let len = gap[start..].iter().take_while(|b| **b >= 0x80).count();
            edits.push(Edit {
                start: from + start,
                end: from + start + len,
                replacement: vec![b'?'; len],
            });
            i = start + len;
        }
    }
}

/// The edit that turns a container's `8bit` or `binary` `Content-Transfer-Encoding` field
/// (with its continuation lines) into `7bit`.
fn relabel(part: &MessagePart<'_>, raw: &[u8], labels: &mut Vec<Edit>) {
    let eight_bit = part
        .content_transfer_encoding()
        .is_some_and(|cte| matches!(cte.trim().to_ascii_lowercase().as_str(), "8bit" | "binary"));
    let start = part.offset_header as usize;
    let Some(header) = raw
        .get(start..part.offset_body as usize)
        .filter(|_| eight_bit)
    else {
        return;
    };
    let mut at = 0;
    let mut field: Option<usize> = None;
    for line in header.split_inclusive(|b| *b == b'\n') {
        let continuation = line.first().is_some_and(|b| *b == b' ' || *b == b'\t');
        if !continuation {
            if let Some(from) = field.take() {
                labels.push(Edit {
                    start: start + from,
                    end: start + at,
                    replacement: b"Content-Transfer-Encoding: 7bit\r\n".to_vec(),
                });
            }
            if is_field(line, b"content-transfer-encoding") {
                field = Some(at);
            }
        }
        at += line.len();
    }
    if let Some(from) = field {
        labels.push(Edit {
            start: start + from,
            end: start + at,
            replacement: b"Content-Transfer-Encoding: 7bit\r\n".to_vec(),
        });
    }
}

/// No `Content-Transfer-Encoding`, or `7bit`, `8bit` or `binary` (RFC 2045 §6.1).
fn has_identity_encoding(part: &MessagePart<'_>) -> bool {
    match part.content_transfer_encoding() {
        None => true,
        Some(cte) => {
            let cte = cte.trim();
            ["7bit", "8bit", "binary"]
                .iter()
                .any(|identity| cte.eq_ignore_ascii_case(identity))
        }
    }
}

/// The header block without its `Content-Transfer-Encoding` field(s), then `MIME-Version`
/// if asked for and the new encoding, then the blank line that ends it.
fn rewrite_header(header: &[u8], add_version: bool, encoding: &str, out: &mut Vec<u8>) {
    let end = fields_end(header);
    let mut dropping = false;
    for line in header[..end].split_inclusive(|b| *b == b'\n') {
        let continuation = line.first().is_some_and(|b| *b == b' ' || *b == b'\t');
        if !continuation {
            dropping = is_field(line, b"content-transfer-encoding");
        }
        if !dropping {
            out.extend_from_slice(line);
        }
    }
    if add_version {
        out.extend_from_slice(MIME_VERSION);
    }
    out.extend_from_slice(b"Content-Transfer-Encoding: ");
    out.extend_from_slice(encoding.as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&header[end..]);
}

/// Whether the field line is named `name` (lower case).
fn is_field(line: &[u8], name: &[u8]) -> bool {
    line.split(|b| *b == b':')
        .next()
        .filter(|_| line.contains(&b':'))
        .is_some_and(|n| n.trim_ascii().eq_ignore_ascii_case(name))
}

/// Where the blank line that ends a header block starts (its length when there is none).
fn fields_end(header: &[u8]) -> usize {
    if header.ends_with(b"\r\n\r\n") {
        header.len() - 2
    } else if header.ends_with(b"\n\n") {
        header.len() - 1
    } else if header == b"\r\n" || header == b"\n" {
        0
    } else {
        header.len()
    }
}

/// Quoted-printable (the `quoted_printable` crate, line breaks kept as they are), where no
/// line that follows a soft line break starts with `-`: such a line could read as a
/// boundary delimiter of the enclosing multipart (`--boundary`), which the text it was cut
/// from, a line that did not start there, could not. The crate wraps at 74 characters, so
/// a `-` written `=2D` keeps the line within RFC 2045's 76.
fn encode_quoted_printable(body: &[u8]) -> Vec<u8> {
    let encoded = quoted_printable::encode_with_options(
        body,
        quoted_printable::Options::default().line_length_limit(74),
    );
    let mut out = Vec::with_capacity(encoded.len() + 16);
    let mut after_soft_break = false;
    for line in encoded.as_bytes().split_inclusive(|b| *b == b'\n') {
        match line.split_first() {
            Some((b'-', rest)) if after_soft_break => {
                out.extend_from_slice(b"=2D");
                out.extend_from_slice(rest);
            }
            _ => out.extend_from_slice(line),
        }
        after_soft_break = line.ends_with(b"=\r\n");
    }
    out
}

/// Base64 in lines of 76 characters, CRLF between them (RFC 2045 §6.8).
fn encode_base64(body: &[u8]) -> Vec<u8> {
    let encoded = base64::engine::general_purpose::STANDARD.encode(body);
    let mut out = Vec::with_capacity(encoded.len() + encoded.len() / 38 + 2);
    for (i, line) in encoded.as_bytes().chunks(76).enumerate() {
        if i > 0 {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Message<'_> {
        MessageParser::default().parse(raw).expect("parses")
    }

    /// Every part's decoded content, in order.
    fn contents(m: &Message<'_>) -> Vec<Vec<u8>> {
        m.parts
            .iter()
            .filter_map(|p| match &p.body {
                PartType::Text(t) | PartType::Html(t) => Some(t.as_bytes().to_vec()),
                PartType::Binary(b) | PartType::InlineBinary(b) => Some(b.to_vec()),
                PartType::Message(inner) => Some(contents(inner).concat()),
                PartType::Multipart(_) => None,
            })
            .collect()
    }

    const MIXED: &[u8] = b"Subject: x\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"B\"\r\n\r\npreamble\r\n\
--B\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\
h\xc3\xa9llo w\xc3\xb6rld\r\nsecond line\r\n\
--B\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n\
\x00\x01\xff\xfe\x80\r\n\
--B\r\nContent-Type: message/rfc822\r\n\r\n\
Subject: inner\r\nContent-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding:\r\n 8bit\r\n\r\ninn\xc3\xa9r\r\n\
--B\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\naGk=\r\n\
--B--\r\nepilogue\r\n";

    #[test]
    fn every_8bit_leaf_is_encoded_and_decodes_to_the_same_content() {
        let out = to_7bit(MIXED, true);
        assert!(out.is_ascii(), "{}", String::from_utf8_lossy(&out));
        assert_eq!(contents(&parse(&out)), contents(&parse(MIXED)));
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(text.contains("Content-Transfer-Encoding: quoted-printable\r\n\r\nh=C3=A9llo w=C3=B6rld\r\nsecond line\r\n--B\r\n"), "{text}");
        assert!(
            text.contains("Content-Transfer-Encoding: base64\r\n\r\nAAH//oA=\r\n--B"),
            "{text}"
        );
        // The attached message's folded field is replaced whole.
        assert!(text.contains("Subject: inner\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\ninn=C3=A9r\r\n"), "{text}");
        assert!(!text.contains(" 8bit"), "{text}");
        // Structure, preamble, epilogue and the ASCII base64 part as they were.
        assert!(text.starts_with("Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"B\"\r\n\r\npreamble\r\n--B\r\n"));
        assert!(
            text.ends_with(
                "Content-Transfer-Encoding: base64\r\n\r\naGk=\r\n--B--\r\nepilogue\r\n"
            )
        );
        assert_eq!(text.matches("MIME-Version").count(), 1);
    }

    #[test]
    fn preamble_epilogue_and_container_labels_leave_nothing_8bit() {
        let raw = b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\
Content-Transfer-Encoding: 8bit\r\n\r\nPr\xc3\xa4ambel\r\n\
--B\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\xc3\xa9\r\n\
--B\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding:\r\n binary\r\n\r\n\
Subject: inner\r\n\r\ninn\xc3\xa9r\r\n\
--B--\r\nEpilog \xe2\x80\x93 Ende\r\n";
        let out = to_7bit(raw, true);
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(text.is_ascii(), "{text}");
        assert_eq!(contents(&parse(&out)), contents(&parse(raw)));
        assert!(
            text.starts_with(
                "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\
Content-Transfer-Encoding: 7bit\r\n\r\nPr??ambel\r\n--B\r\n"
            ),
            "{text}"
        );
        assert!(text.contains("Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 7bit\r\n\r\nSubject: inner\r\nContent-Transfer-Encoding: quoted-printable\r\n"), "{text}");
        assert!(text.ends_with("--B--\r\nEpilog ??? Ende\r\n"), "{text}");
    }

    #[test]
    fn a_container_keeps_its_8bit_label_while_anything_8bit_is_left() {
        // An 8-bit header field (SMTPUTF8) stays, so the label stays true.
        let raw = b"MIME-Version: 1.0\r\nSubject: Gr\xc3\xbc\xc3\x9fe\r\n\
Content-Type: multipart/mixed; boundary=B\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\
--B\r\n\r\n\xc3\xa9\r\n--B--\r\n";
        let text = String::from_utf8(to_7bit(raw, true).to_vec()).unwrap();
        assert!(
            text.contains("Content-Transfer-Encoding: 8bit\r\n\r\n--B\r\n"),
            "{text}"
        );
        assert!(
            text.contains("Content-Transfer-Encoding: quoted-printable\r\n\r\n=C3=A9"),
            "{text}"
        );
    }

    /// An RFC 6533 report as the DSN builder writes it for SMTPUTF8 mail.
    const GLOBAL_REPORT: &[u8] = b"From: MAILER-DAEMON@relay.test\r\nTo: <app@sender.test>\r\n\
Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=global-delivery-status;\r\n\tboundary=\"R\"\r\n\r\n\
This is a MIME-encapsulated message.\r\n\r\n\
--R\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\
<j\xc3\xb6rg@dest.test>: failed: 550 5.1.1 unbekannt\r\n\r\n\
--R\r\nContent-Type: message/global-delivery-status\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\
Reporting-MTA: dns; relay.test\r\n\r\n\
Final-Recipient: utf-8; j\xc3\xb6rg@dest.test\r\nAction: failed\r\nStatus: 5.1.1\r\n\
Diagnostic-Code: smtp; 550 5.1.1 Empf\xc3\xa4nger unbekannt\r\n\r\n\
--R\r\nContent-Type: message/global\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\
From: app@sender.test\r\nTo: j\xc3\xb6rg@dest.test\r\nSubject: Gr\xc3\xbc\xc3\x9fe\r\n\
Message-ID: <m1@app>\r\n\r\nHallo J\xc3\xb6rg\r\n\r\n\
--R--\r\n";

    /// The bytes of the part of `raw` whose Content-Type is `ctype`, decoded.
    fn part_named(raw: &[u8], ctype: &str) -> (Option<String>, Vec<u8>) {
        let m = MessageParser::new().parse(raw).unwrap();
        let p = m
            .parts
            .iter()
            .find(|p| {
                p.content_type().is_some_and(|ct| {
                    format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or_default()) == ctype
                })
            })
            .unwrap_or_else(|| panic!("no {ctype}"));
        let cte = p.content_transfer_encoding().map(str::to_string);
        let header = &raw[p.offset_header as usize..p.offset_body as usize];
        let body = &raw[p.offset_body as usize..p.offset_end as usize];
        let decoded = match cte.as_deref() {
            Some("quoted-printable") => {
                quoted_printable::decode(body, quoted_printable::ParseMode::Strict).unwrap()
            }
            _ => body.to_vec(),
        };
        assert!(header.is_ascii(), "{}", String::from_utf8_lossy(header));
        (cte, decoded)
    }

    #[test]
    fn global_parts_are_encoded_for_a_peer_without_smtputf8() {
        let out = to_7bit(GLOBAL_REPORT, false);
        let text = String::from_utf8_lossy(&out);
        assert!(out.is_ascii(), "{text}");
        let original = |ctype| part_named(GLOBAL_REPORT, ctype).1;
        for ctype in ["message/global-delivery-status", "message/global"] {
            let (cte, decoded) = part_named(&out, ctype);
            assert_eq!(cte.as_deref(), Some("quoted-printable"), "{ctype}\n{text}");
            // Decoded, each is the part as it was, octet for octet.
            assert_eq!(
                String::from_utf8_lossy(&decoded),
                String::from_utf8_lossy(&original(ctype)),
                "{ctype}"
            );
        }
        assert!(!text.contains("8bit"), "{text}");
        // The report still reads as the report it was.
        let records = crate::bounce::parse(&out);
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(records[0].recipient, "j\u{f6}rg@dest.test");
        assert_eq!(records[0].status.as_deref(), Some("5.1.1"));
        // Headers only (message/global-headers), the same.
        let headers = String::from_utf8(GLOBAL_REPORT.to_vec())
            .unwrap()
            .replace("\r\nHallo J\u{f6}rg\r\n", "")
            .replace("message/global\r\n", "message/global-headers\r\n")
            .into_bytes();
        let out = to_7bit(&headers, false);
        assert!(out.is_ascii(), "{}", String::from_utf8_lossy(&out));
        let (cte, _) = part_named(&out, "message/global-headers");
        assert_eq!(cte.as_deref(), Some("quoted-printable"));
    }

    #[test]
    fn global_parts_stay_as_they_are_for_a_peer_with_smtputf8() {
        // Its UTF-8 header fields may go as they are (only the text inside message/global
        // is encoded, as in any attached message).
        let out = to_7bit(GLOBAL_REPORT, true);
        for ctype in ["message/global-delivery-status", "message/global"] {
            assert_eq!(
                part_named(&out, ctype).0.as_deref(),
                Some("8bit"),
                "{ctype}"
            );
        }
        let status = "message/global-delivery-status";
        assert_eq!(
            part_named(&out, status).1,
            part_named(GLOBAL_REPORT, status).1
        );
    }

    #[test]
    fn ascii_messages_and_unencodable_ones_are_sent_as_they_are() {
        let ascii = b"Subject: a\r\n\r\nplain\r\n";
        assert!(matches!(to_7bit(ascii, true), Cow::Borrowed(_)));
        // 8 bits only in a header field: nothing to encode.
        let header_only = b"Subject: caf\xc3\xa9\r\n\r\nplain\r\n";
        assert!(matches!(to_7bit(header_only, true), Cow::Borrowed(b) if b == header_only));
        // A part declared quoted-printable that holds raw 8-bit bytes: left alone.
        let broken =
            b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nx\xe9\r\n";
        assert!(matches!(to_7bit(broken, true), Cow::Borrowed(_)));
        // message/delivery-status may not be encoded (RFC 2046 5.2).
        let report = b"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=R\r\n\r\n\
--R\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; h\xc3\xa9\r\n--R--\r\n";
        assert!(matches!(to_7bit(report, true), Cow::Borrowed(_)));
    }

    #[test]
    fn a_message_without_mime_version_gets_one() {
        let plain = b"Subject: s\r\nFrom: a@b.example\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n";
        let out = to_7bit(plain, true);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "Subject: s\r\nFrom: a@b.example\r\nMIME-Version: 1.0\r\n\
             Content-Transfer-Encoding: quoted-printable\r\n\r\nGr=C3=BC=C3=9Fe\r\n"
        );
        // Multipart without the version field (mail-parser reads it anyway): inserted in
        // the top header, the part rewritten below it.
        let multipart =
            b"Content-Type: multipart/mixed; boundary=Q\r\n\r\n--Q\r\n\r\n\xc3\xa9\r\n--Q--\r\n";
        let out = to_7bit(multipart, true);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "Content-Type: multipart/mixed; boundary=Q\r\nMIME-Version: 1.0\r\n\r\n--Q\r\n\
             Content-Transfer-Encoding: quoted-printable\r\n\r\n=C3=A9\r\n--Q--\r\n"
        );
    }

    #[test]
    fn no_soft_broken_line_starts_like_a_boundary() {
        // A dash where the 74-character wrap puts it at the start of the next line
        // (mail-parser ends a part at its boundary even inside a line, so a real
        // boundary cannot be used to show this).
        let mut line = "é".to_string();
        line.push_str(&"x".repeat(67));
        line.push_str("--Z-");
        let raw = format!(
            "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n\
             Content-Transfer-Encoding: 8bit\r\n\r\n{line}\r\n--B--\r\n"
        );
        let out = to_7bit(raw.as_bytes(), true);
        let text = std::str::from_utf8(&out).unwrap();
        assert!(text.contains("x=\r\n=2D-Z-\r\n--B--"), "{text:?}");
        assert!(text.lines().all(|l| l.len() <= 76), "{text:?}");
        assert_eq!(contents(&parse(&out)), contents(&parse(raw.as_bytes())));
    }

    #[test]
    fn the_declared_type_decides_even_in_a_multipart_that_never_closes() {
        let unclosed = b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n\
--B\r\nContent-Type: image/jpeg\r\n\r\n\xff\xd8\xff\xe0 jpeg\r\n";
        let out = to_7bit(unclosed, true);
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(text.contains("Content-Transfer-Encoding: base64"), "{text}");
        // A boundary that never comes: the multipart's own header is not given an encoding.
        let never = b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=NEVER\r\n\r\n\xc3\xa9\r\n";
        assert!(matches!(to_7bit(never, true), Cow::Borrowed(_)));
    }

    #[test]
    fn a_message_that_would_grow_past_its_bound_goes_as_it_is() {
        // Thousands of one-byte 8-bit parts: each would take a header field of its own.
        let mut raw =
            String::from("MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n");
        for _ in 0..20_000 {
            raw.push_str("--B\r\n\r\n\u{e9}\r\n");
        }
        raw.push_str("--B--\r\n");
        let out = to_7bit(raw.as_bytes(), true);
        assert!(matches!(out, Cow::Borrowed(_)));
        // A text that is all 8-bit (three times its size as quoted-printable) is converted.
        let cyrillic = format!("MIME-Version: 1.0\r\n\r\n{}\r\n", "Привет ".repeat(20_000));
        let out = to_7bit(cyrillic.as_bytes(), true);
        assert!(out.is_ascii() && out.len() <= max_size(cyrillic.len()));
    }

    #[test]
    fn long_lines_and_trailing_spaces_survive_the_round_trip() {
        let body = format!("{}\u{e9}  \r\n\tend é\r\n", "a ".repeat(600));
        let raw =
            format!("MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}");
        let out = to_7bit(raw.as_bytes(), true);
        assert!(out.is_ascii());
        assert!(
            std::str::from_utf8(&out)
                .unwrap()
                .lines()
                .all(|l| l.len() <= 76)
        );
        assert_eq!(contents(&parse(&out)), vec![body.into_bytes()]);
    }
}
