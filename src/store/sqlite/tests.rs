//! Tests against real SQLite files in a temporary directory.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use tempfile::TempDir;

use super::*;
use crate::spool::{AcceptedRecipient, DsnRet, Notify, PresetOutcome};
use crate::store::{
    BounceFacts, DsnNotice, HandledChange, LogKey, RecipientStatus, ReportedRecipient,
};

fn store_in(dir: &TempDir) -> SqliteStore {
    SqliteStore::open_path(&dir.path().join("mailtrail.db")).unwrap()
}

fn rcpt(address: &str) -> AcceptedRecipient {
    AcceptedRecipient {
        address: address.to_string(),
        orcpt: None,
        notify: None,
        preset: None,
    }
}

fn message(at_ms: i64, sender: &str, recipients: &[&str]) -> AcceptedMessage {
    AcceptedMessage {
        receipt: ReceiptId::new(),
        received_at_ms: at_ms,
        client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        helo: "app.example".into(),
        tls_version: Some("TLSv1_3".into()),
        auth_user: Some("app".into()),
        envelope_sender: sender.to_string(),
        recipients: recipients.iter().map(|r| rcpt(r)).collect(),
        envid: None,
        ret: None,
        eight_bit: false,
        smtputf8: false,
        message_id: Some("<m1@app.example>".into()),
        subject: Some("Hello".into()),
        context: Some("signup".into()),
        body: b"Subject: Hello\r\n\r\nHi\r\n".to_vec(),
        inbound_bounce: false,
    }
}

fn by_address(a: &str) -> LogQuery {
    LogQuery {
        key: LogKey::Address(a.into()),
        since_ms: None,
        until_ms: None,
        limit: 0,
        before: None,
    }
}

fn attempt(receipt: ReceiptId, idx: u32, at_ms: i64, status: RecipientStatus) -> AttemptRecord {
    AttemptRecord {
        receipt,
        rcpt_index: idx,
        at_ms,
        status,
        next_attempt_at_ms: (status == RecipientStatus::Deferred).then_some(at_ms + 60_000),
        stage: Stage::Rcpt,
        remote_host: Some("mx.example.net".into()),
        remote_ip: Some("192.0.2.25".into()),
        remote_port: Some(25),
        tls_version: Some("TLSv1_3".into()),
        tls_cipher: None,
        reply_code: Some(match status {
            RecipientStatus::Delivered => 250,
            RecipientStatus::Deferred => 451,
            _ => 550,
        }),
        enhanced_status: Some("4.7.1".into()),
        reply_text: "Greylisted, try again\nin a minute".into(),
        rcpt_reply: None,
        duration_ms: 120,
        reason: None,
        bounce_type: None,
        delay_dsn: false,
        tried_first: Vec::new(),
        suppress: None,
    }
}

#[test]
fn migrates_an_empty_database_and_reopens_without_migrating_again() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("mailtrail.db");
    drop(SqliteStore::open_path(&path).unwrap());
    let conn = Connection::open(&path).unwrap();
    assert_eq!(schema::user_version(&conn).unwrap(), SCHEMA_VERSION);
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        tables,
        [
            "bodies",
            "bounces",
            "events",
            "messages",
            "meta",
            "recipients",
            "sqlite_sequence",
            "suppressions"
        ]
    );
    drop(conn);
    // A second open finds the schema current and keeps the data.
    drop(SqliteStore::open_path(&path).unwrap());
}

#[tokio::test]
async fn bounce_ids_of_a_schema_4_database_are_kept_and_never_given_out_again() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("mailtrail.db");
    let mut conn = Connection::open(&path).unwrap();
    schema::migrate_to(&mut conn, 4).unwrap();
    conn.execute(
        "INSERT INTO bounces (id, at, correlation, recipient, recipient_lc, kind, reason,
             bounce_type, handled_by)
         VALUES (41, 1000, 'unmatched', 'A@example.net', 'a@example.net', 'dsn', 'userunknown',
             'hard', 'admin')",
        [],
    )
    .unwrap();
    drop(conn);

    let store = store_in(&dir);
    let kept = store.bounces(&BounceQuery::default()).await.unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(
        (kept[0].id, kept[0].handled_by.as_deref()),
        (41, Some("admin"))
    );
    assert_eq!(
        kept[0].facts.recipient, "A@example.net",
        "columns copied in their places"
    );
    // Every bounce purged: the next one still gets a new id.
    assert_eq!(store.purge_log(i64::MAX).await.unwrap(), (0, 1));
    assert_eq!(
        record_bounce(&store, new_bounce(None, None, 2_000)).await,
        42
    );
}

/// A database at `path` migrated only to schema `version` (9 or 10), holding one message
/// from app@example.com received at 1000: the connection and its receipt.
fn old_database(path: &Path, version: i64) -> (Connection, ReceiptId) {
    let r = ReceiptId::new();
    let mut conn = Connection::open(path).unwrap();
    schema::migrate_to(&mut conn, version).unwrap();
    conn.execute(
        "INSERT INTO messages (receipt, received_at, client_ip, helo, envelope_sender,
             envelope_sender_lc, size, eight_bit, smtputf8, inbound_bounce)
         VALUES (?1, 1000, '127.0.0.1', 'app', 'app@example.com', 'app@example.com', 3, 0, 0, 0)",
        rusqlite::params![r.to_string()],
    )
    .unwrap();
    (conn, r)
}

#[tokio::test]
async fn delay_dsn_events_of_a_schema_9_database_are_read_without_a_dsn_receipt() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("mailtrail.db");
    let (conn, r) = old_database(&path, 9);
    conn.execute(
        "INSERT INTO recipients (receipt, idx, address, address_lc, status, next_attempt_at,
             updated_at, delay_dsn_sent)
         VALUES (?1, 0, 'a@example.net', 'a@example.net', 'deferred', 9000, 2000, 1)",
        rusqlite::params![r.to_string()],
    )
    .unwrap();
    conn.execute(
        "INSERT INTO events (receipt, idx, at, kind, status, stage)
         VALUES (?1, 0, 2000, 'delay_dsn_sent', 'deferred', 'local')",
        rusqlite::params![r.to_string()],
    )
    .unwrap();
    drop(conn);

    let store = store_in(&dir);
    assert_eq!(
        dsn_events(&store, r, 0).await,
        [(
            "delay_dsn_sent".to_string(),
            RecipientStatus::Deferred,
            None,
            None
        )]
    );
    // New events carry both.
    let failure = notice(r, 3_000, &[(0, "failed")]);
    let failure_id = failure.dsn.receipt.to_string();
    store
        .record_attempts(
            vec![attempt(r, 0, 3_000, RecipientStatus::Failed)],
            vec![failure],
        )
        .await
        .unwrap();
    assert_eq!(
        dsn_events(&store, r, 0).await[1].3.as_deref(),
        Some(failure_id.as_str())
    );
}

fn hop_failure(hop: &str, step: &str, text: &str) -> crate::store::HopFailure {
    crate::store::HopFailure {
        hop: hop.into(),
        step: step.into(),
        reply_code: text.get(..3).and_then(|c| c.parse().ok()),
        enhanced_status: None,
        text: text.into(),
    }
}

#[tokio::test]
async fn attempts_of_a_schema_10_database_read_with_no_hops_tried_first_and_new_ones_keep_them() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("mailtrail.db");
    let (conn, r) = old_database(&path, 10);
    conn.execute(
        "INSERT INTO recipients (receipt, idx, address, address_lc, status, next_attempt_at,
             updated_at)
         VALUES (?1, 0, 'a@example.net', 'a@example.net', 'deferred', 9000, 1500)",
        rusqlite::params![r.to_string()],
    )
    .unwrap();
    conn.execute(
        "INSERT INTO events (receipt, idx, at, kind, status, stage, reply_code, reply_text)
         VALUES (?1, 0, 1500, 'attempt', 'deferred', 'connect', 421, 'busy')",
        rusqlite::params![r.to_string()],
    )
    .unwrap();
    drop(conn);

    let store = store_in(&dir);
    let tried = vec![
        hop_failure("a[192.0.2.1]", "connect", "connect: Connection refused"),
        hop_failure("b[192.0.2.2]:2525", "greeting", "421 4.3.2 busy\nreally"),
    ];
    store
        .record_attempts(
            vec![AttemptRecord {
                tried_first: tried.clone(),
                ..attempt(r, 0, 2_000, RecipientStatus::Delivered)
            }],
            vec![],
        )
        .await
        .unwrap();
    let log = store.log(&by_address("a@example.net")).await.unwrap();
    let attempts: Vec<&Vec<crate::store::HopFailure>> = log[0].recipients[0]
        .events
        .iter()
        .filter(|e| e.kind == "attempt")
        .map(|e| &e.tried_first)
        .collect();
    assert_eq!(attempts, [&Vec::new(), &tried]);
    assert_eq!(log[0].recipients[0].status, RecipientStatus::Delivered);
}

#[tokio::test]
async fn bounces_of_a_schema_7_database_are_verified_when_matched_by_verp() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("mailtrail.db");
    let mut conn = Connection::open(&path).unwrap();
    schema::migrate_to(&mut conn, 7).unwrap();
    // Over SMTP (a source receipt) by VERP, fed in by an admin by Message-ID, over SMTP by
    // the receipt id: all three acted under schema 7's rules.
    for (at, correlation, source) in [
        (1000, "verp", Some("01M84TQJYPE2DRCRGB1667C64A")),
        (2000, "message_id", None),
        (3000, "receipt_header", Some("01M84TQJYPE2DRCRGB1667C64B")),
    ] {
        conn.execute(
            "INSERT INTO bounces (at, receipt, idx, correlation, recipient, recipient_lc, kind,
                 reason, bounce_type, acted, source_receipt)
             VALUES (?1, '01M84TQJYPE2DRCRGB1667C64M', 0, ?2, 'a@example.net', 'a@example.net',
                 'dsn', 'mailboxfull', 'soft', 1, ?3)",
            rusqlite::params![at, correlation, source],
        )
        .unwrap();
    }
    drop(conn);

    let store = store_in(&dir);
    let mut kept: Vec<(String, bool)> = store
        .bounces(&BounceQuery::default())
        .await
        .unwrap()
        .into_iter()
        .map(|b| (b.facts.at_ms.to_string(), b.facts.verified))
        .collect();
    kept.sort();
    assert_eq!(
        kept,
        [
            ("1000".to_string(), true),
            ("2000".to_string(), false),
            ("3000".to_string(), false)
        ]
    );
    // The verified one and the admin-fed one are part of a soft-bounce run; the unverified
    // one over SMTP no longer is.
    assert_eq!(
        recent_types(&store, "a@example.net", 0).await,
        ["soft", "soft"]
    );
}

#[test]
fn refuses_a_database_from_a_newer_version() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("mailtrail.db");
    let conn = Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    drop(conn);
    assert!(matches!(
        SqliteStore::open_path(&path),
        Err(StoreError::Storage(_))
    ));
}

