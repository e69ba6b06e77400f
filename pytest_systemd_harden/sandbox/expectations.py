"""Is the sandbox really in force? Expectations derived from a spec, and verdicts from probe results.

For each directive of a spec, :func:`plan` lists the *checks* that show it in force: probes that must be denied
and how (``ProtectSystem=strict``: /etc, /usr and /var on read-only mounts; ``RestrictAddressFamilies=AF_UNIX``:
``socket(AF_INET)`` fails with EAFNOSUPPORT; ``SystemCallFilter=`` without @mount: ``mount(2)`` killed by SIGSYS,
or the errno of ``SystemCallErrorNumber=``), values that must be so (the capability bounding set, the umask, a
dynamic uid) and the reverse where it matters (a ``ReadWritePaths=`` path stays writable).

A check only proves something when the action is *not* already denied without the directive, so every probe also
runs unconfined on the machine (like the ``+`` control runs of systemd's own tests) and, for a service with its
own user, as that user with no hardening at all. A directive ends up:

* **enforced** - at least one check showed the directive at work, and none failed;
* **NOT enforced** - a check failed (the forbidden action is possible in the sandbox) although the directive alone
  does enforce it here: something in the spec undoes it (a ``ReadWritePaths=`` that reopens /etc);
* **unverifiable** - every check was already so without the directive (nspawn drops CAP_SYS_MODULE), could not be
  observed (no memory controller on hybrid cgroups), or the machine does not enforce the directive even alone
  (a systemd built without BPF_FRAMEWORK ignores ``SocketBindDeny=``) - always with the reason.

This module holds the expectations (:func:`plan`); the verdicts are in :mod:`pytest_systemd_harden.sandbox.verdict`.
Both are pure: the probe batches come through a :class:`~pytest_systemd_harden.sandbox.verdict.ProbeHost`, which
:mod:`pytest_systemd_harden.unit.probe_host` makes of a started service.
"""

from __future__ import annotations

import errno as errno_module
import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from ..kernel.flags import CAPABILITIES, CAPABILITY_BITS, NAMESPACE_FLAGS
from ..probes.catalogue import (
    BIND_PORT,
    DEVICE_OUTSIDE_POLICY,
    FAMILIES,
    FILESYSTEM_PATHS,
    LOOPBACK_TARGETS,
    MACHINE_ADDRESS,
    MACHINE_TARGET,
    SYSCALLS,
    Denial,
)
from ..probes.model import Probe, ProbeResult
from ..probes.runner import IPC_PROBE, Batch, MachineFacts, unique
from ..spec.directives import IP_SYMBOLS, Directive, DirectiveError
from ..spec.directives import _caps_bus as capability_mask  # systemd's reading of a capability list (with ~)
from ..spec.directives import _namespaces_bus as allowed_namespaces  # and of RestrictNamespaces=
from ..spec.load import Spec
from ..spec.unit_file import effective_hardening, located

Status = Literal["enforced", "not enforced", "unverifiable"]
ENFORCED: Status = "enforced"
NOT_ENFORCED: Status = "not enforced"
UNVERIFIABLE: Status = "unverifiable"

DYNAMIC_UIDS = range(61184, 65520)  # systemd's DynamicUser= range

# Directives that configure the service rather than confine it: they get no enforcement item.
NOT_SANDBOXING = frozenset({
    "Restart", "RestartSec", "RemainAfterExit", "NotifyAccess", "TimeoutStartSec", "TimeoutStopSec", "RuntimeMaxSec",
    "KillMode", "SyslogIdentifier", "Delegate", "IgnoreSIGPIPE", "IPAccounting", "MemoryAccounting",
    "TasksAccounting", "CPUAccounting", "IOAccounting", "Environment", "PassEnvironment", "UnsetEnvironment",
    "WorkingDirectory", "StateDirectory", "CacheDirectory", "LogsDirectory", "RuntimeDirectory",
    "ConfigurationDirectory", "StateDirectoryMode", "CacheDirectoryMode", "LogsDirectoryMode",
    "RuntimeDirectoryMode", "ConfigurationDirectoryMode", "LoadCredential", "PAMName", "Nice", "OOMScoreAdjust",
    "Group", "SupplementaryGroups", "MountAPIVFS", "SystemCallLog",
})


# --- checks -------------------------------------------------------------------------------------------------

# (observed result, the same probe on the machine without hardening) -> does the expectation hold?
Holds = Callable[[ProbeResult, ProbeResult], bool]


@dataclass(frozen=True)
class Check:
    """One observable consequence of a directive: a probe and what its result must be.

    ``ways`` (for denials) are the errnos/signals the directive itself denies with; a check holds when the probe
    is denied in one of the ways *any* directive of the spec denies it (a SystemCallFilter= kill masks the EPERM
    of ProtectClock=, and both mean the clock cannot be set). ``needs`` names a fact that makes a result usable
    even when the probe could not act (a mount's read-only flag). ``baselines`` are the control runs that must
    *not* already show the expectation for the check to prove anything. A ``reverse`` check (the path stays
    writable) must hold without hardening too.
    """

    probe: Probe
    expected: str
    predicate: Holds | None = None  # None: the probe must be denied in one of the accepted ways
    ways: frozenset[str] = frozenset()
    needs: str | None = None
    baselines: tuple[str, ...] = ("machine", "user")
    reverse: bool = False
    # Whether the check applies at all, given the machine's result (RestrictFileSystems=: is this path's
    # filesystem one the directive denies?).
    applies: Callable[[ProbeResult], bool] | None = None
    # What a failed result shows, in words ("/etc is on a read-write mount"); default: the result itself.
    explain: Callable[[ProbeResult], str] | None = None

    def happened(self, result: ProbeResult) -> str:
        return f"{self.explain(result)}: {result.describe()}" if self.explain else result.describe()

    def usable(self, result: ProbeResult) -> bool:
        if self.needs is not None:
            # A fact about a path that is not there is the parent's: it says nothing about the path itself.
            return result.facts.get(self.needs) is not None and result.facts.get("exists") is not False
        return result.status != "error"

    def holds(self, observed: ProbeResult, machine: ProbeResult, accepted: frozenset[str]) -> bool:
        if self.predicate is not None:
            return self.predicate(observed, machine)
        return observed.denied and observed.way in accepted


