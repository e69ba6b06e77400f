"""Enforcement items and assert_denied as a user meets them, on real containers (pytester)."""

from __future__ import annotations

import re

import pytest

from pytest_systemd_harden.machine import cgroups
from pytest_systemd_harden.machine.backends.base import Machine
from pytest_systemd_harden.machine.probing import machine_facts

pytestmark = pytest.mark.usefixtures("machine")  # a working backend, like the other live tests

# Every directive of the reference list (docs/probes.md), combined so that none undoes another on systemd 252:
# NoExecPaths=/ with ExecPaths=/usr would reopen /usr under ProtectSystem=strict (see the weakened cases).
EVERY_DIRECTIVE = """
name: every-directive
service:
  exec_start: /bin/sleep infinity
hardening:
  DynamicUser: yes
  ProtectSystem: strict
  ProtectHome: yes
  PrivateTmp: yes
  PrivateDevices: yes
  PrivateNetwork: yes
  ReadOnlyPaths: /srv
  InaccessiblePaths: /opt
  ReadWritePaths: /var/tmp
  NoExecPaths: [/dev, /tmp, /var/tmp]
  ExecPaths: /dev/shm
  CapabilityBoundingSet: CAP_NET_BIND_SERVICE
  ProtectKernelModules: yes
  ProtectKernelTunables: yes
  ProtectKernelLogs: yes
  ProtectClock: yes
  ProtectHostname: yes
  ProtectControlGroups: yes
  RestrictNamespaces: yes
  SystemCallFilter: "@system-service"
  SystemCallErrorNumber: EPERM
  SystemCallArchitectures: native
  RestrictAddressFamilies: [AF_UNIX, AF_INET, AF_INET6]
  MemoryDenyWriteExecute: yes
  LockPersonality: yes
  RestrictRealtime: yes
  RestrictSUIDSGID: yes
  NoNewPrivileges: yes
  ProtectProc: invisible
  ProcSubset: pid
  IPAddressDeny: any
  SocketBindDeny: any
  RestrictFileSystems: "~devpts"
  UMask: "0077"
  LimitNOFILE: 1024
  LimitNPROC: 512
  LimitCORE: 0
  MemoryMax: 200M
  TasksMax: 64
"""
# What an nspawn container enforces and these probes show, whatever the host: mounts, namespaces, seccomp,
# capabilities, credentials, rlimits, and IPAddressDeny= (in a user-namespaced container its BPF program is loaded by
# the test process: machine/bpf_delegation.py).
ENFORCED_ON_NSPAWN = [
    "DynamicUser=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "PrivateDevices=yes",
    "PrivateNetwork=yes", "ReadOnlyPaths=/srv", "InaccessiblePaths=/opt", "ReadWritePaths=/var/tmp",
    "NoExecPaths=/dev /tmp /var/tmp", "ExecPaths=/dev/shm", "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
    "ProtectKernelTunables=yes", "ProtectHostname=yes", "ProtectControlGroups=yes", "RestrictNamespaces=yes",
    "SystemCallFilter=@system-service", "SystemCallErrorNumber=EPERM", "SystemCallArchitectures=native",
    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "MemoryDenyWriteExecute=yes", "LockPersonality=yes",
    "RestrictSUIDSGID=yes", "NoNewPrivileges=yes", "ProtectProc=invisible", "ProcSubset=pid",
    "UMask=0077", "LimitNOFILE=1024", "LimitNPROC=512", "LimitCORE=0", "IPAddressDeny=any",
    # What the container denies anyway, shown all the same: nspawn lets @clock and @module reach the kernel (a
    # read-only adjtimex, an empty module image), and an invalid SCHED_FIFO request gets EINVAL without the filter.
    "ProtectKernelModules=yes", "ProtectClock=yes", "RestrictRealtime=yes",
]
# For this dynamic user ProcSubset=pid leaves no /proc/kmsg to make inaccessible, and the kernel refuses syslog(2)
# to a user anyway (dmesg_restrict=1), with the filter's own EPERM: what is left is CAP_SYSLOG in the bounding set,
# which only the user-namespaced container has (nspawn grants it there, where it gives no power over the host).
SHOWN_BY_CAP_SYSLOG = ["ProtectKernelLogs=yes"]
REASONS = ("already so without any hardening", "already so for the service's user", "cannot observe it",
           "not enforced even with only")


