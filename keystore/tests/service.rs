//! The service core against a real SoftHSM2 token and a real SQLite store, one per test.

mod support;

use std::sync::Arc;

use keystore::clock::ManualClock;
use keystore::config::Config;
use keystore::error::KmsError;
use keystore::service::Service;
use keystore::wire::*;
use support::worker;
use zeroize::Zeroizing;

const DAY_MS: i64 = 86_400_000;

struct Harness {
    _dir: tempfile::TempDir,
    config: Config,
    clock: Arc<ManualClock>,
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let path = keystore::dev::prepare(dir.path(), &worker()).unwrap();
        let config = Config::load(&path).unwrap();
        Harness {
            _dir: dir,
            config,
            clock: Arc::new(ManualClock::new(1_800_000_000_000)),
        }
    }

    async fn service(&self) -> Arc<Service> {
        let service = keystore::app::build_service(&self.config, self.clock.clone(), worker())
            .await
            .unwrap();
        keystore::app::recover(&service).await.unwrap();
        service
    }
}

async fn new_key(s: &Service) -> String {
    s.create_key(CreateKeyRequest::default())
        .await
        .unwrap()
        .key_metadata
        .arn
}

fn key_request(key_id: &str) -> KeyIdRequest {
    KeyIdRequest {
        key_id: key_id.into(),
        grant_tokens: None,
    }
}

async fn encrypt(s: &Service, key_id: &str, plaintext: &[u8]) -> Vec<u8> {
    let req = EncryptRequest {
        key_id: key_id.into(),
        plaintext: SecretBlob(Zeroizing::new(plaintext.to_vec())),
        encryption_context: Some([("purpose".to_string(), "test".to_string())].into()),
        encryption_algorithm: None,
        grant_tokens: None,
        dry_run: None,
    };
    s.encrypt(req).await.unwrap().ciphertext_blob.0
}

async fn decrypt(s: &Service, blob: &[u8]) -> Result<Vec<u8>, KmsError> {
    let req = DecryptRequest {
        ciphertext_blob: Blob(blob.to_vec()),
        key_id: None,
        encryption_context: Some([("purpose".to_string(), "test".to_string())].into()),
        encryption_algorithm: None,
        grant_tokens: None,
        recipient: None,
        dry_run: None,
    };
    s.decrypt(req).await.map(|r| r.plaintext.0.to_vec())
}

fn key_bytes(arn: &str) -> [u8; 16] {
    keystore::ids::KeyId::parse(arn.rsplit('/').next().unwrap())
        .unwrap()
        .bytes()
}

#[tokio::test]
async fn key_is_destroyed_on_the_token_when_its_waiting_period_ends() {
    let h = Harness::new();
    let s = h.service().await;
    let arn = new_key(&s).await;
    let blob = encrypt(&s, &arn, b"data").await;
    let scheduled = s
        .schedule_key_deletion(ScheduleKeyDeletionRequest {
            key_id: arn.clone(),
            pending_window_in_days: Some(7),
        })
        .await
        .unwrap();
    assert_eq!(scheduled.pending_window_in_days, 7);
    assert!(matches!(
        decrypt(&s, &blob).await,
        Err(KmsError::InvalidState(_))
    ));
    h.clock.advance_ms(7 * DAY_MS - 1);
    assert_eq!(s.delete_due_keys().await.unwrap(), 0);
    assert!(s.cluster().unwrap().has_key(key_bytes(&arn)).await.unwrap());
    h.clock.advance_ms(1);
    assert_eq!(s.delete_due_keys().await.unwrap(), 1);
    assert!(!s.cluster().unwrap().has_key(key_bytes(&arn)).await.unwrap());
    assert!(matches!(
        s.describe_key(key_request(&arn)).await,
        Err(KmsError::NotFound(_))
    ));
}

#[tokio::test]
async fn cancelled_deletion_leaves_a_disabled_key_that_works_once_enabled() {
    let h = Harness::new();
    let s = h.service().await;
    let arn = new_key(&s).await;
    let blob = encrypt(&s, &arn, b"data").await;
    s.schedule_key_deletion(ScheduleKeyDeletionRequest {
        key_id: arn.clone(),
        pending_window_in_days: None,
    })
    .await
    .unwrap();
    s.cancel_key_deletion(key_request(&arn)).await.unwrap();
    h.clock.advance_ms(31 * DAY_MS);
    assert_eq!(s.delete_due_keys().await.unwrap(), 0);
    let meta = s
        .describe_key(key_request(&arn))
        .await
        .unwrap()
        .key_metadata;
    assert_eq!(meta.key_state, "Disabled");
    assert!(meta.deletion_date.is_none());
    assert!(matches!(
        decrypt(&s, &blob).await,
        Err(KmsError::Disabled(_))
    ));
    s.enable_key(key_request(&arn)).await.unwrap();
    assert_eq!(decrypt(&s, &blob).await.unwrap(), b"data");
}

