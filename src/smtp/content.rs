//! Message content ingestion for DATA (dot-terminated) and BDAT (counted chunks): finds the
//! end of data, removes dot-stuffing, and enforces the size, line-length and line-ending rules.
//!
//! We do not use smtp-proto's `DataReceiver` here: it passes bare LF and bare CR through into
//! the message and has no line-length limit, and a relay that stores a bare LF and later sends
//! the message on with DATA is exactly what SMTP smuggling exploits. This scanner treats only
//! `<CRLF>.<CRLF>` as the end of data and flags every bare CR or LF, so the session can reject
//! the message (Postfix `smtpd_forbid_bare_newline = reject`). Command lines get the same
//! rule in [`super::session`], where a bare line ending closes the session instead.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus_client::metrics::gauge::Gauge;

/// Why a complete message is rejected. The session turns each into its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentError {
    /// A CR not followed by LF, or an LF not preceded by CR.
    BareLineEnding,
    /// A line (CRLF included) longer than `max_data_line`.
    LineTooLong,
    /// More than `max_message_size` bytes after dot-unstuffing.
    TooBig,
    /// The content of all sessions together would pass `max_content_memory`.
    NoMemory,
}

/// The bytes of message content that all sessions together may hold in memory
/// (`[smtp] max_content_memory`): each scanner takes from it as its body grows, in steps of
/// [`CHARGE_STEP`], and what it took returns when the [`Charge`] drops: after the message is
/// stored, or at once when it is rejected. Without it, every connection could hold a message
/// of the maximum size at the same time (1,000 × 25 MiB by default).
#[derive(Debug, Clone)]
pub struct ContentMemory {
    available: Arc<AtomicUsize>,
    /// What is taken now, for `/metrics`.
    in_use: Gauge,
    /// The memory this one is a share of ([`ContentMemory::share`]): what is taken here is
    /// taken there too.
    within: Option<Box<ContentMemory>>,
}

/// The most a scanner takes from [`ContentMemory`] beyond what its body needs right now, so
/// that a message costs one atomic operation per 64 KiB rather than one per read.
const CHARGE_STEP: usize = 64 * 1024;

impl ContentMemory {
    /// `bytes` to share, what is taken kept in a gauge of its own.
    pub fn new(bytes: usize) -> Self {
        Self::reported_in(bytes, Gauge::default())
    }

    /// `bytes` to share, what is taken kept in `in_use` (the `/metrics` gauge).
    pub fn reported_in(bytes: usize, in_use: Gauge) -> Self {
        Self {
            available: Arc::new(AtomicUsize::new(bytes)),
            in_use,
            within: None,
        }
    }

    /// A share of at most `bytes` of this memory: what a scanner takes from the share it
    /// takes from this memory too, so a share's users can never hold more than `bytes`,
    /// whatever is left for the others.
    pub fn share(&self, bytes: usize) -> Self {
        Self {
            available: Arc::new(AtomicUsize::new(bytes)),
            in_use: Gauge::default(),
            within: Some(Box::new(self.clone())),
        }
    }

    /// Bytes no scanner holds now.
    pub fn available(&self) -> usize {
        self.available.load(Ordering::Relaxed)
    }

    fn try_take(&self, n: usize) -> bool {
        let taken = self
            .available
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| a.checked_sub(n))
            .is_ok();
        if !taken {
            return false;
        }
        if let Some(outer) = &self.within
            && !outer.try_take(n)
        {
            self.available.fetch_add(n, Ordering::AcqRel);
            return false;
        }
        self.in_use.inc_by(i64::try_from(n).unwrap_or(i64::MAX));
        true
    }

    fn give_back(&self, n: usize) {
        self.available.fetch_add(n, Ordering::AcqRel);
        self.in_use.dec_by(i64::try_from(n).unwrap_or(i64::MAX));
        if let Some(outer) = &self.within {
            outer.give_back(n);
        }
    }
}

/// Bytes taken from a [`ContentMemory`]; given back on drop.
#[derive(Debug)]
pub struct Charge {
    memory: ContentMemory,
    bytes: usize,
}

