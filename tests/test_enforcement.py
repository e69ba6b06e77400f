"""The expectation mapping and the verdicts, with a fake probe host: no machine needed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import pytest

from pytest_systemd_harden.kernel.flags import CAPABILITY_BITS
from pytest_systemd_harden.probes.catalogue import BIND_PORT, Denial
from pytest_systemd_harden.probes.model import Probe, ProbeResult
from pytest_systemd_harden.probes.runner import Batch, MachineFacts
from pytest_systemd_harden.sandbox import expectations as enforcement
from pytest_systemd_harden.sandbox import verdict
from pytest_systemd_harden.sandbox.expectations import (
    ENFORCED,
    NOT_ENFORCED,
    UNVERIFIABLE,
    BindRule,
    effective_list,
    ip_denied,
    item_names,
    makes_read_only,
    plan,
    syscall_filter_ways,
)
from pytest_systemd_harden.sandbox.verdict import verify
from pytest_systemd_harden.spec.directives import Directive
from pytest_systemd_harden.spec.load import Spec

MakeSpec = Callable[..., Spec]

GROUPS = {
    "@default": frozenset({"execve", "exit", "getpid", "brk"}),
    "@mount": frozenset({"mount", "umount2", "pivot_root", "chroot"}),
    "@clock": frozenset({"clock_settime", "settimeofday", "adjtimex"}),
    "@reboot": frozenset({"reboot", "kexec_load"}),
    "@system-service": frozenset({"execve", "exit", "getpid", "brk", "personality", "setrlimit", "mlock", "socket"}),
}
FACTS = MachineFacts(252, frozenset({"+SECCOMP", "-BPF_FRAMEWORK"}), GROUPS)

ALL_CAPS = list(range(41))
NSPAWN_CAPS = [bit for bit in ALL_CAPS if bit not in (14, 16, 17, 20, 24, 25) and bit < 32]


def allowed(probe: Probe, **facts: Any) -> ProbeResult:
    return ProbeResult(probe, "allowed", detail="done", facts=facts)


def denied(probe: Probe, errno: str | None = None, signal: str | None = None, **facts: Any) -> ProbeResult:
    return ProbeResult(probe, "denied", errno=errno, signal=signal, detail="refused", facts=facts)


def status(uid: int = 0, bounding: Sequence[int] = NSPAWN_CAPS, nnp: int = 0, user: str = "root",
           umask: int = 0o022, effective: Sequence[int] | None = None) -> ProbeResult:
    return allowed(Probe("status"), uid=uid, user=user, cap_bounding=list(bounding),
                   cap_effective=list(bounding if effective is None and uid == 0 else effective or []),
                   cap_permitted=[], cap_ambient=[], no_new_privs=nnp, umask=umask)


def write(path: str, readonly: bool, errno: str | None = None) -> ProbeResult:
    probe = Probe("write", path)
    return denied(probe, errno, readonly=readonly) if errno else allowed(probe, readonly=readonly)


class FakeHost:
    """Canned batches: the sandbox, the machine, the service's user, and solo runs by directive names."""

    def __init__(self, sandbox: Sequence[ProbeResult], machine: Sequence[ProbeResult],
                 user: Sequence[ProbeResult] = (), solo: dict[str, Sequence[ProbeResult]] | None = None,
                 facts: MachineFacts = FACTS) -> None:
        self.results = {"sandbox": sandbox, "machine": machine, "user": user}
        self.solo = solo or {}
        self.solo_runs: list[tuple[str | None, tuple[str, ...]]] = []
        self._facts = facts

    def facts(self) -> MachineFacts:
        return self._facts

    @staticmethod
    def batch(label: str, results: Sequence[ProbeResult], probes: Sequence[Probe]) -> Batch:
        found = {r.probe: r for r in results}
        return Batch(label, {p: found.get(p, ProbeResult.missing(p, f"not simulated {label}")) for p in probes})

    def sandbox(self, probes: Sequence[Probe]) -> Batch:
        return self.batch("in the sandbox", self.results["sandbox"], probes)

    def machine(self, probes: Sequence[Probe]) -> Batch:
        return self.batch("on the machine", self.results["machine"], probes)

    def as_user(self, probes: Sequence[Probe], user: str | None, directives: Sequence[Directive]) -> Batch:
        if not directives:
            return self.batch("as the user", self.results["user"], probes)
        names = tuple(d.name for d in directives)
        self.solo_runs.append((user, names))
        return self.batch("solo", self.solo.get(" ".join(names), ()), probes)


