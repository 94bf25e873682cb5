//! The service core: every KMS operation, whatever front it arrives through.
//!
//! Fronts translate their wire format into these calls and nothing more: every check (key state,
//! sizes, algorithms, encryption context) is made here, once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use hsm::{Cluster, WorkerCommand};
use zeroize::Zeroizing;

use crate::ciphertext::CiphertextBlob;
use crate::clock::{epoch_seconds, Clock};
use crate::context::EncryptionContext;
use crate::error::{KmsError, KmsResult};
use crate::ids::{validate_alias_name, ArnScope, KeyId, KeyReference};
use crate::key_stores::{Connection, KeyStore, KeyStoreRecord};
use crate::store::{AliasRecord, IntentLease, KeyRecord, KeyState, MetadataStore};
use crate::wire::*;

pub const MAX_PLAINTEXT: usize = 4096;
pub const MAX_DATA_KEY_BYTES: i64 = 1024;
pub const MAX_TAGS: usize = 50;
const SYMMETRIC_DEFAULT: &str = "SYMMETRIC_DEFAULT";
const DAY_MS: i64 = 86_400_000;
/// How long a CreateKey intent is this process's without renewal; renewed every third of it
/// while the token makes and copies the key. Another process's `recover` rolls back only
/// intents whose lease expired.
pub const INTENT_LEASE_MS: i64 = 30_000;

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

/// Counters of the background work, for `/metrics`.
#[derive(Debug, Default)]
pub struct ServiceCounters {
    pub probes: AtomicU64,
    pub probe_failures: AtomicU64,
    pub keys_copied: AtomicU64,
    pub keys_destroyed: AtomicU64,
    pub keys_deleted: AtomicU64,
}

pub struct Service {
    last_probe: std::sync::Mutex<Option<ProbeReport>>,
    scope: ArnScope,
    store: Arc<dyn MetadataStore>,
    /// The custom key stores, by id.
    key_stores: RwLock<BTreeMap<String, Arc<KeyStore>>>,
    /// Where CreateKey puts a key when the request names no store.
    default_store: Option<String>,
    command: WorkerCommand,
    clock: Arc<dyn Clock>,
    pub counters: ServiceCounters,
    /// Changes to store definitions (create, update, delete, seed) run one at a time: a token
    /// must never be claimed by two stores at once.
    defining: tokio::sync::Mutex<()>,
    /// This process's name on its CreateKey intents (see [`crate::intent`]).
    intent_owner: String,
}

/// Which removal [`Service::purge`] makes.
#[derive(Clone)]
enum Removal {
    /// Only if still pending deletion and due at this time.
    Due(i64),
    /// Only if a `Creating` key whose intent still has this lease.
    Intent(IntentLease),
}

/// Stops a CreateKey's lease renewal when the creation ends, however it ends (a dropped
/// request future included: the lease then runs out and a `recover` rolls the intent back).
struct RenewalGuard(tokio::task::JoinHandle<()>);

impl Drop for RenewalGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn refuse_rotation() -> KmsError {
    KmsError::UnsupportedOperation(
        "Keys in a custom key store (origin AWS_CLOUDHSM) cannot rotate automatically or on demand. \
         Rotate manually: create a new key and move the alias to it with UpdateAlias \
         (`hsmkms key rotate-manually ALIAS` does both); the old key keeps decrypting old ciphertexts."
            .into(),
    )
}

/// `member` (an `EncryptionAlgorithmSpec`): enum membership first, as AWS validates the request
/// before it looks at the key; then only SYMMETRIC_DEFAULT fits a symmetric key.
fn check_algorithm(member: &str, algorithm: Option<&str>) -> KmsResult<&'static str> {
    Violations::default()
        .enumerated(member, algorithm, ENCRYPTION_ALGORITHM_VALUES)
        .check()?;
    match algorithm {
        None | Some(SYMMETRIC_DEFAULT) => Ok(SYMMETRIC_DEFAULT),
        Some(a) => Err(KmsError::InvalidKeyUsage(format!(
            "{a} is an asymmetric encryption algorithm; this key is symmetric and supports only SYMMETRIC_DEFAULT"
        ))),
    }
}

/// The members' constraints of botocore's model: `Tag.TagKey` 1-128, `Tag.TagValue` 0-256.
fn tag_violations(v: &mut Violations, tags: &[Tag]) {
    for (i, t) in tags.iter().enumerate() {
        let n = i + 1;
        v.length(&format!("tags.{n}.member.tagKey"), &t.tag_key, 1, 128);
        v.length(&format!("tags.{n}.member.tagValue"), &t.tag_value, 0, 256);
    }
}

/// AWS's tag rules beyond the model (TagException, AWS's wording): keys unique in one request
/// (compared as given: tag keys are case-sensitive), and the `aws:` prefix reserved in any case.
fn check_tag_rules(tags: &[Tag]) -> KmsResult<()> {
    let mut seen = std::collections::BTreeSet::new();
    for t in tags {
        if !seen.insert(t.tag_key.as_str()) {
            return Err(KmsError::TagException("Duplicate tag keys".into()));
        }
        if t.tag_key
            .get(..4)
            .is_some_and(|p| p.eq_ignore_ascii_case("aws:"))
        {
            return Err(KmsError::TagException(
                "Tags beginning with aws: are reserved".into(),
            ));
        }
    }
    Ok(())
}

