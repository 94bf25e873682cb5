//! The verifier against AWS's published SigV4 test suite (aws-sig-v4-test-suite, in the form
//! that awslabs/aws-c-auth ships it: tests/aws-signing-test-suite/v4). The requests, canonical
//! requests and signatures below are that suite's data; the code is ours.
//!
//! Requests whose path or query holds bytes that `http::Uri` does not take (a space, raw UTF-8)
//! are checked at the canonical-request level, where the verifier works on bytes; the others go
//! through the whole `authenticate`, with the clock at the suite's date.

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use hmac::Mac;
use secrecy::SecretString;

use super::canonical::{self, Parts};
use super::*;
use crate::clock::ManualClock;

const ACCESS_KEY: &str = "AKIDEXAMPLE";
const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
const DATE: &str = "20150830T123600Z";
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
const FORM_SHA256: &str = "9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e";

struct Vector {
    name: &'static str,
    method: &'static str,
    /// Path and query as on the request line (bytes, not necessarily valid in an `http::Uri`).
    target: &'static [u8],
    /// Besides `host` and `x-amz-date`, in the order received.
    headers: &'static [(&'static str, &'static str)],
    body: &'static [u8],
    signed_headers: &'static str,
    /// The canonical request up to its header block, where the suite's cases differ.
    canonical_head: &'static str,
    signature: &'static str,
}

const HX: &str = "host;x-amz-date";

