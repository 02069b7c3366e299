//! The data_dir belongs to one server: a second `serve` on it is refused, and a store whose
//! files were deleted under it stops acknowledging mail.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::mailtrail::{Mailtrail, RawSmtp, bin, free_port, receipt_in, wait_until};
use common::test_mx::{Script, TestMx};

/// The final reply to one message submitted over a raw session (`250 ... queued as` or not).
fn submit(m: &Mailtrail, to: &str) -> String {
    let mut c = RawSmtp::connect(m.smtp);
    assert!(c.cmd("EHLO app.test").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<app@example.com>").starts_with("250"));
    let r = c.cmd(&format!("RCPT TO:<{to}>"));
    assert!(r.starts_with("250"), "{r}");
    assert!(c.cmd("DATA").starts_with("354"));
    let reply = c.cmd("Subject: hello\r\n\r\nhello\r\n.");
    let _ = c.cmd("QUIT");
    reply
}

/// `m`'s config with other SMTP and HTTP ports: a second server on the same data_dir that
/// cannot fail for a port in use, only for the data_dir.
fn same_data_dir_other_ports(m: &Mailtrail) -> std::path::PathBuf {
    let text = std::fs::read_to_string(&m.config_path).unwrap();
    let other = || format!("127.0.0.1:{}", free_port());
    let text = text
        .replace(&m.smtp.to_string(), &other())
        .replace(&m.http.to_string(), &other());
    let path = m.dir.path().join("second.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_second_serve_on_the_same_data_dir_exits_1_naming_it_and_the_first_keeps_serving() {
    let mut m = Mailtrail::start();
    let second_config = same_data_dir_other_ports(&m);
    let second_smtp: SocketAddr = std::fs::read_to_string(&second_config)
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("listen = [\"")?
                .strip_suffix("\"]")?
                .parse()
                .ok()
        })
        .unwrap();
    let mut second = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&second_config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // At once, not after binding or opening anything: well within the time a start takes.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("a second serve on the same data_dir kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&m.data_dir().display().to_string()),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("pid {}", m.child_id())),
        "{stderr}"
    );
    assert!(stderr.contains("one server per data_dir"), "{stderr}");
    assert!(
        TcpStream::connect_timeout(&second_smtp, Duration::from_secs(1)).is_err(),
        "the second server listens on {second_smtp}"
    );

    // The first goes on taking mail, and the CLI still works beside it (no lock for it).
    let reply = submit(&m, "after@example.org");
    let receipt = receipt_in(&reply).unwrap_or_else(|| panic!("{reply}"));
    assert_eq!(m.log_json(&receipt).len(), 1);
    assert!(m.cli_ok(&["queue", "list"]).contains("after@example.org"));
    // A command that writes, too.
    m.cli_ok(&["suppress", "add", "no@example.org"]);
    assert!(
        m.cli(&["suppress", "check", "no@example.org"])
            .status
            .success()
    );

    // The lock goes with the server (after a kill -9 too: `acknowledged_message_survives_kill_9`
    // restarts on its data_dir): the next one starts.
    let status = m.terminate();
    assert!(status.success(), "{status}\n{}", m.server_log());
    m.spawn();
    assert!(submit(&m, "again@example.org").starts_with("250 2.0.0 Ok: queued as"));
}

#[test]
fn a_deleted_database_file_gets_451_not_250_and_healthz_says_why() {
    let m = Mailtrail::start();
    let kept = submit(&m, "kept@example.org");
    assert!(kept.starts_with("250 2.0.0 Ok: queued as"), "{kept}");
    assert_eq!(m.http_get("/healthz"), (200, "ok\n".to_string()));

    let db = m.data_dir().join("mailtrail.db");
    std::fs::remove_file(&db).unwrap();
    // Before, both were `250`: stored in the unlinked file, and lost at the next start.
    for to in ["lost@example.org", "lost-too@example.org"] {
        let reply = submit(&m, to);
        assert!(
            reply.starts_with("451 4.3.0"),
            "{to}: {reply}\n{}",
            m.server_log()
        );
    }
    let (status, body) = m.http_get("/healthz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(&db.display().to_string()), "{body}");
    assert!(body.contains("was deleted"), "{body}");
    let log = m.server_log();
    let refusals: Vec<_> = log
        .lines()
        .filter(|l| l.contains("store refusing further writes"))
        .collect();
    assert_eq!(refusals.len(), 1, "{log}");
    assert!(refusals[0].contains(&db.display().to_string()), "{log}");
}

#[test]
fn a_deleted_data_dir_shows_at_healthz_before_any_mail_and_mail_gets_451() {
    let m = Mailtrail::start();
    std::fs::remove_dir_all(m.data_dir()).unwrap();
    // Seen by the probe itself, with no write to notice it.
    let (status, body) = m.http_get("/healthz");
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("store unwritable:"), "{body}");
    assert!(body.contains("mailtrail.db"), "{body}");
    let reply = submit(&m, "lost@example.org");
    assert!(
        reply.starts_with("451 4.3.0"),
        "{reply}\n{}",
        m.server_log()
    );
}

/// Mail queued before the database file was deleted is not delivered out of the unlinked
/// file: its result could not be recorded, and the next start would deliver it again.
/// Delivery pauses (logged once, `mailtrail_delivery_paused 1`) and starts no transaction;
/// before, the next retry of every queued message went out, unrecordable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_database_file_pauses_delivery_of_mail_queued_before() {
    let mx =
        TestMx::start(Script::default().rcpt("queued@dest.test", &["451 4.7.1 try later"])).await;
    let m = Mailtrail::start_with(
        "",
        "",
        &format!(
            "[delivery]\nretry_first = \"2s\"\nretry_max_interval = \"2s\"\n\
             [checks]\ndomain_check = false\n\
             [[route]]\ndomains = [\"*\"]\nmx = [\"127.0.0.1:{}\"]\ntls = \"none\"\n",
            mx.port()
        ),
    );
    let tries = || {
        mx.commands()
            .iter()
            .filter(|c| c.starts_with("RCPT TO:<queued@dest.test>"))
            .count()
    };
    let receipt = m.submit(None, "app@example.com", &["queued@dest.test"], "queued");
    // Deferred and recorded: its next try is 2 s away, none runs now.
    wait_until("the first try recorded", Duration::from_secs(30), || {
        m.recipient(&receipt, "queued@dest.test")["status"] == "deferred"
    });
    let db = m.data_dir().join("mailtrail.db");
    std::fs::remove_file(&db).unwrap();
    let before = tries();
    assert_eq!(before, 1);
    let reply = submit(&m, "new@dest.test");
    assert!(reply.starts_with("451 4.3.0"), "{reply}");
    // Two retry times pass: no try goes out of the unlinked file.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        tries(),
        before,
        "delivered out of the deleted database\n{}",
        m.server_log()
    );
    assert!(!mx.commands().iter().any(|c| c.contains("new@dest.test")));
    let log = m.server_log();
    assert_eq!(
        log.matches("delivery paused until restart").count(),
        1,
        "{log}"
    );
    let (_, metrics) = m.http_get("/metrics");
    assert!(
        metrics.lines().any(|l| l == "mailtrail_delivery_paused 1"),
        "{metrics}"
    );
    let (status, _) = m.http_get("/healthz");
    assert_eq!(status, 503);
}
