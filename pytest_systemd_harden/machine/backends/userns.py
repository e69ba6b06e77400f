"""Container root without power over the host: the nspawn machine in a user namespace of its own.

Without user namespacing, root in an nspawn container holds CAP_SYS_ADMIN over the host's kernel: it can remount
/proc/sys read-write and write host sysctls, mount the host's cgroup trees, remount a bound file read-write. In a
user namespace it is an unprivileged uid on the host (``base``), and the kernel refuses all three.

nspawn's own ways to give the image that uid do not fit a cached image booted with ``--volatile=overlay`` here
(systemd 252, measured): ``--private-users-ownership=map`` fails ("ID mapped mounts are apparently not available":
nspawn tries to idmap the overlay, which overlayfs refuses), ``chown`` would copy the whole tree up into the
overlay. So nspawn is started by a wrapper (machine/mounts.py) in a mount namespace of its own, where the image's
directory is replaced by an idmapped mount of itself (every owner seen moved up by ``base``; file capabilities
follow, the kernel maps their root uid; read-only), under the machine's writable layer (nspawn.py:
``NspawnMachine._mount_plan``), and nspawn boots that with
``--private-users=BASE:65536 --private-users-ownership=off``. The mount exists only in nspawn's namespace and goes
with it; the cached image is read, never changed. Where the image cannot be booted that way (before Linux 5.19,
whose overlayfs takes no idmapped layer, or a filesystem that cannot be idmapped: :func:`idmap_refused`), the image
gets a shifted copy instead (every owner
moved up by ``base``), made once beside it: 8,800 files, one inode each, which on a disk where creating one takes a
millisecond cost 5-8 s per image.

The container's bus then sees host root as ``nobody`` (SO_PEERCRED has no mapping for uid 0) and refuses it. The
socket is connected by a short-lived process running as the container's root uid on the host (what sd-bus does
for ``machinectl``, by joining the user namespace); the plugin's client then speaks over that socket as root of the
container. No command ever runs outside a unit of the container's systemd.
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import stat
import struct
import subprocess
import sys
import uuid
from pathlib import Path

from ...errors import MachineError
from ...in_tree import InTree
from .. import mounts
from ..staging import copy_tree, remove_tree

RANGE = 0x10000  # uids 0-65535 of the container
# nspawn's own range for container uids (systemd's docs/UIDS-GIDS.md): 0x00080000-0x6FFEFFFF.
_FIRST_BASE = 0x00080000
_BASES = (0x6FFF0000 - _FIRST_BASE) // RANGE
SHIFTED_PREFIX = "userns-"

# Runs as the container's root uid on the host: connects to the bus socket given as an O_PATH descriptor and hands
# the connected socket back over a socket pair.
_CONNECT = """
import os, socket, sys
path_fd, channel_fd = int(sys.argv[1]), int(sys.argv[2])
bus = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
bus.connect(f"/proc/self/fd/{path_fd}")
socket.send_fds(socket.socket(fileno=channel_fd), [b"."], [bus.fileno()])
"""


def idmapped(command: list[str], rootfs: Path, base: int) -> list[str]:
    """``command`` (nspawn's) started where ``rootfs`` is an idmapped mount of itself, owners moved up by ``base``
    (see the module docstring), in a mount namespace of its own (machine/mounts.py)."""
    return mounts.then([{"idmap": str(rootfs), "base": base}], command)


# Run in the wrapper's place of nspawn: what a machine's writable layer does with the idmapped tree, an overlay
# with it as the lower layer (overlayfs takes idmapped layers from Linux 5.19 on; 5.12-5.18 idmap, then refuse the
# overlay). The tmpfs ($1: a directory that does not hold the tree) and the overlay are in the wrapper's mount
# namespace only.
_OVERLAY_PROBE = ('mount -t tmpfs harden-probe "$1" && mkdir "$1/upper" "$1/work" "$1/merged" && '
                  'mount -t overlay harden-probe -o "lowerdir=$0,upperdir=$1/upper,workdir=$1/work" "$1/merged"')


_IDMAP_VERDICTS: dict[int, str | None] = {}  # by the device of the filesystem tried


def idmap_refused(rootfs: Path) -> str | None:
    """None where an image on ``rootfs``'s filesystem can be booted idmapped (tried once per filesystem, as nspawn
    uses it, in a child with a mount namespace of its own: nothing is mounted on the host), else why not."""
    device = os.stat(rootfs).st_dev
    if device not in _IDMAP_VERDICTS:
        scratch = next((d for d in ("/run", "/mnt", "/tmp", "/var/tmp") if os.path.isdir(d)
                        and not str(rootfs.resolve()).startswith(d + "/")), "/run")
        tried = subprocess.run(idmapped(["/bin/sh", "-c", _OVERLAY_PROBE, str(rootfs), scratch], rootfs, _FIRST_BASE),
                               capture_output=True, text=True, check=False)
        _IDMAP_VERDICTS[device] = None if tried.returncode == 0 else (tried.stderr.strip().splitlines() or
                                                                        [f"exit status {tried.returncode}"])[-1]
    return _IDMAP_VERDICTS[device]


def base_for(image_key: str) -> int:
    """The host uid of the container's root for an image: fixed per image, so its shifted copy is reused."""
    return _FIRST_BASE + (int(image_key, 16) % _BASES) * RANGE


