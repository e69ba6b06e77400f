"""Benchmark: a new package set built in full vs installed on a copy of the cached base image, in one run.

    sudo .venv/bin/python bench/images.py [--packages gnupg,curl] [--rounds 1]

Both builds go to a temporary directory (removed at the end); the base image comes from the usual cache (built
first if missing). Prints the wall time of each and whether both trees hold the same packages.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pytest_systemd_harden.images import BASE_PACKAGES, ImageCache, _customize, install_on_base


def installed(rootfs: Path) -> set[str]:
    listed = subprocess.run(["chroot", str(rootfs), "dpkg-query", "-W", "-f", "${Package}\n"], capture_output=True,
                            text=True, check=True)
    return set(listed.stdout.split())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packages", default="gnupg,curl", help="the extra package set (default: gnupg,curl)")
    parser.add_argument("--rounds", type=int, default=1, help="builds each way, alternating (default 1)")
    args = parser.parse_args()
    extra = tuple(sorted(args.packages.split(",")))
    base = ImageCache().get(())
    scratch = Path(tempfile.mkdtemp(prefix="harden-bench-images-", dir="/var/tmp"))
    full, on_base = [], []
    try:
        for round_ in range(args.rounds):
            # The full build: mmdebstrap with every package, as the cache made every image before.
            full_rootfs = scratch / f"full-{round_}" / "rootfs"
            full_rootfs.parent.mkdir(parents=True)
            started = time.monotonic()
            ImageCache(scratch)._run_builder(full_rootfs, sorted(set(BASE_PACKAGES) | set(extra)), lambda line: None)
            _customize(full_rootfs)
            full.append(time.monotonic() - started)

            target = scratch / f"base-{round_}" / "rootfs"
            target.parent.mkdir(parents=True)
            started = time.monotonic()
            install_on_base(base.rootfs, target, extra)
            _customize(target)
            on_base.append(time.monotonic() - started)
            same = installed(full_rootfs) == installed(target)
            print(f"round {round_ + 1}: full {full[-1]:.1f} s, on the base {on_base[-1]:.1f} s, "
                  f"same packages: {same} ({len(installed(target))})", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{', '.join(extra)}: full build {statistics.median(full):.1f} s, on the cached base "
          f"{statistics.median(on_base):.1f} s, ratio {statistics.median(on_base) / statistics.median(full):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
