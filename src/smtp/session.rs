//! The inbound ESMTP session as a sans-IO state machine (RFC 5321, with RFC 1870 SIZE,
//! 2920 PIPELINING, 3030 CHUNKING, 3207 STARTTLS, 3461 DSN, 4954 AUTH, 6531 SMTPUTF8).
//!
//! Bytes go in through [`Session::feed`]; [`Action`]s come out: replies to send, and requests
//! the shell must answer before the session reads on (verify credentials, check a recipient,
//! store a message, start TLS). While such a request is open the session buffers input and
//! processes nothing, so pipelined commands are answered in order and only after the reply
//! they depend on. Commands are parsed with smtp-proto; message content is scanned by
//! [`super::content`].

use std::borrow::Cow;
use std::net::IpAddr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use smtp_proto::{Error as ParseError, MailFrom, RcptTo, Request};

use super::content::{ContentError, ContentScanner, Framing};
use super::message::{self, Envelope};
use super::reply::Reply;
use crate::config::Config;
use crate::receipt::ReceiptId;
use crate::spool::{AcceptedMessage, AcceptedRecipient, DsnRet, Notify, PresetOutcome};

/// The limits and offers of one listener, fixed for a session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub hostname: String,
    pub max_message_size: usize,
    pub max_recipients: usize,
    pub max_command_line: usize,
    pub max_data_line: usize,
    pub max_errors: usize,
    /// A TLS server config exists, so STARTTLS can be offered.
    pub tls_available: bool,
    /// At least one AUTH user is configured.
    pub auth_available: bool,
}

impl SessionConfig {
    pub fn from_config(config: &Config, tls_available: bool) -> Self {
        Self {
            hostname: config.hostname.clone(),
            max_message_size: config.smtp.max_message_size,
            max_recipients: config.smtp.max_recipients,
            max_command_line: config.smtp.max_command_line,
            max_data_line: config.smtp.max_data_line,
            max_errors: config.smtp.max_errors,
            tls_available,
            auth_available: !config.smtp.users.is_empty(),
        }
    }
}

/// Who is connected.
#[derive(Debug, Clone)]
pub struct Peer {
    pub ip: IpAddr,
    /// The address is in `smtp.relay_networks`.
    pub relay_client: bool,
}

impl Peer {
    fn is_loopback(&self) -> bool {
        match self.ip {
            IpAddr::V4(v4) => v4.is_loopback(),
            IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
        }
    }
}

/// AUTH credentials to verify. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// A recipient the shell's [`super::RecipientPolicy`] must rule on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientCheck {
    pub address: String,
    pub envelope_sender: String,
    pub client_ip: IpAddr,
    /// The client may relay: it is in `relay_networks` or authenticated.
    pub relay_allowed: bool,
    pub auth_user: Option<String>,
}

/// The policy's answer for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipientVerdict {
    /// `250`, relay as usual.
    Accept,
    /// `250`, but store the recipient with this final outcome instead of relaying it (a
    /// suppressed address, a domain that cannot receive mail).
    AcceptWithOutcome(PresetOutcome),
    /// `250`: mail to the bounce domain, parsed as a bounce and never relayed. Such
    /// recipients are not mixed with relayed ones in one transaction.
    AcceptInboundBounce,
    /// Refuse with this reply (e.g. `554 5.7.1 Relay access denied`).
    Reject(Reply),
}

/// What the session asks the shell to do, in order.
#[derive(Debug)]
pub enum Action {
    Send(Reply),
    /// Flush the replies, then run the TLS handshake and call [`Session::tls_started`].
    StartTls,
    /// Verify and call [`Session::auth_verified`].
    Authenticate(Credentials),
    /// Ask the recipient policy and call [`Session::recipient_checked`].
    CheckRecipient(RecipientCheck),
    /// Store durably and call [`Session::stored`].
    Store(Box<AcceptedMessage>),
    /// Flush the replies and close the connection.
    Close,
}

