"""The host backend: the host's own systemd, where PID 1 is systemd and pytest runs as root (a CI runner, a laptop).

No container and no image: the service, its inside commands and the probes are transient units of the host's
systemd, reached over the host's system bus. That is the cheapest backend where it works, and the most dangerous
one, because the machine is somebody's real host. So it keeps to three rules.

**Names.** Every unit it starts is named ``harden-host-XXXXXX-...`` after its machine (``XXXXXX`` random): commands
``harden-host-XXXXXX-PURPOSE-N.service``, the spec's service ``harden-host-XXXXXX-NAME.service`` (whose dynamic
user, named after it, is unique too). Two xdist workers or two CI jobs on one host never share a unit name.

**Cleanup.** When the machine shuts down, every loaded unit named after it is stopped, reset and cleaned (its
State/Cache/Logs/Runtime/ConfigurationDirectory= removed, as between tests), and the rendered units of the
exposure item under ``/run/harden-exposure/harden-host-XXXXXX-*`` are removed. A run that was killed cannot do
that; its units lose their bus references when its connection dies (systemd's ``Refs``), so the next host machine
to boot stops every transient ``harden-host-*`` service that nobody references any more. Only such units: a
unit of a live run always carries its run's reference, and the host's own units are not transient.

**Refusals.** It refuses, before starting anything, what could change the host beyond the test's own units:

* ``machine.packages``: nothing is installed; a package that is missing is named, with ``apt-get install``.
* ``machine.files``: nothing is mounted; the destination must already hold the same content (a copy or a bind
  mount made by the CI job), else the message says how to put it there.
* ``StateDirectory=``, ``CacheDirectory=``, ``LogsDirectory=``, ``RuntimeDirectory=``, ``ConfigurationDirectory=``
  naming a directory that already exists on the host: it would be shared with whatever owns it, and removed with
  ``systemctl clean`` at the end of every test (a real service's data). Checked at every start, so the
  diagnosis' and tighten's variants are held to it too.
* ``RemoveIPC=`` (implied by ``DynamicUser=``) with ``User=`` or ``Group=`` an account of the host: stopping the
  service would remove every IPC object of that account, those of its real processes included.

**Probes.** Every probe batch this machine runs is switched to careful mode (its ``PROBE_GUARD``, applied by
:meth:`Machine.run <.base.Machine.run>` to every batch, so no caller can forget it). The control runs are unconfined
root on the real host, and the sandbox runs are no safer where the spec is weak, so careful mode applies to every batch.
The argument, per probe kind (the ordinary mode is in ``docs/probes.md``):

* ``write``: a directory gets an unnamed file (``O_TMPFILE``), which never appears in it (no inotify event, no
  leftover if the probe is killed) and vanishes at close; where the filesystem has none, ``access(2)`` (which
  reports a read-only mount as EROFS). An existing file is never opened for writing (closing it would wake
  inotify watchers such as path units): ``access(2)``. A missing path is never created: an unnamed file in its
  parent. Devices and FIFOs: ``access(2)``, as in the ordinary mode.
* ``read``: directories are listed and regular files read (64 bytes), but devices and FIFOs are never opened
  (opening ``/dev/watchdog`` starts its countdown; a FIFO's waiting writer would lose its data) and files under
  /proc and /sys are opened, never read (reading /proc/kmsg takes the kernel's messages from the log daemon).
* ``exec``: nothing is placed or run; the directory's noexec mount flag decides.
* ``setuid-bit``: ``fchmod`` on an unnamed file (RestrictSUIDSGID= filters fchmod too); not tried where the
  scratch filesystem has no unnamed files. ``umask``: read from /proc/self/status; no file.
* ``socket``: families the kernel cannot lack (AF_UNIX, AF_INET, AF_NETLINK) and those already loaded (in
  /proc/net/protocols or /sys/module); any other is not tried, because ``socket(2)`` would load its module.
* ``allocate``/``tasks`` (MemoryMax=, TasksMax=): the control run is unconfined, so at most a quarter of the
  host's available memory is touched and at most 512 threads are started; beyond that, not tried.
* ``connect``/``bind``: loopback only (the spec loader allows nothing else; careful mode checks again): an empty
  UDP datagram or a TCP connection closed at once, a bind closed without listening.
* ``syscall``: unchanged, harmless by their arguments on any machine: each call fails in the kernel before it acts
  (mount on a missing path, reboot with a bad magic, a 65-byte host name, a negative time, an empty module image,
  kexec with too many segments, semget of zero semaphores...) or changes nothing (setresuid(-1, -1, -1), setrlimit
  to its current value, adjtimex and syslog only reading), see ``_harmless_call`` in
  :mod:`~pytest_systemd_harden.probes.inside`.
* ``namespace``, ``personality``, ``realtime``, ``memory``, ``abi32``: confined to the probe's own process or a
  child that exits at once. ``status``, ``limits``, ``cgroup``, ``identity``, ``filesystem``, ``interfaces``,
  ``block-devices``: reads only.

A probe careful mode does not try is an error ("not tried on the host backend: ..."), so its enforcement checks
are unverifiable with that reason, never passed.

What it does not refuse: the service under test and the scenarios' commands run on the host as the spec says
(``client:`` commands as root): that is what the host backend is for. Two runs of the *same* spec at once on one
host still meet in what the service itself claims (its port, its StateDirectory=).
"""

