//! The one mapping from what went wrong to the KMS exception a client sees.
//!
//! Messages never carry secrets: no PIN, key bytes or plaintext reaches an error text.

use hsm::HsmError;

#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Validation(String),
    #[error("{0}")]
    InvalidCiphertext(String),
    #[error("{0}")]
    IncorrectKey(String),
    #[error("{0}")]
    Disabled(String),
    #[error("{0}")]
    InvalidState(String),
    #[error("{0}")]
    InvalidKeyUsage(String),
    /// The key's custom key store is disconnected: its keys are Unavailable until it connects.
    #[error("{0}")]
    KeyUnavailable(String),
    #[error("{0}")]
    CustomKeyStoreInvalidState(String),
    #[error("{0}")]
    UnsupportedOperation(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidAliasName(String),
    #[error("{0}")]
    TagException(String),
    #[error("{0}")]
    LimitExceeded(String),
    #[error("{0}")]
    InvalidMarker(String),
    #[error("{0}")]
    CustomKeyStoreNotFound(String),
    #[error("{0}")]
    CustomKeyStoreNameInUse(String),
    /// DeleteCustomKeyStore while the store still holds keys.
    #[error("{0}")]
    CustomKeyStoreHasKeys(String),
    /// A token already serves another key store.
    #[error("{0}")]
    ClusterInUse(String),
    /// The token cluster does not meet a key store's requirements (e.g. fewer than two tokens).
    #[error("{0}")]
    ClusterInvalidConfiguration(String),
    #[error("{0}")]
    DryRun(String),
    #[error("{0}")]
    Serialization(String),
    #[error("{0}")]
    UnknownOperation(String),
    #[error("{0}")]
    UnrecognizedClient(String),
    #[error("{0}")]
    InvalidSignature(String),
    #[error("{0}")]
    IncompleteSignature(String),
    #[error("{0}")]
    MissingAuthenticationToken(String),
    #[error("{0}")]
    AccessDenied(String),
    #[error("{0}")]
    RequestTooLarge(String),
    /// The token cluster cannot serve now; retrying later may work.
    #[error("{0}")]
    Unavailable(String),
    /// A fault of ours. The detail goes to the log; the client gets a generic message.
    #[error("internal error: {0}")]
    Internal(String),
}

impl KmsError {
    /// The exception name, as AWS KMS spells it in `__type`.
    pub fn code(&self) -> &'static str {
        match self {
            KmsError::NotFound(_) => "NotFoundException",
            KmsError::Validation(_) => "ValidationException",
            KmsError::InvalidCiphertext(_) => "InvalidCiphertextException",
            KmsError::IncorrectKey(_) => "IncorrectKeyException",
            KmsError::Disabled(_) => "DisabledException",
            KmsError::InvalidState(_) => "KMSInvalidStateException",
            KmsError::InvalidKeyUsage(_) => "InvalidKeyUsageException",
            KmsError::KeyUnavailable(_) => "KMSInvalidStateException",
            KmsError::CustomKeyStoreInvalidState(_) => "CustomKeyStoreInvalidStateException",
            KmsError::UnsupportedOperation(_) => "UnsupportedOperationException",
            KmsError::AlreadyExists(_) => "AlreadyExistsException",
            KmsError::InvalidAliasName(_) => "InvalidAliasNameException",
            KmsError::TagException(_) => "TagException",
            KmsError::LimitExceeded(_) => "LimitExceededException",
            KmsError::InvalidMarker(_) => "InvalidMarkerException",
            KmsError::CustomKeyStoreNotFound(_) => "CustomKeyStoreNotFoundException",
            KmsError::CustomKeyStoreNameInUse(_) => "CustomKeyStoreNameInUseException",
            KmsError::CustomKeyStoreHasKeys(_) => "CustomKeyStoreHasCMKsException",
            KmsError::ClusterInUse(_) => "CloudHsmClusterInUseException",
            KmsError::ClusterInvalidConfiguration(_) => {
                "CloudHsmClusterInvalidConfigurationException"
            }
            KmsError::DryRun(_) => "DryRunOperationException",
            KmsError::Serialization(_) => "SerializationException",
            KmsError::UnknownOperation(_) => "UnknownOperationException",
            KmsError::UnrecognizedClient(_) => "UnrecognizedClientException",
            KmsError::InvalidSignature(_) => "InvalidSignatureException",
            KmsError::IncompleteSignature(_) => "IncompleteSignatureException",
            KmsError::MissingAuthenticationToken(_) => "MissingAuthenticationTokenException",
            KmsError::AccessDenied(_) => "AccessDeniedException",
            KmsError::RequestTooLarge(_) => "ValidationException",
            KmsError::Unavailable(_) => "KMSInternalException",
            KmsError::Internal(_) => "KMSInternalException",
        }
    }

    /// HTTP status: 400 for every client error (AWS's JSON protocol), 500 for ours.
    pub fn status(&self) -> u16 {
        match self {
            KmsError::Internal(_) | KmsError::Unavailable(_) => 500,
            _ => 400,
        }
    }

    /// The message the client sees.
    pub fn public_message(&self) -> String {
        match self {
            KmsError::Internal(_) => "An internal error occurred; see the service log".into(),
            // Token labels, module paths and CKR_ codes are for the operator's log, not clients.
            KmsError::Unavailable(_) => {
                "The key store's tokens cannot serve the request now; retry later".into()
            }
            other => other.to_string(),
        }
    }

    /// A token-side failure seen while serving `key`.
    pub fn from_hsm(e: HsmError) -> KmsError {
        match e {
            HsmError::InvalidCiphertext => KmsError::InvalidCiphertext(
                "The ciphertext did not authenticate: it was altered, made under another key, or the encryption context differs".into(),
            ),
            HsmError::KeyNotFound { token } => {
                KmsError::Internal(format!("key material missing on token {token}"))
            }
            e @ (HsmError::TokenUnavailable { .. } | HsmError::ClusterUnavailable { .. }) => {
                KmsError::Unavailable(format!("The key store's tokens cannot serve now: {e}"))
            }
            e => KmsError::Internal(e.to_string()),
        }
    }
}

impl From<rusqlite::Error> for KmsError {
    fn from(e: rusqlite::Error) -> Self {
        KmsError::Internal(format!("metadata store: {e}"))
    }
}

pub type KmsResult<T> = Result<T, KmsError>;
