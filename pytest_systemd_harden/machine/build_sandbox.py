"""Where an image build runs the packages' code: as an unprivileged host uid, in a read-only view of the host.

Building an image runs Debian packages' maintainer scripts, and a spec's own .debs': code from outside the project,
run as root of the tree being built. Run as host root (mmdebstrap's root mode, apt in a chroot), such a script can
reach the host: write any file through a second chroot or another process's ``/proc/PID/root``, make a device node
for the host's disk, load a kernel module, talk to host root's services over abstract sockets as uid 0. So every
build step that runs them (:func:`sandboxed`) runs

- in a user namespace whose root is host uid ``base`` (:func:`build_base`: a range of 65,536 ids in
  0x70000000-0x7FFCFFFF, which systemd leaves unallocated (its docs/UIDS-GIDS.md) and machines never get): no
  capability over the host's files, processes or kernel. The tree is handed over owned by that range
  (:func:`hand_over`) and taken back to 0-65535 with its setuid bits and file capabilities (:func:`take_back`)
  before anything else reads it;
- in a mount namespace whose root is a recursive read-only copy of the host's: the build's own directory (seen at
  :data:`INSIDE`, without device nodes) and fresh tmpfs on /tmp, /var/tmp and /dev/shm are all it can write, even
  after a second chroot, and only the system's directories (/usr, /etc, /var/tmp, ...) are not empty; mounts it
  makes are its own (the copy's mounts are locked by the kernel: it can neither remount them writable nor unmount
  one to see under it);
- in a PID namespace of its own, whose procfs host root mounts over the host's: it sees only the build's processes,
  and when the build's first process ends, the kernel ends every other (and the wrapper ends it when stopped or
  killed itself); in IPC and UTS namespaces of its own (no
  System V shared memory or hostname shared with the host), with a session keyring of its own (not the keys of the
  host user who started it) and an environment of its own (not the caller's tokens);
- scoped by Landlock (Linux 6.12): no abstract socket or signal outside itself, so two builds at once cannot pass
  each other a descriptor into their trees (on older kernels builds take turns instead), and TCP connections to the
  HTTP(S), mirror and proxy ports only;
- writing only a work directory (:func:`prepare`) in the build directory, never the build directory itself: what
  host root later writes there (a manifest, a lock) or renames into the cache is out of the build's reach, and the
  tree it made is taken out of the work directory only if it is a directory (:func:`finish`), never a link.

It keeps the host's network: apt downloads the packages. (As any unprivileged host user, it can connect to the
host's TCP services on the ports it may reach and to named sockets it can see; what answers sees a uid of no
account.)

Needs Linux 5.12 (``mount_setattr``, for the read-only copy).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import urllib.parse
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

from .backends.userns import RANGE, move_ownership
from .staging import check_shape, remove_tree

INSIDE = "/tmp/harden-build"  # where the build sees its own directory (the host's path may be unreadable to it)
VIEW = "view"  # the empty directory in the build's directory where the read-only copy is assembled
WORK = "work"  # the directory in the build's directory that the build writes, seen at INSIDE
_REFUSED = "pytest-systemd-harden: the kernel refused the image build's sandbox: "
_REFUSED_STATUS = 125
_FIRST_BASE = 0x70000000
# The last range below systemd's foreign uids (0x7FFE0000-0x7FFEFFFF, systemd 257) is for the host's helpers that
# drop root without a sandbox of their own: QEMU (backends/qemu.py) and the .deb reader (images.py).
HELPER_UIDS = 0x7FFD0000
_BASES = (HELPER_UIDS - _FIRST_BASE) // RANGE


def helper_environment(**extra: str) -> dict[str, str]:
    """The environment of a helper that drops root (QEMU, the .deb reader): the host's ``PATH`` to find its
    programs, ``extra``, and nothing else of the caller's (its tokens), for a helper taken over to read."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", **extra}

# What a build's environment holds: nothing of the caller's (its tokens, its credentials) but a proxy apt needs.
_PLAIN = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}
_PASSED_ON = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")

