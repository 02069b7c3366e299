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
        unverified_fallback: None,
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
        preference: 0,
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
    let script = Script {
        mail_reply: "553 5.7.1 Sender address rejected".into(),
        ..Default::default()
    };
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

/// One transaction with the test body to `rcpts`.
async fn send(conn: &mut client::Connection, rcpts: &[&str]) -> client::TransactionReplies {
    conn.transaction(&envelope(rcpts), BODY, Duration::from_secs(2))
        .await
}

#[tokio::test]
async fn rset_only_after_a_transaction_cut_short() {
    let mx =
        TestMx::start(Script::default().rcpt("nobody@d.test", &["550 5.1.1 no such user"])).await;
    let mut conn = client::connect(&[target(mx.addr)], &settings(TlsPolicy::None))
        .await
        .unwrap();
    let rsets = |mx: &TestMx| {
        mx.commands()
            .iter()
            .filter(|c| c.as_str() == "RSET")
            .count()
    };
    // The final reply to the message ended the transaction: no RSET before the next one.
    send(&mut conn, &["a@d.test"]).await;
    assert!(conn.ready().await);
    assert_eq!(rsets(&mx), 0, "{:?}", mx.commands());
    // No recipient taken, so no message sent: MAIL is still open on the server.
    let refused = per_recipient(&send(&mut conn, &["nobody@d.test"]).await);
    assert_eq!(refused[0].reply.as_ref().unwrap().code, 550);
    assert!(conn.ready().await);
    assert_eq!(rsets(&mx), 1, "{:?}", mx.commands());
    let r = per_recipient(&send(&mut conn, &["b@d.test"]).await);
    assert_eq!(r[0].reply.as_ref().unwrap().code, 250);
    assert_eq!(mx.connections(), 1);
}

#[tokio::test]
async fn a_data_command_refused_before_the_message_is_followed_by_rset() {
    let mx = TestMx::start(Script {
        data_command_reply: "451 4.3.0 DATA temporarily refused".into(),
        ..Script::default()
    })
    .await;
    let mut conn = client::connect(&[target(mx.addr)], &settings(TlsPolicy::None))
        .await
        .unwrap();
    let refused = send(&mut conn, &["a@d.test"]).await;
    assert_eq!(refused.data.as_ref().unwrap().code, 451, "{refused:?}");
    // MAIL and RCPT still stand on the server (RFC 5321 4.1.1.4): without RSET the next
    // MAIL would be a nested one ("503 5.5.1" from Postfix).
    assert!(conn.ready().await);
    let rsets = mx
        .commands()
        .iter()
        .filter(|c| c.as_str() == "RSET")
        .count();
    assert_eq!(rsets, 1, "{:?}", mx.commands());
}

#[tokio::test]
async fn transaction_on_a_connection_the_server_closed_receives_nothing() {
    let mx = TestMx::start(Script {
        drop_at: Some(DropAt::AfterData),
        ..Script::default()
    })
    .await;
    let mut conn = client::connect(&[target(mx.addr)], &settings(TlsPolicy::None))
        .await
        .unwrap();
    let first = send(&mut conn, &["a@d.test"]).await;
    assert_eq!(first.data.as_ref().unwrap().code, 250);
    // The server hung up after its 250; the client learns it only by trying.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(conn.ready().await);
    let second = send(&mut conn, &["b@d.test"]).await;
    assert!(second.nothing_received(), "{second:?}");
    assert_eq!(mx.transactions().len(), 1);
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
async fn mx_fallback_on_4xx_and_5xx_greetings() {
    let busy = Script {
        banner: "421 4.3.2 too busy".into(),
        ..Default::default()
    };
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

    // A server that greets with 5xx takes no mail; another MX may (Postfix's
    // smtp_skip_5xx_greeting).
    let refusing = TestMx::start(Script {
        banner: "554 5.7.1 no mail from you".into(),
        ..Default::default()
    })
    .await;
    let conn = client::connect(
        &[target(refusing.addr), target(good.addr)],
        &settings(TlsPolicy::None),
    )
    .await
    .unwrap();
    drop(conn);
    assert_eq!(good.connections(), 2);
    // Refused everywhere: permanent. Refused and busy: the busy one may take it later.
    let e = client::connect(&[target(refusing.addr)], &settings(TlsPolicy::None))
        .await
        .unwrap_err();
    assert!(e.permanent);
    assert_eq!(e.reply.unwrap().code, 554);
    let e = client::connect(
        &[target(refusing.addr), target(busy.addr)],
        &settings(TlsPolicy::None),
    )
    .await
    .unwrap_err();
    assert!(!e.permanent, "{e:?}");
    assert_eq!(e.reply.unwrap().code, 421);
}

/// The targets `connect` left before the one it returns (a session or an error) are kept,
/// in order, with the step and the reply or error of each.
#[tokio::test]
async fn the_targets_left_before_the_one_returned_are_kept_in_order() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let busy = TestMx::start(Script {
        banner: "421 4.3.2 busy, try later".into(),
        ..Default::default()
    })
    .await;
    let refusing = TestMx::start(Script {
        banner: "554 5.7.1 no mail from you".into(),
        ..Default::default()
    })
    .await;
    let good = TestMx::start(Script::default()).await;
    let name = |a: SocketAddr| format!("mx.test[127.0.0.1]:{}", a.port());

    let conn = client::connect(
        &[target(dead), target(busy.addr), target(good.addr)],
        &settings(TlsPolicy::None),
    )
    .await
    .unwrap();
    assert_eq!(conn.port, good.addr.port());
    let tried: Vec<(String, String, Option<u16>)> = conn
        .tried_first
        .iter()
        .map(|h| (h.hop.clone(), h.step.clone(), h.reply_code))
        .collect();
    assert_eq!(
        tried,
        [
            (name(dead), "connect".to_string(), None),
            (name(busy.addr), "greeting".to_string(), Some(421)),
        ]
    );
    assert!(
        conn.tried_first[0].text.contains("refused"),
        "{:?}",
        conn.tried_first
    );
    assert_eq!(conn.tried_first[1].text, "421 4.3.2 busy, try later");
    drop(conn);

    // All failed: the error is the one it was before (the busy one's 421, not the 5xx
    // greeting), the others are listed.
    let e = client::connect(
        &[target(refusing.addr), target(dead), target(busy.addr)],
        &settings(TlsPolicy::None),
    )
    .await
    .unwrap_err();
    assert_eq!(e.reply.as_ref().map(|r| r.code), Some(421));
    let tried: Vec<(String, String)> = e
        .tried_first
        .iter()
        .map(|h| (h.hop.clone(), h.step.clone()))
        .collect();
    assert_eq!(
        tried,
        [
            (name(refusing.addr), "greeting".to_string()),
            (name(dead), "connect".to_string()),
        ]
    );
    // A 5xx greeting after the temporary failure that is the verdict stays listed.
    let e = client::connect(
        &[target(busy.addr), target(refusing.addr)],
        &settings(TlsPolicy::None),
    )
    .await
    .unwrap_err();
    assert_eq!(e.reply.as_ref().map(|r| r.code), Some(421));
    let tried: Vec<(String, Option<u16>)> = e
        .tried_first
        .iter()
        .map(|h| (h.hop.clone(), h.reply_code))
        .collect();
    assert_eq!(tried, [(name(refusing.addr), Some(554))]);
    // Only 5xx greetings: the last is the verdict, the one before it listed.
    let e = client::connect(
        &[target(refusing.addr), target(refusing.addr)],
        &settings(TlsPolicy::None),
    )
    .await
    .unwrap_err();
    assert!(e.permanent);
    assert_eq!(e.tried_first.len(), 1);
}

#[tokio::test]
async fn helo_fallback_when_ehlo_is_refused() {
    let script = Script {
        ehlo_reply: Some("502 5.5.2 EHLO not supported".into()),
        ..Default::default()
    };
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
    let script = Script {
        starttls: true,
        ..Default::default()
    };
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
    assert!(e.security, "failed for want of TLS");
    assert_eq!(e.stage, Stage::Connect);
    assert!(e.text.contains("STARTTLS"), "{}", e.text);
    assert!(mx.transactions().is_empty());
}

