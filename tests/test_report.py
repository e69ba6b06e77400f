"""Reports: the terminal table, the JSON report's per-spec section, JUnit XML properties, and the HTML page with
its scenarios x directives matrix - built from one real run, and the page checked in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from pytest_systemd_harden.report import formats as report
from pytest_systemd_harden.report.baseline import START
from pytest_systemd_harden.report.formats import SpecReport, matrix_state, summarize
from pytest_systemd_harden.spec.load import load_spec
from pytest_systemd_harden.spec.releases import DEFAULT_RELEASE, RELEASES

SPEC = """\
name: demo
max_exposure: 9.5
service:
  exec_start: /bin/sleep infinity
hardening:
  DynamicUser: yes
  ProtectSystem: strict
  PrivateDevices: yes
scenarios:
  - name: the system is read-only
    inside: touch /etc/probe
    expect: {exit: 1, stderr: Read-only file system}
  - name: writes its cache
    inside: mkdir -p /var/cache/demo && touch /var/cache/demo/entry
"""


# --- pure: from records to reports ----------------------------------------------------------------------------

def records(spec_path: str) -> list[dict[str, Any]]:
    diagnosis = {"verdict": "found", "verified": True, "culprits": [
        {"directive": "ProtectSystem", "relaxation": "grant /var/cache/demo"},
        {"directive": "DynamicUser", "relaxation": "grant /var/cache/demo"}], "spec_change": "CacheDirectory: demo"}
    return [
        {"spec": spec_path, "check": "start", "nodeid": f"h.yaml::{START}", "outcome": "passed"},
        {"spec": spec_path, "check": "scenario", "scenario": "the system is read-only", "outcome": "passed",
         "nodeid": "h.yaml::the system is read-only"},
        {"spec": spec_path, "check": "scenario", "scenario": "writes its cache", "outcome": "failed",
         "nodeid": "h.yaml::writes its cache", "diagnosis": diagnosis, "message": "scenario failed <here>"},
        {"spec": spec_path, "check": "enforcement", "directive": "PrivateDevices", "outcome": "passed",
         "nodeid": "h.yaml::PrivateDevices=yes is enforced"},
        {"spec": spec_path, "check": "enforcement", "directive": "ProtectSystem", "outcome": "failed",
         "nodeid": "h.yaml::ProtectSystem=strict is enforced"},
        {"spec": spec_path, "check": "exposure", "exposure": 8.3, "band": "EXPOSED", "max_exposure": 9.5,
         "costliest": [{"name": "PrivateNetwork=", "description": "net", "exposure": 0.5}],
         "nodeid": "h.yaml::exposure <= 9.5", "outcome": "passed"},
    ]


@pytest.fixture
def one_report(tmp_path: Path) -> SpecReport:
    path = tmp_path / "h.yaml"
    path.write_text(SPEC)
    (found,) = summarize(records(str(path)), tmp_path)
    return found


SYSTEMD = RELEASES[DEFAULT_RELEASE].systemd  # the machines' systemd major version


def test_a_spec_report_gathers_its_records(one_report: SpecReport) -> None:
    assert (one_report.label, one_report.name) == ("h.yaml", "demo")
    assert one_report.items == [START, "the system is read-only", "writes its cache"]
    assert (one_report.passed, one_report.failed) == (2, 1)
    assert one_report.directives == [("DynamicUser", "yes"), ("ProtectSystem", "strict"), ("PrivateDevices", "yes")]
    assert one_report.exposure_text() == "8.3 EXPOSED (max 9.5)"
    assert one_report.directives_text() == "1 enforced, 1 not"
    assert one_report.diagnoses_text() == "DynamicUser, ProtectSystem"
    assert one_report.diagnoses[0].relaxation == "grant /var/cache/demo"  # said once for both culprits
    assert one_report.messages == {"writes its cache": "scenario failed <here>"}


@pytest.mark.parametrize(("item", "directive", "state"), [
    ("writes its cache", "ProtectSystem", "culprit"),
    ("writes its cache", "DynamicUser", "culprit"),
    ("writes its cache", "PrivateDevices", "not-relevant"),
    ("the system is read-only", "PrivateDevices", "enforced"),
    ("the system is read-only", "ProtectSystem", "unenforced"),
    ("the system is read-only", "DynamicUser", "in-force"),
    ("never ran", "DynamicUser", "not-run"),
])
def test_matrix_cells(one_report: SpecReport, item: str, directive: str, state: str) -> None:
    assert matrix_state(one_report, item, directive) == state


def test_a_failure_without_diagnosis_is_undiagnosed(one_report: SpecReport) -> None:
    one_report.diagnoses.clear()
    assert matrix_state(one_report, "writes its cache", "ProtectSystem") == "undiagnosed"


def test_the_terminal_table_has_one_row_per_spec(one_report: SpecReport) -> None:
    lines = report.summary_lines([one_report])
    assert lines[0].split() == ["spec", "exposure", "scenarios", "directives", "diagnoses", "baseline"]
    assert lines[1].split("  ")[0] == "h.yaml"
    for cell in ("8.3 EXPOSED (max 9.5)", "2 passed, 1 failed", "1 enforced, 1 not", "DynamicUser, ProtectSystem"):
        assert cell in lines[1]
    assert lines[0].index("exposure") == lines[1].index("8.3")  # columns line up


def test_junit_properties_are_flat_and_readable() -> None:
    by_check = {r["check"] + str(r.get("directive", "")): dict(report.junit_properties(r)) for r in records("/s.yaml")}
    assert by_check["scenario"] == {
        "harden_spec": "/s.yaml", "harden_check": "scenario", "harden_scenario": "writes its cache",
        "harden_verdict": "found", "harden_culprit": "ProtectSystem, DynamicUser",
        "harden_relaxation": "grant /var/cache/demo", "harden_spec_change": "CacheDirectory: demo"}
    assert by_check["exposure"] == {"harden_spec": "/s.yaml", "harden_check": "exposure", "harden_exposure": "8.3",
                                    "harden_band": "EXPOSED", "harden_max_exposure": "9.5"}
    assert by_check["enforcementPrivateDevices"]["harden_directive"] == "PrivateDevices"


def test_the_html_escapes_and_stays_self_contained(tmp_path: Path) -> None:
    path = tmp_path / "h.yaml"
    path.write_text(SPEC.replace("writes its cache", "<script>alert(1)</script>"))
    data = [dict(r, scenario="<script>alert(1)</script>") if r.get("scenario") == "writes its cache" else r
            for r in records(str(path))]
    page = report.render_html(summarize(data, tmp_path))
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert_self_contained(page)


def assert_self_contained(page: str) -> None:
    """No script, no stylesheet or image fetched from anywhere: one file that opens from a CI artifact."""
    for needle in ("<script", "<link", "src=", "http://", "https://", "@import", "url("):
        assert needle not in page, needle


# --- one real run, read by every report --------------------------------------------------------------------------

@dataclass
class Run:
    path: Path
    stdout: str
    returncode: int

    def file(self, name: str) -> Path:
        return self.path / name


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory, machine: object) -> Iterator[Run]:
    """The plugin run once on a spec with a passing and a failing (diagnosed) scenario, writing every report."""
    path = tmp_path_factory.mktemp("report-run")
    (path / "harden.yaml").write_text(SPEC)
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "--junitxml=junit.xml",
                           "--harden-json=report.json", "--harden-html=report.html", str(path)],
                          cwd=path, capture_output=True, text=True, timeout=600, check=False)
    yield Run(path, done.stdout, done.returncode)


def test_the_real_run_failed_only_where_expected(real_run: Run) -> None:
    assert real_run.returncode == 1
    assert "harden.yaml::writes its cache FAILED" in real_run.stdout
    assert "harden.yaml::the system is read-only PASSED" in real_run.stdout


def test_the_summary_table_shows_the_spec(real_run: Run) -> None:
    data = json.loads(real_run.file("report.json").read_text())
    (spec,) = data["specs"]
    lines = real_run.stdout.splitlines()
    start = lines.index(next(line for line in lines if "systemd hardening summary" in line))
    assert lines[start + 1].split() == ["spec", "exposure", "scenarios", "directives", "diagnoses", "baseline"]
    row = lines[start + 2]
    assert row.startswith("harden.yaml ")
    assert f"{spec['exposure']:.1f} {spec['band']} (max 9.5)" in row
    assert f"{spec['passed']} passed, 1 failed" in row
    assert ", ".join(sorted({c for d in spec["diagnoses"] for c in d["culprits"]})) in row
    assert f"tested harden.yaml: nspawn, Debian {DEFAULT_RELEASE}, systemd {spec['tested']['systemd']}, kernel " \
        in real_run.stdout


def test_the_json_report_keeps_items_and_adds_specs(real_run: Run) -> None:
    data = json.loads(real_run.file("report.json").read_text())
    checks = [item["check"] for item in data["items"]]
    assert checks[0] == "start" and "scenario" in checks and "exposure" in checks
    (spec,) = data["specs"]
    assert spec["spec"] == "harden.yaml"  # relative to the run's root directory, so the report travels
    assert {item["spec"] for item in data["items"]} == {"harden.yaml"}
    tested = spec["tested"]
    assert tested["backend"] == "nspawn" and tested["release"] == DEFAULT_RELEASE
    assert tested["systemd"].startswith(f"{SYSTEMD}.") and tested["kernel"] == os.uname().release
    assert spec["outcomes"]["writes its cache"] == "failed"
    assert spec["outcomes"][START] == "passed"
    exposure_item = next(item for item in data["items"] if item["check"] == "exposure")
    assert spec["exposure"] == exposure_item["exposure"] and spec["max_exposure"] == 9.5
    (diagnosis,) = spec["diagnoses"]
    assert diagnosis["item"] == "writes its cache" and diagnosis["verdict"] == "found"
    assert "ProtectSystem" in diagnosis["culprits"]


def junit_cases(run: Run) -> dict[str, dict[str, list[str]]]:
    tree = ET.parse(run.file("junit.xml"))
    cases = {}
    for case in tree.iter("testcase"):
        props: dict[str, list[str]] = {}
        for prop in case.iter("property"):
            props.setdefault(prop.get("name", ""), []).append(prop.get("value", ""))
        cases[case.get("name", "")] = props
    return cases


def test_junit_has_flat_harden_properties(real_run: Run) -> None:
    cases = junit_cases(real_run)
    data = json.loads(real_run.file("report.json").read_text())
    (spec,) = data["specs"]
    exposure_case = next(props for name, props in cases.items() if name.startswith("exposure"))
    assert exposure_case["harden_exposure"] == [f"{spec['exposure']:.1f}"]
    assert exposure_case["harden_max_exposure"] == ["9.5"]
    failing = cases["writes its cache"]
    assert failing["harden_spec"] == ["harden.yaml"]
    start = cases["service starts under hardening"]
    assert start["harden_release"] == [DEFAULT_RELEASE] and start["harden_systemd"][0].startswith(f"{SYSTEMD}.")
    record = json.loads(start["harden"][0])  # the whole record as JSON text, not a Python repr
    assert record["check"] == "start" and record["tested"]["systemd"] == start["harden_systemd"][0]
    assert failing["harden_scenario"] == ["writes its cache"]
    assert failing["harden_culprit"] == [", ".join(spec["diagnoses"][0]["culprits"])]
    assert cases["the system is read-only"]["harden_check"] == ["scenario"]


class MatrixReader(HTMLParser):
    """The matrix tables of a page (as a browser's DOM dump has them): rows of (scenario, {directive: state})."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[tuple[str, dict[str, str]]]] = []
        self.headers: list[list[str]] = []
        self._in_matrix = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "table" and "matrix" in (attributes.get("class") or "").split():
            self._in_matrix = True
            self.tables.append([])
            self.headers.append([])
        elif self._in_matrix and tag == "tr" and attributes.get("data-scenario") is not None:
            self.tables[-1].append((attributes["data-scenario"] or "", {}))
        elif self._in_matrix and tag == "td" and attributes.get("data-state"):
            self.tables[-1][-1][1][attributes.get("data-directive") or ""] = attributes["data-state"] or ""
        elif self._in_matrix and tag == "th" and attributes.get("data-directive"):
            self.headers[-1].append(attributes["data-directive"] or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_matrix = False


def check_matrix(page: str, run: Run) -> None:
    reader = MatrixReader()
    reader.feed(page)
    (table,) = reader.tables
    spec = load_spec(run.file("harden.yaml"))
    assert reader.headers[0] == [d.name for d in spec.hardening]
    assert [scenario for scenario, _cells in table] == [START, *(s.name for s in spec.scenarios)]
    cells = dict(table)
    data = json.loads(run.file("report.json").read_text())
    culprits = set(data["specs"][0]["diagnoses"][0]["culprits"])
    assert {d for d, state in cells["writes its cache"].items() if state == "culprit"} == culprits
    assert set(cells["the system is read-only"].values()) <= {"in-force", "enforced"}


def test_the_html_report_is_self_contained_with_the_matrix(real_run: Run) -> None:
    page = real_run.file("report.html").read_text()
    assert_self_contained(page)
    check_matrix(page, real_run)
    assert f'<p class="tested">Tested on: nspawn, Debian {DEFAULT_RELEASE}, systemd {SYSTEMD}.' in page


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium; ./dev.sh installs it)")
    return found


def run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # The flags a root CI machine with no network needs: no sandbox (root), no GPU, nothing fetched in background.
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    return subprocess.run([chromium(), *flags, *args], capture_output=True, text=True, timeout=120, check=False)


def test_the_html_report_renders_in_headless_chromium(real_run: Run, tmp_path: Path) -> None:
    url = real_run.file("report.html").as_uri()
    dom = run_chromium(tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "scenarios × directives" in dom.stdout
    check_matrix(dom.stdout, real_run)  # the browser's DOM has the whole matrix
    shot = tmp_path / "report.png"
    rendered = run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1600", url)
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
