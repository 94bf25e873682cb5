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
