"""Loading specs: values of a good spec, and one exact, located message for every kind of bad spec."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pytest_systemd_harden.errors import SpecError
from pytest_systemd_harden.machine.backends import BACKENDS
from pytest_systemd_harden.spec.directives import Directive
from pytest_systemd_harden.spec.load import TOP_KEYS, Expectation, Readiness, Scenario, ServiceConfig, Spec, load_spec
from pytest_systemd_harden.spec.machine import BACKEND_NAMES, MachineConfig

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "gpg-signing" / "harden.yaml"

SERVICE = """\
service:
  exec_start: /usr/bin/python3 /opt/app/server.py
"""


def write_spec(tmp_path: Path, text: str, name: str = "harden.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path.resolve()


def spec_error(tmp_path: Path, text: str) -> tuple[Path, SpecError]:
    path = write_spec(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return path, info.value


def assert_message(error: SpecError, path: Path, line: int | None, key: str, problem: str, hint: str) -> None:
    """The message is one line, ``file:line: key: problem (hint)``, and the attributes agree."""
    assert (error.path, error.line, error.key, error.problem, error.hint) == (str(path), line, key, problem, hint)
    where = f"{path}:{line}" if line is not None else str(path)
    head = f"{where}: {key}: {problem}" if key else f"{where}: {problem}"
    assert str(error) == f"{head} ({hint})"
    assert "\n" not in str(error)


# --- a good spec ------------------------------------------------------------------------------------------------

GOOD = """\
# the signer, hardened
name: signer
service:
  exec_start: /usr/bin/python3 /opt/signer/server.py --port 8080 --greeting 'hello world'
  type: notify
  ready: {tcp: 8080, timeout: 12}
  environment: {LANG: C.UTF-8, PORT: 8080}
  working_directory: /opt/signer
  start_timeout: 45
machine:
  packages: [gnupg, curl, gnupg]
  files:
    /opt/signer: app/
    /etc/signer.conf: conf/signer.conf
hardening:
  ProtectSystem: strict
  SystemCallFilter: ["@system-service", "~@privileged", "~@memlock"]
  CapabilityBoundingSet: ""
  UMask: "0077"
scenarios:
  - name: sign
    client: curl -fsS http://127.0.0.1:8080/sign
    expect: {stdout: BEGIN PGP SIGNATURE}
  - name: read-only system
    inside: touch /etc/x
    expect:
      exit: 1
      stderr: Read-only file system
    timeout: 5
  - name: seccomp kills
    inside: /opt/signer/bad-syscall
    expect: {signal: sys}
  - name: anything goes
    client: "true"
    expect: {exit: any}
