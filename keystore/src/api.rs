//! The KMS JSON front: `POST /` with `X-Amz-Target: TrentService.<Operation>`.
//!
//! A thin translation: authenticate, parse the body into the operation's request, call the
//! service core, write its answer or its exception as AWS does.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::Serialize;
use zeroize::Zeroizing;

use crate::error::{KmsError, KmsResult};
use crate::metrics::Metrics;
use crate::service::Service;
use crate::sigv4::{Principals, SignedRequest};

/// Bodies above this are refused before parsing; the largest valid request (a 6 KiB blob in
/// base64 plus an 8 KiB context) is far below it.
pub const MAX_BODY: usize = 1 << 20;
const CONTENT_TYPE: &str = "application/x-amz-json-1.1";

pub struct KmsFront {
    pub service: Arc<Service>,
    pub principals: Principals,
    pub metrics: Metrics,
}

pub fn router(front: Arc<KmsFront>) -> Router {
    Router::new()
        .route("/", post(handle))
        .route("/healthz", get(health))
        .route("/metrics", get(metrics))
        .with_state(front)
}

/// Answer bodies may carry plaintexts and data keys: the bytes are owned by a `Zeroizing`
/// buffer, zeroed when hyper drops the last reference to them.
fn json_response(status: StatusCode, body: Zeroizing<Vec<u8>>) -> Response {
    let body = Body::from(axum::body::Bytes::from_owner(body));
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    if let Ok(id) = HeaderValue::from_str(&request_id()) {
        headers.insert("x-amzn-requestid", id);
    }
    response
}

/// A request id unique to this process's lifetime, as AWS sends it: a canonical UUID. A random
/// UUID drawn once, whose last 48 bits are replaced by a counter (cheaper than a random UUID per
/// response; the version and variant bits stay those of a v4 UUID).
fn request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static BASE: OnceLock<[u8; 16]> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut bytes = *BASE.get_or_init(|| *uuid::Uuid::new_v4().as_bytes());
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    bytes[10..].copy_from_slice(&n.to_be_bytes()[2..]);
    uuid::Uuid::from_bytes(bytes).hyphenated().to_string()
}

/// The longest error message sent, in bytes.
const MAX_MESSAGE: usize = 1024;

fn error_response(e: &KmsError) -> Response {
    match e {
        KmsError::Internal(detail) => tracing::error!(error = %detail, "internal error"),
        // Which token and which PKCS#11 call failed, with the CKR_ code, is in the message.
        KmsError::Unavailable(detail) => {
            tracing::warn!(error = %detail, "token cluster unavailable")
        }
        _ => {}
    }
    // Messages may quote client input (serde's echo a JSON value): bounded, so that one request
    // cannot make the answer, or anything that logs it, large.
    let mut message = e.public_message();
    if message.len() > MAX_MESSAGE {
        let cut = (0..=MAX_MESSAGE)
            .rev()
            .find(|i| message.is_char_boundary(*i))
            .unwrap_or(0);
        message.truncate(cut);
        message.push_str("...");
    }
    let body = serde_json::json!({ "__type": e.code(), "message": message });
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, to_json(&body))
}

async fn handle(
    State(front): State<Arc<KmsFront>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let operation = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.strip_prefix("TrentService."))
        .unwrap_or("")
        .to_string();
    let result = serve(&front, &method, &uri, &headers, body, &operation).await;
    let latency = started.elapsed();
    let latency_us = latency.as_micros() as u64;
    // Logs and metrics name only known operations: X-Amz-Target is read before authentication,
    // so anything else in it is a client's text.
    let op = OPERATIONS
        .iter()
        .find(|o| **o == operation)
        .copied()
        .unwrap_or("Unknown");
    front
        .metrics
        .observe(op, latency, result.as_ref().err().map(KmsError::code));
    match result {
        Ok(body) => {
            tracing::debug!(op, latency_us, "ok");
            json_response(StatusCode::OK, body)
        }
        Err(e) => {
            tracing::info!(op, latency_us, error = e.code(), "refused");
            error_response(&e)
        }
    }
}

