//! The outbound SMTP session on `mail-send`'s [`SmtpClient`], driven command by command so that
//! every RCPT reply and the DATA reply are kept (its `send()` stops at the first rejected
//! recipient, which would lose outcomes).
//!
//! `mail-send`'s [`SmtpClient`] opens the connection and does the TLS handshake; every reply,
//! EHLO's and AUTH's included, is read by our bounded reader ([`super::reply`]), which keeps
//! multi-line texts (joined with `\n`, the enhanced status code kept once). A pipelined
//! group (RFC 2920) is read reply by reply ([`Connection::pipelined`]) because `mail-send`'s
//! `cmds` returns nothing when the server hangs up part-way, losing the replies that did
//! arrive.
//!
//! [`connect`] walks the targets (next MX on connect failure, timeout, 4xx before MAIL or a
//! 5xx greeting, which fails every recipient only when no other target failed temporarily;
//! a 5xx to EHLO/HELO applies to every recipient and stops the walk), does EHLO (HELO
//! fallback), STARTTLS per policy and AUTH. [`Connection::transaction`] sends MAIL, RCPT per
//! recipient and DATA or BDAT, pipelined when offered, and returns every reply it got.
//! [`per_recipient`] (pure) turns those replies into one result per recipient.

use std::borrow::Cow;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use mail_send::SmtpClient;
use mail_send::smtp::tls::build_tls_connector;
use smtp_proto::{
    AUTH_LOGIN, AUTH_PLAIN, EXT_8BIT_MIME, EXT_CHUNKING, EXT_DSN, EXT_PIPELINING, EXT_SIZE,
    EXT_SMTP_UTF8, EXT_START_TLS, EhloResponse,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::TlsPolicy;
use crate::spool::{DsnRet, Notify};
use crate::store::{HopFailure, Stage};

use super::dns::Target;

/// The byte stream under a session, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub use super::reply::Reply;
use super::reply::{self as reply_reader, ReplyParser};

/// Negotiated TLS parameters of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// `TLSv1_3`, `TLSv1_2`.
    pub version: String,
    pub cipher: String,
    /// The route verifies certificates, this server's did not verify, and the session runs
    /// encrypted without it ([`SessionSettings::unverified_fallback`]).
    pub unverified: bool,
}

impl TlsInfo {
    /// The version as recorded with the attempt, saying when the certificate did not verify.
    pub fn recorded_version(&self) -> String {
        if self.unverified {
            format!("{} (certificate not verified)", self.version)
        } else {
            self.version.clone()
        }
    }
}

/// A smarthost password; never printed.
#[derive(Clone)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// How to talk to one destination: TLS policy, certificates, credentials, timeouts.
#[derive(Clone)]
pub struct SessionSettings {
    /// Our EHLO name.
    pub helo_name: String,
    pub tls: TlsPolicy,
    pub implicit_tls: bool,
    pub tls_connector: TlsConnector,
    /// For an opportunistic route that verifies certificates: a connector that accepts any,
    /// for a second STARTTLS when the server's certificate did not verify. That session is
    /// encrypted but its peer unproven: marked [`TlsInfo::unverified`], and no password goes
    /// over it (but to loopback). Without it, as before 2026-12-04, a certificate that did not
    /// verify sent the mail in plain text: verification made things worse than none.
    pub unverified_fallback: Option<TlsConnector>,
    pub auth: Option<(String, Secret)>,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
}

impl std::fmt::Debug for SessionSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionSettings")
            .field("helo_name", &self.helo_name)
            .field("tls", &self.tls)
            .field("implicit_tls", &self.implicit_tls)
            .field("auth_user", &self.auth.as_ref().map(|a| &a.0))
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read CA file {path}: {message}")]
    CaFile { path: String, message: String },
    #[error("TLS setup: {0}")]
    Rustls(String),
}

/// A TLS connector: verifying against the web PKI roots plus `ca_file`, or accepting any
/// certificate (opportunistic MX TLS, where an unverified encrypted session beats plain text).
pub fn tls_connector(verify: bool, ca_file: Option<&Path>) -> Result<TlsConnector, TlsSetupError> {
    if !verify {
        return build_tls_connector(true).map_err(TlsSetupError::Rustls);
    }
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        let err = |e: String| TlsSetupError::CaFile {
            path: path.display().to_string(),
            message: e,
        };
        let certs = CertificateDer::pem_file_iter(path).map_err(|e| err(e.to_string()))?;
        let mut added = 0;
        for cert in certs {
            let cert = cert.map_err(|e| err(e.to_string()))?;
            roots.add(cert).map_err(|e| err(e.to_string()))?;
            added += 1;
        }
        if added == 0 {
            return Err(err("no PEM certificate in it".to_string()));
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TlsSetupError::Rustls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Why a session could not carry the transaction to its end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text}")]
pub struct SessionError {
    pub stage: Stage,
    /// The remote reply that ended it, if there was one.
    pub reply: Option<Reply>,
    /// What happened, for the record when there is no reply.
    pub text: String,
    /// A 5xx before MAIL: applies to every recipient; no other MX is tried, unless it was
    /// the greeting ([`SessionError::greeting_refused`]).
    pub permanent: bool,
    /// The server greeted with 5xx: it takes no mail, but another MX of the domain may
    /// (Postfix `smtp_skip_5xx_greeting`).
    pub greeting_refused: bool,
    pub remote_host: Option<String>,
    pub remote_ip: Option<IpAddr>,
    pub remote_port: Option<u16>,
    pub tls: Option<TlsInfo>,
    /// The STARTTLS handshake failed (the session is gone).
    pub tls_handshake_failed: bool,
    /// The session failed for want of TLS: a handshake that failed (implicit TLS or
    /// STARTTLS), or TLS required and not offered or refused. Its recipients' reason is
    /// `securityerror`, whatever the words.
    pub security: bool,
    /// ... because the server's certificate did not verify.
    pub certificate_refused: bool,
    /// The step of the session it failed at (`connect`, `tls`, `greeting`, `ehlo`, `helo`,
    /// `starttls`, `auth`), for the record of a hop left for the next one.
    pub step: &'static str,
    /// Targets [`connect`] tried and left before the one this error is about, in order.
    pub tried_first: Vec<HopFailure>,
}

impl SessionError {
    /// A failure at connection time with `text` and nothing else known: no reply, no TLS,
    /// temporary; the fields a particular failure knows are set over it.
    pub fn at_connect(text: String) -> Self {
        SessionError {
            stage: Stage::Connect,
            reply: None,
            text,
            permanent: false,
            greeting_refused: false,
            remote_host: None,
            remote_ip: None,
            remote_port: None,
            tls: None,
            tls_handshake_failed: false,
            security: false,
            certificate_refused: false,
            step: "connect",
            tried_first: Vec::new(),
        }
    }

    /// This failure as a hop left for the next one: its `host[ip]:port`, step, and reply
    /// or error text (without the hop's name, which it starts with).
    pub fn hop_failure(&self) -> HopFailure {
        let hop = match (&self.remote_host, self.remote_ip, self.remote_port) {
            (Some(h), Some(ip), Some(port)) => server_name(h, ip, port),
            (Some(h), _, _) => h.clone(),
            _ => "-".to_string(),
        };
        // The reply as it came; else the error, without the hop's name and the step's (the
        // record names both).
        let text = match &self.reply {
            Some(r) => r.display(),
            None => {
                let t = self
                    .text
                    .strip_prefix(hop.as_str())
                    .and_then(|t| t.strip_prefix(": "))
                    .unwrap_or(&self.text);
                let step = match self.step {
                    "tls" => "TLS handshake".to_string(),
                    "connect" => "connect".to_string(),
                    other => other.to_uppercase(),
                };
                t.strip_prefix(step.as_str())
                    .and_then(|t| t.strip_prefix(": "))
                    .unwrap_or(t)
                    .to_string()
            }
        };
        HopFailure {
            hop,
            step: self.step.to_string(),
            reply_code: self.reply.as_ref().map(|r| r.code),
            enhanced_status: self.reply.as_ref().and_then(|r| r.enhanced_status.clone()),
            text: HopFailure::bounded(&text),
        }
    }
}

/// An open, greeted session ready for MAIL.
pub struct Connection {
    client: SmtpClient<Box<dyn Io>>,
    pub host: String,
    pub ip: IpAddr,
    pub port: u16,
    pub tls: Option<TlsInfo>,
    capabilities: EhloResponse<String>,
    pub opened_at: Instant,
    command_timeout: Duration,
    /// Transactions completed on this connection (for reuse limits).
    pub transactions: u32,
    /// No transaction is open on the server: fresh after EHLO, and again after the final
    /// reply to the message (RFC 5321 §4.1.1.4 ends the transaction there, accepted or
    /// not). A transaction cut short before the message (MAIL refused, no recipient taken)
    /// leaves it false: RSET comes first on reuse.
    clean: bool,
    /// Bytes received after the last reply read (a pipelining server's next replies).
    pending: Vec<u8>,
    /// Targets [`connect`] tried and left before this one; the first transaction on the
    /// connection takes them for its record.
    pub tried_first: Vec<HopFailure>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("host", &self.host)
            .field("ip", &self.ip)
            .field("tls", &self.tls)
            .field("transactions", &self.transactions)
            .finish_non_exhaustive()
    }
}

