"""The KMS JSON wire protocol at the HTTP level: raw requests signed with botocore's SigV4Auth."""

from __future__ import annotations

import base64
import json
import os
import socket
import urllib.parse

import pytest

from e2e_support import (
    JSON_CT,
    KEY_ARN_RE,
    b64,
    kms_client,
    list_all_keys,
    raw_request,
)


def assert_json_error(resp, *types, status=400):
    assert resp.status == status, resp
    assert resp.headers.get("content-type", "").split(";")[0].strip() == JSON_CT, resp
    assert "x-amzn-query-error" not in resp.headers, resp.headers
    assert resp.headers.get("x-amzn-requestid"), resp.headers
    body = resp.json()
    assert isinstance(body.get("message", body.get("Message")), str), body
    assert resp.error_type in types, f"expected {types}, got {resp!r}"


def key_count(endpoint):
    return len(list_all_keys(kms_client(endpoint)))


@pytest.fixture(scope="module")
def key_arn(kms):
    return kms.create_key(Description="protocol")["KeyMetadata"]["Arn"]


def test_success_response_shape(endpoint, key_arn):
    resp = raw_request(endpoint, "DescribeKey", {"KeyId": key_arn})
    assert resp.status == 200, resp
    assert resp.headers["content-type"].split(";")[0].strip() == JSON_CT
    assert "x-amzn-query-error" not in resp.headers
    assert resp.headers.get("x-amzn-requestid"), resp.headers
    md = resp.json()["KeyMetadata"]
    assert md["Arn"] == key_arn
    # Dates are epoch seconds (JSON numbers) in the KMS JSON protocol.
    assert isinstance(md["CreationDate"], (int, float)), md["CreationDate"]

    resp = raw_request(endpoint, "Encrypt", {"KeyId": key_arn, "Plaintext": b64(b"raw")})
    assert resp.status == 200, resp
    body = resp.json()
    assert KEY_ARN_RE.match(body["KeyId"])
    base64.b64decode(body["CiphertextBlob"], validate=True)
    resp = raw_request(endpoint, "Decrypt", {"CiphertextBlob": body["CiphertextBlob"]})
    assert resp.status == 200, resp
    assert base64.b64decode(resp.json()["Plaintext"]) == b"raw"


def test_error_response_shape(endpoint):
    resp = raw_request(endpoint, "DescribeKey",
                       {"KeyId": "arn:aws:kms:us-east-1:111122223333:key/"
                                 "00000000-0000-0000-0000-000000000000"})
    assert_json_error(resp, "NotFoundException")


def test_malformed_json(endpoint):
    for body in (b'{"KeyId": ', b"not json at all", b"[1, 2, 3]", b'{"Limit": "ten"}'):
        resp = raw_request(endpoint, "ListKeys", body)
        assert_json_error(resp, "SerializationException", "ValidationException")
    # A body that is not JSON at all is a SerializationException.
    assert_json_error(raw_request(endpoint, "CreateKey", b"{{{{"), "SerializationException")


def test_empty_body_is_an_empty_request(endpoint):
    # botocore sends "{}" for an operation without input; an empty body is treated the same by
    # AWS for ListKeys. Either success or a clean 400 is acceptable; never a 5xx.
    resp = raw_request(endpoint, "ListKeys", b"")
    assert resp.status in (200, 400), resp


def test_unknown_operation(endpoint):
    assert_json_error(raw_request(endpoint, "FooBar", {}), "UnknownOperationException")
    assert_json_error(raw_request(endpoint, "OtherService.ListKeys", {}),
                      "UnknownOperationException")


def test_missing_target(endpoint):
    resp = raw_request(endpoint, None, {})
    assert 400 <= resp.status < 500, resp
    assert "x-amzn-query-error" not in resp.headers


def test_oversized_body_is_refused_and_the_server_keeps_working(endpoint, key_arn):
    big = json.dumps({"KeyId": key_arn, "Plaintext": b64(os.urandom(800 * 1024))}).encode()
    assert len(big) > 1024 * 1024
    try:
        resp = raw_request(endpoint, "Encrypt", big)
        status = resp.status
    except (ConnectionResetError, BrokenPipeError) as e:  # pragma: no cover - reported below
        pytest.fail(f"server dropped the connection instead of answering 4xx: {e!r}")
    assert 400 <= status < 500, resp
    print(f"oversized body ({len(big)} bytes) -> HTTP {status}")
    resp = raw_request(endpoint, "Encrypt", {"KeyId": key_arn, "Plaintext": b64(b"small")})
    assert resp.status == 200, resp


