"""A running service as the :class:`~pytest_systemd_harden.sandbox.verdict.ProbeHost` of the
verdict, and the checks of a service's sandbox."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

from dbus_next.signature import Variant

from ..machine.backends.base import Machine
from ..machine.probing import machine_facts, on_machine, probe_interpreter
from ..machine.systemd import Property
from ..probes.catalogue import (
    Denial,
)
from ..probes.model import Probe, ProbeResult
from ..probes.runner import Batch, MachineFacts, ProbeProgramError, ipc_lifecycle, run_batch, unique
from ..result import CommandResult
from ..sandbox.capabilities import machine_capabilities
from ..sandbox.expectations import IPC_PROBE_USER, SERVICE_OWN_PROPERTIES, _paths, _with_ipc, plan
from ..sandbox.verdict import Report, Verdict, verify
from ..spec.directives import Directive
from ..spec.load import Spec
from ..spec.unit_file import effective_hardening
from .under_test import UnitUnderTest


class SandboxedService(Protocol):
    """What a :class:`ServiceHost` needs of a started service (:class:`~.service.HardenedService` is one): this
    module is below the service, which checks its sandbox with it."""

    machine: Machine
    spec: Spec
    unit: str
    under_test: UnitUnderTest

    def inside(self, command: str | Sequence[str], timeout: float = ..., *, stdin: bytes = ...) -> CommandResult: ...

    def sandbox_properties(self) -> list[Property]: ...


class ServiceHost:
    """A :class:`ProbeHost` for a started service on its machine."""

    def __init__(self, service: SandboxedService) -> None:
        self.service = service

    def facts(self) -> MachineFacts:
        machine = self.service.machine
        return replace(machine_facts(machine), unenforced=machine_capabilities(machine).unenforced())

    def sandbox(self, probes: Sequence[Probe]) -> Batch:
        # The object must outlive its unit: a unit of its own under the spec's directives, with a user of its own.
        properties = [p for p in self.service.sandbox_properties() if p[0] not in SERVICE_OWN_PROPERTIES]
        properties.append(("User", Variant("s", IPC_PROBE_USER)))
        machine = self.service.machine
        return _with_ipc(probes, self._sandbox, lambda label: ipc_lifecycle(
            on_machine(machine, properties, purpose="probe-ipc"), on_machine(machine, purpose="probe-ipc"),
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
                         lambda label: ipc_lifecycle(run, on_machine(self.service.machine, purpose="probe-ipc"), label))

    def as_user(self, probes: Sequence[Probe], user: str | None, directives: Sequence[Directive]) -> Batch:
        properties: list[Property] = [p for d in directives for p in d.properties()]
        if user is not None and not any(d.name in ("User", "DynamicUser") for d in directives):
            properties.append(("User", Variant("s", user)))
        if any(d.name == "DynamicUser" for d in directives) and not any(d.name == "User" for d in directives):
            properties.append(("User", Variant("s", user or "harden-probe-solo")))
        label = f"as {user or 'root'}" + (f" with only {', '.join(d.name for d in directives)}" if directives else "")
        run = on_machine(self.service.machine, properties, purpose="probe-solo")
        return _with_ipc(probes, lambda rest: run_batch(run, rest, label),
                         lambda label: ipc_lifecycle(run, on_machine(self.service.machine, purpose="probe-ipc"), label))


def verify_service(service: SandboxedService, denials: Sequence[Denial] | None = None,
                   skip: Sequence[str] | None = None) -> Report:
    """Plan and verify a started service's spec (its directives and its ``deny:`` list) on its machine."""
    host = ServiceHost(service)
    own = service.under_test.own_directives()
    return verify(host, plan(service.spec, host.facts(), denials, skip, own), service.spec.path.name)


def check_denials(service: SandboxedService, denials: Sequence[Denial]) -> list[Verdict]:
    """Verdicts for ``denials`` only (what :meth:`HardenedService.assert_denied` asks)."""
    host = ServiceHost(service)
    plan_ = plan(service.spec, host.facts(), denials, skip=[d.name for d in service.spec.hardening])
    report = verify(host, plan_, service.spec.path.name)
    return [report[subject.name] for subject in plan_.subjects]
