"""Images: a new package set is built on the cached base image, and the machine it makes boots."""

from __future__ import annotations

import json
from pathlib import Path

from pytest_systemd_harden.backends.base import Machine, MachineConfig
from pytest_systemd_harden.images import ImageCache
from pytest_systemd_harden.pool import MachinePool


def test_a_new_package_set_is_installed_on_the_cached_base_image_and_boots(
        machine: Machine, harden_pool: MachinePool, tmp_path: Path) -> None:
    base = harden_pool.image_cache.path_for(())  # built: the machine fixture booted it
    cache = ImageCache(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / base.name).symlink_to(base)  # this cache has the base, not the package set
    lines: list[str] = []
    pool = MachinePool(image_cache=cache, progress=lines.append)
    try:
        with_curl = pool.machine_for(MachineConfig(packages=("curl",), backend="nspawn"))
        result = with_curl.run(["curl", "--version"])
        assert result.ok, result.describe()
    finally:
        pool.close()
    built = cache.path_for(("curl",))
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["builder"] == f"apt on the cached base image {base.name}", lines
    rootfs = built / "rootfs"
    assert not (rootfs / "usr/sbin/policy-rc.d").exists()  # services start again in the booted machine
    assert not list((rootfs / "var/lib/apt/lists").glob("*Packages*"))
    base_resolv, resolv = base / "rootfs/etc/resolv.conf", rootfs / "etc/resolv.conf"
    assert resolv.is_symlink() == base_resolv.is_symlink() and resolv.exists() == base_resolv.exists()
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()  # /proc was mounted in a private namespace
