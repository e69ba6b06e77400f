"""Every wait is bounded: a command's timeout ends its whole unit, teardown escalates to SIGKILL, the diagnosis keeps
to its time budget, and no nspawn runtime directory outlives its machine (nor a killed run).

Timing bounds are generous: each still fails against the old behaviour (a command that ignored SIGTERM outlived
timeout: 3 by 30 s, a service that ignored it failed teardown after 60 s), and none asserts speed tightly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_systemd_harden.machine import staging
from pytest_systemd_harden.machine.backends import nspawn
from pytest_systemd_harden.machine.backends.base import Machine
from pytest_systemd_harden.search.diagnosis import BudgetExceeded, TrialResult
from pytest_systemd_harden.search.scenarios import Deadline, diagnose_failure, run_scenario
from pytest_systemd_harden.spec.load import Spec
from pytest_systemd_harden.spec.machine import MachineConfig
from pytest_systemd_harden.unit.pool import MachinePool
from pytest_systemd_harden.unit.service import HardenedService

IGNORES_SIGTERM = "trap '' TERM; sleep 60"


@pytest.fixture
def service(machine: Machine, make_spec: Callable[[str], Spec]) -> Iterator[Callable[[str], HardenedService]]:
    started: list[HardenedService] = []

    def start(text: str) -> HardenedService:
        started.append(HardenedService(machine, make_spec(text)))
        started[-1].start()
        return started[-1]

    yield start
    for each in started:
        each.stop()


@pytest.mark.parametrize("where", ["client", "inside"])
def test_a_command_that_ignores_sigterm_is_killed_at_its_timeout(service, where: str) -> None:  # type: ignore[no-untyped-def]
    harden = service(f"""
service:
  exec_start: /bin/sleep infinity
hardening:
  ProtectSystem: strict
scenarios:
  - name: hangs
    {where}: "{IGNORES_SIGTERM}"
    timeout: 3
""")
    started = time.monotonic()
    outcome = run_scenario(harden, harden.spec.scenarios[0])
    took = time.monotonic() - started
    assert took < 20, f"took {took:.1f}s for a 3s timeout"  # was 33 s (90 s as systemd's default would have it)
    assert outcome.result.signal == signal.SIGKILL, outcome.result.describe()
    assert "killed at its 3s timeout: it ignored SIGTERM, so SIGKILL followed 2s later" in outcome.result.stderr


def test_a_command_that_ends_at_its_timeout_gets_sigterm(machine: Machine) -> None:
    result = machine.run("sleep 60", timeout=1)
    assert result.signal == signal.SIGTERM
    assert "killed at its 1s timeout: SIGTERM to every process of its unit" in result.stderr


def test_the_leftovers_of_a_killed_command_do_not_cost_its_timeout(service) -> None:  # type: ignore[no-untyped-def]
    # The main process is killed; its child, which ignores SIGTERM, still holds the command's stdout.
    harden = service("""
service:
  exec_start: /bin/sleep infinity
scenarios:
  - name: killed, with a child left
    inside: "trap '' TERM; sleep 300 & kill -KILL $$"
    timeout: 60
""")
    started = time.monotonic()
    outcome = run_scenario(harden, harden.spec.scenarios[0])
    took = time.monotonic() - started
    assert took < 20, f"took {took:.1f}s"  # was the whole 60 s timeout, then 30 s more
    assert outcome.result.signal == signal.SIGKILL
    assert "timeout" not in outcome.result.stderr  # it ended by itself; only what it left was killed
    assert harden.machine.run("pgrep -x sleep -a | grep -v infinity").stdout == ""


def test_a_service_that_ignores_sigterm_tears_down_cleanly(pytester: pytest.Pytester) -> None:
    pytester.makefile(".yaml", harden=f"""
service:
  exec_start: ["/bin/sh", "-c", "{IGNORES_SIGTERM.replace('60', 'infinity')}"]
scenarios:
  - name: runs
    client: "true"
""")
    started = time.monotonic()
    result = pytester.runpytest()
    took = time.monotonic() - started
    result.assert_outcomes(passed=2)  # it used to end in an error at teardown ("did not settle within 30s")
    assert "Traceback" not in result.stdout.str()
    result.stdout.fnmatch_lines([
        "*= systemd hardening teardown =*",
        ("harden.yaml: harden-harden.service was still running 5s after SIGTERM, so every process of its unit was "
         "killed with SIGKILL*"),
    ])
    assert took < 45, f"took {took:.1f}s"


def test_the_diagnosis_of_a_hanging_scenario_keeps_to_its_budget(service) -> None:  # type: ignore[no-untyped-def]
    harden = service("""
service:
  exec_start: /bin/sleep infinity
hardening:
  ProtectSystem: strict
  PrivateTmp: yes