/// Prometheus metrics; unauthenticated, like `/healthz` (bind the service to a trusted network).
async fn metrics(State(front): State<Arc<KmsFront>>) -> Response {
    let store = front.service.metadata_store().clone();
    let backups = tokio::task::spawn_blocking(move || store.backups())
        .await
        .ok()
        .and_then(Result::ok)
        .map(|list| crate::metrics::BackupSummary {
            count: list.len(),
            last: list.into_iter().max_by_key(|b| b.created_ms),
        });
    let text = front.metrics.render(&front.service, backups);
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        text,
    )
        .into_response()
}

async fn serve(
    front: &KmsFront,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
    operation: &str,
) -> KmsResult<Zeroizing<Vec<u8>>> {
    // Nothing of the body is read for a client whose headers cannot authenticate.
    front.principals.precheck(
        headers,
        &front.service.scope().region,
        "kms",
        front.service.clock(),
    )?;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let body = read_body(body, declared).await?;
    let service = &front.service;
    let request = SignedRequest {
        method,
        uri,
        headers,
        body: &body,
    };
    let principal =
        front
            .principals
            .authenticate(&request, &service.scope().region, "kms", service.clock())?;
    if STORE_ADMIN_OPERATIONS.contains(&operation) && !principal.admin {
        return Err(KmsError::AccessDenied(format!(
            "{} may not call {operation}: managing custom key stores needs a principal with admin = true",
            principal.name
        )));
    }
    let answer = dispatch(service, operation, &body).await?;
    if operation == "DescribeCustomKeyStores" && !principal.admin {
        return Ok(without_token_details(&answer));
    }
    Ok(answer)
}

/// DescribeCustomKeyStores as a non-admin principal sees it: ids, names, states and error codes.
/// Module paths, serials, models and error messages (PKCS#11 functions, CKR_ codes) describe the
/// service's host and tokens; they are for the operators who manage the stores.
fn without_token_details(answer: &[u8]) -> Zeroizing<Vec<u8>> {
    use serde_json::Value;
    const STORE: &[&str] = &[
        "CustomKeyStoreId",
        "CustomKeyStoreName",
        "CustomKeyStoreType",
        "CloudHsmClusterId",
        "ConnectionState",
        "ConnectionErrorCode",
        "CreationDate",
        "HsmkmsTokens",
        "HsmkmsMinTokens",
        "HsmkmsDevStore",
    ];
    const TOKEN: &[&str] = &["Label", "State"];
    let keep = |v: &mut Value, names: &[&str]| {
        if let Value::Object(m) = v {
            m.retain(|k, _| names.contains(&k.as_str()));
        }
    };
    let Ok(mut v) = serde_json::from_slice::<Value>(answer) else {
        return Zeroizing::new(answer.to_vec());
    };
    if let Some(Value::Array(stores)) = v.get_mut("CustomKeyStores") {
        for store in stores {
            keep(store, STORE);
            if let Some(Value::Array(tokens)) = store.get_mut("HsmkmsTokens") {
                tokens.iter_mut().for_each(|t| keep(t, TOKEN));
            }
        }
    }
    to_json(&v)
}

/// Bodies a little over the limit are read to their end (and dropped) before the refusal, so
/// that a client still sending gets the 400 instead of a broken pipe; beyond this, the answer
/// comes at once and the connection closes. Only clients whose headers passed the precheck
/// get this courtesy, and the listener's body deadline bounds it.
const DRAIN_LIMIT: u64 = 4 * MAX_BODY as u64;

/// The request body, at most [`MAX_BODY`] bytes.
/// Held in a `Zeroizing` buffer that grows by moving into a larger zeroizing one, so that no
/// freed copy of a plaintext (base64 in the JSON) is left behind.
async fn read_body(body: Body, declared: Option<u64>) -> KmsResult<Zeroizing<Vec<u8>>> {
    use http_body_util::BodyExt;
    let too_large =
        || KmsError::RequestTooLarge(format!("The request body exceeds {MAX_BODY} bytes"));
    if declared.is_some_and(|n| n > DRAIN_LIMIT) {
        return Err(too_large());
    }
    let mut body = body;
    // Allocated as bytes arrive, not by what Content-Length announces.
    let mut kept = Zeroizing::new(Vec::with_capacity(
        declared.unwrap_or(0).min(16 * 1024) as usize
    ));
    let mut seen: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            KmsError::Serialization(format!("The request body could not be read: {e}"))
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len() as u64;
        if seen > DRAIN_LIMIT {
            return Err(too_large());
        }
        if seen <= MAX_BODY as u64 {
            if kept.capacity() - kept.len() < data.len() {
                let mut grown = Zeroizing::new(Vec::with_capacity(
                    (kept.len() + data.len()).max(2 * kept.capacity()),
                ));
                grown.extend_from_slice(&kept);
                kept = grown;
            }
            kept.extend_from_slice(&data);
        }
    }
    if seen > MAX_BODY as u64 {
        return Err(too_large());
    }
    Ok(kept)
}

