"""Tighten: the strictest spec that still passes every scenario, found and verified.

The other direction of the diagnosis, with the same oracle: "does the service start and pass every scenario under
this hardening?". Tightenings from a catalogue are tried one at a time, strongest payoff first, and a step is kept
only if the oracle says yes. A step that fails is not simply dropped: the diagnosis' refinement looks for its
smallest relaxation (an allow list narrowed to what the scenarios need, a path granted), which is kept if it
passes. Every step not taken records the scenario that needed it - the documentation a reviewer wants.

The user's own directives are never removed or loosened; ``keep`` names directives never to touch and ``never``
names directives never to add.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .diagnosis import BudgetExceeded, Context, Hardening, Oracle, Relaxation, Trial, hardening_key, refine
from .directives import Directive, render_dropin


@dataclass(frozen=True)
class Step:
    """One tightening: directives to add (or to set, when the spec has a weaker value)."""

    name: str
    directives: tuple[Directive, ...]
    why: str = ""

    @classmethod
    def of(cls, why: str, **values: object) -> Step:
        directives = tuple(Directive.parse(name, value) for name, value in values.items())
        return cls(" ".join(str(d) for d in directives), directives, why)


# Ordered roughly by what systemd-analyze security weighs most, and so that later steps build on earlier ones
# (ExecPaths= after NoExecPaths=, deny groups after the allow list).
CATALOGUE: tuple[Step, ...] = (
    Step.of("runs as a transient user with no access outside its own directories", DynamicUser=True),
    Step.of("the OS is read-only to the service", ProtectSystem="strict"),
    # ProtectSystem=strict leaves the machine's /run writable once a kernel-facing Protect*= mounts something
    # (systemd 252, seen by the enforcement checks); RuntimeDirectory= still works under it.
    Step.of("/run read-only too", ReadOnlyPaths="/run"),
    Step.of("home directories are hidden", ProtectHome=True),
    Step.of("no capabilities at all (narrowed to those the scenarios need)", CapabilityBoundingSet=""),
    Step.of("no privilege gain through setuid binaries", NoNewPrivileges=True),
    Step.of("only native syscalls", SystemCallArchitectures="native"),
    Step.of("only the syscalls a service needs", SystemCallFilter="@system-service"),
    Step.of("no privileged syscalls", SystemCallFilter="~@privileged"),
    Step.of("no resource-control syscalls", SystemCallFilter="~@resources"),
    # Starts from AF_UNIX alone: the refinement then adds exactly the families the scenarios use.
    Step.of("only the socket families the scenarios use", RestrictAddressFamilies="AF_UNIX"),
    Step.of("no namespaces of its own", RestrictNamespaces=True),
    Step.of("a private /tmp", PrivateTmp=True),
    Step.of("a private /dev without physical devices", PrivateDevices=True),
    Step.of("kernel tunables read-only", ProtectKernelTunables=True),
    Step.of("no kernel module loading", ProtectKernelModules=True),
    Step.of("no kernel log access", ProtectKernelLogs=True),
    Step.of("cgroup tree read-only", ProtectControlGroups=True),
    Step.of("no clock changes", ProtectClock=True),
    Step.of("no hostname changes", ProtectHostname=True),
    Step.of("no personality changes", LockPersonality=True),
    Step.of("no writable and executable memory", MemoryDenyWriteExecute=True),
    Step.of("no realtime scheduling", RestrictRealtime=True),
    Step.of("no setuid/setgid files", RestrictSUIDSGID=True),
    Step.of("IPC objects removed at stop", RemoveIPC=True),
    Step.of("other processes invisible in /proc", ProtectProc="invisible"),
    Step.of("only process entries in /proc", ProcSubset="pid"),
    Step.of("no IP traffic but loopback", IPAddressDeny="any", IPAddressAllow="localhost"),
    Step.of("no network at all but its own loopback", PrivateNetwork=True),
    # Not NoExecPaths=/ with ExecPaths=/usr: on systemd 252 a path listed in either is mounted again writable under
    # ProtectSystem=strict, and NoExecPaths=/ misses PrivateTmp='s own /tmp (see the profiles).
    Step.of("nothing executable where anyone can write", NoExecPaths="/dev/shm /tmp /var/tmp"),
    Step.of("files created private to the service", UMask="0077"),
)

# A spec's value that this step would only loosen is left alone (e.g. ProtectSystem=strict vs the step's strict).
STRENGTH: dict[str, tuple[str, ...]] = {
    "ProtectSystem": ("no", "yes", "full", "strict"),
    "ProtectHome": ("no", "read-only", "tmpfs", "yes"),
    "ProtectProc": ("default", "ptraceable", "invisible", "noaccess"),
    "ProcSubset": ("all", "pid"),
}
# Directives whose further assignments add to a list: a step extends them rather than replacing them.
EXTENDS = frozenset({"SystemCallFilter", "IPAddressAllow", "ExecPaths"})


@dataclass
class StepOutcome:
    step: Step
    kept: str  # "added", "narrowed", "skipped" (the spec already has it or is stronger), "rejected", "excluded"
    detail: str = ""


@dataclass
class Tightening:
    """The result: the tightened hardening, what each step did, and the cost."""

    before: Hardening
    after: Hardening
    outcomes: list[StepOutcome] = field(default_factory=list)
    runs: int = 0
    seconds: float = 0.0
    note: str = ""
    enforcement_checked: bool = False  # every directive of `after` was checked enforced on the machine

    def added(self) -> list[Directive]:
        before = {str(d) for d in self.before}
        return [d for d in self.after if str(d) not in before]

    def dropin(self) -> str:
        return render_dropin(self.after, header="Tightened by pytest-systemd-harden: every scenario passes under it")

    def render(self) -> str:
        lines = [f"tightened in {self.runs} runs, {self.seconds:.1f}s:"]
        for outcome in self.outcomes:
            mark = {"added": "+", "narrowed": "~", "rejected": "-", "skipped": "=", "excluded": "x"}[outcome.kept]
            lines.append(f"  {mark} {outcome.step.name}: {outcome.kept}" + (f" ({outcome.detail})" if outcome.detail
                                                                             else ""))
        if self.note:
            lines.append(f"  {self.note}")
        if self.enforcement_checked:
            lines.append("  every directive of the result was checked enforced on the machine")
        return "\n".join(lines)


def _applies(step: Step, hardening: Hardening, keep: Sequence[str], never: Sequence[str]) -> str:
    """Why a step is not tried ("" when it is): excluded by the user, or the spec already as strict."""
    present = {d.name: d for d in hardening}
    for directive in step.directives:
        if directive.name in never or directive.name in keep:
            return "excluded"
        existing = present.get(directive.name)
        if existing is None or directive.name in EXTENDS and directive.assignments[0] not in existing.assignments:
            continue
        order = STRENGTH.get(directive.name)
        if order and existing.value in order and directive.value in order \
                and order.index(existing.value) < order.index(directive.value):
            continue  # the step strengthens a weaker value the spec has
        return "skipped"
    return ""


def _apply(step: Step, hardening: Hardening) -> Hardening:
    out = list(hardening)
    for directive in step.directives:
        index = next((i for i, d in enumerate(out) if d.name == directive.name), None)
        if index is None:
            out.append(directive)
        elif directive.name in EXTENDS:
            old = out[index]
            added = directive.assignments[0]
            last = old.assignments[-1]
            if directive.name == "SystemCallFilter" and last.startswith("~") and added.startswith("~"):
                # Two deny lines in a row mean one deny list: write them as one.
                out[index] = Directive(old.name, (*old.assignments[:-1], f"{last} {added[1:]}"), old.line)
            else:
                out[index] = Directive(old.name, old.assignments + directive.assignments, old.line)
        else:
            out[index] = Directive(directive.name, directive.assignments, out[index].line)
    return tuple(out)


def tighten(hardening: Hardening, trial: Trial, *, catalogue: Sequence[Step] = CATALOGUE, keep: Sequence[str] = (),
            never: Sequence[str] = (), syscall_groups: Callable[[], dict[str, list[str]]] = dict, max_runs: int = 200,
            max_seconds: float = 900.0) -> Tightening:
    """Add the catalogue's steps one at a time, keeping each only if ``trial`` still passes (see the module)."""
    started = time.monotonic()
    oracle = Oracle(trial, max_runs=max_runs, max_seconds=max_seconds)
    result = Tightening(hardening, hardening)
    current = hardening
    try:
        baseline = oracle.result(current)
        if not baseline.passed:
            result.note = f"the spec as written does not pass ({baseline.summary}): fix that first"
            return result
        for step in catalogue:
            reason = _applies(step, current, keep, never)
            if reason:
                result.outcomes.append(StepOutcome(step, reason))
                continue
            candidate = _apply(step, current)
            attempt = oracle.result(candidate)
            if attempt.passed:
                current = candidate
                result.outcomes.append(StepOutcome(step, "added"))
                continue
            narrowed = _narrow(step, candidate, oracle, attempt.evidence, syscall_groups)
            if narrowed is not None and hardening_key(narrowed.apply(candidate)) != hardening_key(current):
                current = narrowed.apply(candidate)
                result.outcomes.append(StepOutcome(step, "narrowed", narrowed.description))
            else:
                result.outcomes.append(StepOutcome(step, "rejected", attempt.summary))
    except BudgetExceeded as exc:
        result.note = f"stopped early: {exc}"
    finally:
        result.after = current
        result.runs = oracle.runs
        result.seconds = time.monotonic() - started
    return result


def revert(result: Tightening, undoing: Sequence[str], why: str) -> list[Step]:
    """Undo the steps that added any directive named in ``undoing`` (never the user's own); return them."""
    before = {d.name for d in result.before}
    reverted = []
    for outcome in result.outcomes:
        if outcome.kept not in ("added", "narrowed"):
            continue
        added = {d.name for d in outcome.step.directives} - before
        if added & set(undoing):
            outcome.kept, outcome.detail = "rejected", why
            reverted.append(outcome.step)
            result.after = tuple(d for d in result.after if d.name not in added)
    return reverted


def _narrow(step: Step, candidate: Hardening, oracle: Oracle, evidence: str,
            syscall_groups: Callable[[], dict[str, list[str]]]) -> Relaxation | None:
    """The smallest relaxation of a failed step that passes, if it still tightens (not a plain removal)."""
    if len(step.directives) != 1:
        return None
    directive = next(d for d in candidate if d.name == step.directives[0].name)
    relaxation = refine(directive, Context(oracle, candidate, evidence, syscall_groups))
    if relaxation is None or relaxation.description.startswith("remove "):
        return None
    return relaxation
