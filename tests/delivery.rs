//! Delivery over real sockets: the outbound client and MX resolution against a scripted MX
//! and a real DNS server on loopback.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::test_dns::TestDns;
use common::test_mx::{DropAt, Script, TestMx};
use mailtrail::config::TlsPolicy;
use mailtrail::delivery::client::{
    self, Envelope, EnvelopeRecipient, SessionSettings, per_recipient,
};
use mailtrail::delivery::dns::{MxResolver, Target};
use mailtrail::spool::{DsnRet, Notify};
use mailtrail::store::Stage;

fn settings(tls: TlsPolicy) -> SessionSettings {
    SessionSettings {
        helo_name: "relay.test".into(),
        tls,
        implicit_tls: false,
        tls_connector: client::tls_connector(false, None).unwrap(),
        auth: None,
        connect_timeout: Duration::from_secs(2),
        command_timeout: Duration::from_secs(2),
        data_timeout: Duration::from_secs(2),
    }
}

fn target(addr: SocketAddr) -> Target {
    Target {
        host: "mx.test".into(),
        addr,
    }
}

fn envelope(rcpts: &[&str]) -> Envelope {
    Envelope {
        sender: "app@sender.test".into(),
        recipients: rcpts
            .iter()
            .map(|a| EnvelopeRecipient {
                address: a.to_string(),
                notify: None,
                orcpt: None,
            })
            .collect(),
        ret: None,
        envid: None,
        eight_bit: false,
        smtputf8: false,
    }
}

const BODY: &[u8] = b"From: app@sender.test\r\nSubject: t\r\n\r\nhello\r\n.leading dot\r\n";

#[tokio::test]
async fn records_every_rcpt_reply() {
    let mx = TestMx::start(
        Script::default()
            .rcpt("unknown@dest.test", &["550 5.1.1 user unknown"])
            .rcpt("full@dest.test", &["452 4.2.2 mailbox full"]),
    )
    .await;
    let mut conn = client::connect(&[target(mx.addr)], &settings(TlsPolicy::None))
        .await
        .unwrap();
    let env = envelope(&["ok@dest.test", "unknown@dest.test", "full@dest.test"]);
    let replies = conn.transaction(&env, BODY, Duration::from_secs(2)).await;
    assert_eq!(replies.error, None);
    let r = per_recipient(&replies);
    assert_eq!(r.len(), 3);
    assert_eq!(r[0].stage, Stage::Data);
    let ok = r[0].reply.as_ref().unwrap();
    assert_eq!(
        (ok.code, ok.enhanced_status.as_deref()),
        (250, Some("2.0.0"))
    );
    assert_eq!(ok.text, "Ok: queued as TEST1");
    assert_eq!(r[1].stage, Stage::Rcpt);
    let unknown = r[1].reply.as_ref().unwrap();
    assert_eq!(
        (
            unknown.code,
            unknown.enhanced_status.as_deref(),
            unknown.text.as_str()
        ),
        (550, Some("5.1.1"), "user unknown")
    );
    let full = r[2].reply.as_ref().unwrap();
    assert_eq!(
        (
            full.code,
            full.enhanced_status.as_deref(),
            full.text.as_str()
        ),
        (452, Some("4.2.2"), "mailbox full")
    );
    // The message went out once, with all three RCPTs tried, body dot-stuffed on the wire and
    // restored by the server.
    let tx = mx.transactions();
    assert_eq!(tx.len(), 1);
    assert_eq!(tx[0].rcpt_to.len(), 3);
    assert_eq!(tx[0].body, BODY.to_vec());
    assert!(tx[0].mail_from.starts_with("<app@sender.test> SIZE="));
    assert_eq!(conn.ip.to_string(), "127.0.0.1");
    assert_eq!(conn.host, "mx.test");
}

