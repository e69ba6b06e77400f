"""Running a spec's scenarios and explaining their failures."""

from __future__ import annotations

import contextlib
import re
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

from dbus_next.errors import DBusError

from ..errors import HardenError, ServiceFailed
from ..kernel.seccomp import KernelLog, seccomp_records
from ..machine.backends.base import Machine
from ..machine.probing import forget_facts, machine_facts, remember_facts
from ..result import CommandResult
from ..sandbox.expectations import NOT_ENFORCED
from ..spec.directives import Directive
from ..spec.load import Expectation, Scenario, Spec
from ..spec.unit_file import effective_hardening
from ..unit.pool import shut_down
from ..unit.probe_host import verify_service
from ..unit.service import HardenedService, describe_hardening, indent
from ..unit.under_test import FIX_DROPIN_NAME
from .diagnosis import RESTRICTING, BudgetExceeded, Diagnosis, Hardening, Trial, TrialResult, diagnose, replacing_dropin
from .observe import Observation, denial_lines, parse_strace
from .tighten import CATALOGUE, Step, Tightening, fall_back, revert, tighten


def mismatches(expect: Expectation, result: CommandResult) -> list[str]:
    """How ``result`` differs from ``expect``; empty when the scenario passed."""
    found = []
    if expect.signal is not None:
        wanted = signal.Signals[expect.signal]
        # Under `sh -c` a command killed by signal N is reported by the shell as exit status 128+N.
        if result.signal != wanted and result.exit_status != 128 + wanted:
            found.append(f"expected to be killed by {expect.signal}, but got {result.status_text()}")
    elif result.signal is not None:
        found.append(f"expected exit status {expect.exit if expect.exit is not None else 'any'}, "
                     f"but it was {result.status_text()}")
    elif expect.exit is not None and result.exit_status != expect.exit:
        found.append(f"expected exit status {expect.exit}, got {result.status_text()}")
    if expect.stdout is not None and expect.stdout not in result.stdout:
        found.append(f"expected stdout to contain {expect.stdout!r}")
    if expect.stderr is not None and expect.stderr not in result.stderr:
        found.append(f"expected stderr to contain {expect.stderr!r}")
    return found


# How /bin/sh (dash) and bash say a command does not exist; the exit status is then 127.
_NOT_FOUND = re.compile(r"^(?:/bin/sh: \d+: |bash: (?:line \d+: )?)?(\S+): (?:not found|command not found)$",
                        re.MULTILINE)


def missing_command_hint(result: CommandResult, spec_name: str, inside: bool) -> str | None:
    """For a scenario whose command does not exist where it ran: the fix (the machine lacks its package), or
    None."""
    found = _NOT_FOUND.search(result.stderr) if result.exit_status == 127 else None
    if found is None:
        return None
    command = found.group(1)
    hint = (f"hint: {command} is not on the machine: add the Debian package that has it to machine.packages in "
            f"{spec_name}")
    if inside:  # the sandbox may hide what the machine has (InaccessiblePaths=, TemporaryFileSystem=)
        hint += ", unless the hardening hides it (the diagnosis, if on, tells)"
    return hint


@dataclass(frozen=True)
class ScenarioOutcome:
    scenario: Scenario
    result: CommandResult
    problems: list[str]

    @property
    def passed(self) -> bool:
        return not self.problems


def run_scenario(service: HardenedService, scenario: Scenario, deadline: Deadline | None = None) -> ScenarioOutcome:
    """Run ``scenario`` against ``service``; with a ``deadline``, its timeout is capped by the time left."""
    run = service.inside if scenario.where == "inside" else service.client
    result = run(scenario.command, deadline.cap(scenario.timeout) if deadline else scenario.timeout)
    return ScenarioOutcome(scenario, result, mismatches(scenario.expect, result))


class Deadline:
    """The end of a diagnosis' or tighten's time budget. Every wait of a rerun (the service's start and readiness,
    each scenario's timeout) is capped by the time left, so the budget bounds the whole search, not only the
    decision to start one more rerun: a rerun that hangs is stopped at the deadline, not at its scenario's timeout.
    """

    def __init__(self, seconds: float, what: str, hint: str = "") -> None:
        self.end = time.monotonic() + seconds
        self.what = what  # "diagnosis"
        self.hint = hint  # "raise it with --harden-diagnose-seconds"

    def left(self) -> float:
        return self.end - time.monotonic()

    def exceeded(self) -> BudgetExceeded:
        return BudgetExceeded(f"the time budget for {self.what} is spent" + (f" ({self.hint})" if self.hint else ""))

    def check(self) -> None:
        if self.left() <= 0:
            raise self.exceeded()

    def cap(self, seconds: float) -> float:
        """``seconds``, or the time left if that is shorter (at least a second: a command needs some time)."""
        return max(1.0, min(seconds, self.left()))

    def spec(self, spec: Spec) -> Spec:
        """``spec`` with its service's start and readiness waits capped."""
        service = spec.service
        return replace(spec, service=replace(service, start_timeout=self.cap(service.start_timeout),
                                             ready=replace(service.ready, timeout=self.cap(service.ready.timeout))))

    def bounded(self, trial: Trial) -> Trial:
        """``trial`` refused once the time is spent. A rerun that failed at the deadline is no verdict on its
        hardening (a capped wait may be what failed it): it ends the search instead of misleading it."""

        def run(hardening: Hardening) -> TrialResult:
            self.check()
            result = trial(hardening)
            if not result.passed and self.left() <= 0:
                raise self.exceeded()
            return result

        return run