def spec_with(make_spec: MakeSpec, hardening: str, deny: str = "", extra: str = "") -> Spec:
    text = "service:\n  exec_start: /bin/sleep infinity\nhardening:\n" + hardening
    if deny:
        text += "deny:\n" + deny
    return make_spec(text + extra)


def judged(make_spec: MakeSpec, hardening: str, host: FakeHost, deny: str = "") -> verdict.Report:
    spec = spec_with(make_spec, hardening, deny)
    return verify(host, plan(spec, FACTS), spec.path.name)


# --- reading directives as systemd does ---------------------------------------------------------------------

def test_a_later_assignment_of_the_other_polarity_removes_names() -> None:
    assert effective_list(["~@mount", "@mount"], lambda n: GROUPS.get(n, {n})) == (False, {})
    allow_list, table = effective_list(["@system-service", "~personality"], lambda n: GROUPS.get(n, {n}),
                                       GROUPS["@default"])
    assert allow_list and "personality" not in table and "socket" in table and "getpid" in table  # @default
    assert effective_list(["none"]) == (True, {})
    assert effective_list(["AF_UNIX AF_INET", "~AF_INET"]) == (True, {"AF_UNIX": None})


def test_syscall_filter_says_how_each_syscall_is_denied() -> None:
    def ways(*directives: tuple[str, Any]) -> Callable[[str], str | None]:
        return syscall_filter_ways([Directive.parse(name, value) for name, value in directives], FACTS)

    allow_list = ways(("SystemCallFilter", "@system-service"))
    assert (allow_list("mount"), allow_list("personality")) == ("SIGSYS", None)
    with_errno = ways(("SystemCallFilter", "@system-service"), ("SystemCallErrorNumber", "EPERM"))
    assert with_errno("reboot") == "EPERM"
    per_entry = ways(("SystemCallFilter", "~@mount mount:EACCES"))
    assert (per_entry("mount"), per_entry("chroot"), per_entry("reboot")) == ("EACCES", "SIGSYS", None)
    turned_off = ways(("SystemCallFilter", ["~@mount", "@mount"]))
    assert turned_off("mount") is None


def test_ip_address_rules_on_loopback() -> None:
    assert ip_denied("127.0.0.1:9", ["any"], [])
    assert not ip_denied("127.0.0.1:9", ["any"], ["localhost"])
    assert ip_denied("[::1]:9", ["any"], ["127.0.0.1"])  # allowing the IPv4 loopback leaves ::1 denied
    assert not ip_denied("127.0.0.1:9", ["10.0.0.0/8"], [])


def test_socket_bind_rules() -> None:
    rule = BindRule.parse("ipv6:udp:5000-5010")
    assert (rule.family, rule.protocol, rule.ports) == (6, "udp", (5000, 5010))
    assert rule.matches(6, "udp", 5005) and not rule.matches(4, "udp", 5005) and not rule.matches(6, "tcp", 5005)
    assert BindRule.parse("any").probe_target() == (4, "tcp", BIND_PORT)
    assert BindRule.parse("tcp:80").probe_target() == (4, "tcp", 80)


@pytest.mark.parametrize(("name", "value", "path", "expected"), [
    ("ProtectSystem", "strict", "/var/lib/app", True),
    ("ProtectSystem", "strict", "/proc/sys", False),
    ("ProtectSystem", "full", "/etc", True),
    ("ProtectSystem", "yes", "/etc", False),
    ("DynamicUser", "yes", "/etc", True),  # implies ProtectSystem=strict
    ("ReadOnlyPaths", "/srv", "/srv/data", True),
    ("ReadOnlyPaths", "/srv", "/srvx", False),
    ("ProtectHome", "read-only", "/root", True),
    ("ProtectKernelTunables", "yes", "/proc/sys/net", True),
])
def test_which_directive_makes_a_path_read_only(name: str, value: str, path: str, expected: bool) -> None:
    assert makes_read_only(Directive.parse(name, value), path) is expected


