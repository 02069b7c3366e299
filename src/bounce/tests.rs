//! Parser tests on small hand-written bounces, one per format family.

use super::*;

fn one(raw: &str) -> BounceRecord {
    let records = parse(raw.as_bytes());
    assert_eq!(records.len(), 1, "{records:#?}");
    records.into_iter().next().unwrap_or_else(|| unreachable!())
}

fn receipt() -> ReceiptId {
    ReceiptId::from_u128(0x0192_0000_1111_2222_3333_4444_5555_6666)
}

fn dsn_two_recipients() -> String {
    format!(
        "From: Mail Delivery System <MAILER-DAEMON@mx.example.org>\r\n\
To: app@example.com\r\n\
Subject: Undelivered Mail Returned to Sender\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=delivery-status; boundary=\"B1\"\r\n\
\r\n\
--B1\r\n\
Content-Type: text/plain; charset=us-ascii\r\n\
\r\n\
I'm sorry to have to inform you that your message could not be delivered.\r\n\
\r\n\
--B1\r\n\
Content-Type: message/delivery-status\r\n\
\r\n\
Reporting-MTA: dns; mx.example.org\r\n\
Original-Envelope-Id: env-77\r\n\
Arrival-Date: Mon, 2 Jun 2025 10:00:00 +0000\r\n\
\r\n\
Final-Recipient: rfc822; alice@example.net\r\n\
Original-Recipient: rfc822; Alice@example.net\r\n\
Action: failed\r\n\
Status: 5.1.1\r\n\
Remote-MTA: dns; mx.example.net\r\n\
Diagnostic-Code: smtp; 550 5.1.1 <alice@example.net>: Recipient address\r\n    rejected: User unknown in local recipient table\r\n\
Last-Attempt-Date: Mon, 2 Jun 2025 10:00:05 +0000\r\n\
\r\n\
Final-Recipient: rfc822; bob@example.net\r\n\
Action: delayed\r\n\
Status: 4.2.2\r\n\
Diagnostic-Code: smtp; 452 4.2.2 Mailbox full\r\n\
Will-Retry-Until: Fri, 6 Jun 2025 10:00:00 +0000\r\n\
\r\n\
Final-Recipient: rfc822; carol@example.net\r\n\
Action: delivered\r\n\
Status: 2.0.0\r\n\
\r\n\
--B1\r\n\
Content-Type: text/rfc822-headers\r\n\
\r\n\
Received: from app.example.com by relay.example.com with ESMTP id <{id}>;\r\n\tMon, 2 Jun 2025 09:59:59 +0000\r\n\
Return-Path: <app@example.com>\r\n\
Message-ID: <m1@example.com>\r\n\
From: app@example.com\r\n\
To: alice@example.net\r\n\
Subject: hello\r\n\
\r\n\
--B1--\r\n",
        id = receipt()
    )
}

#[test]
fn dsn_gives_one_record_per_failed_or_delayed_recipient() {
    let records = parse(dsn_two_recipients().as_bytes());
    assert_eq!(records.len(), 2, "delivered recipients are not bounces");
    let a = &records[0];
    assert_eq!(a.kind, BounceKind::Dsn);
    assert_eq!(a.recipient, "alice@example.net");
    assert_eq!(a.original_recipient.as_deref(), Some("Alice@example.net"));
    assert_eq!(a.orcpt.as_deref(), Some("rfc822; Alice@example.net"));
    assert_eq!(a.action.as_deref(), Some("failed"));
    assert_eq!(a.status.as_deref(), Some("5.1.1"));
    assert_eq!(a.reply_code, Some(550));
    assert_eq!(a.reason, BounceReason::UserUnknown);
    assert_eq!(a.bounce_type, BounceType::Hard);
    assert_eq!(a.remote_mta.as_deref(), Some("mx.example.net"));
    assert_eq!(a.reporting_mta.as_deref(), Some("mx.example.org"));
    assert_eq!(a.envid.as_deref(), Some("env-77"));
    assert_eq!(
        a.last_attempt.as_deref(),
        Some("Mon, 2 Jun 2025 10:00:05 +0000")
    );
    assert!(
        a.diagnostic
            .as_deref()
            .is_some_and(|d| d.contains("User unknown in local recipient table"))
    );
    let b = &records[1];
    assert_eq!(b.recipient, "bob@example.net");
    assert_eq!(b.action.as_deref(), Some("delayed"));
    assert_eq!(b.reason, BounceReason::MailboxFull);
    assert_eq!(b.bounce_type, BounceType::Soft);
    assert_eq!(
        b.will_retry_until.as_deref(),
        Some("Fri, 6 Jun 2025 10:00:00 +0000")
    );
    assert_eq!(
        b.recipient_status(),
        None,
        "a delay does not bounce the recipient"
    );
    assert_eq!(
        a.recipient_status(),
        Some(crate::store::RecipientStatus::Bounced)
    );
}

#[test]
fn dsn_carries_the_correlation_hints_of_the_returned_message() {
    let records = parse(dsn_two_recipients().as_bytes());
    for r in &records {
        assert_eq!(r.receipt, Some(receipt()));
        assert_eq!(r.message_id.as_deref(), Some("<m1@example.com>"));
        assert_eq!(r.original_sender.as_deref(), Some("app@example.com"));
        assert_eq!(r.original_to.as_deref(), Some("alice@example.net"));
    }
}

#[test]
fn mailtrail_receipt_header_wins_over_received() {
    let other = ReceiptId::from_u128(42);
    let raw = format!(
        "From: MAILER-DAEMON@mx.example.org\r\nSubject: Undelivered Mail\r\n\r\n\
<x@example.net>: host mx.example.net said: 550 5.1.1 no such user\r\n\r\n\
--- Below this line is a copy of the message.\r\n\r\n\
Received: from a by b id <{}>;\r\n  Mon, 2 Jun 2025 09:59:59 +0000\r\n\
X-Mailtrail-Receipt: {}\r\nMessage-ID: <m2@example.com>\r\nFrom: app@example.com\r\n\
To: x@example.net\r\n\r\nbody\r\n",
        other,
        receipt()
    );
    let r = one(&raw);
    assert_eq!(r.receipt, Some(receipt()));
    assert_eq!(r.message_id.as_deref(), Some("<m2@example.com>"));
}

#[test]
fn an_extension_diagnostic_type_is_not_part_of_the_diagnostic() {
    let raw = "From: MAILER-DAEMON@relay.example.org\r\n\
To: app@example.com\r\n\
Subject: failure notice\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=delivery-status; boundary=\"B2\"\r\n\
\r\n\
--B2\r\n\
Content-Type: text/plain\r\n\
\r\n\
Your message could not be delivered.\r\n\
\r\n\
--B2\r\n\
Content-Type: message/delivery-status\r\n\
\r\n\
Reporting-MTA: dns; relay.example.org\r\n\
\r\n\
Final-Recipient: rfc822; dave@nowhere.example\r\n\
Action: failed\r\n\
Status: 5.4.4\r\n\
Diagnostic-Code: X-Outbound-Mail-Relay; Host or domain name not found. Name\r\n    service error for name=nowhere.example type=A: Host not found\r\n\
\r\n\
--B2--\r\n";
    let r = one(raw);
    assert_eq!(r.recipient, "dave@nowhere.example");
    assert_eq!(r.diagnostic_type.as_deref(), Some("x-outbound-mail-relay"));
    let diagnostic = r.diagnostic.as_deref().unwrap_or("");
    assert!(
        diagnostic.starts_with("Host or domain name not found."),
        "{diagnostic:?}"
    );
    assert_eq!(r.reason, BounceReason::HostUnknown);
}

