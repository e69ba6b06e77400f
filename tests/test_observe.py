"""Reading strace output into an Observation, and the forecasts tighten draws from it.

The traces under tests/data/observe are real: captured by scenarios.observe() from the examples and two small
services on the nspawn backend (tests/data/observe/capture.py says how). The few literal lines below are strace's
format for what the machine cannot produce (a remote address, a 32-bit process).
"""

from __future__ import annotations

import functools
import gzip
import json
import textwrap
from pathlib import Path

import pytest

from pytest_systemd_harden.probes.runner import parse_groups
from pytest_systemd_harden.search.observe import (
    CONFLICT,
    FITS,
    NARROWED,
    Observation,
    filter_allows,
    forecast,
    parse_strace,
    split_args,
)
from pytest_systemd_harden.search.tighten import CATALOGUE, Step, profile_only
from pytest_systemd_harden.spec.directives import Directive
from pytest_systemd_harden.spec.load import load_spec

DATA = Path(__file__).resolve().parent / "data" / "observe"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@functools.cache
def observed(name: str) -> Observation:
    runs = json.loads((DATA / name / "runs.json").read_text())["runs"]
    observation = Observation()
    for file, run in runs.items():
        text = gzip.decompress((DATA / name / f"{file}.trace.gz").read_bytes()).decode()
        observation = observation.merge(parse_strace(text, run))
    return observation


@functools.cache
def groups() -> dict[str, list[str]]:
    return {name: sorted(calls) for name, calls in parse_groups((DATA / "syscall-filter.txt").read_text()).items()}


def hardening_of(example: str) -> tuple[Directive, ...]:
    return load_spec(EXAMPLES / example / "harden.yaml").hardening


def predict(name: str, hardening: tuple[Directive, ...] = (), /, **step: object) -> tuple[str, list[str], str]:
    found = forecast(Step.of("", **step).directives, observed(name), hardening, groups=groups())
    return found.verdict, [line for d in found.directives for line in d.unit_lines()], found.reason


# --- parsing real traces ----------------------------------------------------------------------------------------

def test_a_web_server_and_its_inside_scenario() -> None:
    obs = observed("web")
    assert set(obs.families) == {"AF_UNIX", "AF_INET"}
    assert obs.binds == {"127.0.0.1:8090": "python3 (the service)"}
    assert set(obs.accepted) == {"127.0.0.1"}
    # mkdir -p walks with chdir() and relative names: resolved against the process' directory
    assert obs.writes == {"/var/lib/web": "mkdir (scenario 'keeps a cache')",
                          "/var/lib/web/entry": "touch (scenario 'keeps a cache')"}
    assert "/var/lib/web" in obs.directories and "/var/lib/web/entry" not in obs.directories
    assert "/usr/bin/touch" in obs.execs
    # listing / stat()s /root: a look-up, which a 0700 directory allows anyone, not a read
    assert "/root" in obs.lookups and "/root" not in obs.reads and "/" in obs.reads
    assert {"accept4", "bind", "listen", "mkdir", "utimensat"} <= set(obs.syscalls)
    assert not obs.capabilities and not obs.wx_memory and not obs.namespaces


def test_what_the_spec_denies_is_seen_failing_and_is_not_a_need() -> None:
    gpg = observed("gpg-signing")
    assert "/etc/signer-was-here" not in gpg.writes  # touch got EROFS under ProtectSystem=strict
    # DynamicUser= keeps state in /var/lib/private/signer: the path the service asked for is the one to grant
    assert "/var/lib/signer/gnupg/pubring.kbx" in gpg.writes
    assert not any(path.startswith("/var/lib/private") for path in gpg.writes)
    dns = observed("dns-client")
    assert "AF_PACKET" not in dns.families  # socket(AF_PACKET) got EAFNOSUPPORT
    assert "127.0.0.53:53" not in dns.peers  # sendto got EPERM from IPAddressDeny=
    assert dns.peers == {"127.0.0.1:53": "python3 (the service)"}  # the first to ask the resolver
    port = observed("privileged-port")
    assert "CAP_NET_RAW" not in port.capabilities  # the raw socket got EPERM


def test_a_non_dumpable_process_hides_its_arguments_but_not_its_calls() -> None:
    gpg = observed("gpg-signing")
    assert gpg.unreadable > 0  # gpg-agent: strace cannot read its memory without CAP_SYS_PTRACE
    assert "mlock" in gpg.syscalls and gpg.syscalls["mlock"].startswith("gpg")
    assert "/var/lib/signer/gnupg/S.gpg-agent" in gpg.unix_peers
    assert "unreadable" in gpg.summary()


