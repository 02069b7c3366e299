//! Reading bounce prose: the non-standard bounces real MTAs send (Postfix, Sendmail, Exim,
//! qmail, Exchange, Gmail, ...) are recognised by their text, not by a per-MTA module: the
//! error section (before the returned message), the failed addresses in it, and for each one
//! the diagnostic that follows it, its reply code, enhanced status and failing SMTP command.

use std::sync::LazyLock;

use regex::Regex;

// The regexes below are literals checked by the tests; building them cannot fail at run time.
#[allow(clippy::expect_used)]
fn re(pattern: &str) -> Regex {
    Regex::new(pattern).expect("static regex")
}

static ENHANCED: LazyLock<Regex> =
    LazyLock::new(|| re(r"(?:^|[^\d.])([245]\.\d{1,3}\.\d{1,3})(?:[^\d.]|\.(?:\D|$)|$)"));
/// A section banner of a bounce's text (`----- Transcript of session follows -----`,
/// `---The following addresses had delivery errors---`, `|--- Message text follows: ---|`):
/// words between two runs of three or more dashes, spaced alike on both sides, with nothing
/// that could be part of a reply in them. A label after a rule (`-------SMTP command DATA
/// -------next label`) is spaced unlike a banner and keeps its words.
static BANNER: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"\|?-{3,}(?:[ \t]+[A-Za-z][A-Za-z ':,.-]{0,78}?[ \t]+|[A-Za-z][A-Za-z ':,.-]{0,78}?[A-Za-z:.])-{3,}\|?",
    )
});
/// A run of dashes used as a rule or a label's marker (`-------server message 550 ...`).
static DASHES: LazyLock<Regex> = LazyLock::new(|| re(r"\|?-{3,}\|?"));

/// `diagnostic` without the section banners and dash rules that bounce texts put between
/// their parts (the words of the banner say where the text is, not what went wrong), or None
/// when it has none or would be left empty.
pub fn strip_banners(diagnostic: &str) -> Option<String> {
    memchr::memmem::find(diagnostic.as_bytes(), b"---")?;
    let without = BANNER.replace_all(diagnostic, " ");
    let without = DASHES.replace_all(&without, " ");
    let tidy = without.split_whitespace().collect::<Vec<_>>().join(" ");
    (!tidy.is_empty() && tidy != diagnostic).then_some(tidy)
}

static REPLY: LazyLock<Regex> =
    LazyLock::new(|| re(r"(?:^|[\s:;(<\[#=])([45][0-5]\d)(?:[ \-]|$|\)|\]|,|\.\s)"));
/// The phrases that name the failed SMTP command, written for collapsed text (single spaces).
const COMMAND_PATTERN: &str = r"(?i)(?:after|in reply to|response to|for|during|while|>>>|smtp command:?|command|did not like our|most progress was) ?(?:the )?(?:end of data|final data|data|mail from|rcpt to|rcpt|helo|ehlo|connect|starttls|mail|initial connection)(?-u:\b)|(?-u:\b)(?:mail from|rcpt to|end of data|data|ehlo|helo)(?: command)?:? (?:rejected|failed|refused|response)|\[(?:rcpt_to|mail_from|data)\]|does not like recipient|sender was rejected|failed after i sent the message|(?:connected|connection) (?:to [^ ]+ )?but (?:greeting|my name) (?:failed|was rejected)";

static COMMAND: LazyLock<Regex> = LazyLock::new(|| re(COMMAND_PATTERN));

/// [`COMMAND_PATTERN`] loosened for text not yet collapsed: a space is any white-space run,
/// an optional one any run or none, `[^ ]` any non-space, and no word boundaries. Whatever
/// COMMAND finds in the collapsed form of a line-aligned piece of a text, this finds in the
/// text itself.
static COMMAND_UNCOLLAPSED: LazyLock<Regex> = LazyLock::new(|| {
    re(&COMMAND_PATTERN
        .replace(r"(?-u:\b)", "")
        .replace(" ?", r"\s*")
        .replace(' ', r"\s+")
        .replace("[^\\s+]", r"\S"))
});

/// Whether [`find_command`] may find a command in the collapsed form of some line-aligned
/// part of `text` (a prose segment): when this says no, no segment names one.
pub fn may_name_command(text: &str) -> bool {
    COMMAND_UNCOLLAPSED.is_match(text)
}
/// An address in prose: what [`addresses`] finds (it matches this by hand; tests compare).
#[cfg(test)]
static ADDRESS: LazyLock<Regex> = LazyLock::new(|| {
    re(
        &r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\-U]+@(?:[A-Za-z0-9U](?:[A-Za-z0-9\-U]*[A-Za-z0-9U])?\.)+[A-Za-zU]{2,}|[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\-U]+@\[[0-9.]+\]"
            .replace('U', &utf8_class()),
    )
});
/// The non-ASCII characters [`is_utf8_address_char`] takes, as the inside of a regex class.
#[cfg(test)]
fn utf8_class() -> String {
    let spaceless: String = SPACELESS_SCRIPTS
        .iter()
        .map(|r| {
            format!(
                "\\x{{{:X}}}-\\x{{{:X}}}",
                *r.start() as u32,
                *r.end() as u32
            )
        })
        .collect();
    format!("[[\\p{{Alphabetic}}\\p{{N}}]--[\\p{{ASCII}}{spaceless}]]")
}
/// The header line the returned message's header block is recognised by, as one regex; the
/// scan uses [`is_header_line`] (the same lines, found without a regex) and tests compare them.
#[cfg(test)]
static HEADER_LINE: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?mi)^(received|return-path|message-id|from|to|subject|date|x-[a-z0-9-]+|dkim-signature|mime-version|content-type|delivered-to|reply-to|cc|sender|authentication-results|arc-[a-z-]+|domainkey-signature|references|in-reply-to|list-[a-z-]+|precedence|importance|thread-[a-z]+|user-agent|content-transfer-encoding):(?: |[^\s])",
    )
});

/// The phrases of a line that introduces the returned message, after any run of punctuation
/// and blank lines that opens it. Searched anchored, only at lines whose first word opens one
/// of them ([`MARKER_WORDS`]).
const MARKER_PHRASES: &str = r"(?:below this line is a copy of the message|this is a copy of the (?:message|headers)|original message (?:follows|headers?)|(?:the )?(?:header|headers) of (?:the )?original message|returned message|your message (?:reads|follows|was(?:$|[^n']| [^n]))|original message|message headers follow|unsent message below|undelivered message (?:headers )?follows|copy of (?:the )?original message|the original message (?:headers )?(?:is|are) (?:attached|included|below|as follows)|original message (?:text|header)|content-type: message/rfc822|content-type: text/rfc822-headers|start of returned message)";

static MARKER_AT: LazyLock<Regex> = LazyLock::new(|| re(&format!("(?i)^{MARKER_PHRASES}")));

