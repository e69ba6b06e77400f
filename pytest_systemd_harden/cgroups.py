"""A cgroup of its own for every container, and the reaping of those a killed run left behind.

Where the host's PID 1 is not systemd nobody else will give a container a cgroup, so we make one in every
hierarchy systemd cares about: the cgroup2 tree (``/sys/fs/cgroup/unified`` on hybrid hosts, ``/sys/fs/cgroup``
on unified ones) and, on hybrid hosts, the ``name=systemd`` v1 tree. Each group is named after the owning
process (pid and start time), so a later run can tell a live owner from a dead one and reap the orphans.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CGROUP_ROOT = Path("/sys/fs/cgroup")
OUR_SUBTREE = "pytest-systemd-harden"
_sequence = itertools.count(1)


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


@dataclass
class OwnedCgroup:
    """One container's cgroup, the same relative path in every hierarchy."""

    name: str
    trees: list[Path]

    @property
    def paths(self) -> list[Path]:
        return [tree / OUR_SUBTREE / self.name for tree in self.trees]

    @classmethod
    def create(cls, label: str, root: Path = CGROUP_ROOT) -> OwnedCgroup:
        pid = os.getpid()
        name = f"{label}-{pid}-{process_start_time(pid)}-{next(_sequence)}"
        group = cls(name, hierarchies(root))
        for path in group.paths:
            for _attempt in range(5):  # another run may remove the shared parent just as we create in it
                try:
                    path.mkdir(parents=True, exist_ok=True)
                    break
                except FileNotFoundError:
                    continue
        return group

    def pids(self) -> set[int]:
        found: set[int] = set()
        for path in self.paths:
            for procs in path.rglob("cgroup.procs") if path.exists() else ():
                try:
                    found.update(int(line) for line in procs.read_text().split())
                except OSError:
                    continue
        return found

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


def _remove_tree(path: Path) -> None:
    if not path.exists():
        return
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            child.rmdir()
        except OSError:
            pass
    try:
        path.rmdir()
    except OSError:
        pass


def reap_orphans(root: Path = CGROUP_ROOT) -> list[str]:
    """Kill and remove containers left by runs whose owner process is gone; return their names."""
    trees = hierarchies(root)
    names: set[str] = set()
    for tree in trees:
        base = tree / OUR_SUBTREE
        if base.is_dir():
            names.update(p.name for p in base.iterdir() if p.is_dir())
    reaped = []
    for name in sorted(names):
        parts = name.rsplit("-", 3)
        if len(parts) == 4 and parts[1].isdigit() and process_start_time(int(parts[1])) == parts[2]:
            continue  # its owner is alive (maybe another xdist worker): not ours to touch
        OwnedCgroup(name, trees).kill_and_remove()
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


@dataclass
class Contained:
    """A machine's process tree (nspawn, qemu) in a cgroup of its own: killed with it, reaped if we die."""

    process: subprocess.Popen[bytes]
    scope: str | None  # the host systemd's scope unit, where PID 1 is systemd
    cgroup: OwnedCgroup | None  # our own cgroup, where it is not

    @classmethod
    def start(cls, command: list[str], label: str, name: str, **popen: Any) -> Contained:
        """Start ``command``; the new process tree is shut down when the calling thread dies (pdeathsig)."""
        scope: str | None = None
        cgroup: OwnedCgroup | None = None
        if host_runs_systemd():
            # Let the host's systemd give the machine a scope of its own instead of our raw cgroup.
            scope = f"{name}.scope"
            command = ["systemd-run", "--scope", "--quiet", "--collect", f"--unit={scope}",
                       "--property=Delegate=yes", *command]
        else:
            cgroup = OwnedCgroup.create(label)
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
        return cls(process, scope, cgroup)

    def pids(self) -> set[int]:
        return self.cgroup.pids() if self.cgroup is not None else set()

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
