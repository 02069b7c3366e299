//! Delivery status notifications (RFC 3461 / RFC 3464) to the original sender.
//!
//! Pure: [`wanted`] says whether a recipient's outcome calls for a DSN under its NOTIFY, and
//! [`build`] writes the `multipart/report; report-type=delivery-status` message as an
//! [`AcceptedMessage`] with the null envelope sender, for the store to queue in the same
//! commit as the attempts that caused it.
//!
//! Internationalised mail (RFC 6533, as Postfix does it): when the original came with
//! SMTPUTF8 or an address to report is not ASCII, the report is
//! `report-type=global-delivery-status`: a `message/global-delivery-status` part whose
//! non-ASCII addresses have the `utf-8` address type and are written as they are, the
//! original returned as `message/global` (or `message/global-headers`), and the notice in
//! UTF-8. Otherwise everything stays ASCII.
//!
//! What is returned (RFC 3461 §4.3 leaves the default to the MTA; this follows Postfix):
//! failure DSNs carry the full message (`message/rfc822`) unless `RET=HDRS`, or when it is
//! larger than [`FULL_RETURN_LIMIT`], in which case only its header (`text/rfc822-headers`);
//! delay and success DSNs always carry the header only, since RET speaks of failed mail.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

use crate::receipt::ReceiptId;
use crate::spool::{AcceptedMessage, AcceptedRecipient, DsnRet, Notify};
use crate::store::{DsnNotice, QueuedMessage, ReportedRecipient};

/// Largest original message returned in full (Postfix `bounce_size_limit`).
pub const FULL_RETURN_LIMIT: usize = 50_000;

/// RFC 3464 §2.3.3 action of one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Failed,
    Delayed,
    Delivered,
    /// Delivered to a next hop that does not offer DSN, so no further notice will come.
    Relayed,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
            Action::Delivered => "delivered",
            Action::Relayed => "relayed",
        }
    }
}

/// Whether this recipient's outcome calls for a DSN. NOTIFY absent means FAILURE only (RFC
/// 3461 §4.1 lets an MTA add DELAY; delay notices here need an explicit NOTIFY=DELAY).
pub fn wanted(notify: Option<Notify>, action: Action) -> bool {
    let n = notify.unwrap_or(Notify {
        failure: true,
        ..Default::default()
    });
    if n.never {
        return false;
    }
    match action {
        Action::Failed => n.failure,
        Action::Delayed => n.delay,
        Action::Delivered | Action::Relayed => n.success,
    }
}

/// One recipient's part of a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportRecipient {
    /// Position in the original message: the store records the DSN on that recipient.
    pub index: u32,
    pub address: String,
    /// Decoded ORCPT (`rfc822;addr`).
    pub orcpt: Option<String>,
    pub action: Action,
    /// RFC 3463 status, e.g. `5.1.1`.
    pub status: String,
    pub remote_mta: Option<String>,
    /// The remote reply (`550 5.1.1 text`) or local description, without the `smtp;` type.
    pub diagnostic: Option<String>,
    /// Whether `diagnostic` is a remote SMTP reply (`smtp;`) or a local text (`x-local;`).
    pub diagnostic_is_smtp: bool,
    pub last_attempt_ms: i64,
    /// For delayed recipients: when retrying stops.
    pub will_retry_until_ms: Option<i64>,
    /// Failed because retrying ran out (`max_queue_lifetime`), not by a refusal: the status is
    /// `4.4.7` (RFC 3463: delivery time expired) and the notice says so.
    pub expired: bool,
}

impl ReportRecipient {
    /// The action as the recipient's log records it: `expired` for a failure by running
    /// out of queue lifetime.
    pub fn recorded_action(&self) -> &'static str {
        if self.expired {
            "expired"
        } else {
            self.action.as_str()
        }
    }
}

/// `dsn` (built by [`build`] for `recipients` of `original`) with the recipients it reports,
/// for the store to record it on each.
pub fn notice(
    original: ReceiptId,
    dsn: AcceptedMessage,
    recipients: &[ReportRecipient],
) -> DsnNotice {
    DsnNotice {
        dsn,
        original,
        reported: recipients
            .iter()
            .map(|r| ReportedRecipient {
                rcpt_index: r.index,
                action: r.recorded_action(),
            })
            .collect(),
    }
}

