//! The MIME part structure of returned mail, walked once with `mail-parser`'s own stream
//! primitives and header parser, step for step as `MessageParser::parse` walks it (so every
//! boundary, part end and recovery from broken MIME is the same), but without decoding: a
//! part keeps where its body lies and is decoded, by `mail-parser`'s decoders, only when a
//! reader asks for it. An attached message's own parts are walked only to find where that
//! message ends; none of them is ever decoded.

use std::borrow::Cow;

use mail_parser::MessageParser;
use mail_parser::decoders::charsets::map::charset_decoder;
use mail_parser::parsers::MessageStream;
use mail_parser::{ContentType, Encoding, GetHeader, Header, HeaderName, HeaderValue};
use memchr::memmem::Finder;

/// The header parser the walk needs, and the bounce reader: MIME fields and Subject
/// decoded, every other field skipped (read to its end exactly as the raw-text parser reads
/// it, its value left empty; the bounce reader parses From and To itself when it needs them).
pub(crate) fn parser() -> MessageParser {
    MessageParser::new()
        .with_mime_headers()
        .header_text(HeaderName::Subject)
        .default_header_ignore()
}

/// The media types `mail-parser` tells apart.
#[derive(Debug, PartialEq, Clone, Copy, Default)]
enum MimeType {
    MultipartAlternative,
    MultipartDigest,
    OtherMultipart,
    TextPlain,
    TextHtml,
    TextOther,
    #[default]
    Message,
    Other,
}

/// Whether the type is multipart or text, and which it is (as `mail-parser`'s `mime_type`).
fn mime_type(content_type: Option<&ContentType<'_>>, parent: MimeType) -> (bool, bool, MimeType) {
    let Some(ct) = content_type else {
        return if parent == MimeType::MultipartDigest {
            (false, false, MimeType::Message)
        } else {
            (false, true, MimeType::TextPlain)
        };
    };
    match ct.ctype() {
        "multipart" => (
            true,
            false,
            match ct.subtype() {
                Some("alternative") => MimeType::MultipartAlternative,
                Some("digest") => MimeType::MultipartDigest,
                _ => MimeType::OtherMultipart,
            },
        ),
        "text" => match ct.subtype() {
            Some("plain") => (false, true, MimeType::TextPlain),
            Some("html") => (false, true, MimeType::TextHtml),
            _ => (false, true, MimeType::TextOther),
        },
        "message" if matches!(ct.subtype(), Some("rfc822" | "global")) => {
            (false, false, MimeType::Message)
        }
        _ => (false, false, MimeType::Other),
    }
}

/// One part of a message, in the order `mail-parser` lists them (the root first).
pub(crate) struct Part<'x> {
    pub headers: Vec<Header<'x>>,
    offset_header: usize,
    offset_body: usize,
    offset_end: usize,
    body: Body<'x>,
}

enum Body<'x> {
    Multipart,
    /// An attached message that is not transfer-encoded: `raw[start..end]`, the range of
    /// its first part (what `mail-parser`'s `raw_message()` gives).
    Message {
        start: usize,
        end: usize,
    },
    /// Text known without decoding (an attached message without headers, a message
    /// without a body).
    Text(Cow<'x, str>),
    Leaf(Leaf),
}

/// A leaf part's body, not decoded yet.
struct Leaf {
    mime_type: MimeType,
    is_text: bool,
    encoding: Encoding,
    /// The boundary its decoder stops at (empty outside multipart).
    boundary: Vec<u8>,
    /// Where its decoder stops reading: just past the first `-` of that boundary (the end
    /// of the message outside multipart).
    scan_end: usize,
}

