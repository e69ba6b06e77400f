"""The probe catalogue, the inside script's contract and the deny:/enforcement: spec keys (no machine needed)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from fakes import RecordingSystemd, guard_in_process, kernel_without_family_modules

from pytest_systemd_harden.errors import SpecError
from pytest_systemd_harden.probes import inside
from pytest_systemd_harden.probes.catalogue import SYSCALLS, Denial, DenialError, parse_denial, standard_catalogue
from pytest_systemd_harden.probes.model import Probe, ProbeResult
from pytest_systemd_harden.probes.runner import (
    IPC_PROBE,
    batch_argv,
    inside_script,
    parse_groups,
    parse_known_syscalls,
    parse_version,
)
from pytest_systemd_harden.spec.load import Spec

MakeSpec = Callable[..., Spec]


def test_every_probe_of_the_catalogue_is_implemented_and_described() -> None:
    catalogue = standard_catalogue()
    assert len(catalogue) == len(set(catalogue))
    # ipc leaves its object for the unit's stop: it runs only through ipc_lifecycle, which removes it (live test).
    assert {probe.kind for probe in catalogue} == set(inside.PROBES) - {"ipc"}
    assert IPC_PROBE.describe() != IPC_PROBE.key
    for probe in catalogue:
        assert probe.describe() != probe.key, f"{probe.key} has no description"


def test_every_syscall_probe_has_a_number_on_each_architecture() -> None:
    for machine, numbers in inside.SYSCALL_NUMBERS.items():
        missing = [name for name in SYSCALLS if name not in numbers and name not in ("iopl", "ioperm", "modify_ldt")]
        assert missing == [], f"{machine} lacks {missing}"


def test_the_inside_script_uses_the_standard_library_only() -> None:
    tree = ast.parse(inside_script())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert imported - {"__future__"} <= sys.stdlib_module_names, imported - sys.stdlib_module_names


def test_the_script_reports_one_json_line_per_probe() -> None:
    # Only probes that read: this runs on the test host itself, with the interpreter in isolated mode as inside.
    probes = [Probe("status"), Probe("limits"), Probe("identity", "/proc/self/ns/net"), Probe("read", "/proc/self"),
              Probe("no-such-kind")]
    argv = batch_argv(probes)
    assert argv[:4] == ["/usr/bin/python3", "-I", "-S", "-"]
    done = subprocess.run([sys.executable, *argv[1:]], input=inside_script(), capture_output=True, check=True)
    results = [ProbeResult.from_json(json.loads(line)) for line in done.stdout.decode().splitlines()]
    assert [r.probe for r in results] == probes
    status, limits, identity, listing, unknown = results
    assert status.facts["uid"] == os.getuid() and isinstance(status.facts["cap_bounding"], list)
    assert limits.facts["limits"]["Max open files"][0] > 0
    assert identity.facts["value"] == f"{os.stat('/proc/self/ns/net').st_dev}:{os.stat('/proc/self/ns/net').st_ino}"
    assert listing.allowed and listing.facts["size"] > 0
    assert (unknown.status, unknown.detail) == ("error", "unknown probe kind no-such-kind")


def test_results_describe_themselves() -> None:
    probe = Probe("write", "/etc")
    assert ProbeResult(probe, "denied", errno="EROFS",
                       detail="create a file in /etc: Read-only file system").describe() \
        == "denied: EROFS (create a file in /etc: Read-only file system)"
    assert ProbeResult(probe, "denied", signal="SIGSYS").describe() == "killed by SIGSYS (seccomp)"
    assert ProbeResult(probe, "error", errno="ENOENT", detail="stat /x: gone").describe() == \
        "could not probe: stat /x: gone (ENOENT)"


def test_syscall_groups_are_resolved_through_nested_groups() -> None:
    text = ("@default\n    # always\n    brk\n    exit\n@mount\n    mount\n@system-service\n    @default\n"
            "    socket\n@privileged\n    @mount\n    reboot\n # Not showing unlisted system calls\n")
    groups = parse_groups(text)
    assert groups["@system-service"] == {"brk", "exit", "socket"}
    assert groups["@privileged"] == {"mount", "reboot"}
    assert parse_known_syscalls(text) == frozenset()  # no @known (systemd < 248): nothing to check names against
    known = parse_known_syscalls(text.replace("@privileged\n", "@known\n    brk\n    mount\n@privileged\n") +
                                 "# Unlisted system calls (supported by the local kernel, but not in any group):\n"
                                 "#   osf_mount\n#   syslog\n")
    assert known == {"brk", "exit", "socket", "mount", "reboot", "osf_mount", "syslog"}
    version, features = parse_version("systemd 252 (252.39-1~deb12u2)\n"
                                      "+PAM +SECCOMP -BPF_FRAMEWORK default-hierarchy=unified")
    assert version == 252 and {"+SECCOMP", "-BPF_FRAMEWORK"} <= features


@pytest.mark.parametrize(("kind", "value", "expected"), [
    ("write", "/etc/passwd/", Denial("write", "/etc/passwd")),
    ("connect", "localhost:53", Denial("connect", "127.0.0.1:53")),
    ("connect", "tcp:[::1]:443", Denial("connect", "tcp:[::1]:443")),
    ("bind", 80, Denial("bind", "127.0.0.1:80")),
    ("capability", "sys_admin", Denial("capability", "CAP_SYS_ADMIN")),
    ("family", "netlink", Denial("family", "AF_NETLINK")),
    ("namespace", "user", Denial("namespace", "user")),
    ("syscall", "reboot", Denial("syscall", "reboot")),
])
def test_declared_denials_are_normalised(kind: str, value: object, expected: Denial) -> None:
    assert parse_denial(kind, value) == expected


@pytest.mark.parametrize(("kind", "value", "problem", "hint"), [
    ("write", "etc", "'etc' is not an absolute path", "e.g. /etc/passwd"),
    ("connect", "1.1.1.1:53", "1.1.1.1 is not a loopback address", "probes never leave the machine's loopback"),
    ("connect", "53", "'53' is not HOST:PORT", "e.g. 127.0.0.1:53"),
    ("syscall", "mout", "there is no harmless probe for 'mout'", "did you mean mount?"),
    ("capability", "CAP_SYS_ADMN", "'CAP_SYS_ADMN' is not a capability", "did you mean CAP_SYS_ADMIN?"),
    ("namespace", "users", "'users' is not a namespace type", "did you mean user?"),
    ("writ", "/etc", "'writ' is not a kind of denial", "did you mean write?"),
])
def test_bad_denials_say_what_and_how_to_fix(kind: str, value: object, problem: str, hint: str) -> None:
    with pytest.raises(DenialError) as caught:
        parse_denial(kind, value)
    assert caught.value.problem == problem
    assert hint in caught.value.hint


def test_the_spec_reads_deny_and_enforcement(make_spec: MakeSpec) -> None:
    spec = make_spec("""service:
  exec_start: /bin/true