/// The status to report: the reply's enhanced code, else one derived from the reply class.
pub fn status_for(code: Option<u16>, enhanced: Option<&str>, action: Action) -> String {
    if let Some(e) = enhanced {
        return e.to_string();
    }
    let class = match code {
        Some(c) if (200..300).contains(&c) => 2,
        Some(c) if (500..600).contains(&c) => 5,
        Some(_) => 4,
        None => match action {
            Action::Delivered | Action::Relayed => 2,
            Action::Delayed => 4,
            Action::Failed => 5,
        },
    };
    format!("{class}.0.0")
}

/// What the report is about (one DSN message carries one kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReportKind {
    Failure,
    Delay,
    Success,
}

impl ReportKind {
    pub fn of(action: Action) -> Self {
        match action {
            Action::Failed => ReportKind::Failure,
            Action::Delayed => ReportKind::Delay,
            Action::Delivered | Action::Relayed => ReportKind::Success,
        }
    }
}

fn rfc5322_date(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc2822()
}

/// Printable ASCII only, so remote text cannot break the report's structure.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// An address for an internationalised report (RFC 6532 allows UTF-8 in its fields): printable
/// ASCII and non-ASCII characters other than controls (C1, line and paragraph separators).
fn clean_utf8(s: &str) -> String {
    s.chars()
        .map(|c| {
            let printable = c == ' '
                || c.is_ascii_graphic()
                || (!c.is_ascii() && !c.is_control() && !matches!(c, '\u{2028}' | '\u{2029}'));
            if printable { c } else { '?' }
        })
        .collect()
}

/// A recipient field's address type and address (RFC 3464 §2.3.1-2, RFC 6533 §3): the
/// `utf-8` type and the address as it is (the `utf-8-address` form) when it is not ASCII,
/// which only happens in an internationalised report.
fn address_field(kind: &str, address: &str) -> (String, String) {
    if address.is_ascii() {
        (clean(kind), clean(address))
    } else {
        ("utf-8".to_string(), clean_utf8(address))
    }
}

/// Multi-line remote texts folded into one header field: continuation lines start with a
/// space (RFC 5322 §2.2.3), lines of only white space are left out (obsolete syntax, §4.2),
/// and a line longer than 900 characters is cut into pieces (no line may pass 998, §2.1.1):
/// before a space where there is one, which then is the fold's white space, so unfolding
/// gives the text back as it was; else (a 3,000-character token) anywhere.
///
/// In an internationalised report (`global`, RFC 6533) non-ASCII characters stay, as in
/// its addresses; elsewhere they become `?` (a server's UTF-8 reply text was `?` in both).
fn folded(s: &str, global: bool) -> String {
    const MAX_LINE: usize = 900;
    let mut out = String::new();
    for line in s.lines() {
        let line = line.trim_end_matches('\r');
        let line = if global {
            clean_utf8(line)
        } else {
            clean(line)
        };
        let mut rest = line.trim_end();
        if rest.trim_start().is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push_str("\r\n ");
        }
        while rest.len() > MAX_LINE {
            // At most MAX_LINE octets, ending on a character boundary.
            let end = super::client::cut(rest.as_bytes(), MAX_LINE);
            // A cut before a space keeps the space at the start of the next line.
            let space = rest[..end]
                .char_indices()
                .skip(1)
                .filter(|&(_, c)| c == ' ')
                .last()
                .map(|(i, _)| i);
            match space {
                Some(at) => {
                    out.push_str(&rest[..at]);
                    out.push_str("\r\n");
                    rest = &rest[at..];
                }
                None => {
                    out.push_str(&rest[..end]);
                    out.push_str("\r\n ");
                    rest = &rest[end..];
                }
            }
        }
        out.push_str(rest);
    }
    out
}

fn header_section(body: &[u8]) -> &[u8] {
    body.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .and_then(|p| body.get(..p + 2))
        .unwrap_or(body)
}

