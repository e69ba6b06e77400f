"""BPF delegation on a real user-namespaced container: its root's bpf() calls are made for it as systemd's firewall
needs, verified as a BPF token's would be, and nothing else (machine/bpf_delegation.py)."""

from __future__ import annotations

import json
import os

import pytest

from pytest_systemd_harden.machine import bpf_delegation as bpf
from pytest_systemd_harden.machine.backends.base import Machine
from pytest_systemd_harden.machine.bpf_delegation import BpfDelegate
from pytest_systemd_harden.machine.probing import machine_facts
from pytest_systemd_harden.spec.machine import MachineConfig
from pytest_systemd_harden.unit.pool import MachinePool

# bpf() as the container's root (its result, or -errno) and a BPF instruction, for every script below; the buffers a
# call points at are kept alive in `keep`.
SYSCALLS = r"""
import ctypes, json, os, struct
libc = ctypes.CDLL(None, use_errno=True)
def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, len(attr))
    r = libc.syscall(ctypes.c_long(321), ctypes.c_long(cmd), buf, ctypes.c_long(len(attr)))
    return r if r >= 0 else -ctypes.get_errno()
def insn(code, dst=0, src=0, off=0, imm=0):
    return struct.pack("=BBhi", code, dst | src << 4, off, imm)
keep = []
"""

# Raw bpf() calls as the container's root, each printed as its result (an fd or -errno). The pointer leak stores
# the program's context pointer into a map value: a privileged loader may, an unprivileged one (or a token's) may
# not (the verifier's "leaks addr into map", EACCES).
CALLS = SYSCALLS + r"""
def load(prog_type, insns):
    code = ctypes.create_string_buffer(b"".join(insns)); lic = ctypes.create_string_buffer(b"GPL")
    keep.extend([code, lic])
    attr = struct.pack("=IIQQ", prog_type, len(code.raw) // 8, ctypes.addressof(code), ctypes.addressof(lic))
    return bpf(5, attr.ljust(160, b"\0"))
RET1 = [insn(0xb7, 0, imm=1), insn(0x95)]
out = {"cgroup_skb": load(8, RET1)}
array = bpf(0, struct.pack("=5I", 2, 4, 8, 1, 0).ljust(80, b"\0"))
out["array_map"] = array
# bpf_probe_read_kernel(fp - 8, 8, NULL): a read of the host's memory, for CAP_PERFMON only.
out["probe_read_kernel"] = load(8, [insn(0xbf, 1, 10), insn(0x07, 1, imm=-8), insn(0xb7, 2, imm=8), insn(0xb7, 3),
                                    insn(0x85, imm=113), insn(0xb7, 0, imm=1), insn(0x95)])
out["pointer_leak"] = load(8, [insn(0xbf, 6, 1), insn(0x62, 10, 0, -4, 0), insn(0xbf, 2, 10), insn(0x07, 2, imm=-4),
                               insn(0x18, 1, 1, imm=array), insn(0), insn(0x85, imm=1), insn(0x15, 0, 0, 1, 0),
                               insn(0x7b, 0, 6, 0, 0), insn(0xb7, 0, imm=1), insn(0x95)])
if UNPRIVILEGED:
    out["kprobe"] = load(2, RET1)
    out["socket_filter"] = load(1, RET1)
    out["btf_load"] = bpf(18, b"\0" * 40)
    out["unknown_command"] = bpf(0xFFFF, b"\0" * 16)
group = os.open("/sys/fs/cgroup/unified" if os.path.isdir("/sys/fs/cgroup/unified") else "/sys/fs/cgroup", os.O_RDONLY)
prog = out["cgroup_skb"]
out["attach_own"] = bpf(8, struct.pack("=iiII", group, prog, 1, 2).ljust(32, b"\0"))
out["detach_own"] = bpf(9, struct.pack("=iiII", group, prog, 1, 0).ljust(32, b"\0"))
out["attach_not_a_cgroup"] = bpf(8, struct.pack("=iiII", os.open("/", os.O_RDONLY), prog, 1, 2).ljust(32, b"\0"))
out["detach_probe"] = bpf(9, struct.pack("=iiII", -1, -1, 1, 0).ljust(32, b"\0"))
key = ctypes.create_string_buffer(4); value = ctypes.create_string_buffer(struct.pack("=Q", 42))
out["update"] = bpf(2, struct.pack("=IIQQQ", array, 0, ctypes.addressof(key), ctypes.addressof(value), 0))
back = ctypes.create_string_buffer(8)
out["lookup"] = bpf(1, struct.pack("=IIQQQ", array, 0, ctypes.addressof(key), ctypes.addressof(back), 0))
out["looked_up"] = struct.unpack("=Q", back.raw)[0]
print(json.dumps(out))
"""


