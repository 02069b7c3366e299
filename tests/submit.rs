//! Accepting mail (issue: SMTP listener, durable spool, receipt ids, `mailtrail log`), tested
//! against the real binary over loopback with real clients: swaks, Python's smtplib, and a raw
//! socket for what well-behaved clients never send.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::disk::{SmallDisk, fill};
use common::mailtrail::{
    ACCEPT_ONLY, Mailtrail, RawSmtp, http_get_for, python, receipt_in, swaks, wait_until,
};

fn smtp_arg(m: &Mailtrail) -> String {
    m.smtp.to_string()
}

#[test]
fn swaks_gets_a_receipt_and_log_shows_it_queued() {
    let m = Mailtrail::start();
    let (ok, out) = swaks(&[
        "--to",
        "someone@example.org",
        "--from",
        "app@example.com",
        "--server",
        &smtp_arg(&m),
        "--header",
        "Subject: invoice 42",
        "--header",
        "X-Mailtrail-Context: invoice-42",
    ]);
    assert!(ok, "{out}");
    let receipt = receipt_in(&out).unwrap_or_else(|| panic!("no receipt in: {out}"));
    assert!(
        out.contains(&format!("250 2.0.0 Ok: queued as {receipt}")),
        "{out}"
    );

    let text = m.cli_ok(&["log", "someone@example.org"]);
    assert!(text.contains(&receipt), "{text}");
    assert!(text.contains("queued"), "{text}");
    assert!(text.contains("invoice 42"), "{text}");

    let msgs = m.log_json("SOMEONE@example.org");
    assert_eq!(msgs.len(), 1);
    let msg = &msgs[0];
    assert_eq!(msg["receipt"], receipt.as_str());
    assert_eq!(msg["envelope_sender"], "app@example.com");
    assert_eq!(msg["subject"], "invoice 42");
    assert_eq!(msg["context"], "invoice-42");
    assert_eq!(msg["client_ip"], "127.0.0.1");
    assert_eq!(msg["recipients"][0]["address"], "someone@example.org");
    assert_eq!(msg["recipients"][0]["status"], "queued");

    // Looking up by receipt finds the same message.
    let by_receipt = m.log_json(&receipt);
    assert_eq!(by_receipt.len(), 1);
    assert_eq!(by_receipt[0]["receipt"], receipt.as_str());
}

#[test]
fn an_address_pasted_with_its_display_name_finds_its_messages() {
    let m = Mailtrail::start();
    let receipt = m.submit(None, "app@example.com", &["Bob.Mixed@OK.test"], "pasted");
    for pasted in [
        "Bob Mixed <Bob.Mixed@OK.test>",
        "\"Mixed, Bob\" <bob.mixed@ok.test>",
        "  \"Bob <boss>\" <Bob.Mixed@OK.test>  ",
    ] {
        let text = m.cli_ok(&["log", pasted]);
        assert!(text.contains(&receipt), "{pasted}: {text}");
    }
    // The sender, pasted from a From: field, finds it too.
    let text = m.cli_ok(&["log", "The App <app@example.com>"]);
    assert!(text.contains(&receipt), "{text}");
    // The API, and so the search page, which sends what was typed.
    for path in [
        "/api/log/Bob%20Mixed%20%3CBob.Mixed%40OK.test%3E",
        "/api/log/%22Mixed%2C%20Bob%22%20%3Cbob.mixed%40ok.test%3E",
    ] {
        let (status, body) = m.http_get(path);
        assert_eq!(status, 200, "{path}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v[0]["receipt"], receipt.as_str(), "{path}: {body}");
    }
    // A receipt id pasted in brackets after a word is still a receipt.
    let text = m.cli_ok(&["log", &format!("receipt <{receipt}>")]);
    assert!(text.contains("Bob.Mixed@OK.test"), "{text}");
    // A receipt the store has no message for is said to be so, as `queue retry` says it:
    // exit 1 from the CLI, a JSON 404 from the API.
    let unknown = mailtrail::receipt::ReceiptId::new().to_string();
    let out = m.cli(&["log", &unknown]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no message with receipt"), "{err}");
    let (status, body) = m.http_get(&format!("/api/log/{unknown}"));
    assert_eq!(status, 404, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("no message with receipt"),
        "{body}"
    );
}

#[test]
fn until_a_date_alone_takes_in_that_whole_day() {
    let m = Mailtrail::start();
    let receipt = m.submit(None, "app@example.com", &["day@example.org"], "today");
    let today = chrono::Utc::now().date_naive();
    let yesterday = today.pred_opt().unwrap().to_string();
    let today = today.to_string();
    let text = m.cli_ok(&["log", "day@example.org", "--until", &today]);
    assert!(text.contains(&receipt), "--until {today}: {text}");
    let text = m.cli_ok(&[
        "log",
        "day@example.org",
        "--since",
        &today,
        "--until",
        &today,
    ]);
    assert!(text.contains(&receipt), "--since/--until {today}: {text}");
    let text = m.cli_ok(&["log", "day@example.org", "--until", &yesterday]);
    assert!(text.contains("no messages"), "--until {yesterday}: {text}");
    let (status, body) = m.http_get(&format!("/api/log/day@example.org?until={today}"));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&receipt), "until={today}: {body}");
    let (_, body) = m.http_get(&format!("/api/log/day@example.org?until={yesterday}"));
    assert_eq!(body.trim(), "[]", "until={yesterday}");
}

