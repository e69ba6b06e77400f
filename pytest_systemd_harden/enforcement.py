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

Everything here but :class:`ServiceHost` is pure: the probe batches come through a :class:`ProbeHost`.
"""

from __future__ import annotations

import errno as errno_module
import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal, Protocol

from dbus_next.signature import Variant

from .directives import CAPABILITIES, CAPABILITY_BITS, IP_SYMBOLS, NAMESPACE_FLAGS, Directive, DirectiveError
from .directives import _caps_bus as capability_mask  # systemd's reading of a capability list (with ~)
from .directives import _namespaces_bus as allowed_namespaces  # and of RestrictNamespaces=
from .probes.catalogue import (
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
from .probes.model import Probe, ProbeResult
from .probes.runner import (
    IPC_PROBE,
    Batch,
    MachineFacts,
    ProbeProgramError,
    ipc_lifecycle,
    machine_facts,
    on_machine,
    probe_interpreter,
    run_batch,
    unique,
)
from .spec import Spec
from .systemd import Property
from .unit import effective_hardening, located

if TYPE_CHECKING:
    from .service import HardenedService

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

    ``own`` is the unit's own hardening (:func:`~.unit.own_directives_from_files`); None when it cannot be known
    yet: then one item (:data:`OWN_HARDENING`) stands for all of it."""
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
    spec's, combined as systemd combines them: :func:`~.unit.effective_hardening`), one per declared denial.

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

@dataclass(frozen=True)
class Runs:
    """The batches one verdict compares: in the sandbox, on the machine, and as the service's user."""

    sandbox: Batch
    machine: Batch
    user: Batch | None = None
    user_label: str = ""


@dataclass(frozen=True)
class CheckOutcome:
    check: Check
    status: Status
    reason: str
    observed: ProbeResult | None = None
    machine: ProbeResult | None = None
    note: str = ""  # e.g. that another directive of the spec denied it first


def judge(check: Check, runs: Runs, accepted: frozenset[str]) -> CheckOutcome | None:
    """How one check came out in the sandbox, compared with the control runs; None if it does not apply."""
    observed, machine = runs.sandbox[check.probe], runs.machine[check.probe]
    if check.applies is not None and not (check.usable(machine) and check.applies(machine)):
        return None
    if not check.usable(observed):
        return CheckOutcome(check, UNVERIFIABLE, f"cannot observe it in the sandbox: {observed.describe()}",
                            observed, machine)
    if not check.usable(machine):
        return CheckOutcome(check, UNVERIFIABLE, f"cannot observe it on the machine without hardening: "
                            f"{machine.describe()}", observed, machine)
    if check.reverse:
        if not check.holds(machine, machine, accepted):
            return CheckOutcome(check, UNVERIFIABLE, f"not so even without hardening: {machine.describe()}",
                                observed, machine)
        if check.holds(observed, machine, accepted):
            return CheckOutcome(check, ENFORCED, observed.describe(), observed, machine)
        return CheckOutcome(check, NOT_ENFORCED, check.happened(observed), observed, machine)
    if not check.holds(observed, machine, accepted):
        return CheckOutcome(check, NOT_ENFORCED, check.happened(observed), observed, machine)
    if "machine" in check.baselines and check.holds(machine, machine, accepted):
        return CheckOutcome(check, UNVERIFIABLE, f"already so without any hardening: {machine.describe()}",
                            observed, machine)
    if "user" in check.baselines and runs.user is not None:
        as_user = runs.user[check.probe]
        if check.usable(as_user) and check.holds(as_user, machine, accepted):
            return CheckOutcome(check, UNVERIFIABLE, f"already so for {runs.user_label} without hardening: "
                                f"{as_user.describe()}", observed, machine)
    note = ""
    if check.ways and observed.way not in check.ways:
        note = f"denied with {observed.way} by another directive of the spec, which masks this one"
    return CheckOutcome(check, ENFORCED, observed.describe(), observed, machine, note)


