"""Tighten: the strictest spec that still passes every scenario, found and verified.

The other direction of the diagnosis, with the same oracle: "does the service start and pass every scenario under
this hardening?". Tightenings from a catalogue are tried in order, strongest payoff first, and a step is kept only
if the oracle says yes. A step that fails is not simply dropped: the diagnosis' refinement looks for its
smallest relaxation (an allow list narrowed to what the scenarios need, a path granted), which is kept if it
passes. Every step not taken records the scenario that needed it - the documentation a reviewer wants.

The user's own directives are never removed or loosened; ``keep`` names directives never to touch and ``never``
names directives never to add.

Given an :class:`~pytest_systemd_harden.search.observe.Observation` of one traced run, the search is shortcut: each step
is first tried in the form the observation forecasts to pass (an allow list already holding the families, syscalls
and capabilities used, the directories written already granted); the steps forecast to fit are tried together in
one run, a failing group split in halves down to the failing step (group testing); the steps forecast to conflict
with what the service does come last, one at a time. The forecast only chooses what to try first: a step is kept
only in a run where every scenario passed, and an item the observation added but cannot prove necessary is
confirmed by trying without it. :func:`profile_only` is the same forecast applied without any run - what a
profiling tool would propose from the same observed run.
"""

from __future__ import annotations

import posixpath
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..kernel.flags import CAPABILITIES, NAMESPACE_FLAGS
from ..spec.directives import BOOL, KNOWN, Directive, escape_specifiers, render_dropin
from ..spec.unit_file import effective_hardening
from .diagnosis import (
    BudgetExceeded,
    Context,
    Hardening,
    Oracle,
    Relaxation,
    Trial,
    TrialResult,
    expand_group,
    hardening_key,
    refine,
)
from .observe import CONFLICT, NARROWED, UNKNOWN, Forecast, Observation, filter_adding, filter_allows, forecast


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
    # Root inside is nobody outside: capabilities then act on the service's own namespaces only (binding a port
    # below 1024 on the host's network needs one over the host's), which a scenario that needs them shows.
    Step.of("a user namespace of its own: no capability over the host's resources", PrivateUsers=True),
    Step.of("mounts of its own, none propagated to or from the host", PrivateMounts=True),
    Step.of("System V IPC and POSIX message queues of its own", PrivateIPC=True),
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
# The value a directive has when it is not set (systemd.exec): a step narrowed to it tightens nothing.
DEFAULTS: dict[str, str] = {**{name: order[0] for name, order in STRENGTH.items()}, "UMask": "0022"}
# Directives whose further assignments add to a list: a step extends them rather than replacing them.
EXTENDS = frozenset({"SystemCallFilter", "IPAddressAllow", "ExecPaths"})
# Grants a step may bring along (the directories the service writes): added to the user's own, never replacing it.
GRANTS = frozenset({"StateDirectory", "CacheDirectory", "LogsDirectory", "RuntimeDirectory", "ReadWritePaths"})


@dataclass
class StepOutcome:
    step: Step
    kept: str  # "added", "narrowed", "skipped" (the spec already has it or is stronger), "rejected", "excluded"
    detail: str = ""
    forecast: str = ""  # the observation's verdict (observe.FITS, NARROWED, CONFLICT, UNKNOWN); "" without one
    observed: str = ""  # what the observation saw that made the difference
    first_time: bool = False  # the first form tried passed
    change: tuple[Hardening, Hardening] | None = None  # kept: the hardening before the step and after it (revert())