/// The marker regex the line scan replaces (tests compare them).
#[cfg(test)]
static MARKER: LazyLock<Regex> = LazyLock::new(|| {
    re(&format!(
        r"(?mi)^\W*(?:-{{2,}}|={{2,}}|\*{{2,}}|_{{2,}})?\s*{MARKER_PHRASES}"
    ))
});

/// The first words (ASCII letters, lowercase) of [`MARKER_PHRASES`].
const MARKER_WORDS: &[&str] = &[
    "below",
    "this",
    "original",
    "the",
    "header",
    "headers",
    "returned",
    "your",
    "message",
    "unsent",
    "undelivered",
    "copy",
    "content",
    "start",
];

static CONTINUATION: LazyLock<Regex> =
    LazyLock::new(|| re(r"([2-5]\d\d)-((?:[2-5]\.\d{1,3}\.\d{1,3} )?)"));

/// Joins the lines of a multi-line SMTP reply flattened into one line: after its first
/// `550-5.2.1 ` prefix, the later `550-5.2.1 ` and final `550 5.2.1 ` prefixes are removed,
/// so a phrase broken across reply lines reads whole.
pub fn join_reply_lines(flat: &str) -> String {
    let Some(first) = CONTINUATION.captures(flat) else {
        return flat.to_string();
    };
    let (Some(whole), Some(code)) = (first.get(0), first.get(1)) else {
        return flat.to_string();
    };
    let status = first.get(2).map_or("", |m| m.as_str());
    let code = code.as_str();
    let head = flat.get(..whole.end()).unwrap_or(flat);
    let tail = flat.get(whole.end()..).unwrap_or("");
    let tail = tail
        .replace(&format!(" {code}-{status}"), " ")
        .replace(&format!(" {code} {status}"), " ");
    let mut out = String::with_capacity(flat.len());
    out.push_str(head);
    out.push_str(&tail.split_whitespace().collect::<Vec<_>>().join(" "));
    out
}

/// Whether `text` holds the `550-` of a multi-line reply ([`join_reply_lines`] changes
/// nothing otherwise): a hyphen after a reply code, found without the regex. Text with
/// non-ASCII characters (which may be Unicode digits to `\d`) is left to the regex.
pub fn may_continue_reply(text: &str) -> bool {
    let bytes = text.as_bytes();
    !text.is_ascii()
        || memchr::memchr_iter(b'-', bytes).any(|i| {
            i >= 3
                && bytes
                    .get(i - 3..i)
                    .is_some_and(|c| matches!(c, [b'2'..=b'5', b'0'..=b'9', b'0'..=b'9']))
        })
}

/// The first enhanced status code (RFC 3463) in `text`, e.g. `5.1.1`.
pub fn find_enhanced_status(text: &str) -> Option<String> {
    if text.is_ascii() {
        let found = enhanced_status_ascii(text.as_bytes());
        return found.and_then(|r| text.get(r)).map(str::to_string);
    }
    enhanced_status_by_regex(text)
}

/// [`find_enhanced_status`] by the regex, whatever the text.
fn enhanced_status_by_regex(text: &str) -> Option<String> {
    ENHANCED
        .captures_iter(text)
        .filter_map(|c| c.get(1))
        .map(|m| m.as_str().to_string())
        .find(|s| {
            s.split('.')
                .nth(1)
                .is_some_and(|subject| subject.len() <= 3)
        })
}

static REPLY_STATUS: LazyLock<Regex> =
    LazyLock::new(|| re(r"(?:^|[^\d])[245]\d\d[ -]['\x22]?([245]\.\d{1,3}\.\d{1,3})(?:[^\d.]|$)"));

/// The enhanced status code that follows a reply code (`550 5.7.1`, `550-'5.7.1`): the
/// remote server's own, which beats any code the reporting MTA wrote around it.
pub fn find_reply_status(text: &str) -> Option<String> {
    if text.is_ascii() {
        let found = reply_status_ascii(text.as_bytes());
        return found.and_then(|r| text.get(r)).map(str::to_string);
    }
    reply_status_by_regex(text)
}

/// [`find_reply_status`] by the regex, whatever the text.
fn reply_status_by_regex(text: &str) -> Option<String> {
    REPLY_STATUS
        .captures(text)
        .and_then(|c| c.get(1))
        .map(|m| m.as_str().to_string())
}

/// The first 4xx/5xx SMTP reply code in `text`.
pub fn find_reply_code(text: &str) -> Option<u16> {
    if text.is_ascii() {
        return reply_code_ascii(text.as_bytes());
    }
    reply_code_by_regex(text)
}

/// [`find_reply_code`] by the regex, whatever the text.
fn reply_code_by_regex(text: &str) -> Option<u16> {
    REPLY
        .captures_iter(text)
        .filter_map(|c| c.get(1))
        .filter_map(|m| m.as_str().parse::<u16>().ok())
        .next()
}

// The scanners below find, in ASCII text, the first match of the regex named in each (the
// regexes still read text with other characters, whose Unicode digits and spaces they know):
// each candidate is found with a byte search and checked by hand, in the order of the
// positions where its match would start, so the first that fits is the regex's leftmost
// match. Tests compare them with the regexes on random text.

/// Where the first [`ENHANCED`] match's status code is: `[245].d{1,3}.d{1,3}`, not after a
/// digit or `.`, and followed by the end, a byte that is neither digit nor `.`, or a `.`
/// that is not followed by a digit.
fn enhanced_status_ascii(b: &[u8]) -> Option<std::ops::Range<usize>> {
    memchr::memchr_iter(b'.', b).find_map(|dot| {
        let class = dot.checked_sub(1)?;
        if !status_may_follow(b, class) {
            return None;
        }
        let detail_end = status_code_end(b, class)?;
        let ends = match b.get(detail_end) {
            None => true,
            Some(b'.') => !b.get(detail_end + 1).is_some_and(u8::is_ascii_digit),
            Some(c) => !c.is_ascii_digit(),
        };
        ends.then_some(class..detail_end)
    })
}

/// Whether a status code may start at `at` for [`ENHANCED`]: at the start, or after a byte
/// that is neither a digit nor `.`.
fn status_may_follow(b: &[u8], at: usize) -> bool {
    at == 0
        || b.get(at - 1)
            .is_some_and(|&c| !c.is_ascii_digit() && c != b'.')
}

/// Where the status code `[245].d{1,3}.d{1,3}` that starts at `class` ends, if one does
/// (each number the whole run of digits there, as the regexes' bounded repeats match it).
fn status_code_end(b: &[u8], class: usize) -> Option<usize> {
    if !matches!(b.get(class), Some(b'2' | b'4' | b'5')) || b.get(class + 1) != Some(&b'.') {
        return None;
    }
    let subject_end = short_digit_run(b, class + 2)?;
    if b.get(subject_end) != Some(&b'.') {
        return None;
    }
    short_digit_run(b, subject_end + 1)
}

