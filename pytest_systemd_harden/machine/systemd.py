"""The one conversation with a systemd manager over D-Bus (org.freedesktop.systemd1).

Every backend hands this client a bus address (the container's system bus socket, a VM's forwarded bus, the
host's own); everything systemd-specific is written here once: starting transient units, waiting for their
jobs, running a command as a unit with its stdio passed as file descriptors, stopping and collecting units.

A bus relayed as a byte stream (a VM's, over virtio-serial) cannot carry file descriptors. There a command's
stdin travels in the unit itself (``StandardInputData=``) and its stdout and stderr go to files in the machine,
which the backend's :class:`OutputFiles` reads back; everything else is the same conversation.

dbus-next is asyncio-only; the plugin is synchronous. The client therefore owns a private event loop running
in a daemon thread and every public method is a blocking call into it. That keeps it independent of whatever
event loop the user's tests run.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import BusType, MessageType
from dbus_next.errors import DBusError
from dbus_next.message import Message
from dbus_next.signature import Variant

from ..errors import MachineError

# Connects a socket to a bus where the plain path would authenticate as the wrong user (a user-namespaced
# container's bus sees host root as nobody: see backends.nspawn).
SocketConnector = Callable[[], socket.socket]


class _ConnectedBus(MessageBus):
    """A MessageBus on a socket connected by a :data:`SocketConnector` instead of by path."""

    def __init__(self, connector: SocketConnector, **kwargs: Any) -> None:
        self._connector = connector
        super().__init__(**kwargs)

    def _setup_socket(self) -> None:
        sock = self._connector()
        self._sock = sock
        self._stream = sock.makefile("rwb")
        self._fd = sock.fileno()
        sock.setblocking(False)

SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SERVICE_IFACE = "org.freedesktop.systemd1.Service"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"

# What a command's outcome is read from (see SystemdClient._outcome_and_unref).
OUTCOME_PROPERTIES = ("Result", "ExecMainCode", "ExecMainStatus", "ExecMainStartTimestampMonotonic",
                      "ExecMainExitTimestampMonotonic")

# ExecMainCode values (waitid()'s si_code): how the main process ended.
CLD_EXITED, CLD_KILLED, CLD_DUMPED = 1, 2, 3

# Seconds between SIGTERM and SIGKILL for a command's unit: at its timeout, and for the processes it leaves behind
# when its main process ends (they may hold its output open; systemd stops a oneshot unit then). systemd's default
# (TimeoutStopSec=90s) let a command that ignores SIGTERM outlive its timeout by that much.
COMMAND_KILL_GRACE = 2.0
# Seconds a service gets to stop at teardown before every process of its unit is sent SIGKILL. Our own wait, not
# the unit's TimeoutStopSec=, which is the service's own (a spec's service is left as it would run for real).
SERVICE_STOP_GRACE = 5.0
# Seconds to wait for a unit's processes to go after SIGKILL (only a process stuck in the kernel takes longer).
AFTER_SIGKILL = 10.0

T = TypeVar("T")
Property = tuple[str, Variant]


def usec(seconds: float) -> int:
    """systemd's microseconds for a (positive) number of seconds."""
    return max(1, round(seconds * 1_000_000))


def unit_object_path(unit: str) -> str:
    """systemd's bus path escaping of a unit name (sd_bus_path_encode)."""
    escaped = "".join(
        ch if ch.isalnum() and ch.isascii() else f"_{ord(ch):02x}" for ch in unit
    )
    return f"{MANAGER_PATH}/unit/{escaped}"


@dataclass(frozen=True)
class ProcessOutcome:
    """How a unit's main process ended, as systemd saw it."""

    unit: str
    result: str  # the unit's Result: success, exit-code, signal, core-dump, timeout, ...
    exit_status: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    duration: float
    timed_out: bool = False


class OutputFiles(Protocol):
    """Where a command's output goes when the bus cannot pass file descriptors, and how it comes back."""

    directory: str  # in the machine; must exist and be root's

    def read(self, path: str) -> bytes:
        """The contents of ``path`` in the machine."""


