//! What SoftHSM2 2.6.1 does with CKA_TRUSTED and CKA_WRAP_WITH_TRUSTED: the facts the cluster
//! design (a domain key shared by the tokens, docs/clusters.md) rests on, checked on every run so
//! that a SoftHSM2 upgrade that changes them is noticed.
//!
//! In short: only the SO can make a trusted key, the SO can make only public objects, and a
//! public key with CKA_UNWRAP can be used *without logging in* to unwrap a wrapped KMS key into a
//! readable object. So the domain key is split: a public, trusted, wrap-only, immutable object
//! to wrap with, and a private, unwrap-only copy of the same value to unwrap with, made through
//! RSA-OAEP (SHA-1: the only OAEP hash SoftHSM2 accepts for wrapping).

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use secrecy::SecretString;

fn rv<T>(r: Result<T, Error>) -> Option<RvError> {
    match r {
        Ok(_) => None,
        Err(Error::Pkcs11(rv, _)) => Some(rv),
        Err(e) => panic!("{e}"),
    }
}

fn aes_template(extra: &[Attribute]) -> Vec<Attribute> {
    let mut t = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Token(true),
    ];
    t.extend_from_slice(extra);
    t
}

/// An unwrap template: the value's length comes from the wrapped data.
fn unwrap_template(extra: &[Attribute]) -> Vec<Attribute> {
    let mut t = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
    ];
    t.extend_from_slice(extra);
    t
}

fn oaep_sha1() -> Mechanism<'static> {
    Mechanism::RsaPkcsOaep(PkcsOaepParams::new(
        MechanismType::SHA1,
        PkcsMgfType::MGF1_SHA1,
        PkcsOaepSource::empty(),
    ))
}

fn oaep_sha256() -> Mechanism<'static> {
    Mechanism::RsaPkcsOaep(PkcsOaepParams::new(
        MechanismType::SHA256,
        PkcsMgfType::MGF1_SHA256,
        PkcsOaepSource::empty(),
    ))
}

struct Tokens {
    _dir: tempfile::TempDir,
    pkcs11: Pkcs11,
    so: SecretString,
    user: SecretString,
}

impl Tokens {
    fn new() -> Tokens {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\n",
                tokens.display()
            ),
        )
        .unwrap();
        // One test in this file, so its process: setting the variable before loading is safe.
        std::env::set_var("SOFTHSM2_CONF", &conf);
        let pkcs11 = Pkcs11::new("/usr/lib/softhsm/libsofthsm2.so").unwrap();
        pkcs11
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .unwrap();
        Tokens {
            _dir: dir,
            pkcs11,
            so: SecretString::from("so-pin-0"),
            user: SecretString::from("user-pin-0"),
        }
    }

    fn init(&self, label: &str) -> Slot {
        let p = &self.pkcs11;
        let free = p
            .get_slots_with_token()
            .unwrap()
            .into_iter()
            .find(|s| !p.get_token_info(*s).unwrap().token_initialized())
            .unwrap();
        p.init_token(free, &self.so, label).unwrap();
        let slot = p
            .get_slots_with_token()
            .unwrap()
            .into_iter()
            .find(|s| p.get_token_info(*s).unwrap().label().trim_end() == label)
            .unwrap();
        let s = p.open_rw_session(slot).unwrap();
        s.login(UserType::So, Some(&self.so)).unwrap();
        s.init_pin(&self.user).unwrap();
        s.logout().unwrap();
        slot
    }

    fn session(&self, slot: Slot, who: Option<UserType>) -> Session {
        let s = self.pkcs11.open_rw_session(slot).unwrap();
        match who {
            Some(UserType::So) => s.login(UserType::So, Some(&self.so)).unwrap(),
            Some(u) => s.login(u, Some(&self.user)).unwrap(),
            None => {}
        }
        s
    }
}

fn find(s: &Session, label: &[u8]) -> Option<ObjectHandle> {
    s.find_objects(&[Attribute::Label(label.to_vec())])
        .unwrap()
        .first()
        .copied()
}

/// An RSA transport pair made by the user (private half: private, sensitive, unwrap-only), and
/// its public half imported by the SO as a trusted wrapping key.
fn trusted_transport(t: &Tokens, slot: Slot, label: &[u8]) {
    let user = t.session(slot, Some(UserType::User));
    let (public, _private) = user
        .generate_key_pair(
            &Mechanism::RsaPkcsKeyPairGen,
            &[
                Attribute::Token(true),
                Attribute::ModulusBits(2048.into()),
                Attribute::PublicExponent(vec![1, 0, 1]),
            ],
            &[
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Unwrap(true),
                Attribute::Label(label.to_vec()),
            ],
        )
        .unwrap();
    let mut n = vec![];
    let mut e = vec![];
    for a in user
        .get_attributes(
            public,
            &[AttributeType::Modulus, AttributeType::PublicExponent],
        )
        .unwrap()
    {
        match a {
            Attribute::Modulus(v) => n = v,
            Attribute::PublicExponent(v) => e = v,
            _ => {}
        }
    }
    user.destroy_object(public).unwrap();
    drop(user);
    let so = t.session(slot, Some(UserType::So));
    let mut trusted_label = label.to_vec();
    trusted_label.extend_from_slice(b"-trusted");
    so.create_object(&[
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::KeyType(KeyType::RSA),
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Trusted(true),
        Attribute::Wrap(true),
        Attribute::Modulus(n),
        Attribute::PublicExponent(e),
        Attribute::Label(trusted_label),
    ])
    .unwrap();
}

