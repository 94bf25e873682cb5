"""TDE end to end: a real MariaDB (Debian's 10.11 with its hashicorp_key_management plugin)
encrypts its tables with keys that hsmkms serves over its Vault KV v2 front, each key stored only
wrapped under a KMS key in the SoftHSM2 token.

Once over https (a test CA made here with openssl; the plugin verifies peer and host name) and
once over plain http on loopback:
  - the TDE front itself: tune, keys and versions, 404 / 403, one client's token can't read
    another client's keys, disable / enable, revoke;
  - a private mariadbd (own datadir, port, socket, pid file; user mysql) with
    hashicorp-key-management=FORCE, innodb_encrypt_tables / innodb_encrypt_log on, creates tables
    on key ids 1, 2 and 3 and an ENCRYPTED=NO control table, all holding a random marker;
    restarts and reads them back;
  - two rotations of key id 1 (innodb_encryption_rotate_key_age=1 re-encrypts a page once its
    version is more than one behind the latest): the background threads re-encrypt every page of
    key 1 to version 3, seen in INNODB_TABLESPACES_ENCRYPTION and in the page headers on disk;
  - after a slow shutdown, the encrypted tables' .ibd files and the redo log hold no marker,
    while the control table's .ibd holds one per row;
  - hsmkms stopped: the running mariadbd keeps serving (pages read from disk and decrypted with
    its cached keys, new rows written and flushed), a key it never fetched fails cleanly, and it
    does not crash; a fresh mariadbd refuses to start; hsmkms started again on the same data
    directory and address: the fresh mariadbd opens every table with all rows.
test_marker_scan_finds_plaintext shows that the marker scan finds the marker in the redo log and
the .ibd of a MariaDB without encryption, so that "no marker" above means something.

On a cluster of three tokens (`hsmkms dev --tokens 3`, plain http), with the plugin's caches
short and its fall-back to cached keys off, and its requests recorded by a relay: under a load of
inserts, scans and flushes, token 2 is lost (directory moved away, workers killed), then token 3
too; MariaDB keeps serving with no error, every key request it makes gets a 200, a table on a key
id it never fetched is created with each token gone, /healthz shows the lost tokens DOWN, and
mariadbd stays up; with the directories back, the tokens are UP again, and with token 1 lost in
turn a fresh mariadbd gets every key from the two that came back and reads everything back.

MariaDB comes from tests/install-mariadb.sh (tests/run.sh calls it)."""

from __future__ import annotations

import collections
import json
import os
import secrets
import shutil
import ssl
import struct
import sys
import threading
import time
from pathlib import Path

import pytest

import tde_support as tde
from e2e_support import key_id_of, kms_client
from tde_support import (
    Dropped,
    KvProxy,
    MariaDB,
    TdeServer,
    count_in_file,
    kv_get,
    kv_key,
    make_test_ca,
    new_base_dir,
)

DB = "tde_e2e"
ROWS = 4000  # rows per table: about 5 MB each, so that a scan can't stay in a 6 MB buffer pool
ROW_PAD = 1000
PAGE = 16384
CLIENT = "mariadb-e2e"
ENCRYPTED_TABLES = {"k1": 1, "k2": 2, "k3": 3}  # table -> ENCRYPTION_KEY_ID
CONTROL = "plain"
UNUSED_KEY_ID = 4  # created in hsmkms, first asked for while hsmkms is down
ROTATION_TIMEOUT = 180.0


def _fail_if_no_mariadb() -> None:
    why = tde.mariadb_missing()
    if why:
        pytest.fail(why)


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(params=["https", "http"])
def tde_server(request, hsmkms_bin, tmp_path_factory):
    """`hsmkms dev` with its TDE front, over https (test CA) or plain http on loopback."""
    base = tmp_path_factory.mktemp(f"tde-{request.param}")
    tls = make_test_ca(base / "tls") if request.param == "https" else None
    srv = TdeServer(base / "data", base / "server.log", tls=tls)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def mariadb_dirs(request):
    """Factory of private mariadbd instances, each on a fresh base directory the mysql user can
    use. Teardown kills what still runs and removes the directories; when the test failed, it
    keeps them and prints the error logs' tails (shown in the teardown section of the report)."""
    made: list[Path] = []
    instances: list[MariaDB] = []
    failed_before = request.session.testsfailed

    def make(options: dict | None = None) -> MariaDB:
        base = new_base_dir("hsmkms-tde-mariadb-")
        made.append(base)
        db = MariaDB(base, options)
        instances.append(db)
        return db

    yield make
    for db in instances:
        db.kill()
    if request.session.testsfailed > failed_before:
        for db in instances:
            print(f"\nmariadb instance kept in {db.base}\n{db.log_tail(40)}", file=sys.stderr)
        return
    for base in made:
        shutil.rmtree(base, ignore_errors=True)


class Report:
    """Counts and timings, printed at the end of the test (also when pytest captures output)."""

    def __init__(self, title: str):
        self.title = title
        self.items: list[tuple[str, object]] = []
        self.t0 = time.monotonic()
        self.last = self.t0

    def add(self, name: str, value: object) -> None:
        self.items.append((name, value))

    def phase(self, name: str) -> None:
        now = time.monotonic()
        self.items.append((f"time: {name}", f"{now - self.last:.1f} s"))
        self.last = now

    def text(self) -> str:
        width = max((len(k) for k, _ in self.items), default=10)
        lines = [f"---- {self.title} ({time.monotonic() - self.t0:.1f} s) ----"]
        lines += [f"  {k:<{width}}  {v}" for k, v in self.items]
        return "\n".join(lines)


def _show(capsys, report: Report) -> None:
    with capsys.disabled():
        print("\n" + report.text(), flush=True)


# --------------------------------------------------------------------------------------------
# Helpers