/// Recipient of one transaction, with its DSN parameters.
#[derive(Debug, Clone)]
pub struct EnvelopeRecipient {
    pub address: String,
    pub notify: Option<Notify>,
    /// Decoded `addr-type;address`.
    pub orcpt: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Envelope {
    /// Reverse-path; empty = null sender.
    pub sender: String,
    pub recipients: Vec<EnvelopeRecipient>,
    pub ret: Option<DsnRet>,
    pub envid: Option<String>,
    pub eight_bit: bool,
    pub smtputf8: bool,
}

/// Every reply one transaction got. A `None` means the session ended (see `error`) before
/// that reply arrived.
#[derive(Debug, Clone, Default)]
pub struct TransactionReplies {
    pub mail: Option<Reply>,
    /// Aligned with the envelope's recipients.
    pub rcpt: Vec<Option<Reply>>,
    /// The DATA/BDAT outcome: the DATA command's reply when it was not 354, else the reply
    /// after the message.
    pub data: Option<Reply>,
    /// What cut the transaction short (timeout, connection lost).
    pub error: Option<String>,
    /// The transaction was not attempted because it cannot succeed on this peer (RFC 3463
    /// status and text): SMTPUTF8 needed but not offered (RFC 6531 §3.2, `5.6.7`), or the
    /// message larger than the peer's `SIZE` limit (RFC 1870 §6, `5.3.4`).
    pub refused_locally: Option<(&'static str, String)>,
}

impl TransactionReplies {
    /// The session broke before the server answered anything. The message itself is sent
    /// only after the replies to MAIL and RCPT, so it never reached the server, and the
    /// transaction can run again on another connection as if never tried.
    pub fn nothing_received(&self) -> bool {
        self.error.is_some() && self.mail.is_none()
    }
}

/// RFC 3461 §4 xtext: `+XX` for `+`, `=`, and anything outside `!`..`~`.
pub fn xtext(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// The DATA payload on the wire (RFC 5321 §4.5.2): a dot is doubled at the start of the body
/// and after every CR or LF (after a bare one too, so no receiver can read an end-of-data
/// where we meant none: SMTP smuggling), then `CRLF . CRLF`, adding the CRLF only if the
/// body does not already end with one. `mail-send`'s `write_message` is not used because it
/// always adds a CRLF (changing the message) and misses a dot at the very start.
pub fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 64 + 5);
    // A dot that starts a line (the body's first byte, or after CR or LF) gets another one.
    let mut copied = 0;
    for dot in memchr::memchr_iter(b'.', body) {
        let line_start = dot
            .checked_sub(1)
            .and_then(|i| body.get(i))
            .is_none_or(|b| *b == b'\n' || *b == b'\r');
        if line_start {
            out.extend_from_slice(body.get(copied..dot).unwrap_or_default());
            out.push(b'.');
            copied = dot;
        }
    }
    out.extend_from_slice(body.get(copied..).unwrap_or_default());
    if !body.is_empty() && !body.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// Longest line sent, CRLF not counted (RFC 5321 4.5.3.1.6: 1000 octets with it).
pub const MAX_LINE: usize = 998;

/// `body` with every line longer than [`MAX_LINE`] broken by inserting CRLF and a space,
/// as Postfix's `smtp_line_length_limit` does ("minimizes the damage to MIME formatted
/// mail": in a header field it is folding). mailtrail accepts lines up to
/// `[smtp] max_data_line`; sent on as they came, a 9,000-byte line broke the limit every
/// server may enforce, in relayed mail and in DSNs returning it.
pub fn line_limited(body: Cow<'_, [u8]>) -> Cow<'_, [u8]> {
    // The common case, no long line, found at memchr speed.
    let mut start = 0;
    let long = memchr::memchr_iter(b'\n', &body)
        .chain(std::iter::once(body.len()))
        .any(|end| {
            let line = body.get(start..end).unwrap_or_default();
            start = end + 1;
            line.strip_suffix(b"\r").unwrap_or(line).len() > MAX_LINE
        });
    if !long {
        return body;
    }
    let mut out = Vec::with_capacity(body.len() + body.len() / MAX_LINE * 3 + 3);
    for line in body.split_inclusive(|&b| b == b'\n') {
        let (text, end) = match line.strip_suffix(b"\r\n") {
            Some(text) => (text, &b"\r\n"[..]),
            None => (line, &b""[..]),
        };
        let (first, mut rest) = text.split_at(cut(text, MAX_LINE));
        out.extend_from_slice(first);
        while !rest.is_empty() {
            let (piece, more) = rest.split_at(cut(rest, MAX_LINE - 1));
            out.extend_from_slice(b"\r\n ");
            out.extend_from_slice(piece);
            rest = more;
        }
        out.extend_from_slice(end);
    }
    Cow::Owned(out)
}

/// Where to cut `text` to at most `max` bytes: not inside a UTF-8 character (a cut moves
/// back over up to three continuation bytes), except in bytes that are no UTF-8.
pub(crate) fn cut(text: &[u8], max: usize) -> usize {
    if text.len() <= max {
        return text.len();
    }
    let continuation = |i: usize| text.get(i).is_some_and(|b| (0x80..0xc0).contains(b));
    (max.saturating_sub(3)..=max)
        .rev()
        .find(|&at| at > 0 && !continuation(at))
        .unwrap_or(max)
}

/// `MAIL FROM:<...> [SIZE=] [BODY=8BITMIME] [SMTPUTF8] [RET=] [ENVID=]` per the peer's EHLO.
pub fn mail_command(env: &Envelope, size: usize, capabilities: u32) -> String {
    let mut cmd = format!("MAIL FROM:<{}>", env.sender);
    if capabilities & EXT_SIZE != 0 {
        cmd.push_str(&format!(" SIZE={size}"));
    }
    if env.eight_bit && capabilities & EXT_8BIT_MIME != 0 {
        cmd.push_str(" BODY=8BITMIME");
    }
    let needs_utf8 = env.smtputf8
        || !env.sender.is_ascii()
        || env.recipients.iter().any(|r| !r.address.is_ascii());
    if needs_utf8 && capabilities & EXT_SMTP_UTF8 != 0 {
        cmd.push_str(" SMTPUTF8");
    }
    if capabilities & EXT_DSN != 0 {
        match env.ret {
            Some(DsnRet::Full) => cmd.push_str(" RET=FULL"),
            Some(DsnRet::Hdrs) => cmd.push_str(" RET=HDRS"),
            None => {}
        }
        if let Some(envid) = &env.envid {
            cmd.push_str(&format!(" ENVID={}", xtext(envid)));
        }
    }
    cmd.push_str("\r\n");
    cmd
}

/// `RCPT TO:<...> [NOTIFY=] [ORCPT=]`, DSN parameters only when the peer offers DSN.
pub fn rcpt_command(r: &EnvelopeRecipient, capabilities: u32) -> String {
    let mut cmd = format!("RCPT TO:<{}>", r.address);
    if capabilities & EXT_DSN != 0 {
        if let Some(n) = r.notify {
            let p = n.to_param();
            if !p.is_empty() {
                cmd.push_str(&format!(" NOTIFY={p}"));
            }
        }
        if let Some(orcpt) = &r.orcpt
            && let Some((kind, addr)) = orcpt.split_once(';')
        {
            cmd.push_str(&format!(" ORCPT={};{}", kind.trim(), xtext(addr.trim())));
        }
    }
    cmd.push_str("\r\n");
    cmd
}

/// A next hop as Postfix names it (`relay=`): `host[ip]`, with `:port` when the port is not
/// 25, so that routes to several ports of one address can be told apart.
pub fn server_name(host: &str, ip: IpAddr, port: u16) -> String {
    match port {
        25 => format!("{host}[{ip}]"),
        _ => format!("{host}[{ip}]:{port}"),
    }
}

/// What ends a transaction whose server answered `421`.
const SESSION_ENDED: &str = "the server ended the session (421)";

/// A `421` closes the transmission channel (RFC 5321 §3.8), whatever command it answers:
/// nothing more is sent or read on that session.
fn ends_session(reply: &Reply) -> bool {
    reply.code == 421
}

/// Writes and flushes `wire`.
async fn send<S: AsyncWrite + Unpin + ?Sized>(stream: &mut S, wire: &[u8]) -> std::io::Result<()> {
    stream.write_all(wire).await?;
    stream.flush().await
}

/// The words for a failed write of a command.
fn send_failed(e: std::io::Error) -> String {
    format!("sending the command: {e}")
}

/// Sends `wire` and reads one reply with the bounded reader, all within `timeout`.
async fn command<S: AsyncRead + AsyncWrite + Unpin + ?Sized>(
    stream: &mut S,
    wire: &[u8],
    pending: &mut Vec<u8>,
    timeout: Duration,
) -> Result<Reply, String> {
    let exchange = async {
        send(stream, wire).await.map_err(send_failed)?;
        reply_reader::read(stream, pending)
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err("timeout waiting for the server".to_string()),
    }
}

/// EHLO, its reply read with the bounded reader: the reply and, when it is a `250`, the
/// extensions it names (none for any other code).
async fn ehlo<S: AsyncRead + AsyncWrite + Unpin + ?Sized>(
    stream: &mut S,
    helo_name: &str,
    timeout: Duration,
) -> Result<(Reply, EhloResponse<String>), String> {
    let mut parser = ReplyParser::ehlo();
    // Bytes after the reply, unasked for, go with this buffer (as with mail-send's reader).
    let mut pending = Vec::new();
    let exchange = async {
        send(stream, format!("EHLO {helo_name}\r\n").as_bytes())
            .await
            .map_err(send_failed)?;
        reply_reader::read_with(stream, &mut pending, &mut parser)
            .await
            .map_err(|e| e.to_string())
    };
    let reply = match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r?,
        Err(_) => return Err("timeout waiting for the server".to_string()),
    };
    Ok((reply, parser.capabilities()))
}

struct Greeted<T: AsyncRead + AsyncWrite + Unpin> {
    client: SmtpClient<T>,
    capabilities: EhloResponse<String>,
}

/// Why [`greet`] failed: the reply that ended it, what happened, and whether it was the
/// greeting itself that refused (another MX may take the mail then).
struct GreetError {
    /// `greeting`, `ehlo` or `helo`.
    step: &'static str,
    reply: Option<Reply>,
    text: String,
    at_greeting: bool,
}

impl From<(&'static str, Option<Reply>, String)> for GreetError {
    fn from((step, reply, text): (&'static str, Option<Reply>, String)) -> Self {
        Self {
            step,
            reply,
            text,
            at_greeting: false,
        }
    }
}

/// Reads the greeting and says EHLO (HELO when EHLO is refused with 5xx).
async fn greet<T: AsyncRead + AsyncWrite + Unpin>(
    mut client: SmtpClient<T>,
    helo_name: &str,
    read_banner: bool,
) -> Result<Greeted<T>, GreetError> {
    if read_banner {
        // Bytes a server sends after its greeting, unasked, are dropped with this buffer.
        let mut pending = Vec::new();
        let reply = tokio::time::timeout(
            client.timeout,
            reply_reader::read(&mut client.stream, &mut pending),
        )
        .await
        .map_err(|_| {
            (
                "greeting",
                None,
                "timeout waiting for the greeting".to_string(),
            )
        })?
        .map_err(|e| ("greeting", None, e.to_string()))?;
        if !reply.is_positive() {
            return Err(GreetError {
                step: "greeting",
                text: format!("greeting: {}", reply.display()),
                reply: Some(reply),
                at_greeting: true,
            });
        }
    }
    let timeout = client.timeout;
    let (reply, capabilities) = ehlo(&mut client.stream, helo_name, timeout)
        .await
        .map_err(|e| ("ehlo", None, format!("EHLO: {e}")))?;
    match reply.code {
        250 => Ok(Greeted {
            client,
            capabilities,
        }),
        500..=599 => {
            let reply = command(
                &mut client.stream,
                format!("HELO {helo_name}\r\n").as_bytes(),
                &mut Vec::new(),
                timeout,
            )
            .await
            .map_err(|e| ("helo", None, e))?;
            if !reply.is_positive() {
                let text = format!("HELO: {}", reply.display());
                return Err(("helo", Some(reply), text).into());
            }
            Ok(Greeted {
                client,
                capabilities: EhloResponse::default(),
            })
        }
        _ => {
            let text = format!("EHLO: {}", reply.display());
            Err(("ehlo", Some(reply), text).into())
        }
    }
}

fn tls_info(
    client: &SmtpClient<tokio_rustls::client::TlsStream<TcpStream>>,
    unverified: bool,
) -> TlsInfo {
    let conn = client.tls_connection();
    TlsInfo {
        unverified,
        version: conn
            .protocol_version()
            .map(|v| format!("{v:?}"))
            .unwrap_or_default(),
        cipher: conn
            .negotiated_cipher_suite()
            .map(|c| format!("{:?}", c.suite()))
            .unwrap_or_default(),
    }
}

/// Opens a session to the first target that takes it.
pub async fn connect(
    targets: &[Target],
    settings: &SessionSettings,
) -> Result<Connection, SessionError> {
    let mut last = SessionError::at_connect("no target to connect to".to_string());
    // Every failure, in the order tried: those before the session (or the error) returned
    // are its `tried_first`.
    let mut failed: Vec<HopFailure> = Vec::new();
    // A 5xx greeting, kept while the other targets are tried: the verdict only if no other
    // target failed for a reason that may pass. With the place of its entry in `failed`.
    let mut refused: Option<(SessionError, usize)> = None;
    // The place in `failed` of `last`'s entry (a refused greeting may come after it).
    let mut last_at: Option<usize> = None;
    for target in targets {
        let e = match connect_one(target, settings, false).await {
            Ok(mut c) => {
                c.tried_first = failed;
                return Ok(c);
            }
            Err(e) => e,
        };
        if e.greeting_refused {
            tracing::info!(host = %target.host, error = %e.text, "5xx greeting; next MX");
            failed.push(e.hop_failure());
            refused = Some((e, failed.len() - 1));
            continue;
        }
        if e.permanent {
            return Err(SessionError {
                tried_first: failed,
                ..e
            });
        }
        let e = match second_try(&e, settings) {
            Some((again, unverified)) => {
                tracing::info!(host = %target.host, error = %e.text, "TLS failed; trying the host again");
                failed.push(e.hop_failure());
                match connect_one(target, &again, unverified).await {
                    Ok(mut c) => {
                        c.tried_first = failed;
                        return Ok(c);
                    }
                    Err(e) if e.permanent => {
                        return Err(SessionError {
                            tried_first: failed,
                            ..e
                        });
                    }
                    Err(e) => e,
                }
            }
            None => e,
        };
        // At info level: the hop that answered is logged with the attempt, and this one
        // would be known from nowhere else.
        tracing::info!(host = %target.host, addr = %target.addr, error = %e.text, "next MX");
        failed.push(e.hop_failure());
        last_at = Some(failed.len() - 1);
        last = e;
    }
    // The error returned is the last temporary failure (a later 5xx greeting stays listed
    // among the others), else the refused greeting; its own entry leaves the list.
    match (last_at, refused) {
        (None, Some((r, at))) => {
            failed.remove(at);
            Err(SessionError {
                tried_first: failed,
                ..r
            })
        }
        (at, _) => {
            if let Some(at) = at {
                failed.remove(at);
            }
            Err(SessionError {
                tried_first: failed,
                ..last
            })
        }
    }
}

/// How to try the same host again after an opportunistic STARTTLS failed, and whether that
/// session's TLS is unverified: a certificate that did not verify (a route that verifies)
/// gets TLS without verification, never plain text (Postfix's `may` does not verify at
/// all); a handshake that broke otherwise gets plain text, as Postfix does, rather than
/// never delivering to a peer whose TLS stack cannot talk to ours.
fn second_try(e: &SessionError, s: &SessionSettings) -> Option<(SessionSettings, bool)> {
    if !e.tls_handshake_failed || s.tls != TlsPolicy::Opportunistic {
        return None;
    }
    Some(match (&s.unverified_fallback, e.certificate_refused) {
        (Some(any_certificate), true) => (
            SessionSettings {
                tls_connector: any_certificate.clone(),
                unverified_fallback: None,
                ..s.clone()
            },
            true,
        ),
        _ => (
            SessionSettings {
                tls: TlsPolicy::None,
                ..s.clone()
            },
            false,
        ),
    })
}

/// `unverified`: `s.tls_connector` accepts any certificate because the verifying one
/// refused this server's (the session's TLS is marked so).
async fn connect_one(
    target: &Target,
    s: &SessionSettings,
    unverified: bool,
) -> Result<Connection, SessionError> {
    let fail = |step: &'static str, reply: Option<Reply>, text: String, tls: Option<TlsInfo>| {
        let permanent = reply.as_ref().is_some_and(|r| (500..600).contains(&r.code));
        SessionError {
            step,
            reply,
            permanent,
            remote_host: Some(target.host.clone()),
            remote_ip: Some(target.addr.ip()),
            remote_port: Some(target.addr.port()),
            tls,
            ..SessionError::at_connect(format!(
                "{}: {text}",
                server_name(&target.host, target.addr.ip(), target.addr.port())
            ))
        }
    };
    let mut tcp = SmtpClient::connect(target.addr, s.connect_timeout)
        .await
        .map_err(|e| fail("connect", None, format!("connect: {e}"), None))?;
    tcp.timeout = s.command_timeout;

    let (client, capabilities, tls): (SmtpClient<Box<dyn Io>>, _, _) = if s.implicit_tls {
        let tls_client = tcp
            .into_tls(&s.tls_connector, &target.host)
            .await
            .map_err(|e| SessionError {
                security: true,
                ..fail("tls", None, format!("TLS handshake: {e}"), None)
            })?;
        let info = tls_info(&tls_client, false);
        let g = greet(tls_client, &s.helo_name, true)
            .await
            .map_err(|e| greet_failed(fail, e, Some(info.clone())))?;
        (boxed(g.client), g.capabilities, Some(info))
    } else {
        let g = greet(tcp, &s.helo_name, true)
            .await
            .map_err(|e| greet_failed(fail, e, None))?;
        let offers_tls = g.capabilities.has_capability(EXT_START_TLS);
        if s.tls == TlsPolicy::None || (!offers_tls && s.tls == TlsPolicy::Opportunistic) {
            (boxed(g.client), g.capabilities, None)
        } else if !offers_tls {
            return Err(SessionError {
                security: true,
                ..fail(
                    "starttls",
                    None,
                    "TLS is required for this route but the server does not offer STARTTLS"
                        .to_string(),
                    None,
                )
            });
        } else {
            let mut client = g.client;
            // RFC 3207 §4: what the server sends after its 220 and before the handshake
            // (an injection by a man in the middle) goes with this buffer, unread.
            let reply = command(
                &mut client.stream,
                b"STARTTLS\r\n",
                &mut Vec::new(),
                s.command_timeout,
            )
            .await
            .map_err(|t| fail("starttls", None, format!("STARTTLS: {t}"), None))?;
            if !reply.is_positive() {
                if s.tls == TlsPolicy::Required {
                    let text = format!("STARTTLS refused: {}", reply.display());
                    // A refused STARTTLS is never a reason to give up on the recipients.
                    let mut e = fail("starttls", Some(reply), text, None);
                    e.permanent = false;
                    e.security = true;
                    return Err(e);
                }
                (boxed(client), g.capabilities, None)
            } else {
                let tls_client = client
                    .into_tls(&s.tls_connector, &target.host)
                    .await
                    .map_err(|e| {
                        let mut err = fail("tls", None, format!("TLS handshake: {e}"), None);
                        err.tls_handshake_failed = true;
                        err.security = true;
                        err.certificate_refused = matches!(
                            &e,
                            mail_send::Error::Tls(t) if matches!(
                                **t,
                                rustls::Error::InvalidCertificate(_)
                                    | rustls::Error::NoCertificatesPresented
                            )
                        );
                        err
                    })?;
                let info = tls_info(&tls_client, unverified);
                // RFC 3207 §4.2: forget what was learnt before TLS and ask again.
                let g = greet(tls_client, &s.helo_name, false)
                    .await
                    .map_err(|e| greet_failed(fail, e, Some(info.clone())))?;
                (boxed(g.client), g.capabilities, Some(info))
            }
        }
    };
    let mut conn = Connection {
        client,
        host: target.host.clone(),
        ip: target.addr.ip(),
        port: target.addr.port(),
        tls,
        capabilities,
        opened_at: Instant::now(),
        command_timeout: s.command_timeout,
        transactions: 0,
        clean: true,
        pending: Vec::new(),
        tried_first: Vec::new(),
    };
    if let Some((user, secret)) = &s.auth {
        let trusted_tls = conn.tls.as_ref().is_some_and(|t| !t.unverified);
        if !may_send_password(trusted_tls, conn.ip) {
            // As Postfix's smtp_sasl_security_options = noplaintext: a password never
            // crosses a network in clear (route tls = "opportunistic" and no STARTTLS), nor
            // to a server whose certificate did not verify.
            let why = if conn.tls.is_some() {
                "whose certificate did not verify"
            } else {
                "offered no TLS"
            };
            let text = format!(
                "AUTH not sent: {} {why}, and the password goes only over verified TLS or \
                 to a loopback next hop (set tls = \"required\" on the route to insist, \
                 ca_file for a private CA)",
                conn.host
            );
            let mut err = fail("auth", None, text, None);
            err.permanent = false;
            return Err(err);
        }
        if let Err((reply, text)) = conn.authenticate(user, secret).await {
            let mut err = fail("auth", reply, format!("AUTH: {text}"), conn.tls.clone());
            // Failed authentication is a local configuration matter: defer, as Postfix's
            // smtp_sasl_auth_soft_bounce does, rather than bounce the mail.
            err.permanent = false;
            return Err(err);
        }
    }
    Ok(conn)
}

/// The session error of a [`greet`] that failed, marked when the greeting itself refused.
fn greet_failed(
    fail: impl Fn(&'static str, Option<Reply>, String, Option<TlsInfo>) -> SessionError,
    e: GreetError,
    tls: Option<TlsInfo>,
) -> SessionError {
    let mut err = fail(e.step, e.reply, e.text, tls);
    err.greeting_refused = err.permanent && e.at_greeting;
    err
}

/// AUTH PLAIN's response (RFC 4616): base64 of an empty authzid, the user and the password.
fn plain_response(user: &str, password: &str) -> String {
    BASE64.encode(format!("\0{user}\0{password}"))
}

/// How one AUTH exchange ended when it did not succeed.
enum AuthError {
    /// The server said no.
    Refused(Reply),
    /// The session broke, or a challenge could not be answered.
    Broken(String),
}

/// The forms of the password that go on the wire, to be kept out of what is recorded: a
/// server that echoes what it got would put them in its reply text.
struct Hidden(Vec<String>);

impl Hidden {
    fn of(user: &str, password: &str) -> Self {
        // The password, PLAIN's initial response and LOGIN's answer to its second challenge.
        let mut forms = vec![
            password.to_string(),
            plain_response(user, password),
            BASE64.encode(password),
        ];
        forms.retain(|f| !f.is_empty());
        Self(forms)
    }

    fn text(&self, mut text: String) -> String {
        for form in &self.0 {
            if text.contains(form.as_str()) {
                text = text.replace(form.as_str(), "[password removed]");
            }
        }
        text
    }

    fn reply(&self, reply: Reply) -> Reply {
        Reply {
            text: self.text(reply.text),
            ..reply
        }
    }
}

/// A message's header block: up to its first empty line (all of it when there is none).
fn header_block(message: &[u8]) -> &[u8] {
    memchr::memmem::find(message, b"\r\n\r\n").map_or(message, |end| &message[..end])
}

/// Whether AUTH may send a password on this connection: inside TLS, or in clear only to a
/// next hop on this machine (a local Postfix), as the inbound side offers AUTH.
fn may_send_password(tls: bool, ip: IpAddr) -> bool {
    tls || ip.is_loopback()
}

fn boxed<T: Io + 'static>(c: SmtpClient<T>) -> SmtpClient<Box<dyn Io>> {
    SmtpClient {
        stream: Box::new(c.stream),
        timeout: c.timeout,
    }
}

impl Connection {
    /// AUTH PLAIN (with the initial response, RFC 4954 §4), else LOGIN, whichever the server
    /// offers, every reply read with the bounded reader. PLAIN refused with anything but
    /// `535` (bad credentials) tries LOGIN, as `mail-send` did. The password is in no text
    /// this returns: a reply that echoes it (or its base64) has it replaced.
    async fn authenticate(
        &mut self,
        user: &str,
        secret: &Secret,
    ) -> Result<(), (Option<Reply>, String)> {
        let hidden = Hidden::of(user, &secret.0);
        let offered = self.capabilities.auth_mechanisms;
        let mut refused = None;
        for mechanism in [AUTH_PLAIN, AUTH_LOGIN] {
            if offered & mechanism == 0 {
                continue;
            }
            match self.auth(mechanism, user, &secret.0).await {
                Ok(()) => return Ok(()),
                Err(AuthError::Refused(reply)) => {
                    let reply = hidden.reply(reply);
                    let last = reply.code == 535;
                    refused = Some(reply);
                    if last {
                        break;
                    }
                }
                Err(AuthError::Broken(text)) => return Err((None, hidden.text(text))),
            }
        }
        Err(match refused {
            Some(reply) => {
                let text = reply.display();
                (Some(reply), text)
            }
            None => (
                None,
                "the server offers neither AUTH PLAIN nor AUTH LOGIN".to_string(),
            ),
        })
    }

