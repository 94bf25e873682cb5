//! Custom key stores: each a cluster of PKCS#11 tokens, recorded in the metadata and connected
//! (its token workers running) or not.
//!
//! A store's definition lives in the metadata, so that CreateCustomKeyStore, UpdateCustomKeyStore
//! and the `hsmkms store` commands change it on a live service; the `[key_store]` of the
//! configuration file only seeds it the first time (docs/clusters.md).

use std::sync::{Arc, RwLock};

use hsm::{Cluster, HsmError, TokenPool, WorkerCommand};
use serde::{Deserialize, Serialize};

use crate::app::token_config;
use crate::config::{read_secret_file, TokenEntry};
use crate::error::{KmsError, KmsResult};

/// The store type of hsmkms's token clusters. AWS_CLOUDHSM's fields (a CloudHSM cluster id, a
/// trust anchor, the kmsuser password) do not describe PKCS#11 tokens; see docs/api.md.
pub const STORE_TYPE: &str = "HSMKMS_PKCS11";

/// A custom key store as the metadata records it. Paths are absolute; PINs are never in here,
/// only the files that hold them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyStoreRecord {
    pub id: String,
    pub name: String,
    pub cluster_id: String,
    pub tokens: Vec<TokenEntry>,
    /// CreateKey succeeds once the key is on this many tokens (default: all of them, at most 2).
    pub min_tokens: Option<usize>,
    /// A development store may have a single token.
    #[serde(default)]
    pub dev: bool,
    pub created_ms: i64,
    /// Whether the store should be connected: ConnectCustomKeyStore sets it, Disconnect clears
    /// it, and a restart honours it.
    pub want_connected: bool,
}

impl KeyStoreRecord {
    pub fn min_tokens(&self) -> usize {
        self.min_tokens
            .unwrap_or(self.tokens.len().min(2))
            .clamp(1, self.tokens.len().max(1))
    }

    /// Checks what a store needs of its tokens; the errors say why, as AWS's do.
    pub fn validate(&self) -> KmsResult<()> {
        let n = self.name.chars().count();
        if n == 0 || n > 256 {
            return Err(KmsError::Validation(
                "CustomKeyStoreName must be 1 to 256 characters long".into(),
            ));
        }
        if self.tokens.is_empty() {
            return Err(KmsError::Validation(
                "A key store needs at least one token (HsmkmsTokens)".into(),
            ));
        }
        if self.tokens.len() < 2 && !self.dev {
            return Err(KmsError::ClusterInvalidConfiguration(
                "A key store needs at least two tokens, so that it keeps every key and keeps serving when one \
                 token is lost (as a CloudHSM key store needs two HSMs). For a development store of one token, \
                 set HsmkmsDevStore (hsmkms store create --dev)."
                    .into(),
            ));
        }
        if let Some(m) = self.min_tokens {
            if m == 0 || m > self.tokens.len() {
                return Err(KmsError::Validation(format!(
                    "HsmkmsMinTokens {m} must be between 1 and the number of tokens ({})",
                    self.tokens.len()
                )));
            }
        }
        for (i, t) in self.tokens.iter().enumerate() {
            check_token(t, self.tokens.len() > 1)?;
            if self.tokens[..i].iter().any(|o| same_token(o, t)) {
                return Err(KmsError::Validation(format!(
                    "Token {:?} of module {} is named twice",
                    t.label,
                    t.module.display()
                )));
            }
        }
        Ok(())
    }
}

/// Whether two entries name the same token: same module, label and environment (SoftHSM2's
/// configuration file, a network HSM's client configuration).
pub fn same_token(a: &TokenEntry, b: &TokenEntry) -> bool {
    a.module == b.module && a.label == b.label && a.env == b.env
}

fn check_token(t: &TokenEntry, in_cluster: bool) -> KmsResult<()> {
    let bad = |why: String| Err(KmsError::Validation(why));
    if !t.module.is_absolute() || !t.module.is_file() {
        return bad(format!(
            "Module {} is not an absolute path to a PKCS#11 library on the service's host",
            t.module.display()
        ));
    }
    if t.label.is_empty() || t.label.len() > 32 {
        return bad(format!(
            "Token label {:?} must be 1 to 32 bytes long",
            t.label
        ));
    }
    if !t.pin_file.is_absolute() {
        return bad(format!(
            "PinFile {} must be an absolute path",
            t.pin_file.display()
        ));
    }
    // The PIN is read only to see that the file is usable; it is dropped at once.
    read_secret_file(&t.pin_file).map_err(KmsError::Validation)?;
    match &t.so_pin_file {
        Some(f) if !f.is_absolute() => {
            return bad(format!("SoPinFile {} must be an absolute path", f.display()))
        }
        Some(f) => {
            read_secret_file(f).map_err(KmsError::Validation)?;
        }
        None if in_cluster => {
            return bad(format!(
                "Token {:?} needs SoPinFile: the tokens of a cluster share a domain key, which only the \
                 Security Officer can set up",
                t.label
            ))
        }
        None => {}
    }
    if t.workers.is_some_and(|w| w == 0 || w > 256) {
        return bad(format!(
            "Workers for token {:?} must be between 1 and 256",
            t.label
        ));
    }
    Ok(())
}

