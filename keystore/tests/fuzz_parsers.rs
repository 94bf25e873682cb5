//! Property tests ("fuzzing") of the parsers that read hostile input: SigV4 (the whole
//! `authenticate` on arbitrary and on nearly valid requests), X-Amz-Date, KMS JSON bodies into
//! every request type, ciphertext blobs, encryption contexts and the TDE front's routes.
//!
//! Every property runs a bounded number of cases (`CASES`; `PROPTEST_CASES` overrides it), so
//! that the file runs in seconds under `cargo test --workspace`. Any panic fails. To cover a new
//! parser, add a `proptest!` block with one strategy of arbitrary bytes and, where the format
//! has structure, one that builds nearly valid inputs (arbitrary bytes rarely get past a
//! format's first check).

use std::collections::BTreeMap;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use keystore::api::parse;
use keystore::ciphertext::{CiphertextBlob, HEADER_LEN, MAX_BLOB, TAG_LEN};
use keystore::clock::ManualClock;
use keystore::context::EncryptionContext;
use keystore::error::KmsError;
use keystore::sigv4::{
    self, format_amz_date, parse_amz_date, Principal, Principals, SignedRequest,
};
use keystore::tde::front::{route, Route};
use keystore::wire;
use proptest::prelude::*;
use secrecy::SecretString;

const CASES: u32 = 256;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CASES);
    ProptestConfig {
        cases,
        // No regression files in the source tree; a failure prints its shrunk input.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// SigV4

const AKID: &str = "AKIAHSMKMSDEV0000001";
const SECRET: &str = "hsmkms-dev-secret-key-for-local-use-only";
/// 2026-12-01T12:00:00Z, the fixed time of every case.
const NOW: &str = "20261201T120000Z";

fn principals() -> Principals {
    Principals::new(vec![Principal {
        name: "dev".into(),
        access_key_id: AKID.into(),
        secret_access_key: SecretString::from(SECRET),
        admin: true,
    }])
}

fn clock() -> ManualClock {
    ManualClock::new(parse_amz_date(NOW).unwrap() * 1000)
}

/// A path, then maybe a query, of the characters that matter to URIs and escapes, some above
/// ASCII (`http::Uri` takes UTF-8 in a query, not in a path), or of any bytes at all.
fn uri_bytes() -> impl Strategy<Value = Vec<u8>> {
    let path = prop_oneof![
        4 => "[%/.&=+2aZ~_-]{0,24}".prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 0..24),
    ];
    let query = prop_oneof![
        4 => "[%/.&=+2aZ~_\u{4C7}\u{1234}\u{e9}-]{0,24}".prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 0..24),
    ];
    (path, prop::option::of(query)).prop_map(|(path, query)| {
        let mut target = path;
        if let Some(q) = query {
            target.push(b'?');
            target.extend(q);
        }
        target
    })
}

fn header_value_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            4 => prop::sample::select(b" \t,;=/aZ09\x80\xfe".to_vec()),
            1 => any::<u8>(),
        ],
        0..40,
    )
}

/// Headers of arbitrary names and values, keeping those that HTTP can carry.
fn header_map(pairs: &[(Vec<u8>, Vec<u8>)]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in pairs {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            headers.append(n, v);
        }
    }
    headers
}

fn uri_of(target: &[u8]) -> Uri {
    let mut with_slash = b"/".to_vec();
    with_slash.extend_from_slice(target);
    Uri::try_from(with_slash).unwrap_or_else(|_| Uri::from_static("/"))
}

fn check_error(e: &KmsError) {
    // Messages reach the client and, for some, the log: bounded whatever came in.
    let text = e.public_message();
    assert!(text.len() <= 300, "{} bytes: {text}", text.len());
}