@dataclass(frozen=True)
class Subject:
    """One enforcement item: a directive of the spec (or a declared denial) and the checks that prove it."""

    name: str  # "ProtectSystem=strict", or "write /etc/passwd" for a declared denial
    line: int | None
    checks: tuple[Check, ...]
    directive: Directive | None = None
    denial: Denial | None = None
    # Why there are no checks (the directive requests nothing observable here), shown as the skip reason.
    no_checks: str = ""
    # Directives a solo run needs beside this one (SystemCallErrorNumber= needs a SystemCallFilter=).
    companions: tuple[Directive, ...] = ()
    # Where it is written when that is not only the spec: "memcached.service:39" (the unit's own hardening), or
    # "memcached.service:43, harden.yaml:12" for a list both assign (see unit.effective_hardening).
    location: str = ""

    @property
    def title(self) -> str:
        return f"{self.name} is denied" if self.denial else f"{self.name} is enforced"

    @property
    def probes(self) -> list[Probe]:
        return unique(check.probe for check in self.checks)

    @property
    def alone(self) -> tuple[Directive, ...]:
        """What a solo run of the directive sets: it and its companions, nothing else."""
        return (*self.companions, self.directive) if self.directive is not None else ()


def denial(probe: Probe, ways: Iterable[str], expected: str | None = None) -> Check:
    ways = frozenset(ways)
    shown = " or ".join(sorted(ways))
    return Check(probe, expected or f"{probe.describe()} denied ({shown})", ways=ways)


def read_only(path: str) -> Check:
    return Check(Probe("write", path), f"{path} is read-only (writes fail with EROFS)",
                 lambda observed, _machine: observed.facts.get("readonly") is True, needs="readonly",
                 explain=lambda _observed: f"{path} is on a read-write mount")


def writable(path: str, because: str) -> Check:
    return Check(Probe("write", path), f"{path} stays writable (its mount is not read-only) despite {because}",
                 lambda observed, _machine: observed.facts.get("readonly") is False, needs="readonly",
                 baselines=(), reverse=True, explain=lambda _observed: f"{path} is on a read-only mount")


def _hidden(observed: ProbeResult, machine: ProbeResult) -> bool:
    if observed.denied:
        return True
    # Replaced by an empty or inaccessible node (root may still open a mode-000 one): another, empty object.
    return observed.allowed and observed.facts.get("object") != machine.facts.get("object") \
        and not observed.facts.get("size")


def hidden(path: str) -> Check:
    return Check(Probe("read", path), f"{path} is hidden (absent, inaccessible or empty)", _hidden)


def no_exec(path: str) -> Check:
    return Check(Probe("exec", path), f"programs under {path} cannot be executed (noexec: EACCES)",
                 lambda observed, _machine: observed.facts.get("noexec") is True
                 or (observed.denied and observed.errno == "EACCES"), needs="noexec",
                 explain=lambda _observed: f"{path} is not mounted noexec")


def executable(path: str, because: str) -> Check:
    return Check(Probe("exec", path), f"programs under {path} can still be executed despite {because}",
                 lambda observed, _machine: observed.facts.get("noexec") is False and not observed.denied,
                 needs="noexec", baselines=(), reverse=True, explain=lambda _observed: f"{path} is mounted noexec")


def inaccessible(path: str) -> Check:
    """``path`` replaced by one of systemd's inaccessible nodes (mode 000): seen by stat(2), whoever looks, so it
    shows even where the original was already closed to the service's user (/proc/kmsg is root's)."""
    return Check(Probe("read", path), f"{path} is replaced by an inaccessible node (mode 000)",
                 lambda observed, _machine: observed.facts.get("mode") == 0, needs="mode",
                 explain=lambda observed: f"{path} has mode {observed.facts.get('mode', 0):04o}")


def private(path: str, what: str) -> Check:
    return Check(Probe("identity", path), f"{what} is private ({path} is not the machine's)",
                 lambda observed, machine: observed.facts.get("value") != machine.facts.get("value"),
                 explain=lambda observed: f"{path} is the machine's own ({observed.facts.get('value')})")


def status_check(expected: str, predicate: Callable[[dict[str, object]], bool],
                 baselines: tuple[str, ...] = ("machine", "user")) -> Check:
    return Check(Probe("status"), expected, lambda observed, _machine: predicate(observed.facts), baselines=baselines,
                 explain=describe_status)


def describe_status(result: ProbeResult) -> str:
    """The credentials a status probe saw, for a failure message."""
    facts = result.facts
    umask = facts.get("umask")
    return (f"uid {facts.get('uid')} ({facts.get('user')}), NoNewPrivs {facts.get('no_new_privs')}, "
            f"umask {umask:04o}, " if isinstance(umask, int) else f"uid {facts.get('uid')}, ") + \
        f"bounding set: {_capability_names(_int_list(facts.get('cap_bounding')))}"


def capabilities_absent(names: Iterable[str], what: str = "") -> Check:
    bits = {CAPABILITY_BITS[name] for name in names}
    shown = ", ".join(sorted(names, key=CAPABILITY_BITS.__getitem__))
    return status_check(what or f"{shown} not in the capability bounding set",
                        lambda facts: not bits & set(_int_list(facts.get("cap_bounding"))))


def _int_list(value: object) -> list[int]:
    return [int(item) for item in value] if isinstance(value, list) else []


def _capability_names(bits: Iterable[int]) -> str:
    return ", ".join(CAPABILITIES[bit] if bit < len(CAPABILITIES) else f"cap {bit}" for bit in sorted(bits)) or "none"


# --- reading directive values as systemd does ----------------------------------------------------------------

def effective_list(assignments: Sequence[str], expand: Callable[[str], Iterable[str]] = lambda word: [word],
                   always_allowed: Iterable[str] = ()) -> tuple[bool, dict[str, str | None]]:
    """(allow list?, {name: errno or None}) after all assignments, as systemd parses SystemCallFilter= and
    RestrictAddressFamilies=: the first assignment picks allow (no ``~``) or deny (``~``) mode; later
    assignments of the same polarity add names, of the other polarity remove them. ``name:ERRNO`` carries an errno.
    An allow list starts with ``always_allowed`` (SystemCallFilter='s @default).
    """
    allow_list: bool | None = None
    table: dict[str, str | None] = {}
    for assignment in assignments:
        text = assignment.strip()
        if text == "none":  # RestrictAddressFamilies=none: an empty allow list
            allow_list, table = True, {}
            continue
        invert = text.startswith("~")
        if allow_list is None:
            allow_list = not invert
            if allow_list:
                table.update((name, None) for name in always_allowed)
        for word in text.lstrip("~").split():
            name, _, number = word.partition(":")
            for member in expand(name):
                if (not invert) == allow_list or (invert and allow_list and number):
                    table[member] = number or None
                else:
                    table.pop(member, None)
    return bool(allow_list), table


def _errno_name(text: str) -> str:
    return errno_module.errorcode.get(int(text), text) if text.isdigit() else text