def failure_report(service: HardenedService, outcome: ScenarioOutcome) -> str:
    """Everything needed to fix the unit: the command, how it ended, the service's state and journal, the hardening."""
    scenario = outcome.scenario
    where = f"{service.spec.path.name}:{scenario.line}" if scenario.line else service.spec.path.name
    lines = [f"scenario {scenario.name!r} failed under hardening ({where})"]
    lines += [f"  {problem}" for problem in outcome.problems]
    hint = missing_command_hint(outcome.result, service.spec.path.name, scenario.where == "inside")
    if hint:
        lines.append(f"  {hint}")
    lines.append(f"expected: {scenario.expect.describe()}")
    lines.append(outcome.result.describe())
    lines.append(f"service {service.unit}: {service.state_text()}")
    lines.append(f"journal of {service.unit} (last lines):")
    lines.append(indent(service.journal() or "(empty)"))
    lines.append(f"hardening in force ({service.spec.path.name}):")
    lines.append(indent(describe_hardening(service.spec, service.under_test.own_directives())))
    return "\n".join(lines)


# --- diagnosis against the real machine -----------------------------------------------------------------------

def machine_syscall_groups(machine: Machine) -> Callable[[], dict[str, list[str]]]:
    """The syscall groups of the machine's own systemd - the one that enforces the filter - asked on first use and
    once per machine (shared with the probes' facts)."""
    def groups() -> dict[str, list[str]]:
        return {group: sorted(calls) for group, calls in machine_facts(machine).syscall_groups.items()}

    return groups


@contextlib.contextmanager
def _rerun_machine(service: HardenedService, fresh: bool) -> Iterator[Machine]:
    """Where a rerun runs: the service's own machine, or with ``fresh`` its twin booted for this rerun alone
    (:meth:`Machine.twin`): as a host is right after the package's install, with nothing an earlier rerun left
    (files the service keeps, which a stop does not take back: a directory nginx chowned at its first start that
    could, which no later start then needs to chown). Shut down when the rerun ends. The service's own machine where
    there is no twin (the host backend)."""
    twin = service.machine.twin() if fresh else None
    if twin is None:
        yield service.machine
        return
    try:
        twin.boot()
        # The same image, configuration and kernel: the same systemd facts (three commands a rerun spared).
        remember_facts(twin, machine_facts(service.machine))
        yield twin
    finally:
        shut_down([twin])  # however the rerun ends; a first Ctrl-C waits until the twin is down
        forget_facts(twin)


def _programs_present(machine: Machine, programs: list[str]) -> set[str]:
    """Which of ``programs`` (paths) exist on ``machine``."""
    with machine.systemd.owed_reload_held():  # which files exist: no unit is read
        found = machine.run(["/bin/sh", "-c", 'for f; do [ -e "$f" ] && echo "$f"; done', "sh", *programs],
                            purpose="kernel-log")
    return set(found.stdout.splitlines())


def _trial(service: HardenedService, scenario: Scenario | None, deadline: Deadline | None = None,
           kernel_log: KernelLog | None = None, own: Sequence[Directive] = (), *, fresh: bool = False) -> Trial:
    """An oracle for :func:`diagnose`: restart the service under a hardening and rerun the scenario (or just start).

    The scenarios before ``scenario`` in the spec are replayed first, outcome ignored: they share one service,
    and a later scenario may need what an earlier one made (a key, an account, a cache entry). With a
    ``deadline``, every wait is capped by it (:class:`Deadline`). With a ``kernel_log``, a failure's evidence
    ends with the kernel's seccomp records of the machine's processes made during the rerun. With ``own`` (the
    unit's own directives, which the hardenings tried include), each is tried as a drop-in that resets what the unit
    sets and the hardening changes (:func:`~pytest_systemd_harden.search.diagnosis.replacing_dropin`). With
    ``fresh``, each rerun on a machine booted for it alone (:func:`_rerun_machine`).
    """
    def trial(hardening: Hardening) -> TrialResult:
        with _rerun_machine(service, fresh) as machine:
            if kernel_log is None:
                return attempt(machine, hardening)
            kernel_log.drain()  # what came before this rerun is not its evidence
            result = attempt(machine, hardening)
            if result.passed:
                return result
            records = seccomp_records(kernel_log.drain(), machine.host_pids,
                                      lambda programs: _programs_present(machine, programs))
        if not records:
            return result
        lines = list(dict.fromkeys(record.describe() for record in records))
        return TrialResult(False, result.summary, "\n".join([result.evidence, "kernel log (seccomp):", *lines]))

    def attempt(machine: Machine, hardening: Hardening) -> TrialResult:
        spec = service.spec.with_hardening(hardening)
        candidate = HardenedService(machine, deadline.spec(spec) if deadline else spec, unit=service.unit)
        if own:
            candidate.under_test.replacing_dropin = replacing_dropin(
                own, hardening, f"Tried by pytest-systemd-harden's diagnosis of {service.spec.path.name}")
        return _rerun(service, candidate, scenario, deadline)

    return deadline.bounded(trial) if deadline else trial


