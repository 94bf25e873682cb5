//! The wire protocol between the service and a token worker process.
//!
//! Frames are a 4-byte little-endian length followed by the body. The handshake (a [`Hello`] and
//! its answer) and the admin process's frames are a bare `postcard` body; every request and reply
//! after the handshake is tagged: an 8-byte little-endian request id, then the `postcard` body.
//! The service matches each reply to its request by id and takes any other id, an undecodable
//! body or bytes after the body as a broken pipe: the worker is replaced, never believed. One
//! request is one high-level operation (derive + encrypt is one round trip, not two), so the
//! pipe is crossed once per client request.

use std::io::{self, Read, Write};

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Largest frame either side accepts; far above the biggest legitimate message (a 4 KiB plaintext).
pub const MAX_FRAME: usize = 1 << 20;

/// Raised whenever a frame or the handshake changes; a worker refuses a Hello of another version.
pub const PROTOCOL_VERSION: u32 = 2;

/// Length prefix and request id of a tagged frame.
pub const TAGGED_HEADER: usize = 4 + 8;

/// A KMS key's 16-byte id, stored on the token as `CKA_ID`.
pub type KeyIdBytes = [u8; 16];

/// Labels of the domain key's two objects on every token of a cluster (docs/clusters.md).
pub const DOMAIN_WRAP_LABEL: &str = "hsmkms-domain-wrap";
pub const DOMAIN_UNWRAP_LABEL: &str = "hsmkms-domain-unwrap";
/// Label of a store's backup MAC keys: private, sensitive HMAC-SHA256 keys that authenticate
/// backups and nothing else (docs/backup.md, docs/security.md).
pub const BACKUP_MAC_LABEL: &str = "hsmkms-backup-mac";

/// A backup MAC key's id, stored on the token as its 8-byte `CKA_ID` (KMS keys have 16 bytes,
/// so neither is ever taken for the other).
pub type MacKeyId = [u8; 8];

/// How the data-encryption key `D` is derived from the root key `K` and the nonce `r`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u8)]
pub enum Kdf {
    /// `CKM_AES_CBC_ENCRYPT_DATA` with a zero IV over the two blocks of `r`: D = E_K(r1) || E_K(r2 ^ E_K(r1)).
    /// A PRF on fixed-length inputs; used because SoftHSM2 has no SP 800-108 KDF.
    AesCbcEncryptData = 1,
}

impl Kdf {
    pub fn from_id(id: u8) -> Option<Kdf> {
        match id {
            1 => Some(Kdf::AesCbcEncryptData),
            _ => None,
        }
    }
}

/// How long a worker keeps using one derived key `D` for encryption before drawing a new `r`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DerivedKeyLimits {
    pub max_uses: u64,
    pub max_age_secs: u64,
}

impl Default for DerivedKeyLimits {
    /// 2^24 encryptions or one hour: with random 96-bit IVs, the chance that two of 2^24
    /// messages under one `D` share an IV is at most 2^48 / 2^97 = 2^-49 (DESIGN 4).
    fn default() -> Self {
        DerivedKeyLimits {
            max_uses: 1 << 24,
            max_age_secs: 3600,
        }
    }
}

/// First frame on a new worker: which module and token to serve, and the user PIN.
#[derive(Serialize, Deserialize)]
pub struct Hello {
    /// First, so that a worker of any version can read it before the rest.
    pub version: u32,
    pub module: String,
    pub token_label: String,
    pub limits: DerivedKeyLimits,
    #[serde(with = "secret_string")]
    pub pin: SecretString,
}

impl std::fmt::Debug for Hello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hello")
            .field("version", &self.version)
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("limits", &self.limits)
            .field("pin", &"[redacted]")
            .finish()
    }
}

/// Facts about the token a worker logged in to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenInfo {
    pub label: String,
    pub manufacturer: String,
    pub model: String,
    pub serial: String,
}

/// An AES-GCM ciphertext under a derived key: the derivation nonce, the IV, and ciphertext || tag.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Sealed {
    pub kdf: Kdf,
    pub r: [u8; 32],
    pub iv: [u8; 12],
    pub ciphertext: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
