"""Baselines: what a run observed, how it compares with the committed file, and - against real containers - that
dropping a directive or breaking a scenario fails a baseline item with a clear message, and restoring it passes."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from pytest_systemd_harden.report.baseline import (
    START,
    Baseline,
    BaselineError,
    Changes,
    Snapshot,
    compare,
    observe,
    render,
)
from pytest_systemd_harden.spec.load import Spec

MakeSpec = Callable[..., Spec]

SPEC = """\
name: demo
service:
  exec_start: /bin/sleep infinity
hardening:
  DynamicUser: yes
  ProtectKernelTunables: yes
scenarios:
  - name: reads /etc
    inside: cat /etc/hostname
  - name: the system is read-only
    inside: touch /etc/probe
    expect: {exit: 1}
"""


def record(check: str, outcome: str = "passed", **fields: Any) -> dict[str, Any]:
    name = fields.get("scenario") or fields.get("name") or check
    return {"spec": "/s/harden.yaml", "check": check, "nodeid": f"harden.yaml::{name}", "outcome": outcome,
            **{k: v for k, v in fields.items() if k != "name"}}


def snapshot(**fields: Any) -> Snapshot:
    return Snapshot(**fields)


# --- what a run observed ------------------------------------------------------------------------------------------

def test_observe_reads_outcomes_exposure_and_the_hardening(make_spec: MakeSpec) -> None:
    spec = make_spec(SPEC)
    seen = observe([record("start", name=START), record("scenario", scenario="reads /etc"),
                    record("scenario", "failed", scenario="the system is read-only"),
                    record("exposure", exposure=7.9, name="exposure"), record("baseline", name="baseline")], spec)
    assert seen.scenarios == {START: "passed", "reads /etc": "passed", "the system is read-only": "failed"}
    assert seen.exposure == 7.9
    assert seen.hardening == {"DynamicUser": "yes", "ProtectKernelTunables": "yes"}
    assert (seen.enforced, seen.unenforced, seen.denied, seen.allowed) == (None, None, None, None)


def test_observe_takes_the_hardening_in_force_of_a_unit_from_its_start_record(make_spec: MakeSpec) -> None:
    spec = make_spec(SPEC)
    in_force = {"PrivateTmp": "yes", "DynamicUser": "yes", "ProtectKernelTunables": "yes"}  # the unit's own + spec's
    seen = observe([record("start", name=START, hardening_in_force=in_force)], spec)
    assert seen.hardening == in_force


def test_observe_reads_enforcement_and_denial_records() -> None:
    seen = observe([
        record("enforcement", name="ProtectSystem=strict is enforced", directive="ProtectSystem"),
        record("enforcement", "failed", name="PrivateTmp=yes is enforced", directive="PrivateTmp=yes"),
        record("enforcement", "skipped", name="MemoryMax=1M is enforced", unverifiable="MemoryMax"),
        record("enforcement", name="deny write /etc/passwd", probe="write:/etc/passwd"),
        record("enforcement", "failed", name="deny syscall mount", probe="syscall:mount"),
        record("batch", name="batch", denied=["socket:AF_PACKET"], allowed=["socket:AF_INET"]),
    ], None)
    assert seen.enforced == {"ProtectSystem"}
    assert seen.unenforced == {"PrivateTmp"}  # a Name=value record counts for the name; unverifiable for neither
    assert seen.denied == {"write:/etc/passwd", "socket:AF_PACKET"}
    assert seen.allowed == {"syscall:mount", "socket:AF_INET"}


# --- comparing ----------------------------------------------------------------------------------------------------

def test_a_scenario_that_passed_and_now_fails_is_a_regression_and_the_reverse_an_improvement() -> None:
    changes = compare(snapshot(scenarios={"a": "passed", "b": "failed", START: "passed"}),
                      snapshot(scenarios={"a": "failed", "b": "passed", START: "passed"}))
    assert changes.regressions == ["scenario 'a' passed in the baseline, now it fails"]
    assert changes.improvements == ["scenario 'b' failed in the baseline, now it passes"]


def test_a_start_that_now_fails_is_named_as_the_start() -> None:
    changes = compare(snapshot(scenarios={START: "passed"}), snapshot(scenarios={START: "failed"}))
    assert changes.regressions == ["the start passed in the baseline, now it fails"]


def test_scenarios_not_run_removed_or_new_are_notes(make_spec: MakeSpec) -> None:
    spec = make_spec(SPEC)
    changes = compare(snapshot(scenarios={"reads /etc": "passed", "gone": "passed"}),
                      snapshot(scenarios={"the system is read-only": "passed"}), spec)
    assert changes.regressions == [] and changes.improvements == []
    assert changes.notes == ["scenario 'gone' is no longer in the spec (it passed in the baseline)",
                             "scenario 'reads /etc' did not run this time (baseline: passed)",
                             "new scenario 'the system is read-only' (passed), not in the baseline"]


@pytest.mark.parametrize(("before", "after", "regressions", "improvements"), [
    (1.8, 2.3, ["exposure rose from 1.8 to 2.3 (systemd-analyze security: higher is weaker)"], []),
    (2.3, 1.8, [], ["exposure fell from 2.3 to 1.8"]),
    (1.8, 1.8, [], []),
    (0.7, 0.1 * 7, [], []),  # tenths, not binary fractions: 0.7000000000000001 is 0.7
])
def test_exposure_up_is_a_regression(before: float, after: float, regressions: list[str],
                                     improvements: list[str]) -> None:
    changes = compare(snapshot(exposure=before), snapshot(exposure=after))
    assert (changes.regressions, changes.improvements) == (regressions, improvements)


def test_a_dropped_directive_is_a_regression_an_added_one_an_improvement_a_changed_one_a_note() -> None:
    changes = compare(snapshot(hardening={"DynamicUser": "yes", "ProtectSystem": "strict", "UMask": "0077"}),
                      snapshot(hardening={"DynamicUser": "yes", "ProtectSystem": "full", "PrivateTmp": "yes"}))
    assert changes.regressions == ["UMask=0077 was dropped from the hardening (it was in force in the baseline)"]
    assert changes.improvements == ["PrivateTmp=yes was added to the hardening"]
    assert changes.notes == ["ProtectSystem changed from 'strict' to 'full'"]


def test_a_directive_no_longer_enforced_and_a_denial_now_allowed_are_regressions() -> None:
    old = snapshot(hardening={"ProtectSystem": "strict", "PrivateTmp": "yes"}, enforced=frozenset({"ProtectSystem"}),
                   unenforced=frozenset({"PrivateTmp"}), denied=frozenset({"write:/etc"}), allowed=frozenset())
    new = snapshot(hardening={"ProtectSystem": "strict", "PrivateTmp": "yes"}, enforced=frozenset({"PrivateTmp"}),
                   unenforced=frozenset({"ProtectSystem"}), denied=frozenset(), allowed=frozenset({"write:/etc"}))
    changes = compare(old, new)
    assert changes.regressions == ["ProtectSystem was enforced in the baseline, now its enforcement check fails",
                                   "write:/etc was denied in the baseline, now it is allowed"]
    assert changes.improvements == ["PrivateTmp is now enforced (it was not in the baseline)"]


def test_enforcement_not_checked_this_time_is_a_note_not_a_regression() -> None:
    old = snapshot(hardening={"ProtectSystem": "strict"}, enforced=frozenset({"ProtectSystem"}))
    changes = compare(old, snapshot(hardening={"ProtectSystem": "strict"}))
    assert changes.regressions == []
    assert changes.notes == ["no directive checks ran this time (baseline: 1 passed)"]


def test_a_dropped_directive_is_reported_once_not_also_as_unenforced() -> None:
    old = snapshot(hardening={"ProtectSystem": "strict"}, enforced=frozenset({"ProtectSystem"}))
    new = snapshot(hardening={}, enforced=frozenset(), unenforced=frozenset({"ProtectSystem"}))
    assert compare(old, new).regressions == [("ProtectSystem=strict was dropped from the hardening (it was in force "
                                             "in the baseline)")]


def test_the_failure_message_lists_regressions_then_improvements_and_how_to_accept() -> None:
    changes = Changes(regressions=["exposure rose from 1.8 to 2.3"], improvements=["x was added"], notes=["n"])
    assert render(changes, "harden.yaml", Path("ci/baseline.yaml")).splitlines() == [
        "1 regression(s) against the baseline ci/baseline.yaml for harden.yaml:",
        "  - exposure rose from 1.8 to 2.3",
        "improvements:",
        "  + x was added",
        "notes:",
        "    n",
        "if the change is intended, accept it: pytest --harden-baseline=ci/baseline.yaml --harden-baseline-update",
    ]


# --- the file -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["baseline.yaml", "baseline.json"])
def test_a_baseline_survives_writing_and_reading(tmp_path: Path, make_spec: MakeSpec, name: str) -> None:
    spec = make_spec(SPEC)
    seen = observe([record("start", name=START), record("exposure", exposure=7.9, name="exposure"),
                    record("enforcement", name="x", directive="DynamicUser")], spec)
    file = Baseline(tmp_path / "ci" / name).updated({str(spec.path): (seen, spec)})
    file.write()
    loaded = Baseline.load(tmp_path / "ci" / name)
    assert loaded.specs == {"../harden.yaml": seen}  # keyed relative to the baseline's directory
    assert loaded.get(spec.path) == seen
    text = (tmp_path / "ci" / name).read_text()
    data = json.loads(text) if name.endswith(".json") else yaml.safe_load(text)
    assert data == {"version": 1, "specs": {"../harden.yaml": {
        "exposure": 7.9, "scenarios": {START: "passed"},
        "hardening": {"DynamicUser": "yes", "ProtectKernelTunables": "yes"},
        "enforced": ["DynamicUser"], "unenforced": []}}}


def test_a_partial_run_keeps_what_it_did_not_look_at(tmp_path: Path, make_spec: MakeSpec) -> None:
    spec = make_spec(SPEC)
    old = Snapshot(exposure=7.9, scenarios={START: "passed", "reads /etc": "passed", "gone": "passed"},
                   enforced=frozenset({"DynamicUser"}))
    other = Snapshot(exposure=1.0)
    file = Baseline(tmp_path / "b.yaml", {"harden.yaml": old, "other/harden.yaml": other})
    partial = observe([record("scenario", "failed", scenario="reads /etc")], spec)
    merged = file.updated({str(spec.path): (partial, spec)})
    assert merged.specs["other/harden.yaml"] == other
    assert merged.specs["harden.yaml"] == Snapshot(
        exposure=7.9, scenarios={START: "passed", "reads /etc": "failed"},  # "gone" left the spec
        hardening={"DynamicUser": "yes", "ProtectKernelTunables": "yes"}, enforced=frozenset({"DynamicUser"}))


@pytest.mark.parametrize(("content", "problem"), [
    ("specs: [1]", "expected a mapping with `specs:`"),
    ("version: 9\nspecs: {}", "baseline format version 9"),
    ("specs: {a.yaml: {exposure: high}}", "specs.a.yaml.exposure: expected a number, got 'high'"),
    ("specs: {a.yaml: {colour: red}}", "specs.a.yaml: unknown field(s) colour"),
    ("specs: {a.yaml: {enforced: ProtectSystem}}", "specs.a.yaml.enforced: expected a list"),
    ("specs: [", "not valid YAML"),
])
def test_a_broken_baseline_says_where(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "baseline.yaml"
    path.write_text(content)
    with pytest.raises(BaselineError, match=problem.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        Baseline.load(path)


# --- against real containers (pytester) ---------------------------------------------------------------------------

FEATURE_V1 = "mkdir -p /var/lib/demo/reports && echo ok > /var/lib/demo/reports/latest\n"
# The "upgrade": version 2 keeps its reports in a new place, which the hardening does not let it write.
FEATURE_V2 = "mkdir -p /var/lib/demo-reports && echo ok > /var/lib/demo-reports/latest\n"

APP_SPEC = """\
name: reports
service:
  exec_start: /bin/sleep infinity
