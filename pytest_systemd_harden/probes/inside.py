"""Denial probes, run INSIDE a sandbox by pytest-systemd-harden.

This file is a standalone script: standard library only, Python 3.11, never importing pytest_systemd_harden. It is
sent to the image's ``/usr/bin/python3 -`` on stdin, with one JSON argument: ``{"probes": [[kind, arg], ...]}``.
For every probe it prints one JSON line as soon as the probe is done, so a batch that dies half-way (a seccomp
kill outside a probe) still reports what it did::

    {"kind": "write", "arg": "/etc", "status": "denied", "errno": "EROFS", "facts": {"readonly": true}}

``status`` is ``allowed``, ``denied`` (with ``errno`` or ``signal``) or ``error`` (the probe could not try, e.g. a
path is missing; ``detail`` says why). ``facts`` hold observations (read-only mount, capability sets, ...).

Every probe is harmless when the action turns out to be allowed: scratch files have unique names and are removed,
the clock and host name are "set" with invalid arguments (so the kernel refuses with EINVAL before acting),
reboot/init_module get invalid magic/empty images, mounts target a path that does not exist, sockets only touch
loopback and are never listened on, and nothing is ever signalled but the probe's own child.

Two guards, named by the request's ``"guard"``, keep a probe from touching the host where the machine is not a world
of its own. ``"kernel"`` is for a container, whose kernel is the host's: no socket is made of an address family
whose kernel module is not loaded (``socket(2)`` would load it into the host's kernel, from any container), and no
allocation beyond a quarter of the host's available memory, nor more than 512 threads, is tried (a container's
limits may not be enforced, and the memory and tasks are the host's). ``"host"``, careful mode, is for a machine
that is somebody's real host: the host backend sets it on every batch it runs. It guards what ``"kernel"`` does,
and more: nothing ever gets a name on a filesystem (a
scratch file is unnamed, ``O_TMPFILE``, and vanishes when closed, or the kernel is only asked, with ``access(2)``),
no file is opened for writing, no device or FIFO is opened (a watchdog starts when opened; a FIFO's writer would
lose its data), no kernel file under /proc or /sys is read (reading /proc/kmsg takes the messages from the log
daemon), nothing is executed from a scratch copy (the noexec mount flag decides), the umask is read from
/proc/self/status. A probe a guard does not allow is not tried: its result is an error whose detail starts with
one of ``REFUSALS`` (:func:`refused`), which leaves its checks unverifiable, never passed.

Probes that make a syscall a seccomp filter may kill (SIGSYS) run in a forked child, so one kill never ends the
batch. Those that leave the process as it was share one child, one after another: a kill is the verdict of the
probe it interrupted, and the rest go on in a new child. Those that change the process (a namespace, the
personality, the scheduling policy) get a child each, so no change outlives its probe.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import sys
from collections.abc import Callable
from typing import Any

Result = dict[str, Any]

# Errnos that mean "the action was refused" for filesystem probes; others (ENOENT of a parent, ELOOP...) are errors.
FS_DENIALS = ("EROFS", "EACCES", "EPERM")
SCRATCH_PREFIX = ".harden-probe-"
CHILD_TIMEOUT = 10  # seconds a forked probe may take before it is killed by its own alarm

# The guards (see the module docstring), set by main() from the request and inherited by the probes' children.
# SHARED_KERNEL: the machine runs on the host's kernel (a container, or the host); CAREFUL: it is the host.
SHARED_KERNEL = False
CAREFUL = False
GUARD_KERNEL, GUARD_HOST = "kernel", "host"
CAREFUL_REFUSAL = "not tried on the host backend: "
KERNEL_REFUSAL = "not tried in a container, whose kernel is the host's: "
REFUSALS = (CAREFUL_REFUSAL, KERNEL_REFUSAL)
# The families the kernel has, as the machine saw them from outside the sandbox (the request's "loaded_families").
LOADED_FAMILIES: frozenset[str] | None = None
# O_TMPFILE errnos that mean "this filesystem (or kernel) has no unnamed files", not "you may not create one".
NO_TMPFILE = ("EOPNOTSUPP", "EISDIR")
# Address families the kernel cannot lack: socket(2) never loads a module for them.
BUILT_IN_FAMILIES = ("AF_UNIX", "AF_INET", "AF_NETLINK")
# Others: the kernel module socket(2) would load, and its protocol names in /proc/net/protocols once it is loaded.
FAMILY_MODULES = {"AF_INET6": ("ipv6", ("TCPv6", "UDPv6")), "AF_PACKET": ("af_packet", ("PACKET",)),
                  "AF_VSOCK": ("vsock", ("AF_VSOCK",))}
PROTOCOLS_FILE = "/proc/net/protocols"
MODULES_DIR = "/sys/module"
# On the host's kernel, a probe loads the host with at most a quarter of its available memory, and this many threads.
HOST_MEMORY_SHARE = 4
HOST_MAX_TASKS = 512

CLONE_FLAGS = {
    "mnt": 0x00020000, "cgroup": 0x02000000, "uts": 0x04000000, "ipc": 0x08000000,
    "user": 0x10000000, "pid": 0x20000000, "net": 0x40000000,
}


# --- results ------------------------------------------------------------------------------------------------

def errno_name(number: int) -> str:
    return errno.errorcode.get(number, f"errno {number}")


def allowed(detail: str = "", **facts: Any) -> Result:
    return {"status": "allowed", "detail": detail, "facts": facts}


def denied(err: int | str, detail: str = "", **facts: Any) -> Result:
    name = err if isinstance(err, str) else errno_name(err)
    return {"status": "denied", "errno": name, "detail": detail, "facts": facts}


def error(detail: str, err: int | None = None, **facts: Any) -> Result:
    result: Result = {"status": "error", "detail": detail, "facts": facts}
    if err is not None:
        result["errno"] = errno_name(err)
    return result


def from_oserror(exc: OSError, denials: tuple[str, ...], what: str, **facts: Any) -> Result:
    """A denial when the errno is one of ``denials``, otherwise an error (the probe could not try)."""
    number = exc.errno or 0
    if errno_name(number) in denials:
        return denied(number, f"{what}: {os.strerror(number)}", **facts)
    return error(f"{what}: {os.strerror(number)}", number, **facts)


def refused(why: str) -> Result:
    """A probe the batch's guard does not allow: an error, so that nothing is concluded from it."""
    return error((CAREFUL_REFUSAL if CAREFUL else KERNEL_REFUSAL) + why)


# --- the C library, for syscalls Python does not wrap -------------------------------------------------------

_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
        _libc.mmap.restype = ctypes.c_void_p
        _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                               ctypes.c_long]
        _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _libc


