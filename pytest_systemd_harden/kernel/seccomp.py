"""The kernel's own evidence of a denial: seccomp audit records (type=1326) of a machine's processes.

When a seccomp filter kills a process (SystemCallFilter= without SystemCallErrorNumber=, SystemCallArchitectures=)
or logs a call (SystemCallLog=), the kernel writes an audit record to its log with the pid, comm, exe, arch and
syscall number. The service may print nothing at all - a helper killed by SIGSYS whose parent reports only an exit
status, or a hang - but the record still names the call.

The log is read on the host, from /dev/kmsg: reading it changes no kernel setting and takes no message from
anyone (unlike /proc/kmsg). A record belongs to the machine when it was written while the check ran and its
process is the machine's (alive in its cgroup), or is already gone and ran a program the machine has. A process
that is gone cannot always be told apart from one of another machine on the same host killed in the same moment
(the same image, the same program), so the diagnosis treats a record as a lead to try first, and the rerun
decides.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from .syscall_numbers import ARCH_NAMES, SYSCALL_NAMES

KMSG = "/dev/kmsg"
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
    """An open reader of the kernel log: :meth:`drain` returns the messages written since the last call."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @classmethod
    def open(cls, path: str = KMSG) -> KernelLog | None:
        """A reader positioned at the log's end; None where the log cannot be read (not root, no /dev/kmsg)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            os.lseek(fd, 0, os.SEEK_END)
        except OSError:
            os.close(fd)
            return None
        return cls(fd)

    def drain(self) -> list[str]:
        messages: list[str] = []
        while True:
            try:
                data = os.read(self._fd, 8192)
            except BlockingIOError:
                return messages
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # records we had not read yet were overwritten: go on with the rest
                    continue
                return messages
            if not data:
                return messages
            _prefix, _, message = data.decode(errors="replace").partition(";")
            messages.append(message.split("\n", 1)[0])

    def close(self) -> None:
        os.close(self._fd)


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
