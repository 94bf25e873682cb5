//! `kill -9` of the real hsmkms process in the middle of CreateKey and Encrypt traffic: after a
//! restart no key is half-made, every key a client was told about works, and the token holds
//! exactly the keys the metadata knows.

mod support;

use std::time::Duration;

use support::{worker, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_create_key_leaves_no_half_made_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut confirmed = Vec::new();
    for round in 0..3u64 {
        let server = Server::dev(dir.path(), &[]);
        let mut c = server.client();
        let load = tokio::spawn(async move {
            let mut made = Vec::new();
            loop {
                match c
                    .call(
                        "CreateKey",
                        &serde_json::json!({"Description": "crash test"}),
                    )
                    .await
                {
                    Ok(a) if a.status == 200 => {
                        made.push(a.body["KeyMetadata"]["Arn"].as_str().unwrap().to_string())
                    }
                    // The server died under us: stop; what was confirmed is what counts.
                    _ => return made,
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(300 + 170 * round)).await;
        server.kill(); // SIGKILL
        confirmed.extend(load.await.unwrap());
    }
    assert!(
        !confirmed.is_empty(),
        "no CreateKey completed before the kills"
    );

    let server = Server::dev(dir.path(), &[]);
    let mut c = server.client();
    for arn in &confirmed {
        let a = c
            .call(
                "Encrypt",
                &serde_json::json!({"KeyId": arn, "Plaintext": "aGVsbG8="}),
            )
            .await
            .unwrap();
        assert_eq!(
            a.status, 200,
            "confirmed key {arn} does not work: {:?}",
            a.body
        );
        let d = c
            .call(
                "Decrypt",
                &serde_json::json!({"CiphertextBlob": a.body["CiphertextBlob"]}),
            )
            .await
            .unwrap();
        assert_eq!(d.body["Plaintext"], "aGVsbG8=");
    }
    let mut listed = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let mut req = serde_json::json!({"Limit": 1000});
        if let Some(m) = &marker {
            req["Marker"] = serde_json::json!(m);
        }
        let a = c.call("ListKeys", &req).await.unwrap();
        for k in a.body["Keys"].as_array().unwrap() {
            listed.push(k["KeyId"].as_str().unwrap().to_string());
        }
        match a.body["NextMarker"].as_str() {
            Some(m) => marker = Some(m.to_string()),
            None => break,
        }
    }
    server.kill();

    // The token, seen directly, holds exactly the listed keys: nothing half-made survived.
    let config = keystore::config::Config::load(&dir.path().join("hsmkms.toml")).unwrap();
    let pool = hsm::TokenPool::start(
        keystore::app::token_config(&config.key_store.as_ref().unwrap().tokens[0]).unwrap(),
        worker(),
    )
    .await
    .unwrap();
    let mut on_token: Vec<String> = pool
        .list_keys()
        .await
        .unwrap()
        .iter()
        .map(hsm::format_key_id)
        .collect();
    on_token.sort();
    listed.sort();
    assert_eq!(on_token, listed);
    for arn in &confirmed {
        assert!(
            listed.iter().any(|id| arn.ends_with(id.as_str())),
            "{arn} lost"
        );
    }
    println!(
        "crash test: {} keys confirmed across 3 kills, {} listed, {} on the token",
        confirmed.len(),
        listed.len(),
        on_token.len()
    );
}
