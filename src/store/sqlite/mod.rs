//! The embedded SQLite backend of [`Store`]: one database file in WAL mode with
//! `synchronous=FULL`, message bodies as BLOBs next to their envelope and recipient state (one
//! fsync covers all three), a group-commit writer thread, and read-only connections for reads
//! (in this process, or in `mailtrail log` while the server runs).

mod files;
mod read;
mod schema;
mod write;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use crate::config::Config;
use crate::receipt::ReceiptId;
use crate::spool::AcceptedMessage;
use crate::store::{
    AttemptRecord, BounceQuery, Correlation, DsnNotice, HandledChange, LogQuery, MessageLog,
    NewBounce, QueueEntry, QueuedMessage, RecipientRef, RecordedBounce, Stage, Store, StoreError,
    StoredBounce, Suppression,
};

pub use schema::SCHEMA_VERSION;
pub use writer::WriterStats;

/// How long a connection waits for a lock held by another connection or process.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Idle read connections kept for reuse.
const READ_POOL_SIZE: usize = 8;

pub(crate) fn storage(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode::{DatabaseCorrupt, NotADatabase};
    match e.sqlite_error_code() {
        Some(DatabaseCorrupt | NotADatabase) => StoreError::Corrupt(e.to_string()),
        _ => StoreError::Storage(e.to_string()),
    }
}

/// The case-insensitive lookup form of an address.
pub(crate) fn address_key(address: &str) -> String {
    address.trim().to_lowercase()
}

/// The keys an address's suppression entry may be stored under: [`address_key`] with its
/// domain as written, and with an IDN domain in its other spelling (`xn--bcher-kva.test`
/// for `bücher.test` and back, RFC 5890: the same domain); the same key twice when there is
/// no other.
pub(crate) fn address_key_spellings(address: &str) -> [String; 2] {
    let key = address_key(address);
    let other = crate::store::other_idn_spelling(&key).unwrap_or_else(|| key.clone());
    [key, other]
}

pub(crate) fn stage_str(s: Stage) -> &'static str {
    match s {
        Stage::Dns => "dns",
        Stage::Connect => "connect",
        Stage::Mail => "mail",
        Stage::Rcpt => "rcpt",
        Stage::Data => "data",
        Stage::Local => "local",
        Stage::Bounce => "bounce",
    }
}

pub(crate) fn parse_stage(s: &str) -> Option<Stage> {
    Some(match s {
        "dns" => Stage::Dns,
        "connect" => Stage::Connect,
        "mail" => Stage::Mail,
        "rcpt" => Stage::Rcpt,
        "data" => Stage::Data,
        "local" => Stage::Local,
        "bounce" => Stage::Bounce,
        _ => return None,
    })
}

pub(crate) fn correlation_str(c: Correlation) -> &'static str {
    match c {
        Correlation::Verp => "verp",
        Correlation::ReceiptHeader => "receipt_header",
        Correlation::MessageId => "message_id",
        Correlation::Envid => "envid",
        Correlation::Unmatched => "unmatched",
    }
}

pub(crate) fn parse_correlation(s: &str) -> Option<Correlation> {
    Some(match s {
        "verp" => Correlation::Verp,
        "receipt_header" => Correlation::ReceiptHeader,
        "message_id" => Correlation::MessageId,
        "envid" => Correlation::Envid,
        "unmatched" => Correlation::Unmatched,
        _ => return None,
    })
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Opens (creating if needed) the store at `config.db_path()` and starts its writer.
pub fn open(config: &Config) -> Result<Arc<SqliteStore>, StoreError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|e| {
        StoreError::Storage(format!(
            "cannot create data_dir {}: {e}",
            config.data_dir.display()
        ))
    })?;
    SqliteStore::open_path(&config.db_path()).map(Arc::new)
}

/// Opens the store read-only for CLI commands that only look (`mailtrail log`, `queue list`),
/// safe while the server writes. Fails clearly when there is no database yet.
pub fn open_read_only(config: &Config) -> Result<SqliteReader, StoreError> {
    SqliteReader::open_path(&config.db_path())
}