def test_oversized_content_length_is_refused_before_the_body(endpoint):
    """A request that announces 100 MiB is refused on its headers (4xx within 10 s), without the
    server waiting for a body it will not accept; the server keeps working."""
    u = urllib.parse.urlsplit(endpoint)
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.sendall(
            b"POST / HTTP/1.1\r\nHost: " + u.netloc.encode() + b"\r\n"
            b"X-Amz-Target: TrentService.ListKeys\r\n"
            b"Content-Type: application/x-amz-json-1.1\r\n"
            b"Content-Length: 104857600\r\n\r\n"
        )
        s.settimeout(10)
        try:
            head = s.recv(4096)
        except socket.timeout:
            head = None
    assert head is not None, "no answer within 10 s: the server waits for a 100 MiB body"
    assert head, "connection closed without an answer"
    status = int(head.split(b" ", 2)[1])
    assert 400 <= status < 500, head[:300]
    print(f"Content-Length 100 MiB -> HTTP {status}")
    assert raw_request(endpoint, "ListKeys", {}).status == 200


def test_bad_base64(endpoint, key_arn):
    for op, body in (
        ("Encrypt", {"KeyId": key_arn, "Plaintext": "!!!not base64!!!"}),
        ("Encrypt", {"KeyId": key_arn, "Plaintext": "abc"}),
        ("Decrypt", {"CiphertextBlob": "%%%%"}),
        ("Decrypt", {"CiphertextBlob": 12345}),
    ):
        assert_json_error(raw_request(endpoint, op, body),
                          "SerializationException", "ValidationException")


def test_plaintext_of_4097_bytes(endpoint, key_arn):
    assert_json_error(
        raw_request(endpoint, "Encrypt", {"KeyId": key_arn, "Plaintext": b64(b"a" * 4097)}),
        "ValidationException",
    )
    resp = raw_request(endpoint, "Encrypt", {"KeyId": key_arn, "Plaintext": b64(b"a" * 4096)})
    assert resp.status == 200, resp


def test_missing_required_member(endpoint):
    assert_json_error(raw_request(endpoint, "Encrypt", {"Plaintext": b64(b"x")}),
                      "ValidationException")
    assert_json_error(raw_request(endpoint, "Decrypt", {}), "ValidationException")


def test_unsigned_request_is_rejected_and_does_nothing(endpoint):
    before = key_count(endpoint)
    resp = raw_request(endpoint, "CreateKey", {"Description": "unsigned"}, sign=False)
    assert 400 <= resp.status < 500, resp
    assert resp.error_type in (
        "MissingAuthenticationTokenException",
        "MissingAuthenticationToken",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "IncompleteSignatureException",
        "AccessDeniedException",
    ), resp
    assert "x-amzn-query-error" not in resp.headers
    assert key_count(endpoint) == before


def test_wrong_secret_is_rejected_and_does_nothing(endpoint):
    before = key_count(endpoint)
    resp = raw_request(endpoint, "CreateKey", {"Description": "wrong secret"},
                       secret_key="wrong-secret")
    assert_json_error(resp, "InvalidSignatureException")
    assert key_count(endpoint) == before


def test_unknown_access_key_is_rejected(endpoint):
    before = key_count(endpoint)
    resp = raw_request(endpoint, "CreateKey", {"Description": "unknown key"},
                       access_key="AKIANOBODY0000000000")
    assert_json_error(resp, "UnrecognizedClientException")
    assert key_count(endpoint) == before


def test_tampered_signed_request_is_rejected(endpoint, key_arn):
    before = key_count(endpoint)

    def swap_body(headers, body):
        return headers, body.replace(b"tamper-me", b"tamper-ME")

    resp = raw_request(endpoint, "CreateKey", {"Description": "tamper-me"},
                       mutate_after_signing=swap_body)
    assert_json_error(resp, "InvalidSignatureException")

    def swap_target(headers, body):
        headers = dict(headers)
        headers["X-Amz-Target"] = "TrentService.CreateKey"
        return headers, body

    # Signed as ListKeys, sent as CreateKey: X-Amz-Target is a signed header.
    resp = raw_request(endpoint, "ListKeys", {}, mutate_after_signing=swap_target)
    assert_json_error(resp, "InvalidSignatureException")
    assert key_count(endpoint) == before


