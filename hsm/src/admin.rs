//! Setting up a cluster's domain key (docs/clusters.md): an admin process per token that holds
//! the SO PIN and the user PIN and logs in as each in turn, never both at once (a PKCS#11 login
//! is per application). Serving workers never see the SO PIN.
//!
//! The domain key is two objects with one value on every token: `hsmkms-domain-wrap` (public,
//! trusted, wrap-only, immutable) and `hsmkms-domain-unwrap` (private, unwrap-only). It travels
//! between tokens only wrapped under RSA-OAEP to a key pair made inside the receiving token.

use std::io::{BufReader, BufWriter};
use std::process::Stdio;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::Error as CkError;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::HsmError;
use crate::pool::{TokenConfig, WorkerCommand};
use crate::proto::Ckr;
use crate::proto::{
    decode_body, encode_frame, read_frame, write_frame, DOMAIN_UNWRAP_LABEL, DOMAIN_WRAP_LABEL,
    MAX_FRAME,
};
use crate::worker::{ckr_of, describe, find_token};

const TWIN_TRANSPORT: &str = "hsmkms-twin-transport";
const TWIN_TRANSPORT_TRUSTED: &str = "hsmkms-twin-transport-trusted";
const EXPORT_TRANSPORT_TRUSTED: &str = "hsmkms-export-transport-trusted";

#[derive(Serialize, Deserialize)]
struct AdminHello {
    module: String,
    token_label: String,
    #[serde(with = "crate::proto::secret_string")]
    so_pin: SecretString,
    #[serde(with = "crate::proto::secret_string")]
    user_pin: SecretString,
}

#[derive(Debug, Serialize, Deserialize)]
enum AdminRequest {
    DomainState,
    CreateDomain,
    /// Make an RSA key pair inside this token (kept for ImportDomain) and return its public half.
    TransportKey,
    /// Wrap this token's domain key for the token whose transport key this is.
    ExportDomain {
        modulus: Vec<u8>,
        exponent: Vec<u8>,
    },
    ImportDomain {
        wrapped: Vec<u8>,
    },
    /// Finish a domain key whose wrap half exists without its unwrap twin: what a crash (or a
    /// failure) between the two steps of CreateDomain or ImportDomain leaves behind.
    CompleteDomain,
}

/// The state of a token's domain key: both halves present, and its key-check value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainState {
    pub wrap: bool,
    pub unwrap: bool,
    /// The first 8 bytes of the domain key's wrap of an all-zero AES-256 key (deterministic:
    /// AES key wrap has no randomness), present only when both halves agree.
    pub kcv: Option<[u8; 8]>,
}

#[derive(Debug, Serialize, Deserialize)]
enum AdminReply {
    Ready,
    Domain(DomainState),
    Transport { modulus: Vec<u8>, exponent: Vec<u8> },
    Wrapped(Vec<u8>),
}

type AdminResult<T> = Result<T, AdminFailure>;

/// An admin step's failure: the message, and the PKCS#11 return value when there is one, so that
/// a locked SO PIN is told by its code and not by the words.
#[derive(Debug, Serialize, Deserialize)]
struct AdminFailure {
    message: String,
    rv: Option<Ckr>,
}

impl From<String> for AdminFailure {
    fn from(message: String) -> Self {
        AdminFailure { message, rv: None }
    }
}

impl From<&str> for AdminFailure {
    fn from(message: &str) -> Self {
        message.to_string().into()
    }
}

fn ck(what: &str) -> impl Fn(CkError) -> AdminFailure + '_ {
    move |e| AdminFailure {
        rv: match &e {
            CkError::Pkcs11(rv, _) => Some(ckr_of(*rv)),
            _ => None,
        },
        message: format!("{what}: {}", describe(e)),
    }
}

fn oaep() -> Mechanism<'static> {
    // SoftHSM2 accepts only SHA-1 for OAEP wrapping; OAEP's security does not rest on SHA-1's
    // collision resistance.
    Mechanism::RsaPkcsOaep(PkcsOaepParams::new(
        MechanismType::SHA1,
        PkcsMgfType::MGF1_SHA1,
        PkcsOaepSource::empty(),
    ))
}

fn label(s: &str) -> Attribute {
    Attribute::Label(s.as_bytes().to_vec())
}

