//! The token worker: one process, one PKCS#11 session, one request at a time.
//!
//! Run by the `hsm-worker` binary (or `hsmkms worker`). It reads a [`Hello`] from stdin, logs in,
//! answers `Ready`, then serves framed [`Request`]s until stdin closes. Keeping the module in its
//! own process means a vendor library that crashes cannot take the service down, and several
//! processes get past SoftHSM2's per-process lock.

use std::collections::{HashMap, VecDeque};
use std::io::{BufReader, BufWriter};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::ekdf::AesCbcDeriveParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use crate::proto::{
    decode_body, read_frame_body, read_tagged, write_frame, write_tagged, Cause, Ckr,
    DerivedKeyLimits, Failure, FailureKind, Hello, Kdf, KeyIdBytes, MacKeyId, Reply, Request,
    Response, Sealed, TokenInfo, BACKUP_MAC_LABEL, DOMAIN_UNWRAP_LABEL, DOMAIN_WRAP_LABEL,
    PROTOCOL_VERSION,
};

/// Root keys with a live derived encryption key per worker; beyond it the oldest is retired.
const MAX_CURRENT_KEYS: usize = 1024;
/// Derived keys kept per worker for decryption of older ciphertexts.
const DECRYPT_CACHE: usize = 512;
const GCM_TAG_BITS: u64 = 128;

/// The worker program's command line: no arguments serves stdin/stdout; `provision MODULE LABEL`
/// initialises a token (SO PIN then user PIN, one per line on stdin) if no token has that label.
/// Returns the process exit code.
pub fn main_with_args(args: Vec<String>) -> i32 {
    let result = match args.as_slice() {
        [] => run().map_err(|e| e.to_string()),
        [cmd] if cmd == "admin" => crate::admin::run().map_err(|e| e.to_string()),
        [cmd, module, label] if cmd == "provision" => provision_from_stdin(module, label),
        _ => Err("usage: worker [admin | provision MODULE LABEL]".into()),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("hsm worker: {e}");
            1
        }
    }
}

fn provision_from_stdin(module: &str, label: &str) -> std::result::Result<(), String> {
    use std::io::BufRead;
    let mut lines = std::io::stdin().lock().lines();
    let mut next = |what: &str| -> std::result::Result<secrecy::SecretString, String> {
        let line = lines
            .next()
            .ok_or(format!("missing {what} on stdin"))?
            .map_err(|e| e.to_string())?;
        let line = Zeroizing::new(line);
        Ok(secrecy::SecretString::from(line.trim_end()))
    };
    let so_pin = next("SO PIN")?;
    let user_pin = next("user PIN")?;
    let created = crate::provision::ensure_token(module.as_ref(), label, &so_pin, &user_pin)?;
    println!("{}", if created { "created" } else { "exists" });
    Ok(())
}

/// Entry point of a worker process: serve stdin/stdout until the service closes the pipe.
pub fn run() -> std::io::Result<()> {
    let mut input = BufReader::new(std::io::stdin().lock());
    let mut output = BufWriter::new(std::io::stdout().lock());
    let hello = match read_hello(&mut input)? {
        Ok(hello) => hello,
        Err(f) => {
            write_frame(&mut output, &Response::Err(f))?;
            return Ok(());
        }
    };
    let mut worker = match Worker::open(&hello) {
        Ok(w) => Some(w),
        Err(f) => {
            write_frame(&mut output, &Response::Err(f))?;
            return Ok(());
        }
    };
    let info = worker.as_ref().map(|w| w.info.clone()).expect("opened");
    // Only SoftHSM2's file store gives each process its own view of the token's objects; on an
    // HSM reopening would cost a login and prove nothing.
    let views_can_be_stale = info.manufacturer.starts_with("SoftHSM");
    write_frame(&mut output, &Response::Ok(Reply::Ready(info)))?;
    // The Hello (with the PIN) is kept to open the token afresh: see `needs_fresh_view`.
    let mut opened = Instant::now();
    loop {
        // A frame that does not decode exactly ends the worker: the service replaces it.
        let (id, request): (u64, Request) = match read_tagged(&mut input) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        let may_reopen = views_can_be_stale && opened.elapsed() >= FRESH_VIEW_INTERVAL;
        if matches!(request, Request::ListKeys) && views_can_be_stale {
            // The prober's listing decides what to copy: it must see every object.
            reopen(&mut worker, &hello)?;
            opened = Instant::now();
        }
        let mut response = worker.as_mut().expect("open").handle(&request);
        if needs_fresh_view(&response) && may_reopen {
            reopen(&mut worker, &hello)?;
            opened = Instant::now();
            response = worker.as_mut().expect("open").handle(&request);
        }
        write_tagged(&mut output, id, &response)?;
    }
}