# Syscall numbers by machine (uname -m). Only what the probes use.
SYSCALL_NUMBERS: dict[str, dict[str, int]] = {
    "x86_64": {
        "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169, "sethostname": 170,
        "setdomainname": 171, "iopl": 172, "ioperm": 173, "init_module": 175, "delete_module": 176,
        "finit_module": 313, "kexec_load": 246, "clock_settime": 227, "settimeofday": 164, "adjtimex": 159,
        "personality": 135, "mlock": 149, "munlock": 150, "unshare": 272, "setns": 308, "sched_setscheduler": 144,
        "ptrace": 101, "perf_event_open": 298, "keyctl": 250, "io_setup": 206, "semget": 64, "modify_ldt": 154,
        "pkey_alloc": 330, "pkey_free": 331, "syslog": 103, "setresuid": 117, "setresgid": 119, "fchown": 93,
        "setrlimit": 160, "bpf": 321, "chroot": 161, "pivot_root": 155, "getrlimit": 97,
    },
    "aarch64": {
        "mount": 40, "umount2": 39, "swapon": 224, "swapoff": 225, "reboot": 142, "sethostname": 161,
        "setdomainname": 162, "init_module": 105, "delete_module": 106, "finit_module": 273, "kexec_load": 104,
        "clock_settime": 112, "settimeofday": 170, "adjtimex": 171, "personality": 92, "mlock": 228, "munlock": 229,
        "unshare": 97, "setns": 268, "sched_setscheduler": 119, "ptrace": 117, "perf_event_open": 241,
        "keyctl": 219, "io_setup": 0, "semget": 190, "pkey_alloc": 289, "pkey_free": 290, "syslog": 116,
        "setresuid": 147, "setresgid": 149, "fchown": 55, "setrlimit": 164, "bpf": 280, "chroot": 51,
        "pivot_root": 41, "getrlimit": 163,
    },
}


def raw_syscall(name: str, *args: Any) -> tuple[int, int]:
    """(return value, errno) of the raw syscall ``name``; raises KeyError on an architecture we lack numbers for."""
    number = SYSCALL_NUMBERS[os.uname().machine][name]
    ctypes.set_errno(0)
    value = libc().syscall(ctypes.c_long(number), *args)
    return int(value), ctypes.get_errno()


def _missing_path(tag: str) -> bytes:
    # A path that does not exist, so path-taking syscalls fail with ENOENT after the seccomp and before any effect.
    return f"/nonexistent-harden-probe-{tag}".encode()


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Rlimit(ctypes.Structure):
    _fields_ = [("rlim_cur", ctypes.c_ulong), ("rlim_max", ctypes.c_ulong)]


class _SchedParam(ctypes.Structure):
    _fields_ = [("sched_priority", ctypes.c_int)]


def _harmless_call(name: str, tag: str) -> tuple[int, int]:
    """Call syscall ``name`` with arguments chosen so that, if it is allowed, the kernel refuses or it does nothing.

    The comment on each line says why the call cannot act.
    """
    null = ctypes.c_void_p(None)
    long = ctypes.c_long
    if name == "mount":  # target does not exist: ENOENT before any capability check or mount
        return raw_syscall(name, ctypes.c_char_p(b"none"), ctypes.c_char_p(_missing_path(tag)),
                           ctypes.c_char_p(b"tmpfs"), long(0), null)
    if name in ("umount2", "swapon", "swapoff", "chroot"):  # path does not exist: ENOENT (or EPERM without caps)
        return raw_syscall(name, ctypes.c_char_p(_missing_path(tag)), long(0))
    if name == "pivot_root":  # paths do not exist
        return raw_syscall(name, ctypes.c_char_p(_missing_path(tag)), ctypes.c_char_p(_missing_path(tag)))
    if name == "reboot":  # magic1 = 0 is invalid: EINVAL after the CAP_SYS_BOOT check, never a reboot
        return raw_syscall(name, long(0), long(0), long(0), null)
    if name == "kexec_load":  # 1000 segments > KEXEC_SEGMENT_MAX: EINVAL
        return raw_syscall(name, long(0), long(1000), null, long(0))
    if name == "init_module":  # an empty module image: ENOEXEC (or ENOSYS without module support)
        return raw_syscall(name, null, long(0), ctypes.c_char_p(b""))
    if name == "finit_module":  # fd -1: EBADF
        return raw_syscall(name, long(-1), ctypes.c_char_p(b""), long(0))
    if name == "delete_module":  # a module name that cannot exist: ENOENT
        return raw_syscall(name, ctypes.c_char_p(f"harden_probe_{tag}".encode()), long(0o4000))  # O_NONBLOCK
    if name in ("sethostname", "setdomainname"):  # 65 bytes > __NEW_UTS_LEN: EINVAL, the name is never changed
        return raw_syscall(name, ctypes.c_char_p(b"x" * 65), long(65))
    if name == "clock_settime":  # a negative time is invalid: EINVAL before the clock is touched
        return raw_syscall(name, long(0), ctypes.byref(_Timespec(-1, 0)))
    if name == "settimeofday":  # tv_usec out of range: EINVAL
        return raw_syscall(name, ctypes.byref(_Timeval(0, 2_000_000)), null)
    if name == "adjtimex":  # modes = 0 only reads the clock state
        buffer = ctypes.create_string_buffer(512)
        return raw_syscall(name, buffer)
    if name in ("iopl",):  # level 4 is invalid: EINVAL (ENOSYS without I/O privilege support)
        return raw_syscall(name, long(4))
    if name == "ioperm":  # zero ports, turn off: EINVAL / a no-op
        return raw_syscall(name, long(0), long(0), long(0))
    if name == "personality":  # 0xffffffff only queries the current persona
        return raw_syscall(name, ctypes.c_ulong(0xFFFFFFFF))
    if name in ("mlock", "munlock"):
        page = ctypes.create_string_buffer(4096)
        value, err = raw_syscall("mlock", page, long(4096))
        if value == 0:
            raw_syscall("munlock", page, long(4096))
        return value, err
    if name == "unshare":  # flags 0: no new namespace
        return raw_syscall(name, long(0))
    if name == "setns":  # fd -1: EBADF
        return raw_syscall(name, long(-1), long(0))
    if name == "sched_setscheduler":  # SCHED_OTHER with priority 1 is invalid: EINVAL (and not realtime)
        return raw_syscall(name, long(0), long(0), ctypes.byref(_SchedParam(1)))
    if name == "ptrace":  # PTRACE_PEEKUSER on ourselves, whom we do not trace: ESRCH
        return raw_syscall(name, long(3), long(os.getpid()), long(0), long(0))
    if name == "perf_event_open":  # a NULL attribute pointer: EFAULT
        return raw_syscall(name, null, long(0), long(-1), long(-1), long(0))
    if name == "keyctl":  # KEYCTL_GET_KEYRING_ID of the thread keyring, without creating it
        return raw_syscall(name, long(0), long(-1), long(0))
    if name == "io_setup":  # zero events: EINVAL
        context = ctypes.c_ulong(0)
        return raw_syscall(name, long(0), ctypes.byref(context))
    if name == "semget":  # IPC_PRIVATE with zero semaphores: EINVAL, nothing created
        return raw_syscall(name, long(0), long(0), long(0))
    if name == "modify_ldt":  # func 0 reads the LDT
        buffer = ctypes.create_string_buffer(16)
        return raw_syscall(name, long(0), buffer, long(16))
    if name == "pkey_alloc":  # allocate a protection key and free it again
        value, err = raw_syscall(name, long(0), long(0))
        if value >= 0:
            raw_syscall("pkey_free", long(value))
        return value, err
    if name == "syslog":  # SYSLOG_ACTION_SIZE_BUFFER only reads the buffer size
        return raw_syscall(name, long(10), null, long(0))
    if name in ("setresuid", "setresgid"):  # -1 everywhere: nothing changes
        return raw_syscall(name, long(-1), long(-1), long(-1))
    if name == "fchown":  # -1/-1 on a fresh pipe: a no-op
        read_end, write_end = os.pipe()
        try:
            return raw_syscall(name, long(read_end), long(-1), long(-1))
        finally:
            os.close(read_end)
            os.close(write_end)
    if name == "setrlimit":  # RLIMIT_NOFILE set to its current value, in a forked child
        limit = _Rlimit()
        raw_syscall("getrlimit", long(7), ctypes.byref(limit))
        return raw_syscall(name, long(7), ctypes.byref(limit))
    if name == "bpf":  # command 0xffff does not exist: EINVAL
        return raw_syscall(name, long(0xFFFF), null, long(0))
    raise KeyError(name)