#[test]
fn delivery_status_fields_inlined_in_text_end_the_diagnostic() {
    let raw = "From: Mail Delivery Subsystem <MAILER-DAEMON@mx.example.net>\r\n\
To: app@example.com\r\n\
Subject: Returned mail: see transcript for details\r\n\
\r\n\
   ----- The following addresses had permanent fatal errors -----\r\n\
<dora@example.net>\r\n\
\r\n\
   ----- Transcript of session follows -----\r\n\
mail.local: unknown user: dora\r\n\
554 <dora@example.net>... Service unavailable\r\n\
\r\n\
Reporting-MTA: dns; mx.example.net\r\n\
Arrival-Date: Mon, 2 Jun 2025 10:00:00 +0000\r\n\
\r\n\
Final-Recipient: RFC822; dora@example.net\r\n\
Action: failed\r\n\
Status: 5.1.1\r\n";
    let r = one(raw);
    assert_eq!(r.recipient, "dora@example.net");
    let diagnostic = r.diagnostic.as_deref().unwrap_or("");
    assert!(
        diagnostic.ends_with("Service unavailable"),
        "{diagnostic:?}"
    );
    assert!(!diagnostic.contains("Reporting-MTA"), "{diagnostic:?}");
}

/// The transcript names the address before aliasing (or a program it was piped to), the
/// inlined fields the final one: the fields are no diagnostic, the transcript is.
#[test]
fn a_recipient_named_only_in_inlined_fields_takes_the_transcript_as_diagnostic() {
    let raw = "From: Mail Delivery Subsystem <MAILER-DAEMON@mx.example.net>\r\n\
To: app@example.com\r\n\
Subject: Returned mail: Service unavailable\r\n\
\r\n\
   ----- The following addresses had permanent fatal errors -----\r\n\
\"|/usr/bin/filter-program #erin\"\r\n\
    (expanded from: <erin-alias@example.net>)\r\n\
\r\n\
   ----- Transcript of session follows -----\r\n\
554 \"|/usr/bin/filter-program #erin\"... Service unavailable\r\n\
\r\n\
Reporting-MTA: dns; mx.example.net\r\n\
\r\n\
Final-Recipient: RFC822; erin@mx.example.net\r\n\
Action: failed\r\n\
Status: 5.5.0\r\n";
    let r = one(raw);
    assert_eq!(r.recipient, "erin@mx.example.net");
    let diagnostic = r.diagnostic.as_deref().unwrap_or("");
    assert!(
        diagnostic.ends_with("Service unavailable"),
        "{diagnostic:?}"
    );
    assert!(!diagnostic.contains("Final-Recipient"), "{diagnostic:?}");
    assert_eq!(r.reply_code, Some(554));
    assert_eq!(r.status.as_deref(), Some("5.5.0"));
}

/// A block without Diagnostic-Code whose recipient the prose does not name: the comment in
/// its Status field explains it, not the prose about another recipient.
#[test]
fn a_status_comment_explains_a_recipient_the_prose_does_not_name() {
    let raw = "From: Mail Delivery Subsystem <MAILER-DAEMON@mx.example.org>\r\n\
To: app@example.com\r\n\
Subject: Returned mail: User unknown\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=delivery-status; boundary=\"S\"\r\n\
\r\n\
--S\r\n\
Content-Type: text/plain\r\n\
\r\n\
<frank@example.net> (unrecoverable error)\r\n\
\r\n\
--S\r\n\
Content-Type: message/delivery-status\r\n\
\r\n\
Reporting-MTA: dns; mx.example.org\r\n\
\r\n\
Final-Recipient: rfc822;frank@example.net\r\n\
Action: failed\r\n\
Status: 5.0.0\r\n\
Diagnostic-Code: smtp; 550 user unknown\r\n\
\r\n\
Final-Recipient: rfc822;grace@example.com\r\n\
Action: delayed\r\n\
Status: 4.0.0 (example.com: host name lookup failure)\r\n\
\r\n\
--S--\r\n";
    let records = parse(raw.as_bytes());
    assert_eq!(records.len(), 2, "{records:#?}");
    let grace = &records[1];
    assert_eq!(grace.recipient, "grace@example.com");
    assert_eq!(
        grace.diagnostic.as_deref(),
        Some("example.com: host name lookup failure")
    );
    assert_eq!(grace.status.as_deref(), Some("4.0.0"));
    assert_eq!(records[0].diagnostic.as_deref(), Some("550 user unknown"));
}

/// A bounce that lists its recipients twice (in Russian, then in English): each
/// recipient's text ends where another recipient is named again.
#[test]
fn a_repeated_list_ends_each_recipients_text_at_the_next_recipient_named_again() {
    let raw = "From: Mail Delivery System <Mailer-Daemon@mx.example.org>\r\n\
To: app@example.com\r\n\
Subject: Mail delivery failed: returning message to sender\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
\r\n\
Сообщение не доставлено.\r\n\
\r\n\
  ann@example.net\r\n\
    host mx.example.net [192.0.2.1]: 550 5.2.2 <ann@example.net>... Mailbox full\r\n\
  bea@example.net\r\n\
    host mx.example.net [192.0.2.1]: 550 5.1.1 <bea@example.net>... User unknown\r\n\
Проверьте адреса получателей.\r\n\
\r\n\
This message was created automatically by mail delivery software.\r\n\
The following address(es) failed:\r\n\
\r\n\
  ann@example.net\r\n\
    host mx.example.net [192.0.2.1]: 550 5.2.2 <ann@example.net>... Mailbox full\r\n\
  bea@example.net\r\n\
    host mx.example.net [192.0.2.1]: 550 5.1.1 <bea@example.net>... User unknown\r\n";
    let records = parse(raw.as_bytes());
    assert_eq!(records.len(), 2, "{records:#?}");
    let (ann, bea) = (&records[0], &records[1]);
    assert_eq!(ann.recipient, "ann@example.net");
    assert_eq!(ann.reason, BounceReason::MailboxFull);
    assert_eq!(bea.recipient, "bea@example.net");
    let diagnostic = bea.diagnostic.as_deref().unwrap_or("");
    assert!(!diagnostic.contains("Mailbox full"), "{diagnostic:?}");
    assert_eq!(bea.reason, BounceReason::UserUnknown);
    assert_eq!(bea.bounce_type, BounceType::Hard);
}

