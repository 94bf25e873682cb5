"""The TDE front through a real Vault client, hvac (what Python tools and health checks use):
`is_authenticated()` (GET /v1/auth/token/lookup-self), `sys.read_health_status` (HEAD and GET
/v1/sys/health, unauthenticated as in Vault), and `secrets.kv.v2.read_secret_version` with
Vault's KV v2 metadata (created_time, custom_metadata, deletion_time, destroyed, version).
Writes stay refused. Over https (test CA, hvac verifies it) and plain http on loopback."""

from __future__ import annotations

import datetime as dt

import hvac
import hvac.exceptions
import pytest

from e2e_support import kms_client
from tde_support import TdeServer, kv_get, kv_key, make_test_ca

MOUNT = "tde"


@pytest.fixture(scope="module", params=["https", "http"])
def srv(request, hsmkms_bin, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"tde-hvac-{request.param}")
    tls = make_test_ca(base / "tls") if request.param == "https" else None
    server = TdeServer(base / "data", base / "server.log", tls=tls)
    server.start()
    yield server
    server.stop()


def vault(srv: TdeServer, token: str | None) -> hvac.Client:
    verify = str(srv.tde_tls.ca_cert) if srv.tde_tls else False
    return hvac.Client(url=srv.tde_endpoint, token=token, verify=verify, timeout=30)


def rfc3339(text: str) -> dt.datetime:
    # Vault writes nanoseconds and a Z; Python's fromisoformat takes at most microseconds.
    head, _, frac = text.rstrip("Z").partition(".")
    frac = (frac + "000000")[:6]
    return dt.datetime.fromisoformat(f"{head}.{frac}+00:00")


def near_now(t: dt.datetime) -> bool:
    return abs((dt.datetime.now(dt.timezone.utc) - t).total_seconds()) < 600


def test_hvac_is_authenticated_for_a_valid_token_only(srv):
    token = srv.client_create("hvac-auth")
    assert vault(srv, token).is_authenticated() is True
    assert vault(srv, "hvs." + "0" * 64).is_authenticated() is False

    me = vault(srv, token).auth.token.lookup_self()["data"]
    assert me["ttl"] == 0 and me["renewable"] is False and me["expire_time"] is None
    assert me["policies"] and all(isinstance(p, str) for p in me["policies"])
    assert me["display_name"] == "token-hvac-auth"
    assert near_now(dt.datetime.fromtimestamp(me["creation_time"], dt.timezone.utc))
    # The token itself is not echoed (only its SHA-256 is kept), and there is no accessor.
    assert token not in repr(me)
    assert "accessor" not in me and "id" not in me

    srv.client_revoke("hvac-auth")
    assert vault(srv, token).is_authenticated() is False
    with pytest.raises(hvac.exceptions.Forbidden):
        vault(srv, token).auth.token.lookup_self()


def test_hvac_health_needs_no_token(srv):
    for token in (None, srv.client_create("hvac-health")):
        health = vault(srv, token).sys.read_health_status(method="GET")
        assert health["initialized"] is True
        assert health["sealed"] is False
        assert health["standby"] is False
        assert isinstance(health["version"], str) and health["version"]
        assert near_now(dt.datetime.fromtimestamp(health["server_time_utc"], dt.timezone.utc))
        head = vault(srv, token).sys.read_health_status()  # hvac's default: HEAD
        assert head.status_code == 200 and head.content == b""


def test_hvac_reads_kv2_versions_with_their_metadata(srv):
    kms = kms_client(srv.endpoint)
    arn = kms.create_key(Description="tde hvac e2e")["KeyMetadata"]["Arn"]
    token = srv.client_create("hvac-kv")
    srv.key_create("hvac-kv", arn, 1)
    client = vault(srv, token)

    first = client.secrets.kv.v2.read_secret_version(path="1", mount_point=MOUNT,
                                                     raise_on_deleted_version=True)
    meta = first["data"]["metadata"]
    assert meta["version"] == 1
    assert meta["custom_metadata"] is None
    assert meta["deletion_time"] == "" and meta["destroyed"] is False
    created_v1 = rfc3339(meta["created_time"])
    assert near_now(created_v1)
    # The same material the plugin's raw read gets.
    raw, _ = kv_key(kv_get(srv.tde_url, "/v1/tde/data/1", token,
                           ca=srv.tde_tls.ca_cert if srv.tde_tls else None))
    assert bytes.fromhex(first["data"]["data"]["data"]) == raw

    assert srv.key_rotate("hvac-kv", 1) == 2
    latest = client.secrets.kv.v2.read_secret_version(path="1", mount_point=MOUNT,
                                                      raise_on_deleted_version=True)
    assert latest["data"]["metadata"]["version"] == 2
    assert rfc3339(latest["data"]["metadata"]["created_time"]) >= created_v1
    again = client.secrets.kv.v2.read_secret_version(path="1", version=1, mount_point=MOUNT,
                                                     raise_on_deleted_version=True)
    assert again["data"]["metadata"]["created_time"] == meta["created_time"]

    with pytest.raises(hvac.exceptions.InvalidPath):
        client.secrets.kv.v2.read_secret_version(path="99", mount_point=MOUNT,
                                                 raise_on_deleted_version=True)
    # Read-only: writes are refused as before (405, which hvac raises as UnexpectedError).
    with pytest.raises(hvac.exceptions.UnexpectedError):
        client.secrets.kv.v2.create_or_update_secret(path="1", secret={"data": "00"},
                                                     mount_point=MOUNT)
