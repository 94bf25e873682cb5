//! What a session that never logs in can do with a store's token: the attacker of the token
//! directory without a PIN (docs/security.md).

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::ekdf::AesCbcDeriveParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use keystore::ciphertext::CiphertextBlob;
use keystore::config::Config;
use keystore::context::EncryptionContext;

/// The attacker's chosen key value.
pub const CHOSEN: [u8; 32] = [0x42; 32];

/// A session on the store's token that has not logged in: what file access alone gives.
pub struct Attacker {
    pub session: Session,
    _pkcs11: Pkcs11,
}

impl Attacker {
    pub fn open(config: &Config) -> Attacker {
        let token = &config.key_store.as_ref().unwrap().tokens[0];
        for (k, v) in &token.env {
            std::env::set_var(k, v);
        }
        let pkcs11 = Pkcs11::new(&token.module).unwrap();
        pkcs11
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .unwrap();
        let slot = pkcs11
            .get_slots_with_token()
            .unwrap()
            .into_iter()
            .find(|s| pkcs11.get_token_info(*s).unwrap().label().trim_end() == token.label)
            .unwrap();
        let session = pkcs11.open_rw_session(slot).unwrap();
        Attacker {
            session,
            _pkcs11: pkcs11,
        }
    }

    pub fn find(&self, label: &str) -> Vec<ObjectHandle> {
        self.session
            .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
            .unwrap()
    }

    /// An AES session key of a value the attacker knows.
    pub fn known_key(&self, value: &[u8]) -> ObjectHandle {
        self.session
            .create_object(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(false),
                // A session that has not logged in may only make public objects.
                Attribute::Private(false),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
                Attribute::Derive(true),
                Attribute::Value(value.to_vec()),
            ])
            .unwrap()
    }

    /// The domain key's AES key wrap (with padding) of a value, made without a PIN.
    pub fn domain_wrap(&self, value: &[u8]) -> Vec<u8> {
        let wrap = *self
            .find("hsmkms-domain-wrap")
            .first()
            .expect("the domain key's wrap half is visible without a login");
        let key = self.known_key(value);
        let wrapped = self
            .session
            .wrap_key(&Mechanism::AesKeyWrapPad, wrap, key)
            .unwrap();
        self.session.destroy_object(key).unwrap();
        wrapped
    }

    /// Decrypts a ciphertext made under the planted key, knowing only the chosen value.
    pub fn decrypt_offline(&self, blob: &[u8]) -> Vec<u8> {
        let parsed = CiphertextBlob::decode(blob).unwrap();
        let root = self.known_key(&CHOSEN);
        let derived = self
            .session
            .derive_key(
                &Mechanism::AesCbcEncryptData(AesCbcDeriveParams::new([0u8; 16], &parsed.sealed.r)),
                root,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(32.into()),
                    Attribute::Token(false),
                    Attribute::Private(false),
                    Attribute::Decrypt(true),
                ],
            )
            .unwrap();
        let aad = CiphertextBlob::aad(
            &parsed.key_id,
            parsed.sealed.kdf,
            &EncryptionContext::new(None).unwrap(),
        );
        let mut iv = parsed.sealed.iv;
        let params = GcmParams::new(&mut iv, &aad, 128.into()).unwrap();
        self.session
            .decrypt(
                &Mechanism::AesGcm(params),
                derived,
                &parsed.sealed.ciphertext,
            )
            .unwrap()
    }
}
