//! Encryption context: a string map bound to a ciphertext as AAD.
//!
//! Canonical form: the entry count, then each entry sorted by key bytes as `len(key) key
//! len(value) value`, lengths as 4-byte big-endian. Length prefixes make the encoding injective:
//! no two different maps give the same bytes.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{Deserializer, Error as _, MapAccess, Visitor};

use crate::error::KmsError;

/// AWS's limit on the encoded size of an encryption context.
pub const MAX_CONTEXT_BYTES: usize = 8192;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncryptionContext(BTreeMap<String, String>);

impl EncryptionContext {
    pub fn new(map: Option<BTreeMap<String, String>>) -> Result<EncryptionContext, KmsError> {
        let map = map.unwrap_or_default();
        let size: usize = map.iter().map(|(k, v)| k.len() + v.len()).sum();
        if size > MAX_CONTEXT_BYTES {
            return Err(KmsError::Validation(format!(
                "EncryptionContext is {size} bytes; at most {MAX_CONTEXT_BYTES} are allowed"
            )));
        }
        if map.keys().any(|k| k.is_empty()) {
            return Err(KmsError::Validation(
                "EncryptionContext keys must not be empty".into(),
            ));
        }
        Ok(EncryptionContext(map))
    }

    pub fn canonical(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            4 + self
                .0
                .iter()
                .map(|(k, v)| 8 + k.len() + v.len())
                .sum::<usize>(),
        );
        out.extend_from_slice(&(self.0.len() as u32).to_be_bytes());
        // BTreeMap<String, _> iterates in byte order of the keys.
        for (k, v) in &self.0 {
            out.extend_from_slice(&(k.len() as u32).to_be_bytes());
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(v.as_bytes());
        }
        out
    }
}

/// Deserialises an `EncryptionContext` member of a request, refusing a key that appears twice.
///
/// A map would keep the last value; a proxy, a policy engine or a log reader that takes the
/// first would then see another context than the one bound to the ciphertext. The error has
/// serde's wording for a duplicate top-level member, so both read alike
/// ("duplicate field `X` at line 1 column N", a SerializationException).
pub fn deserialize_unique<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    d.deserialize_option(OptionalUniqueMap)
}

struct OptionalUniqueMap;

impl<'de> Visitor<'de> for OptionalUniqueMap {
    type Value = Option<BTreeMap<String, String>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a map of strings to strings")
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = BTreeMap::new();
        while let Some((k, v)) = map.next_entry::<String, String>()? {
            if out.contains_key(&k) {
                return Err(A::Error::custom(format_args!(
                    "duplicate field `{}`",
                    crate::sigv4::shown(&k)
                )));
            }
            out.insert(k, v);
        }
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(pairs: &[(&str, &str)]) -> EncryptionContext {
        EncryptionContext::new(Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ))
        .unwrap()
    }

    #[test]
    fn order_of_entries_does_not_matter() {
        assert_eq!(
            ctx(&[("a", "1"), ("b", "2")]).canonical(),
            ctx(&[("b", "2"), ("a", "1")]).canonical()
        );
    }

    #[test]
    fn shifting_bytes_between_key_and_value_changes_the_encoding() {
        assert_ne!(
            ctx(&[("ab", "c")]).canonical(),
            ctx(&[("a", "bc")]).canonical()
        );
        assert_ne!(ctx(&[]).canonical(), ctx(&[("a", "")]).canonical());
    }

    #[test]
    fn oversized_context_is_a_validation_error() {
        let big = "x".repeat(MAX_CONTEXT_BYTES);
        let err = EncryptionContext::new(Some([("k".to_string(), big)].into())).unwrap_err();
        assert!(matches!(err, KmsError::Validation(_)));
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(rename_all = "PascalCase")]
    struct Request {
        #[allow(dead_code)]
        key_id: Option<String>,
        #[serde(default, deserialize_with = "deserialize_unique")]
        encryption_context: Option<BTreeMap<String, String>>,
    }

    fn parse(json: &str) -> Result<Request, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn a_key_twice_in_the_context_is_refused_like_a_member_twice() {
        let dup = parse(r#"{"EncryptionContext": {"a": "1", "b": "2", "a": "3"}}"#).unwrap_err();
        let top = parse(r#"{"KeyId": "k", "KeyId": "k"}"#).unwrap_err();
        assert!(dup.starts_with("duplicate field `a` at line 1"), "{dup}");
        assert!(
            top.starts_with("duplicate field `KeyId` at line 1"),
            "{top}"
        );
    }

    #[test]
    fn absent_null_and_distinct_contexts_deserialise() {
        assert_eq!(parse("{}").unwrap().encryption_context, None);
        assert_eq!(
            parse(r#"{"EncryptionContext": null}"#)
                .unwrap()
                .encryption_context,
            None
        );
        let map = parse(r#"{"EncryptionContext": {"b": "2", "a": "1"}}"#)
            .unwrap()
            .encryption_context
            .unwrap();
        assert_eq!(map.len(), 2);
        assert!(parse(r#"{"EncryptionContext": {"a": 1}}"#).is_err());
        assert!(parse(r#"{"EncryptionContext": ["a"]}"#).is_err());
    }
}