/// A part's body as `mail-parser` would give it.
pub(crate) enum Decoded<'x> {
    Multipart,
    Text(Cow<'x, str>),
    Html(Cow<'x, str>),
    Binary(Cow<'x, [u8]>),
    /// An attached message: its raw text.
    Message(Cow<'x, [u8]>),
}

impl<'x> Part<'x> {
    pub fn content_type(&self) -> Option<&ContentType<'x>> {
        self.headers
            .header_value(&HeaderName::ContentType)
            .and_then(|c| c.as_content_type())
    }

    pub fn is_multipart(&self) -> bool {
        matches!(self.body, Body::Multipart)
    }

    /// Whether [`Part::decode`] gives [`Decoded::Html`], known without decoding: an HTML
    /// part not encoded, or whose quoted-printable or base64 decodes without error (an
    /// error would make it plain text).
    pub fn is_html(&self, raw: &[u8]) -> bool {
        let Body::Leaf(leaf) = &self.body else {
            return false;
        };
        if leaf.mime_type != MimeType::TextHtml {
            return false;
        }
        let body = raw.get(self.offset_body..leaf.scan_end);
        match leaf.encoding {
            Encoding::None => true,
            Encoding::Base64 => body.is_some_and(|body| !base64_fails(body)),
            Encoding::QuotedPrintable => body.is_some_and(|body| !quoted_printable_fails(body)),
        }
    }

    /// Whether [`Part::decode`] gives [`Decoded::Binary`], known without decoding: the
    /// body is neither text nor an attached message, and not encoded or base64 that
    /// decodes without error (an error would make it text). `false` when it cannot tell.
    pub fn is_binary(&self, raw: &[u8]) -> bool {
        let Body::Leaf(leaf) = &self.body else {
            return false;
        };
        if leaf.is_text || leaf.mime_type == MimeType::Message {
            return false;
        }
        match leaf.encoding {
            Encoding::None => true,
            Encoding::Base64 => raw
                .get(self.offset_body..leaf.scan_end)
                .is_some_and(|body| !base64_fails(body)),
            _ => false,
        }
    }

    /// The body, decoded as `mail-parser` decodes it.
    pub fn decode(&self, parser: &MessageParser, raw: &'x [u8]) -> Decoded<'x> {
        self.decode_with(parser, raw, false)
    }

    /// [`Part::decode`], except that text labelled ISO-2022-JP but written in another
    /// encoding is decoded as what it is ([`mislabelled_japanese`]) where `mail-parser`
    /// gives replacement characters: what the bounce reader reads.
    pub fn decode_recovering(&self, parser: &MessageParser, raw: &'x [u8]) -> Decoded<'x> {
        self.decode_with(parser, raw, true)
    }

    fn decode_with(&self, parser: &MessageParser, raw: &'x [u8], recover: bool) -> Decoded<'x> {
        let leaf = match &self.body {
            Body::Multipart => return Decoded::Multipart,
            Body::Message { start, end } => {
                return Decoded::Message(Cow::Borrowed(raw.get(*start..*end).unwrap_or_default()));
            }
            Body::Text(t) => return Decoded::Text(t.clone()),
            Body::Leaf(l) => l,
        };
        let undecoded = || -> &'x [u8] {
            raw.get(self.offset_body..self.offset_end)
                .unwrap_or_default()
        };
        let mut mime_type = leaf.mime_type;
        let mut is_text = leaf.is_text;
        let quick = (leaf.encoding == Encoding::QuotedPrintable)
            .then(|| quoted_printable_quick(raw, self.offset_body, leaf))
            .flatten();
        let bytes: Cow<'x, [u8]> = if leaf.encoding == Encoding::None {
            Cow::Borrowed(undecoded())
        } else if let Some(decoded) = quick {
            Cow::Owned(decoded)
        } else {
            let mut stream = MessageStream::new(raw);
            stream.skip_bytes(self.offset_body);
            let (end, bytes) = if leaf.encoding == Encoding::Base64 {
                stream.decode_base64_mime(&leaf.boundary)
            } else {
                stream.decode_quoted_printable_mime(&leaf.boundary)
            };
            if end == usize::MAX {
                match (recover && leaf.encoding == Encoding::Base64)
                    .then(|| lenient_base64(undecoded()))
                    .flatten()
                {
                    // One stray character (a `*`, a line of garbage) cost the whole part,
                    // delivery-status fields and all: the reader skips it.
                    Some(decoded) => Cow::Owned(decoded),
                    None => {
                        // As `mail-parser` recovers a broken encoding: the raw body, as text.
                        if mime_type != MimeType::TextPlain {
                            mime_type = MimeType::TextOther;
                        }
                        is_text = true;
                        Cow::Borrowed(undecoded())
                    }
                }
            } else {
                bytes
            }
        };
        if mime_type == MimeType::Message {
            // An encoded attached message: `mail-parser` parses the decoded bytes (a
            // message, all of them its raw text), or keeps them as binary when they have
            // no header.
            let mut headers = Vec::new();
            let mut stream = MessageStream::new(&bytes);
            if stream.parse_headers(parser, &mut headers) || !headers.is_empty() {
                return Decoded::Message(bytes);
            }
            return Decoded::Binary(bytes);
        }
        if !is_text {
            return Decoded::Binary(bytes);
        }
        let charset_name = self.content_type().and_then(|ct| ct.attribute("charset"));
        // ASCII in a charset whose decoder maps ASCII to itself: the text is the bytes.
        if charset_name.is_some_and(is_ascii_identity) && bytes.is_ascii() {
            let text = match bytes {
                Cow::Borrowed(b) => std::str::from_utf8(b).map(Cow::Borrowed).ok(),
                Cow::Owned(v) => String::from_utf8(v).map(Cow::Owned).ok(),
            };
            let text = text.unwrap_or_default();
            return if mime_type == MimeType::TextHtml {
                Decoded::Html(text)
            } else {
                Decoded::Text(text)
            };
        }
        if let Some(text) = charset_name
            .filter(|c| recover && is_iso_2022_jp(c))
            .and_then(|_| mislabelled_japanese(&bytes))
        {
            return if mime_type == MimeType::TextHtml {
                Decoded::Html(Cow::Owned(text))
            } else {
                Decoded::Text(Cow::Owned(text))
            };
        }
        let charset = charset_name.and_then(|c| charset_decoder(c.as_bytes()));
        let text: Cow<'x, str> = match (bytes, charset) {
            (Cow::Owned(vec), Some(decode)) => decode(&vec).into(),
            (Cow::Owned(vec), None) => String::from_utf8(vec)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
                .into(),
            (Cow::Borrowed(bytes), Some(decode)) => decode(bytes).into(),
            // `String::from_utf8_lossy`, with valid UTF-8 (nearly all mail) checked by the
            // word-at-a-time validator instead of the lossy decoder's byte loop.
            (Cow::Borrowed(bytes), None) => match std::str::from_utf8(bytes) {
                Ok(text) => Cow::Borrowed(text),
                Err(_) => String::from_utf8_lossy(bytes),
            },
        };
        if mime_type == MimeType::TextHtml {
            Decoded::Html(text)
        } else {
            Decoded::Text(text)
        }
    }
}

/// Whether `charset` names ISO-2022-JP (as `charset_decoder` reads the name).
fn is_iso_2022_jp(charset: &str) -> bool {
    ["iso-2022-jp", "iso_2022_jp", "csiso2022jp"]
        .iter()
        .any(|n| charset.eq_ignore_ascii_case(n))
}

/// Text labelled ISO-2022-JP, a 7-bit encoding, that holds 8-bit bytes: mailers that write
/// UTF-8, EUC-JP or Shift_JIS and label it ISO-2022-JP. Decoded as the first of those three
/// that decodes without error (UTF-8 first: EUC-JP would also read most UTF-8, wrongly);
/// `None` for 7-bit text (read as labelled) and for bytes none decodes (left to the
/// labelled decoder, which gives replacement characters, as `mail-parser` does).
fn mislabelled_japanese(bytes: &[u8]) -> Option<String> {
    if bytes.is_ascii() {
        return None;
    }
    if let Ok(text) = std::str::from_utf8(bytes) {
        return Some(text.to_string());
    }
    [encoding_rs::EUC_JP, encoding_rs::SHIFT_JIS]
        .iter()
        .find_map(|e| e.decode_without_bom_handling_and_without_replacement(bytes))
        .map(Cow::into_owned)
}

/// The charset names (as `charset_decoder` normalises them: lower case, `_` for `-`) that
/// `mail-parser` decodes with its windows-1252 table, which maps ASCII to itself.
const ASCII_IDENTITY_CHARSETS: &[&str] = &[
    "us_ascii",
    "ascii",
    "ansi_x3.4_1968",
    "iso_8859_1",
    "iso8859_1",
    "iso88591",
    "iso_8859_1:1987",
    "iso_ir_100",
    "latin1",
    "l1",
    "csisolatin1",
    "ibm819",
    "cp819",
    "windows_1252",
    "cp1252",
    "x_cp1252",
    "cswindows1252",
];

/// Whether `charset` names one of [`ASCII_IDENTITY_CHARSETS`].
fn is_ascii_identity(charset: &str) -> bool {
    ASCII_IDENTITY_CHARSETS.iter().any(|name| {
        name.len() == charset.len()
            && name.bytes().zip(charset.bytes()).all(|(n, c)| {
                n == match c {
                    b'-' => b'_',
                    c => c.to_ascii_lowercase(),
                }
            })
    })
}

/// What the walk knows of the message part it is in.
#[derive(Default)]
struct State {
    mime_type: MimeType,
    mime_boundary: Option<Vec<u8>>,
    part_id: usize,
    /// How many parts were read in this state, and the first one's index: at the end of
    /// a multipart, `mail-parser` makes the part at `part_id` a multipart unless the only
    /// part read was the message's root.
    sub_parts: usize,
    first_sub_part: usize,
    offset_header: usize,
    offset_body: usize,
    offset_end: usize,
}

impl<'x> Part<'x> {
    /// A multipart or attached message that `headers` open (taken), whose own parts follow.
    fn container(headers: &mut Vec<Header<'x>>, state: &State) -> Self {
        Part {
            headers: std::mem::take(headers),
            offset_header: state.offset_header,
            offset_body: state.offset_body,
            offset_end: 0,
            body: Body::Multipart,
        }
    }
}

impl State {
    fn has_sub_parts(&self) -> bool {
        self.sub_parts != 1 || self.first_sub_part != 0
    }
}

/// The parts of `raw` (the root first), as `parser.parse(raw)` would list them; `None`
/// when it has no header at all. `MessageParser::parse_` (mail-parser 0.11) without the
/// decoding, the text/HTML body lists and the attachment bookkeeping, none of which the
/// bounce reader uses.
pub(crate) fn parts<'x>(parser: &MessageParser, raw: &'x [u8]) -> Option<Vec<Part<'x>>> {
    let mut stream = MessageStream::new(raw);
    let mut message: Vec<Part<'x>> = Vec::new();
    let mut state = State {
        mime_type: MimeType::Message,
        ..Default::default()
    };
    let mut state_stack: Vec<(State, Option<Vec<Part<'x>>>)> = Vec::with_capacity(4);
    let mut part_headers = Vec::new();
    let mut finder = None;

    'outer: loop {
        state.offset_header = stream.offset();
        if !stream.parse_headers(parser, &mut part_headers) {
            break;
        }
        state.offset_body = stream.offset();
        if state.sub_parts == 0 {
            state.first_sub_part = message.len();
        }
        state.sub_parts += 1;

        let content_type = part_headers
            .header_value(&HeaderName::ContentType)
            .and_then(|c| c.as_content_type());
        let (is_multipart, mut is_text, mut mime_type) = mime_type(content_type, state.mime_type);

        if is_multipart && let Some(boundary) = content_type.and_then(|f| f.attribute("boundary")) {
            if stream.seek_next_part(boundary.as_bytes()) {
                let new_state = State {
                    mime_type,
                    mime_boundary: Some(boundary.as_bytes().to_vec()),
                    part_id: message.len(),
                    ..Default::default()
                };
                message.push(Part::container(&mut part_headers, &state));
                state_stack.push((state, None));
                state = new_state;
                stream.skip_crlf();
                continue;
            }
            mime_type = MimeType::TextOther;
            is_text = true;
        }

        let mut encoding = match part_headers.header_value(&HeaderName::ContentTransferEncoding) {
            Some(HeaderValue::Text(e)) if e.eq_ignore_ascii_case("base64") => Encoding::Base64,
            Some(HeaderValue::Text(e)) if e.eq_ignore_ascii_case("quoted-printable") => {
                Encoding::QuotedPrintable
            }
            _ => Encoding::None,
        };

        if mime_type == MimeType::Message && encoding == Encoding::None {
            let new_state = State {
                mime_type: MimeType::Message,
                mime_boundary: state.mime_boundary.take(),
                part_id: message.len(),
                ..Default::default()
            };
            message.push(Part::container(&mut part_headers, &state));
            state_stack.push((state, Some(message)));
            message = Vec::new();
            state = new_state;
            continue;
        }

        // The decoders end a part where this scan does (a decoding error only changes the
        // part's type and body, which `Part::decode` works out when asked).
        let (offset_end, scan_end) = part_end(
            &mut stream,
            raw,
            state.mime_boundary.as_deref(),
            &mut finder,
        );
        if offset_end == usize::MAX {
            encoding = Encoding::None;
            if mime_type != MimeType::TextPlain {
                mime_type = MimeType::TextOther;
            }
            is_text = true;
            let (offset_end, boundary_found) = stream.seek_part_end(state.mime_boundary.as_deref());
            state.offset_end = offset_end;
            if !boundary_found {
                state.mime_boundary = None;
            }
        } else {
            state.offset_end = offset_end;
        }
        let boundary = if encoding == Encoding::None {
            Vec::new()
        } else {
            state.mime_boundary.clone().unwrap_or_default()
        };
        message.push(Part {
            headers: std::mem::take(&mut part_headers),
            offset_header: state.offset_header,
            offset_body: state.offset_body,
            offset_end: state.offset_end,
            body: Body::Leaf(Leaf {
                mime_type,
                is_text,
                encoding,
                boundary,
                scan_end,
            }),
        });

        if state.mime_boundary.is_some() {
            'inner: loop {
                if state.mime_type == MimeType::Message {
                    // The end of an attached message: back to the message it is in.
                    let Some((mut prev_state, Some(mut prev_message))) = state_stack.pop() else {
                        break 'outer;
                    };
                    let offset_end = state
                        .mime_boundary
                        .as_ref()
                        .map(|b| {
                            let pos = stream.offset().saturating_sub(b.len() + 2);
                            raw.get(pos.wrapping_sub(2))
                                .map_or(pos.wrapping_sub(1), |&ch| {
                                    if ch == b'\r' { pos - 2 } else { pos - 1 }
                                })
                        })
                        .unwrap_or_else(|| stream.offset());
                    if let Some(part) = prev_message.get_mut(state.part_id) {
                        part.offset_end = offset_end;
                        part.body = attached(raw, &message, part.offset_body, offset_end);
                    }
                    message = prev_message;
                    prev_state.mime_boundary = state.mime_boundary.take();
                    state = prev_state;
                }

                if stream.is_multipart_end() {
                    if let Some(part) = message.get_mut(state.part_id) {
                        if state.has_sub_parts() {
                            part.body = Body::Multipart;
                        }
                        if let Some((prev_state, _)) = state_stack.pop() {
                            state = prev_state;
                            if let Some(boundary) = &state.mime_boundary
                                && let Some(offset) = stream.seek_next_part_offset(boundary)
                            {
                                part.offset_end = offset;
                                continue 'inner;
                            }
                        }
                        part.offset_end = stream.offset();
                    }
                    break 'outer;
                }
                break 'inner;
            }
        } else if stream.offset() >= raw.len() {
            break 'outer;
        }
    }

    // Broken MIME: keep what was found.
    while let Some((prev_state, prev_message)) = state_stack.pop() {
        if let Some(mut prev_message) = prev_message {
            if let Some(part) = prev_message.get_mut(state.part_id) {
                part.offset_end = stream.offset();
                part.body = if message.is_empty() {
                    Body::Text(unterminated_text(
                        raw,
                        part.offset_body,
                        stream.offset(),
                        &state,
                    ))
                } else {
                    attached(raw, &message, 0, 0)
                };
            }
            message = prev_message;
        } else if let Some(part) = message.get_mut(state.part_id) {
            part.offset_end = stream.offset();
            if state.has_sub_parts() {
                part.body = Body::Multipart;
            }
        }
        state = prev_state;
    }

    if let Some(root) = message.first_mut() {
        root.offset_end = raw.len();
        Some(message)
    } else if !part_headers.is_empty() {
        message.push(Part {
            headers: part_headers,
            offset_header: 0,
            offset_body: raw.len(),
            offset_end: raw.len(),
            body: Body::Text(Cow::Borrowed("")),
        });
        Some(message)
    } else {
        None
    }
}

