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

    /// A PIN refused, expired or locked (`CKR_PIN_*`).
    pub fn is_pin_failure(&self) -> bool {
        match self {
            HsmError::Pkcs11 { rv, .. } => rv.starts_with("CKR_PIN_"),
            HsmError::TokenUnavailable { reason, .. }
            | HsmError::Other {
                message: reason, ..
            } => reason.contains("CKR_PIN_"),
            _ => false,
        }
    }

    /// Whether another token of the cluster may succeed where this one failed.
    pub fn is_token_fault(&self) -> bool {
        matches!(self, HsmError::TokenUnavailable { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_pins_are_recognised_so_that_they_are_never_retried() {
        let wrong = HsmError::Pkcs11 {
            token: "t".into(),
            function: "C_Login".into(),
            rv: "CKR_PIN_INCORRECT".into(),
        };
        assert!(wrong.is_pin_failure());
        let locked = HsmError::TokenUnavailable {
            token: "t".into(),
            reason: "C_Login failed with CKR_PIN_LOCKED".into(),
        };
        assert!(locked.is_pin_failure());
        let busy = HsmError::TokenUnavailable {
            token: "t".into(),
            reason: "C_GetTokenInfo failed with CKR_GENERAL_ERROR".into(),
        };
        assert!(!busy.is_pin_failure());
    }
}
