"""testinfra Host objects whose commands run through our systemd client (never nsenter)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import testinfra.host
from testinfra.backend import base

from ..result import CommandResult

Runner = Callable[[str], CommandResult]


class SystemdUnitBackend(base.BaseBackend):  # type: ignore[misc]
    """Runs each testinfra command as a transient unit, unconfined or in the service's sandbox."""

    NAME = "pytest-systemd-harden"

    def __init__(self, runner: Runner, hostname: str, **kwargs: Any) -> None:
        self._runner = runner
        super().__init__(hostname, **kwargs)

    def run(self, command: str, *args: str, **kwargs: Any) -> base.CommandResult:
        result = self._runner(self.get_command(command, *args))
        # testinfra has no field for a signal; a shell reports death by signal N as 128+N.
        rc = result.exit_status if result.exit_status is not None else 128 + (result.signal or 0)
        return self.result(rc, self.encode(command), result.stdout.encode(), result.stderr.encode())


def make_host(runner: Runner, hostname: str) -> testinfra.host.Host:
    return testinfra.host.Host(SystemdUnitBackend(runner, hostname))