# --- planning -----------------------------------------------------------------------------------------------

def test_every_confining_directive_and_denial_gets_an_item(make_spec: MakeSpec) -> None:
    spec = spec_with(make_spec, """  ProtectSystem: strict
  PrivateTmp: no
  Restart: on-failure
  KeyringMode: private
  SystemCallFilter: "@system-service"
""", deny="  - write: /etc/passwd\n  - syscall: [mount, reboot]\n")
    names = [name for name, _title, _line in item_names(spec)]
    assert names == ["ProtectSystem=strict", "KeyringMode=private", "SystemCallFilter=@system-service",
                     "write /etc/passwd", "syscall mount", "syscall reboot"]
    planned = plan(spec, FACTS)
    assert [s.name for s in planned.subjects] == names  # collection and the run agree on the items
    strict = planned.subject("ProtectSystem=strict")
    assert [c.probe for c in strict.checks] == [Probe("write", "/usr"), Probe("write", "/etc"), Probe("write", "/var")]
    assert "no probe observes KeyringMode=" in planned.subject("KeyringMode=private").no_checks
    filtered = {c.probe.arg for c in planned.subject("SystemCallFilter=@system-service").checks}
    assert {"mount", "reboot", "clock_settime"} <= filtered and "personality" not in filtered


def test_enforcement_skip_and_off(make_spec: MakeSpec) -> None:
    spec = spec_with(make_spec, "  ProtectSystem: strict\n  MemoryMax: 100M\n",
                     extra="enforcement: {skip: [MemoryMax]}\n")
    assert [name for name, _t, _l in item_names(spec)] == ["ProtectSystem=strict"]
    assert not spec_with(make_spec, "  ProtectSystem: strict\n", extra="enforcement: false\n").enforcement.enabled


def test_a_filter_that_denies_nothing_says_so(make_spec: MakeSpec) -> None:
    spec = spec_with(make_spec, '  SystemCallFilter: ["~@mount", "@mount"]\n')
    subject = plan(spec, FACTS).subjects[0]
    assert subject.checks == () and "denies none of the probed syscalls" in subject.no_checks


# --- verdicts -----------------------------------------------------------------------------------------------

def test_enforced_when_the_sandbox_denies_what_the_machine_allows(make_spec: MakeSpec) -> None:
    host = FakeHost(
        sandbox=[status(), write("/usr", True, "EROFS"), write("/etc", True, "EROFS"), write("/var", True, "EROFS")],
        machine=[status(), write("/usr", False), write("/etc", False), write("/var", False)])
    verdict = judged(make_spec, "  ProtectSystem: strict\n", host)["ProtectSystem=strict"]
    assert verdict.status == ENFORCED
    assert verdict.message().splitlines() == [
        "ProtectSystem=strict is enforced (harden.yaml:4)",
        "  - /usr is read-only (writes fail with EROFS): yes",
        "  - /etc is read-only (writes fail with EROFS): yes",
        "  - /var is read-only (writes fail with EROFS): yes",
    ]
    assert host.solo_runs == []  # nothing failed: no solo run


def test_already_denied_without_hardening_is_unverifiable_not_a_pass(make_spec: MakeSpec) -> None:
    no_module_caps = [bit for bit in NSPAWN_CAPS if bit != CAPABILITY_BITS["CAP_SYS_MODULE"]]
    host = FakeHost(
        sandbox=[status(bounding=no_module_caps), denied(Probe("syscall", "init_module"), "EPERM"),
                 denied(Probe("syscall", "finit_module"), "EPERM"), denied(Probe("read", "/usr/lib/modules"), "EACCES"),
                 denied(Probe("read", "/lib/modules"), "ENOENT")],
        machine=[status(bounding=no_module_caps), denied(Probe("syscall", "init_module"), "EPERM"),
                 denied(Probe("syscall", "finit_module"), "EPERM"), denied(Probe("read", "/usr/lib/modules"), "ENOENT"),
                 denied(Probe("read", "/lib/modules"), "ENOENT")])
    verdict = judged(make_spec, "  ProtectKernelModules: yes\n", host)["ProtectKernelModules=yes"]
    assert verdict.status == UNVERIFIABLE
    message = verdict.message()
    assert message.startswith("ProtectKernelModules=yes cannot be verified on this machine (harden.yaml:4)")
    assert "  - init_module(2) denied (EPERM): already so without any hardening: denied: EPERM" in message
    assert "  - CAP_SYS_MODULE not in the capability bounding set: already so without any hardening" in message


