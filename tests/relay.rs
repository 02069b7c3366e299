//! Delivery end to end through the real binary (issue: deliver and record): a scripted MX
//! answers chosen replies per recipient, and the mail log, the queue and the DSN sent back to
//! the sender show exactly what happened. One test relays through a real Postfix smarthost.

mod common;

use std::time::Duration;

use common::disk::{SmallDisk, fill};
use common::mailtrail::{Mailtrail, python, wait_until};
use common::postfix::Postfix;
use common::test_dns::TestDns;
use common::test_mx::{Script, TestMx};

fn relay_to(port: u16, delivery_extra: &str) -> Mailtrail {
    Mailtrail::start_with("", "", &relay_tables(port, delivery_extra))
}

/// Config tables that relay everything to 127.0.0.1:`port`, with quick retries.
fn relay_tables(port: u16, delivery_extra: &str) -> String {
    format!(
        "[delivery]\nretry_first = \"1s\"\nretry_max_interval = \"2s\"\n{delivery_extra}\n\
         [checks]\ndomain_check = false\n\
         [[route]]\ndomains = [\"*\"]\nmx = [\"127.0.0.1:{port}\"]\ntls = \"none\"\n"
    )
}

fn is_final(status: &serde_json::Value) -> bool {
    matches!(
        status.as_str(),
        Some("delivered" | "failed" | "expired" | "bounced" | "suppressed" | "rejected")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_delivered_failed_and_retried_recipients_and_sends_a_dsn() {
    let mx = TestMx::start(
        Script::default()
            .rcpt(
                "gone@dest.test",
                &["550 5.1.1 <gone@dest.test>: Recipient address rejected: User unknown"],
            )
            .rcpt(
                "later@dest.test",
                &[
                    "451 4.3.0 <later@dest.test>: Temporary lookup failure",
                    "250 2.1.5 Ok",
                ],
            ),
    )
    .await;
    let m = relay_to(mx.port(), "");
    let receipt = m.submit(
        None,
        "app@example.com",
        &["ok@dest.test", "gone@dest.test", "later@dest.test"],
        "three",
    );
    wait_until("all three final", Duration::from_secs(60), || {
        ["ok@dest.test", "gone@dest.test", "later@dest.test"]
            .iter()
            .all(|a| is_final(&m.recipient(&receipt, a)["status"]))
    });

    let ok = m.recipient(&receipt, "ok@dest.test");
    assert_eq!(ok["status"], "delivered", "{ok}");
    assert_eq!(ok["last_reply_code"], 250);
    assert_eq!(ok["last_reply_text"], "Ok: queued as TEST1", "{ok}");

    let gone = m.recipient(&receipt, "gone@dest.test");
    assert_eq!(gone["status"], "failed", "{gone}");
    assert_eq!(gone["last_reply_code"], 550);
    assert_eq!(gone["last_enhanced_status"], "5.1.1");
    assert_eq!(
        gone["last_reply_text"],
        "<gone@dest.test>: Recipient address rejected: User unknown"
    );
    assert_eq!(gone["reason"], "userunknown", "{gone}");
    assert_eq!(gone["bounce_type"], "hard", "{gone}");

    let later = m.recipient(&receipt, "later@dest.test");
    assert_eq!(later["status"], "delivered", "{later}");
    let attempts: Vec<&serde_json::Value> = later["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["reply_code"].is_number())
        .collect();
    assert_eq!(attempts.len(), 2, "{later}");
    assert_eq!(attempts[0]["status"], "deferred");
    assert_eq!(attempts[0]["reply_code"], 451);
    assert_eq!(attempts[0]["enhanced_status"], "4.3.0");
    assert_eq!(attempts[1]["status"], "delivered");
    // Decided at DATA: the RCPT reply is kept beside the DATA reply.
    assert_eq!(attempts[1]["stage"], "data");
    assert_eq!(attempts[1]["rcpt_reply"]["code"], 250);
    assert_eq!(attempts[1]["rcpt_reply"]["text"], "Ok");
    assert_eq!(attempts[1]["reply_text"], "Ok: queued as TEST1");
    assert!(
        attempts[0]["rcpt_reply"].is_null(),
        "decided at RCPT: {later}"
    );
    assert_eq!(attempts[0]["remote_ip"], "127.0.0.1");
    // The route's port, not 25, is recorded and shown: one address can serve several routes.
    assert_eq!(attempts[0]["remote_port"], mx.port());

    // The text log shows the remote replies verbatim.
    let text = m.cli_ok(&["log", &receipt]);
    assert!(
        text.contains("Recipient address rejected: User unknown"),
        "{text}"
    );
    assert!(text.contains("451 4.3.0"), "{text}");
    assert!(
        text.contains(&format!(" 127.0.0.1 [127.0.0.1]:{} ", mx.port())),
        "{text}"
    );
    assert!(text.contains("RCPT: 250 2.1.5 Ok"), "{text}");
    assert!(
        text.contains("DATA: 250 2.0.0 Ok: queued as TEST1"),
        "{text}"
    );

    // The sender got a DSN (null sender, multipart/report) for the failed recipient only.
    wait_until("DSN relayed", Duration::from_secs(30), || {
        mx.transactions()
            .iter()
            .any(|t| t.mail_from.starts_with("<>") && t.accepted)
    });
    let dsn = mx
        .transactions()
        .into_iter()
        .find(|t| t.mail_from.starts_with("<>"))
        .unwrap();
    assert!(
        dsn.rcpt_to[0].contains("app@example.com"),
        "{:?}",
        dsn.rcpt_to
    );
    let body = String::from_utf8_lossy(&dsn.body);
    assert!(body.contains("report-type=delivery-status"), "{body}");
    assert!(
        body.contains("Final-Recipient: rfc822; gone@dest.test"),
        "{body}"
    );
    assert!(body.contains("Action: failed"), "{body}");
    assert!(body.contains("Status: 5.1.1"), "{body}");
    // RFC 3464 §2.3.5: a `dns` MTA name is a host name, without the port.
    assert!(body.contains("Remote-MTA: dns; 127.0.0.1\r\n"), "{body}");
    assert!(
        !body.contains("Final-Recipient: rfc822; ok@dest.test"),
        "{body}"
    );
    assert!(
        !body.contains("Final-Recipient: rfc822; later@dest.test"),
        "{body}"
    );
    // No DSN for a null-sender message (the DSN itself) was generated in turn.
    assert_eq!(
        mx.transactions()
            .iter()
            .filter(|t| t.mail_from.starts_with("<>"))
            .count(),
        1
    );
}

/// Appends `[[route]] domains = [domain] mx = [to]` to an instance's config.
fn add_route(m: &Mailtrail, domain: &str, to: std::net::SocketAddr) {
    add_route_hops(m, domain, &[to]);
}

/// Appends `[[route]] domains = [domain] mx = hops` to an instance's config.
fn add_route_hops(m: &Mailtrail, domain: &str, hops: &[std::net::SocketAddr]) {
    let hops: Vec<String> = hops.iter().map(|h| format!("\"{h}\"")).collect();
    let mut config = std::fs::read_to_string(&m.config_path).unwrap();
    config.push_str(&format!(
        "[[route]]\ndomains = [\"{domain}\"]\nmx = [{}]\ntls = \"none\"\n",
        hops.join(", ")
    ));
    std::fs::write(&m.config_path, config).unwrap();
}

fn failed_recipients(log: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    log.iter()
        .map(|msg| &msg["recipients"][0])
        .filter(|r| r["status"] == "failed")
        .collect()
}

#[test]
fn a_route_back_to_itself_fails_at_once_as_a_loop() {
    let mut m = Mailtrail::configure(
        "",
        "",
        "[checks]\ndomain_check = false\n[delivery]\ndsn = false\n",
    );
    add_route(&m, "loop.test", m.smtp);
    m.spawn();
    m.submit(None, "app@example.com", &["x@loop.test"], "round and round");
    wait_until("the loop refused", Duration::from_secs(30), || {
        !failed_recipients(&m.log_json("x@loop.test")).is_empty()
    });
    let log = m.log_json("x@loop.test");
    assert_eq!(log.len(), 1, "never relayed to itself: {log:?}");
    let failed = failed_recipients(&log);
    assert_eq!(failed[0]["last_enhanced_status"], "5.4.6", "{log:?}");
    let text = failed[0]["last_reply_text"].as_str().unwrap();
    // Named by the route's next hop, as Postfix names a relayhost.
    let me = m.smtp.to_string();
    assert!(
        text.contains(&format!(
            "mail for {me} loops back to myself (127.0.0.1 [{me}]"
        )),
        "{text}"
    );
}

/// A route can take an address literal: mail to `u@[192.0.2.77]` (where nothing listens)
/// goes to the route's next hop instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_route_takes_the_mail_for_an_address_literal() {
    let mx = TestMx::start(Script::default()).await;
    let mut m = Mailtrail::configure(
        "",
        "",
        "[checks]\ndomain_check = false\n[delivery]\ndsn = false\n",
    );
    add_route(
        &m,
        "[192.0.2.77]",
        format!("127.0.0.1:{}", mx.port()).parse().unwrap(),
    );
    m.spawn();
    let receipt = m.submit(None, "app@example.com", &["u@[192.0.2.77]"], "to a literal");
    wait_until("delivered by the route", Duration::from_secs(30), || {
        m.recipient(&receipt, "u@[192.0.2.77]")["status"] == "delivered"
    });
    assert_eq!(mx.transactions()[0].rcpt_to, ["<u@[192.0.2.77]>"]);
}

/// A route's hops are a list tried in order, not MX preferences: the hop that is this
/// server is skipped and the one after it takes the mail.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_route_hop_that_is_this_server_is_skipped_for_the_next() {
    let mx = TestMx::start(Script::default()).await;
    let mut m = Mailtrail::configure(
        "",
        "",
        "[checks]\ndomain_check = false\n[delivery]\ndsn = false\n",
    );
    let mx_addr = format!("127.0.0.1:{}", mx.port()).parse().unwrap();
    add_route_hops(&m, "hops.test", &[m.smtp, mx_addr]);
    m.spawn();
    let receipt = m.submit(None, "app@example.com", &["x@hops.test"], "second hop");
    wait_until(
        "delivered by the second hop",
        Duration::from_secs(30),
        || m.recipient(&receipt, "x@hops.test")["status"] == "delivered",
    );
    assert_eq!(mx.transactions().len(), 1);
    assert_eq!(
        m.log_json("x@hops.test").len(),
        1,
        "never relayed to itself"
    );
}

/// A port on loopback where nothing listens: bound, learnt, closed.
fn dead_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// The hops an attempt tried before the one that answered are recorded on it: the log
/// names each, its step and its reply or error, in text and JSON. The outcome stays the
/// answering hop's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hops_that_failed_before_the_one_that_delivered_are_in_the_log() {
    let dead = dead_port();
    let busy = TestMx::start(Script {
        banner: "421 4.3.2 busy, try later".into(),
        ..Default::default()
    })
    .await;
    let good = TestMx::start(Script::default()).await;
    let mut m = Mailtrail::configure(
        "",
        "",
        "[checks]\ndomain_check = false\n[delivery]\ndsn = false\n",
    );
    add_route_hops(&m, "hops.test", &[dead, busy.addr, good.addr]);
    m.spawn();
    let receipt = m.submit(None, "app@example.com", &["x@hops.test"], "third hop");
    wait_until(
        "delivered by the third hop",
        Duration::from_secs(30),
        || m.recipient(&receipt, "x@hops.test")["status"] == "delivered",
    );
    assert_eq!(good.transactions().len(), 1);
    let rc = m.recipient(&receipt, "x@hops.test");
    let events = rc["events"].as_array().unwrap();
    let attempt = events.iter().find(|e| e["kind"] == "attempt").unwrap();
    assert_eq!(attempt["remote_port"], good.port(), "{attempt}");
    assert_eq!(attempt["reply_code"], 250);
    let tried = attempt["tried_first"].as_array().unwrap();
    assert_eq!(tried.len(), 2, "{attempt}");
    assert_eq!(
        tried[0]["hop"],
        format!("127.0.0.1[127.0.0.1]:{}", dead.port())
    );
    assert_eq!(tried[0]["step"], "connect");
    assert_eq!(tried[0]["reply_code"], serde_json::Value::Null);
    assert!(
        tried[0]["text"].as_str().unwrap().contains("refused"),
        "{tried:?}"
    );
    assert_eq!(
        tried[1]["hop"],
        format!("127.0.0.1[127.0.0.1]:{}", busy.port())
    );
    assert_eq!(tried[1]["step"], "greeting");
    assert_eq!(tried[1]["reply_code"], 421);
    assert_eq!(tried[1]["enhanced_status"], "4.3.2");
    assert_eq!(tried[1]["text"], "421 4.3.2 busy, try later");
    let text = m.cli_ok(&["log", &receipt]);
    assert!(
        text.contains(&format!(
            "\n      tried first: 127.0.0.1[127.0.0.1]:{} at greeting: 421 4.3.2 busy, try later\n",
            busy.port()
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "\n      tried first: 127.0.0.1[127.0.0.1]:{} at connect: ",
            dead.port()
        )),
        "{text}"
    );
    // The search page shows them too.
    if let Some(page) = common::mailtrail::page_dom(m.http, &format!("/?q={receipt}")) {
        assert!(
            page.contains(&format!(
                "tried first: 127.0.0.1[127.0.0.1]:{} at greeting: 421 4.3.2 busy, try later",
                busy.port()
            )),
            "{page}"
        );
    }
}

