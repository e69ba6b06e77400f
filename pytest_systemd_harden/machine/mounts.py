"""Mounts made for one use, in a mount namespace of their own: never on the host, gone with their process.

Three uses need mounts the host must never see: a build's work directory in memory with the image it builds on
under it (machine/build_sandbox.py), a layered image's tree read by host root, and the tree a machine boots
(backends/nspawn.py: the image idmapped to the machine's uids, its layers joined under its writable layer). One
script (:data:`_MOUNT`), run as host root, enters a new mount namespace (a slave of the host's: the host's unmounts
reach it, its mounts never reach the host), makes the mounts of its plan in order, and then either

- execs a command there (:func:`then`): nspawn boots the tree, and the namespace goes with it; or
- keeps the namespace for as long as its stdin is open (:func:`keep`), its working directory at the plan's
  ``cwd``: host root reaches what is mounted there as ``/proc/KEEPER/cwd`` (no host path is walked to it). The
  keeper ends when its stdin does: when :meth:`Keeper.end` closes it, or the process that started it dies.

A plan is a list of steps (JSON, so the script needs nothing but the standard library):

- ``{"tmpfs": TARGET, "options": "size=..."}``
- ``{"machine_tree": TARGET, "lower": [TOP, ..., BOTTOM], "base": BASE or null, "options": "size=...",
  "owner": UID}``: the tree a machine boots, on TARGET: each layer cloned read-only first (idmapped by BASE where
  given; TARGET may be a layer itself), then a tmpfs (the machine's writable layer) mounted on TARGET with
  ``upper`` (owned by UID, mode 0755: the machine's ``/``), ``work`` and the clones attached in it, and an overlay
  of them all on TARGET, with the kernel's overlay defaults (a layer nobody reads later). Everything is reached
  through TARGET: no other directory of the host or the cache is a mount point, and all goes with the namespace.
- ``{"dir": PATH, "mode": 0o755, "owner": UID}``: a directory made (where the tmpfs was just mounted)
- ``{"idmap": PATH, "base": BASE, "target": TARGET}``: a read-only idmapped mount of PATH on TARGET (without it:
  PATH replaced by it), every owner seen moved up by BASE (a user namespace made for the mapping, by a child that
  dies with the script)
- ``{"overlay": TARGET, "lower": [TOP, ..., BOTTOM], "upper": PATH, "work": PATH}``: an overlayfs of the layers
  (without ``upper``: read-only); with idmapped layers from Linux 5.19 on.
- ``{"python": CODE, ...}``: Python code run in the script's own process, with the step as ``step`` (last in a plan
  that ends in an exec: the work of a wrapper that would otherwise be a Python process of its own before it)

``"inert": true`` on an idmap or overlay makes it ``nosuid`` and ``nodev`` (a tmpfs step's always is): a build's and
host root's view of a tree (a machine's tree boots as a host's would, its setuid programs working).
"""

from __future__ import annotations

import contextlib
import json
import select
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import printable

# Overlay options every overlay here gets: no index (its file handles would tie a layer to the mount it was made
# under), no redirects or metadata-only copies (what a reader of a layer's files would have to follow: a layer is
# plain files, whiteouts and opaque directories only; a directory renamed in a build is copied, EXDEV, as mv does).
OVERLAY_OPTIONS = "redirect_dir=off,index=off,metacopy=off"

