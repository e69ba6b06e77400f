"""The nspawn backend where the host's PID 1 is systemd (a laptop, a CI runner), tried for real.

Such a host is made here: a container, where PID 1 is systemd, runs the plugin from this checkout and boots a
container of its own; there nspawn runs inside a `systemd-run --scope` unit instead of a cgroup we make.
"""

from __future__ import annotations

from pathlib import Path

from pytest_systemd_harden.machine.images import default_cache_dir
from pytest_systemd_harden.spec.machine import MachineConfig
from pytest_systemd_harden.unit.pool import MachinePool

REPO = Path(__file__).resolve().parent.parent

INSIDE = r'''
import subprocess, sys
sys.path.insert(0, "/src")
from pathlib import Path
from pytest_systemd_harden.machine.backends.base import MachineConfig
from pytest_systemd_harden.machine.backends.nspawn import host_runs_systemd
from pytest_systemd_harden.machine.images import ImageCache
from pytest_systemd_harden.unit.pool import MachinePool

print("host runs systemd:", host_runs_systemd())
pool = MachinePool(image_cache=ImageCache(Path("/cache")))
machine = pool.machine_for(MachineConfig())  # the default: a container, even on a systemd host
scopes = subprocess.run(["systemctl", "list-units", "--all", "--no-legend", "--plain", f"{machine.name}.scope"],
                        capture_output=True, text=True).stdout.split()
print("scope while running:", scopes[:2])
print("pid 1 inside:", machine.run("cat /proc/1/comm").stdout.strip())
pool.close()
left = subprocess.run(["systemctl", "list-units", "--all", "--no-legend", "--plain", "harden-*.scope"],
                      capture_output=True, text=True).stdout.strip()
print("scopes left:", left or "none")
'''


def test_nspawn_runs_in_a_scope_of_the_hosts_systemd_and_leaves_none(harden_pool: MachinePool) -> None:
    host = harden_pool.machine_for(MachineConfig(
        packages=("python3-dbus-next", "python3-testinfra", "python3-yaml", "systemd-container"),
        files=(("/src", str(REPO)), ("/cache", str(default_cache_dir()))),
        # The stand-in host must be able to give its own container a user namespace of 65536 uids at a high base,
        # as a real host can: in a user-namespaced machine those uids do not exist.
        privileged=True))
    result = host.run(["/usr/bin/python3", "-c", INSIDE], timeout=300)
    assert result.ok, result.describe(40)
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert lines["host runs systemd"] == "True"
    assert lines["scope while running"].startswith("['harden-") and "loaded" in lines["scope while running"]
    assert lines["pid 1 inside"] == "systemd"
    assert lines["scopes left"] == "none"