def test_already_denied_for_the_services_user_is_unverifiable(make_spec: MakeSpec) -> None:
    dynamic = status(uid=61300, user="harden-x", nnp=1)
    host = FakeHost(sandbox=[dynamic, denied(Probe("realtime"), "EPERM")],
                    machine=[status(), allowed(Probe("realtime"))],
                    user=[status(uid=61300, user="harden-x"), denied(Probe("realtime"), "EPERM")])
    report = judged(make_spec, "  DynamicUser: yes\n  RestrictRealtime: yes\n", host)
    assert report["DynamicUser=yes"].status == ENFORCED
    verdict = report["RestrictRealtime=yes"]
    assert verdict.status == UNVERIFIABLE
    assert "already so for the service's user (harden-x) without hardening: denied: EPERM" in verdict.message()


def test_a_path_reopened_by_read_write_paths_fails_and_names_the_culprit(make_spec: MakeSpec) -> None:
    host = FakeHost(
        sandbox=[status(), write("/usr", True, "EROFS"), write("/etc", False), write("/var", True, "EROFS")],
        machine=[status(), write("/usr", False), write("/etc", False), write("/var", False)],
        solo={"ProtectSystem": [write("/etc", True, "EROFS")]})
    report = judged(make_spec, "  ProtectSystem: strict\n  ReadWritePaths: /etc\n", host)
    verdict = report["ProtectSystem=strict"]
    assert verdict.status == NOT_ENFORCED
    assert host.solo_runs == [(None, ("ProtectSystem",))]
    assert verdict.message().splitlines() == [
        "ProtectSystem=strict is NOT enforced (harden.yaml:4)",
        "  expected: /etc is read-only (writes fail with EROFS)",
        "  happened: /etc is on a read-write mount: allowed (done)",
        "  without hardening: allowed (done)",
        "  with only ProtectSystem=strict (as root) it is enforced here, so something else in the spec undoes it",
        "  likely undone by: ReadWritePaths=/etc (harden.yaml:5)",
        "  still in force: /usr is read-only (writes fail with EROFS); /var is read-only (writes fail with EROFS)",
    ]
    assert report["ReadWritePaths=/etc"].status == ENFORCED  # it does what it says: /etc stays writable


def test_not_enforced_even_alone_is_the_machines_limit(make_spec: MakeSpec) -> None:
    probe = Probe("bind", f"tcp:127.0.0.1:{BIND_PORT}")
    host = FakeHost(sandbox=[status(), allowed(probe)], machine=[status(), allowed(probe)],
                    solo={"SocketBindDeny": [allowed(probe)]})
    verdict = judged(make_spec, "  SocketBindDeny: any\n", host)["SocketBindDeny=any"]
    assert verdict.status == UNVERIFIABLE
    assert "not enforced even with only SocketBindDeny=any (as root)" in verdict.reason
    assert "built without BPF_FRAMEWORK" in verdict.reason


def test_a_seccomp_kill_masking_protect_clock_counts_with_a_note(make_spec: MakeSpec) -> None:
    clock = [Probe("syscall", name) for name in ("clock_settime", "settimeofday", "adjtimex")]
    host = FakeHost(sandbox=[status(), *(denied(p, signal="SIGSYS") for p in clock)],
                    machine=[status(bounding=ALL_CAPS), *(allowed(p, refused="EINVAL") for p in clock)])
    report = judged(make_spec, '  SystemCallFilter: "@system-service"\n  ProtectClock: yes\n', host)
    verdict = report["ProtectClock=yes"]
    assert verdict.status == ENFORCED
    assert "  - clock_settime(2) denied (EPERM): yes (denied with SIGSYS by another directive of the spec, which " \
           "masks this one)" in verdict.message()