def syscall_filter_ways(spec_directives: Sequence[Directive], facts: MachineFacts,
                        ) -> Callable[[str], str | None]:
    """For a syscall name: how the SystemCallFilter= among ``spec_directives`` denies it (SIGSYS or an errno
    name), or None when it allows it."""
    scf = next((d for d in spec_directives if d.name == "SystemCallFilter"), None)
    if scf is None:
        return lambda name: None
    error_number = next((d.value for d in spec_directives if d.name == "SystemCallErrorNumber"), None)
    default_way = _errno_name(error_number) if error_number else "SIGSYS"

    def expand(name: str) -> Iterable[str]:
        return facts.syscall_groups.get(name, frozenset()) if name.startswith("@") else [name]

    allow_list, table = effective_list(scf.assignments, expand, expand("@default"))

    def way(name: str) -> str | None:
        if allow_list:
            if name in table and table[name] is None:
                return None
            return _errno_name(table[name] or "") if table.get(name) else default_way
        if name not in table:
            return None
        number = table[name]
        return _errno_name(number) if number else default_way

    return way


# The syscalls each non-syscall probe makes, so that a SystemCallFilter= denying them counts as a denial way.
PROBE_SYSCALLS = {
    "namespace": ("unshare",), "personality": ("personality",), "realtime": ("sched_setscheduler",),
    "memory": ("mmap", "mprotect"), "setuid-bit": ("chmod", "fchmodat", "fchmodat2"), "socket": ("socket",),
    "connect": ("socket", "sendto"), "bind": ("socket", "bind"),
}


def _paths(directive: Directive) -> list[str]:
    """The paths of a path-list directive, without the - and + prefixes."""
    return [word.lstrip("-+").split(":")[0] for assignment in directive.assignments for word in assignment.split()]


def _under(path: str, prefix: str) -> bool:
    prefix = prefix.rstrip("/") or "/"
    return prefix == "/" or path == prefix or path.startswith(prefix + "/")


PROTECT_SYSTEM_PATHS = {"yes": ("/usr", "/boot", "/efi"), "full": ("/usr", "/boot", "/efi", "/etc")}
API_FILESYSTEMS = ("/dev", "/proc", "/sys")


def makes_read_only(directive: Directive, path: str) -> bool:
    """Whether ``directive`` would put ``path`` on a read-only mount."""
    name, value = directive.name, directive.value
    # DynamicUser=yes implies ProtectSystem=strict (man systemd.exec).
    if (name == "ProtectSystem" and value == "strict") or (name == "DynamicUser" and value == "yes"):
        return not any(_under(path, api) for api in API_FILESYSTEMS)
    if name == "ProtectSystem":
        return any(_under(path, p) for p in PROTECT_SYSTEM_PATHS.get(value, ()))
    if name == "ReadOnlyPaths":
        return any(_under(path, p) for p in _paths(directive))
    if name == "BindReadOnlyPaths":
        return any(_under(path, destination) for destination in _bind_destinations(directive))
    if name == "ProtectHome" and value != "no":
        return any(_under(path, p) for p in ("/home", "/root", "/run/user"))
    if name == "ProtectKernelTunables" and value == "yes":
        return _under(path, "/proc/sys") or _under(path, "/sys")
    if name == "ProtectControlGroups" and value == "yes":
        return _under(path, "/sys/fs/cgroup")
    return False


def _bind_destinations(directive: Directive) -> list[str]:
    """Where BindPaths=/BindReadOnlyPaths= mount (SOURCE[:DEST[:OPTIONS]])."""
    destinations = []
    for word in directive.value.split():
        parts = word.lstrip("-").split(":")
        destinations.append(parts[1] if len(parts) > 1 else parts[0])
    return destinations


def _ip_networks(words: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(prefix, strict=False) for word in words for prefix in IP_SYMBOLS.get(word, [word])]


def _target_address(target: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    host = target.split(":", 1)[1] if target.startswith(("udp:", "tcp:")) else target
    return ipaddress.ip_address(host.rpartition(":")[0].strip("[]"))


def ip_denied(target: str, deny: Sequence[str], allow: Sequence[str]) -> bool:
    """Whether IPAddressDeny=/IPAddressAllow= drop traffic to ``target`` (an allow match wins, as in systemd)."""
    address = _target_address(target)
    covered = [net for net in _ip_networks(deny) if address.version == net.version and address in net]
    allowed = [net for net in _ip_networks(allow) if address.version == net.version and address in net]
    return bool(covered) and not allowed


@dataclass(frozen=True)
class BindRule:
    """One SocketBindAllow=/SocketBindDeny= rule: family (4/6/None), protocol, and port range (None: any)."""

    family: int | None
    protocol: str | None
    ports: tuple[int, int] | None

    @classmethod
    def parse(cls, word: str) -> BindRule:
        family: int | None = None
        protocol: str | None = None
        ports: tuple[int, int] | None = None
        for part in word.split(":"):
            if part in ("ipv4", "ipv6"):
                family = 4 if part == "ipv4" else 6
            elif part in ("tcp", "udp"):
                protocol = part
            elif part != "any":
                low, _, high = part.partition("-")
                ports = (int(low), int(high or low))
        return cls(family, protocol, ports)

    def matches(self, family: int, protocol: str, port: int) -> bool:
        return (self.family in (None, family) and self.protocol in (None, protocol)
                and (self.ports is None or self.ports[0] <= port <= self.ports[1]))

    def probe_target(self) -> tuple[int, str, int]:
        port = self.ports[0] if self.ports and self.ports[0] > 0 else BIND_PORT
        return self.family or 4, self.protocol or "tcp", port


def _bind_target(family: int, protocol: str, port: int) -> str:
    return f"{protocol}:" + (f"[::1]:{port}" if family == 6 else f"127.0.0.1:{port}")


def _rules(directives: Sequence[Directive], name: str) -> list[BindRule]:
    return [BindRule.parse(word) for d in directives if d.name == name for word in d.value.split()]


LIMIT_LABELS = {
    "CPU": "Max cpu time", "FSIZE": "Max file size", "DATA": "Max data size", "STACK": "Max stack size",
    "CORE": "Max core file size", "RSS": "Max resident set", "NPROC": "Max processes", "NOFILE": "Max open files",
    "MEMLOCK": "Max locked memory", "AS": "Max address space", "LOCKS": "Max file locks",
    "SIGPENDING": "Max pending signals", "MSGQUEUE": "Max msgqueue size", "NICE": "Max nice priority",
    "RTPRIO": "Max realtime priority", "RTTIME": "Max realtime timeout",
}
SIZE_SUFFIXES = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _limit_value(text: str) -> int | None:
    """A limit as /proc/self/limits shows it: None for infinity."""
    if text == "infinity":
        return None
    if text[-1] in SIZE_SUFFIXES:
        return int(text[:-1]) * SIZE_SUFFIXES[text[-1]]
    return int(text)


# --- expectations per directive -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Context:
    """What the expectations of one directive may depend on: the whole spec and the machine's systemd."""

    directives: tuple[Directive, ...]
    facts: MachineFacts
    runs_as_root: bool

    def find(self, name: str) -> Directive | None:
        return next((d for d in self.directives if d.name == name), None)


# A directive's checks, or a string: why it has none (it requests nothing observable).
Expectations = list[Check] | str
Builder = Callable[[Directive, Context], Expectations]
BUILDERS: dict[str, Builder] = {}


def expects(*names: str) -> Callable[[Builder], Builder]:
    def register(builder: Builder) -> Builder:
        for name in names:
            BUILDERS[name] = builder
        return builder
    return register


# Values that switch a directive off: such a directive requests nothing to enforce, and gets no item.
OFF_VALUES = {"ProtectProc": "default", "ProcSubset": "all", "KeyringMode": "inherit"}


def requests_nothing(directive: Directive) -> bool:
    if directive.type.kind.signature == "b" or directive.type.choices:
        return directive.value in ("no", OFF_VALUES.get(directive.name))
    return False


@expects("ProtectSystem")
def _protect_system(d: Directive, ctx: Context) -> Expectations:
    paths = {"yes": ["/usr"], "full": ["/usr", "/etc"], "strict": ["/usr", "/etc", "/var"]}.get(d.value, [])
    return [read_only(path) for path in paths]


@expects("ProtectHome")
def _protect_home(d: Directive, ctx: Context) -> Expectations:
    checks = [read_only("/root"), read_only("/home")]
    if d.value in ("yes", "tmpfs"):
        checks.append(hidden("/root"))
    else:
        checks.append(read_only("/run/user"))
    return checks


@expects("PrivateTmp")
def _private_tmp(d: Directive, ctx: Context) -> Expectations:
    return [private("/tmp", "/tmp"), private("/var/tmp", "/var/tmp")]


# The devices a closed device policy allows without DeviceAllow= (systemd's static list, and char-pts).
CLOSED_POLICY_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty",
                         "/dev/ptmx")