def shifted_rootfs(rootfs: Path, base: int) -> Path:
    """A copy of ``rootfs`` with every owner moved up by ``base``, made once beside it under a lock."""
    folder = rootfs.parent / f"{SHIFTED_PREFIX}{base:x}"
    done = folder / rootfs.name  # a layered image's layer is shifted as its base is (each a copy of its own)
    if done.is_dir():  # made in a staging directory, renamed into place whole
        return done
    with open(rootfs.parent / f"{SHIFTED_PREFIX}lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.is_dir():
            return done
        for stale in rootfs.parent.glob(f"{SHIFTED_PREFIX}staging-*"):
            remove_tree(stale)  # a copy a killed run left: we hold the lock, so nobody is making it
        staging = rootfs.parent / f"{SHIFTED_PREFIX}staging-{uuid.uuid4().hex[:12]}"
        try:
            staging.mkdir()
            try:
                copy_tree(rootfs, staging / rootfs.name)
            except OSError as exc:
                raise MachineError(f"could not copy {rootfs} for a user-namespaced container: {exc}") from None
            shift_ownership(staging / rootfs.name, base)
            remove_tree(folder)
            staging.rename(folder)
        finally:
            remove_tree(staging)
    return done


def shift_ownership(root: Path, base: int) -> None:
    """Move every owner under ``root`` up by ``base`` (see :func:`move_ownership`)."""
    move_ownership(root, 0, base)


def move_ownership(root: Path, old_base: int, new_base: int) -> None:
    """Give every entry under ``root`` owned by ``old_base`` + id (id 0-65535) to ``new_base`` + id, keeping setuid
    bits and file capabilities (chown drops both). What names a uid in an extended attribute moves with the owners:
    a file capability's root uid (revision 3 for a user namespace's root, revision 2 for host root, as a build by
    host root writes it) and the users and groups of POSIX ACLs (systemd's tmpfiles gives /var/log/journal one for
    group adm). An entry owned outside the old range is left: moved already (a hard link seen twice)."""
    def move(path: str) -> None:
        st = os.lstat(path)
        if not (old_base <= st.st_uid < old_base + RANGE and old_base <= st.st_gid < old_base + RANGE):
            return
        named = () if stat.S_ISLNK(st.st_mode) else os.listxattr(path, follow_symlinks=False)
        caps = os.getxattr(path, _CAPABILITY, follow_symlinks=False) if _CAPABILITY in named else None
        os.lchown(path, st.st_uid - old_base + new_base, st.st_gid - old_base + new_base)
        if st.st_mode & 0o6000 and not stat.S_ISLNK(st.st_mode):
            os.chmod(path, st.st_mode & 0o7777)
        if caps is not None:
            os.setxattr(path, _CAPABILITY, _with_root_uid(caps, new_base))
        for name in _ACLS:
            if name in named:
                acl = os.getxattr(path, name)
                moved = _acl_moved(acl, old_base, new_base)
                if moved != acl:
                    os.setxattr(path, name, moved)

    for directory, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            move(os.path.join(directory, name))
    move(str(root))


_CAPABILITY = "security.capability"
_ACLS = ("system.posix_acl_access", "system.posix_acl_default")


def _acl_moved(acl: bytes, old_base: int, new_base: int) -> bytes:
    """A POSIX ACL xattr (a version word, then entries of tag, permissions, id) with the ids of its named users and
    groups (tags ACL_USER 2, ACL_GROUP 8) moved from ``old_base`` to ``new_base``."""
    entries = bytearray(acl)
    for offset in range(4, len(entries) - 7, 8):
        tag, _permissions, named = struct.unpack_from("<HHI", entries, offset)
        if tag in (2, 8) and old_base <= named < old_base + RANGE:
            struct.pack_into("<I", entries, offset + 4, named - old_base + new_base)
    return bytes(entries)


def _with_root_uid(caps: bytes, root_uid: int) -> bytes:
    """The capability sets of ``caps`` (v2 or v3) as an xattr that counts for ``root_uid``: VFS_CAP_REVISION_3
    naming it, or VFS_CAP_REVISION_2 for host root."""
    words = array.array("I", caps[:20].ljust(20, b"\0"))
    if root_uid == 0:
        words[0] = 0x02000000 | (words[0] & 0x1)  # revision 2, keep the effective bit
        return words.tobytes()
    words[0] = 0x03000000 | (words[0] & 0x1)  # revision 3, keep the effective bit
    return words.tobytes() + root_uid.to_bytes(4, sys.byteorder)


def connect_as(root: Path, relative: str, uid: int) -> socket.socket:
    """A unix socket connected to the socket at ``relative`` in a running machine's tree (``root``: its
    /proc/PID/root) by a process running as ``uid`` (so the peer sees that uid). The path is resolved as the machine
    resolves it (in_tree.InTree): a link the machine made there to a host path (``/run/systemd/private``) reaches
    the machine's own file, never the host's socket."""
    socket_path = root / relative
    try:
        path_fd = InTree(root, running=True).open(relative, os.O_PATH)
    except OSError as exc:
        raise MachineError(f"could not connect to {socket_path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(os.fstat(path_fd).st_mode):
        os.close(path_fd)
        raise MachineError(f"could not connect to {socket_path}: not a socket")
    if uid == os.geteuid():  # no helper needed to be who we are
        bus = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            bus.connect(f"/proc/self/fd/{path_fd}")
        except OSError as exc:
            bus.close()
            raise MachineError(f"could not connect to {socket_path}: {exc.strerror}") from None
        finally:
            os.close(path_fd)
        return bus
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        helper = subprocess.run(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", sys.executable, "-I", "-c",
             _CONNECT, str(path_fd), str(theirs.fileno())],
            pass_fds=(path_fd, theirs.fileno()), capture_output=True, text=True, timeout=30, check=False)
        theirs.close()
        if helper.returncode != 0:
            raise MachineError(f"could not connect to {socket_path} as uid {uid}: {helper.stderr.strip()}")
        ours.settimeout(5)
        _data, fds, _flags, _address = socket.recv_fds(ours, 1, 1)
        if not fds:
            raise MachineError(f"could not connect to {socket_path} as uid {uid}: no socket came back")
        return socket.socket(fileno=fds[0])
    finally:
        os.close(path_fd)
        ours.close()
        theirs.close()
