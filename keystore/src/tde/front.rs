//! The TDE front: the subset of HashiCorp Vault's KV version 2 API that MariaDB's
//! `hashicorp_key_management` plugin (and Percona's keyring, pg_tde) read keys through.
//!
//! - `GET /v1/sys/mounts/<mount>/tune`: says the mount is KV version 2.
//! - `GET /v1/<mount>/data/<id>[?version=N]`: the key's material in hex, and its version's
//!   metadata as Vault's KV v2 read gives it.
//! - `GET /v1/auth/token/lookup-self`: the token's own data (how Vault clients such as hvac's
//!   `is_authenticated()` check a token).
//! - `GET`/`HEAD /v1/sys/health`: unauthenticated, as in Vault, for health checks.
//!
//! Answers are 200, 403 (bad token, or access withdrawn) or 404 (no such key or version). When
//! no authoritative answer exists (the tokens cannot serve), the connection is dropped instead
//! of answering 5xx: MariaDB treats a 5xx as final and aborts when it needs the latest key to
//! write a page, while a dropped connection makes it fall back to the key it has cached.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::listener::{serve_http1, Door, RequestBody, WhenFull};
pub use crate::tls::tls_acceptor;
use zeroize::Zeroizing;

use super::{Tde, TdeClient, TdeError, TdeSecret};

/// How long a read may take before the connection is dropped: well inside MariaDB's default
/// 15 s request timeout, so that a hung token costs the database one short wait per lookup
/// before it falls back to its cache.
pub const READ_DEADLINE: std::time::Duration = std::time::Duration::from_secs(3);

pub struct TdeFront {
    pub tde: Arc<Tde>,
    /// The KV v2 mount name in the paths (`/v1/<mount>/data/<id>`).
    pub mount: String,
}

/// Returned by the handler to make hyper close the connection without an answer.
#[derive(Debug)]
struct DropConnection;

impl std::fmt::Display for DropConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("no authoritative answer: connection dropped")
    }
}

impl std::error::Error for DropConnection {}

/// Serves connections until shutdown. Beyond the connection cap, connections are closed without
/// an answer (a 5xx would be final for MariaDB; a dropped connection makes it use its cache).
pub async fn serve(
    listener: TcpListener,
    front: Arc<TdeFront>,
    tls: Option<TlsAcceptor>,
    door: Arc<Door>,
) {
    serve_http1(
        listener,
        tls,
        "TDE front",
        door,
        WhenFull::Close,
        move |peer| {
            let front = front.clone();
            hyper::service::service_fn(move |req| {
                let front = front.clone();
                async move { front.handle(req, peer).await }
            })
        },
    )
    .await
}

fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Vault's own 404 body; older versions of MariaDB's plugin recognise "not found" only by it.
fn not_found() -> Response<Full<Bytes>> {
    json(StatusCode::NOT_FOUND, br#"{"errors":[]}"#.to_vec())
}

fn vault_error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(
        status,
        serde_json::json!({ "errors": [message] })
            .to_string()
            .into_bytes(),
    )
}