def instance_as_specifier(dropin: str, instance: str) -> str:
    """``dropin`` with the template instance ``instance`` written ``%i`` in its grants (``StateDirectory=notes-8080``
    becomes ``notes-%i``): where it stands as a word of its own, not inside another (instance ``1`` in ``app1``)."""
    word = re.compile(rf"(?<![A-Za-z0-9]){re.escape(escape_specifiers(instance))}(?![A-Za-z0-9])")
    lines = []
    for line in dropin.splitlines(keepends=True):
        name, equals, value = line.partition("=")
        lines.append(f"{name}={word.sub('%i', value)}" if equals and name in GRANTS else line)
    return "".join(lines)


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
    observation: Observation | None = None
    observe_seconds: float = 0.0
    confirmations: int = 0  # runs spent confirming that an observed item is needed (or dropping it)
    # The drop-in (dropin()), written as a file after the spec's hardening, passed every scenario; None: not tried.
    dropin_verified: bool | None = None
    dropin_failure: str = ""  # what failed, when it did not pass
    dropin_failed_after_restart: bool = False  # ...only when the service was restarted on the fresh machine
    dropin_unchecked: str = ""  # why the check could not be made (no time left, a machine that did not boot)
    # Where it was checked: a machine booted for the check (as a host is after the install), or, where the
    # scenarios need what the test made on the service's machine, that machine.
    dropin_on_fresh_machine: bool = True
    # The instance tested, for a template unit: its drop-in is every instance's, so a grant naming it says %i.
    instance: str = ""

    @property
    def ships(self) -> bool:
        """Whether the result may be printed to ship: its drop-in passed where it was checked, or there was nothing
        to check it on (the host backend). Not when it failed, or its check could not be made."""
        return self.dropin_verified is not False and not self.dropin_unchecked

    @property
    def tried(self) -> list[StepOutcome]:
        """The steps a run was spent on (not skipped or excluded)."""
        return [o for o in self.outcomes if o.kept in ("added", "narrowed", "rejected")]

    def first_time(self) -> int:
        """How many steps passed in the first form tried."""
        return sum(o.first_time for o in self.tried)

    def forecasts_right(self) -> tuple[int, int]:
        """(right, made): a pass forecast that passed first time, or a conflict that did not."""
        made = [o for o in self.tried if o.forecast and o.forecast != UNKNOWN]
        return sum((o.forecast != CONFLICT) == o.first_time for o in made), len(made)

    def added(self) -> list[Directive]:
        before = {str(d) for d in self.before}
        return [d for d in self.after if str(d) not in before]

    def dropin(self) -> str:
        # A drop-in's lines come after the unit's own. Where the result does not begin with the user's own lines (an
        # allow list put before their deny list), the empty assignment first resets those, as in the diagnosis. A
        # value strengthened (ProtectSystem=full to strict) needs none: there the last assignment wins.
        own = {d.name: d.assignments for d in self.before}
        directives = [Directive(d.name, ("", *d.assignments), d.line)
                      if d.name in own and d.name not in STRENGTH and d.assignments[:len(own[d.name])] != own[d.name]
                      else d for d in self.after]
        text = render_dropin(directives, header="Tightened by pytest-systemd-harden: every scenario passes under it")
        return instance_as_specifier(text, self.instance) if self.instance else text

    def render(self) -> str:
        lines = [f"tightened in {self.runs} runs, {self.seconds:.1f}s:"]
        if self.observation is not None:
            lines.append(f"  observed first ({self.observe_seconds:.1f}s, one run): {self.observation.summary()}")
        for outcome in self.outcomes:
            mark = {"added": "+", "narrowed": "~", "rejected": "-", "skipped": "=", "excluded": "x"}[outcome.kept]
            lines.append(f"  {mark} {outcome.step.name}: {outcome.kept}" + (f" ({outcome.detail})" if outcome.detail
                                                                             else ""))
            if outcome.observed and outcome.kept in ("added", "narrowed") and outcome.forecast == CONFLICT:
                lines.append(f"      forecast to conflict, yet every scenario passes: {outcome.observed}")
            elif outcome.observed and outcome.kept in ("added", "narrowed", "rejected"):
                lines.append(f"      observed: {outcome.observed}")
        tried = len(self.tried)
        summary = f"  {self.first_time()} of {tried} steps tried passed at their first run"
        if self.observation is not None:
            right, made = self.forecasts_right()
            summary += f" (with observations; the forecast was right for {right} of {made}"
            summary += f", {self.confirmations} runs confirmed observed items)" if self.confirmations else ")"
        else:
            summary += " (without observations)"
        lines.append(summary)
        if self.note:
            lines.append(f"  {self.note}")
        if self.enforcement_checked:
            lines.append("  every directive of the result was checked enforced on the machine")
        where = "a freshly booted machine" if self.dropin_on_fresh_machine else "the machine tighten ran on"
        if self.dropin_verified:
            lines.append("  the drop-in below, written as a file after the spec's hardening, passes every scenario "
                         f"on {where}" + (", and the service starts again there after a restart"
                                          if self.dropin_on_fresh_machine else ""))
        elif self.dropin_unchecked:
            lines.append(f"  the drop-in could NOT be checked on a freshly booted machine: {self.dropin_unchecked}")
        elif self.dropin_verified is False:
            lines.append(f"  the drop-in, written as a file after the spec's hardening, does NOT pass on {where}: "
                         f"{self.dropin_failure}")
        return "\n".join(lines)