/// The public, trusted, wrap-only half: nobody can turn on unwrap, copy it with other
/// attributes, or wrap it with anything but a trusted key.
fn domain_wrap_template(unwrapping: bool) -> Vec<Attribute> {
    let mut t = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
    ];
    if !unwrapping {
        t.push(Attribute::ValueLen(32.into()));
    }
    t.extend([
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Trusted(true),
        Attribute::Wrap(true),
        Attribute::Unwrap(false),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
        Attribute::WrapWithTrusted(true),
        label(DOMAIN_WRAP_LABEL),
    ]);
    // SoftHSM2 refuses these two in an unwrap template (CKR_ATTRIBUTE_READ_ONLY); an unwrapped
    // domain key gets them by being copied (see `seal_imported`).
    if !unwrapping {
        t.extend([Attribute::Modifiable(false), Attribute::Copyable(false)]);
    }
    t
}

struct Admin {
    pkcs11: Pkcs11,
    slot: Slot,
    so_pin: SecretString,
    user_pin: SecretString,
    /// The session holding the transport key pair between TransportKey and ImportDomain.
    transport: Option<(Session, ObjectHandle)>,
}

impl Admin {
    fn pkcs11(&self) -> &Pkcs11 {
        &self.pkcs11
    }

    fn open(hello: &AdminHello) -> AdminResult<Admin> {
        let pkcs11 =
            Pkcs11::new(&hello.module).map_err(|e| format!("cannot load {}: {e}", hello.module))?;
        pkcs11
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(ck("initialize"))?;
        let (slot, _) = find_token(&pkcs11, &hello.token_label)
            .map_err(ck("slots"))?
            .ok_or_else(|| format!("no token labelled {:?}", hello.token_label))?;
        Ok(Admin {
            pkcs11,
            slot,
            so_pin: hello.so_pin.clone(),
            user_pin: hello.user_pin.clone(),
            transport: None,
        })
    }

    /// Runs `f` in a fresh session logged in as `who`, then logs out.
    fn as_role<T>(
        &self,
        who: UserType,
        f: impl FnOnce(&Session) -> AdminResult<T>,
    ) -> AdminResult<T> {
        let session = self
            .pkcs11()
            .open_rw_session(self.slot)
            .map_err(ck("open session"))?;
        let pin = if matches!(who, UserType::So) {
            &self.so_pin
        } else {
            &self.user_pin
        };
        session.login(who, Some(pin)).map_err(ck("login"))?;
        let result = f(&session);
        let _ = session.logout();
        result
    }

    /// The object of this label that only the service can have made: a trusted one (only the
    /// SO can set CKA_TRUSTED) or a private one (only a logged-in session can make it). A session
    /// without a login can make public, untrusted objects with any label; they are never found.
    fn find(session: &Session, name: &str) -> AdminResult<Option<ObjectHandle>> {
        let made_by_us = match name {
            DOMAIN_WRAP_LABEL | TWIN_TRANSPORT_TRUSTED | EXPORT_TRANSPORT_TRUSTED => {
                Attribute::Trusted(true)
            }
            _ => Attribute::Private(true),
        };
        Ok(session
            .find_objects(&[label(name), made_by_us])
            .map_err(ck("find"))?
            .first()
            .copied())
    }

    fn state(&self) -> AdminResult<DomainState> {
        self.as_role(UserType::User, |s| {
            let wrap = Self::find(s, DOMAIN_WRAP_LABEL)?;
            let unwrap = Self::find(s, DOMAIN_UNWRAP_LABEL)?;
            let kcv = match (wrap, unwrap) {
                (Some(w), Some(u)) => Some(Self::kcv(s, w, u)?),
                _ => None,
            };
            Ok(DomainState {
                wrap: wrap.is_some(),
                unwrap: unwrap.is_some(),
                kcv,
            })
        })
    }

