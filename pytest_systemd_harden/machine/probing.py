"""Probe batches run on a machine (unconfined), and what the machine's systemd knows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..probes.runner import (
    _FACTS,
    INTERPRETER,
    INTERPRETER_LIBRARIES,
    PLACED_INTERPRETER,
    MachineFacts,
    ProbeProgramError,
    Run,
    executable_under,
    parse_groups,
    parse_known_syscalls,
    parse_version,
)
from ..result import CommandResult
from .systemd import Property

if TYPE_CHECKING:  # the backends run batches through guarded_batch: no import of them at run time
    from .backends.base import Machine


def probe_interpreter(machine: Machine, no_exec: Sequence[str], exec_paths: Sequence[str]) -> str:
    """The interpreter path a batch runs with in a sandbox whose exec policy is ``no_exec``/``exec_paths``.

    /usr/bin/python3 where the policy lets it run; otherwise a copy of it, placed (on the machine, unconfined) in a
    directory ExecPaths= opens, such as the /usr/lib of Debian's redis unit (NoExecPaths=/, ExecPaths=/usr/lib).
    The sandbox itself is not changed. Raises ProbeProgramError when the policy leaves no such place."""
    if not no_exec:
        return INTERPRETER
    real = machine.run(["readlink", "-f", INTERPRETER], purpose="probe-setup").stdout.strip() or INTERPRETER
    modules = f"/usr/lib/{real.rsplit('/', 1)[-1]}/lib-dynload"  # /usr/lib/python3.11/lib-dynload
    libraries = [path for path in (*INTERPRETER_LIBRARIES, modules) if not executable_under(path, no_exec, exec_paths)]
    if executable_under(real, no_exec, exec_paths) and not libraries:
        return INTERPRETER
    shown = f"NoExecPaths={' '.join(no_exec)}" + (f" with ExecPaths={' '.join(exec_paths)}" if exec_paths else "")
    if any("x86_64" in path or "aarch64" in path for path in libraries):
        raise ProbeProgramError(f"the probe program ({real}) cannot run under {shown}: the C library's directory is "
                                "not executable either, so no program linked to it runs in this sandbox")
    for directory in sorted(exec_paths, key=len, reverse=True):
        placed = f"{directory.rstrip('/')}/{PLACED_INTERPRETER}"
        if not executable_under(placed, no_exec, exec_paths):
            continue
        copied = machine.run(["/bin/sh", "-c", 'test -d "$1" && cp -f "$2" "$3" && chmod 0755 "$3"', "sh",
                              directory, real, placed], purpose="probe-setup")
        if copied.exit_status == 0:
            return placed
    raise ProbeProgramError(f"the probe program ({real}) cannot run under {shown}, and no ExecPaths= directory "
                            "takes a copy of it: add the probes' interpreter to ExecPaths= (e.g. ExecPaths="
                            f"{real}) or switch the enforcement items off (enforcement: false)")


def on_machine(machine: Machine, properties: Sequence[Property] = (), purpose: str = "probe") -> Run:
    """A :data:`Run` for a transient unit on ``machine`` with ``properties`` (none: unconfined, as root)."""
    def run(argv: Sequence[str], stdin: bytes) -> CommandResult:
        return machine.run(list(argv), properties, stdin=stdin, timeout=120, purpose=purpose)
    return run


def remember_facts(machine: Machine, facts: MachineFacts) -> None:
    """Use ``facts`` for ``machine`` instead of asking it (they were cached with its capabilities, same key)."""
    _FACTS.setdefault(machine.name, facts)


def forget_facts(machine: Machine) -> None:
    """``machine`` is gone (a twin shut down): its facts are not kept for the rest of the run."""
    _FACTS.pop(machine.name, None)


def machine_facts(machine: Machine) -> MachineFacts:
    """The facts of ``machine``'s systemd, asked once per machine."""
    if machine.name not in _FACTS:
        version = machine.run(["systemctl", "--version"], purpose="facts")
        groups = machine.run(["systemd-analyze", "syscall-filter", "--no-pager"], purpose="facts")
        seen = "cat /proc/self/uid_map; stat -fc %T /sys/fs/cgroup; cat /sys/kernel/security/lsm 2>/dev/null; echo"
        kernel = machine.run(["/bin/sh", "-c", seen], purpose="facts")
        uid_map, cgroup_fs, lsms = (kernel.stdout.splitlines() + ["", "", ""])[:3]
        number, features = parse_version(version.stdout)
        _FACTS[machine.name] = MachineFacts(number, features, parse_groups(groups.stdout),
                                            parse_known_syscalls(groups.stdout),
                                            user_namespaced=uid_map.split()[:2] != ["0", "0"],
                                            cgroup_fs=cgroup_fs.strip(), lsms=lsms.strip())
    return _FACTS[machine.name]
