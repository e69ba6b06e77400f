"""Image builds never touch the host: interrupted or killed at any point, a build leaves no mount, no process and
no staging directory behind once the next run has started, and it never removes a file outside the cache.

The builds here are real (mmdebstrap from the Debian mirror) and interrupted a few seconds in; the mount tests run
in a private mount namespace of their own (``unshare --mount``), so nothing they mount is ever seen by the host.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pytest_systemd_harden.machine import cgroups
from pytest_systemd_harden.machine.staging import clean_leftovers, mounts_under

ROOT = Path(__file__).resolve().parent.parent

BUILD = textwrap.dedent("""\
    import sys
    from pathlib import Path
    from pytest_systemd_harden.machine.images import ImageCache
    ImageCache(Path(sys.argv[1])).get(["hello"], lambda line: print(line, flush=True))
    print("BUILT", flush=True)
""")


def _needs_root_and_builder() -> None:
    if os.geteuid() != 0 or not shutil.which("mmdebstrap"):
        pytest.fail("these tests build real images: run as root with mmdebstrap installed (./dev.sh test)")


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and "pytest" not in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


@pytest.fixture
def canary() -> object:
    """A file of our own in the host's /dev/shm, the directory an interrupted build used to delete."""
    path = Path("/dev/shm") / f"harden-canary-{os.getpid()}"
    path.write_text("must survive")
    yield path
    assert path.read_text() == "must survive", "an image build removed or changed a file in the host's /dev/shm"
    path.unlink()


