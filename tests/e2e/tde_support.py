"""Helpers for the TDE end-to-end test (test_tde_mariadb.py): `hsmkms dev` with its TDE front
(HashiCorp Vault KV v2), the `hsmkms tde` CLI, a test CA made with openssl, raw KV v2 requests,
and private mariadbd instances (own datadir, port, socket, pid file; run as the mysql user when
the tests run as root) with the hashicorp_key_management plugin pointed at hsmkms.

MariaDB and the plugin come from Debian's packages: tests/install-mariadb.sh installs them
(tests/run.sh calls it)."""

from __future__ import annotations

import atexit
import http.client
import json
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2e_support import ANSI_RE, Server, TlsFiles

TDE_MOUNT = "tde"
TOKEN_RE = re.compile(r"^hvs\.[A-Za-z0-9._-]{16,}$")

MARIADBD = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
MARIADB = shutil.which("mariadb") or "/usr/bin/mariadb"
MARIADB_INSTALL_DB = shutil.which("mariadb-install-db") or "/usr/bin/mariadb-install-db"
PLUGIN = "hashicorp_key_management"
# Big enough that the redo log does not wrap during a test: what was logged is still there to
# look for.
REDO_LOG_SIZE = "64M"


def mariadb_missing() -> str | None:
    """Why MariaDB with the Vault plugin can't run here (None if it can)."""
    for exe in (MARIADBD, MARIADB, MARIADB_INSTALL_DB):
        if not os.access(exe, os.X_OK):
            return f"{exe} not found: run tests/install-mariadb.sh"
    if not any(Path(d, f"{PLUGIN}.so").exists() for d in plugin_dirs()):
        return f"{PLUGIN}.so not found: run tests/install-mariadb.sh"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("mysql")
        except KeyError:
            return "no mysql user: run tests/install-mariadb.sh"
    return None


