"""Host root's way into a built tree (pytest_systemd_harden.in_tree): links resolve inside the tree, never on the host.

A maintainer script can leave any link in the tree it builds; host root then reads and writes the tree. Each case
here is a link a build could leave, pointing at a host directory of the test's own (world-writable, so only the
resolution stops a write).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pytest_systemd_harden.in_tree import InTree
from pytest_systemd_harden.spec.unit_file import unit_files_in


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A directory standing for the host's files, with a file the tree must never reach."""
    outside = tmp_path / "host"
    outside.mkdir(mode=0o1777)
    (outside / "secret").write_text("the host's\n")
    return outside


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "usr/lib/systemd/system").mkdir(parents=True)
    (root / "etc").mkdir()
    return root


def test_a_link_out_of_the_tree_is_followed_inside_it(tree: Path, host: Path) -> None:
    (tree / "etc" / "hostname").symlink_to(host / "hostname")  # absolute: the host's path
    (tree / "etc" / "secret").symlink_to(host / "secret")
    (tree / "var").mkdir()
    (tree / "var" / "up").symlink_to("../../../..")  # climbs above the tree
    in_tree = InTree(tree)
    in_tree.write_text("etc/hostname", "harden\n")
    assert not (host / "hostname").exists()
    assert (tree / "etc/hostname").read_text() == "harden\n" and not (tree / "etc/hostname").is_symlink()
    assert in_tree.kind("etc/secret") is None  # the host's file is not there as the machine sees it
    with pytest.raises(FileNotFoundError):
        in_tree.read_text("etc/secret")
    assert in_tree.names("var/up") == ["etc", "usr", "var"]  # `..` stops at the tree's top


