"""The machine is a boundary (issue 13): its root has no power over the host, and the machine as a whole is capped.

Every attack here is harmless even where it works: a host sysctl is written back with the value it already has,
a cgroup made at the root of a cgroup tree is removed at once, and the bound file is the test's own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_systemd_harden.machine.backends.base import Machine
from pytest_systemd_harden.probes.catalogue import MACHINE_ADDRESS
from pytest_systemd_harden.spec.machine import MachineConfig
from pytest_systemd_harden.unit.pool import MachinePool

pytestmark = pytest.mark.usefixtures("machine")  # a working backend, like the other live tests

# Each prints "blocked" and exits 0 when the kernel refuses; prints what worked and exits 1 otherwise.
HOST_SYSCTL = (
    'V=$(cat /proc/sys/kernel/core_pattern); '
    'if (mount -o remount,rw /proc/sys; printf "%s\\n" "$V" > /proc/sys/kernel/core_pattern) 2>/dev/null; '
    'then echo "host sysctl written after a remount"; exit 1; fi; '
    'mkdir -p /run/harden-proc; '
    'if (mount -t proc proc /run/harden-proc && printf "%s\\n" "$V" > /run/harden-proc/sys/kernel/core_pattern) '
    '2>/dev/null; then echo "host sysctl written on a fresh procfs"; exit 1; fi; echo blocked'
)
# A tree mounted in the machine is its own group (a cgroup namespace, delegated to it); the host's tree would show
# the groups this plugin makes for every machine (pytest-systemd-harden/) at or near its root.
HOST_CGROUP = (
    'mkdir -p /run/harden-cg; '
    'for fs in "cgroup -o memory" "cgroup -o pids" cgroup2; do '
    '  if mount -t $fs none /run/harden-cg 2>/dev/null; then '
    '    if find /run/harden-cg -maxdepth 4 -name pytest-systemd-harden | grep -q .; then '
    '      echo "mounted the host\'s $fs tree"; exit 1; fi; umount /run/harden-cg; fi; '
    'done; echo blocked'
)
BOUND_FILE = (
    'mount -o remount,rw,bind /etc/harden-bound 2>/dev/null; '
    'if echo changed >> /etc/harden-bound 2>/dev/null; then echo "bound file changed"; exit 1; fi; echo blocked'
)


def boundary_spec(privileged: bool) -> str:
    scenarios = "".join(
        f"""
  - name: {where} {what}
    {where}: {json.dumps(script)}
    expect: {{stdout: blocked}}"""
        for what, script in (("host sysctl", HOST_SYSCTL), ("host cgroup", HOST_CGROUP), ("bound file", BOUND_FILE))
        for where in ("client", "inside"))
    return f"""
service:
  exec_start: /bin/sleep infinity
machine:
  files: {{/etc/harden-bound: bound.txt}}
  privileged: {"true" if privileged else "false"}
hardening:
  ProtectProc: invisible      # a root service in a mount namespace of its own, free to mount a procfs
scenarios:{scenarios}
"""


def test_container_root_cannot_touch_the_host(pytester: pytest.Pytester) -> None:
    pytester.makefile(".yaml", harden=boundary_spec(privileged=False))
    bound = pytester.path / "bound.txt"
    bound.write_text("the host's\n")
    before = Path("/proc/sys/kernel/core_pattern").read_text()
    result = pytester.runpytest("-v", "--harden-diagnose=off", "--harden-require-backend")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed") == 7 and "failed" not in outcomes, result.stdout.str()  # start item, 6 scenarios
    result.stdout.fnmatch_lines(["*user namespace: container root is uid * on the host*"])
    assert bound.read_text() == "the host's\n"
    assert Path("/proc/sys/kernel/core_pattern").read_text() == before


def test_a_privileged_machine_is_no_boundary_and_says_so(pytester: pytest.Pytester) -> None:
    """The same attacks on ``machine: {privileged: true}`` work: the checks above can fail."""
    pytester.makefile(".yaml", harden=boundary_spec(privileged=True))
    (pytester.path / "bound.txt").write_text("the test's own\n")
    result = pytester.runpytest("-v", "--harden-diagnose=off", "--harden-require-backend")
    result.stdout.fnmatch_lines(["*PRIVILEGED: no user namespace, container root is host root*"])
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) >= 4, result.stdout.str()  # client and inside: sysctl, bound file
    result.stdout.fnmatch_lines(["*host sysctl written*", "*bound file changed*"], consecutive=False)


CAPPED = """
service:
  exec_start: {command}
