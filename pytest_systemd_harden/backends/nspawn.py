"""The default backend: a cached Debian rootfs booted with systemd-nspawn.

The image is never modified (``--volatile=overlay``), the container has only a loopback interface
(``--private-network``) so nothing a service or probe does reaches the host's network, and it runs in a cgroup
of its own that is killed and removed on shutdown (and by the next run, if this one was killed).
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..cgroups import Contained, host_runs_systemd
from ..errors import BackendUnavailable, MachineError
from ..images import Image, package_version
from ..probes.inside import GUARD_KERNEL
from .base import Machine, Progress, proportional_set_size

__all__ = ["NspawnMachine", "check_available", "host_runs_systemd"]


def check_available() -> None:
    """Raise BackendUnavailable with the fix when this host cannot run nspawn machines."""
    if os.geteuid() != 0:
        raise BackendUnavailable("the nspawn backend needs root (systemd-nspawn boots a container): run pytest as root,"
                                 " e.g. sudo -E pytest")
    if shutil.which("systemd-nspawn") is None:
        raise BackendUnavailable("systemd-nspawn is not installed: apt-get install systemd-container")
    # No image builder is needed while the images are cached (a CI runner restoring its cache); building says so.


@dataclass
class NspawnMachine(Machine):
    NAME = "nspawn"
    # The container's kernel is the host's: a probe must not load a module into it, nor take its memory (see
    # probes.inside).
    PROBE_GUARD = GUARD_KERNEL

    _contained: Contained | None = field(default=None, init=False, repr=False)
    _console: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=200), init=False,
                                             repr=False)
    leader: int | None = field(default=None, init=False)
    image: Image | None = field(default=None, init=False, repr=False)

    def command_line(self, rootfs: Path) -> list[str]:
        binds = [f"--bind-ro={host}:{dest}" for dest, host in self.config.files]
        return [
            "systemd-nspawn", "--quiet", "--boot",
            "--directory", str(rootfs), "--machine", self.name,
            "--volatile=overlay",  # the cached image is shared and never written
            "--register=no", "--keep-unit",  # no machined here; our own cgroup instead
            "--private-network",  # only lo: nothing inside reaches the host's network
            "--link-journal=no", "--resolv-conf=off", "--timezone=off",
            "--console=read-only",
            # IPAddressDeny= and friends need bpf() inside; nspawn's own filter blocks it by default.
            "--system-call-filter=bpf",
            *binds,
        ]

    def _start(self, progress: Progress) -> str:
        check_available()
        self.config.check_files()
        image = self.image = self.image_cache.get(self.config.packages, progress)
        # If the test process dies without cleaning up, the container is shut down with it.
        self._contained = Contained.start(self.command_line(image.rootfs), "machine", self.name,
                                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=self._collect_console, name=f"console {self.name}", daemon=True).start()
        try:
            return self._wait_for_bus()
        except BaseException:
            self._stop()
            raise

    def capability_identity(self) -> dict[str, object]:
        # The command line decides what the container may do (namespaces, syscall filter, capabilities, user
        # namespacing): every flag as it runs, so changing one is a new key. Left out is only what names this one
        # machine - its name, the rootfs path (the image key stands for it) and the spec's files bound read-only
        # (their content is not what the kernel enforces).
        assert self.image is not None, "capability_identity() of a container not started"
        bound = [source for _dest, source in self.config.files]
        argv = [arg.replace(str(self.image.rootfs), "{rootfs}").replace(self.name, "{machine}")
                for arg in self.command_line(self.image.rootfs) if not any(source in arg for source in bound)]
        return {"backend": self.NAME, "command_line": argv, "image": self.image.key,
                "systemd": package_version(self.image.rootfs, "systemd")}

    def _collect_console(self) -> None:
        assert self._contained is not None and self._contained.process.stdout is not None
        for raw in self._contained.process.stdout:
            self._console.append(raw.decode(errors="replace").rstrip())

    def boot_log(self) -> str:
        return "\n".join(self._console)

    def resident_memory(self) -> int | None:
        """PSS of every process in the container's cgroup: shared pages (the cached image's libraries, mapped by
        every container) are counted in proportion, so machines can be summed."""
        if self._contained is None or self._contained.cgroup is None:
            return None
        return proportional_set_size(self._contained.pids())

    def _wait_for_bus(self) -> str:
        assert self._contained is not None
        process = self._contained.process
        deadline = time.monotonic() + self.boot_timeout
        own_pidns = os.readlink("/proc/self/ns/pid")
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise MachineError(f"systemd-nspawn exited with status {process.returncode} before the "
                                   f"container booted:\n{self.boot_log()}")
            for pid in _descendants(process.pid):
                try:
                    if os.readlink(f"/proc/{pid}/ns/pid") == own_pidns:
                        continue
                    socket = Path(f"/proc/{pid}/root/run/dbus/system_bus_socket")
                    if socket.exists():
                        self.leader = pid
                        return f"unix:path={socket}"
                except OSError:
                    continue
            time.sleep(0.02)
        raise MachineError(f"container {self.name} did not bring up its system bus within {self.boot_timeout:.0f}s:\n"
                           f"{self.boot_log()}")

    def _stop(self) -> None:
        contained, self._contained = self._contained, None
        if contained is not None:
            contained.stop()  # SIGTERM: nspawn asks the container's systemd to power off
        self.leader = None


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    queue = [pid]
    while queue:
        current = queue.pop()
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                children = Path(f"/proc/{current}/task/{task}/children").read_text().split()
                queue.extend(int(c) for c in children)
                found.extend(int(c) for c in children)
        except OSError:
            continue
    return found
