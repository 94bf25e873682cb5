"""A dev key store of three SoftHSM2 tokens sharing a domain key: keys are on every token, and a
token lost under load (its directory moved away, its workers killed) fails no request."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

from e2e_support import Server, health, hsmkms_binary, kms_client, report


def cluster_server(tmp_path: Path, data: Path) -> Server:
    """`hsmkms dev --tokens 3` on data (not started), logging to tmp_path/log."""
    return Server(data, tmp_path / "log", tokens=3)


def test_losing_a_token_under_load_fails_no_request(tmp_path):
    data = tmp_path / "data"
    srv = cluster_server(tmp_path, data)
    endpoint = srv.start().endpoint
    try:
        kms = kms_client(endpoint)
        tokens = health(endpoint)["tokens"]
        assert [t["state"] for t in tokens] == ["UP", "UP", "UP"], tokens
        key = kms.create_key(Description="cluster")["KeyMetadata"]["Arn"]

        stop = threading.Event()
        lock = threading.Lock()
        ok, failures, blobs = [0], [], []

        def load(n: int) -> None:
            client = kms_client(endpoint)
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    pt = f"{n}-{i}".encode()
                    blob = client.encrypt(KeyId=key, Plaintext=pt)["CiphertextBlob"]
                    assert client.decrypt(CiphertextBlob=blob)["Plaintext"] == pt
                    dk = client.generate_data_key(KeyId=key, KeySpec="AES_256")
                    assert client.decrypt(CiphertextBlob=dk["CiphertextBlob"])["Plaintext"] == dk["Plaintext"]
                    with lock:
                        ok[0] += 4
                        blobs.append((pt, blob))
                except Exception as e:  # noqa: BLE001 - every failure counts
                    with lock:
                        failures.append(f"{type(e).__name__}: {e}")

        threads = [threading.Thread(target=load, args=(n,), daemon=True) for n in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)

        # Token 2 goes away: its directory moved, every one of its workers killed.
        lost = data / "token-2"
        killed = srv.lose_token(2)
        assert killed, "token 2 has no workers"
        time.sleep(1.5)
        # A key made while the token is away lives on the other two and works at once.
        late = kms.create_key(Description="made while a token is away")["KeyMetadata"]["Arn"]
        late_blob = kms.encrypt(KeyId=late, Plaintext=b"late")["CiphertextBlob"]
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        states = {t["label"]: t["state"] for t in health(endpoint)["tokens"]}
        report(f"cluster: {ok[0]} ok, {len(failures)} failed, {len(killed)} workers of token 2 killed, "
              f"states {states}")
        assert not failures, failures[:5]
        assert ok[0] > 0
        assert states["hsmkms-dev-2"] == "DOWN" and states["hsmkms-dev"] == "UP"

        # hsmkms restarts while the token is still lost: it starts, serves, and keeps the token
        # as it was (a lost token's directory is never made afresh).
        srv.stop()
        endpoint = srv.start().endpoint
        kms = kms_client(endpoint)
        assert kms.decrypt(CiphertextBlob=late_blob)["Plaintext"] == b"late"
        kms.create_key(Description="made after a restart without token 2")
        states = {t["label"]: t["state"] for t in health(endpoint)["tokens"]}
        assert states["hsmkms-dev-2"] == "DOWN", states
        assert not any((lost / "tokens").iterdir()), "the lost token must not be made afresh"
        report(f"restarted with token 2 lost: serving; states {states}")

        # The token comes back; every ciphertext still decrypts, the late key too.
        if (lost / "tokens").exists():
            (lost / "tokens").rmdir()  # the empty directory a restart left in its place
        (lost / "tokens-away").rename(lost / "tokens")
        time.sleep(0.7)
        for pt, blob in blobs[-50:]:
            assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == pt
        for _ in range(6):  # spread over the tokens, including the one that lacks the late key
            assert kms.decrypt(CiphertextBlob=late_blob)["Plaintext"] == b"late"
        report(f"after the token returned: {len(blobs[-50:]) + 6} decrypts ok")

        # The prober revives the token and copies it the key it missed...
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            h = health(endpoint)
            probe = h.get("lastProbe") or {}
            if probe.get("copied", 0) >= 1 and all(t["state"] == "UP" for t in h["tokens"]):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"the prober did not catch token 2 up: {health(endpoint)}")
        # ...which only token 2 can now prove: tokens 1 and 3 go away, and the late key works.
        for n in (1, 3):
            srv.lose_token(n)
        assert kms.decrypt(CiphertextBlob=late_blob)["Plaintext"] == b"late"
        assert kms.encrypt(KeyId=late, Plaintext=b"only token 2")["KeyId"] == late
        report(f"caught up: {probe}; the late key served by token 2 alone")
    finally:
        srv.stop()


def test_a_fresh_token_is_restored_from_backup_even_when_the_restore_is_killed(tmp_path):
    """Token 2 is replaced by a fresh, empty token; hsmkms restarts (the domain key is carried to
    it) and `hsmkms backup restore` fills it; a restore killed with SIGKILL midway is simply run
    again. Then token 2 alone decrypts everything."""
    data = tmp_path / "data"
    srv = cluster_server(tmp_path, data)
    endpoint = srv.start().endpoint
    binary = str(hsmkms_binary())
    try:
        kms = kms_client(endpoint)
        keys = [kms.create_key(Description=f"k{i}")["KeyMetadata"]["Arn"] for i in range(40)]
        blobs = [kms.encrypt(KeyId=k, Plaintext=k.encode())["CiphertextBlob"] for k in keys]
        backup = tmp_path / "keys.backup"
        r = subprocess.run([binary, "backup", "create", "--data-dir", str(data), "--out", str(backup)],
                           capture_output=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert oct(backup.stat().st_mode & 0o777) == "0o600"
        srv.stop()

        # Token 2 is lost for good; a fresh token of the same name takes its place.
        home = data / "token-2"
        (home / "tokens").rename(home / "tokens-lost")
        (home / "tokens").mkdir()
        pins = (data / "so.pin").read_text().strip() + "\n" + (data / "user.pin").read_text().strip() + "\n"
        r = subprocess.run([binary, "worker", "provision", "/usr/lib/softhsm/libsofthsm2.so", "hsmkms-dev-2"],
                           input=pins.encode(), env=dict(os.environ, SOFTHSM2_CONF=str(home / "softhsm2.conf")),
                           capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr
        endpoint = srv.start().endpoint
        kms = kms_client(endpoint)

        # A restore killed midway, then run to its end.
        killed = subprocess.Popen([binary, "backup", "restore", "--data-dir", str(data), str(backup)],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        time.sleep(0.4)
        killed.kill()
        killed.wait()
        r = subprocess.run([binary, "backup", "restore", "--data-dir", str(data), str(backup)],
                           capture_output=True, timeout=120)
        assert r.returncode == 0, r.stderr
        restored = json.loads(r.stdout)
        assert restored["KeysInBackup"] == 40 and restored["KeysAlreadyPresent"] == 40, restored
        again = json.loads(subprocess.run([binary, "backup", "restore", "--data-dir", str(data), str(backup)],
                                          capture_output=True, timeout=120).stdout)
        assert again["TokenCopies"] == 0 and again["KeysAdded"] == 0, again

        # Token 2 alone serves every key.
        for n in (1, 3):
            srv.lose_token(n)
        for k, blob in zip(keys, blobs):
            assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == k.encode()
        report(f"fresh token restored (restore killed once, then {restored}); it alone decrypts {len(blobs)} keys")
    finally:
        srv.stop()
