//! Replies of the receiving server (RFC 5321 §4.2), read with bounded memory: a server is
//! as hostile as a client. `smtp-proto`'s `ResponseReceiver` (behind `mail-send`'s `read`)
//! keeps two bytes of every empty continuation line (`250-`) without a limit, so a server
//! streaming them grew mailtrail by ~100 MB a second until the command timeout; and it
//! gives up on a valid reply longer than 4096 bytes (ten policy lines of a `550`), which
//! lost its code and deferred the recipient until it expired. Here a line is kept up to
//! 4096 bytes (the rest dropped), the text kept is cut at 4096 bytes (Postfix keeps 2048),
//! and a reply of more than [`MAX_LINES`] lines or [`MAX_REPLY`] bytes is refused; the last
//! line's code is the reply's (as Postfix's `smtp_chat_resp`), so `250-ok` + `550 no` is a
//! 550.
//!
//! An EHLO reply ([`ReplyParser::ehlo`]) is read the same way, each line's keyword taken in
//! as the line arrives (by `smtp-proto`'s EHLO parser, one line at a time), so that a long
//! list is no reason to keep it: a line over [`MAX_LINE`] bytes is skipped and the keywords
//! after it still count. `mail-send`'s EHLO reader refused a reply over 4096 bytes, which
//! failed the session.

use smtp_proto::EhloResponse;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Longest reply line kept (RFC 5321 §4.5.3.1.5 allows 512 bytes); the rest of a longer
/// one is read and dropped, as Postfix does, so its code still counts.
pub const MAX_LINE: usize = 4096;
/// Bytes of one reply, all lines together: past this it is refused (a server streaming one
/// endless line).
pub const MAX_REPLY: usize = 1 << 20;
/// Reply text kept; what follows is cut.
pub const MAX_TEXT: usize = 4096;
/// Lines in one reply.
pub const MAX_LINES: usize = 1000;

/// One SMTP reply as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// RFC 3463 `class.subject.detail` when the server sent one.
    pub enhanced_status: Option<String>,
    /// Reply text without code and enhanced status; lines of a multi-line reply joined by `\n`.
    pub text: String,
}

impl Reply {
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// `550 5.1.1 text` (first line form used in logs and Diagnostic-Code).
    pub fn display(&self) -> String {
        match &self.enhanced_status {
            Some(e) => format!("{} {} {}", self.code, e, self.text),
            None => format!("{} {}", self.code, self.text),
        }
    }
}

/// Why no reply could be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("connection closed by server")]
    Closed,
    #[error("reading the reply: {0}")]
    Io(String),
    #[error("unparseable reply: {0}")]
    Invalid(String),
}

/// One reply being read: complete lines are taken in as they come, the line in progress
/// is the only thing buffered.
#[derive(Debug, Default)]
pub struct ReplyParser {
    line: Vec<u8>,
    /// Bytes of this reply so far.
    read: usize,
    /// Each line's code and text (text cut once [`MAX_TEXT`] bytes are kept).
    lines: Vec<(u16, String)>,
    kept: usize,
    cut: bool,
    count: usize,
    esc: Option<String>,
    /// The last line's code: the reply's.
    code: u16,
    /// The line in progress was longer than [`MAX_LINE`]: what is kept of it is cut.
    line_cut: bool,
    /// Reading an EHLO reply: the keywords of its lines so far.
    ehlo: Option<EhloResponse<String>>,
}

impl ReplyParser {
    /// A parser for the reply to EHLO, which also takes in the service extensions its lines
    /// name ([`ReplyParser::capabilities`]).
    pub fn ehlo() -> Self {
        Self {
            ehlo: Some(EhloResponse::default()),
            ..Self::default()
        }
    }

    /// The extensions of the EHLO reply read (with [`ReplyParser::ehlo`]), when it was a
    /// `250`; none otherwise. A line the EHLO parser cannot read, or longer than
    /// [`MAX_LINE`], names none, and the others still count.
    pub fn capabilities(&mut self) -> EhloResponse<String> {
        match self.ehlo.take() {
            Some(caps) if self.code == 250 => caps,
            _ => EhloResponse::default(),
        }
    }