#[tokio::test]
async fn ciphertexts_keys_and_aliases_survive_a_restart() {
    let h = Harness::new();
    let (arn, blob) = {
        let s = h.service().await;
        let arn = new_key(&s).await;
        s.create_alias(AliasRequest {
            alias_name: "alias/kept".into(),
            target_key_id: Some(arn.clone()),
        })
        .await
        .unwrap();
        s.disable_key(key_request(&arn)).await.unwrap();
        s.enable_key(key_request(&arn)).await.unwrap();
        (
            arn.clone(),
            encrypt(&s, "alias/kept", b"before restart").await,
        )
    };
    let s = h.service().await;
    assert_eq!(decrypt(&s, &blob).await.unwrap(), b"before restart");
    let meta = s
        .describe_key(key_request("alias/kept"))
        .await
        .unwrap()
        .key_metadata;
    assert_eq!(meta.arn, arn);
}

#[tokio::test]
async fn interrupted_creation_is_rolled_back_at_start() {
    let h = Harness::new();
    let orphan = keystore::ids::KeyId::new_random();
    {
        let s = h.service().await;
        // What a crash between "made on the token" and "committed" leaves behind.
        let store = keystore::store::SqliteStore::open(&h.config.metadata_path).unwrap();
        use keystore::store::MetadataStore;
        store
            .begin_create(&keystore::store::KeyRecord {
                key_id: orphan,
                created_ms: 0,
                description: String::new(),
                state: keystore::store::KeyState::Creating,
                deletion_ms: None,
                pending_window_days: None,
                custom_key_store_id: s.default_key_store().unwrap().id(),
                tags: Default::default(),
            })
            .unwrap();
        s.cluster()
            .unwrap()
            .create_key(orphan.bytes(), 1)
            .await
            .unwrap();
        let listed = s.list_keys(ListRequest::default()).await.unwrap();
        assert!(listed.keys.is_empty(), "a key being created is invisible");
    }
    let s = h.service().await;
    assert!(!s.cluster().unwrap().has_key(orphan.bytes()).await.unwrap());
    let on_token = s.cluster().unwrap().list_keys().await.unwrap();
    assert!(on_token[0].1.is_empty(), "{on_token:?}");
}