@dataclass(frozen=True)
class DevicePolicy:
    """The device access the spec leaves the service, as systemd computes it (cgroup device rules)."""

    closed: bool  # only listed devices (DevicePolicy=closed/strict, PrivateDevices=yes, or any DeviceAllow=)
    strict: bool  # not even the static set (/dev/null, ...)
    allowed: dict[str, str]  # DeviceAllow= path -> access letters ("rw", "r", ...)
    classes: bool  # a DeviceAllow= names a class (char-pts, block-loop): paths cannot be judged by name alone


def device_policy(directives: Sequence[Directive]) -> DevicePolicy:
    policy = next((d.value for d in reversed(directives) if d.name == "DevicePolicy"), "auto")
    allowed: dict[str, str] = {}
    classes = False
    for d in directives:
        if d.name != "DeviceAllow":
            continue
        for assignment in d.assignments:
            if not assignment:
                allowed.clear()  # an empty assignment resets the list
                continue
            path, _, access = assignment.partition(" ")
            if path.startswith("/"):
                allowed[path] = access.strip() or "rwm"
            else:
                classes = True
    private = any(d.name == "PrivateDevices" and d.value == "yes" for d in directives)
    closed = policy in ("closed", "strict") or (policy == "auto" and (bool(allowed) or classes or private))
    return DevicePolicy(closed, policy == "strict", allowed, classes)


def bound_devices(directives: Sequence[Directive]) -> list[str]:
    """Paths under /dev the spec binds into the sandbox (BindPaths=/dev/net/tun): devices it means to use."""
    return unique_paths(dest for d in directives if d.name in ("BindPaths", "BindReadOnlyPaths")
                        for dest in _bind_destinations(d) if _under(dest, "/dev") and dest != "/dev")


def unique_paths(paths: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(paths))


def device_denied(path: str, ctx: Context) -> Check:
    policy = device_policy(ctx.directives)
    why = "DevicePolicy=strict" if policy.strict else "the closed device policy (no DeviceAllow= for it)"
    return denial(Probe("device", path), ["EPERM"], f"opening {path} is denied (EPERM) by {why}")


def devices_outside_policy(ctx: Context, candidates: Iterable[str]) -> list[str]:
    """Of ``candidates``, the device paths the spec's device policy denies (none if it cannot tell by name)."""
    policy = device_policy(ctx.directives)
    if not policy.closed or policy.classes:
        return []
    return [path for path in unique_paths(candidates) if path not in policy.allowed
            and (policy.strict or path not in CLOSED_POLICY_DEVICES)]


@expects("PrivateDevices")
def _private_devices(d: Directive, ctx: Context) -> Expectations:
    # A device bound into the private /dev stays closed to the service unless DeviceAllow= lists it (PrivateDevices=
    # implies DevicePolicy=closed): what a host enforces with cgroup device rules.
    devices = [device_denied(path, ctx) for path in devices_outside_policy(ctx, bound_devices(ctx.directives))]
    return [private("/dev", "/dev"), capabilities_absent(["CAP_MKNOD", "CAP_SYS_RAWIO"]), hidden("/dev/kmsg"),
            Check(Probe("block-devices"), "no block devices in /dev",
                  lambda observed, _machine: observed.facts.get("value") == []),
            denial(Probe("syscall", "iopl"), ["EPERM"]), denial(Probe("syscall", "ioperm"), ["EPERM"]), *devices]


def _device_candidates(ctx: Context) -> list[str]:
    private = any(d.name == "PrivateDevices" and d.value == "yes" for d in ctx.directives)
    # Without PrivateDevices= the machine's own /dev has the device no closed policy allows; with it, only what
    # the spec binds in is there. /dev/null shows DevicePolicy=strict.
    return [*bound_devices(ctx.directives), *([] if private else [DEVICE_OUTSIDE_POLICY]), "/dev/null"]


@expects("DevicePolicy")
def _device_policy(d: Directive, ctx: Context) -> Expectations:
    if d.value == "auto" and ctx.find("DeviceAllow") is None:
        return "DevicePolicy=auto without DeviceAllow= allows every device"
    checks = [device_denied(path, ctx) for path in devices_outside_policy(ctx, _device_candidates(ctx))]
    return checks or "a DeviceAllow= names a device class, so no probed device is known to be denied"


@expects("DeviceAllow")
def _device_allow(d: Directive, ctx: Context) -> Expectations:
    policy = device_policy(ctx.directives)
    checks = [Check(Probe("device", path), f"{path} may still be opened for reading and writing (DeviceAllow=)",
                    lambda observed, _machine: observed.allowed, baselines=(), reverse=True)
              for path, access in policy.allowed.items() if "r" in access and "w" in access]
    checks += [device_denied(path, ctx) for path in devices_outside_policy(ctx, _device_candidates(ctx))]
    return checks or "DeviceAllow= names device classes only, which the probes do not resolve"


@expects("PrivateNetwork")
def _private_network(d: Directive, ctx: Context) -> Expectations:
    return [private("/proc/self/ns/net", "the network namespace"),
            Check(Probe("interfaces"), "only the loopback interface",
                  lambda observed, _machine: observed.facts.get("value") == ["lo"])]


