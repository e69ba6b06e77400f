"""A cgroup of its own for every container, and the reaping of those a killed run left behind.

Where the host's PID 1 is not systemd nobody else will give a container a cgroup, so we make one in every
hierarchy systemd cares about: the cgroup2 tree (``/sys/fs/cgroup/unified`` on hybrid hosts, ``/sys/fs/cgroup``
on unified ones) and, on hybrid hosts, the ``name=systemd`` v1 tree. Each group is named after the owning
process (pid and start time), so a later run can tell a live owner from a dead one and reap the orphans.

Every container is also capped as a whole, from the host side, so a fork bomb or a leak in a service under test
cannot exhaust the host: memory and pids limits on its own group (cgroup2 ``memory.max``/``pids.max`` on a unified
host; on a hybrid one, the v1 ``memory`` and ``pids`` hierarchies, where the group is made under this process's own
group so that any limit the invoker has stays above it). The container cannot raise them: the limit files of its
own group are the host's. A machine that hits a cap says so (:meth:`OwnedCgroup.caps_hit`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..errors import printable

CGROUP_ROOT = Path("/sys/fs/cgroup")
OUR_SUBTREE = "pytest-systemd-harden"
_sequence = itertools.count(1)

MEMORY_CAP_ENV = "HARDEN_MACHINE_MEMORY_MAX"
TASKS_CAP_ENV = "HARDEN_MACHINE_TASKS_MAX"
DEFAULT_TASKS_CAP = 4096  # a booted machine runs ~30 tasks; the host here allows 32768 in all
# A process tree in the background (Contained.set_background): the weakest nice value (weight 15 against 1024 for
# nice 0) and CPU weight (1 against the default 100).
BACKGROUND_NICE = 19
BACKGROUND_CPU_WEIGHT = 1
DEFAULT_MEMORY_FRACTION = 4  # a quarter of the host's RAM per machine: a 24 GiB runner keeps 18 GiB
_SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass(frozen=True)
class Caps:
    """The limits every machine's group gets: bytes of memory and number of tasks (None: no cap)."""

    memory: int | None
    tasks: int | None

    @classmethod
    def from_environment(cls) -> Caps:
        """The caps of ``$HARDEN_MACHINE_MEMORY_MAX`` (bytes, or with a K/M/G suffix) and
        ``$HARDEN_MACHINE_TASKS_MAX`` (``infinity`` for none), else the defaults."""
        return cls(_parse_cap(MEMORY_CAP_ENV, _default_memory_cap()), _parse_cap(TASKS_CAP_ENV, DEFAULT_TASKS_CAP))

    def describe(self) -> str:
        memory = "no memory cap" if self.memory is None else f"memory cap {_size(self.memory)}"
        tasks = "no tasks cap" if self.tasks is None else f"tasks cap {self.tasks}"
        return f"{memory}, {tasks}"


def _default_memory_cap() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024 // DEFAULT_MEMORY_FRACTION
    return 4 << 30


def _parse_cap(variable: str, default: int) -> int | None:
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    if text in ("infinity", "max"):
        return None
    number, multiplier = (text[:-1], _SUFFIXES[text[-1].upper()]) if text[-1].upper() in _SUFFIXES else (text, 1)
    if not number.isdigit() or int(number) <= 0:
        raise ValueError(f"${variable}={text!r}: expected a positive number (with a K, M or G suffix for memory) "
                         "or 'infinity'")
    return int(number) * multiplier


def _size(count: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count} bytes"


def process_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime) counted after the parenthesised command name, which may contain spaces.
    return stat.rsplit(")", 1)[1].split()[19]


def hierarchies(root: Path = CGROUP_ROOT) -> list[Path]:
    """The cgroup trees a container's cgroup must exist in, on this host."""
    if (root / "cgroup.controllers").exists():  # pure cgroup2
        return [root]
    found = [root / "unified"] if (root / "unified" / "cgroup.controllers").exists() else []
    if (root / "systemd" / "cgroup.procs").exists():
        found.append(root / "systemd")
    return found


def limit_hierarchies(root: Path = CGROUP_ROOT) -> list[Path]:
    """The v1 memory and pids trees of a hybrid host, each at this process's own group in it (empty on a unified
    host: cgroup2 has both controllers)."""
    if (root / "cgroup.controllers").exists():
        return []
    found = []
    for controller in ("memory", "pids"):
        tree = root / controller
        if (tree / "cgroup.procs").exists():
            found.append(tree / _own_group(controller).lstrip("/"))
    return found


def _own_group(controller: str) -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _number, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    return "/"