#[tokio::test]
async fn rotate_manually_moves_the_alias_and_keeps_old_ciphertexts_readable() {
    let h = Harness::new();
    let s = h.service().await;
    let old = new_key(&s).await;
    s.tag_resource(TagResourceRequest {
        key_id: old.clone(),
        tags: vec![Tag {
            tag_key: "team".into(),
            tag_value: "db".into(),
        }],
    })
    .await
    .unwrap();
    s.create_alias(AliasRequest {
        alias_name: "alias/app".into(),
        target_key_id: Some(old.clone()),
    })
    .await
    .unwrap();
    let blob = encrypt(&s, "alias/app", b"old data").await;
    let (was, now) = s.rotate_manually("alias/app").await.unwrap();
    assert_eq!(was, old);
    assert_ne!(now, old);
    let meta = s
        .describe_key(key_request("alias/app"))
        .await
        .unwrap()
        .key_metadata;
    assert_eq!(meta.arn, now);
    assert_eq!(decrypt(&s, &blob).await.unwrap(), b"old data");
    let tags = s
        .list_resource_tags(ListRequest {
            key_id: Some(now.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        tags.tags,
        vec![Tag {
            tag_key: "team".into(),
            tag_value: "db".into()
        }]
    );
    let fresh = encrypt(&s, "alias/app", b"new data").await;
    assert_eq!(&fresh[2..18], &key_bytes(&now)[..]);
}

#[tokio::test]
async fn every_changed_byte_of_a_ciphertext_is_refused() {
    let h = Harness::new();
    let s = h.service().await;
    let arn = new_key(&s).await;
    let blob = encrypt(&s, &arn, b"0123456789abcdef").await;
    for i in 0..blob.len() {
        let mut bad = blob.clone();
        bad[i] ^= 0x01;
        match decrypt(&s, &bad).await {
            Err(KmsError::InvalidCiphertext(_)) => {}
            other => panic!("byte {i}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn data_keys_decrypt_to_the_returned_plaintext() {
    let h = Harness::new();
    let s = h.service().await;
    let arn = new_key(&s).await;
    let req = GenerateDataKeyRequest {
        key_id: arn.clone(),
        encryption_context: Some([("purpose".to_string(), "test".to_string())].into()),
        number_of_bytes: None,
        key_spec: Some("AES_128".into()),
        grant_tokens: None,
        recipient: None,
        dry_run: None,
    };
    let dk = s.generate_data_key(req, true).await.unwrap();
    let plaintext = dk.plaintext.unwrap().0.to_vec();
    assert_eq!(plaintext.len(), 16);
    assert_eq!(decrypt(&s, &dk.ciphertext_blob.0).await.unwrap(), plaintext);
}

#[tokio::test]
async fn the_prober_copies_missed_keys_and_destroys_keys_deleted_meanwhile() {
    use keystore::store::MetadataStore;
    let dir = tempfile::tempdir().unwrap();
    let path = keystore::dev::prepare_cluster(dir.path(), &worker(), 2).unwrap();
    let config = Config::load(&path).unwrap();
    let s = keystore::app::build_service(&config, Arc::new(ManualClock::new(0)), worker())
        .await
        .unwrap();
    let cluster = s.cluster().unwrap();
    let tokens = cluster.tokens();
    let store = keystore::store::SqliteStore::open(&config.metadata_path).unwrap();

    // A key made while token 2 was away: on token 1 only, in the metadata.
    let missed = new_key(&s).await;
    let missed_id = key_bytes(&missed);
    tokens[1].destroy_key(missed_id).await.unwrap();
    // A key deleted while token 2 was away: gone from token 1 and the metadata, still on token 2.
    let deleted = new_key(&s).await;
    let deleted_id = key_bytes(&deleted);
    tokens[0].destroy_key(deleted_id).await.unwrap();
    store.remove_key(&keystore::ids::KeyId(deleted_id)).unwrap();

    let report = s.probe_tokens().await.unwrap();
    assert_eq!((report.copied, report.destroyed), (1, 1), "{report:?}");
    assert!(tokens[1].has_key(missed_id).await.unwrap());
    assert!(!tokens[1].has_key(deleted_id).await.unwrap());
    let again = s.probe_tokens().await.unwrap();
    assert_eq!(
        (again.copied, again.destroyed),
        (0, 0),
        "a second pass finds nothing to do"
    );
    // The copy is the same key: made on token 1, opened on token 2.
    let sealed = tokens[0]
        .encrypt(missed_id, vec![], Zeroizing::new(b"k".to_vec()))
        .await
        .unwrap();
    assert_eq!(
        &tokens[1].decrypt(missed_id, vec![], sealed).await.unwrap()[..],
        b"k"
    );
}

#[tokio::test]
async fn a_token_leaves_a_live_store_only_after_the_keys_it_alone_holds_are_copied() {
    let dir = tempfile::tempdir().unwrap();
    let path = keystore::dev::prepare_cluster(dir.path(), &worker(), 3).unwrap();
    let config = Config::load(&path).unwrap();
    let s = keystore::app::build_service(&config, Arc::new(ManualClock::new(0)), worker())
        .await
        .unwrap();
    let store_id = s.default_key_store().unwrap().id();
    let cluster = s.cluster().unwrap();
    // A key that only token 1 holds: tokens 2 and 3 missed it and no probe has run yet.
    let only_on_first = key_bytes(&new_key(&s).await);
    for t in &cluster.tokens()[1..] {
        t.destroy_key(only_on_first).await.unwrap();
    }
    let first = cluster.tokens()[0].label().to_string();
    s.update_custom_key_store(UpdateCustomKeyStoreRequest {
        custom_key_store_id: store_id.clone(),
        hsmkms_remove_tokens: Some(vec![first.clone()]),
        ..Default::default()
    })
    .await
    .unwrap();
    let after = s.cluster().unwrap();
    assert_eq!(after.tokens().len(), 2);
    assert!(after.tokens().iter().all(|t| t.label() != first));
    assert!(
        after.has_key(only_on_first).await.unwrap(),
        "the remaining tokens got the key before token 1 left"
    );
    // Two tokens are the least a store that is not a dev store keeps.
    let e = s
        .update_custom_key_store(UpdateCustomKeyStoreRequest {
            custom_key_store_id: store_id.clone(),
            hsmkms_remove_tokens: Some(vec![after.tokens()[0].label().to_string()]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(e, KmsError::ClusterInvalidConfiguration(_)),
        "{e:?}"
    );
    // The change is in the metadata: a new service over it has the two tokens.
    drop((s, cluster, after));
    let again = keystore::app::build_service(&config, Arc::new(ManualClock::new(0)), worker())
        .await
        .unwrap();
    let labels: Vec<_> = again
        .cluster()
        .unwrap()
        .tokens()
        .iter()
        .map(|t| t.label().to_string())
        .collect();
    assert_eq!(labels, ["hsmkms-dev-2", "hsmkms-dev-3"]);
}