#[test]
fn a_dsn_of_only_successes_reports_them_as_delivered() {
    let raw = "From: MAILER-DAEMON@mx.example.org\r\nSubject: Successful Mail Delivery Report\r\n\
Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\r\n\
--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.org\r\n\r\n\
Final-Recipient: rfc822; ok@example.net\r\nAction: relayed\r\nStatus: 2.0.0\r\n\r\n--B--\r\n";
    let r = one(raw);
    assert_eq!(r.reason, BounceReason::Delivered);
    assert_eq!(r.bounce_type, BounceType::Undetermined);
    assert_eq!(r.recipient_status(), None);
}

#[test]
fn global_delivery_status_is_read_like_a_dsn() {
    let raw = "From: MAILER-DAEMON@mx.example.org\r\nSubject: Delivery Status Notification (Failure)\r\n\
Content-Type: multipart/report; report-type=global-delivery-status; boundary=\"G\"\r\n\r\n\
--G\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nÉchec de remise.\r\n\
--G\r\nContent-Type: message/global-delivery-status\r\n\r\n\
Reporting-MTA: dns; mx.example.org\r\n\r\n\
Final-Recipient: utf-8; jörg@example.de\r\nAction: failed\r\nStatus: 5.2.2\r\n\
Diagnostic-Code: smtp; 552 5.2.2 Postfach voll (mailbox full)\r\n\r\n--G--\r\n";
    let r = one(raw);
    assert_eq!(r.recipient, "jörg@example.de");
    assert_eq!(r.reason, BounceReason::MailboxFull);
}

#[test]
fn arf_complaint_names_the_complained_about_recipient() {
    let raw = "From: feedback@isp.example\r\nTo: abuse@example.com\r\nSubject: Abuse report\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=feedback-report; boundary=\"F\"\r\n\r\n\
--F\r\nContent-Type: text/plain\r\n\r\nThis is an abuse report.\r\n\
--F\r\nContent-Type: message/feedback-report\r\n\r\n\
Feedback-Type: abuse\r\nUser-Agent: ISP-FBL/1.0\r\nVersion: 1\r\n\
Original-Mail-From: <app@example.com>\r\nOriginal-Rcpt-To: <user@isp.example>\r\n\
Arrival-Date: Mon, 2 Jun 2025 10:00:00 +0000\r\nReporting-MTA: dns; fbl.isp.example\r\n\
--F\r\nContent-Type: message/rfc822\r\n\r\n\
Message-ID: <m3@example.com>\r\nFrom: app@example.com\r\nTo: user@isp.example\r\n\r\nhi\r\n--F--\r\n";
    let r = one(raw);
    assert_eq!(r.kind, BounceKind::Arf);
    assert_eq!(r.recipient, "user@isp.example");
    assert_eq!(r.feedback_type.as_deref(), Some("abuse"));
    assert_eq!(r.reason, BounceReason::Feedback);
    assert_eq!(r.bounce_type, BounceType::Complaint);
    assert_eq!(r.message_id.as_deref(), Some("<m3@example.com>"));
    assert_eq!(r.original_sender.as_deref(), Some("app@example.com"));
    assert_eq!(
        r.recipient_status(),
        Some(crate::store::RecipientStatus::Complained)
    );
    assert_eq!(r.reporting_mta.as_deref(), Some("fbl.isp.example"));
    assert_eq!(
        r.diagnostic.as_deref(),
        Some(
            "feedback-type=abuse; reporting-mta=fbl.isp.example; user-agent=ISP-FBL/1.0; \
             arrival-date=Mon, 2 Jun 2025 10:00:00 +0000\nThis is an abuse report."
        )
    );
}

#[test]
fn arf_reporter_is_the_reporting_mta_else_the_user_agent_else_the_reports_from() {
    let report = |fields: &str| {
        format!(
            "From: Feedback Loop <fbl@isp.example>\r\nSubject: report\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=feedback-report; boundary=\"F\"\r\n\r\n\
--F\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: fraud\r\n{fields}\
Original-Rcpt-To: u@isp.example\r\n\
--F\r\nContent-Type: message/rfc822\r\n\r\nFrom: app@example.com\r\n\r\nx\r\n--F--\r\n"
        )
    };
    let r = one(&report(
        "User-Agent: SomeGenerator/1.0\r\nSource-IP: 192.0.2.7\r\nReporting-MTA: dns; mx.isp.example\r\n",
    ));
    assert_eq!(r.reporting_mta.as_deref(), Some("mx.isp.example"));
    assert_eq!(
        r.diagnostic.as_deref(),
        Some(
            "feedback-type=fraud; reporting-mta=mx.isp.example; user-agent=SomeGenerator/1.0; \
             source-ip=192.0.2.7"
        )
    );
    let r = one(&report("User-Agent: SomeGenerator/1.0\r\n"));
    assert_eq!(r.reporting_mta.as_deref(), Some("SomeGenerator/1.0"));
    assert_eq!(
        r.diagnostic.as_deref(),
        Some("feedback-type=fraud; user-agent=SomeGenerator/1.0")
    );
    let r = one(&report(""));
    assert_eq!(r.reporting_mta.as_deref(), Some("fbl@isp.example"));
    assert_eq!(r.diagnostic.as_deref(), Some("feedback-type=fraud"));
    // Its classification is as before.
    assert_eq!(
        (r.reason, r.bounce_type),
        (BounceReason::Feedback, BounceType::Complaint)
    );
}

#[test]
fn arf_without_original_rcpt_to_uses_the_returned_to() {
    let raw = "From: fbl@isp.example\r\nSubject: report\r\n\
Content-Type: multipart/report; report-type=feedback-report; boundary=\"F\"\r\n\r\n\
--F\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: opt-out\r\n\
--F\r\nContent-Type: message/rfc822\r\n\r\nFrom: app@example.com\r\nTo: <u@isp.example>\r\n\r\nx\r\n--F--\r\n";
    let r = one(raw);
    assert_eq!(r.recipient, "u@isp.example");
    assert_eq!(r.feedback_type.as_deref(), Some("opt-out"));
}

#[test]
fn a_microsoft_feedback_report_names_the_original_recipient_not_the_masked_to() {
    let raw = "From: staff@hotmail.com\r\nTo: complaints@example.com\r\nSubject: complaint\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=feedback-report; boundary=\"F\"\r\n\r\n\
--F\r\nContent-Type: text/plain\r\n\r\nThis is an email abuse report.\r\n\r\n\
--F\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\n\
User-Agent: Microsoft JMRP\r\nVersion: 1\r\n\r\n\
--F\r\nContent-Type: message/rfc822\r\n\r\n\
X-HmXmrOriginalRecipient: <helen@hotmail.com>\r\nFrom: app@example.com\r\n\
To: masked@hotmail.com\r\nMessage-ID: <j1@example.com>\r\nSubject: offer\r\n\r\nbody\r\n\
--F--\r\n";
    let r = one(raw);
    assert_eq!(r.kind, BounceKind::Arf);
    assert_eq!(r.recipient, "helen@hotmail.com");
    assert_eq!(r.message_id.as_deref(), Some("<j1@example.com>"));
}