def bpf_calls(machine: Machine, unprivileged: bool) -> dict[str, int]:
    result = machine.run(["python3", "-c", CALLS.replace("UNPRIVILEGED", str(unprivileged))])
    assert result.ok, result.describe()
    return dict(json.loads(result.stdout))


@pytest.fixture
def user_namespaced(machine: Machine) -> Machine:
    """The shared base machine, which must be an nspawn container in a user namespace (the default)."""
    if machine.NAME != "nspawn" or not machine_facts(machine).user_namespaced:
        pytest.skip("BPF delegation is for nspawn's user-namespaced machines")
    return machine


EPERM, EACCES, EBADF, EFAULT, EINVAL = -1, -13, -9, -14, -22


def test_the_firewall_s_calls_are_made_for_the_container_and_nothing_more(user_namespaced: Machine) -> None:
    calls = bpf_calls(user_namespaced, unprivileged=True)
    assert calls["cgroup_skb"] >= 0 and calls["array_map"] >= 0, calls
    assert calls["attach_own"] == 0 and calls["detach_own"] == 0, calls  # its own cgroup
    assert calls["update"] == 0 and calls["lookup"] == 0 and calls["looked_up"] == 42, calls
    # As a host's kernel answers systemd's probe and a call on a directory that is no cgroup:
    assert calls["detach_probe"] == EBADF and calls["attach_not_a_cgroup"] == EBADF, calls
    # What the firewall does not need is refused, as the kernel refuses it to the container without delegation:
    assert calls["kprobe"] == EPERM and calls["socket_filter"] == EPERM, calls
    assert calls["btf_load"] == EPERM, calls
    # A command not delegated goes on as the container's own call: the kernel's own answer (EINVAL for a command it
    # does not know; a refusal of ours would have been EPERM).
    assert calls["unknown_command"] == EINVAL, calls
    # Verified as an unprivileged program: no kernel pointer leaks out through a map, no helper reads the host's
    # memory (unknown to a program loaded without CAP_PERFMON: EINVAL).
    assert calls["pointer_leak"] == EACCES and calls["probe_read_kernel"] == EINVAL, calls
    assert "BPF firewall programs loaded for the machine by the test process" in user_namespaced.describe()


@pytest.mark.usefixtures("user_namespaced")
def test_a_privileged_container_loads_what_a_delegated_one_may_not(harden_pool: MachinePool) -> None:
    # The other side of the pointer-leak check: with the host's CAP_SYS_ADMIN the same program is accepted, so the
    # EACCES above is the delegate's dropped capabilities at work, not a program the verifier refuses anyway.
    privileged = harden_pool.machine_for(MachineConfig(privileged=True))
    calls = bpf_calls(privileged, unprivileged=False)
    assert calls["cgroup_skb"] >= 0 and calls["pointer_leak"] >= 0 and calls["probe_read_kernel"] >= 0, calls


# The start of a script for the tests below: bpf() as the container's root, and a program of N instructions.
PRELUDE = SYSCALLS + r"""
def load(count=2, log_level=0, log_size=0, log_address=0, prog_type=8):
    body = [insn(0xb7, 0, imm=1)] + [insn(0x57, 0, imm=1)] * (count - 2) + [insn(0x95)]  # r0 = 1; r0 &= 1 ...
    code = ctypes.create_string_buffer(b"".join(body)); lic = ctypes.create_string_buffer(b"GPL")
    keep.extend([code, lic])
    attr = struct.pack("=IIQQIIQ", prog_type, count, ctypes.addressof(code), ctypes.addressof(lic), log_level, log_size,
                       log_address)
    return bpf(5, attr.ljust(160, b"\0"))
"""


def run_script(machine: Machine, script: str) -> object:
    result = machine.run(["python3", "-c", PRELUDE + script])
    assert result.ok, result.describe()
    return json.loads(result.stdout)