/// The Hello, or a clear refusal when the service speaks another protocol version: the version
/// comes first in the Hello so that it can be read whatever follows it.
fn read_hello(input: &mut impl std::io::Read) -> std::io::Result<Result<Hello>> {
    let body = read_frame_body(input)?;
    let version = postcard::take_from_bytes::<u32>(&body).map(|(v, _)| v);
    if version.as_ref().ok() != Some(&PROTOCOL_VERSION) {
        let theirs = version.map_or_else(|_| "an unreadable".to_string(), |v| v.to_string());
        let mut refusal = failure(
            FailureKind::Other,
            format!(
                "protocol mismatch: the service speaks version {theirs}, this worker {PROTOCOL_VERSION}; run the worker of the same build"
            ),
        );
        refusal.cause = Some(Cause::ProtocolMismatch);
        return Ok(Err(refusal));
    }
    decode_body(&body).map(Ok)
}

/// How often at most a worker opens its token afresh to see objects other processes made.
const FRESH_VIEW_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// SoftHSM2's file store keeps a per-process index of the token's objects, re-read when the
/// token's generation counter moves; a process that writes just after another adopts the new
/// counter without re-reading, and then misses the other's objects until the next change.
/// So "no such key" may be this process's stale view: open the token afresh and ask again
/// (rate-limited, since a key a token really lacks is asked for too).
fn needs_fresh_view(response: &Response) -> bool {
    matches!(
        response,
        Response::Err(Failure {
            kind: FailureKind::KeyNotFound,
            ..
        }) | Response::Ok(Reply::Exists(false))
    )
}

/// Closes the session and finalises the library (dropping the worker), then opens the token
/// again: a new index of its objects. A worker that cannot reopen exits; the pool replaces it.
fn reopen(worker: &mut Option<Worker>, hello: &Hello) -> std::io::Result<()> {
    if let Some(old) = worker.take() {
        let Worker {
            session, _pkcs11, ..
        } = old;
        drop(session);
        // Dropping the context does not finalise the library; a second C_Initialize would fail.
        let _ = _pkcs11.finalize();
    }
    let opened = Worker::open(hello).map_err(|f| {
        std::io::Error::other(format!(
            "token {}: reopening failed: {}",
            hello.token_label, f.message
        ))
    })?;
    *worker = Some(opened);
    Ok(())
}

/// The encryption state of one root key in this worker: the current `(r, D)` pair.
struct CurrentKey {
    r: [u8; 32],
    derived: ObjectHandle,
    uses: u64,
    since: Instant,
}

struct Worker {
    // Field order matters: the session must close before the library is finalised.
    session: Session,
    _pkcs11: Pkcs11,
    info: TokenInfo,
    limits: DerivedKeyLimits,
    roots: HashMap<KeyIdBytes, ObjectHandle>,
    current: HashMap<KeyIdBytes, CurrentKey>,
    derived: HashMap<(KeyIdBytes, [u8; 32]), ObjectHandle>,
    derived_order: VecDeque<(KeyIdBytes, [u8; 32])>,
    /// SoftHSM2 2.6.1 reports a GCM tag mismatch as CKR_GENERAL_ERROR from C_Decrypt (the
    /// standard says CKR_ENCRYPTED_DATA_INVALID); on any other module a general error is a fault.
    general_error_means_bad_tag: bool,
}