/// The end of the run of digits at `start` when it is one to three long (`\d{1,3}` followed
/// by something other than a digit: no shorter match of it can be followed by anything else).
fn short_digit_run(b: &[u8], start: usize) -> Option<usize> {
    let n = b
        .get(start..)?
        .iter()
        .take(4)
        .take_while(|c| c.is_ascii_digit())
        .count();
    (1..=3).contains(&n).then_some(start + n)
}

/// The first [`REPLY`] match's code: `[45][0-5]\d` at the start or after white space or one
/// of `:;(<[#=` (`;` for Exchange's `#5.1.1 smtp;550 5.1.1 ...`), followed by the end, one of ` -)],`, or `.` and white space.
fn reply_code_ascii(b: &[u8]) -> Option<u16> {
    let space = |c: &u8| is_white_space_byte(*c);
    memchr::memchr2_iter(b'4', b'5', b).find_map(|at| {
        let [first, second, third] = *b.get(at..at + 3)? else {
            return None;
        };
        let after_ok = at == 0
            || b.get(at - 1)
                .is_some_and(|c| space(c) || b":;(<[#=".contains(c));
        let ends = match b.get(at + 3) {
            None | Some(b' ' | b'-' | b')' | b']' | b',') => true,
            Some(b'.') => b.get(at + 4).is_some_and(space),
            Some(_) => false,
        };
        (after_ok && ends && matches!(second, b'0'..=b'5') && third.is_ascii_digit()).then(|| {
            u16::from(first - b'0') * 100 + u16::from(second - b'0') * 10 + u16::from(third - b'0')
        })
    })
}

/// Where the first [`REPLY_STATUS`] match's status code is: a reply code `[245]\d\d` at the
/// start or after a non-digit, then ` ` or `-`, an optional quote, and `[245].d{1,3}.d{1,3}`
/// followed by the end or a byte that is neither digit nor `.`.
fn reply_status_ascii(b: &[u8]) -> Option<std::ops::Range<usize>> {
    memchr::memchr3_iter(b'2', b'4', b'5', b).find_map(|code| {
        let reply = b.get(code..code + 4)?;
        let after_ok = code == 0 || b.get(code - 1).is_some_and(|c| !c.is_ascii_digit());
        if !after_ok
            || !reply.get(1..3)?.iter().all(u8::is_ascii_digit)
            || !matches!(reply.get(3), Some(b' ' | b'-'))
        {
            return None;
        }
        let quoted = matches!(b.get(code + 4), Some(b'\'' | b'"'));
        let class = code + 4 + usize::from(quoted);
        let detail_end = status_code_end(b, class)?;
        let ends = b
            .get(detail_end)
            .is_none_or(|c| !c.is_ascii_digit() && *c != b'.');
        ends.then_some(class..detail_end)
    })
}

/// The SMTP command a diagnostic says failed (`MAIL`, `RCPT`, `DATA`, `HELO`, `CONN`).
pub fn find_command(text: &str) -> Option<&'static str> {
    let m = COMMAND.find(text)?;
    let s = m.as_str().to_ascii_lowercase();
    // qmail's "failed after I sent the message": the reply to the message's end, after DATA.
    Some(if s.contains("sent the message") {
        "DATA"
    } else if s.contains("rcpt") || s.contains("recipient") {
        "RCPT"
    } else if s.contains("mail") || s.contains("sender") {
        "MAIL"
    } else if s.contains("data") {
        "DATA"
    } else if s.contains("helo")
        || s.contains("ehlo")
        || s.contains("greeting")
        || s.contains("my name")
    {
        "HELO"
    } else if s.contains("starttls") {
        "STARTTLS"
    } else {
        "CONN"
    })
}

/// Every e-mail address in `text`, in order, with its byte offset. The same matches as
/// `ADDRESS.find_iter(text)`, found faster: only the run of address characters around each
/// `@` is looked at (there is exactly one `@` in such a run, and the match that uses it starts
/// where the run of local-part characters does), and its domain matched by hand.
///
/// Besides ASCII, a local part and a domain label may hold letters and digits of other
/// scripts (RFC 6531 addresses, `jürgen@müller.example`), except of the scripts written
/// without spaces between words ([`SPACELESS_SCRIPTS`]): there an address abuts the prose
/// around it, and only its ASCII part can be told apart from the words before and after.
pub fn addresses(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let bytes = text.as_bytes();
    let mut resume = 0;
    memchr::memchr_iter(b'@', bytes).filter_map(move |at| {
        if at < resume {
            return None;
        }
        let mut start = at;
        while start > resume {
            match bytes.get(start - 1) {
                Some(&b) if b.is_ascii() && is_local_byte(b) => start -= 1,
                Some(&b) if !b.is_ascii() => match text.get(..start)?.chars().next_back() {
                    Some(c) if is_utf8_address_char(c) && start - c.len_utf8() >= resume => {
                        start -= c.len_utf8();
                    }
                    _ => break,
                },
                _ => break,
            }
        }
        let mut end = at + 1;
        while let Some(&b) = bytes.get(end) {
            if b.is_ascii() {
                if !is_domain_byte(b) {
                    break;
                }
                end += 1;
            } else {
                match text.get(end..)?.chars().next() {
                    Some(c) if is_utf8_address_char(c) => end += c.len_utf8(),
                    _ => break,
                }
            }
        }
        if start == at {
            return None;
        }
        let m_end = at + 1 + domain_end(text.get(at + 1..end)?)?;
        resume = m_end;
        let a = text
            .get(start..m_end)?
            .trim_matches(|c| c == '.' || c == '\'');
        Some((start, a))
    })
}

/// The scripts whose letters [`addresses`] does not take as part of an address: Thai, Lao,
/// Myanmar, Khmer, Hangul, the CJK ideographs, kana and symbols, and the full-width forms.
const SPACELESS_SCRIPTS: [std::ops::RangeInclusive<char>; 11] = [
    '\u{0E00}'..='\u{0EFF}',
    '\u{1000}'..='\u{109F}',
    '\u{1100}'..='\u{11FF}',
    '\u{1780}'..='\u{17FF}',
    '\u{2E80}'..='\u{2FDF}',
    '\u{3000}'..='\u{9FFF}',
    '\u{A960}'..='\u{A97F}',
    '\u{AC00}'..='\u{D7FF}',
    '\u{F900}'..='\u{FAFF}',
    '\u{FF00}'..='\u{FFEF}',
    '\u{20000}'..='\u{3FFFF}',
];

/// A non-ASCII character an address may hold: a letter or digit outside
/// [`SPACELESS_SCRIPTS`].
fn is_utf8_address_char(c: char) -> bool {
    !c.is_ascii() && c.is_alphanumeric() && !SPACELESS_SCRIPTS.iter().any(|r| r.contains(&c))
}

