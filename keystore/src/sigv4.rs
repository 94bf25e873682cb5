//! AWS Signature Version 4 verification (service `kms`).
//!
//! Verification, not signing: we rebuild the canonical request from exactly the headers the client
//! listed in `SignedHeaders`, so the signing crates (which choose their own header set) do not fit.
//! The test suite checks this code against two independent signers: botocore (the aws CLI and
//! boto3) and the vectors below, computed with AWS's published algorithm.

mod canonical;
mod date;
#[cfg(test)]
mod suite;

use std::collections::HashMap;
use std::sync::Mutex;

use axum::http::{HeaderMap, Method, Uri};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::clock::Clock;
use crate::error::KmsError;

pub use date::{format_amz_date, parse_amz_date};

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
        // A poisoned cache holds only derived keys, each whole: keep using it.
        let mut cache = self.signing_keys.lock().unwrap_or_else(|e| e.into_inner());
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

    /// Checks the request's signature against the time of `clock`; returns who signed it.
    pub fn authenticate(
        &self,
        request: &SignedRequest,
        region: &str,
        service: &str,
        clock: &dyn Clock,
    ) -> Result<&Principal, KmsError> {
        let (auth, principal, amz_date) =
            self.check_headers(request.headers, region, service, clock)?;
        let scope = CredentialScope {
            date: auth.date,
            region: auth.region,
            service: auth.service,
        };
        let key = self.signing_key_for(principal, &scope);
        let mac = signature_mac(
            &request.parts(),
            &auth.signed_headers,
            amz_date,
            &scope,
            &key,
        )?;
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
    /// Everything the headers alone can prove, before any byte of the body is read: one value
    /// of each header that decides the request, an Authorization header that parses, an access
    /// key id we know, an X-Amz-Date within the allowed skew that matches the credential's
    /// scope, the region and service, and the headers that must be signed. `authenticate` then
    /// only has to check the signature; the KMS front calls this first (`precheck`), so that a
    /// client that cannot authenticate makes the service buffer nothing.
    fn check_headers<'h>(
        &self,
        headers: &'h HeaderMap,
        region: &str,
        service: &str,
        clock: &dyn Clock,
    ) -> Result<(AuthorizationHeader<'h>, &Principal, &'h str), KmsError> {
        // One value each: with two, the one checked here and the one that a proxy or the
        // operation dispatch reads could differ.
        for name in ["authorization", "x-amz-date", "host", "x-amz-target"] {
            if headers.get_all(name).iter().nth(1).is_some() {
                return Err(incomplete(&format!(
                    "The request has more than one {name} header"
                )));
            }
        }
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
            .ok_or_else(|| incomplete("Missing X-Amz-Date header"))?
            .to_str()
            .ok()
            .filter(|d| parse_amz_date(d).is_some())
            .ok_or_else(|| {
                incomplete("Malformed X-Amz-Date header: it must be YYYYMMDDTHHMMSSZ")
            })?;
        let signed_at = parse_amz_date(amz_date).expect("checked above");
        let now = clock.now_ms().div_euclid(1000);
        if (now - signed_at).abs() > MAX_CLOCK_SKEW_SECS {
            return Err(KmsError::InvalidSignature(format!(
                "Signature expired or not yet valid: {amz_date} is more than 15 minutes from the server's time"
            )));
        }
        // parse_amz_date accepted 16 ASCII bytes: the first 8 are the date.
        if auth.date != &amz_date[..8] {
            return Err(KmsError::InvalidSignature(
                "Credential scope date does not match X-Amz-Date".into(),
            ));
        }
        if auth.region != region {
            return Err(KmsError::InvalidSignature(format!(
                "Credential should be scoped to a valid region: '{}' is not '{region}'",
                shown(auth.region)
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
        Ok((auth, principal, amz_date))
    }

    /// [`Principals::check_headers`], for the front to call before it reads the body.
    pub fn precheck(
        &self,
        headers: &HeaderMap,
        region: &str,
        service: &str,
        clock: &dyn Clock,
    ) -> Result<(), KmsError> {
        self.check_headers(headers, region, service, clock)
            .map(|_| ())
    }
}

struct CredentialScope<'a> {
    date: &'a str,
    region: &'a str,
    service: &'a str,
}

/// The HMAC state over the string to sign; finalising it gives the signature.
fn signature_mac(
    request: &canonical::Parts,
    signed_headers: &[&str],
    amz_date: &str,
    scope: &CredentialScope,
    signing_key: &[u8],
) -> Result<HmacSha256, KmsError> {
    let mut hash = Sha256::new();
    canonical::write(&mut hash, request, signed_headers)?;
    let canonical: [u8; 32] = hash.finalize().into();
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
        if parse_amz_date(amz_date).is_none() {
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
        let mac = signature_mac(&request.parts(), &names, amz_date, &scope, key)?;
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

/// The parts of an HTTP request that a signature covers.
#[derive(Clone, Copy)]
pub struct SignedRequest<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
}

impl SignedRequest<'_> {
    fn parts(&self) -> canonical::Parts<'_> {
        canonical::Parts {
            method: self.method.as_str(),
            path: self.uri.path().as_bytes(),
            query: self.uri.query().map(str::as_bytes),
            headers: self.headers,
            body: self.body,
        }
    }
}

fn incomplete(why: &str) -> KmsError {
    KmsError::IncompleteSignature(why.to_string())
}

/// Client input as it may appear in an error text: at most [`SHOWN_CHARS`] characters, and only
/// printable ASCII (anything else becomes `?`), so that a message cannot carry control
/// characters, fake log fields on other lines, or kilobytes of a client's choosing.
pub fn shown(input: &str) -> String {
    let mut out: String = input
        .chars()
        .take(SHOWN_CHARS)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if input.chars().nth(SHOWN_CHARS).is_some() {
        out.push_str("...");
    }
    out
}

/// How much of one piece of client input an error text shows.
pub const SHOWN_CHARS: usize = 64;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{ManualClock, SystemClock};
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

    fn at(date: &str) -> ManualClock {
        ManualClock::new(parse_amz_date(date).unwrap() * 1000)
    }

    const VANILLA_SIG: &str = "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31";

    #[test]
    fn aws_get_vanilla_vector_verifies() {
        let now = at("20150830T123600Z");
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
                &now,
            )
            .unwrap();
        assert_eq!(p.name, "example");
    }

    #[test]
    fn altered_signature_or_body_is_invalid_signature() {
        let now = at("20150830T123600Z");
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
                &now,
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
                &now,
            )
            .unwrap_err();
        assert!(matches!(err, KmsError::InvalidSignature(_)));
    }

    #[test]
    fn stale_request_and_unknown_key_are_refused() {
        let uri: Uri = "/".parse().unwrap();
        let late = at("20150830T130000Z");
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
                &late,
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
                &late,
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
                &late,
            )
            .unwrap_err();
        assert!(matches!(err, KmsError::MissingAuthenticationToken(_)));
    }

    #[test]
    fn a_signed_request_verifies_and_a_changed_one_does_not() {
        let now = SystemClock;
        let uri: Uri = "/".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("localhost:8080"));
        headers.insert(
            "x-amz-date",
            HeaderValue::from_str(&format_amz_date(std::time::SystemTime::now())).unwrap(),
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
            .authenticate(&ok, "us-east-1", "kms", &now)
            .is_ok());
        let changed = SignedRequest { body: b"{ }", ..ok };
        assert!(matches!(
            principals.authenticate(&changed, "us-east-1", "kms", &now),
            Err(KmsError::InvalidSignature(_))
        ));
    }

    fn authenticate_at(
        headers: &HeaderMap,
        target: &str,
        clock: &dyn Clock,
    ) -> Result<String, KmsError> {
        let uri: Uri = target.parse().unwrap();
        principals()
            .authenticate(
                &SignedRequest {
                    method: &Method::GET,
                    uri: &uri,
                    headers,
                    body: b"",
                },
                "us-east-1",
                "service",
                clock,
            )
            .map(|p| p.name.clone())
    }

    #[test]
    fn a_query_escape_split_inside_a_utf8_character_is_a_wrong_signature_not_a_panic() {
        let uri = Uri::try_from(&b"/?a=%2\xd3\x87"[..]).unwrap();
        let err = principals()
            .authenticate(
                &SignedRequest {
                    method: &Method::POST,
                    uri: &uri,
                    headers: &vanilla(&"0".repeat(64)),
                    body: b"",
                },
                "us-east-1",
                "service",
                &at("20150830T123600Z"),
            )
            .unwrap_err();
        assert!(matches!(err, KmsError::InvalidSignature(_)), "{err:?}");
    }

    #[test]
    fn the_time_comes_from_the_clock() {
        let clock = at("20150830T123600Z");
        let headers = vanilla(VANILLA_SIG);
        assert_eq!(authenticate_at(&headers, "/", &clock).unwrap(), "example");
        clock.advance_ms(15 * 60 * 1000);
        assert!(authenticate_at(&headers, "/", &clock).is_ok());
        clock.advance_ms(1000);
        assert!(matches!(
            authenticate_at(&headers, "/", &clock),
            Err(KmsError::InvalidSignature(_))
        ));
    }

    #[test]
    fn duplicate_host_target_date_or_authorization_headers_are_refused() {
        let clock = at("20150830T123600Z");
        for (name, value) in [
            ("host", "other.example.com"),
            ("x-amz-target", "TrentService.ListKeys"),
            ("x-amz-date", "20150830T123600Z"),
            ("authorization", "AWS4-HMAC-SHA256 Credential=x"),
        ] {
            let mut headers = vanilla(VANILLA_SIG);
            if name == "x-amz-target" {
                headers.append(name, HeaderValue::from_static("TrentService.Decrypt"));
            }
            headers.append(name, HeaderValue::from_static(value));
            let err = authenticate_at(&headers, "/", &clock).unwrap_err();
            assert!(
                matches!(err, KmsError::IncompleteSignature(ref m) if m.contains(name)),
                "{name}: {err:?}"
            );
        }
    }

    #[test]
    fn malformed_dates_are_refused_before_any_signature_work() {
        let clock = at("20150830T123600Z");
        for date in ["2015083+T123600Z", "20150831T123660Z", "20150830T123600"] {
            let mut headers = vanilla(VANILLA_SIG);
            headers.insert("x-amz-date", HeaderValue::from_static(date));
            let err = authenticate_at(&headers, "/", &clock).unwrap_err();
            assert!(
                matches!(err, KmsError::IncompleteSignature(_)),
                "{date}: {err:?}"
            );
        }
    }

    #[test]
    fn error_texts_show_client_input_bounded_and_printable() {
        let region = format!("{}\nresult=ok", "r".repeat(5000));
        let mut headers = vanilla(VANILLA_SIG);
        headers.insert(
            "authorization",
            HeaderValue::from_str(&format!(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/{}/service/aws4_request, SignedHeaders=host;x-amz-date, Signature={VANILLA_SIG}",
                region.replace('\n', "\t")
            ))
            .unwrap(),
        );
        let err = authenticate_at(&headers, "/", &at("20150830T123600Z")).unwrap_err();
        let text = err.public_message();
        assert!(text.len() < 200, "{} bytes: {text}", text.len());
        assert!(!text.contains('\t'), "{text}");
        assert_eq!(shown("a\nb\u{1b}[31m"), "a?b?[31m");
        assert_eq!(
            shown(&"x".repeat(100)),
            format!("{}...", "x".repeat(SHOWN_CHARS))
        );
    }
}
