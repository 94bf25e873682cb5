//! AWS Signature Version 4 verification (service `kms`).
//!
//! Verification, not signing: we rebuild the canonical request from exactly the headers the client
//! listed in `SignedHeaders`, so the signing crates (which choose their own header set) do not fit.
//! The test suite checks this code against two independent signers: botocore (the aws CLI and
//! boto3) and the vectors below, computed with AWS's published algorithm.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, Method, Uri};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::error::KmsError;

type HmacSha256 = Hmac<Sha256>;

/// How far a request's `X-Amz-Date` may be from our clock, as AWS allows.
pub const MAX_CLOCK_SKEW_SECS: i64 = 15 * 60;

/// A principal that may call the service, known by its access key id.
pub struct Principal {
    pub name: String,
    pub access_key_id: String,
    pub secret_access_key: SecretString,
    /// May manage custom key stores.
    pub admin: bool,
}

impl std::fmt::Debug for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Principal")
            .field("name", &self.name)
            .field("access_key_id", &self.access_key_id)
            .finish()
    }
}

/// A derived signing key and the scope (`date/region/service`) it is for.
type ScopedKey = (String, Zeroizing<Vec<u8>>);

#[derive(Default)]
pub struct Principals {
    by_access_key: HashMap<String, Principal>,
    /// Each principal's signing key for its latest scope (`date/region/service`): deriving it
    /// takes four HMACs, and a client signs with the same one all day.
    signing_keys: Mutex<HashMap<String, ScopedKey>>,
}

impl std::fmt::Debug for Principals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.by_access_key.values()).finish()
    }
}

impl Principals {
    pub fn new(list: Vec<Principal>) -> Principals {
        Principals {
            by_access_key: list
                .into_iter()
                .map(|p| (p.access_key_id.clone(), p))
                .collect(),
            signing_keys: Mutex::new(HashMap::new()),
        }
    }

    fn signing_key_for(
        &self,
        principal: &Principal,
        scope: &CredentialScope,
    ) -> Zeroizing<Vec<u8>> {
        let scope_text = format!("{}/{}/{}", scope.date, scope.region, scope.service);
        let mut cache = self.signing_keys.lock().unwrap();
        if let Some((cached_scope, key)) = cache.get(&principal.access_key_id) {
            if *cached_scope == scope_text {
                return key.clone();
            }
        }
        let key = signing_key(
            &principal.secret_access_key,
            scope.date,
            scope.region,
            scope.service,
        );
        cache.insert(principal.access_key_id.clone(), (scope_text, key.clone()));
        key
    }

    /// Checks the request's signature; returns who signed it.
    pub fn authenticate(
        &self,
        request: &SignedRequest,
        region: &str,
        service: &str,
        now: SystemTime,
    ) -> Result<&Principal, KmsError> {
        let SignedRequest {
            method,
            uri,
            headers,
            body,
        } = *request;
        let auth = headers
            .get("authorization")
            .ok_or_else(|| {
                KmsError::MissingAuthenticationToken("Missing Authentication Token".into())
            })?
            .to_str()
            .map_err(|_| incomplete("Authorization header is not ASCII"))?;
        let auth = AuthorizationHeader::parse(auth)?;
        let principal = self.by_access_key.get(auth.access_key_id).ok_or_else(|| {
            KmsError::UnrecognizedClient(
                "The security token included in the request is invalid.".into(),
            )
        })?;
        let amz_date = headers
            .get("x-amz-date")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| incomplete("Missing X-Amz-Date header"))?;
        let signed_at =
            parse_amz_date(amz_date).ok_or_else(|| incomplete("Malformed X-Amz-Date header"))?;
        let now = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        if (now - signed_at).abs() > MAX_CLOCK_SKEW_SECS {
            return Err(KmsError::InvalidSignature(format!(
                "Signature expired or not yet valid: {amz_date} is more than 15 minutes from the server's time"
            )));
        }
        if auth.date != &amz_date[..8] {
            return Err(KmsError::InvalidSignature(
                "Credential scope date does not match X-Amz-Date".into(),
            ));
        }
        if auth.region != region {
            return Err(KmsError::InvalidSignature(format!(
                "Credential should be scoped to a valid region: '{}' is not '{region}'",
                auth.region
            )));
        }
        if auth.service != service || auth.terminator != "aws4_request" {
            return Err(KmsError::InvalidSignature(format!(
                "Credential should be scoped to service '{service}'"
            )));
        }
        if !auth.signed_headers.contains(&"host") {
            return Err(incomplete("The host header must be signed"));
        }
        // The operation travels in a header: an unsigned one could be swapped in transit.
        if headers.contains_key("x-amz-target") && !auth.signed_headers.contains(&"x-amz-target") {
            return Err(incomplete("The x-amz-target header must be signed"));
        }
        let request = SignedRequest {
            method,
            uri,
            headers,
            body,
        };
        let scope = CredentialScope {
            date: auth.date,
            region: auth.region,
            service: auth.service,
        };
        let key = self.signing_key_for(principal, &scope);
        let mac = signature_mac(&request, &auth.signed_headers, amz_date, &scope, &key)?;
        let signature =
            hex::decode(auth.signature).map_err(|_| incomplete("Signature is not hex"))?;
        // Constant-time comparison.
        mac.verify_slice(&signature).map_err(|_| {
            KmsError::InvalidSignature(
                "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method.".into(),
            )
        })?;
        Ok(principal)
    }
}