hardening:
  ProtectSystem: strict
  MemoryMax: 100M
deny:
  - write: /etc/passwd
  - syscall: [mount, reboot]
enforcement:
  skip: [MemoryMax]
""")
    assert spec.denials == (Denial("write", "/etc/passwd", 7), Denial("syscall", "mount", 8),
                            Denial("syscall", "reboot", 8))
    assert (spec.enforcement.enabled, spec.enforcement.skip) == (True, ("MemoryMax",))


@pytest.mark.parametrize(("tail", "message"), [
    ("deny:\n  - connect: 8.8.8.8:53\n", "harden.yaml:4: deny[0].connect: 8.8.8.8 is not a loopback address"),
    ("deny:\n  - write: /etc\n    read: /home\n", "harden.yaml:4: deny[0]: each entry names exactly one action"),
    ("deny: {write: /etc}\n", "harden.yaml:3: deny: expected a list of denials"),
    ("enforcement: {skip: [MemoryMaxx]}\n",
     "harden.yaml:3: enforcement.skip[0]: 'MemoryMaxx' is not a directive of this spec's hardening"),
    ("enforcement: {skp: [x]}\n", "harden.yaml:3: enforcement.skp: unknown field (did you mean skip?)"),
    ("enforcement: maybe\n", "harden.yaml:3: enforcement: expected true, false or a mapping, got 'maybe'"),
])
def test_bad_deny_and_enforcement_keys_are_one_line_errors(make_spec: MakeSpec, tail: str, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        make_spec("service:\n  exec_start: /bin/true\n" + tail)
    assert f"/{message}" in str(caught.value), str(caught.value)


# --- guards: where the kernel is the host's -------------------------------------------------------------------

@pytest.mark.parametrize(("backend", "guard"), [("nspawn", "kernel"), ("host", "host"), ("qemu", None)])
def test_each_backend_runs_every_probe_batch_under_its_guard_whoever_builds_it(backend: str,
                                                                               guard: str | None) -> None:
    from pytest_systemd_harden.machine import backends
    from pytest_systemd_harden.spec.machine import MachineConfig

    machine, systemd = backends.machine_class(backend)(MachineConfig(backend=backend)), RecordingSystemd()
    machine._systemd = systemd  # type: ignore[assignment]
    machine.run(batch_argv([Probe("socket", "AF_VSOCK")]))  # built without a guard
    machine.run(["/usr/bin/python3", "-c", "print(1)"])  # not a batch: as it is
    batch, other = systemd.argvs
    request = json.loads(batch[4])
    if guard is None:
        assert request == {"probes": [["socket", "AF_VSOCK"]]}
    else:  # with the families this kernel has, seen from here: the sandbox may not see them
        assert request == {"probes": [["socket", "AF_VSOCK"]], "guard": guard,
                           "loaded_families": [f for f in inside.FAMILY_MODULES if inside.family_loaded(f)]}
    assert other == ["/usr/bin/python3", "-c", "print(1)"]


def test_on_the_hosts_kernel_no_module_is_loaded_and_no_large_share_taken(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    guard_in_process(monkeypatch, inside.GUARD_KERNEL)  # a container: its files are its own, its kernel is not
    protocols, modules = kernel_without_family_modules(monkeypatch, tmp_path)
    refused = inside.probe_socket("AF_PACKET", "tag")
    assert refused["status"] == "error" and refused["detail"] == (
        "not tried in a container, whose kernel is the host's: socket(AF_PACKET) would make the host's kernel load "
        "the module of AF_PACKET, which is not loaded (modprobe af_packet first to have it probed)")
    assert inside.probe_socket("AF_UNIX", "tag")["status"] == "allowed"  # built in: nothing to load
    available = inside.available_memory()
    half = inside.probe_allocate(str(available // 2), "tag")
    assert half["detail"].startswith(f"{inside.KERNEL_REFUSAL}touching {(available // 2) >> 20} MiB"), half
    assert inside.probe_tasks(str(inside.HOST_MAX_TASKS + 1), "tag")["detail"].startswith(inside.KERNEL_REFUSAL)
    # Files are the container's own: a scratch file is made as in the ordinary mode, not an unnamed one.
    written = inside.probe_write(str(tmp_path), "tag")
    assert written["status"] == "allowed" and "unnamed" not in written["detail"], written
    assert sorted(tmp_path.iterdir()) == [modules, protocols]  # and removed again


def test_a_sandbox_that_sees_neither_proc_net_nor_sys_module_goes_by_the_requests_families(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    guard_in_process(monkeypatch, inside.GUARD_KERNEL)
    monkeypatch.setattr(inside, "PROTOCOLS_FILE", str(tmp_path / "hidden"))  # ProcSubset=pid, PrivateNetwork=
    monkeypatch.setattr(inside, "MODULES_DIR", str(tmp_path / "hidden"))  # ProtectKernelModules=
    monkeypatch.setattr(inside, "LOADED_FAMILIES", frozenset({"AF_INET6"}))
    assert inside.family_loaded("AF_INET6") and not inside.family_loaded("AF_VSOCK")
    assert inside.probe_socket("AF_VSOCK", "tag")["detail"].startswith(inside.KERNEL_REFUSAL)
    assert not inside.probe_socket("AF_INET6", "tag")["detail"].startswith(inside.REFUSALS)


@pytest.mark.parametrize(("guard", "prefix"), [("kernel", inside.KERNEL_REFUSAL), ("host", inside.CAREFUL_REFUSAL)])
def test_the_script_takes_its_guard_from_the_request(guard: str, prefix: str) -> None:
    available = inside.available_memory()
    # Half of what this machine has free: refused under either guard before anything is allocated.
    argv = batch_argv([Probe("allocate", str(available // 2))], guard=guard)
    done = subprocess.run([sys.executable, *argv[1:]], input=inside_script(), capture_output=True, check=True)
    result = json.loads(done.stdout)
    assert result["status"] == "error" and result["detail"].startswith(prefix), result