def plugin_dirs() -> list[Path]:
    return [Path("/usr/lib/mysql/plugin"), *Path("/usr/lib").glob("*/mariadb*/plugin")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# A test CA and a server certificate for 127.0.0.1 / localhost


def make_test_ca(directory: Path) -> TlsFiles:
    """A CA (EC P-256, self-signed) and a server certificate for IP:127.0.0.1 and DNS:localhost
    signed by it, made with openssl. Keys in PKCS#8 PEM."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        r = subprocess.run(
            ["openssl", *args], capture_output=True, text=True, timeout=60, cwd=d,
            stdin=subprocess.DEVNULL,
        )
        assert r.returncode == 0, f"openssl {' '.join(args)} failed: {r.stderr}"

    run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "ca.key")
    run(
        "req", "-x509", "-new", "-key", "ca.key", "-sha256", "-days", "2", "-subj",
        "/CN=hsmkms e2e test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", "ca.pem",
    )
    run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "server.key")
    run("req", "-new", "-key", "server.key", "-subj", "/CN=127.0.0.1", "-out", "server.csr")
    (d / "server.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    run(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-sha256", "-extfile", "server.ext",
        "-out", "server.pem",
    )
    return TlsFiles(d / "ca.pem", d / "server.pem", d / "server.key")


# --------------------------------------------------------------------------------------------
# hsmkms with its TDE front, and the `hsmkms tde` CLI


class CliError(AssertionError):
    pass


class TdeServer(Server):
    """`hsmkms dev --tde-listen ...` on a data directory. After the first start, start() binds
    the same two ports again, so that a MariaDB configured with the TDE URL finds it back.
    With `tokens`, the key store is a cluster of N SoftHSM2 tokens (`--tokens N`)."""

    def __init__(self, data_dir: Path, log_path: Path, tls: TlsFiles | None = None,
                 tokens: int | None = None):
        super().__init__(data_dir, log_path, tokens=tokens, tde_front=True, tde_tls=tls,
                         keep_ports=True)

    @property
    def tde_scheme(self) -> str:
        """"http" or "https", as the TDE front announced itself."""
        assert self.tde_endpoint, "TDE front not started"
        return self.tde_endpoint.split("://", 1)[0]

    @property
    def tde_url(self) -> str:
        """The plugin's hashicorp-key-management-vault-url: <front>/v1/tde"""
        assert self.tde_endpoint, "TDE front not started"
        return f"{self.tde_endpoint}/v1/{TDE_MOUNT}"

    # ---- the `hsmkms tde` CLI

    def tde(self, *args: str, timeout: float = 120) -> Any:
        """`hsmkms tde ARGS --data-dir DIR` that must succeed; returns its JSON output."""
        r = self.tde_raw(*args, timeout=timeout)
        if r.returncode != 0:
            raise CliError(
                f"hsmkms tde {' '.join(args)} exited {r.returncode}\n"
                f"stdout: {r.stdout}\nstderr: {r.stderr}"
            )
        try:
            return json.loads(r.stdout)
        except ValueError as e:
            raise CliError(f"hsmkms tde {' '.join(args)}: no JSON on stdout ({e}): {r.stdout!r}")

    def tde_raw(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        group, verb, *rest = args
        return self.run_cli("tde", group, verb, "--data-dir", str(self.data_dir), *rest,
                            timeout=timeout)

    def client_create(self, name: str) -> str:
        out = self.tde("client", "create", name)
        assert out.get("Client") == name, out
        token = out.get("Token")
        assert isinstance(token, str) and TOKEN_RE.match(token), f"odd token: {out!r}"
        return token

    def client_revoke(self, name: str) -> Any:
        return self.tde("client", "revoke", name)

    def key_create(self, client: str, kms_key: str, key_id: int, nbytes: int | None = None) -> dict:
        args = ["key", "create", "--client", client, "--kms-key", kms_key]
        if nbytes is not None:
            args += ["--bytes", str(nbytes)]
        out = self.tde(*args, str(key_id))
        assert out.get("Client") == client and out.get("Id") == key_id, out
        # The brief's contract says "Version"; the CLI prints "LatestVersion" (either is fine).
        assert out.get("Version", out.get("LatestVersion")) == 1, out
        assert str(out.get("KmsKeyId", "")).startswith("arn:aws:kms:"), out
        return out

    def key_rotate(self, client: str, key_id: int) -> int:
        out = self.tde("key", "rotate", "--client", client, str(key_id))
        assert out.get("Id", key_id) == key_id, out
        version = out.get("Version", out.get("LatestVersion"))
        assert isinstance(version, int) and version >= 2, out
        return version

    def key_list(self, client: str | None = None) -> list[dict]:
        args = ["key", "list"] + (["--client", client] if client else [])
        out = self.tde(*args)
        assert isinstance(out.get("Keys"), list), out
        return out["Keys"]

    def key_disable(self, client: str, key_id: int) -> Any:
        return self.tde("key", "disable", "--client", client, str(key_id))

    def key_enable(self, client: str, key_id: int) -> Any:
        return self.tde("key", "enable", "--client", client, str(key_id))


# --------------------------------------------------------------------------------------------
# Raw KV v2 requests, as the plugin makes them (GET, HTTP/1.1, X-Vault-Token)


class Dropped(Exception):
    """The server closed the connection without an answer (or refused it)."""


@dataclass
class KvResponse:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<HTTP {self.status} {self.body[:400]!r}>"


def kv_get(base: str, path: str, token: str | None, *, ca: Path | None = None,
           timeout: float = 20) -> KvResponse:
    """GET {scheme://host:port}{path}. `base` is the vault URL (…/v1/tde) or any URL on the
    front; only its scheme, host and port count. Raises Dropped when no HTTP answer comes."""
    m = re.match(r"^(https?)://([^/:]+):(\d+)", base)
    assert m, base
    scheme, host, port = m.group(1), m.group(2), int(m.group(3))
    if scheme == "https":
        ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, port, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    headers = {"Accept": "*/*"}
    if token is not None:
        headers["X-Vault-Token"] = token
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return KvResponse(resp.status, resp.read())
    except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine) as e:
        raise Dropped(f"GET {path}: {type(e).__name__}: {e}") from e
    finally:
        conn.close()


def kv_key(resp: KvResponse) -> tuple[bytes, int]:
    """(key bytes, version) from a 200 KV v2 answer, checked as strictly as the plugin reads it:
    data.data.data is a hex string, data.metadata.version a JSON integer."""
    assert resp.status == 200, resp
    doc = resp.json()
    data = doc["data"]
    hexkey = data["data"]["data"]
    version = data["metadata"]["version"]
    assert isinstance(hexkey, str) and re.fullmatch(r"[0-9a-fA-F]+", hexkey), doc
    assert isinstance(version, int) and not isinstance(version, bool) and version >= 1, doc
    return bytes.fromhex(hexkey), version


# --------------------------------------------------------------------------------------------
# A recording relay in front of the TDE front


@dataclass
class KvEvent:
    """One request that went through a KvProxy: when its connection was opened and closed
    (time.monotonic()), its method and path, and the HTTP status that came back (None: the
    connection ended without one)."""
    started: float
    ended: float
    method: str
    path: str
    status: int | None

    @property
    def key_id(self) -> int | None:
        m = re.match(rf"^/v1/{TDE_MOUNT}/data/(\d+)(?:\?|$)", self.path)
        return int(m.group(1)) if m else None


class KvProxy:
    """A loopback TCP relay in front of a plain-http TDE front that records each request passing
    through (the plugin opens one connection per request) and the status it got. MariaDB's plugin
    is pointed at `url`; `events` then tell how often it really went to hsmkms, for which key, and
    whether an answer came (a dropped connection is what the plugin may hide behind its cache)."""

    REQUEST_RE = re.compile(rb"(?:^|\n)([A-Z]+) (\S+) HTTP/1\.[01]\r\n")
    STATUS_RE = re.compile(rb"(?:^|\n)HTTP/1\.[01] (\d{3})")

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.events: list[KvEvent] = []
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, name=f"kv-proxy-{self.port}", daemon=True).start()

    @property
    def url(self) -> str:
        """The plugin's hashicorp-key-management-vault-url through this relay."""
        return f"http://127.0.0.1:{self.port}/v1/{TDE_MOUNT}"

    def mark(self) -> int:
        with self.lock:
            return len(self.events)

    def since(self, mark: int, until: int | None = None) -> list[KvEvent]:
        with self.lock:
            return list(self.events[mark:until])

    def close(self) -> None:
        self.closed.set()
        try:
            self.listener.close()
        except OSError:
            pass

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket | None, seen: bytearray) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if len(seen) < 1 << 20:
                    seen += data
                if dst is not None:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            if dst is not None:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    def _relay(self, client: socket.socket) -> None:
        sent, got = bytearray(), bytearray()
        upstream = None
        started = time.monotonic()
        client.settimeout(60)
        try:
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=60)
            except OSError:
                client.settimeout(2)  # nothing listens: read the request, answer nothing
            if upstream is None:
                self._pump(client, None, sent)
            else:
                up = threading.Thread(target=self._pump, args=(client, upstream, sent), daemon=True)
                up.start()
                self._pump(upstream, client, got)
                up.join(timeout=60)
        finally:
            for s in (client, upstream):
                if s is not None:
                    try:
                        s.close()
                    except OSError:
                        pass
            requests = self.REQUEST_RE.findall(bytes(sent))
            statuses = [int(x) for x in self.STATUS_RE.findall(bytes(got))]
            now = time.monotonic()
            with self.lock:
                for i, (method, path) in enumerate(requests):
                    self.events.append(KvEvent(started, now, method.decode(),
                                               path.decode("latin-1"),
                                               statuses[i] if i < len(statuses) else None))