#[test]
fn not_spam_and_auth_failure_reports_are_no_complaints() {
    for (feedback_type, bounce_type) in [
        ("abuse", BounceType::Complaint),
        ("not-spam", BounceType::Undetermined),
        ("auth-failure", BounceType::Undetermined),
    ] {
        let raw = format!(
            "From: fbl@isp.example\r\nSubject: report\r\n\
Content-Type: multipart/report; report-type=feedback-report; boundary=\"F\"\r\n\r\n\
--F\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: {feedback_type}\r\n\
Original-Rcpt-To: u@isp.example\r\n\
--F\r\nContent-Type: message/rfc822\r\n\r\nFrom: app@example.com\r\n\r\nx\r\n--F--\r\n"
        );
        let r = one(&raw);
        assert_eq!(r.kind, BounceKind::Arf);
        assert_eq!(r.bounce_type, bounce_type, "{feedback_type}");
        assert_eq!(
            crate::bounce::ingest::new_status(&r).is_some(),
            bounce_type == BounceType::Complaint,
            "{feedback_type}"
        );
    }
}

#[test]
fn auto_replies_are_vacation_records_for_the_replying_address() {
    for headers in [
        "Auto-Submitted: auto-replied\r\nSubject: Re: your order\r\n",
        "X-Autoreply: yes\r\nSubject: Re: hello\r\n",
        "Precedence: auto_reply\r\nSubject: hello\r\n",
        "Subject: =?UTF-8?Q?R=C3=A9ponse_automatique=C2=A0:_hello?=\r\n",
        "Subject: Abwesenheitsnotiz: hello\r\n",
    ] {
        let raw = format!(
            "From: Jane <jane@example.net>\r\nTo: app@example.com\r\n{headers}\r\nI am away until Monday.\r\n"
        );
        let r = one(&raw);
        assert_eq!(r.kind, BounceKind::Autoreply, "{headers}");
        assert_eq!(r.recipient, "jane@example.net");
        assert_eq!(r.reason, BounceReason::Vacation);
        assert_eq!(r.bounce_type, BounceType::Autoreply);
        assert_eq!(r.recipient_status(), None);
    }
}

#[test]
fn postfix_style_prose_bounce() {
    let raw = "From: MAILER-DAEMON@mx.example.org (Mail Delivery System)\r\n\
Subject: Undelivered Mail Returned to Sender\r\nTo: app@example.com\r\n\r\n\
This is the mail system at host mx.example.org.\r\n\r\n\
<gone@example.net>: host mx.example.net[192.0.2.9] said: 550 5.1.1\r\n\
    <gone@example.net>: Recipient address rejected: User unknown (in reply to RCPT TO\r\n\
    command)\r\n";
    let r = one(raw);
    assert_eq!(r.kind, BounceKind::Heuristic);
    assert_eq!(r.recipient, "gone@example.net");
    assert_eq!(r.status.as_deref(), Some("5.1.1"));
    assert_eq!(r.reply_code, Some(550));
    assert_eq!(r.smtp_command.as_deref(), Some("RCPT"));
    assert_eq!(r.reason, BounceReason::UserUnknown);
    assert_eq!(r.bounce_type, BounceType::Hard);
}

/// A one-recipient prose notice whose text part is labelled `charset` and ends in the
/// Japanese for "user not found" in `encoded`, as Japanese providers write it.
fn japanese_notice(charset: &str, encoded: &[u8]) -> Vec<u8> {
    let mut raw = format!(
        "From: MAILER-DAEMON@mx.example.jp (Mail Delivery System)\r\n\
Subject: Undelivered Mail Returned to Sender\r\nTo: app@example.com\r\nMIME-Version: 1.0\r\n\
Content-Type: text/plain; charset={charset}\r\n\r\n<gone@example.jp>: 550 5.1.1 "
    )
    .into_bytes();
    raw.extend_from_slice(encoded);
    raw.extend_from_slice(b"\r\n");
    raw
}

/// The record of [`japanese_notice`] says what the notice says, decoded.
fn assert_decoded_japanese_notice(raw: &[u8]) {
    let records = parse(raw);
    assert_eq!(records.len(), 1, "{records:#?}");
    let r = &records[0];
    assert_eq!(r.recipient, "gone@example.jp");
    assert_eq!(
        r.diagnostic.as_deref(),
        Some("<gone@example.jp>: 550 5.1.1 ユーザが見つかりません")
    );
    assert_eq!(r.reason, BounceReason::UserUnknown);
}

/// A notice in ISO-2022-JP (as Japanese providers send them) is decoded, so its text (the
/// diagnostic an admin reads) is Japanese, not escape sequences.
#[test]
fn a_notice_in_iso_2022_jp_is_decoded() {
    let iso_2022_jp = b"\x1b$B%f!<%6$,8+$D$+$j$^$;$s\x1b(B";
    assert_decoded_japanese_notice(&japanese_notice("iso-2022-jp", iso_2022_jp));
}

/// A nested multipart whose `boundary=` sits on an unindented line (so outside its field)
/// is read with the boundary its first delimiter line names: the diagnostic is the notice's
/// text, not its delimiters and part headers.
#[test]
fn a_multipart_part_without_its_boundary_is_read_by_its_delimiters() {
    let raw = "From: postmaster@mx.example.net\r\nTo: app@example.com\r\n\
Subject: Delivery failure\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"out\"\r\n\r\n\
--out\r\n\
Content-Type: multipart/alternative;\r\n\
boundary=\"in\"\r\n\r\n\
--in\r\n\
Content-Type: text/plain; charset=us-ascii\r\n\r\n\
Error: Invalid user address\r\n\
<gone@example.net>: 550 5.1.1 no such user here\r\n\
--in--\r\n\r\n\
--out--\r\n";
    let r = one(raw);
    assert_eq!(r.recipient, "gone@example.net");
    assert_eq!(
        r.diagnostic.as_deref(),
        Some("<gone@example.net>: 550 5.1.1 no such user here")
    );
    assert_eq!(r.reason, BounceReason::UserUnknown);
}

/// A help-desk address named with "please contact" is no recipient where it comes again in
/// words the sender-context check cannot read (here Japanese).
#[test]
fn a_help_desk_address_stays_excluded_where_it_comes_again() {
    let raw = "From: MAILER-DAEMON@mx.example.jp (Mail Delivery System)\r\n\
Subject: Undelivered Mail Returned to Sender\r\nTo: app@example.com\r\nMIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\
For further assistance, please contact <help@isp.example>\r\n\r\n\
解決できない場合は、<help@isp.example> へご連絡ください。\r\n\r\n\
<gone@example.net>: host mx.example.net[192.0.2.9] said: 550 5.1.1 User unknown\r\n\
\x20   (in reply to RCPT TO command)\r\n";
    let r = one(raw);
    assert_eq!(r.recipient, "gone@example.net");
    assert_eq!(r.reason, BounceReason::UserUnknown);
}