def _dropin_trial(service: HardenedService, scenario: Scenario | None,
                  deadline: Deadline | None = None) -> Callable[[str], TrialResult] | None:
    """A check for :func:`diagnose`: the spec as written, with a drop-in text written literally as a file after
    the spec's (:data:`~pytest_systemd_harden.unit.under_test.FIX_DROPIN_NAME`), and the failing check rerun on a
    machine booted for it, then the service restarted there (:func:`_fresh_and_restarted`): the printed fix, from
    where a host starts. None where the plugin must not write unit files (the host backend: the host's own
    systemd). With a ``deadline``, its waits are capped and it is not begun once the time is spent."""
    if not service.machine.WRITES_UNIT_FILES:
        return None

    def check(text: str) -> TrialResult:
        return _fresh_and_restarted(service, _with_dropin(service, text, deadline), scenario, deadline)

    return check


def _with_dropin(service: HardenedService, text: str,
                 deadline: Deadline | None = None) -> Callable[[Machine], HardenedService]:
    """The spec's service on a machine, with ``text`` written literally as a drop-in after the spec's (its waits
    capped by ``deadline``)."""
    def candidate(machine: Machine) -> HardenedService:
        # Capped when made: after the twin's boot, which took some of the time left.
        made = HardenedService(machine, deadline.spec(service.spec) if deadline else service.spec, unit=service.unit)
        made.under_test.extra_dropins = {FIX_DROPIN_NAME: text}
        return made

    return candidate


def _fresh_and_restarted(service: HardenedService, candidate: Callable[[Machine], HardenedService],
                         scenario: Scenario | None, deadline: Deadline | None = None) -> TrialResult:
    """``candidate`` started and ``scenario`` run (:func:`_rerun`) on a machine booted for it (:func:`_rerun_machine`),
    then restarted there as a host restarts it (``systemctl restart``: what the first start made stays), ready
    again: a host meets the first start after the install, and every start after it (a search on fresh machines
    saw only first starts). On the service's own machine, where there is no twin. With a ``deadline``, not begun
    once the time is spent (:class:`BudgetExceeded`), and its waits capped."""
    if deadline is not None:
        deadline.check()
    with _rerun_machine(service, fresh=True) as machine:
        result = _rerun(service, candidate(machine), scenario, deadline, restart=machine is not service.machine)
    if not result.passed and deadline is not None and deadline.left() <= 0:
        raise deadline.exceeded()  # a wait the deadline cut short is no verdict on the drop-in
    return result


def _rerun(service: HardenedService, candidate: HardenedService, scenario: Scenario | None,
           deadline: Deadline | None, *, restart: bool = False) -> TrialResult:
    """Start ``candidate`` and run ``scenario`` (None: only the start), after the scenarios before it; with
    ``restart``, then restart it (:meth:`HardenedService.restart`), which must come up ready again; stop it."""
    scenarios = list(service.spec.scenarios)
    preceding = scenarios[:scenarios.index(scenario)] if scenario in scenarios else []
    try:
        candidate.start()
    except ServiceFailed as exc:
        candidate.stop()  # and take back what it wrote (a drop-in): the next start must not find it
        return TrialResult(False, str(exc).splitlines()[0])
    except DBusError as exc:  # systemd refused the candidate itself (an invalid combination): not a fix
        candidate.stop()
        return TrialResult(False, f"systemd rejected this hardening: {exc.text}")
    try:
        if scenario is not None:
            for earlier in preceding:
                run_scenario(candidate, earlier, deadline)
            outcome = run_scenario(candidate, scenario, deadline)
            if not outcome.passed:
                return TrialResult(False, "; ".join(outcome.problems), failure_report(candidate, outcome))
        if restart:
            if deadline is not None:
                deadline.check()
            try:
                candidate.restart()
            except ServiceFailed as exc:
                return TrialResult(False, f"after a restart on that machine: {str(exc).splitlines()[0]}", str(exc),
                                   after_restart=True)
            except DBusError as exc:
                return TrialResult(False, f"systemd refused to restart it on that machine: {exc.text}",
                                   after_restart=True)
        return TrialResult(True)
    finally:
        candidate.stop()


def first_failing(service: HardenedService,
                  deadline: Deadline | None = None) -> tuple[Scenario, ScenarioOutcome] | None:
    """The first of the spec's scenarios, run in order on the started ``service``, that fails, with its outcome."""
    for scenario in service.spec.scenarios:
        outcome = run_scenario(service, scenario, deadline)
        if not outcome.passed:
            return scenario, outcome
    return None