# Syscalls the probes know how to call harmlessly, and the errnos that mean "the kernel ran it and refused our
# deliberately invalid arguments" - i.e. no seccomp filter or missing capability stopped it.
SYSCALL_PROBES: dict[str, tuple[str, ...]] = {
    "mount": ("ENOENT",), "umount2": ("ENOENT",), "swapon": ("ENOENT",), "swapoff": ("ENOENT",),
    "chroot": ("ENOENT",), "pivot_root": ("ENOENT", "EINVAL"), "reboot": ("EINVAL",),
    "kexec_load": ("EINVAL", "ENOSYS"),
    "init_module": ("ENOEXEC", "EINVAL", "EFAULT", "ENOSYS"), "finit_module": ("EBADF", "ENOSYS"),
    "delete_module": ("ENOENT", "ENOSYS"), "sethostname": ("EINVAL",), "setdomainname": ("EINVAL",),
    "clock_settime": ("EINVAL",), "settimeofday": ("EINVAL",), "adjtimex": (), "iopl": ("EINVAL", "ENOSYS"),
    "ioperm": ("EINVAL", "ENOSYS"), "personality": (), "mlock": (), "unshare": (), "setns": ("EBADF",),
    "sched_setscheduler": ("EINVAL",), "ptrace": ("ESRCH",), "perf_event_open": ("EFAULT",),
    "keyctl": ("ENOKEY",), "io_setup": ("EINVAL",), "semget": ("EINVAL",), "modify_ldt": ("ENOSYS",),
    "pkey_alloc": ("EINVAL", "ENOSPC", "ENOSYS"), "syslog": (), "setresuid": (), "setresgid": (), "fchown": (),
    "setrlimit": (), "bpf": ("EINVAL",),
}


# --- the probes ---------------------------------------------------------------------------------------------

Probe = Callable[[str, str], Result]
# Where a probe runs: in the batch process ("here"), in a child shared with other probes ("child"), or in a
# child of its own ("own-child", for probes that change the process).
HERE, CHILD, OWN_CHILD = "here", "child", "own-child"
PROBES: dict[str, tuple[Probe, str]] = {}  # kind -> (function(arg, tag), where it runs)


def probe(kind: str, *, where: str = HERE) -> Callable[[Probe], Probe]:
    def register(function: Probe) -> Probe:
        PROBES[kind] = (function, where)
        return function
    return register


def _mount_flags(path: str) -> dict[str, Any]:
    try:
        flags = os.statvfs(path).f_flag
    except OSError:
        return {}
    return {"readonly": bool(flags & os.ST_RDONLY), "noexec": bool(flags & os.ST_NOEXEC)}


def _scratch_name(directory: str, tag: str) -> str:
    return os.path.join(directory, f"{SCRATCH_PREFIX}{tag}-{secrets.token_hex(4)}")


def _access(path: str, mode: int) -> int:
    """access(2) of ``path`` for ``mode`` (os.R_OK, ...): 0 or the errno (EROFS for a write on a read-only mount)."""
    ctypes.set_errno(0)
    if libc().access(os.fsencode(path), mode) == 0:
        return 0
    return ctypes.get_errno() or errno.EACCES


def _unnamed_file(directory: str) -> int:
    """A file in ``directory`` that has no name (O_TMPFILE): it never shows in the directory and vanishes at close."""
    return os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o600)


def _careful_create_in(directory: str, what: str, facts: dict[str, Any]) -> Result:
    """May a file be created in ``directory``? Careful mode: an unnamed file, or access(2) where there are none."""
    try:
        os.close(_unnamed_file(directory))
        return allowed(f"created an unnamed file (O_TMPFILE) in {directory}", **facts)
    except OSError as exc:
        if errno_name(exc.errno or 0) not in NO_TMPFILE:
            return from_oserror(exc, FS_DENIALS, what, **facts)
    err = _access(directory, os.W_OK | os.X_OK)  # a read-only mount answers EROFS here too
    if err:
        return from_oserror(OSError(err, os.strerror(err)), FS_DENIALS, what, **facts)
    return allowed(f"{directory} is writable (access(2); this filesystem has no unnamed files)", **facts)


@probe("write")
def probe_write(path: str, tag: str) -> Result:
    """Create (and remove) a scratch file in a directory; open an existing file for writing without writing."""
    try:
        mode = os.stat(path).st_mode  # following symlinks: /lib is /usr/lib on a merged-/usr system
    except FileNotFoundError:
        mode = None
    except OSError as exc:  # a component we may not search: nothing is known about the path's own mount
        return from_oserror(exc, FS_DENIALS, f"stat {path}")
    if mode is not None and stat.S_ISDIR(mode):
        facts = _mount_flags(path)
        if CAREFUL:
            return _careful_create_in(path, f"create a file in {path}", facts)
        scratch = _scratch_name(path, tag)
        try:
            os.close(os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as exc:
            return from_oserror(exc, FS_DENIALS, f"create a file in {path}", **facts)
        os.unlink(scratch)
        return allowed(f"created and removed a file in {path}", **facts)
    if mode is not None and (stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode)):
        # Opening a device for writing can act (a watchdog starts ticking): only ask the kernel.
        facts = _mount_flags(path)
        if os.access(path, os.W_OK):
            return allowed(f"{path} is writable (access(2); devices are never opened)", **facts)
        return denied("EACCES", f"{path} is not writable (access(2))", **facts)
    if mode is not None:
        facts = _mount_flags(path)
        if CAREFUL:  # not even opened: closing a file opened for writing wakes inotify watchers (path units)
            err = _access(path, os.W_OK)
            if err:
                return from_oserror(OSError(err, os.strerror(err)), FS_DENIALS, f"open {path} for writing", **facts)
            return allowed(f"{path} is writable (access(2); never opened on the host)", **facts)
        try:  # no O_TRUNC and no write(): the file is left exactly as it was
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOCTTY | os.O_NONBLOCK))
        except OSError as exc:
            return from_oserror(exc, FS_DENIALS, f"open {path} for writing", **facts)
        return allowed(f"opened {path} for writing (nothing written)", **facts)
    parent = os.path.dirname(path.rstrip("/")) or "/"
    # The parent's mount decides whether the file may be created; "exists" keeps that apart from the path's own.
    facts = dict(_mount_flags(parent), exists=False)
    if CAREFUL:  # an unnamed file in the parent: the path itself is never created on the host
        return _careful_create_in(parent, f"create {path}", facts)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        return from_oserror(exc, FS_DENIALS, f"create {path}", **facts)
    os.unlink(path)
    return allowed(f"created and removed {path}", **facts)