#[tokio::test]
async fn dropped_connection_after_data_leaves_no_reply() {
    let script = Script {
        drop_at: Some(DropAt::EndOfData),
        ..Default::default()
    };
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

#[tokio::test]
async fn chunking_peer_gets_bdat_with_the_message_unstuffed() {
    let mx = TestMx::start(Script {
        extensions: vec!["CHUNKING".into(), "PIPELINING".into()],
        ..Default::default()
    })
    .await;
    let mut conn = client::connect(&[target(mx.addr)], &settings(TlsPolicy::None))
        .await
        .unwrap();
    let r = per_recipient(
        &conn
            .transaction(&envelope(&["a@d.test"]), BODY, Duration::from_secs(2))
            .await,
    );
    assert_eq!(r[0].reply.as_ref().unwrap().code, 250);
    assert!(
        mx.commands()
            .iter()
            .any(|c| c == &format!("BDAT {} LAST", BODY.len()))
    );
    assert!(!mx.commands().iter().any(|c| c == "DATA"));
    assert_eq!(mx.transactions()[0].body, BODY.to_vec());
}

#[tokio::test]
async fn non_ascii_address_without_smtputf8_fails_permanently_before_mail() {
    let mx = TestMx::start(Script::default()).await;
    let mut conn = client::connect(&[target(mx.addr)], &settings(TlsPolicy::None))
        .await
        .unwrap();
    let replies = conn
        .transaction(&envelope(&["jürgen@d.test"]), BODY, Duration::from_secs(2))
        .await;
    let r = per_recipient(&replies);
    assert_eq!(r[0].local_permanent, Some("5.6.7"));
    assert_eq!(r[0].reply, None);
    assert!(!mx.commands().iter().any(|c| c.starts_with("MAIL")));
    // The session is still usable for other mail.
    let ok = per_recipient(
        &conn
            .transaction(&envelope(&["ascii@d.test"]), BODY, Duration::from_secs(2))
            .await,
    );
    assert_eq!(ok[0].reply.as_ref().unwrap().code, 250);
}

#[tokio::test]
async fn utf8_header_fields_of_smtputf8_mail_need_smtputf8_of_the_next_hop() {
    let mx = TestMx::start(Script::default()).await;
    let mut conn = client::connect(&[target(mx.addr)], &settings(TlsPolicy::None))
        .await
        .unwrap();
    let body = "Subject: Grüße\r\n\r\nhi\r\n".as_bytes();
    let mut utf8 = envelope(&["a@d.test"]);
    utf8.smtputf8 = true;
    let r = per_recipient(&conn.transaction(&utf8, body, Duration::from_secs(2)).await);
    assert_eq!(r[0].local_permanent, Some("5.6.7"));
    assert!(r[0].text.contains("UTF-8 header fields"), "{}", r[0].text);
    assert!(!mx.commands().iter().any(|c| c.starts_with("MAIL")));
    // Without the SMTPUTF8 request the bytes are the client's affair: they go as they came.
    let plain = envelope(&["a@d.test"]);
    let ok = per_recipient(&conn.transaction(&plain, body, Duration::from_secs(2)).await);
    assert_eq!(ok[0].reply.as_ref().unwrap().code, 250);
    // And SMTPUTF8 mail whose header is ASCII (UTF-8 only in the body) goes too.
    let ascii_header = b"Subject: ok\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n";
    let ok = per_recipient(
        &conn
            .transaction(&utf8, ascii_header, Duration::from_secs(2))
            .await,
    );
    assert_eq!(ok[0].reply.as_ref().unwrap().code, 250);
}

/// A scripted MX whose EHLO names `size` as its SIZE keyword (and no 8BITMIME).
async fn mx_with_size(size: &str) -> TestMx {
    TestMx::start(Script {
        extensions: vec![
            "PIPELINING".into(),
            size.into(),
            "ENHANCEDSTATUSCODES".into(),
        ],
        ..Default::default()
    })
    .await
}

#[tokio::test]
async fn a_message_over_the_peer_size_limit_fails_with_5_3_4_without_mail() {
    let limit = BODY.len() - 1;
    let mx = mx_with_size(&format!("SIZE {limit}")).await;
    let mut conn = client::connect(&[target(mx.addr)], &settings(TlsPolicy::None))
        .await
        .unwrap();
    let replies = conn
        .transaction(
            &envelope(&["a@d.test", "b@d.test"]),
            BODY,
            Duration::from_secs(2),
        )
        .await;
    let r = per_recipient(&replies);
    assert_eq!(r.len(), 2);
    for x in &r {
        assert_eq!(
            (x.stage, x.local_permanent, &x.reply),
            (Stage::Mail, Some("5.3.4"), &None)
        );
        assert_eq!(
            x.text,
            format!(
                "message size {} exceeds size limit {limit} of server mx.test[127.0.0.1]:{}",
                BODY.len(),
                mx.addr.port()
            )
        );
    }
    assert!(!mx.commands().iter().any(|c| c.starts_with("MAIL")));
    // The session is still usable, and a message of exactly the limit goes.
    let small = &BODY[..limit];
    let ok = per_recipient(
        &conn
            .transaction(&envelope(&["a@d.test"]), small, Duration::from_secs(2))
            .await,
    );
    assert_eq!(ok[0].reply.as_ref().unwrap().code, 250);
    assert!(
        mx.commands()
            .iter()
            .any(|c| c.starts_with("MAIL") && c.ends_with(&format!("SIZE={limit}")))
    );
}

#[tokio::test]
async fn the_size_limit_applies_to_the_message_as_converted_to_7bit() {
    let body = format!(
        "Subject: t\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: 8bit\r\n\r\n{}\r\n",
        "\u{e9}".repeat(100)
    );
    let converted = mailtrail::delivery::downgrade::to_7bit(body.as_bytes(), false).len();
    assert!(converted > body.len() + 100, "QP grows it: {converted}");
    // Large enough for the 8-bit original, too small for what would be sent.
    let limit = body.len() + 50;
    let mx = mx_with_size(&format!("SIZE {limit}")).await;
    let mut conn = client::connect(&[target(mx.addr)], &settings(TlsPolicy::None))
        .await
        .unwrap();
    let mut env = envelope(&["a@d.test"]);
    env.eight_bit = true;
    let r = per_recipient(
        &conn
            .transaction(&env, body.as_bytes(), Duration::from_secs(2))
            .await,
    );
    assert_eq!(r[0].local_permanent, Some("5.3.4"));
    assert!(
        r[0].text.starts_with(&format!(
            "message size {converted} exceeds size limit {limit} "
        )),
        "{}",
        r[0].text
    );
    assert!(!mx.commands().iter().any(|c| c.starts_with("MAIL")));
}

#[tokio::test]
async fn size_without_a_number_or_zero_sets_no_limit() {
    for keyword in ["SIZE", "SIZE 0"] {
        let mx = mx_with_size(keyword).await;
        let mut conn = client::connect(&[target(mx.addr)], &settings(TlsPolicy::None))
            .await
            .unwrap();
        let r = per_recipient(
            &conn
                .transaction(&envelope(&["a@d.test"]), BODY, Duration::from_secs(2))
                .await,
        );
        assert_eq!(r[0].reply.as_ref().map(|r| r.code), Some(250), "{keyword}");
    }
}

#[tokio::test]
async fn reply_before_a_hang_up_in_a_pipelined_group_is_kept() {
    let mx = TestMx::start(Script {
        mail_reply: "421 4.3.2 Service shutting down".into(),
        drop_at: Some(DropAt::AfterMail),
        ..Default::default()
    })
    .await;
    let mut conn = client::connect(&[target(mx.addr)], &settings(TlsPolicy::None))
        .await
        .unwrap();
    let replies = conn
        .transaction(
            &envelope(&["a@d.test", "b@d.test"]),
            BODY,
            Duration::from_secs(2),
        )
        .await;
    assert!(replies.error.is_some());
    let r = per_recipient(&replies);
    for x in &r {
        assert_eq!(x.stage, Stage::Mail);
        let reply = x.reply.as_ref().expect("the 421 that did arrive");
        assert_eq!(
            (reply.code, reply.text.as_str()),
            (421, "Service shutting down")
        );
    }
}

#[tokio::test]
async fn a_421_to_an_rcpt_is_recorded_for_every_recipient_still_pending() {
    for pipelining in [true, false] {
        let ehlo = if pipelining {
            "250-mx.test\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n"
        } else {
            "250-mx.test\r\n250 ENHANCEDSTATUSCODES\r\n"
        };
        // A server that answers 421 to the second RCPT and closes (RFC 5321 §3.8).
        let mut closed = false;
        let (addr, server) = line_peer("220 mx.test\r\n", move |line| {
            if closed {
                return None;
            }
            let upper = line.to_ascii_uppercase();
            Some(if upper.starts_with("EHLO") {
                ehlo.to_string()
            } else if upper.starts_with("RCPT TO:<B@") {
                closed = true;
                "421 4.3.2 Service shutting down\r\n".to_string()
            } else {
                "250 2.0.0 Ok\r\n".to_string()
            })
        })
        .await;
        let mut conn = client::connect(&[target(addr)], &settings(TlsPolicy::None))
            .await
            .unwrap();
        let replies = conn
            .transaction(
                &envelope(&["a@d.test", "b@d.test", "c@d.test"]),
                BODY,
                Duration::from_secs(2),
            )
            .await;
        assert!(replies.error.is_some(), "the connection is not reused");
        drop(conn);
        let r = per_recipient(&replies);
        for (x, address) in r.iter().zip(["a", "b", "c"]) {
            let reply = x.reply.as_ref().unwrap_or_else(|| {
                panic!(
                    "{address} (pipelining {pipelining}): no reply but {:?}",
                    x.text
                )
            });
            assert_eq!(
                (x.stage, reply.code, reply.text.as_str()),
                (Stage::Rcpt, 421, "Service shutting down"),
                "{address} (pipelining {pipelining})"
            );
        }
        // The first was accepted before: its RCPT reply stays beside the 421.
        assert_eq!(r[0].rcpt_reply.as_ref().map(|r| r.code), Some(250));
        let heard = server.await.unwrap();
        if !pipelining {
            // Nothing is sent after the 421.
            assert!(
                !heard.iter().any(|l| l.starts_with("RCPT TO:<c@")),
                "{heard:?}"
            );
        }
        assert!(
            !heard.iter().any(|l| l == "DATA" || l == "QUIT"),
            "{heard:?}"
        );
    }
}

#[tokio::test]
async fn broken_opportunistic_tls_retries_the_host_in_plain_text() {
    let mx = TestMx::start(Script {
        starttls: true,
        drop_at: Some(DropAt::StartTls),
        ..Default::default()
    })
    .await;
    let conn = client::connect(&[target(mx.addr)], &settings(TlsPolicy::Opportunistic))
        .await
        .unwrap();
    assert_eq!(conn.tls, None);
    assert_eq!(mx.connections(), 2);
    // Under `tls = required` the same peer defers instead.
    let e = client::connect(&[target(mx.addr)], &settings(TlsPolicy::Required))
        .await
        .unwrap_err();
    assert!(!e.permanent);
    assert!(e.tls_handshake_failed);
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

// --- The scheduler with the SQLite store ---------------------------------------------------

mod queue {
    use std::sync::Arc;
    use std::time::Duration;

    use super::common::test_dns::TestDns;
    use super::common::test_mx::{DropAt, Script, TestMx};
    use mailtrail::config::{Config, RouteConfig, TlsPolicy};
    use mailtrail::delivery::{Delivery, DeliveryHandle};
    use mailtrail::metrics::Metrics;
    use mailtrail::receipt::ReceiptId;
    use mailtrail::spool::{AcceptedMessage, AcceptedRecipient, Notify};
    use mailtrail::store::{LogKey, LogQuery, MessageLog, RecipientStatus, Stage, Store};
    use tokio_util::sync::CancellationToken;

    pub struct Harness {
        pub config: Arc<Config>,
        pub store: Arc<dyn Store>,
        pub sqlite: Arc<mailtrail::store::sqlite::SqliteStore>,
        pub metrics: Arc<Metrics>,
        pub handle: DeliveryHandle,
        pub shutdown: CancellationToken,
        pub dns: TestDns,
        pub mx: TestMx,
        _dir: tempfile::TempDir,
    }

    /// A relay whose DNS sends `dest.test` and `sender.test` to one scripted MX.
    pub async fn harness(script: Script, tune: impl FnOnce(&mut Config)) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let dns = TestDns::start().await;
        let mx = TestMx::start(script).await;
        for d in ["dest.test", "sender.test"] {
            dns.zone.mx(d, 10, "mx.dest.test");
        }
        dns.zone.addr("mx.dest.test", "127.0.0.1".parse().unwrap());
        let mut config = Config {
            data_dir: dir.path().to_path_buf(),
            hostname: "relay.test".into(),
            ..Default::default()
        };
        config.dns.nameservers = vec![dns.addr];
        config.dns.timeout = Some(Duration::from_secs(1));
        config.delivery.mx_port = mx.port();
        config.delivery.retry_first = Duration::from_millis(300);
        config.delivery.retry_max_interval = Duration::from_millis(600);
        config.delivery.connect_timeout = Duration::from_secs(2);
        config.delivery.command_timeout = Duration::from_secs(2);
        config.delivery.data_timeout = Duration::from_secs(2);
        config.smtp.shutdown_grace = Duration::from_secs(2);
        tune(&mut config);
        let config = Arc::new(config);
        let sqlite = mailtrail::store::sqlite::open(&config).unwrap();
        let store: Arc<dyn Store> = sqlite.clone();
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let handle = Delivery::start(
            config.clone(),
            store.clone(),
            metrics.clone(),
            shutdown.clone(),
        )
        .unwrap();
        Harness {
            config,
            store,
            sqlite,
            metrics,
            handle,
            shutdown,
            dns,
            mx,
            _dir: dir,
        }
    }

    pub fn message(sender: &str, rcpts: &[(&str, Option<Notify>)]) -> AcceptedMessage {
        AcceptedMessage {
            receipt: ReceiptId::new(),
            received_at_ms: chrono::Utc::now().timestamp_millis(),
            client_ip: "127.0.0.1".parse().unwrap(),
            helo: "app".into(),
            tls_version: None,
            auth_user: None,
            envelope_sender: sender.into(),
            recipients: rcpts
                .iter()
                .map(|(a, n)| AcceptedRecipient {
                    address: a.to_string(),
                    orcpt: Some(format!("rfc822;{a}")),
                    notify: *n,
                    preset: None,
                })
                .collect(),
            envid: Some("ENV-42".into()),
            ret: None,
            eight_bit: false,
            smtputf8: false,
            message_id: Some("m1@app".into()),
            subject: Some("hello".into()),
            context: None,
            body:
                b"From: app@sender.test\r\nSubject: hello\r\nMessage-ID: <m1@app>\r\n\r\nbody\r\n"
                    .to_vec(),
            inbound_bounce: false,
        }
    }

    impl Harness {
        pub async fn submit(&self, m: AcceptedMessage) -> ReceiptId {
            let r = m.receipt;
            self.store.accept(m).await.unwrap();
            self.handle.wake();
            r
        }

        pub async fn log(&self, r: ReceiptId) -> MessageLog {
            let mut v = self
                .store
                .log(&LogQuery {
                    key: LogKey::Receipt(r),
                    since_ms: None,
                    until_ms: None,
                    limit: 10,
                    before: None,
                })
                .await
                .unwrap();
            assert_eq!(v.len(), 1);
            v.remove(0)
        }

        /// Waits until every recipient's status satisfies `done`.
        pub async fn wait(
            &self,
            r: ReceiptId,
            done: impl Fn(&[RecipientStatus]) -> bool,
        ) -> MessageLog {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            loop {
                let log = self.log(r).await;
                let st: Vec<RecipientStatus> = log.recipients.iter().map(|r| r.status).collect();
                if done(&st) {
                    return log;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "timed out; statuses {st:?}\n{log:#?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }

        /// Waits until the MX has seen `n` transactions.
        pub async fn wait_mx(&self, n: usize) -> Vec<super::common::test_mx::Transaction> {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            loop {
                let t = self.mx.transactions();
                if t.len() >= n {
                    return t;
                }
                assert!(tokio::time::Instant::now() < deadline, "MX saw {t:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }

        /// The bodies of the DSNs (null sender) the MX has received.
        pub fn dsn_bodies(&self) -> Vec<String> {
            self.mx
                .transactions()
                .into_iter()
                .filter(|t| t.mail_from.starts_with("<>"))
                .map(|t| String::from_utf8_lossy(&t.body).into_owned())
                .collect()
        }
    }

    /// Asserts that a DSN names each of `addresses` as a Final-Recipient.
    fn assert_reports(dsn: &str, addresses: &[&str]) {
        for a in addresses {
            assert!(
                dsn.contains(&format!("Final-Recipient: rfc822; {a}")),
                "{a} not in\n{dsn}"
            );
        }
    }

    fn final_status(s: &[RecipientStatus]) -> bool {
        s.iter().all(|s| !s.is_pending())
    }

    #[tokio::test]
    async fn a_recipient_suppressed_while_queued_is_not_tried_again() {
        let h = harness(
            Script::default().rcpt("full@dest.test", &["452 4.2.2 mailbox full"]),
            |c| c.delivery.max_queue_lifetime = Duration::from_secs(3600),
        )
        .await;
        let r = h
            .submit(message("app@sender.test", &[("full@dest.test", None)]))
            .await;
        h.wait(r, |s| s[0] == RecipientStatus::Deferred).await;
        // A complaint (or `suppress add`) while it waits for its next attempt.
        let now = chrono::Utc::now().timestamp_millis();
        h.store
            .suppress(mailtrail::store::Suppression {
                address: "full@dest.test".into(),
                reason: "feedback".into(),
                source: "complaint".into(),
                first_at_ms: now,
                last_at_ms: now,
                count: 1,
                expires_at_ms: None,
            })
            .await
            .unwrap();
        let log = h.wait(r, |s| s[0] == RecipientStatus::Suppressed).await;
        let rcpt = &log.recipients[0];
        assert_eq!(rcpt.reason.as_deref(), Some("suppressed"));
        let last = rcpt
            .events
            .iter()
            .rev()
            .find(|e| e.kind == "attempt")
            .unwrap();
        assert_eq!(last.stage, Some(Stage::Local));
        assert!(
            last.reply_text
                .as_deref()
                .is_some_and(|t| t.contains("after complaint (feedback)")),
            "{last:?}"
        );
        // The sender is told, once.
        let dsn = loop {
            if let Some(d) = h.dsn_bodies().into_iter().next() {
                break d;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_reports(&dsn, &["full@dest.test"]);
        assert!(dsn.contains("Status: 5.7.1"), "{dsn}");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(h.dsn_bodies().len(), 1);
        assert_eq!(h.metrics.suppressed_recipients.get(), 1);
    }

    #[tokio::test]
    async fn only_a_refusal_of_the_recipient_itself_suppresses_it() {
        let mut script = Script::default().rcpt(
            "victim@dest.test",
            &["550 5.1.0 <app@sender.test>: Sender address rejected: User unknown in local recipient table"],
        );
        // One DATA reply for the whole transaction of two recipients.
        script.data_replies = vec!["550 5.1.1 user unknown".to_string()].into();
        let h = harness(script, |c| {
            c.delivery.dsn = false;
        })
        .await;
        let r = h
            .submit(message(
                "app@sender.test",
                &[
                    ("victim@dest.test", None),
                    ("one@dest.test", None),
                    ("two@dest.test", None),
                ],
            ))
            .await;
        let log = h.wait(r, final_status).await;
        let outcomes: Vec<_> = log
            .recipients
            .iter()
            .map(|r| (r.address.as_str(), r.status, r.last_reply_text.as_deref()))
            .collect();
        assert!(
            outcomes.iter().all(|o| o.1 == RecipientStatus::Failed),
            "{outcomes:?}"
        );
        // Neither the sender's refusal nor a DATA reply naming no one suppresses anybody.
        let now = chrono::Utc::now().timestamp_millis();
        assert!(h.store.suppression_list(now).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn records_each_recipient_outcome_and_sends_a_dsn_for_the_failed_one() {
        let h = harness(
            Script::default()
                .rcpt("unknown@dest.test", &["550 5.1.1 user unknown"])
                .rcpt("full@dest.test", &["452 4.2.2 mailbox full"]),
            |c| c.delivery.max_queue_lifetime = Duration::from_secs(3600),
        )
        .await;
        let r = h
            .submit(message(
                "app@sender.test",
                &[
                    ("ok@dest.test", None),
                    ("unknown@dest.test", None),
                    ("full@dest.test", None),
                ],
            ))
            .await;
        let log = h
            .wait(r, |s| {
                s[0] == RecipientStatus::Delivered
                    && s[1] == RecipientStatus::Failed
                    && s[2] == RecipientStatus::Deferred
            })
            .await;
        let ok = &log.recipients[0];
        assert_eq!(ok.last_reply_code, Some(250));
        let attempt = ok.events.iter().find(|e| e.kind == "attempt").unwrap();
        assert_eq!(attempt.stage, Some(Stage::Data));
        assert_eq!(attempt.remote_host.as_deref(), Some("mx.dest.test"));
        assert_eq!(attempt.remote_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(attempt.remote_port, Some(h.mx.port()));
        assert_eq!(attempt.reply_text.as_deref(), Some("Ok: queued as TEST1"));
        let unknown = &log.recipients[1];
        assert_eq!(unknown.last_reply_code, Some(550));
        assert_eq!(unknown.last_enhanced_status.as_deref(), Some("5.1.1"));
        assert_eq!(unknown.last_reply_text.as_deref(), Some("user unknown"));
        // Classified with the bounce classifier's vocabulary.
        assert_eq!(unknown.reason.as_deref(), Some("userunknown"));
        assert_eq!(unknown.bounce_type.as_deref(), Some("hard"));
        let full = &log.recipients[2];
        assert_eq!(full.last_reply_code, Some(452));
        assert_eq!(full.last_enhanced_status.as_deref(), Some("4.2.2"));
        assert_eq!(full.reason.as_deref(), Some("mailboxfull"));
        // The 550 5.1.1 at RCPT is a hard bounce: its address is suppressed in the same
        // commit, as a DSN's would be; the 452 only defers.
        let now = chrono::Utc::now().timestamp_millis();
        let list = h.store.suppression_list(now).await.unwrap();
        let listed: Vec<(&str, &str, &str)> = list
            .iter()
            .map(|s| (s.address.as_str(), s.reason.as_str(), s.source.as_str()))
            .collect();
        assert_eq!(listed, [("unknown@dest.test", "userunknown", "bounce")]);
        // Its log says so, after the reply that caused it.
        let kinds: Vec<&str> = unknown.events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(
            kinds,
            ["accepted", "attempt", "address_suppressed", "dsn_sent"],
            "{kinds:?}"
        );

        // The DSN for the failed recipient comes back to the sender's MX (same test MX), from
        // the null sender, with the RFC 3464 fields.
        let txs = h.wait_mx(2).await;
        let dsn = txs
            .iter()
            .find(|t| t.mail_from.starts_with("<>"))
            .expect("a DSN with the null sender");
        assert_eq!(dsn.rcpt_to[0].split(' ').next(), Some("<app@sender.test>"));
        let body = String::from_utf8_lossy(&dsn.body);
        for needle in [
            "From: Mail Delivery System <MAILER-DAEMON@relay.test>",
            "report-type=delivery-status",
            "Reporting-MTA: dns; relay.test",
            "Original-Envelope-Id: ENV-42",
            "Original-Recipient: rfc822;unknown@dest.test",
            "Final-Recipient: rfc822; unknown@dest.test",
            "Action: failed",
            "Status: 5.1.1",
            "Remote-MTA: dns; mx.dest.test",
            "Diagnostic-Code: smtp; 550 5.1.1 user unknown",
            "Content-Type: message/rfc822",
            "Message-ID: <m1@app>",
        ] {
            assert!(body.contains(needle), "missing {needle:?}:\n{body}");
        }
        // Only the failed recipient is reported (the deferred one has NOTIFY absent: no delay
        // DSN, and the delivered one went to a DSN-capable peer).
        assert!(!body.contains("full@dest.test"));
        assert!(!body.contains("Final-Recipient: rfc822; ok@dest.test"));

        let metrics = h.metrics.encode();
        assert!(
            metrics.contains("mailtrail_delivery_recipients_total{outcome=\"failed\"} 1"),
            "{metrics}"
        );
        assert!(metrics.contains("mailtrail_delivery_replies_total{class=\"5xx\"} 1"));
        h.shutdown.cancel();
        h.handle.join().await;
    }

    #[tokio::test]
    async fn a_pooled_connection_the_server_closed_is_replaced_without_a_failed_attempt() {
        let h = harness(
            Script {
                drop_at: Some(DropAt::AfterData),
                ..Script::default()
            },
            |_| {},
        )
        .await;
        let first = h
            .submit(message("app@sender.test", &[("a@dest.test", None)]))
            .await;
        h.wait(first, |s| s[0] == RecipientStatus::Delivered).await;
        // The MX closed the connection after its 250; the relay keeps it in its pool.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let second = h
            .submit(message("app@sender.test", &[("b@dest.test", None)]))
            .await;
        let log = h.wait(second, final_status).await;
        let attempts: Vec<_> = log.recipients[0]
            .events
            .iter()
            .filter(|e| e.kind == "attempt")
            .collect();
        assert_eq!(log.recipients[0].status, RecipientStatus::Delivered);
        assert_eq!(attempts.len(), 1, "{attempts:#?}");
        assert_eq!(attempts[0].reply_code, Some(250));
        assert_eq!(h.mx.transactions().len(), 2);
        assert_eq!(h.mx.connections(), 2);
        h.shutdown.cancel();
        h.handle.join().await;
    }

    #[tokio::test]
    async fn retries_a_deferred_recipient_until_delivered() {
        let h = harness(
            Script::default().rcpt(
                "grey@dest.test",
                &["450 4.7.1 greylisted, try later", "250 2.1.5 Ok"],
            ),
            |_| {},
        )
        .await;
        let r = h
            .submit(message("app@sender.test", &[("grey@dest.test", None)]))
            .await;
        let log = h.wait(r, |s| s[0] == RecipientStatus::Delivered).await;
        let attempts: Vec<_> = log.recipients[0]
            .events
            .iter()
            .filter(|e| e.kind == "attempt")
            .collect();
        assert_eq!(attempts.len(), 2, "{attempts:#?}");
        assert_eq!(attempts[0].status, RecipientStatus::Deferred);
        assert_eq!(attempts[0].reply_code, Some(450));
        assert_eq!(attempts[0].enhanced_status.as_deref(), Some("4.7.1"));
        assert_eq!(attempts[1].status, RecipientStatus::Delivered);
        // Retry waited at least retry_first.
        assert!(attempts[1].at_ms - attempts[0].at_ms >= 300);
        h.shutdown.cancel();
        h.handle.join().await;
    }

    #[tokio::test]
    async fn expires_after_the_queue_lifetime_and_reports_it() {
        let h = harness(
            Script::default().rcpt("busy@dest.test", &["451 4.3.0 try again later"]),
            |c| c.delivery.max_queue_lifetime = Duration::from_millis(1200),
        )
        .await;
        let r = h
            .submit(message("app@sender.test", &[("busy@dest.test", None)]))
            .await;
        let log = h.wait(r, final_status).await;
        let rc = &log.recipients[0];
        assert_eq!(rc.status, RecipientStatus::Expired);
        assert_eq!(rc.reason.as_deref(), Some("expired"));
        let attempts = rc.events.iter().filter(|e| e.kind == "attempt").count();
        assert!(attempts >= 2, "{attempts}");
        let txs = h.wait_mx(1).await;
        let dsn = txs.iter().find(|t| t.mail_from.starts_with("<>")).unwrap();
        let body = String::from_utf8_lossy(&dsn.body);
        assert!(body.contains("Action: failed"), "{body}");
        // RFC 3463 X.4.7, delivery time expired; the last reply in Diagnostic-Code.
        assert!(body.contains("Status: 4.4.7"), "{body}");
        assert!(body.contains("delivery time expired"), "{body}");
        assert!(body.contains("Diagnostic-Code: smtp; 451 4.3.0 try again later"));
        // The expiry DSN is recorded on the recipient, by its receipt.
        let log = h.log(r).await;
        let (action, dsn) = dsn_sent(&log.recipients[0], "dsn_sent").expect("expiry DSN");
        assert_eq!(action, "expired");
        assert_eq!(h.log(dsn.parse().unwrap()).await.envelope_sender, "");
        h.shutdown.cancel();
        h.handle.join().await;
    }

    #[tokio::test]
    async fn null_mx_and_nxdomain_fail_and_servfail_defers() {
        let h = harness(Script::default(), |c| {
            c.delivery.retry_first = Duration::from_secs(60);
            c.delivery.retry_max_interval = Duration::from_secs(60);
        })
        .await;
        h.dns.zone.null_mx("nomail.test");
        h.dns.zone.nxdomain("gone.test");
        h.dns.zone.servfail("broken.test");
        let r = h
            .submit(message(
                "",
                &[
                    ("a@nomail.test", None),
                    ("b@gone.test", None),
                    ("c@broken.test", None),
                ],
            ))
            .await;
        let log = h
            .wait(r, |s| s.iter().all(|s| *s != RecipientStatus::Queued))
            .await;
        let [a, b, c] = &log.recipients[..] else {
            panic!()
        };
        assert_eq!(a.status, RecipientStatus::Failed);
        assert_eq!(a.last_enhanced_status.as_deref(), Some("5.1.10"));
        assert_eq!(a.reason.as_deref(), Some("notaccept"));
        assert_eq!(b.status, RecipientStatus::Failed);
        assert_eq!(b.last_enhanced_status.as_deref(), Some("5.1.2"));
        assert_eq!(b.reason.as_deref(), Some("hostunknown"));
        assert_eq!(c.status, RecipientStatus::Deferred);
        // The queue gauge shows the one deferred recipient within a housekeeping tick.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !h
            .metrics
            .encode()
            .contains("mailtrail_queue_recipients 1\n")
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}",
                h.metrics.encode()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ev = a.events.iter().find(|e| e.kind == "attempt").unwrap();
        assert_eq!(ev.stage, Some(Stage::Dns));
        assert_eq!(ev.reply_code, None);
        // Null sender: no DSN about it, and the MX never saw anything.
        assert!(h.mx.transactions().is_empty());
        h.shutdown.cancel();
        h.handle.join().await;
    }

    #[tokio::test]
    async fn starttls_is_recorded_in_the_store() {
        let script = Script {
            starttls: true,
            ..Default::default()
        };
        let h = harness(script, |_| {}).await;
        let r = h
            .submit(message("app@sender.test", &[("a@dest.test", None)]))
            .await;
        let log = h.wait(r, final_status).await;
        let ev = log.recipients[0]
            .events
            .iter()
            .find(|e| e.kind == "attempt")
            .unwrap();
        assert!(
            ev.tls_version
                .as_deref()
                .unwrap_or("")
                .starts_with("TLSv1_"),
            "{ev:?}"
        );
        assert!(h.mx.transactions()[0].tls);
        h.shutdown.cancel();
        h.handle.join().await;
    }

    fn route_to(mx: &TestMx, tls: TlsPolicy) -> RouteConfig {
        RouteConfig {
            domains: vec!["*".into()],
            sender_domains: vec![],
            auth_users: vec![],
            mx: vec![format!("127.0.0.1:{}", mx.port())],
            tls,
            implicit_tls: false,
            verify_certificate: Some(false),
            ca_file: None,
            auth_user: None,
            auth_password_file: None,
            auth_password_env: None,
            keep_sender: false,
        }
    }

    #[tokio::test]
    async fn tls_required_route_without_starttls_defers() {
        let smarthost = TestMx::start(Script::default()).await;
        let route = route_to(&smarthost, TlsPolicy::Required);
        let h = harness(Script::default(), move |c| {
            c.routes = vec![route];
            c.delivery.retry_first = Duration::from_secs(60);
            c.delivery.retry_max_interval = Duration::from_secs(60);
        })
        .await;
        let r = h
            .submit(message("app@sender.test", &[("a@anywhere.test", None)]))
            .await;
        let log = h.wait(r, |s| s[0] == RecipientStatus::Deferred).await;
        let ev = log.recipients[0]
            .events
            .iter()
            .find(|e| e.kind == "attempt")
            .unwrap();
        assert_eq!(ev.stage, Some(Stage::Connect));
        assert!(
            ev.reply_text.as_deref().unwrap_or("").contains("STARTTLS"),
            "{ev:?}"
        );
        assert!(smarthost.transactions().is_empty());
        assert_eq!(smarthost.connections(), 1);
        h.shutdown.cancel();
        h.handle.join().await;
    }

    /// Under VERP every recipient is its own transaction; the sender still gets one DSN
    /// for the message, listing every failed recipient (Postfix: one bounce per message).
    #[tokio::test]
    async fn failed_recipients_of_one_message_share_one_dsn() {
        let script = Script::default()
            .rcpt("x@dest.test", &["550 5.1.1 no x"])
            .rcpt("y@dest.test", &["550 5.1.1 no y"])
            .rcpt("z@dest.test", &["550 5.1.1 no z"]);
        let h = harness(script, |c| {
            c.delivery.bounce_domain = "bounces.relay.test".into();
        })
        .await;
        let r = h
            .submit(message(
                "app@sender.test",
                &[
                    ("x@dest.test", None),
                    ("ok@dest.test", None),
                    ("y@dest.test", None),
                    ("z@dest.test", None),
                ],
            ))
            .await;
        h.wait(r, final_status).await;
        // The delivered copy, then the DSN to app@sender.test (the refused ones never got
        // to DATA); a moment more for any second DSN.
        let txs = h.wait_mx(2).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let dsns = h.dsn_bodies();
        assert_eq!(dsns.len(), 1, "{txs:#?}");
        let body = &dsns[0];
        assert_reports(body, &["x@dest.test", "y@dest.test", "z@dest.test"]);
        assert!(
            !body.contains("Final-Recipient: rfc822; ok@dest.test"),
            "{body}"
        );
        h.shutdown.cancel();
        h.handle.join().await;
    }

    #[tokio::test]
    async fn verp_gives_each_recipient_its_own_sender_and_transaction() {
        let h = harness(Script::default(), |c| {
            c.delivery.bounce_domain = "bounces.relay.test".into();
            // One connection per destination: the second transaction waits for the first's
            // connection and reuses it.
            c.delivery.max_connections_per_destination = 1;
        })
        .await;
        let r = h
            .submit(message(
                "app@sender.test",
                &[("a@dest.test", None), ("b@dest.test", None)],
            ))
            .await;
        h.wait(r, final_status).await;
        let txs = h.mx.transactions();
        assert_eq!(txs.len(), 2);
        let rs = r.to_string().to_ascii_lowercase();
        for t in &txs {
            assert_eq!(t.rcpt_to.len(), 1);
            let idx = if t.rcpt_to[0].starts_with("<a@") {
                0
            } else {
                1
            };
            let prefix = format!("<bounces+{rs}-{idx}-");
            assert!(
                t.mail_from.starts_with(&prefix),
                "{} vs {prefix}",
                t.mail_from
            );
            assert!(t.mail_from.contains("@bounces.relay.test>"));
        }
        // The two transactions shared one connection; the first one's final reply ended it,
        // so the second followed without RSET.
        assert_eq!(h.mx.connections(), 1);
        assert!(!h.mx.commands().iter().any(|c| c == "RSET"));
        h.shutdown.cancel();
        h.handle.join().await;
    }

    /// The `dsn_sent` event on a recipient: (action, the DSN's receipt).
    fn dsn_sent(rc: &mailtrail::store::RecipientLog, kind: &str) -> Option<(String, String)> {
        let e = rc.events.iter().find(|e| e.kind == kind)?;
        Some((e.dsn_action.clone()?, e.dsn_receipt.clone()?))
    }

    /// A failure DSN and a success DSN leave an event on the recipient each reports, naming
    /// the DSN's receipt, by which the log finds the DSN itself.
    #[tokio::test]
    async fn failure_and_success_dsns_are_recorded_on_the_recipients_they_report() {
        let mut script = Script::default().rcpt("unknown@dest.test", &["550 5.1.1 user unknown"]);
        script.extensions.retain(|e| e != "DSN");
        let h = harness(script, |_| {}).await;
        let success = Notify {
            success: true,
            failure: true,
            ..Default::default()
        };
        let r = h
            .submit(message(
                "app@sender.test",
                &[("ok@dest.test", Some(success)), ("unknown@dest.test", None)],
            ))
            .await;
        h.wait(r, final_status).await;
        h.wait_mx(3).await;
        let log = h.log(r).await;
        let (relayed, success_dsn) = dsn_sent(&log.recipients[0], "dsn_sent").expect("relayed");
        let (failed, failure_dsn) = dsn_sent(&log.recipients[1], "dsn_sent").expect("failed");
        assert_eq!((relayed.as_str(), failed.as_str()), ("relayed", "failed"));
        assert_ne!(success_dsn, failure_dsn);
        // The status stays what the attempt made it.
        assert_eq!(log.recipients[0].status, RecipientStatus::Delivered);
        assert_eq!(log.recipients[1].status, RecipientStatus::Failed);
        for (dsn, action) in [
            (success_dsn, "Action: relayed"),
            (failure_dsn, "Action: failed"),
        ] {
            let dsn = h.log(dsn.parse().unwrap()).await;
            assert_eq!(dsn.envelope_sender, "");
            assert_eq!(dsn.recipients[0].address, "app@sender.test");
            let body =
                String::from_utf8_lossy(&h.sqlite.body(dsn.receipt).await.unwrap()).into_owned();
            assert!(body.contains(action), "{body}");
        }
        h.shutdown.cancel();
        h.handle.join().await;
    }

    #[tokio::test]
    async fn success_dsn_is_relayed_when_the_peer_lacks_dsn() {
        let mut script = Script::default();
        script.extensions.retain(|e| e != "DSN");
        let h = harness(script, |_| {}).await;
        let notify = Notify {
            success: true,
            ..Default::default()
        };
        let r = h
            .submit(message("app@sender.test", &[("a@dest.test", Some(notify))]))
            .await;
        h.wait(r, final_status).await;
        let txs = h.wait_mx(2).await;
        let dsn = txs.iter().find(|t| t.mail_from.starts_with("<>")).unwrap();
        let body = String::from_utf8_lossy(&dsn.body);
        assert!(body.contains("Action: relayed"), "{body}");
        assert!(body.contains("Content-Type: text/rfc822-headers"));
        // No DSN parameters were sent to a peer that does not offer DSN.
        let orig = txs.iter().find(|t| !t.mail_from.starts_with("<>")).unwrap();
        assert_eq!(orig.rcpt_to[0], "<a@dest.test>");
        h.shutdown.cancel();
        h.handle.join().await;
    }

    #[tokio::test]
    async fn smarthost_route_authenticates_inside_starttls() {
        let smarthost = TestMx::start(Script {
            starttls: true,
            auth: Some(("relayuser".into(), "s3cret pass".into())),
            ..Default::default()
        })
        .await;
        let secret_dir = tempfile::tempdir().unwrap();
        let secret = secret_dir.path().join("password");
        std::fs::write(&secret, "s3cret pass\n").unwrap();
        let mut route = route_to(&smarthost, TlsPolicy::Required);
        route.auth_user = Some("relayuser".into());
        route.auth_password_file = Some(secret);
        let h = harness(Script::default(), move |c| c.routes = vec![route]).await;
        let r = h
            .submit(message("app@sender.test", &[("a@anywhere.test", None)]))
            .await;
        let log = h.wait(r, final_status).await;
        assert_eq!(log.recipients[0].status, RecipientStatus::Delivered);
        let tx = smarthost.transactions();
        assert_eq!(tx.len(), 1);
        assert!(tx[0].tls);
        assert_eq!(tx[0].auth_user.as_deref(), Some("relayuser"));
        // AUTH came after STARTTLS.
        let cmds = smarthost.commands();
        let tls_at = cmds.iter().position(|c| c == "STARTTLS").unwrap();
        let auth_at = cmds.iter().position(|c| c.starts_with("AUTH ")).unwrap();
        assert!(tls_at < auth_at);
        // Direct MX was not used.
        assert!(h.mx.transactions().is_empty());
        h.shutdown.cancel();
        h.handle.join().await;
    }

    /// A smarthost that answers AUTH with `250-` lines for ever: the reply is refused after
    /// `MAX_LINES` lines (mail-send's reader kept two bytes of each until the command
    /// timeout), the mail is deferred saying so, and the password is in no recorded text.
    #[tokio::test]
    async fn an_endless_auth_reply_defers_with_a_clear_error_and_no_password() {
        let (addr, server) = super::endless_peer(
            "250-smarthost.test\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n",
            "AUTH",
        )
        .await;
        let password = "s3cret-pass-42";
        let mut route = RouteConfig {
            domains: vec!["*".into()],
            sender_domains: vec![],
            auth_users: vec![],
            mx: vec![addr.to_string()],
            tls: TlsPolicy::None,
            implicit_tls: false,
            verify_certificate: Some(false),
            ca_file: None,
            auth_user: Some("relayuser".into()),
            auth_password_file: None,
            auth_password_env: None,
            keep_sender: false,
        };
        let secret_dir = tempfile::tempdir().unwrap();
        let secret = secret_dir.path().join("password");
        std::fs::write(&secret, format!("{password}\n")).unwrap();
        route.auth_password_file = Some(secret);
        let h = harness(Script::default(), move |c| {
            c.routes = vec![route];
            c.delivery.retry_first = Duration::from_secs(60);
            c.delivery.retry_max_interval = Duration::from_secs(60);
        })
        .await;
        let r = h
            .submit(message("app@sender.test", &[("a@anywhere.test", None)]))
            .await;
        let log = h.wait(r, |s| s[0] == RecipientStatus::Deferred).await;
        let rc = &log.recipients[0];
        let text = rc.last_reply_text.clone().unwrap_or_default();
        assert!(
            text.contains("AUTH") && text.contains("more than 1000 lines"),
            "{text}"
        );
        let (sent, commands) = server.await.unwrap();
        assert!(sent < 50_000_000, "the client read on for {sent} bytes");
        // What went on the wire (PLAIN's initial response) is in no recorded text.
        let auth = commands.last().unwrap();
        let wire_secret = auth.rsplit(' ').next().unwrap();
        assert!(
            auth.starts_with("AUTH PLAIN ") && wire_secret.len() > 8,
            "{auth}"
        );
        let recorded = serde_json::to_string(&log).unwrap();
        assert!(!recorded.contains(password), "{recorded}");
        assert!(!recorded.contains(wire_secret), "{recorded}");
        h.shutdown.cancel();
        h.handle.join().await;
    }

    #[tokio::test]
    async fn rejected_smarthost_credentials_defer() {
        let smarthost = TestMx::start(Script {
            auth: Some(("relayuser".into(), "right".into())),
            ..Default::default()
        })
        .await;
        let mut route = route_to(&smarthost, TlsPolicy::None);
        route.auth_user = Some("relayuser".into());
        route.auth_password_env = Some("MAILTRAIL_TEST_WRONG_PASSWORD".into());
        // SAFETY: set once, before the relay starts, and read by nothing else concurrently.
        unsafe { std::env::set_var("MAILTRAIL_TEST_WRONG_PASSWORD", "wrong") };
        let h = harness(Script::default(), move |c| {
            c.routes = vec![route];
            c.delivery.retry_first = Duration::from_secs(60);
            c.delivery.retry_max_interval = Duration::from_secs(60);
        })
        .await;
        let r = h
            .submit(message("app@sender.test", &[("a@anywhere.test", None)]))
            .await;
        let log = h.wait(r, |s| s[0] == RecipientStatus::Deferred).await;
        let rc = &log.recipients[0];
        assert_eq!(rc.last_reply_code, Some(535));
        assert!(smarthost.transactions().is_empty());
        // The next messages meet the suspended destination: deferred with the same
        // reason, and no second failed login (Postfix: "delivery temporarily suspended").
        for i in 0..3 {
            let r = h
                .submit(message(
                    "app@sender.test",
                    &[(&format!("b{i}@anywhere.test"), None)],
                ))
                .await;
            let log = h.wait(r, |s| s[0] == RecipientStatus::Deferred).await;
            let text = log.recipients[0]
                .last_reply_text
                .clone()
                .unwrap_or_default();
            assert!(
                text.starts_with("delivery temporarily suspended: "),
                "{text}"
            );
            assert!(text.contains("535"), "{text}");
        }
        assert_eq!(smarthost.connections(), 1);
        // `queue retry` with the password still wrong: one probe, one more failed login,
        // not one per message; every message deferred again.
        assert_eq!(h.store.queue_retry(None).await.unwrap(), 4);
        h.handle.wake();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while h
            .store
            .queue_list()
            .await
            .unwrap()
            .iter()
            .any(|q| q.next_attempt_at_ms <= chrono::Utc::now().timestamp_millis())
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "retried mail still due"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let log = h.log(r).await;
        let attempts = log.recipients[0]
            .events
            .iter()
            .filter(|e| e.kind == "attempt");
        assert_eq!(attempts.count(), 2, "{log:#?}");
        assert_eq!(smarthost.connections(), 2);
        tokio::time::sleep(Duration::from_millis(5)).await;
        // `queue retry` after the password is fixed goes out at once, suspension or not.
        smarthost.set_script(|s| s.auth = Some(("relayuser".into(), "wrong".into())));
        assert_eq!(h.store.queue_retry(Some(r)).await.unwrap(), 1);
        h.handle.wake();
        let log = h.wait(r, |s| s[0] == RecipientStatus::Delivered).await;
        assert_eq!(log.recipients[0].last_reply_code, Some(250));
        assert_eq!(smarthost.connections(), 3);
        h.shutdown.cancel();
        h.handle.join().await;
    }

    /// A recipient deferred for want of TLS is a security error in the log, not what the
    /// bounce rules would read in the words of mailtrail's own error.
    #[tokio::test]
    async fn a_route_that_requires_tls_of_a_server_without_it_defers_as_a_security_error() {
        let smarthost = TestMx::start(Script::default()).await;
        let route = route_to(&smarthost, TlsPolicy::Required);
        let h = harness(Script::default(), move |c| c.routes = vec![route]).await;
        let r = h
            .submit(message("app@sender.test", &[("a@anywhere.test", None)]))
            .await;
        let log = h.wait(r, |s| s[0] == RecipientStatus::Deferred).await;
        let rc = &log.recipients[0];
        assert_eq!(rc.reason.as_deref(), Some("securityerror"), "{rc:?}");
        assert!(smarthost.transactions().is_empty());
        h.shutdown.cancel();
        h.handle.join().await;
    }

    #[tokio::test]
    async fn implicit_tls_route() {
        let smarthost = TestMx::start(Script {
            implicit_tls: true,
            ..Default::default()
        })
        .await;
        let mut route = route_to(&smarthost, TlsPolicy::Required);
        route.implicit_tls = true;
        let h = harness(Script::default(), move |c| c.routes = vec![route]).await;
        let r = h
            .submit(message("app@sender.test", &[("a@anywhere.test", None)]))
            .await;
        let log = h.wait(r, final_status).await;
        assert_eq!(log.recipients[0].status, RecipientStatus::Delivered);
        assert!(smarthost.transactions()[0].tls);
        h.shutdown.cancel();
        h.handle.join().await;
    }

    #[tokio::test]
    async fn falls_back_to_the_next_mx_when_the_first_refuses_connections() {
        let h = harness(Script::default(), |_| {}).await;
        // fallback.test: preferred MX on 127.0.0.2, where nothing listens on the MX port.
        h.dns
            .zone
            .mx("fallback.test", 5, "down.fallback.test")
            .mx("fallback.test", 50, "mx.dest.test")
            .addr("down.fallback.test", "127.0.0.2".parse().unwrap());
        let r = h
            .submit(message("app@sender.test", &[("a@fallback.test", None)]))
            .await;
        let log = h.wait(r, final_status).await;
        let rc = &log.recipients[0];
        assert_eq!(rc.status, RecipientStatus::Delivered);
        let ev = rc.events.iter().find(|e| e.kind == "attempt").unwrap();
        assert_eq!(ev.remote_host.as_deref(), Some("mx.dest.test"));
        // The preferred MX that refused is recorded on the attempt the second one decided.
        let tried = &ev.tried_first;
        assert_eq!(tried.len(), 1, "{tried:?}");
        assert_eq!(
            tried[0].hop,
            format!("down.fallback.test[127.0.0.2]:{}", h.mx.port())
        );
        assert_eq!(tried[0].step, "connect");
        assert_eq!(ev.reply_code, Some(250));
        h.shutdown.cancel();
        h.handle.join().await;
    }

    /// An MX that greets with 421 and hangs up is recorded on the attempt the next one
    /// decided, with its reply verbatim.
    #[tokio::test]
    async fn an_mx_that_greets_421_is_recorded_before_the_next_one_delivers() {
        use tokio::io::AsyncWriteExt;
        let h = harness(Script::default(), |_| {}).await;
        // The preferred MX on 127.0.0.2, the harness's MX port: greets 421 and hangs up.
        let busy = tokio::net::TcpListener::bind(("127.0.0.2", h.mx.port()))
            .await
            .unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = busy.accept().await {
                let _ = s.write_all(b"421 4.3.2 busy, try later\r\n").await;
            }
        });
        h.dns
            .zone
            .mx("busy.test", 5, "busy.busy.test")
            .mx("busy.test", 50, "mx.dest.test")
            .addr("busy.busy.test", "127.0.0.2".parse().unwrap());
        let r = h
            .submit(message("app@sender.test", &[("a@busy.test", None)]))
            .await;
        let log = h.wait(r, final_status).await;
        let rc = &log.recipients[0];
        assert_eq!(rc.status, RecipientStatus::Delivered);
        assert_eq!(rc.last_reply_code, Some(250));
        let ev = rc.events.iter().find(|e| e.kind == "attempt").unwrap();
        assert_eq!(ev.remote_host.as_deref(), Some("mx.dest.test"));
        let tried = &ev.tried_first;
        assert_eq!(tried.len(), 1, "{tried:?}");
        assert_eq!(
            tried[0].hop,
            format!("busy.busy.test[127.0.0.2]:{}", h.mx.port())
        );
        assert_eq!(tried[0].step, "greeting");
        assert_eq!(tried[0].reply_code, Some(421));
        assert_eq!(tried[0].text, "421 4.3.2 busy, try later");
        h.shutdown.cancel();
        h.handle.join().await;
    }

    #[tokio::test]
    async fn delay_dsn_is_sent_once_when_notify_asks_for_it() {
        let h = harness(
            Script::default().rcpt("slow@dest.test", &["451 4.4.1 no answer from host"]),
            |c| {
                c.delivery.delay_dsn_after = Duration::ZERO;
                c.delivery.max_queue_lifetime = Duration::from_secs(3600);
            },
        )
        .await;
        let notify = Notify {
            delay: true,
            failure: true,
            ..Default::default()
        };
        let r = h
            .submit(message(
                "app@sender.test",
                &[("slow@dest.test", Some(notify))],
            ))
            .await;
        // Wait for at least three attempts.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let log = h.log(r).await;
            let n = log.recipients[0]
                .events
                .iter()
                .filter(|e| e.kind == "attempt")
                .count();
            if n >= 3 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let dsns = h.dsn_bodies();
        assert_eq!(dsns.len(), 1, "one delay DSN, not one per attempt");
        let body = &dsns[0];
        assert!(body.contains("Action: delayed"), "{body}");
        assert!(body.contains("Status: 4.4.1"));
        assert!(body.contains("Will-Retry-Until: "));
        let log = h.log(r).await;
        let (action, dsn) = dsn_sent(&log.recipients[0], "delay_dsn_sent").expect("delay DSN");
        assert_eq!(action, "delayed");
        let dsn = h.log(dsn.parse().unwrap()).await;
        assert_eq!(dsn.recipients[0].address, "app@sender.test");
        assert!(
            !log.recipients[0]
                .events
                .iter()
                .any(|e| e.kind == "dsn_sent"),
            "the delay DSN is recorded once"
        );
        h.shutdown.cancel();
        h.handle.join().await;
    }

    /// Three recipients of one message, deferred together, come back together: the delay
    /// DSN due on a retry lists all three, once (per-recipient jitter sent two or three).
    #[tokio::test]
    async fn recipients_deferred_together_get_one_delay_dsn() {
        let later = ["451 4.7.1 greylisted, try again later"];
        let h = harness(
            Script::default()
                .rcpt("x@dest.test", &later)
                .rcpt("y@dest.test", &later)
                .rcpt("z@dest.test", &later),
            |c| {
                // Due on a retry, not at the first attempt.
                c.delivery.delay_dsn_after = Duration::from_millis(700);
                c.delivery.max_queue_lifetime = Duration::from_secs(3600);
            },
        )
        .await;
        let notify = Notify {
            delay: true,
            ..Default::default()
        };
        let rcpts: Vec<(&str, Option<Notify>)> = ["x@dest.test", "y@dest.test", "z@dest.test"]
            .into_iter()
            .map(|a| (a, Some(notify)))
            .collect();
        let r = h.submit(message("app@sender.test", &rcpts)).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let log = h.log(r).await;
            let sent = log
                .recipients
                .iter()
                .filter(|rc| rc.events.iter().any(|e| e.kind == "delay_dsn_sent"))
                .count();
            if sent == 3 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{log:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Every DSN is queued by now; wait until none is left in the queue.
        loop {
            let queue = h.store.queue_list().await.unwrap();
            if !queue.iter().any(|q| q.envelope_sender.is_empty()) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{queue:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let dsns = h.dsn_bodies();
        assert_eq!(dsns.len(), 1, "one delay DSN for the three");
        assert_reports(&dsns[0], &["x@dest.test", "y@dest.test", "z@dest.test"]);
        h.shutdown.cancel();
        h.handle.join().await;
    }

    #[tokio::test]
    async fn shutdown_lets_a_running_transaction_finish() {
        let h = harness(
            Script {
                reply_delay: Duration::from_millis(150),
                ..Default::default()
            },
            |_| {},
        )
        .await;
        let r = h
            .submit(message("app@sender.test", &[("a@dest.test", None)]))
            .await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !h.mx.commands().iter().any(|c| c.starts_with("MAIL FROM")) {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        h.shutdown.cancel();
        let store = h.store.clone();
        let mx_tx = {
            let Harness { handle, mx, .. } = h;
            handle.join().await;
            mx.transactions()
        };
        assert_eq!(mx_tx.len(), 1);
        let log = store
            .log(&LogQuery {
                key: LogKey::Receipt(r),
                since_ms: None,
                until_ms: None,
                limit: 1,
                before: None,
            })
            .await
            .unwrap();
        assert_eq!(log[0].recipients[0].status, RecipientStatus::Delivered);
    }

    #[tokio::test]
    async fn disabled_delivery_leaves_mail_queued() {
        let h = harness(Script::default(), |c| c.delivery.enabled = false).await;
        let r = h
            .submit(message("app@sender.test", &[("a@dest.test", None)]))
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(h.log(r).await.recipients[0].status, RecipientStatus::Queued);
        assert_eq!(h.mx.connections(), 0);
        h.handle.join().await;
    }

    /// Postfix's `smtp-sink` as the MX: interoperability with a real MTA's server side, and
    /// a throughput figure (messages through scheduler, SMTP and SQLite per second).
    /// `MAILTRAIL_SINK_MESSAGES` sets how many (default 200).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delivers_a_batch_to_postfix_smtp_sink() {
        let sink_bin = std::path::Path::new("/usr/sbin/smtp-sink");
        assert!(
            sink_bin.exists(),
            "Postfix smtp-sink is needed (apt-get install postfix)"
        );
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let dump = tempfile::tempdir().unwrap();
        let mut perms = std::fs::metadata(dump.path()).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o777);
        std::fs::set_permissions(dump.path(), perms).unwrap();
        let is_root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        let mut cmd = std::process::Command::new(sink_bin);
        if is_root {
            cmd.args(["-u", "nobody"]);
        }
        let template = format!("{}/%H%M%S.", dump.path().display());
        let mut sink = cmd
            .args(["-d", &template, &format!("127.0.0.1:{port}"), "100"])
            .spawn()
            .unwrap();
        // Wait until it listens.
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let n: usize = std::env::var("MAILTRAIL_SINK_MESSAGES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200);
        // Queue everything first with delivery off, then start delivery and time the drain.
        let h = harness(Script::default(), move |c| {
            c.delivery.mx_port = port;
            c.delivery.max_connections_per_destination = 20;
            c.delivery.enabled = false;
        })
        .await;
        let mut receipts = Vec::new();
        for i in 0..n {
            let mut m = message(
                "app@sender.test",
                &[("a@dest.test", None), ("b@dest.test", None)],
            );
            m.body = format!("Subject: {i}\r\n\r\n.dot line {i}\r\n").into_bytes();
            receipts.push(m.receipt);
            h.store.accept(m).await.unwrap();
        }
        let mut config = (*h.config).clone();
        config.delivery.enabled = true;
        let stats = &h.sqlite.writer_stats();
        let load = |c: &prometheus_client::metrics::counter::Counter| c.get();
        let (commits0, commands0) = (load(&stats.commits), load(&stats.commands));
        let started = std::time::Instant::now();
        let delivery = Delivery::start(
            Arc::new(config),
            h.store.clone(),
            h.metrics.clone(),
            h.shutdown.clone(),
        )
        .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let (pending, _) = h.store.queue_stats().await.unwrap();
            if pending == 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{pending} still pending"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let elapsed = started.elapsed();
        eprintln!(
            "smtp-sink: {n} messages x 2 recipients delivered in {:.2} s = {:.0} messages/s; \
             store: {} write commands in {} commits",
            elapsed.as_secs_f64(),
            n as f64 / elapsed.as_secs_f64(),
            load(&stats.commands) - commands0,
            load(&stats.commits) - commits0,
        );
        for r in [receipts[0], receipts[n - 1]] {
            let log = h.log(r).await;
            assert!(
                log.recipients
                    .iter()
                    .all(|r| r.status == RecipientStatus::Delivered),
                "{log:#?}"
            );
        }
        // Latency of one message on an idle relay: accepted → wake → delivered.
        let one = message("app@sender.test", &[("a@dest.test", None)]);
        let r = one.receipt;
        let t0 = std::time::Instant::now();
        h.store.accept(one).await.unwrap();
        delivery.wake();
        h.wait(r, final_status).await;
        eprintln!(
            "smtp-sink: one message accepted → delivered in {:.1} ms",
            t0.elapsed().as_secs_f64() * 1000.0
        );
        let _ = sink.kill();
        let _ = sink.wait();
        let files: Vec<_> = std::fs::read_dir(dump.path()).unwrap().flatten().collect();
        assert_eq!(files.len(), n + 1, "one dump per transaction");
        let one = std::fs::read_to_string(files[0].path()).unwrap();
        assert!(one.contains("X-Rcpt-Args: <a@dest.test>"), "{one}");
        assert!(
            one.contains("\n.dot line "),
            "dot-stuffing undone by Postfix: {one}"
        );
        h.shutdown.cancel();
        delivery.join().await;
    }

    #[tokio::test]
    async fn per_destination_connection_limit_holds() {
        let h = harness(
            Script {
                reply_delay: Duration::from_millis(30),
                ..Default::default()
            },
            |c| c.delivery.max_connections_per_destination = 2,
        )
        .await;
        let mut receipts = Vec::new();
        for _ in 0..8 {
            receipts.push(
                h.submit(message("app@sender.test", &[("a@dest.test", None)]))
                    .await,
            );
        }
        for r in receipts {
            h.wait(r, final_status).await;
        }
        assert_eq!(h.mx.transactions().len(), 8);
        assert!(h.mx.peak_active() <= 2, "peak {}", h.mx.peak_active());
        // Connections were reused across messages rather than opened per message.
        assert!(
            h.mx.connections() <= 2,
            "{} connections",
            h.mx.connections()
        );
        let m = h.metrics.encode();
        assert!(m.contains("mailtrail_outbound_connections_open"), "{m}");
        h.shutdown.cancel();
        h.handle.join().await;
    }

    #[tokio::test]
    async fn smarthost_certificate_is_verified_against_ca_file() {
        let smarthost = TestMx::start(Script {
            starttls: true,
            ..Default::default()
        })
        .await;
        let ca_dir = tempfile::tempdir().unwrap();
        let ca = ca_dir.path().join("ca.pem");
        std::fs::write(&ca, &smarthost.cert_pem).unwrap();
        let mut trusted = route_to(&smarthost, TlsPolicy::Required);
        trusted.domains = vec!["trusted.test".into()];
        trusted.verify_certificate = Some(true);
        trusted.ca_file = Some(ca);
        let mut untrusted = route_to(&smarthost, TlsPolicy::Required);
        untrusted.domains = vec!["untrusted.test".into()];
        untrusted.verify_certificate = Some(true);
        let h = harness(Script::default(), move |c| {
            c.routes = vec![trusted, untrusted];
            c.delivery.retry_first = Duration::from_secs(60);
            c.delivery.retry_max_interval = Duration::from_secs(60);
        })
        .await;
        let ok = h
            .submit(message("app@sender.test", &[("a@trusted.test", None)]))
            .await;
        let bad = h
            .submit(message("app@sender.test", &[("b@untrusted.test", None)]))
            .await;
        let log = h.wait(ok, final_status).await;
        assert_eq!(log.recipients[0].status, RecipientStatus::Delivered);
        let log = h.wait(bad, |s| s[0] == RecipientStatus::Deferred).await;
        let ev = log.recipients[0]
            .events
            .iter()
            .find(|e| e.kind == "attempt")
            .unwrap();
        assert!(
            ev.reply_text.as_deref().unwrap_or("").contains("TLS"),
            "{ev:?}"
        );
        assert_eq!(smarthost.transactions().len(), 1);
        h.shutdown.cancel();
        h.handle.join().await;
    }

    #[tokio::test]
    async fn missing_body_fails_the_recipients_instead_of_retrying_forever() {
        let h = harness(Script::default(), |c| c.delivery.enabled = false).await;
        let r = h
            .submit(message("app@sender.test", &[("a@dest.test", None)]))
            .await;
        // Damage the spool behind the store's back, as a disk error or a bad restore would.
        let db = rusqlite::Connection::open(h.config.db_path()).unwrap();
        db.execute("DELETE FROM bodies WHERE receipt = ?1", [r.to_string()])
            .unwrap();
        drop(db);
        let mut config = (*h.config).clone();
        config.delivery.enabled = true;
        let delivery = Delivery::start(
            Arc::new(config),
            h.store.clone(),
            h.metrics.clone(),
            h.shutdown.clone(),
        )
        .unwrap();
        let log = h.wait(r, final_status).await;
        let rc = &log.recipients[0];
        assert_eq!(rc.status, RecipientStatus::Failed);
        assert!(
            rc.last_reply_text
                .as_deref()
                .unwrap_or("")
                .contains("body missing"),
            "{rc:?}"
        );
        assert_eq!(h.mx.connections(), 0);
        h.shutdown.cancel();
        delivery.join().await;
    }

    #[tokio::test]
    async fn dsn_off_sends_no_report() {
        let h = harness(
            Script::default().rcpt("unknown@dest.test", &["550 5.1.1 user unknown"]),
            |c| c.delivery.dsn = false,
        )
        .await;
        let r = h
            .submit(message("app@sender.test", &[("unknown@dest.test", None)]))
            .await;
        let log = h.wait(r, final_status).await;
        assert_eq!(log.recipients[0].status, RecipientStatus::Failed);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !h.mx
                .transactions()
                .iter()
                .any(|t| t.mail_from.starts_with("<>"))
        );
        assert!(
            !h.mx
                .commands()
                .iter()
                .any(|c| c.starts_with("MAIL FROM:<>"))
        );
        h.shutdown.cancel();
        h.handle.join().await;
    }

    #[tokio::test]
    async fn total_connection_limit_closes_idle_connections_for_other_destinations() {
        let h = harness(Script::default(), |c| c.delivery.max_connections = 1).await;
        h.dns.zone.mx("other.test", 10, "mx.dest.test");
        let started = std::time::Instant::now();
        let a = h
            .submit(message("app@sender.test", &[("a@dest.test", None)]))
            .await;
        h.wait(a, final_status).await;
        // dest.test's connection now idles, holding the only slot; other.test must get it by
        // closing that idle connection, not by waiting out the idle limit.
        let b = h
            .submit(message("app@sender.test", &[("b@other.test", None)]))
            .await;
        let log = h.wait(b, final_status).await;
        assert_eq!(log.recipients[0].status, RecipientStatus::Delivered);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(h.mx.peak_active(), 1);
        assert_eq!(h.mx.connections(), 2);
        h.shutdown.cancel();
        h.handle.join().await;
    }

    #[tokio::test]
    async fn a_421_at_rcpt_defers_every_recipient_of_the_transaction_with_that_reply() {
        let h = harness(
            Script::default().rcpt("b@dest.test", &["421 4.3.2 Service shutting down"]),
            |c| c.delivery.retry_first = Duration::from_secs(3600),
        )
        .await;
        let r = h
            .submit(message(
                "app@sender.test",
                &[
                    ("a@dest.test", None),
                    ("b@dest.test", None),
                    ("c@dest.test", None),
                ],
            ))
            .await;
        let log = h
            .wait(r, |s| s.iter().all(|s| *s == RecipientStatus::Deferred))
            .await;
        for rcpt in &log.recipients {
            assert_eq!(rcpt.last_reply_code, Some(421), "{}", rcpt.address);
            assert_eq!(rcpt.last_enhanced_status.as_deref(), Some("4.3.2"));
            assert_eq!(
                rcpt.last_reply_text.as_deref(),
                Some("Service shutting down"),
                "{}",
                rcpt.address
            );
        }
        h.shutdown.cancel();
        h.handle.join().await;
    }

    #[tokio::test]
    async fn a_pooled_connection_closed_for_another_destination_says_quit_first() {
        // One connection in all: the second domain's mail needs the first one's slot.
        let h = harness(Script::default(), |c| c.delivery.max_connections = 1).await;
        let first = h
            .submit(message("app@sender.test", &[("a@dest.test", None)]))
            .await;
        h.wait(first, final_status).await;
        assert!(!h.mx.commands().iter().any(|c| c == "QUIT"));
        let second = h
            .submit(message("app@sender.test", &[("b@sender.test", None)]))
            .await;
        h.wait(second, final_status).await;
        // RFC 5321 4.1.1.10: the idle connection to dest.test was closed with QUIT.
        let quit_seen = || h.mx.commands().iter().any(|c| c == "QUIT");
        for _ in 0..50 {
            if quit_seen() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(quit_seen(), "{:?}", h.mx.commands());
        h.shutdown.cancel();
        h.handle.join().await;
    }

    #[tokio::test]
    async fn a_421_to_a_pipelined_data_is_the_reply_of_every_recipient() {
        let h = harness(
            Script {
                data_command_reply: "421 4.3.2 shutting down".into(),
                ..Default::default()
            },
            |c| c.delivery.retry_first = Duration::from_secs(3600),
        )
        .await;
        let r = h
            .submit(message(
                "app@sender.test",
                &[("a@dest.test", None), ("b@dest.test", None)],
            ))
            .await;
        let log = h
            .wait(r, |s| s.iter().all(|s| *s == RecipientStatus::Deferred))
            .await;
        for rcpt in &log.recipients {
            assert_eq!(rcpt.last_reply_code, Some(421), "{}", rcpt.address);
            assert_eq!(rcpt.last_reply_text.as_deref(), Some("shutting down"));
        }
        h.shutdown.cancel();
        h.handle.join().await;
    }

    #[tokio::test]
    async fn a_global_dsn_to_a_next_hop_without_8bitmime_or_smtputf8_goes_as_7bit() {
        // Neither 8BITMIME nor SMTPUTF8: the DSN must go without an 8-bit octet.
        let h = harness(
            Script {
                extensions: vec!["PIPELINING".into(), "DSN".into()],
                ..Default::default()
            }
            .rcpt("gone@dest.test", &["550 5.1.1 Empf\u{e4}nger unbekannt"]),
            |_| {},
        )
        .await;
        let mut m = message("app@sender.test", &[("gone@dest.test", None)]);
        m.smtputf8 = true;
        m.eight_bit = true;
        // An ASCII header: the original may go to this next hop (UTF-8 header fields would
        // need its SMTPUTF8), and be refused there.
        m.body = "From: app@sender.test\r\nSubject: Gruesse\r\nMessage-ID: <m1@app>\r\n\
                  \r\nHallo J\u{f6}rg\r\n"
            .as_bytes()
            .to_vec();
        let r = h.submit(m).await;
        h.wait(r, final_status).await;
        // Refused at RCPT, the original makes no transaction: the one seen is the DSN.
        let seen = h.wait_mx(1).await;
        let dsn = seen
            .iter()
            .find(|t| t.mail_from.starts_with("<>"))
            .expect("a DSN");
        let text = String::from_utf8_lossy(&dsn.body);
        assert!(
            text.contains("report-type=global-delivery-status"),
            "{text}"
        );
        assert!(dsn.body.is_ascii(), "an 8-bit octet went out:\n{text}");
        for ctype in ["message/global-delivery-status", "message/global"] {
            assert!(
                text.contains(&format!(
                    "Content-Type: {ctype}\r\nContent-Transfer-Encoding: quoted-printable\r\n"
                )),
                "{ctype}:\n{text}"
            );
        }
        // Still a report that reads as one: what it says about the recipient decodes back.
        let records = mailtrail::bounce::parse(&dsn.body);
        assert_eq!(records.len(), 1, "{records:?}\n{text}");
        assert_eq!(records[0].recipient, "gone@dest.test");
        assert_eq!(records[0].status.as_deref(), Some("5.1.1"));
        assert!(
            records[0]
                .diagnostic
                .as_deref()
                .is_some_and(|d| d.contains("Empf\u{e4}nger")),
            "{records:?}"
        );
        h.shutdown.cancel();
        h.handle.join().await;
    }

    #[tokio::test]
    async fn a_message_over_the_next_hops_size_limit_fails_locally_with_a_dsn() {
        let h = harness(
            Script {
                extensions: vec!["PIPELINING".into(), "SIZE 8000".into(), "8BITMIME".into()],
                ..Default::default()
            },
            |_| {},
        )
        .await;
        let mut m = message(
            "app@sender.test",
            &[("a@dest.test", None), ("b@dest.test", None)],
        );
        m.body
            .extend_from_slice(&[&b"x".repeat(70)[..], b"\r\n"].concat().repeat(200));
        let size = m.body.len();
        // Headers only in the DSN, which stays under the limit and so reaches the sender.
        m.ret = Some(mailtrail::spool::DsnRet::Hdrs);
        let r = h.submit(m).await;
        let log = h.wait(r, final_status).await;
        let text = format!(
            "message size {size} exceeds size limit 8000 of server mx.dest.test[127.0.0.1]:{}",
            h.mx.port()
        );
        for rcpt in &log.recipients {
            assert_eq!(rcpt.status, RecipientStatus::Failed);
            assert_eq!(rcpt.last_enhanced_status.as_deref(), Some("5.3.4"));
            let attempt = rcpt.events.iter().find(|e| e.kind == "attempt").unwrap();
            assert_eq!(attempt.stage, Some(Stage::Mail));
            assert_eq!(attempt.reply_code, None);
            assert_eq!(attempt.reply_text.as_deref(), Some(text.as_str()));
            assert_eq!(attempt.reason.as_deref(), Some("mesgtoobig"));
        }
        // The message was never offered: the one transaction the MX saw is the DSN.
        let seen = h.wait_mx(1).await;
        assert_eq!(seen.len(), 1, "{seen:?}");
        let dsn = &h.dsn_bodies()[0];
        assert_reports(dsn, &["a@dest.test", "b@dest.test"]);
        assert!(dsn.contains("Status: 5.3.4"), "{dsn}");
        assert!(
            dsn.contains(&format!("Diagnostic-Code: x-local; {text}")),
            "{dsn}"
        );
        h.shutdown.cancel();
        h.handle.join().await;
    }
}

#[tokio::test]
async fn eight_bit_content_goes_unchanged_to_a_peer_offering_8bitmime() {
    let mx = TestMx::start(Script::default()).await;
    let mut conn = client::connect(&[target(mx.addr)], &settings(TlsPolicy::None))
        .await
        .unwrap();
    let body =
        "Subject: t\r\nMIME-Version: 1.0\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGrüße\r\n";
    let mut env = envelope(&["a@d.test"]);
    env.eight_bit = true;
    let r = per_recipient(
        &conn
            .transaction(&env, body.as_bytes(), Duration::from_secs(2))
            .await,
    );
    assert_eq!(r[0].reply.as_ref().unwrap().code, 250);
    let tx = &mx.transactions()[0];
    assert!(tx.mail_from.contains("BODY=8BITMIME"), "{}", tx.mail_from);
    assert_eq!(tx.body, body.as_bytes());
}

/// A next hop that answers RCPT with `250-` lines for ever: the reply is refused after
/// `MAX_LINES` lines, with memory bounded (smtp-proto's parser kept two bytes of each).
#[tokio::test]
async fn an_endless_reply_ends_the_session_instead_of_filling_memory() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut rd = BufReader::new(stream);
        rd.get_mut().write_all(b"220 endless\r\n").await.unwrap();
        let mut line = String::new();
        for answer in [&b"250 endless\r\n"[..], b"250 2.1.0 ok\r\n"] {
            line.clear();
            rd.read_line(&mut line).await.unwrap();
            rd.get_mut().write_all(answer).await.unwrap();
        }
        line.clear();
        rd.read_line(&mut line).await.unwrap();
        assert!(line.starts_with("RCPT"), "{line}");
        let chunk = b"250-\r\n".repeat(1000);
        let mut sent = 0usize;
        while rd.get_mut().write_all(&chunk).await.is_ok() {
            sent += chunk.len();
            if sent > 50_000_000 {
                break;
            }
        }
        sent
    });
    let mut conn = client::connect(&[target(addr)], &settings(TlsPolicy::None))
        .await
        .unwrap();
    let t = conn
        .transaction(&envelope(&["a@d.test"]), BODY, Duration::from_secs(2))
        .await;
    let error = t.error.expect("the session ends in an error");
    assert!(error.contains("more than 1000 lines"), "{error}");
    drop(conn);
    let sent = server.await.unwrap();
    assert!(sent < 50_000_000, "the client read on for {sent} bytes");
}

/// A peer on loopback for exchanges `TestMx` does not script: it sends `greeting`, then
/// answers each line it reads (without its CRLF) with what `answer` gives, and hangs up
/// when that is `None` or the client does. Returns its address and the lines it heard.
async fn line_peer(
    greeting: &'static str,
    mut answer: impl FnMut(&str) -> Option<String> + Send + 'static,
) -> (SocketAddr, tokio::task::JoinHandle<Vec<String>>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut rd = BufReader::new(stream);
        let mut heard = Vec::new();
        rd.get_mut().write_all(greeting.as_bytes()).await.unwrap();
        loop {
            let mut line = String::new();
            if rd.read_line(&mut line).await.unwrap_or(0) == 0 {
                break;
            }
            let line = line.trim_end().to_string();
            let reply = answer(&line);
            heard.push(line);
            match reply {
                Some(r) if rd.get_mut().write_all(r.as_bytes()).await.is_ok() => {}
                _ => break,
            }
        }
        heard
    });
    (addr, server)
}

/// A hostile peer on loopback: greets, answers EHLO with `ehlo`, and answers the first
/// command that starts with `trigger` with `250-` lines for ever (until 50 MB are sent or
/// the client hangs up). Returns the address and what was sent in the endless reply.
async fn endless_peer(
    ehlo: &'static str,
    trigger: &'static str,
) -> (SocketAddr, tokio::task::JoinHandle<(usize, Vec<String>)>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut rd = BufReader::new(stream);
        rd.get_mut().write_all(b"220 endless\r\n").await.unwrap();
        let mut commands = Vec::new();
        loop {
            let mut line = String::new();
            if rd.read_line(&mut line).await.unwrap_or(0) == 0 {
                return (0, commands);
            }
            commands.push(line.trim_end().to_string());
            if line.to_ascii_uppercase().starts_with(trigger) {
                break;
            }
            if line.to_ascii_uppercase().starts_with("EHLO") {
                rd.get_mut().write_all(ehlo.as_bytes()).await.unwrap();
            } else {
                rd.get_mut().write_all(b"250 ok\r\n").await.unwrap();
            }
        }
        let chunk = b"250-\r\n".repeat(1000);
        let mut sent = 0usize;
        while rd.get_mut().write_all(&chunk).await.is_ok() {
            sent += chunk.len();
            if sent > 50_000_000 {
                break;
            }
        }
        (sent, commands)
    });
    (addr, server)
}

/// A peer advertising a 10 KiB EHLO line (legal enough: RFC 5321 §4.5.3.1.5 lets a server
/// send longer lines than 512 bytes if the client copes) is no reason to fail the session:
/// the line is skipped, the extensions after it still count. mail-send's EHLO reader
/// refused any EHLO reply over 4096 bytes.
#[tokio::test]
async fn an_ehlo_reply_with_a_10_kib_line_still_delivers_and_keeps_the_extensions_after_it() {
    let mx = TestMx::start(Script {
        extensions: vec![
            format!("X-LONG {}", "y".repeat(10 * 1024)),
            "PIPELINING".into(),
            "SIZE 10240000".into(),
            "DSN".into(),
        ],
        ..Default::default()
    })
    .await;
    let mut conn = client::connect(&[target(mx.addr)], &settings(TlsPolicy::None))
        .await
        .expect("the session survives a long EHLO line");
    assert!(conn.offers_dsn());
    let mut env = envelope(&["a@d.test"]);
    env.recipients[0].notify = Some(Notify {
        failure: true,
        ..Default::default()
    });
    let t = conn.transaction(&env, BODY, Duration::from_secs(2)).await;
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
    let tx = mx.transactions();
    assert_eq!(tx.len(), 1);
    // SIZE and DSN came after the long line, and were used.
    assert!(tx[0].mail_from.contains("SIZE="), "{}", tx[0].mail_from);
    assert!(
        tx[0].rcpt_to[0].contains("NOTIFY=FAILURE"),
        "{:?}",
        tx[0].rcpt_to
    );
}

/// AUTH LOGIN (a server that offers no PLAIN): user name and password each answer their
/// challenge, base64 on the wire.
#[tokio::test]
async fn auth_login_answers_both_challenges() {
    let mut answers = [
        "250-login.test\r\n250 AUTH LOGIN\r\n",
        "334 VXNlcm5hbWU6\r\n",
        "334 UGFzc3dvcmQ6\r\n",
        "235 2.7.0 ok\r\n",
    ]
    .into_iter();
    let (addr, server) =
        line_peer("220 login\r\n", move |_| answers.next().map(String::from)).await;
    let mut s = settings(TlsPolicy::None);
    s.auth = Some(("relayuser".into(), client::Secret("pw 1".into())));
    client::connect(&[target(addr)], &s).await.unwrap();
    let heard = server.await.unwrap();
    // base64("relayuser"), base64("pw 1")
    assert_eq!(heard[1..], ["AUTH LOGIN", "cmVsYXl1c2Vy", "cHcgMQ=="]);
}

/// A server that answers PLAIN's initial response with challenge after challenge, each one
/// echoing (base64) what it got: the client answers the first (a server that wants the
/// response after the command) and cancels the second with `*`, tries no other mechanism
/// inside the open exchange, and the error names the problem without the challenge's text.
#[tokio::test]
async fn an_auth_server_that_keeps_challenging_is_cancelled_not_answered() {
    use base64::Engine;
    let (addr, server) = line_peer("220 echo\r\n", |line| {
        Some(if line.starts_with("EHLO") {
            "250-echo.test\r\n250 AUTH PLAIN LOGIN\r\n".to_string()
        } else if line == "*" {
            "501 5.7.0 cancelled\r\n".to_string()
        } else if line == "QUIT" {
            "221 bye\r\n".to_string()
        } else {
            let echo = base64::engine::general_purpose::STANDARD.encode(line);
            format!("334 {echo}\r\n")
        })
    })
    .await;
    let mut s = settings(TlsPolicy::None);
    s.auth = Some(("relayuser".into(), client::Secret("pw 1".into())));
    let e = client::connect(&[target(addr)], &s)
        .await
        .expect_err("not authenticated");
    let heard = server.await.unwrap();
    // base64("\0relayuser\0pw 1"), sent again to the first 334 only; then the cancel.
    assert_eq!(
        heard[1..4],
        [
            "AUTH PLAIN AHJlbGF5dXNlcgBwdyAx",
            "AHJlbGF5dXNlcgBwdyAx",
            "*"
        ],
        "{heard:?}"
    );
    assert!(
        !heard.iter().any(|l| l.starts_with("AUTH LOGIN")),
        "{heard:?}"
    );
    assert!(!e.permanent, "{e:?}");
    assert!(e.text.contains("PLAIN exchange cancelled"), "{}", e.text);
    // Neither the credentials nor the server's echo of them (base64 of base64).
    assert!(!e.text.contains("QUhKbGJH"), "{}", e.text);
}

/// A next hop that answers EHLO with `250-` lines for ever: refused after `MAX_LINES`
/// lines with memory bounded, a temporary failure that says why.
#[tokio::test]
async fn an_endless_ehlo_reply_ends_the_session_with_a_clear_error() {
    let (addr, server) = endless_peer("", "EHLO").await;
    let e = client::connect(&[target(addr)], &settings(TlsPolicy::None))
        .await
        .expect_err("no session");
    assert!(!e.permanent, "{e:?}");
    assert!(
        e.text.contains("EHLO") && e.text.contains("more than 1000 lines"),
        "{}",
        e.text
    );
    let (sent, _) = server.await.unwrap();
    assert!(sent < 50_000_000, "the client read on for {sent} bytes");
}

#[tokio::test]
async fn a_long_multi_line_refusal_keeps_its_code_status_and_text() {
    let lines: Vec<String> = (0..10)
        .map(|i| format!("550 5.7.1 policy text {i} {}", "x".repeat(480)))
        .chain(std::iter::once("550 5.7.1 rejected by policy".to_string()))
        .collect();
    let mx = TestMx::start(Script::default().rcpt("long@d.test", &[&lines.join("\n")])).await;
    let mut conn = client::connect(&[target(mx.addr)], &settings(TlsPolicy::None))
        .await
        .unwrap();
    let r = per_recipient(
        &conn
            .transaction(&envelope(&["long@d.test"]), BODY, Duration::from_secs(2))
            .await,
    );
    let reply = r[0].reply.as_ref().expect("the reply is kept");
    assert_eq!(reply.code, 550);
    assert_eq!(reply.enhanced_status.as_deref(), Some("5.7.1"));
    assert!(
        reply.text.starts_with("policy text 0 xxx"),
        "{}",
        reply.text
    );
    assert!(reply.text.ends_with("[...]"), "{}", reply.text);
}

#[tokio::test]
async fn a_reply_whose_lines_disagree_is_decided_by_its_last_line() {
    let mx = TestMx::start(
        Script::default().rcpt("odd@d.test", &["250 2.1.5 ok\n550 5.1.1 no such user"]),
    )
    .await;
    let mut conn = client::connect(&[target(mx.addr)], &settings(TlsPolicy::None))
        .await
        .unwrap();
    let t = conn
        .transaction(&envelope(&["odd@d.test"]), BODY, Duration::from_secs(2))
        .await;
    let reply = t.rcpt[0].clone().unwrap();
    assert_eq!(
        (
            reply.code,
            reply.enhanced_status.as_deref(),
            reply.text.as_str()
        ),
        (550, Some("5.1.1"), "250 ok\nno such user")
    );
    assert!(t.data.is_none());
}

/// RFC 5321 §4.1.1.4: only 354 asks for the message. A 250 to DATA (or an RCPT's 250 in
/// the DATA slot of a server answering out of order) took nothing and must not read as
/// delivered.
#[tokio::test]
async fn a_2xx_to_the_data_command_is_not_a_delivery() {
    for pipelining in [true, false] {
        let mut script = Script {
            data_command_reply: "250 2.0.0 ok no data needed".into(),
            ..Default::default()
        };
        if !pipelining {
            script.extensions.retain(|e| e != "PIPELINING");
        }
        let mx = TestMx::start(script).await;
        let mut conn = client::connect(&[target(mx.addr)], &settings(TlsPolicy::None))
            .await
            .unwrap();
        let t = conn
            .transaction(&envelope(&["a@d.test"]), BODY, Duration::from_secs(2))
            .await;
        assert!(t.data.is_none(), "pipelining {pipelining}: {:?}", t.data);
        let error = t.error.clone().expect("an error");
        assert!(error.contains("instead of 354"), "{error}");
        // The recipient is decided at DATA with no reply: a temporary failure, retried.
        let r = per_recipient(&t);
        assert_eq!((r[0].stage, r[0].reply.as_ref()), (Stage::Data, None));
        assert!(r[0].text.contains("instead of 354"), "{}", r[0].text);
        assert!(mx.transactions().iter().all(|t| !t.accepted));
    }
}

/// A route that verifies certificates meets a self-signed one under `tls = opportunistic`:
/// the mail goes encrypted without verification, marked so, never in plain text; a
/// password would not be sent over it (to a remote host; loopback is exempt).
#[tokio::test]
async fn a_certificate_that_does_not_verify_still_gets_tls_never_plain_text() {
    let mx = TestMx::start(Script {
        starttls: true,
        ..Default::default()
    })
    .await;
    let mut verifying = settings(TlsPolicy::Opportunistic);
    verifying.tls_connector = client::tls_connector(true, None).unwrap();
    verifying.unverified_fallback = Some(client::tls_connector(false, None).unwrap());
    let mut conn = client::connect(&[target(mx.addr)], &verifying)
        .await
        .unwrap();
    let tls = conn.tls.clone().expect("TLS, not plain text");
    assert!(tls.unverified, "{tls:?}");
    assert!(
        tls.recorded_version()
            .ends_with("(certificate not verified)")
    );
    conn.transaction(&envelope(&["a@d.test"]), BODY, Duration::from_secs(2))
        .await;
    assert_eq!(mx.connections(), 2);
    assert!(mx.transactions().iter().all(|t| t.tls));
    // Under `tls = required` the certificate decides: deferred, with the reason.
    let mut required = verifying.clone();
    required.tls = TlsPolicy::Required;
    let e = client::connect(&[target(mx.addr)], &required)
        .await
        .unwrap_err();
    assert!(!e.permanent && e.certificate_refused, "{e:?}");
    assert!(e.text.contains("certificate"), "{}", e.text);
}

/// A server that hangs up after its 354, while the message is still being sent: the error
/// says the message was being sent (not "after end of data", where the server may have
/// it), and the recipient is a temporary failure without a reply.
#[tokio::test]
async fn a_connection_lost_while_sending_the_message_says_so() {
    // After its 354 the peer hangs up with the message unread: the client's writes meet a
    // reset.
    let mut hung_up = false;
    let (addr, _server) = line_peer("220 hangs up\r\n", move |line| {
        let answer = match line.get(..4) {
            _ if hung_up => return None,
            Some("EHLO") => "250 hangs.test\r\n",
            Some("DATA") => "354 go on\r\n",
            _ => "250 ok\r\n",
        };
        hung_up = line.starts_with("DATA");
        Some(answer.to_string())
    })
    .await;
    let mut conn = client::connect(&[target(addr)], &settings(TlsPolicy::None))
        .await
        .unwrap();
    let body = vec![b'x'; 16 << 20]
        .chunks(998)
        .flat_map(|l| [l, b"\r\n"].concat())
        .collect::<Vec<u8>>();
    let t = conn
        .transaction(&envelope(&["a@d.test"]), &body, Duration::from_secs(10))
        .await;
    let error = t.error.clone().expect("an error");
    assert!(error.starts_with("sending the message: "), "{error}");
    assert!(t.data.is_none());
    let r = per_recipient(&t);
    assert_eq!((r[0].stage, r[0].reply.as_ref()), (Stage::Data, None));
    assert_eq!(r[0].text, error);
}

/// A 9,000-byte line (mailtrail accepts lines up to `max_data_line`) reaches the next hop
/// broken into lines of at most 998 octets, with DATA and with BDAT, as Postfix sends it.
#[tokio::test]
async fn a_line_over_998_octets_is_broken_for_the_next_hop() {
    let long = "y".repeat(9000);
    let body = format!("Subject: long\r\n\r\n{long}\r\nend\r\n");
    for chunking in [false, true] {
        let mut script = Script::default();
        script.extensions.retain(|e| e != "CHUNKING");
        if chunking {
            script.extensions.push("CHUNKING".into());
        }
        let mx = TestMx::start(script).await;
        let mut conn = client::connect(&[target(mx.addr)], &settings(TlsPolicy::None))
            .await
            .unwrap();
        let t = conn
            .transaction(
                &envelope(&["a@d.test"]),
                body.as_bytes(),
                Duration::from_secs(5),
            )
            .await;
        assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
        let got = String::from_utf8(mx.transactions()[0].body.clone()).unwrap();
        assert!(
            got.split("\r\n").all(|l| l.len() <= 998),
            "chunking {chunking}: a line over 998 octets"
        );
        assert_eq!(got.replace("\r\n ", ""), body, "chunking {chunking}");
    }
}
