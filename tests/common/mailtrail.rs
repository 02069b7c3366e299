//! Runs the real `mailtrail` binary on loopback for integration tests: a temp data dir, free
//! ports, a config file, and helpers to run CLI subcommands against the same config.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mailtrail"))
}

/// A free loopback port (bound then released; the race with other tests is tolerable since
/// the server fails loudly if it loses it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Config tables for an instance that only accepts: no delivery, no domain check.
pub const ACCEPT_ONLY: &str = "[delivery]\nenabled = false\n[checks]\ndomain_check = false\n";

/// One mailtrail instance and its files. Killed on drop.
pub struct Mailtrail {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub smtp: SocketAddr,
    pub http: SocketAddr,
    child: Option<Child>,
}

impl Mailtrail {
    /// Starts with the default config plus `extra` TOML (top-level keys first, then tables).
    /// `extra_top` goes before any table; `extra_tables` after the generated tables.
    pub fn start_with(extra_top: &str, smtp_extra: &str, extra_tables: &str) -> Self {
        let mut m = Self::configure(extra_top, smtp_extra, extra_tables);
        m.spawn();
        m
    }

    /// Writes the config like [`Mailtrail::start_with`] without starting the server (the test
    /// prepares `data_dir` first, then calls [`Mailtrail::spawn`]).
    pub fn configure(extra_top: &str, smtp_extra: &str, extra_tables: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let smtp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config_path = dir.path().join("mailtrail.toml");
        let text = format!(
            "data_dir = {data:?}\nhostname = \"mt.test\"\n{extra_top}\n\
             [smtp]\nlisten = [\"{smtp}\"]\n{smtp_extra}\n\
             [http]\nlisten = [\"{http}\"]\n\
             {extra_tables}\n",
            data = dir.path().join("data"),
        );
        std::fs::write(&config_path, text).expect("write config");
        Self {
            dir,
            config_path,
            smtp,
            http,
            child: None,
        }
    }

    /// Accept-only instance (delivery and the RCPT-time domain check off, so recipients stay
    /// `queued` whatever this machine's DNS says) with default SMTP settings.
    pub fn start() -> Self {
        Self::start_with("", "", ACCEPT_ONLY)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts the server and waits until it answers. A port `free_port` handed out can be
    /// taken before the server binds it (another test's server, an outgoing connection's
    /// ephemeral port): then the ports are chosen again, up to five times.
    pub fn spawn(&mut self) {
        for _ in 0..5 {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.path().join("server.log"))
                .expect("server log");
            let started_before = self.server_log().matches("mailtrail started").count();
            let child = Command::new(bin())
                .args(["serve", "--config"])
                .arg(&self.config_path)
                .stdout(Stdio::from(log.try_clone().unwrap()))
                .stderr(Stdio::from(log))
                .env("RUST_LOG", "info")
                .spawn()
                .expect("spawn mailtrail");
            self.child = Some(child);
            match self.wait_ready(started_before) {
                Ok(()) => return,
                Err(log) if log.contains("Address already in use") => self.choose_new_ports(),
                Err(log) => panic!("mailtrail exited early:\n{log}"),
            }
        }
        panic!(
            "mailtrail found no free ports in five tries:\n{}",
            self.server_log()
        );
    }

    /// New free ports for SMTP and HTTP, in the config file too.
    fn choose_new_ports(&mut self) {
        let smtp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let text = std::fs::read_to_string(&self.config_path).expect("read config");
        let text = text
            .replace(&format!("\"{}\"", self.smtp), &format!("\"{smtp}\""))
            .replace(&format!("\"{}\"", self.http), &format!("\"{http}\""));
        std::fs::write(&self.config_path, text).expect("write config");
        (self.smtp, self.http) = (smtp, http);
    }

