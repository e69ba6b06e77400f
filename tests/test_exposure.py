"""Exposure scores: the search for systemd's number, the rendered unit, max_exposure, and - against real
containers - that our score is the one `systemd-analyze security` prints when run by hand on the same unit."""

from __future__ import annotations

import json
import re
import shlex
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_systemd_harden.errors import BackendUnavailable, SpecError
from pytest_systemd_harden.machine.backends.base import Machine
from pytest_systemd_harden.report import exposure
from pytest_systemd_harden.spec.load import Spec, load_spec
from pytest_systemd_harden.unit.pool import MachinePool

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_SPECS = sorted(EXAMPLES.glob("*/*.yaml"))

MakeSpec = Callable[..., Spec]

DEMO = """\
name: demo
service:
  exec_start: /bin/sleep infinity
hardening:
  DynamicUser: yes
  ProtectSystem: strict
"""


# --- the bisection over --threshold -------------------------------------------------------------------------------

@pytest.mark.parametrize("true_exposure", range(101))
def test_the_search_finds_every_exposure_in_seven_runs(true_exposure: int) -> None:
    asked: list[int] = []

    def passes(threshold: int) -> bool:  # systemd-analyze fails exactly when the exposure is above the threshold
        asked.append(threshold)
        return true_exposure <= threshold

    assert exposure.lowest_passing_threshold(passes) == true_exposure
    assert len(asked) <= 8  # the check at 100, then ceil(log2(101)) = 7 halvings


def test_a_unit_that_fails_even_at_the_top_is_an_error() -> None:
    with pytest.raises(exposure.ExposureError, match="failed even with --threshold=100"):
        exposure.lowest_passing_threshold(lambda threshold: False)


@pytest.mark.parametrize(("tenths", "name"), [(0, "PERFECT"), (1, "SAFE"), (9, "SAFE"), (10, "OK"), (49, "OK"),
                                              (50, "MEDIUM"), (75, "EXPOSED"), (90, "UNSAFE"), (99, "UNSAFE"),
                                              (100, "DANGEROUS")])
def test_bands_are_systemds(tenths: int, name: str) -> None:
    assert exposure.band(tenths) == name


# --- max_exposure in a spec ---------------------------------------------------------------------------------------

def test_max_exposure_is_read(make_spec: MakeSpec) -> None:
    assert make_spec(DEMO + "max_exposure: 2.5\n").max_exposure == 2.5
    assert make_spec(DEMO + "max_exposure: 3\n").max_exposure == 3.0
    assert make_spec(DEMO).max_exposure is None


RANGE_HINT = "the overall exposure level of systemd-analyze security, e.g. 2.0"