#[derive(Debug)]
enum Phase {
    Command,
    /// Waiting for the client's next SASL response line.
    Sasl(SaslStep),
    Data(ContentScanner),
    /// Reading a BDAT chunk's bytes. `refusal` is set when the chunk is consumed only to be
    /// refused (RFC 3030: the bytes are read even when the command fails).
    BdatChunk {
        remaining: usize,
        last: bool,
        refusal: Option<Reply>,
    },
    /// An [`Action`] is open; input is buffered until the shell answers.
    Waiting(Pending),
    Closed,
}

#[derive(Debug)]
enum SaslStep {
    Plain,
    LoginUsername,
    LoginPassword { username: String },
}

#[derive(Debug)]
enum Pending {
    Tls,
    Auth { username: String },
    Recipient(AcceptedRecipient),
    Store { receipt: ReceiptId },
}

#[derive(Debug)]
struct Transaction {
    envelope_sender: String,
    envid: Option<String>,
    ret: Option<DsnRet>,
    eight_bit: bool,
    smtputf8: bool,
    recipients: Vec<AcceptedRecipient>,
    /// Set by the first accepted recipient: `true` when it is for the bounce domain.
    inbound_bounce: Option<bool>,
    /// The BDAT content so far, once the first chunk arrived.
    chunks: Option<ContentScanner>,
}

/// One SMTP session. See the module docs.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    peer: Peer,
    tls_version: Option<String>,
    helo: Option<String>,
    esmtp: bool,
    auth_user: Option<String>,
    transaction: Option<Transaction>,
    phase: Phase,
    input: Vec<u8>,
    /// 5xx replies so far; 4xx replies are flow control a correct client follows, not errors.
    errors: usize,
    /// Discarding the rest of an over-long command line.
    skipping_line: bool,
    /// Shutdown requested: close at the next point where no transaction is open.
    draining: bool,
}

impl Session {
    /// `tls_version` is set for implicit-TLS listeners.
    pub fn new(config: SessionConfig, peer: Peer, tls_version: Option<String>) -> Self {
        Self {
            config,
            peer,
            tls_version,
            helo: None,
            esmtp: false,
            auth_user: None,
            transaction: None,
            phase: Phase::Command,
            input: Vec::new(),
            errors: 0,
            skipping_line: false,
            draining: false,
        }
    }

    /// The banner.
    pub fn greeting(&self) -> Vec<Action> {
        vec![Action::Send(Reply::plain(
            220,
            format!("{} ESMTP mailtrail", self.config.hostname),
        ))]
    }

