"""The probe catalogue: every action the inside script can try, and the denials a spec may declare with ``deny:``.

:func:`standard_catalogue` is the whole catalogue with its usual arguments - what the harmlessness test and the
benchmark run. A user's ``deny:`` entry (``write: /etc/passwd``, ``syscall: mount``, ...) becomes a
:class:`Denial`, validated here so that the spec loader can report a bad one with file, line and key.
"""

from __future__ import annotations

import difflib
import ipaddress
import socket
from dataclasses import dataclass

from ..kernel.flags import CAPABILITIES, NAMESPACE_FLAGS
from . import inside
from .model import Probe

# A port nothing on a test machine listens on: the discard service. Sending to it only proves the packet left.
LOOPBACK_PORT = 9
# A high port for bind probes; a bind that finds it in use was still allowed to try.
BIND_PORT = 48129

SYSCALLS = tuple(inside.SYSCALL_PROBES)
# A device node an nspawn container and a VM both have and that DevicePolicy=closed does not allow.
DEVICE_OUTSIDE_POLICY = "/dev/net/tun"
NAMESPACES = tuple(NAMESPACE_FLAGS)
FAMILIES = ("AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET", "AF_VSOCK")
LOOPBACK_TARGETS = (f"127.0.0.1:{LOOPBACK_PORT}", f"[::1]:{LOOPBACK_PORT}")
# An address of the machine's own network namespace that is not loopback (TEST-NET-1, never routed anywhere): a
# machine of our own puts it on its lo at boot (Machine.MACHINE_ADDRESS), so that IPAddressDeny=any with
# IPAddressAllow=localhost has something to deny while every packet stays on the machine. The connect probe sends
# to a non-loopback address only when it is a local address of the sender's network namespace.
MACHINE_ADDRESS = "192.0.2.1"
MACHINE_TARGET = f"{MACHINE_ADDRESS}:{LOOPBACK_PORT}"
NAMESPACE_FILES = tuple(f"/proc/self/ns/{kind}" for kind in ("net", "uts", "ipc", "mnt", "user", "cgroup", "pid"))
FILESYSTEM_PATHS = ("/", "/proc", "/sys", "/dev", "/tmp", "/dev/mqueue", "/dev/pts", "/sys/fs/cgroup/unified")


def standard_catalogue() -> list[Probe]:
    """Every probe kind, with the arguments the enforcement checks use: the full batch."""
    probes = [Probe("status"), Probe("umask"), Probe("limits"), Probe("cgroup", "memory"), Probe("cgroup", "pids"),
              Probe("interfaces"), Probe("block-devices")]
    probes += [Probe("write", path) for path in (
        "/etc", "/usr", "/var", "/tmp", "/var/tmp", "/root", "/home", "/run/user", "/dev/shm", "/proc/sys",
        "/proc/sys/net", "/sys", "/sys/fs/cgroup", "/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd")]
    probes += [Probe("read", path) for path in (
        "/root", "/home", "/run/user", "/proc/1", "/proc/cpuinfo", "/proc/meminfo", "/dev/kmsg", "/proc/kmsg",
        "/proc/kallsyms", "/usr/lib/modules", "/lib/modules")]
    probes += [Probe("identity", path) for path in ("/tmp", "/var/tmp", "/dev", *NAMESPACE_FILES)]
    probes += [Probe("filesystem", path) for path in FILESYSTEM_PATHS]
    probes += [Probe("exec", path) for path in ("/tmp", "/var/tmp", "/dev/shm")]
    # A device no closed device policy allows, and one every policy but strict does (DevicePolicy=, DeviceAllow=).
    probes += [Probe("device", DEVICE_OUTSIDE_POLICY), Probe("device", "/dev/null")]
    probes += [Probe("syscall", name) for name in SYSCALLS]
    probes += [Probe("socket", family) for family in FAMILIES]
    probes += [Probe("connect", target) for target in (*LOOPBACK_TARGETS, MACHINE_TARGET)]
    probes += [Probe("bind", f"127.0.0.1:{BIND_PORT}"), Probe("bind", f"[::1]:{BIND_PORT}")]
    probes += [Probe("namespace", kind) for kind in NAMESPACES]
    probes += [Probe("memory", "wx"), Probe("memory", "mprotect"), Probe("personality"), Probe("realtime"),
               Probe("realtime", "filter"),
               Probe("setuid-bit", "suid"), Probe("setuid-bit", "sgid"), Probe("abi32")]
    # What MemoryMax=64M and TasksMax=64 are checked with (the size and count follow the spec's values).
    probes += [Probe("allocate", str(128 << 20)), Probe("tasks", "65")]
    return probes