    /// One AUTH exchange, `235` ending it. PLAIN sends everything in its initial response
    /// (and once more to a `334` asking for it); LOGIN answers the first challenge (`334`)
    /// with the user name and the second with the password, whatever their prompts say (as
    /// Python's smtplib does: servers word them differently). A server that asks for more gets `*`, which cancels the exchange (RFC
    /// 4954 §4), and the text of its extra challenge is recorded nowhere: it is the
    /// server's to choose, and can echo what it got.
    async fn auth(&mut self, mechanism: u64, user: &str, password: &str) -> Result<(), AuthError> {
        let timeout = self.command_timeout;
        let (name, first, answers) = if mechanism == AUTH_PLAIN {
            // A server that ignores the initial response asks for it with a 334: it gets
            // it once more (as smtplib answers), a second 334 gets `*`.
            let response = plain_response(user, password);
            let first = format!("AUTH PLAIN {response}\r\n");
            ("PLAIN", first, vec![response])
        } else {
            let answers = vec![BASE64.encode(user), BASE64.encode(password)];
            ("LOGIN", "AUTH LOGIN\r\n".to_string(), answers)
        };
        let mut reply = self
            .command(first.as_bytes(), timeout)
            .await
            .map_err(AuthError::Broken)?;
        let mut answers = answers.into_iter();
        loop {
            match reply.code {
                235 => return Ok(()),
                334 => {
                    let Some(answer) = answers.next() else {
                        return Err(self.cancel_auth(name).await);
                    };
                    reply = self
                        .command(format!("{answer}\r\n").as_bytes(), timeout)
                        .await
                        .map_err(AuthError::Broken)?;
                }
                _ => return Err(AuthError::Refused(reply)),
            }
        }
    }