/// Where the part at the stream's offset ends, the stream moved past the boundary that
/// ends it: `stream.mime_part(boundary).0` (the first `--boundary` at or after the offset,
/// even inside a line; the line break before it is not part of the body), found with the
/// SIMD substring search instead of a byte loop; and where a decoder stops reading (past
/// the boundary's first `-`). `usize::MAX` (the stream not moved) when no boundary
/// follows. `finder`: the searcher for the last `--boundary` looked for.
fn part_end(
    stream: &mut MessageStream<'_>,
    raw: &[u8],
    boundary: Option<&[u8]>,
    finder: &mut Option<Finder<'static>>,
) -> (usize, usize) {
    let start = stream.offset();
    let Some(boundary) = boundary.filter(|b| !b.is_empty()) else {
        stream.seek_end();
        return (raw.len(), raw.len());
    };
    let Some(at) =
        find_boundary(raw.get(start..).unwrap_or_default(), boundary, finder).map(|i| start + i)
    else {
        return (usize::MAX, 0);
    };
    stream.skip_bytes(at + 2 + boundary.len() - start);
    let before = |i: usize| {
        i.checked_sub(1)
            .filter(|&i| i >= start)
            .and_then(|i| raw.get(i))
    };
    let end = if at == start {
        start
    } else if before(at) == Some(&b'\n') {
        if before(at - 1) == Some(&b'\r') {
            at - 2
        } else {
            at - 1
        }
    } else {
        at
    };
    (end, at + 1)
}