def test_the_calls_directives_forbid() -> None:
    obs = observed("behaviours")
    assert list(obs.wx_memory) == ["mmap(PROT_READ|PROT_WRITE|PROT_EXEC)"]
    assert list(obs.suid) == ["/srv/data/out mode 4755"]
    assert list(obs.personality) == ["PER_LINUX32"]  # not the query (0xffffffff) nor the switch back
    assert list(obs.realtime) == ["sched_setscheduler(SCHED_FIFO)"]
    assert obs.namespaces == {"net": "unshare (scenario 'a new network namespace')"}
    assert set(obs.capabilities) == {"CAP_CHOWN", "CAP_SYS_NICE", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW",
                                     "CAP_SYS_ADMIN"}
    assert obs.capabilities["CAP_NET_BIND_SERVICE"] == "bind to port 81, python3 (the service)"
    assert {"AF_PACKET", "AF_INET6"} <= set(obs.families)
    assert obs.peers == {"[::1]:9": "python3 (the service)"}
    assert {"/root/.bashrc", "/proc/cpuinfo", "/proc/meminfo"} <= set(obs.reads)
    assert "/usr/lib/x86_64-linux-gnu/libc.so.6" in obs.exec_maps


def test_strace_line_forms() -> None:
    text = textwrap.dedent("""\
        12    openat(AT_FDCWD</srv>, "out/a", O_WRONLY|O_CREAT|O_TRUNC, 0644 <unfinished ...>
        13    write(1, "x) = 3 is not a result\\n", 20) = 20
        12    <... openat resumed>) = 3</srv/out/a>
        12    utimensat(3</srv/out/a>, NULL, NULL, 0) = 0
        12    mkdir("/etc/new", 0755) = -1 EROFS (Read-only file system)
        12    connect(4<socket:[9]>, {sa_family=AF_INET, sin_port=htons(443), sin_addr=inet_addr("192.0.2.7")}, 16) = \
-1 EINPROGRESS (Operation now in progress)
        12    --- SIGCHLD {si_signo=SIGCHLD, si_code=CLD_EXITED, si_pid=13} ---
        [ Process PID=14 runs in 32 bit mode. ]
        13    +++ exited with 0 +++
        15    mlock(0x7f0000000000, 4096 <unfinished ...>
        15    +++ killed by SIGSYS (core dumped) +++
        """)
    obs = parse_strace(text, "a test")
    assert obs.writes == {"/srv/out/a": "a test"}  # the failed mkdir is not a write
    assert obs.created == {"/srv/out/a": "a test"}
    assert obs.peers == {"192.0.2.7:443": "a test"}  # a non-blocking connect under way counts
    assert obs.non_native and set(obs.syscalls) == {"openat", "write", "utimensat", "mkdir", "connect", "mlock"}
    assert split_args('3</a, b>, "x, \\"y\\"", {a=1, b=[2, 3]}, NULL') == [
        "3</a, b>", '"x, \\"y\\""', "{a=1, b=[2, 3]}", "NULL"]


# --- forecasts ------------------------------------------------------------------------------------------------

def test_forecasts_for_a_bare_web_server() -> None:
    assert predict("web", DynamicUser=True)[:2] == (NARROWED, ["DynamicUser=yes", "StateDirectory=web"])
    assert predict("web", RestrictAddressFamilies="AF_UNIX")[:2] == (NARROWED, [
        "RestrictAddressFamilies=AF_UNIX AF_INET"])
    assert predict("web", SystemCallFilter="@system-service")[0] == FITS
    assert predict("web", CapabilityBoundingSet="")[0] == FITS
    verdict, _, reason = predict("web", PrivateNetwork=True)
    assert verdict == CONFLICT and "listens on 127.0.0.1:8090" in reason
    # without scenarios outside the sandbox, its own loopback serves the inside ones
    assert forecast(Step.of("", PrivateNetwork=True).directives, observed("web"), (), groups=groups(),
                    scenarios_from_outside=False).verdict == FITS


def test_families_a_service_serves_on_need_no_confirming_others_do() -> None:
    web = forecast(Step.of("", RestrictAddressFamilies="AF_UNIX").directives, observed("web"), (), groups=groups())
    assert web.extras == ()  # it bound a port of AF_INET
    dns = forecast(Step.of("", RestrictAddressFamilies="AF_UNIX").directives, observed("dns-client"), (),
                   groups=groups())
    assert dns.directives[0].value == "AF_UNIX AF_INET AF_NETLINK"
    assert dns.extras == (("RestrictAddressFamilies", "AF_NETLINK"),)  # opened, maybe only probed: tighten checks


