"""Tighten on a real machine: the result passes, scores better, and a step that undoes another is reverted."""

from __future__ import annotations

from collections.abc import Callable

from pytest_systemd_harden import exposure
from pytest_systemd_harden.backends.base import Machine
from pytest_systemd_harden.scenarios import run_scenario, tighten_service
from pytest_systemd_harden.service import HardenedService
from pytest_systemd_harden.spec import Spec
from pytest_systemd_harden.tighten import Step

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
