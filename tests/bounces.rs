//! Bounces end to end (issue: parse DSNs, feedback reports and auto-replies into classified
//! bounce records; suppression list): mail is relayed with VERP senders to a scripted MX, then
//! bounces for it arrive over SMTP at the bounce domain, and the mail log, the bounce list and
//! the suppression list show what they mean.

mod common;

use std::time::Duration;

use common::mailtrail::{Mailtrail, RawSmtp, hash_password, page_dom, wait_until};
use common::test_mx::{Script, TestMx};

const BOUNCE_DOMAIN: &str = "bounce.mt.test";

/// A relay whose loopback clients are NOT relay clients: the app authenticates, bounces come
/// in without AUTH like from any Internet MTA.
fn start_relay(mx_port: u16) -> Mailtrail {
    let smtp = format!(
        "relay_networks = [\"192.0.2.0/24\"]\n[[smtp.users]]\nname = \"app\"\npassword_hash = \"{}\"\n",
        hash_password("app-pass")
    );
    let tables = format!(
        "[delivery]\nbounce_domain = \"{BOUNCE_DOMAIN}\"\nretry_first = \"1s\"\n\
         [checks]\ndomain_check = false\n\
         [suppression]\nsoft_bounce_threshold = 3\n\
         [[route]]\ndomains = [\"*\"]\nmx = [\"127.0.0.1:{mx_port}\"]\ntls = \"none\"\n"
    );
    Mailtrail::start_with("", &smtp, &tables)
}

fn submit(m: &Mailtrail, to: &[&str], subject: &str) -> String {
    m.submit(Some(("app", "app-pass")), "app@example.com", to, subject)
}

/// The newest message's entry for `address`.
fn status_of(m: &Mailtrail, address: &str) -> serde_json::Value {
    m.recipient(address, address)
}

