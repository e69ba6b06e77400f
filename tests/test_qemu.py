"""The QEMU backend: its command line and guest-agent client (pure), and one real VM.

The live test boots a single VM (under TCG here, about 20 s): the gpg-signing example's spec passes on it, and
a second spec with the same machine section shows MemoryMax= and TasksMax= enforced for real, which nspawn on
this host reports unenforced (tests/test_capabilities.py).
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from pytest_systemd_harden.machine.backends.guest_agent import GuestAgent
from pytest_systemd_harden.machine.backends.qemu import Accelerator, QemuMachine, _AcceleratorCache, qemu_uid
from pytest_systemd_harden.machine.images import VmImage
from pytest_systemd_harden.spec.load import load_spec
from pytest_systemd_harden.spec.machine import MachineConfig
from pytest_systemd_harden.unit.pool import MachinePool
from pytest_systemd_harden.unit.service import HardenedService

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_the_vm_has_no_network_device_and_never_writes_its_image(tmp_path: Path) -> None:
    machine = QemuMachine(MachineConfig(backend="qemu"))
    image = VmImage("k", tmp_path / "disk.ext4", tmp_path / "vmlinuz", tmp_path / "initrd.img")
    command = machine.command_line(image, tmp_path, "tcg", tmp_path / "files.ext4")
    joined = " ".join(command)
    assert "-nodefaults" in command and "-netdev" not in command and "-nic" not in command
    assert f"file={tmp_path / 'disk.ext4'},format=raw,if=none,snapshot=on" in joined
    assert f"file={tmp_path / 'files.ext4'},format=raw,if=none,readonly=on" in joined
    assert command[command.index("-accel") + 1].startswith("tcg,") and "harden.files" in joined
    kvm = machine.command_line(image, tmp_path, "kvm", None)
    assert kvm[kvm.index("-accel") + 1] == "kvm" and "harden.files" not in " ".join(kvm)


def test_the_kvm_verdict_is_kept_per_host_and_survives_a_broken_file(tmp_path: Path) -> None:
    cache = _AcceleratorCache(tmp_path / "accel.json")
    assert cache.get("host-a") is None
    cache.put("host-a", Accelerator("tcg", "KVM failed here: qemu exited"))
    cache.put("host-b", Accelerator("kvm", "the kernel booted under KVM"))
    assert cache.get("host-a") == Accelerator("tcg", "KVM failed here: qemu exited")
    assert cache.get("host-b") is not None and cache.get("host-b").name == "kvm"  # type: ignore[union-attr]
    (tmp_path / "accel.json").write_text("{not json")
    assert cache.get("host-a") is None  # measured again, not a crash


class FakeAgent:
    """qemu-guest-agent's side of the protocol, on a unix socket, with a stale reply left in the stream."""

    def __init__(self, path: Path, files: dict[str, bytes]) -> None:
        self.files = files
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen(1)
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        conn, _ = self.server.accept()
        stream = conn.makefile("rwb")
        stream.write(b'{"return": "stale reply of an earlier, timed-out request"}\n')
        handles: dict[int, bytes] = {}
        for line in stream:
            request = json.loads(line)
            args = request.get("arguments", {})
            if request["execute"] == "guest-sync-delimited":
                reply = b"\xff" + json.dumps({"return": args["id"]}).encode()
            elif request["execute"] == "guest-file-open":
                if args["path"] not in self.files:
                    reply = json.dumps({"error": {"class": "GenericError", "desc": "No such file"}}).encode()
                else:
                    handles[7] = self.files[args["path"]]
                    reply = json.dumps({"return": 7}).encode()
            elif request["execute"] == "guest-file-read":
                chunk, handles[7] = handles[7][:3], handles[7][3:]  # tiny chunks: the client must loop
                reply = json.dumps({"return": {"count": len(chunk), "buf-b64": base64.b64encode(chunk).decode(),
                                               "eof": not handles[7]}}).encode()
            else:
                reply = json.dumps({"return": {}}).encode()
            stream.write(reply + b"\n")
            stream.flush()


def test_the_guest_agent_client_syncs_past_stale_replies_and_reads_whole_files(tmp_path: Path) -> None:
    FakeAgent(tmp_path / "agent.sock", {"/run/harden-io/0.stdout": b"hello, world\n"})
    agent = GuestAgent(str(tmp_path / "agent.sock"))
    agent.connect(timeout=5)
    try:
        assert agent.read_file("/run/harden-io/0.stdout") == b"hello, world\n"
        with pytest.raises(Exception, match="guest-file-open: No such file"):
            agent.read_file("/nowhere")
    finally:
        agent.close()


LIMITS = """
name: limits
service:
  exec_start: /bin/sleep infinity
machine:
  packages: [gnupg, curl]
  files: {/opt/signer: app/}   # the gpg-signing example's machine section: one VM for both specs
hardening:
  DynamicUser: yes
  MemoryMax: 200M
  TasksMax: 64
"""