def outcomes_by_item(output: str) -> dict[str, str]:
    found = re.findall(r"harden\.yaml::(.+?) is (?:enforced|denied) (PASSED|FAILED|SKIPPED)", output)
    return dict(found)


def test_every_directive_is_enforced_or_unverifiable_with_its_reason(pytester: pytest.Pytester,
                                                                     machine: Machine) -> None:
    pytester.makefile(".yaml", harden=EVERY_DIRECTIVE)
    result = pytester.runpytest("-v", "-rs", "--harden-diagnose=off")
    output = result.stdout.str()
    outcomes = outcomes_by_item(output)
    assert len(outcomes) == EVERY_DIRECTIVE.count("\n  ") - 1  # one item per directive (exec_start aside)
    assert "FAILED" not in outcomes.values(), output
    user_namespaced = machine_facts(machine).user_namespaced
    enforced = ENFORCED_ON_NSPAWN + (SHOWN_BY_CAP_SYSLOG if user_namespaced else [])
    assert {name for name, outcome in outcomes.items() if outcome == "PASSED"} >= set(enforced), output
    skipped = [name for name, outcome in outcomes.items() if outcome == "SKIPPED"]
    if not user_namespaced:
        assert set(SHOWN_BY_CAP_SYSLOG) <= set(skipped)
    for name in skipped:  # every skip says why, on the line after the item's name
        reason = re.search(rf"SKIPPED \[1\] harden\.yaml:\d+: {re.escape(name)} cannot be verified on this machine "
                           rf"\(harden\.yaml:\d+\)(.*?)(?=\nSKIPPED|\n=)", output, re.DOTALL)
        assert reason is not None and any(why in reason.group(1) for why in REASONS), (name, output)
    if not user_namespaced:
        result.stdout.fnmatch_lines(["*ProtectKernelLogs=yes cannot be verified*", ("  - syslog(2) denied (EPERM): "
                                     "already so without any hardening: denied: EPERM*")])
    if machine_facts(machine).lacks("BPF_FRAMEWORK"):
        assert {"SocketBindDeny=any", "RestrictFileSystems=~devpts"} <= set(skipped)
        result.stdout.fnmatch_lines([("*SocketBindDeny=any cannot be verified on this machine*not enforced even with "
                                     "only SocketBindDeny=*built without BPF_FRAMEWORK*")])
    if any(tree.name == "unified" for tree in cgroups.hierarchies()):  # hybrid: memory and pids are cgroup v1
        assert {"MemoryMax=200M", "TasksMax=64"} <= set(skipped)
        result.stdout.fnmatch_lines([("*memory.max is 209715200: cannot observe it in the sandbox: could not probe: "
                                     "no memory controller manages this process's cgroup*")])

    strict = pytester.runpytest("-v", "--harden-diagnose=off", "--harden-strict-enforcement")
    strict.assert_outcomes(passed=len(outcomes) - len(skipped) + 1, failed=len(skipped))  # +1: the start item
    strict.stdout.fnmatch_lines(["(unverifiable here, and --harden-strict-enforcement is set)"])


def test_read_write_paths_reopening_etc_fails_protect_system(pytester: pytest.Pytester) -> None:
    pytester.makefile(".yaml", harden="""
service:
  exec_start: /bin/sleep infinity
hardening:
  ProtectSystem: strict
  ReadWritePaths: /etc
""")
    result = pytester.runpytest("-v", "--harden-diagnose=off")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines([
        "*harden.yaml::ProtectSystem=strict is enforced FAILED*",
        "*harden.yaml::ReadWritePaths=/etc is enforced PASSED*",  # it does what it says
        "ProtectSystem=strict is NOT enforced (harden.yaml:4)",
        "  expected: /etc is read-only (writes fail with EROFS)",
        "  happened: /etc is on a read-write mount: allowed (created and removed a file in /etc)",
        "  without hardening: allowed (created and removed a file in /etc)",
        "  with only ProtectSystem=strict (as root) it is enforced here, so something else in the spec undoes it",
        "  likely undone by: ReadWritePaths=/etc (harden.yaml:5)",
        "  still in force: /usr is read-only (writes fail with EROFS); /var is read-only (writes fail with EROFS)",
    ])