    /// The key-check value, and proof that the unwrap twin holds the same key: AES key wrap
    /// checks integrity, so the unwrap fails under any other key.
    fn kcv(s: &Session, wrap: ObjectHandle, unwrap: ObjectHandle) -> AdminResult<[u8; 8]> {
        let zero = s
            .create_object(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(false),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
                Attribute::Value(vec![0u8; 32]),
            ])
            .map_err(ck("check key"))?;
        let wrapped = s
            .wrap_key(&Mechanism::AesKeyWrapPad, wrap, zero)
            .map_err(ck("check wrap"))?;
        let _ = s.destroy_object(zero);
        let back = s
            .unwrap_key(
                &Mechanism::AesKeyWrapPad,
                unwrap,
                &wrapped,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::Token(false),
                ],
            )
            .map_err(|_| "the domain key's two halves differ".to_string())?;
        let _ = s.destroy_object(back);
        let mut kcv = [0u8; 8];
        kcv.copy_from_slice(&wrapped[..8]);
        Ok(kcv)
    }

    /// Makes `hsmkms-domain-unwrap` from `hsmkms-domain-wrap` inside this token.
    fn make_twin(&self) -> AdminResult<()> {
        let (modulus, exponent) = self.as_role(UserType::User, |s| {
            // A transport key left by an interrupted earlier try would be found instead of the
            // one made now.
            while let Some(stale) = Self::find(s, TWIN_TRANSPORT)? {
                s.destroy_object(stale)
                    .map_err(ck("remove a stale transport key"))?;
            }
            let (public, _private) = s
                .generate_key_pair(
                    &Mechanism::RsaPkcsKeyPairGen,
                    &[
                        Attribute::Token(false),
                        Attribute::ModulusBits(2048.into()),
                        Attribute::PublicExponent(vec![1, 0, 1]),
                    ],
                    &[
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Unwrap(true),
                        label(TWIN_TRANSPORT),
                    ],
                )
                .map_err(ck("twin transport pair"))?;
            Self::public_half(s, public)
        })?;
        self.as_role(UserType::So, |s| {
            Self::import_trusted(s, TWIN_TRANSPORT_TRUSTED, modulus, exponent)
        })?;
        let made = self.as_role(UserType::User, |s| {
            let trusted =
                Self::find(s, TWIN_TRANSPORT_TRUSTED)?.ok_or("trusted transport key missing")?;
            let wrap = Self::find(s, DOMAIN_WRAP_LABEL)?.ok_or("domain wrap key missing")?;
            let private = Self::find(s, TWIN_TRANSPORT)?.ok_or("twin transport key missing")?;
            let carried = s
                .wrap_key(&oaep(), trusted, wrap)
                .map_err(ck("wrap for the twin"));
            let result = carried.and_then(|carried| {
                s.unwrap_key(
                    &oaep(),
                    private,
                    &carried,
                    &[
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::AES),
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        Attribute::Wrap(false),
                        Attribute::Unwrap(true),
                        Attribute::Encrypt(false),
                        Attribute::Decrypt(false),
                        label(DOMAIN_UNWRAP_LABEL),
                    ],
                )
                .map_err(ck("unwrap the twin"))
            });
            let _ = s.destroy_object(private);
            result.map(|_| ())
        });
        // The trusted transport key has done its work either way.
        self.as_role(UserType::So, |s| {
            if let Some(t) = Self::find(s, TWIN_TRANSPORT_TRUSTED)? {
                s.destroy_object(t).map_err(ck("remove transport key"))?;
            }
            Ok(())
        })?;
        made
    }

    fn public_half(s: &Session, public: ObjectHandle) -> AdminResult<(Vec<u8>, Vec<u8>)> {
        let (mut n, mut e) = (vec![], vec![]);
        for a in s
            .get_attributes(
                public,
                &[AttributeType::Modulus, AttributeType::PublicExponent],
            )
            .map_err(ck("public key"))?
        {
            match a {
                Attribute::Modulus(v) => n = v,
                Attribute::PublicExponent(v) => e = v,
                _ => {}
            }
        }
        Ok((n, e))
    }

    /// The SO makes a received RSA public key a trusted wrapping key of this token.
    fn import_trusted(
        s: &Session,
        name: &str,
        modulus: Vec<u8>,
        exponent: Vec<u8>,
    ) -> AdminResult<()> {
        if let Some(old) = Self::find(s, name)? {
            s.destroy_object(old)
                .map_err(ck("remove stale transport key"))?;
        }
        s.create_object(&[
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::KeyType(KeyType::RSA),
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Trusted(true),
            Attribute::Wrap(true),
            Attribute::Encrypt(false),
            Attribute::Modulus(modulus),
            Attribute::PublicExponent(exponent),
            label(name),
        ])
        .map_err(ck("import trusted transport key"))?;
        Ok(())
    }

    /// Setting up a domain key takes two steps (the trusted wrap half, then its unwrap twin
    /// made from it inside this token), so a crash can leave the first without the second. The
    /// twin is made from the wrap half alone: the next connect finishes the job.
    fn complete_domain(&self) -> AdminResult<DomainState> {
        let state = self.state()?;
        if state.wrap && !state.unwrap {
            self.make_twin()?;
            return self.state();
        }
        Ok(state)
    }

    fn create_domain(&self) -> AdminResult<DomainState> {
        let state = self.state()?;
        if state.wrap || state.unwrap {
            return Err("this token already holds a domain key".into());
        }
        self.as_role(UserType::So, |s| {
            s.generate_key(&Mechanism::AesKeyGen, &domain_wrap_template(false))
                .map_err(ck("generate domain key"))?;
            Ok(())
        })?;
        self.make_twin()?;
        self.state()
    }

    /// Makes an unwrapped domain key unchangeable: copied with CKA_MODIFIABLE and CKA_COPYABLE
    /// false (the one way to set them after creation), and the modifiable original destroyed.
    /// Otherwise a session with no login could turn on CKA_UNWRAP of this public key.
    fn seal_imported(s: &Session, imported: ObjectHandle) -> AdminResult<()> {
        let copy = s.copy_object(imported, &[Attribute::Modifiable(false)]);
        let copy = copy.map_err(ck("seal the domain key"));
        if copy.is_err() {
            let _ = s.destroy_object(imported);
        }
        copy?;
        s.destroy_object(imported)
            .map_err(ck("remove the unsealed domain key"))
    }

    fn transport_key(&mut self) -> AdminResult<(Vec<u8>, Vec<u8>)> {
        // Public session objects made by the SO: they outlive the SO's logout (only private
        // session objects do not) and vanish with the session, which only this process can use.
        let session = self
            .pkcs11()
            .open_rw_session(self.slot)
            .map_err(ck("open session"))?;
        session
            .login(UserType::So, Some(&self.so_pin))
            .map_err(ck("login"))?;
        let pair = session.generate_key_pair(
            &Mechanism::RsaPkcsKeyPairGen,
            &[
                Attribute::Token(false),
                Attribute::ModulusBits(2048.into()),
                Attribute::PublicExponent(vec![1, 0, 1]),
            ],
            &[
                Attribute::Token(false),
                Attribute::Private(false),
                Attribute::Sensitive(true),
                Attribute::Unwrap(true),
            ],
        );
        let result = pair
            .map_err(ck("transport pair"))
            .and_then(|(public, private)| {
                let half = Self::public_half(&session, public)?;
                Ok((half, private))
            });
        let _ = session.logout();
        let (half, private) = result?;
        self.transport = Some((session, private));
        Ok(half)
    }

    fn export_domain(&self, modulus: Vec<u8>, exponent: Vec<u8>) -> AdminResult<Vec<u8>> {
        self.as_role(UserType::So, |s| {
            Self::import_trusted(s, EXPORT_TRANSPORT_TRUSTED, modulus, exponent)
        })?;
        let wrapped = self.as_role(UserType::User, |s| {
            let trusted =
                Self::find(s, EXPORT_TRANSPORT_TRUSTED)?.ok_or("trusted transport key missing")?;
            let wrap = Self::find(s, DOMAIN_WRAP_LABEL)?.ok_or("this token holds no domain key")?;
            s.wrap_key(&oaep(), trusted, wrap)
                .map_err(ck("wrap the domain key"))
        });
        self.as_role(UserType::So, |s| {
            if let Some(t) = Self::find(s, EXPORT_TRANSPORT_TRUSTED)? {
                s.destroy_object(t).map_err(ck("remove transport key"))?;
            }
            Ok(())
        })?;
        wrapped
    }

    fn import_domain(&mut self, wrapped: &[u8]) -> AdminResult<DomainState> {
        let state = self.state()?;
        if state.wrap || state.unwrap {
            return Err("this token already holds a domain key".into());
        }
        let (session, private) = self
            .transport
            .take()
            .ok_or("no transport key: ask for one first")?;
        session
            .login(UserType::So, Some(&self.so_pin))
            .map_err(ck("login"))?;
        let unwrapped = session
            .unwrap_key(&oaep(), private, wrapped, &domain_wrap_template(true))
            .map_err(ck("unwrap the domain key"))
            .and_then(|h| Self::seal_imported(&session, h));
        let _ = session.logout();
        drop(session);
        unwrapped?;
        self.make_twin()?;
        self.state()
    }

    fn handle(&mut self, request: AdminRequest) -> AdminResult<AdminReply> {
        match request {
            AdminRequest::DomainState => self.state().map(AdminReply::Domain),
            AdminRequest::CreateDomain => self.create_domain().map(AdminReply::Domain),
            AdminRequest::TransportKey => self
                .transport_key()
                .map(|(modulus, exponent)| AdminReply::Transport { modulus, exponent }),
            AdminRequest::ExportDomain { modulus, exponent } => self
                .export_domain(modulus, exponent)
                .map(AdminReply::Wrapped),
            AdminRequest::CompleteDomain => self.complete_domain().map(AdminReply::Domain),
            AdminRequest::ImportDomain { wrapped } => {
                self.import_domain(&wrapped).map(AdminReply::Domain)
            }
        }
    }
}

