//! The worker pool against a real SoftHSM2 token, each test with its own token directory.

mod support;

use std::time::Duration;

use hsm::{HsmError, TokenPool, WorkerCommand};
use secrecy::SecretString;
use support::{worker_pids, TestToken};
use zeroize::Zeroizing;

fn key(n: u8) -> [u8; 16] {
    [n; 16]
}

#[tokio::test]
async fn encrypt_then_decrypt_round_trips() {
    let token = TestToken::new(2);
    let pool = token.pool().await;
    pool.generate_key(key(1)).await.unwrap();
    let sealed = pool
        .encrypt(key(1), b"aad".to_vec(), Zeroizing::new(b"secret".to_vec()))
        .await
        .unwrap();
    assert_eq!(sealed.ciphertext.len(), 6 + 16);
    let plain = pool.decrypt(key(1), b"aad".to_vec(), sealed).await.unwrap();
    assert_eq!(&plain[..], b"secret");
}

#[tokio::test]
async fn decrypt_with_other_aad_is_invalid_ciphertext() {
    let token = TestToken::new(1);
    let pool = token.pool().await;
    pool.generate_key(key(1)).await.unwrap();
    let sealed = pool
        .encrypt(key(1), b"aad".to_vec(), Zeroizing::new(b"secret".to_vec()))
        .await
        .unwrap();
    let err = pool
        .decrypt(key(1), b"other".to_vec(), sealed.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, HsmError::InvalidCiphertext), "{err:?}");
    pool.generate_key(key(2)).await.unwrap();
    let err = pool
        .decrypt(key(2), b"aad".to_vec(), sealed)
        .await
        .unwrap_err();
    assert!(matches!(err, HsmError::InvalidCiphertext), "{err:?}");
}

#[tokio::test]
async fn derived_key_is_reused_and_ciphertexts_survive_a_new_pool() {
    let token = TestToken::new(1);
    let pool = token.pool().await;
    pool.generate_key(key(3)).await.unwrap();
    let a = pool
        .encrypt(key(3), vec![], Zeroizing::new(b"one".to_vec()))
        .await
        .unwrap();
    let b = pool
        .encrypt(key(3), vec![], Zeroizing::new(b"two".to_vec()))
        .await
        .unwrap();
    assert_eq!(a.r, b.r, "one worker reuses its derived key");
    assert_ne!(a.iv, b.iv);
    drop(pool);
    let pool = token.pool().await;
    assert_eq!(&pool.decrypt(key(3), vec![], a).await.unwrap()[..], b"one");
    assert_eq!(&pool.decrypt(key(3), vec![], b).await.unwrap()[..], b"two");
}

#[tokio::test]
async fn generate_key_is_idempotent_and_destroy_removes_it() {
    let token = TestToken::new(1);
    let pool = token.pool().await;
    pool.generate_key(key(4)).await.unwrap();
    let sealed = pool
        .encrypt(key(4), vec![], Zeroizing::new(b"x".to_vec()))
        .await
        .unwrap();
    pool.generate_key(key(4)).await.unwrap();
    assert_eq!(
        &pool.decrypt(key(4), vec![], sealed.clone()).await.unwrap()[..],
        b"x"
    );
    pool.destroy_key(key(4)).await.unwrap();
    pool.destroy_key(key(4)).await.unwrap();
    assert!(!pool.has_key(key(4)).await.unwrap());
    let err = pool.decrypt(key(4), vec![], sealed).await.unwrap_err();
    assert!(matches!(err, HsmError::KeyNotFound { .. }), "{err:?}");
}

#[tokio::test]
async fn wrong_pin_is_refused_with_the_ckr_code() {
    let token = TestToken::new(1);
    let mut config = token.config.clone();
    config.pin = SecretString::from("wrong-pin");
    let command = WorkerCommand {
        program: env!("CARGO_BIN_EXE_hsm-worker").into(),
        args: vec![],
    };
    let err = TokenPool::start(config, command)
        .await
        .err()
        .expect("login must fail");
    let text = err.to_string();
    assert!(
        text.contains("CKR_PIN_INCORRECT") && text.contains("C_Login"),
        "{text}"
    );
    assert!(!text.contains("wrong-pin"));
    // Typed, so that callers never match the words.
    assert_eq!(err.ckr(), Some(hsm::error::Ckr::PIN_INCORRECT));
    assert!(err.is_pin_failure());
}

