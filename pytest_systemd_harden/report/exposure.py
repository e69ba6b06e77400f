"""Exposure: the spec's unit scored by ``systemd-analyze security`` on the machine's own systemd.

The spec is rendered as the unit file a user would ship (the service plus every hardening directive), written
into the machine, and scored there with ``systemd-analyze security --offline=yes``: the systemd that scores it is
the one the service runs under, so a directive that version does not know is neither scored nor enforced.

Where the overall number comes from: systemd sums, over the checks that apply, ``ceil(badness * weight / range)``
and reports ``ceil(100 * sum / sum_of_weights)`` (0-100, printed as 0.0-10.0). ``--json=short`` gives each check's
name, description, whether it is satisfied and its contribution, but (up to at least systemd 252) neither the
overall level nor the weight, badness and range the formula needs; and each contribution is already divided by
the sum of weights and rounded up, so adding them up overshoots. The overall level is therefore asked of systemd
itself: ``--threshold=N`` makes the command fail exactly when the exposure is above N, and a bisection over
0-100 finds it in seven runs of a few milliseconds each. That is systemd's own arithmetic under the same policy,
not a reimplementation of its weights; the JSON supplies the per-check detail for messages.

``--security-policy=FILE`` (``--harden-security-policy``) is copied into the machine and passed to every run.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MachineError
from ..machine.backends.base import EXPOSURE_UNIT_DIR, Machine
from ..spec.load import Spec
from ..unit.service import unit_name_for
from ..unit.under_test import unit_under_test

UNIT_DIR = EXPOSURE_UNIT_DIR  # where rendered units (and the policy) are written inside the machine

# systemd's badness_table: the band of an exposure (0-100 scale) is the first whose floor it reaches.
BANDS = ((100, "DANGEROUS"), (90, "UNSAFE"), (75, "EXPOSED"), (50, "MEDIUM"), (10, "OK"), (1, "SAFE"),
         (0, "PERFECT"))
MAX_EXPOSURE = 100  # 10.0, in tenths

Threshold = Callable[[int], bool]


class ExposureError(MachineError):
    """``systemd-analyze security`` could not score the rendered unit (the message has its output)."""


def band(tenths: int) -> str:
    """systemd's name for an exposure level in tenths: 18 -> "OK", 96 -> "UNSAFE"."""
    return next(name for floor, name in BANDS if tenths >= floor)


def tenths_of(value: float) -> int:
    """An exposure written as 0.0-10.0 (a spec's max_exposure, a check's contribution) in integer tenths."""
    return round(value * 10)


# --- the unit file -----------------------------------------------------------------------------------------------

_PLAIN_WORD = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")


def _unit_word(word: str, *, expands_variables: bool) -> str:
    """One word as a unit file's command line or Environment= reads it back: specifiers (``%``) and, on command
    lines, variable references (``$``) doubled; anything else unusual double-quoted with C escapes."""
    word = word.replace("%", "%%")
    if expands_variables:
        word = word.replace("$", "$$")
    if word == ";":
        return "\\;"  # a lone semicolon would separate two commands
    if _PLAIN_WORD.match(word):
        return word
    escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


def render_unit(spec: Spec) -> str:
    """The spec as the unit file a user would ship: its service settings and every hardening directive."""
    service = spec.service
    lines = [
        f"# {unit_name_for(spec)}: rendered by pytest-systemd-harden from {spec.path.name}",
        "[Unit]",
        f"Description={spec.label} (hardening scored by pytest-systemd-harden)".replace("%", "%%"),
        "",
        "[Service]",
        f"Type={service.type}",
        "ExecStart=" + " ".join(_unit_word(word, expands_variables=True) for word in service.exec_start),
    ]
    lines += [f"Environment={_unit_word(f'{key}={value}', expands_variables=False)}"
              for key, value in service.environment]
    if service.working_directory:
        lines.append(f"WorkingDirectory={service.working_directory}")
    lines += [line for directive in spec.hardening for line in directive.dropin_lines()]  # % escaped
    return "\n".join(lines) + "\n"