def test_only_a_regular_file_of_bounded_size_is_read(tree: Path, tmp_path: Path) -> None:
    # What a build can leave where host root reads text: a pipe (a read that never returns), the tree's dev/zero
    # through a link (one that never ends), a sparse file of many gigabytes.
    (tree / "dev").mkdir()
    os.mknod(tree / "dev/zero", 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    (tree / "var/lib/dpkg").mkdir(parents=True)
    (tree / "var/lib/dpkg/status").symlink_to("/dev/zero")
    os.mkfifo(tree / "etc/hostname")
    with open(tree / "etc/huge", "wb") as huge:
        huge.truncate(8 << 30)
    (tree / "etc/os-release").write_text("ID=debian\n")
    in_tree = InTree(tree)
    for path in ("var/lib/dpkg/status", "etc/hostname", "dev/zero", "etc"):
        with pytest.raises(OSError, match="not a regular file"):
            in_tree.read_text(path)
    with pytest.raises(OSError, match="larger than"):
        in_tree.read_bytes("etc/huge")
    with pytest.raises(OSError, match="larger than"):
        in_tree.copy_out("etc/huge", tmp_path / "copied", limit=1 << 20)
    assert not (tmp_path / "copied").exists()
    assert in_tree.read_text("etc/os-release") == "ID=debian\n"
    in_tree.copy_out("etc/os-release", tmp_path / "copied")
    assert (tmp_path / "copied").read_text() == "ID=debian\n"


def test_a_tree_that_is_a_link_is_refused(tmp_path: Path, host: Path) -> None:
    # A build that left a link where its tree should be: host root must not take the host's directory for the tree.
    (tmp_path / "rootfs").symlink_to(host)
    in_tree = InTree(tmp_path / "rootfs")
    with pytest.raises(NotADirectoryError):
        in_tree.write_text("etc/hostname", "harden\n")
    with pytest.raises(NotADirectoryError):
        in_tree.read_text("secret")
    assert sorted(os.listdir(host)) == ["secret"]


def test_a_directory_linked_out_is_never_written_through(tree: Path, host: Path) -> None:
    (tree / "dev").symlink_to(host)
    (tree / "etc" / "systemd").mkdir()
    (tree / "etc" / "systemd" / "system").symlink_to(host)
    in_tree = InTree(tree)
    for write in (lambda: in_tree.mknod("dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3)),
                  lambda: in_tree.symlink("etc/systemd/system/x.timer", "/dev/null"),
                  lambda: in_tree.write_text("etc/systemd/system/x.service", "[Unit]\n"),
                  lambda: in_tree.mkdir("etc/systemd/system/x.wants")):
        with pytest.raises(OSError):
            write()
    in_tree.unlink("dev")  # the link itself
    assert sorted(os.listdir(host)) == ["secret"] and host.is_dir()


def test_writes_and_nodes_inside_the_tree(tree: Path) -> None:
    in_tree = InTree(tree)
    in_tree.mkdir("etc/systemd/system/multi-user.target.wants")
    in_tree.mkdir("usr/local/libexec")
    in_tree.write_text("usr/local/libexec/helper", "#!/bin/sh\n", mode=0o755)
    assert stat.S_IMODE((tree / "usr/local/libexec/helper").stat().st_mode) == 0o755
    in_tree.symlink("etc/systemd/system/multi-user.target.wants/a.service", "../a.service")
    in_tree.symlink("etc/systemd/system/multi-user.target.wants/a.service", "../b.service")  # replaced
    assert os.readlink(tree / "etc/systemd/system/multi-user.target.wants/a.service") == "../b.service"
    in_tree.mkdir("dev")
    in_tree.mknod("dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    st = os.lstat(tree / "dev/null")
    assert stat.S_ISCHR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o666 and st.st_rdev == os.makedev(1, 3)
    assert in_tree.real_path("usr/local/libexec/helper") == tree / "usr/local/libexec/helper"


def test_a_unit_alias_is_read_as_the_machine_reads_it(tree: Path, host: Path) -> None:
    # systemd's aliases are absolute links (/usr/lib/systemd/system/...): read on the host, they would be the
    # host's unit (or any host file the link names), not the image's.
    (tree / "usr/lib/systemd/system/real.service").write_text("[Service]\nExecStart=/bin/true\n")
    (tree / "usr/lib/systemd/system/alias.service").symlink_to("/usr/lib/systemd/system/real.service")
    (tree / "etc/systemd/system/evil.service.d").mkdir(parents=True)
    (tree / "usr/lib/systemd/system/evil.service").write_text("[Service]\n")
    (tree / "etc/systemd/system/evil.service.d/x.conf").symlink_to(host / "secret")
    assert unit_files_in(tree, "alias.service") == [
        ("/usr/lib/systemd/system/alias.service", "[Service]\nExecStart=/bin/true\n")]
    files = unit_files_in(tree, "evil.service")
    assert files is not None and "the host's" not in str(files)


def test_a_link_is_given_away_and_read_itself_never_what_it_points_to(tree: Path, host: Path) -> None:
    (tree / "etc").mkdir(exist_ok=True)
    (tree / "etc/resolv.conf").symlink_to(host / "secret")  # as a build may leave it
    inside = InTree(tree)
    inside.chown("etc/resolv.conf", 0x70000000, 0x70000000)
    assert os.lstat(tree / "etc/resolv.conf").st_uid == 0x70000000 and (host / "secret").stat().st_uid == 0
    assert inside.readlink("etc/resolv.conf") == str(host / "secret")
    (tree / "empty").mkdir()
    inside.rmdir("empty")
    inside.rmdir("empty")  # absent: nothing to do
    assert not (tree / "empty").exists()


def test_a_file_moved_out_is_the_tree_s_own_and_a_copy_in_replaces_a_link(tree: Path, host: Path,
                                                                          tmp_path: Path) -> None:
    # What a base's build leaves in var/lib/apt/lists is moved out of the tree (images._keep_package_lists) and
    # copied into the next build's: a link there (to a host file, or a directory linked away) is never followed.
    lists = tree / "var" / "lib" / "apt" / "lists"
    lists.mkdir(parents=True)
    (lists / "Packages").write_text("Package: hello\n")
    (lists / "linked").symlink_to(host / "secret")
    (tree / "var" / "lib" / "away").symlink_to(host)
    kept = tmp_path / "kept"
    kept.mkdir()
    in_tree = InTree(tree)
    in_tree.move_out("var/lib/apt/lists/Packages", kept / "Packages")
    assert (kept / "Packages").read_text() == "Package: hello\n" and not (lists / "Packages").exists()
    with pytest.raises(OSError):
        in_tree.move_out("var/lib/apt/lists/linked", kept / "linked")
    with pytest.raises(OSError):
        in_tree.move_out("var/lib/away/secret", kept / "secret")  # resolves to /var/lib/away/secret in the tree
    assert (host / "secret").read_text() == "the host's\n" and not (kept / "secret").exists()
    # Across filesystems (the cache on a disk, a tree in memory): copied, then removed from the tree.
    (lists / "InRelease").write_text("signed\n")
    elsewhere = Path("/dev/shm") / f"harden-test-moved-{os.getpid()}"
    try:
        in_tree.move_out("var/lib/apt/lists/InRelease", elsewhere)
        assert elsewhere.read_text() == "signed\n" and not (lists / "InRelease").exists()
    finally:
        elsewhere.unlink(missing_ok=True)
    in_tree.copy_in(kept / "Packages", "var/lib/apt/lists/linked")  # replaces the link, never writes through it
    assert (lists / "linked").read_text() == "Package: hello\n" and not (lists / "linked").is_symlink()
    assert (host / "secret").read_text() == "the host's\n"
    # A file with another name in the tree stays where it is (moved, the tree would keep a name of it).
    os.link(lists / "linked", tree / "etc" / "other-name")
    with pytest.raises(OSError):
        in_tree.move_out("var/lib/apt/lists/linked", kept / "linked")
    assert (lists / "linked").exists() and not (kept / "linked").exists()
    with pytest.raises(OSError):  # larger than it may be
        in_tree.copy_in(kept / "Packages", "var/lib/apt/lists/big", limit=4)
    assert not (lists / "big").exists()
