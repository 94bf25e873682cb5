//! The backup forgery, performed as an attacker would: with the token directory but no PIN.
//!
//! The domain key's wrap half is a public token object (SoftHSM2 wants trusted keys public), so
//! a session that never logs in can use it. Such an attacker makes an AES key of a value they
//! chose, wraps it with `hsmkms-domain-wrap`, adds it to a real backup and re-tags the file the
//! way the first backup format did (the domain key's wrap of a digest). If a restore accepted
//! that, the planted key would serve Encrypt and the attacker could read every ciphertext made
//! under it. These tests must see every such file refused and nothing planted.
//!
//! One test per binary touches the token from this process (SOFTHSM2_CONF is process-wide).

mod support;

use std::path::PathBuf;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use keystore::app::Parts;
use keystore::clock::ManualClock;
use keystore::config::Config;
use keystore::ids::KeyId;
use keystore::wire::*;
use serde::Serialize;
use sha2::{Digest, Sha256};
use support::attacker::{Attacker, CHOSEN};
use support::worker;
use zeroize::Zeroizing;

/// The first backup format (`hsmkms-backup-1`), field for field, as a forger rebuilds it: its
/// tag was the domain key's wrap of the SHA-256 of this JSON with `tag` empty.
#[derive(Serialize, serde::Deserialize, Clone)]
struct FormatOne {
    format: String,
    created_ms: i64,
    key_store_id: String,
    cluster_id: String,
    domain_kcv: String,
    keys: Vec<FormatOneKey>,
    aliases: Vec<serde_json::Value>,
    tag: String,
}

#[derive(Serialize, serde::Deserialize, Clone)]
struct FormatOneKey {
    key_id: String,
    created_ms: i64,
    description: String,
    state: String,
    deletion_ms: Option<i64>,
    pending_window_days: Option<u32>,
    tags: std::collections::BTreeMap<String, String>,
    wrapped: String,
}

async fn store() -> (tempfile::TempDir, Config, Parts) {
    let dir = tempfile::tempdir().unwrap();
    let path = keystore::dev::prepare(dir.path(), &worker()).unwrap();
    let config = Config::load(&path).unwrap();
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    let parts = keystore::app::build(&config, clock, worker())
        .await
        .unwrap();
    (dir, config, parts)
}

/// A backup file of the default store, as `hsmkms backup create` writes it.
async fn backup_file(parts: &Parts, dir: &std::path::Path) -> Vec<u8> {
    let out: PathBuf = dir.join("real.backup");
    let store = parts.service.default_key_store().unwrap();
    keystore::backup::create_file(parts, &store, &out)
        .await
        .unwrap();
    std::fs::read(out).unwrap()
}

/// Restores `bytes` and, if that was accepted, proves what the attacker then has.
async fn restore_is_refused(parts: &Parts, attacker: &Attacker, bytes: &[u8], planted: KeyId) {
    let store = parts.service.default_key_store().unwrap();
    let verified = keystore::backup::verify(&store, bytes).await;
    let restored = keystore::backup::restore(parts, &store, bytes, false).await;
    if restored.is_ok() {
        // Show the whole attack: the planted key serves, and its ciphertexts open offline.
        let blob = parts
            .service
            .encrypt(EncryptRequest {
                key_id: planted.to_string(),
                plaintext: SecretBlob(Zeroizing::new(b"a secret of the service".to_vec())),
                encryption_context: None,
                encryption_algorithm: None,
                grant_tokens: None,
                dry_run: None,
            })
            .await
            .unwrap()
            .ciphertext_blob
            .0;
        let stolen = attacker.decrypt_offline(&blob);
        panic!(
            "a backup forged without a PIN was restored (verify said {:?}); the attacker read {:?}",
            verified.map(|_| "Valid"),
            String::from_utf8_lossy(&stolen)
        );
    }
    assert!(verified.is_err(), "verify must refuse what restore refuses");
    let cluster = store.connected_cluster().unwrap();
    assert!(
        !cluster.tokens()[0].has_key(planted.bytes()).await.unwrap(),
        "a refused restore plants nothing on the token"
    );
    let described = parts
        .service
        .describe_key(KeyIdRequest {
            key_id: planted.to_string(),
            grant_tokens: None,
        })
        .await;
    assert!(described.is_err(), "nor in the metadata");
}

