"""Machine caps and the user-namespaced image, without booting anything (fake cgroup trees, a tmp tree)."""

from __future__ import annotations

import errno
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_systemd_harden.errors import MachineError
from pytest_systemd_harden.machine import cgroups
from pytest_systemd_harden.machine.backends import userns
from pytest_systemd_harden.machine.cgroups import Caps, Contained, OwnedCgroup


def test_caps_come_from_the_environment_with_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cgroups.MEMORY_CAP_ENV, raising=False)
    monkeypatch.delenv(cgroups.TASKS_CAP_ENV, raising=False)
    total = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                 if line.startswith("MemTotal:"))
    assert Caps.from_environment() == Caps(total // 4, 4096)
    monkeypatch.setenv(cgroups.MEMORY_CAP_ENV, "512M")
    monkeypatch.setenv(cgroups.TASKS_CAP_ENV, "infinity")
    assert Caps.from_environment() == Caps(512 << 20, None)
    assert Caps.from_environment().describe() == "memory cap 512 MiB, no tasks cap"
    monkeypatch.setenv(cgroups.MEMORY_CAP_ENV, "lots")
    with pytest.raises(ValueError, match=r"\$HARDEN_MACHINE_MEMORY_MAX='lots': expected a positive number"):
        Caps.from_environment()


def _fake_v1_group(tmp_path: Path) -> OwnedCgroup:
    group = OwnedCgroup("machine-1-2-3", [tmp_path / "memory" / "ours", tmp_path / "pids" / "ours"])
    memory, pids = group.paths
    memory.mkdir(parents=True)
    pids.mkdir(parents=True)
    (memory / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    (pids / "pids.max").write_text("max\n")
    (pids / "pids.events").write_text("max 0\n")
    return group


def test_caps_are_written_and_a_hit_is_told_with_the_cap(tmp_path: Path) -> None:
    group = _fake_v1_group(tmp_path)
    memory, pids = group.paths
    caps = Caps(256 << 20, 300)
    group.set_caps(caps)
    assert (memory / "memory.limit_in_bytes").read_text() == str(256 << 20)
    assert (pids / "pids.max").read_text() == "300"
    before = group.cap_counters()
    assert before == {"memory": 0, "pids": 0}
    assert group.caps_hit(before, caps) == []
    (pids / "pids.events").write_text("max 7\n")
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert group.caps_hit(before, caps) == [
        ("the machine hit its memory cap of 256 MiB (2 process(es) killed by the cgroup's OOM killer; raise it with "
         "$HARDEN_MACHINE_MEMORY_MAX)"),
        ("the machine hit its tasks cap of 300 (7 fork(s) or thread(s) refused; raise it with "
         "$HARDEN_MACHINE_TASKS_MAX)")]
    assert group.caps_hit(group.cap_counters(), caps) == []  # only what is new since `before`


def test_the_image_copy_is_shifted_keeping_setuid_bits_and_file_capabilities(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "usr" / "bin").mkdir(parents=True)
    su = root / "usr" / "bin" / "su"
    su.write_text("")
    os.chmod(su, 0o4755)
    ping = root / "usr" / "bin" / "ping"
    ping.write_text("")
    v2 = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)  # cap_net_raw=ep, no root uid
    os.setxattr(ping, "security.capability", v2)
    (root / "link").symlink_to("usr/bin/su")
    base = userns.base_for("00000000000000ff")
    userns.shift_ownership(root, base)
    for path in (root, su, ping, root / "usr"):
        assert (path.stat().st_uid, path.stat().st_gid) == (base, base)
    assert os.lstat(root / "link").st_uid == base
    assert su.stat().st_mode & 0o7777 == 0o4755
    magic, permitted, _inheritable, _p2, _i2, root_uid = struct.unpack("<IIIIII",
                                                                       os.getxattr(ping, "security.capability"))
    assert (magic, permitted, root_uid) == (0x03000001, 1 << 13, base)
    userns.shift_ownership(root, base)  # idempotent: an interrupted shift can be run again
    assert su.stat().st_uid == base


def test_a_tree_built_by_the_sandbox_is_given_back_as_host_root_would_have_built_it(tmp_path: Path) -> None:
    # What a sandboxed build leaves: owners in the build's range, file capabilities naming the build's root (as the
    # kernel writes them for setcap in a user namespace). Taken back, each is what a build by host root leaves.
    from pytest_systemd_harden.machine import build_sandbox

    base = build_sandbox.build_base("harden-build-1")
    root = tmp_path / "rootfs"
    (root / "usr" / "bin").mkdir(parents=True)
    passwd = root / "usr" / "bin" / "passwd"
    passwd.write_text("")
    (root / "usr" / "bin" / "linked").hardlink_to(passwd)  # seen twice by the walk: moved once
    ping = root / "usr" / "bin" / "ping"
    ping.write_text("")
    mail = root / "var" / "mail"
    mail.mkdir(parents=True)
    for path in (root, root / "usr", root / "usr" / "bin", root / "var", passwd, ping, mail):
        os.chown(path, base, base)
    os.chown(mail, base, base + 8)  # group mail
    os.chmod(mail, 0o2775)

    def acl(group: int) -> bytes:  # owner rwx, group r-x, group `group` r-x, mask r-x, others r-x
        entries = [(1, 7, 0xFFFFFFFF), (4, 5, 0xFFFFFFFF), (8, 5, group), (16, 5, 0xFFFFFFFF), (32, 5, 0xFFFFFFFF)]
        return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)

    os.setxattr(mail, "system.posix_acl_default", acl(base + 4))  # as tmpfiles sets one in a user namespace
    os.chmod(passwd, 0o4755)
    v3 = struct.pack("<IIIIII", 0x03000001, 1 << 13, 0, 0, 0, base)  # cap_net_raw=ep for the build's root
    os.setxattr(ping, "security.capability", v3)
    (root / "link").symlink_to("usr/bin/passwd")
    os.lchown(root / "link", base, base)
    build_sandbox.take_back(root, base)
    for path in (root, root / "usr", passwd, ping, root / "link"):
        assert (os.lstat(path).st_uid, os.lstat(path).st_gid) == (0, 0)
    assert (mail.stat().st_gid, mail.stat().st_mode & 0o7777) == (8, 0o2775)
    assert os.getxattr(mail, "system.posix_acl_default") == acl(4)  # group adm, as in the machine
    assert passwd.stat().st_mode & 0o7777 == 0o4755
    assert os.getxattr(ping, "security.capability") == struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
    userns.move_ownership(root, 0, base)  # and back again: the capability names the build's root
    assert os.getxattr(ping, "security.capability") == v3 and passwd.stat().st_mode & 0o7777 == 0o4755


