//! A flat view of returned mail (its MIME parts walked by `bounce::mime` and decoded by
//! `mail-parser`): the bounce's own headers, its report parts, its human-readable text and
//! the returned original message; plus the record builders for delivery-status fields and
//! for bounce prose.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::sync::LazyLock;

#[cfg(test)]
use aho_corasick::{AhoCorasick, MatchKind};
use mail_parser::parsers::MessageStream;
use mail_parser::{GetHeader, HeaderName, MessageParser};
use regex::Regex;

use super::dsn::{self, DeliveryStatus};
use super::mime::{self, Decoded};
use super::text;
use super::{BounceKind, BounceRecord};
use crate::receipt::ReceiptId;

/// Most recipients read from one bounce's prose (keeps hostile input near-linear).
const MAX_PROSE_RECIPIENTS: usize = 1000;

/// At most this many addresses seen as sender, help desk or Message-Id are remembered as
/// no recipient further on ([`prose_segments`]).
const MAX_NOT_RECIPIENTS: usize = 64;

/// Longest diagnostic kept from bounce prose (DSN Diagnostic-Code fields are kept whole).
const MAX_PROSE_DIAGNOSTIC: usize = 1200;

pub(crate) struct View {
    pub subject: String,
    /// The bounce's From and To fields as written, parsed for [`View::from`],
    /// [`View::display_from`] and [`View::to`] when a reader first asks (not in the header
    /// walk, which would parse every part's and returned message's From and To too).
    from_to_raw: [Vec<u8>; 2],
    from_to: OnceCell<FromTo>,
    /// The top-level header fields in [`KEPT_HEADERS`] (names lowercased, values unfolded).
    pub headers: Vec<(String, String)>,
    pub report_type: Option<String>,
    /// Bodies of `message/delivery-status` and `message/global-delivery-status` parts.
    pub delivery_status: Vec<String>,
    /// Body of a `message/feedback-report` part.
    pub feedback_report: Option<String>,
    /// Human-readable text of the bounce (text parts outside the returned message).
    pub human: String,
    /// Header fields of the returned original message that the readers consult
    /// ([`RETURNED_FIELDS`]), when found.
    pub returned: Vec<(&'static str, String)>,
    /// Whether the returned message has a header block (with any fields).
    returned_has_headers: bool,
    /// The returned message as text (headers and body), when found.
    pub returned_raw: Option<String>,
    /// Length of the part of `human` before the returned message (the error section).
    error_len: usize,
}

impl View {
    /// The view of `raw`; `returned`: the returned message's headers when the caller cut
    /// them off `raw` (see [`without_returned_body`]).
    pub fn read(raw: &[u8], returned: Option<&[u8]>) -> Option<View> {
        Self::read_nested(raw, returned, true)
    }

    /// [`View::read`]; `recover`: whether a multipart part without a boundary is read again
    /// with the boundary its first delimiter line names ([`recovered_multipart`]), once.
    fn read_nested(raw: &[u8], returned: Option<&[u8]>, recover: bool) -> Option<View> {
        let reduced = with_read_headers_only(raw);
        let raw_read = reduced.as_deref().unwrap_or(raw);
        let parts = mime::parts(&PARSER, raw_read)?;
        let root = parts.first()?;
        // The first From and To fields' values (the header parser skips them).
        let raw_value = |name: HeaderName<'_>| {
            root.headers
                .iter()
                .find(|h| h.name == name)
                .and_then(|h| raw_read.get(h.offset_start as usize..h.offset_end as usize))
                .map(<[u8]>::to_vec)
                .unwrap_or_default()
        };
        let from_to_raw = [raw_value(HeaderName::From), raw_value(HeaderName::To)];
        let mut headers = Vec::new();
        for header in &root.headers {
            // Only the few headers the readers consult are kept.
            let name = header.name.as_str();
            if KEPT_HEADERS.iter().any(|k| name.eq_ignore_ascii_case(k))
                && let Some(value) = raw_read
                    .get(header.offset_start as usize..header.offset_end as usize)
                    .and_then(|v| std::str::from_utf8(v).ok())
            {
                headers.push((name.to_ascii_lowercase(), unfold(value)));
            }
        }
        let report_type = root
            .content_type()
            .and_then(|ct| ct.attribute("report-type"))
            .map(|s| s.to_ascii_lowercase());
        let subject = root
            .headers
            .header_value(&HeaderName::Subject)
            .and_then(|h| h.as_text())
            .unwrap_or("")
            .to_string();

        let mut view = View {
            subject,
            from_to_raw,
            from_to: OnceCell::new(),
            headers,
            report_type,
            delivery_status: Vec::new(),
            feedback_report: None,
            human: String::new(),
            returned: Vec::new(),
            returned_has_headers: false,
            returned_raw: None,
            error_len: 0,
        };