    /// Waits until this start of the server (its `mailtrail started` line, the one after
    /// `started_before` earlier ones in the log: not some other server on a stolen port)
    /// answers SMTP. `Err(log)` when it exited first.
    fn wait_ready(&mut self, started_before: usize) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!("({status})\n{}", self.server_log()));
            }
            let ours = self.server_log().matches("mailtrail started").count() > started_before;
            if !ours {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            if let Ok(mut s) = TcpStream::connect_timeout(&self.smtp, Duration::from_millis(200)) {
                s.set_read_timeout(Some(Duration::from_secs(5))).ok();
                let mut buf = [0u8; 512];
                if let Ok(n) = s.read(&mut buf)
                    && buf[..n].starts_with(b"220")
                {
                    let _ = s.write_all(b"QUIT\r\n");
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("mailtrail did not start:\n{}", self.server_log());
    }

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(&child, "TERM");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "mailtrail did not exit after SIGTERM:\n{}",
                    self.server_log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits up to `timeout` for the server to exit by itself (after signals sent).
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("mailtrail did not exit:\n{}", self.server_log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn child_id(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Runs `mailtrail <args> --config <this config>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .output()
            .expect("run mailtrail cli")
    }

    /// `cli` that must succeed; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "mailtrail {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// `mailtrail log KEY --json`, parsed.
    pub fn log_json(&self, key: &str) -> Vec<serde_json::Value> {
        self.cli_ok(&["log", key, "--json"])
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect()
    }

    /// One recipient of the message `receipt` (or the newest message of an address) as
    /// `mailtrail log --json` shows it; `Null` when absent.
    pub fn recipient(&self, key: &str, address: &str) -> serde_json::Value {
        self.log_json(key)
            .first()
            .and_then(|msg| {
                msg["recipients"]
                    .as_array()?
                    .iter()
                    .find(|r| r["address"] == address)
                    .cloned()
            })
            .unwrap_or_default()
    }

    /// Submits one message over a raw session (AUTH PLAIN first when `auth` is
    /// `Some((user, password))`); returns the receipt.
    pub fn submit(
        &self,
        auth: Option<(&str, &str)>,
        from: &str,
        to: &[&str],
        subject: &str,
    ) -> String {
        let mut c = RawSmtp::connect(self.smtp);
        assert!(c.cmd("EHLO app.test").starts_with("250"));
        if let Some((user, password)) = auth {
            use base64::Engine;
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
            let r = c.cmd(&format!("AUTH PLAIN {token}"));
            assert!(r.starts_with("235"), "{r}");
        }
        assert!(c.cmd(&format!("MAIL FROM:<{from}>")).starts_with("250"));
        for t in to {
            let r = c.cmd(&format!("RCPT TO:<{t}>"));
            assert!(r.starts_with("250"), "{t}: {r}");
        }
        assert!(c.cmd("DATA").starts_with("354"));
        let r = c.cmd(&format!(
            "From: {from}\r\nSubject: {subject}\r\nMessage-ID: <{subject}@app.example.com>\r\n\r\nhello\r\n."
        ));
        let _ = c.cmd("QUIT");
        receipt_in(&r).unwrap_or_else(|| panic!("no receipt: {r}"))
    }

    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.http, path)
    }
}

impl Drop for Mailtrail {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status();
}

/// `mailtrail hash-password` for `password`: the PHC string for `[[smtp.users]]`.
pub fn hash_password(password: &str) -> String {
    let mut child = Command::new(bin())
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run hash-password");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{password}\n").as_bytes())
        .expect("write password");
    let out = child.wait_with_output().expect("hash-password output");
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string()
}

/// Minimal HTTP/1.0 GET: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_get_for(addr, "localhost", path)
}

/// `GET path` naming `host` in its Host header; (status, body).
pub fn http_get_for(addr: SocketAddr, host: &str, path: &str) -> (u16, String) {
    let text = http_response(addr, host, path);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

/// The whole response (status line, header, body) to `GET path` with `Host: host`.
pub fn http_response(addr: SocketAddr, host: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect http");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read http");
    text
}

/// A raw SMTP client over a plain socket, for what ordinary clients will not send
/// (pipelined bursts, bare LF, garbage).
pub struct RawSmtp {
    pub reader: BufReader<TcpStream>,
    pub stream: TcpStream,
}

impl RawSmtp {
    pub fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).expect("connect smtp");
        stream.set_read_timeout(Some(Duration::from_secs(20))).ok();
        let reader = BufReader::new(stream.try_clone().unwrap());
        let mut c = Self { reader, stream };
        let banner = c.reply();
        assert!(banner.starts_with("220"), "banner: {banner}");
        c
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// Reads one whole (possibly multi-line) reply; empty string on EOF.
    pub fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => return all,
                Ok(_) => {}
            }
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return all;
            }
        }
    }

    /// Sends a command line and returns the reply.
    pub fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }
}

/// Runs a Python 3 snippet (smtplib is in the standard library); returns (success, stdout+stderr).
pub fn python(script: &str) -> (bool, String) {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .output()
        .expect("python3 is installed (scripts/install-test-deps)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs swaks with `args`; returns (success, transcript).
pub fn swaks(args: &[&str]) -> (bool, String) {
    let out = Command::new("swaks")
        .args(args)
        .output()
        .expect("swaks is installed (scripts/install-test-deps)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Extracts the receipt id from a `250 2.0.0 Ok: queued as <id>` reply or transcript.
pub fn receipt_in(text: &str) -> Option<String> {
    let at = text.find("queued as ")? + "queued as ".len();
    let id: String = text[at..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    (id.len() == 26).then_some(id)
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

#[allow(dead_code)]
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The search page at `path` (`/?q=...`) as a browser shows it once its script has run: the
/// DOM headless Chromium dumps, up to the script itself, the page's Content-Security-Policy enforced (a script whose
/// hash no longer matches does not run, and the DOM stays empty). `None`, saying "skipping",
/// where no Chromium is installed.
pub fn page_dom(http: SocketAddr, path: &str) -> Option<String> {
    let browser = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let Some(browser) = browser else {
        eprintln!("skipping: the page check needs Chromium");
        return None;
    };
    let profile = tempfile::tempdir().expect("chromium profile dir");
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(format!("http://{http}{path}"))
        .stderr(Stdio::null())
        .output()
        .expect("run chromium");
    assert!(out.status.success(), "chromium failed: {out:?}");
    let dom = String::from_utf8_lossy(&out.stdout);
    // What the script wrote, not the script's own text (its templates hold markup too).
    let shown = dom.split("<script>").next().unwrap_or("");
    Some(shown.to_string())
}

/// The first event of `kind` in a recipient of `log --json` (or `/api/log`).
pub fn event_of(recipient: &serde_json::Value, kind: &str) -> serde_json::Value {
    recipient["events"]
        .as_array()
        .and_then(|events| events.iter().find(|e| e["kind"] == kind))
        .unwrap_or_else(|| panic!("no {kind} event in {recipient}"))
        .clone()
}