@probe("read")
def probe_read(path: str, tag: str) -> Result:
    """List a directory or read up to 64 bytes of a file; absent (ENOENT) counts as not visible."""
    denials = (*FS_DENIALS, "ENOENT")
    try:
        info = os.stat(path)
    except OSError as exc:
        return from_oserror(exc, denials, f"stat {path}")
    # Which object it is: an inaccessible or empty mount over the path is another object, even where root may
    # still read it (CAP_DAC_OVERRIDE opens a mode-000 node).
    where = f"{info.st_dev}:{info.st_ino}"
    # Its permission bits: systemd's inaccessible nodes have none (mode 000), which shows whoever looks, even a user
    # the original node already shut out (/proc/kmsg is root's).
    mode = stat.S_IMODE(info.st_mode)
    try:
        if stat.S_ISDIR(info.st_mode):
            entries = len(os.listdir(path))
            return allowed(f"listed {path}: {entries} entries", object=where, size=entries, mode=mode)
        if CAREFUL and not stat.S_ISREG(info.st_mode):
            # Opening acts on the host: a watchdog device starts its countdown, a FIFO's waiting writer is let in
            # and then loses what it writes. Only ask the kernel (access(2) sees the device cgroup too).
            err = _access(path, os.R_OK)
            if err:
                return from_oserror(OSError(err, os.strerror(err)), denials, f"read {path}", object=where,
                                    mode=mode)
            return allowed(f"{path} is readable (access(2); devices and FIFOs are never opened on the host)",
                           object=where, size=None, mode=mode)
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(info.st_mode):  # devices and FIFOs are only opened, never read
                return allowed(f"opened {path}", object=where, size=None, mode=mode)
            if CAREFUL and _kernel_file(path):  # reading /proc/kmsg takes its messages from the log daemon
                return allowed(f"opened {path} (a kernel file: never read on the host)", object=where, size=None,
                               mode=mode)
            size = len(os.read(fd, 64))
        finally:
            os.close(fd)
        return allowed(f"read {size} bytes of {path}", object=where, size=size, mode=mode)
    except OSError as exc:
        return from_oserror(exc, denials, f"read {path}", object=where, mode=mode)


def _kernel_file(path: str) -> bool:
    real = os.path.realpath(path)
    return any(real == top or real.startswith(top + "/") for top in ("/proc", "/sys"))


def _execute(program: str) -> Result:
    pid = os.fork()
    if pid == 0:
        try:
            os.execv(program, [program])
        except OSError as exc:
            os._exit(100 + (exc.errno or 0) % 100)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return allowed(f"executed {program}")
    if code >= 100:
        return denied(code - 100, f"execve {program}")
    return error(f"{program} exited with status {code}")


@probe("exec", where=CHILD)
def probe_exec(path: str, tag: str) -> Result:
    """Execute a copy of /bin/true placed in a directory (or check an existing file); noexec mounts deny."""
    facts = _mount_flags(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return from_oserror(exc, (*FS_DENIALS, "ENOENT"), f"stat {path}", **facts)
    if not stat.S_ISDIR(mode):  # never run a user's program: access(X_OK) sees noexec mounts too
        if os.access(path, os.X_OK):
            return allowed(f"{path} is executable (access(2))", **facts)
        return denied("EACCES", f"{path} is not executable (access(2))", **facts)
    if CAREFUL:  # no program is placed, let alone run, on the host: the mount's noexec flag decides
        if "noexec" not in facts:
            return error(f"statvfs {path} failed: its noexec flag is unknown")
        if facts["noexec"]:
            return denied("EACCES", f"{path} is mounted noexec", **facts)
        return allowed(f"{path} is not mounted noexec (nothing is placed or run there on the host)", **facts)
    scratch = _scratch_name(path, tag)
    try:
        shutil.copyfile("/bin/true", scratch)
    except OSError:
        try:  # created but not filled (a full disk): never leave it behind
            os.unlink(scratch)
        except OSError:
            pass
        # Cannot place a program here (read-only, no permission): the mount flags still tell.
        if facts.get("noexec"):
            return denied("EACCES", f"{path} is mounted noexec", **facts)
        return allowed(f"{path} is not mounted noexec (no test program could be placed there)", **facts)
    try:
        os.chmod(scratch, 0o700)
        return dict(_execute(scratch), facts=facts)
    finally:
        os.unlink(scratch)


def _in_child(function: Probe, arg: str, tag: str) -> Result:
    try:
        return function(arg, tag)
    except OSError as exc:
        return error(str(exc), exc.errno)
    except Exception as exc:  # noqa: BLE001 - one broken probe must not end the others in this child
        return error(f"{type(exc).__name__}: {exc}")


@probe("syscall", where=CHILD)
def probe_syscall(name: str, tag: str) -> Result:
    """Call one syscall with arguments that make it harmless; a kernel refusal of those arguments means allowed."""
    if name not in SYSCALL_PROBES:
        return error(f"no harmless probe for syscall {name}")
    try:
        value, err = _harmless_call(name, tag)
    except KeyError:
        return error(f"no syscall number for {name} on {os.uname().machine}")
    if value >= 0 or err == 0:
        return allowed(f"{name}() returned {value}")
    if errno_name(err) in SYSCALL_PROBES[name]:
        return allowed(f"{name}() reached the kernel, which refused the probe's invalid arguments "
                       f"({errno_name(err)}, as intended)", refused=errno_name(err))
    return denied(err, f"{name}(): {os.strerror(err)}")


@probe("socket", where=CHILD)
def probe_socket(family_name: str, tag: str) -> Result:
    """Create (and close) a socket of an address family, trying the socket types the family may support."""
    family = getattr(socket, family_name, None)
    if not isinstance(family, int):
        return error(f"unknown address family {family_name}")
    if SHARED_KERNEL and not family_loaded(family_name):
        module = FAMILY_MODULES.get(family_name, ("", ()))[0]
        return refused(f"socket({family_name}) would make the host's kernel load the module of {family_name}, "
                       "which is not loaded" + (f" (modprobe {module} first to have it probed)" if module else ""))
    last: OSError | None = None
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM, socket.SOCK_RAW, socket.SOCK_SEQPACKET):
        try:
            socket.socket(family, kind).close()
            return allowed(f"created a {family_name} socket")
        except OSError as exc:
            if exc.errno in (errno.EAFNOSUPPORT, errno.EPERM, errno.EACCES):
                return denied(exc.errno, f"socket({family_name}): {exc.strerror}")
            last = exc  # a type the family lacks: try the next one
    assert last is not None
    return error(f"socket({family_name}): {last.strerror}", last.errno)


