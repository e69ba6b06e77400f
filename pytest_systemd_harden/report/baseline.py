"""Baselines: what a suite proved last time, in a small file committed beside the specs, and what changed since.

A baseline holds, per spec: the exposure score, each scenario's outcome (the start counts as one), the hardening
directives in force (for a unit systemd loads, its own and the spec's drop-in on top, from the start item's
``hardening_in_force``: a package update that drops a directive of its unit is a regression), and - when enforcement or
denial checks ran - the directives proven enforced and the probes proven denied. Comparing a run with it gives:

* regressions (failing items): a scenario that passed now fails, the exposure rose, a directive was dropped or
  is no longer enforced, a denial is now allowed;
* improvements (reported, never failing): the reverse;
* notes: what could not be compared (not run this time, new scenarios, a directive's value changed).

What a run observed comes from the items' ``harden`` records (see plugin.py), so any item kind can take part
without this module importing it. The contract for enforcement and denial items:

* a record with ``"directive": "ProtectSystem"`` (or ``"ProtectSystem=strict"``) checks that the directive is
  enforced: the item passing means enforced; failing or skipping means not enforced;
* a record with ``"probe": "write:/etc"`` checks that the probe is denied: passing means denied, failing allowed;
* a record may instead list probes: ``"denied": [...]`` and ``"allowed": [...]``.

The file is YAML (or JSON, by its suffix), sorted, one fact per line, so a review diff reads as the change.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ..spec.load import Spec

FORMAT_VERSION = 1
START = "service starts under hardening"  # the start item's name: it is recorded with the scenarios
HEADER = """\
# pytest-systemd-harden baseline: what the hardening suite proved, per spec. Commit it; a change shows in review.
# Regenerate after an intended change: pytest --harden-baseline={name} --harden-baseline-update
"""


class BaselineError(ValueError):
    """The baseline file cannot be read; the message says which file and why."""


@dataclass(frozen=True)
class Snapshot:
    """What is known about one spec: from a baseline file, or observed in this run."""

    exposure: float | None = None
    scenarios: Mapping[str, str] = field(default_factory=dict)  # name -> passed, failed or skipped
    hardening: Mapping[str, str] = field(default_factory=dict)  # directive -> value, as in a unit file
    enforced: frozenset[str] | None = None  # directive names; None: no enforcement check ran
    unenforced: frozenset[str] | None = None
    denied: frozenset[str] | None = None  # probe keys; None: no denial check ran
    allowed: frozenset[str] | None = None
    # What was tested: backend, release, systemd and each named package's version (not the kernel: CI hosts vary).
    tested: Mapping[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The baseline-file form: sorted, and without what is unknown."""
        out: dict[str, Any] = {}
        if self.exposure is not None:
            out["exposure"] = self.exposure
        if self.scenarios:
            out["scenarios"] = dict(sorted(self.scenarios.items()))
        if self.hardening:
            out["hardening"] = dict(sorted(self.hardening.items()))
        for name in ("enforced", "unenforced", "denied", "allowed"):
            value: frozenset[str] | None = getattr(self, name)
            if value is not None:
                out[name] = sorted(value)
        if self.tested:
            out["tested"] = dict(sorted(self.tested.items()))
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Snapshot:
        if not isinstance(data, dict):
            raise BaselineError(f"{where}: expected a mapping, got {type(data).__name__}")
        unknown = set(data) - {"exposure", "scenarios", "hardening", "enforced", "unenforced", "denied", "allowed",
                               "tested"}
        if unknown:
            raise BaselineError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        exposure = data.get("exposure")
        if exposure is not None and (isinstance(exposure, bool) or not isinstance(exposure, (int, float))):
            raise BaselineError(f"{where}.exposure: expected a number, got {exposure!r}")

        def mapping(name: str) -> dict[str, str]:
            value = data.get(name) or {}
            if not isinstance(value, dict):
                raise BaselineError(f"{where}.{name}: expected a mapping")
            return {str(k): str(v) for k, v in value.items()}

        def names(name: str) -> frozenset[str] | None:
            value = data.get(name)
            if value is None:
                return None
            if not isinstance(value, list):
                raise BaselineError(f"{where}.{name}: expected a list")
            return frozenset(str(v) for v in value)

        return cls(float(exposure) if exposure is not None else None, mapping("scenarios"), mapping("hardening"),
                   names("enforced"), names("unenforced"), names("denied"), names("allowed"), mapping("tested"))

    def merged_over(self, older: Snapshot | None, spec: Spec | None) -> Snapshot:
        """This (possibly partial) observation, completed from ``older`` where this run did not look.

        A run with ``-k`` or with enforcement switched off must not erase what the baseline knew: scenarios not
        run keep their old outcome while the spec still has them; exposure and probe sets likewise.
        """
        if older is None:
            return self
        names = {s.name for s in spec.scenarios} | {START} if spec is not None else set(older.scenarios)
        scenarios = {name: outcome for name, outcome in older.scenarios.items() if name in names}
        scenarios.update(self.scenarios)
        return replace(
            self, scenarios=scenarios,
            exposure=self.exposure if self.exposure is not None else older.exposure,
            enforced=self.enforced if self.enforced is not None else older.enforced,
            unenforced=self.unenforced if self.unenforced is not None else older.unenforced,
            denied=self.denied if self.denied is not None else older.denied,
            allowed=self.allowed if self.allowed is not None else older.allowed,
            tested=self.tested or older.tested)