/// A request body parsed into an operation's request type, with AWS's exceptions for what does not fit.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> KmsResult<T> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| {
        // A well-formed body without a required member is a validation failure, as AWS says;
        // anything else (not JSON, wrong types, bad base64) cannot be deserialised.
        if e.classify() == serde_json::error::Category::Data && e.to_string().starts_with("missing field") {
            let field = e.to_string().split('`').nth(1).unwrap_or("?").to_string();
            KmsError::Validation(format!("1 validation error detected: Value null at '{field}' failed to satisfy constraint: Member must not be null"))
        } else {
            KmsError::Serialization(format!("Malformed request body: {e}"))
        }
    })
}

/// Every answer that can hold a secret (Decrypt's 4 KiB plaintext in base64, a 1 KiB data key
/// and its blob) fits this, so serialising never reallocates and leaves no stray copy behind.
const ANSWER_CAPACITY: usize = 8 * 1024;

fn to_json<T: Serialize>(value: &T) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(ANSWER_CAPACITY));
    serde_json::to_writer(&mut *out, value).expect("responses serialise");
    out
}

fn reply<T: Serialize>(value: KmsResult<T>) -> KmsResult<Zeroizing<Vec<u8>>> {
    value.map(|v| to_json(&v))
}

/// The operations `dispatch` serves, for metrics labels (names outside it count as "Unknown",
/// so unauthenticated clients cannot mint label values).
pub const OPERATIONS: &[&str] = &[
    "CreateKey",
    "DescribeKey",
    "ListKeys",
    "Encrypt",
    "Decrypt",
    "ReEncrypt",
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "GenerateRandom",
    "CreateAlias",
    "UpdateAlias",
    "DeleteAlias",
    "ListAliases",
    "EnableKey",
    "DisableKey",
    "ScheduleKeyDeletion",
    "CancelKeyDeletion",
    "TagResource",
    "UntagResource",
    "ListResourceTags",
    "UpdateKeyDescription",
    "GetKeyRotationStatus",
    "ListKeyRotations",
    "EnableKeyRotation",
    "DisableKeyRotation",
    "RotateKeyOnDemand",
    "GetKeyPolicy",
    "ListKeyPolicies",
    "ListGrants",
    "PutKeyPolicy",
    "CreateGrant",
    "DescribeCustomKeyStores",
    "CreateCustomKeyStore",
    "UpdateCustomKeyStore",
    "DeleteCustomKeyStore",
    "ConnectCustomKeyStore",
    "DisconnectCustomKeyStore",
];

/// Operations that change custom key stores: they name token modules and PIN files on the
/// service's host, so only principals marked `admin` may call them.
pub const STORE_ADMIN_OPERATIONS: &[&str] = &[
    "CreateCustomKeyStore",
    "UpdateCustomKeyStore",
    "DeleteCustomKeyStore",
    "ConnectCustomKeyStore",
    "DisconnectCustomKeyStore",
];