from __future__ import annotations

import grp
import os
import pwd
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dbus_next.errors import DBusError

from ...errors import BackendUnavailable
from ...probes.inside import GUARD_HOST
from ...probes.runner import INTERPRETER
from ...result import CommandResult
from ...spec.load import Spec
from ..staging import remove_tree
from ..systemd import Property, SystemdClient
from .base import EXPOSURE_UNIT_DIR, Machine, Progress
from .nspawn import host_runs_systemd

BUS_SOCKET = "/run/dbus/system_bus_socket"
FAMILY = "harden-host-"  # every unit name of this backend starts so, and nothing else's does

# Where systemd puts each kind of directory a unit asks for; "private" holds a dynamic user's.
DIRECTORY_ROOTS = {
    "StateDirectory": ("/var/lib", "/var/lib/private"),
    "CacheDirectory": ("/var/cache", "/var/cache/private"),
    "LogsDirectory": ("/var/log", "/var/log/private"),
    "RuntimeDirectory": ("/run",),
    "ConfigurationDirectory": ("/etc",),
}
YES = ("yes", "true", "on", "1")


def _pid1() -> str:
    try:
        return Path("/proc/1/comm").read_text().strip()
    except OSError:
        return "unknown"


def check_available() -> None:
    """Raise BackendUnavailable with the fix when this host cannot be the machine."""
    if os.geteuid() != 0:
        raise BackendUnavailable("the host backend needs root (it starts units of the host's systemd): run pytest as "
                                 "root, e.g. sudo -E pytest")
    if not host_runs_systemd():
        raise BackendUnavailable(f"the host backend needs systemd as PID 1, and PID 1 here is {_pid1()}; use "
                                 "--harden-backend=nspawn")
    if not Path(BUS_SOCKET).exists():
        raise BackendUnavailable(f"the host's system bus is not running ({BUS_SOCKET} is missing): apt-get install "
                                 "dbus, or use --harden-backend=nspawn")
    if not Path(INTERPRETER).exists():
        raise BackendUnavailable(f"the host backend runs its probes and readiness checks with {INTERPRETER} on the "
                                 "host, which is missing: apt-get install python3")