    /// Ends an AUTH exchange the server went on with (`*`, RFC 4954 §4) and says why.
    async fn cancel_auth(&mut self, mechanism: &str) -> AuthError {
        let _ = self.command(b"*\r\n", self.command_timeout).await;
        AuthError::Broken(format!(
            "{mechanism} exchange cancelled: the server asked for more than the credentials \
             (another 334)"
        ))
    }

    /// The server as Postfix names it: `host[ip]`, `host[ip]:port` off port 25.
    pub fn server(&self) -> String {
        server_name(&self.host, self.ip, self.port)
    }

    pub fn capabilities(&self) -> u32 {
        self.capabilities.capabilities
    }

    pub fn offers_dsn(&self) -> bool {
        self.capabilities.has_capability(EXT_DSN)
    }

    /// MAIL, RCPT per recipient, DATA/BDAT. Returns every reply received; on a broken
    /// session the missing replies are `None` and `error` says why. A connection whose
    /// `error` is set must be dropped.
    pub async fn transaction(
        &mut self,
        env: &Envelope,
        body: &[u8],
        data_timeout: Duration,
    ) -> TransactionReplies {
        let caps = self.capabilities.capabilities;
        let mut out = TransactionReplies {
            rcpt: vec![None; env.recipients.len()],
            ..Default::default()
        };
        let utf8_addresses =
            !env.sender.is_ascii() || env.recipients.iter().any(|r| !r.address.is_ascii());
        // RFC 6531 3.4: mail that came with SMTPUTF8 and has UTF-8 in its header fields
        // needs it of the next hop too (Postfix bounces it the same way); without the
        // request, 8-bit header bytes are the client's own affair and go as they came.
        let utf8_header = env.smtputf8 && !header_block(body).is_ascii();
        if (utf8_addresses || utf8_header) && caps & EXT_SMTP_UTF8 == 0 {
            let what = if utf8_addresses {
                "the non-ASCII addresses of this message need"
            } else {
                "the UTF-8 header fields of this message (sent with SMTPUTF8) need"
            };
            out.refused_locally = Some((
                "5.6.7",
                format!("{} does not support SMTPUTF8, which {what}", self.host),
            ));
            return out;
        }
        // RFC 6152 §3: 8-bit content reaches a server without 8BITMIME only converted.
        let body = if caps & EXT_8BIT_MIME == 0 {
            super::downgrade::to_7bit(body, caps & EXT_SMTP_UTF8 != 0)
        } else {
            Cow::Borrowed(body)
        };
        let body = line_limited(body);
        let body = &body[..];
        // RFC 1870 §6: a message larger than the server's fixed limit (`SIZE N`, N > 0; a
        // bare `SIZE` or `SIZE 0` sets none) is not offered to it. Measured as it goes out,
        // converted and line-limited, which is what MAIL's SIZE= declares.
        let limit = self.capabilities.size;
        if caps & EXT_SIZE != 0 && limit > 0 && body.len() > limit {
            out.refused_locally = Some((
                "5.3.4",
                format!(
                    "message size {} exceeds size limit {limit} of server {}",
                    body.len(),
                    self.server()
                ),
            ));
            return out;
        }
        self.clean = false;
        let chunking = caps & EXT_CHUNKING != 0;
        let mut commands = vec![mail_command(env, body.len(), caps)];
        commands.extend(env.recipients.iter().map(|r| rcpt_command(r, caps)));
        let pipelined_data = caps & EXT_PIPELINING != 0 && !chunking;
        if pipelined_data {
            commands.push("DATA\r\n".to_string());
        }

        let replies: Vec<Reply> = if caps & EXT_PIPELINING != 0 {
            let (got, error) = self.pipelined(&commands).await;
            out.error = error;
            got
        } else {
            let mut got = Vec::new();
            for (i, c) in commands.iter().enumerate() {
                match self.command(c.as_bytes(), self.command_timeout).await {
                    Ok(reply) => {
                        let ended = ends_session(&reply);
                        let stop = i == 0 && !reply.is_positive();
                        got.push(reply);
                        if ended {
                            out.error = Some(SESSION_ENDED.to_string());
                            break;
                        }
                        if stop {
                            break;
                        }
                    }
                    Err(e) => {
                        out.error = Some(e);
                        break;
                    }
                }
            }
            got
        };
        let mut it = replies.into_iter();
        out.mail = it.next();
        if out.error.is_some() && out.mail.is_none() {
            return out;
        }
        for slot in out.rcpt.iter_mut() {
            *slot = it.next();
        }
        let data_cmd_reply = if pipelined_data { it.next() } else { None };
        if out.error.is_some() {
            // A pipelined DATA answered 421: the reply every pending recipient gets, as
            // when DATA goes alone.
            out.data = data_cmd_reply.filter(ends_session);
            return out;
        }
        let mail_ok = out.mail.as_ref().is_some_and(Reply::is_positive);
        let any_rcpt = out.rcpt.iter().flatten().any(Reply::is_positive);
        if !mail_ok || !any_rcpt {
            if let Some(r) = data_cmd_reply
                && r.code == 354
            {
                // RFC 2920 §3.1: DATA was accepted though no recipient was; end it empty.
                let _ = self.command(b".\r\n", data_timeout).await;
            }
            return out;
        }

        // `ended`: the reply came after the message and closed the transaction (RFC 5321
        // 4.1.1.4). A DATA command refused before the message (a 451 greylisting at DATA)
        // or a failed BDAT leaves it open: the next transaction on this connection starts
        // with RSET, or its MAIL meets "503 nested MAIL command".
        let (result, ended) = if chunking {
            let r = self.bdat(body, data_timeout).await;
            let ended = r.as_ref().is_ok_and(Reply::is_positive);
            (r, ended)
        } else {
            let start = match data_cmd_reply {
                Some(r) => Ok(r),
                None => self.command(b"DATA\r\n", self.command_timeout).await,
            };
            match start {
                Ok(r) if r.code == 354 => (self.dot_stuffed(body, data_timeout).await, true),
                // RFC 5321 §4.1.1.4: only 354 asks for the message; a 2xx here (or an RCPT's
                // 250 in the DATA slot of a server answering out of order) took nothing,
                // and recording it as delivered would be the one lie a mail log must not tell.
                Ok(r) if r.is_positive() => (
                    Err(format!(
                        "DATA answered {} instead of 354: the message was not sent",
                        r.display()
                    )),
                    false,
                ),
                other => (other, false),
            }
        };
        match result {
            // The server closes after it (RFC 5321 §3.8): the connection is not reused.
            Ok(r) if ends_session(&r) => {
                out.data = Some(r);
                out.error = Some(SESSION_ENDED.to_string());
            }
            Ok(r) => out.data = Some(r),
            Err(e) => out.error = Some(e),
        }
        if out.error.is_none() {
            self.transactions += 1;
            self.clean = ended;
        }
        out
    }

