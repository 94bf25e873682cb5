//! Key metadata behind one trait; SQLite is the embedded default.
//!
//! The queries are plain SQL over three tables, so a PostgreSQL implementation can follow without
//! touching the service core. Every lookup is by primary key or an indexed range: the cost of a
//! request does not grow with the number of keys.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::error::{KmsError, KmsResult};
use crate::ids::KeyId;
use crate::key_stores::KeyStoreRecord;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// Written before the key is made on the tokens; invisible to clients. A row left in this
    /// state by a crash is rolled back at start-up (the token object destroyed, the row removed).
    Creating,
    Enabled,
    Disabled,
    PendingDeletion,
}

impl KeyState {
    pub fn as_str(&self) -> &'static str {
        match self {
            KeyState::Creating => "Creating",
            KeyState::Enabled => "Enabled",
            KeyState::Disabled => "Disabled",
            KeyState::PendingDeletion => "PendingDeletion",
        }
    }

    pub fn parse(s: &str) -> KmsResult<KeyState> {
        Ok(match s {
            "Creating" => KeyState::Creating,
            "Enabled" => KeyState::Enabled,
            "Disabled" => KeyState::Disabled,
            "PendingDeletion" => KeyState::PendingDeletion,
            other => {
                return Err(KmsError::Internal(format!(
                    "unknown key state {other:?} in metadata"
                )))
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub key_id: KeyId,
    pub created_ms: i64,
    pub description: String,
    pub state: KeyState,
    pub deletion_ms: Option<i64>,
    pub pending_window_days: Option<u32>,
    pub custom_key_store_id: String,
    pub tags: BTreeMap<String, String>,
}

/// A backup file as the catalogue records it when it is made (`hsmkms backup list`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct BackupRecord {
    pub created_ms: i64,
    pub path: String,
    pub key_store_id: String,
    pub keys: usize,
    pub aliases: usize,
    /// Hex SHA-256 of the file as written: tells whether the file is still the one made.
    pub sha256: String,
    pub domain_kcv: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AliasRecord {
    pub name: String,
    pub key_id: KeyId,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// Who is making a `Creating` key, and until when that claim holds unless renewed. Another
/// process's `recover` rolls an intent back only once its lease has expired or its owner is
/// gone (see [`crate::intent`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntentLease {
    /// Names the owning process: [`crate::intent::this_process`].
    pub owner: String,
    /// Milliseconds since the epoch, on the clock of the process that set it.
    pub until_ms: i64,
}

pub trait MetadataStore: Send + Sync + 'static {
    /// Records a key in state `Creating`, before its material is made, with no owner: the
    /// intent counts as expired at once (as those of databases made before leases do).
    fn begin_create(&self, key: &KeyRecord) -> KmsResult<()>;
    /// Records a key in state `Creating`, claimed by `lease` until it expires.
    fn begin_leased_create(&self, key: &KeyRecord, lease: &IntentLease) -> KmsResult<()>;
    /// Extends the lease of the owner's own intent; false if the intent is gone (rolled back)
    /// or not the owner's.
    fn renew_intent(&self, key_id: &KeyId, lease: &IntentLease) -> KmsResult<bool>;
    /// Makes a `Creating` key `Enabled`: the commit point of CreateKey.
    fn finish_create(&self, key_id: &KeyId) -> KmsResult<()>;
    /// Every key in state `Creating`, whoever makes it.
    fn unfinished_creations(&self) -> KmsResult<Vec<KeyId>>;
    /// Every `Creating` key with its intent's lease (owner `""` and lease 0 when it has none).
    fn creating_intents(&self) -> KmsResult<Vec<(KeyId, IntentLease)>>;
    /// Forgets a `Creating` key (leaving a tombstone, as removal does) only if its intent still
    /// has the lease `seen`, checked in the same transaction: a renewal that came in between
    /// wins. Returns whether it went.
    fn remove_intent(&self, key_id: &KeyId, seen: &IntentLease) -> KmsResult<bool>;
    /// A setting of the service that survives restarts (e.g. whether the key store is
    /// connected).
    fn setting(&self, name: &str) -> KmsResult<Option<String>>;
    fn set_setting(&self, name: &str, value: &str) -> KmsResult<()>;
    /// Puts back a key from a backup, in its recorded state, unless the key id is known
    /// already. Returns whether it was added.
    fn restore_key(&self, key: &KeyRecord) -> KmsResult<bool>;
    /// The key ids of one custom key store, in every state.
    fn store_key_ids(&self, store_id: &str) -> KmsResult<Vec<KeyId>>;
    /// The custom key store of a key in any state.
    fn key_store_of(&self, key_id: &KeyId) -> KmsResult<Option<String>>;
    fn key_stores(&self) -> KmsResult<Vec<KeyStoreRecord>>;
    fn record_backup(&self, backup: &BackupRecord) -> KmsResult<()>;
    /// The backup catalogue, oldest first.
    fn backups(&self) -> KmsResult<Vec<BackupRecord>>;
    /// `CustomKeyStoreNameInUse` if another store has the name.
    fn put_key_store(&self, record: &KeyStoreRecord) -> KmsResult<()>;
    /// Forgets a store that holds no keys; `CustomKeyStoreHasKeys` otherwise.
    fn delete_key_store(&self, id: &str) -> KmsResult<()>;
    /// A visible key (not `Creating`).
    fn get_key(&self, key_id: &KeyId) -> KmsResult<Option<KeyRecord>>;
    /// Visible keys in key-id order, after `after`.
    fn list_keys(&self, after: Option<&KeyId>, limit: usize) -> KmsResult<Vec<KeyRecord>>;
    /// Reads, changes and writes one visible key in one transaction; `NotFound` if absent.
    fn update_key(
        &self,
        key_id: &KeyId,
        change: &mut dyn FnMut(&mut KeyRecord) -> KmsResult<()>,
    ) -> KmsResult<KeyRecord>;
    /// Removes a key with its aliases (the end of deletion, or the rollback of a creation).
    /// Forgets a key and leaves a tombstone: the prober destroys the key on tokens that still
    /// hold it, and only keys with a tombstone (never keys the metadata merely does not know).
    fn remove_key(&self, key_id: &KeyId) -> KmsResult<()>;
    /// Removes a key, as `remove_key`, only if it is still pending deletion and due at `now_ms`
    /// (a CancelKeyDeletion may have come in between). Returns whether it was removed.
    fn remove_due_key(&self, key_id: &KeyId, now_ms: i64) -> KmsResult<bool>;
    /// Forgets a tombstone: the key is back (a restore), or gone from every token.
    fn clear_tombstone(&self, key_id: &KeyId) -> KmsResult<()>;
    /// Whether a key was removed and has not come back (by a restore) since.
    fn is_tombstoned(&self, key_id: &KeyId) -> KmsResult<bool>;
    /// The tombstones of one store's keys.
    fn tombstones(&self, store_id: &str) -> KmsResult<Vec<KeyId>>;
    fn keys_due_for_deletion(&self, now_ms: i64) -> KmsResult<Vec<KeyId>>;
    /// `AlreadyExists` if the name is taken.
    fn create_alias(&self, alias: &AliasRecord) -> KmsResult<()>;
    /// `NotFound` if there is no such alias.
    fn update_alias(&self, name: &str, key_id: &KeyId, now_ms: i64) -> KmsResult<()>;
    /// `NotFound` if there is no such alias.
    fn delete_alias(&self, name: &str) -> KmsResult<()>;
    fn get_alias(&self, name: &str) -> KmsResult<Option<AliasRecord>>;
    /// A key from memory, if the store can tell without blocking that it is current.
    fn cached_key(&self, _key_id: &KeyId) -> Option<std::sync::Arc<KeyRecord>> {
        None
    }
    /// An alias from memory, if the store can tell without blocking that it is current.
    fn cached_alias(&self, _name: &str) -> Option<AliasRecord> {
        None
    }
    fn list_aliases(
        &self,
        key_id: Option<&KeyId>,
        after: Option<&str>,
        limit: usize,
    ) -> KmsResult<Vec<AliasRecord>>;
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS keys (
    key_id BLOB PRIMARY KEY,
    created_ms INTEGER NOT NULL,
    description TEXT NOT NULL,
    state TEXT NOT NULL,
    deletion_ms INTEGER,
    pending_window_days INTEGER,
    custom_key_store_id TEXT NOT NULL,
    tags TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS keys_by_deletion ON keys(deletion_ms) WHERE deletion_ms IS NOT NULL;
CREATE INDEX IF NOT EXISTS keys_by_state ON keys(state) WHERE state = 'Creating';
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT PRIMARY KEY,
    key_id BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS aliases_by_key ON aliases(key_id, name);
CREATE TABLE IF NOT EXISTS key_stores (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS keys_by_store ON keys(custom_key_store_id);
CREATE TABLE IF NOT EXISTS backups (
    created_ms INTEGER NOT NULL,
    path TEXT NOT NULL,
    key_store_id TEXT NOT NULL,
    keys INTEGER NOT NULL,
    aliases INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    domain_kcv TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tombstones (
    key_id BLOB PRIMARY KEY,
    custom_key_store_id TEXT NOT NULL,
    removed_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS tombstones_by_store ON tombstones(custom_key_store_id);
CREATE TABLE IF NOT EXISTS settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tde_clients (
    name TEXT PRIMARY KEY,
    token_sha256 BLOB NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS tde_keys (
    client TEXT NOT NULL,
    id INTEGER NOT NULL,
    kms_key_id BLOB NOT NULL,
    bytes INTEGER NOT NULL,
    enabled INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (client, id)
);
CREATE TABLE IF NOT EXISTS tde_versions (
    client TEXT NOT NULL,
    id INTEGER NOT NULL,
    version INTEGER NOT NULL,
    wrapped BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (client, id, version)
);
";

/// SQLite in WAL mode with `synchronous=FULL`: a commit is on disk before the client hears of it.
/// One writer connection; readers from a small pool, since WAL lets them run beside the writer.
///
/// Keys and aliases read on the hot path are cached in memory. A commit through this store
/// empties the cache before the next read, so this process always reads its own writes. Commits
/// by other processes (the CLI) show in SQLite's `data_version`, which is consulted at most every
/// [`EXTERNAL_CHECK_INTERVAL`]: asking on every request would cost two file-lock system calls.
pub struct SqliteStore {
    path: std::path::PathBuf,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
    version: Mutex<Connection>,
    /// When `data_version` was last read, and what it said.
    external: Mutex<(Option<std::time::Instant>, i64)>,
    /// Commits through this store's writer.
    local_commits: std::sync::atomic::AtomicU64,
    cache: Mutex<Cache>,
}

/// How stale the cache may be after another process commits.
pub const EXTERNAL_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(2);

/// What the cache is valid for: the external `data_version` and the local commit count.
type Stamp = (i64, u64);

/// Entries cached at most; the cache empties when full (it refills from hot keys at once).
const CACHE_CAPACITY: usize = 100_000;

#[derive(Default)]
struct Cache {
    version: Stamp,
    keys: std::collections::HashMap<KeyId, std::sync::Arc<KeyRecord>>,
    aliases: std::collections::HashMap<String, AliasRecord>,
}

impl Cache {
    /// Empties the cache if the database changed since it was filled; true if it is current.
    fn sync(&mut self, version: Stamp) -> bool {
        if self.version != version {
            self.keys.clear();
            self.aliases.clear();
            self.version = version;
            return false;
        }
        true
    }

    fn make_room(&mut self) {
        if self.keys.len() + self.aliases.len() >= CACHE_CAPACITY {
            self.keys.clear();
            self.aliases.clear();
        }
    }
}

const KEY_COLUMNS: &str = "key_id, created_ms, description, state, deletion_ms, pending_window_days, custom_key_store_id, tags";

impl SqliteStore {
    pub fn open(path: &Path) -> KmsResult<SqliteStore> {
        // Key metadata (wrapped keys, policies, the store's token list) is for this user only.
        // Made here with mode 0600 when new; SQLite gives its -wal and -shm files the same mode.
        {
            use std::os::unix::fs::OpenOptionsExt;
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path);
        }
        let mut writer = Self::connect(path)?;
        writer.execute_batch(SCHEMA)?;
        Self::migrate(&mut writer)?;
        let version = Self::connect(path)?;
        Ok(SqliteStore {
            path: path.to_path_buf(),
            writer: Mutex::new(writer),
            readers: Mutex::new(Vec::new()),
            version: Mutex::new(version),
            external: Mutex::new((None, 0)),
            local_commits: std::sync::atomic::AtomicU64::new(0),
            cache: Mutex::new(Cache::default()),
        })
    }

    /// Brings an older database's schema up to date: columns added with defaults, in one
    /// immediate transaction so that two processes opening the same file at once do not both
    /// add them. Idempotent.
    fn migrate(conn: &mut Connection) -> KmsResult<()> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let has_lease: bool = tx.query_row(
            "SELECT COUNT(*) > 0 FROM pragma_table_info('keys') WHERE name = 'intent_owner'",
            [],
            |r| r.get(0),
        )?;
        if !has_lease {
            // Intents of databases made before leases have none (lease 0): expired, rolled back
            // by the next `recover` as they always were.
            tx.execute_batch(
                "ALTER TABLE keys ADD COLUMN intent_owner TEXT NOT NULL DEFAULT '';
                 ALTER TABLE keys ADD COLUMN intent_lease_ms INTEGER NOT NULL DEFAULT 0;",
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The current stamp; read it before reading rows that will be cached.
    fn stamp(&self) -> Option<Stamp> {
        let local = self.local_commits.load(std::sync::atomic::Ordering::SeqCst);
        let mut external = self.external.lock().unwrap();
        if external
            .0
            .is_none_or(|at| at.elapsed() >= EXTERNAL_CHECK_INTERVAL)
        {
            *external = (Some(std::time::Instant::now()), self.data_version()?);
        }
        Some((external.1, local))
    }

    /// SQLite's count of commits by other connections, as seen from the version connection.
    fn data_version(&self) -> Option<i64> {
        let conn = self.version.lock().unwrap();
        let mut stmt = conn.prepare_cached("PRAGMA data_version").ok()?;
        stmt.query_row([], |r| r.get(0)).ok()
    }

    fn connect(path: &Path) -> KmsResult<Connection> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        Ok(conn)
    }

    pub(crate) fn read<T>(&self, f: impl FnOnce(&Connection) -> KmsResult<T>) -> KmsResult<T> {
        let conn = self.readers.lock().unwrap().pop();
        let conn = match conn {
            Some(c) => c,
            None => Self::connect(&self.path)?,
        };
        let result = f(&conn);
        let mut pool = self.readers.lock().unwrap();
        if pool.len() < 8 {
            pool.push(conn);
        }
        result
    }

    pub(crate) fn write<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction) -> KmsResult<T>,
    ) -> KmsResult<T> {
        let mut conn = self.writer.lock().unwrap();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let value = f(&tx)?;
        tx.commit()?;
        self.local_commits
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(value)
    }
}

fn key_from_row(row: &rusqlite::Row) -> rusqlite::Result<KeyRow> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
        row.get(6)?,
        row.get(7)?,
    ))
}

type KeyRow = (
    Vec<u8>,
    i64,
    String,
    String,
    Option<i64>,
    Option<u32>,
    String,
    String,
);

fn key_record(row: KeyRow) -> KmsResult<KeyRecord> {
    let (
        id,
        created_ms,
        description,
        state,
        deletion_ms,
        pending_window_days,
        custom_key_store_id,
        tags,
    ) = row;
    let key_id = KeyId(
        id.try_into()
            .map_err(|_| KmsError::Internal("malformed key id in metadata".into()))?,
    );
    let tags = serde_json::from_str(&tags)
        .map_err(|e| KmsError::Internal(format!("malformed tags in metadata: {e}")))?;
    Ok(KeyRecord {
        key_id,
        created_ms,
        description,
        state: KeyState::parse(&state)?,
        deletion_ms,
        pending_window_days,
        custom_key_store_id,
        tags,
    })
}

fn tags_json(tags: &BTreeMap<String, String>) -> String {
    serde_json::to_string(tags).expect("a string map serialises")
}

fn get_visible_key(conn: &Connection, key_id: &KeyId) -> KmsResult<Option<KeyRecord>> {
    let row = conn
        .prepare_cached(&format!(
            "SELECT {KEY_COLUMNS} FROM keys WHERE key_id = ?1 AND state != 'Creating'"
        ))?
        .query_row(params![&key_id.0[..]], key_from_row)
        .optional()?;
    row.map(key_record).transpose()
}

/// The key ids a query selects (its first column).
fn key_ids(conn: &Connection, sql: &str, args: impl rusqlite::Params) -> KmsResult<Vec<KeyId>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let ids = stmt
        .query_map(args, |r| r.get::<_, Vec<u8>>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    ids.into_iter()
        .map(|id| {
            id.try_into()
                .map(KeyId)
                .map_err(|_| KmsError::Internal("malformed key id".into()))
        })
        .collect()
}

/// Removes a key and its aliases, leaving a tombstone that names its store.
fn forget_key(tx: &rusqlite::Transaction, key_id: &KeyId, now_ms: i64) -> KmsResult<()> {
    tx.execute(
        "INSERT INTO tombstones (key_id, custom_key_store_id, removed_ms) \
         SELECT key_id, custom_key_store_id, ?2 FROM keys WHERE key_id = ?1 \
         ON CONFLICT(key_id) DO UPDATE SET removed_ms = ?2",
        params![&key_id.0[..], now_ms],
    )?;
    tx.execute(
        "DELETE FROM aliases WHERE key_id = ?1",
        params![&key_id.0[..]],
    )?;
    tx.execute("DELETE FROM keys WHERE key_id = ?1", params![&key_id.0[..]])?;
    Ok(())
}

fn alias_from_row(row: &rusqlite::Row) -> rusqlite::Result<(String, Vec<u8>, i64, i64)> {
    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
}

fn alias_record(
    (name, id, created_ms, updated_ms): (String, Vec<u8>, i64, i64),
) -> KmsResult<AliasRecord> {
    let key_id = KeyId(
        id.try_into()
            .map_err(|_| KmsError::Internal("malformed key id in metadata".into()))?,
    );
    Ok(AliasRecord {
        name,
        key_id,
        created_ms,
        updated_ms,
    })
}

impl MetadataStore for SqliteStore {
    fn begin_create(&self, key: &KeyRecord) -> KmsResult<()> {
        self.write(|tx| {
            tx.execute(
                &format!("INSERT INTO keys ({KEY_COLUMNS}) VALUES (?1, ?2, ?3, 'Creating', NULL, NULL, ?4, ?5)"),
                params![&key.key_id.0[..], key.created_ms, key.description, key.custom_key_store_id, tags_json(&key.tags)],
            )?;
            Ok(())
        })
    }

    fn begin_leased_create(&self, key: &KeyRecord, lease: &IntentLease) -> KmsResult<()> {
        self.write(|tx| {
            tx.execute(
                &format!("INSERT INTO keys ({KEY_COLUMNS}, intent_owner, intent_lease_ms) VALUES (?1, ?2, ?3, 'Creating', NULL, NULL, ?4, ?5, ?6, ?7)"),
                params![&key.key_id.0[..], key.created_ms, key.description, key.custom_key_store_id, tags_json(&key.tags), lease.owner, lease.until_ms],
            )?;
            Ok(())
        })
    }

    fn renew_intent(&self, key_id: &KeyId, lease: &IntentLease) -> KmsResult<bool> {
        self.write(|tx| {
            Ok(tx.execute(
                "UPDATE keys SET intent_lease_ms = ?3 WHERE key_id = ?1 AND state = 'Creating' AND intent_owner = ?2",
                params![&key_id.0[..], lease.owner, lease.until_ms],
            )? == 1)
        })
    }

    fn creating_intents(&self) -> KmsResult<Vec<(KeyId, IntentLease)>> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT key_id, intent_owner, intent_lease_ms FROM keys WHERE state = 'Creating'",
            )?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, String>(1)?, r.get(2)?))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            rows.into_iter()
                .map(|(id, owner, until_ms)| {
                    let id = id
                        .try_into()
                        .map(KeyId)
                        .map_err(|_| KmsError::Internal("malformed key id".into()))?;
                    Ok((id, IntentLease { owner, until_ms }))
                })
                .collect()
        })
    }

    fn remove_intent(&self, key_id: &KeyId, seen: &IntentLease) -> KmsResult<bool> {
        self.write(|tx| {
            let unchanged: Option<i64> = tx
                .prepare_cached(
                    "SELECT 1 FROM keys WHERE key_id = ?1 AND state = 'Creating' AND intent_owner = ?2 AND intent_lease_ms = ?3",
                )?
                .query_row(params![&key_id.0[..], seen.owner, seen.until_ms], |r| r.get(0))
                .optional()?;
            if unchanged.is_none() {
                return Ok(false);
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            forget_key(tx, key_id, now)?;
            Ok(true)
        })
    }

    fn finish_create(&self, key_id: &KeyId) -> KmsResult<()> {
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE keys SET state = 'Enabled', intent_owner = '', intent_lease_ms = 0 WHERE key_id = ?1 AND state = 'Creating'",
                params![&key_id.0[..]],
            )?;
            if n != 1 {
                return Err(KmsError::Internal(format!(
                    "key {key_id} was not being created"
                )));
            }
            Ok(())
        })
    }

    fn unfinished_creations(&self) -> KmsResult<Vec<KeyId>> {
        self.read(|conn| key_ids(conn, "SELECT key_id FROM keys WHERE state = 'Creating'", []))
    }

    fn restore_key(&self, key: &KeyRecord) -> KmsResult<bool> {
        self.write(|tx| {
            // A key back from a backup is no longer deleted: the prober must leave it be.
            tx.execute(
                "DELETE FROM tombstones WHERE key_id = ?1",
                params![&key.key_id.0[..]],
            )?;
            let n = tx.execute(
                &format!("INSERT INTO keys ({KEY_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT(key_id) DO NOTHING"),
                params![
                    &key.key_id.0[..],
                    key.created_ms,
                    key.description,
                    key.state.as_str(),
                    key.deletion_ms,
                    key.pending_window_days,
                    key.custom_key_store_id,
                    tags_json(&key.tags)
                ],
            )?;
            Ok(n == 1)
        })
    }

    fn setting(&self, name: &str) -> KmsResult<Option<String>> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached("SELECT value FROM settings WHERE name = ?1")?
                .query_row(params![name], |r| r.get(0))
                .optional()?)
        })
    }

    fn set_setting(&self, name: &str, value: &str) -> KmsResult<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO settings (name, value) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET value = ?2",
                params![name, value],
            )?;
            Ok(())
        })
    }

    fn store_key_ids(&self, store_id: &str) -> KmsResult<Vec<KeyId>> {
        self.read(|conn| {
            key_ids(
                conn,
                "SELECT key_id FROM keys WHERE custom_key_store_id = ?1",
                params![store_id],
            )
        })
    }

    fn key_store_of(&self, key_id: &KeyId) -> KmsResult<Option<String>> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached("SELECT custom_key_store_id FROM keys WHERE key_id = ?1")?
                .query_row(params![&key_id.0[..]], |r| r.get(0))
                .optional()?)
        })
    }

    fn key_stores(&self) -> KmsResult<Vec<KeyStoreRecord>> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached("SELECT record FROM key_stores ORDER BY id")?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            let mut out = Vec::new();
            for row in rows {
                out.push(serde_json::from_str(&row?).map_err(|e| {
                    KmsError::Internal(format!("unreadable key store in metadata: {e}"))
                })?);
            }
            Ok(out)
        })
    }

    fn record_backup(&self, b: &BackupRecord) -> KmsResult<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO backups (created_ms, path, key_store_id, keys, aliases, sha256, domain_kcv) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    b.created_ms,
                    b.path,
                    b.key_store_id,
                    b.keys as i64,
                    b.aliases as i64,
                    b.sha256,
                    b.domain_kcv
                ],
            )?;
            Ok(())
        })
    }

    fn backups(&self) -> KmsResult<Vec<BackupRecord>> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT created_ms, path, key_store_id, keys, aliases, sha256, domain_kcv FROM backups \
                 ORDER BY created_ms, rowid",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(BackupRecord {
                    created_ms: r.get(0)?,
                    path: r.get(1)?,
                    key_store_id: r.get(2)?,
                    keys: r.get::<_, i64>(3)? as usize,
                    aliases: r.get::<_, i64>(4)? as usize,
                    sha256: r.get(5)?,
                    domain_kcv: r.get(6)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn put_key_store(&self, record: &KeyStoreRecord) -> KmsResult<()> {
        let json = serde_json::to_string(record).expect("records serialise");
        self.write(|tx| {
            let taken: Option<String> = tx
                .prepare_cached("SELECT id FROM key_stores WHERE name = ?1 AND id != ?2")?
                .query_row(params![record.name, record.id], |r| r.get(0))
                .optional()?;
            if let Some(other) = taken {
                return Err(KmsError::CustomKeyStoreNameInUse(format!(
                    "The name {:?} is already used by custom key store {other}",
                    record.name
                )));
            }
            tx.execute(
                "INSERT INTO key_stores (id, name, record) VALUES (?1, ?2, ?3) \
                 ON CONFLICT(id) DO UPDATE SET name = ?2, record = ?3",
                params![record.id, record.name, json],
            )?;
            Ok(())
        })
    }

    fn delete_key_store(&self, id: &str) -> KmsResult<()> {
        self.write(|tx| {
            let keys: i64 = tx
                .prepare_cached("SELECT COUNT(*) FROM keys WHERE custom_key_store_id = ?1")?
                .query_row(params![id], |r| r.get(0))?;
            if keys > 0 {
                return Err(KmsError::CustomKeyStoreHasKeys(format!(
                    "Custom key store {id} still holds {keys} keys: schedule their deletion and wait until \
                     they are deleted before deleting the store"
                )));
            }
            let unfinished: i64 = tx
                .prepare_cached("SELECT COUNT(*) FROM tombstones WHERE custom_key_store_id = ?1")?
                .query_row(params![id], |r| r.get(0))?;
            if unfinished > 0 {
                return Err(KmsError::CustomKeyStoreHasKeys(format!(
                    "The material of {unfinished} deleted keys of custom key store {id} is still on tokens that \
                     were away: connect the store until the prober has destroyed it, then delete the store"
                )));
            }
            tx.execute("DELETE FROM key_stores WHERE id = ?1", params![id])?;
            Ok(())
        })
    }

    fn get_key(&self, key_id: &KeyId) -> KmsResult<Option<KeyRecord>> {
        // The version is read before the row: if a commit lands in between, the entry is
        // filed under the older version and dropped at the next look.
        let version = self.stamp();
        let key = self.read(|conn| get_visible_key(conn, key_id))?;
        if let (Some(version), Some(key)) = (version, &key) {
            let mut cache = self.cache.lock().unwrap();
            // Filed under the version seen before the read (see above).
            cache.sync(version);
            cache.make_room();
            cache.keys.insert(*key_id, std::sync::Arc::new(key.clone()));
        }
        Ok(key)
    }

    fn cached_key(&self, key_id: &KeyId) -> Option<std::sync::Arc<KeyRecord>> {
        let version = self.stamp()?;
        let mut cache = self.cache.lock().unwrap();
        cache
            .sync(version)
            .then(|| cache.keys.get(key_id).cloned())
            .flatten()
    }

    fn cached_alias(&self, name: &str) -> Option<AliasRecord> {
        let version = self.stamp()?;
        let mut cache = self.cache.lock().unwrap();
        cache
            .sync(version)
            .then(|| cache.aliases.get(name).cloned())
            .flatten()
    }

    fn list_keys(&self, after: Option<&KeyId>, limit: usize) -> KmsResult<Vec<KeyRecord>> {
        self.read(|conn| {
            let after = after.map(|k| k.0.to_vec()).unwrap_or_default();
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {KEY_COLUMNS} FROM keys WHERE key_id > ?1 AND state != 'Creating' ORDER BY key_id LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![after, limit as i64], key_from_row)?.collect::<Result<Vec<_>, _>>()?;
            rows.into_iter().map(key_record).collect()
        })
    }

    fn update_key(
        &self,
        key_id: &KeyId,
        change: &mut dyn FnMut(&mut KeyRecord) -> KmsResult<()>,
    ) -> KmsResult<KeyRecord> {
        self.write(|tx| {
            let mut key = get_visible_key(tx, key_id)?.ok_or_else(|| KmsError::NotFound(format!("Key '{key_id}' does not exist")))?;
            change(&mut key)?;
            tx.execute(
                "UPDATE keys SET description = ?2, state = ?3, deletion_ms = ?4, pending_window_days = ?5, tags = ?6 WHERE key_id = ?1",
                params![&key_id.0[..], key.description, key.state.as_str(), key.deletion_ms, key.pending_window_days, tags_json(&key.tags)],
            )?;
            Ok(key)
        })
    }

    fn remove_key(&self, key_id: &KeyId) -> KmsResult<()> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        self.write(|tx| forget_key(tx, key_id, now))
    }

    fn remove_due_key(&self, key_id: &KeyId, now_ms: i64) -> KmsResult<bool> {
        self.write(|tx| {
            let due: Option<i64> = tx
                .prepare_cached(
                    "SELECT 1 FROM keys WHERE key_id = ?1 AND state = 'PendingDeletion' AND deletion_ms <= ?2",
                )?
                .query_row(params![&key_id.0[..], now_ms], |r| r.get(0))
                .optional()?;
            if due.is_none() {
                return Ok(false);
            }
            forget_key(tx, key_id, now_ms)?;
            Ok(true)
        })
    }

    fn clear_tombstone(&self, key_id: &KeyId) -> KmsResult<()> {
        self.write(|tx| {
            tx.execute(
                "DELETE FROM tombstones WHERE key_id = ?1",
                params![&key_id.0[..]],
            )?;
            Ok(())
        })
    }

    fn is_tombstoned(&self, key_id: &KeyId) -> KmsResult<bool> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached("SELECT 1 FROM tombstones WHERE key_id = ?1")?
                .query_row(params![&key_id.0[..]], |_| Ok(()))
                .optional()?
                .is_some())
        })
    }

    fn tombstones(&self, store_id: &str) -> KmsResult<Vec<KeyId>> {
        self.read(|conn| {
            key_ids(
                conn,
                "SELECT key_id FROM tombstones WHERE custom_key_store_id = ?1",
                params![store_id],
            )
        })
    }

    fn keys_due_for_deletion(&self, now_ms: i64) -> KmsResult<Vec<KeyId>> {
        self.read(|conn| {
            key_ids(
                conn,
                "SELECT key_id FROM keys WHERE state = 'PendingDeletion' AND deletion_ms IS NOT NULL AND deletion_ms <= ?1",
                params![now_ms],
            )
        })
    }

    fn create_alias(&self, alias: &AliasRecord) -> KmsResult<()> {
        self.write(|tx| {
            let n = tx.execute(
                "INSERT INTO aliases (name, key_id, created_ms, updated_ms) VALUES (?1, ?2, ?3, ?4) ON CONFLICT(name) DO NOTHING",
                params![alias.name, &alias.key_id.0[..], alias.created_ms, alias.updated_ms],
            )?;
            if n == 0 {
                return Err(KmsError::AlreadyExists(format!("An alias with the name {} already exists", alias.name)));
            }
            Ok(())
        })
    }

    fn update_alias(&self, name: &str, key_id: &KeyId, now_ms: i64) -> KmsResult<()> {
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE aliases SET key_id = ?2, updated_ms = ?3 WHERE name = ?1",
                params![name, &key_id.0[..], now_ms],
            )?;
            if n == 0 {
                return Err(KmsError::NotFound(format!("Alias {name} does not exist")));
            }
            Ok(())
        })
    }

    fn delete_alias(&self, name: &str) -> KmsResult<()> {
        self.write(|tx| {
            if tx.execute("DELETE FROM aliases WHERE name = ?1", params![name])? == 0 {
                return Err(KmsError::NotFound(format!("Alias {name} does not exist")));
            }
            Ok(())
        })
    }

    fn get_alias(&self, name: &str) -> KmsResult<Option<AliasRecord>> {
        let version = self.stamp();
        let alias = self.read(|conn| {
            let row = conn
                .prepare_cached(
                    "SELECT name, key_id, created_ms, updated_ms FROM aliases WHERE name = ?1",
                )?
                .query_row(params![name], alias_from_row)
                .optional()?;
            row.map(alias_record).transpose()
        })?;
        if let (Some(version), Some(alias)) = (version, &alias) {
            let mut cache = self.cache.lock().unwrap();
            cache.sync(version);
            cache.make_room();
            cache.aliases.insert(name.to_string(), alias.clone());
        }
        Ok(alias)
    }

    fn list_aliases(
        &self,
        key_id: Option<&KeyId>,
        after: Option<&str>,
        limit: usize,
    ) -> KmsResult<Vec<AliasRecord>> {
        self.read(|conn| {
            let after = after.unwrap_or("");
            let rows = match key_id {
                Some(k) => conn
                    .prepare_cached(
                        "SELECT name, key_id, created_ms, updated_ms FROM aliases WHERE key_id = ?1 AND name > ?2 ORDER BY name LIMIT ?3",
                    )?
                    .query_map(params![&k.0[..], after, limit as i64], alias_from_row)?
                    .collect::<Result<Vec<_>, _>>()?,
                None => conn
                    .prepare_cached("SELECT name, key_id, created_ms, updated_ms FROM aliases WHERE name > ?1 ORDER BY name LIMIT ?2")?
                    .query_map(params![after, limit as i64], alias_from_row)?
                    .collect::<Result<Vec<_>, _>>()?,
            };
            rows.into_iter().map(alias_record).collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(state: KeyState) -> KeyRecord {
        KeyRecord {
            key_id: KeyId::new_random(),
            created_ms: 1,
            description: "d".into(),
            state,
            deletion_ms: None,
            pending_window_days: None,
            custom_key_store_id: "cks-1".into(),
            tags: BTreeMap::new(),
        }
    }

    #[test]
    fn a_deleted_key_leaves_a_tombstone_until_it_is_restored_and_a_cancelled_deletion_wins() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("m.db")).unwrap();
        let mut due = record(KeyState::PendingDeletion);
        due.deletion_ms = Some(100);
        store.restore_key(&due).unwrap();
        // Not yet due, then cancelled: nothing goes.
        assert!(!store.remove_due_key(&due.key_id, 99).unwrap());
        store
            .update_key(&due.key_id, &mut |k| {
                k.state = KeyState::Enabled;
                k.deletion_ms = None;
                Ok(())
            })
            .unwrap();
        assert!(!store.remove_due_key(&due.key_id, 1_000).unwrap());
        assert!(store.get_key(&due.key_id).unwrap().is_some());
        assert!(!store.is_tombstoned(&due.key_id).unwrap());
        // Removed: a tombstone of its store; restored: the tombstone goes.
        store.remove_key(&due.key_id).unwrap();
        assert!(store.is_tombstoned(&due.key_id).unwrap());
        assert_eq!(store.tombstones("cks-1").unwrap(), vec![due.key_id]);
        assert!(
            store.delete_key_store("cks-1").is_err(),
            "material may remain on tokens"
        );
        store.restore_key(&due).unwrap();
        assert!(!store.is_tombstoned(&due.key_id).unwrap());
    }

    #[test]
    fn a_key_is_invisible_until_its_creation_finishes() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("m.db")).unwrap();
        let key = record(KeyState::Creating);
        store.begin_create(&key).unwrap();
        assert_eq!(store.get_key(&key.key_id).unwrap(), None);
        assert_eq!(store.unfinished_creations().unwrap(), vec![key.key_id]);
        store.finish_create(&key.key_id).unwrap();
        assert_eq!(
            store.get_key(&key.key_id).unwrap().unwrap().state,
            KeyState::Enabled
        );
        assert!(store.unfinished_creations().unwrap().is_empty());
    }

    #[test]
    fn keys_and_aliases_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let key = record(KeyState::Creating);
        {
            let store = SqliteStore::open(&path).unwrap();
            store.begin_create(&key).unwrap();
            store.finish_create(&key.key_id).unwrap();
            store
                .create_alias(&AliasRecord {
                    name: "alias/a".into(),
                    key_id: key.key_id,
                    created_ms: 1,
                    updated_ms: 1,
                })
                .unwrap();
            store
                .update_key(&key.key_id, &mut |k| {
                    k.state = KeyState::Disabled;
                    k.tags.insert("t".into(), "v".into());
                    Ok(())
                })
                .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let back = store.get_key(&key.key_id).unwrap().unwrap();
        assert_eq!(back.state, KeyState::Disabled);
        assert_eq!(back.tags.get("t").map(String::as_str), Some("v"));
        assert_eq!(
            store.get_alias("alias/a").unwrap().unwrap().key_id,
            key.key_id
        );
    }

    #[test]
    fn a_commit_by_another_connection_is_seen_despite_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let store = SqliteStore::open(&path).unwrap();
        let key = record(KeyState::Creating);
        store.begin_create(&key).unwrap();
        store.finish_create(&key.key_id).unwrap();
        store.get_key(&key.key_id).unwrap();
        assert_eq!(
            store.cached_key(&key.key_id).unwrap().state,
            KeyState::Enabled
        );
        // Another process (the CLI) changes the key.
        let other = SqliteStore::open(&path).unwrap();
        other
            .update_key(&key.key_id, &mut |k| {
                k.state = KeyState::Disabled;
                Ok(())
            })
            .unwrap();
        std::thread::sleep(EXTERNAL_CHECK_INTERVAL);
        assert_eq!(store.cached_key(&key.key_id), None);
        assert_eq!(
            store.get_key(&key.key_id).unwrap().unwrap().state,
            KeyState::Disabled
        );
        // And so is a change through this store's own writer.
        store
            .update_key(&key.key_id, &mut |k| {
                k.state = KeyState::Enabled;
                Ok(())
            })
            .unwrap();
        assert_eq!(store.cached_key(&key.key_id), None);
    }

    #[test]
    fn duplicate_alias_is_already_exists_and_listing_pages() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("m.db")).unwrap();
        let key = KeyId::new_random();
        for n in ["alias/a", "alias/b", "alias/c"] {
            store
                .create_alias(&AliasRecord {
                    name: n.into(),
                    key_id: key,
                    created_ms: 1,
                    updated_ms: 1,
                })
                .unwrap();
        }
        let dup = store.create_alias(&AliasRecord {
            name: "alias/a".into(),
            key_id: key,
            created_ms: 1,
            updated_ms: 1,
        });
        assert!(matches!(dup, Err(KmsError::AlreadyExists(_))));
        let page = store.list_aliases(None, Some("alias/a"), 1).unwrap();
        assert_eq!(page[0].name, "alias/b");
        assert_eq!(store.list_aliases(Some(&key), None, 10).unwrap().len(), 3);
        assert!(store
            .list_aliases(Some(&KeyId::new_random()), None, 10)
            .unwrap()
            .is_empty());
    }
}