# --------------------------------------------------------------------------------------------
# Private mariadbd instances


_STARTED_MARIADBD: set[int] = set()


@atexit.register
def _kill_leftover_mariadbd() -> None:
    for pid in list(_STARTED_MARIADBD):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class SqlError(AssertionError):
    def __init__(self, query: str, returncode: int, stderr: str):
        super().__init__(f"SQL failed ({returncode}): {query}\n{stderr.strip()}")
        self.query = query
        self.stderr = stderr


class MariaDBStartError(RuntimeError):
    pass


def new_base_dir(prefix: str) -> Path:
    """A fresh directory the mysql user can use (pytest's temp dirs are 0700 root)."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(base, 0o755)
    if os.geteuid() == 0:
        pw = pwd.getpwnam("mysql")
        os.chown(base, pw.pw_uid, pw.pw_gid)
    return base


class MariaDB:
    """One private mariadbd on its own base directory:
        BASE/data (datadir), BASE/run/mysqld.sock and .pid, BASE/tmp, BASE/my.cnf, BASE/error.log
    The configuration is rewritten at each start() from `options` (a dict: option -> value;
    None for a bare flag). Runs as the mysql user when the tests run as root."""

    def __init__(self, base: Path, options: dict[str, Any] | None = None):
        self.base = Path(base)
        self.datadir = self.base / "data"
        self.rundir = self.base / "run"
        self.tmpdir = self.base / "tmp"
        self.socket = self.rundir / "mysqld.sock"
        self.pidfile = self.rundir / "mysqld.pid"
        self.cnf = self.base / "my.cnf"
        self.error_log = self.base / "error.log"
        self.stdio_log = self.base / "mariadbd.out"
        self.port = free_port()
        self.options: dict[str, Any] = dict(options or {})
        self.proc: subprocess.Popen | None = None
        self.last_exit: int | None = None
        self.starts = 0
        self.as_root = os.geteuid() == 0
        if self.as_root:
            pw = pwd.getpwnam("mysql")
            self.uid, self.gid = pw.pw_uid, pw.pw_gid
        for d in (self.base, self.rundir, self.tmpdir):
            d.mkdir(parents=True, exist_ok=True)
            if self.as_root:
                os.chown(d, self.uid, self.gid)

    # ---- set-up

    def install_db(self, timeout: float = 180) -> float:
        """mariadb-install-db without any plugin or encryption (system tables; root@localhost
        with an empty password so the client needs no unix_socket match). Returns seconds."""
        t0 = time.monotonic()
        args = [
            MARIADB_INSTALL_DB, "--no-defaults", f"--datadir={self.datadir}",
            "--auth-root-authentication-method=normal", "--skip-test-db",
            "--skip-name-resolve", f"--innodb-log-file-size={REDO_LOG_SIZE}",
        ]
        if self.as_root:
            args.append("--user=mysql")
        r = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL, cwd=self.base)
        if r.returncode != 0:
            raise MariaDBStartError(f"mariadb-install-db failed ({r.returncode}):\n"
                                    f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return time.monotonic() - t0

    def write_cnf(self) -> None:
        lines = [
            "# Written by tests/e2e/tde_support.py: a private test instance.",
            "[mariadbd]",
            f"datadir={self.datadir}",
            f"socket={self.socket}",
            f"pid-file={self.pidfile}",
            f"port={self.port}",
            "bind-address=127.0.0.1",
            f"tmpdir={self.tmpdir}",
            f"log-error={self.error_log}",
            "skip-name-resolve",
            "skip-log-bin",
            "innodb-buffer-pool-size=64M",
            f"innodb-log-file-size={REDO_LOG_SIZE}",
            "innodb-flush-log-at-trx-commit=1",
            "innodb-use-native-aio=OFF",
            "performance-schema=OFF",
            "max-connections=20",
        ]
        if self.as_root:
            lines.append("user=mysql")
        for k, v in self.options.items():
            lines.append(k if v is None else f"{k}={v}")
        self.cnf.write_text("\n".join(lines) + "\n")
        os.chmod(self.cnf, 0o600)
        if self.as_root:
            os.chown(self.cnf, self.uid, self.gid)

    # ---- process

    def start(self, timeout: float = 90) -> float:
        """Starts mariadbd and waits until it answers SELECT 1. Raises MariaDBStartError if it
        exits first (with the error log's tail). Returns seconds taken."""
        assert self.proc is None, "already running"
        self.write_cnf()
        self.starts += 1
        with open(self.error_log, "ab") as f:
            f.write(f"\n===== test: start #{self.starts}\n".encode())
        if self.as_root:
            os.chown(self.error_log, self.uid, self.gid)
        out = open(self.stdio_log, "ab")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [MARIADBD, f"--defaults-file={self.cnf}"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
        )
        out.close()
        _STARTED_MARIADBD.add(self.proc.pid)
        deadline = t0 + timeout
        while True:
            if self.proc.poll() is not None:
                code = self.last_exit = self.proc.returncode
                _STARTED_MARIADBD.discard(self.proc.pid)
                self.proc = None
                raise MariaDBStartError(
                    f"mariadbd exited with {code} during start-up\n{self.log_tail()}")
            if self.socket.exists():
                r = self._client("SELECT 1", timeout=10)
                if r.returncode == 0:
                    return time.monotonic() - t0
            if time.monotonic() > deadline:
                self.kill()
                raise MariaDBStartError(
                    f"mariadbd did not answer within {timeout:.0f} s\n{self.log_tail()}")
            time.sleep(0.2)

    def expect_start_failure(self, timeout: float = 120) -> tuple[int, float]:
        """Starts mariadbd, which must exit by itself without ever answering a query.
        Returns (exit status, seconds)."""
        t0 = time.monotonic()
        try:
            took = self.start(timeout=timeout)
        except MariaDBStartError as e:
            if "did not answer" in str(e):
                raise
            return self.last_exit, time.monotonic() - t0
        raise AssertionError(f"mariadbd started (in {took:.1f} s) but should have refused")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, slow: bool = True, timeout: float = 120) -> int | None:
        """Clean shutdown (innodb_fast_shutdown=0 when slow: all pages flushed, purge and
        change buffer merged). Returns mariadbd's exit status (None if it had to be killed)."""
        if self.proc is None:
            return None
        proc = self.proc
        if proc.poll() is None:
            if slow:
                try:
                    self.sql("SET GLOBAL innodb_fast_shutdown=0", timeout=30)
                except SqlError:
                    pass
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        self.proc = None
        _STARTED_MARIADBD.discard(proc.pid)
        return proc.returncode

    def kill(self) -> None:
        if self.proc is None:
            return
        try:
            os.kill(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        _STARTED_MARIADBD.discard(self.proc.pid)
        self.proc = None

    # ---- SQL

    def _client(self, query: str, timeout: float = 60, database: str | None = None):
        args = [MARIADB, "--no-defaults", f"--socket={self.socket}", "-uroot", "--batch",
                "--skip-column-names", "--raw", "--connect-timeout=10"]
        if database:
            args.append(f"--database={database}")
        args += ["-e", query]
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def sql(self, query: str, timeout: float = 60, database: str | None = None) -> list[list[str]]:
        """Runs the statements; returns the rows of the last result as lists of strings."""
        r = self._client(query, timeout=timeout, database=database)
        if r.returncode != 0:
            raise SqlError(query, r.returncode, r.stderr)
        return [line.split("\t") for line in r.stdout.splitlines() if line != ""]

    def scalar(self, query: str, **kw: Any) -> str:
        rows = self.sql(query, **kw)
        assert len(rows) == 1 and len(rows[0]) == 1, f"{query}: {rows!r}"
        return rows[0][0]

    def sql_error(self, query: str, timeout: float = 60, database: str | None = None) -> str:
        """Runs a query that must fail; returns the client's error text."""
        r = self._client(query, timeout=timeout, database=database)
        assert r.returncode != 0, f"expected an error from {query!r}, got {r.stdout!r}"
        return r.stderr.strip()

    # ---- files

    def log_tail(self, lines: int = 60) -> str:
        parts = []
        for path in (self.error_log, self.stdio_log):
            try:
                text = ANSI_RE.sub("", path.read_text("utf-8", "replace")).splitlines()
            except OSError:
                continue
            parts.append(f"--- last {lines} lines of {path} ---\n" + "\n".join(text[-lines:]))
        return "\n".join(parts) or "(no mariadb log)"

    def log_text(self) -> str:
        try:
            return self.error_log.read_text("utf-8", "replace")
        except OSError:
            return ""

    def log_of_last_start(self) -> str:
        """The error log from the last start() on."""
        text = self.log_text()
        mark = f"===== test: start #{self.starts}\n"
        return text[text.rfind(mark):] if mark in text else text

    def table_file(self, db: str, table: str) -> Path:
        return self.datadir / db / f"{table}.ibd"


def files_holding(directory: Path, needles: list[bytes]) -> dict[str, int]:
    """{relative path: hits} for every file under directory that holds any of the needles."""
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = Path(root, name)
            if not path.is_file():
                continue
            n = sum(count_in_file(path, needle)[0] for needle in needles)
            if n:
                found[str(path.relative_to(directory))] = n
    return found


def count_in_file(path: Path, needle: bytes, chunk: int = 1 << 20) -> tuple[int, int]:
    """(occurrences of needle, bytes scanned) in a file, read in chunks with overlap."""
    assert needle
    hits = scanned = 0
    tail = b""
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            scanned += len(block)
            buf = tail + block
            hits += buf.count(needle)
            # Occurrences entirely inside `tail` were counted in the previous round.
            hits -= tail.count(needle)
            tail = buf[-(len(needle) - 1):] if len(needle) > 1 else b""
    return hits, scanned
