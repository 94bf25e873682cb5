//! TDE clients, keys and versions in the metadata database.

use rusqlite::{params, OptionalExtension};

use crate::error::{KmsError, KmsResult};
use crate::ids::KeyId;
use crate::store::SqliteStore;

#[derive(Debug, Clone)]
pub struct TdeKeyRecord {
    pub client: String,
    pub id: u32,
    pub kms_key_id: KeyId,
    pub bytes: usize,
    pub enabled: bool,
    pub created_ms: i64,
}

#[derive(Debug, Clone)]
pub struct TdeVersion {
    pub version: u32,
    /// A KMS ciphertext of the key material.
    pub wrapped: Vec<u8>,
    pub created_ms: i64,
}

fn key_id(bytes: Vec<u8>) -> KmsResult<KeyId> {
    bytes
        .try_into()
        .map(KeyId)
        .map_err(|_| KmsError::Internal("malformed key id in TDE metadata".into()))
}

type KeyRow = (String, u32, Vec<u8>, i64, bool, i64, u32);

fn key_row(r: &rusqlite::Row) -> rusqlite::Result<KeyRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
    ))
}

fn key_record(
    (client, id, kms, bytes, enabled, created_ms, latest): KeyRow,
) -> KmsResult<(TdeKeyRecord, u32)> {
    Ok((
        TdeKeyRecord {
            client,
            id,
            kms_key_id: key_id(kms)?,
            bytes: bytes as usize,
            enabled,
            created_ms,
        },
        latest,
    ))
}

const KEY_SELECT: &str = "SELECT k.client, k.id, k.kms_key_id, k.bytes, k.enabled, k.created_ms, \
     (SELECT MAX(version) FROM tde_versions v WHERE v.client = k.client AND v.id = k.id) FROM tde_keys k";

impl SqliteStore {
    pub(crate) fn tde_create_client(
        &self,
        name: &str,
        token_sha256: &[u8; 32],
        now_ms: i64,
    ) -> KmsResult<()> {
        self.write(|tx| {
            let n = tx.execute(
                "INSERT INTO tde_clients (name, token_sha256, created_ms) VALUES (?1, ?2, ?3) ON CONFLICT(name) DO NOTHING",
                params![name, &token_sha256[..], now_ms],
            )?;
            if n == 0 {
                return Err(KmsError::AlreadyExists(format!("TDE client {name} already exists")));
            }
            Ok(())
        })
    }

    pub(crate) fn tde_revoke_client(&self, name: &str) -> KmsResult<()> {
        self.write(|tx| {
            if tx.execute(
                "UPDATE tde_clients SET revoked = 1 WHERE name = ?1",
                params![name],
            )? == 0
            {
                return Err(KmsError::NotFound(format!(
                    "TDE client {name} does not exist"
                )));
            }
            Ok(())
        })
    }