#[test]
fn a_log_cut_by_its_limit_says_more_exist_and_how_to_see_them() {
    let m = Mailtrail::start();
    let receipts: Vec<String> = (0..25)
        .map(|i| {
            m.submit(
                None,
                "app@example.com",
                &["many@example.org"],
                &format!("n{i}"),
            )
        })
        .collect();
    let shown = |text: &str| {
        receipts
            .iter()
            .filter(|r| text.contains(r.as_str()))
            .count()
    };
    let text = m.cli_ok(&["log", "many@example.org"]);
    assert_eq!(shown(&text), 20, "{text}");
    let notice = text.lines().last().unwrap();
    assert!(
        notice.starts_with("(the newest 20 messages shown; more exist: --limit 40"),
        "{notice}"
    );
    // The --before it names is the next page exactly: the other five, none shown twice,
    // though many of the 25 share a millisecond.
    let before = notice
        .split("--before ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap();
    let rest = m.cli_ok(&["log", "many@example.org", "--before", before]);
    assert_eq!(shown(&rest), 5, "{rest}");
    assert!(!rest.contains(before), "{rest}");
    assert!(!rest.contains("more exist"), "{rest}");
    assert!(
        receipts
            .iter()
            .all(|r| text.contains(r.as_str()) != rest.contains(r.as_str())),
        "the two pages are the 25, each once"
    );
    // The API pages the same way; an unknown receipt is a 400.
    let (status, body) = m.http_get(&format!(
        "/api/log/many@example.org?limit=20&before={before}"
    ));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body)
            .unwrap()
            .as_array()
            .map(Vec::len),
        Some(5)
    );
    let unknown = mailtrail::receipt::ReceiptId::new();
    let (status, body) = m.http_get(&format!("/api/log/many@example.org?before={unknown}"));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("no message with receipt"), "{body}");
    for all in ["25", "0"] {
        let text = m.cli_ok(&["log", "many@example.org", "--limit", all]);
        assert_eq!(shown(&text), 25, "--limit {all}");
        assert!(!text.contains("more exist"), "--limit {all}: {text}");
    }
    // JSON lines stay records only; the notice goes to stderr.
    let out = m.cli(&["log", "many@example.org", "--json"]);
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 20);
    for line in stdout.lines() {
        serde_json::from_str::<serde_json::Value>(line).expect("a JSON record");
    }
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("more exist: --limit 40"), "{stderr}");
}

#[test]
fn the_api_log_is_an_array_of_what_log_json_prints() {
    let m = Mailtrail::start();
    let first = m.submit(None, "app@example.com", &["same@example.org"], "one");
    m.submit(
        None,
        "app@example.com",
        &["same@example.org", "x@example.org"],
        "two",
    );
    let cli = m.log_json("same@example.org");
    let (status, body) = m.http_get("/api/log/same@example.org");
    assert_eq!(status, 200, "{body}");
    let api: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(api.len(), 2);
    assert_eq!(api, cli);
    for key in ["received_at", "received_at_ms"] {
        assert!(!api[0][key].is_null(), "{key}: {body}");
    }
    for key in ["updated_at", "updated_at_ms"] {
        assert!(!api[0]["recipients"][0][key].is_null(), "{key}: {body}");
    }
    for key in ["at", "at_ms"] {
        assert!(
            !api[0]["recipients"][0]["events"][0][key].is_null(),
            "{key}: {body}"
        );
    }
    let (_, body) = m.http_get(&format!("/api/log/{first}"));
    let api: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(api, m.log_json(&first));
}

#[test]
fn smtplib_plain_starttls_and_pipelined_transactions() {
    let m = Mailtrail::start();
    let script = format!(
        r#"
import smtplib, ssl
host, port = "{host}", {port}
s = smtplib.SMTP(host, port, timeout=20)
code, text = s.ehlo("client.test")
assert code == 250, (code, text)
feats = text.decode().upper()
for ext in ["PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "CHUNKING", "DSN", "STARTTLS"]:
    assert ext in feats, (ext, feats)
r = s.sendmail("a@example.com", ["b@example.org", "c@example.org"], b"Subject: plain\r\n\r\nhello\r\n")
assert r == {{}}, r
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
s.starttls(context=ctx)
code, text = s.ehlo("client.test")
assert b"STARTTLS" not in text.upper(), text
s.mail("tls@example.com")
s.rcpt("d@example.org")
code, resp = s.data(b"Subject: over tls\r\n\r\nsecret\r\n")
assert code == 250 and b"queued as" in resp, (code, resp)
print("RECEIPT", resp.decode().split()[-1])
s.quit()
"#,
        host = m.smtp.ip(),
        port = m.smtp.port()
    );
    let (ok, out) = python(&script);
    assert!(ok, "{out}\n{}", m.server_log());
    let receipt = out.split_whitespace().nth(1).unwrap().to_string();
    let msgs = m.log_json(&receipt);
    assert_eq!(
        msgs[0]["tls_version"]
            .as_str()
            .map(|v| v.starts_with("TLS")),
        Some(true)
    );
    let both = m.log_json("c@example.org");
    assert_eq!(both[0]["recipients"].as_array().unwrap().len(), 2);
}

/// swaks through `m` to x@example.org with AUTH `mech` as `app` and `password`, plus `extra`.
fn swaks_auth(m: &Mailtrail, mech: &str, password: &str, extra: &[&str]) -> (bool, String) {
    let server = smtp_arg(m);
    let mut args = vec![
        "--to",
        "x@example.org",
        "--server",
        &server,
        "--auth",
        mech,
        "--auth-user",
        "app",
        "--auth-password",
        password,
    ];
    args.extend_from_slice(extra);
    swaks(&args)
}

#[test]
fn auth_plain_and_login_only_with_right_password() {
    // Loopback clients are outside relay_networks here, so only AUTH lets them relay.
    let hash = common::mailtrail::hash_password("s3cret pass");
    assert!(hash.starts_with("$argon2"), "{hash}");
    let m = Mailtrail::start_with(
        "",
        &format!(
            "relay_networks = [\"192.0.2.0/24\"]\n[[smtp.users]]\nname = \"app\"\npassword_hash = \"{hash}\"\n"
        ),
        ACCEPT_ONLY,
    );
    // No AUTH: relay denied per recipient.
    let (ok, out) = swaks(&["--to", "x@example.org", "--server", &smtp_arg(&m)]);
    assert!(!ok, "{out}");
    assert!(out.contains("554 5.7.1"), "{out}");
    // Wrong password.
    let (ok, out) = swaks_auth(&m, "PLAIN", "wrong", &[]);
    assert!(!ok, "{out}");
    assert!(out.contains("535"), "{out}");
    // Both refusals are in the server log (as Postfix logs them, for fail2ban), the password
    // is not.
    let log = m.server_log();
    assert!(
        log.contains("recipient refused")
            && log.contains("to=x@example.org")
            && log.contains("554 5.7.1 Relay access denied"),
        "{log}"
    );
    // One line, as fail2ban patterns read it: no CRLF of the wire form carried along.
    assert!(
        log.lines()
            .filter(|l| l.contains("recipient refused"))
            .all(|l| !l.contains("\\r") && !l.contains("\\x0d") && !l.contains('\r')),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("AUTH refused") && l.contains("user=app")),
        "{log}"
    );
    assert!(!log.contains("wrong"), "{log}");
    // PLAIN and LOGIN with the right password (loopback: offered without TLS).
    for mech in ["PLAIN", "LOGIN"] {
        let (ok, out) = swaks_auth(&m, mech, "s3cret pass", &[]);
        assert!(ok, "{mech}: {out}");
        let receipt = receipt_in(&out).unwrap();
        let msgs = m.log_json(&receipt);
        assert_eq!(msgs[0]["auth_user"], "app");
    }
    // STARTTLS + AUTH: stored with the TLS version and the user (the Received header's
    // ESMTPSA is asserted on the stored body in smtp::server's tests).
    let (ok, out) = swaks_auth(&m, "PLAIN", "s3cret pass", &["--tls"]);
    assert!(ok, "{out}");
    let msgs = m.log_json(&receipt_in(&out).unwrap());
    assert_eq!(msgs[0]["auth_user"], "app");
    assert!(
        msgs[0]["tls_version"]
            .as_str()
            .is_some_and(|v| v.starts_with("TLS")),
        "{}",
        msgs[0]
    );
}

