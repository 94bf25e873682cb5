"""Helpers shared by the end-to-end tests: the hsmkms server process, the AWS CLI, boto3 clients,
raw signed HTTP requests, and the server's worker processes."""

from __future__ import annotations

import atexit
import base64
import http.client
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import boto3
import botocore.config
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

REPO = Path(__file__).resolve().parents[2]

# The documented dev principal of `hsmkms dev`.
ACCESS_KEY = "AKIAHSMKMSDEV0000001"
SECRET_KEY = "hsmkms-dev-secret-key-for-local-use-only"
REGION = "us-east-1"
ACCOUNT = "111122223333"

KEY_ARN_RE = re.compile(
    r"^arn:aws:kms:us-east-1:111122223333:key/"
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
)
ALIAS_ARN_PREFIX = f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/"
LISTENING_RE = re.compile(r"^hsmkms listening on ((https?)://127\.0\.0\.1:(\d+))\s*$")
TDE_LISTENING_RE = re.compile(r"^hsmkms tde listening on ((https?)://127\.0\.0\.1:(\d+))\s*$")
STARTUP_TIMEOUT = 60.0
JSON_CT = "application/x-amz-json-1.1"
ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")


# pytest's configuration, set by conftest: `report` steps around pytest's output capture so that
# a test's counts show in the CI log.
PYTEST_CONFIG = None


def report(line: str) -> None:
    """A line for the test log, shown whether or not pytest captures output."""
    capture = PYTEST_CONFIG.pluginmanager.get_plugin("capturemanager") if PYTEST_CONFIG else None
    if capture is None:
        print(line, flush=True)
        return
    with capture.global_and_fixture_disabled():
        print(line, flush=True)


def hsmkms_binary() -> Path:
    """The server binary: $HSMKMS_BIN or target/debug/hsmkms (built by tests/run.sh)."""
    return Path(os.environ.get("HSMKMS_BIN", REPO / "target" / "debug" / "hsmkms"))


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any AWS_* setting, plus the dev credentials and a
    configuration that can't come from a file in $HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_DEFAULT_REGION=REGION,
        AWS_REGION=REGION,
        AWS_CONFIG_FILE="/dev/null",
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
        AWS_EC2_METADATA_DISABLED="true",
        # No hidden retries: a failed request must show.
        AWS_MAX_ATTEMPTS="1",
        AWS_RETRY_MODE="standard",
        AWS_PAGER="",
    )
    env.update(extra)
    return env


def key_id_of(arn_or_id: str) -> str:
    """The UUID at the end of a key ARN (or the argument if it already is one)."""
    return arn_or_id.rsplit("/", 1)[-1]


# --------------------------------------------------------------------------------------------
# The server


_STARTED_GROUPS: set[int] = set()


@atexit.register
def _kill_leftover_servers() -> None:
    """If the test process ends without teardown (a hard timeout, an interrupt), take the
    servers it started, and their workers, with it."""
    for pgid in list(_STARTED_GROUPS):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@dataclass
