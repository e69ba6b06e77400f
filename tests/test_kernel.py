"""The kernel's seccomp records: parsed, named, matched to a machine, and leading the syscall search."""

from __future__ import annotations

import os
import struct

from simulated_service import GROUPS, World, hardening

from pytest_systemd_harden.kernel.seccomp import KernelLog, kernel_syscalls, parse_record, seccomp_records
from pytest_systemd_harden.search.diagnosis import TrialResult, diagnose
from pytest_systemd_harden.spec.directives import Directive

# As this host's kernel (6.18) wrote them: a 64-bit call, a 32-bit one, a SystemCallLog= one, another message.
KILLED = ('audit: type=1326 audit(1796190406.605:5109): auid=4294967295 uid=63423 gid=63423 ses=4294967295 '
          'pid=22879 comm="gpg" exe="/usr/bin/gpg" sig=31 arch=c000003e syscall=149 compat=0 ip=0x7f55915bbb97 '
          'code=0x80000000')
KILLED_32 = ('audit: type=1326 audit(1796190479.197:5222): auid=4294967295 uid=0 gid=0 ses=4294967295 pid=31447 '
             'comm="python3" exe="/usr/bin/python3.11" sig=31 arch=40000003 syscall=20 compat=1 ip=0xf7f0 '
             'code=0x80000000')
LOGGED = ('audit: type=1326 audit(1796190479.197:5223): auid=4294967295 uid=0 gid=0 ses=4294967295 pid=31448 '
          'comm="app" exe="/usr/bin/app" sig=0 arch=c000003e syscall=101 compat=0 ip=0x7f code=0x7ffc0000')


def test_records_are_parsed_and_named() -> None:
    record = parse_record(KILLED)
    assert record is not None and (record.pid, record.comm, record.syscall) == (22879, "gpg", "mlock")
    assert record.describe() == "the kernel killed 22879 (gpg) for syscall mlock"
    assert parse_record(KILLED_32).describe() == "the kernel killed 31447 (python3) for syscall getpid (x86)"  # type: ignore[union-attr]
    assert parse_record(LOGGED).describe() == "the kernel logged a call by 31448 (app) for syscall ptrace"  # type: ignore[union-attr]
    assert parse_record("eth0: link up") is None


def test_kernel_syscalls_reads_the_described_records_back() -> None:
    evidence = ("journal ...\n  the kernel killed 22879 (gpg) for syscall mlock\n"
                "the kernel logged a call by 3 (app) for syscall ptrace\nthe kernel killed 4 (x) for syscall mlock\n")
    assert kernel_syscalls(evidence) == ["mlock", "ptrace"]


def test_only_the_machines_processes_and_gone_ones_count() -> None:
    alive_elsewhere = KILLED.replace("pid=22879", f"pid={os.getpid()}")  # this test's own process: not the machine's
    gone = KILLED.replace("pid=22879", "pid=4194303")  # above any pid in use here
    assert [r.pid for r in seccomp_records([alive_elsewhere, gone], lambda: set())] == [4194303]
    assert [r.pid for r in seccomp_records([alive_elsewhere], lambda: {os.getpid()})] == [os.getpid()]
    # A gone process whose program the machine does not have was another machine's (memcached, seen here).
    assert seccomp_records([gone], lambda: set(), lambda exes: set()) == []
    assert [r.exe for r in seccomp_records([gone], lambda: set(), lambda exes: {"/usr/bin/gpg"})] == ["/usr/bin/gpg"]


def test_the_kernel_log_reader_starts_at_the_end() -> None:
    log = KernelLog.open()
    if log is None:  # not root: the reader says so by being absent, never by raising
        assert os.geteuid() != 0
        return
    try:
        assert all("type=1326" not in m or parse_record(m) for m in log.drain())
    finally:
        log.close()


class FakeAuditSocket:
    """The audit multicast socket as the kernel fills it: netlink messages, several to a datagram."""

    def __init__(self, *datagrams: bytes) -> None:
        self.datagrams = list(datagrams)

    def recv(self, size: int, flags: int) -> bytes:
        if not self.datagrams:
            raise BlockingIOError
        return self.datagrams.pop(0)

    def close(self) -> None:
        pass


def netlink(kind: int, text: str) -> bytes:
    payload = text.encode() + b"\0"
    message = struct.pack("=IHHII", 16 + len(payload), kind, 0, 0, 0) + payload
    return message + b"\0" * (-len(message) % 4)


def test_audit_records_are_read_from_the_multicast_group_and_counted_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    body = KILLED.split("type=1326 ", 1)[1]  # the group's text starts at audit(...): the type is the header's
    other = netlink(1334, "audit(1796190406.600:5108): prog-id=7 op=LOAD")  # a BPF load: not a seccomp record
    kmsg = tmp_path / "kmsg"  # /dev/kmsg's form, "prefix;message"; the same record as the group's, rate-limited
    kmsg.write_text("5,100,1,-;" + KILLED + "\n")
    fd = os.open(kmsg, os.O_RDONLY)
    log = KernelLog(fd, FakeAuditSocket(other + netlink(1326, body), netlink(1326, body.replace(":5109)", ":5110)"))))
    try:
        messages = log.drain()
    finally:
        log.close()
    assert [parse_record(m) is not None for m in messages] == [True, True]  # 5109 once, 5110; no BPF record
    assert messages[0] == KILLED


def with_kernel(world: World, syscall_of: dict[str, str]) -> World:
    """``world`` whose failures carry what the kernel would log: a record for the syscall that killed it."""
    original = world.trial

    def trial(directives: tuple[Directive, ...]) -> TrialResult:
        result = original(directives)
        name = result.summary.removesuffix(": SIGSYS")
        if not result.passed and name in syscall_of:
            return TrialResult(False, result.summary,
                               f"kernel log (seccomp):\nthe kernel killed 9 (gpg) for syscall {name}")
        return result

    world.trial = trial  # type: ignore[method-assign]
    return world


def test_the_kernel_named_syscall_is_tried_first_and_saves_reruns() -> None:
    directives = hardening(PrivateTmp=True, ProtectHostname=True, SystemCallFilter=["@system-service", "~@privileged"])
    blind = diagnose(directives, World(syscalls=["fchownat"]).trial, syscall_groups=lambda: GROUPS)
    led = diagnose(directives, with_kernel(World(syscalls=["fchownat"]), {"fchownat": "x"}).trial,
                   syscall_groups=lambda: GROUPS)
    assert led.verified and led.combined == blind.combined
    assert led.findings[0].relaxation.needs == "fchownat (in @privileged)"  # type: ignore[union-attr]
    assert led.runs < blind.runs, (led.runs, blind.runs)
    assert led.kernel == ["the kernel killed 9 (gpg) for syscall fchownat"]
    assert "  the kernel killed 9 (gpg) for syscall fchownat" in led.render().splitlines()
    assert led.as_dict()["kernel"] == led.kernel


def test_an_allow_list_gets_the_smallest_group_holding_the_named_syscall() -> None:
    directives = hardening(PrivateTmp=True, SystemCallFilter="@system-service")
    led = diagnose(directives, with_kernel(World(syscalls=["pkey_alloc"]), {"pkey_alloc": "x"}).trial,
                   syscall_groups=lambda: GROUPS)
    assert led.verified and led.findings[0].relaxation is not None
    assert led.findings[0].relaxation.description == "also allow @pkey in SystemCallFilter="
    assert led.findings[0].relaxation.needs == "pkey_alloc (in @pkey)"
