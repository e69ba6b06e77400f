"""What the default backend shows must match a real host: no pass where a host fails (issue 19)."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest

from pytest_systemd_harden.machine.backends import nspawn
from pytest_systemd_harden.machine.backends.base import Machine

pytestmark = pytest.mark.usefixtures("machine")  # a working backend, like the other live tests

# A host refuses the service its own bound device: PrivateDevices=yes implies DevicePolicy=closed.
BOUND_DEVICE = """
service:
  exec_start: /bin/sleep infinity
hardening:
  PrivateDevices: yes
  BindPaths: /dev/net/tun
"""


@pytest.mark.parametrize("privileged", [False, True], ids=["user-namespaced", "privileged"])
def test_a_bound_device_the_policy_denies_fails_as_on_a_host(pytester: pytest.Pytester, machine: Machine,
                                                               privileged: bool) -> None:
    spec = BOUND_DEVICE + ("machine: {privileged: true}\n" if privileged else "")
    pytester.makefile(".yaml", harden=spec)
    result = pytester.runpytest("-v", "-rs", "--harden-diagnose=off")
    output = result.stdout.str()
    assert "PrivateDevices=yes is enforced FAILED" in output, output
    if machine.NAME == "nspawn":  # no device rules in the container: the failure says what a host does
        result.stdout.fnmatch_lines([
            "*expected: opening /dev/net/tun is denied (EPERM) by the closed device policy*",
            ("*on a host (or --harden-backend=qemu) opening /dev/net/tun fails with EPERM*"
             "add DeviceAllow=/dev/net/tun rw*"),
        ])
    allowed = spec.replace("  BindPaths: /dev/net/tun\n", "  BindPaths: /dev/net/tun\n  DeviceAllow: /dev/net/tun rw\n")
    (pytester.path / "harden.yaml").write_text(allowed)
    result = pytester.runpytest("-v", "-rs", "--harden-diagnose=off")
    output = result.stdout.str()
    assert "PrivateDevices=yes is enforced PASSED" in output, output
    assert "DeviceAllow=/dev/net/tun rw is enforced PASSED" in output, output


# Above the hard limits this test process inherited (20000 open files, 8 MiB locked on the project's test host).
ABOVE_THE_OLD_CEILING = """
service:
  exec_start: /bin/sleep infinity
hardening:
  LimitNOFILE: 1048576
  LimitMEMLOCK: infinity
"""


def test_a_limit_above_the_old_ceiling_is_enforced_or_said_clamped(pytester: pytest.Pytester, machine: Machine) -> None:
    pytester.makefile(".yaml", harden=ABOVE_THE_OLD_CEILING)
    result = pytester.runpytest("-v", "-rs", "--harden-diagnose=off")
    output = result.stdout.str()
    if machine.NAME != "nspawn" or nspawn.can_raise_limits():  # the container's ceiling is a host's (--rlimit=)
        result.assert_outcomes(passed=3)
        return
    # This process cannot raise its own hard limits (a CI sandbox without CAP_SYS_RESOURCE): neither can the
    # container, and the skip says how far the limit got, not that systemd ignored it.
    result.assert_outcomes(passed=1, skipped=2)
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    result.stdout.fnmatch_lines([(f"*LimitNOFILE=1048576 cannot be verified*clamped to this machine's ceiling "
                                  f"{nofile}*CAP_SYS_RESOURCE*qemu backend*")])
    assert "does not enforce it even when it is the only directive" not in output


def test_the_container_ceiling_is_raised_where_this_process_may(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nspawn, "can_raise_limits", lambda: True)
    options = nspawn.rlimit_options()
    nr_open = Path("/proc/sys/fs/nr_open").read_text().strip()
    assert any(o.startswith("--rlimit=RLIMIT_NOFILE=") and o.endswith(f":{nr_open}") for o in options), options
    assert any(o.startswith("--rlimit=RLIMIT_MEMLOCK=") and o.endswith(":infinity") for o in options), options
    assert not any("RTPRIO" in o or "NICE" in o for o in options)  # no scheduling power over the host's CPUs
    monkeypatch.setattr(nspawn, "can_raise_limits", lambda: False)
    assert nspawn.rlimit_options() == []  # nspawn would fail to set them: the ceiling is this process's own


# Debian's redis unit does this: nothing executes but the service's binary and the libraries.
ONLY_ITS_OWN_BINARY = """
service:
  exec_start: /bin/sleep infinity