/// A nearly valid Authorization header: each part either right or arbitrary.
fn authorization() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![4 => Just(AKID.to_string()), 1 => "[A-Z0-9]{0,24}"],
        prop_oneof![4 => Just(NOW[..8].to_string()), 1 => "[0-9+]{0,9}"],
        prop_oneof![4 => Just("us-east-1".to_string()), 1 => "[ -~]{0,80}"],
        prop_oneof![4 => Just("kms".to_string()), 1 => "[a-z]{0,5}"],
        prop_oneof![4 => Just("aws4_request".to_string()), 1 => "[a-z_4]{0,14}"],
        prop_oneof![
            2 => Just("host;x-amz-date".to_string()),
            2 => Just("host;x-amz-date;x-amz-target".to_string()),
            1 => "[a-zA-Z;\\-]{0,40}"
        ],
        prop_oneof![4 => "[0-9a-f]{64}", 1 => "[ -~]{0,70}"],
        prop::sample::select(vec![", ", ",", " ,", ",,"]),
    )
        .prop_map(|(akid, date, region, service, term, signed, sig, sep)| {
            format!(
                "AWS4-HMAC-SHA256 Credential={akid}/{date}/{region}/{service}/{term}{sep}SignedHeaders={signed}{sep}Signature={sig}"
            )
            .into_bytes()
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn authenticate_never_panics_on_arbitrary_requests(
        method in prop::collection::vec(any::<u8>(), 0..8),
        target in uri_bytes(),
        pairs in prop::collection::vec(
            (prop_oneof![
                Just(b"authorization".to_vec()),
                Just(b"x-amz-date".to_vec()),
                Just(b"host".to_vec()),
                Just(b"x-amz-target".to_vec()),
                prop::collection::vec(any::<u8>(), 0..12),
            ], header_value_bytes()),
            0..8,
        ),
        body in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let method = Method::from_bytes(&method).unwrap_or(Method::POST);
        let uri = uri_of(&target);
        let headers = header_map(&pairs);
        let request = SignedRequest { method: &method, uri: &uri, headers: &headers, body: &body };
        if let Err(e) = principals().authenticate(&request, "us-east-1", "kms", &clock()) {
            check_error(&e);
        }
    }

    #[test]
    fn authenticate_never_panics_on_nearly_valid_requests(
        target in uri_bytes(),
        auth in authorization(),
        date in prop_oneof![4 => Just(NOW.as_bytes().to_vec()), 1 => header_value_bytes()],
        extra in prop::collection::vec(
            (prop::sample::select(vec!["host", "x-amz-target", "x-amz-date", "my-header"]),
             header_value_bytes()),
            0..4,
        ),
        body in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut pairs = vec![
            (b"host".to_vec(), b"localhost".to_vec()),
            (b"x-amz-date".to_vec(), date),
            (b"authorization".to_vec(), auth),
        ];
        pairs.extend(extra.into_iter().map(|(n, v)| (n.as_bytes().to_vec(), v)));
        let uri = uri_of(&target);
        let headers = header_map(&pairs);
        let request = SignedRequest { method: &Method::POST, uri: &uri, headers: &headers, body: &body };
        match principals().authenticate(&request, "us-east-1", "kms", &clock()) {
            // A zero or random signature never verifies.
            Ok(_) => prop_assert!(false, "an unsigned request was accepted"),
            Err(e) => check_error(&e),
        }
    }

    /// What the signer signs, the verifier accepts, over arbitrary queries and header values;
    /// a changed body is refused.
    #[test]
    fn signed_requests_verify_and_changed_ones_do_not(
        target in uri_bytes(),
        values in prop::collection::vec(header_value_bytes(), 0..3),
        body in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let uri = uri_of(&target);
        let mut pairs = vec![
            (b"host".to_vec(), b"localhost".to_vec()),
            (b"x-amz-date".to_vec(), NOW.as_bytes().to_vec()),
        ];
        for v in values {
            pairs.push((b"my-header".to_vec(), v));
        }
        let mut headers = header_map(&pairs);
        let request = SignedRequest { method: &Method::POST, uri: &uri, headers: &headers, body: &body };
        let auth = sigv4::sign(&request, AKID, &SecretString::from(SECRET), "us-east-1", "kms")
            .unwrap();
        headers.insert("authorization", HeaderValue::from_str(&auth).unwrap());
        let principals = principals();
        let clock = clock();
        let request = SignedRequest { method: &Method::POST, uri: &uri, headers: &headers, body: &body };
        prop_assert!(principals.authenticate(&request, "us-east-1", "kms", &clock).is_ok());
        let mut changed = body.clone();
        changed.push(b'x');
        let request = SignedRequest { body: &changed, ..request };
        prop_assert!(matches!(
            principals.authenticate(&request, "us-east-1", "kms", &clock),
            Err(KmsError::InvalidSignature(_))
        ));
    }

    #[test]
    fn amz_date_parsing_is_strict_and_canonical(s in "[0-9T Z+-]{14,18}") {
        // Accepted only in the one spelling that formatting gives back.
        if let Some(t) = parse_amz_date(&s) {
            prop_assert_eq!(sigv4::format_amz_date(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(t as u64)), s);
        }
    }

    #[test]
    fn every_instant_formats_and_parses_back(secs in 0i64..253_402_300_800) {
        let text = format_amz_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs as u64));
        prop_assert_eq!(parse_amz_date(&text), Some(secs));
    }
}