def family_loaded(name: str) -> bool:
    """Whether the kernel has address family ``name`` already, so that socket(2) loads no module for it.

    Told by the request where the machine looked from outside (a sandbox may see neither /proc/net nor /sys)."""
    if name in BUILT_IN_FAMILIES:
        return True
    if LOADED_FAMILIES is not None:
        return name in LOADED_FAMILIES
    module, protocols = FAMILY_MODULES.get(name, ("", ()))
    try:
        with open(PROTOCOLS_FILE) as table:
            if set(protocols) & {line.split(maxsplit=1)[0] for line in table if line.strip()}:
                return True
    except OSError:  # no /proc/net here: the module directory may still tell
        pass
    return bool(module) and os.path.isdir(os.path.join(MODULES_DIR, module))


def _not_loopback(host: str) -> Result | None:
    """Careful mode sends and binds on loopback only (the spec loader allows nothing else either)."""
    import ipaddress

    if CAREFUL and not ipaddress.ip_address(host).is_loopback:
        return refused(f"{host} is not a loopback address: nothing is sent or bound beyond the host's loopback")
    return None


def _is_loopback(host: str) -> bool:
    import ipaddress

    return ipaddress.ip_address(host).is_loopback


FIB_TRIE = "/proc/self/net/fib_trie"  # under /proc/self: still there with ProcSubset=pid


def own_address(host: str) -> bool:
    """Whether IPv4 ``host`` is a local address of this process's network namespace (the kernel's LOCAL routes)."""
    try:
        with open(FIB_TRIE) as table:
            lines = table.read().splitlines()
    except OSError:
        return False
    return any(line.strip() == f"|-- {host}" and "/32 host LOCAL" in following
               for line, following in itertools.pairwise(lines))


def _address(arg: str) -> tuple[int, str, int, int]:
    """(family, host, port, socket type) from "[udp:]127.0.0.1:53" or "[udp:][::1]:53"."""
    kind = socket.SOCK_STREAM
    if arg.startswith(("udp:", "tcp:")):
        kind = socket.SOCK_DGRAM if arg.startswith("udp:") else socket.SOCK_STREAM
        arg = arg[4:]
    host, _, port = arg.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, host, int(port), kind


@probe("connect", where=CHILD)
def probe_connect(arg: str, tag: str) -> Result:
    """Send to a loopback address: an empty UDP datagram (default), or a TCP connection attempt ("tcp:" prefix).

    UDP shows an address filter at once (sendto fails with EPERM); a dropped TCP SYN only shows as a timeout.
    Nobody listening (connection refused) still means the packet was allowed out.
    """
    family, host, port, kind = _address(arg if arg.startswith(("udp:", "tcp:")) else f"udp:{arg}")
    if (refusal := _not_loopback(host)) is not None:
        return refusal
    if not _is_loopback(host) and not own_address(host):
        # Never beyond the machine: an address that is not its own would be routed away from it.
        return error(f"{host} is not an address of this network namespace (nothing sent)")
    with socket.socket(family, kind) as sock:
        sock.settimeout(1)
        try:
            if kind == socket.SOCK_DGRAM:
                sock.sendto(b"", (host, port))
                return allowed(f"sent an empty datagram to {arg}")
            sock.connect((host, port))
        except ConnectionRefusedError:
            return allowed(f"reached {arg} (connection refused: nobody listens)")
        except TimeoutError:
            # On loopback an answer (even a refusal) is immediate: silence means a filter dropped the packet.
            return denied("ETIMEDOUT", f"connect {arg}: no answer within 1s on loopback (dropped)")
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EACCES):
                return denied(exc.errno, f"send to {arg}: {exc.strerror}")
            return error(f"send to {arg}: {exc.strerror or exc}", exc.errno)
    return allowed(f"connected to {arg}")


@probe("bind", where=CHILD)
def probe_bind(arg: str, tag: str) -> Result:
    """Bind a loopback address and port, then close without listening; in use still means the bind was allowed."""
    family, host, port, kind = _address(arg)
    if (refusal := _not_loopback(host)) is not None:
        return refusal
    with socket.socket(family, kind) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return allowed(f"bind {arg} reached the port check (in use)")
            if exc.errno in (errno.EPERM, errno.EACCES):
                return denied(exc.errno, f"bind {arg}: {exc.strerror}")
            return error(f"bind {arg}: {exc.strerror}", exc.errno)
    return allowed(f"bound {arg} (closed again, never listened)")


@probe("namespace", where=OWN_CHILD)
def probe_namespace(kind: str, tag: str) -> Result:
    """unshare(2) one namespace type, in a child that exits right after."""
    if kind not in CLONE_FLAGS:
        return error(f"unknown namespace type {kind}")
    value, err = raw_syscall("unshare", ctypes.c_long(CLONE_FLAGS[kind]))
    if value == 0:
        return allowed(f"created a {kind} namespace")
    if err in (errno.EPERM, errno.EACCES, errno.ENOSPC, errno.EUSERS):
        return denied(err, f"unshare({kind}): {os.strerror(err)}")
    return error(f"unshare({kind}): {os.strerror(err)}", err)


PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20
MAP_FAILED = ctypes.c_void_p(-1).value


@probe("memory", where=CHILD)
def probe_memory(kind: str, tag: str) -> Result:
    """Map memory writable and executable at once ("wx"), or make a writable mapping executable ("mprotect")."""
    c = libc()
    prot = PROT_READ | PROT_WRITE | (PROT_EXEC if kind == "wx" else 0)
    ctypes.set_errno(0)
    address = c.mmap(None, 4096, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    if address in (None, MAP_FAILED):
        err = ctypes.get_errno()
        return denied(err, f"mmap(PROT_WRITE|PROT_EXEC): {os.strerror(err)}") if kind == "wx" else \
            error(f"mmap: {os.strerror(err)}", err)
    try:
        if kind == "mprotect":
            if c.mprotect(address, 4096, PROT_READ | PROT_EXEC) != 0:
                err = ctypes.get_errno()
                return denied(err, f"mprotect(PROT_EXEC): {os.strerror(err)}")
            return allowed("made a writable mapping executable")
        return allowed("mapped memory writable and executable")
    finally:
        c.munmap(address, 4096)


@probe("personality", where=OWN_CHILD)
def probe_personality(arg: str, tag: str) -> Result:
    """Switch this child to PER_LINUX32 (a change LockPersonality= forbids)."""
    value, err = raw_syscall("personality", ctypes.c_ulong(0x0008))
    if value >= 0:
        return allowed("switched the persona to PER_LINUX32")
    return denied(err, f"personality(PER_LINUX32): {os.strerror(err)}")


@probe("realtime", where=OWN_CHILD)
def probe_realtime(arg: str, tag: str) -> Result:
    """Make this child SCHED_FIFO priority 1 (it exits right after); "filter": ask for SCHED_FIFO priority 0.

    Priority 0 is invalid for SCHED_FIFO, and the kernel checks the arguments before the caller's right to realtime
    scheduling: allowed, the call fails with EINVAL and nothing changes, even where no process may become realtime
    (no CAP_SYS_NICE, RLIMIT_RTPRIO 0: a container). A seccomp filter (RestrictRealtime=) runs first: EPERM."""
    if arg == "filter":
        value, err = raw_syscall("sched_setscheduler", ctypes.c_long(0), ctypes.c_long(1),
                                 ctypes.byref(_SchedParam(0)))
        if value == 0:  # no kernel accepts it; should one, this child exits at once anyway
            return allowed("became SCHED_FIFO with priority 0")
        if err == errno.EINVAL:
            return allowed("sched_setscheduler(SCHED_FIFO, priority 0) reached the kernel's argument check (EINVAL)")
        return denied(err, f"sched_setscheduler(SCHED_FIFO, priority 0): {os.strerror(err)}")
    value, err = raw_syscall("sched_setscheduler", ctypes.c_long(0), ctypes.c_long(1), ctypes.byref(_SchedParam(1)))
    if value == 0:
        return allowed("became SCHED_FIFO")
    return denied(err, f"sched_setscheduler(SCHED_FIFO): {os.strerror(err)}")


SHM_DIRECTORY = "/dev/shm"


@probe("ipc")
def probe_ipc(path: str, tag: str) -> Result:
    """Create a POSIX shared memory object (an empty file in /dev/shm, as shm_open(3) makes it) and leave it.

    What RemoveIPC= is for: systemd removes the objects a unit's user owns when the unit stops. The caller checks
    for it after the unit is gone and removes it itself (see probes.runner.ipc_lifecycle); the name is a scratch
    name of the caller's choosing, so nothing else is ever touched."""
    if CAREFUL:
        return refused("a shared memory object left for the caller would get a name on the host")
    if os.path.dirname(path) != SHM_DIRECTORY or not os.path.basename(path).startswith(SCRATCH_PREFIX):
        return error(f"{path} is not a scratch name in {SHM_DIRECTORY}")
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600))
    except OSError as exc:
        return from_oserror(exc, FS_DENIALS, f"create {path}")
    return allowed(f"created {path}, left for the unit's stop", uid=os.getuid())