def test_the_wrong_errno_means_the_filter_did_not_act(make_spec: MakeSpec) -> None:
    # seccomp runs before the kernel's own checks: EPERM (no CAP_NET_RAW) instead of EAFNOSUPPORT means
    # RestrictAddressFamilies= let socket(AF_PACKET) through.
    families = [Probe("socket", family) for family in ("AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET", "AF_VSOCK")]
    sandbox = [status(), *(denied(p, "EAFNOSUPPORT") for p in families[:3]), denied(families[3], "EPERM"),
               denied(families[4], "EAFNOSUPPORT")]
    host = FakeHost(sandbox=sandbox, machine=[status(), *(allowed(p) for p in families)],
                    solo={"RestrictAddressFamilies": [denied(families[3], "EAFNOSUPPORT")]})
    verdict = judged(make_spec, "  RestrictAddressFamilies: AF_UNIX\n", host)["RestrictAddressFamilies=AF_UNIX"]
    assert verdict.status == NOT_ENFORCED
    assert "  happened: denied: EPERM (refused)" in verdict.message()


def test_a_probe_batch_killed_midway_leaves_the_rest_unverifiable(make_spec: MakeSpec) -> None:
    host = FakeHost(sandbox=[status()], machine=[status(), allowed(Probe("memory", "wx")),
                                                   allowed(Probe("memory", "mprotect"))])
    verdict = judged(make_spec, "  MemoryDenyWriteExecute: yes\n", host)["MemoryDenyWriteExecute=yes"]
    assert verdict.status == UNVERIFIABLE
    assert "cannot observe it in the sandbox: could not probe: not simulated in the sandbox" in verdict.message()


# --- declared denials ---------------------------------------------------------------------------------------

def test_a_declared_denial_names_the_directive_that_should_deny_it(make_spec: MakeSpec) -> None:
    probe = Probe("write", "/etc/passwd")
    host = FakeHost(sandbox=[status(), allowed(probe, readonly=False)], machine=[status(), allowed(probe)])
    report = judged(make_spec, "  ProtectSystem: full\n  ReadWritePaths: /etc\n", host, deny="  - write: /etc/passwd\n")
    assert report["write /etc/passwd"].message().splitlines() == [
        "write /etc/passwd is NOT denied (harden.yaml:7)",
        "  expected: write to /etc/passwd is denied",
        "  happened: allowed (done)",
        "  without hardening: allowed (done)",
        "  should have been denied by: ProtectSystem=full (harden.yaml:4)",
        "  likely undone by: ReadWritePaths=/etc (harden.yaml:5)",
    ]
    bare = judged(make_spec, "  PrivateTmp: yes\n", host, deny="  - write: /etc/passwd\n")["write /etc/passwd"]
    assert "  should have been denied by: no directive of the spec covers it (e.g. ReadOnlyPaths=/etc/passwd)" \
        in bare.message()


def test_a_declared_denial_that_holds_without_hardening_proves_nothing(make_spec: MakeSpec) -> None:
    probe = Probe("read", "/hoem")
    host = FakeHost(sandbox=[status(), denied(probe, "ENOENT")], machine=[status(), denied(probe, "ENOENT")])
    verdict = judged(make_spec, "  ProtectHome: yes\n", host, deny="  - read: /hoem\n")["read /hoem"]
    assert verdict.status == UNVERIFIABLE
    assert "already so without any hardening: denied: ENOENT" in verdict.message()


@pytest.mark.parametrize(("facts", "expected"), [
    ({"uid": 0, "cap_effective": [21], "cap_bounding": [21], "no_new_privs": 0}, False),  # root holds it
    ({"uid": 61300, "cap_effective": [], "cap_bounding": [21], "no_new_privs": 0}, False),  # a setuid binary could
    ({"uid": 61300, "cap_effective": [], "cap_bounding": [21], "no_new_privs": 1}, True),
    ({"uid": 0, "cap_effective": [], "cap_bounding": [], "no_new_privs": 0}, True),
])
def test_a_capability_is_denied_when_neither_held_nor_obtainable(facts: dict[str, Any], expected: bool) -> None:
    check = enforcement.denial_subject(Denial("capability", "CAP_SYS_ADMIN")).checks[0]
    result = allowed(Probe("status"), **facts)
    assert check.holds(result, result, frozenset()) is expected


