"""The kernel's own evidence of a denial: seccomp audit records (type=1326) of a machine's processes.

When a seccomp filter kills a process (SystemCallFilter= without SystemCallErrorNumber=, SystemCallArchitectures=)
or logs a call (SystemCallLog=), the kernel writes an audit record to its log with the pid, comm, exe, arch and
syscall number. The service may print nothing at all - a helper killed by SIGSYS whose parent reports only an exit
status, or a hang - but the record still names the call.

The records are read on the host from two sources, merged: the kernel's audit multicast group (a read-only
netlink listener, CAP_AUDIT_READ, as journald's audit reader is) and /dev/kmsg. Neither changes a kernel setting or
takes a message from anyone (unlike /proc/kmsg or registering as the audit daemon). The kernel prints at most
``kernel.printk_ratelimit_burst`` records per ``printk_ratelimit`` seconds to its log for the whole host (10 per 5 s
by default), so after a few kills anywhere on the host /dev/kmsg drops the very records a diagnosis follows; the
multicast group gets every one. /dev/kmsg stays as the fallback where the group cannot be joined (no
CAP_AUDIT_READ; a network namespace other than the host's, which the kernel never multicasts to). A record belongs
to the machine when it was written while the check ran and its process is the machine's (alive in its cgroup), or
is already gone and ran a program the machine has. A process that is gone cannot always be told apart from one of
another machine on the same host killed in the same moment (the same image, the same program), so the diagnosis
treats a record as a lead to try first, and the rerun decides.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .syscall_numbers import ARCH_NAMES, SYSCALL_NAMES

KMSG = "/dev/kmsg"
NETLINK_AUDIT = 9  # linux/netlink.h
AUDIT_NLGRP_READLOG = 1  # linux/audit.h: the read-only multicast group of every audit record
AUDIT_SECCOMP = 1326
_NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port
# Room for a burst of records between two drains (a diagnosis drains before and after each rerun; other audit
# records, e.g. of BPF loads, share the socket). Raised past rmem_max with SO_RCVBUFFORCE where this process may.
_AUDIT_BUFFER = 4 << 20
_SO_RCVBUFFORCE = 33  # asm-generic/socket.h; not in Python's socket module
# The record's own stamp, audit(<time>:<serial>): the same record read from both sources is counted once.
_STAMP_RE = re.compile(r"audit\(\d+\.\d+:(\d+)\)")
# audit: type=1326 audit(...): auid=... uid=0 gid=0 ses=... pid=22879 comm="gpg" exe="/usr/bin/gpg" sig=31
# arch=c000003e syscall=149 compat=0 ip=0x7f55915bbb97 code=0x80000000
_RECORD_RE = re.compile(r"type=1326 .*?\bpid=(\d+) comm=\"([^\"]*)\" exe=\"([^\"]*)\" sig=(\d+) arch=([0-9a-f]+) "
                        r"syscall=(\d+)(?:.*?code=(0x[0-9a-f]+))?")
# SECCOMP_RET_LOG: the call was allowed and logged (SystemCallLog=); every other action that is logged denied it.
_RET_LOG = 0x7FFC0000
_KILLED_RE = re.compile(r"^the kernel (?:killed|logged a call by|denied) \d+ \([^)]*\) (?:for )?syscall (\w+)")


@dataclass(frozen=True)
class SeccompRecord:
    pid: int
    comm: str
    exe: str
    signal: int
    arch: str
    number: int
    code: int

    @property
    def syscall(self) -> str:
        """The call's name, or its number where the architecture has no table here."""
        return SYSCALL_NAMES.get(self.arch, {}).get(self.number, f"#{self.number}")

    def describe(self) -> str:
        """One line for a failure report: "the kernel killed 2345 (gpg) for syscall mlock"."""
        arch = "" if self.arch == "c000003e" else f" ({ARCH_NAMES.get(self.arch, 'arch ' + self.arch)})"
        if self.code & 0xFFFF0000 == _RET_LOG:
            return f"the kernel logged a call by {self.pid} ({self.comm}) for syscall {self.syscall}{arch}"
        if self.signal:
            return f"the kernel killed {self.pid} ({self.comm}) for syscall {self.syscall}{arch}"
        return f"the kernel denied {self.pid} ({self.comm}) syscall {self.syscall}{arch}"


def parse_record(message: str) -> SeccompRecord | None:
    found = _RECORD_RE.search(message)
    if found is None:
        return None
    pid, comm, exe, sig, arch, number, code = found.groups()
    return SeccompRecord(int(pid), comm, exe, int(sig), arch, int(number), int(code or "0", 16))


