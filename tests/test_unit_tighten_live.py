"""Tighten on a unit systemd loads from a file: it starts from the unit as loaded, its result is a drop-in for that
unit; its observation wraps the commands of the unit's own start in a drop-in, and the unit keeps its type,
PIDFile= and User=; its drop-in is checked on a freshly booted machine."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_systemd_harden.machine.backends.base import Machine
from pytest_systemd_harden.search.scenarios import observe, tighten_service
from pytest_systemd_harden.search.tighten import Step
from pytest_systemd_harden.spec.load import Spec
from pytest_systemd_harden.unit.service import HardenedService

# A server on 127.0.0.1:PORT that says it is ready the way its Type= wants: READY=1 from the main process
# (notify), or the parent exiting after the daemon listens (forking, with or without a PIDFile=).
SERVE = "[c.close() for c, _ in iter(l.accept, None)]"
NOTIFY = ("import os, socket; l = socket.create_server(('127.0.0.1', PORT)); p = os.environ['NOTIFY_SOCKET']; "
          "n = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); n.connect(chr(0) + p[1:] if p[0] == '@' else p); "
          "n.send(b'READY=1'); " + SERVE)
FORK = ("import os, socket, sys; l = socket.create_server(('127.0.0.1', PORT)); pid = os.fork(); "
        "pid and (len(sys.argv) < 2 or open(sys.argv[1], 'w').write(str(pid))) and os._exit(0); os.setsid(); "
        + SERVE)

UNITS = {
    "notify": ("Type=notify", NOTIFY, ""),
    "forking with PIDFile=": ("Type=forking\nPIDFile=/run/obs-PORT/pid", FORK, " /run/obs-PORT/pid"),
    "forking without PIDFile=": ("Type=forking", FORK, ""),
}

MAIN_PID = """  - name: systemd's main process is the server, not the tracer
    client: sh -c 'cat /proc/$(systemctl show -P MainPID obs-PORT.service)/comm'
    expect: {stdout: python3}"""
SPEC = """
service:
  unit_file: obs-PORT.service
  ready: {tcp: PORT}
hardening:
  ProtectSystem: strict
  SystemCallFilter: ["@system-service"]
scenarios:
  - name: answers
    client: python3 -c "import socket; socket.create_connection(('127.0.0.1', PORT)).close()"
MAIN_PID
  - name: ExecStartPre= ran before, as the unit's User=
    inside: stat -c %U /run/obs-PORT/pre
    expect: {stdout: daemon}
"""


@pytest.mark.parametrize("kind", list(UNITS))
def test_a_loaded_unit_is_traced_with_its_own_type_user_and_pidfile(
        machine: Machine, make_spec: Callable[[str], Spec], tmp_path: Path, kind: str) -> None:
    port = str(8095 + list(UNITS).index(kind))
    settings, code, argument = UNITS[kind]
    (tmp_path / f"obs-{port}.service").write_text(
        f"[Service]\n{settings}\nUser=daemon\nRuntimeDirectory=obs-{port}\n"
        f"ExecStartPre=/usr/bin/touch /run/obs-{port}/pre\n"
        f'ExecStart=/usr/bin/python3 -c "{code}"{argument}\n'.replace("PORT", port))
    # Measured (systemd 257): with the tracer a second child of systemd beside the daemon, systemd cannot guess a
    # forking unit's main PID without PIDFile= (MainPID=0); the unit still runs and stops with its cgroup.
    main_pid = "" if kind == "forking without PIDFile=" else MAIN_PID
    text = SPEC.replace("MAIN_PID", main_pid).replace("PORT", port)
    spec = make_spec(text)
    service = HardenedService(machine, spec)
    service.start()
    try:
        observation = observe(service)
    finally:
        service.stop()
    assert not observation.failures, observation.failures
    assert "AF_INET" in observation.families and "the service" in observation.families["AF_INET"]
    assert f"127.0.0.1:{port}" in observation.binds
    # ExecStartPre= is traced too, to a file of its own: what it does runs under the same sandbox
    assert "the service's ExecStartPre= #1" in observation.writes.get(f"/run/obs-{port}/pre", ""), observation.writes


NOTES = """[Service]
Type=exec
DynamicUser=yes
StateDirectory=notes-%i
PrivateTmp=yes
ProtectSystem=strict
ExecStart=/usr/bin/python3 -m http.server --bind 127.0.0.1 --directory /var/lib/notes-%i %i
"""
NOTES_SPEC = """
service:
  unit_file: notes@.service
  instance: "8099"
  ready: {tcp: 8099}
hardening:
  NoNewPrivileges: yes
scenarios:
  - name: serves its state directory
    client: python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8099/')"
