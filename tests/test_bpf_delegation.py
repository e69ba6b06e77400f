"""The rules of BPF delegation (machine/bpf_delegation.py), without a machine: what is made for a container's
systemd and what is refused, and the seccomp filter that hands the calls over."""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from pathlib import Path

import pytest

from pytest_systemd_harden.machine import bpf_delegation as bpf
from pytest_systemd_harden.machine.bpf_delegation import Refused


def run_filter(program: bytes, nr: int, arch: int) -> int:
    """A classic BPF interpreter for the instructions the filter uses, over a seccomp_data of (nr, arch)."""
    data = struct.pack("=iI", nr, arch)
    accumulator, pc = 0, 0
    while True:
        code, jt, jf, k = struct.unpack_from("=HBBI", program, pc * 8)
        pc += 1
        if code == 0x20:  # ld [k]
            accumulator = struct.unpack_from("=I", data, k)[0]
        elif code == 0x54:  # and #k
            accumulator &= k
        elif code == 0x15:  # jeq #k, jt, jf
            pc += jt if accumulator == k else jf
        elif code == 0x06:  # ret #k
            return k
        else:
            raise AssertionError(f"instruction {code:#x} not expected in the filter")


@pytest.mark.parametrize(("nr", "arch", "expected"), [
    (321, bpf.AUDIT_ARCH_X86_64, bpf.SECCOMP_RET_USER_NOTIF),  # bpf
    (321 | bpf.X32_SYSCALL_BIT, bpf.AUDIT_ARCH_X86_64, bpf.SECCOMP_RET_USER_NOTIF),  # x32's bpf
    (357, bpf.AUDIT_ARCH_I386, bpf.SECCOMP_RET_USER_NOTIF),  # i386's bpf
    (0, bpf.AUDIT_ARCH_X86_64, bpf.SECCOMP_RET_ALLOW),  # read
    (357, bpf.AUDIT_ARCH_X86_64, bpf.SECCOMP_RET_ALLOW),  # i386's number on x86-64 is another call
    (321, bpf.AUDIT_ARCH_I386, bpf.SECCOMP_RET_ALLOW),  # and the other way round
    (321, 0xC00000B7, bpf.SECCOMP_RET_ALLOW),  # another architecture: nothing to hand over
])
def test_the_filter_hands_over_bpf_of_every_x86_abi_and_nothing_else(nr: int, arch: int, expected: int) -> None:
    assert run_filter(bpf.FILTER, nr, arch) == expected


def map_create(map_type: int = bpf.BPF_MAP_TYPE_LPM_TRIE, key: int = 8, value: int = 8, entries: int = 16,
               flags: int = bpf.BPF_F_NO_PREALLOC, name: bytes = b"sd_fw", **at: int) -> bytes:
    attr = bytearray(struct.pack("=5I", map_type, key, value, entries, flags).ljust(80, b"\0"))
    attr[28:28 + len(name)] = name
    for offset, word in ((int(key_[1:]), value_) for key_, value_ in at.items()):
        struct.pack_into("=I", attr, offset, word)
    return bytes(attr)


def test_the_maps_of_systemd_s_firewall_are_made() -> None:
    bpf.check_map_create(map_create())  # an address list (LPM trie, no preallocation)
    bpf.check_map_create(map_create(bpf.BPF_MAP_TYPE_ARRAY, key=4, value=8, entries=2, flags=0))  # accounting


@pytest.mark.parametrize(("attr", "why"), [
    (map_create(map_type=27), "map type 27"),  # a ring buffer
    (map_create(map_type=12), "map type 12"),  # a map of maps
    (map_create(flags=bpf.BPF_F_NO_PREALLOC | 1 << 3), "map flags"),
    (map_create(b48=5), "byte 48"),  # btf_fd
    (map_create(b20=3), "byte 20"),  # inner_map_fd
    (map_create(b76=3), "byte 76"),  # map_token_fd
    (map_create(entries=1 << 24), "MiB"),
])
def test_other_maps_are_refused_with_eperm(attr: bytes, why: str) -> None:
    with pytest.raises(Refused, match=why) as refused:
        bpf.check_map_create(attr)
    assert refused.value.code == errno.EPERM


