"""The user's service, started under a spec's hardening on a machine, and commands run beside or inside it."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dbus_next.errors import DBusError
from dbus_next.signature import Variant

from ..errors import ServiceFailed, SpecError
from ..machine.backends.base import Machine
from ..machine.probing import machine_facts
from ..machine.systemd import (
    CLD_DUMPED,
    CLD_EXITED,
    CLD_KILLED,
    SERVICE_IFACE,
    SERVICE_STOP_GRACE,
    UNIT_IFACE,
    Property,
)
from ..probes.catalogue import parse_denial
from ..probes.inside import CGROUP_ROOTS
from ..probes.runner import run_batch
from ..result import SYSTEMD_EXIT_CODES, CommandResult, signal_name
from ..sandbox.expectations import NOT_ENFORCED, UNVERIFIABLE
from ..spec.directives import Directive, ignored_by_systemd
from ..spec.load import Spec, unit_name
from ..spec.unit_file import effective_hardening
from .probe_host import check_denials
from .testinfra_host import make_host
from .under_test import UnitUnderTest, unit_under_test

if TYPE_CHECKING:
    import testinfra.host

    from ..probes import Batch, Probe

# Only these directives make the namespaces that JoinsNamespaceOf= shares; a "peer" of the service copies them so
# it sees the service's /tmp, network and IPC without being confined by the rest of the hardening.
NAMESPACE_DIRECTIVES = ("PrivateTmp", "PrivateNetwork", "PrivateIPC")
# How long a service with `ready: active` is watched after its start job: a program that exits in that time is
# reported as exiting right after it started.
ACTIVE_SETTLE_SECONDS = 0.1
# What a restart job may take to stop the unit before its start: systemd's default TimeoutStopSec=.
RESTART_STOP_ALLOWANCE = 90.0
# Settings that describe *this* unit, not its sandbox: an inside command must not inherit them.
NOT_FOR_COMMANDS = ("Restart", "RestartSec", "RemainAfterExit", "NotifyAccess", "TimeoutStartSec", "TimeoutStopSec",
                    "RuntimeMaxSec", "KillMode", "SyslogIdentifier", "Delegate")

# What state() reports: a unit not loaded (never started, or collected) has the Unit ones only.
_STATE_PROPERTIES = ((UNIT_IFACE, "ActiveState"), (UNIT_IFACE, "SubState"),
                     *((SERVICE_IFACE, name) for name in ("Result", "ExecMainCode", "ExecMainStatus", "MainPID",
                                                          "NRestarts", "ControlGroup")))
# Run as `python3 -I -S`: no site module, no user paths; the script needs only built-in modules, and an interpreter
# that skips site starts some 10 ms sooner (this runs before every start's first result).
# The readiness check ends early when the unit's cgroup has no process left, or is gone (systemd removes it while
# the unit waits to be restarted): it died before it was ready, and the state read next says how (or that systemd
# restarts it). Without that, every failing start of a diagnosis' trial waited out the check's budget (0.5 s) first.
_READY_CHECK = r"""
import os, socket, sys, time
kind, target, budget, cgroups = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4:]
end = time.monotonic() + budget
def gone():
    for cgroup in cgroups:
        try:
            with open(f"{cgroup}/cgroup.events") as f:
                if "populated 0" in f.read():
                    return True
        except FileNotFoundError:  # systemd removes the cgroup of a unit that died: gone if its parent is there
            if os.path.isdir(os.path.dirname(cgroup)):
                return True
        except OSError:
            pass
    return False
while True:
    try:
        if kind == "tcp":
            for host in ("127.0.0.1", "::1"):
                try:
                    socket.create_connection((host, int(target)), timeout=0.2).close()
                    sys.exit(0)
                except OSError:
                    pass
        elif kind == "unix":
            s = socket.socket(socket.AF_UNIX)
            s.connect(target)
            s.close()
            sys.exit(0)
        elif os.path.exists(target):
            sys.exit(0)
    except OSError:
        pass
    if gone():
        sys.exit(2)
    if time.monotonic() > end:
        sys.exit(1)
    time.sleep(0.02)