const VECTORS: &[Vector] = &[
    Vector {
        name: "get-vanilla",
        method: "GET",
        target: b"/",
        headers: &[],
        body: b"",
        signed_headers: HX,
        canonical_head: "GET\n/\n\n",
        signature: "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
    },
    Vector {
        name: "get-vanilla-empty-query-key",
        method: "GET",
        target: b"/?Param1=value1",
        headers: &[],
        body: b"",
        signed_headers: HX,
        canonical_head: "GET\n/\nParam1=value1\n",
        signature: "a67d582fa61cc504c4bae71f336f98b97f1ea3c7a6bfe1b6e45aec72011b9aeb",
    },
    Vector {
        name: "get-vanilla-query-order-key-case",
        method: "GET",
        target: b"/?Param2=value2&Param1=value1",
        headers: &[],
        body: b"",
        signed_headers: HX,
        canonical_head: "GET\n/\nParam1=value1&Param2=value2\n",
        signature: "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
    },
    Vector {
        name: "get-vanilla-query-order-encoded",
        method: "GET",
        target: b"/?Param-3=Value3&Param=Value2&%E1%88%B4=Value1",
        headers: &[],
        body: b"",
        signed_headers: HX,
        canonical_head: "GET\n/\n%E1%88%B4=Value1&Param=Value2&Param-3=Value3\n",
        signature: "371d3713e185cc334048618a97f809c9ffe339c62934c032af5a0e595648fcac",
    },
    Vector {
        name: "get-vanilla-query-unreserved",
        method: "GET",
        target: b"/?-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz=-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
        headers: &[],
        body: b"",
        signed_headers: HX,
        canonical_head: "",
        signature: "9c3e54bfcdf0b19771a7f523ee5669cdf59bc7cc0884027167c21bb143a40197",
    },
    Vector {
        name: "get-vanilla-utf8-query",
        method: "GET",
        target: "/?\u{1234}=bar".as_bytes(),
        headers: &[],
        body: b"",
        signed_headers: HX,
        canonical_head: "GET\n/\n%E1%88%B4=bar\n",
        signature: "2cdec8eed098649ff3a119c94853b13c643bcf08f8b0a1d91e12c9027818dd04",
    },
    Vector {
        name: "get-utf8",
        method: "GET",
        target: "/\u{1234}".as_bytes(),
        headers: &[],
        body: b"",
        signed_headers: HX,
        canonical_head: "GET\n/%E1%88%B4\n\n",
        signature: "8318018e0b0f223aa2bbf98705b62bb787dc9c0e678f255a891fd03141be5d85",
    },
    Vector {
        name: "get-unreserved",
        method: "GET",
        target: b"/-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
        headers: &[],
        body: b"",
        signed_headers: HX,
        canonical_head: "",
        signature: "07ef7494c76fa4850883e2b006601f940f8a34d404d0cfa977f52a65bbf5f24f",
    },
    Vector {
        name: "normalize-path/get-space",
        method: "GET",
        target: b"/example space/",
        headers: &[],
        body: b"",
        signed_headers: HX,
        canonical_head: "GET\n/example%20space/\n\n",
        signature: "652487583200325589f1fba4c7e578f72c47cb61beeca81406b39ddec1366741",
    },
    Vector {
        name: "normalize-path/get-relative",
        method: "GET",
        target: b"/example/..",
        headers: &[],
        body: b"",
        signed_headers: HX,
        canonical_head: "GET\n/\n\n",
        signature: "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
    },
    Vector {
        name: "normalize-path/get-relative-relative",
        method: "GET",
        target: b"/example1/example2/../..",
        headers: &[],
        body: b"",
        signed_headers: HX,
        canonical_head: "GET\n/\n\n",
        signature: "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
    },
    Vector {
        name: "normalize-path/get-slash-dot-slash",
        method: "GET",
        target: b"/./",
        headers: &[],
        body: b"",
        signed_headers: HX,
        canonical_head: "GET\n/\n\n",
        signature: "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
    },
    Vector {
        name: "normalize-path/get-slash",
        method: "GET",
        target: b"//",
        headers: &[],
        body: b"",
        signed_headers: HX,
        canonical_head: "GET\n/\n\n",
        signature: "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
    },
    Vector {
        name: "normalize-path/get-slash-pointless-dot",
        method: "GET",
        target: b"/./example",
        headers: &[],
        body: b"",
        signed_headers: HX,
        canonical_head: "GET\n/example\n\n",
        signature: "ef75d96142cf21edca26f06005da7988e4f8dc83a165a80865db7089db637ec5",
    },
    Vector {
        name: "normalize-path/get-slashes",
        method: "GET",
        target: b"//example//",
        headers: &[],
        body: b"",
        signed_headers: HX,
        canonical_head: "GET\n/example/\n\n",
        signature: "9a624bd73a37c9a373b5312afbebe7a714a789de108f0bdfe846570885f57e84",
    },
    Vector {
        name: "get-header-key-duplicate",
        method: "GET",
        target: b"/",
        headers: &[
            ("my-header1", "value2"),
            ("my-header1", "value2"),
            ("my-header1", "value1"),
        ],
        body: b"",
        signed_headers: "host;my-header1;x-amz-date",
        canonical_head: "GET\n/\n\nhost:example.amazonaws.com\nmy-header1:value2,value2,value1\n",
        signature: "c9d5ea9f3f72853aea855b47ea873832890dbdd183b4468f858259531a5138ea",
    },
    Vector {
        name: "get-header-value-order",
        method: "GET",
        target: b"/",
        headers: &[
            ("my-header1", "value4"),
            ("my-header1", "value1"),
            ("my-header1", "value3"),
            ("my-header1", "value2"),
        ],
        body: b"",
        signed_headers: "host;my-header1;x-amz-date",
        canonical_head: "GET\n/\n\nhost:example.amazonaws.com\nmy-header1:value4,value1,value3,value2\n",
        signature: "08c7e5a9acfcfeb3ab6b2185e75ce8b1deb5e634ec47601a50643f830c755c01",
    },
    Vector {
        name: "get-header-value-trim",
        method: "GET",
        target: b"/",
        headers: &[("my-header1", " value1"), ("my-header2", " \"a   b   c\"")],
        body: b"",
        signed_headers: "host;my-header1;my-header2;x-amz-date",
        canonical_head: "GET\n/\n\nhost:example.amazonaws.com\nmy-header1:value1\nmy-header2:\"a b c\"\n",
        signature: "acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736",
    },
    Vector {
        name: "get-vanilla-with-session-token",
        method: "GET",
        target: b"/",
        headers: &[(
            "x-amz-security-token",
            "6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267",
        )],
        body: b"",
        signed_headers: "host;x-amz-date;x-amz-security-token",
        canonical_head: "",
        signature: "07ec1639c89043aa0e3e2de82b96708f198cceab042d4a97044c66dd9f74e7f8",
    },
    Vector {
        name: "post-vanilla",
        method: "POST",
        target: b"/",
        headers: &[],
        body: b"",
        signed_headers: HX,
        canonical_head: "POST\n/\n\n",
        signature: "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b",
    },
    Vector {
        name: "post-vanilla-query",
        method: "POST",
        target: b"/?Param1=value1",
        headers: &[],
        body: b"",
        signed_headers: HX,
        canonical_head: "POST\n/\nParam1=value1\n",
        signature: "28038455d6de14eafc1f9222cf5aa6f1a96197d7deb8263271d420d138af7f11",
    },
    Vector {
        name: "post-header-key-sort",
        method: "POST",
        target: b"/",
        headers: &[("my-header1", "value1")],
        body: b"",
        signed_headers: "host;my-header1;x-amz-date",
        canonical_head: "",
        signature: "c5410059b04c1ee005303aed430f6e6645f61f4dc9e1461ec8f8916fdf18852c",
    },
    Vector {
        name: "post-header-value-case",
        method: "POST",
        target: b"/",
        headers: &[("my-header1", "VALUE1")],
        body: b"",
        signed_headers: "host;my-header1;x-amz-date",
        canonical_head: "POST\n/\n\nhost:example.amazonaws.com\nmy-header1:VALUE1\n",
        signature: "cdbc9802e29d2942e5e10b5bccfdd67c5f22c7c4e8ae67b53629efa58b974b7d",
    },
    Vector {
        name: "post-x-www-form-urlencoded",
        method: "POST",
        target: b"/",
        headers: &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("content-length", "13"),
            ("x-amz-content-sha256", FORM_SHA256),
        ],
        body: b"Param1=value1",
        signed_headers: "content-length;content-type;host;x-amz-content-sha256;x-amz-date",
        canonical_head: "POST\n/\n\ncontent-length:13\ncontent-type:application/x-www-form-urlencoded\n",
        signature: "d3875051da38690788ef43de4db0d8f280229d82040bfac253562e56c3f20e0b",
    },
    Vector {
        name: "post-x-www-form-urlencoded-parameters",
        method: "POST",
        target: b"/",
        headers: &[
            ("content-type", "application/x-www-form-urlencoded; charset=utf-8"),
            ("content-length", "13"),
            ("x-amz-content-sha256", FORM_SHA256),
        ],
        body: b"Param1=value1",
        signed_headers: "content-length;content-type;host;x-amz-content-sha256;x-amz-date",
        canonical_head: "",
        signature: "328d1b9eaadca9f5818ef05e8392801e091653bafec24fcab71e7344e7f51422",
    },
];

