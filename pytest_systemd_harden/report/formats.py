"""Reports of a hardening run, built from the items' ``harden`` records: a terminal table, the JSON report's
per-spec section, flat JUnit XML properties, and a self-contained HTML page with a scenarios x directives matrix.

Everything here is plain data in, text out: the records are what items put in their ``user_properties``
(plus the ``nodeid`` and ``outcome`` pytest adds), so the same reports can be made from a saved JSON report.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import SpecError
from ..spec.load import Spec, load_spec
from .baseline import START, Snapshot, item_name, observe, records_by_spec, spec_path_of

Record = Mapping[str, Any]


@dataclass(frozen=True)
class Diagnosed:
    """A diagnosis of one failing item, as the report needs it."""

    item: str  # the scenario's name, or START
    verdict: str  # found, not-hardening, inconclusive, budget
    culprits: tuple[str, ...]  # directive names
    relaxation: str = ""
    verified: bool = False

    @classmethod
    def from_record(cls, item: str, diagnosis: Mapping[str, Any]) -> Diagnosed:
        culprits = tuple(str(c.get("directive", "")) for c in diagnosis.get("culprits") or [])
        # Two culprits often share one relaxation (DynamicUser= and ProtectSystem=: CacheDirectory=): say it once.
        relaxations = dict.fromkeys(str(c["relaxation"]) for c in diagnosis.get("culprits") or []
                                    if c.get("relaxation"))
        return cls(item, str(diagnosis.get("verdict", "")), culprits, "; ".join(relaxations),
                   bool(diagnosis.get("verified")))


@dataclass
class SpecReport:
    """One spec's results, gathered from its records."""

    path: str
    label: str  # the path as shown: relative to the run's root directory when inside it
    name: str = ""  # the spec's name (its label), when the spec could be loaded
    directives: list[tuple[str, str]] = field(default_factory=list)  # (name, value) in spec order
    snapshot: Snapshot = field(default_factory=Snapshot)  # outcomes, exposure, enforcement (see report/baseline.py)
    exposure: Mapping[str, Any] | None = None  # the exposure item's record
    diagnoses: list[Diagnosed] = field(default_factory=list)
    baseline: Mapping[str, Any] | None = None  # the baseline item's record
    messages: dict[str, str] = field(default_factory=dict)  # item -> failure message
    items: list[str] = field(default_factory=list)  # start and scenario items, in run order
    tested: Mapping[str, Any] | None = None  # what the machine was (Machine.tested), from the start item's record

    def tested_text(self) -> str:
        """One line: "nspawn, Debian trixie, systemd 257.9-1~deb13u1, kernel 6.18.44; memcached 1.6.38-1"."""
        if not self.tested:
            return ""
        return tested_text(self.tested)

    @property
    def passed(self) -> int:
        return sum(1 for outcome in self.snapshot.scenarios.values() if outcome == "passed")

    @property
    def failed(self) -> int:
        return sum(1 for outcome in self.snapshot.scenarios.values() if outcome == "failed")

    def diagnosis_of(self, item: str) -> Diagnosed | None:
        return next((d for d in self.diagnoses if d.item == item), None)

    def exposure_text(self) -> str:
        if self.exposure is None or not isinstance(self.exposure.get("exposure"), (int, float)):
            return "-"
        text = f"{self.exposure['exposure']:.1f} {self.exposure.get('band', '')}".rstrip()
        limit = self.exposure.get("max_exposure")
        if isinstance(limit, (int, float)):
            text += f" (max {limit:.1f})"
        return text

    def directives_text(self) -> str:
        enforced, unenforced = self.snapshot.enforced, self.snapshot.unenforced
        if enforced is None and unenforced is None:
            return f"{len(self.directives)} (not probed)" if self.directives else "-"
        return f"{len(enforced or ())} enforced, {len(unenforced or ())} not"

    def diagnoses_text(self) -> str:
        culprits = sorted({c for d in self.diagnoses if d.verdict == "found" for c in d.culprits})
        others = [d for d in self.diagnoses if d.verdict != "found"]
        parts = [", ".join(culprits)] if culprits else []
        if others:
            parts.append(f"{len(others)} not found")
        return "; ".join(parts) or "-"

    def baseline_text(self) -> str:
        if self.baseline is None:
            return "-"
        if self.baseline.get("missing"):
            return "not in baseline"
        regressions = len(self.baseline.get("regressions") or [])
        improvements = len(self.baseline.get("improvements") or [])
        parts = [f"{regressions} regression(s)" if regressions else "no regression"]
        if improvements:
            parts.append(f"{improvements} improvement(s)")
        return ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """The spec's entry in the JSON report's ``specs`` list."""
        return {
            "spec": self.label, "name": self.name, "exposure": self.exposure.get("exposure") if self.exposure else None,
            "band": self.exposure.get("band") if self.exposure else None,
            "max_exposure": self.exposure.get("max_exposure") if self.exposure else None,
            "costliest": list(self.exposure.get("costliest") or []) if self.exposure else [],
            "outcomes": dict(self.snapshot.scenarios), "passed": self.passed, "failed": self.failed,
            "directives": [f"{name}={value}" for name, value in self.directives],
            "enforced": sorted(self.snapshot.enforced) if self.snapshot.enforced is not None else None,
            "unenforced": sorted(self.snapshot.unenforced) if self.snapshot.unenforced is not None else None,
            "denied": sorted(self.snapshot.denied) if self.snapshot.denied is not None else None,
            "allowed": sorted(self.snapshot.allowed) if self.snapshot.allowed is not None else None,
            "diagnoses": [{"item": d.item, "verdict": d.verdict, "culprits": list(d.culprits),
                           "relaxation": d.relaxation, "verified": d.verified} for d in self.diagnoses],
            "baseline": dict(self.baseline) if self.baseline else None,
            "tested": dict(self.tested) if self.tested else None,
        }


