//! Group commit: one thread owns the write connection, drains every queued write command,
//! runs them in one transaction and commits once; a second thread makes
//! committed batches durable with one fsync of the WAL for all of them, then answers their
//! callers. While the disk flushes one batch, the writer already runs the next, and keeps
//! its transaction open for whatever else arrives until the flush ends: each fsync then
//! covers one commit, and pages that several commits would each have written to the log
//! (index leaves, the table's last page) are written once.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::files::StoreFiles;
use crate::store::StoreError;

/// At most this many commands share one transaction, so a flood of writers cannot grow one
/// transaction (and its WAL frames) without bound.
const MAX_BATCH: usize = 1024;

/// Queued commands beyond this make writers wait (back-pressure instead of memory growth).
const QUEUE_DEPTH: usize = 8192;

/// The longest the writer holds a transaction open while the syncer flushes an earlier
/// commit: a guard against a sync thread that never answers, far above a disk's fsync.
const FLUSH_WAIT_LIMIT: Duration = Duration::from_secs(1);

/// How long a batch of only deferrable commands ([`Writer::write_deferrable`]) waits for a
/// command someone is waiting on, so that both share one commit (one fsync).
pub const DEFERRABLE_WAIT: Duration = Duration::from_millis(5);

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
    /// Runs the command; false when it failed (the batch is then rolled back and run again
    /// without it). May therefore run more than once, each time in a fresh transaction.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Answers the caller: its own result if the batch committed, else the batch error.
    fn finish(self: Box<Self>, batch: Result<(), &str>);
    /// Nobody is held up until it commits (see [`Writer::write_deferrable`]).
    fn deferrable(&self) -> bool;
}

struct TypedJob<R, F> {
    op: F,
    outcome: Option<Result<R, StoreError>>,
    reply: oneshot::Sender<Result<R, StoreError>>,
    deferrable: bool,
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

    fn deferrable(&self) -> bool {
        self.deferrable
    }
}

/// Handle to the writer thread. Dropping it closes the queue; the thread finishes what was
/// queued, and the drop waits for it so a reopen sees every acknowledged write.
pub struct Writer {
    tx: Option<mpsc::Sender<Box<dyn Job>>>,
    thread: Option<JoinHandle<()>>,
    syncer: Option<JoinHandle<()>>,
    pub stats: Arc<WriterStats>,
    refusal: Arc<Refusal>,
    files: FileCheck,
}

/// `Err(reason)` when the files written are no longer the ones a restart opens
/// ([`StoreFiles::check`]; tests pass their own).
pub(crate) type FileCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Why the store refuses every write until a restart: a failed fsync, or its files deleted
/// or replaced. Set once; the first reason stays, and only the call that set it logs it.
#[derive(Default)]
struct Refusal(OnceLock<String>);

impl Refusal {
    fn get(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }

    /// Refuses from now on for `reason` (logged once) unless already refusing; returns the
    /// reason in force, which callers answer with.
    fn refuse(&self, reason: String) -> String {
        let mut first = false;
        let kept = self.0.get_or_init(|| {
            first = true;
            reason
        });
        if first {
            tracing::error!(reason = %kept, "store refusing further writes");
        }
        kept.clone()
    }
}

/// Committed batches on their way to the disk, oldest first.
type Committed = std::sync::mpsc::Sender<Vec<Box<dyn Job>>>;

/// Whether the syncer has committed batches it has not made durable yet. The writer sets it
/// before it hands a batch over; the syncer clears it (and wakes the writer) once the fsync
/// of the batches it took has returned, so it is never left set with nothing to flush.
#[derive(Default)]
struct Flushing {
    busy: AtomicBool,
    idle: tokio::sync::Notify,
}

