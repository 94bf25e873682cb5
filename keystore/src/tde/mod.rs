//! Transparent data encryption keys for databases, served over HashiCorp Vault's KV v2 API.
//!
//! A TDE key is a numbered secret (MariaDB's key ids) with versions. Each version's material is
//! made by GenerateDataKeyWithoutPlaintext under a KMS key and stored only wrapped, bound by
//! encryption context to its client, id and version; it is unwrapped in the token for each read
//! and exists in the clear only in the response to the database. The KMS key never rotates; the
//! table keys do, by adding versions. A client (a database) authenticates with a Vault-style
//! token and reads only its own keys.

pub mod front;
mod store;

use std::collections::BTreeMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::clock::Clock;
use crate::error::{KmsError, KmsResult};
use crate::ids::KeyId;
use crate::service::Service;
use crate::store::SqliteStore;
use crate::wire::{Blob, DecryptRequest, GenerateDataKeyRequest};

pub use store::{TdeKeyRecord, TdeVersion};

/// A TDE key as the CLI reports it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct TdeKeyInfo {
    pub client: String,
    pub id: u32,
    pub latest_version: u32,
    pub enabled: bool,
    pub kms_key_id: String,
    pub bytes: usize,
}

/// The client a token belongs to.
#[derive(Debug, Clone)]
pub struct TdeClient {
    pub name: String,
    pub created_ms: i64,
}

/// One version of a TDE key as read: the material (secret) and its metadata.
pub struct TdeSecret {
    pub material: Zeroizing<Vec<u8>>,
    pub version: u32,
    pub created_ms: i64,
}

/// Why a read was not answered with a key.
#[derive(Debug, PartialEq, Eq)]
pub enum TdeError {
    /// No such token, or revoked; or the KMS key behind the TDE key is disabled.
    Forbidden,
    /// No such key id or version for this client, or the TDE key is disabled.
    NotFound,
    /// The tokens cannot serve, or something failed inside: no authoritative answer exists.
    Unavailable(String),
}

/// Client names: what a token is issued to.
fn check_client_name(name: &str) -> KmsResult<()> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !ok {
        return Err(KmsError::Validation(format!(
            "client name {name:?} must be 1 to 64 letters, digits, '-', '_' or '.'"
        )));
    }
    Ok(())
}

fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The encryption context that binds a wrapped version to its place: a row copied to another
/// client, id or version does not unwrap.
fn binding(client: &str, id: u32, version: u32) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("hsmkms:tde-client".to_string(), client.to_string()),
        ("hsmkms:tde-key-id".to_string(), id.to_string()),
        ("hsmkms:tde-version".to_string(), version.to_string()),
    ])
}

pub struct Tde {
    service: Arc<Service>,
    store: Arc<SqliteStore>,
    clock: Arc<dyn Clock>,
}

impl Tde {
    pub fn new(service: Arc<Service>, store: Arc<SqliteStore>, clock: Arc<dyn Clock>) -> Tde {
        Tde {
            service,
            store,
            clock,
        }
    }