    /// Takes bytes up to the end of the reply. Returns how many it used and, once the last
    /// line is in, the reply; the bytes after it belong to the next reply.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(usize, Option<Reply>), ReadError> {
        let mut used = 0;
        while let Some(rest) = bytes.get(used..).filter(|r| !r.is_empty()) {
            let (chunk, complete) = match memchr::memchr(b'\n', rest) {
                Some(i) => (&rest[..i], true),
                None => (rest, false),
            };
            used += chunk.len() + usize::from(complete);
            self.read += chunk.len() + usize::from(complete);
            if self.read > MAX_REPLY {
                return Err(ReadError::Invalid(format!(
                    "a reply longer than {MAX_REPLY} bytes"
                )));
            }
            let room = MAX_LINE.saturating_sub(self.line.len());
            self.line_cut |= chunk.len() > room;
            self.line.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if complete {
                let line = std::mem::take(&mut self.line);
                let cut = std::mem::take(&mut self.line_cut);
                if self.take_line(&line, cut)? {
                    return Ok((used, Some(self.finish())));
                }
            }
        }
        Ok((used, None))
    }

    /// One complete line (without its LF; `cut`: only its start is here); true when it was
    /// the last.
    fn take_line(&mut self, line: &[u8], cut: bool) -> Result<bool, ReadError> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let code = match line.get(..3) {
            Some(d) if d.iter().all(u8::is_ascii_digit) => {
                d.iter().fold(0u16, |n, b| n * 10 + u16::from(b - b'0'))
            }
            _ => return Err(ReadError::Invalid(preview(line))),
        };
        if !(200..600).contains(&code) && code / 100 != 1 {
            return Err(ReadError::Invalid(preview(line)));
        }
        let last = match line.get(3) {
            None | Some(b' ') => true,
            Some(b'-') => false,
            Some(_) => return Err(ReadError::Invalid(preview(line))),
        };
        self.count += 1;
        if !last && self.count >= MAX_LINES {
            return Err(ReadError::Invalid(format!(
                "a reply of more than {MAX_LINES} lines"
            )));
        }
        let raw = line.get(4..).unwrap_or_default();
        if let Some(caps) = self.ehlo.as_mut()
            && code == 250
            && !cut
        {
            if self.count == 1 {
                let name = raw.split(|b| *b == b' ').next().unwrap_or_default();
                caps.hostname = String::from_utf8_lossy(name).into_owned();
            } else {
                add_extension(caps, raw);
            }
        }
        let text = String::from_utf8_lossy(raw);
        let text = match enhanced_status(&text, code) {
            Some((esc, rest)) => {
                self.esc = Some(esc.to_string());
                rest.to_string()
            }
            None => text.into_owned(),
        };
        if self.kept + text.len() > MAX_TEXT {
            self.cut = true;
        } else if !self.cut {
            self.kept += text.len() + 1;
            self.lines.push((code, text));
        }
        self.code = code;
        Ok(last)
    }

    /// Only the last line's code counts; a line that said another keeps it in its text, as
    /// the server wrote it.
    fn finish(&mut self) -> Reply {
        let code = self.code;
        let mut text = String::with_capacity(self.kept);
        for (i, (line_code, line)) in self.lines.iter().enumerate() {
            if i > 0 {
                text.push('\n');
            }
            if *line_code != code {
                text.push_str(&format!("{line_code} "));
            }
            text.push_str(line);
        }
        if self.cut {
            text.push_str(" [...]");
        }
        let enhanced_status = self
            .esc
            .take()
            .filter(|e| e.as_bytes().first().map(|c| u16::from(c - b'0')) == Some(code / 100));
        Reply {
            code,
            enhanced_status,
            text: text.trim_end().to_string(),
        }
    }
}

/// The extension one EHLO line after the first names (`raw`: the line after `250-`), by
/// `smtp-proto`'s parser given that line alone; a line it cannot read names none.
fn add_extension(caps: &mut EhloResponse<String>, raw: &[u8]) {
    let mut wire = Vec::with_capacity(raw.len() + 12);
    wire.extend_from_slice(b"250-x\r\n250 ");
    wire.extend_from_slice(raw);
    wire.extend_from_slice(b"\r\n");
    let Ok(line) = EhloResponse::parse(&mut wire.iter()) else {
        return;
    };
    caps.capabilities |= line.capabilities;
    caps.auth_mechanisms |= line.auth_mechanisms;
    // `SIZE` without a (readable) number says nothing about the limit.
    if line.size != 0 {
        caps.size = line.size;
    }
    if line.capabilities & smtp_proto::EXT_DELIVER_BY != 0 {
        caps.deliver_by = line.deliver_by;
    }
    if line.capabilities & smtp_proto::EXT_FUTURE_RELEASE != 0 {
        caps.future_release_interval = line.future_release_interval;
        caps.future_release_datetime = line.future_release_datetime;
    }
    if line.capabilities & smtp_proto::EXT_MT_PRIORITY != 0 {
        caps.mt_priority = line.mt_priority;
    }
    if line.no_soliciting.is_some() {
        caps.no_soliciting = line.no_soliciting;
    }
}