hardening:
  NoExecPaths: /
  ExecPaths: [/usr/bin/sleep, /usr/lib]
  ProtectSystem: full
  PrivateTmp: yes
  ProtectKernelTunables: yes
  RestrictAddressFamilies: AF_UNIX
  LockPersonality: yes
"""


def test_probes_run_under_noexecpaths_everywhere(pytester: pytest.Pytester) -> None:
    pytester.makefile(".yaml", harden=ONLY_ITS_OWN_BINARY)
    result = pytester.runpytest("-v", "-rs", "--harden-diagnose=off")
    output = result.stdout.str()
    # Every enforcement item is judged (the interpreter runs from a copy in /usr/lib); none skips for want of it.
    result.assert_outcomes(passed=8)
    assert "status 203" not in output and "203/EXEC" not in output, output


def test_the_probe_interpreter_follows_the_exec_policy() -> None:
    from pytest_systemd_harden.probes.runner import executable_under

    assert executable_under("/usr/bin/python3.11", [], [])
    assert not executable_under("/usr/bin/python3.11", ["/"], ["/usr/bin/sleep", "/usr/lib"])
    assert executable_under("/usr/lib/.harden-probe-python3", ["/"], ["/usr/bin/sleep", "/usr/lib"])
    assert not executable_under("/usr/lib/x/y", ["/"], ["/usr/libexec"])  # a prefix of the name is no parent
    assert executable_under("/usr/bin/python3.11", ["/tmp", "/var/tmp"], [])


# What the container denies anyway, or what happens only after a unit stops, or only beyond loopback: each shown.
KERNEL_FACING = """
service:
  exec_start: /bin/sleep infinity
hardening:
  DynamicUser: yes
  RemoveIPC: yes
  ProtectClock: yes
  ProtectKernelModules: yes
  ProtectKernelLogs: yes
  RestrictRealtime: yes
  IPAddressDeny: any
  IPAddressAllow: localhost
"""


@pytest.mark.parametrize("privileged", [False, True], ids=["user-namespaced", "privileged"])
def test_kernel_facing_directives_remove_ipc_and_localhost_only_are_shown(pytester: pytest.Pytester,
                                                                          machine: Machine, privileged: bool) -> None:
    if machine.NAME != "nspawn":
        pytest.skip("what nspawn's own setup makes observable (@clock, @module, 192.0.2.1 on lo)")
    pytester.makefile(".yaml", harden=KERNEL_FACING + ("machine: {privileged: true}\n" if privileged else ""))
    result = pytester.runpytest("-v", "-rA", "--harden-diagnose=off")
    output = result.stdout.str()
    result.assert_outcomes(passed=9)  # the start item and one per directive
    result.stdout.fnmatch_lines([  # in the order of the items
        "*a POSIX shared memory object the user leaves is removed when its unit stops: yes*",
        "*adjtimex(2) denied (EPERM): yes*",
        "*init_module(2) denied (EPERM): yes*",
        "*/proc/kmsg is replaced by an inaccessible node (mode 000): yes*",
        "*ask for SCHED_FIFO with priority 0 (invalid: EINVAL where no filter stops it) denied (EPERM): yes*",
        "*send to 192.0.2.1:9 denied (EPERM): yes*",
        "*127.0.0.1:9 stays reachable despite IPAddressDeny=: yes*",
    ])
    assert "cannot be verified" not in output, output


# A package's runtime directory, made at boot by its tmpfiles.d file (bound here as the package would ship it), which
# the hardened service may write under ProtectSystem=strict: on a host, systemd-tmpfiles makes it before the service
# starts. It did not in a user-namespaced machine whose "/" showed as owned by nobody (nspawn's volatile overlay):
# tmpfiles refused every line ("unsafe path transition"), and the service failed here where a host starts it.
RUNTIME_DIRECTORY_FROM_TMPFILES = """
service:
  exec_start: /bin/sh -c 'echo up > /run/myapp/state && exec sleep infinity'
  ready: {file: /run/myapp/state}