/// Entry point of an admin process (`worker admin`): serves stdin/stdout until closed.
pub fn run() -> std::io::Result<()> {
    let mut input = BufReader::new(std::io::stdin().lock());
    let mut output = BufWriter::new(std::io::stdout().lock());
    let hello: AdminHello = read_frame(&mut input)?;
    let mut admin = match Admin::open(&hello) {
        Ok(a) => a,
        Err(e) => return write_frame(&mut output, &AdminResult::<AdminReply>::Err(e)),
    };
    drop(hello);
    write_frame(&mut output, &AdminResult::Ok(AdminReply::Ready))?;
    loop {
        let request: AdminRequest = match read_frame(&mut input) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        write_frame(&mut output, &admin.handle(request))?;
    }
}

/// One token's admin process, from the service side.
pub struct AdminProcess {
    label: String,
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::process::ChildStdout,
}

impl AdminProcess {
    pub async fn start(
        token: &TokenConfig,
        so_pin: &SecretString,
        command: &WorkerCommand,
    ) -> Result<AdminProcess, HsmError> {
        let fail = |message: String| HsmError::Other {
            token: token.label.clone(),
            message,
        };
        let mut child = tokio::process::Command::new(&command.program)
            .args(&command.args)
            .arg("admin")
            .envs(token.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| fail(format!("cannot start the admin process: {e}")))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let mut admin = AdminProcess {
            label: token.label.clone(),
            child,
            stdin,
            stdout,
        };
        let hello = AdminHello {
            module: token.module.to_string_lossy().into_owned(),
            token_label: token.label.clone(),
            so_pin: so_pin.clone(),
            user_pin: token.pin.clone(),
        };
        match admin.exchange(&hello).await? {
            AdminReply::Ready => Ok(admin),
            other => Err(fail(format!("unexpected answer {other:?}"))),
        }
    }