/// The file SQLite keeps beside the database at `path`: its `-wal` log or `-shm` index.
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Refuses to open a database file that is missing or empty beside a write-ahead log that is
/// not: SQLite takes such a log for a stale one and deletes it, and it may be the only copy of
/// mail acknowledged with `250` (a restored or truncated database file, the file deleted
/// while mailtrail ran). A database mailtrail made is never empty once its log has frames.
fn refuse_a_log_without_its_database(path: &Path) -> Result<(), StoreError> {
    let wal_path = beside(path, "-wal");
    let log_bytes = std::fs::metadata(&wal_path).map_or(0, |m| m.len());
    if log_bytes == 0 {
        return Ok(());
    }
    let db_bytes = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => {
            return Err(StoreError::Storage(format!(
                "cannot stat {}: {e}",
                path.display()
            )));
        }
    };
    if db_bytes > 0 {
        return Ok(());
    }
    Err(StoreError::Storage(format!(
        "{} is missing or empty, but its write-ahead log {} holds {log_bytes} bytes, which may \
         be the only copy of accepted mail (SQLite would delete it): restore the database \
         file, or move the log away to start with an empty store",
        path.display(),
        wal_path.display()
    )))
}

fn open_write_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)
        .map_err(|e| StoreError::Storage(format!("cannot open {}: {e}", path.display())))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(storage)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(storage)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Storage(format!(
            "{}: cannot enable WAL (journal_mode is {mode})",
            path.display()
        )));
    }
    // NORMAL: COMMIT writes the log but does not fsync it; the writer's syncer thread does,
    // once for every batch committed meanwhile, and answers only then. So `250` still means
    // on stable storage (as with FULL), while the next batch runs during the flush. SQLite
    // itself still syncs the log header on a log restart and around checkpoints.
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(storage)?;
    conn.pragma_update(None, "foreign_keys", true)
        .map_err(storage)?;
    // Statement journals (a statement's undo pages, e.g. for a constraint check that may
    // fail half-way) and temporary b-trees stay in memory instead of temporary files: an
    // open, a truncate and a pwrite per page otherwise.
    conn.pragma_update(None, "temp_store", "MEMORY")
        .map_err(storage)?;
    Ok(conn)
}

fn open_read_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| StoreError::Storage(format!("cannot open {}: {e}", path.display())))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(storage)?;
    Ok(conn)
}

/// Idle read-only connections, reused across reads.
struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl ReadPool {
    fn get(&self) -> Result<Connection, StoreError> {
        let idle = self.idle.lock().ok().and_then(|mut v| v.pop());
        match idle {
            Some(c) => Ok(c),
            None => open_read_connection(&self.path),
        }
    }

    fn put(&self, conn: Connection) {
        if let Ok(mut v) = self.idle.lock()
            && v.len() < READ_POOL_SIZE
        {
            v.push(conn);
        }
    }
}

/// The SQLite [`Store`]: writes go through the group-commit writer thread, reads through a
/// pool of read-only connections on the blocking thread pool.
pub struct SqliteStore {
    writer: writer::Writer,
    readers: Arc<ReadPool>,
}

impl SqliteStore {
    /// Opens the database file at `path` (its directory must exist), migrating it.
    pub fn open_path(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_deferrable_wait(path, writer::DEFERRABLE_WAIT).map_err(|e| match e {
            StoreError::Corrupt(e) => StoreError::Corrupt(format!("{}: {e}", path.display())),
            other => other,
        })
    }