impl Writer {
    /// Starts the writer thread; a batch of only deferrable commands waits at most
    /// `deferrable_wait` (normally [`DEFERRABLE_WAIT`]) for company.
    ///
    /// `conn` runs with `synchronous = NORMAL` (its commits do not fsync); `wal` is its
    /// write-ahead log, which the syncer thread fsyncs after each commit and before answering:
    /// a caller hears `Ok` only once its commit is on stable storage, as with `FULL`.
    ///
    /// After each fsync the syncer also checks that `files` are still the database and log a
    /// restart would open, before it answers.
    pub fn start(
        conn: Connection,
        wal: File,
        files: StoreFiles,
        deferrable_wait: Duration,
    ) -> Result<Self, StoreError> {
        let files: FileCheck = Arc::new(move || files.check());
        Self::start_with_sync(conn, move || wal.sync_data(), files, deferrable_wait)
    }

    /// [`Writer::start`] with the syncer's flush given as `sync` (tests hold it to see what
    /// the writer does meanwhile) and the file check as `files`.
    pub(crate) fn start_with_sync(
        conn: Connection,
        sync_log: impl FnMut() -> std::io::Result<()> + Send + 'static,
        files: FileCheck,
        deferrable_wait: Duration,
    ) -> Result<Self, StoreError> {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let (committed, to_sync) = std::sync::mpsc::channel();
        let stats = Arc::new(WriterStats::default());
        let thread_stats = stats.clone();
        let refusal = Arc::new(Refusal::default());
        let flushing = Arc::new(Flushing::default());
        let syncer_flushing = flushing.clone();
        let spawn_error = |e| StoreError::Storage(format!("cannot start writer thread: {e}"));
        let syncer = {
            let (refusal, files) = (refusal.clone(), files.clone());
            std::thread::Builder::new()
                .name("store-sync".into())
                .spawn(move || sync(sync_log, &*files, &to_sync, &refusal, &syncer_flushing))
                .map_err(spawn_error)?
        };
        let writer_refusal = refusal.clone();
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                run(
                    conn,
                    rx,
                    &committed,
                    &flushing,
                    &writer_refusal,
                    &thread_stats,
                    deferrable_wait,
                )
            })
            .map_err(spawn_error)?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            syncer: Some(syncer),
            stats,
            refusal,
            files,
        })
    }

    /// Why every write fails until a restart, if it does. Looks at the files now rather than
    /// waiting for the next commit, so a health probe sees a deleted database while no mail
    /// comes (and the first message after it is refused, not lost).
    pub fn refusal(&self) -> Option<String> {
        if let Some(reason) = self.refusal.get() {
            return Some(reason.to_string());
        }
        (self.files)().err().map(|moved| self.refusal.refuse(moved))
    }

    /// Refuses every write from now on for `reason`, unless already refusing; the reason in
    /// force.
    pub fn refuse(&self, reason: String) -> String {
        self.refusal.refuse(reason)
    }

    /// Queues `op` and resolves once the transaction it ran in has committed.
    pub async fn write<R, F>(&self, op: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: Fn(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        self.queue(op, false).await
    }

    /// Like [`Writer::write`], for a command no client is waiting on (a delivery attempt's
    /// record): when nothing else is queued it waits up to [`DEFERRABLE_WAIT`] for a command
    /// that is (an accept, whose `250` waits for the commit) and commits with it, instead of
    /// paying an fsync of its own.
    pub async fn write_deferrable<R, F>(&self, op: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: Fn(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        self.queue(op, true).await
    }

    async fn queue<R, F>(&self, op: F, deferrable: bool) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: Fn(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let job = Box::new(TypedJob {
            op,
            outcome: None,
            reply,
            deferrable,
        });
        let tx = self.tx.as_ref().ok_or(StoreError::Closed)?;
        tx.send(job).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.tx.take();
        // The writer finishes the queue, then the syncer what the writer committed.
        for thread in [self.thread.take(), self.syncer.take()]
            .into_iter()
            .flatten()
        {
            let _ = thread.join();
        }
    }
}

/// Takes whatever is queued when the previous commit ends: callers that arrive during a commit
/// share the next one. Waiting for more (PostgreSQL's `commit_delay`) was tried: a 1 ms wait
/// whenever a batch was smaller than the one before cost 5-35% of throughput at 20 sessions
/// (the commit itself is the natural wait; see docs/benchmarks.md).
///
/// The exception is a batch of only deferrable commands: it waits (at most
/// [`DEFERRABLE_WAIT`]) for a command somebody waits on, and commits as soon as one comes.
///
/// A batch does not commit while the syncer is still flushing an earlier one: commands that
/// arrive meanwhile run in the same transaction (see [`try_batch`]). That costs them no
/// time, since no commit made during the flush could be made durable before it ends.
#[allow(clippy::too_many_arguments)]
fn run(
    conn: Connection,
    mut rx: mpsc::Receiver<Box<dyn Job>>,
    committed: &Committed,
    flushing: &Flushing,
    refusal: &Refusal,
    stats: &WriterStats,
    deferrable_wait: Duration,
) {
    // Only for the bounded wait on the queue; the writer's own work is synchronous.
    let clock = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            tracing::warn!(error = %e, "store writer: no timer; deferrable writes commit at once");
            None
        }
    };
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        drain(&mut rx, &mut batch);
        if let Some(clock) = &clock
            && batch.iter().all(|j| j.deferrable())
        {
            let deadline = tokio::time::Instant::now() + deferrable_wait;
            while batch.len() < MAX_BATCH {
                // The timer must be made inside the runtime it sleeps on.
                let next =
                    clock.block_on(async { tokio::time::timeout_at(deadline, rx.recv()).await });
                match next {
                    Ok(Some(job)) => {
                        let urgent = !job.deferrable();
                        batch.push(job);
                        drain(&mut rx, &mut batch);
                        if urgent {
                            break;
                        }
                    }
                    // Closed (shutdown: commit what is here) or waited long enough.
                    Ok(None) | Err(_) => break,
                }
            }
        }
        if let Some(reason) = refusal.get() {
            for job in batch {
                job.finish(Err(reason));
            }
            continue;
        }
        let mut more = More {
            rx: &mut rx,
            clock: clock.as_ref(),
            flushing,
        };
        run_batch(&conn, batch, &mut more, committed, stats);
    }
}

