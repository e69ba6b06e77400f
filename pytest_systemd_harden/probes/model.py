"""What a probe is, and what it found: the host side of the JSON the inside script prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["allowed", "denied", "error"]


@dataclass(frozen=True, order=True)
class Probe:
    """One action the inside script tries: a ``kind`` (write, syscall, socket, ...) and its argument."""

    kind: str
    arg: str = ""

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.arg}" if self.arg else self.kind

    def describe(self) -> str:
        """The action in words, for messages: "write to /etc", "mount(2)", "socket(AF_INET)"."""
        described = {
            "write": f"write to {self.arg}", "read": f"read {self.arg}", "exec": f"execute a program in {self.arg}",
            "syscall": f"{self.arg}(2)", "socket": f"socket({self.arg})", "connect": f"send to {self.arg}",
            "bind": f"bind {self.arg}", "namespace": f"unshare a {self.arg} namespace",
            "memory": {"wx": "map memory writable and executable",
                       "mprotect": "make writable memory executable"}.get(self.arg, self.arg),
            "personality": "switch the personality to PER_LINUX32",
            "realtime": "ask for SCHED_FIFO with priority 0 (invalid: EINVAL where no filter stops it)"
            if self.arg == "filter" else "become SCHED_FIFO",
            "ipc": "leave a POSIX shared memory object in /dev/shm for the unit's stop",
            "setuid-bit": f"set the {self.arg} bit on an own file", "abi32": "make a 32-bit (int 0x80) syscall",
            "status": "read /proc/self/status", "umask": "create a file (its mode shows the umask)",
            "limits": "read /proc/self/limits", "cgroup": f"read its cgroup's {self.arg} limit",
            "identity": f"stat {self.arg}", "interfaces": "list network interfaces",
            "filesystem": f"open {self.arg} (a directory on its filesystem type)",
            "block-devices": "list block devices in /dev",
            "device": f"open the device {self.arg} for reading and writing (access(2))",
            "allocate": f"allocate and touch {int(self.arg) >> 20 if self.arg.isdigit() else self.arg} MiB",
            "tasks": f"start {self.arg} threads",
        }
        return described.get(self.kind, self.key)


@dataclass(frozen=True)
class ProbeResult:
    """What one probe did: allowed, denied (with the errno or signal), or error (it could not try)."""

    probe: Probe
    status: Status
    errno: str | None = None
    signal: str | None = None
    detail: str = ""
    facts: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProbeResult:
        raw = data.get("status")
        status: Status = "allowed" if raw == "allowed" else "denied" if raw == "denied" else "error"
        return cls(Probe(str(data.get("kind", "")), str(data.get("arg", ""))), status,
                   data.get("errno"), data.get("signal"), str(data.get("detail", "")), dict(data.get("facts") or {}))

    @classmethod
    def missing(cls, probe: Probe, why: str) -> ProbeResult:
        return cls(probe, "error", detail=why)

    @property
    def allowed(self) -> bool:
        return self.status == "allowed"

    @property
    def denied(self) -> bool:
        return self.status == "denied"

    @property
    def way(self) -> str | None:
        """How it was denied: the errno name (EROFS) or the signal name (SIGSYS)."""
        return self.signal or self.errno if self.denied else None

    def describe(self) -> str:
        """One phrase: "denied: EROFS (create a file in /etc: Read-only file system)", "allowed (...)"."""
        if self.status == "denied":
            how = f"killed by {self.signal}" + (" (seccomp)" if self.signal == "SIGSYS" else "") if self.signal \
                else f"denied: {self.errno}"
            return f"{how} ({self.detail})" if self.detail and not self.signal else how
        if self.status == "allowed":
            return f"allowed ({self.detail})" if self.detail else "allowed"
        return f"could not probe: {self.detail}" + (f" ({self.errno})" if self.errno and self.errno not in self.detail
                                                     else "")
