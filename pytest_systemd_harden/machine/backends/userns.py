"""Container root without power over the host: the nspawn machine in a user namespace of its own.

Without user namespacing, root in an nspawn container holds CAP_SYS_ADMIN over the host's kernel: it can remount
/proc/sys read-write and write host sysctls, mount the host's cgroup trees, remount a bound file read-write. In a
user namespace it is an unprivileged uid on the host (``base``), and the kernel refuses all three.

nspawn's own ways to give the image that uid do not fit a cached image booted with ``--volatile=overlay`` here
(systemd 252, measured): ``--private-users-ownership=map`` fails ("ID mapped mounts are apparently not available":
overlayfs is not idmappable), ``chown`` would copy the whole tree up into the overlay. So each cached image gets a
shifted copy (every owner moved up by ``base``), made once beside it (about 5 s, 256 MiB) and booted with
``--private-users=BASE:65536 --private-users-ownership=off``.

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
import subprocess
import sys
import uuid
from pathlib import Path

from ...errors import MachineError
from ..staging import remove_tree

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


def base_for(image_key: str) -> int:
    """The host uid of the container's root for an image: fixed per image, so its shifted copy is reused."""
    return _FIRST_BASE + (int(image_key, 16) % _BASES) * RANGE


def shifted_rootfs(rootfs: Path, base: int) -> Path:
    """A copy of ``rootfs`` with every owner moved up by ``base``, made once beside it under a lock."""
    folder = rootfs.parent / f"{SHIFTED_PREFIX}{base:x}"
    done = folder / "rootfs"
    if (done / "usr" / "lib" / "systemd" / "systemd").exists():
        return done
    with open(rootfs.parent / f"{SHIFTED_PREFIX}lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (done / "usr" / "lib" / "systemd" / "systemd").exists():
            return done
        for stale in rootfs.parent.glob(f"{SHIFTED_PREFIX}staging-*"):
            remove_tree(stale)  # a copy a killed run left: we hold the lock, so nobody is making it
        staging = rootfs.parent / f"{SHIFTED_PREFIX}staging-{uuid.uuid4().hex[:12]}"
        try:
            staging.mkdir()
            copied = subprocess.run(["cp", "-a", "--reflink=auto", str(rootfs), str(staging / "rootfs")],
                                    capture_output=True, text=True, check=False)
            if copied.returncode != 0:
                raise MachineError(f"could not copy {rootfs} for a user-namespaced container: {copied.stderr.strip()}")
            shift_ownership(staging / "rootfs", base)
            remove_tree(folder)
            staging.rename(folder)
        finally:
            remove_tree(staging)
    return done


def shift_ownership(root: Path, base: int) -> None:
    """Move every owner under ``root`` up by ``base``, keeping setuid bits and file capabilities (chown drops
    both; a file capability must name the container's root to count in its user namespace)."""
    def shift(path: str) -> None:
        st = os.lstat(path)
        if st.st_uid >= RANGE or st.st_gid >= RANGE:
            return  # already shifted
        link = os.path.islink(path)
        caps = None if link else _file_capability(path)
        os.lchown(path, st.st_uid + base, st.st_gid + base)
        if not link:
            os.chmod(path, st.st_mode & 0o7777)
            if caps is not None:
                os.setxattr(path, "security.capability", _with_root_uid(caps, base))

    for directory, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            shift(os.path.join(directory, name))
    shift(str(root))


def _file_capability(path: str) -> bytes | None:
    try:
        return os.getxattr(path, "security.capability", follow_symlinks=False)
    except OSError:
        return None


def _with_root_uid(caps: bytes, root_uid: int) -> bytes:
    """A VFS_CAP_REVISION_3 xattr (the capability sets of ``caps``, v2 or v3) owned by ``root_uid``."""
    words = array.array("I", caps[:20].ljust(20, b"\0"))
    words[0] = 0x03000000 | (words[0] & 0x1)  # revision 3, keep the effective bit
    return words.tobytes() + root_uid.to_bytes(4, sys.byteorder)


def connect_as(socket_path: Path, uid: int) -> socket.socket:
    """A unix socket connected to ``socket_path`` by a process running as ``uid`` (so the peer sees that uid)."""
    path_fd = os.open(socket_path, os.O_PATH | os.O_CLOEXEC)
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