    /// Sends a pipelined group (RFC 2920) and reads its replies in order with `smtp-proto`'s
    /// parser directly: `mail-send`'s `cmds` returns nothing when the group is cut short
    /// (e.g. `421` to MAIL, then the server hangs up), which would lose the replies that did
    /// arrive. Returns the replies received and what ended the group early, if anything.
    pub(crate) async fn pipelined(&mut self, commands: &[String]) -> (Vec<Reply>, Option<String>) {
        let stream = &mut self.client.stream;
        let mut wire = Vec::new();
        for c in commands {
            wire.extend_from_slice(c.as_bytes());
        }
        let deadline = tokio::time::Instant::now() + self.command_timeout;
        let write = async {
            stream.write_all(&wire).await?;
            stream.flush().await
        };
        match tokio::time::timeout_at(deadline, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return (Vec::new(), Some(format!("sending commands: {e}"))),
            Err(_) => return (Vec::new(), Some("timeout sending commands".to_string())),
        }
        let mut out = Vec::with_capacity(commands.len());
        while out.len() < commands.len() {
            let read = reply_reader::read(stream.as_mut(), &mut self.pending);
            match tokio::time::timeout_at(deadline, read).await {
                Ok(Ok(reply)) if ends_session(&reply) => {
                    // The replies after it will never come: the server closes now.
                    out.push(reply);
                    return (out, Some(SESSION_ENDED.to_string()));
                }
                Ok(Ok(reply)) => out.push(reply),
                Ok(Err(e)) => return (out, Some(e.to_string())),
                Err(_) => return (out, Some("timeout waiting for the server".to_string())),
            }
        }
        (out, None)
    }