def prog_load(prog_type: int = bpf.BPF_PROG_TYPE_CGROUP_SKB, count: int = 2, **at: int) -> bytes:
    attr = bytearray(struct.pack("=IIQQ", prog_type, count, 0x1000, 0x2000).ljust(160, b"\0"))
    attr[48:51] = b"sd_"
    for offset, word in ((int(key_[1:]), value_) for key_, value_ in at.items()):
        struct.pack_into("=I", attr, offset, word)
    return bytes(attr)


def test_a_cgroup_skb_program_is_loaded() -> None:
    bpf.check_prog_load(prog_load())
    bpf.check_prog_load(prog_load(b68=bpf.BPF_CGROUP_INET_EGRESS))


@pytest.mark.parametrize(("attr", "why"), [
    (prog_load(prog_type=2), "program type 2"),  # kprobe
    (prog_load(prog_type=1), "program type 1"),  # socket filter
    (prog_load(prog_type=15), "program type 15"),  # cgroup device
    (prog_load(count=bpf.BPF_MAXINSNS + 1), "instructions"),
    (prog_load(b72=4), "byte 72"),  # prog_btf_fd
    (prog_load(b120=9), "byte 120"),  # fd_array
    (prog_load(b144=3), "byte 144"),  # prog_token_fd
    (prog_load(b44=1), "program flags"),
    (prog_load(b68=6), "expected attach type"),
])
def test_other_programs_are_refused(attr: bytes, why: str) -> None:
    with pytest.raises(Refused, match=why):
        bpf.check_prog_load(attr)


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("=BBhi", code, dst | src << 4, off, imm)


def test_map_fds_in_the_program_are_found_for_translation() -> None:
    program = b"".join([
        insn(0x18, 1, bpf.BPF_PSEUDO_MAP_FD, imm=7), insn(0),  # r1 = map fd 7 (two slots)
        insn(0x18, 2, 0, imm=5), insn(0),  # r2 = the constant 5: not an fd
        insn(0x85, imm=1),  # call map_lookup_elem
        insn(0x18, 3, bpf.BPF_PSEUDO_MAP_VALUE, imm=9), insn(0),
        insn(0x95),
    ])
    assert bpf.map_fd_slots(program) == [0, 5]


@pytest.mark.parametrize(("instruction", "why"), [
    (insn(0x18, 1, 3) + insn(0), "pseudo source 3"),  # a BTF id (kernel address)
    (insn(0x18, 1, 5) + insn(0), "pseudo source 5"),  # a map by index into fd_array
    (insn(0x85, 0, 1, imm=2), "not a helper call"),  # bpf-to-bpf
    (insn(0x85, 0, 2, imm=100), "not a helper call"),  # a kernel function
])
def test_other_references_and_calls_are_refused(instruction: bytes, why: str) -> None:
    with pytest.raises(Refused, match=why):
        bpf.map_fd_slots(instruction + insn(0x95))


def attach(attach_type: int = bpf.BPF_CGROUP_INET_EGRESS, flags: int = bpf.BPF_F_ALLOW_MULTI,
           extra: bytes = b"") -> bytes:
    return struct.pack("=iiII", 3, 4, attach_type, flags) + extra.ljust(16, b"\0")


def test_attach_is_inet_ingress_or_egress_only() -> None:
    bpf.check_attach(attach(), detach=False)
    bpf.check_attach(attach(bpf.BPF_CGROUP_INET_INGRESS, 0), detach=True)
    with pytest.raises(Refused, match="attach type 6"):  # a device program
        bpf.check_attach(attach(6), detach=False)
    with pytest.raises(Refused, match="flags"):  # BPF_F_REPLACE
        bpf.check_attach(attach(flags=4), detach=False)
    with pytest.raises(Refused, match="byte 16"):  # replace_bpf_fd
        bpf.check_attach(attach(extra=b"\x05"), detach=False)