class KernelLog:
    """An open reader of the kernel's audit records (see the module docstring): :meth:`drain` returns the messages
    written since the last call, each record once, in the form the kernel log prints them."""

    def __init__(self, fd: int | None, audit: socket.socket | None = None) -> None:
        self._fd = fd
        self._audit = audit
        self._seen: deque[str] = deque(maxlen=4096)  # stamps already returned (both sources carry a record)

    @classmethod
    def open(cls, path: str = KMSG) -> KernelLog | None:
        """A reader positioned at the log's end; None where neither source can be read (not root, no /dev/kmsg)."""
        audit = _audit_listener()
        fd: int | None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            fd = None
        else:
            try:
                os.lseek(fd, 0, os.SEEK_END)
            except OSError:
                os.close(fd)
                fd = None
        if fd is None and audit is None:
            return None
        return cls(fd, audit)

    def drain(self) -> list[str]:
        return [m for m in self._drain_audit() + self._drain_kmsg() if self._first_time(m)]

    def _first_time(self, message: str) -> bool:
        stamp = _STAMP_RE.search(message)
        if stamp is None:
            return True
        if stamp.group(1) in self._seen:
            return False
        self._seen.append(stamp.group(1))
        return True

    def _drain_audit(self) -> list[str]:
        messages: list[str] = []
        while self._audit is not None:
            try:
                data = self._audit.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # records overflowed the buffer: go on with the rest (and kmsg's)
                    continue
                break
            while len(data) >= _NLMSG_HEADER.size:
                length, kind = _NLMSG_HEADER.unpack_from(data)[:2]
                if length < _NLMSG_HEADER.size:
                    break
                if kind == AUDIT_SECCOMP:  # in the form /dev/kmsg shows it: "type=1326 audit(...): ..."
                    text = data[_NLMSG_HEADER.size:length].split(b"\0", 1)[0].decode(errors="replace")
                    messages.append(f"audit: type={kind} {text}")
                data = data[(length + 3) & ~3:]
        return messages

    def _drain_kmsg(self) -> list[str]:
        messages: list[str] = []
        while self._fd is not None:
            try:
                data = os.read(self._fd, 8192)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # records we had not read yet were overwritten: go on with the rest
                    continue
                break
            if not data:
                break
            _prefix, _, message = data.decode(errors="replace").partition(";")
            messages.append(message.split("\n", 1)[0])
        return messages

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        if self._audit is not None:
            self._audit.close()


def _audit_listener() -> socket.socket | None:
    """A socket in the kernel's audit multicast group, or None where it cannot join (see the module docstring)."""
    try:
        listener = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_AUDIT)
    except OSError:
        return None
    try:
        listener.bind((0, 1 << (AUDIT_NLGRP_READLOG - 1)))
    except OSError:  # EPERM without CAP_AUDIT_READ
        listener.close()
        return None
    for option in (_SO_RCVBUFFORCE, socket.SO_RCVBUF):  # past rmem_max (needs CAP_NET_ADMIN), else up to it
        try:
            listener.setsockopt(socket.SOL_SOCKET, option, _AUDIT_BUFFER)
            break
        except OSError:
            continue
    return listener


def seccomp_records(messages: list[str], machine_pids: Callable[[], set[int] | None],
                    machine_has: Callable[[list[str]], set[str]] = lambda exes: set(exes)) -> list[SeccompRecord]:
    """The seccomp records among ``messages`` whose process is the machine's, or is gone and ran a program the
    machine has (see the module docstring). ``machine_pids`` gives the host pids of the machine's processes (None:
    unknown, then only the gone count); ``machine_has`` which of some programs exist in the machine."""
    records = [r for r in (parse_record(m) for m in messages) if r is not None]
    if not records:
        return []
    pids = machine_pids() or set()
    gone = [r for r in records if r.pid not in pids and not os.path.exists(f"/proc/{r.pid}")]
    present = machine_has(sorted({r.exe for r in gone})) if gone else set()
    return [r for r in records if r.pid in pids or (r in gone and r.exe in present)]


def kernel_syscalls(evidence: str) -> list[str]:
    """The syscalls the kernel's records in ``evidence`` (as :meth:`SeccompRecord.describe` writes them) name."""
    found: list[str] = []
    for line in evidence.splitlines():
        match = _KILLED_RE.match(line.strip())
        if match and match.group(1) not in found:
            found.append(match.group(1))
    return found
