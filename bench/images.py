"""Benchmark: a new package set built in full vs installed as a layer over the cached base image, in one run.

    sudo .venv/bin/python bench/images.py [--packages gnupg,curl] [--releases trixie,bookworm] [--rounds 1]
    sudo .venv/bin/python bench/images.py --copy [--rounds 3]
    sudo .venv/bin/python bench/images.py --memory [--packages gnupg,curl] [--rounds 3]

The builds go to a temporary directory (removed at the end); each release's base image comes from the usual
cache (built first if missing). On the base, two ways: from the package lists the base's build kept (as the cache
builds a package set) and with apt-get update first (as before they were kept; what a base built before does).
Prints the wall time of each and whether the full build and the layer hold the same packages.

--copy times what a build on the base copied before package sets became layers, the base image: one ``cp -a``
vs staging.copy_tree (parts copied by eight cp at once), alternated, each right after 300 MB written to the same
disk (what a build leaves behind it, not yet written back), and prints the medians and their ratio.

--memory times whole builds as the cache makes them, in memory (a tmpfs, copied to the disk when done: the
default) vs on the disk (``HARDEN_BUILD_MEMORY=0``), alternated: the base image of each release, then the package
set on it. Prints the medians and their ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pytest_systemd_harden.in_tree import InTree
from pytest_systemd_harden.machine.images import (
    BASE_PACKAGES,
    ImageCache,
    _customize,
    install_on_base,
    installed_versions,
)
from pytest_systemd_harden.machine.staging import copy_tree, remove_tree
from pytest_systemd_harden.spec.releases import DEFAULT_RELEASE


def installed(rootfs: Path) -> set[str]:
    # Read from the dpkg database, never by running the tree's dpkg-query: a package's code never runs as host root.
    return set(installed_versions(rootfs))


def full_and_on_base(extra: tuple[str, ...], release: str, scratch: Path) -> tuple[float, float, float, bool, int]:
    """Build ``extra`` on ``release`` three ways under ``scratch``: (full build s, on the cached base from its kept
    package lists s, on the cached base with apt-get update first s, same packages, how many)."""
    base = ImageCache().get((), release=release)
    folder = Path(tempfile.mkdtemp(prefix=f"{release}-", dir=scratch))
    # The full build: mmdebstrap with every package, as the cache made every image before.
    full_rootfs = folder / f"full-{folder.name}" / "rootfs"  # the builder's cgroup is named after its folder
    full_rootfs.parent.mkdir()
    started = time.monotonic()
    ImageCache(scratch)._run_builder(full_rootfs.parent, full_rootfs, sorted(set(BASE_PACKAGES) | set(extra)),
                                     release, (), lambda line: None)
    _customize(InTree(full_rootfs))
    full = time.monotonic() - started
    layer = folder / "base" / "layer"  # a layer over the base, as the cache makes a package set's image
    layer.parent.mkdir()
    started = time.monotonic()
    packages = set(install_on_base(base.rootfs, layer, extra))
    on_base = time.monotonic() - started
    updated = folder / "updated" / "layer"  # the same, its package lists downloaded again (as before they were kept)
    updated.parent.mkdir()
    no_lists = folder / "no-lists"
    no_lists.mkdir()
    started = time.monotonic()
    install_on_base(base.rootfs, updated, extra, lists=no_lists)
    on_base_updated = time.monotonic() - started
    return full, on_base, on_base_updated, installed(full_rootfs) == packages, len(packages)


def copies(release: str, rounds: int, scratch: Path) -> None:
    """cp -a vs copy_tree of ``release``'s base image, alternated, each after fresh writes (see the docstring)."""
    base = ImageCache().get((), release=release).rootfs
    times: dict[str, list[float]] = {"cp -a": [], "copy_tree": []}
    for round_ in range(rounds):
        for way, target in (("cp -a", scratch / f"cp-{round_}"), ("copy_tree", scratch / f"parts-{round_}")):
            subprocess.run(["sync"], check=True)
            with open(scratch / "written", "wb") as written:  # what a build leaves: not yet on the disk
                written.writelines(os.urandom(1 << 20) for _ in range(300))
            started = time.monotonic()
            if way == "cp -a":
                subprocess.run(["cp", "-a", str(base), str(target)], check=True)
            else:
                copy_tree(base, target)
            times[way].append(time.monotonic() - started)
            print(f"round {round_ + 1}: {way} {times[way][-1]:.2f} s", flush=True)
            (scratch / "written").unlink()
            remove_tree(target)
    one, parts = statistics.median(times["cp -a"]), statistics.median(times["copy_tree"])
    print(f"{release} base image copy: cp -a {one:.2f} s, copy_tree {parts:.2f} s (medians of {rounds}), "
          f"ratio {parts / one:.2f}")