/// Where a batch whose commit waits for the syncer finds more commands.
struct More<'a> {
    rx: &'a mut mpsc::Receiver<Box<dyn Job>>,
    /// None: no timer, so no waiting (each batch commits at once).
    clock: Option<&'a tokio::runtime::Runtime>,
    flushing: &'a Flushing,
}

impl More<'_> {
    /// The next command to run before committing: one that is queued, or one that arrives
    /// while the syncer is still flushing. None once the syncer is idle, the queue closed
    /// (shutdown: commit now) or [`FLUSH_WAIT_LIMIT`] passed.
    fn next(&mut self) -> Option<Box<dyn Job>> {
        if !self.flushing.busy.load(Ordering::Acquire) {
            return None;
        }
        if let Ok(job) = self.rx.try_recv() {
            return Some(job);
        }
        let clock = self.clock?;
        let deadline = tokio::time::Instant::now() + FLUSH_WAIT_LIMIT;
        let (rx, flushing) = (&mut *self.rx, self.flushing);
        // The timer must be made inside the runtime it sleeps on.
        clock.block_on(async {
            loop {
                // Registered before the check, so a wake-up between the two is not lost; a
                // stale one only makes the loop look again.
                let idle = flushing.idle.notified();
                if !flushing.busy.load(Ordering::Acquire) {
                    return None;
                }
                tokio::select! {
                    job = rx.recv() => return job,
                    () = idle => {}
                    () = tokio::time::sleep_until(deadline) => return None,
                }
            }
        })
    }
}

/// What every write answers once an fsync of the WAL failed: after a failed fsync the kernel
/// may have dropped the dirty pages, so no later commit can be promised durable (PostgreSQL
/// stops for the same reason).
const NOT_DURABLE: &str = "an fsync of the database log failed: the store accepts no more \
                           writes until mailtrail is restarted";