@dataclass(frozen=True)
class Verdict:
    """The outcome of one enforcement item, with everything its message needs."""

    subject: Subject
    status: Status
    outcomes: tuple[CheckOutcome, ...] = ()
    reason: str = ""  # for unverifiable: why; for not enforced: what a solo run showed
    suspects: tuple[Directive, ...] = ()  # directives of the spec that may undo it
    deniers: tuple[Directive, ...] = ()  # for a declared denial: the directives that should deny it
    spec_name: str = ""

    @property
    def where(self) -> str:
        if self.subject.location:
            return self.subject.location
        return f"{self.spec_name}:{self.subject.line}" if self.subject.line is not None else self.spec_name

    @property
    def _at(self) -> str:
        """`` (where)`` after the subject's name, unless the name says it already (a unit's own directive)."""
        return "" if self.subject.location and self.subject.location in self.subject.name else f" ({self.where})"

    def _shown(self, directives: Sequence[Directive]) -> str:
        return ", ".join(str(d) + (f" ({where})" if (where := located(d, self.spec_name)) else "")
                         for d in directives)

    def _unverifiable_summary(self) -> str:
        """Why, in the skip's first line (the short summary shows only that line): the checks' own reasons."""
        unverifiable = [o for o in self.outcomes if o.status == UNVERIFIABLE]
        reasons = [o.reason for o in unverifiable]
        if not reasons:
            return "none of its checks applies here"
        if all(r.startswith("already so") for r in reasons):
            return (f"every check already holds without the directive (e.g. {unverifiable[0].check.expected}: "
                    f"{reasons[0]}), so nothing shows it at work here; a VM (--harden-backend=qemu) may")
        return f"{reasons[0]}" + (f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else "")

    def message(self) -> str:
        """The failure or skip message: what was expected, what happened, and which directive is involved."""
        subject = self.subject
        if subject.name == OWN_HARDENING:  # several verdicts in one: each says its own
            return self.reason
        if self.status == UNVERIFIABLE:
            head = f"{subject.name} cannot be verified on this machine{self._at}"
            lines = [head + f": {self.reason or self._unverifiable_summary()}"]
            lines += [f"  - {o.check.expected}: {o.reason}" for o in self.outcomes if o.status == UNVERIFIABLE]
            return "\n".join(lines)
        if self.status == ENFORCED:
            lines = [f"{subject.title}{self._at}"]
            lines += [f"  - {o.check.expected}: " + ("yes" + (f" ({o.note})" if o.note else "")
                                                    if o.status == ENFORCED else o.reason) for o in self.outcomes]
            return "\n".join(lines)
        lines = [f"{subject.name} is NOT {'denied' if subject.denial else 'enforced'}{self._at}"]
        for outcome in self.outcomes:
            if outcome.status != NOT_ENFORCED:
                continue
            lines.append(f"  expected: {outcome.check.expected}")
            lines.append(f"  happened: {outcome.reason}")
            if outcome.machine is not None and not outcome.check.reverse:
                lines.append(f"  without hardening: {outcome.machine.describe()}")
        if self.reason:
            lines.append(f"  {self.reason}")
        if subject.denial is not None:
            lines.append("  should have been denied by: " + (
                self._shown(self.deniers) if self.deniers
                else f"no directive of the spec covers it (e.g. {suggest(subject.denial)})"))
        if self.suspects:
            lines.append(f"  likely undone by: {self._shown(self.suspects)}")
        held = [o.check.expected for o in self.outcomes if o.status == ENFORCED]
        if held:
            lines.append(f"  still in force: {'; '.join(held)}")
        return "\n".join(lines)


def judge_alone(checks: Sequence[Check], alone: Sequence[Directive], solo: Batch, machine: Batch,
                facts: MachineFacts) -> list[CheckOutcome | None]:
    """How ``checks`` came out in ``solo``, a batch with only the directives ``alone`` set, against ``machine``
    without hardening; a denial counts in the ways those directives deny by themselves."""
    ways = denial_ways(alone, facts, solo.results)
    runs = Runs(solo, machine)
    return [judge(check, runs, ways.get(check.probe, check.ways)) for check in checks]


def aggregate(outcomes: Sequence[CheckOutcome]) -> Status:
    if any(o.status == NOT_ENFORCED for o in outcomes):
        return NOT_ENFORCED
    if any(o.status == ENFORCED for o in outcomes):
        return ENFORCED
    return UNVERIFIABLE


# --- who should deny what -----------------------------------------------------------------------------------