def tested_text(tested: Mapping[str, Any]) -> str:
    """What a machine was, as one line of a report."""
    if tested.get("error"):
        return f"{tested.get('backend', '?')} (could not tell: {tested['error']})"
    text = (f"{tested.get('backend', '?')}, Debian {tested.get('release', '?')}, systemd {tested.get('systemd', '?')}, "
            f"kernel {tested.get('kernel', '?')}")
    packages = tested.get("packages") or {}
    if packages:
        text += "; " + ", ".join(f"{name} {version}" for name, version in sorted(packages.items()))
    return text


def _display(path: str, root: Path | None) -> str:
    if root is not None:
        relative = os.path.relpath(path, root)
        if not relative.startswith(".."):
            return relative
    return path


def _load_quietly(path: Path) -> Spec | None:
    try:
        return load_spec(spec_path_of(str(path)))
    except SpecError:
        return None  # edited or removed since the run: report what the records say


def summarize(records: Sequence[Record], root: Path | None = None,
              load: Callable[[Path], Spec | None] = _load_quietly) -> list[SpecReport]:
    """One :class:`SpecReport` per spec that has records, in the order the specs ran."""
    reports = []
    for path, spec_records in records_by_spec(records).items():
        if not path:
            continue
        spec = load(Path(path))
        report = SpecReport(path, _display(path, root), spec.label if spec else Path(path).stem,
                            [(d.name, d.value) for d in spec.hardening] if spec else [],
                            observe(spec_records, spec))
        for record in spec_records:
            check, name = record.get("check"), item_name(record)
            item = START if check == "start" else str(record.get("scenario") or name)
            if check == "start" and isinstance(record.get("tested"), dict):
                report.tested = record["tested"]
            if check in ("start", "scenario"):
                report.items.append(item)
                if isinstance(record.get("diagnosis"), dict):
                    report.diagnoses.append(Diagnosed.from_record(item, record["diagnosis"]))
            elif check == "exposure":
                report.exposure = record
            elif check == "baseline":
                report.baseline = record
            if record.get("outcome") == "failed" and record.get("message"):
                report.messages[item if check in ("start", "scenario") else name] = str(record["message"])
        reports.append(report)
    return reports


# --- terminal ----------------------------------------------------------------------------------------------------

COLUMNS = ("spec", "exposure", "scenarios", "directives", "diagnoses", "baseline")