scenarios:
  - name: runs a while          # long enough for the service to meet the cap
    client: sleep 4
"""


def test_a_fork_bomb_and_a_memory_hog_are_stopped_by_the_machine_caps(pytester: pytest.Pytester,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARDEN_MACHINE_TASKS_MAX", "512")
    monkeypatch.setenv("HARDEN_MACHINE_MEMORY_MAX", "384M")
    # At most 3000 tasks and 2 GiB asked for: both far beyond the caps, bounded if the caps did not hold.
    pytester.mkdir("bomb").joinpath("harden.yaml").write_text(CAPPED.format(
        command="/bin/sh -c 'for i in $(seq 3000); do sleep 300 & done; wait'"))
    pytester.mkdir("hog").joinpath("harden.yaml").write_text(CAPPED.format(
        command="""/usr/bin/python3 -c 'import time; b = b"x" * (2 << 30); time.sleep(300)'"""))
    result = pytester.runpytest("-v", "--harden-diagnose=off", "--harden-require-backend", "-p", "no:randomly")
    output = result.stdout.str()
    result.stdout.fnmatch_lines(["*memory cap 384 MiB, tasks cap 512*"])
    result.stdout.fnmatch_lines(["*bomb/harden.yaml::* FAILED*"])
    result.stdout.fnmatch_lines(["*hog/harden.yaml::* FAILED*"])
    assert "the machine hit its tasks cap of 512" in output, output
    assert "the machine hit its memory cap of 384 MiB" in output, output


def test_the_caps_are_out_of_the_machine_s_reach(machine: Machine) -> None:
    """Root in the machine sees its own groups' limits (a cgroup namespace) and cannot raise them."""
    raised = machine.run(
        'mkdir -p /run/harden-cg; for fs in "cgroup -o memory" "cgroup -o pids" cgroup2; do '
        '  mount -t $fs none /run/harden-cg 2>/dev/null || continue; '
        '  for f in memory.limit_in_bytes memory.max pids.max; do '
        '    [ -e /run/harden-cg/$f ] && echo max > /run/harden-cg/$f 2>/dev/null && echo "raised $f"; done; '
        '  umount /run/harden-cg; done; true')
    assert raised.ok and "raised" not in raised.stdout, raised.describe()


def test_the_image_is_booted_idmapped_where_only_nspawn_sees_the_mount(machine: Machine) -> None:
    from pytest_systemd_harden.machine.backends.nspawn import NspawnMachine

    assert isinstance(machine, NspawnMachine) and machine.image is not None
    assert "(the image idmapped)" in machine.describe()  # no uid-shifted copy of it was needed
    inside = machine.run("stat -c '%u %g' /etc/shadow /usr/bin/python3; touch /usr/harden-overlay && echo written")
    assert inside.stdout.split() == ["0", "42", "0", "0", "written"], inside.describe()  # root:shadow, as installed
    rootfs = machine.image.rootfs
    assert (rootfs / "etc" / "shadow").stat().st_uid == 0 and not (rootfs / "usr" / "harden-overlay").exists()
    assert str(rootfs) not in Path("/proc/self/mountinfo").read_text()


@pytest.mark.parametrize("packages", [(), ("curl",)], ids=["base", "a layer over the base"])
def test_where_the_image_cannot_be_idmapped_a_shifted_copy_is_booted(harden_pool: MachinePool,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     packages: tuple[str, ...]) -> None:
    from pytest_systemd_harden.machine.backends import userns

    monkeypatch.setattr(userns, "idmap_refused", lambda rootfs: "mount_setattr: Invalid argument")
    pool = MachinePool(image_cache=harden_pool.image_cache)
    try:
        machine = pool.machine_for(MachineConfig(packages=packages))
        assert "(a uid-shifted copy of the image)" in machine.describe()
        # /usr/bin/curl from the layer (each layer shifted), /etc/shadow from the base
        inside = machine.run("stat -c '%u %g' /etc/shadow; command -v curl || true")
        assert inside.stdout.split() == ["0", "42", *(["/usr/bin/curl"] if packages else [])], inside.describe()
        # Its / is its root's, and the machine's generator (bound as it is, not idmapped: owned by nobody here,
        # executable by all) ran: the machine's own address is on lo.
        booted = machine.run("stat -c %u /; ip -4 -o address show dev lo")
        assert booted.stdout.startswith("0\n") and f"{MACHINE_ADDRESS}/32" in booted.stdout, booted.describe()
    finally:
        pool.close()