        // HTML is read only when no text part says anything: the parts known to be HTML
        // without decoding are decoded then.
        let mut html_parts: Vec<(&mime::Part<'_>, Option<Cow<'_, str>>)> = Vec::new();
        let mut returned_text: Option<String> = returned.map(lossy_utf8);
        let multipart = root.is_multipart();
        for (i, part) in parts.iter().enumerate() {
            if multipart && i == 0 {
                continue;
            }
            let (ctype, subtype) = part
                .content_type()
                .map(|ct| {
                    (
                        ascii_lowercase(ct.ctype()),
                        ascii_lowercase(ct.subtype().unwrap_or("")),
                    )
                })
                .unwrap_or((Cow::Borrowed("text"), Cow::Borrowed("plain")));
            // Binary bodies are read only for the `message/*` report types below, and a
            // multipart part without a boundary (which the walk leaves binary) to recover it.
            if ctype != "message" && part.is_binary(raw_read) {
                if recover
                    && ctype == "multipart"
                    && let Decoded::Binary(body) = part.decode(&PARSER, raw_read)
                    && let Some(inner) = recovered_multipart(&lossy_utf8(&body))
                {
                    if !view.human.is_empty() && !inner.human.is_empty() {
                        view.human.push('\n');
                    }
                    view.human.push_str(&inner.human);
                    view.delivery_status.extend(inner.delivery_status);
                    if view.feedback_report.is_none() {
                        view.feedback_report = inner.feedback_report;
                    }
                    if returned_text.is_none() {
                        returned_text = inner.returned_raw;
                    }
                }
                continue;
            }
            if part.is_html(raw_read) {
                html_parts.push((part, None));
                continue;
            }
            match part.decode_recovering(&PARSER, raw_read) {
                Decoded::Message(inner) => {
                    if returned_text.is_none() {
                        returned_text = Some(lossy_utf8(&inner));
                    }
                }
                Decoded::Multipart => {}
                Decoded::Html(t) => html_parts.push((part, Some(t))),
                Decoded::Text(t) => match (&*ctype, &*subtype) {
                    ("text", "rfc822-headers") | ("text", "rfc822-header") => {
                        if returned_text.is_none() {
                            returned_text = Some(t.into_owned());
                        }
                    }
                    ("message", "delivery-status") | ("message", "global-delivery-status") => {
                        view.delivery_status.push(t.into_owned());
                    }
                    _ => {
                        if !view.human.is_empty() {
                            view.human.push('\n');
                        }
                        view.human.push_str(&t);
                    }
                },
                Decoded::Binary(b) => {
                    let s = || lossy_utf8(&b);
                    match (&*ctype, &*subtype) {
                        ("message", "delivery-status")
                        | ("message", "global-delivery-status")
                        | ("text", "delivery-status") => view.delivery_status.push(s()),
                        ("message", "feedback-report") => view.feedback_report = Some(s()),
                        ("message", "rfc822-headers")
                        | ("message", "global-headers")
                        | ("message", "rfc822")
                        | ("message", "global")
                        | ("message", "partial")
                            if returned_text.is_none() =>
                        {
                            returned_text = Some(s());
                        }
                        _ => {}
                    }
                }
            }
        }
        if view.human.trim().is_empty() && !html_parts.is_empty() {
            let mut html = String::new();
            for (part, decoded) in html_parts {
                match decoded {
                    Some(t) => html.push_str(&t),
                    None => {
                        if let Decoded::Html(t) = part.decode_recovering(&PARSER, raw_read) {
                            html.push_str(&t);
                        }
                    }
                }
            }
            if !html.is_empty() {
                view.human = text::strip_html(&html);
            }
        }
        // Broken MIME (a boundary the parser could not follow): read the raw body as text.
        if view.human.trim().is_empty() && view.delivery_status.is_empty() {
            let body = memchr::memmem::find(raw, b"\r\n\r\n")
                .map(|i| i + 4)
                .or_else(|| memchr::memmem::find(raw, b"\n\n").map(|i| i + 2));
            if let Some(start) = body {
                view.human = lossy_utf8(raw.get(start..).unwrap_or_default());
            }
        }
        // Prose often carries the returned message inline after a marker line.
        let (error_section, inline) = text::split_returned(&view.human);
        view.error_len = error_section.len();
        if returned_text.is_none() {
            returned_text = inline.map(str::to_string);
        }
        if let Some(t) = returned_text {
            let (fields, any) = text::header_fields_where(&t, |name| {
                RETURNED_FIELDS
                    .iter()
                    .find(|k| name.eq_ignore_ascii_case(k))
                    .copied()
            });
            view.returned = fields;
            view.returned_has_headers = any;
            view.returned_raw = Some(t);
        }
        Some(view)
    }

    /// The bounce's From address, lowercased.
    pub fn from(&self) -> &str {
        &self.header_addresses().from
    }

    /// The bounce's From display name and address, lowercased.
    pub fn display_from(&self) -> &str {
        &self.header_addresses().display_from
    }

    /// The bounce's To address, lowercased.
    pub fn to(&self) -> &str {
        &self.header_addresses().to
    }

    fn header_addresses(&self) -> &FromTo {
        self.from_to.get_or_init(|| {
            let [from, to] = &self.from_to_raw;
            let (from_name, from) = first_mailbox(from);
            FromTo {
                display_from: format!("{from_name} {from}"),
                from,
                to: first_mailbox(to).1,
            }
        })
    }

    /// The human-readable text before the returned message.
    pub fn error_section(&self) -> &str {
        self.human.get(..self.error_len).unwrap_or(&self.human)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    pub fn returned_header(&self, name: &str) -> Option<&str> {
        self.returned
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    /// Correlation hints from the returned message.
    pub fn correlation(&self) -> Correlation {
        let receipt = self
            .returned_header("x-mailtrail-receipt")
            .and_then(|v| v.trim().trim_matches(['<', '>']).parse::<ReceiptId>().ok())
            .or_else(|| {
                self.returned
                    .iter()
                    .filter(|(n, _)| *n == "received")
                    .find_map(|(_, v)| receipt_in_received(v))
            });
        let message_id = self
            .returned_header("message-id")
            .map(|v| v.trim().to_string());
        let original_sender = self
            .returned_header("return-path")
            .and_then(first_address)
            .or_else(|| self.returned_header("from").and_then(first_address));
        let original_to = self.returned_header("to").and_then(first_address);
        Correlation {
            message_id,
            receipt,
            original_sender,
            original_to,
        }
    }

    /// Whether the bounce's own headers say it is a delivery failure notice, or it returns
    /// a message and its text says delivery failed. A person's automatic reply is none,
    /// whatever it quotes ([`View::is_personal_autoreply`]); a Subject alone needs
    /// corroboration ([`View::subject_corroborated`]).
    pub fn looks_like_bounce(&self) -> bool {
        if self.sent_by_mail_system() {
            return true;
        }
        if self.is_personal_autoreply() {
            return false;
        }
        (self.returned_has_headers && BOUNCE_TEXT.is_match(self.error_section()))
            || (BOUNCE_SUBJECT.is_match(&self.subject) && self.subject_corroborated())
    }

    /// Whether the From names a mail system (MAILER-DAEMON, postmaster, Mail Delivery ...).
    fn sent_by_mail_system(&self) -> bool {
        BOUNCE_FROM.is_match(self.display_from())
    }

    /// Whether the message is an automatic reply (its headers or a vacation Subject say so)
    /// from someone other than a mail system: what it quotes, a bounce included, is the
    /// mail it answers, not a failure. (Exim's and Microsoft's bounces say `Auto-Submitted:
    /// auto-replied` too, from MAILER-DAEMON or postmaster.)
    pub fn is_personal_autoreply(&self) -> bool {
        !self.sent_by_mail_system() && super::autoreply::says_auto_reply(self)
    }

    /// Whether a bounce-like Subject is borne out by the rest of the message. Mail from a
    /// list (List-Id, List-Unsubscribe: a newsletter about bounces) or a person's reply
    /// (`Re:`, In-Reply-To) is never taken on its Subject; otherwise the message must return
    /// a message, name its failed recipients (X-Failed-Recipients), or say in its error
    /// section that delivery failed, in words or as an SMTP reply with its enhanced status
    /// (`550 5.1.1`). In the corpus, mail systems' bounces with List-* or In-Reply-To fields
    /// all come from a MAILER-DAEMON-like From, which needs no corroboration.
    fn subject_corroborated(&self) -> bool {
        let bulk = self.header("precedence").is_some_and(|p| {
            ["bulk", "list", "junk"]
                .iter()
                .any(|b| p.trim().eq_ignore_ascii_case(b))
        });
        let list =
            bulk || self.header("list-id").is_some() || self.header("list-unsubscribe").is_some();
        let reply = self.header("in-reply-to").is_some() || REPLY_SUBJECT.is_match(&self.subject);
        if list || reply {
            return false;
        }
        // Failure wording alone is no evidence: a customer writes "delivery failed" about
        // an invoice, a carrier about a parcel.
        self.returned_has_headers
            || self.header("x-failed-recipients").is_some()
            || text::find_reply_status(self.error_section()).is_some()
    }
}

/// A part that says it is multipart but names no boundary (its `boundary=` parameter on an
/// unindented line, so not part of the field) comes out of the MIME walk as one body
/// holding the inner delimiters and part headers. Read as the multipart it is, with the boundary
/// its first delimiter line names (as mail readers infer it): a line of `--` and 1-70 more
/// characters (RFC 2046), no white space or quote, followed at once by a header field.
fn recovered_multipart(text: &str) -> Option<View> {
    let mut lines = text::lines(text).map(|l| l.trim_end_matches(['\r', '\n']));
    let boundary = loop {
        let line = lines.next()?;
        if let Some(b) = line.strip_prefix("--")
            && !b.is_empty()
            && b.len() <= 70
            && !b.ends_with("--")
            && !b
                .bytes()
                .any(|c| c.is_ascii_whitespace() || c == b'"' || c == b'\\')
        {
            break b;
        }
    };
    let next = lines.next()?;
    if !next
        .split_once(':')
        .is_some_and(|(name, _)| !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic()))
    {
        return None;
    }
    let mut wrapped = format!(
        "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n"
    )
    .into_bytes();
    wrapped.extend_from_slice(text.as_bytes());
    View::read_nested(&wrapped, None, false)
}

/// The bounce's From and To, read by `mail-parser`'s address parser.
struct FromTo {
    from: String,
    display_from: String,
    to: String,
}

/// The display name and address of the first mailbox in an address field's `value`, both
/// lowercased (empty when there is none).
fn first_mailbox(value: &[u8]) -> (String, String) {
    let parsed = MessageStream::new(value).parse_address();
    let first = parsed.as_address().and_then(|a| a.first());
    (
        first
            .and_then(|a| a.name())
            .unwrap_or("")
            .to_ascii_lowercase(),
        first
            .and_then(|a| a.address())
            .map(|s| s.trim().to_ascii_lowercase())
            .unwrap_or_default(),
    )
}

/// Correlation hints found in the returned message.
pub(crate) struct Correlation {
    message_id: Option<String>,
    receipt: Option<ReceiptId>,
    original_sender: Option<String>,
    original_to: Option<String>,
}

impl Correlation {
    pub fn apply(&self, r: &mut BounceRecord) {
        r.message_id = r.message_id.take().or_else(|| self.message_id.clone());
        r.receipt = r.receipt.or(self.receipt);
        r.original_sender = r
            .original_sender
            .take()
            .or_else(|| self.original_sender.clone());
        r.original_to = r.original_to.take().or_else(|| self.original_to.clone());
    }
}

/// A report whose returned message comes last, cut before that message: the bounce up to
/// the end of the `message/rfc822` part's own header block, and the returned message's
/// header block.
pub(crate) struct ShortReport<'a> {
    pub report: &'a [u8],
    pub returned_headers: &'a [u8],
}

