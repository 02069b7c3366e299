//! Returned mail → classified bounce records. Pure: bytes in, [`BounceRecord`]s out.
//!
//! One record per failed recipient, from whichever evidence the message carries, tried in
//! this order: an RFC 5965 feedback report (or a provider's equivalent), RFC 3464 / RFC 6533
//! delivery-status fields (in their MIME part or inlined in text), an Amazon SES JSON
//! notification, the prose of a
//! non-standard MTA bounce, and last an RFC 3834 auto-reply. Mail that is none of these
//! yields no record. The reason comes from [`classify::Classifier`].

pub mod arf;
pub mod autoreply;
pub mod classify;
pub mod dsn;
mod fml;
pub mod ingest;
mod message;
mod mime;
mod quoted_printable;
pub mod reason;
mod ses;
pub mod text;
pub mod verp;

use serde::Serialize;

use crate::receipt::ReceiptId;

pub use classify::{Classifier, Evidence, RulesError, classify_reply};
pub use reason::{BounceReason, BounceType, bounce_type};

/// Which kind of evidence a record was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BounceKind {
    /// RFC 3464 / RFC 6533 delivery-status fields.
    Dsn,
    /// RFC 5965 feedback report (or a provider's complaint format).
    Arf,
    /// RFC 3834 automatic reply (vacation, out of office).
    Autoreply,
    /// The prose of a non-standard bounce.
    Heuristic,
}

impl BounceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BounceKind::Dsn => "dsn",
            BounceKind::Arf => "arf",
            BounceKind::Autoreply => "autoreply",
            BounceKind::Heuristic => "heuristic",
        }
    }
}

/// One failed (or complained-about, or auto-replying) recipient of a returned message, with
/// what the bounce says about it and the hints that tie it back to the message we sent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BounceRecord {
    /// The recipient the bounce is about (Final-Recipient, or found in the text).
    pub recipient: String,
    /// Original-Recipient (the address as first given, RFC 3461 ORCPT), without its type.
    pub original_recipient: Option<String>,
    pub kind: BounceKind,
    /// DSN action (`failed`, `delayed`, `delivered`, ...); heuristics set `failed`/`delayed`.
    pub action: Option<String>,
    /// Enhanced status code (RFC 3463), e.g. `5.1.1`.
    pub status: Option<String>,
    pub reply_code: Option<u16>,
    /// The SMTP command the remote server refused, when the bounce says.
    pub smtp_command: Option<String>,
    /// Decoded diagnostic text (Diagnostic-Code without its type, or the bounce's prose).
    pub diagnostic: Option<String>,
    /// The Diagnostic-Code type (`smtp`, `x-unix`, `x-postfix`).
    pub diagnostic_type: Option<String>,
    pub remote_mta: Option<String>,
    pub reporting_mta: Option<String>,
    pub last_attempt: Option<String>,
    pub will_retry_until: Option<String>,
    /// ARF Feedback-Type (`abuse`, `opt-out`, ...).
    pub feedback_type: Option<String>,
    pub reason: BounceReason,
    pub bounce_type: BounceType,
    /// Message-ID of the returned (original) message.
    pub message_id: Option<String>,
    /// Our receipt id, from the returned message's `X-Mailtrail-Receipt` or `Received: ... id`.
    pub receipt: Option<ReceiptId>,
    /// Envelope sender of the original message (X-Postfix-Sender, Return-Path or From).
    pub original_sender: Option<String>,
    /// `To` of the returned message.
    pub original_to: Option<String>,
    /// Original-Envelope-Id (RFC 3461 ENVID).
    pub envid: Option<String>,
    /// Original-Recipient as written, with its address type (`rfc822;a@b`).
    pub orcpt: Option<String>,
}

impl BounceRecord {
    fn new(recipient: String, kind: BounceKind) -> Self {
        BounceRecord {
            recipient,
            original_recipient: None,
            kind,
            action: None,
            status: None,
            reply_code: None,
            smtp_command: None,
            diagnostic: None,
            diagnostic_type: None,
            remote_mta: None,
            reporting_mta: None,
            last_attempt: None,
            will_retry_until: None,
            feedback_type: None,
            reason: BounceReason::Undefined,
            bounce_type: BounceType::Undetermined,
            message_id: None,
            receipt: None,
            original_sender: None,
            original_to: None,
            envid: None,
            orcpt: None,
        }
    }