def test_only_a_group_of_the_machine_s_own_tree_is_a_target(tmp_path: Path) -> None:
    machine = tmp_path / "machine"
    (machine / "system.slice" / "demo.service").mkdir(parents=True)
    (tmp_path / "other").mkdir()

    def place_of(path: Path) -> str:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return bpf.place(machine, fd)
        finally:
            os.close(fd)

    assert place_of(machine / "system.slice" / "demo.service") == bpf.IN_TREE
    assert place_of(machine) == bpf.IN_TREE
    assert place_of(tmp_path / "other") == bpf.OTHER_CGROUP  # the same filesystem, outside the tree
    assert place_of(Path("/proc/self")) == bpf.OTHER_FILESYSTEM


@pytest.mark.parametrize(("map_type", "key", "value", "entries", "kernel_bytes"), [
    # Measured on 6.18 (memlock in the map's fdinfo); the bound must be at least that.
    (bpf.BPF_MAP_TYPE_HASH, 1, 1, 1 << 20, 83887184),
    (bpf.BPF_MAP_TYPE_ARRAY, 4, 8, 1000, 8312),
])
def test_a_map_is_charged_at_least_what_the_kernel_measured(map_type: int, key: int, value: int, entries: int,
                                                            kernel_bytes: int) -> None:
    assert bpf.map_kernel_bytes(map_type, key, value, entries) >= kernel_bytes


def test_a_map_of_small_elements_is_charged_its_elements_headers() -> None:
    # 1-byte keys and values: 2 bytes an element by their sizes, 80 in the kernel. 8 Mi of them were 16 MiB by
    # their sizes and 640 MiB of host memory; a machine could make 16 such maps.
    with pytest.raises(Refused, match="kernel memory") as refused:
        bpf.check_map_create(map_create(bpf.BPF_MAP_TYPE_HASH, key=1, value=1, entries=8 << 20, flags=0))
    assert refused.value.code == errno.EPERM
    # systemd's own stay far below: an IPv6 address list of 1000 prefixes, the accounting array.
    assert bpf.map_kernel_bytes(bpf.BPF_MAP_TYPE_LPM_TRIE, 20, 8, 1000) < 1 << 20
    assert bpf.map_kernel_bytes(bpf.BPF_MAP_TYPE_ARRAY, 4, 8, 2) < 8 << 10


def test_an_address_past_the_user_half_is_the_kernel_s_efault() -> None:
    # pread/pwrite take no offset past 2**63: before, OverflowError reached the catch-all and answered EPERM.
    mem = os.open("/proc/self/mem", os.O_RDWR)
    caller = bpf.Caller(os.getpid(), -1, mem)
    try:
        for attempt in (lambda: caller.read(0xFFFF_8000_0000_0000, 8), lambda: caller.write(1 << 63, b"\0")):
            with pytest.raises(Refused) as refused:
                attempt()
            assert refused.value.code == errno.EFAULT
    finally:
        os.close(mem)


def test_the_tally_of_calls_keeps_a_bounded_number_of_names() -> None:
    counts: dict[str, int] = {}
    for number in range(1000):
        bpf.tally(counts, f"refused: BPF_PROG_LOAD: program type {number} is not delegated")
    bpf.tally(counts, "prog_load")
    assert len(counts) == bpf.MAX_TALLIED_NAMES + 2  # the first reasons, "other reasons" and the command
    assert counts["refused: other reasons"] == 1000 - bpf.MAX_TALLIED_NAMES and counts["prog_load"] == 1


def test_the_listener_stays_open_while_a_call_is_still_being_made(monkeypatch: pytest.MonkeyPatch) -> None:
    # A delegate whose call outlasts stop()'s wait: before, stop() closed the listener under it, and the call's
    # answer went to whatever the fd number was by then (another machine's listener, opened meanwhile).
    listener, peer = socket.socketpair()
    in_call, release = threading.Event(), threading.Event()

    def slow_call(self: bpf.BpfDelegate) -> None:
        in_call.set()
        release.wait(10)
        os.read(self.listener, 1)

    monkeypatch.setattr(bpf.BpfDelegate, "_one", slow_call)
    delegate = bpf.BpfDelegate(listener.detach(), Path("/nonexistent"), "test")
    peer.send(b"x")  # a notification is waiting
    assert in_call.wait(10)
    delegate.stop(wait=0.1)
    os.fstat(delegate.listener)  # still ours: no OSError
    release.set()
    delegate.stop()
    with pytest.raises(OSError):
        os.fstat(delegate.listener)
    peer.close()
