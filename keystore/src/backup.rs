//! Backups: one file with the key metadata and every key's material wrapped by the cluster's
//! domain key inside a token, the domain key's check value, and a MAC made in the token by the
//! store's backup MAC key. A backup never holds plaintext key material; it restores only into a
//! cluster whose tokens hold the same domain key and the MAC key that made it. See
//! docs/backup.md and docs/security.md.
//!
//! ```text
//! file    = body trailer
//! body    = the backup's JSON, pretty-printed, ending in "\n"
//! trailer = "hsmkms-backup-mac v2 " hex(mac key id, 8 bytes) " " hex(tag, 32 bytes) "\n"
//! tag     = HMAC-SHA256(backup MAC key, "hsmkms-backup-2\0" || mac key id || SHA-256(body))
//! ```
//! The tag covers the body's exact bytes (through their SHA-256), not a re-serialisation, and
//! nothing in the body is read before it verifies.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;

use hsm::Cluster;

use crate::app::Parts;
use crate::error::{KmsError, KmsResult};
use crate::ids::KeyId;
use crate::key_stores::KeyStore;
use crate::store::{AliasRecord, BackupRecord, KeyRecord, KeyState, MetadataStore};

const FORMAT: &str = "hsmkms-backup-2";
/// The format before the backup MAC key, refused since (docs/backup.md).
const FORMAT_1: &str = "hsmkms-backup-1";
const TRAILER: &str = "hsmkms-backup-mac v2 ";
/// Domain separation of the MAC's input: a tag made for anything else never verifies here.
const MAC_LABEL: &[u8] = b"hsmkms-backup-2\0";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupFile {
    pub format: String,
    pub created_ms: i64,
    pub key_store_id: String,
    pub cluster_id: String,
    /// Hex of the domain key's check value: the restoring cluster must hold the same key.
    pub domain_kcv: String,
    pub keys: Vec<BackupKey>,
    pub aliases: Vec<BackupAlias>,
}

/// A backup as written: the parsed body and the file's exact bytes.
pub struct Backup {
    pub file: BackupFile,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupKey {
    pub key_id: String,
    pub created_ms: i64,
    pub description: String,
    pub state: String,
    pub deletion_ms: Option<i64>,
    pub pending_window_days: Option<u32>,
    pub tags: BTreeMap<String, String>,
    /// The root key wrapped by the domain key (AES key wrap with padding), base64.
    pub wrapped: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupAlias {
    pub name: String,
    pub key_id: String,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// What a restore did, or would do with `dry_run`.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct RestoreReport {
    pub dry_run: bool,
    pub keys_in_backup: usize,
    pub keys_added: usize,
    pub keys_already_present: usize,
    /// Key copies put on tokens that lacked them.
    pub token_copies: usize,
    pub aliases_added: usize,
    pub aliases_already_present: usize,
}

fn bad(why: impl Into<String>) -> KmsError {
    KmsError::Validation(why.into())
}

/// Progress of a long pass over the keys: a bar on a terminal, a log line every 100 keys (and
/// at the end) otherwise.
pub struct Progress {
    what: &'static str,
    total: usize,
    done: usize,
    bar: bool,
    drawn_at: Option<std::time::Instant>,
}

impl Progress {
    pub fn new(what: &'static str, total: usize) -> Progress {
        Progress {
            what,
            total,
            done: 0,
            bar: std::io::stderr().is_terminal(),
            drawn_at: None,
        }
    }

    pub fn step(&mut self) {
        self.done += 1;
        let last = self.done == self.total;
        if self.bar {
            // Redraw at most 20 times a second.
            if last || self.drawn_at.is_none_or(|t| t.elapsed().as_millis() >= 50) {
                self.drawn_at = Some(std::time::Instant::now());
                let width = 40;
                let filled = (self.done * width).checked_div(self.total).unwrap_or(width);
                eprint!(
                    "\r{} [{}{}] {}/{}",
                    self.what,
                    "#".repeat(filled),
                    " ".repeat(width - filled),
                    self.done,
                    self.total
                );
                if last {
                    eprintln!();
                }
            }
        } else if self.done % 100 == 0 || last {
            tracing::info!(done = self.done, of = self.total, "{}", self.what);
        }
    }
}

/// The store a backup command works on: the one named, else the one the backup was made of if
/// this service has it, else the default store.
pub fn target_store(
    parts: &Parts,
    named: Option<&str>,
    of_backup: Option<&str>,
) -> KmsResult<Arc<KeyStore>> {
    if let Some(id) = named {
        return parts.service.key_store(id).ok_or_else(|| {
            KmsError::CustomKeyStoreNotFound(format!("Custom key store {id} does not exist"))
        });
    }
    if let Some(s) = of_backup.and_then(|id| parts.service.key_store(id)) {
        return Ok(s);
    }
    parts.service.default_key_store()
}

async fn kcv(cluster: &Cluster) -> KmsResult<String> {
    let kcv = cluster.domain_kcv().await.map_err(|e| {
        KmsError::Validation(format!(
            "the key store has no usable domain key (configure so_pin_file): {e}"
        ))
    })?;
    Ok(hex::encode(kcv))
}

/// What the backup MAC key signs for a body.
fn mac_message(mac_key_id: &hsm::MacKeyId, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(MAC_LABEL.len() + 8 + 32);
    m.extend_from_slice(MAC_LABEL);
    m.extend_from_slice(mac_key_id);
    m.extend_from_slice(&Sha256::digest(body));
    m
}

/// A file split into its body and the trailer's MAC key id and tag, before anything is trusted.
struct Framed<'a> {
    body: &'a [u8],
    mac_key_id: hsm::MacKeyId,
    tag: Vec<u8>,
}

fn frame(bytes: &[u8]) -> KmsResult<Framed<'_>> {
    let unframed = || {
        // Say why a backup of the first format is refused, rather than "malformed".
        let first_format = serde_json::from_slice::<serde_json::Value>(bytes)
            .ok()
            .is_some_and(|v| v.get("format").and_then(|f| f.as_str()) == Some(FORMAT_1));
        if first_format {
            bad(format!(
                "this backup is in the format {FORMAT_1}, whose integrity tag anyone with access to the token \
                 directory could forge without a PIN, so hsmkms no longer restores it. The keys it holds are \
                 still on the tokens: make a new backup with `hsmkms backup create` (see docs/backup.md)"
            ))
        } else {
            bad("not an hsmkms backup, or truncated: no MAC trailer at its end")
        }
    };
    let text = bytes.strip_suffix(b"\n").ok_or_else(unframed)?;
    let start = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let (body, trailer) = bytes.split_at(start);
    let trailer = std::str::from_utf8(&trailer[..trailer.len() - 1]).map_err(|_| unframed())?;
    let fields = trailer.strip_prefix(TRAILER).ok_or_else(unframed)?;
    let (id, tag) = fields.split_once(' ').ok_or_else(unframed)?;
    let mac_key_id: hsm::MacKeyId = hex::decode(id)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(unframed)?;
    let tag = hex::decode(tag)
        .ok()
        .filter(|t| t.len() == 32)
        .ok_or_else(unframed)?;
    Ok(Framed {
        body,
        mac_key_id,
        tag,
    })
}

