"""The KMS front over HTTPS (rustls): boto3 and the aws CLI verify the server against a test CA
made in the test; plain HTTP to the TLS port gets no answer."""

from __future__ import annotations

import http.client
import json
import subprocess
import urllib.error
import urllib.request

import boto3
import botocore.config
import botocore.exceptions
import pytest

from e2e_support import ACCESS_KEY, REGION, SECRET_KEY, Server, aws_executable, clean_env
from tde_support import make_test_ca


def https_client(endpoint: str, ca: str | bool):
    return boto3.session.Session(
        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name=REGION,
    ).client(
        "kms", endpoint_url=endpoint, verify=ca,
        config=botocore.config.Config(retries={"total_max_attempts": 1, "mode": "standard"}),
    )


def test_kms_front_serves_https_with_a_verified_certificate(tmp_path):
    tls = make_test_ca(tmp_path / "tls")
    srv = Server(tmp_path / "data", tmp_path / "log", tls=tls)
    try:
        endpoint = srv.start().endpoint
        assert endpoint.startswith("https://"), endpoint

        kms = https_client(endpoint, str(tls.ca_cert))
        key = kms.create_key(Description="over TLS")["KeyMetadata"]["Arn"]
        blob = kms.encrypt(KeyId=key, Plaintext=b"tls", EncryptionContext={"a": "b"})["CiphertextBlob"]
        assert kms.decrypt(CiphertextBlob=blob, EncryptionContext={"a": "b"})["Plaintext"] == b"tls"

        # Without the CA, the certificate is refused by the client.
        with pytest.raises(botocore.exceptions.SSLError):
            https_client(endpoint, True).list_keys()

        # The aws CLI too, with --ca-bundle.
        r = subprocess.run([aws_executable(), "kms", "list-keys", "--endpoint-url", endpoint,
                            "--ca-bundle", str(tls.ca_cert), "--output", "json"],
                           env=clean_env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert key.rsplit("/", 1)[1] in r.stdout

        # `hsmkms store` finds the https endpoint beside the metadata and checks it against the CA.
        r = srv.run_cli("store", "--data-dir", str(srv.data_dir), "--ca-file", str(tls.ca_cert), "list")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["CustomKeyStores"][0]["ConnectionState"] == "CONNECTED"
        r = srv.run_cli("store", "--data-dir", str(srv.data_dir), "list")
        assert r.returncode != 0 and "--ca-file" in r.stderr, r.stderr
        other_ca = make_test_ca(tmp_path / "other-ca")
        r = srv.run_cli("store", "--data-dir", str(srv.data_dir), "--ca-file", str(other_ca.ca_cert), "list")
        assert r.returncode != 0 and "cannot reach the service" in r.stderr, r.stderr

        # Plain HTTP to the TLS port: no KMS answer.
        plain = endpoint.replace("https://", "http://")
        # (a TLS alert is no HTTP status line)
        with pytest.raises((urllib.error.URLError, http.client.HTTPException, OSError)):
            urllib.request.urlopen(urllib.request.Request(plain + "/", data=b"{}"), timeout=10)
        print(f"TLS: {endpoint} served create/encrypt/decrypt/list; unverified and plain refused")
    finally:
        srv.stop()