pub enum Request {
    /// Generate the root key with this id, or find it if it exists already (so a retry is safe).
    GenerateKey {
        key_id: KeyIdBytes,
    },
    /// Whether the token holds the key.
    HasKey {
        key_id: KeyIdBytes,
    },
    /// The ids of every KMS key (secret key with a 16-byte `CKA_ID`) on the token.
    ListKeys,
    /// The root key wrapped by the cluster's domain key (AES key wrap with padding), to be
    /// imported on another token of the cluster.
    ExportKey {
        key_id: KeyIdBytes,
    },
    /// Unwraps an exported root key with the domain key's unwrap twin, as a KMS key object;
    /// a key that is already there is left as it is (so a retry is safe).
    ImportKey {
        key_id: KeyIdBytes,
        wrapped: Vec<u8>,
    },
    /// The domain key's check value: the first 8 bytes of its AES key wrap (with padding) of
    /// an all-zero AES-256 key. Only zeros: a wrap made by the public domain-wrap object proves
    /// nothing (anyone with the token directory can make one without a PIN), so it is never
    /// offered as a tag over chosen data.
    DomainKcv,
    /// Drop this worker's cached handles and derived keys of a key (after another worker
    /// destroyed it).
    Forget {
        key_id: KeyIdBytes,
    },
    /// Destroy the key; a key that is not there is not an error (so a retry is safe).
    DestroyKey {
        key_id: KeyIdBytes,
    },
    /// Encrypt under a key derived from the root key; `aad` is bound by GCM.
    Encrypt {
        key_id: KeyIdBytes,
        aad: Vec<u8>,
        plaintext: Zeroizing<Vec<u8>>,
    },
    Decrypt {
        key_id: KeyIdBytes,
        aad: Vec<u8>,
        sealed: Sealed,
    },
    /// `len` bytes from the token's RNG, returned in the clear and also sealed under the key.
    GenerateDataKey {
        key_id: KeyIdBytes,
        aad: Vec<u8>,
        len: usize,
    },
    Random {
        len: usize,
    },
    /// Liveness check: the session is still usable.
    Ping,
    /// Generate a backup MAC key with this id, or find it if it exists already.
    GenerateMacKey {
        mac_key_id: MacKeyId,
    },
    /// The ids of the backup MAC keys on the token.
    ListMacKeys,
    /// A backup MAC key wrapped by the domain key, to be imported on another token.
    ExportMacKey {
        mac_key_id: MacKeyId,
    },
    /// Unwraps a backup MAC key exported by another token of the cluster; a key that is
    /// already there is left as it is.
    ImportMacKey {
        mac_key_id: MacKeyId,
        wrapped: Vec<u8>,
    },
    /// HMAC-SHA256 of `message` under the MAC key, made in the token.
    Mac {
        mac_key_id: MacKeyId,
        message: Vec<u8>,
    },
    /// Whether `mac` is the HMAC-SHA256 of `message` under the MAC key, checked in the token.
    VerifyMac {
        mac_key_id: MacKeyId,
        message: Vec<u8>,
        mac: Vec<u8>,
    },
}

impl Request {
    /// Every operation is idempotent or draws fresh randomness, so replaying it on a new worker
    /// after the old one died cannot duplicate or lose anything.
    pub fn retry_is_safe(&self) -> bool {
        true
    }

    pub fn name(&self) -> &'static str {
        match self {
            Request::GenerateKey { .. } => "GenerateKey",
            Request::HasKey { .. } => "HasKey",
            Request::DestroyKey { .. } => "DestroyKey",
            Request::ListKeys => "ListKeys",
            Request::Forget { .. } => "Forget",
            Request::ExportKey { .. } => "ExportKey",
            Request::DomainKcv => "DomainKcv",
            Request::ImportKey { .. } => "ImportKey",
            Request::Encrypt { .. } => "Encrypt",
            Request::Decrypt { .. } => "Decrypt",
            Request::GenerateDataKey { .. } => "GenerateDataKey",
            Request::Random { .. } => "Random",
            Request::Ping => "Ping",
            Request::GenerateMacKey { .. } => "GenerateMacKey",
            Request::ListMacKeys => "ListMacKeys",
            Request::ExportMacKey { .. } => "ExportMacKey",
            Request::ImportMacKey { .. } => "ImportMacKey",
            Request::Mac { .. } => "Mac",
            Request::VerifyMac { .. } => "VerifyMac",
        }
    }
}

