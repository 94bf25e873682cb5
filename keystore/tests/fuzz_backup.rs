//! Backup files are hostile input (`hsmkms backup verify|restore FILE`): their parser must
//! refuse anything malformed with an error, never panic, and never read a body whose trailer is
//! missing or malformed.

use proptest::prelude::*;

fn trailer() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(any::<u8>(), 0..12),
        prop::collection::vec(any::<u8>(), 0..40),
        "[ -~]{0,12}",
    )
        .prop_map(|(id, tag, junk)| {
            format!(
                "hsmkms-backup-mac v2 {} {}{junk}\n",
                hex::encode(id),
                hex::encode(tag)
            )
        })
}

fn body() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("{}\n".to_string()),
        Just(
            r#"{"format":"hsmkms-backup-2","created_ms":1,"key_store_id":"cks-1","cluster_id":"c","domain_kcv":"00","keys":[],"aliases":[]}
"#
            .to_string()
        ),
        Just(r#"{"format":"hsmkms-backup-1","tag":""}"#.to_string()),
        "[ -~\n]{0,200}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = keystore::backup::parse(&bytes);
    }

    #[test]
    fn bodies_and_trailers_of_every_shape_never_panic(body in body(), trailer in trailer(), cut in 0usize..400) {
        let file = format!("{body}{trailer}");
        let _ = keystore::backup::parse(file.as_bytes());
        let cut = cut.min(file.len());
        let _ = keystore::backup::parse(&file.as_bytes()[..cut]);
    }
}

#[test]
fn a_first_format_file_is_refused_with_the_reason() {
    let e = keystore::backup::parse(br#"{"format":"hsmkms-backup-1","keys":[],"tag":"00"}"#)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("hsmkms-backup-1") && e.contains("backup create"),
        "{e}"
    );
}

#[test]
fn a_body_without_a_trailer_is_not_read() {
    let body = br#"{"format":"hsmkms-backup-2","created_ms":1,"key_store_id":"cks-1","cluster_id":"c","domain_kcv":"00","keys":[],"aliases":[]}
"#;
    let e = keystore::backup::parse(body).unwrap_err().to_string();
    assert!(e.contains("no MAC trailer"), "{e}");
}
