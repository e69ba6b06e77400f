"""The diagnosis on a real machine: real breakage patterns, each named with a verified relaxation."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from pytest_systemd_harden.machine.backends.base import Machine
from pytest_systemd_harden.search.diagnosis import RESTRICTING, Diagnosis
from pytest_systemd_harden.search.scenarios import diagnose_failure, failure_report, run_scenario
from pytest_systemd_harden.spec.load import Spec
from pytest_systemd_harden.unit.service import HardenedService

# Restricting directives that do not matter to the scenarios below: the search must rule them out.
NOISE = """
  PrivateTmp: yes
  NoNewPrivileges: yes
  LockPersonality: yes
  RestrictRealtime: yes
  ProtectHostname: yes
  ProtectKernelModules: yes
"""


@pytest.fixture
def diagnose(machine: Machine, make_spec: Callable[[str], Spec]) -> Callable[[str, str], Diagnosis]:
    def run(hardening: str, command: str) -> Diagnosis:
        spec = make_spec(f"""
service:
  exec_start: /bin/sleep infinity
hardening:{NOISE}{hardening}
scenarios:
  - name: the feature
    inside: {command}
""")
        service = HardenedService(machine, spec)
        service.start()
        try:
            outcome = run_scenario(service, spec.scenarios[0])
            assert not outcome.passed, "the scenario must fail under this hardening for the test to mean anything"
            return diagnose_failure(service, spec.scenarios[0], failure_report(service, outcome))
        finally:
            service.stop()

    return run


def culprits(diagnosis: Diagnosis) -> list[str]:
    return [finding.culprit.name for finding in diagnosis.findings]


def test_getifaddrs_needs_af_netlink(diagnose) -> None:  # type: ignore[no-untyped-def]
    diagnosis = diagnose("  RestrictAddressFamilies: [AF_UNIX, AF_INET, AF_INET6]\n",
                         "python3 -c 'import socket; socket.if_nameindex()'")
    assert (diagnosis.verdict, culprits(diagnosis), diagnosis.verified) == ("found", ["RestrictAddressFamilies"], True)
    assert diagnosis.findings[0].relaxation is not None
    assert diagnosis.findings[0].relaxation.description == "also allow AF_NETLINK in RestrictAddressFamilies="
    assert "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK" in diagnosis.render()
    assert diagnosis.dropin_verified  # a grant: the printed drop-in, written as a file, passes


def test_proc_meminfo_under_proc_subset_pid(diagnose) -> None:  # type: ignore[no-untyped-def]
    diagnosis = diagnose("  ProcSubset: pid\n", "cat /proc/meminfo")
    assert culprits(diagnosis) == ["ProcSubset"]
    assert diagnosis.combined is not None and diagnosis.verified
    assert diagnosis.combined.description == "weaken ProcSubset=pid to ProcSubset=all"
    assert diagnosis.dropin_verified  # a weaker value, as printed


def test_a_write_under_protect_system_strict_gets_a_state_directory(diagnose) -> None:  # type: ignore[no-untyped-def]
    diagnosis = diagnose("  ProtectSystem: strict\n", "sh -c 'mkdir -p /var/lib/app && echo x > /var/lib/app/data'")
    assert culprits(diagnosis) == ["ProtectSystem"]
    relaxation = diagnosis.findings[0].relaxation
    assert relaxation is not None and diagnosis.verified
    assert relaxation.description == "let systemd create and grant /var/lib/app with StateDirectory=app"
    assert "StateDirectory: app" in diagnosis.render()  # ProtectSystem=strict itself stays


def test_write_execute_memory_under_memory_deny_write_execute(diagnose) -> None:  # type: ignore[no-untyped-def]
    diagnosis = diagnose("  MemoryDenyWriteExecute: yes\n",
                         "python3 -c 'import mmap; "
                         "mmap.mmap(-1, 4096, prot=mmap.PROT_READ|mmap.PROT_WRITE|mmap.PROT_EXEC)'")
    assert culprits(diagnosis) == ["MemoryDenyWriteExecute"]
    assert diagnosis.combined is not None and diagnosis.verified
    assert diagnosis.combined.description == "set MemoryDenyWriteExecute=no (systemd's default)"
    # A boolean is removed with its explicit value (an empty one is ignored by systemd), and that is what passed.
    assert "MemoryDenyWriteExecute=no" in diagnosis.as_dict()["dropin"]  # type: ignore[operator]
    assert diagnosis.as_dict()["dropin_verified"] is True


def test_chown_under_denied_privileged_calls_reallows_only_chown(diagnose) -> None:  # type: ignore[no-untyped-def]
    diagnosis = diagnose('  SystemCallFilter: ["@system-service", "~@privileged"]\n  SystemCallErrorNumber: EPERM\n',
                         "sh -c 'touch /tmp/f && chown 65534 /tmp/f'")
    assert culprits(diagnosis) == ["SystemCallFilter"]
    relaxation = diagnosis.findings[0].relaxation
    assert relaxation is not None and diagnosis.verified
    assert relaxation.description == "re-allow @chown after the deny list of SystemCallFilter="
    assert relaxation.needs.startswith("fchownat") and relaxation.needs.endswith("(in @privileged)")
    assert diagnosis.dropin_verified  # a syscall group re-allowed, as printed


def test_a_missing_capability_is_named(diagnose) -> None:  # type: ignore[no-untyped-def]
    diagnosis = diagnose('  CapabilityBoundingSet: ""\n', "sh -c 'touch /tmp/g && chown 65534 /tmp/g'")
    assert culprits(diagnosis) == ["CapabilityBoundingSet"]
    relaxation = diagnosis.findings[0].relaxation
    assert relaxation is not None and diagnosis.verified
    assert relaxation.description == "also allow CAP_CHOWN in CapabilityBoundingSet="
    assert diagnosis.dropin_verified


def test_a_scenario_that_fails_without_hardening_is_not_blamed_on_it(diagnose) -> None:  # type: ignore[no-untyped-def]
    diagnosis = diagnose("  ProtectSystem: strict\n", "cat /no/such/file")
    assert diagnosis.verdict == "not-hardening"
    assert "fails without hardening too: not a hardening problem" in diagnosis.render()
    assert diagnosis.runs == 2  # the failure rerun, and the control without hardening


def test_a_scenario_that_needs_an_earlier_ones_state_is_diagnosed_with_it(machine: Machine, make_spec) -> None:  # type: ignore[no-untyped-def]
    spec = make_spec("""
