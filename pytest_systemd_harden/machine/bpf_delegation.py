"""IP firewalling for a user-namespaced container: its systemd's bpf() calls, made for it under strict rules.

``IPAddressDeny=``/``IPAddressAllow=`` are BPF programs (``BPF_PROG_TYPE_CGROUP_SKB``) that systemd loads and
attaches to the service's cgroup. Loading one needs CAP_BPF and CAP_NET_ADMIN in the host's user namespace, which
the root of a user-namespaced container never has: its systemd finds "BPF firewalling not supported" and starts
the service without the firewall, so nothing about these directives can be shown on the default machine.

What a BPF token does for a container on a newer systemd, done here by the test process for systemd's own calls:
a seccomp filter installed before nspawn starts (:data:`LISTENER_STEP`) hands every ``bpf()`` of the machine to this
process (``SECCOMP_RET_USER_NOTIF``); :class:`BpfDelegate` makes the call itself, with the caller's file
descriptors (``pidfd_getfd``) and memory (``/proc/PID/mem``), and gives the result back (an fd is installed in the
caller with ``SECCOMP_IOCTL_NOTIF_ADDFD``). Only what systemd's IP firewall needs is made, and only so:

* programs of type CGROUP_SKB, at most 4096 instructions, no BTF, no bpf-to-bpf or kernel-function calls, maps
  referenced only by fds the caller holds (at most 64 fd numbers);
* maps of type hash, array or LPM trie, at most :data:`MAX_MAP_BYTES` of kernel memory each when full (elements'
  headers counted: :func:`map_kernel_bytes`), no BTF, no inner maps;
* attach and detach only as CGROUP_INET_INGRESS/EGRESS and only to a cgroup of this machine (checked by inode
  against the machine's own cgroup2 tree);
* element lookup/update/delete on those maps; the info of a bpf object;
* a call against these rules is refused with EPERM; every other command goes on as the caller's own call, with
  its own credentials (``SECCOMP_USER_NOTIF_FLAG_CONTINUE``): the kernel answers it as it answers the container
  without delegation (EPERM for a privileged command, EINVAL for one it does not know), and nothing is granted.

The calls are made from a thread that dropped CAP_SYS_ADMIN and CAP_PERFMON from its effective set (capabilities
are per thread): the verifier then treats the program as a BPF token's would be treated, refusing pointer leaks and
speculative-execution gadgets, so what the container can make the host's kernel run is what it could with a
token. Calls of processes in the host's own user namespace (nspawn itself) go on unchanged.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import select
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# --- the ABI (linux/bpf.h, linux/seccomp.h, x86-64) ----------------------------------------------------------

SYS_BPF, SYS_SECCOMP, SYS_CAPGET, SYS_CAPSET, SYS_PIDFD_OPEN, SYS_PIDFD_GETFD = 321, 317, 125, 126, 434, 438
AUDIT_ARCH_X86_64, AUDIT_ARCH_I386 = 0xC000003E, 0x40000003
X32_SYSCALL_BIT = 0x40000000

BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM = 0, 1, 2, 3
BPF_PROG_LOAD, BPF_PROG_ATTACH, BPF_PROG_DETACH, BPF_OBJ_GET_INFO_BY_FD = 5, 8, 9, 15
BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_LPM_TRIE = 1, 2, 11
BPF_PROG_TYPE_CGROUP_SKB = 8
BPF_CGROUP_INET_INGRESS, BPF_CGROUP_INET_EGRESS = 0, 1
BPF_F_NO_PREALLOC = 1
BPF_F_ALLOW_OVERRIDE, BPF_F_ALLOW_MULTI = 1, 2
BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_VALUE = 1, 2
BPF_LD_IMM64, BPF_CALL = 0x18, 0x85
BPF_MAXINSNS = 4096
MAX_USED_MAPS = 64  # the verifier's limit of maps per program (E2BIG past it)
MAX_ATTR_SIZE = 4096  # the kernel refuses a larger attr with E2BIG (PAGE_SIZE)
MAX_MAP_BYTES = 16 << 20
MAX_LOG_BYTES = 1 << 20
MAX_INFO_BYTES = 1024
# Over a machine's life: its maps and programs are kernel memory charged to the test process, not to the machine's
# cgroup, so their number is bounded (systemd makes a few small maps and two programs per start of a unit).
MAP_BYTES_BUDGET = 256 << 20
PROGRAM_BUDGET = 10000
# A program of 4096 instructions pins 60 KiB (36 KiB of program, 24 KiB of JIT image, measured), 10000 of them 600
# MiB: the instructions are bounded too (systemd's firewall programs have a few dozen each).
INSTRUCTION_BUDGET = 1 << 20
# The tally of calls (BpfDelegate.calls) names each refusal with its reason, which carries the caller's numbers:
# a machine making refused calls of ever new numbers grew the test process by 160 bytes a call (20000 calls a
# second). Past this many names, refusals are counted under one.
MAX_TALLIED_NAMES = 64
# Part of the capability cache's key: a change of what is delegated is measured anew.
RULES_VERSION = "bpf-delegation-3"

SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER = 1, 1 << 3
SECCOMP_RET_ALLOW, SECCOMP_RET_USER_NOTIF = 0x7FFF0000, 0x7FC00000
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
SECCOMP_ADDFD_FLAG_SEND = 1 << 1
SECCOMP_IOCTL_NOTIF_RECV, SECCOMP_IOCTL_NOTIF_SEND = 0xC0502100, 0xC0182101
SECCOMP_IOCTL_NOTIF_ID_VALID, SECCOMP_IOCTL_NOTIF_ADDFD = 0x40082102, 0x40182103
NOTIF = struct.Struct("=QII iI Q 6Q")  # struct seccomp_notif: id, pid, flags, seccomp_data (nr, arch, ip, args)
NOTIF_RESP = struct.Struct("=QqiI")  # id, val, error, flags
NOTIF_ADDFD = struct.Struct("=QIIII")  # id, flags, srcfd, newfd, newfd_flags

CAP_SYS_ADMIN, CAP_PERFMON = 21, 38
LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _filter_program() -> bytes:
    """A classic BPF seccomp filter: bpf() (x86-64, x32 and i386 numbers) to the listener, everything else allowed."""
    ld_abs, jeq, alu_and, ret = 0x20, 0x15, 0x54, 0x06

    def op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
        return struct.pack("=HBBI", code, jt, jf, k)

    return b"".join([
        op(ld_abs, 4),                                 # 0: A = arch
        op(jeq, AUDIT_ARCH_X86_64, 0, 3),              # 1: x86-64? 2 : 5
        op(ld_abs, 0),                                 # 2: A = nr
        op(alu_and, 0xFFFFFFFF & ~X32_SYSCALL_BIT),    # 3: x32 calls are x86-64 numbers with a bit set
        op(jeq, SYS_BPF, 3, 4),                        # 4: bpf? 8 : 9
        op(jeq, AUDIT_ARCH_I386, 0, 3),                # 5: i386? 6 : 9
        op(ld_abs, 0),                                 # 6: A = nr
        op(jeq, 357, 0, 1),                            # 7: i386's bpf? 8 : 9
        op(ret, SECCOMP_RET_USER_NOTIF),               # 8
        op(ret, SECCOMP_RET_ALLOW),                    # 9
    ])


FILTER = _filter_program()

# Run by the mount script that becomes nspawn (a step of its plan: machine/mounts.py), once the machine's mounts are
# made and before the exec, in the same process: installs the filter, sends its listener to the test process over
# the socket the script inherited (``step["channel"]``), and closes it. If the kernel refuses the filter it says why
# and nspawn starts anyway: the machine runs as it would without delegation. (A Python process of its own before,
# between the cgroup join and the mount script: an interpreter's start, ~10 ms of every boot measured.)
LISTENER_STEP = r"""
import ctypes, os, socket, struct
libc = ctypes.CDLL(None, use_errno=True)
program = ctypes.create_string_buffer(bytes.fromhex(step["filter"]))
fprog = ctypes.create_string_buffer(struct.pack("=H6xQ", len(program.raw) // 8, ctypes.addressof(program)))
listener = libc.syscall(ctypes.c_long(SECCOMP), ctypes.c_long(MODE), ctypes.c_long(FLAGS), fprog)
channel = socket.socket(fileno=step["channel"])
if listener < 0:
    channel.send(("refused " + os.strerror(ctypes.get_errno())).encode())
else:
    channel.sendmsg([b"listener"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", listener))])
    os.close(listener)
channel.close()
""".replace("SECCOMP", str(SYS_SECCOMP)).replace("MODE", str(SECCOMP_SET_MODE_FILTER)).replace(
    "FLAGS", str(SECCOMP_FILTER_FLAG_NEW_LISTENER))


def listener_step(channel_fd: int) -> dict[str, object]:
    """The mount plan's last step (machine/mounts.py): the filter installed before nspawn starts; the listener
    arrives on ``channel_fd``'s peer (:func:`receive_listener`)."""
    return {"python": LISTENER_STEP, "filter": FILTER.hex(), "channel": channel_fd}


def supported() -> str | None:
    """None where delegation can run here, else why not (one line)."""
    if platform.machine() != "x86_64":
        return f"BPF delegation knows x86-64 only (this machine: {platform.machine()})"
    release = tuple(int(part) for part in platform.release().split(".")[:2] if part.isdigit())
    if release < (5, 14):  # SECCOMP_ADDFD_FLAG_SEND
        return f"BPF delegation needs Linux 5.14 or later (this kernel: {platform.release()})"
    return None


def receive_listener(channel: socket.socket, timeout: float = 30.0) -> int:
    """The listener fd the mount script sent (:data:`LISTENER_STEP`); OSError with its reason if it could not install
    the filter."""
    channel.settimeout(timeout)
    message, ancillary, _flags, _addr = channel.recvmsg(64, socket.CMSG_SPACE(4))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS and len(data) >= 4:
            return int(struct.unpack("i", data[:4])[0])
    raise OSError(errno.EPERM, message.decode(errors="replace") or "the mount script sent no listener")


# --- the rules: pure functions over the caller's attr bytes ----------------------------------------------------

class Refused(Exception):
    """The call is answered with an errno, without making it."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code


def _u32(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("=I", data, offset)[0]) if offset + 4 <= len(data) else 0


def _u64(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("=Q", data, offset)[0]) if offset + 8 <= len(data) else 0


def _zero_except(data: bytes, keep: list[tuple[int, int]], what: str) -> None:
    """Refuse (EPERM) an attr with a field set outside ``keep`` ([start, end) byte ranges): a feature not delegated."""
    for offset, byte in enumerate(data):
        if byte and not any(start <= offset < end for start, end in keep):
            raise Refused(errno.EPERM, f"{what}: field at byte {offset} is not delegated")


def check_map_create(attr: bytes) -> None:
    """map_type, key_size, value_size, max_entries, map_flags [0, 20) and map_name [28, 44) only."""
    _zero_except(attr, [(0, 20), (28, 44)], "BPF_MAP_CREATE")
    map_type, key_size, value_size, entries, flags = struct.unpack_from("=5I", attr.ljust(20, b"\0"))
    if map_type not in (BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_LPM_TRIE):
        raise Refused(errno.EPERM, f"BPF_MAP_CREATE: map type {map_type} is not delegated")
    if flags & ~BPF_F_NO_PREALLOC:
        raise Refused(errno.EPERM, f"BPF_MAP_CREATE: map flags {flags:#x} are not delegated")
    if map_kernel_bytes(map_type, key_size, value_size, entries) > MAX_MAP_BYTES:
        raise Refused(errno.EPERM, f"BPF_MAP_CREATE: {entries} entries of {key_size}+{value_size} bytes would take "
                      f"over {MAX_MAP_BYTES >> 20} MiB of kernel memory")


# What a full map costs the kernel beyond its keys and values. Counted from the key and value sizes alone, a hash
# map of 1-byte keys and values was charged 2 bytes an element and took 80 (measured: memlock in its fdinfo), so
# the budget let a machine pin 40 times its worth of host memory. Element headers: a hash element's is 48 bytes on
# 6.x, an LPM trie node's 40; this rounds up. The map's own header (an array's is 120 bytes) takes less than a page.
ELEMENT_HEADER = 64
MAP_HEADER = 4096
HASH_BUCKET_BYTES = 16


def _power_of_two_at_least(size: int) -> int:
    """Also a bound of the allocator's size class for ``size`` bytes."""
    return 1 << max(size - 1, 0).bit_length()


def map_kernel_bytes(map_type: int, key_size: int, value_size: int, entries: int) -> int:
    """An upper bound of the kernel memory a map of these sizes takes when full (charged to the test process, not
    to the machine's capped cgroup)."""
    def round8(size: int) -> int:
        return (size + 7) & ~7

    if map_type == BPF_MAP_TYPE_ARRAY:  # made without CAP_PERFMON, its length is rounded up (Spectre masking)
        return MAP_HEADER + _power_of_two_at_least(entries) * round8(value_size)
    element = _power_of_two_at_least(ELEMENT_HEADER + round8(key_size) + round8(value_size))
    if map_type == BPF_MAP_TYPE_LPM_TRIE:  # an intermediate node for each element at most
        return MAP_HEADER + 2 * entries * element
    # A preallocated hash has a spare element per CPU, and buckets to the next power of two of its length.
    return (MAP_HEADER + (entries + (os.cpu_count() or 1)) * element
            + _power_of_two_at_least(entries) * HASH_BUCKET_BYTES)


# PROG_LOAD: prog_type .. prog_name [0, 64) and expected_attach_type [68, 72) may be set; log_true_size [140, 144)
# is the kernel's answer.
PROG_LOAD_FIELDS = [(0, 64), (68, 72), (140, 144)]


def check_prog_load(attr: bytes) -> None:
    _zero_except(attr, PROG_LOAD_FIELDS, "BPF_PROG_LOAD")
    prog_type, insn_count = _u32(attr, 0), _u32(attr, 4)
    if prog_type != BPF_PROG_TYPE_CGROUP_SKB:
        raise Refused(errno.EPERM, f"BPF_PROG_LOAD: program type {prog_type} is not delegated (CGROUP_SKB only)")
    if not 0 < insn_count <= BPF_MAXINSNS:
        raise Refused(errno.EPERM if insn_count else errno.EINVAL,
                      f"BPF_PROG_LOAD: {insn_count} instructions (1 to {BPF_MAXINSNS})")
    if _u32(attr, 44):
        raise Refused(errno.EPERM, "BPF_PROG_LOAD: program flags are not delegated")
    if _u32(attr, 68) not in (0, BPF_CGROUP_INET_INGRESS, BPF_CGROUP_INET_EGRESS):
        raise Refused(errno.EPERM, "BPF_PROG_LOAD: expected attach type is not delegated")


def map_fd_slots(insns: bytes) -> list[int]:
    """Indexes of the instructions whose imm is a map fd of the caller (BPF_LD_IMM64 with a map pseudo source);
    Refused for any other pseudo source or a call that is not a helper call."""
    slots: list[int] = []
    index, count = 0, len(insns) // 8
    while index < count:
        code, regs = insns[index * 8], insns[index * 8 + 1]
        source = regs >> 4
        if code == BPF_LD_IMM64:
            if source in (BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_VALUE):
                slots.append(index)
            elif source:
                raise Refused(errno.EPERM, f"BPF_PROG_LOAD: instruction {index} loads pseudo source {source}")
            index += 2
            continue
        if code == BPF_CALL and source:
            raise Refused(errno.EPERM, f"BPF_PROG_LOAD: instruction {index} is not a helper call")
        index += 1
    return slots


def check_attach(attr: bytes, detach: bool) -> None:
    """target_fd, attach_bpf_fd, attach_type, attach_flags [0, 16) only; INET ingress/egress; no REPLACE."""
    what = "BPF_PROG_DETACH" if detach else "BPF_PROG_ATTACH"
    _zero_except(attr, [(0, 16)], what)
    attach_type, flags = _u32(attr, 8), _u32(attr, 12)
    if attach_type not in (BPF_CGROUP_INET_INGRESS, BPF_CGROUP_INET_EGRESS):
        raise Refused(errno.EPERM, f"{what}: attach type {attach_type} is not delegated")
    if flags & ~(BPF_F_ALLOW_OVERRIDE | BPF_F_ALLOW_MULTI):
        raise Refused(errno.EPERM, f"{what}: flags {flags:#x} are not delegated")


IN_TREE, OTHER_CGROUP, OTHER_FILESYSTEM = "in the tree", "another cgroup", "not a cgroup"


def place(tree: Path, fd: int) -> str:
    """Where the directory open as ``fd`` is: in ``tree`` (a machine's cgroup2 group, by device and inode), in
    another group of the same cgroup2 filesystem, or not on it at all."""
    wanted = os.fstat(fd)
    if wanted.st_dev != os.stat(tree).st_dev:
        return OTHER_FILESYSTEM
    for directory, _subdirs, _files in os.walk(tree):
        seen = os.stat(directory)
        if (seen.st_dev, seen.st_ino) == (wanted.st_dev, wanted.st_ino):
            return IN_TREE
    return OTHER_CGROUP


# --- the supervisor ------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall(number: int, *args: int | ctypes.Array[ctypes.c_char] | None) -> int:
    converted = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    result = int(_libc.syscall(ctypes.c_long(number), *converted))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def drop_leaky_capabilities() -> None:
    """Drop CAP_SYS_ADMIN and CAP_PERFMON from this thread's effective set (the verifier's pointer-leak and
    speculation checks then apply); CAP_BPF, CAP_NET_ADMIN and CAP_SYS_PTRACE stay."""
    header = ctypes.create_string_buffer(struct.pack("=Ii", LINUX_CAPABILITY_VERSION_3, 0))
    data = ctypes.create_string_buffer(24)
    _syscall(SYS_CAPGET, header, data)
    words = list(struct.unpack("=6I", data.raw))  # (effective, permitted, inheritable) x 2
    words[0] &= ~(1 << CAP_SYS_ADMIN)
    words[3] &= ~(1 << (CAP_PERFMON - 32))
    _syscall(SYS_CAPSET, header, ctypes.create_string_buffer(struct.pack("=6I", *words)))


def _bpf(command: int, attr: bytes) -> tuple[int, bytes]:
    """bpf() in this process: (result, the attr as the kernel left it)."""
    buffer = ctypes.create_string_buffer(attr, len(attr))
    result = _syscall(SYS_BPF, command, buffer, len(attr))
    return result, buffer.raw


def _address(buffer: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buffer)


@dataclass
class Caller:
    """The process whose bpf() call waits, seen through its pidfd and memory."""

    pid: int
    pidfd: int
    mem: int
    local_fds: list[int] = field(default_factory=list)

    @classmethod
    def open(cls, pid: int) -> Caller:
        pidfd = _syscall(SYS_PIDFD_OPEN, pid, 0)
        try:
            mem = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            os.close(pidfd)
            raise
        return cls(pid, pidfd, mem)

    # An address past 2**63 (a kernel address) is no offset pread/pwrite take: OverflowError, the kernel's EFAULT.
    def read(self, address: int, size: int) -> bytes:
        if size == 0:
            return b""
        try:
            data = os.pread(self.mem, size, address)
        except (OSError, OverflowError):
            data = b""
        if len(data) != size:
            raise Refused(errno.EFAULT, f"cannot read {size} bytes at {address:#x}")
        return data

    def write(self, address: int, data: bytes) -> None:
        try:
            written = os.pwrite(self.mem, data, address)
        except (OSError, OverflowError):
            written = -1
        if written != len(data):
            raise Refused(errno.EFAULT, f"cannot write {len(data)} bytes at {address:#x}")

    def fd(self, number: int) -> int:
        """A local copy of the caller's fd ``number``, or -1 (an fd no process has: the kernel says EBADF)."""
        if number > 0x7FFFFFFF:  # a negative int the caller passed
            return -1
        try:
            local = _syscall(SYS_PIDFD_GETFD, self.pidfd, number, 0)
        except OSError:
            return -1
        self.local_fds.append(local)
        return local

    def close(self) -> None:
        for fd in (*self.local_fds, self.mem, self.pidfd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.local_fds.clear()


def tally(counts: dict[str, int], name: str) -> None:
    """Count one call under ``name``: a command's (a few) or a refusal's reason, a new one of which is counted as
    "refused: other reasons" once there are :data:`MAX_TALLIED_NAMES` names."""
    if name.startswith("refused: ") and name not in counts and len(counts) >= MAX_TALLIED_NAMES:
        name = "refused: other reasons"
    counts[name] = counts.get(name, 0) + 1


# The commands the delegate makes, by the name the tally counts them under; any other goes on as the caller's own.
DELEGATED_COMMANDS = {BPF_MAP_CREATE: "map_create", BPF_MAP_LOOKUP_ELEM: "map_lookup",
                      BPF_MAP_UPDATE_ELEM: "map_update", BPF_MAP_DELETE_ELEM: "map_delete",
                      BPF_PROG_LOAD: "prog_load", BPF_PROG_ATTACH: "attach", BPF_PROG_DETACH: "detach",
                      BPF_OBJ_GET_INFO_BY_FD: "info"}


@dataclass
class Answer:
    value: int = 0
    error: int = 0
    fd: int | None = None  # installed in the caller and returned to it


class BpfDelegate:
    """Answers the bpf() calls of one machine (see the module's docstring) from a thread of its own."""

    def __init__(self, listener: int, cgroup2: Path, name: str, log: Callable[[str], None] = lambda line: None):
        self.listener = listener
        self.cgroup2 = cgroup2
        self.log = log
        self.calls: dict[str, int] = {}  # command name (or "refused: ...") -> count, for diagnosis and tests
        # Made so far, against MAP_BYTES_BUDGET, PROGRAM_BUDGET and INSTRUCTION_BUDGET.
        self.map_bytes, self.programs, self.instructions = 0, 0, 0
        self._stopping = threading.Event()
        self._host_userns = os.stat("/proc/self/ns/user").st_ino
        self._thread = threading.Thread(target=self._serve, name=f"bpf delegate {name}", daemon=True)
        self._thread.start()

    def stop(self, wait: float = 5.0) -> None:
        """Stop answering (the machine is gone); the listener is closed by the thread when it ends, which may be
        after ``wait``: closed under a call still being made, its number could be reused for another machine's
        listener by the time that call is answered."""
        self._stopping.set()
        self._thread.join(timeout=wait)

    def _serve(self) -> None:
        try:
            self._loop()
        finally:
            os.close(self.listener)

    # The loop: one notification at a time; a failure answers the call with an errno, it never leaves it waiting.
    def _loop(self) -> None:
        try:
            drop_leaky_capabilities()
        except OSError as exc:  # then nothing is delegated: every call goes on as the caller's own (_one)
            self.log(f"BPF delegation off: cannot drop CAP_SYS_ADMIN/CAP_PERFMON in its thread ({exc})")
            self._refuse_all = True
        else:
            self._refuse_all = False
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        while not self._stopping.is_set():
            try:
                events = poller.poll(250)
            except InterruptedError:
                continue
            if any(mask & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _fd, mask in events):
                return  # every process behind the filter is gone
            if events:
                self._one()

    def _one(self) -> None:
        buffer = bytearray(NOTIF.size)
        try:
            fcntl.ioctl(self.listener, SECCOMP_IOCTL_NOTIF_RECV, buffer, True)
        except OSError:
            return  # the caller died before we read it
        notif_id, pid, _flags, nr, arch, _ip, *args = NOTIF.unpack(buffer)
        try:
            same_userns = os.stat(f"/proc/{pid}/ns/user").st_ino == self._host_userns
        except OSError:
            same_userns = False
        if same_userns:  # nspawn itself, not the machine: its call goes on as if no filter were there
            self._respond(notif_id, Answer(), flags=SECCOMP_USER_NOTIF_FLAG_CONTINUE)
            return
        # What is not delegated goes on as the caller's own call, with its own credentials (the root of a user
        # namespace): the kernel answers it exactly as it would without the filter (EPERM for a privileged
        # command, EINVAL for one it does not know), and nothing is granted.
        if arch != AUDIT_ARCH_X86_64 or nr != SYS_BPF or self._refuse_all or args[0] not in DELEGATED_COMMANDS:
            tally(self.calls, "the kernel's own answer")
            self._respond(notif_id, Answer(), flags=SECCOMP_USER_NOTIF_FLAG_CONTINUE)
            return
        try:
            caller = Caller.open(pid)
        except OSError:  # gone, or a thread (a tid has no pidfd of its own here): the kernel's own answer
            self._respond(notif_id, Answer(), flags=SECCOMP_USER_NOTIF_FLAG_CONTINUE)
            return
        try:
            answer = self._answer(caller, notif_id, args[0], args[1], args[2])
        except Refused as refused:
            tally(self.calls, f"refused: {refused}")
            answer = Answer(error=refused.code)
        except OSError as exc:
            answer = Answer(error=exc.errno or errno.EPERM)
        except Exception as exc:  # noqa: BLE001 - a bug here must not leave the machine's systemd waiting
            self.log(f"BPF delegation: {type(exc).__name__}: {exc}")
            answer = Answer(error=errno.EPERM)
        try:
            self._respond(notif_id, answer)
        finally:
            if answer.fd is not None:
                os.close(answer.fd)
            caller.close()

    def _respond(self, notif_id: int, answer: Answer, flags: int = 0) -> None:
        try:
            if answer.fd is not None:
                fcntl.ioctl(self.listener, SECCOMP_IOCTL_NOTIF_ADDFD,
                      NOTIF_ADDFD.pack(notif_id, SECCOMP_ADDFD_FLAG_SEND, answer.fd, 0, os.O_CLOEXEC))
                return
            fcntl.ioctl(self.listener, SECCOMP_IOCTL_NOTIF_SEND,
                  NOTIF_RESP.pack(notif_id, answer.value, -answer.error if answer.error else 0, flags))
        except OSError:
            pass  # the caller is gone (ENOENT): nothing to answer

    def _still_waiting(self, notif_id: int) -> None:
        """After reading the caller's memory by pid: the call is still the same (the pid was not reused)."""
        try:
            fcntl.ioctl(self.listener, SECCOMP_IOCTL_NOTIF_ID_VALID, struct.pack("=Q", notif_id))
        except OSError:
            raise Refused(errno.EINTR, "the caller is gone") from None

    def _answer(self, caller: Caller, notif_id: int, command: int, address: int,
                size: int) -> Answer:
        if size > MAX_ATTR_SIZE:
            raise Refused(errno.E2BIG, "attr larger than a page")
        attr = caller.read(address, size)
        self._still_waiting(notif_id)
        handler = {
            BPF_MAP_CREATE: self._map_create, BPF_MAP_LOOKUP_ELEM: self._map_element,
            BPF_MAP_UPDATE_ELEM: self._map_element, BPF_MAP_DELETE_ELEM: self._map_element,
            BPF_PROG_LOAD: self._prog_load, BPF_PROG_ATTACH: self._attach, BPF_PROG_DETACH: self._attach,
            BPF_OBJ_GET_INFO_BY_FD: self._info,
        }[command]  # one of DELEGATED_COMMANDS: _one lets every other go on as the caller's own call
        answer = handler(caller, command, attr, address)
        tally(self.calls, DELEGATED_COMMANDS[command])
        return answer

    def _map_create(self, caller: Caller, command: int, attr: bytes, address: int) -> Answer:
        check_map_create(attr)
        size = map_kernel_bytes(*struct.unpack_from("=4I", attr.ljust(16, b"\0")))
        if self.map_bytes + size > MAP_BYTES_BUDGET:
            raise Refused(errno.EPERM, f"BPF_MAP_CREATE: the machine's maps would pass {MAP_BYTES_BUDGET >> 20} MiB")
        fd, _ = _bpf(command, attr)
        self.map_bytes += size
        return Answer(fd=fd)

    def _map_info(self, fd: int) -> tuple[int, int, int]:
        """(type, key size, value size) of a map fd of ours: a lookup writes exactly that many bytes back."""
        info = ctypes.create_string_buffer(80)
        _bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", fd, 80, _address(info)))
        map_type, _id, key_size, value_size = struct.unpack_from("=4I", info.raw)
        return map_type, key_size, value_size

    def _map_element(self, caller: Caller, command: int, attr: bytes, address: int) -> Answer:
        _zero_except(attr, [(0, 4), (8, 32)], "BPF_MAP_*_ELEM")
        fd = caller.fd(_u32(attr, 0))
        if fd < 0:
            raise Refused(errno.EBADF, "no such map fd")
        map_type, key_size, value_size = self._map_info(fd)
        if map_type not in (BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_LPM_TRIE):
            raise Refused(errno.EPERM, f"map type {map_type} is not delegated")
        key = ctypes.create_string_buffer(caller.read(_u64(attr, 8), key_size), key_size)
        value_address = _u64(attr, 16)
        if command == BPF_MAP_UPDATE_ELEM:
            value = ctypes.create_string_buffer(caller.read(value_address, value_size), value_size)
        else:
            value = ctypes.create_string_buffer(value_size)
        local = struct.pack("=IIQQQ", fd, 0, _address(key), _address(value) if command != BPF_MAP_DELETE_ELEM else 0,
                            _u64(attr, 24))
        result, _ = _bpf(command, local)
        if command == BPF_MAP_LOOKUP_ELEM:
            caller.write(value_address, value.raw)
        return Answer(value=result)

    def _prog_load(self, caller: Caller, command: int, attr: bytes, address: int) -> Answer:
        check_prog_load(attr)
        count = _u32(attr, 4)
        if self.programs >= PROGRAM_BUDGET:
            raise Refused(errno.EPERM, f"BPF_PROG_LOAD: the machine loaded {PROGRAM_BUDGET} programs already")
        if self.instructions + count > INSTRUCTION_BUDGET:
            raise Refused(errno.EPERM, f"BPF_PROG_LOAD: the machine loaded {self.instructions} instructions already "
                          f"(of {INSTRUCTION_BUDGET})")
        self.programs += 1
        self.instructions += count
        insns = bytearray(caller.read(_u64(attr, 8), count * 8))
        slots = map_fd_slots(bytes(insns))
        # Each fd number is a copy held by the test process until the call is answered: 2048 of them for a program
        # of 4096 instructions, enough to take the test process's last free fds (a soft limit of 1024 is common).
        numbers = {int(struct.unpack_from("=I", insns, slot * 8 + 4)[0]) for slot in slots}
        if len(numbers) > MAX_USED_MAPS:
            raise Refused(errno.E2BIG, f"BPF_PROG_LOAD: maps by {len(numbers)} fd numbers (a program may use "
                          f"{MAX_USED_MAPS} maps)")
        local_fds = {number: caller.fd(number) for number in numbers}
        for slot in slots:
            number = int(struct.unpack_from("=I", insns, slot * 8 + 4)[0])
            struct.pack_into("=i", insns, slot * 8 + 4, local_fds[number])
        license_text = b""
        license_address = _u64(attr, 16)
        while license_address and len(license_text) < 128:  # a C string: up to its end (pages may end anywhere)
            byte = caller.read(license_address + len(license_text), 1)
            if byte == b"\0":
                break
            license_text += byte
        insn_buffer = ctypes.create_string_buffer(bytes(insns), len(insns))
        license_buffer = ctypes.create_string_buffer(license_text + b"\0")
        log_level, log_size, log_address = _u32(attr, 24), _u32(attr, 28), _u64(attr, 32)
        log_size = min(log_size, MAX_LOG_BYTES) if log_level and log_address else 0
        log = ctypes.create_string_buffer(max(log_size, 1))
        local = bytearray(attr.ljust(144, b"\0"))
        struct.pack_into("=QQIIQ", local, 8, _address(insn_buffer), _address(license_buffer),
                         log_level if log_size else 0, log_size, _address(log) if log_size else 0)
        try:
            fd, _ = _bpf(command, bytes(local[:max(len(attr), 72)]))
        except OSError:
            if log_size:  # the verifier's reasons; a log that cannot be written back is the kernel's EFAULT too
                caller.write(log_address, log.raw[:log_size])
            raise
        if log_size:
            try:
                caller.write(log_address, log.raw[:log_size])
            except Refused:
                # As the kernel fails a load whose log it cannot copy out. Closing matters: the fd is ours until
                # it is installed in the caller, and a kept one would be a program and an fd of the test process
                # for every such call.
                os.close(fd)
                raise
        return Answer(fd=fd)

    def _attach(self, caller: Caller, command: int, attr: bytes, address: int) -> Answer:
        check_attach(attr, detach=command == BPF_PROG_DETACH)
        target = caller.fd(_u32(attr, 0))
        where = place(self.cgroup2, target) if target >= 0 else OTHER_FILESYSTEM
        if where == OTHER_CGROUP:
            raise Refused(errno.EPERM, "the target is a cgroup that is not this machine's")
        if where == OTHER_FILESYSTEM:  # not a cgroup at all: the kernel's own answer (EBADF), as on a host
            target = -1
        program = caller.fd(_u32(attr, 4))  # for a detach, also a non-program: the kernel then detaches the one
        rewritten = bytearray(attr.ljust(16, b"\0"))
        struct.pack_into("=ii", rewritten, 0, target, program)
        result, _ = _bpf(command, bytes(rewritten))
        return Answer(value=result)

    def _info(self, caller: Caller, command: int, attr: bytes, address: int) -> Answer:
        _zero_except(attr, [(0, 16)], "BPF_OBJ_GET_INFO_BY_FD")
        fd = caller.fd(_u32(attr, 0))
        length, info_address = min(_u32(attr, 4), MAX_INFO_BYTES), _u64(attr, 8)
        if any(caller.read(info_address, length)):  # an input field would make the kernel write to our memory
            raise Refused(errno.EPERM, "BPF_OBJ_GET_INFO_BY_FD: only an all-zero info is delegated")
        info = ctypes.create_string_buffer(max(length, 1))
        result, after = _bpf(command, struct.pack("=iIQ", fd, length, _address(info)))
        written = _u32(after, 4)
        caller.write(info_address, info.raw[:written])
        caller.write(address + 4, struct.pack("=I", written))
        return Answer(value=result)
