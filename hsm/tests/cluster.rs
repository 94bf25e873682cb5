//! A cluster of three real SoftHSM2 tokens, each in its own directory: the domain key is carried
//! from token to token without leaving hardware in the clear, keys are replicated through it,
//! and requests fail over when a token is gone.

mod support;

use std::time::Duration;

use hsm::admin::{establish_domain, AdminTarget};
use hsm::{Cluster, HsmError};
use secrecy::SecretString;
use support::{worker, worker_pids, TestToken, SO_PIN};
use zeroize::Zeroizing;

/// Two tokens sharing a domain key, one worker each, and a key made on both.
async fn two_token_cluster(
    id: &str,
    key: [u8; 16],
) -> (Vec<TestToken>, Vec<hsm::TokenPool>, Cluster) {
    let tokens: Vec<TestToken> = ["a", "b"]
        .iter()
        .map(|l| TestToken::labelled(l, 1))
        .collect();
    establish_domain(&targets(&tokens), &worker(), true)
        .await
        .unwrap();
    let mut pools = Vec::new();
    for t in &tokens {
        pools.push(t.pool().await);
    }
    let cluster = Cluster::new(id, pools.clone()).unwrap();
    cluster.create_key(key, 2).await.unwrap();
    (tokens, pools, cluster)
}

