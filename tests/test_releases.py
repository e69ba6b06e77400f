"""One suite on several Debian releases (--harden-release=bookworm,trixie): items per release, reports per release."""

from __future__ import annotations

import pytest

from pytest_systemd_harden.report.baseline import spec_key, spec_path_of
from pytest_systemd_harden.report.formats import SpecReport, release_matrix

SPEC = """
service:
  exec_start: /bin/sleep infinity
hardening:
  ProtectSystem: strict
  SocketBindDeny: any
scenarios:
  - name: the unit's systemd
    inside: systemctl --version
"""


def test_a_run_key_names_its_release_and_leads_back_to_the_file() -> None:
    assert spec_key("/src/harden.yaml") == "/src/harden.yaml"
    assert spec_key("/src/harden.yaml", "trixie") == "/src/harden.yaml[trixie]"
    assert spec_path_of("/src/harden.yaml[trixie]") == "/src/harden.yaml"
    assert spec_path_of("/src/odd[name].yaml") == "/src/odd[name].yaml"


def test_the_release_matrix_has_a_column_per_release() -> None:
    def report(label: str, failed: int) -> SpecReport:
        made = SpecReport(label, label)
        made.snapshot = made.snapshot.__class__(scenarios={"a": "passed", "b": "failed" if failed else "passed"})
        return made

    lines = release_matrix([report("harden.yaml[bookworm]", 0), report("harden.yaml[trixie]", 1)])
    assert lines[0].split() == ["releases", "bookworm", "trixie"]
    assert lines[1].split() == ["harden.yaml", "2", "passed,", "0", "failed", "1", "passed,", "1", "failed"]
    assert release_matrix([report("harden.yaml", 0)]) == []


@pytest.mark.usefixtures("machine")
def test_every_spec_runs_once_per_release_with_its_own_items_and_versions(pytester: pytest.Pytester) -> None:
    pytester.makefile(".yaml", harden=SPEC)
    pytester.makefile(".yaml", **{"harden-pinned": SPEC + "machine:\n  release: [trixie]\n"})
    result = pytester.runpytest("-v", "-p", "no:cacheprovider", "--harden-release=bookworm,trixie")
    out = result.stdout.str()
    result.stdout.fnmatch_lines([
        "*harden.yaml::bookworm::service starts under hardening PASSED*",
        "*harden.yaml::trixie::service starts under hardening PASSED*",
    ], consecutive=False)
    assert "harden-pinned.yaml::bookworm::" not in out  # the spec pins its release: the option does not widen it
    assert "harden-pinned.yaml::service starts under hardening PASSED" in out
    result.stdout.fnmatch_lines(["releases * bookworm * trixie",
                                 "harden.yaml * passed, 0 failed * passed, 0 failed"])
    result.stdout.fnmatch_lines(["tested harden.yaml[[]bookworm]: nspawn, Debian bookworm, systemd 252.*",
                                 "tested harden.yaml[[]trixie]: nspawn, Debian trixie, systemd 257.*"])


def test_an_unknown_release_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makefile(".yaml", harden=SPEC)
    result = pytester.runpytest("--harden-release=bookworm,trixy")
    result.stderr.fnmatch_lines(["*--harden-release: unknown Debian release 'trixy' (did you mean trixie?)*"])
    assert result.ret == pytest.ExitCode.USAGE_ERROR
