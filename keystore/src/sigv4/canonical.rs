//! The SigV4 canonical request, built from the bytes of the request as received.
//!
//! Everything here works on bytes, never on `&str` slices: paths, queries and header values
//! come from the network before authentication, and AWS signs their bytes (a header value with
//! obs-text canonicalises by its bytes, as AWS does, rather than being refused or replaced).

use axum::http::HeaderMap;
use percent_encoding::{percent_decode, percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::{Digest, Sha256};

use super::{incomplete, shown};
use crate::error::KmsError;

/// Everything but SigV4's unreserved characters (`A-Z a-z 0-9 - _ . ~`) is percent-encoded.
const QUERY_SET: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');
/// In a path, `/` separates segments and stays as it is.
const PATH_SET: &AsciiSet = &QUERY_SET.remove(b'/');

/// Where the canonical request goes: a hash as it is built (the verifier), or bytes (tests).
pub(super) trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Sha256 {
    fn put(&mut self, bytes: &[u8]) {
        self.update(bytes);
    }
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// The parts of a request that the canonical request is made of, as bytes.
pub(super) struct Parts<'a> {
    pub method: &'a str,
    pub path: &'a [u8],
    pub query: Option<&'a [u8]>,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
}

/// Writes the canonical request of `parts` over `signed_headers` into `out`.
pub(super) fn write(
    out: &mut impl Sink,
    parts: &Parts,
    signed_headers: &[&str],
) -> Result<(), KmsError> {
    out.put(parts.method.as_bytes());
    out.put(b"\n");
    match parts.path {
        // The KMS JSON protocol always posts to "/": skip the normalisation.
        b"/" | b"" => out.put(b"/"),
        path => out.put(canonical_path(path).as_bytes()),
    }
    out.put(b"\n");
    if let Some(q) = parts.query.filter(|q| !q.is_empty()) {
        out.put(canonical_query(q).as_bytes());
    }
    out.put(b"\n");
    for name in signed_headers {
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(incomplete("SignedHeaders must be lowercase names"));
        }
        let mut values = parts.headers.get_all(*name).iter().peekable();
        if values.peek().is_none() {
            return Err(incomplete(&format!(
                "Signed header {} is missing from the request",
                shown(name)
            )));
        }
        out.put(name.as_bytes());
        out.put(b":");
        for (i, v) in values.enumerate() {
            if i > 0 {
                out.put(b",");
            }
            write_trimmed(out, v.as_bytes());
        }
        out.put(b"\n");
    }
    out.put(b"\n");
    for (i, name) in signed_headers.iter().enumerate() {
        if i > 0 {
            out.put(b";");
        }
        out.put(name.as_bytes());
    }
    out.put(b"\n");
    let mut body_hash = [0u8; 64];
    hex::encode_to_slice(Sha256::digest(parts.body), &mut body_hash).expect("64 hex digits");
    out.put(&body_hash);
    Ok(())
}

/// A header value trimmed, with each run of spaces and tabs folded into one space.
fn write_trimmed(out: &mut impl Sink, value: &[u8]) {
    let words = value
        .split(|b| *b == b' ' || *b == b'\t')
        .filter(|w| !w.is_empty());
    for (i, word) in words.enumerate() {
        if i > 0 {
            out.put(b" ");
        }
        out.put(word);
    }
}

/// The path as AWS canonicalises it for services other than S3: dot segments resolved, empty
/// segments dropped, and every byte outside the unreserved set percent-encoded (so an encoded
/// path is encoded a second time, as the SDKs sign it).
pub(super) fn canonical_path(path: &[u8]) -> String {
    let mut segments: Vec<&[u8]> = Vec::new();
    let mut trailing_slash = false;
    for segment in path.split(|b| *b == b'/') {
        trailing_slash = matches!(segment, b"" | b"." | b"..");
        match segment {
            b"" | b"." => {}
            b".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(path.len() + 1);
    for s in &segments {
        out.push('/');
        out.extend(percent_encode(s, PATH_SET));
    }
    if segments.is_empty() || trailing_slash {
        out.push('/');
    }
    out
}

/// The query's parameters sorted by name, then value, each percent-decoded and encoded again so
/// that every spelling of one byte string canonicalises alike.
pub(super) fn canonical_query(query: &[u8]) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split(|b| *b == b'&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = match p.iter().position(|b| *b == b'=') {
                Some(i) => (&p[..i], &p[i + 1..]),
                None => (p, &b""[..]),
            };
            (reencode(k), reencode(v))
        })
        .collect();
    pairs.sort_unstable();
    let mut out = String::with_capacity(query.len() + pairs.len());
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

fn reencode(bytes: &[u8]) -> String {
    let decoded: Vec<u8> = percent_decode(bytes).collect();
    percent_encode(&decoded, QUERY_SET).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trimmed(v: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_trimmed(&mut out, v);
        out
    }

    #[test]
    fn header_values_are_trimmed_and_folded_by_their_bytes() {
        assert_eq!(trimmed(b"  a   b \t c  "), b"a b c");
        assert_eq!(trimmed(b"abc"), b"abc");
        assert_eq!(trimmed(b"   "), b"");
        assert_eq!(trimmed(b""), b"");
        assert_eq!(trimmed(b"\"a   b   c\""), b"\"a b c\"");
        // obs-text stays as it came: AWS signs the bytes.
        assert_eq!(trimmed(b" \xd3\x87 \xff  x"), b"\xd3\x87 \xff x");
    }

    #[test]
    fn escapes_split_across_utf8_characters_decode_as_bytes() {
        // The request that used to panic the verifier.
        assert_eq!(canonical_query(b"a=%2\xd3\x87"), "a=%252%D3%87");
        assert_eq!(canonical_query(b"%"), "%25=");
        assert_eq!(canonical_query(b"a=%%41%4"), "a=%25A%254");
        assert_eq!(canonical_path(b"/%\xff%f"), "/%25%FF%25f");
    }

    #[test]
    fn paths_are_normalised_as_for_services_other_than_s3() {
        for (path, want) in [
            ("/example/..", "/"),
            ("/example1/example2/../..", "/"),
            ("/./", "/"),
            ("/./example", "/example"),
            ("//", "/"),
            ("//example//", "/example/"),
            ("/../../a", "/a"),
            ("/a/.", "/a/"),
            ("/example%20space/", "/example%2520space/"),
        ] {
            assert_eq!(canonical_path(path.as_bytes()), want, "{path}");
        }
    }
}
