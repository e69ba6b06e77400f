"""Where an image build runs the packages' code: as an unprivileged host uid, in a read-only view of the host.

Building an image runs Debian packages' maintainer scripts, and a spec's own .debs': code from outside the project,
run as root of the tree being built. Run as host root (mmdebstrap's root mode, apt in a chroot), such a script can
reach the host: write any file through a second chroot or another process's ``/proc/PID/root``, make a device node
for the host's disk, load a kernel module, talk to host root's services over abstract sockets as uid 0. So every
build step that runs them (:func:`sandboxed`) runs

- in a user namespace whose root is host uid ``base`` (:func:`build_base`: a range of 65,536 ids in
  0x70000000-0x7FFCFFFF, which systemd leaves unallocated (its docs/UIDS-GIDS.md) and machines never get): no
  capability over the host's files, processes or kernel. The tree is built owned by that range (a package set's
  base seen through an idmapped mount, :func:`prepare`) and taken back to 0-65535 with its setuid bits and file
  capabilities (:func:`take_back`) before anything else reads it;
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
  HTTP(S), mirror and proxy ports only, binding an ephemeral port only; or ``offline`` (where maintainer scripts
  run once apt has downloaded everything): in a network namespace of its own with only ``lo``, which leaves the
  TCP rules nothing to guard;
- writing only a work directory (:func:`prepare`) in the build directory, never the build directory itself: what
  host root later writes there (a manifest, a lock) or renames into the cache is out of the build's reach, and the
  tree it made is taken out of the work directory only if it is a directory (:func:`finish`), never a link;
- in memory where the host has it to spare: the work directory is a tmpfs of its own (:func:`build_memory`), so a
  build writes to the cache's disk only a finished tree that fits there (at most that size), and no journal: a base image built there took 15-17 s against 24-32 s
  on this project's CI disk (docs/performance.md, section 8). The tmpfs is mounted in a mount namespace of its
  own, kept by a small process (:func:`prepare`, machine/mounts.py), which the host never sees and the kernel
  takes down with the keeper and the build, however the run ends; the finished tree is copied to the disk
  (:func:`finish`). A build on a built tree (a package set on its base) writes on an overlay of it mounted there
  too, and only the overlay's upper layer is taken.

It keeps the host's network (apt downloads the packages; an ``offline`` step has a network of its own instead), but
only the internet's addresses and those of its mirrors, proxies and name servers: BPF programs on its cgroup refuse
the host's loopback, private and link-local networks (a cloud's metadata service) to its TCP connections and UDP
sends (machine/build_network.py). (It can still open the named sockets it can see, as any unprivileged host user;
what answers sees a uid of no account.)

Needs Linux 5.12 (``mount_setattr``, for the read-only copy).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import platform
import stat
import sys
import threading
import urllib.parse
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from ..errors import ImageBuildError
from . import build_network, mounts
from .backends.userns import RANGE, move_ownership
from .staging import check_shape, copy_tree, remove_tree

INSIDE = "/tmp/harden-build"  # where the build sees its own directory (the host's path may be unreadable to it)
VIEW = "view"  # the empty directory in the build's directory where the read-only copy is assembled
WORK = "work"  # the directory in the build's directory that the build writes, seen at INSIDE
TREE = "rootfs"  # in the work directory: the overlay a build on a built tree writes (prepare's lower)
UPPER = ".layer/upper"  # in the work directory: that overlay's upper layer, what the build added
_REFUSED = "pytest-systemd-harden: the kernel refused the image build's sandbox: "
_REFUSED_STATUS = 125
_FIRST_BASE = 0x70000000
# The last range below systemd's foreign uids (0x7FFE0000-0x7FFEFFFF, systemd 257) is for the host's helpers that
# drop root without a sandbox of their own: QEMU (backends/qemu.py) and the .deb reader (images.py).
HELPER_UIDS = 0x7FFD0000
_BASES = (HELPER_UIDS - _FIRST_BASE) // RANGE
MEMORY_ENV = "HARDEN_BUILD_MEMORY"
_MEMORY_LIMIT = 8 << 30  # more than any package set this plugin has met needs (a base image: about 400 MB at most)
_MIN_MEMORY = 512 << 20


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
import ctypes, fcntl, json, os, select, signal, socket, struct, sys
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
# The build's cgroup (its own: it holds only this process now) gets the programs that keep its connections to the
# internet and its mirrors, proxies and name servers (build_network.py); attached before anything of it runs.
procs = None
for line in open("/proc/self/cgroup").read().splitlines():
    if line.startswith("0::"):
        for top in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
            if os.path.exists(top + "/cgroup.controllers"):
                procs = top + line[3:].rstrip("/") + "/cgroup.procs"
                break
if procs is None or open(procs).read().split() != [str(os.getpid())]:
    refuse("the build's cgroup2 group is not its own, so its connections cannot be limited")
group = check(os.open(os.path.dirname(procs), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), "opening its cgroup")
license = ctypes.create_string_buffer(b"GPL")
for code, types in given["network"]:
    insns = ctypes.create_string_buffer(bytes.fromhex(code), len(code) // 2)
    for attach_type in types:
        # bpf_attr for BPF_PROG_LOAD: prog_type, insn_cnt, insns, license, ..., expected_attach_type at 68
        attr = bytearray(128)
        struct.pack_into("=IIQQ", attr, 0, 18, len(code) // 16, ctypes.addressof(insns), ctypes.addressof(license))
        struct.pack_into("=I", attr, 68, attach_type)
        buffer = ctypes.create_string_buffer(bytes(attr), len(attr))
        program = check(libc.syscall(321, 5, buffer, len(attr)), "loading its network filter (BPF)")
        # BPF_PROG_ATTACH: target_fd, attach_bpf_fd, attach_type, attach_flags (BPF_F_ALLOW_MULTI)
        attach = ctypes.create_string_buffer(struct.pack("=IIII", group, program, attach_type, 2), 128)
        check(libc.syscall(321, 8, attach, 128), "attaching its network filter to its cgroup")
        os.close(program)
os.close(group)
if given["keeper"]:  # the work directory is a tmpfs in the keeper's mount namespace (prepare()): build there
    namespace = os.open(f"/proc/{given['keeper']}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    check(libc.setns(namespace, 0x20000), "entering the mount namespace of the build's memory")  # CLONE_NEWNS
    os.close(namespace)
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
    # Recursive: an overlay the build writes on a built tree is mounted in it (prepare()). MS_BIND | MS_REC
    check(libc.mount(build + b"/WORK", root + inside, None, 0x1000 | 0x4000, None), "binding the build's directory")
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
    if given["offline"]:
        # A network of its own, owned by the build's user namespace: only lo, up. A port a script binds (to find a
        # free one, as postgresql's does) is then no host port, and nothing is there to connect to.
        check(libc.unshare(0x40000000), "a network of its own: unshare(CLONE_NEWNET)")
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as interface:
                fcntl.ioctl(interface, 0x8914, struct.pack("16sH22x", b"lo", 0x1))  # SIOCSIFFLAGS, IFF_UP
        except OSError as error:
            refuse(f"a network of its own: bringing lo up: {error}")
    if scoped:
        # handled_access_fs, handled_access_net (LANDLOCK_ACCESS_NET_BIND_TCP | CONNECT_TCP), scoped (ABSTRACT_UNIX_SOCKET
        # | SIGNAL); then a rule per TCP port it may connect to (LANDLOCK_RULE_NET_PORT): the mirrors' and a proxy's;
        # and binding only port 0 (an ephemeral port): no server of the build takes a host port, nor answers on one.
        # Offline, the network is the build's own: scopes only.
        network = 0 if given["offline"] else 0x1 | 0x2
        rules = struct.pack("=QQQ", 0, network, 0x1 | 0x2)
        ruleset = check(libc.syscall(444, rules, len(rules), 0), "landlock_create_ruleset")
        if network:
            for port in ports:
                rule = struct.pack("=QQ", 0x2, port)
                check(libc.syscall(445, ruleset, 2, rule, 0), "landlock_add_rule")
            check(libc.syscall(445, ruleset, 2, struct.pack("=QQ", 0x1, 0), 0), "landlock_add_rule")
        check(libc.syscall(446, ruleset, 0), "landlock_restrict_self")
        os.close(ruleset)
    if given["seccomp"]:  # the sockets it may make (build_network.socket_filter): no SCTP, ping, vsock, io_uring
        code = bytes.fromhex(given["seccomp"])
        filters = ctypes.create_string_buffer(code, len(code))
        program = ctypes.create_string_buffer(struct.pack("=HxxxxxxQ", len(code) // 8, ctypes.addressof(filters)), 16)
        check(libc.prctl(22, 2, program, 0, 0), "installing its socket filter (seccomp)")  # PR_SET_SECCOMP, FILTER
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
            "5.12 or later (mount_setattr), user namespaces (sysctl user.max_user_namespaces above 0), and a cgroup2 "
            "tree with BPF (CONFIG_CGROUP_BPF) for the filter of their connections")


def build_base(name: str) -> int:
    """The host uid of the build's root for the build directory ``name``: one of 4,094 ranges, picked by the name, so
    two builds at once rarely share one. Sharing is harmless: what keeps two builds apart is the read-only view (each
    writes only its own work directory) and their namespaces, not the uids."""
    return _FIRST_BASE + (zlib.crc32(name.encode()) % _BASES) * RANGE


def sandboxed(command: Sequence[str], build: Path, base: int, sources: Sequence[str] = (), *,
              offline: bool = False) -> list[str]:
    """``command`` run as described above, with the work directory of ``build`` (made by :func:`prepare`) writable
    at :data:`INSIDE` and its working directory there, and the environment :func:`environment` gives the wrapper
    (without it: a plain ``PATH`` and nothing else). ``sources`` are the apt source lines the build downloads from:
    a ``file://`` one's directory is seen (read-only) where the view would hide it, TCP connections go only to DNS,
    HTTP, HTTPS, their ports and a proxy's (a host service on any other port, a database or a local admin API,
    does not answer the build), and only to the internet's addresses and theirs (build_network.py). ``offline``:
    in a network namespace of its own with only ``lo`` instead (binding any port, which then is no host port;
    connecting nowhere else): where the packages' maintainer scripts run once apt has downloaded everything. Paths
    in ``command`` must be the build's view of them."""
    urls = [word for line in sources for word in line.split() if "://" in word]
    proxies = [os.environ.get(name, "") for name in _PASSED_ON if not name.lower().startswith("no_")]
    ports = {53, 80, 443}  # 53: a name server's answer too long for UDP comes over TCP
    for url in [*urls, *proxies]:
        with contextlib.suppress(ValueError):
            ports.add(urllib.parse.urlsplit(url).port or 80)
    with _KEEPERS_LOCK:
        keeper, _in_memory, _held = _KEEPERS.get(str(build), (None, False, None))
    # Offline, the build's network is its own: no host address to guard, and its own loopback is its to reach.
    network = [] if offline else [(code.hex(), types) for code, types in build_network.programs(
        build_network.allowed_endpoints([*urls, *proxies]), build_network.host_networks())]
    given = {"visible": [url.removeprefix("file://") for url in urls if url.startswith("file://")],
             "ports": sorted(ports), "keeper": keeper.pid if keeper else None, "network": network,
             "seccomp": build_network.socket_filter(platform.machine()).hex(), "offline": offline}
    return [sys.executable, "-I", "-c", _SANDBOX, str(build), str(base), json.dumps(given), "--", *command]


