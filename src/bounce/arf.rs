//! Complaints: RFC 5965 feedback reports (`multipart/report; report-type=feedback-report`)
//! and the providers' non-ARF equivalents (Microsoft JMRP complaint mails, Apple Mail's
//! unsubscribe requests). The complained-about recipient comes from Original-Rcpt-To, or the
//! returned message's X-HmXmrOriginalRecipient (Microsoft), or its To.

use super::dsn;
use super::message::View;
use super::text;
use super::{BounceKind, BounceRecord};

/// Complaint records, one per complained-about recipient; empty when `view` is no complaint.
pub(crate) fn records(view: &View) -> Vec<BounceRecord> {
    if let Some(report) = &view.feedback_report {
        return from_report(view, report);
    }
    if view.report_type.as_deref() == Some("feedback-report") {
        return from_report(view, "");
    }
    // Microsoft's JMRP: a complaint mail carrying the original with the recipient's address.
    if let Some(rcpt) = view.returned_header("x-hmxmroriginalrecipient") {
        return one(view, rcpt, "abuse");
    }
    // Apple Mail's one-click unsubscribe arrives as a plain message with this marker.
    if view
        .header("x-apple-unsubscribe")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    {
        let who = view.from().to_string();
        return one(view, &who, "opt-out");
    }
    Vec::new()
}

fn one(view: &View, rcpt: &str, feedback_type: &str) -> Vec<BounceRecord> {
    let Some((_, addr)) = text::addresses(rcpt).next() else {
        return Vec::new();
    };
    let mut r = BounceRecord::new(addr.to_string(), BounceKind::Arf);
    r.feedback_type = Some(feedback_type.to_string());
    r.diagnostic = Some(view.subject.clone()).filter(|s| !s.is_empty());
    vec![r]
}

fn from_report(view: &View, report: &str) -> Vec<BounceRecord> {
    let ds = dsn::parse_delivery_status(report);
    let fields: Vec<&(std::borrow::Cow<'static, str>, std::borrow::Cow<'_, str>)> = ds
        .per_message
        .fields
        .iter()
        .chain(ds.recipients.iter().flat_map(|b| b.fields.iter()))
        .collect();
    let get = |name: &str| {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let feedback_type = get("feedback-type")
        .map(|t| t.to_ascii_lowercase())
        .unwrap_or_else(|| "abuse".to_string());
    let mut recipients: Vec<String> = fields
        .iter()
        .filter(|(n, _)| n == "original-rcpt-to" || n == "removal-recipient")
        .filter_map(|(_, v)| dsn::address_of(v))
        .filter(|a| a.contains('@'))
        .collect();
    // Microsoft's JMRP in RFC 5965 form masks the returned message's To
    // (`masked@hotmail.com`) and names the recipient in X-HmXmrOriginalRecipient, as its
    // multipart/mixed form does.
    if recipients.is_empty()
        && let Some(to) = view
            .returned_header("x-hmxmroriginalrecipient")
            .or_else(|| view.returned_header("to"))
    {
        recipients.extend(text::addresses(to).map(|(_, a)| a.to_string()).take(1));
    }
    recipients.dedup_by(|a, b| a.eq_ignore_ascii_case(b));
    // A report that names no recipient ("undisclosed-recipients") is still a complaint about
    // the message, which its Message-ID identifies: keep one record with an empty recipient.
    if recipients.is_empty() {
        recipients.push(String::new());
    }
    let one_line = |v: String| v.split_whitespace().collect::<Vec<_>>().join(" ");
    // Who reported it: the ARF Reporting-MTA, else the report generator's User-Agent, else
    // the report's own From (RFC 5965 3.1: User-Agent is required, Reporting-MTA is not).
    let arf_reporting_mta = get("reporting-mta").map(|v| dsn::strip_type(&v).to_string());
    let reporting_mta = arf_reporting_mta
        .clone()
        .or_else(|| get("user-agent"))
        .or_else(|| Some(view.from().to_string()).filter(|f| !f.is_empty()))
        .map(one_line);
    // What a support desk asks of a complaint, kept where the stored record has room for it
    // (its first line, as the bounce list shows it), the report's human text after it.
    let arrival_date = get("arrival-date").or_else(|| get("received-date"));
    let mut facts = vec![format!("feedback-type={feedback_type}")];
    for (name, value) in [
        ("reporting-mta", arf_reporting_mta),
        ("user-agent", get("user-agent")),
        ("source-ip", get("source-ip")),
        ("arrival-date", arrival_date.clone()),
    ] {
        if let Some(v) = value {
            facts.push(format!("{name}={}", one_line(v)));
        }
    }
    let human = view
        .human
        .split("\n\n")
        .map(str::trim)
        .find(|p| !p.is_empty())
        // A report without its human part has the raw multipart body read as its text.
        .filter(|p| !p.starts_with("--"))
        .map(|p| one_line(p.to_string()));
    let facts = facts.join("; ");
    let diagnostic = Some(match human {
        Some(h) => format!("{facts}\n{h}"),
        None => facts,
    });
    recipients
        .into_iter()
        .map(|rcpt| {
            let mut r = BounceRecord::new(rcpt, BounceKind::Arf);
            r.feedback_type = Some(feedback_type.clone());
            r.reporting_mta = reporting_mta.clone();
            r.last_attempt = arrival_date.clone();
            r.original_sender = get("original-mail-from").and_then(|v| dsn::address_of(&v));
            r.diagnostic = diagnostic.clone();
            r
        })
        .collect()
}
