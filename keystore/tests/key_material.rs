//! Root key material never reaches the service process.
//!
//! A production key is sensitive and cannot be read even by us, so this test makes one key on a
//! test token *readable* (CKA_SENSITIVE false) purely to learn its bytes, registers it as a KMS key,
//! drives Encrypt, Decrypt and GenerateDataKey through the real server, then dumps the memory of
//! the service and of every worker with gcore and searches the dumps for those bytes.
//!
//! Expected: never in the service process, which never receives it. The worker processes host
//! the PKCS#11 module; with SoftHSM2 that module *is* the token, and it keeps key values masked,
//! so they show nothing either.

mod support;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use cryptoki::session::UserType;
use keystore::config::{read_secret_file, Config};
use keystore::dev::DEV_SECRET_ACCESS_KEY;
use keystore::ids::KeyId;
use keystore::store::{KeyRecord, KeyState, MetadataStore, SqliteStore};
use support::{children, memory_holds, worker, Server};

/// Makes a key with KMS-key attributes except that its value can be read; returns the value.
fn readable_key_on_token(config: &Config, key_id: &KeyId) -> Vec<u8> {
    let token = &config.key_store.as_ref().unwrap().tokens[0];
    // This test file is its own process with one test: setting the variable before the module
    // loads is safe here.
    std::env::set_var("SOFTHSM2_CONF", &token.env["SOFTHSM2_CONF"]);
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
    session
        .login(
            UserType::User,
            Some(&read_secret_file(&token.pin_file).unwrap()),
        )
        .unwrap();
    let handle = session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32.into()),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
                Attribute::Derive(true),
                Attribute::Id(key_id.0.to_vec()),
                Attribute::Label(key_id.to_string().into_bytes()),
            ],
        )
        .unwrap();
    let value = match session
        .get_attributes(handle, &[AttributeType::Value])
        .unwrap()
        .pop()
    {
        Some(Attribute::Value(v)) => v,
        other => panic!("no CKA_VALUE: {other:?}"),
    };
    assert_eq!(value.len(), 32);
    value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_key_bytes_never_appear_in_the_service_process() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = keystore::dev::prepare(dir.path(), &worker()).unwrap();
    let config = Config::load(&config_path).unwrap();
    // The service first: its first start sets up the token's domain key, which it makes only
    // for a store without keys.
    let server = Server::start(&[
        "serve",
        "--config",
        config_path.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    let key_id = KeyId::new_random();
    let root = readable_key_on_token(&config, &key_id);
    let store = SqliteStore::open(&config.metadata_path).unwrap();
    store
        .begin_create(&KeyRecord {
            key_id,
            created_ms: 0,
            description: "readable test key".into(),
            state: KeyState::Creating,
            deletion_ms: None,
            pending_window_days: None,
            custom_key_store_id: config.key_store.as_ref().unwrap().id.clone(),
            tags: Default::default(),
        })
        .unwrap();
    store.finish_create(&key_id).unwrap();

    let mut c = server.client();
    let arn = format!("arn:aws:kms:us-east-1:111122223333:key/{key_id}");
    for _ in 0..100 {
        let e = c
            .call(
                "Encrypt",
                &serde_json::json!({"KeyId": arn, "Plaintext": "c2VjcmV0"}),
            )
            .await
            .unwrap();
        assert_eq!(e.status, 200, "{:?}", e.body);
        let d = c
            .call(
                "Decrypt",
                &serde_json::json!({"CiphertextBlob": e.body["CiphertextBlob"]}),
            )
            .await
            .unwrap();
        assert_eq!(d.status, 200);
        let g = c
            .call(
                "GenerateDataKey",
                &serde_json::json!({"KeyId": arn, "KeySpec": "AES_256"}),
            )
            .await
            .unwrap();
        assert_eq!(g.status, 200);
    }

    let dumps = tempfile::tempdir().unwrap();
    // A positive control proves the search can find something: the service does hold the dev
    // principal's secret (it verifies signatures with it).
    let needles: [&[u8]; 2] = [&root, DEV_SECRET_ACCESS_KEY.as_bytes()];
    let service = memory_holds(server.id(), &needles, dumps.path());
    let workers = children(server.id());
    assert!(!workers.is_empty(), "no worker processes found");
    let worker_holds: Vec<bool> = workers
        .iter()
        .map(|w| memory_holds(*w, &needles[..1], dumps.path())[0])
        .collect();
    server.kill();
    println!(
        "key material check: root key in service memory: {}; in workers (SoftHSM2, the token itself): {worker_holds:?}; positive control found: {}",
        service[0], service[1]
    );
    assert!(
        service[1],
        "positive control failed: the dump search is broken"
    );
    assert!(
        !service[0],
        "the root key's bytes are in the service process's memory"
    );
    // SoftHSM2 keeps object values masked in memory and cleanses its cipher contexts, so even
    // the worker hosting the software token shows no trace after 300 operations.
    assert!(
        worker_holds.iter().all(|h| !h),
        "a worker's memory holds the root key: {worker_holds:?}"
    );
}