@expects("PrivateIPC", "PrivateUsers", "PrivateMounts")
def _private_namespace(d: Directive, ctx: Context) -> Expectations:
    kind = {"PrivateIPC": "ipc", "PrivateUsers": "user", "PrivateMounts": "mnt"}[d.name]
    return [private(f"/proc/self/ns/{kind}", f"the {kind} namespace")]


@expects("ProtectHostname")
def _protect_hostname(d: Directive, ctx: Context) -> Expectations:
    return [private("/proc/self/ns/uts", "the UTS namespace (host name)"),
            denial(Probe("syscall", "sethostname"), ["EPERM"]), denial(Probe("syscall", "setdomainname"), ["EPERM"])]


@expects("ProtectKernelModules")
def _protect_kernel_modules(d: Directive, ctx: Context) -> Expectations:
    return [denial(Probe("syscall", "init_module"), ["EPERM"]), denial(Probe("syscall", "finit_module"), ["EPERM"]),
            capabilities_absent(["CAP_SYS_MODULE"]), hidden("/usr/lib/modules"), hidden("/lib/modules"),
            inaccessible("/usr/lib/modules")]


@expects("ProtectKernelTunables")
def _protect_kernel_tunables(d: Directive, ctx: Context) -> Expectations:
    return [read_only("/proc/sys"), read_only("/proc/sys/net"), read_only("/sys"), hidden("/proc/kallsyms")]


@expects("ProtectKernelLogs")
def _protect_kernel_logs(d: Directive, ctx: Context) -> Expectations:
    return [hidden("/proc/kmsg"), inaccessible("/proc/kmsg"), hidden("/dev/kmsg"),
            denial(Probe("syscall", "syslog"), ["EPERM"]), capabilities_absent(["CAP_SYSLOG"])]


@expects("ProtectClock")
def _protect_clock(d: Directive, ctx: Context) -> Expectations:
    return [denial(Probe("syscall", name), ["EPERM"]) for name in ("clock_settime", "settimeofday", "adjtimex")] + \
        [capabilities_absent(["CAP_SYS_TIME", "CAP_WAKE_ALARM"])]


