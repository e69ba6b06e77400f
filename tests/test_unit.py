"""The unit under test: `unit:` and `unit_file:` specs, how a loaded unit's settings are read, and (live) a unit
file installed, started with its drop-in, and taken out again without a trace."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pytest_systemd_harden.errors import ServiceFailed, SpecError
from pytest_systemd_harden.machine.backends.base import Machine
from pytest_systemd_harden.spec.directives import Directive
from pytest_systemd_harden.spec.load import load_spec
from pytest_systemd_harden.spec.machine import MachineConfig
from pytest_systemd_harden.spec.unit_file import (
    effective_hardening,
    expand_specifiers,
    own_directives,
    own_directives_from_files,
    parse_systemctl_cat,
    unit_files_in,
    wrap_exec_start,
)
from pytest_systemd_harden.unit.pool import MachinePool
from pytest_systemd_harden.unit.service import HardenedService

UNIT = """\
[Unit]
Description=echo %i

[Service]
DynamicUser=yes
StateDirectory=echo-%i
ExecStart=/usr/bin/python3 -m http.server --bind 127.0.0.1 %i
PrivateTmp=yes
"""


def spec_with(tmp_path: Path, service: str, unit_text: str = UNIT, name: str = "echo@.service") -> Path:
    (tmp_path / name).write_text(unit_text)
    (tmp_path / "harden.yaml").write_text(f"service: {service}\nhardening:\n  ProtectHome: yes\n")
    return tmp_path / "harden.yaml"


def test_a_unit_file_is_found_beside_the_spec_and_names_its_instance(tmp_path: Path) -> None:
    spec = load_spec(spec_with(tmp_path, "{unit_file: echo@.service, instance: '8081'}"))
    assert spec.service.unit_file == tmp_path / "echo@.service"
    assert spec.service.unit_name == "echo@8081.service"
    assert load_spec(spec_with(tmp_path, "{unit: redis-server.service}")).service.unit_name == "redis-server.service"


@pytest.mark.parametrize(("service", "message"), [
    ("{unit_file: missing.service}", "service.unit_file: 'missing.service' does not exist"),
    ("{unit_file: echo@.service}", "service.unit_file: echo@.service is a template (say which instance"),
    ("{unit: redis.service, instance: a}", "service.instance: redis.service is not a template"),
    ("{unit: redis.service, exec_start: /bin/true}", "service.exec_start: cannot be given with unit"),
    ("{unit: redis.socket}", "service.unit: 'redis.socket' is not a service unit name"),
    ("{unit: a.service, unit_file: echo@.service}", "service.unit_file: cannot be given with unit"),
    ("{exec_start: /bin/true, instance: a}", "service.instance: only a template unit has instances"),
])
def test_what_a_unit_spec_cannot_say_is_one_line_with_its_line(tmp_path: Path, service: str, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        load_spec(spec_with(tmp_path, service))
    assert f"harden.yaml:1: {message}" in str(caught.value)


def test_systemctl_cat_gives_each_setting_its_file_and_line() -> None:
    text = ("# /lib/systemd/system/a.service\n[Unit]\nDescription=a\n\n[Service]\nExecStart=/bin/a \\\n  --flag\n"
            "PrivateTmp=yes\n\n# /etc/systemd/system/a.service.d/x.conf\n[Service]\nPrivateTmp=no\n")
    settings = parse_systemctl_cat(text)
    assert [(s.key, s.value, s.source, s.line) for s in settings] == [
        ("ExecStart", "/bin/a --flag", "/lib/systemd/system/a.service", 5),
        ("PrivateTmp", "yes", "/lib/systemd/system/a.service", 7),
        ("PrivateTmp", "no", "/etc/systemd/system/a.service.d/x.conf", 2),
    ]


def test_specifiers_expand_as_systemd_defines_them() -> None:
    assert expand_specifiers("%n %N %p %i %I %% %H", "echo@a-b.service") == \
        "echo@a-b.service echo@a-b echo a-b a/b % %H"


def test_own_directives_keep_the_last_assignment_and_an_empty_one_resets_a_list() -> None:
    text = ("# /x/a.service\n[Service]\nReadWritePaths=/a\nReadWritePaths=/b\nProtectSystem=full\nExecStart=/bin/a\n"
            "\n# /x/a.service.d/y.conf\n[Service]\nReadWritePaths=\nReadWritePaths=/c\nProtectSystem=strict\n")
    found = {d.name: d for d in own_directives(parse_systemctl_cat(text), "a.service")}
    assert set(found) == {"ReadWritePaths", "ProtectSystem"}  # ExecStart is the unit's, not its sandbox
    assert found["ReadWritePaths"].assignments == ("/c",)
    assert (found["ProtectSystem"].value, found["ProtectSystem"].source, found["ProtectSystem"].line) == \
        ("strict", "/x/a.service.d/y.conf", 4)


# --- live: a unit file on a real systemd -------------------------------------------------------------------

def test_a_unit_file_runs_with_its_dropin_and_leaves_nothing_behind(machine: Machine, tmp_path: Path) -> None:
    spec = load_spec(spec_with(tmp_path, "{unit_file: echo@.service, instance: '8081', ready: {tcp: 8081}}"))
    service = HardenedService(machine, spec)
    before = service.client("ls -a /etc/systemd/system /var/lib /var/lib/private 2>&1").stdout
    service.start()
    try:
        loaded = machine.systemd.unit_properties("echo@8081.service")
        assert loaded["DropInPaths"] == ["/etc/systemd/system/echo@.service.d/harden.conf"]
        # An inside command has the unit's own settings (its user, its StateDirectory=) and the drop-in's.
        inside = service.inside("id -un; touch /var/lib/echo-8081/x && echo wrote; ls /home 2>&1 | head -1")
        assert inside.stdout.splitlines()[:2] == ["echo", "wrote"], inside
        assert "ProtectHome=yes    (harden.yaml:3)" in str(service.failure("is checked"))
        assert "StateDirectory=echo-8081    (echo@.service:6)" in str(service.failure("is checked"))
    finally:
        service.stop()
    assert service.client("ls -a /etc/systemd/system /var/lib /var/lib/private 2>&1").stdout == before


def test_a_restart_reloads_systemd_once_and_a_stop_leaves_the_reload_to_the_next_call(
        machine: Machine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_spec(spec_with(tmp_path, "{unit_file: echo@.service, instance: '8083', ready: {tcp: 8083}}"))
    service = HardenedService(machine, spec)
    reloads: list[str] = []
    send = machine.systemd._call_on

    async def counting(bus, destination, path, interface, member, *rest):  # type: ignore[no-untyped-def]
        if member == "Reload":
            reloads.append(member)
        return await send(bus, destination, path, interface, member, *rest)

    monkeypatch.setattr(machine.systemd, "_call_on", counting)
    service.start()
    try:
        assert len(reloads) == 1  # the drop-in and the unit file written, then read
        service.stop()  # both removed: systemd must read that, but only before anything looks at a unit
        assert len(reloads) == 1
        service.start()  # one reload for the stop's removal and this start's files together
        assert len(reloads) == 2
        assert machine.systemd.unit_properties("echo@8083.service")["DropInPaths"] == \
            ["/etc/systemd/system/echo@.service.d/harden.conf"]
    finally:
        service.stop()
    assert len(reloads) == 2
    # The next call reads the removal first, once, however many calls go out at once.
    state = machine.systemd.some_properties("echo@8083.service", [("org.freedesktop.systemd1.Unit", "LoadState"),
                                                                  ("org.freedesktop.systemd1.Unit", "ActiveState")])
    assert len(reloads) == 3
    assert state == {"LoadState": "not-found", "ActiveState": "inactive"}
    assert not machine.systemd.unit_properties("echo@8083.service").get("DropInPaths")
    assert len(reloads) == 3


def test_a_unit_file_systemd_rejects_is_one_line_naming_its_line(machine: Machine, tmp_path: Path) -> None:
    broken = UNIT.replace("PrivateTmp=yes", "PrivateTmp yes")
    spec = load_spec(spec_with(tmp_path, "{unit_file: echo@.service, instance: '8082'}", broken))
    with pytest.raises(SpecError) as caught:
        HardenedService(machine, spec).start()
    assert str(caught.value).startswith(f"{tmp_path / 'echo@.service'}:8: ")
    assert "Missing '='" in str(caught.value) and "\n" not in str(caught.value)
    assert not machine.run(["test", "-e", "/etc/systemd/system/echo@.service"]).ok


def test_a_unit_no_package_ships_is_one_line(machine: Machine, tmp_path: Path) -> None:
    spec = load_spec(spec_with(tmp_path, "{unit: no-such-daemon.service}"))
    with pytest.raises(SpecError) as caught:
        HardenedService(machine, spec).start()
    assert str(caught.value) == (f"{tmp_path / 'harden.yaml'}:1: service.unit: no unit no-such-daemon.service on "
                                 "the machine (add the package that ships it to machine.packages)")


def test_a_package_daemon_is_masked_at_boot_unless_the_spec_tests_it(harden_pool: MachinePool,
                                                                      tmp_path: Path) -> None:
    # memcached's package enables its unit: on a machine whose spec does not test it, it must not hold 11211.
    other = harden_pool.machine_for(MachineConfig(packages=("memcached",)))
    assert other.masked_at_boot == ("memcached.service",)
    state = other.run("systemctl is-active memcached.service; systemctl is-enabled memcached.service")
    assert state.stdout.split()[:2] == ["inactive", "masked-runtime"], state
    spec_path = tmp_path / "harden.yaml"
    spec_path.write_text("service: {unit: memcached.service, ready: {tcp: 11211}}\nmachine: {packages: [memcached]}\n")
    spec = load_spec(spec_path)
    tested = harden_pool.machine_for(spec.machine)
    assert tested.masked_at_boot == ()
    # The tested unit is held back at boot: its first start is the test's, under the drop-in, as on a host where
    # the drop-in ships with the package. Released once booted, it loads from its own file again.
    assert tested.held_at_boot == ("memcached.service",)
    state = tested.run("systemctl is-active memcached.service; systemctl is-enabled memcached.service")
    assert state.stdout.split()[:2] == ["inactive", "enabled"], state
    service = HardenedService(tested, spec)
    service.start()
    try:
        assert service.state()["ActiveState"] == "active"
        starts = tested.run("journalctl -b -o cat -u memcached.service | grep -c '^Started memcached'")
        assert starts.stdout.strip() == "1", starts  # the test's start, not one at boot before it
    finally:
        service.stop()


def test_a_package_daemon_a_unit_file_of_the_spec_requires_is_not_masked(harden_pool: MachinePool,
                                                                          tmp_path: Path) -> None:
    # The spec's own unit file is not in the image: what it requires is read from it, and left startable.
    (tmp_path / "cache-user.service").write_text(
        "[Unit]\nRequires=memcached.service\nAfter=memcached.service\n\n"
        "[Service]\nExecStart=/usr/bin/python3 -m http.server --bind 127.0.0.1 8089\n")
    spec_path = tmp_path / "harden.yaml"
    spec_path.write_text("service: {unit_file: cache-user.service, ready: {tcp: 8089}}\n"
                         "machine: {packages: [memcached]}\nhardening:\n  PrivateTmp: yes\n")
    spec = load_spec(spec_path)
    assert spec.machine.tested_unit_file == str(tmp_path / "cache-user.service")
    machine = harden_pool.machine_for(spec.machine)
    assert machine.masked_at_boot == ()
    service = HardenedService(machine, spec)
    service.start()  # was: "Unit memcached.service is masked", a one-line SpecError naming machine.services
    try:
        state = machine.run("systemctl is-active memcached.service")
        assert state.stdout.strip() == "active", state
    finally:
        service.stop()


# A package whose daemon is socket-activated, as uuidd's and many others are: the socket is what the package enables,
# and the service requires it. And a daemon of the same package that the spec does not test.
SOCKET_PACKAGE = {
    "usr/lib/systemd/system/harden-sockd.socket":
        "[Socket]\nListenStream=/run/harden-sockd.sock\n\n[Install]\nWantedBy=sockets.target\n",
    "usr/lib/systemd/system/harden-sockd.service":
        "[Unit]\nRequires=harden-sockd.socket\n\n[Service]\nExecStart=/usr/bin/harden-sockd\n",
    "usr/bin/harden-sockd": ("#!/usr/bin/python3\nimport socket\nlistener = socket.socket(fileno=3)  # the socket unit's\n"
                             "while True:\n    peer = listener.accept()[0]\n    peer.send(b'hello')\n    peer.close()\n"),
    "usr/lib/systemd/system/harden-other.service":
        "[Service]\nExecStart=/bin/sleep infinity\n\n[Install]\nWantedBy=multi-user.target\n",
    # A daemon that needs the other one through a target that is no enabled unit: found only when systemd says so.
    "usr/lib/systemd/system/harden-chain.service":
        "[Unit]\nRequires=harden-mid.target\n\n[Service]\nExecStart=/bin/sleep infinity\n",
    "usr/lib/systemd/system/harden-mid.target": "[Unit]\nRequires=harden-other.service\n",
}
SOCKET_SPEC = """\
service: {unit: harden-sockd.service}
machine: {debs: [harden-sockd_1.0_all.deb]}
hardening: {DynamicUser: yes, PrivateNetwork: yes}
scenarios:
  - name: the daemon answers on its socket
    client: python3 -c "import socket; s = socket.socket(socket.AF_UNIX); s.connect('/run/harden-sockd.sock'); print(s.recv(5).decode())"
    expect: {stdout: hello}