/// The syncer thread: waits for committed batches, takes all that are there, makes them
/// durable with one fsync of the WAL (fsync covers every write to the file before it, by any
/// descriptor), checks that the files it made durable are still the ones a restart opens,
/// then answers their callers.
fn sync(
    mut sync_log: impl FnMut() -> std::io::Result<()>,
    files: &(dyn Fn() -> Result<(), String> + Send + Sync),
    committed: &std::sync::mpsc::Receiver<Vec<Box<dyn Job>>>,
    refusal: &Refusal,
    flushing: &Flushing,
) {
    while let Ok(first) = committed.recv() {
        let mut batches = vec![first];
        batches.extend(committed.try_iter());
        let synced = match refusal.get() {
            Some(reason) => Err(reason.to_string()),
            None => sync_log()
                .map_err(|e| format!("{NOT_DURABLE} ({e})"))
                .and_then(|()| files())
                .map_err(|reason| refusal.refuse(reason)),
        };
        // Cleared before the answers go out: a caller that hears back and writes again finds
        // the writer free to commit at once.
        flushing.busy.store(false, Ordering::Release);
        flushing.idle.notify_one();
        for job in batches.into_iter().flatten() {
            job.finish(synced.as_ref().map(|_| ()).map_err(String::as_str));
        }
    }
}

/// Moves whatever is queued right now into `batch`, up to [`MAX_BATCH`].
fn drain(rx: &mut mpsc::Receiver<Box<dyn Job>>, batch: &mut Vec<Box<dyn Job>>) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
}

/// How one try at committing a batch ended.
enum Outcome {
    Committed,
    /// Job `n` failed: the transaction is rolled back, and the others, which did nothing
    /// wrong, run again without it.
    Aborted(usize),
    /// BEGIN or COMMIT failed: the batch as a whole is lost.
    Failed(String),
}

/// Runs one batch and answers every job in it. A failing job fails alone: the transaction is
/// rolled back and the rest run again without it (failures are rare, so this is cheaper than
/// a savepoint per job, whose journal copied every page a job touched: ~3% of the relay's CPU).
/// If COMMIT fails, every job gets the storage error and nothing of the batch is visible.
fn run_batch(
    conn: &Connection,
    mut batch: Vec<Box<dyn Job>>,
    more: &mut More<'_>,
    committed: &Committed,
    stats: &WriterStats,
) {
    loop {
        let outcome = try_batch(conn, &mut batch, more);
        if !matches!(outcome, Outcome::Committed) && !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        match outcome {
            Outcome::Committed => {
                stats.commits.inc();
                stats.commands.inc_by(batch.len() as u64);
                // Visible now, durable once the syncer's fsync returns: it answers then.
                more.flushing.busy.store(true, Ordering::Release);
                if let Err(std::sync::mpsc::SendError(batch)) = committed.send(batch) {
                    more.flushing.busy.store(false, Ordering::Release);
                    for job in batch {
                        job.finish(Err("the store's sync thread is gone"));
                    }
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

/// Runs `batch` in one transaction, then, while the syncer is flushing and the batch has
/// room, the commands that arrive meanwhile (added to `batch`), and commits.
fn try_batch(conn: &Connection, batch: &mut Vec<Box<dyn Job>>, more: &mut More<'_>) -> Outcome {
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
            if !job.run(conn) {
                return Err(Outcome::Aborted(n));
            }
        }
        while batch.len() < MAX_BATCH {
            let Some(mut job) = more.next() else { break };
            let ok = job.run(conn);
            batch.push(job);
            if !ok {
                return Err(Outcome::Aborted(batch.len() - 1));
            }
        }
        sql("COMMIT")
    };
    match run() {
        Ok(()) => Outcome::Committed,
        Err(o) => o,
    }
}