"""


@pytest.fixture
def good(tmp_path: Path) -> Spec:
    (tmp_path / "app").mkdir()
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "signer.conf").write_text("key=1\n")
    return load_spec(write_spec(tmp_path, GOOD))


def test_good_spec_service(good: Spec, tmp_path: Path) -> None:
    assert good.path == (tmp_path / "harden.yaml").resolve()
    assert good.name == good.label == "signer"
    assert good.service == ServiceConfig(
        exec_start=("/usr/bin/python3", "/opt/signer/server.py", "--port", "8080", "--greeting", "hello world"),
        type="notify",
        ready=Readiness("tcp", "8080", 12.0),
        environment=(("LANG", "C.UTF-8"), ("PORT", "8080")),
        working_directory="/opt/signer",
        start_timeout=45.0,
    )


def test_good_spec_machine(good: Spec, tmp_path: Path) -> None:
    root = tmp_path.resolve()
    assert good.machine == MachineConfig(
        packages=("curl", "gnupg"),  # sorted, duplicates dropped
        files=(("/etc/signer.conf", str(root / "conf" / "signer.conf")), ("/opt/signer", str(root / "app"))),
        backend="auto",  # not set: the default, an nspawn container
    )


def test_good_spec_hardening(good: Spec) -> None:
    assert [(d.name, d.assignments, d.line) for d in good.hardening] == [
        ("ProtectSystem", ("strict",), 16),
        ("SystemCallFilter", ("@system-service", "~@privileged @memlock"), 17),
        ("CapabilityBoundingSet", ("",), 18),
        ("UMask", ("0077",), 19),
    ]
    assert good.directive("UMask") == Directive("UMask", ("0077",), 19)
    assert good.directive("PrivateTmp") is None
    assert [name for name, _variant in good.hardening_properties()] == [
        "ProtectSystem", "SystemCallFilter", "SystemCallFilter", "CapabilityBoundingSet", "UMask"]


def test_good_spec_scenarios(good: Spec) -> None:
    assert good.scenarios == (
        Scenario("sign", "curl -fsS http://127.0.0.1:8080/sign", "client",
                 Expectation(exit=0, stdout="BEGIN PGP SIGNATURE"), 60.0, 21),
        Scenario("read-only system", "touch /etc/x", "inside",
                 Expectation(exit=1, stderr="Read-only file system"), 5.0, 24),
        Scenario("seccomp kills", "/opt/signer/bad-syscall", "inside",
                 Expectation(exit=None, signal="SIGSYS"), 60.0, 30),
        Scenario("anything goes", "true", "client", Expectation(exit=None), 60.0, 33),
    )
    assert [s.line for s in good.scenarios] == [21, 24, 30, 33]


def test_expectation_defaults_and_describe() -> None:
    assert Expectation() == Expectation(exit=0, signal=None, stdout=None, stderr=None)
    assert Expectation().describe() == "exit status 0"
    assert Expectation(exit=None).describe() == "any exit status"
    assert Expectation(exit=None, signal="SIGSYS").describe() == "signal SIGSYS"
    assert Expectation(exit=1, stderr="Read-only file system").describe() == (
        "exit status 1, stderr containing 'Read-only file system'")


def test_minimal_spec_defaults(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, SERVICE, name="minimal.yaml"))
    assert spec.label == "minimal"
    assert spec.service == ServiceConfig(("/usr/bin/python3", "/opt/app/server.py"))
    assert spec.service.ready == Readiness("active", "", 30.0)
    assert spec.service.type == "exec"  # start fails when the sandbox cannot be set up
    assert spec.machine == MachineConfig((), (), "auto")
    assert spec.hardening == ()
    assert spec.scenarios == ()
    assert spec.dropin() == "# Hardening tested by pytest-systemd-harden (minimal.yaml)\n[Service]\n"


def test_exec_start_as_list_and_ready_forms(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, """\
        service:
          exec_start: [/usr/bin/env, "A=b c", /bin/app]
          ready: {unix: /run/app.sock}
        """))
    assert spec.service.exec_start == ("/usr/bin/env", "A=b c", "/bin/app")
    assert spec.service.ready == Readiness("unix", "/run/app.sock", 30.0)
    assert spec.service.ready.describe() == "unix socket /run/app.sock accepts"


def test_dropin(good: Spec) -> None:
    assert good.dropin() == (
        "# Hardening tested by pytest-systemd-harden (harden.yaml)\n"
        "[Service]\n"
        "ProtectSystem=strict\n"
        "SystemCallFilter=@system-service\n"
        "SystemCallFilter=~@privileged @memlock\n"
        "CapabilityBoundingSet=\n"
        "UMask=0077\n"
    )


def test_without(good: Spec) -> None:
    smaller = good.without(["SystemCallFilter", "UMask", "NotThere"])
    assert [d.name for d in smaller.hardening] == ["ProtectSystem", "CapabilityBoundingSet"]
    assert (smaller.path, smaller.service, smaller.machine, smaller.scenarios, smaller.name) == (
        good.path, good.service, good.machine, good.scenarios, good.name)
    assert [d.name for d in good.hardening] == ["ProtectSystem", "SystemCallFilter", "CapabilityBoundingSet", "UMask"]
    assert smaller.dropin() == (
        "# Hardening tested by pytest-systemd-harden (harden.yaml)\n"
        "[Service]\nProtectSystem=strict\nCapabilityBoundingSet=\n")
    assert good.without([]) == good


def test_with_hardening(good: Spec) -> None:
    replaced = good.with_hardening([Directive.parse("PrivateTmp", True)])
    assert replaced.dropin().endswith("[Service]\nPrivateTmp=yes\n")
    assert replaced.scenarios == good.scenarios


def test_example_spec_loads() -> None:
    spec = load_spec(EXAMPLE)
    assert spec.label == "gpg-signing"
    assert spec.service.exec_start == ("/usr/bin/python3", "/opt/signer/server.py", "--port", "8080")
    assert spec.service.ready == Readiness("tcp", "8080")
    assert spec.machine.packages == ("curl", "gnupg")
    assert spec.machine.files == (("/opt/signer", str(EXAMPLE.parent / "app")),)
    assert spec.directive("UMask") == Directive("UMask", ("0077",), 33)
    assert spec.directive("DynamicUser").assignments == ("yes",)  # type: ignore[union-attr]
    assert spec.directive("RestrictNamespaces").properties()[0][1].value == 0  # type: ignore[union-attr]
    assert [s.where for s in spec.scenarios] == ["client", "client", "inside", "inside", "inside"]
    assert spec.scenarios[4].expect == Expectation(exit=1, stderr="Read-only file system")
    assert "SystemCallFilter=@system-service\n" in spec.dropin()


# --- bad specs: file, line, dotted key, problem and hint --------------------------------------------------------

def test_unknown_top_level_key(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, SERVICE + "hardenning:\n  PrivateTmp: yes\n")
    assert_message(error, path, 3, "hardenning", "unknown field", "did you mean hardening?")


def test_unknown_top_level_key_without_close_match(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, SERVICE + "zzz: 1\n")
    assert_message(error, path, 3, "zzz", "unknown field", "known fields: " + ", ".join(TOP_KEYS))


def test_unknown_directive(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, SERVICE + "hardening:\n  PrivateTmp: yes\n  ProtectSytem: strict\n")
    assert_message(error, path, 5, "hardening.ProtectSytem", "unknown directive", "did you mean ProtectSystem?")
    assert str(error) == f"{path}:5: hardening.ProtectSytem: unknown directive (did you mean ProtectSystem?)"


def test_bad_directive_value(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, SERVICE + "hardening:\n  ProtectSystem: stric\n")
    assert_message(error, path, 4, "hardening.ProtectSystem", "'stric' is not one of yes, no, full, strict",
                   "did you mean strict?")


def test_bad_directive_value_in_list(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, SERVICE + """\
hardening:
  ReadWritePaths:
    - /var/lib/app
    - var/log/app