#[tokio::test]
async fn data_rejection_is_recorded_for_all_accepted_recipients() {
    let mut script = Script::default().rcpt("no@dest.test", &["550 5.1.1 no such user"]);
    script.data_replies = vec!["554 5.7.1 Message rejected: spam".to_string()].into();
    let mx = TestMx::start(script).await;
    let mut conn = client::connect(&[target(mx.addr)], &settings(TlsPolicy::None))
        .await
        .unwrap();
    let env = envelope(&["a@dest.test", "no@dest.test", "b@dest.test"]);
    let r = per_recipient(&conn.transaction(&env, BODY, Duration::from_secs(2)).await);
    for i in [0, 2] {
        assert_eq!(r[i].stage, Stage::Data);
        let reply = r[i].reply.as_ref().unwrap();
        assert_eq!(reply.code, 554);
        assert_eq!(reply.text, "Message rejected: spam");
    }
    assert_eq!(r[1].stage, Stage::Rcpt);
    assert_eq!(r[1].reply.as_ref().unwrap().code, 550);
}

#[tokio::test]
async fn multiline_replies_are_kept_whole() {
    let mx = TestMx::start(Script::default().rcpt(
        "gone@dest.test",
        &["550 5.1.1 The email account that you tried to reach does not exist.\n550 5.1.1 Please try double-checking the address."],
    ))
    .await;
    let mut conn = client::connect(&[target(mx.addr)], &settings(TlsPolicy::None))
        .await
        .unwrap();
    let r = per_recipient(
        &conn
            .transaction(&envelope(&["gone@dest.test"]), BODY, Duration::from_secs(2))
            .await,
    );
    let reply = r[0].reply.as_ref().unwrap();
    assert_eq!(reply.enhanced_status.as_deref(), Some("5.1.1"));
    assert_eq!(
        reply.text,
        "The email account that you tried to reach does not exist.\nPlease try double-checking the address."
    );
}

#[tokio::test]
async fn without_pipelining_commands_go_one_by_one_and_still_all_replies_are_kept() {
    let mut script = Script::default().rcpt("x@dest.test", &["550 5.1.1 unknown"]);
    script.extensions.retain(|e| e != "PIPELINING");
    let mx = TestMx::start(script).await;
    let mut conn = client::connect(&[target(mx.addr)], &settings(TlsPolicy::None))
        .await
        .unwrap();
    let r = per_recipient(
        &conn
            .transaction(
                &envelope(&["x@dest.test", "y@dest.test"]),
                BODY,
                Duration::from_secs(2),
            )
            .await,
    );
    assert_eq!(r[0].reply.as_ref().unwrap().code, 550);
    assert_eq!(r[1].reply.as_ref().unwrap().code, 250);
    assert_eq!(r[1].stage, Stage::Data);
}

#[tokio::test]
async fn dsn_parameters_are_passed_on_when_the_peer_offers_dsn() {
    let mx = TestMx::start(Script::default()).await;
    let mut conn = client::connect(&[target(mx.addr)], &settings(TlsPolicy::None))
        .await
        .unwrap();
    let mut env = envelope(&["a@dest.test"]);
    env.ret = Some(DsnRet::Hdrs);
    env.envid = Some("ENV-1".into());
    env.recipients[0].notify = Some(Notify {
        failure: true,
        delay: true,
        ..Default::default()
    });
    env.recipients[0].orcpt = Some("rfc822;A@dest.test".into());
    conn.transaction(&env, BODY, Duration::from_secs(2)).await;
    let tx = mx.transactions();
    assert!(tx[0].mail_from.contains(" RET=HDRS"), "{}", tx[0].mail_from);
    assert!(tx[0].mail_from.contains(" ENVID=ENV-1"));
    assert_eq!(
        tx[0].rcpt_to[0],
        "<a@dest.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;A@dest.test"
    );
}

#[tokio::test]
async fn mail_rejection_applies_to_every_recipient() {
    let mut script = Script::default();
    script.mail_reply = "553 5.7.1 Sender address rejected".into();
    let mx = TestMx::start(script).await;
    let mut conn = client::connect(&[target(mx.addr)], &settings(TlsPolicy::None))
        .await
        .unwrap();
    let r = per_recipient(
        &conn
            .transaction(
                &envelope(&["a@d.test", "b@d.test"]),
                BODY,
                Duration::from_secs(2),
            )
            .await,
    );
    assert!(
        r.iter()
            .all(|r| r.stage == Stage::Mail && r.reply.as_ref().unwrap().code == 553)
    );
    assert!(mx.transactions().is_empty());
}