    /// [`SqliteStore::open_path`] with another bound on how long a delivery record waits to
    /// share a commit (tests make it long, to see the wait, or short).
    fn open_with_deferrable_wait(
        path: &Path,
        wait: std::time::Duration,
    ) -> Result<Self, StoreError> {
        refuse_a_log_without_its_database(path)?;
        let mut conn = open_write_connection(path)?;
        schema::migrate(&mut conn)?;
        // The log exists from the moment the connection is in WAL mode and stays while it is
        // open (SQLite removes it when the last connection closes).
        let wal_path = beside(path, "-wal");
        let wal = std::fs::OpenOptions::new()
            .write(true)
            .open(&wal_path)
            .map_err(|e| {
                StoreError::Storage(format!(
                    "cannot open the write-ahead log {}: {e}",
                    wal_path.display()
                ))
            })?;
        let files = files::StoreFiles::new(path, &wal_path, &wal, &beside(path, "-shm"))?;
        Ok(Self {
            writer: writer::Writer::start(conn, wal, files, wait)?,
            readers: Arc::new(ReadPool {
                path: path.to_path_buf(),
                idle: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Group-commit counters (commits < commands shows batching at work).
    pub fn writer_stats(&self) -> &WriterStats {
        &self.writer.stats
    }

    /// `op` may run more than once (see the writer): it must only depend on what it captured.
    async fn write<R, F>(&self, op: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: Fn(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let result = self.writer.write(op).await;
        self.noticing_damage(result)
    }

    /// A read or write that found the database damaged makes the store refuse every write
    /// from then on, as a deleted database does: before, a corrupt file kept answering `250`
    /// for mail the scheduler could never read back, with `/healthz` saying ok.
    fn noticing_damage<R>(&self, result: Result<R, StoreError>) -> Result<R, StoreError> {
        match result {
            Err(StoreError::Corrupt(e)) => Err(StoreError::Storage(self.writer.refuse(format!(
                "{} is damaged (SQLite: {e}): the store accepts no more writes and delivery \
                 stops; stop mailtrail, restore the file from a backup (or recover it with \
                 sqlite3's .recover) and start again",
                self.readers.path.display()
            )))),
            other => other,
        }
    }

    /// Runs a purge `(conn, before_ms, limit)` in small transactions, one after the other
    /// until one deletes fewer than a batch (accepts queued meanwhile share their commits, and
    /// no purge holds the writer long). Returns how many rows it deleted in all.
    async fn purge_in_batches(
        &self,
        before_ms: i64,
        purge: fn(&Connection, i64, usize) -> Result<usize, StoreError>,
    ) -> Result<usize, StoreError> {
        const BATCH: usize = 1000;
        let mut total = 0;
        loop {
            let n = self.write(move |c| purge(c, before_ms, BATCH)).await?;
            total += n;
            if n < BATCH {
                return Ok(total);
            }
        }
    }

    async fn read<R, F>(&self, op: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let pool = self.readers.clone();
        let result = tokio::task::spawn_blocking(move || {
            let conn = pool.get()?;
            let result = op(&conn);
            pool.put(conn);
            result
        })
        .await
        .map_err(|e| StoreError::Storage(format!("read task failed: {e}")))?;
        self.noticing_damage(result)
    }
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn accept(&self, msg: AcceptedMessage) -> Result<(), StoreError> {
        self.write(move |c| write::accept(c, &msg)).await
    }

    async fn accept_with_notices(
        &self,
        msg: AcceptedMessage,
        notices: Vec<DsnNotice>,
    ) -> Result<(), StoreError> {
        self.write(move |c| write::accept_with_notices(c, &msg, &notices))
            .await
    }

    fn commit_counters(&self) -> Option<WriterStats> {
        Some(self.writer.stats.as_ref().clone())
    }

    fn write_refusal(&self) -> Option<String> {
        self.writer.refusal()
    }

    fn checkpoint(&self) -> Result<(), StoreError> {
        // A refusing store's files may be gone: opening the path would make a new database.
        if let Some(reason) = self.writer.refusal() {
            return Err(StoreError::Storage(reason));
        }
        let path = &self.readers.path;
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| StoreError::Storage(format!("cannot open {}: {e}", path.display())))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(storage)?;
        // TRUNCATE waits (the busy timeout) for readers, such as a `mailtrail log` running
        // now, copies every frame into the database, syncs it and empties the log.
        let busy: i64 = conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
            .map_err(storage)?;
        if busy != 0 {
            return Err(StoreError::Storage(format!(
                "{}: another process kept reading the log, so it was not folded into the \
                 database file (nothing is lost: the next start reads it)",
                path.display()
            )));
        }
        Ok(())
    }

    async fn due(
        &self,
        now_ms: i64,
        limit: usize,
        after: Option<ReceiptId>,
    ) -> Result<Vec<QueuedMessage>, StoreError> {
        self.read(move |c| read::due(c, now_ms, limit, after)).await
    }

    async fn next_due_at(&self) -> Result<Option<i64>, StoreError> {
        self.read(read::next_due_at).await
    }

    async fn body(&self, receipt: ReceiptId) -> Result<Vec<u8>, StoreError> {
        self.read(move |c| read::body(c, receipt)).await
    }

    async fn record_attempts(
        &self,
        attempts: Vec<AttemptRecord>,
        dsns: Vec<DsnNotice>,
    ) -> Result<(), StoreError> {
        // The delivery is over and its connection back in the pool: nothing waits for this
        // commit but the task's bookkeeping, so it may ride along with the next accept.
        let result = self
            .writer
            .write_deferrable(move |c| write::record_attempts(c, &attempts, &dsns))
            .await;
        self.noticing_damage(result)
    }

    async fn purge_bodies(&self, before_ms: i64) -> Result<usize, StoreError> {
        self.purge_in_batches(before_ms, write::purge_bodies).await
    }

    async fn purge_log(&self, before_ms: i64) -> Result<(usize, usize), StoreError> {
        let messages = self
            .purge_in_batches(before_ms, write::purge_messages)
            .await?;
        let bounces = self
            .purge_in_batches(before_ms, write::purge_bounces)
            .await?;
        Ok((messages, bounces))
    }

    async fn queue_list(&self) -> Result<Vec<QueueEntry>, StoreError> {
        self.read(read::queue_list).await
    }

    async fn queue_retry(&self, receipt: Option<ReceiptId>) -> Result<usize, StoreError> {
        let now = now_ms();
        self.write(move |c| write::queue_retry(c, receipt, now))
            .await
    }

    async fn queue_delete(&self, receipt: ReceiptId) -> Result<usize, StoreError> {
        let now = now_ms();
        self.write(move |c| write::queue_delete(c, receipt, now))
            .await
    }

    async fn queue_stats(&self) -> Result<(u64, Option<i64>), StoreError> {
        self.read(read::queue_stats).await
    }

    async fn pending_inbound_bounces(&self) -> Result<Vec<ReceiptId>, StoreError> {
        self.read(read::pending_inbound_bounces).await
    }

    async fn mark_inbound_processed(&self, receipt: ReceiptId) -> Result<(), StoreError> {
        let now = now_ms();
        self.write(move |c| write::mark_inbound_processed(c, receipt, now))
            .await
    }

    async fn log(&self, query: &LogQuery) -> Result<Vec<MessageLog>, StoreError> {
        let query = query.clone();
        self.read(move |c| read::log(c, &query)).await
    }

    async fn find_recipient(
        &self,
        receipt: ReceiptId,
        address: &str,
    ) -> Result<Option<RecipientRef>, StoreError> {
        let address = address.to_string();
        self.read(move |c| read::find_recipient(c, receipt, &address))
            .await
    }

    async fn recipient(
        &self,
        receipt: ReceiptId,
        idx: u32,
    ) -> Result<Option<RecipientRef>, StoreError> {
        self.read(move |c| read::recipient(c, receipt, idx)).await
    }

    async fn find_by_message_id(
        &self,
        message_id: &str,
        address: &str,
        before_ms: i64,
    ) -> Result<Option<ReceiptId>, StoreError> {
        let (message_id, address) = (message_id.to_string(), address.to_string());
        self.read(move |c| read::find_by_message_id(c, &message_id, &address, before_ms))
            .await
    }

    async fn find_by_envid(
        &self,
        envid: &str,
        address: &str,
        before_ms: i64,
    ) -> Result<Option<ReceiptId>, StoreError> {
        let (envid, address) = (envid.to_string(), address.to_string());
        self.read(move |c| read::find_by_envid(c, &envid, &address, before_ms))
            .await
    }

    async fn record_bounces(
        &self,
        bounces: Vec<NewBounce>,
        processed: Option<ReceiptId>,
    ) -> Result<Vec<RecordedBounce>, StoreError> {
        let now = now_ms();
        self.write(move |c| write::record_bounces(c, &bounces, processed, now))
            .await
    }

    async fn bounces(&self, query: &BounceQuery) -> Result<Vec<StoredBounce>, StoreError> {
        let query = query.clone();
        self.read(move |c| read::bounces(c, &query)).await
    }

    async fn set_handled(
        &self,
        id: i64,
        by: Option<&str>,
        at_ms: i64,
    ) -> Result<HandledChange, StoreError> {
        let by = by.map(str::to_string);
        self.write(move |c| write::set_handled(c, id, by.as_deref(), at_ms))
            .await
    }

    async fn recent_bounce_types(
        &self,
        address: &str,
        since_ms: i64,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let address = address.to_string();
        self.read(move |c| read::recent_bounce_types(c, &address, since_ms))
            .await
    }

    async fn suppress(&self, entry: Suppression) -> Result<(), StoreError> {
        self.write(move |c| write::suppress(c, &entry)).await
    }

    async fn unsuppress(&self, address: &str) -> Result<bool, StoreError> {
        let address = address.to_string();
        self.write(move |c| write::unsuppress(c, &address)).await
    }

    async fn suppressed(
        &self,
        address: &str,
        now_ms: i64,
    ) -> Result<Option<Suppression>, StoreError> {
        let address = address.to_string();
        self.read(move |c| read::suppressed(c, &address, now_ms))
            .await
    }

    async fn suppression_list(&self, now_ms: i64) -> Result<Vec<Suppression>, StoreError> {
        self.read(move |c| read::suppression_list(c, now_ms)).await
    }

    async fn suppression_version(&self) -> Result<i64, StoreError> {
        self.read(|c| {
            c.query_row(
                "SELECT value FROM meta WHERE key = 'suppression_version'",
                [],
                |r| r.get(0),
            )
            .map_err(storage)
        })
        .await
    }
}

/// A read-only view for CLI commands running beside the server: synchronous, one
/// connection, never writes (so it cannot disturb the server's WAL).
pub struct SqliteReader {
    conn: Connection,
}

impl SqliteReader {
    pub fn open_path(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            // A relative data_dir is found from the working directory, as `serve` found it:
            // from another directory the same --config names another place.
            let relative = match std::env::current_dir() {
                Ok(cwd) if path.is_relative() => format!(
                    "; data_dir is relative, so it is looked for from the current directory \
                     {}: run this where `serve` runs, or give data_dir as an absolute path",
                    cwd.display()
                ),
                _ => String::new(),
            };
            return Err(StoreError::NotFound(format!(
                "no database at {} (has `mailtrail serve` run with this data_dir?{relative})",
                path.display()
            )));
        }
        // A read-only connection too deletes such a log (a review lost acknowledged mail to
        // `mailtrail log` after `serve` had refused it).
        refuse_a_log_without_its_database(path)?;
        let conn = open_read_connection(path)?;
        let version = schema::user_version(&conn)?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Storage(format!(
                "{} has schema version {version}, made by a newer mailtrail; this one reads \
                 {SCHEMA_VERSION}: use the mailtrail that serves it",
                path.display()
            )));
        }
        if version != SCHEMA_VERSION {
            return Err(StoreError::Storage(format!(
                "{} has schema version {version}, this mailtrail reads {SCHEMA_VERSION} \
                 (start `mailtrail serve` of this version once to migrate)",
                path.display()
            )));
        }
        Ok(Self { conn })
    }

    pub fn log(&self, query: &LogQuery) -> Result<Vec<MessageLog>, StoreError> {
        read::log(&self.conn, query)
    }

    pub fn queue_list(&self) -> Result<Vec<QueueEntry>, StoreError> {
        read::queue_list(&self.conn)
    }

    pub fn queue_stats(&self) -> Result<(u64, Option<i64>), StoreError> {
        read::queue_stats(&self.conn)
    }

    pub fn bounces(&self, query: &BounceQuery) -> Result<Vec<StoredBounce>, StoreError> {
        read::bounces(&self.conn, query)
    }

    pub fn suppression_list(&self, now_ms: i64) -> Result<Vec<Suppression>, StoreError> {
        read::suppression_list(&self.conn, now_ms)
    }
}

#[cfg(test)]
mod tests;
