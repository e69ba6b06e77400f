"""Running a batch of probes as one process on a machine, and what a machine's systemd knows.

A batch is one transient unit: ``/usr/bin/python3 -I -S - '{"probes": ...}'`` with the inside script on stdin.
Where it runs is the caller's choice - in the service's sandbox (:meth:`HardenedService.inside`), unconfined on
the machine, or as the service's user with one directive - so the same probes give comparable results.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..result import CommandResult
from . import inside
from .model import Probe, ProbeResult

INTERPRETER = "/usr/bin/python3"

# Runs an argv with stdin bytes somewhere (a sandbox, the machine) and says how it went.
Run = Callable[[Sequence[str], bytes], CommandResult]


@functools.cache
def inside_script() -> bytes:
    """The standalone script the probes run as (see :mod:`pytest_systemd_harden.probes.inside`)."""
    return Path(__file__).with_name("inside.py").read_bytes()


# The name of the interpreter's copy placed where a spec's exec policy allows execution (see probe_interpreter).
PLACED_INTERPRETER = ".harden-probe-python3"


def batch_argv(probes: Sequence[Probe], *, guard: str | None = None, interpreter: str = INTERPRETER) -> list[str]:
    """The command of a batch; ``guard`` (:data:`~pytest_systemd_harden.probes.inside.GUARD_KERNEL` or ``GUARD_HOST``)
    for a machine that shares the host's kernel or is the host (see :mod:`~pytest_systemd_harden.probes.inside`)."""
    # -I -S: the image's own stdlib only, no site-packages or environment that could change what a probe does.
    request: dict[str, object] = {"probes": [[probe.kind, probe.arg] for probe in probes]}
    if guard is not None:
        request["guard"] = guard
    return [interpreter, "-I", "-S", "-", json.dumps(request)]


def _is_interpreter(program: str) -> bool:
    return program == INTERPRETER or program.rsplit("/", 1)[-1] == PLACED_INTERPRETER


def _longest(path: str, prefixes: Iterable[str]) -> int:
    return max((len(p.rstrip("/")) for p in prefixes
                if path == p or path.startswith(p.rstrip("/") + "/") or p == "/"), default=-1)


def executable_under(path: str, no_exec: Sequence[str], exec_paths: Sequence[str]) -> bool:
    """Whether ``path`` may be executed (or mapped executable) under NoExecPaths=/ExecPaths=: the deepest of their
    mounts covering it decides."""
    deny, allow = _longest(path, no_exec), _longest(path, exec_paths)
    return deny < 0 or allow >= deny


# Where the interpreter maps executable code from, besides itself: the C library and its own extension modules.
INTERPRETER_LIBRARIES = ("/usr/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/aarch64-linux-gnu/libc.so.6")


class ProbeProgramError(RuntimeError):
    """The probe program cannot run under the spec's exec policy, and there is nowhere to place it: the reason."""


def guarded_batch(argv: Sequence[str], guard: str) -> list[str] | None:
    """``argv`` under ``guard`` if it is a probe batch, else None.

    A machine that shares the host's kernel, or is the host, passes every command it runs through this (see
    :meth:`Machine.run <pytest_systemd_harden.machine.backends.base.Machine.run>`), so no caller can run a batch there
    unguarded by forgetting to ask. Only such a machine: this process runs on the kernel the batch will.
    """
    if len(argv) != 5 or not _is_interpreter(argv[0]) or list(argv[1:4]) != ["-I", "-S", "-"]:
        return None
    try:
        request = json.loads(argv[4])
    except ValueError:
        return None
    if not isinstance(request, dict) or "probes" not in request:
        return None
    # Seen from here, whose kernel it is: a sandbox may see neither /proc/net/protocols nor /sys/module.
    loaded = [family for family in inside.FAMILY_MODULES if inside.family_loaded(family)]
    return [*argv[:4], json.dumps({**request, "guard": guard, "loaded_families": loaded})]


def unique(probes: Iterable[Probe]) -> list[Probe]:
    """The probes without repeats, in first-seen order."""
    return list(dict.fromkeys(probes))


@dataclass(frozen=True)
class Batch:
    """The results of one batch, by probe, and how the batch process itself ended."""

    label: str  # where it ran, for messages: "in the sandbox", "on the machine without hardening"
    results: dict[Probe, ProbeResult]
    command: CommandResult | None = field(default=None, compare=False)

    def __getitem__(self, probe: Probe) -> ProbeResult:
        found = self.results.get(probe)
        return found if found is not None else ProbeResult.missing(probe, f"not probed {self.label}")

    def __contains__(self, probe: object) -> bool:
        return probe in self.results


def parse_batch(probes: Sequence[Probe], command: CommandResult, label: str) -> Batch:
    """Results from the batch's JSON lines; a probe without a line gets an error saying how the batch ended."""
    results: dict[Probe, ProbeResult] = {}
    for line in command.stdout.splitlines():
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict):
            result = ProbeResult.from_json(data)
            results[result.probe] = result
    if len(results) < len(probes):
        why = f"the probe process ended before this probe ({command.status_text()})"
        stderr = command.stderr.strip().splitlines()
        if stderr:
            why += f": {stderr[-1]}"
        for probe in probes:
            results.setdefault(probe, ProbeResult.missing(probe, why))
    return Batch(label, results, command)