# What of the host's tree a build sees (read-only): the system's programs, libraries and configuration, its devices
# and /run (the resolver's files), with the Nix and Guix stores where the system lives there.
_SYSTEM = {b"usr", b"etc", b"bin", b"sbin", b"lib", b"lib32", b"lib64", b"libx32", b"dev", b"proc", b"sys", b"tmp",
           b"var", b"run", b"nix", b"gnu"}

# Runs as host root. The wrapper enters new PID, IPC and UTS namespaces and forks the build's first process (PID 1
# there), which sets up the read-only view in a mount namespace of its own, mounts the procfs of its PID namespace
# over the host's there (so the build can never unmount it to see the host's: mounts made before the user namespace
# are locked), then enters a user namespace whose root is host uid BASE (mapped from outside by the wrapper, which
# alone may write a map to another uid), becomes that root and execs the command in a mount namespace it owns, with
# the environment it was given and nothing of the caller's.
_SANDBOX = r"""
import ctypes, fcntl, json, os, select, signal, struct, sys
build, base, argv = sys.argv[1].encode(), int(sys.argv[2]), sys.argv[5:]
given = json.loads(sys.argv[3])
visible, ports = [os.fsencode(path.rstrip("/")) for path in given["visible"]], given["ports"]
env = json.loads(os.environ.get("HARDEN_BUILD_ENV") or DEFAULT_ENV)  # not argv: any host user reads argv
inside = b"INSIDE"
libc = ctypes.CDLL(None, use_errno=True)
def refuse(what):
    print(f"PREFIX{what}", file=sys.stderr, flush=True)
    os._exit(STATUS)
def check(result, what):
    if result < 0:
        error = ctypes.get_errno()
        refuse(f"{what}: {os.strerror(error)}")
    return result
# Landlock scopes (Linux 6.12): the build cannot connect to an abstract socket, nor signal a process, outside
# itself; so two builds at once cannot pass each other a descriptor. Without them, builds take turns.
scoped = libc.syscall(444, None, 0, 1) >= 6  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
if not scoped:
    turns = os.open("/run/pytest-systemd-harden-builds.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600)
    fcntl.flock(turns, fcntl.LOCK_EX)
check(libc.unshare(0x20000000 | 0x8000000 | 0x4000000), "unshare(CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS)")
unshared, mapped = os.pipe(), os.pipe()
child = os.fork()
if child == 0:
    os.close(unshared[0])
    os.close(mapped[1])
    libc.prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL: the build goes with the wrapper
    check(libc.unshare(0x20000), "unshare(CLONE_NEWNS)")
    check(libc.mount(b"none", b"/", None, 0x40000 | 0x4000, None), "making / private")  # MS_PRIVATE | MS_REC
    view = check(libc.syscall(428, -100, b"/", 0x1 | 0x8000 | 0o2000000), "open_tree")  # CLONE, AT_RECURSIVE
    attr = struct.pack("=QQQQ", 0x1, 0, 0, 0)  # MOUNT_ATTR_RDONLY
    check(libc.syscall(442, view, b"", 0x1000 | 0x8000, attr, len(attr)), "mount_setattr")  # AT_EMPTY_PATH, AT_RECURSIVE
    root = build + b"/VIEW"
    check(libc.syscall(429, view, b"", -100, root, 0x4), "move_mount")  # MOVE_MOUNT_F_EMPTY_PATH
    os.close(view)
    # MS_NOSUID | MS_NODEV | MS_NOEXEC: this PID namespace's processes only
    check(libc.mount(b"proc", root + b"/proc", b"proc", 0x2 | 0x4 | 0x8, None), "mounting the build's procfs")
    for scratch in (b"/tmp", b"/var/tmp", b"/dev/shm"):
        if os.path.isdir(root + scratch):  # MS_NOSUID | MS_NODEV
            check(libc.mount(b"harden-build", root + scratch, b"tmpfs", 0x2 | 0x4, b"mode=1777"), "tmpfs")
    # The build sees the system, not what the host keeps (users' keys and tokens, checkouts, CI workspaces, service
    # data, logs): every other directory at the top, and in /var, is empty to it, unless it holds a path the build
    # is given (a file:// mirror). MS_RDONLY | MS_NOSUID | MS_NODEV
    private = [b"/" + name for name in os.listdir(root) if name not in SYSTEM]
    private += [b"/var/" + name for name in os.listdir(root + b"/var") if name != b"tmp"]
    for path in (*private, b"/run/user", b"/run/secrets"):
        if os.path.isdir(root + path) and not os.path.islink(root + path) and \
                not any(wanted == path or wanted.startswith(path + b"/") for wanted in visible):
            check(libc.mount(b"harden-build", root + path, b"tmpfs", 0x1 | 0x2 | 0x4, b"mode=755"), "tmpfs")
    os.mkdir(root + inside)
    # The build's tree is bound without device nodes (MS_NODEV): a node copied with a base (its console) opens nothing.
    check(libc.mount(build + b"/WORK", root + inside, None, 0x1000, None), "binding the build's directory")  # MS_BIND
    check(libc.mount(None, root + inside, None, 0x1000 | 0x20 | 0x4, None), "the build's directory without devices")
    os.chdir(root)
    check(libc.syscall(155, b".", b"."), "pivot_root")
    check(libc.umount2(b".", 2), "detaching the host's tree")  # MNT_DETACH
    os.chdir(inside)
    check(libc.unshare(0x10000000), "unshare(CLONE_NEWUSER)")
    os.write(unshared[1], b"y")
    if os.read(mapped[0], 1) != b"y":
        os._exit(1)
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    # Changing ids clears the parent-death signal: set it again, then make sure the wrapper did not die meanwhile
    # (it holds the pipe's other end until the build is over).
    libc.prctl(1, 9)
    if select.select([mapped[0]], [], [], 0)[0]:
        os._exit(1)
    # The session keyring is inherited: the keys of whoever started the run (KEYCTL_JOIN_SESSION_KEYRING, a new
    # anonymous one). ENOSYS: a kernel without keyrings has none to share.
    if libc.syscall(250, 1, None) < 0 and ctypes.get_errno() != 38:
        check(-1, "a session keyring of its own")
    if scoped:
        # handled_access_fs, handled_access_net (LANDLOCK_ACCESS_NET_CONNECT_TCP), scoped (ABSTRACT_UNIX_SOCKET |
        # SIGNAL); then a rule per TCP port it may connect to (LANDLOCK_RULE_NET_PORT): the mirrors' and a proxy's.
        rules = struct.pack("=QQQ", 0, 0x2, 0x1 | 0x2)
        ruleset = check(libc.syscall(444, rules, len(rules), 0), "landlock_create_ruleset")
        for port in ports:
            rule = struct.pack("=QQ", 0x2, port)
            check(libc.syscall(445, ruleset, 2, rule, 0), "landlock_add_rule")
        check(libc.syscall(446, ruleset, 0), "landlock_restrict_self")
        os.close(ruleset)
    os.execvpe("unshare", ["unshare", "--mount", "--propagation", "private", "--fork", "--kill-child", "--", *argv],
               env)
os.close(unshared[1])
os.close(mapped[0])
if os.read(unshared[0], 1) == b"y":
    try:
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{child}/{name}", "w") as mapping:
                mapping.write(f"0 {base} 65536\n")
        os.write(mapped[1], b"y")
    except OSError as error:
        refuse(f"the uid map: {error}")
# Stopped (a run interrupted, its cgroup stopped), the wrapper ends the build first: killing the PID namespace's
# first process kills every process in it.
for stop in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(stop, lambda number, frame: os.kill(child, signal.SIGKILL))
_, status = os.waitpid(child, 0)
os.close(mapped[1])
sys.exit(os.waitstatus_to_exitcode(status))
""".replace("INSIDE", INSIDE).replace("VIEW", VIEW).replace("WORK", WORK).replace("DEFAULT_ENV", repr(json.dumps(_PLAIN))).replace("SYSTEM", repr(_SYSTEM)).replace("PREFIX", _REFUSED).replace("STATUS", str(_REFUSED_STATUS))


