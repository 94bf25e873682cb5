//! Errors of the `hsm` crate: each names the token, and the PKCS#11 call and `CKR_` code if any.

use crate::proto::{Failure, FailureKind};

#[derive(Debug, Clone, thiserror::Error)]
pub enum HsmError {
    #[error("token {token}: {function} failed with {rv}")]
    Pkcs11 {
        token: String,
        function: String,
        rv: String,
    },
    #[error("token {token}: key not found")]
    KeyNotFound { token: String },
    /// The ciphertext did not authenticate under the key (tampered, other key or other AAD).
    #[error("ciphertext did not authenticate")]
    InvalidCiphertext,
    /// The token cannot serve now (its workers died and cannot be restarted, or it was removed).
    #[error("token {token} unavailable: {reason}")]
    TokenUnavailable { token: String, reason: String },
    /// No token of the cluster could serve the request.
    #[error("no token of cluster {cluster} is available")]
    ClusterUnavailable { cluster: String },
    #[error("token {token}: {message}")]
    Other { token: String, message: String },
}

impl HsmError {
    pub(crate) fn from_failure(token: &str, f: Failure) -> HsmError {
        let token = token.to_string();
        match f.kind {
            FailureKind::KeyNotFound => HsmError::KeyNotFound { token },
            FailureKind::InvalidCiphertext => HsmError::InvalidCiphertext,
            FailureKind::SessionBroken => HsmError::TokenUnavailable {
                token,
                reason: f.message,
            },
            FailureKind::Other => match (f.function, f.rv) {
                (Some(function), Some(rv)) => HsmError::Pkcs11 {
                    token,
                    function,
                    rv,
                },
                _ => HsmError::Other {
                    token,
                    message: f.message,
                },
            },
        }
    }

    /// Whether another token of the cluster may succeed where this one failed.
    pub fn is_token_fault(&self) -> bool {
        matches!(self, HsmError::TokenUnavailable { .. })
    }
}