#[tokio::test]
async fn connection_reuse_after_rset() {
    let mx = TestMx::start(Script::default()).await;
    let mut conn = client::connect(&[target(mx.addr)], &settings(TlsPolicy::None))
        .await
        .unwrap();
    conn.transaction(&envelope(&["a@d.test"]), BODY, Duration::from_secs(2))
        .await;
    assert!(conn.rset().await);
    let r = per_recipient(
        &conn
            .transaction(&envelope(&["b@d.test"]), BODY, Duration::from_secs(2))
            .await,
    );
    assert_eq!(r[0].reply.as_ref().unwrap().code, 250);
    assert_eq!(mx.connections(), 1);
    assert_eq!(mx.transactions().len(), 2);
    assert_eq!(conn.transactions, 2);
}

#[tokio::test]
async fn mx_fallback_on_connect_failure() {
    // A port with nothing listening: bind, learn the port, close.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mx = TestMx::start(Script::default()).await;
    let conn = client::connect(&[target(dead), target(mx.addr)], &settings(TlsPolicy::None))
        .await
        .unwrap();
    assert_eq!(conn.ip.to_string(), "127.0.0.1");
    assert_eq!(mx.connections(), 1);
}

#[tokio::test]
async fn mx_fallback_on_4xx_greeting_but_not_on_5xx() {
    let mut busy = Script::default();
    busy.banner = "421 4.3.2 too busy".into();
    let busy = TestMx::start(busy).await;
    let good = TestMx::start(Script::default()).await;
    let conn = client::connect(
        &[target(busy.addr), target(good.addr)],
        &settings(TlsPolicy::None),
    )
    .await
    .unwrap();
    drop(conn);
    assert_eq!(good.connections(), 1);

    let mut refusing = Script::default();
    refusing.banner = "554 5.7.1 no mail from you".into();
    let refusing = TestMx::start(refusing).await;
    let good2 = TestMx::start(Script::default()).await;
    let e = client::connect(
        &[target(refusing.addr), target(good2.addr)],
        &settings(TlsPolicy::None),
    )
    .await
    .unwrap_err();
    assert!(e.permanent);
    assert_eq!(e.reply.unwrap().code, 554);
    assert_eq!(good2.connections(), 0);
}

#[tokio::test]
async fn helo_fallback_when_ehlo_is_refused() {
    let mut script = Script::default();
    script.ehlo_reply = Some("502 5.5.2 EHLO not supported".into());
    let mx = TestMx::start(script).await;
    let mut conn = client::connect(&[target(mx.addr)], &settings(TlsPolicy::Opportunistic))
        .await
        .unwrap();
    let r = per_recipient(
        &conn
            .transaction(&envelope(&["a@d.test"]), BODY, Duration::from_secs(2))
            .await,
    );
    assert_eq!(r[0].reply.as_ref().unwrap().code, 250);
    let cmds = mx.commands();
    assert!(cmds.iter().any(|c| c == "HELO relay.test"), "{cmds:?}");
    // No SIZE without EHLO.
    assert_eq!(mx.transactions()[0].mail_from, "<app@sender.test>");
}

#[tokio::test]
async fn starttls_is_used_and_recorded() {
    let mut script = Script::default();
    script.starttls = true;
    let mx = TestMx::start(script).await;
    let mut conn = client::connect(&[target(mx.addr)], &settings(TlsPolicy::Opportunistic))
        .await
        .unwrap();
    let tls = conn.tls.clone().expect("TLS negotiated");
    assert!(tls.version.starts_with("TLSv1_"), "{tls:?}");
    assert!(!tls.cipher.is_empty());
    conn.transaction(&envelope(&["a@d.test"]), BODY, Duration::from_secs(2))
        .await;
    let tx = mx.transactions();
    assert!(tx[0].tls);
    // EHLO was repeated inside TLS.
    assert_eq!(tx[0].helo, "relay.test");
    let cmds = mx.commands();
    assert_eq!(cmds.iter().filter(|c| c.starts_with("EHLO")).count(), 2);
}

#[tokio::test]
async fn tls_required_without_starttls_fails_temporarily() {
    let mx = TestMx::start(Script::default()).await;
    let e = client::connect(&[target(mx.addr)], &settings(TlsPolicy::Required))
        .await
        .unwrap_err();
    assert!(!e.permanent);
    assert_eq!(e.stage, Stage::Connect);
    assert!(e.text.contains("STARTTLS"), "{}", e.text);
    assert!(mx.transactions().is_empty());
}