#[test]
fn open_creates_data_dir() {
    let dir = TempDir::new().unwrap();
    let config = Config {
        data_dir: dir.path().join("nested/data"),
        ..Config::default()
    };
    let store = open(&config).unwrap();
    drop(store);
    assert!(config.db_path().exists());
}

#[tokio::test]
async fn accept_then_log_by_address_case_insensitive_and_by_receipt() {
    let dir = TempDir::new().unwrap();
    let store = store_in(&dir);
    let mut msg = message(
        1_000,
        "App@Example.com",
        &["Alice@Example.NET", "bob@example.net"],
    );
    msg.recipients[0].orcpt = Some("rfc822;Alice@Example.NET".into());
    msg.recipients[0].notify = Some(Notify {
        failure: true,
        delay: true,
        ..Notify::default()
    });
    msg.envid = Some("env-1".into());
    msg.ret = Some(DsnRet::Hdrs);
    let receipt = msg.receipt;
    store.accept(msg).await.unwrap();
    store
        .accept(message(2_000, "app@example.com", &["carol@example.net"]))
        .await
        .unwrap();

    let logs = store.log(&by_address("alice@example.net")).await.unwrap();
    assert_eq!(logs.len(), 1);
    let m = &logs[0];
    assert_eq!(m.receipt, receipt);
    assert_eq!(m.received_at_ms, 1_000);
    assert_eq!(m.client_ip, "127.0.0.1");
    assert_eq!(m.envelope_sender, "App@Example.com");
    assert_eq!(m.subject.as_deref(), Some("Hello"));
    assert_eq!(m.context.as_deref(), Some("signup"));
    assert_eq!(m.envid.as_deref(), Some("env-1"));
    assert_eq!(m.ret, Some(DsnRet::Hdrs));
    assert_eq!(m.size, b"Subject: Hello\r\n\r\nHi\r\n".len() as u64);
    assert_eq!(m.recipients.len(), 2);
    let alice = &m.recipients[0];
    assert_eq!(alice.address, "Alice@Example.NET");
    assert_eq!(alice.orcpt.as_deref(), Some("rfc822;Alice@Example.NET"));
    assert_eq!(alice.notify.as_deref(), Some("FAILURE,DELAY"));
    assert_eq!(alice.status, RecipientStatus::Queued);
    assert_eq!(alice.events.len(), 1);
    assert_eq!(alice.events[0].kind, "accepted");
    assert_eq!(alice.events[0].status, RecipientStatus::Queued);

    // The sender address finds both messages, newest first.
    let logs = store.log(&by_address("APP@example.COM")).await.unwrap();
    let times: Vec<i64> = logs.iter().map(|m| m.received_at_ms).collect();
    assert_eq!(times, [2_000, 1_000]);

    let logs = store
        .log(&LogQuery {
            key: LogKey::Receipt(receipt),
            since_ms: None,
            until_ms: None,
            limit: 10,
            before: None,
        })
        .await
        .unwrap();
    assert_eq!(logs.len(), 1);
    assert_eq!(logs[0].receipt, receipt);

    assert!(
        store
            .log(&by_address("nobody@example.net"))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.body(receipt).await.unwrap(),
        b"Subject: Hello\r\n\r\nHi\r\n"
    );
}

#[tokio::test]
async fn log_applies_since_until_and_limit() {
    let dir = TempDir::new().unwrap();
    let store = store_in(&dir);
    for t in [1_000, 2_000, 3_000, 4_000] {
        store
            .accept(message(t, "app@example.com", &["x@example.net"]))
            .await
            .unwrap();
    }
    let q = |since, until, limit| LogQuery {
        key: LogKey::Address("x@example.net".into()),
        since_ms: since,
        until_ms: until,
        limit,
        before: None,
    };
    let times = |logs: Vec<MessageLog>| logs.iter().map(|m| m.received_at_ms).collect::<Vec<_>>();
    assert_eq!(
        times(store.log(&q(Some(2_000), None, 0)).await.unwrap()),
        [4_000, 3_000, 2_000]
    );
    assert_eq!(
        times(store.log(&q(None, Some(2_000), 0)).await.unwrap()),
        [2_000, 1_000]
    );
    assert_eq!(
        times(store.log(&q(None, None, 2)).await.unwrap()),
        [4_000, 3_000]
    );
}

#[tokio::test]
async fn preset_recipients_are_final_and_never_due() {
    let dir = TempDir::new().unwrap();
    let store = store_in(&dir);
    let mut msg = message(
        1_000,
        "app@example.com",
        &["gone@example.net", "ok@example.net"],
    );
    msg.recipients[0].preset = Some(PresetOutcome {
        status: RecipientStatus::Suppressed,
        reason: "suppressed".into(),
        text: "address is on the suppression list".into(),
        bounce_type: "soft".into(),
        enhanced_status: None,
        accepted: true,
    });
    store.accept(msg).await.unwrap();

    let due = store.due(1_000, 10, None).await.unwrap();
    assert_eq!(due.len(), 1);
    let addrs: Vec<&str> = due[0]
        .recipients
        .iter()
        .map(|r| r.address.as_str())
        .collect();
    assert_eq!(addrs, ["ok@example.net"]);

    let log = store.log(&by_address("gone@example.net")).await.unwrap();
    let gone = &log[0].recipients[0];
    assert_eq!(gone.status, RecipientStatus::Suppressed);
    assert_eq!(gone.reason.as_deref(), Some("suppressed"));
    assert_eq!(gone.bounce_type.as_deref(), Some("soft"));
    assert_eq!(
        gone.last_reply_text.as_deref(),
        Some("address is on the suppression list")
    );
    assert_eq!(gone.events[0].kind, "suppressed");
    assert_eq!(gone.events[0].stage, Some(Stage::Local));
}