/// `raw` cut before its `message/rfc822` part's content, when a delivery-status or
/// feedback-report part comes before that part; `None` otherwise.
pub(crate) fn without_returned_body(raw: &[u8]) -> Option<ShortReport<'_>> {
    // Every spelling holds one `/`, at a fixed place, and no two occurrences can overlap:
    // looking at each `/` finds them all, in order, as a search for the whole set would.
    let mut report_seen = false;
    let mut rfc822 = None;
    for slash in memchr::memchr_iter(b'/', raw) {
        // The byte after the `/` rules out most of them (paths, dates, base64).
        let (subtype_r, subtype_report) = match raw.get(slash + 1) {
            Some(b'r' | b'R') => (true, false),
            Some(b'd' | b'D' | b'g' | b'G' | b'f' | b'F') => (false, true),
            _ => continue,
        };
        let start = slash.saturating_sub(RFC822_SLASH);
        if subtype_r
            && slash >= RFC822_SLASH
            && RFC822
                .iter()
                .any(|t| raw.get(start..).is_some_and(|r| r.starts_with(t)))
        {
            // "message/rfc822": the returned message's part only in "Content-Type: message/rfc822"
            if is_content_type_value(raw, start) {
                rfc822 = Some(start + RFC822_LEN);
                break;
            }
            continue;
        }
        let rest = raw.get(slash..).unwrap_or_default();
        report_seen |= subtype_report && REPORT_TYPES.iter().any(|t| rest.starts_with(t));
    }
    short_report(raw, rfc822.filter(|_| report_seen)?)
}

/// `raw` cut at the end of the returned message's header block, whose part's `Content-Type`
/// value ends at `rfc822`.
fn short_report(raw: &[u8], rfc822: usize) -> Option<ShortReport<'_>> {
    let part_headers_end = blank_line_after(raw, rfc822)?;
    let returned_headers_end = blank_line_after(raw, part_headers_end)?;
    Some(ShortReport {
        report: raw.get(..part_headers_end)?,
        returned_headers: raw.get(part_headers_end..returned_headers_end)?,
    })
}

/// Top-level header fields the view reads; the others (Received chains, signatures) are
/// dropped before MIME parsing, which otherwise tokenises every one of them.
const READ_HEADERS: &[&str] = &[
    "content-type",
    "content-transfer-encoding",
    "mime-version",
    "subject",
    "from",
    "to",
];

/// `raw` with only the top-level header fields in [`READ_HEADERS`] and [`KEPT_HEADERS`]
/// (continuation lines kept with their field), the body unchanged; `None` when nothing
/// would be dropped or there is no header/body separator.
fn with_read_headers_only(raw: &[u8]) -> Option<Vec<u8>> {
    let body_start = blank_line_after(raw, 0).filter(|&end| end > 2)?;
    let headers = raw.get(..body_start)?;
    let mut out = Vec::with_capacity(raw.len());
    let mut keep = false;
    let mut dropped = false;
    let mut start = 0;
    while start < headers.len() {
        let end =
            memchr::memchr(b'\n', headers.get(start..)?).map_or(headers.len(), |i| start + i + 1);
        let line = headers.get(start..end)?;
        if !line.starts_with(b" ") && !line.starts_with(b"\t") {
            keep = memchr::memchr(b':', line).is_some_and(|colon| {
                let name = line.get(..colon).unwrap_or_default().trim_ascii();
                let is = |k: &&str| name.eq_ignore_ascii_case(k.as_bytes());
                READ_HEADERS.iter().any(is) || KEPT_HEADERS.iter().any(is)
            });
            // The blank line that ends the block is kept too.
            keep |= line.trim_ascii().is_empty();
        }
        if keep {
            out.extend_from_slice(line);
        } else {
            dropped = true;
        }
        start = end;
    }
    if !dropped {
        return None;
    }
    out.extend_from_slice(raw.get(body_start..)?);
    Some(out)
}

