"""The one backend interface: a machine with systemd as PID 1, reachable over D-Bus.

A backend supplies only lifecycle (start, stop) and the bus address of the machine's system bus. Running
commands, services and journals goes through :class:`~pytest_systemd_harden.machine.systemd.SystemdClient`, written
once for every backend, so a command means the same on a container, a VM or the host.
"""

from __future__ import annotations

import abc
import itertools
import os
import shlex
import signal
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ...errors import MachineError
from ...probes.catalogue import MACHINE_ADDRESS
from ...probes.runner import guarded_batch
from ...result import CommandResult
from ...spec.machine import MachineConfig
from ..images import ADDRESS_UNIT, HOLD_RELEASED, ImageCache, deb_package_name
from ..systemd import (
    COMMAND_KILL_GRACE,
    SERVICE_IFACE,
    UNIT_IFACE,
    OutputFiles,
    Property,
    SocketConnector,
    SystemdClient,
)

if TYPE_CHECKING:
    from ...spec.load import Spec

Progress = Callable[[str], None]
# Where the exposure report writes rendered units (and the policy) inside a machine: /run is a tmpfs, gone at
# shutdown (the host backend, whose /run is the host's, removes its own directories when it stops).
EXPOSURE_UNIT_DIR = "/run/harden-exposure"


def timeout_note(timeout: float, killed_by: int | None) -> str:
    """What a command's stderr gets when it was killed at its timeout: how, and whether it ignored SIGTERM."""
    how = (f"it ignored SIGTERM, so SIGKILL followed {COMMAND_KILL_GRACE:g}s later" if killed_by == signal.SIGKILL
           else "SIGTERM to every process of its unit")
    return f"[pytest-systemd-harden: killed at its {timeout:g}s timeout: {how}]"


def proportional_set_size(pids: Iterable[int]) -> int:
    """The PSS of ``pids``: shared pages (the cached image's libraries, mapped by every machine) are counted in
    proportion, so machines can be summed."""
    total = 0
    for pid in pids:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) * 1024 for line in rollup.splitlines() if line.startswith("Pss:")), 0)
    return total