/// What `decode_quoted_printable_mime` gives for the leaf's body at `start`, by the
/// equivalent of `mail-parser`'s slice decoder (`quoted_printable_decode`, which decodes
/// into a buffer of the body's size with no boundary watch;
/// [`super::quoted_printable::decode`] gives its output with a copy per run of plain
/// bytes instead of a push per byte): it decodes what the stream decoder does wherever it
/// succeeds, and fails on the escapes the stream decoder copies as they are (`None` then:
/// the caller runs the stream decoder). Given the bytes up to the boundary's first `-`, it
/// has pushed that `-` as the stream decoder has; the stream decoder then drops it, and the
/// line break before it when there is one (wrapping as its release build does).
fn quoted_printable_quick(raw: &[u8], start: usize, leaf: &Leaf) -> Option<Vec<u8>> {
    let body = raw.get(start..leaf.scan_end)?;
    let mut decoded = super::quoted_printable::decode(body)?;
    if !leaf.boundary.is_empty() {
        let dash = leaf.scan_end.checked_sub(1)?;
        let line_break_before = dash > start && raw.get(dash - 1) == Some(&b'\n');
        let crlf_len = if memchr::memchr(b'\r', body).is_some() {
            2
        } else {
            1
        };
        let dropped = if line_break_before { crlf_len + 1 } else { 1 };
        decoded.truncate(decoded.len().wrapping_sub(dropped));
    }
    Some(decoded)
}