# --- declared denials ---------------------------------------------------------------------------------------

DENY_KINDS = ("write", "read", "exec", "connect", "bind", "syscall", "capability", "namespace", "family")


class DenialError(ValueError):
    """A ``deny:`` entry that cannot be probed; the spec loader adds file, line and key."""

    def __init__(self, problem: str, hint: str = "") -> None:
        self.problem = problem
        self.hint = hint
        super().__init__(problem + (f" ({hint})" if hint else ""))


@dataclass(frozen=True)
class Denial:
    """An action the user declares the sandbox must deny: ``write: /etc/passwd``, ``syscall: mount``, ..."""

    kind: str
    target: str
    line: int | None = None

    @property
    def probe(self) -> Probe:
        kind = {"family": "socket", "capability": "status"}.get(self.kind, self.kind)
        return Probe(kind, "" if self.kind == "capability" else self.target)

    @property
    def label(self) -> str:
        return f"{self.kind} {self.target}"


def _closest(word: str, candidates: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"did you mean {close[0]}?" if close else f"one of {', '.join(candidates)}"


def _loopback_address(text: str, what: str, default_port: bool) -> str:
    """``[udp:|tcp:]HOST:PORT`` (or a bare PORT) on loopback, normalised; probes never leave the machine."""
    protocol = ""
    if text.startswith(("udp:", "tcp:")):
        protocol, text = text[:4], text[4:]
    if text.isdigit() and default_port:
        host, port = "127.0.0.1", text
    elif ":" not in text:
        raise DenialError(f"{text!r} is not HOST:PORT", "e.g. 127.0.0.1:53 or [::1]:53")
    else:
        host, _, port = text.rpartition(":")
        host = host.strip("[]")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise DenialError(f"{text!r} is not HOST:PORT",
                          f"e.g. 127.0.0.1:53, [::1]:53{', or a port' if default_port else ''}")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise DenialError(f"{host!r} is not an IP address", "e.g. 127.0.0.1 or ::1") from None
    if not address.is_loopback:
        raise DenialError(f"{host} is not a loopback address",
                          f"probes never leave the machine's loopback, so {what} is checked on 127.0.0.0/8 or ::1; "
                          "IPAddressDeny= rules apply to loopback too")
    shown = f"[{address}]" if address.version == 6 else str(address)
    return f"{protocol}{shown}:{int(port)}"


def parse_denial(kind: str, value: object, line: int | None = None) -> Denial:
    """One ``deny:`` entry, validated; DenialError says what is wrong and how to fix it."""
    if kind not in DENY_KINDS:
        raise DenialError(f"{kind!r} is not a kind of denial", _closest(kind, DENY_KINDS))
    if isinstance(value, (list, dict)) or value is None or isinstance(value, bool):
        raise DenialError("expected one value", f"write one entry per denial, e.g. - {kind}: ...")
    text = str(getattr(value, "source", value)).strip()
    if kind in ("write", "read", "exec"):
        if not text.startswith("/"):
            raise DenialError(f"{text!r} is not an absolute path", "e.g. /etc/passwd")
        return Denial(kind, text.rstrip("/") or "/", line)
    if kind == "connect":
        return Denial(kind, _loopback_address(text, "connect", default_port=False), line)
    if kind == "bind":
        return Denial(kind, _loopback_address(text, "bind", default_port=True), line)
    if kind == "syscall":
        if text not in SYSCALLS:
            raise DenialError(f"there is no harmless probe for {text!r}", _closest(text, SYSCALLS))
        return Denial(kind, text, line)
    if kind == "capability":
        name = text.upper() if text.upper().startswith("CAP_") else f"CAP_{text.upper()}"
        if name not in CAPABILITIES:
            raise DenialError(f"{text!r} is not a capability", _closest(name, tuple(CAPABILITIES)))
        return Denial(kind, name, line)
    if kind == "namespace":
        if text not in NAMESPACES:
            raise DenialError(f"{text!r} is not a namespace type", _closest(text, NAMESPACES))
        return Denial(kind, text, line)
    name = text.upper() if text.upper().startswith("AF_") else f"AF_{text.upper()}"
    if not isinstance(getattr(socket, name, None), int):
        raise DenialError(f"{text!r} is not an address family", _closest(name, FAMILIES))
    return Denial("family", name, line)