def test_a_syscall_the_spec_answers_with_an_errno_is_re_allowed_but_confirmed() -> None:
    verdict, lines, reason = predict("gpg-signing", hardening_of("gpg-signing"), SystemCallFilter="~@memlock")
    assert (verdict, lines) == (NARROWED, ["SystemCallFilter=~@memlock", "SystemCallFilter=mlock"])
    assert reason == "re-allows mlock (in @memlock) by gpg (the service)"
    found = forecast(Step.of("", SystemCallFilter="~@memlock").directives, observed("gpg-signing"),
                     hardening_of("gpg-signing"), groups=groups())
    # SystemCallErrorNumber=EPERM: gpg might cope with a failed mlock, so tighten tries without it
    assert found.extras == (("SystemCallFilter", "mlock"),)
    assert forecast(Step.of("", SystemCallFilter="~@memlock").directives, observed("gpg-signing"), (),
                    groups=groups()).extras == ()  # killed with SIGSYS otherwise: an attempt is proof


def test_an_allow_list_for_a_spec_with_a_deny_list_is_forecast_as_tighten_writes_it() -> None:
    # Tighten puts @system-service before the spec's ~@memlock (the first line decides allow or deny), so
    # settimeofday (in @clock only) is blocked: appended after the deny list, the allow list would block nothing.
    obs = parse_strace("10    settimeofday({tv_sec=0, tv_usec=0}, NULL) = -1 EPERM (Operation not permitted)\n")
    mine = (Directive.parse("SystemCallFilter", "~@memlock"),)
    verdict, lines, reason = predict_from(obs, mine, SystemCallFilter="@system-service")
    assert (verdict, lines) == (NARROWED, ["SystemCallFilter=@system-service settimeofday"])
    assert reason == "also allows settimeofday (in @clock) by the service"
    assert predict_from(obs, (), SystemCallFilter="@system-service")[:2] == (verdict, lines)


def predict_from(obs: Observation, hardening: tuple[Directive, ...], **step: object) -> tuple[str, list[str], str]:
    found = forecast(Step.of("", **step).directives, obs, hardening, groups=groups())
    return found.verdict, [line for d in found.directives for line in d.unit_lines()], found.reason


def test_capabilities_and_the_dynamic_user() -> None:
    port = hardening_of("privileged-port")
    without_cap = tuple(d for d in port if d.name != "CapabilityBoundingSet")
    assert predict("privileged-port", without_cap, CapabilityBoundingSet="")[:2] == (
        NARROWED, ["CapabilityBoundingSet=CAP_NET_BIND_SERVICE"])
    assert predict("privileged-port", without_cap, DynamicUser=True)[0] == FITS  # AmbientCapabilities= holds it
    verdict, _, reason = predict("behaviours", DynamicUser=True)
    assert verdict == CONFLICT and "CAP_NET_BIND_SERVICE" in reason and "bind to port 81" in reason


def test_forecasts_for_what_directives_forbid() -> None:
    for directive in ("MemoryDenyWriteExecute", "RestrictSUIDSGID", "LockPersonality", "RestrictRealtime"):
        assert predict("behaviours", **{directive: True})[0] == CONFLICT, directive
    assert predict("behaviours", ProtectHome=True)[:2] == (NARROWED, ["ProtectHome=read-only"])
    assert predict("behaviours", RestrictNamespaces=True)[:2] == (NARROWED, ["RestrictNamespaces=net"])
    assert predict("behaviours", ProtectSystem="strict")[:2] == (NARROWED, [
        "ProtectSystem=strict", "CacheDirectory=probe", "ReadWritePaths=-/srv/data -/run"])
    verdict, _, reason = predict("behaviours", ProcSubset="pid")
    assert verdict == CONFLICT and "/proc/meminfo" in reason
    assert predict("behaviours", NoExecPaths="/srv /usr/bin")[:2] == (NARROWED, ["NoExecPaths=/srv"])
    assert predict("behaviours", NoExecPaths="/usr/lib")[0] == CONFLICT  # libc is mapped executable from there
    for directive in ("ProtectClock", "ProtectKernelModules", "ProtectKernelLogs", "PrivateDevices"):
        assert predict("behaviours", **{directive: True})[0] == FITS, directive


def test_a_dynamic_user_cannot_read_what_only_the_owner_may() -> None:
    obs = observed("web").merge(Observation())
    obs.private_reads = {"/etc/app/key.pem": "python3 (the service)"}
    verdict, _, reason = forecast_text(obs, DynamicUser=True)
    assert verdict == CONFLICT and reason == "reads files others may not: /etc/app/key.pem (python3 (the service))"
    obs.private_reads = {"/var/lib/web/entry": "python3 (the service)"}  # its state directory is handed to it
    assert forecast_text(obs, DynamicUser=True)[0] == NARROWED