SYSCALL_DENIERS = {
    "clock_settime": "ProtectClock", "settimeofday": "ProtectClock", "adjtimex": "ProtectClock",
    "init_module": "ProtectKernelModules", "finit_module": "ProtectKernelModules",
    "delete_module": "ProtectKernelModules", "sethostname": "ProtectHostname", "setdomainname": "ProtectHostname",
    "syslog": "ProtectKernelLogs", "iopl": "PrivateDevices", "ioperm": "PrivateDevices",
    "personality": "LockPersonality", "unshare": "RestrictNamespaces", "setns": "RestrictNamespaces",
}
KIND_DENIERS = {
    "connect": ("IPAddressDeny", "RestrictAddressFamilies"), "bind": ("SocketBindDeny", "RestrictAddressFamilies"),
    "syscall": ("SystemCallFilter",), "capability": ("CapabilityBoundingSet", "User", "DynamicUser"),
    "namespace": ("RestrictNamespaces",), "family": ("RestrictAddressFamilies",), "exec": ("NoExecPaths",),
}
READ_DENIERS = ("InaccessiblePaths", "ProtectHome", "ProcSubset", "ProtectProc", "TemporaryFileSystem",
                "ProtectKernelTunables", "ProtectKernelLogs", "ProtectKernelModules", "PrivateDevices")


def deniers(declared: Denial, directives: Sequence[Directive]) -> list[Directive]:
    """The directives of the spec that should deny ``declared``."""
    if declared.kind == "write":
        return [d for d in directives if makes_read_only(d, declared.target)]
    if declared.kind == "exec":
        return [d for d in directives if d.name == "NoExecPaths" and any(_under(declared.target, p) for p in _paths(d))]
    if declared.kind == "read":
        return [d for d in directives if d.name in READ_DENIERS and (
            d.name not in ("InaccessiblePaths", "TemporaryFileSystem")
            or any(_under(declared.target, p) for p in _paths(d)))]
    names = set(KIND_DENIERS.get(declared.kind, ()))
    if declared.kind == "syscall" and declared.target in SYSCALL_DENIERS:
        names.add(SYSCALL_DENIERS[declared.target])
    return [d for d in directives if d.name in names]


def suggest(declared: Denial) -> str:
    """A directive that would deny ``declared``, for a message."""
    return {
        "write": f"ReadOnlyPaths={declared.target}", "read": f"InaccessiblePaths={declared.target}",
        "exec": f"NoExecPaths={declared.target}", "connect": "IPAddressDeny=any",
        "bind": "SocketBindDeny=any", "syscall": f"SystemCallFilter=~{declared.target}",
        "capability": f"CapabilityBoundingSet=~{declared.target}", "namespace": "RestrictNamespaces=yes",
        "family": f"RestrictAddressFamilies=~{declared.target}",
    }[declared.kind]


# Directives that mount something of their own at fixed places, over what other directives set up there.
OWN_MOUNTS = {"PrivateTmp": ("/tmp", "/var/tmp"), "PrivateDevices": ("/dev",), "ProtectHome": ("/home", "/root",
              "/run/user"), "ProcSubset": ("/proc",), "ProtectProc": ("/proc",)}


def _mounts_at(directive: Directive, path: str) -> bool:
    """Whether ``directive`` mounts something at ``path`` or above it (a new mount escapes earlier flags)."""
    # systemd 252 bind-mounts each of these paths onto itself, and the new mount is read-write and executable
    # unless the directive itself says otherwise (ExecPaths=/usr reopens /usr under ProtectSystem=strict).
    if directive.name in ("ReadWritePaths", "ExecPaths", "NoExecPaths", "TemporaryFileSystem"):
        return any(_under(path, p) for p in _paths(directive))
    if directive.name in ("BindPaths", "BindReadOnlyPaths"):
        return any(_under(path, p) for p in _bind_destinations(directive))
    if directive.name in OWN_MOUNTS and directive.value not in ("no", "default", "all"):
        return any(_under(path, p) for p in OWN_MOUNTS[directive.name])
    return False


def suspects_for(subject: Subject, failed: Sequence[CheckOutcome], directives: Sequence[Directive]) -> list[Directive]:
    """Directives of the spec that may undo what ``subject`` should enforce, judged by the failed checks."""
    found: list[Directive] = []
    for outcome in failed:
        probe = outcome.check.probe
        for d in directives:
            if d is subject.directive or d in found:
                continue
            reopens = probe.kind in ("write", "read", "exec") and _mounts_at(d, probe.arg)
            allows = (probe.kind == "connect" and d.name == "IPAddressAllow") or (
                probe.kind == "bind" and d.name == "SocketBindAllow")
            if reopens or allows:
                found.append(d)
    return found