# Steps the scenarios cannot justify on an offline machine: they would cut traffic to other hosts that no scenario
# makes (a resolver's upstream servers), so they are tried only for a service declared to need no network.
NETWORK_STEPS = frozenset({"IPAddressDeny", "IPAddressAllow", "PrivateNetwork"})


def policy_exclusions(hardening: Hardening, *, offline: bool = False, own_user: bool = False) -> dict[str, str]:
    """Directives tighten never adds, and why: network restrictions unless the spec says the service needs no
    network (``tighten: {offline: true}``), and DynamicUser= for a service with a User= of its own (in the spec
    or the unit), which it would replace."""
    why: dict[str, str] = {}
    if not offline:
        why.update(dict.fromkeys(NETWORK_STEPS, "the machine is offline, so no scenario shows the network the service "
                                                "needs; add tighten: {offline: true} to the spec if it needs none"))
    if own_user or any(d.name == "User" for d in hardening):
        why["DynamicUser"] = "the service runs as a User= of its own, which DynamicUser= would replace"
    return why


def _words_of(assignments: Sequence[str], deny: bool) -> set[str]:
    return {word for a in assignments if a.startswith("~") == deny for word in a.lstrip("~").split()}


def _applies(step: Step, hardening: Hardening, keep: Sequence[str], never: Sequence[str]) -> str:
    """Why a step is not tried ("" when it is): excluded by the user, or the spec already as strict."""
    present = {d.name: d for d in hardening}
    writable = {posixpath.normpath(path.lstrip("-+")) for d in hardening if d.name == "ReadWritePaths"
                for path in d.value.split()}
    for directive in step.directives:
        if directive.name in never or directive.name in keep:
            return "excluded"
        if directive.name == "ReadOnlyPaths" and writable & {posixpath.normpath(path.lstrip("-+"))
                                                             for path in directive.value.split()}:
            # On one path systemd mounts read-only over read-write (namespace.c orders its mounts so): the step
            # would void a grant the service was seen to need (sshd's /run/sshd.pid), which no scenario may show.
            return "skipped"
        existing = present.get(directive.name)
        if existing is not None and directive.name == "SystemCallFilter" and not directive.value.startswith("~"):
            if existing.assignments[0].startswith("~"):
                continue  # the spec's is a deny list: the allow list goes before it (see observe.filter_adding)
            return "skipped"  # the spec's is an allow list already: a second one would only widen it
        if existing is not None and directive.name in EXTENDS:
            deny = directive.value.startswith("~")
            if not _words_of(directive.assignments, deny) <= _words_of(existing.assignments, deny):
                continue  # some of the step's words are new to the spec's list
            return "skipped"
        if existing is None:
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
        elif directive.name == "SystemCallFilter":
            old = out[index]
            out[index] = Directive(old.name, filter_adding(old.assignments, directive.assignments), old.line)
        elif directive.name in EXTENDS:
            old = out[index]
            out[index] = Directive(old.name, (*old.assignments, *directive.assignments), old.line)
        elif directive.name in GRANTS:
            old = out[index]
            have = {word for assignment in old.assignments for word in assignment.split()}
            new = " ".join(word for word in directive.value.split() if word not in have)
            out[index] = Directive(old.name, (*old.assignments, new) if new else old.assignments, old.line)
        else:
            out[index] = Directive(directive.name, directive.assignments, out[index].line)
    return tuple(out)