def _start_build(cache: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", BUILD, str(cache)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def _wait_for(build: subprocess.Popen[str], marker: str, timeout: float = 240.0) -> list[str]:
    """Read the build's progress until a line contains ``marker``."""
    assert build.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    for line in build.stdout:
        seen.append(line.rstrip())
        if marker in line:
            return seen
        assert time.monotonic() < deadline, f"the build never reached {marker!r}:\n" + "\n".join(seen)
    pytest.fail(f"the build ended before {marker!r}:\n" + "\n".join(seen))


def _assert_nothing_left(cache: Path) -> None:
    images = cache / "images"
    assert not mounts_under(cache), "a mount of the build is visible on the host"
    assert not [p.name for p in images.iterdir() if ".building-" in p.name]
    assert not _processes_mentioning(str(cache)), "a process of the build outlived it"


# Points of a build: before any mount, and while its mounts (proc, sysfs, the /dev binds) are in place.
POINTS = ["downloading packages", "installing essential packages"]


@pytest.mark.parametrize("point", POINTS)
def test_ctrl_c_during_a_build_cleans_up_at_once(tmp_path: Path, canary: Path, point: str) -> None:
    _needs_root_and_builder()
    build = _start_build(tmp_path)
    _wait_for(build, point)
    build.send_signal(signal.SIGINT)
    output, _ = build.communicate(timeout=60)
    assert build.returncode != 0 and "BUILT" not in output
    _assert_nothing_left(tmp_path)


@pytest.mark.parametrize("point", POINTS)
def test_a_killed_build_is_cleaned_by_the_next_run(tmp_path: Path, canary: Path, point: str) -> None:
    _needs_root_and_builder()
    build = _start_build(tmp_path)
    _wait_for(build, point)
    build.kill()
    build.communicate(timeout=30)
    images = tmp_path / "images"
    left = [p for p in images.iterdir() if ".building-" in p.name]
    assert left, "SIGKILL gives the build no chance to clean up: its staging directory is expected here"
    assert not mounts_under(tmp_path), "the killed build's mounts are visible on the host"
    # What the next run does before it builds: reap the dead run's cgroups, then its staging directories.
    cgroups.reap_orphans()
    assert sorted(clean_leftovers(images)) == sorted(left)  # the package set's, and the base's built first
    _assert_nothing_left(tmp_path)


def test_the_run_after_a_killed_build_builds_the_image(tmp_path: Path, canary: Path) -> None:
    _needs_root_and_builder()
    build = _start_build(tmp_path)
    _wait_for(build, POINTS[-1])
    build.kill()
    build.communicate(timeout=30)
    again = _start_build(tmp_path)
    output, _ = again.communicate(timeout=600)
    assert again.returncode == 0 and "BUILT" in output, output
    assert "left by a build that was killed" in output
    _assert_nothing_left(tmp_path)


# -- removal never crosses a mount: run in a private mount namespace, as a script -----------------------------

PRIVATE = textwrap.dedent("""\
    import os, subprocess, sys
    from pathlib import Path
    from pytest_systemd_harden.errors import ImageBuildError
    from pytest_systemd_harden.machine.staging import clean_leftovers, remove_tree
    work = Path(sys.argv[1])
    outside = work / "outside"            # stands for the host's /dev/shm
    outside.mkdir()
    (outside / "precious").write_text("host file")
    images = work / "images"
    # A build of an older version, killed: its pid is long gone, its bind of 'outside' still mounted.
    staging = images / "0123456789abcdef.building-4194999"
    (staging / "rootfs" / "dev" / "shm").mkdir(parents=True)
    (staging / "rootfs" / "etc").mkdir()
    (staging / "rootfs" / "etc" / "hostname").write_text("x")
    subprocess.run(["mount", "--bind", str(outside), str(staging / "rootfs" / "dev" / "shm")], check=True)
    try:
        remove_tree(staging)
    except ImageBuildError as exc:
        print("REFUSED", exc)
    assert (outside / "precious").exists()
    print("CLEANED", [p.name for p in clean_leftovers(images)])
    assert not staging.exists()
    assert (outside / "precious").read_text() == "host file"
    # A symbolic link in a tree leads nowhere: only the link is removed.
    tree = work / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "link").symlink_to(outside)
    remove_tree(tree)
    assert not tree.exists() and (outside / "precious").exists()
    print("OK")
""")


def test_removal_never_crosses_a_mount_and_old_leftovers_are_unmounted_first(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test mounts (in a private mount namespace): run as root (./dev.sh test)")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", PRIVATE,
                           str(tmp_path)], check=False, capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "REFUSED not removing" in done.stdout and "is mounted there" in done.stdout
    assert "CLEANED ['0123456789abcdef.building-4194999']" in done.stdout
    assert done.stdout.rstrip().endswith("OK")


def test_a_live_build_of_another_process_is_left_alone(tmp_path: Path) -> None:
    images = tmp_path / "images"
    ours = images / f"abc.building-{os.getpid()}-{cgroups.process_start_time(os.getpid())}-0000"
    ours.mkdir(parents=True)
    dead = images / "abc.building-4194999-1-0000"
    dead.mkdir()
    # An older version of the plugin names its build KEY.building-PID: alive while that pid is.
    older_alive = images / f"def.building-{os.getppid()}"
    older_alive.mkdir()
    assert clean_leftovers(images) == [dead]
    assert ours.exists() and older_alive.exists()


# -- the maintainer's own build: machine.debs ---------------------------------------------------------------------

def build_deb(folder: Path, version: str, depends: str = "", postinst: str = "") -> Path:
    """A tiny package built with dpkg-deb, byte for byte the same for the same version (fixed times), so the
    image cache finds it again in the next run."""
    root = folder / f"harden-demo-{version}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "usr" / "share" / "harden-demo").mkdir(parents=True)
    (root / "usr" / "share" / "harden-demo" / "VERSION").write_text(version + "\n")
    control = (f"Package: harden-demo\nVersion: {version}\nArchitecture: all\nMaintainer: Test <t@example.org>\n"
               f"Description: a package of the plugin's own tests\n" + (f"Depends: {depends}\n" if depends else ""))
    (root / "DEBIAN" / "control").write_text(control)
    if postinst:
        (root / "DEBIAN" / "postinst").write_text(f"#!/bin/sh\n{postinst}\n")
        (root / "DEBIAN" / "postinst").chmod(0o755)
    for path in [root, *root.rglob("*")]:
        os.utime(path, (1700000000, 1700000000))
    deb = folder / f"harden-demo_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)], check=True,
                   capture_output=True, env={**os.environ, "SOURCE_DATE_EPOCH": "1700000000"})
    return deb


def test_a_local_deb_is_installed_and_a_new_build_gives_a_new_image(tmp_path: Path) -> None:
    from pytest_systemd_harden.machine.images import ImageCache, default_cache_dir

    _needs_root_and_builder()
    cache = ImageCache(default_cache_dir())
    first = cache.get([], release="bookworm", debs=[str(build_deb(tmp_path / "a", "1.0"))])
    assert first.versions["harden-demo"] == "1.0"
    assert first.tree().read_text("usr/share/harden-demo/VERSION") == "1.0\n"
    again = cache.get([], release="bookworm", debs=[str(build_deb(tmp_path / "b", "1.0"))])
    assert again.key == first.key  # the same package built again: the cached image
    bumped = cache.get([], release="bookworm", debs=[str(build_deb(tmp_path / "c", "1.1"))])
    assert bumped.key != first.key and bumped.versions["harden-demo"] == "1.1"
    assert bumped.systemd_version and bumped.systemd_version.startswith("252")