@pytest.mark.parametrize(("value", "problem", "hint"), [
    ("11", "expected a number from 0.0 to 10.0, got 11", RANGE_HINT),
    ("-1", "expected a number from 0.0 to 10.0, got -1", RANGE_HINT),
    ("low", "expected a number from 0.0 to 10.0, got 'low'", RANGE_HINT),
    ("yes", "expected a number from 0.0 to 10.0, got True", RANGE_HINT),
    ("2.25", "2.25 has more than one decimal", "systemd-analyze security scores in steps of 0.1, e.g. 2.5"),
])
def test_a_bad_max_exposure_is_one_located_line(tmp_path: Path, value: str, problem: str, hint: str) -> None:
    path = tmp_path / "harden.yaml"
    path.write_text(DEMO + f"max_exposure: {value}\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == f"{path}:7: max_exposure: {problem} ({hint})"


def test_steps_of_a_tenth_that_binary_floats_cannot_hold_are_accepted(make_spec: MakeSpec) -> None:
    for value in ("0.3", "0.7", "2.3", "9.9", "0.1"):
        assert make_spec(DEMO + f"max_exposure: {value}\n").max_exposure == float(value)


# --- the rendered unit -------------------------------------------------------------------------------------------

def test_the_rendered_unit_has_the_service_and_every_directive_line(make_spec: MakeSpec) -> None:
    spec = make_spec(DEMO.replace("/bin/sleep infinity", "/usr/bin/python3 /opt/app/server.py --port 8080")
                     + "  SystemCallFilter: ['@system-service', '~@privileged']\n")
    unit = exposure.render_unit(spec)
    assert "[Service]\nType=exec\nExecStart=/usr/bin/python3 /opt/app/server.py --port 8080\n" in unit
    body = unit.split("[Service]\n", 1)[1].splitlines()
    assert body[2:] == [line for d in spec.hardening for line in d.unit_lines()]


TRICKY_ARGS = ["plain", "two words", 'a "quoted" word', "it's", "100%", "$HOME", "${HOME}", "back\\slash", ";",
               "tab\there", ""]


def test_the_rendered_command_line_reaches_the_program_unchanged(machine: Machine, make_spec: MakeSpec) -> None:
    """systemd itself reads the unit back: every argument arrives as written in the spec."""
    argv = ["/bin/sh", "-c", 'for a in "$@"; do printf "[%s]\\n" "$a"; done > /run/harden-argv-test', "sh",
            *TRICKY_ARGS]
    spec = make_spec(f"name: argv-test\nservice:\n  exec_start: {json.dumps(argv)}\n  type: oneshot\n"
                     "  environment: {GREETING: 'hello \"world\" 50%'}\n")
    unit = exposure.render_unit(spec).replace("ExecStart=", "ExecStartPost=/bin/sh -c 'printenv GREETING > "
                                              "/run/harden-env-test'\nExecStart=", 1)
    installed = machine.run(["/bin/sh", "-c", ('cat > /run/systemd/system/harden-argv-test.service && '
                             'systemctl daemon-reload && systemctl start harden-argv-test.service')],
                            stdin=unit.encode())
    try:
        assert installed.ok, installed.describe() + "\n" + unit
        printed = machine.run(["cat", "/run/harden-argv-test"]).stdout
        assert printed.splitlines() == [f"[{arg}]" for arg in TRICKY_ARGS]
        assert machine.run(["cat", "/run/harden-env-test"]).stdout == 'hello "world" 50%\n'
    finally:
        machine.run("rm -f /run/systemd/system/harden-argv-test.service /run/harden-argv-test /run/harden-env-test;"
                    " systemctl daemon-reload")


# --- the score against systemd-analyze run by hand ----------------------------------------------------------------

OVERALL = re.compile(r"Overall exposure level for (\S+): (\d+\.\d) (\S+)")


def by_hand(machine: Machine, unit_path: str, *options: str) -> tuple[float, str, list[dict[str, object]]]:
    """What a person gets running systemd-analyze security in the machine: the overall line and the JSON rows."""
    text = machine.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", *options, unit_path])
    match = OVERALL.search(text.stdout)
    assert match, text.describe()
    rows = json.loads(machine.run(["systemd-analyze", "security", "--offline=yes", "--json=pretty", *options,
                                   unit_path]).stdout)
    return float(match.group(2)), match.group(3), rows


def unit_path(score: exposure.Exposure) -> str:
    return shlex.split(exposure.analyze_command(score))[-1]


@pytest.mark.parametrize("spec_path", EXAMPLE_SPECS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_example_scores_what_systemd_analyze_prints_by_hand(machine: Machine, harden_pool: MachinePool,
                                                                  spec_path: Path) -> None:
    spec = load_spec(spec_path)
    # A package's unit is only on a machine with its package; the others score the same on the base machine.
    if spec.service.unit:
        try:
            machine = harden_pool.machine_for(spec.machine)
        except BackendUnavailable as exc:  # the host backend, on a host without the package
            pytest.skip(str(exc))
    score = exposure.score(machine, spec)
    if spec.service.unit_name:  # scored as it ships: the unit file, then the spec's drop-in
        assert unit_path(score).endswith("/" + spec.service.unit_name) and score.unit_text.endswith(spec.dropin())
    shown, band, rows = by_hand(machine, unit_path(score))
    assert (score.score, score.band) == (shown, band)
    # The rendered unit in the machine is the one we scored, and the rows are systemd's.
    assert machine.run(["cat", unit_path(score)]).stdout == score.unit_text
    assert [(c.name, c.exposure) for c in score.checks] == [
        (row["name"], float(str(row["exposure"])) if row["exposure"] is not None else 0.0) for row in rows]


def test_the_costliest_checks_come_first_and_sum_to_at_least_the_score(machine: Machine,
                                                                       make_spec: MakeSpec) -> None:
    score = exposure.score(machine, make_spec(DEMO))
    costs = [check.contribution for check in score.costliest(100)]
    assert costs == sorted(costs, reverse=True) and all(cost > 0 for cost in costs)
    # Each row is rounded up separately, so together they never fall short of the overall level.
    assert sum(costs) >= score.tenths > 0
    assert score.costliest(3) == score.costliest(100)[:3]


def test_dropping_a_directive_raises_the_score(machine: Machine, make_spec: MakeSpec) -> None:
    # Not ProtectSystem=: DynamicUser=yes implies ProtectSystem=strict, and systemd scores it so.
    spec = make_spec(DEMO + "  ProtectKernelTunables: yes\n")
    full = exposure.score(machine, spec)
    weaker = exposure.score(machine, spec.without(["ProtectKernelTunables"]))
    assert weaker.tenths > full.tenths
    assert "ProtectKernelTunables=" in {c.name for c in weaker.checks if c.contribution} - \
        {c.name for c in full.checks if c.contribution}
    assert exposure.score(machine, spec.without(["ProtectSystem"])).tenths == full.tenths  # implied, as said


def test_a_security_policy_reweighs_and_matches_by_hand(machine: Machine, make_spec: MakeSpec,
                                                        tmp_path: Path) -> None:
    spec = make_spec(DEMO)
    default = exposure.score(machine, spec)
    costliest = default.costliest(1)[0]
    policy = tmp_path / "policy.json"
    # Weight 0 takes the costliest check out of the sum ("Option excluded by policy").
    policy.write_text(json.dumps({costliest.json_field: {"weight": 0}}))
    reweighed = exposure.score(machine, spec, policy)
    assert reweighed.tenths < default.tenths
    assert costliest.name not in {c.name for c in reweighed.costliest(100)}
    shown, band, _rows = by_hand(machine, unit_path(reweighed), f"--security-policy={policy_path(reweighed)}")
    assert (reweighed.score, reweighed.band) == (shown, band)


def policy_path(score: exposure.Exposure) -> str:
    return unit_path(score).rsplit("/", 1)[0] + "/policy.json"


@pytest.mark.parametrize(("content", "problem"), [("not json", "is not JSON"), ("[1, 2]", "must hold a JSON object")])
def test_an_unusable_policy_is_refused_before_anything_runs(tmp_path: Path, content: str, problem: str) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(content)
    with pytest.raises(ValueError, match=problem):
        exposure.check_policy(policy)


# --- the exposure item --------------------------------------------------------------------------------------------

def test_max_exposure_fails_an_item_with_the_costliest_checks(pytester: pytest.Pytester, machine: Machine) -> None:
    pytester.makefile(".yaml", harden=DEMO + "max_exposure: 1.0\n")
    (pytester.path / "loose.harden.yaml").write_text(DEMO.replace("demo", "loose") + "max_exposure: 10.0\n")
    result = pytester.runpytest("-v", "--harden-diagnose=off")
    assert result.parseoutcomes()["failed"] == 1
    expected = exposure.score(machine, load_spec(pytester.path / "harden.yaml"))
    top = expected.costliest(5)
    result.stdout.fnmatch_lines([
        "*harden.yaml::exposure <= 1.0 FAILED*",
        "*loose.harden.yaml::exposure <= 10.0 PASSED*",
        (f"exposure {expected.score:.1f} <= 1.0 failed: harden-demo.service scores {expected.score:.1f} "
        f"{expected.band} in systemd-analyze security under systemd *, above the max_exposure of harden.yaml"),
        "the checks that cost the most (exposure, setting, what systemd found):",
        *[f"*{check.exposure:.1f}  {check.name}*{check.description}" for check in top],
        ("by hand, inside the machine: systemd-analyze security --offline=yes "
        "/run/harden-exposure/harden-demo/harden-demo.service"),
    ])


def test_exposure_items_only_when_asked(pytester: pytest.Pytester) -> None:
    pytester.makefile(".yaml", harden=DEMO)
    assert "exposure" not in pytester.runpytest("--collect-only", "-q").stdout.str()
    pytester.runpytest("--collect-only", "-q", "--harden-exposure=on").stdout.fnmatch_lines(["harden.yaml::exposure"])
    pytester.runpytest("--collect-only", "-q", f"--harden-json={pytester.path / 'r.json'}").stdout.fnmatch_lines(
        ["harden.yaml::exposure"])
    pytester.makefile(".yaml", harden=DEMO + "max_exposure: 2.0\n")
    assert "exposure" not in pytester.runpytest("--collect-only", "-q", "--harden-exposure=off").stdout.str()


def test_the_policy_option_is_checked_and_used(pytester: pytest.Pytester, machine: Machine, tmp_path: Path) -> None:
    pytester.makefile(".yaml", harden=DEMO + "max_exposure: 10.0\n")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    refused = pytester.runpytest(f"--harden-security-policy={bad}")
    refused.stderr.fnmatch_lines([f"ERROR: --harden-security-policy: {bad} is not JSON*"])
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"PrivateNetwork": {"weight": 0}}))
    report = pytester.path / "report.json"
    result = pytester.runpytest(f"--harden-security-policy={policy}", f"--harden-json={report}")
    assert result.ret == 0
    record = next(r for r in json.loads(report.read_text())["items"] if r["check"] == "exposure")
    expected = exposure.score(machine, load_spec(pytester.path / "harden.yaml"), policy)
    assert (record["exposure"], record["policy"]) == (expected.score, str(policy))
    assert "PrivateNetwork=" not in [c["name"] for c in record["costliest"]]


def test_the_unit_file_is_what_the_dropin_documents(make_spec: MakeSpec) -> None:
    spec = make_spec(textwrap.dedent(DEMO) + "  UMask: '0077'\n")
    dropin_lines = [line for line in spec.dropin().splitlines() if not line.startswith(("#", "["))]
    assert exposure.render_unit(spec).splitlines()[-len(dropin_lines):] == dropin_lines