@dataclass
class HostMachine(Machine):
    NAME = "host"
    PROBE_GUARD = GUARD_HOST
    WRITES_UNIT_FILES = False  # the host's own systemd: a diagnosis' drop-in is not verified as a file here
    SYSTEMD_OUTLIVES_RUN = True

    name: str = field(default_factory=lambda: f"{FAMILY}{secrets.token_hex(3)}")
    # Host paths of *Directory= directives that did not exist when a service of ours first asked for them: made by
    # our units, so ours to reuse and to clean.
    _own_directories: set[str] = field(default_factory=set, init=False, repr=False)

    # -- lifecycle ----------------------------------------------------------------------------------------

    def _start(self, progress: Progress) -> str:
        check_available()
        missing = missing_packages(self.config.packages)
        if missing:
            shown = " ".join(missing)
            raise BackendUnavailable(f"the host backend uses this host as it is, and it lacks packages that "
                                     f"machine.packages lists: {shown}; install them (sudo apt-get install -y "
                                     f"{shown}) or use --harden-backend=nspawn")
        if self.config.debs:
            raise BackendUnavailable("the host backend uses this host as it is and installs nothing: machine.debs "
                                     f"({', '.join(Path(d).name for d in self.config.debs)}) needs "
                                     "--harden-backend=nspawn or qemu, or install them here yourself and drop debs:")
        self.config.check_files()
        for dest, source in self.config.files:
            check_file(dest, source)
        return f"unix:path={BUS_SOCKET}"

    def capability_identity(self) -> dict[str, object]:
        # The host's own systemd runs everything (its kernel is in every key already).
        version = subprocess.run(["systemctl", "--version"], capture_output=True, text=True, check=False)
        return {"backend": self.NAME, "systemd": version.stdout.split("\n", 1)[0]}

    def boot(self, progress: Progress = lambda line: None) -> None:
        super().boot(progress)
        try:
            for unit in sweep_orphans(self.systemd):
                progress(f"stopped {unit}, left running on this host by a killed run")
        except BaseException:
            self.shutdown()
            raise

    def shutdown(self) -> None:
        client = self._systemd
        try:
            if client is not None:
                # While our references still keep the service loaded: stopped, then its directories cleaned.
                self._stop_units(client, clean=True)
        finally:
            super().shutdown()

    def twin(self) -> None:
        return None  # there is one host

    def _stop(self) -> None:
        # After the bus connection closed (or a failed boot): whatever is still loaded is stopped, with a
        # connection of its own; and the exposure item's rendered units go.
        try:
            client = SystemdClient(f"unix:path={BUS_SOCKET}")
            try:
                client.connect()
                self._stop_units(client, clean=False)
            finally:
                client.close()
        finally:
            for path in Path(EXPOSURE_UNIT_DIR).glob(f"{self.name}-*"):
                remove_tree(path)
            try:
                Path(EXPOSURE_UNIT_DIR).rmdir()  # once no run's units are left in it
            except OSError:
                pass

    def _stop_units(self, client: SystemdClient, *, clean: bool) -> None:
        for unit, _active, _sub in client.list_units(f"{self.name}-*"):
            client.retire_unit(unit, clean=clean)  # with clean: only a unit we still reference is loaded: the service

    # -- names and commands -------------------------------------------------------------------------------

    def unit_name(self, purpose: str) -> str:
        return f"{self.name}-{purpose}-{next(self._units)}.service"

    def service_unit(self, unit: str) -> str:
        return f"{self.name}-{unit.removeprefix('harden-')}"

    def run(self, command: str | Sequence[str], properties: Sequence[Property] = (), *, stdin: bytes = b"",
            timeout: float = 60.0, purpose: str = "cmd", where: str | None = None) -> CommandResult:
        """As on any machine, but saying that it runs on this host."""
        return super().run(command, properties, stdin=stdin, timeout=timeout, purpose=purpose,
                           where=where or f"on this host, unconfined (machine {self.name})")

    # -- refusals -----------------------------------------------------------------------------------------

    def check_service(self, spec: Spec) -> None:
        problems = [*self._foreign_directories(spec), *ipc_problems(spec, ours=self.name)]
        if spec.service.unit_name:
            problems.append(f"{spec.service.unit_name} would be tested with a drop-in written into this host's "
                            "/etc/systemd/system, which the host backend never writes")
        if problems:
            raise BackendUnavailable(
                f"the host backend will not start the service of {spec.path.name} on this host:\n"
                + "\n".join(f"  - {problem}" for problem in problems)
                + "\n  (or use --harden-backend=nspawn, where the machine is a container of its own)")
        self._own_directories.update(path for _directive, path in directory_paths(spec))

    def _foreign_directories(self, spec: Spec) -> list[str]:
        found = []
        for directive, path in directory_paths(spec):
            if path not in self._own_directories and os.path.lexists(path):
                found.append(f"{directive}: {path} already exists on this host. The service would share it with "
                             "whatever made it, and every test ends with systemctl clean, which removes it. If it is "
                             f"left over from a killed run of these tests, remove it (rm -rf {path})")
        return found


# --- what the refusals check (plain functions, tested without a host) ----------------------------------------------

def missing_packages(packages: Sequence[str]) -> list[str]:
    """Those of ``packages`` that dpkg does not list as installed."""
    if not packages:
        return []
    dpkg = shutil.which("dpkg-query")
    if dpkg is None:
        raise BackendUnavailable(f"machine.packages lists Debian packages ({', '.join(packages)}), and this host has "
                                 "no dpkg-query to check them: the host backend runs such specs on Debian or Ubuntu "
                                 "hosts; use --harden-backend=nspawn")
    listed = subprocess.run([dpkg, "-W", "-f", "${Package} ${db:Status-Status}\n", *packages],
                            capture_output=True, text=True, check=False).stdout
    installed = {line.split()[0] for line in listed.splitlines() if line.endswith(" installed")}
    return [package for package in packages if package not in installed]


