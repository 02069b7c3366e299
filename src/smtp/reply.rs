//! SMTP replies (RFC 5321 4.2) with RFC 3463 enhanced status codes, rendered single- or
//! multi-line (`250-...` continuation lines, `250 ...` last).

use std::fmt;

/// One reply: a three-digit code, an optional enhanced status (`2.0.0`) and one or more text
/// lines. Text lines never contain CR or LF (they are replaced when the reply is built), so a
/// rendered reply is always well-formed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced_status: Option<&'static str>,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn new(code: u16, enhanced_status: &'static str, text: impl Into<String>) -> Self {
        Self {
            code,
            enhanced_status: Some(enhanced_status),
            lines: vec![clean(text.into())],
        }
    }

    /// A reply without enhanced status (the banner, EHLO, `334` AUTH challenges).
    pub fn plain(code: u16, text: impl Into<String>) -> Self {
        Self {
            code,
            enhanced_status: None,
            lines: vec![clean(text.into())],
        }
    }

    /// A multi-line reply without enhanced status (EHLO).
    pub fn multiline(code: u16, lines: Vec<String>) -> Self {
        Self {
            code,
            enhanced_status: None,
            lines: lines.into_iter().map(clean).collect(),
        }
    }

    /// 4xx and 5xx replies count as errors (for `max_errors` and the rejection metric).
    pub fn is_error(&self) -> bool {
        self.code >= 400
    }

    /// The first line's text, without code and enhanced status.
    pub fn text(&self) -> &str {
        self.lines.first().map(String::as_str).unwrap_or("")
    }

    /// The reply as one line for the server log: code, enhanced status and every line's
    /// text, without the wire form's CRLFs (which a log line would carry as `\r\n`).
    pub fn one_line(&self) -> String {
        let mut out = self.code.to_string();
        if let Some(status) = self.enhanced_status {
            out.push(' ');
            out.push_str(status);
        }
        for line in &self.lines {
            out.push(' ');
            out.push_str(line);
        }
        out
    }

    /// Wire form, CRLF after every line.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.to_string().into_bytes()
    }
}

fn clean(text: String) -> String {
    if text.contains(['\r', '\n']) {
        text.replace(['\r', '\n'], " ")
    } else {
        text
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let last = self.lines.len().saturating_sub(1);
        if self.lines.is_empty() {
            return write!(f, "{}\r\n", self.code);
        }
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            match self.enhanced_status {
                Some(status) => write!(f, "{}{sep}{status} {line}\r\n", self.code)?,
                None => write!(f, "{}{sep}{line}\r\n", self.code)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_single_line_with_enhanced_status() {
        let r = Reply::new(250, "2.1.0", "Ok");
        assert_eq!(r.to_string(), "250 2.1.0 Ok\r\n");
    }

    #[test]
    fn renders_multiline_with_dash_continuations() {
        let r = Reply::multiline(250, vec!["mx.example".into(), "PIPELINING".into()]);
        assert_eq!(r.to_string(), "250-mx.example\r\n250 PIPELINING\r\n");
    }

    #[test]
    fn one_line_form_has_no_line_breaks() {
        let r = Reply::new(550, "5.1.1", "Unknown bounce address");
        assert_eq!(r.one_line(), "550 5.1.1 Unknown bounce address");
        let r = Reply::multiline(250, vec!["mx.example".into(), "PIPELINING".into()]);
        assert_eq!(r.one_line(), "250 mx.example PIPELINING");
    }

    #[test]
    fn strips_line_breaks_from_text() {
        let r = Reply::plain(220, "a\r\nb");
        assert_eq!(r.to_string(), "220 a  b\r\n");
    }
}