/// Why a store could not connect, with AWS's ConnectionErrorCode.
#[derive(Debug, Clone)]
pub struct ConnectFailure {
    pub code: &'static str,
    pub message: String,
}

impl ConnectFailure {
    /// Classified by the error's typed code and cause, never by its text.
    fn from_hsm(e: &HsmError) -> ConnectFailure {
        let text = e.to_string();
        let code = if e.ckr() == Some(hsm::error::Ckr::PIN_LOCKED) {
            "USER_LOCKED_OUT"
        } else if e.is_pin_failure() {
            "INVALID_CREDENTIALS"
        } else if matches!(
            e.cause(),
            Some(hsm::error::Cause::TokenNotFound | hsm::error::Cause::ModuleNotLoadable)
        ) {
            "CLUSTER_NOT_FOUND"
        } else if matches!(
            e,
            HsmError::TokenUnavailable { .. } | HsmError::ClusterUnavailable { .. }
        ) {
            "INSUFFICIENT_CLOUDHSM_HSMS"
        } else {
            "INTERNAL_ERROR"
        };
        ConnectFailure {
            code,
            message: text,
        }
    }
}

/// Where a store is between DisconnectCustomKeyStore and serving.
#[derive(Clone)]
pub enum Connection {
    Disconnected,
    Connecting,
    Connected(Arc<Cluster>),
    Failed(ConnectFailure),
}

impl Connection {
    /// AWS's ConnectionState.
    pub fn state(&self) -> &'static str {
        match self {
            Connection::Disconnected => "DISCONNECTED",
            Connection::Connecting => "CONNECTING",
            Connection::Failed(_) => "FAILED",
            Connection::Connected(cluster) if cluster.tokens().iter().any(|t| t.is_up()) => {
                "CONNECTED"
            }
            // Connected, but no token answers: as AWS reports a cluster without an active HSM.
            Connection::Connected(_) => "FAILED",
        }
    }
}

/// A store of the running service: its record and its connection.
pub struct KeyStore {
    record: RwLock<KeyStoreRecord>,
    connection: RwLock<Connection>,
    /// Connect, disconnect and changes of tokens run one at a time per store.
    pub(crate) changing: tokio::sync::Mutex<()>,
    /// Held shared by each CreateKey from its intent to its commit, and exclusively while
    /// tokens leave: a key made meanwhile could otherwise land only on leaving tokens.
    pub(crate) creations: tokio::sync::RwLock<()>,
    /// Failed connection attempts in a row, and when the last ended: retries back off.
    failures: std::sync::Mutex<(u32, Option<std::time::Instant>)>,
}

impl KeyStore {
    pub fn new(record: KeyStoreRecord) -> KeyStore {
        KeyStore {
            record: RwLock::new(record),
            connection: RwLock::new(Connection::Disconnected),
            changing: tokio::sync::Mutex::new(()),
            creations: tokio::sync::RwLock::new(()),
            failures: std::sync::Mutex::new((0, None)),
        }
    }

    /// Whether an automatic retry of a failed connection is due: 5 s after the first failure,
    /// doubling up to 5 minutes.
    pub(crate) fn retry_due(&self) -> bool {
        let (n, last) = *self.failures.lock().unwrap();
        let wait = std::time::Duration::from_secs((5u64 << n.min(6)).min(300));
        last.is_none_or(|t| t.elapsed() >= wait)
    }

    pub fn record(&self) -> KeyStoreRecord {
        self.record.read().unwrap().clone()
    }

    pub fn id(&self) -> String {
        self.record.read().unwrap().id.clone()
    }

    /// Reported with every key's metadata: read without copying the whole record.
    pub fn cluster_id(&self) -> String {
        self.record.read().unwrap().cluster_id.clone()
    }

    pub(crate) fn set_record(&self, record: KeyStoreRecord) {
        *self.record.write().unwrap() = record;
    }

    pub fn connection(&self) -> Connection {
        self.connection.read().unwrap().clone()
    }

    pub(crate) fn set_connection(&self, connection: Connection) {
        {
            let mut failures = self.failures.lock().unwrap();
            match &connection {
                Connection::Failed(_) => {
                    *failures = (
                        failures.0.saturating_add(1),
                        Some(std::time::Instant::now()),
                    )
                }
                Connection::Connected(_) | Connection::Disconnected => *failures = (0, None),
                Connection::Connecting => {}
            }
        }
        *self.connection.write().unwrap() = connection;
    }

    /// The cluster, or why the store's keys cannot be used now.
    pub fn connected_cluster(&self) -> KmsResult<Arc<Cluster>> {
        match self.connection() {
            Connection::Connected(c) => Ok(c),
            other => Err(KmsError::CustomKeyStoreInvalidState(format!(
                "Custom key store {} is {}; connect it with ConnectCustomKeyStore",
                self.id(),
                other.state().to_lowercase()
            ))),
        }
    }

