//! The service configuration (TOML). Every field is documented in `docs/configuration.md`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Deserialize;
use zeroize::Zeroizing;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address of the KMS front. Loopback unless `allow_non_loopback` is set.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Serving plain HTTP beyond loopback exposes credentials' signatures and data keys in
    /// transit; refuse unless the operator says so (e.g. behind a TLS-terminating proxy).
    #[serde(default)]
    pub allow_non_loopback: bool,
    #[serde(default = "default_partition")]
    pub partition: String,
    #[serde(default = "default_region")]
    pub region: String,
    #[serde(default = "default_account")]
    pub account: String,
    /// SQLite file holding key metadata.
    pub metadata_path: PathBuf,
    /// How often the deletion task looks for keys whose waiting period has ended.
    #[serde(default = "default_deletion_interval")]
    pub deletion_check_interval_secs: u64,
    pub key_store: KeyStoreConfig,
    #[serde(default)]
    pub principals: Vec<PrincipalConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyStoreConfig {
    /// `cks-` and 17 hex digits, as AWS custom key store ids.
    pub id: String,
    pub name: String,
    /// The token cluster's id, reported as `CloudHsmClusterId`.
    pub cluster_id: String,
    pub tokens: Vec<TokenEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// PKCS#11 module path, e.g. /usr/lib/softhsm/libsofthsm2.so.
    pub module: PathBuf,
    /// The token's label.
    pub label: String,
    /// File holding the user PIN (first line). Never put a PIN on a command line.
    pub pin_file: PathBuf,
    /// Worker processes for this token; default: the number of CPUs.
    pub workers: Option<usize>,
    /// Environment for the workers, e.g. SOFTHSM2_CONF.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalConfig {
    pub name: String,
    pub access_key_id: String,
    /// The secret inline (development), or ...
    pub secret_access_key: Option<SecretString>,
    /// ... a file holding it (first line).
    pub secret_access_key_file: Option<PathBuf>,
}

impl std::fmt::Debug for PrincipalConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrincipalConfig")
            .field("name", &self.name)
            .field("access_key_id", &self.access_key_id)
            .finish()
    }
}

fn default_listen() -> SocketAddr {
    "127.0.0.1:8080".parse().expect("valid address")
}
fn default_partition() -> String {
    "aws".into()
}
fn default_region() -> String {
    "us-east-1".into()
}
fn default_account() -> String {
    "111122223333".into()
}
fn default_deletion_interval() -> u64 {
    60
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let config: Config =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if !self.listen.ip().is_loopback() && !self.allow_non_loopback {
            return Err(format!(
                "listen = {} is not a loopback address; set allow_non_loopback = true to serve beyond this host",
                self.listen
            ));
        }
        if self.key_store.tokens.is_empty() {
            return Err("key_store.tokens must name at least one token".into());
        }
        if self.region.is_empty()
            || self.account.len() != 12
            || !self.account.bytes().all(|b| b.is_ascii_digit())
        {
            return Err("region must be set and account must be 12 digits".into());
        }
        for p in &self.principals {
            if p.secret_access_key.is_some() == p.secret_access_key_file.is_some() {
                return Err(format!(
                    "principal {}: set exactly one of secret_access_key, secret_access_key_file",
                    p.name
                ));
            }
        }
        Ok(())
    }
}

/// Reads a secret from the first line of a file.
pub fn read_secret_file(path: &Path) -> Result<SecretString, String> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
    );
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(SecretString::from(line))
}