/// EUC-JP text labelled ISO-2022-JP (a 7-bit encoding), as some Japanese carriers send it,
/// is decoded as what it is, not to replacement characters.
#[test]
fn euc_jp_labelled_iso_2022_jp_is_decoded_as_euc_jp() {
    let euc_jp =
        b"\xa5\xe6\xa1\xbc\xa5\xb6\xa4\xac\xb8\xab\xa4\xc4\xa4\xab\xa4\xea\xa4\xde\xa4\xbb\xa4\xf3";
    assert_decoded_japanese_notice(&japanese_notice("\"ISO-2022-JP\"", euc_jp));
}

/// A returned header quoted inline without a marker line and with no space after the
/// colons (`Received:from ...`, as some webmail MTAs write it) ends the diagnostic, and its
/// Message-ID still correlates.
#[test]
fn inline_returned_header_without_spaces_ends_the_diagnostic() {
    let raw = "From: mailer-daemon@mail.example.org\r\n\
Subject: Undelivered Mail Returned to Sender\r\nTo: app@example.com\r\n\r\n\
A message that you sent could not be delivered to one or more of its recipients.\r\n\r\n\
full@example.net Invalid Address, ERROR_CODE :550, ERROR_CODE :5.2.2 Mailbox Full\r\n\r\n\r\n\
Received:from mail.example.org by mx.example.org\r\n\
\x20   with SMTP id 1234; Fri, 12 Dec 2014 02:50:59 -0800 (PST)\r\n\
Message-ID:<m-42@app.example.com>\r\n\
From:\"App\" <app@example.com>\r\n\
To:<full@example.net>\r\n\
Subject:Invoice\r\n";
    let r = one(raw);
    assert_eq!(r.recipient, "full@example.net");
    assert_eq!(
        r.diagnostic.as_deref(),
        Some("full@example.net Invalid Address, ERROR_CODE :550, ERROR_CODE :5.2.2 Mailbox Full")
    );
    assert_eq!(r.message_id.as_deref(), Some("<m-42@app.example.com>"));
    assert_eq!(r.reason, BounceReason::MailboxFull);
}

/// An SMTPUTF8 recipient (RFC 6531) in a prose bounce is read whole, not from its first
/// ASCII letter on.
#[test]
fn prose_bounce_for_an_internationalised_address() {
    let raw = "From: MAILER-DAEMON@mx.example.org (Mail Delivery System)\r\n\
Subject: Undelivered Mail Returned to Sender\r\nTo: app@example.com\r\n\
Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\
This is the mail system at host mx.example.org.\r\n\r\n\
<jürgen@müller.example>: host mx.example.net[192.0.2.9] said: 550 5.1.1\r\n\
    <jürgen@müller.example>: Recipient address rejected: User unknown (in reply to\r\n\
    RCPT TO command)\r\n";
    let r = one(raw);
    assert_eq!(r.recipient, "jürgen@müller.example");
    assert_eq!(r.reason, BounceReason::UserUnknown);
    assert_eq!(r.bounce_type, BounceType::Hard);
}

#[test]
fn exim_style_bounce_uses_x_failed_recipients() {
    let raw = "From: Mail Delivery System <Mailer-Daemon@mx.example.org>\r\n\
To: app@example.com\r\nSubject: Mail delivery failed: returning message to sender\r\n\
X-Failed-Recipients: full@example.net\r\nAuto-Submitted: auto-replied\r\n\r\n\
This message was created automatically by mail delivery software.\r\n\r\n\
A message that you sent could not be delivered to one or more of its\r\n\
recipients. This is a permanent error. The following address(es) failed:\r\n\r\n\
  full@example.net\r\n\
    host mx.example.net [192.0.2.9]\r\n\
    SMTP error from remote mail server after RCPT TO:<full@example.net>:\r\n\
    552 5.2.2 Mailbox quota exceeded\r\n\r\n\
------ This is a copy of the message, including all the headers. ------\r\n\r\n\
From: app@example.com\r\nTo: full@example.net\r\nSubject: hi\r\n\r\nhello\r\n";
    let r = one(raw);
    assert_eq!(r.recipient, "full@example.net");
    assert_eq!(r.reason, BounceReason::MailboxFull);
    assert_eq!(r.status.as_deref(), Some("5.2.2"));
    assert_eq!(r.bounce_type, BounceType::Soft);
}

#[test]
fn qmail_style_bounce_with_two_recipients() {
    let raw = "From: MAILER-DAEMON@mx.example.org\r\nTo: app@example.com\r\nSubject: failure notice\r\n\r\n\
Hi. This is the qmail-send program at mx.example.org.\r\n\
I'm afraid I wasn't able to deliver your message to the following addresses.\r\n\
This is a permanent error; I've given up. Sorry it didn't work out.\r\n\r\n\
<nohost@nowhere.example>:\r\n\
Sorry, I couldn't find any host named nowhere.example. (#5.1.2)\r\n\r\n\
<who@example.net>:\r\n\
192.0.2.9 does not like recipient.\r\n\
Remote host said: 550 5.1.1 <who@example.net>... No such user\r\n\
Giving up on 192.0.2.9.\r\n\r\n\
--- Below this line is a copy of the message.\r\n\r\n\
From: app@example.com\r\nTo: who@example.net\r\n\r\nhi\r\n";
    let records = parse(raw.as_bytes());
    assert_eq!(records.len(), 2, "{records:#?}");
    assert_eq!(records[0].recipient, "nohost@nowhere.example");
    assert_eq!(records[0].reason, BounceReason::HostUnknown);
    assert_eq!(records[1].recipient, "who@example.net");
    assert_eq!(records[1].smtp_command.as_deref(), Some("RCPT"));
    assert_eq!(records[1].reason, BounceReason::UserUnknown);
}

#[test]
fn exchange_style_bounce() {
    let raw = "From: postmaster@corp.example\r\nTo: app@example.com\r\n\
Subject: Undeliverable: hello\r\n\r\n\
Your message did not reach some or all of the intended recipients.\r\n\r\n\
      Subject:  hello\r\n\r\n\
The following recipient(s) cannot be reached:\r\n\r\n\
      nobody@corp.example on 6/2/2025 10:00 AM\r\n\
            The e-mail account does not exist at the organization this message was sent to.\r\n\
            <mx.corp.example #5.1.1 smtp;550 5.1.1 RESOLVER.ADR.RecipNotFound; not found>\r\n";
    let r = one(raw);
    assert_eq!(r.recipient, "nobody@corp.example");
    assert_eq!(r.status.as_deref(), Some("5.1.1"));
    assert_eq!(r.reason, BounceReason::UserUnknown);
}

#[test]
fn amazon_ses_bounce_notification() {
    let inner = serde_json::json!({
        "notificationType": "Bounce",
        "bounce": {"bounceType": "Permanent", "reportingMTA": "dns; a1.example",
            "bouncedRecipients": [{"emailAddress": "x@example.net", "action": "failed",
                "status": "5.1.1", "diagnosticCode": "smtp; 550 5.1.1 user unknown"}]},
        "mail": {"messageId": "0100-abc", "source": "app@example.com"}
    });
    let sns = serde_json::json!({"Type": "Notification", "Message": inner.to_string()});
    let raw =
        format!("From: no-reply@sns.example\r\nSubject: AWS Notification Message\r\n\r\n{sns}\r\n");
    let r = one(&raw);
    assert_eq!(r.recipient, "x@example.net");
    assert_eq!(r.reason, BounceReason::UserUnknown);
    assert_eq!(r.bounce_type, BounceType::Hard);
    assert_eq!(r.message_id.as_deref(), Some("0100-abc"));
    assert_eq!(r.original_sender.as_deref(), Some("app@example.com"));
}

