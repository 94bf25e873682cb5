#!/usr/bin/env bash
# Installs SoftHSM2 (Debian package softhsm2; opensc for pkcs11-tool) if it is missing, and
# optionally writes a private SoftHSM2 configuration.
#
#   bash softhsm-setup/install.sh          # install only
#   bash softhsm-setup/install.sh DIR      # install, then write DIR/softhsm2.conf (tokens in DIR/tokens)
#
# Idempotent: running it again changes nothing. It never touches the system-wide token directory
# (/var/lib/softhsm/tokens) or /etc/softhsm/softhsm2.conf. Tokens are initialised by
# `hsmkms dev --data-dir DIR`, not here.
set -euo pipefail

MODULE=/usr/lib/softhsm/libsofthsm2.so

log() { printf 'softhsm-setup: %s\n' "$*" >&2; }
# as_root, apt_install
. "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

install_packages() {
    local pkgs=(softhsm2)
    # pkcs11-tool is handy for looking inside a token; optional.
    if ! command -v pkcs11-tool >/dev/null 2>&1; then
        pkgs+=(opensc)
    fi
    if ! apt_install "${pkgs[@]}"; then
        log "could not install ${pkgs[*]}: install SoftHSM2 2.6.x so that $MODULE exists"
        exit 1
    fi
}

if [ -e "$MODULE" ]; then
    log "SoftHSM2 present: $MODULE"
else
    install_packages
    if [ ! -e "$MODULE" ]; then
        log "installed softhsm2 but $MODULE is still missing"
        exit 1
    fi
fi

if command -v softhsm2-util >/dev/null 2>&1; then
    log "$(softhsm2-util --version 2>/dev/null | head -n1 | sed 's/^/softhsm2-util version /')"
fi

if [ "$#" -ge 1 ] && [ -n "$1" ]; then
    dir=$1
    mkdir -p "$dir/tokens"
    chmod 700 "$dir" "$dir/tokens"
    dir=$(cd "$dir" && pwd -P)
    conf="$dir/softhsm2.conf"
    want="# Written by softhsm-setup/install.sh: a private SoftHSM2 configuration.
directories.tokendir = $dir/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false"
    if [ -f "$conf" ] && [ "$(cat "$conf")" = "$want" ]; then
        log "configuration unchanged: $conf"
    else
        printf '%s\n' "$want" >"$conf.tmp"
        mv "$conf.tmp" "$conf"
        log "wrote $conf"
    fi
    cat <<EOF
SOFTHSM2_CONF=$conf
PKCS11_MODULE=$MODULE
TOKEN_DIR=$dir/tokens
# Use it:   export SOFTHSM2_CONF=$conf
# Tokens:   hsmkms dev --data-dir DIR initialises its own token; by hand:
#           SOFTHSM2_CONF=$conf softhsm2-util --init-token --free --label NAME
# Look:     SOFTHSM2_CONF=$conf pkcs11-tool --module $MODULE --list-slots
EOF
else
    cat <<EOF
PKCS11_MODULE=$MODULE
# For a private token directory run: bash softhsm-setup/install.sh DIR
# (hsmkms dev --data-dir DIR writes its own DIR/softhsm2.conf and token.)
EOF
fi