# Why a machine may not enforce a directive at all (shown when it fails even when set alone). Most say whether a
# host running the same systemd would behave the same: that decides whether the skip hides a production problem.
def unenforceable_reason(directive: Directive, facts: MachineFacts) -> str:
    name = directive.name
    same_on_hosts = f"a host running this systemd {facts.version} build behaves the same"
    if name in ("SocketBindDeny", "SocketBindAllow", "RestrictFileSystems") and facts.lacks("BPF_FRAMEWORK"):
        return (f"the machine's systemd {facts.version} is built without BPF_FRAMEWORK (-BPF_FRAMEWORK in "
                f"systemctl --version), so it ignores {name}=; {same_on_hosts}")
    if name in ("SocketBindDeny", "SocketBindAllow", "IPAddressDeny", "IPAddressAllow", "DeviceAllow",
                "DevicePolicy", "RestrictFileSystems") and facts.user_namespaced:
        return (f"{name}= needs BPF programs on the host's kernel, and the container's root is root of a user "
                "namespace only (no CAP_BPF there): machine: {privileged: true} (no user namespace) or the qemu "
                "backend enforces it")
    if name in ("DevicePolicy", "DeviceAllow"):
        return (f"{name}= needs cgroup device rules: on a host with hybrid cgroups the container's systemd would write "
                "them to the v1 devices controller, which systemd-nspawn mounts read-only; the qemu backend "
                "(--harden-backend=qemu) enforces it")
    if name in ("SocketBindDeny", "SocketBindAllow", "IPAddressDeny", "IPAddressAllow"):
        return f"{name}= needs BPF cgroup programs: cgroup v2 for the unit, and bpf() allowed in the container"
    if name == "RestrictFileSystems" and facts.cgroup_fs != "cgroup2fs":
        return ("RestrictFileSystems= needs the BPF LSM, which systemd uses only on a unified cgroup hierarchy, and "
                f"the machine's is not ({facts.cgroup_fs} on /sys/fs/cgroup: nspawn gives a container the host's "
                "hybrid layout): a host or VM with unified cgroups and the BPF LSM enforces it")
    if name == "RestrictFileSystems":
        seen = f"the machine's LSMs are {facts.lsms}" if facts.lsms else \
            "the machine has no /sys/kernel/security/lsm (securityfs not mounted), so systemd cannot tell"
        return (f"RestrictFileSystems= needs the BPF LSM active ('bpf' in /sys/kernel/security/lsm; lsm=...,bpf on the "
                f"kernel command line), and {seen}")
    if name in ("MemoryMax", "TasksMax"):
        controller = "memory" if name == "MemoryMax" else "pids"
        return (f"{name}= needs the {controller} controller on the unit's cgroup; a container on a host with hybrid "
                f"cgroups (the {controller} controller on cgroup v1) has none: a VM (--harden-backend=qemu) or a "
                "host with unified cgroups enforces it")
    if name.startswith("Limit"):
        return ("the machine's own hard limit is lower, and its systemd cannot raise a service above the limits it "
                "inherited (raising one needs CAP_SYS_RESOURCE on the host, which the process that started the "
                "machine lacks here); a host's systemd, or the qemu backend (--harden-backend=qemu), sets it")
    if name == "ProtectHome" and directive.value == "tmpfs":
        return ("systemd mounts the tmpfs read-write, not read-only as documented "
                f"(https://github.com/systemd/systemd/issues/34825); {same_on_hosts}")
    return (f"the machine's systemd {facts.version} does not enforce it even when it is the only directive; "
            "a host running the same systemd may not either")


# --- running it ---------------------------------------------------------------------------------------------

class ProbeHost(Protocol):
    """Where the batches run: the service's sandbox, the machine unconfined, or a user with some directives."""

    def facts(self) -> MachineFacts: ...

    def sandbox(self, probes: Sequence[Probe]) -> Batch: ...

    def machine(self, probes: Sequence[Probe]) -> Batch: ...

    def as_user(self, probes: Sequence[Probe], user: str | None, directives: Sequence[Directive]) -> Batch: ...