#[test]
fn a_forwarded_bounce_is_read_from_the_returned_message() {
    let inner = dsn_two_recipients();
    let raw = format!(
        "From: helpdesk@example.org\r\nTo: app@example.com\r\nSubject: Fwd: returned mail\r\n\
MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"W\"\r\n\r\n\
--W\r\nContent-Type: text/plain\r\n\r\nSee below.\r\n\
--W\r\nContent-Type: message/rfc822\r\n\r\n{inner}\r\n--W--\r\n"
    );
    let records = parse(raw.as_bytes());
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].recipient, "alice@example.net");
}

#[test]
fn encoded_words_and_charsets_are_decoded() {
    let raw = "From: =?ISO-8859-1?Q?Syst=E8me_de_messagerie?= <MAILER-DAEMON@mx.example.fr>\r\n\
Subject: =?UTF-8?B?Tm9uIHJlbWlz?=\r\nTo: app@example.com\r\n\
Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n\
Le message n'a pas pu =EAtre remis =E0 <absent@example.fr>:\r\n\
550 5.1.1 Utilisateur inconnu ! (user unknown)\r\n";
    let r = one(raw);
    assert_eq!(r.recipient, "absent@example.fr");
    assert!(
        r.diagnostic
            .as_deref()
            .is_some_and(|d| d.contains("être remis à"))
    );
    assert_eq!(r.reason, BounceReason::UserUnknown);
}

#[test]
fn non_bounces_and_garbage_give_no_record() {
    let inputs: Vec<Vec<u8>> = vec![
        b"From: friend@example.net\r\nTo: app@example.com\r\nSubject: lunch?\r\n\r\nSee you at 12, bob@example.org says hi.\r\n".to_vec(),
        b"From: news@example.net\r\nSubject: Newsletter\r\nContent-Type: text/html\r\n\r\n<p>Hello</p>\r\n".to_vec(),
        Vec::new(),
        b"\x00\x01\x02\xff\xfe garbage".to_vec(),
        b"no headers at all, just text with user unknown 550 5.1.1 a@b.example".to_vec(),
        b"Content-Type: multipart/report; boundary=\"x\"\r\n\r\n--x\r\nContent-Type: message/delivery-status\r\n\r\n--x--".to_vec(),
        "From: MAILER-DAEMON@x.example\r\nSubject: Undelivered\r\n\r\n\u{fffd}\u{fffd}".as_bytes().to_vec(),
    ];
    for raw in inputs {
        assert!(
            parse(&raw).is_empty(),
            "{:?}",
            String::from_utf8_lossy(&raw)
        );
    }
}

#[test]
fn a_bounce_like_subject_alone_gives_no_record() {
    let inputs = [
        // A person's reply, copying someone in.
        "From: Ann <ann@home.example>\r\nTo: app@example.com\r\nSubject: Re: undelivered parcel\r\n\
In-Reply-To: <p1@example.com>\r\n\r\nI also cc'd carl@home.example about it.\r\n",
        // A person's question, without a reply prefix.
        "From: Ann <ann@home.example>\r\nTo: app@example.com\r\nSubject: Undelivered invitation?\r\n\r\n\
My invitation to carl@home.example came back, it said his mailbox is full.\r\n",
        // A newsletter about bounces, quoting an SMTP reply as an example.
        "From: Tips <tips@news.example>\r\nTo: app@example.com\r\n\
Subject: why some emails end up undelivered\r\nPrecedence: bulk\r\n\
List-Unsubscribe: <https://news.example/u/1>\r\n\r\n\
A 550 5.1.1 user unknown error happens when you mistype an address like jon@exmaple.com.\r\n",
    ];
    for raw in inputs {
        assert!(parse(raw.as_bytes()).is_empty(), "{raw}");
    }
    // The same Subject with a failure the notice itself reports is still a bounce.
    let r = one(
        "From: Notices <notices@relay.example>\r\nTo: app@example.com\r\n\
Subject: Undelivered invitation\r\n\r\n<carl@home.example>: host mx.home.example said: \
550 5.1.1 User unknown (in reply to RCPT TO command)\r\n",
    );
    assert_eq!(r.recipient, "carl@home.example");
    assert_eq!(r.reason, BounceReason::UserUnknown);
}

#[test]
fn an_out_of_office_reply_quoting_a_bounce_is_an_auto_reply() {
    let raw = "From: Kate <kate@customer.example>\r\nTo: app@example.com\r\n\
Subject: Out of Office: Re: your message\r\nAuto-Submitted: auto-replied\r\n\r\n\
I'm away until Monday.\r\n\r\n\
> From: MAILER-DAEMON@mx.customer.example (Mail Delivery System)\r\n\
> To: app@example.com\r\n\
> Subject: Undelivered Mail Returned to Sender\r\n\
> Date: Mon, 2 Jun 2025 10:00:00 +0000\r\n\
>\r\n\
> This is the mail system at host mx.customer.example.\r\n\
> I'm sorry to have to inform you that your message could not\r\n\
> be delivered to one or more recipients.\r\n\
>\r\n\
> <someone@else.example>: host mx.else.example[192.0.2.9] said: 550 5.1.1\r\n\
>     <someone@else.example>: Recipient address rejected: User unknown (in reply to\r\n\
>     RCPT TO command)\r\n\
>\r\n\
> Final-Recipient: rfc822; someone@else.example\r\n\
> Action: failed\r\n\
> Status: 5.1.1\r\n";
    for raw in [
        raw.to_string(),
        // Unquoted, and as the first header block of the text.
        raw.replace("> ", "").replace(">\r\n", "\r\n"),
    ] {
        let r = one(&raw);
        assert_eq!(r.kind, BounceKind::Autoreply, "{raw}");
        assert_eq!(r.recipient, "kate@customer.example");
        assert_eq!(r.reason, BounceReason::Vacation);
        assert_eq!(r.bounce_type, BounceType::Autoreply);
    }
}

/// A DSN for one recipient with this Diagnostic-Code and Status.
fn dsn_with(status: &str, diagnostic_code: &str) -> String {
    format!(
        "From: Mail Delivery System <MAILER-DAEMON@mx.example.org>\r\n\
To: app@example.com\r\nSubject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\r\n\
--B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n\r\n\
--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.org\r\n\r\n\
Final-Recipient: rfc822; dan@example.net\r\nAction: failed\r\nStatus: {status}\r\n\
Diagnostic-Code: {diagnostic_code}\r\n\r\n--B--\r\n"
    )
}

