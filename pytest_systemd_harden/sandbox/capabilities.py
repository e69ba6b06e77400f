"""What a machine can enforce, measured on the machine, never assumed from the backend's name.

Some directives work or not depending on where the service runs, not on the spec: MemoryMax= and TasksMax= need
their cgroup controller on the unit's cgroup (not there in a container on a hybrid-cgroup host), IPAddressDeny=
needs BPF cgroup programs, SocketBindDeny= and RestrictFileSystems= a systemd built with BPF_FRAMEWORK (and the
BPF LSM), SystemCallFilter= seccomp, the Protect*/Private* directives mount namespaces. For each, one probe batch
runs as root on the machine with only that directive (what systemd's own tests call a solo run) and one without
any, and the enforcement engine's own checks judge it: the same evidence an enforcement item would use.

The result is kept per machine, and on disk under the image cache (``capabilities/``), keyed by everything that
decides it (:func:`cache_key`): the host's kernel (release, build, command line, LSMs, cgroup layout), the
backend's own description of how it runs the machine (:meth:`Machine.capability_identity
<pytest_systemd_harden.machine.backends.base.Machine.capability_identity>`: its command line, what of the image
decides enforcement - on nspawn the release, systemd's and its enforcing libraries' versions and the manager's
settings, so images that differ only in a spec's package set share a key) and the probes' recipe (the source of
the code that measures and judges). The same key gives the same answer, so a machine booted again measures nothing
(about 0.5 s saved per boot); any change of a part is a new key.
``--harden-remeasure`` (``systemd-harden backends --remeasure``) measures again and rewrites the entry. The
enforcement engine uses it to report a directive the machine cannot enforce
as such at once ("the nspawn backend does not enforce MemoryMax= here: ..."), and ``systemd-harden backends``
prints it for every backend that runs here (the table in docs/backends.md comes from it).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..machine.backends.base import Machine
from ..machine.probing import machine_facts, on_machine, remember_facts
from ..machine.staging import write_atomically
from ..probes.runner import Batch, MachineFacts, run_batch, unique
from ..spec.directives import Directive
from .expectations import ENFORCED, NOT_ENFORCED, UNVERIFIABLE, Context, Status, Subject, directive_subject
from .verdict import aggregate, judge_alone, unenforceable_reason

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
    # How this answer was got, for the boot line: "measured in 0.6s", "cached".
    how: str = field(default="", compare=False)
    # False when a probe batch did not finish normally (a timeout on a loaded machine): not worth keeping.
    clean: bool = field(default=True, compare=False)

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
# Bump when what a measurement means changes in a way the hashed sources below do not show (a new key part).
RECIPE_VERSION = 1
# The code that decides a measurement's answer: the probes, how they run, and the checks that judge them.
_RECIPE_SOURCES = ("sandbox/capabilities.py", "sandbox/expectations.py", "sandbox/verdict.py", "unit/probe_host.py",
                   "spec/directives.py", "spec/unit_file.py", "kernel/flags.py", "probes/inside.py",
                   "probes/catalogue.py", "probes/runner.py", "machine/probing.py", "probes/model.py")


def machine_capabilities(machine: Machine, *, remeasure: bool = False) -> Capabilities:
    """The capabilities of ``machine``: from the on-disk cache if this key was measured before, else measured
    (two-digit probe batches: about 0.5 s on nspawn) and stored; ``remeasure`` ignores the cache entry."""
    with _LOCK:
        if machine.name not in _MEASURED:
            key = cache_key(machine)
            cache = CapabilityCache(machine.image_cache.cache_dir / "capabilities")
            cached = None if remeasure else cache.load(key)
            if cached is not None:
                found, facts = cached
                remember_facts(machine, facts)  # the same key decides them: spares the first start two commands
            else:
                started = time.monotonic()
                found = measure(machine)
                found = replace(found, how=f"measured in {time.monotonic() - started:.1f}s")
                if found.clean:
                    cache.store(key, found, machine_facts(machine))
            _MEASURED[machine.name] = found
        return _MEASURED[machine.name]


@functools.cache
def _recipe() -> str:
    package = Path(__file__).parents[1]
    digest = hashlib.sha256(str(MEASURED).encode())
    for name in _RECIPE_SOURCES:
        digest.update((package / name).read_bytes())
    return f"{RECIPE_VERSION}-{digest.hexdigest()[:16]}"


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def host_kernel() -> dict[str, object]:
    """What of this host's kernel decides what a machine on it enforces (a VM's too: KVM or not)."""
    uname = os.uname()
    cgroups = sorted(
        (fields[4], line.split(" - ", 1)[1].split()[0], line.split(" - ", 1)[1].split()[-1])
        for line in _read("/proc/self/mountinfo").splitlines()
        if (fields := line.split()) and fields[4].startswith("/sys/fs/cgroup") and " - " in line)
    return {"release": uname.release, "build": uname.version, "cmdline": _read("/proc/cmdline"),
            "lsm": _read("/sys/kernel/security/lsm"), "cgroups": cgroups}


def cache_key(machine: Machine) -> dict[str, object]:
    """Everything that decides what ``machine`` enforces, as a JSON-able dict (a booted machine: the backend's
    part names its image)."""
    return {"recipe": _recipe(), "kernel": host_kernel(), "machine": machine.capability_identity()}


class CapabilityCache:
    """Measured capabilities as ``<directory>/<hash of the key>.json``; each file holds its key, to be checked.

    Written to a temporary file and renamed into place: xdist workers measuring the same key at once each write
    a whole file, and a reader never sees half of one.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path_for(self, key: dict[str, object]) -> Path:
        text = json.dumps(key, sort_keys=True)
        return self.directory / f"{hashlib.sha256(text.encode()).hexdigest()[:20]}.json"

    def load(self, key: dict[str, object]) -> tuple[Capabilities, MachineFacts] | None:
        """The capabilities stored for ``key``, and the facts of the machine's systemd measured with them."""
        try:
            data = json.loads(self.path_for(key).read_text())
            if data["key"] != json.loads(json.dumps(key)):
                return None
            by_name = {}
            for entry in data["capabilities"]:
                if entry["status"] not in (ENFORCED, NOT_ENFORCED, UNVERIFIABLE):
                    return None
                by_name[entry["name"]] = Capability(entry["directive"], entry["name"], entry["status"],
                                                    entry["evidence"], entry["why"])
            known = data["facts"]
            facts = MachineFacts(int(known["version"]), frozenset(known["features"]),
                                 {group: frozenset(names) for group, names in known["syscall_groups"].items()},
                                 frozenset(known["known_syscalls"]), user_namespaced=bool(known["user_namespaced"]),
                                 cgroup_fs=str(known["cgroup_fs"]), lsms=str(known["lsms"]))
            return Capabilities(data["backend"], by_name, how="cached"), facts
        except (OSError, ValueError, KeyError, TypeError):
            return None  # missing, or written by another version: measure

    def store(self, key: dict[str, object], capabilities: Capabilities, facts: MachineFacts) -> None:
        path = self.path_for(key)
        data = {"key": key, "backend": capabilities.backend, "capabilities": [
            {"directive": c.directive, "name": c.name, "status": c.status, "evidence": c.evidence, "why": c.why}
            for c in capabilities.by_name.values()],
            "facts": {"version": facts.version, "features": sorted(facts.features),
                      "syscall_groups": {group: sorted(names) for group, names in facts.syscall_groups.items()},
                      "known_syscalls": sorted(facts.known_syscalls), "user_namespaced": facts.user_namespaced,
                      "cgroup_fs": facts.cgroup_fs, "lsms": facts.lsms}}
        with contextlib.suppress(OSError):  # a cache restored read-only (CI, a container binding it): measured again
            write_atomically(path, json.dumps(data, indent=1, sort_keys=True))


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
    # Each batch process itself ends normally whatever its probes saw (they report denials, not die of them).
    clean = all(batch.command is None or batch.command.ok for batch in (baseline, *solos))
    return Capabilities(machine.NAME, found, clean=clean)
