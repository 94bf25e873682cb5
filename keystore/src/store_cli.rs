//! `hsmkms store ...`: custom key store management through the running service's KMS API, so
//! that tokens join and leave a live cluster.

use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;

use crate::client::{Answer, KmsClient};
use crate::config::{read_secret_file, Config};
use crate::wire::TokenDescriptor;

/// Parses `label=L,module=M,pin-file=P[,so-pin-file=S][,workers=N][,env.NAME=VALUE...]`.
pub fn parse_token(spec: &str) -> Result<TokenDescriptor, String> {
    let mut t = TokenDescriptor::default();
    for part in spec.split(',').filter(|p| !p.is_empty()) {
        let (name, value) = part
            .split_once('=')
            .ok_or_else(|| format!("token spec: {part:?} is not NAME=VALUE"))?;
        match name {
            "label" => t.label = value.into(),
            "module" => t.module = absolute(value)?,
            "pin-file" => t.pin_file = absolute(value)?,
            "so-pin-file" => t.so_pin_file = Some(absolute(value)?),
            "workers" => {
                t.workers = Some(
                    value
                        .parse()
                        .map_err(|_| format!("token spec: workers={value} is not a number"))?,
                )
            }
            _ => match name.strip_prefix("env.") {
                Some(var) if !var.is_empty() => {
                    t.env.insert(var.into(), value.into());
                }
                _ => {
                    return Err(format!(
                        "token spec: unknown {name:?} (label, module, pin-file, so-pin-file, workers, env.NAME)"
                    ))
                }
            },
        }
    }
    for (what, value) in [
        ("label", &t.label),
        ("module", &t.module),
        ("pin-file", &t.pin_file),
    ] {
        if value.is_empty() {
            return Err(format!("token spec {spec:?} lacks {what}="));
        }
    }
    Ok(t)
}

/// Paths go to the service, which may run elsewhere in the file system: make them absolute here.
fn absolute(p: &str) -> Result<String, String> {
    let path = Path::new(p);
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| e.to_string())?
            .join(path)
    };
    Ok(abs.display().to_string())
}

/// The file in which a serving hsmkms leaves its KMS endpoint, beside the metadata.
pub fn endpoint_file(config: &Config) -> PathBuf {
    config
        .metadata_path
        .parent()
        .unwrap_or(Path::new("."))
        .join("hsmkms.endpoint")
}

/// A signed client of the running service: `endpoint` (http:// or https://host:port), else the
/// endpoint the service left beside its metadata, else the configured listen address. HTTPS
/// trusts the CA certificates in `ca_file`, else in $AWS_CA_BUNDLE (as the AWS CLI does).
/// Credentials from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, else the configuration's first
/// admin principal.
pub fn client(
    config: Option<&Config>,
    endpoint: Option<&str>,
    ca_file: Option<&Path>,
) -> Result<KmsClient, String> {
    let endpoint = match (endpoint, config) {
        (Some(e), _) => e.to_string(),
        (None, Some(c)) => match std::fs::read_to_string(endpoint_file(c)) {
            Ok(text) => text.trim().to_string(),
            Err(_) if c.tls_cert.is_some() => format!("https://{}", c.listen),
            Err(_) => format!("http://{}", c.listen),
        },
        (None, None) => return Err("give --endpoint, --config or --data-dir".into()),
    };
    let (tls, rest) = match (
        endpoint.strip_prefix("https://"),
        endpoint.strip_prefix("http://"),
    ) {
        (Some(rest), _) => {
            let ca = ca_file
                .map(Path::to_path_buf)
                .or_else(|| std::env::var_os("AWS_CA_BUNDLE").map(PathBuf::from))
                .ok_or_else(|| {
                    format!("{endpoint} is HTTPS: give --ca-file (or AWS_CA_BUNDLE) with the CA that signed its certificate")
                })?;
            (Some(crate::tls::tls_connector(&ca)?), rest)
        }
        (None, Some(rest)) => (None, rest),
        (None, None) => return Err(format!("{endpoint} is neither http:// nor https://")),
    };
    let addr = rest.trim_end_matches('/').to_string();
    let region = config.map(|c| c.region.clone()).unwrap_or_else(|| {
        std::env::var("AWS_REGION")
            .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|_| "us-east-1".into())
    });
    let (key, secret) = match (
        std::env::var("AWS_ACCESS_KEY_ID"),
        std::env::var("AWS_SECRET_ACCESS_KEY"),
    ) {
        (Ok(k), Ok(s)) => (k, SecretString::from(s)),
        _ => {
            let config = config.ok_or("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")?;
            let p = config.principals.iter().find(|p| p.admin).ok_or(
                "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY of an admin principal",
            )?;
            let secret = match (&p.secret_access_key, &p.secret_access_key_file) {
                (Some(s), _) => s.clone(),
                (None, Some(f)) => read_secret_file(f)?,
                (None, None) => return Err(format!("principal {} has no secret", p.name)),
            };
            (p.access_key_id.clone(), secret)
        }
    };
    let client = KmsClient::new(&addr, &key, secret, &region);
    Ok(match tls {
        Some(tls) => client.with_tls(tls),
        None => client,
    })
}

/// Calls an operation; an error answer becomes `Err("Exception: message")`.
pub async fn call(
    client: &mut KmsClient,
    operation: &str,
    body: serde_json::Value,
) -> Result<serde_json::Value, String> {
    let Answer { status, body } = client
        .call(operation, &body)
        .await
        .map_err(|e| format!("cannot reach the service: {e}"))?;
    if status == 200 {
        return Ok(body);
    }
    Err(format!(
        "{}: {}",
        body["__type"].as_str().unwrap_or("error"),
        body["message"].as_str().unwrap_or("")
    ))
}

/// The request body that names a store.
pub fn by_id(store_id: &str) -> serde_json::Value {
    serde_json::json!({ "CustomKeyStoreId": store_id })
}

/// Waits until a store is CONNECTED (Ok) or FAILED (Err with the reason).
pub async fn wait_connected(
    client: &mut KmsClient,
    store_id: &str,
    timeout: Duration,
) -> Result<serde_json::Value, String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let d = call(client, "DescribeCustomKeyStores", by_id(store_id)).await?;
        let store = d["CustomKeyStores"][0].clone();
        match store["ConnectionState"].as_str() {
            Some("CONNECTED") => return Ok(store),
            Some("FAILED") => {
                return Err(format!(
                    "custom key store {store_id} failed to connect: {} {}",
                    store["ConnectionErrorCode"].as_str().unwrap_or(""),
                    store["HsmkmsConnectionError"].as_str().unwrap_or("")
                ))
            }
            _ if tokio::time::Instant::now() >= deadline => {
                return Err(format!("custom key store {store_id} is still connecting"))
            }
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_specs_parse_and_name_what_they_lack() {
        let t = parse_token(
            "label=a,module=/usr/lib/softhsm/libsofthsm2.so,pin-file=/p,so-pin-file=/s,workers=3,env.SOFTHSM2_CONF=/c",
        )
        .unwrap();
        assert_eq!(t.label, "a");
        assert_eq!(t.so_pin_file.as_deref(), Some("/s"));
        assert_eq!(t.workers, Some(3));
        assert_eq!(t.env["SOFTHSM2_CONF"], "/c");
        assert!(parse_token("label=a,pin-file=/p")
            .unwrap_err()
            .contains("module"));
        assert!(parse_token("label=a,colour=red")
            .unwrap_err()
            .contains("colour"));
    }
}