service:
  exec_start: /bin/sleep infinity
hardening:
  StateDirectory: app
  RestrictAddressFamilies: [AF_UNIX]
  PrivateTmp: yes
scenarios:
  - name: create the key
    inside: touch /var/lib/app/key
  - name: use the key over the network
    inside: sh -c 'test -e /var/lib/app/key && python3 -c "import socket; socket.socket(socket.AF_INET)"'
""")
    service = HardenedService(machine, spec)
    service.start()
    try:
        assert run_scenario(service, spec.scenarios[0]).passed
        outcome = run_scenario(service, spec.scenarios[1])
        assert not outcome.passed
        diagnosis = diagnose_failure(service, spec.scenarios[1], failure_report(service, outcome))
    finally:
        service.stop()
    # Without replaying "create the key", the control run would fail and blame the scenario itself.
    assert diagnosis.verdict == "found" and culprits(diagnosis) == ["RestrictAddressFamilies"]
    assert diagnosis.combined is not None and "AF_INET" in diagnosis.combined.description


def test_candidates_systemd_rejects_count_as_failures_not_crashes(diagnose) -> None:  # type: ignore[no-untyped-def]
    diagnosis = diagnose("  RestrictAddressFamilies: none\n", "python3 -c 'import socket; socket.socket()'")
    assert diagnosis.verdict == "found" and culprits(diagnosis) == ["RestrictAddressFamilies"]
    assert diagnosis.verified


# --- narrow relaxations: a grant before a weaker value or a removal ------------------------------------------------

# A 32-bit system call from a 64-bit process: getpid through int 0x80 (the i386 entry), in a page of machine code.
INT80 = r"""
import ctypes, mmap
page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write(b"\xb8\x14\x00\x00\x00\xcd\x80\xc3")  # mov eax, 20 (getpid on i386); int 0x80; ret
print("pid", ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))())
"""


def test_a_device_under_private_devices_is_bound_in(diagnose) -> None:  # type: ignore[no-untyped-def]
    diagnosis = diagnose("  PrivateDevices: yes\n",
                         "python3 -c \"import os; os.open('/dev/net/tun', os.O_RDWR)\"")
    assert culprits(diagnosis) == ["PrivateDevices"] and diagnosis.verified, diagnosis.render()
    assert diagnosis.findings[0].relaxation is not None
    assert diagnosis.findings[0].relaxation.needs == "device /dev/net/tun"
    assert "BindPaths=/dev/net/tun\n" in diagnosis.render() + "\n"
    assert "DeviceAllow=/dev/net/tun rw" in diagnosis.render()


def test_a_file_under_protect_home_gets_tmpfs_and_a_bind(machine: Machine, diagnose) -> None:  # type: ignore[no-untyped-def]
    assert machine.run(["sh", "-c", "echo machine x > /root/.netrc"]).ok
    diagnosis = diagnose("  ProtectHome: yes\n", "cat /root/.netrc")
    assert culprits(diagnosis) == ["ProtectHome"] and diagnosis.verified, diagnosis.render()
    assert diagnosis.combined is not None
    assert diagnosis.combined.description == ("show an empty home with ProtectHome=tmpfs and bind /root/.netrc into "
                                              "it with BindReadOnlyPaths=-/root/.netrc")


def test_a_log_file_under_etc_gets_its_directory_not_a_weaker_protect_system(machine: Machine, diagnose) -> None:  # type: ignore[no-untyped-def]
    assert machine.run(["mkdir", "-p", "/etc/app"]).ok
    diagnosis = diagnose("  ProtectSystem: strict\n", "sh -c 'echo started >> /etc/app/app.log'")
    assert culprits(diagnosis) == ["ProtectSystem"] and diagnosis.verified, diagnosis.render()
    assert diagnosis.combined is not None
    # systemd makes a ConfigurationDirectory= writable under ProtectSystem=strict: the idiomatic grant.
    assert diagnosis.combined.description == "let systemd create and grant /etc/app with ConfigurationDirectory=app"


def test_a_log_file_the_service_creates_under_var_log_gets_its_directory_not_a_weaker_protect_system(  # type: ignore[no-untyped-def]
        diagnose) -> None:
    diagnosis = diagnose("  ProtectSystem: strict\n", "sh -c 'echo started >> /var/log/app.log'")
    assert culprits(diagnosis) == ["ProtectSystem"] and diagnosis.verified, diagnosis.render()
    assert diagnosis.combined is not None
    # On the service's machine the control run (no hardening) made the file, and granting the file alone passed
    # there; on a fresh machine, where the service makes the file at its first start, it does not: the search made
    # again there grants the directory, still narrower than a weaker ProtectSystem=.
    assert diagnosis.note.startswith("The first search's fix passed on the machine it ran on"), diagnosis.render()
    assert diagnosis.combined.description == "grant /var/log with ReadWritePaths=-/var/log"
    assert diagnosis.dropin_verified, diagnosis.render()


def test_a_file_the_test_made_before_the_diagnosis_keeps_its_verdict_from_the_services_machine(  # type: ignore[no-untyped-def]
        machine: Machine, diagnose) -> None:
    # /root/.netrc2 was made by the test, on this machine only: a fresh machine cannot check the fix, and says so.
    assert machine.run(["sh", "-c", "echo machine x > /root/.netrc2"]).ok
    diagnosis = diagnose("  ProtectHome: yes\n", "cat /root/.netrc2")
    assert culprits(diagnosis) == ["ProtectHome"] and diagnosis.verified, diagnosis.render()
    assert diagnosis.dropin_verified is False
    assert "where the check fails without any hardening too" in diagnosis.note, diagnosis.render()
    assert "the fix is verified on this machine only" in diagnosis.render()


def test_32_bit_calls_get_x86_added_to_the_architectures(machine: Machine, diagnose) -> None:  # type: ignore[no-untyped-def]
    assert machine.run(["sh", "-c", 'printf "%s" "$1" > /opt/int80.py', "sh", INT80]).ok
    diagnosis = diagnose("  SystemCallArchitectures: native\n", "python3 /opt/int80.py")
    assert culprits(diagnosis) == ["SystemCallArchitectures"] and diagnosis.verified, diagnosis.render()
    assert "SystemCallArchitectures=native x86" in diagnosis.render()
    assert diagnosis.findings[0].relaxation is not None
    assert diagnosis.findings[0].relaxation.needs == "x86 system calls (32-bit)"


def test_a_syscall_killed_silently_is_named_from_the_kernel_log(diagnose) -> None:  # type: ignore[no-untyped-def]
    # The command hides every output of the killed helper: only the kernel's record names the call.
    diagnosis = diagnose('  SystemCallFilter: ["@system-service", "~@memlock"]\n',
                         "sh -c \"python3 -c 'import ctypes; ctypes.CDLL(None).mlockall(1)' >/dev/null 2>&1\"")
    assert culprits(diagnosis) == ["SystemCallFilter"] and diagnosis.verified, diagnosis.render()
    assert any(line.endswith("(python3) for syscall mlockall") for line in diagnosis.kernel), diagnosis.kernel
    assert diagnosis.findings[0].relaxation is not None
    assert diagnosis.findings[0].relaxation.needs == "mlockall (in @memlock)"


def test_every_record_of_a_burst_of_kills_is_read(machine: Machine) -> None:
    # The kernel prints at most 10 audit records per 5 s to its log for the whole host (printk_ratelimit): a
    # diagnosis after a few kills anywhere would lose the records its search follows. The audit group has them all.
    from dbus_next import Variant

    from pytest_systemd_harden.kernel.seccomp import KernelLog, seccomp_records

    log = KernelLog.open()
    assert log is not None, "the tests run as root: the kernel's records must be readable"
    try:
        log.drain()
        burst = "for i in $(seq 25); do python3 -I -S -c 'import ctypes; ctypes.CDLL(None).mlockall(1)'; done; true"
        assert machine.run(burst, [("SystemCallFilter", Variant("(bas)", [False, ["mlockall"]]))]).ok
        time.sleep(0.5)  # the kernel's audit thread sends them a moment after the kill
        records = seccomp_records(log.drain(), machine.host_pids, lambda exes: set(exes))
    finally:
        log.close()
    assert [r.syscall for r in records if r.comm == "python3"] == ["mlockall"] * 25


def test_a_write_refused_silently_is_found_by_an_observed_rerun(machine: Machine, diagnose) -> None:  # type: ignore[no-untyped-def]
    assert machine.run(["mkdir", "-p", "/etc/app"]).ok
    diagnosis = diagnose("  ProtectSystem: strict\n", "sh -c '{ echo x > /etc/app/app.conf; } 2>/dev/null'")
    assert culprits(diagnosis) == ["ProtectSystem"] and diagnosis.verified, diagnosis.render()
    assert diagnosis.combined is not None
    assert diagnosis.combined.description == "let systemd create and grant /etc/app with ConfigurationDirectory=app"


def test_the_drop_in_check_applies_the_text_literally(machine: Machine, make_spec) -> None:  # type: ignore[no-untyped-def]
    # The check must tell a drop-in that works from one systemd ignores: an empty boolean is "Failed to parse
    # boolean value, ignoring" (issue 15), so the feature stays broken under it.
    from pytest_systemd_harden.search.scenarios import _dropin_trial

    spec = make_spec("""