""")
    assert_message(error, path, 4, "hardening.ReadWritePaths", "'var/log/app' is not an absolute path",
                   "paths start with /; prefix - to ignore a missing one")


def test_bad_capability_in_spec(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, SERVICE + "hardening:\n  CapabilityBoundingSet: cap_net_bind_servce\n")
    assert_message(error, path, 4, "hardening.CapabilityBoundingSet", "'cap_net_bind_servce' is not a capability",
                   "did you mean CAP_NET_BIND_SERVICE?")


def test_missing_service(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, "# comment\nname: x\nhardening: {}\n")
    assert_message(error, path, 2, "service", "missing",
                   "every spec needs `service: {exec_start: /path/to/program ...}`")


def test_missing_exec_start(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, "name: x\nservice:\n  type: simple\n")
    assert_message(error, path, 3, "service.exec_start", "missing",
                   "the command that starts the service, e.g. /usr/bin/python3 /opt/app/server.py")


def test_relative_exec_start(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, "service:\n  type: simple\n  exec_start: python3 server.py\n")
    assert_message(error, path, 3, "service.exec_start", "'python3' is not an absolute path",
                   "systemd needs the full path, e.g. /usr/bin/python3")


def test_bad_service_type(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, SERVICE + "  type: notfy\n")
    assert_message(error, path, 3, "service.type", "'notfy' is not a service type", "did you mean notify?")


def test_unknown_service_field(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, SERVICE + "  enviroment: {A: b}\n")
    assert_message(error, path, 3, "service.enviroment", "unknown field", "did you mean environment?")


def test_unknown_scenario_field(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, SERVICE + """\
scenarios:
  - name: first
    client: "true"
  - name: second
    clinet: "true"