#[test]
fn a_client_that_keeps_guessing_is_throttled_and_told_so() {
    let hash = common::mailtrail::hash_password("s3cret pass");
    let m = Mailtrail::start_with(
        "",
        &format!(
            "relay_networks = [\"192.0.2.0/24\"]\nauth_failure_limit = 2\n\
             [[smtp.users]]\nname = \"app\"\npassword_hash = \"{hash}\"\n"
        ),
        ACCEPT_ONLY,
    );
    let auth = |password: &str| swaks_auth(&m, "PLAIN", password, &[]);
    // Eight guesses at once: two are checked and refused, the others stop at the limit
    // unchecked (read once before they queued, all eight were checked).
    let outs: Vec<String> = std::thread::scope(|s| {
        let guesses: Vec<_> = (0..8)
            .map(|i| s.spawn(move || auth(&format!("guess{i}"))))
            .collect();
        guesses
            .into_iter()
            .map(|g| g.join().unwrap())
            .map(|(ok, out)| {
                assert!(!ok, "{out}");
                out
            })
            .collect()
    });
    let refused = outs.iter().filter(|o| o.contains("535 5.7.8")).count();
    let throttled = outs.iter().filter(|o| o.contains("454 4.7.0")).count();
    assert_eq!((refused, throttled), (2, 6), "{outs:#?}");
    // The limit is reached: even the right password is not checked for a while.
    let (ok, out) = auth("s3cret pass");
    assert!(!ok, "{out}");
    assert!(
        out.contains("454 4.7.0 Too many failed authentications from your address"),
        "{out}"
    );
    assert!(
        m.server_log().contains("AUTH throttled"),
        "{}",
        m.server_log()
    );
}