class EnforcementFailed(AssertionError):
    """An enforcement item failed: the message is the verdict's (expected, happened, which directive)."""


@dataclass
class Report:
    """Every verdict of one spec, by subject name."""

    plan: Plan
    verdicts: dict[str, Verdict]
    runs: Runs | None = None

    def __getitem__(self, name: str) -> Verdict:
        return self.verdicts[name]

    def for_item(self, name: str, collected: Iterable[str]) -> Verdict:
        """The verdict of the item collected as ``name``. :data:`OWN_HARDENING` is judged on every subject no
        collected item names (the unit's own directives, found once the machine ran); a spec's list directive the
        unit turned out to assign too is judged combined, as systemd applies it."""
        if name in self.verdicts:
            return self.verdicts[name]
        if name == OWN_HARDENING:
            taken = {self.for_item(other, ()).subject.name for other in collected if other != OWN_HARDENING}
            return merged_verdict([v for key, v in self.verdicts.items() if key not in taken
                                   and v.subject.directive is not None])
        found = next((v for v in self.verdicts.values()
                      if any(str(part) == name for part in getattr(v.subject.directive, "parts", ()))), None)
        if found is None:  # collected from a unit that is not the one that ran (the image changed since)
            return Verdict(Subject(name, None, ()), UNVERIFIABLE, reason=(
                "the unit in the machine does not set this (it was read from the cached image at collection, which "
                "has changed since): run again to collect the unit's directives anew"))
        return found


def merged_verdict(verdicts: Sequence[Verdict]) -> Verdict:
    """One verdict for several subjects (the unit's own hardening as one item): not enforced if any is, enforced if
    any is and none fails, else unverifiable; the message lists each."""
    statuses = {v.status for v in verdicts}
    status = NOT_ENFORCED if NOT_ENFORCED in statuses else ENFORCED if ENFORCED in statuses else UNVERIFIABLE
    shown = sorted(verdicts, key=lambda v: v.status != status)  # the ones that decide first, then the rest
    reason = "\n".join(v.message() for v in shown) or "the unit has no hardening of its own"
    subject = Subject(OWN_HARDENING, None, (), location=", ".join(v.where for v in shown))
    return Verdict(subject, status if verdicts else UNVERIFIABLE, reason=reason, spec_name="")


def service_user(status: ProbeResult) -> str | None:
    """The name (or uid) to run a control batch as the service's user; None when that user is root."""
    uid = status.facts.get("uid")
    if not isinstance(uid, int) or uid == 0:
        return None
    name = status.facts.get("user")
    return str(name) if isinstance(name, str) and name else str(uid)


def verify(host: ProbeHost, plan_: Plan, spec_name: str) -> Report:
    """Run the plan's probes in the sandbox and the control runs, and judge every item."""
    probes = plan_.probes
    sandbox = host.sandbox(probes)
    machine = host.machine(probes)
    user = service_user(sandbox[Probe("status")])
    as_user = host.as_user(probes, user, ()) if user is not None else None
    runs = Runs(sandbox, machine, as_user, f"the service's user ({user})" if user else "")
    verdicts = {subject.name: _verdict(host, plan_, subject, runs, user, spec_name) for subject in plan_.subjects}
    return Report(plan_, verdicts, runs)


