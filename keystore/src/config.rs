//! The service configuration (TOML). Every field is documented in `docs/configuration.md`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::{Deserialize, Serialize};
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
    /// PEM certificate chain and private key of the KMS front; both or neither. With them the
    /// front serves HTTPS and may listen beyond loopback.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
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
    /// How often the prober pings the tokens, revives returning ones and copies them the keys
    /// they missed.
    #[serde(default = "default_probe_interval")]
    pub probe_interval_secs: u64,
    /// The key store made at first start (afterwards the metadata holds it, and it is changed
    /// with the `hsmkms store` commands or UpdateCustomKeyStore). Without it, stores are made
    /// with CreateCustomKeyStore.
    pub key_store: Option<KeyStoreConfig>,
    #[serde(default)]
    pub principals: Vec<PrincipalConfig>,
    /// The TDE front (HashiCorp Vault KV v2 for databases); off when absent.
    pub tde: Option<TdeConfig>,
    /// Timeouts and the connection cap of the listeners (both fronts).
    #[serde(default)]
    pub listener: ListenerConfig,
}

/// What the listeners let a client hold, and for how long (docs/configuration.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerConfig {
    /// From when a connection is ready for a request (just accepted, or the previous answer
    /// written) until the request's header is complete. hyper runs this timer between requests
    /// too, so it also bounds how long a kept-alive connection may wait for its next request.
    pub header_read_timeout_secs: u64,
    /// The whole request body must arrive within this, from the end of its header.
    pub body_timeout_secs: u64,
    /// A connection on which no byte moves either way for this long is closed (a stalled body,
    /// a client that stops reading its answer).
    pub idle_timeout_secs: u64,
    pub tls_handshake_timeout_secs: u64,
    /// Open connections, both fronts together. Default: the file limit (raised to its hard
    /// limit at start) less the descriptors open once the workers run and 128 spare, at most
    /// 4,096. A larger value is lowered to that bound.
    pub max_connections: Option<usize>,
    /// On SIGTERM or SIGINT, how long requests in flight may take to finish.
    pub shutdown_grace_secs: u64,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            header_read_timeout_secs: 10,
            body_timeout_secs: 10,
            idle_timeout_secs: 30,
            tls_handshake_timeout_secs: 10,
            max_connections: None,
            shutdown_grace_secs: 10,
        }
    }
}

impl ListenerConfig {
    fn validate(&self) -> Result<(), String> {
        for (name, value) in [
            ("header_read_timeout_secs", self.header_read_timeout_secs),
            ("body_timeout_secs", self.body_timeout_secs),
            ("idle_timeout_secs", self.idle_timeout_secs),
            (
                "tls_handshake_timeout_secs",
                self.tls_handshake_timeout_secs,
            ),
        ] {
            if value == 0 || value > 3600 {
                return Err(format!(
                    "listener.{name} = {value} must be between 1 and 3600"
                ));
            }
        }
        if self.max_connections == Some(0) {
            return Err("listener.max_connections must be at least 1".into());
        }
        Ok(())
    }