type Result<T> = std::result::Result<T, Failure>;

/// Whether a KMS key object is generated here or unwrapped from another token of the cluster.
enum KeyOrigin {
    Generated,
    /// An unwrap template must not name the length: it comes from the wrapped value.
    Unwrapped,
}

/// The attributes of a KMS root key (DESIGN 3), generated or replicated alike.
fn kms_key_template(key_id: &KeyIdBytes, origin: KeyOrigin) -> Vec<Attribute> {
    replicable_key_template(
        KeyType::AES,
        origin,
        // The root key only derives; data is encrypted under derived keys (DESIGN 4).
        [
            Attribute::Derive(true),
            Attribute::Sign(false),
            Attribute::Verify(false),
        ],
        key_id,
        crate::format_key_id(key_id).into_bytes(),
    )
}

/// The attributes of a backup MAC key: it signs and verifies (HMAC-SHA256) and does nothing
/// else.
fn mac_key_template(mac_key_id: &MacKeyId, origin: KeyOrigin) -> Vec<Attribute> {
    replicable_key_template(
        KeyType::GENERIC_SECRET,
        origin,
        [
            Attribute::Derive(false),
            Attribute::Sign(true),
            Attribute::Verify(true),
        ],
        mac_key_id,
        BACKUP_MAC_LABEL.as_bytes().to_vec(),
    )
}

/// A secret key that a cluster replicates: a private, sensitive token object, so that only a
/// logged-in session can use it; extractable only under a trusted wrapping key (the cluster's
/// domain key, which carries it to the other tokens); no encryption, decryption, wrapping or
/// unwrapping, and the one use `usage` grants.
fn replicable_key_template(
    key_type: KeyType,
    origin: KeyOrigin,
    usage: [Attribute; 3],
    id: &[u8],
    label: Vec<u8>,
) -> Vec<Attribute> {
    let mut template = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(key_type),
    ];
    if matches!(origin, KeyOrigin::Generated) {
        template.push(Attribute::ValueLen(32.into()));
    }
    template.extend([
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
        Attribute::WrapWithTrusted(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
    ]);
    template.extend(usage);
    template.extend([Attribute::Id(id.to_vec()), Attribute::Label(label)]);
    template
}

fn failure(kind: FailureKind, message: impl Into<String>) -> Failure {
    Failure {
        kind,
        function: None,
        rv: None,
        cause: None,
        message: message.into(),
    }
}

/// The slot and info of the token labelled `label`, if the module has one.
pub(crate) fn find_token(
    pkcs11: &Pkcs11,
    label: &str,
) -> std::result::Result<Option<(cryptoki::slot::Slot, cryptoki::slot::TokenInfo)>, CkError> {
    for slot in pkcs11.get_slots_with_token()? {
        let info = pkcs11.get_token_info(slot)?;
        if info.label().trim_end() == label {
            return Ok(Some((slot, info)));
        }
    }
    Ok(None)
}

/// A failed call as `C_Login failed with CKR_PIN_INCORRECT`, for messages and logs.
pub(crate) fn describe(e: CkError) -> String {
    match e {
        CkError::Pkcs11(rv, f) => format!("{} failed with {}", function_name(f), rv_name(rv)),
        other => other.to_string(),
    }
}

