"""Over-hardening diagnosis: which directive broke a scenario, and the smallest relaxation that fixes it.

The search needs only an oracle - "does the scenario pass under this hardening?" - so it is plain logic, tested
with fakes; :func:`machine_trial` is the oracle that restarts the real service and reruns the real scenario.

1. Control: without the hardening the scenario must pass, else it is not a hardening problem.
2. Culprits: delta debugging (Zeller's ddmin) over the spec's *restricting* directives finds a 1-minimal set whose
   removal makes the scenario pass. Directives that grant or configure (ReadWritePaths=, StateDirectory=, User=,
   SystemCallErrorNumber=, ...) are never removed: removing them would tighten or change the unit, not relax it.
3. Refinement: for each culprit, relaxations from smallest to largest are tried, and the first that passes is the
   answer: which syscall group and syscall to allow, which address family or capability or namespace type to add,
   which path needs ReadWritePaths= (or StateDirectory=/CacheDirectory=/...), a weaker value of the directive,
   and only as a last resort dropping the directive.
4. Every suggestion is verified: the scenario passes under the spec with exactly that change.
Every hardening tried is cached, and the number of reruns is bounded.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from ..errors import HardenError
from ..kernel.flags import CAPABILITIES, NAMESPACE_FLAGS
from ..kernel.seccomp import kernel_syscalls
from ..kernel.syscall_numbers import native_syscalls
from ..spec.directives import BOOL, Directive, lookup, render_assignments
from ..spec.unit_file import accumulates, located

Hardening = tuple[Directive, ...]
T = TypeVar("T")

# Directives whose removal can only relax the sandbox. Anything else (paths granted, directories created, the
# user, errno modifiers, environment) is kept as the user wrote it.
RESTRICTING = frozenset({
    "DynamicUser", "NoNewPrivileges", "PrivateTmp", "PrivateDevices", "PrivateNetwork", "PrivateUsers",
    "PrivateMounts", "PrivateIPC", "ProtectSystem", "ProtectHome", "ProtectKernelTunables", "ProtectKernelModules",
    "ProtectKernelLogs", "ProtectClock", "ProtectControlGroups", "ProtectHostname", "ProtectProc", "ProcSubset",
    "MemoryDenyWriteExecute", "RestrictRealtime", "RestrictSUIDSGID", "LockPersonality", "RemoveIPC",
    "RestrictNamespaces", "RestrictAddressFamilies", "RestrictFileSystems", "SystemCallFilter",
    "SystemCallArchitectures", "CapabilityBoundingSet", "ReadOnlyPaths", "InaccessiblePaths", "NoExecPaths",
    "TemporaryFileSystem", "IPAddressDeny", "SocketBindDeny", "DevicePolicy", "UMask", "KeyringMode",
    "MemoryMax", "MemoryHigh", "TasksMax", *(f"Limit{n}" for n in ("CPU", "FSIZE", "DATA", "STACK", "CORE", "RSS",
                                                                  "NOFILE", "AS", "NPROC", "MEMLOCK", "LOCKS",
                                                                  "SIGPENDING", "MSGQUEUE", "NICE", "RTPRIO",
                                                                  "RTTIME")),
})

# Weaker values to try before dropping a directive, strongest first.
VALUE_LADDERS: dict[str, tuple[str, ...]] = {
    "ProtectSystem": ("strict", "full", "yes"),
    "ProtectHome": ("yes", "tmpfs", "read-only"),
    "ProtectProc": ("noaccess", "invisible", "ptraceable"),
    "UMask": ("0077", "0027", "0022"),
}

# DynamicUser=yes implies these (systemd.exec): relaxing them needs DynamicUser= relaxed too, or a path grant.
IMPLIED_BY_DYNAMIC_USER = ("ProtectSystem=strict", "ProtectHome=read-only", "PrivateTmp=yes", "RemoveIPC=yes",
                           "NoNewPrivileges=yes", "RestrictSUIDSGID=yes")

# systemd.exec, NoNewPrivileges=: a process without CAP_SYS_ADMIN (a service with a User= of its own) gets it
# whatever NoNewPrivileges= says when any of these is on, since they install seccomp filters (systemd 247 and later:
# every release this plugin boots); DynamicUser=yes always sets it. Under it setuid and file capabilities are
# ignored: sudo says "effective uid is not 0", ping cannot open its socket.
IMPLIES_NO_NEW_PRIVILEGES = frozenset({
    "SystemCallFilter", "SystemCallArchitectures", "SystemCallLog", "RestrictAddressFamilies", "RestrictNamespaces",
    "PrivateDevices", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectClock",
    "ProtectHostname", "MemoryDenyWriteExecute", "RestrictRealtime", "RestrictSUIDSGID", "LockPersonality",
})

ADDRESS_FAMILIES = ("AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET", "AF_ALG", "AF_VSOCK", "AF_KEY",
                    "AF_BLUETOOTH", "AF_CAN", "AF_XDP", "AF_TIPC", "AF_QIPCRTR")

# Per-service directories systemd creates and grants to the unit (even with DynamicUser=): the idiomatic way to
# let a hardened service write under these trees.
SERVICE_DIRECTORIES = (("/var/lib/", "StateDirectory"), ("/var/cache/", "CacheDirectory"),
                       ("/var/log/", "LogsDirectory"), ("/run/", "RuntimeDirectory"),
                       ("/etc/", "ConfigurationDirectory"))

_PATH_RE = re.compile(r"(/(?:[\w.+@:-]+/?)+)")
_DENIAL_WORDS = ("Read-only file system", "Permission denied", "Operation not permitted", "No such file or directory",
                 "EROFS", "EACCES", "EPERM", "ENOENT")


class BudgetExceeded(Exception):
    """The rerun or time budget ran out; the diagnosis reports what it found so far."""


@dataclass(frozen=True)
class TrialResult:
    passed: bool
    summary: str = ""
    evidence: str = ""  # the failure's output and journal, where refinements look for denied paths
    after_restart: bool = False  # it passed at the first start and failed when the service was restarted


Trial = Callable[[Hardening], TrialResult]


def hardening_key(hardening: Iterable[Directive]) -> tuple[str, ...]:
    """Order-insensitive identity of a hardening (directive order in a spec does not change its meaning)."""
    return tuple(sorted(line for directive in hardening for line in directive.unit_lines()))


class Oracle:
    """Runs trials with a cache and a budget of reruns and seconds."""

    def __init__(self, trial: Trial, *, max_runs: int = 60, max_seconds: float = 300.0) -> None:
        self._trial = trial
        self.max_runs = max_runs
        self.deadline = time.monotonic() + max_seconds
        self.cache: dict[tuple[str, ...], TrialResult] = {}
        self.runs = 0

    def result(self, hardening: Sequence[Directive]) -> TrialResult:
        key = hardening_key(hardening)
        if key not in self.cache:
            if self.runs >= self.max_runs:
                raise BudgetExceeded(f"the budget of {self.max_runs} reruns is spent (raise it with "
                                     "--harden-diagnose-runs)")
            if time.monotonic() > self.deadline:
                raise BudgetExceeded("the time budget for diagnosis is spent (raise it with "
                                     "--harden-diagnose-seconds)")
            self.runs += 1
            self.cache[key] = self._trial(tuple(hardening))
        return self.cache[key]

    def passes(self, hardening: Sequence[Directive]) -> bool:
        return self.result(hardening).passed


def ddmin(items: Sequence[T], interesting: Callable[[list[T]], bool]) -> list[T]:
    """A 1-minimal subset of ``items`` for which ``interesting`` holds (Zeller & Hildebrandt's ddmin).

    ``interesting(list(items))`` is assumed true. One culprit among n costs about 2·log2(n) calls; every
    call's answer should be cached by the caller.
    """
    current = list(items)
    granularity = 2
    while len(current) >= 2:
        size = max(1, len(current) // granularity)
        chunks = [current[i:i + size] for i in range(0, len(current), size)]
        for chunk in chunks:
            if interesting(chunk):
                current, granularity = chunk, 2
                break
        else:
            for chunk in chunks:
                complement = [item for item in current if item not in chunk]
                if len(chunks) > 2 and interesting(complement):
                    current, granularity = complement, max(granularity - 1, 2)
                    break
            else:
                if granularity >= len(current):
                    break
                granularity = min(len(current), granularity * 2)
    return current


# --- relaxations -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Relaxation:
    """A change to a spec's hardening: directives replaced (None: removed) and directives added."""

    description: str
    replace: tuple[tuple[str, Directive | None], ...] = ()
    add: tuple[Directive, ...] = ()
    needs: str = ""  # what the service was found to need, e.g. "mlock (in @memlock)"

    def __post_init__(self) -> None:
        # A replacement left with no assignment (every denied name dropped) is a removal: the spec has no empty
        # form of it ("SystemCallFilter: []" does not load) and the drop-in resets it.
        object.__setattr__(self, "replace", tuple((name, None if new is not None and not any(new.assignments)
                                                   else new) for name, new in self.replace))

    def apply(self, hardening: Sequence[Directive]) -> Hardening:
        replaced = dict(self.replace)
        out: list[Directive] = []
        for directive in hardening:
            if directive.name in replaced:
                new = replaced[directive.name]
                if new is not None:
                    out.append(new)
            else:
                out.append(directive)
        merged = {d.name: d for d in out}
        for directive in self.add:
            if directive.name in merged:  # extend an existing directive of the same name
                old = merged[directive.name]
                out[out.index(old)] = Directive(old.name, old.assignments + directive.assignments, old.line)
            else:
                out.append(directive)
        return tuple(out)

    def changed_names(self) -> list[str]:
        return [name for name, _ in self.replace] + [d.name for d in self.add]

    def dropin(self, hardening: Sequence[Directive]) -> str:
        """A drop-in to paste: each changed directive reset (an empty assignment) and written anew."""
        after = {d.name: d for d in self.apply(hardening)}
        assignments: list[tuple[str, str]] = []
        for name in dict.fromkeys(self.changed_names()):
            if name not in after:
                assignments.append((name, DROPIN_RESETS.get(name, "")))
            elif explicit_default(name) is not None:
                # A single value replaces; an empty one is not a reset.
                assignments.extend((name, value) for value in after[name].assignments)
            else:
                assignments.append((name, ""))  # drop-ins add to list settings; the empty assignment resets first
                assignments.extend((name, value) for value in after[name].assignments)
        return render_assignments(assignments)

    def spec_change(self, hardening: Sequence[Directive], spec_name: str = "the spec") -> str:
        """The same change as it would read in the spec's ``hardening:`` section."""
        after = {d.name: d for d in self.apply(hardening)}
        lines = []
        for name in dict.fromkeys(self.changed_names()):
            before = next((d for d in hardening if d.name == name), None)
            if before is not None and _from_unit(before) and accumulates(name):
                # The spec's hardening is a drop-in that adds to the unit's list: only a reset undoes it.
                lines.append(f"# {name}: the unit's own list ({located(before, spec_name)}) cannot be undone from the "
                             "spec, which adds to it: ship the drop-in")
                continue
            if name in after:
                lines.append(f"{name}: {yaml_value(after[name])}")
            else:
                profile = getattr(before.line, "profile", None) if before else None
                # A directive from the spec's profile is not a line the user can delete: null drops it.
                lines.append(f"{name}: null    # drops it from profile {profile}" if profile
                             else f"{name}: (remove this line)")
        return "\n".join(lines)


def _from_unit(directive: Directive) -> bool:
    """Whether the unit file (or its drop-ins) sets ``directive``, alone or with the spec."""
    return bool(directive.source or getattr(directive, "parts", ()))


def replacing_dropin(own: Sequence[Directive], hardening: Sequence[Directive], header: str = "") -> str:
    """A drop-in that, read after the unit file, puts exactly ``hardening`` in force where the unit's ``own``
    directives were: each own directive that ``hardening`` changes or lacks is reset the way a printed fix resets it
    (a list by an empty assignment, a single value by its new value or systemd's default); the rest is written
    as it is. A diagnosis tries the unit's own directives relaxed with it, in the form its fix is printed."""
    own_by_name = {d.name: d for d in own}
    wanted = {d.name: d for d in hardening}
    assignments: list[tuple[str, str]] = []
    for name in dict.fromkeys([*own_by_name, *wanted]):
        before, after = own_by_name.get(name), wanted.get(name)
        if after is None:
            default = explicit_default(name)
            assignments.append((name, DROPIN_RESETS.get(name, "") if default is None else default))
        elif before is None or not accumulates(name):
            if before is None or before.assignments != after.assignments:
                assignments.extend((name, value) for value in after.assignments)
        elif before.assignments != after.assignments:
            assignments.append((name, ""))
            assignments.extend((name, value) for value in after.assignments)
    return render_assignments(assignments, header)


def yaml_value(directive: Directive) -> str:
    """The directive's value as it would be written in a spec's ``hardening:`` section."""
    if len(directive.assignments) == 1:
        value = directive.assignments[0]
        return '""' if value == "" else (f'"{value}"' if value[:1] in "@~*&!%" or ":" in value else value)
    return "[" + ", ".join(f'"{a}"' for a in directive.assignments) + "]"


# What sets a single-valued directive back to systemd's default, written out: in a drop-in an empty assignment
# does not (systemd ignores an empty boolean, "Failed to parse boolean value, ignoring"), and in the spec the
# explicit value overrides a profile's line too. The relaxation is tried with exactly this value, so the printed
# drop-in is the tested one.
EXPLICIT_DEFAULTS: dict[str, str] = {
    "ProtectSystem": "no", "ProtectHome": "no", "ProtectProc": "default", "ProcSubset": "all",
    "RestrictNamespaces": "no", "UMask": "0022", "DevicePolicy": "auto",
}
# Where an empty assignment means something other than the default: CapabilityBoundingSet= empties the bounding
# set (systemd's config_parse_capability_set), "~" (all but none) is every capability. The spec has no such
# value; there the line is removed.
DROPIN_RESETS: dict[str, str] = {"CapabilityBoundingSet": "~"}


def explicit_default(name: str) -> str | None:
    """The value that sets ``name`` to systemd's default, for single-valued directives; None for lists, where the
    empty assignment resets."""
    if lookup(name).kind is BOOL:
        return "no"
    return EXPLICIT_DEFAULTS.get(name)


def removal(directive: Directive) -> Relaxation:
    """Take ``directive`` back to systemd's default: by its explicit default value where it has one (a boolean's
    ``no``), else by removing it."""
    default = explicit_default(directive.name)
    if default is not None:
        return Relaxation(f"set {directive.name}={default} (systemd's default)",
                          replace=((directive.name, Directive(directive.name, (default,), directive.line)),))
    return Relaxation(f"remove {directive.name}=", replace=((directive.name, None),))


# --- refinement of one culprit -------------------------------------------------------------------------------------

@dataclass
class Context:
    """What refinement may use: the oracle, the spec's hardening, failure evidence and machine facts."""

    oracle: Oracle
    hardening: Hardening
    evidence: str  # the failing command's output and the service's journal
    syscall_groups: Callable[[], dict[str, list[str]]] = dict
    # A traced rerun of the failing check, as evidence lines (denied paths): asked at most once, for a filesystem
    # culprit when the output names no denied path.
    observe: Callable[[], str] | None = None
    observed: bool = False

    def observe_if_silent(self) -> None:
        if self.observe is None or self.observed or paths_in(self.evidence):
            return
        self.observed = True
        lines = self.observe()
        if lines:
            self.evidence = f"{self.evidence}\nobserved rerun (strace):\n{lines}"

    def try_(self, relaxation: Relaxation) -> bool:
        return self.oracle.passes(relaxation.apply(self.hardening))

    def result(self, relaxation: Relaxation) -> TrialResult:
        """The rerun's whole outcome under ``relaxation``: its evidence too (the kernel's records of a kill)."""
        return self.oracle.result(relaxation.apply(self.hardening))


def refine(culprit: Directive, context: Context) -> Relaxation | None:
    """The smallest verified relaxation of ``culprit``, or None if even removing it does not help alone."""
    refiners: dict[str, Callable[[Directive, Context], Relaxation | None]] = {
        "SystemCallFilter": _refine_syscall_filter,
        "RestrictAddressFamilies": _refine_families,
        "CapabilityBoundingSet": _refine_capabilities,
        "RestrictNamespaces": _refine_namespaces,
        "IPAddressDeny": _refine_ip_deny,
        "SystemCallArchitectures": _refine_architectures,
    }
    specific = refiners.get(culprit.name)
    if specific is not None:
        found = specific(culprit, context)
        if found is not None:
            return found
    if culprit.name in PATH_DIRECTIVES:
        context.observe_if_silent()
        found = _refine_paths(culprit, context)
        if found is not None:
            return found
    # No grant fits: a weaker value, then removal. What the service needed is still said, from the evidence.
    needs = _evidence_needs(culprit, context)
    for value in _weaker_values(culprit):
        candidate = Relaxation(f"weaken {culprit.name}={culprit.value} to {culprit.name}={value}",
                               replace=((culprit.name, Directive(culprit.name, (value,), culprit.line)),),
                               needs=needs)
        if context.try_(candidate):
            return candidate
    candidate = removal(culprit)
    return replace(candidate, needs=needs) if context.try_(candidate) else None


# Filesystem directives a path grant can relax instead.
PATH_DIRECTIVES = ("ProtectSystem", "ProtectHome", "ReadOnlyPaths", "InaccessiblePaths", "DynamicUser",
                   "TemporaryFileSystem", "PrivateTmp", "NoExecPaths", "PrivateDevices")
# The trees a directive hides (a file there is brought back with a bind), as opposed to making them read-only.
HIDDEN_TREES: dict[str, tuple[str, ...]] = {
    "PrivateTmp": ("/tmp/", "/var/tmp/"), "ProtectHome": ("/home/", "/root/", "/run/user/"),
    "InaccessiblePaths": ("/",), "TemporaryFileSystem": ("/",),
}
_WRITE_DENIALS = ("Read-only file system", "EROFS")
FILESYSTEM_TOPS = frozenset({"etc", "var", "usr", "srv", "opt", "home", "root", "run", "tmp", "dev", "mnt", "media",
                             "boot", "lib", "data"})


def _evidence_needs(culprit: Directive, context: Context) -> str:
    """What the failure's output says the service was denied, for a culprit relaxed without a grant."""
    if culprit.name in PATH_DIRECTIVES:
        # Only filesystem paths: a URL path in a request log line ("GET /admin/export ... Permission denied") is not.
        denied = [p for p in paths_in(context.evidence, ancestors=False) if p.split("/")[1] in FILESYSTEM_TOPS]
        if denied:
            return f"access to {', '.join(denied[:3])} (denied in the failure's output)"
    return ""


def _weaker_values(culprit: Directive) -> list[str]:
    ladder = VALUE_LADDERS.get(culprit.name, ())
    if culprit.value in ladder:
        return list(ladder[ladder.index(culprit.value) + 1:])
    if culprit.name == "ProcSubset" and culprit.value == "pid":
        return ["all"]
    return []


def _names(assignments: Iterable[str], deny: bool) -> list[str]:
    return [name for a in assignments if a.startswith("~") == deny for name in a.lstrip("~").split()]


def _filters_denying(hardening: Sequence[Directive], syscalls: Sequence[str],
                     syscall_groups: Callable[[], dict[str, list[str]]]) -> list[Directive]:
    """The SystemCallFilter= lines of ``hardening`` that deny one of ``syscalls``: a deny list holding it, or an
    allow list without it."""
    if not syscalls:
        return []
    groups = syscall_groups()
    found = []
    for directive in hardening:
        if directive.name != "SystemCallFilter":
            continue
        denied = {s for name in _names(directive.assignments, deny=True) for s in expand_group(name, groups)}
        allowed = _names(directive.assignments, deny=False)
        allowed_calls = {s for name in allowed for s in expand_group(name, groups)}
        if any(s in denied or (allowed and s not in allowed_calls) for s in syscalls):
            found.append(directive)
    return found


def expand_group(name: str, groups: dict[str, list[str]]) -> list[str]:
    """The syscalls of ``@group`` (nested groups expanded); a plain syscall name expands to itself."""
    if not name.startswith("@"):
        return [name]
    seen: list[str] = []
    for member in groups.get(name, []):
        for syscall in expand_group(member, groups):
            if syscall not in seen:
                seen.append(syscall)
    return seen


def _with_denies(directive: Directive, dropped: set[str], added: Sequence[str] = ()) -> Directive:
    """``directive`` (SystemCallFilter-like) with ``dropped`` names taken out of its deny lists, ``added`` denied."""
    assignments = []
    for assignment in directive.assignments:
        if assignment.startswith("~"):
            kept = [name for name in assignment[1:].split() if name not in dropped]
            if kept:
                assignments.append("~" + " ".join(kept))
        else:
            assignments.append(assignment)
    if added:
        assignments.append("~" + " ".join(added))
    return Directive(directive.name, tuple(assignments), directive.line)


# Denying a group this large and re-allowing a few syscalls is tighter than dropping the group from the deny list.
LARGE_GROUP = 12


def _refine_syscall_filter(culprit: Directive, context: Context) -> Relaxation | None:
    denied = _names(culprit.assignments, deny=True)
    groups = context.syscall_groups()

    def dropping(names: Sequence[str]) -> Relaxation:
        return Relaxation(f"stop denying {', '.join(names)} in SystemCallFilter=",
                          replace=((culprit.name, _with_denies(culprit, set(names))),))

    def allowing(names: Sequence[str], description: str) -> Relaxation:
        return Relaxation(description, replace=((culprit.name, Directive(
            culprit.name, (*culprit.assignments, " ".join(names)), culprit.line)),))

    # The kernel's records name the call: the denied names holding it are tried first, and the call alone.
    named = kernel_syscalls(context.evidence)
    hits = [n for n in denied if set(named) & set(expand_group(n, groups))]
    names: list[str] = []
    if hits and context.try_(dropping(hits)):
        names = hits if len(hits) == 1 else ddmin(hits, lambda subset: context.try_(dropping(subset)))
    elif denied and context.try_(dropping(denied)):
        names = ddmin(denied, lambda subset: context.try_(dropping(subset)))
    if names:
        needed = _named_syscalls(culprit, names, named, groups, context) or \
            _needed_syscalls(culprit, names, groups, context, named)
        needs = _needs_text(needed, names)
        if needed and any(len(expand_group(name, groups)) > LARGE_GROUP for name in names):
            for subgroup in _smallest_groups_containing(needed, names, groups):
                candidate = allowing([subgroup], f"re-allow {subgroup} after the deny list of SystemCallFilter=")
                if context.try_(candidate):
                    return Relaxation(candidate.description, candidate.replace, needs=needs)
            candidate = allowing(needed, f"re-allow {', '.join(needed)} after the deny list of SystemCallFilter=")
            if context.try_(candidate):
                return Relaxation(candidate.description, candidate.replace, needs=needs)
        relaxation = dropping(names)
        return Relaxation(relaxation.description, relaxation.replace, needs=needs)
    allowed = _names(culprit.assignments, deny=False)
    if not allowed or not groups:
        return None
    # An allow list lacks something: find the groups to add, then the syscalls within them.
    candidates = [g for g in groups if g not in allowed and g not in ("@known", "@default")]

    def adding(names: Sequence[str]) -> Relaxation:
        return allowing(names, f"also allow {', '.join(names)} in SystemCallFilter=")

    # The smallest group holding what the kernel named, tried before the search over every group.
    for group in sorted((g for g in candidates if set(named) & set(expand_group(g, groups))),
                        key=lambda g: len(expand_group(g, groups))):
        if context.try_(adding([group])):
            found = [s for s in named if s in expand_group(group, groups)]
            relaxation = adding([group])
            return Relaxation(relaxation.description, relaxation.replace, needs=_needs_text(found, [group]))
    if not candidates or not context.try_(adding(candidates)):
        return None
    needed_groups = ddmin(candidates, lambda subset: context.try_(adding(subset)))
    syscalls = [s for g in needed_groups for s in expand_group(g, groups)]
    try:
        needed = ddmin(syscalls, lambda subset: context.try_(adding(subset))) \
            if syscalls and context.try_(adding(syscalls)) else []
    except BudgetExceeded:
        needed = []
    relaxation = adding(needed_groups)
    return Relaxation(relaxation.description, relaxation.replace, needs=_needs_text(needed, needed_groups))


def _needs_text(syscalls: Sequence[str], groups: Sequence[str]) -> str:
    """E.g. "mlock (in @memlock)"; just the groups when the syscalls are unknown."""
    group_names = [g for g in groups if g.startswith("@")]
    if syscalls and group_names:
        return f"{', '.join(syscalls)} (in {', '.join(group_names)})"
    return ", ".join(syscalls or groups)


def _smallest_groups_containing(syscalls: Sequence[str], within: Sequence[str],
                                groups: dict[str, list[str]]) -> list[str]:
    """Groups inside the denied ``within`` groups that hold all ``syscalls``, smallest first (e.g. @chown)."""
    denied = {s for name in within for s in expand_group(name, groups)}
    fitting = []
    for name in groups:
        members = set(expand_group(name, groups))
        if name not in within and set(syscalls) <= members <= denied:
            fitting.append((len(members), name))
    return [name for _size, name in sorted(fitting)]


def _denying_only(culprit: Directive, names: Sequence[str], denied: Sequence[str]) -> Relaxation:
    """``culprit`` with the deny-list entries ``names`` (groups) replaced by just the calls ``denied``: the rest of
    those groups re-allowed, to see which calls the service needs."""
    return Relaxation("", replace=((culprit.name, _with_denies(culprit, set(names), denied)),))


def _named_syscalls(culprit: Directive, names: Sequence[str], named: Sequence[str], groups: dict[str, list[str]],
                    context: Context) -> list[str]:
    """The kernel-named syscalls within the denied ``names``, if re-allowing just them (the rest of the groups
    still denied) passes. A rerun that fails again is killed at the next call the service makes, and the kernel
    names that one: it is added, and so on, one rerun per call the service needs (memcached dropping root:
    setgroups, then setgid, then setuid) instead of a search over the group. [] when the records stop naming."""
    syscalls = [s for name in names for s in expand_group(name, groups)]
    needed = [s for s in dict.fromkeys(named) if s in syscalls]
    if not needed or len(syscalls) == len(needed):
        return needed
    while len(needed) < len(syscalls):
        rest = [s for s in syscalls if s not in needed]
        result = context.result(_denying_only(culprit, names, rest))
        if result.passed:
            return needed
        more = [s for s in dict.fromkeys(kernel_syscalls(result.evidence)) if s in rest]
        if not more:
            return []
        needed += more
    return needed


def _needed_syscalls(culprit: Directive, names: Sequence[str], groups: dict[str, list[str]],
                     context: Context, named: Sequence[str] = ()) -> list[str]:
    """Which syscalls of the denied ``names`` the service really calls: deny the rest and see (costs reruns).

    Searched are only the calls a native process can make (a group lists every architecture's: ``setuid32`` is
    i386's, and stays denied), and those the kernel's records name are taken as needed from the start: what is
    left to search is the rest (on memcached's ``~@setuid``: 6 calls, not 14)."""
    syscalls = [s for name in names for s in expand_group(name, groups)]
    if not syscalls or syscalls == list(names):
        return list(names) if all(not n.startswith("@") for n in names) else []
    native = native_syscalls()
    searched = [s for s in syscalls if native is None or s in native] or syscalls
    seed = [s for s in dict.fromkeys(named) if s in searched]

    def allowing(subset: Sequence[str]) -> bool:
        allowed = {*seed, *subset}
        rest = [s for s in syscalls if s not in allowed]
        return context.try_(_denying_only(culprit, names, rest))

    others = [s for s in searched if s not in seed]
    try:
        if not allowing(others):
            return []
        return [*seed, *ddmin(others, allowing)] if others else seed
    except BudgetExceeded:
        return []


def _refine_list_grant(culprit: Directive, context: Context, universe: Sequence[str], what: str,
                       make: Callable[[Sequence[str]], Directive]) -> Relaxation | None:
    """For allow-list directives: the fewest extra names that make the scenario pass."""
    denied = _names(culprit.assignments, deny=True)
    if denied:
        def dropping(names: Sequence[str]) -> Relaxation:
            return Relaxation(f"stop denying {', '.join(names)} in {culprit.name}=",
                              replace=((culprit.name, _with_denies(culprit, set(names))),), needs=", ".join(names))
        if context.try_(dropping(denied)):
            return dropping(ddmin(denied, lambda s: context.try_(dropping(s))))
        return None
    allowed = set(_names(culprit.assignments, deny=False))
    candidates = [name for name in universe if name not in allowed]

    def adding(names: Sequence[str]) -> Relaxation:
        return Relaxation(f"also allow {', '.join(names)} in {culprit.name}=", replace=((culprit.name, make(names)),),
                          needs=f"{what} {', '.join(names)}")
    if not candidates or not context.try_(adding(candidates)):
        return None
    return adding(ddmin(candidates, lambda s: context.try_(adding(s))))


def _refine_families(culprit: Directive, context: Context) -> Relaxation | None:
    # Families added to an allow list read best as one line; two allow lines mean the same to systemd (and a
    # family the unit and the spec both allow is written once).
    return _refine_list_grant(culprit, context, ADDRESS_FAMILIES, "address family",
                              lambda names: Directive(culprit.name, (" ".join(dict.fromkeys(
                                  [*culprit.value.split(), *names])),), culprit.line))


def _refine_capabilities(culprit: Directive, context: Context) -> Relaxation | None:
    current = list(dict.fromkeys(culprit.value.split()))

    def make(names: Sequence[str]) -> Directive:
        return Directive(culprit.name, (" ".join([*current, *names]),), culprit.line)
    return _refine_list_grant(culprit, context, CAPABILITIES, "capability", make)


def _refine_namespaces(culprit: Directive, context: Context) -> Relaxation | None:
    if culprit.value != "yes" and culprit.value.startswith("~"):
        return None  # a deny list: removal is the only relaxation left

    current = [] if culprit.value == "yes" else culprit.value.split()

    def make(names: Sequence[str]) -> Directive:
        return Directive(culprit.name, (" ".join([*current, *names]),), culprit.line)
    return _refine_list_grant(culprit, context, list(NAMESPACE_FLAGS), "namespace type", make)


def _refine_ip_deny(culprit: Directive, context: Context) -> Relaxation | None:
    allows = [p for p in ("localhost", "link-local", "multicast")]

    def adding(names: Sequence[str]) -> Relaxation:
        return Relaxation(f"allow {', '.join(names)} with IPAddressAllow=",
                          add=(Directive("IPAddressAllow", (" ".join(names),)),), needs=f"addresses {', '.join(names)}")
    if context.try_(adding(allows)):
        return adding(ddmin(allows, lambda s: context.try_(adding(s))))
    return None


def paths_in(evidence: str, *, ancestors: bool = True, writes: bool = False) -> list[str]:
    """Absolute paths named in lines that report a denial, deepest first, with their ancestors after them (unless
    ``ancestors`` is false); with ``writes``, only lines that report a write refused (a read-only file system)."""
    found: list[str] = []
    for line in evidence.splitlines():
        if not any(word in line for word in (_WRITE_DENIALS if writes else _DENIAL_WORDS)):
            continue
        for match in _PATH_RE.findall(line):
            path = match.rstrip("/:")
            if path.count("/") < 2 or path.startswith(("/usr/lib/python", "/proc/self")):
                continue
            parts = path.split("/")
            for depth in range(len(parts), 2 if ancestors else len(parts) - 1, -1):
                candidate = "/".join(parts[:depth])
                if candidate not in found:
                    found.append(candidate)
    return found


def _refine_paths(culprit: Directive, context: Context) -> Relaxation | None:
    """Grant the one path the service needs, rather than weakening or dropping a filesystem directive.

    A device hidden by PrivateDevices= is bound in and allowed (BindPaths= + DeviceAllow=); a file hidden by
    PrivateTmp=, ProtectHome=, InaccessiblePaths= or TemporaryFileSystem= is bound in (BindReadOnlyPaths=, or
    BindPaths= for a write; under ProtectHome=yes with ProtectHome=tmpfs, since systemd 252 shows no bind inside
    an inaccessible /home). A path made read-only gets a per-service directory (StateDirectory= and friends, the
    idiomatic grant and the only one that works with DynamicUser=), tried for every path first; then
    ReadWritePaths=, deepest path first.
    """
    if culprit.name == "PrivateDevices":
        return _grant_device(context)
    if culprit.name in HIDDEN_TREES:
        return _bind_hidden_file(culprit, context)
    paths = paths_in(context.evidence)
    # A service directory is a directory: a denied path named like a file (/var/log/app.log, /etc/app.conf) is
    # granted itself or through its directory, never made a directory of that name.
    files = {path for path in paths_in(context.evidence, ancestors=False) if "." in path.rsplit("/", 1)[1][1:]}
    for path in paths:
        for prefix, directory_directive in SERVICE_DIRECTORIES:
            if path.startswith(prefix) and path.count("/") == prefix.count("/") and path not in files:
                name = path[len(prefix):]
                candidate = Relaxation(f"let systemd create and grant {path} with {directory_directive}={name}",
                                       add=(Directive(directory_directive, (name,)),), needs=f"write access to {path}")
                if context.try_(candidate):
                    return candidate
    for path in paths:
        grant = "ReadWritePaths" if culprit.name not in ("InaccessiblePaths",) else "BindReadOnlyPaths"
        candidate = Relaxation(f"grant {path} with {grant}=-{path}", add=(Directive(grant, (f"-{path}",)),),
                               needs=f"access to {path}")
        if context.try_(candidate):
            return candidate
    return None


def _grant_device(context: Context) -> Relaxation | None:
    for device in paths_in(context.evidence, ancestors=False):
        if not device.startswith("/dev/"):
            continue
        candidate = Relaxation(f"bind {device} into the private /dev and allow it: BindPaths={device}, "
                               f"DeviceAllow={device} rw",
                               add=(Directive("BindPaths", (device,)), Directive("DeviceAllow", (f"{device} rw",))),
                               needs=f"device {device}")
        if context.try_(candidate):
            return candidate
    return None


def _bind_hidden_file(culprit: Directive, context: Context) -> Relaxation | None:
    trees = HIDDEN_TREES[culprit.name]
    written = set(paths_in(context.evidence, ancestors=False, writes=True))
    for path in paths_in(context.evidence, ancestors=False):
        if not path.startswith(trees) or path.startswith(("/dev/", "/proc/", "/sys/")):
            continue
        binds = ["BindPaths"] if path in written else ["BindReadOnlyPaths", "BindPaths"]
        for bind in binds:
            access = "read access" if bind == "BindReadOnlyPaths" else "access"
            grant = Directive(bind, (f"-{path}",))
            if culprit.name == "ProtectHome" and culprit.value == "yes":
                candidate = Relaxation(f"show an empty home with ProtectHome=tmpfs and bind {path} into it with "
                                       f"{bind}=-{path}",
                                       replace=((culprit.name, Directive(culprit.name, ("tmpfs",), culprit.line)),),
                                       add=(grant,), needs=f"{access} to {path}")
            else:
                candidate = Relaxation(f"bind {path} into the sandbox with {bind}=-{path}", add=(grant,),
                                       needs=f"{access} to {path}")
            if context.try_(candidate):
                return candidate
    return None


# Architectures a 64-bit x86 service may also need, most common first (systemd.exec, SystemCallArchitectures=).
EXTRA_ARCHITECTURES = ("x86", "x32")


def _refine_architectures(culprit: Directive, context: Context) -> Relaxation | None:
    current = culprit.value.split()
    for arch in EXTRA_ARCHITECTURES:
        if arch in current:
            continue
        candidate = Relaxation(f"also allow {arch} system calls: SystemCallArchitectures={culprit.value} {arch}",
                               replace=((culprit.name, Directive(culprit.name, (f"{culprit.value} {arch}",),
                                                                 culprit.line)),),
                               needs=f"{arch} system calls ({'32-bit' if arch == 'x86' else 'x32 ABI'})")
        if context.try_(candidate):
            return candidate
    return None


# --- implied settings ----------------------------------------------------------------------------------------------

def _is_on(directive: Directive) -> bool:
    default = explicit_default(directive.name)
    return any(directive.assignments) and directive.value != default


def runs_unprivileged(hardening: Sequence[Directive]) -> bool:
    """Whether the service runs without CAP_SYS_ADMIN, as systemd decides NoNewPrivileges= implications: a User=
    other than root, or DynamicUser=yes."""
    by_name = {d.name: d for d in hardening}
    user = by_name.get("User")
    dynamic = by_name.get("DynamicUser")
    return (user is not None and user.value not in ("root", "0")) or (dynamic is not None and dynamic.value == "yes")


def no_new_privileges_sources(hardening: Sequence[Directive], unprivileged: bool | None = None) -> list[Directive]:
    """The directives of ``hardening`` that put NoNewPrivileges= in force, explicit or implied (see
    IMPLIES_NO_NEW_PRIVILEGES); ``unprivileged`` defaults to :func:`runs_unprivileged`."""
    if unprivileged is None:
        unprivileged = runs_unprivileged(hardening)
    found = []
    for directive in hardening:
        if not _is_on(directive):
            continue
        if directive.name in ("NoNewPrivileges", "DynamicUser") or \
                (unprivileged and directive.name in IMPLIES_NO_NEW_PRIVILEGES):
            found.append(directive)
    return found


def _implied_culprit(group: Sequence[Directive], others_removed: Hardening, oracle: Oracle) -> bool:
    """Whether ``group`` (the sources of NoNewPrivileges=) breaks the check through what its members share - the
    implied NoNewPrivileges= - rather than through one member's own effect: true when each of two members alone
    (the rest of the group removed) still fails. Two reruns."""
    implying = [d for d in group if d.name != "NoNewPrivileges"]
    if len(implying) < 2:
        return False
    for kept in implying[:2]:
        if oracle.passes(tuple(d for d in others_removed if d not in group or d is kept)):
            return False
    return True


def _implied_relaxation(group: Sequence[Directive], unprivileged: bool) -> Relaxation:
    named = ", ".join(f"{d.name}=" for d in group if d.name != "NoNewPrivileges")
    replace: list[tuple[str, Directive | None]] = [
        (d.name, removal(d).replace[0][1]) for d in group if d.name != "NoNewPrivileges"]
    explicit = next((d for d in group if d.name == "NoNewPrivileges"), None)
    off = Directive("NoNewPrivileges", ("no",), explicit.line if explicit else None)
    if explicit is not None:
        replace.insert(0, ("NoNewPrivileges", off))
    why = "for a service that runs as a User= of its own" if unprivileged else "always"
    return Relaxation(f"NoNewPrivileges= is in force, implied by {named} ({why}): set NoNewPrivileges=no and "
                      f"turn off every directive that implies it", replace=tuple(replace),
                      # Written out even where the spec never set it: the unit itself may say NoNewPrivileges=yes.
                      add=() if explicit else (off,),
                      needs="privileges gained through a setuid or file-capability program (NoNewPrivileges= off)")


# --- the whole diagnosis -------------------------------------------------------------------------------------------

@dataclass
class Finding:
    culprit: Directive
    relaxation: Relaxation | None
    # For an implied setting (NoNewPrivileges=yes that the spec may not even write): the directives that imply it.
    implied_by: tuple[Directive, ...] = ()


@dataclass
class Diagnosis:
    """The outcome, ready for a failure report (:meth:`render`) or a JSON report (:meth:`as_dict`)."""

    verdict: str  # "not-hardening", "found", "inconclusive", "budget"
    findings: list[Finding] = field(default_factory=list)
    combined: Relaxation | None = None
    verified: bool = False
    # The printed drop-in itself, written as a file on top of the unit under test, fixes the failing check (None:
    # not tried, e.g. on the host backend, or nothing verified to print).
    dropin_verified: bool | None = None
    dropin_failure: str = ""  # how the printed drop-in's check failed
    dropin_failed_after_restart: bool = False  # ...only when the service was restarted on the fresh machine
    dropin_unchecked: str = ""  # why the check could not be made (no time left, a machine that did not boot)
    runs: int = 0
    seconds: float = 0.0
    note: str = ""
    hardening: Hardening = ()
    spec_name: str = ""
    kernel: list[str] = field(default_factory=list)  # the kernel's seccomp records of the failing check

    def render(self) -> str:
        head = f"diagnosis ({self.runs} reruns, {self.seconds:.1f}s):"
        if self.verdict == "not-hardening":
            return f"{head}\n  fails without hardening too: not a hardening problem. {self.note}".rstrip()
        lines = [head]
        if self.full_note:
            lines.append(f"  {self.full_note}")
        lines += [f"  {line}" for line in self.kernel]
        for finding in self.findings:
            where = f" ({at})" if (at := located(finding.culprit, self.spec_name)) else ""
            lines.append(f"  culprit: {'; '.join(finding.culprit.unit_lines())}{where}")
            if finding.implied_by:
                lines.append("    in force through: " + ", ".join(
                    f"{d.name}={d.value}" + (f" ({at})" if (at := located(d, self.spec_name)) else "")
                    for d in finding.implied_by))
                lines.append("    (systemd turns NoNewPrivileges= on for an unprivileged service whenever one of these "
                             "is set: setting NoNewPrivileges=no alone changes nothing)")
            if finding.relaxation and finding.relaxation.needs:
                lines.append(f"    the service needs: {finding.relaxation.needs}")
            if finding.relaxation:
                lines.append(f"    smallest relaxation: {finding.relaxation.description}")
        if self.combined is not None and self.verified:
            lines.append("  verified: the scenario passes with only this change, and with this drop-in written as a "
                         "file after the spec's on a fresh machine (first start and restart):" if self.dropin_verified
                         else "  verified on the machine the diagnosis ran on only (the drop-in could not be checked "
                         "on a fresh one, above). Drop-in:" if self.dropin_unchecked
                         else "  verified: the scenario passes with only this change. Drop-in:")
            lines += ["    " + line for line in self.combined.dropin(self.hardening).splitlines()]
            lines.append(f"  or in {self.spec_name or 'the spec'} (hardening:):")
            spec_change = self.combined.spec_change(self.hardening, self.spec_name or "the spec")
            lines += ["    " + line for line in spec_change.splitlines()]
        elif self.verdict == "found":
            lines.append("  no relaxation was verified: remove the culprit directive(s) and check again")
        return "\n".join(lines)

    @property
    def full_note(self) -> str:
        """The note, and what failed of the printed drop-in's check, or why it was not made."""
        if self.dropin_unchecked:
            return f"{self.note} The drop-in below could not be checked on a fresh machine: {self.dropin_unchecked}." \
                .strip()
        if self.dropin_verified is not False:
            return self.note
        return (f"{self.note} The spec change passes, but the drop-in below, written as a file after the spec's, does "
                f"not ({self.dropin_failure}).").strip()

    def as_dict(self) -> dict[str, object]:
        return {
            "verdict": self.verdict, "runs": self.runs, "seconds": round(self.seconds, 2), "note": self.full_note,
            "verified": self.verified, "kernel": self.kernel, "dropin_verified": self.dropin_verified,
            "culprits": [{
                "directive": f.culprit.name, "lines": f.culprit.unit_lines(),
                "spec_line": None if _from_unit(f.culprit) else f.culprit.line,
                "where": located(f.culprit, self.spec_name),
                "implied_by": [f"{d.name}={d.value}" for d in f.implied_by],
                "needs": f.relaxation.needs if f.relaxation else None,
                "relaxation": f.relaxation.description if f.relaxation else None,
            } for f in self.findings],
            "dropin": self.combined.dropin(self.hardening) if self.combined and self.verified else None,
            "spec_change": self.combined.spec_change(self.hardening, self.spec_name or "the spec")
            if self.combined and self.verified else None,
        }


def diagnose(hardening: Hardening, trial: Trial, *, evidence: str = "",
             syscall_groups: Callable[[], dict[str, list[str]]] = dict, max_runs: int = 60,
             max_seconds: float = 300.0, spec_name: str = "", previous: Sequence[Diagnosis] = (),
             unprivileged: bool | None = None, observe: Callable[[], str] | None = None,
             check_dropin: Callable[[str], TrialResult] | None = None) -> Diagnosis:
    """Find the directives that break a scenario and the smallest verified relaxation (see the module docstring).

    ``previous`` diagnoses of the same spec are tried first: one cause often breaks several scenarios, and
    confirming a known relaxation costs one rerun instead of a search. ``check_dropin`` reruns the failing check
    with a drop-in text applied literally on top of the unit: the fix is then verified in the form it is printed
    (where that fails, the note says so; the caller says why it may).
    """
    started = time.monotonic()
    oracle = Oracle(trial, max_runs=max_runs, max_seconds=max_seconds)
    diagnosis = Diagnosis("inconclusive", hardening=hardening, spec_name=spec_name)
    try:
        _diagnose(hardening, oracle, evidence, syscall_groups, diagnosis, previous, unprivileged, observe)
    except BudgetExceeded as exc:
        diagnosis.verdict = "budget" if diagnosis.verdict == "inconclusive" else diagnosis.verdict
        diagnosis.note = (diagnosis.note + f" Stopped early: {exc}.").strip()
    if check_dropin is not None and diagnosis.verified and diagnosis.combined is not None:
        try:
            printed = check_dropin(diagnosis.combined.dropin(hardening))
        except (BudgetExceeded, HardenError) as exc:  # no time left, or no machine for it: not checked
            diagnosis.dropin_unchecked = str(exc)
            printed = None
        diagnosis.runs += 1
        diagnosis.dropin_verified = printed.passed if printed is not None else None
        diagnosis.dropin_failure = printed.summary if printed is not None and not printed.passed else ""
        diagnosis.dropin_failed_after_restart = printed is not None and printed.after_restart
    diagnosis.runs = diagnosis.runs + oracle.runs
    diagnosis.seconds = time.monotonic() - started
    return diagnosis


def _diagnose(hardening: Hardening, oracle: Oracle, evidence: str,
              syscall_groups: Callable[[], dict[str, list[str]]], diagnosis: Diagnosis,
              previous: Sequence[Diagnosis], unprivileged: bool | None = None,
              observe: Callable[[], str] | None = None) -> None:
    confirmed = oracle.result(hardening)
    if confirmed.passed:
        diagnosis.note = "the scenario passed when rerun: it is flaky, not (only) over-hardened"
        return
    # The rerun's evidence may hold what the first failure's did not: the kernel's seccomp records.
    evidence = "\n".join(filter(None, [evidence, confirmed.evidence]))
    diagnosis.kernel = [line.strip() for line in evidence.splitlines() if kernel_syscalls(line)]
    diagnosis.kernel = list(dict.fromkeys(diagnosis.kernel))
    # The control keeps what configures the service (StateDirectory=, User=, Environment=, ...): only the
    # restricting directives are hardening, and only they are ever taken away.
    candidates = [d for d in hardening if d.name in RESTRICTING]
    for earlier in previous:
        if earlier.combined is not None and earlier.verified and oracle.passes(earlier.combined.apply(hardening)):
            diagnosis.verdict, diagnosis.verified = "found", True
            diagnosis.findings, diagnosis.combined = earlier.findings, earlier.combined
            diagnosis.note = "the relaxation found for an earlier failure of this spec fixes this one too"
            return
    # The directives that put NoNewPrivileges= in force search as one: a setuid helper breaks while any of them is
    # left, so no single removal passes, and ddmin over them one by one would spend the budget on the obvious.
    unprivileged = runs_unprivileged(hardening) if unprivileged is None else unprivileged
    group = tuple(no_new_privileges_sources(candidates, unprivileged))
    grouped = len(group) > 1

    def passes_without(removed: list[tuple[Directive, ...]]) -> bool:
        gone = {id(d) for unit in removed for d in unit}
        return oracle.passes(tuple(d for d in hardening if id(d) not in gone))

    # The kernel's records name the call a filter killed: the SystemCallFilter= lines that deny it are taken away
    # first. If that passes, the culprits are among them (ddmin when several), and neither the run without any
    # hardening (taking part of it away passed) nor the search over every directive is needed. Not where they are
    # all of what puts NoNewPrivileges= in force: passing might then be NoNewPrivileges= gone, not the call.
    suspects: list[tuple[Directive, ...]] = [
        (d,) for d in _filters_denying(candidates, kernel_syscalls(evidence), syscall_groups)]
    culprit_units: list[tuple[Directive, ...]] = []
    if suspects and (not group or any((d,) not in suspects for d in group)) and passes_without(suspects):
        culprit_units = ddmin(suspects, passes_without) if len(suspects) > 1 else suspects
    else:
        unhardened = oracle.result(tuple(d for d in hardening if d not in candidates))
        if not unhardened.passed:
            diagnosis.verdict = "not-hardening"
            diagnosis.note = f"Without any hardening: {unhardened.summary}" if unhardened.summary else ""
            return
        units = ([group] if grouped else []) + [(d,) for d in candidates if not grouped or d not in group]
        culprit_units = ddmin(units, passes_without)
    context = Context(oracle, hardening, evidence, syscall_groups, observe)
    relaxations: list[Relaxation] = []
    culprits = [d for unit in culprit_units if unit is not group for d in unit]
    base = hardening  # what the other culprits are refined on: with the implied setting relaxed, if it is one
    if grouped and group in culprit_units:
        others_removed = tuple(d for d in hardening if d not in culprits)
        if _implied_culprit(group, others_removed, oracle):
            implied = _implied_relaxation(group, unprivileged)
            explicit = next((d for d in group if d.name == "NoNewPrivileges"), None)
            diagnosis.findings.append(Finding(explicit or Directive("NoNewPrivileges", ("yes",)), implied,
                                              implied_by=tuple(d for d in group if d.name != "NoNewPrivileges")))
            relaxations.append(implied)
            base = implied.apply(hardening)
        else:  # one member's own effect (a syscall the filter denies): find which, one by one
            def passes_without_members(removed: list[Directive]) -> bool:
                return oracle.passes(tuple(d for d in others_removed if d not in group or d not in removed))
            culprits = ddmin(list(group), passes_without_members) + culprits
    diagnosis.verdict = "found"
    if any(c.name == "DynamicUser" for c in culprits):
        diagnosis.note = f"DynamicUser=yes implies {', '.join(IMPLIED_BY_DYNAMIC_USER)}."
    for index, culprit in enumerate(culprits):
        # Refine each culprit with the other culprits already relaxed, so their effects do not mask each other.
        others = [c for c in culprits if c is not culprit]
        context.hardening = tuple(d for d in base if d not in others)
        try:
            relaxation = refine(culprit, context)
        except BudgetExceeded:  # the culprits are known: said, unrefined, with the budget's note
            diagnosis.findings += [Finding(c, None) for c in culprits[index:]]
            raise
        diagnosis.findings.append(Finding(culprit, relaxation))
        relaxations.append(relaxation or removal(culprit))
    combined = Relaxation("; ".join(r.description for r in relaxations),
                          replace=tuple(item for r in relaxations for item in r.replace),
                          add=tuple(item for r in relaxations for item in r.add),
                          needs="; ".join(r.needs for r in relaxations if r.needs))
    diagnosis.combined = combined
    diagnosis.verified = oracle.passes(combined.apply(hardening))