machine:
  files: {/opt/app: app/}
hardening:
  DynamicUser: yes
  StateDirectory: demo
  ProtectKernelTunables: yes
  PrivateDevices: yes
scenarios:
  - name: writes a report
    inside: /bin/sh /opt/app/feature.sh
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    (pytester.path / "app").mkdir()
    (pytester.path / "app" / "feature.sh").write_text(FEATURE_V1)
    (pytester.path / "harden.yaml").write_text(APP_SPEC)
    return pytester


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest("-v", "--harden-diagnose=off", "--harden-baseline=ci/baseline.yaml", *args)


def test_recording_a_baseline(project: pytest.Pytester) -> None:
    recorded = run(project, "--harden-baseline-update")
    assert recorded.ret == 0
    recorded.stdout.fnmatch_lines(["*harden.yaml::baseline PASSED*", ("[[]harden] baseline ci/baseline.yaml updated "
                                   "for 1 spec(s)")])
    data = yaml.safe_load((project.path / "ci" / "baseline.yaml").read_text())
    entry = data["specs"]["../harden.yaml"]
    assert entry["scenarios"] == {START: "passed", "writes a report": "passed"}
    assert entry["hardening"] == {"DynamicUser": "yes", "StateDirectory": "demo", "ProtectKernelTunables": "yes",
                                  "PrivateDevices": "yes"}
    assert 0 < entry["exposure"] < 10
    assert "--harden-baseline-update" in (project.path / "ci" / "baseline.yaml").read_text().splitlines()[1]
    # Checking the same project against it: nothing changed, everything passes.
    checked = run(project)
    assert checked.ret == 0
    checked.stdout.fnmatch_lines(["*harden.yaml::baseline PASSED*"])