impl Principals {
    /// What the headers alone can tell, checked before a body is read: an Authorization header
    /// that parses, an access key id we know, and an X-Amz-Date within the allowed skew. An
    /// unauthenticated client then cannot make the service buffer its body. `authenticate`
    /// still makes every check, with the signature over the body.
    pub fn precheck(&self, headers: &HeaderMap, now: SystemTime) -> Result<(), KmsError> {
        let auth = headers
            .get("authorization")
            .ok_or_else(|| {
                KmsError::MissingAuthenticationToken("Missing Authentication Token".into())
            })?
            .to_str()
            .map_err(|_| incomplete("Authorization header is not ASCII"))?;
        let auth = AuthorizationHeader::parse(auth)?;
        if !self.by_access_key.contains_key(auth.access_key_id) {
            return Err(KmsError::UnrecognizedClient(
                "The security token included in the request is invalid.".into(),
            ));
        }
        let amz_date = headers
            .get("x-amz-date")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| incomplete("Missing X-Amz-Date header"))?;
        let signed_at =
            parse_amz_date(amz_date).ok_or_else(|| incomplete("Malformed X-Amz-Date header"))?;
        let now = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        if (now - signed_at).abs() > MAX_CLOCK_SKEW_SECS {
            return Err(KmsError::InvalidSignature(format!(
                "Signature expired or not yet valid: {amz_date} is more than 15 minutes from the server's time"
            )));
        }
        Ok(())
    }
}

struct CredentialScope<'a> {
    date: &'a str,
    region: &'a str,
    service: &'a str,
}

/// The HMAC state over the string to sign; finalising it gives the signature.
fn signature_mac(
    request: &SignedRequest,
    signed_headers: &[&str],
    amz_date: &str,
    scope: &CredentialScope,
    signing_key: &[u8],
) -> Result<HmacSha256, KmsError> {
    let canonical = canonical_request_hash(
        request.method,
        request.uri,
        request.headers,
        signed_headers,
        request.body,
    )?;
    let mut canonical_hex = [0u8; 64];
    hex::encode_to_slice(canonical, &mut canonical_hex).expect("64 hex digits");
    let mut mac = HmacSha256::new_from_slice(signing_key).expect("HMAC takes any key length");
    for part in [
        b"AWS4-HMAC-SHA256\n".as_slice(),
        amz_date.as_bytes(),
        b"\n",
        scope.date.as_bytes(),
        b"/",
        scope.region.as_bytes(),
        b"/",
        scope.service.as_bytes(),
        b"/aws4_request\n",
        &canonical_hex,
    ] {
        mac.update(part);
    }
    Ok(mac)
}

/// Signs a request as an AWS SDK would: every header present is signed (the request must carry
/// `host` and `x-amz-date`). Returns the `Authorization` header value. Used by the load tool and
/// tests; clients of the service sign with their own SDKs.
pub fn sign(
    request: &SignedRequest,
    access_key_id: &str,
    secret: &SecretString,
    region: &str,
    service: &str,
) -> Result<String, KmsError> {
    Signer::new(access_key_id, secret.clone(), region, service).sign(request)
}