service:
  exec_start: /bin/sleep infinity
hardening:
  MemoryDenyWriteExecute: yes
scenarios:
  - name: write-execute memory
    inside: python3 -c 'import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ|mmap.PROT_WRITE|mmap.PROT_EXEC)'
""")
    service = HardenedService(machine, spec)
    check = _dropin_trial(service, spec.scenarios[0])
    assert check is not None
    try:
        assert check("[Service]\nMemoryDenyWriteExecute=no\n").passed
        assert not check("[Service]\nMemoryDenyWriteExecute=\n").passed
        left = machine.run(["sh", "-c", "ls /etc/systemd/system/ | grep -c '^harden-' || true"]).stdout.strip()
        assert left == "0"  # the check runs on a machine booted for it: nothing of it is written on this one
    finally:
        service.stop()


def test_a_killed_step_whose_grandchild_holds_on_is_diagnosed_in_seconds(diagnose) -> None:  # type: ignore[no-untyped-def]
    # A job runner's step: it leaves a grandchild that ignores SIGTERM (and holds the step's output), then is
    # killed by seccomp. Every failing rerun used to wait out the scenario's 60 s timeout; the step's leftovers are
    # now killed when it ends (SIGKILL 2 s after SIGTERM), so the whole search takes seconds.
    started = time.monotonic()
    diagnosis = diagnose('  SystemCallFilter: ["@system-service", "~@memlock"]\n',
                         "sh -c \"(trap '' TERM; sleep 60) & exec python3 -c 'import ctypes; "
                         "ctypes.CDLL(None).mlockall(3)'\"")
    took = time.monotonic() - started
    assert culprits(diagnosis) == ["SystemCallFilter"] and diagnosis.verified, diagnosis.render()
    assert "mlockall" in diagnosis.render()
    # Not a speed bound (speed is measured in bench/): one failing rerun that waited for its grandchild would wait out
    # the scenario's 60 s timeout alone, and the search has several. It takes 20-25 s on a loaded 2-core machine.
    assert took < 60, f"the diagnosis took {took:.0f}s: a failing rerun waited out the scenario's timeout"


# A setuid-root helper of the test's own (Debian's own setuid programs behave the same with and without privilege
# for an account like nobody): it succeeds only when it really runs as root. Built with cc, shipped as a .deb.
EUID_HELPER = "#include <unistd.h>\nint main(void) { return geteuid() == 0 ? 0 : 1; }\n"
RUNNER = """
service:
  exec_start: /bin/sleep infinity