def scratch_directory() -> str | None:
    """A directory this process may create files in: the unit's own directories first, then the temporary ones."""
    candidates = [os.environ.get(name, "").split(":")[0] for name in
                  ("RUNTIME_DIRECTORY", "STATE_DIRECTORY", "CACHE_DIRECTORY", "LOGS_DIRECTORY")]
    candidates += ["/tmp", "/var/tmp", "/dev/shm", os.environ.get("HOME", "")]
    for directory in candidates:
        if directory and os.path.isdir(directory) and os.access(directory, os.W_OK | os.X_OK):
            return directory
    return None


@probe("setuid-bit", where=CHILD)
def probe_setuid_bit(bit: str, tag: str) -> Result:
    """chmod u+s (or g+s) on a scratch file of our own, removed right after."""
    directory = scratch_directory()
    if directory is None:
        return error("no writable directory for a scratch file")
    if CAREFUL:
        return _careful_setuid_bit(bit, directory)
    scratch = _scratch_name(directory, tag)
    os.close(os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        os.chmod(scratch, 0o4700 if bit == "suid" else 0o2700)
    except OSError as exc:
        return from_oserror(exc, ("EPERM", "EACCES"), f"chmod {'u' if bit == 'suid' else 'g'}+s", scratch=directory)
    finally:
        os.unlink(scratch)
    return allowed(f"set the {bit} bit on a scratch file in {directory}", scratch=directory)


def _careful_setuid_bit(bit: str, directory: str) -> Result:
    """fchmod u+s (or g+s) on an unnamed file: no setuid file ever has a name on the host, and it is gone at close.
    RestrictSUIDSGID= filters fchmod(2) as it does chmod(2)."""
    try:
        fd = _unnamed_file(directory)
    except OSError as exc:
        if errno_name(exc.errno or 0) in NO_TMPFILE:
            return refused(f"{directory} has no unnamed files (O_TMPFILE), and no named scratch file is made on "
                           "the host")
        return error(f"an unnamed scratch file in {directory}: {exc.strerror}", exc.errno)
    try:
        os.fchmod(fd, 0o4700 if bit == "suid" else 0o2700)
    except OSError as exc:
        return from_oserror(exc, ("EPERM", "EACCES"), f"fchmod {'u' if bit == 'suid' else 'g'}+s", scratch=directory)
    finally:
        os.close(fd)
    return allowed(f"set the {bit} bit on an unnamed scratch file in {directory}", scratch=directory)


@probe("abi32", where=CHILD)
def probe_abi32(arg: str, tag: str) -> Result:
    """Make one syscall through the 32-bit x86 ABI (int 0x80: getpid), as a non-native binary would."""
    if os.uname().machine != "x86_64":
        return error(f"no non-native ABI probe on {os.uname().machine}")
    code = bytes([0xB8, 0x14, 0, 0, 0, 0xCD, 0x80, 0xC3])  # mov eax, 20 (i386 getpid); int 0x80; ret
    # Executable memory from a memfd (mapped read+exec, never write+exec), so MemoryDenyWriteExecute= does not
    # stop the probe itself.
    fd = os.memfd_create("harden-probe-abi32")
    try:
        os.write(fd, code)
        address = libc().mmap(None, 4096, PROT_READ | PROT_EXEC, 0x01, fd, 0)  # MAP_SHARED
    finally:
        os.close(fd)
    if address in (None, MAP_FAILED):
        return error(f"could not map the probe's code: {os.strerror(ctypes.get_errno())}")
    value = int(ctypes.CFUNCTYPE(ctypes.c_int)(address)())
    if value == os.getpid():
        return allowed("a 32-bit syscall (getpid via int 0x80) ran")
    if value < 0:
        return denied(-value, f"32-bit getpid: {os.strerror(-value)}")
    return error(f"32-bit getpid returned {value}, not {os.getpid()}")


def _capability_set(hex_mask: str) -> list[int]:
    mask = int(hex_mask, 16)
    return [bit for bit in range(64) if mask & (1 << bit)]


@probe("status")
def probe_status(arg: str, tag: str) -> Result:
    """The process's credentials and restrictions from /proc/self/status (and a user name from NSS)."""
    fields: dict[str, str] = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    uid = int(fields["Uid"].split()[1])
    try:
        import pwd

        user: str | None = pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        user = None
    return allowed("read /proc/self/status", uid=uid, gid=int(fields["Gid"].split()[1]), user=user,
                   cap_bounding=_capability_set(fields["CapBnd"]), cap_effective=_capability_set(fields["CapEff"]),
                   cap_permitted=_capability_set(fields["CapPrm"]), cap_ambient=_capability_set(fields["CapAmb"]),
                   no_new_privs=int(fields.get("NoNewPrivs", "0")), seccomp=int(fields.get("Seccomp", "0")),
                   umask=int(fields["Umask"], 8) if "Umask" in fields else None)


@probe("umask")
def probe_umask(arg: str, tag: str) -> Result:
    """The mode a new file gets (created with 0666, so the umask shows), in a scratch directory."""
    if CAREFUL:  # no file at all: the process's umask, which is what UMask= sets
        with open("/proc/self/status") as status:
            found = [line.split()[1] for line in status if line.startswith("Umask:")]
        if not found:
            return refused("this kernel shows no Umask in /proc/self/status, and no file is created on the host")
        umask = int(found[0], 8)
        return allowed(f"a new file gets mode {0o666 & ~umask:04o} (umask {umask:04o} in /proc/self/status)",
                       file_mode=0o666 & ~umask)
    directory = scratch_directory()
    if directory is None:
        return error("no writable directory for a scratch file")
    scratch = _scratch_name(directory, tag)
    os.close(os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        mode = stat.S_IMODE(os.stat(scratch).st_mode)
    finally:
        os.unlink(scratch)
    return allowed(f"a new file in {directory} gets mode {mode:04o}", file_mode=mode)


@probe("limits")
def probe_limits(arg: str, tag: str) -> Result:
    """/proc/self/limits as {name: [soft, hard]}, None meaning unlimited."""
    limits: dict[str, list[int | None]] = {}
    with open("/proc/self/limits") as table:
        next(table)
        for line in table:
            name = line[:26].strip()
            soft, hard = line[26:47].strip(), line[47:68].strip()
            limits[name] = [None if soft == "unlimited" else int(soft), None if hard == "unlimited" else int(hard)]
    return allowed("read /proc/self/limits", limits=limits)


CGROUP_ROOTS = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")


def _cgroup_file(controller: str, v2_file: str, v1_file: str) -> Result:
    with open("/proc/self/cgroup") as table:
        lines = [line.rstrip("\n").split(":", 2) for line in table]
    v2_path = next((path for hierarchy, names, path in lines if hierarchy == "0" and names == ""), None)
    if v2_path is not None:
        for root in CGROUP_ROOTS:
            group = root + v2_path
            try:
                with open(os.path.join(group, "cgroup.controllers")) as available:
                    if controller not in available.read().split():
                        continue
                with open(os.path.join(group, v2_file)) as value:
                    return allowed(f"{group}/{v2_file}", value=value.read().strip(), file=f"{group}/{v2_file}")
            except OSError:
                continue
    for _, names, path in lines:
        if controller in names.split(",") and path != "/":
            group = f"/sys/fs/cgroup/{names}{path}"
            try:
                with open(os.path.join(group, v1_file)) as value:
                    return allowed(f"{group}/{v1_file}", value=value.read().strip(), file=f"{group}/{v1_file}")
            except OSError as exc:
                return error(f"cannot read {group}/{v1_file}: {exc.strerror}", exc.errno)
    return error(f"no {controller} controller manages this process's cgroup (cgroup v1 {controller} hierarchy not "
                 f"delegated, and not enabled on cgroup v2)")


@probe("cgroup")
def probe_cgroup(controller: str, tag: str) -> Result:
    """The limit of this process's own cgroup: memory (memory.max) or pids (pids.max)."""
    if controller == "memory":
        return _cgroup_file("memory", "memory.max", "memory.limit_in_bytes")
    if controller == "pids":
        return _cgroup_file("pids", "pids.max", "pids.max")
    return error(f"unknown cgroup controller {controller}")


PAGE = 4096
ALLOCATE_TIMEOUT = 60  # touching a few hundred MiB page by page takes seconds on an emulated (TCG) CPU


def available_memory() -> int:
    """Bytes the kernel says can be allocated without swapping (MemAvailable:)."""
    with open("/proc/meminfo") as meminfo:
        return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))