def test_the_example_passes_and_memory_and_task_limits_are_enforced_in_a_vm(pytester: pytest.Pytester) -> None:
    shutil.copytree(EXAMPLES / "gpg-signing" / "app", pytester.path / "app")
    shutil.copy(EXAMPLES / "gpg-signing" / "harden.yaml", pytester.path / "harden.yaml")
    (pytester.path / "harden-limits.yaml").write_text(LIMITS)
    result = pytester.runpytest("-v", "-rs", "-p", "no:cacheprovider", "--harden-require-backend",
                                "--harden-backend=qemu", "--harden-diagnose=off")
    output = result.stdout.str()
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("errors", 0) == 0, output
    result.stdout.fnmatch_lines([  # in collection order
        "*harden-limits.yaml::MemoryMax=200M is enforced PASSED*",
        "*harden-limits.yaml::TasksMax=64 is enforced PASSED*",
        "*harden.yaml::sign a payload through the API PASSED*",
        "*harden.yaml::gpg works inside the sandbox PASSED*",
    ])
    assert output.count("booting qemu machine") == 1, output  # both specs shared one VM
    assert "(qemu, TCG (" in output or "(qemu, KVM (" in output  # the report says how it ran
    left = subprocess.run(["pgrep", "-f", "qemu-system-x86_64 -name harden-"], capture_output=True, text=True,
                          check=False)
    assert left.stdout == "", f"a VM was left running: {left.stdout}"


def test_the_tested_package_unit_is_held_at_boot_in_a_vm_too(harden_pool: MachinePool, tmp_path: Path) -> None:
    # As on nspawn (tests/test_unit.py): memcached's package enables its unit, and its first start must be the
    # test's, under the drop-in, not one at boot before it. The VM's disk carries the hold generator; the kernel
    # command line names the unit.
    spec_path = tmp_path / "harden.yaml"
    spec_path.write_text("service: {unit: memcached.service, ready: {tcp: 11211}}\n"
                         "machine: {backend: qemu, packages: [memcached]}\n")
    spec = load_spec(spec_path)
    machine = harden_pool.machine_for(spec.machine)
    assert isinstance(machine, QemuMachine) and machine.held_at_boot == ("memcached.service",)
    state = machine.run("systemctl is-active memcached.service; systemctl is-enabled memcached.service")
    assert state.stdout.split()[:2] == ["inactive", "enabled"], state
    # QEMU emulates the guest's devices as a uid of its own under its seccomp filter, never as host root.
    uid = qemu_uid(machine.name)
    assert machine._contained is not None
    status = Path(f"/proc/{machine._contained.process.pid}/status").read_text()
    assert "Name:\tqemu-system-x86" in status and f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}" in status, status
    assert "Seccomp:\t2" in status, status
    environ = Path(f"/proc/{machine._contained.process.pid}/environ").read_bytes().split(b"\0")
    names = {entry.split(b"=")[0] for entry in environ if entry} - {b"PWD"}  # PWD: the cgroup-joining shell's
    assert names == {b"LC_ALL", b"PATH", b"TMPDIR"}, names  # nothing of the caller's (its tokens)
    service = HardenedService(machine, spec)
    service.start()
    try:
        starts = machine.run("journalctl -b -o cat -u memcached.service | grep -c '^Started memcached'")
        assert starts.stdout.strip() == "1", starts  # the test's start, not one at boot before it
    finally:
        service.stop()


def test_the_kernel_command_line_names_the_units_held_at_boot(tmp_path: Path) -> None:
    machine = QemuMachine(MachineConfig(backend="qemu"))
    machine.held_at_boot = ("memcached.service",)
    image = VmImage("k", tmp_path / "disk.ext4", tmp_path / "vmlinuz", tmp_path / "initrd.img")
    append = machine.command_line(image, tmp_path, "tcg", None)
    assert "pytest_systemd_harden.hold=memcached.service" in append[append.index("-append") + 1]


def test_the_guest_s_console_is_read_from_a_pipe_and_only_its_last_64_kib_kept() -> None:
    # A guest printing without end fills no disk and no memory: QEMU writes its console to a pipe (-chardev
    # stdio), which is always drained (a full one would stop the guest), and the count says it still grows.
    machine = QemuMachine(MachineConfig(backend="qemu"))
    command = machine.command_line(VmImage("k", Path("/d"), Path("/k"), Path("/i")), Path("/run/x"), "tcg", None)
    assert command[command.index("-serial") + 1] == "chardev:console" and "stdio,id=console,signal=off" in command
    printer = subprocess.Popen(["python3", "-c", ("import sys; [sys.stdout.write('line %06d\\n' % i) for i in "
                                                  "range(100000)]")], stdout=subprocess.PIPE)

    class Started:
        process = printer

    machine._collect_console(Started())  # type: ignore[arg-type]
    printer.wait()
    text = machine._console_text()
    assert machine._console_bytes == 1_200_000 and len(text) == 64 << 10
    assert text.endswith("line 099999\n")