def tighten(hardening: Hardening, trial: Trial, *, catalogue: Sequence[Step] = CATALOGUE, keep: Sequence[str] = (),
            never: Sequence[str] = (), syscall_groups: Callable[[], dict[str, list[str]]] = dict, max_runs: int = 200,
            max_seconds: float = 900.0, observation: Observation | None = None, scenarios_from_outside: bool = True,
            baseline: TrialResult | None = None, together: bool | None = None, offline: bool = False,
            own_user: bool = False, own: Hardening = ()) -> Tightening:
    """Add the catalogue's steps, keeping each only if ``trial`` still passes (see the module).

    With an ``observation``, steps are ordered and pre-narrowed by its forecast; ``scenarios_from_outside`` says
    whether some scenario is a client outside the sandbox (see :func:`pytest_systemd_harden.search.observe.forecast`).
    ``together`` (default: with an observation) tries the steps not forecast to conflict in one run, splitting the
    group in halves only where it fails; otherwise each step is one run. ``baseline`` is the spec's own result when
    already known (the traced run passed every scenario), saving that run. ``offline`` (the spec's
    ``tighten: {offline: true}``) allows the network steps; ``own_user`` says the unit runs as a User= of its own
    (see :func:`policy_exclusions`). ``own`` is the unit's own hardening (a unit file's, under the spec's drop-in):
    the search starts from the unit as loaded, so a step the unit already has, or something stronger, is skipped,
    and only the spec's hardening (the drop-in) is changed.
    """
    started = time.monotonic()
    oracle = Oracle(trial, max_runs=max_runs, max_seconds=max_seconds)
    result = Tightening(hardening, hardening, observation=observation)
    own_user = own_user or any(d.name == "User" for d in own)
    search = _Search(oracle, result, keep, never, syscall_groups, observation, scenarios_from_outside,
                     policy_exclusions(hardening, offline=offline, own_user=own_user), own)
    current = hardening
    if baseline is not None:
        oracle.cache[hardening_key(hardening)] = baseline
    try:
        first = oracle.result(current)
        if not first.passed:
            result.note = f"the spec as written does not pass ({first.summary}): fix that first"
            return result
        likely, unlikely = _plan(catalogue, current, search.predict)
        if together if together is not None else observation is not None:
            current = search.group(likely, current)
        else:
            for step in likely:
                current = search.one(step, current)
        for step in unlikely:
            current = search.one(step, current)
    except BudgetExceeded as exc:
        result.note = f"stopped early: {exc}"
    finally:
        result.after = search.current if search.current is not None else current
        result.runs = oracle.runs
        result.seconds = time.monotonic() - started
    return result


class _Search:
    """The steps of one tighten: each tried alone (:meth:`one`) or several in one run (:meth:`group`)."""

    def __init__(self, oracle: Oracle, result: Tightening, keep: Sequence[str], never: Sequence[str],
                 syscall_groups: Callable[[], dict[str, list[str]]], observation: Observation | None,
                 scenarios_from_outside: bool, why: dict[str, str] | None = None, own: Hardening = ()) -> None:
        self.oracle = oracle
        self.result = result
        self.keep = keep
        self.why = why or {}  # directives excluded by policy, and why (policy_exclusions)
        self.never = (*never, *self.why)
        self.syscall_groups = syscall_groups
        self.observation = observation
        self.outside = scenarios_from_outside
        self.current: Hardening | None = None  # the last hardening known to pass, should the budget run out
        self.own = own  # the unit's own hardening, read before the spec's drop-in

    def in_force(self, hardening: Hardening) -> Hardening:
        """What the service runs under with ``hardening`` as the drop-in: what a step is compared with."""
        return effective_hardening(self.own, hardening) if self.own else hardening

    def predict(self, step: Step, hardening: Hardening) -> Forecast | None:
        if self.observation is None:
            return None
        return forecast(step.directives, self.observation, self.in_force(hardening), groups=self.syscall_groups(),
                        never=self.never, scenarios_from_outside=self.outside)

    def _form(self, step: Step, hardening: Hardening) -> tuple[Step, Forecast | None]:
        """The form to try first: the forecast's narrowed one, or the step as it is."""
        predicted = self.predict(step, hardening)
        return _narrowed_form(step, predicted, self.keep, self.never), predicted

    def _kept(self, step: Step, tried: Step, predicted: Forecast | None, previous: Hardening,
              current: Hardening) -> Hardening:
        """Record ``step`` kept at its first run in the form ``tried`` (``previous`` to ``current``); confirm what
        the observation added."""
        outcome = StepOutcome(tried, "narrowed" if tried is not step else "added",
                              forecast=predicted.verdict if predicted else "",
                              observed=predicted.reason if predicted else "", first_time=True)
        self.result.outcomes.append(outcome)
        self.current = current
        outcome.change = (previous, current)
        if tried is not step and predicted is not None:
            outcome.detail = "as observed"
            current, dropped = _confirm(previous, current, predicted, self.oracle, self.result)
            self.current = current
            outcome.change = (previous, current)
            if dropped:
                outcome.detail += f"; not needed after all: {', '.join(dropped)}"
        return current

    def excluded(self, step: Step, reason: str) -> StepOutcome:
        why = next((self.why[d.name] for d in step.directives if reason == "excluded" and d.name in self.why), "")
        return StepOutcome(step, reason, why)

    def one(self, step: Step, current: Hardening) -> Hardening:
        """Try ``step`` alone; if it fails, its smallest relaxation that still tightens."""
        self.current = current
        reason = _applies(step, self.in_force(current), self.keep, self.never)
        if reason:
            self.result.outcomes.append(self.excluded(step, reason))
            return current
        tried, predicted = self._form(step, current)
        candidate = _apply(tried, current)
        attempt = self.oracle.result(candidate)
        if attempt.passed:
            return self._kept(step, tried, predicted, current, candidate)
        outcome = StepOutcome(step, "rejected", attempt.summary, forecast=predicted.verdict if predicted else "",
                              observed=predicted.reason if predicted else "")
        self.result.outcomes.append(outcome)
        narrowed = _narrow(step, candidate, self.oracle, attempt.evidence, self.syscall_groups,
                           (*self.keep, *self.never), own=self.result.before)
        if narrowed is not None and hardening_key(narrowed.apply(candidate)) != hardening_key(current):
            outcome.change = (current, narrowed.apply(candidate))
            current = narrowed.apply(candidate)
            outcome.kept, outcome.detail, outcome.step = "narrowed", narrowed.description, tried
            self.current = current
        return current

    def group(self, steps: Sequence[Step], current: Hardening) -> Hardening:
        """Try ``steps`` in one run; where that fails, each half (group testing), down to single steps."""
        self.current = current
        forms: list[tuple[Step, Step | None, Forecast | None, str]] = []
        state = current
        for step in steps:
            reason = _applies(step, self.in_force(state), self.keep, self.never)
            if reason:
                forms.append((step, None, None, reason))
                continue
            tried, predicted = self._form(step, state)
            state = _apply(tried, state)
            forms.append((step, tried, predicted, ""))
        if sum(tried is not None for _s, tried, _p, _r in forms) < 2:
            for step in steps:
                current = self.one(step, current)
            return current
        if self.oracle.passes(state):
            for step, form, expected, reason in forms:
                if form is None:
                    self.result.outcomes.append(self.excluded(step, reason))
                else:
                    current = self._kept(step, form, expected, current, _apply(form, current))
            return current
        half = len(steps) // 2
        current = self.group(steps[:half], current)
        return self.group(steps[half:], current)