def test_results_are_read_from_json_lines_and_missing_ones_explained() -> None:
    from pytest_systemd_harden.probes.runner import parse_batch
    from pytest_systemd_harden.result import CommandResult

    probes = [Probe("status"), Probe("syscall", "mount"), Probe("realtime")]
    output = ('{"kind": "status", "arg": "", "status": "allowed", "detail": "", "facts": {"uid": 0}}\n'
              '{"kind": "syscall", "arg": "mount", "status": "denied", "signal": "SIGSYS", "detail": "killed"}\n')
    batch = parse_batch(probes, CommandResult("python3 -", None, 31, output, "", "in the sandbox"), "in the sandbox")
    assert batch[Probe("syscall", "mount")].way == "SIGSYS"
    assert batch[Probe("status")].facts == {"uid": 0}
    assert batch[Probe("realtime")].describe() == \
        "could not probe: the probe process ended before this probe (killed by SIGSYS (seccomp: Bad system call))"


@pytest.mark.parametrize(("name", "value", "says"), [
    ("ProtectHome", "tmpfs", "systemd/systemd/issues/34825"),
    ("SocketBindDeny", "any", "built without BPF_FRAMEWORK"),
    ("ProtectClock", "yes", "a host running the same systemd may not either"),
])
def test_a_directive_not_enforced_even_alone_gets_a_specific_reason(name: str, value: str, says: str) -> None:
    assert says in verdict.unenforceable_reason(Directive.parse(name, value), FACTS)


@pytest.mark.parametrize(("cgroup_fs", "says", "not_says"), [
    ("tmpfs", "v1 devices controller", "privileged: true"),  # hybrid: a privileged container does not enforce it
    ("cgroup2fs", "privileged: true", "v1 devices controller"),  # unified: a BPF program, as IPAddressDeny=
])
def test_the_device_policy_s_reason_in_a_user_namespace_follows_the_cgroup_layout(cgroup_fs: str, says: str,
                                                                                  not_says: str) -> None:
    facts = replace(FACTS, user_namespaced=True, cgroup_fs=cgroup_fs)
    reason = verdict.unenforceable_reason(Directive.parse("DevicePolicy", "closed"), facts)
    assert says in reason and not_says not in reason, reason


def test_a_solo_run_that_observes_nothing_leaves_the_failure_standing(make_spec: MakeSpec) -> None:
    probe = Probe("connect", "127.0.0.1:9")
    host = FakeHost(sandbox=[status(), allowed(probe), denied(Probe("connect", "[::1]:9"), "EPERM")],
                    machine=[status(), allowed(probe), allowed(Probe("connect", "[::1]:9"))], solo={})
    verdict = judged(make_spec, "  IPAddressDeny: any\n", host)["IPAddressDeny=any"]
    assert verdict.status == NOT_ENFORCED
    assert verdict.reason.startswith("rerun with only IPAddressDeny=any (as root) to tell the machine from the spec, "
                                     "it could not be observed: cannot observe it in the sandbox")


MEMCACHED_UNIT = """[Unit]
Description=memcached daemon

[Service]
ExecStart=/usr/bin/memcached
# Kernel variables accessible through /proc/sys, /sys, /proc/sysrq-trigger,
# /proc/latency_stats, /proc/acpi
PrivateTmp=true
ProtectSystem=full
RestrictNamespaces=true
CapabilityBoundingSet=CAP_SETGID CAP_SETUID
Restart=always
"""


