"""The Debian releases a machine may be built from, by name."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Release:
    """A Debian release an image is built from, with the suites users get updates from."""

    name: str
    version: str  # "12", "13", "testing", "unstable": for messages
    updates: bool  # has NAME-updates
    security: bool  # has NAME-security
    systemd: str = ""  # the systemd major version it ships, where it is fixed (a stable release)


RELEASES: dict[str, Release] = {r.name: r for r in (
    Release("bookworm", "12", updates=True, security=True, systemd="252"),
    Release("trixie", "13", updates=True, security=True, systemd="257"),
    Release("forky", "testing", updates=False, security=False),
    Release("sid", "unstable", updates=False, security=False),
)}


DEFAULT_RELEASE = "trixie"  # Debian's current stable (13, systemd 257)


def parse_releases(text: str | None) -> list[str]:
    """``bookworm,trixie`` (--harden-release, cache-key --release) as release names, in order."""
    return [release.strip() for release in (text or "").split(",") if release.strip()]
