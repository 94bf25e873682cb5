//! The service core: every KMS operation, whatever front it arrives through.
//!
//! Fronts translate their wire format into these calls and nothing more: every check (key state,
//! sizes, algorithms, encryption context) is made here, once.

use std::collections::BTreeMap;
use std::sync::Arc;

use hsm::Cluster;
use zeroize::Zeroizing;

use crate::ciphertext::CiphertextBlob;
use crate::clock::{epoch_seconds, Clock};
use crate::context::EncryptionContext;
use crate::error::{KmsError, KmsResult};
use crate::ids::{validate_alias_name, ArnScope, KeyId, KeyReference};
use crate::store::{AliasRecord, KeyRecord, KeyState, MetadataStore};
use crate::wire::*;

pub const MAX_PLAINTEXT: usize = 4096;
pub const MAX_DATA_KEY_BYTES: i64 = 1024;
pub const MAX_TAGS: usize = 50;
const SYMMETRIC_DEFAULT: &str = "SYMMETRIC_DEFAULT";
const DAY_MS: i64 = 86_400_000;

/// The custom key store that this service's keys live in.
#[derive(Debug, Clone)]
pub struct KeyStoreInfo {
    pub id: String,
    pub name: String,
    pub cluster_id: String,
    /// CreateKey succeeds once the key is on this many tokens.
    pub min_tokens: usize,
}

/// What one pass of the token prober did.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeReport {
    pub at_ms: i64,
    /// Keys copied to a token that missed them (it was down when they were made).
    pub copied: usize,
    /// Keys destroyed on a token that missed their deletion.
    pub destroyed: usize,
    /// Tokens that could not be reached in this pass.
    pub unreachable: Vec<String>,
}

const CONNECTED_SETTING: &str = "key_store_connected";

pub struct Service {
    last_probe: std::sync::Mutex<Option<ProbeReport>>,
    /// DisconnectCustomKeyStore turns this off: the store's keys are Unavailable until
    /// ConnectCustomKeyStore. Kept in the metadata, so it survives restarts.
    connected: std::sync::atomic::AtomicBool,
    scope: ArnScope,
    store: Arc<dyn MetadataStore>,
    cluster: Arc<Cluster>,
    key_store: KeyStoreInfo,
    clock: Arc<dyn Clock>,
}

fn refuse_rotation() -> KmsError {
    KmsError::UnsupportedOperation(
        "Keys in a custom key store (origin AWS_CLOUDHSM) cannot rotate automatically or on demand. \
         Rotate manually: create a new key and move the alias to it with UpdateAlias \
         (`hsmkms key rotate-manually ALIAS` does both); the old key keeps decrypting old ciphertexts."
            .into(),
    )
}

fn check_algorithm(algorithm: Option<&str>) -> KmsResult<&'static str> {
    match algorithm {
        None | Some(SYMMETRIC_DEFAULT) => Ok(SYMMETRIC_DEFAULT),
        Some(a @ ("RSAES_OAEP_SHA_1" | "RSAES_OAEP_SHA_256" | "SM2PKE")) => Err(KmsError::InvalidKeyUsage(format!(
            "{a} is an asymmetric encryption algorithm; this key is symmetric and supports only SYMMETRIC_DEFAULT"
        ))),
        Some(other) => Err(KmsError::Validation(format!(
            "EncryptionAlgorithm {other} is not one of SYMMETRIC_DEFAULT, RSAES_OAEP_SHA_1, RSAES_OAEP_SHA_256, SM2PKE"
        ))),
    }
}

fn check_tags(tags: &[Tag]) -> KmsResult<()> {
    for t in tags {
        if t.tag_key.is_empty() || t.tag_key.chars().count() > 128 {
            return Err(KmsError::Validation(
                "TagKey must be 1 to 128 characters long".into(),
            ));
        }
        if t.tag_value.chars().count() > 256 {
            return Err(KmsError::Validation(
                "TagValue must be at most 256 characters long".into(),
            ));
        }
        if t.tag_key.starts_with("aws:") {
            return Err(KmsError::TagException(
                "Tag keys beginning with aws: are reserved for AWS".into(),
            ));
        }
    }
    Ok(())
}

fn check_description(d: &str) -> KmsResult<()> {
    if d.chars().count() > 8192 {
        return Err(KmsError::Validation(
            "Description must be at most 8192 characters long".into(),
        ));
    }
    Ok(())
}

fn page_limit(limit: Option<i64>, max: i64, default: i64) -> KmsResult<usize> {
    match limit {
        None => Ok(default as usize),
        Some(n) if (1..=max).contains(&n) => Ok(n as usize),
        Some(n) => Err(KmsError::Validation(format!(
            "Limit {n} is not between 1 and {max}"
        ))),
    }
}

fn dry_run(flag: Option<bool>) -> KmsResult<()> {
    if flag == Some(true) {
        return Err(KmsError::DryRun(
            "The request would have succeeded, but the DryRun flag is set.".into(),
        ));
    }
    Ok(())
}

impl Service {
    pub fn new(
        scope: ArnScope,
        store: Arc<dyn MetadataStore>,
        cluster: Arc<Cluster>,
        key_store: KeyStoreInfo,
        clock: Arc<dyn Clock>,
    ) -> Service {
        let connected = store.setting(CONNECTED_SETTING).ok().flatten().as_deref() != Some("false");
        Service {
            last_probe: std::sync::Mutex::new(None),
            connected: std::sync::atomic::AtomicBool::new(connected),
            scope,
            store,
            cluster,
            key_store,
            clock,
        }
    }

