"""hsmkms through boto3: the core flows, every error case of the contract, KeyId forms, encryption
context binding, and what survives a restart."""

from __future__ import annotations

import datetime as dt
import os
import uuid

import pytest

from e2e_support import (
    ACCOUNT,
    ALIAS_ARN_PREFIX,
    REGION,
    assert_key_ids_are_arns,
    assert_symmetric_key_metadata,
    expect_error,
    key_id_of,
    kms_client,
    list_all_aliases,
    list_all_keys,
)

CTX = {"purpose": "e2e", "tenant": "t-1"}


# ------------------------------------------------------------------------------------------
# CreateKey / DescribeKey


def test_create_key_reports_a_cloudhsm_symmetric_key(kms):
    resp = kms.create_key(
        Description="created by test_boto3",
        Tags=[{"TagKey": "team", "TagValue": "e2e"}],
    )
    md = resp["KeyMetadata"]
    assert_symmetric_key_metadata(md)
    assert md["Enabled"] is True
    assert md["Description"] == "created by test_boto3"
    assert isinstance(md["CreationDate"], dt.datetime)
    assert abs((dt.datetime.now(dt.timezone.utc) - md["CreationDate"]).total_seconds()) < 600
    if "AWSAccountId" in md:
        assert md["AWSAccountId"] == ACCOUNT

    described = kms.describe_key(KeyId=md["Arn"])["KeyMetadata"]
    for field in ("Arn", "KeyId", "Origin", "CustomKeyStoreId", "CloudHsmClusterId", "KeyState",
                  "Description", "KeySpec", "KeyUsage", "MultiRegion"):
        assert described[field] == md[field], field
    tags = kms.list_resource_tags(KeyId=md["Arn"])["Tags"]
    assert tags == [{"TagKey": "team", "TagValue": "e2e"}]


def test_create_key_with_origin_aws_cloudhsm_is_accepted(kms):
    md = kms.create_key(Origin="AWS_CLOUDHSM")["KeyMetadata"]
    assert md["Origin"] == "AWS_CLOUDHSM"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"KeySpec": "RSA_2048"},
        {"KeySpec": "HMAC_256"},
        {"KeyUsage": "SIGN_VERIFY"},
        {"KeyUsage": "GENERATE_VERIFY_MAC"},
        {"CustomerMasterKeySpec": "ECC_NIST_P256"},
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_create_key_refuses_other_specs_and_usages(kms, kwargs):
    before = len(list_all_keys(kms))
    expect_error({"ValidationException", "UnsupportedOperationException"}, kms.create_key, **kwargs)
    assert len(list_all_keys(kms)) == before


