"""The verdict: probe results judged against a spec's expectations (pure; probe batches come through
a :class:`ProbeHost`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..probes.catalogue import (
    Denial,
)
from ..probes.model import Probe, ProbeResult
from ..probes.runner import Batch, MachineFacts, unique
from ..spec.directives import Directive
from ..spec.unit_file import located
from .expectations import (
    ENFORCED,
    NOT_ENFORCED,
    OWN_HARDENING,
    UNVERIFIABLE,
    Check,
    Plan,
    Status,
    Subject,
    _bind_destinations,
    _paths,
    _under,
    bound_devices,
    denial_ways,
    makes_read_only,
)


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
    if name in ("IPAddressDeny", "IPAddressAllow") and facts.user_namespaced:
        return (f"{name}= needs BPF programs on the host's kernel, which the container's root (root of a user "
                "namespace only) may not load, and the test process could not load them for it here (the boot "
                "line says why): machine: {privileged: true} (no user namespace) or the qemu backend enforces it")
    device_rules_in_v1 = name in ("DevicePolicy", "DeviceAllow") and facts.cgroup_fs not in ("", "cgroup2fs")
    if name in ("SocketBindDeny", "SocketBindAllow", "DeviceAllow", "DevicePolicy",
                "RestrictFileSystems") and facts.user_namespaced and not device_rules_in_v1:
        return (f"{name}= needs BPF programs on the host's kernel, and the container's root is root of a user "
                "namespace only (no CAP_BPF there): machine: {privileged: true} (no user namespace) or the qemu "
                "backend enforces it")
    if name in ("DevicePolicy", "DeviceAllow"):
        return (f"{name}= needs cgroup device rules: on a host with hybrid cgroups the container's systemd would write "
                "them to the v1 devices controller, which systemd-nspawn mounts read-only (and which root of a user "
                "namespace may not write); the qemu backend (--harden-backend=qemu) enforces it")
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


def merged_verdict(verdicts: Sequence[Verdict]) -> Verdict:
    """One verdict for several subjects (the unit's own hardening as one item): not enforced if any is, enforced if
    any is and none fails, else unverifiable; the message lists each."""
    statuses = {v.status for v in verdicts}
    status = NOT_ENFORCED if NOT_ENFORCED in statuses else ENFORCED if ENFORCED in statuses else UNVERIFIABLE
    shown = sorted(verdicts, key=lambda v: v.status != status)  # the ones that decide first, then the rest
    reason = "\n".join(v.message() for v in shown) or "the unit has no hardening of its own"
    subject = Subject(OWN_HARDENING, None, (), location=", ".join(v.where for v in shown))
    return Verdict(subject, status if verdicts else UNVERIFIABLE, reason=reason, spec_name="")
