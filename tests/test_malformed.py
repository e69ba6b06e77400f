"""Malformed specs: each file of tests/data/malformed/ fails lint with one line that names it, for the reason its
header says (``# expect: KEY`` for a value, ``# expect-file: TEXT`` for the file as a whole), never a traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_systemd_harden.cli import main
from pytest_systemd_harden.errors import SpecError
from pytest_systemd_harden.spec.directives import Directive, DropinMismatch, render_assignments, verify_dropin
from pytest_systemd_harden.spec.load import MAX_SPEC_BYTES, load_spec

CORPUS = Path(__file__).resolve().parent / "data" / "malformed"
SPECS = sorted(CORPUS.glob("*.yaml"))
SERVICE = "service:\n  exec_start: /bin/true\n"


def expectation(path: Path) -> tuple[str, str]:
    """("key", KEY) or ("file", TEXT) from the spec's first line, whatever its encoding."""
    raw = path.read_bytes()
    first = next(raw.decode(encoding, "ignore") for encoding in ("utf-8", "utf-16", "utf-32", "latin-1")
                 if raw.decode(encoding, "ignore").startswith("# expect"))
    header = first.splitlines()[0]
    kind, _, value = header.removeprefix("# ").partition(": ")
    return ("file" if kind == "expect-file" else "key"), value.strip()


