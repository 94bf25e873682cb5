"""Custom key stores through the KMS API and `hsmkms store`: a store of new SoftHSM2 tokens is
created, connected, used, disconnected and deleted; a token joins and leaves a live cluster with
one command each, under load, without a failed request."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

from e2e_support import (
    Server,
    expect_error,
    hsmkms_binary,
    kms_client,
    raw_request,
    report,
)

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
STORE_TYPE = "HSMKMS_PKCS11"


def provision_token(home: Path, label: str, so_pin: str = "so-pin-1234",
                    user_pin: str = "user-pin-5678") -> dict:
    """A new SoftHSM2 token in its own directory, as the API's token descriptor."""
    (home / "tokens").mkdir(parents=True)
    conf = home / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {home / 'tokens'}\nobjectstore.backend = file\n")
    r = subprocess.run(
        [str(hsmkms_binary()), "worker", "provision", MODULE, label],
        input=f"{so_pin}\n{user_pin}\n".encode(), env=dict(os.environ, SOFTHSM2_CONF=str(conf)),
        capture_output=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    for name, pin in (("user.pin", user_pin), ("so.pin", so_pin)):
        # PIN files readable by others are refused: create them private.
        fd = os.open(home / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(pin + "\n")
    return {"Module": MODULE, "Label": label, "PinFile": str(home / "user.pin"),
            "SoPinFile": str(home / "so.pin"), "Workers": 1,
            "Env": {"SOFTHSM2_CONF": str(conf)}}


def call(endpoint: str, operation: str, body: dict, **kw) -> dict:
    r = raw_request(endpoint, operation, body, **kw)
    assert r.status == 200, r
    return r.json() if r.body else {}


def refused(endpoint: str, operation: str, body: dict, code: str, **kw) -> str:
    r = raw_request(endpoint, operation, body, **kw)
    assert r.status == 400 and r.error_type == code, r
    return r.json()["message"]


def describe(endpoint: str, store_id: str) -> dict:
    return call(endpoint, "DescribeCustomKeyStores", {"CustomKeyStoreId": store_id})["CustomKeyStores"][0]


def test_a_store_of_new_tokens_is_created_connected_used_disconnected_and_deleted(fresh_server, tmp_path):
    ep = fresh_server.endpoint
    kms = fresh_server.client()
    a = provision_token(tmp_path / "a", "store-a")
    b = provision_token(tmp_path / "b", "store-b")

    # What a store needs, and the errors that say why.
    msg = refused(ep, "CreateCustomKeyStore", {"CustomKeyStoreName": "solo", "CustomKeyStoreType": STORE_TYPE,
                                               "HsmkmsTokens": [a]}, "CloudHsmClusterInvalidConfigurationException")
    assert "at least two tokens" in msg and "HsmkmsDevStore" in msg
    expect_error("UnsupportedOperationException", kms.create_custom_key_store, CustomKeyStoreName="cloudhsm",
                 CloudHsmClusterId="cluster-1a23b4cdefg", TrustAnchorCertificate="-----BEGIN CERTIFICATE-----",
                 KeyStorePassword="kmsuser-password")
    no_so = {k: v for k, v in b.items() if k != "SoPinFile"}
    assert "SoPinFile" in refused(ep, "CreateCustomKeyStore", {"CustomKeyStoreName": "x", "CustomKeyStoreType": STORE_TYPE,
                                                               "HsmkmsTokens": [a, no_so]}, "ValidationException")
    assert "PKCS#11 library" in refused(ep, "CreateCustomKeyStore", {
        "CustomKeyStoreName": "x", "CustomKeyStoreType": STORE_TYPE,
        "HsmkmsTokens": [a, dict(b, Module="/nonexistent/lib.so")]}, "ValidationException")
    dev_token = {"Module": MODULE, "Label": "hsmkms-dev", "PinFile": str(fresh_server.data_dir / "user.pin"),
                 "SoPinFile": str(fresh_server.data_dir / "so.pin"),
                 "Env": {"SOFTHSM2_CONF": str(fresh_server.data_dir / "softhsm2.conf")}}
    refused(ep, "CreateCustomKeyStore", {"CustomKeyStoreName": "x", "CustomKeyStoreType": STORE_TYPE,
                                         "HsmkmsTokens": [a, dev_token]}, "CloudHsmClusterInUseException")

    # Created: DISCONNECTED, its keys can't be made yet.
    store_id = call(ep, "CreateCustomKeyStore", {"CustomKeyStoreName": "pair", "CustomKeyStoreType": STORE_TYPE,
                                                 "HsmkmsTokens": [a, b]})["CustomKeyStoreId"]
    refused(ep, "CreateCustomKeyStore", {"CustomKeyStoreName": "pair", "CustomKeyStoreType": STORE_TYPE,
                                         "HsmkmsTokens": [a, b]}, "CustomKeyStoreNameInUseException")
    d = describe(ep, store_id)
    assert d["ConnectionState"] == "DISCONNECTED" and d["CustomKeyStoreType"] == STORE_TYPE
    assert [t["State"] for t in d["HsmkmsTokens"]] == ["DISCONNECTED", "DISCONNECTED"]
    assert d["HsmkmsMinTokens"] == 2 and d["HsmkmsDevStore"] is False
    expect_error("CustomKeyStoreInvalidStateException", kms.create_key, CustomKeyStoreId=store_id)
    stores = kms.describe_custom_key_stores()["CustomKeyStores"]
    assert len(stores) == 2 and store_id in [s["CustomKeyStoreId"] for s in stores]

    # Connected (through boto3): keys are made in it and work; the dev store's keys are unaffected.
    kms.connect_custom_key_store(CustomKeyStoreId=store_id)
    d = describe(ep, store_id)
    assert d["ConnectionState"] == "CONNECTED", d
    assert [t["State"] for t in d["HsmkmsTokens"]] == ["UP", "UP"]
    key = kms.create_key(CustomKeyStoreId=store_id, Description="in the pair")["KeyMetadata"]
    assert key["CustomKeyStoreId"] == store_id and key["CloudHsmClusterId"] == d["CloudHsmClusterId"]
    blob = kms.encrypt(KeyId=key["Arn"], Plaintext=b"pair")["CiphertextBlob"]
    dk = kms.generate_data_key(KeyId=key["Arn"], KeySpec="AES_256")
    assert kms.decrypt(CiphertextBlob=dk["CiphertextBlob"])["Plaintext"] == dk["Plaintext"]
    assert len(kms.generate_random(NumberOfBytes=16, CustomKeyStoreId=store_id)["Plaintext"]) == 16
    other = kms.create_key(Description="in the dev store")["KeyMetadata"]
    assert other["CustomKeyStoreId"] != store_id
    other_blob = kms.encrypt(KeyId=other["Arn"], Plaintext=b"dev")["CiphertextBlob"]

    # Deletion needs a disconnected store without keys, as AWS.
    expect_error("CustomKeyStoreInvalidStateException", kms.delete_custom_key_store, CustomKeyStoreId=store_id)
    kms.disconnect_custom_key_store(CustomKeyStoreId=store_id)
    expect_error("CustomKeyStoreInvalidStateException", kms.disconnect_custom_key_store, CustomKeyStoreId=store_id)
    assert kms.describe_key(KeyId=key["Arn"])["KeyMetadata"]["KeyState"] == "Unavailable"
    expect_error("KMSInvalidStateException", kms.decrypt, CiphertextBlob=blob)
    assert kms.decrypt(CiphertextBlob=other_blob)["Plaintext"] == b"dev"
    expect_error("CustomKeyStoreHasCMKsException", kms.delete_custom_key_store, CustomKeyStoreId=store_id)

    # Renamed while disconnected; the store and its state survive a restart, its keys too.
    kms.update_custom_key_store(CustomKeyStoreId=store_id, NewCustomKeyStoreName="pair-renamed")
    fresh_server.restart()
    kms = fresh_server.client()
    ep = fresh_server.endpoint
    d = describe(ep, store_id)
    assert d["ConnectionState"] == "DISCONNECTED" and d["CustomKeyStoreName"] == "pair-renamed"
    kms.connect_custom_key_store(CustomKeyStoreId=store_id)
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"pair"
    fresh_server.restart()
    kms = fresh_server.client()
    ep = fresh_server.endpoint
    assert describe(ep, store_id)["ConnectionState"] == "CONNECTED"
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"pair"

    # An empty store is deleted, and its name is free again.
    c = provision_token(tmp_path / "c", "store-c")
    d_token = provision_token(tmp_path / "d", "store-d")
    # boto3 cannot send HsmkmsTokens (not in botocore's model): a raw signed request can.
    empty = call(ep, "CreateCustomKeyStore", {"CustomKeyStoreName": "empty", "CustomKeyStoreType": STORE_TYPE,
                                              "HsmkmsTokens": [c, d_token]})["CustomKeyStoreId"]
    kms.delete_custom_key_store(CustomKeyStoreId=empty)
    expect_error("CustomKeyStoreNotFoundException", kms.describe_custom_key_stores, CustomKeyStoreId=empty)
    call(ep, "CreateCustomKeyStore", {"CustomKeyStoreName": "empty", "CustomKeyStoreType": STORE_TYPE,
                                      "HsmkmsTokens": [c, d_token]})


def test_a_pin_file_readable_by_others_is_refused_with_the_fix(fresh_server, tmp_path):
    a = provision_token(tmp_path / "a", "pin-a")
    b = provision_token(tmp_path / "b", "pin-b")
    os.chmod(b["PinFile"], 0o644)
    r = raw_request(fresh_server.endpoint, "CreateCustomKeyStore", {
        "CustomKeyStoreName": "loose-pin", "CustomKeyStoreType": STORE_TYPE, "HsmkmsTokens": [a, b]})
    assert r.status == 400, r
    message = r.json()["message"]
    assert b["PinFile"] in message and f"chmod 600 {b['PinFile']}" in message, message


def test_a_store_whose_pin_is_refused_fails_with_the_aws_code_and_connects_once_fixed(fresh_server, tmp_path):
    ep = fresh_server.endpoint
    kms = fresh_server.client()
    a = provision_token(tmp_path / "a", "pin-a")
    b = provision_token(tmp_path / "b", "pin-b")
    Path(b["PinFile"]).write_text("not-the-pin\n")
    store_id = call(ep, "CreateCustomKeyStore", {"CustomKeyStoreName": "bad-pin", "CustomKeyStoreType": STORE_TYPE,
                                                 "HsmkmsTokens": [a, b]})["CustomKeyStoreId"]
    kms.connect_custom_key_store(CustomKeyStoreId=store_id)
    d = describe(ep, store_id)
    assert d["ConnectionState"] == "FAILED" and d["ConnectionErrorCode"] == "INVALID_CREDENTIALS", d
    assert "CKR_PIN_INCORRECT" in d["HsmkmsConnectionError"] and "not-the-pin" not in json.dumps(d)
    # As AWS: a FAILED store is disconnected before it is connected again; it is not deleted.
    expect_error("CustomKeyStoreInvalidStateException", kms.connect_custom_key_store, CustomKeyStoreId=store_id)
    expect_error("CustomKeyStoreInvalidStateException", kms.delete_custom_key_store, CustomKeyStoreId=store_id)
    # Fixed PIN file: `hsmkms store connect` disconnects the FAILED store and connects it.
    Path(b["PinFile"]).write_text("user-pin-5678\n")
    r = fresh_server.run_cli("store", "--data-dir", str(fresh_server.data_dir), "connect", store_id)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ConnectionState"] == "CONNECTED"
    key = kms.create_key(CustomKeyStoreId=store_id)["KeyMetadata"]["Arn"]
    assert kms.encrypt(KeyId=key, Plaintext=b"ok")["KeyId"] == key


def test_only_admin_principals_manage_key_stores(fresh_server):
    config = fresh_server.data_dir / "hsmkms.toml"
    config.write_text(config.read_text() + '\n[[principals]]\nname = "app"\naccess_key_id = "AKIAHSMKMSAPP0000001"\n'
                                           'secret_access_key = "app-secret-key-for-the-test"\n')
    fresh_server.restart()
    app = kms_client(fresh_server.endpoint, access_key="AKIAHSMKMSAPP0000001",
                     secret_key="app-secret-key-for-the-test")
    store_id = app.describe_custom_key_stores()["CustomKeyStores"][0]["CustomKeyStoreId"]
    for op in (app.disconnect_custom_key_store, app.connect_custom_key_store, app.delete_custom_key_store):
        err = expect_error("AccessDeniedException", op, CustomKeyStoreId=store_id)
        assert "admin" in str(err)
    # The app principal still uses keys; the dev principal (admin) still manages the store.
    key = app.create_key()["KeyMetadata"]["Arn"]
    assert app.decrypt(CiphertextBlob=app.encrypt(KeyId=key, Plaintext=b"x")["CiphertextBlob"])["Plaintext"] == b"x"
    fresh_server.client().connect_custom_key_store(CustomKeyStoreId=store_id)


def store_cli(data: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return subprocess.run([str(hsmkms_binary()), "store", "--data-dir", str(data), *args],
                          capture_output=True, text=True, timeout=180, env=env)


def test_a_token_joins_and_leaves_a_live_cluster_with_one_command_each(tmp_path):
    """On a 3-token dev cluster under load: `hsmkms store add-token` brings in a fourth token
    (domain key and every key first), `remove-token` takes two of the first ones out, and the
    new token then serves every key with the others gone. No request fails meanwhile."""
    data = tmp_path / "data"
    srv = Server(data, tmp_path / "server.log", tokens=3).start()
    try:
        kms = srv.client()
        keys = [kms.create_key(Description=f"k{i}")["KeyMetadata"]["Arn"] for i in range(6)]
        blobs = [(k, kms.encrypt(KeyId=k, Plaintext=k.encode())["CiphertextBlob"]) for k in keys]
        store_id = kms.describe_key(KeyId=keys[0])["KeyMetadata"]["CustomKeyStoreId"]

        stop = threading.Event()
        lock = threading.Lock()
        ok, failures = [0], []

        def load(n: int) -> None:
            client = srv.client()
            i = 0
            while not stop.is_set():
                k, blob = blobs[i % len(blobs)]
                i += 1
                try:
                    assert client.decrypt(CiphertextBlob=blob)["Plaintext"] == k.encode()
                    dk = client.generate_data_key(KeyId=k, KeySpec="AES_256")
                    assert client.decrypt(CiphertextBlob=dk["CiphertextBlob"])["Plaintext"] == dk["Plaintext"]
                    with lock:
                        ok[0] += 3
                except Exception as e:  # noqa: BLE001 - every failure counts
                    with lock:
                        failures.append(f"{type(e).__name__}: {e}")
                time.sleep(0.005)

        threads = [threading.Thread(target=load, args=(n,), daemon=True) for n in range(3)]
        for t in threads:
            t.start()

        # A fourth token, made with the dev PINs, joins with one command.
        home = data / "token-4"
        (home / "tokens").mkdir(parents=True)
        conf = home / "softhsm2.conf"
        conf.write_text(f"directories.tokendir = {home / 'tokens'}\nobjectstore.backend = file\n")
        pins = (data / "so.pin").read_text().strip() + "\n" + (data / "user.pin").read_text().strip() + "\n"
        r = subprocess.run([str(hsmkms_binary()), "worker", "provision", MODULE, "hsmkms-dev-4"],
                           input=pins.encode(), env=dict(os.environ, SOFTHSM2_CONF=str(conf)),
                           capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr
        spec = (f"label=hsmkms-dev-4,module={MODULE},pin-file={data / 'user.pin'},"
                f"so-pin-file={data / 'so.pin'},workers=1,env.SOFTHSM2_CONF={conf}")
        r = store_cli(data, "add-token", store_id, "--token", spec)
        assert r.returncode == 0, r.stderr
        added = json.loads(r.stdout)
        assert [t["Label"] for t in added["HsmkmsTokens"]][-1] == "hsmkms-dev-4"
        assert all(t["State"] == "UP" for t in added["HsmkmsTokens"]), added
        # Adding it twice is refused, with the reason.
        r = store_cli(data, "add-token", store_id, "--token", spec)
        assert r.returncode != 0 and "already in custom key store" in r.stderr, r.stderr

        # Tokens 1 and 2 leave, one command each; a store keeps at least two tokens.
        for label, conf_path in [("hsmkms-dev", data / "softhsm2.conf"),
                                 ("hsmkms-dev-2", data / "token-2" / "softhsm2.conf")]:
            r = store_cli(data, "remove-token", store_id, label)
            assert r.returncode == 0, r.stderr
            assert label not in [t["Label"] for t in json.loads(r.stdout)["HsmkmsTokens"]]
        r = store_cli(data, "remove-token", store_id, "hsmkms-dev-3")
        assert r.returncode != 0 and "CloudHsmClusterInvalidConfigurationException" in r.stderr, r.stderr
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        report(f"add/remove under load: {ok[0]} requests ok, {len(failures)} failed")
        assert not failures, failures[:5]
        assert ok[0] > 0
        # The removed tokens' workers are gone once their last requests finished.
        deadline = time.monotonic() + 10
        while srv.token_workers(1) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not srv.token_workers(1), "token 1's workers still run"

        # The store keeps its new tokens across a restart (the metadata, not the config, counts).
        srv.restart()
        kms = srv.client()
        d = call(srv.endpoint, "DescribeCustomKeyStores", {"CustomKeyStoreId": store_id})["CustomKeyStores"][0]
        assert [t["Label"] for t in d["HsmkmsTokens"]] == ["hsmkms-dev-3", "hsmkms-dev-4"], d

        # Token 3 goes away too: the token that joined serves every key alone.
        srv.lose_token(3)
        for k, blob in blobs:
            assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == k.encode()
        report(f"token 4 alone decrypts all {len(blobs)} keys' ciphertexts")
    finally:
        srv.stop()


def test_a_whole_cluster_is_restored_into_a_new_service_from_a_token_that_kept_the_domain_key(
        fresh_server, tmp_path):
    """Disaster recovery: the old service and its metadata are gone; one token that holds the
    domain key survives (an offline or removed token). A new service makes a store of it and
    new tokens (the domain key is carried to them), restores the backup into that store, and
    then, with the old token retired, the new tokens alone decrypt the old ciphertexts."""
    old = fresh_server.client()
    keys = [old.create_key(Description=f"dr{i}")["KeyMetadata"]["Arn"] for i in range(5)]
    old.create_alias(AliasName="alias/dr", TargetKeyId=keys[0])
    blobs = [(k, old.encrypt(KeyId=k, Plaintext=k.encode(), EncryptionContext={"dr": "1"})["CiphertextBlob"])
             for k in keys]
    backup = tmp_path / "dr.backup"
    r = fresh_server.run_cli("backup", "create", "--data-dir", str(fresh_server.data_dir), "--out", str(backup))
    assert r.returncode == 0, r.stderr
    listed = json.loads(fresh_server.run_cli("backup", "list", "--data-dir", str(fresh_server.data_dir)).stdout)
    assert listed["Backups"][-1]["Keys"] == 5 and listed["Backups"][-1]["FileState"] == "OK", listed
    fresh_server.stop()
    (fresh_server.data_dir / "metadata.db").rename(fresh_server.data_dir / "metadata.db.lost")

    # The surviving token, as the new service names it.
    survivor = {"Module": MODULE, "Label": "hsmkms-dev", "PinFile": str(fresh_server.data_dir / "user.pin"),
                "SoPinFile": str(fresh_server.data_dir / "so.pin"), "Workers": 1,
                "Env": {"SOFTHSM2_CONF": str(fresh_server.data_dir / "softhsm2.conf")}}
    x = provision_token(tmp_path / "x", "new-x")
    y = provision_token(tmp_path / "y", "new-y")
    new = Server(tmp_path / "new-data", tmp_path / "new.log").start()
    try:
        ep = new.endpoint
        store_id = call(ep, "CreateCustomKeyStore", {"CustomKeyStoreName": "restored", "CustomKeyStoreType": STORE_TYPE,
                                                     "HsmkmsTokens": [survivor, x]})["CustomKeyStoreId"]
        kms = new.client()
        kms.connect_custom_key_store(CustomKeyStoreId=store_id)
        assert describe(ep, store_id)["ConnectionState"] == "CONNECTED"

        # A dry run first, then the restore into the new store.
        target = ["--data-dir", str(new.data_dir), "--store", store_id, str(backup)]
        dry = json.loads(new.run_cli("backup", "restore", "--dry-run", *target).stdout)
        assert dry["DryRun"] and dry["KeysAdded"] == 5 and dry["AliasesAdded"] == 1, dry
        r = new.run_cli("backup", "restore", *target)
        assert r.returncode == 0, r.stderr
        restored = json.loads(r.stdout)
        assert restored["KeysAdded"] == 5 and restored["TokenCopies"] == 5, restored  # onto new-x

        # A second new token joins, the survivor retires; the new tokens alone serve.
        r = new.run_cli("store", "--data-dir", str(new.data_dir), "add-token", store_id, "--token",
                        f"label=new-y,module={MODULE},pin-file={y['PinFile']},so-pin-file={y['SoPinFile']},"
                        f"workers=1,env.SOFTHSM2_CONF={y['Env']['SOFTHSM2_CONF']}")
        assert r.returncode == 0, r.stderr
        r = new.run_cli("store", "--data-dir", str(new.data_dir), "remove-token", store_id, "hsmkms-dev")
        assert r.returncode == 0, r.stderr
        (fresh_server.data_dir / "tokens").rename(fresh_server.data_dir / "tokens-retired")
        for k, blob in blobs:
            got = kms.decrypt(CiphertextBlob=blob, EncryptionContext={"dr": "1"})
            assert got["Plaintext"] == k.encode() and got["KeyId"] == k
        assert kms.describe_key(KeyId="alias/dr")["KeyMetadata"]["Arn"] == keys[0]
        assert kms.describe_key(KeyId=keys[0])["KeyMetadata"]["CustomKeyStoreId"] == store_id
        report(f"restored into a new service's store {store_id}: {restored}; new tokens alone decrypt {len(blobs)}")
    finally:
        new.stop()