def bases(root: Path = CGROUP_ROOT) -> list[Path]:
    """Where our containers' groups are made, in every hierarchy: ``<tree>/pytest-systemd-harden``."""
    return [tree / OUR_SUBTREE for tree in (*hierarchies(root), *limit_hierarchies(root))]


@dataclass
class OwnedCgroup:
    """One container's cgroup, the same name in every hierarchy."""

    name: str
    bases: list[Path]

    @property
    def paths(self) -> list[Path]:
        return [base / self.name for base in self.bases]

    @classmethod
    def create(cls, label: str, caps: Caps | None = None, root: Path = CGROUP_ROOT) -> OwnedCgroup:
        pid = os.getpid()
        name = f"{label}-{pid}-{process_start_time(pid)}-{next(_sequence)}"
        group = cls(name, bases(root))
        for path in group.paths:
            for _attempt in range(5):  # another run may remove the shared parent just as we create in it
                try:
                    path.mkdir(parents=True, exist_ok=True)
                    break
                except FileNotFoundError:
                    continue
        if caps is not None:
            try:
                group.set_caps(caps)
            except OSError as exc:
                group.kill_and_remove()
                raise OSError(exc.errno, f"could not cap the machine's cgroup ({caps.describe()}): {exc}") from None
        return group

    def set_caps(self, caps: Caps) -> None:
        """Write ``caps`` into the group's limit files (cgroup2 memory.max/pids.max, or the v1 files)."""
        for path in self.paths:
            if ((path.parent / "cgroup.subtree_control").exists()
                    and (path.parent.parent / "cgroup.controllers").exists()):
                # cgroup2: the controllers must be enabled on our shared parent first.
                wanted = {"memory", "pids"} & set((path.parent / "cgroup.controllers").read_text().split())
                if wanted:
                    (path.parent / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in sorted(wanted)))
            limits = {
                "memory.max": caps.memory, "pids.max": caps.tasks,  # cgroup2, or v1 pids
                "memory.limit_in_bytes": caps.memory,  # v1 memory
            }
            for file, value in limits.items():
                if (path / file).exists():
                    (path / file).write_text("max" if value is None and file != "memory.limit_in_bytes"
                                             else "-1" if value is None else str(value))

    def cap_counters(self) -> dict[str, int]:
        """How often the group hit each cap so far: {"memory": OOM kills, "pids": refused forks}."""
        return cap_counters(self.paths)

    def caps_hit(self, before: dict[str, int], caps: Caps) -> list[str]:
        """Sentences for the caps hit since ``before`` (an earlier :meth:`cap_counters`)."""
        return caps_hit(self.cap_counters(), before, caps)

    def pids(self) -> set[int]:
        return _pids_under(self.paths)

    def kill_and_remove(self, timeout: float = 10.0) -> None:
        """Kill whatever still runs in the group and remove it from every hierarchy."""
        deadline = time.monotonic() + timeout
        for path in self.paths:
            kill_file = path / "cgroup.kill"
            if kill_file.exists():  # cgroup2 kills the whole subtree at once (Linux 5.14+)
                try:
                    kill_file.write_text("1")
                except OSError:
                    pass
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)
        for path in self.paths:
            _remove_tree(path)
            try:
                path.parent.rmdir()  # the shared parent, once no container of any run is left in it
            except OSError:
                pass


def cap_counters(paths: Iterable[Path]) -> dict[str, int]:
    """How often the groups at ``paths`` (one machine's, in every hierarchy) hit each cap so far."""
    found: dict[str, int] = {}
    for path in paths:
        events = {"memory": _field(path / "memory.events", "oom_kill")
                  or _field(path / "memory.oom_control", "oom_kill"),
                  "pids": _field(path / "pids.events", "max")}
        for kind, count in events.items():
            if count is not None:
                found[kind] = max(found.get(kind, 0), count)
    return found


def caps_hit(now: dict[str, int], before: dict[str, int], caps: Caps) -> list[str]:
    """Sentences for the caps hit between two :func:`cap_counters`."""
    hit = []
    for kind, count in now.items():
        new = count - before.get(kind, 0)
        if new <= 0:
            continue
        if kind == "memory":
            limit = "none" if caps.memory is None else _size(caps.memory)
            hit.append(f"the machine hit its memory cap of {limit} ({new} process(es) killed by the cgroup's OOM "
                       f"killer; raise it with ${MEMORY_CAP_ENV})")
        else:
            hit.append(f"the machine hit its tasks cap of {caps.tasks} ({new} fork(s) or thread(s) refused; raise it "
                       f"with ${TASKS_CAP_ENV})")
    return hit