impl std::fmt::Debug for Request {
    // Plaintexts never reach a log through Debug.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Serialize, Deserialize)]
pub enum Reply {
    Ready(TokenInfo),
    Done,
    Exists(bool),
    Sealed(Sealed),
    Plaintext(Zeroizing<Vec<u8>>),
    DataKey {
        plaintext: Zeroizing<Vec<u8>>,
        sealed: Sealed,
    },
    Random(Vec<u8>),
    KeyIds(Vec<KeyIdBytes>),
    Wrapped(Vec<u8>),
    MacKeyIds(Vec<MacKeyId>),
    Mac(Vec<u8>),
    Verified(bool),
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Ready(info) => write!(f, "Ready({info:?})"),
            Reply::Done => f.write_str("Done"),
            Reply::Exists(b) => write!(f, "Exists({b})"),
            Reply::Sealed(_) => f.write_str("Sealed"),
            Reply::Plaintext(_) => f.write_str("Plaintext([redacted])"),
            Reply::DataKey { .. } => f.write_str("DataKey([redacted])"),
            Reply::Random(r) => write!(f, "Random({} bytes)", r.len()),
            Reply::KeyIds(ids) => write!(f, "KeyIds({} keys)", ids.len()),
            Reply::Wrapped(w) => write!(f, "Wrapped({} bytes)", w.len()),
            Reply::MacKeyIds(ids) => write!(f, "MacKeyIds({} keys)", ids.len()),
            Reply::Mac(m) => write!(f, "Mac({} bytes)", m.len()),
            Reply::Verified(b) => write!(f, "Verified({b})"),
        }
    }
}

/// What went wrong inside a worker, classified for the pool's recovery decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureKind {
    /// The session or token is gone (`CKR_SESSION_HANDLE_INVALID`, `CKR_DEVICE_REMOVED`, ...):
    /// the worker must be replaced.
    SessionBroken,
    /// No object with the key's `CKA_ID` on this token.
    KeyNotFound,
    /// The GCM tag did not verify, or the sealed blob is malformed.
    InvalidCiphertext,
    /// Anything else: reported, not retried.
    Other,
}

/// A PKCS#11 return value (`CK_RV`), carried as its number so that callers match on it, never
/// on a message's text.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Ckr(pub u64);

impl Ckr {
    pub const GENERAL_ERROR: Ckr = Ckr(0x05);
    pub const PIN_INCORRECT: Ckr = Ckr(0xA0);
    pub const PIN_INVALID: Ckr = Ckr(0xA1);
    pub const PIN_LEN_RANGE: Ckr = Ckr(0xA2);
    pub const PIN_EXPIRED: Ckr = Ckr(0xA3);
    pub const PIN_LOCKED: Ckr = Ckr(0xA4);

    /// A PIN refused, expired or locked: never worth retrying (tokens lock users out).
    pub fn is_pin_failure(self) -> bool {
        matches!(
            self,
            Ckr::PIN_INCORRECT
                | Ckr::PIN_INVALID
                | Ckr::PIN_LEN_RANGE
                | Ckr::PIN_EXPIRED
                | Ckr::PIN_LOCKED
        )
    }

    /// Its name, e.g. `CKR_PIN_INCORRECT` (for messages only).
    pub fn name(self) -> String {
        match cryptoki::error::Rv::from(self.0 as std::os::raw::c_ulong) {
            cryptoki::error::Rv::Error(rv) => crate::worker::rv_name(rv),
            cryptoki::error::Rv::Ok => "CKR_OK".into(),
        }
    }
}

impl std::fmt::Display for Ckr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl std::fmt::Debug for Ckr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}(0x{:X})", self.name(), self.0)
    }
}

/// Why a worker could not serve a token, when the reason is not a PKCS#11 return value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cause {
    /// The PKCS#11 module could not be loaded (missing file, not a PKCS#11 library).
    ModuleNotLoadable,
    /// The module has no token with the configured label.
    TokenNotFound,
    /// The service and the worker speak different protocol versions.
    ProtocolMismatch,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failure {
    pub kind: FailureKind,
    /// The PKCS#11 function that failed, e.g. `C_Decrypt`, if any (its name, for messages).
    pub function: Option<String>,
    /// The return value, e.g. `CKR_ENCRYPTED_DATA_INVALID`, if any.
    pub rv: Option<Ckr>,
    /// A typed reason for failures that are not a PKCS#11 return value.
    pub cause: Option<Cause>,
    pub message: String,
}

