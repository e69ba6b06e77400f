"""A spec's machine section: what a machine must have. Backends are known here only by name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import MachineError
from .releases import DEFAULT_RELEASE

AUTO = "auto"
# The backends a spec may name; machine.backends maps each to its class (a test keeps the two lists equal).
BACKEND_NAMES = ("nspawn", "host", "qemu")


@dataclass(frozen=True)
class MachineConfig:
    """What a machine must have: extra Debian packages and files bound in from the host.

    Specs whose machine sections are equal share one booted machine for the whole test session.
    """

    packages: tuple[str, ...] = ()
    # (path on the machine, absolute path on the host), bound read-only.
    files: tuple[tuple[str, str], ...] = ()
    backend: str = "auto"  # see machine.backends.resolve(): auto is nspawn
    # The Debian release the image is built from (spec.releases.RELEASES); "" until the pool fills in the session's
    # default (--harden-release, else spec.releases.DEFAULT_RELEASE) for a spec that names none.
    release: str = ""
    # Local .deb files installed on top of the image (absolute paths on the host): the maintainer's new build.
    debs: tuple[str, ...] = ()
    # nspawn only: run the container without a user namespace (its root is then root on the host) so that the
    # directives needing host BPF (IPAddressDeny=, DeviceAllow=...) can be enforced. Announced at boot.
    privileged: bool = False
    # Units a package enables at boot are masked at boot (a package's daemon must not hold the port or state of the
    # service under test), except these: machine.services, the package daemons a spec needs running (a resolver)...
    services: tuple[str, ...] = ()
    # ...and the unit the spec tests (service.unit / unit_file), which must stay startable, with what it needs...
    tested_unit: str = ""
    # ...which for a unit file of the spec's (this file on the host; not in the image: installed at its first
    # start) its own file names (Requires=, Wants=, ...); a package's unit is read from the image.
    tested_unit_file: str = ""

    def check_files(self) -> None:
        """Raise MachineError for a ``files:`` source that is gone from the host since the spec was loaded."""
        for dest, source in self.files:
            if not Path(source).exists():
                raise MachineError(f"file to bind at {dest} does not exist on the host: {source}")
        for deb in self.debs:
            if not Path(deb).is_file():
                raise MachineError(f"local package {deb} (machine.debs) does not exist on the host any more")

    def describe(self) -> str:
        # The host backend runs the host's own systemd: no Debian release of ours.
        parts = ([self.backend] if self.backend == "host"
                 else [self.backend, f"Debian {self.release or DEFAULT_RELEASE}"])
        if self.debs:
            parts.append("debs: " + ", ".join(Path(deb).name for deb in self.debs))
        if self.packages:
            parts.append("packages: " + ", ".join(self.packages))
        if self.files:
            parts.append("files: " + ", ".join(dest for dest, _src in self.files))
        if self.services:
            parts.append("services: " + ", ".join(self.services))
        if self.tested_unit:
            parts.append("unit under test: " + self.tested_unit)
        if self.privileged:
            parts.append("privileged")
        return "; ".join(parts)