impl Charge {
    fn new(memory: ContentMemory) -> Self {
        Self { memory, bytes: 0 }
    }

    /// Gives back what the charge holds beyond `bytes`.
    fn shrink_to(&mut self, bytes: usize) {
        if let Some(extra) = self.bytes.checked_sub(bytes).filter(|&n| n > 0) {
            self.memory.give_back(extra);
            self.bytes = bytes;
        }
    }

    /// Makes the charge at least `needed` bytes, up to [`CHARGE_STEP`] beyond it (never past
    /// `cap`); false when the memory cannot spare even `needed`.
    fn grow_to(&mut self, needed: usize, cap: usize) -> bool {
        if needed <= self.bytes {
            return true;
        }
        let ahead = (needed + CHARGE_STEP).min(cap.max(needed)) - self.bytes;
        let exact = needed - self.bytes;
        for n in [ahead, exact] {
            if self.memory.try_take(n) {
                self.bytes += n;
                return true;
            }
        }
        false
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.memory.give_back(self.bytes);
        }
    }
}

/// How the content ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// DATA: ends at `<CRLF>.<CRLF>`; leading dots are unstuffed.
    DotTerminated,
    /// BDAT: the session passes exactly the chunk bytes; no dot handling.
    Chunked,
}

/// Incremental scanner. Feed it bytes with [`ContentScanner::ingest`] until it reports the end
/// (DATA) or the session has passed the last chunk (BDAT), then call [`ContentScanner::finish`].
#[derive(Debug)]
pub struct ContentScanner {
    framing: Framing,
    max_size: usize,
    max_line: usize,
    body: Vec<u8>,
    /// Raw bytes on the current line so far (the leading stuffing dot included).
    line_len: usize,
    /// The current line began with a dot (stuffing, or the end-of-data line).
    dot_line: bool,
    /// The previous byte was a CR whose LF has not arrived yet.
    pending_cr: bool,
    error: Option<ContentError>,
    /// What the body takes from the shared content memory.
    charge: Charge,
}

impl ContentScanner {
    pub fn new(framing: Framing, max_size: usize, max_line: usize, memory: ContentMemory) -> Self {
        Self {
            framing,
            max_size,
            max_line,
            body: Vec::new(),
            line_len: 0,
            dot_line: false,
            pending_cr: false,
            error: None,
            charge: Charge::new(memory),
        }
    }

    /// The content memory the body holds (what was taken ahead of need given back), to keep
    /// until the message is stored (the body lives on in it); taken before
    /// [`ContentScanner::finish`].
    pub fn take_charge(&mut self) -> Charge {
        let held = if self.error.is_some() {
            0
        } else {
            self.body.len() + 2
        };
        self.charge.shrink_to(held);
        let memory = self.charge.memory.clone();
        std::mem::replace(&mut self.charge, Charge::new(memory))
    }

    /// Scans `input`. Returns how many bytes were consumed and whether the end of data was
    /// reached (always `false` for [`Framing::Chunked`], which consumes everything it gets).
    pub fn ingest(&mut self, input: &[u8]) -> (usize, bool) {
        let mut i = 0;
        while let Some(&b) = input.get(i) {
            if self.pending_cr {
                self.pending_cr = false;
                if b == b'\n' {
                    // The line so far is `.` and its CR: the end of data.
                    if self.framing == Framing::DotTerminated && self.dot_line && self.line_len == 1
                    {
                        return (i + 1, true);
                    }
                    self.push(b"\r\n");
                    self.line_len = 0;
                    self.dot_line = false;
                    i += 1;
                    continue;
                }
                self.fail(ContentError::BareLineEnding);
                self.push(b"\r");
            }
            match b {
                b'\r' => {
                    self.pending_cr = true;
                    self.count_line_bytes(1);
                    i += 1;
                }
                b'\n' => {
                    // A bare LF does not end a line: `\n.\n` must never look like the end.
                    self.fail(ContentError::BareLineEnding);
                    self.count_line_bytes(1);
                    self.push(b"\n");
                    i += 1;
                }
                b'.' if self.framing == Framing::DotTerminated
                    && self.line_len == 0
                    && !self.dot_line =>
                {
                    // Not counted: the line limit excludes the dot added for transparency
                    // (RFC 5321 4.5.3.1.6).
                    self.dot_line = true;
                    i += 1;
                }
                _ => {
                    // Ordinary text up to the next CR or LF is copied in one go, in two
                    // pieces when it passes the line limit: what still fits on the line,
                    // then the rest. Each byte counts against the line limit just before it
                    // counts against the size limit, so the limit reached first names the
                    // rejection, wherever the reads split the run.
                    let rest = input.get(i..).unwrap_or(&[]);
                    let run = memchr::memchr2(b'\r', b'\n', rest).unwrap_or(rest.len());
                    let fits = self.max_line.saturating_sub(self.line_len + 1).min(run);
                    for piece in [rest.get(..fits), rest.get(fits..run)] {
                        let piece = piece.unwrap_or(&[]);
                        if !piece.is_empty() {
                            self.count_line_bytes(piece.len());
                            self.push(piece);
                        }
                    }
                    i += run;
                }
            }
        }
        (input.len(), false)
    }