    pub fn limits(&self) -> crate::listener::Limits {
        let secs = std::time::Duration::from_secs;
        crate::listener::Limits {
            header_read_timeout: secs(self.header_read_timeout_secs),
            body_timeout: secs(self.body_timeout_secs),
            idle_timeout: secs(self.idle_timeout_secs),
            tls_handshake_timeout: secs(self.tls_handshake_timeout_secs),
            shutdown_grace: secs(self.shutdown_grace_secs),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TdeConfig {
    /// Address of the TDE front; loopback unless `allow_non_loopback`, and then only with TLS.
    pub listen: SocketAddr,
    /// The KV v2 mount name in request paths (`/v1/<mount>/data/<id>`).
    #[serde(default = "default_tde_mount")]
    pub mount: String,
    /// PEM certificate chain and private key; both or neither. Without them, plain HTTP.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

fn default_tde_mount() -> String {
    "tde".into()
}

impl TdeConfig {
    pub fn validate(&self, allow_non_loopback: bool) -> Result<(), String> {
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err("tde: give both tls_cert and tls_key, or neither".into());
        }
        if !self.listen.ip().is_loopback() && (!allow_non_loopback || self.tls_cert.is_none()) {
            return Err(format!(
                "tde.listen = {} is not loopback: that needs allow_non_loopback = true and TLS (tls_cert, tls_key), \
                 since table keys travel in the answers",
                self.listen
            ));
        }
        if self.mount.is_empty()
            || !self
                .mount
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
        {
            return Err(format!(
                "tde.mount {:?} must be letters, digits, '-' or '_'",
                self.mount
            ));
        }
        Ok(())
    }
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
    /// CreateKey succeeds once the new key is on this many tokens (default: all of them, or 2
    /// when there are more than 2). A token that was down gets it when it returns.
    pub min_tokens: Option<usize>,
}

impl KeyStoreConfig {
    fn validate(&self) -> Result<(), String> {
        if self.tokens.is_empty() {
            return Err("key_store.tokens must name at least one token".into());
        }
        if let Some(m) = self.min_tokens {
            if m == 0 || m > self.tokens.len() {
                return Err(format!(
                    "key_store.min_tokens = {m} must be between 1 and the number of tokens"
                ));
            }
        }
        if self.tokens.len() > 1 && self.tokens.iter().any(|t| t.so_pin_file.is_none()) {
            return Err("a key store of several tokens needs so_pin_file for each token, to set up their shared domain key".into());
        }
        let id_with = |s: &str, prefix: &str, len: usize| {
            s.strip_prefix(prefix)
                .is_some_and(|t| t.len() == len && t.bytes().all(|b| b.is_ascii_alphanumeric()))
        };
        if !id_with(&self.id, "cks-", 17) {
            return Err(format!(
                "key_store.id {:?} must be \"cks-\" and 17 letters or digits, as AWS custom key store ids",
                self.id
            ));
        }
        if !id_with(&self.cluster_id, "cluster-", 11) {
            return Err(format!(
                "key_store.cluster_id {:?} must be \"cluster-\" and 11 letters or digits",
                self.cluster_id
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// PKCS#11 module path, e.g. /usr/lib/softhsm/libsofthsm2.so.
    pub module: PathBuf,
    /// The token's label.
    pub label: String,
    /// File holding the user PIN (first line). Never put a PIN on a command line.
    pub pin_file: PathBuf,
    /// File holding the Security Officer PIN: needed only in a key store of several tokens, to
    /// set up the domain key they share (docs/clusters.md).
    pub so_pin_file: Option<PathBuf>,
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
    /// May create, change, connect, disconnect and delete custom key stores.
    #[serde(default)]
    pub admin: bool,
}

impl std::fmt::Debug for PrincipalConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrincipalConfig")
            .field("name", &self.name)
            .field("access_key_id", &self.access_key_id)
            .field("admin", &self.admin)
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
fn default_probe_interval() -> u64 {
    5
}

fn default_deletion_interval() -> u64 {
    60
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut config: Config =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        // Relative paths are relative to the configuration file, not to where hsmkms was started.
        let base = path.parent().unwrap_or(Path::new("."));
        let anchor = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        anchor(&mut config.metadata_path);
        for t in config
            .key_store
            .iter_mut()
            .flat_map(|ks| ks.tokens.iter_mut())
        {
            anchor(&mut t.pin_file);
            if let Some(f) = &mut t.so_pin_file {
                anchor(f);
            }
        }
        for p in &mut config.principals {
            if let Some(f) = &mut p.secret_access_key_file {
                anchor(f);
            }
        }
        for f in [&mut config.tls_cert, &mut config.tls_key]
            .into_iter()
            .flatten()
        {
            anchor(f);
        }
        if let Some(tde) = &mut config.tde {
            for f in [&mut tde.tls_cert, &mut tde.tls_key].into_iter().flatten() {
                anchor(f);
            }
        }
        config
            .validate()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(config)
    }

    /// Beyond loopback the KMS front needs TLS, or an explicit `allow_non_loopback` (for a
    /// TLS-terminating proxy in front).
    pub fn check_listen(&self, addr: SocketAddr) -> Result<(), String> {
        if !addr.ip().is_loopback() && self.tls_cert.is_none() && !self.allow_non_loopback {
            return Err(format!(
                "listen = {addr} is not a loopback address: configure tls_cert and tls_key, or set \
                 allow_non_loopback = true if a TLS-terminating proxy stands in front"
            ));
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), String> {
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err("give both tls_cert and tls_key, or neither".into());
        }
        self.check_listen(self.listen)?;
        if self.region.is_empty()
            || self.account.len() != 12
            || !self.account.bytes().all(|b| b.is_ascii_digit())
        {
            return Err("region must be set and account must be 12 digits".into());
        }
        if let Some(ks) = &self.key_store {
            ks.validate()?;
        }
        if let Some(tde) = &self.tde {
            tde.validate(self.allow_non_loopback)?;
        }
        self.listener.validate()?;
        let mut seen = std::collections::HashSet::new();
        for p in &self.principals {
            if !seen.insert(&p.access_key_id) {
                return Err(format!(
                    "access_key_id {} is given to more than one principal",
                    p.access_key_id
                ));
            }
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

/// Reads a secret from the first line of a file, which must be private to its owner: a PIN or
/// secret that others on the host can read is no secret, and one they can write lets them pick it.
pub fn read_secret_file(path: &Path) -> Result<SecretString, String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} can be read or written by group or others (mode {:03o}): PIN and secret files must be private; run `chmod 600 {}`",
            path.display(),
            mode & 0o777,
            path.display()
        ));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
metadata_path = "meta/metadata.db"
[key_store]
id = "cks-0123456789abcdef0"
name = "t"
cluster_id = "cluster-abcdefghijk"
[[key_store.tokens]]
module = "/usr/lib/softhsm/libsofthsm2.so"
label = "t"
pin_file = "user.pin"
"#;

    fn load(text: &str) -> Result<Config, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hsmkms.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path).map(|mut c| {
            // Paths are made absolute against the file's directory; report them relative again.
            c.metadata_path = c
                .metadata_path
                .strip_prefix(dir.path())
                .unwrap()
                .to_path_buf();
            c
        })
    }

    #[test]
    fn a_secret_file_others_can_read_or_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("user.pin");
        std::fs::write(&path, "1234\n").unwrap();
        for loose in [0o644, 0o640, 0o602, 0o660] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(loose)).unwrap();
            let e = read_secret_file(&path).unwrap_err();
            assert!(
                e.contains(&path.display().to_string())
                    && e.contains(&format!("chmod 600 {}", path.display())),
                "{loose:o}: {e}"
            );
            assert!(!e.contains("1234"));
        }
        for private in [0o600, 0o400] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(private)).unwrap();
            assert!(read_secret_file(&path).is_ok(), "{private:o}");
        }
    }

    #[test]
    fn relative_paths_are_relative_to_the_configuration_file() {
        let c = load(BASE).unwrap();
        assert_eq!(c.metadata_path, PathBuf::from("meta/metadata.db"));
        assert!(c.key_store.unwrap().tokens[0].pin_file.is_absolute());
    }

    #[test]
    fn malformed_ids_and_duplicate_access_keys_are_refused() {
        let bad_id = BASE.replace("cks-0123456789abcdef0", "store-1");
        assert!(load(&bad_id).unwrap_err().contains("key_store.id"));
        let twice = format!(
            "{BASE}\n[[principals]]\nname = \"a\"\naccess_key_id = \"AK\"\nsecret_access_key = \"s\"\n\
             [[principals]]\nname = \"b\"\naccess_key_id = \"AK\"\nsecret_access_key = \"t\"\n"
        );
        assert!(load(&twice)
            .unwrap_err()
            .contains("more than one principal"));
    }

    #[test]
    fn non_loopback_listen_needs_an_explicit_yes() {
        let open = format!("listen = \"0.0.0.0:8080\"\n{BASE}");
        assert!(load(&open).unwrap_err().contains("allow_non_loopback"));
        let allowed = format!("listen = \"0.0.0.0:8080\"\nallow_non_loopback = true\n{BASE}");
        assert!(load(&allowed).is_ok());
    }
}
