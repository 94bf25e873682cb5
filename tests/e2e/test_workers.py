"""Token worker processes die (kill -9) under load; no client request may fail."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from e2e_support import cmdline_of, pid_alive, worker_pids

THREADS = 4
LOAD_SECONDS = 3.0
CTX = {"test": "workers"}


def wait_for_workers(server_pid: int, timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = worker_pids(server_pid)
        if pids:
            return pids
        time.sleep(0.1)
    raise AssertionError(f"no worker processes under hsmkms pid {server_pid} after {timeout} s")


@pytest.mark.parametrize("victims", ["all", "one"])
def test_kill_9_of_workers_under_load_fails_no_request(fresh_server, victims):
    """Twice during 3 s of Encrypt+Decrypt from 4 threads, kill -9 every worker of the token
    ("all": the pool must respawn before it can retry) or one worker ("one")."""
    kms = fresh_server.client()
    key = kms.create_key(Description="workers under fire")["KeyMetadata"]["Arn"]
    kms.encrypt(KeyId=key, Plaintext=b"warm-up")  # make sure the pool is up
    first_workers = wait_for_workers(fresh_server.pid)
    print(f"workers at start: {first_workers} "
          f"({' '.join(cmdline_of(first_workers[0])[:2])})")

    stop = threading.Event()
    lock = threading.Lock()
    ok_count = [0]
    failures: list[str] = []
    ciphertexts: list[tuple[bytes, bytes]] = []

    def load(n: int) -> None:
        client = fresh_server.client()  # no retries: every failure shows
        i = 0
        while not stop.is_set():
            pt = f"thread {n} request {i}".encode()
            i += 1
            try:
                blob = client.encrypt(KeyId=key, Plaintext=pt, EncryptionContext=CTX)[
                    "CiphertextBlob"]
                got = client.decrypt(CiphertextBlob=blob, EncryptionContext=CTX)["Plaintext"]
                if got != pt:
                    raise AssertionError(f"decrypt gave {got!r} for {pt!r}")
                with lock:
                    ok_count[0] += 2
                    ciphertexts.append((pt, blob))
            except Exception as e:  # noqa: BLE001 - every failure counts
                with lock:
                    failures.append(f"thread {n} request {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=load, args=(n,), daemon=True) for n in range(THREADS)]
    start = time.monotonic()
    for t in threads:
        t.start()

    killed: list[int] = []
    for at in (LOAD_SECONDS / 3, 2 * LOAD_SECONDS / 3):
        time.sleep(max(0.0, start + at - time.monotonic()))
        pids = worker_pids(fresh_server.pid)
        assert pids, "no worker processes to kill"
        if victims == "one":
            pids = pids[:1]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        with lock:
            done = ok_count[0]
        print(f"t={time.monotonic() - start:.2f}s: kill -9 {pids} after {done} ok requests")

    time.sleep(max(0.0, start + LOAD_SECONDS - time.monotonic()))
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a load thread hung"
    elapsed = time.monotonic() - start

    print(f"load: {ok_count[0]} ok requests, {len(failures)} failed, "
          f"{len(ciphertexts)} ciphertexts, {len(killed)} workers killed, {elapsed:.1f}s")
    assert killed, "no worker was killed"
    assert not failures, f"{len(failures)} failed requests, first: {failures[:5]}"
    assert ok_count[0] > 0

    # Every ciphertext made under fire decrypts now.
    bad = 0
    for pt, blob in ciphertexts:
        if kms.decrypt(CiphertextBlob=blob, EncryptionContext=CTX)["Plaintext"] != pt:
            bad += 1
    assert bad == 0
    print(f"all {len(ciphertexts)} ciphertexts decrypt after the kills")

    # The key still works, new keys can be made, and the killed workers were replaced.
    blob = kms.encrypt(KeyId=key, Plaintext=b"after")["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"after"
    k2 = kms.create_key(Description="after the kills")["KeyMetadata"]["Arn"]
    assert kms.generate_data_key(KeyId=k2, KeySpec="AES_256")["KeyId"] == k2
    now = wait_for_workers(fresh_server.pid)
    assert not set(now) & set(killed), (now, killed)
    for pid in killed:
        assert not pid_alive(pid), f"killed worker {pid} still there (not reaped)"
    print(f"workers now: {now}")


def test_workers_go_away_with_the_server(fresh_server):
    kms = fresh_server.client()
    kms.generate_random(NumberOfBytes=8)
    key = kms.create_key()["KeyMetadata"]["Arn"]
    kms.encrypt(KeyId=key, Plaintext=b"x")
    workers = wait_for_workers(fresh_server.pid)
    status = fresh_server.stop(kill_leftovers=False)
    assert status is not None, "hsmkms did not stop on SIGTERM within 20 s"
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(pid_alive(p) for p in workers):
            time.sleep(0.1)
        left = [p for p in workers if pid_alive(p)]
    finally:
        fresh_server.kill_leftovers()
    assert not left, f"workers {left} outlived the server"
    print(f"server exited with {status}; {len(workers)} workers gone")