/// Signs requests for one principal, region and service, deriving the signing key once a day
/// as the AWS SDKs do.
pub struct Signer {
    access_key_id: String,
    secret: SecretString,
    region: String,
    service: String,
    key: Option<(String, Zeroizing<Vec<u8>>)>,
}

impl Signer {
    pub fn new(access_key_id: &str, secret: SecretString, region: &str, service: &str) -> Signer {
        Signer {
            access_key_id: access_key_id.into(),
            secret,
            region: region.into(),
            service: service.into(),
            key: None,
        }
    }

    /// The `Authorization` header value for `request`, which must carry `host` and `x-amz-date`;
    /// every header present is signed.
    pub fn sign(&mut self, request: &SignedRequest) -> Result<String, KmsError> {
        let amz_date = request
            .headers
            .get("x-amz-date")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| incomplete("Missing X-Amz-Date header"))?;
        if amz_date.len() < 8 {
            return Err(incomplete("Malformed X-Amz-Date header"));
        }
        let date = &amz_date[..8];
        let mut names: Vec<&str> = request.headers.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        if self.key.as_ref().is_none_or(|(d, _)| d != date) {
            let key = signing_key(&self.secret, date, &self.region, &self.service);
            self.key = Some((date.to_string(), key));
        }
        let (_, key) = self.key.as_ref().expect("just set");
        let scope = CredentialScope {
            date,
            region: &self.region,
            service: &self.service,
        };
        let mac = signature_mac(request, &names, amz_date, &scope, key)?;
        Ok(format!(
            "AWS4-HMAC-SHA256 Credential={}/{date}/{}/{}/aws4_request, SignedHeaders={}, Signature={}",
            self.access_key_id,
            self.region,
            self.service,
            names.join(";"),
            hex::encode(mac.finalize().into_bytes())
        ))
    }
}

/// `SystemTime` as `YYYYMMDDTHHMMSSZ`.
pub fn format_amz_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The inverse of `days_from_civil`.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

/// The parts of an HTTP request that a signature covers.
#[derive(Clone, Copy)]
pub struct SignedRequest<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
}

fn incomplete(why: &str) -> KmsError {
    KmsError::IncompleteSignature(why.to_string())
}

struct AuthorizationHeader<'a> {
    access_key_id: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    terminator: &'a str,
    signed_headers: Vec<&'a str>,
    signature: &'a str,
}

impl<'a> AuthorizationHeader<'a> {
    fn parse(header: &'a str) -> Result<AuthorizationHeader<'a>, KmsError> {
        let rest = header
            .strip_prefix("AWS4-HMAC-SHA256 ")
            .ok_or_else(|| incomplete("Authorization must use AWS4-HMAC-SHA256"))?;
        let (mut credential, mut signed, mut signature) = (None, None, None);
        for part in rest.split(',') {
            let part = part.trim();
            if let Some(v) = part.strip_prefix("Credential=") {
                credential = Some(v);
            } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
                signed = Some(v);
            } else if let Some(v) = part.strip_prefix("Signature=") {
                signature = Some(v);
            }
        }
        let credential =
            credential.ok_or_else(|| incomplete("Authorization is missing Credential"))?;
        let signed = signed.ok_or_else(|| incomplete("Authorization is missing SignedHeaders"))?;
        let signature =
            signature.ok_or_else(|| incomplete("Authorization is missing Signature"))?;
        let parts: Vec<&str> = credential.split('/').collect();
        let [access_key_id, date, region, service, terminator] = parts[..] else {
            return Err(incomplete(
                "Credential must be AKID/date/region/service/aws4_request",
            ));
        };
        if date.len() != 8 {
            return Err(incomplete("Credential date must be YYYYMMDD"));
        }
        Ok(AuthorizationHeader {
            access_key_id,
            date,
            region,
            service,
            terminator,
            signed_headers: signed.split(';').collect(),
            signature,
        })
    }
}

