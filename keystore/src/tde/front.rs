//! The TDE front: the subset of HashiCorp Vault's KV version 2 API that MariaDB's
//! `hashicorp_key_management` plugin (and Percona's keyring, pg_tde) read keys through.
//!
//! - `GET /v1/sys/mounts/<mount>/tune`: says the mount is KV version 2.
//! - `GET /v1/<mount>/data/<id>[?version=N]`: the key's material in hex, and its version.
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

use super::{Tde, TdeError};

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

fn json(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
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
        let answer = tokio::time::timeout(READ_DEADLINE, self.tde.read(&token, id, version))
            .await
            .unwrap_or_else(|_| {
                Err(TdeError::Unavailable(
                    "no answer within the deadline".into(),
                ))
            });
        match answer {
            Ok((material, version)) => Ok(json(StatusCode::OK, key_body(&material, version))),
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

fn key_body(material: &[u8], version: u32) -> Vec<u8> {
    let hex = Zeroizing::new(hex::encode(material));
    format!(
        r#"{{"request_id":"","lease_id":"","renewable":false,"lease_duration":0,"data":{{"data":{{"data":"{}"}},"metadata":{{"version":{},"destroyed":false,"deletion_time":""}}}},"wrap_info":null,"warnings":null,"auth":null}}"#,
        hex.as_str(),
        version
    )
    .into_bytes()
}
