//! The ciphertext blob: versioned and self-describing, so Decrypt needs no KeyId.
//!
//! ```text
//! offset  size  field
//!      0     1  version (1)
//!      1     1  KDF id (1 = CKM_AES_CBC_ENCRYPT_DATA, zero IV, over r)
//!      2    16  key id
//!     18    32  r, the derivation nonce: D = KDF(K, r)
//!     50    12  IV for AES-256-GCM under D
//!     62   n+16 ciphertext || 128-bit tag
//! ```
//! The GCM AAD is `"hsmkms:v1" || bytes 0..18 || canonical encryption context`, so changing the
//! version, KDF, key id or context fails authentication; `r` and the IV are bound because they
//! determine the key and the GCM counter. See `docs/ciphertext.md`.

use hsm::{Kdf, Sealed};

use crate::context::EncryptionContext;
use crate::error::KmsError;
use crate::ids::KeyId;

pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 62;
pub const TAG_LEN: usize = 16;
/// Largest blob accepted, as AWS's CiphertextBlob limit.
pub const MAX_BLOB: usize = 6144;
const AAD_LABEL: &[u8] = b"hsmkms:v1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CiphertextBlob {
    pub key_id: KeyId,
    pub sealed: Sealed,
}

impl CiphertextBlob {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.sealed.ciphertext.len());
        out.push(VERSION);
        out.push(self.sealed.kdf as u8);
        out.extend_from_slice(&self.key_id.0);
        out.extend_from_slice(&self.sealed.r);
        out.extend_from_slice(&self.sealed.iv);
        out.extend_from_slice(&self.sealed.ciphertext);
        out
    }

    pub fn decode(blob: &[u8]) -> Result<CiphertextBlob, KmsError> {
        let invalid =
            |why: &str| KmsError::InvalidCiphertext(format!("The ciphertext is invalid: {why}"));
        if blob.len() > MAX_BLOB {
            return Err(KmsError::Validation(format!(
                "CiphertextBlob is longer than {MAX_BLOB} bytes"
            )));
        }
        if blob.len() < HEADER_LEN + TAG_LEN {
            return Err(invalid("too short"));
        }
        if blob[0] != VERSION {
            return Err(invalid("unknown version"));
        }
        let kdf = Kdf::from_id(blob[1]).ok_or_else(|| invalid("unknown key derivation"))?;
        Ok(CiphertextBlob {
            key_id: KeyId(blob[2..18].try_into().expect("16 bytes")),
            sealed: Sealed {
                kdf,
                r: blob[18..50].try_into().expect("32 bytes"),
                iv: blob[50..62].try_into().expect("12 bytes"),
                ciphertext: blob[62..].to_vec(),
            },
        })
    }

    /// The AAD for a blob of this key and KDF under this context.
    pub fn aad(key_id: &KeyId, kdf: Kdf, context: &EncryptionContext) -> Vec<u8> {
        let ctx = context.canonical();
        let mut aad = Vec::with_capacity(AAD_LABEL.len() + 18 + ctx.len());
        aad.extend_from_slice(AAD_LABEL);
        aad.push(VERSION);
        aad.push(kdf as u8);
        aad.extend_from_slice(&key_id.0);
        aad.extend_from_slice(&ctx);
        aad
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_then_decode_is_identity() {
        let blob = CiphertextBlob {
            key_id: KeyId::new_random(),
            sealed: Sealed {
                kdf: Kdf::AesCbcEncryptData,
                r: [7; 32],
                iv: [9; 12],
                ciphertext: vec![1; 40],
            },
        };
        let bytes = blob.encode();
        assert_eq!(bytes.len(), HEADER_LEN + 40);
        assert_eq!(CiphertextBlob::decode(&bytes).unwrap(), blob);
    }

    #[test]
    fn short_or_unknown_blobs_are_invalid_ciphertext() {
        assert!(matches!(
            CiphertextBlob::decode(&[1; 10]),
            Err(KmsError::InvalidCiphertext(_))
        ));
        let mut bytes = vec![1u8; HEADER_LEN + TAG_LEN];
        bytes[0] = 2;
        assert!(matches!(
            CiphertextBlob::decode(&bytes),
            Err(KmsError::InvalidCiphertext(_))
        ));
        bytes[0] = 1;
        bytes[1] = 99;
        assert!(matches!(
            CiphertextBlob::decode(&bytes),
            Err(KmsError::InvalidCiphertext(_))
        ));
    }
}
