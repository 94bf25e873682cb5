//! Setting up a domain key takes two steps on a token (the trusted wrap half, made by the SO,
//! then its unwrap twin); a crash between them leaves the first alone. The next connect must
//! finish the job instead of refusing the token for ever.
//!
//! The half-made state is made here as the admin process leaves it when killed between its two
//! steps: the SO generates the wrap half with its template, and nothing more. One test in this
//! binary: SOFTHSM2_CONF is process-wide.

mod support;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki::session::UserType;
use hsm::admin::{establish_domain, AdminTarget};
use hsm::Cluster;
use secrecy::SecretString;
use support::{worker, TestToken, SO_PIN};
use zeroize::Zeroizing;

fn half_a_domain_key(token: &TestToken) {
    let (_, conf) = &token.config.env[0];
    std::env::set_var("SOFTHSM2_CONF", conf);
    let pkcs11 = Pkcs11::new(&token.config.module).unwrap();
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = pkcs11.get_slots_with_token().unwrap()[0];
    let session = pkcs11.open_rw_session(slot).unwrap();
    session
        .login(UserType::So, Some(&SecretString::from(SO_PIN)))
        .unwrap();
    session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32.into()),
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::Trusted(true),
                Attribute::Wrap(true),
                Attribute::Unwrap(false),
                Attribute::Encrypt(false),
                Attribute::Decrypt(false),
                Attribute::Sensitive(true),
                Attribute::Extractable(true),
                Attribute::WrapWithTrusted(true),
                Attribute::Label(b"hsmkms-domain-wrap".to_vec()),
                Attribute::Modifiable(false),
                Attribute::Copyable(false),
            ],
        )
        .unwrap();
    session.logout().unwrap();
    drop(session);
    pkcs11.finalize().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_key_half_made_by_an_interrupted_setup_is_finished_on_the_next_connect() {
    let tokens = [TestToken::labelled("a", 1), TestToken::labelled("b", 1)];
    half_a_domain_key(&tokens[0]);
    let targets: Vec<AdminTarget> = tokens
        .iter()
        .map(|t| AdminTarget {
            token: t.config.clone(),
            so_pin: SecretString::from(SO_PIN),
        })
        .collect();
    let kcv = establish_domain(&targets, &worker(), true)
        .await
        .expect("the half-made domain key is finished and carried to the other token");
    assert_eq!(
        establish_domain(&targets, &worker(), true).await.unwrap(),
        kcv,
        "every token agrees afterwards"
    );
    // The finished key does its work: a key made on one token is carried to the other.
    let mut pools = Vec::new();
    for t in &tokens {
        pools.push(t.pool().await);
    }
    let cluster = Cluster::new("cluster-half0000000", pools.clone()).unwrap();
    cluster.create_key([7; 16], 2).await.unwrap();
    let sealed = pools[0]
        .encrypt([7; 16], vec![], Zeroizing::new(b"x".to_vec()))
        .await
        .unwrap();
    assert_eq!(
        &pools[1].decrypt([7; 16], vec![], sealed).await.unwrap()[..],
        b"x"
    );
}
