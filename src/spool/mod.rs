//! The durable queue: what the SMTP listener hands over when a transaction ends, and the
//! promise that it is on stable storage (fsynced) before the client sees `250`.
//!
//! An [`AcceptedMessage`] is a plain value; [`Spool::accept`] resolves only after body,
//! envelope and per-recipient `queued` state are committed. Concurrent sessions share one
//! commit (group commit). After a crash, everything that was acknowledged is in the store and
//! nothing that was not acknowledged is visible.

use std::net::IpAddr;

use crate::receipt::ReceiptId;

/// DSN `RET` parameter (RFC 3461 4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DsnRet {
    Full,
    Hdrs,
}

/// DSN `NOTIFY` (RFC 3461 4.1): `None` means the parameter was absent (default behaviour:
/// failure DSNs only). `never` excludes the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Notify {
    pub success: bool,
    pub failure: bool,
    pub delay: bool,
    pub never: bool,
}

impl Notify {
    /// The text form stored and sent on: `SUCCESS,FAILURE`, `NEVER`, ...
    pub fn to_param(self) -> String {
        if self.never {
            return "NEVER".to_string();
        }
        let mut parts = Vec::new();
        if self.success {
            parts.push("SUCCESS");
        }
        if self.failure {
            parts.push("FAILURE");
        }
        if self.delay {
            parts.push("DELAY");
        }
        parts.join(",")
    }

    pub fn from_param(s: &str) -> Option<Self> {
        let mut n = Notify::default();
        for part in s.split(',') {
            match part.trim().to_ascii_uppercase().as_str() {
                "SUCCESS" => n.success = true,
                "FAILURE" => n.failure = true,
                "DELAY" => n.delay = true,
                "NEVER" => n.never = true,
                "" => {}
                _ => return None,
            }
        }
        Some(n)
    }
}

/// One envelope recipient as accepted at RCPT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedRecipient {
    /// The forward-path address as given (without angle brackets).
    pub address: String,
    /// RFC 3461 ORCPT, as `addr-type;xtext-decoded address` (e.g. `rfc822;a@b`).
    pub orcpt: Option<String>,
    /// `None` = NOTIFY absent.
    pub notify: Option<Notify>,
    /// When set, the recipient is not relayed: it is stored with this final status right away
    /// (e.g. `suppressed`, `rejected`) and this reason / reply text.
    pub preset: Option<PresetOutcome>,
}

/// A final status decided at submission time instead of by a delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresetOutcome {
    pub status: crate::store::RecipientStatus,
    /// Classification reason (Sisimai vocabulary), e.g. `suppressed`, `hostunknown`.
    pub reason: String,
    /// Human text recorded as the "last reply".
    pub text: String,
    /// Bounce type of `reason` (`hard`, `soft`, ...), as a bounce with that reason would have.
    pub bounce_type: String,
    /// RFC 3463 status a DSN about it reports (`5.1.2`), when there is one.
    pub enhanced_status: Option<String>,
    /// The client heard `250` for this recipient, so the sender learns the outcome only from
    /// a DSN (RFC 5321 6.1); false for a recipient it was refused at RCPT.
    pub accepted: bool,
}

impl PresetOutcome {
    /// An outcome for `reason`, with the bounce type a bounce with that reason, enhanced
    /// status and reply code would have.
    pub fn new(
        status: crate::store::RecipientStatus,
        reason: crate::bounce::BounceReason,
        enhanced_status: Option<&str>,
        reply_code: Option<u16>,
        text: String,
    ) -> Self {
        PresetOutcome {
            status,
            reason: reason.as_str().to_string(),
            bounce_type: crate::bounce::bounce_type(reason, enhanced_status, reply_code)
                .as_str()
                .to_string(),
            enhanced_status: enhanced_status.map(str::to_string),
            text,
            accepted: true,
        }
    }

    /// The same outcome for a recipient the client was refused at RCPT (kept for the log).
    pub fn refused(mut self) -> Self {
        self.accepted = false;
        self
    }
}

/// A message at the moment its final DATA/BDAT chunk arrived, ready to be made durable.
#[derive(Debug, Clone)]
pub struct AcceptedMessage {
    pub receipt: ReceiptId,
    /// Milliseconds since the Unix epoch.
    pub received_at_ms: i64,
    pub client_ip: IpAddr,
    pub helo: String,
    /// `TLSv1_3` etc. when the session was encrypted.
    pub tls_version: Option<String>,
    pub auth_user: Option<String>,
    /// Reverse-path; empty for the null sender `<>`.
    pub envelope_sender: String,
    pub recipients: Vec<AcceptedRecipient>,
    /// RFC 3461 ENVID (xtext-decoded).
    pub envid: Option<String>,
    pub ret: Option<DsnRet>,
    /// BODY=8BITMIME / SMTPUTF8 requested.
    pub eight_bit: bool,
    pub smtputf8: bool,
    pub message_id: Option<String>,
    pub subject: Option<String>,
    /// From the `X-Mailtrail-Context` header, which is removed from `body`.
    pub context: Option<String>,
    /// The full message as relayed: our `Received:` header first, CRLF line ends, no
    /// dot-stuffing, no `X-Mailtrail-Context`.
    pub body: Vec<u8>,
    /// True for mail to the bounce domain: parsed as a bounce, never relayed.
    pub inbound_bounce: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Disk full, I/O error, database error: the client gets `451 4.3.0`.
    #[error("spool write failed: {0}")]
    Storage(String),
    /// The writer has stopped (shutdown).
    #[error("spool is closed")]
    Closed,
}