def diagnosed_failure(service: HardenedService) -> str:
    """``service`` started and every scenario run (a tightened spec on another release it ships on): "" if all
    pass, else what failed with its diagnosis there (the directive that breaks it, and the fix)."""
    failed: Scenario | None = None
    try:
        service.start()
    except ServiceFailed as exc:
        evidence = str(exc)
    else:
        failing = first_failing(service)
        if failing is None:
            service.stop()
            return ""
        failed, evidence = failing[0], failure_report(service, failing[1])
    try:
        diagnosis = diagnose_failure(service, failed, evidence).render()
    finally:
        service.stop()
    what = f"scenario {failed.name!r}" if failed is not None else "the service does not start"
    return f"{what}\n{diagnosis}"


def all_scenarios_trial(service: HardenedService, deadline: Deadline | None = None, *,
                        fresh: bool = False) -> Trial:
    """An oracle for :func:`tighten`: the service starts under a hardening and every scenario passes, in order.
    With a ``deadline``, every wait is capped by it (:class:`Deadline`); with ``fresh``, each run is on a machine
    booted for it alone (:func:`_rerun_machine`)."""

    def trial(hardening: Hardening) -> TrialResult:
        with _rerun_machine(service, fresh) as machine:
            return attempt(machine, hardening)

    def attempt(machine: Machine, hardening: Hardening) -> TrialResult:
        spec = service.spec.with_hardening(hardening)
        candidate = HardenedService(machine, deadline.spec(spec) if deadline else spec, unit=service.unit)
        try:
            try:
                candidate.start()
            except ServiceFailed as exc:
                return TrialResult(False, "the service did not start", str(exc))
            except DBusError as exc:
                return TrialResult(False, f"systemd rejected this hardening: {exc.text}")
            failing = first_failing(candidate, deadline)
            if failing is not None:
                scenario, outcome = failing
                return TrialResult(False, f"scenario {scenario.name!r}: {'; '.join(outcome.problems)}",
                                   failure_report(candidate, outcome))
            return TrialResult(True)
        finally:
            candidate.stop()

    return deadline.bounded(trial) if deadline else trial


def _verify_dropin(service: HardenedService, result: Tightening, deadline: Deadline | None = None, *,
                   fresh: bool = True) -> None:
    """The printed drop-in, as a maintainer would ship it: written literally as a file after the spec's own
    hardening, on the unit under test, every scenario run once more (``result.dropin_verified``). With ``fresh``
    on a machine booted for it, then the service restarted there (:func:`_fresh_and_restarted`), as a host meets
    it after the package's install; else on the service's own machine. Not on a machine whose unit files are not
    ours to write (the host backend). A check that cannot be made (no time left, a machine that does not boot)
    leaves it unchecked (None), with the reason in the note."""
    if not service.machine.WRITES_UNIT_FILES:
        return
    scenarios = service.spec.scenarios
    last = scenarios[-1] if scenarios else None  # every scenario, in order
    candidate = _with_dropin(service, result.dropin(), deadline)
    try:
        outcome = _fresh_and_restarted(service, candidate, last, deadline) if fresh else _rerun(
            service, candidate(service.machine), last, deadline)
    except (BudgetExceeded, HardenError) as exc:  # no time left, or a twin that did not boot: nothing to ship
        result.dropin_verified, result.dropin_failure, result.dropin_unchecked = None, "", str(exc).splitlines()[0]
        return
    result.runs += 1
    result.dropin_verified, result.dropin_on_fresh_machine, result.dropin_unchecked = outcome.passed, fresh, ""
    result.dropin_failure = "" if outcome.passed else outcome.summary
    result.dropin_failed_after_restart = outcome.after_restart


def _verify_enforcement(service: HardenedService, result: Tightening, deadline: Deadline | None = None,
                        rounds: int = 3, *, fresh: bool = False) -> None:
    """Scenarios cannot see a step that quietly undoes another directive (on systemd 252, ExecPaths= reopens a
    read-only /usr): check every directive of the result is enforced, and revert the steps found undoing one. A
    revert is checked by the scenarios too: a later step may have needed what the reverted one brought."""
    for _ in range(rounds):
        candidate = HardenedService(service.machine, service.spec.with_hardening(result.after), unit=service.unit)
        candidate.start()
        try:
            report = verify_service(candidate, denials=())
        finally:
            candidate.stop()
        broken = [v for v in report.verdicts.values() if v.status == NOT_ENFORCED]
        result.enforcement_checked = True
        if not broken:
            return
        reverted = []
        for verdict in broken:
            suspects = [d.name for d in verdict.suspects]
            reverted += revert(result, suspects, f"undoes {verdict.subject.name} (enforcement check)")
        if not reverted:
            result.note = "not enforced after tightening: " + "; ".join(v.subject.name for v in broken)
            return
        check = all_scenarios_trial(service, deadline, fresh=fresh)(result.after)
        result.runs += 1
        if not check.passed:
            fall_back(result, check.summary)


# --- observation: one run with strace attached ----------------------------------------------------------------

