//! Objects planted in a store's token by a session that never logged in: with the token
//! directory but no PIN, an attacker can make public token objects with any label and id. The
//! service must never take one for a KMS key, the domain key or the backup MAC key.
//!
//! One test per binary touches the token from this process (SOFTHSM2_CONF is process-wide).

mod support;

use std::sync::Arc;

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use keystore::app::Parts;
use keystore::clock::ManualClock;
use keystore::config::Config;
use keystore::wire::*;
use sha2::{Digest, Sha256};
use support::attacker::{Attacker, CHOSEN};
use support::worker;
use zeroize::Zeroizing;

async fn build(config: &Config) -> Parts {
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    keystore::app::build(config, clock, worker()).await.unwrap()
}

async fn encrypt(parts: &Parts, key_id: &str) -> Vec<u8> {
    parts
        .service
        .encrypt(EncryptRequest {
            key_id: key_id.into(),
            plaintext: SecretBlob(Zeroizing::new(b"a secret of the service".to_vec())),
            encryption_context: None,
            encryption_algorithm: None,
            grant_tokens: None,
            dry_run: None,
        })
        .await
        .unwrap()
        .ciphertext_blob
        .0
}

#[tokio::test]
async fn public_objects_planted_without_a_pin_are_never_used() {
    let dir = tempfile::tempdir().unwrap();
    let path = keystore::dev::prepare(dir.path(), &worker()).unwrap();
    let config = Config::load(&path).unwrap();
    let parts = build(&config).await;
    let key = parts
        .service
        .create_key(CreateKeyRequest::default())
        .await
        .unwrap()
        .key_metadata
        .key_id;
    let key_id = keystore::ids::KeyId::parse(&key).unwrap();
    drop(parts);

    let attacker = Attacker::open(&config);
    let public_token_key = |class_type: KeyType, id: Vec<u8>, label: &str| {
        attacker
            .session
            .create_object(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(class_type),
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
                Attribute::Derive(true),
                Attribute::Sign(true),
                Attribute::Verify(true),
                Attribute::Wrap(true),
                Attribute::Id(id),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Value(CHOSEN.to_vec()),
            ])
            .unwrap()
    };
    // A twin of the KMS key, of a value the attacker knows.
    public_token_key(KeyType::AES, key_id.bytes().to_vec(), &key);
    // A backup MAC key with the lowest id there is.
    public_token_key(KeyType::GENERIC_SECRET, vec![0; 8], "hsmkms-backup-mac");
    // A domain wrap key of a known value (it cannot be made trusted without the SO PIN).
    public_token_key(KeyType::AES, vec![], "hsmkms-domain-wrap");

    // Fresh workers, fresh handle caches: each looks the objects up in the token.
    let parts = build(&config).await;
    for _ in 0..8 {
        let blob = encrypt(&parts, &key).await;
        let derive = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            attacker.decrypt_offline(&blob)
        }));
        assert!(
            derive.is_err(),
            "the service encrypted under the planted twin: the attacker read {:?}",
            derive.map(|p| String::from_utf8_lossy(&p).into_owned())
        );
    }
    let listed = parts
        .service
        .list_keys(ListRequest::default())
        .await
        .unwrap();
    assert_eq!(listed.keys.len(), 1, "the twin is not listed as a key");

    // Backups use the store's own MAC key, never the planted one.
    let store = parts.service.default_key_store().unwrap();
    let backup = keystore::backup::create(&parts, &store)
        .await
        .unwrap()
        .bytes;
    let text = String::from_utf8(backup).unwrap();
    let trailer = text.trim_end().rsplit_once('\n').unwrap().1.to_string();
    assert!(
        !trailer.contains(" 0000000000000000 "),
        "the planted MAC key made the backup's tag: {trailer}"
    );
    // A backup forged with the planted MAC key (whose value the attacker knows) is refused.
    let body = format!("{}\n", text.trim_end().rsplit_once('\n').unwrap().0);
    let mut message = b"hsmkms-backup-2\0".to_vec();
    message.extend_from_slice(&[0; 8]);
    message.extend_from_slice(&Sha256::digest(body.as_bytes()));
    let planted_mac = attacker
        .find("hsmkms-backup-mac")
        .into_iter()
        .next()
        .expect("the planted key is visible to its maker");
    let tag = attacker
        .session
        .sign(&Mechanism::Sha256Hmac, planted_mac, &message)
        .unwrap();
    let forged = format!(
        "{body}hsmkms-backup-mac v2 0000000000000000 {}\n",
        hex::encode(tag)
    );
    let refused = keystore::backup::verify(&store, forged.as_bytes()).await;
    assert!(
        refused.is_err(),
        "a backup tagged by the planted MAC key verified"
    );
}
