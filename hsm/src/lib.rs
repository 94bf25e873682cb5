//! PKCS#11 tokens served by worker processes, and clusters of such tokens.
//!
//! This crate knows PKCS#11 and nothing of KMS. The service talks to a [`Cluster`]; a cluster
//! holds one [`TokenPool`] per token; a pool keeps `k` worker processes ([`worker`]) that each
//! hold one logged-in session and answer typed [`proto::Request`]s over a pipe.

pub mod cluster;
pub mod error;
pub mod pool;
pub mod proto;
pub mod provision;
pub mod worker;

pub use cluster::{Cluster, TokenHealth, TokenStatus};
pub use error::HsmError;
pub use pool::{TokenConfig, TokenPool, WorkerCommand};
pub use proto::{Kdf, KeyIdBytes, Sealed, TokenInfo};

/// The canonical text form of a 16-byte key id: a lowercase UUID (`1234abcd-12ab-34cd-56ef-1234567890ab`).
pub fn format_key_id(id: &KeyIdBytes) -> String {
    let h: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}