def _directive_name(text: str) -> str:
    return text.split("=", 1)[0].strip()


def spec_key(path: str | Path, release: str | None = None) -> str:
    """What records, reports and baselines key a spec's run by: its path, with ``[release]`` when the session runs
    the spec on several Debian releases (--harden-release=bookworm,trixie), one run each."""
    return f"{path}[{release}]" if release else str(path)


def spec_path_of(key: str) -> str:
    """The spec file of a :func:`spec_key`."""
    head, bracket, tail = key.rpartition("[")
    return head if bracket and tail.endswith("]") and tail[:-1].isalnum() else key


def tested_versions(tested: Mapping[str, Any]) -> dict[str, str]:
    """A start record's ``tested`` (Machine.tested) as the baseline keeps it: flat, without the kernel."""
    if tested.get("error"):
        return {}
    flat = {key: str(tested[key]) for key in ("backend", "release", "systemd") if tested.get(key)}
    flat.update({f"package {name}": str(version) for name, version in (tested.get("packages") or {}).items()})
    return flat


def item_name(record: Mapping[str, Any]) -> str:
    """The item's name within its spec ("sign a payload", "service starts under hardening")."""
    nodeid = str(record.get("nodeid", ""))
    return nodeid.split("::", 1)[1] if "::" in nodeid else nodeid


def observe(records: Iterable[Mapping[str, Any]], spec: Spec | None) -> Snapshot:
    """What this run's records (one spec's) show, with the hardening taken from the spec as loaded now."""
    scenarios: dict[str, str] = {}
    exposure: float | None = None
    enforced: set[str] | None = None
    unenforced: set[str] | None = None
    denied: set[str] | None = None
    allowed: set[str] | None = None
    tested: dict[str, str] = {}
    in_force: dict[str, str] | None = None
    for record in records:
        outcome = str(record.get("outcome", ""))
        check = record.get("check")
        if check == "start":
            scenarios[START] = outcome
            if isinstance(record.get("tested"), dict):
                tested = tested_versions(record["tested"])
            if isinstance(record.get("hardening_in_force"), dict):
                in_force = {str(k): str(v) for k, v in record["hardening_in_force"].items()}
        elif check == "scenario":
            scenarios[str(record.get("scenario") or item_name(record))] = outcome
        elif check == "exposure" and isinstance(record.get("exposure"), (int, float)):
            exposure = float(record["exposure"])
        if isinstance(record.get("directive"), str):
            enforced, unenforced = enforced or set(), unenforced or set()
            (enforced if outcome == "passed" else unenforced).add(_directive_name(record["directive"]))
        if isinstance(record.get("probe"), str):
            denied, allowed = denied or set(), allowed or set()
            (denied if outcome == "passed" else allowed).add(record["probe"])
        for key, found in (("denied", True), ("allowed", False)):
            if isinstance(record.get(key), list):
                denied, allowed = denied or set(), allowed or set()
                (denied if found else allowed).update(str(probe) for probe in record[key])
    if enforced is not None and unenforced is not None:
        enforced -= unenforced  # one failing check of a directive outweighs a passing one
    if denied is not None and allowed is not None:
        denied -= allowed
    hardening = {d.name: d.value for d in spec.hardening} if spec is not None else {}
    if in_force is not None:  # a unit systemd loads: its own directives count, as they are in force
        hardening = in_force

    def frozen(names: set[str] | None) -> frozenset[str] | None:
        return frozenset(names) if names is not None else None

    return Snapshot(exposure, scenarios, hardening, frozen(enforced), frozen(unenforced), frozen(denied),
                    frozen(allowed), tested)