def _string_with_nul(value: Any) -> str | None:
    """The first string in a message body (nested lists, tuples, variants) holding a NUL byte, or None."""
    if isinstance(value, str):
        return value if "\0" in value else None
    if isinstance(value, Variant):
        return _string_with_nul(value.value)
    if isinstance(value, (list, tuple)):
        return next((found for item in value if (found := _string_with_nul(item)) is not None), None)
    if isinstance(value, dict):
        return _string_with_nul([*value.keys(), *value.values()])
    return None


class SystemdClient:
    """A blocking client for one systemd manager, reached at ``address`` (a D-Bus address string).

    ``output_files`` is for buses that cannot pass file descriptors (see the module's docstring).
    """

    def __init__(self, address: str, *, call_timeout: float = 30.0, output_files: OutputFiles | None = None,
                 connector: SocketConnector | None = None) -> None:
        self.address = address
        self.connector = connector
        self.call_timeout = call_timeout
        self.output_files = output_files
        # Output file names are reused (StandardOutput=truncate: empties them), one pair per command running at
        # the same time, so a VM's /run does not fill up with one pair per command ever run.
        self._free_slots: list[int] = []
        self._slots = 0
        self._slot_lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"systemd-bus {address}", daemon=True)
        self._thread.start()
        self._bus: MessageBus | None = None
        # Job results seen on the bus, by job path. A JobRemoved signal can be processed before the
        # coroutine that started the job resumes, so results are recorded, not only awaited.
        self._job_results: dict[str, str] = {}
        self._job_changed = asyncio.Event()
        # A daemon-reload owed since unit files changed (reload_before_next_call); the one under way, which every
        # call sent meanwhile waits for; the threads whose calls do not wait for one (owed_reload_held).
        self._reload_owed = False
        self._reloading: asyncio.Future[list[Any]] | None = None
        self._holding: set[int] = set()

    # -- plumbing -----------------------------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if threading.get_ident() in self._holding:
            coro = _reload_held(coro)
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout if timeout is not None else self.call_timeout)
        except TimeoutError:
            future.cancel()
            raise MachineError(f"systemd at {self.address} did not answer within "
                               f"{timeout or self.call_timeout:.0f}s") from None

    def connect(self) -> None:
        self._run(self._connect())

    async def _connect(self) -> None:
        options: dict[str, Any] = {"bus_address": self.address, "bus_type": BusType.SYSTEM,
                                   "negotiate_unix_fd": self.output_files is None}
        bus = _ConnectedBus(self.connector, **options) if self.connector else MessageBus(**options)
        await bus.connect()
        bus.add_message_handler(self._on_message)
        await self._call_on(bus, "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                            "AddMatch", "s",
                            [f"type='signal',sender='{SYSTEMD}',interface='{MANAGER_IFACE}',member='JobRemoved'"])
        # Without a subscriber systemd may not emit JobRemoved at all.
        await self._call_on(bus, SYSTEMD, MANAGER_PATH, MANAGER_IFACE, "Subscribe", "", [])
        self._bus = bus

    def _on_message(self, message: Message) -> None:
        if message.message_type == MessageType.SIGNAL and message.member == "JobRemoved":
            _job_id, job_path, _unit, result = message.body
            self._job_results[job_path] = result
            self._job_changed.set()

    def close(self) -> None:
        """Disconnect and stop the loop thread. Units started with AddRef lose their reference."""
        if self._bus is not None:
            bus, self._bus = self._bus, None
            self._loop.call_soon_threadsafe(bus.disconnect)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    @staticmethod
    async def _call_on(bus: MessageBus, destination: str, path: str, interface: str, member: str,
                       signature: str, body: list[Any], unix_fds: Sequence[int] = ()) -> list[Any]:
        reply = await bus.call(Message(destination=destination, path=path, interface=interface, member=member,
                                       signature=signature, body=body, unix_fds=list(unix_fds)))
        if reply is None:
            return []
        if reply.message_type == MessageType.ERROR:
            raise DBusError(reply.error_name, reply.body[0] if reply.body else "")  # type: ignore[no-untyped-call]
        return list(reply.body)

    async def _call(self, path: str, interface: str, member: str, signature: str, body: list[Any],
                    unix_fds: Sequence[int] = ()) -> list[Any]:
        if self._bus is None:
            raise MachineError(f"not connected to systemd at {self.address}")
        # A string with a NUL byte is not a D-Bus string: the bus drops the whole connection for it, and every
        # later call would wait out its timeout. Refused here, before anything is sent.
        nul = _string_with_nul(body)
        if nul is not None:
            raise ValueError(f"{member}: a NUL byte cannot cross D-Bus (in {nul!r})")
        if not self._bus.connected:
            raise MachineError(f"the connection to systemd at {self.address} is closed (the machine stopped, or the "
                               "bus dropped it)")
        if not _RELOAD_HELD.get() and member != "Reload":  # a reload pays what is owed itself (reload)
            await self._owed_reload()
        return await self._call_on(self._bus, SYSTEMD, path, interface, member, signature, body, unix_fds)

    async def _owed_reload(self) -> None:
        if self._reload_owed and self._bus is not None:
            self._reload_owed = False
            self._reloading = asyncio.ensure_future(
                self._call_on(self._bus, SYSTEMD, MANAGER_PATH, MANAGER_IFACE, "Reload", "", []))
        reloading = self._reloading
        if reloading is None:
            return
        try:
            await asyncio.shield(reloading)  # a caller that gives up (its timeout) leaves it to the others
        except DBusError as exc:
            # Still owed (the next call tries again), and said as what it is, not as the refusal of this call.
            if self._reloading is reloading:
                self._reload_owed = True
            raise MachineError(f"systemd at {self.address} could not reload its units, which changed: "
                               f"{exc.text}") from None
        finally:
            if reloading.done() and self._reloading is reloading:
                self._reloading = None

    # -- queries ------------------------------------------------------------------------------------------

    def manager_property(self, name: str) -> Any:
        return self._run(self._get_property(MANAGER_PATH, MANAGER_IFACE, name))

    async def _get_property(self, path: str, interface: str, name: str) -> Any:
        (value,) = await self._call(path, PROPERTIES_IFACE, "Get", "ss", [interface, name])
        return value.value

    def unit_properties(self, unit: str, interface: str = UNIT_IFACE) -> dict[str, Any]:
        """All properties of ``unit`` on ``interface`` (Unit, Service, ...), as plain Python values."""
        return self._run(self._unit_properties(unit, interface))

    async def _unit_properties(self, unit: str, interface: str) -> dict[str, Any]:
        (values,) = await self._call(unit_object_path(unit), PROPERTIES_IFACE, "GetAll", "s", [interface])
        return {key: variant.value for key, variant in values.items()}

    def some_properties(self, unit: str, wanted: Sequence[tuple[str, str]]) -> dict[str, Any]:
        """The properties ``wanted`` ((interface, name) pairs) of ``unit`` that it has, asked back to back: one
        round trip. A property the unit lacks (a Service property of a unit not loaded) is left out. Cheaper than
        :meth:`unit_properties` per interface: GetAll of the Service interface is some 200 properties to unmarshal."""
        return self._run(self._some_properties(unit_object_path(unit), wanted))

    async def _some_properties(self, path: str, wanted: Sequence[tuple[str, str]]) -> dict[str, Any]:
        replies = await asyncio.gather(*(self._call(path, PROPERTIES_IFACE, "Get", "ss", [interface, name])
                                         for interface, name in wanted), return_exceptions=True)
        values: dict[str, Any] = {}
        for (_interface, name), reply in zip(wanted, replies, strict=True):
            if isinstance(reply, DBusError):
                continue
            if isinstance(reply, BaseException):
                raise reply
            assert reply is not None
            values[name] = reply[0].value
        return values

    def list_units(self, pattern: str) -> list[tuple[str, str, str]]:
        """(name, active state, sub state) of loaded units whose names match the glob ``pattern``."""
        (units,) = self._run(self._call(MANAGER_PATH, MANAGER_IFACE, "ListUnitsByPatterns", "asas", [[], [pattern]]))
        return [(u[0], u[3], u[4]) for u in units]

    def wait_until_booted(self, timeout: float) -> str:
        """Wait until the manager's SystemState is running or degraded; return that state."""
        deadline = time.monotonic() + timeout
        state = "unknown"
        while time.monotonic() < deadline:
            state = self.manager_property("SystemState")
            if state in ("running", "degraded"):
                return str(state)
            # Often a few ms away once the bus answers (the bus starts late in the boot): a 50 ms step cost every
            # boot about that much; a property read costs about 1 ms.
            time.sleep(0.01)
        raise MachineError(f"systemd did not finish booting within {timeout:.0f}s (SystemState={state})")

    # -- units --------------------------------------------------------------------------------------------

    def start_transient_unit(self, unit: str, properties: Sequence[Property], *, timeout: float = 90.0,
                             unix_fds: Sequence[int] = ()) -> str:
        """Start a transient unit and wait for its start job; return the job result ("done", "failed", ...)."""
        return self._run(self._start_and_wait(unit, properties, unix_fds, timeout), timeout + 5)

    async def _start_and_wait(self, unit: str, properties: Sequence[Property], unix_fds: Sequence[int],
                              timeout: float) -> str:
        (job,) = await self._call(MANAGER_PATH, MANAGER_IFACE, "StartTransientUnit", "ssa(sv)a(sa(sv))",
                                  [unit, "fail", [[name, value] for name, value in properties], []], unix_fds)
        return await self._wait_job(job, timeout)

    async def _wait_job(self, job: str, timeout: float) -> str:
        deadline = self._loop.time() + timeout
        while job not in self._job_results:
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                return "timeout-waiting"
            self._job_changed.clear()
            if job in self._job_results:
                break
            try:
                await asyncio.wait_for(self._job_changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        return self._job_results.pop(job, "timeout-waiting")

    def start_unit(self, unit: str, *, timeout: float = 90.0) -> str:
        """Start a unit systemd loads from its files and wait for the start job; return the job result."""
        return self._run(self._start_unit(unit, timeout), timeout + 5)

    async def _start_unit(self, unit: str, timeout: float) -> str:
        (job,) = await self._call(MANAGER_PATH, MANAGER_IFACE, "StartUnit", "ss", [unit, "replace"])
        return await self._wait_job(job, timeout)

    def restart_unit(self, unit: str, *, timeout: float = 90.0) -> str:
        """``systemctl restart``: stop ``unit`` and start it again, its files and what it made kept; wait for the
        job and return its result."""
        return self._run(self._restart_unit(unit, timeout), timeout + 5)

    async def _restart_unit(self, unit: str, timeout: float) -> str:
        (job,) = await self._call(MANAGER_PATH, MANAGER_IFACE, "RestartUnit", "ss", [unit, "replace"])
        return await self._wait_job(job, timeout)

    def reload(self) -> None:
        """``systemctl daemon-reload``: systemd reads unit files and drop-ins again (the call returns when done).
        A reload owed (:meth:`reload_before_next_call`) is this one: one reload, not two."""
        self._run(self._call(MANAGER_PATH, MANAGER_IFACE, "Reload", "", []), 120)
        self._reload_owed = False  # only once done: a refused reload is still owed

    def reload_before_next_call(self) -> None:
        """Unit files changed, and systemd must read them before anything looks at a unit again, but not sooner:
        the reload is made before the next call (any not made under :meth:`owed_reload_held`), once however many
        were owed. A retire that removed the test's drop-ins then costs no reload of its own when the next start
        writes its drop-ins and reloads anyway (a reload is ~120 ms: the generators run again). Only for a systemd
        that ends with its machine: a reload still owed at the end is never made."""
        self._reload_owed = True

    @contextlib.contextmanager
    def owed_reload_held(self) -> Iterator[None]:
        """Calls this thread makes in the block do not wait for an owed reload (:meth:`reload_before_next_call`):
        only for what reads no changed unit file (a file written for the next reload; a retire, which acts on a unit
        as it was started)."""
        thread = threading.get_ident()
        if thread in self._holding:
            yield
            return
        self._holding.add(thread)
        try:
            yield
        finally:
            self._holding.discard(thread)

    def stop_unit(self, unit: str, *, grace: float = SERVICE_STOP_GRACE) -> str:
        """Stop ``unit`` and wait for it: its stop job (SIGTERM), then SIGKILL to every process it still has after
        ``grace`` seconds. Return "stopped", "killed" (it needed the SIGKILL) or "not loaded"; MachineError if
        processes outlive SIGKILL (stuck in the kernel)."""
        try:
            how = self._run(self._stop_escalating(unit, grace), grace + AFTER_SIGKILL + 10)
        except DBusError as exc:
            if exc.type != "org.freedesktop.systemd1.NoSuchUnit":
                raise
            return "not loaded"
        if how == "unkillable":
            raise MachineError(f"{unit} still has processes {grace + AFTER_SIGKILL:.0f}s after it was stopped, "
                               f"{AFTER_SIGKILL:.0f}s after SIGKILL (stuck in the kernel?)")
        return how

    async def _stop_escalating(self, unit: str, grace: float) -> str:
        (job,) = await self._call(MANAGER_PATH, MANAGER_IFACE, "StopUnit", "ss", [unit, "replace"])
        if await self._wait_job(job, grace) != "timeout-waiting":
            return "stopped"
        try:
            await self._call(MANAGER_PATH, MANAGER_IFACE, "KillUnit", "ssi", [unit, "all", int(signal.SIGKILL)])
        except DBusError:
            pass  # it stopped meanwhile; the job says so
        return "killed" if await self._wait_job(job, AFTER_SIGKILL) != "timeout-waiting" else "unkillable"

    def wait_settled(self, unit: str, *, timeout: float = 30.0) -> None:
        """Wait until ``unit`` is inactive or failed with no job queued (what CleanUnit and a fresh start need)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                props = self.unit_properties(unit)
            except DBusError:
                return  # not loaded: settled
            job_id = props.get("Job", [0, "/"])[0]
            if props.get("ActiveState") in ("inactive", "failed") and not job_id:
                return
            if time.monotonic() > deadline:
                raise MachineError(f"{unit} did not settle within {timeout:.0f}s (state {props.get('ActiveState')}, "
                                   f"job {job_id})")
            time.sleep(0.01)

    def reset_failed(self, unit: str) -> None:
        try:
            self._run(self._call(MANAGER_PATH, MANAGER_IFACE, "ResetFailedUnit", "s", [unit]))
        except DBusError as exc:
            if exc.type != "org.freedesktop.systemd1.NoSuchUnit":
                raise

    def clean_unit(self, unit: str, what: Sequence[str] = ("all",), *, timeout: float = 30.0) -> None:
        """Remove the unit's State/Cache/Logs/RuntimeDirectory= contents (``systemctl clean``) and wait for it.

        The unit must be loaded and inactive: a transient unit is only still loaded after it stops if someone
        holds a reference to it (AddRef).
        """
        try:
            self._run(self._call(MANAGER_PATH, MANAGER_IFACE, "CleanUnit", "sas", [unit, list(what)]))
        except DBusError as exc:
            # Nothing there, or a unit never started (not loaded): nothing to clean either way.
            if exc.type in ("org.freedesktop.systemd1.NothingToClean", "org.freedesktop.systemd1.NoSuchUnit"):
                return
            raise
        deadline = time.monotonic() + timeout
        while self.unit_properties(unit).get("ActiveState") == "maintenance":  # cleaning runs as a process
            if time.monotonic() > deadline:
                raise MachineError(f"cleaning {unit} took longer than {timeout:.0f}s")
            time.sleep(0.01)

    def retire_unit(self, unit: str, *, clean: bool, what: Sequence[str] = ("all",),
                    grace: float = SERVICE_STOP_GRACE) -> str:
        """Stop ``unit`` (SIGKILL after ``grace`` seconds, see :meth:`stop_unit`) and forget it: its failed state,
        with ``clean`` the ``what`` of its directories (``CleanUnit``), and our reference, so systemd unloads it.
        The next unit of that name starts from nothing. Return how it stopped (:meth:`stop_unit`)."""
        how = self.stop_unit(unit, grace=grace)
        self.wait_settled(unit, timeout=AFTER_SIGKILL)
        self.reset_failed(unit)  # systemd 252 cleans only inactive units, not failed ones
        if clean:
            self.clean_unit(unit, what)
        self.unref_unit(unit)
        return how

    def unref_unit(self, unit: str) -> None:
        """Drop our AddRef reference, so an inactive transient unit is unloaded."""
        self._run(self._unref(unit))

    def run(self, unit: str, argv: Sequence[str], properties: Sequence[Property], *, stdin: bytes = b"",
            timeout: float = 60.0) -> ProcessOutcome:
        """Run ``argv`` as the oneshot transient service ``unit`` and wait for it to end.

        The command's stdin, stdout and stderr are memory files passed to systemd as file descriptors,
        so output of any size is collected without pipes to drain and nothing is written on either side's disk
        (or, without fd passing, files in the machine: see the module's docstring).
        ``properties`` add to (and may override) the defaults: that is how hardening is applied.
        """
        base: list[Property] = [
            ("Description", Variant("s", f"pytest-systemd-harden: {' '.join(argv)[:200]}")),
            ("Type", Variant("s", "oneshot")),
            # systemd expands $VAR and ${VAR} in ExecStart= arguments before exec; "$$" is a literal "$". A
            # command is run as given (a shell sees its own ${1%/*}, $((1+1)), ...), so every "$" is escaped.
            ("ExecStart", Variant("a(sasb)", [[argv[0], [arg.replace("$", "$$") for arg in argv], False]])),
            # Keep the unit loaded until we have read its result, and let it go if we die.
            ("AddRef", Variant("b", True)),
            ("CollectMode", Variant("s", "inactive-or-failed")),
            # systemd itself ends the command at its timeout (a oneshot's start is its run): SIGTERM to every
            # process of the unit, SIGKILL after the grace. The same grace bounds the stop that follows the main
            # process's end, when processes it left (a killed child's child holding its output) are killed.
            ("TimeoutStartUSec", Variant("t", usec(timeout))),
            ("TimeoutStopUSec", Variant("t", usec(COMMAND_KILL_GRACE))),
        ]
        if self.output_files is None:
            return self._run_with_memfds(unit, base, properties, stdin, timeout)
        return self._run_with_files(unit, base, properties, stdin, timeout, self.output_files)

    def _run_with_memfds(self, unit: str, base: list[Property], properties: Sequence[Property], stdin: bytes,
                         timeout: float) -> ProcessOutcome:
        stdin_fd, stdout_fd, stderr_fd = (os.memfd_create(name) for name in ("stdin", "stdout", "stderr"))
        try:
            if stdin:
                os.write(stdin_fd, stdin)
                os.lseek(stdin_fd, 0, os.SEEK_SET)
            stdio: list[Property] = [
                ("StandardInputFileDescriptor", Variant("h", 0)),
                ("StandardOutputFileDescriptor", Variant("h", 1)),
                ("StandardErrorFileDescriptor", Variant("h", 2)),
            ]
            return self._run_unit(unit, [*base, *stdio, *properties], (stdin_fd, stdout_fd, stderr_fd), timeout,
                                  lambda _service: (_read_all(stdout_fd), _read_all(stderr_fd)))
        finally:
            for fd in (stdin_fd, stdout_fd, stderr_fd):
                os.close(fd)

    def _run_with_files(self, unit: str, base: list[Property], properties: Sequence[Property], stdin: bytes,
                        timeout: float, files: OutputFiles) -> ProcessOutcome:
        with self._slot_lock:
            slot = self._free_slots.pop() if self._free_slots else self._slots
            self._slots = max(self._slots, slot + 1)
        stdout_path, stderr_path = (f"{files.directory}/{slot}.{name}" for name in ("stdout", "stderr"))
        try:
            # systemd opens these (as root, before the sandbox is set up), so the sandbox does not change them.
            stdio: list[Property] = [
                ("StandardInput", Variant("s", "data" if stdin else "null")),
                *([("StandardInputData", Variant("ay", stdin))] if stdin else []),
                ("StandardOutputFileToTruncate", Variant("s", stdout_path)),
                ("StandardErrorFileToTruncate", Variant("s", stderr_path)),
            ]

            def collect(service: dict[str, Any]) -> tuple[bytes, bytes]:
                if not service.get("ExecMainStartTimestampMonotonic"):
                    return b"", b""  # no process ever started: the files still hold an earlier command's output
                return files.read(stdout_path), files.read(stderr_path)

            return self._run_unit(unit, [*base, *stdio, *properties], (), timeout, collect)
        finally:
            with self._slot_lock:
                self._free_slots.append(slot)

    def _run_unit(self, unit: str, properties: list[Property], unix_fds: Sequence[int], timeout: float,
                  collect: Callable[[dict[str, Any]], tuple[bytes, bytes]]) -> ProcessOutcome:
        started = time.monotonic()
        # systemd ends the run within timeout + 2 graces (SIGTERM, SIGKILL, then it gives up on what survives);
        # the margin is for a manager too busy to say so. Past it, we stop the unit ourselves.
        bound = timeout + 2 * COMMAND_KILL_GRACE + 5
        job_result = self._run(self._start_and_wait(unit, properties, unix_fds, bound), bound + 10)
        duration = time.monotonic() - started
        if job_result == "timeout-waiting":
            self.stop_unit(unit, grace=COMMAND_KILL_GRACE)
        service = self._run(self._outcome_and_unref(unit))
        # Result=timeout is also what a stop that needed SIGKILL gives: the leftovers of a main process that ended on
        # its own, early. Only a main process that ran until the timeout was ended by it.
        ran = service.get("ExecMainExitTimestampMonotonic", 0) - service.get("ExecMainStartTimestampMonotonic", 0)
        timed_out = job_result == "timeout-waiting" or (service.get("Result") == "timeout"
                                                         and ran >= 0.95 * usec(timeout))
        code, status = service.get("ExecMainCode", 0), service.get("ExecMainStatus", 0)
        stdout, stderr = collect(service)
        return ProcessOutcome(
            unit=unit,
            result="timeout" if timed_out else str(service.get("Result", job_result)),
            exit_status=status if code == CLD_EXITED else None,
            signal=status if code in (CLD_KILLED, CLD_DUMPED) else None,
            stdout=stdout,
            stderr=stderr,
            duration=duration,
            timed_out=timed_out,
        )

    async def _outcome_and_unref(self, unit: str) -> dict[str, Any]:
        """The few Service properties an outcome needs, then our reference dropped: sent back to back, one round
        trip. (GetAll of the Service interface is some 200 properties, whose unmarshalling in dbus-next cost more
        than systemd running the command: profiled, most of client()'s overhead over systemd-run.)"""
        path = unit_object_path(unit)
        replies = await asyncio.gather(
            *(self._call(path, PROPERTIES_IFACE, "Get", "ss", [SERVICE_IFACE, name]) for name in OUTCOME_PROPERTIES),
            self._unref(unit), return_exceptions=True)
        values: dict[str, Any] = {}
        for name, reply in zip(OUTCOME_PROPERTIES, replies, strict=False):
            if isinstance(reply, BaseException):
                raise reply
            assert reply is not None
            values[name] = reply[0].value
        return values

    async def _unref(self, unit: str) -> None:
        try:
            await self._call(MANAGER_PATH, MANAGER_IFACE, "UnrefUnit", "s", [unit])
        except DBusError:
            pass  # already collected


# Set in the task of a call made under SystemdClient.owed_reload_held (and so in every task it gathers).
_RELOAD_HELD: contextvars.ContextVar[bool] = contextvars.ContextVar("reload_held", default=False)


async def _reload_held(coro: Coroutine[Any, Any, T]) -> T:
    _RELOAD_HELD.set(True)  # in this task's own context: the loop's stays as it was
    return await coro


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""
