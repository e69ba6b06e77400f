"""What a machine can enforce, measured on the machine, never assumed from the backend's name.

Some directives work or not depending on where the service runs, not on the spec: MemoryMax= and TasksMax= need
their cgroup controller on the unit's cgroup (not there in a container on a hybrid-cgroup host), IPAddressDeny=
needs BPF cgroup programs, SocketBindDeny= and RestrictFileSystems= a systemd built with BPF_FRAMEWORK (and the
BPF LSM), SystemCallFilter= seccomp, the Protect*/Private* directives mount namespaces. For each, one probe batch
runs as root on the machine with only that directive (what systemd's own tests call a solo run) and one without
any, and the enforcement engine's own checks judge it: the same evidence an enforcement item would use.

The result is cached per machine. The enforcement engine uses it to report a directive the machine cannot enforce
as such at once ("the nspawn backend does not enforce MemoryMax= here: ..."), and ``systemd-harden backends``
prints it for every backend that runs here (the table in docs/backends.md comes from it).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .backends.base import Machine
from .directives import Directive
from .enforcement import (
    ENFORCED,
    NOT_ENFORCED,
    UNVERIFIABLE,
    Context,
    Status,
    Subject,
    aggregate,
    directive_subject,
    judge_alone,
    unenforceable_reason,
)
from .probes.runner import Batch, machine_facts, on_machine, run_batch, unique

# (directive, the value it is measured with): what varies between machines and hosts, one of each mechanism.
MEASURED: tuple[tuple[str, str], ...] = (
    ("MemoryMax", "64M"),  # the memory controller
    ("TasksMax", "32"),  # the pids controller
    ("IPAddressDeny", "any"),  # BPF cgroup/skb programs
    ("SocketBindDeny", "any"),  # BPF_FRAMEWORK (cgroup/bind hooks)
    ("RestrictFileSystems", "~devpts"),  # BPF_FRAMEWORK and the BPF LSM
    ("SystemCallFilter", "~@mount"),  # seccomp
    ("ProtectSystem", "strict"),  # mount namespaces
    ("PrivateNetwork", "yes"),  # network namespaces
    ("ProtectKernelModules", "yes"),  # capability bounding and seccomp together
    ("DevicePolicy", "closed"),  # cgroup device rules (v1 devices controller, or BPF on cgroup v2)
)


@dataclass(frozen=True)
class Capability:
    """Whether the machine enforces ``directive`` (set alone, as root), and the evidence."""

    directive: str  # "MemoryMax=64M"
    name: str  # "MemoryMax"
    status: Status  # enforced, not enforced, unverifiable (the checks could not tell)
    evidence: str  # what the probes showed
    why: str = ""  # for one not enforced: what the machine lacks

    @property
    def enforced(self) -> bool:
        return self.status == ENFORCED


@dataclass(frozen=True)
class Capabilities:
    """Every measured directive of one machine."""

    backend: str
    by_name: dict[str, Capability]

    def unenforced(self) -> dict[str, str]:
        """Directive name -> what was seen and why (only the directives seen not enforced)."""
        return {name: f"{c.evidence}; {c.why}" for name, c in self.by_name.items() if c.status == NOT_ENFORCED}

    def summary(self) -> str:
        """One line for the progress output: what is enforced and what is not (the reasons come with the items)."""
        def names(status: str) -> str:
            return ", ".join(f"{c.name}=" for c in self.by_name.values() if c.status == status)

        parts = [(f"{label} {listed}") for label, listed in (
            ("enforces", names(ENFORCED)), ("does NOT enforce", names(NOT_ENFORCED)),
            ("cannot tell here", names(UNVERIFIABLE))) if listed]
        return "; ".join(parts) or "nothing measured"


_MEASURED: dict[str, Capabilities] = {}
_LOCK = threading.Lock()


def machine_capabilities(machine: Machine) -> Capabilities:
    """The capabilities of ``machine``, measured on first use (two-digit probe batches: about 2 s on nspawn)."""
    with _LOCK:
        if machine.name not in _MEASURED:
            _MEASURED[machine.name] = measure(machine)
        return _MEASURED[machine.name]


def measure(machine: Machine) -> Capabilities:
    facts = machine_facts(machine)
    directives = [Directive.parse(name, value) for name, value in MEASURED]
    subjects = []
    for directive in directives:
        subject = directive_subject(directive, Context((directive,), facts, runs_as_root=True))
        if subject is not None and subject.checks:
            subjects.append(subject)
    baseline = run_batch(on_machine(machine, purpose="capability"),
                         unique(check.probe for subject in subjects for check in subject.checks),
                         "on the machine without hardening")

    def solo_run(subject: Subject) -> Batch:
        return run_batch(on_machine(machine, [p for d in subject.alone for p in d.properties()], purpose="capability"),
                         subject.probes, f"as root with only {subject.directive}")

    # The solo runs are independent units: run side by side (a VM under TCG takes seconds per batch).
    with ThreadPoolExecutor(max_workers=3) as pool:
        solos = list(pool.map(solo_run, subjects))
    found: dict[str, Capability] = {}
    for subject, solo in zip(subjects, solos, strict=True):
        assert subject.directive is not None
        directive = subject.directive
        outcomes = [o for o in judge_alone(subject.checks, subject.alone, solo, baseline, facts) if o is not None]
        status = aggregate(outcomes) if outcomes else UNVERIFIABLE
        why = ""
        if status == NOT_ENFORCED:
            evidence = "; ".join(f"{o.check.expected}: {o.reason}" for o in outcomes if o.status == NOT_ENFORCED)
            why = unenforceable_reason(directive, facts)
        elif status == ENFORCED:
            evidence = "; ".join(o.check.expected for o in outcomes if o.status == ENFORCED)
        else:
            evidence = "; ".join(o.reason for o in outcomes) or "none of its checks applies here"
        found[directive.name] = Capability(str(directive), directive.name, status, evidence, why)
    return Capabilities(machine.NAME, found)