#[tokio::test]
async fn a_backup_forged_without_a_pin_is_refused_and_plants_nothing() {
    let (dir, config, parts) = store().await;
    let real = parts
        .service
        .create_key(CreateKeyRequest::default())
        .await
        .unwrap()
        .key_metadata
        .key_id;
    let attacker = Attacker::open(&config);
    let planted = KeyId::new_random();
    let wrapped_chosen = attacker.domain_wrap(&CHOSEN);

    // 1. The first format, forged as the review showed: a new key, the tag recomputed.
    let first = attacker.domain_wrap(&[0u8; 32]);
    let kcv = hex::encode(&first[..8]);
    let store_record = parts.service.default_key_store().unwrap().record();
    let mut forged = FormatOne {
        format: "hsmkms-backup-1".into(),
        created_ms: 1_800_000_000_000,
        key_store_id: store_record.id.clone(),
        cluster_id: store_record.cluster_id.clone(),
        domain_kcv: kcv,
        keys: vec![FormatOneKey {
            key_id: planted.to_string(),
            created_ms: 1_800_000_000_000,
            description: "planted".into(),
            state: "Enabled".into(),
            deletion_ms: None,
            pending_window_days: None,
            tags: Default::default(),
            wrapped: B64.encode(&wrapped_chosen),
        }],
        aliases: vec![],
        tag: String::new(),
    };
    let digest = Sha256::digest(serde_json::to_vec(&forged).unwrap());
    forged.tag = hex::encode(attacker.domain_wrap(&digest));
    let bytes = serde_json::to_vec_pretty(&forged).unwrap();
    restore_is_refused(&parts, &attacker, &bytes, planted).await;

    // 2. A real backup of the current format, with the planted key added to its body and the
    //    file re-tagged every way that needs no PIN.
    let real_file = backup_file(&parts, dir.path()).await;
    let text = String::from_utf8(real_file.clone()).unwrap();
    assert!(text.contains(&real.to_string()));
    let entry = format!(
        r#"{{"key_id":"{planted}","created_ms":1800000000000,"description":"planted","state":"Enabled","deletion_ms":null,"pending_window_days":null,"tags":{{}},"wrapped":"{}"}},"#,
        B64.encode(&wrapped_chosen)
    );
    let grown = text.replacen(r#""keys": ["#, &format!(r#""keys": [{entry}"#), 1);
    assert_ne!(grown, text, "the forger found the key list");
    restore_is_refused(&parts, &attacker, grown.as_bytes(), planted).await;
    // Re-tagged with the domain key's wrap of the digest of the body, keeping the trailer's
    // MAC key id: the most a session without a login can compute.
    let (body, trailer) = grown
        .trim_end_matches('\n')
        .rsplit_once('\n')
        .expect("a body and a trailer line");
    let body = format!("{body}\n");
    let mac_key_id = trailer
        .split(' ')
        .nth(2)
        .expect("the trailer names the MAC key");
    let wrap = attacker.domain_wrap(&Sha256::digest(body.as_bytes()));
    let retagged = format!(
        "{body}hsmkms-backup-mac v2 {mac_key_id} {}\n",
        hex::encode(&wrap[..32])
    );
    restore_is_refused(&parts, &attacker, retagged.as_bytes(), planted).await;

    // 3. The backup MAC key is out of reach without a login: the attacker cannot even see it.
    assert!(
        attacker.find("hsmkms-backup-mac").is_empty(),
        "the backup MAC key is a private object"
    );
    // And the real file still restores (idempotently) and verifies.
    let store = parts.service.default_key_store().unwrap();
    keystore::backup::verify(&store, &real_file).await.unwrap();
}