    async fn dot_stuffed(&mut self, body: &[u8], data_timeout: Duration) -> Result<Reply, String> {
        let wire = dot_stuff(body);
        self.message(&wire, data_timeout, "after end of data").await
    }

    async fn bdat(&mut self, body: &[u8], data_timeout: Duration) -> Result<Reply, String> {
        let mut wire = format!("BDAT {} LAST\r\n", body.len()).into_bytes();
        wire.extend_from_slice(body);
        self.message(&wire, data_timeout, "after BDAT").await
    }

    /// Sends the message and reads its final reply, both within `timeout`. A failure while
    /// sending is told apart from one after the end (as Postfix's "lost connection while
    /// sending message body" and "... after end of data"): only the second can mean that
    /// the server has the message.
    async fn message(
        &mut self,
        wire: &[u8],
        timeout: Duration,
        after: &str,
    ) -> Result<Reply, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let stream = &mut self.client.stream;
        match tokio::time::timeout_at(deadline, send(stream, wire)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("sending the message: {e}")),
            Err(_) => return Err("sending the message: timeout".to_string()),
        }
        match tokio::time::timeout_at(deadline, reply_reader::read(stream, &mut self.pending)).await
        {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => Err(format!("{after}: {e}")),
            Err(_) => Err(format!("{after}: timeout waiting for the server")),
        }
    }

