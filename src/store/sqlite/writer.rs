//! Group commit: one thread owns the write connection, drains every queued write command,
//! runs them in one transaction (a savepoint each) and commits once, so one fsync
//! acknowledges the whole batch. Callers wait on a oneshot that is answered after COMMIT.

use std::sync::Arc;
use std::thread::JoinHandle;

use prometheus_client::metrics::counter::Counter;
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::store::StoreError;

/// At most this many commands share one transaction, so a flood of writers cannot grow one
/// transaction (and its WAL frames) without bound.
const MAX_BATCH: usize = 1024;

/// Queued commands beyond this make writers wait (back-pressure instead of memory growth).
const QUEUE_DEPTH: usize = 8192;

/// Counters that show group commit at work (tests read them; `/metrics` exports them as
/// `mailtrail_store_commits_total` and `mailtrail_store_commands_total`). Clones share counts.
#[derive(Debug, Default, Clone)]
pub struct WriterStats {
    /// Transactions committed (one fsync each).
    pub commits: Counter,
    /// Commands that ran in a committed transaction.
    pub commands: Counter,
}

/// One queued write: runs inside the batch transaction, answers after the batch ends.
trait Job: Send {
    /// Runs the command; false when it failed (its savepoint is then rolled back). May run
    /// again when the batch restarts after SQLite rolled back the whole transaction.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Answers the caller: its own result if the batch committed, else the batch error.
    fn finish(self: Box<Self>, batch: Result<(), &str>);
}

struct TypedJob<R, F> {
    op: F,
    outcome: Option<Result<R, StoreError>>,
    reply: oneshot::Sender<Result<R, StoreError>>,
}

impl<R, F> Job for TypedJob<R, F>
where
    R: Send,
    F: Fn(&Connection) -> Result<R, StoreError> + Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        // A panicking command must not take the writer (and with it every later accept) down.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.op)(conn)))
            .unwrap_or_else(|_| Err(StoreError::Storage("write command panicked".into())));
        let ok = outcome.is_ok();
        self.outcome = Some(outcome);
        ok
    }

    fn finish(self: Box<Self>, batch: Result<(), &str>) {
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
        F: Fn(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let job = Box::new(TypedJob {
            op,
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

/// Takes whatever is queued when the previous commit ends: callers that arrive during a commit
/// share the next one. Waiting for more (PostgreSQL's `commit_delay`) was tried: a 1 ms wait
/// whenever a batch was smaller than the one before cost 5-35% of throughput at 20 sessions
/// (the commit itself is the natural wait; see docs/benchmarks.md).
fn run(conn: Connection, mut rx: mpsc::Receiver<Box<dyn Job>>, stats: &WriterStats) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        run_batch(&conn, batch, stats);
    }
}

/// How one try at committing a batch ended.
enum Outcome {
    Committed,
    /// Job `n` failed and SQLite rolled back the whole transaction (it may on SQLITE_FULL,
    /// IOERR, NOMEM): the others did nothing wrong and are retried without it.
    Aborted(usize),
    /// BEGIN, a savepoint or COMMIT failed: the batch as a whole is lost.
    Failed(String),
}

/// Runs one batch and answers every job in it. Each job gets a savepoint so its failure rolls
/// back only its own writes; if COMMIT fails, every job gets the storage error and nothing of
/// the batch is visible.
fn run_batch(conn: &Connection, mut batch: Vec<Box<dyn Job>>, stats: &WriterStats) {
    loop {
        let outcome = try_batch(conn, &mut batch);
        if !matches!(outcome, Outcome::Committed) && !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        match outcome {
            Outcome::Committed => {
                stats.commits.inc();
                stats.commands.inc_by(batch.len() as u64);
                for job in batch {
                    job.finish(Ok(()));
                }
                return;
            }
            Outcome::Aborted(n) => {
                // Its own outcome holds the error that aborted the transaction.
                batch.remove(n).finish(Ok(()));
                if batch.is_empty() {
                    return;
                }
            }
            Outcome::Failed(e) => {
                for job in batch {
                    job.finish(Err(&e));
                }
                return;
            }
        }
    }
}

fn try_batch(conn: &Connection, batch: &mut [Box<dyn Job>]) -> Outcome {
    // Prepared once per connection: these run for every command of every batch.
    let sql = |statement: &str| {
        conn.prepare_cached(statement)
            .and_then(|mut st| st.execute([]))
            .map(|_| ())
            .map_err(|e| Outcome::Failed(format!("{statement}: {e}")))
    };
    let mut run = || -> Result<(), Outcome> {
        sql("BEGIN IMMEDIATE")?;
        for (n, job) in batch.iter_mut().enumerate() {
            sql("SAVEPOINT command")?;
            if job.run(conn) {
                sql("RELEASE command")?;
            } else if conn.is_autocommit() {
                return Err(Outcome::Aborted(n));
            } else {
                sql("ROLLBACK TO command")?;
                sql("RELEASE command")?;
            }
        }
        sql("COMMIT")
    };
    match run() {
        Ok(()) => Outcome::Committed,
        Err(o) => o,
    }
}