def test_a_maintainer_script_binds_a_port_as_on_a_host_once_apt_has_downloaded(tmp_path: Path) -> None:
    # postgresql's postinst binds ports to find a free one for its first cluster. The build's online sandbox lets it
    # bind none but an ephemeral port (it shares the host's network: no build takes a host port), so the cluster was
    # never made where a host makes it; dpkg runs offline now, in a network of the build's own.
    from pytest_systemd_harden.machine.images import ImageCache, default_cache_dir
    from pytest_systemd_harden.spec.releases import DEFAULT_RELEASE

    _needs_root_and_builder()
    real = ImageCache(default_cache_dir())
    base = real.get((), release=DEFAULT_RELEASE).rootfs.parent  # built, or built now
    cache = ImageCache(tmp_path / "cache")  # a package set built here, every time, on the real cache's base
    (cache.cache_dir / "archive").mkdir(parents=True)
    for record in (real.cache_dir / "archive").glob("*.json"):
        shutil.copy(record, cache.cache_dir / "archive" / record.name)
    (cache.cache_dir / "images").mkdir()
    (cache.cache_dir / "images" / base.name).symlink_to(base)
    # The port, then what a connection to the internet gets there: no route (online it would be let through).
    bind = ("import errno, socket; s = socket.socket(); s.bind(('0.0.0.0', 5432)); print(s.getsockname()[1]); "
            "c = socket.socket(); c.settimeout(1); print(errno.errorcode.get(c.connect_ex(('198.51.100.1', 80))))")
    deb = build_deb(tmp_path, "5.0", depends="python3", postinst=f'python3 -c "{bind}" > /harden-bound 2>&1')
    image = cache.get([], release=DEFAULT_RELEASE, debs=[str(deb)])
    assert image.layers, "built on the base"
    assert image.tree().read_text("harden-bound") == "5432\nENETUNREACH\n"


# Run by a maintainer script: a second chroot out of the tree (root of a user namespace may chroot), then a write to
# each canary, by the host's path, and the names of those written printed.
ESCAPE = """
import os, sys
os.makedirs("/harden-jail", exist_ok=True)
here = os.open("/", os.O_RDONLY)
os.chroot("/harden-jail")
os.fchdir(here)
for _ in range(64):
    os.chdir("..")
os.chroot(".")
for path in sys.argv[1:]:
    try:
        with open(path, "w") as canary:
            canary.write("escaped")
        print("wrote", path)
    except OSError:
        pass
"""


