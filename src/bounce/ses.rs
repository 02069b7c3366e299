//! Amazon SES event notifications (JSON, often wrapped in an SNS envelope and mailed to a
//! notification address): `Bounce` records carry DSN-like fields per recipient, `Complaint`
//! is a feedback report, `Delivery` confirms delivery. A relay that hands mail to SES as its
//! smarthost receives its bounces this way.

use serde_json::Value;

use super::message::View;
use super::text;
use super::{BounceKind, BounceRecord};

/// The notification object in `body`: the first JSON value, unwrapped from SNS when needed.
fn notification(body: &str) -> Option<Value> {
    // JSON first, after nothing but white space: checked without searching the whole
    // body for a brace.
    let json = body.trim_start();
    if !json.starts_with('{') {
        return None;
    }
    let first = |text: &str| {
        serde_json::Deserializer::from_str(text)
            .into_iter::<Value>()
            .next()
            .and_then(Result::ok)
    };
    // Some mailers fold long lines of the JSON body; unfold them when it does not parse.
    let outer = first(json).or_else(|| first(&json.replace("\r\n ", "").replace("\n ", "")))?;
    let inner = match outer.get("Message").and_then(Value::as_str) {
        Some(m) => serde_json::from_str::<Value>(m).ok()?,
        None => outer,
    };
    let kind = inner
        .get("notificationType")
        .or_else(|| inner.get("eventType"))
        .and_then(Value::as_str)?;
    matches!(kind, "Bounce" | "Complaint" | "Delivery").then_some(inner)
}

fn string(v: &Value, key: &str) -> Option<String> {
    v.get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// Records from an SES notification, or none when `view` is not one.
pub(crate) fn records(view: &View) -> Vec<BounceRecord> {
    let Some(n) = notification(&view.human) else {
        return Vec::new();
    };
    let mail = n.get("mail");
    let message_id = mail.and_then(|m| string(m, "messageId"));
    let source = mail.and_then(|m| string(m, "source"));
    let mut out = Vec::new();
    if let Some(bounce) = n.get("bounce") {
        let permanent = bounce.get("bounceType").and_then(Value::as_str) == Some("Permanent");
        let reporting =
            string(bounce, "reportingMTA").map(|v| super::dsn::strip_type(&v).to_string());
        for r in bounce
            .get("bouncedRecipients")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Some(addr) = string(r, "emailAddress") else {
                continue;
            };
            let mut rec = BounceRecord::new(addr, BounceKind::Dsn);
            if let Some(code) = string(r, "diagnosticCode") {
                let (t, text) = super::dsn::split_type(&code);
                rec.diagnostic_type = t.map(str::to_ascii_lowercase);
                rec.diagnostic = Some(text.to_string());
            }
            let diag = rec.diagnostic.as_deref().unwrap_or("");
            rec.status = string(r, "status").or_else(|| text::find_enhanced_status(diag));
            rec.reply_code = text::find_reply_code(diag);
            rec.action = string(r, "action")
                .or_else(|| Some(if permanent { "failed" } else { "delayed" }.to_string()));
            rec.reporting_mta = reporting.clone();
            rec.last_attempt = string(bounce, "timestamp");
            out.push(rec);
        }
    } else if let Some(complaint) = n.get("complaint") {
        let feedback_type =
            string(complaint, "complaintFeedbackType").unwrap_or_else(|| "abuse".to_string());
        for r in complaint
            .get("complainedRecipients")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Some(addr) = string(r, "emailAddress") else {
                continue;
            };
            let mut rec = BounceRecord::new(addr, BounceKind::Arf);
            rec.feedback_type = Some(feedback_type.clone());
            rec.last_attempt = string(complaint, "timestamp");
            out.push(rec);
        }
    } else if let Some(delivery) = n.get("delivery") {
        let response = string(delivery, "smtpResponse");
        for r in delivery
            .get("recipients")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            let mut rec = BounceRecord::new(r.to_string(), BounceKind::Dsn);
            rec.action = Some("delivered".to_string());
            let diag = response.clone().unwrap_or_default();
            rec.status = text::find_enhanced_status(&diag).or_else(|| Some("2.0.0".to_string()));
            rec.reply_code = diag.get(..3).and_then(|c| c.parse::<u16>().ok());
            rec.remote_mta = string(delivery, "reportingMTA");
            rec.diagnostic = response.clone();
            rec.last_attempt = string(delivery, "timestamp");
            out.push(rec);
        }
    }
    for r in &mut out {
        r.message_id = message_id.clone();
        r.original_sender = source.clone();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwraps_sns_and_reads_the_first_json_value() {
        let inner = r#"{"notificationType":"Bounce","bounce":{"bounceType":"Permanent"}}"#;
        let outer = serde_json::json!({"Type": "Notification", "Message": inner}).to_string();
        let body = format!("\n{outer}\n\n--\nunsubscribe text\n");
        let n = notification(&body).unwrap_or_default();
        assert_eq!(n["notificationType"], "Bounce");
        assert!(notification("hello {\"notificationType\":\"Bounce\"}").is_none());
        assert!(notification("{\"notificationType\":\"Other\"}").is_none());
        assert!(notification("{ not json").is_none());
    }
}
