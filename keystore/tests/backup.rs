//! Backups against real SoftHSM2 tokens: a deleted key comes back and decrypts what it made;
//! an altered, truncated or foreign backup is refused and changes nothing.

mod support;

use std::sync::Arc;

use keystore::app::Parts;
use keystore::clock::ManualClock;
use keystore::config::Config;
use keystore::error::KmsError;
use keystore::wire::*;
use support::worker;
use zeroize::Zeroizing;

async fn store(clock: Arc<ManualClock>) -> (tempfile::TempDir, Parts) {
    let dir = tempfile::tempdir().unwrap();
    let path = keystore::dev::prepare(dir.path(), &worker()).unwrap();
    let config = Config::load(&path).unwrap();
    let parts = keystore::app::build(&config, clock, worker())
        .await
        .unwrap();
    (dir, parts)
}

async fn encrypt(parts: &Parts, key: &str) -> Vec<u8> {
    let req = EncryptRequest {
        key_id: key.into(),
        plaintext: SecretBlob(Zeroizing::new(b"made before the backup".to_vec())),
        encryption_context: None,
        encryption_algorithm: None,
        grant_tokens: None,
        dry_run: None,
    };
    parts.service.encrypt(req).await.unwrap().ciphertext_blob.0
}

async fn decrypt(parts: &Parts, blob: &[u8]) -> Result<Vec<u8>, KmsError> {
    let req = DecryptRequest {
        ciphertext_blob: Blob(blob.to_vec()),
        key_id: None,
        encryption_context: None,
        encryption_algorithm: None,
        grant_tokens: None,
        recipient: None,
        dry_run: None,
    };
    parts
        .service
        .decrypt(req)
        .await
        .map(|r| r.plaintext.0.to_vec())
}

/// A backup of the service's default store, serialised.
async fn backup_of(parts: &keystore::app::Parts) -> Vec<u8> {
    let store = parts.service.default_key_store().unwrap();
    keystore::backup::create(parts, &store).await.unwrap().bytes
}

/// Restores into the service's default store.
async fn restore(
    parts: &keystore::app::Parts,
    backup: &[u8],
    dry_run: bool,
) -> keystore::error::KmsResult<keystore::backup::RestoreReport> {
    let store = parts.service.default_key_store().unwrap();
    keystore::backup::restore(parts, &store, backup, dry_run).await
}

#[tokio::test]
async fn a_deleted_key_restored_from_backup_decrypts_what_it_made_before() {
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    let (_dir, parts) = store(clock.clone()).await;
    let s = &parts.service;
    let doomed = s
        .create_key(CreateKeyRequest::default())
        .await
        .unwrap()
        .key_metadata
        .arn;
    let kept = s
        .create_key(CreateKeyRequest::default())
        .await
        .unwrap()
        .key_metadata
        .arn;
    s.create_alias(AliasRequest {
        alias_name: "alias/doomed".into(),
        target_key_id: Some(doomed.clone()),
    })
    .await
    .unwrap();
    let blob = encrypt(&parts, &doomed).await;
    let backup = backup_of(&parts).await;
    assert!(
        !String::from_utf8_lossy(&backup).contains("made before"),
        "no plaintext in a backup"
    );

    s.schedule_key_deletion(ScheduleKeyDeletionRequest {
        key_id: doomed.clone(),
        pending_window_in_days: Some(7),
    })
    .await
    .unwrap();
    clock.advance_ms(8 * 86_400_000);
    assert_eq!(s.delete_due_keys().await.unwrap(), 1);
    assert!(matches!(
        decrypt(&parts, &blob).await,
        Err(KmsError::InvalidCiphertext(_))
    ));

    let dry = restore(&parts, &backup, true).await.unwrap();
    assert_eq!(
        (
            dry.keys_added,
            dry.keys_already_present,
            dry.token_copies,
            dry.aliases_added
        ),
        (1, 1, 1, 1)
    );
    assert!(
        decrypt(&parts, &blob).await.is_err(),
        "a dry run changes nothing"
    );

    let done = restore(&parts, &backup, false).await.unwrap();
    assert_eq!(
        (done.keys_added, done.token_copies, done.aliases_added),
        (1, 1, 1)
    );
    assert_eq!(
        decrypt(&parts, &blob).await.unwrap(),
        b"made before the backup"
    );
    let via_alias = s
        .describe_key(KeyIdRequest {
            key_id: "alias/doomed".into(),
            grant_tokens: None,
        })
        .await
        .unwrap();
    assert_eq!(via_alias.key_metadata.arn, doomed);
    assert_eq!(via_alias.key_metadata.key_state, "Enabled");

    let again = restore(&parts, &backup, false).await.unwrap();
    assert_eq!(
        (again.keys_added, again.token_copies, again.aliases_added),
        (0, 0, 0),
        "idempotent"
    );
    assert_eq!(again.keys_already_present, 2);
    let _ = kept;
}

#[tokio::test]
async fn altered_truncated_or_foreign_backups_are_refused() {
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    let (_dir, parts) = store(clock.clone()).await;
    parts
        .service
        .create_key(CreateKeyRequest {
            description: Some("original".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let backup = backup_of(&parts).await;
    assert!(
        keystore::backup::verify(&parts.service.default_key_store().unwrap(), &backup)
            .await
            .is_ok()
    );

    let altered = String::from_utf8(backup.clone())
        .unwrap()
        .replace("original", "forged!!");
    let e = keystore::backup::verify(
        &parts.service.default_key_store().unwrap(),
        altered.as_bytes(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("altered"), "{e}");
    let e = restore(&parts, &backup[..backup.len() / 2], false)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");

    // Another store has another domain key: this backup does not restore there.
    let (_other_dir, other) = store(clock).await;
    let e = restore(&other, &backup, false).await.unwrap_err();
    assert!(e.to_string().contains("another domain key"), "{e}");
    let listed = other
        .service
        .list_keys(ListRequest::default())
        .await
        .unwrap();
    assert!(listed.keys.is_empty(), "a refused restore changes nothing");
}