def in_memory_vs_on_disk(release: str, extra: tuple[str, ...], rounds: int, scratch: Path) -> None:
    """A base image and ``extra`` on it, built by the cache in memory and on the disk, alternated (see above)."""
    times: dict[tuple[str, str], list[float]] = {}
    for round_ in range(rounds):
        for way, memory in (("in memory", ""), ("on the disk", "0")):
            os.environ["HARDEN_BUILD_MEMORY"] = memory
            cache = ImageCache(Path(tempfile.mkdtemp(prefix="cache-", dir=scratch)))
            for what, packages in (("base", ()), ("+ " + ", ".join(extra), extra)):
                subprocess.run(["sync"], check=True)
                started = time.monotonic()
                cache.get(packages, release=release)
                times.setdefault((what, way), []).append(time.monotonic() - started)
                print(f"{release} round {round_ + 1}: {what} {way} {times[what, way][-1]:.1f} s", flush=True)
            remove_tree(cache.cache_dir)
    os.environ.pop("HARDEN_BUILD_MEMORY")
    for what in dict.fromkeys(what for what, _ in times):
        memory, disk = statistics.median(times[what, "in memory"]), statistics.median(times[what, "on the disk"])
        print(f"{release} {what}: in memory {memory:.1f} s, on the disk {disk:.1f} s (medians of {rounds}), "
              f"ratio {memory / disk:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packages", default="gnupg,curl", help="the extra package set (default: gnupg,curl)")
    parser.add_argument("--releases", default=DEFAULT_RELEASE, help=f"comma-separated (default: {DEFAULT_RELEASE})")
    parser.add_argument("--rounds", type=int, default=None,
                        help="builds each way, alternating (default 1; with --copy, copies each way, default 3)")
    parser.add_argument("--copy", action="store_true", help="time the base image's copy only (see above)")
    parser.add_argument("--memory", action="store_true", help="builds in memory vs on the disk (see above)")
    args = parser.parse_args()
    extra = tuple(sorted(args.packages.split(",")))
    scratch = Path(tempfile.mkdtemp(prefix="harden-bench-images-", dir="/var/tmp"))
    try:
        if args.memory:
            for release in args.releases.split(","):
                in_memory_vs_on_disk(release, extra, args.rounds or 3, scratch)
            return 0
        if args.copy:
            for release in args.releases.split(","):
                copies(release, args.rounds or 3, scratch)
            return 0
        for release in args.releases.split(","):
            full, on_base, updated = [], [], []
            for round_ in range(args.rounds or 1):
                one_full, one_on_base, one_updated, same, count = full_and_on_base(extra, release, scratch)
                full.append(one_full)
                on_base.append(one_on_base)
                updated.append(one_updated)
                print(f"{release} round {round_ + 1}: full {one_full:.1f} s, on the base {one_on_base:.1f} s "
                      f"(apt-get update first: {one_updated:.1f} s), same packages: {same} ({count})", flush=True)
            full_s, on_base_s, updated_s = (statistics.median(times) for times in (full, on_base, updated))
            print(f"{release}: {', '.join(extra)}: full build {full_s:.1f} s, on the cached base {on_base_s:.1f} s "
                  f"(ratio {on_base_s / full_s:.2f}); with apt-get update first {updated_s:.1f} s (ratio "
                  f"{updated_s / full_s:.2f}); kept lists / update first: {on_base_s / updated_s:.2f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
