"""The nspawn machine and the systemd client, against a real booted container."""

from __future__ import annotations

import signal
import time

import pytest
from dbus_next import Variant

from pytest_systemd_harden.machine.backends.base import Machine


def test_systemd_is_pid_1_in_a_private_network(machine: Machine) -> None:
    result = machine.run("cat /proc/1/comm; ls /sys/class/net")
    assert result.ok, result.describe()
    comm, *interfaces = result.stdout.split()
    assert comm == "systemd"
    assert interfaces == ["lo"]  # --private-network: nothing reaches the host's network


def test_output_exit_status_and_stdin_are_collected(machine: Machine) -> None:
    result = machine.run("cat; echo to-stderr >&2; exit 3", stdin=b"from stdin\n")
    assert (result.exit_status, result.signal) == (3, None)
    assert result.stdout == "from stdin\n"
    assert result.stderr == "to-stderr\n"


def test_large_output_does_not_block(machine: Machine) -> None:
    result = machine.run("head -c 3000000 /dev/zero | tr '\\0' x")
    assert result.ok and len(result.stdout) == 3_000_000


def test_protect_system_strict_makes_writes_fail_with_erofs(machine: Machine) -> None:
    result = machine.run("touch /etc/harden-probe", [("ProtectSystem", Variant("s", "strict"))])
    assert result.exit_status == 1
    assert result.errno_names == ["EROFS"], result.describe()
    control = machine.run("touch /etc/harden-probe && rm /etc/harden-probe")
    assert control.ok, control.describe()  # the same write works without the directive


def test_system_call_filter_kills_mount_with_sigsys(machine: Machine) -> None:
    mount = ["/usr/bin/python3", "-c",
             "import ctypes; ctypes.CDLL(None).mount(b'none', b'/mnt', b'tmpfs', 0, None)"]
    result = machine.run(mount, [("SystemCallFilter", Variant("(bas)", [False, ["@mount"]]))])
    assert result.signal == signal.SIGSYS
    assert "seccomp" in result.status_text()


def test_system_call_error_number_turns_the_kill_into_an_errno(machine: Machine) -> None:
    mount = ["/usr/bin/python3", "-c",
             ("import ctypes, os; l = ctypes.CDLL(None, use_errno=True);"
              "r = l.mount(b'none', b'/mnt', b'tmpfs', 0, None); print(r, os.strerror(ctypes.get_errno()))")]
    result = machine.run(mount, [("SystemCallFilter", Variant("(bas)", [False, ["@mount"]])),
                                 ("SystemCallErrorNumber", Variant("i", 1))])
    assert result.ok, result.describe()
    assert result.stdout.strip() == "-1 Operation not permitted"


def test_timeout_stops_the_command(machine: Machine) -> None:
    result = machine.run("sleep 30", timeout=0.5)
    assert result.signal == signal.SIGTERM
    assert "timeout" in result.stderr


def test_command_units_are_collected(machine: Machine) -> None:
    machine.run("true", purpose="collected")
    machine.run("false", purpose="collected")
    assert machine.systemd.list_units("harden-*collected-*") == []  # harden-host-XXXXXX-collected-N on the host


def test_shell_syntax_reaches_the_shell_unexpanded_by_systemd(machine: Machine) -> None:
    result = machine.run('x=/a/b/c; echo "${x%/*} $((1+1)) ${UNSET:-default} $$" | cut -d" " -f1-3')
    assert result.stdout == "/a/b 2 default\n", result.describe()


def test_a_nul_byte_in_a_command_is_refused_before_the_bus_drops_the_connection(machine: Machine) -> None:
    # A NUL in a D-Bus string makes the bus drop the whole connection, after which every call waited out its
    # timeout (79 s): it is refused before anything is sent, and the machine answers the next command at once.
    started = time.monotonic()
    with pytest.raises(ValueError, match="a NUL byte cannot cross D-Bus"):
        machine.run(["echo", "a\0b"])
    assert machine.run(["echo", "still here"]).stdout == "still here\n"
    assert time.monotonic() - started < 10



def test_the_machines_own_address_is_on_its_lo_from_its_boot(machine: Machine) -> None:
    # nspawn and qemu: added during the boot by a unit of the machine's generator, so that IPAddressDeny= has a
    # non-loopback address of the machine's own to deny; the host backend adds nothing to the host (docs/probes.md).
    from pytest_systemd_harden.machine.images import ADDRESS_UNIT
    from pytest_systemd_harden.machine.systemd import UNIT_IFACE
    from pytest_systemd_harden.probes.catalogue import MACHINE_ADDRESS

    if machine.NAME == "host":  # the host is as it was (in the tests' own run, a machine of ours: it has one)
        assert not machine.address_at_boot
        return
    unit = machine.systemd.some_properties(ADDRESS_UNIT, [(UNIT_IFACE, "LoadState"), (UNIT_IFACE, "ActiveState")])
    assert machine.address_at_boot and unit == {"LoadState": "loaded", "ActiveState": "active"}
    shown = machine.run(["ip", "-4", "-o", "address", "show", "dev", "lo"])
    assert f"inet {MACHINE_ADDRESS}/32" in shown.stdout, shown.describe()


# --- the owed reload, with a bus that only records (no machine) ------------------------------------------------


class RecordingBus:
    """What SystemdClient needs of a bus object itself (the calls go through its _call_on, replaced below)."""
    connected = True

    def disconnect(self) -> None:
        pass


def test_an_owed_reload_is_made_once_before_the_next_call_and_owed_again_when_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from dbus_next.errors import DBusError

    from pytest_systemd_harden.errors import MachineError
    from pytest_systemd_harden.machine.systemd import SystemdClient

    client = SystemdClient("unix:path=/nonexistent")
    client._bus = RecordingBus()  # type: ignore[assignment]
    sent: list[str] = []
    refuse = [True]

    async def call_on(bus, destination, path, interface, member, signature, body, unix_fds=()):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.01)  # an answer takes a while: calls sent meanwhile must wait for the reload
        sent.append(member)
        if member == "Reload" and refuse[0]:
            raise DBusError("org.freedesktop.DBus.Error.Failed", "Refusing to reload")
        return [Variant("s", "257")] if member == "Get" else []

    monkeypatch.setattr(client, "_call_on", call_on)
    try:
        client.reload_before_next_call()
        with client.owed_reload_held():
            client.manager_property("Version")
        assert sent == ["Get"]  # held: not paid
        with pytest.raises(MachineError, match="could not reload its units, which changed: Refusing to reload"):
            client.manager_property("Version")
        assert sent == ["Get", "Reload"]
        refuse[0] = False
        # Still owed: paid once by the next calls, however many go out at once.
        client.some_properties("x.service", [("org.freedesktop.systemd1.Unit", "A"),
                                             ("org.freedesktop.systemd1.Unit", "B")])
        assert sent == ["Get", "Reload", "Reload", "Get", "Get"]
        client.manager_property("Version")
        assert sent[-2:] == ["Get", "Get"]
        # An explicit reload pays what is owed: one reload, not two.
        client.reload_before_next_call()
        client.reload()
        client.manager_property("Version")
        assert sent[-2:] == ["Reload", "Get"] and sent.count("Reload") == 3
    finally:
        client.close()