def test_dropping_a_directive_is_a_baseline_regression_and_restoring_it_passes(project: pytest.Pytester) -> None:
    assert run(project, "--harden-baseline-update").ret == 0
    before = yaml.safe_load((project.path / "ci" / "baseline.yaml").read_text())["specs"]["../harden.yaml"]
    (project.path / "harden.yaml").write_text(APP_SPEC.replace("  ProtectKernelTunables: yes\n", ""))
    dropped = run(project)
    assert dropped.ret == 1
    dropped.stdout.fnmatch_lines([
        "*harden.yaml::writes a report PASSED*",
        "*harden.yaml::baseline FAILED*",
        "*regression(s) against the baseline ci/baseline.yaml for harden.yaml:",
        f"  - exposure rose from {before['exposure']:.1f} to *.* (systemd-analyze security: higher is weaker)",
        "  - ProtectKernelTunables=yes was dropped from the hardening (it was in force in the baseline)",
        "if the change is intended, accept it: pytest --harden-baseline=ci/baseline.yaml --harden-baseline-update",
    ])
    dropped.stdout.fnmatch_lines(["baseline regressions of harden.yaml:",
                                  "  - ProtectKernelTunables=yes was dropped from the hardening*"])
    (project.path / "harden.yaml").write_text(APP_SPEC)
    restored = run(project)
    assert restored.ret == 0, restored.stdout.str()
    restored.stdout.fnmatch_lines(["*harden.yaml::baseline PASSED*"])