/// The offset just after the first empty line at or after `from`.
fn blank_line_after(raw: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    loop {
        let nl = memchr::memchr(b'\n', raw.get(i..)?)? + i;
        let rest = raw.get(nl + 1..)?;
        if rest.first() == Some(&b'\n') {
            return Some(nl + 2);
        }
        if rest.starts_with(b"\r\n") {
            return Some(nl + 3);
        }
        i = nl + 1;
    }
}

/// The returned message's media type as [`without_returned_body`] looks for it, in the
/// spellings mail uses (lower, capitalised, upper case; a rarer spelling only costs the
/// shortcut: the whole message is parsed), with where the `/` is and how long it is.
const RFC822: &[&[u8]] = &[
    b"message/rfc822",
    b"Message/rfc822",
    b"Message/RFC822",
    b"message/RFC822",
    b"MESSAGE/RFC822",
];
const RFC822_SLASH: usize = 7;
const RFC822_LEN: usize = 14;

/// The report types' subtypes, from their `/`, in the same spellings.
const REPORT_TYPES: &[&[u8]] = &[
    b"/delivery-status",
    b"/Delivery-Status",
    b"/Delivery-status",
    b"/DELIVERY-STATUS",
    b"/global-delivery-status",
    b"/Global-Delivery-Status",
    b"/GLOBAL-DELIVERY-STATUS",
    b"/feedback-report",
    b"/Feedback-Report",
    b"/FEEDBACK-REPORT",
];

/// The search [`without_returned_body`] replaced, kept as the tests' reference: one
/// automaton over all spellings (the first [`RFC822_SPELLINGS`] the returned message's).
#[cfg(test)]
static PART_TYPES: LazyLock<AhoCorasick> = LazyLock::new(|| {
    #[allow(clippy::expect_used)]
    AhoCorasick::builder()
        .match_kind(MatchKind::LeftmostFirst)
        .build([
            "message/rfc822",
            "Message/rfc822",
            "Message/RFC822",
            "message/RFC822",
            "MESSAGE/RFC822",
            "/delivery-status",
            "/Delivery-Status",
            "/Delivery-status",
            "/DELIVERY-STATUS",
            "/global-delivery-status",
            "/Global-Delivery-Status",
            "/GLOBAL-DELIVERY-STATUS",
            "/feedback-report",
            "/Feedback-Report",
            "/FEEDBACK-REPORT",
        ])
        .expect("static automaton")
});
#[cfg(test)]
const RFC822_SPELLINGS: usize = 5;

/// [`without_returned_body`] as it was, on the automaton: the tests' reference.
#[cfg(test)]
fn without_returned_body_reference(raw: &[u8]) -> Option<ShortReport<'_>> {
    let mut report_seen = false;
    let mut rfc822 = None;
    for m in PART_TYPES.find_iter(raw) {
        if m.pattern().as_usize() < RFC822_SPELLINGS {
            if is_content_type_value(raw, m.start()) {
                rfc822 = Some(m.end());
                break;
            }
            continue;
        }
        report_seen = true;
    }
    short_report(raw, rfc822.filter(|_| report_seen)?)
}

/// Whether the media type at `at` is the value of a `Content-Type:` field
/// (`content-type:[ \t]*` right before it, any case).
fn is_content_type_value(raw: &[u8], at: usize) -> bool {
    let before = raw.get(..at).unwrap_or_default();
    let name_end = before.len()
        - before
            .iter()
            .rev()
            .take_while(|&&b| b == b' ' || b == b'\t')
            .count();
    before
        .get(..name_end)
        .and_then(|b| b.get(b.len().checked_sub(13)?..))
        .is_some_and(|name| name.eq_ignore_ascii_case(b"content-type:"))
}

/// The returned message's header fields that [`View::returned_header`] and the correlation
/// hints read; the rest of its header block (signatures, most of it) is not copied.
const RETURNED_FIELDS: &[&str] = &[
    "x-mailtrail-receipt",
    "received",
    "message-id",
    "return-path",
    "from",
    "to",
    "x-hmxmroriginalrecipient",
];

/// The bounce's own headers that [`View::header`] can answer for.
const KEPT_HEADERS: &[&str] = &[
    "x-failed-recipients",
    "auto-submitted",
    "precedence",
    "x-autoreply",
    "x-autorespond",
    "x-autoresponder",
    "x-apple-unsubscribe",
    "x-mlserver",
    "list-id",
    "list-unsubscribe",
    "in-reply-to",
];

/// Parses only the headers the bounce reader uses (MIME structure, Subject, From, To);
/// every other field is read past without copying its value ([`View::read`] reads the
/// kept ones from the raw text), which spares tokenising each Received: field.
static PARSER: LazyLock<MessageParser> = LazyLock::new(mime::parser);

static RECEIVED_ID: LazyLock<Regex> = LazyLock::new(|| {
    #[allow(clippy::expect_used)]
    Regex::new(r"(?i)(?-u:\b)id <?([0-9a-z]{26})>?").expect("static regex")
});
static BOUNCE_FROM: LazyLock<Regex> = LazyLock::new(|| {
    #[allow(clippy::expect_used)]
    Regex::new(r"(?i)mailer-daemon|mailer_daemon|mailerdaemon|post_?master|mail delivery|maildelivery|mail-delivery|mail administrator|delivery subsystem|mdaemon|(?-u:\b)daemon@|(?-u:\b)bounces?@|(?-u:\b)bounce-|(?-u:\b)nobody@|(?-u:\b)postoffice@|(?-u:\b)smtp|(?-u:\b)mail ?system|mail_?relay|(?-u:\b)netmail|(?-u:\b)maildaemon|(?-u:\b)message delivery|(?-u:\b)mail ?gate|(?-u:\b)mailadmin|(?-u:\b)noreply-dmarc|notification|(?-u:\b)delivery(?-u:\b)")
        .expect("static regex")
});
static BOUNCE_SUBJECT: LazyLock<Regex> = LazyLock::new(|| {
    #[allow(clippy::expect_used)]
    Regex::new(r"(?i)undeliver|undelivered|delivery (?:status|failure|failed|has failed|problem|notification|report|error)|returned mail|returning message|failure notice|failed delivery|mail delivery|non[- ]?delivery|nondeliverable|could not be delivered|couldn't be delivered|not delivered|returned to sender|message (?:not delivered|delivery|failure|rejected|blocked|bounced)|rejected|mail system error|could not send|delayed mail|delivery delayed|warning: (?:could not|message)|bounce|error sending|mail error|unzustellbar|nicht zustellbar|non remis|non recapitabile|no entregado|permanent error|temporary error|mail failure|delivery incomplete|message you sent|failed to deliver|cannot deliver|unable to deliver|address verification|mailbox (?:full|unavailable)|error delivering|sender notification|returned message|mail could not|your message|delivery to the following|problem delivering|system notice|filtered|spam|エラー|不達|配信|送信できません|返送|未送達|退信|无法投递")
        .expect("static regex")
});