def _narrowed_form(step: Step, predicted: Forecast | None, keep: Sequence[str], never: Sequence[str]) -> Step:
    """The forecast's narrowed form of ``step``, unless it brings a grant the user excluded, or narrows the step
    to nothing (every namespace type observed): then the step as is, whose run shows what needs it."""
    if predicted is None or predicted.verdict != NARROWED:
        return step
    own = {d.name for d in step.directives}
    if any(d.name not in own and (d.name in keep or d.name in never) for d in predicted.directives):
        return step
    if any(d.name in own and _restricts_nothing(d) for d in predicted.directives):
        return step
    return Step(step.name, predicted.directives, step.why)


def _plan(catalogue: Sequence[Step], hardening: Hardening,
          predict: Callable[[Step, Hardening], Forecast | None]) -> tuple[list[Step], list[Step]]:
    """The catalogue split in two: the steps to try first, and those forecast to conflict (with, so that a
    directive's steps keep their order, the later steps of the same directive)."""
    first: list[Step] = []
    last: list[Step] = []
    deferred: set[str] = set()
    for step in catalogue:
        names = {d.name for d in step.directives}
        predicted = predict(step, hardening)
        if names & deferred or (predicted is not None and predicted.verdict == CONFLICT):
            last.append(step)
            deferred |= names
        else:
            first.append(step)
    return first, last


def _confirm(previous: Hardening, current: Hardening, predicted: Forecast, oracle: Oracle,
             result: Tightening) -> tuple[Hardening, list[str]]:
    """Try without each item the observation added but cannot prove necessary; drop those not needed.
    ``previous`` is the hardening before the step: what it had is not the step's to drop."""
    dropped = []
    for name, item in predicted.extras:
        candidate = _without_item(current, previous, name, item)
        if candidate == current:
            continue
        result.confirmations += 1
        if oracle.passes(candidate):
            current = candidate
            dropped.append(item)
    return current, dropped