def test_an_upgrade_that_breaks_a_scenario_is_a_baseline_regression_and_restoring_passes(
        project: pytest.Pytester) -> None:
    assert run(project, "--harden-baseline-update").ret == 0
    (project.path / "app" / "feature.sh").write_text(FEATURE_V2)
    upgraded = run(project)
    upgraded.stdout.fnmatch_lines([
        "*harden.yaml::writes a report FAILED*",
        "*harden.yaml::baseline FAILED*",
        "1 regression(s) against the baseline ci/baseline.yaml for harden.yaml:",
        "  - scenario 'writes a report' passed in the baseline, now it fails",
    ])
    assert "exposure rose" not in upgraded.stdout.str()  # the hardening did not change
    (project.path / "app" / "feature.sh").write_text(FEATURE_V1)
    restored = run(project)
    assert restored.ret == 0, restored.stdout.str()


def test_an_improvement_is_reported_in_the_summary_and_does_not_fail(project: pytest.Pytester) -> None:
    assert run(project, "--harden-baseline-update").ret == 0
    (project.path / "harden.yaml").write_text(APP_SPEC.replace("  PrivateDevices: yes\n",
                                                               "  PrivateDevices: yes\n  ProtectClock: yes\n"))
    improved = run(project)
    assert improved.ret == 0, improved.stdout.str()
    improved.stdout.fnmatch_lines(["baseline improvements of harden.yaml:",
                                   "  + exposure fell from *",
                                   "  + ProtectClock=yes was added to the hardening"])