def refusal(returncode: int, output: Sequence[str]) -> str | None:
    """The one-line error and hint when a build step failed because its sandbox could not be set up, else None."""
    said = [line for line in output if line.startswith(_REFUSED)]
    if returncode != _REFUSED_STATUS or not said:
        return None
    return (said[-1].removeprefix("pytest-systemd-harden: ") + "\nhint: image builds run as root of a user namespace "
            "in a read-only view of the host (docs/backends.md#image-builds-never-run-as-host-root); they need Linux "
            "5.12 or later (mount_setattr) and user namespaces (sysctl user.max_user_namespaces above 0)")


def build_base(name: str) -> int:
    """The host uid of the build's root for the build directory ``name``: one of 4,094 ranges, picked by the name, so
    two builds at once rarely share one. Sharing is harmless: what keeps two builds apart is the read-only view (each
    writes only its own work directory) and their namespaces, not the uids."""
    return _FIRST_BASE + (zlib.crc32(name.encode()) % _BASES) * RANGE


def sandboxed(command: Sequence[str], build: Path, base: int, sources: Sequence[str] = ()) -> list[str]:
    """``command`` run as described above, with the work directory of ``build`` (made by :func:`prepare`) writable
    at :data:`INSIDE` and its working directory there, and the environment :func:`environment` gives the wrapper
    (without it: a plain ``PATH`` and nothing else). ``sources`` are the apt source lines the build downloads from:
    a ``file://`` one's directory is seen (read-only) where the view would hide it, and TCP connections go only to
    HTTP, HTTPS, their ports and a proxy's (a host service on any other port, a database or a local admin API,
    does not answer the build). Paths in ``command`` must be the build's view of them."""
    urls = [word for line in sources for word in line.split() if "://" in word]
    ports = {80, 443}
    for url in [*urls, *(os.environ.get(name, "") for name in _PASSED_ON)]:
        with contextlib.suppress(ValueError):
            ports.add(urllib.parse.urlsplit(url).port or 80)
    given = {"visible": [url.removeprefix("file://") for url in urls if url.startswith("file://")],
             "ports": sorted(ports)}
    return [sys.executable, "-I", "-c", _SANDBOX, str(build), str(base), json.dumps(given), "--", *command]


