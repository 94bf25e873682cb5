"""hsmkms through the AWS CLI (`aws kms ... --endpoint-url`): every operation of the contract and
its failure cases, as a person at a terminal would use them."""

from __future__ import annotations

import base64
import json
import os
import uuid

import pytest

from e2e_support import (
    ALIAS_ARN_PREFIX,
    assert_symmetric_key_metadata,
    aws_fail,
    aws_kms,
    aws_ok,
    key_id_of,
)

CTX_JSON = json.dumps({"purpose": "cli", "tenant": "t-1"})


@pytest.fixture(scope="module")
def cli(endpoint):
    """cli.ok(*args) -> JSON output; cli.fail(*args) -> exception name."""

    class Cli:
        def ok(self, *args):
            return aws_ok(endpoint, *args)

        def fail(self, *args):
            return aws_fail(endpoint, *args)

        def run(self, *args):
            return aws_kms(endpoint, *args)

    return Cli()


@pytest.fixture
def key(cli):
    """A fresh key made with the CLI; its ARN."""
    return cli.ok("create-key", "--description", "cli test key")["KeyMetadata"]["Arn"]


def write(tmp_path, name, data: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return f"fileb://{p}"


def test_create_and_describe(cli):
    md = cli.ok(
        "create-key",
        "--description", "made by the aws CLI",
        "--tags", "TagKey=team,TagValue=cli", "TagKey=env,TagValue=test",
    )["KeyMetadata"]
    assert_symmetric_key_metadata(md)
    described = cli.ok("describe-key", "--key-id", key_id_of(md["Arn"]))["KeyMetadata"]
    assert described["Arn"] == md["Arn"]
    assert described["Description"] == "made by the aws CLI"
    tags = cli.ok("list-resource-tags", "--key-id", md["Arn"])["Tags"]
    assert sorted((t["TagKey"], t["TagValue"]) for t in tags) == [("env", "test"), ("team", "cli")]


def test_create_key_refusals(cli):
    before = len(cli.ok("list-keys")["Keys"])
    assert cli.fail("create-key", "--key-spec", "RSA_2048") in (
        "ValidationException", "UnsupportedOperationException")
    assert cli.fail("create-key", "--key-usage", "SIGN_VERIFY") in (
        "ValidationException", "UnsupportedOperationException")
    assert cli.fail("create-key", "--multi-region") == "UnsupportedOperationException"
    assert cli.fail("create-key", "--origin", "EXTERNAL") == "UnsupportedOperationException"
    assert len(cli.ok("list-keys")["Keys"]) == before


def test_list_keys_with_pagination(cli):
    made = {cli.ok("create-key")["KeyMetadata"]["Arn"] for _ in range(3)}
    # The CLI follows NextMarker itself (--page-size sets Limit per request).
    all_keys = cli.ok("list-keys", "--page-size", "1")["Keys"]
    arns = [k["KeyArn"] for k in all_keys]
    assert made <= set(arns)
    assert len(arns) == len(set(arns))
    assert all(k["KeyId"] == key_id_of(k["KeyArn"]) for k in all_keys)
    # One page at a time by hand.
    page = cli.ok("list-keys", "--limit", "2", "--no-paginate")
    assert len(page["Keys"]) == 2 and page["Truncated"] is True
    seen = [k["KeyArn"] for k in page["Keys"]]
    while page.get("Truncated"):
        page = cli.ok("list-keys", "--limit", "2", "--marker", page["NextMarker"], "--no-paginate")
        seen += [k["KeyArn"] for k in page["Keys"]]
    assert seen == arns
    # --max-items: the CLI's own token on top of the service's markers.
    first = cli.ok("list-keys", "--max-items", "2", "--page-size", "1")
    assert len(first["Keys"]) == 2 and first.get("NextToken")
    rest = cli.ok("list-keys", "--starting-token", first["NextToken"], "--page-size", "1")
    assert [k["KeyArn"] for k in first["Keys"] + rest["Keys"]] == arns
    print(f"list-keys: {len(arns)} keys in pages of 1 and 2")


def test_encrypt_decrypt_with_files(cli, key, tmp_path):
    plaintext = os.urandom(300)
    enc = cli.ok("encrypt", "--key-id", key, "--plaintext", write(tmp_path, "pt", plaintext),
                 "--encryption-context", CTX_JSON)
    assert enc["KeyId"] == key
    assert enc["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    blob = base64.b64decode(enc["CiphertextBlob"])
    ct = write(tmp_path, "ct", blob)
    dec = cli.ok("decrypt", "--ciphertext-blob", ct, "--encryption-context", CTX_JSON)
    assert base64.b64decode(dec["Plaintext"]) == plaintext
    assert dec["KeyId"] == key
    dec = cli.ok("decrypt", "--ciphertext-blob", ct, "--key-id", key,
                 "--encryption-context", "purpose=cli,tenant=t-1")
    assert base64.b64decode(dec["Plaintext"]) == plaintext

    # The way the AWS docs show it: --output text --query Plaintext | base64 -d
    r = cli.run("decrypt", "--ciphertext-blob", ct, "--encryption-context", CTX_JSON,
                "--query", "Plaintext", "--output", "text")
    assert r.returncode == 0, r.stderr
    assert base64.b64decode(r.stdout.strip()) == plaintext

    assert cli.fail("decrypt", "--ciphertext-blob", ct) == "InvalidCiphertextException"
    assert cli.fail("decrypt", "--ciphertext-blob", ct, "--encryption-context",
                    '{"purpose": "cli", "tenant": "t-2"}') == "InvalidCiphertextException"
    tampered = bytearray(blob)
    tampered[-1] ^= 0x80
    assert cli.fail("decrypt", "--ciphertext-blob", write(tmp_path, "bad", bytes(tampered)),
                    "--encryption-context", CTX_JSON) == "InvalidCiphertextException"


def test_encrypt_size_and_algorithm_errors(cli, key, tmp_path):
    ok = cli.ok("encrypt", "--key-id", key, "--plaintext", write(tmp_path, "4096", b"z" * 4096))
    assert ok["KeyId"] == key
    assert cli.fail("encrypt", "--key-id", key, "--plaintext",
                    write(tmp_path, "4097", b"z" * 4097)) == "ValidationException"
    assert cli.fail("encrypt", "--key-id", key, "--plaintext", write(tmp_path, "x", b"x"),
                    "--encryption-algorithm", "RSAES_OAEP_SHA_256") == "InvalidKeyUsageException"


def test_decrypt_with_another_key_id(cli, key, tmp_path):
    other = cli.ok("create-key")["KeyMetadata"]["Arn"]
    enc = cli.ok("encrypt", "--key-id", key, "--plaintext", write(tmp_path, "pt", b"mine"))
    ct = write(tmp_path, "ct", base64.b64decode(enc["CiphertextBlob"]))
    assert cli.fail("decrypt", "--ciphertext-blob", ct, "--key-id", other) == \
        "IncorrectKeyException"


def test_re_encrypt(cli, key, tmp_path):
    dest = cli.ok("create-key", "--description", "re-encrypt destination")["KeyMetadata"]["Arn"]
    enc = cli.ok("encrypt", "--key-id", key, "--plaintext", write(tmp_path, "pt", b"travel"),
                 "--encryption-context", CTX_JSON)
    ct = write(tmp_path, "ct", base64.b64decode(enc["CiphertextBlob"]))
    re = cli.ok("re-encrypt", "--ciphertext-blob", ct, "--source-encryption-context", CTX_JSON,
                "--destination-key-id", dest,
                "--destination-encryption-context", '{"moved": "yes"}')
    assert re["SourceKeyId"] == key and re["KeyId"] == dest
    ct2 = write(tmp_path, "ct2", base64.b64decode(re["CiphertextBlob"]))
    dec = cli.ok("decrypt", "--ciphertext-blob", ct2, "--encryption-context", '{"moved": "yes"}')
    assert base64.b64decode(dec["Plaintext"]) == b"travel" and dec["KeyId"] == dest
    assert cli.fail("re-encrypt", "--ciphertext-blob", ct, "--destination-key-id", dest) == \
        "InvalidCiphertextException"


def test_data_keys(cli, key, tmp_path):
    dk = cli.ok("generate-data-key", "--key-id", key, "--key-spec", "AES_256",
                "--encryption-context", CTX_JSON)
    assert dk["KeyId"] == key
    pt = base64.b64decode(dk["Plaintext"])
    assert len(pt) == 32
    ct = write(tmp_path, "dk", base64.b64decode(dk["CiphertextBlob"]))
    dec = cli.ok("decrypt", "--ciphertext-blob", ct, "--encryption-context", CTX_JSON)
    assert base64.b64decode(dec["Plaintext"]) == pt

    dk = cli.ok("generate-data-key", "--key-id", key, "--key-spec", "AES_128")
    assert len(base64.b64decode(dk["Plaintext"])) == 16
    dk = cli.ok("generate-data-key", "--key-id", key, "--number-of-bytes", "1024")
    assert len(base64.b64decode(dk["Plaintext"])) == 1024
    assert cli.fail("generate-data-key", "--key-id", key, "--number-of-bytes", "1025") == \
        "ValidationException"

    wp = cli.ok("generate-data-key-without-plaintext", "--key-id", key, "--key-spec", "AES_256")
    assert "Plaintext" not in wp and wp["KeyId"] == key
    dec = cli.ok("decrypt", "--ciphertext-blob",
                 write(tmp_path, "wp", base64.b64decode(wp["CiphertextBlob"])))
    assert len(base64.b64decode(dec["Plaintext"])) == 32


def test_generate_random(cli):
    for n in (1, 32, 1024):
        r = cli.ok("generate-random", "--number-of-bytes", str(n))
        assert len(base64.b64decode(r["Plaintext"])) == n
    assert cli.fail("generate-random", "--number-of-bytes", "1025") == "ValidationException"
    # Through --output text, as a shell script would take it.
    r = cli.run("generate-random", "--number-of-bytes", "16", "--query", "Plaintext",
                "--output", "text")
    assert r.returncode == 0 and len(base64.b64decode(r.stdout.strip())) == 16


def test_aliases(cli, key, tmp_path):
    other = cli.ok("create-key")["KeyMetadata"]["Arn"]
    name = f"alias/cli-{uuid.uuid4().hex[:10]}"
    assert cli.ok("create-alias", "--alias-name", name, "--target-key-id", key) is None
    assert cli.fail("create-alias", "--alias-name", name, "--target-key-id", other) == \
        "AlreadyExistsException"
    assert cli.ok("describe-key", "--key-id", name)["KeyMetadata"]["Arn"] == key
    alias_arn = ALIAS_ARN_PREFIX + name[len("alias/"):]
    assert cli.ok("describe-key", "--key-id", alias_arn)["KeyMetadata"]["Arn"] == key
    enc = cli.ok("encrypt", "--key-id", name, "--plaintext", write(tmp_path, "pt", b"via alias"))
    assert enc["KeyId"] == key

    listed = cli.ok("list-aliases")["Aliases"]
    mine = [a for a in listed if a["AliasName"] == name]
    assert len(mine) == 1
    assert mine[0]["AliasArn"] == alias_arn
    assert key_id_of(mine[0]["TargetKeyId"]) == key_id_of(key)
    filtered = cli.ok("list-aliases", "--key-id", key)["Aliases"]
    assert [a["AliasName"] for a in filtered] == [name]

    assert cli.ok("update-alias", "--alias-name", name, "--target-key-id", other) is None
    assert cli.ok("describe-key", "--key-id", name)["KeyMetadata"]["Arn"] == other
    assert cli.ok("list-aliases", "--key-id", key)["Aliases"] == []
    assert [a["AliasName"] for a in cli.ok("list-aliases", "--key-id", other)["Aliases"]] == [name]
    # The old ciphertext still decrypts (the key behind it did not change).
    ct = write(tmp_path, "ct", base64.b64decode(enc["CiphertextBlob"]))
    assert cli.ok("decrypt", "--ciphertext-blob", ct)["KeyId"] == key

    assert cli.ok("delete-alias", "--alias-name", name) is None
    assert cli.fail("describe-key", "--key-id", name) == "NotFoundException"
    assert cli.fail("delete-alias", "--alias-name", name) == "NotFoundException"


def test_list_aliases_with_pagination(cli, key):
    names = sorted(f"alias/cli-page-{uuid.uuid4().hex[:8]}" for _ in range(3))
    for n in names:
        cli.ok("create-alias", "--alias-name", n, "--target-key-id", key)
    got = cli.ok("list-aliases", "--key-id", key, "--page-size", "1")["Aliases"]
    assert sorted(a["AliasName"] for a in got) == names
    page = cli.ok("list-aliases", "--key-id", key, "--limit", "2", "--no-paginate")
    assert len(page["Aliases"]) == 2 and page["Truncated"] is True and page["NextMarker"]


def test_enable_disable(cli, key, tmp_path):
    pt = write(tmp_path, "pt", b"x")
    assert cli.ok("disable-key", "--key-id", key) is None
    md = cli.ok("describe-key", "--key-id", key)["KeyMetadata"]
    assert md["KeyState"] == "Disabled" and md["Enabled"] is False
    assert cli.fail("encrypt", "--key-id", key, "--plaintext", pt) == "DisabledException"
    assert cli.ok("enable-key", "--key-id", key) is None
    assert cli.ok("describe-key", "--key-id", key)["KeyMetadata"]["KeyState"] == "Enabled"
    assert cli.ok("encrypt", "--key-id", key, "--plaintext", pt)["KeyId"] == key


def test_schedule_and_cancel_deletion(cli, key, tmp_path):
    pt = write(tmp_path, "pt", b"x")
    r = cli.ok("schedule-key-deletion", "--key-id", key, "--pending-window-in-days", "7")
    assert r["KeyId"] == key and r["KeyState"] == "PendingDeletion" and r["DeletionDate"]
    assert cli.ok("describe-key", "--key-id", key)["KeyMetadata"]["KeyState"] == "PendingDeletion"
    assert cli.fail("encrypt", "--key-id", key, "--plaintext", pt) == "KMSInvalidStateException"
    assert cli.fail("schedule-key-deletion", "--key-id", key) == "KMSInvalidStateException"
    r = cli.ok("cancel-key-deletion", "--key-id", key)
    assert r["KeyId"] == key
    assert cli.ok("describe-key", "--key-id", key)["KeyMetadata"]["KeyState"] == "Disabled"
    for days in ("6", "31"):
        assert cli.fail("schedule-key-deletion", "--key-id", key,
                        "--pending-window-in-days", days) == "ValidationException"
    r = cli.ok("schedule-key-deletion", "--key-id", key)
    assert r["KeyState"] == "PendingDeletion"
    cli.ok("cancel-key-deletion", "--key-id", key)


def test_tags_and_description(cli, key):
    assert cli.ok("tag-resource", "--key-id", key, "--tags",
                  "TagKey=a,TagValue=1", "TagKey=b,TagValue=2") is None
    tags = cli.ok("list-resource-tags", "--key-id", key)["Tags"]
    assert sorted((t["TagKey"], t["TagValue"]) for t in tags) == [("a", "1"), ("b", "2")]
    assert cli.ok("untag-resource", "--key-id", key, "--tag-keys", "a") is None
    assert cli.ok("list-resource-tags", "--key-id", key)["Tags"] == [
        {"TagKey": "b", "TagValue": "2"}]
    assert cli.ok("update-key-description", "--key-id", key, "--description", "renamed") is None
    assert cli.ok("describe-key", "--key-id", key)["KeyMetadata"]["Description"] == "renamed"


def test_rotation(cli, key):
    assert cli.ok("get-key-rotation-status", "--key-id", key)["KeyRotationEnabled"] is False
    for op in ("enable-key-rotation", "disable-key-rotation", "rotate-key-on-demand"):
        assert cli.fail(op, "--key-id", key) == "UnsupportedOperationException", op


def test_not_found(cli, tmp_path):
    ghost = str(uuid.uuid4())
    pt = write(tmp_path, "pt", b"x")
    assert cli.fail("describe-key", "--key-id", ghost) == "NotFoundException"
    assert cli.fail("encrypt", "--key-id", ghost, "--plaintext", pt) == "NotFoundException"
    assert cli.fail("describe-key", "--key-id",
                    f"arn:aws:kms:eu-west-1:111122223333:key/{ghost}") == "NotFoundException"
    assert cli.fail("describe-key", "--key-id", "alias/cli-nothing-here") == "NotFoundException"
    assert cli.fail("enable-key", "--key-id", ghost) == "NotFoundException"


def test_foreign_region_arn_of_a_real_key(cli, key):
    foreign = key.replace(":us-east-1:", ":eu-west-1:")
    assert cli.fail("describe-key", "--key-id", foreign) == "NotFoundException"


def test_bad_credentials(endpoint, cli):
    before = len(cli.ok("list-keys")["Keys"])
    r = aws_kms(endpoint, "create-key", env={"AWS_SECRET_ACCESS_KEY": "wrong"})
    assert r.returncode != 0
    assert "(InvalidSignatureException)" in r.stderr, r.stderr
    r = aws_kms(endpoint, "list-keys", env={"AWS_ACCESS_KEY_ID": "AKIAUNKNOWN000000000"})
    assert r.returncode != 0
    assert "(UnrecognizedClientException)" in r.stderr, r.stderr
    assert len(cli.ok("list-keys")["Keys"]) == before