/// Every operation of the front, by its `X-Amz-Target` name.
pub async fn dispatch(
    s: &Arc<Service>,
    operation: &str,
    body: &[u8],
) -> KmsResult<Zeroizing<Vec<u8>>> {
    match operation {
        "CreateKey" => reply(s.create_key(parse(body)?).await),
        "DescribeKey" => reply(s.describe_key(parse(body)?).await),
        "ListKeys" => reply(s.list_keys(parse(body)?).await),
        "Encrypt" => reply(s.encrypt(parse(body)?).await),
        "Decrypt" => reply(s.decrypt(parse(body)?).await),
        "ReEncrypt" => reply(s.re_encrypt(parse(body)?).await),
        "GenerateDataKey" => reply(s.generate_data_key(parse(body)?, true).await),
        "GenerateDataKeyWithoutPlaintext" => reply(s.generate_data_key(parse(body)?, false).await),
        "GenerateRandom" => reply(s.generate_random(parse(body)?).await),
        "CreateAlias" => reply(s.create_alias(parse(body)?).await),
        "UpdateAlias" => reply(s.update_alias(parse(body)?).await),
        "DeleteAlias" => reply(s.delete_alias(parse(body)?).await),
        "ListAliases" => reply(s.list_aliases(parse(body)?).await),
        "EnableKey" => reply(s.enable_key(parse(body)?).await),
        "DisableKey" => reply(s.disable_key(parse(body)?).await),
        "ScheduleKeyDeletion" => reply(s.schedule_key_deletion(parse(body)?).await),
        "CancelKeyDeletion" => reply(s.cancel_key_deletion(parse(body)?).await),
        "TagResource" => reply(s.tag_resource(parse(body)?).await),
        "UntagResource" => reply(s.untag_resource(parse(body)?).await),
        "ListResourceTags" => reply(s.list_resource_tags(parse(body)?).await),
        "UpdateKeyDescription" => reply(s.update_key_description(parse(body)?).await),
        "GetKeyRotationStatus" => reply(s.get_key_rotation_status(parse(body)?).await),
        "ListKeyRotations" => reply(s.list_key_rotations(parse(body)?).await),
        "EnableKeyRotation" | "DisableKeyRotation" | "RotateKeyOnDemand" => {
            reply(s.refuse_rotation(parse(body)?).await)
        }
        "GetKeyPolicy" => reply(s.get_key_policy(parse(body)?).await),
        "DescribeCustomKeyStores" => reply(s.describe_custom_key_stores(parse(body)?).await),
        "ConnectCustomKeyStore" => reply(s.connect_custom_key_store(parse(body)?).await),
        "DisconnectCustomKeyStore" => reply(s.disconnect_custom_key_store(parse(body)?).await),
        "CreateCustomKeyStore" => reply(s.create_custom_key_store(parse(body)?).await),
        "UpdateCustomKeyStore" => reply(s.update_custom_key_store(parse(body)?).await),
        "DeleteCustomKeyStore" => reply(s.delete_custom_key_store(parse(body)?).await),
        "ListKeyPolicies" => reply(s.list_key_policies(parse(body)?).await),
        "ListGrants" => reply(s.list_grants(parse(body)?).await),
        "PutKeyPolicy" | "CreateGrant" => {
            reply(s.refuse_access_change(operation, parse(body)?).await)
        }
        "" => Err(KmsError::UnknownOperation(
            "Missing X-Amz-Target: TrentService.<Operation>".into(),
        )),
        other => Err(KmsError::UnknownOperation(format!(
            "Operation {} is not supported",
            crate::sigv4::shown(other)
        ))),
    }
}

async fn health(State(front): State<Arc<KmsFront>>) -> Response {
    let stores: Vec<_> = front
        .service
        .describe_custom_key_stores(Default::default())
        .await
        .map(|d| d.custom_key_stores)
        .unwrap_or_default();
    // Unauthenticated: states only. Serials, module paths and errors (with CKR_ codes) are in
    // DescribeCustomKeyStores for admin principals.
    let token_json = |t: &crate::wire::TokenHealthEntry| {
        serde_json::json!({
            "label": t.label,
            "state": t.state,
        })
    };
    let default = front.service.default_key_store().ok().map(|s| s.id());
    let main = stores
        .iter()
        .find(|s| Some(&s.custom_key_store_id) == default.as_ref());
    // Healthy while the default store serves (or there is none); other stores' states are in
    // the body, so that one unused store that failed does not fail the instance.
    let healthy = main.is_none_or(|s| s.connection_state != "FAILED");
    let body = serde_json::json!({
        "status": if healthy { "ok" } else { "unavailable" },
        // The default store's, at the top level, for simple probes.
        "customKeyStoreId": main.map(|s| s.custom_key_store_id.clone()),
        "cloudHsmClusterId": main.map(|s| s.cloud_hsm_cluster_id.clone()),
        "tokens": main.map(|s| s.hsmkms_tokens.iter().map(token_json).collect::<Vec<_>>()).unwrap_or_default(),
        "keyStores": stores.iter().map(|s| serde_json::json!({
            "customKeyStoreId": s.custom_key_store_id,
            "name": s.custom_key_store_name,
            "connectionState": s.connection_state,
            "connectionErrorCode": s.connection_error_code,
            "tokens": s.hsmkms_tokens.iter().map(token_json).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "lastProbe": front.service.last_probe(),
    });
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}
