//! CreateKey intents have an owner and a lease: `recover` (run by a server at start) rolls back
//! only creations whose lease expired, never one a live process (a CLI running
//! `key rotate-manually` or a restore beside the server, or a second server) is still making.
//! Real SQLite files, a real SoftHSM2 token, the injectable clock.

mod support;

use std::sync::Arc;

use keystore::clock::{Clock, ManualClock};
use keystore::config::Config;
use keystore::ids::KeyId;
use keystore::service::{Service, INTENT_LEASE_MS};
use keystore::store::{IntentLease, KeyRecord, KeyState, MetadataStore, SqliteStore};
use keystore::wire::ListRequest;
use support::worker;

struct Harness {
    _dir: tempfile::TempDir,
    config: Config,
    clock: Arc<ManualClock>,
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let path = keystore::dev::prepare(dir.path(), &worker()).unwrap();
        Harness {
            config: Config::load(&path).unwrap(),
            _dir: dir,
            clock: Arc::new(ManualClock::new(1_800_000_000_000)),
        }
    }

    async fn service(&self) -> Arc<Service> {
        keystore::app::build_service(&self.config, self.clock.clone(), worker())
            .await
            .unwrap()
    }

    fn store(&self) -> SqliteStore {
        SqliteStore::open(&self.config.metadata_path).unwrap()
    }
}

fn intent(s: &Service) -> KeyRecord {
    KeyRecord {
        key_id: KeyId::new_random(),
        created_ms: 0,
        description: "being made elsewhere".into(),
        state: KeyState::Creating,
        deletion_ms: None,
        pending_window_days: None,
        custom_key_store_id: s.default_key_store().unwrap().id(),
        tags: Default::default(),
    }
}

#[tokio::test]
async fn a_live_owners_intent_survives_recover_and_an_expired_one_is_rolled_back() {
    let h = Harness::new();
    let server = h.service().await;
    // Another process (its own owner id) in the middle of CreateKey: intent recorded, material
    // on the token, commit not yet made; its lease runs for INTENT_LEASE_MS from now.
    let key = intent(&server);
    let id = key.key_id;
    let other = IntentLease {
        owner: "another-live-process".into(),
        until_ms: h.clock.now_ms() + INTENT_LEASE_MS,
    };
    h.store().begin_leased_create(&key, &other).unwrap();
    let cluster = server.cluster().unwrap();
    cluster.create_key(id.bytes(), 1).await.unwrap();

    assert_eq!(
        server.recover().await.unwrap(),
        0,
        "a live intent was rolled back"
    );
    assert_eq!(h.store().unfinished_creations().unwrap(), vec![id]);
    assert!(cluster.has_key(id.bytes()).await.unwrap());
    // The owner finishes: the key is complete and visible.
    h.store().finish_create(&id).unwrap();
    assert_eq!(
        server
            .list_keys(ListRequest::default())
            .await
            .unwrap()
            .keys
            .len(),
        1
    );

    // A second creation whose owner renews once, then dies (no more renewals).
    let key = intent(&server);
    let dead = key.key_id;
    h.store().begin_leased_create(&key, &other).unwrap();
    cluster.create_key(dead.bytes(), 1).await.unwrap();
    h.clock.advance_ms(INTENT_LEASE_MS - 1);
    let renewed = IntentLease {
        until_ms: h.clock.now_ms() + INTENT_LEASE_MS,
        ..other.clone()
    };
    assert!(h.store().renew_intent(&dead, &renewed).unwrap());
    h.clock.advance_ms(2);
    assert_eq!(
        server.recover().await.unwrap(),
        0,
        "a renewed lease is live"
    );
    h.clock.advance_ms(INTENT_LEASE_MS);
    assert_eq!(
        server.recover().await.unwrap(),
        1,
        "an expired lease is rolled back"
    );
    assert!(h.store().unfinished_creations().unwrap().is_empty());
    assert!(!cluster.has_key(dead.bytes()).await.unwrap());
    // The owner, back too late, cannot commit or renew what was rolled back.
    assert!(!h.store().renew_intent(&dead, &renewed).unwrap());
    assert!(h.store().finish_create(&dead).is_err());
    // The completed key is untouched.
    assert!(cluster.has_key(id.bytes()).await.unwrap());
    assert_eq!(
        server
            .list_keys(ListRequest::default())
            .await
            .unwrap()
            .keys
            .len(),
        1
    );
}