#[tokio::test]
async fn dropped_connection_after_data_leaves_no_reply() {
    let mut script = Script::default();
    script.drop_at = Some(DropAt::EndOfData);
    let mx = TestMx::start(script).await;
    let mut conn = client::connect(&[target(mx.addr)], &settings(TlsPolicy::None))
        .await
        .unwrap();
    let replies = conn
        .transaction(&envelope(&["a@d.test"]), BODY, Duration::from_secs(2))
        .await;
    assert!(replies.error.is_some());
    let r = per_recipient(&replies);
    assert_eq!(r[0].stage, Stage::Data);
    assert_eq!(r[0].reply, None);
}

#[tokio::test]
async fn slow_final_reply_times_out() {
    let mx = TestMx::start(Script::default()).await;
    let mut conn = client::connect(&[target(mx.addr)], &settings(TlsPolicy::None))
        .await
        .unwrap();
    mx.set_script(|s| s.reply_delay = Duration::from_millis(800));
    let started = std::time::Instant::now();
    let replies = conn
        .transaction(&envelope(&["a@d.test"]), BODY, Duration::from_millis(300))
        .await;
    // MAIL/RCPT/DATA take 800 ms each but the command timeout is 2 s; the data timeout of
    // 300 ms then cuts the wait for the final reply.
    assert!(
        replies.error.as_deref().unwrap_or("").contains("timeout"),
        "{replies:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(per_recipient(&replies)[0].reply, None);
}

// --- DNS -----------------------------------------------------------------------------------

async fn resolver(dns: &TestDns) -> MxResolver {
    MxResolver::new(&[dns.addr], Some(Duration::from_secs(1))).unwrap()
}

#[tokio::test]
async fn mx_records_are_ordered_by_preference_with_addresses() {
    let dns = TestDns::start().await;
    dns.zone
        .mx("dest.test", 20, "mx2.dest.test")
        .mx("dest.test", 10, "mx1.dest.test")
        .addr("mx1.dest.test", "127.0.0.11".parse().unwrap())
        .addr("mx2.dest.test", "127.0.0.12".parse().unwrap());
    let t = resolver(&dns)
        .await
        .resolve("dest.test", 2525)
        .await
        .unwrap();
    let got: Vec<(String, String)> = t
        .iter()
        .map(|t| (t.host.clone(), t.addr.to_string()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("mx1.dest.test".into(), "127.0.0.11:2525".into()),
            ("mx2.dest.test".into(), "127.0.0.12:2525".into())
        ]
    );
}

#[tokio::test]
async fn no_mx_falls_back_to_the_domain_address() {
    let dns = TestDns::start().await;
    dns.zone
        .addr("implicit.test", "127.0.0.13".parse().unwrap());
    let t = resolver(&dns)
        .await
        .resolve("implicit.test", 25)
        .await
        .unwrap();
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].host, "implicit.test");
    assert_eq!(t[0].addr.to_string(), "127.0.0.13:25");
}

#[tokio::test]
async fn null_mx_is_permanent() {
    let dns = TestDns::start().await;
    dns.zone.null_mx("nomail.test");
    let e = resolver(&dns)
        .await
        .resolve("nomail.test", 25)
        .await
        .unwrap_err();
    assert!(e.permanent);
    assert_eq!(e.enhanced_status, "5.1.10");
    assert_eq!(e.reason, "notaccept");
}

#[tokio::test]
async fn nxdomain_is_permanent() {
    let dns = TestDns::start().await;
    dns.zone.nxdomain("gone.test");
    let e = resolver(&dns)
        .await
        .resolve("gone.test", 25)
        .await
        .unwrap_err();
    assert!(e.permanent, "{e:?}");
    assert_eq!(e.enhanced_status, "5.1.2");
    assert_eq!(e.reason, "hostunknown");
}

#[tokio::test]
async fn servfail_is_temporary() {
    let dns = TestDns::start().await;
    dns.zone.servfail("broken.test");
    let e = resolver(&dns)
        .await
        .resolve("broken.test", 25)
        .await
        .unwrap_err();
    assert!(!e.permanent, "{e:?}");
    assert!(e.enhanced_status.starts_with('4'));
}