fn headers_of(v: &Vector) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.append("host", HeaderValue::from_static("example.amazonaws.com"));
    for (name, value) in v.headers {
        h.append(
            HeaderName::from_static(name),
            HeaderValue::from_bytes(value.as_bytes()).unwrap(),
        );
    }
    h.append("x-amz-date", HeaderValue::from_static(DATE));
    h
}

fn split_target(target: &[u8]) -> (&[u8], Option<&[u8]>) {
    match target.iter().position(|b| *b == b'?') {
        Some(i) => (&target[..i], Some(&target[i + 1..])),
        None => (target, None),
    }
}

fn scope() -> CredentialScope<'static> {
    CredentialScope {
        date: "20150830",
        region: "us-east-1",
        service: "service",
    }
}

#[test]
fn canonical_requests_and_signatures_match_the_aws_test_suite() {
    let key = signing_key(
        &SecretString::from(SECRET),
        "20150830",
        "us-east-1",
        "service",
    );
    for v in VECTORS {
        let headers = headers_of(v);
        let (path, query) = split_target(v.target);
        let parts = Parts {
            method: v.method,
            path,
            query,
            headers: &headers,
            body: v.body,
        };
        let signed: Vec<&str> = v.signed_headers.split(';').collect();
        let mut creq = Vec::new();
        canonical::write(&mut creq, &parts, &signed).unwrap();
        let creq = String::from_utf8(creq).unwrap();
        assert!(creq.starts_with(v.canonical_head), "{}: {creq}", v.name);
        let body_hash = if v.body.is_empty() {
            EMPTY_SHA256
        } else {
            FORM_SHA256
        };
        assert!(
            creq.ends_with(&format!("\n{}\n{body_hash}", v.signed_headers)),
            "{}: {creq}",
            v.name
        );
        let mac = signature_mac(&parts, &signed, DATE, &scope(), &key).unwrap();
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            v.signature,
            "{}: canonical request was\n{creq}",
            v.name
        );
    }
}

#[test]
fn the_suite_requests_that_http_can_carry_authenticate_end_to_end() {
    let principals = Principals::new(vec![Principal {
        name: "example".into(),
        access_key_id: ACCESS_KEY.into(),
        secret_access_key: SecretString::from(SECRET),
        admin: false,
    }]);
    let clock = ManualClock::new(parse_amz_date(DATE).unwrap() * 1000);
    let mut checked = 0;
    for v in VECTORS {
        let Ok(uri) = Uri::try_from(v.target) else {
            continue;
        };
        let mut headers = headers_of(v);
        headers.insert(
            "authorization",
            HeaderValue::from_str(&format!(
                "AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/20150830/us-east-1/service/aws4_request, SignedHeaders={}, Signature={}",
                v.signed_headers, v.signature
            ))
            .unwrap(),
        );
        let method = Method::from_bytes(v.method.as_bytes()).unwrap();
        let request = SignedRequest {
            method: &method,
            uri: &uri,
            headers: &headers,
            body: v.body,
        };
        let who = principals.authenticate(&request, "us-east-1", "service", &clock);
        assert_eq!(
            who.map(|p| p.name.as_str()).ok(),
            Some("example"),
            "{}",
            v.name
        );
        // And one bit of the signature less is refused.
        let bad = v.signature.replace('a', "b").replace('1', "2");
        headers.insert(
            "authorization",
            HeaderValue::from_str(&format!(
                "AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/20150830/us-east-1/service/aws4_request, SignedHeaders={}, Signature={bad}",
                v.signed_headers
            ))
            .unwrap(),
        );
        let request = SignedRequest {
            method: &method,
            uri: &uri,
            headers: &headers,
            body: v.body,
        };
        assert!(
            matches!(
                principals.authenticate(&request, "us-east-1", "service", &clock),
                Err(KmsError::InvalidSignature(_))
            ),
            "{}",
            v.name
        );
        checked += 1;
    }
    assert!(
        checked >= 18,
        "only {checked} vectors went through authenticate"
    );
}