def environment(env: Mapping[str, str]) -> dict[str, str]:
    """The environment to start :func:`sandboxed`'s wrapper with, so that the build gets ``env``, a plain ``PATH``
    and a proxy the caller has set (apt needs it), and nothing else of the caller's. (Handed over in the wrapper's
    environment, which only root may read, not its argv, which any host user may.)"""
    given = {**_PLAIN, **{name: os.environ[name] for name in _PASSED_ON if name in os.environ}, **env}
    return {**os.environ, "HARDEN_BUILD_ENV": json.dumps(given)}


def build_memory() -> int:
    """The size of the tmpfs a build's work directory is (bytes), or 0 to build on the disk.

    ``$HARDEN_BUILD_MEMORY`` sets it (``4G``, ``512M``; ``0``: on the disk). Otherwise an eighth of the host's
    memory, at most 8 GiB, where twice that is available now and it is at least 512 MiB (a base image needs about
    400 MB): four builds at once, each filling its tmpfs, leave the host half its memory. A tmpfs takes memory only as
    the build writes, and gives it back when the tree is on the disk. A build that fills it is built again on the
    disk (images.py)."""
    if not _IN_MEMORY.get():
        return 0
    text = os.environ.get(MEMORY_ENV, "").strip()
    if text:
        size = _size(text)
        if size is None:
            raise ImageBuildError(f"${MEMORY_ENV}={text!r}: expected a size (4G, 512M) or 0 to build on the disk")
        return size
    info = {}
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo", encoding="ascii") as lines:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in lines}
    size = min(info.get("MemTotal", 0) // 8, _MEMORY_LIMIT)
    return size if size >= _MIN_MEMORY and info.get("MemAvailable", 0) >= 2 * size else 0


@contextlib.contextmanager
def on_the_disk() -> Iterator[None]:
    """Builds started in this block (in this thread) write on the disk, whatever :func:`build_memory` says."""
    token = _IN_MEMORY.set(False)
    try:
        yield
    finally:
        _IN_MEMORY.reset(token)


_IN_MEMORY: contextvars.ContextVar[bool] = contextvars.ContextVar("in_memory", default=True)


class MemoryFilled(ImageBuildError):
    """The build filled the tmpfs it ran in (it can be built again on the disk)."""


def _size(text: str) -> int | None:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    number, unit = (text[:-1], units[text[-1].upper()]) if text[-1].upper() in units else (text, 1)
    return int(number) * unit if number.isdigit() else None


def prepare(build: Path, base: int, *, lower: Path | None = None) -> Path:
    """Make the work directory in ``build`` (the build's own, host root's), writable for the build's root (host uid
    ``base``), and the empty directory the view is assembled on. Returns the path host root reaches the work
    directory at: what it puts there for the build is seen at :data:`INSIDE`.

    With :func:`build_memory`, the work directory is a tmpfs in the mount namespace of a keeper process
    (machine/mounts.py), reached through the keeper's working directory (``/proc/KEEPER/cwd``: no host path is
    walked below it). With ``lower`` (a built tree), :data:`TREE` in it is an overlay whose lower layer is ``lower``
    seen through an idmapped mount (every owner moved up by ``base``: nothing of ``lower`` is written or copied) and
    whose upper layer, :data:`UPPER`, gets what the build writes: where only the upper layer, the image's own layer,
    is taken (:func:`finish`); it is in a directory of host root's that the build cannot enter (only the overlay
    writes there), which finish() reaches through a descriptor opened before the build starts (the build owns the
    work directory: it could rename that directory and leave a link in its place). Either way :func:`finish` must
    follow, whatever happens between (it ends the keeper). The keeper
    ends by itself when the process that started it dies (its stdin closes), and its mounts with it."""
    (build / VIEW).mkdir(exist_ok=True)
    work = Path(os.path.realpath(build / WORK))
    work.mkdir()
    size = build_memory()
    if not size and lower is None:
        os.chown(work, base, base)
        return work
    plan: list[dict[str, object]] = []
    if size:
        # At most one inode per 8 KiB (a Debian tree's files average more): the kernel's memory for inodes is bounded.
        plan.append({"tmpfs": str(work),
                     "options": f"size={size},nr_inodes={max(size // 8192, 65536)},mode=0755,uid={base},gid={base}"})
    else:
        os.chown(work, base, base)
    if lower is not None:
        top = os.lstat(lower)
        layer = work / os.path.dirname(UPPER)
        plan += [{"dir": str(layer), "mode": 0o700, "owner": 0},
                 {"dir": str(work / UPPER), "mode": stat.S_IMODE(top.st_mode), "owner": base + top.st_uid},
                 {"dir": str(layer / "work"), "mode": 0o700, "owner": 0},
                 {"dir": str(layer / "lower"), "mode": 0o700, "owner": 0},
                 {"idmap": str(lower), "base": base, "target": str(layer / "lower"), "inert": True},
                 {"dir": str(work / TREE), "mode": 0o755, "owner": base},
                 {"overlay": str(work / TREE), "lower": [str(layer / "lower")], "upper": str(work / UPPER),
                  "work": str(layer / "work"), "inert": True}]
    held: int | None = None
    keeper: mounts.Keeper | None = None
    try:
        keeper = mounts.keep(plan, work, helper_environment())
        if lower is not None:
            # The build owns the work directory, so it could rename .layer and put a link to a host directory in
            # its place: finish() reaches the upper layer through this descriptor, opened before the build starts
            # (on the disk, by the host's own path: a rename across two namespaces' mounts would be EXDEV).
            held = os.open((keeper.seen if size else work) / os.path.dirname(UPPER),
                           os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            found = os.fstat(held)
            if found.st_uid != 0 or stat.S_IMODE(found.st_mode) != 0o700:
                raise OSError(f"{os.path.dirname(UPPER)} is not the directory the keeper made")
    except OSError as exc:
        if held is not None:
            os.close(held)
        if keeper is not None:
            keeper.end()
        what = "a tmpfs for the build" if lower is None else f"the build's overlay on {lower}"
        hint = f"{MEMORY_ENV}=0 builds on the disk" if lower is None else \
            "an overlay with an idmapped lower layer needs Linux 5.19 or later"
        remove_tree(work)
        with contextlib.suppress(FileNotFoundError):
            (build / VIEW).rmdir()
        raise ImageBuildError(f"could not mount {what} at {work}: {exc}; hint: {hint}") from None
    with _KEEPERS_LOCK:
        _KEEPERS[str(build)] = (keeper, bool(size), held)
    return keeper.seen


def finish(build: Path, tree: str, *, keep: bool = True, into: str | None = None) -> Path | None:
    """Once the build has ended (nothing of it runs any more), move the tree it made (``tree`` in the work
    directory) to ``build``/``into`` (default: ``tree``) and remove the rest of the work directory and the view's
    mount point. None, leaving nothing, when the build left no directory there: it failed, or left a link (never
    followed). With ``keep`` false (the build failed or was interrupted: its processes may not all be gone), nothing
    is taken.

    A work directory in memory is copied to the disk (its shape checked first: staging.check_shape; refused if it
    does not fit there) and its keeper ended, which takes the tmpfs down, even when that fails; :class:`MemoryFilled`
    when the build had filled it."""
    into = into or tree
    with _KEEPERS_LOCK:
        keeper, in_memory, held = _KEEPERS.pop(str(build), (None, False, None))
    work = Path(os.path.realpath(build / WORK))
    try:
        with contextlib.suppress(FileNotFoundError):
            (build / VIEW).rmdir()
        if not in_memory:
            try:
                if keeper is not None:
                    keeper.end()  # an overlay on the disk: its upper layer is taken once it is unmounted
                folder, name = (held, os.path.basename(tree)) if held is not None else (None, str(work / tree))
                kept = keep and _is_directory(name, folder)
                if kept:  # renames what is there (the build is over), never a link's target
                    os.rename(name, build / into, src_dir_fd=folder)
            except OSError as exc:
                raise ImageBuildError(f"could not take the built tree to {build / into}: {exc}") from None
            finally:
                remove_tree(work)
            return build / into if kept else None
        assert keeper is not None
        kept = False
        try:
            seen = keeper.seen
            # Reached through the descriptor held since prepare(), by path for cp (a process of its own).
            source = Path(f"/proc/{os.getpid()}/fd/{held}") / os.path.basename(tree) if held is not None \
                else seen / tree
            usage = os.statvfs(seen)
            if usage.f_bavail * usage.f_frsize < 4 << 20 or usage.f_favail < 64:
                raise MemoryFilled(f"the build filled the {usage.f_blocks * usage.f_frsize / (1 << 30):.1f} GiB of "
                                   f"memory it runs in (a tmpfs, ${MEMORY_ENV}); hint: {MEMORY_ENV}=16G gives it "
                                   f"more, {MEMORY_ENV}=0 builds on the disk")
            kept = keep and _is_directory(str(source))
            if kept:
                check_shape(source)
                disk = os.statvfs(build)
                needed = (usage.f_blocks - usage.f_bfree) * usage.f_frsize
                files = usage.f_files - usage.f_ffree
                if needed > disk.f_bavail * disk.f_frsize or files > disk.f_favail:
                    raise ImageBuildError(f"the built tree ({needed >> 20} MiB, {files} files) does not fit on the "
                                          f"disk of {build}; hint: free space there, or set HARDEN_CACHE_DIR to "
                                          "another disk")
                try:
                    copy_tree(source, build / into)
                except OSError as exc:
                    remove_tree(build / into)
                    raise ImageBuildError(f"could not copy the built tree to {build / into}: {exc}") from None
        finally:
            keeper.end()
            work.rmdir()  # on the disk, the tmpfs was never over it
        return build / into if kept else None
    finally:
        if held is not None:
            os.close(held)


def _is_directory(path: str, folder: int | None = None) -> bool:
    """Whether ``path`` (in the directory ``folder``, if given) is a directory itself, not a link to one."""
    try:
        return stat.S_ISDIR(os.stat(path, dir_fd=folder, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


# build directory -> its keeper, whether in memory, and the directory of the overlay's upper layer, held open
_KEEPERS: dict[str, tuple[mounts.Keeper, bool, int | None]] = {}
_KEEPERS_LOCK = threading.Lock()


def take_back(tree: Path, base: int) -> None:
    """Give ``tree`` back to 0-65535 from the build's ids: every owner, setuid bit and file capability as the build
    left them, as a build by host root would have. ImageBuildError, before anything is changed, for a tree too deep
    or with paths too long to walk (staging.check_shape)."""
    check_shape(tree)
    move_ownership(tree, base, 0)