async fn all_keys(parts: &Parts, store_id: &str) -> KmsResult<Vec<KeyRecord>> {
    let mut out = Vec::new();
    let mut after: Option<KeyId> = None;
    loop {
        let store = parts.store.clone();
        let page = tokio::task::spawn_blocking(move || store.list_keys(after.as_ref(), 1000))
            .await
            .map_err(|e| KmsError::Internal(e.to_string()))??;
        let done = page.len() < 1000;
        after = page.last().map(|k| k.key_id);
        out.extend(
            page.into_iter()
                .filter(|k| k.custom_key_store_id == store_id),
        );
        if done {
            return Ok(out);
        }
    }
}

async fn all_aliases(parts: &Parts) -> KmsResult<Vec<AliasRecord>> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let store = parts.store.clone();
        let marker = after.clone();
        let page =
            tokio::task::spawn_blocking(move || store.list_aliases(None, marker.as_deref(), 1000))
                .await
                .map_err(|e| KmsError::Internal(e.to_string()))??;
        let done = page.len() < 1000;
        after = page.last().map(|a| a.name.clone());
        out.extend(page);
        if done {
            return Ok(out);
        }
    }
}

/// Makes a backup of every key of a store (in every state but half-made) and the aliases
/// that point at them.
pub async fn create(parts: &Parts, store: &KeyStore) -> KmsResult<Backup> {
    let cluster = store.connected_cluster()?;
    let record = store.record();
    let domain_kcv = kcv(&cluster).await?;
    // Made on the first backup, and copied to every reachable token that lacks it.
    let (mac_keys, _) = cluster
        .ensure_mac_keys(true)
        .await
        .map_err(KmsError::from_hsm)?;
    let mac_key_id = *mac_keys
        .first()
        .ok_or_else(|| KmsError::Internal("no backup MAC key after making one".into()))?;
    let keys = all_keys(parts, &record.id).await?;
    let mut backed = Vec::with_capacity(keys.len());
    let mut progress = Progress::new("backing up keys", keys.len());
    for k in &keys {
        let wrapped = cluster
            .export_key(k.key_id.bytes())
            .await
            .map_err(KmsError::from_hsm)?;
        backed.push(BackupKey {
            key_id: k.key_id.to_string(),
            created_ms: k.created_ms,
            description: k.description.clone(),
            state: k.state.as_str().to_string(),
            deletion_ms: k.deletion_ms,
            pending_window_days: k.pending_window_days,
            tags: k.tags.clone(),
            wrapped: B64.encode(wrapped),
        });
        progress.step();
    }
    let ids: std::collections::HashSet<KeyId> = keys.iter().map(|k| k.key_id).collect();
    let aliases = all_aliases(parts)
        .await?
        .into_iter()
        .filter(|a| ids.contains(&a.key_id))
        .map(|a| BackupAlias {
            name: a.name,
            key_id: a.key_id.to_string(),
            created_ms: a.created_ms,
            updated_ms: a.updated_ms,
        })
        .collect();
    let file = BackupFile {
        format: FORMAT.into(),
        created_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0),
        key_store_id: record.id.clone(),
        cluster_id: record.cluster_id.clone(),
        domain_kcv,
        keys: backed,
        aliases,
    };
    let mut bytes = serde_json::to_vec_pretty(&file).expect("backup serialises");
    bytes.push(b'\n');
    let tag = cluster
        .mac(mac_key_id, mac_message(&mac_key_id, &bytes))
        .await
        .map_err(KmsError::from_hsm)?;
    bytes.extend_from_slice(
        format!(
            "{TRAILER}{} {}\n",
            hex::encode(mac_key_id),
            hex::encode(tag)
        )
        .as_bytes(),
    );
    Ok(Backup { file, bytes })
}