class TlsFiles:
    """A test CA's certificate, and a server certificate and key signed by it (PEM)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


class Server:
    """One `hsmkms dev` process on a data directory; can be stopped and started again on it.

    tokens: `--tokens N`, a cluster of N SoftHSM2 tokens (counts only when the data directory
        is new; passed at every start all the same).
    tls: the KMS front serves HTTPS with this certificate (`--tls-cert`, `--tls-key`).
    tde_front: the TDE front is started too (`--tde-listen`), over HTTPS with tde_tls.
    keep_ports: every start after the first binds the ports of the first (so that clients
        configured with the endpoint find the server back); otherwise each start takes new ones.
    nofile: the server runs with this RLIMIT_NOFILE, soft and hard (as a small host would).
    """

    def __init__(self, data_dir: Path, log_path: Path, *, tokens: int | None = None,
                 tls: TlsFiles | None = None, tde_front: bool = False,
                 tde_tls: TlsFiles | None = None, keep_ports: bool = False,
                 nofile: int | None = None):
        self.data_dir = Path(data_dir)
        self.log_path = Path(log_path)
        self.tokens = tokens
        self.tls = tls
        self.tde_front = tde_front
        self.tde_tls = tde_tls
        self.keep_ports = keep_ports
        self.nofile = nofile
        self.proc: subprocess.Popen | None = None
        self.endpoint: str | None = None
        self.port: int | None = None
        self.tde_endpoint: str | None = None
        self.tde_port: int | None = None
        self.stdout_lines: list[str] = []
        self.starts = 0
        # Workers this harness SIGKILLed: they show in /proc until they have exited.
        self.killed_workers: set[int] = set()

    @property
    def pid(self) -> int:
        assert self.proc is not None, "server is not running"
        return self.proc.pid

    def argv(self) -> list[str]:
        port = self.port if self.keep_ports and self.port else 0
        argv = [str(hsmkms_binary()), "dev", "--data-dir", str(self.data_dir),
                "--listen", f"127.0.0.1:{port}"]
        if self.tokens is not None:
            argv += ["--tokens", str(self.tokens)]
        if self.tls:
            argv += ["--tls-cert", str(self.tls.server_cert), "--tls-key", str(self.tls.server_key)]
        if self.tde_front:
            tde_port = self.tde_port if self.keep_ports and self.tde_port else 0
            argv += ["--tde-listen", f"127.0.0.1:{tde_port}"]
            if self.tde_tls:
                argv += ["--tde-tls-cert", str(self.tde_tls.server_cert),
                         "--tde-tls-key", str(self.tde_tls.server_key)]
        return argv

    def start(self) -> "Server":
        """Starts hsmkms and waits for its listening line (and the TDE front's)."""
        binary = hsmkms_binary()
        if not binary.exists():
            raise RuntimeError(
                f"{binary} does not exist: build it with `cargo build --workspace` "
                "(bash tests/run.sh does)"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        argv = self.argv()
        log = open(self.log_path, "ab")
        log.write(f"\n===== start #{self.starts}: {' '.join(argv)}\n".encode())
        log.flush()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.setdefault("RUST_LOG", "info")
        env["NO_COLOR"] = "1"
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
            # Its own process group, so that teardown can be sure no worker is left behind.
            start_new_session=True,
            preexec_fn=self._limit_files if self.nofile else None,
        )
        log.close()
        _STARTED_GROUPS.add(self.proc.pid)
        lines = self._stdout_lines(self.proc)
        kms = self._wait_for(lines, LISTENING_RE, "listening", not_before=TDE_LISTENING_RE)
        tde = self._wait_for(lines, TDE_LISTENING_RE, "TDE listening") if self.tde_front else None
        self._check_scheme(kms, self.tls, "KMS")
        if self.tde_front:
            self._check_scheme(tde, self.tde_tls, "TDE")
        ports = (int(kms.group(3)), int(tde.group(3)) if tde else None)
        if self.keep_ports and self.port is not None:
            assert ports == (self.port, self.tde_port), (
                f"restart bound other ports: {ports}, wanted {(self.port, self.tde_port)}")
        self.endpoint, self.port = kms.group(1), ports[0]
        if tde:
            self.tde_endpoint, self.tde_port = tde.group(1), ports[1]
        return self

    def _limit_files(self) -> None:
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    @staticmethod
    def _stdout_lines(proc: subprocess.Popen) -> "queue.Queue[str | None]":
        """The process's stdout, line by line, read by a thread (None at the end)."""
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                lines.put(raw.decode("utf-8", "replace"))
            lines.put(None)

        threading.Thread(target=pump, name=f"hsmkms-stdout-{proc.pid}", daemon=True).start()
        return lines

    def _wait_for(self, lines: "queue.Queue[str | None]", pattern: re.Pattern, what: str,
                  not_before: re.Pattern | None = None) -> re.Match:
        """The first stdout line matching pattern, within STARTUP_TIMEOUT; a line matching
        not_before first is an error (the fronts announce themselves in a fixed order)."""
        proc = self.proc
        assert proc is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._kill_group()
                raise RuntimeError(
                    f"hsmkms printed no {what} line within {STARTUP_TIMEOUT:.0f} s; "
                    f"stdout={self.stdout_lines!r}\n{self.log_tail()}"
                )
            try:
                line = lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line is None:
                code = proc.wait(timeout=10)
                raise RuntimeError(
                    f"hsmkms exited with {code} before {what}; stdout={self.stdout_lines!r}\n"
                    f"{self.log_tail()}"
                )
            self.stdout_lines.append(line)
            if not_before is not None and not_before.match(line):
                self._kill_group()
                raise AssertionError(f"{line!r} came before the {what} line")
            m = pattern.match(line)
            if m:
                return m

    def _check_scheme(self, m: re.Match, tls: TlsFiles | None, front: str) -> None:
        want = "https" if tls else "http"
        if m.group(2) != want:
            self._kill_group()
            raise AssertionError(f"the {front} front says {m.group(2)}, expected {want}: "
                                 f"{m.group(0)!r}")

    def stop(self, timeout: float = 20.0, kill_leftovers: bool = True) -> int | None:
        """SIGTERM, wait; SIGKILL the whole process group if it does not stop. Returns the exit
        status (None if it had to be killed). With kill_leftovers=False, processes of its group
        that outlive a clean exit are left for the caller to look at (and `kill_leftovers()`)."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        self.last_pgid = proc.pid
        status: int | None = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                status = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                status = None
        else:
            status = proc.returncode
        if kill_leftovers or status is None:
            self._kill_group(proc.pid)
            _STARTED_GROUPS.discard(proc.pid)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        return status

    def kill(self) -> int | None:
        """SIGKILL to the whole process group at once (hsmkms and its workers), as `kill -9`
        or a crash of the machine would. Returns the exit status."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        self._kill_group(proc.pid)
        _STARTED_GROUPS.discard(proc.pid)
        return proc.wait(timeout=10)

    def restart(self) -> "Server":
        status = self.stop()
        assert status is not None, "hsmkms did not stop on SIGTERM within 20 s"
        return self.start()

    def kill_leftovers(self) -> None:
        """SIGKILL whatever is left of the last stopped server's process group."""
        if getattr(self, "last_pgid", None):
            self._kill_group(self.last_pgid)
            _STARTED_GROUPS.discard(self.last_pgid)

    def _kill_group(self, pgid: int | None = None) -> None:
        pgid = pgid if pgid is not None else (self.proc.pid if self.proc else None)
        if pgid is None:
            return
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = ANSI_RE.sub("", self.log_path.read_text("utf-8", "replace")).splitlines()
        except OSError:
            return "(no server log)"
        return f"--- last {lines} lines of {self.log_path} ---\n" + "\n".join(text[-lines:])

    def client(self, **kw: Any):
        assert self.endpoint, "server is not running"
        return kms_client(self.endpoint, **kw)

    # ---- the tokens of a dev cluster, /healthz, /metrics

    def token_home(self, n: int) -> Path:
        """Where dev token n (1-based) lives: DIR for the first, DIR/token-N for the others; its
        SoftHSM2 files are in <home>/tokens, its configuration is <home>/softhsm2.conf."""
        assert n >= 1
        return self.data_dir if n == 1 else self.data_dir / f"token-{n}"

    def token_workers(self, n: int) -> list[int]:
        """The worker processes of token n: descendants of this server whose environment has
        SOFTHSM2_CONF=<that token's softhsm2.conf> (never a CLI's workers, nor anything else)."""
        assert self.proc is not None, "server is not running"
        return processes_with_env(
            self.proc.pid, f"SOFTHSM2_CONF={self.token_home(n) / 'softhsm2.conf'}")

    def token_worker_count(self, n: int) -> int:
        """How many workers the server runs for token n: its last `token started ... workers=K`
        log line (1 if it logged none)."""
        label = "hsmkms-dev" if n == 1 else f"hsmkms-dev-{n}"
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        found = re.findall(rf"token started token={re.escape(label)} .*?workers=(\d+)", text)
        return int(found[-1]) if found else 1

    def kill_token_workers(self, n: int) -> list[int]:
        """SIGKILLs every worker of token n now (its directory stays); returns their pids."""
        killed = self.token_workers(n)
        for pid in killed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.killed_workers.update(killed)
        return killed

    def lose_token(self, n: int, timeout: float = 30.0) -> list[int]:
        """Token n goes away as a real one would: its SoftHSM2 directory moved aside (to
        <home>/tokens-away), every one of its workers SIGKILLed. Returns the killed pids.

        The workers are taken from /proc BEFORE the move: once the directory is gone, a worker
        that reopens the token (its fresh view after a missing key) fails and exits by itself,
        so a scan after the move may find none (the CI flake `token 2 had no worker`, seen under
        CPU load). They are waited for, within `timeout`, until the token has all its workers
        (as many as the server logged at start, none of them one this harness killed): a
        replaced worker is gone at once, or dying, while its slot is refilled only by the next
        request or probe (every probe_interval_secs, 5 s). After the move, those and any worker
        a later scan finds (one whose start began before the move) are killed until a scan finds
        none; a worker started after the move cannot find the token. Returns the pids of the
        workers the token had at the move and after, all gone now."""
        want = self.token_worker_count(n)
        deadline = time.monotonic() + timeout

        def live() -> list[int]:
            return [p for p in self.token_workers(n) if p not in self.killed_workers]

        while len(at_move := live()) < want:
            if time.monotonic() > deadline:
                raise AssertionError(f"token {n} had {at_move}, not {want} workers, within "
                                     f"{timeout:.0f} s\n{self.log_tail(40)}")
            time.sleep(0.02)
        home = self.token_home(n)
        (home / "tokens").rename(home / "tokens-away")
        lost = list(at_move)
        targets = at_move
        while targets:
            if time.monotonic() > deadline:
                raise AssertionError(f"token {n}'s workers {targets} still run\n"
                                     f"{self.log_tail(40)}")
            for pid in targets:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass  # it exited by itself: the token is gone for it too
            self.killed_workers.update(targets)
            time.sleep(0.02)
            targets = live()
            lost += [p for p in targets if p not in lost]
        return sorted(lost)

    def health(self, timeout: float = 10) -> dict:
        assert self.endpoint, "server is not running"
        return health(self.endpoint, timeout)

    def token_states(self) -> dict[str, str]:
        """{token label: "UP" | "DOWN"} from /healthz."""
        return {t["label"]: t["state"] for t in self.health()["tokens"]}

    def metric(self, name: str) -> float:
        """Sum of the samples of one metric in /metrics (0 if it has none)."""
        assert self.endpoint, "server is not running"
        with urllib.request.urlopen(f"{self.endpoint}/metrics", timeout=10) as r:
            text = r.read().decode()
        total = 0.0
        for line in text.splitlines():
            m = re.match(rf"^{re.escape(name)}(?:{{[^}}]*}})?\s+(\S+)$", line)
            if m:
                total += float(m.group(1))
        return total

    def run_cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Runs `hsmkms ARGS...` (e.g. `key rotate-manually --data-dir DIR alias/x`)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        return subprocess.run(
            [str(hsmkms_binary()), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )


def health(endpoint: str, timeout: float = 10) -> dict:
    """GET /healthz (a 503 carries the same JSON)."""
    try:
        with urllib.request.urlopen(f"{endpoint}/healthz", timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


# --------------------------------------------------------------------------------------------
# Worker processes


def process_table() -> list[tuple[int, str, int, int]]:
    """(pid, state, ppid, process group) of every live process, from /proc."""
    table = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces or parentheses.
        state, ppid, pgrp = stat[stat.rfind(")") + 2:].split()[:3]
        table.append((int(d.name), state, int(ppid), int(pgrp)))
    return table


def processes_with_env(ancestor: int, entry: str) -> list[int]:
    """Descendants of `ancestor` whose environment holds exactly `entry` ("NAME=value")."""
    children: dict[int, list[int]] = {}
    for pid, _, ppid, _ in process_table():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], list(children.get(ancestor, []))
    needle = entry.encode()
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(pid)
        except OSError:
            pass
    return sorted(found)


def _ppid_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ..." and comm may hold spaces or parentheses.
    rest = stat[stat.rfind(")") + 2 :].split()
    return int(rest[1])


def cmdline_of(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def children_of(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _ppid_of(int(entry)) == pid:
            kids.append(int(entry))
    return sorted(kids)


def is_worker(pid: int) -> bool:
    argv = cmdline_of(pid)
    if not argv:
        return False
    # `hsmkms worker ...` (or a separate `hsm-worker` binary)
    return "worker" in argv[1:2] or os.path.basename(argv[0]).endswith("worker")


def worker_pids(server_pid: int) -> list[int]:
    """Worker processes among the server's children (and their children, in case a worker is
    started through a wrapper)."""
    found = []
    todo = [server_pid]
    seen = set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        for c in children_of(p):
            if is_worker(c):
                found.append(c)
            todo.append(c)
    return sorted(set(found))


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rfind(")") + 2 :].split()[0] != "Z"


# --------------------------------------------------------------------------------------------
# boto3


def kms_client(
    endpoint: str,
    *,
    access_key: str = ACCESS_KEY,
    secret_key: str = SECRET_KEY,
    region: str = REGION,
    validate: bool = False,
    read_timeout: float = 60,
):
    """A boto3 KMS client on the endpoint. No retries (a failure must be visible) and, by
    default, no client-side parameter validation (so that the server's own checks are tested)."""
    session = boto3.session.Session(
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
    )
    return session.client(
        "kms",
        endpoint_url=endpoint,
        config=botocore.config.Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            parameter_validation=validate,
            connect_timeout=10,
            read_timeout=read_timeout,
            max_pool_connections=16,
        ),
    )


def error_code(fn, *args, **kwargs) -> str:
    """Calls fn, which must fail with a service error; returns the error code."""
    try:
        resp = fn(*args, **kwargs)
    except ClientError as e:
        return e.response["Error"]["Code"]
    raise AssertionError(f"expected an error, got success: {resp!r}")


def expect_error(codes: str | Iterable[str], fn, *args, **kwargs) -> ClientError:
    """Calls fn, which must fail with one of the given error codes and HTTP status 4xx."""
    wanted = {codes} if isinstance(codes, str) else set(codes)
    try:
        resp = fn(*args, **kwargs)
    except ClientError as e:
        code = e.response["Error"]["Code"]
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        assert code in wanted, f"expected {sorted(wanted)}, got {code}: {e}"
        assert status is not None and 400 <= status < 500, f"{code} came with HTTP {status}"
        return e
    raise AssertionError(f"expected {sorted(wanted)}, got success: {resp!r}")


def assert_key_ids_are_arns(resp: Any, path: str = "$") -> int:
    """The KeyIds in a response follow AWS: the results of operations (Encrypt, Decrypt,
    ReEncrypt, GenerateDataKey*, Schedule/CancelKeyDeletion, GetKeyRotationStatus) carry the full
    key ARN in KeyId / SourceKeyId; a key's description (KeyMetadata, ListKeys entries: objects
    that also hold Arn / KeyArn) carries the bare key id in KeyId, equal to the ARN's last part.
    Returns how many ids were checked."""
    n = 0
    if isinstance(resp, dict):
        arn = resp.get("Arn") if isinstance(resp.get("Arn"), str) else resp.get("KeyArn")
        for k, v in resp.items():
            if k == "ResponseMetadata":
                continue
            if k in ("Arn", "KeyArn", "SourceKeyId", "DestinationKeyId") and isinstance(v, str):
                assert KEY_ARN_RE.match(v), f"{path}.{k} = {v!r} is not a key ARN"
                n += 1
            elif k == "KeyId" and isinstance(v, str):
                if arn:
                    assert v == key_id_of(arn), f"{path}.KeyId = {v!r} does not match {arn}"
                else:
                    assert KEY_ARN_RE.match(v), f"{path}.KeyId = {v!r} is not a key ARN"
                n += 1
            else:
                n += assert_key_ids_are_arns(v, f"{path}.{k}")
    elif isinstance(resp, list):
        for i, v in enumerate(resp):
            n += assert_key_ids_are_arns(v, f"{path}[{i}]")
    return n


def _all_pages(list_call, member: str, limit: int | None, kw: dict[str, Any]) -> list[dict]:
    """Every item of a paginated List call, following NextMarker."""
    out, marker = [], None
    for _ in range(10_000):
        args = dict(kw)
        if limit:
            args["Limit"] = limit
        if marker:
            args["Marker"] = marker
        resp = list_call(**args)
        out.extend(resp[member])
        if not resp.get("Truncated"):
            return out
        marker = resp["NextMarker"]
    raise AssertionError(f"listing {member} never stopped paginating")


def assert_symmetric_key_metadata(md: dict) -> None:
    """What every key of this service looks like in KeyMetadata, whichever client read it."""
    assert KEY_ARN_RE.match(md["Arn"]), md
    # As in AWS: KeyMetadata.KeyId is the bare key id; operation results carry the ARN.
    assert md["KeyId"] == key_id_of(md["Arn"])
    assert md["Origin"] == "AWS_CLOUDHSM"
    assert md["KeyManager"] == "CUSTOMER"
    assert md["CustomKeyStoreId"].startswith("cks-")
    assert md["CloudHsmClusterId"].startswith("cluster-")
    assert md["KeySpec"] == "SYMMETRIC_DEFAULT"
    assert md["KeyUsage"] == "ENCRYPT_DECRYPT"
    assert md["EncryptionAlgorithms"] == ["SYMMETRIC_DEFAULT"]
    assert md["MultiRegion"] is False
    assert md["KeyState"] == "Enabled"


def list_all_keys(kms, limit: int | None = None) -> list[dict]:
    return _all_pages(kms.list_keys, "Keys", limit, {})


def list_all_aliases(kms, limit: int | None = None, **kw: Any) -> list[dict]:
    return _all_pages(kms.list_aliases, "Aliases", limit, kw)


# --------------------------------------------------------------------------------------------
# The AWS CLI


def aws_executable() -> str:
    exe = Path(sys.executable).parent / "aws"
    if exe.exists():
        return str(exe)
    raise RuntimeError(f"no aws CLI next to {sys.executable}: pip install -r tests/requirements.txt")


def aws_kms(endpoint: str, *args: str, timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs `aws kms ARGS --endpoint-url E --region us-east-1 --output json` with the dev creds
    (or those overridden in `env`)."""
    cmd = [
        aws_executable(),
        "kms",
        *args,
        "--endpoint-url",
        endpoint,
        "--region",
        REGION,
        "--output",
        "json",
    ]
    return subprocess.run(
        cmd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(**(env or {})),
    )


def aws_ok(endpoint: str, *args: str) -> Any:
    """`aws kms ...` that must succeed; returns its JSON output (None if it printed nothing)."""
    r = aws_kms(endpoint, *args)
    assert r.returncode == 0, f"aws kms {' '.join(args)} failed ({r.returncode}): {r.stderr}"
    return json.loads(r.stdout) if r.stdout.strip() else None


CLI_ERROR_RE = re.compile(r"An error occurred \((\w+)\) when calling the (\w+) operation")


def aws_fail(endpoint: str, *args: str) -> str:
    """`aws kms ...` that must fail with a service error; returns the exception name."""
    r = aws_kms(endpoint, *args)
    assert r.returncode != 0, f"aws kms {' '.join(args)} succeeded: {r.stdout}"
    m = CLI_ERROR_RE.search(r.stderr)
    assert m, f"no service error in the CLI's stderr: {r.stderr!r}"
    return m.group(1)


# --------------------------------------------------------------------------------------------
# Raw HTTP


class RawResponse:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status = status
        self.headers = headers  # lower-cased names
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error_type(self) -> str | None:
        try:
            t = self.json().get("__type")
        except ValueError:
            return None
        # Tolerate a namespaced type ("com.amazonaws.kms#NotFoundException") as botocore does.
        return t.rsplit("#", 1)[-1] if isinstance(t, str) else None

    def __repr__(self) -> str:
        return f"<HTTP {self.status} {self.headers.get('content-type')} {self.body[:300]!r}>"


def raw_request(
    endpoint: str,
    target: str | None,
    body: bytes | str | dict,
    *,
    sign: bool = True,
    access_key: str = ACCESS_KEY,
    secret_key: str = SECRET_KEY,
    region: str = REGION,
    content_type: str = JSON_CT,
    extra_headers: dict[str, str] | None = None,
    mutate_after_signing=None,
    timeout: float = 60,
) -> RawResponse:
    """POST / with X-Amz-Target TrentService.<target>, signed with SigV4 (service kms) unless
    sign=False. `mutate_after_signing(headers, body) -> (headers, body)` can tamper with the
    signed request."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    elif isinstance(body, str):
        body = body.encode()
    url = endpoint.rstrip("/") + "/"
    headers = {"Content-Type": content_type}
    if target is not None:
        headers["X-Amz-Target"] = target if "." in target else f"TrentService.{target}"
    if extra_headers:
        headers.update(extra_headers)
    req = AWSRequest(method="POST", url=url, data=body, headers=headers)
    if sign:
        SigV4Auth(Credentials(access_key, secret_key), "kms", region).add_auth(req)
    send_headers = dict(req.headers.items())
    if mutate_after_signing:
        send_headers, body = mutate_after_signing(send_headers, body)
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("POST", "/", body=body, headers=send_headers)
        resp = conn.getresponse()
        data = resp.read()
        return RawResponse(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
