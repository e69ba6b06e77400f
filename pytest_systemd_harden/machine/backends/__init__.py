"""Backends by name, imported lazily: each is small and supplies only a machine's lifecycle."""

from __future__ import annotations

import importlib
from types import ModuleType

from ...errors import BackendUnavailable
from ...spec.machine import AUTO, MachineConfig
from .base import Machine

__all__ = ["AUTO", "BACKENDS", "Machine", "MachineConfig", "check_available", "machine_class", "resolve"]

BACKENDS = {
    "nspawn": "pytest_systemd_harden.machine.backends.nspawn:NspawnMachine",
    "host": "pytest_systemd_harden.machine.backends.host:HostMachine",
    "qemu": "pytest_systemd_harden.machine.backends.qemu:QemuMachine",
}


def _module_for(name: str) -> ModuleType:
    try:
        target = BACKENDS[name]
    except KeyError:
        raise BackendUnavailable(f"unknown backend {name!r}; known: {', '.join(sorted(BACKENDS))}") from None
    return importlib.import_module(target.split(":")[0])


def machine_class(name: str) -> type[Machine]:
    cls: type[Machine] = getattr(_module_for(name), BACKENDS[name].split(":")[1])
    return cls


def check_available(name: str) -> None:
    """Raise BackendUnavailable, with the command that fixes it, when ``name`` cannot run here."""
    _module_for(name).check_available()


def resolve(name: str) -> str:
    """The backend ``auto`` (the default) means: an nspawn container, wherever the run is. The host's own systemd
    is never chosen for the user: a run on it starts units on somebody's real host, so it must be asked for by
    name (``host``). Any other name is itself."""
    return "nspawn" if name == AUTO else name