#[test]
fn softhsm_trust_model_supports_a_split_domain_key() {
    let t = Tokens::new();
    let a = t.init("a");

    // Only the SO makes trusted keys, and the SO makes only public objects.
    let so = t.session(a, Some(UserType::So));
    let private_by_so = so.generate_key(
        &Mechanism::AesKeyGen,
        &aes_template(&[Attribute::Private(true), Attribute::Trusted(true)]),
    );
    assert_eq!(rv(private_by_so), Some(RvError::UserNotLoggedIn));
    let wrap_only = aes_template(&[
        Attribute::Private(false),
        Attribute::Trusted(true),
        Attribute::Wrap(true),
        Attribute::Unwrap(false),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
        Attribute::WrapWithTrusted(true),
        Attribute::Modifiable(false),
        Attribute::Copyable(false),
        Attribute::Label(b"domain-wrap".to_vec()),
    ]);
    so.generate_key(&Mechanism::AesKeyGen, &wrap_only).unwrap();
    let naive = aes_template(&[
        Attribute::Private(false),
        Attribute::Trusted(true),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::Sensitive(true),
        Attribute::Label(b"naive-domain".to_vec()),
    ]);
    so.generate_key(&Mechanism::AesKeyGen, &naive).unwrap();
    drop(so);
    let user = t.session(a, Some(UserType::User));
    let by_user = user.generate_key(
        &Mechanism::AesKeyGen,
        &aes_template(&[Attribute::Private(true), Attribute::Trusted(true)]),
    );
    assert_eq!(rv(by_user), Some(RvError::AttributeReadOnly));

    // A KMS key (CKA_WRAP_WITH_TRUSTED) wraps only under a trusted key.
    let kms_key = user
        .generate_key(
            &Mechanism::AesKeyGen,
            &aes_template(&[
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(true),
                Attribute::WrapWithTrusted(true),
                Attribute::Derive(true),
            ]),
        )
        .unwrap();
    let untrusted = user
        .generate_key(
            &Mechanism::AesKeyGen,
            &aes_template(&[
                Attribute::Token(false),
                Attribute::Private(true),
                Attribute::Wrap(true),
            ]),
        )
        .unwrap();
    assert_eq!(
        rv(user.wrap_key(&Mechanism::AesKeyWrapPad, untrusted, kms_key)),
        Some(RvError::KeyNotWrappable)
    );
    let naive_domain = find(&user, b"naive-domain").unwrap();
    let wrapped = user
        .wrap_key(&Mechanism::AesKeyWrapPad, naive_domain, kms_key)
        .unwrap();

    // The hazard: with a public domain key that may unwrap, a session with no login turns a
    // wrapped KMS key into a readable one.
    let anonymous = t.session(a, None);
    let readable = anonymous
        .unwrap_key(
            &Mechanism::AesKeyWrapPad,
            find(&anonymous, b"naive-domain").unwrap(),
            &wrapped,
            &unwrap_template(&[
                Attribute::Token(false),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
            ]),
        )
        .unwrap();
    let value = anonymous
        .get_attributes(readable, &[AttributeType::Value])
        .unwrap();
    assert!(
        matches!(value.first(), Some(Attribute::Value(v)) if v.len() == 32),
        "the hazard is real"
    );

    // The split: the wrap-only public key cannot unwrap, in any session, and cannot be changed.
    let domain_wrap = find(&anonymous, b"domain-wrap").unwrap();
    let wrapped = user
        .wrap_key(
            &Mechanism::AesKeyWrapPad,
            find(&user, b"domain-wrap").unwrap(),
            kms_key,
        )
        .unwrap();
    let tries = anonymous.unwrap_key(
        &Mechanism::AesKeyWrapPad,
        domain_wrap,
        &wrapped,
        &unwrap_template(&[Attribute::Token(false)]),
    );
    assert!(rv(tries).is_some(), "a wrap-only key must not unwrap");
    assert!(rv(anonymous.update_attributes(domain_wrap, &[Attribute::Unwrap(true)])).is_some());
    assert!(rv(user.update_attributes(domain_wrap, &[Attribute::Unwrap(true)])).is_some());
    drop(anonymous);

    // Its private, unwrap-only twin is made through a trusted RSA-OAEP transport key; SoftHSM2
    // accepts only SHA-1 for OAEP wrapping.
    drop(user);
    trusted_transport(&t, a, b"transport-a");
    let user = t.session(a, Some(UserType::User));
    // Handles of private objects do not outlive the login that found them: look it up again.
    let transport = find(&user, b"transport-a").unwrap();
    let trusted_rsa = find(&user, b"transport-a-trusted").unwrap();
    let domain_wrap = find(&user, b"domain-wrap").unwrap();
    assert_eq!(
        rv(user.wrap_key(&oaep_sha256(), trusted_rsa, domain_wrap)),
        Some(RvError::ArgumentsBad)
    );
    let carried = user
        .wrap_key(&oaep_sha1(), trusted_rsa, domain_wrap)
        .unwrap();
    let domain_unwrap = user
        .unwrap_key(
            &oaep_sha1(),
            transport,
            &carried,
            &unwrap_template(&[
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Wrap(false),
                Attribute::Unwrap(true),
                Attribute::Label(b"domain-unwrap".to_vec()),
            ]),
        )
        .unwrap();
    // Wrap with the public half, unwrap with the private twin. AES key wrap checks integrity,
    // so this succeeds only if the twin holds the same key.
    let copy = user
        .unwrap_key(
            &Mechanism::AesKeyWrapPad,
            domain_unwrap,
            &wrapped,
            &unwrap_template(&[
                Attribute::Token(false),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Derive(true),
            ]),
        )
        .unwrap();
    let shown = user.get_attributes(copy, &[AttributeType::Value]).unwrap();
    assert!(
        shown.iter().all(|a| !matches!(a, Attribute::Value(_))),
        "an unwrapped KMS key stays sensitive"
    );
    drop(user);
    let anonymous = t.session(a, None);
    assert!(
        find(&anonymous, b"domain-unwrap").is_none(),
        "the unwrap twin is invisible without login"
    );

    drop(anonymous);

    // On a receiving token the domain key arrives by unwrap, where SoftHSM2 refuses
    // CKA_MODIFIABLE and CKA_COPYABLE in the template; a copy made with CKA_MODIFIABLE false
    // (the original destroyed) is the sealed key. It must resist a session with no login too.
    let so = t.session(a, Some(UserType::So));
    let pair = so
        .generate_key_pair(
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
        )
        .unwrap();
    let (public, private) = pair;
    let carried = so.wrap_key(&oaep_sha1(), public, find(&so, b"domain-wrap").unwrap());
    // The SO's own transport key is not trusted: the domain key refuses to be wrapped by it.
    assert_eq!(rv(carried), Some(RvError::KeyNotWrappable));
    drop(so);
    let user = t.session(a, Some(UserType::User));
    let trusted_rsa = find(&user, b"transport-a-trusted").unwrap();
    let carried = user
        .wrap_key(
            &oaep_sha1(),
            trusted_rsa,
            find(&user, b"domain-wrap").unwrap(),
        )
        .unwrap();
    let transport = find(&user, b"transport-a").unwrap();
    drop(user);
    let so = t.session(a, Some(UserType::So));
    let _ = (public, private);
    let mut template = unwrap_template(&[
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Trusted(true),
        Attribute::Wrap(true),
        Attribute::Unwrap(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
        Attribute::WrapWithTrusted(true),
        Attribute::Label(b"imported-wrap".to_vec()),
    ]);
    let with_modifiable = {
        let mut t2 = template.clone();
        t2.push(Attribute::Modifiable(false));
        t2
    };
    // The SO cannot use the user's private transport key; the real flow uses an SO-made public
    // session pair (hsm::admin). Here the user's handle is stale under the SO: expect refusal.
    assert!(rv(so.unwrap_key(&oaep_sha1(), transport, &carried, &with_modifiable)).is_some());
    drop(so);
    let user = t.session(a, Some(UserType::User));
    let transport = find(&user, b"transport-a").unwrap();
    template.retain(|a| !matches!(a, Attribute::Trusted(_)));
    let imported = user
        .unwrap_key(&oaep_sha1(), transport, &carried, &template)
        .unwrap();
    let sealed = user
        .copy_object(imported, &[Attribute::Modifiable(false)])
        .unwrap();
    user.destroy_object(imported).unwrap();
    assert!(rv(user.copy_object(
        sealed,
        &[Attribute::Modifiable(false), Attribute::Copyable(false)]
    ))
    .is_some());
    drop(user);
    let anonymous = t.session(a, None);
    let sealed = find(&anonymous, b"imported-wrap").unwrap();
    assert!(
        rv(anonymous.update_attributes(sealed, &[Attribute::Unwrap(true)])).is_some(),
        "sealed: no changes"
    );
    let copied = anonymous.copy_object(sealed, &[Attribute::Unwrap(true), Attribute::Token(false)]);
    assert!(rv(copied).is_some(), "sealed: no copy that may unwrap");
}