    async fn db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&SqliteStore) -> KmsResult<T> + Send + 'static,
    ) -> KmsResult<T> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| KmsError::Internal(format!("metadata task failed: {e}")))?
    }

    /// The service clock's time (Vault's health reports the server's).
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Issues a token for a new client. The token is returned once; only its SHA-256 is kept.
    pub async fn create_client(&self, name: &str) -> KmsResult<Zeroizing<String>> {
        check_client_name(name)?;
        let token = Zeroizing::new(format!(
            "hvs.{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        ));
        let (name, digest, now) = (name.to_string(), token_digest(&token), self.clock.now_ms());
        self.db(move |s| s.tde_create_client(&name, &digest, now))
            .await?;
        Ok(token)
    }

    pub async fn revoke_client(&self, name: &str) -> KmsResult<()> {
        let name = name.to_string();
        self.db(move |s| s.tde_revoke_client(&name)).await
    }

    fn check_id(id: u32) -> KmsResult<()> {
        if id == 0 {
            return Err(KmsError::Validation("TDE key ids start at 1".into()));
        }
        Ok(())
    }

    /// Wraps fresh material for `version` under the KMS key; returns the blob and the key's id.
    async fn wrap_new_material(
        &self,
        kms_key: &str,
        client: &str,
        id: u32,
        version: u32,
        bytes: usize,
    ) -> KmsResult<(Vec<u8>, KeyId)> {
        let generated = self
            .service
            .generate_data_key(
                GenerateDataKeyRequest {
                    key_id: kms_key.to_string(),
                    encryption_context: Some(binding(client, id, version)),
                    number_of_bytes: Some(bytes as i64),
                    key_spec: None,
                    grant_tokens: None,
                    recipient: None,
                    dry_run: None,
                },
                false,
            )
            .await?;
        let kms_id =
            KeyId::parse(generated.key_id.rsplit('/').next().unwrap_or("")).ok_or_else(|| {
                KmsError::Internal("GenerateDataKey returned a malformed key ARN".into())
            })?;
        Ok((generated.ciphertext_blob.0, kms_id))
    }

    pub async fn create_key(
        &self,
        client: &str,
        id: u32,
        kms_key: &str,
        bytes: usize,
    ) -> KmsResult<TdeKeyInfo> {
        check_client_name(client)?;
        Self::check_id(id)?;
        // MariaDB accepts 16, 24 and 32 bytes (AES-128/192/256); other sizes crash or are refused.
        if ![16, 24, 32].contains(&bytes) {
            return Err(KmsError::Validation(
                "TDE keys are 16, 24 or 32 bytes".into(),
            ));
        }
        let (wrapped, kms_id) = self
            .wrap_new_material(kms_key, client, id, 1, bytes)
            .await?;
        let record = TdeKeyRecord {
            client: client.to_string(),
            id,
            kms_key_id: kms_id,
            bytes,
            enabled: true,
            created_ms: self.clock.now_ms(),
        };
        let first = TdeVersion {
            version: 1,
            wrapped,
            created_ms: record.created_ms,
        };
        let stored = record.clone();
        self.db(move |s| s.tde_create_key(&stored, &first)).await?;
        Ok(self.info(&record, 1))
    }

    fn info(&self, key: &TdeKeyRecord, latest_version: u32) -> TdeKeyInfo {
        TdeKeyInfo {
            client: key.client.clone(),
            id: key.id,
            latest_version,
            enabled: key.enabled,
            kms_key_id: self.service.scope().key_arn(&key.kms_key_id),
            bytes: key.bytes,
        }
    }

    async fn key(&self, client: &str, id: u32) -> KmsResult<(TdeKeyRecord, u32)> {
        let c = client.to_string();
        self.db(move |s| s.tde_key(&c, id)).await?.ok_or_else(|| {
            KmsError::NotFound(format!("TDE key {id} of client {client} does not exist"))
        })
    }

    /// Adds a version with fresh material under the same KMS key: the table key rotates, the
    /// KMS key does not.
    pub async fn rotate_key(&self, client: &str, id: u32) -> KmsResult<TdeKeyInfo> {
        let (key, latest) = self.key(client, id).await?;
        let version = latest + 1;
        let arn = self.service.scope().key_arn(&key.kms_key_id);
        let (wrapped, _) = self
            .wrap_new_material(&arn, client, id, version, key.bytes)
            .await?;
        let added = TdeVersion {
            version,
            wrapped,
            created_ms: self.clock.now_ms(),
        };
        let (c, previous) = (client.to_string(), latest);
        // Refused if another rotation added `version` meanwhile: versions never change once made.
        self.db(move |s| s.tde_add_version(&c, id, previous, &added))
            .await?;
        Ok(self.info(&key, version))
    }

    pub async fn set_enabled(&self, client: &str, id: u32, enabled: bool) -> KmsResult<TdeKeyInfo> {
        let c = client.to_string();
        self.db(move |s| s.tde_set_enabled(&c, id, enabled)).await?;
        let (key, latest) = self.key(client, id).await?;
        Ok(self.info(&key, latest))
    }

    pub async fn list(&self, client: Option<&str>) -> KmsResult<Vec<TdeKeyInfo>> {
        let c = client.map(str::to_string);
        let keys = self.db(move |s| s.tde_list(c.as_deref())).await?;
        Ok(keys
            .iter()
            .map(|(k, latest)| self.info(k, *latest))
            .collect())
    }

    /// The client a token was issued to, unless it is unknown or revoked.
    pub async fn authenticate(&self, token: &str) -> Result<String, TdeError> {
        Ok(self.token_owner(token).await?.name)
    }

    /// The client a token was issued to, with when, unless it is unknown or revoked.
    pub async fn token_owner(&self, token: &str) -> Result<TdeClient, TdeError> {
        let digest = token_digest(token);
        self.db(move |s| s.tde_client_by_token(&digest))
            .await
            .map_err(|e| TdeError::Unavailable(e.to_string()))?
            .map(|(name, created_ms)| TdeClient { name, created_ms })
            .ok_or(TdeError::Forbidden)
    }

    /// What a database reads: the key material of `id` at `version` (latest if none), for the
    /// client the token belongs to.
    pub async fn read(
        &self,
        token: &str,
        id: u32,
        version: Option<u32>,
    ) -> Result<(Zeroizing<Vec<u8>>, u32), TdeError> {
        let secret = self.read_secret(token, id, version).await?;
        Ok((secret.material, secret.version))
    }

    /// As [`Tde::read`], with the version's metadata (Vault's KV v2 read answers it).
    pub async fn read_secret(
        &self,
        token: &str,
        id: u32,
        version: Option<u32>,
    ) -> Result<TdeSecret, TdeError> {
        let internal = |e: KmsError| TdeError::Unavailable(e.to_string());
        let client = self.authenticate(token).await?;
        let c = client.clone();
        let found = self
            .db(move |s| s.tde_read(&c, id, version))
            .await
            .map_err(internal)?;
        let Some((key, stored)) = found else {
            return Err(TdeError::NotFound);
        };
        if !key.enabled {
            return Err(TdeError::NotFound);
        }
        let request = DecryptRequest {
            ciphertext_blob: Blob(stored.wrapped),
            key_id: Some(self.service.scope().key_arn(&key.kms_key_id)),
            encryption_context: Some(binding(&client, id, stored.version)),
            encryption_algorithm: None,
            grant_tokens: None,
            recipient: None,
            dry_run: None,
        };
        match self.service.decrypt(request).await {
            Ok(answer) => Ok(TdeSecret {
                material: answer.plaintext.0,
                version: stored.version,
                created_ms: stored.created_ms,
            }),
            // The KMS key was disabled or scheduled for deletion: access is withdrawn.
            Err(KmsError::Disabled(_) | KmsError::InvalidState(_)) => Err(TdeError::Forbidden),
            Err(KmsError::NotFound(_)) => Err(TdeError::NotFound),
            // A disconnected key store is an outage the operator chose, not a verdict on the
            // key: MariaDB should ride it out on its cache (a 403 would abort it).
            Err(e @ KmsError::KeyUnavailable(_)) => Err(TdeError::Unavailable(e.to_string())),
            Err(e) => Err(TdeError::Unavailable(e.to_string())),
        }
    }
}