def _without_item(hardening: Hardening, previous: Hardening, name: str, item: str) -> Hardening:
    """``hardening`` with ``item`` taken out of the line of directive ``name`` that the step wrote: a line
    ``previous`` (the hardening before it) did not have. That is mostly the last one, but an allow list put before
    the user's deny list is the first (see observe.filter_adding)."""
    had = [line for d in previous if d.name == name for line in d.assignments]
    out = []
    for directive in hardening:
        if directive.name != name:
            out.append(directive)
            continue
        lines = list(directive.assignments)
        for index, line in enumerate(lines):
            if line in had:
                had.remove(line)
            elif item in line.split():
                rest = " ".join(word for word in line.split() if word != item)
                if name == "RestrictNamespaces" and not rest:
                    rest = "yes"
                if rest or name == "CapabilityBoundingSet" or len(lines) == 1:
                    lines[index] = rest
                else:
                    del lines[index]
                break
        out.append(Directive(directive.name, tuple(lines), directive.line))
    return tuple(out)


def profile_only(hardening: Hardening, observation: Observation, *, catalogue: Sequence[Step] = CATALOGUE,
                 keep: Sequence[str] = (), never: Sequence[str] = (),
                 syscall_groups: dict[str, list[str]] | None = None, scenarios_from_outside: bool = True) -> Hardening:
    """What a profile-only suggester proposes from the same observed run: every step the forecast does not see
    conflict, in the form it forecasts, with nothing run to check it."""
    current = hardening
    for step in catalogue:
        if _applies(step, current, keep, never):
            continue
        predicted = forecast(step.directives, observation, current, groups=syscall_groups, never=never,
                             scenarios_from_outside=scenarios_from_outside)
        if predicted.verdict != CONFLICT:
            current = _apply(_narrowed_form(step, predicted, keep, never), current)
    return current


def revert(result: Tightening, undoing: Sequence[str], why: str) -> list[Step]:
    """Undo the kept steps that added any directive named in ``undoing`` (never the user's own); return them.

    ``result.after`` becomes what it would be had they never been kept: what each wrote is taken out, grants added
    to a directive already there included, and a value it replaced is put back; the user's directives and what
    other kept steps wrote stay, and what a run showed unneeded stays out.
    """
    own = {d.name for d in result.before}
    reverted = []
    for outcome in result.outcomes:
        if outcome.kept not in ("added", "narrowed") or outcome.change is None:
            continue
        was, became = outcome.change
        if (_changed(was, became) - own) & set(undoing):
            outcome.kept, outcome.detail = "rejected", why
            reverted.append(outcome.step)
            result.after = _taken_back(result.after, was, became)
    return reverted


def fall_back(result: Tightening, failure: str) -> None:
    """After :func:`revert`, where the result no longer passes (a later step leaned on what a reverted one
    brought, such as its grant): back to the hardening before the first reverted step, which passed; the steps
    kept after it go too, since no run passed with them but without it."""
    reverted = [i for i, o in enumerate(result.outcomes) if o.kept == "rejected" and o.change is not None]
    if not reverted:
        return
    first = result.outcomes[reverted[0]]
    assert first.change is not None
    result.after = first.change[0]
    for outcome in result.outcomes[reverted[0] + 1:]:
        if outcome.kept in ("added", "narrowed"):
            outcome.kept, outcome.detail = "rejected", (f"passed only with {first.step.name}, which was reverted; "
                                                        f"without it: {failure}")


def _changed(was: Hardening, became: Hardening) -> set[str]:
    """The names of the directives that differ between two hardenings."""
    before = {d.name: d.assignments for d in was}
    after = {d.name: d.assignments for d in became}
    return {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}


def _taken_back(hardening: Hardening, was: Hardening, became: Hardening) -> Hardening:
    """``hardening`` without the change one step made from ``was`` to ``became``.

    Words, not lines: later steps' words may have been merged into the step's line (two deny lists written as
    one), and the step's into the user's directive (a grant). A directive left without words is as it was before
    the step (a value it replaced, ProtectSystem=full for strict), or gone if the step added it.
    """
    before = {d.name: d for d in was}
    after = {d.name: d for d in became}
    out = []
    for directive in hardening:
        old, new = before.get(directive.name), after.get(directive.name)
        if new is None or old is not None and old.assignments == new.assignments:
            out.append(directive)
            continue
        lines = _without_words(directive.assignments, _words(new) - _words(old))
        if lines:
            out.append(Directive(directive.name, lines, directive.line))
        elif old is not None:
            out.append(Directive(old.name, old.assignments, directive.line))
    return tuple(out)