    /// The cluster, when connected.
    pub fn cluster(&self) -> Option<Arc<Cluster>> {
        match &*self.connection.read().unwrap() {
            Connection::Connected(c) => Some(c.clone()),
            _ => None,
        }
    }
}

/// Sets up (or checks) the domain key on the tokens that have an SO PIN file, when all do. A new
/// domain key is made only if `may_create` (the store holds no keys yet).
pub async fn establish_domain(
    tokens: &[TokenEntry],
    command: &WorkerCommand,
    may_create: bool,
) -> Result<Option<[u8; 8]>, ConnectFailure> {
    if tokens.iter().any(|t| t.so_pin_file.is_none()) {
        return Ok(None);
    }
    let mut targets = Vec::new();
    for t in tokens {
        let so_pin_file = t.so_pin_file.as_ref().expect("checked above");
        targets.push(hsm::admin::AdminTarget {
            token: token_config(t).map_err(internal)?,
            so_pin: read_secret_file(so_pin_file).map_err(internal)?,
        });
    }
    let kcv = hsm::admin::establish_domain(&targets, command, may_create)
        .await
        .map_err(|e| ConnectFailure::from_hsm(&e))?;
    Ok(Some(kcv))
}

fn internal(message: String) -> ConnectFailure {
    ConnectFailure {
        code: "INTERNAL_ERROR",
        message,
    }
}

/// Starts one token's workers. In a cluster a token that is unreachable now gives a pool marked
/// down (the others serve meanwhile, and the prober revives it); a refused PIN is an error.
pub async fn start_token(
    entry: &TokenEntry,
    command: &WorkerCommand,
    in_cluster: bool,
) -> Result<TokenPool, ConnectFailure> {
    let token = token_config(entry).map_err(internal)?;
    let workers = token.workers;
    let pool = if in_cluster {
        TokenPool::start_or_down(token, command.clone()).await
    } else {
        TokenPool::start(token, command.clone()).await
    }
    .map_err(|e| ConnectFailure::from_hsm(&e))?;
    tracing::info!(token = %entry.label, serial = %pool.info().serial, workers, up = pool.is_up(), "token started");
    Ok(pool)
}

/// Connects a store: the domain key set up or checked on its tokens, their workers started.
/// `holds_keys`: the store has keys, so its domain key exists and must not be made anew.
pub async fn open_cluster(
    record: &KeyStoreRecord,
    command: &WorkerCommand,
    holds_keys: bool,
) -> Result<Cluster, ConnectFailure> {
    if let Some(kcv) = establish_domain(&record.tokens, command, !holds_keys).await? {
        tracing::info!(key_store = %record.id, tokens = record.tokens.len(), kcv = %hex::encode(kcv), "the tokens share the domain key");
    }
    let in_cluster = record.tokens.len() > 1;
    let mut pools = Vec::new();
    for t in &record.tokens {
        pools.push(start_token(t, command, in_cluster).await?);
    }
    Cluster::new(record.cluster_id.clone(), pools).map_err(|e| ConnectFailure::from_hsm(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hsm::error::{Cause, Ckr};

    fn unavailable(reason: &str, rv: Option<Ckr>, cause: Option<Cause>) -> HsmError {
        HsmError::TokenUnavailable {
            token: "t".into(),
            reason: reason.into(),
            rv,
            cause,
        }
    }

    #[test]
    fn connect_failures_are_classified_by_code_and_cause_not_by_wording() {
        // Messages reworded so that none names the code: the class must not change.
        let locked = unavailable("login refused", Some(Ckr::PIN_LOCKED), None);
        assert_eq!(ConnectFailure::from_hsm(&locked).code, "USER_LOCKED_OUT");
        let wrong = HsmError::Pkcs11 {
            token: "t".into(),
            function: "C_Login".into(),
            rv: Ckr::PIN_INCORRECT,
        };
        assert_eq!(ConnectFailure::from_hsm(&wrong).code, "INVALID_CREDENTIALS");
        let absent = unavailable("gone", None, Some(Cause::TokenNotFound));
        assert_eq!(ConnectFailure::from_hsm(&absent).code, "CLUSTER_NOT_FOUND");
        let no_module = unavailable("gone", None, Some(Cause::ModuleNotLoadable));
        assert_eq!(
            ConnectFailure::from_hsm(&no_module).code,
            "CLUSTER_NOT_FOUND"
        );
        // And words alone classify nothing.
        let words = unavailable(
            "C_Login failed with CKR_PIN_LOCKED; no token labelled x; cannot load PKCS#11 module",
            None,
            None,
        );
        assert_eq!(
            ConnectFailure::from_hsm(&words).code,
            "INSUFFICIENT_CLOUDHSM_HSMS"
        );
    }
}
