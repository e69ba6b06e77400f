"""Tighten on a real machine: the result passes, scores better, and a step that undoes another is reverted; one
traced run observes what the service and its scenarios do."""

from __future__ import annotations

from collections.abc import Callable

from pytest_systemd_harden.machine.backends.base import Machine
from pytest_systemd_harden.report import exposure
from pytest_systemd_harden.search.observe import NARROWED
from pytest_systemd_harden.search.scenarios import observe, run_scenario, tighten_service
from pytest_systemd_harden.search.tighten import Step
from pytest_systemd_harden.spec.load import Spec
from pytest_systemd_harden.unit.service import HardenedService

WEB = """
service:
  exec_start: /usr/bin/python3 -m http.server --bind 127.0.0.1 8090
  ready: {tcp: 8090}
hardening:
  PrivateTmp: yes
scenarios:
  - name: serves
    client: python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8090/')"
  - name: keeps a cache
    inside: sh -c 'mkdir -p /var/lib/web && touch /var/lib/web/entry'
"""


def test_the_tightened_spec_passes_and_scores_lower(machine: Machine, make_spec: Callable[[str], Spec]) -> None:
    spec = make_spec(WEB)
    service = HardenedService(machine, spec)
    service.start()
    try:
        result = tighten_service(service, never=["PrivateUsers"])
    finally:
        service.stop()
    assert result.enforcement_checked and not result.note
    assert result.dropin_verified  # the printed drop-in, written as a file after the spec's, passes every scenario
    # one traced run told it where the service writes: the dynamic user came with its state directory at once
    assert result.observation is not None and "/var/lib/web/entry" in result.observation.writes
    dynamic_user = next(o for o in result.outcomes if o.step.name.startswith("DynamicUser=yes"))
    assert (dynamic_user.kept, dynamic_user.forecast, dynamic_user.first_time) == ("narrowed", NARROWED, True)
    assert result.first_time() >= len(result.tried) - 2  # at most ProcSubset= and PrivateNetwork= failed
    tightened = spec.with_hardening(result.after)
    lines = {line for d in result.after for line in d.unit_lines()}
    assert {"DynamicUser=yes", "StateDirectory=web", "RestrictAddressFamilies=AF_UNIX AF_INET"} <= lines
    assert "PrivateNetwork=yes" not in lines
    check = HardenedService(machine, tightened)
    check.start()
    try:
        assert all(run_scenario(check, s).passed for s in tightened.scenarios)
    finally:
        check.stop()
    before, after = exposure.score(machine, spec), exposure.score(machine, tightened)
    assert after.tenths < before.tenths, (before.describe(), after.describe())


def test_a_step_that_quietly_undoes_protect_system_is_reverted(machine: Machine,
                                                               make_spec: Callable[[str], Spec]) -> None:
    spec = make_spec(WEB.replace("  PrivateTmp: yes\n", "  ProtectSystem: strict\n  StateDirectory: web\n"))
    service = HardenedService(machine, spec)
    service.start()
    try:
        # On systemd 252, ExecPaths=/usr mounts /usr again writable under ProtectSystem=strict; no scenario sees it.
        result = tighten_service(service, catalogue=[Step.of("exec only from /usr", NoExecPaths="/", ExecPaths="/usr")])
    finally:
        service.stop()
    assert [(o.kept, o.detail) for o in result.outcomes] == [
        ("rejected", "undoes ProtectSystem=strict (enforcement check)")]
    assert result.after == spec.hardening


SUID = """
service:
  exec_start: /usr/bin/python3 -m http.server --bind 127.0.0.1 8091
  ready: {tcp: 8091}
hardening:
  ProtectSystem: strict
  SystemCallFilter: ["@system-service"]
  SystemCallErrorNumber: EPERM
scenarios:
  - name: serves
    client: python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8091/')"
  - name: runs a setuid program
    inside: su --help
  - name: reads what only root may
    inside: head -c1 /etc/shadow
  - name: the system stays read-only
    inside: touch /etc/observed-was-here
    expect: {exit: 1, stderr: Read-only file system}
"""


def test_one_traced_run_under_the_specs_own_hardening(machine: Machine, make_spec: Callable[[str], Spec]) -> None:
    spec = make_spec(SUID)
    service = HardenedService(machine, spec)
    observation = observe(service)
    assert observation.failures == []  # every scenario passed while traced, the denial included
    assert observation.binds == {"127.0.0.1:8091": "python3 (the service)"}
    assert observation.setuid_execs == {"/usr/bin/su": "sh (scenario 'runs a setuid program')"}
    assert "/etc/shadow" in observation.private_reads  # mode 0640: a dynamic user could not read it
    assert "/etc/observed-was-here" not in observation.writes  # denied under the spec: not a need
    assert "/usr/bin/touch" in observation.execs and "mlock" not in observation.syscalls
    # nothing left behind: the traces are removed and the traced service stopped
    assert not machine.run(["test", "-e", "/run/harden-observe/" + service.unit.removesuffix(".service")]).ok
    assert service.state()["ActiveState"] != "active"