def test_a_later_assignment_that_reallows_mount_fails_the_declared_denial(pytester: pytest.Pytester) -> None:
    pytester.makefile(".yaml", harden="""
service:
  exec_start: /bin/sleep infinity
hardening:
  SystemCallFilter: ["~@mount @reboot", "@mount"]   # the second line takes @mount off the deny list again
deny:
  - syscall: mount
  - syscall: reboot
""")
    result = pytester.runpytest("-v", "--harden-diagnose=off")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines([
        "*harden.yaml::SystemCallFilter=~@mount @reboot; SystemCallFilter=@mount is enforced PASSED*",
        "*harden.yaml::syscall mount is denied FAILED*",
        "*harden.yaml::syscall reboot is denied PASSED*",
        "syscall mount is NOT denied (harden.yaml:6)",
        "  expected: mount(2) is denied",
        ("  happened: allowed (mount() reached the kernel, which refused the probe's invalid arguments (ENOENT, as "
        "intended))"),
        "  should have been denied by: SystemCallFilter=~@mount @reboot; SystemCallFilter=@mount (harden.yaml:4)",
    ])


def test_enforcement_items_can_be_switched_off_per_spec(pytester: pytest.Pytester) -> None:
    pytester.makefile(".yaml", harden="""
service:
  exec_start: /bin/sleep infinity
hardening:
  ProtectSystem: strict
  MemoryMax: 100M
enforcement: {skip: [MemoryMax]}
""")
    result = pytester.runpytest("-v", "--harden-diagnose=off")
    result.assert_outcomes(passed=2)
    assert "::MemoryMax" not in result.stdout.str()  # no item (the machine's capability line may name it)
    (pytester.path / "harden.yaml").write_text((pytester.path / "harden.yaml").read_text().replace(
        "enforcement: {skip: [MemoryMax]}", "enforcement: false"))
    pytester.runpytest("-v").assert_outcomes(passed=1)  # only the start item


def test_assert_denied_in_python(pytester: pytest.Pytester) -> None:
    pytester.makefile(".yaml", service="""
service:
  exec_start: /bin/sleep infinity
hardening:
  DynamicUser: yes
  RestrictAddressFamilies: [AF_UNIX, AF_INET]
""")
    pytester.makepyfile("""
        import pytest

        @pytest.mark.harden("service.yaml")
        def test_denied(hardened_service):
            hardened_service.assert_denied(write="/etc/passwd", family=["AF_NETLINK", "AF_PACKET"],
                                           capability="CAP_SYS_ADMIN")

        @pytest.mark.harden("service.yaml")
        def test_not_denied(hardened_service):
            hardened_service.assert_denied(syscall="mount")

        @pytest.mark.harden("service.yaml")
        def test_proves_nothing(hardened_service):
            hardened_service.assert_denied(read="/does-not-exist")

        @pytest.mark.harden("service.yaml")
        def test_proves_nothing_strictly(hardened_service):
            hardened_service.assert_denied(read="/does-not-exist", strict=True)
    """)
    result = pytester.runpytest("-rs")
    result.assert_outcomes(passed=1, failed=2, skipped=1)
    output = result.stdout.str()
    result.stdout.fnmatch_lines([
        '>       hardened_service.assert_denied(syscall="mount")',  # the user's line, not the plugin's
        "E       AssertionError: syscall mount is NOT denied*",
        "E         expected: mount(2) is denied",
        "E         happened: allowed (mount() reached the kernel*",
        "E         should have been denied by: no directive of the spec covers it (e.g. SystemCallFilter=~mount)",
        "SKIPPED [[]1[]] test_assert_denied_in_python.py:*: read /does-not-exist cannot be verified on this machine*",
        ("  - /does-not-exist is hidden (absent, inaccessible or empty): already so without any hardening: denied: "
        "ENOENT*"),
    ])
    assert "__tracebackhide__" not in output and "def assert_denied" not in output