/// The failure DSN for the recipients of `msg` whose outcome was decided as it was accepted
/// (suppressed, a domain that accepts no mail): the client heard `250` for them, so, as for
/// any failure after acceptance (RFC 5321 6.1), the sender is told unless its NOTIFY says
/// otherwise. `None` when no such recipient wants one, or for the null sender.
pub fn for_decided_at_accept(reporting_mta: &str, msg: &AcceptedMessage) -> Option<DsnNotice> {
    if msg.inbound_bounce || msg.envelope_sender.is_empty() {
        return None;
    }
    let recipients: Vec<ReportRecipient> = msg
        .recipients
        .iter()
        .zip(0u32..)
        .filter_map(|(r, index)| {
            let preset = r.preset.as_ref()?;
            (preset.accepted && wanted(r.notify, Action::Failed)).then(|| ReportRecipient {
                index,
                address: r.address.clone(),
                orcpt: r.orcpt.clone(),
                action: Action::Failed,
                status: status_for(None, preset.enhanced_status.as_deref(), Action::Failed),
                remote_mta: None,
                diagnostic: Some(preset.text.clone()),
                diagnostic_is_smtp: false,
                last_attempt_ms: msg.received_at_ms,
                will_retry_until_ms: None,
                expired: false,
            })
        })
        .collect();
    let original = QueuedMessage {
        receipt: msg.receipt,
        received_at_ms: msg.received_at_ms,
        envelope_sender: msg.envelope_sender.clone(),
        auth_user: msg.auth_user.clone(),
        envid: msg.envid.clone(),
        ret: msg.ret,
        eight_bit: msg.eight_bit,
        smtputf8: msg.smtputf8,
        size: msg.body.len() as u64,
        message_id: msg.message_id.clone(),
        subject: msg.subject.clone(),
        recipients: Vec::new(),
    };
    let dsn = build(
        reporting_mta,
        &original,
        &msg.body,
        &recipients,
        msg.received_at_ms,
    )?;
    Some(notice(msg.receipt, dsn, &recipients))
}

