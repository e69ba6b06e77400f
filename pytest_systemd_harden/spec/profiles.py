"""Built-in hardening profiles: a versioned set of directives a spec starts from, then adjusts.

A spec says ``profile: baseline-2026`` and lists under ``hardening:`` only what its service needs on top of it::

    profile: baseline-2026
    hardening:
      DynamicUser: yes
      RestrictAddressFamilies: [AF_UNIX, AF_INET]    # replaces the profile's AF_UNIX

The rule is per directive: a directive the spec sets replaces the profile's value for that directive, whole;
every other directive of the profile stays. Names always carry a version: a profile never changes once
published, and a stricter one gets a new name, so a spec pinned to ``baseline-2026`` keeps meaning what it meant.
See docs/profiles.md for the reasoning behind each set and what the test container can and cannot enforce.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import final

from .directives import Directive, _closest_hint
from .directives import lookup as lookup_directive

VERSIONED_NAME = re.compile(r"^[a-z][a-z0-9-]*-\d{4}$")


class ProfileError(ValueError):
    """An unknown or unversioned profile name; the spec loader adds file, line and key."""

    def __init__(self, problem: str, hint: str = "") -> None:
        self.problem = problem
        self.hint = hint
        super().__init__(problem + (f" ({hint})" if hint else ""))


@final
class ProfileLine(int):
    """The line of a spec's ``profile:`` key, standing in as the line of a directive the profile supplied.

    It is the line number every message already shows beside a directive, and it formats as
    ``"3, from profile baseline-2026"``, so a failure report says where such a directive came from
    (``ProtectClock=yes    (harden.yaml:3, from profile baseline-2026)``) without any
    message-building code knowing about profiles.
    """

    profile: str

    def __new__(cls, line: int, profile: str) -> ProfileLine:
        self = super().__new__(cls, line)
        self.profile = profile
        return self

    def __str__(self) -> str:
        return f"{int(self)}, from profile {self.profile}"

    def __format__(self, spec: str) -> str:
        return str(self) if not spec else format(int(self), spec)

    def __repr__(self) -> str:
        return f"ProfileLine({int(self)}, {self.profile!r})"


@dataclass(frozen=True)
class Profile:
    """A named, versioned set of directives, written as they would stand in a unit file."""

    name: str
    settings: Mapping[str, str]

    def directives(self, line: int | None = None) -> tuple[Directive, ...]:
        """The profile's directives; ``line`` is the spec's ``profile:`` line, which they then carry."""
        origin = ProfileLine(line or 0, self.name)
        return tuple(Directive.parse(name, value, origin) for name, value in self.settings.items())


# The pre-RFC "Systemd Hardening" harden.enable set (NixOS), for a Debian machine: see docs/profiles.md.
_BASELINE = {
    "RemoveIPC": "yes",
    "LockPersonality": "yes",
    "PrivateDevices": "yes",
    "PrivateUsers": "yes",
    "PrivateMounts": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "PrivateTmp": "yes",
    "ProtectHostname": "yes",
    "ProtectHome": "yes",
    "ProtectControlGroups": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectClock": "yes",
    "ProtectProc": "invisible",
    "ProcSubset": "pid",
    # NixOS's store is read-only by construction; on Debian /usr and /etc are not, so say it.
    "ProtectSystem": "strict",
    # On systemd 252 ProtectKernelTunables=, ProtectControlGroups=, ProtectProc= and ProcSubset= each leave the
    # machine's /run writable under ProtectSystem=strict; this keeps it read-only (RuntimeDirectory= still works).
    "ReadOnlyPaths": "/run",
    "RestrictAddressFamilies": "AF_UNIX",
    "IPAddressAllow": "localhost",
    "IPAddressDeny": "any",
    # Not the pre-RFC's NoExecPaths=/ with ExecPaths= for the programs: on systemd 252 a path listed in either is
    # mounted again *writable* under ProtectSystem=strict, and NoExecPaths=/ misses PrivateTmp='s mounts. So the
    # scratch space the service can write is made non-executable, and nothing read-only is listed.
    "NoExecPaths": "/dev/shm /tmp /var/tmp",
    "CapabilityBoundingSet": "",
    "SystemCallFilter": "@system-service",
    "SystemCallArchitectures": "native",
    "SystemCallErrorNumber": "EPERM",
}

PROFILES: dict[str, Profile] = {profile.name: profile for profile in (
    # A common guide's "still better than nothing".
    Profile("minimal-2026", {
                "NoNewPrivileges": "yes",
                "PrivateTmp": "yes",
                "ProtectSystem": "strict",
                "ProtectHome": "yes",
                "ReadWritePaths": "/run /var/log",
                # The guide lists AF_INET AF_INET6 alone; without AF_UNIX even syslog(3) and user lookups fail.
                "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
            }),
    Profile("baseline-2026", _BASELINE),
    # The same guide's "container-like isolation", plus whatever baseline-2026 has that it lacks.
    Profile("maximum-2026", {
                "DynamicUser": "yes",
                "NoNewPrivileges": "yes",
                "ProtectSystem": "strict",
                "ReadOnlyPaths": _BASELINE["ReadOnlyPaths"],
                "ProtectHome": "yes",  # the guide says read-only; baseline-2026 hides /home, and so must this
                "PrivateTmp": "yes",
                "PrivateDevices": "yes",
                "PrivateUsers": "yes",
                "PrivateMounts": "yes",
                "ProtectHostname": "yes",
                "ProtectClock": "yes",
                "ProtectKernelTunables": "yes",
                "ProtectKernelModules": "yes",
                "ProtectKernelLogs": "yes",
                "ProtectControlGroups": "yes",
                "ProtectProc": "invisible",
                "ProcSubset": "pid",
                "LockPersonality": "yes",
                "MemoryDenyWriteExecute": "yes",
                "RestrictRealtime": "yes",
                "RestrictSUIDSGID": "yes",
                "RemoveIPC": "yes",
                "CapabilityBoundingSet": "",
                "SystemCallFilter": "@system-service",
                "SystemCallArchitectures": "native",
                "SystemCallErrorNumber": "EPERM",
                "RestrictNamespaces": "yes",
                "RestrictAddressFamilies": "AF_UNIX",
                "IPAddressAllow": "localhost",
                "IPAddressDeny": "any",
                "NoExecPaths": _BASELINE["NoExecPaths"],
                "LimitNOFILE": "65536",
                "LimitNPROC": "512",
                "LimitCORE": "0",
            }),
)}


def lookup(name: str) -> Profile:
    """The profile called ``name``; ProfileError naming the known ones if there is none."""
    if name in PROFILES:
        return PROFILES[name]
    known = ", ".join(sorted(PROFILES))
    if not VERSIONED_NAME.match(name):
        versions = sorted(p for p in PROFILES if p.rsplit("-", 1)[0] == name)
        suggestion = f"did you mean {versions[-1]}? " if versions else ""
        raise ProfileError(f"{name!r} has no version",
                           f"{suggestion}profile names end in a year, so a newer profile can tighten without "
                           f"changing specs pinned to an older one; known profiles: {known}")
    close = _closest_hint(name, list(PROFILES))
    raise ProfileError(f"unknown profile {name!r}", f"{close + ' ' if close else ''}known profiles: {known}")


def drop(profile: Profile, name: str) -> str:
    """Check that ``name`` is a directive ``profile`` sets, so that a spec may drop it (``Name: null``)."""
    if name not in profile.settings:
        lookup_directive(name)  # an unknown directive gets its own message, with the closest known name
        raise ProfileError(f"null drops a directive of the profile, but {profile.name} does not set {name}",
                           "remove the line, or give the directive a value")
    return name


def merge(base: Sequence[Directive], own: Sequence[Directive]) -> tuple[Directive, ...]:
    """``base`` (a profile's directives) with ``own`` (the spec's) on top: a directive in ``own`` replaces the
    one of the same name in ``base``. The profile's remaining directives come first, then the spec's, in order."""
    replaced = {directive.name for directive in own}
    return (*(d for d in base if d.name not in replaced), *own)