def delegate_of(machine: Machine) -> BpfDelegate:
    delegate = getattr(machine, "_bpf", None)
    assert isinstance(delegate, BpfDelegate), f"{machine.name} has no BPF delegate: {machine.describe()}"
    return delegate


def programs_held_here() -> int:
    """BPF programs open in this (the test) process: the delegate's, between a load and handing the fd over."""
    held = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            held += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:bpf-prog"
        except OSError:
            continue
    return held


def test_a_load_whose_log_cannot_be_written_back_fails_and_leaves_nothing_here(user_namespaced: Machine) -> None:
    # The kernel fails such a load with EFAULT. The delegate loaded the program, failed to write the log, and kept
    # the program's fd: a program and an fd of the test process for each such call, past the machine's life.
    before = programs_held_here()
    results = run_script(user_namespaced, "print(json.dumps([load(log_level=1, log_size=4096, log_address=0x10000) "
                                          "for _ in range(3)]))")
    assert results == [EFAULT] * 3
    assert programs_held_here() == before, "the delegate kept the programs whose load it failed"


def test_a_machine_s_map_is_charged_at_least_what_the_kernel_takes(user_namespaced: Machine) -> None:
    sizes = {"hash": (bpf.BPF_MAP_TYPE_HASH, 1, 1, 4096), "array": (bpf.BPF_MAP_TYPE_ARRAY, 4, 8, 1000)}
    taken = run_script(user_namespaced, f"""
out = {{}}
for name, (kind, key, value, entries) in {sizes!r}.items():
    fd = bpf(0, struct.pack("=5I", kind, key, value, entries, 0).ljust(80, bytes(1)))
    out[name] = next(int(line.split()[1]) for line in open(f"/proc/self/fdinfo/{{fd}}") if line.startswith("memlock"))
print(json.dumps(out))
""")
    assert isinstance(taken, dict)
    for name, (kind, key, value, entries) in sizes.items():
        assert bpf.map_kernel_bytes(kind, key, value, entries) >= taken[name], (name, taken)


def test_refusals_of_ever_new_numbers_do_not_grow_the_test_process(user_namespaced: Machine) -> None:
    # Each refusal's reason names the program type; before, each was kept: 160 bytes of the test process a call.
    run_script(user_namespaced, "print(json.dumps([load(prog_type=1000 + n) for n in range(300)]))")
    assert len(delegate_of(user_namespaced).calls) < 100


def test_the_machine_s_programs_are_bounded_in_instructions(user_namespaced: Machine,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # A budget two programs of 4096 instructions above what the machine loaded so far, instead of a million.
    monkeypatch.setattr(bpf, "INSTRUCTION_BUDGET", delegate_of(user_namespaced).instructions + 2 * 4096)
    loads = run_script(user_namespaced, "print(json.dumps([load(4096) for _ in range(3)]))")
    assert isinstance(loads, list) and loads[0] >= 0 and loads[1] >= 0 and loads[2] == EPERM, loads


def test_a_program_naming_maps_by_more_fd_numbers_than_the_kernel_takes_maps_is_refused(
        user_namespaced: Machine) -> None:
    # 65 fd numbers of one map: the kernel takes it (one map), but each number was a copy held by the test process
    # while the call was made, up to 2048 of them. Refused as a program of more than 64 maps is (E2BIG).
    loads = run_script(user_namespaced, """
array = bpf(0, struct.pack("=5I", 2, 4, 8, 1, 0).ljust(80, bytes(1)))
def load_naming(numbers):
    body = b"".join(insn(0x18, 1, 1, imm=number) + insn(0) for number in numbers)
    body += insn(0xb7, 0, imm=1) + insn(0x95)
    code = ctypes.create_string_buffer(body); lic = ctypes.create_string_buffer(b"GPL"); keep.extend([code, lic])
    attr = struct.pack("=IIQQ", 8, len(body) // 8, ctypes.addressof(code), ctypes.addressof(lic))
    return bpf(5, attr.ljust(160, bytes(1)))
print(json.dumps([load_naming([array, array]), load_naming([array] + [os.dup(array) for _ in range(64)])]))
""")
    assert isinstance(loads, list) and loads[0] >= 0 and loads[1] == -7, loads  # E2BIG