def test_each_build_gets_its_own_uid_range_outside_every_machines() -> None:
    from pytest_systemd_harden.machine import build_sandbox

    bases = {build_sandbox.build_base(f"abc.building-{n:012x}") for n in range(1000)}
    assert len(bases) > 800
    assert all(b % userns.RANGE == 0 and 0x70000000 <= b and b + userns.RANGE <= 0x7FFD0000 for b in bases)


def test_each_image_gets_its_own_uid_range_in_nspawns_container_range() -> None:
    bases = {userns.base_for(f"{n:016x}") for n in range(1000)}
    assert len(bases) > 900
    assert all(b % userns.RANGE == 0 and 0x00080000 <= b and b + userns.RANGE <= 0x6FFF0000 for b in bases)



def test_a_scope_of_the_host_systemd_is_found_in_every_hierarchy(tmp_path: Path) -> None:
    """Where the host's PID 1 is systemd the caps are its scope's (MemoryMax=, TasksMax=): the counters are read from
    the scope's own groups, not from the subgroup nspawn moves itself into."""
    proc_cgroup = ("12:pids:/machine.slice/harden-1234abcd.scope\n4:memory:/machine.slice/harden-1234abcd.scope\n"
                   "1:name=systemd:/machine.slice/harden-1234abcd.scope/supervisor\n"
                   "0::/machine.slice/harden-1234abcd.scope/supervisor\n")
    hybrid = cgroups.scope_paths(proc_cgroup, "harden-1234abcd.scope", tmp_path)
    assert hybrid == [tmp_path / "pids/machine.slice/harden-1234abcd.scope",
                      tmp_path / "memory/machine.slice/harden-1234abcd.scope",
                      tmp_path / "unified/machine.slice/harden-1234abcd.scope"]
    (tmp_path / "cgroup.controllers").write_text("memory pids\n")
    unified = cgroups.scope_paths("0::/machine.slice/harden-1234abcd.scope/payload\n", "harden-1234abcd.scope",
                                  tmp_path)
    assert unified == [tmp_path / "machine.slice/harden-1234abcd.scope"]
    group = unified[0]
    group.mkdir(parents=True)
    (group / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\n")
    (group / "pids.events").write_text("max 0\n")
    assert cgroups.cap_counters(unified) == {"memory": 1, "pids": 0}


def test_the_idmapping_wrapper_shows_the_tree_shifted_read_only_and_only_to_its_command(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("the tests run as root (./dev.sh test): the wrapper mounts, in a namespace of its own")
    root = tmp_path / "rootfs"
    (root / "usr" / "bin").mkdir(parents=True)
    ping = root / "usr" / "bin" / "ping"
    ping.write_text("")
    os.setxattr(ping, "security.capability", struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0))  # v2, no uid
    base = userns.base_for("00000000000000ff")
    if userns.idmap_refused(root):
        pytest.fail(f"this host's /tmp cannot be idmapped: {userns.idmap_refused(root)}")
    look = ("import os, struct, sys; p = sys.argv[1]; st = os.stat(p); "
            "caps = os.getxattr(p, 'security.capability'); "
            "print(st.st_uid, st.st_gid, len(caps) == 24 and struct.unpack('<6I', caps)[5]); "
            "open(p, 'a').close()")
    seen = subprocess.run(userns.idmapped([sys.executable, "-c", look, str(ping)], root, base),
                          capture_output=True, text=True, check=False)
    assert seen.stdout.split() == [str(base), str(base), str(base)], seen.stderr  # the kernel maps the caps' root
    assert "Read-only file system" in seen.stderr  # the cache's image cannot be written through it
    assert (ping.stat().st_uid, len(os.getxattr(ping, "security.capability"))) == (0, 20)  # the tree is unchanged
    assert str(root) not in Path("/proc/self/mountinfo").read_text()  # nothing mounted where the host sees it


def test_a_filesystem_that_cannot_be_idmapped_is_said_so_and_gets_the_shifted_copy() -> None:
    # /proc cannot be idmapped: the machine would boot a shifted copy instead (see test_boundary_live).
    refused = userns.idmap_refused(Path("/proc/self"))
    assert refused is not None and "mount_setattr" in refused, refused


def test_a_build_whose_sandbox_cannot_be_set_up_says_so_in_one_line(tmp_path: Path) -> None:
    # Not a package's fault: the message names the step the kernel refused, and what a build needs.
    from pytest_systemd_harden.machine import build_sandbox

    missing = tmp_path / "gone"  # no directory to assemble the view on
    ran = run_as_a_build(build_sandbox.sandboxed(["true"], missing, build_sandbox.build_base("gone")), "gone")
    refused = build_sandbox.refusal(ran.returncode, ran.stderr.splitlines())
    assert refused is not None, (ran.returncode, ran.stderr)
    first, hint = refused.splitlines()
    assert first.startswith("the kernel refused the image build's sandbox: move_mount: No such file"), first
    assert "Linux 5.12" in hint
    assert build_sandbox.refusal(1, ran.stderr.splitlines()) is None  # another failure is the build's own


# Runs its arguments with a key in a session keyring of its own: the key of whoever starts a run.
_WITH_A_KEY = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
assert libc.syscall(250, 1, None) >= 0  # KEYCTL_JOIN_SESSION_KEYRING: this test's own, not the caller's
assert libc.syscall(248, b"user", b"harden-test-secret", b"s3cret", 6, -3) >= 0  # add_key to the session keyring
os.execv(sys.argv[1], sys.argv[1:])  # the same process: alone in its cgroup, as a build's wrapper must be
"""
# Prints the key's payload if the process can find it in its keyrings (KEYCTL_SEARCH, KEYCTL_READ), else "none".
def run_as_a_build(argv: list[str], name: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a sandbox's wrapper as an image build runs it: in a cgroup of its own (its network filter goes there)."""
    step = Contained.start(argv, "build", name, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = step.process.communicate(timeout=60)
    finally:
        step.stop()
    return subprocess.CompletedProcess(argv, step.process.returncode, out, err)


_READ_THE_KEY = ("import ctypes; libc = ctypes.CDLL(None); key = libc.syscall(250, 10, -3, b'user', "
                 "b'harden-test-secret', 0); buffer = ctypes.create_string_buffer(16); "
                 "read = libc.syscall(250, 11, key, buffer, 16) if key > 0 else -1; "
                 "print(buffer.raw[:read].decode() if read > 0 else 'none')")


@pytest.mark.parametrize("memory", ["", "0"], ids=["in memory", "on the disk"])
def test_a_sandboxed_command_is_root_of_its_own_namespaces_in_a_read_only_host(
        tmp_path: Path, memory: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_systemd_harden.machine import build_sandbox
    from pytest_systemd_harden.machine.staging import mounts_under

    monkeypatch.setenv(build_sandbox.MEMORY_ENV, memory)
    build = tmp_path / "build"
    build.mkdir()
    base = build_sandbox.build_base(build.name)
    work = build_sandbox.prepare(build, base)
    # In memory: a tmpfs only the build and host root (through the keeper's /proc/PID/root) see, never the host.
    assert (work.parts[1] == "proc") == (memory == ""), work
    assert not mounts_under(tmp_path)
    script = ("cat /proc/self/uid_map; ls /proc | grep -c '^[0-9]'; touch /etc/harden-x 2>&1; "
              f"mkdir tree && touch tree/made /tmp/harden-scratch-{os.getpid()} && pwd; "
              f'readlink /proc/self/ns/ipc /proc/self/ns/uts; /usr/bin/python3 -I -c "{_READ_THE_KEY}"; true')
    outside = subprocess.run([sys.executable, "-c", _WITH_A_KEY, sys.executable, "-I", "-c", _READ_THE_KEY],
                             capture_output=True, text=True, check=False, timeout=60)
    assert outside.stdout.strip() == "s3cret", outside  # the key is there to be read, unsandboxed
    try:
        ran = run_as_a_build([sys.executable, "-c", _WITH_A_KEY, *build_sandbox.sandboxed(["sh", "-c", script], build,
                                                                                          base)], build.name)
    finally:
        tree = build_sandbox.finish(build, "tree")
    lines = (ran.stdout + ran.stderr).splitlines()
    assert lines[0].split() == ["0", str(base), "65536"], lines
    assert int(lines[1]) < 5, lines  # its own PID namespace: the shell, ls, grep
    assert "Read-only file system" in lines[2], lines
    assert lines[3] == build_sandbox.INSIDE, lines
    assert lines[4] != os.readlink("/proc/self/ns/ipc") and lines[5] != os.readlink("/proc/self/ns/uts"), lines
    assert lines[6] == "none", lines  # the caller's keys are not the build's
    assert tree == build / "tree" and (tree / "made").stat().st_uid == base
    assert not Path(f"/tmp/harden-scratch-{os.getpid()}").exists()
    assert sorted(os.listdir(build)) == ["tree"]  # the view's mount point and the work directory are gone
    assert not os.path.exists(work), "the keeper of the build's memory outlived it"


@pytest.mark.parametrize("memory", ["", "0"], ids=["in memory", "on the disk"])
def test_a_build_on_a_built_tree_writes_only_its_layer_and_cannot_send_host_root_elsewhere(
        tmp_path: Path, memory: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A package set's build writes on an overlay of its base: it sees the base as root's, writes the upper layer
    # only, cannot enter the directory the layer is in, and cannot make host root take another directory for it:
    # it owns the work directory, so it renames that directory and leaves a link to a host directory in its place.
    from pytest_systemd_harden.machine import build_sandbox
    from pytest_systemd_harden.machine.staging import mounts_under

    monkeypatch.setenv(build_sandbox.MEMORY_ENV, memory)
    lower = tmp_path / "base"
    (lower / "etc").mkdir(parents=True)
    (lower / "etc/kept").write_text("kept\n")
    (lower / "etc/gone").write_text("gone\n")
    victim = tmp_path / "victim"
    (victim / "upper").mkdir(parents=True)
    (victim / "upper/secret").write_text("host data")
    build = tmp_path / "build"
    build.mkdir()
    base = build_sandbox.build_base(build.name)
    build_sandbox.prepare(build, base, lower=lower)
    script = ("cat rootfs/etc/kept; stat -c %u rootfs/etc/kept; echo new > rootfs/etc/added; rm rootfs/etc/gone; "
              "ls .layer/upper >/dev/null 2>&1 || echo refused; "
              f"echo x > rootfs/etc/kept 2>/dev/null; mv .layer moved && ln -s {victim} .layer && echo swapped")
    try:
        ran = run_as_a_build(build_sandbox.sandboxed(["sh", "-c", script], build, base), build.name)
    finally:
        layer = build_sandbox.finish(build, build_sandbox.UPPER, into="layer")
    assert ran.stdout.split() == ["kept", "0", "refused", "swapped"], ran
    assert layer == build / "layer" and (layer / "etc/added").read_text() == "new\n"
    assert stat.S_ISCHR(os.lstat(layer / "etc/gone").st_mode)  # the overlay's whiteout: gone from the image
    assert (layer / "etc/kept").read_text() == "x\n" and (lower / "etc/kept").read_text() == "kept\n"
    assert (victim / "upper/secret").read_text() == "host data" and not (layer / "secret").exists()
    assert sorted(os.listdir(build)) == ["layer"] and not mounts_under(tmp_path)


def test_a_build_that_fills_its_memory_fails_in_one_line_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # In memory, a build cannot fill the cache's disk: it fills its own tmpfs, and says so.
    from pytest_systemd_harden.errors import ImageBuildError
    from pytest_systemd_harden.machine import build_sandbox
    from pytest_systemd_harden.machine.staging import mounts_under

    monkeypatch.setenv(build_sandbox.MEMORY_ENV, "16M")
    build = tmp_path / "build"
    build.mkdir()
    base = build_sandbox.build_base(build.name)
    work = build_sandbox.prepare(build, base)
    ran = run_as_a_build(build_sandbox.sandboxed(["sh", "-c", "mkdir tree; head -c 32M /dev/zero > tree/big"], build,
                                                 base), build.name)
    assert "No space left on device" in ran.stderr, ran
    with pytest.raises(ImageBuildError, match=r"filled the 0.0 GiB of memory .* HARDEN_BUILD_MEMORY=0 builds on"):
        build_sandbox.finish(build, "tree")
    assert sorted(os.listdir(build)) == [] and not mounts_under(tmp_path) and not os.path.exists(work)


def test_a_build_that_ended_badly_leaves_no_tree_to_take(tmp_path: Path) -> None:
    # After an error or an interruption some of the build may still run and change its tree: host root copies
    # nothing of it (a link swapped in during the copy would be followed from the host's root).
    from pytest_systemd_harden.machine import build_sandbox

    build = tmp_path / "build"
    build.mkdir()
    base = build_sandbox.build_base(build.name)
    work = build_sandbox.prepare(build, base)
    ran = run_as_a_build(build_sandbox.sandboxed(["sh", "-c", "mkdir tree; touch tree/made; exit 3"], build, base),
                         build.name)
    assert ran.returncode == 3 and (work / "tree" / "made").exists()
    assert build_sandbox.finish(build, "tree", keep=False) is None
    assert sorted(os.listdir(build)) == [] and not os.path.exists(work)


def test_the_build_s_memory_is_never_seen_by_the_host_even_where_its_mounts_propagate(tmp_path: Path) -> None:
    # systemd as PID 1 makes every mount shared: a mount made in a copy of the host's namespace would appear on the
    # host, unless the copy receives the host's events only (a slave), as the keeper's does.
    from pytest_systemd_harden.machine import build_sandbox
    from pytest_systemd_harden.machine.staging import mounts_under

    shared = tmp_path / "shared"
    shared.mkdir()
    subprocess.run(["mount", "--bind", "--make-shared", str(shared), str(shared)], check=True)
    try:
        assert mounts_under(shared) == [str(shared)]
        build = shared / "build"
        build.mkdir()
        work = build_sandbox.prepare(build, build_sandbox.build_base(build.name))
        try:
            assert work.parts[1] == "proc" and mounts_under(shared) == [str(shared)]
        finally:
            build_sandbox.finish(build, "tree")
    finally:
        subprocess.run(["umount", "-l", str(shared)], check=True)


def test_the_build_s_memory_is_a_size_or_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_systemd_harden.errors import ImageBuildError
    from pytest_systemd_harden.machine import build_sandbox

    monkeypatch.setenv(build_sandbox.MEMORY_ENV, "2G")
    assert build_sandbox.build_memory() == 2 << 30
    with build_sandbox.on_the_disk():
        assert build_sandbox.build_memory() == 0
    monkeypatch.setenv(build_sandbox.MEMORY_ENV, "0")
    assert build_sandbox.build_memory() == 0
    monkeypatch.setenv(build_sandbox.MEMORY_ENV, "lots")
    with pytest.raises(ImageBuildError, match=r"HARDEN_BUILD_MEMORY='lots': expected a size \(4G, 512M\) or 0"):
        build_sandbox.build_memory()


# Connects to the abstract socket named by its argument: "connected", or the error.
_CONNECT = ("import socket, sys; peer = socket.socket(socket.AF_UNIX); "
            "print(peer.connect_ex(b'\\0' + sys.argv[1].encode()) or 'connected')")
# Connects over TCP to 127.0.0.1 at each port given: the error number of each, or "connected".
_CONNECT_TCP = ("import socket, sys; [print(socket.socket().connect_ex(('127.0.0.1', int(port))) or 'connected') "
                "for port in sys.argv[1:]]")


def test_a_sandboxed_command_reaches_no_host_process_secret_socket_or_device(tmp_path: Path) -> None:
    # What a script that left its chroot would try next: the host's procfs under the build's (unmounted), the
    # caller's environment, a user's files, a host service's abstract socket (another build's too: a descriptor
    # passed between two builds would let one change the other's tree while host root finishes it), a device node
    # left in its tree (a base's console).
    from pytest_systemd_harden.machine import build_sandbox

    build = tmp_path / "build"
    build.mkdir()
    base = build_sandbox.build_base(build.name)
    work = build_sandbox.prepare(build, base)
    os.mknod(work / "full", 0o666 | stat.S_IFCHR, os.makedev(1, 7))
    os.chmod(work / "full", 0o666)  # open to anyone, as the node is: only the mount's nodev stops it
    listening = socket.socket(socket.AF_UNIX)
    name = f"harden-test-{os.getpid()}"
    listening.bind(b"\0" + name.encode())
    listening.listen()
    service = socket.socket()  # a host service on a port of its own (a database, an admin API)
    service.bind(("127.0.0.1", 0))
    service.listen()
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    script = ("umount /proc 2>/dev/null; umount -l /proc 2>/dev/null; ls /proc | grep -c '^[0-9]'; "
              "env | grep -c HARDEN_TEST_TOKEN; grep -c ' /root .* - tmpfs harden-build ' /proc/self/mountinfo; "
              f"/usr/bin/python3 -I -c \"{_CONNECT}\" {name}; "
              "(exec 3<>full) 2>/dev/null && echo opened || echo refused; "
              f"test -e {Path(__file__).resolve()} && echo seen || echo hidden; "
              "test -e /usr/bin/env && echo seen || echo hidden; "
              f"/usr/bin/python3 -I -c \"{_CONNECT_TCP}\" {service.getsockname()[1]} {free.getsockname()[1]}; "
              "true")
    # The mirror's port is one the build may reach (nothing listens on ``free``: refused, not denied).
    mirror = f"http://127.0.0.1:{free.getsockname()[1]}/debian"
    try:
        ran = run_as_a_build(build_sandbox.sandboxed(["sh", "-c", script], build, base, [f"deb {mirror} trixie main"]),
                             build.name, env={**os.environ, "HARDEN_TEST_TOKEN": "s3cret"})
    finally:
        listening.close()
        service.close()
        free.close()
        build_sandbox.finish(build, "tree")
    lines = (ran.stdout + ran.stderr).splitlines()
    assert int(lines[0]) < 6, lines  # still the build's own procfs: the host's is not under it to be seen
    assert lines[1:3] == ["0", "1"], lines  # no caller's variable; an empty /root over host root's
    assert lines[3] == str(errno.EPERM), lines  # Landlock's scope: no abstract socket outside the build
    assert lines[4] == "refused", lines
    assert lines[5:7] == ["hidden", "seen"], lines  # this checkout is not the build's to read; the system is
    assert lines[7:9] == [str(errno.EACCES), str(errno.ECONNREFUSED)], lines  # Landlock: only the mirror's port


def _running(mark: str) -> list[int]:
    """Host pids of processes whose command line holds ``mark``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if mark.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                continue
    return found


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_nothing_of_a_build_outlives_its_wrapper(tmp_path: Path, stop: signal.Signals) -> None:
    # Stopped (a run's cgroup stopped: SIGTERM) or killed (SIGKILL), the wrapper takes the build with it: a build
    # left running would go on with the host's network, and builds that should take turns would overlap.
    from pytest_systemd_harden.machine import build_sandbox

    build = tmp_path / "build"
    build.mkdir()
    base = build_sandbox.build_base(build.name)
    build_sandbox.prepare(build, base)
    mark = f"{os.getpid()}{int(stop):02d}"  # sleep takes seconds with a fraction: a command line of its own
    step = Contained.start(build_sandbox.sandboxed(["sh", "-c", f"sleep 300.{mark}; true"], build, base), "build",
                           build.name)
    wrapper = step.process
    try:
        deadline = time.monotonic() + 30
        while not _running(f"sleep\x00300.{mark}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pid for pid in _running(f"sleep\x00300.{mark}")], "the build did not start"
        wrapper.send_signal(stop)
        wrapper.wait(timeout=10)
        deadline = time.monotonic() + 5
        while _running(f"300.{mark}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(f"300.{mark}"), "a process of the build outlived its wrapper"
    finally:
        for pid in _running(f"300.{mark}"):
            os.kill(pid, signal.SIGKILL)
        build_sandbox.finish(build, "tree")
        step.stop()


def _a_build_and_a_listener(tmp_path: Path) -> tuple[Path, int, socket.socket, int]:
    """A prepared build directory and its uid base, and a TCP listener on the host's loopback with its port."""
    from pytest_systemd_harden.machine import build_sandbox

    build = tmp_path / "build"
    build.mkdir()
    base = build_sandbox.build_base(build.name)
    build_sandbox.prepare(build, base)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    return build, base, listener, listener.getsockname()[1]


# Tries each "tcp|udp HOST PORT" of its arguments: "ok", or the error's number.
_REACH = ("import socket, sys\n"
          "for kind, host, port in zip(*[iter(sys.argv[1:])] * 3):\n"
          "    s = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET,\n"
          "                      socket.SOCK_DGRAM if kind.startswith('udp') else socket.SOCK_STREAM)\n"
          "    s.settimeout(1)\n"
          "    try:\n"
          "        if kind == 'bind':\n"
          "            s.bind((host, int(port)))\n"
          "        elif kind == 'udp+cmsg':  # connected, then a send with control data: the kernel gives no address\n"
          "            s.connect((host, int(port)))\n"
          "            s.sendmsg([b'?'], [(socket.IPPROTO_IP, socket.IP_TOS, (0).to_bytes(4, sys.byteorder))])\n"
          "        else:\n"
          "            s.connect((host, int(port))) if kind == 'tcp' else s.sendto(b'?', (host, int(port)))\n"
          "        print('ok')\n"
          "    except OSError as error:\n"
          "        print(error.errno or 'timeout')\n")


def test_a_build_reaches_its_mirror_and_the_internet_but_no_other_address_of_the_host_or_its_network(
        tmp_path: Path) -> None:
    # What a maintainer script would ask next: a cloud's metadata service (an instance role's credentials), a web
    # interface on the host's loopback, the local network; each refused before a packet leaves (EPERM). A mirror
    # on the host's loopback (a caching proxy) is the build's to reach, and so is the internet.
    from pytest_systemd_harden.machine import build_sandbox

    build, base, mirror, port = _a_build_and_a_listener(tmp_path)
    from pytest_systemd_harden.machine.build_network import host_networks

    own = next(str(n.network_address) for n in host_networks() if n.version == 4 and n.prefixlen == 32
               and not n.network_address.is_loopback)
    tries = ["tcp", "127.0.0.1", str(port), "udp+cmsg", "127.0.0.1", str(port),  # the mirror
             "tcp", "169.254.169.254", "80", "udp", "169.254.169.254", "53",  # a cloud's metadata service
             "tcp", "127.0.0.1", "80", "tcp", "::1", "443",  # the host's loopback: nothing listens there
             "tcp", "10.0.0.1", "80", "tcp", "192.168.1.1", "443", "tcp", "fd00:ec2::254", "80",  # local networks
             "tcp", own, "443", "tcp", "::ffff:169.254.169.254", "80", "tcp", "64:ff9b::a00:1", "80",  # the host's own
             # address (its services on all addresses answer there); IPv4 in IPv6, judged as IPv4
             "tcp", "198.51.100.1", "80", "tcp", "::ffff:198.51.100.1", "80",  # the internet (documentation
             # addresses: nothing answers them), also as IPv4 in IPv6
             "bind", "127.0.0.1", "0", "bind", "0.0.0.0", "8089"]  # an ephemeral port, not a server's
    try:
        ran = run_as_a_build(build_sandbox.sandboxed(["/usr/bin/python3", "-I", "-c", _REACH, *tries], build, base,
                                                     [f"deb http://127.0.0.1:{port}/debian trixie main"]), build.name)
    finally:
        mirror.close()
        build_sandbox.finish(build, "tree")
    lines = (ran.stdout + ran.stderr).splitlines()
    refused = str(errno.EPERM)
    assert lines[:2] == ["ok", "ok"], lines
    assert lines[2:12] == [refused] * 10, lines
    assert refused not in lines[12:14], lines
    assert lines[14:] == ["ok", str(errno.EACCES)], lines  # Landlock (Linux 6.12 here): no TCP port of the host



def test_an_offline_build_step_binds_any_port_of_its_own_network_and_reaches_nothing(tmp_path: Path) -> None:
    # Where maintainer scripts run once apt has downloaded (images.install_on_base): a network namespace of the
    # build's own, only lo. postgresql's postinst binds ports to find a free one for its first cluster: here that
    # is no host port, so it may (the online sandbox refuses all but port 0); nothing answers anywhere.
    from pytest_systemd_harden.machine import build_sandbox

    build, base, listening, port = _a_build_and_a_listener(tmp_path)  # a host service: not in the build's network
    tries = ["bind", "0.0.0.0", "5432", "bind", "127.0.0.1", "8089", "tcp", "127.0.0.1", str(port),
             "tcp", "198.51.100.1", "80", "udp", "169.254.169.254", "53"]
    probe = _REACH + "print(' '.join(name for _index, name in socket.if_nameindex()))\n"  # this network's
    try:
        ran = run_as_a_build(build_sandbox.sandboxed(["/usr/bin/python3", "-I", "-c", probe, *tries], build, base,
                                                     offline=True), build.name)
    finally:
        listening.close()
        build_sandbox.finish(build, "tree")
    lines = (ran.stdout + ran.stderr).splitlines()
    assert lines[:2] == ["ok", "ok"], lines  # 127.0.0.1:8089 too: its lo is up
    # Its own loopback, where nothing listens, not the host's service; no route to the internet or a metadata
    # service from here.
    assert lines[2:5] == [str(errno.ECONNREFUSED), str(errno.ENETUNREACH), str(errno.ENETUNREACH)], lines
    interfaces = lines[5].split()  # lo, and a fallback tunnel device where such a module is loaded (tunl0, sit0)
    with open("/proc/net/route") as routes:  # the host's default route's interface: not the build's
        default = {line.split()[0] for line in routes.read().splitlines()[1:] if line.split()[1] == "00000000"}
    assert "lo" in interfaces and not default & set(interfaces), (interfaces, default)


# Makes each socket of its arguments (family, type, protocol), then calls io_uring_setup: "ok", or the error's number.
_SOCKETS = ("import ctypes, socket, sys\n"
            "for family, kind, protocol in zip(*[iter(map(int, sys.argv[1:]))] * 3):\n"
            "    try:\n"
            "        socket.socket(family, kind, protocol).close()\n"
            "        print('ok')\n"
            "    except OSError as error:\n"
            "        print(error.errno)\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "params = ctypes.create_string_buffer(120)\n"
            "print('ok' if libc.syscall(425, 1, params) >= 0 else ctypes.get_errno())\n")


def test_a_build_makes_only_the_sockets_apt_and_maintainer_scripts_use(tmp_path: Path) -> None:
    # Sockets whose sends no cgroup hook judges (SCTP, ICMP echo, vsock to the hypervisor) and io_uring (which makes
    # sockets past seccomp) are refused; unix, netlink, TCP, UDP are made.
    from pytest_systemd_harden.machine import build_sandbox

    build = tmp_path / "build"
    build.mkdir()
    base = build_sandbox.build_base(build.name)
    build_sandbox.prepare(build, base)
    made = [socket.AF_UNIX, socket.SOCK_STREAM, 0, socket.AF_NETLINK, socket.SOCK_RAW, 0,
            socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC, 0, socket.AF_INET6, socket.SOCK_DGRAM, 17]
    refused = [socket.AF_INET, socket.SOCK_STREAM, 132, socket.AF_INET6, socket.SOCK_SEQPACKET, 0,  # SCTP
               socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP, 40, socket.SOCK_STREAM, 0,  # ping; vsock
               socket.AF_PACKET, socket.SOCK_DGRAM, 0]
    pair = "import socket; socket.socketpair(30, socket.SOCK_RDM)"  # AF_TIPC: pairs too
    try:
        ran = run_as_a_build(build_sandbox.sandboxed(["sh", "-c", '"$@"; python3 -I -c "$0" 2>&1 | tail -1', pair,
                                                      "/usr/bin/python3", "-I", "-c", _SOCKETS,
                                                      *map(str, made + refused)], build, base), build.name)
    finally:
        build_sandbox.finish(build, "tree")
    lines = (ran.stdout + ran.stderr).splitlines()
    # As a kernel without those protocols (SCTP, ping) and families (vsock, packet, TIPC) answers: a prober falls back.
    assert lines[:-1] == ["ok"] * 4 + [str(errno.EPROTONOSUPPORT)] * 3 + [str(errno.EAFNOSUPPORT)] * 2 \
        + [str(errno.ENOSYS)], lines
    assert lines[-1] == "OSError: [Errno 97] Address family not supported by protocol", lines


def test_a_host_path_given_to_the_build_is_seen_and_its_neighbours_are_not(tmp_path: Path) -> None:
    # A file:// mirror outside the system's directories: the build reads it, not what lies beside it.
    from pytest_systemd_harden.machine import build_sandbox

    mirror = Path(f"/var/lib/harden-test-mirror-{os.getpid()}")
    mirror.mkdir()
    (mirror / "Release").write_text("Suite: trixie\n")
    build = tmp_path / "build"
    build.mkdir()
    base = build_sandbox.build_base(build.name)
    build_sandbox.prepare(build, base)
    script = (f"cat {mirror}/Release; test -e /var/log && ls -A /var/log | wc -l; "
              f"test -e {Path(__file__).resolve()} && echo seen || echo hidden")
    try:
        ran = run_as_a_build(build_sandbox.sandboxed(["sh", "-c", script], build, base,
                                                     [f"deb file://{mirror}/ trixie main"]), build.name)
    finally:
        build_sandbox.finish(build, "tree")
        (mirror / "Release").unlink()
        mirror.rmdir()
    assert (ran.stdout + ran.stderr).splitlines() == ["Suite: trixie", "0", "hidden"], ran


def test_a_build_writes_only_its_work_directory_and_a_link_for_its_tree_is_not_taken(tmp_path: Path) -> None:
    # Host root later writes the build directory (a manifest, a lock) and renames it into the cache: the build
    # cannot plant a link there, and a link where its tree should be is dropped, never followed.
    from pytest_systemd_harden.machine import build_sandbox

    build = tmp_path / "build"
    build.mkdir()
    host = tmp_path / "host"
    host.mkdir()
    base = build_sandbox.build_base(build.name)
    work = build_sandbox.prepare(build, base)
    script = (f"ln -s {host} rootfs; ln -s {host} ../manifest.json 2>/dev/null; "
              f"ls -la {build_sandbox.INSIDE}/.. >/dev/null; true")
    try:
        ran = run_as_a_build(build_sandbox.sandboxed(["sh", "-c", script], build, base), build.name)
        assert ran.returncode == 0, ran
        assert (work / "rootfs").is_symlink()  # the build ran
    finally:
        tree = build_sandbox.finish(build, "rootfs")
    assert tree is None and sorted(os.listdir(build)) == [] and host.is_dir() and not os.path.lexists(host / "x")


def test_the_bus_socket_is_found_as_the_machine_sees_it_never_through_its_links_to_the_host(tmp_path: Path) -> None:
    # A machine's image can make its bus socket's path a link to a host socket (/run/systemd/private): the plugin,
    # as host root, must reach the machine's own socket or none.
    host_socket = socket.socket(socket.AF_UNIX)
    host_socket.bind(str(tmp_path / "host.sock"))
    host_socket.listen()
    root = tmp_path / "root"
    (root / "run/dbus").mkdir(parents=True)
    (root / "run/dbus/system_bus_socket").symlink_to(tmp_path / "host.sock")
    with pytest.raises(MachineError, match="could not connect"):
        userns.connect_as(root, "run/dbus/system_bus_socket", os.geteuid())
    (root / "run/dbus/system_bus_socket").unlink()
    own = socket.socket(socket.AF_UNIX)
    own.bind(str(root / "run/dbus/system_bus_socket"))
    own.listen()
    userns.connect_as(root, "run/dbus/system_bus_socket", os.geteuid()).close()
    own.settimeout(1)
    own.accept()[0].close()  # the machine's own socket took the connection
    host_socket.close()
    own.close()