fn targets(tokens: &[TestToken]) -> Vec<AdminTarget> {
    tokens
        .iter()
        .map(|t| AdminTarget {
            token: t.config.clone(),
            so_pin: SecretString::from(SO_PIN),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_made_on_one_token_work_on_every_token_of_the_cluster() {
    let tokens: Vec<TestToken> = ["a", "b", "c"]
        .iter()
        .map(|l| TestToken::labelled(l, 1))
        .collect();
    let kcv = establish_domain(&targets(&tokens), &worker(), true)
        .await
        .unwrap();
    // Idempotent: a second run finds every token agreeing.
    assert_eq!(
        establish_domain(&targets(&tokens), &worker(), true)
            .await
            .unwrap(),
        kcv
    );

    let mut pools = Vec::new();
    for t in &tokens {
        pools.push(t.pool().await);
    }
    let cluster = Cluster::new("cluster-test0000000", pools.clone()).unwrap();
    let key = [42u8; 16];
    cluster.create_key(key, 3).await.unwrap();
    for p in &pools {
        assert!(p.has_key(key).await.unwrap(), "{} lacks the key", p.label());
    }
    // Sealed on one token, opened on each of the others: the same root key everywhere.
    let sealed = pools[0]
        .encrypt(key, b"aad".to_vec(), Zeroizing::new(b"replicated".to_vec()))
        .await
        .unwrap();
    for p in &pools[1..] {
        let plain = p
            .decrypt(key, b"aad".to_vec(), sealed.clone())
            .await
            .unwrap();
        assert_eq!(&plain[..], b"replicated", "on {}", p.label());
    }
    // The replicated key keeps the KMS key's protection: it cannot be exported except under
    // the domain key, and a second import is a no-op.
    let wrapped = pools[1].export_key(key).await.unwrap();
    pools[2].import_key(key, wrapped).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_fail_over_when_a_token_is_gone_and_create_key_needs_its_quorum() {
    let tokens: Vec<TestToken> = ["a", "b", "c"]
        .iter()
        .map(|l| TestToken::labelled(l, 1))
        .collect();
    establish_domain(&targets(&tokens), &worker(), true)
        .await
        .unwrap();
    let mut pools = Vec::new();
    for t in &tokens {
        pools.push(t.pool().await);
    }
    let cluster = Cluster::new("cluster-test0000001", pools.clone()).unwrap();
    let key = [7u8; 16];
    cluster.create_key(key, 3).await.unwrap();
    let sealed = cluster
        .encrypt(key, vec![], Zeroizing::new(b"x".to_vec()))
        .await
        .unwrap();

    // Token a goes away: its directory moved, its workers killed.
    let a = tokens[0].dir.path();
    std::fs::rename(a.join("tokens"), a.join("tokens-away")).unwrap();
    for pid in worker_pids(a) {
        std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
    }
    let mut served = 0;
    for _ in 0..30 {
        let plain = cluster.decrypt(key, vec![], sealed.clone()).await.unwrap();
        assert_eq!(&plain[..], b"x");
        cluster
            .encrypt(key, vec![], Zeroizing::new(b"y".to_vec()))
            .await
            .unwrap();
        served += 2;
    }
    assert!(
        cluster.failovers() >= 1,
        "failovers: {}",
        cluster.failovers()
    );
    println!(
        "served {served} requests with token a gone; failovers {}",
        cluster.failovers()
    );

    // With a token down, a new key reaches only two tokens: enough for a quorum of two, not three.
    let too_many = cluster.create_key([8u8; 16], 3).await.unwrap_err();
    assert!(
        matches!(too_many, HsmError::TokenUnavailable { .. }),
        "{too_many:?}"
    );
    for p in &pools[1..] {
        assert!(
            !p.has_key([8u8; 16]).await.unwrap(),
            "a refused key must be nowhere"
        );
    }
    cluster.create_key([9u8; 16], 2).await.unwrap();

    // Token a comes back and serves again.
    std::fs::rename(a.join("tokens-away"), a.join("tokens")).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let plain = pools[0].decrypt(key, vec![], sealed).await.unwrap();
    assert_eq!(&plain[..], b"x");
}

/// A worker still alive when its token's directory goes away keeps answering from what it has
/// (or, for objects it must read again, with errors): requests keep being served by the
/// cluster, each from a token that can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_fail_over_when_a_tokens_directory_vanishes_under_live_workers() {
    let key = [5u8; 16];
    let (tokens, pools, cluster) = two_token_cluster("cluster-test0000002", key).await;
    // Ciphertexts under several derivation nonces, so that decrypting them on token b needs
    // derivations, which read the token's objects.
    let mut sealed = Vec::new();
    for p in &pools {
        p.ping().await.unwrap();
        sealed.push((
            p.encrypt(key, vec![], Zeroizing::new(b"z".to_vec()))
                .await
                .unwrap(),
            b"z",
        ));
    }
    // Token b's directory goes away; its worker lives on.
    let b = tokens[1].dir.path();
    std::fs::rename(b.join("tokens"), b.join("tokens-away")).unwrap();
    for round in 0..20 {
        for (s, want) in &sealed {
            let plain = cluster
                .decrypt(key, vec![], s.clone())
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(&plain[..], *want);
        }
        let fresh = cluster
            .encrypt(key, vec![], Zeroizing::new(b"w".to_vec()))
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        sealed.push((fresh, b"w"));
    }
    std::fs::rename(b.join("tokens-away"), b.join("tokens")).unwrap();
}

/// A token that holds an object with the key's id that cannot derive: what SoftHSM2 leaves when
/// a restore or import is killed by SIGKILL between creating the object and writing all its
/// attributes (the CI fault test's intermittent `C_DeriveKey failed with CKR_MECHANISM_INVALID`
/// after the restore it kills midway). Made here directly, as a logged-in session can: the
/// key's object replaced by one with its id and no CKA_DERIVE. Requests must move on to a token
/// with a whole copy instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_fail_over_from_a_token_whose_key_object_is_damaged() {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::object::{Attribute, KeyType, ObjectClass};
    use cryptoki::session::UserType;

    let key = [6u8; 16];
    let (tokens, pools, cluster) = two_token_cluster("cluster-test0000003", key).await;
    let sealed = pools[0]
        .encrypt(key, vec![], Zeroizing::new(b"v".to_vec()))
        .await
        .unwrap();

    // This process loads SoftHSM2 for token b alone: SOFTHSM2_CONF is read at load.
    std::env::set_var("SOFTHSM2_CONF", &tokens[1].config.env[0].1);
    let pkcs11 = Pkcs11::new(&tokens[1].config.module).unwrap();
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = pkcs11.get_slots_with_token().unwrap()[0];
    let session = pkcs11.open_rw_session(slot).unwrap();
    session
        .login(UserType::User, Some(&tokens[1].config.pin))
        .unwrap();
    let id = Attribute::Id(key.to_vec());
    for h in session.find_objects(std::slice::from_ref(&id)).unwrap() {
        session.destroy_object(h).unwrap();
    }
    session
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Derive(false),
            Attribute::Value(vec![1; 32]),
            id,
        ])
        .unwrap();
    drop(session);
    // A fresh worker of token b reads the token anew.
    for pid in worker_pids(tokens[1].dir.path()) {
        std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
    }
    let on_b = pools[1].decrypt(key, vec![], sealed.clone()).await;
    assert!(
        matches!(on_b, Err(HsmError::Pkcs11 { .. })),
        "token b cannot use its copy: {on_b:?}"
    );
    for round in 0..10 {
        let plain = cluster
            .decrypt(key, vec![], sealed.clone())
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(&plain[..], b"v");
    }
}