"""


def test_the_socket_a_package_daemon_is_activated_by_is_not_masked_at_boot(harden_pool: MachinePool,
                                                                          tmp_path: Path) -> None:
    import os
    import subprocess

    from pytest_systemd_harden.search.scenarios import run_scenario

    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text("Package: harden-sockd\nVersion: 1.0\nArchitecture: all\n"
                                             "Maintainer: t <t@example.org>\nDescription: a socket-activated daemon\n")
    for name, text in SOCKET_PACKAGE.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "usr/bin/harden-sockd").chmod(0o755)
    for wants, unit in (("sockets.target.wants", "harden-sockd.socket"), ("multi-user.target.wants",
                                                                           "harden-other.service")):
        (root / "etc/systemd/system" / wants).mkdir(parents=True)
        (root / "etc/systemd/system" / wants / unit).symlink_to(f"/usr/lib/systemd/system/{unit}")  # as enabled
    for path in [root, *root.rglob("*")]:
        os.utime(path, (1700000000, 1700000000), follow_symlinks=False)  # the same .deb every run: its image found
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root),
                    str(tmp_path / "harden-sockd_1.0_all.deb")], check=True, capture_output=True,
                   env={**os.environ, "SOURCE_DATE_EPOCH": "1700000000"})
    (tmp_path / "harden.yaml").write_text(SOCKET_SPEC)
    spec = load_spec(tmp_path / "harden.yaml")
    machine = harden_pool.machine_for(spec.machine)
    # The daemon the spec does not test is masked; the socket the tested one requires is not. Both are held back at
    # boot (a connection would start the daemon without its drop-in) and the socket listens once booted.
    assert machine.masked_at_boot == ("harden-other.service",)
    assert machine.held_at_boot == ("harden-sockd.service", "harden-sockd.socket")
    state = machine.run("systemctl is-active harden-sockd.socket harden-other.service harden-sockd.service")
    assert state.stdout.split() == ["active", "inactive", "inactive"], state
    service = HardenedService(machine, spec)
    service.start()
    try:
        outcome = run_scenario(service, spec.scenarios[0])
        assert outcome.passed, outcome.problems
        starts = machine.run("journalctl -b -o cat -u harden-sockd.service | grep -c '^Started harden-sockd'")
        assert starts.stdout.strip() == "1", starts  # the test's start, under the drop-in
    finally:
        service.stop()
    (tmp_path / "harden.yaml").write_text(SOCKET_SPEC.replace("harden-sockd.service", "harden-chain.service"))
    chain = load_spec(tmp_path / "harden.yaml")
    with pytest.raises(SpecError) as caught:
        HardenedService(harden_pool.machine_for(chain.machine), chain).start()
    assert str(caught.value).startswith(f"{tmp_path / 'harden.yaml'}:1: service.unit: systemd refuses to start "
                                        "harden-chain.service: Unit harden-other.service is masked (the machine ")
    assert str(caught.value).endswith("add it to machine.services (harden-other.service))")


def test_a_unit_that_restarts_itself_fails_its_start_at_once(machine: Machine, tmp_path: Path) -> None:
    # Restart=always shows a dying service as "activating" for ever: the start must not wait out its timeout.
    unit = "[Service]\nExecStart=/bin/sh -c 'exit 3'\nRestart=always\nRestartSec=1\n"
    spec = load_spec(spec_with(tmp_path, "{unit_file: restarts.service, ready: {tcp: 8090, timeout: 60}}", unit,
                               name="restarts.service"))
    service = HardenedService(machine, spec)
    started = time.monotonic()
    with pytest.raises(ServiceFailed) as failed:
        service.start()
    assert time.monotonic() - started < 10
    assert "exited before it was ready (TCP port 8090 accepts connections), and systemd restarts it" in \
        str(failed.value)
    service.stop()


def test_a_package_unit_is_read_from_the_image_as_systemd_finds_it(tmp_path: Path) -> None:
    lib = tmp_path / "usr/lib/systemd/system"
    (lib / "foo@.service.d").mkdir(parents=True)
    (lib / "foo@.service").write_text("[Service]\nExecStart=/bin/foo\nPrivateTmp=true\nStateDirectory=foo-%i\n")
    (lib / "foo@.service.d/10-extra.conf").write_text("[Service]\nProtectSystem=full\n")
    etc = tmp_path / "etc/systemd/system/foo@.service.d"
    etc.mkdir(parents=True)
    (etc / "10-extra.conf").write_text("[Service]\nProtectSystem=strict\n")  # hides the package's of that name
    files = unit_files_in(tmp_path, "foo@a.service")
    assert files is not None
    assert [path for path, _text in files] == ["/usr/lib/systemd/system/foo@.service",
                                               "/etc/systemd/system/foo@.service.d/10-extra.conf"]
    found = {d.name: d for d in own_directives_from_files("foo@a.service", files)}
    assert (found["ProtectSystem"].value, found["ProtectSystem"].line) == ("strict", 2)
    assert found["PrivateTmp"].value == "yes"  # systemd's boolean, as the spec writes it
    assert found["StateDirectory"].value == "foo-a"
    assert unit_files_in(tmp_path, "bar.service") is None
    dotted = unit_files_in(tmp_path, "foo@10.0.0.1.service")  # an instance name may hold dots (an address)
    assert dotted is not None and dotted[0][0] == "/usr/lib/systemd/system/foo@.service"


def test_the_tracer_wraps_every_command_of_the_units_start_keeping_its_prefixes() -> None:
    text = ("# /usr/lib/systemd/system/foo.service\n[Service]\nExecStart=/bin/old\nExecStart=\n"
            "ExecStart=-/usr/bin/foo --port %i \"a b\"\nExecStartPre=/bin/true\nExecStartPre=+/bin/root-only\n"
            "ExecStartPost=!/bin/after\nExecStop=/bin/stop\n"
            "# /etc/systemd/system/foo.service.d/x.conf\n[Service]\nExecStart=+/usr/bin/bar\nExecStartPre=@/bin/sh x\n")
    dropin, labels = wrap_exec_start(parse_systemctl_cat(text), lambda label: ["strace", "-o", f"/run/{label}", "--"],
                                     "foo.service")
    # Every command of the start is traced, each to a file of its own, but for those the wrapper cannot take over
    # (@) and those outside the sandbox (+, not ExecStart=); ExecStop= is not part of the start.
    assert dropin.splitlines()[1:] == [
        "[Service]", "ExecStartPre=", "ExecStartPre=strace -o /run/ExecStartPre-1 -- /bin/true",
        "ExecStartPre=+/bin/root-only", "ExecStartPre=@/bin/sh x",
        "ExecStart=", "ExecStart=-strace -o /run/ExecStart -- /usr/bin/foo --port %i \"a b\"",
        "ExecStart=+strace -o /run/ExecStart-2 -- /usr/bin/bar",
        "ExecStartPost=", "ExecStartPost=!strace -o /run/ExecStartPost-1 -- /bin/after"]
    assert labels == ["ExecStartPre-1", "ExecStart", "ExecStart-2", "ExecStartPost-1"]
    with pytest.raises(ValueError, match="argv"):
        wrap_exec_start(parse_systemctl_cat("# /x.service\n[Service]\nExecStart=@/bin/sh foo\n"), lambda _: ["s"],
                        "x.service")
    with pytest.raises(ValueError, match="no ExecStart"):
        wrap_exec_start(parse_systemctl_cat("# /x.service\n[Service]\nType=oneshot\n"), lambda _: ["s"], "x.service")
    # an @ line a drop-in reset is not the unit's any more
    reset = "# /x.service\n[Service]\nExecStart=@/bin/sh foo\n# /x.service.d/y.conf\n[Service]\nExecStart=\nExecStart=/bin/ok\n"
    assert wrap_exec_start(parse_systemctl_cat(reset), lambda _: ["s", "--"], "x.service")[0].splitlines()[-1] == \
        "ExecStart=s -- /bin/ok"


def test_a_drop_in_adds_to_a_units_list_and_replaces_its_single_values() -> None:
    unit = (Directive("ProtectSystem", ("full",), 3, "/u"), Directive("SystemCallFilter", ("@system-service",), 4, "/u"))
    spec = (Directive("ProtectSystem", ("strict",), 9), Directive("SystemCallFilter", ("~@setuid",), 10),
            Directive("ReadWritePaths", ("/srv",), 11))
    assert {d.name: d.assignments for d in effective_hardening(unit, spec)} == {
        "ProtectSystem": ("strict",), "SystemCallFilter": ("@system-service", "~@setuid"), "ReadWritePaths": ("/srv",)}


UNTESTABLE = [
    ("{unit: no-such-daemon.service}", UNIT, "",
     ("harden.yaml:1: service.unit: no unit no-such-daemon.service on the machine (add the package that ships it to "
     "machine.packages)")),
    ("{unit: redis-server.service}", UNIT, "machine: {packages: [memcached]}\n",
     ("harden.yaml:1: service.unit: no package in machine.packages ships redis-server.service (memcached ships "
     "memcached.service)")),
    ("{unit_file: echo@.service, instance: '8083'}", UNIT.replace("PrivateTmp=yes", "PrivateTmp yes"), "",
     "echo@.service:8: Missing '=', ignoring line. (systemd-analyze verify, on the machine)"),
]


def untestable_spec(directory: Path, service: str, unit_text: str, machine_section: str) -> None:
    """harden.yaml (and the unit file) of one UNTESTABLE case, with a scenario that would pass."""
    spec_with(directory, service, unit_text)
    with (directory / "harden.yaml").open("a") as spec:
        spec.write(machine_section + "scenarios:\n  - {name: answers, client: 'true'}\n")


@pytest.mark.parametrize(("service", "unit_text", "machine_section", "error"), UNTESTABLE,
                         ids=["no such unit", "no package ships it", "unit file systemd rejects"])
def test_a_unit_that_cannot_be_tested_is_one_line_before_any_test_runs(
        pytester: pytest.Pytester, service: str, unit_text: str, machine_section: str, error: str) -> None:
    untestable_spec(pytester.path, service, unit_text, machine_section)
    (pytester.path / "test_other.py").write_text("def test_other() -> None:\n    pass\n")
    result = pytester.runpytest("-v", "--harden-require-backend", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    lines = [line for line in result.stderr.lines if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ERROR: ") and lines[0].endswith(error), result.stderr.lines
    assert not any(word in result.stdout.str() for word in ("PASSED", "FAILED", "SKIPPED")), result.stdout.str()



@pytest.mark.parametrize(("service", "unit_text", "machine_section", "error"), UNTESTABLE,
                         ids=["no such unit", "no package ships it", "unit file systemd rejects"])
def test_under_xdist_a_unit_that_cannot_be_tested_fails_its_start_item_with_the_line(
        pytester: pytest.Pytester, service: str, unit_text: str, machine_section: str, error: str) -> None:
    # A worker cannot stop the session: raising there ended the worker, and pytest-xdist reported an internal error
    # ("Unexpectedly no active workers available") without the line. The start item says it instead.
    untestable_spec(pytester.path, service, unit_text, machine_section)
    result = pytester.runpytest_subprocess("-n", "2", "--harden-require-backend", "-p", "no:cacheprovider")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed") == 1 and not outcomes.get("passed"), outcomes  # the start; the rest not run
    assert any(line.endswith(error) for line in result.stdout.lines), result.stdout.str()
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


def test_the_pool_shuts_its_machines_down_all_at_once_and_every_one_when_one_fails() -> None:
    import threading

    from pytest_systemd_harden.errors import MachineError
    from pytest_systemd_harden.unit.pool import shut_down

    together = threading.Barrier(3, timeout=30)  # passed only by three shutdowns under way at the same time
    down: list[str] = []

    class Shutting:
        def __init__(self, name: str, fails: bool = False) -> None:
            self.name, self.fails = name, fails

        def shutdown(self) -> None:
            together.wait()
            down.append(self.name)
            if self.fails:
                raise MachineError("nspawn did not exit")

    errors = shut_down([Shutting("a"), Shutting("b", fails=True), Shutting("c")])  # type: ignore[list-item]
    assert sorted(down) == ["a", "b", "c"]
    assert errors == ["b: nspawn did not exit"]
