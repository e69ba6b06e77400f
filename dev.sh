#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine and run the example suite or the tests.
#   sudo ./dev.sh examples   # the example hardening suite on the default (nspawn) backend (installs only that)
#   sudo ./dev.sh test       # the plugin's own tests (pure logic + real containers + VMs + the HTML report)
# Extra arguments go to pytest. Needs root: systemd-nspawn boots real containers.
set -euo pipefail
cd "$(dirname "$0")"

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "dev.sh: run as root (sudo ./dev.sh $*): systemd-nspawn needs it" >&2
        exit 2
    fi
}

# What a job needs, and nothing more: the main job (examples) boots containers from an image it builds; the
# plugin's own tests also render the HTML report in a browser and boot VMs, which alone take most of a fresh
# machine's setup time (chromium, qemu-system-x86).
install_system_packages() {
    local job=$1 missing=()
    command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
    command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)  # builds the image
    python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
    if [ "$job" = test ]; then
        command -v pgrep >/dev/null || missing+=(procps)  # tests check that no machine is left running
        command -v chromium >/dev/null || missing+=(chromium)  # the HTML report's test renders it in a real browser
        command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)  # the qemu backend
        command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)  # makes the VM disk
        command -v cc >/dev/null || missing+=(gcc libc6-dev)  # a test builds a setuid helper of its own
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        # mmdebstrap checks Debian's archive with this keyring (absent on Ubuntu). Named only when missing: apt
        # upgrades a package it is asked for, and an installed ca-certificates' upgrade alone took seconds of
        # certificate rehashing on a fresh machine that needed neither.
        installed debian-archive-keyring || missing+=(debian-archive-keyring)
        installed ca-certificates || missing+=(ca-certificates)
        echo "dev.sh: installing ${missing[*]}"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
}

installed() {
    dpkg-query -W -f '${Status}' "$1" 2>/dev/null | grep -q ' installed$'
}

# examples: the plugin and its runtime dependencies; test: also the dev tools (xdist, mypy, ruff).
install_python_packages() {
    local job=$1
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
    fi
    # An editable install from pyproject.toml needs pip 21.3 or later; a newer one is not worth the download.
    if ! .venv/bin/python -c 'import sys, pip; sys.exit(tuple(map(int, pip.__version__.split(".")[:2])) < (21, 3))'
    then
        .venv/bin/python -m pip install -q --upgrade pip
    fi
    if [ "$job" = test ]; then
        .venv/bin/python -m pip install -q -e '.[dev]'
    else
        .venv/bin/python -m pip install -q -e .
    fi
    # An editable install leaves the plugin's own modules uncompiled, and where PYTHONDONTWRITEBYTECODE is set (CI
    # images often set it) every Python process compiled them again: ~0.17 s per pytest or systemd-harden started.
    # Only what changed is compiled again; a stale file is never used (Python checks each against its source).
    .venv/bin/python -m compileall -q pytest_systemd_harden
}

# Both at once where the virtualenv can be made before apt runs: pip (about 10 s) then costs nothing beside apt's
# downloads and dpkg (about 15 s on a fresh machine), which use neither the same files nor, mostly, the same core.
install_packages() {
    local job=$1 pip
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
        install_system_packages "$job"  # python3-venv among them
        install_python_packages "$job"
        return
    fi
    install_python_packages "$job" &
    pip=$!
    # If apt fails, the script stops with its error, once pip is done: nothing is left installing behind it.
    trap "wait $pip 2>/dev/null || true" EXIT
    install_system_packages "$job"
    wait "$pip"
    trap - EXIT
}

command=${1:-}
shift || true
case "$command" in
    examples)
        need_root "$command"; install_packages examples
        exec .venv/bin/python -m pytest -p no:cacheprovider --harden-require-backend -v examples "$@"
        ;;
    test)
        need_root "$command"; install_packages test
        exec .venv/bin/python -m pytest --harden-require-backend tests "$@"
        ;;
    *)
        echo "usage: sudo ./dev.sh examples|test [pytest arguments]" >&2
        exit 2
        ;;
esac