def test_the_units_own_hardening_gets_items_named_by_file_and_line(make_spec: MakeSpec) -> None:
    from pytest_systemd_harden.spec.unit_file import own_directives_from_files

    own = own_directives_from_files("memcached.service", [("/lib/systemd/system/memcached.service", MEMCACHED_UNIT)])
    spec = spec_with(make_spec, '  ProtectSystem: strict\n  CapabilityBoundingSet: "~CAP_SETUID"\n')
    names = [name for name, _title, _line in item_names(spec, own)]
    # A comment starting "# /proc" is no file header; the spec's single value replaces the unit's (strict wins,
    # full is not in force); a list both set is checked as systemd combines it, both places named.
    assert names == ["PrivateTmp=yes (memcached.service:8)", "RestrictNamespaces=yes (memcached.service:10)",
                     ("CapabilityBoundingSet=CAP_SETGID CAP_SETUID; CapabilityBoundingSet=~CAP_SETUID "
                      f"(memcached.service:11, {spec.path.name}:5)"), "ProtectSystem=strict"]
    planned = plan(spec, FACTS, own=own)
    assert [s.name for s in planned.subjects] == names  # collection and the run agree on the items
    combined = planned.subject(names[2])
    assert combined.location == f"memcached.service:11, {spec.path.name}:5"
    # systemd's reading of the two: a later ~ list replaces (every capability but CAP_SETUID), which the unit's
    # line alone (CAP_SETGID CAP_SETUID only) would not say.
    expected = combined.checks[0].expected
    assert "CAP_SETUID" not in expected and "CAP_CHOWN" in expected


def test_an_own_hardening_not_known_at_collection_is_one_item(make_spec: MakeSpec) -> None:
    from pytest_systemd_harden.sandbox.expectations import ENFORCED, NOT_ENFORCED, OWN_HARDENING, UNVERIFIABLE
    from pytest_systemd_harden.sandbox.verdict import Report, Verdict
    from pytest_systemd_harden.spec.unit_file import own_directives_from_files

    spec = spec_with(make_spec, "  ProtectHome: yes\n")
    names = [name for name, _title, _line in item_names(spec, None)]
    assert names == ["ProtectHome=yes", OWN_HARDENING]
    own = own_directives_from_files("m.service", [("/lib/systemd/system/m.service", MEMCACHED_UNIT)])
    planned = plan(spec, FACTS, own=own)
    verdicts = {s.name: Verdict(s, NOT_ENFORCED if "PrivateTmp" in s.name else ENFORCED, spec_name="h.yaml")
                for s in planned.subjects}
    report = Report(planned, verdicts)
    merged = report.for_item(OWN_HARDENING, names)
    assert merged.status == NOT_ENFORCED
    assert merged.message().startswith("PrivateTmp=yes (m.service:8) is NOT enforced")
    assert report.for_item("ProtectHome=yes", names).status == ENFORCED  # the spec's own item is not in it
    assert "ProtectHome" not in merged.message()
    gone = report.for_item("PrivateDevices=yes (m.service:99)", names)  # read from an image that changed since
    assert gone.status == UNVERIFIABLE and "run again" in gone.message()

# --- directives a container hides: shown by what reaches the kernel, mount nodes and lifecycles ----------------

def test_restrict_realtime_is_shown_by_an_invalid_request_where_nobody_may_become_realtime(make_spec: MakeSpec) -> None:
    # No process of a container may become SCHED_FIFO, but SCHED_FIFO with priority 0 reaches the kernel's argument
    # check (EINVAL) unless the filter stops it (EPERM): measured on nspawn, for root and for a dynamic user.
    fifo, invalid = Probe("realtime"), Probe("realtime", "filter")
    host = FakeHost(sandbox=[status(), denied(fifo, "EPERM"), denied(invalid, "EPERM")],
                    machine=[status(), denied(fifo, "EPERM"), allowed(invalid)])
    verdict = judged(make_spec, "  RestrictRealtime: yes\n", host)["RestrictRealtime=yes"]
    assert verdict.status == ENFORCED, verdict.message()
    unfiltered = FakeHost(sandbox=[status(), denied(fifo, "EPERM"), allowed(invalid)],
                          machine=[status(), denied(fifo, "EPERM"), allowed(invalid)],
                          solo={"RestrictRealtime": [allowed(invalid)]})
    assert judged(make_spec, "  RestrictRealtime: yes\n", unfiltered)["RestrictRealtime=yes"].status == UNVERIFIABLE