def check_file(dest: str, source: str) -> None:
    """Raise unless ``dest`` on the host already is ``source`` (an existing file: MachineConfig.check_files), the
    same file or the same content."""
    difference = content_difference(Path(dest), Path(source))
    if difference is None:
        return
    how = f"sudo mkdir -p {Path(dest).parent} && sudo cp -rT {source} {dest}" if Path(source).is_dir() \
        else f"sudo install -D -m 644 {source} {dest}"
    raise BackendUnavailable(
        f"machine.files puts {source} at {dest}, and the host backend mounts nothing on the host: {difference}. "
        f"Put it there before the tests ({how}, or a read-only bind mount; not a symlink into /home, which "
        "ProtectHome= hides from the service), or use --harden-backend=nspawn")


def content_difference(dest: Path, source: Path) -> str | None:
    """None if ``dest`` is ``source`` or holds the same content (``__pycache__`` aside); else how they differ."""
    if not dest.exists():
        return f"{dest} does not exist here"
    if dest.samefile(source):
        return None
    if source.is_dir() != dest.is_dir():
        return f"{dest} is {'a directory' if dest.is_dir() else 'a file'}, {source} is not"
    if not source.is_dir():
        return None if dest.read_bytes() == source.read_bytes() else f"{dest} differs from {source}"

    def tree(top: Path) -> dict[str, Path]:
        return {str(p.relative_to(top)): p for p in top.rglob("*") if "__pycache__" not in p.parts}

    have, want = tree(dest), tree(source)
    missing = sorted(set(want) - set(have))
    if missing:
        return f"{dest} lacks {', '.join(missing[:3])}" + (" and more" if len(missing) > 3 else "")
    extra = sorted(set(have) - set(want))
    if extra:
        return f"{dest} has {', '.join(extra[:3])}, which {source} has not"
    for name, path in sorted(want.items()):
        if path.is_dir() != have[name].is_dir() or (not path.is_dir() and path.read_bytes() != have[name].read_bytes()):
            return f"{dest / name} differs from {path}"
    return None


def directory_paths(spec: Spec) -> list[tuple[str, str]]:
    """(directive, host path) for every directory the spec's *Directory= directives make, at its top level."""
    found = []
    for directive in spec.hardening:
        roots = DIRECTORY_ROOTS.get(directive.name)
        if roots is None:
            continue
        for assignment in directive.assignments:
            for entry in assignment.split():
                for name in entry.split(":"):  # "dir:symlink" (systemd 250+) makes both
                    top = name.strip("/").split("/")[0]
                    if top:
                        found += [(f"{directive.name}={assignment}", f"{root}/{top}") for root in roots]
    return found


def _account_exists(name: str, database: str) -> bool:
    """Whether the host knows user (``passwd``) or group (``group``) ``name``, a name or a number."""
    lookups = {"passwd": (pwd.getpwuid, pwd.getpwnam), "group": (grp.getgrgid, grp.getgrnam)}
    by_number, by_name = lookups[database]
    try:
        by_number(int(name)) if name.isdigit() else by_name(name)
    except KeyError:
        return False
    return True


def ipc_problems(spec: Spec, *, ours: str) -> list[str]:
    """RemoveIPC= (or DynamicUser=, which implies it) with a User= or Group= that is an account of this host."""
    flags = {name: spec.directive(name) for name in ("RemoveIPC", "DynamicUser")}
    given = [name for name, directive in flags.items() if directive is not None and directive.value.lower() in YES]
    if not given:
        return []
    why = "RemoveIPC=yes" if "RemoveIPC" in given else "RemoveIPC= (implied by DynamicUser=yes)"
    problems = []
    for directive_name, database in (("User", "passwd"), ("Group", "group")):
        directive = spec.directive(directive_name)
        if directive is None:
            continue
        account = directive.value
        # root is exempt from RemoveIPC=; our own dynamic users are named after our units.
        if account in ("root", "0") or account.startswith(ours) or not _account_exists(account, database):
            continue
        problems.append(f"{why} with {directive_name}={account}, an account of this host: stopping the service "
                        f"would remove every System V and POSIX IPC object {account} owns on the host, those of its "
                        "real processes too")
    return problems


def sweep_orphans(client: SystemdClient) -> list[str]:
    """Stop the services that killed runs of this backend left running; return their names.

    A unit qualifies only if it is transient, named ``harden-host-*`` and referenced by no bus client: every unit a
    live run starts carries that run's reference (AddRef) until the run has read its result or stopped it.
    """
    stopped = []
    for unit, active, _sub in client.list_units(f"{FAMILY}*.service"):
        if active == "inactive":
            continue  # nothing runs; systemd collects it
        try:
            properties = client.unit_properties(unit)
        except DBusError:  # collected meanwhile
            continue
        if not properties.get("Transient") or properties.get("Refs"):
            continue
        client.stop_unit(unit)
        client.reset_failed(unit)
        stopped.append(unit)
    return stopped