pub type Response = Result<Reply, Failure>;

fn invalid(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// An untagged frame (handshake, admin process).
pub fn write_frame<T: Serialize>(w: &mut impl Write, value: &T) -> io::Result<()> {
    w.write_all(&encode_frame(value)?)?;
    w.flush()
}

/// A tagged frame: the answer to request `id`.
pub fn write_tagged<T: Serialize>(w: &mut impl Write, id: u64, value: &T) -> io::Result<()> {
    w.write_all(&encode_tagged(id, value)?)?;
    w.flush()
}

/// One frame's body; its length is checked against [`MAX_FRAME`] before anything is allocated.
pub fn read_frame_body(r: &mut impl Read) -> io::Result<Zeroizing<Vec<u8>>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(invalid("frame too large"));
    }
    let mut body = Zeroizing::new(vec![0u8; len]);
    r.read_exact(&mut body)?;
    Ok(body)
}

pub fn read_frame<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> io::Result<T> {
    decode_body(&read_frame_body(r)?)
}

/// A tagged frame: the request id and the value.
pub fn read_tagged<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> io::Result<(u64, T)> {
    let body = read_frame_body(r)?;
    split_tagged(&body).and_then(|(id, rest)| Ok((id, decode_body(rest)?)))
}

/// A tagged body's request id and the `postcard` body after it.
pub fn split_tagged(body: &[u8]) -> io::Result<(u64, &[u8])> {
    let (id, rest) = body
        .split_first_chunk::<8>()
        .ok_or_else(|| invalid("frame shorter than its request id"))?;
    Ok((u64::from_le_bytes(*id), rest))
}

/// An untagged frame, length prefix included.
pub fn encode_frame<T: Serialize>(value: &T) -> io::Result<Zeroizing<Vec<u8>>> {
    encode_with_header(value, 4)
}

/// A tagged frame for request `id`, length prefix included (see [`set_frame_id`]).
pub fn encode_tagged<T: Serialize>(id: u64, value: &T) -> io::Result<Zeroizing<Vec<u8>>> {
    let mut frame = encode_with_header(value, TAGGED_HEADER)?;
    set_frame_id(&mut frame, id);
    Ok(frame)
}

/// Writes the request id into a frame made by [`encode_tagged`]: ids are given as frames are
/// written, by the one task that writes a worker's pipe.
pub fn set_frame_id(frame: &mut [u8], id: u64) {
    frame[4..TAGGED_HEADER].copy_from_slice(&id.to_le_bytes());
}

fn encode_with_header<T: Serialize>(value: &T, header: usize) -> io::Result<Zeroizing<Vec<u8>>> {
    let mut out = Zeroizing::new(Vec::with_capacity(64));
    out.resize(header, 0);
    // Serialised in place after the header: no second buffer holding a plaintext.
    let body = postcard::to_extend(value, std::mem::take(&mut *out)).map_err(io::Error::other)?;
    *out = body;
    let len = u32::try_from(out.len() - 4)
        .ok()
        .filter(|l| *l as usize <= MAX_FRAME)
        .ok_or_else(|| invalid("frame too large"))?;
    out[..4].copy_from_slice(&len.to_le_bytes());
    Ok(out)
}

/// A `postcard` body that must be exactly one value: trailing bytes are refused, since a frame
/// with more in it than its value was not made by the peer's encoder.
pub fn decode_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> io::Result<T> {
    match postcard::take_from_bytes(body) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(invalid(format!(
            "{} bytes after the end of the frame's value",
            rest.len()
        ))),
        Err(e) => Err(invalid(e)),
    }
}

pub(crate) mod secret_string {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(s: &SecretString, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(s.expose_secret())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<SecretString, D::Error> {
        let s = Zeroizing::new(String::deserialize(de)?);
        Ok(SecretString::from(s.as_str()))
    }
}