    /// Bytes from the client.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Action> {
        if matches!(self.phase, Phase::Closed) {
            return Vec::new();
        }
        self.input.extend_from_slice(bytes);
        self.process()
    }

    /// The TLS handshake after STARTTLS succeeded: back to the post-banner state (RFC 3207
    /// 4.2); the client must send EHLO again.
    pub fn tls_started(&mut self, tls_version: String) -> Vec<Action> {
        self.tls_version = Some(tls_version);
        self.helo = None;
        self.esmtp = false;
        self.auth_user = None;
        self.transaction = None;
        self.input.clear();
        self.phase = Phase::Command;
        self.process()
    }

    /// The answer to [`Action::Authenticate`]: the verified user, or `None`.
    pub fn auth_verified(&mut self, user: Option<String>) -> Vec<Action> {
        let Phase::Waiting(Pending::Auth { username }) = &self.phase else {
            return Vec::new();
        };
        let mut out = Vec::new();
        match user {
            Some(user) if &user == username => {
                self.auth_user = Some(user);
                self.reply(&mut out, Reply::new(235, "2.7.0", "Authentication successful"));
            }
            _ => self.reply(
                &mut out,
                Reply::new(535, "5.7.8", "Authentication credentials invalid"),
            ),
        }
        self.resume(out)
    }

    /// The answer to [`Action::CheckRecipient`].
    pub fn recipient_checked(&mut self, verdict: RecipientVerdict) -> Vec<Action> {
        let Phase::Waiting(Pending::Recipient(_)) = &self.phase else {
            return Vec::new();
        };
        let Phase::Waiting(Pending::Recipient(mut recipient)) =
            std::mem::replace(&mut self.phase, Phase::Command)
        else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let (inbound_bounce, preset) = match verdict {
            RecipientVerdict::Reject(reply) => {
                self.reply(&mut out, reply);
                return self.resume(out);
            }
            RecipientVerdict::Accept => (false, None),
            RecipientVerdict::AcceptWithOutcome(preset) => (false, Some(preset)),
            RecipientVerdict::AcceptInboundBounce => (true, None),
        };
        let Some(tx) = self.transaction.as_mut() else {
            return self.resume(out);
        };
        if tx.inbound_bounce.is_some_and(|kind| kind != inbound_bounce) {
            // RFC 5321 4.5.3.1.10: the client sends the rest in a later transaction.
            self.reply(
                &mut out,
                Reply::new(452, "4.5.3", "Send this recipient in a separate transaction"),
            );
            return self.resume(out);
        }
        tx.inbound_bounce = Some(inbound_bounce);
        recipient.preset = preset;
        tx.recipients.push(recipient);
        self.reply(&mut out, Reply::new(250, "2.1.5", "Ok"));
        self.resume(out)
    }

    /// The answer to [`Action::Store`]: `true` once the message is durable.
    pub fn stored(&mut self, ok: bool) -> Vec<Action> {
        let Phase::Waiting(Pending::Store { receipt }) = &self.phase else {
            return Vec::new();
        };
        let receipt = *receipt;
        let mut out = Vec::new();
        if ok {
            self.reply(
                &mut out,
                Reply::new(250, "2.0.0", format!("Ok: queued as {receipt}")),
            );
        } else {
            self.reply(
                &mut out,
                Reply::new(451, "4.3.0", "Temporary storage failure, try again later"),
            );
        }
        self.resume(out)
    }

    /// The client sent nothing for too long (RFC 5321 4.5.3.2).
    pub fn timed_out(&mut self) -> Vec<Action> {
        let reply = Reply::new(
            421,
            "4.4.2",
            format!("{} Error: timeout exceeded", self.config.hostname),
        );
        self.close_with(reply)
    }

    /// Shutdown: idle sessions get `421` now; a session in a transaction finishes it first.
    pub fn begin_shutdown(&mut self) -> Vec<Action> {
        self.draining = true;
        if matches!(self.phase, Phase::Command) {
            self.process()
        } else {
            Vec::new()
        }
    }

    /// The shutdown grace period is over: close whatever is in flight.
    pub fn shutdown_now(&mut self) -> Vec<Action> {
        self.close_with(Reply::new(421, "4.3.2", "Service shutting down"))
    }

    /// Message content is being read (the shell applies `data_timeout`, not
    /// `command_timeout`).
    pub fn expects_content(&self) -> bool {
        matches!(self.phase, Phase::Data(_) | Phase::BdatChunk { .. })
    }

    /// A MAIL transaction is open (from MAIL until the final reply or RSET).
    pub fn in_transaction(&self) -> bool {
        self.transaction.is_some()
            || matches!(
                self.phase,
                Phase::Data(_) | Phase::BdatChunk { .. } | Phase::Waiting(Pending::Store { .. })
            )
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    fn close_with(&mut self, reply: Reply) -> Vec<Action> {
        if self.is_closed() {
            return Vec::new();
        }
        self.phase = Phase::Closed;
        self.input.clear();
        vec![Action::Send(reply), Action::Close]
    }

    /// After an open request was answered: carry on with buffered input.
    fn resume(&mut self, mut out: Vec<Action>) -> Vec<Action> {
        if matches!(self.phase, Phase::Waiting(_)) {
            self.phase = Phase::Command;
        }
        if !self.is_closed() {
            out.extend(self.process());
        }
        out
    }

    /// Queues a reply, counting 5xx replies; past `max_errors` the session ends.
    fn reply(&mut self, out: &mut Vec<Action>, reply: Reply) {
        let is_error = reply.code >= 500;
        out.push(Action::Send(reply));
        if is_error {
            self.errors += 1;
            if self.errors >= self.config.max_errors {
                out.push(Action::Send(Reply::new(
                    421,
                    "4.7.0",
                    format!("{} Error: too many errors", self.config.hostname),
                )));
                out.push(Action::Close);
                self.phase = Phase::Closed;
                self.input.clear();
            }
        }
    }

    fn process(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        loop {
            match std::mem::replace(&mut self.phase, Phase::Command) {
                Phase::Closed => {
                    self.phase = Phase::Closed;
                    return out;
                }
                waiting @ Phase::Waiting(_) => {
                    self.phase = waiting;
                    return out;
                }
                Phase::Data(mut scanner) => {
                    let (used, done) = scanner.ingest(&self.input);
                    self.input.drain(..used);
                    if !done {
                        self.phase = Phase::Data(scanner);
                        return out;
                    }
                    self.content_complete(&mut out, scanner);
                }
                Phase::BdatChunk {
                    remaining,
                    last,
                    refusal,
                } => {
                    let take = remaining.min(self.input.len());
                    if refusal.is_none()
                        && let Some(scanner) = self
                            .transaction
                            .as_mut()
                            .and_then(|tx| tx.chunks.as_mut())
                    {
                        scanner.ingest(self.input.get(..take).unwrap_or(&[]));
                    }
                    self.input.drain(..take);
                    let remaining = remaining - take;
                    if remaining > 0 {
                        self.phase = Phase::BdatChunk {
                            remaining,
                            last,
                            refusal,
                        };
                        return out;
                    }
                    self.chunk_complete(&mut out, last, refusal);
                }
                Phase::Sasl(step) => {
                    let Some(line) = self.next_line(&mut out) else {
                        if matches!(self.phase, Phase::Command) {
                            self.phase = Phase::Sasl(step);
                        }
                        return out;
                    };
                    self.sasl_response(&mut out, step, &line);
                }
                Phase::Command => {
                    if self.draining && !self.in_transaction() {
                        out.extend(self.close_with(Reply::new(
                            421,
                            "4.3.2",
                            "Service shutting down",
                        )));
                        return out;
                    }
                    if self.input.starts_with(&[0x16, 0x03]) && !self.skipping_line {
                        // A TLS ClientHello on the plain port: no SMTP will follow.
                        out.extend(self.close_with(Reply::new(
                            500,
                            "5.5.2",
                            "TLS handshake on a plain-text SMTP port",
                        )));
                        return out;
                    }
                    let Some(line) = self.next_line(&mut out) else {
                        return out;
                    };
                    self.command(&mut out, &line);
                }
            }
        }
    }

    /// The next complete line (with its line end), or `None` when more input is needed.
    /// Over-long lines are answered `500 5.5.2` and skipped.
    fn next_line(&mut self, out: &mut Vec<Action>) -> Option<Vec<u8>> {
        loop {
            let max = self.config.max_command_line;
            match self.input.iter().position(|&b| b == b'\n') {
                Some(pos) => {
                    let line: Vec<u8> = self.input.drain(..=pos).collect();
                    if self.skipping_line {
                        self.skipping_line = false;
                        continue;
                    }
                    if line.len() > max {
                        self.reply(out, Reply::new(500, "5.5.2", "Line too long"));
                        if self.is_closed() {
                            return None;
                        }
                        continue;
                    }
                    return Some(line);
                }
                None => {
                    if self.input.len() > max || (self.skipping_line && !self.input.is_empty()) {
                        self.input.clear();
                        if !self.skipping_line {
                            self.skipping_line = true;
                            self.reply(out, Reply::new(500, "5.5.2", "Line too long"));
                        }
                    }
                    return None;
                }
            }
        }
    }

    fn command(&mut self, out: &mut Vec<Action>, line: &[u8]) {
        let request = match Request::parse(&mut line.iter()) {
            Ok(request) => request,
            Err(e) => {
                let reply = parse_error_reply(e);
                self.reply(out, reply);
                return;
            }
        };
        match request {
            Request::Ehlo { host } => self.hello(out, host.into_owned(), true),
            Request::Helo { host } => self.hello(out, host.into_owned(), false),
            Request::Mail { from } => self.mail(out, from),
            Request::Rcpt { to } => self.rcpt(out, to),
            Request::Data => self.data(out),
            Request::Bdat {
                chunk_size,
                is_last,
            } => self.bdat(chunk_size, is_last),
            Request::Auth {
                mechanism,
                initial_response,
            } => self.auth(out, mechanism, &initial_response),
            Request::StartTls => self.starttls(out),
            Request::Rset => {
                self.transaction = None;
                self.reply(out, Reply::new(250, "2.0.0", "Ok"));
            }
            Request::Noop { .. } => self.reply(out, Reply::new(250, "2.0.0", "Ok")),
            Request::Quit => {
                out.push(Action::Send(Reply::new(221, "2.0.0", "Bye")));
                out.push(Action::Close);
                self.phase = Phase::Closed;
                self.input.clear();
            }
            Request::Vrfy { .. } => self.reply(
                out,
                Reply::new(
                    252,
                    "2.5.0",
                    "Cannot VRFY user, but will accept message and attempt delivery",
                ),
            ),
            Request::Help { .. } => self.reply(
                out,
                Reply::new(
                    214,
                    "2.0.0",
                    "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH",
                ),
            ),
            Request::Lhlo { .. }
            | Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => {
                self.reply(out, Reply::new(502, "5.5.1", "Command not implemented"))
            }
        }
    }

    fn hello(&mut self, out: &mut Vec<Action>, host: String, esmtp: bool) {
        self.transaction = None;
        self.helo = Some(host);
        self.esmtp = esmtp;
        if !esmtp {
            let reply = Reply::plain(250, self.config.hostname.clone());
            self.reply(out, reply);
            return;
        }
        let mut lines = vec![
            self.config.hostname.clone(),
            "PIPELINING".to_string(),
            format!("SIZE {}", self.config.max_message_size),
            "8BITMIME".to_string(),
            "SMTPUTF8".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
            "CHUNKING".to_string(),
            "DSN".to_string(),
        ];
        if self.config.tls_available && self.tls_version.is_none() {
            lines.push("STARTTLS".to_string());
        }
        if self.auth_offered() {
            lines.push("AUTH PLAIN LOGIN".to_string());
        }
        self.reply(out, Reply::multiline(250, lines));
    }

    /// AUTH is offered under TLS, or in clear text only to loopback clients.
    fn auth_offered(&self) -> bool {
        self.config.auth_available && (self.tls_version.is_some() || self.peer.is_loopback())
    }

    fn mail(&mut self, out: &mut Vec<Action>, from: MailFrom<Cow<'_, str>>) {
        if self.helo.is_none() {
            return self.reply(out, Reply::new(503, "5.5.1", "Send EHLO/HELO first"));
        }
        if self.transaction.is_some() {
            return self.reply(out, Reply::new(503, "5.5.1", "Nested MAIL command"));
        }
        if from.size > self.config.max_message_size {
            return self.reply(
                out,
                Reply::new(
                    552,
                    "5.3.4",
                    "Message size exceeds fixed maximum message size",
                ),
            );
        }
        if from.flags & smtp_proto::MAIL_BODY_BINARYMIME != 0 {
            return self.reply(out, Reply::new(555, "5.5.4", "BODY=BINARYMIME not supported"));
        }
        if from.flags & smtp_proto::MAIL_REQUIRETLS != 0 {
            return self.reply(out, Reply::new(555, "5.5.4", "REQUIRETLS not supported"));
        }
        let smtputf8 = from.flags & smtp_proto::MAIL_SMTPUTF8 != 0;
        let address = from.address.into_owned();
        if !address.is_empty() && !is_mailbox(&address) {
            return self.reply(out, Reply::new(553, "5.1.7", "Bad sender address syntax"));
        }
        if !smtputf8 && !address.is_ascii() {
            return self.reply(
                out,
                Reply::new(553, "5.6.7", "Non-ASCII address requires SMTPUTF8"),
            );
        }
        let ret = if from.flags & smtp_proto::MAIL_RET_FULL != 0 {
            Some(DsnRet::Full)
        } else if from.flags & smtp_proto::MAIL_RET_HDRS != 0 {
            Some(DsnRet::Hdrs)
        } else {
            None
        };
        self.transaction = Some(Transaction {
            envelope_sender: address,
            envid: from.env_id.map(Cow::into_owned),
            ret,
            eight_bit: from.flags & smtp_proto::MAIL_BODY_8BITMIME != 0,
            smtputf8,
            recipients: Vec::new(),
            inbound_bounce: None,
            chunks: None,
        });
        self.reply(out, Reply::new(250, "2.1.0", "Ok"));
    }

    fn rcpt(&mut self, out: &mut Vec<Action>, to: RcptTo<Cow<'_, str>>) {
        let Some(tx) = self.transaction.as_ref() else {
            return self.reply(out, Reply::new(503, "5.5.1", "Need MAIL command"));
        };
        if tx.chunks.is_some() {
            return self.reply(out, Reply::new(503, "5.5.1", "RCPT not allowed during BDAT"));
        }
        if tx.recipients.len() >= self.config.max_recipients {
            return self.reply(out, Reply::new(452, "4.5.3", "Too many recipients"));
        }
        let address = to.address.into_owned();
        if !is_mailbox(&address) && !address.eq_ignore_ascii_case("postmaster") {
            return self.reply(out, Reply::new(553, "5.1.3", "Bad recipient address syntax"));
        }
        if !tx.smtputf8 && !address.is_ascii() {
            return self.reply(
                out,
                Reply::new(553, "5.6.7", "Non-ASCII address requires SMTPUTF8"),
            );
        }
        let notify = notify_of(to.flags);
        let check = RecipientCheck {
            address: address.clone(),
            envelope_sender: tx.envelope_sender.clone(),
            client_ip: self.peer.ip,
            relay_allowed: self.peer.relay_client || self.auth_user.is_some(),
            auth_user: self.auth_user.clone(),
        };
        self.phase = Phase::Waiting(Pending::Recipient(AcceptedRecipient {
            address,
            orcpt: to.orcpt.map(|o| format!("rfc822;{o}")),
            notify,
            preset: None,
        }));
        out.push(Action::CheckRecipient(check));
    }

    fn data(&mut self, out: &mut Vec<Action>) {
        let Some(tx) = self.transaction.as_ref() else {
            return self.reply(out, Reply::new(503, "5.5.1", "Need MAIL command"));
        };
        if tx.chunks.is_some() {
            return self.reply(out, Reply::new(503, "5.5.1", "DATA not allowed after BDAT"));
        }
        if tx.recipients.is_empty() {
            return self.reply(out, Reply::new(503, "5.5.1", "Need RCPT command"));
        }
        self.phase = Phase::Data(ContentScanner::new(
            Framing::DotTerminated,
            self.config.max_message_size,
            self.config.max_data_line,
        ));
        self.reply(out, Reply::plain(354, "End data with <CR><LF>.<CR><LF>"));
    }

    fn bdat(&mut self, size: usize, last: bool) {
        let refusal = match self.transaction.as_mut() {
            None => Some(Reply::new(503, "5.5.1", "Need MAIL command")),
            Some(tx) if tx.recipients.is_empty() => {
                Some(Reply::new(503, "5.5.1", "Need RCPT command"))
            }
            Some(tx) => {
                if tx.chunks.is_none() {
                    tx.chunks = Some(ContentScanner::new(
                        Framing::Chunked,
                        self.config.max_message_size,
                        self.config.max_data_line,
                    ));
                }
                None
            }
        };
        self.phase = Phase::BdatChunk {
            remaining: size,
            last,
            refusal,
        };
    }

    fn chunk_complete(&mut self, out: &mut Vec<Action>, last: bool, refusal: Option<Reply>) {
        if let Some(reply) = refusal {
            return self.reply(out, reply);
        }
        if last {
            let Some(scanner) = self.transaction.as_mut().and_then(|tx| tx.chunks.take()) else {
                return;
            };
            return self.content_complete(out, scanner);
        }
        // Size, line and line-ending violations are answered once, after the LAST chunk.
        self.reply(out, Reply::new(250, "2.0.0", "Chunk received"));
    }

    /// The message content is complete: reject it, or hand it to the store.
    fn content_complete(&mut self, out: &mut Vec<Action>, scanner: ContentScanner) {
        let Some(tx) = self.transaction.take() else {
            return;
        };
        let body = match scanner.finish() {
            Ok(body) => body,
            Err(e) => return self.reply(out, self.content_error_reply(e)),
        };
        let envelope = Envelope {
            client_ip: self.peer.ip,
            helo: self.helo.clone().unwrap_or_default(),
            esmtp: self.esmtp,
            tls_version: self.tls_version.clone(),
            auth_user: self.auth_user.clone(),
            envelope_sender: tx.envelope_sender,
            recipients: tx.recipients,
            envid: tx.envid,
            ret: tx.ret,
            eight_bit: tx.eight_bit,
            smtputf8: tx.smtputf8,
            inbound_bounce: tx.inbound_bounce.unwrap_or(false),
        };
        let receipt = ReceiptId::new();
        let message = message::build(
            envelope,
            &body,
            receipt,
            chrono::Utc::now(),
            &self.config.hostname,
        );
        self.phase = Phase::Waiting(Pending::Store { receipt });
        out.push(Action::Store(Box::new(message)));
    }

    fn content_error_reply(&self, error: ContentError) -> Reply {
        match error {
            // Postfix `smtpd_forbid_bare_newline = reject` answers the same: 5.5.2 names a
            // syntax error, and a bare line ending is one that could smuggle a second
            // message past a downstream server that reads it as the end of data.
            ContentError::BareLineEnding => Reply::new(
                550,
                "5.5.2",
                "Message rejected: bare <LF> or <CR> not allowed, use <CRLF>",
            ),
            ContentError::TooBig => Reply::new(
                552,
                "5.3.4",
                "Message size exceeds fixed maximum message size",
            ),
            ContentError::LineTooLong => Reply::new(
                500,
                "5.5.2",
                format!(
                    "Message rejected: line longer than {} bytes",
                    self.config.max_data_line
                ),
            ),
        }
    }

    fn auth(&mut self, out: &mut Vec<Action>, mechanism: u64, initial: &str) {
        if !self.config.auth_available {
            return self.reply(out, Reply::new(502, "5.5.1", "AUTH not available"));
        }
        if !self.esmtp {
            return self.reply(out, Reply::new(503, "5.5.1", "Send EHLO first"));
        }
        if self.auth_user.is_some() {
            return self.reply(out, Reply::new(503, "5.5.1", "Already authenticated"));
        }
        if self.transaction.is_some() {
            return self.reply(
                out,
                Reply::new(503, "5.5.1", "AUTH not allowed during a mail transaction"),
            );
        }
        if !self.auth_offered() {
            return self.reply(
                out,
                Reply::new(
                    538,
                    "5.7.11",
                    "Encryption required for requested authentication mechanism",
                ),
            );
        }
        if mechanism == smtp_proto::AUTH_PLAIN {
            if initial.is_empty() {
                self.phase = Phase::Sasl(SaslStep::Plain);
                return out.push(Action::Send(Reply::plain(334, "")));
            }
            self.sasl_response(out, SaslStep::Plain, initial.as_bytes());
        } else if mechanism == smtp_proto::AUTH_LOGIN {
            if initial.is_empty() {
                self.phase = Phase::Sasl(SaslStep::LoginUsername);
                return out.push(Action::Send(Reply::plain(334, "VXNlcm5hbWU6")));
            }
            self.sasl_response(out, SaslStep::LoginUsername, initial.as_bytes());
        } else {
            self.reply(
                out,
                Reply::new(504, "5.5.4", "Unrecognized authentication type"),
            );
        }
    }

    fn sasl_response(&mut self, out: &mut Vec<Action>, step: SaslStep, line: &[u8]) {
        let text = line.trim_ascii();
        if text == b"*" {
            return self.reply(out, Reply::new(501, "5.7.0", "Authentication cancelled"));
        }
        // RFC 4954 4: "=" is an empty initial response.
        let decoded = if text == b"=" {
            Ok(Vec::new())
        } else {
            BASE64.decode(text)
        };
        let Ok(decoded) = decoded else {
            return self.reply(out, Reply::new(501, "5.5.2", "Invalid base64 data"));
        };
        match step {
            SaslStep::Plain => {
                // authzid NUL authcid NUL passwd; an authzid other than the authcid is not
                // supported (no proxy authorization).
                let mut parts = decoded.split(|&b| b == 0);
                let (Some(authzid), Some(authcid), Some(password), None) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    return self.reply(out, Reply::new(501, "5.5.2", "Malformed AUTH PLAIN"));
                };
                if !authzid.is_empty() && authzid != authcid {
                    return self.reply(
                        out,
                        Reply::new(535, "5.7.8", "Authentication credentials invalid"),
                    );
                }
                self.verify(out, authcid, password);
            }
            SaslStep::LoginUsername => {
                let username = String::from_utf8_lossy(&decoded).into_owned();
                self.phase = Phase::Sasl(SaslStep::LoginPassword { username });
                out.push(Action::Send(Reply::plain(334, "UGFzc3dvcmQ6")));
            }
            SaslStep::LoginPassword { username } => {
                self.verify(out, username.as_bytes(), &decoded);
            }
        }
    }

    fn verify(&mut self, out: &mut Vec<Action>, username: &[u8], password: &[u8]) {
        let (Ok(username), Ok(password)) =
            (std::str::from_utf8(username), std::str::from_utf8(password))
        else {
            return self.reply(
                out,
                Reply::new(535, "5.7.8", "Authentication credentials invalid"),
            );
        };
        self.phase = Phase::Waiting(Pending::Auth {
            username: username.to_string(),
        });
        out.push(Action::Authenticate(Credentials {
            username: username.to_string(),
            password: password.to_string(),
        }));
    }

    fn starttls(&mut self, out: &mut Vec<Action>) {
        if self.tls_version.is_some() {
            return self.reply(out, Reply::new(503, "5.5.1", "TLS already active"));
        }
        if !self.config.tls_available {
            return self.reply(out, Reply::new(454, "4.7.0", "TLS not available"));
        }
        out.push(Action::Send(Reply::new(220, "2.0.0", "Ready to start TLS")));
        out.push(Action::StartTls);
        // Anything pipelined after STARTTLS was sent in clear text and must not be read as
        // if it came through TLS (CVE-2011-0411, STARTTLS command injection).
        self.input.clear();
        self.phase = Phase::Waiting(Pending::Tls);
    }
}

