#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine and run the example suite or the tests.
#   sudo ./dev.sh examples   # the example hardening suite on the default (nspawn) backend
#   sudo ./dev.sh test       # the plugin's own tests (pure logic + real containers)
# Extra arguments go to pytest. Needs root: systemd-nspawn boots real containers.
set -euo pipefail
cd "$(dirname "$0")"

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "dev.sh: run as root (sudo ./dev.sh $*): systemd-nspawn needs it" >&2
        exit 2
    fi
}

install_system_packages() {
    local missing=()
    command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
    command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
    command -v pgrep >/dev/null || missing+=(procps)
    command -v chromium >/dev/null || missing+=(chromium)  # the HTML report's test renders it in a real browser
    command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)  # the qemu backend
    command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)  # makes the VM disk
    python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "dev.sh: installing ${missing[*]}"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
            debian-archive-keyring ca-certificates
    fi
}

install_python_packages() {
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
    fi
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[dev]'
}

command=${1:-}
shift || true
case "$command" in
    examples)
        need_root "$command"; install_system_packages; install_python_packages
        exec .venv/bin/python -m pytest -p no:cacheprovider --harden-require-backend -v examples "$@"
        ;;
    test)
        need_root "$command"; install_system_packages; install_python_packages
        exec .venv/bin/python -m pytest --harden-require-backend tests "$@"
        ;;
    *)
        echo "usage: sudo ./dev.sh examples|test [pytest arguments]" >&2
        exit 2
        ;;
esac