def test_a_directive_no_longer_enforced_is_a_regression(pytester: pytest.Pytester,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Enforcement items speak through their records (``directive``): any item can take part in the baseline."""
    pytester.makefile(".yaml", harden=SPEC)
    pytester.makeconftest("""
        import os, pytest

        @pytest.fixture
        def enforcement_record(request):
            record = {"spec": str(request.config.rootpath / "harden.yaml"), "check": "enforcement",
                      "directive": "ProtectKernelTunables"}
            request.node.user_properties.append(("harden", record))
    """)
    pytester.makepyfile(test_enforce="""
        import os

        def test_fake_tunables_check(enforcement_record):
            assert os.environ.get("BREAK_IT") != "1", "/proc/sys is writable in the sandbox"
    """)
    options = ["--harden-baseline=baseline.yaml", "--harden-exposure=off", "-k", "fake or baseline"]
    assert pytester.runpytest(*options, "--harden-baseline-update").ret == 0
    assert yaml.safe_load((pytester.path / "baseline.yaml").read_text())["specs"]["harden.yaml"]["enforced"] == \
        ["ProtectKernelTunables"]
    monkeypatch.setenv("BREAK_IT", "1")
    broken = pytester.runpytest(*options)
    broken.assert_outcomes(failed=2)
    broken.stdout.fnmatch_lines([("  - ProtectKernelTunables was enforced in the baseline, now its enforcement check "
                                 "fails")])
    monkeypatch.setenv("BREAK_IT", "0")
    pytester.runpytest(*options).assert_outcomes(passed=2)


def test_bad_baseline_options_fail_fast_with_the_fix(pytester: pytest.Pytester) -> None:
    pytester.makefile(".yaml", harden=SPEC)
    lonely = pytester.runpytest("--harden-baseline-update")
    lonely.stderr.fnmatch_lines([("ERROR: --harden-baseline-update needs the file to write: add "
                                 "--harden-baseline=PATH")])
    missing = pytester.runpytest("--harden-baseline=nope.yaml")
    missing.stderr.fnmatch_lines([("ERROR: --harden-baseline=nope.yaml: no such file; record one first with "
                                  "--harden-baseline=nope.yaml --harden-baseline-update")])
    (pytester.path / "broken.yaml").write_text(textwrap.dedent("specs: [1]\n"))
    broken = pytester.runpytest("--harden-baseline=broken.yaml")
    broken.stderr.fnmatch_lines(["ERROR: --harden-baseline: broken.yaml: expected a mapping with `specs:`*"])
    assert "booting" not in broken.stdout.str() + lonely.stdout.str() + missing.stdout.str()


def test_a_real_enforcement_check_that_now_fails_is_a_regression(pytester: pytest.Pytester) -> None:
    """With the plugin's own enforcement items: a ReadWritePaths= that reopens /etc undoes ProtectSystem=strict."""
    strict = "name: weakened\nservice:\n  exec_start: /bin/sleep infinity\nhardening:\n  ProtectSystem: strict\n"
    pytester.makefile(".yaml", harden=strict)
    assert pytester.runpytest("--harden-baseline=baseline.yaml", "--harden-baseline-update").ret == 0
    if yaml.safe_load((pytester.path / "baseline.yaml").read_text())["specs"]["harden.yaml"].get("enforced") != \
            ["ProtectSystem"]:
        pytest.skip("this backend cannot show ProtectSystem=strict enforced")
    pytester.makefile(".yaml", harden=strict + "  ReadWritePaths: /etc\n")
    weakened = pytester.runpytest("-v", "--harden-baseline=baseline.yaml")
    weakened.stdout.fnmatch_lines(["*harden.yaml::ProtectSystem=strict is enforced FAILED*",
                                   "*harden.yaml::baseline FAILED*",
                                   "  - ProtectSystem was enforced in the baseline, now its enforcement check fails"])
    pytester.makefile(".yaml", harden=strict)
    assert pytester.runpytest("--harden-baseline=baseline.yaml").ret == 0


def test_what_was_tested_is_kept_and_a_version_change_is_shown_beside_a_regression(tmp_path: Path) -> None:
    from pytest_systemd_harden.report.baseline import Snapshot, compare, observe, render

    tested_old = {"backend": "nspawn", "release": "bookworm", "kernel": "6.1", "systemd": "252.39-1",
                  "packages": {"harden-demo": "1.0"}}
    tested_new = {**tested_old, "kernel": "6.18", "packages": {"harden-demo": "1.1"}}
    old = observe([{"check": "start", "outcome": "passed", "tested": tested_old},
                   {"check": "scenario", "scenario": "works", "outcome": "passed"}], None)
    assert old.tested == {"backend": "nspawn", "release": "bookworm", "systemd": "252.39-1",
                          "package harden-demo": "1.0"}  # no kernel: CI hosts differ
    assert Snapshot.from_dict(old.as_dict(), "x").tested == old.tested  # through the file and back
    new = observe([{"check": "start", "outcome": "passed", "tested": tested_new},
                   {"check": "scenario", "scenario": "works", "outcome": "failed"}], None)
    changes = compare(old, new)
    assert changes.regressions == ["scenario 'works' passed in the baseline, now it fails"]
    assert changes.versions == ["package harden-demo 1.0 -> 1.1"]
    message = render(changes, "harden.yaml", tmp_path / "baseline.yaml")
    assert "what was tested changed since the baseline:\n    package harden-demo 1.0 -> 1.1" in message
    assert compare(old, old).versions == []


UNIT = """\
[Service]
Type=exec
ExecStart=/bin/sleep infinity
PrivateTmp=yes
ProtectHostname=yes
"""
UNIT_SPEC = """\
service:
  unit_file: app.service
hardening:
  ProtectKernelTunables: yes
scenarios:
  - name: reads /etc
    inside: cat /etc/hostname
"""


def test_a_directive_dropped_from_the_units_own_file_is_a_baseline_regression(pytester: pytest.Pytester) -> None:
    (pytester.path / "app.service").write_text(UNIT)
    (pytester.path / "harden.yaml").write_text(UNIT_SPEC)
    assert run(pytester, "--harden-baseline-update").ret == 0
    entry = yaml.safe_load((pytester.path / "ci" / "baseline.yaml").read_text())["specs"]["../harden.yaml"]
    assert entry["hardening"] == {"PrivateTmp": "yes", "ProtectHostname": "yes", "ProtectKernelTunables": "yes"}
    (pytester.path / "app.service").write_text(UNIT.replace("PrivateTmp=yes\n", ""))  # the package's new unit
    dropped = run(pytester)
    assert dropped.ret == 1
    dropped.stdout.fnmatch_lines(["*harden.yaml::baseline FAILED*",
                                  ("  - PrivateTmp=yes was dropped from the hardening "
                                   "(it was in force in the baseline)")])