def _verdict(host: ProbeHost, plan_: Plan, subject: Subject, runs: Runs, user: str | None,
             spec_name: str) -> Verdict:
    if not subject.checks:
        return Verdict(subject, UNVERIFIABLE, reason=subject.no_checks, spec_name=spec_name)
    outcomes = tuple(o for check in subject.checks
                     if (o := judge(check, runs, plan_.ways.get(check.probe, check.ways))) is not None)
    if not outcomes:
        return Verdict(subject, UNVERIFIABLE, reason="none of its checks applies on this machine",
                       spec_name=spec_name)
    status = aggregate(outcomes)
    if status != NOT_ENFORCED:
        return Verdict(subject, status, outcomes, spec_name=spec_name)
    named = subject.directive.name if subject.directive is not None else ""
    device_verdict = _device_rules_verdict(subject, outcomes, plan_, host.facts(), spec_name)
    if device_verdict is not None:
        return device_verdict
    unenforced = host.facts().unenforced.get(named)
    if unenforced is not None:  # measured when the machine started: it does not enforce this directive at all
        return Verdict(subject, UNVERIFIABLE, outcomes, spec_name=spec_name,
                       reason=f"not enforced even with only {named}= on this machine (measured when it started): "
                              f"{unenforced}")
    failed = [o for o in outcomes if o.status == NOT_ENFORCED]
    if subject.denial is not None:
        covering = deniers(subject.denial, plan_.directives)
        # A directive that would deny it on a host but that this machine does not enforce at all: whether the spec
        # denies it cannot be told here.
        blind = [(d, host.facts().unenforced[d.name]) for d in covering if d.name in host.facts().unenforced]
        if blind:
            directive, why = blind[0]
            return Verdict(subject, UNVERIFIABLE, outcomes, spec_name=spec_name,
                           reason=f"it would be denied by {directive}, which this machine does not enforce even "
                                  f"alone (measured when it started): {why}")
        return Verdict(subject, NOT_ENFORCED, outcomes, deniers=tuple(covering), spec_name=spec_name,
                       suspects=tuple(d for d in suspects_for(subject, failed, plan_.directives) if d not in covering))
    assert subject.directive is not None
    # Set alone (as the service's user), is the directive enforced here at all? If not, the machine cannot
    # enforce it: unverifiable, with the reason. If it is, something in the spec undoes it: a real failure.
    alone = subject.alone
    solo_batch = host.as_user(unique(o.check.probe for o in failed), user, alone)
    solo = judge_alone([o.check for o in failed], alone, solo_batch, runs.machine, host.facts())
    shown_alone = "; ".join(str(d) for d in alone)
    as_whom = f"as {user}" if user else "as root"
    suspects = tuple(suspects_for(subject, failed, plan_.directives))
    not_alone = [s for s in solo if s is not None and s.status == NOT_ENFORCED]
    if not_alone:  # seen not enforced alone too: this machine cannot, whatever the spec does
        reason = unenforceable_reason(subject.directive, host.facts())
        seen = "; ".join(s.reason for s in not_alone)
        return Verdict(subject, UNVERIFIABLE, outcomes, spec_name=spec_name,
                       reason=f"not enforced even with only {shown_alone} ({as_whom}): {seen}; {reason}")
    if all(s is not None and s.status == ENFORCED for s in solo):
        return Verdict(subject, NOT_ENFORCED, outcomes, spec_name=spec_name, suspects=suspects,
                       reason=f"with only {shown_alone} ({as_whom}) it is enforced here, so something else in the "
                              "spec undoes it")
    # The solo run could not tell (it did not run): a failure stays a failure without evidence against it.
    unclear = "; ".join(s.reason for s in solo if s is not None and s.status != ENFORCED)
    return Verdict(subject, NOT_ENFORCED, outcomes, spec_name=spec_name, suspects=suspects,
                   reason=f"rerun with only {shown_alone} ({as_whom}) to tell the machine from the spec, it could "
                          f"not be observed: {unclear}")


def _device_rules_verdict(subject: Subject, outcomes: Sequence[CheckOutcome], plan_: Plan, facts: MachineFacts,
                          spec_name: str) -> Verdict | None:
    """The verdict of an item whose device checks failed on a machine that applies no device rules at all.

    A device the spec binds into the sandbox but its policy denies is refused on a host (EPERM at open), so the
    scenarios here ran with access a real host does not give: the item fails, saying so. Any other device check
    cannot be shown here (the qemu backend shows it)."""
    no_rules = facts.unenforced.get("DevicePolicy")
    failed = [o for o in outcomes if o.status == NOT_ENFORCED]
    devices = [o for o in failed if o.check.probe.kind == "device"]
    if no_rules is None or not devices:
        return None
    bound = set(bound_devices(plan_.directives))
    used = [o.check.probe.arg for o in devices if o.check.probe.arg in bound]
    if used:
        return Verdict(subject, NOT_ENFORCED, tuple(outcomes), spec_name=spec_name, reason=(
            f"on a host (or --harden-backend=qemu) opening {', '.join(used)} fails with EPERM: the spec binds it into "
            "the sandbox but its device policy denies it, so a service that uses it breaks there; add DeviceAllow="
            f"{used[0]} rw, or drop the bind. This machine applies no device rules (measured when it started: "
            f"{no_rules}), which is why the scenarios could use it"))
    if len(devices) == len(failed):
        return Verdict(subject, UNVERIFIABLE, tuple(outcomes), spec_name=spec_name, reason=(
            f"this machine applies no device rules (measured when it started: {no_rules}); the qemu backend "
            "(--harden-backend=qemu) shows the device policy"))
    return None


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