/// Where `--boundary` first occurs in `text`. Looked for at each `-` first (most parts hold
/// few, and a substring searcher costs more to build than scanning a short part); after
/// [`DASH_TRIES`] of them with the searcher, kept in `finder` while consecutive parts end at
/// the same boundary, so that a text full of dashes stays linear.
fn find_boundary(
    text: &[u8],
    boundary: &[u8],
    finder: &mut Option<Finder<'static>>,
) -> Option<usize> {
    for (tries, i) in memchr::memchr_iter(b'-', text).enumerate() {
        if tries == DASH_TRIES {
            let same = finder
                .as_ref()
                .is_some_and(|f| f.needle().strip_prefix(b"--") == Some(boundary));
            if !same {
                let mut needle = Vec::with_capacity(boundary.len() + 2);
                needle.extend_from_slice(b"--");
                needle.extend_from_slice(boundary);
                *finder = Some(Finder::new(&needle).into_owned());
            }
            let found = finder.as_ref()?.find(text.get(i..)?)?;
            return Some(i + found);
        }
        if text.get(i + 1) == Some(&b'-') && text.get(i + 2..)?.starts_with(boundary) {
            return Some(i);
        }
    }
    None
}

/// How many `-` [`find_boundary`] looks at before it builds a substring searcher.
const DASH_TRIES: usize = 32;

/// Whether `mail-parser`'s quoted-printable decoder fails on a body it reads as `body` (up
/// to where it stops, see [`part_end`]): on a `=` while the escape before it is still open
/// (`==`, `=` white space `=`, `=4=`; a line break closes `=` but not `=4`).
fn quoted_printable_fails(body: &[u8]) -> bool {
    use mail_parser::decoders::quoted_printable::quoted_printable_decode_char;
    let is_hex = |b: u8| quoted_printable_decode_char(b, b'0').is_some();
    let mut rest = body;
    while let Some(eq) = memchr::memchr(b'=', rest) {
        let mut hex1 = false;
        let mut closed = false;
        let mut next = eq + 1;
        for &b in rest.get(eq + 1..).unwrap_or_default() {
            next += 1;
            match b {
                b'=' => return true,
                b'\r' => {}
                b'\n' if !hex1 => {
                    closed = true;
                    break;
                }
                b'\n' => {}
                _ if hex1 => {
                    closed = true;
                    break;
                }
                _ if is_hex(b) => hex1 = true,
                _ if b.is_ascii_whitespace() => {}
                _ => {
                    closed = true;
                    break;
                }
            }
        }
        if !closed {
            return false;
        }
        rest = rest.get(next..).unwrap_or_default();
    }
    false
}

/// Whether `mail-parser`'s base64 decoder fails on a body it reads as `body` (up to where
/// it stops, see [`part_end`]): on a byte that is neither base64, `=` nor white space, or a
/// `--` that does not start the boundary (only the body's last byte can start it).
fn base64_fails(body: &[u8]) -> bool {
    use mail_parser::decoders::base64::BASE64_MAP;
    let mut last = b'\n';
    for &b in body {
        let in_alphabet = BASE64_MAP
            .first()
            .and_then(|map| map.get(usize::from(b)))
            .is_some_and(|&v| v < 0x01ff_ffff);
        if !in_alphabet {
            match b {
                b'=' | b'\n' | b' ' | b'\t' | b'\r' => {}
                b'-' if last == b'-' => return true,
                b'-' => {}
                _ => return true,
            }
        }
        last = b;
    }
    false
}

/// Base64 that `mail-parser` refuses for a character outside the alphabet, decoded without
/// those characters (up to a boundary line, `--`, where the part ends); `None` when what is
/// left does not decode either or is mostly not base64 (text mislabelled as base64, read
/// as text then, as `mail-parser` reads it).
fn lenient_base64(body: &[u8]) -> Option<Vec<u8>> {
    use base64::Engine;
    let body = memchr::memmem::find(body, b"\n--").map_or(body, |i| body.get(..i).unwrap_or(body));
    // Base64 lines hold no white space; text mislabelled as base64 does.
    if body
        .split(|&b| b == b'\n')
        .any(|line| line.trim_ascii().contains(&b' ') || line.trim_ascii().contains(&b'\t'))
    {
        return None;
    }
    let mut kept = Vec::with_capacity(body.len());
    let mut stray = 0usize;
    for &b in body {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'+' | b'/' => kept.push(b),
            b'=' | b'\r' | b'\n' | b' ' | b'\t' => {}
            _ => stray += 1,
        }
    }
    // A few stray characters in a long body, not prose that says it is base64.
    if kept.is_empty() || stray * 50 > kept.len() {
        return None;
    }
    kept.truncate(kept.len() - kept.len() % 4);
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true),
    );
    engine.decode(&kept).ok()
}