/// Makes a backup of a store into `out` (mode 0600, written whole or not at all) and records
/// it in the catalogue.
pub async fn create_file(parts: &Parts, store: &KeyStore, out: &Path) -> KmsResult<BackupRecord> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let Backup { file, bytes } = create(parts, store).await?;
    let io =
        |e: std::io::Error| KmsError::Validation(format!("cannot write {}: {e}", out.display()));
    let tmp = out.with_extension("partial");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(&bytes).and_then(|_| f.sync_all()).map_err(io)?;
    std::fs::rename(&tmp, out).map_err(io)?;
    let path = std::fs::canonicalize(out).unwrap_or_else(|_| out.to_path_buf());
    let record = BackupRecord {
        created_ms: file.created_ms,
        path: path.display().to_string(),
        key_store_id: file.key_store_id.clone(),
        keys: file.keys.len(),
        aliases: file.aliases.len(),
        sha256: hex::encode(Sha256::digest(&bytes)),
        domain_kcv: file.domain_kcv.clone(),
    };
    let store = parts.store.clone();
    let put = record.clone();
    tokio::task::spawn_blocking(move || store.record_backup(&put))
        .await
        .map_err(|e| KmsError::Internal(e.to_string()))??;
    Ok(record)
}

/// A catalogued backup and whether its file is still there and unchanged.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ListedBackup {
    #[serde(flatten)]
    pub record: BackupRecord,
    /// OK, MISSING (the file is gone) or CHANGED (its bytes differ from what was written).
    pub file_state: &'static str,
}

/// The backup catalogue, oldest first, each file checked against the digest recorded.
pub fn list(store: &dyn MetadataStore) -> KmsResult<Vec<ListedBackup>> {
    Ok(store
        .backups()?
        .into_iter()
        .map(|record| {
            let file_state = match std::fs::read(&record.path) {
                Err(_) => "MISSING",
                Ok(bytes) if hex::encode(Sha256::digest(&bytes)) == record.sha256 => "OK",
                Ok(_) => "CHANGED",
            };
            ListedBackup { record, file_state }
        })
        .collect())
}

/// Checks a backup against a store's cluster: its MAC first, in a token of the store, then
/// its format and domain key. Nothing of the body is trusted before the MAC verifies.
pub async fn verify(store: &KeyStore, bytes: &[u8]) -> KmsResult<BackupFile> {
    let framed = frame(bytes)?;
    let cluster = store.connected_cluster()?;
    let verified = cluster
        .verify_mac(
            framed.mac_key_id,
            mac_message(&framed.mac_key_id, framed.body),
            framed.tag,
        )
        .await;
    match verified {
        Ok(true) => {}
        Ok(false) => {
            return Err(bad(
                "the backup's MAC does not verify: the file was altered, or forged",
            ))
        }
        Err(hsm::HsmError::KeyNotFound { .. }) => {
            // The body's claim is not trusted, only used to say which mismatch it is.
            let claimed = parse_body(framed.body).map(|f| f.domain_kcv).ok();
            let ours = kcv(&cluster).await.ok();
            if claimed.is_some_and(|c| Some(c) != ours) {
                return Err(bad(
                    "this backup was made for another domain key: it cannot be restored into this cluster",
                ));
            }
            return Err(bad(format!(
                "this backup was authenticated by backup MAC key {}, which no token of key store {} holds: \
                 restore it into the store it was made of, or into tokens that hold that store's domain key \
                 and backup MAC key (docs/backup.md)",
                hex::encode(framed.mac_key_id),
                store.id()
            )));
        }
        Err(e) => return Err(KmsError::from_hsm(e)),
    }
    let file = parse_body(framed.body)?;
    if file.domain_kcv != kcv(&cluster).await? {
        return Err(bad(
            "this backup was made for another domain key: it cannot be restored into this cluster",
        ));
    }
    Ok(file)
}

