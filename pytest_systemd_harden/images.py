"""Debian root filesystems for the test machines: built once per package set, cached, never modified.

A machine boots its image with ``--volatile=overlay``, so the cached tree is shared read-only by every
container, run and xdist worker. Builds happen under a lock, into a temporary directory renamed into place only
when complete, so a concurrent or interrupted build never leaves a half-made image behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import BackendUnavailable, ImageBuildError

# Bump when the recipe below changes, so old caches are not reused for a different image.
RECIPE_VERSION = 3
SUITE = "bookworm"
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "libnss-systemd", "python3", "iproute2", "procps",
                 "strace")  # strace: tighten observes what the scenarios use in one traced run
# Units a test machine has no use for: they slow the boot or wake up during a run.
MASKED_UNITS = (
    "console-getty.service", "getty@.service", "container-getty@.service", "apt-daily.timer",
    "apt-daily-upgrade.timer", "e2scrub_all.timer", "dpkg-db-backup.timer", "fstrim.timer",
    "systemd-tmpfiles-clean.timer",
)
HOSTNAME = "harden"

Progress = Callable[[str], None]


def default_cache_dir() -> Path:
    explicit = os.environ.get("HARDEN_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "pytest-systemd-harden"


def default_mirror() -> str:
    return os.environ.get("HARDEN_MIRROR", "http://deb.debian.org/debian")


@dataclass(frozen=True)
class Image:
    """A built root filesystem and what went into it."""

    key: str
    rootfs: Path
    packages: tuple[str, ...]


class ImageCache:
    """Builds and finds images under ``cache_dir/images/<key>/rootfs``."""

    def __init__(self, cache_dir: Path | None = None, mirror: str | None = None) -> None:
        self.cache_dir = cache_dir or default_cache_dir()
        self.mirror = mirror or default_mirror()

    @staticmethod
    def key_for(packages: Iterable[str]) -> str:
        wanted = sorted(set(BASE_PACKAGES) | set(packages))
        text = json.dumps({"recipe": RECIPE_VERSION, "suite": SUITE, "packages": wanted}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def path_for(self, packages: Iterable[str]) -> Path:
        return self.cache_dir / "images" / self.key_for(packages)

    def get(self, packages: Iterable[str], progress: Progress = lambda line: None) -> Image:
        """The image with ``packages`` on top of the base set, built first if it is not cached."""
        extra = tuple(sorted(set(packages)))
        key = self.key_for(extra)
        final = self.cache_dir / "images" / key
        if (final / "rootfs" / "usr" / "lib" / "systemd" / "systemd").exists():
            return Image(key, final / "rootfs", extra)
        final.parent.mkdir(parents=True, exist_ok=True)
        with open(final.parent / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be building the same image
            if not (final / "rootfs" / "usr" / "lib" / "systemd" / "systemd").exists():
                self._build(final, extra, progress)
        return Image(key, final / "rootfs", extra)

    def _build(self, final: Path, extra: tuple[str, ...], progress: Progress) -> None:
        staging = final.with_name(f"{final.name}.building-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        rootfs = staging / "rootfs"
        packages = sorted(set(BASE_PACKAGES) | set(extra))
        label = "base image" + (f" + {', '.join(extra)}" if extra else "")
        progress(f"building {label} ({SUITE}, {len(packages)} packages) into {final}")
        started = time.monotonic()
        try:
            builder = self._run_builder(rootfs, packages, progress)
            _customize(rootfs)
            (staging / "manifest.json").write_text(json.dumps({
                "suite": SUITE, "packages": packages, "builder": builder, "mirror": self.mirror,
                "recipe": RECIPE_VERSION, "seconds": round(time.monotonic() - started, 1),
            }, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        progress(f"built {label} in {time.monotonic() - started:.0f}s")

    def _run_builder(self, rootfs: Path, packages: list[str], progress: Progress) -> str:
        if shutil.which("mmdebstrap"):
            command = ["mmdebstrap", "--variant=minbase", f"--include={','.join(packages)}", SUITE, str(rootfs),
                       self.mirror]
        elif shutil.which("debootstrap"):
            command = ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}", SUITE, str(rootfs),
                       self.mirror]
        else:
            raise BackendUnavailable("neither mmdebstrap nor debootstrap is installed: apt-get install mmdebstrap")
        tail: list[str] = []
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace") as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip()
                tail = [*tail[-29:], line]
                if line.startswith(("I:", "E:", "W:")):
                    progress(f"  {command[0]}: {line}")
        if proc.returncode != 0:
            raise ImageBuildError(f"{command[0]} failed (exit status {proc.returncode}) building {rootfs}:\n"
                               + "\n".join(tail)
                               + "\nhint: is every package name a Debian bookworm package? Is the mirror "
                               f"{self.mirror} reachable? (set HARDEN_MIRROR to use another)")
        return command[0]


def _customize(rootfs: Path) -> None:
    """Make the tree boot fast and quietly as a container."""
    (rootfs / "etc" / "hostname").write_text(HOSTNAME + "\n")
    machine_id = rootfs / "etc" / "machine-id"
    machine_id.write_text("")  # every boot gets a fresh one
    units = rootfs / "etc" / "systemd" / "system"
    units.mkdir(parents=True, exist_ok=True)
    for unit in MASKED_UNITS:
        link = units / unit
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to("/dev/null")