@expects("ProtectControlGroups")
def _protect_control_groups(d: Directive, ctx: Context) -> Expectations:
    return [read_only(path) for path in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd")]


@expects("ProtectProc")
def _protect_proc(d: Directive, ctx: Context) -> Expectations:
    if ctx.runs_as_root:
        return f"ProtectProc={d.value} only hides other users' processes, and the service runs as root"
    return [hidden("/proc/1")]


@expects("ProcSubset")
def _proc_subset(d: Directive, ctx: Context) -> Expectations:
    return [hidden("/proc/cpuinfo"), hidden("/proc/meminfo")] if d.value == "pid" else \
        f"ProcSubset={d.value} hides nothing"


@expects("ReadOnlyPaths")
def _read_only_paths(d: Directive, ctx: Context) -> Expectations:
    return [read_only(path) for path in _paths(d)]


@expects("BindReadOnlyPaths")
def _bind_read_only_paths(d: Directive, ctx: Context) -> Expectations:
    return [read_only(destination) for destination in _bind_destinations(d)]


@expects("InaccessiblePaths")
def _inaccessible_paths(d: Directive, ctx: Context) -> Expectations:
    return [hidden(path) for path in _paths(d)]


@expects("NoExecPaths")
def _no_exec_paths(d: Directive, ctx: Context) -> Expectations:
    return [no_exec(path) for path in _paths(d)]


@expects("ExecPaths")
def _exec_paths(d: Directive, ctx: Context) -> Expectations:
    no_exec_paths = [p for other in ctx.directives if other.name == "NoExecPaths" for p in _paths(other)]
    checks = []
    for path in _paths(d):
        covering = [p for p in no_exec_paths if _under(path, p)]
        if covering:
            checks.append(executable(path, f"NoExecPaths={covering[0]}"))
    return checks or "ExecPaths= only matters under a NoExecPaths= that covers it, and none does"


@expects("ReadWritePaths")
def _read_write_paths(d: Directive, ctx: Context) -> Expectations:
    checks = []
    for path in _paths(d):
        makers = [other for other in ctx.directives if other is not d and makes_read_only(other, path)]
        if makers:
            checks.append(writable(path, f"{makers[0].name}={makers[0].value}"))
    return checks or "ReadWritePaths= only matters where another directive makes the path read-only, and none does"


@expects("CapabilityBoundingSet")
def _capability_bounding_set(d: Directive, ctx: Context) -> Expectations:
    allowed = capability_mask(d.assignments[-1]) if d.assignments and d.assignments[-1] else 0
    bits = {bit for bit in range(len(CAPABILITIES)) if allowed & (1 << bit)}
    return [status_check(f"the capability bounding set holds nothing beyond: {_capability_names(bits)}",
                         lambda facts: set(_int_list(facts.get("cap_bounding"))) <= bits)]


@expects("AmbientCapabilities")
def _ambient_capabilities(d: Directive, ctx: Context) -> Expectations:
    wanted = capability_mask(d.assignments[-1]) if d.assignments and d.assignments[-1] else 0
    bits = {bit for bit in range(len(CAPABILITIES)) if wanted & (1 << bit)}
    if not bits or ctx.runs_as_root:
        return "ambient capabilities only show for a service that does not run as root"
    return [status_check(f"the ambient set holds {_capability_names(bits)}",
                         lambda facts: bits <= set(_int_list(facts.get("cap_ambient"))), baselines=("machine",))]


@expects("NoNewPrivileges")
def _no_new_privileges(d: Directive, ctx: Context) -> Expectations:
    return [status_check("NoNewPrivs is 1 in /proc/self/status", lambda facts: facts.get("no_new_privs") == 1)]


@expects("DynamicUser")
def _dynamic_user(d: Directive, ctx: Context) -> Expectations:
    return [status_check(f"runs as a transient uid ({DYNAMIC_UIDS.start}-{DYNAMIC_UIDS.stop - 1}), not root",
                         lambda facts: facts.get("uid") in DYNAMIC_UIDS, baselines=("machine",)),
            status_check("NoNewPrivs is 1 (implied by DynamicUser=)", lambda facts: facts.get("no_new_privs") == 1,
                         baselines=("machine",))]


@expects("User")
def _user(d: Directive, ctx: Context) -> Expectations:
    return [status_check(f"runs as user {d.value}",
                         lambda facts: d.value in (facts.get("user"), str(facts.get("uid"))), baselines=("machine",))]


@expects("UMask")
def _umask(d: Directive, ctx: Context) -> Expectations:
    mask = int(d.value, 8)
    return [status_check(f"the umask is {mask:04o}", lambda facts: facts.get("umask") == mask),
            Check(Probe("umask"), f"a new file gets mode {0o666 & ~mask:04o}",
                  lambda observed, _machine: observed.facts.get("file_mode") == 0o666 & ~mask)]


def _limit(d: Directive, ctx: Context) -> Expectations:
    label = LIMIT_LABELS[d.name.removeprefix("Limit")]
    soft_text, _, hard_text = d.assignments[-1].partition(":")
    wanted = [_limit_value(soft_text), _limit_value(hard_text or soft_text)]
    shown = "/".join("unlimited" if value is None else str(value) for value in wanted)
    return [Check(Probe("limits"), f"{label} is {shown} (soft/hard)",
                  lambda observed, _machine: (observed.facts.get("limits") or {}).get(label) == wanted,
                  explain=lambda observed: _limit_explained(observed, label, wanted))]


def _limit_explained(observed: ProbeResult, label: str, wanted: list[int | None]) -> str:
    """What a limit that is not as set shows: clamped to the machine's hard limit (systemd lowers a Limit*= that
    its own process cannot reach, without an error), or just its values."""
    got = (observed.facts.get("limits") or {}).get(label)
    if not isinstance(got, list) or len(got) != 2:
        return f"{label} is not in /proc/self/limits"
    shown = "/".join("unlimited" if value is None else str(value) for value in got)
    hard, wanted_hard = got[1], wanted[1]
    if hard is not None and (wanted_hard is None or hard < wanted_hard):
        return f"{label} is {shown}: clamped to this machine's ceiling {hard}"
    return f"{label} is {shown}"


for _name in LIMIT_LABELS:
    BUILDERS[f"Limit{_name}"] = _limit


# How far beyond MemoryMax= the allocation probe goes: past what the kernel reclaims from the page cache.
MEMORY_MARGIN = 64 << 20


@expects("MemoryMax", "TasksMax")
def _cgroup_limit(d: Directive, ctx: Context) -> Expectations:
    controller, shown = ("memory", "memory.max") if d.name == "MemoryMax" else ("pids", "pids.max")
    value = _limit_value(d.value)
    if value is None:
        wanted = "max"
    else:
        wanted = str(value - value % 4096) if d.name == "MemoryMax" else str(value)  # systemd rounds to pages
    checks = [Check(Probe("cgroup", controller), f"its cgroup's {shown} is {wanted}",
                    lambda observed, _machine: observed.facts.get("value") == wanted)]
    if value is not None:  # and the kernel holds it: what the limit is for
        if d.name == "MemoryMax":
            over = value + MEMORY_MARGIN
            checks.append(denial(Probe("allocate", str(over)), ("SIGKILL", "ENOMEM"),
                                 f"touching {over >> 20} MiB gets it killed (the cgroup's OOM killer: SIGKILL)"))
        else:
            checks.append(denial(Probe("tasks", str(value + 1)), ("EAGAIN",),
                                 f"thread {value + 1} cannot start (clone fails with EAGAIN)"))
    return checks


@expects("RestrictNamespaces")
def _restrict_namespaces(d: Directive, ctx: Context) -> Expectations:
    allowed = allowed_namespaces(d.assignments[-1])
    denied_kinds = [kind for kind, flag in NAMESPACE_FLAGS.items() if not allowed & flag]
    return [denial(Probe("namespace", kind), ["EPERM"]) for kind in denied_kinds] or \
        f"RestrictNamespaces={d.value} allows every namespace type"


@expects("SystemCallFilter")
def _system_call_filter(d: Directive, ctx: Context) -> Expectations:
    way = syscall_filter_ways(ctx.directives, ctx.facts)
    checks = []
    for name in SYSCALLS:
        how = way(name)
        if how is not None:
            checks.append(denial(Probe("syscall", name), [how]))
    return checks or f"SystemCallFilter={d.value} denies none of the probed syscalls ({', '.join(SYSCALLS)})"


@expects("SystemCallErrorNumber")
def _system_call_error_number(d: Directive, ctx: Context) -> Expectations:
    if ctx.find("SystemCallFilter") is None:
        return "SystemCallErrorNumber= applies to SystemCallFilter=, which the spec does not set"
    way = syscall_filter_ways(ctx.directives, ctx.facts)
    wanted = _errno_name(d.value)
    checks = [denial(Probe("syscall", name), [wanted]) for name in SYSCALLS if way(name) == wanted]
    return checks or "the SystemCallFilter= denies none of the probed syscalls"


@expects("SystemCallArchitectures")
def _system_call_architectures(d: Directive, ctx: Context) -> Expectations:
    architectures = d.value.split()
    if any(arch in ("x86", "i386") for arch in architectures):
        return f"SystemCallArchitectures={d.value} allows the 32-bit x86 ABI the probe uses"
    return [denial(Probe("abi32"), ["SIGSYS"], "a 32-bit x86 syscall (int 0x80) is killed (SIGSYS)")]


@expects("RestrictAddressFamilies")
def _restrict_address_families(d: Directive, ctx: Context) -> Expectations:
    allow_list, table = effective_list(d.assignments)
    denied_families = [family for family in FAMILIES if (family not in table) == allow_list]
    return [denial(Probe("socket", family), ["EAFNOSUPPORT"]) for family in denied_families] or \
        f"RestrictAddressFamilies={d.value} allows every probed family ({', '.join(FAMILIES)})"


# systemd's seccomp filter denies W+X with EPERM; newer systemd (257 here) on a kernel with PR_SET_MDWE (Linux 6.3+)
# has the kernel refuse it instead, with EACCES (measured: trixie's container on this 6.18 kernel).
MDWE_WAYS = ("EPERM", "EACCES")


@expects("MemoryDenyWriteExecute")
def _memory_deny_write_execute(d: Directive, ctx: Context) -> Expectations:
    return [denial(Probe("memory", "wx"), MDWE_WAYS), denial(Probe("memory", "mprotect"), MDWE_WAYS)]


@expects("LockPersonality")
def _lock_personality(d: Directive, ctx: Context) -> Expectations:
    return [denial(Probe("personality"), ["EPERM"])]


@expects("RestrictRealtime")
def _restrict_realtime(d: Directive, ctx: Context) -> Expectations:
    # The filter itself, seen where no process may become realtime anyway (a container, an unprivileged user): an
    # invalid request reaches the kernel's argument check (EINVAL) unless the filter stops it (EPERM).
    return [denial(Probe("realtime"), ["EPERM"]), denial(Probe("realtime", "filter"), ["EPERM"])]


@expects("RemoveIPC")
def _remove_ipc(d: Directive, ctx: Context) -> Expectations:
    if ctx.runs_as_root:
        return "RemoveIPC= does nothing for a service that runs as root (systemd never removes root's IPC objects)"
    if not any(x.name == "DynamicUser" and x.value == "yes" for x in ctx.directives):
        return ("RemoveIPC= acts when the last unit of the service's user stops, and the service under test keeps "
                "its static User= in use: no probe unit can show it (with DynamicUser=yes one can)")
    return [Check(IPC_PROBE, "a POSIX shared memory object the user leaves is removed when its unit stops",
                  lambda observed, _machine: observed.facts.get("removed") is True, needs="removed",
                  explain=lambda _observed: "the object was still there after the unit stopped")]


@expects("RestrictSUIDSGID")
def _restrict_suid_sgid(d: Directive, ctx: Context) -> Expectations:
    return [denial(Probe("setuid-bit", "suid"), ["EPERM"]), denial(Probe("setuid-bit", "sgid"), ["EPERM"])]


def _ip_words(ctx: Context, name: str) -> list[str]:
    return [word for d in ctx.directives if d.name == name for word in d.value.split()]


@expects("IPAddressDeny")
def _ip_address_deny(d: Directive, ctx: Context) -> Expectations:
    allow = _ip_words(ctx, "IPAddressAllow")
    checks = [denial(Probe("connect", target), ["EPERM"]) for target in (*LOOPBACK_TARGETS, MACHINE_TARGET)
              if ip_denied(target, d.value.split(), allow)]
    return checks or (f"IPAddressDeny={d.value} (with IPAddressAllow={' '.join(allow) or 'nothing'}) denies neither "
                      f"loopback nor the machine's own {MACHINE_ADDRESS}, and probes never leave the machine")


@expects("IPAddressAllow")
def _ip_address_allow(d: Directive, ctx: Context) -> Expectations:
    deny = _ip_words(ctx, "IPAddressDeny")
    checks = []
    for target in (*LOOPBACK_TARGETS, MACHINE_TARGET):
        if ip_denied(target, deny, []) and not ip_denied(target, deny, d.value.split()):
            checks.append(Check(Probe("connect", target), f"{target} stays reachable despite IPAddressDeny=",
                                lambda observed, _machine: observed.allowed, baselines=(), reverse=True))
    return checks or (f"IPAddressAllow= only matters for a probed address (loopback, {MACHINE_ADDRESS}) that "
                      "IPAddressDeny= covers, and none is")


@expects("SocketBindDeny")
def _socket_bind_deny(d: Directive, ctx: Context) -> Expectations:
    allow = _rules(ctx.directives, "SocketBindAllow")
    checks = []
    for rule in _rules([d], "SocketBindDeny"):
        family, protocol, port = rule.probe_target()
        if not any(a.matches(family, protocol, port) for a in allow):
            checks.append(denial(Probe("bind", _bind_target(family, protocol, port)), ["EPERM"]))
    return checks or "every port SocketBindDeny= covers is also in SocketBindAllow="


@expects("SocketBindAllow")
def _socket_bind_allow(d: Directive, ctx: Context) -> Expectations:
    deny = _rules(ctx.directives, "SocketBindDeny")
    checks = []
    for rule in _rules([d], "SocketBindAllow"):
        family, protocol, port = rule.probe_target()
        if any(r.matches(family, protocol, port) for r in deny):
            target = _bind_target(family, protocol, port)
            checks.append(Check(Probe("bind", target), f"bind {target} stays allowed despite SocketBindDeny=",
                                lambda observed, _machine: observed.allowed, baselines=(), reverse=True))
    return checks or "SocketBindAllow= only matters for ports SocketBindDeny= covers, and none is"


@expects("RestrictFileSystems")
def _restrict_file_systems(d: Directive, ctx: Context) -> Expectations:
    if any(word.lstrip("~").startswith("@") for word in d.value.split()):
        return "filesystem @groups are not resolved by the probes (name the filesystem types instead)"
    allow_list, table = effective_list(d.assignments)

    def forbids(machine: ProbeResult) -> bool:
        fs_type = machine.facts.get("fs_type")
        return isinstance(fs_type, str) and (fs_type not in table) == allow_list

    return [replace(denial(Probe("filesystem", path), ["EPERM"], f"opening {path} is denied (EPERM) when its "
                                                                  "filesystem type is one the directive forbids"),
                    applies=forbids) for path in FILESYSTEM_PATHS]


# Directives whose solo run needs another directive of the spec beside them.
COMPANIONS = {"SystemCallErrorNumber": ("SystemCallFilter",), "IPAddressAllow": ("IPAddressDeny",),
              "SocketBindAllow": ("SocketBindDeny",), "ExecPaths": ("NoExecPaths",)}


# --- planning -----------------------------------------------------------------------------------------------

def runs_as_root(directives: Sequence[Directive]) -> bool:
    user = next((d.value for d in directives if d.name == "User"), None)
    dynamic = any(d.name == "DynamicUser" and d.value == "yes" for d in directives)
    return not dynamic and user in (None, "root", "0")


def directive_subject(directive: Directive, ctx: Context) -> Subject | None:
    """The enforcement item of one directive, or None for a directive that configures rather than confines."""
    name = str(directive)  # its unit-file lines: "SystemCallFilter=~@mount; SystemCallFilter=@mount"
    if directive.name in NOT_SANDBOXING or requests_nothing(directive):
        return None
    builder = BUILDERS.get(directive.name)
    if builder is None:
        return Subject(name, directive.line, (), directive,
                       no_checks=f"no probe observes {directive.name}= yet: it is not checked")
    expectations = builder(directive, ctx)
    if isinstance(expectations, str):
        return Subject(name, directive.line, (), directive, no_checks=expectations)
    companions = tuple(d for other in COMPANIONS.get(directive.name, ()) if (d := ctx.find(other)) is not None)
    if directive.name == "ReadWritePaths":
        companions = tuple(d for d in ctx.directives if d is not directive
                           and any(makes_read_only(d, p) for p in _paths(directive)))
    return Subject(name, directive.line, tuple(expectations), directive, companions=companions)


def denial_subject(declared: Denial) -> Subject:
    """The item of a user-declared denial: the action must be denied in the sandbox, and allowed without it."""
    probe = declared.probe
    if declared.kind == "capability":
        bit = CAPABILITY_BITS[declared.target]

        def cannot_use(facts: dict[str, object]) -> bool:
            held = {*_int_list(facts.get("cap_effective")), *_int_list(facts.get("cap_permitted")),
                    *_int_list(facts.get("cap_ambient"))}
            obtainable = bit in _int_list(facts.get("cap_bounding")) and facts.get("no_new_privs") != 1
            return bit not in held and not obtainable

        check = status_check(f"{declared.target} is neither held nor obtainable", cannot_use, baselines=("machine",))
    elif declared.kind == "read":
        check = replace(hidden(declared.target), baselines=("machine",))
    elif declared.kind == "exec":
        check = Check(probe, f"{probe.describe()} is denied",
                      lambda observed, _machine: observed.denied or observed.facts.get("noexec") is True,
                      baselines=("machine",))
    else:
        check = Check(probe, f"{probe.describe()} is denied", lambda observed, _machine: observed.denied,
                      baselines=("machine",))
    return Subject(declared.label, declared.line, (check,), denial=declared)


# The subject of the one item that stands for a unit's own hardening when it is not known at collection (a
# package's unit whose image is not built yet): it is judged on every directive of the unit that has no item.
OWN_HARDENING = "<the unit's own hardening>"


def subject_name(directive: Directive, spec_name: str) -> str:
    """An item's name: the directive's unit-file lines, and where they are written when that is not only the spec
    (``PrivateTmp=yes (memcached.service:23)``): the spec's own keep their plain names."""
    if not directive.source and not getattr(directive, "parts", ()):
        return str(directive)
    return f"{directive} ({located(directive, spec_name)})"


def item_names(spec: Spec, own: Sequence[Directive] | None = ()) -> list[tuple[str, str, int | None]]:
    """(subject name, item title, line) of each enforcement item of ``spec``, known without a machine, so the
    items can be collected before any machine boots; :func:`plan` gives the same subjects with their checks.

    ``own`` is the unit's own hardening (:func:`~pytest_systemd_harden.spec.unit_file.own_directives_from_files`);
    None when it cannot be known yet: then one item (:data:`OWN_HARDENING`) stands for all of it."""
    skipped = set(spec.enforcement.skip)
    names: dict[str, tuple[str, str, int | None]] = {}
    for d in effective_hardening(own or (), spec.hardening):
        if d.name not in skipped and d.name not in NOT_SANDBOXING and not requests_nothing(d):
            name = subject_name(d, spec.path.name)
            # A unit's own directive is shown at the spec's `unit:` line: the item's name says its file and line.
            names.setdefault(name, (name, f"{name} is enforced", spec.service.line if d.source else d.line))
    if own is None:
        names[OWN_HARDENING] = (OWN_HARDENING, f"the own hardening of {spec.service.unit_name} is enforced",
                                spec.service.line)
    for declared in spec.denials:
        names.setdefault(declared.label, (declared.label, f"{declared.label} is denied", declared.line))
    return list(names.values())


@dataclass(frozen=True)
class Plan:
    """Every enforcement item of a spec, and the denial ways the spec as a whole allows per probe."""

    subjects: tuple[Subject, ...]
    ways: dict[Probe, frozenset[str]] = field(compare=False)
    directives: tuple[Directive, ...] = ()  # every directive in force: the unit's own and the spec's

    @property
    def probes(self) -> list[Probe]:
        # /proc/self/status always: the uid decides whether a control run as the service's user is needed.
        return unique([Probe("status"), *(probe for subject in self.subjects for probe in subject.probes)])

    def subject(self, name: str) -> Subject:
        return next(s for s in self.subjects if s.name == name)


def denial_ways(directives: Sequence[Directive], facts: MachineFacts, probes: Iterable[Probe],
                ) -> dict[Probe, frozenset[str]]:
    """For each probe: every errno/signal by which some directive in ``directives`` may deny it."""
    ctx = Context(tuple(directives), facts, runs_as_root(directives))
    ways: dict[Probe, set[str]] = {}
    for directive in directives:
        builder = BUILDERS.get(directive.name)
        expectations = builder(directive, ctx) if builder and directive.name not in NOT_SANDBOXING else []
        for check in expectations if isinstance(expectations, list) else []:
            ways.setdefault(check.probe, set()).update(check.ways)
    scf_way = syscall_filter_ways(directives, facts)
    for probe in probes:
        names = [probe.arg] if probe.kind == "syscall" else list(PROBE_SYSCALLS.get(probe.kind, ()))
        ways.setdefault(probe, set()).update(how for name in names if (how := scf_way(name)))
    return {probe: frozenset(found) for probe, found in ways.items()}


def plan(spec: Spec, facts: MachineFacts, denials: Sequence[Denial] | None = None,
         skip: Sequence[str] | None = None, own: Sequence[Directive] = ()) -> Plan:
    """The enforcement items of ``spec``: one per confining directive in force (the unit's ``own``, then the
    spec's, combined as systemd combines them: :func:`~pytest_systemd_harden.spec.unit_file.effective_hardening`),
    one per declared denial.

    ``denials`` defaults to the spec's ``deny:`` list, ``skip`` to its ``enforcement: {skip: [...]}``.
    """
    skipped = set(skip if skip is not None else spec.enforcement.skip)
    directives = effective_hardening(own, spec.hardening)
    ctx = Context(directives, facts, runs_as_root(directives))
    subjects = []
    for d in directives:
        if d.name in skipped or (subject := directive_subject(d, ctx)) is None:
            continue
        name = subject_name(d, spec.path.name)
        try:
            d.properties()
        except DirectiveError as exc:  # a unit's value only systemd's own parser reads (a specifier like %h)
            subject = replace(subject, checks=(), no_checks=f"{d.name}={d.value} is read by systemd alone ({exc}): "
                                                            "not checked", companions=())
        if name != subject.name:
            subject = replace(subject, name=name, location=located(d, spec.path.name),
                              line=None if d.source else subject.line)
        subjects.append(subject)
    declared = denials if denials is not None else spec.denials
    subjects += [denial_subject(d) for d in declared]
    probes = unique(check.probe for subject in subjects for check in subject.checks)
    return Plan(tuple(subjects), denial_ways(directives, facts, probes), directives)


# --- judging ------------------------------------------------------------------------------------------------


# --- who should deny what -----------------------------------------------------------------------------------


# --- running it ---------------------------------------------------------------------------------------------


# What a RemoveIPC= probe unit must not take from the service: a fresh dynamic user given the service's directories
# would have them chowned to it.
SERVICE_OWN_PROPERTIES = frozenset({
    "User", "StateDirectory", "CacheDirectory", "LogsDirectory", "RuntimeDirectory", "ConfigurationDirectory",
    "RuntimeDirectoryPreserve", "JoinsNamespaceOf", "After"})
# The dynamic user of that unit: not the service's, which the running service keeps in use (systemd removes a
# user's IPC objects only when its last unit stops).
IPC_PROBE_USER = "harden-probe-ipc"


def _with_ipc(probes: Sequence[Probe], batch: Callable[[list[Probe]], Batch],
              lifecycle: Callable[[str], ProbeResult]) -> Batch:
    """``batch`` of ``probes``, with the RemoveIPC= probe (if asked) run as a unit of its own (ipc_lifecycle)."""
    rest = [probe for probe in unique(probes) if probe != IPC_PROBE]
    result = batch(rest)
    if IPC_PROBE not in probes:
        return result
    return Batch(result.label, {**result.results, IPC_PROBE: lifecycle(result.label)}, result.command)