    /// Sets reason and bounce type from the record's own status, code and diagnostic.
    fn classify(&mut self, classifier: &Classifier) {
        let ev = Evidence {
            status: self.status.as_deref(),
            reply_code: self.reply_code,
            diagnostic: self.diagnostic.as_deref().unwrap_or(""),
            action: self.action.as_deref(),
            command: self.smtp_command.as_deref(),
        };
        self.reason = classifier.reason_typed(&ev, self.diagnostic_type.as_deref());
        // Unknown-user wording counts as `userunknown` when the server said so at RCPT or
        // with an x.1.1 status. A bare `550` quoted without status or command is how content
        // filters and appliances word their refusals too; read as Sisimai does: `filtered`.
        if self.reason == BounceReason::UserUnknown
            && self.status.is_none()
            && self.reply_code == Some(550)
            && self.smtp_command.is_none()
        {
            self.reason = BounceReason::Filtered;
        }
        // A failure report without any code is still a permanent failure.
        let failed = self.action.as_deref() == Some("failed");
        let status = self
            .status
            .as_deref()
            .or((failed && self.reply_code.is_none()).then_some("5.0.0"));
        self.bounce_type = bounce_type(self.reason, status, self.reply_code);
    }

    /// The recipient status a matched record moves its recipient to: `bounced` for a
    /// failure, `complained` for a complaint, none for auto-replies, delays and successes.
    pub fn recipient_status(&self) -> Option<crate::store::RecipientStatus> {
        use crate::store::RecipientStatus;
        match self.bounce_type {
            BounceType::Complaint => Some(RecipientStatus::Complained),
            BounceType::Autoreply => None,
            _ if self.reason == BounceReason::Delivered => None,
            _ if self.action.as_deref() == Some("delayed") => None,
            _ => Some(RecipientStatus::Bounced),
        }
    }
}

/// Parses returned mail with the built-in rules.
pub fn parse(raw: &[u8]) -> Vec<BounceRecord> {
    parse_with(raw, Classifier::builtin())
}

/// Parses returned mail, classifying with `classifier`.
pub fn parse_with(raw: &[u8], classifier: &Classifier) -> Vec<BounceRecord> {
    parse_nested(raw, classifier, 0)
}

/// [`parse_with`], and for a failure notice that names no recipient the parser finds (an
/// Exchange notice quoting only the remote reply, a recipient address it cannot read) one
/// record about `recipient`: returned mail that reached the VERP address of a copy we sent
/// is about that copy, whatever its text names.
pub fn parse_about(raw: &[u8], classifier: &Classifier, recipient: &str) -> Vec<BounceRecord> {
    let records = parse_with(raw, classifier);
    if !records.is_empty() {
        return records;
    }
    let Some(view) = message::View::read(raw, None) else {
        return records;
    };
    let mut records: Vec<BounceRecord> = message::notice_about(&view, recipient)
        .into_iter()
        .collect();
    finish(&view, &mut records, classifier);
    records
}

/// How deep a bounce wrapped in another message (a forwarded bounce, a bounce of a bounce)
/// is still looked into.
const MAX_NESTING: usize = 1;

fn parse_nested(raw: &[u8], classifier: &Classifier, depth: usize) -> Vec<BounceRecord> {
    // A notification saved on its own, without the mail it came in (what an SNS webhook or
    // an SQS consumer writes to a file): read as the text of a message.
    if depth == 0 && raw.trim_ascii_start().starts_with(b"{") {
        let wrapped = [b"Content-Type: text/plain; charset=utf-8\r\n\r\n", raw].concat();
        return parse_view(&wrapped, None, classifier, depth);
    }
    // A report whose machine-readable part precedes the returned message needs only the
    // returned message's headers: parsing its body (often the bulk of the bytes) is wasted.
    if let Some(short) = message::without_returned_body(raw) {
        let records = parse_view(
            short.report,
            Some(short.returned_headers),
            classifier,
            depth,
        );
        if !records.is_empty() && !is_weak(&records) {
            return records;
        }
    }
    parse_view(raw, None, classifier, depth)
}