#[tokio::test]
async fn inbound_bounces_are_never_due_and_stay_pending_until_processed() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("mailtrail.db");
    let store = SqliteStore::open_path(&path).unwrap();
    let mut msg = message(1_000, "", &["bounces+x@bounce.example"]);
    msg.inbound_bounce = true;
    let receipt = msg.receipt;
    store.accept(msg).await.unwrap();
    assert!(store.due(i64::MAX, 10, None).await.unwrap().is_empty());
    assert_eq!(store.next_due_at().await.unwrap(), None);
    assert_eq!(store.queue_stats().await.unwrap(), (0, None));
    drop(store);

    // After a restart the bounce is still waiting to be parsed.
    let store = SqliteStore::open_path(&path).unwrap();
    assert_eq!(store.pending_inbound_bounces().await.unwrap(), [receipt]);
    assert!(!store.body(receipt).await.unwrap().is_empty());
    store.mark_inbound_processed(receipt).await.unwrap();
    assert!(store.pending_inbound_bounces().await.unwrap().is_empty());

    let other = message(2_000, "a@b", &["c@d"]);
    let other_receipt = other.receipt;
    store.accept(other).await.unwrap();
    assert!(matches!(
        store.mark_inbound_processed(other_receipt).await,
        Err(StoreError::NotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_accepts_share_commits_and_are_all_durable() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("mailtrail.db");
    let store = Arc::new(SqliteStore::open_path(&path).unwrap());
    let mut tasks = Vec::new();
    let mut receipts = Vec::new();
    for t in 0..20 {
        let mut batch = Vec::new();
        for i in 0..25 {
            let msg = message(
                1_000 + i,
                "app@example.com",
                &[&format!("user{t}-{i}@example.net")],
            );
            receipts.push(msg.receipt);
            batch.push(msg);
        }
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for msg in batch {
                store.accept(msg).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = store.writer_stats();
    let commits = stats.commits.get();
    assert_eq!(stats.commands.get(), 500);
    assert!(
        commits < 500,
        "no batching: {commits} commits for 500 accepts"
    );
    drop(store);

    // Everything acknowledged is visible to a fresh process-like reader.
    let reader = SqliteReader::open_path(&path).unwrap();
    let (pending, _) = reader.queue_stats().unwrap();
    assert_eq!(pending, 500);
    for r in receipts {
        let log = reader
            .log(&LogQuery {
                key: LogKey::Receipt(r),
                since_ms: None,
                until_ms: None,
                limit: 1,
                before: None,
            })
            .unwrap();
        assert_eq!(log.len(), 1);
    }
}

/// Blocks the writer thread inside a command until the returned gate is signalled, so that
/// commands sent meanwhile queue up and run as one batch.
async fn hold_writer(
    store: &Arc<SqliteStore>,
) -> (
    tokio::task::JoinHandle<Result<(), StoreError>>,
    std::sync::mpsc::Sender<()>,
) {
    let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let started_tx = std::sync::Mutex::new(Some(started_tx));
    let held = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .write(move |_| {
                    if let Some(tx) = started_tx.lock().unwrap().take() {
                        let _ = tx.send(());
                    }
                    gate_rx.recv().ok();
                    Ok(())
                })
                .await
        })
    };
    started_rx.await.unwrap();
    (held, gate_tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_command_does_not_fail_the_rest_of_its_batch() {
    let dir = TempDir::new().unwrap();
    let store = Arc::new(store_in(&dir));
    let dup = message(1_000, "app@example.com", &["dup@example.net"]);
    store.accept(dup.clone()).await.unwrap();

    // Hold the writer so the next commands queue up and land in one batch.
    let (held, gate) = hold_writer(&store).await;
    let commits_before = store.writer_stats().commits.get();
    let good: Vec<AcceptedMessage> = (0..5)
        .map(|i| message(2_000 + i, "app@example.com", &["ok@example.net"]))
        .collect();
    let mut tasks = Vec::new();
    for m in good.iter().cloned() {
        let store = store.clone();
        tasks.push(tokio::spawn(async move { store.accept(m).await }));
    }
    let dup_task = {
        let store = store.clone();
        // Same receipt again: violates the primary key.
        tokio::spawn(async move { store.accept(dup).await })
    };
    let bad_attempt = {
        let store = store.clone();
        let r = good[0].receipt;
        tokio::spawn(async move {
            store
                .record_attempts(
                    vec![attempt(r, 7, 3_000, RecipientStatus::Delivered)],
                    vec![],
                )
                .await
        })
    };
    // Let every command reach the queue before the writer is released.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    gate.send(()).unwrap();
    held.await.unwrap().unwrap();

    assert!(matches!(
        dup_task.await.unwrap(),
        Err(StoreError::Storage(_))
    ));
    assert!(matches!(
        bad_attempt.await.unwrap(),
        Err(StoreError::NotFound(_))
    ));
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    // The held command, then one batch holding the seven others.
    let commits = store.writer_stats().commits.get() - commits_before;
    assert_eq!(commits, 2, "the queued commands should share one commit");
    let logs = store.log(&by_address("ok@example.net")).await.unwrap();
    assert_eq!(logs.len(), 5);
    let dup_logs = store.log(&by_address("dup@example.net")).await.unwrap();
    assert_eq!(dup_logs.len(), 1);
    assert_eq!(dup_logs[0].recipients[0].events.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_record_waits_for_the_next_accept_and_shares_its_commit() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("mailtrail.db");
    // A wait far longer than the test: only the accept can end it.
    let store = Arc::new(
        SqliteStore::open_with_deferrable_wait(&path, std::time::Duration::from_secs(600)).unwrap(),
    );
    let sent = message(1_000, "app@example.com", &["a@example.net"]);
    store.accept(sent.clone()).await.unwrap();
    let commits_before = store.writer_stats().commits.get();
    let record = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .record_attempts(
                    vec![attempt(sent.receipt, 0, 2_000, RecipientStatus::Delivered)],
                    vec![],
                )
                .await
        })
    };
    // Not committed while nothing else comes: a reader still sees the recipient queued.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!record.is_finished());
    let reader = SqliteReader::open_path(&path).unwrap();
    assert_eq!(reader.queue_stats().unwrap().0, 1);

    store
        .accept(message(3_000, "app@example.com", &["b@example.net"]))
        .await
        .unwrap();
    record.await.unwrap().unwrap();
    let commits = store.writer_stats().commits.get() - commits_before;
    assert_eq!(
        commits, 1,
        "the record and the accept should share one commit"
    );
    let log = store.log(&by_address("a@example.net")).await.unwrap();
    assert_eq!(log[0].recipients[0].status, RecipientStatus::Delivered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_record_alone_commits_after_the_wait() {
    let dir = TempDir::new().unwrap();
    let wait = std::time::Duration::from_millis(50);
    let store = SqliteStore::open_with_deferrable_wait(&dir.path().join("m.db"), wait).unwrap();
    let sent = message(1_000, "app@example.com", &["a@example.net"]);
    store.accept(sent.clone()).await.unwrap();
    let started = std::time::Instant::now();
    store
        .record_attempts(
            vec![attempt(sent.receipt, 0, 2_000, RecipientStatus::Delivered)],
            vec![],
        )
        .await
        .unwrap();
    assert!(started.elapsed() >= wait);
    let log = store.log(&by_address("a@example.net")).await.unwrap();
    assert_eq!(log[0].recipients[0].status, RecipientStatus::Delivered);
}

async fn cap_database_size(store: &SqliteStore, extra_pages: i64) {
    store
        .write(move |c| {
            let pages: i64 = c
                .query_row("PRAGMA page_count", [], |r| r.get(0))
                .map_err(storage)?;
            c.query_row(
                &format!("PRAGMA max_page_count = {}", pages + extra_pages),
                [],
                |_| Ok(()),
            )
            .map_err(storage)
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disk_full_in_a_batch_fails_only_the_command_that_did_not_fit() {
    let dir = TempDir::new().unwrap();
    let store = Arc::new(store_in(&dir));
    store
        .accept(message(1_000, "app@example.com", &["first@example.net"]))
        .await
        .unwrap();
    cap_database_size(&store, 64).await;
    let (held, gate) = hold_writer(&store).await;
    let mut small = Vec::new();
    for i in 0..3 {
        let store = store.clone();
        let m = message(2_000 + i, "app@example.com", &["small@example.net"]);
        small.push(tokio::spawn(async move { store.accept(m).await }));
    }
    let mut big = message(3_000, "app@example.com", &["big@example.net"]);
    big.body = vec![b'x'; 1 << 20];
    let big = {
        let store = store.clone();
        tokio::spawn(async move { store.accept(big).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    gate.send(()).unwrap();
    held.await.unwrap().unwrap();
    let err = big.await.unwrap().unwrap_err();
    assert!(
        matches!(&err, StoreError::Storage(m) if m.contains("full")),
        "{err:?}"
    );
    for t in small {
        t.await.unwrap().unwrap();
    }
    assert_eq!(
        store
            .log(&by_address("small@example.net"))
            .await
            .unwrap()
            .len(),
        3
    );
    assert!(
        store
            .log(&by_address("big@example.net"))
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn disk_full_fails_the_accept_and_leaves_nothing_partial() {
    let dir = TempDir::new().unwrap();
    let store = store_in(&dir);
    store
        .accept(message(1_000, "app@example.com", &["first@example.net"]))
        .await
        .unwrap();
    // Cap the file near its current size: a 1 MiB body cannot fit.
    cap_database_size(&store, 2).await;
    let mut big = message(2_000, "app@example.com", &["big@example.net"]);
    big.body = vec![b'x'; 1 << 20];
    let receipt = big.receipt;
    let err = store.accept(big).await.unwrap_err();
    assert!(matches!(err, StoreError::Storage(_)), "{err:?}");
    assert!(
        store
            .log(&by_address("big@example.net"))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        store.body(receipt).await,
        Err(StoreError::NotFound(_))
    ));
    // The store keeps working for what fits.
    assert_eq!(
        store
            .log(&by_address("first@example.net"))
            .await
            .unwrap()
            .len(),
        1
    );
}

/// A notice about recipient `idx` of `original` with `action`.
fn notice(original: ReceiptId, at_ms: i64, reported: &[(u32, &'static str)]) -> DsnNotice {
    DsnNotice {
        dsn: message(at_ms, "", &["app@example.com"]),
        original,
        reported: reported
            .iter()
            .map(|&(rcpt_index, action)| ReportedRecipient { rcpt_index, action })
            .collect(),
    }
}

/// The (kind, status, dsn_action, dsn_receipt) of recipient `idx`'s events of `receipt`.
async fn dsn_events(
    store: &SqliteStore,
    receipt: ReceiptId,
    idx: usize,
) -> Vec<(String, RecipientStatus, Option<String>, Option<String>)> {
    let log = store
        .log(&LogQuery {
            key: LogKey::Receipt(receipt),
            since_ms: None,
            until_ms: None,
            limit: 0,
            before: None,
        })
        .await
        .unwrap();
    log[0].recipients[idx]
        .events
        .iter()
        .filter(|e| e.kind.contains("dsn"))
        .map(|e| {
            (
                e.kind.clone(),
                e.status,
                e.dsn_action.clone(),
                e.dsn_receipt.clone(),
            )
        })
        .collect()
}

#[tokio::test]
async fn every_dsn_is_recorded_on_the_recipients_it_reports_with_its_receipt() {
    let dir = TempDir::new().unwrap();
    let store = store_in(&dir);
    let msg = message(
        1_000,
        "app@example.com",
        &["a@example.net", "b@example.net", "c@example.net"],
    );
    let r = msg.receipt;
    store.accept(msg).await.unwrap();

    // a fails, b expires (one failure DSN for both), c is relayed to a peer without DSN.
    let failure = notice(r, 1_500, &[(0, "failed"), (1, "expired")]);
    let success = notice(r, 1_500, &[(2, "relayed")]);
    let (failure_id, success_id) = (failure.dsn.receipt, success.dsn.receipt);
    store
        .record_attempts(
            vec![
                attempt(r, 0, 1_500, RecipientStatus::Failed),
                attempt(r, 1, 1_500, RecipientStatus::Expired),
                attempt(r, 2, 1_500, RecipientStatus::Delivered),
            ],
            vec![failure, success],
        )
        .await
        .unwrap();
    let sent = |status, action: &str, dsn: ReceiptId| {
        vec![(
            "dsn_sent".to_string(),
            status,
            Some(action.to_string()),
            Some(dsn.to_string()),
        )]
    };
    assert_eq!(
        dsn_events(&store, r, 0).await,
        sent(RecipientStatus::Failed, "failed", failure_id)
    );
    assert_eq!(
        dsn_events(&store, r, 1).await,
        sent(RecipientStatus::Expired, "expired", failure_id)
    );
    assert_eq!(
        dsn_events(&store, r, 2).await,
        sent(RecipientStatus::Delivered, "relayed", success_id)
    );
    // The DSN itself is mail to the sender, found by its own receipt.
    assert!(store.body(failure_id).await.is_ok());
}

#[tokio::test]
async fn a_delay_dsn_is_recorded_once_with_its_receipt() {
    let dir = TempDir::new().unwrap();
    let store = store_in(&dir);
    let msg = message(1_000, "app@example.com", &["a@example.net"]);
    let r = msg.receipt;
    store.accept(msg).await.unwrap();
    let delay = notice(r, 2_000, &[(0, "delayed")]);
    let delay_id = delay.dsn.receipt;
    store
        .record_attempts(
            vec![AttemptRecord {
                delay_dsn: true,
                ..attempt(r, 0, 2_000, RecipientStatus::Deferred)
            }],
            vec![delay],
        )
        .await
        .unwrap();
    assert_eq!(
        dsn_events(&store, r, 0).await,
        [(
            "delay_dsn_sent".to_string(),
            RecipientStatus::Deferred,
            Some("delayed".to_string()),
            Some(delay_id.to_string())
        )]
    );
}

#[tokio::test]
async fn a_dsn_for_recipients_decided_at_accept_is_recorded_on_them() {
    let dir = TempDir::new().unwrap();
    let store = store_in(&dir);
    let mut msg = message(
        1_000,
        "app@example.com",
        &["gone@example.net", "b@example.net"],
    );
    msg.recipients[0].preset = Some(PresetOutcome {
        status: RecipientStatus::Suppressed,
        reason: "suppressed".into(),
        bounce_type: "hard".into(),
        text: "suppressed".into(),
        enhanced_status: Some("5.7.1".into()),
        accepted: true,
    });
    let r = msg.receipt;
    let failure = notice(r, 1_000, &[(0, "failed")]);
    let failure_id = failure.dsn.receipt;
    store.accept_with_notices(msg, vec![failure]).await.unwrap();
    assert_eq!(
        dsn_events(&store, r, 0).await,
        [(
            "dsn_sent".to_string(),
            RecipientStatus::Suppressed,
            Some("failed".to_string()),
            Some(failure_id.to_string())
        )]
    );
    assert!(dsn_events(&store, r, 1).await.is_empty());
}

#[tokio::test]
async fn delivery_lifecycle_due_defer_retry_deliver() {
    let dir = TempDir::new().unwrap();
    let store = store_in(&dir);
    let msg = message(
        1_000,
        "app@example.com",
        &["a@example.net", "b@example.net"],
    );
    let r = msg.receipt;
    store.accept(msg).await.unwrap();

    assert_eq!(store.next_due_at().await.unwrap(), Some(1_000));
    assert!(store.due(999, 10, None).await.unwrap().is_empty());
    let due = store.due(1_000, 10, None).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].receipt, r);
    assert_eq!(due[0].recipients.len(), 2);
    assert_eq!(due[0].message_id.as_deref(), Some("<m1@app.example>"));

    // a delivered, b greylisted; a DSN is queued in the same commit.
    let dsn = message(1_500, "", &["app@example.com"]);
    let dsn_receipt = dsn.receipt;
    store
        .record_attempts(
            vec![
                attempt(r, 0, 1_500, RecipientStatus::Delivered),
                attempt(r, 1, 1_500, RecipientStatus::Deferred),
            ],
            vec![DsnNotice {
                dsn,
                original: r,
                reported: Vec::new(),
            }],
        )
        .await
        .unwrap();
    assert_eq!(store.body(dsn_receipt).await.unwrap().len(), 22);
    let due = store.due(10_000, 10, None).await.unwrap();
    assert_eq!(due.len(), 1, "only the DSN is due before b's retry time");
    assert_eq!(due[0].receipt, dsn_receipt);
    assert_eq!(store.next_due_at().await.unwrap(), Some(1_500));

    let due = store.due(61_500, 10, None).await.unwrap();
    let ours = due.iter().find(|m| m.receipt == r).unwrap();
    assert_eq!(ours.recipients.len(), 1);
    let b = &ours.recipients[0];
    assert_eq!(b.index, 1);
    assert_eq!(b.status, RecipientStatus::Deferred);
    assert_eq!(b.attempts, 1);
    assert_eq!(b.first_deferred_at_ms, Some(1_500));
    assert_eq!(b.last_reply_code, Some(451));
    assert_eq!(
        b.last_reply_text.as_deref(),
        Some("Greylisted, try again\nin a minute")
    );
    assert!(!b.delay_dsn_sent);

    // A second deferral keeps the first deferral time; the delay DSN it queued is marked
    // sent in the same commit.
    let delayed = AttemptRecord {
        delay_dsn: true,
        ..attempt(r, 1, 2_000, RecipientStatus::Deferred)
    };
    store.record_attempts(vec![delayed], vec![]).await.unwrap();
    let list = store.queue_list().await.unwrap();
    let entry = list.iter().find(|e| e.receipt == r).unwrap();
    assert_eq!(entry.recipient, "b@example.net");
    assert_eq!(entry.attempts, 2);
    assert_eq!(entry.next_attempt_at_ms, 62_000);
    assert_eq!(
        entry.last_reply.as_deref(),
        Some("451 4.7.1 Greylisted, try again\nin a minute")
    );

    assert_eq!(store.queue_retry(Some(r)).await.unwrap(), 1);
    let now = chrono::Utc::now().timestamp_millis();
    let due = store.due(now + 1_000, 10, None).await.unwrap();
    let ours = due.iter().find(|m| m.receipt == r).unwrap();
    assert!(ours.recipients[0].delay_dsn_sent);
    assert_eq!(ours.recipients[0].first_deferred_at_ms, Some(1_500));

    store
        .record_attempts(vec![attempt(r, 1, now, RecipientStatus::Delivered)], vec![])
        .await
        .unwrap();
    let log = store.log(&by_address("b@example.net")).await.unwrap();
    let b = &log[0].recipients[1];
    assert_eq!(b.status, RecipientStatus::Delivered);
    let kinds: Vec<&str> = b.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "accepted",
            "attempt",
            "attempt",
            "delay_dsn_sent",
            "retry",
            "attempt"
        ]
    );
    let first = &b.events[1];
    assert_eq!(first.remote_host.as_deref(), Some("mx.example.net"));
    assert_eq!(first.remote_ip.as_deref(), Some("192.0.2.25"));
    assert_eq!(first.tls_version.as_deref(), Some("TLSv1_3"));
    assert_eq!(first.reply_code, Some(451));
    assert_eq!(first.enhanced_status.as_deref(), Some("4.7.1"));
    assert_eq!(first.duration_ms, Some(120));
    assert_eq!(first.stage, Some(Stage::Rcpt));
    assert_eq!(store.queue_stats().await.unwrap(), (1, Some(1_500)));
}

#[tokio::test]
async fn queue_delete_fails_pending_recipients_with_a_deleted_event() {
    let dir = TempDir::new().unwrap();
    let store = store_in(&dir);
    let msg = message(
        1_000,
        "app@example.com",
        &["a@example.net", "b@example.net"],
    );
    let r = msg.receipt;
    store.accept(msg).await.unwrap();
    // b was deferred (greylisting, soft) before it was deleted.
    let mut deferred = attempt(r, 1, 1_100, RecipientStatus::Deferred);
    deferred.reason = Some("greylisting".into());
    deferred.bounce_type = Some("soft".into());
    store
        .record_attempts(
            vec![attempt(r, 0, 1_100, RecipientStatus::Delivered), deferred],
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(store.queue_delete(r).await.unwrap(), 1);
    assert_eq!(store.queue_delete(r).await.unwrap(), 0);
    assert!(store.queue_list().await.unwrap().is_empty());
    assert_eq!(store.next_due_at().await.unwrap(), None);
    assert_eq!(store.queue_retry(None).await.unwrap(), 0);
    let log = store.log(&by_address("b@example.net")).await.unwrap();
    let b = &log[0].recipients[1];
    assert_eq!(b.status, RecipientStatus::Failed);
    assert_eq!(b.reason.as_deref(), Some("deleted"));
    // No bounce: the admin's delete is neither hard nor soft.
    assert_eq!(b.bounce_type, None);
    assert_eq!(b.events.last().unwrap().kind, "deleted");
    assert_eq!(log[0].recipients[0].status, RecipientStatus::Delivered);
}

#[tokio::test]
async fn expiry_is_recorded_without_counting_an_attempt() {
    let dir = TempDir::new().unwrap();
    let store = store_in(&dir);
    let msg = message(1_000, "app@example.com", &["a@example.net"]);
    let r = msg.receipt;
    store.accept(msg).await.unwrap();
    let mut expired = attempt(r, 0, 9_000, RecipientStatus::Expired);
    expired.stage = Stage::Local;
    expired.reason = Some("expired".into());
    store.record_attempts(vec![expired], vec![]).await.unwrap();
    assert!(store.due(i64::MAX, 10, None).await.unwrap().is_empty());
    let log = store.log(&by_address("a@example.net")).await.unwrap();
    let a = &log[0].recipients[0];
    assert_eq!(a.status, RecipientStatus::Expired);
    assert_eq!(a.events.last().unwrap().kind, "expired");
}

fn new_bounce(receipt: Option<ReceiptId>, idx: Option<u32>, at_ms: i64) -> NewBounce {
    let facts = BounceFacts {
        at_ms,
        receipt,
        rcpt_index: idx,
        correlation: if receipt.is_some() {
            Correlation::Verp
        } else {
            Correlation::Unmatched
        },
        recipient: "A@Example.net".into(),
        reported_recipient: None,
        kind: "dsn".into(),
        action: Some("failed".into()),
        status: Some("5.1.1".into()),
        reply_code: Some(550),
        diagnostic: Some("550 5.1.1 user unknown".into()),
        remote_mta: Some("mx.example.net".into()),
        reporting_mta: Some("relay.example.net".into()),
        reason: "userunknown".into(),
        bounce_type: "hard".into(),
        source_receipt: None,
        verified: receipt.is_some(),
    };
    NewBounce {
        facts,
        new_status: Some(RecipientStatus::Bounced),
        suppress: None,
        dedup_key: None,
        held_unverified: false,
    }
}

/// Stores one bounce on its own; returns its id.
async fn record_bounce(store: &SqliteStore, bounce: NewBounce) -> i64 {
    let ids = store.record_bounces(vec![bounce], None).await.unwrap();
    assert_eq!(ids.len(), 1);
    assert!(!ids[0].duplicate);
    ids[0].id
}

#[tokio::test]
async fn a_message_id_sent_twice_finds_the_message_sent_to_the_address_before_the_bounce() {
    let dir = TempDir::new().unwrap();
    let store = store_in(&dir);
    // An application resends under one Message-ID: to a and b, then to b alone, then to a
    // again; all with ENVID `e`.
    let mut sent = Vec::new();
    for (at, to) in [
        (1_000, &["a@example.net", "b@example.net"][..]),
        (2_000, &["b@example.net"][..]),
        (3_000, &["a@example.net"][..]),
    ] {
        let mut msg = message(at, "app@example.com", to);
        msg.envid = Some("e".into());
        sent.push(msg.receipt);
        store.accept(msg).await.unwrap();
    }
    let by_id =
        |a: &'static str, before: i64| store.find_by_message_id("m1@app.example", a, before);
    // The newest sent to the bounced address before the bounce, not the newest of all.
    assert_eq!(
        by_id("B@example.net", i64::MAX).await.unwrap(),
        Some(sent[1])
    );
    assert_eq!(by_id("b@example.net", 1_500).await.unwrap(), Some(sent[0]));
    assert_eq!(by_id("a@example.net", 2_500).await.unwrap(), Some(sent[0]));
    assert_eq!(by_id("a@example.net", 3_000).await.unwrap(), Some(sent[2]));
    // A bounce dated before all of them (a clock behind ours): the oldest after its date.
    assert_eq!(by_id("a@example.net", 10).await.unwrap(), Some(sent[0]));
    assert_eq!(by_id("c@example.net", i64::MAX).await.unwrap(), None);
    let by_envid = |a: &'static str, before: i64| store.find_by_envid("e", a, before);
    assert_eq!(
        by_envid("b@example.net", 1_500).await.unwrap(),
        Some(sent[0])
    );
    assert_eq!(
        by_envid("a@example.net", 2_500).await.unwrap(),
        Some(sent[0])
    );
}

#[tokio::test]
async fn bounces_are_correlated_recorded_and_filtered() {
    let dir = TempDir::new().unwrap();
    let store = store_in(&dir);
    let mut msg = message(
        1_000,
        "app@example.com",
        &["x@example.net", "A@example.net"],
    );
    msg.envid = Some("env-42".into());
    let r = msg.receipt;
    store.accept(msg).await.unwrap();

    assert_eq!(
        store
            .find_recipient(r, "a@EXAMPLE.net")
            .await
            .unwrap()
            .map(|r| r.index),
        Some(1)
    );
    assert_eq!(
        store.find_recipient(r, "z@example.net").await.unwrap(),
        None
    );
    let by_id = |id: &'static str, a: &'static str| store.find_by_message_id(id, a, i64::MAX);
    assert_eq!(
        by_id("m1@app.example", "x@example.net").await.unwrap(),
        Some(r)
    );
    assert_eq!(
        by_id("<m1@app.example>", "a@EXAMPLE.net").await.unwrap(),
        Some(r)
    );
    assert_eq!(by_id("<nope@x>", "x@example.net").await.unwrap(), None);
    assert_eq!(
        by_id("m1@app.example", "z@example.net").await.unwrap(),
        None
    );
    let by_envid = |e: &'static str| store.find_by_envid(e, "x@example.net", i64::MAX);
    assert_eq!(by_envid("env-42").await.unwrap(), Some(r));
    assert_eq!(by_envid("env-43").await.unwrap(), None);

    store
        .record_attempts(
            vec![attempt(r, 1, 1_100, RecipientStatus::Delivered)],
            vec![],
        )
        .await
        .unwrap();
    let first = record_bounce(&store, new_bounce(Some(r), Some(1), 2_000)).await;
    // The bounce, not the 250 before it, is the recipient's last reply now.
    let log = store.log(&by_address("a@example.net")).await.unwrap();
    let bounced = &log[0].recipients[1];
    assert_eq!(bounced.status, RecipientStatus::Bounced);
    assert_eq!(bounced.last_enhanced_status.as_deref(), Some("5.1.1"));
    assert_ne!(bounced.last_reply_code, Some(250));
    let mut complaint = new_bounce(Some(r), Some(1), 3_000);
    complaint.facts.kind = "arf".into();
    complaint.facts.reason = "feedback".into();
    complaint.facts.bounce_type = "complaint".into();
    complaint.new_status = Some(RecipientStatus::Complained);
    let second = record_bounce(&store, complaint).await;
    let mut soft = new_bounce(None, None, 4_000);
    soft.facts.reason = "mailboxfull".into();
    soft.facts.bounce_type = "soft".into();
    soft.facts.recipient = "other@example.net".into();
    let third = record_bounce(&store, soft).await;
    assert!(first < second && second < third);

    let log = store.log(&by_address("a@example.net")).await.unwrap();
    let a = &log[0].recipients[1];
    assert_eq!(a.status, RecipientStatus::Complained);
    assert_eq!(a.reason.as_deref(), Some("feedback"));
    let kinds: Vec<&str> = a.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["accepted", "attempt", "bounce", "complaint"]);
    let bounce_event = &a.events[2];
    assert_eq!(bounce_event.status, RecipientStatus::Bounced);
    assert_eq!(bounce_event.stage, Some(Stage::Bounce));
    assert_eq!(bounce_event.enhanced_status.as_deref(), Some("5.1.1"));
    assert_eq!(bounce_event.reason.as_deref(), Some("userunknown"));

    let all = store.bounces(&BounceQuery::default()).await.unwrap();
    let ids: Vec<i64> = all.iter().map(|b| b.id).collect();
    assert_eq!(ids, [third, second, first]);
    assert_eq!(all[2].facts.correlation, Correlation::Verp);
    assert_eq!(all[2].facts.receipt, Some(r));
    assert_eq!(all[2].facts.rcpt_index, Some(1));
    assert_eq!(all[0].facts.correlation, Correlation::Unmatched);
    assert_eq!(all[0].facts.receipt, None);

    let q = |f: fn(&mut BounceQuery)| {
        let mut q = BounceQuery::default();
        f(&mut q);
        q
    };
    let ids = |v: Vec<StoredBounce>| v.iter().map(|b| b.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store
            .bounces(&q(|q| q.address = Some("a@EXAMPLE.net".into())))
            .await
            .unwrap()),
        [second, first]
    );
    assert_eq!(
        ids(store
            .bounces(&q(|q| q.reason = Some("mailboxfull".into())))
            .await
            .unwrap()),
        [third]
    );
    assert_eq!(
        ids(store.bounces(&q(|q| q.first_only = true)).await.unwrap()),
        [third, first]
    );
    assert_eq!(
        ids(store.bounces(&q(|q| q.limit = 1)).await.unwrap()),
        [third]
    );

    assert_eq!(
        store.set_handled(first, Some("ops"), 5_000).await.unwrap(),
        HandledChange::Changed
    );
    assert_eq!(
        store.set_handled(9_999, Some("ops"), 5_000).await.unwrap(),
        HandledChange::NoSuchBounce
    );
    // A second handler does not overwrite the first.
    assert_eq!(
        store.set_handled(first, Some("late"), 5_500).await.unwrap(),
        HandledChange::Already {
            by: Some("ops".into()),
            at_ms: Some(5_000)
        }
    );
    assert_eq!(
        ids(store
            .bounces(&q(|q| q.unhandled_only = true))
            .await
            .unwrap()),
        [third, second]
    );
    let handled = store.bounces(&q(|q| q.limit = 0)).await.unwrap();
    let h = handled.iter().find(|b| b.id == first).unwrap();
    assert_eq!(h.handled_by.as_deref(), Some("ops"));
    assert_eq!(h.handled_at_ms, Some(5_000));
    assert_eq!(
        store.set_handled(first, None, 6_000).await.unwrap(),
        HandledChange::Changed
    );
    assert_eq!(
        store.set_handled(first, None, 6_500).await.unwrap(),
        HandledChange::Already {
            by: None,
            at_ms: None
        }
    );
    let cleared = store.bounces(&BounceQuery::default()).await.unwrap();
    let h = cleared.iter().find(|b| b.id == first).unwrap();
    assert_eq!((h.handled_by.as_deref(), h.handled_at_ms), (None, None));

    assert_eq!(
        recent_types(&store, "a@example.net", 2_500).await,
        ["complaint"]
    );
    assert_eq!(
        recent_types(&store, "A@example.NET", 0).await,
        ["complaint", "hard"]
    );
    // Records that changed no status (a delay notice, an unmatched bounce) are no part of a
    // soft-bounce run.
    let mut delayed = new_bounce(Some(r), Some(1), 7_000);
    delayed.facts.action = Some("delayed".into());
    delayed.facts.bounce_type = "soft".into();
    delayed.new_status = None;
    record_bounce(&store, delayed).await;
    let mut unmatched = new_bounce(None, None, 7_100);
    unmatched.facts.bounce_type = "soft".into();
    record_bounce(&store, unmatched).await;
    assert_eq!(
        recent_types(&store, "a@example.net", 0).await,
        ["complaint", "hard"]
    );
    // Taken off the suppression list by hand: a new run starts from zero.
    store
        .suppress(suppression("a@example.net", 7_200, None))
        .await
        .unwrap();
    assert!(store.unsuppress("A@example.net").await.unwrap());
    assert!(recent_types(&store, "a@example.net", 0).await.is_empty());
}

#[tokio::test]
async fn autoreply_keeps_status_but_is_logged() {
    let dir = TempDir::new().unwrap();
    let store = store_in(&dir);
    let msg = message(1_000, "app@example.com", &["a@example.net"]);
    let r = msg.receipt;
    store.accept(msg).await.unwrap();
    store
        .record_attempts(
            vec![attempt(r, 0, 1_100, RecipientStatus::Delivered)],
            vec![],
        )
        .await
        .unwrap();
    let mut auto = new_bounce(Some(r), Some(0), 2_000);
    auto.facts.kind = "autoreply".into();
    auto.new_status = None;
    record_bounce(&store, auto).await;
    let log = store.log(&by_address("a@example.net")).await.unwrap();
    let a = &log[0].recipients[0];
    assert_eq!(a.status, RecipientStatus::Delivered);
    let last = a.events.last().unwrap();
    assert_eq!(
        (last.kind.as_str(), last.status),
        ("autoreply", RecipientStatus::Delivered)
    );
}

fn suppression(address: &str, at_ms: i64, expires: Option<i64>) -> Suppression {
    Suppression {
        address: address.into(),
        reason: "userunknown".into(),
        source: "bounce".into(),
        first_at_ms: at_ms,
        last_at_ms: at_ms,
        count: 1,
        expires_at_ms: expires,
    }
}

#[tokio::test]
async fn suppression_upserts_expires_and_is_case_insensitive() {
    let dir = TempDir::new().unwrap();
    let store = store_in(&dir);
    store
        .suppress(suppression("Gone@Example.net", 1_000, Some(100_000)))
        .await
        .unwrap();
    let mut again = suppression("gone@example.NET", 2_000, Some(200_000));
    again.reason = "complaint".into();
    again.source = "complaint".into();
    store.suppress(again).await.unwrap();
    store
        .suppress(suppression("temp@example.net", 1_000, Some(5_000)))
        .await
        .unwrap();
    store
        .suppress(suppression("forever@example.net", 1_000, None))
        .await
        .unwrap();

    let s = store
        .suppressed("GONE@example.net", 150_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.count, 2);
    assert_eq!(s.first_at_ms, 1_000);
    assert_eq!(s.last_at_ms, 2_000);
    assert_eq!(s.reason, "complaint");
    assert_eq!(s.expires_at_ms, Some(200_000));
    assert_eq!(s.address, "Gone@Example.net");

    assert!(
        store
            .suppressed("temp@example.net", 4_999)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        store
            .suppressed("temp@example.net", 5_000)
            .await
            .unwrap()
            .is_none()
    );
    // Suppressed again after it expired: a new entry, not the old one counted on.
    store
        .suppress(suppression("temp@example.net", 6_000, Some(9_000)))
        .await
        .unwrap();
    let t = store
        .suppressed("temp@example.net", 6_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (t.first_at_ms, t.count, t.expires_at_ms),
        (6_000, 1, Some(9_000))
    );
    // A refresh with a sooner expiry does not shorten a live entry; "never" stays never.
    store
        .suppress(suppression("temp@example.net", 7_000, Some(8_000)))
        .await
        .unwrap();
    store
        .suppress(suppression("forever@example.net", 2_000, Some(3_000)))
        .await
        .unwrap();
    let t = store
        .suppressed("temp@example.net", 8_500)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (t.first_at_ms, t.count, t.expires_at_ms),
        (6_000, 2, Some(9_000))
    );
    let f = store
        .suppressed("forever@example.net", 1 << 40)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(f.expires_at_ms, None);
    assert!(
        store
            .suppressed("forever@example.net", i64::MAX)
            .await
            .unwrap()
            .is_some()
    );

    let list: Vec<String> = store
        .suppression_list(10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.address)
        .collect();
    // Newest first (both last seen at 2,000, then by address).
    assert_eq!(list, ["forever@example.net", "Gone@Example.net"]);

    assert!(store.unsuppress("gone@EXAMPLE.net").await.unwrap());
    assert!(!store.unsuppress("gone@example.net").await.unwrap());
    assert!(
        store
            .suppressed("gone@example.net", 0)
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn reopen_after_drop_sees_everything() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("mailtrail.db");
    let store = SqliteStore::open_path(&path).unwrap();
    let msg = message(1_000, "app@example.com", &["a@example.net"]);
    let r = msg.receipt;
    store.accept(msg).await.unwrap();
    store
        .record_attempts(
            vec![attempt(r, 0, 1_100, RecipientStatus::Deferred)],
            vec![],
        )
        .await
        .unwrap();
    store
        .suppress(suppression("s@example.net", 1_000, None))
        .await
        .unwrap();
    record_bounce(&store, new_bounce(None, None, 1_200)).await;
    drop(store);

    let store = SqliteStore::open_path(&path).unwrap();
    let log = store.log(&by_address("a@example.net")).await.unwrap();
    assert_eq!(log[0].recipients[0].status, RecipientStatus::Deferred);
    assert_eq!(log[0].recipients[0].events.len(), 2);
    assert_eq!(store.next_due_at().await.unwrap(), Some(61_100));
    assert!(
        store
            .suppressed("s@example.net", 0)
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        store.bounces(&BounceQuery::default()).await.unwrap().len(),
        1
    );
}

#[tokio::test]
async fn read_only_reader_sees_commits_while_the_writer_runs_and_refuses_a_missing_db() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("mailtrail.db");
    assert!(matches!(
        SqliteReader::open_path(&path),
        Err(StoreError::NotFound(_))
    ));
    assert!(!path.exists(), "the reader must not create the database");

    let store = SqliteStore::open_path(&path).unwrap();
    let reader = SqliteReader::open_path(&path).unwrap();
    assert!(reader.log(&by_address("a@example.net")).unwrap().is_empty());
    store
        .accept(message(1_000, "app@example.com", &["a@example.net"]))
        .await
        .unwrap();
    assert_eq!(reader.log(&by_address("a@example.net")).unwrap().len(), 1);
    assert_eq!(reader.queue_list().unwrap().len(), 1);
    drop(reader);
    drop(store);

    // After the server has stopped (WAL checkpointed and removed), reading still works.
    assert!(!dir.path().join("mailtrail.db-wal").exists());
    let reader = SqliteReader::open_path(&path).unwrap();
    assert_eq!(reader.log(&by_address("a@example.net")).unwrap().len(), 1);
}

#[tokio::test]
async fn a_late_deferral_does_not_reopen_a_deleted_recipient() {
    let dir = TempDir::new().unwrap();
    let store = store_in(&dir);
    let msg = message(1_000, "app@example.com", &["a@example.net"]);
    let r = msg.receipt;
    store.accept(msg).await.unwrap();
    // Deleted by the admin while an attempt was in flight; the attempt then defers.
    assert_eq!(store.queue_delete(r).await.unwrap(), 1);
    store
        .record_attempts(
            vec![attempt(r, 0, 2_000, RecipientStatus::Deferred)],
            vec![],
        )
        .await
        .unwrap();
    assert!(store.due(i64::MAX, 10, None).await.unwrap().is_empty());
    let log = store.log(&by_address("a@example.net")).await.unwrap();
    let a = &log[0].recipients[0];
    assert_eq!(a.status, RecipientStatus::Failed);
    // The attempt is recorded as it ended; the log lists it by its start, before the delete.
    let kinds: Vec<(&str, RecipientStatus)> = a
        .events
        .iter()
        .map(|e| (e.kind.as_str(), e.status))
        .collect();
    assert_eq!(
        kinds[1..],
        [
            ("attempt", RecipientStatus::Deferred),
            ("deleted", RecipientStatus::Failed)
        ]
    );
    assert_eq!(a.events[1].reply_code, Some(451));

    // A final result of that attempt is what happened, so it is recorded.
    store
        .record_attempts(
            vec![attempt(r, 0, 3_000, RecipientStatus::Delivered)],
            vec![],
        )
        .await
        .unwrap();
    let log = store.log(&by_address("a@example.net")).await.unwrap();
    assert_eq!(log[0].recipients[0].status, RecipientStatus::Delivered);
}

fn query_plan(conn: &Connection, sql: &str) -> String {
    let mut st = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
    let rows: Vec<String> = st
        .query_map([], |r| r.get::<_, String>(3))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    rows.join("\n")
}

/// A connection to a freshly migrated, empty store in `dir`.
fn migrated(dir: &TempDir) -> Connection {
    let path = dir.path().join("mailtrail.db");
    drop(SqliteStore::open_path(&path).unwrap());
    Connection::open(&path).unwrap()
}

#[test]
fn hot_queries_use_their_indexes() {
    let dir = TempDir::new().unwrap();
    let conn = migrated(&dir);
    let plan = query_plan(
        &conn,
        &read::DUE_RECEIPTS.replace("?1", "5").replace("?2", "10"),
    );
    assert!(plan.contains("recipients_due"), "{plan}");
    let plan = query_plan(
        &conn,
        "SELECT MIN(next_attempt_at) FROM recipients WHERE status IN ('queued', 'deferred')",
    );
    assert!(plan.contains("recipients_due"), "{plan}");
    let plan = query_plan(
        &conn,
        &format!(
            "SELECT receipt FROM messages WHERE {}",
            read::BY_ADDRESS.replace("?1", "'a'")
        ),
    );
    assert!(plan.contains("recipients_address"), "{plan}");
    assert!(plan.contains("messages_sender"), "{plan}");
    let plan = query_plan(
        &conn,
        "SELECT receipt FROM messages WHERE message_id_key = 'x'",
    );
    assert!(plan.contains("messages_message_id"), "{plan}");
    let plan = query_plan(&conn, "SELECT receipt FROM messages WHERE envid = 'x'");
    assert!(plan.contains("messages_envid"), "{plan}");
    let plan = query_plan(
        &conn,
        "SELECT receipt FROM messages WHERE inbound_bounce = 1 AND inbound_processed_at IS NULL",
    );
    assert!(plan.contains("messages_inbound_pending"), "{plan}");
    let plan = query_plan(
        &conn,
        &write::PURGE_MESSAGES.replace("?1", "5").replace("?2", "10"),
    );
    assert!(plan.contains("messages_received_at"), "{plan}");
    let plan = query_plan(
        &conn,
        &write::PURGE_BOUNCES.replace("?1", "5").replace("?2", "10"),
    );
    assert!(plan.contains("bounces_at"), "{plan}");
}

#[tokio::test]
async fn a_panicking_command_fails_alone_and_the_writer_keeps_going() {
    let dir = TempDir::new().unwrap();
    let store = store_in(&dir);
    let err = store
        .write(|_| -> Result<(), StoreError> { panic!("bug in a write command") })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Storage(_)), "{err:?}");
    store
        .accept(message(1_000, "app@example.com", &["a@example.net"]))
        .await
        .unwrap();
    assert_eq!(
        store.log(&by_address("a@example.net")).await.unwrap().len(),
        1
    );
}

/// What the purges tell apart, received at 1,000 but for `recent` (9,000): a message
/// delivered at 1,100 (`done`), one still pending, one delivered at 9,100 (`recent`) and
/// inbound bounce mail not yet processed. Returns their receipts in that order.
async fn purge_fixture(store: &SqliteStore) -> (ReceiptId, ReceiptId, ReceiptId, ReceiptId) {
    let done = message(1_000, "app@example.com", &["a@example.net"]);
    let pending = message(1_000, "app@example.com", &["b@example.net"]);
    let recent = message(9_000, "app@example.com", &["c@example.net"]);
    let mut bounce_mail = message(1_000, "", &["bounces@bounce.example"]);
    bounce_mail.inbound_bounce = true;
    let receipts = (
        done.receipt,
        pending.receipt,
        recent.receipt,
        bounce_mail.receipt,
    );
    for m in [done, pending, recent, bounce_mail] {
        store.accept(m).await.unwrap();
    }
    store
        .record_attempts(
            vec![
                attempt(receipts.0, 0, 1_100, RecipientStatus::Delivered),
                attempt(receipts.2, 0, 9_100, RecipientStatus::Delivered),
            ],
            vec![],
        )
        .await
        .unwrap();
    receipts
}

#[tokio::test]
async fn purge_drops_only_bodies_whose_recipients_are_all_final() {
    let dir = TempDir::new().unwrap();
    let store = store_in(&dir);
    let (d, p, r, b) = purge_fixture(&store).await;

    assert_eq!(store.purge_bodies(5_000).await.unwrap(), 1);
    assert!(matches!(store.body(d).await, Err(StoreError::NotFound(_))));
    assert!(
        store.body(p).await.is_ok(),
        "pending recipient keeps its body"
    );
    assert!(store.body(r).await.is_ok(), "newer than the cut-off");
    assert!(
        store.body(b).await.is_ok(),
        "unprocessed bounce mail is kept"
    );
    // The record of what happened stays.
    let log = store.log(&by_address("a@example.net")).await.unwrap();
    assert_eq!(log[0].recipients[0].status, RecipientStatus::Delivered);

    store.mark_inbound_processed(b).await.unwrap();
    assert_eq!(store.purge_bodies(5_000).await.unwrap(), 1);
    assert!(matches!(store.body(b).await, Err(StoreError::NotFound(_))));
}

/// Rows of `table` that belong to `receipt`.
fn rows_of(conn: &Connection, table: &str, receipt: ReceiptId) -> i64 {
    conn.query_row(
        &format!("SELECT COUNT(*) FROM {table} WHERE receipt = ?1"),
        [receipt.to_string()],
        |r| r.get(0),
    )
    .unwrap()
}

#[tokio::test]
async fn a_message_s_bounces_suppressions_and_processed_mark_commit_together() {
    let dir = TempDir::new().unwrap();
    let store = store_in(&dir);
    let (d, _, _, b) = purge_fixture(&store).await;
    let suppressing = |address: &str| NewBounce {
        suppress: Some(suppression(address, 2_000, None)),
        ..new_bounce(None, None, 2_000)
    };
    // `d` is not inbound bounce mail: marking it fails, and so does everything with it.
    let refused = store
        .record_bounces(vec![suppressing("x@example.net")], Some(d))
        .await;
    assert!(
        matches!(refused, Err(StoreError::NotFound(_))),
        "{refused:?}"
    );
    assert!(
        store
            .bounces(&BounceQuery::default())
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.suppression_list(0).await.unwrap().is_empty());

    let ids = store
        .record_bounces(
            vec![suppressing("x@example.net"), new_bounce(None, None, 2_000)],
            Some(b),
        )
        .await
        .unwrap();
    assert_eq!(ids.len(), 2);
    assert!(ids[0].id < ids[1].id);
    assert_eq!(
        store.bounces(&BounceQuery::default()).await.unwrap().len(),
        2
    );
    let listed = store.suppression_list(0).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].address, "x@example.net");
    assert!(store.pending_inbound_bounces().await.unwrap().is_empty());

    // The same returned mail again: what was stored under its key is left as it was.
    let keyed = |key: &str| NewBounce {
        dedup_key: Some(key.into()),
        ..suppressing("y@example.net")
    };
    let first = store
        .record_bounces(vec![keyed("m1\n0\ny")], None)
        .await
        .unwrap();
    let again = store
        .record_bounces(vec![keyed("m1\n0\ny"), keyed("m1\n1\ny")], None)
        .await
        .unwrap();
    assert_eq!((again[0].id, again[0].duplicate), (first[0].id, true));
    assert!(!again[1].duplicate);
    assert_eq!(
        store.bounces(&BounceQuery::default()).await.unwrap().len(),
        4
    );
}

#[tokio::test]
async fn log_purge_drops_finished_mail_and_old_bounces_only() {
    let dir = TempDir::new().unwrap();
    let store = store_in(&dir);
    let (d, p, r, b) = purge_fixture(&store).await;
    let old_bounce = record_bounce(&store, new_bounce(Some(d), Some(0), 2_000)).await;
    let new = record_bounce(&store, new_bounce(Some(r), Some(0), 9_500)).await;

    assert_eq!(store.purge_log(5_000).await.unwrap(), (1, 1));
    assert!(
        store
            .log(&by_address("a@example.net"))
            .await
            .unwrap()
            .is_empty()
    );
    let conn = Connection::open(dir.path().join("mailtrail.db")).unwrap();
    for table in ["messages", "bodies", "recipients", "events"] {
        assert_eq!(rows_of(&conn, table, d), 0, "{table} of the purged message");
    }
    assert_eq!(rows_of(&conn, "events", p), 1, "pending mail stays");
    // Newer than the cut-off: accepted, attempt, bounce.
    assert_eq!(rows_of(&conn, "events", r), 3);
    assert_eq!(
        rows_of(&conn, "messages", b),
        1,
        "unprocessed bounce mail stays"
    );
    let ids: Vec<i64> = store
        .bounces(&BounceQuery::default())
        .await
        .unwrap()
        .iter()
        .map(|x| x.id)
        .collect();
    assert_eq!(ids, [new], "bounce {old_bounce} was older than the cut-off");

    store.mark_inbound_processed(b).await.unwrap();
    assert_eq!(store.purge_log(5_000).await.unwrap(), (1, 0));
    assert_eq!(rows_of(&conn, "messages", b), 0);
    assert_eq!(store.purge_log(5_000).await.unwrap(), (0, 0));
}

#[test]
fn correlation_lookups_use_the_partial_indexes() {
    let dir = TempDir::new().unwrap();
    let conn = migrated(&dir);
    let envid = query_plan(
        &conn,
        "SELECT receipt FROM messages WHERE envid = 'x' AND inbound_bounce = 0",
    );
    assert!(envid.contains("USING INDEX messages_envid"), "{envid}");
    let mid = query_plan(
        &conn,
        "SELECT receipt FROM messages WHERE message_id_key = 'x' AND inbound_bounce = 0",
    );
    assert!(mid.contains("USING INDEX messages_message_id"), "{mid}");
}

/// A file check for writers whose files nobody touches.
fn files_unchanged() -> writer::FileCheck {
    Arc::new(|| Ok(()))
}

#[tokio::test]
async fn a_failed_log_fsync_fails_the_write_and_every_later_one() {
    let dir = TempDir::new().unwrap();
    let conn = open_write_connection(&dir.path().join("m.db")).unwrap();
    // fsync of /dev/null fails (EINVAL): a stand-in for a disk that cannot flush.
    let wal = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .unwrap();
    let writer = writer::Writer::start_with_sync(
        conn,
        move || wal.sync_data(),
        files_unchanged(),
        writer::DEFERRABLE_WAIT,
    )
    .unwrap();
    let not_durable = |r: &Result<(), StoreError>| matches!(r, Err(StoreError::Storage(e)) if e.contains("fsync of the database log failed"));
    let first = writer
        .write(|c| c.execute_batch("CREATE TABLE t (x)").map_err(storage))
        .await;
    assert!(not_durable(&first), "{first:?}");
    // Nothing after it is promised durable either.
    let second = writer.write(|_| Ok(())).await;
    assert!(not_durable(&second), "{second:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_that_arrive_while_the_log_is_flushed_share_the_next_commit() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    let dir = TempDir::new().unwrap();
    let conn = open_write_connection(&dir.path().join("m.db")).unwrap();
    let (flushing_tx, flushing_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let flushes = Arc::new(AtomicUsize::new(0));
    let counted = flushes.clone();
    // The first flush lasts until the test lets it end; the later ones pass at once.
    let sync = move || {
        if counted.fetch_add(1, Ordering::SeqCst) == 0 {
            let _ = flushing_tx.send(());
            let _ = release_rx.recv();
        }
        Ok(())
    };
    let writer = Arc::new(
        writer::Writer::start_with_sync(conn, sync, files_unchanged(), writer::DEFERRABLE_WAIT)
            .unwrap(),
    );
    let first = {
        let writer = writer.clone();
        tokio::spawn(async move {
            writer
                .write(|c| c.execute_batch("CREATE TABLE t (x)").map_err(storage))
                .await
        })
    };
    let flushing_rx = tokio::task::spawn_blocking(move || {
        flushing_rx
            .recv_timeout(Duration::from_secs(10))
            .map(|()| flushing_rx)
    })
    .await
    .unwrap()
    .expect("the first commit reaches the syncer");

    // While the first commit is being flushed, five commands come, each after the one before
    // has run.
    let (ran_tx, ran_rx) = std::sync::mpsc::channel::<i64>();
    let mut ran_rx = Some(ran_rx);
    let mut later = Vec::new();
    for i in 0..5i64 {
        let writer = writer.clone();
        let ran = ran_tx.clone();
        later.push(tokio::spawn(async move {
            writer
                .write(move |c| {
                    c.execute("INSERT INTO t VALUES (?1)", [i])
                        .map_err(storage)?;
                    let _ = ran.send(i);
                    Ok(())
                })
                .await
        }));
        let rx = ran_rx.take().unwrap();
        let (rx, got) = tokio::task::spawn_blocking(move || {
            let got = rx.recv_timeout(Duration::from_secs(10));
            (rx, got)
        })
        .await
        .unwrap();
        assert_eq!(got, Ok(i), "command {i} runs while the log is flushed");
        ran_rx = Some(rx);
    }
    assert_eq!(
        writer.stats.commits.get(),
        1,
        "nothing commits while the first commit is flushed"
    );

    release_tx.send(()).unwrap();
    first.await.unwrap().unwrap();
    for t in later {
        t.await.unwrap().unwrap();
    }
    assert_eq!(writer.stats.commits.get(), 2, "the five share one commit");
    assert_eq!(writer.stats.commands.get(), 6);
    assert_eq!(flushes.load(Ordering::SeqCst), 2);
    drop(flushing_rx);
    let rows: i64 = writer
        .write(|c| {
            c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                .map_err(storage)
        })
        .await
        .unwrap();
    assert_eq!(rows, 5);
}

#[tokio::test]
async fn the_write_connection_leaves_syncing_the_log_to_the_syncer() {
    // The writer's connection does not fsync at COMMIT (synchronous = NORMAL): the syncer's
    // fsync of the log file (which must exist beside the database) stands behind every
    // acknowledgement. A failing fsync: `a_failed_log_fsync_fails_the_write_and_every_later_one`.
    let dir = TempDir::new().unwrap();
    let store = store_in(&dir);
    let mode: i64 = store
        .write(|c| {
            c.query_row("PRAGMA synchronous", [], |r| r.get(0))
                .map_err(storage)
        })
        .await
        .unwrap();
    assert_eq!(mode, 1, "synchronous should be NORMAL (1)");
    let wal = dir.path().join("mailtrail.db-wal");
    assert!(wal.exists());
}

#[tokio::test]
async fn a_deleted_database_file_fails_the_next_write_and_every_later_one() {
    let dir = TempDir::new().unwrap();
    let store = store_in(&dir);
    store
        .accept(message(1_000, "a@x.example", &["kept@y.example"]))
        .await
        .unwrap();
    assert_eq!(store.write_refusal(), None);

    let db = dir.path().join("mailtrail.db");
    std::fs::remove_file(&db).unwrap();
    // Refused, though SQLite would commit and fsync into the unlinked file without a word.
    let lost = store
        .accept(message(2_000, "a@x.example", &["lost@y.example"]))
        .await;
    let names_the_file =
        |e: &str| e.contains(&db.display().to_string()) && e.contains("was deleted");
    assert!(
        matches!(&lost, Err(StoreError::Storage(e)) if names_the_file(e)),
        "{lost:?}"
    );
    let later = store.queue_retry(None).await;
    assert!(
        matches!(&later, Err(StoreError::Storage(e)) if names_the_file(e)),
        "{later:?}"
    );
    assert!(store.write_refusal().is_some_and(|r| names_the_file(&r)));
}

#[tokio::test]
async fn a_replaced_database_file_is_seen_without_a_write() {
    let dir = TempDir::new().unwrap();
    let store = store_in(&dir);
    let db = dir.path().join("mailtrail.db");
    let other = dir.path().join("restored.db");
    std::fs::copy(&db, &other).unwrap();
    std::fs::rename(&other, &db).unwrap();
    // No write needed: what a health probe asks.
    let refusal = store
        .write_refusal()
        .expect("the store sees its file replaced");
    assert!(
        refusal.contains("was replaced by another file"),
        "{refusal}"
    );
    let write = store.queue_retry(None).await;
    assert!(
        matches!(&write, Err(StoreError::Storage(e)) if e == &refusal),
        "{write:?}"
    );
}

/// The next accept fails with exactly the store's refusal.
async fn assert_accept_refused_with(store: &SqliteStore, refusal: &str) {
    let write = store
        .accept(message(9_000, "a@x.example", &["c@y.example"]))
        .await;
    assert!(
        matches!(&write, Err(StoreError::Storage(e)) if e == refusal),
        "{write:?}"
    );
}

#[tokio::test]
async fn a_deleted_shared_memory_index_is_seen_as_the_log_is() {
    let dir = TempDir::new().unwrap();
    let store = store_in(&dir);
    let shm = dir.path().join("mailtrail.db-shm");
    assert!(shm.exists(), "WAL mode keeps its index beside the database");
    std::fs::remove_file(&shm).unwrap();
    // A CLI opening the database now would make a new index of its own (seen to corrupt it).
    let refusal = store
        .write_refusal()
        .expect("the store sees its index gone");
    assert!(
        refusal.contains(&shm.display().to_string()) && refusal.contains("was deleted"),
        "{refusal}"
    );
    assert_accept_refused_with(&store, &refusal).await;
}

#[tokio::test]
async fn a_damaged_database_makes_the_store_refuse_writes() {
    let dir = TempDir::new().unwrap();
    let db = dir.path().join("mailtrail.db");
    {
        let store = store_in(&dir);
        for n in 0..200 {
            let mut m = message(1_000 + n, "a@x.example", &["b@y.example"]);
            m.body = vec![b'x'; 2_000];
            store.accept(m).await.unwrap();
        }
        store.checkpoint().unwrap();
    }
    let len = std::fs::metadata(&db).unwrap().len();
    assert!(len > 100 * 4096, "{len}");
    let good = std::fs::read(&db).unwrap();
    let garbage_from = |start: usize| {
        let mut bytes = good.clone();
        for (n, b) in bytes.iter_mut().enumerate().skip(start) {
            *b = (n * 7 + 13) as u8;
        }
        std::fs::write(&db, &bytes).unwrap();
    };
    // Garbage over every page but the first: the start is refused, naming the file.
    garbage_from(4096);
    let refused = SqliteStore::open_path(&db).err().expect("refused");
    assert!(
        refused.to_string().contains(&db.display().to_string())
            && refused.to_string().contains("damaged"),
        "{refused}"
    );
    // Garbage over the later pages (the messages), as a failing disk leaves them: the
    // start reads only the schema, the first read of the queue finds the damage.
    garbage_from(len as usize / 2);
    let store = store_in(&dir);
    assert_eq!(store.write_refusal(), None);
    let read = store.queue_list().await;
    assert!(read.is_err(), "{read:?}");
    let refusal = store
        .write_refusal()
        .expect("a damaged database refuses writes");
    assert!(
        refusal.contains("is damaged") && refusal.contains(&db.display().to_string()),
        "{refusal}"
    );
    assert_accept_refused_with(&store, &refusal).await;
}

#[tokio::test]
async fn an_empty_database_beside_a_full_log_is_refused_not_emptied() {
    let dir = TempDir::new().unwrap();
    let db = dir.path().join("mailtrail.db");
    let wal = dir.path().join("mailtrail.db-wal");
    let saved = dir.path().join("saved-wal");
    {
        let store = store_in(&dir);
        store
            .accept(message(1_000, "a@x.example", &["kept@y.example"]))
            .await
            .unwrap();
        // The log as it was while the store ran: the acknowledged message is in it alone.
        std::fs::copy(&wal, &saved).unwrap();
    }
    std::fs::write(&db, b"").unwrap();
    std::fs::copy(&saved, &wal).unwrap();
    let wal_bytes = std::fs::metadata(&wal).unwrap().len();
    assert!(wal_bytes > 0);
    let refused = SqliteStore::open_path(&db).err().expect("refused");
    assert!(
        refused.to_string().contains("write-ahead log")
            && refused.to_string().contains(&wal_bytes.to_string()),
        "{refused}"
    );
    assert_eq!(
        std::fs::metadata(&wal).unwrap().len(),
        wal_bytes,
        "the log is kept"
    );
    // A CLI command's read-only view refuses it too (SQLite's read-only open deleted it).
    let refused = SqliteReader::open_path(&db).err().expect("refused");
    assert!(refused.to_string().contains("write-ahead log"), "{refused}");
    assert_eq!(std::fs::metadata(&wal).unwrap().len(), wal_bytes);
    std::fs::remove_file(&db).unwrap();
    assert!(
        SqliteStore::open_path(&db).is_err(),
        "a missing database too"
    );
    assert_eq!(std::fs::metadata(&wal).unwrap().len(), wal_bytes);
}

#[tokio::test]
async fn the_checkpoint_at_stop_leaves_the_database_file_whole() {
    let dir = TempDir::new().unwrap();
    let store = store_in(&dir);
    let m = message(1_000, "a@x.example", &["kept@y.example"]);
    let receipt = m.receipt;
    store.accept(m).await.unwrap();
    store.checkpoint().unwrap();
    // The database file alone, copied while the log is still open, has the message.
    let copy = TempDir::new().unwrap();
    std::fs::copy(
        dir.path().join("mailtrail.db"),
        copy.path().join("mailtrail.db"),
    )
    .unwrap();
    drop(store);
    let restored = store_in(&copy);
    let log = restored.log(&by_address("kept@y.example")).await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].receipt, receipt);
}

#[tokio::test]
async fn a_milder_bounce_does_not_undo_a_graver_one() {
    let dir = TempDir::new().unwrap();
    let store = store_in(&dir);
    let m = message(1_000, "app@example.com", &["a@example.net"]);
    let receipt = m.receipt;
    store.accept(m).await.unwrap();
    let state = || async {
        let log = store.log(&by_address("a@example.net")).await.unwrap();
        let r = &log[0].recipients[0];
        (r.status, r.bounce_type.clone(), r.reason.clone())
    };
    let soft = |at_ms: i64| {
        let mut b = new_bounce(Some(receipt), Some(0), at_ms);
        b.facts.status = Some("4.2.2".into());
        b.facts.reason = "mailboxfull".into();
        b.facts.bounce_type = "soft".into();
        b
    };
    let complaint = |at_ms: i64| {
        let mut b = new_bounce(Some(receipt), Some(0), at_ms);
        b.facts.kind = "feedback".into();
        b.facts.reason = "feedback".into();
        b.facts.bounce_type = "hard".into();
        b.new_status = Some(RecipientStatus::Complained);
        b
    };
    // Soft, then hard: the hard one takes over.
    record_bounce(&store, soft(2_000)).await;
    assert_eq!(state().await.1.as_deref(), Some("soft"));
    record_bounce(&store, new_bounce(Some(receipt), Some(0), 3_000)).await;
    let hard = (
        RecipientStatus::Bounced,
        Some("hard".to_string()),
        Some("userunknown".to_string()),
    );
    assert_eq!(state().await, hard);
    // A soft one after it is recorded, but the recipient stays hard-bounced.
    record_bounce(&store, soft(4_000)).await;
    assert_eq!(state().await, hard);
    // A complaint is graver still; nothing after it undoes it.
    record_bounce(&store, complaint(5_000)).await;
    assert_eq!(state().await.0, RecipientStatus::Complained);
    record_bounce(&store, new_bounce(Some(receipt), Some(0), 6_000)).await;
    record_bounce(&store, soft(7_000)).await;
    assert_eq!(state().await.0, RecipientStatus::Complained);
    // Every report is kept, and the event of each says what the recipient is now.
    let all = store
        .bounces(&BounceQuery {
            address: Some("a@example.net".into()),
            ..BounceQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 6);
    let log = store.log(&by_address("a@example.net")).await.unwrap();
    let last = log[0].recipients[0].events.last().unwrap();
    assert_eq!(last.status, RecipientStatus::Complained);
    // Only the reports that took over count towards soft-bounce suppression.
    let types = recent_types(&store, "a@example.net", 0).await;
    assert_eq!(types.len(), 3, "{types:?}");
}

#[tokio::test]
async fn before_pages_exactly_through_messages_of_one_millisecond() {
    let dir = TempDir::new().unwrap();
    let store = store_in(&dir);
    let mut all = Vec::new();
    for _ in 0..5 {
        let m = message(1_000, "app@example.com", &["tie@example.net"]);
        all.push(m.receipt);
        store.accept(m).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = store
            .log(&LogQuery {
                limit: 2,
                before,
                ..by_address("tie@example.net")
            })
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        before = page.last().map(|m| m.receipt);
        seen.extend(page.iter().map(|m| m.receipt));
    }
    all.sort();
    all.reverse();
    assert_eq!(
        seen, all,
        "every message once, newest (largest receipt) first"
    );
    let unknown = store
        .log(&LogQuery {
            before: Some(ReceiptId::new()),
            ..by_address("tie@example.net")
        })
        .await;
    assert!(
        matches!(unknown, Err(StoreError::NotFound(_))),
        "{unknown:?}"
    );
}

#[tokio::test]
async fn a_bounce_does_not_overwrite_a_standing_complaint_on_the_list() {
    let dir = TempDir::new().unwrap();
    let store = store_in(&dir);
    let entry = |source: &str, reason: &str, at: i64| Suppression {
        source: source.into(),
        reason: reason.into(),
        ..suppression("a@example.net", at, None)
    };
    store
        .suppress(entry("complaint", "feedback", 1_000))
        .await
        .unwrap();
    store
        .suppress(entry("bounce", "userunknown", 2_000))
        .await
        .unwrap();
    let s = store
        .suppressed("a@example.net", 3_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (s.source.as_str(), s.reason.as_str(), s.last_at_ms),
        ("complaint", "feedback", 2_000)
    );
    // An admin's entry is the admin's word.
    store
        .suppress(entry("manual", "customer asked", 4_000))
        .await
        .unwrap();
    let s = store
        .suppressed("a@example.net", 5_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (s.source.as_str(), s.reason.as_str()),
        ("manual", "customer asked")
    );
}

#[tokio::test]
async fn the_log_lists_events_in_time_order_not_commit_order() {
    let dir = TempDir::new().unwrap();
    let store = store_in(&dir);
    let m = message(1_000, "app@example.com", &["a@example.net"]);
    let r = m.receipt;
    store.accept(m).await.unwrap();
    // An attempt under way when the message was deleted is committed after the delete,
    // stamped with its start.
    store.queue_delete(r).await.unwrap();
    store
        .record_attempts(
            vec![attempt(r, 0, 2_000, RecipientStatus::Deferred)],
            vec![],
        )
        .await
        .unwrap();
    let log = store.log(&by_address("a@example.net")).await.unwrap();
    let kinds: Vec<&str> = log[0].recipients[0]
        .events
        .iter()
        .map(|e| e.kind.as_str())
        .collect();
    assert_eq!(kinds, ["accepted", "attempt", "deleted"]);
}

/// The types of the returned messages that count toward `address`'s soft-bounce run.
async fn recent_types(store: &SqliteStore, address: &str, since_ms: i64) -> Vec<String> {
    store
        .recent_bounce_types(address, since_ms)
        .await
        .unwrap()
        .into_iter()
        .map(|(bounce_type, _)| bounce_type)
        .collect()
}

#[tokio::test]
async fn a_success_report_is_no_unhandled_bounce_and_no_first_bounce() {
    let dir = TempDir::new().unwrap();
    let store = store_in(&dir);
    let mut success = new_bounce(None, None, 1_000);
    success.facts.action = Some("delivered".into());
    success.facts.status = Some("2.0.0".into());
    success.facts.reason = "delivered".into();
    success.facts.bounce_type = "undetermined".into();
    success.new_status = None;
    let delivered = record_bounce(&store, success).await;
    let failed = record_bounce(&store, new_bounce(None, None, 2_000)).await;
    // An auto-reply and a delay notice stay on the unhandled list.
    let mut vacation = new_bounce(None, None, 3_000);
    vacation.facts.kind = "autoreply".into();
    vacation.facts.reason = "vacation".into();
    vacation.facts.bounce_type = "autoreply".into();
    vacation.new_status = None;
    let vacation = record_bounce(&store, vacation).await;
    let mut delay = new_bounce(None, None, 4_000);
    delay.facts.action = Some("delayed".into());
    delay.facts.status = Some("4.4.1".into());
    delay.facts.reason = "expired".into();
    delay.facts.bounce_type = "soft".into();
    delay.new_status = None;
    let delay = record_bounce(&store, delay).await;
    let ids = |v: Vec<StoredBounce>| v.iter().map(|b| b.id).collect::<Vec<_>>();
    let q = |unhandled_only, first_only| BounceQuery {
        unhandled_only,
        first_only,
        ..Default::default()
    };
    // Listed with the rest, but there is nothing to handle in it, and it is no bounce.
    assert_eq!(
        ids(store.bounces(&q(false, false)).await.unwrap()),
        [delay, vacation, failed, delivered]
    );
    assert_eq!(
        ids(store.bounces(&q(true, false)).await.unwrap()),
        [delay, vacation, failed]
    );
    assert_eq!(ids(store.bounces(&q(false, true)).await.unwrap()), [failed]);
}
