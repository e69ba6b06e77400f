"""The plugin as a user meets it: YAML specs as tests, the fixtures, skips and cleanup (pytester)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_systemd_harden.machine import cgroups

pytestmark = pytest.mark.usefixtures("machine")  # these tests need a working backend, like the rest

SERVICE = """
name: demo
service:
  exec_start: /bin/sleep infinity
hardening:
  DynamicUser: yes
  ProtectSystem: strict
"""


def test_a_bad_spec_is_one_line_and_starts_nothing(pytester: pytest.Pytester) -> None:
    pytester.makefile(".yaml", harden="""
service:
  exec_start: /bin/sleep infinity
hardening:
  ProtectSytem: strict
""")
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([
        "*harden.yaml:4: hardening.ProtectSytem: unknown directive (did you mean ProtectSystem?)"])
    assert "Traceback" not in result.stdout.str()
    assert "booting" not in result.stdout.str()


def test_yaml_scenarios_pass_and_fail_with_a_report(pytester: pytest.Pytester) -> None:
    pytester.makefile(".yaml", harden=SERVICE + """
scenarios:
  - name: the system is read-only
    inside: touch /etc/probe
    expect: {exit: 1, stderr: Read-only file system}
  - name: writes its cache
    inside: mkdir -p /var/cache/demo && touch /var/cache/demo/entry
""")
    result = pytester.runpytest("-v")
    result.assert_outcomes(passed=4, failed=1)  # with the enforcement items of DynamicUser= and ProtectSystem=
    result.stdout.fnmatch_lines([
        "*harden.yaml::service starts under hardening PASSED*",
        "*harden.yaml::the system is read-only PASSED*",
        "*harden.yaml::writes its cache FAILED*",
        "scenario 'writes its cache' failed under hardening (harden.yaml:12)",
        "  expected exit status 0, got exit status 1, stderr reports EROFS",
        "command: mkdir -p /var/cache/demo && touch /var/cache/demo/entry",
        "ran:     inside the sandbox of harden-demo.service (2 directives, user harden-demo)",
        "*| mkdir: cannot create directory ?/var/cache/demo?: Read-only file system",
        "service harden-demo.service: active (running)",
        "journal of harden-demo.service (last lines):",
        "*Started harden-demo.service*",
        "*| ProtectSystem=strict    (harden.yaml:6)",
    ])


def test_the_fixture_gives_client_inside_and_testinfra(pytester: pytest.Pytester) -> None:
    pytester.makefile(".yaml", service=SERVICE)  # not a spec file name: only used through the marker
    pytester.makepyfile("""
        import pytest

        @pytest.mark.harden("service.yaml")
        def test_sandbox(hardened_service):
            assert hardened_service.inside("id -u").stdout.strip() != "0"
            assert hardened_service.client("id -u").stdout.strip() == "0"
            assert not hardened_service.inside("touch /usr/x").ok
            assert hardened_service.host.file("/etc/hostname").exists
            assert hardened_service.state()["ActiveState"] == "active"

        def test_without_marker(hardened_service):
            pass
    """)
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*hardened_service needs @pytest.mark.harden('spec.yaml')*"])


def test_a_missing_backend_skips_with_the_fix_or_errors_when_required(pytester: pytest.Pytester,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makefile(".yaml", harden=SERVICE)
    monkeypatch.setenv("PATH", str(pytester.path / "empty-bin"))  # no systemd-nspawn to be found
    skipped = pytester.runpytest_subprocess("-rs")
    skipped.assert_outcomes(skipped=3)  # the start item and the enforcement items of both directives
    skipped.stdout.fnmatch_lines([
        "*backend unavailable: systemd-nspawn is not installed: apt-get install systemd-container*"])
    required = pytester.runpytest_subprocess("--harden-require-backend")
    required.assert_outcomes(failed=1, skipped=2)  # one cause: the start fails, the enforcement items are not run
    required.stdout.fnmatch_lines(["*backend unavailable (--harden-require-backend): systemd-nspawn is not installed*",
                                   "harden.yaml: 1 cause, the service did not start (no backend); 2 items not run.*"])


def _our_groups(pid: int) -> list[str]:
    found = []
    for base in cgroups.bases():  # every hierarchy, the v1 memory and pids ones of the caps too
        if base.is_dir():
            found += [p.name for p in base.iterdir() if p.is_dir() and f"-{pid}-" in p.name]
    return found


def _nspawn_children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid), "-x", "systemd-nspawn"], check=False, capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _wait(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def slow_suite(tmp_path: Path) -> Callable[[], subprocess.Popen[bytes]]:
    (tmp_path / "harden.yaml").write_text(SERVICE + """