@pytest.mark.parametrize("how", ["on the cached base", "in full"])
def test_a_maintainer_script_cannot_reach_the_host(tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A package's scripts run as root of the tree being built. Through another process's /proc/PID/root, a second
    # chroot, or a device node of the host's disk, host root would reach the host. Each is tried, harmlessly: the
    # canaries are the test's own (one in a world-writable directory on the host's disk, so that only the build's
    # read-only view of the host stops it, one in /var/tmp, one through each /proc/PID/root), the node is never
    # opened. Both ways a build runs them are tried: apt on a copy of the cached base, and mmdebstrap's full build
    # (a base, a VM's kernel, or a .deb whose install on the base failed). Then host root finishes the tree (its
    # hostname, machine-id): the script left both as links to host files, which host root must not write through.
    from pytest_systemd_harden.in_tree import InTree
    from pytest_systemd_harden.machine.images import BASE_PACKAGES, HOSTNAME, ImageCache, _customize

    _needs_root_and_builder()
    monkeypatch.setenv("HARDEN_TEST_TOKEN", "s3cret")  # a CI token in the caller's environment
    pid = os.getpid()
    shared = Path(f"/var/lib/harden-escape-canaries-{pid}")  # what any host user could write to
    canaries = [shared / "canary", Path(f"/var/tmp/harden-escape-canary-{pid}")]
    deputies = [shared / "hostname", shared / "machine-id"]  # what host root would write through the links
    script = (f'cat /proc/self/uid_map > /harden-uid-map; ls /proc | grep -c "^[0-9]" > /harden-processes; '
              f"ln -sf {deputies[0]} /etc/hostname; ln -sf {deputies[1]} /etc/machine-id; "
              f'for p in /proc/[0-9]*; do echo escaped > "$p/root{canaries[1]}" 2>/dev/null; done; '
              f"python3 -c '{ESCAPE}' {' '.join(map(str, canaries))} >> /harden-escapes 2>&1; "
              'mknod /harden-disk b 254 0 2>/dev/null && echo mknod >> /harden-escapes; '
              '(exec 3</dev/console) 2>/dev/null && echo console >> /harden-escapes; env > /harden-env; '
              "stat -c %u /etc/resolv.conf /usr/sbin/policy-rc.d > /harden-lent 2>&1; true")
    deb = build_deb(tmp_path, "4.0", depends="python3", postinst=script)
    shared.mkdir(mode=0o1777)
    shared.chmod(0o1777)
    cache = ImageCache(tmp_path / "cache")
    try:
        if how == "in full":
            staging = tmp_path / "full"
            staging.mkdir()
            cache._run_builder(staging, staging / "rootfs", sorted(BASE_PACKAGES), "bookworm", (str(deb),),
                               lambda line: None)
            rootfs = staging / "rootfs"
            tree = InTree(rootfs)
            _customize(tree)  # as ImageCache.get does after either way
        else:
            image = cache.get([], release="bookworm", debs=[str(deb)])
            rootfs, tree = image.layers[0], image.tree()  # the layer the build made, and the image's tree
        assert not [canary for canary in canaries if canary.exists()], tree.read_text("harden-escapes")
        assert not [path for path in deputies if os.path.lexists(path)], "host root wrote through the build's link"
        assert tree.read_text("etc/hostname") == HOSTNAME + "\n" and not tree.is_link("etc/hostname")
        escapes = tree.read_text("harden-escapes")
        assert "mknod" not in escapes and "wrote" not in escapes.replace("wrote /var/tmp", ""), escapes
        assert "console" not in escapes, escapes  # the base's console node opens nothing (the tree is nodev)
        assert "HARDEN_TEST_TOKEN" not in tree.read_text("harden-env")
        assert int(tree.read_text("harden-processes")) < 10  # its own PID namespace: no host process
        if how == "on the cached base":  # what host root lent the build is the build's root's, not nobody's
            assert tree.read_text("harden-lent").split() == ["0", "0"], tree.read_text("harden-lent")
        # Root of the build is a uid of no account on the host: not host root (whose map is 0 0 4294967295).
        inner, outer, count = tree.read_text("harden-uid-map").split()
        assert inner == "0" and int(outer) >= 0x70000000 and count == "65536"
        assert max(entry.lstat().st_uid for entry in rootfs.rglob("*")) < 65536  # the tree (layer) is given back
        assert os.stat(tree.open("usr/bin/passwd")).st_mode & 0o4000  # with its setuid bits
        assert not mounts_under(tmp_path), "a mount of the build is visible on the host"
        assert not _processes_mentioning(str(tmp_path)), "a process of the build outlived it"
    finally:
        for canary in (*canaries, *deputies):
            canary.unlink(missing_ok=True)
        shared.rmdir()


def test_a_local_deb_whose_dependency_is_missing_fails_in_one_line(tmp_path: Path) -> None:
    from pytest_systemd_harden.errors import ImageBuildError
    from pytest_systemd_harden.machine.images import ImageCache

    _needs_root_and_builder()
    deb = build_deb(tmp_path, "2.0", depends="harden-no-such-package")
    with pytest.raises(ImageBuildError) as raised:
        ImageCache(tmp_path / "cache").get([], release="bookworm", debs=[str(deb)])
    first_line = str(raised.value).splitlines()[0]
    assert "harden-demo" in first_line and "harden-no-such-package" in first_line, str(raised.value)
    _assert_nothing_left(tmp_path / "cache")


def test_a_tree_removed_meanwhile_by_its_owner_is_no_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two removers of one tree (a machine's own stop and another xdist worker's sweep): whichever comes second finds
    # it gone at any step, and that is no error.
    from pytest_systemd_harden.machine import staging

    tree = tmp_path / "propagate" / "harden-0000dead"
    tree.mkdir(parents=True)
    real_lstat = os.lstat

    def gone_after_check(path: object, *args: object, **kwargs: object) -> os.stat_result:
        if str(path) == str(tree):
            tree.rmdir()  # the owner removes it between the existence check and the look at it
        return real_lstat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(staging.os, "lstat", gone_after_check)
    staging.remove_tree(tree)
    assert not tree.exists()


def test_a_local_deb_s_name_is_read_from_its_control_file_even_where_only_root_may_read_it(tmp_path: Path) -> None:
    # dpkg-deb unpacks the spec's own archive to read it: as a uid of no account, the file handed over open, so a
    # .deb only root may read (0600, in a 0700 directory) is read all the same.
    from pytest_systemd_harden.machine.images import deb_package_name

    _needs_root_and_builder()
    folder = tmp_path / "private"
    folder.mkdir(mode=0o700)
    deb = build_deb(folder, "5.0")
    renamed = deb.rename(folder / "misleading_5.0_all.deb")
    renamed.chmod(0o600)
    assert deb_package_name(str(renamed)) == "harden-demo"
    assert deb_package_name(str(folder / "gone_1.0_all.deb")) == "gone"  # no file: the name's first part


def test_a_package_set_installs_from_its_base_s_package_lists_and_updates_them_only_where_they_fall_short(
        tmp_path: Path) -> None:
    # A base's build keeps the package lists mmdebstrap downloaded, beside its tree (which is left as mmdebstrap's
    # cleanup leaves it: no indexes); a package set built on it installs from them without apt-get update. Where
    # they lack what it asks for (the archive moved on since), apt-get update runs first and the install succeeds.
    from pytest_systemd_harden.machine.images import APT_LISTS, ImageCache

    _needs_root_and_builder()
    cache = ImageCache(tmp_path / "cache")
    said: list[str] = []
    image = cache.get(["jq"], said.append, release="bookworm")
    base = image.layers[1].parent
    kept = sorted(path.name for path in (base / APT_LISTS).iterdir())
    assert any(name.endswith("_main_binary-amd64_Packages") for name in kept), kept
    assert sorted(os.listdir(base / "rootfs" / "var" / "lib" / "apt" / "lists")) == ["lock", "partial"]
    layered = said[said.index("  installing jq on the cached base image"):]  # after the base's own build
    assert "  from the package lists of the base image's build" in layered, said
    assert not [line for line in layered if "apt-get update" in line], said
    assert image.versions["jq"].startswith("1.6")  # bookworm's
    layer_lists = image.layers[0] / "var" / "lib" / "apt" / "lists"
    assert not [path.name for path in layer_lists.glob("*Packages*")], "the layer kept the indexes it was lent"

    for path in (base / APT_LISTS).iterdir():  # lists of an archive that has none of it
        path.write_text("")
    said.clear()
    other = cache.get(["hello"], said.append, release="bookworm")
    assert "  the base image's package lists are out of date for this: apt-get update first" in said, said
    assert other.versions["hello"] and other.tree().is_file("usr/bin/hello")
    assert not [path.name for path in (other.layers[0] / "var" / "lib" / "apt" / "lists").glob("*Packages*")]


def test_a_build_step_in_the_background_has_the_weakest_priority_until_raised() -> None:
    # What images.BuildPriority asks of the kernel, for a process tree of a build (a session of its own): the nice
    # value of its autogroup (how this kind of host shares the CPU between sessions) and of its processes.
    from pytest_systemd_harden.machine.cgroups import BACKGROUND_NICE, Contained

    _needs_root_and_builder()
    step = Contained.start(["sh", "-c", "sleep 60 & wait"], "build", f"harden-priority-{os.getpid()}")
    try:
        deadline = time.monotonic() + 10
        while len(step.pids()) < 2 and time.monotonic() < deadline:  # the shell and its sleep, forked
            time.sleep(0.01)
        leader = step.process.pid
        step.set_background(True)
        autogroup = Path(f"/proc/{leader}/autogroup")
        if autogroup.exists():  # a kernel with CONFIG_SCHED_AUTOGROUP
            assert autogroup.read_text().split()[-1] == str(BACKGROUND_NICE), autogroup.read_text()
        assert {pid: os.getpriority(os.PRIO_PROCESS, pid) for pid in step.pids()} == dict.fromkeys(
            step.pids(), BACKGROUND_NICE)
        step.set_background(False)
        if autogroup.exists():
            assert autogroup.read_text().split()[-1] == "0"
        assert {os.getpriority(os.PRIO_PROCESS, pid) for pid in step.pids()} == {0}
    finally:
        step.stop(grace=1.0)
