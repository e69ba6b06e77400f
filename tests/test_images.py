"""The image cache's keys, the archive's state and the versions an image records; a new package set built on
the cached base image, and the machine it makes booting."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_systemd_harden.errors import SpecError
from pytest_systemd_harden.in_tree import InTree
from pytest_systemd_harden.machine import images
from pytest_systemd_harden.machine.backends.base import Machine
from pytest_systemd_harden.machine.images import ImageCache, boot_masks, installed_versions
from pytest_systemd_harden.spec.load import load_spec
from pytest_systemd_harden.spec.machine import MachineConfig
from pytest_systemd_harden.spec.releases import DEFAULT_RELEASE
from pytest_systemd_harden.unit.pool import MachinePool


def test_the_key_follows_release_packages_deb_content_and_archive(tmp_path: Path) -> None:
    deb = tmp_path / "app_1.0_all.deb"
    deb.write_bytes(b"version 1.0")
    key = ImageCache.key_for(["gnupg"], "trixie", [str(deb)], "state-a")
    assert key == ImageCache.key_for(["gnupg"], "trixie", [str(deb)], "state-a")
    assert key != ImageCache.key_for(["gnupg"], "bookworm", [str(deb)], "state-a")
    assert key != ImageCache.key_for(["gnupg", "curl"], "trixie", [str(deb)], "state-a")
    assert key != ImageCache.key_for(["gnupg"], "trixie", [str(deb)], "state-b")  # a new upload to the archive
    deb.write_bytes(b"version 1.1")  # the same file name, rebuilt
    assert key != ImageCache.key_for(["gnupg"], "trixie", [str(deb)], "state-a")


def test_the_archive_is_asked_once_per_max_age_and_its_last_state_serves_offline(tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []
    answers = iter(["s1", "s2", "s3"])

    def fetch(self: ImageCache, release: str) -> str:
        asked.append(release)
        return next(answers)

    monkeypatch.setattr(ImageCache, "_fetch_archive_state", fetch)
    assert ImageCache(tmp_path).archive_state("trixie") == "s1"
    assert ImageCache(tmp_path).archive_state("trixie") == "s1"  # a new run within the max age: no look-up
    assert asked == ["trixie"]
    record = tmp_path / "archive" / "trixie.json"
    record.write_text(json.dumps({"state": "s1", "checked": time.time() - 8 * 86400}))
    assert ImageCache(tmp_path).archive_state("trixie") == "s2"  # older than 7 days: asked again
    assert ImageCache(tmp_path, refresh=True).archive_state("trixie") == "s3"  # --harden-refresh-images: asked now
    assert asked == ["trixie"] * 3

    def offline(self: ImageCache, release: str) -> str:
        raise OSError("Network is unreachable")

    monkeypatch.setattr(ImageCache, "_fetch_archive_state", offline)
    said: list[str] = []
    assert ImageCache(tmp_path, refresh=True).archive_state("trixie", said.append) == "s3"
    assert "could not read the trixie archive's state (Network is unreachable); using the state seen" in said[0]


def test_sources_include_updates_and_security_where_the_release_has_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HARDEN_SECURITY_MIRROR", raising=False)
    cache = ImageCache(Path("/nonexistent"), "http://deb.debian.org/debian")
    assert cache.sources("trixie") == ["deb http://deb.debian.org/debian trixie main",
                                       "deb http://deb.debian.org/debian trixie-updates main",
                                       "deb http://deb.debian.org/debian-security trixie-security main"]
    assert cache.sources("sid") == ["deb http://deb.debian.org/debian sid main"]
    local = ImageCache(Path("/nonexistent"), "http://127.0.0.1:8000/debian")
    assert local.sources("bookworm") == ["deb http://127.0.0.1:8000/debian bookworm main",
                                         "deb http://127.0.0.1:8000/debian bookworm-updates main"]


def test_installed_versions_reads_the_image_dpkg_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "_native_architecture", lambda: "amd64")
    status = tmp_path / "var" / "lib" / "dpkg" / "status"
    status.parent.mkdir(parents=True)
    status.write_text("Package: systemd\nStatus: install ok installed\nArchitecture: amd64\nVersion: 257.9-1\n"
                      "Description: x\n multi-line: not a field\n\n"
                      "Package: busybox-static\nStatus: install ok installed\nArchitecture: i386\nVersion: 1:1.37-1\n\n"
                      "Package: gone\nStatus: deinstall ok config-files\nArchitecture: amd64\nVersion: 1\n\n"
                      "Package: tzdata\nStatus: install ok installed\nArchitecture: all\nVersion: 2025b\n")
    assert installed_versions(tmp_path) == {"systemd": "257.9-1", "busybox-static:i386": "1:1.37-1",
                                            "tzdata": "2025b"}


def spec_at(tmp_path: Path, machine: str) -> Path:
    path = tmp_path / "harden.yaml"
    path.write_text("service:\n  exec_start: /bin/sleep infinity\nmachine:\n" + machine)
    return path


def test_machine_release_and_debs_in_the_spec(tmp_path: Path) -> None:
    (tmp_path / "build").mkdir()
    for name in ("app_1.1_all.deb", "app-doc_1.1_all.deb"):
        (tmp_path / "build" / name).write_bytes(b"!<arch>")
    spec = load_spec(spec_at(tmp_path, "  release: trixie\n  debs: [build/*.deb]\n"
                                       "  packages: [busybox-static:i386]\n"))
    assert spec.machine.release == "trixie"
    assert spec.machine.debs == (str(tmp_path / "build" / "app-doc_1.1_all.deb"),
                                 str(tmp_path / "build" / "app_1.1_all.deb"))
    assert spec.machine.packages == ("busybox-static:i386",)
    unpinned = load_spec(spec_at(tmp_path, "  packages: [curl]\n"))
    assert unpinned.machine.release == "" and unpinned.releases == ()  # the session's (--harden-release)
    both = load_spec(spec_at(tmp_path, "  release: [bookworm, trixie]\n"))
    assert both.releases == ("bookworm", "trixie") and both.machine.release == ""


@pytest.mark.parametrize(("machine", "message"), [
    ("  release: trixy\n", "harden.yaml:4: machine.release: unknown Debian release 'trixy' (did you mean trixie?)"),
    ("  debs: [build/*.deb]\n", "harden.yaml:4: machine.debs[0]: 'build/*.deb' matches no file (paths are relative to"),
    ("  debs: [app.tar]\n", "harden.yaml:4: machine.debs[0]: 'app.tar' is not a .deb file"),
    ("  debs: app.deb\n", "harden.yaml:4: machine.debs: expected a list of .deb files"),
])
def test_bad_release_and_debs_are_one_line_errors(tmp_path: Path, machine: str, message: str) -> None:
    with pytest.raises(SpecError) as raised:
        load_spec(spec_at(tmp_path, machine))
    assert str(raised.value).startswith(str(tmp_path / message.split(":")[0]) + ":" + message.split(":", 1)[1]), \
        str(raised.value)


def test_a_tree_is_marked_updated_as_of_its_usr_once(tmp_path: Path) -> None:
    from pytest_systemd_harden.machine.images import _customize

    for folder in ("usr", "etc", "var"):
        (tmp_path / folder).mkdir()
    os.utime(tmp_path / "usr", ns=(1_700_000_000_123_456_789,) * 2)
    _customize(InTree(tmp_path))
    for marker in (tmp_path / "etc/.updated", tmp_path / "var/.updated"):
        assert marker.stat().st_mtime_ns == 1_700_000_000_123_456_789
        assert marker.read_text().endswith("\nTIMESTAMP_NSEC=1700000000123456789\n")
    written = (tmp_path / "etc/.updated").stat().st_ino
    _customize(InTree(tmp_path))  # a layer over a base marked so already: nothing copied up
    assert (tmp_path / "etc/.updated").stat().st_ino == written
    os.utime(tmp_path / "usr", ns=(1_800_000_000_000_000_000,) * 2)  # a package set changed /usr itself
    _customize(InTree(tmp_path))
    assert (tmp_path / "var/.updated").stat().st_mtime_ns == 1_800_000_000_000_000_000


def test_apt_verdict_names_what_cannot_be_installed() -> None:
    from pytest_systemd_harden.machine.images import apt_verdict

    lines = ["The following packages have unmet dependencies:",
             " harden-demo : Depends: harden-no-such-package but it is not installable",
             "E: Unable to locate package gnupgg", "E: Unable to correct problems, you have held broken packages."]
    assert apt_verdict(lines) == ("harden-demo : Depends: harden-no-such-package but it is not installable; "
                                  "Unable to locate package gnupgg")
    assert apt_verdict(["I: success"]) == ""


def test_a_new_package_set_is_installed_on_the_cached_base_image_and_boots(
        machine: Machine, harden_pool: MachinePool, tmp_path: Path) -> None:
    base = harden_pool.image_cache.path_for(())  # built: the machine fixture booted it
    # This cache has the base (and the archive state it was built from), not the package set.
    (tmp_path / "archive").mkdir()
    (tmp_path / "archive" / f"{DEFAULT_RELEASE}.json").write_text(
        (harden_pool.image_cache.cache_dir / "archive" / f"{DEFAULT_RELEASE}.json").read_text())
    cache = ImageCache(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / base.name).symlink_to(base)
    lines: list[str] = []
    pool = MachinePool(image_cache=cache, progress=lines.append)
    try:
        with_curl = pool.machine_for(MachineConfig(packages=("curl",), backend="nspawn"))
        result = with_curl.run(["curl", "--version"])
        assert result.ok, result.describe()
        # The machine sees one tree, as on a host: a file of the layer and one of the base, each with one link and
        # owned by root; what it writes stays in its own writable layer.
        seen = with_curl.run(["sh", "-c", "stat -c '%h %U %n' /usr/bin/curl /usr/bin/dpkg && echo x >> /etc/hostname"])
        assert seen.stdout.split("\n")[:2] == ["1 root /usr/bin/curl", "1 root /usr/bin/dpkg"], seen.describe()
        # It booted as a host boots once its packages are installed: no offline-update unit ran (what they would
        # make, the packages' triggers and postinsts made; see images._customize).
        updates = ["ldconfig", "systemd-journal-catalog-update", "systemd-sysusers", "systemd-update-done"]
        ran = with_curl.run(["systemctl", "show", "-P", "ConditionResult", *(f"{u}.service" for u in updates)])
        assert ran.stdout.split() == ["no"] * 4, ran.describe()
    finally:
        pool.close()
    built = cache.path_for(("curl",))
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["builder"] == f"apt on the cached base image {base.name}", lines
    assert manifest["base"] == base.name
    assert manifest["versions"]["curl"]  # the versions are read from the image, however it was built
    # The image is a layer over its base: what apt added, not a copy of the base's files.
    layer = built / "layer"
    assert (layer / "usr/bin/curl").is_file() and not (layer / "usr/lib/systemd/systemd").exists()
    assert len(list(layer.rglob("*"))) * 5 < len(list((base / "rootfs").rglob("*")))
    assert not list((built / "rootfs").iterdir())  # where a machine joins them, in its own mount namespace
    marks = {name for entry in [layer, *layer.rglob("*")] for name in os.listxattr(entry, follow_symlinks=False)
             if name.startswith("trusted.overlay.")}
    assert marks <= {"trusted.overlay.opaque"}, marks  # nothing of the build's overlay but what readers need
    tree, base_tree = cache.get(("curl",)).tree(), InTree(base / "rootfs")
    assert tree.read_text("etc/hostname") == "harden\n"  # the machine's write stayed in the machine
    assert not tree.is_file("usr/sbin/policy-rc.d")  # services start again in the booted machine
    assert tree.kind("var/cache/harden-debs") is None
    assert not tree.names("var/lib/apt/lists", "*Packages*")
    assert tree.is_link("etc/resolv.conf") == base_tree.is_link("etc/resolv.conf")
    assert tree.kind("etc/resolv.conf") == base_tree.kind("etc/resolv.conf")
    if base_tree.is_file("etc/resolv.conf"):
        assert tree.read_bytes("etc/resolv.conf") == base_tree.read_bytes("etc/resolv.conf")
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()  # /proc was mounted in a private namespace


def test_cache_list_marks_superseded_images_and_prune_spares_one_in_use(tmp_path: Path) -> None:
    import fcntl
    import os

    from pytest_systemd_harden.machine.images import cached_images, prune

    def image(key: str, built: float, packages: list[str], used_days_ago: float = 0) -> Path:
        folder = tmp_path / "images" / key
        (folder / "rootfs" / "usr" / "lib" / "systemd").mkdir(parents=True)
        (folder / "rootfs" / "usr" / "lib" / "systemd" / "systemd").write_text("")
        manifest = folder / "manifest.json"
        manifest.write_text(json.dumps({"release": "trixie", "packages": packages, "debs": [], "built": built}))
        used = time.time() - used_days_ago * 86400
        os.utime(manifest, (used, used))
        return folder

    old = image("aaaa", 1.0, ["curl"])
    new = image("bbbb", 2.0, ["curl"])
    stale = image("cccc", 3.0, ["gnupg"], used_days_ago=40)
    in_use = image("dddd", 0.5, ["curl"])
    listed = {i.key: i for i in cached_images(tmp_path)}
    assert [k for k, i in listed.items() if i.superseded] == ["dddd", "aaaa"]  # oldest first
    assert listed["bbbb"].release == "trixie" and listed["bbbb"].packages == ("curl",)
    with open(tmp_path / "images" / "dddd.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_SH)  # what a running session does with each image it booted
        said: list[str] = []
        removed = prune(tmp_path, unused_days=30, progress=said.append)
    assert sorted(i.key for i in removed) == ["aaaa", "cccc"]
    assert not old.exists() and not stale.exists() and new.exists() and in_use.exists()
    assert "kept dddd: a run is using it" in said


def test_a_layer_is_whole_only_over_its_base_and_prune_keeps_the_base_of_a_kept_layer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_systemd_harden.machine.images import _complete, cached_images, prune

    def image(key: str, built: float, packages: list[str], used_days_ago: float = 0, base: str = "") -> Path:
        folder = tmp_path / "images" / key
        if base:
            (folder / "layer" / "usr" / "bin").mkdir(parents=True)
            (folder / "rootfs").mkdir()
        else:
            (folder / "rootfs" / "usr" / "lib" / "systemd").mkdir(parents=True)
            (folder / "rootfs" / "usr" / "lib" / "systemd" / "systemd").write_text("")
        manifest = folder / "manifest.json"
        manifest.write_text(json.dumps({"release": "trixie", "packages": packages, "debs": [], "built": built,
                                        **({"base": base} if base else {})}))
        used = time.time() - used_days_ago * 86400
        os.utime(manifest, (used, used))
        return folder

    old_base = image("00000000000000aa", 1.0, [], used_days_ago=40)  # superseded, and unused for long
    layer = image("00000000000000bb", 2.0, ["curl"], base="00000000000000aa")  # kept: used today
    new_base = image("00000000000000cc", 3.0, [])
    stale = image("00000000000000dd", 1.5, ["gnupg"], used_days_ago=40, base="00000000000000cc")
    assert _complete(layer) and _complete(new_base)
    assert not _complete(image("00000000000000ee", 4.0, ["x"], base="../../etc"))  # a base is a key, no path
    assert not _complete(image("00000000000000ff", 4.0, ["y"], base="0000000000000099"))  # its base is gone
    listed = {i.key: i for i in cached_images(tmp_path)}
    assert listed["00000000000000bb"].base == "00000000000000aa" and listed["00000000000000cc"].base is None
    said: list[str] = []
    removed = prune(tmp_path, unused_days=30, progress=said.append)
    # The stale layer goes, the old base stays under the layer kept; the new base was never stale.
    assert [i.key for i in removed] == ["00000000000000dd"], said
    assert old_base.exists() and layer.exists() and new_base.exists() and not stale.exists()
    assert "kept 00000000000000aa: the base of 00000000000000bb" in said
    monkeypatch.setattr(images, "on_overlayfs", lambda path: True)  # the cache restored into a container
    assert not _complete(layer) and _complete(new_base)  # a layer there cannot be booted: built again, in full
    monkeypatch.undo()
    shutil.rmtree(layer)
    assert [i.key for i in prune(tmp_path, unused_days=30)] == ["00000000000000aa"]  # no longer under a layer


def test_host_root_reads_a_layered_image_as_the_machine_sees_it(tmp_path: Path) -> None:
    # A layer over its base, as a build leaves it: a file added, one removed (a whiteout), a directory replaced
    # (opaque). Read through the kernel's overlay, in a keeper's mount namespace: never mounted on the host.
    from pytest_systemd_harden.machine.images import layers_tree, on_overlayfs

    base, layer, mount_point = tmp_path / "base", tmp_path / "layer", tmp_path / "rootfs"
    for folder in (base / "etc/conf.d", base / "usr/bin", layer / "etc/conf.d", layer / "usr/bin", mount_point):
        folder.mkdir(parents=True)
    (base / "etc/a").write_text("base")
    (base / "etc/conf.d/old.conf").write_text("old")
    (base / "usr/bin/tool").write_text("tool")
    (layer / "etc/new").write_text("layer")
    (layer / "etc/conf.d/new.conf").write_text("new")
    os.setxattr(layer / "etc/conf.d", "trusted.overlay.opaque", b"y")
    os.mknod(layer / "usr/bin/tool", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    tree = layers_tree((layer, base), mount_point)
    assert tree.read_text("etc/a") == "base" and tree.read_text("etc/new") == "layer"
    assert tree.names("etc/conf.d") == ["new.conf"]  # the base's directory is hidden, not merged
    assert tree.kind("usr/bin/tool") is None
    assert layers_tree((layer, base), mount_point).root == tree.root  # one keeper per image, kept
    assert on_overlayfs(tree.root) and not on_overlayfs(tmp_path)
    assert str(mount_point) not in Path("/proc/self/mountinfo").read_text()
    assert layers_tree((base,), mount_point).read_text("usr/bin/tool") == "tool"  # one tree: itself
    shutil.rmtree(layer)  # the image removed, and built again under the same key: read as it is now
    (layer / "etc").mkdir(parents=True)
    (layer / "etc/new").write_text("again")
    assert layers_tree((layer, base), mount_point).read_text("etc/new") == "again"


def test_where_the_cache_is_on_an_overlayfs_a_package_set_is_built_in_full(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A container's own root (a Docker executor): a layer over a base there would be a third overlay at boot.
    monkeypatch.setattr(images, "on_overlayfs", lambda path: True)
    monkeypatch.setattr(ImageCache, "get", lambda *args, **kwargs: pytest.fail("no base is needed"))
    lines: list[str] = []
    assert ImageCache(tmp_path)._on_cached_base(tmp_path, ("curl",), DEFAULT_RELEASE, (), lines.append) is None
    assert lines == [("  building it in full: the cache is on an overlayfs (a container's own root?), and a layer "
                      "over a base there cannot be built (the build reads the base through an idmapped mount, which "
                      "overlayfs refuses: EINVAL)")]


def fake_rootfs(root: Path, status: str, lists: dict[str, list[str]], enabled: list[str]) -> Path:
    (root / "var/lib/dpkg/info").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text(status)
    for package, files in lists.items():
        (root / f"var/lib/dpkg/info/{package}.list").write_text("\n".join(files) + "\n")
    for link in enabled:
        path = root / "etc/systemd/system" / link
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to("/lib/systemd/system/" + path.name)
    return root


def installed(name: str, priority: str = "optional", depends: str = "", provides: str = "") -> str:
    return (f"Package: {name}\nStatus: install ok installed\nPriority: {priority}\nVersion: 1\n"
            + (f"Depends: {depends}\n" if depends else "") + (f"Provides: {provides}\n" if provides else "") + "\n")


def test_package_units_are_the_enabled_units_of_what_the_machine_section_brought(tmp_path: Path) -> None:
    status = "".join([
        installed("systemd", "important", depends="libc6, dbus-system-bus | default-dbus-system-bus"),
        installed("dbus-broker", provides="default-dbus-system-bus"),  # the base's dependency, through Provides
        installed("e2fsprogs", "required"),
        installed("memcached", depends="libc6 (>= 2.34), adduser"),
        installed("getty-extra", depends="systemd"),
    ])
    rootfs = fake_rootfs(tmp_path, status, {
        "systemd": ["/lib/systemd/system/systemd-pstore.service", "/lib/systemd/system/getty@.service"],
        "dbus-broker": ["/lib/systemd/system/dbus-broker.service"],
        "e2fsprogs": ["/lib/systemd/system/e2scrub_reap.service"],
        "memcached": ["/lib/systemd/system/memcached.service", "/usr/bin/memcached"],
        "getty-extra:amd64": ["/lib/systemd/system/extra@.service", "/lib/systemd/system/extra.timer"],
    }, ["sysinit.target.wants/systemd-pstore.service", "getty.target.wants/getty@tty1.service",
        "multi-user.target.wants/dbus-broker.service", "multi-user.target.wants/e2scrub_reap.service",
        "multi-user.target.wants/memcached.service", "multi-user.target.wants/extra@one.two.service",
        "timers.target.wants/extra.timer", "multi-user.target.wants/remote-fs.target"])
    assert images.package_units(rootfs) == ("extra.timer", "extra@one.two.service", "memcached.service")


def test_machine_services_keep_package_units_and_the_tested_unit_is_never_masked(tmp_path: Path) -> None:
    from pytest_systemd_harden.errors import MachineError
    from pytest_systemd_harden.spec.machine import MachineConfig

    rootfs = fake_rootfs(tmp_path, installed("dnsmasq") + installed("memcached"),
                         {"dnsmasq": ["/lib/systemd/system/dnsmasq.service"],
                          "memcached": ["/lib/systemd/system/memcached.service"]},
                         ["multi-user.target.wants/dnsmasq.service", "multi-user.target.wants/memcached.service"])
    assert boot_masks(MachineConfig(), rootfs) == ("dnsmasq.service", "memcached.service")
    assert boot_masks(MachineConfig(services=("dnsmasq.service",)), rootfs) == ("memcached.service",)
    assert boot_masks(MachineConfig(tested_unit="memcached.service"), rootfs) == ("dnsmasq.service",)
    with pytest.raises(MachineError, match=r"machine.services: dnsmsq.service is not a unit a package of this "
                                           r"machine enables at boot \(those are: dnsmasq.service, memcached"):
        boot_masks(MachineConfig(services=("dnsmsq.service",)), rootfs)


def test_what_the_tested_unit_needs_to_start_is_not_masked(tmp_path: Path) -> None:
    from pytest_systemd_harden.spec.machine import MachineConfig

    units = {
        "a.service": "[Unit]\nWants=helper.service\n[Service]\nExecStart=/bin/a\n",
        "a.socket": "[Socket]\nListenStream=/run/a\n",  # its own name's socket, not named in its file
        "feed.socket": "[Socket]\nListenStream=/run/feed\nService=a.service\nBindsTo=feed-helper.service\n",
        "feed-helper.service": "[Service]\nExecStart=/bin/f\n",
        "helper.service": "[Service]\nExecStart=/bin/h\n",
        "dropped.service": "[Service]\nExecStart=/bin/d\n",
        "other.service": "[Service]\nExecStart=/bin/o\n",
    }
    rootfs = fake_rootfs(tmp_path, installed("pkg"), {"pkg": [f"/lib/systemd/system/{u}" for u in units]},
                         [f"multi-user.target.wants/{u}" for u in units if u != "a.service"])
    (rootfs / "lib/systemd/system").mkdir(parents=True)
    for name, text in units.items():
        (rootfs / "lib/systemd/system" / name).write_text(text)
    # A drop-in that assigns Wants= empty and names another: systemd cannot reset a dependency list, so both count.
    (rootfs / "etc/systemd/system/a.service.d").mkdir(parents=True)
    (rootfs / "etc/systemd/system/a.service.d/x.conf").write_text("[Unit]\nWants=\nWants=dropped.service\n")
    # feed-helper is named by feed.socket's BindsTo= in [Socket]: no dependency systemd reads from there, so it stays
    # masked.
    assert boot_masks(MachineConfig(tested_unit="a.service"), rootfs) == ("feed-helper.service", "other.service")
    (rootfs / "etc/systemd/system/a.service.d/x.conf").write_text("[Unit]\nWants=dropped.service\n")
    (rootfs / "lib/systemd/system/feed.socket").write_text(
        "[Unit]\nBindsTo=feed-helper.service\n[Socket]\nService=a.service\n")
    assert boot_masks(MachineConfig(tested_unit="a.service"), rootfs) == ("other.service",)
    assert boot_masks(MachineConfig(), rootfs) == tuple(sorted(u for u in units if u != "a.service"))
    # A unit file of the spec's is not in the image: what its own file names counts (and what that needs in turn).
    (tmp_path / "mine.service").write_text("[Unit]\nRequires=helper.service\n[Service]\nExecStart=/bin/m\n")
    assert "helper.service" not in boot_masks(MachineConfig(tested_unit="mine.service",
                                                            tested_unit_file=str(tmp_path / "mine.service")), rootfs)
    assert "other.service" in boot_masks(MachineConfig(tested_unit="mine.service"), rootfs)


def test_machine_services_in_the_spec(tmp_path: Path) -> None:
    spec = load_spec(spec_at(tmp_path, "  packages: [dnsmasq]\n  services: [dnsmasq.service]\n"))
    assert spec.machine.services == ("dnsmasq.service",)
    assert spec.machine.tested_unit == ""
    with pytest.raises(SpecError, match=r"harden.yaml:6: machine.services\[0\]: 'dnsmasq' is not a unit name"):
        load_spec(spec_at(tmp_path, "  packages: [dnsmasq]\n  services:\n    - dnsmasq\n"))


def test_prepare_builds_missing_images_bases_first_several_at_once_and_remembers_a_failure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageCache, "_fetch_archive_state", lambda self, release: "s")
    spans: dict[str, tuple[float, float]] = {}

    def build(self: ImageCache, final: Path, extra: tuple[str, ...], release: str, debs: tuple[str, ...],
              progress: images.Progress) -> None:
        label = f"{release}+{','.join(extra)}"
        if extra:  # as _on_cached_base does: a package set is installed on its release's base, built first
            self.get((), release=release)
        started = time.monotonic()
        progress(f"  building {label}")
        time.sleep(0.3)
        spans[label] = (started, time.monotonic())
        if "broken" in extra:
            raise images.ImageBuildError("E: Unable to locate package broken")
        _made(final)

    monkeypatch.setattr(ImageCache, "_build", build)
    cache = ImageCache(tmp_path)
    cache.get((), release="bookworm")  # cached already: not built again
    spans.clear()
    lines: list[str] = []
    wanted = [images.ImageWanted("trixie", ("curl",)), images.ImageWanted("trixie", ("broken",)),
              images.ImageWanted("bookworm", ("gnupg",)), images.ImageWanted("trixie", ("curl",))]
    assert [one.describe() for one in cache.missing(wanted)] == [
        "Debian trixie base", "Debian trixie + curl", "Debian trixie + broken", "Debian bookworm + gnupg"]
    done = cache.prepare(wanted, lines.append, threads=2)
    assert [(one.describe(), error is not None) for one, error in done] == [
        ("Debian trixie base", False), ("Debian trixie + curl", False), ("Debian trixie + broken", True),
        ("Debian bookworm + gnupg", False)]
    assert sorted(spans) == ["bookworm+gnupg", "trixie+", "trixie+broken", "trixie+curl"]
    # The base first; then two package sets at once (their build times overlap), never more than two.
    assert all(spans["trixie+"][1] <= start for label, (start, _end) in spans.items() if label != "trixie+")
    assert spans["trixie+curl"][0] < spans["trixie+broken"][1] and spans["trixie+broken"][0] < spans["trixie+curl"][1]
    assert spans["bookworm+gnupg"][0] >= min(spans["trixie+curl"][1], spans["trixie+broken"][1])
    assert lines[0].startswith("4 image(s) to build, 2 at a time: Debian trixie base; Debian trixie + curl")
    assert "image 2/4 (Debian trixie + curl): building trixie+curl" in lines
    assert any(line.startswith("image 3/4 (Debian trixie + broken): failed: E: Unable to locate package broken")
               for line in lines)
    # The machine that needs the broken image gets its error, without a second build.
    spans.clear()
    with pytest.raises(images.ImageBuildError, match="Unable to locate package broken"):
        cache.get(("broken",), release="trixie")
    assert spans == {}
    assert cache.prepare(wanted, lines.append) == [(images.ImageWanted("trixie", ("broken",)), done[2][1])]


def _made(final: Path) -> None:
    """What a build leaves in ``final`` for images._complete to count it as an image built in full."""
    (final / "rootfs/usr/lib/systemd").mkdir(parents=True)
    (final / "rootfs/usr/lib/systemd/systemd").touch()
    (final / "manifest.json").write_text("{}")


def _until(condition: Callable[[], bool], seconds: float = 30.0) -> None:
    """Return once ``condition`` holds, or after ``seconds`` (the caller's assertion then says what did not)."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def _fake_build(spans: dict[str, tuple[float, float]], seconds: float = 0.2) -> object:
    """ImageCache._build without mmdebstrap: records when each image was built, ``seconds`` each."""
    def build(self: ImageCache, final: Path, extra: tuple[str, ...], release: str, debs: tuple[str, ...],
              progress: images.Progress) -> None:
        if extra:  # as _on_cached_base does: a package set is installed on its release's base, built first
            self.get((), release=release)
        started = time.monotonic()
        time.sleep(seconds)
        _made(final)
        spans[f"{release}+{','.join(extra)}"] = (started, time.monotonic())

    return build


@pytest.fixture
def fake_builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[ImageCache, dict[str, tuple[float, float]]]:
    """An image cache whose builds are :func:`_fake_build`'s (0.2 s each, no archive), and when each ran."""
    monkeypatch.setattr(ImageCache, "_fetch_archive_state", lambda self, release: "s")
    spans: dict[str, tuple[float, float]] = {}
    monkeypatch.setattr(ImageCache, "_build", _fake_build(spans))
    return ImageCache(tmp_path), spans


def test_prepare_one_at_a_time_builds_in_turn(fake_builds: tuple[ImageCache, dict[str, tuple[float, float]]]) -> None:
    cache, spans = fake_builds
    cache.prepare([images.ImageWanted("trixie"), images.ImageWanted("bookworm")], threads=1)
    assert len(spans) == 2 and spans["trixie+"][1] <= spans["bookworm+"][0]




def test_a_machine_waits_for_its_image_under_way_and_builds_one_not_started_itself(
        fake_builds: tuple[ImageCache, dict[str, tuple[float, float]]]) -> None:
    cache, spans = fake_builds
    lines: list[str] = []
    wanted = [images.ImageWanted("trixie", ("curl",)), images.ImageWanted("trixie", ("gnupg",)),
              images.ImageWanted("bookworm", ("memcached",))]
    started = time.monotonic()
    preparation = cache.start_preparing(wanted, lines.append, threads=1)
    assert time.monotonic() - started < 0.15, "start_preparing waited for a build"
    time.sleep(0.05)
    # Under way (the one build slot took the trixie base first): waited for, and said so.
    preparation.wait(images.ImageWanted("trixie"), lines.append)
    assert "trixie+" in spans and "waiting for image 1/5 (Debian trixie base), being built" in lines
    # Not started (the slot has moved on to the bookworm base): taken off the list, and built by the caller (once
    # its base is) beside the slot's next build, not behind the package sets queued ahead of it.
    waited = time.monotonic()
    preparation.wait(images.ImageWanted("bookworm", ("memcached",)), lines.append)
    assert time.monotonic() - waited < 0.1, "waited for a build not started"
    cache.get(("memcached",), release="bookworm")
    done = preparation.results()
    assert [one.describe() for one, error in done if error is None] == [
        "Debian trixie base", "Debian bookworm base", "Debian trixie + curl", "Debian trixie + gnupg"]  # not memcached
    assert spans["bookworm+memcached"][0] < spans["trixie+curl"][1]  # beside the slot's build
    assert spans["trixie+curl"][1] <= spans["trixie+gnupg"][0]  # the rest in the order given
    preparation.wait(images.ImageWanted("trixie", ("curl",)))  # built already: returns at once
    preparation.wait(images.ImageWanted("trixie", ("nothing-asked",)))  # not this preparation's: get() builds it


def test_machines_take_their_images_in_the_order_the_builds_finish(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The unit check before the first test boots a machine per unit spec: not behind a base still building
    # when another's is done (a fresh cache: bookworm's base takes longer than trixie's).
    monkeypatch.setattr(ImageCache, "_fetch_archive_state", lambda self, release: "s")
    spans: dict[str, tuple[float, float]] = {}
    quick, slow = _fake_build(spans, seconds=0.1), _fake_build(spans, seconds=0.6)
    monkeypatch.setattr(ImageCache, "_build", lambda self, final, extra, release, *rest: (
        slow if release == "bookworm" else quick)(self, final, extra, release, *rest))
    cache = ImageCache(tmp_path)
    bookworm, trixie, curl = (images.ImageWanted("bookworm"), images.ImageWanted("trixie"),
                              images.ImageWanted("trixie", ("curl",)))
    preparation = cache.start_preparing([bookworm, trixie, curl], threads=2)
    assert preparation.first_ready([bookworm, trixie]) == 1 and "trixie+" in spans and "bookworm+" not in spans
    assert preparation.first_ready([bookworm, curl]) == 1 and "bookworm+" not in spans  # curl: 0.1 s after trixie
    assert preparation.first_ready([bookworm]) == 0 and "bookworm+" in spans  # the last: waited for
    assert preparation.first_ready([images.ImageWanted("bookworm", ("gnupg",))]) == 0  # not its own: at once
    preparation.results()


def test_a_base_taken_off_with_its_package_set_is_not_waited_for_by_a_machine_needing_the_base_alone(
        fake_builds: tuple[ImageCache, dict[str, tuple[float, float]]]) -> None:
    # An xdist worker hung here: its first test took trixie + curl and the trixie base off the list, and the next
    # machine, booting the base alone, waited for a build nobody would make.
    cache, _spans = fake_builds
    preparation = cache.start_preparing([images.ImageWanted("bookworm"), images.ImageWanted("trixie", ("curl",))],
                                        threads=1)
    time.sleep(0.05)  # the one slot has the bookworm base
    preparation.wait(images.ImageWanted("trixie", ("curl",)))  # not started: the caller's, with its base
    waited = time.monotonic()
    preparation.wait(images.ImageWanted("trixie"))
    assert time.monotonic() - waited < 0.1, "waited for a base the preparation no longer builds"
    cache.get(("curl",), release="trixie")
    assert [one.describe() for one, _error in preparation.results()] == ["Debian bookworm base"]


def test_stopping_a_preparation_finishes_the_build_under_way_and_starts_no_other(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageCache, "_fetch_archive_state", lambda self, release: "s")
    spans: dict[str, tuple[float, float]] = {}
    monkeypatch.setattr(ImageCache, "_build", _fake_build(spans, seconds=0.3))
    cache = ImageCache(tmp_path)
    preparation = cache.start_preparing([images.ImageWanted("trixie"), images.ImageWanted("bookworm")], threads=1)
    time.sleep(0.1)
    preparation.stop()
    assert list(spans) == ["trixie+"]  # finished, not cut off; bookworm's never began
    assert images._complete(cache.path_for((), release="trixie"))
    preparation.wait(images.ImageWanted("bookworm"))  # not built by a stopped preparation: returns, get() builds it
    assert list(spans) == ["trixie+"]


@pytest.mark.parametrize("idmap", [None, "mount_setattr: Invalid argument"])
def test_the_pool_gives_each_image_a_user_namespaced_machine_boots_its_shifted_copy_as_it_is_built(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, idmap: str | None) -> None:
    from pytest_systemd_harden.machine import backends
    from pytest_systemd_harden.machine.backends import userns

    monkeypatch.setattr(ImageCache, "_fetch_archive_state", lambda self, release: "s")
    monkeypatch.setattr(ImageCache, "_build", _fake_build({}))
    monkeypatch.setattr(backends, "check_available", lambda name: None)
    monkeypatch.setattr(userns, "idmap_refused", lambda rootfs: idmap)  # whether this filesystem can be idmapped
    shifted: list[tuple[Path, int]] = []

    def shift(rootfs: Path, base: int) -> Path:
        shifted.append((rootfs, base))
        return rootfs

    monkeypatch.setattr(userns, "shifted_rootfs", shift)
    pool = MachinePool(image_cache=ImageCache(tmp_path), backend="nspawn")
    preparation = pool.start_preparing_images([MachineConfig(packages=("curl",)),
                                               MachineConfig(packages=("dnsmasq",), privileged=True)])
    assert preparation is not None
    preparation.results()
    curl = pool.image_cache.get(("curl",), release=DEFAULT_RELEASE)
    if idmap is None:
        assert shifted == []  # booted through an idmapped mount: no copy to make
    else:
        assert shifted == [(curl.rootfs, userns.base_for(curl.key))]  # not the base's, nor the privileged machine's


def test_the_session_starts_the_images_of_its_collected_specs_before_the_first_test(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_systemd_harden.errors import BackendUnavailable
    from pytest_systemd_harden.machine import backends

    asked: list[tuple[list[images.ImageWanted], int, bool]] = []

    def start_preparing(self: ImageCache, wanted: list[images.ImageWanted], progress: images.Progress, *,
                        threads: int, rotate: int, then: object, background: bool) -> images.Preparation:
        asked.append((list(wanted), threads, background))
        return images.Preparation(self, [], progress, threads=threads)

    def no_start(self: MachinePool, spec: object, *, start: bool = True) -> object:
        assert asked, "an image was needed before prepare_images ran"
        raise BackendUnavailable("not booted in this test")

    monkeypatch.setattr(ImageCache, "start_preparing", start_preparing)
    monkeypatch.setattr(ImageCache, "missing", lambda self, wanted: [])
    monkeypatch.setattr(MachinePool, "service_for", no_start)
    monkeypatch.setattr(backends, "check_available", lambda name: None)
    service = "service:\n  exec_start: /bin/sleep infinity\n"
    pytester.makefile(".yaml", **{"harden": service + "machine:\n  packages: [curl, gnupg]\n",
                                  "harden-old": service + "machine:\n  release: bookworm\n"})
    pytester.makeini("[pytest]\nharden_spec_files = harden*.yaml\n")
    result = pytester.runpytest_inprocess("--harden-backend=nspawn", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=2)
    assert len(asked) == 1
    wanted, threads, background = asked[0]
    assert background  # a serial session: builds nobody waits for yet take the CPU its tests leave idle
    assert sorted(wanted, key=repr) == [images.ImageWanted("bookworm"),
                                        images.ImageWanted(DEFAULT_RELEASE, ("curl", "gnupg"))]
    assert threads == min(os.cpu_count() or 1, 4)
    assert pytester.runpytest_inprocess("--harden-backend=nspawn", "--collect-only").ret == 0
    assert len(asked) == 1  # collecting only builds nothing


def test_where_images_must_be_built_directories_run_as_their_images_will_be_ready_unit_checks_first(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_systemd_harden.errors import BackendUnavailable
    from pytest_systemd_harden.machine import backends

    built = {"all": True}

    def start_preparing(self: ImageCache, wanted: list[images.ImageWanted], progress: images.Progress, *,
                        threads: int, rotate: int, then: object, background: bool) -> images.Preparation:
        return images.Preparation(self, [], progress, threads=threads)

    def no_machine(self: MachinePool, config: MachineConfig) -> object:
        raise BackendUnavailable("not booted in this test")

    monkeypatch.setattr(ImageCache, "start_preparing", start_preparing)
    monkeypatch.setattr(ImageCache, "_fetch_archive_state", lambda self, release: "s")
    monkeypatch.setattr(images, "_complete", lambda final: built["all"])
    monkeypatch.setattr(MachinePool, "machine_for", no_machine)
    monkeypatch.setattr(backends, "check_available", lambda name: None)
    service = "service:\n  exec_start: /bin/sleep infinity\n"
    for name, machine in (("a_curl", "machine:\n  packages: [curl]\n"), ("b_base", ""),
                          ("c_unit", "machine:\n  packages: [memcached]\n")):
        pytester.mkdir(name)
        body = service if name != "c_unit" else "service:\n  unit: memcached.service\n"
        pytester.path.joinpath(name, "harden.yaml").write_text(body + machine)
    pytester.path.joinpath("b_base", "test_plain.py").write_text("def test_plain():\n    pass\n")
    pytester.mkdir("d_python")
    pytester.path.joinpath("d_python", "test_other.py").write_text("def test_other():\n    pass\n")

    def order() -> list[str]:
        result = pytester.runpytest_inprocess("--harden-backend=nspawn", "-p", "no:cacheprovider", "-v")
        return list(dict.fromkeys(re.findall(r"^(\w+)/\S+::", result.stdout.str(), re.MULTILINE)))

    assert order() == ["a_curl", "b_base", "c_unit", "d_python"]  # all cached: as collected
    built["all"] = False  # a fresh cache: the base, then memcached (its unit is checked before the first test)
    assert order() == ["b_base", "c_unit", "a_curl", "d_python"]


def test_a_tree_copied_in_parts_is_what_cp_a_makes(tmp_path: Path) -> None:
    # Cut into parts of at most 3 entries, a tree with what an image holds (setuid bits, a file capability, an ACL,
    # hard links within and across parts, symlinks, a device node, a fifo, empty directories, owners, old times)
    # copies to the same listing, link counts and extended attributes as one `cp -a`.
    from pytest_systemd_harden.machine.staging import copy_tree

    source = tmp_path / "rootfs"
    for folder in ("usr/bin", "usr/lib/x", "usr/share/doc/a", "var/log/journal", "empty"):
        (source / folder).mkdir(parents=True)
    for number in range(7):
        (source / "usr/share/doc/a" / f"f{number}").write_text(str(number))
    perl = source / "usr/bin/perl"
    perl.write_text("perl")
    os.link(perl, source / "usr/bin/perl5")  # the same part
    os.link(perl, source / "usr/lib/x/perl-elsewhere")  # another part
    os.chmod(perl, 0o4755)
    os.setxattr(source / "usr/share/doc/a/f1", "security.capability",
                struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0))
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in (
        (1, 7, 0xFFFFFFFF), (4, 5, 0xFFFFFFFF), (8, 5, 4), (16, 5, 0xFFFFFFFF), (32, 5, 0xFFFFFFFF)))
    os.setxattr(source / "var/log/journal", "system.posix_acl_default", acl)
    os.chown(source / "var/log/journal", 0, 101)
    (source / "bin").symlink_to("usr/bin")
    os.mknod(source / "usr/lib/x/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkfifo(source / "usr/lib/x/fifo")
    for path in sorted(source.rglob("*"), key=lambda p: -len(p.parts)):
        os.utime(path, (1700000000, 1700000000), follow_symlinks=False)

    def listing(root: Path) -> list[tuple[object, ...]]:
        rows = []
        for path in [root, *sorted(root.rglob("*"))]:
            st = os.lstat(path)
            names = [] if path.is_symlink() else sorted(os.listxattr(path, follow_symlinks=False))
            rows.append((str(path.relative_to(root)), st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_size,
                         st.st_mtime_ns, st.st_rdev, [(n, os.getxattr(path, n, follow_symlinks=False)) for n in names]))
        return rows

    subprocess.run(["cp", "-a", str(source), str(tmp_path / "by-cp")], check=True)
    copy_tree(source, tmp_path / "in-parts", jobs=4, whole=3)
    assert listing(tmp_path / "in-parts") == listing(tmp_path / "by-cp")
    copied = tmp_path / "in-parts"
    assert os.stat(copied / "usr/lib/x/perl-elsewhere").st_ino == os.stat(copied / "usr/bin/perl").st_ino


def test_a_build_s_output_reaches_the_terminal_without_its_control_sequences() -> None:
    # A package's script prints what it likes; the user's terminal must not take it as commands (a title, a cleared
    # screen, a rewritten line).
    shown: list[str] = []
    returncode, tail = images._run_contained(
        ["printf", "I: \\033]0;owned\\007unpacking\\033[2J\\rdone\\n"], f"harden-test-output-{os.getpid()}",
        shown.append, lambda line: line)
    assert returncode == 0 and tail == ["I: ?]0;owned?unpacking?done"] and shown == tail
    # A line without end (a script printing /dev/zero) is cut, not held: the test process's memory is the host's.
    returncode, tail = images._run_contained(
        ["sh", "-c", "head -c 10000000 /dev/zero | tr '\\0' x; echo; echo after"],
        f"harden-test-output-{os.getpid()}", lambda line: None, lambda line: None)
    assert returncode == 0 and tail == ["x" * 4096 + " [...]", "after"], [line[-20:] for line in tail]


def _deep_tree(top: Path, levels: int) -> None:
    """``top``/d/d/d/... ``levels`` directories deep, made by descriptors (its paths outgrow PATH_MAX)."""
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(levels):
        os.mkdir("d", dir_fd=fd)
        below = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = below
    os.close(fd)


def test_a_tree_too_deep_to_walk_fails_the_build_in_one_line_and_is_removed(tmp_path: Path) -> None:
    # A package's script can leave directories nested thousands deep: a walk by path or by recursion (taking the
    # tree back, removing it) would fail, and a staging directory nobody can remove would stop every later build.
    from pytest_systemd_harden.errors import ImageBuildError
    from pytest_systemd_harden.machine.build_sandbox import take_back
    from pytest_systemd_harden.machine.staging import check_shape, remove_tree

    shallow = tmp_path / "shallow"
    _deep_tree(shallow, 40)
    check_shape(shallow)  # as deep as a real tree gets: no error
    deep = tmp_path / "deep"
    _deep_tree(deep, 2500)  # 2 bytes a level: 5,000 bytes, past PATH_MAX
    with pytest.raises(ImageBuildError) as raised:
        take_back(deep, 0x70000000)
    assert "deeper than 256 directories" in str(raised.value).splitlines()[0], raised.value
    remove_tree(deep)
    assert not deep.exists()


def test_a_build_that_fills_its_memory_is_built_again_on_the_disk(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # A package set larger than the tmpfs a build gets (an eighth of the host's memory) still gets its image.
    from pytest_systemd_harden.machine import build_sandbox

    monkeypatch.setattr(ImageCache, "_fetch_archive_state", lambda self, release: "s")
    monkeypatch.setattr(images, "_customize", lambda rootfs: None)
    monkeypatch.setattr(images, "installed_versions", lambda rootfs: {"systemd": "257"})
    memory: list[int] = []

    def builder(self: ImageCache, staging: Path, rootfs: Path, *args: object, **kwargs: object) -> str:
        memory.append(build_sandbox.build_memory())
        if len(memory) == 1:
            raise build_sandbox.MemoryFilled("the build filled the 0.5 GiB of memory it runs in (a tmpfs, "
                                             "$HARDEN_BUILD_MEMORY); hint: ...")
        rootfs.mkdir()
        return "mmdebstrap"

    monkeypatch.setattr(ImageCache, "_run_builder", builder)
    monkeypatch.setenv(build_sandbox.MEMORY_ENV, "1G")
    lines: list[str] = []
    image = ImageCache(tmp_path).get([], lines.append, release="trixie")
    assert image.rootfs.is_dir() and memory == [1 << 30, 0], memory
    assert "  the build filled the 0.5 GiB of memory it runs in (a tmpfs, $HARDEN_BUILD_MEMORY): building it again " \
        "on the disk" in lines, lines
    assert build_sandbox.build_memory() == 1 << 30  # only that build


def test_a_build_nobody_waits_for_runs_in_the_background_until_a_machine_waits_for_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Images are built while the first tests run; one no machine waits for yet takes only the CPU they leave idle,
    # and gets its share from the moment one does (the example suite's fresh run: section 9 of docs/performance.md).
    monkeypatch.setattr(ImageCache, "_fetch_archive_state", lambda self, release: "s")
    calls: dict[str, list[bool]] = {}  # each build step's set_background calls, by image
    started = {label: threading.Event() for label in ("trixie+", "bookworm+", "trixie+curl")}
    go = threading.Event()

    class Step:  # a process tree of a build (cgroups.Contained)
        def __init__(self, label: str) -> None:
            self.label = label

        def set_background(self, background: bool) -> None:
            calls[self.label].append(background)

    def build(self: ImageCache, final: Path, extra: tuple[str, ...], release: str, debs: tuple[str, ...],
              progress: images.Progress) -> None:
        label = f"{release}+{','.join(extra)}"
        if extra:
            self.get((), release=release)
        priority = images._BUILD_PRIORITY.get()
        assert priority is not None, "a preparation's build without its priority"
        step = Step(label)
        calls[label] = []
        priority.started(step)
        started[label].set()
        assert go.wait(30)
        priority.ended(step)
        _made(final)

    monkeypatch.setattr(ImageCache, "_build", build)
    cache = ImageCache(tmp_path)
    trixie, bookworm, curl = (images.ImageWanted("trixie"), images.ImageWanted("bookworm"),
                              images.ImageWanted("trixie", ("curl",)))
    preparation = cache.start_preparing([trixie, bookworm, curl], threads=2)
    assert started["trixie+"].wait(30) and started["bookworm+"].wait(30)
    assert calls == {"trixie+": [True], "bookworm+": [True]}  # nobody waits for either yet
    assert preparation.first_ready([curl]) == 0  # not started yet: it will not start in the background
    waiter = threading.Thread(target=preparation.wait, args=(bookworm,))
    waiter.start()
    _until(lambda: calls["bookworm+"] != [True])
    assert calls == {"trixie+": [True, False], "bookworm+": [True, False]}  # curl's base, and the one waited for
    go.set()
    waiter.join(30)
    preparation.results()
    assert calls["trixie+curl"] == []  # started for a machine that waits: never in the background
    assert images._BUILD_PRIORITY.get() is None  # a caller's own build is never lowered

    # Stopped (the session ends): what is under way is waited for, and so raised. Under xdist (background=False),
    # a worker may wait for another's build, which no wait of its own could raise: nothing is lowered there.
    calls.clear()
    go.clear()
    for event in started.values():
        event.clear()
    stopped = ImageCache(tmp_path / "stopped").start_preparing([trixie], threads=1)
    assert started["trixie+"].wait(30) and calls == {"trixie+": [True]}
    stopper = threading.Thread(target=stopped.stop)
    stopper.start()
    _until(lambda: calls["trixie+"] != [True])
    assert calls == {"trixie+": [True, False]}
    go.set()
    stopper.join(30)
    calls.clear()
    foreground = ImageCache(tmp_path / "xdist").start_preparing([bookworm], threads=1, background=False)
    foreground.results()
    assert calls == {"bookworm+": []}


def test_a_base_s_build_keeps_only_apt_s_list_files_and_leaves_its_lock(tmp_path: Path) -> None:
    lists = tmp_path / "rootfs" / "var" / "lib" / "apt" / "lists"
    (lists / "partial").mkdir(parents=True)
    for name in ("lock", "deb.debian.org_debian_dists_trixie_InRelease", "auxfile-of-a-script",
                 "deb.debian.org_debian_dists_trixie_main_binary-amd64_Packages"):
        (lists / name).write_text(name)
    images._keep_package_lists(InTree(tmp_path / "rootfs"), tmp_path / "apt-lists")
    assert sorted(path.name for path in (tmp_path / "apt-lists").iterdir()) == [
        "deb.debian.org_debian_dists_trixie_InRelease", "deb.debian.org_debian_dists_trixie_main_binary-amd64_Packages"]
    assert sorted(path.name for path in lists.iterdir()) == ["auxfile-of-a-script", "lock", "partial"]


def test_a_file_written_atomically_has_its_mode_before_it_is_there(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The machine's generator is bound into a machine as soon as it is in the cache: an xdist worker's rename must
    # never put a file there that is not executable yet.
    from pytest_systemd_harden.machine.staging import write_atomically

    modes: list[int] = []
    replace = Path.replace

    def watched(self: Path, target: Path) -> Path:
        modes.append(self.stat().st_mode & 0o777)
        return replace(self, target)

    monkeypatch.setattr(Path, "replace", watched)
    write_atomically(tmp_path / "boot-generator", "#!/bin/sh\n", mode=0o755)
    assert modes == [0o755]
    assert [p.name for p in tmp_path.iterdir()] == ["boot-generator"]


def test_an_error_a_maintainer_script_prints_but_survives_is_shown_in_the_progress() -> None:
    from pytest_systemd_harden.machine.images import script_error

    said = "Error: could not create default cluster. Please create it manually with"  # postgresql-17's postinst
    assert script_error(said) == f"  a maintainer script said: {said}"
    assert script_error("Setting up libgpg-error0:amd64 (1.51-4) ...") is None
    assert script_error("Unpacking libgpg-error0:amd64 (1.51-4) ...") is None
