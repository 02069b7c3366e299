//! A scripted SMTP server on loopback that plays a recipient MX: per-recipient replies at RCPT
//! (a sequence across attempts, the last one repeating), replies for MAIL and DATA, slow
//! replies, dropped connections, STARTTLS with a self-signed certificate (rcgen). It records
//! every transaction it saw: EHLO name, TLS, the MAIL FROM and RCPT TO lines with their
//! parameters, and the un-dot-stuffed body.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Where the server hangs up without replying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropAt {
    /// Right after accepting the TCP connection, before the greeting.
    Connect,
    /// After the `220` to STARTTLS, instead of the TLS handshake (a broken TLS peer).
    StartTls,
    /// Right after the reply to MAIL (as a server that says `421` and hangs up).
    AfterMail,
    /// After reading the message body, before the final DATA reply.
    EndOfData,
    /// Right after the final reply to the message: a server that closes a connection the
    /// client keeps for its next message (an idle timeout, a restart).
    AfterData,
}

/// What the server answers. Reply strings are full lines without CRLF (`550 5.1.1 ...`);
/// a `\n` inside makes a multi-line reply.
#[derive(Clone)]
pub struct Script {
    pub banner: String,
    /// EHLO keywords after the greeting line.
    pub extensions: Vec<String>,
    /// Answer EHLO with this instead (e.g. `502 ...`) to force the HELO fallback.
    pub ehlo_reply: Option<String>,
    pub starttls: bool,
    pub mail_reply: String,
    /// Replies per recipient (lower-case address), one per attempt; the last one repeats.
    pub rcpt: HashMap<String, VecDeque<String>>,
    pub default_rcpt: String,
    pub data_command_reply: String,
    /// Final replies after the body, one per transaction; the last one repeats.
    pub data_replies: VecDeque<String>,
    /// Delay before every reply.
    pub reply_delay: Duration,
    pub drop_at: Option<DropAt>,
    /// Offer `AUTH PLAIN` and accept exactly this user and password.
    pub auth: Option<(String, String)>,
    /// TLS from the first byte (port 465 style) instead of STARTTLS.
    pub implicit_tls: bool,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            banner: "220 mx.test ESMTP scripted".into(),
            extensions: vec![
                "PIPELINING".into(),
                "SIZE 10240000".into(),
                "8BITMIME".into(),
                "DSN".into(),
                "ENHANCEDSTATUSCODES".into(),
            ],
            ehlo_reply: None,
            starttls: false,
            mail_reply: "250 2.1.0 Ok".into(),
            rcpt: HashMap::new(),
            default_rcpt: "250 2.1.5 Ok".into(),
            data_command_reply: "354 End data with <CR><LF>.<CR><LF>".into(),
            data_replies: VecDeque::from(vec!["250 2.0.0 Ok: queued as TEST1".to_string()]),
            reply_delay: Duration::ZERO,
            drop_at: None,
            auth: None,
            implicit_tls: false,
        }
    }
}

impl Script {
    pub fn rcpt(mut self, address: &str, replies: &[&str]) -> Self {
        self.rcpt.insert(
            address.to_ascii_lowercase(),
            replies.iter().map(|s| s.to_string()).collect(),
        );
        self
    }
}

/// One transaction as the server saw it.
#[derive(Debug, Clone, Default)]
pub struct Transaction {
    pub helo: String,
    pub tls: bool,
    /// Everything after `MAIL FROM:` (address in brackets plus parameters).
    pub mail_from: String,
    /// Everything after `RCPT TO:` for each RCPT, accepted or not.
    pub rcpt_to: Vec<String>,
    pub body: Vec<u8>,
    /// Whether the body was followed by a 2xx.
    pub accepted: bool,
    /// The user that authenticated on this session, if any.
    pub auth_user: Option<String>,
}

#[derive(Default)]
pub struct Seen {
    pub connections: usize,
    /// Sessions open now, and the most open at once.
    pub active: usize,
    pub peak_active: usize,
    pub transactions: Vec<Transaction>,
    /// Every command line received, in order.
    pub commands: Vec<String>,
}