/// A reply's Subject prefix (`Re:`, German `AW:`, Scandinavian `SV:`, Dutch `Antw:`,
/// Polish `Odp:`, Finnish `VS:`), possibly numbered (`Re[2]:`).
static REPLY_SUBJECT: LazyLock<Regex> = LazyLock::new(|| {
    #[allow(clippy::expect_used)]
    Regex::new(r"(?i)^\s*(?:re|aw|sv|antw|odp|vs)\s*(?:\[\d+\])?\s*:").expect("static regex")
});

static BOUNCE_TEXT: LazyLock<Regex> = LazyLock::new(|| {
    #[allow(clippy::expect_used)]
    Regex::new(r"(?i)could not be delivered|couldn't be delivered|was not delivered|undeliverable|delivery (?:has )?failed|failed to deliver|unable to deliver|permanent (?:error|failure)|delivery to the following recipients? failed|did not reach the following recipient")
        .expect("static regex")
});

/// `s` lowercased, borrowed when it is already (a media type nearly always is).
fn ascii_lowercase(s: &str) -> Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(s.to_ascii_lowercase())
    } else {
        Cow::Borrowed(s)
    }
}

/// `String::from_utf8_lossy(bytes)` owned; valid UTF-8 (nearly all mail) is checked by the
/// word-at-a-time validator, much faster than the lossy decoder's byte loop.
fn lossy_utf8(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

fn receipt_in_received(value: &str) -> Option<ReceiptId> {
    RECEIVED_ID
        .captures_iter(value)
        .filter_map(|c| c.get(1))
        .find_map(|m| m.as_str().to_ascii_uppercase().parse::<ReceiptId>().ok())
}

fn first_address(value: &str) -> Option<String> {
    text::addresses(value).next().map(|(_, a)| a.to_string())
}

fn unfold(value: &str) -> String {
    value
        .split(['\r', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn non_empty(s: Option<&str>) -> Option<String> {
    s.map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

fn is_success_action(action: &str) -> bool {
    matches!(action, "delivered" | "relayed" | "expanded")
}

/// The enhanced status of a record: the Status field, or the one in the diagnostic when the
/// field is missing or only says "something failed" (x.0.0) while the diagnostic is precise.
fn pick_status(field: Option<&str>, diagnostic: &str) -> Option<String> {
    let from_field = field.and_then(text::find_enhanced_status);
    let from_diag =
        text::find_reply_status(diagnostic).or_else(|| text::find_enhanced_status(diagnostic));
    match (from_field, from_diag) {
        // The remote server's own code is more precise than the reporting MTA's summary.
        (Some(f), Some(d)) if d.get(..1) == f.get(..1) && !d.ends_with(".0.0") => Some(d),
        (Some(f), _) => Some(f),
        (None, d) => d,
    }
}

/// The comment after a Status field's code (`5.0.0 (permanent failure)`), when it says more
/// than the code's class does.
fn status_comment(field: &str) -> Option<String> {
    let (_, rest) = field.split_once('(')?;
    let comment = rest.rsplit_once(')').map_or(rest, |(c, _)| c).trim();
    let generic = [
        "permanent failure",
        "temporary failure",
        "success",
        "delayed",
    ];
    (!comment.is_empty() && !generic.iter().any(|g| comment.eq_ignore_ascii_case(g)))
        .then(|| collapse_clipped(comment, MAX_PROSE_DIAGNOSTIC))
}

/// The diagnostic of a DSN block without Diagnostic-Code, from the human-readable part, in
/// this order: the prose about its recipient; a comment in its Status field (`4.0.0
/// (example.net: host name lookup failure)`, the reporting MTA's word on this recipient,
/// which beats prose about another); the first prose about any recipient; when the text
/// names some address at all, the text before delivery-status fields inlined in it (a
/// transcript that names the address before aliasing). Prose that is those inlined fields themselves (the recipient named only in
/// `Final-Recipient:`) explains nothing and is passed over.
fn block_diagnostic_from_prose(
    prose: &[(String, String)],
    recipient: &str,
    status_field: Option<&str>,
    error_section: &str,
) -> Option<String> {
    let explaining = || prose.iter().filter(|(_, d)| !is_report_data(d));
    let before_fields = || {
        prose.first()?;
        let end = dsn_fields_after(error_section, 0, error_section.len());
        error_section
            .get(..end)
            .map(|t| collapse_clipped(t, MAX_PROSE_DIAGNOSTIC))
    };
    explaining()
        .find(|(a, _)| a.eq_ignore_ascii_case(recipient))
        .map(|(_, d)| d.clone())
        .or_else(|| status_field.and_then(status_comment))
        .or_else(|| explaining().next().map(|(_, d)| d.clone()))
        .or_else(before_fields)
        .filter(|d| !d.is_empty())
}

/// Records from delivery-status fields: MIME report parts first, else fields inlined in text.
pub(crate) fn dsn_records(view: &View) -> Vec<BounceRecord> {
    let mut parsed: Vec<DeliveryStatus> = view
        .delivery_status
        .iter()
        .map(|t| dsn::parse_delivery_status(t))
        .filter(|d| !d.recipients.is_empty())
        .collect();
    if parsed.is_empty() {
        let error_section = view.error_section();
        let lower = error_section.to_ascii_lowercase();
        // Fields inlined in a person's automatic reply are quoted from the mail it answers.
        if (lower.contains("final-recipient:") || lower.contains("original-recipient:"))
            && !view.is_personal_autoreply()
        {
            let d = dsn::parse_delivery_status(error_section);
            if !d.recipients.is_empty() {
                parsed.push(d);
            }
        }
    }
    let error_section = view.error_section();
    // The prose is read only when a recipient block lacks what it should say.
    let prose_cache = std::cell::OnceCell::new();
    let prose = || prose_cache.get_or_init(|| prose_segments(view, error_section));
    let command_in_prose = std::cell::OnceCell::new();

    let mut out = Vec::new();
    for ds in &parsed {
        let blocks: Vec<_> = ds
            .recipients
            .iter()
            .map(|b| {
                // A stray byte after the word (`failed\u{fffd}`) is no part of it.
                let action = b.get("action").map(|a| {
                    a.trim_matches(|c: char| !c.is_ascii_alphabetic())
                        .to_ascii_lowercase()
                });
                (b, action)
            })
            .collect();
        let all_success = blocks
            .iter()
            .all(|(_, a)| a.as_deref().is_some_and(is_success_action));
        for (block, action) in blocks {
            let status_field = block.get("status");
            let action = action.or_else(|| {
                status_field.map(|s| {
                    if s.starts_with('4') {
                        "delayed".to_string()
                    } else if s.starts_with('2') {
                        "delivered".to_string()
                    } else {
                        "failed".to_string()
                    }
                })
            });
            if !all_success && action.as_deref().is_some_and(is_success_action) {
                continue;
            }
            let recipient = block
                .get("final-recipient")
                .and_then(dsn::address_of)
                .or_else(|| block.get("x-actual-recipient").and_then(dsn::address_of))
                .or_else(|| block.get("original-recipient").and_then(dsn::address_of))
                .filter(|r| r.contains('@'))
                .or_else(|| prose().first().map(|(a, _)| a.clone()));
            let Some(recipient) = recipient else {
                continue;
            };
            let (diagnostic_type, diagnostic_code) =
                block.get("diagnostic-code").map_or((None, None), |d| {
                    let (t, text) = dsn::split_type(d);
                    (t, Some(text))
                });
            let mut diagnostic = diagnostic_code
                .filter(|d| !d.is_empty())
                .map(str::to_string);
            if diagnostic.is_none() {
                diagnostic =
                    block_diagnostic_from_prose(prose(), &recipient, status_field, error_section);
            }
            let diag = diagnostic.as_deref().unwrap_or("");
            let mut r = BounceRecord::new(recipient.clone(), BounceKind::Dsn);
            r.status = pick_status(status_field, diag);
            r.reply_code = text::find_reply_code(diag);
            // The prose is split only if some segment of it can name a command.
            r.smtp_command = text::find_command(diag).map(str::to_string).or_else(|| {
                if !*command_in_prose.get_or_init(|| text::may_name_command(error_section)) {
                    return None;
                }
                prose()
                    .iter()
                    .find(|(a, _)| a.eq_ignore_ascii_case(&recipient))
                    .and_then(|(_, d)| text::find_command(d))
                    .map(str::to_string)
            });
            r.action = action;
            r.diagnostic = diagnostic;
            r.diagnostic_type = diagnostic_type.map(str::to_ascii_lowercase);
            r.original_recipient = block.get("original-recipient").and_then(dsn::address_of);
            r.orcpt = non_empty(block.get("original-recipient"));
            r.remote_mta = block
                .get("remote-mta")
                .map(|v| dsn::strip_type(v).to_string());
            r.reporting_mta = ds
                .per_message
                .get("reporting-mta")
                .map(|v| dsn::strip_type(v).to_string());
            r.last_attempt = non_empty(block.get("last-attempt-date"));
            r.will_retry_until = non_empty(block.get("will-retry-until"));
            r.envid = non_empty(ds.per_message.get("original-envelope-id"));
            r.original_sender = ds
                .per_message
                .get("x-postfix-sender")
                .and_then(dsn::address_of);
            out.push(r);
        }
    }
    out
}

/// The failed addresses in bounce prose, each with the text that explains it.
fn prose_segments(view: &View, error_section: &str) -> Vec<(String, String)> {
    let returned_from = view.returned_header("from").and_then(first_address);
    let returned_path = view.returned_header("return-path").and_then(first_address);
    // `view.from()` and `view.to()` are lowercase: comparing ignoring ASCII case is comparing
    // the lowercased address.
    let excluded = |a: &str| {
        let local = a.split('@').next().unwrap_or("");
        a.eq_ignore_ascii_case(view.from())
            || a.eq_ignore_ascii_case(view.to())
            || [
                "mailer-daemon",
                "postmaster",
                "mailerdaemon",
                "mailer_daemon",
                "root",
            ]
            .iter()
            .any(|l| local.eq_ignore_ascii_case(l))
            || returned_from
                .as_deref()
                .is_some_and(|f| f.eq_ignore_ascii_case(a))
            || returned_path
                .as_deref()
                .is_some_and(|f| f.eq_ignore_ascii_case(a))
    };
    // Addresses in "MAIL FROM:<...>" or "envelope-from" are the sender, one after "contact"
    // is a help desk, one in "Message-Id:" is no address at all: none is a recipient.
    let sender_context = |pos: usize| {
        let near = |n: usize| {
            let mut start = pos.saturating_sub(n);
            while !error_section.is_char_boundary(start) {
                start -= 1;
            }
            error_section.as_bytes().get(start..pos).unwrap_or_default()
        };
        let s = near(16);
        let wide = near(48);
        [
            "from:",
            "from <",
            "sender",
            "from=",
            "message-id",
            "msgid",
            "uid:",
        ]
        .iter()
        .any(|w| contains_ignore_ascii_case(s, w))
            || ["contact", "please send", "questions"]
                .iter()
                .any(|w| contains_ignore_ascii_case(wide, w))
    };

    let mut found: Vec<(String, usize)> = Vec::new();
    // Where a found recipient is named again on a later line (a bounce that repeats its
    // list in a second language): the text about another recipient ends there too. At most
    // 4 × MAX_PROSE_RECIPIENTS are kept, so that hostile repetition stays linear.
    let mut mentions: Vec<(usize, usize)> = Vec::new();
    // An address once seen as the sender, a help desk or a Message-Id stays that further
    // on, where the words around it may say nothing (another language, a bare list).
    let mut not_recipients: Vec<&str> = Vec::new();
    let failed_header: Vec<String> = view
        .header("x-failed-recipients")
        .map(|v| text::addresses(v).map(|(_, a)| a.to_string()).collect())
        .unwrap_or_default();
    for (pos, addr) in text::addresses(error_section) {
        if found.len() >= MAX_PROSE_RECIPIENTS {
            break;
        }
        if excluded(addr) || not_recipients.iter().any(|a| a.eq_ignore_ascii_case(addr)) {
            continue;
        }
        if sender_context(pos) {
            // Bounded, so that a text of nothing but sender lines stays linear.
            if not_recipients.len() < MAX_NOT_RECIPIENTS {
                not_recipients.push(addr);
            }
            continue;
        }
        if !failed_header.is_empty() && !failed_header.iter().any(|f| f.eq_ignore_ascii_case(addr))
        {
            continue;
        }
        // Start the segment at the beginning of the line that names the address.
        let at = line_start(error_section, pos);
        if let Some(i) = found.iter().position(|(a, _)| a.eq_ignore_ascii_case(addr)) {
            if found.get(i).is_some_and(|(_, first)| *first != at)
                && mentions.len() < 4 * MAX_PROSE_RECIPIENTS
            {
                mentions.push((at, i));
            }
            continue;
        }
        found.push((addr.to_string(), at));
    }
    for f in &failed_header {
        if !found.iter().any(|(a, _)| a.eq_ignore_ascii_case(f)) {
            found.push((f.clone(), error_section.len()));
        }
    }

    let mut out = Vec::new();
    let n = found.len();
    let informative =
        |s: &str| text::find_reply_code(s).is_some() || text::find_enhanced_status(s).is_some();
    let section_informative = std::cell::OnceCell::new();
    for i in 0..n {
        let Some((addr, start)) = found.get(i) else {
            continue;
        };
        // The segment runs to the next address that starts on a later line.
        let end = found
            .iter()
            .skip(i + 1)
            .map(|(_, s)| *s)
            .find(|s| s > start)
            .unwrap_or(error_section.len());
        let end = mentions
            .iter()
            .filter(|(at, j)| *j != i && at > start)
            .map(|(at, _)| *at)
            .min()
            .map_or(end, |at| at.min(end));
        let end = dsn_fields_after(error_section, *start, end);
        let mut seg = error_section.get(*start..end).unwrap_or("");
        // A lone recipient whose own lines say little: the explanation may come before it.
        let says_little = || says_little(seg, addr);
        if (n == 1 && says_little())
            || (n == 1
                && !informative(seg)
                && *section_informative.get_or_init(|| informative(error_section)))
            || seg.trim().is_empty()
        {
            seg = error_section;
        }
        out.push((addr.clone(), collapse_clipped(seg, MAX_PROSE_DIAGNOSTIC)));
    }
    out
}

/// Where the line holding byte `pos` of `text` begins.
fn line_start(text: &str, pos: usize) -> usize {
    text.get(..pos)
        .and_then(|s| s.rfind('\n'))
        .map_or(0, |i| i + 1)
}

/// Whether a prose segment starts with a delivery-status field (`Final-Recipient: rfc822;
/// ...` inlined in the text): it is the report's data, not the explanation of its address.
fn is_report_data(segment: &str) -> bool {
    segment.split_once(':').is_some_and(|(name, _)| {
        let name = name.trim();
        name.len() <= 24 && dsn::is_dsn_field(&name.to_ascii_lowercase())
    })
}

/// Where delivery-status fields inlined in the text (`Reporting-MTA: dns; ...` after a
/// sendmail transcript) begin after the line at `start`, if before `end`: they are the
/// report's data, not the explanation of the address.
fn dsn_fields_after(text: &str, start: usize, end: usize) -> usize {
    const FIELDS: [&str; 8] = [
        "reporting-mta:",
        "received-from-mta:",
        "arrival-date:",
        "final-recipient:",
        "original-recipient:",
        "remote-mta:",
        "last-attempt-date:",
        "original-envelope-id:",
    ];
    let Some(region) = text.get(start..end) else {
        return end;
    };
    let mut at = 0;
    for line in region.split_inclusive('\n') {
        let trimmed = line.trim_start().as_bytes();
        if at > 0
            && FIELDS.iter().any(|f| {
                trimmed
                    .get(..f.len())
                    .is_some_and(|w| w.eq_ignore_ascii_case(f.as_bytes()))
            })
        {
            return start + at;
        }
        at += line.len();
    }
    end
}

/// Whether `seg` says less than 24 bytes besides `addr`: `seg.replace(addr, "").trim()` is
/// that short. Measured on the pieces between the copies of `addr` instead of a new string,
/// and decided as soon as the text left spans 24 bytes.
fn says_little(seg: &str, addr: &str) -> bool {
    const LITTLE: usize = 24;
    // Offsets in the text left: where its first non-space character starts, and where its
    // last one (so far) ends; `trim` keeps what lies between.
    let mut first = None;
    let mut last_end = 0;
    let mut at = 0;
    for piece in seg.split(addr) {
        let from_first = piece.trim_start();
        if !from_first.is_empty() {
            first.get_or_insert(at + piece.len() - from_first.len());
            last_end = at + piece.trim_end().len();
        }
        if first.is_some_and(|f| last_end - f >= LITTLE) {
            return false;
        }
        at += piece.len();
    }
    first.is_none_or(|f| last_end - f < LITTLE)
}

/// Whether `haystack` holds `needle` (lowercase) in any ASCII case.
fn contains_ignore_ascii_case(haystack: &[u8], needle: &str) -> bool {
    let needle = needle.as_bytes();
    let Some(&first) = needle.first() else {
        return true;
    };
    // Candidates where the first byte matches, found with the SIMD search for its cases.
    let last_start = haystack.len().saturating_sub(needle.len() - 1);
    let starts = haystack.get(..last_start).unwrap_or_default();
    let (lower, upper) = (first.to_ascii_lowercase(), first.to_ascii_uppercase());
    memchr::memchr2_iter(lower, upper, starts).any(|i| {
        haystack
            .get(i..i + needle.len())
            .is_some_and(|w| w.eq_ignore_ascii_case(needle))
    })
}

/// `clip(&collapse(s), max)`, without collapsing the part of `s` the clip would drop.
/// Words are found a byte at a time at ASCII white space ([`ascii_pieces`]); only a piece
/// holding other characters is decoded, to split it at Unicode white space too, where
/// `split_whitespace` decodes every character.
fn collapse_clipped(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max + 64));
    let mut push = |word: &str| {
        if out.len() >= max {
            return false;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
        true
    };
    for piece in ascii_pieces(s) {
        let more = if piece.is_ascii() {
            push(piece)
        } else {
            piece.split_whitespace().all(&mut push)
        };
        if !more {
            break;
        }
    }
    if out.len() <= max {
        return out;
    }
    clip(&out, max)
}

/// The non-empty runs of `s` between ASCII white space (`char::is_whitespace` of ASCII).
fn ascii_pieces(s: &str) -> impl Iterator<Item = &str> {
    let bytes = s.as_bytes();
    let white = |i: usize| bytes.get(i).map(|&b| text::is_white_space_byte(b));
    let mut i = 0;
    std::iter::from_fn(move || {
        while white(i) == Some(true) {
            i += 1;
        }
        let start = i;
        while white(i) == Some(false) {
            i += 1;
        }
        // Cut at ASCII bytes only: always at character boundaries.
        s.get(start..i).filter(|p| !p.is_empty())
    })
}

/// `s` with every whitespace run made one space, trimmed.
#[cfg(test)]
fn collapse(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for word in s.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or("").to_string()
}

static DELAYED: LazyLock<Regex> = LazyLock::new(|| {
    #[allow(clippy::expect_used)]
    Regex::new(r"(?i)delivery (?:delayed|has been delayed)|delayed mail|will (?:keep|continue) (?:trying|to try)|still trying|will be retried|not yet been delivered|warning: message")
        .expect("static regex")
});

/// Records from the prose of a non-standard bounce.
pub(crate) fn text_records(view: &View) -> Vec<BounceRecord> {
    // A failure notice by its headers is never a person's automatic reply; one that only
    // names failed recipients may be (it quotes a bounce).
    if !view.looks_like_bounce()
        && (view.header("x-failed-recipients").is_none() || view.is_personal_autoreply())
    {
        return Vec::new();
    }
    let error_section = view.error_section();
    let mut segments = prose_segments(view, error_section);
    if segments.is_empty() {
        // No address in the prose: the returned message says whom it was for.
        if let Some(to) = view.returned_header("to").and_then(first_address) {
            let seg = collapse_clipped(error_section, MAX_PROSE_DIAGNOSTIC);
            if !seg.is_empty() {
                segments.push((to, seg));
            }
        }
    }
    let delayed = DELAYED.is_match(&view.subject) || DELAYED.is_match(error_section);
    segments
        .into_iter()
        .map(|(recipient, diagnostic)| prose_record(recipient, diagnostic, delayed))
        .collect()
}

/// A record read from bounce prose: `diagnostic` is the text about `recipient`.
fn prose_record(recipient: String, diagnostic: String, delayed: bool) -> BounceRecord {
    let mut r = BounceRecord::new(recipient, BounceKind::Heuristic);
    // A success code in a session transcript (`<<< 250 2.1.0 Sender ok`) is no failure's.
    r.status = text::find_reply_status(&diagnostic)
        .or_else(|| text::find_enhanced_status(&diagnostic))
        .filter(|s| !s.starts_with('2'));
    r.reply_code = text::find_reply_code(&diagnostic);
    r.smtp_command = text::find_command(&diagnostic).map(str::to_string);
    r.action = Some(if delayed { "delayed" } else { "failed" }.to_string());
    r.diagnostic = Some(diagnostic);
    r
}

/// The record of a failure notice that names no recipient the readers find, about the
/// `recipient` the caller knows it is for (the copy its VERP address names): its error
/// section is the diagnostic. None for mail that is no failure notice.
pub(crate) fn notice_about(view: &View, recipient: &str) -> Option<BounceRecord> {
    if !view.looks_like_bounce() && view.header("x-failed-recipients").is_none() {
        return None;
    }
    let error_section = view.error_section();
    let diagnostic = collapse_clipped(error_section, MAX_PROSE_DIAGNOSTIC);
    if diagnostic.is_empty() {
        return None;
    }
    let delayed = DELAYED.is_match(&view.subject) || DELAYED.is_match(error_section);
    Some(prose_record(recipient.to_string(), diagnostic, delayed))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Looking at each `/` cuts a report where the automaton over all spellings did.
    #[test]
    fn returned_body_cut_as_by_the_automaton() {
        let pieces = [
            "message/rfc822",
            "Message/RFC822",
            "MESSAGE/rfc822",
            "message/rfc822message/rfc822",
            "/delivery-status",
            "/Global-Delivery-Status",
            "/FEEDBACK-REPORT",
            "/feedback",
            "Content-Type: ",
            "content-type:\t",
            "Content-Type:",
            "/",
            "//",
            "x",
            "e",
            "\r\n",
            "\n",
            "\r\n\r\n",
            "\n\n",
            " ",
            "Content-Type: message/rfc822\r\n\r\n",
            "Content-Type: message/delivery-status\n",
            "a: b\r\n\r\n",
        ];
        let mut rng = crate::test_support::TestRng::new(0x0522_0522_0522_0003);
        let mut cut = 0;
        for _ in 0..50_000 {
            let t = rng.text(14, &pieces);
            let new = without_returned_body(t.as_bytes()).map(|s| (s.report, s.returned_headers));
            let old = without_returned_body_reference(t.as_bytes())
                .map(|s| (s.report, s.returned_headers));
            assert_eq!(new, old, "{t:?}");
            cut += usize::from(new.is_some());
        }
        assert!(cut > 1000, "{cut}");
    }

    /// Measuring the pieces between the address's copies says what `replace` and `trim` say.
    #[test]
    fn says_little_is_its_definition() {
        let pieces = [
            "a@b.example",
            "a@b",
            " ",
            "\n",
            "\u{3000}",
            "\x0b",
            "é",
            "x",
            "user unknown",
            "@",
        ];
        let mut rng = crate::test_support::TestRng::new(0x5a75_1177_1e00_0001);
        for _ in 0..20_000 {
            let seg = rng.text(12, &pieces);
            for addr in ["a@b.example", "a@b", "@"] {
                let defined = seg.replace(addr, "").trim().len() < 24;
                assert_eq!(says_little(&seg, addr), defined, "{seg:?} {addr:?}");
            }
        }
    }

    /// Collapsing only what the clip keeps gives what collapsing all and clipping gave.
    #[test]
    fn collapse_clipped_is_clip_of_collapse() {
        let alphabet =
            crate::test_support::test_chars("ab \t\n\r\x0b\x0c\x1f\u{85}\u{a0}\u{2028}\u{3000}é語");
        let mut rng = crate::test_support::TestRng::new(0x0bad_cafe_f00d_1234);
        for _ in 0..20_000 {
            let t = rng.text(31, &alphabet);
            let max = rng.below(12);
            assert_eq!(
                collapse_clipped(&t, max),
                clip(&collapse(&t), max),
                "{t:?} {max}"
            );
        }
        assert!(contains_ignore_ascii_case(b"Mail FROM:<", "from:"));
        assert!(!contains_ignore_ascii_case(b"fro", "from:"));
        // As comparing every window.
        let pieces = [
            "from", "FROM", "fRo", ":", "m", " ", "x", "é", "sender", "Sender",
        ];
        for _ in 0..20_000 {
            let t = rng.text(6, &pieces);
            for needle in ["from:", "sender", "m", "from <"] {
                let windows = t
                    .as_bytes()
                    .windows(needle.len())
                    .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()));
                assert_eq!(
                    contains_ignore_ascii_case(t.as_bytes(), needle),
                    windows,
                    "{t:?} {needle:?}"
                );
            }
        }
    }

    #[test]
    fn only_the_read_header_fields_reach_the_mime_parser() {
        let raw = b"Received: from a\r\n\tby b; Mon, 1 Jan 2024\r\nSubject: Undelivered\r\n \
Mail\r\nDKIM-Signature: v=1;\r\n b=xyz\r\nFrom: MAILER-DAEMON@x.example\r\nX-Failed-Recipients: \
a@y.example\r\nContent-Type: multipart/report;\r\n\tboundary=\"b\"\r\n\r\n--b\r\nReceived: kept \
in the body\r\n";
        let reduced = with_read_headers_only(raw).expect("something to drop");
        let text = String::from_utf8(reduced).unwrap();
        assert_eq!(
            text,
            "Subject: Undelivered\r\n Mail\r\nFrom: MAILER-DAEMON@x.example\r\nX-Failed-Recipients: \
a@y.example\r\nContent-Type: multipart/report;\r\n\tboundary=\"b\"\r\n\r\n--b\r\nReceived: kept \
in the body\r\n"
        );
        // Nothing to drop, or no body: parsed as it is.
        assert!(with_read_headers_only(b"Subject: x\nFrom: a@b.example\n\nbody\n").is_none());
        assert!(with_read_headers_only(b"Received: x\r\nSubject: y\r\n").is_none());
        assert!(with_read_headers_only(b"\r\n\r\nbody").is_none());
        // The view reads the same either way.
        let full = View::read(raw, None).unwrap();
        assert_eq!(full.subject, "Undelivered Mail");
        assert_eq!(full.header("x-failed-recipients"), Some("a@y.example"));
        assert_eq!(full.report_type, None);
    }
}