    /// Ends a chunked (BDAT) message: a CR left pending at the very end is bare. Returns the
    /// message body with CRLF line ends, or why it is rejected.
    pub fn finish(mut self) -> Result<Vec<u8>, ContentError> {
        if self.pending_cr {
            self.fail(ContentError::BareLineEnding);
        }
        if let Some(e) = self.error {
            return Err(e);
        }
        if !self.body.is_empty() && !self.body.ends_with(b"\r\n") {
            // A BDAT message need not end with CRLF; the stored form always does, because
            // it is relayed with DATA later.
            self.body.extend_from_slice(b"\r\n");
        }
        Ok(self.body)
    }

    /// Bytes accepted so far (0 once the message is known to be rejected).
    pub fn len(&self) -> usize {
        self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.body.is_empty()
    }

    fn count_line_bytes(&mut self, n: usize) {
        self.line_len += n;
        // Called for every byte but the LF of a CRLF, which makes the line one longer.
        if self.line_len + 1 > self.max_line {
            self.fail(ContentError::LineTooLong);
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        if self.error.is_some() {
            return;
        }
        let len = self.body.len() + bytes.len();
        if len > self.max_size {
            self.fail(ContentError::TooBig);
            return;
        }
        // Two more for the CRLF `finish` may add.
        if !self.charge.grow_to(len + 2, self.max_size + 2) {
            self.fail(ContentError::NoMemory);
            return;
        }
        self.body.extend_from_slice(bytes);
    }

    fn fail(&mut self, error: ContentError) {
        // The first problem names the rejection; the body (and the memory it held) is
        // dropped, but scanning goes on so that the end of data is still found.
        if self.error.is_none() {
            self.error = Some(error);
            self.body = Vec::new();
            self.take_charge();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// More content memory than any test uses.
    fn plenty() -> ContentMemory {
        ContentMemory::new(usize::MAX)
    }

    #[test]
    fn sessions_share_the_content_memory_and_give_it_back() {
        let memory = ContentMemory::new(250);
        let scanner = || ContentScanner::new(Framing::DotTerminated, 1000, 100, memory.clone());
        let line = [b'x'; 48];
        let line = [&line[..], b"\r\n"].concat();
        let mut first = scanner();
        for _ in 0..3 {
            assert_eq!(first.ingest(&line), (50, false));
        }
        // The first holds 152 bytes (150 and room for a final CRLF), the rest is left.
        assert_eq!(memory.available(), 250 - 152);
        let mut second = scanner();
        for _ in 0..3 {
            second.ingest(&line);
        }
        assert_eq!(second.ingest(b".\r\n"), (3, true));
        assert_eq!(second.finish(), Err(ContentError::NoMemory));
        assert_eq!(
            memory.available(),
            250 - 152,
            "a rejected body holds nothing"
        );
        // The first one's charge outlives its scanner until the message is stored.
        first.ingest(b".\r\n");
        let charge = first.take_charge();
        assert_eq!(first.finish().unwrap().len(), 150);
        assert_eq!(memory.available(), 250 - 152);
        drop(charge);
        assert_eq!(memory.available(), 250);
        let mut third = scanner();
        for _ in 0..3 {
            third.ingest(&line);
        }
        third.ingest(b".\r\n");
        assert_eq!(third.finish().unwrap().len(), 150);
        assert_eq!(memory.available(), 250);
    }

    #[test]
    fn a_share_holds_no_more_than_its_bytes_and_takes_them_from_the_whole() {
        let memory = ContentMemory::new(1000);
        let share = memory.share(100);
        let scanner =
            |m: &ContentMemory| ContentScanner::new(Framing::DotTerminated, 80, 100, m.clone());
        let mut within = scanner(&share);
        within.ingest(b"0123456789\r\n");
        // Taken ahead up to its size limit (80 + CRLF), from both.
        assert_eq!((share.available(), memory.available()), (18, 918));
        let mut second = scanner(&share);
        second.ingest(b"01234567890123456789\r\n.\r\n");
        assert_eq!(
            second.finish(),
            Err(ContentError::NoMemory),
            "the share is spent"
        );
        let mut outside = scanner(&memory);
        outside.ingest(b"0123456789\r\n.\r\n");
        assert!(outside.finish().is_ok(), "the rest of the whole is not");
        within.ingest(b".\r\n");
        drop(within);
        assert_eq!((share.available(), memory.available()), (100, 1000));
    }

    #[test]
    fn the_line_limit_does_not_count_the_transparency_dot() {
        let line = |n: usize| format!(".{}\r\n.\r\n", "x".repeat(n));
        // max_line 100, CRLF included: 98 bytes of text after the dot fit, 99 do not.
        let (_, done, body) = data(line(98).as_bytes());
        assert!(done);
        assert_eq!(body.unwrap().len(), 100);
        let (_, _, body) = data(line(99).as_bytes());
        assert_eq!(body, Err(ContentError::LineTooLong));
        // A stuffed dot line is content, and `..` is one dot.
        let (_, done, body) = data(b"..\r\n.\r\n");
        assert!(done);
        assert_eq!(body.unwrap(), b".\r\n");
    }

    #[test]
    fn takes_ahead_while_receiving_and_keeps_only_the_body_once_complete() {
        let memory = ContentMemory::new(1 << 20);
        let mut s = ContentScanner::new(Framing::DotTerminated, 1000, 100, memory.clone());
        s.ingest(b"hi\r\n");
        // Up to the size limit ahead (one step is 64 KiB), not once per read.
        assert_eq!(memory.available(), (1 << 20) - 1002);
        s.ingest(b".\r\n");
        let charge = s.take_charge();
        assert_eq!(memory.available(), (1 << 20) - 6);
        drop(charge);
        assert_eq!(memory.available(), 1 << 20);
    }

    fn data(input: &[u8]) -> (usize, bool, Result<Vec<u8>, ContentError>) {
        let mut s = ContentScanner::new(Framing::DotTerminated, 1000, 100, plenty());
        let (n, done) = s.ingest(input);
        (n, done, s.finish())
    }

    #[test]
    fn ends_only_at_crlf_dot_crlf() {
        let (n, done, body) = data(b"Subject: x\r\n\r\nhi\r\n.\r\nMAIL");
        assert!(done);
        assert_eq!(n, 21);
        assert_eq!(body.unwrap(), b"Subject: x\r\n\r\nhi\r\n");
    }

    #[test]
    fn empty_message_ends_at_first_dot_line() {
        let (n, done, body) = data(b".\r\n");
        assert!(done);
        assert_eq!(n, 3);
        assert_eq!(body.unwrap(), b"");
    }

    #[test]
    fn lf_dot_lf_and_other_bare_forms_never_end_data() {
        for input in [
            &b"a\r\n.\nb"[..],
            b"a\n.\nb",
            b"a\n.\r\nb",
            b"a\r.\rb",
            b"a\r.\r\nb",
            b"a\r\n.\rb",
        ] {
            let (_, done, body) = data(input);
            assert!(!done, "{input:?} ended data");
            assert_eq!(body, Err(ContentError::BareLineEnding), "{input:?}");
        }
    }

    #[test]
    fn unstuffs_leading_dots() {
        let (_, done, body) = data(b"..x\r\n...\r\n.\r\n");
        assert!(done);
        assert_eq!(body.unwrap(), b".x\r\n..\r\n");
    }

    #[test]
    fn finds_end_split_across_feeds() {
        let mut s = ContentScanner::new(Framing::DotTerminated, 1000, 100, plenty());
        for part in [&b"hi\r"[..], b"\n", b".", b"\r", b"\n"] {
            let (n, done) = s.ingest(part);
            assert_eq!(n, part.len());
            if done {
                assert_eq!(s.finish().unwrap(), b"hi\r\n");
                return;
            }
        }
        panic!("end of data not found");
    }

    #[test]
    fn same_result_whatever_the_read_boundaries() {
        let input = b"Subject: x\r\n\r\n..dot\r\nline two\r\n.\r\nNEXT";
        let mut whole = ContentScanner::new(Framing::DotTerminated, 1000, 100, plenty());
        let (n_whole, done) = whole.ingest(input);
        assert!(done);
        let expected = whole.finish().unwrap();
        for split in 1..input.len() {
            let mut s = ContentScanner::new(Framing::DotTerminated, 1000, 100, plenty());
            let mut used = 0;
            let mut ended = false;
            for part in input.chunks(split) {
                let (n, done) = s.ingest(part);
                used += n;
                if done {
                    ended = true;
                    break;
                }
            }
            assert!(ended, "split {split}");
            assert_eq!(used, n_whole, "split {split}");
            assert_eq!(s.finish().unwrap(), expected, "split {split}");
        }
    }

    #[test]
    fn flags_line_longer_than_limit() {
        let mut line = vec![b'a'; 99];
        line.extend_from_slice(b"\r\n.\r\n");
        let (_, done, body) = data(&line);
        assert!(done);
        assert_eq!(body, Err(ContentError::LineTooLong));
        let mut ok = vec![b'a'; 98];
        ok.extend_from_slice(b"\r\n.\r\n");
        assert!(data(&ok).2.is_ok());
    }

    #[test]
    fn flags_oversized_message_but_still_finds_end() {
        let mut s = ContentScanner::new(Framing::DotTerminated, 10, 100, plenty());
        let (_, done) = s.ingest(b"0123456789\r\n.\r\n");
        assert!(done);
        assert_eq!(s.finish(), Err(ContentError::TooBig));
    }

    #[test]
    fn the_first_limit_reached_names_the_rejection_whatever_the_read_boundaries() {
        // The size limit is passed at the 11th byte, the line limit at the 20th: the message
        // is too big, whether the line arrives in one read or in two.
        let input = b"aaaaaaaaaaaaaaaaaaaaaaaaa\r\n.\r\n";
        for split in [input.len(), 12] {
            let mut s = ContentScanner::new(Framing::DotTerminated, 10, 20, plenty());
            let (head, tail) = input.split_at(split);
            let (n, done) = s.ingest(head);
            assert_eq!((n, done), (head.len(), tail.is_empty()));
            if !tail.is_empty() {
                assert_eq!(s.ingest(tail), (tail.len(), true));
            }
            assert_eq!(s.finish(), Err(ContentError::TooBig), "split {split}");
        }
    }

    #[test]
    fn chunked_keeps_dots_and_adds_final_crlf() {
        let mut s = ContentScanner::new(Framing::Chunked, 1000, 100, plenty());
        assert_eq!(s.ingest(b".\r\n.x"), (5, false));
        assert_eq!(s.finish().unwrap(), b".\r\n.x\r\n");
    }

    #[test]
    fn chunked_rejects_cr_split_from_nothing_at_end() {
        let mut s = ContentScanner::new(Framing::Chunked, 1000, 100, plenty());
        s.ingest(b"a\r");
        assert_eq!(s.finish(), Err(ContentError::BareLineEnding));
        let mut s = ContentScanner::new(Framing::Chunked, 1000, 100, plenty());
        s.ingest(b"a\r");
        s.ingest(b"\nb\r\n");
        assert_eq!(s.finish().unwrap(), b"a\r\nb\r\n");
    }
}