fn signing_key(
    secret: &SecretString,
    date: &str,
    region: &str,
    service: &str,
) -> Zeroizing<Vec<u8>> {
    let mut key = Zeroizing::new(format!("AWS4{}", secret.expose_secret()).into_bytes());
    for part in [date, region, service, "aws4_request"] {
        let mut mac = HmacSha256::new_from_slice(&key).expect("HMAC takes any key length");
        mac.update(part.as_bytes());
        key = Zeroizing::new(mac.finalize().into_bytes().to_vec());
    }
    key
}

/// Hashes the canonical request as it is built: no intermediate string, one pass.
fn canonical_request_hash(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    signed_headers: &[&str],
    body: &[u8],
) -> Result<[u8; 32], KmsError> {
    let mut h = Sha256::new();
    h.update(method.as_str());
    h.update(b"\n");
    match uri.path() {
        // The KMS JSON protocol always posts to "/": skip the encoding round trip.
        "/" | "" => h.update(b"/"),
        path => h.update(canonical_path(path)),
    }
    h.update(b"\n");
    if let Some(q) = uri.query().filter(|q| !q.is_empty()) {
        h.update(canonical_query(q));
    }
    h.update(b"\n");
    for name in signed_headers {
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(incomplete("SignedHeaders must be lowercase names"));
        }
        let mut values = headers.get_all(*name).iter().peekable();
        if values.peek().is_none() {
            return Err(incomplete(&format!(
                "Signed header {name} is missing from the request"
            )));
        }
        h.update(name);
        h.update(b":");
        for (i, v) in values.enumerate() {
            if i > 0 {
                h.update(b",");
            }
            let v = String::from_utf8_lossy(v.as_bytes());
            h.update(collapse_spaces(&v).as_bytes());
        }
        h.update(b"\n");
    }
    h.update(b"\n");
    for (i, name) in signed_headers.iter().enumerate() {
        if i > 0 {
            h.update(b";");
        }
        h.update(name);
    }
    h.update(b"\n");
    let mut body_hash = [0u8; 64];
    hex::encode_to_slice(Sha256::digest(body), &mut body_hash).expect("64 hex digits");
    h.update(body_hash);
    Ok(h.finalize().into())
}