class ServiceHost:
    """A :class:`ProbeHost` for a started :class:`HardenedService` on its machine."""

    def __init__(self, service: HardenedService) -> None:
        self.service = service

    def facts(self) -> MachineFacts:
        from .capabilities import machine_capabilities  # it judges with this module's checks

        machine = self.service.machine
        return replace(machine_facts(machine), unenforced=machine_capabilities(machine).unenforced())

    def sandbox(self, probes: Sequence[Probe]) -> Batch:
        # The object must outlive its unit: a unit of its own under the spec's directives, with a user of its own.
        properties = [p for p in self.service._sandbox_properties() if p[0] not in SERVICE_OWN_PROPERTIES]
        properties.append(("User", Variant("s", IPC_PROBE_USER)))
        return _with_ipc(probes, self._sandbox, lambda label: ipc_lifecycle(
            self.service.machine, on_machine(self.service.machine, properties, purpose="probe-ipc"),
            f"{label} (a unit of its own, user {IPC_PROBE_USER})"))

    def _sandbox(self, probes: Sequence[Probe]) -> Batch:
        label = f"in the sandbox of {self.service.unit}"
        directives = effective_hardening(self.service.under_test.own_directives(), self.service.spec.hardening)
        no_exec = [p for d in directives if d.name == "NoExecPaths" for p in _paths(d)]
        exec_paths = [p for d in directives if d.name == "ExecPaths" for p in _paths(d)]
        try:  # the probe program must run under the spec's exec policy (NoExecPaths=/ with ExecPaths=/usr/lib)
            interpreter = probe_interpreter(self.service.machine, no_exec, exec_paths)
        except ProbeProgramError as exc:
            return Batch(label, {probe: ProbeResult.missing(probe, str(exc)) for probe in unique(probes)})
        return run_batch(lambda argv, stdin: self.service.inside(list(argv), timeout=120, stdin=stdin), probes,
                         label, interpreter)

    def machine(self, probes: Sequence[Probe]) -> Batch:
        run = on_machine(self.service.machine, purpose="probe-control")
        return _with_ipc(probes, lambda rest: run_batch(run, rest, "on the machine without hardening"),
                         lambda label: ipc_lifecycle(self.service.machine, run, label))

    def as_user(self, probes: Sequence[Probe], user: str | None, directives: Sequence[Directive]) -> Batch:
        properties: list[Property] = [p for d in directives for p in d.properties()]
        if user is not None and not any(d.name in ("User", "DynamicUser") for d in directives):
            properties.append(("User", Variant("s", user)))
        if any(d.name == "DynamicUser" for d in directives) and not any(d.name == "User" for d in directives):
            properties.append(("User", Variant("s", user or "harden-probe-solo")))
        label = f"as {user or 'root'}" + (f" with only {', '.join(d.name for d in directives)}" if directives else "")
        run = on_machine(self.service.machine, properties, purpose="probe-solo")
        return _with_ipc(probes, lambda rest: run_batch(run, rest, label),
                         lambda label: ipc_lifecycle(self.service.machine, run, label))


def verify_service(service: HardenedService, denials: Sequence[Denial] | None = None,
                   skip: Sequence[str] | None = None) -> Report:
    """Plan and verify a started service's spec (its directives and its ``deny:`` list) on its machine."""
    host = ServiceHost(service)
    own = service.under_test.own_directives()
    return verify(host, plan(service.spec, host.facts(), denials, skip, own), service.spec.path.name)


def check_denials(service: HardenedService, denials: Sequence[Denial]) -> list[Verdict]:
    """Verdicts for ``denials`` only (what :meth:`HardenedService.assert_denied` asks)."""
    host = ServiceHost(service)
    plan_ = plan(service.spec, host.facts(), denials, skip=[d.name for d in service.spec.hardening])
    report = verify(host, plan_, service.spec.path.name)
    return [report[subject.name] for subject in plan_.subjects]

