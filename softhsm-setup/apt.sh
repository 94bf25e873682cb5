# Sourced (not run) by the installers: softhsm-setup/install.sh, tests/install-mariadb.sh and
# tests/run.sh. Debian packages through apt-get, as root or through sudo.
#
#   . softhsm-setup/apt.sh
#   as_root CMD [ARG...]      # CMD as root: directly when root, through sudo otherwise
#   apt_install PKG...        # apt-get update, then apt-get install PKG... (no recommends)
#
# Both return non-zero on failure (a caller with `set -e` stops there). Messages go to stderr
# through the caller's `log` function when it has one.

_apt_log() {
    if declare -F log >/dev/null; then
        log "$*"
    else
        printf 'apt: %s\n' "$*" >&2
    fi
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        _apt_log "need root (or sudo) to run: $*"
        return 1
    fi
}

apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        _apt_log "apt-get not found; install $* by hand"
        return 1
    fi
    _apt_log "installing $* with apt-get"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq || return
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "$@" >/dev/null
}