def run_batch(run: Run, probes: Iterable[Probe], label: str, interpreter: str = INTERPRETER) -> Batch:
    """Run ``probes`` as one process through ``run`` and collect one result per probe."""
    ordered = unique(probes)
    command = run(batch_argv(ordered, interpreter=interpreter), inside_script())
    return parse_batch(ordered, command, label)


# The probe whose result is known only after its unit has stopped (RemoveIPC=): see ipc_lifecycle.
IPC_PROBE = Probe("ipc")


def ipc_lifecycle(run: Run, unconfined: Run, label: str) -> ProbeResult:
    """Whether a POSIX shared memory object made by a unit is removed when the unit stops (RemoveIPC=).

    ``run`` makes the object in a unit of its own, under the directives and user to be judged, and returns when the
    unit is gone; then ``unconfined`` (the machine, as root, no sandbox) looks for the object and removes what is
    left, so the probe leaves nothing behind either way. The result is ``allowed`` with the fact ``removed``."""
    path = f"{inside.SHM_DIRECTORY}/{inside.SCRATCH_PREFIX}ipc-{secrets.token_hex(6)}"
    made = run_batch(run, [Probe("ipc", path)], label)[Probe("ipc", path)]
    # Looked for and removed whatever the unit reported: a unit killed half-way may still have made it.
    looked = unconfined(["/bin/sh", "-c", 'if [ -e "$1" ]; then rm -f -- "$1"; echo left; else echo gone; fi',
                         "sh", path], b"")
    if made.status != "allowed":
        return replace(made, probe=IPC_PROBE)
    if looked.exit_status != 0 or looked.stdout.strip() not in ("left", "gone"):
        return ProbeResult.missing(IPC_PROBE, f"could not look for {path} after the unit stopped: "
                                              f"{looked.status_text()}")
    removed = looked.stdout.strip() == "gone"
    return ProbeResult(IPC_PROBE, "allowed", detail=f"{made.detail}; {'removed' if removed else 'still there'} "
                       "after the unit stopped", facts={"removed": removed, "uid": made.facts.get("uid")})


# --- what the machine's systemd knows -----------------------------------------------------------------------

@dataclass(frozen=True)
class MachineFacts:
    """The machine's systemd: version, compile-time features, and its syscall groups (as this version has them)."""

    version: int
    features: frozenset[str]  # "+SECCOMP", "-BPF_FRAMEWORK", ...
    syscall_groups: dict[str, frozenset[str]] = field(compare=False)
    # Every syscall name it accepts (in a group, or listed as known but in none); empty where it does not say.
    known_syscalls: frozenset[str] = field(default=frozenset(), compare=False)
    # Directive name -> what showed the machine does not enforce it, and why (measured: see sandbox/capabilities.py).
    unenforced: dict[str, str] = field(default_factory=dict, compare=False)
    # The machine's root is root of a user namespace (a user-namespaced container): not root on the host's kernel.
    user_namespaced: bool = field(default=False, compare=False)
    # What the machine's systemd sees of the kernel: its cgroup hierarchy ("cgroup2fs" when unified, "tmpfs" when
    # hybrid or legacy) and the active LSMs (/sys/kernel/security/lsm; "" where securityfs is not mounted).
    cgroup_fs: str = field(default="cgroup2fs", compare=False)
    lsms: str = field(default="", compare=False)

    def lacks(self, feature: str) -> bool:
        return f"-{feature}" in self.features


def parse_groups(text: str) -> dict[str, frozenset[str]]:
    """``systemd-analyze syscall-filter`` output as {"@group": every syscall in it, nested groups resolved}."""
    direct: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("@"):
            current = direct.setdefault(line.strip(), [])
        elif line.startswith((" ", "\t")) and current is not None:
            word = line.strip()
            if word and not word.startswith("#"):
                current.append(word)
        else:
            current = None

    @functools.cache
    def resolve(group: str, seen: tuple[str, ...] = ()) -> frozenset[str]:
        names: set[str] = set()
        for member in direct.get(group, []):
            if member.startswith("@"):
                if member not in seen:
                    names |= resolve(member, (*seen, group))
            else:
                names.add(member)
        return frozenset(names)

    return {group: resolve(group) for group in direct}


def parse_version(text: str) -> tuple[int, frozenset[str]]:
    """``systemctl --version``: (252, {"+SECCOMP", "-BPF_FRAMEWORK", ...})."""
    match = re.search(r"systemd (\d+)", text)
    features = frozenset(word for word in text.split() if word[:1] in "+-" and word[1:].isupper())
    return (int(match.group(1)) if match else 0), features


def parse_known_syscalls(text: str) -> frozenset[str]:
    """Every syscall ``systemd-analyze syscall-filter`` names: those of its groups (@known holds them all since
    systemd 248) and those it lists, commented, as known to the kernel but in no group. Empty if it has no @known."""
    groups = parse_groups(text)
    if "@known" not in groups:
        return frozenset()
    ungrouped = re.findall(r"^#\s+([a-z0-9_]+)\s*$", text, re.MULTILINE)
    return frozenset().union(*groups.values(), ungrouped)


_FACTS: dict[str, MachineFacts] = {}


