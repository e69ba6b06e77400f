"""The default backend: a cached Debian rootfs booted with systemd-nspawn.

The image is never modified (the machine boots it under a writable layer in memory, its own:
:meth:`NspawnMachine._mount_plan`), the container has only a loopback interface (``--private-network``) so
nothing a service or probe does reaches the host's network, and it runs in a cgroup
of its own that is killed and removed on shutdown (and by the next run, if this one was killed).

The container runs in a user namespace of its own (see :mod:`~pytest_systemd_harden.machine.backends.userns`): its root
has no power over the host's kernel, cgroups or bound files. ``machine: {privileged: true}`` turns that off, for the
directives that need host BPF, and the boot line says so.
"""

from __future__ import annotations

import collections
import itertools
import os
import re
import resource
import shutil
import socket
import stat
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import BackendUnavailable, ImageBuildError, MachineError
from ...in_tree import InTree
from ...probes.inside import GUARD_KERNEL
from .. import bpf_delegation, mounts
from ..bpf_delegation import BpfDelegate
from ..cgroups import Contained, host_runs_systemd, output_lines
from ..images import (
    BOOT_GENERATOR,
    BOOT_GENERATOR_PATH,
    HOLD_ARGUMENT,
    Image,
    boot_units,
    enforcement_identity,
    package_version,
)
from ..staging import remove_tree, write_atomically
from ..systemd import SocketConnector
from . import userns
from .base import Machine, Progress, proportional_set_size

_BUS = "run/dbus/system_bus_socket"  # in the machine's tree

__all__ = ["NspawnMachine", "check_available", "host_runs_systemd", "remove_runtime_directory",
           "sweep_runtime_leftovers"]

# What systemd-nspawn keeps on the host per machine while it runs, removed when it exits cleanly: the directory
# through which mounts propagate into the container (/run/host/incoming there). One that is SIGKILLed (a container
# that would not power off in time, a killed run) leaves it.
NSPAWN_RUNTIME = Path("/run/systemd/nspawn")
# A machine's writable layer: a tmpfs as large as nspawn makes a volatile root's (a quarter of memory, a million
# inodes; written pages count against the machine's memory cap).
WRITABLE_LAYER_OPTIONS = "mode=0755,size=25%,nr_inodes=1m"
RUNTIME_KINDS = ("propagate", "unix-export")
# Our machines' names (Machine.name): only such directories are ever removed.
OUR_MACHINE = re.compile(r"harden-[0-9a-f]{8}")


# The resource-limit ceiling of the container, as a host's systemd has it. The container's PID 1 inherits this
# process's hard limits and, without CAP_SYS_RESOURCE in the host's namespace, cannot raise a service's Limit*=
# above them (LimitNOFILE=65536 came out 20000 here); a host's PID 1 is root and can. Raised only where a higher
# limit costs the host nothing unbounded: open files to the kernel's own maximum (fs.nr_open), locked memory and
# message queues (both charged to the machine's memory cap). RLIMIT_NICE and RLIMIT_RTPRIO stay: they would give
# a service scheduling power over the host's CPUs.
RAISED_RLIMITS = ("NOFILE", "MEMLOCK", "MSGQUEUE")


CAP_SYS_RESOURCE = 24