@probe("allocate")
def probe_allocate(size: str, tag: str) -> Result:
    """Allocate ``size`` bytes and touch every page, in a child: denied if the kernel kills it (a MemoryMax= beyond
    which nothing can be reclaimed ends in the cgroup's OOM killer, SIGKILL).

    The child's death is an OOM kill in the unit, and systemd's default OOMPolicy=stop then stops the unit with
    SIGTERM. This process ignores SIGTERM while it waits, so it can still report the kill; it exits right after.
    """
    wanted = int(size)
    available = available_memory()
    if wanted > available * 3 // 4:
        return error(f"{wanted >> 20} MiB is more than this machine can spare ({available >> 20} MiB available): "
                     "the machine's own OOM killer would decide, not the limit")
    if SHARED_KERNEL and wanted > available // HOST_MEMORY_SHARE:
        return refused(f"touching {wanted >> 20} MiB would take more than a quarter of the {available >> 20} MiB "
                       "this host has available: its other processes could be swapped out or OOM-killed")
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.alarm(ALLOCATE_TIMEOUT)
                memory = bytearray(wanted)  # calloc'd: zero pages are only mapped, so write one byte per page
                for offset in range(0, wanted, PAGE):
                    memory[offset] = 1
                code = 0
            except MemoryError:
                code = 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if os.WIFSIGNALED(status):
        name = _signal_name(os.WTERMSIG(status))
        if name == "SIGALRM":
            return error(f"touching {wanted >> 20} MiB took longer than {ALLOCATE_TIMEOUT}s")
        return {"status": "denied", "signal": name, "detail": f"killed by {name} after touching part of "
                f"{wanted >> 20} MiB", "facts": {}}
    if os.waitstatus_to_exitcode(status) == 3:
        return denied(errno.ENOMEM, f"allocating {wanted >> 20} MiB failed (MemoryError)")
    return allowed(f"allocated and touched {wanted >> 20} MiB")


@probe("tasks", where=OWN_CHILD)
def probe_tasks(count: str, tag: str) -> Result:
    """Start ``count`` threads, each a task of the cgroup: denied (EAGAIN) if the cgroup's pids limit stops one."""
    import threading

    wanted = int(count)
    if SHARED_KERNEL and wanted > HOST_MAX_TASKS:
        return refused(f"{wanted} threads could use up the host's task limits while its other processes need them "
                       f"(at most {HOST_MAX_TASKS} are started on the host's kernel)")
    release = threading.Event()
    started: list[threading.Thread] = []
    try:
        for _ in range(wanted):
            thread = threading.Thread(target=release.wait, daemon=True)
            thread.start()
            started.append(thread)
    except RuntimeError as exc:  # "can't start new thread": clone() failed with EAGAIN
        return denied(errno.EAGAIN, f"thread {len(started) + 1} of {wanted} could not start ({exc})",
                      started=len(started))
    finally:
        release.set()
        for thread in started:
            thread.join()
    return allowed(f"started {wanted} threads", started=wanted)


@probe("device")
def probe_device(path: str, tag: str) -> Result:
    """May this process open a device node for reading and writing? Asked with access(2), never by opening it:
    the device cgroup (DevicePolicy=, DeviceAllow=) answers inode permission checks with EPERM, and nothing is
    opened (opening /dev/watchdog would arm it)."""
    try:
        info = os.stat(path)
    except OSError as exc:
        return error(f"stat {path}: {exc.strerror}", exc.errno)
    if not (stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)):
        return error(f"{path} is not a device node")
    kind = "c" if stat.S_ISCHR(info.st_mode) else "b"
    node = f"{kind} {os.major(info.st_rdev)}:{os.minor(info.st_rdev)}"
    found = {"read": _access(path, os.R_OK), "write": _access(path, os.W_OK)}
    facts = {way: errno_name(err) if err else None for way, err in found.items()}
    refused = [way for way, err in found.items() if err == errno.EPERM]
    if refused:  # the device cgroup; a mode that does not let this user in is EACCES, and no device policy's doing
        return denied(errno.EPERM, f"{' and '.join(refused)} access to {path} ({node})", node=node, **facts)
    if any(found.values()):
        shown = ", ".join(f"{way} {name}" for way, name in facts.items() if name)
        return error(f"access(2) of {path} ({node}): {shown}", None, node=node, **facts)
    return allowed(f"{path} ({node}) may be opened for reading and writing", node=node, **facts)