/// When every hop fails, the last one's failure is the recorded result as before, and the
/// ones before it are listed with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_every_hop_fails_the_last_is_the_result_and_the_others_are_listed() {
    let dead = dead_port();
    let busy = TestMx::start(Script {
        banner: "421 4.3.2 busy, try later".into(),
        ..Default::default()
    })
    .await;
    let mut m = Mailtrail::configure(
        "",
        "",
        "[checks]\ndomain_check = false\n[delivery]\ndsn = false\nretry_first = \"1h\"\n",
    );
    add_route_hops(&m, "hops.test", &[dead, busy.addr]);
    m.spawn();
    let receipt = m.submit(None, "app@example.com", &["x@hops.test"], "no hop");
    wait_until("deferred", Duration::from_secs(30), || {
        m.recipient(&receipt, "x@hops.test")["status"] == "deferred"
    });
    let rc = m.recipient(&receipt, "x@hops.test");
    assert_eq!(rc["last_reply_code"], 421, "{rc}");
    let attempt = common::mailtrail::event_of(&rc, "attempt");
    assert_eq!(attempt["remote_port"], busy.port(), "{attempt}");
    assert_eq!(attempt["reply_code"], 421);
    let tried = attempt["tried_first"].as_array().unwrap();
    assert_eq!(tried.len(), 1, "{attempt}");
    assert_eq!(
        tried[0]["hop"],
        format!("127.0.0.1[127.0.0.1]:{}", dead.port())
    );
    assert_eq!(tried[0]["step"], "connect");
}