def can_raise_limits() -> bool:
    """Whether this process may raise hard limits (CAP_SYS_RESOURCE): not in every CI sandbox, even as root."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    effective = next((line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), "0")
    return bool(int(effective, 16) >> CAP_SYS_RESOURCE & 1)


def rlimit_options() -> list[str]:
    """``--rlimit=`` options raising the container's hard limits to a host's ceiling; soft limits stay as they are.
    None where this process cannot raise its own: the container's ceiling is then this process's hard limits, and
    a Limit*= above them is reported clamped to that ceiling."""
    if not can_raise_limits():
        return []
    options = []
    for name in RAISED_RLIMITS:
        which = getattr(resource, f"RLIMIT_{name}")
        soft, _hard = resource.getrlimit(which)
        if name == "NOFILE":
            ceiling = str(_nr_open())
            soft_shown = str(min(soft, int(ceiling))) if soft != resource.RLIM_INFINITY else ceiling
        else:
            ceiling = "infinity"
            soft_shown = "infinity" if soft == resource.RLIM_INFINITY else str(soft)
        options.append(f"--rlimit=RLIMIT_{name}={soft_shown}:{ceiling}")
    return options


def _nr_open() -> int:
    try:
        return int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        return 1 << 20  # the kernel's default


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
    # The host uid of the container's root (None: privileged, no user namespace).
    uid_base: int | None = field(default=None, init=False)
    # Bound files keep their owners inside (idmapped binds), unless the host filesystem cannot idmap: then they
    # show as nobody, readable only where their modes let anyone read them.
    idmapped_files: bool = field(default=True, init=False)
    # The image is booted through an idmapped mount of itself (userns.idmapped), not a shifted copy.
    _idmapped: bool = field(default=False, init=False, repr=False)
    # The trees a layered image is joined from on its rootfs directory, top first (shifted copies where the image
    # cannot be idmapped); empty for an image built in full.
    _layers: tuple[Path, ...] = field(default=(), init=False, repr=False)
    _bus_root: Path | None = field(default=None, init=False, repr=False)
    # The machine's generator's file on the host (see _boot_generator_file), bound into every machine where the
    # cache has it.
    _boot_generator: Path | None = field(default=None, init=False, repr=False)
    image: Image | None = field(default=None, init=False, repr=False)
    # A user-namespaced machine's bpf() calls, made for it under strict rules (machine/bpf_delegation.py) so
    # that IPAddressDeny=/IPAddressAllow= work as on a host; why not, where they are not delegated.
    _bpf: BpfDelegate | None = field(default=None, init=False, repr=False)
    bpf_not_delegated: str = field(default="", init=False)

    def command_line(self, rootfs: Path) -> list[str]:
        idmap = ":idmap" if self.uid_base is not None and self.idmapped_files else ""
        binds = [f"--bind-ro={host}:{dest}{idmap}" for dest, host in self.config.files]
        if self._boot_generator is not None:
            # Idmapped only where the image is (the cache's filesystem can be then); else owned by nobody inside,
            # which is as good for a program its mode lets anyone run.
            generator_idmap = ":idmap" if self._idmapped else ""
            binds.append(f"--bind-ro={self._boot_generator}:{BOOT_GENERATOR_PATH}{generator_idmap}")
        users = [] if self.uid_base is None else [
            f"--private-users={self.uid_base}:{userns.RANGE}", "--private-users-ownership=off",
            # CAP_SYSLOG, which nspawn leaves out, so that ProtectKernelLogs= has a capability to drop from a
            # service's bounding set, as on a host. Harmless here: the kernel checks it in the host's user
            # namespace (syslog(), /dev/kmsg, kptr_restrict), where the container's root has no capability.
            "--capability=CAP_SYSLOG"]
        return [
            "systemd-nspawn", "--quiet", "--boot",
            "--directory", str(rootfs), "--machine", self.name,
            "--register=no", "--keep-unit",  # no machined here; our own cgroup instead
            "--private-network",  # only lo: nothing inside reaches the host's network
            "--link-journal=no", "--resolv-conf=off", "--timezone=off",
            "--console=read-only",
            # IPAddressDeny= and friends need bpf() inside; nspawn's own filter blocks it by default. @clock and
            # @module pass nspawn's filter so that ProtectClock=/ProtectKernelModules= have something to deny: the
            # kernel still refuses every change (the container has neither CAP_SYS_TIME nor CAP_SYS_MODULE on the
            # host), but a read-only adjtimex() or an empty module image now reaches it, as on a host.
            "--system-call-filter=bpf @clock @module",
            *rlimit_options(),
            *users,
            *binds,
            # Arguments for the container's systemd, which reads them as its kernel command line.
            *(f"systemd.mask={unit}" for unit in self.masked_at_boot),
            *(f"{HOLD_ARGUMENT}={unit}" for unit in self.held_at_boot),
        ]

    def _boot_generator_file(self) -> Path:
        """The machine's generator's file on the host (images.BOOT_GENERATOR), in the image cache (the same text
        for every machine); OSError where the cache is read-only and has none yet."""
        path = self.image_cache.cache_dir / "boot-generator"
        if not path.is_file() or path.read_text() != BOOT_GENERATOR or path.stat().st_mode & 0o777 != 0o755:
            write_atomically(path, BOOT_GENERATOR, mode=0o755)  # executable before it is there to bind
        return path

    def _start(self, progress: Progress) -> str:
        check_available()
        self.config.check_files()
        image = self.image = self.image_cache.get(self.config.packages, progress, release=self.config.release,
                                                  debs=self.config.debs)
        rootfs = image.rootfs
        self._layers = image.layers
        tree = image.tree()
        self.masked_at_boot, self.held_at_boot = boot_units(self.config, tree)
        try:
            self._boot_generator = self._boot_generator_file()
            self.address_at_boot = True
        except OSError as exc:
            if self.held_at_boot:
                progress(f"{self.name}: {', '.join(self.held_at_boot)} starts at boot as installed, without the "
                         f"drop-in: the generator that holds it back cannot be written to the cache ({exc})")
            self.held_at_boot = ()
        if not self.config.privileged:
            self.uid_base = userns.base_for(image.key)
            if userns.idmap_refused(image.rootfs) is None:
                self._idmapped = True  # the image itself, seen through an idmapped mount in nspawn's namespace
            elif self._layers:
                self._layers = tuple(userns.shifted_rootfs(layer, self.uid_base) for layer in self._layers)
            else:
                rootfs = userns.shifted_rootfs(image.rootfs, self.uid_base)
        try:
            return self._launch(rootfs)
        except MachineError:
            unmappable = "Failed to map ids for bind mount" in self.boot_log()
            if not (self.uid_base is not None and self.config.files and unmappable):
                raise
        progress(f"{self.name}: the filesystem of machine.files cannot be idmapped: bound files show as owned by "
                 "nobody in the machine")
        self.idmapped_files = False
        return self._launch(rootfs)

    def _launch(self, rootfs: Path) -> str:
        self._console.clear()
        command = self.command_line(rootfs)
        channel: tuple[socket.socket, socket.socket] | None = None
        if self.uid_base is None:
            self.bpf_not_delegated = "privileged: the machine's systemd loads its BPF programs itself"
        elif os.environ.get("HARDEN_BPF_DELEGATION", "on") == "off":
            self.bpf_not_delegated = "switched off (HARDEN_BPF_DELEGATION=off)"
        else:
            self.bpf_not_delegated = bpf_delegation.supported() or ""
        plan = self._mount_plan(rootfs)
        if not self.bpf_not_delegated:
            channel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            plan.append(bpf_delegation.listener_step(channel[1].fileno()))
        command = mounts.then(plan, command)
        try:
            # If the test process dies without cleaning up, the container is shut down with it.
            # No lock on the image: nspawn locks a tree it boots without --volatile for its use alone, but the
            # tree is this machine's own overlay; the image under it is read by many at once and written by none.
            self._contained = Contained.start(command, "machine", self.name, stdin=subprocess.DEVNULL,
                                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                              env={**os.environ, "SYSTEMD_NSPAWN_LOCK": "0"},
                                              pass_fds=(channel[1].fileno(),) if channel else ())
        finally:
            if channel is not None:
                channel[1].close()
        threading.Thread(target=self._collect_console, name=f"console {self.name}", daemon=True).start()
        if channel is not None:
            self._start_bpf_delegate(channel[0])
        try:
            return self._wait_for_bus()
        except BaseException:
            self._stop()
            raise

    def _mount_plan(self, rootfs: Path) -> list[dict[str, object]]:
        """The tree nspawn boots, made in a mount namespace that nspawn alone lives in (machine/mounts.py): the image
        (each of its layers) idmapped to the machine's uids, under a writable layer in memory that is the machine's
        own (a tmpfs), all joined by one overlay on ``rootfs``. What nspawn's ``--volatile=overlay``
        would do, but for the owner of the layer's top directory: nspawn makes it as host root, which a
        user-namespaced machine sees as ``nobody`` at its ``/``; systemd-tmpfiles then refuses every line of every
        tmpfiles.d file at boot ("unsafe path transition"), and a package's runtime directories are never made,
        where a host makes them."""
        lower = [str(layer) for layer in self._layers or (rootfs,)]
        return [{"machine_tree": str(rootfs), "lower": lower, "base": self.uid_base if self._idmapped else None,
                 "options": WRITABLE_LAYER_OPTIONS, "owner": self.uid_base or 0}]

    def _start_bpf_delegate(self, channel: socket.socket) -> None:
        assert self._contained is not None
        try:
            listener = bpf_delegation.receive_listener(channel)
        except OSError as exc:
            self.bpf_not_delegated = f"the filter that hands the machine's bpf() calls over was refused ({exc})"
            return
        finally:
            channel.close()
        cgroup2 = self._contained.cgroup2_path()
        if cgroup2 is None:
            os.close(listener)  # the machine's bpf() calls now fail with ENOSYS, as they would without BPF
            self.bpf_not_delegated = "the machine has no cgroup2 group of its own to attach BPF programs to"
            return
        self._bpf = BpfDelegate(listener, cgroup2, self.name, log=self._console.append)

    def boot(self, progress: Progress = lambda line: None) -> None:
        super().boot(progress)
        self.add_machine_address(progress)

    def capability_identity(self) -> dict[str, object]:
        # The command line decides what the container may do (namespaces, syscall filter, capabilities, user
        # namespacing): every flag as it runs, so changing one is a new key. Left out is only what names this one
        # machine - its name, the rootfs path and the uid range its files are shifted to (the image's identity
        # stands for them), the spec's files bound read-only (their content is not what the kernel enforces) and
        # which units are masked or held back at boot (the spec's package units: what starts, not what is enforced).
        assert self.image is not None, "capability_identity() of a container not started"
        bound = [source for _dest, source in self.config.files]
        boot_only = ("systemd.mask=", f"{HOLD_ARGUMENT}=", BOOT_GENERATOR_PATH)
        uid_range = f"--private-users={self.uid_base}:"
        argv = [arg.replace(str(self.image.rootfs), "{rootfs}").replace(self.name, "{machine}")
                .replace(uid_range, "--private-users={uid base}:")
                for arg in self.command_line(self.image.rootfs)
                if not any(source in arg for source in bound) and not any(part in arg for part in boot_only)]
        return {"backend": self.NAME, "command_line": argv, "image": enforcement_identity(self.image),
                # From the image's manifest; an image of an older recipe has no versions there: its dpkg database.
                "systemd": self.image.systemd_version or package_version(self.image.tree(), "systemd"),
                "bpf_delegated": self.bpf_not_delegated or bpf_delegation.RULES_VERSION}

    def _collect_console(self) -> None:
        assert self._contained is not None and self._contained.process.stdout is not None
        for line in output_lines(self._contained.process.stdout):  # the image's text: printable, bounded
            self._console.append(line)

    def boot_log(self) -> str:
        return "\n".join(self._console)

    def describe(self) -> str:
        caps = f"; {self._contained.caps.describe()}" if self._contained is not None else ""
        if not can_raise_limits():
            nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            caps += (f"; Limit*= ceiling: this process's hard limits (open files {nofile}): it lacks CAP_SYS_RESOURCE "
                     "to raise them")
        if self.uid_base is None:
            return ("nspawn, PRIVILEGED: no user namespace, container root is host root (machine.privileged: for "
                    f"the directives that need host BPF){caps}")
        bpf = ("BPF firewall programs loaded for the machine by the test process (CGROUP_SKB on its own cgroups "
               "only)" if self._bpf is not None else f"no BPF: {self.bpf_not_delegated}")
        image = "the image idmapped" if self._idmapped else "a uid-shifted copy of the image"
        return f"nspawn, user namespace: container root is uid {self.uid_base} on the host ({image}); {bpf}{caps}"

    def _bus_connector(self) -> SocketConnector | None:
        # Never the kernel's resolution of the path as host root: a link the machine made at its bus socket's path
        # would lead there to a host socket (see userns.connect_as). A privileged machine connects as host root,
        # which is its root.
        base, root = self.uid_base, self._bus_root
        if root is None:
            return None
        return lambda: userns.connect_as(root, _BUS, 0 if base is None else base)

    def cap_counters(self) -> dict[str, int]:
        return self._contained.cap_counters() if self._contained is not None else {}

    def caps_hit(self, before: dict[str, int]) -> list[str]:
        return self._contained.caps_hit(before) if self._contained is not None else []

    def resident_memory(self) -> int | None:
        """PSS of every process in the container's cgroup: shared pages (the cached image's libraries, mapped by
        every container) are counted in proportion, so machines can be summed."""
        if self._contained is None or self._contained.cgroup is None:
            return None
        return proportional_set_size(self._contained.pids())

    def host_pids(self) -> set[int] | None:
        if self._contained is None or self._contained.cgroup is None:
            return None
        return self._contained.pids()

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
                    root = Path(f"/proc/{pid}/root")
                    if InTree(root, running=True).kind(_BUS) == stat.S_IFSOCK:  # resolved as the machine does
                        self.leader = pid
                        self._bus_root = root
                        return f"unix:path={root / _BUS}"  # for the record: the connector connects (see there)
                except OSError:
                    continue
            time.sleep(0.02)
        raise MachineError(f"container {self.name} did not bring up its system bus within {self.boot_timeout:.0f}s:\n"
                           f"{self.boot_log()}")

    def _stop(self) -> None:
        contained, self._contained = self._contained, None
        if contained is not None:
            contained.stop()  # SIGTERM: nspawn asks the container's systemd to power off; SIGKILL if it hangs
            remove_runtime_directory(self.name)  # nspawn is gone: what it left is ours to remove
        delegate, self._bpf = self._bpf, None
        if delegate is not None:  # after the machine: its systemd detaches its programs while it powers off
            delegate.stop()
        self.leader = None
        self._bus_root = None


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


def remove_runtime_directory(name: str, runtime: Path = NSPAWN_RUNTIME) -> list[str]:
    """Remove what systemd-nspawn keeps on the host for machine ``name`` (which must not run); return the paths
    removed. Never one of another name than ours, and never across a mount point (it is left, and named)."""
    if not OUR_MACHINE.fullmatch(name):
        return []
    removed = []
    for kind in RUNTIME_KINDS:
        path = runtime / kind / name
        if not path.is_dir() or path.is_symlink():
            continue
        try:
            remove_tree(path)  # never across a mount point
        except ImageBuildError as exc:
            raise MachineError(str(exc)) from None
        removed.append(str(path))
    return removed


def _running_machines() -> set[str]:
    """Names of the machines a systemd-nspawn process runs now (``--machine NAME`` on its command line)."""
    names = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for flag, value in itertools.pairwise(argv):
            if flag in (b"--machine", b"-M"):
                names.add(value.decode(errors="replace"))
            elif flag.startswith(b"--machine="):
                names.add(flag.split(b"=", 1)[1].decode(errors="replace"))
    return names


def sweep_runtime_leftovers(runtime: Path = NSPAWN_RUNTIME) -> list[str]:
    """Remove nspawn runtime directories of our machines that no systemd-nspawn runs any more (left by a killed
    run); return the paths removed. Machines of live runs (other xdist workers, other CI jobs) are not touched."""
    leftovers = {entry.name for kind in RUNTIME_KINDS if (runtime / kind).is_dir()
                 for entry in (runtime / kind).iterdir() if OUR_MACHINE.fullmatch(entry.name)}
    if not leftovers:
        return []
    alive = _running_machines()  # listed after the directories: a machine started meanwhile is not among them
    removed = []
    for name in sorted(leftovers - alive):
        try:
            removed += remove_runtime_directory(name, runtime)
        except MachineError:
            continue  # a mount there: left as it is, for a person to look at
    return removed