"""


def dynamic_user_name(unit: str) -> str:
    """A user name for the service's DynamicUser= that its inside commands share.

    User names longer than 31 characters are refused (useradd's limit, which systemd keeps), so a long unit name
    is shortened with a hash that keeps two specs apart.
    """
    name = unit.removesuffix(".service")
    if len(name) <= 31:
        return name
    return f"{name[:22]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def unit_name_for(spec: Spec) -> str:
    return unit_name(spec.label)


class HardenedService:
    """A service started under a spec on a machine.

    * :meth:`client` runs a command unconfined on the machine, as a client of the service.
    * :meth:`inside` runs a command under the same sandbox as the service: the same directives, the same
      (dynamic) user, and the service's private /tmp, network and IPC namespaces (JoinsNamespaceOf=).
    * :meth:`journal` is the service's journal tail; :meth:`state` its unit state.
    * :attr:`host` and :attr:`sandbox_host` are testinfra ``Host`` objects for the machine and the sandbox.
    * :meth:`assert_denied` checks that the sandbox denies actions (a write, a syscall, ...); :meth:`probe` runs
      denial probes in the sandbox.
    """

    def __init__(self, machine: Machine, spec: Spec, unit: str | None = None) -> None:
        self.machine = machine
        self.spec = spec
        self.unit = unit or spec.service.unit_name or machine.service_unit(unit_name_for(spec))
        dynamic = spec.directive("DynamicUser")
        explicit_user = spec.directive("User")
        # Units that share a User= name share the dynamic uid, so inside commands run as the service does.
        self.user = explicit_user.value if explicit_user else (
            dynamic_user_name(self.unit) if dynamic and dynamic.value == "yes" and not spec.service.unit_name
            else None)
        self._host: testinfra.host.Host | None = None
        self._sandbox_host: testinfra.host.Host | None = None
        # What the spec tests: a transient unit, a unit file beside the spec, or a package's unit (see
        # unit/under_test.py).
        self.under_test: UnitUnderTest = unit_under_test(machine, spec, self.unit, self.service_properties)

    # -- properties ---------------------------------------------------------------------------------------

    def sandbox_properties(self) -> list[Property]:
        """The properties a command in the service's sandbox runs with: the unit's own settings first, then the
        spec's hardening (the order of unit file and drop-in)."""
        props = self.under_test.command_properties()
        props += [p for d in self.spec.hardening if d.name not in NOT_FOR_COMMANDS for p in d.properties()]
        if self.user and not self.spec.directive("User"):
            props.append(("User", Variant("s", self.user)))
        if self.spec.directive("RuntimeDirectory") or any(d.name == "RuntimeDirectory"
                                                          for d in self.under_test.own_directives()):
            # The command's unit shares the service's /run/NAME; without this, its stop would remove the directory
            # from under the running service. The service's own stop still removes it.
            props.append(("RuntimeDirectoryPreserve", Variant("s", "yes")))
        return props

    def service_properties(self) -> list[Property]:
        props: list[Property] = [
            ("Description", Variant("s", f"{self.spec.label} under test by pytest-systemd-harden")),
            # Keep the unit loaded after it stops, so its state directories can be cleaned (CleanUnit needs a
            # loaded unit); the reference is dropped in stop(), or with our bus connection.
            ("AddRef", Variant("b", True)),
        ]
        props += self.spec.service.properties()
        props += [p for d in self.spec.hardening for p in d.properties()]
        if self.user and not self.spec.directive("User"):
            props.append(("User", Variant("s", self.user)))
        return props

    def _joined(self, props: list[Property]) -> list[Property]:
        joined = [("JoinsNamespaceOf", Variant("as", [self.unit])), ("After", Variant("as", [self.unit]))]
        if self.spec.service.working_directory:
            joined.append(("WorkingDirectory", Variant("s", self.spec.service.working_directory)))
        if self.spec.service.environment:
            joined.append(("Environment", Variant("as", [f"{k}={v}" for k, v in self.spec.service.environment])))
        return props + joined

    def _peer_properties(self) -> list[Property]:
        return self._joined([p for d in (*self.under_test.own_directives(), *self.spec.hardening)
                             if d.name in NAMESPACE_DIRECTIVES for p in d.properties()])

    # -- lifecycle ----------------------------------------------------------------------------------------

    def on(self, machine: Machine) -> HardenedService:
        """The same service (spec and unit) on ``machine``, a twin of this one's (:meth:`Machine.twin`): the unit's
        own settings are known there before its first start (:meth:`UnitUnderTest.loaded_as`)."""
        twin = HardenedService(machine, self.spec, unit=self.unit)
        twin.under_test.loaded_as(self.under_test)
        return twin

    def start(self) -> None:
        """(Re)start the service clean under the spec, and wait until it is ready; ServiceFailed if not."""
        self.stop()
        self.machine.check_service(self.spec)
        self._check_known_to_systemd()
        started = time.monotonic()
        self._wait_ready(self.under_test.start(), started)

    def restart(self) -> None:
        """Restart the started service as a host does (``systemctl restart``): its unit, drop-ins and what it made
        stay; wait until it is ready again; ServiceFailed if not."""
        started = time.monotonic()
        # The restart job stops the unit as its own TimeoutStopSec= says (systemd's default 90 s), then starts it.
        job = self.machine.systemd.restart_unit(self.unit, timeout=RESTART_STOP_ALLOWANCE + self.spec.service.start_timeout)
        self._wait_ready(job, started)

    def _wait_ready(self, job: str, started: float) -> None:
        """After the start job (its result ``job``), until the service is ready as the spec says."""
        ready = self.spec.service.ready
        if job != "done":
            # A main process that exits at once can end before systemd finishes the start job, which then fails
            # too: that is the service's own exit, not a sandbox systemd could not set up (a 2xx exit code).
            state = self.state()
            exited = state["ExecMainCode"] == CLD_EXITED and state["ExecMainStatus"] not in SYSTEMD_EXIT_CODES
            if exited and self.spec.service.type != "oneshot":
                raise self.failure("exited right after it started" if ready.kind == "active"
                                   else f"exited before it was ready ({ready.describe()})")
            raise self.failure(f"failed to start (start job: {job})")
        if ready.kind == "active":
            # The start job is done once the program runs; one that exits at once may not have yet. Watch it
            # briefly, so "exited right after it started" does not depend on who answers first.
            settle = time.monotonic() + ACTIVE_SETTLE_SECONDS
            while True:
                state = self.state()
                if state["ActiveState"] == "failed" or state["SubState"] == "auto-restart" or state["NRestarts"] \
                        or (state["ActiveState"] == "inactive" and self.spec.service.type != "oneshot"):
                    raise self.failure("exited right after it started")
                if time.monotonic() >= settle:
                    return
                time.sleep(0.02)
        deadline = started + ready.timeout
        while True:
            state = self.state()
            if state["ActiveState"] in ("failed", "inactive") and self.spec.service.type != "oneshot":
                raise self.failure(f"exited before it was ready ({ready.describe()})")
            if state["SubState"] == "auto-restart" or state["NRestarts"]:
                # A unit's Restart= hides the death as "activating": waiting would only watch it die again.
                raise self.failure(f"exited before it was ready ({ready.describe()}), and systemd restarts it "
                                   "(the unit's Restart=)")
            budget = max(0.1, min(0.5, deadline - time.monotonic()))
            probe = self.machine.run(
                ["/usr/bin/python3", "-I", "-S", "-c", _READY_CHECK, ready.kind, ready.target, str(budget),
                 *self._cgroup_dirs(state)], self._peer_properties(), purpose="ready", timeout=budget + 10)
            if probe.ok:
                return
            if time.monotonic() >= deadline:
                raise self.failure(f"was not ready within {ready.timeout:g}s (waiting until {ready.describe()})")

    def _cgroup_dirs(self, state: dict[str, Any]) -> list[str]:
        """Where the machine may have the unit's cgroup2 directory: the whole tree, or beside v1 (hybrid)."""
        if not state["ControlGroup"] or self.spec.service.type == "oneshot":
            return []  # a oneshot's processes may be gone while it still starts: nothing to end early on
        return [f"{root}{state['ControlGroup']}" for root in CGROUP_ROOTS]

    def _check_known_to_systemd(self) -> None:
        """SpecError for a syscall the machine's systemd does not know: it would ignore it, silently (the spec
        loader knows the groups; which syscalls a systemd knows depends on its version and libseccomp)."""
        facts = machine_facts(self.machine)
        for directive, problem, hint in ignored_by_systemd(self.spec.hardening, facts.syscall_groups,
                                                           facts.known_syscalls, f"systemd {facts.version} here"):
            raise SpecError(str(self.spec.path), directive.line, f"hardening.{directive.name}", problem, hint)

    def stop(self) -> str | None:
        """Stop the service and forget its state (failed status, State/Cache/Logs/RuntimeDirectory contents).

        A service still running :data:`~pytest_systemd_harden.machine.systemd.SERVICE_STOP_GRACE` seconds after SIGTERM
        is killed with SIGKILL, every process of its unit; the return value then says so (None when it stopped by
        itself)."""
        how = self.under_test.retire()
        if how != "killed":
            return None
        return (f"{self.unit} was still running {SERVICE_STOP_GRACE:g}s after SIGTERM, so every process of its unit "
                "was killed with SIGKILL (does it ignore SIGTERM, or take that long to stop?)")

    # -- commands -----------------------------------------------------------------------------------------

    def inside(self, command: str | Sequence[str], timeout: float = 60.0, *, stdin: bytes = b"") -> CommandResult:
        """Run ``command`` (shell string or argv) under the service's sandbox; never raises for a failed command."""
        return self.machine.run(command, self._joined(self.sandbox_properties()), stdin=stdin, timeout=timeout,
                                purpose="inside", where=f"inside the sandbox of {self.unit} ({self.sandbox_summary()})")

    def client(self, command: str | Sequence[str], timeout: float = 60.0, *, stdin: bytes = b"") -> CommandResult:
        """Run ``command`` unconfined on the machine, as a client of the service (as root)."""
        return self.machine.run(command, (), stdin=stdin, timeout=timeout, purpose="client",
                                where=f"on the machine, unconfined, as a client of {self.unit}")

    def sandbox_summary(self) -> str:
        names = [d.name for d in self.spec.hardening]
        if not names:
            return "no hardening"
        return f"{len(names)} directives" + (f", user {self.user}" if self.user else "")

    # -- denial probes ------------------------------------------------------------------------------------

    def probe(self, probes: Sequence[Probe]) -> Batch:
        """Run ``probes`` (:mod:`pytest_systemd_harden.probes`) as one process in the service's sandbox."""
        return run_batch(lambda argv, stdin: self.inside(list(argv), timeout=120, stdin=stdin), probes,
                         f"in the sandbox of {self.unit}")

    def assert_denied(self, *, write: str | Sequence[str] = (), read: str | Sequence[str] = (),
                      exec: str | Sequence[str] = (), connect: str | Sequence[str] = (),
                      bind: str | int | Sequence[str | int] = (), syscall: str | Sequence[str] = (),
                      capability: str | Sequence[str] = (), namespace: str | Sequence[str] = (),
                      family: str | Sequence[str] = (), strict: bool = False) -> None:
        """Assert that the sandbox denies every given action, e.g. ``assert_denied(write="/etc/passwd",
        syscall=["mount", "reboot"], connect="127.0.0.1:53")``.

        Each action is probed in the sandbox and, as a control, on the machine without hardening: an action that
        is denied even there proves nothing about the sandbox, and skips the test with the reason (fails it with
        ``strict=True``). A failure says what was expected, what happened (errno or signal) and which directive
        should have denied it. The values are those of a spec's ``deny:`` list (see docs/probes.md).
        """
        __tracebackhide__ = True
        asked = {"write": write, "read": read, "exec": exec, "connect": connect, "bind": bind, "syscall": syscall,
                 "capability": capability, "namespace": namespace, "family": family}
        denials = [parse_denial(kind, value) for kind, values in asked.items()
                   for value in ([values] if isinstance(values, (str, int)) else values)]
        if not denials:
            raise TypeError("assert_denied() needs an action, e.g. assert_denied(write='/etc/passwd')")
        verdicts = check_denials(self, denials)
        failed = [v for v in verdicts if v.status == NOT_ENFORCED]
        unverifiable = [v for v in verdicts if v.status == UNVERIFIABLE]
        if failed or (strict and unverifiable):
            raise AssertionError("\n".join(v.message() for v in [*failed, *(unverifiable if strict else [])]))
        if unverifiable:
            import pytest  # only here: the service works without pytest, and skips only under it

            pytest.skip("\n".join(v.message() for v in unverifiable))

    # -- observation --------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The unit's ActiveState, SubState, Result and main process outcome."""
        # Asked by name, in one round trip: start() asks this before each readiness check.
        found = self.machine.systemd.some_properties(self.unit, _STATE_PROPERTIES)
        return {
            "ActiveState": found.get("ActiveState", "unknown"), "SubState": found.get("SubState", "unknown"),
            "Result": found.get("Result", ""), "ExecMainCode": found.get("ExecMainCode", 0),
            "ExecMainStatus": found.get("ExecMainStatus", 0), "MainPID": found.get("MainPID", 0),
            "NRestarts": found.get("NRestarts", 0),  # automatic restarts (Restart=) since this start
            "ControlGroup": found.get("ControlGroup", ""),  # its cgroup, as the machine's cgroup tree names it
        }

    def state_text(self) -> str:
        """E.g. "failed (Result=core-dump, main process killed by SIGSYS)"."""
        state = self.state()
        text = f"{state['ActiveState']} ({state['SubState']}"
        if state["Result"] and state["Result"] != "success":
            text += f", Result={state['Result']}"
        code, status = state["ExecMainCode"], state["ExecMainStatus"]
        if code == CLD_EXITED and status:
            meaning = f"/{SYSTEMD_EXIT_CODES[status]}" if status in SYSTEMD_EXIT_CODES else ""
            text += f", main process exited with status {status}{meaning}"
        elif code in (CLD_KILLED, CLD_DUMPED):
            sig = signal_name(status)
            text += f", main process killed by {sig}" + (" (seccomp: Bad system call)" if sig == "SIGSYS" else "")
        return text + ")"

    def journal(self, lines: int = 25) -> str:
        """The journal tail of the service's current (or last) run only: earlier runs are not mixed in."""
        try:
            invocation = bytes(self.machine.systemd.unit_properties(self.unit).get("InvocationID", b"")).hex()
        except DBusError:
            invocation = ""
        return self.machine.journal(self.unit, lines, invocation or None)

    def failure(self, what: str) -> ServiceFailed:
        """A ServiceFailed naming the unit, its state, its journal tail and the hardening in force."""
        return ServiceFailed(
            f"{self.unit} {what} under the hardening of {self.spec.path.name}\n"
            f"state: {self.state_text()}\n"
            f"{self.under_test.describe()}\n"
            f"journal of {self.unit} (last lines):\n{indent(self.journal() or '(empty)')}\n"
            f"hardening in force:\n{indent(describe_hardening(self.spec, self.under_test.own_directives()))}"
            + (f"\neffective unit (systemctl cat {self.unit}):\n{indent(effective)}"
               if (effective := self.under_test.effective().rstrip()) else "")
        )

    # -- testinfra ----------------------------------------------------------------------------------------

    @property
    def host(self) -> testinfra.host.Host:
        """A testinfra Host for the machine, unconfined (``host.file('/etc/passwd').exists``)."""
        if self._host is None:
            self._host = make_host(self.client, f"{self.machine.name}")
        return self._host

    @property
    def sandbox_host(self) -> testinfra.host.Host:
        """A testinfra Host whose commands run inside the service's sandbox
        (``sandbox_host.file('/etc').is_writable``)."""
        if self._sandbox_host is None:
            self._sandbox_host = make_host(self.inside, f"{self.machine.name}:{self.unit}")
        return self._sandbox_host


def indent(text: str, prefix: str = "  | ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def describe_hardening(spec: Spec, own: Sequence[Directive] = ()) -> str:
    """Every directive in force, each with the file and line it comes from: the unit's own, then the spec's."""
    directives = [*own, *spec.hardening]
    if not directives:
        return "(none)"
    return "\n".join(f"{line}" + (f"    ({Path(d.source).name if d.source else spec.path.name}:{d.line})"
                                  if d.line else "")
                     for d in directives for line in d.unit_lines())


def hardening_in_force(service: HardenedService) -> dict[str, str]:
    """Each directive in force on ``service`` (the unit's own, then the spec's drop-in on top), as it reads in a
    unit file: what a baseline compares, so a package update that drops a directive of its unit shows."""
    return {d.name: d.value for d in effective_hardening(service.under_test.own_directives(), service.spec.hardening)}
