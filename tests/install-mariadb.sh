#!/usr/bin/env bash
# Installs MariaDB and its HashiCorp Vault key-management plugin from Debian's packages, for the
# TDE end-to-end test (tests/e2e/test_tde_mariadb.py), if they are missing.
#
#   bash tests/install-mariadb.sh
#
# Idempotent: when mariadbd, mariadb-install-db, the mariadb client and the plugin are present it
# changes nothing (no apt-get update). The packages' own service (the system-wide mariadbd on
# /var/lib/mysql, port 3306) is kept from starting during the install and stopped if it runs: the
# test starts private mariadbd processes of its own (own datadir, port, socket, pid file, user
# mysql) and needs nothing from it.
set -euo pipefail

PACKAGES=(mariadb-server mariadb-client mariadb-plugin-hashicorp-key-management)

log() { printf 'install-mariadb: %s\n' "$*" >&2; }
# as_root, apt_install
. "$(dirname "${BASH_SOURCE[0]}")/../softhsm-setup/apt.sh"

plugin_so() {
    local dir
    for dir in /usr/lib/mysql/plugin /usr/lib/x86_64-linux-gnu/mariadb*/plugin \
        /usr/lib/*/mariadb*/plugin; do
        if [ -e "$dir/hashicorp_key_management.so" ]; then
            echo "$dir/hashicorp_key_management.so"
            return 0
        fi
    done
    return 1
}

have_all() {
    command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ] || return 1
    command -v mariadb-install-db >/dev/null 2>&1 || return 1
    command -v mariadb >/dev/null 2>&1 || return 1
    command -v mariadb-admin >/dev/null 2>&1 || return 1
    plugin_so >/dev/null || return 1
    id mysql >/dev/null 2>&1 || return 1
}

# The packaged service (Debian's config: datadir /var/lib/mysql, pid file /run/mysqld/mysqld.pid)
# is of no use to the test; make sure it is not running. Private test servers have pid files of
# their own and are never touched.
stop_system_service() {
    local pidfile=/run/mysqld/mysqld.pid pid
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        as_root systemctl disable --now mariadb >/dev/null 2>&1 || true
    fi
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile" 2>/dev/null || true)
    case "$pid" in '' | *[!0-9]*) return 0 ;; esac
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = mariadbd ]; then
        log "stopping the packaged mariadb service (pid $pid)"
        as_root kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 120); do
            [ -d "/proc/$pid" ] || break
            sleep 0.5
        done
        if [ -d "/proc/$pid" ]; then
            log "the packaged mariadbd (pid $pid) did not stop"
            exit 1
        fi
    fi
}

install_packages() {
    if ! command -v apt-get >/dev/null 2>&1; then
        log "apt-get not found; install ${PACKAGES[*]} (MariaDB 10.11 or later) by hand"
        exit 1
    fi
    # Keep the packages' maintainer scripts from starting the service (invoke-rc.d consults
    # policy-rc.d; exit 101 = action forbidden). Only if no policy is in place already.
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [ ! -e "$policy" ]; then
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' >$policy && chmod 755 $policy"
        made_policy=1
    fi
    local rc=0
    apt_install "${PACKAGES[@]}" || rc=$?
    if [ "$made_policy" -eq 1 ]; then
        as_root rm -f "$policy"
    fi
    if [ "$rc" -ne 0 ]; then
        log "apt-get failed ($rc)"
        exit "$rc"
    fi
}

start=$SECONDS
if have_all; then
    log "MariaDB present: $(mariadbd --version 2>/dev/null || /usr/sbin/mariadbd --version)"
else
    install_packages
    if ! have_all; then
        log "installed ${PACKAGES[*]} but something is still missing"
        exit 1
    fi
    log "installed in $((SECONDS - start))s: $(mariadbd --version 2>/dev/null || /usr/sbin/mariadbd --version)"
fi
stop_system_service
log "plugin: $(plugin_so)"
