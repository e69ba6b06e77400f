"""Shared fixtures for the plugin's own tests: a real booted machine from the plugin's pool."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_systemd_harden.errors import BackendUnavailable
from pytest_systemd_harden.machine.backends.base import Machine
from pytest_systemd_harden.machine.images import default_cache_dir
from pytest_systemd_harden.plugin import HardenSession
from pytest_systemd_harden.spec.load import Spec, load_spec
from pytest_systemd_harden.spec.machine import MachineConfig
from pytest_systemd_harden.unit.pool import MachinePool
from pytest_systemd_harden.unit.service import HardenedService

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# pytester runs inner sessions with HOME in a temporary directory; they must reuse the images built already.
os.environ.setdefault("HARDEN_CACHE_DIR", str(default_cache_dir()))


@pytest.fixture(scope="session")
def machine(harden_pool: MachinePool, pytestconfig: pytest.Config) -> Machine:
    """A booted base machine (no extra packages), shared by the whole test session."""
    try:
        return harden_pool.machine_for(MachineConfig())
    except BackendUnavailable as exc:
        HardenSession.of(pytestconfig).unavailable(exc)


@pytest.fixture
def make_spec(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Write a spec (YAML text) to a file and load it: ``make_spec("service: ...")``."""

    def make(text: str, name: str = "harden.yaml") -> Spec:
        path = tmp_path / name
        path.write_text(text)
        return load_spec(path)

    return make


@pytest.fixture
def started(machine: Machine, make_spec: Callable[[str], Spec]) -> Iterator[Callable[[str], HardenedService]]:
    """Start a service from spec text (dedented) on the shared base machine: ``started("service: ...")``; every
    service started is stopped after the test."""
    services: list[HardenedService] = []

    def start(text: str) -> HardenedService:
        service = HardenedService(machine, make_spec(textwrap.dedent(text)))
        services.append(service)
        service.start()
        return service

    yield start
    for service in services:
        service.stop()
