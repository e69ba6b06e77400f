"""A QEMU virtual machine: its own kernel and a pure cgroup v2 hierarchy, so what a container cannot enforce
(MemoryMax=, TasksMax=, DevicePolicy= on a hybrid-cgroup host, kernel-facing directives) is enforced for real.

The disk is the cached rootfs plus a Debian kernel, made into an ext4 image once
(:func:`~pytest_systemd_harden.machine.images.vm_image`) and booted with ``snapshot=on``: writes go to a temporary
overlay, the image is never modified. The kernel boots directly (``-machine microvm``: no firmware, no PCI), with KVM
where it works and TCG software emulation where it does not; which one, and why, is measured once per host and cached
(:func:`choose_accelerator`).

The VM has no network device (like nspawn's ``--private-network``: only its loopback). Two virtio-serial ports
connect it to the host: the guest's system bus, relayed by ``harden-guest bridge`` (so the same
:class:`~pytest_systemd_harden.machine.systemd.SystemdClient` drives it), and qemu-guest-agent, which reads command
output files back (a byte stream cannot pass the file descriptors nspawn uses). A machine section's ``files:`` become a
small read-only disk that the guest binds in place before any service starts: a copy taken at boot, where nspawn binds
them live.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import BackendUnavailable, ImageBuildError, MachineError, printable
from ..build_sandbox import HELPER_UIDS, helper_environment
from ..cgroups import Contained, output_lines
from ..images import (
    BUS_PORT,
    FILES_LABEL,
    HOLD_ARGUMENT,
    OUTPUT_DIR,
    VmImage,
    boot_units,
    package_version,
    vm_image,
)
from ..staging import remove_tree
from ..systemd import OutputFiles
from .base import Machine, Progress, proportional_set_size
from .guest_agent import GuestAgent

QEMU = "qemu-system-x86_64"
# QEMU emulates devices for a guest that runs the image's code: a flaw in that emulation must not be host root's.
# Once set up (its disk, kernel, sockets and /dev/kvm open), it becomes a uid of its own per VM (above the build
# sandbox's ranges, in build_sandbox.HELPER_UIDS: no file or process of the host is that uid's) under QEMU's seccomp
# filter (no spawning, no obsolete or resource-control calls).
QEMU_SANDBOX = "on,obsolete=deny,spawn=deny,resourcecontrol=deny"
_FIRST_QEMU_UID = HELPER_UIDS + 1
MEMORY_MIB = 512
# TCG's translated-code cache defaults to 1 GiB, more than the guest's memory: 128 MiB costs no speed here.
TCG_CACHE_MIB = 128
CPUS = 2
# How long a kernel under KVM may stay silent before KVM is judged not to work here. A working KVM prints the
# kernel's banner within a second; a nested hypervisor that cannot run the kernel prints nothing, ever.
KVM_TRIAL_SECONDS = 10.0
# TCG is a software CPU: a boot takes ~15 s where KVM takes ~2 s, so the boot timeout stretches with it.
TCG_SLOWDOWN = 3.0
# The kernel prints without pause until it starts init (about 3 s under TCG); this long a silence is a hang.
EARLY_BOOT_STALL_SECONDS = 20.0

def qemu_uid(name: str) -> int:
    """The host uid QEMU runs as for the VM ``name``: one of its own, so no two VMs' QEMUs can trace each other."""
    return _FIRST_QEMU_UID + zlib.crc32(name.encode()) % 0xFFFE  # up to HELPER_UIDS + 0xFFFE


