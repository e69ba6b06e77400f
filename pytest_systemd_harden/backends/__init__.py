"""Backends by name, imported lazily: each is small and supplies only a machine's lifecycle."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import BackendUnavailable
from .base import Machine, MachineConfig

__all__ = ["BACKENDS", "Machine", "MachineConfig", "check_available", "machine_class"]

BACKENDS = {
    "nspawn": "pytest_systemd_harden.backends.nspawn:NspawnMachine",
    "qemu": "pytest_systemd_harden.backends.qemu:QemuMachine",
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