def environment(env: Mapping[str, str]) -> dict[str, str]:
    """The environment to start :func:`sandboxed`'s wrapper with, so that the build gets ``env``, a plain ``PATH``
    and a proxy the caller has set (apt needs it), and nothing else of the caller's. (Handed over in the wrapper's
    environment, which only root may read, not its argv, which any host user may.)"""
    given = {**_PLAIN, **{name: os.environ[name] for name in _PASSED_ON if name in os.environ}, **env}
    return {**os.environ, "HARDEN_BUILD_ENV": json.dumps(given)}


def prepare(build: Path, base: int) -> Path:
    """Make the work directory in ``build`` (the build's own, host root's), writable for the build's root (host uid
    ``base``), and the empty directory the view is assembled on. Returns the work directory: what host root puts
    there for the build is seen at :data:`INSIDE`."""
    (build / VIEW).mkdir(exist_ok=True)
    work = build / WORK
    work.mkdir()
    os.chown(work, base, base)
    return work


def finish(build: Path, tree: str) -> Path | None:
    """Once the build has ended (nothing of it runs any more), move the tree it made (``tree`` in the work
    directory) to ``build``/``tree`` and remove the rest of the work directory and the view's mount point. None,
    leaving nothing, when the build left no directory there: it failed, or left a link (never followed)."""
    with contextlib.suppress(FileNotFoundError):
        (build / VIEW).rmdir()
    work = build / WORK
    made = work / tree
    try:
        kept = stat.S_ISDIR(os.lstat(made).st_mode)
    except FileNotFoundError:
        kept = False
    if kept:
        os.rename(made, build / tree)  # renames what is there (the build is over), never where a link points
    remove_tree(work)
    return build / tree if kept else None


def hand_over(tree: Path, base: int) -> None:
    """Give ``tree`` (owned by 0-65535, as in the cache) to the build's ids ``base``-``base``+65535."""
    move_ownership(tree, 0, base)


def take_back(tree: Path, base: int) -> None:
    """Give ``tree`` back to 0-65535 from the build's ids: every owner, setuid bit and file capability as the build
    left them, as a build by host root would have. ImageBuildError, before anything is changed, for a tree too deep
    or with paths too long to walk (staging.check_shape)."""
    check_shape(tree)
    move_ownership(tree, base, 0)