def test_the_corpus_covers_each_kind_of_fault() -> None:
    assert len(SPECS) >= 60
    kinds = {path.name.split("-")[0] for path in SPECS}
    assert {"type", "number", "name", "inject", "path", "nesting", "encoding", "yaml"} <= kinds


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_each_malformed_spec_fails_for_the_reason_intended(path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    error = info.value
    message = str(error)
    assert "\n" not in message and message.startswith(f"{path}:"), message
    kind, expected = expectation(path)
    if kind == "key":
        assert error.key == expected or error.key.startswith((f"{expected}.", f"{expected}[")), message
    else:
        assert expected in error.problem, message


def test_lint_prints_one_line_per_malformed_spec_and_no_traceback() -> None:
    result = subprocess.run([sys.executable, "-m", "pytest_systemd_harden.cli", "lint", *map(str, SPECS)],
                            capture_output=True, text=True, timeout=120, check=False,
                            env={**os.environ, "PYTHONWARNINGS": "error"})
    assert result.returncode == 1
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == len(SPECS)
    for path, line in zip(SPECS, lines):
        assert line.startswith(f"{path}:"), line


def test_a_huge_spec_is_refused_by_its_size_before_it_is_parsed(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # 3.7 MB, as in the issue: it took 18 s to parse; the cap refuses it unread.
    path = tmp_path / "huge.yaml"
    path.write_text(SERVICE + "scenarios:\n" + "".join(f"  - name: s{i}\n    client: /bin/true\n"
                                                       for i in range(110_000)))
    assert path.stat().st_size > 3_500_000
    assert main(["lint", str(path)]) == 1
    out = capsys.readouterr().out
    assert out == f"{path}: the spec is larger than 1 MiB (a spec is a page of YAML; is this the right file?)\n"


def test_a_binary_file_is_named_as_one(tmp_path: Path) -> None:
    path = tmp_path / "harden.yaml"
    path.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(57) + bytes(range(256)))  # no room for an expect: header
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == f"{path}:1: the spec is not a text file (it contains NUL bytes) (a spec is a YAML " \
                              "text file; is this the right file?)"


def test_a_spec_just_under_the_cap_loads(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    body = SERVICE + "# " + "x" * 100 + "\n"
    path.write_text(body * (MAX_SPEC_BYTES // len(body)))
    assert path.stat().st_size <= MAX_SPEC_BYTES
    with pytest.raises(SpecError, match="duplicate key"):  # parsed, not refused for its size
        load_spec(path)


# --- values that look odd but are right: they must keep loading ------------------------------------------------

def test_values_systemd_takes_still_load(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(SERVICE + """\
hardening:
  LimitFSIZE: 1G
  LimitNOFILE: 1024:4096
  MemoryLow: 0
  User: "1000"
  SupplementaryGroups: [adm, "1001"]
  StateDirectory: app/cache
  SyslogIdentifier: 100%-app
  SystemCallFilter: ["@system-service", "_llseek", "~mlock:EPERM"]
  SystemCallArchitectures: native
  RestrictFileSystems: ["@basic-api", ext4]
  TimeoutStopSec: 1min 30s
  KillMode: mixed
  SocketBindAllow: [tcp:8080, ipv6:udp:1024-2048]
scenarios:
  - name: a script may span lines
    inside: |
      echo one
      echo two
    expect: {stdout: "one\\ntwo"}
""")
    spec = load_spec(path)
    assert spec.directive("SyslogIdentifier") is not None
    assert "SyslogIdentifier=100%%-app" in spec.dropin()  # a unit file would read % as a specifier


def test_temporary_file_systems_go_over_the_bus_as_path_and_options() -> None:
    # systemd takes a(ss) here; a list of strings was "Unexpected message contents" at StartTransientUnit
    ((name, value),) = Directive.parse("TemporaryFileSystem", ["/var:ro,size=10M", "/srv"]).properties()
    assert (name, value.signature, value.value) == ("TemporaryFileSystem", "a(ss)",
                                                     [["/var", "ro,size=10M"], ["/srv", ""]])


def test_files_outside_the_project_need_the_spec_to_ask(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "specs").mkdir(parents=True)
    (project / "pyproject.toml").write_text("")
    (project / "app").mkdir()
    (tmp_path / "elsewhere").mkdir()
    spec = project / "specs" / "harden.yaml"
    spec.write_text(SERVICE + "machine:\n  files: {/opt/app: ../app, /opt/other: ../../elsewhere}\n")
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    assert info.value.key == "machine.files./opt/other"
    assert f"is {tmp_path / 'elsewhere'}, outside the spec's directory ({project / 'specs'}) or the project " \
           f"({project})" in info.value.problem
    assert "machine.files_outside_project: true" in info.value.hint
    # pytest's rootdir, when given, is the project
    with pytest.raises(SpecError):
        load_spec(spec, root=project / "app")
    assert load_spec(spec, root=tmp_path).machine.files[1] == ("/opt/other", str(tmp_path / "elsewhere"))
    spec.write_text(SERVICE + "machine:\n  files_outside_project: true\n  files: {/opt/other: ../../elsewhere}\n")
    assert load_spec(spec).machine.files == (("/opt/other", str(tmp_path / "elsewhere")),)


# --- the drop-in, read back -------------------------------------------------------------------------------------

def test_a_dropin_reads_back_as_the_directives_it_was_rendered_from() -> None:
    directives = [Directive.parse("SyslogIdentifier", "50%"), Directive.parse("Environment", {"A": "x y"}),
                  Directive.parse("ReadWritePaths", ["/var/lib/app", "-/srv"])]
    text = render_assignments([(d.name, a) for d in directives for a in d.assignments], header="a\nb")
    assert text == ('# a\n# b\n[Service]\nSyslogIdentifier=50%%\nEnvironment="A=x y"\n'
                    'ReadWritePaths=/var/lib/app -/srv\n')


@pytest.mark.parametrize(("text", "problem"), [
    ("[Service]\nSyslogIdentifier=app\nExecStartPre=/bin/id\n", "has 2 assignments where 1 were tested"),
    ("[Service]\nSyslogIdentifier=app\\\nUser=x\n", "would set SyslogIdentifier='app User=x'"),
    ("[Service]\nSyslogIdentifier=%n\n", "%n is a specifier systemd would expand"),
    ("[Service]\nSyslogIdentifier= other\n", "would set SyslogIdentifier='other' where SyslogIdentifier='app'"),
    ("SyslogIdentifier=app\n", "is not an assignment in [Service]"),
])
def test_a_dropin_that_reads_back_otherwise_is_an_error(text: str, problem: str) -> None:
    with pytest.raises(DropinMismatch, match=re.escape(problem)):
        verify_dropin(text, [("SyslogIdentifier", "app")])


def test_the_dropin_command_refuses_a_dropin_that_does_not_read_back(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "harden.yaml"
    path.write_text(SERVICE + "hardening:\n  SyslogIdentifier: app\n")
    # A directive built around the loader's checks (as tighten or diagnosis could) must not reach the user.
    from pytest_systemd_harden.spec import directives

    monkeypatch.setattr(directives, "escape_specifiers", lambda value: value + "\nExecStartPre=/bin/id")
    assert main(["dropin", str(path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: hardening: the drop-in does not read back as the spec's directives: ")
    assert "ExecStartPre" in out and "[Service]" not in out