def plugin_options(srv: TdeServer, token: str, ca: Path | None) -> dict:
    """mariadbd options for the plugin pointed at hsmkms; what each one does is checked against
    the plugin's source (plugin/hashicorp_key_management) and its behaviour in 10.11.19."""
    opts: dict = {
        "plugin-load-add": "hashicorp_key_management",
        # FORCE: mariadbd refuses to start rather than run without its key server.
        "hashicorp-key-management": "FORCE",
        "hashicorp-key-management-vault-url": srv.tde_url,
        "hashicorp-key-management-token": token,
        # The plugin caches key bytes per (id, version) for good, and the latest version for
        # this many milliseconds (the default 60000 would make the rotation wait minutes).
        "hashicorp-key-management-cache-version-timeout": 1000,
        "hashicorp-key-management-timeout": 10,
        "innodb-encrypt-tables": "ON",
        "innodb-encrypt-log": "ON",
        "innodb-encrypt-temporary-tables": "ON",
        "encrypt-tmp-files": "ON",
        "innodb-encryption-threads": 2,
        "innodb-encryption-rotate-key-age": 1,
        "innodb-encryption-rotation-iops": 2000,
        # Small, so that scanning a 5 MB table reads pages from disk (and decrypts them).
        "innodb-buffer-pool-size": "6M",
    }
    if ca is not None:
        opts["hashicorp-key-management-vault-ca"] = str(ca)
    return opts


def copy_for_mysql(src: Path, dst: Path) -> Path:
    """A copy of a file that the mysql user can read (a CA certificate)."""
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o644)
    return dst


def fingerprint(db: MariaDB, table: str, marker: str) -> tuple[int, int, int]:
    """(rows, sum of CRC32 over the values, rows holding the marker): a full scan."""
    row = db.sql(
        f"SELECT COUNT(*), COALESCE(SUM(CRC32(v)), 0), COALESCE(SUM(LOCATE('{marker}', v) > 0), 0) "
        f"FROM {DB}.{table}",
        timeout=120,
    )[0]
    return int(row[0]), int(row[1]), int(row[2])


def insert_rows(db: MariaDB, table: str, marker: str, first: int, count: int) -> None:
    db.sql(
        f"INSERT INTO {DB}.{table} (id, v) SELECT seq, "
        f"CONCAT('{marker}', '-{table}-', LPAD(seq, 8, '0'), '-', REPEAT(SHA2(seq, 256), "
        f"{ROW_PAD // 64})) FROM seq_{first}_to_{first + count - 1}",
        database=DB,
        timeout=120,
    )


def encryption_state(db: MariaDB) -> dict[str, dict[str, str]]:
    """INNODB_TABLESPACES_ENCRYPTION by tablespace name."""
    cols = ["NAME", "ENCRYPTION_SCHEME", "MIN_KEY_VERSION", "CURRENT_KEY_VERSION",
            "CURRENT_KEY_ID", "KEYSERVER_REQUESTS", "KEY_ROTATION_PAGE_NUMBER"]
    rows = db.sql(f"SELECT {', '.join(cols)} FROM information_schema.INNODB_TABLESPACES_ENCRYPTION")
    return {r[0]: dict(zip(cols, r)) for r in rows}


def status(db: MariaDB, *names: str) -> dict[str, int]:
    quoted = ", ".join(f"'{n}'" for n in names)
    rows = db.sql(f"SHOW GLOBAL STATUS WHERE Variable_name IN ({quoted})")
    got = {k: int(v) for k, v in rows}
    missing = set(names) - set(got)
    assert not missing, f"no such status variables: {missing}"
    return got


def page_key_versions(path: Path) -> collections.Counter:
    """Key version of each 16 KiB page of an .ibd that was ever written (pages of zeros,
    allocated but never written, count as "empty"). With innodb_checksum_algorithm=full_crc32,
    the default, the version is the page's first 4 bytes; 0 = not encrypted (page 0 and other
    file-management pages are never encrypted)."""
    data = path.read_bytes()
    assert len(data) % PAGE == 0, f"{path}: {len(data)} bytes is not a whole number of pages"
    zero = bytes(PAGE)
    out: collections.Counter = collections.Counter()
    for off in range(0, len(data), PAGE):
        if data[off:off + PAGE] == zero:
            out["empty"] += 1
        else:
            out[struct.unpack_from(">I", data, off)[0]] += 1
    return out