/// `5.1.1 rest` at the start of a line's text, of the line's own class: the status and
/// what follows it.
fn enhanced_status(text: &str, code: u16) -> Option<(&str, &str)> {
    let end = text.find(' ').unwrap_or(text.len());
    let candidate = &text[..end];
    let mut parts = candidate.split('.');
    let class = parts.next()?;
    let subject = parts.next()?;
    let detail = parts.next()?;
    let digits = |s: &str, max: usize| {
        !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_digit())
    };
    let ok = parts.next().is_none()
        && class.len() == 1
        && matches!(class, "2" | "4" | "5")
        && u16::from(class.as_bytes()[0] - b'0') == code / 100
        && digits(subject, 3)
        && digits(detail, 3);
    ok.then(|| (candidate, text[end..].trim_start_matches(' ')))
}

/// The start of a line that is no reply line, for the error.
fn preview(line: &[u8]) -> String {
    let mut s: String = String::from_utf8_lossy(&line[..line.len().min(60)])
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if line.len() > 60 {
        s.push_str("...");
    }
    format!("{s:?}")
}

/// Reads one reply from `stream`. `pending` holds the bytes read but not yet used (a
/// pipelining server's next replies) and stays below a read buffer's size plus a line.
pub async fn read<S: AsyncRead + Unpin + ?Sized>(
    stream: &mut S,
    pending: &mut Vec<u8>,
) -> Result<Reply, ReadError> {
    read_with(stream, pending, &mut ReplyParser::default()).await
}

