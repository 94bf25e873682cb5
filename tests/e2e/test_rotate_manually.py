"""`hsmkms key rotate-manually`: a new key in the same store, the alias moved to it, the old key
kept so that old ciphertexts still decrypt. Run while the server runs."""

from __future__ import annotations

import json

from e2e_support import KEY_ARN_RE, expect_error, key_id_of, list_all_aliases

CTX = {"app": "rotation"}


def rotate(server, alias: str):
    r = server.run_cli("key", "rotate-manually", "--data-dir", str(server.data_dir), alias)
    return r


def test_rotate_manually_moves_the_alias_and_keeps_the_old_key(fresh_server):
    kms = fresh_server.client()
    old = kms.create_key(Description="before rotation",
                         Tags=[{"TagKey": "app", "TagValue": "billing"}])["KeyMetadata"]
    old_arn = old["Arn"]
    alias = "alias/billing"
    kms.create_alias(AliasName=alias, TargetKeyId=old_arn)
    old_blobs = [
        kms.encrypt(KeyId=alias, Plaintext=f"old {i}".encode(), EncryptionContext=CTX)[
            "CiphertextBlob"]
        for i in range(5)
    ]
    old_dk = kms.generate_data_key(KeyId=alias, KeySpec="AES_256")

    r = rotate(fresh_server, alias)
    assert r.returncode == 0, f"rotate-manually failed ({r.returncode}): {r.stderr}"
    out = json.loads(r.stdout)
    print(f"rotate-manually: {out}")
    assert out["AliasName"] == alias
    assert out["OldKeyId"] == old_arn
    new_arn = out["NewKeyId"]
    assert KEY_ARN_RE.match(new_arn) and new_arn != old_arn

    # The running server sees the move at once.
    new_md = kms.describe_key(KeyId=alias)["KeyMetadata"]
    assert new_md["Arn"] == new_arn
    assert new_md["KeyState"] == "Enabled"
    assert new_md["CustomKeyStoreId"] == old["CustomKeyStoreId"]
    assert new_md["CloudHsmClusterId"] == old["CloudHsmClusterId"]
    [entry] = [a for a in list_all_aliases(kms) if a["AliasName"] == alias]
    assert key_id_of(entry["TargetKeyId"]) == key_id_of(new_arn)

    enc = kms.encrypt(KeyId=alias, Plaintext=b"new", EncryptionContext=CTX)
    assert enc["KeyId"] == new_arn
    assert kms.decrypt(CiphertextBlob=enc["CiphertextBlob"], EncryptionContext=CTX)["KeyId"] == \
        new_arn

    # The old key is kept, enabled, and still decrypts what it encrypted.
    assert kms.describe_key(KeyId=old_arn)["KeyMetadata"]["KeyState"] == "Enabled"
    for i, blob in enumerate(old_blobs):
        dec = kms.decrypt(CiphertextBlob=blob, EncryptionContext=CTX)
        assert dec["Plaintext"] == f"old {i}".encode() and dec["KeyId"] == old_arn
        assert kms.decrypt(CiphertextBlob=blob, EncryptionContext=CTX, KeyId=old_arn)[
            "KeyId"] == old_arn
    assert kms.decrypt(CiphertextBlob=old_dk["CiphertextBlob"])["Plaintext"] == old_dk["Plaintext"]
    # ... but not under the alias, which now names the new key.
    expect_error("IncorrectKeyException", kms.decrypt, CiphertextBlob=old_blobs[0],
                 EncryptionContext=CTX, KeyId=alias)

    # Rotating again moves on to a third key; everything survives a restart.
    r = rotate(fresh_server, alias)
    assert r.returncode == 0, r.stderr
    third = json.loads(r.stdout)
    assert third["OldKeyId"] == new_arn and third["NewKeyId"] not in (old_arn, new_arn)
    fresh_server.restart()
    kms = fresh_server.client()
    assert kms.describe_key(KeyId=alias)["KeyMetadata"]["Arn"] == third["NewKeyId"]
    assert kms.decrypt(CiphertextBlob=old_blobs[0], EncryptionContext=CTX)["KeyId"] == old_arn
    assert kms.decrypt(CiphertextBlob=enc["CiphertextBlob"], EncryptionContext=CTX)["KeyId"] == \
        new_arn


def test_rotate_manually_of_an_unknown_alias_fails_cleanly(fresh_server):
    kms = fresh_server.client()
    before = len(kms.list_keys(Limit=1000)["Keys"])
    r = rotate(fresh_server, "alias/does-not-exist")
    assert r.returncode != 0, r.stdout
    assert r.stderr.strip(), "no error message"
    assert len(kms.list_keys(Limit=1000)["Keys"]) == before, "a key was made anyway"