// ---------------------------------------------------------------------------------------------
// KMS JSON bodies

/// Parses `body` into every request type the JSON front has; none may panic, and a refusal is
/// one of the two exceptions a body can earn.
fn parse_into_every_request(body: &[u8]) {
    macro_rules! each {
        ($($t:ty),* $(,)?) => {$(
            if let Err(e) = parse::<$t>(body) {
                assert!(
                    matches!(e, KmsError::Serialization(_) | KmsError::Validation(_)),
                    "{}: {e:?}", stringify!($t)
                );
                check_error_len(&e);
            }
        )*};
    }
    each!(
        wire::CreateKeyRequest,
        wire::KeyIdRequest,
        wire::ListRequest,
        wire::EncryptRequest,
        wire::DecryptRequest,
        wire::ReEncryptRequest,
        wire::GenerateDataKeyRequest,
        wire::GenerateRandomRequest,
        wire::AliasRequest,
        wire::ScheduleKeyDeletionRequest,
        wire::TagResourceRequest,
        wire::UntagResourceRequest,
        wire::UpdateKeyDescriptionRequest,
        wire::KeyPolicyRequest,
        wire::DescribeCustomKeyStoresRequest,
        wire::CreateCustomKeyStoreRequest,
        wire::UpdateCustomKeyStoreRequest,
        wire::CustomKeyStoreIdRequest,
    );
}

/// serde's messages quote the input; the front caps what it sends (api::error_response), here
/// only that building them stays proportionate.
fn check_error_len(e: &KmsError) {
    assert!(e.public_message().len() <= 64 * 1024);
}

const MEMBERS: &[&str] = &[
    "KeyId",
    "Plaintext",
    "CiphertextBlob",
    "EncryptionContext",
    "SourceEncryptionContext",
    "DestinationEncryptionContext",
    "DestinationKeyId",
    "NumberOfBytes",
    "KeySpec",
    "KeyUsage",
    "Description",
    "Tags",
    "TagKeys",
    "Limit",
    "Marker",
    "AliasName",
    "TargetKeyId",
    "PendingWindowInDays",
    "CustomKeyStoreId",
    "CustomKeyStoreName",
    "GrantTokens",
    "DryRun",
];

/// JSON values whose object keys are mostly the protocol's member names.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "[ -~]{0,12}".prop_map(Value::String),
        Just(Value::String("AAECAwQ=".into())),
        Just(Value::String("alias/x".into())),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::vec(
                (prop_oneof![4 => prop::sample::select(MEMBERS).prop_map(str::to_string), 1 => "[a-z]{0,6}"], inner),
                0..6,
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn json_bodies_of_arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..128)) {
        parse_into_every_request(&body);
    }

    #[test]
    fn json_bodies_of_nearly_right_members_never_panic(value in json_value()) {
        parse_into_every_request(value.to_string().as_bytes());
    }

    #[test]
    fn a_repeated_context_key_is_always_refused(
        pairs in prop::collection::vec(("[a-z]{1,3}", "[a-z]{0,3}"), 1..5),
        repeat in any::<prop::sample::Index>(),
    ) {
        let (k, _) = repeat.get(&pairs).clone();
        let mut entries: Vec<String> = pairs.iter().map(|(k, v)| format!("{k:?}: {v:?}")).collect();
        entries.push(format!("{k:?}: \"again\""));
        let body = format!(
            r#"{{"KeyId": "k", "Plaintext": "AA==", "EncryptionContext": {{{}}}}}"#,
            entries.join(", ")
        );
        let err = parse::<wire::EncryptRequest>(body.as_bytes()).unwrap_err();
        prop_assert!(matches!(err, KmsError::Serialization(ref m) if m.contains("duplicate field")), "{err:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Ciphertext blobs and encryption contexts

/// Reads back the canonical form (count, then length-prefixed key and value per entry); `None`
/// if the bytes are not exactly one such encoding.
fn decode_canonical(mut b: &[u8]) -> Option<BTreeMap<String, String>> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (b.get(..n)?, b.get(n..)?);
        *b = rest;
        Some(head)
    }
    fn len(b: &mut &[u8]) -> Option<usize> {
        Some(u32::from_be_bytes(take(b, 4)?.try_into().ok()?) as usize)
    }
    let count = len(&mut b)?;
    let mut map = BTreeMap::new();
    for _ in 0..count {
        let n = len(&mut b)?;
        let k = String::from_utf8(take(&mut b, n)?.to_vec()).ok()?;
        let n = len(&mut b)?;
        let v = String::from_utf8(take(&mut b, n)?.to_vec()).ok()?;
        map.insert(k, v);
    }
    b.is_empty().then_some(map)
}