pub struct TestMx {
    pub addr: SocketAddr,
    /// PEM of the self-signed certificate it presents (SANs mx.test, localhost, 127.0.0.1).
    pub cert_pem: String,
    pub script: Arc<Mutex<Script>>,
    pub seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestMx {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestMx {
    pub async fn start(script: Script) -> Self {
        Self::start_on("127.0.0.1:0", script).await
    }

    pub async fn start_on(bind: &str, script: Script) -> Self {
        let listener = TcpListener::bind(bind).await.expect("bind test MX");
        let addr = listener.local_addr().expect("local addr");
        let script = Arc::new(Mutex::new(script));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (acceptor, cert_pem) = tls_acceptor();
        let tls = Arc::new(acceptor);
        let (s2, seen2) = (script.clone(), seen.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                {
                    let mut g = seen2.lock().unwrap();
                    g.connections += 1;
                    g.active += 1;
                    g.peak_active = g.peak_active.max(g.active);
                }
                let (s3, seen3, tls) = (s2.clone(), seen2.clone(), tls.clone());
                tokio::spawn(async move {
                    let _ = session(Box::new(sock), s3, seen3.clone(), tls).await;
                    seen3.lock().unwrap().active -= 1;
                });
            }
        });
        Self {
            addr,
            cert_pem,
            script,
            seen,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn transactions(&self) -> Vec<Transaction> {
        self.seen.lock().unwrap().transactions.clone()
    }

    pub fn connections(&self) -> usize {
        self.seen.lock().unwrap().connections
    }

    pub fn peak_active(&self) -> usize {
        self.seen.lock().unwrap().peak_active
    }

    pub fn commands(&self) -> Vec<String> {
        self.seen.lock().unwrap().commands.clone()
    }

    pub fn set_script(&self, f: impl FnOnce(&mut Script)) {
        f(&mut self.script.lock().unwrap());
    }
}

fn tls_acceptor() -> (tokio_rustls::TlsAcceptor, String) {
    let ck = rcgen::generate_simple_self_signed(vec![
        "mx.test".to_string(),
        "localhost".into(),
        "127.0.0.1".into(),
    ])
    .expect("self-signed certificate");
    let pem = ck.cert.pem();
    let cert = ck.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .expect("server config");
    (tokio_rustls::TlsAcceptor::from(Arc::new(config)), pem)
}

fn pop_or_repeat(q: &mut VecDeque<String>, default: &str) -> String {
    match q.len() {
        0 => default.to_string(),
        1 => q.front().cloned().unwrap_or_default(),
        _ => q.pop_front().unwrap_or_default(),
    }
}

fn wire(reply: &str) -> String {
    let lines: Vec<&str> = reply.split('\n').collect();
    let mut out = String::new();
    for (i, l) in lines.iter().enumerate() {
        let (code, text) = l.split_at(3.min(l.len()));
        let text = text.strip_prefix(' ').unwrap_or(text);
        let sep = if i + 1 == lines.len() { ' ' } else { '-' };
        out.push_str(&format!("{code}{sep}{text}\r\n"));
    }
    out
}

async fn session(
    stream: Box<dyn Io>,
    script: Arc<Mutex<Script>>,
    seen: Arc<Mutex<Seen>>,
    tls: Arc<tokio_rustls::TlsAcceptor>,
) -> std::io::Result<()> {
    let sc = || script.lock().unwrap().clone();
    if sc().drop_at == Some(DropAt::Connect) {
        return Ok(());
    }
    let (mut rd, mut is_tls) = if sc().implicit_tls {
        let stream = tls.accept(stream).await?;
        (BufReader::new(Box::new(stream) as Box<dyn Io>), true)
    } else {
        (BufReader::new(stream), false)
    };
    let mut auth_user: Option<String> = None;
    let mut helo = String::new();
    let mut tx: Option<Transaction> = None;
    let mut accepted_rcpts = 0usize;

    async fn send(
        rd: &mut BufReader<Box<dyn Io>>,
        delay: Duration,
        reply: &str,
    ) -> std::io::Result<()> {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        rd.get_mut().write_all(wire(reply).as_bytes()).await?;
        rd.get_mut().flush().await
    }

    send(&mut rd, sc().reply_delay, &sc().banner).await?;
    loop {
        let mut line = String::new();
        if rd.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let cmd = line.trim_end().to_string();
        seen.lock().unwrap().commands.push(cmd.clone());
        let upper = cmd.to_ascii_uppercase();
        let s = sc();
        if upper.starts_with("EHLO ") {
            helo = cmd[5..].to_string();
            tx = None;
            if let Some(r) = &s.ehlo_reply {
                send(&mut rd, s.reply_delay, r).await?;
                continue;
            }
            let mut lines = vec!["250 mx.test greets you".to_string()];
            for e in &s.extensions {
                lines.push(format!("250 {e}"));
            }
            if s.starttls && !is_tls {
                lines.push("250 STARTTLS".into());
            }
            if s.auth.is_some() {
                lines.push("250 AUTH PLAIN".into());
            }
            send(&mut rd, s.reply_delay, &lines.join("\n")).await?;
        } else if upper.starts_with("HELO ") {
            helo = cmd[5..].to_string();
            send(&mut rd, s.reply_delay, "250 mx.test").await?;
        } else if upper == "STARTTLS" && s.starttls && !is_tls {
            send(&mut rd, s.reply_delay, "220 2.0.0 Ready to start TLS").await?;
            if s.drop_at == Some(DropAt::StartTls) {
                return Ok(());
            }
            let inner = rd.into_inner();
            let stream = tls.accept(inner).await?;
            rd = BufReader::new(Box::new(stream));
            is_tls = true;
            helo.clear();
        } else if upper.starts_with("AUTH PLAIN ") {
            use base64::Engine as _;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(cmd[11..].trim())
                .unwrap_or_default();
            let parts: Vec<String> = decoded
                .split(|b| *b == 0)
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect();
            let ok = match (&s.auth, parts.as_slice()) {
                (Some((u, p)), [_, user, pass]) => u == user && p == pass,
                _ => false,
            };
            if ok {
                auth_user = parts.get(1).cloned();
                send(
                    &mut rd,
                    s.reply_delay,
                    "235 2.7.0 Authentication successful",
                )
                .await?;
            } else {
                send(
                    &mut rd,
                    s.reply_delay,
                    "535 5.7.8 Authentication credentials invalid",
                )
                .await?;
            }
        } else if upper.starts_with("MAIL FROM:") {
            accepted_rcpts = 0;
            tx = Some(Transaction {
                helo: helo.clone(),
                tls: is_tls,
                auth_user: auth_user.clone(),
                mail_from: cmd[10..].to_string(),
                ..Default::default()
            });
            let r = s.mail_reply.clone();
            send(&mut rd, s.reply_delay, &r).await?;
            if s.drop_at == Some(DropAt::AfterMail) {
                return Ok(());
            }
            if !r.starts_with('2') {
                tx = None;
            }
        } else if upper.starts_with("RCPT TO:") {
            let arg = cmd[8..].to_string();
            let addr = arg
                .trim_start_matches('<')
                .split('>')
                .next()
                .unwrap_or("")
                .to_ascii_lowercase();
            let reply = {
                let mut g = script.lock().unwrap();
                let default = g.default_rcpt.clone();
                match g.rcpt.get_mut(&addr) {
                    Some(q) => pop_or_repeat(q, &default),
                    None => default,
                }
            };
            match &mut tx {
                Some(t) => t.rcpt_to.push(arg),
                None => {
                    send(&mut rd, s.reply_delay, "503 5.5.1 need MAIL").await?;
                    continue;
                }
            }
            if reply.starts_with('2') {
                accepted_rcpts += 1;
            }
            send(&mut rd, s.reply_delay, &reply).await?;
            if reply.starts_with("421") {
                // RFC 5321 §3.8: the server closes after a 421.
                return Ok(());
            }
        } else if upper == "DATA" {
            if tx.is_none() || accepted_rcpts == 0 {
                tx = None;
                send(
                    &mut rd,
                    s.reply_delay,
                    "554 5.5.1 Error: no valid recipients",
                )
                .await?;
                continue;
            }
            let r = s.data_command_reply.clone();
            send(&mut rd, s.reply_delay, &r).await?;
            if !r.starts_with("354") {
                tx = None;
                continue;
            }
            let mut body = Vec::new();
            loop {
                let mut l = Vec::new();
                if rd.read_until(b'\n', &mut l).await? == 0 {
                    return Ok(());
                }
                if l == b".\r\n" {
                    break;
                }
                if l.starts_with(b"..") {
                    l.remove(0);
                }
                body.extend_from_slice(&l);
            }
            if s.drop_at == Some(DropAt::EndOfData) {
                if let Some(mut t) = tx.take() {
                    t.body = body;
                    seen.lock().unwrap().transactions.push(t);
                }
                return Ok(());
            }
            let reply = {
                let mut g = script.lock().unwrap();
                pop_or_repeat(&mut g.data_replies, "250 2.0.0 Ok")
            };
            if let Some(mut t) = tx.take() {
                t.body = body;
                t.accepted = reply.starts_with('2');
                seen.lock().unwrap().transactions.push(t);
            }
            send(&mut rd, s.reply_delay, &reply).await?;
            if s.drop_at == Some(DropAt::AfterData) {
                return Ok(());
            }
        } else if upper.starts_with("BDAT ") {
            // Only reached when a test advertises CHUNKING.
            let mut parts = upper.split_whitespace().skip(1);
            let len: usize = parts.next().and_then(|n| n.parse().ok()).unwrap_or(0);
            let mut chunk = vec![0u8; len];
            rd.read_exact(&mut chunk).await?;
            let reply = {
                let mut g = script.lock().unwrap();
                pop_or_repeat(&mut g.data_replies, "250 2.0.0 Ok")
            };
            if let Some(mut t) = tx.take() {
                t.body = chunk;
                t.accepted = reply.starts_with('2');
                seen.lock().unwrap().transactions.push(t);
            }
            send(&mut rd, s.reply_delay, &reply).await?;
        } else if upper == "RSET" {
            tx = None;
            send(&mut rd, s.reply_delay, "250 2.0.0 Ok").await?;
        } else if upper == "NOOP" {
            send(&mut rd, s.reply_delay, "250 2.0.0 Ok").await?;
        } else if upper == "QUIT" {
            send(&mut rd, Duration::ZERO, "221 2.0.0 Bye").await?;
            return Ok(());
        } else {
            send(&mut rd, s.reply_delay, "502 5.5.2 Command not recognized").await?;
        }
    }
}