/// `SessionHandleInvalid` -> `CKR_SESSION_HANDLE_INVALID`.
pub fn rv_name(rv: RvError) -> String {
    let debug = format!("{rv:?}");
    let mut out = String::from("CKR_");
    for (i, c) in debug.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

fn classify(rv: RvError) -> FailureKind {
    match rv {
        RvError::SessionHandleInvalid
        | RvError::SessionClosed
        | RvError::DeviceRemoved
        | RvError::DeviceError
        | RvError::TokenNotPresent
        | RvError::UserNotLoggedIn
        | RvError::CryptokiNotInitialized => FailureKind::SessionBroken,
        RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange => {
            FailureKind::InvalidCiphertext
        }
        _ => FailureKind::Other,
    }
}

fn ck(e: CkError) -> Failure {
    match e {
        CkError::Pkcs11(rv, function) => Failure {
            kind: classify(rv),
            function: Some(function_name(function)),
            rv: Some(ckr_of(rv)),
            cause: None,
            message: format!("{} failed with {}", function_name(function), rv_name(rv)),
        },
        other => failure(FailureKind::Other, other.to_string()),
    }
}

/// The `CK_RV` number of a return value. cryptoki 0.12 maps numbers to [`RvError`] but not
/// back; every standard code is below 0x200, so the first number that maps to it is its own.
pub(crate) fn ckr_of(rv: RvError) -> Ckr {
    match rv {
        RvError::VendorDefined(n) | RvError::UnknownErrorCode(n) => Ckr(n),
        rv => (1..0x200u64)
            .find(|n| {
                cryptoki::error::Rv::from(*n as std::os::raw::c_ulong)
                    == cryptoki::error::Rv::Error(rv)
            })
            .map_or(Ckr::GENERAL_ERROR, Ckr),
    }
}

fn function_name(f: Function) -> String {
    format!("C_{f:?}")
}

impl Worker {
    fn open(hello: &Hello) -> Result<Worker> {
        let pkcs11 = Pkcs11::new(&hello.module).map_err(|e| Failure {
            cause: Some(Cause::ModuleNotLoadable),
            ..failure(
                FailureKind::Other,
                format!("cannot load PKCS#11 module {}: {e}", hello.module),
            )
        })?;
        // Single-threaded use of the library: one session, one request at a time.
        pkcs11
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(ck)?;
        let found = find_token(&pkcs11, &hello.token_label).map_err(ck)?;
        let (slot, info) = found.ok_or_else(|| Failure {
            kind: FailureKind::SessionBroken,
            function: Some("C_GetTokenInfo".into()),
            rv: None,
            cause: Some(Cause::TokenNotFound),
            message: format!(
                "no token labelled {:?} in {}",
                hello.token_label, hello.module
            ),
        })?;
        let session = pkcs11.open_rw_session(slot).map_err(ck)?;
        let pin: AuthPin = hello.pin.clone();
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => return Err(ck(e)),
        }
        Ok(Worker {
            session,
            _pkcs11: pkcs11,
            info: TokenInfo {
                label: info.label().trim_end().to_string(),
                manufacturer: info.manufacturer_id().trim_end().to_string(),
                model: info.model().trim_end().to_string(),
                serial: info.serial_number().trim_end().to_string(),
            },
            limits: hello.limits,
            general_error_means_bad_tag: info.manufacturer_id().starts_with("SoftHSM"),
            roots: HashMap::new(),
            current: HashMap::new(),
            derived: HashMap::new(),
            derived_order: VecDeque::new(),
        })
    }

    fn handle(&mut self, request: &Request) -> Response {
        match request {
            Request::Ping => self
                .session
                .get_session_info()
                .map(|_| Reply::Done)
                .map_err(ck),
            Request::Random { len } => self.random(*len).map(Reply::Random),
            Request::GenerateKey { key_id } => self.generate_key(*key_id).map(|_| Reply::Done),
            Request::HasKey { key_id } => {
                // Asked of the token itself, not this worker's cache: another worker may have
                // destroyed the key.
                self.roots.remove(key_id);
                self.find_root(key_id).map(|h| Reply::Exists(h.is_some()))
            }
            Request::Forget { key_id } => {
                self.forget(key_id);
                Ok(Reply::Done)
            }
            Request::DestroyKey { key_id } => self.destroy_key(*key_id).map(|_| Reply::Done),
            Request::ListKeys => self.list_keys().map(Reply::KeyIds),
            Request::ExportKey { key_id } => self.export_key(*key_id).map(Reply::Wrapped),
            Request::DomainKcv => self.domain_kcv().map(Reply::Wrapped),
            Request::ImportKey { key_id, wrapped } => {
                self.import_key(*key_id, wrapped).map(|_| Reply::Done)
            }
            Request::Encrypt {
                key_id,
                aad,
                plaintext,
            } => self.encrypt(*key_id, aad, plaintext).map(Reply::Sealed),
            Request::Decrypt {
                key_id,
                aad,
                sealed,
            } => self.decrypt(*key_id, aad, sealed).map(Reply::Plaintext),
            Request::GenerateDataKey { key_id, aad, len } => {
                let plaintext = Zeroizing::new(self.random(*len)?);
                let sealed = self.encrypt(*key_id, aad, &plaintext)?;
                Ok(Reply::DataKey { plaintext, sealed })
            }
            Request::GenerateMacKey { mac_key_id } => {
                self.generate_mac_key(mac_key_id).map(|_| Reply::Done)
            }
            Request::ListMacKeys => self.list_mac_keys().map(Reply::MacKeyIds),
            Request::ExportMacKey { mac_key_id } => {
                let key = self.mac_key(mac_key_id)?;
                self.wrap_under_domain(key).map(Reply::Wrapped)
            }
            Request::ImportMacKey {
                mac_key_id,
                wrapped,
            } => self
                .import_mac_key(mac_key_id, wrapped)
                .map(|_| Reply::Done),
            Request::Mac {
                mac_key_id,
                message,
            } => {
                let key = self.mac_key(mac_key_id)?;
                self.session
                    .sign(&Mechanism::Sha256Hmac, key, message)
                    .map(Reply::Mac)
                    .map_err(ck)
            }
            Request::VerifyMac {
                mac_key_id,
                message,
                mac,
            } => {
                let key = self.mac_key(mac_key_id)?;
                match self
                    .session
                    .verify(&Mechanism::Sha256Hmac, key, message, mac)
                {
                    Ok(()) => Ok(Reply::Verified(true)),
                    Err(CkError::Pkcs11(
                        RvError::SignatureInvalid | RvError::SignatureLenRange,
                        _,
                    )) => Ok(Reply::Verified(false)),
                    Err(e) => Err(ck(e)),
                }
            }
        }
    }

    fn random(&self, len: usize) -> Result<Vec<u8>> {
        let mut out = vec![0u8; len];
        self.session.generate_random_slice(&mut out).map_err(ck)?;
        Ok(out)
    }

    /// Every token object of a KMS key (one, unless a twin was ever made).
    /// Private objects only: a session without a login can make a public twin with any id
    /// (and a value it knows); it must never be taken for the key.
    fn objects_of(&self, key_id: &KeyIdBytes) -> Result<Vec<ObjectHandle>> {
        self.session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Id(key_id.to_vec()),
            ])
            .map_err(ck)
    }

    fn find_root(&mut self, key_id: &KeyIdBytes) -> Result<Option<ObjectHandle>> {
        if let Some(h) = self.roots.get(key_id) {
            return Ok(Some(*h));
        }
        let handle = self.objects_of(key_id)?.first().copied();
        if let Some(h) = handle {
            self.roots.insert(*key_id, h);
        }
        Ok(handle)
    }

    fn root(&mut self, key_id: &KeyIdBytes) -> Result<ObjectHandle> {
        self.find_root(key_id)?
            .ok_or_else(|| failure(FailureKind::KeyNotFound, "key not found on token"))
    }

    fn generate_key(&mut self, key_id: KeyIdBytes) -> Result<()> {
        if self.find_root(&key_id)?.is_some() {
            return Ok(());
        }
        let template = kms_key_template(&key_id, KeyOrigin::Generated);
        let handle = self
            .session
            .generate_key(&Mechanism::AesKeyGen, &template)
            .map_err(ck)?;
        self.roots.insert(key_id, handle);
        Ok(())
    }

    /// The trusted, public wrap half of the domain key. Only the SO can make a key trusted, so
    /// an object of that label planted by a session without a login is never taken for it.
    fn domain_wrap_key(&self) -> Result<ObjectHandle> {
        self.domain_half(DOMAIN_WRAP_LABEL, Attribute::Trusted(true))
    }

    /// The private unwrap half of the domain key (only a logged-in session can make one).
    fn domain_unwrap_key(&self) -> Result<ObjectHandle> {
        self.domain_half(DOMAIN_UNWRAP_LABEL, Attribute::Private(true))
    }

    /// The object of this label carrying `made_by_us`, an attribute only the service or the SO
    /// can have set.
    fn domain_half(&self, label: &str, made_by_us: Attribute) -> Result<ObjectHandle> {
        self.session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(label.as_bytes().to_vec()),
                made_by_us,
            ])
            .map_err(ck)?
            .first()
            .copied()
            .ok_or_else(|| {
                failure(
                    FailureKind::Other,
                    format!("this token holds no {label}: the cluster's domain key is not set up"),
                )
            })
    }

    fn wrap_under_domain(&self, key: ObjectHandle) -> Result<Vec<u8>> {
        let wrap = self.domain_wrap_key()?;
        self.session
            .wrap_key(&Mechanism::AesKeyWrapPad, wrap, key)
            .map_err(ck)
    }

    /// The domain key's check value (see [`Request::DomainKcv`]).
    fn domain_kcv(&mut self) -> Result<Vec<u8>> {
        let zero = self
            .session
            .create_object(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(false),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
                Attribute::Value(vec![0u8; 32]),
            ])
            .map_err(ck)?;
        let sealed = self.wrap_under_domain(zero);
        let _ = self.session.destroy_object(zero);
        Ok(sealed?[..8].to_vec())
    }

    /// The backup MAC key with this id, if the token holds it. Only private objects: a
    /// session without a login can make public ones with any label and id.
    fn find_mac_key(&self, mac_key_id: &MacKeyId) -> Result<Option<ObjectHandle>> {
        Ok(self
            .session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Label(BACKUP_MAC_LABEL.as_bytes().to_vec()),
                Attribute::Id(mac_key_id.to_vec()),
            ])
            .map_err(ck)?
            .first()
            .copied())
    }

    fn mac_key(&self, mac_key_id: &MacKeyId) -> Result<ObjectHandle> {
        self.find_mac_key(mac_key_id)?.ok_or_else(|| {
            failure(
                FailureKind::KeyNotFound,
                "backup MAC key not found on token",
            )
        })
    }

    fn generate_mac_key(&mut self, mac_key_id: &MacKeyId) -> Result<()> {
        if self.find_mac_key(mac_key_id)?.is_some() {
            return Ok(());
        }
        self.session
            .generate_key(
                &Mechanism::GenericSecretKeyGen,
                &mac_key_template(mac_key_id, KeyOrigin::Generated),
            )
            .map_err(ck)?;
        Ok(())
    }

    fn import_mac_key(&mut self, mac_key_id: &MacKeyId, wrapped: &[u8]) -> Result<()> {
        if self.find_mac_key(mac_key_id)?.is_some() {
            return Ok(());
        }
        let unwrap = self.domain_unwrap_key()?;
        self.session
            .unwrap_key(
                &Mechanism::AesKeyWrapPad,
                unwrap,
                wrapped,
                &mac_key_template(mac_key_id, KeyOrigin::Unwrapped),
            )
            .map_err(ck)?;
        Ok(())
    }

    fn list_mac_keys(&self) -> Result<Vec<MacKeyId>> {
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Label(BACKUP_MAC_LABEL.as_bytes().to_vec()),
        ];
        let mut ids = Vec::new();
        for handle in self.session.find_objects(&template).map_err(ck)? {
            for attr in self
                .session
                .get_attributes(handle, &[AttributeType::Id])
                .map_err(ck)?
            {
                if let Attribute::Id(id) = attr {
                    if let Ok(id) = <MacKeyId>::try_from(id.as_slice()) {
                        ids.push(id);
                    }
                }
            }
        }
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    fn export_key(&mut self, key_id: KeyIdBytes) -> Result<Vec<u8>> {
        let root = self.root(&key_id)?;
        self.wrap_under_domain(root)
    }

    fn import_key(&mut self, key_id: KeyIdBytes, wrapped: &[u8]) -> Result<()> {
        if self.find_root(&key_id)?.is_some() {
            return Ok(());
        }
        let unwrap = self.domain_unwrap_key()?;
        let template = kms_key_template(&key_id, KeyOrigin::Unwrapped);
        let handle = self
            .session
            .unwrap_key(&Mechanism::AesKeyWrapPad, unwrap, wrapped, &template)
            .map_err(ck)?;
        self.roots.insert(key_id, handle);
        Ok(())
    }

    fn list_keys(&self) -> Result<Vec<KeyIdBytes>> {
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Token(true),
            Attribute::Private(true),
        ];
        let mut ids = Vec::new();
        for handle in self.session.find_objects(&template).map_err(ck)? {
            let attrs = self
                .session
                .get_attributes(handle, &[AttributeType::Id])
                .map_err(ck)?;
            for attr in attrs {
                if let Attribute::Id(id) = attr {
                    if let Ok(id) = <KeyIdBytes>::try_from(id.as_slice()) {
                        ids.push(id);
                    }
                }
            }
        }
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    /// Destroys every object with the key's id: should a twin ever have been made (an import
    /// by a process whose view of the token was stale), none must outlive the deletion.
    fn destroy_key(&mut self, key_id: KeyIdBytes) -> Result<()> {
        self.forget(&key_id);
        for h in self.objects_of(&key_id)? {
            self.session.destroy_object(h).map_err(ck)?;
        }
        self.roots.remove(&key_id);
        Ok(())
    }

    /// Drops every cached handle of a key, destroying its derived session keys.
    fn forget(&mut self, key_id: &KeyIdBytes) {
        self.roots.remove(key_id);
        if let Some(cur) = self.current.remove(key_id) {
            let _ = self.session.destroy_object(cur.derived);
        }
        let stale: Vec<_> = self
            .derived
            .keys()
            .filter(|(k, _)| k == key_id)
            .copied()
            .collect();
        for entry in stale {
            if let Some(h) = self.derived.remove(&entry) {
                let _ = self.session.destroy_object(h);
            }
        }
        self.derived_order.retain(|(k, _)| k != key_id);
    }

    /// D = KDF(K, r) as a sensitive, non-extractable session object.
    fn derive(&mut self, key_id: &KeyIdBytes, r: &[u8; 32]) -> Result<ObjectHandle> {
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(false),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
        ];
        let mechanism = Mechanism::AesCbcEncryptData(AesCbcDeriveParams::new([0u8; 16], r));
        let cached = self.roots.contains_key(key_id);
        let root = self.root(key_id)?;
        match self.session.derive_key(&mechanism, root, &template) {
            Ok(h) => Ok(h),
            // A cached root handle can go stale (the key destroyed and made again elsewhere, the
            // token's files replaced): it may then be invalid or name another object. Look the
            // key up again once, and try again only if that finds another object.
            Err(e) if cached => {
                self.roots.remove(key_id);
                match self.root(key_id)? {
                    again if again != root => self
                        .session
                        .derive_key(&mechanism, again, &template)
                        .map_err(ck),
                    _ => Err(ck(e)),
                }
            }
            Err(e) => Err(ck(e)),
        }
    }

    fn encrypt(&mut self, key_id: KeyIdBytes, aad: &[u8], plaintext: &[u8]) -> Result<Sealed> {
        let fresh = match self.current.get(&key_id) {
            Some(cur) => {
                cur.uses >= self.limits.max_uses
                    || cur.since.elapsed() >= Duration::from_secs(self.limits.max_age_secs)
            }
            None => true,
        };
        if fresh {
            let mut r = [0u8; 32];
            self.session.generate_random_slice(&mut r).map_err(ck)?;
            let derived = self.derive(&key_id, &r)?;
            let old = self.current.insert(
                key_id,
                CurrentKey {
                    r,
                    derived,
                    uses: 0,
                    since: Instant::now(),
                },
            );
            // The retired key may still decrypt recent ciphertexts: keep it in the decrypt cache.
            if let Some(old) = old {
                self.remember(key_id, old.r, old.derived);
            }
            // One live derived key per root key in use, bounded: a token has finite room for
            // session objects. The one retired goes to the (bounded) decrypt cache.
            if self.current.len() > MAX_CURRENT_KEYS {
                let victim = self
                    .current
                    .iter()
                    .min_by_key(|(_, c)| c.since)
                    .map(|(k, _)| *k);
                if let Some(victim) = victim.filter(|v| *v != key_id) {
                    let retired = self.current.remove(&victim).expect("present");
                    self.remember(victim, retired.r, retired.derived);
                }
            }
        }
        let cur = self
            .current
            .get_mut(&key_id)
            .expect("current key was just set");
        cur.uses += 1;
        let (r, derived) = (cur.r, cur.derived);
        let mut iv = [0u8; 12];
        self.session.generate_random_slice(&mut iv).map_err(ck)?;
        let mut iv_param = iv;
        let params = GcmParams::new(&mut iv_param, aad, GCM_TAG_BITS.into()).map_err(ck)?;
        let ciphertext = self
            .session
            .encrypt(&Mechanism::AesGcm(params), derived, plaintext)
            .map_err(ck)?;
        Ok(Sealed {
            kdf: Kdf::AesCbcEncryptData,
            r,
            iv,
            ciphertext,
        })
    }

    fn remember(&mut self, key_id: KeyIdBytes, r: [u8; 32], handle: ObjectHandle) {
        if self.derived.insert((key_id, r), handle).is_none() {
            self.derived_order.push_back((key_id, r));
        }
        while self.derived_order.len() > DECRYPT_CACHE {
            if let Some(evicted) = self.derived_order.pop_front() {
                if let Some(h) = self.derived.remove(&evicted) {
                    let _ = self.session.destroy_object(h);
                }
            }
        }
    }

    fn decrypt(
        &mut self,
        key_id: KeyIdBytes,
        aad: &[u8],
        sealed: &Sealed,
    ) -> Result<Zeroizing<Vec<u8>>> {
        if sealed.ciphertext.len() < 16 {
            return Err(failure(
                FailureKind::InvalidCiphertext,
                "ciphertext shorter than the GCM tag",
            ));
        }
        let (derived, fresh) = match self.current.get(&key_id) {
            Some(cur) if cur.r == sealed.r => (cur.derived, false),
            _ => match self.derived.get(&(key_id, sealed.r)) {
                Some(h) => (*h, false),
                None => (self.derive(&key_id, &sealed.r)?, true),
            },
        };
        let result = self.gcm_decrypt(derived, aad, sealed);
        if fresh {
            // Only a derivation that authenticated a ciphertext earns a cache place: a forged
            // blob with a random r costs one derivation and cannot evict useful entries.
            if result.is_ok() {
                self.remember(key_id, sealed.r, derived);
            } else {
                let _ = self.session.destroy_object(derived);
            }
        }
        result
    }

    fn gcm_decrypt(
        &mut self,
        derived: ObjectHandle,
        aad: &[u8],
        sealed: &Sealed,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let mut iv = sealed.iv;
        let params = GcmParams::new(&mut iv, aad, GCM_TAG_BITS.into()).map_err(ck)?;
        match self
            .session
            .decrypt(&Mechanism::AesGcm(params), derived, &sealed.ciphertext)
        {
            Ok(pt) => Ok(Zeroizing::new(pt)),
            Err(CkError::Pkcs11(
                RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange,
                Function::Decrypt,
            )) => Err(failure(
                FailureKind::InvalidCiphertext,
                "authentication tag did not verify",
            )),
            Err(CkError::Pkcs11(RvError::GeneralError, Function::Decrypt))
                if self.general_error_means_bad_tag =>
            {
                Err(failure(
                    FailureKind::InvalidCiphertext,
                    "authentication tag did not verify",
                ))
            }
            Err(e) => Err(ck(e)),
        }
    }
}