    /// The client (name, created_ms) a token was issued to, unless revoked.
    pub(crate) fn tde_client_by_token(
        &self,
        token_sha256: &[u8; 32],
    ) -> KmsResult<Option<(String, i64)>> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT name, created_ms FROM tde_clients WHERE token_sha256 = ?1 AND revoked = 0",
                )?
                .query_row(params![&token_sha256[..]], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?)
        })
    }

    pub(crate) fn tde_create_key(
        &self,
        key: &TdeKeyRecord,
        first: &super::TdeVersion,
    ) -> KmsResult<()> {
        self.write(|tx| {
            let clients: i64 = tx.query_row(
                "SELECT COUNT(*) FROM tde_clients WHERE name = ?1 AND revoked = 0",
                params![key.client],
                |r| r.get(0),
            )?;
            if clients == 0 {
                return Err(KmsError::NotFound(format!("TDE client {} does not exist or is revoked", key.client)));
            }
            let n = tx.execute(
                "INSERT INTO tde_keys (client, id, kms_key_id, bytes, enabled, created_ms) VALUES (?1, ?2, ?3, ?4, 1, ?5) \
                 ON CONFLICT(client, id) DO NOTHING",
                params![key.client, key.id, &key.kms_key_id.0[..], key.bytes as i64, key.created_ms],
            )?;
            if n == 0 {
                return Err(KmsError::AlreadyExists(format!("TDE key {} of client {} already exists", key.id, key.client)));
            }
            tx.execute(
                "INSERT INTO tde_versions (client, id, version, wrapped, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![key.client, key.id, first.version, first.wrapped, first.created_ms],
            )?;
            Ok(())
        })
    }

    pub(crate) fn tde_add_version(
        &self,
        client: &str,
        id: u32,
        previous: u32,
        added: &super::TdeVersion,
    ) -> KmsResult<()> {
        self.write(|tx| {
            let latest: Option<u32> = tx.query_row(
                "SELECT MAX(version) FROM tde_versions WHERE client = ?1 AND id = ?2",
                params![client, id],
                |r| r.get(0),
            )?;
            if latest != Some(previous) {
                return Err(KmsError::InvalidState(format!(
                    "TDE key {id} of client {client} changed during the rotation; try again"
                )));
            }
            tx.execute(
                "INSERT INTO tde_versions (client, id, version, wrapped, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![client, id, added.version, added.wrapped, added.created_ms],
            )?;
            Ok(())
        })
    }

    pub(crate) fn tde_set_enabled(&self, client: &str, id: u32, enabled: bool) -> KmsResult<()> {
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE tde_keys SET enabled = ?3 WHERE client = ?1 AND id = ?2",
                params![client, id, enabled],
            )?;
            if n == 0 {
                return Err(KmsError::NotFound(format!(
                    "TDE key {id} of client {client} does not exist"
                )));
            }
            Ok(())
        })
    }

    pub(crate) fn tde_key(&self, client: &str, id: u32) -> KmsResult<Option<(TdeKeyRecord, u32)>> {
        self.read(|conn| {
            let row = conn
                .prepare_cached(&format!("{KEY_SELECT} WHERE k.client = ?1 AND k.id = ?2"))?
                .query_row(params![client, id], key_row)
                .optional()?;
            row.map(key_record).transpose()
        })
    }

    pub(crate) fn tde_list(&self, client: Option<&str>) -> KmsResult<Vec<(TdeKeyRecord, u32)>> {
        self.read(|conn| {
            let rows = match client {
                Some(c) => conn
                    .prepare_cached(&format!(
                        "{KEY_SELECT} WHERE k.client = ?1 ORDER BY k.client, k.id"
                    ))?
                    .query_map(params![c], key_row)?
                    .collect::<Result<Vec<_>, _>>()?,
                None => conn
                    .prepare_cached(&format!("{KEY_SELECT} ORDER BY k.client, k.id"))?
                    .query_map([], key_row)?
                    .collect::<Result<Vec<_>, _>>()?,
            };
            rows.into_iter().map(key_record).collect()
        })
    }

    /// The key and the requested version (latest when `version` is `None`).
    pub(crate) fn tde_read(
        &self,
        client: &str,
        id: u32,
        version: Option<u32>,
    ) -> KmsResult<Option<(TdeKeyRecord, super::TdeVersion)>> {
        let Some((key, latest)) = self.tde_key(client, id)? else {
            return Ok(None);
        };
        let wanted = version.unwrap_or(latest);
        self.read(|conn| {
            let row = conn
                .prepare_cached(
                    "SELECT version, wrapped, created_ms FROM tde_versions WHERE client = ?1 AND id = ?2 AND version = ?3",
                )?
                .query_row(params![client, id, wanted], |r| {
                    Ok(super::TdeVersion { version: r.get(0)?, wrapped: r.get(1)?, created_ms: r.get(2)? })
                })
                .optional()?;
            Ok(row.map(|v| (key, v)))
        })
    }
}