    /// Sends `wire` and reads one reply, all within `timeout`.
    async fn command(&mut self, wire: &[u8], timeout: Duration) -> Result<Reply, String> {
        command(&mut self.client.stream, wire, &mut self.pending, timeout).await
    }

    /// Readies the connection for its next transaction: RSET when the last one was cut
    /// short before the message, nothing otherwise (the final reply to the message ended it;
    /// one round trip per reused message saved). False when the session is no longer usable.
    /// A connection the server closed while idle shows up in the next transaction as an
    /// error before any reply ([`TransactionReplies::nothing_received`]).
    pub async fn ready(&mut self) -> bool {
        self.clean || self.rset().await
    }

    /// RSET; false when the session is no longer usable.
    pub async fn rset(&mut self) -> bool {
        let ok = matches!(
            self.command(b"RSET\r\n", self.command_timeout).await,
            Ok(r) if r.is_positive()
        );
        self.clean = ok;
        ok
    }

    /// Polite close; errors do not matter any more.
    pub async fn quit(&mut self) {
        let _ = self.command(b"QUIT\r\n", self.command_timeout).await;
    }
}

/// What one transaction meant for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientResult {
    pub stage: Stage,
    pub reply: Option<Reply>,
    /// The reply text, or the local description when there is no reply.
    pub text: String,
    /// A permanent failure decided here without a reply, with its RFC 3463 status.
    pub local_permanent: Option<&'static str>,
    /// The positive RCPT reply of a recipient decided at DATA (recorded beside it).
    pub rcpt_reply: Option<Reply>,
}