/// [`read`] with a parser of the caller's ([`ReplyParser::ehlo`]).
pub async fn read_with<S: AsyncRead + Unpin + ?Sized>(
    stream: &mut S,
    pending: &mut Vec<u8>,
    parser: &mut ReplyParser,
) -> Result<Reply, ReadError> {
    let mut buf = [0u8; 4096];
    loop {
        if !pending.is_empty() {
            let (used, reply) = parser.feed(pending)?;
            pending.drain(..used);
            if let Some(reply) = reply {
                return Ok(reply);
            }
        }
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| ReadError::Io(e.to_string()))?;
        if n == 0 {
            return Err(ReadError::Closed);
        }
        pending.extend_from_slice(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Result<Reply, ReadError> {
        let mut p = ReplyParser::default();
        match p.feed(bytes)? {
            (_, Some(r)) => Ok(r),
            (_, None) => Err(ReadError::Closed),
        }
    }

    fn reply(code: u16, esc: Option<&str>, text: &str) -> Reply {
        Reply {
            code,
            enhanced_status: esc.map(String::from),
            text: text.into(),
        }
    }

    #[test]
    fn single_and_multi_line_replies() {
        assert_eq!(
            parse(b"250 2.1.5 Ok\r\n").unwrap(),
            reply(250, Some("2.1.5"), "Ok")
        );
        assert_eq!(
            parse(b"550-5.7.1 first\r\n550-5.7.1 second\r\n550 5.7.1 third\r\n").unwrap(),
            reply(550, Some("5.7.1"), "first\nsecond\nthird")
        );
        assert_eq!(parse(b"221\r\n").unwrap(), reply(221, None, ""));
        assert_eq!(parse(b"250 ok\n").unwrap(), reply(250, None, "ok"));
        // A status of another class than the code is text.
        assert_eq!(
            parse(b"550 2.1.1 odd\r\n").unwrap(),
            reply(550, None, "2.1.1 odd")
        );
    }

    #[test]
    fn an_overlong_line_is_cut_and_its_code_still_counts() {
        let wire = format!(
            "550-5.1.1 {}\r\n550 5.1.1 no such user\r\n",
            "y".repeat(5000)
        );
        let r = parse(wire.as_bytes()).unwrap();
        assert_eq!((r.code, r.enhanced_status.as_deref()), (550, Some("5.1.1")));
        // The text is cut (as Postfix keeps its first 2048 bytes); the code is the last line's.
        assert!(r.text.len() < 4200, "{}", r.text.len());
        assert!(r.text.starts_with("yyy") && r.text.ends_with(" [...]"));
    }

    #[test]
    fn the_last_line_decides_and_other_codes_stay_in_the_text() {
        assert_eq!(
            parse(b"250-2.1.5 ok\r\n550 5.1.1 no such user\r\n").unwrap(),
            reply(550, Some("5.1.1"), "250 ok\nno such user")
        );
    }

    #[test]
    fn a_long_valid_reply_keeps_its_code_and_a_cut_text() {
        let mut wire = Vec::new();
        for i in 0..10 {
            wire.extend_from_slice(
                format!("550-5.7.1 policy {i} {}\r\n", "x".repeat(480)).as_bytes(),
            );
        }
        wire.extend_from_slice(b"550 5.7.1 rejected by policy\r\n");
        let r = parse(&wire).unwrap();
        assert_eq!((r.code, r.enhanced_status.as_deref()), (550, Some("5.7.1")));
        assert!(r.text.starts_with("policy 0 xxx"));
        assert!(r.text.ends_with(" [...]"), "{}", r.text);
        assert!(r.text.len() <= MAX_TEXT + 10);
    }

    #[test]
    fn endless_replies_end_in_an_error_with_bounded_memory() {
        let mut p = ReplyParser::default();
        let chunk = b"250-\r\n".repeat(100);
        let mut fed = 0;
        let err = loop {
            match p.feed(&chunk) {
                Ok((n, None)) => fed += n,
                Ok((_, Some(r))) => panic!("a reply: {r:?}"),
                Err(e) => break e,
            }
            assert!(p.lines.len() <= MAX_LINES && p.line.len() <= MAX_LINE);
        };
        assert!(
            matches!(err, ReadError::Invalid(ref t) if t.contains("1000 lines")),
            "{err:?}"
        );
        assert!(fed < 10_000);
        // One endless line: read and dropped past MAX_LINE, refused past MAX_REPLY.
        let mut p = ReplyParser::default();
        let chunk = vec![b'x'; 64 * 1024];
        assert!(matches!(p.feed(b"550 "), Ok((4, None))));
        let err = loop {
            match p.feed(&chunk) {
                Ok(_) => assert!(p.line.len() <= MAX_LINE),
                Err(e) => break e,
            }
        };
        assert!(
            matches!(err, ReadError::Invalid(ref t) if t.contains("longer than")),
            "{err:?}"
        );
    }

    fn ehlo(bytes: &[u8]) -> (Reply, EhloResponse<String>) {
        let mut p = ReplyParser::ehlo();
        match p.feed(bytes).unwrap() {
            (_, Some(r)) => (r, p.capabilities()),
            (_, None) => panic!("incomplete"),
        }
    }

    #[test]
    fn ehlo_keywords_after_an_overlong_line_still_count() {
        use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN, EXT_8BIT_MIME, EXT_AUTH, EXT_PIPELINING};
        let wire = format!(
            "250-mx.test says hi\r\n250-X-LONG {}\r\n250-PIPELINING\r\n250-SIZE 1000\r\n\
             250-AUTH PLAIN LOGIN\r\n250-SIZE nonsense\r\n250 8BITMIME\r\n",
            "y".repeat(10 * 1024)
        );
        let (reply, caps) = ehlo(wire.as_bytes());
        assert_eq!(reply.code, 250);
        assert_eq!(caps.hostname, "mx.test");
        assert_eq!(
            caps.capabilities,
            EXT_PIPELINING | smtp_proto::EXT_SIZE | EXT_AUTH | EXT_8BIT_MIME
        );
        assert_eq!(caps.auth_mechanisms, AUTH_PLAIN | AUTH_LOGIN);
        assert_eq!(caps.size, 1000);
        // An overlong line that looks like a keyword names none (its parameters are cut).
        let wire = format!("250-mx\r\n250 SIZE 1{}\r\n", "0".repeat(5000));
        assert_eq!(ehlo(wire.as_bytes()).1.capabilities, 0);
    }

    #[test]
    fn ehlo_extensions_do_not_depend_on_how_the_reply_was_split() {
        let pieces = [
            "250-",
            "250 ",
            "PIPELINING",
            "SIZE ",
            "1000",
            "AUTH ",
            "PLAIN ",
            "LOGIN",
            "DSN",
            "8BITMIME",
            "\r\n",
            "\n",
            " ",
            "x",
        ];
        let mut rng = crate::test_support::TestRng::new(0x9e37_79b9_7f4a_7c15);
        for _ in 0..2000 {
            let wire = format!("250-mx\r\n{}", rng.text(30, &pieces));
            let whole = {
                let mut p = ReplyParser::ehlo();
                p.feed(wire.as_bytes())
                    .map(|(_, r)| r.map(|r| (r, p.capabilities())))
            };
            let split = {
                let mut p = ReplyParser::ehlo();
                let mut got = Ok(None);
                for b in wire.as_bytes() {
                    match p.feed(std::slice::from_ref(b)) {
                        Ok((_, Some(r))) => {
                            got = Ok(Some((r, p.capabilities())));
                            break;
                        }
                        Ok((_, None)) => {}
                        Err(e) => {
                            got = Err(e);
                            break;
                        }
                    }
                }
                got
            };
            assert_eq!(whole, split, "{wire:?}");
        }
    }

    #[test]
    fn ehlo_refused_names_no_extension() {
        let (reply, caps) = ehlo(b"250-mx\r\n250-PIPELINING\r\n550 5.7.1 go away\r\n");
        assert_eq!(reply.code, 550);
        assert_eq!(caps.capabilities, 0);
        let (reply, caps) = ehlo(b"502 5.5.1 no EHLO\r\n");
        assert_eq!((reply.code, caps.capabilities), (502, 0));
    }

    #[test]
    fn an_endless_ehlo_reply_is_refused_after_max_lines() {
        let mut p = ReplyParser::ehlo();
        let chunk = b"250-PIPELINING\r\n".repeat(100);
        let err = loop {
            match p.feed(&chunk) {
                Ok((_, None)) => {}
                Ok((_, Some(r))) => panic!("a reply: {r:?}"),
                Err(e) => break e,
            }
            assert!(p.lines.len() <= MAX_LINES && p.line.len() <= MAX_LINE);
        };
        assert!(
            matches!(err, ReadError::Invalid(ref t) if t.contains("1000 lines")),
            "{err:?}"
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            &b"hello\r\n"[..],
            b"25\r\n",
            b"2500 x\r\n",
            b"250x\r\n",
            b"\xff\xfe\r\n",
            b"700 x\r\n",
        ] {
            assert!(matches!(parse(bad), Err(ReadError::Invalid(_))), "{bad:?}");
        }
        // Bytes that are not UTF-8 in the text are kept as U+FFFD.
        assert_eq!(parse(b"550 \xc3\x28 x\r\n").unwrap().text, "\u{fffd}( x");
    }

    #[test]
    fn bytes_after_the_reply_are_left_for_the_next_one() {
        let wire = b"250 a\r\n251 b\r\n";
        let mut p = ReplyParser::default();
        let (used, r) = p.feed(wire).unwrap();
        assert_eq!(r.unwrap().code, 250);
        assert_eq!(&wire[used..], b"251 b\r\n");
    }

    #[tokio::test]
    async fn read_splits_pipelined_replies_and_reports_a_closed_stream() {
        let wire: &[u8] = b"250 2.1.0 ok\r\n550-5.1.1 no\r\n550 5.1.1 user\r\n";
        let mut stream = wire;
        let mut pending = Vec::new();
        assert_eq!(read(&mut stream, &mut pending).await.unwrap().code, 250);
        assert_eq!(
            read(&mut stream, &mut pending).await.unwrap(),
            reply(550, Some("5.1.1"), "no\nuser")
        );
        assert_eq!(
            read(&mut stream, &mut pending).await,
            Err(ReadError::Closed)
        );
    }

    #[test]
    fn a_reply_arriving_byte_by_byte_is_the_same() {
        let wire = b"451-4.7.1 greylisted\r\n451 4.7.1 come back later\r\n";
        let mut p = ReplyParser::default();
        let mut got = None;
        for b in wire.iter() {
            let (used, r) = p.feed(std::slice::from_ref(b)).unwrap();
            assert_eq!(used, 1);
            if r.is_some() {
                got = r;
            }
        }
        assert_eq!(
            got,
            Some(reply(451, Some("4.7.1"), "greylisted\ncome back later"))
        );
    }
}