# --- the score ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    """One row of ``systemd-analyze security``: a setting it checks and what that costs this unit."""

    name: str  # as systemd names it: "PrivateNetwork=", "SystemCallFilter=~@privileged"
    description: str  # what systemd says about this unit: "Service has access to the host's network"
    satisfied: bool | None  # True: no exposure; False: some or all of its weight; None: does not apply
    contribution: int  # its share of the overall exposure, in tenths (rounded up by systemd)
    json_field: str = ""

    @property
    def exposure(self) -> float:
        return self.contribution / 10

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "exposure": self.exposure}


def parse_checks(json_text: str) -> tuple[Check, ...]:
    """The rows of ``systemd-analyze security --json=short|pretty`` output."""
    try:
        rows = json.loads(json_text)
    except json.JSONDecodeError as exc:
        raise ExposureError(f"systemd-analyze security printed no JSON ({exc}): {json_text[:300]!r}") from None
    if not isinstance(rows, list):
        raise ExposureError(f"systemd-analyze security printed {type(rows).__name__}, expected a list of checks")
    checks = []
    for row in rows:
        raw = row.get("exposure")
        # "0.2" (a string, one decimal) or null when the check costs nothing or does not apply.
        contribution = tenths_of(float(raw)) if raw not in (None, "") else 0
        checks.append(Check(str(row.get("name", "")), str(row.get("description") or ""), row.get("set"),
                            contribution, str(row.get("json_field", ""))))
    return tuple(checks)


def lowest_passing_threshold(passes: Threshold, low: int = 0, high: int = MAX_EXPOSURE) -> int:
    """The smallest ``N`` in ``[low, high]`` for which ``passes(N)``; ``passes`` must be monotonic and true at ``high``.

    With ``passes(N)`` = "systemd-analyze security --threshold=N succeeds" (it fails exactly when the exposure is
    above N) that is the exposure systemd computed, in tenths.
    """
    if not passes(high):
        raise ExposureError(f"systemd-analyze security failed even with --threshold={high}: the unit was not scored")
    while low < high:
        middle = (low + high) // 2
        if passes(middle):
            high = middle
        else:
            low = middle + 1
    return low


@dataclass(frozen=True)
class Exposure:
    """A spec's unit as ``systemd-analyze security`` on the machine scores it."""

    tenths: int  # the overall exposure level, 0-100 (printed by systemd as 0.0-10.0)
    checks: tuple[Check, ...]
    unit_name: str
    unit_text: str
    systemd: str = ""  # "systemd 252 (252.39-1~deb12u2)"
    policy: str | None = None  # the host path of a custom --security-policy
    warnings: tuple[str, ...] = field(default=())  # what systemd said about the unit file (lines it ignored)
    unit_path: str = ""  # where the rendered unit was scored, in the machine

    @property
    def score(self) -> float:
        return self.tenths / 10

    @property
    def band(self) -> str:
        return band(self.tenths)

    def costliest(self, count: int = 5) -> list[Check]:
        """The checks that cost the most, most expensive first (ties in systemd's order)."""
        costly = [check for check in self.checks if check.contribution > 0]
        return sorted(costly, key=lambda check: -check.contribution)[:count]

    def describe(self) -> str:
        """E.g. "1.8 OK (systemd 252, harden-gpg-signing.service)"."""
        version = self.systemd.split(" (")[0]
        details = ", ".join(part for part in (version, self.unit_name, f"policy {self.policy}" if self.policy
                                              else "") if part)
        return f"{self.score:.1f} {self.band} ({details})"

    def render_costliest(self, count: int = 5, indent: str = "  ") -> str:
        """The costliest checks as aligned lines: exposure, setting, systemd's description."""
        costly = self.costliest(count)
        if not costly:
            return f"{indent}(no check costs anything)"
        width = max(len(check.name) for check in costly)
        return "\n".join(f"{indent}{check.exposure:>4.1f}  {check.name:<{width}}  {check.description}"
                         for check in costly)

    def as_dict(self, count: int = 10) -> dict[str, Any]:
        return {"exposure": self.score, "band": self.band, "systemd": self.systemd, "unit": self.unit_name,
                "policy": self.policy, "warnings": list(self.warnings),
                "costliest": [check.as_dict() for check in self.costliest(count)]}


def _copy_in(machine: Machine, path: str, content: bytes) -> None:
    # No ${...} in the script: systemd expands those in a command line itself, before the shell sees them.
    made = machine.run(["/bin/sh", "-c", 'mkdir -p "$1" && cat > "$2"', "sh", path.rsplit("/", 1)[0], path],
                       stdin=content, purpose="exposure")
    if not made.ok:
        raise ExposureError(f"could not write {path} on the machine:\n{made.describe()}")