#[test]
fn a_dns_blocklist_rejection_is_blocked_even_with_its_lookup_url() {
    for diagnostic in [
        "smtp; 554 5.7.1 Service unavailable; Client host [198.51.100.7] blocked using \
zen.spamhaus.org; https://www.spamhaus.org/query/ip/198.51.100.7",
        "smtp; 550 5.7.1 Rejected: 198.51.100.7 listed at zen.spamhaus.org, see \
https://www.spamhaus.org/query/ip/198.51.100.7",
    ] {
        let r = one(&dsn_with("5.7.1", diagnostic));
        assert_eq!(r.reason, BounceReason::Blocked, "{diagnostic}");
    }
}

#[test]
fn amazon_ses_suppression_list_bounces_are_suppressed() {
    for (sub_type, diagnostic) in [
        (
            "OnAccountSuppressionList",
            "Amazon SES did not send the message to this address because it is on the \
suppression list for your account.",
        ),
        (
            "Suppressed",
            "Amazon SES has suppressed sending to this address because it has a recent history \
of bouncing as an invalid address.",
        ),
    ] {
        let n = serde_json::json!({
            "notificationType": "Bounce",
            "bounce": {"bounceType": "Permanent", "bounceSubType": sub_type,
                "bouncedRecipients": [{"emailAddress": "eve@example.net", "action": "failed",
                    "status": "5.1.1", "diagnosticCode": diagnostic}]},
            "mail": {"messageId": "0100-def", "source": "app@example.com"}
        });
        let raw = format!("From: no-reply@sns.example\r\nSubject: AWS Notification\r\n\r\n{n}\r\n");
        let r = one(&raw);
        assert_eq!(r.recipient, "eve@example.net");
        assert_eq!(r.reason, BounceReason::Suppressed, "{sub_type}");
    }
}

#[test]
fn exchange_and_qmail_prose_give_their_reply_code_and_command() {
    let exchange = one(
        "From: postmaster@corp.example\r\nTo: app@example.com\r\nSubject: Undeliverable: hi\r\n\r\n\
Your message did not reach some or all of the intended recipients.\r\n\r\n\
      nobody@corp.example on 2/6/2025 10:00 AM\r\n\
            <mail.corp.example #5.1.1 smtp;550 5.1.1 RESOLVER.ADR.RecipNotFound; not found>\r\n",
    );
    assert_eq!(exchange.recipient, "nobody@corp.example");
    assert_eq!(exchange.reply_code, Some(550));
    assert_eq!(exchange.status.as_deref(), Some("5.1.1"));
    assert_eq!(exchange.reason, BounceReason::UserUnknown);
    let qmail = one(
        "From: MAILER-DAEMON@mx.example.org\r\nTo: app@example.com\r\nSubject: failure notice\r\n\r\n\
Hi. This is the qmail-send program at mx.example.org.\r\n\
I'm afraid I wasn't able to deliver your message to the following addresses.\r\n\
This is a permanent error; I've given up. Sorry it didn't work out.\r\n\r\n\
<full@example.net>:\r\n192.0.2.5 failed after I sent the message.\r\n\
Remote host said: 552 5.2.2 Mailbox full\r\n",
    );
    assert_eq!(qmail.recipient, "full@example.net");
    assert_eq!(qmail.reply_code, Some(552));
    assert_eq!(qmail.smtp_command.as_deref(), Some("DATA"));
    assert_eq!(qmail.reason, BounceReason::MailboxFull);
}

#[test]
fn hostile_input_does_not_panic() {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let base = dsn_two_recipients().into_bytes();
    for _ in 0..300 {
        let mut raw = base.clone();
        for _ in 0..20 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = raw.len().max(1);
            let i = (seed as usize) % len;
            match seed % 3 {
                0 => {
                    if let Some(b) = raw.get_mut(i) {
                        *b = (seed >> 8) as u8;
                    }
                }
                1 => raw.truncate(i),
                _ => raw.insert(i.min(raw.len()), b'\n'),
            }
        }
        let _ = parse(&raw);
    }
}

#[test]
fn user_rules_change_the_verdict() {
    let raw = "From: MAILER-DAEMON@mx.example.org\r\nSubject: Undelivered Mail\r\n\r\n\
<x@example.net>: host mx.example.net said: 550 Frobnicated by policy 42\r\n";
    assert_eq!(one(raw).reason, BounceReason::OnHold);
    let c = Classifier::with_user_rules(
        "[[rule]]\nreason = \"policyviolation\"\npatterns = ['frobnicated by policy']\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let records = parse_with(raw.as_bytes(), &c);
    assert_eq!(
        records.first().map(|r| r.reason),
        Some(BounceReason::PolicyViolation)
    );
}

#[test]
fn the_returned_body_is_skipped_but_its_headers_are_read() {
    let dsn = dsn_two_recipients().replace(
        "Content-Type: text/rfc822-headers\r\n",
        "Content-Type: message/rfc822\r\n",
    );
    let body = "x".repeat(200_000);
    let raw = dsn.replace(
        "Subject: hello\r\n\r\n",
        &format!("Subject: hello\r\n\r\n{body}\r\n"),
    );
    let short = message::without_returned_body(raw.as_bytes()).expect("cut");
    assert!(
        short.report.len() < 4_000,
        "cut before the returned message"
    );
    assert!(
        String::from_utf8_lossy(short.report).ends_with("Content-Type: message/rfc822\r\n\r\n")
    );
    let headers = String::from_utf8_lossy(short.returned_headers);
    assert!(headers.ends_with("Subject: hello\r\n\r\n"), "{headers}");
    assert!(
        headers.contains("Message-ID: <m1@example.com>"),
        "{headers}"
    );
    let records = parse(raw.as_bytes());
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].message_id.as_deref(), Some("<m1@example.com>"));
    assert_eq!(records[0].receipt, Some(receipt()));
    // A returned message before the report is not cut.
    let odd = "Content-Type: message/rfc822\r\n\r\nFrom: a@b.example\r\n\r\nbody\r\n\
Content-Type: message/delivery-status\r\n";
    assert!(message::without_returned_body(odd.as_bytes()).is_none());
    // Any case and spacing of the field; the type named anywhere else is not the part.
    let shouting = raw.replace(
        "Content-Type: message/rfc822",
        "CONTENT-TYPE:\tMessage/RFC822",
    );
    assert_eq!(
        message::without_returned_body(shouting.as_bytes()).map(|s| s.returned_headers),
        Some(short.returned_headers)
    );
    let mentioned = raw.replace("Content-Type: message/rfc822", "X-Note: see message/rfc822");
    assert!(message::without_returned_body(mentioned.as_bytes()).is_none());
}

