//! TDE keys against a real SoftHSM2 token and SQLite store, and the TDE front of the real server.

mod support;

use std::io::{Read, Write};
use std::process::Command;
use std::sync::Arc;

use keystore::app::Parts;
use keystore::clock::SystemClock;
use keystore::config::Config;
use keystore::tde::TdeError;
use keystore::wire::{CreateKeyRequest, KeyIdRequest};
use support::{children, worker, Server};

async fn setup() -> (tempfile::TempDir, Config, Parts) {
    let dir = tempfile::tempdir().unwrap();
    let path = keystore::dev::prepare(dir.path(), &worker()).unwrap();
    let config = Config::load(&path).unwrap();
    let parts = keystore::app::build(&config, Arc::new(SystemClock), worker())
        .await
        .unwrap();
    (dir, config, parts)
}

async fn kms_key(parts: &Parts) -> String {
    parts
        .service
        .create_key(CreateKeyRequest::default())
        .await
        .unwrap()
        .key_metadata
        .arn
}

#[tokio::test]
async fn a_client_reads_its_own_keys_at_every_version_and_nothing_else() {
    let (_dir, _config, parts) = setup().await;
    let tde = parts.tde();
    let kms = kms_key(&parts).await;
    let db1 = tde.create_client("db1").await.unwrap();
    let db2 = tde.create_client("db2").await.unwrap();
    tde.create_key("db1", 1, &kms, 32).await.unwrap();
    tde.create_key("db1", 2, &kms, 16).await.unwrap();
    tde.create_key("db2", 1, &kms, 32).await.unwrap();
    let (v1, n1) = tde.read(&db1, 1, None).await.unwrap();
    assert_eq!((v1.len(), n1), (32, 1));
    assert_eq!(tde.rotate_key("db1", 1).await.unwrap().latest_version, 2);
    let (v2, n2) = tde.read(&db1, 1, None).await.unwrap();
    assert_eq!(n2, 2);
    assert_ne!(v1, v2, "a new version has new material");
    assert_eq!(
        tde.read(&db1, 1, Some(1)).await.unwrap().0,
        v1,
        "old versions stay readable"
    );
    assert_eq!(tde.read(&db1, 2, None).await.unwrap().0.len(), 16);
    // Same id, other client: other material; an id the client lacks: not found.
    assert_ne!(tde.read(&db2, 1, None).await.unwrap().0, v2);
    assert_eq!(
        tde.read(&db2, 2, None).await.unwrap_err(),
        TdeError::NotFound
    );
    assert_eq!(
        tde.read(&db1, 1, Some(3)).await.unwrap_err(),
        TdeError::NotFound
    );
    assert_eq!(
        tde.read("hvs.unknown", 1, None).await.unwrap_err(),
        TdeError::Forbidden
    );
    let listed = tde.list(Some("db1")).await.unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|k| (k.id, k.latest_version))
            .collect::<Vec<_>>(),
        vec![(1, 2), (2, 1)]
    );
}

#[tokio::test]
async fn revoked_tokens_disabled_keys_and_disabled_kms_keys_are_refused() {
    let (_dir, _config, parts) = setup().await;
    let tde = parts.tde();
    let kms = kms_key(&parts).await;
    let token = tde.create_client("db").await.unwrap();
    tde.create_key("db", 5, &kms, 32).await.unwrap();
    tde.set_enabled("db", 5, false).await.unwrap();
    assert_eq!(
        tde.read(&token, 5, None).await.unwrap_err(),
        TdeError::NotFound
    );
    tde.set_enabled("db", 5, true).await.unwrap();
    assert!(tde.read(&token, 5, None).await.is_ok());
    parts
        .service
        .disable_key(KeyIdRequest {
            key_id: kms.clone(),
            grant_tokens: None,
        })
        .await
        .unwrap();
    assert_eq!(
        tde.read(&token, 5, None).await.unwrap_err(),
        TdeError::Forbidden
    );
    parts
        .service
        .enable_key(KeyIdRequest {
            key_id: kms,
            grant_tokens: None,
        })
        .await
        .unwrap();
    tde.revoke_client("db").await.unwrap();
    assert_eq!(
        tde.read(&token, 5, None).await.unwrap_err(),
        TdeError::Forbidden
    );
    assert!(tde.create_key("db", 6, "alias/none", 32).await.is_err());
    assert!(
        tde.create_key("db", 7, "x", 20).await.is_err(),
        "20-byte keys are refused"
    );
}

