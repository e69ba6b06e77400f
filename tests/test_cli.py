"""The systemd-harden command: lint, dropin, run-line, exposure and test, each checked against what it claims
(the run-line starts the same sandbox as the plugin, the exposure is the plugin's score)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_systemd_harden.cli import main, run_line
from pytest_systemd_harden.machine.backends.base import Machine
from pytest_systemd_harden.report import exposure
from pytest_systemd_harden.spec.load import Spec, load_spec
from pytest_systemd_harden.unit.service import HardenedService

MakeSpec = Callable[..., Spec]

GOOD = """\
name: cli-demo
max_exposure: 9.9
service:
  exec_start: /bin/sh -c 'echo "$GREETING" > /tmp/said; exec sleep infinity'
  environment: {GREETING: hello world}
  working_directory: /tmp
hardening:
  DynamicUser: yes
  PrivateTmp: yes
  ProtectSystem: strict
  CapabilityBoundingSet: ""
  SystemCallFilter: ["@system-service", "~@privileged"]
  RestrictAddressFamilies: [AF_UNIX, AF_INET]
  UMask: "0077"
scenarios:
  - name: says hello
    inside: cat /tmp/said
    expect: {stdout: hello world}
"""


def write(tmp_path: Path, text: str, name: str = "web.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def cli(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_lint_passes_good_specs_and_prints_errors_as_file_line(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, GOOD)
    bad = write(tmp_path, GOOD.replace("ProtectSystem", "ProtectSytem"), "bad.yaml")
    status, out, _err = cli("lint", str(good), capsys=capsys)
    assert (status, out) == (0, f"{good}: ok (7 directives, 1 scenarios)\n")
    status, out, _err = cli("lint", str(good), str(bad), capsys=capsys)
    assert status == 1
    line = GOOD.splitlines().index("  ProtectSystem: strict") + 1
    assert out.splitlines() == [f"{good}: ok (7 directives, 1 scenarios)",
                                (f"{bad}:{line}: hardening.ProtectSytem: unknown directive "
                                 "(did you mean ProtectSystem?)")]
    assert cli("lint", "-q", str(good), capsys=capsys) == (0, "", "")


def test_dropin_is_the_specs_dropin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD)
    assert cli("dropin", str(path), capsys=capsys) == (0, load_spec(path).dropin(), "")
    status, out, _err = cli("dropin", str(write(tmp_path, "service: {}\n", "empty.yaml")), capsys=capsys)
    assert status == 1 and out.startswith(f"{tmp_path / 'empty.yaml'}:1: service.exec_start: missing")


def test_run_line_is_one_shell_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = load_spec(write(tmp_path, GOOD))
    status, out, _err = cli("run-line", str(spec.path), capsys=capsys)
    assert status == 0 and out == run_line(spec) + "\n"
    argv = shlex.split(out)
    assert argv[:4] == ["systemd-run", "--unit=harden-cli-demo.service", "-p", "Type=exec"]
    assert argv[argv.index("--") + 1:] == list(spec.service.exec_start)
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "-p"][-len([1 for d in spec.hardening
                                                                       for _ in d.unit_lines()]):] == \
        [line for d in spec.hardening for line in d.unit_lines()]


def test_run_line_of_a_loaded_unit_points_to_its_drop_in(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # No command line makes a unit systemd loads from its file: the hardening ships as a drop-in instead.
    path = write(tmp_path, "service: {unit: memcached.service}\nhardening: {ProtectHome: yes}\n")
    status, out, err = cli("run-line", str(path), capsys=capsys)
    assert (status, out) == (1, "")
    assert err.startswith(f"systemd-harden run-line: {path}: the spec tests memcached.service, a unit systemd loads")
    assert "/etc/systemd/system/memcached.service.d/harden.conf" in err and f"systemd-harden dropin {path}" in err


# Properties systemd reports for a unit; the run-line must give the same values as the plugin's transient unit.
COMPARED = ("Type", "Environment", "WorkingDirectory", "DynamicUser", "PrivateTmp", "ProtectSystem",
            "CapabilityBoundingSet", "SystemCallFilter", "RestrictAddressFamilies", "UMask", "ExecStart")


def shown(machine: Machine, unit: str) -> dict[str, str]:
    result = machine.run(["systemctl", "show", unit, *(f"--property={p}" for p in COMPARED)])
    assert result.ok, result.describe()
    values = dict(line.split("=", 1) for line in result.stdout.splitlines())
    # ExecStart also carries run times and pids; the program and its arguments are what must agree.
    values["ExecStart"] = values["ExecStart"].split(" ; ignore_errors")[0]
    return values


def test_the_run_line_starts_the_same_sandbox_as_the_plugin(machine: Machine, tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, GOOD))
    plugin_service = HardenedService(machine, spec)
    plugin_service.start()
    by_hand = "harden-cli-by-hand.service"
    try:
        started = machine.run(shlex.split(run_line(spec, by_hand)))
        assert started.ok, started.describe()
        assert shown(machine, by_hand) == shown(machine, plugin_service.unit)
        assert machine.run(["systemctl", "is-active", by_hand]).stdout.strip() == "active"
    finally:
        machine.run(["systemctl", "stop", by_hand])
        plugin_service.stop()


def test_exposure_boots_a_machine_and_prints_the_plugins_score(machine: Machine, tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    expected = exposure.score(machine, load_spec(path))
    done = subprocess.run([sys.executable, "-m", "pytest_systemd_harden.cli", "exposure", str(path), "--top", "3"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"harden-cli-demo.service: exposure {expected.describe()}"
    assert lines[1] == "max_exposure 9.9: within"
    assert lines[3:6] == expected.render_costliest(3).splitlines()
    as_json = subprocess.run([sys.executable, "-m", "pytest_systemd_harden.cli", "exposure", str(path), "--json"],
                             capture_output=True, text=True, timeout=300, check=False)
    data = json.loads(as_json.stdout)
    assert (data["exposure"], data["band"], data["max_exposure"]) == (expected.score, expected.band, 9.9)
    over = write(tmp_path, GOOD.replace("max_exposure: 9.9", "max_exposure: 0.5"), "over.yaml")
    exceeded = subprocess.run([sys.executable, "-m", "pytest_systemd_harden.cli", "exposure", str(over)],
                              capture_output=True, text=True, timeout=300, check=False)
    assert exceeded.returncode == 1 and "max_exposure 0.5: EXCEEDED" in exceeded.stdout


def test_test_runs_the_specs_scenarios_whatever_the_file_is_called(machine: Machine, tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)  # web.yaml: not a harden_spec_files name
    done = subprocess.run([sys.executable, "-m", "pytest_systemd_harden.cli", "test", str(path), "-v",
                           "-p", "no:cacheprovider"], capture_output=True, text=True, timeout=600, check=False,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout
    assert "web.yaml::says hello PASSED" in done.stdout
    broken = write(tmp_path, GOOD.replace("stdout: hello world", "stdout: goodbye"))
    failed = subprocess.run([sys.executable, "-m", "pytest_systemd_harden.cli", "test", str(broken),
                             "--harden-diagnose=off", "-p", "no:cacheprovider"], capture_output=True, text=True,
                            timeout=600, check=False, cwd=tmp_path)
    assert failed.returncode == 1 and "expected stdout to contain 'goodbye'" in failed.stdout


def test_the_cache_key_changes_with_the_packages_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = write(tmp_path, GOOD, "a.yaml")
    same_machine = write(tmp_path, GOOD.replace("cli-demo", "other"), "b.yaml")
    more = write(tmp_path, GOOD + "machine: {packages: [curl]}\n", "c.yaml")
    keys = {name: cli("cache-key", *map(str, paths), capsys=capsys)[1].strip()
            for name, paths in {"a": [plain], "b": [same_machine], "c": [more], "ac": [plain, more],
                                "ca": [more, plain], "aa": [plain, plain]}.items()}
    assert all(len(key) == 16 for key in keys.values())
    assert keys["a"] == keys["b"] == keys["aa"] and keys["ac"] == keys["ca"]
    assert len({keys["a"], keys["c"], keys["ac"]}) == 3


def test_the_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("systemd-harden")
    if not script.exists():
        pytest.skip("the package is not installed with its scripts here (pip install -e .)")
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0
    for command in ("lint", "dropin", "run-line", "exposure", "test", "cache-key"):
        assert command in done.stdout


def test_tighten_prints_no_result_whose_drop_in_did_not_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_systemd_harden import cli as cli_module
    from pytest_systemd_harden.search.tighten import Tightening
    from pytest_systemd_harden.spec.directives import Directive

    spec = load_spec(write(tmp_path, GOOD))
    result = Tightening(before=spec.hardening, after=(*spec.hardening, Directive("ProtectHome", ("yes",))),
                        dropin_verified=False, dropin_failure="scenario 'says hello': expected exit status 0")
    score = exposure.Exposure(tenths=50, checks=(), unit_name="cli-demo.service", unit_text="")
    # The search itself is the live tests' (tests/test_unit_tighten_live.py); here only what is printed of it.
    monkeypatch.setattr(cli_module, "_on_machine", lambda args, command, work: (result, score, score, {}))
    status, out, err = cli("tighten", str(tmp_path / "web.yaml"), capsys=capsys)
    assert status == 1
    assert "does NOT pass on a freshly booted machine: scenario 'says hello'" in out
    assert "ProtectHome" not in out and "[Service]" not in out  # nothing to ship is printed
    assert "the tightened drop-in does not pass every scenario (above), so no result is printed" in err
    result.dropin_verified, result.dropin_unchecked = None, "the time budget for tighten (900s) is spent"
    status, out, err = cli("tighten", str(tmp_path / "web.yaml"), capsys=capsys)
    assert status == 1 and "[Service]" not in out and "could not be checked on a freshly booted machine" in err
    result.dropin_verified, result.dropin_unchecked = True, ""
    status, out, _ = cli("tighten", str(tmp_path / "web.yaml"), capsys=capsys)
    assert status == 0 and "ProtectHome=yes" in out