@probe("identity")
def probe_identity(path: str, tag: str) -> Result:
    """Which object a path is (device:inode): tells a private /tmp, /dev or namespace from the machine's."""
    try:
        info = os.stat(path)
    except OSError as exc:
        return error(f"stat {path}: {exc.strerror}", exc.errno)
    return allowed(f"{path} is {info.st_dev}:{info.st_ino}", value=f"{info.st_dev}:{info.st_ino}")


def _filesystem_of(path: str) -> str | None:
    """The filesystem type of the mount holding ``path``, from /proc/self/mountinfo (the longest mount point)."""
    best, best_type = "", None
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as table:
        for line in table:
            fields = line.split()
            mount_point = fields[4].replace("\\040", " ")
            fs_type = fields[fields.index("-") + 1]
            inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best):
                best, best_type = mount_point, fs_type
    return best_type


@probe("filesystem")
def probe_filesystem(path: str, tag: str) -> Result:
    """Open a directory read-only: RestrictFileSystems= denies opening files on the filesystem types it forbids."""
    fs_type = _filesystem_of(path)
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECTORY))
    except OSError as exc:
        return from_oserror(exc, ("EPERM", "EACCES"), f"open {path} ({fs_type})", fs_type=fs_type)
    return allowed(f"opened {path} ({fs_type})", fs_type=fs_type)


@probe("interfaces")
def probe_interfaces(arg: str, tag: str) -> Result:
    """The network interfaces this process sees."""
    try:
        names = sorted(os.listdir("/sys/class/net"))
    except OSError as exc:
        names = sorted(name for _, name in socket.if_nameindex()) if exc.errno == errno.ENOENT else []
    return allowed(f"interfaces: {', '.join(names)}", value=names)


@probe("block-devices")
def probe_block_devices(arg: str, tag: str) -> Result:
    """Block device nodes under /dev (a private /dev has none)."""
    found = []
    for directory, _, names in os.walk("/dev"):
        for name in names:
            path = os.path.join(directory, name)
            try:
                if stat.S_ISBLK(os.lstat(path).st_mode):
                    found.append(path)
            except OSError:
                continue
    return allowed(f"{len(found)} block devices", value=sorted(found))


# --- the batch ----------------------------------------------------------------------------------------------

def _signal_name(number: int) -> str:
    return signal.Signals(number).name if number in signal.Signals._value2member_map_ else f"signal {number}"


def run_in_children(batch: list[tuple[str, str]], tag: str) -> list[Result]:
    """Run probes one after another in a forked child, one result line each through a pipe.

    A child killed by a signal was killed by the probe it was running: that is the probe's result (SIGSYS:
    denied by seccomp), and the remaining probes go on in a new child.
    """
    results: list[Result] = []
    pending = list(batch)
    while pending:
        read_end, write_end = os.pipe()
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(read_end)
            os.close(write_end)
            return results + [error(f"cannot fork a child for the probe: {exc.strerror}", exc.errno)] * len(pending)
        if pid == 0:
            os.close(read_end)
            try:
                for kind, arg in pending:
                    function = PROBES[kind][0]
                    signal.alarm(CHILD_TIMEOUT)  # a probe that hangs is killed by its own alarm
                    result = _in_child(function, arg, tag)
                    os.write(write_end, (json.dumps(result) + "\n").encode())
            finally:
                os._exit(0)  # never return into the batch
        os.close(write_end)
        chunks = []
        while chunk := os.read(read_end, 65536):
            chunks.append(chunk)
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
        done = [json.loads(line) for line in b"".join(chunks).decode().splitlines() if line.strip()]
        results += done
        pending = pending[len(done):]
        if not pending:
            break
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGALRM:
            results.append(error(f"the probe did not finish within {CHILD_TIMEOUT}s"))
        elif os.WIFSIGNALED(status):
            name = _signal_name(os.WTERMSIG(status))
            results.append({"status": "denied", "signal": name, "detail": f"killed by {name}", "facts": {}})
        else:
            results.append(error(f"the probe's child exited with status {os.waitstatus_to_exitcode(status)} "
                                 "and no result"))
        pending = pending[1:]
    return results


def run_probe(kind: str, arg: str, tag: str) -> Result:
    """One probe, in this process or a child of its own as its kind requires."""
    if kind not in PROBES:
        return error(f"unknown probe kind {kind}")
    function, where = PROBES[kind]
    if where != HERE:
        return run_in_children([(kind, arg)], tag)[0]
    try:
        return function(arg, tag)
    except OSError as exc:
        return error(f"{kind} {arg}: {exc.strerror or exc}", exc.errno)
    except Exception as exc:  # noqa: BLE001 - one broken probe must not end the batch
        return error(f"{kind} {arg}: {type(exc).__name__}: {exc}")


def no_core_dumps() -> None:
    """No core file for a child a seccomp filter kills (SIGSYS dumps core), whatever LimitCORE= the unit has.

    Done after the probes that run in this process: the limits probe has read the unit's real RLIMIT_CORE.
    prlimit64 is in systemd's @default group, so no SystemCallFilter= allow list kills this call.
    """
    import resource

    try:
        resource.prlimit(0, resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    except (OSError, ValueError):
        pass


def main(argv: list[str]) -> int:
    global CAREFUL, SHARED_KERNEL, LOADED_FAMILIES
    request = json.loads(argv[1])
    CAREFUL = request.get("guard") == GUARD_HOST
    SHARED_KERNEL = CAREFUL or request.get("guard") == GUARD_KERNEL
    if isinstance(request.get("loaded_families"), list):
        LOADED_FAMILIES = frozenset(request["loaded_families"])
    tag = secrets.token_hex(4)
    probes = [(str(kind), str(arg)) for kind, arg in request["probes"]]

    def report(kind: str, arg: str, result: Result) -> None:
        result.update(kind=kind, arg=arg)
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()  # line by line: a batch that dies still reported what it did

    def where(kind: str) -> str:
        return PROBES[kind][1] if kind in PROBES else HERE

    # In this process first, then every probe that can share a child, then those that need one each.
    for kind, arg in (p for p in probes if where(p[0]) == HERE):
        report(kind, arg, run_probe(kind, arg, tag))
    no_core_dumps()
    shared = [p for p in probes if where(p[0]) == CHILD]
    for (kind, arg), result in zip(shared, run_in_children(shared, tag)):
        report(kind, arg, result)
    for kind, arg in (p for p in probes if where(p[0]) == OWN_CHILD):
        report(kind, arg, run_probe(kind, arg, tag))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