def scope_paths(proc_cgroup: str, scope: str, root: Path = CGROUP_ROOT) -> list[Path]:
    """The groups of the host systemd's ``scope`` unit, in every hierarchy, from the ``/proc/PID/cgroup`` of a
    process in it (or below it)."""
    lines = proc_cgroup.splitlines()
    unified = (root / "cgroup.controllers").exists()
    found = []
    for line in lines:
        _number, controllers, path = line.split(":", 2)
        if scope not in path:
            continue
        path = path[:path.index(scope) + len(scope)].lstrip("/")  # nspawn moves itself into a subgroup
        if not controllers:
            found.append(root / path if unified else root / "unified" / path)
        found += [root / c / path for c in controllers.split(",") if c in ("memory", "pids")]
    return found


def _field(path: Path, name: str) -> int | None:
    """The number after ``name`` in a flat keyed cgroup file (memory.events, pids.events), or None."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == name and value.strip().isdigit():
            return int(value)
    return None


def _pids_under(paths: Iterable[Path]) -> set[int]:
    """The processes in the groups ``paths`` and every group below them (a group gone meanwhile holds none)."""
    found: set[int] = set()
    for path in paths:
        for procs in (Path(d) / "cgroup.procs" for d in _subgroups(path)):
            try:
                found.update(int(line) for line in procs.read_text().split())
            except OSError:
                continue
    return found


def _subgroups(path: Path) -> list[str]:
    """``path`` and every group below it, deepest last. os.walk, not rglob: nspawn removes its own subgroups
    (payload, supervisor) while we look, and a group gone meanwhile is skipped, not an error."""
    return [directory for directory, _dirs, _files in os.walk(path)]


def _remove_tree(path: Path) -> None:
    if not path.exists():
        return
    for child in reversed(_subgroups(path)[1:]):
        try:
            os.rmdir(child)
        except OSError:
            pass
    try:
        path.rmdir()
    except OSError:
        pass


def reap_orphans(root: Path = CGROUP_ROOT) -> list[str]:
    """Kill and remove containers left by runs whose owner process is gone; return their names."""
    our_bases = bases(root)
    names: set[str] = set()
    for base in our_bases:
        if base.is_dir():
            names.update(p.name for p in base.iterdir() if p.is_dir())
    reaped = []
    for name in sorted(names):
        parts = name.rsplit("-", 3)
        if len(parts) == 4 and parts[1].isdigit() and process_start_time(int(parts[1])) == parts[2]:
            continue  # its owner is alive (maybe another xdist worker): not ours to touch
        OwnedCgroup(name, our_bases).kill_and_remove()
        reaped.append(name)
    return reaped


def stop_leftovers(name: str) -> None:
    """Kill what is left of a dead run's :class:`Contained` process tree called ``name``: its scope where the host
    runs systemd, else every cgroup whose owner is gone."""
    if host_runs_systemd():
        subprocess.run(["systemctl", "stop", f"{name}.scope"], capture_output=True, check=False)
    else:
        reap_orphans()


_JOIN_CGROUPS_AND_EXEC = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 1; shift; done; shift; exec "$@"'


def host_runs_systemd() -> bool:
    return Path("/run/systemd/system").is_dir() and Path("/proc/1/comm").read_text().strip() == "systemd"


def output_lines(stream: IO[bytes], longest: int = 4096) -> Iterator[str]:
    """The lines of a process's output (a machine's console, a build's log: not trusted), each made printable
    (errors.printable) and cut at ``longest`` bytes: the rest of a longer line is read and dropped, never held."""
    while True:
        raw = stream.readline(longest)
        if not raw:
            return
        if len(raw) == longest and not raw.endswith(b"\n"):
            rest = raw
            while rest and not rest.endswith(b"\n"):
                rest = stream.readline(1 << 16)
            raw += b" [...]"
        yield printable(raw.decode(errors="replace").rstrip())


@dataclass
class Contained:
    """A machine's process tree (nspawn, qemu) in a cgroup of its own: killed with it, reaped if we die."""

    process: subprocess.Popen[bytes]
    scope: str | None  # the host systemd's scope unit, where PID 1 is systemd
    cgroup: OwnedCgroup | None  # our own cgroup, where it is not
    caps: Caps = Caps(None, None)

    @classmethod
    def start(cls, command: list[str], label: str, name: str, caps: Caps | None = None, *, background: bool = False,
              **popen: Any) -> Contained:
        """Start ``command`` under ``caps`` (default: :meth:`Caps.from_environment`); the new process tree is shut
        down when the calling thread dies (pdeathsig). With ``background``, a scope of the host's systemd starts
        with the weakest CPU weight (the scope may not exist yet when this returns: see set_background)."""
        caps = caps or Caps.from_environment()
        scope: str | None = None
        cgroup: OwnedCgroup | None = None
        if host_runs_systemd():
            # Let the host's systemd give the machine a scope of its own instead of our raw cgroup.
            scope = f"{name}.scope"
            command = ["systemd-run", "--scope", "--quiet", "--collect", f"--unit={scope}",
                       "--property=Delegate=yes", f"--property=MemoryMax={caps.memory or 'infinity'}",
                       f"--property=TasksMax={caps.tasks or 'infinity'}",
                       *([f"--property=CPUWeight={BACKGROUND_CPU_WEIGHT}"] if background else []), *command]
        else:
            cgroup = OwnedCgroup.create(label, caps)
            # Join the cgroup before exec'ing, in the child: no Python runs between fork and exec (the bus
            # threads make preexec_fn unsafe).
            procs = [str(path / "cgroup.procs") for path in cgroup.paths]
            command = ["/bin/sh", "-c", _JOIN_CGROUPS_AND_EXEC, "sh", *procs, "--", *command]
        command = ["setpriv", "--pdeathsig", "TERM", "--", *command]
        try:
            process = subprocess.Popen(command, start_new_session=True, **popen)
        except BaseException:
            if cgroup is not None:
                cgroup.kill_and_remove()
            raise
        return cls(process, scope, cgroup, caps)

    def pids(self) -> set[int]:
        return self.cgroup.pids() if self.cgroup is not None else set()

    def set_background(self, background: bool) -> None:
        """Give this process tree next to no CPU while ``background`` (it then runs on the cores nothing else
        wants), else a share like any other's. Best effort, each way the host may schedule it: the nice value of
        its autogroup (the kernel groups a session's tasks, and the tree is a session of its own: see start), and
        of each of its processes (where no autogroup applies; children inherit it), and the CPU weight of the host
        systemd's scope (where cgroups decide; see ``background`` of start). Never for a tree already reaped: its
        pid may be another process's by now (the caller stops asking before it reaps, images.BuildPriority)."""
        if self.process.returncode is not None:
            return
        nice = BACKGROUND_NICE if background else 0
        with contextlib.suppress(OSError):  # gone, or a kernel without autogroups
            Path(f"/proc/{self.process.pid}/autogroup").write_text(f"{nice}\n")
        # A pid read from the group may have ended and been reused in between: only after the pid space wrapped.
        for pid in self._members() | {self.process.pid}:
            with contextlib.suppress(OSError):  # ended meanwhile
                os.setpriority(os.PRIO_PROCESS, pid, nice)
        if self.scope is not None:
            with contextlib.suppress(OSError):  # no cpu controller there, or gone
                path = self.cgroup2_path()
                if path is not None:
                    (path / "cpu.weight").write_text(f"{BACKGROUND_CPU_WEIGHT if background else 100}\n")

    def _members(self) -> set[int]:
        """Every process of the tree: of our own group, or of the host systemd's scope (and the groups below it)."""
        if self.cgroup is not None:
            return self.cgroup.pids()
        path = self.cgroup2_path()
        return _pids_under([path]) if path is not None else set()

    def cgroup2_path(self) -> Path | None:
        """The machine's group in the cgroup2 tree (where its systemd attaches BPF programs), or None."""
        if self.cgroup is not None:
            paths = self.cgroup.paths
        elif self.scope is not None:
            try:
                paths = scope_paths(Path(f"/proc/{self.process.pid}/cgroup").read_text(), self.scope)
            except OSError:
                return None
        else:
            return None
        return next((path for path in paths if (path / "cgroup.controllers").exists()), None)

    def cap_counters(self) -> dict[str, int]:
        """See :func:`cap_counters`: of our own group, or of the host systemd's scope."""
        if self.cgroup is not None:
            return self.cgroup.cap_counters()
        if self.scope is not None:
            try:
                proc_cgroup = Path(f"/proc/{self.process.pid}/cgroup").read_text()
            except OSError:  # gone: nothing more to count
                return {}
            return cap_counters(scope_paths(proc_cgroup, self.scope))
        return {}

    def caps_hit(self, before: dict[str, int]) -> list[str]:
        return caps_hit(self.cap_counters(), before, self.caps)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM (a container powers off), then SIGKILL, then remove every trace. Idempotent."""
        process = self.process
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        if self.scope is not None:
            subprocess.run(["systemctl", "stop", self.scope], capture_output=True, check=False)
        if self.cgroup is not None:
            self.cgroup.kill_and_remove()