""")
    assert_message(error, path, 7, "scenarios[1].clinet", "unknown field", "did you mean client?")


def test_unknown_expect_field(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, SERVICE + """\
scenarios:
  - name: first
    client: "true"
    expect:
      stdot: ok
""")
    assert_message(error, path, 7, "scenarios[0].expect.stdot", "unknown field", "did you mean stdout?")


def test_scenario_with_both_client_and_inside(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, SERVICE + """\
scenarios:
  - name: fine
    client: "true"
  - name: both
    client: "true"
    inside: "true"
""")
    assert_message(error, path, 6, "scenarios[1]", "needs exactly one of client: or inside:",
                   "client runs on the machine as a client of the service; inside runs in its sandbox")


def test_scenario_with_neither_client_nor_inside(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, SERVICE + "scenarios:\n  - name: nothing\n    expect: {exit: 1}\n")
    assert_message(error, path, 4, "scenarios[0]", "needs exactly one of client: or inside:",
                   "client runs on the machine as a client of the service; inside runs in its sandbox")


def test_scenario_without_name(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, SERVICE + "scenarios:\n  - client: 'true'\n")
    assert_message(error, path, 4, "scenarios[0].name", "missing", "give every scenario a name")


def test_scenarios_not_a_list(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, SERVICE + "scenarios:\n  name: x\n")
    assert_message(error, path, 3, "scenarios", "expected a list of scenarios",
                   "each item: {name: ..., client: COMMAND} or {name: ..., inside: COMMAND}")


def test_duplicate_scenario_names(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, SERVICE + """\
scenarios:
  - name: works
    client: "true"
  - name: works
    inside: "true"
""")
    assert_message(error, path, 6, "scenarios[1].name", "another scenario is already named 'works'",
                   "scenario names must be unique: they name the tests")


def test_duplicate_yaml_key_in_hardening(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, SERVICE + "hardening:\n  PrivateTmp: yes\n  PrivateTmp: no\n")
    assert_message(error, path, 5, "hardening.PrivateTmp", "duplicate key",
                   "YAML would silently keep only the last one")


def test_duplicate_yaml_key_in_scenario(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, SERVICE + """\
scenarios:
  - name: a
    client: "true"
  - name: b
    client: "true"
    client: "false"