OBSERVE_DIR = "/run/harden-observe"
# The drop-in that wraps a loaded unit's start commands in the tracer, read after harden.conf.
OBSERVE_DROPIN_NAME = "zz-harden-observe.conf"
# -D: strace runs as a detached grandchild, so the service's main process is the service itself (Type=notify and
# MainPID= work as usual) and an inside command ends when it does, not when a daemon it started (gpg-agent) does.
# -y: paths of file descriptors, so a write through a descriptor names its file. No -yy: that asks netlink, which
# RestrictAddressFamilies= may deny to the tracer.
STRACE = ("strace", "-f", "-D", "-qq", "-y")


class ObservationFailed(Exception):
    """The traced run could not be made; tighten then searches without observations."""


def observe(service: HardenedService, hardening: Hardening | None = None, *,
            deadline: Deadline | None = None) -> Observation:
    """One run of ``service`` under ``hardening`` (default: its spec's) with strace attached to the service and to
    every ``inside`` scenario, each scenario run once; what they did, as an :class:`Observation`.

    The run keeps the hardening: scenarios that expect a denial still get it, so what they try is seen failing and
    is not mistaken for a need (run without hardening, ``touch /etc/x`` would ask for ReadWritePaths=/etc). Only
    what the tracer itself needs is added: its output directory, and ptrace(2) if a syscall filter is set.
    ``client`` scenarios run unconfined and untraced; what the service does for them is in the service's trace.
    With a ``deadline``, the scenarios' timeouts are capped by it.
    """
    machine = service.machine
    spec = service.spec
    hardening = spec.hardening if hardening is None else hardening
    directory = f"{OBSERVE_DIR}/{service.unit.removesuffix('.service')}"
    script = 'command -v strace || exit 3; rm -rf "$1"; mkdir -p -m 1777 "$1"'
    prepared = machine.run(["/bin/sh", "-c", script, "sh", directory], purpose="observe")
    if prepared.exit_status == 3:
        raise ObservationFailed("strace is not installed on the machine (base images since recipe 3 have it)")
    if not prepared.ok:
        raise ObservationFailed(f"could not prepare {directory}: {prepared.stderr.strip()}")
    traced_hardening = _for_tracer(hardening, directory, service.under_test.own_directives(),
                                   prepared.stdout.split()[0])

    def trace_file(label: str) -> str:
        return f"{directory}/{'service' if label == 'ExecStart' else label}"

    def tracer(label: str) -> tuple[str, ...]:
        return (*STRACE, "-o", trace_file(label), "--")

    try:
        # A unit systemd loads keeps its own command lines, type and PIDFile=: the tracer goes in front of each
        # command its start runs (an ExecStartPre= that makes the directories the daemon then finds made).
        wrapped = service.under_test.wrapped_exec_start(tracer)
    except ValueError as exc:
        raise ObservationFailed(str(exc)) from None
    traced_spec = replace(spec, hardening=traced_hardening) if wrapped is not None else replace(
        spec, hardening=traced_hardening, service=replace(spec.service, exec_start=(*tracer("ExecStart"),
                                                                                    *spec.service.exec_start)))
    traced = HardenedService(machine, deadline.spec(traced_spec) if deadline else traced_spec, unit=service.unit)
    runs = [("the service", f"{directory}/service")]
    if wrapped is not None:
        dropin, labels = wrapped
        traced.under_test.own_dropins[OBSERVE_DROPIN_NAME] = dropin
        runs = [("the service" if label == "ExecStart" else "the service's {}= #{}".format(*label.split("-")),
                 trace_file(label)) for label in labels]
    problems: list[str] = []
    try:
        try:
            traced.start()
        except (ServiceFailed, DBusError) as exc:
            raise ObservationFailed(f"the service did not start under strace: {str(exc).splitlines()[0]}") from exc
        for index, scenario in enumerate(spec.scenarios):
            if scenario.where == "inside":
                argv = ["/bin/sh", "-c", scenario.command] if isinstance(scenario.command, str) \
                    else list(scenario.command)
                trace = f"{directory}/scenario-{index}"
                timeout = deadline.cap(scenario.timeout) if deadline else scenario.timeout
                result = traced.inside([*STRACE, "-o", trace, "--", *argv], timeout)
                runs.append((f"scenario {scenario.name!r}", trace))
            else:
                result = traced.client(scenario.command, deadline.cap(scenario.timeout) if deadline
                                       else scenario.timeout)
            problems += [f"scenario {scenario.name!r} {p}" for p in mismatches(scenario.expect, result)]
    finally:
        traced.stop()
    observation = Observation()
    for run, path in runs:
        text = machine.run(["cat", path], purpose="observe", timeout=120)
        if text.ok:
            observation = observation.merge(parse_strace(text.stdout, run, cwd=spec.service.working_directory or "/"))
    if observation.execs:  # NoNewPrivileges= stops the privileges of setuid programs: which ran?
        found = machine.run(["find", *observation.execs, "-maxdepth", "0", "-perm", "/6000"], purpose="observe")
        observation.setuid_execs = {path: observation.execs[path] for path in found.stdout.splitlines()
                                    if path in observation.execs}
    files = [path for path in observation.reads if not path.startswith(("/proc/", "/sys/", "/dev/", OBSERVE_DIR))]
    if files:  # a dynamic user could not read what only the owner and group may
        found = machine.run(["find", *files, "-maxdepth", "0", "!", "-type", "l", "!", "-perm", "-o=r"],
                            purpose="observe")
        observation.private_reads = {path: observation.reads[path] for path in found.stdout.splitlines()
                                     if path in observation.reads}
    machine.run(["rm", "-rf", directory], purpose="observe")
    observation.failures += problems
    return observation


