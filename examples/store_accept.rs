//! Accept throughput of the SQLite store with fsync on: N concurrent tasks each accept M
//! messages of 4 KiB. `cargo run --release --example store_accept [tasks] [per_task] [dir]`.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

use mailtrail::receipt::ReceiptId;
use mailtrail::spool::{AcceptedMessage, AcceptedRecipient};
use mailtrail::store::Store;
use mailtrail::store::sqlite::SqliteStore;

fn message(i: usize) -> AcceptedMessage {
    AcceptedMessage {
        receipt: ReceiptId::new(),
        received_at_ms: chrono::Utc::now().timestamp_millis(),
        client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        helo: "bench.example".into(),
        tls_version: None,
        auth_user: None,
        envelope_sender: "app@example.com".into(),
        recipients: vec![AcceptedRecipient {
            address: format!("user{i}@example.net"),
            orcpt: None,
            notify: None,
            preset: None,
        }],
        envid: None,
        ret: None,
        eight_bit: false,
        smtputf8: false,
        message_id: Some(format!("<{i}@bench.example>")),
        subject: Some("bench".into()),
        context: None,
        body: vec![b'x'; 4096],
        inbound_bounce: false,
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let tasks: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(20);
    let per_task: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(500);
    let tmp = tempfile::TempDir::new()?;
    let dir = args
        .get(3)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let store = Arc::new(SqliteStore::open_path(&dir.join("bench.db"))?);

    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            for i in 0..per_task {
                store.accept(message(t * per_task + i)).await?;
            }
            Ok::<_, mailtrail::store::StoreError>(())
        }));
    }
    for h in handles {
        h.await??;
    }
    let elapsed = start.elapsed();
    let total = tasks * per_task;
    let commits = store.writer_stats().commits.get();
    println!(
        "{total} accepts ({tasks} tasks x {per_task}, 4 KiB) in {:.2}s: {:.0} msg/s, {commits} commits ({:.1} msgs/commit)",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        total as f64 / commits.max(1) as f64,
    );
    Ok(())
}