""")
    assert_message(error, path, 8, "scenarios[1].client", "duplicate key", "YAML would silently keep only the last one")


def test_duplicate_top_level_key(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, SERVICE + "name: a\nname: b\n")
    assert_message(error, path, 4, "name", "duplicate key", "YAML would silently keep only the last one")


YAML_HINT = "check indentation and quoting; values starting with @ or ~ need quotes"


def test_invalid_yaml_unquoted_at(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, SERVICE + "hardening:\n  SystemCallFilter: @system-service\n")
    assert_message(error, path, 4, "", "not valid YAML: found character '@' that cannot start any token", YAML_HINT)


def test_invalid_yaml_unclosed_flow_list(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, "service:\n  exec_start: [/bin/true\nhardening: {}\n")
    assert_message(error, path, 3, "", "not valid YAML: expected ',' or ']', but got ':'", YAML_HINT)


def test_invalid_yaml_tab(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, "service:\n\texec_start: /bin/true\n")
    assert_message(error, path, 2, "", "not valid YAML: found character '\\t' that cannot start any token", YAML_HINT)


def test_invalid_yaml_control_character(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, SERVICE + "name: bell\x07\n")
    assert_message(error, path, 3, "", "control character U+0007 in the file",
                   "remove it: YAML allows only printable text")


def test_not_a_mapping(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, "- service\n")
    assert_message(error, path, 1, "", "a spec must be a YAML mapping", "start with `service:`")
    path, error = spec_error(tmp_path, "")
    assert_message(error, path, 1, "", "a spec must be a YAML mapping", "start with `service:`")


def test_unreadable_spec(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(missing)
    assert str(info.value) == f"{missing.resolve()}: cannot read the spec: No such file or directory"
    assert info.value.line is None


def test_machine_file_source_missing(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    path, error = spec_error(tmp_path, SERVICE + """\
machine:
  files:
    /opt/app: app/
    /opt/data: data/
""")
    assert_message(error, path, 6, "machine.files./opt/data", "'data/' does not exist",
                   f"paths are relative to the spec's directory ({tmp_path.resolve()})")


def test_machine_file_destination_relative(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    path, error = spec_error(tmp_path, SERVICE + "machine:\n  files: {opt/app: app/}\n")
    assert_message(error, path, 4, "machine.files.opt/app", "the path on the machine must be absolute", "e.g. /opt/app")


def test_bad_package_name(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, SERVICE + "machine:\n  packages:\n    - gnupg\n    - Bad_Pkg\n")
    assert_message(error, path, 6, "machine.packages[1]", "'Bad_Pkg' is not a Debian package name",
                   "lowercase letters, digits, +, - and ., e.g. gnupg")


def test_packages_not_a_list(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, SERVICE + "machine:\n  packages: gnupg\n")
    assert_message(error, path, 4, "machine.packages", "expected a list of Debian package names", "e.g. [gnupg, curl]")


def test_unknown_backend(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, SERVICE + "machine:\n  backend: nspwn\n")
    assert_message(error, path, 4, "machine.backend", "unknown backend 'nspwn'", "did you mean nspawn?")


def test_bad_expect_signal(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, SERVICE + """\
scenarios:
  - name: dies
    inside: "true"
    expect: {signal: FOO}
""")
    assert_message(error, path, 6, "scenarios[0].expect.signal", "SIGFOO is not a signal",
                   "e.g. SIGSYS (seccomp), SIGKILL")


def test_bad_expect_exit(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, SERVICE + """\
scenarios:
  - name: exits
    inside: "true"
    expect:
      exit: 300
""")
    assert_message(error, path, 7, "scenarios[0].expect.exit", "300 is not an exit status", "0-255, or any")


def test_bad_ready_port(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, SERVICE + "  ready:\n    tcp: 99999\n")
    assert_message(error, path, 4, "service.ready.tcp", "'99999' is not a TCP port", "a number 1-65535")


def test_bad_ready_kind(tmp_path: Path) -> None:
    path, error = spec_error(tmp_path, SERVICE + "  ready: {udp: 53}\n")
    assert_message(error, path, 3, "service.ready", "expected one of tcp, unix, file, active",
                   "e.g. {tcp: 8080}, {unix: /run/app.sock}, {file: /run/app/ready} or active")


def test_bad_scenario_timeout(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(tmp_path, SERVICE + "scenarios:\n  - name: a\n    client: x\n    timeout: 0\n"))
    assert info.value.line == 6
    assert info.value.key == "scenarios[0].timeout"
    assert info.value.problem == "expected a number of seconds above 0 and at most 86400, got 0"


def test_the_spec_knows_every_backend_by_name() -> None:
    # The spec stage lists the names only; the machine stage maps them to classes. The two lists must agree.
    assert sorted(BACKEND_NAMES) == sorted(BACKENDS)