/// Bounces with tens of thousands of recipients, or of sender lines, give at most
/// `MAX_PROSE_RECIPIENTS` records, and the work per address is bounded by that and by
/// `MAX_NOT_RECIPIENTS` (the speed itself is bench/ material: tests never fail on timing).
#[test]
fn huge_hostile_bounces_are_bounded() {
    let mut prose =
        String::from("From: MAILER-DAEMON@mx.example.org\r\nSubject: Undelivered Mail\r\n\r\n");
    for i in 0..50_000 {
        prose.push_str(&format!(
            "<u{i}@example.net>: 550 5.1.1 unknown <u{i}@example.net>\r\n"
        ));
    }
    // Every address in a sender context but the last: none of them is a recipient.
    let mut senders =
        String::from("From: MAILER-DAEMON@mx.example.org\r\nSubject: Undelivered Mail\r\n\r\n");
    for i in 0..50_000 {
        senders.push_str(&format!("MAIL FROM:<s{i}@example.org>\r\n"));
    }
    senders.push_str("<gone@example.net>: 550 5.1.1 unknown user\r\n");
    let mut dsn = String::from(
        "From: MAILER-DAEMON@mx.example.org\r\nSubject: Undelivered\r\n\
Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\r\n\
--B\r\nContent-Type: message/delivery-status\r\n\r\n",
    );
    for i in 0..50_000 {
        dsn.push_str(&format!("Final-Recipient: rfc822; u{i}@example.net\r\nAction: failed\r\nStatus: 5.1.1\r\nX-Junk-{i}: x\r\n"));
    }
    dsn.push_str("--B--\r\n");
    for raw in [&prose, &dsn] {
        let records = parse(raw.as_bytes());
        assert!(
            !records.is_empty() && records.len() <= 1000,
            "{}",
            records.len()
        );
    }
    let records = parse(senders.as_bytes());
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0].recipient, "gone@example.net");
}

#[test]
fn a_bare_550_unknown_user_in_prose_reads_as_a_filter_but_at_rcpt_as_unknown() {
    let prose = |line: &str| {
        format!(
            "From: MAILER-DAEMON@gw.example.org\r\nTo: app@example.com\r\n\
             Subject: Undeliverable mail\r\n\r\n\
             Your message could not be delivered to the following recipient:\r\n\r\n\
             <bob@example.net>: {line}\r\n"
        )
    };
    let r = one(&prose("550 Unknown user bob@example.net"));
    assert_eq!(r.recipient, "bob@example.net");
    assert_eq!(
        (r.reason, r.bounce_type),
        (BounceReason::Filtered, BounceType::Soft)
    );
    let r = one(&prose(
        "host mx.example.net said: 550 Unknown user bob@example.net (in reply to RCPT TO command)",
    ));
    assert_eq!(
        (r.reason, r.bounce_type),
        (BounceReason::UserUnknown, BounceType::Hard)
    );
}

#[test]
fn a_persons_mail_about_a_failed_delivery_is_no_bounce() {
    // Failure wording in Subject and text, from a customer: no SMTP reply, nothing returned.
    let customer = "From: Anna Berg <anna.berg@customer.example>\r\nTo: billing@vendor.example\r\n\
        Subject: Undelivered invoices for March\r\n\r\n\
        We never received the invoice at billing@customer.example. Delivery failed \
        according to your portal.\r\n";
    assert!(parse(customer.as_bytes()).is_empty());
    // A newsletter marked bulk, explaining bounces with an example.
    let newsletter = "From: Deliverability Weekly <news@esp.example>\r\nPrecedence: bulk\r\n\
        Subject: Returned mail: what it means\r\n\r\n\
        A typical hard bounce reads: 550 5.1.1 <someone@example.com>: User unknown\r\n";
    assert!(parse(newsletter.as_bytes()).is_empty());
    // An invitation whose UID looks like an address.
    let invitation = "From: Team <team@company.example>\r\n\
        Subject: Invitation: Mail delivery failures review\r\nContent-Type: text/calendar\r\n\r\n\
        BEGIN:VCALENDAR\r\nBEGIN:VEVENT\r\nUID:abc123@company.example\r\n\
        DESCRIPTION:Review of 550 5.1.1 user unknown bounces\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n";
    assert!(
        parse(invitation.as_bytes()).is_empty(),
        "{:?}",
        parse(invitation.as_bytes())
    );
}

#[test]
fn provider_wordings_of_reputation_blocks_and_spam() {
    let dsn = |diag: &str| {
        format!(
            "From: MAILER-DAEMON@relay.example\r\nSubject: Undelivered Mail Returned to Sender\r\n\
             MIME-Version: 1.0\r\n\
             Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\r\n\
             --B\r\nContent-Type: message/delivery-status\r\n\r\n\
             Reporting-MTA: dns; relay.example\r\n\r\n\
             Final-Recipient: rfc822; x@dest.example\r\nAction: failed\u{fffd}\r\n\
             Status: 5.0.0\r\nDiagnostic-Code: smtp; {diag}\r\n\r\n--B--\r\n"
        )
    };
    for (diag, reason) in [
        (
            "554 IP=192.0.2.5 - Message rejected due to IP reputation",
            BounceReason::BadReputation,
        ),
        (
            "550 5.7.708 Service unavailable. Access denied, traffic not accepted from this IP.",
            BounceReason::Blocked,
        ),
        (
            "550 Message rejected under suspicion of SPAM",
            BounceReason::SpamDetected,
        ),
    ] {
        let r = one(&dsn(diag));
        assert_eq!(r.reason, reason, "{diag}");
        // A stray byte after the action word is no part of it.
        assert_eq!(r.action.as_deref(), Some("failed"));
    }
}

#[test]
fn a_success_code_in_a_transcript_is_no_failure_status() {
    let r = one(
        "From: MAILER-DAEMON@mx.example.net\r\nTo: app@example.com\r\n\
         Subject: Returned mail: see transcript for details\r\n\r\n\
         bob@remote.example: delivery failed\r\n\
         ----- Transcript of session follows -----\r\n\
         >>> MAIL From:<app@example.com>\r\n\
         <<< 250 2.1.0 Sender ok\r\n\
         >>> RCPT To:<bob@remote.example>\r\n\
         <<< 550 User unknown\r\n",
    );
    assert_eq!(r.recipient, "bob@remote.example");
    assert_eq!(r.reply_code, Some(550));
    assert_ne!(r.status.as_deref(), Some("2.1.0"));
}

#[test]
fn a_sender_refusal_reported_at_rcpt_is_about_the_sender() {
    let reply = "550 5.1.0 <app@snd.example>: Sender address rejected: User unknown in local recipient table";
    let (reason, _) = crate::bounce::classify_reply(550, Some("5.1.0"), reply, Some("RCPT"));
    assert_eq!(reason, BounceReason::Rejected);
}

#[test]
fn a_negated_your_message_was_is_the_failure_not_the_returned_message() {
    // Exchange's "Your message wasn't delivered" opens the error section, not the copy.
    let r = one(
        "From: Microsoft Outlook <MicrosoftExchange@corp.example>\r\nTo: app@example.com\r\n\
         Subject: Undeliverable: invoice\r\n\r\n\
         Your message wasn't delivered to bob@corp.example because the address couldn't be found.\r\n\r\n\
         Diagnostic information for administrators:\r\n\r\n\
         Remote Server returned '550 5.1.1 RESOLVER.ADR.RecipNotFound; not found'\r\n",
    );
    assert_eq!(r.recipient, "bob@corp.example");
    assert_eq!(r.status.as_deref(), Some("5.1.1"));
    assert_eq!(r.reason, BounceReason::UserUnknown);
}