/// Pairs each recipient with the reply that decides it: a failed MAIL (or no MAIL reply)
/// applies to all; a non-2xx RCPT reply to its recipient; the DATA reply to every accepted
/// recipient. A `421` to an RCPT ends the session (RFC 5321 §3.8), so it is the reply of
/// every recipient still pending then: those after it, whose replies never came, and those
/// accepted before it, whose message was never sent. Another missing reply is a temporary
/// failure described by `error`.
pub fn per_recipient(t: &TransactionReplies) -> Vec<RecipientResult> {
    let lost = t
        .error
        .clone()
        .unwrap_or_else(|| "no reply from server".to_string());
    let from_reply = |stage, r: &Reply| RecipientResult {
        stage,
        reply: Some(r.clone()),
        text: r.text.clone(),
        local_permanent: None,
        rcpt_reply: None,
    };
    let missing = |stage| RecipientResult {
        stage,
        reply: None,
        text: lost.clone(),
        local_permanent: None,
        rcpt_reply: None,
    };
    if let Some((status, text)) = &t.refused_locally {
        return t
            .rcpt
            .iter()
            .map(|_| RecipientResult {
                stage: Stage::Mail,
                reply: None,
                text: text.clone(),
                local_permanent: Some(status),
                rcpt_reply: None,
            })
            .collect();
    }
    let ended_at_rcpt = t.rcpt.iter().flatten().find(|r| ends_session(r));
    t.rcpt
        .iter()
        .map(|rcpt| match &t.mail {
            None => missing(Stage::Mail),
            Some(m) if !m.is_positive() => from_reply(Stage::Mail, m),
            Some(_) => match rcpt {
                None => match ended_at_rcpt {
                    Some(r) => from_reply(Stage::Rcpt, r),
                    None => missing(Stage::Rcpt),
                },
                Some(r) if !r.is_positive() => from_reply(Stage::Rcpt, r),
                Some(accepted) => RecipientResult {
                    rcpt_reply: Some(accepted.clone()),
                    ..match (&t.data, ended_at_rcpt) {
                        (Some(d), _) => from_reply(Stage::Data, d),
                        (None, Some(r)) => from_reply(Stage::Rcpt, r),
                        (None, None) => missing(Stage::Data),
                    }
                },
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16, esc: Option<&str>, text: &str) -> Reply {
        Reply {
            code,
            enhanced_status: esc.map(str::to_string),
            text: text.to_string(),
        }
    }

    #[test]
    fn dot_stuffing_is_transparent() {
        assert_eq!(dot_stuff(b"a\r\n.b\r\n"), b"a\r\n..b\r\n.\r\n");
        assert_eq!(dot_stuff(b".x\r\n"), b"..x\r\n.\r\n");
        assert_eq!(dot_stuff(b"a\r\n.\r\n"), b"a\r\n..\r\n.\r\n");
        assert_eq!(dot_stuff(b"no newline"), b"no newline\r\n.\r\n");
        assert_eq!(dot_stuff(b"bare\n.\nlf"), b"bare\n..\nlf\r\n.\r\n");
        assert_eq!(dot_stuff(b"cr\r.x"), b"cr\r..x\r\n.\r\n");
        assert_eq!(dot_stuff(b"a.b\r\n...\r\n"), b"a.b\r\n....\r\n.\r\n");
        assert_eq!(dot_stuff(b""), b".\r\n");
    }

    #[test]
    fn dot_stuffing_matches_the_byte_by_byte_rule_on_random_text() {
        // The rule written out byte by byte: a dot at the start, or after CR or LF, doubles.
        fn reference(body: &[u8]) -> Vec<u8> {
            let mut out = Vec::new();
            let mut line_start = true;
            for &b in body {
                if b == b'.' && line_start {
                    out.push(b'.');
                }
                out.push(b);
                line_start = b == b'\n' || b == b'\r';
            }
            if !body.is_empty() && !body.ends_with(b"\r\n") {
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b".\r\n");
            out
        }
        let mut rng = crate::test_support::TestRng::new(0x2545_f491_4f6c_dd1d);
        for _ in 0..2000 {
            let body = rng.text(40, &crate::test_support::test_chars(".\r\nab"));
            assert_eq!(
                dot_stuff(body.as_bytes()),
                reference(body.as_bytes()),
                "{body:?}"
            );
        }
    }

    #[test]
    fn lines_over_998_octets_are_broken_with_crlf_and_a_space() {
        let short = b"Subject: s\r\n\r\nok\r\n".to_vec();
        assert!(matches!(
            line_limited(Cow::Borrowed(&short)),
            Cow::Borrowed(_)
        ));
        let long = [
            format!("Subject: {}\r\n", "s".repeat(1500)),
            "\r\n".to_string(),
            format!("{}\r\n", "b".repeat(2500)),
            "x".repeat(998),
        ]
        .concat();
        let out = line_limited(Cow::Borrowed(long.as_bytes())).into_owned();
        let out = String::from_utf8(out).unwrap();
        assert!(out.split("\r\n").all(|l| l.len() <= MAX_LINE), "{out}");
        // Unfolding (CRLF and the space inserted) gives the content back.
        assert_eq!(out.replace("\r\n ", ""), long);
        let lines: Vec<&str> = out.split("\r\n").collect();
        assert_eq!(lines[0].len(), 998);
        assert_eq!((&lines[1][..1], lines[1].len()), (" ", 1 + 1509 - 998));
        assert_eq!(
            lines.last().unwrap().len(),
            998,
            "a last line without CRLF stays whole"
        );
        // UTF-8 is cut between characters, not inside one.
        let utf8 = format!("Subject: {}\r\n\r\n", "\u{e9}".repeat(1000));
        let out = line_limited(Cow::Borrowed(utf8.as_bytes())).into_owned();
        let out = String::from_utf8(out).expect("still UTF-8");
        assert!(out.split("\r\n").all(|l| l.len() <= MAX_LINE), "{out}");
        assert_eq!(out.replace("\r\n ", ""), utf8);
    }

    #[test]
    fn xtext_encodes_plus_equals_and_controls() {
        assert_eq!(xtext("a+b=c@d.e"), "a+2Bb+3Dc@d.e");
        assert_eq!(xtext("x y"), "x+20y");
        assert_eq!(xtext("é"), "+C3+A9");
    }

    fn env() -> Envelope {
        Envelope {
            sender: "s@a.example".into(),
            recipients: vec![EnvelopeRecipient {
                address: "r@b.example".into(),
                notify: Some(Notify {
                    failure: true,
                    delay: true,
                    ..Default::default()
                }),
                orcpt: Some("rfc822;R+1@b.example".into()),
            }],
            ret: Some(DsnRet::Hdrs),
            envid: Some("id 1".into()),
            eight_bit: true,
            smtputf8: false,
        }
    }

    #[test]
    fn mail_parameters_follow_the_peer_extensions() {
        let e = env();
        assert_eq!(mail_command(&e, 42, 0), "MAIL FROM:<s@a.example>\r\n");
        assert_eq!(
            mail_command(&e, 42, EXT_SIZE | EXT_DSN | EXT_8BIT_MIME),
            "MAIL FROM:<s@a.example> SIZE=42 BODY=8BITMIME RET=HDRS ENVID=id+201\r\n"
        );
        let mut null = e.clone();
        null.sender.clear();
        assert!(mail_command(&null, 1, 0).starts_with("MAIL FROM:<>"));
    }

    #[test]
    fn rcpt_dsn_parameters_only_when_offered() {
        let e = env();
        let r = &e.recipients[0];
        assert_eq!(rcpt_command(r, 0), "RCPT TO:<r@b.example>\r\n");
        assert_eq!(
            rcpt_command(r, EXT_DSN),
            "RCPT TO:<r@b.example> NOTIFY=FAILURE,DELAY ORCPT=rfc822;R+2B1@b.example\r\n"
        );
    }

    fn parse_reply(raw: &[u8]) -> Reply {
        ReplyParser::default().feed(raw).unwrap().1.unwrap()
    }

    #[test]
    fn a_password_echoed_in_a_reply_is_not_kept() {
        let hidden = Hidden::of("relayuser", "s3cret pass");
        // base64("\0relayuser\0s3cret pass"), as PLAIN sends it.
        let plain = "AHJlbGF5dXNlcgBzM2NyZXQgcGFzcw==";
        let text = hidden.text(format!("535 you sent {plain} and s3cret pass"));
        assert!(!text.contains("s3cret") && !text.contains(plain), "{text}");
        assert!(text.contains("[password removed]"), "{text}");
    }

    #[test]
    fn reply_from_multiline_response_keeps_all_lines() {
        let raw = b"550-5.1.1 The email account does not exist.\r\n550 5.1.1 Try again.\r\n";
        let reply = parse_reply(raw);
        assert_eq!(reply.code, 550);
        assert_eq!(reply.enhanced_status.as_deref(), Some("5.1.1"));
        assert_eq!(reply.text, "The email account does not exist.\nTry again.");
        assert_eq!(
            reply.display(),
            "550 5.1.1 The email account does not exist.\nTry again."
        );
    }

    #[test]
    fn passwords_go_only_over_tls_or_to_loopback() {
        let remote: IpAddr = "192.0.2.7".parse().unwrap();
        assert!(may_send_password(true, remote));
        assert!(!may_send_password(false, remote));
        assert!(may_send_password(false, "127.0.0.1".parse().unwrap()));
        assert!(may_send_password(false, "::1".parse().unwrap()));
    }

    #[test]
    fn an_enhanced_status_of_another_class_than_the_reply_is_text() {
        let parse = parse_reply;
        let r = parse(b"550 2.1.1 mismatched class\r\n");
        assert_eq!(
            (r.enhanced_status, r.text.as_str()),
            (None, "2.1.1 mismatched class")
        );
        let r = parse(b"451 4.7.1 greylisted\r\n");
        assert_eq!(r.enhanced_status.as_deref(), Some("4.7.1"));
    }

    #[test]
    fn every_recipient_gets_its_own_deciding_reply() {
        let t = TransactionReplies {
            mail: Some(reply(250, Some("2.1.0"), "ok")),
            rcpt: vec![
                Some(reply(250, None, "ok")),
                Some(reply(550, Some("5.1.1"), "user unknown")),
                Some(reply(452, Some("4.2.2"), "mailbox full")),
            ],
            data: Some(reply(250, Some("2.0.0"), "queued as X")),
            error: None,
            refused_locally: None,
        };
        let r = per_recipient(&t);
        assert_eq!(r[0].stage, Stage::Data);
        assert_eq!(r[0].reply.as_ref().unwrap().code, 250);
        assert_eq!(r[0].reply.as_ref().unwrap().text, "queued as X");
        // Decided at DATA, its RCPT reply kept beside it; refused ones have none.
        assert_eq!(r[0].rcpt_reply.as_ref().unwrap().text, "ok");
        assert_eq!(r[1].stage, Stage::Rcpt);
        assert_eq!(r[1].reply.as_ref().unwrap().code, 550);
        assert!(r[1].rcpt_reply.is_none());
        assert_eq!(r[2].reply.as_ref().unwrap().code, 452);
    }

    #[test]
    fn failed_mail_applies_to_all_and_lost_session_leaves_no_reply() {
        let t = TransactionReplies {
            mail: Some(reply(553, Some("5.7.1"), "sender rejected")),
            rcpt: vec![None, None],
            data: None,
            error: None,
            refused_locally: None,
        };
        assert!(
            per_recipient(&t)
                .iter()
                .all(|r| r.stage == Stage::Mail && r.reply.as_ref().unwrap().code == 553)
        );
        let t = TransactionReplies {
            mail: Some(reply(250, None, "ok")),
            rcpt: vec![Some(reply(250, None, "ok")), Some(reply(550, None, "no"))],
            data: None,
            error: Some("connection lost".into()),
            refused_locally: None,
        };
        let r = per_recipient(&t);
        assert_eq!(r[0].stage, Stage::Data);
        assert_eq!(r[0].reply, None);
        assert_eq!(r[0].text, "connection lost");
        assert_eq!(r[1].reply.as_ref().unwrap().code, 550);
    }

    #[test]
    fn a_421_to_an_rcpt_is_the_reply_of_every_recipient_still_pending() {
        let t = TransactionReplies {
            mail: Some(reply(250, None, "ok")),
            rcpt: vec![
                Some(reply(250, None, "ok")),
                Some(reply(550, Some("5.1.1"), "user unknown")),
                Some(reply(421, Some("4.3.2"), "shutting down")),
                None,
            ],
            data: None,
            error: Some("connection closed by server".into()),
            refused_locally: None,
        };
        let r = per_recipient(&t);
        let got: Vec<(Stage, Option<u16>)> = r
            .iter()
            .map(|r| (r.stage, r.reply.as_ref().map(|r| r.code)))
            .collect();
        assert_eq!(
            got,
            [
                (Stage::Rcpt, Some(421)),
                (Stage::Rcpt, Some(550)),
                (Stage::Rcpt, Some(421)),
                (Stage::Rcpt, Some(421)),
            ]
        );
        assert_eq!(r[0].rcpt_reply.as_ref().map(|r| r.code), Some(250));
        assert_eq!(r[3].text, "shutting down");
    }

    #[test]
    fn local_refusal_fails_every_recipient_permanently() {
        let t = TransactionReplies {
            rcpt: vec![None, None],
            refused_locally: Some(("5.6.7", "no SMTPUTF8".into())),
            ..Default::default()
        };
        let r = per_recipient(&t);
        assert_eq!(r.len(), 2);
        assert!(
            r.iter()
                .all(|r| r.local_permanent == Some("5.6.7") && r.reply.is_none())
        );
    }

    #[test]
    fn a_ca_file_without_a_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let e = tls_connector(true, Some(&path)).map(|_| ()).unwrap_err();
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret("hunter2".into());
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