def forecast_text(obs: Observation, **step: object) -> tuple[str, str, str]:
    found = forecast(Step.of("", **step).directives, obs, (), groups=groups())
    return found.verdict, " ".join(str(d) for d in found.directives), found.reason


def test_a_grant_extends_the_users_own_directive() -> None:
    mine = (Directive.parse("StateDirectory", "signer"),)
    verdict, lines, _ = predict("web", mine, DynamicUser=True)
    assert (verdict, lines) == (NARROWED, ["DynamicUser=yes", "StateDirectory=web"])  # tighten adds it to signer


def test_remote_addresses_are_allowed_by_name() -> None:
    obs = parse_strace('5  connect(3<socket:[1]>, {sa_family=AF_INET, sin_port=htons(443), '
                       'sin_addr=inet_addr("192.0.2.7")}, 16) = 0', "the service")
    found = forecast(Step.of("", IPAddressDeny="any", IPAddressAllow="localhost").directives, obs, ())
    assert found.verdict == NARROWED
    assert [str(d) for d in found.directives] == ["IPAddressDeny=any", "IPAddressAllow=localhost 192.0.2.7"]
    assert found.extras == (("IPAddressAllow", "192.0.2.7"),)


@pytest.mark.parametrize("assignments, syscall, allowed", [
    (["@system-service"], "mlock", True),
    (["@system-service", "~@memlock"], "mlock", False),
    (["@system-service", "~@memlock", "mlock"], "mlock", True),
    (["~@memlock"], "mlock", False),
    (["~@memlock", "mlock"], "mlock", True),
    (["~@memlock"], "read", True),
    ([], "reboot", True),
    (["~@memlock", "", "@system-service"], "reboot", False),  # the empty line resets, then an allow list
])
def test_filter_semantics(assignments: list[str], syscall: str, allowed: bool) -> None:
    assert filter_allows(assignments, syscall, groups()) is allowed


def test_profile_only_applies_every_step_not_forecast_to_conflict() -> None:
    spec = profile_only((), observed("web"), syscall_groups=groups())
    lines = {line for d in spec for line in d.unit_lines()}
    assert {"DynamicUser=yes", "StateDirectory=web", "RestrictAddressFamilies=AF_UNIX AF_INET"} <= lines
    assert "ProcSubset=pid" not in lines and "PrivateNetwork=yes" not in lines  # forecast to conflict
    names = {d.name for step in CATALOGUE for d in step.directives}
    assert {d.name for d in spec} == names - {"ProcSubset", "PrivateNetwork"} | {"StateDirectory"}


def test_refused_calls_are_kept_as_denials_for_the_diagnosis() -> None:
    from pytest_systemd_harden.search.observe import denial_lines

    trace = """\
10    openat(AT_FDCWD</>, "/etc/app/app.conf", O_WRONLY|O_CREAT|O_TRUNC, 0666) = -1 EROFS (Read-only file system)
10    openat(AT_FDCWD</>, "/lib/x86_64-linux-gnu/tls/libc.so.6", O_RDONLY|O_CLOEXEC) = \
-1 ENOENT (No such file or directory)
10    openat(AT_FDCWD</>, "/dev/net/tun", O_RDWR) = -1 ENOENT (No such file or directory)
10    openat(AT_FDCWD</>, "/etc/hostname", O_RDONLY) = 3</etc/hostname>
"""
    observation = parse_strace(trace)
    assert observation.denied == {"/etc/app/app.conf": "openat EROFS", "/dev/net/tun": "openat ENOENT"}
    assert denial_lines(observation).splitlines() == [
        "strace: openat /etc/app/app.conf: EROFS (Read-only file system)",
        "strace: openat /dev/net/tun: ENOENT (No such file)"]


def test_the_tracer_may_run_where_the_unit_restricts_what_runs() -> None:
    from pytest_systemd_harden.search.scenarios import _for_tracer
    from pytest_systemd_harden.spec.directives import Directive

    # redis-server's own unit: NoExecPaths=/ with ExecPaths= naming only the daemon and its libraries.
    own = (Directive("NoExecPaths", ("/",)), Directive("ExecPaths", ("/usr/bin/redis-server /usr/lib /lib",)))
    traced = _for_tracer((Directive("PrivateTmp", ("yes",)),), "/run/harden-observe/x", own, "/usr/bin/strace")
    assert Directive("ExecPaths", ("/usr/bin/strace",)) in traced
    mine = (Directive("ExecPaths", ("/usr/sbin",)), Directive("NoExecPaths", ("/",)))  # the spec's own list grows
    assert _for_tracer(mine, "/run/o", (), "/usr/bin/strace")[0].assignments == ("/usr/sbin", "/usr/bin/strace")
    assert not any(d.name == "ExecPaths" for d in _for_tracer((), "/run/o", (), "/usr/bin/strace"))