def wait_for(what: str, check, timeout: float, interval: float = 0.5):
    """Polls check() until it returns a true value; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last and last[0]:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")


# --------------------------------------------------------------------------------------------
# The TDE front on its own


def test_tde_front_protocol(tde_server: TdeServer, capsys):
    srv = tde_server
    ca = srv.tde_tls.ca_cert if srv.tde_tls else None
    report = Report(f"TDE front over {srv.tde_scheme}")
    kms = kms_client(srv.endpoint)
    arn = kms.create_key(Description="tde front e2e")["KeyMetadata"]["Arn"]
    alias = f"alias/tde-front-{secrets.token_hex(4)}"
    kms.create_alias(AliasName=alias, TargetKeyId=arn)

    token = srv.client_create("front-a")
    other = srv.client_create("front-b")
    assert token != other
    # The key may be named by alias, ARN or bare key id; the answer names its ARN.
    assert srv.key_create("front-a", alias, 1)["KmsKeyId"] == arn
    assert srv.key_create("front-a", arn, 7, nbytes=16)["KmsKeyId"] == arn
    assert srv.key_create("front-b", key_id_of(arn), 1, nbytes=24)["KmsKeyId"] == arn
    refused = {
        "missing KMS key": ("--client", "front-a", "--kms-key", "alias/nope", "9"),
        "missing client": ("--client", "nobody", "--kms-key", alias, "9"),
        # 8 bytes would be taken by the plugin and then crash mariadbd; > 32 it refuses.
        "8-byte key": ("--client", "front-a", "--kms-key", alias, "--bytes", "8", "9"),
        "33-byte key": ("--client", "front-a", "--kms-key", alias, "--bytes", "33", "9"),
        "key id 0": ("--client", "front-a", "--kms-key", alias, "0"),
        # Never a second key 1: new material under an id in use would make its tables unreadable.
        "existing id": ("--client", "front-a", "--kms-key", alias, "1"),
    }
    for what, args in refused.items():
        bad = srv.tde_raw("key", "create", *args)
        assert bad.returncode != 0, f"key create with {what} succeeded: {bad.stdout}"
    assert srv.tde_raw("client", "create", "front-a").returncode != 0, "client created twice"
    assert srv.tde_raw("key", "rotate", "--client", "front-a", "9").returncode != 0

    # Tune: the plugin's first request; needs options.version >= 2.
    tune = kv_get(srv.tde_url, "/v1/sys/mounts/tde/tune", token, ca=ca)
    assert tune.status == 200, tune
    assert int(tune.json()["options"]["version"]) >= 2, tune

    k1, v = kv_key(kv_get(srv.tde_url, "/v1/tde/data/1", token, ca=ca))
    assert (len(k1), v) == (32, 1)
    assert kv_key(kv_get(srv.tde_url, "/v1/tde/data/1?version=1", token, ca=ca)) == (k1, 1)
    k7, v7 = kv_key(kv_get(srv.tde_url, "/v1/tde/data/7", token, ca=ca))
    assert (len(k7), v7) == (16, 1)
    kb, _ = kv_key(kv_get(srv.tde_url, "/v1/tde/data/1", other, ca=ca))
    assert len(kb) == 24 and kb != k1[:24], "two clients' key 1 must be different keys"
    # Same bytes on every read: the material is stored (wrapped), not derived per request.
    assert kv_key(kv_get(srv.tde_url, "/v1/tde/data/1", token, ca=ca))[0] == k1

    # Versions.
    assert srv.key_rotate("front-a", 1) == 2
    k1v2, v = kv_key(kv_get(srv.tde_url, "/v1/tde/data/1", token, ca=ca))
    assert v == 2 and k1v2 != k1 and len(k1v2) == 32
    assert kv_key(kv_get(srv.tde_url, "/v1/tde/data/1?version=1", token, ca=ca)) == (k1, 1)
    assert kv_key(kv_get(srv.tde_url, "/v1/tde/data/1?version=2", token, ca=ca)) == (k1v2, 2)

    not_found = {
        "missing version": ("/v1/tde/data/1?version=3", token),
        "missing id": ("/v1/tde/data/99", token),
        "other client's id": ("/v1/tde/data/7", other),
    }
    for what, (path, tok) in not_found.items():
        r = kv_get(srv.tde_url, path, tok, ca=ca)
        assert r.status == 404, f"{what}: GET {path} -> {r!r}"

    forbidden = {
        "no token": None,
        "unknown token": "hvs." + "A" * 24,
        "empty token": "",
    }
    for what, tok in forbidden.items():
        for path in ("/v1/tde/data/1", "/v1/sys/mounts/tde/tune"):
            r = kv_get(srv.tde_url, path, tok, ca=ca)
            assert r.status == 403, f"{what}: GET {path} -> {r!r}"

    # Disable / enable: a disabled key answers 404 (so CREATE TABLE on it fails cleanly).
    srv.key_disable("front-a", 7)
    r = kv_get(srv.tde_url, "/v1/tde/data/7", token, ca=ca)
    assert r.status == 404, r
    listed = {(k["Client"], k["Id"]): k for k in srv.key_list()}
    assert listed[("front-a", 7)]["Enabled"] is False
    assert listed[("front-a", 1)]["LatestVersion"] == 2
    assert listed[("front-b", 1)]["KmsKeyId"] == arn
    assert {k["Id"] for k in srv.key_list("front-b")} == {1}
    srv.key_enable("front-a", 7)
    assert kv_key(kv_get(srv.tde_url, "/v1/tde/data/7", token, ca=ca)) == (k7, 1)

    # The CLI while the server runs, and what a restart keeps.
    srv.restart()
    assert kv_key(kv_get(srv.tde_url, "/v1/tde/data/1", token, ca=ca)) == (k1v2, 2)
    assert kv_key(kv_get(srv.tde_url, "/v1/tde/data/1?version=1", token, ca=ca)) == (k1, 1)

    # Revoke: the token is refused, the other client goes on.
    srv.client_revoke("front-b")
    r = kv_get(srv.tde_url, "/v1/tde/data/1", other, ca=ca)
    assert r.status == 403, r
    assert kv_key(kv_get(srv.tde_url, "/v1/tde/data/1", token, ca=ca))[1] == 2

    # Every key version served is stored only wrapped: its bytes are nowhere in the data
    # directory (metadata store, token files, configuration), neither raw nor in hex.
    served = [k1, k1v2, k7, kb]
    needles = [k for key in served for k in (key, key.hex().encode(), key.hex().upper().encode())]
    srv.stop()
    leaks = tde.files_holding(srv.data_dir, needles)
    assert not leaks, f"TDE key material in plaintext under {srv.data_dir}: {leaks}"
    srv.start()

    if srv.tde_tls:
        # The certificate is for 127.0.0.1 and localhost, from the test CA only.
        url = srv.tde_url.replace("127.0.0.1", "localhost")
        assert kv_get(url, "/v1/tde/data/1?version=1", token, ca=ca).status == 200
        with pytest.raises(ssl.SSLCertVerificationError):
            kv_get(srv.tde_url, "/v1/tde/data/1", token, ca=None)
        # Plain http on the https port gets no key.
        plain = srv.tde_url.replace("https://", "http://")
        try:
            r = kv_get(plain, "/v1/tde/data/1", token)
            assert r.status != 200, r
        except (Dropped, OSError):
            pass

    report.add("clients / keys listed", f"{2} / {len(srv.key_list())}")
    report.add("key sizes (bytes)", f"{len(k1)}, {len(k7)}, {len(kb)}")
    report.add("404 / 403 cases", f"{len(not_found)} / {2 * len(forbidden) + 1}")
    report.add("refused CLI calls", len(refused) + 2)
    report.add("key versions looked for in the data dir", f"{len(served)}: not found")
    _show(capsys, report)


# --------------------------------------------------------------------------------------------
# MariaDB


@pytest.mark.timeout(900)
def test_mariadb_tables_encrypted_with_hsmkms_keys(tde_server: TdeServer, mariadb_dirs, capsys):
    _fail_if_no_mariadb()
    srv = tde_server
    report = Report(f"MariaDB TDE over {srv.tde_scheme}")
    marker = "HSMKMS-TDE-" + secrets.token_hex(12).upper()
    needle = marker.encode()
    report.add("marker", marker)

    # ---- hsmkms: a KMS key, a client, TDE keys 1 (system data, redo log), 2 (temporary data),
    # 3 (ENCRYPTION_KEY_ID=3) and 4 (kept for the outage)
    kms = kms_client(srv.endpoint)
    arn = kms.create_key(Description="MariaDB TDE e2e")["KeyMetadata"]["Arn"]
    alias = f"alias/tde-mariadb-{secrets.token_hex(4)}"
    kms.create_alias(AliasName=alias, TargetKeyId=arn)
    token = srv.client_create(CLIENT)
    for key_id, ref in ((1, alias), (2, arn), (3, key_id_of(arn)), (UNUSED_KEY_ID, alias)):
        assert srv.key_create(CLIENT, ref, key_id)["KmsKeyId"] == arn
    report.phase("hsmkms set-up")

    # ---- a private mariadbd with the plugin pointed at hsmkms
    db = mariadb_dirs()
    ca = copy_for_mysql(srv.tde_tls.ca_cert, db.base / "vault-ca.pem") if srv.tde_tls else None
    report.add("mariadb-install-db", f"{db.install_db():.1f} s")
    db.options = plugin_options(srv, token, ca)

    if srv.tde_tls:
        # The plugin verifies the server's certificate: with another CA it refuses to start.
        other_ca = make_test_ca(db.base / "other-ca").ca_cert
        db.options["hashicorp-key-management-vault-ca"] = str(
            copy_for_mysql(other_ca, db.base / "other-ca.pem"))
        code, _ = db.expect_start_failure()
        log = db.log_of_last_start()
        assert code != 0 and "SSL certificate problem" in log and "Aborting" in log, log
        db.options["hashicorp-key-management-vault-ca"] = str(ca)
        report.add("start with the wrong CA", f"refused (exit {code})")

    report.add("mariadbd start", f"{db.start():.1f} s")
    version = db.scalar("SELECT VERSION()")
    report.add("MariaDB", version)
    assert db.sql(
        "SELECT PLUGIN_STATUS FROM information_schema.PLUGINS "
        "WHERE PLUGIN_NAME = 'hashicorp_key_management'"
    ) == [["ACTIVE"]]
    assert db.scalar("SELECT @@hashicorp_key_management_vault_url") == srv.tde_url
    assert db.scalar("SELECT @@innodb_encrypt_log") == "1"

    db.sql(f"CREATE DATABASE {DB}")
    for table, key_id in ENCRYPTED_TABLES.items():
        db.sql(f"CREATE TABLE {DB}.{table} (id INT PRIMARY KEY, v VARCHAR(2048) NOT NULL) "
               f"ENGINE=InnoDB ENCRYPTED=YES ENCRYPTION_KEY_ID={key_id}")
    db.sql(f"CREATE TABLE {DB}.{CONTROL} (id INT PRIMARY KEY, v VARCHAR(2048) NOT NULL) "
           f"ENGINE=InnoDB ENCRYPTED=NO")
    # A key id hsmkms does not have: 404, a clean error, and mariadbd goes on.
    err = db.sql_error(f"CREATE TABLE {DB}.nokey (id INT) ENCRYPTED=YES ENCRYPTION_KEY_ID=99")
    assert "Wrong create options" in err or "140" in err, err
    assert db.alive()
    for table in [*ENCRYPTED_TABLES, CONTROL]:
        insert_rows(db, table, marker, 1, ROWS)
    # Temporary data (encrypt-tmp-files, innodb-encrypt-temporary-tables): a filesort that
    # spills to merge files, and an InnoDB temporary table.
    tmp_files = status(db, "Created_tmp_files")["Created_tmp_files"]
    rows = db.sql(
        f"SET SESSION sort_buffer_size = 32768; "
        f"CREATE TEMPORARY TABLE tmp_t ENGINE=InnoDB AS SELECT * FROM {DB}.k2; "
        f"SELECT COUNT(*), SUM(CRC32(x.v)) FROM "
        f"(SELECT v FROM tmp_t ORDER BY REVERSE(v) LIMIT {10 * ROWS}) AS x",
        database=DB,
    )
    assert int(rows[0][0]) == ROWS, rows
    created = status(db, "Created_tmp_files")["Created_tmp_files"] - tmp_files
    assert created > 0, "the filesort made no temporary file"
    report.add("temporary files (encrypted)", created)
    expected = {t: fingerprint(db, t, marker) for t in [*ENCRYPTED_TABLES, CONTROL]}
    for table, fp in expected.items():
        assert fp[0] == ROWS and fp[2] == ROWS, f"{table}: {fp}"
    state = encryption_state(db)
    for table, key_id in ENCRYPTED_TABLES.items():
        s = state[f"{DB}/{table}"]
        assert (s["ENCRYPTION_SCHEME"], s["CURRENT_KEY_ID"], s["CURRENT_KEY_VERSION"]) == (
            "1", str(key_id), "1"), s
    control_state = state.get(f"{DB}/{CONTROL}")
    assert control_state is None or control_state["ENCRYPTION_SCHEME"] == "0", control_state
    report.add("rows per table", ROWS)
    report.phase("create and fill tables")

    # ---- restart MariaDB and read everything back
    assert db.stop() == 0, db.log_tail()
    report.add("mariadbd restart", f"{db.start():.1f} s")
    for table, fp in expected.items():
        assert fingerprint(db, table, marker) == fp, table
    report.phase("restart and read back")

    # ---- rotate key 1 twice: with rotate_key_age=1, pages more than one version behind the
    # latest are re-encrypted, so every page of key 1 goes from version 1 to version 3
    assert srv.key_rotate(CLIENT, 1) == 2
    wait_for("MariaDB to see version 2 of key 1",
             lambda: (encryption_state(db)[f"{DB}/k1"]["CURRENT_KEY_VERSION"] == "2",), 60)
    assert srv.key_rotate(CLIENT, 1) == 3
    t_rot = time.monotonic()
    key1_spaces = ["innodb_system", f"{DB}/k1"]

    def rotated():
        st = encryption_state(db)
        return (all(st[n]["MIN_KEY_VERSION"] == "3" and st[n]["CURRENT_KEY_VERSION"] == "3"
                    for n in key1_spaces), {n: st[n] for n in key1_spaces})

    wait_for("re-encryption of key 1's tablespaces to version 3", rotated, ROTATION_TIMEOUT)
    report.add("re-encryption to v3 took", f"{time.monotonic() - t_rot:.1f} s")
    state = encryption_state(db)
    for table in ("k2", "k3"):
        assert state[f"{DB}/{table}"]["MIN_KEY_VERSION"] == "1", state[f"{DB}/{table}"]
    report.add("KEYSERVER_REQUESTS (k1, k2, k3)", ", ".join(
        state[f"{DB}/{t}"]["KEYSERVER_REQUESTS"] for t in ENCRYPTED_TABLES))
    versions = {k["Id"]: k["LatestVersion"] for k in srv.key_list(CLIENT)}
    assert versions == {1: 3, 2: 1, 3: 1, UNUSED_KEY_ID: 1}, versions
    report.add("TDE keys / latest versions", json.dumps(versions, sort_keys=True))
    for table, fp in expected.items():
        assert fingerprint(db, table, marker) == fp, table
    report.phase("rotation")

    # ---- slow shutdown (every page flushed, purge done), then look at the files
    assert db.stop(slow=True) == 0, db.log_tail()
    scanned = 0
    files = {t: db.table_file(DB, t) for t in [*ENCRYPTED_TABLES, CONTROL]}
    redo = db.datadir / "ib_logfile0"
    hits = {}
    for name, path in [*files.items(), ("ib_logfile0", redo)]:
        n, size = count_in_file(path, needle)
        hits[name] = n
        scanned += size
    for table in ENCRYPTED_TABLES:
        assert hits[table] == 0, f"marker in plaintext in {files[table]}: {hits}"
    assert hits["ib_logfile0"] == 0, f"marker in plaintext in the redo log: {hits}"
    assert hits[CONTROL] >= ROWS, f"control table holds {hits[CONTROL]} markers: {hits}"
    report.add("marker hits per file", json.dumps(hits))
    report.add("bytes scanned", scanned)
    pages = {t: page_key_versions(p) for t, p in files.items()}
    assert set(pages[CONTROL]) <= {0, "empty"}, pages[CONTROL]
    # Data pages of key 1 are all at version 3 now; a few file-management pages are never
    # encrypted (version 0) in any tablespace.
    min_data_pages = ROWS * ROW_PAD // PAGE
    assert set(pages["k1"]) <= {0, 3, "empty"} and pages["k1"][3] >= min_data_pages, pages["k1"]
    for table in ("k2", "k3"):
        assert set(pages[table]) <= {0, 1, "empty"} and pages[table][1] >= min_data_pages, (
            table, pages[table])
        assert pages[table][0] == pages["k1"][0] <= 8, pages
    for table in ("k1", "k2"):
        report.add(f"{table} pages by key version",
                   ", ".join(f"{k}: {v}" for k, v in sorted(pages[table].items(), key=str)))
    ibdata_hits, _ = count_in_file(db.datadir / "ibdata1", needle)
    report.add("ibdata1 marker hits (not asserted)", ibdata_hits)
    report.phase("file scan")

    # ---- hsmkms goes away: the running mariadbd serves on from its key cache
    db.start()
    for table in (*ENCRYPTED_TABLES, CONTROL):
        fingerprint(db, table, marker)  # warm the plugin's cache for every key in use
    assert srv.stop() == 0, "hsmkms did not stop cleanly on SIGTERM"
    with pytest.raises((Dropped, OSError)):
        kv_get(srv.tde_url, "/v1/tde/data/1", token, ca=ca, timeout=5)
    mariadbd_pid = db.pid
    before = status(db, "Innodb_pages_read", "Innodb_num_pages_decrypted")
    for table, fp in expected.items():
        assert fingerprint(db, table, marker) == fp, f"{table} while hsmkms is down"
    after = status(db, "Innodb_pages_read", "Innodb_num_pages_decrypted")
    read = after["Innodb_pages_read"] - before["Innodb_pages_read"]
    decrypted = after["Innodb_num_pages_decrypted"] - before["Innodb_num_pages_decrypted"]
    assert read > 0 and decrypted > 0, (before, after)
    report.add("pages read / decrypted while down", f"{read} / {decrypted}")
    # Writes need the latest key version: from the cache too.
    insert_rows(db, "k1", marker, ROWS + 1, 500)
    db.sql(f"FLUSH TABLES {DB}.k1 FOR EXPORT; UNLOCK TABLES", database=DB)
    expected["k1"] = fingerprint(db, "k1", marker)
    assert expected["k1"][0] == ROWS + 500
    # A key it never fetched can't be had: a clean error, no crash.
    err = db.sql_error(
        f"CREATE TABLE {DB}.k4 (id INT) ENCRYPTED=YES ENCRYPTION_KEY_ID={UNUSED_KEY_ID}")
    assert "hashicorp: Unable to get key data" in err, err
    report.add("CREATE TABLE on key 4 while down", err.splitlines()[-1])
    assert db.alive() and db.pid == mariadbd_pid, "mariadbd died while hsmkms was down"
    assert db.scalar("SELECT 1") == "1"
    report.phase("serving while hsmkms is down")

    # ---- a fresh mariadbd can't open anything without hsmkms
    assert db.stop() == 0, db.log_tail()
    code, _ = db.expect_start_failure()
    log = db.log_of_last_start()
    assert code != 0 and "Unable to get storage options" in log and "Aborting" in log, log
    # Even without the plugin's start-up check, InnoDB can't get key 1 for the redo log.
    db.options["hashicorp-key-management-check-kv-version"] = "OFF"
    code2, _ = db.expect_start_failure()
    log = db.log_of_last_start()
    assert code2 != 0 and "hashicorp: Unable to get key data" in log and "Aborting" in log, log
    del db.options["hashicorp-key-management-check-kv-version"]
    report.add("fresh mariadbd while hsmkms is down", f"refused to start (exit {code}, {code2})")
    report.phase("fresh mariadbd refused")

    # ---- hsmkms back (same data directory, same address): everything opens
    srv.start()
    report.add("mariadbd start after hsmkms is back", f"{db.start():.1f} s")
    for table, fp in expected.items():
        assert fingerprint(db, table, marker) == fp, f"{table} after hsmkms came back"
    db.sql(f"CREATE TABLE {DB}.k4 (id INT PRIMARY KEY) ENCRYPTED=YES "
           f"ENCRYPTION_KEY_ID={UNUSED_KEY_ID}; INSERT INTO {DB}.k4 VALUES (1)")
    state = encryption_state(db)
    assert state[f"{DB}/k4"]["CURRENT_KEY_ID"] == str(UNUSED_KEY_ID)
    total_rows = sum(fp[0] for fp in expected.values())
    report.add("rows read back (all tables)", total_rows)
    assert total_rows == 4 * ROWS + 500
    assert db.stop() == 0, db.log_tail()
    report.phase("hsmkms back")
    _show(capsys, report)


# --------------------------------------------------------------------------------------------
# A cluster of three tokens, two of them lost while MariaDB runs

CLUSTER_LABELS = ("hsmkms-dev", "hsmkms-dev-2", "hsmkms-dev-3")
CLUSTER_ROWS = 1000  # rows per table before the outage
LOAD_BATCH = 40  # rows per INSERT of the load loop
# The plugin's cache timeouts, in milliseconds of mariadbd's CPU time (it measures them with
# clock()): short, so that MariaDB asks hsmkms again for the latest version of the keys it
# already has many times during the outage.
PLUGIN_CACHE_MS = 100
PHASE_SECONDS = 6.0  # load under each state of the cluster
TOKEN_DOWN_TIMEOUT = 30.0
TOKEN_BACK_TIMEOUT = 60.0  # the prober pings every token every 5 s (probe_interval_secs)


@pytest.fixture
def tde_cluster(hsmkms_bin, tmp_path_factory):
    """`hsmkms dev --tokens 3` with its TDE front over plain http."""
    base = tmp_path_factory.mktemp("tde-cluster")
    srv = TdeServer(base / "data", base / "server.log", tokens=3)
    srv.start()
    yield srv
    srv.stop()


class SqlLoad(threading.Thread):
    """Keeps inserting rows into tables of a running mariadbd and scanning them until stopped;
    counts rows, statements and errors under the phase (`phase`) in which they ran. A failed
    INSERT is not counted (InnoDB rolls the statement back), and its ids are used again."""

    def __init__(self, db: MariaDB, marker: str, next_ids: dict[str, int]):
        super().__init__(name="sql-load", daemon=True)
        self.db, self.marker = db, marker
        self.next_ids = dict(next_ids)
        self.phase = "all tokens up"
        self.rows: collections.Counter = collections.Counter()
        self.statements: collections.Counter = collections.Counter()
        self.errors: list[str] = []
        self.stop_event = threading.Event()

    def _run(self, what: str, fn) -> bool:
        phase = self.phase
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - every failure counts
            self.errors.append(f"[{phase}] {what}: {type(e).__name__}: {e}")
            return False
        self.statements[phase] += 1
        return True

    def run(self) -> None:
        tables = list(self.next_ids)
        i = 0
        while not self.stop_event.is_set():
            i += 1
            for table in tables:
                first, phase = self.next_ids[table], self.phase
                if self._run(f"INSERT {table} {first}..",
                             lambda: insert_rows(self.db, table, self.marker, first, LOAD_BATCH)):
                    self.next_ids[table] += LOAD_BATCH
                    self.rows[phase] += LOAD_BATCH
            table = tables[i % len(tables)]
            want = self.next_ids[table] - 1

            def scan() -> None:
                got = fingerprint(self.db, table, self.marker)
                assert got[0] == got[2] == want, f"{table}: {got}, expected {want} rows"

            self._run(f"scan {table}", scan)
            if i % 3 == 0:
                # Writes every dirty page of the tables: each one encrypted with the latest
                # version of its key, which the plugin asks hsmkms for once its cache expired.
                self._run("flush", lambda: self.db.sql(
                    f"FLUSH TABLES {', '.join(tables)} FOR EXPORT; UNLOCK TABLES", database=DB))

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=180)
        assert not self.is_alive(), "the SQL load did not stop within 180 s"


def lose_token(srv: TdeServer, n: int, moved: list[tuple[Path, Path]]) -> list[int]:
    """Token n goes away (see `Server.lose_token`); its move is recorded in `moved` as (home,
    moved-to), for putting it back."""
    killed = srv.lose_token(n)
    moved.append((srv.token_home(n) / "tokens", srv.token_home(n) / "tokens-away"))
    return killed


@pytest.mark.timeout(600)
def test_mariadb_keeps_serving_when_a_token_of_the_cluster_is_lost(
        tde_cluster: TdeServer, mariadb_dirs, capsys):
    _fail_if_no_mariadb()
    srv = tde_cluster
    report = Report("MariaDB on a cluster of 3 tokens, 2 of them lost")
    marker = "HSMKMS-TDE-CLUSTER-" + secrets.token_hex(8).upper()
    # Keys 1 (system data, redo log; table c1), 2 (temporary data; table c2), and two ids that
    # MariaDB first asks for during the outage: 3 with token 2 gone, 4 with tokens 2 and 3 gone.
    late_keys = {"c3": 3, "c4": 4}
    moved: list[tuple[Path, Path]] = []
    proxy: KvProxy | None = None
    load: SqlLoad | None = None
    try:
        states = srv.token_states()
        assert states == dict.fromkeys(CLUSTER_LABELS, "UP"), states
        for n in (1, 2, 3):
            assert (srv.token_home(n) / "tokens").is_dir(), f"no token {n} directory"
            assert srv.token_workers(n), f"token {n} has no worker"
        kms = kms_client(srv.endpoint)
        arn = kms.create_key(Description="MariaDB TDE on a cluster")["KeyMetadata"]["Arn"]
        token = srv.client_create(CLIENT)
        for key_id in (1, 2, *late_keys.values()):
            assert srv.key_create(CLIENT, arn, key_id)["KmsKeyId"] == arn
        report.phase("hsmkms set-up (3 tokens, 4 TDE keys)")

        # ---- mariadbd, its plugin going to hsmkms through a recording relay
        proxy = KvProxy(srv.tde_port)
        db = mariadb_dirs()
        db.install_db()
        db.options = plugin_options(srv, token, None)
        db.options.update({
            "hashicorp-key-management-vault-url": proxy.url,
            "hashicorp-key-management-cache-timeout": PLUGIN_CACHE_MS,
            "hashicorp-key-management-cache-version-timeout": PLUGIN_CACHE_MS,
            # A request hsmkms does not answer is an error, not a silent fall-back to the key
            # cached in MariaDB: "no error" below means that hsmkms answered.
            "hashicorp-key-management-use-cache-on-timeout": "OFF",
        })
        report.add("mariadbd start", f"{db.start():.1f} s")
        assert db.scalar("SELECT @@hashicorp_key_management_cache_timeout") == str(PLUGIN_CACHE_MS)
        assert db.scalar("SELECT @@hashicorp_key_management_use_cache_on_timeout") == "0"
        db.sql(f"CREATE DATABASE {DB}")
        for table, key_id in (("c1", 1), ("c2", 2)):
            db.sql(f"CREATE TABLE {DB}.{table} (id INT PRIMARY KEY, v VARCHAR(2048) NOT NULL) "
                   f"ENGINE=InnoDB ENCRYPTED=YES ENCRYPTION_KEY_ID={key_id}")
            insert_rows(db, table, marker, 1, CLUSTER_ROWS)
        before = proxy.since(0)
        fetched = collections.Counter(e.key_id for e in before if e.key_id)
        assert set(fetched) & set(late_keys.values()) == set(), f"keys 3/4 asked early: {fetched}"
        assert all(e.status == 200 for e in before), [e for e in before if e.status != 200]
        report.add("KV requests before the outage (by key id)",
                   json.dumps(dict(sorted(fetched.items()))))
        report.phase("mariadbd with tables c1 (key 1), c2 (key 2)")

        # ---- load, then the tokens go one after the other
        mariadbd_pid = db.pid
        failovers0 = srv.metric("hsmkms_failovers_total")
        load = SqlLoad(db, marker, {"c1": CLUSTER_ROWS + 1, "c2": CLUSTER_ROWS + 1})
        marks = {"all tokens up": proxy.mark()}  # proxy.events index where each phase starts
        load.start()
        time.sleep(PHASE_SECONDS / 2)
        killed = {}
        for lost_n, phase, (table, late_key) in ((2, "token 2 lost", ("c3", 3)),
                                                 (3, "tokens 2, 3 lost", ("c4", 4))):
            t_lost = time.monotonic()
            load.phase = phase
            marks[phase] = proxy.mark()
            pids = lose_token(srv, lost_n, moved)
            assert pids, f"token {lost_n} had no worker to kill"
            killed[lost_n] = len(pids)
            label = CLUSTER_LABELS[lost_n - 1]
            # hsmkms sees the token gone at the first request that lands on it.
            wait_for(f"/healthz to show {label} DOWN",
                     lambda: (srv.token_states()[label] == "DOWN", srv.token_states()),
                     TOKEN_DOWN_TIMEOUT)
            report.add(f"{label} seen DOWN after", f"{time.monotonic() - t_lost:.1f} s")
            # A key MariaDB never had: only hsmkms can give it, from a token still there.
            db.sql(f"CREATE TABLE {DB}.{table} (id INT PRIMARY KEY, v VARCHAR(2048) NOT NULL) "
                   f"ENGINE=InnoDB ENCRYPTED=YES ENCRYPTION_KEY_ID={late_key}")
            insert_rows(db, table, marker, 1, CLUSTER_ROWS // 4)
            db.sql(f"FLUSH TABLES {DB}.{table} FOR EXPORT; UNLOCK TABLES", database=DB)
            assert fingerprint(db, table, marker)[::2] == (CLUSTER_ROWS // 4,) * 2, table
            state = encryption_state(db)[f"{DB}/{table}"]
            assert (state["ENCRYPTION_SCHEME"], state["CURRENT_KEY_ID"]) == (
                "1", str(late_key)), state
            time.sleep(max(0.0, PHASE_SECONDS - (time.monotonic() - t_lost)))
            assert db.alive() and db.pid == mariadbd_pid, "mariadbd died during the outage"
        marks["end"] = proxy.mark()
        load.stop()
        states = srv.token_states()
        failovers = srv.metric("hsmkms_failovers_total") - failovers0
        # Workers of the lost tokens that live on (the prober's failed attempts to start one
        # last milliseconds: only a pid seen twice, a second apart, counts).
        seen = {n: set(srv.token_workers(n)) for n in (2, 3)}
        time.sleep(1)
        leftover = {n: sorted(seen[n] & set(srv.token_workers(n))) for n in (2, 3)}

        # ---- what happened during the outage
        assert not load.errors, (
            f"{len(load.errors)} failed statements:\n" + "\n".join(load.errors[:10]))
        assert db.alive() and db.pid == mariadbd_pid, "mariadbd died during the outage"
        assert db.scalar("SELECT 1") == "1"
        assert states == {"hsmkms-dev": "UP", "hsmkms-dev-2": "DOWN",
                          "hsmkms-dev-3": "DOWN"}, states
        phases = list(marks)[:-1]
        phase_keys = {}
        for phase, nxt in zip(phases, list(marks)[1:]):
            events = proxy.since(marks[phase], marks[nxt])
            by_key = phase_keys[phase] = collections.Counter(e.key_id for e in events if e.key_id)
            report.add(f"[{phase}] rows written / statements ok",
                       f"{load.rows[phase]} / {load.statements[phase]}")
            report.add(f"[{phase}] KV requests by key id (statuses)",
                       f"{json.dumps(dict(sorted(by_key.items())))} "
                       f"{dict(collections.Counter(e.status for e in events))}")
            unanswered = [e for e in events if e.status != 200]
            assert not unanswered, f"{phase}: requests without a 200 answer: {unanswered[:5]}"
            assert load.rows[phase] > 0, f"no row written while {phase}"
            if phase != "all tokens up":
                # MariaDB went back to hsmkms for the keys it already had, not only for new ones.
                assert by_key[1] + by_key[2] >= 1, f"{phase}: no request for keys 1, 2: {by_key}"
        assert phase_keys["token 2 lost"][3] >= 1, phase_keys
        assert phase_keys["tokens 2, 3 lost"][4] >= 1, phase_keys
        outage = proxy.since(marks["token 2 lost"], marks["end"])
        outage_keys = collections.Counter(e.key_id for e in outage if e.key_id)
        rows_in_outage = sum(load.rows[p] for p in phases[1:])
        report.add("rows written during the outage", rows_in_outage)
        report.add("KV requests during the outage (all 200)", len(outage))
        report.add("slowest KV answer during the outage",
                   f"{max(e.ended - e.started for e in outage) * 1000:.0f} ms")
        report.add("keys fetched during the outage (by id)",
                   json.dumps(dict(sorted(outage_keys.items()))))
        report.add("workers killed (token 2, token 3)", f"{killed[2]}, {killed[3]}")
        report.add("hsmkms failovers during the outage", int(failovers))
        report.add("token states during the outage", json.dumps(states))
        assert failovers >= 1, "hsmkms counted no failover"
        assert leftover == {2: [], 3: []}, f"workers of lost tokens still running: {leftover}"
        expected = {t: fingerprint(db, t, marker) for t in ("c1", "c2", *late_keys)}
        assert expected["c1"][0] == load.next_ids["c1"] - 1, (expected, load.next_ids)
        assert expected["c2"][0] == load.next_ids["c2"] - 1, (expected, load.next_ids)
        report.add("rows per table", json.dumps({t: fp[0] for t, fp in expected.items()}))
        report.phase("outage")

        # ---- tokens 2 and 3 come back: the prober puts them to use again while the load goes on
        for home, away in moved:
            away.rename(home)
        moved.clear()
        for table, fp in expected.items():
            assert fingerprint(db, table, marker) == fp, f"{table} after the tokens came back"
        t_back, mark = time.monotonic(), proxy.mark()
        load = SqlLoad(db, marker, load.next_ids)
        load.phase = "tokens back"
        load.start()
        wait_for("/healthz to show every token UP again",
                 lambda: (set(srv.token_states().values()) == {"UP"}, srv.health()),
                 TOKEN_BACK_TIMEOUT)
        report.add("tokens 2, 3 seen UP again after", f"{time.monotonic() - t_back:.1f} s")
        time.sleep(PHASE_SECONDS / 2)
        load.stop()
        assert not load.errors, load.errors[:10]
        back = proxy.since(mark)
        assert back and all(e.status == 200 for e in back), [e for e in back if e.status != 200]
        for table in ("c1", "c2"):
            expected[table] = fingerprint(db, table, marker)
            assert expected[table][0] == expected[table][2] == load.next_ids[table] - 1, expected
        report.add("[tokens back] rows written / KV requests (all 200)",
                   f"{load.rows['tokens back']} / {len(back)}")
        report.add("last probe", json.dumps(srv.health().get("lastProbe")))

        # ---- then token 1, the one that served alone, is lost: a fresh mariadbd (nothing
        # cached) gets every key from the two tokens that came back and reads everything
        assert lose_token(srv, 1, moved), "token 1 had no worker to kill"
        assert db.stop() == 0, db.log_tail()
        mark = proxy.mark()
        report.add("fresh mariadbd start, token 1 lost", f"{db.start():.1f} s")
        for table, fp in expected.items():
            assert fingerprint(db, table, marker) == fp, f"{table} in a fresh mariadbd"
        fresh = proxy.since(mark)
        fresh_keys = collections.Counter(e.key_id for e in fresh if e.key_id)
        assert all(e.status == 200 for e in fresh), [e for e in fresh if e.status != 200]
        assert {1, 2, 3, 4} <= set(fresh_keys), fresh_keys
        wait_for("/healthz to show hsmkms-dev DOWN",
                 lambda: (srv.token_states()["hsmkms-dev"] == "DOWN", srv.token_states()),
                 TOKEN_DOWN_TIMEOUT)
        states = srv.token_states()
        assert states == {"hsmkms-dev": "DOWN", "hsmkms-dev-2": "UP",
                          "hsmkms-dev-3": "UP"}, states
        report.add("fresh mariadbd: KV requests by key id (all 200)",
                   json.dumps(dict(sorted(fresh_keys.items()))))
        report.add("token states", json.dumps(states))
        report.add("rows read back (all tables)", sum(fp[0] for fp in expected.values()))
        for home, away in moved:
            away.rename(home)
        moved.clear()
        wait_for("/healthz to show every token UP again",
                 lambda: (set(srv.token_states().values()) == {"UP"}, srv.health()),
                 TOKEN_BACK_TIMEOUT)
        assert db.stop() == 0, db.log_tail()
        report.phase("tokens back, token 1 lost, fresh mariadbd, read back")
    finally:
        if load is not None and load.is_alive():
            load.stop_event.set()
            load.join(timeout=60)
        for home, away in moved:
            if away.exists() and not home.exists():
                away.rename(home)
        if proxy is not None:
            proxy.close()
        _show(capsys, report)


def test_marker_scan_finds_plaintext(mariadb_dirs, capsys):
    """The control for the file scan: without encryption, the marker is in the table's .ibd
    and in the redo log after the same slow shutdown."""
    _fail_if_no_mariadb()
    report = Report("marker scan without encryption")
    marker = "HSMKMS-PLAIN-" + secrets.token_hex(12).upper()
    db = mariadb_dirs({"innodb-buffer-pool-size": "6M"})
    db.install_db()
    db.start()
    db.sql(f"CREATE DATABASE {DB}")
    db.sql(f"CREATE TABLE {DB}.{CONTROL} (id INT PRIMARY KEY, v VARCHAR(2048) NOT NULL) "
           f"ENGINE=InnoDB")
    insert_rows(db, CONTROL, marker, 1, ROWS)
    assert db.stop(slow=True) == 0, db.log_tail()
    ibd, _ = count_in_file(db.table_file(DB, CONTROL), marker.encode())
    redo, size = count_in_file(db.datadir / "ib_logfile0", marker.encode())
    assert ibd >= ROWS, ibd
    assert redo >= ROWS, redo
    report.add("marker hits .ibd / ib_logfile0", f"{ibd} / {redo}")
    report.add("redo log bytes scanned", size)
    _show(capsys, report)