impl TdeFront {
    async fn handle(
        &self,
        req: Request<RequestBody>,
        peer: SocketAddr,
    ) -> Result<Response<Full<Bytes>>, DropConnection> {
        let path = req.uri().path();
        // Vault answers its health without a token, to HEAD too (hvac's default method).
        if path == "/v1/sys/health" && (req.method() == Method::GET || req.method() == Method::HEAD)
        {
            let mut answer = json(StatusCode::OK, health_body(self.tde.now_ms()));
            if req.method() == Method::HEAD {
                *answer.body_mut() = Full::new(Bytes::new());
            }
            return Ok(answer);
        }
        if req.method() != Method::GET {
            return Ok(vault_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET is served",
            ));
        }
        let Some(token) = req
            .headers()
            .get("x-vault-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
        else {
            return Ok(vault_error(StatusCode::FORBIDDEN, "permission denied"));
        };
        let token = Zeroizing::new(token);
        if path == "/v1/auth/token/lookup-self" {
            let answer = tokio::time::timeout(READ_DEADLINE, self.tde.token_owner(&token))
                .await
                .unwrap_or_else(|_| {
                    Err(TdeError::Unavailable(
                        "no answer within the deadline".into(),
                    ))
                });
            return match answer {
                Ok(client) => Ok(json(StatusCode::OK, lookup_self_body(&client))),
                Err(TdeError::Unavailable(e)) => {
                    tracing::warn!(%peer, error = %e, "TDE front: dropping a connection");
                    Err(DropConnection)
                }
                Err(_) => Ok(vault_error(StatusCode::FORBIDDEN, "permission denied")),
            };
        }
        let (id, version) = match route(&self.mount, req.uri().path(), req.uri().query()) {
            Route::Tune => {
                // The token must be valid even here: the tune call is the plugin's first contact.
                let answer = tokio::time::timeout(READ_DEADLINE, self.tde.authenticate(&token))
                    .await
                    .unwrap_or_else(|_| {
                        Err(TdeError::Unavailable(
                            "no answer within the deadline".into(),
                        ))
                    });
                return match answer {
                    Ok(_) => Ok(json(StatusCode::OK, tune_body())),
                    Err(TdeError::Unavailable(e)) => {
                        tracing::warn!(%peer, error = %e, "TDE front: dropping a connection");
                        Err(DropConnection)
                    }
                    Err(_) => Ok(vault_error(StatusCode::FORBIDDEN, "permission denied")),
                };
            }
            Route::NoRoute => {
                return Ok(vault_error(StatusCode::NOT_FOUND, "no handler for route"))
            }
            Route::NoSuchKey => return Ok(not_found()),
            Route::BadVersion => {
                return Ok(vault_error(
                    StatusCode::BAD_REQUEST,
                    "version must be a number",
                ))
            }
            Route::Read { id, version } => (id, version),
        };
        let answer = tokio::time::timeout(READ_DEADLINE, self.tde.read_secret(&token, id, version))
            .await
            .unwrap_or_else(|_| {
                Err(TdeError::Unavailable(
                    "no answer within the deadline".into(),
                ))
            });
        match answer {
            Ok(secret) => Ok(json(StatusCode::OK, key_body(&secret))),
            Err(TdeError::Forbidden) => Ok(vault_error(StatusCode::FORBIDDEN, "permission denied")),
            Err(TdeError::NotFound) => Ok(not_found()),
            Err(TdeError::Unavailable(e)) => {
                tracing::warn!(%peer, key = id, error = %e, "TDE front: no authoritative answer; dropping the connection");
                Err(DropConnection)
            }
        }
    }
}

/// What a request's path and query ask of the front (pure, so that it can be fuzzed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /v1/sys/mounts/<mount>/tune`.
    Tune,
    /// `GET /v1/<mount>/data/<id>[?version=N]`; version 0 or none is the latest.
    Read {
        id: u32,
        version: Option<u32>,
    },
    /// Under the data prefix, but not a key id this front serves.
    NoSuchKey,
    /// `version=` that is not a number.
    BadVersion,
    NoRoute,
}

pub fn route(mount: &str, path: &str, query: Option<&str>) -> Route {
    if path
        .strip_prefix("/v1/sys/mounts/")
        .and_then(|p| p.strip_prefix(mount))
        == Some("/tune")
    {
        return Route::Tune;
    }
    let Some(id) = path
        .strip_prefix("/v1/")
        .and_then(|p| p.strip_prefix(mount))
        .and_then(|p| p.strip_prefix("/data/"))
    else {
        return Route::NoRoute;
    };
    let Ok(id) = id.parse::<u32>() else {
        return Route::NoSuchKey;
    };
    let version = match query.and_then(|q| q.split('&').find_map(|p| p.strip_prefix("version="))) {
        None | Some("0") => None,
        Some(v) => match v.parse::<u32>() {
            Ok(v) => Some(v),
            Err(_) => return Route::BadVersion,
        },
    };
    Route::Read { id, version }
}

