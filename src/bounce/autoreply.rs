//! RFC 3834 automatic replies (vacation, out of office): recognised by `Auto-Submitted:
//! auto-replied`, the de-facto `X-Autoreply` / `X-Autorespond` / `Precedence: auto_reply`
//! headers, or a vacation subject in one of several languages. The replying address (the
//! reply's From) is the recipient of the original message.

use std::sync::LazyLock;

use regex::Regex;

use super::message::View;
use super::{BounceKind, BounceRecord};

static VACATION_SUBJECT: LazyLock<Regex> = LazyLock::new(|| {
    #[allow(clippy::expect_used)]
    Regex::new(
        r"(?ix)
        \bout\ of\ (?:the\ )?office\b | \booo\b | \bauto[-\ ]?(?:matic\ )?(?:reply|response|respons|answer|antwort|réponse|respuesta|risposta) |
        \bautoreply\b | \bautorespon | \baway\ (?:from|until|till|on)\b | \bon\ (?:vacation|holiday|leave)\b |
        \bvacation\b | \bholiday\b | \babwesen | \babwesenheit | \babwesend | \bautomatische\ antwort | \bnicht\ im\ büro |
        réponse\ automatique | \babsent\b | \babsence\b | \bcongés?\b | respuesta\ automática | \bfuera\ de\ la\ oficina |
        risposta\ automatica | \bfuori\ ufficio | automatisch\ antwoord | \bafwezig | resposta\ automática |
        \bausente\b | \bférias\b | 自動応答 | 自動返信 | 不在 | 自动回复 | 休假 | 자동\ ?응답 | автоответ | отпуск
        ",
    )
    .expect("static regex")
});

/// How much of the Subject [`VACATION_SUBJECT`] is looked for in. Its Unicode `\b`s stop
/// the lazy DFA at the first non-ASCII byte and leave the search to the PikeVM, about 1.5 µs
/// a byte: over a hostile Subject of megabytes, seconds per message. An automatic reply
/// says so at the start ("Automatic reply: ...", "Out of Office: ...").
const VACATION_SUBJECT_SCAN: usize = 2048;

/// `subject` (its first [`VACATION_SUBJECT_SCAN`] bytes, cut at a white space so that no
/// word is cut short) reads like an automatic reply's.
fn is_vacation_subject(subject: &str) -> bool {
    let head = if subject.len() <= VACATION_SUBJECT_SCAN {
        subject
    } else {
        let head = subject
            .get(..subject.floor_char_boundary(VACATION_SUBJECT_SCAN))
            .unwrap_or("");
        head.rfind(char::is_whitespace)
            .and_then(|end| head.get(..end))
            .unwrap_or(head)
    };
    VACATION_SUBJECT.is_match(head)
}

fn has_autoreply_header(view: &View) -> bool {
    let auto_submitted = view
        .header("auto-submitted")
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("auto-replied"));
    let precedence = view
        .header("precedence")
        .is_some_and(|v| v.eq_ignore_ascii_case("auto_reply"));
    auto_submitted
        || precedence
        || view.header("x-autoreply").is_some()
        || view.header("x-autorespond").is_some()
        || view.header("x-autoresponder").is_some()
}

/// Whether `view`'s headers or Subject say it is an automatic reply (a mail system's
/// bounce may say so too: [`View::is_personal_autoreply`] tells them apart).
pub(crate) fn says_auto_reply(view: &View) -> bool {
    has_autoreply_header(view) || is_vacation_subject(&view.subject)
}

/// One auto-reply record, or none when `view` is not an automatic reply.
pub(crate) fn records(view: &View) -> Vec<BounceRecord> {
    // A delivery failure notice is never an auto-reply, even when it says auto-replied: then
    // only a vacation subject makes it one.
    let autoreply = if view.looks_like_bounce() {
        is_vacation_subject(&view.subject)
    } else {
        has_autoreply_header(view) || is_vacation_subject(&view.subject)
    };
    if !autoreply {
        return Vec::new();
    }
    if view.from().is_empty() || !view.from().contains('@') {
        return Vec::new();
    }
    let mut r = BounceRecord::new(view.from().to_string(), BounceKind::Autoreply);
    let first_line = view
        .human
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    let diagnostic = if view.subject.is_empty() {
        first_line.to_string()
    } else {
        view.subject.clone()
    };
    r.diagnostic = Some(diagnostic).filter(|d| !d.is_empty());
    vec![r]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vacation_subjects_in_several_languages() {
        for s in [
            "Out of Office: meeting",
            "Automatic reply: hello",
            "Abwesenheitsnotiz",
            "Réponse automatique : bonjour",
            "Fuera de la oficina",
            "Risposta automatica",
            "自動応答: 件名",
            "Away until May 5",
        ] {
            assert!(VACATION_SUBJECT.is_match(s), "{s}");
        }
        for s in ["Invoice 42", "Meeting notes", "Re: your order"] {
            assert!(!VACATION_SUBJECT.is_match(s), "{s}");
        }
    }

    #[test]
    fn only_the_head_of_a_long_subject_is_searched() {
        // Non-ASCII text sends the pattern's Unicode `\b` to the PikeVM, ~1.5 µs a byte.
        let filler = "é ".repeat(VACATION_SUBJECT_SCAN);
        assert!(is_vacation_subject(&format!("Out of Office: {filler}")));
        assert!(!is_vacation_subject(&format!("{filler} Out of Office")));
        // The cut falls at a space, never inside a word (`vacationer` is not `vacation`).
        let cut_word = format!("{}vacationer", " ".repeat(VACATION_SUBJECT_SCAN - 8));
        assert!(!is_vacation_subject(&cut_word));
    }
}