def release_matrix(reports: Sequence[SpecReport]) -> list[str]:
    """Specs run on several Debian releases (--harden-release=a,b): one row per spec, one column per release."""
    releases: list[str] = []
    cells: dict[str, dict[str, str]] = {}
    for report in reports:
        path = spec_path_of(report.label)
        if path == report.label:
            continue
        release = report.label[len(path) + 1:-1]
        releases += [release] if release not in releases else []
        cells.setdefault(path, {})[release] = f"{report.passed} passed, {report.failed} failed"
    if len(releases) < 2:
        return []
    rows = [("releases", *releases)] + [(path, *(row.get(r, "-") for r in releases)) for path, row in cells.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def summary_lines(reports: Sequence[SpecReport]) -> list[str]:
    """The terminal summary: one row per spec, then baseline regressions and improvements spelled out."""
    rows = [COLUMNS] + [(r.label, r.exposure_text(), f"{r.passed} passed, {r.failed} failed",
                         r.directives_text(), r.diagnoses_text(), r.baseline_text()) for r in reports]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines += release_matrix(reports)
    lines += [f"tested {r.label}: {r.tested_text()}" for r in reports if r.tested]
    for report in reports:
        changes = report.baseline or {}
        for title, key, mark in (("regressions", "regressions", "-"), ("improvements", "improvements", "+")):
            if changes.get(key):
                lines.append(f"baseline {title} of {report.label}:")
                lines += [f"  {mark} {entry}" for entry in changes[key]]
        if changes.get("versions"):  # beside the regressions: what changed in what was tested
            lines.append(f"tested since the baseline of {report.label}: " + "; ".join(changes["versions"]))
    return lines


def not_started_lines(not_started: Mapping[str, tuple[str, int]]) -> list[str]:
    """One line per spec whose service did not start: one cause, its items not run, where to look."""
    return [f"{spec}: 1 cause, the service did not start ({reason}); {count} item{'s' if count != 1 else ''} not run. "
            f"Fix '{spec}::service starts under hardening' first: its failure has the reason and the diagnosis"
            for spec, (reason, count) in not_started.items()]


# --- JUnit XML ---------------------------------------------------------------------------------------------------

def junit_properties(record: Record, root: Path | None = None) -> list[tuple[str, str]]:
    """Flat, readable properties for a JUnit ``<properties>`` block, from an item's ``harden`` record (the spec's
    path relative to ``root``, the run's root directory, when inside it)."""
    props: list[tuple[str, str]] = [("harden_spec", _display(str(record.get("spec", "")), root)),
                                    ("harden_check", str(record.get("check", "")))]
    tested = record.get("tested")
    if isinstance(tested, dict):
        for key in ("backend", "release", "systemd", "kernel"):
            if tested.get(key):
                props.append((f"harden_{key}", str(tested[key])))
        if tested.get("packages"):
            props.append(("harden_packages", json.dumps(tested["packages"], sort_keys=True)))
    if record.get("scenario"):
        props.append(("harden_scenario", str(record["scenario"])))
    if isinstance(record.get("exposure"), (int, float)):
        props.append(("harden_exposure", f"{record['exposure']:.1f}"))
        props.append(("harden_band", str(record.get("band", ""))))
        if isinstance(record.get("max_exposure"), (int, float)):
            props.append(("harden_max_exposure", f"{record['max_exposure']:.1f}"))
    diagnosis = record.get("diagnosis")
    if isinstance(diagnosis, dict):
        found = Diagnosed.from_record("", diagnosis)
        props.append(("harden_verdict", found.verdict))
        if found.culprits:
            props.append(("harden_culprit", ", ".join(found.culprits)))
        if found.relaxation:
            props.append(("harden_relaxation", found.relaxation))
        if diagnosis.get("spec_change"):
            props.append(("harden_spec_change", str(diagnosis["spec_change"])))
    for key in ("regressions", "improvements"):
        if isinstance(record.get(key), list):
            props.append((f"harden_{key}", str(len(record[key]))))
    if isinstance(record.get("directive"), str):
        props.append(("harden_directive", record["directive"]))
    return props


# --- HTML --------------------------------------------------------------------------------------------------------

# Cell states of the matrix: (css class, text shown, meaning for the legend).
CELL_STATES = {
    "culprit": ("✗ culprit", "the diagnosis found this directive breaks the scenario"),
    # Short marks keep a matrix of 30 directives readable; the colour, the legend and each cell's title say more.
    "enforced": ("✓", "the scenario passes with the directive in force, and its enforcement was proven"),
    "unenforced": ("⚠", "the scenario passes, but the directive's enforcement check failed"),
    "in-force": ("✓", "the scenario passes with the directive in force"),
    "not-relevant": ("–", "the scenario fails, but not because of this directive"),
    "undiagnosed": ("?", "the scenario fails and no diagnosis named a culprit"),
    "not-run": ("", "the scenario did not run"),
}


def matrix_state(report: SpecReport, item: str, directive: str) -> str:
    """The state of one matrix cell: how ``directive`` relates to the outcome of ``item``."""
    outcome = report.snapshot.scenarios.get(item)
    diagnosis = report.diagnosis_of(item)
    if diagnosis is not None and directive in diagnosis.culprits:
        return "culprit"
    if outcome == "passed":
        if report.snapshot.unenforced and directive in report.snapshot.unenforced:
            return "unenforced"
        if report.snapshot.enforced and directive in report.snapshot.enforced:
            return "enforced"
        return "in-force"
    if outcome == "failed":
        return "not-relevant" if diagnosis is not None and diagnosis.verdict in ("found", "not-hardening") \
            else "undiagnosed"
    return "not-run"


CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1d1d1f; background: #fff; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .5em 0 1em; }
th, td { border: 1px solid #d0d0d0; padding: .25em .5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
table.matrix th.directive { writing-mode: vertical-rl; transform: rotate(180deg); white-space: nowrap;
  font-weight: normal; font-family: ui-monospace, monospace; font-size: 12px; }
table.matrix td { text-align: center; min-width: 1.6em; white-space: nowrap; }
.scroll { overflow-x: auto; }
table.matrix td.scenario { text-align: left; white-space: nowrap; }
.culprit { background: #f8c9c4; color: #8a1005; font-weight: bold; }
.enforced { background: #bfe8c4; } .in-force { background: #e3f5e5; }
.unenforced { background: #ffe6a6; } .not-relevant { background: #f0f0f0; color: #888; }
.undiagnosed { background: #fff3cd; } .not-run { background: #fafafa; }
.passed { color: #137a2a; font-weight: bold; } .failed { color: #b3180b; font-weight: bold; }
.skipped { color: #7a6200; }
.regression { color: #b3180b; } .improvement { color: #137a2a; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; font-size: 12px; max-height: 30em; }
code { font-family: ui-monospace, monospace; }
.legend span { display: inline-block; padding: 0 .4em; margin-right: .6em; border: 1px solid #d0d0d0; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def render_html(reports: Sequence[SpecReport], title: str = "systemd hardening report",
                now: datetime | None = None) -> str:
    """One self-contained HTML page (inline CSS, no scripts, no external assets)."""
    when = (now or datetime.now(timezone.utc)).strftime("%Y-%m-%d %H:%M UTC")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
           f"<h1>{_e(title)}</h1>", f"<p>Generated by pytest-systemd-harden, {_e(when)}.</p>"]
    out.append('<table class="overview"><thead><tr>' + "".join(f"<th>{_e(c)}</th>" for c in COLUMNS)
               + "</tr></thead><tbody>")
    for index, report in enumerate(reports):
        out.append(f'<tr><td><a href="#spec-{index}">{_e(report.label)}</a></td><td>{_e(report.exposure_text())}</td>'
                   f"<td>{report.passed} passed, {report.failed} failed</td><td>{_e(report.directives_text())}</td>"
                   f"<td>{_e(report.diagnoses_text())}</td><td>{_e(report.baseline_text())}</td></tr>")
    out.append("</tbody></table>")
    out.append('<p class="legend">' + "".join(f'<span class="{state}" title="{_e(meaning)}">{_e(text) or "&nbsp;"}'
                                               f"</span>{_e(meaning)}<br>"
                                               for state, (text, meaning) in CELL_STATES.items()) + "</p>")
    for index, report in enumerate(reports):
        out += _spec_section(index, report)
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _spec_section(index: int, report: SpecReport) -> list[str]:
    out = [f'<section id="spec-{index}" data-spec="{_e(report.path)}">',
           f"<h2>{_e(report.name)} <small><code>{_e(report.label)}</code></small></h2>"]
    if report.tested:
        out.append(f'<p class="tested">Tested on: {_e(report.tested_text())}</p>')
    if report.exposure is not None:
        out.append(f"<p>Exposure (systemd-analyze security): <b>{_e(report.exposure_text())}</b>, "
                   f"{_e(report.exposure.get('systemd', ''))}</p>")
        costliest = report.exposure.get("costliest") or []
        if costliest:
            out.append('<table class="costliest"><thead><tr><th>exposure</th><th>check</th><th>what systemd found'
                       "</th></tr></thead><tbody>")
            out += [f"<tr><td>{c.get('exposure', 0):.1f}</td><td><code>{_e(c.get('name', ''))}</code></td>"
                    f"<td>{_e(c.get('description', ''))}</td></tr>" for c in costliest]
            out.append("</tbody></table>")
    out += _matrix(index, report)
    for diagnosis in report.diagnoses:
        label = "the start" if diagnosis.item == START else f"scenario {diagnosis.item!r}"
        out.append(f"<p>Diagnosis of {_e(label)}: <b>{_e(diagnosis.verdict)}</b>"
                   + (f", culprit {_e(', '.join(diagnosis.culprits))}" if diagnosis.culprits else "")
                   + (f"; smallest relaxation: {_e(diagnosis.relaxation)}" if diagnosis.relaxation else "")
                   + (" (verified)" if diagnosis.verified else "") + "</p>")
    if report.baseline is not None:
        out.append("<h3>Baseline</h3><ul>")
        for key, css in (("regressions", "regression"), ("improvements", "improvement"), ("notes", "note")):
            out += [f'<li class="{css}">{_e(key[:-1])}: {_e(entry)}</li>' for entry in report.baseline.get(key) or []]
        out.append("</ul>")
    for item, message in report.messages.items():
        out.append(f"<details><summary>Failure of {_e(item)}</summary><pre>{_e(message)}</pre></details>")
    out.append("</section>")
    return out


def _matrix(index: int, report: SpecReport) -> list[str]:
    items = report.items or list(report.snapshot.scenarios)
    names = [name for name, _value in report.directives]
    if not items or not names:
        return ["<p>No scenario × directive matrix: " + ("no hardening." if not names else "no scenario ran.")
                + "</p>"]
    status = {name: "enforced" if report.snapshot.enforced and name in report.snapshot.enforced
              else "not enforced" if report.snapshot.unenforced and name in report.snapshot.unenforced
              else "not probed" for name in names}
    values = dict(report.directives)
    out = ['<div class="scroll">',
           f'<table class="matrix" id="matrix-{index}"><caption>scenarios × directives</caption><thead><tr>'
           "<th>scenario</th><th>outcome</th>"
           + "".join(f'<th class="directive" data-directive="{_e(n)}" title="{_e(n)}={_e(values[n])} '
                     f'({status[n]})">{_e(n)}</th>' for n in names) + "</tr></thead><tbody>"]
    for item in items:
        outcome = report.snapshot.scenarios.get(item, "not run")
        cells = []
        for name in names:
            state = matrix_state(report, item, name)
            text, meaning = CELL_STATES[state]
            cells.append(f'<td class="{state}" data-directive="{_e(name)}" data-state="{state}" '
                         f'title="{_e(name)}: {_e(meaning)}">{_e(text)}</td>')
        out.append(f'<tr data-scenario="{_e(item)}"><td class="scenario">{_e(item)}</td>'
                   f'<td class="{_e(outcome)}">{_e(outcome)}</td>{"".join(cells)}</tr>')
    out.append("</tbody></table></div>")
    return out


def json_report(records: Sequence[Record], root: Path | None = None) -> str:
    """The ``--harden-json`` document: every item's record, and a summary per spec."""
    reports = summarize(records, root)
    # Spec paths relative to the run's root directory, as every other report shows them: the file travels.
    items = [{**record, "spec": _display(str(record["spec"]), root)} if record.get("spec") else dict(record)
             for record in records]
    return json.dumps({"items": items, "specs": [r.as_dict() for r in reports]}, indent=2, default=str) + "\n"