fn tune_body() -> Vec<u8> {
    serde_json::json!({
        "type": "kv",
        "description": "hsmkms TDE keys",
        "default_lease_ttl": 0,
        "max_lease_ttl": 0,
        "force_no_cache": false,
        "options": { "version": "2" },
        "data": { "type": "kv", "options": { "version": "2" } },
    })
    .to_string()
    .into_bytes()
}

/// Vault's KV v2 read: `data.data` the secret (the material in hex), `data.metadata` the
/// version's. Written by hand so that the hex copy of the material is the only one and is
/// zeroised.
/// The key's answer, in a buffer sized so that it never reallocates and zeroed once sent (the
/// response's `Bytes` own it).
fn key_body(secret: &TdeSecret) -> Bytes {
    let hex = Zeroizing::new(hex::encode(&*secret.material));
    let mut body = Zeroizing::new(Vec::with_capacity(hex.len() + 320));
    body.extend_from_slice(
        br#"{"request_id":"","lease_id":"","renewable":false,"lease_duration":0,"data":{"data":{"data":""#,
    );
    body.extend_from_slice(hex.as_bytes());
    body.extend_from_slice(
        format!(
            r#""}},"metadata":{{"created_time":"{}","custom_metadata":null,"deletion_time":"","destroyed":false,"version":{}}}}},"wrap_info":null,"warnings":null,"auth":null}}"#,
            rfc3339(secret.created_ms),
            secret.version
        )
        .as_bytes(),
    );
    Bytes::from_owner(body)
}

/// Vault's token lookup data, for the client's token. The token itself is not echoed (only its
/// SHA-256 is kept) and there is no accessor: nothing here can stand in for the token. The
/// token never expires (`ttl` 0) and cannot be renewed; its only right is to read its client's
/// keys.
fn lookup_self_body(client: &TdeClient) -> Vec<u8> {
    serde_json::json!({
        "request_id": "",
        "lease_id": "",
        "renewable": false,
        "lease_duration": 0,
        "data": {
            "creation_time": client.created_ms.div_euclid(1000),
            "creation_ttl": 0,
            "display_name": format!("token-{}", client.name),
            "entity_id": "",
            "expire_time": null,
            "explicit_max_ttl": 0,
            "issue_time": rfc3339(client.created_ms),
            "meta": { "client": client.name },
            "num_uses": 0,
            "orphan": true,
            "path": "auth/token/create",
            "policies": ["default"],
            "renewable": false,
            "ttl": 0,
            "type": "service",
        },
        "wrap_info": null,
        "warnings": null,
        "auth": null,
    })
    .to_string()
    .into_bytes()
}

/// Vault's health answer for an active, unsealed node. The front has no seal: the keys are
/// wrapped by the token's keys, and a token outage shows as dropped reads, not as a seal.
fn health_body(now_ms: i64) -> Vec<u8> {
    serde_json::json!({
        "initialized": true,
        "sealed": false,
        "standby": false,
        "performance_standby": false,
        "replication_performance_mode": "disabled",
        "replication_dr_mode": "disabled",
        "server_time_utc": now_ms.div_euclid(1000),
        "version": concat!(env!("CARGO_PKG_VERSION"), "+hsmkms"),
        "cluster_name": "hsmkms",
        "cluster_id": "",
    })
    .to_string()
    .into_bytes()
}

/// RFC 3339 in UTC with milliseconds (`2026-12-01T22:14:42.003Z`), as Vault writes times.
fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    // YYYYMMDDTHHMMSSZ
    let basic = crate::sigv4::format_amz_date(t);
    format!(
        "{}-{}-{}T{}:{}:{}.{:03}Z",
        &basic[0..4],
        &basic[4..6],
        &basic[6..8],
        &basic[9..11],
        &basic[11..13],
        &basic[13..15],
        ms.rem_euclid(1000)
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            super::rfc3339(1_796_162_082_003),
            "2026-12-01T21:54:42.003Z"
        );
    }
}