    pub fn scope(&self) -> &ArnScope {
        &self.scope
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    pub fn key_store(&self) -> &KeyStoreInfo {
        &self.key_store
    }

    /// Runs a metadata call on the blocking pool: SQLite must not stall the async workers.
    async fn db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn MetadataStore) -> KmsResult<T> + Send + 'static,
    ) -> KmsResult<T> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&*store))
            .await
            .map_err(|e| KmsError::Internal(format!("metadata task failed: {e}")))?
    }

    fn arn(&self, id: &KeyId) -> String {
        self.scope.key_arn(id)
    }

    fn not_found(&self, id: &KeyId) -> KmsError {
        KmsError::NotFound(format!("Key '{}' does not exist", self.arn(id)))
    }

    /// Finds the key a `KeyId` parameter names; aliases only where AWS accepts them.
    async fn resolve(&self, reference: &str, allow_alias: bool) -> KmsResult<Arc<KeyRecord>> {
        let id = match self.scope.parse_reference(reference)? {
            KeyReference::Key(id) => id,
            KeyReference::Alias(name) if allow_alias => {
                let lookup = name.clone();
                let alias = match self.store.cached_alias(&name) {
                    Some(hit) => Some(hit),
                    None => self.db(move |s| s.get_alias(&lookup)).await?,
                };
                alias
                    .ok_or_else(|| {
                        KmsError::NotFound(format!(
                            "Alias {} is not found.",
                            self.scope.alias_arn(&name)
                        ))
                    })?
                    .key_id
            }
            KeyReference::Alias(_) => {
                return Err(KmsError::Validation(format!(
                    "{reference} is an alias; this operation takes a key ID or key ARN"
                )))
            }
        };
        self.key(id).await
    }

    async fn key(&self, id: KeyId) -> KmsResult<Arc<KeyRecord>> {
        self.find_key(id).await?.ok_or_else(|| self.not_found(&id))
    }

    /// The hot path: from the store's cache when it is current, else from the blocking pool.
    async fn find_key(&self, id: KeyId) -> KmsResult<Option<Arc<KeyRecord>>> {
        if let Some(hit) = self.store.cached_key(&id) {
            return Ok(Some(hit));
        }
        Ok(self.db(move |s| s.get_key(&id)).await?.map(Arc::new))
    }

    /// Cryptographic operations need an enabled key.
    fn is_connected(&self) -> bool {
        self.connected.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn require_connected(&self) -> KmsResult<()> {
        if !self.is_connected() {
            return Err(KmsError::CustomKeyStoreInvalidState(format!(
                "Custom key store {} is disconnected; connect it with ConnectCustomKeyStore",
                self.key_store.id
            )));
        }
        Ok(())
    }

    fn require_enabled(&self, key: &KeyRecord) -> KmsResult<()> {
        if !self.is_connected() && key.state != KeyState::Creating {
            return Err(KmsError::KeyUnavailable(format!(
                "{} is unavailable: its custom key store {} is disconnected.",
                self.arn(&key.key_id),
                self.key_store.id
            )));
        }
        match key.state {
            KeyState::Enabled => Ok(()),
            KeyState::Disabled => Err(KmsError::Disabled(format!(
                "{} is disabled.",
                self.arn(&key.key_id)
            ))),
            KeyState::PendingDeletion => Err(KmsError::InvalidState(format!(
                "{} is pending deletion.",
                self.arn(&key.key_id)
            ))),
            KeyState::Creating => Err(self.not_found(&key.key_id)),
        }
    }

    fn metadata(&self, key: &KeyRecord) -> KeyMetadata {
        KeyMetadata {
            aws_account_id: self.scope.account.clone(),
            key_id: key.key_id.to_string(),
            arn: self.arn(&key.key_id),
            creation_date: epoch_seconds(key.created_ms),
            enabled: key.state == KeyState::Enabled && self.is_connected(),
            description: key.description.clone(),
            key_usage: "ENCRYPT_DECRYPT",
            // As AWS: keys of a disconnected custom key store are Unavailable.
            key_state: if self.is_connected() {
                key.state.as_str()
            } else {
                "Unavailable"
            },
            deletion_date: key.deletion_ms.map(epoch_seconds),
            origin: "AWS_CLOUDHSM",
            custom_key_store_id: key.custom_key_store_id.clone(),
            cloud_hsm_cluster_id: self.key_store.cluster_id.clone(),
            key_manager: "CUSTOMER",
            customer_master_key_spec: SYMMETRIC_DEFAULT,
            key_spec: SYMMETRIC_DEFAULT,
            encryption_algorithms: vec![SYMMETRIC_DEFAULT],
            multi_region: false,
        }
    }

    /// The prober's pass over the tokens: pings each (a token that came back is used again),
    /// copies to each reachable token the keys it lacks (made while it was down) from a token
    /// that has them, and destroys keys the metadata no longer knows (deleted while it was down).
    pub async fn probe_tokens(&self) -> KmsResult<ProbeReport> {
        let mut report = ProbeReport {
            at_ms: self.clock.now_ms(),
            ..Default::default()
        };
        let tokens = self.cluster.tokens();
        for t in tokens {
            if t.ping().await.is_err() {
                report.unreachable.push(t.label().to_string());
            }
        }
        if tokens.len() > 1 {
            // Read the metadata before the tokens: a key created in between is on the tokens
            // but not in `known`, and must not be taken for a deleted one; so only keys older
            // than this listing are destroyed (the next pass sees the rest).
            let known: std::collections::HashSet<[u8; 16]> = self
                .db(|s| s.all_key_ids())
                .await?
                .into_iter()
                .map(|k| k.bytes())
                .collect();
            let mut listings = Vec::new();
            for t in tokens.iter().filter(|t| t.is_up()) {
                match t.list_keys().await {
                    Ok(ids) => listings
                        .push((t, ids.into_iter().collect::<std::collections::HashSet<_>>())),
                    Err(_) => report.unreachable.push(t.label().to_string()),
                }
            }
            let known_now: std::collections::HashSet<[u8; 16]> = self
                .db(|s| s.all_key_ids())
                .await?
                .into_iter()
                .map(|k| k.bytes())
                .collect();
            for (token, held) in &listings {
                for key in known.iter().filter(|k| !held.contains(*k)) {
                    let Some((source, _)) = listings.iter().find(|(_, h)| h.contains(key)) else {
                        continue;
                    };
                    let wrapped = source.export_key(*key).await.map_err(KmsError::from_hsm)?;
                    token
                        .import_key(*key, wrapped)
                        .await
                        .map_err(KmsError::from_hsm)?;
                    report.copied += 1;
                    tracing::info!(token = %token.label(), key_id = %KeyId(*key), "copied a key the token missed");
                }
                for key in held
                    .iter()
                    .filter(|k| !known.contains(*k) && !known_now.contains(*k))
                {
                    token.destroy_key(*key).await.map_err(KmsError::from_hsm)?;
                    report.destroyed += 1;
                    tracing::info!(token = %token.label(), key_id = %KeyId(*key), "destroyed a key deleted while the token was away");
                }
            }
        }
        *self.last_probe.lock().unwrap() = Some(report.clone());
        Ok(report)
    }

    pub fn last_probe(&self) -> Option<ProbeReport> {
        self.last_probe.lock().unwrap().clone()
    }

    /// Destroys a key's material on every token, then forgets its metadata and aliases. Token
    /// first: after a crash in between the row is still there, and the next pass destroys again
    /// (idempotent) and then forgets the key.
    async fn purge(&self, id: KeyId) -> KmsResult<()> {
        self.cluster
            .destroy_key(id.bytes())
            .await
            .map_err(KmsError::from_hsm)?;
        self.db(move |s| s.remove_key(&id)).await
    }

    /// Rolls back creations a crash interrupted: their token objects and rows go, so no
    /// half-made key remains. Run once at start-up, before serving.
    pub async fn recover(&self) -> KmsResult<usize> {
        let unfinished = self.db(|s| s.unfinished_creations()).await?;
        for id in &unfinished {
            self.purge(*id).await?;
            tracing::warn!(key_id = %id, "rolled back a key creation interrupted by a crash");
        }
        Ok(unfinished.len())
    }

    pub async fn create_key(&self, req: CreateKeyRequest) -> KmsResult<KeyMetadataResponse> {
        if req.key_spec.is_some() && req.customer_master_key_spec.is_some() {
            return Err(KmsError::Validation(
                "Specify KeySpec or its deprecated twin CustomerMasterKeySpec, not both".into(),
            ));
        }
        let spec = req
            .key_spec
            .as_deref()
            .or(req.customer_master_key_spec.as_deref())
            .unwrap_or(SYMMETRIC_DEFAULT);
        if spec != SYMMETRIC_DEFAULT {
            return Err(KmsError::UnsupportedOperation(format!(
                "KeySpec {spec} is not supported: keys in this custom key store are SYMMETRIC_DEFAULT (AES-256) only"
            )));
        }
        match req.key_usage.as_deref() {
            None | Some("ENCRYPT_DECRYPT") => {}
            Some(u) => {
                return Err(KmsError::Validation(format!(
                    "KeyUsage {u} is not valid for KeySpec SYMMETRIC_DEFAULT"
                )))
            }
        }
        match req.origin.as_deref() {
            None | Some("AWS_CLOUDHSM") => {}
            Some("EXTERNAL") => {
                return Err(KmsError::UnsupportedOperation(
                    "Imported key material (Origin EXTERNAL) is not supported: root keys are generated inside the token".into(),
                ))
            }
            Some(o) => {
                return Err(KmsError::UnsupportedOperation(format!(
                    "Origin {o} is not supported: every key of this service lives in its custom key store (Origin AWS_CLOUDHSM)"
                )))
            }
        }
        if req.multi_region == Some(true) {
            return Err(KmsError::UnsupportedOperation(
                "Multi-Region keys cannot be created in a custom key store".into(),
            ));
        }
        if req.xks_key_id.is_some() {
            return Err(KmsError::UnsupportedOperation(
                "XksKeyId applies only to external key stores".into(),
            ));
        }
        if req.policy.is_some() {
            return Err(KmsError::UnsupportedOperation(
                "Key policies are not supported yet: access is granted to the principals in the service configuration".into(),
            ));
        }
        if let Some(id) = &req.custom_key_store_id {
            if *id != self.key_store.id {
                return Err(KmsError::CustomKeyStoreNotFound(format!(
                    "Custom key store {id} does not exist"
                )));
            }
        }
        self.require_connected()?;
        let description = req.description.unwrap_or_default();
        check_description(&description)?;
        let tags = req.tags.unwrap_or_default();
        check_tags(&tags)?;
        if tags.len() > MAX_TAGS {
            return Err(KmsError::TagException(format!(
                "A key can have at most {MAX_TAGS} tags"
            )));
        }
        let key = KeyRecord {
            key_id: KeyId::new_random(),
            created_ms: self.clock.now_ms(),
            description,
            state: KeyState::Creating,
            deletion_ms: None,
            pending_window_days: None,
            custom_key_store_id: self.key_store.id.clone(),
            tags: tags.into_iter().map(|t| (t.tag_key, t.tag_value)).collect(),
        };
        let id = key.key_id;
        // Intent first, then the token, then the commit: a crash anywhere leaves either nothing
        // visible (rolled back by `recover`) or a complete key.
        let record = key.clone();
        self.db(move |s| s.begin_create(&record)).await?;
        if let Err(e) = self
            .cluster
            .create_key(id.bytes(), self.key_store.min_tokens)
            .await
        {
            let _ = self.cluster.destroy_key(id.bytes()).await;
            let _ = self.db(move |s| s.remove_key(&id)).await;
            return Err(KmsError::from_hsm(e));
        }
        self.db(move |s| s.finish_create(&id)).await?;
        tracing::info!(key_id = %id, "key created");
        let key = self.key(id).await?;
        Ok(KeyMetadataResponse {
            key_metadata: self.metadata(&key),
        })
    }

    pub async fn describe_key(&self, req: KeyIdRequest) -> KmsResult<KeyMetadataResponse> {
        let key = self.resolve(&req.key_id, true).await?;
        Ok(KeyMetadataResponse {
            key_metadata: self.metadata(&key),
        })
    }

    pub async fn list_keys(&self, req: ListRequest) -> KmsResult<ListKeysResponse> {
        let limit = page_limit(req.limit, 1000, 100)?;
        let after = match &req.marker {
            Some(m) => Some(
                KeyId::parse(m)
                    .ok_or_else(|| KmsError::InvalidMarker(format!("Invalid marker {m}")))?,
            ),
            None => None,
        };
        let mut keys = self
            .db(move |s| s.list_keys(after.as_ref(), limit + 1))
            .await?;
        let truncated = keys.len() > limit;
        keys.truncate(limit);
        let next_marker = if truncated {
            keys.last().map(|k| k.key_id.to_string())
        } else {
            None
        };
        Ok(ListKeysResponse {
            keys: keys
                .iter()
                .map(|k| KeyListEntry {
                    key_id: k.key_id.to_string(),
                    key_arn: self.arn(&k.key_id),
                })
                .collect(),
            truncated,
            next_marker,
        })
    }

    async fn seal(
        &self,
        key: &KeyRecord,
        context: &EncryptionContext,
        plaintext: Zeroizing<Vec<u8>>,
    ) -> KmsResult<Vec<u8>> {
        let aad = CiphertextBlob::aad(&key.key_id, hsm::Kdf::AesCbcEncryptData, context);
        let sealed = self
            .cluster
            .encrypt(key.key_id.bytes(), aad, plaintext)
            .await
            .map_err(KmsError::from_hsm)?;
        Ok(CiphertextBlob {
            key_id: key.key_id,
            sealed,
        }
        .encode())
    }

    pub async fn encrypt(&self, req: EncryptRequest) -> KmsResult<EncryptResponse> {
        let algorithm = check_algorithm(req.encryption_algorithm.as_deref())?;
        let plaintext = req.plaintext.0;
        if plaintext.is_empty() || plaintext.len() > MAX_PLAINTEXT {
            return Err(KmsError::Validation(format!(
                "Plaintext is {} bytes; it must be 1 to {MAX_PLAINTEXT} bytes",
                plaintext.len()
            )));
        }
        let context = EncryptionContext::new(req.encryption_context)?;
        let key = self.resolve(&req.key_id, true).await?;
        self.require_enabled(&key)?;
        dry_run(req.dry_run)?;
        let blob = self.seal(&key, &context, plaintext).await?;
        Ok(EncryptResponse {
            ciphertext_blob: Blob(blob),
            key_id: self.arn(&key.key_id),
            encryption_algorithm: algorithm,
        })
    }

    /// Opens a blob; `expected` is the caller's KeyId, if given.
    async fn open(
        &self,
        blob: &[u8],
        expected: Option<&str>,
        context: ContextMap,
        dry_run_flag: Option<bool>,
    ) -> KmsResult<(Arc<KeyRecord>, Zeroizing<Vec<u8>>)> {
        let context = EncryptionContext::new(context)?;
        let parsed = CiphertextBlob::decode(blob)?;
        if let Some(reference) = expected {
            let named = self.resolve(reference, true).await?;
            if named.key_id != parsed.key_id {
                return Err(KmsError::IncorrectKey(
                    "The key ID in the request does not identify the KMS key that encrypted the ciphertext".into(),
                ));
            }
        }
        let key = self.find_key(parsed.key_id).await?.ok_or_else(|| {
            KmsError::InvalidCiphertext(
                "The ciphertext refers to a key that does not exist in this key store".into(),
            )
        })?;
        self.require_enabled(&key)?;
        // A dry run checks everything up to the token and decrypts nothing.
        dry_run(dry_run_flag)?;
        let aad = CiphertextBlob::aad(&key.key_id, parsed.sealed.kdf, &context);
        let plaintext = self
            .cluster
            .decrypt(key.key_id.bytes(), aad, parsed.sealed)
            .await
            .map_err(KmsError::from_hsm)?;
        Ok((key, plaintext))
    }

    pub async fn decrypt(&self, req: DecryptRequest) -> KmsResult<DecryptResponse> {
        let algorithm = check_algorithm(req.encryption_algorithm.as_deref())?;
        if req.recipient.is_some() {
            return Err(KmsError::UnsupportedOperation(
                "Recipient (Nitro Enclaves attestation) is not supported".into(),
            ));
        }
        let (key, plaintext) = self
            .open(
                &req.ciphertext_blob.0,
                req.key_id.as_deref(),
                req.encryption_context,
                req.dry_run,
            )
            .await?;
        Ok(DecryptResponse {
            key_id: self.arn(&key.key_id),
            plaintext: SecretBlob(plaintext),
            encryption_algorithm: algorithm,
        })
    }

    pub async fn re_encrypt(&self, req: ReEncryptRequest) -> KmsResult<ReEncryptResponse> {
        let source_algorithm = check_algorithm(req.source_encryption_algorithm.as_deref())?;
        let destination_algorithm =
            check_algorithm(req.destination_encryption_algorithm.as_deref())?;
        let destination_context = EncryptionContext::new(req.destination_encryption_context)?;
        let destination = self.resolve(&req.destination_key_id, true).await?;
        self.require_enabled(&destination)?;
        let (source, plaintext) = self
            .open(
                &req.ciphertext_blob.0,
                req.source_key_id.as_deref(),
                req.source_encryption_context,
                req.dry_run,
            )
            .await?;
        let blob = self
            .seal(&destination, &destination_context, plaintext)
            .await?;
        Ok(ReEncryptResponse {
            ciphertext_blob: Blob(blob),
            source_key_id: self.arn(&source.key_id),
            key_id: self.arn(&destination.key_id),
            source_encryption_algorithm: source_algorithm,
            destination_encryption_algorithm: destination_algorithm,
        })
    }

    pub async fn generate_data_key(
        &self,
        req: GenerateDataKeyRequest,
        with_plaintext: bool,
    ) -> KmsResult<GenerateDataKeyResponse> {
        let len = match (req.key_spec.as_deref(), req.number_of_bytes) {
            (Some(_), Some(_)) => {
                return Err(KmsError::Validation(
                    "Specify either KeySpec or NumberOfBytes, not both".into(),
                ))
            }
            (Some("AES_256"), None) => 32,
            (Some("AES_128"), None) => 16,
            (Some(other), None) => {
                return Err(KmsError::Validation(format!(
                    "KeySpec {other} is not one of AES_256, AES_128"
                )))
            }
            (None, Some(n)) if (1..=MAX_DATA_KEY_BYTES).contains(&n) => n as usize,
            (None, Some(n)) => {
                return Err(KmsError::Validation(format!(
                    "NumberOfBytes {n} is not between 1 and {MAX_DATA_KEY_BYTES}"
                )))
            }
            (None, None) => {
                return Err(KmsError::Validation(
                    "Specify KeySpec or NumberOfBytes".into(),
                ))
            }
        };
        if req.recipient.is_some() {
            return Err(KmsError::UnsupportedOperation(
                "Recipient (Nitro Enclaves attestation) is not supported".into(),
            ));
        }
        let context = EncryptionContext::new(req.encryption_context)?;
        let key = self.resolve(&req.key_id, true).await?;
        self.require_enabled(&key)?;
        dry_run(req.dry_run)?;
        let aad = CiphertextBlob::aad(&key.key_id, hsm::Kdf::AesCbcEncryptData, &context);
        let (plaintext, sealed) = self
            .cluster
            .generate_data_key(key.key_id.bytes(), aad, len)
            .await
            .map_err(KmsError::from_hsm)?;
        Ok(GenerateDataKeyResponse {
            ciphertext_blob: Blob(
                CiphertextBlob {
                    key_id: key.key_id,
                    sealed,
                }
                .encode(),
            ),
            plaintext: with_plaintext.then(|| SecretBlob(plaintext)),
            key_id: self.arn(&key.key_id),
        })
    }

    pub async fn generate_random(
        &self,
        req: GenerateRandomRequest,
    ) -> KmsResult<GenerateRandomResponse> {
        let n = req
            .number_of_bytes
            .ok_or_else(|| KmsError::Validation("NumberOfBytes is required".into()))?;
        if !(1..=MAX_DATA_KEY_BYTES).contains(&n) {
            return Err(KmsError::Validation(format!(
                "NumberOfBytes {n} is not between 1 and {MAX_DATA_KEY_BYTES}"
            )));
        }
        if let Some(id) = &req.custom_key_store_id {
            if *id != self.key_store.id {
                return Err(KmsError::CustomKeyStoreNotFound(format!(
                    "Custom key store {id} does not exist"
                )));
            }
        }
        if req.recipient.is_some() {
            return Err(KmsError::UnsupportedOperation(
                "Recipient (Nitro Enclaves attestation) is not supported".into(),
            ));
        }
        self.require_connected()?;
        let bytes = self
            .cluster
            .random(n as usize)
            .await
            .map_err(KmsError::from_hsm)?;
        Ok(GenerateRandomResponse {
            plaintext: SecretBlob(Zeroizing::new(bytes)),
        })
    }

    async fn alias_target(&self, target: Option<&str>) -> KmsResult<Arc<KeyRecord>> {
        let target =
            target.ok_or_else(|| KmsError::Validation("TargetKeyId is required".into()))?;
        let key = self.resolve(target, false).await?;
        if key.state == KeyState::PendingDeletion {
            return Err(KmsError::InvalidState(format!(
                "{} is pending deletion.",
                self.arn(&key.key_id)
            )));
        }
        Ok(key)
    }

    fn check_alias_name(name: &str) -> KmsResult<()> {
        validate_alias_name(name)?;
        if name.starts_with("alias/aws/") {
            return Err(KmsError::InvalidAliasName(
                "Alias names beginning with alias/aws/ are reserved for AWS".into(),
            ));
        }
        Ok(())
    }

    pub async fn create_alias(&self, req: AliasRequest) -> KmsResult<Empty> {
        Self::check_alias_name(&req.alias_name)?;
        let key = self.alias_target(req.target_key_id.as_deref()).await?;
        let now = self.clock.now_ms();
        let alias = AliasRecord {
            name: req.alias_name,
            key_id: key.key_id,
            created_ms: now,
            updated_ms: now,
        };
        self.db(move |s| s.create_alias(&alias)).await?;
        Ok(Empty {})
    }

    pub async fn update_alias(&self, req: AliasRequest) -> KmsResult<Empty> {
        Self::check_alias_name(&req.alias_name)?;
        let key = self.alias_target(req.target_key_id.as_deref()).await?;
        let now = self.clock.now_ms();
        self.db(move |s| s.update_alias(&req.alias_name, &key.key_id, now))
            .await?;
        Ok(Empty {})
    }

    pub async fn delete_alias(&self, req: AliasRequest) -> KmsResult<Empty> {
        validate_alias_name(&req.alias_name)?;
        let name = req.alias_name;
        self.db(move |s| s.delete_alias(&name)).await?;
        Ok(Empty {})
    }

    pub async fn list_aliases(&self, req: ListRequest) -> KmsResult<ListAliasesResponse> {
        let limit = page_limit(req.limit, 100, 50)?;
        let key = match &req.key_id {
            Some(r) => Some(self.resolve(r, false).await?.key_id),
            None => None,
        };
        let marker = req.marker.clone();
        if let Some(m) = &marker {
            validate_alias_name(m)
                .map_err(|_| KmsError::InvalidMarker(format!("Invalid marker {m}")))?;
        }
        let mut aliases = self
            .db(move |s| s.list_aliases(key.as_ref(), marker.as_deref(), limit + 1))
            .await?;
        let truncated = aliases.len() > limit;
        aliases.truncate(limit);
        let next_marker = if truncated {
            aliases.last().map(|a| a.name.clone())
        } else {
            None
        };
        Ok(ListAliasesResponse {
            aliases: aliases
                .into_iter()
                .map(|a| AliasListEntry {
                    alias_arn: self.scope.alias_arn(&a.name),
                    alias_name: a.name,
                    target_key_id: a.key_id.to_string(),
                    creation_date: epoch_seconds(a.created_ms),
                    last_updated_date: epoch_seconds(a.updated_ms),
                })
                .collect(),
            truncated,
            next_marker,
        })
    }

    /// Changes one key inside a metadata transaction.
    async fn change_key(
        &self,
        reference: &str,
        change: impl FnMut(&mut KeyRecord) -> KmsResult<()> + Send + 'static,
    ) -> KmsResult<KeyRecord> {
        let key = self.resolve(reference, false).await?;
        let mut change = change;
        self.db(move |s| s.update_key(&key.key_id, &mut change))
            .await
    }

    fn pending_deletion_refusal(scope: &ArnScope, key: &KeyRecord) -> KmsResult<()> {
        if key.state == KeyState::PendingDeletion {
            return Err(KmsError::InvalidState(format!(
                "{} is pending deletion.",
                scope.key_arn(&key.key_id)
            )));
        }
        Ok(())
    }

    pub async fn enable_key(&self, req: KeyIdRequest) -> KmsResult<Empty> {
        let scope = self.scope.clone();
        self.change_key(&req.key_id, move |k| {
            Self::pending_deletion_refusal(&scope, k)?;
            k.state = KeyState::Enabled;
            Ok(())
        })
        .await?;
        Ok(Empty {})
    }

    pub async fn disable_key(&self, req: KeyIdRequest) -> KmsResult<Empty> {
        let scope = self.scope.clone();
        self.change_key(&req.key_id, move |k| {
            Self::pending_deletion_refusal(&scope, k)?;
            k.state = KeyState::Disabled;
            Ok(())
        })
        .await?;
        Ok(Empty {})
    }

    pub async fn schedule_key_deletion(
        &self,
        req: ScheduleKeyDeletionRequest,
    ) -> KmsResult<ScheduleKeyDeletionResponse> {
        let days = req.pending_window_in_days.unwrap_or(30);
        if !(7..=30).contains(&days) {
            return Err(KmsError::Validation(format!(
                "PendingWindowInDays {days} is not between 7 and 30"
            )));
        }
        let deletion_ms = self.clock.now_ms() + days * DAY_MS;
        let scope = self.scope.clone();
        let key = self
            .change_key(&req.key_id, move |k| {
                Self::pending_deletion_refusal(&scope, k)?;
                k.state = KeyState::PendingDeletion;
                k.deletion_ms = Some(deletion_ms);
                k.pending_window_days = Some(days as u32);
                Ok(())
            })
            .await?;
        tracing::info!(key_id = %key.key_id, days, "key deletion scheduled");
        Ok(ScheduleKeyDeletionResponse {
            key_id: self.arn(&key.key_id),
            deletion_date: epoch_seconds(deletion_ms),
            key_state: KeyState::PendingDeletion.as_str(),
            pending_window_in_days: days as u32,
        })
    }

    pub async fn cancel_key_deletion(&self, req: KeyIdRequest) -> KmsResult<KeyIdResponse> {
        let scope = self.scope.clone();
        let key = self
            .change_key(&req.key_id, move |k| {
                if k.state != KeyState::PendingDeletion {
                    return Err(KmsError::InvalidState(format!(
                        "{} is not pending deletion (state {}).",
                        scope.key_arn(&k.key_id),
                        k.state.as_str()
                    )));
                }
                // As AWS: a key whose deletion is cancelled comes back disabled.
                k.state = KeyState::Disabled;
                k.deletion_ms = None;
                k.pending_window_days = None;
                Ok(())
            })
            .await?;
        Ok(KeyIdResponse {
            key_id: self.arn(&key.key_id),
        })
    }

    /// Destroys keys whose waiting period has ended, on every token, then forgets them.
    pub async fn delete_due_keys(&self) -> KmsResult<usize> {
        let now = self.clock.now_ms();
        let due = self.db(move |s| s.keys_due_for_deletion(now)).await?;
        for id in &due {
            self.purge(*id).await?;
            tracing::info!(key_id = %id, "key deleted at the end of its waiting period");
        }
        Ok(due.len())
    }

    pub async fn tag_resource(&self, req: TagResourceRequest) -> KmsResult<Empty> {
        check_tags(&req.tags)?;
        let scope = self.scope.clone();
        let tags = req.tags;
        self.change_key(&req.key_id, move |k| {
            Self::pending_deletion_refusal(&scope, k)?;
            for t in &tags {
                k.tags.insert(t.tag_key.clone(), t.tag_value.clone());
            }
            if k.tags.len() > MAX_TAGS {
                return Err(KmsError::TagException(format!(
                    "A key can have at most {MAX_TAGS} tags"
                )));
            }
            Ok(())
        })
        .await?;
        Ok(Empty {})
    }

    pub async fn untag_resource(&self, req: UntagResourceRequest) -> KmsResult<Empty> {
        let scope = self.scope.clone();
        let keys = req.tag_keys;
        self.change_key(&req.key_id, move |k| {
            Self::pending_deletion_refusal(&scope, k)?;
            for t in &keys {
                k.tags.remove(t);
            }
            Ok(())
        })
        .await?;
        Ok(Empty {})
    }

    pub async fn list_resource_tags(
        &self,
        req: ListRequest,
    ) -> KmsResult<ListResourceTagsResponse> {
        let limit = page_limit(req.limit, 50, 50)?;
        let reference = req
            .key_id
            .ok_or_else(|| KmsError::Validation("KeyId is required".into()))?;
        let key = self.resolve(&reference, false).await?;
        let after = req.marker.unwrap_or_default();
        let mut tags: Vec<Tag> = key
            .tags
            .range::<String, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
            .take(limit + 1)
            .map(|(k, v)| Tag {
                tag_key: k.clone(),
                tag_value: v.clone(),
            })
            .collect();
        let truncated = tags.len() > limit;
        tags.truncate(limit);
        let next_marker = if truncated {
            tags.last().map(|t| t.tag_key.clone())
        } else {
            None
        };
        Ok(ListResourceTagsResponse {
            tags,
            truncated,
            next_marker,
        })
    }

    pub async fn update_key_description(
        &self,
        req: UpdateKeyDescriptionRequest,
    ) -> KmsResult<Empty> {
        check_description(&req.description)?;
        let scope = self.scope.clone();
        let description = req.description;
        self.change_key(&req.key_id, move |k| {
            Self::pending_deletion_refusal(&scope, k)?;
            k.description = description.clone();
            Ok(())
        })
        .await?;
        Ok(Empty {})
    }

    pub async fn get_key_rotation_status(
        &self,
        req: KeyIdRequest,
    ) -> KmsResult<KeyRotationStatusResponse> {
        let key = self.resolve(&req.key_id, false).await?;
        Ok(KeyRotationStatusResponse {
            key_id: self.arn(&key.key_id),
            key_rotation_enabled: false,
        })
    }

    /// EnableKeyRotation, DisableKeyRotation, RotateKeyOnDemand: the key must exist, and then
    /// the answer is no, as AWS answers for keys in a custom key store.
    pub async fn refuse_rotation(&self, req: KeyIdRequest) -> KmsResult<Empty> {
        self.resolve(&req.key_id, false).await?;
        Err(refuse_rotation())
    }

    /// The key store and its tokens. A store is CONNECTED while one token can serve; with none,
    /// FAILED with INSUFFICIENT_CLOUDHSM_HSMS, AWS's code for a cluster without an active HSM.
    pub async fn describe_custom_key_stores(
        &self,
        req: DescribeCustomKeyStoresRequest,
    ) -> KmsResult<DescribeCustomKeyStoresResponse> {
        page_limit(req.limit, 1000, 1000)?;
        let not_ours = |what: &str| {
            KmsError::CustomKeyStoreNotFound(format!("Custom key store {what} does not exist"))
        };
        if let Some(id) = &req.custom_key_store_id {
            if *id != self.key_store.id {
                return Err(not_ours(id));
            }
        }
        if let Some(name) = &req.custom_key_store_name {
            if *name != self.key_store.name {
                return Err(not_ours(name));
            }
        }
        // One store: a marker can only point past it.
        if req.marker.is_some() {
            return Ok(DescribeCustomKeyStoresResponse {
                custom_key_stores: vec![],
                truncated: false,
            });
        }
        let tokens: Vec<TokenHealthEntry> = self
            .cluster
            .status()
            .into_iter()
            .map(|t| TokenHealthEntry {
                label: t.label,
                serial: t.info.serial,
                manufacturer: t.info.manufacturer,
                model: t.info.model,
                state: if t.health == hsm::TokenHealth::Up {
                    "UP"
                } else {
                    "DOWN"
                },
                worker_restarts: t.worker_restarts,
                last_error: t.last_error,
            })
            .collect();
        let reachable = tokens.iter().any(|t| t.state == "UP");
        let (state, code) = match (self.is_connected(), reachable) {
            (false, _) => ("DISCONNECTED", None),
            (true, true) => ("CONNECTED", None),
            (true, false) => ("FAILED", Some("INSUFFICIENT_CLOUDHSM_HSMS")),
        };
        Ok(DescribeCustomKeyStoresResponse {
            custom_key_stores: vec![CustomKeyStoreEntry {
                custom_key_store_id: self.key_store.id.clone(),
                custom_key_store_name: self.key_store.name.clone(),
                custom_key_store_type: "AWS_CLOUDHSM",
                cloud_hsm_cluster_id: self.key_store.cluster_id.clone(),
                connection_state: state,
                connection_error_code: code,
                hsmkms_tokens: tokens,
            }],
            truncated: false,
        })
    }

    fn check_store_id(&self, id: &str) -> KmsResult<()> {
        if id != self.key_store.id {
            return Err(KmsError::CustomKeyStoreNotFound(format!(
                "Custom key store {id} does not exist"
            )));
        }
        Ok(())
    }

    /// Connects the key store: its keys become usable again. Connecting a connected store is
    /// a no-op, as with AWS.
    pub async fn connect_custom_key_store(&self, req: CustomKeyStoreIdRequest) -> KmsResult<Empty> {
        self.check_store_id(&req.custom_key_store_id)?;
        if !self.cluster.tokens().iter().any(|t| t.is_up()) {
            return Err(KmsError::CustomKeyStoreInvalidState(
                "No token of the key store's cluster can serve; it stays disconnected".into(),
            ));
        }
        self.db(|s| s.set_setting(CONNECTED_SETTING, "true"))
            .await?;
        self.connected
            .store(true, std::sync::atomic::Ordering::SeqCst);
        tracing::info!(key_store = %self.key_store.id, "custom key store connected");
        Ok(Empty {})
    }

    /// Disconnects the key store: its keys are Unavailable (KMSInvalidStateException) until
    /// it is connected again; the keys themselves are untouched.
    pub async fn disconnect_custom_key_store(
        &self,
        req: CustomKeyStoreIdRequest,
    ) -> KmsResult<Empty> {
        self.check_store_id(&req.custom_key_store_id)?;
        self.db(|s| s.set_setting(CONNECTED_SETTING, "false"))
            .await?;
        self.connected
            .store(false, std::sync::atomic::Ordering::SeqCst);
        tracing::info!(key_store = %self.key_store.id, "custom key store disconnected");
        Ok(Empty {})
    }

    /// The key policy, as AWS's default key policy: the account may do everything with the key.
    /// That is what hsmkms enforces: every principal in the configuration is the account's and
    /// has full access (see docs/security.md). Policies cannot be changed (PutKeyPolicy refuses).
    pub async fn get_key_policy(&self, req: KeyPolicyRequest) -> KmsResult<KeyPolicyResponse> {
        self.resolve(&req.key_id, false).await?;
        match req.policy_name.as_deref() {
            None | Some("default") => {}
            Some(other) => {
                return Err(KmsError::NotFound(format!(
                    "Key policy {other} does not exist; the only policy is \"default\""
                )))
            }
        }
        let policy = serde_json::json!({
            "Version": "2012-10-17",
            "Id": "key-default-1",
            "Statement": [{
                "Sid": "Enable IAM User Permissions",
                "Effect": "Allow",
                "Principal": {"AWS": format!("arn:{}:iam::{}:root", self.scope.partition, self.scope.account)},
                "Action": "kms:*",
                "Resource": "*"
            }]
        });
        Ok(KeyPolicyResponse {
            policy: policy.to_string(),
            policy_name: "default",
        })
    }

    pub async fn list_key_policies(&self, req: KeyIdRequest) -> KmsResult<ListKeyPoliciesResponse> {
        self.resolve(&req.key_id, false).await?;
        Ok(ListKeyPoliciesResponse {
            policy_names: vec!["default"],
            truncated: false,
        })
    }

    /// Grants are not supported, so no key has any: an empty list is the truth.
    pub async fn list_grants(&self, req: KeyIdRequest) -> KmsResult<ListGrantsResponse> {
        self.resolve(&req.key_id, false).await?;
        Ok(ListGrantsResponse {
            grants: vec![],
            truncated: false,
        })
    }

    /// PutKeyPolicy, CreateGrant and the other ways to change access: refused, because access
    /// is granted per principal in the configuration.
    pub async fn refuse_access_change(
        &self,
        operation: &str,
        req: KeyIdRequest,
    ) -> KmsResult<Empty> {
        self.resolve(&req.key_id, false).await?;
        Err(KmsError::UnsupportedOperation(format!(
            "{operation} is not supported: key policies and grants are fixed; every principal in the hsmkms configuration has full access to the account's keys"
        )))
    }

    /// Manual rotation: a new key in the same store with the old key's description and tags,
    /// and the alias moved to it. The old key stays, for the ciphertexts made under it.
    pub async fn rotate_manually(&self, alias: &str) -> KmsResult<(String, String)> {
        Self::check_alias_name(alias)?;
        let old = self.resolve(alias, true).await?;
        let created = self
            .create_key(CreateKeyRequest {
                description: Some(old.description.clone()),
                tags: Some(
                    old.tags
                        .iter()
                        .map(|(k, v)| Tag {
                            tag_key: k.clone(),
                            tag_value: v.clone(),
                        })
                        .collect(),
                ),
                ..Default::default()
            })
            .await?;
        let new_arn = created.key_metadata.arn;
        self.update_alias(AliasRequest {
            alias_name: alias.to_string(),
            target_key_id: Some(new_arn.clone()),
        })
        .await?;
        tracing::info!(alias, old = %old.key_id, new = %created.key_metadata.key_id, "alias rotated manually");
        Ok((self.arn(&old.key_id), new_arn))
    }
}

/// Tag maps as the wire shape.
pub fn tags_of(map: &BTreeMap<String, String>) -> Vec<Tag> {
    map.iter()
        .map(|(k, v)| Tag {
            tag_key: k.clone(),
            tag_value: v.clone(),
        })
        .collect()
}