_MOUNT = r"""
import ctypes, json, os, signal, struct, sys
plan, mode, argv = json.loads(sys.argv[1]), sys.argv[2], sys.argv[5:]
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
def check(result, what):
    if result < 0:
        error = ctypes.get_errno()
        sys.exit(f"pytest-systemd-harden: {what}: {os.strerror(error)}")
    return result
def escaped(path):  # overlayfs splits its options at "," and its layers at ":"
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")
namespaces = {}
def userns(base):  # a user namespace mapping 0-65535 to base-..., held by a child until its descriptor is taken
    if base in namespaces:
        return namespaces[base]
    unshared, mapped = os.pipe(), os.pipe()
    child = os.fork()
    if child == 0:
        os.close(unshared[0])
        os.close(mapped[1])
        libc.prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
        failed = libc.unshare(0x10000000)  # CLONE_NEWUSER
        os.write(unshared[1], b"n" if failed else b"y")
        os.read(mapped[0], 1)  # the script's write, or its end (EOF)
        os._exit(0)
    os.close(unshared[1])
    os.close(mapped[0])
    try:
        if os.read(unshared[0], 1) != b"y":
            sys.exit("pytest-systemd-harden: idmapping an image: no user namespace")
        try:
            for name in ("uid_map", "gid_map"):
                with open(f"/proc/{child}/{name}", "w") as mapping:
                    mapping.write(f"0 {base} 65536\n")
            namespaces[base] = os.open(f"/proc/{child}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:
            sys.exit(f"pytest-systemd-harden: idmapping an image: the uid map: {error}")
    finally:
        os.close(mapped[1])
        os.close(unshared[0])
        os.waitpid(child, 0)
    return namespaces[base]
if mode == "keep":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the run's to handle (it ends the keeper)
for step in plan:  # user namespaces first: a child forked after unshare(CLONE_NEWNS) would only waste a namespace
    if "idmap" in step or step.get("machine_tree") and step["base"] is not None:
        userns(step["base"])
check(libc.unshare(0x20000), "unshare(CLONE_NEWNS)")
check(libc.mount(b"none", b"/", None, 0x80000 | 0x4000, None), "making / a slave")  # MS_SLAVE | MS_REC
for step in plan:
    if "tmpfs" in step:  # MS_NOSUID | MS_NODEV
        check(libc.mount(b"harden", step["tmpfs"].encode(), b"tmpfs", 0x2 | 0x4, step["options"].encode()),
              f"mounting a tmpfs on {step['tmpfs']}")
    elif "dir" in step:
        os.mkdir(step["dir"], step["mode"])
        os.chown(step["dir"], step["owner"], step["owner"])
        os.chmod(step["dir"], step["mode"])
    elif "idmap" in step:
        path = step["idmap"].encode()
        tree = check(libc.syscall(428, -100, path, 1 | 0o2000000), f"open_tree {step['idmap']}")  # CLONE, CLOEXEC
        # MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY (the cache's tree, read), MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
        attr = struct.pack("=QQQQ", 0x00100000 | 0x1 | (0x2 | 0x4 if step.get("inert") else 0), 0, 0,
                           userns(step["base"]))
        check(libc.syscall(442, tree, b"", 0x1000, attr, len(attr)),  # AT_EMPTY_PATH
              f"mount_setattr, idmapping {step['idmap']}")
        target = step.get("target", step["idmap"]).encode()
        check(libc.syscall(429, tree, b"", -100, target, 0x4), "move_mount")  # MOVE_MOUNT_F_EMPTY_PATH
        os.close(tree)
    elif "machine_tree" in step:
        target = step["machine_tree"]
        clones = []
        for lower in step["lower"]:  # before the tmpfs covers TARGET, which may be one of them
            tree = check(libc.syscall(428, -100, lower.encode(), 1 | 0o2000000), f"open_tree {lower}")  # CLONE
            if step["base"] is not None:  # MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY
                attr = struct.pack("=QQQQ", 0x00100000 | 0x1, 0, 0, userns(step["base"]))
                check(libc.syscall(442, tree, b"", 0x1000, attr, len(attr)), f"mount_setattr, idmapping {lower}")
            clones.append(tree)
        check(libc.mount(b"harden", target.encode(), b"tmpfs", 0x1000000, step["options"].encode()),  # STRICTATIME
              f"mounting the machine's writable layer on {target}")
        os.mkdir(f"{target}/upper", 0o755)
        os.chown(f"{target}/upper", step["owner"], step["owner"])
        os.chmod(f"{target}/upper", 0o755)  # the machine's "/", whatever the caller's umask took
        os.mkdir(f"{target}/work", 0o700)
        lowers = []
        for index, tree in enumerate(clones):
            lowers.append(f"{target}/layer{index}")
            os.mkdir(lowers[-1], 0o700)
            check(libc.syscall(429, tree, b"", -100, lowers[-1].encode(), 0x4), "move_mount")  # F_EMPTY_PATH
            os.close(tree)
        options = (f"lowerdir={':'.join(escaped(lower) for lower in lowers)},"
                   f"upperdir={escaped(target + '/upper')},workdir={escaped(target + '/work')}")
        check(libc.mount(b"harden", target.encode(), b"overlay", 0, options.encode()),
              f"mounting the machine's tree on {target}")
    elif "overlay" in step:
        options = "lowerdir=" + ":".join(escaped(layer) for layer in step["lower"])
        flags = 0x2 | 0x4 if step.get("inert") else 0  # MS_NOSUID | MS_NODEV
        if step.get("upper"):
            options += f",upperdir={escaped(step['upper'])},workdir={escaped(step['work'])}"
        else:
            flags |= 0x1  # MS_RDONLY
        check(libc.mount(b"harden", step["overlay"].encode(), b"overlay", flags, f"{options},OPTIONS".encode()),
              f"mounting the image's layers on {step['overlay']}")
    elif "python" in step:
        exec(step["python"], {"step": step})
for descriptor in namespaces.values():
    os.close(descriptor)
if mode == "exec":
    os.execvp(argv[0], argv)
os.chdir(sys.argv[3])  # host root reaches it as /proc/KEEPER/cwd
sys.stdout.write("ready\n")
sys.stdout.flush()
while sys.stdin.buffer.read(4096):
    pass
""".replace("OPTIONS", OVERLAY_OPTIONS)


def then(plan: Sequence[dict[str, Any]], command: Sequence[str]) -> list[str]:
    """``command`` started where the mounts of ``plan`` are made (see the module docstring), which go with it."""
    return [sys.executable, "-I", "-S", "-c", _MOUNT, json.dumps(list(plan)), "exec", "/", "--", *command]


@dataclass
class Keeper:
    """A process keeping a mount namespace (see the module docstring); :meth:`end` must follow."""

    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def seen(self) -> Path:
        """Where host root reaches the keeper's working directory, in the keeper's namespace."""
        return Path(f"/proc/{self.process.pid}/cwd")

    def end(self) -> None:
        """End the keeper (its stdin closed: it exits), and with it its mounts, once nothing else holds them."""
        for pipe in (self.process.stdin, self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def keep(plan: Sequence[dict[str, Any]], cwd: Path, env: dict[str, str], *, timeout: float = 30) -> Keeper:
    """A keeper of the mounts of ``plan``, its working directory ``cwd``; OSError with the script's message where a
    mount failed (nothing is left: the namespace went with the script)."""
    process = subprocess.Popen([sys.executable, "-I", "-S", "-c", _MOUNT, json.dumps(list(plan)), "keep", str(cwd)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    keeper = Keeper(process)
    try:
        assert process.stdout is not None and process.stderr is not None
        ready = select.select([process.stdout], [], [], timeout)[0] and process.stdout.readline() == b"ready\n"
        if not ready:
            process.kill()
            error = printable(process.stderr.read().decode(errors="replace")).strip()
            raise OSError(error.removeprefix("pytest-systemd-harden: ") or f"no answer in {timeout:.0f} s")
    except BaseException:
        with contextlib.suppress(OSError):
            keeper.end()
        raise
    return keeper