fn context_map() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(".{0,6}", ".{0,6}", 0..5)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn ciphertext_decoding_never_panics_and_round_trips(
        blob in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..(HEADER_LEN + TAG_LEN + 8)),
            // Past the length checks: version 1, KDF 1, then anything.
            prop::collection::vec(any::<u8>(), (HEADER_LEN + TAG_LEN - 2)..200)
                .prop_map(|rest| [vec![1u8, 1u8], rest].concat()),
            prop::collection::vec(any::<u8>(), (MAX_BLOB - 2)..(MAX_BLOB + 2)),
        ],
    ) {
        match CiphertextBlob::decode(&blob) {
            Ok(decoded) => prop_assert_eq!(decoded.encode(), blob),
            Err(e) => prop_assert!(matches!(
                e,
                KmsError::InvalidCiphertext(_) | KmsError::Validation(_)
            )),
        }
    }

    #[test]
    fn context_canonical_form_is_injective(a in context_map(), b in context_map()) {
        let (ca, cb) = (EncryptionContext::new(Some(a.clone())), EncryptionContext::new(Some(b.clone())));
        if let (Ok(ca), Ok(cb)) = (ca, cb) {
            // Reading the encoding back gives the map: no two maps share an encoding.
            prop_assert_eq!(decode_canonical(&ca.canonical()), Some(a.clone()));
            prop_assert_eq!(ca.canonical() == cb.canonical(), a == b);
        }
    }

    #[test]
    fn context_validation_never_panics(
        map in prop::collection::btree_map(".{0,40}", prop_oneof![".{0,40}", Just("x".repeat(8200))], 0..4),
    ) {
        if let Err(e) = EncryptionContext::new(Some(map)) {
            prop_assert!(matches!(e, KmsError::Validation(_)));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TDE front

proptest! {
    #![proptest_config(config())]

    #[test]
    fn tde_routes_never_panic(
        mount in "[a-z/%.]{0,8}",
        path in prop_oneof!["\\PC{0,40}", "/v1/[a-z]{0,4}/data/[0-9+\\-]{0,12}"],
        query in prop::option::of("[a-z0-9=&+\\-]{0,30}"),
    ) {
        let _ = route(&mount, &path, query.as_deref());
    }

    #[test]
    fn tde_key_paths_route_to_their_key_and_version(
        mount in "[a-z0-9_-]{1,12}",
        id in any::<u32>(),
        version in prop::option::of(any::<u32>()),
        other in "[a-z]{0,4}",
    ) {
        let path = format!("/v1/{mount}/data/{id}");
        let query = version.map(|v| format!("{other}=1&version={v}"));
        let want = Route::Read { id, version: version.filter(|v| *v != 0) };
        prop_assert_eq!(route(&mount, &path, query.as_deref()), want);
        prop_assert_eq!(route(&mount, &format!("/v1/sys/mounts/{mount}/tune"), None), Route::Tune);
        prop_assert_eq!(route(&mount, &format!("/v1/{mount}x/data/{id}"), None), Route::NoRoute);
    }
}
