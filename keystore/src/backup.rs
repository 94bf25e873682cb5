//! Backups: one file with the key metadata and every key's material wrapped by the cluster's
//! domain key inside a token, the domain key's check value, and an integrity tag made in the
//! token. A backup never holds plaintext key material; it restores only into a cluster whose
//! tokens hold the same domain key. See docs/backup.md.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::app::Parts;
use crate::error::{KmsError, KmsResult};
use crate::ids::KeyId;
use crate::store::{AliasRecord, KeyRecord, KeyState, MetadataStore};

const FORMAT: &str = "hsmkms-backup-1";

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
    /// Hex of the domain key's wrap of the SHA-256 of this file with `tag` empty.
    pub tag: String,
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

async fn kcv(parts: &Parts) -> KmsResult<String> {
    let sealed = parts
        .service
        .cluster()
        .domain_seal([0u8; 32])
        .await
        .map_err(|e| {
            KmsError::Validation(format!(
                "the key store has no usable domain key (configure so_pin_file): {e}"
            ))
        })?;
    Ok(hex::encode(&sealed[..8]))
}

fn digest(file: &BackupFile) -> [u8; 32] {
    let mut unsigned = file.clone();
    unsigned.tag = String::new();
    Sha256::digest(serde_json::to_vec(&unsigned).expect("backup serialises")).into()
}

async fn all_keys(parts: &Parts) -> KmsResult<Vec<KeyRecord>> {
    let mut out = Vec::new();
    let mut after: Option<KeyId> = None;
    loop {
        let store = parts.store.clone();
        let page = tokio::task::spawn_blocking(move || store.list_keys(after.as_ref(), 1000))
            .await
            .map_err(|e| KmsError::Internal(e.to_string()))??;
        let done = page.len() < 1000;
        after = page.last().map(|k| k.key_id);
        out.extend(page);
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

/// Makes a backup of every key (in every state but half-made) and alias.
pub async fn create(parts: &Parts) -> KmsResult<BackupFile> {
    let domain_kcv = kcv(parts).await?;
    let keys = all_keys(parts).await?;
    let mut backed = Vec::with_capacity(keys.len());
    for (i, k) in keys.iter().enumerate() {
        let wrapped = parts
            .service
            .cluster()
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
        if (i + 1) % 100 == 0 || i + 1 == keys.len() {
            tracing::info!(done = i + 1, of = keys.len(), "backing up keys");
        }
    }
    let aliases = all_aliases(parts)
        .await?
        .into_iter()
        .map(|a| BackupAlias {
            name: a.name,
            key_id: a.key_id.to_string(),
            created_ms: a.created_ms,
            updated_ms: a.updated_ms,
        })
        .collect();
    let info = parts.service.key_store();
    let mut file = BackupFile {
        format: FORMAT.into(),
        created_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0),
        key_store_id: info.id.clone(),
        cluster_id: info.cluster_id.clone(),
        domain_kcv,
        keys: backed,
        aliases,
        tag: String::new(),
    };
    let tag = parts
        .service
        .cluster()
        .domain_seal(digest(&file))
        .await
        .map_err(KmsError::from_hsm)?;
    file.tag = hex::encode(tag);
    Ok(file)
}

/// Parses and checks a backup against this cluster: format, domain key, integrity tag.
pub async fn verify(parts: &Parts, bytes: &[u8]) -> KmsResult<BackupFile> {
    let file: BackupFile = serde_json::from_slice(bytes)
        .map_err(|e| bad(format!("not an hsmkms backup, or truncated: {e}")))?;
    if file.format != FORMAT {
        return Err(bad(format!("unknown backup format {:?}", file.format)));
    }
    if file.domain_kcv != kcv(parts).await? {
        return Err(bad(
            "this backup was made for another domain key: it cannot be restored into this cluster",
        ));
    }
    let tag = parts
        .service
        .cluster()
        .domain_seal(digest(&file))
        .await
        .map_err(KmsError::from_hsm)?;
    if hex::encode(tag) != file.tag {
        return Err(bad(
            "the backup's integrity tag does not match: it was altered",
        ));
    }
    Ok(file)
}

/// Restores a verified backup: missing keys are added to the metadata in their recorded state,
/// every reachable token gets the keys it lacks, missing aliases come back. Idempotent.
pub async fn restore(parts: &Parts, bytes: &[u8], dry_run: bool) -> KmsResult<RestoreReport> {
    let file = verify(parts, bytes).await?;
    let mut report = RestoreReport {
        dry_run,
        keys_in_backup: file.keys.len(),
        ..Default::default()
    };
    let store_id = parts.service.key_store().id.clone();
    for (i, k) in file.keys.iter().enumerate() {
        let key_id =
            KeyId::parse(&k.key_id).ok_or_else(|| bad(format!("malformed key id {}", k.key_id)))?;
        let wrapped = B64
            .decode(&k.wrapped)
            .map_err(|_| bad("malformed wrapped key"))?;
        for token in parts
            .service
            .cluster()
            .tokens()
            .iter()
            .filter(|t| t.is_up())
        {
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
        if (i + 1) % 100 == 0 || i + 1 == file.keys.len() {
            tracing::info!(
                done = i + 1,
                of = file.keys.len(),
                dry_run,
                "restoring keys"
            );
        }
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