"""


def test_tighten_starts_from_the_unit_as_loaded(machine: Machine, make_spec: Callable[[str], Spec],
                                                tmp_path: Path) -> None:
    (tmp_path / "notes@.service").write_text(NOTES)
    spec = make_spec(NOTES_SPEC)
    service = HardenedService(machine, spec)
    service.start()
    try:
        result = tighten_service(service, never=["PrivateUsers"])
    finally:
        service.stop()
    assert not result.note and result.dropin_verified
    kept = {o.step.name.split(":")[0]: o.kept for o in result.outcomes}
    # the unit's own: not added again (with DynamicUser= there, no StateDirectory=notes-8099 for every instance)
    for own in ("DynamicUser=yes", "PrivateTmp=yes", "ProtectSystem=strict"):
        assert kept[own] == "skipped", (own, kept[own])
    lines = result.dropin().splitlines()
    assert not any(line.startswith(("DynamicUser=", "StateDirectory=", "PrivateTmp=")) for line in lines), lines
    assert "ProtectKernelTunables=yes" in lines and "NoNewPrivileges=yes" in lines
    # the service itself was traced through its unit file's ExecStart=, not only the scenarios
    assert result.observation is not None and "AF_INET" in result.observation.families
    assert spec.service.dropin_path == "/etc/systemd/system/notes@.service.d/harden.conf"


# A daemon whose ExecStartPre= makes its state directory and chowns it at the first start only, as nginx's does:
# every later start finds it made and chowns nothing.
CHOWNS_ONCE = """[Service]
ExecStartPre=/bin/sh -c 'if [ ! -e {state}/done ]; then mkdir -p {state} && chown nobody {state} && touch {state}/done; fi'
ExecStart=/usr/bin/python3 -m http.server --bind 127.0.0.1 8094
"""
CHOWNS_ONCE_SPEC = """
service: {unit_file: chowns-once.service, ready: {tcp: 8094}}
hardening:
  PrivateTmp: yes
scenarios:
  - name: serves
    client: python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8094/')"
"""
DROP_CAPABILITIES = [Step.of("no capabilities", CapabilityBoundingSet=""),
                     Step.of("no chown", SystemCallFilter="~@chown")]


def test_a_result_that_passes_only_on_what_earlier_starts_left_is_searched_again_on_fresh_machines(
        machine: Machine, make_spec: Callable[[str], Spec], tmp_path: Path) -> None:
    state = f"/var/lib/harden-{uuid.uuid4().hex[:8]}"
    (tmp_path / "chowns-once.service").write_text(CHOWNS_ONCE.format(state=state))
    spec = make_spec(CHOWNS_ONCE_SPEC)
    service = HardenedService(machine, spec)
    service.start()  # the first start: the state is made here
    try:
        result = tighten_service(service, catalogue=DROP_CAPABILITIES)
    finally:
        service.stop()
    # On the service's machine no start chowns any more: no capability and no chown passed there, and failed on a
    # fresh machine. Searched again there, the chown of the first start is seen and kept.
    assert result.note.startswith("the first search's result passed on the machine it ran on, but not on a "
                                  "freshly booted one"), result.render()
    assert result.dropin_verified and result.dropin_on_fresh_machine, result.render()
    capabilities = next(d for d in result.after if d.name == "CapabilityBoundingSet")
    assert "CAP_CHOWN" in capabilities.value.split(), result.render()
    assert result.observation is not None and any("ExecStartPre=" in how for how in result.observation.writes.values()), \
        result.render()
    assert "passes every scenario on a freshly booted machine, and the service starts again there after a restart" \
        in result.render()


def test_a_result_whose_scenarios_need_what_the_test_made_is_checked_on_the_services_machine(
        machine: Machine, make_spec: Callable[[str], Spec]) -> None:
    made = f"/root/made-by-the-test-{uuid.uuid4().hex[:8]}"
    assert machine.run(["touch", made]).ok  # on this machine only: a fresh one lacks it
    spec = make_spec(WEB_NEEDING.format(made=made))
    service = HardenedService(machine, spec)
    service.start()
    try:
        result = tighten_service(service, catalogue=[Step.of("no privilege gain", NoNewPrivileges=True)])
    finally:
        service.stop()
    assert "on a freshly booted machine the spec as written fails too" in result.note, result.render()
    assert result.dropin_verified and not result.dropin_on_fresh_machine, result.render()
    assert "passes every scenario on the machine tighten ran on" in result.render()


WEB_NEEDING = """
service:
  exec_start: /usr/bin/python3 -m http.server --bind 127.0.0.1 8093
  ready: {{tcp: 8093}}
scenarios:
  - name: finds what the test made
    client: test -e {made}
"""