#[tokio::test]
async fn an_intent_of_a_process_gone_from_this_host_is_rolled_back_at_once() {
    let h = Harness::new();
    let server = h.service().await;
    // A real process owns the intent, with a lease far from expiry.
    let mut owner = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let lease = IntentLease {
        owner: keystore::intent::process_owner(owner.id()).unwrap(),
        until_ms: h.clock.now_ms() + 100 * INTENT_LEASE_MS,
    };
    let key = intent(&server);
    h.store().begin_leased_create(&key, &lease).unwrap();
    server
        .cluster()
        .unwrap()
        .create_key(key.key_id.bytes(), 1)
        .await
        .unwrap();
    assert_eq!(server.recover().await.unwrap(), 0, "its owner still runs");
    // kill -9 of the owner: what a crash of a CLI or a server leaves.
    owner.kill().unwrap();
    owner.wait().unwrap();
    assert_eq!(server.recover().await.unwrap(), 1);
    assert!(h.store().unfinished_creations().unwrap().is_empty());
    assert!(!server
        .cluster()
        .unwrap()
        .has_key(key.key_id.bytes())
        .await
        .unwrap());
}

#[tokio::test]
async fn create_key_leaves_no_intent_and_a_second_service_rolls_back_nothing_live() {
    let h = Harness::new();
    let a = h.service().await;
    let b = h.service().await;
    let made = a
        .create_key(Default::default())
        .await
        .unwrap()
        .key_metadata
        .key_id;
    assert!(h.store().unfinished_creations().unwrap().is_empty());
    // B's recover finds nothing of A's to roll back, even far in the future.
    h.clock.advance_ms(10 * INTENT_LEASE_MS);
    assert_eq!(b.recover().await.unwrap(), 0);
    assert_eq!(
        a.list_keys(ListRequest::default()).await.unwrap().keys[0].key_id,
        made
    );
}

#[test]
fn an_old_database_gains_the_lease_columns_and_its_intents_count_as_expired() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.sqlite");
    let orphan = KeyId::new_random();
    {
        // The keys table as databases made before leases have it, with a crash's leftover.
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE keys (key_id BLOB PRIMARY KEY, created_ms INTEGER NOT NULL, \
             description TEXT NOT NULL, state TEXT NOT NULL, deletion_ms INTEGER, \
             pending_window_days INTEGER, custom_key_store_id TEXT NOT NULL, tags TEXT NOT NULL);",
        )
        .unwrap();
        conn.execute(
            "INSERT INTO keys VALUES (?1, 0, '', 'Creating', NULL, NULL, 'cks-x', '{}')",
            [&orphan.0[..]],
        )
        .unwrap();
    }
    // Opening migrates, and opening again (another process, a restart) is harmless.
    let none = IntentLease {
        owner: String::new(),
        until_ms: 0,
    };
    for _ in 0..2 {
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(
            store.creating_intents().unwrap(),
            vec![(orphan, none.clone())]
        );
    }
    let store = SqliteStore::open(&path).unwrap();
    // Removal is compare-and-delete on the lease seen.
    let other = IntentLease {
        owner: "x".into(),
        until_ms: 0,
    };
    assert!(!store.remove_intent(&orphan, &other).unwrap());
    assert!(store.remove_intent(&orphan, &none).unwrap());
    assert!(store.unfinished_creations().unwrap().is_empty());
}