/// `Limit` (1 to `max`, AWS's wording), or `default`.
fn page_limit(limit: Option<i64>, max: i64, default: i64) -> KmsResult<usize> {
    Violations::default()
        .range("limit", limit, 1, max)
        .check()?;
    Ok(limit.unwrap_or(default) as usize)
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
    /// A service over the metadata's key stores, none connected yet: see
    /// [`Service::connect_wanted_stores`].
    pub fn new(
        scope: ArnScope,
        store: Arc<dyn MetadataStore>,
        clock: Arc<dyn Clock>,
        command: WorkerCommand,
        default_store: Option<String>,
    ) -> KmsResult<Service> {
        let key_stores = store
            .key_stores()?
            .into_iter()
            .map(|r| (r.id.clone(), Arc::new(KeyStore::new(r))))
            .collect();
        Ok(Service {
            last_probe: std::sync::Mutex::new(None),
            scope,
            store,
            key_stores: RwLock::new(key_stores),
            default_store,
            command,
            clock,
            counters: ServiceCounters::default(),
            defining: tokio::sync::Mutex::new(()),
            intent_owner: crate::intent::this_process(),
        })
    }

    pub fn scope(&self) -> &ArnScope {
        &self.scope
    }

    /// The service's clock: request signatures are checked against it too.
    pub fn clock(&self) -> &dyn Clock {
        &*self.clock
    }

    pub fn metadata_store(&self) -> &Arc<dyn MetadataStore> {
        &self.store
    }

    /// The key stores, in id order.
    pub fn key_stores(&self) -> Vec<Arc<KeyStore>> {
        self.key_stores.read().unwrap().values().cloned().collect()
    }

    pub fn key_store(&self, id: &str) -> Option<Arc<KeyStore>> {
        self.key_stores.read().unwrap().get(id).cloned()
    }

    /// The store a request that names none means: the configured one, else the only one.
    pub fn default_key_store(&self) -> KmsResult<Arc<KeyStore>> {
        let stores = self.key_stores.read().unwrap();
        if let Some(id) = &self.default_store {
            if let Some(s) = stores.get(id) {
                return Ok(s.clone());
            }
        }
        match stores.len() {
            1 => Ok(stores.values().next().expect("one store").clone()),
            0 => Err(KmsError::CustomKeyStoreNotFound(
                "This service has no custom key store yet: create one with CreateCustomKeyStore".into(),
            )),
            n => Err(KmsError::Validation(format!(
                "This service has {n} custom key stores and none is the default: give CustomKeyStoreId"
            ))),
        }
    }

    fn named_store(&self, id: &str) -> KmsResult<Arc<KeyStore>> {
        self.key_store(id).ok_or_else(|| {
            KmsError::CustomKeyStoreNotFound(format!("Custom key store {id} does not exist"))
        })
    }

    /// The cluster of the default store, when it is connected (for tests and tools).
    pub fn cluster(&self) -> KmsResult<Arc<Cluster>> {
        let store = self.default_key_store()?;
        store.connected_cluster()
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

    /// Cryptographic operations need an enabled key in a connected store: its cluster.
    fn require_enabled(&self, key: &KeyRecord) -> KmsResult<Arc<Cluster>> {
        let cluster = self
            .key_store(&key.custom_key_store_id)
            .and_then(|s| s.cluster());
        let Some(cluster) = cluster else {
            return Err(KmsError::KeyUnavailable(format!(
                "{} is unavailable: its custom key store {} is not connected.",
                self.arn(&key.key_id),
                key.custom_key_store_id
            )));
        };
        match key.state {
            KeyState::Enabled => Ok(cluster),
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
        let store = self.key_store(&key.custom_key_store_id);
        let connected = store.as_ref().is_some_and(|s| s.cluster().is_some());
        KeyMetadata {
            aws_account_id: self.scope.account.clone(),
            key_id: key.key_id.to_string(),
            arn: self.arn(&key.key_id),
            creation_date: epoch_seconds(key.created_ms),
            enabled: key.state == KeyState::Enabled && connected,
            description: key.description.clone(),
            key_usage: "ENCRYPT_DECRYPT",
            // As AWS: keys of a disconnected custom key store are Unavailable.
            key_state: if connected {
                key.state.as_str()
            } else {
                "Unavailable"
            },
            deletion_date: key.deletion_ms.map(epoch_seconds),
            origin: "AWS_CLOUDHSM",
            custom_key_store_id: key.custom_key_store_id.clone(),
            cloud_hsm_cluster_id: store.map(|s| s.cluster_id()).unwrap_or_default(),
            key_manager: "CUSTOMER",
            customer_master_key_spec: SYMMETRIC_DEFAULT,
            key_spec: SYMMETRIC_DEFAULT,
            encryption_algorithms: vec![SYMMETRIC_DEFAULT],
            multi_region: false,
        }
    }

    /// The prober's pass over every store. Per connected store it pings each token (a token
    /// that came back is used again), copies to each reachable token the keys it lacks (made
    /// while it was down) from a token that has them, and destroys the keys the metadata
    /// deleted (their tombstones) on tokens that missed the deletion. A store whose connection
    /// failed for a reason other than its credentials is tried again.
    pub async fn probe_tokens(&self) -> KmsResult<ProbeReport> {
        let mut report = ProbeReport {
            at_ms: self.clock.now_ms(),
            ..Default::default()
        };
        self.counters.probes.fetch_add(1, Ordering::Relaxed);
        let mut first_error = None;
        for store in self.key_stores() {
            self.retry_failed_connection(&store).await;
            let Some(cluster) = store.cluster() else {
                continue;
            };
            // One store's trouble must not keep the others from being caught up.
            if let Err(e) = self
                .probe_store(&store.id(), &cluster, &mut report, &[])
                .await
            {
                tracing::warn!(key_store = %store.id(), error = %e, "probe of the key store failed");
                first_error.get_or_insert(e);
            }
        }
        self.counters
            .keys_copied
            .fetch_add(report.copied as u64, Ordering::Relaxed);
        self.counters
            .keys_destroyed
            .fetch_add(report.destroyed as u64, Ordering::Relaxed);
        *self.last_probe.lock().unwrap() = Some(report.clone());
        match first_error {
            Some(e) => {
                self.counters.probe_failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
            None => Ok(report),
        }
    }

    /// Reconnects a store that should be connected and failed for a reason that may pass (a
    /// token not found, none reachable); never after a refused PIN, which could lock it.
    async fn retry_failed_connection(&self, store: &KeyStore) {
        let Connection::Failed(failure) = store.connection() else {
            return;
        };
        if !store.record().want_connected
            || matches!(failure.code, "INVALID_CREDENTIALS" | "USER_LOCKED_OUT")
            || !store.retry_due()
        {
            return;
        }
        let Ok(_changing) = store.changing.try_lock() else {
            return;
        };
        if matches!(store.connection(), Connection::Failed(_)) {
            tracing::info!(key_store = %store.id(), "trying to connect the key store again");
            self.open_store(store).await;
        }
    }

    async fn store_key_set(
        &self,
        store_id: &str,
    ) -> KmsResult<std::collections::HashSet<[u8; 16]>> {
        let id = store_id.to_string();
        Ok(self
            .db(move |s| s.store_key_ids(&id))
            .await?
            .into_iter()
            .map(|k| k.bytes())
            .collect())
    }

    /// `leaving`: labels of tokens about to leave the store, which get no copies.
    async fn probe_store(
        &self,
        store_id: &str,
        cluster: &Cluster,
        report: &mut ProbeReport,
        leaving: &[String],
    ) -> KmsResult<()> {
        let tokens = cluster.tokens();
        for t in tokens {
            if t.ping().await.is_err() {
                report.unreachable.push(t.label().to_string());
            }
        }
        // The backup MAC keys go to every token too, so that any of them verifies a backup.
        match cluster.ensure_mac_keys(false).await {
            Ok((_, 0)) => {}
            Ok((_, copies)) => {
                tracing::info!(key_store = %store_id, copies, "copied backup MAC keys to tokens that lacked them")
            }
            Err(e) => {
                tracing::warn!(key_store = %store_id, error = %e, "could not copy the backup MAC keys")
            }
        }
        let known = self.store_key_set(store_id).await?;
        let mut listings = Vec::new();
        for t in tokens.iter().filter(|t| t.is_up()) {
            match t.list_keys().await {
                Ok(ids) => {
                    listings.push((t, ids.into_iter().collect::<std::collections::HashSet<_>>()))
                }
                Err(_) => report.unreachable.push(t.label().to_string()),
            }
        }
        // Read after the listings: a key deleted meanwhile is destroyed in the next pass.
        let id = store_id.to_string();
        let deleted: std::collections::HashSet<[u8; 16]> = self
            .db(move |s| s.tombstones(&id))
            .await?
            .into_iter()
            .map(|k| k.bytes())
            .collect();
        let mut first_error = None;
        // Tombstoned keys some token still holds after this pass.
        let mut still_held = std::collections::HashSet::new();
        for (token, held) in &listings {
            let receives = !leaving.iter().any(|l| l == token.label());
            for key in known.iter().filter(|k| receives && !held.contains(*k)) {
                let Some((source, _)) = listings.iter().find(|(_, h)| h.contains(key)) else {
                    continue;
                };
                let copied = match source.export_key(*key).await {
                    Ok(wrapped) => token.import_key(*key, wrapped).await,
                    Err(e) => Err(e),
                };
                match copied {
                    Ok(()) => {
                        report.copied += 1;
                        tracing::info!(token = %token.label(), key_id = %KeyId(*key), "copied a key the token missed");
                    }
                    Err(e) => {
                        tracing::warn!(token = %token.label(), key_id = %KeyId(*key), error = %e, "could not copy a key the token missed");
                        first_error.get_or_insert(KmsError::from_hsm(e));
                    }
                }
            }
            for key in held.iter().filter(|k| deleted.contains(*k)) {
                // Asked again just before: a restore may have brought the key back meanwhile.
                let id = KeyId(*key);
                let still_deleted = self
                    .db(move |s| Ok(s.is_tombstoned(&id)? && s.key_store_of(&id)?.is_none()))
                    .await?;
                if !still_deleted {
                    continue;
                }
                match token.destroy_key(*key).await {
                    Ok(()) => {
                        report.destroyed += 1;
                        tracing::info!(token = %token.label(), key_id = %id, "destroyed a key deleted while the token was away");
                    }
                    Err(e) => {
                        still_held.insert(*key);
                        first_error.get_or_insert(KmsError::from_hsm(e));
                    }
                }
            }
            let strangers = held
                .iter()
                .filter(|k| !known.contains(*k) && !deleted.contains(*k))
                .count();
            if strangers > 0 {
                // Not ours to destroy: keys of a lost metadata (restore a backup, or they stay
                // recoverable) or of another store put on this token.
                tracing::debug!(token = %token.label(), strangers, "token holds keys this store's metadata does not know");
            }
        }
        // Every token answered and none holds a deleted key any more: its tombstone is done.
        if listings.len() == tokens.len() {
            for key in deleted.iter().filter(|k| !still_held.contains(*k)) {
                let id = KeyId(*key);
                self.db(move |s| s.clear_tombstone(&id)).await?;
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    pub fn last_probe(&self) -> Option<ProbeReport> {
        self.last_probe.lock().unwrap().clone()
    }

    /// Destroys a key's material on every token, then forgets its metadata and aliases. Token
    /// first: after a crash in between the row is still there, and the next pass destroys again
    /// (idempotent) and then forgets the key.
    ///
    /// The metadata goes first, leaving a tombstone: from then on the destruction is certain
    /// (the prober finishes it after a crash, on a token that was away, or when a disconnected
    /// store connects). With [`Removal::Due`], only a key still pending deletion and due goes: a
    /// CancelKeyDeletion that came in between wins. Returns whether the key went.
    async fn purge(&self, id: KeyId, removal: Removal) -> KmsResult<bool> {
        let store_id = self.db(move |s| s.key_store_of(&id)).await?;
        let removed = self
            .db(move |s| match removal {
                Removal::Due(now) => s.remove_due_key(&id, now),
                Removal::Intent(seen) => s.remove_intent(&id, &seen),
            })
            .await?;
        if !removed {
            return Ok(false);
        }
        let cluster = store_id
            .and_then(|s| self.key_store(&s))
            .and_then(|s| s.cluster());
        match cluster {
            Some(cluster) => {
                if let Err(e) = cluster.destroy_key(id.bytes()).await {
                    tracing::warn!(key_id = %id, error = %e, "key material not destroyed yet: the prober will");
                }
            }
            None => {
                tracing::warn!(key_id = %id, "the key's store is not connected: its material goes when the store connects")
            }
        }
        Ok(true)
    }

    /// Rolls back creations a crash interrupted: their token objects and rows go, so no
    /// half-made key remains. Run once at start-up, before serving.
    ///
    /// Only intents whose lease expired or whose owner process is gone from this host (see
    /// [`crate::intent`]): another process (a CLI's `key rotate-manually` or restore, a second
    /// server) may be making a key right now, and its intent is renewed while it does.
    /// Returns how many were rolled back.
    pub async fn recover(&self) -> KmsResult<usize> {
        let now = self.clock.now_ms();
        let intents = self.db(|s| s.creating_intents()).await?;
        let mut rolled_back = 0;
        for (id, lease) in intents {
            if lease.until_ms > now && !crate::intent::owner_is_gone(&lease.owner) {
                tracing::info!(key_id = %id, "a key creation in progress elsewhere is left alone");
                continue;
            }
            if self.purge(id, Removal::Intent(lease)).await? {
                rolled_back += 1;
                tracing::warn!(key_id = %id, "rolled back a key creation interrupted by a crash");
            }
        }
        Ok(rolled_back)
    }

    /// This process's lease on an intent, from now.
    fn lease(&self) -> IntentLease {
        IntentLease {
            owner: self.intent_owner.clone(),
            until_ms: self.clock.now_ms() + INTENT_LEASE_MS,
        }
    }

    /// Renews this process's lease on `id` every third of the lease until dropped.
    fn renew_while_creating(&self, id: KeyId) -> RenewalGuard {
        let (store, clock, owner) = (
            self.store.clone(),
            self.clock.clone(),
            self.intent_owner.clone(),
        );
        RenewalGuard(tokio::spawn(async move {
            let every = std::time::Duration::from_millis(INTENT_LEASE_MS as u64 / 3);
            loop {
                tokio::time::sleep(every).await;
                let lease = IntentLease {
                    owner: owner.clone(),
                    until_ms: clock.now_ms() + INTENT_LEASE_MS,
                };
                let store = store.clone();
                match tokio::task::spawn_blocking(move || store.renew_intent(&id, &lease)).await {
                    Ok(Ok(true)) => {}
                    // Rolled back by another process's recover: the commit will be refused.
                    Ok(Ok(false)) => return,
                    // A failed renewal is retried next round; the lease still has two thirds.
                    Ok(Err(e)) => {
                        tracing::warn!(key_id = %id, error = %e, "CreateKey intent lease not renewed")
                    }
                    Err(_) => return,
                }
            }
        }))
    }

    pub async fn create_key(&self, req: CreateKeyRequest) -> KmsResult<KeyMetadataResponse> {
        // The request's syntax first, every violation at once, as AWS does: an unknown KeySpec
        // is a ValidationException even where a real one would be "not supported".
        let description = req.description.unwrap_or_default();
        let tags = req.tags.unwrap_or_default();
        let mut violations = Violations::default();
        violations
            .length("description", &description, 0, 8192)
            .enumerated("keyUsage", req.key_usage.as_deref(), KEY_USAGE_VALUES)
            .enumerated(
                "customerMasterKeySpec",
                req.customer_master_key_spec.as_deref(),
                CUSTOMER_MASTER_KEY_SPEC_VALUES,
            )
            .enumerated("keySpec", req.key_spec.as_deref(), KEY_SPEC_VALUES)
            .enumerated("origin", req.origin.as_deref(), ORIGIN_VALUES);
        tag_violations(&mut violations, &tags);
        violations.check()?;
        check_tag_rules(&tags)?;
        if tags.len() > MAX_TAGS {
            return Err(KmsError::TagException(format!(
                "A key can have at most {MAX_TAGS} tags"
            )));
        }
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
            // AWS_KMS is AWS's own default, and tools send it explicitly (Ansible's kms_key
            // always does): the same as no Origin, the key goes to its store as usual.
            None | Some("AWS_KMS" | "AWS_CLOUDHSM") => {}
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
        let key_store = match &req.custom_key_store_id {
            Some(id) => self.named_store(id)?,
            None => self.default_key_store()?,
        };
        let _creating = key_store.creations.read().await;
        let cluster = key_store.connected_cluster()?;
        let record = key_store.record();
        let key = KeyRecord {
            key_id: KeyId::new_random(),
            created_ms: self.clock.now_ms(),
            description,
            state: KeyState::Creating,
            deletion_ms: None,
            pending_window_days: None,
            custom_key_store_id: record.id.clone(),
            tags: tags.into_iter().map(|t| (t.tag_key, t.tag_value)).collect(),
        };
        let id = key.key_id;
        // Intent first, then the token, then the commit: a crash anywhere leaves either nothing
        // visible (rolled back by `recover`) or a complete key.
        // The intent is leased to this process and renewed while the token works, so that
        // another process's `recover` leaves it alone.
        let (intent, lease) = (key.clone(), self.lease());
        self.db(move |s| s.begin_leased_create(&intent, &lease))
            .await?;
        let renewal = self.renew_while_creating(id);
        if let Err(e) = cluster.create_key(id.bytes(), record.min_tokens()).await {
            drop(renewal);
            let _ = cluster.destroy_key(id.bytes()).await;
            let _ = self.db(move |s| s.remove_key(&id)).await;
            return Err(KmsError::from_hsm(e));
        }
        drop(renewal);
        if let Err(e) = self.db(move |s| s.finish_create(&id)).await {
            // Not committed (e.g. rolled back meanwhile after a stall past the lease): the
            // material must not outlive its intent. A row still there is rolled back later.
            let _ = cluster.destroy_key(id.bytes()).await;
            return Err(e);
        }
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
        cluster: &Cluster,
        key: &KeyRecord,
        context: &EncryptionContext,
        plaintext: Zeroizing<Vec<u8>>,
    ) -> KmsResult<Vec<u8>> {
        let aad = CiphertextBlob::aad(&key.key_id, hsm::Kdf::AesCbcEncryptData, context);
        let sealed = cluster
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
        let algorithm =
            check_algorithm("encryptionAlgorithm", req.encryption_algorithm.as_deref())?;
        let plaintext = req.plaintext.0;
        if plaintext.is_empty() || plaintext.len() > MAX_PLAINTEXT {
            return Err(KmsError::Validation(format!(
                "Plaintext is {} bytes; it must be 1 to {MAX_PLAINTEXT} bytes",
                plaintext.len()
            )));
        }
        let context = EncryptionContext::new(req.encryption_context)?;
        let key = self.resolve(&req.key_id, true).await?;
        let cluster = self.require_enabled(&key)?;
        dry_run(req.dry_run)?;
        let blob = self.seal(&cluster, &key, &context, plaintext).await?;
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
        let cluster = self.require_enabled(&key)?;
        // A dry run checks everything up to the token and decrypts nothing.
        dry_run(dry_run_flag)?;
        let aad = CiphertextBlob::aad(&key.key_id, parsed.sealed.kdf, &context);
        let plaintext = cluster
            .decrypt(key.key_id.bytes(), aad, parsed.sealed)
            .await
            .map_err(KmsError::from_hsm)?;
        Ok((key, plaintext))
    }

    pub async fn decrypt(&self, req: DecryptRequest) -> KmsResult<DecryptResponse> {
        let algorithm =
            check_algorithm("encryptionAlgorithm", req.encryption_algorithm.as_deref())?;
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
        Violations::default()
            .enumerated(
                "sourceEncryptionAlgorithm",
                req.source_encryption_algorithm.as_deref(),
                ENCRYPTION_ALGORITHM_VALUES,
            )
            .enumerated(
                "destinationEncryptionAlgorithm",
                req.destination_encryption_algorithm.as_deref(),
                ENCRYPTION_ALGORITHM_VALUES,
            )
            .check()?;
        let source_algorithm = check_algorithm(
            "sourceEncryptionAlgorithm",
            req.source_encryption_algorithm.as_deref(),
        )?;
        let destination_algorithm = check_algorithm(
            "destinationEncryptionAlgorithm",
            req.destination_encryption_algorithm.as_deref(),
        )?;
        let destination_context = EncryptionContext::new(req.destination_encryption_context)?;
        let destination = self.resolve(&req.destination_key_id, true).await?;
        let destination_cluster = self.require_enabled(&destination)?;
        let (source, plaintext) = self
            .open(
                &req.ciphertext_blob.0,
                req.source_key_id.as_deref(),
                req.source_encryption_context,
                req.dry_run,
            )
            .await?;
        let blob = self
            .seal(
                &destination_cluster,
                &destination,
                &destination_context,
                plaintext,
            )
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
        Violations::default()
            .enumerated("keySpec", req.key_spec.as_deref(), DATA_KEY_SPEC_VALUES)
            .range("numberOfBytes", req.number_of_bytes, 1, MAX_DATA_KEY_BYTES)
            .check()?;
        let len = match (req.key_spec.as_deref(), req.number_of_bytes) {
            (Some(_), Some(_)) => {
                return Err(KmsError::Validation(
                    "Specify either KeySpec or NumberOfBytes, not both".into(),
                ))
            }
            (Some("AES_128"), None) => 16,
            (Some(_), None) => 32,
            (None, Some(n)) => n as usize,
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
        let cluster = self.require_enabled(&key)?;
        dry_run(req.dry_run)?;
        let aad = CiphertextBlob::aad(&key.key_id, hsm::Kdf::AesCbcEncryptData, &context);
        let (plaintext, sealed) = cluster
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
        Violations::default()
            .range("numberOfBytes", Some(n), 1, MAX_DATA_KEY_BYTES)
            .check()?;
        let key_store = match &req.custom_key_store_id {
            Some(id) => self.named_store(id)?,
            None => self.default_key_store()?,
        };
        if req.recipient.is_some() {
            return Err(KmsError::UnsupportedOperation(
                "Recipient (Nitro Enclaves attestation) is not supported".into(),
            ));
        }
        let bytes = key_store
            .connected_cluster()?
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
        let mut deleted = 0;
        for id in &due {
            if self.purge(*id, Removal::Due(now)).await? {
                deleted += 1;
                self.counters.keys_deleted.fetch_add(1, Ordering::Relaxed);
                tracing::info!(key_id = %id, "key deleted at the end of its waiting period");
            }
        }
        Ok(deleted)
    }

    pub async fn tag_resource(&self, req: TagResourceRequest) -> KmsResult<Empty> {
        let mut violations = Violations::default();
        tag_violations(&mut violations, &req.tags);
        violations.check()?;
        check_tag_rules(&req.tags)?;
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
        Violations::default()
            .length("description", &req.description, 0, 8192)
            .check()?;
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

    /// ListKeyRotations: none, ever, as AWS answers for a key in a custom key store (such keys
    /// cannot rotate); the key must exist.
    pub async fn list_key_rotations(
        &self,
        req: ListKeyRotationsRequest,
    ) -> KmsResult<ListKeyRotationsResponse> {
        Violations::default()
            .enumerated(
                "includeKeyMaterial",
                req.include_key_material.as_deref(),
                INCLUDE_KEY_MATERIAL_VALUES,
            )
            .range("limit", req.limit, 1, 1000)
            .check()?;
        self.resolve(&req.key_id, false).await?;
        if let Some(m) = req.marker {
            // No page ever ended with a marker, so none is valid.
            return Err(KmsError::InvalidMarker(format!("Invalid marker {m}")));
        }
        Ok(ListKeyRotationsResponse {
            rotations: Vec::new(),
            truncated: false,
        })
    }

    /// EnableKeyRotation, DisableKeyRotation, RotateKeyOnDemand: the key must exist, and then
    /// the answer is no, as AWS answers for keys in a custom key store.
    pub async fn refuse_rotation(&self, req: KeyIdRequest) -> KmsResult<Empty> {
        self.resolve(&req.key_id, false).await?;
        Err(refuse_rotation())
    }

    /// The key stores and their tokens. A connected store is CONNECTED while one token can
    /// serve; with none, FAILED with INSUFFICIENT_CLOUDHSM_HSMS, AWS's code for a cluster
    /// without an active HSM.
    pub async fn describe_custom_key_stores(
        &self,
        req: DescribeCustomKeyStoresRequest,
    ) -> KmsResult<DescribeCustomKeyStoresResponse> {
        let limit = page_limit(req.limit, 1000, 1000)?;
        if req.custom_key_store_id.is_some() && req.custom_key_store_name.is_some() {
            return Err(KmsError::Validation(
                "Specify CustomKeyStoreId or CustomKeyStoreName, not both".into(),
            ));
        }
        let mut stores: Vec<Arc<KeyStore>> = self.key_stores();
        if let Some(id) = &req.custom_key_store_id {
            stores.retain(|s| s.id() == *id);
            if stores.is_empty() {
                return Err(KmsError::CustomKeyStoreNotFound(format!(
                    "Custom key store {id} does not exist"
                )));
            }
        }
        if let Some(name) = &req.custom_key_store_name {
            stores.retain(|s| s.record().name == *name);
            if stores.is_empty() {
                return Err(KmsError::CustomKeyStoreNotFound(format!(
                    "Custom key store {name} does not exist"
                )));
            }
        }
        if let Some(marker) = &req.marker {
            if !marker.starts_with("cks-") {
                return Err(KmsError::InvalidMarker(format!("Invalid marker {marker}")));
            }
            stores.retain(|s| s.id().as_str() > marker.as_str());
        }
        let truncated = stores.len() > limit;
        stores.truncate(limit);
        let next_marker = truncated.then(|| stores.last().map(|s| s.id())).flatten();
        Ok(DescribeCustomKeyStoresResponse {
            custom_key_stores: stores.iter().map(|s| describe_store(s)).collect(),
            next_marker,
            truncated,
        })
    }

    /// Records the configuration's key store the first time the service starts with it; from
    /// then on the metadata holds it (and it may be changed or deleted through the API).
    pub async fn seed_key_store(&self, record: KeyStoreRecord) -> KmsResult<()> {
        let _defining = self.defining.lock().await;
        let seeded_setting = format!("key_store_seeded:{}", record.id);
        let id = record.id.clone();
        let seeded = {
            let name = seeded_setting.clone();
            self.db(move |s| s.setting(&name)).await?.is_some()
        };
        if let Some(existing) = self.key_store(&id) {
            let current = existing.record();
            if current.tokens != record.tokens
                || current.min_tokens != record.min_tokens
                || current.name != record.name
            {
                tracing::warn!(key_store = %id, "the configuration's [key_store] differs from the store in the metadata, which is what counts; change the store with `hsmkms store update|add-token|remove-token`");
            }
            return Ok(());
        }
        if seeded {
            tracing::info!(key_store = %id, "the configuration's key store was deleted through the API; not made again");
            return Ok(());
        }
        // The connection state a release without the key_stores table kept in a setting.
        let legacy = self
            .db(|s| s.setting("key_store_connected"))
            .await?
            .as_deref()
            != Some("false");
        let record = KeyStoreRecord {
            want_connected: legacy,
            ..record
        };
        self.check_claims(&record)?;
        let put = record.clone();
        self.db(move |s| {
            s.put_key_store(&put)?;
            s.set_setting(&seeded_setting, "true")
        })
        .await?;
        tracing::info!(key_store = %id, tokens = record.tokens.len(), "key store recorded from the configuration");
        self.key_stores
            .write()
            .unwrap()
            .insert(id, Arc::new(KeyStore::new(record)));
        Ok(())
    }

    /// Connects every store that was connected when the service last ran (at start-up).
    pub async fn connect_wanted_stores(&self) {
        for store in self.key_stores() {
            if store.record().want_connected {
                let _changing = store.changing.lock().await;
                self.open_store(&store).await;
            }
        }
    }

    /// Starts a store's tokens; the outcome is the store's connection state.
    async fn open_store(&self, store: &KeyStore) {
        store.set_connection(Connection::Connecting);
        let record = store.record();
        let id = record.id.clone();
        // Deleted keys count too: their tombstones mean the domain key existed.
        let holds_keys = match self
            .db(move |s| Ok(!s.store_key_ids(&id)?.is_empty() || !s.tombstones(&id)?.is_empty()))
            .await
        {
            Ok(h) => h,
            Err(e) => {
                store.set_connection(Connection::Failed(crate::key_stores::ConnectFailure {
                    code: "INTERNAL_ERROR",
                    message: e.to_string(),
                }));
                return;
            }
        };
        match crate::key_stores::open_cluster(&record, &self.command, holds_keys).await {
            Ok(cluster) => {
                tracing::info!(key_store = %record.id, tokens = record.tokens.len(), "custom key store connected");
                store.set_connection(Connection::Connected(Arc::new(cluster)));
            }
            Err(failure) => {
                tracing::error!(key_store = %record.id, code = failure.code, error = %failure.message, "custom key store failed to connect");
                store.set_connection(Connection::Failed(failure));
            }
        }
    }

    /// A store taken before a lock may have been deleted while waiting for it.
    fn still_there(&self, store: &Arc<KeyStore>) -> KmsResult<()> {
        match self.key_store(&store.id()) {
            Some(current) if Arc::ptr_eq(&current, store) => Ok(()),
            _ => Err(KmsError::CustomKeyStoreNotFound(format!(
                "Custom key store {} does not exist",
                store.id()
            ))),
        }
    }

    async fn save_store(&self, store: &KeyStore, record: KeyStoreRecord) -> KmsResult<()> {
        let put = record.clone();
        self.db(move |s| s.put_key_store(&put)).await?;
        store.set_record(record);
        Ok(())
    }

    /// Makes a custom key store of PKCS#11 tokens, DISCONNECTED until ConnectCustomKeyStore.
    pub async fn create_custom_key_store(
        &self,
        req: CreateCustomKeyStoreRequest,
    ) -> KmsResult<CreateCustomKeyStoreResponse> {
        match req.custom_key_store_type.as_deref() {
            Some(crate::key_stores::STORE_TYPE) => {}
            None | Some("AWS_CLOUDHSM") => {
                return Err(KmsError::UnsupportedOperation(format!(
                    "CloudHSM key stores (CloudHsmClusterId, TrustAnchorCertificate, KeyStorePassword) are not \
                     supported: create a store of PKCS#11 tokens with CustomKeyStoreType {} and HsmkmsTokens \
                     (docs/api.md), e.g. with `hsmkms store create`",
                    crate::key_stores::STORE_TYPE
                )))
            }
            Some("EXTERNAL_KEY_STORE") => {
                return Err(KmsError::UnsupportedOperation(
                    "External key stores are not supported: hsmkms is the key store".into(),
                ))
            }
            Some(other) => {
                return Err(KmsError::Validation(format!(
                    "CustomKeyStoreType {other} is not one of {}, AWS_CLOUDHSM, EXTERNAL_KEY_STORE",
                    crate::key_stores::STORE_TYPE
                )))
            }
        }
        if req.trust_anchor_certificate.is_some()
            || req.key_store_password.is_some()
            || req.xks.any()
        {
            return Err(KmsError::UnsupportedOperation(format!(
                "A {} store takes no TrustAnchorCertificate, KeyStorePassword or XksProxy members: each token's \
                 PIN is read from its PinFile on the service's host",
                crate::key_stores::STORE_TYPE
            )));
        }
        let tokens = req
            .hsmkms_tokens
            .ok_or_else(|| KmsError::Validation("HsmkmsTokens is required".into()))?
            .into_iter()
            .map(token_entry)
            .collect::<KmsResult<Vec<_>>>()?;
        let cluster_id = match req.cloud_hsm_cluster_id {
            Some(c) => {
                if !(c.starts_with("cluster-") && (9..=64).contains(&c.len())) {
                    return Err(KmsError::Validation(format!(
                        "CloudHsmClusterId {c:?} must begin with \"cluster-\""
                    )));
                }
                c
            }
            None => crate::ids::new_cluster_id(),
        };
        let record = KeyStoreRecord {
            id: crate::ids::new_custom_key_store_id(),
            name: req.custom_key_store_name,
            cluster_id,
            tokens,
            min_tokens: req.hsmkms_min_tokens,
            dev: req.hsmkms_dev_store.unwrap_or(false),
            created_ms: self.clock.now_ms(),
            want_connected: false,
        };
        record.validate()?;
        let _defining = self.defining.lock().await;
        self.check_claims(&record)?;
        let put = record.clone();
        self.db(move |s| s.put_key_store(&put)).await?;
        let id = record.id.clone();
        tracing::info!(key_store = %id, name = %record.name, tokens = record.tokens.len(), "custom key store created");
        self.key_stores
            .write()
            .unwrap()
            .insert(id.clone(), Arc::new(KeyStore::new(record)));
        Ok(CreateCustomKeyStoreResponse {
            custom_key_store_id: id,
        })
    }

    /// What a new store claims must be free: its name (checked first, as AWS does) and its tokens.
    fn check_claims(&self, record: &KeyStoreRecord) -> KmsResult<()> {
        if let Some(other) = self
            .key_stores()
            .into_iter()
            .find(|s| s.record().name == record.name)
        {
            return Err(KmsError::CustomKeyStoreNameInUse(format!(
                "The name {:?} of custom key store {} is already used by custom key store {}",
                record.name,
                record.id,
                other.id()
            )));
        }
        self.check_tokens_free(&record.id, &record.tokens)
    }

    /// A token serves one store only: two stores' probers would destroy each other's keys.
    fn check_tokens_free(
        &self,
        store_id: &str,
        tokens: &[crate::config::TokenEntry],
    ) -> KmsResult<()> {
        for other in self.key_stores() {
            let other = other.record();
            if other.id == store_id {
                continue;
            }
            if let Some(t) = tokens.iter().find(|t| {
                other
                    .tokens
                    .iter()
                    .any(|o| crate::key_stores::same_token(o, t))
            }) {
                return Err(KmsError::ClusterInUse(format!(
                    "Token {:?} already belongs to custom key store {}",
                    t.label, other.id
                )));
            }
        }
        Ok(())
    }

    /// Renames a store, replaces its tokens (disconnected), or adds and removes tokens (live).
    pub async fn update_custom_key_store(
        &self,
        req: UpdateCustomKeyStoreRequest,
    ) -> KmsResult<Empty> {
        let store = self.named_store(&req.custom_key_store_id)?;
        if req.cloud_hsm_cluster_id.is_some() || req.key_store_password.is_some() || req.xks.any() {
            return Err(KmsError::UnsupportedOperation(
                "CloudHsmClusterId, KeyStorePassword and XksProxy members do not apply to a store of PKCS#11 tokens: \
                 change its tokens with HsmkmsTokens, HsmkmsAddTokens or HsmkmsRemoveTokens; PINs are read from each \
                 token's PinFile"
                    .into(),
            ));
        }
        if req.hsmkms_tokens.is_some()
            && (req.hsmkms_add_tokens.is_some() || req.hsmkms_remove_tokens.is_some())
        {
            return Err(KmsError::Validation(
                "Give HsmkmsTokens, or HsmkmsAddTokens and HsmkmsRemoveTokens, not both".into(),
            ));
        }
        let _defining = self.defining.lock().await;
        let _changing = store.changing.lock().await;
        self.still_there(&store)?;
        let mut record = store.record();
        if let Some(name) = req.new_custom_key_store_name {
            record.name = name;
        }
        if let Some(m) = req.hsmkms_min_tokens {
            record.min_tokens = Some(m);
        }
        let connected = store.cluster();
        if let Some(tokens) = req.hsmkms_tokens {
            if !matches!(
                store.connection(),
                Connection::Disconnected | Connection::Failed(_)
            ) {
                return Err(KmsError::CustomKeyStoreInvalidState(format!(
                    "Custom key store {} must be disconnected to replace its tokens (HsmkmsAddTokens and \
                     HsmkmsRemoveTokens work while it is connected)",
                    record.id
                )));
            }
            let tokens: Vec<crate::config::TokenEntry> = tokens
                .into_iter()
                .map(token_entry)
                .collect::<KmsResult<_>>()?;
            // Dropping a token of a store with keys could drop the only copy of one: that goes
            // through HsmkmsRemoveTokens on the connected store, which checks.
            let id = record.id.clone();
            let holds_keys =
                self.db(move |s| {
                    Ok(!s.store_key_ids(&id)?.is_empty() || !s.tombstones(&id)?.is_empty())
                })
                .await?;
            let drops = record
                .tokens
                .iter()
                .any(|old| !tokens.iter().any(|t| crate::key_stores::same_token(old, t)));
            if holds_keys && drops {
                return Err(KmsError::CustomKeyStoreInvalidState(format!(
                    "Custom key store {} holds keys: HsmkmsTokens may only add tokens to it; remove a token with \
                     HsmkmsRemoveTokens on the connected store, which first checks that the others hold every key",
                    record.id
                )));
            }
            record.tokens = tokens;
        }
        let added: Vec<crate::config::TokenEntry> = req
            .hsmkms_add_tokens
            .unwrap_or_default()
            .into_iter()
            .map(token_entry)
            .collect::<KmsResult<_>>()?;
        for t in &added {
            if record
                .tokens
                .iter()
                .any(|o| crate::key_stores::same_token(o, t))
            {
                return Err(KmsError::Validation(format!(
                    "Token {:?} is already in custom key store {}",
                    t.label, record.id
                )));
            }
        }
        record.tokens.extend(added.iter().cloned());
        let removed = req.hsmkms_remove_tokens.unwrap_or_default();
        if let Some(both) = added.iter().find(|t| removed.contains(&t.label)) {
            return Err(KmsError::Validation(format!(
                "Token {:?} is both added and removed: do one, then the other",
                both.label
            )));
        }
        for label in &removed {
            let before = record.tokens.len();
            record.tokens.retain(|t| t.label != *label);
            if record.tokens.len() == before {
                return Err(KmsError::Validation(format!(
                    "Custom key store {} has no token labelled {label:?}",
                    record.id
                )));
            }
        }
        record.validate()?;
        self.check_tokens_free(&record.id, &record.tokens)?;
        if !removed.is_empty() && connected.is_none() {
            return Err(KmsError::CustomKeyStoreInvalidState(format!(
                "Custom key store {} must be connected to remove a token: hsmkms first checks that the remaining \
                 tokens hold every key (to replace the tokens of a disconnected store, give HsmkmsTokens)",
                record.id
            )));
        }
        match connected {
            Some(cluster) if !added.is_empty() || !removed.is_empty() => {
                // Creations finish before tokens leave, and new ones wait for the new cluster.
                let _no_creations = if removed.is_empty() {
                    None
                } else {
                    Some(store.creations.write().await)
                };
                let cluster = self
                    .change_tokens(&record, &cluster, &added, &removed)
                    .await?;
                self.save_store(&store, record).await?;
                store.set_connection(Connection::Connected(Arc::new(cluster)));
            }
            _ => self.save_store(&store, record).await?,
        }
        Ok(Empty {})
    }

    /// The new cluster of a connected store after adding and removing tokens. An added token
    /// gets the domain key and every key of the store before it serves; a token is removed
    /// only when the remaining ones hold every key.
    async fn change_tokens(
        &self,
        record: &KeyStoreRecord,
        cluster: &Cluster,
        added: &[crate::config::TokenEntry],
        removed: &[String],
    ) -> KmsResult<Cluster> {
        let unavailable = |what: &str, f: crate::key_stores::ConnectFailure| {
            KmsError::CustomKeyStoreInvalidState(format!("{what}: {} ({})", f.message, f.code))
        };
        let mut pools: Vec<hsm::TokenPool> = cluster
            .tokens()
            .iter()
            .filter(|t| !removed.iter().any(|r| r == t.label()))
            .cloned()
            .collect();
        if !added.is_empty() {
            crate::key_stores::establish_domain(&record.tokens, &self.command, false)
                .await
                .map_err(|f| {
                    unavailable("the domain key could not be carried to the new tokens", f)
                })?;
            let keys = self.store_key_set(&record.id).await?;
            for entry in added {
                // Not start_or_down: a token being added must be reachable now.
                let pool = crate::key_stores::start_token(entry, &self.command, false)
                    .await
                    .map_err(|f| {
                        unavailable(&format!("token {:?} cannot be reached", entry.label), f)
                    })?;
                let held: std::collections::HashSet<_> = pool
                    .list_keys()
                    .await
                    .map_err(KmsError::from_hsm)?
                    .into_iter()
                    .collect();
                let mut copied = 0;
                for key in keys.iter().filter(|k| !held.contains(*k)) {
                    let wrapped = match cluster.export_key(*key).await {
                        Ok(w) => w,
                        // A key still being made (or rolled back) is not on the tokens yet; the
                        // prober copies it later if it stays.
                        Err(hsm::HsmError::KeyNotFound { .. }) => continue,
                        Err(e) => return Err(KmsError::from_hsm(e)),
                    };
                    pool.import_key(*key, wrapped)
                        .await
                        .map_err(KmsError::from_hsm)?;
                    copied += 1;
                }
                tracing::info!(key_store = %record.id, token = %entry.label, copied, "token added to the key store");
                pools.push(pool);
            }
        }
        if !removed.is_empty() {
            // Every key must stay somewhere: catch the remaining tokens up first (a copy that
            // fails is not fatal here), then check.
            let mut report = ProbeReport::default();
            if let Err(e) = self
                .probe_store(&record.id, cluster, &mut report, removed)
                .await
            {
                tracing::warn!(key_store = %record.id, error = %e, "catch-up before removing tokens was incomplete");
            }
            let keys = self.store_key_set(&record.id).await?;
            let mut held = std::collections::HashSet::new();
            for pool in pools.iter().filter(|p| p.is_up()) {
                held.extend(pool.list_keys().await.map_err(KmsError::from_hsm)?);
            }
            if let Some(missing) = keys.iter().find(|k| !held.contains(*k)) {
                return Err(KmsError::CustomKeyStoreInvalidState(format!(
                    "Key {} is on no remaining token that is up; bring the tokens up (or wait for the prober) before \
                     removing {removed:?}",
                    KeyId(*missing)
                )));
            }
            tracing::info!(key_store = %record.id, tokens = ?removed, "tokens removed from the key store");
        }
        Ok(Cluster::new(record.cluster_id.clone(), pools)
            .map_err(KmsError::from_hsm)?
            .continue_counters(cluster))
    }

    /// Forgets a store that holds no keys and is disconnected, as AWS requires. Its tokens and
    /// their domain key are untouched.
    pub async fn delete_custom_key_store(&self, req: CustomKeyStoreIdRequest) -> KmsResult<Empty> {
        let store = self.named_store(&req.custom_key_store_id)?;
        let _defining = self.defining.lock().await;
        let _changing = store.changing.lock().await;
        self.still_there(&store)?;
        if !matches!(store.connection(), Connection::Disconnected) {
            return Err(KmsError::CustomKeyStoreInvalidState(format!(
                "Custom key store {} must be disconnected before it is deleted",
                req.custom_key_store_id
            )));
        }
        let id = req.custom_key_store_id.clone();
        self.db(move |s| s.delete_key_store(&id)).await?;
        self.key_stores
            .write()
            .unwrap()
            .remove(&req.custom_key_store_id);
        tracing::info!(key_store = %req.custom_key_store_id, "custom key store deleted");
        Ok(Empty {})
    }

    /// Connects a store: its tokens' workers start and its keys become usable. Answers once
    /// connected or failed, or after [`CONNECT_WAIT`] with the store still CONNECTING (then
    /// DescribeCustomKeyStores tells the outcome). Connecting a connected store does nothing.
    pub async fn connect_custom_key_store(
        self: &Arc<Self>,
        req: CustomKeyStoreIdRequest,
    ) -> KmsResult<Empty> {
        let store = self.named_store(&req.custom_key_store_id)?;
        let connection = store.connection();
        // As AWS: a FAILED store is disconnected first (DisconnectCustomKeyStore), then connected.
        if connection.state() == "FAILED" {
            return Err(KmsError::CustomKeyStoreInvalidState(format!(
                "Custom key store {} is FAILED: disconnect it (DisconnectCustomKeyStore), then connect it",
                req.custom_key_store_id
            )));
        }
        match connection {
            Connection::Connected(_) | Connection::Connecting => return Ok(Empty {}),
            Connection::Disconnected | Connection::Failed(_) => {}
        }
        {
            let _changing = store.changing.lock().await;
            self.still_there(&store)?;
            let mut record = store.record();
            if !record.want_connected {
                record.want_connected = true;
                self.save_store(&store, record).await?;
            }
        }
        let service = self.clone();
        let task = tokio::spawn(async move {
            let _changing = store.changing.lock().await;
            if service.still_there(&store).is_ok()
                && matches!(
                    store.connection(),
                    Connection::Disconnected | Connection::Failed(_)
                )
            {
                service.open_store(&store).await;
            }
        });
        let _ = tokio::time::timeout(CONNECT_WAIT, task).await;
        Ok(Empty {})
    }

    /// Disconnects a store: its token workers stop (once requests in flight finish) and its
    /// keys are Unavailable (KMSInvalidStateException) until it is connected again.
    pub async fn disconnect_custom_key_store(
        &self,
        req: CustomKeyStoreIdRequest,
    ) -> KmsResult<Empty> {
        let store = self.named_store(&req.custom_key_store_id)?;
        let _changing = store.changing.lock().await;
        self.still_there(&store)?;
        if matches!(store.connection(), Connection::Disconnected) {
            return Err(KmsError::CustomKeyStoreInvalidState(format!(
                "Custom key store {} is already disconnected",
                req.custom_key_store_id
            )));
        }
        let mut record = store.record();
        if record.want_connected {
            record.want_connected = false;
            self.save_store(&store, record).await?;
        }
        store.set_connection(Connection::Disconnected);
        tracing::info!(key_store = %req.custom_key_store_id, "custom key store disconnected");
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
                custom_key_store_id: Some(old.custom_key_store_id.clone()),
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

/// How long ConnectCustomKeyStore waits for the tokens before answering.
pub const CONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// A token descriptor of the API as the configuration's token entry.
fn token_entry(t: TokenDescriptor) -> KmsResult<crate::config::TokenEntry> {
    Ok(crate::config::TokenEntry {
        module: t.module.into(),
        label: t.label,
        pin_file: t.pin_file.into(),
        so_pin_file: t.so_pin_file.map(Into::into),
        workers: t.workers,
        env: t.env,
    })
}

fn describe_store(store: &KeyStore) -> CustomKeyStoreEntry {
    let record = store.record();
    let connection = store.connection();
    let state = connection.state();
    let (code, error) = match &connection {
        Connection::Failed(f) => (Some(f.code), Some(f.message.clone())),
        Connection::Connected(_) if state == "FAILED" => (Some("INSUFFICIENT_CLOUDHSM_HSMS"), None),
        _ => (None, None),
    };
    let tokens = match &connection {
        Connection::Connected(cluster) => cluster
            .status()
            .into_iter()
            .zip(&record.tokens)
            .map(|(t, entry)| TokenHealthEntry {
                label: t.label,
                module: entry.module.display().to_string(),
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
            .collect(),
        _ => record
            .tokens
            .iter()
            .map(|entry| TokenHealthEntry {
                label: entry.label.clone(),
                module: entry.module.display().to_string(),
                serial: String::new(),
                manufacturer: String::new(),
                model: String::new(),
                state: "DISCONNECTED",
                worker_restarts: 0,
                last_error: None,
            })
            .collect(),
    };
    CustomKeyStoreEntry {
        custom_key_store_id: record.id.clone(),
        custom_key_store_name: record.name.clone(),
        custom_key_store_type: crate::key_stores::STORE_TYPE,
        cloud_hsm_cluster_id: record.cluster_id.clone(),
        connection_state: state,
        connection_error_code: code,
        creation_date: epoch_seconds(record.created_ms),
        hsmkms_tokens: tokens,
        hsmkms_min_tokens: record.min_tokens(),
        hsmkms_dev_store: record.dev,
        hsmkms_connection_error: error,
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