def _for_tracer(hardening: Hardening, directory: str, own: Sequence[Directive] = (),
                tracer: str = "/usr/bin/strace") -> Hardening:
    """``hardening`` plus what strace needs: its output directory writable, ptrace(2) through a syscall filter
    (the spec's, or the unit's ``own`` one, which a drop-in line adds to), and the ``tracer`` program executable
    where NoExecPaths= or ExecPaths= are in force (redis-server's unit: NoExecPaths=/ with ExecPaths= naming only
    redis-server and the libraries, which left strace unstartable and tighten without observations)."""
    out = list(hardening)
    grant = f"-{directory}"
    executable = tracer if any(d.name in ("NoExecPaths", "ExecPaths") for d in (*hardening, *own)) else ""
    for index, directive in enumerate(out):
        if directive.name == "SystemCallFilter":
            out[index] = Directive(directive.name, (*directive.assignments, "ptrace"), directive.line)
        elif directive.name == "ReadWritePaths":
            out[index] = Directive(directive.name, (*directive.assignments, grant), directive.line)
            grant = ""
        elif directive.name == "ExecPaths" and executable:
            out[index] = Directive(directive.name, (*directive.assignments, executable), directive.line)
            executable = ""
    if grant:
        out.append(Directive("ReadWritePaths", (grant,)))
    if executable:
        out.append(Directive("ExecPaths", (executable,)))
    if not any(d.name == "SystemCallFilter" for d in hardening) and any(d.name == "SystemCallFilter" for d in own):
        out.append(Directive("SystemCallFilter", ("ptrace",)))
    return tuple(out)


def tighten_service(service: HardenedService, *, keep: Sequence[str] = (), never: Sequence[str] = (),
                    max_runs: int = 200, max_seconds: float = 900.0, catalogue: Sequence[Step] = CATALOGUE,
                    observations: bool = True, together: bool | None = None) -> Tightening:
    """The strictest hardening under which ``service``'s spec still starts and passes every scenario.

    With ``observations`` (the default), one traced run first (:func:`observe`) orders and pre-narrows the search,
    and the steps it forecasts to fit are tried together (``together``: see :func:`tighten`).

    The search runs on the service's machine, where every run finds what the runs before it left (a package's
    /var/lib, chowned at a first start that could: no later start chowns again, so a result without CAP_CHOWN
    passes there). Its drop-in is checked on a freshly booted machine, as a host is after the install; where it
    fails there but the spec as written passes there, the search is made again with every run on a fresh machine.
    """
    # One budget for the whole tighten: the traced runs, both searches and the checks.
    deadline = Deadline(max_seconds, f"tighten ({max_seconds:g}s)")

    def search(fresh: bool, max_runs: int) -> Tightening:
        if fresh:
            deadline.check()
        return _search_tightening(service, deadline, fresh=fresh, keep=keep, never=never, max_runs=max_runs,
                                  catalogue=catalogue, observations=observations, together=together,
                                  reserve=min(60.0, max_seconds / 10))

    def spec_on_fresh_machine() -> TrialResult:
        return all_scenarios_trial(service, deadline, fresh=True)(service.spec.hardening)

    def check_here(result: Tightening) -> None:
        _verify_dropin(service, result, deadline, fresh=False)

    begun = time.monotonic()
    try:
        result = _tightened(search, spec_on_fresh_machine, check_here, max_runs)
        result.seconds = time.monotonic() - begun  # all of it: both searches, the checks, the boots of twins
        return result
    finally:
        try:
            service.start()
        except ServiceFailed:
            pass