/// Where the domain of an `ADDRESS` match ends in `domain` (the run of domain characters
/// after the `@`), as the regex prefers it: the most `label.` parts that a top-level domain of
/// two or more letters (as many as there are) still follows, else an address literal. A
/// non-ASCII letter or digit ([`is_utf8_address_char`]) counts as a letter.
fn domain_end(domain: &str) -> Option<usize> {
    let is_alnum = |c: char| c.is_ascii_alphanumeric() || is_utf8_address_char(c);
    let is_letter = |c: char| c.is_ascii_alphabetic() || is_utf8_address_char(c);
    let at = |i: usize| match domain.as_bytes().get(i) {
        Some(&b) if b.is_ascii() => Some(char::from(b)),
        Some(_) => domain.get(i..).and_then(|s| s.chars().next()),
        None => None,
    };
    // After each `label.` (a label starts and ends with a letter or digit, and the dot
    // after it fixes where it ends), the letters there; the last `label.` with two or more
    // letters after it is where the regex's greedy repetition settles.
    let mut end = None;
    let mut q = 0;
    while at(q).is_some_and(is_alnum) {
        let mut e = q;
        let mut last = None;
        while let Some(c) = at(e).filter(|&c| is_alnum(c) || c == '-') {
            last = Some(c);
            e += c.len_utf8();
        }
        if at(e) != Some('.') || !last.is_some_and(is_alnum) {
            break;
        }
        q = e + 1;
        let mut t = q;
        let mut letters = 0;
        while let Some(c) = at(t).filter(|&c| is_letter(c)) {
            letters += 1;
            t += c.len_utf8();
        }
        if letters >= 2 {
            end = Some(t);
        }
    }
    if end.is_some() {
        return end;
    }
    // An address literal: `[` digits and dots `]`.
    let domain = domain.as_bytes();
    if domain.first() == Some(&b'[') {
        let n = domain
            .get(1..)?
            .iter()
            .take_while(|b| b.is_ascii_digit() || **b == b'.')
            .count();
        if n > 0 && domain.get(1 + n) == Some(&b']') {
            return Some(n + 2);
        }
    }
    None
}

