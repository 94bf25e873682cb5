"""Deviations from AWS KMS that other projects' test suites and real tools found: an explicit
`Origin: AWS_KMS` (Ansible's amazon.aws kms_key always sends it), AWS's ValidationException text
for enum members, AWS's tag rules, and ListKeyRotations. The enum value sets come from the
client's own botocore model, the same service-2.json AWS generates its validation from."""

from __future__ import annotations

import uuid

import pytest

from e2e_support import aws_fail, aws_kms, aws_ok, expect_error, list_all_keys


def enum_of(kms, shape: str) -> list[str]:
    return kms.meta.service_model.shape_for(shape).enum


def enum_message(kms, value: str, member: str, shape: str) -> str:
    allowed = ", ".join(enum_of(kms, shape))
    return (f"1 validation error detected: Value '{value}' at '{member}' failed to satisfy "
            f"constraint: Member must satisfy enum value set: [{allowed}]")


def message_of(error) -> str:
    return error.response["Error"]["Message"]


# ------------------------------------------------------------------------------------------
# Origin


def test_create_key_with_origin_aws_kms_goes_to_the_default_store(kms):
    plain = kms.create_key(Description="no origin")["KeyMetadata"]
    md = kms.create_key(Description="origin AWS_KMS", Origin="AWS_KMS")["KeyMetadata"]
    assert md["Origin"] == "AWS_CLOUDHSM"
    assert md["CustomKeyStoreId"] == plain["CustomKeyStoreId"]
    assert md["KeyState"] == "Enabled"
    blob = kms.encrypt(KeyId=md["Arn"], Plaintext=b"x")["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"x"


def test_aws_cli_create_key_with_origin_aws_kms(endpoint):
    md = aws_ok(endpoint, "create-key", "--origin", "AWS_KMS")["KeyMetadata"]
    assert md["Origin"] == "AWS_CLOUDHSM"


@pytest.mark.parametrize("origin", ["EXTERNAL", "EXTERNAL_KEY_STORE"])
def test_other_real_origins_stay_unsupported(kms, origin):
    expect_error("UnsupportedOperationException", kms.create_key, Origin=origin)


# ------------------------------------------------------------------------------------------
# Enum members: AWS's ValidationException, before any "not supported"

ENUM_CASES = [
    ("create_key", {"KeySpec": "AES_256"}, "keySpec", "KeySpec"),
    ("create_key", {"CustomerMasterKeySpec": "ML_DSA_44"}, "customerMasterKeySpec",
     "CustomerMasterKeySpec"),
    ("create_key", {"KeyUsage": "ENCRYPT"}, "keyUsage", "KeyUsageType"),
    ("create_key", {"Origin": "AWS_KMS_PLEASE"}, "origin", "OriginType"),
    ("encrypt", {"Plaintext": b"x", "EncryptionAlgorithm": "AES_GCM"}, "encryptionAlgorithm",
     "EncryptionAlgorithmSpec"),
    ("decrypt", {"CiphertextBlob": b"\x01" * 64, "EncryptionAlgorithm": "AES_GCM"},
     "encryptionAlgorithm", "EncryptionAlgorithmSpec"),
    ("generate_data_key", {"KeySpec": "AES_512"}, "keySpec", "DataKeySpec"),
    ("generate_data_key_without_plaintext", {"KeySpec": "aes_256"}, "keySpec", "DataKeySpec"),
]


@pytest.mark.parametrize("op,kwargs,member,shape", ENUM_CASES,
                         ids=[f"{c[0]}-{c[2]}" for c in ENUM_CASES])
def test_unknown_enum_value_gets_awss_validation_message(kms, new_key, op, kwargs, member, shape):
    if op in ("encrypt", "generate_data_key", "generate_data_key_without_plaintext"):
        kwargs = {"KeyId": new_key("enum"), **kwargs}
    before = len(list_all_keys(kms))
    e = expect_error("ValidationException", getattr(kms, op), **kwargs)
    value = next(v for k, v in kwargs.items() if k not in ("KeyId", "Plaintext", "CiphertextBlob"))
    assert message_of(e) == enum_message(kms, value, member, shape)
    assert len(list_all_keys(kms)) == before


def test_re_encrypt_reports_both_algorithms(kms, new_key):
    arn = new_key("re-encrypt enum")
    blob = kms.encrypt(KeyId=arn, Plaintext=b"x")["CiphertextBlob"]
    e = expect_error("ValidationException", kms.re_encrypt, CiphertextBlob=blob,
                     DestinationKeyId=arn, SourceEncryptionAlgorithm="A",
                     DestinationEncryptionAlgorithm="B")
    allowed = ", ".join(enum_of(kms, "EncryptionAlgorithmSpec"))
    assert message_of(e) == (
        "2 validation errors detected: "
        f"Value 'A' at 'sourceEncryptionAlgorithm' failed to satisfy constraint: Member must "
        f"satisfy enum value set: [{allowed}]; "
        f"Value 'B' at 'destinationEncryptionAlgorithm' failed to satisfy constraint: Member "
        f"must satisfy enum value set: [{allowed}]")


def test_unknown_spec_is_a_validation_error_before_not_supported(kms):
    # An unknown KeySpec next to a real but unsupported usage: the syntax error wins.
    e = expect_error("ValidationException", kms.create_key, KeySpec="NOPE",
                     KeyUsage="SIGN_VERIFY")
    assert message_of(e) == enum_message(kms, "NOPE", "keySpec", "KeySpec")


@pytest.mark.parametrize("kwargs", [{"KeySpec": "RSA_2048"}, {"KeySpec": "HMAC_256"},
                                    {"CustomerMasterKeySpec": "ECC_NIST_P256"}],
                         ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_real_but_unsupported_specs_stay_unsupported(kms, kwargs):
    expect_error("UnsupportedOperationException", kms.create_key, **kwargs)


@pytest.mark.parametrize("n,constraint", [(0, "greater than or equal to 1"),
                                          (1025, "less than or equal to 1024")])
def test_number_of_bytes_out_of_range_gets_awss_message(kms, new_key, n, constraint):
    arn = new_key("number of bytes")
    expected = (f"1 validation error detected: Value '{n}' at 'numberOfBytes' failed to satisfy "
                f"constraint: Member must have value {constraint}")
    e = expect_error("ValidationException", kms.generate_data_key, KeyId=arn, NumberOfBytes=n)
    assert message_of(e) == expected
    e = expect_error("ValidationException", kms.generate_random, NumberOfBytes=n)
    assert message_of(e) == expected


def test_aws_cli_unknown_key_spec(endpoint):
    r = aws_kms(endpoint, "create-key", "--key-spec", "AES_256")
    assert r.returncode != 0
    assert "(ValidationException)" in r.stderr, r.stderr
    assert "Value 'AES_256' at 'keySpec' failed to satisfy constraint" in r.stderr, r.stderr


# ------------------------------------------------------------------------------------------
# Tags


def test_duplicate_tag_keys_are_a_tag_exception(kms, new_key):
    arn = new_key("duplicate tags")
    twice = [{"TagKey": "team", "TagValue": "a"}, {"TagKey": "team", "TagValue": "b"}]
    e = expect_error("TagException", kms.tag_resource, KeyId=arn, Tags=twice)
    assert message_of(e) == "Duplicate tag keys"
    assert kms.list_resource_tags(KeyId=arn)["Tags"] == []
    before = len(list_all_keys(kms))
    e = expect_error("TagException", kms.create_key, Tags=twice)
    assert message_of(e) == "Duplicate tag keys"
    assert len(list_all_keys(kms)) == before


@pytest.mark.parametrize("key", ["aws:x", "AWS:x", "Aws:x", "aWs:"])
def test_aws_prefix_in_any_case_is_reserved(kms, new_key, key):
    arn = new_key("reserved tags")
    e = expect_error("TagException", kms.tag_resource, KeyId=arn,
                     Tags=[{"TagKey": key, "TagValue": "v"}])
    assert message_of(e) == "Tags beginning with aws: are reserved"
    before = len(list_all_keys(kms))
    expect_error("TagException", kms.create_key, Tags=[{"TagKey": key, "TagValue": "v"}])
    assert len(list_all_keys(kms)) == before
    # Only the prefix is reserved.
    kms.tag_resource(KeyId=arn, Tags=[{"TagKey": "x-aws:" + key, "TagValue": "v"}])


def test_tag_key_too_long_gets_awss_message(kms, new_key):
    arn = new_key("long tag")
    long_key = "k" * 129
    e = expect_error("ValidationException", kms.tag_resource, KeyId=arn,
                     Tags=[{"TagKey": "ok", "TagValue": ""}, {"TagKey": long_key, "TagValue": ""}])
    assert message_of(e) == (
        f"1 validation error detected: Value '{long_key}' at 'tags.2.member.tagKey' failed to "
        "satisfy constraint: Member must have length less than or equal to 128")


# ------------------------------------------------------------------------------------------
# ListKeyRotations


def test_list_key_rotations_is_empty_for_a_key(kms, new_key):
    arn = new_key("rotations")
    resp = kms.list_key_rotations(KeyId=arn)
    assert resp["Rotations"] == []
    assert resp["Truncated"] is False
    assert "NextMarker" not in resp
    paginator = kms.get_paginator("list_key_rotations")
    assert [r for page in paginator.paginate(KeyId=arn) for r in page["Rotations"]] == []


def test_list_key_rotations_of_a_missing_key_is_not_found(kms):
    expect_error("NotFoundException", kms.list_key_rotations, KeyId=str(uuid.uuid4()))


def test_list_key_rotations_checks_its_members(kms, new_key):
    arn = new_key("rotations members")
    e = expect_error("ValidationException", kms.list_key_rotations, KeyId=arn,
                     IncludeKeyMaterial="SOME")
    assert message_of(e) == enum_message(kms, "SOME", "includeKeyMaterial", "IncludeKeyMaterial")
    expect_error("ValidationException", kms.list_key_rotations, KeyId=arn, Limit=0)


def test_aws_cli_list_key_rotations(endpoint, new_key):
    arn = new_key("rotations cli")
    assert aws_ok(endpoint, "list-key-rotations", "--key-id", arn)["Rotations"] == []
    assert aws_fail(endpoint, "list-key-rotations", "--key-id",
                    str(uuid.uuid4())) == "NotFoundException"