/// Sends `message` to `rcpt` from a non-relay client with the null sender, as a remote MTA
/// returns a bounce; returns the RCPT reply and, if accepted, the DATA reply.
fn send_bounce(m: &Mailtrail, rcpt: &str, message: &str) -> (String, String) {
    let mut c = RawSmtp::connect(m.smtp);
    assert!(c.cmd("EHLO mx.remote.test").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<>").starts_with("250"));
    let rcpt_reply = c.cmd(&format!("RCPT TO:<{rcpt}>"));
    if !rcpt_reply.starts_with("250") {
        return (rcpt_reply, String::new());
    }
    assert!(c.cmd("DATA").starts_with("354"));
    let data_reply = c.cmd(&format!("{}\r\n.", message.replace('\n', "\r\n")));
    let _ = c.cmd("QUIT");
    (rcpt_reply, data_reply)
}

fn dsn_for(rcpt: &str, receipt: &str) -> String {
    format!(
        "From: MAILER-DAEMON@mx.remote.test\n\
         To: bounces@{BOUNCE_DOMAIN}\n\
         Message-ID: <dsn.{rcpt}.{receipt}@mx.remote.test>\n\
         Subject: Undelivered Mail Returned to Sender\n\
         Auto-Submitted: auto-replied\n\
         MIME-Version: 1.0\n\
         Content-Type: multipart/report; report-type=delivery-status; boundary=\"b1\"\n\
         \n\
         --b1\n\
         Content-Type: text/plain\n\
         \n\
         I'm sorry to have to inform you that your message could not be delivered.\n\
         \n\
         --b1\n\
         Content-Type: message/delivery-status\n\
         \n\
         Reporting-MTA: dns; mx.remote.test\n\
         \n\
         Final-Recipient: rfc822; {rcpt}\n\
         Original-Recipient: rfc822;{rcpt}\n\
         Action: failed\n\
         Status: 5.1.1\n\
         Remote-MTA: dns; mailstore.remote.test\n\
         Diagnostic-Code: smtp; 550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown in virtual mailbox table\n\
         \n\
         --b1\n\
         Content-Type: text/rfc822-headers\n\
         \n\
         Received: from app.test by mt.test (mailtrail) with ESMTPA id {receipt}; Mon, 23 Nov 2026 10:00:00 +0000\n\
         From: app@example.com\n\
         To: {rcpt}\n\
         Subject: hello\n\
         \n\
         --b1--\n"
    )
}

/// A remote MTA's delay notice for `rcpt`: still trying, nothing failed (4.4.1 reads
/// `expired`, soft).
fn delay_dsn_for(rcpt: &str, receipt: &str) -> String {
    dsn_for(rcpt, receipt)
        .replace("Message-ID: <dsn.", "Message-ID: <delay.")
        .replace("Action: failed", "Action: delayed")
        .replace("Status: 5.1.1", "Status: 4.4.1")
        .replace(
            &format!(
                "Diagnostic-Code: smtp; 550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown in virtual mailbox table"
            ),
            "Diagnostic-Code: X-Postfix; connect to mailstore.remote.test[192.0.2.9]:25: Connection timed out",
        )
}

fn arf_for(rcpt: &str) -> String {
    format!(
        "From: feedback@isp.remote.test\n\
         To: fbl@{BOUNCE_DOMAIN}\n\
         Subject: Abuse report\n\
         MIME-Version: 1.0\n\
         Content-Type: multipart/report; report-type=feedback-report; boundary=\"f1\"\n\
         \n\
         --f1\n\
         Content-Type: text/plain\n\
         \n\
         This is an email abuse report.\n\
         \n\
         --f1\n\
         Content-Type: message/feedback-report\n\
         \n\
         Feedback-Type: abuse\n\
         User-Agent: ExampleFBL/1.0\n\
         Version: 1\n\
         Original-Rcpt-To: {rcpt}\n\
         \n\
         --f1\n\
         Content-Type: message/rfc822\n\
         \n\
         From: app@example.com\n\
         To: {rcpt}\n\
         Subject: newsletter\n\
         Message-ID: <newsletter@app.example.com>\n\
         \n\
         Buy now.\n\
         --f1--\n"
    )
}

fn autoreply_from(rcpt: &str) -> String {
    format!(
        "From: {rcpt}\n\
         To: bounces@{BOUNCE_DOMAIN}\n\
         Subject: Out of office: invoice\n\
         Auto-Submitted: auto-replied\n\
         X-Autoreply: yes\n\
         \n\
         I am out of the office until Monday and will read your message when I return.\n"
    )
}

fn verp_sender_for(mx: &TestMx, rcpt: &str) -> String {
    let txs = mx.transactions();
    let tx = txs
        .iter()
        .rev()
        .find(|t| t.rcpt_to.iter().any(|r| r.contains(rcpt)))
        .unwrap_or_else(|| panic!("the MX saw no transaction for {rcpt}"));
    let from = tx.mail_from.trim_start_matches('<');
    from.split('>').next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bounces_complaints_and_autoreplies_become_records_and_suppress() {
    let mx = TestMx::start(Script::default()).await;
    let m = start_relay(mx.port());
    let bob = "bob@dest.test";
    let carol = "carol@dest.test";
    let erin = "erin@dest.test";
    let receipt = submit(&m, &[bob, carol, erin], "invoice");
    for a in [bob, carol, erin] {
        wait_until(&format!("{a} delivered"), Duration::from_secs(30), || {
            status_of(&m, a)["status"] == "delivered"
        });
    }
    // Each recipient went out with its own VERP sender at the bounce domain.
    let bob_verp = verp_sender_for(&mx, bob);
    let carol_verp = verp_sender_for(&mx, carol);
    let erin_verp = verp_sender_for(&mx, erin);
    assert!(
        bob_verp
            .to_ascii_lowercase()
            .starts_with(&format!("bounces+{}-0-", receipt.to_ascii_lowercase())),
        "{bob_verp}"
    );
    assert!(
        bob_verp.ends_with(&format!("@{BOUNCE_DOMAIN}")),
        "{bob_verp}"
    );
    assert_ne!(bob_verp, carol_verp);

    // A forged bounce (wrong MAC) is refused at RCPT.
    let forged = format!("bounces+{receipt}-0-aaaaaaaa@{BOUNCE_DOMAIN}");
    let (rcpt_reply, _) = send_bounce(&m, &forged, &dsn_for(bob, &receipt));
    assert!(rcpt_reply.starts_with("550 5.1.1"), "{rcpt_reply}");
    // Anything else at the bounce domain is unknown too; relaying stays closed.
    let (r, _) = send_bounce(&m, &format!("someone@{BOUNCE_DOMAIN}"), "x");
    assert!(r.starts_with("550 5.1.1"), "{r}");
    let (r, _) = send_bounce(&m, "victim@elsewhere.test", "x");
    assert!(r.starts_with("554 5.7.1"), "{r}");

    // A DSN for bob, from a client that may not relay, to bob's VERP address.
    let (r, d) = send_bounce(&m, &bob_verp, &dsn_for(bob, &receipt));
    assert!(
        r.starts_with("250") && d.starts_with("250 2.0.0"),
        "{r} {d}"
    );
    wait_until("bob bounced", Duration::from_secs(20), || {
        status_of(&m, bob)["status"] == "bounced"
    });
    let bob_status = status_of(&m, bob);
    assert_eq!(bob_status["reason"], "userunknown", "{bob_status}");
    assert_eq!(bob_status["bounce_type"], "hard", "{bob_status}");
    let check = m.cli(&["suppress", "check", bob]);
    assert!(check.status.success(), "{check:?}");
    assert!(String::from_utf8_lossy(&check.stdout).contains("userunknown"));

    // An ARF complaint for carol.
    let (r, d) = send_bounce(&m, &carol_verp, &arf_for(carol));
    assert!(r.starts_with("250") && d.starts_with("250"), "{r} {d}");
    wait_until("carol complained", Duration::from_secs(20), || {
        status_of(&m, carol)["status"] == "complained"
    });
    assert!(m.cli(&["suppress", "check", carol]).status.success());

    // An auto-reply from erin: recorded, erin stays delivered, nothing suppressed.
    let (r, d) = send_bounce(&m, &erin_verp, &autoreply_from(erin));
    assert!(r.starts_with("250") && d.starts_with("250"), "{r} {d}");
    wait_until(
        "erin's auto-reply recorded",
        Duration::from_secs(20),
        || {
            m.cli_ok(&["bounces", "--address", erin, "--json"])
                .contains("autoreply")
        },
    );
    assert_eq!(status_of(&m, erin)["status"], "delivered");
    assert_eq!(m.cli(&["suppress", "check", erin]).status.code(), Some(1));
    // A check that cannot tell is no "not suppressed".
    let bad = m.cli(&["suppress", "check", "erin@-ok.test"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");

    // The unhandled list has all three; handling one removes it from that list.
    let unhandled: Vec<serde_json::Value> = m
        .cli_ok(&["bounces", "--unhandled", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(unhandled.len(), 3, "{unhandled:?}");
    let bob_bounce = unhandled
        .iter()
        .find(|b| b["recipient"] == bob)
        .expect("bob's bounce");
    assert_eq!(bob_bounce["receipt"], receipt.as_str());
    assert_eq!(bob_bounce["correlation"], "verp");
    assert_eq!(bob_bounce["status"], "5.1.1");
    let id = bob_bounce["id"].to_string();
    // A name that would drive the terminal of every admin listing the bounces is refused.
    let evil = m.cli(&["bounces", "handle", &id, "--by", "evil\u{1b}[2J"]);
    assert!(!evil.status.success());
    let err = String::from_utf8_lossy(&evil.stderr);
    assert!(
        err.contains("without control characters") && !err.contains('\u{1b}'),
        "{err}"
    );
    let none = m.cli_ok(&["log", "\u{1b}[7mINV@x.test"]);
    assert!(!none.contains('\u{1b}'), "{none}");
    m.cli_ok(&["bounces", "handle", &id, "--by", "alice"]);
    // A second handler is told, and alice stays the one who handled it.
    let again = m.cli_ok(&["bounces", "handle", &id, "--by", "bob"]);
    assert!(again.contains("handled already, by alice"), "{again}");
    let after = m.cli_ok(&["bounces", "--unhandled", "--json"]);
    assert_eq!(after.lines().count(), 2, "{after}");
    let text = m.cli_ok(&["bounces", "--address", bob, "--first"]);
    assert!(
        text.contains("alice") && text.contains("userunknown"),
        "{text}"
    );

    // The next message to bob is accepted but not relayed: recorded as suppressed.
    let seen_before = mx.transactions().len();
    let second = submit(&m, &[bob], "reminder");
    wait_until("bob suppressed", Duration::from_secs(10), || {
        let msgs = m.log_json(&second);
        msgs.first()
            .is_some_and(|msg| msg["recipients"][0]["status"] == "suppressed")
    });
    // What reaches the MX now is the sender's failure DSN about bob (he heard 250), not bob's
    // copy.
    wait_until("the DSN about bob", Duration::from_secs(10), || {
        mx.transactions().len() > seen_before
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = mx.transactions();
    let later = after.get(seen_before..).unwrap_or_default();
    assert_eq!(later.len(), 1, "bob was relayed anyway");
    assert!(
        later[0].mail_from.starts_with("<>"),
        "{}",
        later[0].mail_from
    );
    assert!(
        later[0].rcpt_to[0].contains("app@example.com"),
        "{:?}",
        later[0].rcpt_to
    );
    let dsn = String::from_utf8_lossy(&later[0].body);
    assert!(
        dsn.contains(&format!("Final-Recipient: rfc822; {bob}")) && dsn.contains("Status: 5.7.1"),
        "{dsn}"
    );
    // ... and bob's record says so, naming the DSN, which the log finds by that receipt.
    let msgs = m.log_json(&second);
    let events = msgs[0]["recipients"][0]["events"].as_array().unwrap();
    let sent = events
        .iter()
        .find(|e| e["kind"] == "dsn_sent")
        .unwrap_or_else(|| panic!("no dsn_sent event: {events:?}"));
    assert_eq!(sent["dsn_action"], "failed");
    assert_eq!(sent["status"], "suppressed");
    let dsn_receipt = sent["dsn_receipt"].as_str().unwrap();
    let dsn_log = m.log_json(dsn_receipt);
    assert_eq!(dsn_log[0]["envelope_sender"], "", "{dsn_log:?}");
    let text = m.cli_ok(&["log", &second]);
    assert!(
        text.contains(&format!(
            "dsn_sent suppressed at local action=failed dsn={dsn_receipt}"
        )),
        "{text}"
    );
    // The page links the DSN by its receipt.
    if let Some(page) = page_dom(m.http, &format!("/?q={second}")) {
        assert!(
            page.contains(&format!("href=\"?q={dsn_receipt}\"")),
            "{page}"
        );
    }
}

#[test]
fn bounces_of_an_address_pasted_with_its_display_name_are_found() {
    let m = Mailtrail::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bob.eml"),
        dsn_for("Bob.Mixed@OK.test", "01M84TQJYPE2DRCRGB1667C64M"),
    )
    .unwrap();
    let out = m.cli_ok(&["bounce", "ingest", dir.path().to_str().unwrap()]);
    assert!(out.contains("1 bounce records stored"), "{out}");
    for pasted in [
        "Bob Mixed <Bob.Mixed@OK.test>",
        "\"Mixed, Bob\" <bob.mixed@ok.test>",
    ] {
        let found = m.cli_ok(&["bounces", "--address", pasted, "--json"]);
        assert_eq!(found.lines().count(), 1, "{pasted}: {found}");
        assert!(found.contains("userunknown"), "{found}");
    }
    let (status, body) = m.http_get("/api/bounces?address=Bob%20Mixed%20%3CBob.Mixed%40OK.test%3E");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{body}");
    // The same object `bounces --json` prints, times as text beside their *_ms.
    let cli: serde_json::Value = serde_json::from_str(
        m.cli_ok(&["bounces", "--address", "bob.mixed@ok.test", "--json"])
            .trim(),
    )
    .unwrap();
    assert_eq!(v[0], cli, "{body}");
    assert!(
        v[0]["at"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{body}"
    );
    // The suppression list takes it as pasted too.
    m.cli_ok(&[
        "suppress",
        "add",
        "Bob Mixed <Bob.Mixed@OK.test>",
        "--reason",
        "asked",
    ]);
    let check = m.cli(&["suppress", "check", "\"Mixed, Bob\" <bob.mixed@ok.test>"]);
    assert!(check.status.success(), "{check:?}");
}

#[test]
fn a_bounce_list_cut_by_its_limit_says_more_exist() {
    let m = Mailtrail::start();
    let dir = tempfile::tempdir().unwrap();
    for who in ["a", "b", "c"] {
        std::fs::write(
            dir.path().join(format!("{who}.eml")),
            dsn_for(&format!("{who}@example.org"), "01M84TQJYPE2DRCRGB1667C64M"),
        )
        .unwrap();
    }
    let out = m.cli_ok(&["bounce", "ingest", dir.path().to_str().unwrap()]);
    assert!(out.contains("3 bounce records stored"), "{out}");
    let text = m.cli_ok(&["bounces", "--limit", "2"]);
    assert_eq!(text.matches("userunknown").count(), 2, "{text}");
    assert!(
        text.ends_with(
            "\n(the newest 2 bounce records shown; more exist: --limit 4 shows more, --limit 0 all)\n"
        ),
        "{text}"
    );
    for all in ["3", "0"] {
        let text = m.cli_ok(&["bounces", "--limit", all]);
        assert_eq!(text.matches("userunknown").count(), 3, "{text}");
        assert!(!text.contains("more exist"), "--limit {all}: {text}");
    }
    let out = m.cli(&["bounces", "--limit", "2", "--json"]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    assert!(!stdout.contains("more exist"), "{stdout}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("more exist: --limit 4"), "{stderr}");
}

/// The times in `text` (words like `2026-12-08T01:09:15...`).
fn times_in(text: &str) -> Vec<&str> {
    text.split_whitespace()
        .filter(|w| w.len() > 10 && w.starts_with("20") && w.as_bytes()[10] == b'T')
        .collect()
}

/// A time as `mailtrail log` prints it: UTC, milliseconds, `Z`.
fn is_log_time(t: &str) -> bool {
    t.len() == 24
        && t.ends_with('Z')
        && t.as_bytes()[19] == b'.'
        && chrono::DateTime::parse_from_rfc3339(t).is_ok()
}

#[test]
fn bounce_and_suppression_lists_show_times_as_the_log_does() {
    let m = Mailtrail::start();
    let receipt = m.submit(None, "app@example.com", &["t@example.org"], "times");
    let log = m.cli_ok(&["log", &receipt]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("t.eml"),
        dsn_for("t@example.org", "01M84TQJYPE2DRCRGB1667C64M"),
    )
    .unwrap();
    m.cli_ok(&["bounce", "ingest", dir.path().to_str().unwrap()]);
    m.cli_ok(&["suppress", "add", "t@example.org", "--reason", "asked"]);
    let bounces = m.cli_ok(&["bounces"]);
    let suppressions = m.cli_ok(&["suppress", "list"]);
    let check = m.cli_ok(&["suppress", "check", "t@example.org"]);
    for (what, text, at_least) in [
        ("log", &log, 2),
        ("bounces", &bounces, 1),
        ("suppress list", &suppressions, 2),
        ("suppress check", &check, 2),
    ] {
        let times = times_in(text);
        assert!(times.len() >= at_least, "{what}: {text}");
        for t in times {
            assert!(is_log_time(t), "{what}: {t} in {text}");
        }
    }
    let json = m.cli_ok(&["bounces", "--json"]);
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert!(is_log_time(v["at"].as_str().unwrap()), "{json}");
    let json = m.cli_ok(&["suppress", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert!(is_log_time(v["first_at"].as_str().unwrap()), "{json}");
    assert!(is_log_time(v["last_at"].as_str().unwrap()), "{json}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bounce_ingest_correlates_by_receipt_header_and_keeps_unmatched() {
    let mx = TestMx::start(Script::default()).await;
    let m = start_relay(mx.port());
    let receipt = submit(&m, &["frank@dest.test"], "statement");
    wait_until("frank delivered", Duration::from_secs(30), || {
        status_of(&m, "frank@dest.test")["status"] == "delivered"
    });
    let dir = tempfile::tempdir().unwrap();
    // A bounce that reached the application's own mailbox: no VERP, our receipt id is in the
    // returned Received header.
    std::fs::write(
        dir.path().join("frank.eml"),
        dsn_for("frank@dest.test", &receipt),
    )
    .unwrap();
    // One about a message we never sent.
    std::fs::write(
        dir.path().join("stranger.eml"),
        dsn_for("stranger@dest.test", "01M84TQJYPE2DRCRGB1667C64M"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("not-a-bounce.eml"),
        "Subject: hi\n\nhello\n",
    )
    .unwrap();
    // One whose returned headers name no receipt we know, delivered to a VERP address: the
    // header keeps what the envelope said.
    submit(&m, &["gina@dest.test"], "reminder");
    wait_until("gina delivered", Duration::from_secs(30), || {
        status_of(&m, "gina@dest.test")["status"] == "delivered"
    });
    let gina_verp = verp_sender_for(&mx, "gina@dest.test");
    std::fs::write(
        dir.path().join("gina.eml"),
        dsn_for("gina@dest.test", "01M84TQJYPE2DRCRGB1667C64M").replacen(
            &format!("To: bounces@{BOUNCE_DOMAIN}"),
            &format!("Delivered-To: {gina_verp}"),
            1,
        ),
    )
    .unwrap();
    let out = m.cli_ok(&["bounce", "ingest", dir.path().to_str().unwrap()]);
    assert!(out.contains("3 bounce records stored"), "{out}");
    assert!(out.contains("no bounce record"), "{out}");
    assert_eq!(status_of(&m, "frank@dest.test")["status"], "bounced");
    assert_eq!(status_of(&m, "gina@dest.test")["status"], "bounced");
    // As pasted from a log, and a reason in any case.
    let gina = m.cli_ok(&[
        "bounces",
        "--address",
        "<gina@dest.test>",
        "--reason",
        "UserUnknown",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(gina.trim()).unwrap();
    assert_eq!(v["correlation"], "verp");
    // The same mailbox fed in again (a cron job, a second run) adds nothing.
    let before = m.cli_ok(&["bounces", "--json"]).lines().count();
    let again = m.cli_ok(&["bounce", "ingest", dir.path().to_str().unwrap()]);
    assert_eq!(
        again.matches("stored before: unchanged").count(),
        3,
        "{again}"
    );
    assert!(
        again.contains("0 bounce records stored, 3 stored before"),
        "{again}"
    );
    assert_eq!(m.cli_ok(&["bounces", "--json"]).lines().count(), before);
    let typo = m.cli(&["bounces", "--reason", "userunkown"]);
    assert!(!typo.status.success());
    let err = String::from_utf8_lossy(&typo.stderr);
    assert!(
        err.contains("no reason \"userunkown\"") && err.contains("userunknown"),
        "{err}"
    );
    let stranger = m.cli_ok(&["bounces", "--address", "stranger@dest.test", "--json"]);
    let v: serde_json::Value = serde_json::from_str(stranger.trim()).unwrap();
    assert_eq!(v["correlation"], "unmatched");
    assert_eq!(v["reason"], "userunknown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bounce_ingest_twice_stores_returned_mail_without_message_id_once() {
    let mx = TestMx::start(Script::default()).await;
    let m = start_relay(mx.port());
    let receipt = submit(&m, &["hana@dest.test"], "statement");
    wait_until("hana delivered", Duration::from_secs(30), || {
        status_of(&m, "hana@dest.test")["status"] == "delivered"
    });
    // Bounces whose reporting MTA gave them no Message-ID: one naming our receipt, and an
    // mbox of two about a stranger that differ only in their Date (two bounces, not one).
    let without_id = |dsn: String| -> String {
        dsn.lines()
            .filter(|l| !l.starts_with("Message-ID:"))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("hana.eml"),
        without_id(dsn_for("hana@dest.test", &receipt)),
    )
    .unwrap();
    let stranger = without_id(dsn_for("stranger@dest.test", "01M84TQJYPE2DRCRGB1667C64M"));
    let dated = |date: &str| {
        format!("From MAILER-DAEMON Mon Nov 23 10:00:00 2026\nDate: {date}\n{stranger}")
    };
    std::fs::write(
        dir.path().join("stranger.mbox"),
        dated("Mon, 23 Nov 2026 10:00:00 +0000") + &dated("Tue, 24 Nov 2026 10:00:00 +0000"),
    )
    .unwrap();

    let first = m.cli_ok(&["bounce", "ingest", dir.path().to_str().unwrap()]);
    assert!(first.contains("3 bounce records stored"), "{first}");
    assert_eq!(status_of(&m, "hana@dest.test")["status"], "bounced");
    let stored = m.cli_ok(&["bounces", "--json"]);
    assert_eq!(stored.lines().count(), 3, "{stored}");

    // The same files again (a cron job over a mailbox): nothing new.
    let again = m.cli_ok(&["bounce", "ingest", dir.path().to_str().unwrap()]);
    assert_eq!(
        again.matches("stored before: unchanged").count(),
        3,
        "{again}"
    );
    assert!(
        again.contains("0 bounce records stored, 3 stored before"),
        "{again}"
    );
    assert_eq!(m.cli_ok(&["bounces", "--json"]), stored);

    // The same mail as a delivery agent appends it to an mbox (a From line before it, an
    // empty line after it) is the mail stored before.
    let mbox = tempfile::tempdir().unwrap();
    let appended = format!(
        "From MAILER-DAEMON Mon Nov 23 10:00:00 2026\n{}\n",
        without_id(dsn_for("hana@dest.test", &receipt))
    );
    std::fs::write(mbox.path().join("inbox"), appended).unwrap();
    let from_mbox = m.cli_ok(&["bounce", "ingest", mbox.path().to_str().unwrap()]);
    assert!(
        from_mbox.contains("0 bounce records stored, 1 stored before"),
        "{from_mbox}"
    );
    assert_eq!(m.cli_ok(&["bounces", "--json"]), stored);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delay_notice_shows_its_action_in_the_bounce_list_the_log_and_the_page() {
    let mx = TestMx::start(Script::default()).await;
    let m = start_relay(mx.port());
    let dan = "dan@dest.test";
    let receipt = submit(&m, &[dan], "invoice");
    wait_until("dan delivered", Duration::from_secs(30), || {
        status_of(&m, dan)["status"] == "delivered"
    });
    let dan_verp = verp_sender_for(&mx, dan);
    let (r, d) = send_bounce(&m, &dan_verp, &delay_dsn_for(dan, &receipt));
    assert!(r.starts_with("250") && d.starts_with("250"), "{r} {d}");
    wait_until(
        "dan's delay notice recorded",
        Duration::from_secs(20),
        || {
            !m.cli_ok(&["bounces", "--address", dan, "--json"])
                .trim()
                .is_empty()
        },
    );
    // The classification stays as it was; the recipient stays delivered.
    let v: serde_json::Value =
        serde_json::from_str(m.cli_ok(&["bounces", "--address", dan, "--json"]).trim()).unwrap();
    assert_eq!(
        (&v["action"], &v["reason"], &v["bounce_type"]),
        (&"delayed".into(), &"expired".into(), &"soft".into()),
        "{v}"
    );
    assert_eq!(status_of(&m, dan)["status"], "delivered");

    let table = m.cli_ok(&["bounces", "--address", dan]);
    let (header, row) = table.split_once('\n').unwrap();
    let column = header.find("action").expect("an action column");
    assert!(row[column..].starts_with("delayed "), "{table}");

    let log = m.cli_ok(&["log", dan]);
    assert!(
        log.contains("dsn (recipient stays delivered) at bounce mailstore.remote.test action=delayed reason=expired"),
        "{log}"
    );
    let json = m.log_json(dan);
    let events = json[0]["recipients"][0]["events"]
        .as_array()
        .unwrap()
        .clone();
    let bounce = events.iter().find(|e| e["stage"] == "bounce").unwrap();
    assert_eq!(bounce["action"], "delayed", "{bounce}");
    // Attempts are no bounces: they have no action.
    let attempt = events.iter().find(|e| e["kind"] == "attempt").unwrap();
    assert!(attempt["action"].is_null(), "{attempt}");

    if let Some(page) = page_dom(m.http, &format!("/?q={dan}")) {
        assert!(
            page.contains(
                "(recipient stays delivered) mailstore.remote.test action=delayed reason=expired"
            ),
            "{page}"
        );
    }
}

/// The `<tr>` of the page's table that names `needle`.
fn row_with<'a>(page: &'a str, needle: &str) -> &'a str {
    page.split("<tr>")
        .find(|row| row.contains(needle))
        .and_then(|row| row.split("</tr>").next())
        .unwrap_or_else(|| panic!("no row with {needle}: {page}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_pages_unhandled_bounces_tell_verified_from_unverified_with_receipt_action_and_status()
{
    let mx = TestMx::start(Script::default()).await;
    let m = start_relay(mx.port());
    let (ivy, jon) = ("ivy@dest.test", "jon@dest.test");
    let receipt = submit(&m, &[ivy, jon], "invoice");
    for a in [ivy, jon] {
        wait_until(&format!("{a} delivered"), Duration::from_secs(30), || {
            status_of(&m, a)["status"] == "delivered"
        });
    }
    // Ivy's failure to her VERP address: verified. Jon's to the plain bounce address, tied to
    // the message by its receipt id alone: unverified.
    let ivy_verp = verp_sender_for(&mx, ivy);
    let (r, d) = send_bounce(&m, &ivy_verp, &dsn_for(ivy, &receipt));
    assert!(r.starts_with("250") && d.starts_with("250"), "{r} {d}");
    let plain = format!("bounces@{BOUNCE_DOMAIN}");
    let (r, d) = send_bounce(&m, &plain, &delay_dsn_for(jon, &receipt));
    assert!(r.starts_with("250") && d.starts_with("250"), "{r} {d}");
    wait_until("both recorded", Duration::from_secs(20), || {
        m.cli_ok(&["bounces", "--unhandled", "--json"])
            .lines()
            .count()
            == 2
    });
    let (status, api) = m.http_get("/api/bounces?unhandled=1");
    assert_eq!(status, 200, "{api}");
    let api: Vec<serde_json::Value> = serde_json::from_str(&api).unwrap();
    let verified = |a: &str| api.iter().find(|b| b["recipient"] == a).unwrap()["verified"].clone();
    assert_eq!((verified(ivy), verified(jon)), (true.into(), false.into()));

    let Some(page) = page_dom(m.http, "/?unhandled=1") else {
        return;
    };
    let header = row_with(&page, "<th>id</th>");
    for column in ["action", "status", "receipt", "match"] {
        assert!(header.contains(&format!("<th>{column}</th>")), "{header}");
    }
    let ivy_row = row_with(&page, ivy);
    assert!(
        ivy_row.contains("<td>failed</td><td>5.1.1</td>")
            && ivy_row.contains(&receipt)
            && ivy_row.contains(">verified</td>"),
        "{ivy_row}"
    );
    let jon_row = row_with(&page, jon);
    assert!(
        jon_row.contains("<td>delayed</td><td>4.4.1</td>")
            && jon_row.contains(&receipt)
            && jon_row.contains(">unverified</td>"),
        "{jon_row}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_page_names_a_next_hop_off_port_25_with_its_port_as_the_log_does() {
    let mx = TestMx::start(Script::default()).await;
    let m = start_relay(mx.port());
    let kim = "kim@dest.test";
    submit(&m, &[kim], "invoice");
    wait_until("kim delivered", Duration::from_secs(30), || {
        status_of(&m, kim)["status"] == "delivered"
    });
    let json = m.log_json(kim);
    let attempt = common::mailtrail::event_of(&json[0]["recipients"][0], "attempt");
    assert_eq!(attempt["remote_port"], mx.port(), "{attempt}");
    let hop = format!(
        "{} [{}]:{}",
        attempt["remote_host"].as_str().unwrap(),
        attempt["remote_ip"].as_str().unwrap(),
        mx.port()
    );
    let log = m.cli_ok(&["log", kim]);
    assert!(
        log.contains(&format!("attempt delivered at data {hop}")),
        "{log}"
    );
    if let Some(page) = page_dom(m.http, &format!("/?q={kim}")) {
        assert!(
            page.contains(&format!("attempt delivered {hop}")),
            "{hop}: {page}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_complaint_keeps_its_feedback_type_reporter_source_ip_and_arrival_date() {
    let mx = TestMx::start(Script::default()).await;
    let m = start_relay(mx.port());
    let lee = "lee@dest.test";
    submit(&m, &[lee], "newsletter");
    wait_until("lee delivered", Duration::from_secs(30), || {
        status_of(&m, lee)["status"] == "delivered"
    });
    // No Reporting-MTA (RFC 5965 does not require one): the User-Agent names the reporter.
    let report = arf_for(lee).replace(
        "Version: 1\n",
        "Version: 1\nSource-IP: 192.0.2.7\nArrival-Date: Thu, 26 Nov 2026 14:00:00 +0000\n",
    );
    let (r, d) = send_bounce(&m, &verp_sender_for(&mx, lee), &report);
    assert!(r.starts_with("250") && d.starts_with("250"), "{r} {d}");
    wait_until("lee complained", Duration::from_secs(20), || {
        status_of(&m, lee)["status"] == "complained"
    });
    let list = m.cli_ok(&["bounces", "--address", lee, "--json"]);
    assert_eq!(list.lines().count(), 1, "{list}");
    let v: serde_json::Value = serde_json::from_str(list.trim()).unwrap();
    assert_eq!(
        (&v["reason"], &v["bounce_type"]),
        (&"feedback".into(), &"complaint".into()),
        "{v}"
    );
    assert_eq!(v["reporting_mta"], "ExampleFBL/1.0", "{v}");
    let facts = "feedback-type=abuse; user-agent=ExampleFBL/1.0; source-ip=192.0.2.7; \
                 arrival-date=Thu, 26 Nov 2026 14:00:00 +0000";
    assert_eq!(
        v["diagnostic"],
        format!("{facts}\nThis is an email abuse report."),
        "{v}"
    );
    let table = m.cli_ok(&["bounces", "--address", lee]);
    assert!(
        table.contains("feedback-type=abuse; user-agent=ExampleFBL/1.0; source-ip=192.0.2.7"),
        "{table}"
    );
    let log = m.cli_ok(&["log", lee]);
    assert!(
        log.contains("complaint complained at bounce ExampleFBL/1.0 reason=feedback"),
        "{log}"
    );
    assert!(log.contains(facts), "{log}");
}
