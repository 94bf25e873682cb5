"""The AWS Encryption SDK CLI (aws-encryption-cli) with hsmkms keys as wrapping keys.

The ESDK CLI has no --endpoint-url; its botocore honours AWS_ENDPOINT_URL_KMS (botocore >= 1.31),
so the KMS client it makes from the key ARN's region talks to hsmkms."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import botocore
import pytest

from e2e_support import clean_env


def esdk_executable() -> str:
    exe = Path(sys.executable).parent / "aws-encryption-cli"
    assert exe.exists(), f"{exe} missing: pip install -r tests/requirements.txt"
    return str(exe)


def test_botocore_honours_the_endpoint_env_var():
    major, minor = (int(x) for x in botocore.__version__.split(".")[:2])
    assert (major, minor) >= (1, 31), botocore.__version__


@pytest.fixture(scope="module")
def esdk(endpoint):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [esdk_executable(), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=180,
            env=clean_env(AWS_ENDPOINT_URL_KMS=endpoint),
        )

    return run


@pytest.fixture(scope="module")
def two_keys(kms):
    return [kms.create_key(Description=f"esdk-{i}")["KeyMetadata"]["Arn"] for i in range(2)]


def test_encrypt_and_decrypt_a_file_with_context(esdk, two_keys, tmp_path, kms):
    key = two_keys[0]
    src = tmp_path / "report.txt"
    data = b"quarterly numbers\n" + os.urandom(20000)
    src.write_bytes(data)
    enc = tmp_path / "report.txt.encrypted"
    r = esdk("--encrypt", "-i", str(src), "-o", str(enc), "--wrapping-keys", f"key={key}",
             "--encryption-context", "purpose=e2e", "dept=finance", "-S")
    assert r.returncode == 0, r.stderr
    blob = enc.read_bytes()
    assert data[:17] not in blob and len(blob) > len(data)

    out = tmp_path / "report.txt.decrypted"
    r = esdk("--decrypt", "-i", str(enc), "-o", str(out), "--wrapping-keys", f"key={key}",
             "--encryption-context", "purpose=e2e", "dept=finance", "-S")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == data

    # A required context that the message does not carry: the CLI refuses (it exits 0 but
    # writes nothing and says why).
    wrong = tmp_path / "wrong.decrypted"
    r = esdk("--decrypt", "-i", str(enc), "-o", str(wrong), "--wrapping-keys", f"key={key}",
             "--encryption-context", "purpose=other", "-S")
    assert not wrong.exists(), r.stderr
    assert "did not match" in r.stderr, r.stderr

    # The context is also bound by KMS: change it inside the message header (same length, so the
    # header still parses) and the ESDK's Decrypt call to hsmkms fails.
    assert blob.count(b"finance") == 1
    forged = tmp_path / "forged.encrypted"
    forged.write_bytes(blob.replace(b"finance", b"FINANCE"))
    out2 = tmp_path / "forged.decrypted"
    r = esdk("--decrypt", "-i", str(forged), "-o", str(out2), "--wrapping-keys", f"key={key}",
             "-S")
    assert r.returncode != 0, r.stderr
    assert not out2.exists()

    # Disable the KMS key: decryption must now fail, because it goes through hsmkms.
    kms.disable_key(KeyId=key)
    try:
        off = tmp_path / "disabled.decrypted"
        r = esdk("--decrypt", "-i", str(enc), "-o", str(off), "--wrapping-keys", f"key={key}",
                 "-S")
        assert r.returncode != 0, r.stderr
        assert not off.exists()
    finally:
        kms.enable_key(KeyId=key)


def test_message_with_two_wrapping_keys_decrypts_with_either(esdk, two_keys, tmp_path):
    """GenerateDataKey on the first key, Encrypt of the data key on the second, Decrypt with
    each alone."""
    a, b = two_keys
    src = tmp_path / "both.txt"
    src.write_bytes(b"two keys" * 1000)
    enc = tmp_path / "both.enc"
    r = esdk("--encrypt", "-i", str(src), "-o", str(enc), "--wrapping-keys", f"key={a}",
             f"key={b}", "--encryption-context", "purpose=two-keys", "-S")
    assert r.returncode == 0, r.stderr
    for key in (a, b):
        out = tmp_path / f"both.{key[-4:]}.dec"
        r = esdk("--decrypt", "-i", str(enc), "-o", str(out), "--wrapping-keys", f"key={key}",
                 "--encryption-context", "purpose=two-keys", "-S")
        assert r.returncode == 0, (key, r.stderr)
        assert out.read_bytes() == src.read_bytes()


def test_message_for_another_key_does_not_decrypt(esdk, two_keys, kms, tmp_path):
    a = two_keys[0]
    stranger = kms.create_key(Description="esdk-stranger")["KeyMetadata"]["Arn"]
    src = tmp_path / "a.txt"
    src.write_bytes(b"for key a only")
    enc = tmp_path / "a.enc"
    r = esdk("--encrypt", "-i", str(src), "-o", str(enc), "--wrapping-keys", f"key={a}", "-S")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "a.dec"
    r = esdk("--decrypt", "-i", str(enc), "-o", str(out), "--wrapping-keys",
             f"key={stranger}", "-S")
    assert r.returncode != 0, r.stderr
    assert not out.exists()


def test_stdin_stdout_round_trip_with_encoding(esdk, two_keys, endpoint, tmp_path):
    key = two_keys[1]
    env = clean_env(AWS_ENDPOINT_URL_KMS=endpoint)
    enc = subprocess.run(
        [esdk_executable(), "--encrypt", "-i", "-", "-o", "-", "--encode",
         "--wrapping-keys", f"key={key}", "-c", "app=pipe", "-S"],
        input=b"piped secret", capture_output=True, timeout=180, env=env,
    )
    assert enc.returncode == 0, enc.stderr
    dec = subprocess.run(
        [esdk_executable(), "--decrypt", "-i", "-", "-o", "-", "--decode",
         "--wrapping-keys", f"key={key}", "-c", "app=pipe", "-S"],
        input=enc.stdout, capture_output=True, timeout=180, env=env,
    )
    assert dec.returncode == 0, dec.stderr
    assert dec.stdout == b"piped secret"