def score(machine: Machine, spec: Spec, policy: Path | None = None) -> Exposure:
    """Render ``spec`` as a unit file, write it into ``machine`` and score it with the machine's systemd."""
    # A unit file or a package's unit is scored as it ships: the unit with the spec's drop-in on top.
    under_test = unit_under_test(machine, spec, unit_name_for(spec), list)
    unit = under_test.name
    unit_text = under_test.as_one_file() or render_unit(spec)
    # The machine's name for the unit: unique where runs share a systemd (the host backend), so they never meet.
    directory = f"{UNIT_DIR}/{machine.service_unit(unit).removesuffix('.service')}"
    unit_path = f"{directory}/{unit}"
    _copy_in(machine, unit_path, unit_text.encode())
    analyze = ["systemd-analyze", "security", "--offline=yes", "--no-pager"]
    if policy is not None:
        _copy_in(machine, f"{directory}/policy.json", policy.read_bytes())
        analyze.append(f"--security-policy={directory}/policy.json")

    table = machine.run([*analyze, "--json=short", unit_path], purpose="exposure")
    if not table.ok:
        raise ExposureError(f"systemd-analyze security could not score {unit}:\n{table.describe()}\n"
                            f"the rendered unit:\n{unit_text}")
    checks = parse_checks(table.stdout)

    def passes(threshold: int) -> bool:
        result = machine.run([*analyze, f"--threshold={threshold}", unit_path], purpose="exposure")
        if result.signal is not None or result.exit_status not in (0, 1):
            raise ExposureError(f"systemd-analyze security --threshold={threshold} broke:\n{result.describe()}")
        return result.ok

    tenths = lowest_passing_threshold(passes)
    version = machine.run(["systemd-analyze", "--version"], purpose="exposure").stdout.splitlines()
    # What systemd says while loading the unit ("Failed to parse ..., ignoring") means a line was not scored.
    warnings = tuple(line.strip() for line in table.stderr.splitlines() if line.strip())
    return Exposure(tenths, checks, unit, unit_text, version[0] if version else "", str(policy) if policy else None,
                    warnings, unit_path)


def analyze_command(exposure: Exposure) -> str:
    """The command that scores the same unit by hand, inside the machine (for messages and docs)."""
    unit_path = exposure.unit_path or f"{UNIT_DIR}/{exposure.unit_name.removesuffix('.service')}/{exposure.unit_name}"
    directory = unit_path.rsplit("/", 1)[0]
    policy = [f"--security-policy={directory}/policy.json"] if exposure.policy else []
    return shlex.join(["systemd-analyze", "security", "--offline=yes", *policy, unit_path])


def check_policy(path: Path) -> None:
    """Raise ValueError with the reason when ``path`` is not a JSON object systemd could use as a policy."""
    try:
        policy = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    if not isinstance(policy, dict):
        raise ValueError(  # noqa: TRY004 - one exception type for every unusable policy file
            f"{path} must hold a JSON object keyed by check, e.g. {{\"PrivateNetwork\": {{\"weight\": 0}}}} "
            "(see systemd-analyze(1), --security-policy=)")


def failure_message(exposure: Exposure, spec: Spec, count: int = 5) -> str:
    """Why a spec's unit is over its ``max_exposure``: the score, the costliest checks, how to reproduce it."""
    assert spec.max_exposure is not None
    version = f" under {exposure.systemd.split(' (')[0]}" if exposure.systemd else ""
    policy = f" with the policy {exposure.policy}" if exposure.policy else ""
    headline = (f"exposure {exposure.score:.1f} <= {spec.max_exposure:.1f} failed: {exposure.unit_name} scores "
                f"{exposure.score:.1f} {exposure.band} in systemd-analyze security{version}{policy}, above the "
                f"max_exposure of {spec.path.name}")
    lines = [headline, "the checks that cost the most (exposure, setting, what systemd found):",
             exposure.render_costliest(count)]
    if exposure.warnings:
        lines.append("systemd-analyze said about the unit:")
        lines += [f"  {warning}" for warning in exposure.warnings]
    lines.append(f"by hand, inside the machine: {analyze_command(exposure)}")
    return "\n".join(lines)