#[test]
fn refuses_relay_to_clients_outside_relay_networks() {
    let m = Mailtrail::start_with("", "relay_networks = [\"10.0.0.0/8\"]\n", ACCEPT_ONLY);
    let mut c = RawSmtp::connect(m.smtp);
    assert!(c.cmd("EHLO outside.test").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<spammer@example.com>").starts_with("250"));
    let r = c.cmd("RCPT TO:<victim@example.org>");
    assert!(r.starts_with("554 5.7.1"), "{r}");
    let r = c.cmd("DATA");
    assert!(r.starts_with("503") || r.starts_with("554"), "{r}");
    assert!(c.cmd("QUIT").starts_with("221"));
    let out = m.cli_ok(&["log", "victim@example.org"]);
    assert!(
        !out.contains("victim@example.org ") || out.contains("no messages"),
        "{out}"
    );
}

#[test]
fn pipelined_commands_after_data_are_answered_in_order() {
    let m = Mailtrail::start();
    let mut c = RawSmtp::connect(m.smtp);
    assert!(c.cmd("EHLO pipe.test").starts_with("250"));
    c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n");
    assert!(c.reply().starts_with("250"));
    assert!(c.reply().starts_with("250"));
    assert!(c.reply().starts_with("354"));
    // End of DATA, a second whole transaction and QUIT, all in one write.
    c.send(
        b"Subject: one\r\n\r\nbody\r\n.\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n",
    );
    let first = c.reply();
    assert!(first.starts_with("250 2.0.0 Ok: queued as"), "{first}");
    assert!(c.reply().starts_with("250"));
    assert!(c.reply().starts_with("250"));
    assert!(c.reply().starts_with("354"));
    c.send(b"Subject: two\r\n\r\nbody\r\n.\r\nQUIT\r\n");
    let second = c.reply();
    assert!(second.starts_with("250 2.0.0 Ok: queued as"), "{second}");
    assert!(c.reply().starts_with("221"));
    assert_ne!(receipt_in(&first), receipt_in(&second));
    assert_eq!(m.log_json("c@example.org").len(), 1);
}

#[test]
fn bdat_chunks_make_one_message() {
    let m = Mailtrail::start();
    let mut c = RawSmtp::connect(m.smtp);
    assert!(c.cmd("EHLO chunk.test").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<a@example.com>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<bdat@example.org>").starts_with("250"));
    let part1 = b"Subject: chunked\r\n\r\nfirst ";
    let part2 = b"second\r\n";
    c.send(format!("BDAT {}\r\n", part1.len()).as_bytes());
    c.send(part1);
    assert!(c.reply().starts_with("250"));
    c.send(format!("BDAT {} LAST\r\n", part2.len()).as_bytes());
    c.send(part2);
    let r = c.reply();
    assert!(r.starts_with("250 2.0.0 Ok: queued as"), "{r}");
    let msgs = m.log_json("bdat@example.org");
    assert_eq!(msgs[0]["subject"], "chunked");
}

#[test]
fn rejects_bare_lf_and_bare_cr_smuggling() {
    let m = Mailtrail::start();
    for (name, body) in [
        (
            "bare LF before dot",
            &b"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<evil@example.com>\r\n\r\n.\r\n"[..],
        ),
        (
            "bare CR dot",
            &b"Subject: x\r\n\r\nhello\r.\rMAIL FROM:<evil@example.com>\r\n.\r\n"[..],
        ),
        (
            "CRLF dot LF",
            &b"Subject: x\r\n\r\nhello\r\n.\nRCPT TO:<evil@example.org>\r\n.\r\n"[..],
        ),
    ] {
        let mut c = RawSmtp::connect(m.smtp);
        assert!(c.cmd("EHLO smuggler.test").starts_with("250"));
        assert!(c.cmd("MAIL FROM:<a@example.com>").starts_with("250"));
        assert!(c.cmd("RCPT TO:<smuggle@example.org>").starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        c.send(body);
        let r = c.reply();
        assert!(r.starts_with("550 5.5.2"), "{name}: {r}");
        // The session is still usable and nothing was smuggled in.
        assert!(c.cmd("NOOP").starts_with("250"), "{name}");
    }
    let out = m.cli_ok(&["log", "smuggle@example.org", "--json"]);
    assert_eq!(out.trim(), "", "nothing stored: {out}");
    assert_eq!(m.cli_ok(&["log", "evil@example.com", "--json"]).trim(), "");
}

#[test]
fn a_command_with_a_bare_lf_or_cr_is_refused_521_and_the_connection_closed() {
    let m = Mailtrail::start_with("", "", ACCEPT_ONLY);
    // A message acknowledged before the bad command stays stored.
    let mut c = RawSmtp::connect(m.smtp);
    assert!(c.cmd("EHLO lf.test").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<a@example.com>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<kept@example.org>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: kept\r\n\r\nhello\r\n.\r\n");
    let accepted = c.reply();
    let receipt = receipt_in(&accepted).unwrap_or_else(|| panic!("{accepted}"));
    // Pipelined after a bare LF: were it read as the end of MAIL, the RCPT would be read
    // as a command of its own (it was, before).
    c.send(b"MAIL FROM:<b@example.com>\nRCPT TO:<lost@example.org>\r\n");
    let r = c.reply();
    assert!(r.starts_with("521 5.5.2 "), "{r}");
    assert!(r.trim_end().ends_with("Error: bare <LF> received"), "{r}");
    assert_eq!(c.reply(), "", "the connection was left open after 521");
    let kept = m.recipient(&receipt, "kept@example.org");
    assert_eq!(kept["status"], "queued", "{kept}");

    let mut c = RawSmtp::connect(m.smtp);
    assert!(c.cmd("EHLO cr.test").starts_with("250"));
    c.send(b"RSET\rMAIL FROM:<c@example.com>\r\n");
    let r = c.reply();
    assert!(r.starts_with("521 5.5.2 "), "{r}");
    assert!(r.trim_end().ends_with("Error: bare <CR> received"), "{r}");
    assert_eq!(c.reply(), "");
    assert_eq!(m.cli_ok(&["log", "lost@example.org", "--json"]).trim(), "");
}

#[test]
fn enforces_size_recipient_and_line_limits() {
    let m = Mailtrail::start_with(
        "",
        "max_message_size = 2000\nmax_recipients = 3\nmax_errors = 50\n",
        ACCEPT_ONLY,
    );
    let mut c = RawSmtp::connect(m.smtp);
    let ehlo = c.cmd("EHLO limits.test");
    assert!(ehlo.contains("SIZE 2000"), "{ehlo}");
    let r = c.cmd("MAIL FROM:<a@example.com> SIZE=5000");
    assert!(r.starts_with("552 5.3.4"), "{r}");
    assert!(c.cmd("MAIL FROM:<a@example.com>").starts_with("250"));
    for i in 0..3 {
        assert!(
            c.cmd(&format!("RCPT TO:<r{i}@example.org>"))
                .starts_with("250")
        );
    }
    let r = c.cmd("RCPT TO:<r4@example.org>");
    assert!(r.starts_with("452 4.5.3"), "{r}");
    assert!(c.cmd("DATA").starts_with("354"));
    let big = "x".repeat(100);
    let mut body = String::from("Subject: big\r\n\r\n");
    for _ in 0..40 {
        body.push_str(&big);
        body.push_str("\r\n");
    }
    body.push_str(".\r\n");
    c.send(body.as_bytes());
    let r = c.reply();
    assert!(r.starts_with("552 5.3.4"), "{r}");
    // Command line too long.
    let long = format!("NOOP {}", "y".repeat(3000));
    let r = c.cmd(&long);
    assert!(r.starts_with("500"), "{r}");
    assert!(c.cmd("NOOP").starts_with("250"));
    assert_eq!(m.cli_ok(&["log", "r0@example.org", "--json"]).trim(), "");
}

#[test]
fn bad_syntax_unknown_commands_and_bad_sequence() {
    let m = Mailtrail::start_with("", "max_errors = 5\n", ACCEPT_ONLY);
    let mut c = RawSmtp::connect(m.smtp);
    assert!(c.cmd("RCPT TO:<x@example.org>").starts_with("503"));
    assert!(c.cmd("EHLO seq.test").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("503"));
    assert!(c.cmd("FROB nicate").starts_with("500") || c.cmd("NOOP").starts_with("250"));
    let r = c.cmd("MAIL FROM:<<<broken");
    assert!(r.starts_with("501") || r.starts_with("553"), "{r}");
    assert!(c.cmd("VRFY someone").starts_with("252"));
    assert!(c.cmd("HELP").starts_with("214"));
    assert!(c.cmd("RSET").starts_with("250"));
    // Keep erring until the session is closed with 421.
    let mut last = String::new();
    for _ in 0..10 {
        last = c.cmd("XYZZY");
        if last.starts_with("421") || last.is_empty() {
            break;
        }
    }
    assert!(last.starts_with("421"), "{last}");
}

#[test]
fn survives_garbage_tls_on_plain_port_and_vanishing_clients() {
    use std::io::Write;
    let m = Mailtrail::start();
    // Binary garbage.
    {
        let mut c = RawSmtp::connect(m.smtp);
        let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
        let _ = c.stream.write_all(&garbage);
        let _ = c.reply();
    }
    // A TLS ClientHello on the plain port.
    {
        let mut c = RawSmtp::connect(m.smtp);
        let hello = [
            0x16u8, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03,
        ];
        let _ = c.stream.write_all(&hello);
        let _ = c.reply();
    }
    // A client that vanishes in the middle of DATA.
    {
        let mut c = RawSmtp::connect(m.smtp);
        assert!(c.cmd("EHLO gone.test").starts_with("250"));
        assert!(c.cmd("MAIL FROM:<a@example.com>").starts_with("250"));
        assert!(c.cmd("RCPT TO:<half@example.org>").starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        c.send(b"Subject: half\r\n\r\nthis never ends");
        drop(c);
    }
    // The server still works and nothing half-written is visible.
    let (ok, out) = swaks(&["--to", "whole@example.org", "--server", &m.smtp.to_string()]);
    assert!(ok, "{out}\n{}", m.server_log());
    assert_eq!(m.cli_ok(&["log", "half@example.org", "--json"]).trim(), "");
}

#[test]
fn acknowledged_message_survives_kill_9() {
    let mut m = Mailtrail::start();
    let mut receipts = Vec::new();
    for i in 0..5 {
        let (ok, out) = swaks(&[
            "--to",
            &format!("durable{i}@example.org"),
            "--server",
            &m.smtp.to_string(),
        ]);
        assert!(ok, "{out}");
        receipts.push(receipt_in(&out).unwrap());
    }
    m.kill9();
    // Readable while stopped ...
    for (i, r) in receipts.iter().enumerate() {
        let msgs = m.log_json(&format!("durable{i}@example.org"));
        assert_eq!(msgs[0]["receipt"], r.as_str());
        assert_eq!(msgs[0]["recipients"][0]["status"], "queued");
    }
    // ... and after restart.
    m.spawn();
    let out = m.cli_ok(&["log", "durable4@example.org"]);
    assert!(
        out.contains(&receipts[4]) && out.contains("queued"),
        "{out}"
    );
}

#[test]
fn sigterm_finishes_transaction_in_flight_and_exits_0() {
    let mut m = Mailtrail::start();
    let mut c = RawSmtp::connect(m.smtp);
    assert!(c.cmd("EHLO inflight.test").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<a@example.com>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<inflight@example.org>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: in flight\r\n\r\npart one\r\n");
    let child = m.child_id();
    std::process::Command::new("kill")
        .args(["-TERM", &child.to_string()])
        .status()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    // New connections are no longer accepted ...
    assert!(
        std::net::TcpStream::connect(m.smtp)
            .map(|mut s| {
                use std::io::Read;
                let mut b = [0u8; 64];
                s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
                    .ok();
                matches!(s.read(&mut b), Ok(0) | Err(_)) || b.starts_with(b"421")
            })
            .unwrap_or(true)
    );
    // ... but the transaction in flight completes.
    c.send(b"part two\r\n.\r\n");
    let r = c.reply();
    assert!(r.starts_with("250 2.0.0 Ok: queued as"), "{r}");
    let _ = c.cmd("QUIT");
    // Already shutting down: no second signal (that one stops at once, exit status 1).
    let status = m.wait_exit(std::time::Duration::from_secs(60));
    assert!(status.success(), "exit status {status}\n{}", m.server_log());
    let msgs = m.log_json("inflight@example.org");
    assert_eq!(msgs.len(), 1);
}

/// SIGHUP (logrotate, a closed terminal) leaves the server running; after SIGTERM a second
/// one stops it at once instead of waiting `shutdown_grace` for a stalled transaction.
#[test]
fn sighup_is_harmless_and_a_second_sigterm_stops_at_once() {
    let mut m = Mailtrail::start();
    let child = m.child_id().to_string();
    let kill = |sig: &str| {
        std::process::Command::new("kill")
            .args([sig, &child])
            .status()
            .unwrap()
    };
    kill("-HUP");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut c = RawSmtp::connect(m.smtp);
    assert!(c.cmd("EHLO after-hup.test").starts_with("250"));
    assert!(
        m.server_log().contains("SIGHUP ignored"),
        "{}",
        m.server_log()
    );
    // A transaction that stalls in DATA holds the first shutdown for its 30 s of grace.
    assert!(c.cmd("MAIL FROM:<a@example.com>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<stall@example.org>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: stalled\r\n\r\nhalf a message\r\n");
    kill("-TERM");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let started = std::time::Instant::now();
    kill("-TERM");
    let status = m.wait_exit(std::time::Duration::from_secs(10));
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{}", m.server_log());
    assert!(
        m.server_log().contains("second signal"),
        "{}",
        m.server_log()
    );
}

/// `mailtrail serve --config path`, which must fail: its stderr.
fn serve_fails_with(path: &std::path::Path) -> String {
    let out = std::process::Command::new(common::mailtrail::bin())
        .args(["serve", "--config"])
        .arg(path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_config_names_the_key_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[smtp]\nlisten = [\"127.0.0.1:2525\"]\nmax_recipient = 5\n",
    )
    .unwrap();
    let err = serve_fails_with(&path);
    assert!(err.contains("max_recipient"), "{err}");
    std::fs::write(&path, "[smtp]\nrelay_networks = [\"not-a-net\"]\n").unwrap();
    let err = serve_fails_with(&path);
    assert!(err.contains("relay_networks"), "{err}");
    // A config file that cannot be read: the path and the reason, said once.
    let err = serve_fails_with(&dir.path().join("missing.toml"));
    assert!(err.contains("missing.toml"), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

/// The value of the first sample of `/metrics` text whose line starts with `name`.
fn metric_value(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn metrics_count_connections_messages_and_rejections() {
    // A counter not yet touched may be absent: it counts as 0.
    let metric = |body: &str, name: &str| metric_value(body, name).unwrap_or(0.0);
    let m = Mailtrail::start_with("", "relay_networks = [\"10.0.0.0/8\"]\n", ACCEPT_ONLY);
    let (status, before) = m.http_get("/metrics");
    assert_eq!(status, 200);
    let _ = swaks(&[
        "--to",
        "denied@example.org",
        "--server",
        &m.smtp.to_string(),
    ]);
    let (_, after) = m.http_get("/metrics");
    let conns = "mailtrail_smtp_connections_total";
    assert_eq!(
        metric(&after, conns) - metric(&before, conns),
        1.0,
        "{after}"
    );
    let rejected = "mailtrail_smtp_rejections_total{class=\"5xx\"}";
    assert!(metric(&after, rejected) >= 1.0, "{after}");
    assert_eq!(metric(&after, "mailtrail_messages_accepted_total"), 0.0);
    let (status, body) = m.http_get("/healthz");
    assert_eq!((status, body.trim()), (200, "ok"));
}

#[test]
fn metrics_show_the_store_commits_behind_an_accepted_message() {
    let m = Mailtrail::start_with("", "", ACCEPT_ONLY);
    let metric = |body: &str, name: &str| metric_value(body, name).unwrap_or(-1.0);
    let (_, before) = m.http_get("/metrics");
    let (ok, out) = swaks(&["--to", "a@example.org", "--server", &m.smtp.to_string()]);
    assert!(ok, "{out}");
    let (_, after) = m.http_get("/metrics");
    let commits = "mailtrail_store_commits_total";
    let commands = "mailtrail_store_commands_total";
    assert!(metric(&before, commits) >= 0.0, "not exported: {before}");
    // The accept is one write command, committed (and fsynced) before the 250.
    assert!(
        metric(&after, commits) > metric(&before, commits),
        "{after}"
    );
    assert!(
        metric(&after, commands) > metric(&before, commands),
        "{after}"
    );
    assert!(
        metric(&after, commands) >= metric(&after, commits),
        "{after}"
    );
}

#[test]
fn http_api_serves_the_log_as_json_and_a_search_page() {
    let m = Mailtrail::start();
    let (ok, out) = swaks(&["--to", "api@example.org", "--server", &m.smtp.to_string()]);
    assert!(ok, "{out}");
    let receipt = receipt_in(&out).unwrap();
    let (status, body) = m.http_get("/api/log/api@example.org");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v[0]["receipt"], receipt.as_str());
    assert_eq!(v[0]["recipients"][0]["status"], "queued");
    let (status, body) = m.http_get(&format!("/api/log/{receipt}"));
    assert_eq!(status, 200);
    assert!(body.contains("api@example.org"), "{body}");
    let (status, body) = m.http_get("/api/log/api@example.org?since=yesterday-ish");
    assert_eq!(status, 400, "{body}");
    // A limit is from 1 to 10,000 rows: 0 (the store's "no limit") is no way around the cap.
    let (ok, out) = swaks(&["--to", "api@example.org", "--server", &m.smtp.to_string()]);
    assert!(ok, "{out}");
    let (_, body) = m.http_get("/api/log/api@example.org?limit=1");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(1), "limit=1: {body}");
    for switch in ["true", "1", "YES", "on"] {
        let (status, body) = m.http_get(&format!("/api/bounces?unhandled={switch}"));
        assert_eq!((status, body.trim()), (200, "[]"), "unhandled={switch}");
    }
    let (status, body) = m.http_get("/api/bounces?first=maybe");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("is not a switch"), "{body}");
    // A reason in any case, as the CLI takes it; one that is none is named.
    let (status, _) = m.http_get("/api/bounces?reason=UserUnknown");
    assert_eq!(status, 200);
    let (status, body) = m.http_get("/api/bounces?reason=userunkown");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("the reasons are: "), "{body}");
    // A misspelt filter is refused, naming the ones there are, rather than ignored (which
    // listed every bounce as if they were its result).
    for (path, known) in [
        ("/api/bounces?adress=x@example.org", "`address`"),
        ("/api/log/api@example.org?limits=1", "`limit`"),
    ] {
        let (status, body) = m.http_get(path);
        assert_eq!(status, 400, "{path}: {body}");
        assert!(
            body.contains("unknown field") && body.contains(known),
            "{path}: {body}"
        );
    }
    // Bad parameters are JSON errors like every other (axum's own rejection is plain text).
    for path in [
        "/api/bounces?adress=x@example.org",
        "/api/bounces?first=maybe",
        "/api/bounces?reason=bogus",
        "/api/log/api@example.org?limit=-1",
        "/api/log/api@example.org?limit=0",
        "/api/log/api@example.org?limit=10001",
        "/api/bounces?limit=100000000000000000000",
    ] {
        let (status, body) = m.http_get(path);
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        assert_eq!(status, 400, "{body}");
        assert!(v["error"].is_string(), "{body}");
    }
    let (status, page) = m.http_get("/");
    assert_eq!(status, 200);
    assert!(page.contains("<title>mailtrail</title>"), "{page}");
    // The page runs its own inline script and style only, and is not to be framed.
    let head = common::mailtrail::http_response(m.http, &m.http.to_string(), "/");
    let head = head.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
    for needle in [
        "content-security-policy: default-src 'none'; script-src 'sha256-",
        "x-frame-options: deny",
        "x-content-type-options: nosniff",
    ] {
        assert!(head.contains(needle), "{needle} missing in {head}");
    }
    // Two Host fields name no one host.
    let (status, _) = http_get_for(m.http, "127.0.0.1\r\nHost: evil.test", "/api/bounces");
    assert_eq!(status, 400);
    // A page whose own name now points here (DNS rebinding) gets nothing.
    let (status, body) = http_get_for(m.http, "attacker.example:8025", "/api/log/api@example.org");
    assert_eq!(status, 421, "{body}");
    assert!(!body.contains("api@example.org"), "{body}");
    let (status, _) = http_get_for(m.http, &m.http.to_string(), "/api/bounces");
    assert_eq!(status, 200);
    let (_, body) = http_get_for(m.http, "attacker.example:8025", "/api/bounces");
    let v: serde_json::Value = serde_json::from_str(&body).expect("a 421 under /api is JSON");
    assert!(
        v["error"].as_str().unwrap().contains("allowed_hosts"),
        "{body}"
    );
    // Health and counters name no one: a probe or a scrape by any name is answered.
    let (status, _) = http_get_for(m.http, "mailtrail.internal:8025", "/metrics");
    assert_eq!(status, 200);
    // Under /api every error is JSON, as the 400s are; elsewhere it is text.
    let (status, body) = m.http_get("/api/logs/api@example.org");
    assert_eq!(status, 404, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("a 404 under /api is JSON");
    assert!(
        v["error"].as_str().unwrap().contains("/api/bounces"),
        "{body}"
    );
    let (status, body) = m.http_get("/api/log/%ff%fe");
    assert_eq!(status, 400, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("a bad key is a JSON error");
    assert!(v["error"].is_string(), "{body}");
    let (status, body) = m.http_get("/index.html");
    assert_eq!(status, 404, "{body}");
    assert!(
        serde_json::from_str::<serde_json::Value>(&body).is_err(),
        "{body}"
    );
    let mut s = std::net::TcpStream::connect(m.http).unwrap();
    write!(s, "DELETE /api/bounces HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.0 405"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("allow: get,head"),
        "{head}"
    );
    let v: serde_json::Value = serde_json::from_str(body).expect("a 405 under /api is JSON");
    assert!(v["error"].as_str().unwrap().contains("DELETE"), "{body}");
}

/// Sends one message of about `body_bytes` to `to`; the reply to its end of data.
fn send_message(m: &Mailtrail, to: &str, body_bytes: usize) -> String {
    let mut c = open_data(m, to, body_bytes);
    c.send(b".\r\n");
    let reply = c.reply();
    let _ = c.cmd("QUIT");
    reply
}

/// The value of an unlabelled metric in `/metrics`.
fn metric(m: &Mailtrail, name: &str) -> i64 {
    let (_, text) = m.http_get("/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// Opens a transaction to `to` and sends `bytes` of content without ending it.
fn open_data(m: &Mailtrail, to: &str, bytes: usize) -> RawSmtp {
    let mut c = RawSmtp::connect(m.smtp);
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<app@example.com>").starts_with("250"));
    assert!(c.cmd(&format!("RCPT TO:<{to}>")).starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    let line = format!("{}\r\n", "x".repeat(98));
    let mut data = format!("Subject: {to}\r\n\r\n").into_bytes();
    while data.len() < bytes {
        data.extend_from_slice(line.as_bytes());
    }
    c.send(&data);
    c
}

#[test]
fn messages_in_transit_share_a_memory_bound_and_the_one_past_it_is_told_to_retry() {
    let m = Mailtrail::start_with(
        "",
        "max_message_size = 60000\nmax_content_memory = 100000\n",
        ACCEPT_ONLY,
    );
    // One message in transit holds 50 kB of the 100 kB...
    let mut first = open_data(&m, "first@example.org", 50_000);
    wait_until("the first body is held", Duration::from_secs(10), || {
        metric(&m, "mailtrail_smtp_content_memory_bytes") >= 50_000
    });
    // ...so a second one of 55 kB does not fit: try again later, nothing stored.
    let mut second = open_data(&m, "second@example.org", 55_000);
    second.send(b".\r\n");
    let refused = second.reply();
    assert!(refused.starts_with("452 4.3.1"), "{refused}");
    assert_eq!(
        m.cli_ok(&["log", "second@example.org", "--json"]).trim(),
        ""
    );
    // The same session goes on, and the first message is stored whole.
    assert!(second.cmd("RSET").starts_with("250"));
    first.send(b".\r\n");
    let stored = first.reply();
    assert!(stored.starts_with("250 2.0.0 Ok: queued as"), "{stored}");
    // Its memory is given back once stored: the retried message fits now.
    assert_eq!(metric(&m, "mailtrail_smtp_content_memory_bytes"), 0);
    let mut retried = open_data(&m, "second@example.org", 55_000);
    retried.send(b".\r\n");
    let reply = retried.reply();
    assert!(reply.starts_with("250 2.0.0 Ok: queued as"), "{reply}");
    assert_eq!(m.log_json("second@example.org").len(), 1);
}

#[test]
fn full_disk_answers_451_and_loses_nothing_acknowledged() {
    // The store's own path: the free-space check at MAIL (below) is off.
    let mut m = Mailtrail::configure("", "min_free_space = 0\n", ACCEPT_ONLY);
    let Some(_disk) = SmallDisk::mount(&m.data_dir(), "8m") else {
        return;
    };
    m.spawn();
    let first = send_message(&m, "kept@example.org", 4 * 1024);
    assert!(first.starts_with("250 2.0.0 Ok: queued as"), "{first}");
    let kept = receipt_in(&first).unwrap();

    let filler = m.data_dir().join("filler");
    fill(&filler);
    // A message the disk cannot hold: temporary failure, nothing acknowledged.
    let refused = send_message(&m, "big@example.org", 2 << 20);
    assert!(
        refused.starts_with("451 4.3.0"),
        "{refused}\n{}",
        m.server_log()
    );
    assert_eq!(m.cli_ok(&["log", "big@example.org", "--json"]).trim(), "");
    // What was acknowledged before is still there, and readable.
    let log = m.log_json("kept@example.org");
    assert_eq!(log[0]["receipt"], kept.as_str());
    assert_eq!(log[0]["recipients"][0]["status"], "queued");

    // Space again: the same server takes the message the client retries.
    std::fs::remove_file(&filler).unwrap();
    let retried = send_message(&m, "big@example.org", 2 << 20);
    assert!(
        retried.starts_with("250 2.0.0 Ok: queued as"),
        "{retried}\n{}",
        m.server_log()
    );
    let log = m.log_json("big@example.org");
    assert_eq!(log.len(), 1);
    assert_eq!(log[0]["recipients"][0]["status"], "queued");
}

/// The harness itself: a port taken between `free_port` and the server's bind (another
/// test's server, an outgoing connection) makes it choose new ports, not fail the test.
#[test]
fn the_harness_survives_a_stolen_port() {
    let mut m = Mailtrail::configure("", "", common::mailtrail::ACCEPT_ONLY);
    let stolen = m.smtp;
    let _thief = std::net::TcpListener::bind(stolen).expect("the port is still free");
    m.spawn();
    assert_ne!(m.smtp, stolen);
    let mut c = RawSmtp::connect(m.smtp);
    assert!(c.cmd("EHLO harness.test").starts_with("250"));
    assert!(
        m.server_log().contains("Address already in use"),
        "{}",
        m.server_log()
    );
}

#[test]
fn a_rust_log_that_is_no_level_stops_the_start_as_a_bad_log_level_does() {
    let dir = tempfile::TempDir::new().unwrap();
    let config = dir.path().join("mailtrail.toml");
    std::fs::write(
        &config,
        format!("data_dir = \"{}\"\n", dir.path().join("data").display()),
    )
    .unwrap();
    // tracing reads `verbose` as a target to log at every level: nothing would be logged.
    let out = std::process::Command::new(common::mailtrail::bin())
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "verbose")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("RUST_LOG") && err.contains("\"verbose\" is not a level"),
        "{err}"
    );
}

#[test]
fn a_disk_below_min_free_space_answers_452_at_mail_before_any_content() {
    let mut m = Mailtrail::configure("", "min_free_space = 4194304\n", ACCEPT_ONLY);
    let Some(_disk) = SmallDisk::mount(&m.data_dir(), "8m") else {
        return;
    };
    m.spawn();
    let first = send_message(&m, "kept@example.org", 4 * 1024);
    assert!(first.starts_with("250 2.0.0 Ok: queued as"), "{first}");
    let filler = m.data_dir().join("filler");
    fill(&filler);
    // Within a second (the check's own period), MAIL is refused: the client sends no body.
    let mail_reply = || {
        let mut c = RawSmtp::connect(m.smtp);
        assert!(c.cmd("EHLO app.example").starts_with("250"));
        let reply = c.cmd("MAIL FROM:<app@example.com>");
        let _ = c.cmd("QUIT");
        reply
    };
    wait_until(
        "MAIL refused for want of room",
        Duration::from_secs(10),
        || mail_reply().starts_with("452 4.3.1 Insufficient system storage"),
    );
    assert!(
        m.server_log()
            .contains("free space below [smtp] min_free_space")
    );
    // Room again: mail is taken, and what was taken before is there.
    std::fs::remove_file(&filler).unwrap();
    wait_until("MAIL taken again", Duration::from_secs(10), || {
        mail_reply().starts_with("250")
    });
    let again = send_message(&m, "later@example.org", 4 * 1024);
    assert!(again.starts_with("250 2.0.0 Ok: queued as"), "{again}");
    assert_eq!(m.log_json("kept@example.org").len(), 1);
}