    async fn exchange<T: Serialize>(&mut self, message: &T) -> Result<AdminReply, HsmError> {
        let fail = |message: String| HsmError::Other {
            token: self.label.clone(),
            message,
        };
        let frame = encode_frame(message).map_err(|e| fail(e.to_string()))?;
        self.stdin
            .write_all(&frame)
            .await
            .map_err(|e| fail(format!("admin process: {e}")))?;
        let len = self
            .stdout
            .read_u32_le()
            .await
            .map_err(|e| fail(format!("admin process: {e}")))? as usize;
        if len > MAX_FRAME {
            return Err(fail("admin frame too large".into()));
        }
        let mut body = vec![0u8; len];
        self.stdout
            .read_exact(&mut body)
            .await
            .map_err(|e| fail(format!("admin process: {e}")))?;
        let answer: AdminResult<AdminReply> =
            decode_body(&body).map_err(|e| fail(e.to_string()))?;
        // A refused SO or user PIN keeps its code (the store reports USER_LOCKED_OUT or
        // INVALID_CREDENTIALS by it); other failures are internal.
        answer.map_err(|f| match f.rv {
            Some(rv) if rv.is_pin_failure() => HsmError::TokenUnavailable {
                token: self.label.clone(),
                reason: f.message,
                rv: Some(rv),
                cause: None,
            },
            _ => fail(f.message),
        })
    }

    pub async fn domain_state(&mut self) -> Result<DomainState, HsmError> {
        match self.exchange(&AdminRequest::DomainState).await? {
            AdminReply::Domain(d) => Ok(d),
            other => Err(HsmError::Other {
                token: self.label.clone(),
                message: format!("unexpected {other:?}"),
            }),
        }
    }

    async fn domain_reply(&mut self, request: AdminRequest) -> Result<DomainState, HsmError> {
        match self.exchange(&request).await? {
            AdminReply::Domain(d) => Ok(d),
            other => Err(HsmError::Other {
                token: self.label.clone(),
                message: format!("unexpected {other:?}"),
            }),
        }
    }