@pytest.mark.parametrize(
    "kwargs",
    [
        {"MultiRegion": True},
        {"Origin": "EXTERNAL"},
        {"Origin": "EXTERNAL_KEY_STORE"},
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_create_key_refuses_multi_region_and_other_origins(kms, kwargs):
    before = len(list_all_keys(kms))
    expect_error("UnsupportedOperationException", kms.create_key, **kwargs)
    assert len(list_all_keys(kms)) == before


def test_list_keys_paginates(kms, new_key):
    mine = {new_key(f"page-{i}") for i in range(5)}
    everything = list_all_keys(kms)
    arns = [k["KeyArn"] for k in everything]
    assert len(arns) == len(set(arns)), "ListKeys returned a key twice"
    assert mine <= set(arns)
    for k in everything:
        assert k["KeyId"] == key_id_of(k["KeyArn"]), k

    paged = list_all_keys(kms, limit=2)
    assert [k["KeyArn"] for k in paged] == arns, "paging with Limit=2 gave a different list"

    first = kms.list_keys(Limit=1)
    assert len(first["Keys"]) == 1
    assert first["Truncated"] is True
    assert first["NextMarker"]

    big = kms.list_keys(Limit=1000)
    assert big["Truncated"] is False
    assert not big.get("NextMarker")
    print(f"ListKeys: {len(everything)} keys, pages of 2 agree")


@pytest.mark.parametrize("limit", [0, 1001])
def test_list_keys_limit_out_of_range(kms, limit):
    expect_error("ValidationException", kms.list_keys, Limit=limit)


def test_list_keys_bad_marker(kms):
    expect_error(("InvalidMarkerException", "ValidationException"), kms.list_keys,
                 Marker="not-a-marker-!!")


# ------------------------------------------------------------------------------------------
# KeyId forms


def test_key_id_forms_name_the_same_key(kms, new_key, alias_name):
    arn = new_key("forms")
    kid = key_id_of(arn)
    kms.create_alias(AliasName=alias_name, TargetKeyId=kid)
    alias_arn = ALIAS_ARN_PREFIX + alias_name[len("alias/"):]
    for form in (kid, arn, alias_name, alias_arn):
        md = kms.describe_key(KeyId=form)["KeyMetadata"]
        assert md["Arn"] == arn, form
        assert md["KeyId"] == kid, form
        enc = kms.encrypt(KeyId=form, Plaintext=b"forms")
        assert enc["KeyId"] == arn, form
        dec = kms.decrypt(CiphertextBlob=enc["CiphertextBlob"], KeyId=form)
        assert dec["Plaintext"] == b"forms"
        assert dec["KeyId"] == arn


def test_foreign_and_unknown_key_ids_are_not_found(kms, new_key, alias_name):
    arn = new_key("foreign")
    kid = key_id_of(arn)
    kms.create_alias(AliasName=alias_name, TargetKeyId=arn)
    name = alias_name[len("alias/"):]
    for bad in (
        f"arn:aws:kms:eu-west-1:{ACCOUNT}:key/{kid}",
        f"arn:aws:kms:{REGION}:444455556666:key/{kid}",
        f"arn:aws:kms:eu-west-1:{ACCOUNT}:alias/{name}",
        f"arn:aws:kms:{REGION}:444455556666:alias/{name}",
        str(uuid.uuid4()),
        f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{uuid.uuid4()}",
        "alias/e2e-does-not-exist",
        f"{ALIAS_ARN_PREFIX}e2e-does-not-exist",
    ):
        expect_error("NotFoundException", kms.describe_key, KeyId=bad)
        expect_error("NotFoundException", kms.encrypt, KeyId=bad, Plaintext=b"x")


def test_malformed_key_id(kms):
    expect_error(("NotFoundException", "ValidationException"), kms.describe_key, KeyId="")
    expect_error(("NotFoundException", "ValidationException"), kms.describe_key,
                 KeyId="x" * 3000)


# ------------------------------------------------------------------------------------------
# Encrypt / Decrypt / ReEncrypt


def test_encrypt_decrypt_with_context(kms, new_key):
    arn = new_key("ctx")
    plaintext = os.urandom(100)
    enc = kms.encrypt(KeyId=arn, Plaintext=plaintext, EncryptionContext=CTX)
    assert enc["KeyId"] == arn
    assert enc["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    blob = enc["CiphertextBlob"]
    assert plaintext not in blob
    assert len(blob) <= 6144

    dec = kms.decrypt(CiphertextBlob=blob, EncryptionContext=CTX)
    assert dec["Plaintext"] == plaintext
    assert dec["KeyId"] == arn
    assert dec["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"

    # Same context in a different order is the same context.
    reordered = dict(reversed(list(CTX.items())))
    assert kms.decrypt(CiphertextBlob=blob, EncryptionContext=reordered)["Plaintext"] == plaintext

    # Two encryptions of one plaintext differ.
    assert kms.encrypt(KeyId=arn, Plaintext=plaintext, EncryptionContext=CTX)["CiphertextBlob"] != blob


@pytest.mark.parametrize(
    "context",
    [
        None,
        {},
        {"purpose": "e2e"},
        {"purpose": "e2e", "tenant": "t-2"},
        {"purpose": "e2e", "tenant": "t-1", "extra": "x"},
        {"purpose": "e2e", "Tenant": "t-1"},
    ],
    ids=["missing", "empty", "subset", "other-value", "superset", "key-case"],
)
def test_wrong_encryption_context_fails(kms, new_key, context):
    arn = new_key("wrong-ctx")
    blob = kms.encrypt(KeyId=arn, Plaintext=b"secret", EncryptionContext=CTX)["CiphertextBlob"]
    kw = {} if context is None else {"EncryptionContext": context}
    expect_error("InvalidCiphertextException", kms.decrypt, CiphertextBlob=blob, **kw)


def test_context_is_bound_even_when_encrypted_without_one(kms, new_key):
    arn = new_key("no-ctx")
    blob = kms.encrypt(KeyId=arn, Plaintext=b"secret")["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"secret"
    assert kms.decrypt(CiphertextBlob=blob, EncryptionContext={})["Plaintext"] == b"secret"
    expect_error("InvalidCiphertextException", kms.decrypt, CiphertextBlob=blob,
                 EncryptionContext={"a": "b"})


def test_tampered_ciphertext_fails(kms, new_key):
    arn = new_key("tamper")
    blob = kms.encrypt(KeyId=arn, Plaintext=os.urandom(64), EncryptionContext=CTX)["CiphertextBlob"]
    positions = sorted({len(blob) - 1, len(blob) - 20, len(blob) // 2})
    for pos in positions:
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        expect_error("InvalidCiphertextException", kms.decrypt, CiphertextBlob=bytes(bad),
                     EncryptionContext=CTX)
    # Truncated, extended and garbage blobs.
    for bad in (blob[:-1], blob + b"\0", blob[:10], os.urandom(len(blob)), b"\x00" * 100):
        expect_error(("InvalidCiphertextException", "NotFoundException", "ValidationException"),
                     kms.decrypt, CiphertextBlob=bad, EncryptionContext=CTX)
    # The untouched blob still decrypts.
    assert kms.decrypt(CiphertextBlob=blob, EncryptionContext=CTX)["KeyId"] == arn


def test_decrypt_with_the_wrong_key_id(kms, new_key):
    a, b = new_key("A"), new_key("B")
    blob = kms.encrypt(KeyId=a, Plaintext=b"for A")["CiphertextBlob"]
    expect_error("IncorrectKeyException", kms.decrypt, CiphertextBlob=blob, KeyId=b)
    expect_error("IncorrectKeyException", kms.decrypt, CiphertextBlob=blob, KeyId=key_id_of(b))
    assert kms.decrypt(CiphertextBlob=blob, KeyId=a)["Plaintext"] == b"for A"


def test_decrypt_without_key_id(kms, new_key):
    arns = [new_key(f"nokid-{i}") for i in range(3)]
    blobs = [kms.encrypt(KeyId=a, Plaintext=a.encode())["CiphertextBlob"] for a in arns]
    for arn, blob in zip(arns, blobs):
        dec = kms.decrypt(CiphertextBlob=blob)
        assert dec["KeyId"] == arn
        assert dec["Plaintext"] == arn.encode()


def test_plaintext_size_limits(kms, new_key):
    arn = new_key("sizes")
    for n in (1, 4096):
        pt = os.urandom(n)
        blob = kms.encrypt(KeyId=arn, Plaintext=pt)["CiphertextBlob"]
        assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == pt
    expect_error("ValidationException", kms.encrypt, KeyId=arn, Plaintext=os.urandom(4097))
    expect_error("ValidationException", kms.encrypt, KeyId=arn, Plaintext=b"")


def test_asymmetric_algorithm_on_symmetric_key(kms, new_key):
    arn = new_key("algo")
    expect_error("InvalidKeyUsageException", kms.encrypt, KeyId=arn, Plaintext=b"x",
                 EncryptionAlgorithm="RSAES_OAEP_SHA_256")
    blob = kms.encrypt(KeyId=arn, Plaintext=b"x", EncryptionAlgorithm="SYMMETRIC_DEFAULT")[
        "CiphertextBlob"]
    expect_error("InvalidKeyUsageException", kms.decrypt, CiphertextBlob=blob, KeyId=arn,
                 EncryptionAlgorithm="RSAES_OAEP_SHA_256")


def test_re_encrypt(kms, new_key):
    a, b = new_key("re-A"), new_key("re-B")
    blob = kms.encrypt(KeyId=a, Plaintext=b"move me", EncryptionContext=CTX)["CiphertextBlob"]
    dest_ctx = {"purpose": "moved"}
    resp = kms.re_encrypt(
        CiphertextBlob=blob,
        SourceEncryptionContext=CTX,
        DestinationKeyId=b,
        DestinationEncryptionContext=dest_ctx,
    )
    assert resp["SourceKeyId"] == a
    assert resp["KeyId"] == b
    assert_key_ids_are_arns(resp)
    new_blob = resp["CiphertextBlob"]
    dec = kms.decrypt(CiphertextBlob=new_blob, EncryptionContext=dest_ctx)
    assert dec == {**dec, "Plaintext": b"move me", "KeyId": b}
    expect_error("InvalidCiphertextException", kms.decrypt, CiphertextBlob=new_blob,
                 EncryptionContext=CTX)
    expect_error("IncorrectKeyException", kms.decrypt, CiphertextBlob=new_blob, KeyId=a,
                 EncryptionContext=dest_ctx)
    # Wrong source context, wrong source key.
    expect_error("InvalidCiphertextException", kms.re_encrypt, CiphertextBlob=blob,
                 SourceEncryptionContext={"purpose": "nope"}, DestinationKeyId=b)
    expect_error("IncorrectKeyException", kms.re_encrypt, CiphertextBlob=blob,
                 SourceKeyId=b, SourceEncryptionContext=CTX, DestinationKeyId=a)
    # Same key, new context.
    same = kms.re_encrypt(CiphertextBlob=blob, SourceEncryptionContext=CTX, DestinationKeyId=a)
    assert kms.decrypt(CiphertextBlob=same["CiphertextBlob"])["Plaintext"] == b"move me"


# ------------------------------------------------------------------------------------------
# Data keys and random


@pytest.mark.parametrize("kw,size", [
    ({"KeySpec": "AES_256"}, 32),
    ({"KeySpec": "AES_128"}, 16),
    ({"NumberOfBytes": 1}, 1),
    ({"NumberOfBytes": 64}, 64),
    ({"NumberOfBytes": 1024}, 1024),
], ids=["AES_256", "AES_128", "1", "64", "1024"])
def test_generate_data_key(kms, new_key, kw, size):
    arn = new_key("gdk")
    resp = kms.generate_data_key(KeyId=arn, EncryptionContext=CTX, **kw)
    assert resp["KeyId"] == arn
    assert len(resp["Plaintext"]) == size
    dec = kms.decrypt(CiphertextBlob=resp["CiphertextBlob"], EncryptionContext=CTX)
    assert dec["Plaintext"] == resp["Plaintext"]
    assert dec["KeyId"] == arn
    expect_error("InvalidCiphertextException", kms.decrypt,
                 CiphertextBlob=resp["CiphertextBlob"])


@pytest.mark.parametrize("kw", [
    {},
    {"NumberOfBytes": 0},
    {"NumberOfBytes": 1025},
    {"KeySpec": "AES_512"},
    {"KeySpec": "AES_256", "NumberOfBytes": 32},
], ids=["neither", "0", "1025", "AES_512", "both"])
def test_generate_data_key_bad_sizes(kms, new_key, kw):
    arn = new_key("gdk-bad")
    expect_error("ValidationException", kms.generate_data_key, KeyId=arn, **kw)
    expect_error("ValidationException", kms.generate_data_key_without_plaintext, KeyId=arn, **kw)


def test_generate_data_key_without_plaintext(kms, new_key):
    arn = new_key("gdkwp")
    resp = kms.generate_data_key_without_plaintext(KeyId=arn, KeySpec="AES_256",
                                                   EncryptionContext=CTX)
    assert "Plaintext" not in resp
    assert resp["KeyId"] == arn
    dec = kms.decrypt(CiphertextBlob=resp["CiphertextBlob"], EncryptionContext=CTX)
    assert len(dec["Plaintext"]) == 32
    resp = kms.generate_data_key_without_plaintext(KeyId=arn, NumberOfBytes=7)
    assert len(kms.decrypt(CiphertextBlob=resp["CiphertextBlob"])["Plaintext"]) == 7


def test_data_keys_are_random(kms, new_key):
    arn = new_key("gdk-rand")
    keys = {kms.generate_data_key(KeyId=arn, KeySpec="AES_256")["Plaintext"] for _ in range(10)}
    assert len(keys) == 10


def test_generate_random(kms):
    for n in (1, 32, 1024):
        assert len(kms.generate_random(NumberOfBytes=n)["Plaintext"]) == n
    a = kms.generate_random(NumberOfBytes=32)["Plaintext"]
    b = kms.generate_random(NumberOfBytes=32)["Plaintext"]
    assert a != b
    for n in (0, 1025):
        expect_error("ValidationException", kms.generate_random, NumberOfBytes=n)


# ------------------------------------------------------------------------------------------
# Aliases


def test_alias_lifecycle(kms, new_key, alias_name):
    a, b = new_key("alias-A"), new_key("alias-B")
    kms.create_alias(AliasName=alias_name, TargetKeyId=a)
    expect_error("AlreadyExistsException", kms.create_alias, AliasName=alias_name, TargetKeyId=b)

    def entry():
        matches = [x for x in list_all_aliases(kms) if x["AliasName"] == alias_name]
        assert len(matches) == 1, matches
        return matches[0]

    e = entry()
    assert e["AliasArn"] == ALIAS_ARN_PREFIX + alias_name[len("alias/"):]
    assert key_id_of(e["TargetKeyId"]) == key_id_of(a)
    assert kms.encrypt(KeyId=alias_name, Plaintext=b"x")["KeyId"] == a

    kms.update_alias(AliasName=alias_name, TargetKeyId=b)
    assert key_id_of(entry()["TargetKeyId"]) == key_id_of(b)
    assert kms.describe_key(KeyId=alias_name)["KeyMetadata"]["Arn"] == b
    assert kms.encrypt(KeyId=alias_name, Plaintext=b"x")["KeyId"] == b

    # Filtered by key, in every KeyId form.
    for form in (b, key_id_of(b)):
        names = [x["AliasName"] for x in list_all_aliases(kms, KeyId=form)]
        assert names == [alias_name], (form, names)
    assert [x["AliasName"] for x in list_all_aliases(kms, KeyId=a)] == []

    kms.delete_alias(AliasName=alias_name)
    assert [x for x in list_all_aliases(kms) if x["AliasName"] == alias_name] == []
    expect_error("NotFoundException", kms.describe_key, KeyId=alias_name)
    expect_error("NotFoundException", kms.delete_alias, AliasName=alias_name)
    expect_error("NotFoundException", kms.update_alias, AliasName=alias_name, TargetKeyId=a)
    # The keys are untouched.
    assert kms.describe_key(KeyId=b)["KeyMetadata"]["KeyState"] == "Enabled"


def test_alias_errors(kms, new_key, alias_name):
    a = new_key("alias-errors")
    expect_error("NotFoundException", kms.create_alias, AliasName=alias_name,
                 TargetKeyId=str(uuid.uuid4()))
    for bad in ("no-prefix", "alias/", "alias/has space", "alias/aws/reserved"):
        expect_error(("ValidationException", "InvalidAliasNameException",
                      "NotAuthorizedException"), kms.create_alias, AliasName=bad, TargetKeyId=a)
    # An alias can't point at an alias.
    kms.create_alias(AliasName=alias_name, TargetKeyId=a)
    expect_error(("ValidationException", "NotFoundException"), kms.create_alias,
                 AliasName=alias_name + "-2", TargetKeyId=alias_name)


def test_list_aliases_paginates(kms, new_key):
    arn = new_key("alias-pages")
    names = {f"alias/e2e-page-{uuid.uuid4().hex[:8]}" for _ in range(5)}
    for n in names:
        kms.create_alias(AliasName=n, TargetKeyId=arn)
    everything = list_all_aliases(kms)
    all_names = [x["AliasName"] for x in everything]
    assert len(all_names) == len(set(all_names))
    assert names <= set(all_names)
    assert [x["AliasName"] for x in list_all_aliases(kms, limit=2)] == all_names
    filtered = list_all_aliases(kms, limit=2, KeyId=arn)
    assert {x["AliasName"] for x in filtered} == names
    first = kms.list_aliases(Limit=1, KeyId=arn)
    assert len(first["Aliases"]) == 1 and first["Truncated"] is True
    print(f"ListAliases: {len(everything)} aliases, {len(filtered)} for the key")


# ------------------------------------------------------------------------------------------
# Enable / disable / deletion


def test_disable_and_enable(kms, new_key):
    arn = new_key("disable")
    blob = kms.encrypt(KeyId=arn, Plaintext=b"before")["CiphertextBlob"]
    kms.disable_key(KeyId=arn)
    md = kms.describe_key(KeyId=arn)["KeyMetadata"]
    assert md["KeyState"] == "Disabled" and md["Enabled"] is False
    expect_error("DisabledException", kms.encrypt, KeyId=arn, Plaintext=b"x")
    expect_error("DisabledException", kms.decrypt, CiphertextBlob=blob)
    expect_error("DisabledException", kms.decrypt, CiphertextBlob=blob, KeyId=arn)
    expect_error("DisabledException", kms.generate_data_key, KeyId=arn, KeySpec="AES_256")
    expect_error("DisabledException", kms.generate_data_key_without_plaintext, KeyId=arn,
                 KeySpec="AES_256")
    kms.disable_key(KeyId=arn)  # idempotent
    kms.enable_key(KeyId=arn)
    md = kms.describe_key(KeyId=arn)["KeyMetadata"]
    assert md["KeyState"] == "Enabled" and md["Enabled"] is True
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"before"
    kms.enable_key(KeyId=arn)  # idempotent


def test_re_encrypt_with_disabled_keys(kms, new_key):
    a, b = new_key("re-dis-A"), new_key("re-dis-B")
    blob = kms.encrypt(KeyId=a, Plaintext=b"x")["CiphertextBlob"]
    kms.disable_key(KeyId=b)
    expect_error("DisabledException", kms.re_encrypt, CiphertextBlob=blob, DestinationKeyId=b)
    kms.enable_key(KeyId=b)
    kms.disable_key(KeyId=a)
    expect_error("DisabledException", kms.re_encrypt, CiphertextBlob=blob, DestinationKeyId=b)


def test_schedule_and_cancel_deletion(kms, new_key, alias_name):
    arn = new_key("deletion")
    kms.create_alias(AliasName=alias_name, TargetKeyId=arn)
    blob = kms.encrypt(KeyId=arn, Plaintext=b"x")["CiphertextBlob"]
    now = dt.datetime.now(dt.timezone.utc)
    resp = kms.schedule_key_deletion(KeyId=arn, PendingWindowInDays=7)
    assert resp["KeyId"] == arn
    assert resp["KeyState"] == "PendingDeletion"
    assert resp.get("PendingWindowInDays", 7) == 7
    days = (resp["DeletionDate"] - now).total_seconds() / 86400
    assert 6.9 < days < 8.1, resp["DeletionDate"]
    md = kms.describe_key(KeyId=arn)["KeyMetadata"]
    assert md["KeyState"] == "PendingDeletion" and md["Enabled"] is False
    assert abs((md["DeletionDate"] - resp["DeletionDate"]).total_seconds()) < 2

    expect_error("KMSInvalidStateException", kms.encrypt, KeyId=arn, Plaintext=b"x")
    expect_error("KMSInvalidStateException", kms.decrypt, CiphertextBlob=blob)
    expect_error("KMSInvalidStateException", kms.generate_data_key, KeyId=arn, KeySpec="AES_256")
    expect_error("KMSInvalidStateException", kms.enable_key, KeyId=arn)
    expect_error("KMSInvalidStateException", kms.disable_key, KeyId=arn)
    expect_error("KMSInvalidStateException", kms.schedule_key_deletion, KeyId=arn)
    # Still visible and still named by its alias.
    assert kms.describe_key(KeyId=alias_name)["KeyMetadata"]["Arn"] == arn
    assert arn in {k["KeyArn"] for k in list_all_keys(kms)}

    resp = kms.cancel_key_deletion(KeyId=arn)
    assert resp["KeyId"] == arn
    md = kms.describe_key(KeyId=arn)["KeyMetadata"]
    assert md["KeyState"] == "Disabled"
    assert md.get("DeletionDate") is None
    expect_error("KMSInvalidStateException", kms.cancel_key_deletion, KeyId=arn)
    kms.enable_key(KeyId=arn)
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"x"


def test_schedule_deletion_default_window_is_30_days(kms, new_key):
    arn = new_key("deletion-30")
    now = dt.datetime.now(dt.timezone.utc)
    resp = kms.schedule_key_deletion(KeyId=arn)
    days = (resp["DeletionDate"] - now).total_seconds() / 86400
    assert 29.9 < days < 31.1, resp["DeletionDate"]
    assert resp.get("PendingWindowInDays", 30) == 30
    kms.cancel_key_deletion(KeyId=arn)


@pytest.mark.parametrize("days", [0, 6, 31, 365])
def test_schedule_deletion_window_out_of_range(kms, new_key, days):
    arn = new_key("deletion-bad")
    expect_error("ValidationException", kms.schedule_key_deletion, KeyId=arn,
                 PendingWindowInDays=days)
    assert kms.describe_key(KeyId=arn)["KeyMetadata"]["KeyState"] == "Enabled"


def test_state_changes_on_unknown_key(kms):
    ghost = str(uuid.uuid4())
    for op in (kms.enable_key, kms.disable_key, kms.schedule_key_deletion,
               kms.cancel_key_deletion, kms.get_key_rotation_status, kms.list_resource_tags):
        expect_error("NotFoundException", op, KeyId=ghost)


# ------------------------------------------------------------------------------------------
# Tags, description, rotation


def test_tags(kms, new_key):
    arn = new_key("tags")
    kms.tag_resource(KeyId=arn, Tags=[{"TagKey": "a", "TagValue": "1"},
                                      {"TagKey": "b", "TagValue": "2"}])
    kms.tag_resource(KeyId=key_id_of(arn), Tags=[{"TagKey": "a", "TagValue": "3"}])
    tags = {t["TagKey"]: t["TagValue"] for t in kms.list_resource_tags(KeyId=arn)["Tags"]}
    assert tags == {"a": "3", "b": "2"}
    kms.untag_resource(KeyId=arn, TagKeys=["a", "not-there"])
    assert kms.list_resource_tags(KeyId=arn)["Tags"] == [{"TagKey": "b", "TagValue": "2"}]
    kms.untag_resource(KeyId=arn, TagKeys=["b"])
    assert kms.list_resource_tags(KeyId=arn)["Tags"] == []
    expect_error(("ValidationException", "TagException"), kms.tag_resource, KeyId=arn,
                 Tags=[{"TagKey": "aws:reserved", "TagValue": "x"}])
    expect_error(("ValidationException", "TagException"), kms.tag_resource, KeyId=arn,
                 Tags=[{"TagKey": "", "TagValue": "x"}])


def test_update_key_description(kms, new_key):
    arn = new_key("old description")
    kms.update_key_description(KeyId=arn, Description="new description")
    assert kms.describe_key(KeyId=arn)["KeyMetadata"]["Description"] == "new description"
    kms.update_key_description(KeyId=key_id_of(arn), Description="")
    assert kms.describe_key(KeyId=arn)["KeyMetadata"]["Description"] == ""
    expect_error("NotFoundException", kms.update_key_description, KeyId=str(uuid.uuid4()),
                 Description="x")


def test_rotation_is_refused(kms, new_key):
    arn = new_key("rotation")
    assert kms.get_key_rotation_status(KeyId=arn)["KeyRotationEnabled"] is False
    expect_error("UnsupportedOperationException", kms.enable_key_rotation, KeyId=arn)
    expect_error("UnsupportedOperationException", kms.disable_key_rotation, KeyId=arn)
    expect_error("UnsupportedOperationException", kms.rotate_key_on_demand, KeyId=arn)
    assert kms.get_key_rotation_status(KeyId=arn)["KeyRotationEnabled"] is False


# ------------------------------------------------------------------------------------------
# Every KeyId is an ARN


def test_every_key_id_in_responses_is_an_arn(kms, new_key, alias_name):
    arn = new_key("arns")
    kid = key_id_of(arn)
    kms.create_alias(AliasName=alias_name, TargetKeyId=kid)
    checked = 0
    responses = []
    responses.append(kms.describe_key(KeyId=kid))
    responses.append(kms.describe_key(KeyId=alias_name))
    enc = kms.encrypt(KeyId=kid, Plaintext=b"x")
    responses.append(enc)
    responses.append(kms.decrypt(CiphertextBlob=enc["CiphertextBlob"]))
    responses.append(kms.decrypt(CiphertextBlob=enc["CiphertextBlob"], KeyId=kid))
    responses.append(kms.re_encrypt(CiphertextBlob=enc["CiphertextBlob"], DestinationKeyId=kid))
    responses.append(kms.generate_data_key(KeyId=alias_name, KeySpec="AES_128"))
    responses.append(kms.generate_data_key_without_plaintext(KeyId=kid, NumberOfBytes=8))
    responses.append(kms.get_key_rotation_status(KeyId=kid))
    responses.append(kms.list_keys(Limit=5))
    responses.append(kms.schedule_key_deletion(KeyId=kid, PendingWindowInDays=7))
    responses.append(kms.cancel_key_deletion(KeyId=kid))
    responses.append(kms.create_key(Description="arns-2"))
    for r in responses:
        checked += assert_key_ids_are_arns(r)
    assert checked >= len(responses)
    print(f"checked {checked} key ids in {len(responses)} responses")


# ------------------------------------------------------------------------------------------
# Authentication


def test_wrong_secret_is_rejected_and_does_nothing(server, kms):
    before = len(list_all_keys(kms))
    bad = kms_client(server.endpoint, secret_key="not-the-secret")
    expect_error("InvalidSignatureException", bad.create_key, Description="must not exist")
    expect_error("InvalidSignatureException", bad.list_keys)
    assert len(list_all_keys(kms)) == before


def test_unknown_access_key_is_rejected(server, kms):
    before = len(list_all_keys(kms))
    bad = kms_client(server.endpoint, access_key="AKIAUNKNOWN000000000")
    expect_error("UnrecognizedClientException", bad.create_key, Description="must not exist")
    assert len(list_all_keys(kms)) == before


# ------------------------------------------------------------------------------------------
# Restart


def test_keys_aliases_states_and_ciphertexts_survive_restart(fresh_server):
    kms = fresh_server.client()
    enabled = kms.create_key(Description="stays enabled",
                             Tags=[{"TagKey": "k", "TagValue": "v"}])["KeyMetadata"]["Arn"]
    disabled = kms.create_key(Description="stays disabled")["KeyMetadata"]["Arn"]
    pending = kms.create_key(Description="stays pending")["KeyMetadata"]["Arn"]
    kms.create_alias(AliasName="alias/survivor", TargetKeyId=enabled)
    kms.create_alias(AliasName="alias/survivor-2", TargetKeyId=disabled)
    blob = kms.encrypt(KeyId="alias/survivor", Plaintext=b"before restart",
                       EncryptionContext=CTX)["CiphertextBlob"]
    dk = kms.generate_data_key(KeyId=enabled, KeySpec="AES_256")
    blob_d = kms.encrypt(KeyId=disabled, Plaintext=b"disabled later")["CiphertextBlob"]
    kms.disable_key(KeyId=disabled)
    deletion = kms.schedule_key_deletion(KeyId=pending, PendingWindowInDays=9)["DeletionDate"]
    kms.update_key_description(KeyId=enabled, Description="described before restart")
    keys_before = sorted(k["KeyArn"] for k in list_all_keys(kms))
    aliases_before = sorted((a["AliasName"], key_id_of(a.get("TargetKeyId", "")))
                            for a in list_all_aliases(kms))
    old_port = fresh_server.port

    fresh_server.restart()
    kms = fresh_server.client()
    print(f"restarted: port {old_port} -> {fresh_server.port}")

    assert sorted(k["KeyArn"] for k in list_all_keys(kms)) == keys_before
    assert sorted((a["AliasName"], key_id_of(a.get("TargetKeyId", "")))
                  for a in list_all_aliases(kms)) == aliases_before
    md = kms.describe_key(KeyId=enabled)["KeyMetadata"]
    assert md["KeyState"] == "Enabled"
    assert md["Description"] == "described before restart"
    assert kms.list_resource_tags(KeyId=enabled)["Tags"] == [{"TagKey": "k", "TagValue": "v"}]
    assert kms.describe_key(KeyId=disabled)["KeyMetadata"]["KeyState"] == "Disabled"
    md = kms.describe_key(KeyId=pending)["KeyMetadata"]
    assert md["KeyState"] == "PendingDeletion"
    assert abs((md["DeletionDate"] - deletion).total_seconds()) < 2

    dec = kms.decrypt(CiphertextBlob=blob, EncryptionContext=CTX)
    assert dec["Plaintext"] == b"before restart" and dec["KeyId"] == enabled
    assert kms.decrypt(CiphertextBlob=dk["CiphertextBlob"])["Plaintext"] == dk["Plaintext"]
    expect_error("DisabledException", kms.decrypt, CiphertextBlob=blob_d)
    kms.enable_key(KeyId=disabled)
    assert kms.decrypt(CiphertextBlob=blob_d)["Plaintext"] == b"disabled later"
    assert kms.describe_key(KeyId="alias/survivor-2")["KeyMetadata"]["Arn"] == disabled

    # New keys after the restart work too, and a second restart keeps everything.
    fresh = kms.create_key(Description="after restart")["KeyMetadata"]["Arn"]
    blob2 = kms.encrypt(KeyId=fresh, Plaintext=b"after")["CiphertextBlob"]
    fresh_server.restart()
    kms = fresh_server.client()
    assert kms.decrypt(CiphertextBlob=blob2)["Plaintext"] == b"after"
    assert kms.decrypt(CiphertextBlob=blob, EncryptionContext=CTX)["Plaintext"] == b"before restart"
    assert len(list_all_keys(kms)) == len(keys_before) + 1


# ------------------------------------------------------------------------------------------
# Key policies and grants: fixed, readable (tools such as Terraform read them)


def test_key_policy_is_the_default_account_policy_and_cannot_change(kms, new_key):
    import json

    arn = new_key("policy")
    got = kms.get_key_policy(KeyId=arn, PolicyName="default")
    policy = json.loads(got["Policy"])
    statement = policy["Statement"][0]
    assert statement["Effect"] == "Allow" and statement["Action"] == "kms:*"
    assert statement["Principal"] == {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}
    assert kms.list_key_policies(KeyId=arn)["PolicyNames"] == ["default"]
    expect_error("NotFoundException", kms.get_key_policy, KeyId=arn, PolicyName="other")
    expect_error("UnsupportedOperationException", kms.put_key_policy, KeyId=arn,
                 PolicyName="default", Policy=got["Policy"])
    expect_error("NotFoundException", kms.get_key_policy, KeyId=str(uuid.uuid4()),
                 PolicyName="default")


def test_grants_are_not_supported_and_none_exist(kms, new_key):
    arn = new_key("grants")
    assert kms.list_grants(KeyId=arn)["Grants"] == []
    expect_error("UnsupportedOperationException", kms.create_grant, KeyId=arn,
                 GranteePrincipal=f"arn:aws:iam::{ACCOUNT}:root", Operations=["Decrypt"])


def test_describe_custom_key_stores_shows_the_store_and_its_tokens(kms, new_key):
    arn = new_key("store")
    meta = kms.describe_key(KeyId=arn)["KeyMetadata"]
    stores = kms.describe_custom_key_stores()["CustomKeyStores"]
    assert len(stores) == 1
    store = stores[0]
    assert store["CustomKeyStoreId"] == meta["CustomKeyStoreId"]
    assert store["CloudHsmClusterId"] == meta["CloudHsmClusterId"]
    assert store["ConnectionState"] == "CONNECTED"
    # hsmkms's store type: a cluster of PKCS#11 tokens (docs/api.md). Its extension members
    # (HsmkmsTokens, ...) are not in botocore's model, so boto3 drops them: see test_key_stores.
    assert store["CustomKeyStoreType"] == "HSMKMS_PKCS11"
    assert store["CreationDate"]
    by_id = kms.describe_custom_key_stores(CustomKeyStoreId=meta["CustomKeyStoreId"])
    assert by_id["CustomKeyStores"][0]["CustomKeyStoreName"] == store["CustomKeyStoreName"]
    expect_error("CustomKeyStoreNotFoundException", kms.describe_custom_key_stores,
                 CustomKeyStoreId="cks-00000000000000000")
    expect_error("CustomKeyStoreNotFoundException", kms.describe_custom_key_stores,
                 CustomKeyStoreName="no-such-store")


def test_a_disconnected_key_store_makes_its_keys_unavailable_until_it_connects(fresh_server):
    kms = fresh_server.client()
    key = kms.create_key(Description="store state")["KeyMetadata"]["Arn"]
    blob = kms.encrypt(KeyId=key, Plaintext=b"kept")["CiphertextBlob"]
    store_id = kms.describe_key(KeyId=key)["KeyMetadata"]["CustomKeyStoreId"]
    kms.disconnect_custom_key_store(CustomKeyStoreId=store_id)
    assert kms.describe_custom_key_stores()["CustomKeyStores"][0]["ConnectionState"] == "DISCONNECTED"
    meta = kms.describe_key(KeyId=key)["KeyMetadata"]
    assert meta["KeyState"] == "Unavailable" and meta["Enabled"] is False
    expect_error("KMSInvalidStateException", kms.decrypt, CiphertextBlob=blob)
    expect_error("KMSInvalidStateException", kms.encrypt, KeyId=key, Plaintext=b"x")
    expect_error("CustomKeyStoreInvalidStateException", kms.create_key)
    expect_error("CustomKeyStoreNotFoundException", kms.connect_custom_key_store,
                 CustomKeyStoreId="cks-00000000000000000")
    # The state survives a restart.
    fresh_server.stop()
    fresh_server.start()
    kms = fresh_server.client()
    assert kms.describe_custom_key_stores()["CustomKeyStores"][0]["ConnectionState"] == "DISCONNECTED"
    kms.connect_custom_key_store(CustomKeyStoreId=store_id)
    assert kms.describe_custom_key_stores()["CustomKeyStores"][0]["ConnectionState"] == "CONNECTED"
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"kept"
    assert kms.describe_key(KeyId=key)["KeyMetadata"]["KeyState"] == "Enabled"