def _tightened(search: Callable[[bool, int], Tightening], spec_on_fresh_machine: Callable[[], TrialResult],
               check_here: Callable[[Tightening], None], max_runs: int) -> Tightening:
    """:func:`tighten_service`'s searches (``search(fresh, max_runs)``): on the service's machine, and again on
    fresh machines if the first result's drop-in fails on one while the spec as written passes there
    (``spec_on_fresh_machine``); if that fails too, the drop-in is checked on the service's machine
    (``check_here``)."""
    first = search(False, max_runs)
    if first.dropin_verified is not False:  # checked and passed, or not checked (no time, or the host backend)
        return first
    if first.dropin_failed_after_restart:  # a search on fresh machines sees first starts only: it would not help
        first.note = _joined(first.note, "the service fails when restarted on a freshly booted machine under the "
                                         "drop-in, which no run of the search restarts")
        return first
    try:
        control = spec_on_fresh_machine()
        first.runs += 1
        if not control.passed:
            # The scenarios need what was made on this machine before tighten (a test's own files), which a
            # fresh machine lacks: the drop-in can be checked on this machine only.
            check_here(first)
            first.note = _joined(first.note, f"on a freshly booted machine the spec as written fails too "
                                              f"({control.summary}): the scenarios need what was made on this "
                                              "machine before tighten")
            return first
        again = search(True, max(1, max_runs - first.runs))
    except (BudgetExceeded, HardenError) as exc:  # the first result, marked as failing fresh, rather than none
        first.note = _joined(first.note, f"it could not be searched again on freshly booted machines: {exc}")
        return first
    again.runs += first.runs
    if again.dropin_verified is False:
        first.runs = again.runs
        first.note = _joined(first.note, "searched again with every run on a freshly booted machine, where the "
                                         f"result does not pass either ({again.dropin_failure})")
        return first
    # Checked and passed; or nothing more passes on a fresh machine (the result is the spec as written, which the
    # control just passed there), or its check could not be made (the note says why).
    again.note = _joined("the first search's result passed on the machine it ran on, but not on a freshly "
                         "booted one: earlier runs had changed what the service finds there (files it keeps, "
                         "which a stop does not take back); searched again with every run on a freshly booted "
                         "machine", again.note)
    return again


def _joined(*notes: str) -> str:
    return "; ".join(filter(None, notes))


def _search_tightening(service: HardenedService, deadline: Deadline, *, fresh: bool, keep: Sequence[str],
                       never: Sequence[str], max_runs: int, catalogue: Sequence[Step], observations: bool,
                       together: bool | None, reserve: float = 0.0) -> Tightening:
    """One tighten search (:func:`tighten_service`): with ``fresh``, the traced run and every run of the search on
    a machine booted for it alone (:func:`_rerun_machine`); the drop-in then checked on a fresh machine, in the
    ``reserve`` seconds the search leaves of the deadline for it (a result not checked is not shipped)."""
    observation, note, started = None, "", time.monotonic()
    if observations:
        try:
            with _rerun_machine(service, fresh) as machine:
                traced_on = service if machine is service.machine else service.on(machine)
                observation = observe(traced_on, deadline=deadline)
        except ObservationFailed as exc:
            note = f"searched without observations: {exc}"
    observed_in = time.monotonic() - started
    groups = machine_syscall_groups(service.machine)
    # The traced run was the spec's own hardening with every scenario: when all passed, it is the baseline.
    baseline = TrialResult(True, "passed while traced") if observation and not observation.failures else None
    result = tighten(service.spec.hardening, all_scenarios_trial(service, deadline, fresh=fresh), catalogue=catalogue,
                     keep=keep, never=never, syscall_groups=groups, max_runs=max_runs,
                     max_seconds=max(0.0, deadline.left() - reserve),
                     observation=observation, baseline=baseline, together=together,
                     scenarios_from_outside=any(s.where == "client" for s in service.spec.scenarios),
                     offline=service.spec.tighten_offline, own=service.under_test.own_directives())
    result.instance = service.spec.service.instance
    if observations:  # the traced run is part of the cost (its time is in tighten_service's wall time)
        result.runs += 1 if observation is not None else 0
        result.observe_seconds = observed_in
        result.note = _joined(result.note, note)
    if result.after != result.before:
        try:
            deadline.check()
            _verify_enforcement(service, result, deadline, fresh=fresh)
        except (BudgetExceeded, HardenError) as exc:  # a result unchecked beats none; the note says so
            result.note = _joined(result.note, f"enforcement not checked: {str(exc).splitlines()[0]}")
        _verify_dropin(service, result, deadline)
    return result


def _first_named(first: Diagnosis) -> str:
    """What the first search (on the service's machine) named, and why that is no fix for a host."""
    named = "; ".join(f"{'; '.join(f.culprit.unit_lines())}" + (f" ({f.relaxation.description})" if f.relaxation
                                                                  else "") for f in first.findings)
    return (f"The search on the service's machine named {named or 'no culprit'}, but its fix, written as a drop-in, "
            f"fails on a freshly booted machine ({first.dropin_failure}): earlier reruns had changed what the service "
            "finds there (files it keeps, which a stop does not take back), so that fix is not printed.")


def _unconfirmed(first: Diagnosis, why: str, verdict: str) -> Diagnosis:
    """The first search's result, whose drop-in failed on a freshly booted machine where the check passes without
    the hardening, when no search there found anything (``why``): what it named is told in the note, and no fix is
    printed, since a host would refuse it. The kernel's records of the failing check stay."""
    first.note = f"{first.note} {_first_named(first)} {why}".strip()
    first.verdict = verdict
    first.findings, first.combined, first.verified = [], None, False
    first.dropin_verified, first.dropin_failure = None, ""
    return first