#[tokio::test]
async fn a_missing_token_or_module_has_a_typed_cause() {
    let token = TestToken::new(1);
    let mut config = token.config.clone();
    config.label = "no-such-token".into();
    let err = TokenPool::start(config, support::worker())
        .await
        .err()
        .unwrap();
    assert_eq!(err.cause(), Some(hsm::error::Cause::TokenNotFound), "{err}");
    let mut config = token.config.clone();
    config.module = "/nonexistent/libpkcs11.so".into();
    let err = TokenPool::start(config, support::worker())
        .await
        .err()
        .unwrap();
    assert_eq!(
        err.cause(),
        Some(hsm::error::Cause::ModuleNotLoadable),
        "{err}"
    );
}

#[tokio::test]
async fn a_fresh_pool_counts_no_restart_until_a_worker_is_replaced() {
    let token = TestToken::new(3);
    let pool = token.pool().await;
    pool.ping().await.unwrap();
    assert_eq!(pool.restarts(), 0, "no worker was replaced yet");
    let pids = worker_pids(token.dir.path());
    signal(pids[0], "-9");
    // Requests until the dead worker's slot has been refilled.
    for _ in 0..200 {
        pool.random(4).await.unwrap();
        if pool.restarts() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(pool.restarts(), 1);
}

fn signal(pid: i32, sig: &str) {
    assert!(std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

/// A worker that stops answering (SIGSTOP: a real hang) must not block key deletion: the
/// Forget broadcast has the deadline of any request, and the hung worker is replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_worker_does_not_block_key_deletion() {
    let token = TestToken::new(2);
    let pool = token.pool().await;
    pool.set_operation_deadline(Duration::from_secs(2));
    pool.generate_key(key(11)).await.unwrap();
    let mut pids = worker_pids(token.dir.path());
    pids.sort();
    // The second worker started last; an idle pool sends DestroyKey to the first.
    signal(pids[1], "-STOP");
    let deleted = tokio::time::timeout(Duration::from_secs(20), pool.destroy_key(key(11))).await;
    signal(pids[1], "-CONT");
    deleted.expect("deletion hung on a stopped worker").unwrap();
    assert!(!pool.has_key(key(11)).await.unwrap());
    assert!(!worker_pids(token.dir.path()).contains(&pids[1]) || pool.restarts() >= 1);
}

/// The second opinion on a missing key goes through the same deadline: a hung worker asked for
/// it is killed, and the caller hears that the key is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_worker_asked_for_a_second_opinion_is_replaced() {
    let token = TestToken::new(2);
    let pool = token.pool().await;
    pool.set_operation_deadline(Duration::from_secs(2));
    let mut pids = worker_pids(token.dir.path());
    pids.sort();
    signal(pids[1], "-STOP");
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        pool.encrypt(key(12), vec![], Zeroizing::new(vec![1])),
    )
    .await
    .expect("hung on a stopped worker")
    .unwrap_err();
    signal(pids[1], "-CONT");
    assert!(
        matches!(
            err,
            HsmError::KeyNotFound { .. } | HsmError::TokenUnavailable { .. }
        ),
        "{err:?}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !worker_pids(token.dir.path()).contains(&pids[1]),
        "the hung worker lives on"
    );
}

