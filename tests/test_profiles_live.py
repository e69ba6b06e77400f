"""Built-in profiles in a real container: a service starts under each, and their strongest directives are really
in force."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from test_profiles import NAMES, write

from pytest_systemd_harden.spec.load import load_spec
from pytest_systemd_harden.spec.machine import MachineConfig
from pytest_systemd_harden.unit.pool import MachinePool
from pytest_systemd_harden.unit.service import HardenedService

# --- in a real container ----------------------------------------------------------------------------------------

SERVER = "/usr/bin/python3 -m http.server 8080 --bind 127.0.0.1 --directory /usr/share/doc"


def sleeper(label: str, profile: str, hardening: str = "") -> str:
    """A spec for ``sleep infinity`` under ``profile``; type exec, so the start returns once the sandbox is set up
    and /proc/MAINPID shows the sandboxed process, not systemd's child before it exec'd."""
    return (f"name: {label}\nprofile: {profile}\nservice: {{type: exec, exec_start: /bin/sleep infinity}}\n"
            + (f"hardening: {hardening}\n" if hardening else ""))


def _main_status(service: HardenedService) -> dict[str, str]:
    pid = service.state()["MainPID"]
    status = service.client(f"cat /proc/{pid}/status").stdout
    return {key: value.strip() for key, _, value in (line.partition(":") for line in status.splitlines())}


@pytest.mark.parametrize("name", NAMES)
def test_a_service_starts_under_the_profile_unchanged(started: Callable[[str], HardenedService], name: str) -> None:
    service = started(sleeper(f"sleep-{name}", name))
    assert service.state()["ActiveState"] == "active", service.state_text()
    status = _main_status(service)
    assert (status["CapBnd"] == "0000000000000000") is (name != "minimal-2026")  # minimal keeps root's caps
    assert status["Seccomp"] == "2"  # a filter: SystemCallFilter=, or RestrictAddressFamilies= alone
    assert status["NoNewPrivs"] == ("1" if name != "baseline-2026" else "0")


@pytest.mark.parametrize("name", NAMES)
def test_a_web_server_answers_under_the_profile(started: Callable[[str], HardenedService], name: str) -> None:
    service = started(f"""\
        name: web-{name}
        profile: {name}
        service:
          exec_start: {SERVER}
          ready: {{tcp: 8080}}
        hardening:
          RestrictAddressFamilies: [AF_UNIX, AF_INET, AF_INET6]
        """)
    fetched = service.client("python3 -c \"import urllib.request as u; print(u.urlopen('http://127.0.0.1:8080/').status)\"")
    assert fetched.stdout.strip() == "200", fetched.describe()


@pytest.mark.parametrize("name", ["baseline-2026", "maximum-2026"])
def test_private_users_puts_the_service_in_a_user_namespace_of_its_own(started: Callable[[str], HardenedService],
                                                                      name: str) -> None:
    service = started(sleeper(f"userns-{name}", name))
    pid = service.state()["MainPID"]
    namespaces = service.client(f"readlink /proc/1/ns/user /proc/{pid}/ns/user").stdout.split()
    assert len(namespaces) == 2 and namespaces[0] != namespaces[1]
    assert len(service.client(f"cat /proc/{pid}/uid_map").stdout.splitlines()) <= 2  # root and the service's uid


# Copy a program to each scratch directory it can write, and run it from there.
NOEXEC_PROBE = ("for d in /tmp /var/tmp /dev/shm; do cp /usr/bin/true $d/p 2>/dev/null && $d/p && echo $d ran; "
                "done; true")


@pytest.mark.parametrize("name", ["baseline-2026", "maximum-2026"])
def test_nothing_the_service_can_write_executes(started: Callable[[str], HardenedService], name: str) -> None:
    service = started(sleeper(f"noexec-{name}", name))
    probe = service.inside(NOEXEC_PROBE)
    assert probe.stdout == "" and "/tmp/p: Permission denied" in probe.stderr, probe.describe()
    assert service.inside("/usr/bin/true").ok


def test_the_noexec_probe_sees_executable_scratch_space_without_the_profile(
        started: Callable[[str], HardenedService]) -> None:
    service = started(sleeper("noexec-control", "minimal-2026"))
    assert service.inside(NOEXEC_PROBE).stdout.splitlines() == ["/tmp ran", "/var/tmp ran", "/dev/shm ran"]


@pytest.mark.parametrize("name", NAMES)
def test_the_system_stays_read_only_even_to_root(started: Callable[[str], HardenedService], name: str) -> None:
    # baseline-2026 and minimal-2026 run the service as root, which owns the system: only the mount protects it.
    service = started(sleeper(f"readonly-{name}", name))
    for directory in ("/usr", "/etc", "/var", *(["/run"] if name != "minimal-2026" else [])):
        written = service.inside(f"touch {directory}/harden-probe")
        assert "EROFS" in written.errno_names, written.describe()


SEND = "python3 -c \"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('{}', 9))\""


@pytest.mark.usefixtures("machine")  # a working backend (or the skip that says why)
@pytest.mark.parametrize("name", ["baseline-2026", "maximum-2026"])
@pytest.mark.parametrize("privileged", [False, True], ids=["user-namespaced", "privileged"])
def test_ip_address_deny_any_is_enforced(harden_pool: MachinePool, tmp_path: Path, name: str,
                                         privileged: bool) -> None:
    # On nspawn the container's systemd loads the BPF firewall itself when privileged, and the test process loads it
    # for a user-namespaced one (docs/backends.md). The container has only lo, and all of it is "localhost": narrow
    # the allow list to make a denied address.
    machine = harden_pool.machine_for(MachineConfig(privileged=privileged))
    service = HardenedService(machine, load_spec(write(tmp_path, sleeper(
        f"ipdeny-{name}", name, "{RestrictAddressFamilies: [AF_UNIX, AF_INET], IPAddressAllow: 127.0.0.1}"))))
    service.start()
    try:
        assert service.inside(SEND.format("127.0.0.1")).ok
        denied = service.inside(SEND.format("127.0.0.2"))
        assert denied.exit_status == 1 and "EPERM" in denied.errno_names, denied.describe()
        assert service.client(SEND.format("127.0.0.2")).ok  # the same send, unconfined
    finally:
        service.stop()


@pytest.mark.parametrize(("name", "visible"), [("baseline-2026", False), ("maximum-2026", False),
                                               ("minimal-2026", True)])
def test_proc_subset(started: Callable[[str], HardenedService], name: str, visible: bool) -> None:
    service = started(sleeper(f"proc-{name}", name))
    assert service.inside("test -e /proc/meminfo").ok is visible


def test_minimal_keeps_the_system_read_only_but_logs_and_run_writable(
        started: Callable[[str], HardenedService]) -> None:
    service = started(sleeper("minimal-rw", "minimal-2026"))
    assert "EROFS" in service.inside("touch /etc/probe").errno_names
    for directory in ("/var/log", "/run"):
        written = service.inside(f"touch {directory}/harden-probe && rm {directory}/harden-probe")
        assert written.ok, written.describe()