/// Builds the DSN for `recipients` (all of one [`ReportKind`]) of `original`, or `None` when
/// the original has the null sender (a DSN is never sent about a DSN) or nothing to report.
pub fn build(
    reporting_mta: &str,
    original: &QueuedMessage,
    original_body: &[u8],
    recipients: &[ReportRecipient],
    now_ms: i64,
) -> Option<AcceptedMessage> {
    if original.envelope_sender.is_empty() || recipients.is_empty() {
        return None;
    }
    let kind = ReportKind::of(recipients[0].action);
    let global = original.smtputf8
        || !original.envelope_sender.is_ascii()
        || recipients
            .iter()
            .any(|r| !r.address.is_ascii() || r.orcpt.as_deref().is_some_and(|o| !o.is_ascii()));
    let address = |a: &str| if global { clean_utf8(a) } else { clean(a) };
    let receipt = ReceiptId::new();
    let host = clean(reporting_mta);
    let boundary = format!("{receipt}/{host}");
    let full = kind == ReportKind::Failure
        && original.ret != Some(DsnRet::Hdrs)
        && original_body.len() <= FULL_RETURN_LIMIT;
    // Lines of the notice stay under 78 characters (RFC 5322 2.1.1). A failure notice says
    // what is attached: the message, or only its header.
    let (subject, intro) = match kind {
        ReportKind::Failure => (
            "Undelivered Mail Returned to Sender",
            if full {
                "Your message could not be delivered to one or more recipients.\r\n\
                 It is attached below."
            } else if original.ret == Some(DsnRet::Hdrs) {
                "Your message could not be delivered to one or more recipients.\r\n\
                 Its header is attached below (the sender asked for the header only)."
            } else {
                "Your message could not be delivered to one or more recipients.\r\n\
                 Its header is attached below (the message is too large to return\r\n\
                 in full)."
            },
        ),
        ReportKind::Delay => (
            "Delayed Mail (still being retried)",
            "Your message could not be delivered yet to one or more recipients.\r\n\
             Delivery will be retried; you do not need to resend it.",
        ),
        ReportKind::Success => (
            "Successful Mail Delivery Report",
            "Your message was successfully delivered to the recipients listed below.",
        ),
    };
    let message_id = format!("{receipt}@{host}");

    let returned: &[u8] = if full {
        original_body
    } else {
        header_section(original_body)
    };

    // The report's type, and the content headers of its notice and its status part.
    let (report_type, notice, status) = if global {
        (
            "global-delivery-status",
            "text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit",
            "message/global-delivery-status\r\nContent-Transfer-Encoding: 8bit",
        )
    } else {
        (
            "delivery-status",
            "text/plain; charset=us-ascii",
            "message/delivery-status",
        )
    };

    let mut m = String::new();
    let _ = write!(
        m,
        "From: Mail Delivery System <MAILER-DAEMON@{host}>\r\n\
         To: <{to}>\r\n\
         Subject: {subject}\r\n\
         Date: {date}\r\n\
         Message-ID: <{message_id}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type={report_type};\r\n\
         \tboundary=\"{boundary}\"\r\n\
         \r\n\
         This is a MIME-encapsulated message.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Description: Notification\r\n\
         Content-Type: {notice}\r\n\
         \r\n\
         This is the mail system at host {host}.\r\n\
         \r\n\
         {intro}\r\n\
         \r\n",
        to = address(&original.envelope_sender),
        date = rfc5322_date(now_ms),
    );
    for r in recipients {
        let _ = write!(m, "<{}>: {}", address(&r.address), r.action.as_str());
        if r.expired {
            m.push_str(" (delivery time expired: still undelivered when retrying ran out)");
        }
        if let Some(d) = &r.diagnostic {
            let _ = write!(m, ": {}", folded(d, global).replace("\r\n ", "\r\n    "));
        }
        m.push_str("\r\n");
    }
    let _ = write!(
        m,
        "\r\n--{boundary}\r\n\
         Content-Description: Delivery report\r\n\
         Content-Type: {status}\r\n\
         \r\n\
         Reporting-MTA: dns; {host}\r\n\
         X-Mailtrail-Receipt: {receipt_orig}\r\n",
        receipt_orig = original.receipt,
    );
    if let Some(envid) = &original.envid {
        // Decoded (RFC 3464 2.2.1; as Postfix writes it): the SMTP side takes only printable
        // ASCII, and `clean` keeps the field on its line whatever the store holds.
        let _ = write!(m, "Original-Envelope-Id: {}\r\n", clean(envid));
    }
    let _ = write!(
        m,
        "Arrival-Date: {}\r\n",
        rfc5322_date(original.received_at_ms)
    );
    for r in recipients {
        m.push_str("\r\n");
        if let Some(orcpt) = &r.orcpt {
            let (kind, addr) = orcpt.split_once(';').unwrap_or(("rfc822", orcpt));
            // As Postfix writes them: no space after the type here, one in Final-Recipient.
            let (kind, addr) = address_field(kind.trim(), addr.trim());
            let _ = write!(m, "Original-Recipient: {kind};{addr}\r\n");
        }
        let (kind, addr) = address_field("rfc822", &r.address);
        let _ = write!(
            m,
            "Final-Recipient: {kind}; {addr}\r\nAction: {}\r\nStatus: {}\r\n",
            r.action.as_str(),
            clean(&r.status)
        );
        if let Some(mta) = &r.remote_mta {
            let _ = write!(m, "Remote-MTA: dns; {}\r\n", clean(mta));
        }
        if let Some(d) = &r.diagnostic {
            let kind = if r.diagnostic_is_smtp {
                "smtp"
            } else {
                "x-local"
            };
            let _ = write!(m, "Diagnostic-Code: {kind}; {}\r\n", folded(d, global));
        }
        let _ = write!(
            m,
            "Last-Attempt-Date: {}\r\n",
            rfc5322_date(r.last_attempt_ms)
        );
        if let Some(until) = r.will_retry_until_ms {
            let _ = write!(m, "Will-Retry-Until: {}\r\n", rfc5322_date(until));
        }
    }
    let description = match (full, kind) {
        (true, _) => "Undelivered Message",
        (false, ReportKind::Failure) => "Undelivered Message Headers",
        (false, _) => "Message Headers",
    };
    let content_type = match (full, global) {
        (true, false) => "message/rfc822",
        (true, true) => "message/global",
        (false, false) => "text/rfc822-headers",
        (false, true) => "message/global-headers",
    };
    // An 8-bit original (8BITMIME, SMTPUTF8) is returned as it came, and labelled so (RFC
    // 2046 §5.2.1 allows 7bit, 8bit or binary for a message part; the default is 7bit).
    let encoding = if returned.iter().any(|b| *b >= 0x80) {
        "Content-Transfer-Encoding: 8bit\r\n"
    } else {
        ""
    };
    let _ = write!(
        m,
        "\r\n--{boundary}\r\n\
         Content-Description: {description}\r\n\
         Content-Type: {content_type}\r\n\
         {encoding}\
         \r\n"
    );
    let mut body = m.into_bytes();
    body.extend_from_slice(returned);
    if !returned.ends_with(b"\r\n") {
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());

    Some(AcceptedMessage {
        receipt,
        received_at_ms: now_ms,
        client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        helo: host.clone(),
        tls_version: None,
        auth_user: None,
        envelope_sender: String::new(),
        recipients: vec![AcceptedRecipient {
            address: original.envelope_sender.clone(),
            orcpt: None,
            notify: None,
            preset: None,
        }],
        envid: None,
        ret: None,
        eight_bit: body.iter().any(|b| *b >= 0x80),
        smtputf8: !original.envelope_sender.is_ascii(),
        message_id: Some(message_id),
        subject: Some(subject.to_string()),
        context: None,
        body,
        inbound_bounce: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{QueuedRecipient, RecipientStatus};

    fn original(sender: &str, ret: Option<DsnRet>, envid: Option<&str>) -> QueuedMessage {
        QueuedMessage {
            receipt: ReceiptId::new(),
            received_at_ms: 1_700_000_000_000,
            envelope_sender: sender.into(),
            auth_user: None,
            envid: envid.map(str::to_string),
            ret,
            eight_bit: false,
            smtputf8: false,
            size: 0,
            message_id: Some("m1@app".into()),
            subject: Some("Hello".into()),
            recipients: vec![QueuedRecipient {
                index: 0,
                address: "bob@b.example".into(),
                orcpt: None,
                notify: None,
                status: RecipientStatus::Queued,
                attempts: 0,
                next_attempt_at_ms: 0,
                first_deferred_at_ms: None,
                delay_dsn_sent: false,
                last_reply_code: None,
                last_enhanced_status: None,
                last_reply_text: None,
                retry_requested_at: None,
            }],
        }
    }

    const BODY: &[u8] = b"From: a@a.example\r\nSubject: Hello\r\n\r\nsecret body line\r\n";

    fn failed(addr: &str) -> ReportRecipient {
        ReportRecipient {
            index: 0,
            expired: false,
            address: addr.into(),
            orcpt: Some("rfc822;Bob@B.example".into()),
            action: Action::Failed,
            status: "5.1.1".into(),
            remote_mta: Some("mx.b.example".into()),
            diagnostic: Some("550 5.1.1 user unknown\nsee https://help".into()),
            diagnostic_is_smtp: true,
            last_attempt_ms: 1_700_000_100_000,
            will_retry_until_ms: None,
        }
    }

    #[test]
    fn remote_texts_fold_into_lines_a_message_may_carry() {
        let long = "x".repeat(2_000);
        let f = folded(&format!("550-first\n\n   \n{long}\nlast"), false);
        let lines: Vec<&str> = f.split("\r\n").collect();
        assert_eq!(lines.len(), 5, "{lines:?}");
        assert_eq!(lines[0], "550-first");
        assert!(
            lines.iter().all(|l| l.len() <= 901 && !l.trim().is_empty()),
            "{lines:?}"
        );
        assert!(lines.iter().skip(1).all(|l| l.starts_with(' ')));
        assert_eq!(f.replace("\r\n ", "").matches('x').count(), 2_000);
        assert_eq!(lines[4], " last");
    }

    #[test]
    fn notify_rules() {
        let n = |s: &str| Some(Notify::from_param(s).unwrap());
        assert!(wanted(None, Action::Failed));
        assert!(!wanted(None, Action::Delayed));
        assert!(!wanted(None, Action::Delivered));
        assert!(!wanted(n("NEVER"), Action::Failed));
        assert!(!wanted(n("SUCCESS"), Action::Failed));
        assert!(wanted(n("SUCCESS"), Action::Delivered));
        assert!(wanted(n("SUCCESS"), Action::Relayed));
        assert!(wanted(n("DELAY"), Action::Delayed));
        assert!(wanted(n("FAILURE,DELAY"), Action::Failed));
        assert!(!wanted(n("FAILURE"), Action::Delayed));
    }

    #[test]
    fn status_falls_back_to_the_reply_class() {
        assert_eq!(
            status_for(Some(550), Some("5.7.1"), Action::Failed),
            "5.7.1"
        );
        assert_eq!(status_for(Some(550), None, Action::Failed), "5.0.0");
        assert_eq!(status_for(Some(451), None, Action::Failed), "4.0.0");
        assert_eq!(status_for(None, None, Action::Failed), "5.0.0");
        assert_eq!(status_for(None, None, Action::Delayed), "4.0.0");
        assert_eq!(status_for(Some(250), None, Action::Delivered), "2.0.0");
    }

    #[test]
    fn no_dsn_for_the_null_sender() {
        assert!(
            build(
                "mx.local",
                &original("", None, None),
                BODY,
                &[failed("x@y")],
                0
            )
            .is_none()
        );
    }

    fn text(m: &AcceptedMessage) -> String {
        String::from_utf8(m.body.clone()).unwrap()
    }

    #[test]
    fn failure_dsn_has_the_rfc3464_fields() {
        let orig = original("alice@a.example", None, Some("env 42"));
        let m = build(
            "relay.example",
            &orig,
            BODY,
            &[failed("bob@b.example")],
            1_700_000_200_000,
        )
        .unwrap();
        assert!(m.envelope_sender.is_empty());
        assert_eq!(m.recipients.len(), 1);
        assert_eq!(m.recipients[0].address, "alice@a.example");
        assert_ne!(m.receipt, orig.receipt);
        let t = text(&m);
        for needle in [
            "From: Mail Delivery System <MAILER-DAEMON@relay.example>\r\n",
            "To: <alice@a.example>\r\n",
            "Auto-Submitted: auto-replied\r\n",
            "Content-Type: multipart/report; report-type=delivery-status;",
            "Content-Type: message/delivery-status\r\n",
            "Reporting-MTA: dns; relay.example\r\n",
            "Original-Envelope-Id: env 42\r\n",
            "Arrival-Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n",
            "Original-Recipient: rfc822;Bob@B.example\r\n",
            "Final-Recipient: rfc822; bob@b.example\r\n",
            "Action: failed\r\n",
            "Status: 5.1.1\r\n",
            "Remote-MTA: dns; mx.b.example\r\n",
            "Diagnostic-Code: smtp; 550 5.1.1 user unknown\r\n see https://help\r\n",
            "Last-Attempt-Date: Tue, 14 Nov 2023 22:15:00 +0000\r\n",
            "Content-Type: message/rfc822\r\n",
            "secret body line",
        ] {
            assert!(t.contains(needle), "missing {needle:?} in\n{t}");
        }
        assert!(t.ends_with("--\r\n"));
        // Every line ends in CRLF: no bare LF made it into the message.
        assert!(!t.replace("\r\n", "").contains('\n'));
    }

    #[test]
    fn ret_hdrs_returns_headers_only() {
        let orig = original("alice@a.example", Some(DsnRet::Hdrs), None);
        let t = text(&build("h", &orig, BODY, &[failed("bob@b.example")], 0).unwrap());
        assert!(t.contains("Content-Type: text/rfc822-headers\r\n"));
        assert!(t.contains("Subject: Hello\r\n"));
        assert!(!t.contains("secret body line"));
        assert!(!t.contains("Original-Envelope-Id"));
    }

    #[test]
    fn a_long_remote_text_folds_before_spaces_and_unfolds_verbatim() {
        let words = "user unknown ".repeat(300);
        let words = words.trim_end();
        let f = folded(words, false);
        assert!(f.split("\r\n").all(|l| l.len() <= 998), "{f}");
        assert!(f.split("\r\n").skip(1).all(|l| l.starts_with(' ')), "{f}");
        // RFC 5322 unfolding removes the CRLFs only.
        assert_eq!(f.replace("\r\n", ""), words);
        // A token with no space in it is cut where it must be.
        let token = "x".repeat(3000);
        let f = folded(&token, false);
        assert!(f.split("\r\n").all(|l| l.len() <= 998), "{f}");
        assert_eq!(f.replace("\r\n ", ""), token);
    }

    #[test]
    fn large_messages_return_headers_only() {
        let orig = original("alice@a.example", Some(DsnRet::Full), None);
        let mut big = BODY.to_vec();
        big.extend(std::iter::repeat_n(b'x', FULL_RETURN_LIMIT));
        let t = text(&build("h", &orig, &big, &[failed("bob@b.example")], 0).unwrap());
        assert!(t.contains("text/rfc822-headers"));
        assert!(!t.contains("secret body line"));
        assert!(t.contains("Its header is attached below (the message is too large"));
        assert!(!t.contains("It is attached below"));
    }

    #[test]
    fn the_notice_says_what_is_attached_in_lines_under_78_characters() {
        for (ret, says) in [
            (None, "It is attached below."),
            (
                Some(DsnRet::Hdrs),
                "Its header is attached below (the sender asked",
            ),
        ] {
            let orig = original("alice@a.example", ret, None);
            let t = text(&build("h", &orig, BODY, &[failed("bob@b.example")], 0).unwrap());
            assert!(t.contains(says), "{t}");
            let notice = t.split("Content-Description: Notification").nth(1).unwrap();
            let notice = notice.split("--").next().unwrap();
            assert!(notice.lines().all(|l| l.len() <= 78), "{notice}");
        }
    }

    #[test]
    fn delay_dsn_carries_headers_and_retry_deadline() {
        let orig = original("alice@a.example", None, None);
        let mut r = failed("bob@b.example");
        r.action = Action::Delayed;
        r.status = "4.2.2".into();
        r.will_retry_until_ms = Some(1_700_432_000_000);
        let m = build("h", &orig, BODY, &[r], 0).unwrap();
        let t = text(&m);
        assert_eq!(
            m.subject.as_deref(),
            Some("Delayed Mail (still being retried)")
        );
        assert!(t.contains("Action: delayed\r\n"));
        assert!(t.contains("Will-Retry-Until: "));
        assert!(t.contains("text/rfc822-headers"));
        assert!(!t.contains("secret body line"));
    }

    #[test]
    fn smtputf8_mail_gets_an_internationalised_report() {
        let mut orig = original("\u{e5}sa@a.example", None, Some("env 42"));
        orig.smtputf8 = true;
        let mut r = failed("j\u{f6}rg@b\u{fc}cher.example");
        r.orcpt = Some("rfc822;J\u{f6}rg@b\u{fc}cher.example".into());
        let body =
            "From: \u{e5}sa@a.example\r\nSubject: Gr\u{fc}\u{df}e\r\n\r\nsecret body line\r\n";
        let m = build("relay.example", &orig, body.as_bytes(), &[r], 0).unwrap();
        assert!(m.smtputf8 && m.eight_bit);
        let t = text(&m);
        for needle in [
            "To: <\u{e5}sa@a.example>\r\n",
            "Content-Type: multipart/report; report-type=global-delivery-status;",
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n",
            "<j\u{f6}rg@b\u{fc}cher.example>: failed",
            "Content-Type: message/global-delivery-status\r\n",
            "Original-Recipient: utf-8;J\u{f6}rg@b\u{fc}cher.example\r\n",
            "Final-Recipient: utf-8; j\u{f6}rg@b\u{fc}cher.example\r\n",
            "Content-Type: message/global\r\nContent-Transfer-Encoding: 8bit\r\n",
            "Subject: Gr\u{fc}\u{df}e\r\n",
        ] {
            assert!(t.contains(needle), "missing {needle:?} in\n{t}");
        }
        // Our own bounce parser reads it back: one record for the UTF-8 recipient.
        let records = crate::bounce::parse(&m.body);
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(records[0].recipient, "j\u{f6}rg@b\u{fc}cher.example");
        assert_eq!(records[0].status.as_deref(), Some("5.1.1"));
        assert_eq!(records[0].reason, crate::bounce::BounceReason::UserUnknown);
    }

    #[test]
    fn a_utf8_reply_stays_utf8_in_an_internationalised_report_only() {
        let mut r = failed("j\u{f6}rg@b.example");
        r.diagnostic = Some("550 5.1.1 Empf\u{e4}nger unbekannt".into());
        let mut orig = original("a@a.example", None, None);
        orig.smtputf8 = true;
        let t = text(&build("h", &orig, BODY, &[r.clone()], 0).unwrap());
        assert!(
            t.contains("Diagnostic-Code: smtp; 550 5.1.1 Empf\u{e4}nger unbekannt\r\n"),
            "{t}"
        );
        r.address = "jorg@b.example".into();
        let t = text(&build("h", &original("a@a.example", None, None), BODY, &[r], 0).unwrap());
        assert!(
            t.contains("Diagnostic-Code: smtp; 550 5.1.1 Empf?nger unbekannt\r\n"),
            "{t}"
        );
        // A long UTF-8 text is cut between characters, under 998 octets a line.
        let long = "\u{e4}".repeat(1500);
        let f = folded(&long, true);
        assert!(f.split("\r\n").all(|l| l.len() <= 998), "{f}");
        assert_eq!(f.replace("\r\n ", ""), long);
    }

    #[test]
    fn internationalised_headers_only_and_controls() {
        let mut orig = original("a@a.example", Some(DsnRet::Hdrs), None);
        orig.smtputf8 = true;
        // A C1 control and a line separator cannot pass into a field.
        let t = text(&build("h", &orig, BODY, &[failed("x\u{85}y\u{2028}@b.example")], 0).unwrap());
        assert!(
            t.contains("Content-Type: message/global-headers\r\n\r\n"),
            "{t}"
        );
        assert!(
            t.contains("Final-Recipient: utf-8; x?y?@b.example\r\n"),
            "{t}"
        );
        assert!(!t.contains("secret body line"));
    }

    #[test]
    fn ascii_mail_keeps_the_ascii_report_and_labels_eight_bit_content() {
        let orig = original("alice@a.example", None, None);
        let body = "Subject: x\r\n\r\nGr\u{fc}\u{df}e\r\n";
        let t = text(&build("h", &orig, body.as_bytes(), &[failed("bob@b.example")], 0).unwrap());
        assert!(t.contains("report-type=delivery-status;"));
        assert!(t.contains("Content-Type: text/plain; charset=us-ascii\r\n\r\n"));
        assert!(
            t.contains("Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n")
        );
        let plain = text(&build("h", &orig, BODY, &[failed("bob@b.example")], 0).unwrap());
        assert!(plain.contains("Content-Type: message/rfc822\r\n\r\n"));
    }

    #[test]
    fn hostile_remote_text_cannot_inject_fields() {
        let orig = original("alice@a.example", None, None);
        let mut r = failed("bob@b.example");
        r.diagnostic = Some("550 no\r\nAction: delivered\u{0}".into());
        let t = text(&build("h", &orig, BODY, &[r], 0).unwrap());
        assert!(!t.contains("\r\nAction: delivered"));
        assert!(t.contains("Diagnostic-Code: smtp; 550 no\r\n Action: delivered?"));
    }
}