def test_signature_for_another_service_or_region(endpoint):
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials
    import http.client

    before = key_count(endpoint)
    for service, region in (("s3", "us-east-1"), ("kms", "eu-west-1")):
        url = endpoint + "/"
        req = AWSRequest(method="POST", url=url, data=b'{"Description": "scope"}',
                         headers={"Content-Type": JSON_CT,
                                  "X-Amz-Target": "TrentService.CreateKey"})
        SigV4Auth(Credentials("AKIAHSMKMSDEV0000001",
                              "hsmkms-dev-secret-key-for-local-use-only"),
                  service, region).add_auth(req)
        u = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        conn.request("POST", "/", body=req.body, headers=dict(req.headers.items()))
        r = conn.getresponse()
        data = r.read()
        conn.close()
        assert 400 <= r.status < 500, (service, region, r.status, data)
    assert key_count(endpoint) == before


def test_stale_signature_is_rejected(endpoint):
    """Signed with a clock 20 minutes in the past (hsmkms, like AWS, allows 15 minutes of skew)."""
    import datetime as dt
    from unittest import mock

    before = key_count(endpoint)
    past = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) - dt.timedelta(minutes=20)
    with mock.patch("botocore.auth.get_current_datetime", return_value=past):
        resp = raw_request(endpoint, "CreateKey", {"Description": "stale"})
    assert 400 <= resp.status < 500, resp
    assert resp.error_type in ("InvalidSignatureException", "SignatureDoesNotMatch",
                               "RequestExpired", "InvalidSignature"), resp
    assert key_count(endpoint) == before