# --- comparing ---------------------------------------------------------------------------------------------------

@dataclass
class Changes:
    """How a run differs from the baseline of one spec."""

    regressions: list[str] = field(default_factory=list)
    improvements: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)  # what was tested then and now: "systemd 252.39 -> 257.9"

    def as_dict(self) -> dict[str, list[str]]:
        return {"regressions": self.regressions, "improvements": self.improvements, "notes": self.notes,
                "versions": self.versions}


def compare(old: Snapshot, new: Snapshot, spec: Spec | None = None) -> Changes:
    """Regressions, improvements and notes of ``new`` against the baseline ``old`` (see the module docstring)."""
    changes = Changes()
    if old.tested and new.tested:
        changes.versions = [f"{name} {old.tested.get(name, '(none)')} -> {new.tested.get(name, '(none)')}"
                            for name in sorted(set(old.tested) | set(new.tested))
                            if old.tested.get(name) != new.tested.get(name)]
    _compare_scenarios(old, new, spec, changes)
    if old.exposure is not None and new.exposure is not None:
        # Compare in tenths, as systemd prints them: 1.8 vs 2.3, not 1.7999999.
        before, after = round(old.exposure * 10), round(new.exposure * 10)
        if after > before:
            changes.regressions.append(f"exposure rose from {old.exposure:.1f} to {new.exposure:.1f} "
                                       "(systemd-analyze security: higher is weaker)")
        elif after < before:
            changes.improvements.append(f"exposure fell from {old.exposure:.1f} to {new.exposure:.1f}")
    elif old.exposure is not None:
        changes.notes.append(f"exposure not scored this time (baseline: {old.exposure:.1f})")
    _compare_hardening(old, new, changes)
    _compare_sets(old.enforced, new.enforced, new.unenforced, changes, kind="directive",
                  lost="{} was enforced in the baseline, now its enforcement check fails",
                  won="{} is now enforced (it was not in the baseline)",
                  skip=set(old.hardening) - set(new.hardening))  # a dropped directive is reported above
    _compare_sets(old.denied, new.denied, new.allowed, changes, kind="probe",
                  lost="{} was denied in the baseline, now it is allowed",
                  won="{} is now denied (it was allowed in the baseline)", skip=set())
    return changes


def _compare_scenarios(old: Snapshot, new: Snapshot, spec: Spec | None, changes: Changes) -> None:
    in_spec = {s.name for s in spec.scenarios} | {START} if spec is not None else None
    for name, before in sorted(old.scenarios.items()):
        after = new.scenarios.get(name)
        label = "the start" if name == START else f"scenario {name!r}"
        if after is None:
            if in_spec is not None and name not in in_spec:
                changes.notes.append(f"{label} is no longer in the spec (it {before} in the baseline)")
            else:
                changes.notes.append(f"{label} did not run this time (baseline: {before})")
        elif before == "passed" and after == "failed":
            changes.regressions.append(f"{label} passed in the baseline, now it fails")
        elif before == "failed" and after == "passed":
            changes.improvements.append(f"{label} failed in the baseline, now it passes")
        elif before != after:
            changes.notes.append(f"{label}: {before} in the baseline, {after} now")
    for name, after in sorted(new.scenarios.items()):
        if name not in old.scenarios:
            changes.notes.append(f"new scenario {name!r} ({after}), not in the baseline")


def _compare_hardening(old: Snapshot, new: Snapshot, changes: Changes) -> None:
    if not new.hardening and not old.hardening:
        return
    for name, value in sorted(old.hardening.items()):
        if name not in new.hardening:
            changes.regressions.append(f"{name}={value} was dropped from the hardening (it was in force in the "
                                       "baseline)")
        elif new.hardening[name] != value:
            # Stronger or weaker depends on the directive: the exposure and enforcement checks judge it.
            changes.notes.append(f"{name} changed from {value!r} to {new.hardening[name]!r}")
    for name, value in sorted(new.hardening.items()):
        if name not in old.hardening:
            changes.improvements.append(f"{name}={value} was added to the hardening")


