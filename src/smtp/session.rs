//! The inbound ESMTP session as a sans-IO state machine (RFC 5321, with RFC 1870 SIZE,
//! 2920 PIPELINING, 3030 CHUNKING, 3207 STARTTLS, 3461 DSN, 4954 AUTH, 6531 SMTPUTF8).
//!
//! Bytes go in through [`Session::feed`]; [`Action`]s come out: replies to send, and requests
//! the shell must answer before the session reads on (verify credentials, check a recipient,
//! store a message, start TLS). While such a request is open the session buffers input and
//! processes nothing, so pipelined commands are answered in order and only after the reply
//! they depend on. Commands are parsed with smtp-proto; message content is scanned by
//! [`super::content`]. A command line ends in CRLF and nothing else (RFC 5321 2.3.8): one
//! ending in a bare LF, or holding a bare CR, gets `521 5.5.2` and the session closes, since
//! where it ends is in doubt; bare line endings in content reject only the message.

use std::borrow::Cow;
use std::net::IpAddr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use smtp_proto::{Error as ParseError, MailFrom, RcptTo, Request};

use super::auth::AuthOutcome;
use super::content::{Charge, ContentError, ContentMemory, ContentScanner, Framing};
use super::message::{self, Envelope};
use super::reply::Reply;
use crate::bounce::BounceReason;
use crate::config::Config;
use crate::receipt::ReceiptId;
use crate::spool::{AcceptedMessage, AcceptedRecipient, DsnRet, Notify, PresetOutcome};
use crate::store::RecipientStatus;

/// Longest refused address kept for the mail log; the rest is cut.
const MAX_RECORDED_ADDRESS: usize = 320;

/// The limits and offers of one listener, fixed for a session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub hostname: String,
    pub max_message_size: usize,
    pub max_recipients: usize,
    pub max_command_line: usize,
    pub max_data_line: usize,
    pub max_errors: usize,
    pub max_hops: usize,
    /// A TLS server config exists, so STARTTLS can be offered.
    pub tls_available: bool,
    /// At least one AUTH user is configured.
    pub auth_available: bool,
    /// The content memory all sessions of the server share (`[smtp] max_content_memory`).
    pub content_memory: ContentMemory,
    /// The share of it that clients may use which are neither relay clients nor
    /// authenticated (anyone sending to the bounce domain): a quarter, so that nobody on
    /// the Internet can hold all of it with slow or unfinished messages.
    pub untrusted_content_memory: ContentMemory,
    /// Room on the data_dir's file system (`[smtp] min_free_space`): `MAIL` gets
    /// `452 4.3.1` without it.
    pub free_space: crate::smtp::disk::FreeSpace,
}

impl SessionConfig {
    /// `content_memory_in_use`: the gauge the shared content memory reports to.
    pub fn from_config(
        config: &Config,
        tls_available: bool,
        content_memory_in_use: prometheus_client::metrics::gauge::Gauge,
    ) -> Self {
        let content_memory =
            ContentMemory::reported_in(config.smtp.max_content_memory, content_memory_in_use);
        Self {
            untrusted_content_memory: content_memory.share(config.smtp.max_content_memory / 4),
            hostname: config.hostname.clone(),
            max_message_size: config.smtp.max_message_size,
            max_recipients: config.smtp.max_recipients,
            max_command_line: config.smtp.max_command_line,
            max_data_line: config.smtp.max_data_line,
            max_errors: config.smtp.max_errors,
            max_hops: config.smtp.max_hops,
            tls_available,
            auth_available: !config.smtp.users.is_empty(),
            free_space: crate::smtp::disk::FreeSpace::keep(
                config.data_dir.clone(),
                config.smtp.min_free_space(),
            ),
            content_memory,
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
            IpAddr::V6(v6) => {
                v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
            }
        }
    }
}

/// AUTH credentials to verify. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    /// The exchange cannot succeed (PLAIN's authorization identity names another user,
    /// which is not supported; bytes that are not UTF-8): checked and refused as a wrong
    /// password is, so it takes as long and counts toward the client's limit.
    pub unusable: bool,
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
    Auth {
        username: String,
    },
    Recipient(AcceptedRecipient),
    /// The message is being stored; its content stays charged to the content memory until
    /// the store answers.
    Store {
        receipt: ReceiptId,
        _charge: Charge,
    },
}

#[derive(Debug)]
struct Transaction {
    envelope_sender: String,
    envid: Option<String>,
    ret: Option<DsnRet>,
    eight_bit: bool,
    smtputf8: bool,
    recipients: Vec<AcceptedRecipient>,
    /// Recipients refused for bad syntax (`553 5.1.3`): stored with the message as
    /// `rejected`/`syntaxerror` so the mail log shows the attempt to reach them.
    refused: Vec<AcceptedRecipient>,
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
    input: Input,
    /// 5xx replies so far; 4xx replies are flow control a correct client follows, not errors.
    errors: usize,
    /// Discarding the rest of an over-long command line.
    skipping_line: bool,
    /// Shutdown requested: close at the next point where no transaction is open.
    draining: bool,
}

/// Client bytes not yet processed. Consuming from the front only moves a cursor: removing
/// each pipelined line from the front of a `Vec` moved everything after it, quadratic in
/// the number of lines a read brings. The consumed bytes are dropped when more arrive.
#[derive(Debug, Default)]
struct Input {
    buf: Vec<u8>,
    start: usize,
}

impl Input {
    fn bytes(&self) -> &[u8] {
        self.buf.get(self.start..).unwrap_or(&[])
    }

    fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.buf.len());
    }

    fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.buf.drain(..self.start);
        self.start = 0;
        self.buf.extend_from_slice(bytes);
    }

    fn clear(&mut self) {
        self.buf.clear();
        self.start = 0;
    }
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
            input: Input::default(),
            errors: 0,
            skipping_line: false,
            draining: false,
        }
    }

    /// The banner.
    /// The client's address.
    pub fn peer_ip(&self) -> IpAddr {
        self.peer.ip
    }

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
    pub fn auth_verified(&mut self, outcome: AuthOutcome) -> Vec<Action> {
        let Phase::Waiting(Pending::Auth { username }) = &self.phase else {
            return Vec::new();
        };
        let mut out = Vec::new();
        match outcome {
            AuthOutcome::Accepted(user) if &user == username => {
                self.auth_user = Some(user);
                self.reply(
                    &mut out,
                    Reply::new(235, "2.7.0", "Authentication successful"),
                );
            }
            AuthOutcome::Throttled => self.reply(
                &mut out,
                Reply::new(
                    454,
                    "4.7.0",
                    "Too many failed authentications from your address; try again later",
                ),
            ),
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
                Reply::new(
                    452,
                    "4.5.3",
                    "Send this recipient in a separate transaction",
                ),
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
        let Phase::Waiting(Pending::Store { receipt, .. }) = &self.phase else {
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

    /// Queues a reply, counting 5xx replies; one more than `max_errors` ends the session.
    fn reply(&mut self, out: &mut Vec<Action>, reply: Reply) {
        let is_error = reply.code >= 500;
        out.push(Action::Send(reply));
        if is_error {
            self.errors += 1;
            if self.errors > self.config.max_errors {
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
                    let (used, done) = scanner.ingest(self.input.bytes());
                    self.input.consume(used);
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
                        && let Some(scanner) =
                            self.transaction.as_mut().and_then(|tx| tx.chunks.as_mut())
                    {
                        scanner.ingest(self.input.bytes().get(..take).unwrap_or(&[]));
                    }
                    self.input.consume(take);
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
                    let errors_before = self.errors;
                    let line = self.next_line(&mut out);
                    if self.errors > errors_before {
                        // An over-long response was refused: the exchange is over, and what
                        // follows is read as commands again.
                        if let Some(line) = line {
                            self.command(&mut out, &line);
                        }
                        continue;
                    }
                    let Some(line) = line else {
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
                    if self.input.bytes().starts_with(&[0x16, 0x03]) && !self.skipping_line {
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
            match memchr::memchr(b'\n', self.input.bytes()) {
                Some(pos) => {
                    let line = self.input.bytes().get(..=pos).unwrap_or(&[]).to_vec();
                    self.input.consume(pos + 1);
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
                    if let Some(bare) = bare_line_ending(&line) {
                        // Where this command ends is in doubt (a proxy or filter before us
                        // may read it as a part of the next one, or the next as a part of
                        // it), so nothing after it can be read as a command: close, as
                        // Postfix `smtpd_forbid_bare_newline = reject` with code 521.
                        let text = format!("{} Error: bare {bare} received", self.config.hostname);
                        out.extend(self.close_with(Reply::new(521, "5.5.2", text)));
                        return None;
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
        if is_rcpt_postmaster(line) {
            // RFC 5321 4.5.1: `<Postmaster>` without a domain must be accepted; smtp-proto
            // refuses an address without `@`.
            let to = RcptTo {
                address: Cow::Borrowed("postmaster"),
                orcpt: None,
                rrvs: 0,
                flags: 0,
            };
            return self.rcpt(out, to, None);
        }
        match overflowing_number(line) {
            Some(Overflow::ChunkSize) => {
                // Where the chunk ends is unknown, so nothing after it can be read as a command.
                let reply = Reply::new(501, "5.5.4", "BDAT chunk size out of range");
                out.extend(self.close_with(reply));
                return;
            }
            Some(Overflow::MessageSize) => {
                let reply = Reply::new(
                    552,
                    "5.3.4",
                    "Message size exceeds fixed maximum message size",
                );
                return self.reply(out, reply);
            }
            None => {}
        }
        if is_mail_from_postmaster(line) {
            let reply = Reply::new(553, "5.1.7", "Sender address must name a domain");
            return self.reply(out, reply);
        }
        // smtp-proto refuses address literals: it reads a stand-in domain instead.
        let (line, literal) = match stand_in_for_literal(line) {
            Some((line, literal)) => (Cow::Owned(line), Some(literal)),
            None => (Cow::Borrowed(line), None),
        };
        // smtp-proto decodes xtext leniently, lets the last of two parameters win and takes
        // ORCPT of type rfc822 only, up to 256 characters: the DSN parameters are checked
        // here, and ORCPT is read here and taken out of the line.
        let (line, orcpt) = match dsn_params(line.as_ref()) {
            Ok(Some((rest, orcpt))) => (Cow::Owned(rest), Some(orcpt)),
            Ok(None) => (line, None),
            Err(reply) => return self.reply(out, reply),
        };
        let line = line.as_ref();
        let request = match Request::parse(&mut line.iter()) {
            Ok(request) => request,
            Err(e) => {
                if matches!(e, ParseError::InvalidRecipientAddress)
                    && let Some(address) = forward_path_text(line)
                {
                    self.record_refused(address);
                }
                let reply = parse_error_reply(e);
                self.reply(out, reply);
                return;
            }
        };
        match request {
            Request::Ehlo { host } => self.hello(out, host.into_owned(), true),
            Request::Helo { host } => self.hello(out, host.into_owned(), false),
            Request::Mail { mut from } => {
                if let Some(literal) = &literal {
                    from.address = with_literal(from.address, literal);
                }
                self.mail(out, from)
            }
            Request::Rcpt { mut to } => {
                if let Some(literal) = &literal {
                    to.address = with_literal(to.address, literal);
                }
                self.rcpt(out, to, orcpt)
            }
            Request::Data => self.data(out),
            Request::Bdat {
                chunk_size,
                is_last,
            } => self.bdat(chunk_size, is_last),
            Request::Auth {
                mechanism,
                initial_response,
            } => self.auth(out, mechanism, &initial_response),
            // RFC 3207 4: STARTTLS takes no parameter (smtp-proto ignores one).
            Request::StartTls if has_argument(line) => {
                self.reply(out, Reply::new(501, "5.5.4", "Syntax: STARTTLS"))
            }
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

    /// The content memory this client's messages take from.
    fn content_memory(&self) -> ContentMemory {
        if self.peer.relay_client || self.auth_user.is_some() {
            self.config.content_memory.clone()
        } else {
            self.config.untrusted_content_memory.clone()
        }
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
        // Before the client sends anything it would have to send again (Postfix's words).
        if self.config.free_space.is_low() {
            return self.reply(out, Reply::new(452, "4.3.1", "Insufficient system storage"));
        }
        if from.flags & smtp_proto::MAIL_BODY_BINARYMIME != 0 {
            return self.reply(
                out,
                Reply::new(555, "5.5.4", "BODY=BINARYMIME not supported"),
            );
        }
        if from.flags & smtp_proto::MAIL_REQUIRETLS != 0 {
            return self.reply(out, Reply::new(555, "5.5.4", "REQUIRETLS not supported"));
        }
        // Extensions this server does not offer (RFC 5321 4.1.1.11): a client asking for
        // delivery by a time (BY), a held release (FUTURERELEASE) or a priority must hear
        // that it will not get it.
        let unoffered = from.by != 0
            || from.flags
                & (smtp_proto::MAIL_BY_NOTIFY
                    | smtp_proto::MAIL_BY_RETURN
                    | smtp_proto::MAIL_BY_TRACE
                    | smtp_proto::MAIL_CONPERM)
                != 0
            || from.hold_for != 0
            || from.hold_until != 0
            || from.mt_priority != 0
            || from.trans_id.is_some()
            || from.solicit.is_some()
            || from.mtrk.is_some();
        if unoffered {
            return self.reply(
                out,
                Reply::new(555, "5.5.4", "MAIL parameter of an extension not offered"),
            );
        }
        let smtputf8 = from.flags & smtp_proto::MAIL_SMTPUTF8 != 0;
        let address = match from.address.as_ref() {
            "" => String::new(),
            a => match canonical_mailbox(a) {
                Some(a) => a,
                None => {
                    return self.reply(out, Reply::new(553, "5.1.7", "Bad sender address syntax"));
                }
            },
        };
        if !smtputf8 && !address.is_ascii() {
            return self.reply(
                out,
                Reply::new(553, "5.6.7", "Non-ASCII address requires SMTPUTF8"),
            );
        }
        // RFC 3461 4.4: printable US-ASCII. A line break or escape in it reached the log and
        // DSNs' readers as the client wrote it; Postfix refuses the same.
        let envid = from.env_id.as_deref().map(xtext_bytes_as_utf8);
        if envid
            .as_deref()
            .is_some_and(|e| !e.bytes().all(|b| (0x20..0x7f).contains(&b)))
        {
            return self.reply(
                out,
                Reply::new(
                    501,
                    "5.5.4",
                    "Bad ENVID parameter syntax (printable US-ASCII only)",
                ),
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
            envid,
            ret,
            eight_bit: from.flags & smtp_proto::MAIL_BODY_8BITMIME != 0,
            smtputf8,
            recipients: Vec::new(),
            refused: Vec::new(),
            inbound_bounce: None,
            chunks: None,
        });
        self.reply(out, Reply::new(250, "2.1.0", "Ok"));
    }

    /// `orcpt`: the ORCPT parameter as `type;address` (xtext decoded).
    fn rcpt(&mut self, out: &mut Vec<Action>, to: RcptTo<Cow<'_, str>>, orcpt: Option<String>) {
        let Some(tx) = self.transaction.as_ref() else {
            return self.reply(out, Reply::new(503, "5.5.1", "Need MAIL command"));
        };
        if tx.chunks.is_some() {
            return self.reply(
                out,
                Reply::new(503, "5.5.1", "RCPT not allowed during BDAT"),
            );
        }
        if tx.recipients.len() >= self.config.max_recipients {
            return self.reply(out, Reply::new(452, "4.5.3", "Too many recipients"));
        }
        let never_and_more = smtp_proto::RCPT_NOTIFY_SUCCESS
            | smtp_proto::RCPT_NOTIFY_FAILURE
            | smtp_proto::RCPT_NOTIFY_DELAY;
        if to.flags & smtp_proto::RCPT_NOTIFY_NEVER != 0 && to.flags & never_and_more != 0 {
            // RFC 3461 4.1: NEVER stands alone.
            return self.reply(
                out,
                Reply::new(501, "5.5.4", "NOTIFY=NEVER must stand alone"),
            );
        }
        if to.rrvs != 0
            || to.flags
                & (smtp_proto::RCPT_CONNEG
                    | smtp_proto::RCPT_RRVS_REJECT
                    | smtp_proto::RCPT_RRVS_CONTINUE)
                != 0
        {
            return self.reply(
                out,
                Reply::new(555, "5.5.4", "RCPT parameter of an extension not offered"),
            );
        }
        let address = if to.address.eq_ignore_ascii_case("postmaster") {
            to.address.into_owned()
        } else {
            match canonical_mailbox(&to.address) {
                Some(a) => a,
                None => {
                    self.record_refused(to.address.into_owned());
                    let reply = Reply::new(553, "5.1.3", "Bad recipient address syntax");
                    return self.reply(out, reply);
                }
            }
        };
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
            orcpt,
            notify,
            preset: None,
        }));
        out.push(Action::CheckRecipient(check));
    }

    /// Keeps a recipient refused for its syntax, to be stored as `rejected`/`syntaxerror`
    /// with the message (if the transaction completes). Bounded like accepted recipients.
    fn record_refused(&mut self, address: String) {
        if let Some(tx) = self.transaction.as_mut()
            && tx.refused.len() < self.config.max_recipients
        {
            tx.refused.push(AcceptedRecipient {
                address: address.chars().take(MAX_RECORDED_ADDRESS).collect(),
                orcpt: None,
                notify: None,
                preset: Some(
                    PresetOutcome::new(
                        RecipientStatus::Rejected,
                        BounceReason::SyntaxError,
                        Some("5.1.3"),
                        Some(553),
                        "553 5.1.3 Bad recipient address syntax".to_string(),
                    )
                    .refused(),
                ),
            });
        }
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
            self.content_memory(),
        ));
        self.reply(out, Reply::plain(354, "End data with <CR><LF>.<CR><LF>"));
    }

    fn bdat(&mut self, size: usize, last: bool) {
        let memory = self.content_memory();
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
                        memory,
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
    fn content_complete(&mut self, out: &mut Vec<Action>, mut scanner: ContentScanner) {
        let Some(tx) = self.transaction.take() else {
            return;
        };
        let charge = scanner.take_charge();
        let body = match scanner.finish() {
            Ok(body) => body,
            Err(e) => return self.reply(out, self.content_error_reply(e)),
        };
        // RFC 5321 6.3: counting Received: fields is how a relay finds a loop.
        let hops = message::received_count(&body);
        if hops > self.config.max_hops {
            return self.reply(
                out,
                Reply::new(
                    554,
                    "5.4.6",
                    format!("Too many hops ({hops} Received: header fields): mail forwarding loop"),
                ),
            );
        }
        let refused = if tx.inbound_bounce == Some(true) {
            Vec::new()
        } else {
            tx.refused
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
        let mut message = message::build(
            envelope,
            &body,
            receipt,
            chrono::Utc::now(),
            &self.config.hostname,
        );
        // After the accepted ones, so their indexes (VERP, DSN) are unaffected.
        message.recipients.extend(refused);
        self.phase = Phase::Waiting(Pending::Store {
            receipt,
            _charge: charge,
        });
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
            // RFC 5321 452 and RFC 3463 4.3.1 (mail system full): a client tries again later.
            ContentError::NoMemory => Reply::new(
                452,
                "4.3.1",
                "Insufficient system storage: too much mail in transit, try again later",
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
                let other_user = !authzid.is_empty() && authzid != authcid;
                self.verify(out, authcid, password, other_user);
            }
            SaslStep::LoginUsername => {
                let username = String::from_utf8_lossy(&decoded).into_owned();
                self.phase = Phase::Sasl(SaslStep::LoginPassword { username });
                out.push(Action::Send(Reply::plain(334, "UGFzc3dvcmQ6")));
            }
            SaslStep::LoginPassword { username } => {
                self.verify(out, username.as_bytes(), &decoded, false);
            }
        }
    }

    fn verify(
        &mut self,
        out: &mut Vec<Action>,
        username: &[u8],
        password: &[u8],
        other_user: bool,
    ) {
        let utf8 = std::str::from_utf8(username).is_ok() && std::str::from_utf8(password).is_ok();
        let username = String::from_utf8_lossy(username).into_owned();
        self.phase = Phase::Waiting(Pending::Auth {
            username: username.clone(),
        });
        out.push(Action::Authenticate(Credentials {
            username,
            password: String::from_utf8_lossy(password).into_owned(),
            unusable: other_user || !utf8,
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

/// The domain smtp-proto reads in place of an address literal (RFC 5321 4.1.3), which it
/// refuses as bad syntax. `.invalid` (RFC 2606) is no domain anyone can have.
const LITERAL_STAND_IN: &str = "address-literal.mailtrail.invalid";

/// A MAIL or RCPT line whose path ends in an address literal that names one host
/// (`<user@[192.0.2.1]>`, `<user@[IPv6:2001:db8::1]>`; `delivery::dns::address_literal`),
/// with [`LITERAL_STAND_IN`] in place of the literal, and the literal as written. Any other
/// line, a literal of no single host among them, is `None` and parsed as it is.
fn stand_in_for_literal(line: &[u8]) -> Option<(Vec<u8>, String)> {
    let verb = line.get(..4)?;
    if !verb.eq_ignore_ascii_case(b"MAIL") && !verb.eq_ignore_ascii_case(b"RCPT") {
        return None;
    }
    let open = memchr::memchr(b'<', line)?;
    // The path ends at the first `>` outside a quoted local part; its domain follows the
    // last `@` outside one.
    let (mut in_quote, mut escaped) = (false, false);
    let (mut at, mut close) = (None, None);
    for (i, &b) in line.iter().enumerate().skip(open + 1) {
        if escaped {
            escaped = false;
            continue;
        }
        match b {
            b'\\' if in_quote => escaped = true,
            b'"' => in_quote = !in_quote,
            b'@' if !in_quote => at = Some(i),
            b'>' if !in_quote => {
                close = Some(i);
                break;
            }
            _ => {}
        }
    }
    let (at, close) = (at?, close?);
    let domain = std::str::from_utf8(line.get(at + 1..close)?).ok()?;
    crate::delivery::dns::address_literal(domain)?;
    let mut stood_in = line.get(..=at)?.to_vec();
    stood_in.extend_from_slice(LITERAL_STAND_IN.as_bytes());
    stood_in.extend_from_slice(line.get(close..)?);
    Some((stood_in, domain.to_string()))
}

/// `address` as smtp-proto read it from a line of [`stand_in_for_literal`], with the
/// client's literal back in place of the stand-in.
fn with_literal<'x>(address: Cow<'x, str>, literal: &str) -> Cow<'x, str> {
    match address.strip_suffix(LITERAL_STAND_IN) {
        Some(local_and_at) if local_and_at.ends_with('@') => {
            Cow::Owned(format!("{local_and_at}{literal}"))
        }
        _ => address,
    }
}

/// `<LF>` when a command line (its line end included) ends in an LF without a CR before
/// it, `<CR>` when it holds a CR that no LF follows; `None` for a line ending in CRLF with
/// no other CR in it. RFC 5321 2.3.8: a line ends in CRLF and nothing else.
fn bare_line_ending(line: &[u8]) -> Option<&'static str> {
    let body = match line.strip_suffix(b"\r\n") {
        Some(body) => body,
        None => return Some("<LF>"),
    };
    body.contains(&b'\r').then_some("<CR>")
}

fn parse_error_reply(e: ParseError) -> Reply {
    match e {
        ParseError::InvalidSenderAddress => Reply::new(553, "5.1.7", "Bad sender address syntax"),
        ParseError::InvalidRecipientAddress => {
            Reply::new(553, "5.1.3", "Bad recipient address syntax")
        }
        ParseError::SyntaxError { syntax } => Reply::new(501, "5.5.4", format!("Syntax: {syntax}")),
        ParseError::InvalidParameter { param } => {
            Reply::new(501, "5.5.4", format!("Invalid {param} parameter"))
        }
        ParseError::UnsupportedParameter { param } => {
            Reply::new(555, "5.5.4", format!("Unsupported parameter {param}"))
        }
        _ => Reply::new(500, "5.5.2", "Syntax error, command unrecognized"),
    }
}

/// Whether a command line has anything after its verb but spaces and the line end.
fn has_argument(line: &[u8]) -> bool {
    let line = line.strip_suffix(b"\r\n").unwrap_or(line);
    line.iter()
        .position(|&b| b == b' ')
        .is_some_and(|at| line[at..].iter().any(|&b| b != b' ' && b != b'\t'))
}

fn is_rcpt_postmaster(line: &[u8]) -> bool {
    squeezed(line).eq(b"RCPTTO:<POSTMASTER>".iter().copied())
}

/// `MAIL FROM:<postmaster>`, which smtp-proto reads as the null sender: a reverse-path is a
/// mailbox with a domain or `<>` (RFC 5321 4.1.2), and `<>` would mean "send no DSN".
fn is_mail_from_postmaster(line: &[u8]) -> bool {
    let mut bytes = squeezed(line);
    b"MAILFROM:<POSTMASTER>"
        .iter()
        .all(|&b| bytes.next() == Some(b))
}

/// A number smtp-proto would misread: its parser keeps only the last digits of a number of
/// 21 digits or more (`BDAT 99999999999999999999999 LAST` as a 999-byte chunk, `SIZE=` of
/// the same as a small message), so the chunk would end where the client did not mean it to.
#[derive(Debug, PartialEq, Eq)]
enum Overflow {
    ChunkSize,
    MessageSize,
}

fn overflowing_number(line: &[u8]) -> Option<Overflow> {
    // Every command passes here: only BDAT and MAIL lines are read further.
    let verb = line.get(..4)?;
    if !verb.eq_ignore_ascii_case(b"BDAT") && !verb.eq_ignore_ascii_case(b"MAIL") {
        return None;
    }
    let too_big = |digits: &str| {
        !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
            && digits.parse::<u64>().is_err()
    };
    let text = std::str::from_utf8(line).ok()?;
    let mut words = text.split_ascii_whitespace();
    let verb = words.next()?;
    if verb.eq_ignore_ascii_case("BDAT") {
        return words
            .next()
            .filter(|n| too_big(n))
            .map(|_| Overflow::ChunkSize);
    }
    if verb.eq_ignore_ascii_case("MAIL") {
        return words
            .filter_map(|w| {
                let (name, value) = w.split_once('=')?;
                name.eq_ignore_ascii_case("SIZE").then_some(value)
            })
            .any(too_big)
            .then_some(Overflow::MessageSize);
    }
    None
}

/// Checks the DSN parameters (RET, ENVID, NOTIFY, ORCPT) of a MAIL or RCPT line: each given
/// at most once (Postfix refuses two), ENVID and ORCPT in xtext (RFC 3461 4, see
/// [`xtext_decode`]). smtp-proto decodes leniently (`a+ZZb` came out as `aZb`, `a=b` as
/// itself, and an ORCPT with `+0D+0A` was taken, with the line break, into DSNs) and lets
/// the last of two win. A RCPT line's ORCPT is returned as `type;address` (decoded) with
/// the line without it: RFC 3461 4.2 allows any atom for the type and up to
/// [`MAX_ORCPT`] characters, where smtp-proto takes `rfc822` only, up to 256.
fn dsn_params(line: &[u8]) -> Result<Option<(Vec<u8>, String)>, Reply> {
    const NAMES: [&str; 4] = ["RET", "ENVID", "NOTIFY", "ORCPT"];
    let Some(verb) = line.get(..5) else {
        return Ok(None);
    };
    let rcpt = verb.eq_ignore_ascii_case(b"RCPT ");
    if !rcpt && !verb.eq_ignore_ascii_case(b"MAIL ") {
        return Ok(None);
    }
    let bad = |text: String| Reply::new(501, "5.5.4", text);
    let mut seen = [false; NAMES.len()];
    let mut orcpt = None;
    let mut start = 0;
    for (n, token) in line.split(|b| b.is_ascii_whitespace()).enumerate() {
        let at = start;
        start += token.len() + 1;
        // The verb and the path.
        if n < 2 {
            continue;
        }
        let Some(eq) = token.iter().position(|&b| b == b'=') else {
            continue;
        };
        let Some(i) = NAMES
            .iter()
            .position(|n| token[..eq].eq_ignore_ascii_case(n.as_bytes()))
        else {
            continue;
        };
        let name = NAMES[i];
        if std::mem::replace(&mut seen[i], true) {
            return Err(bad(format!("Duplicate {name} parameter")));
        }
        let value = &token[eq + 1..];
        let xtext = match name {
            "ENVID" => value,
            // address-type ";" xtext
            "ORCPT" => value
                .iter()
                .position(|&b| b == b';')
                .map_or(value, |semi| &value[semi + 1..]),
            _ => continue,
        };
        let decoded = xtext_decode(xtext)
            .ok_or_else(|| bad(format!("Bad {name} parameter syntax (xtext, RFC 3461 4)")))?;
        if name == "ORCPT" && rcpt {
            orcpt = Some((at, token.len(), orcpt_value(value, decoded)?));
        }
    }
    Ok(orcpt.map(|(at, len, value)| {
        // With the white space before it (a token after the path always has some).
        let mut without = line[..at.saturating_sub(1)].to_vec();
        without.extend_from_slice(line.get(at + len..).unwrap_or_default());
        (without, value)
    }))
}

/// Longest ORCPT value, decoded (RFC 3461 4.2).
const MAX_ORCPT: usize = 500;

/// An ORCPT parameter's `value` (`addr-type ";" xtext`, its xtext `decoded`) as
/// `type;address`: the type an atom (RFC 5322 atext), the address not empty and of at
/// most [`MAX_ORCPT`] characters.
fn orcpt_value(value: &[u8], decoded: Vec<u8>) -> Result<String, Reply> {
    let invalid = || Reply::new(501, "5.5.4", "Invalid ORCPT parameter");
    let semi = value.iter().position(|&b| b == b';').ok_or_else(invalid)?;
    let kind = &value[..semi];
    let atext = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(b);
    if kind.is_empty() || !kind.iter().all(atext) || decoded.is_empty() {
        return Err(invalid());
    }
    let address = match String::from_utf8(decoded) {
        Ok(utf8) => utf8,
        Err(e) => e.into_bytes().into_iter().map(char::from).collect(),
    };
    if address.chars().count() > MAX_ORCPT {
        return Err(invalid());
    }
    let kind = String::from_utf8_lossy(kind).to_ascii_lowercase();
    Ok(format!("{kind};{address}"))
}

/// The bytes of xtext (RFC 3461 4: `+` with two hex digits, else `!` to `~` but `+` and
/// `=`; the RFC writes the digits in upper case, lower case is read too, as Postfix and
/// smtp-proto read it), or `None` when `value` is none or decodes to a control character
/// (RFC 3461 4.2 and 4.4: printable characters only; bytes of UTF-8 stay allowed, as
/// SMTPUTF8 mail needs them).
fn xtext_decode(value: &[u8]) -> Option<Vec<u8>> {
    let hex = |b: u8| char::from(b).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(value.len());
    let mut rest = value;
    while let Some((&b, tail)) = rest.split_first() {
        let decoded = if b == b'+' {
            let hi = tail.first().copied().and_then(hex)?;
            let lo = tail.get(1).copied().and_then(hex)?;
            rest = &tail[2..];
            hi << 4 | lo
        } else if (b'!'..=b'~').contains(&b) && b != b'=' || b >= 0x80 {
            rest = tail;
            b
        } else {
            return None;
        };
        if decoded < 0x20 || decoded == 0x7f {
            return None;
        }
        out.push(decoded);
    }
    Some(out)
}

/// An xtext value (ORCPT, ENVID; RFC 3461 4) as smtp-proto decodes it: each `+XX` byte
/// becomes the character U+00XX, so the UTF-8 bytes of `jörg` (`j+C3+B6rg`) come out as
/// `jÃ¶rg`, which relayed or reported would be encoded once more. Characters that are all
/// bytes and spell UTF-8 are read as that; anything else stays as it was.
fn xtext_bytes_as_utf8(value: &str) -> String {
    let bytes: Option<Vec<u8>> = value.chars().map(|c| u8::try_from(c).ok()).collect();
    bytes
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_else(|| value.to_string())
}

/// The bytes of `line` upper-cased without white space (run for every command: no copy).
fn squeezed(line: &[u8]) -> impl Iterator<Item = u8> + '_ {
    line.iter()
        .filter(|b| !b.is_ascii_whitespace())
        .map(u8::to_ascii_uppercase)
}

/// The forward-path as the client wrote it in a `RCPT TO:` line smtp-proto refused:
/// between `<` and `>` (or up to the first space), printable characters only.
fn forward_path_text(line: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(line);
    let upper = text.to_ascii_uppercase();
    let start = upper.find("TO:")? + 3;
    let rest = text.get(start..)?.trim_start();
    let path = match rest.strip_prefix('<') {
        Some(inner) => inner.split('>').next().unwrap_or(""),
        None => rest.split_whitespace().next().unwrap_or(""),
    };
    let path: String = path.chars().filter(|c| !c.is_control()).collect();
    (!path.is_empty()).then_some(path)
}

/// A local part that needs no quoting (RFC 5321 4.1.2 Dot-string; UTF-8 counts as atext,
/// RFC 6531).
pub(crate) fn is_dot_atom(local: &str) -> bool {
    let atext =
        |c: char| !c.is_ascii() || c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c);
    local
        .split('.')
        .all(|atom| !atom.is_empty() && atom.chars().all(atext))
}

/// The address as it is stored and relayed, or `None` when it is not a mailbox. smtp-proto
/// hands a quoted local part over without its quotes (`"a b"@x` as `a b@x`), which relayed
/// verbatim would turn into other parameters or commands (`<a> NOTIFY=SUCCESS@x>`): it is
/// quoted again unless it is a dot-atom (RFC 5321 4.1.2; UTF-8 counts as atext, RFC 6531).
/// Control characters fit no quoted string, and a domain is a name or an address literal.
/// U+FFFD is what the parser makes of bytes that are no UTF-8 (RFC 6531 wants UTF-8).
pub(crate) fn canonical_mailbox(address: &str) -> Option<String> {
    if address.contains(char::REPLACEMENT_CHARACTER) {
        return None;
    }
    let (local, domain) = address.rsplit_once('@')?;
    // `user@example.org.` is `user@example.org` (Postfix strips the dot; RFC 5321's Domain
    // has none): kept, it passed the suppression list and the log's search by address.
    let stripped = domain.strip_suffix('.');
    let domain = stripped.unwrap_or(domain);
    if local.is_empty() || !domain_is_valid(domain) || local.chars().any(char::is_control) {
        return None;
    }
    if is_dot_atom(local) {
        return Some(match stripped {
            Some(_) => format!("{local}@{domain}"),
            None => address.to_string(),
        });
    }
    let quoted = local.replace('\\', "\\\\").replace('"', "\\\"");
    Some(format!("\"{quoted}\"@{domain}"))
}

/// RFC 5321 4.1.2 `Domain`: dot-separated labels of letters, digits and hyphens (RFC 6531:
/// letters of any script), none empty or starting or ending with a hyphen, at most 63
/// characters each and 255 in all; or an address literal in brackets. `foo@-ok.test` was
/// accepted and deferred for the whole queue lifetime as a malformed label.
fn domain_is_valid(domain: &str) -> bool {
    if let Some(literal) = domain.strip_prefix('[') {
        return literal.strip_suffix(']').is_some_and(|inner| {
            !inner.is_empty()
                && inner
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '-'))
        });
    }
    domain.len() <= 255
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.chars().count() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_alphanumeric() || c == '-')
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RecipientStatus;

    /// Plays the shell: answers every request at once and records what happened.
    struct Client {
        session: Session,
        wire: String,
        stored: Vec<AcceptedMessage>,
        checks: Vec<RecipientCheck>,
        closed: bool,
        starttls: bool,
        store_ok: bool,
        policy: fn(&RecipientCheck) -> RecipientVerdict,
        /// `Credentials::unusable` of each AUTH check asked for.
        unusable: Vec<bool>,
    }

    fn relay_only(check: &RecipientCheck) -> RecipientVerdict {
        if check.relay_allowed {
            RecipientVerdict::Accept
        } else {
            RecipientVerdict::Reject(Reply::new(554, "5.7.1", "Relay access denied"))
        }
    }

    fn config() -> SessionConfig {
        SessionConfig {
            hostname: "mx.test".into(),
            max_message_size: 1000,
            max_recipients: 3,
            max_command_line: 512,
            max_data_line: 200,
            max_errors: 5,
            max_hops: 100,
            tls_available: true,
            auth_available: true,
            content_memory: ContentMemory::new(usize::MAX),
            untrusted_content_memory: ContentMemory::new(usize::MAX),
            free_space: crate::smtp::disk::FreeSpace::default(),
        }
    }

    #[test]
    fn mail_waits_for_room_on_the_disk() {
        let dir = tempfile::TempDir::new().unwrap();
        let mut c = client_with(
            SessionConfig {
                free_space: crate::smtp::disk::FreeSpace::keep(dir.path().into(), u64::MAX),
                ..config()
            },
            "127.0.0.1",
            true,
        );
        c.send(b"EHLO x\r\n");
        assert_eq!(
            c.send(b"MAIL FROM:<a@x.org>\r\n"),
            "452 4.3.1 Insufficient system storage\r\n"
        );
        // No transaction began: RCPT has nothing to join.
        assert!(c.send(b"RCPT TO:<b@y.org>\r\n").starts_with("503"));
    }

    fn client_with(config: SessionConfig, ip: &str, relay_client: bool) -> Client {
        let session = Session::new(
            config,
            Peer {
                ip: ip.parse().unwrap(),
                relay_client,
            },
            None,
        );
        let mut c = Client {
            session,
            wire: String::new(),
            stored: Vec::new(),
            checks: Vec::new(),
            closed: false,
            starttls: false,
            store_ok: true,
            policy: relay_only,
            unusable: Vec::new(),
        };
        let greeting = c.session.greeting();
        c.run(greeting);
        c
    }

    fn client() -> Client {
        client_with(config(), "192.0.2.1", true)
    }

    impl Client {
        fn send(&mut self, bytes: &[u8]) -> String {
            let before = self.wire.len();
            let actions = self.session.feed(bytes);
            self.run(actions);
            self.wire[before..].to_string()
        }

        fn run(&mut self, actions: Vec<Action>) {
            for action in actions {
                match action {
                    Action::Send(reply) => self.wire.push_str(&reply.to_string()),
                    Action::Close => self.closed = true,
                    Action::StartTls => self.starttls = true,
                    Action::Authenticate(c) => {
                        self.unusable.push(c.unusable);
                        let outcome = match (c.username.as_str(), c.password.as_str()) {
                            ("app", "secret") if !c.unusable => AuthOutcome::Accepted(c.username),
                            (_, "throttled") => AuthOutcome::Throttled,
                            _ => AuthOutcome::Refused,
                        };
                        let next = self.session.auth_verified(outcome);
                        self.run(next);
                    }
                    Action::CheckRecipient(check) => {
                        let verdict = (self.policy)(&check);
                        self.checks.push(check);
                        let next = self.session.recipient_checked(verdict);
                        self.run(next);
                    }
                    Action::Store(msg) => {
                        if self.store_ok {
                            self.stored.push(*msg);
                        }
                        let next = self.session.stored(self.store_ok);
                        self.run(next);
                    }
                }
            }
        }

        fn codes(&self) -> Vec<String> {
            self.wire
                .lines()
                .filter(|l| l.len() >= 4 && l.as_bytes()[3] == b' ')
                .map(|l| l[..3].to_string())
                .collect()
        }

        fn transaction(&mut self) {
            self.send(b"EHLO client.example\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<a@example.net>\r\n");
        }
    }

    const MESSAGE: &[u8] = b"Subject: hi\r\n\r\nhello\r\n.\r\n";

    #[test]
    fn greets_with_hostname_banner() {
        let c = client();
        assert_eq!(c.wire, "220 mx.test ESMTP mailtrail\r\n");
    }

    #[test]
    fn ehlo_advertises_extensions() {
        let mut c = client_with(config(), "127.0.0.1", true);
        let reply = c.send(b"EHLO client.example\r\n");
        assert_eq!(
            reply,
            "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250-DSN\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN\r\n"
        );
    }

    #[test]
    fn ehlo_offers_auth_only_under_tls_unless_loopback() {
        let mut c = client();
        let reply = c.send(b"EHLO x\r\n");
        assert!(!reply.contains("AUTH"), "{reply}");
        assert!(reply.contains("STARTTLS"));
        c.send(b"STARTTLS\r\n");
        c.session.tls_started("TLSv1_3".into());
        let reply = c.send(b"EHLO x\r\n");
        assert!(reply.contains("AUTH PLAIN LOGIN"), "{reply}");
        assert!(!reply.contains("STARTTLS"), "{reply}");
    }

    #[test]
    fn ehlo_omits_starttls_without_tls_config() {
        let mut cfg = config();
        cfg.tls_available = false;
        let mut c = client_with(cfg, "192.0.2.1", true);
        assert!(!c.send(b"EHLO x\r\n").contains("STARTTLS"));
        assert_eq!(c.send(b"STARTTLS\r\n"), "454 4.7.0 TLS not available\r\n");
    }

    #[test]
    fn helo_answers_single_line() {
        let mut c = client();
        assert_eq!(c.send(b"HELO x\r\n"), "250 mx.test\r\n");
    }

    #[test]
    fn accepts_message_and_replies_with_receipt_after_store() {
        let mut c = client();
        c.transaction();
        let reply = c.send(b"DATA\r\n");
        assert_eq!(reply, "354 End data with <CR><LF>.<CR><LF>\r\n");
        let reply = c.send(MESSAGE);
        assert_eq!(c.stored.len(), 1);
        let msg = &c.stored[0];
        assert_eq!(
            reply,
            format!("250 2.0.0 Ok: queued as {}\r\n", msg.receipt)
        );
        assert_eq!(msg.envelope_sender, "app@example.com");
        assert_eq!(msg.recipients[0].address, "a@example.net");
        assert_eq!(msg.helo, "client.example");
        assert_eq!(msg.subject.as_deref(), Some("hi"));
        let body = String::from_utf8_lossy(&msg.body);
        assert!(body.starts_with("Received: from client.example ([192.0.2.1])"));
        assert!(body.ends_with("Subject: hi\r\n\r\nhello\r\n"), "{body}");
        assert!(!c.session.in_transaction());
    }

    #[test]
    fn answers_451_and_acknowledges_nothing_when_store_fails() {
        let mut c = client();
        c.store_ok = false;
        c.transaction();
        c.send(b"DATA\r\n");
        let reply = c.send(MESSAGE);
        assert_eq!(
            reply,
            "451 4.3.0 Temporary storage failure, try again later\r\n"
        );
        assert!(c.stored.is_empty());
        assert!(!c.wire.contains("queued as"));
    }

    #[test]
    fn answers_commands_pipelined_after_data() {
        let mut c = client();
        c.transaction();
        c.send(b"DATA\r\n");
        let mut burst = MESSAGE.to_vec();
        burst.extend_from_slice(b"MAIL FROM:<b@example.com>\r\nRCPT TO:<c@example.net>\r\nDATA\r\nsecond\r\n.\r\nQUIT\r\n");
        let reply = c.send(&burst);
        assert_eq!(c.stored.len(), 2);
        let expected = format!(
            "250 2.0.0 Ok: queued as {}\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued as {}\r\n221 2.0.0 Bye\r\n",
            c.stored[0].receipt, c.stored[1].receipt
        );
        assert_eq!(reply, expected);
        assert!(c.closed);
        assert_eq!(c.stored[1].envelope_sender, "b@example.com");
    }

    #[test]
    fn pauses_input_while_store_is_pending() {
        let mut c = client();
        c.transaction();
        c.send(b"DATA\r\n");
        let actions = c.session.feed(b"x\r\n.\r\nNOOP\r\n");
        assert!(
            matches!(actions.as_slice(), [Action::Store(_)]),
            "{actions:?}"
        );
        // More input while waiting is buffered, not answered.
        assert!(c.session.feed(b"NOOP\r\n").is_empty());
        let after = c.session.stored(true);
        let replies: Vec<String> = after
            .iter()
            .filter_map(|a| match a {
                Action::Send(r) => Some(r.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(replies.len(), 3);
        assert!(replies[0].starts_with("250 2.0.0 Ok: queued as"));
        assert_eq!(replies[1], "250 2.0.0 Ok\r\n");
        assert_eq!(replies[2], "250 2.0.0 Ok\r\n");
    }

    #[test]
    fn answers_pipelined_envelope_in_order() {
        let mut c = client();
        let reply = c.send(
            b"EHLO x\r\nMAIL FROM:<a@x.org>\r\nRCPT TO:<b@y.org>\r\nRCPT TO:<c@y.org>\r\nDATA\r\n",
        );
        assert!(reply.ends_with("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"), "{reply}");
    }

    #[test]
    fn a_command_ending_in_bare_lf_is_refused_and_the_session_closed() {
        let mut c = client();
        c.send(b"EHLO x\r\n");
        // smtp-proto alone reads `\n` as the end of a command: this MAIL got 250 and the
        // RCPT after it was read as a command of its own.
        let reply = c.send(b"MAIL FROM:<a@b.example>\nRCPT TO:<c@d.example>\r\n");
        assert_eq!(reply, "521 5.5.2 mx.test Error: bare <LF> received\r\n");
        assert!(c.closed);
        assert!(c.checks.is_empty(), "a command after the bare LF was read");
        assert!(c.session.is_closed());
        assert!(c.session.feed(b"NOOP\r\n").is_empty());
    }

    #[test]
    fn a_bare_cr_inside_a_command_is_refused_and_the_session_closed() {
        for line in [&b"RSET\rMAIL FROM:<a@b.example>\r\n"[..], b"NOOP\r\r\n"] {
            let mut c = client();
            c.send(b"EHLO x\r\n");
            let reply = c.send(line);
            assert_eq!(
                reply, "521 5.5.2 mx.test Error: bare <CR> received\r\n",
                "{line:?}"
            );
            assert!(c.closed, "{line:?}");
        }
    }

    #[test]
    fn a_bare_lf_after_an_accepted_message_loses_nothing_acknowledged() {
        let mut c = client();
        c.transaction();
        // Pipelined: the message, then a command with a bare LF. The message is stored and
        // acknowledged first; only then is the session closed.
        let reply = c.send(b"DATA\r\nSubject: hi\r\n\r\nhello\r\n.\r\nNOOP\n");
        assert_eq!(c.stored.len(), 1);
        let receipt = c.stored[0].receipt;
        assert_eq!(
            reply,
            format!(
                "354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued as {receipt}\r\n\
                 521 5.5.2 mx.test Error: bare <LF> received\r\n"
            )
        );
        assert!(c.closed);
    }

    #[test]
    fn a_sasl_response_ending_in_bare_lf_is_refused() {
        // AUTH is offered in plain text to a loopback client only.
        let mut c = client_with(config(), "127.0.0.1", true);
        c.send(b"EHLO x\r\n");
        assert!(c.send(b"AUTH LOGIN\r\n").starts_with("334 "));
        let reply = c.send(b"YXBw\n");
        assert_eq!(reply, "521 5.5.2 mx.test Error: bare <LF> received\r\n");
        assert!(c.closed);
    }

    #[test]
    fn address_literals_are_domains_of_sender_and_recipients() {
        let mut c = client();
        c.send(b"EHLO x\r\n");
        assert_eq!(
            c.send(b"MAIL FROM:<app@[127.0.0.1]> SIZE=10\r\n"),
            "250 2.1.0 Ok\r\n"
        );
        for rcpt in [
            &b"RCPT TO:<user@[192.0.2.1]>\r\n"[..],
            b"RCPT TO:<user@[IPv6:2001:db8::1]> NOTIFY=SUCCESS,FAILURE\r\n",
            // The last `@` outside the quotes is the domain's.
            b"RCPT TO:<\"x@[192.0.2.9]>\"@[192.0.2.2]>\r\n",
        ] {
            assert_eq!(c.send(rcpt), "250 2.1.5 Ok\r\n", "{rcpt:?}");
        }
        for bad in [
            &b"RCPT TO:<user@[::1]>\r\n"[..],
            b"RCPT TO:<user@[0.0.0.0]>\r\n",
            b"RCPT TO:<user@[192.0.2.300]>\r\n",
            b"RCPT TO:<user@[x-tag:stuff]>\r\n",
        ] {
            assert_eq!(
                c.send(bad),
                "553 5.1.3 Bad recipient address syntax\r\n",
                "{bad:?}"
            );
        }
        c.send(b"DATA\r\n");
        c.send(MESSAGE);
        let msg = &c.stored[0];
        assert_eq!(msg.envelope_sender, "app@[127.0.0.1]");
        let to: Vec<&str> = msg
            .recipients
            .iter()
            .filter(|r| r.preset.is_none())
            .map(|r| r.address.as_str())
            .collect();
        assert_eq!(
            to,
            [
                "user@[192.0.2.1]",
                "user@[IPv6:2001:db8::1]",
                "\"x@[192.0.2.9]>\"@[192.0.2.2]"
            ]
        );
        assert!(msg.recipients[1].notify.is_some());
    }

    #[test]
    fn address_literals_are_no_way_around_relay_control() {
        let mut c = client_with(config(), "192.0.2.9", false);
        c.send(b"EHLO x\r\nMAIL FROM:<a@[192.0.2.9]>\r\n");
        assert_eq!(
            c.send(b"RCPT TO:<victim@[192.0.2.1]>\r\n"),
            "554 5.7.1 Relay access denied\r\n"
        );
    }

    #[test]
    fn rejects_bare_lf_in_data() {
        let mut c = client();
        c.transaction();
        c.send(b"DATA\r\n");
        let reply = c.send(b"a\nb\r\n.\r\n");
        assert_eq!(
            reply,
            "550 5.5.2 Message rejected: bare <LF> or <CR> not allowed, use <CRLF>\r\n"
        );
        assert!(c.stored.is_empty());
    }

    #[test]
    fn a_trailing_dot_of_the_domain_is_dropped() {
        assert_eq!(
            canonical_mailbox("r9@y.test.").as_deref(),
            Some("r9@y.test")
        );
        assert_eq!(
            canonical_mailbox("R9@Y.TEST.").as_deref(),
            Some("R9@Y.TEST")
        );
        assert_eq!(
            canonical_mailbox("a b@y.test.").as_deref(),
            Some("\"a b\"@y.test")
        );
        assert_eq!(canonical_mailbox("r9@y.test").as_deref(), Some("r9@y.test"));
        for bad in ["r9@.", "r9@y.test..", "r9@"] {
            assert_eq!(canonical_mailbox(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_domain_is_dot_separated_ldh_labels_or_a_literal() {
        for good in [
            "a@ok.test",
            "a@x-1.ok.test",
            "a@1.ok.test",
            "a@b\u{fc}cher.test",
            "a@[192.0.2.1]",
            "a@[IPv6:2001:db8::1]",
        ] {
            assert!(canonical_mailbox(good).is_some(), "{good}");
        }
        let long_label = format!("a@{}.test", "x".repeat(64));
        for bad in [
            "a@-ok.test",
            "a@ok-.test",
            "a@ok..test",
            "a@.ok.test",
            "a@ok_x.test",
            "a@[192.0.2.1",
            "a@[]",
            "a@ok[1].test",
            "a@ok:25.test",
            long_label.as_str(),
        ] {
            assert_eq!(canonical_mailbox(bad), None, "{bad}");
        }
    }

    #[test]
    fn quoted_local_parts_keep_their_quotes() {
        let mut c = client();
        c.send(b"EHLO x\r\n");
        let reply = c.send(b"MAIL FROM:<\"x> SIZE=1\"@b.example>\r\n");
        assert_eq!(reply, "250 2.1.0 Ok\r\n");
        for rcpt in [
            "<\"a> NOTIFY=SUCCESS\"@example.com>",
            "<\"user@victim.example\"@example.net>",
            "<\"plain\"@example.com>",
        ] {
            let reply = c.send(format!("RCPT TO:{rcpt}\r\n").as_bytes());
            assert_eq!(reply, "250 2.1.5 Ok\r\n", "{rcpt}");
        }
        c.send(b"DATA\r\n");
        c.send(b"Subject: x\r\n\r\nhi\r\n.\r\n");
        let msg = &c.stored[0];
        assert_eq!(msg.envelope_sender, "\"x> SIZE=1\"@b.example");
        let rcpts: Vec<&str> = msg.recipients.iter().map(|r| r.address.as_str()).collect();
        assert_eq!(
            rcpts,
            [
                "\"a> NOTIFY=SUCCESS\"@example.com",
                "\"user@victim.example\"@example.net",
                "plain@example.com"
            ]
        );
    }

    #[test]
    fn numbers_too_big_for_64_bits_are_not_read_as_their_last_digits() {
        let mut c = client();
        c.transaction();
        let reply = c.send(b"BDAT 99999999999999999999999 LAST\r\n");
        assert_eq!(reply, "501 5.5.4 BDAT chunk size out of range\r\n");
        assert!(c.closed);
        let mut c = client();
        c.send(b"EHLO x\r\n");
        let reply = c.send(b"MAIL FROM:<a@b.example> SIZE=99999999999999999999999\r\n");
        assert!(reply.starts_with("552 5.3.4"), "{reply}");
        let reply = c.send(b"MAIL FROM:<a@b.example> SIZE=99999999999999999999\r\n");
        assert!(reply.starts_with("552 5.3.4"), "{reply}");
        let reply = c.send(b"MAIL FROM:<a@b.example> SIZE=999\r\n");
        assert_eq!(reply, "250 2.1.0 Ok\r\n");
    }

    #[test]
    fn an_address_of_bytes_that_are_no_utf8_is_refused() {
        let mut c = client();
        c.send(b"EHLO x\r\nMAIL FROM:<a@b.example> SMTPUTF8\r\n");
        let reply = c.send(b"RCPT TO:<j\xff\xfe@example.com>\r\n");
        assert!(reply.starts_with("553 5.1.3"), "{reply}");
        let reply = c.send("RCPT TO:<jörg@example.com>\r\n".as_bytes());
        assert_eq!(reply, "250 2.1.5 Ok\r\n");
    }

    #[test]
    fn parameters_of_extensions_not_offered_are_refused() {
        let mut c = client();
        c.send(b"EHLO x\r\n");
        for p in ["BY=120;R", "HOLDFOR=100", "MT-PRIORITY=3", "TRANSID=<a@b>"] {
            let reply = c.send(format!("MAIL FROM:<a@b.example> {p}\r\n").as_bytes());
            assert!(reply.starts_with("555 5.5.4"), "{p}: {reply}");
        }
        assert_eq!(c.send(b"MAIL FROM:<a@b.example>\r\n"), "250 2.1.0 Ok\r\n");
        let reply = c.send(b"RCPT TO:<x@y.example> NOTIFY=NEVER,SUCCESS\r\n");
        assert!(reply.starts_with("501 5.5.4"), "{reply}");
        let reply = c.send(b"RCPT TO:<x@y.example> NOTIFY=NEVER\r\n");
        assert_eq!(reply, "250 2.1.5 Ok\r\n");
    }

    #[test]
    fn mail_from_postmaster_without_a_domain_is_no_null_sender() {
        let mut c = client();
        c.send(b"EHLO x\r\n");
        let reply = c.send(b"MAIL FROM:<postmaster>\r\n");
        assert!(reply.starts_with("553 5.1.7"), "{reply}");
    }

    #[test]
    fn clients_neither_relaying_nor_authenticated_use_their_share_of_the_content_memory() {
        let memory = ContentMemory::new(100_000);
        let cfg = SessionConfig {
            content_memory: memory.clone(),
            untrusted_content_memory: memory.share(50),
            ..config()
        };
        let body = b"Subject: more than the share holds\r\n\r\n0123456789012345678\r\n.\r\n";
        let mut outsider = client_with(cfg.clone(), "192.0.2.9", false);
        outsider.policy = |_| RecipientVerdict::AcceptInboundBounce;
        outsider.send(b"EHLO x\r\nMAIL FROM:<>\r\nRCPT TO:<bounces@bounce.test>\r\nDATA\r\n");
        let reply = outsider.send(body);
        assert!(reply.starts_with("452 4.3.1"), "{reply}");
        let mut app = client_with(cfg, "127.0.0.1", true);
        app.transaction();
        app.send(b"DATA\r\n");
        let reply = app.send(body);
        assert!(reply.starts_with("250 2.0.0 Ok: queued as"), "{reply}");
    }

    #[test]
    fn a_message_past_max_hops_is_a_loop() {
        let hops = |n: usize| "Received: x\r\n".repeat(n);
        let mut c = client_with(
            SessionConfig {
                max_hops: 3,
                ..config()
            },
            "127.0.0.1",
            true,
        );
        c.transaction();
        c.send(b"DATA\r\n");
        let reply = c.send(format!("{}Subject: x\r\n\r\nhi\r\n.\r\n", hops(4)).as_bytes());
        assert_eq!(
            reply,
            "554 5.4.6 Too many hops (4 Received: header fields): mail forwarding loop\r\n"
        );
        assert!(c.stored.is_empty());
        c.transaction();
        c.send(b"DATA\r\n");
        let reply = c.send(format!("{}Subject: x\r\n\r\nhi\r\n.\r\n", hops(3)).as_bytes());
        assert!(reply.starts_with("250 2.0.0 Ok: queued as"), "{reply}");
    }

    #[test]
    fn rejects_bare_cr_in_data() {
        let mut c = client();
        c.transaction();
        c.send(b"DATA\r\n");
        let reply = c.send(b"a\rb\r\n.\r\n");
        assert!(reply.starts_with("550 5.5.2"), "{reply}");
        assert!(c.stored.is_empty());
    }

    #[test]
    fn smuggled_end_of_data_does_not_end_message() {
        // The classic smuggling payload: `\n.\n` then a second transaction, then the real end.
        let mut c = client();
        c.transaction();
        c.send(b"DATA\r\n");
        let reply = c.send(
            b"first\r\n\n.\nMAIL FROM:<evil@x.org>\r\nRCPT TO:<v@y.org>\r\nDATA\r\nforged\r\n.\r\n",
        );
        assert_eq!(
            reply,
            "550 5.5.2 Message rejected: bare <LF> or <CR> not allowed, use <CRLF>\r\n"
        );
        assert!(c.stored.is_empty());
        for bad_end in [&b"x\r\n.\n"[..], b"x\n.\r\n", b"x\r.\r", b"x\r\n.\r"] {
            let mut c = client();
            c.transaction();
            c.send(b"DATA\r\n");
            assert_eq!(c.send(bad_end), "", "{bad_end:?} ended DATA");
            assert!(c.session.expects_content());
        }
    }

    #[test]
    fn rejects_declared_size_over_limit() {
        let mut c = client();
        c.send(b"EHLO x\r\n");
        let reply = c.send(b"MAIL FROM:<a@x.org> SIZE=1001\r\n");
        assert_eq!(
            reply,
            "552 5.3.4 Message size exceeds fixed maximum message size\r\n"
        );
        assert_eq!(
            c.send(b"MAIL FROM:<a@x.org> SIZE=1000\r\n"),
            "250 2.1.0 Ok\r\n"
        );
    }

    #[test]
    fn rejects_oversized_body_after_data_ends() {
        let mut c = client();
        c.transaction();
        c.send(b"DATA\r\n");
        let mut body = Vec::new();
        for _ in 0..20 {
            body.extend_from_slice(&[b'x'; 98]);
            body.extend_from_slice(b"\r\n");
        }
        // Nothing is answered until the end of data arrives.
        assert_eq!(c.send(&body), "");
        let reply = c.send(b".\r\nNOOP\r\n");
        assert_eq!(
            reply,
            "552 5.3.4 Message size exceeds fixed maximum message size\r\n250 2.0.0 Ok\r\n"
        );
        assert!(c.stored.is_empty());
    }

    #[test]
    fn rejects_data_line_over_limit() {
        let mut c = client();
        c.transaction();
        c.send(b"DATA\r\n");
        let mut body = vec![b'x'; 199];
        body.extend_from_slice(b"\r\n.\r\n");
        let reply = c.send(&body);
        assert_eq!(
            reply,
            "500 5.5.2 Message rejected: line longer than 200 bytes\r\n"
        );
        assert!(c.stored.is_empty());
    }

    #[test]
    fn refuses_recipients_over_limit() {
        let mut c = client();
        c.send(b"EHLO x\r\nMAIL FROM:<a@x.org>\r\n");
        let reply = c.send(
            b"RCPT TO:<1@y.org>\r\nRCPT TO:<2@y.org>\r\nRCPT TO:<3@y.org>\r\nRCPT TO:<4@y.org>\r\n",
        );
        assert!(
            reply.ends_with("250 2.1.5 Ok\r\n452 4.5.3 Too many recipients\r\n"),
            "{reply}"
        );
        c.send(b"DATA\r\n");
        c.send(MESSAGE);
        assert_eq!(c.stored[0].recipients.len(), 3);
    }

    #[test]
    fn rejects_command_line_too_long() {
        let mut c = client();
        let mut line = b"NOOP ".to_vec();
        line.extend_from_slice(&[b'a'; 600]);
        line.extend_from_slice(b"\r\nNOOP\r\n");
        assert_eq!(c.send(&line), "500 5.5.2 Line too long\r\n250 2.0.0 Ok\r\n");
    }

    #[test]
    fn rejects_long_line_arriving_in_pieces_once() {
        let mut c = client();
        assert_eq!(c.send(&[b'a'; 400]), "");
        assert_eq!(c.send(&[b'a'; 400]), "500 5.5.2 Line too long\r\n");
        assert_eq!(c.send(&[b'a'; 400]), "");
        assert_eq!(c.send(b"aaa\r\nNOOP\r\n"), "250 2.0.0 Ok\r\n");
    }

    #[test]
    fn every_pipelined_command_of_one_read_is_answered() {
        let mut c = client();
        c.send(b"EHLO client.example\r\n");
        let lines = 100_000;
        let wire = c.send(&b"NOOP\r\n".repeat(lines));
        assert_eq!(wire.matches("250 2.0.0 Ok\r\n").count(), lines);
    }

    /// Consuming a line only moves the cursor (each line used to be drained from the front
    /// of the buffer, moving every byte after it: quadratic in the lines of one read); the
    /// consumed bytes go when the next read arrives.
    #[test]
    fn input_consumes_by_cursor_and_drops_consumed_bytes_on_the_next_read() {
        let mut input = Input::default();
        input.extend_from_slice(b"NOOP\r\nRSET\r\nQU");
        let base = input.buf.as_ptr();
        input.consume(6);
        assert_eq!(input.bytes(), b"RSET\r\nQU");
        assert_eq!(input.buf.len(), 14, "nothing moved or freed yet");
        assert_eq!(input.buf.as_ptr(), base);
        input.consume(6);
        assert_eq!(input.bytes(), b"QU");
        input.extend_from_slice(b"IT\r\n");
        assert_eq!(input.bytes(), b"QUIT\r\n");
        assert_eq!(input.start, 0);
        assert_eq!(input.buf, b"QUIT\r\n");
        input.consume(100);
        assert!(input.is_empty());
    }

    #[test]
    fn closes_after_too_many_errors() {
        let mut c = client();
        let reply = c.send(b"FOO\r\nFOO\r\nFOO\r\nFOO\r\nFOO\r\nFOO\r\nNOOP\r\n");
        assert_eq!(reply.matches("500 5.5.2").count(), 6);
        assert!(
            reply.ends_with("421 4.7.0 mx.test Error: too many errors\r\n"),
            "{reply}"
        );
        assert!(c.closed);
        assert!(!reply.contains("250"));
    }

    #[test]
    fn answers_unknown_command_with_500() {
        let mut c = client();
        assert_eq!(
            c.send(b"FOO bar\r\n"),
            "500 5.5.2 Syntax error, command unrecognized\r\n"
        );
    }

    #[test]
    fn answers_unimplemented_command_with_502() {
        let mut c = client();
        assert_eq!(
            c.send(b"EXPN list\r\n"),
            "502 5.5.1 Command not implemented\r\n"
        );
    }

    #[test]
    fn answers_bad_syntax_with_501() {
        let mut c = client();
        c.send(b"EHLO x\r\n");
        assert_eq!(
            c.send(b"MAIL FROM:a@x.org\r\n"),
            "501 5.5.4 Syntax: MAIL FROM:<reverse-path> [parameters]\r\n"
        );
    }

    #[test]
    fn refuses_mail_before_helo() {
        let mut c = client();
        assert_eq!(
            c.send(b"MAIL FROM:<a@x.org>\r\n"),
            "503 5.5.1 Send EHLO/HELO first\r\n"
        );
    }

    #[test]
    fn refuses_rcpt_before_mail() {
        let mut c = client();
        c.send(b"EHLO x\r\n");
        assert_eq!(
            c.send(b"RCPT TO:<a@x.org>\r\n"),
            "503 5.5.1 Need MAIL command\r\n"
        );
    }

    #[test]
    fn refuses_data_without_rcpt() {
        let mut c = client();
        c.send(b"EHLO x\r\nMAIL FROM:<a@x.org>\r\n");
        assert_eq!(c.send(b"DATA\r\n"), "503 5.5.1 Need RCPT command\r\n");
        assert!(!c.session.expects_content());
    }

    #[test]
    fn refuses_nested_mail() {
        let mut c = client();
        c.send(b"EHLO x\r\nMAIL FROM:<a@x.org>\r\n");
        assert_eq!(
            c.send(b"MAIL FROM:<b@x.org>\r\n"),
            "503 5.5.1 Nested MAIL command\r\n"
        );
    }

    #[test]
    fn rset_ends_transaction() {
        let mut c = client();
        c.transaction();
        assert_eq!(c.send(b"RSET\r\n"), "250 2.0.0 Ok\r\n");
        assert_eq!(c.send(b"DATA\r\n"), "503 5.5.1 Need MAIL command\r\n");
    }

    #[test]
    fn answers_noop_vrfy_help_quit() {
        let mut c = client();
        assert_eq!(c.send(b"NOOP\r\n"), "250 2.0.0 Ok\r\n");
        assert!(c.send(b"VRFY bob\r\n").starts_with("252 2.5.0 "));
        assert!(c.send(b"HELP\r\n").starts_with("214 2.0.0 "));
        assert_eq!(c.send(b"QUIT\r\nNOOP\r\n"), "221 2.0.0 Bye\r\n");
        assert!(c.closed);
    }

    #[test]
    fn refuses_relay_from_outside_networks() {
        let mut c = client_with(config(), "203.0.113.9", false);
        c.send(b"EHLO x\r\nMAIL FROM:<a@x.org>\r\n");
        assert_eq!(
            c.send(b"RCPT TO:<b@y.org>\r\n"),
            "554 5.7.1 Relay access denied\r\n"
        );
        assert!(!c.checks[0].relay_allowed);
        assert_eq!(c.send(b"DATA\r\n"), "503 5.5.1 Need RCPT command\r\n");
    }

    #[test]
    fn allows_relay_after_authentication() {
        let mut c = client_with(config(), "203.0.113.9", false);
        c.send(b"EHLO x\r\nSTARTTLS\r\n");
        c.session.tls_started("TLSv1_3".into());
        let plain = BASE64.encode(b"\0app\0secret");
        let reply = c.send(format!("EHLO x\r\nAUTH PLAIN {plain}\r\n").as_bytes());
        assert!(
            reply.ends_with("235 2.7.0 Authentication successful\r\n"),
            "{reply}"
        );
        c.send(b"MAIL FROM:<a@x.org>\r\n");
        assert_eq!(c.send(b"RCPT TO:<b@y.org>\r\n"), "250 2.1.5 Ok\r\n");
        assert!(c.checks[0].relay_allowed);
        assert_eq!(c.checks[0].auth_user.as_deref(), Some("app"));
        c.send(b"DATA\r\n");
        c.send(MESSAGE);
        let msg = &c.stored[0];
        assert_eq!(msg.auth_user.as_deref(), Some("app"));
        assert_eq!(msg.tls_version.as_deref(), Some("TLSv1_3"));
        assert!(String::from_utf8_lossy(&msg.body).contains("with ESMTPSA id"));
    }

    #[test]
    fn auth_login_exchange() {
        let mut c = client_with(config(), "127.0.0.1", true);
        c.send(b"EHLO x\r\n");
        assert_eq!(c.send(b"AUTH LOGIN\r\n"), "334 VXNlcm5hbWU6\r\n");
        let user = BASE64.encode(b"app");
        assert_eq!(
            c.send(format!("{user}\r\n").as_bytes()),
            "334 UGFzc3dvcmQ6\r\n"
        );
        let pass = BASE64.encode(b"secret");
        assert_eq!(
            c.send(format!("{pass}\r\n").as_bytes()),
            "235 2.7.0 Authentication successful\r\n"
        );
        assert_eq!(
            c.send(b"AUTH LOGIN\r\n"),
            "503 5.5.1 Already authenticated\r\n"
        );
    }

    #[test]
    fn auth_plain_without_initial_response_and_wrong_password() {
        let mut c = client_with(config(), "127.0.0.1", true);
        c.send(b"EHLO x\r\n");
        assert_eq!(c.send(b"AUTH PLAIN\r\n"), "334 \r\n");
        let bad = BASE64.encode(b"\0app\0wrong");
        assert_eq!(
            c.send(format!("{bad}\r\n").as_bytes()),
            "535 5.7.8 Authentication credentials invalid\r\n"
        );
    }

    /// Acting for another user (PLAIN's authzid) is not supported, and bytes that are not
    /// UTF-8 match no password: both go to the check as unusable (refused, counted and
    /// answered as late as a wrong password), not answered at once.
    #[test]
    fn an_exchange_that_cannot_succeed_is_still_checked_as_a_refusal() {
        let mut c = client_with(config(), "127.0.0.1", true);
        c.send(b"EHLO x\r\n");
        for token in [
            BASE64.encode(b"boss\0app\0secret"),
            BASE64.encode(b"\0app\0secr\xfft"),
        ] {
            assert_eq!(
                c.send(format!("AUTH PLAIN {token}\r\n").as_bytes()),
                "535 5.7.8 Authentication credentials invalid\r\n"
            );
        }
        // The same user as authzid is the user itself.
        let same = BASE64.encode(b"app\0app\0secret");
        assert_eq!(
            c.send(format!("AUTH PLAIN {same}\r\n").as_bytes()),
            "235 2.7.0 Authentication successful\r\n"
        );
        assert_eq!(c.unusable, [true, true, false]);
    }

    #[test]
    fn a_throttled_auth_is_a_temporary_failure() {
        let mut c = client_with(config(), "127.0.0.1", true);
        c.send(b"EHLO x\r\n");
        let token = BASE64.encode(b"\0app\0throttled");
        assert_eq!(
            c.send(format!("AUTH PLAIN {token}\r\n").as_bytes()),
            "454 4.7.0 Too many failed authentications from your address; try again later\r\n"
        );
        // Not authenticated: relaying still needs AUTH.
        let ok = BASE64.encode(b"\0app\0secret");
        assert_eq!(
            c.send(format!("AUTH PLAIN {ok}\r\n").as_bytes()),
            "235 2.7.0 Authentication successful\r\n"
        );
    }

    #[test]
    fn auth_cancel_and_bad_base64() {
        let mut c = client_with(config(), "127.0.0.1", true);
        c.send(b"EHLO x\r\n");
        c.send(b"AUTH LOGIN\r\n");
        assert_eq!(c.send(b"*\r\n"), "501 5.7.0 Authentication cancelled\r\n");
        assert_eq!(
            c.send(b"AUTH PLAIN !!!\r\n"),
            "501 5.5.2 Invalid base64 data\r\n"
        );
        assert_eq!(
            c.send(b"AUTH CRAM-MD5\r\n"),
            "504 5.5.4 Unrecognized authentication type\r\n"
        );
    }

    #[test]
    fn over_long_sasl_response_ends_the_exchange() {
        let mut c = client_with(config(), "127.0.0.1", true);
        c.send(b"EHLO x\r\n");
        c.send(b"AUTH LOGIN\r\n");
        let mut long = vec![b'Q'; 600];
        long.extend_from_slice(b"\r\nNOOP\r\n");
        assert_eq!(c.send(&long), "500 5.5.2 Line too long\r\n250 2.0.0 Ok\r\n");
    }

    #[test]
    fn refuses_auth_in_clear_text_from_remote_client() {
        let mut c = client_with(config(), "203.0.113.9", false);
        c.send(b"EHLO x\r\n");
        let plain = BASE64.encode(b"\0app\0secret");
        assert_eq!(
            c.send(format!("AUTH PLAIN {plain}\r\n").as_bytes()),
            "538 5.7.11 Encryption required for requested authentication mechanism\r\n"
        );
    }

    #[test]
    fn refuses_auth_when_no_users_configured() {
        let mut cfg = config();
        cfg.auth_available = false;
        let mut c = client_with(cfg, "127.0.0.1", true);
        assert!(!c.send(b"EHLO x\r\n").contains("AUTH"));
        assert_eq!(
            c.send(b"AUTH PLAIN AGFwcABzZWNyZXQ=\r\n"),
            "502 5.5.1 AUTH not available\r\n"
        );
    }

    #[test]
    fn starttls_with_a_parameter_is_a_syntax_error() {
        let mut c = client();
        c.send(b"EHLO x\r\n");
        assert_eq!(
            c.send(b"STARTTLS foo\r\n"),
            "501 5.5.4 Syntax: STARTTLS\r\n"
        );
        assert!(!c.starttls);
        assert_eq!(c.send(b"STARTTLS \r\n"), "220 2.0.0 Ready to start TLS\r\n");
    }

    #[test]
    fn starttls_discards_pipelined_commands_and_resets() {
        let mut c = client();
        c.send(b"EHLO x\r\nMAIL FROM:<a@x.org>\r\n");
        let reply = c.send(b"STARTTLS\r\nRCPT TO:<injected@y.org>\r\n");
        assert_eq!(reply, "220 2.0.0 Ready to start TLS\r\n");
        assert!(c.starttls);
        // Bytes that arrive before the handshake finishes are not commands either.
        assert_eq!(c.send(b"NOOP\r\n"), "");
        c.session.tls_started("TLSv1_3".into());
        assert!(c.checks.is_empty());
        // Post-banner state: EHLO needed again, the old transaction is gone.
        assert_eq!(
            c.send(b"MAIL FROM:<a@x.org>\r\n"),
            "503 5.5.1 Send EHLO/HELO first\r\n"
        );
        assert_eq!(c.send(b"STARTTLS\r\n"), "503 5.5.1 TLS already active\r\n");
    }

    #[test]
    fn stores_dsn_parameters() {
        let mut c = client();
        c.send(b"EHLO x\r\nMAIL FROM:<a@x.org> RET=HDRS ENVID=QQ+2B1 BODY=8BITMIME\r\n");
        let reply = c.send(b"RCPT TO:<b@y.org> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;b+2Bx@y.org\r\nRCPT TO:<c@y.org>\r\nDATA\r\n");
        assert!(
            reply.ends_with("354 End data with <CR><LF>.<CR><LF>\r\n"),
            "{reply}"
        );
        c.send(MESSAGE);
        let msg = &c.stored[0];
        assert_eq!(msg.ret, Some(DsnRet::Hdrs));
        assert_eq!(msg.envid.as_deref(), Some("QQ+1"));
        assert!(msg.eight_bit);
        let r = &msg.recipients[0];
        assert_eq!(r.orcpt.as_deref(), Some("rfc822;b+x@y.org"));
        assert_eq!(
            r.notify,
            Some(Notify {
                success: true,
                delay: true,
                ..Notify::default()
            })
        );
        assert_eq!(msg.recipients[1].notify, None);
        assert_eq!(msg.recipients[1].orcpt, None);
    }

    #[test]
    fn orcpt_of_any_address_type_and_up_to_500_characters_is_kept() {
        let long = format!("rfc822;{}@y.org", "a".repeat(480));
        for (param, kept) in [
            // `=` is no xchar: an X.400 address comes with it encoded.
            (
                "x400;c+3Dus;a+3D;p+3Dx;o+3Dy;s+3Dz".to_string(),
                "x400;c=us;a=;p=x;o=y;s=z".to_string(),
            ),
            (
                "RFC822;b+2Bx@y.org".to_string(),
                "rfc822;b+x@y.org".to_string(),
            ),
            (long.clone(), long.clone()),
        ] {
            // Room for a 500-character ORCPT (the default limit is 2048).
            let wide = SessionConfig {
                max_command_line: 2048,
                ..config()
            };
            let mut c = client_with(wide, "192.0.2.1", true);
            c.send(b"EHLO x\r\nMAIL FROM:<a@x.org>\r\n");
            let reply = c.send(
                format!("RCPT TO:<b@y.org> ORCPT={param} NOTIFY=FAILURE\r\nDATA\r\n").as_bytes(),
            );
            assert!(reply.starts_with("250 2.1.5"), "{param}: {reply}");
            c.send(MESSAGE);
            let r = &c.stored[0].recipients[0];
            assert_eq!(r.orcpt.as_deref(), Some(kept.as_str()));
            assert!(
                r.notify.is_some_and(|n| n.failure),
                "the parameter after it still read"
            );
        }
        for param in [
            format!("rfc822;{}@y.org", "a".repeat(500)),
            "noaddress".to_string(),
            "bad type;x@y.org".to_string(),
            ";x@y.org".to_string(),
            "rfc822;".to_string(),
        ] {
            // Room for a 500-character ORCPT (the default limit is 2048).
            let wide = SessionConfig {
                max_command_line: 2048,
                ..config()
            };
            let mut c = client_with(wide, "192.0.2.1", true);
            c.send(b"EHLO x\r\nMAIL FROM:<a@x.org>\r\n");
            let reply = c.send(format!("RCPT TO:<b@y.org> ORCPT={param}\r\n").as_bytes());
            assert!(reply.starts_with("501 5.5.4"), "{param}: {reply}");
        }
    }

    #[test]
    fn a_dsn_parameter_given_twice_is_refused() {
        for (line, param) in [
            ("MAIL FROM:<a@x.org> ENVID=a ENVID=b", "ENVID"),
            ("MAIL FROM:<a@x.org> RET=HDRS ret=FULL", "RET"),
            ("RCPT TO:<b@y.org> NOTIFY=SUCCESS NOTIFY=FAILURE", "NOTIFY"),
            (
                "RCPT TO:<b@y.org> ORCPT=rfc822;b@y.org ORCPT=rfc822;c@y.org",
                "ORCPT",
            ),
        ] {
            let mut c = client();
            c.send(b"EHLO x\r\n");
            if line.starts_with("RCPT") {
                c.send(b"MAIL FROM:<a@x.org>\r\n");
            }
            assert_eq!(
                c.send(format!("{line}\r\n").as_bytes()),
                format!("501 5.5.4 Duplicate {param} parameter\r\n"),
                "{line}"
            );
        }
    }

    #[test]
    fn xtext_that_is_not_rfc_3461_is_refused_not_rewritten() {
        let mut c = client();
        c.send(b"EHLO x\r\n");
        for envid in ["a+ZZb", "abc+", "a=b", "a+0a"] {
            let reply = c.send(format!("MAIL FROM:<a@x.org> ENVID={envid}\r\n").as_bytes());
            assert!(
                reply.starts_with("501 5.5.4 Bad ENVID parameter syntax (xtext"),
                "{envid}: {reply}"
            );
        }
        // A new session: five errors close one.
        let mut c = client();
        c.send(b"EHLO x\r\n");
        assert!(
            c.send(b"MAIL FROM:<a@x.org> ENVID=a+2Bb+2c!~\r\n")
                .starts_with("250")
        );
        for orcpt in [
            "rfc822;x+0D+0AX-Injected:+20yes@y.org",
            "rfc822;a+zzb@y.org",
            "rfc822;a=b@y.org",
        ] {
            let reply = c.send(format!("RCPT TO:<b@y.org> ORCPT={orcpt}\r\n").as_bytes());
            assert!(
                reply.starts_with("501 5.5.4 Bad ORCPT parameter syntax (xtext"),
                "{orcpt}: {reply}"
            );
        }
        let ok = c.send(b"RCPT TO:<b@y.org> ORCPT=rfc822;a+2Bb+3Dc@y.org\r\n");
        assert!(ok.starts_with("250"), "{ok}");
    }

    #[test]
    fn an_envid_that_is_no_printable_ascii_is_refused() {
        for envid in ["a+0D+0AX-Inj:+201", "a+1B[31m", "id+C3+A9"] {
            let mut c = client();
            c.send(b"EHLO x\r\n");
            let reply = c.send(format!("MAIL FROM:<a@x.org> ENVID={envid}\r\n").as_bytes());
            assert!(reply.starts_with("501 5.5.4 Bad ENVID"), "{envid}: {reply}");
        }
        let mut c = client();
        c.send(b"EHLO x\r\n");
        let reply = c.send(b"MAIL FROM:<a@x.org> ENVID=ok+20id\r\n");
        assert!(reply.starts_with("250"), "{reply}");
    }

    #[test]
    fn xtext_bytes_of_utf8_are_read_as_utf8() {
        let mut c = client();
        c.send(b"EHLO x\r\nMAIL FROM:<a@x.org> ENVID=id+2B1\r\n");
        let reply = c.send(b"RCPT TO:<b@y.org> ORCPT=rfc822;j+C3+B6rg@y.org\r\nDATA\r\n");
        assert!(
            reply.ends_with("354 End data with <CR><LF>.<CR><LF>\r\n"),
            "{reply}"
        );
        c.send(MESSAGE);
        let msg = &c.stored[0];
        assert_eq!(msg.envid.as_deref(), Some("id+1"));
        assert_eq!(
            msg.recipients[0].orcpt.as_deref(),
            Some("rfc822;j\u{f6}rg@y.org")
        );
        // Bytes that are no UTF-8 (Latin-1 `+F6`) stay the characters they were read as.
        assert_eq!(xtext_bytes_as_utf8("j\u{f6}rg"), "j\u{f6}rg");
    }

    #[test]
    fn rejects_invalid_recipient_address() {
        let mut c = client();
        c.send(b"EHLO x\r\nMAIL FROM:<a@x.org>\r\n");
        assert_eq!(
            c.send(b"RCPT TO:<nobody>\r\n"),
            "553 5.1.3 Bad recipient address syntax\r\n"
        );
        assert_eq!(
            c.send(b"RCPT TO:<a@@b>\r\n"),
            "553 5.1.3 Bad recipient address syntax\r\n"
        );
        assert_eq!(c.send(b"RCPT TO:<Postmaster>\r\n"), "250 2.1.5 Ok\r\n");
    }

    #[test]
    fn accepts_null_sender_and_rejects_bad_sender() {
        let mut c = client();
        c.send(b"EHLO x\r\n");
        assert_eq!(c.send(b"MAIL FROM:<>\r\n"), "250 2.1.0 Ok\r\n");
        c.send(b"RSET\r\n");
        assert_eq!(
            c.send(b"MAIL FROM:<nobody>\r\n"),
            "553 5.1.7 Bad sender address syntax\r\n"
        );
    }

    #[test]
    fn requires_smtputf8_for_non_ascii_addresses() {
        let mut c = client();
        c.send(b"EHLO x\r\n");
        assert_eq!(
            c.send("MAIL FROM:<jöran@x.org>\r\n".as_bytes()),
            "553 5.6.7 Non-ASCII address requires SMTPUTF8\r\n"
        );
        assert_eq!(
            c.send("MAIL FROM:<jöran@x.org> SMTPUTF8\r\n".as_bytes()),
            "250 2.1.0 Ok\r\n"
        );
        assert_eq!(
            c.send("RCPT TO:<åsa@y.org>\r\n".as_bytes()),
            "250 2.1.5 Ok\r\n"
        );
    }

    #[test]
    fn policy_can_preset_outcome_or_reject() {
        let mut c = client();
        c.policy = |check| match check.address.as_str() {
            "gone@y.org" => RecipientVerdict::AcceptWithOutcome(PresetOutcome {
                status: RecipientStatus::Suppressed,
                reason: "suppressed".into(),
                text: "address is suppressed".into(),
                bounce_type: "soft".into(),
                enhanced_status: None,
                accepted: true,
            }),
            "bad@nomx.org" => {
                RecipientVerdict::Reject(Reply::new(550, "5.1.2", "Domain has no mail server"))
            }
            _ => RecipientVerdict::Accept,
        };
        c.send(b"EHLO x\r\nMAIL FROM:<a@x.org>\r\n");
        assert_eq!(c.send(b"RCPT TO:<gone@y.org>\r\n"), "250 2.1.5 Ok\r\n");
        assert_eq!(
            c.send(b"RCPT TO:<bad@nomx.org>\r\n"),
            "550 5.1.2 Domain has no mail server\r\n"
        );
        c.send(b"DATA\r\n");
        c.send(MESSAGE);
        let r = &c.stored[0].recipients;
        assert_eq!(r.len(), 1);
        assert_eq!(
            r[0].preset.as_ref().unwrap().status,
            RecipientStatus::Suppressed
        );
    }

    #[test]
    fn records_recipients_refused_for_syntax_as_rejected() {
        let mut c = client();
        c.send(b"EHLO x\r\nMAIL FROM:<a@x.org>\r\n");
        assert_eq!(
            c.send(b"RCPT TO:<no-domain>\r\n"),
            "553 5.1.3 Bad recipient address syntax\r\n"
        );
        assert_eq!(c.send(b"RCPT TO:<ok@y.org>\r\n"), "250 2.1.5 Ok\r\n");
        c.send(b"DATA\r\n");
        c.send(MESSAGE);
        let r = &c.stored[0].recipients;
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].address, "ok@y.org");
        assert!(r[0].preset.is_none());
        assert_eq!(r[1].address, "no-domain");
        let preset = r[1].preset.as_ref().unwrap();
        assert_eq!(preset.status, RecipientStatus::Rejected);
        assert_eq!(preset.reason, "syntaxerror");
    }

    #[test]
    fn keeps_bounce_domain_recipients_in_their_own_transaction() {
        let mut c = client_with(config(), "203.0.113.9", false);
        c.policy = |check| {
            if check.address.ends_with("@bounces.test") {
                RecipientVerdict::AcceptInboundBounce
            } else {
                relay_only(check)
            }
        };
        c.send(b"EHLO x\r\nMAIL FROM:<>\r\n");
        assert_eq!(
            c.send(b"RCPT TO:<b+1@bounces.test>\r\n"),
            "250 2.1.5 Ok\r\n"
        );
        c.send(b"DATA\r\n");
        c.send(MESSAGE);
        assert!(c.stored[0].inbound_bounce);

        let mut c = client();
        c.policy = |check| {
            if check.address.ends_with("@bounces.test") {
                RecipientVerdict::AcceptInboundBounce
            } else {
                RecipientVerdict::Accept
            }
        };
        c.send(b"EHLO x\r\nMAIL FROM:<>\r\nRCPT TO:<a@y.org>\r\n");
        assert_eq!(
            c.send(b"RCPT TO:<b+1@bounces.test>\r\n"),
            "452 4.5.3 Send this recipient in a separate transaction\r\n"
        );
    }

    #[test]
    fn accepts_message_in_bdat_chunks() {
        let mut c = client();
        c.transaction();
        assert_eq!(
            c.send(b"BDAT 15\r\nSubject: x\r\n\r\n."),
            "250 2.0.0 Chunk received\r\n"
        );
        let reply = c.send(b"BDAT 4 LAST\r\nhi\r\nNOOP\r\n");
        let msg = &c.stored[0];
        assert_eq!(
            reply,
            format!(
                "250 2.0.0 Ok: queued as {}\r\n250 2.0.0 Ok\r\n",
                msg.receipt
            )
        );
        assert!(msg.body.ends_with(b"Subject: x\r\n\r\n.hi\r\n"));
    }

    #[test]
    fn bdat_chunk_split_across_reads() {
        let mut c = client();
        c.transaction();
        assert_eq!(c.send(b"BDAT 10 LAST\r\nSubj"), "");
        assert!(c.session.expects_content());
        let reply = c.send(b"ect:\r\n");
        assert!(reply.starts_with("250 2.0.0 Ok: queued as"), "{reply}");
    }

    #[test]
    fn bdat_without_transaction_consumes_chunk_then_refuses() {
        let mut c = client();
        c.send(b"EHLO x\r\n");
        assert_eq!(
            c.send(b"BDAT 6 LAST\r\nNOOP\r\nNOOP\r\n"),
            "503 5.5.1 Need MAIL command\r\n250 2.0.0 Ok\r\n"
        );
    }

    #[test]
    fn rejects_bare_lf_in_bdat() {
        let mut c = client();
        c.transaction();
        let reply = c.send(b"BDAT 4 LAST\r\na\nb\n");
        assert!(reply.starts_with("550 5.5.2"), "{reply}");
        assert!(c.stored.is_empty());
    }

    #[test]
    fn rejects_oversized_bdat_after_last_chunk() {
        let mut c = client();
        c.transaction();
        let mut chunk = b"BDAT 1200 LAST\r\n".to_vec();
        for _ in 0..12 {
            chunk.extend_from_slice(&[b'x'; 98]);
            chunk.extend_from_slice(b"\r\n");
        }
        assert_eq!(
            c.send(&chunk),
            "552 5.3.4 Message size exceeds fixed maximum message size\r\n"
        );
        assert!(c.stored.is_empty());
    }

    #[test]
    fn refuses_data_after_bdat() {
        let mut c = client();
        c.transaction();
        c.send(b"BDAT 3\r\nab\n");
        assert_eq!(
            c.send(b"DATA\r\n"),
            "503 5.5.1 DATA not allowed after BDAT\r\n"
        );
    }

    #[test]
    fn closes_on_tls_client_hello_on_plain_port() {
        let mut c = client();
        let reply = c.send(&[
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ]);
        assert_eq!(
            reply,
            "500 5.5.2 TLS handshake on a plain-text SMTP port\r\n"
        );
        assert!(c.closed);
    }

    #[test]
    fn survives_binary_garbage() {
        let mut c = client();
        let mut garbage = Vec::new();
        let mut x: u32 = 12345;
        for _ in 0..20_000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            garbage.push((x >> 16) as u8);
        }
        for chunk in garbage.chunks(97) {
            c.send(chunk);
        }
        assert!(c.stored.is_empty());
        assert!(c.closed, "garbage should exhaust max_errors");
    }

    #[test]
    fn random_protocol_fragments_never_panic_and_every_ack_is_stored() {
        const FRAGMENTS: &[&[u8]] = &[
            b"EHLO x\r\n",
            b"MAIL FROM:<a@x.org>\r\n",
            b"RCPT TO:<b@y.org>\r\n",
            b"DATA\r\n",
            b"BDAT 5\r\n",
            b"BDAT 3 LAST\r\n",
            b"hello\r\n",
            b".\r\n",
            b"\r\n.\r\n",
            b"\n.\n",
            b"\r",
            b"\n",
            b"..",
            b"RSET\r\n",
            b"STARTTLS\r\n",
            b"AUTH LOGIN\r\n",
            b"YXBw\r\n",
            b"NOOP\r\n",
            b"\x00\xff\x16\x03",
        ];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..300 {
            let mut c = client();
            c.session.config.max_errors = 1000;
            let mut stream = Vec::new();
            for _ in 0..40 {
                let i = (next() % FRAGMENTS.len() as u64) as usize;
                stream.extend_from_slice(FRAGMENTS[i]);
            }
            let mut rest = stream.as_slice();
            while !rest.is_empty() && !c.closed && !c.starttls {
                let n = 1 + (next() % 16) as usize;
                let (chunk, tail) = rest.split_at(n.min(rest.len()));
                c.send(chunk);
                rest = tail;
            }
            assert_eq!(c.wire.matches("queued as").count(), c.stored.len());
        }
    }

    #[test]
    fn stores_nothing_when_client_vanishes_mid_data() {
        let mut c = client();
        c.transaction();
        c.send(b"DATA\r\nSubject: x\r\n\r\npartial");
        assert!(c.session.expects_content());
        assert!(c.stored.is_empty());
    }

    #[test]
    fn timeout_sends_421_and_closes() {
        let mut c = client();
        let actions = c.session.timed_out();
        c.run(actions);
        assert!(
            c.wire
                .ends_with("421 4.4.2 mx.test Error: timeout exceeded\r\n")
        );
        assert!(c.closed);
    }

    #[test]
    fn shutdown_closes_idle_session_at_once() {
        let mut c = client();
        c.send(b"EHLO x\r\n");
        let actions = c.session.begin_shutdown();
        c.run(actions);
        assert!(c.wire.ends_with("421 4.3.2 Service shutting down\r\n"));
        assert!(c.closed);
    }

    #[test]
    fn shutdown_lets_transaction_in_flight_finish() {
        let mut c = client();
        c.transaction();
        let actions = c.session.begin_shutdown();
        assert!(actions.is_empty());
        let reply = c.send(b"DATA\r\nhello\r\n.\r\n");
        assert_eq!(c.stored.len(), 1);
        assert!(
            reply.ends_with(&format!(
                "250 2.0.0 Ok: queued as {}\r\n421 4.3.2 Service shutting down\r\n",
                c.stored[0].receipt
            )),
            "{reply}"
        );
        assert!(c.closed);
    }

    #[test]
    fn counts_only_5xx_replies_as_errors() {
        let mut cfg = config();
        cfg.max_recipients = 1;
        cfg.max_errors = 2;
        let mut c = client_with(cfg, "192.0.2.1", true);
        c.send(b"EHLO x\r\nMAIL FROM:<a@x.org>\r\nRCPT TO:<a@y.org>\r\n");
        for _ in 0..5 {
            assert_eq!(
                c.send(b"RCPT TO:<b@y.org>\r\n"),
                "452 4.5.3 Too many recipients\r\n"
            );
        }
        assert!(!c.closed);
    }

    #[test]
    fn accepts_empty_message() {
        let mut c = client();
        c.transaction();
        let reply = c.send(b"DATA\r\n.\r\n");
        assert!(reply.ends_with(&format!("queued as {}\r\n", c.stored[0].receipt)));
    }

    #[test]
    fn codes_helper_reads_final_lines() {
        let mut c = client();
        c.send(b"EHLO x\r\n");
        assert_eq!(c.codes(), vec!["220", "250"]);
    }
}