/// Only prose without any code: what came back may itself be the (better) bounce.
fn is_weak(records: &[BounceRecord]) -> bool {
    records
        .iter()
        .all(|r| r.kind == BounceKind::Heuristic && r.status.is_none() && r.reply_code.is_none())
}

fn parse_view(
    raw: &[u8],
    returned: Option<&[u8]>,
    classifier: &Classifier,
    depth: usize,
) -> Vec<BounceRecord> {
    let Some(view) = message::View::read(raw, returned) else {
        return Vec::new();
    };
    let mut records = arf::records(&view);
    if records.is_empty() {
        records = ses::records(&view);
    }
    if records.is_empty() {
        records = message::dsn_records(&view);
    }
    if records.is_empty() {
        records = fml::records(&view);
    }
    if records.is_empty() {
        records = message::text_records(&view);
    }
    // What a person's automatic reply quotes is the mail it answers: never parsed again as
    // a bounce of its own (a quoted bounce gave a hard bounce for its address). Asked only
    // here, where it matters: it reads the From, which the other readers may not need.
    if is_weak(&records)
        && depth < MAX_NESTING
        && let Some(inner) = &view.returned_raw
        && !view.is_personal_autoreply()
    {
        let nested = parse_nested(inner.as_bytes(), classifier, depth + 1);
        if !nested.is_empty() {
            return nested;
        }
    }
    if records.is_empty() {
        records = autoreply::records(&view);
    }
    finish(&view, &mut records, classifier);
    records
}

/// Classifies the records read from `view` and gives them its correlation hints.
fn finish(view: &message::View, records: &mut [BounceRecord], classifier: &Classifier) {
    let hints = view.correlation();
    for r in records {
        if r.kind == BounceKind::Arf {
            r.reason = BounceReason::Feedback;
            // RFC 6430 `not-spam` takes a complaint back; RFC 6591 `auth-failure` reports
            // an SPF/DKIM/DMARC failure. Neither says the recipient complained.
            let not_a_complaint = r
                .feedback_type
                .as_deref()
                .is_some_and(|t| matches!(t, "not-spam" | "auth-failure"));
            r.bounce_type = if not_a_complaint {
                BounceType::Undetermined
            } else {
                BounceType::Complaint
            };
        } else if r.kind == BounceKind::Autoreply {
            r.reason = BounceReason::Vacation;
            r.bounce_type = BounceType::Autoreply;
        } else {
            if let Some(tidy) = r.diagnostic.as_deref().and_then(text::strip_banners) {
                r.diagnostic = Some(tidy);
            }
            r.classify(classifier);
        }
        hints.apply(r);
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod bare_notification_tests {
    use super::*;

    fn ses_bounce() -> serde_json::Value {
        serde_json::json!({
            "notificationType": "Bounce",
            "bounce": {"bounceType": "Permanent", "bouncedRecipients": [
                {"emailAddress": "x@example.net", "status": "5.1.1",
                 "diagnosticCode": "smtp; 550 5.1.1 user unknown"}]},
            "mail": {"messageId": "0100-abc"}
        })
    }

    #[test]
    fn a_notification_saved_without_its_mail_is_read() {
        let sns = serde_json::json!({"Type": "Notification", "Message": ses_bounce().to_string()});
        for raw in [ses_bounce().to_string(), format!("\n  {sns}\n")] {
            let records = parse(raw.as_bytes());
            assert_eq!(records.len(), 1, "{raw}");
            assert_eq!(records[0].recipient, "x@example.net");
            assert_eq!(records[0].reason, BounceReason::UserUnknown);
        }
        // Other JSON is no bounce.
        assert!(parse(br#"{"hello": "world"}"#).is_empty());
    }
}
