//! Group commit: one thread owns the write connection, drains every queued write command,
//! runs them in one transaction (a savepoint each) and commits once, so one fsync
//! acknowledges the whole batch. Callers wait on a oneshot that is answered after COMMIT.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::store::StoreError;

/// At most this many commands share one transaction, so a flood of writers cannot grow one
/// transaction (and its WAL frames) without bound.
const MAX_BATCH: usize = 1024;

/// Queued commands beyond this make writers wait (back-pressure instead of memory growth).
const QUEUE_DEPTH: usize = 8192;

/// Counters that show group commit at work (tests and metrics read them).
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Transactions committed (one fsync each).
    pub commits: AtomicU64,
    /// Commands that ran in a committed transaction.
    pub commands: AtomicU64,
}

/// One queued write: runs inside the batch transaction, answers after the batch ends.
trait Job: Send {
    /// Runs the command; false when it failed (its savepoint is then rolled back).
    fn run(&mut self, conn: &Connection) -> bool;
    /// Answers the caller: its own result if the batch committed, else the commit error.
    fn finish(self: Box<Self>, batch: Result<(), &StoreError>);
}

struct TypedJob<R, F> {
    op: Option<F>,
    outcome: Option<Result<R, StoreError>>,
    reply: oneshot::Sender<Result<R, StoreError>>,
}

impl<R, F> Job for TypedJob<R, F>
where
    R: Send,
    F: FnOnce(&Connection) -> Result<R, StoreError> + Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let Some(op) = self.op.take() else {
            return false;
        };
        let outcome = op(conn);
        let ok = outcome.is_ok();
        self.outcome = Some(outcome);
        ok
    }

    fn finish(self: Box<Self>, batch: Result<(), &StoreError>) {
        let result = match batch {
            Err(e) => Err(StoreError::Storage(e.to_string())),
            Ok(()) => self
                .outcome
                .unwrap_or_else(|| Err(StoreError::Storage("command did not run".into()))),
        };
        // The caller may have given up waiting; nothing to do then.
        let _ = self.reply.send(result);
    }
}

/// Handle to the writer thread. Dropping it closes the queue; the thread finishes what was
/// queued, and the drop waits for it so a reopen sees every acknowledged write.
pub struct Writer {
    tx: Option<mpsc::Sender<Box<dyn Job>>>,
    thread: Option<JoinHandle<()>>,
    pub stats: Arc<WriterStats>,
}

impl Writer {
    pub fn start(conn: Connection) -> Result<Self, StoreError> {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let stats = Arc::new(WriterStats::default());
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || run(conn, rx, &thread_stats))
            .map_err(|e| StoreError::Storage(format!("cannot start writer thread: {e}")))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            stats,
        })
    }

    /// Queues `op` and resolves once the transaction it ran in has committed.
    pub async fn write<R, F>(&self, op: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let job = Box::new(TypedJob {
            op: Some(op),
            outcome: None,
            reply,
        });
        let tx = self.tx.as_ref().ok_or(StoreError::Closed)?;
        tx.send(job).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(conn: Connection, mut rx: mpsc::Receiver<Box<dyn Job>>, stats: &WriterStats) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        if run_batch(&conn, &mut batch).is_ok() {
            stats.commits.fetch_add(1, Ordering::Relaxed);
            stats.commands.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Runs one batch and answers every job in it. Each job gets a savepoint so its failure rolls
/// back only its own writes; if SQLite rolled back the whole transaction (it may on
/// SQLITE_FULL / IOERR) or COMMIT fails, every job gets the storage error.
fn run_batch(conn: &Connection, batch: &mut Vec<Box<dyn Job>>) -> Result<(), ()> {
    let result = execute_batch(conn, batch);
    if result.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    let ok = result.is_ok();
    for job in batch.drain(..) {
        job.finish(result.as_ref().map(|_| ()));
    }
    if ok { Ok(()) } else { Err(()) }
}

fn execute_batch(conn: &Connection, batch: &mut [Box<dyn Job>]) -> Result<(), StoreError> {
    sql(conn, "BEGIN IMMEDIATE")?;
    for job in batch.iter_mut() {
        sql(conn, "SAVEPOINT command")?;
        if job.run(conn) {
            sql(conn, "RELEASE command")?;
        } else {
            if conn.is_autocommit() {
                return Err(StoreError::Storage(
                    "transaction rolled back by the database after a failed write".into(),
                ));
            }
            sql(conn, "ROLLBACK TO command")?;
            sql(conn, "RELEASE command")?;
        }
    }
    sql(conn, "COMMIT")
}

fn sql(conn: &Connection, statement: &str) -> Result<(), StoreError> {
    conn.execute_batch(statement)
        .map_err(|e| StoreError::Storage(format!("{statement}: {e}")))
}
