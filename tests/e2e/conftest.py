"""Fixtures for the end-to-end tests: `hsmkms dev` on a fresh data directory, boto3 clients on it.

Run through `bash tests/run.sh`, or after `cargo build --workspace`:
    target/e2e-venv/bin/python -m pytest -q tests/e2e
The binary is target/debug/hsmkms unless $HSMKMS_BIN says otherwise.
"""

from __future__ import annotations

import os
import uuid

import pytest

import e2e_support
from e2e_support import Server, hsmkms_binary, kms_client

# botocore in this process (boto3, the Encryption SDK) must not read anything from $HOME or the
# environment of whoever runs the tests.
for _k in [k for k in os.environ if k.startswith("AWS_")]:
    del os.environ[_k]
os.environ.update(
    AWS_CONFIG_FILE="/dev/null",
    AWS_SHARED_CREDENTIALS_FILE="/dev/null",
    AWS_EC2_METADATA_DISABLED="true",
)


def pytest_configure(config):
    e2e_support.PYTEST_CONFIG = config


def pytest_report_header(config):
    return f"hsmkms binary: {hsmkms_binary()}"


def pytest_sessionfinish(session, exitstatus):
    # "No tests collected" (exit 5) must never pass as success.
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if rep.failed:
        funcargs = getattr(item, "funcargs", {}) or {}
        seen = set()
        for value in funcargs.values():
            if isinstance(value, Server) and id(value) not in seen:
                seen.add(id(value))
                rep.sections.append((f"hsmkms log ({value.data_dir})", value.log_tail(80)))
    return rep


@pytest.fixture(scope="session")
def hsmkms_bin():
    path = hsmkms_binary()
    if not path.exists():
        pytest.fail(f"{path} not found: run `cargo build --workspace` first (tests/run.sh does)")
    return path


def _new_server(tmp_path_factory, name: str) -> Server:
    base = tmp_path_factory.mktemp(name)
    return Server(base / "data", base / "server.log")


@pytest.fixture(scope="module")
def server(hsmkms_bin, tmp_path_factory):
    """One `hsmkms dev` per test module, on its own fresh data directory."""
    srv = _new_server(tmp_path_factory, "hsmkms")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def fresh_server(hsmkms_bin, tmp_path_factory):
    """A `hsmkms dev` of the test's own, for tests that restart it or kill its workers.
    `fresh_server.restart()` stops it (SIGTERM) and starts it again on the same data dir."""
    srv = _new_server(tmp_path_factory, "hsmkms-fresh")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def endpoint(server):
    return server.endpoint


@pytest.fixture(scope="module")
def kms(server):
    """boto3 KMS client on the module's server; no retries, no client-side validation."""
    return kms_client(server.endpoint)


@pytest.fixture
def new_key(kms):
    """Factory: creates a key on the module's server and returns its ARN."""

    def make(description: str = "e2e test key", **kw) -> str:
        resp = kms.create_key(Description=description, **kw)
        return resp["KeyMetadata"]["Arn"]

    return make


@pytest.fixture
def alias_name():
    """A fresh alias name (alias/e2e-<random>)."""
    return f"alias/e2e-{uuid.uuid4().hex[:12]}"
