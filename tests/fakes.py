"""Stand-ins for the tests that need no machine: a systemd that only records, and the probes' view of a kernel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pytest_systemd_harden.machine.systemd import ProcessOutcome
from pytest_systemd_harden.probes import inside


class RecordingSystemd:
    """Stands in for a machine's SystemdClient: records what would run and says it succeeded."""

    def __init__(self) -> None:
        self.argvs: list[list[str]] = []

    def run(self, unit: str, argv: list[str], properties: Any, *, stdin: bytes = b"",
            timeout: float = 60.0) -> ProcessOutcome:
        self.argvs.append(list(argv))
        return ProcessOutcome(unit, "success", 0, None, b"", b"", 0.0)


def guard_in_process(monkeypatch: pytest.MonkeyPatch, guard: str) -> None:
    """The inside script's guard, set in this process as its main() sets it for ``{"guard": guard}``."""
    monkeypatch.setattr(inside, "CAREFUL", guard == inside.GUARD_HOST)
    monkeypatch.setattr(inside, "SHARED_KERNEL", True)


def kernel_without_family_modules(monkeypatch: pytest.MonkeyPatch, directory: Path) -> tuple[Path, Path]:
    """The probes' view of a kernel with no address-family module loaded: a /proc/net/protocols listing UNIX
    only and an empty /sys/module, both in ``directory``; returned so a test can load one."""
    protocols, modules = directory / "protocols", directory / "module"
    protocols.write_text("protocol  size sockets  memory press maxhdr  slab module     cl co di ac io in de sh ss gs "
                         "se re sp bi br ha uh gp em\nUNIX       1024     12      -1   NI       0   yes  kernel\n")
    modules.mkdir()
    monkeypatch.setattr(inside, "PROTOCOLS_FILE", str(protocols))
    monkeypatch.setattr(inside, "MODULES_DIR", str(modules))
    return protocols, modules