/// A byte of `ADDRESS`'s local part.
fn is_local_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+/=?^_`{|}~.-".contains(&b)
}

/// A byte of `ADDRESS`'s domain (a name, or an address literal in brackets).
fn is_domain_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-.[]".contains(&b)
}

/// Whether the line at byte `start` of `body` starts a header block of an embedded
/// (returned) message: a known header name followed by two more header or continuation lines.
fn starts_header_block(body: &str, start: usize) -> bool {
    let Some(rest) = body.get(start..) else {
        return false;
    };
    let mut lines = lines(rest);
    if !lines.next().is_some_and(is_header_line) {
        return false;
    }
    let mut headers = 1;
    for l in lines.take(4) {
        if l.trim().is_empty() {
            break;
        }
        if l.starts_with([' ', '\t']) || is_header_line(l) {
            headers += 1;
        }
    }
    headers >= 3
}

/// Header names that open a returned message's header block.
const HEADER_NAMES: &[&str] = &[
    "received",
    "return-path",
    "message-id",
    "from",
    "to",
    "subject",
    "date",
    "dkim-signature",
    "mime-version",
    "content-type",
    "delivered-to",
    "reply-to",
    "cc",
    "sender",
    "authentication-results",
    "domainkey-signature",
    "references",
    "in-reply-to",
    "precedence",
    "importance",
    "user-agent",
    "content-transfer-encoding",
];

/// Whether `line` starts with a header name of [`HEADER_NAMES`] (or `X-`, `ARC-`, `List-`,
/// `Thread-` names) followed by `": "`, in any case.
fn is_header_line(line: &str) -> bool {
    // Most lines are prose: their first letter opens no header name (the long s is `C5 BF`).
    let first = line.as_bytes().first().map_or(0, u8::to_ascii_lowercase);
    if !b"acdfilmprstux\xc5".contains(&first) {
        return false;
    }
    let Some(colon) = memchr::memchr(b':', line.as_bytes()) else {
        return false;
    };
    // `Name: value`, or `Name:value` as some MTAs quote the returned header (RFC 5322 needs
    // no space); not `Name:` followed by other white space or nothing.
    let after = line.get(colon + 1..).and_then(|s| s.chars().next());
    if !after.is_some_and(|c| c == ' ' || !c.is_whitespace()) {
        return false;
    }
    let mut buf = [0u8; 64];
    let Some(name) = line.get(..colon).and_then(|n| case_folded(n, &mut buf)) else {
        // Longer than any literal name: only an `X-` name can be that long.
        return long_x_name(line.get(..colon).unwrap_or_default());
    };
    let tail_of = |prefix: &str| {
        name.strip_prefix(prefix.as_bytes())
            .filter(|t| !t.is_empty())
    };
    let all =
        |t: &[u8], extra: fn(u8) -> bool| t.iter().all(|&b| b.is_ascii_lowercase() || extra(b));
    HEADER_NAMES.iter().any(|n| name == n.as_bytes())
        || tail_of("x-").is_some_and(|t| all(t, |b| b.is_ascii_digit() || b == b'-'))
        || tail_of("arc-").is_some_and(|t| all(t, |b| b == b'-'))
        || tail_of("list-").is_some_and(|t| all(t, |b| b == b'-'))
        || tail_of("thread-").is_some_and(|t| all(t, |_| false))
}

/// Whether `name` is `X-` and `[a-z0-9-]+` in any case (a name too long for [`case_folded`]).
fn long_x_name(name: &str) -> bool {
    let mut chars = name.chars().map(|c| match c {
        '\u{212A}' => 'k',
        '\u{17F}' => 's',
        c => c.to_ascii_lowercase(),
    });
    chars.next() == Some('x')
        && chars.next() == Some('-')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// `name` in ASCII lower case in `buf`, as a case-insensitive regex compares it: the Kelvin
/// sign and the long s are `k` and `s`; any other non-ASCII character matches no header
/// name (`None`); `None` too for a name longer than `buf`.
fn case_folded<'b>(name: &str, buf: &'b mut [u8; 64]) -> Option<&'b [u8]> {
    let mut len = 0;
    for c in name.chars() {
        let b = match c {
            '\u{212A}' => b'k',
            '\u{17F}' => b's',
            c if c.is_ascii() => (c as u8).to_ascii_lowercase(),
            _ => return None,
        };
        *buf.get_mut(len)? = b;
        len += 1;
    }
    buf.get(..len)
}

/// A `\w` character of a Unicode regex.
fn is_word_char(c: char) -> bool {
    if c.is_ascii() {
        c.is_ascii_alphanumeric() || c == '_'
    } else {
        regex_syntax::is_word_character(c)
    }
}

/// Where the first [`is_word_char`] character of `s` is (`s.len()` when none): ASCII a byte
/// at a time, only other characters decoded.
fn first_word_char(s: &str) -> usize {
    let bytes = s.as_bytes();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b.is_ascii() {
            if b.is_ascii_alphanumeric() || b == b'_' {
                return i;
            }
            i += 1;
        } else {
            let Some(c) = s.get(i..).and_then(|r| r.chars().next()) else {
                break;
            };
            if is_word_char(c) {
                return i;
            }
            i += c.len_utf8();
        }
    }
    s.len()
}

/// Whether `text`'s first word is one of [`MARKER_WORDS`] (or holds a non-ASCII letter,
/// which case-insensitive matching may fold to one).
fn may_open_marker(text: &str) -> bool {
    let bytes = text.as_bytes();
    let len = bytes.iter().take_while(|b| b.is_ascii_alphabetic()).count();
    if bytes.get(len).is_some_and(|&b| !b.is_ascii()) {
        return true;
    }
    let word = bytes.get(..len).unwrap_or_default();
    len <= 11
        && MARKER_WORDS
            .iter()
            .any(|w| w.as_bytes().eq_ignore_ascii_case(word))
}

/// Splits a bounce body into (error section, returned message text if any). The returned
/// message starts after a marker line ("Below this line is a copy of the message") or at
/// the first embedded header block, whichever comes first.
///
/// One pass over the lines: a marker is [`MARKER_PHRASES`] after a run of non-word
/// characters (punctuation, blank lines) that starts a line, and the error section ends
/// where that run starts; a line is tried only when its first word opens a phrase. A header
/// block starts at a line that begins with a letter, so never inside such a run.
pub fn split_returned(body: &str) -> (&str, Option<&str>) {
    let mut line_start = 0;
    while line_start < body.len() {
        let Some(rest) = body.get(line_start..) else {
            break;
        };
        let skipped = first_word_char(rest);
        let phrase_at = line_start + skipped;
        let from_phrase = body.get(phrase_at..).unwrap_or_default();
        if may_open_marker(from_phrase)
            && let Some(m) = MARKER_AT.find(from_phrase)
        {
            let end = phrase_at + m.end();
            let line_end = body
                .get(end..)
                .and_then(|s| s.find('\n'))
                .map_or(body.len(), |i| end + i + 1);
            return (body.get(..line_start).unwrap_or(body), body.get(line_end..));
        }
        let at_line_start = phrase_at == 0 || body.as_bytes().get(phrase_at - 1) == Some(&b'\n');
        if at_line_start && starts_header_block(body, phrase_at) {
            return (body.get(..phrase_at).unwrap_or(body), body.get(phrase_at..));
        }
        line_start =
            memchr::memchr(b'\n', from_phrase.as_bytes()).map_or(body.len(), |i| phrase_at + i + 1);
    }
    (body, None)
}

/// Header fields of an embedded message (unfolded; names lowercased), read from its start
/// until the first blank line. Leading non-header lines are skipped.
pub fn header_fields(text: &str) -> Vec<(String, String)> {
    header_fields_where(text, |name| Some(name.to_ascii_lowercase())).0
}

/// [`header_fields`] with only the fields `keep` names (given the name as written; it says
/// what to store as the name, say a static lowercase spelling), and whether the block holds
/// any field at all: the others are read past, never copied.
pub fn header_fields_where<K>(
    text: &str,
    keep: impl Fn(&str) -> Option<K>,
) -> (Vec<(K, String)>, bool) {
    let mut out: Vec<(K, String)> = Vec::new();
    let mut started = false;
    // Whether the field being read (and so its continuation lines) is kept.
    let mut kept = false;
    for raw in lines(text) {
        let line = raw.trim_end_matches('\r');
        if is_blank_line(line) {
            if started {
                break;
            }
            continue;
        }
        if started && line.starts_with([' ', '\t']) {
            if kept && let Some((_, v)) = out.last_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
            continue;
        }
        match split_at_colon(line) {
            // (A space is not a graphic byte: a name holds none.)
            Some((name, value))
                if !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                started = true;
                let key = keep(name);
                kept = key.is_some();
                if let Some(key) = key {
                    out.push((key, value.trim().to_string()));
                }
            }
            _ => {
                if started {
                    break;
                }
            }
        }
    }
    (out, started)
}

/// `line.split_once(':')`, found with the SIMD byte search.
pub(crate) fn split_at_colon(line: &str) -> Option<(&str, &str)> {
    let i = memchr::memchr(b':', line.as_bytes())?;
    Some((line.get(..i)?, line.get(i + 1..)?))
}

/// Whether `line` is empty or white space only (Unicode white space, as `str::trim` has it).
/// A line that starts with a printable ASCII byte, as nearly every line does, is not
/// trimmed to see.
#[inline]
pub(crate) fn is_blank_line(line: &str) -> bool {
    !line.as_bytes().first().is_some_and(u8::is_ascii_graphic) && line.trim().is_empty()
}

/// Whether `b` is an ASCII byte that Unicode calls white space (`char::is_whitespace`, the
/// regex `\s`): tab, line feed, vertical tab, form feed, carriage return and space. Not
/// `u8::is_ascii_whitespace`, which leaves out the vertical tab.
pub(crate) fn is_white_space_byte(b: u8) -> bool {
    matches!(b, b' ' | b'\t'..=b'\r')
}

/// `text.lines()` without their `\r\n` or `\n`, found with the SIMD byte search.
pub(crate) fn lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let Some(i) = memchr::memchr(b'\n', rest.as_bytes()) else {
            // The last line, without a line break: kept as it is (a lone CR too).
            return Some(std::mem::take(&mut rest));
        };
        let line = rest.get(..i)?;
        rest = rest.get(i + 1..)?;
        Some(line.strip_suffix('\r').unwrap_or(line))
    })
}

/// Removes HTML tags and the commonest entities, keeping line structure roughly: a line
/// break for `<br>`, `<p>` and the ends of paragraphs, divisions and table rows. The text
/// between tags is copied in runs and the entities decoded in one pass over it.
pub fn strip_html(html: &str) -> String {
    let mut text = String::with_capacity(html.len());
    let mut rest = html;
    while let Some(lt) = memchr::memchr(b'<', rest.as_bytes()) {
        text.push_str(rest.get(..lt).unwrap_or_default());
        let tag_and_after = rest.get(lt + 1..).unwrap_or_default();
        let Some(gt) = memchr::memchr(b'>', tag_and_after.as_bytes()) else {
            // An unclosed tag runs to the end.
            rest = "";
            break;
        };
        let tag = tag_and_after.as_bytes().get(..gt).unwrap_or_default();
        if ["br", "/p", "/div", "/tr", "p"]
            .iter()
            .any(|p| starts_with_ignore_ascii_case(tag, p))
        {
            text.push('\n');
        }
        rest = tag_and_after.get(gt + 1..).unwrap_or_default();
    }
    text.push_str(rest);
    decode_entities(&text)
}

fn starts_with_ignore_ascii_case(bytes: &[u8], prefix: &str) -> bool {
    bytes
        .get(..prefix.len())
        .is_some_and(|b| b.eq_ignore_ascii_case(prefix.as_bytes()))
}

/// The entities [`strip_html`] decodes. `&amp;` is decoded last in the sense that what it
/// gives is never read again as the start of another entity.
const ENTITIES: &[(&str, &str)] = &[
    ("&nbsp;", " "),
    ("&lt;", "<"),
    ("&gt;", ">"),
    ("&quot;", "\""),
    ("&#39;", "'"),
    ("&amp;", "&"),
];

/// `text` with [`ENTITIES`] decoded, as replacing each in turn over the whole text would:
/// no replacement creates another entity, so one left-to-right pass gives the same.
fn decode_entities(text: &str) -> String {
    if memchr::memchr(b'&', text.as_bytes()).is_none() {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = memchr::memchr(b'&', rest.as_bytes()) {
        out.push_str(rest.get(..amp).unwrap_or_default());
        let from = rest.get(amp..).unwrap_or_default();
        match ENTITIES.iter().find(|(e, _)| from.starts_with(e)) {
            Some((entity, decoded)) => {
                out.push_str(decoded);
                rest = from.get(entity.len()..).unwrap_or_default();
            }
            None => {
                out.push('&');
                rest = from.get(1..).unwrap_or_default();
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn section_banners_and_dash_rules_are_stripped_from_a_diagnostic() {
        let cases = [
            (
                "----- Transcript of session follows ----- 421 example.com (smtp)... Deferred \
                 ----- Unsent message follows -----",
                Some("421 example.com (smtp)... Deferred"),
            ),
            (
                "------- Failure Reasons -------- User not listed in public Name & Address Book",
                Some("User not listed in public Name & Address Book"),
            ),
            (
                "a@example.org ---The following addresses had delivery errors--- b@example.org \
                 [User unknown]",
                Some("a@example.org b@example.org [User unknown]"),
            ),
            (
                "a@example.org ... unknown host |--------- Message text follows: ---------|",
                Some("a@example.org ... unknown host"),
            ),
            // A label after a rule keeps its words; the reply between rules is never a banner.
            (
                "a@example.org -------server message 550 unknown user -------SMTP command DATA \
                 -------original mail info",
                Some(
                    "a@example.org server message 550 unknown user SMTP command DATA original mail info",
                ),
            ),
            // Nothing to strip, or nothing left.
            ("550-5.1.1 The email account does not exist", None),
            ("----- Transcript of session follows -----", None),
        ];
        for (text, want) in cases {
            assert_eq!(super::strip_banners(text).as_deref(), want, "{text}");
        }
    }

    #[test]
    fn status_and_reply_code_scanners_match_the_regexes() {
        let pieces = crate::test_support::test_chars("245013.9 -'\":;(<[#=\t\n\x0b\x0c\x1c,)]x");
        let mut pieces = pieces;
        for p in [
            "550",
            "5.1.1",
            "4.2.22",
            "250-",
            "550 5.7.1",
            "452-'4.2.2",
            "1234",
            "5.1.",
            ".5",
        ] {
            pieces.push(p.to_string());
        }
        let mut rng = crate::test_support::TestRng::new(0xbb67_ae85_84ca_a73b);
        let (mut statuses, mut codes, mut reply_statuses) = (0, 0, 0);
        for _ in 0..30_000 {
            let t = rng.text(14, &pieces);
            let status = enhanced_status_by_regex(&t);
            assert_eq!(find_enhanced_status(&t), status, "{t:?}");
            let code = reply_code_by_regex(&t);
            assert_eq!(find_reply_code(&t), code, "{t:?}");
            let reply_status = reply_status_by_regex(&t);
            assert_eq!(find_reply_status(&t), reply_status, "{t:?}");
            statuses += usize::from(status.is_some());
            codes += usize::from(code.is_some());
            reply_statuses += usize::from(reply_status.is_some());
        }
        // The pieces make every kind of result common enough to be compared.
        assert!(
            statuses > 3_000 && codes > 3_000 && reply_statuses > 1_000,
            "{statuses} {codes} {reply_statuses}"
        );
    }

    use super::*;

    /// `first_word_char` finds the first word character as decoding every character does.
    #[test]
    fn first_word_char_as_by_chars() {
        let alphabet = crate::test_support::test_chars(" \t\n-_.a9é\u{a0}語—\u{300}");
        let mut rng = crate::test_support::TestRng::new(0x3737_7777_3737_0006);
        for _ in 0..20_000 {
            let t = rng.text(12, &alphabet);
            let expected = t
                .char_indices()
                .find(|&(_, c)| is_word_char(c))
                .map_or(t.len(), |(i, _)| i);
            assert_eq!(first_word_char(&t), expected, "{t:?}");
        }
    }

    /// `addresses` finds exactly what a plain regex search over the whole text finds.
    #[test]
    fn addresses_match_a_whole_text_regex_search() {
        let slow = |t: &str| -> Vec<(usize, String)> {
            ADDRESS
                .find_iter(t)
                .map(|m| (m.start(), m.as_str().trim_matches(['.', '\'']).to_string()))
                .collect()
        };
        let fast = |t: &str| -> Vec<(usize, String)> {
            addresses(t).map(|(i, a)| (i, a.to_string())).collect()
        };
        let fixed = [
            "550 <a@example.org>: unknown; also b.c@x-y.example.net.",
            "a@b.com@c.org d@@e.org @f.org g@ h@i",
            "x@[192.0.2.1] 'quoted'@example.org é@example.org naïve@exämple.org",
            "...a@b.co... a-@-b.org a@b-.org a@b.c",
            "jürgen@remote.example «ünal@müller.example» アドレスuser@example.jpは",
        ];
        for t in fixed {
            assert_eq!(fast(t), slow(t), "{t:?}");
        }
        // Random strings over the characters that matter.
        let alphabet = crate::test_support::test_chars("ab1.-@@[]' <>éz_üア«٣");
        let mut rng = crate::test_support::TestRng::new(0x9e37_79b9_7f4a_7c15);
        for _ in 0..3000 {
            let t = rng.text(39, &alphabet);
            assert_eq!(fast(&t), slow(&t), "{t:?}");
        }
        // Domains: labels, dots, hyphens, top-level domains and literals.
        let pieces = [
            "a", "B1", "9", ".", "..", "-", "@", "[", "]", "0.1", ".org", "x-y", " ", "'", "é",
            "Zz", "-.", "ü", "ア", "é.", "xä", "٣",
        ];
        for _ in 0..20_000 {
            let t = rng.text(16, &pieces);
            assert_eq!(fast(&t), slow(&t), "{t:?}");
        }
    }

    #[test]
    fn may_continue_reply_finds_what_the_regex_finds() {
        let alphabet = crate::test_support::test_chars("0123456789- a.٣");
        let mut rng = crate::test_support::TestRng::new(0x1234_5678_9abc_def1);
        for _ in 0..5000 {
            let t = rng.text(15, &alphabet);
            if CONTINUATION.is_match(&t) {
                assert!(may_continue_reply(&t), "{t:?}");
            }
            if !may_continue_reply(&t) {
                assert_eq!(join_reply_lines(&t), t);
            }
        }
    }

    #[test]
    fn finds_enhanced_status_but_not_inside_ip_addresses() {
        assert_eq!(
            find_enhanced_status("550 5.1.1 <a@b>: no").as_deref(),
            Some("5.1.1")
        );
        assert_eq!(find_enhanced_status("(#5.5.0)").as_deref(), Some("5.5.0"));
        assert_eq!(find_enhanced_status("host 10.5.2.1 said no"), None);
        assert_eq!(
            find_enhanced_status("550-5.7.26 Unauthenticated").as_deref(),
            Some("5.7.26")
        );
        assert_eq!(
            find_enhanced_status("version 2.0.1."),
            Some("2.0.1".to_string())
        );
    }

    #[test]
    fn prefers_the_status_inside_the_reply() {
        assert_eq!(
            find_reply_status("5.1.0 - Unknown address error 550-'5.7.1 <a@b>... Access denied'")
                .as_deref(),
            Some("5.7.1")
        );
        assert_eq!(
            find_reply_status("550 5.1.1 no such user").as_deref(),
            Some("5.1.1")
        );
        assert_eq!(find_reply_status("5.1.1 user unknown"), None);
    }

    #[test]
    fn finds_reply_codes_after_typical_prefixes() {
        assert_eq!(
            find_reply_code("remote host said: 550 Unknown user"),
            Some(550)
        );
        assert_eq!(find_reply_code("<<< 452 4.2.2 Over quota"), Some(452));
        assert_eq!(find_reply_code("550-5.7.1 blocked"), Some(550));
        assert_eq!(find_reply_code("250 ok"), None);
        assert_eq!(find_reply_code("port 5500 busy"), None);
        // Exchange's code after the type, without a space.
        assert_eq!(
            find_reply_code("<mx.example #5.1.1 smtp;550 5.1.1 RESOLVER.ADR.RecipNotFound>"),
            Some(550)
        );
    }

    /// Whenever a collapsed, clipped, line-aligned piece of a text names a command, the
    /// loosened regex finds one in the text as it is.
    #[test]
    fn may_name_command_covers_every_collapsed_segment() {
        let pieces = [
            "after",
            "RCPT",
            "TO",
            "rcpt",
            "to",
            "data",
            "DATA",
            "end",
            "of",
            "in",
            "reply",
            "the",
            "final",
            "mail",
            "from",
            "MAIL",
            "FROM:",
            "rejected",
            "command",
            "database",
            "helo",
            ">>>",
            "[RCPT_TO]",
            "does",
            "not",
            "like",
            "recipient",
            "sender",
            "was",
            "connected",
            "host.example",
            "but",
            "greeting",
            "failed",
            "response",
            "x",
            "ſender",
            " ",
            "  ",
            "\n",
            "\r\n",
            "\t",
            "\n\n",
            ":",
        ];
        // Each piece also with a blank after it.
        let pieces: Vec<String> = pieces
            .iter()
            .flat_map(|p| [p.to_string(), format!("{p} ")])
            .collect();
        let mut rng = crate::test_support::TestRng::new(0x6a09_e667_f3bc_c908);
        let mut named = 0;
        for _ in 0..3000 {
            let t = rng.text(31, &pieces);
            let starts: Vec<usize> = std::iter::once(0)
                .chain(t.match_indices('\n').map(|(i, _)| i + 1))
                .chain(std::iter::once(t.len()))
                .collect();
            for (i, &a) in starts.iter().enumerate() {
                for &b in starts.get(i + 1..).unwrap_or_default() {
                    let words: Vec<&str> = t[a..b].split_whitespace().collect();
                    let collapsed = words.join(" ");
                    for end in (0..=collapsed.len()).filter(|&e| collapsed.is_char_boundary(e)) {
                        if find_command(&collapsed[..end]).is_some() {
                            named += 1;
                            assert!(may_name_command(&t), "{t:?} / {:?}", &collapsed[..end]);
                        }
                    }
                }
            }
        }
        assert!(named > 100);
        assert!(!may_name_command("550 5.1.1 user unknown\nmailbox full"));
    }

    #[test]
    fn finds_the_failing_command() {
        assert_eq!(
            find_command("SMTP error from remote mail server after RCPT TO:<a@b>"),
            Some("RCPT")
        );
        assert_eq!(
            find_command("host x said: 550 no (in reply to end of DATA command)"),
            Some("DATA")
        );
        assert_eq!(find_command("after MAIL FROM:<a@b> SIZE=1"), Some("MAIL"));
        assert_eq!(find_command("nothing here"), None);
        assert_eq!(
            find_command("192.0.2.1 does not like recipient."),
            Some("RCPT")
        );
        assert_eq!(
            find_command("Connected to 192.0.2.1 but sender was rejected."),
            Some("MAIL")
        );
        assert_eq!(
            find_command("mx [192.0.2.2] did not like our final DATA:"),
            Some("DATA")
        );
        assert_eq!(
            find_command("error after initial connection: 554"),
            Some("CONN")
        );
        // qmail: the remote host refused the message itself.
        assert_eq!(
            find_command("failed after I sent the message. Remote host said: 552 5.2.2 full"),
            Some("DATA")
        );
    }

    #[test]
    fn splits_at_marker_or_header_block() {
        let body = "oops\n<a@b.example>: no\n\n--- Below this line is a copy of the message.\n\nFrom: x@y.example\nTo: a@b.example\n\nhi\n";
        let (err, ret) = split_returned(body);
        assert!(err.contains("<a@b.example>: no") && !err.contains("From:"));
        assert!(ret.is_some_and(|r| r.contains("From: x@y.example")));
        let body = "failed: a@b.example\n\nReceived: from x\n  by y\nFrom: s@y.example\nTo: a@b.example\n\nbody";
        let (err, ret) = split_returned(body);
        assert_eq!(err, "failed: a@b.example\n\n");
        assert!(ret.is_some_and(|r| r.starts_with("Received:")));
    }

    /// The split as the two `(?mi)` regexes found it, for comparison with the line scan.
    fn split_returned_by_regex(body: &str) -> (&str, Option<&str>) {
        let marker = MARKER.find(body).map(|m| {
            let line_start = body
                .get(..m.start())
                .and_then(|s| s.rfind('\n'))
                .map_or(0, |i| i + 1);
            let line_end = body
                .get(m.end()..)
                .and_then(|s| s.find('\n'))
                .map_or(body.len(), |i| m.end() + i + 1);
            (line_start, line_end)
        });
        let limit = marker.map_or(body.len(), |(s, _)| s);
        let header = HEADER_LINE
            .find_iter(body.get(..limit).unwrap_or(body))
            .map(|m| m.start())
            .find(|&s| starts_header_block(body, s));
        match (marker, header) {
            (_, Some(h)) => (body.get(..h).unwrap_or(body), body.get(h..)),
            (Some((s, e)), None) => (body.get(..s).unwrap_or(body), body.get(e..)),
            (None, None) => (body, None),
        }
    }

    /// The line scan splits where the regexes did, and reads the same header lines.
    #[test]
    fn split_returned_matches_the_regexes() {
        let pieces = [
            "Delivery failed for a@b.example\n",
            "\n",
            "\r\n",
            "--- Below this line is a copy of the message.\n",
            "   ------ This is a copy of the headers.\r\n",
            "*** ORIGINAL MESSAGE FOLLOWS ***\n",
            "The original message is attached.\n",
            "the header of original message\n",
            "Your message reads:\n",
            "xoriginal message\n",
            "(original message)\n",
            "Content-Type: message/rfc822\n",
            "content-type: text/rfc822-headers\n",
            "ſtart of returned message\n",
            "\u{212A}eep: this\n",
            "Received: from x.example\n",
            "\tby y.example\n",
            "From: s@x.example\n",
            "X-Mailer: thing\n",
            "X-: nothing\n",
            "X-A-Very-Long-Header-Name-That-Goes-On-And-On-Beyond-Sixty-Four-Bytes-Of-Name: v\n",
            "X-A-Very-Long-Header-Name-That-Goes-On-And-On-Beyond-Sixty-Four-Bytes-Of-Nameé: v\n",
            "Thread-Index: abc\n",
            "Thread-1: no\n",
            "ARC-Seal: i=1\n",
            "List-Id: <l.example>\n",
            "Subject:no space\n",
            "Subject:\tafter a tab\n",
            "Subject:\u{a0}after a no-break space\n",
            "To:\n",
            "To:<a@b.example>\n",
            "Subject: hi\n",
            "DKIM-Signature: v=1\n",
            "Date : Mon\n",
            "Message-ſd: no\n",
            "Meſsage-Id: <m@x>\n",
            "To: a@b.example\n",
            "é Returned message\n",
            "_returned message\n",
            "Undelivered Message Headers Follows\n",
            "unsent message below\n",
            "copy of the original message\n",
            "message headers follow\n",
            "body text here\n",
        ];
        let mut rng = crate::test_support::TestRng::new(0x2545_f491_4f6c_dd1d);
        for _ in 0..4000 {
            let body = rng.text(16, &pieces);
            assert_eq!(
                split_returned(&body),
                split_returned_by_regex(&body),
                "{body:?}"
            );
            for line in body.lines() {
                assert_eq!(is_header_line(line), HEADER_LINE.is_match(line), "{line:?}");
            }
        }
    }

    #[test]
    fn lines_are_str_lines() {
        for t in [
            "",
            "a",
            "a\n",
            "a\r\nb",
            "\n\n",
            "a\rb\r\n\r\n",
            "\r",
            "é\nü\r\n",
        ] {
            assert_eq!(
                lines(t).collect::<Vec<_>>(),
                t.lines().collect::<Vec<_>>(),
                "{t:?}"
            );
        }
    }

    #[test]
    fn reads_header_fields_unfolded() {
        let h = header_fields("\nReceived: from a\n\tby b id <X>\nMessage-ID: <m@x>\n\nbody: no");
        assert_eq!(h.len(), 2);
        assert_eq!(
            h[0],
            ("received".to_string(), "from a by b id <X>".to_string())
        );
        assert_eq!(h[1].1, "<m@x>");
        // Keeping some fields keeps exactly those, continuation lines included.
        let text = "Junk line\nReceived: a\n b\nX-Other: c\n d\nTo: e\n\tf\nFrom : g\n\nTo: no";
        let all = header_fields(text);
        let (some, any) = header_fields_where(text, |n| {
            (!n.eq_ignore_ascii_case("x-other")).then(|| n.to_ascii_lowercase())
        });
        assert!(any);
        assert_eq!(
            some,
            all.iter()
                .filter(|(n, _)| n != "x-other")
                .cloned()
                .collect::<Vec<_>>()
        );
        assert_eq!(some[1], ("to".to_string(), "e f".to_string()));
        assert_eq!(
            header_fields_where("no headers\n\nat all", |n| Some(n.to_string())),
            (vec![], false)
        );
        assert_eq!(
            header_fields_where("Received: x\n", |_| None::<String>),
            (vec![], true)
        );
    }

    #[test]
    fn extracts_addresses() {
        let v: Vec<_> = addresses("to <a.b@c.example>, and x@[192.0.2.1].")
            .map(|(_, a)| a)
            .collect();
        assert_eq!(v, vec!["a.b@c.example", "x@[192.0.2.1]"]);
    }

    /// RFC 6531 addresses are found whole; in prose without spaces between words (Japanese
    /// here) only the ASCII address is taken, not the words it abuts.
    #[test]
    fn extracts_internationalised_addresses() {
        let v: Vec<_> = addresses(
            "<jürgen@remote.example>: unknown; «ünal@müller.example» \
             宛先アドレスuser@example.jpは存在しません",
        )
        .map(|(_, a)| a)
        .collect();
        assert_eq!(
            v,
            vec![
                "jürgen@remote.example",
                "ünal@müller.example",
                "user@example.jp"
            ]
        );
    }

    /// The stripping as it was written first, character by character and one `replace` per
    /// entity.
    fn strip_html_by_chars(html: &str) -> String {
        let mut out = String::with_capacity(html.len());
        let mut in_tag = false;
        let mut tag = String::new();
        for c in html.chars() {
            if in_tag {
                if c == '>' {
                    in_tag = false;
                    let t = tag.to_ascii_lowercase();
                    if t.starts_with("br")
                        || t.starts_with("/p")
                        || t.starts_with("/div")
                        || t.starts_with("/tr")
                        || t.starts_with("p")
                    {
                        out.push('\n');
                    }
                    tag.clear();
                } else if tag.len() < 8 {
                    tag.push(c);
                }
            } else if c == '<' {
                in_tag = true;
            } else {
                out.push(c);
            }
        }
        out.replace("&nbsp;", " ")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&#39;", "'")
            .replace("&amp;", "&")
    }

    #[test]
    fn strip_html_matches_the_char_by_char_version() {
        let pieces = [
            "<p>",
            "</P>",
            "<BR/>",
            "<br>",
            "</div>",
            "</TR>",
            "<pre>",
            "<b>",
            "<",
            ">",
            "&",
            "&amp;",
            "&lt;",
            "&gt;",
            "&quot;",
            "&#39;",
            "&nbsp;",
            "amp;",
            "lt;",
            "nbsp",
            "text",
            " é ",
            "語",
            "<DIV class=x>",
            "</d",
            "iv>",
            "\n",
            "<é>",
            "<p語>",
        ];
        let mut rng = crate::test_support::TestRng::new(0x3c6e_f372_fe94_f82b);
        for _ in 0..5000 {
            let t = rng.text(15, &pieces);
            assert_eq!(strip_html(&t), strip_html_by_chars(&t), "{t:?}");
        }
    }

    #[test]
    fn strips_html() {
        assert_eq!(strip_html("<p>a&amp;b</p><br>c"), "\na&b\n\nc");
    }
}