#[tokio::test]
async fn a_wrapped_version_moved_to_another_place_does_not_unwrap() {
    let (_dir, config, parts) = setup().await;
    let tde = parts.tde();
    let kms = kms_key(&parts).await;
    let token = tde.create_client("db").await.unwrap();
    tde.create_key("db", 1, &kms, 32).await.unwrap();
    tde.rotate_key("db", 1).await.unwrap();
    // Someone with write access to the metadata copies version 1's blob over version 2.
    let conn = rusqlite::Connection::open(&config.metadata_path).unwrap();
    conn.execute(
        "UPDATE tde_versions SET wrapped = (SELECT wrapped FROM tde_versions WHERE version = 1) WHERE version = 2",
        [],
    )
    .unwrap();
    std::thread::sleep(keystore::store::EXTERNAL_CHECK_INTERVAL);
    assert!(matches!(
        tde.read(&token, 1, Some(2)).await,
        Err(TdeError::Unavailable(_))
    ));
    assert!(tde.read(&token, 1, Some(1)).await.is_ok());
}

fn http_get(addr: &str, path: &str, token: &str) -> std::io::Result<Vec<u8>> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nX-Vault-Token: {token}\r\nConnection: close\r\n\r\n")?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_front_drops_the_connection_instead_of_a_5xx_when_the_token_is_gone() {
    let (dir, _config, parts) = setup().await;
    let tde = parts.tde();
    let kms = kms_key(&parts).await;
    let token = tde.create_client("db").await.unwrap();
    tde.create_key("db", 1, &kms, 32).await.unwrap();
    drop(tde);
    drop(parts);

    let server = Server::dev(dir.path(), &["--tde-listen", "127.0.0.1:0"]);
    let addr = server.tde.clone().unwrap();

    let ok = http_get(&addr, "/v1/tde/data/1", &token).unwrap();
    assert!(
        ok.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&ok)
    );
    let missing = http_get(&addr, "/v1/tde/data/9", &token).unwrap();
    assert!(missing.starts_with(b"HTTP/1.1 404"));

    // The token goes away: its directory moved, its workers killed.
    std::fs::rename(dir.path().join("tokens"), dir.path().join("tokens-away")).unwrap();
    for w in children(server.id()) {
        let _ = Command::new("kill").args(["-9", &w.to_string()]).status();
    }
    let answer = http_get(&addr, "/v1/tde/data/1", &token);
    let bytes = answer.unwrap_or_default();
    assert!(
        bytes.is_empty(),
        "expected a dropped connection, got {:?}",
        String::from_utf8_lossy(&bytes)
    );

    // It comes back: the next request is answered again.
    std::fs::rename(dir.path().join("tokens-away"), dir.path().join("tokens")).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let back = http_get(&addr, "/v1/tde/data/1", &token).unwrap();
    // A hung token (its workers stopped): the connection is dropped within the read deadline,
    // so the database falls back to its cache instead of waiting out its own timeout.
    let stopped = children(server.id());
    for w in &stopped {
        let _ = Command::new("kill")
            .args(["-STOP", &w.to_string()])
            .status();
    }
    let asked = std::time::Instant::now();
    let hung = http_get(&addr, "/v1/tde/data/1", &token).unwrap_or_default();
    let waited = asked.elapsed();
    for w in &stopped {
        let _ = Command::new("kill")
            .args(["-CONT", &w.to_string()])
            .status();
    }
    server.kill();
    assert!(
        hung.is_empty(),
        "expected a dropped connection, got {:?}",
        String::from_utf8_lossy(&hung)
    );
    assert!(
        waited < std::time::Duration::from_secs(10),
        "dropped only after {waited:?}"
    );
    assert!(
        back.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&back)
    );
}

#[tokio::test]
async fn a_disconnected_key_store_is_an_outage_for_tde_reads_not_a_refusal() {
    let (_dir, _config, parts) = setup().await;
    let tde = parts.tde();
    let kms = kms_key(&parts).await;
    let token = tde.create_client("db").await.unwrap();
    tde.create_key("db", 1, &kms, 32).await.unwrap();
    let store = parts.service.default_key_store().unwrap().id();
    let request = |id: &str| keystore::wire::CustomKeyStoreIdRequest {
        custom_key_store_id: id.to_string(),
    };
    parts
        .service
        .disconnect_custom_key_store(request(&store))
        .await
        .unwrap();
    // Dropped connection (MariaDB rides it out on its cache), not a 403 (which would abort it).
    assert!(matches!(
        tde.read(&token, 1, None).await,
        Err(TdeError::Unavailable(_))
    ));
    parts
        .service
        .connect_custom_key_store(request(&store))
        .await
        .unwrap();
    assert!(tde.read(&token, 1, None).await.is_ok());
}