    pub async fn stop(mut self) {
        drop(self.stdin);
        let _ = self.child.wait().await;
    }
}

/// A token of a cluster with its SO PIN, for setting up the domain key.
pub struct AdminTarget {
    pub token: TokenConfig,
    pub so_pin: SecretString,
}

/// Makes sure every token holds the same domain key: the first token that has one carries it to
/// each token that has none. Idempotent. Returns the key-check value all tokens agree on. A
/// token holding a different domain key is an error: it belongs to another cluster.
///
/// When no reachable token has a domain key, the first makes one only if `may_create`: a
/// cluster that holds keys must never get a second domain key because the tokens with the
/// first are away.
pub async fn establish_domain(
    targets: &[AdminTarget],
    command: &WorkerCommand,
    may_create: bool,
) -> Result<[u8; 8], HsmError> {
    let mut admins = Vec::new();
    let mut unreachable = None;
    for t in targets {
        // A token that cannot be reached now is left out: it gets the domain key at a later
        // start, and meanwhile the cluster serves without it.
        match AdminProcess::start(&t.token, &t.so_pin, command).await {
            Ok(a) => admins.push(a),
            Err(e) => {
                tracing::warn!(token = %t.token.label, error = %e, "token unreachable: domain key not checked");
                unreachable = Some(e);
            }
        }
    }
    if admins.is_empty() {
        return Err(unreachable.unwrap_or(HsmError::Other {
            token: String::new(),
            message: "no tokens".into(),
        }));
    }
    let mut states = Vec::new();
    for a in &mut admins {
        let mut state = a.domain_state().await?;
        if state.wrap && !state.unwrap {
            tracing::warn!(token = %a.label, "finishing a domain key that an interrupted set-up left half made");
            state = a.domain_reply(AdminRequest::CompleteDomain).await?;
        }
        states.push(state);
    }
    let source = match states.iter().position(|s| s.kcv.is_some()) {
        Some(i) => i,
        // Only when every token answered: one that is away may hold the domain key.
        None if may_create && unreachable.is_none() => {
            states[0] = admins[0].domain_reply(AdminRequest::CreateDomain).await?;
            0
        }
        None => {
            let labels: Vec<String> = admins.iter().map(|a| a.label.clone()).collect();
            for a in admins {
                a.stop().await;
            }
            return Err(HsmError::ClusterUnavailable {
                cluster: format!(
                    "(no reachable token holds the domain key; reachable: {})",
                    labels.join(", ")
                ),
            });
        }
    };
    let kcv = states[source]
        .kcv
        .expect("the source holds a complete domain key");
    for i in 0..admins.len() {
        if i == source {
            continue;
        }
        match states[i].kcv {
            Some(k) if k == kcv => continue,
            Some(_) => {
                return Err(HsmError::Other {
                    token: admins[i].label.clone(),
                    message: "this token holds another cluster's domain key".into(),
                })
            }
            None if states[i].wrap || states[i].unwrap => {
                return Err(HsmError::Other {
                    token: admins[i].label.clone(),
                    message: "this token holds the unwrap half of a domain key without its wrap half; remove it and try again".into(),
                })
            }
            None => {}
        }
        let (modulus, exponent) = match admins[i].exchange(&AdminRequest::TransportKey).await? {
            AdminReply::Transport { modulus, exponent } => (modulus, exponent),
            other => {
                return Err(HsmError::Other {
                    token: admins[i].label.clone(),
                    message: format!("unexpected {other:?}"),
                })
            }
        };
        let wrapped = match admins[source]
            .exchange(&AdminRequest::ExportDomain { modulus, exponent })
            .await?
        {
            AdminReply::Wrapped(w) => w,
            other => {
                return Err(HsmError::Other {
                    token: admins[source].label.clone(),
                    message: format!("unexpected {other:?}"),
                })
            }
        };
        let state = admins[i]
            .domain_reply(AdminRequest::ImportDomain { wrapped })
            .await?;
        if state.kcv != Some(kcv) {
            return Err(HsmError::Other {
                token: admins[i].label.clone(),
                message: "key-check values differ after import".into(),
            });
        }
        tracing::info!(token = %admins[i].label, "domain key carried to the token");
    }
    for a in admins {
        a.stop().await;
    }
    Ok(kcv)
}