/// The backup's own claims, NOT verified: only to choose the store to verify it against.
pub fn parse(bytes: &[u8]) -> KmsResult<BackupFile> {
    parse_body(frame(bytes)?.body)
}

fn parse_body(body: &[u8]) -> KmsResult<BackupFile> {
    let file: BackupFile = serde_json::from_slice(body)
        .map_err(|e| bad(format!("not an hsmkms backup, or truncated: {e}")))?;
    if file.format != FORMAT {
        return Err(bad(format!("unknown backup format {:?}", file.format)));
    }
    Ok(file)
}

/// Restores a verified backup: missing keys are added to the metadata in their recorded state,
/// every reachable token gets the keys it lacks, missing aliases come back. Idempotent.
pub async fn restore(
    parts: &Parts,
    store: &KeyStore,
    bytes: &[u8],
    dry_run: bool,
) -> KmsResult<RestoreReport> {
    // Nothing is imported or recorded before this: the MAC is the only proof that the wrapped
    // keys came from a token of the store.
    let file = verify(store, bytes).await?;
    let cluster = store.connected_cluster()?;
    let mut report = RestoreReport {
        dry_run,
        keys_in_backup: file.keys.len(),
        ..Default::default()
    };
    let store_id = store.id();
    let mut progress = Progress::new(
        if dry_run {
            "checking keys (dry run)"
        } else {
            "restoring keys"
        },
        file.keys.len(),
    );
    for k in &file.keys {
        let key_id =
            KeyId::parse(&k.key_id).ok_or_else(|| bad(format!("malformed key id {}", k.key_id)))?;
        let wrapped = B64
            .decode(&k.wrapped)
            .map_err(|_| bad("malformed wrapped key"))?;
        if !dry_run {
            // Before the copies: a prober that saw them beside the tombstone of a key deleted
            // since the backup would destroy them.
            let store = parts.store.clone();
            tokio::task::spawn_blocking(move || store.clear_tombstone(&key_id))
                .await
                .map_err(|e| KmsError::Internal(e.to_string()))??;
        }
        for token in cluster.tokens().iter().filter(|t| t.is_up()) {
            if !token
                .has_key(key_id.bytes())
                .await
                .map_err(KmsError::from_hsm)?
            {
                if !dry_run {
                    token
                        .import_key(key_id.bytes(), wrapped.clone())
                        .await
                        .map_err(KmsError::from_hsm)?;
                }
                report.token_copies += 1;
            }
        }
        let record = KeyRecord {
            key_id,
            created_ms: k.created_ms,
            description: k.description.clone(),
            state: KeyState::parse(&k.state)?,
            deletion_ms: k.deletion_ms,
            pending_window_days: k.pending_window_days,
            custom_key_store_id: store_id.clone(),
            tags: k.tags.clone(),
        };
        let store = parts.store.clone();
        let present = {
            let s = store.clone();
            tokio::task::spawn_blocking(move || s.get_key(&key_id))
                .await
                .map_err(|e| KmsError::Internal(e.to_string()))??
                .is_some()
        };
        if present {
            report.keys_already_present += 1;
        } else {
            if !dry_run {
                tokio::task::spawn_blocking(move || store.restore_key(&record))
                    .await
                    .map_err(|e| KmsError::Internal(e.to_string()))??;
            }
            report.keys_added += 1;
        }
        progress.step();
    }
    for a in &file.aliases {
        let key_id =
            KeyId::parse(&a.key_id).ok_or_else(|| bad(format!("malformed key id {}", a.key_id)))?;
        let alias = AliasRecord {
            name: a.name.clone(),
            key_id,
            created_ms: a.created_ms,
            updated_ms: a.updated_ms,
        };
        let store = parts.store.clone();
        let name = a.name.clone();
        let exists = tokio::task::spawn_blocking(move || store.get_alias(&name))
            .await
            .map_err(|e| KmsError::Internal(e.to_string()))??
            .is_some();
        if exists {
            report.aliases_already_present += 1;
        } else {
            if !dry_run {
                let store = parts.store.clone();
                tokio::task::spawn_blocking(move || store.create_alias(&alias))
                    .await
                    .map_err(|e| KmsError::Internal(e.to_string()))??;
            }
            report.aliases_added += 1;
        }
    }
    Ok(report)
}
