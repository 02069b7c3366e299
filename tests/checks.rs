//! Checks before sending (issue: bounces, §6) and direct-to-MX routing through a real DNS
//! server on loopback: recipients whose domain does not exist or has a null MX are recorded
//! `rejected` without a delivery attempt, a temporary DNS failure never rejects nor holds the
//! RCPT reply, bad syntax gets `553 5.1.3` and a record, and suppressed addresses can be
//! refused at RCPT.

mod common;

use std::time::{Duration, Instant};

use common::mailtrail::{Mailtrail, RawSmtp, receipt_in, wait_until};
use common::test_dns::TestDns;
use common::test_mx::{Script, TestMx};

fn start(nameserver: std::net::SocketAddr, mx_port: u16, extra: &str) -> Mailtrail {
    Mailtrail::start_with(
        "",
        "",
        &format!(
            "[dns]\nnameservers = [\"{nameserver}\"]\ntimeout = \"300ms\"\n\
             [delivery]\nmx_port = {mx_port}\nretry_first = \"1h\"\n\
             [checks]\ndomain_check_timeout = \"300ms\"\n{extra}\n"
        ),
    )
}

/// A scripted MX for good.test, a DNS server that also knows nxd.test (NXDOMAIN),
/// nullmx.test (null MX) and flaky.test (SERVFAIL), and mailtrail resolving through it.
async fn live_and_dead_domains() -> (TestMx, TestDns, Mailtrail) {
    let mx = TestMx::start(Script::default()).await;
    let dns = TestDns::start().await;
    dns.zone
        .mx("good.test", 10, "mx.good.test")
        .addr("mx.good.test", "127.0.0.1".parse().unwrap())
        .nxdomain("nxd.test")
        .null_mx("nullmx.test")
        .servfail("flaky.test");
    let m = start(dns.addr, mx.port(), "");
    (mx, dns, m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_domains_are_rejected_without_attempt_and_live_ones_go_to_their_mx() {
    let (mx, _dns, m) = live_and_dead_domains().await;

    let mut c = RawSmtp::connect(m.smtp);
    assert!(c.cmd("EHLO app.test").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<app@example.com>").starts_with("250"));
    for r in ["a@good.test", "b@nxd.test", "c@nullmx.test", "d@flaky.test"] {
        let reply = c.cmd(&format!("RCPT TO:<{r}>"));
        assert!(reply.starts_with("250"), "{r}: {reply}");
    }
    // Bad syntax: refused, and recorded with the message.
    let reply = c.cmd("RCPT TO:<broken@@good.test>");
    assert!(reply.starts_with("553 5.1.3"), "{reply}");
    assert!(c.cmd("DATA").starts_with("354"));
    let reply = c.cmd("Subject: checks\r\n\r\nhi\r\n.");
    let receipt = receipt_in(&reply).unwrap();

    wait_until("a delivered via its MX", Duration::from_secs(30), || {
        m.recipient(&receipt, "a@good.test")["status"] == "delivered"
    });
    let b = m.recipient(&receipt, "b@nxd.test");
    assert_eq!(
        (b["status"].as_str(), b["reason"].as_str()),
        (Some("rejected"), Some("hostunknown")),
        "{b}"
    );
    let c_ = m.recipient(&receipt, "c@nullmx.test");
    assert_eq!(
        (c_["status"].as_str(), c_["reason"].as_str()),
        (Some("rejected"), Some("notaccept")),
        "{c_}"
    );
    // Counted for ops, by reason.
    let (_, metrics) = m.http_get("/metrics");
    for line in [
        "domain_check_rejections_total{outcome=\"hostunknown\"} 1",
        "domain_check_rejections_total{outcome=\"notaccept\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing in\n{metrics}");
    }
    let broken = m.recipient(&receipt, "broken@@good.test");
    assert_eq!(
        (broken["status"].as_str(), broken["reason"].as_str()),
        (Some("rejected"), Some("syntaxerror")),
        "{broken}"
    );
    // SERVFAIL: accepted, then deferred by delivery (temporary), never rejected.
    wait_until("d deferred", Duration::from_secs(30), || {
        m.recipient(&receipt, "d@flaky.test")["status"] == "deferred"
    });
    // Only a@good.test reached an MX.
    let seen: Vec<String> = mx
        .transactions()
        .iter()
        .flat_map(|t| t.rcpt_to.clone())
        .collect();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].contains("a@good.test"), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn address_literals_are_relayed_to_their_address_for_relay_clients_only() {
    let v4 = TestMx::start(Script::default()).await;
    // The same port on the IPv6 loopback: mx_port is one for all.
    let v6 = TestMx::start_on(&format!("[::1]:{}", v4.port()), Script::default()).await;
    let dns = TestDns::start().await;
    let m = start(dns.addr, v4.port(), "");

    let mut c = RawSmtp::connect(m.smtp);
    assert!(c.cmd("EHLO app.test").starts_with("250"));
    // Before, smtp-proto refused every literal as bad syntax (553 5.1.7 / 553 5.1.3).
    let reply = c.cmd("MAIL FROM:<app@[127.0.0.1]>");
    assert!(reply.starts_with("250"), "{reply}");
    for r in ["user@[127.0.0.1]", "user@[IPv6:::1]"] {
        let reply = c.cmd(&format!("RCPT TO:<{r}>"));
        assert!(reply.starts_with("250"), "{r}: {reply}");
    }
    // A literal of no single host is refused, and recorded.
    let reply = c.cmd("RCPT TO:<nobody@[0.0.0.0]>");
    assert!(reply.starts_with("553 5.1.3"), "{reply}");
    assert!(c.cmd("DATA").starts_with("354"));
    let reply = c.cmd("Subject: literals\r\n\r\nhi\r\n.");
    let receipt = receipt_in(&reply).unwrap_or_else(|| panic!("{reply}"));

    for r in ["user@[127.0.0.1]", "user@[IPv6:::1]"] {
        wait_until(&format!("{r} delivered"), Duration::from_secs(30), || {
            m.recipient(&receipt, r)["status"] == "delivered"
        });
    }
    let sent_to = |mx: &TestMx| -> Vec<(String, Vec<String>)> {
        mx.transactions()
            .into_iter()
            .map(|t| (t.mail_from, t.rcpt_to))
            .collect()
    };
    let seen = sent_to(&v4);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].0.starts_with("<app@[127.0.0.1]>"), "{seen:?}");
    assert_eq!(seen[0].1.len(), 1, "{seen:?}");
    assert!(seen[0].1[0].starts_with("<user@[127.0.0.1]>"), "{seen:?}");
    let seen = sent_to(&v6);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].1[0].starts_with("<user@[IPv6:::1]>"), "{seen:?}");
    let nobody = m.recipient(&receipt, "nobody@[0.0.0.0]");
    assert_eq!(nobody["status"], "rejected", "{nobody}");

    // Never an open relay: a client outside relay_networks gets no literal either.
    let outside = Mailtrail::start_with(
        "",
        "relay_networks = [\"10.0.0.0/8\"]\n",
        "[delivery]\nenabled = false\n",
    );
    let mut c = RawSmtp::connect(outside.smtp);
    assert!(c.cmd("EHLO outside.test").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<a@[127.0.0.1]>").starts_with("250"));
    let reply = c.cmd("RCPT TO:<victim@[127.0.0.1]>");
    assert!(reply.starts_with("554 5.7.1"), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_resolver_never_rejects_and_never_holds_rcpt_long() {
    // A nameserver that never answers: every lookup times out.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let m = start(silent.local_addr().unwrap(), 25, "");
    let mut c = RawSmtp::connect(m.smtp);
    assert!(c.cmd("EHLO app.test").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<app@example.com>").starts_with("250"));
    let started = Instant::now();
    let reply = c.cmd("RCPT TO:<x@unreachable-dns.test>");
    let waited = started.elapsed();
    assert!(reply.starts_with("250"), "{reply}");
    // The bound is 300 ms; far below the resolver's own retries (seconds).
    assert!(waited < Duration::from_secs(3), "RCPT held for {waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn suppressed_address_refused_at_rcpt_when_configured() {
    let dns = TestDns::start().await;
    let m = start(dns.addr, 25, "[suppression]\naction = \"refuse\"\n");
    m.cli_ok(&[
        "suppress",
        "add",
        "Gone@Example.org",
        "--reason",
        "userunknown",
    ]);
    let list = m.cli_ok(&["suppress", "list"]);
    assert!(list.to_lowercase().contains("gone@example.org"), "{list}");
    // Added again without a reason, the entry keeps its own.
    m.cli_ok(&["suppress", "add", "gone@example.org"]);
    let again = m.cli_ok(&["suppress", "check", "gone@example.org"]);
    let row: Vec<&str> = again
        .lines()
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(row.get(1), Some(&"userunknown"), "{again}");
    // A reason is shown in the list and in every suppressed recipient's text: not empty,
    // not a terminal control, not a page long.
    for bad in ["", "  ", "a\u{1b}[2Jb", &"r".repeat(201)] {
        let out = m.cli(&["suppress", "add", "x@example.org", "--reason", bad]);
        assert!(!out.status.success(), "{bad:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("1 to 200 characters") && !err.contains('\u{1b}'),
            "{err}"
        );
    }
    let mut c = RawSmtp::connect(m.smtp);
    assert!(c.cmd("EHLO app.test").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<app@example.com>").starts_with("250"));
    let reply = c.cmd("RCPT TO:<gone@example.org>");
    assert!(reply.starts_with("550 5.7.1"), "{reply}");
    assert!(reply.contains("suppressed"), "{reply}");
    m.cli_ok(&["suppress", "remove", "gone@example.org"]);
    assert!(
        !m.cli(&["suppress", "check", "gone@example.org"])
            .status
            .success()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recipients_decided_at_accept_get_a_failure_dsn_as_any_failure_after_250() {
    let (mx, _dns, m) = live_and_dead_domains().await;
    m.cli_ok(&[
        "suppress",
        "add",
        "gone@good.test",
        "--reason",
        "userunknown",
    ]);

    let mut c = RawSmtp::connect(m.smtp);
    assert!(c.cmd("EHLO app.test").starts_with("250"));
    assert!(
        c.cmd("MAIL FROM:<app@good.test> ENVID=run-7")
            .starts_with("250")
    );
    for r in [
        "<a@good.test>",
        "<b@nxd.test>",
        "<gone@good.test> NOTIFY=FAILURE,DELAY",
        // Asked for no DSN, and one the client was refused at RCPT: nothing about them.
        "<c@nullmx.test> NOTIFY=NEVER",
    ] {
        let reply = c.cmd(&format!("RCPT TO:{r}"));
        assert!(reply.starts_with("250"), "{r}: {reply}");
    }
    assert!(c.cmd("RCPT TO:<broken@@good.test>").starts_with("553"));
    assert!(c.cmd("DATA").starts_with("354"));
    let receipt = receipt_in(&c.cmd("Subject: decided\r\n\r\nhi\r\n.")).unwrap();
    assert_eq!(
        m.recipient(&receipt, "gone@good.test")["status"],
        "suppressed"
    );

    wait_until(
        "the DSN reaches the sender's MX",
        Duration::from_secs(30),
        || {
            mx.transactions()
                .iter()
                .any(|t| t.mail_from.starts_with("<>"))
        },
    );
    let transactions = mx.transactions();
    let dsns: Vec<_> = transactions
        .iter()
        .filter(|t| t.mail_from.starts_with("<>"))
        .collect();
    assert_eq!(dsns.len(), 1, "one DSN for both");
    assert!(
        dsns[0].rcpt_to[0].contains("app@good.test"),
        "{:?}",
        dsns[0].rcpt_to
    );
    let body = String::from_utf8_lossy(&dsns[0].body);
    for needle in [
        "report-type=delivery-status",
        "Original-Envelope-Id: run-7",
        "Final-Recipient: rfc822; b@nxd.test",
        "Status: 5.1.2",
        "Final-Recipient: rfc822; gone@good.test",
        "Status: 5.7.1",
        "Diagnostic-Code: x-local; Recipient address suppressed",
    ] {
        assert!(body.contains(needle), "{needle} missing in {body}");
    }
    assert!(
        !body.contains("Final-Recipient: rfc822; c@nullmx.test"),
        "{body}"
    );
    assert!(!body.contains("Final-Recipient: rfc822; broken"), "{body}");
    assert!(
        !body.contains("Final-Recipient: rfc822; a@good.test"),
        "{body}"
    );
}