#[test]
fn a_next_hop_on_a_proxy_interface_is_this_server() {
    // 192.0.2.25 (TEST-NET-1) stands for the public address a NAT forwards to this server:
    // nothing listens there, so only the loop check can give an answer within the wait.
    let mut m = Mailtrail::configure(
        "",
        "proxy_interfaces = [\"192.0.2.25\"]\n",
        "[checks]\ndomain_check = false\n[delivery]\ndsn = false\n",
    );
    add_route(&m, "nat.test", "192.0.2.25:25".parse().unwrap());
    m.spawn();
    m.submit(None, "app@example.com", &["x@nat.test"], "through the NAT");
    wait_until("the loop refused", Duration::from_secs(30), || {
        !failed_recipients(&m.log_json("x@nat.test")).is_empty()
    });
    let log = m.log_json("x@nat.test");
    let failed = failed_recipients(&log);
    assert_eq!(failed[0]["last_enhanced_status"], "5.4.6", "{log:?}");
    let text = failed[0]["last_reply_text"].as_str().unwrap();
    assert!(text.contains("loops back to myself (192.0.2.25"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_mx_that_is_this_server_is_a_loop_not_a_relay() {
    let dns = TestDns::start().await;
    dns.zone
        .mx("self.test", 10, "mx.self.test")
        .addr("mx.self.test", "127.0.0.1".parse().unwrap());
    let mut m = Mailtrail::configure(
        "",
        "",
        &format!(
            "[dns]\nnameservers = [\"{}\"]\ntimeout = \"300ms\"\n\
             [checks]\ndomain_check = false\n[delivery]\ndsn = false\n",
            dns.addr
        ),
    );
    // The MX port is this server's own.
    let mut config = std::fs::read_to_string(&m.config_path).unwrap();
    config = config.replace(
        "[delivery]\n",
        &format!("[delivery]\nmx_port = {}\n", m.smtp.port()),
    );
    std::fs::write(&m.config_path, config).unwrap();
    m.spawn();
    m.submit(None, "app@example.com", &["x@self.test"], "to myself");
    wait_until("the loop refused", Duration::from_secs(30), || {
        !failed_recipients(&m.log_json("x@self.test")).is_empty()
    });
    let log = m.log_json("x@self.test");
    assert_eq!(log.len(), 1, "never relayed to itself: {log:?}");
    let text = failed_recipients(&log)[0]["last_reply_text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        text.contains("mail for self.test loops back to myself (mx.self.test"),
        "{text}"
    );
}

#[test]
fn two_relays_routing_to_each_other_end_at_max_hops() {
    let tables = "[checks]\ndomain_check = false\n[delivery]\ndsn = false\n";
    let mut a = Mailtrail::configure("", "max_hops = 5\n", tables);
    let mut b = Mailtrail::configure("", "max_hops = 5\n", tables);
    add_route(&a, "loop.test", b.smtp);
    add_route(&b, "loop.test", a.smtp);
    a.spawn();
    b.spawn();
    a.submit(None, "app@example.com", &["x@loop.test"], "round and round");
    // Each hop is a message of its own; the sixth arrives with six Received: fields.
    let both = || {
        let mut log = a.log_json("x@loop.test");
        log.extend(b.log_json("x@loop.test"));
        log
    };
    wait_until("the loop refused", Duration::from_secs(60), || {
        !failed_recipients(&both()).is_empty()
    });
    let log = both();
    assert_eq!(log.len(), 6, "one message per hop, then no more: {log:?}");
    let failed = failed_recipients(&log);
    assert_eq!(failed.len(), 1, "{log:?}");
    assert_eq!(failed[0]["last_reply_code"], 554);
    assert_eq!(failed[0]["last_enhanced_status"], "5.4.6");
    let text = failed[0]["last_reply_text"].as_str().unwrap();
    assert!(text.contains("mail forwarding loop"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_log_shows_a_deferred_recipients_attempts_and_next_attempt() {
    let mx = TestMx::start(
        Script::default().rcpt("later@dest.test", &["451 4.7.1 greylisted, try later"]),
    )
    .await;
    let m = Mailtrail::start_with(
        "",
        "",
        &format!(
            "[delivery]\nretry_first = \"1h\"\n[checks]\ndomain_check = false\n\
             [[route]]\ndomains = [\"*\"]\nmx = [\"127.0.0.1:{}\"]\ntls = \"none\"\n",
            mx.port()
        ),
    );
    let receipt = m.submit(
        None,
        "app@example.com",
        &["ok@dest.test", "later@dest.test"],
        "greylisted",
    );
    wait_until("later deferred", Duration::from_secs(30), || {
        m.recipient(&receipt, "later@dest.test")["status"] == "deferred"
            && m.recipient(&receipt, "ok@dest.test")["status"] == "delivered"
    });
    let later = m.recipient(&receipt, "later@dest.test");
    assert_eq!(later["attempts"], 1, "{later}");
    let next_ms = later["next_attempt_at_ms"]
        .as_i64()
        .expect("a next attempt");
    let now_ms = chrono::Utc::now().timestamp_millis();
    assert!(next_ms > now_ms + 1_800_000, "{later}");
    let next = later["next_attempt_at"].as_str().unwrap().to_string();
    assert!(next.ends_with('Z') && next.len() == 24, "{next}");
    // As `queue list` has them.
    let queue: serde_json::Value =
        serde_json::from_str(m.cli_ok(&["queue", "list", "--json"]).trim()).unwrap();
    assert_eq!(queue["attempts"], 1, "{queue}");
    assert_eq!(queue["next_attempt_at_ms"], next_ms, "{queue}");
    // A delivered recipient has made its attempt and waits for none.
    let ok = m.recipient(&receipt, "ok@dest.test");
    assert_eq!(ok["attempts"], 1, "{ok}");
    assert!(ok["next_attempt_at"].is_null(), "{ok}");
    let text = m.cli_ok(&["log", &receipt]);
    assert!(
        text.contains(&format!(
            "to <later@dest.test>: deferred (blocked, soft), 1 attempt, next attempt {next}: 451 4.7.1"
        )),
        "{text}"
    );
    assert!(text.contains("to <ok@dest.test>: delivered: 250"), "{text}");
    let (_, body) = m.http_get(&format!("/api/log/{receipt}"));
    let api: serde_json::Value = serde_json::from_str(&body).unwrap();
    let api_later = api[0]["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["address"] == "later@dest.test")
        .unwrap();
    assert_eq!(api_later["attempts"], 1, "{body}");
    assert_eq!(api_later["next_attempt_at"], next.as_str(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_list_retry_and_delete() {
    let mx =
        TestMx::start(Script::default().rcpt("slow@dest.test", &["421 4.7.0 try later"])).await;
    // Retries an hour apart: the recipient stays deferred unless an admin acts.
    let m = Mailtrail::start_with(
        "",
        "",
        &format!(
            "[delivery]\nretry_first = \"1h\"\n\
             [checks]\ndomain_check = false\n\
             [[route]]\ndomains = [\"*\"]\nmx = [\"127.0.0.1:{}\"]\ntls = \"none\"\n",
            mx.port()
        ),
    );
    let receipt = m.submit(None, "app@example.com", &["slow@dest.test"], "queued");
    wait_until("deferred", Duration::from_secs(30), || {
        m.recipient(&receipt, "slow@dest.test")["status"] == "deferred"
    });
    let list = m.cli_ok(&["queue", "list"]);
    assert!(
        list.contains(&receipt) && list.contains("slow@dest.test"),
        "{list}"
    );
    assert!(list.contains("421"), "{list}");

    // Every attempt sends MAIL, on a new connection or a pooled one (refused at RCPT, it
    // never reaches DATA, so the MX's transaction list does not show it).
    let mails = || {
        mx.commands()
            .iter()
            .filter(|c| c.to_ascii_uppercase().starts_with("MAIL FROM:"))
            .count()
    };
    let attempts_before = mails();
    let out = m.cli_ok(&["queue", "retry", &receipt]);
    assert!(out.contains('1'), "{out}");
    wait_until("a new attempt", Duration::from_secs(30), || {
        mails() > attempts_before
    });

    let out = m.cli_ok(&["queue", "delete", &receipt]);
    assert!(out.contains('1'), "{out}");
    let r = m.recipient(&receipt, "slow@dest.test");
    assert_eq!(r["status"], "failed", "{r}");
    assert!(
        r["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "deleted"),
        "{r}"
    );
    let list = m.cli_ok(&["queue", "list"]);
    assert!(!list.contains(&receipt), "{list}");

    // Nothing pending any more: said so, and not an error. A receipt the store does not
    // hold is one.
    let out = m.cli_ok(&["queue", "delete", &receipt]);
    assert!(out.contains("no pending recipients"), "{out}");
    let unknown = "01JD0000000000000000000000";
    for command in ["delete", "retry"] {
        let out = m.cli(&["queue", command, unknown]);
        assert!(!out.status.success(), "queue {command}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no message with receipt"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_delivery_leaves_every_recipient_with_one_final_status() {
    let mx = TestMx::start(Script {
        reply_delay: Duration::from_millis(30),
        ..Script::default()
    })
    .await;
    // At most this many transactions are in flight when the process dies, and only their
    // recipients can be delivered twice (remote 250 sent, not yet recorded here).
    const CONCURRENCY: usize = 4;
    let mut m = relay_to(
        mx.port(),
        &format!("max_connections_per_destination = {CONCURRENCY}"),
    );
    let mut receipts = Vec::new();
    for i in 0..20 {
        receipts.push(m.submit(None, "app@example.com", &[&format!("r{i}@dest.test")], "k9"));
    }
    // Kill while deliveries are in flight.
    wait_until("some delivered", Duration::from_secs(30), || {
        mx.transactions().iter().filter(|t| t.accepted).count() >= 3
    });
    m.kill9();
    m.spawn();
    wait_until(
        "all delivered after restart",
        Duration::from_secs(60),
        || {
            receipts
                .iter()
                .enumerate()
                .all(|(i, r)| m.recipient(r, &format!("r{i}@dest.test"))["status"] == "delivered")
        },
    );
    for (i, r) in receipts.iter().enumerate() {
        let rec = m.recipient(r, &format!("r{i}@dest.test"));
        let delivered_events = rec["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["status"] == "delivered")
            .count();
        assert_eq!(delivered_events, 1, "{rec}");
    }
    // Only recipients whose 250 was sent but not yet recorded may go out twice: at most one
    // per transaction in flight at the kill.
    let accepted = mx.transactions().iter().filter(|t| t.accepted).count();
    assert!(
        (20..=20 + CONCURRENCY).contains(&accepted),
        "{accepted} deliveries"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delivery_the_full_disk_cannot_record_is_not_sent_again() {
    let mx = TestMx::start(Script {
        reply_delay: Duration::from_millis(300),
        ..Script::default()
    })
    .await;
    let mut m = Mailtrail::configure("", "min_free_space = 0\n", &relay_tables(mx.port(), ""));
    let Some(_disk) = SmallDisk::mount(&m.data_dir(), "8m") else {
        return;
    };
    m.spawn();
    let receipt = m.submit(None, "app@example.com", &["full@dest.test"], "disk");
    // The MX takes its time; the disk fills up while the transaction runs, so the remote
    // 250 cannot be recorded.
    let filler = m.data_dir().join("filler");
    fill(&filler);
    let accepted = || mx.transactions().iter().filter(|t| t.accepted).count();
    wait_until(
        "the MX accepted the message",
        Duration::from_secs(30),
        || accepted() >= 1,
    );
    // From now on the MX answers at once: a relay that delivered again whenever it could not
    // record would send copy after copy.
    mx.set_script(|s| s.reply_delay = Duration::ZERO);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(accepted(), 1, "{}", m.server_log());
    assert_eq!(m.recipient(&receipt, "full@dest.test")["status"], "queued");
    assert!(
        m.server_log().contains("cannot record delivery attempts"),
        "{}",
        m.server_log()
    );

    // Space again: the attempt the remote accepted is recorded, without another delivery.
    std::fs::remove_file(&filler).unwrap();
    wait_until("recorded as delivered", Duration::from_secs(30), || {
        m.recipient(&receipt, "full@dest.test")["status"] == "delivered"
    });
    let rec = m.recipient(&receipt, "full@dest.test");
    let attempts = rec["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "attempt")
        .count();
    assert_eq!(attempts, 1, "{rec}");
    assert_eq!(accepted(), 1);
}

/// While the full disk keeps a delivery from being recorded, no other mail goes out: each
/// would be one more remote `250` (or `451`) the store cannot take, delivered again after a
/// crash. Before, the next retry of every queued message went out. Once the record is in,
/// delivery resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn while_the_full_disk_keeps_an_attempt_unrecorded_no_other_mail_goes_out() {
    let mx = TestMx::start(Script {
        reply_delay: Duration::from_millis(300),
        ..Script::default().rcpt("later@dest.test", &["451 4.7.1 try later"])
    })
    .await;
    let mut m = Mailtrail::configure(
        "",
        "min_free_space = 0\n",
        &relay_tables(mx.port(), "")
            .replace("retry_first = \"1s\"", "retry_first = \"4s\"")
            .replace("retry_max_interval = \"2s\"", "retry_max_interval = \"4s\""),
    );
    let Some(_disk) = SmallDisk::mount(&m.data_dir(), "8m") else {
        return;
    };
    m.spawn();
    let tries_later = || {
        mx.commands()
            .iter()
            .filter(|c| c.starts_with("RCPT TO:<later@dest.test>"))
            .count()
    };
    let later = m.submit(None, "app@example.com", &["later@dest.test"], "later");
    wait_until("deferred", Duration::from_secs(30), || {
        m.recipient(&later, "later@dest.test")["status"] == "deferred"
    });
    // Its retry is 4 s away. The next message's transaction takes its time; the disk fills
    // up meanwhile, so its remote 250 cannot be recorded.
    let full = m.submit(None, "app@example.com", &["full@dest.test"], "disk");
    let filler = m.data_dir().join("filler");
    fill(&filler);
    let accepted = || mx.transactions().iter().filter(|t| t.accepted).count();
    wait_until(
        "the MX accepted the message",
        Duration::from_secs(30),
        || accepted() >= 1,
    );
    mx.set_script(|s| s.reply_delay = Duration::ZERO);
    let before = tries_later();
    assert_eq!(before, 1);
    // The deferred message's retry time passes, and passes again: it waits.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(tries_later(), before, "{}", m.server_log());
    let log = m.server_log();
    assert!(
        log.contains("delivery paused: the store refuses to record delivery attempts"),
        "{log}"
    );

    // Space again: the attempt is recorded, delivery resumes.
    std::fs::remove_file(&filler).unwrap();
    wait_until("recorded as delivered", Duration::from_secs(30), || {
        m.recipient(&full, "full@dest.test")["status"] == "delivered"
    });
    wait_until(
        "the deferred message tried again",
        Duration::from_secs(30),
        || tries_later() > before,
    );
    assert!(m.server_log().contains("delivery resumed"));
    assert_eq!(accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_the_store_cannot_read_is_asked_for_again_after_a_pause_not_at_once() {
    let mx =
        TestMx::start(Script::default().rcpt("later@dest.test", &["451 4.7.1 try later"])).await;
    let m = relay_to(mx.port(), "");
    let receipt = m.submit(None, "app@example.com", &["later@dest.test"], "unreadable");
    wait_until("deferred", Duration::from_secs(30), || {
        m.recipient(&receipt, "later@dest.test")["status"] == "deferred"
    });
    // The retry (due a second later) must read the body from the store, which now fails as
    // a damaged database would.
    let db = rusqlite::Connection::open(m.data_dir().join("mailtrail.db")).unwrap();
    db.execute_batch("DROP TABLE bodies").unwrap();
    drop(db);
    wait_until("the retry fails to read", Duration::from_secs(30), || {
        m.server_log().contains("cannot load message body")
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let tries = m.server_log().matches("cannot load message body").count();
    assert!(tries <= 6, "{tries} reads in about 3 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relays_through_a_real_postfix_smarthost() {
    let mx = TestMx::start(Script::default()).await;
    let postfix = Postfix::start_relay_to(mx.port());
    let m = relay_to(postfix.port, "");
    let receipt = m.submit(None, "app@example.com", &["far@dest.test"], "via postfix");
    wait_until("delivered to postfix", Duration::from_secs(30), || {
        m.recipient(&receipt, "far@dest.test")["status"] == "delivered"
    });
    let r = m.recipient(&receipt, "far@dest.test");
    // Postfix's own reply, verbatim: "250 2.0.0 Ok: <n> bytes queued as <queue id>".
    assert_eq!(r["last_reply_code"], 250);
    assert_eq!(r["last_enhanced_status"], "2.0.0");
    assert!(
        r["last_reply_text"]
            .as_str()
            .unwrap()
            .contains(" queued as "),
        "{r}"
    );
    // Postfix relayed it on; the final MX got our message with our receipt in Received.
    wait_until("postfix relayed to the MX", Duration::from_secs(60), || {
        !mx.transactions().is_empty()
    });
    let body = String::from_utf8_lossy(&mx.transactions()[0].body).to_string();
    assert!(
        body.contains(&format!("id {receipt}")),
        "{body}\n{}",
        postfix.maillog()
    );
    assert!(body.contains("Subject: via postfix"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_message_is_delivered_once() {
    let mx = TestMx::start(Script {
        reply_delay: Duration::from_millis(30),
        ..Script::default()
    })
    .await;
    let m = relay_to(mx.port(), "");
    let mut receipts = Vec::new();
    for i in 0..20 {
        receipts.push(m.submit(
            None,
            "app@example.com",
            &[&format!("once{i}@dest.test")],
            "once",
        ));
    }
    wait_until("all delivered", Duration::from_secs(60), || {
        receipts
            .iter()
            .enumerate()
            .all(|(i, r)| m.recipient(r, &format!("once{i}@dest.test"))["status"] == "delivered")
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let accepted = mx.transactions().iter().filter(|t| t.accepted).count();
    assert_eq!(
        accepted,
        20,
        "{:#?}",
        mx.transactions()
            .iter()
            .map(|t| t.rcpt_to.clone())
            .collect::<Vec<_>>()
    );
}

/// RFC 6152 §3: a next hop that does not offer 8BITMIME gets the 8-bit parts of a message
/// submitted with `BODY=8BITMIME` converted (quoted-printable for text, base64 otherwise),
/// and no `BODY=8BITMIME`; what its reader decodes is what the application wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_bit_mail_is_converted_for_a_next_hop_without_8bitmime() {
    let mx = TestMx::start(Script {
        extensions: vec!["PIPELINING".into(), "ENHANCEDSTATUSCODES".into()],
        ..Script::default()
    })
    .await;
    let m = relay_to(mx.port(), "");
    let script = format!(
        r#"
import smtplib
msg = (b"From: app@example.com\r\nTo: seven@dest.test\r\nSubject: Rechnung\r\n"
       b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n"
       b"--XX\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
       + "Grüße, Ihre Buchhaltung – 100 €".encode() + b"\r\n"
       b"--XX\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n"
       b"\x89PNG\xff\x00\r\n--XX--\r\n")
s = smtplib.SMTP("127.0.0.1", {port})
s.ehlo("app.test")
refused = s.sendmail("app@example.com", ["seven@dest.test"], msg, mail_options=["BODY=8BITMIME"])
print("refused", refused, s.noop())
"#,
        port = m.smtp.port()
    );
    let (ok, out) = python(&script);
    assert!(ok, "{out}");
    assert!(out.contains("refused {}"), "{out}");
    wait_until("delivered", Duration::from_secs(20), || {
        mx.transactions().iter().any(|t| t.accepted)
    });
    let tx = mx.transactions().into_iter().find(|t| t.accepted).unwrap();
    assert!(
        !tx.mail_from.to_ascii_uppercase().contains("BODY="),
        "{}",
        tx.mail_from
    );
    let body = String::from_utf8(tx.body.clone()).expect("the relayed message is ASCII");
    assert!(body.is_ascii(), "{body}");
    assert!(
        body.contains("Content-Transfer-Encoding: quoted-printable\r\n\r\nGr=C3=BC=C3=9Fe"),
        "{body}"
    );
    assert!(
        body.contains("Content-Transfer-Encoding: base64\r\n\r\niVBOR/8A\r\n--XX--"),
        "{body}"
    );
    let parsed = mail_parser::MessageParser::default()
        .parse(&tx.body)
        .expect("parses");
    assert_eq!(
        parsed.body_text(0).as_deref(),
        Some("Grüße, Ihre Buchhaltung – 100 €")
    );
    assert_eq!(
        parsed.attachment(0).map(|a| a.contents().to_vec()),
        Some(b"\x89PNG\xff\x00".to_vec())
    );
    wait_until("recorded as delivered", Duration::from_secs(20), || {
        m.recipient("seven@dest.test", "seven@dest.test")["status"] == "delivered"
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn smtputf8_mail_gets_an_internationalised_dsn() {
    let mx = TestMx::start(
        Script {
            extensions: vec![
                "PIPELINING".into(),
                "8BITMIME".into(),
                "SMTPUTF8".into(),
                "DSN".into(),
                "ENHANCEDSTATUSCODES".into(),
            ],
            ..Script::default()
        }
        .rcpt("jörg@dest.test", &["550 5.1.1 Unknown user"]),
    )
    .await;
    let m = relay_to(mx.port(), "");
    let script = format!(
        r#"
import smtplib
msg = "From: åsa@example.com\r\nTo: jörg@dest.test\r\nSubject: Grüße\r\n\r\nHej\r\n".encode()
s = smtplib.SMTP("127.0.0.1", {port})
s.ehlo("app.test")
print("refused", s.sendmail("åsa@example.com", ["jörg@dest.test"], msg, mail_options=["SMTPUTF8"]))
"#,
        port = m.smtp.port()
    );
    let (ok, out) = python(&script);
    assert!(ok && out.contains("refused {}"), "{out}");
    wait_until("DSN relayed", Duration::from_secs(30), || {
        mx.transactions()
            .iter()
            .any(|t| t.mail_from.starts_with("<>") && t.accepted)
    });
    let dsn = mx
        .transactions()
        .into_iter()
        .find(|t| t.mail_from.starts_with("<>"))
        .unwrap();
    assert!(
        dsn.mail_from.to_ascii_uppercase().contains("SMTPUTF8"),
        "{}",
        dsn.mail_from
    );
    assert!(
        dsn.rcpt_to[0].contains("åsa@example.com"),
        "{:?}",
        dsn.rcpt_to
    );
    let body = String::from_utf8(dsn.body.clone()).expect("UTF-8");
    for needle in [
        "To: <åsa@example.com>\r\n",
        "report-type=global-delivery-status",
        "Content-Type: message/global-delivery-status\r\n",
        "Final-Recipient: utf-8; jörg@dest.test\r\n",
        "Status: 5.1.1\r\n",
        "Content-Type: message/global\r\n",
        "Subject: Grüße\r\n",
    ] {
        assert!(body.contains(needle), "missing {needle:?} in\n{body}");
    }
}