def test_metrics_count_requests_errors_and_token_state(endpoint, kms):
    import re
    import urllib.request

    key = kms.create_key()["KeyMetadata"]["Arn"]
    kms.encrypt(KeyId=key, Plaintext=b"m")
    kms.disable_key(KeyId=key)
    with pytest.raises(Exception):
        kms.encrypt(KeyId=key, Plaintext=b"m")
    with urllib.request.urlopen(f"{endpoint}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()

    def value(pattern: str) -> float:
        m = re.search(pattern + r" (\S+)$", text, re.M)
        assert m, f"{pattern} not in metrics:\n{text[:2000]}"
        return float(m.group(1))

    assert value(r'hsmkms_requests_total\{operation="Encrypt"\}') >= 2
    assert value(r'hsmkms_errors_total\{operation="Encrypt",exception="DisabledException"\}') >= 1
    assert value(r'hsmkms_request_duration_seconds_count\{operation="Encrypt"\}') >= 2
    assert value(r'hsmkms_token_up\{key_store="cks-[0-9a-f]+",cluster="cluster-[a-z2-7]+",token="hsmkms-dev"\}') == 1
    assert value(r'hsmkms_key_store_connected\{key_store="cks-[0-9a-f]+"\}') == 1
    assert "hsmkms_worker_restarts_total" in text and "hsmkms_failovers_total" in text
    assert value("^hsmkms_probes_total") >= 0 and value("^hsmkms_probe_keys_copied_total") >= 0


# --------------------------------------------------------------------------------------------
# Hostile input before authentication: the dev principal's access key id is public (README),
# so whatever it reaches with a wrong signature is reachable by anyone.

UUID_RE = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"


def _amz_now() -> str:
    import datetime as dt
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _raw_http(endpoint: str, request_line: bytes, headers: list[tuple[bytes, bytes]],
              body: bytes = b"{}", timeout: float = 10) -> tuple[int | None, bytes]:
    """Sends bytes as they are (no client-side validation) and returns (status, answer); status
    None when the server closed the connection without answering."""
    u = urllib.parse.urlsplit(endpoint)
    head = request_line + b"\r\n" + b"Host: " + u.netloc.encode() + b"\r\n"
    for name, value in headers:
        head += name + b": " + value + b"\r\n"
    head += b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as s:
        s.sendall(head + body)
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    if not answer:
        return None, b""
    return int(answer.split(b" ", 2)[1]), answer


def _zero_signature_headers(target: bytes = b"TrentService.ListKeys") -> list[tuple[bytes, bytes]]:
    date = _amz_now()
    return [
        (b"X-Amz-Target", target),
        (b"Content-Type", JSON_CT.encode()),
        (b"X-Amz-Date", date.encode()),
        (b"Authorization",
         b"AWS4-HMAC-SHA256 Credential=AKIAHSMKMSDEV0000001/" + date[:8].encode()
         + b"/us-east-1/kms/aws4_request, SignedHeaders=host;x-amz-date;x-amz-target, Signature="
         + b"0" * 64),
    ]


def _log_size(server) -> int:
    return server.log_path.stat().st_size


def test_query_with_a_split_utf8_escape_is_refused_without_a_panic(server):
    """`?a=%2` followed by the two bytes of U+04C7: the old percent-decoder sliced the query
    string inside that character and panicked the handler (no answer, a panic in the log)."""
    before = _log_size(server)
    for _ in range(3):
        status, answer = _raw_http(server.endpoint, b"POST /?a=%2\xd3\x87 HTTP/1.1",
                                   _zero_signature_headers())
        assert status is not None, "the server closed the connection without an answer"
        assert 400 <= status < 500, answer[:300]
        assert b"InvalidSignatureException" in answer, answer[:300]
    with open(server.log_path, "rb") as f:
        f.seek(before)
        log = f.read()
    assert b"panicked" not in log, log[-2000:]
    assert raw_request(server.endpoint, "ListKeys", {}).status == 200


def test_forged_target_cannot_write_log_lines_or_flood_the_log(server):
    """An unauthenticated X-Amz-Target that imitates log fields, and one of 50 KiB: the server
    logs a known operation name or "Unknown", and a bounded number of bytes per request."""
    forged = b"TrentService.Decrypt principal=admin result=ok\tstatus=ok"
    huge = b"TrentService." + b"A" * (50 * 1024)
    for target in (forged, huge):
        before = _log_size(server)
        status, answer = _raw_http(server.endpoint, b"POST / HTTP/1.1",
                                   _zero_signature_headers(target))
        assert status is not None and 400 <= status < 500, answer[:300]
        with open(server.log_path, "rb") as f:
            f.seek(before)
            log = f.read()
        print(f"target of {len(target)} bytes -> {len(log)} bytes of log: {log[:300]!r}")
        assert b"principal=admin" not in log and b"AAAAAAAA" not in log, log[:2000]
        assert len(log) <= 1024, f"{len(log)} bytes of log for one request"
        assert b'op="Unknown"' in log, log[:2000]
    # Signed, the same target reaches the dispatch: the answer quotes it bounded.
    resp = raw_request(server.endpoint, "TrentService." + "B" * (50 * 1024), {})
    assert_json_error(resp, "UnknownOperationException")
    assert len(resp.body) < 300, resp


def test_request_id_is_a_uuid(kms, endpoint):
    import re
    ids = [kms.list_keys()["ResponseMetadata"]["RequestId"] for _ in range(3)]
    for rid in ids:
        assert re.match(UUID_RE, rid), rid
    assert len(set(ids)) == 3, ids
    resp = raw_request(endpoint, "FooBar", {})
    assert re.match(UUID_RE, resp.headers["x-amzn-requestid"]), resp.headers


def test_duplicate_keys_in_encryption_context_are_refused(endpoint, key_arn):
    """botocore cannot send them (dicts), so the body is written by hand and signed."""
    plaintext = b64(b"dup")
    body = ('{"KeyId": "%s", "Plaintext": "%s", '
            '"EncryptionContext": {"purpose": "a", "purpose": "b"}}' % (key_arn, plaintext))
    resp = raw_request(endpoint, "Encrypt", body)
    assert_json_error(resp, "SerializationException")
    # The same exception and wording as a duplicate top-level member.
    top = raw_request(endpoint, "Encrypt",
                      '{"KeyId": "%s", "KeyId": "%s", "Plaintext": "%s"}'
                      % (key_arn, key_arn, plaintext))
    assert_json_error(top, "SerializationException")
    assert top.json()["message"].startswith("Malformed request body: duplicate field `KeyId`")
    assert resp.json()["message"].startswith(
        "Malformed request body: duplicate field `purpose`"), resp.json()
    # Distinct keys still work, and Decrypt refuses the duplicate the same way.
    ok = raw_request(endpoint, "Encrypt", {"KeyId": key_arn, "Plaintext": plaintext,
                                           "EncryptionContext": {"purpose": "a"}})
    assert ok.status == 200, ok
    blob = ok.json()["CiphertextBlob"]
    dec = raw_request(endpoint, "Decrypt",
                      '{"CiphertextBlob": "%s", '
                      '"EncryptionContext": {"purpose": "b", "purpose": "a"}}' % blob)
    assert_json_error(dec, "SerializationException")
