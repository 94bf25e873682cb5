//! Errors of the `hsm` crate: each names the token, and the PKCS#11 call and `CKR_` code if any.
//! Callers classify errors by their typed fields ([`HsmError::ckr`], [`HsmError::cause`]), never
//! by their text: a reworded message must not turn a locked PIN into retries.

pub use crate::proto::{Cause, Ckr};
use crate::proto::{Failure, FailureKind};

#[derive(Debug, Clone, thiserror::Error)]
pub enum HsmError {
    #[error("token {token}: {function} failed with {rv}")]
    Pkcs11 {
        token: String,
        function: String,
        rv: Ckr,
    },
    #[error("token {token}: key not found")]
    KeyNotFound { token: String },
    /// The ciphertext did not authenticate under the key (tampered, other key or other AAD).
    #[error("ciphertext did not authenticate")]
    InvalidCiphertext,
    /// The token cannot serve now (its workers died and cannot be restarted, or it was removed).
    /// `rv` and `cause` say why when it is known.
    #[error("token {token} unavailable: {reason}")]
    TokenUnavailable {
        token: String,
        reason: String,
        rv: Option<Ckr>,
        cause: Option<Cause>,
    },
    /// No token of the cluster could serve the request.
    #[error("no token of cluster {cluster} is available")]
    ClusterUnavailable { cluster: String },
    #[error("token {token}: {message}")]
    Other { token: String, message: String },
}

impl HsmError {
    /// A token that cannot serve, for no reason known as a type.
    pub(crate) fn unavailable(token: &str, reason: impl Into<String>) -> HsmError {
        HsmError::TokenUnavailable {
            token: token.to_string(),
            reason: reason.into(),
            rv: None,
            cause: None,
        }
    }

    pub(crate) fn from_failure(token: &str, f: Failure) -> HsmError {
        let token = token.to_string();
        match f.kind {
            FailureKind::KeyNotFound => HsmError::KeyNotFound { token },
            FailureKind::InvalidCiphertext => HsmError::InvalidCiphertext,
            FailureKind::SessionBroken => HsmError::TokenUnavailable {
                token,
                reason: f.message,
                rv: f.rv,
                cause: f.cause,
            },
            FailureKind::Other => match (f.function, f.rv, f.cause) {
                (Some(function), Some(rv), None) => HsmError::Pkcs11 {
                    token,
                    function,
                    rv,
                },
                (_, rv, Some(cause)) => HsmError::TokenUnavailable {
                    token,
                    reason: f.message,
                    rv,
                    cause: Some(cause),
                },
                _ => HsmError::Other {
                    token,
                    message: f.message,
                },
            },
        }
    }

    /// As a token fault of `token` (for a worker that cannot be started), keeping the typed
    /// reason.
    pub(crate) fn into_unavailable(self, token: &str) -> HsmError {
        match self {
            e @ HsmError::TokenUnavailable { .. } => e,
            other => HsmError::TokenUnavailable {
                token: token.to_string(),
                reason: other.to_string(),
                rv: other.ckr(),
                cause: other.cause(),
            },
        }
    }

    /// The PKCS#11 return value behind this error, if any.
    pub fn ckr(&self) -> Option<Ckr> {
        match self {
            HsmError::Pkcs11 { rv, .. } => Some(*rv),
            HsmError::TokenUnavailable { rv, .. } => *rv,
            _ => None,
        }
    }

    /// The typed reason for a failure that is not a PKCS#11 return value, if any.
    pub fn cause(&self) -> Option<Cause> {
        match self {
            HsmError::TokenUnavailable { cause, .. } => *cause,
            _ => None,
        }
    }

    /// A PIN refused, expired or locked (`CKR_PIN_*`).
    pub fn is_pin_failure(&self) -> bool {
        self.ckr().is_some_and(Ckr::is_pin_failure)
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
    fn refused_pins_are_recognised_by_their_code_whatever_the_message_says() {
        let wrong = HsmError::Pkcs11 {
            token: "t".into(),
            function: "C_Login".into(),
            rv: Ckr::PIN_INCORRECT,
        };
        assert!(wrong.is_pin_failure());
        let locked = HsmError::TokenUnavailable {
            token: "t".into(),
            reason: "the token said no".into(),
            rv: Some(Ckr::PIN_LOCKED),
            cause: None,
        };
        assert!(locked.is_pin_failure());
        assert_eq!(locked.ckr(), Some(Ckr::PIN_LOCKED));
        // Text that names a PIN code is not a PIN failure: only the typed code counts.
        let busy = HsmError::TokenUnavailable {
            token: "t".into(),
            reason: "C_Login failed with CKR_PIN_LOCKED".into(),
            rv: Some(Ckr::GENERAL_ERROR),
            cause: None,
        };
        assert!(!busy.is_pin_failure());
        assert_eq!(Ckr::PIN_LOCKED.to_string(), "CKR_PIN_LOCKED");
    }

    #[test]
    fn a_worker_start_failure_keeps_its_code_when_it_becomes_a_token_fault() {
        let wrong = HsmError::Pkcs11 {
            token: "t".into(),
            function: "C_Login".into(),
            rv: Ckr::PIN_INCORRECT,
        }
        .into_unavailable("t");
        assert!(wrong.is_token_fault() && wrong.is_pin_failure());
    }
}
