//! Data keys and plaintexts leave the service only in their answer: the buffers that carry them
//! through serialisation are zeroed when done, so a dump of the service's memory after many
//! answers finds none of them.
//!
//! Only the base64 form is searched: it exists only in the answer's JSON, which is what this
//! checks. (The raw bytes also cross the worker pipe's read buffer, which is reused, not freed.)

mod support;

use keystore::dev::DEV_SECRET_ACCESS_KEY;
use support::{memory_holds, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_data_keys_leave_no_copy_in_the_service_memory() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::dev(dir.path(), &[]);
    let mut c = server.client();
    let key = c
        .call("CreateKey", &serde_json::json!({}))
        .await
        .unwrap()
        .body["KeyMetadata"]["Arn"]
        .as_str()
        .unwrap()
        .to_string();
    let mut answered = Vec::new();
    for _ in 0..60 {
        let g = c
            .call(
                "GenerateDataKey",
                &serde_json::json!({"KeyId": key, "KeySpec": "AES_256"}),
            )
            .await
            .unwrap();
        assert_eq!(g.status, 200, "{:?}", g.body);
        let d = c
            .call(
                "Decrypt",
                &serde_json::json!({"CiphertextBlob": g.body["CiphertextBlob"]}),
            )
            .await
            .unwrap();
        assert_eq!(d.status, 200, "{:?}", d.body);
        assert_eq!(d.body["Plaintext"], g.body["Plaintext"]);
        answered.push(g.body["Plaintext"].as_str().unwrap().to_string());
    }
    // A positive control proves the search can find something: the service does hold the dev
    // principal's secret (it verifies signatures with it).
    let dumps = tempfile::tempdir().unwrap();
    let mut needles: Vec<&[u8]> = answered.iter().map(|k| k.as_bytes()).collect();
    needles.push(DEV_SECRET_ACCESS_KEY.as_bytes());
    let mut found = memory_holds(server.id(), &needles, dumps.path());
    server.kill();
    let control = found.pop().unwrap();
    let copies = found.iter().filter(|f| **f).count();
    println!(
        "secret copies: {copies} of {} answered data keys found in the service's memory",
        found.len()
    );
    assert!(
        control,
        "positive control failed: the dump search is broken"
    );
    assert_eq!(
        copies, 0,
        "answered data keys are still in the service's memory"
    );
}