hardening:
  ProtectSystem: strict
  ReadWritePaths: /run/myapp
machine:
  files: {/etc/tmpfiles.d/myapp.conf: myapp.conf}
"""


@pytest.mark.parametrize("privileged", [False, True], ids=["user-namespaced", "privileged"])
def test_tmpfiles_make_a_packages_directories_at_boot_as_on_a_host(pytester: pytest.Pytester, machine: Machine,
                                                                   privileged: bool) -> None:
    pytester.makefile(".conf", myapp="d /run/myapp 0755 root root -\n")
    pytester.makefile(".yaml", harden=RUNTIME_DIRECTORY_FROM_TMPFILES
                      + ("  privileged: true\n" if privileged else ""))
    pytester.makepyfile(test_boot="""
        import pytest

        @pytest.mark.harden("harden.yaml")
        def test_the_root_and_the_boots_tmpfiles(hardened_service):
            assert hardened_service.client("stat -c %u:%g /").stdout == "0:0\\n"
            tmpfiles = hardened_service.client("systemctl show -P ExecMainStatus systemd-tmpfiles-setup.service")
            assert tmpfiles.stdout == "0\\n", tmpfiles.describe()  # 73 (CANTCREAT): some line was refused
        """)
    result = pytester.runpytest("-v", "-rA", "--harden-diagnose=off")
    output = result.stdout.str()
    assert "service starts under hardening PASSED" in output, output
    assert "test_the_root_and_the_boots_tmpfiles PASSED" in output, output


@pytest.mark.parametrize("generator", [True, False], ids=["by the machine's generator", "by a command after"])
def test_the_machines_own_address_is_on_its_lo_either_way(machine: Machine, monkeypatch: pytest.MonkeyPatch,
                                                          generator: bool) -> None:
    # At boot, by a unit of the machine's generator; where the cache cannot hold the generator (read-only), by a
    # command once booted. Either way IPAddressDeny= has a non-loopback address of the machine's own to deny.
    if machine.NAME != "nspawn":
        pytest.skip("the nspawn backend's boot")
    from pytest_systemd_harden.machine.images import ADDRESS_UNIT
    from pytest_systemd_harden.machine.systemd import UNIT_IFACE
    from pytest_systemd_harden.probes.catalogue import MACHINE_ADDRESS

    if not generator:
        monkeypatch.setattr(nspawn.NspawnMachine, "_boot_generator_file",
                            lambda self: (_ for _ in ()).throw(PermissionError(30, "Read-only file system")))
    lines: list[str] = []
    booted = nspawn.NspawnMachine(machine.config, image_cache=machine.image_cache)
    try:
        booted.boot(lines.append)
        assert booted.address_at_boot == generator
        unit = booted.systemd.some_properties(ADDRESS_UNIT, [(UNIT_IFACE, "ActiveState")])
        assert unit == ({"ActiveState": "active"} if generator else {"ActiveState": "inactive"})
        shown = booted.run(["ip", "-4", "-o", "address", "show", "dev", "lo"])
        assert f"inet {MACHINE_ADDRESS}/32" in shown.stdout, shown.describe()
        assert lines == [], lines  # nothing failed
    finally:
        booted.shutdown()


def test_the_machines_root_is_a_hosts_whatever_the_callers_umask(machine: Machine) -> None:
    # The writable layer's top directory is the machine's "/": made by the mount script, which inherits the test
    # process's umask. Under 077 it came out 0700, and no service of a non-root user could reach any file.
    if machine.NAME != "nspawn":
        pytest.skip("the nspawn backend's boot")
    booted = nspawn.NspawnMachine(machine.config, image_cache=machine.image_cache)
    old = os.umask(0o077)
    try:
        booted.boot()
    finally:
        os.umask(old)
    try:
        seen = booted.run(["stat", "-c", "%a %u:%g", "/"])
        assert seen.stdout == "755 0:0\n", seen.describe()
    finally:
        booted.shutdown()