scenarios:
  - name: takes a while
    client: sleep 60
""")

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(tmp_path)],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        _wait(lambda: _nspawn_children_of(proc.pid), 120, "the container to start")
        _wait(lambda: b"" if proc.poll() else _scenario_running(proc.pid), 60, "the scenario to run")
        return proc

    return start


def _scenario_running(pid: int) -> bool:
    out = subprocess.run(["pgrep", "-f", "^sleep 60$"], check=False, capture_output=True, text=True)
    return bool(out.stdout.strip())


def test_ctrl_c_leaves_no_container_cgroup_or_process(slow_suite: Callable[[], subprocess.Popen[bytes]]) -> None:
    proc = slow_suite()
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert b"KeyboardInterrupt" in output
    assert _nspawn_children_of(proc.pid) == []
    assert _our_groups(proc.pid) == []


def test_a_killed_run_is_reaped_by_the_next(slow_suite: Callable[[], subprocess.Popen[bytes]]) -> None:
    proc = slow_suite()
    groups = _our_groups(proc.pid)
    assert groups
    proc.kill()
    proc.wait(timeout=10)
    reaped = cgroups.reap_orphans()
    assert set(groups) <= set(reaped)
    assert _our_groups(proc.pid) == []
    out = subprocess.run(["pgrep", "-f", "^sleep 60$"], check=False, capture_output=True, text=True)
    assert out.stdout.strip() == ""


def test_under_xdist_each_spec_runs_whole_on_one_worker(pytester: pytest.Pytester) -> None:
    for name in ("first", "second"):
        pytester.mkdir(name).joinpath("harden.yaml").write_text("""
service:
  exec_start: /bin/sleep infinity
scenarios:
  - name: make the key
    client: touch /var/tmp/key-made-by-this-spec
  - name: the key is still there
    client: test -e /var/tmp/key-made-by-this-spec
  - name: done with the key
    client: rm /var/tmp/key-made-by-this-spec
""")
    result = pytester.runpytest_subprocess("-n", "2", "-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=8)
    workers: dict[str, set[str]] = {}
    for line in result.stdout.lines:
        match = re.match(r"\[(gw\d+)\].* PASSED (\w+)/harden\.yaml::", line)
        if match:
            workers.setdefault(match.group(2), set()).add(match.group(1))
    assert {spec: len(found) for spec, found in workers.items()} == {"first": 1, "second": 1}


def test_a_syscall_the_machines_systemd_would_ignore_fails_the_start_with_the_line(
        pytester: pytest.Pytester) -> None:
    pytester.makefile(".yaml", harden="""
service:
  exec_start: /bin/sleep infinity
hardening:
  SystemCallFilter: ["@system-service", "~@privileged mlokc"]
""")
    result = pytester.runpytest("-v", "--harden-diagnose=off")
    result.stdout.fnmatch_lines([
        "*harden.yaml::service starts under hardening FAILED*",
        ("*harden.yaml:4: hardening.SystemCallFilter: systemd * here does not know the syscall 'mlokc' and would "
         "ignore it: the filter would not be the one written here (did you mean mlock?)"),
    ])


def test_a_service_that_did_not_start_is_one_failure_and_its_other_items_are_not_run(
        pytester: pytest.Pytester) -> None:
    pytester.makefile(".yaml", harden="""
service:
  exec_start: /bin/sh -c 'exit 7'
hardening:
  ProtectSystem: strict
  PrivateTmp: yes
scenarios:
  - name: anything
    client: "true"
  - name: something else
    inside: "true"
""")
    result = pytester.runpytest("-v", "-rs", "--harden-diagnose=off")
    result.stdout.fnmatch_lines([
        "*harden.yaml::service starts under hardening FAILED*",
        "*harden.yaml::anything SKIPPED*",
        "*harden.yaml::something else SKIPPED*",
        "*harden.yaml::ProtectSystem=strict is enforced SKIPPED*",
        "*harden.yaml::PrivateTmp=yes is enforced SKIPPED*",
        "*systemd hardening: services that did not start*",
        ("harden.yaml: 1 cause, the service did not start (ServiceFailed); 4 items not run. Fix "
         "'harden.yaml::service starts under hardening' first: its failure has the reason and the diagnosis"),
    ])
    result.assert_outcomes(failed=1, skipped=4)
    assert result.stdout.str().count("not run: the service did not start (ServiceFailed; see 'harden.yaml::service "
                                     "starts under hardening')") == 4  # each skip's reason, under -rs