machine:
  debs: [harden-euid_1.0_all.deb]
hardening:
  User: nobody
  NoNewPrivileges: yes
  ProtectSystem: strict
  ProtectHome: yes
  PrivateTmp: yes
  PrivateDevices: yes
  ProtectHostname: yes
  ProtectClock: yes
  ProtectKernelTunables: yes
  ProtectKernelModules: yes
  ProtectKernelLogs: yes
  ProtectControlGroups: yes
  LockPersonality: yes
  MemoryDenyWriteExecute: yes
  RestrictRealtime: yes
  RestrictSUIDSGID: yes
  RestrictNamespaces: yes
  SystemCallArchitectures: native
  SystemCallFilter: "@system-service"
  RestrictAddressFamilies: [AF_UNIX, AF_INET, AF_INET6]
  UMask: "0077"
scenarios:
  - name: the setuid helper gains root
    inside: /usr/bin/harden-euid
"""


@pytest.mark.parametrize("release", ["bookworm", "trixie"])
def test_a_setuid_helper_under_no_new_privileges_is_diagnosed_as_each_systemd_does_it(  # type: ignore[no-untyped-def]
        harden_pool, tmp_path, release: str) -> None:
    # 20 restricting directives, User=nobody, NoNewPrivileges=yes: the helper cannot gain root. Measured here:
    # systemd 252 (bookworm) turns NoNewPrivileges= on whenever one of the seccomp-installing directives is set, so
    # NoNewPrivileges=no alone changes nothing and the diagnosis names the implication; systemd 257 (trixie) does not
    # imply it for this unit, and NoNewPrivileges=no alone is the verified fix. The diagnosis finds which by trying.
    import os
    import subprocess

    from pytest_systemd_harden.spec.load import load_spec

    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text("Package: harden-euid\nVersion: 1.0\nArchitecture: all\n"
                                             "Maintainer: t <t@example.org>\nDescription: a setuid test helper\n")
    (tmp_path / "euid.c").write_text(EUID_HELPER)
    subprocess.run(["cc", "-O2", "-o", str(root / "usr/bin/harden-euid"), str(tmp_path / "euid.c")], check=True)
    (root / "usr/bin/harden-euid").chmod(0o4755)
    for path in [root, *root.rglob("*")]:
        os.utime(path, (1700000000, 1700000000))  # the same .deb every run: its image is found again
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root),
                    str(tmp_path / "harden-euid_1.0_all.deb")], check=True, capture_output=True,
                   env={**os.environ, "SOURCE_DATE_EPOCH": "1700000000"})
    (tmp_path / "harden.yaml").write_text(RUNNER.replace("machine:\n", f"machine:\n  release: {release}\n"))
    spec = load_spec(tmp_path / "harden.yaml")
    assert sum(d.name in RESTRICTING for d in spec.hardening) == 20
    service = HardenedService(harden_pool.machine_for(spec.machine), spec)
    service.start()
    try:
        # As nobody without the sandbox the helper gains root: what the hardening takes away is the privilege.
        assert service.client("setpriv --reuid=nobody --regid=nogroup --clear-groups /usr/bin/harden-euid").ok
        outcome = run_scenario(service, spec.scenarios[0])
        assert not outcome.passed
        diagnosis = diagnose_failure(service, spec.scenarios[0], failure_report(service, outcome), max_runs=40)
    finally:
        service.stop()
    assert culprits(diagnosis) == ["NoNewPrivileges"] and diagnosis.verified, diagnosis.render()
    assert diagnosis.runs <= 40  # the plugin's default budget
    assert diagnosis.dropin_verified, diagnosis.render()  # the printed drop-in, as a file, lets the helper gain root
    implied = "in force through: " in diagnosis.render()
    if release == "bookworm":
        assert implied and "SystemCallFilter=@system-service" in diagnosis.render(), diagnosis.render()
        assert "SystemCallFilter=\n" in diagnosis.as_dict()["dropin"]  # type: ignore[operator]
    else:
        assert not implied, diagnosis.render()
        assert diagnosis.as_dict()["dropin"] == "[Service]\nNoNewPrivileges=no\n"


# A daemon whose first start makes state it keeps (nginx chowns the directories it made under /var/lib/nginx): only
# that first start needs chown(2). It also opens an IPv6 socket at every start. Two culprits, on a fresh machine.
KEEPS_STATE = """\
[Service]
ExecStart=/bin/sh -c 'if [ ! -e {state}/done ]; then mkdir -p {state} && chown nobody {state} || exit 1; touch {state}/done; fi; python3 -c "import socket; socket.socket(socket.AF_INET6)" || exit 1; exec python3 -m http.server --bind 127.0.0.1 8096'
"""


def test_a_fix_that_holds_only_on_state_earlier_reruns_left_is_searched_again_on_fresh_machines(
        machine: Machine, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import uuid

    from pytest_systemd_harden.errors import ServiceFailed
    from pytest_systemd_harden.spec.load import load_spec

    (tmp_path / "keeps.service").write_text(KEEPS_STATE.format(state=f"/var/lib/harden-{uuid.uuid4().hex[:8]}"))
    (tmp_path / "harden.yaml").write_text("service: {unit_file: keeps.service, ready: {tcp: 8096}}\nhardening:\n"
                                          "  SystemCallFilter: ['@system-service', '~@chown']\n"
                                          "  RestrictAddressFamilies: [AF_INET]\n")
    spec = load_spec(tmp_path / "harden.yaml")
    service = HardenedService(machine, spec)
    with pytest.raises(ServiceFailed) as failed:
        service.start()
    try:
        # On the service's machine, a rerun without the chown deny made the state; the reruns after it found only
        # the address family. That fix fails on a fresh machine: searched again there, both are found.
        started = time.monotonic()
        diagnosis = diagnose_failure(service, None, str(failed.value))
        took = time.monotonic() - started
    finally:
        service.stop()
    assert diagnosis.seconds <= took, (diagnosis.seconds, took)  # both searches counted, each once
    assert diagnosis.seconds > took / 2
    assert diagnosis.note.startswith("The first search's fix passed on the machine it ran on, but not on a freshly "
                                     "booted one"), diagnosis.render()
    assert sorted(f.culprit.name for f in diagnosis.findings) == ["RestrictAddressFamilies", "SystemCallFilter"], \
        diagnosis.render()
    assert diagnosis.verified and diagnosis.dropin_verified, diagnosis.render()