def _compare_sets(old_good: frozenset[str] | None, new_good: frozenset[str] | None, new_bad: frozenset[str] | None,
                  changes: Changes, *, kind: str, lost: str, won: str, skip: set[str]) -> None:
    if old_good is None:
        if new_good:
            changes.notes.append(f"{len(new_good)} {kind}(s) checked this time, none in the baseline")
        return
    if new_good is None and new_bad is None:
        if old_good:
            changes.notes.append(f"no {kind} checks ran this time (baseline: {len(old_good)} passed)")
        return
    for name in sorted(old_good - skip):
        if new_bad is not None and name in new_bad:
            changes.regressions.append(lost.format(name))
        elif new_good is None or name not in new_good:
            changes.notes.append(f"{kind} {name} was not checked this time")
    for name in sorted((new_good or frozenset()) - old_good):
        changes.improvements.append(won.format(name))


# --- the file ----------------------------------------------------------------------------------------------------

@dataclass
class Baseline:
    """A baseline file: snapshots keyed by spec path, relative to the file's directory (portable across checkouts)."""

    path: Path
    specs: dict[str, Snapshot] = field(default_factory=dict)

    def key(self, spec_path: str | Path) -> str:
        relative = os.path.relpath(Path(spec_path).resolve(), self.path.resolve().parent)
        return Path(relative).as_posix()

    def get(self, spec_path: str | Path) -> Snapshot | None:
        return self.specs.get(self.key(spec_path))

    @classmethod
    def load(cls, path: str | Path) -> Baseline:
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return cls(path)
        except OSError as exc:
            raise BaselineError(f"{path}: cannot read the baseline: {exc.strerror}") from None
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise BaselineError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from None
        if data is None:
            return cls(path)
        if not isinstance(data, dict) or not isinstance(data.get("specs", {}), dict):
            raise BaselineError(f"{path}: expected a mapping with `specs:` (spec path -> what it proved)")
        if data.get("version", FORMAT_VERSION) != FORMAT_VERSION:
            raise BaselineError(f"{path}: baseline format version {data.get('version')!r}; this plugin reads "
                                f"version {FORMAT_VERSION} (regenerate it with --harden-baseline-update)")
        specs = {str(key): Snapshot.from_dict(value, f"{path}: specs.{key}")
                 for key, value in (data.get("specs") or {}).items()}
        return cls(path, specs)

    def updated(self, observed: Mapping[str, tuple[Snapshot, Spec | None]]) -> Baseline:
        """A copy with ``observed`` (spec path -> (snapshot, spec)) merged in; specs not run this time are kept."""
        specs = dict(self.specs)
        for spec_path, (snapshot, spec) in observed.items():
            key = self.key(spec_path)
            specs[key] = snapshot.merged_over(specs.get(key), spec)
        return Baseline(self.path, dict(sorted(specs.items())))

    def dumps(self) -> str:
        data = {"version": FORMAT_VERSION, "specs": {key: snap.as_dict() for key, snap in sorted(self.specs.items())}}
        if self.path.suffix == ".json":
            return json.dumps(data, indent=2, sort_keys=True) + "\n"
        body = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True, width=120)
        return HEADER.format(name=self.path.name) + body

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(self.dumps())
        temporary.replace(self.path)  # a killed run never leaves half a baseline behind


def render(changes: Changes, spec_name: str, baseline: Path, *, update_hint: bool = True) -> str:
    """The failure message of a spec's baseline item."""
    lines = [f"{len(changes.regressions)} regression(s) against the baseline {baseline} for {spec_name}:"]
    lines += [f"  - {regression}" for regression in changes.regressions]
    if changes.versions:  # a regression that came with a version bump points at the bump
        lines.append("what was tested changed since the baseline:")
        lines += [f"    {version}" for version in changes.versions]
    if changes.improvements:
        lines.append("improvements:")
        lines += [f"  + {improvement}" for improvement in changes.improvements]
    if changes.notes:
        lines.append("notes:")
        lines += [f"    {note}" for note in changes.notes]
    if update_hint:
        lines.append(f"if the change is intended, accept it: pytest --harden-baseline={baseline} "
                     "--harden-baseline-update")
    return "\n".join(lines)


def records_by_spec(records: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """The ``harden`` records grouped by their spec path, in first-seen order."""
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        grouped.setdefault(str(record.get("spec", "")), []).append(record)
    return grouped