scenarios:
  - name: hangs when it cannot write
    inside: "touch /etc/harden-probe 2>/dev/null || sleep 300"
    timeout: 60
""")
    started = time.monotonic()
    diagnosis = diagnose_failure(harden, harden.spec.scenarios[0], "(hung)", max_seconds=5)
    took = time.monotonic() - started
    assert took < 25, f"took {took:.1f}s for a 5s budget"  # each rerun used to wait out the 60 s timeout
    assert diagnosis.verdict == "budget"
    assert "the time budget for diagnosis is spent" in diagnosis.note


def test_a_deadline_caps_waits_and_ends_the_search_instead_of_a_verdict() -> None:
    deadline = Deadline(30, "diagnosis")
    assert deadline.cap(60) <= 30 and deadline.cap(5) == 5
    assert deadline.bounded(lambda _hardening: TrialResult(False, "denied"))(()) == TrialResult(False, "denied")
    spent = Deadline(0, "diagnosis")
    assert spent.cap(60) == 1.0  # a command still gets a second
    with pytest.raises(BudgetExceeded, match="the time budget for diagnosis is spent"):
        spent.bounded(lambda _hardening: TrialResult(False, "a capped wait ran out"))(())
    with pytest.raises(BudgetExceeded):  # no rerun starts once it is spent
        spent.bounded(lambda _hardening: TrialResult(True))(())


# --- nspawn runtime directories ------------------------------------------------------------------------------------

def test_a_stopped_machine_leaves_no_nspawn_runtime_directory() -> None:
    pool = MachinePool(backend="nspawn")
    try:
        machine = pool.machine_for(MachineConfig(packages=()))
        name = machine.name
        assert (nspawn.NSPAWN_RUNTIME / "propagate" / name).is_dir()  # the check below would otherwise be empty
    finally:
        pool.close()
    assert not list(nspawn.NSPAWN_RUNTIME.glob(f"*/{name}"))


def test_the_sweep_removes_only_dead_machines_of_ours(tmp_path: Path) -> None:
    for name in ("harden-0000dead", "harden-0000a11e", "other-machine"):
        (tmp_path / "propagate" / name).mkdir(parents=True)
    (tmp_path / "propagate" / "harden-0000dead" / "notify").write_text("")
    # A process whose command line names harden-0000a11e stands for a live machine (another run's).
    # (sleep 30; :) keeps the shell, and so its command line, alive: dash would exec a lone last command.
    alive = subprocess.Popen(["/bin/sh", "-c", "sleep 30; :", "--machine", "harden-0000a11e"])
    deadline = time.monotonic() + 10  # right after Popen its /proc/PID/cmdline may still be empty
    while b"harden-0000a11e" not in Path(f"/proc/{alive.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        removed = nspawn.sweep_runtime_leftovers(tmp_path)
    finally:
        alive.kill()
        alive.wait()
    assert removed == [str(tmp_path / "propagate" / "harden-0000dead")]
    assert sorted(p.name for p in (tmp_path / "propagate").iterdir()) == ["harden-0000a11e", "other-machine"]


def test_the_sweep_never_removes_across_a_mount_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    leftover = tmp_path / "propagate" / "harden-0000dead"
    leftover.mkdir(parents=True)
    monkeypatch.setattr(staging, "mounts_under", lambda path: [f"{path}/incoming"])
    assert nspawn.sweep_runtime_leftovers(tmp_path) == []
    assert leftover.is_dir()


def test_the_next_run_removes_what_a_killed_run_left(tmp_path: Path) -> None:
    (tmp_path / "harden.yaml").write_text("""
service:
  exec_start: /bin/sleep infinity
scenarios:
  - name: long
    client: sleep 120
    timeout: 200
""")
    run = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--harden-backend=nspawn",
                            "harden.yaml"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, "PYTEST_ADDOPTS": ""})
    name = None
    try:
        assert run.stdout is not None
        for line in run.stdout:  # "[harden] harden-XXXXXXXX booted in 1.2s (nspawn)"
            if " booted in " in line:
                name = line.split()[1]
                break
        assert name is not None, "the run did not boot a machine"
        time.sleep(2)  # into the scenario
    finally:
        run.kill()  # SIGKILL: nothing of ours runs to clean up
        run.wait()
    # Its container goes (pdeathsig); whatever nspawn left is the next run's to remove.
    deadline = time.monotonic() + 30
    while name in nspawn._running_machines() and time.monotonic() < deadline:
        time.sleep(0.2)
    pool = MachinePool(backend="nspawn")
    try:
        pool.machine_for(MachineConfig(packages=()))
    finally:
        pool.close()
    assert not list(nspawn.NSPAWN_RUNTIME.glob(f"*/{name}"))