@dataclass
class Machine(abc.ABC):
    """A booted systemd. Subclasses implement :meth:`_start` and :meth:`_stop`; the rest is shared."""

    NAME: ClassVar[str]
    # How careful a probe batch must be here (probes.inside): GUARD_KERNEL where the kernel is the host's (a
    # container), GUARD_HOST where the machine is the host; None for a machine with a kernel of its own (a VM).
    PROBE_GUARD: ClassVar[str | None] = None
    # Whether the plugin may write unit files and drop-ins into this machine's /etc/systemd/system and reload it:
    # a machine of our own, yes; the host backend's systemd is the host's.
    WRITES_UNIT_FILES: ClassVar[bool] = True
    # Whether the machine's systemd outlives the run (the host backend's): a reload it owes is never left for a
    # later call that may not come (reload_units_soon).
    SYSTEMD_OUTLIVES_RUN: ClassVar[bool] = False

    config: MachineConfig
    name: str = field(default_factory=lambda: f"harden-{uuid.uuid4().hex[:8]}")
    boot_timeout: float = 60.0
    # Where images are built and cached; every backend boots from the same cached rootfs.
    image_cache: ImageCache = field(default_factory=ImageCache)
    _systemd: SystemdClient | None = field(default=None, init=False, repr=False)
    _units: itertools.count[int] = field(default_factory=lambda: itertools.count(1), init=False, repr=False)
    _tested: dict[str, Any] | None = field(default=None, init=False, repr=False)
    # Package units masked at this boot (images.boot_units), for the boot line.
    masked_at_boot: tuple[str, ...] = field(default=(), init=False)
    # The tested unit held back at this boot and released once booted (images.boot_units), for the boot
    # line; a backend that cannot hold it leaves this empty.
    held_at_boot: tuple[str, ...] = field(default=(), init=False)
    # MACHINE_ADDRESS is added at boot, by the machine's generator (images.BOOT_GENERATOR); else by a command after.
    address_at_boot: bool = field(default=False, init=False)

    # -- lifecycle ----------------------------------------------------------------------------------------

    @abc.abstractmethod
    def _start(self, progress: Progress) -> str:
        """Start the machine; return the D-Bus address of its system bus once the socket exists."""

    @abc.abstractmethod
    def _stop(self) -> None:
        """Stop the machine and remove every trace of it (processes, cgroups, mounts). Must be idempotent."""

    def boot_log(self) -> str:
        """Console output of the boot, for error messages (may be empty)."""
        return ""

    def describe(self) -> str:
        """The backend, and what matters about how it runs here (a VM's accelerator), for reports."""
        return self.NAME

    def capability_identity(self) -> dict[str, object]:
        """What decides, besides the host's kernel, which directives this machine enforces (the key of its cached
        capabilities, see sandbox/capabilities.py): a backend adds how it runs the machine (its command line) and the
        image. Called once the machine runs. Nothing that names only this one machine: the same setup, the same key."""
        return {"backend": self.NAME}

    def _output_files(self) -> OutputFiles | None:
        """How command output comes back where the bus cannot pass file descriptors (None: it can)."""
        return None

    def _bus_connector(self) -> SocketConnector | None:
        """How to connect to the bus where connecting by its address would authenticate as the wrong user (a
        user-namespaced container's); None: by address."""
        return None

    def cap_counters(self) -> dict[str, int]:
        """How often the machine as a whole hit its memory and tasks caps so far (see cgroups.Caps)."""
        return {}

    def caps_hit(self, before: dict[str, int]) -> list[str]:
        """A sentence per cap the machine hit since ``before`` (an earlier :meth:`cap_counters`)."""
        return []

    def resident_memory(self) -> int | None:
        """Bytes of memory the running machine uses (proportional set size), or None if unknown here."""
        return None

    def host_pids(self) -> set[int] | None:
        """Host pids of the machine's processes (to match the kernel's records to it), or None if unknown here."""
        return None

    def boot(self, progress: Progress = lambda line: None) -> None:
        address = self._start(progress)
        try:
            client = SystemdClient(address, output_files=self._output_files(), connector=self._bus_connector())
            self._systemd = client
            client.connect()
            client.wait_until_booted(self.boot_timeout)
            if self.held_at_boot:
                self._release_holds()
        except BaseException:
            self.shutdown()
            raise

    def _release_holds(self) -> None:
        """Let the units held at boot load again (the boot's transaction is done: nothing starts them now): the
        machine's generator (:data:`BOOT_GENERATOR`) holds nothing once the flag file exists, and a daemon-reload
        reruns it."""
        made = self.run(["/bin/sh", "-c", f"mkdir -p {HOLD_RELEASED.rsplit('/', 1)[0]} && : > {HOLD_RELEASED}"],
                        purpose="boot")
        if not made.ok:
            raise MachineError(f"could not release {', '.join(self.held_at_boot)}, held at boot: "
                               f"{made.status_text()}: {made.stderr.strip()}")
        self.systemd.reload()
        for socket in (unit for unit in self.held_at_boot if unit.endswith(".socket")):  # listening, as on a host
            result = self.systemd.start_unit(socket, timeout=30)
            if result != "done":
                raise MachineError(f"{socket}, held at boot with the unit it starts, did not start once released "
                                   f"(start job: {result}): journalctl -u {socket} in the machine")

    def add_machine_address(self, progress: Progress) -> None:
        """Put MACHINE_ADDRESS on the machine's own lo, for a machine whose network is its own (a container with a
        private network, a VM without a network device; never the host backend): then IPAddressDeny=any with
        IPAddressAllow=localhost has an address to deny that stays on the machine (docs/probes.md). The machine's
        generator adds it at boot (ADDRESS_UNIT, before sysinit.target: one D-Bus read here); a machine without
        the generator gets it by a command now."""
        if self.address_at_boot:
            state = self.systemd.some_properties(ADDRESS_UNIT, [(UNIT_IFACE, "ActiveState"),
                                                                (SERVICE_IFACE, "Result"),
                                                                (SERVICE_IFACE, "ExecMainStatus")])
            if state.get("ActiveState") == "active":
                return
            problem = (f"{ADDRESS_UNIT}: {state.get('ActiveState', 'not loaded')}, Result={state.get('Result')}, "
                       f"exit status {state.get('ExecMainStatus')}; journalctl -u {ADDRESS_UNIT} in the machine")
        else:
            added = self.run(["ip", "address", "add", f"{MACHINE_ADDRESS}/32", "dev", "lo"], purpose="boot-address")
            if added.exit_status == 0:
                return
            problem = f"{added.status_text()}: {added.stderr.strip()}"
        progress(f"{self.name}: could not add {MACHINE_ADDRESS} to its loopback interface ({problem}): "
                 "IPAddressDeny= checks stay on loopback")

    def shutdown(self) -> None:
        client, self._systemd = self._systemd, None
        try:
            if client is not None:
                client.close()
        finally:
            self._stop()

    @property
    def systemd(self) -> SystemdClient:
        if self._systemd is None:
            raise RuntimeError(f"machine {self.name} is not running")
        return self._systemd

    @property
    def running(self) -> bool:
        return self._systemd is not None

    # -- shared helpers -----------------------------------------------------------------------------------

    def twin(self) -> Machine | None:
        """A new machine like this one, not booted: the same configuration and image, so booted it is as this one
        was at its boot (the tested unit held back, nothing any test made). None where there can be no other (the
        host backend). The caller boots it and shuts it down."""
        return type(self)(self.config, boot_timeout=self.boot_timeout, image_cache=self.image_cache)

    def reload_units_soon(self) -> None:
        """The test's unit files changed (a retire removed its drop-ins): systemd reads them again before the next
        call that may read a unit's state, usually the next start's own reload, which then is the only one
        (:meth:`SystemdClient.reload_before_next_call`). At once where the machine's systemd outlives the run."""
        if self.SYSTEMD_OUTLIVES_RUN:
            self.systemd.reload()
        else:
            self.systemd.reload_before_next_call()

    def unit_prefix(self, purpose: str) -> str:
        """What every unit name :meth:`unit_name` gives for ``purpose`` starts with: a drop-in directory
        ``PREFIX.service.d/`` applies to all of them (systemd 246 and later)."""
        return f"harden-{purpose}-"

    def unit_name(self, purpose: str) -> str:
        """A unit name unique on this machine, readable in its journal."""
        return f"{self.unit_prefix(purpose)}{os.getpid()}-{next(self._units)}.service"

    def service_unit(self, unit: str) -> str:
        """The name a spec's service unit (``harden-NAME.service``) gets on this machine: the same on a machine of
        our own; the host backend makes it unique on a systemd that other runs share."""
        return unit

    def check_service(self, spec: Spec) -> None:
        """Raise BackendUnavailable, saying why, if starting ``spec``'s service here could harm the machine's owner
        (the host backend: a state directory that another service owns). A machine of our own allows anything."""

    def run(self, command: str | Sequence[str], properties: Sequence[Property] = (), *, stdin: bytes = b"",
            timeout: float = 60.0, purpose: str = "cmd", where: str | None = None) -> CommandResult:
        """Run ``command`` (a shell string or an argv) as a transient unit with ``properties``.

        A probe batch runs under this machine's :attr:`PROBE_GUARD`, whoever built it."""
        argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
        if self.PROBE_GUARD is not None:
            argv = guarded_batch(argv, self.PROBE_GUARD) or argv
        shown = command if isinstance(command, str) else shlex.join(argv)
        outcome = self.systemd.run(self.unit_name(purpose), argv, properties, stdin=stdin, timeout=timeout)
        stderr = outcome.stderr.decode(errors="replace")
        if outcome.timed_out:
            stderr += "\n" + timeout_note(timeout, outcome.signal)
        return CommandResult(
            command=shown,
            exit_status=outcome.exit_status,
            signal=outcome.signal,
            stdout=outcome.stdout.decode(errors="replace"),
            stderr=stderr,
            where=where or f"on machine {self.name} (unconfined)",
            duration=outcome.duration,
        )

    def tested(self) -> dict[str, Any]:
        """What this machine is, as reports say what was tested: backend, Debian release, systemd and kernel, and
        the installed version of every package the machine section names (``packages`` and the ``debs``' own).
        Asked of the machine itself once, so it is true on every backend (the host's own packages included)."""
        if self._tested is None:
            names = [*self.config.packages, *(deb_package_name(deb) for deb in self.config.debs)]
            script = ('uname -r; . /etc/os-release; echo "${VERSION_CODENAME:-$ID}"; '
                      "dpkg-query -W -f '${binary:Package}\\t${Version}\\n' \"$@\" 2>/dev/null; true")
            result = self.run(["/bin/sh", "-c", script, "sh", *names], purpose="tested")
            kernel, release, *rows = result.stdout.splitlines() + ["", ""]
            installed = dict(row.split("\t", 1) for row in rows if "\t" in row)
            wanted = {name: installed.get(name) or installed.get(name.partition(":")[0]) or "not installed"
                      for name in names}
            self._tested = {"backend": self.NAME, "release": release, "kernel": kernel,
                            "systemd": str(self.systemd.manager_property("Version")), "packages": wanted}
        return self._tested

    def journal(self, unit: str, lines: int = 25, invocation: str | None = None) -> str:
        """The last ``lines`` journal lines of ``unit`` on this machine; only one run of it, given ``invocation``."""
        # systemd's own messages about a unit carry INVOCATION_ID=, the unit's processes _SYSTEMD_INVOCATION_ID=.
        match = [f"_SYSTEMD_INVOCATION_ID={invocation}", "+", f"INVOCATION_ID={invocation}"] if invocation \
            else ["-u", unit]
        result = self.run(["journalctl", "--no-pager", "-q", "-o", "short-monotonic", "-n", str(lines), *match],
                          purpose="journal")
        return result.stdout.rstrip()