fn parse_error_reply(e: ParseError) -> Reply {
    match e {
        ParseError::InvalidSenderAddress => {
            Reply::new(553, "5.1.7", "Bad sender address syntax")
        }
        ParseError::InvalidRecipientAddress => {
            Reply::new(553, "5.1.3", "Bad recipient address syntax")
        }
        ParseError::SyntaxError { syntax } => {
            Reply::new(501, "5.5.4", format!("Syntax: {syntax}"))
        }
        ParseError::InvalidParameter { param } => {
            Reply::new(501, "5.5.4", format!("Invalid {param} parameter"))
        }
        ParseError::UnsupportedParameter { param } => {
            Reply::new(555, "5.5.4", format!("Unsupported parameter {param}"))
        }
        _ => Reply::new(500, "5.5.2", "Syntax error, command unrecognized"),
    }
}

/// `local@domain` with both parts present. The parser has checked the characters.
fn is_mailbox(address: &str) -> bool {
    address
        .rsplit_once('@')
        .is_some_and(|(local, domain)| !local.is_empty() && !domain.is_empty())
}

fn notify_of(flags: u64) -> Option<Notify> {
    let n = Notify {
        success: flags & smtp_proto::RCPT_NOTIFY_SUCCESS != 0,
        failure: flags & smtp_proto::RCPT_NOTIFY_FAILURE != 0,
        delay: flags & smtp_proto::RCPT_NOTIFY_DELAY != 0,
        never: flags & smtp_proto::RCPT_NOTIFY_NEVER != 0,
    };
    (n != Notify::default()).then_some(n)
}