def _words(directive: Directive | None) -> Counter[tuple[bool, str]]:
    """A directive's words, each with whether its line denies (~), counted; an empty line counts as one word."""
    words: Counter[tuple[bool, str]] = Counter()
    for line in directive.assignments if directive else ():
        deny = line.startswith("~")
        words.update((deny, word) for word in (line[1:] if deny else line).split() or [""])
    return words


def _without_words(lines: Sequence[str], words: Counter[tuple[bool, str]]) -> tuple[str, ...]:
    """``lines`` without ``words``, each taken from the last line that holds it; a line left without words goes."""
    remaining = Counter(words)
    out = []
    for line in reversed(lines):
        deny = line.startswith("~")
        kept = []
        for word in reversed((line[1:] if deny else line).split() or [""]):
            if remaining[(deny, word)] > 0:
                remaining[(deny, word)] -= 1
            else:
                kept.append(word)
        if kept:
            out.append(("~" if deny else "") + " ".join(reversed(kept)))
    return tuple(reversed(out))


@dataclass
class _Respecting(Context):
    """A refinement context that never tries a relaxation touching a directive the user excluded."""

    excluded: frozenset[str] = frozenset()

    def try_(self, relaxation: Relaxation) -> bool:
        if any(name in self.excluded for name in relaxation.changed_names()):
            return False
        return super().try_(relaxation)


def _narrow(step: Step, candidate: Hardening, oracle: Oracle, evidence: str,
            syscall_groups: Callable[[], dict[str, list[str]]], excluded: Sequence[str] = (),
            own: Hardening = ()) -> Relaxation | None:
    """The smallest relaxation of a failed step that passes, if it still tightens (not a plain removal), loosens
    nothing of the user's own directives ``own``, and touches nothing in ``excluded`` (the user's keep and never
    lists) but the step's own directive."""
    if len(step.directives) != 1:
        return None
    directive = next(d for d in candidate if d.name == step.directives[0].name)
    context = _Respecting(oracle, candidate, evidence, syscall_groups,
                          excluded=frozenset(excluded) - {directive.name})
    relaxation = refine(directive, context)
    if relaxation is None or relaxation.description.startswith("remove "):
        return None
    narrowed = next((d for d in relaxation.apply(candidate) if d.name == directive.name), None)
    # A relaxation that takes the step's directive out (a deny list whose every call is needed: "stop denying
    # @chown"), or weakens it to its default (ProcSubset=all): the step is rejected, not narrowed.
    if narrowed is None or _restricts_nothing(narrowed):
        return None
    mine = next((d for d in own if d.name == directive.name), None)
    # The refinement may stop denying, or allow a group holding, what the user's own filter denies.
    if mine is not None and mine.name == "SystemCallFilter" and _allows_more(narrowed, mine, syscall_groups()):
        return None
    return relaxation


def _restricts_nothing(directive: Directive) -> bool:
    """The directive as weak as when it is not set: its default value, or an allow list of everything it knows."""
    words = set(directive.value.split())
    if directive.name == "RestrictNamespaces":
        return words == {"no"} or words >= set(NAMESPACE_FLAGS)
    if directive.name == "CapabilityBoundingSet":
        return words >= set(CAPABILITIES)
    if directive.name in KNOWN and KNOWN[directive.name].kind is BOOL:
        return directive.value == "no"  # every boolean of the catalogue restricts nothing when off
    return DEFAULTS.get(directive.name) == directive.value


# Stands for every syscall no line of two filters names: an allow list denies it, a deny list allows it.
_UNNAMED = "(any syscall not named)"


def _allows_more(narrowed: Directive, own: Directive, groups: dict[str, list[str]]) -> bool:
    """Whether the SystemCallFilter= ``narrowed`` allows a syscall the user's own ``own`` denies (without the
    machine's groups it cannot be told: then it may)."""
    if not groups:
        return True
    named = {syscall for d in (narrowed, own) for line in d.assignments for name in line.lstrip("~").split()
             for syscall in expand_group(name, groups)}
    return any(filter_allows(narrowed.assignments, s, groups) and not filter_allows(own.assignments, s, groups)
               for s in (*named, _UNNAMED))