def host_tsc_khz() -> int | None:
    """The host's TSC frequency, where it is constant (the kernel then shows it as "cpu MHz")."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    if "constant_tsc" not in cpuinfo:
        return None
    mhz = next((line.split(":")[1] for line in cpuinfo.splitlines() if line.startswith("cpu MHz")), None)
    try:
        return round(float(mhz) * 1000) if mhz else None
    except ValueError:
        return None


def check_available() -> None:
    """Raise BackendUnavailable with the fix when this host cannot run QEMU machines."""
    if shutil.which(QEMU) is None:
        raise BackendUnavailable(f"{QEMU} is not installed: apt-get install qemu-system-x86")
    if shutil.which("mkfs.ext4") is None:
        raise BackendUnavailable("mkfs.ext4 is not installed (it makes the VM disk): apt-get install e2fsprogs")
    if os.geteuid() != 0:
        raise BackendUnavailable("the qemu backend needs root to build its image (mmdebstrap): run pytest as root, "
                                 "e.g. sudo -E pytest")


@dataclass(frozen=True)
class Accelerator:
    """KVM or TCG, and why: the report says which one a VM ran on."""

    name: str  # "kvm" or "tcg"
    why: str

    def describe(self) -> str:
        return f"{self.name.upper()} ({self.why})"


def _fingerprint(image: VmImage) -> str:
    qemu = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=False).stdout.split("\n")[0]
    return json.dumps([os.uname().release, qemu, image.key, os.path.exists("/dev/kvm")])


@dataclass
class _AcceleratorCache:
    """The verdict of a KVM trial, per host kernel, QEMU and guest kernel, kept beside the images."""

    path: Path

    def get(self, fingerprint: str) -> Accelerator | None:
        try:
            found = json.loads(self.path.read_text()).get(fingerprint)
        except (OSError, ValueError):
            return None
        return Accelerator(found["name"], found["why"]) if found else None

    def put(self, fingerprint: str, accelerator: Accelerator) -> None:
        try:
            known = json.loads(self.path.read_text())
        except (OSError, ValueError):
            known = {}
        known[fingerprint] = {"name": accelerator.name, "why": accelerator.why}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_name(f"{self.path.name}.{os.getpid()}")
        staging.write_text(json.dumps(known, indent=2))
        staging.replace(self.path)


class _GuestOutput(OutputFiles):
    directory = OUTPUT_DIR

    def __init__(self, agent: GuestAgent) -> None:
        self.agent = agent

    def read(self, path: str) -> bytes:
        return self.agent.read_file(path)


@dataclass
class QemuMachine(Machine):
    NAME = "qemu"

    accelerator: Accelerator | None = field(default=None, init=False)
    _contained: Contained | None = field(default=None, init=False, repr=False)
    _runtime: Path | None = field(default=None, init=False, repr=False)
    _image: VmImage | None = field(default=None, init=False, repr=False)
    _agent: GuestAgent | None = field(default=None, init=False, repr=False)
    _asked_boot_timeout: float | None = field(default=None, init=False, repr=False)  # before TCG's slowdown
    _stderr: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=50), init=False,
                                            repr=False)
    # The guest's console as QEMU passes it on (a pipe, not a file that grows with whatever the guest prints): its
    # last 64 KiB, and how many bytes came in all (the early-boot check watches it grow).
    _console: bytearray = field(default_factory=bytearray, init=False, repr=False)
    _console_bytes: int = field(default=0, init=False, repr=False)

    def twin(self) -> QemuMachine:
        twin = super().twin()
        assert isinstance(twin, QemuMachine)
        if self._asked_boot_timeout is not None:
            twin.boot_timeout = self._asked_boot_timeout  # its own boot multiplies it for TCG again
        return twin

    # -- the command line ---------------------------------------------------------------------------------

    def command_line(self, image: VmImage, runtime: Path, accelerator: str, files_disk: Path | None) -> list[str]:
        cpu = "host" if accelerator == "kvm" else "max"
        append = "console=ttyS0 root=/dev/vda rw systemd.firstboot=off" + (" harden.files" if files_disk else "")
        append += "".join(f" systemd.mask={unit}" for unit in self.masked_at_boot)
        append += "".join(f" {HOLD_ARGUMENT}={unit}" for unit in self.held_at_boot)
        khz = host_tsc_khz() if accelerator == "tcg" else None
        if khz:
            # Under TCG the guest's TSC is the host's. Without its frequency the kernel calibrates it against the
            # emulated PIT, which fails now and then on a loaded host, and then hangs calibrating its delay loop.
            append += f" tsc_early_khz={khz}"
        accel = "kvm" if accelerator == "kvm" else f"tcg,tb-size={TCG_CACHE_MIB}"
        command = [
            QEMU, "-name", self.name, "-machine", "microvm", "-accel", accel, "-cpu", cpu,
            "-m", str(MEMORY_MIB), "-smp", str(CPUS),
            "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
            "-sandbox", QEMU_SANDBOX, "-runas", f"{qemu_uid(self.name)}:{qemu_uid(self.name)}",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", append,
            "-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console",
            # snapshot=on: writes go to a temporary overlay (in TMPDIR, our runtime directory), never the image.
            "-drive", f"id=root,file={image.disk},format=raw,if=none,snapshot=on",
            "-device", "virtio-blk-device,drive=root",
            "-device", "virtio-serial-device",
            "-chardev", f"socket,id=bus,path={runtime / 'bus.sock'},server=on,wait=off",
            "-device", f"virtserialport,chardev=bus,name={BUS_PORT}",
            "-chardev", f"socket,id=agent,path={runtime / 'agent.sock'},server=on,wait=off",
            "-device", "virtserialport,chardev=agent,name=org.qemu.guest_agent.0",
        ]
        if files_disk is not None:
            command += ["-drive", f"id=files,file={files_disk},format=raw,if=none,readonly=on",
                        "-device", "virtio-blk-device,drive=files"]
        return command

    # -- lifecycle ----------------------------------------------------------------------------------------

    def boot(self, progress: Progress = lambda line: None) -> None:
        super().boot(progress)
        self.add_machine_address(progress)

    def _start(self, progress: Progress) -> str:
        check_available()
        image = self._image = vm_image(self.image_cache, self.config.packages, progress, release=self.config.release,
                                       debs=self.config.debs)
        self.masked_at_boot, self.held_at_boot = boot_units(self.config, image.rootfs)
        self.address_at_boot = True  # the machine's generator is part of the disk (images._build_disk)
        self._runtime = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=os.environ.get("TMPDIR", "/tmp")))
        try:
            files_disk = self._files_disk(self._runtime) if self.config.files else None
            self.accelerator = self._boot_vm(image, files_disk, progress)
            stalled = self._early_boot_stall()
            if stalled:  # a kernel stuck before init does not recover: boot once more, and say so
                progress(f"{self.name}: {stalled}; booting it again")
                self._kill_vm()
                self._launch(image, files_disk, self.accelerator.name)
                stalled = self._early_boot_stall()
                if stalled:
                    raise MachineError(f"VM {self.name}: {stalled}, twice\nconsole:\n{self.boot_log()}")
            if self._asked_boot_timeout is None:
                self._asked_boot_timeout = self.boot_timeout
            timeout = self._asked_boot_timeout * (TCG_SLOWDOWN if self.accelerator.name == "tcg" else 1)
            self._agent = GuestAgent(str(self._runtime / "agent.sock"))
            try:
                self._agent.connect(timeout)
            except MachineError as exc:
                raise MachineError(f"VM {self.name} did not come up ({self.accelerator.describe()}): {exc}\n"
                                   f"console:\n{self.boot_log()}") from None
            # The system bus is up once the manager answers; Machine.boot waits for the boot to finish.
            self.boot_timeout = timeout
            return f"unix:path={self._runtime / 'bus.sock'}"
        except BaseException:
            self._stop()
            raise

    def capability_identity(self) -> dict[str, object]:
        # The guest's kernel and systemd come with the image; the accelerator and the rest of the command line
        # with QEMU. Left out: this VM's name, its runtime directory and the files disk (the spec's files).
        assert self._image is not None and self.accelerator is not None, "capability_identity() of a VM not started"
        built = self._image.disk.parent.parent  # images/<key>/vm-<recipe>/disk.ext4
        argv = [arg.replace(self.name, "{machine}")
                for arg in self.command_line(self._image, Path("{runtime}"), self.accelerator.name, None)]
        return {"backend": self.NAME, "command_line": argv, "image": f"{built.name}/{self._image.key}",
                "systemd": package_version(built / "rootfs", "systemd")}

    def _output_files(self) -> OutputFiles | None:
        assert self._agent is not None
        return _GuestOutput(self._agent)

    def _boot_vm(self, image: VmImage, files_disk: Path | None, progress: Progress) -> Accelerator:
        """Start QEMU: with KVM if this host's verdict says it works (tried now if there is none), else TCG."""
        cache = _AcceleratorCache(self.image_cache.cache_dir / "qemu-accelerator.json")
        forced = os.environ.get("HARDEN_QEMU_ACCEL")
        if forced in ("kvm", "tcg"):
            chosen = Accelerator(forced, "HARDEN_QEMU_ACCEL is set")
            self._launch(image, files_disk, chosen.name)
            return chosen
        fingerprint = _fingerprint(image)
        known = cache.get(fingerprint)
        if known is not None:
            self._launch(image, files_disk, known.name)
            return known
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            verdict = Accelerator("tcg", "no usable /dev/kvm")
            cache.put(fingerprint, verdict)
            self._launch(image, files_disk, "tcg")
            return verdict
        progress(f"trying KVM for {self.name} (once per host; falls back to TCG if the kernel does not boot)")
        self._launch(image, files_disk, "kvm")
        failure = self._kvm_failure()
        if failure is None:
            verdict = Accelerator("kvm", "the kernel booted under KVM")
        else:
            self._kill_vm()
            verdict = Accelerator("tcg", f"KVM failed here: {failure}")
            self._launch(image, files_disk, "tcg")
        progress(f"{self.name}: {verdict.describe()}")
        cache.put(fingerprint, verdict)
        return verdict

    def _early_boot_stall(self) -> str | None:
        """None once the kernel runs init; what happened if its console stops growing before that."""
        assert self._contained is not None
        last_size, last_change = -1, time.monotonic()
        while "Run /init" not in (text := self._console_text()):
            if self._contained.process.poll() is not None:
                return f"qemu exited ({next(reversed(self._stderr), 'no message')})"
            now = time.monotonic()
            if self._console_bytes != last_size:
                last_size, last_change = self._console_bytes, now
            elif now - last_change > EARLY_BOOT_STALL_SECONDS:
                tail = text.strip().splitlines()[-1:] or ["nothing"]
                return f"the kernel printed nothing for {EARLY_BOOT_STALL_SECONDS:.0f}s after: {tail[0]}"
            time.sleep(0.1)
        return None

    def _kvm_failure(self) -> str | None:
        """None once the kernel under KVM prints its banner; why not, if QEMU dies or the kernel stays silent."""
        assert self._contained is not None and self._runtime is not None
        deadline = time.monotonic() + KVM_TRIAL_SECONDS
        while time.monotonic() < deadline:
            if self._contained.process.poll() is not None:
                time.sleep(0.1)  # let the stderr reader catch QEMU's last words
                last = next((line for line in reversed(self._stderr) if line.strip()), "no message")
                return f"qemu exited ({last})"
            if "Linux version" in self._console_text():
                return None
            time.sleep(0.1)
        return (f"the kernel printed nothing within {KVM_TRIAL_SECONDS:.0f}s (a nested hypervisor, such as PVM, that "
                "cannot run a stock kernel)")

    def _launch(self, image: VmImage, files_disk: Path | None, accelerator: str) -> None:
        assert self._runtime is not None
        for stale in ("bus.sock", "agent.sock"):
            (self._runtime / stale).unlink(missing_ok=True)
        self._stderr.clear()
        self._console.clear()
        self._console_bytes = 0
        self._contained = Contained.start(self.command_line(image, self._runtime, accelerator, files_disk), "qemu",
                                          self.name, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, env=helper_environment(TMPDIR=str(self._runtime)))  # its overlay
        threading.Thread(target=self._collect_stderr, args=(self._contained,), name=f"qemu {self.name}",
                         daemon=True).start()
        threading.Thread(target=self._collect_console, args=(self._contained,), name=f"qemu console {self.name}",
                         daemon=True).start()
        deadline = time.monotonic() + 10
        while not (self._runtime / "agent.sock").exists():  # QEMU listens before the guest runs
            if self._contained.process.poll() is not None or time.monotonic() > deadline:
                time.sleep(0.1)
                raise MachineError(f"{QEMU} did not start ({self._contained.process.poll()}):\n"
                                   + "\n".join(self._stderr))
            time.sleep(0.02)

    def _collect_console(self, contained: Contained) -> None:
        """Read the guest's console for as long as QEMU writes it (a full pipe would stop the guest), keeping the
        last 64 KiB."""
        assert contained.process.stdout is not None
        while chunk := os.read(contained.process.stdout.fileno(), 1 << 16):
            self._console += chunk
            self._console_bytes += len(chunk)
            del self._console[:-(64 << 10)]

    def _collect_stderr(self, contained: Contained) -> None:
        assert contained.process.stderr is not None
        for line in output_lines(contained.process.stderr):
            self._stderr.append(line)

    def _files_disk(self, runtime: Path) -> Path:
        """A read-only ext4 disk holding the machine section's files, with binds.json saying where each goes."""
        tree = runtime / "files"
        tree.mkdir()
        binds = []
        self.config.check_files()
        for number, (destination, source) in enumerate(self.config.files):
            host = Path(source)
            entry = str(number)
            if host.is_dir():
                shutil.copytree(host, tree / entry, symlinks=True)
            else:
                shutil.copy2(host, tree / entry)
            binds.append([entry, destination])
        (tree / "binds.json").write_text(json.dumps(binds))
        used = sum(path.stat(follow_symlinks=False).st_size for path in tree.rglob("*"))
        disk = runtime / "files.ext4"
        made = subprocess.run(["mkfs.ext4", "-q", "-F", "-L", FILES_LABEL, "-d", str(tree), str(disk),
                               f"{used // 2**20 + 16}M"], capture_output=True, text=True, check=False)
        if made.returncode != 0:
            raise ImageBuildError(f"mkfs.ext4 failed making the disk of the machine's files:\n{made.stderr.strip()}")
        remove_tree(tree)
        return disk

    def _console_text(self) -> str:
        """The guest's text: its console's last 64 KiB, printable."""
        return printable(bytes(self._console).decode(errors="replace"))

    def boot_log(self) -> str:
        lines = self._console_text().splitlines()[-60:]
        if self._stderr:
            lines += ["qemu:", *self._stderr]
        return "\n".join(lines)

    def cap_counters(self) -> dict[str, int]:
        return self._contained.cap_counters() if self._contained is not None else {}

    def caps_hit(self, before: dict[str, int]) -> list[str]:
        return self._contained.caps_hit(before) if self._contained is not None else []

    def resident_memory(self) -> int | None:
        """PSS of the QEMU process: the guest's memory as far as the guest has touched it, plus QEMU's own."""
        if self._contained is None:
            return None
        return proportional_set_size(self._contained.pids() or {self._contained.process.pid})

    def describe(self) -> str:
        return f"qemu, {self.accelerator.describe()}" if self.accelerator else "qemu"

    def _kill_vm(self) -> None:
        contained, self._contained = self._contained, None
        if contained is not None:
            contained.stop(grace=2)  # SIGTERM: QEMU exits at once; the snapshot overlay is discarded

    def _stop(self) -> None:
        agent, self._agent = self._agent, None
        if agent is not None:
            agent.close()
        self._kill_vm()
        runtime, self._runtime = self._runtime, None
        if runtime is not None:
            remove_tree(runtime)
