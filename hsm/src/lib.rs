//! PKCS#11 tokens served by worker processes, and clusters of such tokens.
//!
//! This crate knows PKCS#11 and nothing of KMS. The service talks to a [`Cluster`]; a cluster
//! holds one [`TokenPool`] per token; a pool keeps `k` worker processes ([`worker`]) that each
//! hold one logged-in session and answer typed [`proto::Request`]s over a pipe.

pub mod admin;
pub mod cluster;
pub mod error;
pub mod pool;
pub mod proto;
pub mod provision;
pub mod worker;

pub use cluster::{Cluster, TokenHealth, TokenStatus};
pub use error::HsmError;
pub use pool::{TokenConfig, TokenPool, WorkerCommand};
pub use proto::{DerivedKeyLimits, Kdf, KeyIdBytes, MacKeyId, Sealed, TokenInfo};

/// The canonical text form of a 16-byte key id: a lowercase UUID (`1234abcd-12ab-34cd-56ef-1234567890ab`).
pub fn format_key_id(id: &KeyIdBytes) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(36);
    for (i, b) in id.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 15) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn key_ids_print_as_lowercase_uuids() {
        let id = [
            0x12, 0x34, 0xab, 0xcd, 0x12, 0xab, 0x34, 0xcd, 0x56, 0xef, 0x12, 0x34, 0x56, 0x78,
            0x90, 0xab,
        ];
        assert_eq!(
            super::format_key_id(&id),
            "1234abcd-12ab-34cd-56ef-1234567890ab"
        );
    }
}