/// Trims a header value and folds runs of spaces into one, as SigV4 canonicalisation asks.
fn collapse_spaces(v: &str) -> std::borrow::Cow<'_, str> {
    let v = v.trim();
    if !v.contains("  ") && !v.contains(['\t', '\n', '\r']) {
        return std::borrow::Cow::Borrowed(v);
    }
    std::borrow::Cow::Owned(v.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn uri_encode(bytes: &[u8], keep_slash: bool) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn canonical_path(path: &str) -> String {
    if path.is_empty() {
        return "/".into();
    }
    uri_encode(&percent_decode(path), true)
}

fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                uri_encode(&percent_decode(k), false),
                uri_encode(&percent_decode(v), false),
            )
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// `20150830T123600Z` -> seconds since the epoch.
pub fn parse_amz_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, se) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    Some(days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + se)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    // AWS's published example ("get-vanilla" of the SigV4 test suite): secret
    // wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY, 20150830T123600Z, us-east-1, service "service".
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

    fn principals() -> Principals {
        Principals::new(vec![Principal {
            name: "example".into(),
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: SecretString::from(SECRET),
            admin: false,
        }])
    }

    fn vanilla(signature: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("example.amazonaws.com"));
        h.insert("x-amz-date", HeaderValue::from_static("20150830T123600Z"));
        h.insert(
            "authorization",
            HeaderValue::from_str(&format!(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature={signature}"
            ))
            .unwrap(),
        );
        h
    }

    fn at(secs: i64) -> SystemTime {
        UNIX_EPOCH + std::time::Duration::from_secs(secs as u64)
    }

    const VANILLA_SIG: &str = "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31";

    #[test]
    fn aws_get_vanilla_vector_verifies() {
        let now = at(parse_amz_date("20150830T123600Z").unwrap());
        let uri: Uri = "/".parse().unwrap();
        let principals = principals();
        let p = principals
            .authenticate(
                &SignedRequest {
                    method: &Method::GET,
                    uri: &uri,
                    headers: &vanilla(VANILLA_SIG),
                    body: b"",
                },
                "us-east-1",
                "service",
                now,
            )
            .unwrap();
        assert_eq!(p.name, "example");
    }

    #[test]
    fn altered_signature_or_body_is_invalid_signature() {
        let now = at(parse_amz_date("20150830T123600Z").unwrap());
        let uri: Uri = "/".parse().unwrap();
        let bad = VANILLA_SIG.replace('5', "6");
        let err = principals()
            .authenticate(
                &SignedRequest {
                    method: &Method::GET,
                    uri: &uri,
                    headers: &vanilla(&bad),
                    body: b"",
                },
                "us-east-1",
                "service",
                now,
            )
            .unwrap_err();
        assert!(matches!(err, KmsError::InvalidSignature(_)));
        let err = principals()
            .authenticate(
                &SignedRequest {
                    method: &Method::GET,
                    uri: &uri,
                    headers: &vanilla(VANILLA_SIG),
                    body: b"x",
                },
                "us-east-1",
                "service",
                now,
            )
            .unwrap_err();
        assert!(matches!(err, KmsError::InvalidSignature(_)));
    }

    #[test]
    fn stale_request_and_unknown_key_are_refused() {
        let uri: Uri = "/".parse().unwrap();
        let late = at(parse_amz_date("20150830T130000Z").unwrap());
        let err = principals()
            .authenticate(
                &SignedRequest {
                    method: &Method::GET,
                    uri: &uri,
                    headers: &vanilla(VANILLA_SIG),
                    body: b"",
                },
                "us-east-1",
                "service",
                late,
            )
            .unwrap_err();
        assert!(matches!(err, KmsError::InvalidSignature(_)));
        let err = Principals::default()
            .authenticate(
                &SignedRequest {
                    method: &Method::GET,
                    uri: &uri,
                    headers: &vanilla(VANILLA_SIG),
                    body: b"",
                },
                "us-east-1",
                "service",
                late,
            )
            .unwrap_err();
        assert!(matches!(err, KmsError::UnrecognizedClient(_)));
        let err = principals()
            .authenticate(
                &SignedRequest {
                    method: &Method::GET,
                    uri: &uri,
                    headers: &HeaderMap::new(),
                    body: b"",
                },
                "us-east-1",
                "service",
                late,
            )
            .unwrap_err();
        assert!(matches!(err, KmsError::MissingAuthenticationToken(_)));
    }

    #[test]
    fn a_signed_request_verifies_and_a_changed_one_does_not() {
        let now = SystemTime::now();
        let uri: Uri = "/".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("localhost:8080"));
        headers.insert(
            "x-amz-date",
            HeaderValue::from_str(&format_amz_date(now)).unwrap(),
        );
        headers.insert(
            "x-amz-target",
            HeaderValue::from_static("TrentService.ListKeys"),
        );
        let body = b"{}";
        let request = SignedRequest {
            method: &Method::POST,
            uri: &uri,
            headers: &headers,
            body,
        };
        let auth = sign(
            &request,
            "AKIDEXAMPLE",
            &SecretString::from(SECRET),
            "us-east-1",
            "kms",
        )
        .unwrap();
        headers.insert("authorization", HeaderValue::from_str(&auth).unwrap());
        let principals = principals();
        let ok = SignedRequest {
            method: &Method::POST,
            uri: &uri,
            headers: &headers,
            body,
        };
        assert!(principals
            .authenticate(&ok, "us-east-1", "kms", now)
            .is_ok());
        let changed = SignedRequest { body: b"{ }", ..ok };
        assert!(matches!(
            principals.authenticate(&changed, "us-east-1", "kms", now),
            Err(KmsError::InvalidSignature(_))
        ));
    }

    #[test]
    fn amz_date_formatting_inverts_parsing() {
        for s in [
            "19700101T000000Z",
            "20150830T123600Z",
            "20240229T235959Z",
            "21000301T010203Z",
        ] {
            let t = UNIX_EPOCH + std::time::Duration::from_secs(parse_amz_date(s).unwrap() as u64);
            assert_eq!(format_amz_date(t), s);
        }
    }

    #[test]
    fn amz_dates_convert_to_epoch_seconds() {
        assert_eq!(parse_amz_date("19700101T000000Z"), Some(0));
        assert_eq!(parse_amz_date("20150830T123600Z"), Some(1440938160));
        assert_eq!(parse_amz_date("2015-08-30T12:36:00Z"), None);
    }
}