def test_protect_kernel_logs_shows_as_an_inaccessible_node_even_for_a_user_shut_out_already(
        make_spec: MakeSpec) -> None:
    kmsg = Probe("read", "/proc/kmsg")
    host = FakeHost(sandbox=[status(uid=61200, user="svc"), denied(kmsg, "EACCES", mode=0)],
                    machine=[status(), allowed(kmsg, object="1:2", mode=0o600)],
                    user=[status(uid=61200, user="svc"), denied(kmsg, "EACCES", object="1:2", mode=0o600)])
    verdict = judged(make_spec, "  ProtectKernelLogs: yes\n  DynamicUser: yes\n", host)["ProtectKernelLogs=yes"]
    assert verdict.status == ENFORCED, verdict.message()
    assert "replaced by an inaccessible node (mode 000): yes" in verdict.message()
    # Absent altogether (ProcSubset=pid): nothing shows the directive's own mount, and no mode is made up.
    hidden_by_subset = FakeHost(sandbox=[status(uid=61200, user="svc"), denied(kmsg, "ENOENT")],
                                machine=[status(), allowed(kmsg, object="1:2", mode=0o600)],
                                user=[status(uid=61200, user="svc"), denied(kmsg, "EACCES", mode=0o600)])
    verdict = judged(make_spec, "  ProtectKernelLogs: yes\n  DynamicUser: yes\n",
                     hidden_by_subset)["ProtectKernelLogs=yes"]
    assert verdict.status == UNVERIFIABLE and "inaccessible node" in verdict.message()


def test_ip_address_deny_with_localhost_allowed_is_shown_on_the_machines_own_address(make_spec: MakeSpec) -> None:
    own = Probe("connect", "192.0.2.1:9")
    loopback = Probe("connect", "127.0.0.1:9")
    host = FakeHost(sandbox=[status(), denied(own, "EPERM"), allowed(loopback)],
                    machine=[status(), allowed(own), allowed(loopback)])
    report = judged(make_spec, "  IPAddressDeny: any\n  IPAddressAllow: localhost\n", host)
    assert report["IPAddressDeny=any"].status == ENFORCED, report["IPAddressDeny=any"].message()
    assert report["IPAddressAllow=localhost"].status == ENFORCED, report["IPAddressAllow=localhost"].message()
    leaking = FakeHost(sandbox=[status(), allowed(own), allowed(loopback)],
                       machine=[status(), allowed(own), allowed(loopback)],
                       solo={"IPAddressDeny": [denied(own, "EPERM")]})
    report = judged(make_spec, "  IPAddressDeny: any\n  IPAddressAllow: localhost\n", leaking)
    assert report["IPAddressDeny=any"].status == NOT_ENFORCED
    assert "send to 192.0.2.1:9 denied (EPERM)" in report["IPAddressDeny=any"].message()
    # An allow list that covers the machine's address too leaves nothing to probe, and says so.
    report = judged(make_spec, "  IPAddressDeny: any\n  IPAddressAllow: localhost 192.0.2.0/24\n", host)
    assert report["IPAddressDeny=any"].status == UNVERIFIABLE
    assert "denies neither loopback nor the machine's own 192.0.2.1" in report["IPAddressDeny=any"].message()


def test_remove_ipc_is_judged_by_what_is_left_after_the_unit_stops(make_spec: MakeSpec) -> None:
    ipc = Probe("ipc")
    host = FakeHost(sandbox=[status(uid=61200, user="svc"), allowed(ipc, removed=True)],
                    machine=[status(), allowed(ipc, removed=False)],
                    user=[status(uid=61200, user="svc"), allowed(ipc, removed=False)])
    hardening = "  RemoveIPC: yes\n  DynamicUser: yes\n"
    assert judged(make_spec, hardening, host)["RemoveIPC=yes"].status == ENFORCED
    kept = FakeHost(sandbox=[status(uid=61200, user="svc"), allowed(ipc, removed=False)],
                    machine=[status(), allowed(ipc, removed=False)],
                    user=[status(uid=61200, user="svc"), allowed(ipc, removed=False)],
                    solo={"RemoveIPC": [allowed(ipc, removed=True)]})
    verdict = judged(make_spec, hardening, kept)["RemoveIPC=yes"]
    assert verdict.status == NOT_ENFORCED and "still there after the unit stopped" in verdict.message()
    as_root = judged(make_spec, "  RemoveIPC: yes\n", host)["RemoveIPC=yes"]
    assert as_root.status == UNVERIFIABLE and "root" in as_root.message()
    static = judged(make_spec, "  RemoveIPC: yes\n  User: nobody\n", host)["RemoveIPC=yes"]
    assert static.status == UNVERIFIABLE and "static User=" in static.message()
