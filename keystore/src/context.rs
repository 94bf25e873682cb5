//! Encryption context: a string map bound to a ciphertext as AAD.
//!
//! Canonical form: the entry count, then each entry sorted by key bytes as `len(key) key
//! len(value) value`, lengths as 4-byte big-endian. Length prefixes make the encoding injective:
//! no two different maps give the same bytes.

use std::collections::BTreeMap;

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
}
