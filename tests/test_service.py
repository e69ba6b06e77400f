"""HardenedService against a real container: sandbox sharing, readiness, failures, cleanup."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pytest_systemd_harden.errors import ServiceFailed
from pytest_systemd_harden.machine.backends.base import Machine
from pytest_systemd_harden.spec.releases import DEFAULT_RELEASE
from pytest_systemd_harden.unit.service import HardenedService

SLEEPER = """
service:
  exec_start: /bin/sh -c 'echo started > /tmp/marker; exec sleep infinity'
  ready: {file: /tmp/marker}  # checked in the service's private /tmp
hardening:
  DynamicUser: yes
  PrivateTmp: yes
  ProtectSystem: strict
"""


def test_inside_runs_as_the_services_dynamic_user(started) -> None:  # type: ignore[no-untyped-def]
    service = started(SLEEPER)
    main_pid = service.state()["MainPID"]
    service_uid = service.client(f"awk '/^Uid:/ {{print $2}}' /proc/{main_pid}/status").stdout.strip()
    inside_uid = service.inside("id -u").stdout.strip()
    assert inside_uid == service_uid
    assert 61184 <= int(inside_uid) <= 65519  # systemd's dynamic uid range


def test_inside_shares_the_private_tmp_and_the_client_does_not(started) -> None:  # type: ignore[no-untyped-def]
    service = started(SLEEPER)
    assert service.inside("cat /tmp/marker").stdout == "started\n"
    assert not service.client("test -e /tmp/marker").ok


def test_inside_is_confined_like_the_service(started) -> None:  # type: ignore[no-untyped-def]
    service = started(SLEEPER)
    denied = service.inside("touch /var/probe")
    assert denied.exit_status == 1 and "EROFS" in denied.errno_names, denied.describe()
    assert "inside the sandbox of" in denied.where


def test_readiness_is_checked_in_the_services_private_network(started) -> None:  # type: ignore[no-untyped-def]
    service = started("""
service:
  exec_start: /usr/bin/python3 -m http.server --bind 127.0.0.1 8181
  ready: {tcp: 8181, timeout: 20}
hardening:
  PrivateNetwork: yes
""")
    fetch = "python3 -c \"import urllib.request as u; print(u.urlopen('http://127.0.0.1:8181/').status)\""
    assert service.inside(fetch).stdout.strip() == "200"
    assert not service.client(fetch).ok  # the machine's network is not the service's


def test_a_service_that_dies_fails_fast_with_its_journal(started) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ServiceFailed) as failure:
        started("""
service:
  exec_start: /bin/sh -c 'echo cannot open config >&2; exit 7'
  ready: {tcp: 8182, timeout: 60}
""")
    message = str(failure.value)
    assert "exited before it was ready" in message
    assert "main process exited with status 7" in message
    assert "cannot open config" in message  # the journal tail


def test_a_sandbox_that_cannot_be_set_up_names_the_systemd_exit_code(started) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ServiceFailed) as failure:
        started("""
service:
  exec_start: /bin/sleep infinity
  ready: {file: /run/never, timeout: 10}
hardening:
  ReadWritePaths: /does/not/exist
""")
    message = str(failure.value)
    assert "226/NAMESPACE" in message
    assert "ReadWritePaths=/does/not/exist" in message


def test_restart_starts_clean(started) -> None:  # type: ignore[no-untyped-def]
    text = """
service:
  exec_start: /bin/sh -c 'test ! -e $STATE_DIRECTORY/ran || echo not clean >&2; touch $STATE_DIRECTORY/ran; \
exec sleep infinity'
  ready: {file: /var/lib/private/cleanliness/ran}
hardening:
  DynamicUser: yes
  StateDirectory: cleanliness
"""
    first = started(text)
    first.stop()
    second = started(text)
    assert "not clean" not in second.journal()
    assert second.inside("test -e /var/lib/cleanliness/ran").ok


def test_a_program_that_cannot_be_executed_fails_the_start(started) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ServiceFailed) as failure:
        started("service:\n  exec_start: /opt/not/installed --serve\n")
    message = str(failure.value)
    assert "failed to start (start job: failed)" in message
    assert "203/EXEC" in message


def test_a_service_that_exits_at_once_fails_the_start(started) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ServiceFailed) as failure:
        started("service:\n  exec_start: /bin/sh -c 'echo bye; exit 0'\n")
    assert "exited right after it started" in str(failure.value)


def test_testinfra_hosts_see_the_machine_and_the_sandbox(started) -> None:  # type: ignore[no-untyped-def]
    service = started(SLEEPER)
    assert service.host.file("/etc/os-release").contains(DEFAULT_RELEASE)  # the machine's, not this host's
    assert service.host.user().uid == 0
    assert service.sandbox_host.user().uid != 0
    assert service.sandbox_host.file("/tmp/marker").exists
    assert not service.host.file("/tmp/marker").exists


def test_a_long_spec_name_still_gets_a_dynamic_user_inside_shares(machine: Machine, make_spec) -> None:  # type: ignore[no-untyped-def]
    spec = make_spec(SLEEPER, name="a-rather-long-name-for-a-hardening-spec.yaml")
    service = HardenedService(machine, spec)
    assert len(service.user or "") <= 31
    service.start()
    try:
        main_pid = service.state()["MainPID"]
        uid = service.client(f"awk '/^Uid:/ {{print $2}}' /proc/{main_pid}/status").stdout.strip()
        assert service.inside("id -u").stdout.strip() == uid
    finally:
        service.stop()


def test_an_inside_command_leaves_the_services_runtime_directory_alone(started, machine: Machine) -> None:  # type: ignore[no-untyped-def]
    service = started("""
service:
  exec_start: /bin/sh -c 'touch /run/app/ready; exec sleep infinity'
hardening:
  DynamicUser: yes
  RuntimeDirectory: app
""")
    assert service.inside("test -e /run/app/ready").ok  # the command shares the service's /run/app
    assert service.client("test -e /run/app/ready").ok, "the inside command's stop removed /run/app"
    service.stop()
    assert machine.run("test ! -e /run/app").ok  # the service's own stop still removes it


def test_the_readiness_check_stops_waiting_when_the_unit_has_no_process_left(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Run here, as the machine runs it, against cgroup directories of our own: nothing listens on port 1.
    from pytest_systemd_harden.unit.service import _READY_CHECK

    unit = tmp_path / "system.slice" / "app.service"
    unit.mkdir(parents=True)

    def check(budget: float) -> int:
        return subprocess.run([sys.executable, "-I", "-S", "-c", _READY_CHECK, "tcp", "1", str(budget),
                               str(tmp_path / "no-such-tree" / "app.service"), str(unit)], check=False).returncode

    (unit / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    assert check(0.1) == 1  # alive and not ready: the budget runs out (a tree that is not there changes nothing)
    (unit / "cgroup.events").write_text("populated 0\nfrozen 0\n")
    assert check(30) == 2  # no process left: it does not wait out the budget
    (unit / "cgroup.events").unlink()
    unit.rmdir()
    assert check(30) == 2  # its cgroup removed (the unit waits to be restarted): the same
