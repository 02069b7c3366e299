//! The SQLite schema as an ordered list of migrations; `PRAGMA user_version` records how many
//! have been applied, so a database only ever moves forward one whole migration at a time.

use rusqlite::Connection;

use crate::store::StoreError;

use super::storage;

/// Migration `n` (1-based) is `MIGRATIONS[n - 1]`. Never edit a released entry: append.
const MIGRATIONS: &[&str] = &[
    // 1: messages, bodies, recipients, events, bounces, suppressions.
    r#"
CREATE TABLE messages (
    receipt              TEXT PRIMARY KEY,   -- ReceiptId text: sorts by time
    received_at          INTEGER NOT NULL,   -- ms since the Unix epoch
    client_ip            TEXT NOT NULL,
    helo                 TEXT NOT NULL,
    tls_version          TEXT,
    auth_user            TEXT,
    envelope_sender      TEXT NOT NULL,
    envelope_sender_lc   TEXT NOT NULL,
    size                 INTEGER NOT NULL,
    message_id           TEXT,
    message_id_key       TEXT,               -- message_id without angle brackets
    subject              TEXT,
    context              TEXT,
    envid                TEXT,
    ret                  TEXT,
    eight_bit            INTEGER NOT NULL,
    smtputf8             INTEGER NOT NULL,
    inbound_bounce       INTEGER NOT NULL,
    inbound_processed_at INTEGER             -- set once the bounce stage parsed it
);
CREATE INDEX messages_received_at ON messages(received_at);
CREATE INDEX messages_message_id ON messages(message_id_key);
CREATE INDEX messages_envid ON messages(envid);
CREATE INDEX messages_sender ON messages(envelope_sender_lc);
CREATE INDEX messages_inbound_pending ON messages(receipt)
    WHERE inbound_bounce = 1 AND inbound_processed_at IS NULL;

CREATE TABLE bodies (
    receipt TEXT PRIMARY KEY REFERENCES messages(receipt) ON DELETE CASCADE,
    body    BLOB NOT NULL
);

CREATE TABLE recipients (
    receipt           TEXT NOT NULL REFERENCES messages(receipt) ON DELETE CASCADE,
    idx               INTEGER NOT NULL,
    address           TEXT NOT NULL,
    address_lc        TEXT NOT NULL,
    orcpt             TEXT,
    notify            TEXT,
    status            TEXT NOT NULL,
    reason            TEXT,
    bounce_type       TEXT,
    last_reply_code   INTEGER,
    last_enhanced     TEXT,
    last_reply_text   TEXT,
    attempts          INTEGER NOT NULL DEFAULT 0,
    next_attempt_at   INTEGER,               -- NULL once final
    first_deferred_at INTEGER,
    delay_dsn_sent    INTEGER NOT NULL DEFAULT 0,
    updated_at        INTEGER NOT NULL,
    PRIMARY KEY (receipt, idx)
);
CREATE INDEX recipients_address ON recipients(address_lc);
CREATE INDEX recipients_due ON recipients(next_attempt_at)
    WHERE status IN ('queued', 'deferred');

CREATE TABLE events (
    id              INTEGER PRIMARY KEY,
    receipt         TEXT NOT NULL REFERENCES messages(receipt) ON DELETE CASCADE,
    idx             INTEGER NOT NULL,
    at              INTEGER NOT NULL,
    kind            TEXT NOT NULL,
    status          TEXT NOT NULL,
    stage           TEXT,
    remote_host     TEXT,
    remote_ip       TEXT,
    tls_version     TEXT,
    tls_cipher      TEXT,
    reply_code      INTEGER,
    enhanced_status TEXT,
    reply_text      TEXT,
    duration_ms     INTEGER,
    reason          TEXT
);
CREATE INDEX events_recipient ON events(receipt, idx, id);

-- No foreign key to messages: a bounce may be unmatched, or outlive a purged message.
CREATE TABLE bounces (
    id             INTEGER PRIMARY KEY,
    at             INTEGER NOT NULL,
    receipt        TEXT,
    idx            INTEGER,
    correlation    TEXT NOT NULL,
    recipient      TEXT NOT NULL,
    recipient_lc   TEXT NOT NULL,
    kind           TEXT NOT NULL,
    action         TEXT,
    status         TEXT,
    reply_code     INTEGER,
    diagnostic     TEXT,
    remote_mta     TEXT,
    reporting_mta  TEXT,
    reason         TEXT NOT NULL,
    bounce_type    TEXT NOT NULL,
    source_receipt TEXT,
    handled_by     TEXT,
    handled_at     INTEGER
);
CREATE INDEX bounces_recipient ON bounces(recipient_lc, at);
CREATE INDEX bounces_at ON bounces(at);
CREATE INDEX bounces_receipt ON bounces(receipt);

CREATE TABLE suppressions (
    address_lc TEXT PRIMARY KEY,
    address    TEXT NOT NULL,
    reason     TEXT NOT NULL,
    source     TEXT NOT NULL,
    first_at   INTEGER NOT NULL,
    last_at    INTEGER NOT NULL,
    count      INTEGER NOT NULL,
    expires_at INTEGER                       -- NULL = never
);
"#,
    // 2: a counter that moves on every change to the suppression list, so the SMTP stage can
    // answer RCPT from memory and reload only when the list changed (also by another process).
    r#"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO meta (key, value) VALUES ('suppression_version', 0);
CREATE TRIGGER suppressions_insert AFTER INSERT ON suppressions BEGIN
    UPDATE meta SET value = value + 1 WHERE key = 'suppression_version';
END;
CREATE TRIGGER suppressions_update AFTER UPDATE ON suppressions BEGIN
    UPDATE meta SET value = value + 1 WHERE key = 'suppression_version';
END;
CREATE TRIGGER suppressions_delete AFTER DELETE ON suppressions BEGIN
    UPDATE meta SET value = value + 1 WHERE key = 'suppression_version';
END;
"#,
    // 3: the RCPT reply of recipients whose attempt the DATA reply decided.
    r#"
ALTER TABLE events ADD COLUMN rcpt_reply_code INTEGER;
ALTER TABLE events ADD COLUMN rcpt_enhanced_status TEXT;
ALTER TABLE events ADD COLUMN rcpt_reply_text TEXT;
"#,
    // 4: most mail has no ENVID, and some no Message-ID: index only the rows that have one,
    // so an accept does not touch those b-trees for nothing (lookups by `= ?` still use them).
    r#"
DROP INDEX messages_message_id;
DROP INDEX messages_envid;
CREATE INDEX messages_message_id ON messages(message_id_key) WHERE message_id_key IS NOT NULL;
CREATE INDEX messages_envid ON messages(envid) WHERE envid IS NOT NULL;
"#,
    // 5: bounce ids are never given out twice. Without AUTOINCREMENT a new row takes the
    // largest id + 1, so once the log purge deleted the newest bounces (all of them, after a
    // quiet spell), `bounces handle 7` could mark a different bounce than the 7 an admin
    // noted. The table is rebuilt with the same columns plus `acted` (the bounce changed
    // its matched recipient's status: only those count toward a soft-bounce run, until the
    // address is taken off the suppression list by hand; older rows: matched failures);
    // sqlite_sequence starts at its largest id.
    r#"
CREATE TABLE bounces_new (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    at             INTEGER NOT NULL,
    receipt        TEXT,
    idx            INTEGER,
    correlation    TEXT NOT NULL,
    recipient      TEXT NOT NULL,
    recipient_lc   TEXT NOT NULL,
    kind           TEXT NOT NULL,
    action         TEXT,
    status         TEXT,
    reply_code     INTEGER,
    diagnostic     TEXT,
    remote_mta     TEXT,
    reporting_mta  TEXT,
    reason         TEXT NOT NULL,
    bounce_type    TEXT NOT NULL,
    source_receipt TEXT,
    handled_by     TEXT,
    handled_at     INTEGER,
    acted          INTEGER NOT NULL DEFAULT 0
);
INSERT INTO bounces_new SELECT id, at, receipt, idx, correlation, recipient, recipient_lc, kind,
    action, status, reply_code, diagnostic, remote_mta, reporting_mta, reason, bounce_type,
    source_receipt, handled_by, handled_at,
    receipt IS NOT NULL AND kind <> 'autoreply'
        AND (action IS NULL OR lower(action) NOT IN ('delayed', 'delivered', 'relayed', 'expanded'))
    FROM bounces;
DROP TABLE bounces;
ALTER TABLE bounces_new RENAME TO bounces;
CREATE INDEX bounces_recipient ON bounces(recipient_lc, at);
CREATE INDEX bounces_at ON bounces(at);
CREATE INDEX bounces_receipt ON bounces(receipt);
"#,
    // 6: a bounce stored once. `dedup_key` names a record by the returned mail's own
    // Message-ID and its place in it, so the same DSN delivered twice (a reporting MTA that
    // retried after a lost 250) or a mailbox fed to `bounce ingest` again adds nothing.
    r#"
ALTER TABLE bounces ADD COLUMN dedup_key TEXT;
CREATE UNIQUE INDEX bounces_dedup ON bounces(dedup_key) WHERE dedup_key IS NOT NULL;
"#,
    // 7: a matched bounce is filed under the recipient it was matched to (the address we
    // sent to, which it acts on and counts toward); the address the bounce itself named,
    // when another (a forward, or a forgery by a co-recipient), is kept beside it.
    r#"
ALTER TABLE bounces ADD COLUMN reported_recipient TEXT;
"#,
    // 8: whether correlation proved the bounce is about the copy it names (a VERP MAC, in
    // the envelope or in the returned message). Over SMTP only verified bounces act
    // (`acted`); the others are kept, linked to the message they name. Older rows: those
    // matched by VERP.
    r#"
ALTER TABLE bounces ADD COLUMN verified INTEGER NOT NULL DEFAULT 0;
UPDATE bounces SET verified = 1 WHERE correlation = 'verp';
"#,
    // 9: the next hop's port beside its host and IP, so attempts to several ports of one
    // address (routes to local services) can be told apart.
    r#"
ALTER TABLE events ADD COLUMN remote_port INTEGER;
"#,
    // 10: a DSN is recorded on each recipient it reports (`dsn_sent`, `delay_dsn_sent`):
    // its action and its own receipt, so the log says whether the sender was told and by
    // which message. Older `delay_dsn_sent` rows keep neither.
    r#"
ALTER TABLE events ADD COLUMN dsn_action TEXT;
ALTER TABLE events ADD COLUMN dsn_receipt TEXT;
"#,
    // 11: an attempt's next hops tried before the one whose result it records (a refused
    // connection, a 421 greeting, ...), as a JSON array of `HopFailure`; NULL when none.
    r#"
ALTER TABLE events ADD COLUMN tried_first TEXT;
"#,
];

/// The schema version this build reads and writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

pub fn user_version(conn: &Connection) -> Result<i64, StoreError> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(storage)
}

/// Applies every migration the database has not seen yet, each in its own transaction
/// together with its `user_version` bump.
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    migrate_to(conn, SCHEMA_VERSION)
}

/// [`migrate`] up to `version` only (tests build older databases with it).
pub(super) fn migrate_to(conn: &mut Connection, version: i64) -> Result<(), StoreError> {
    let current = user_version(conn)?;
    if current > SCHEMA_VERSION {
        return Err(StoreError::Storage(format!(
            "database schema version {current} is newer than this mailtrail ({SCHEMA_VERSION})"
        )));
    }
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .take(version as usize)
        .skip(current as usize)
    {
        let version = i as i64 + 1;
        let tx = conn.transaction().map_err(storage)?;
        tx.execute_batch(sql).map_err(storage)?;
        tx.pragma_update(None, "user_version", version)
            .map_err(storage)?;
        tx.commit().map_err(storage)?;
    }
    Ok(())
}