def _diagnosed(search: Callable[[bool, int], Diagnosis], unhardened_on_fresh_machine: Callable[[], TrialResult],
               max_runs: int) -> Diagnosis:
    """:func:`diagnose_failure`'s searches (``search(fresh, max_runs)``).

    The search reruns on the service's machine, where each rerun finds what the ones before it left: files the
    service keeps (a package's /var/lib) stay changed by a rerun that got further. The printed drop-in is checked on
    a fresh machine. If it fails there, either the fix held only on what earlier reruns left, or the check needs
    what was made on this machine before the diagnosis (a test's own files), which a fresh one lacks: told apart by
    the check without hardening on a fresh machine (``unhardened_on_fresh_machine``). In the first case the search
    is made again with every rerun on a fresh machine (a boot each: slower, and what a host meets).
    """
    first = search(False, max_runs)
    if first.dropin_verified is not False:  # checked and passed, or not checked (the host backend: no twin)
        return first
    if first.dropin_failed_after_restart:  # a search on fresh machines sees first starts only: it would not help
        first.note = (f"{first.note} Its fix, written as a drop-in, passes the failing check on a freshly booted "
                      f"machine, but the service fails when restarted there ({first.dropin_failure}), so it is not "
                      "printed.").strip()
        first.combined, first.verified, first.dropin_verified, first.dropin_failure = None, False, None, ""
        return first
    started = time.monotonic()
    try:
        unhardened = unhardened_on_fresh_machine()
        first.runs += 1
        if not unhardened.passed:
            first.note += (" That was on a freshly booted machine, where the check fails without any hardening "
                           f"too ({unhardened.summary}): it needs what was made on this machine before the "
                           "diagnosis, so the fix is verified on this machine only, as a spec change.")
            return first
        again = search(True, max(1, max_runs - first.runs))
    except (BudgetExceeded, HardenError) as exc:
        return _unconfirmed(first, f"It could not be searched again on freshly booted machines: {exc}.",
                            "budget" if isinstance(exc, BudgetExceeded) else "inconclusive")
    finally:
        first.seconds += time.monotonic() - started
    again.runs += first.runs
    again.seconds = first.seconds  # both searches and the check between them (the finally above)
    if not (again.verified and again.dropin_verified):
        if again.findings:  # found on fresh machines, if not (all) verified: those culprits are a host's
            again.note = (f"{_first_named(first)} Searched again with every rerun on a freshly booted machine: "
                          f"{again.note}").strip()
            if again.dropin_verified is False:  # its fix, as a drop-in, fails there too: not printed either
                again.note += f" Its fix, written as a drop-in, does not pass there either ({again.dropin_failure})."
                again.combined, again.verified, again.dropin_verified, again.dropin_failure = None, False, None, ""
            return again
        first.runs = again.runs
        return _unconfirmed(first, "Searched again with every rerun on a freshly booted machine, where no fix "
                                   f"was verified ({again.verdict}: {again.full_note or 'nothing found'}).",
                            "budget" if again.verdict == "budget" else "inconclusive")
    again.note = ("The first search's fix passed on the machine it ran on, but not on a freshly booted one: "
                  "earlier reruns had changed what the service finds there (files it keeps, which a stop does "
                  "not take back). Searched again, every rerun on a freshly booted machine. "
                  + again.note).strip()
    return again


def diagnose_failure(service: HardenedService, scenario: Scenario | None, evidence: str, *, max_runs: int = 60,
                     max_seconds: float = 300.0, previous: Sequence[Diagnosis] = ()) -> Diagnosis:
    """Diagnose why ``scenario`` (None: the start) fails under ``service``'s hardening, then restore the service."""
    deadline = Deadline(max_seconds, "diagnosis", "raise it with --harden-diagnose-seconds")
    kernel_log = KernelLog.open()

    def observed_denials() -> str:
        """A traced run of the spec (the failing check among its scenarios): the paths its calls were refused."""
        try:
            return denial_lines(observe(service, deadline=deadline))
        except (ObservationFailed, BudgetExceeded):
            return ""

    # The unit's own directives are suspects too: the search runs on what is in force (unit file, then drop-in).
    own = service.under_test.own_directives()
    hardening = effective_hardening(own, service.spec.hardening)

    def search(fresh: bool, max_runs: int) -> Diagnosis:
        return diagnose(hardening, _trial(service, scenario, deadline, kernel_log, own, fresh=fresh),
                        evidence=evidence, syscall_groups=machine_syscall_groups(service.machine), max_runs=max_runs,
                        max_seconds=max_seconds, spec_name=service.spec.path.name, previous=previous,
                        observe=observed_denials, check_dropin=_dropin_trial(service, scenario, deadline))

    def unhardened_on_fresh_machine() -> TrialResult:
        # Without hardening as the search's own control is: what configures the service (User=, StateDirectory=,
        # Environment=) stays.
        control = tuple(d for d in hardening if d.name not in RESTRICTING)
        return _trial(service, scenario, deadline, None, own, fresh=True)(control)

    try:
        return _diagnosed(search, unhardened_on_fresh_machine, max_runs)
    finally:
        if kernel_log is not None:
            kernel_log.close()
        try:
            service.start()  # the scenarios after this one run against the spec as written
        except ServiceFailed:
            pass