#[tokio::test]
async fn killed_worker_is_replaced_and_no_request_fails() {
    let token = TestToken::new(2);
    let pool = token.pool().await;
    pool.generate_key(key(5)).await.unwrap();
    let load = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut ok = 0;
            for i in 0..3000u32 {
                let pt = Zeroizing::new(i.to_le_bytes().to_vec());
                let sealed = pool
                    .encrypt(key(5), vec![], pt.clone())
                    .await
                    .expect("encrypt failed");
                let back = pool
                    .decrypt(key(5), vec![], sealed)
                    .await
                    .expect("decrypt failed");
                assert_eq!(back, pt);
                ok += 1;
            }
            ok
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let pids = worker_pids(token.dir.path());
    assert_eq!(pids.len(), 2, "two workers expected, found {pids:?}");
    for pid in pids {
        std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(load.await.unwrap(), 3000);
    assert!(pool.restarts() >= 2, "restarts: {}", pool.restarts());
    assert!(pool.is_up());
}

#[tokio::test]
async fn a_worker_draws_a_new_derivation_nonce_after_max_uses() {
    let mut token = TestToken::new(1);
    token.config.limits = hsm::DerivedKeyLimits {
        max_uses: 3,
        max_age_secs: 3600,
    };
    let pool = token.pool().await;
    pool.generate_key(key(6)).await.unwrap();
    let mut sealed = vec![];
    for i in 0..7u8 {
        sealed.push(
            pool.encrypt(key(6), vec![], Zeroizing::new(vec![i]))
                .await
                .unwrap(),
        );
    }
    let nonces: Vec<_> = sealed.iter().map(|s| s.r).collect();
    assert!(nonces[0] == nonces[1] && nonces[1] == nonces[2]);
    assert!(nonces[3] != nonces[2] && nonces[3] == nonces[5]);
    assert!(nonces[6] != nonces[5]);
    // Retired derived keys still decrypt.
    for (i, s) in sealed.into_iter().enumerate() {
        assert_eq!(
            &pool.decrypt(key(6), vec![], s).await.unwrap()[..],
            &[i as u8]
        );
    }
}

#[test]
fn default_limits_keep_iv_collisions_below_two_to_the_minus_48() {
    let limits = hsm::DerivedKeyLimits::default();
    // Birthday bound for n random 96-bit IVs: n^2 / 2^97.
    let n = limits.max_uses as f64;
    assert!(n * n / 2f64.powi(97) <= 2f64.powi(-48));
    assert!(limits.max_age_secs <= 3600);
}

#[tokio::test]
async fn list_keys_names_every_key_on_the_token() {
    let token = TestToken::new(1);
    let pool = token.pool().await;
    pool.generate_key(key(8)).await.unwrap();
    pool.generate_key(key(9)).await.unwrap();
    assert_eq!(pool.list_keys().await.unwrap(), vec![key(8), key(9)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_every_worker_at_once_fails_no_request() {
    let token = TestToken::new(2);
    let pool = token.pool().await;
    pool.generate_key(key(7)).await.unwrap();
    let mut loads = Vec::new();
    for t in 0..4u32 {
        let pool = pool.clone();
        loads.push(tokio::spawn(async move {
            let mut done = 0u32;
            for i in 0..1500u32 {
                let pt = Zeroizing::new((t * 10_000 + i).to_le_bytes().to_vec());
                let sealed = pool
                    .encrypt(key(7), vec![], pt.clone())
                    .await
                    .expect("encrypt failed");
                assert_eq!(
                    pool.decrypt(key(7), vec![], sealed)
                        .await
                        .expect("decrypt failed"),
                    pt
                );
                done += 1;
            }
            done
        }));
    }
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let pids: Vec<String> = worker_pids(token.dir.path())
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert!(!pids.is_empty());
        // One kill(1) call: every worker of the token dies in the same instant.
        std::process::Command::new("kill")
            .arg("-9")
            .args(&pids)
            .status()
            .unwrap();
    }
    let mut total = 0;
    for l in loads {
        total += l.await.unwrap();
    }
    assert_eq!(total, 6000);
    assert!(pool.restarts() >= 2, "restarts: {}", pool.restarts());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destroyed_key_is_unusable_on_every_worker() {
    let token = TestToken::new(2);
    let pool = token.pool().await;
    pool.generate_key(key(10)).await.unwrap();
    // Concurrent requests reach both workers, so each holds a derived key of this key.
    let mut sealed = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..16u8 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            pool.encrypt(key(10), vec![], Zeroizing::new(vec![i]))
                .await
                .unwrap()
        }));
    }
    for t in tasks {
        sealed.push(t.await.unwrap());
    }
    let distinct_r: std::collections::HashSet<_> = sealed.iter().map(|s| s.r).collect();
    assert_eq!(distinct_r.len(), 2, "both workers should have encrypted");
    pool.destroy_key(key(10)).await.unwrap();
    for _ in 0..8 {
        let e = pool
            .encrypt(key(10), vec![], Zeroizing::new(vec![0]))
            .await
            .unwrap_err();
        assert!(matches!(e, HsmError::KeyNotFound { .. }), "{e:?}");
    }
    for s in sealed {
        let e = pool.decrypt(key(10), vec![], s).await.unwrap_err();
        assert!(matches!(e, HsmError::KeyNotFound { .. }), "{e:?}");
    }
    assert!(!pool.has_key(key(10)).await.unwrap());
}
