#!/usr/bin/env bash
# The project's test command:  bash tests/run.sh [extra pytest args]
#
#   1. SoftHSM2 (softhsm-setup/install.sh installs it with apt-get if missing), gdb for gcore, and
#      MariaDB with its Vault key-management plugin for the TDE test (tests/install-mariadb.sh)
#   2. Python venv target/e2e-venv with tests/requirements.txt (awscli, boto3, ESDK CLI, pytest)
#   3. cargo build --workspace --all-targets
#   4. cargo test --workspace                 (unit and integration tests, real SoftHSM2 tokens)
#   5. pytest tests/e2e                       (target/debug/hsmkms against the AWS CLI, boto3, ...)
#
# Exits non-zero on any failure. Extra arguments go to pytest (e.g. -k workers -x).
# HSMKMS_SKIP_CARGO=1 skips steps 3-4 (the binary must already be built).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
VENV="$ROOT/target/e2e-venv"
REQS="$ROOT/tests/requirements.txt"
PYTHON=${PYTHON:-python3}

# as_root, apt_install
. "$ROOT/softhsm-setup/apt.sh"

section() { printf '\n======== %s ========\n' "$*"; }
failed_steps=()
started=$SECONDS
step_start=$SECONDS
step_done() { printf -- '-------- %s: %ds\n' "$1" $((SECONDS - step_start)); step_start=$SECONDS; }

section "1/5 SoftHSM2"
bash "$ROOT/softhsm-setup/install.sh"
# gcore (from gdb) dumps process memory for the root-key-material test.
if ! command -v gcore >/dev/null 2>&1; then
    apt_install gdb
fi
# MariaDB and its hashicorp_key_management plugin, for tests/e2e/test_tde_mariadb.py.
bash "$ROOT/tests/install-mariadb.sh"
step_done "SoftHSM2"

section "2/5 Python venv ($VENV)"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    rm -rf "$VENV"
    mkdir -p "$ROOT/target"
    if ! "$PYTHON" -m venv "$VENV"; then
        echo "python venv failed; installing python3-venv" >&2
        apt_install python3-venv
        rm -rf "$VENV"
        "$PYTHON" -m venv "$VENV"
    fi
fi
# Reinstall only when the requirements changed.
stamp="$VENV/.requirements.sha256"
want=$(sha256sum "$REQS" | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q --upgrade pip
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$REQS"
    echo "$want" >"$stamp"
fi
"$VENV/bin/python" -m pip check
"$VENV/bin/aws" --version
"$VENV/bin/aws-encryption-cli" --version
step_done "venv"

if [ "${HSMKMS_SKIP_CARGO:-0}" != "1" ]; then
    section "3/5 cargo build --workspace --all-targets"
    cargo build --workspace --all-targets
    step_done "cargo build"

    section "4/5 cargo test --workspace"
    # A failing Rust test does not stop the run: the end-to-end tests still run, and the
    # summary at the end names every step that failed.
    if ! cargo test --workspace --no-fail-fast; then
        failed_steps+=("cargo test")
    fi
    step_done "cargo test"
else
    section "3-4/5 cargo build/test skipped (HSMKMS_SKIP_CARGO=1)"
fi

section "5/5 end-to-end: pytest tests/e2e"
if [ ! -x "$ROOT/target/debug/hsmkms" ] && [ -z "${HSMKMS_BIN:-}" ]; then
    echo "target/debug/hsmkms was not built" >&2
    exit 1
fi
set +e
"$VENV/bin/python" -m pytest -q "$ROOT/tests/e2e" "$@"
rc=$?
set -e
step_done "pytest"
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure" >&2
    failed_steps+=("pytest (no tests collected)")
elif [ "$rc" -ne 0 ]; then
    failed_steps+=("pytest tests/e2e (exit $rc)")
fi

if [ "${#failed_steps[@]}" -ne 0 ]; then
    printf '\nFAILED after %ds:' $((SECONDS - started)) >&2
    printf ' [%s]' "${failed_steps[@]}" >&2
    printf '\n' >&2
    exit 1
fi
printf '\nall tests passed in %ds\n' $((SECONDS - started))