/// The body of an attached (not encoded) message part whose own parts are `inner`: the
/// range of its first part, or, when it had no header, its raw text.
fn attached<'x>(raw: &'x [u8], inner: &[Part<'x>], start: usize, end: usize) -> Body<'x> {
    match inner.first() {
        Some(first) => Body::Message {
            start: first.offset_header,
            end: first.offset_end,
        },
        None => Body::Text(String::from_utf8_lossy(
            raw.get(start..end).unwrap_or_default(),
        )),
    }
}

/// The text of an attached message without headers that the message ends inside of:
/// up to its last boundary's `--` when it is UTF-8, else all of it.
fn unterminated_text<'x>(raw: &'x [u8], start: usize, end: usize, state: &State) -> Cow<'x, str> {
    let raw_text = raw.get(start..end);
    let trimmed = raw_text
        .and_then(|bytes| std::str::from_utf8(bytes).ok())
        .and_then(|text| {
            let boundary = std::str::from_utf8(state.mime_boundary.as_deref()?).ok()?;
            let (text, _) = text.rsplit_once(boundary)?;
            let text = text.strip_suffix("--")?;
            let text = text.strip_suffix('\n').unwrap_or(text);
            Some(text.strip_suffix('\r').unwrap_or(text))
        });
    match trimmed {
        Some(text) => Cow::Borrowed(text),
        None => String::from_utf8_lossy(raw_text.unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TestRng;
    use mail_parser::{MimeHeaders, PartType};

    /// The parser the bounce reader used before it skipped the fields it does not read
    /// (MIME headers, Subject, From, To; the others kept as raw text): the walk with
    /// [`parser`] must list the same parts.
    fn reference_parser() -> MessageParser {
        MessageParser::new()
            .with_mime_headers()
            .header_text(HeaderName::Subject)
            .header_address(HeaderName::From)
            .header_address(HeaderName::To)
    }

    /// What mail-parser gives for each part: whether it is multipart, its content type,
    /// and its body in the walk's terms.
    fn reference(raw: &[u8]) -> Option<Vec<(bool, Option<String>, String)>> {
        let msg = reference_parser().parse(raw)?;
        Some(
            msg.parts
                .iter()
                .map(|p| {
                    let ct = p
                        .content_type()
                        .map(|c| format!("{}/{:?}", c.ctype(), c.subtype()));
                    let body = match &p.body {
                        PartType::Multipart(_) => "multipart".to_string(),
                        PartType::Text(t) => format!("text {t:?}"),
                        PartType::Html(t) => format!("html {t:?}"),
                        PartType::Binary(b) | PartType::InlineBinary(b) => {
                            format!("binary {b:?}")
                        }
                        PartType::Message(m) => format!("message {:?}", m.raw_message()),
                    };
                    (p.body_is_multipart(), ct, body)
                })
                .collect(),
        )
    }

    fn walked(raw: &[u8]) -> Option<Vec<(bool, Option<String>, String)>> {
        let parser = parser();
        let parts = parts(&parser, raw)?;
        Some(
            parts
                .iter()
                .map(|p| {
                    let ct = p
                        .content_type()
                        .map(|c| format!("{}/{:?}", c.ctype(), c.subtype()));
                    let decoded = p.decode(&parser, raw);
                    assert!(
                        !p.is_binary(raw) || matches!(decoded, Decoded::Binary(_)),
                        "{raw:?}"
                    );
                    assert_eq!(
                        p.is_html(raw),
                        matches!(decoded, Decoded::Html(_)),
                        "{raw:?}"
                    );
                    let body = match decoded {
                        Decoded::Multipart => "multipart".to_string(),
                        Decoded::Text(t) => format!("text {t:?}"),
                        Decoded::Html(t) => format!("html {t:?}"),
                        Decoded::Binary(b) => format!("binary {b:?}"),
                        Decoded::Message(m) => format!("message {m:?}"),
                    };
                    (p.is_multipart(), ct, body)
                })
                .collect(),
        )
    }

    trait BodyIsMultipart {
        fn body_is_multipart(&self) -> bool;
    }
    impl BodyIsMultipart for mail_parser::MessagePart<'_> {
        fn body_is_multipart(&self) -> bool {
            matches!(self.body, PartType::Multipart(_))
        }
    }

    /// In builds with overflow checks, a body that does not end in an open
    /// quoted-printable escape: before a boundary that follows `=` and white space only,
    /// mail-parser's decoder subtracts past zero (its release builds wrap, and the
    /// release-mode test run covers those bodies).
    fn debug_safe_end(body: &mut String) {
        if cfg!(debug_assertions) {
            body.push('.');
        }
    }

    /// A random message built from MIME pieces: nested multiparts and attached messages,
    /// every transfer encoding (valid and broken), boundaries missing, repeated, inside
    /// lines or never closed, CRLF and LF, charsets, parts without headers.
    fn random_message(rng: &mut TestRng, depth: usize, boundary: Option<&str>) -> String {
        const TYPES: &[&str] = &[
            "text/plain",
            "text/html",
            "text/rfc822-headers",
            "message/delivery-status",
            "message/feedback-report",
            "message/rfc822",
            "message/global",
            "application/octet-stream",
            "image/png",
            "multipart/mixed",
            "multipart/alternative",
            "multipart/digest",
            "multipart/report; report-type=delivery-status",
        ];
        const ENCODINGS: &[&str] = &["", "7bit", "base64", "quoted-printable", "Base64", "8bit"];
        const CHARSETS: &[&str] = &[
            "",
            "; charset=utf-8",
            "; charset=iso-8859-1",
            "; charset=\"windows-1252\"",
            "; charset=bogus",
            "; charset=US-ASCII",
            "; charset=utf-7",
            "; charset=iso-2022-jp",
        ];
        const BODY: &[&str] = &[
            "Delivery failed",
            "\r\n",
            "\n",
            " ",
            "=",
            "==",
            "=3D",
            "=\r\n",
            "=\n",
            "=4",
            "=ZZ",
            "aGVsbG8=",
            "aGVsbG8gd29ybGQ",
            "-",
            "--",
            "<b>x</b>",
            "&amp;",
            "\u{e9}",
            "\t",
            "Final-Recipient: rfc822; a@b.example\r\n",
            "Status: 5.1.1\n",
        ];
        let nl = if rng.below(4) == 0 { "\n" } else { "\r\n" };
        let mut m = String::new();
        let ctype = TYPES[rng.below(TYPES.len())];
        let own_boundary = format!("b{}{}", depth, rng.below(3));
        if rng.below(8) != 0 {
            m.push_str(&format!(
                "From: Mail Delivery <mailer-daemon@x.example>{nl}Subject: fail{nl}"
            ));
            // Fields the reader skips: folded, empty, odd bytes, a colon-less line.
            const OTHER: &[&str] = &[
                "Received: from a.example\r\n\tby b.example; Mon, 1 Jan 2024\r\n",
                "X-Failed-Recipients: a@b.example\n",
                "DKIM-Signature: v=1;\n b=abc\n \n",
                "X-Empty:\r\n",
                "X-Odd: \u{e9}\u{0}\r\n",
                "not a header\r\n",
                "Message-ID: <x@y>\r\n",
            ];
            for _ in 0..rng.below(3) {
                m.push_str(OTHER[rng.below(OTHER.len())]);
            }
            if rng.below(6) != 0 {
                m.push_str("Content-Type: ");
                m.push_str(ctype);
                if ctype.starts_with("multipart") && rng.below(8) != 0 {
                    m.push_str(&format!(";{nl} boundary=\"{own_boundary}\""));
                }
                if ctype.starts_with("text") {
                    m.push_str(CHARSETS[rng.below(CHARSETS.len())]);
                }
                m.push_str(nl);
            }
            let enc = ENCODINGS[rng.below(ENCODINGS.len())];
            if !enc.is_empty() {
                m.push_str(&format!("Content-Transfer-Encoding: {enc}{nl}"));
            }
        }
        m.push_str(nl);
        let leaf = |rng: &mut TestRng, m: &mut String| {
            let n = rng.below(12);
            for _ in 0..n {
                m.push_str(BODY[rng.below(BODY.len())]);
            }
            debug_safe_end(m);
        };
        if ctype.starts_with("multipart") && depth < 3 {
            if rng.below(3) != 0 {
                m.push_str("preamble");
                m.push_str(nl);
            }
            let n = rng.below(4);
            for _ in 0..n {
                m.push_str(&format!("--{own_boundary}{nl}"));
                m.push_str(&random_message(rng, depth + 1, Some(&own_boundary)));
                m.push_str(nl);
            }
            match rng.below(4) {
                0 => {}
                1 => m.push_str(&format!("--{own_boundary}--{nl}")),
                2 => m.push_str(&format!("x--{own_boundary}--")),
                _ => m.push_str(&format!("--{own_boundary}--{nl}epilogue{nl}")),
            }
        } else if ctype.starts_with("message/rfc") || ctype.starts_with("message/global") {
            if depth < 3 {
                m.push_str(&random_message(rng, depth + 1, boundary));
            }
        } else {
            leaf(rng, &mut m);
        }
        if let Some(b) = boundary
            && rng.below(10) == 0
        {
            // A boundary inside a line, or the enclosing one early.
            m.push_str(&format!("text --{b}{nl}"));
        }
        m
    }

    /// The charsets read as ASCII are those `mail-parser` decodes ASCII to itself in.
    #[test]
    fn ascii_identity_charsets_decode_ascii_unchanged() {
        let ascii: Vec<u8> = (0..128).collect();
        let text = String::from_utf8(ascii.clone()).unwrap();
        for name in ASCII_IDENTITY_CHARSETS {
            for spelling in [
                name.to_string(),
                name.to_uppercase(),
                name.replace('_', "-"),
            ] {
                assert!(is_ascii_identity(&spelling), "{spelling}");
                let decode = charset_decoder(spelling.as_bytes()).expect("a decoder");
                assert_eq!(decode(&ascii), text, "{spelling}");
            }
        }
        for other in [
            "utf-8",
            "utf-7",
            "iso-2022-jp",
            "utf-16",
            "iso-8859-2",
            "ascii2",
            "",
        ] {
            assert!(!is_ascii_identity(other), "{other}");
        }
    }

    /// mail-parser's four base64 tables accept the same bytes (the check reads the first).
    #[test]
    fn base64_tables_agree() {
        use mail_parser::decoders::base64::BASE64_MAP;
        for b in 0..256 {
            let valid: Vec<bool> = BASE64_MAP.iter().map(|m| m[b] < 0x01ff_ffff).collect();
            assert!(valid.iter().all(|&v| v == valid[0]), "{b}");
        }
    }

    /// `body` as the content of a part that ends at `boundary` (or the whole message).
    fn in_part(body: &str, boundary: &str) -> String {
        if boundary.is_empty() {
            body.to_string()
        } else {
            format!("{body}\r\n--{boundary}--\r\n")
        }
    }

    /// Checks, for a part `raw` that ends at `boundary`, that `fails` (a check that does not
    /// decode) says whether mail-parser's `decode` fails, and that where it does not, the
    /// walk ends the part where the decoder does. `None` when the walk finds no end (the
    /// decoder must not either); else whether it fails and where its decoder stops reading.
    fn agrees(
        raw: &[u8],
        boundary: &str,
        decode: impl Fn(&mut MessageStream<'_>, &[u8]) -> usize,
        fails: fn(&[u8]) -> bool,
    ) -> Option<(bool, usize)> {
        let mut stream = MessageStream::new(raw);
        let b = Some(boundary.as_bytes()).filter(|b| !b.is_empty());
        let (end, scan_end) = part_end(&mut stream, raw, b, &mut None);
        let decoded_end = decode(&mut MessageStream::new(raw), boundary.as_bytes());
        if end == usize::MAX {
            assert_eq!(decoded_end, usize::MAX, "{raw:?}");
            return None;
        }
        let failed = fails(&raw[..scan_end]);
        assert_eq!(failed, decoded_end == usize::MAX, "{raw:?}");
        if !failed {
            assert_eq!(decoded_end, end, "{raw:?}");
        }
        Some((failed, scan_end))
    }

    /// `base64_fails` says what mail-parser's decoder does, on random bodies before a
    /// boundary and at the end of a message.
    #[test]
    fn base64_fails_as_the_decoder_does() {
        let pieces = crate::test_support::test_chars("aZ09+/=-- \t\r\n.é_");
        let mut rng = TestRng::new(0xba5e_64ba_5e64_0001);
        let mut seen = [0; 2];
        for _ in 0..20_000 {
            let body = rng.text(24, &pieces);
            for boundary in ["", "b", "-b"] {
                let raw = in_part(&body, boundary);
                let decode = |s: &mut MessageStream<'_>, b: &[u8]| s.decode_base64_mime(b).0;
                if let Some((fails, _)) = agrees(raw.as_bytes(), boundary, decode, base64_fails) {
                    seen[usize::from(fails)] += 1;
                }
            }
        }
        // Both outcomes were tried, often.
        assert!(seen.iter().all(|&n| n > 5000), "{seen:?}");
    }

    /// `quoted_printable_fails` says what mail-parser's decoder does, on random bodies
    /// before a boundary and at the end of a message.
    #[test]
    fn quoted_printable_fails_as_the_decoder_does() {
        let pieces = crate::test_support::test_chars("=aF9g- \t\r\n\x0cé");
        let mut rng = TestRng::new(0x0071_7071_7071_0002);
        let mut seen = [0; 2];
        let mut quick_used = 0;
        for _ in 0..40_000 {
            let mut body = rng.text(16, &pieces);
            debug_safe_end(&mut body);
            for boundary in ["", "b", "-b"] {
                let raw = in_part(&body, boundary);
                let raw = raw.as_bytes();
                let decode =
                    |s: &mut MessageStream<'_>, b: &[u8]| s.decode_quoted_printable_mime(b).0;
                let Some((fails, scan_end)) = agrees(raw, boundary, decode, quoted_printable_fails)
                else {
                    continue;
                };
                seen[usize::from(fails)] += 1;
                let leaf = Leaf {
                    mime_type: MimeType::TextPlain,
                    is_text: true,
                    encoding: Encoding::QuotedPrintable,
                    boundary: boundary.as_bytes().to_vec(),
                    scan_end,
                };
                if let Some(quick) = quoted_printable_quick(raw, 0, &leaf) {
                    let mut stream = MessageStream::new(raw);
                    let (_, slow) = stream.decode_quoted_printable_mime(boundary.as_bytes());
                    assert!(!fails, "{raw:?}");
                    assert_eq!(quick, slow.into_owned(), "{raw:?}");
                    quick_used += 1;
                }
            }
        }
        assert!(seen.iter().all(|&n| n > 5000), "{seen:?}");
        assert!(quick_used > 5000, "{quick_used}");
    }

    /// `find_boundary` finds what a substring search finds, before and after it switches to
    /// the searcher (texts with more dashes than it tries one by one).
    #[test]
    fn find_boundary_is_a_substring_search() {
        let pieces = [
            "-",
            "--",
            "----",
            "b",
            "-b",
            "=_",
            "x",
            "\r\n",
            "------------------",
        ];
        let mut rng = TestRng::new(0x2d2d_2d2d_2d2d_0004);
        let mut finder = None;
        for _ in 0..20_000 {
            let text = rng.text(24, &pieces);
            for boundary in ["b", "-b", "--=_b", "x"] {
                let needle = format!("--{boundary}");
                assert_eq!(
                    find_boundary(text.as_bytes(), boundary.as_bytes(), &mut finder),
                    memchr::memmem::find(text.as_bytes(), needle.as_bytes()),
                    "{text:?} {boundary:?}"
                );
            }
        }
    }

    /// What 8-bit text labelled ISO-2022-JP is read as: UTF-8 before EUC-JP (which would
    /// read most UTF-8 too), then Shift_JIS; 7-bit text and undecodable bytes as labelled.
    #[test]
    fn mislabelled_japanese_text_is_read_as_what_it_is() {
        let word = "見つかりません";
        assert_eq!(mislabelled_japanese(b"plain ascii"), None);
        assert_eq!(mislabelled_japanese(word.as_bytes()).as_deref(), Some(word));
        let euc = b"\xb8\xab\xa4\xc4\xa4\xab\xa4\xea\xa4\xde\xa4\xbb\xa4\xf3";
        assert_eq!(mislabelled_japanese(euc).as_deref(), Some(word));
        let sjis = b"\x8c\xa9\x82\xc2\x82\xa9\x82\xe8\x82\xdc\x82\xb9\x82\xf1";
        assert_eq!(mislabelled_japanese(sjis).as_deref(), Some(word));
        assert_eq!(mislabelled_japanese(b"\xff\xfe\xff"), None);
    }

    /// The walk lists the same parts as `MessageParser::parse`, with the same types and
    /// the same decoded bodies.
    #[test]
    fn a_stray_character_in_base64_costs_only_itself() {
        use base64::Engine;
        let fields = "Reporting-MTA: dns; mx.example.net\r\n\r\n\
                      Final-Recipient: rfc822; full@example.net\r\nAction: failed\r\n\
                      Status: 5.2.2\r\nDiagnostic-Code: smtp; 552 5.2.2 Mailbox full\r\n";
        let encoded = base64::engine::general_purpose::STANDARD.encode(fields);
        let (head, tail) = encoded.split_at(40);
        let raw = format!(
            "From: MAILER-DAEMON@mx.example.net\r\nSubject: Undelivered Mail Returned to Sender\r\n\
             MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; \
             boundary=\"B\"\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nSee below.\r\n\
             --B\r\nContent-Type: message/delivery-status\r\nContent-Transfer-Encoding: base64\r\n\r\n\
             {head}*\r\n{tail}\r\n--B--\r\n"
        );
        let records = crate::bounce::parse(raw.as_bytes());
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(records[0].recipient, "full@example.net");
        assert_eq!(records[0].status.as_deref(), Some("5.2.2"));
        // Prose that only says it is base64 stays prose.
        assert_eq!(
            lenient_base64(b"This is not base64 at all, is it? No!"),
            None
        );
        let sentence = "Your message could not be delivered to the recipient below.\r\n";
        assert_eq!(lenient_base64(sentence.repeat(5).as_bytes()), None);
    }

    #[test]
    fn walk_matches_mail_parser() {
        let mut rng = TestRng::new(0x6d69_6d65_7761_6c6b);
        let mut compared = 0;
        for _ in 0..50_000 {
            let m = random_message(&mut rng, 0, None);
            // With overflow checks, mail-parser's own arithmetic can panic on broken MIME
            // (its release builds wrap, as the walk does): such messages have no reference.
            let Ok(expected) = std::panic::catch_unwind(|| reference(m.as_bytes())) else {
                if cfg!(debug_assertions) {
                    continue;
                }
                panic!("mail-parser panicked on {m:?}");
            };
            assert_eq!(walked(m.as_bytes()), expected, "{m:?}");
            compared += 1;
        }
        assert!(compared > 45_000, "{compared}");
        for raw in [
            &b""[..],
            b"\r\n",
            b"no header",
            b"Subject: x",
            b"Subject: x\r\n",
        ] {
            assert_eq!(walked(raw), reference(raw), "{raw:?}");
        }
    }
}
