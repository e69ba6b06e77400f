"""The unit under test: one interface for the three kinds a spec can name.

* :class:`TransientUnit` -- ``service: {exec_start: ...}``: made from the spec with StartTransientUnit.
* :class:`UnitFileUnit` -- ``service: {unit_file: foo.service}``: a unit file kept beside the spec, installed into
  the machine's ``/etc/systemd/system``.
* :class:`InstalledUnit` -- ``service: {unit: foo.service}``: the unit a package in ``machine.packages`` installs.

The last two are started as systemd loads them, with the spec's hardening written as a real drop-in
(``/etc/systemd/system/NAME.d/harden.conf``), so systemd parses exactly what a maintainer would ship. Files go
into the machine through the machine (a command run by its systemd), into its writable layer: the cached image
is never written. Everything the test wrote is removed again when the unit is retired; nothing else is.

The rest of the pipeline asks a unit only what every kind can answer: :meth:`UnitUnderTest.start`,
:meth:`~UnitUnderTest.retire`, :meth:`~UnitUnderTest.own_settings` (what an inside command must inherit besides
the spec's hardening) and :meth:`~UnitUnderTest.effective` (the unit as systemd sees it, for reports).
"""

from __future__ import annotations

import abc
import re
import shlex
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from dbus_next.errors import DBusError
from dbus_next.signature import Variant

from ..errors import MachineError, SpecError
from ..machine.systemd import AFTER_SIGKILL, Property
from ..spec.directives import Directive, DirectiveError
from ..spec.unit_file import (
    UNIT_DIR,
    Setting,
    expand_specifiers,
    own_directives,
    parse_systemctl_cat,
    wrap_exec_start,
)

if TYPE_CHECKING:
    from ..machine.backends.base import Machine
    from ..spec.load import Spec

DROPIN_NAME = "harden.conf"
# A diagnosis' fix, written as the drop-in it prints, read after harden.conf (drop-ins apply in name order).
FIX_DROPIN_NAME = "zz-harden-fix.conf"
# What CleanUnit may remove for a unit the test made: never "configuration" (ConfigurationDirectory= is the
# package's or the admin's, e.g. /etc/unbound) and never a unit that exists without the test (see retire()).
CLEANABLE = ("state", "cache", "logs", "runtime")
_WRITE_FILE = 'mkdir -p "$(dirname "$1")" && cat > "$1"'


def environment_files(settings: list[Setting], unit: str) -> list[Property]:
    """EnvironmentFile= lines as the transient property (path, ignore errors): a ``-`` prefix ignores a missing
    file, as in a unit file."""
    files: list[list[str | bool]] = []
    for setting in settings:
        if setting.key == "EnvironmentFile":
            value = expand_specifiers(setting.value, unit)
            if value == "":
                files = []
            else:
                files.append([value.lstrip("-"), value.startswith("-")])
    return [("EnvironmentFiles", Variant("a(sb)", files))] if files else []


class UnitUnderTest(abc.ABC):
    """The unit a spec tests, on one machine. Every kind answers the same questions; no caller asks which kind."""

    def __init__(self, machine: Machine, spec: Spec, name: str) -> None:
        self.machine = machine
        self.spec = spec
        self.name = name
        self._settings: list[Setting] | None = None
        # Drop-ins written on top at the next start (file name -> text), e.g. a diagnosis' printed fix, to be
        # verified in the form it is printed; removed again by retire().
        self.extra_dropins: dict[str, str] = {}
        # A drop-in written as harden.conf instead of the spec's, that puts the spec's hardening in force *in place
        # of* the unit's own (a diagnosis' trial relaxing the unit's own directives: it resets what the unit sets).
        # The spec's hardening is then all there is: own_directives() is empty.
        self.replacing_dropin: str | None = None
        # Drop-ins for the unit alone, not for its inside commands (the observation's ExecStart= wrapper).
        self.own_dropins: dict[str, str] = {}
        self._written: list[str] = []

    @property
    def dropin_dir(self) -> str:
        """Where the unit's drop-ins go on the machine."""
        return f"{UNIT_DIR}/{self.name}.d"

    def _write(self, path: str, text: str) -> None:
        # A file write reads no unit: it need not wait for a reload that a retire left owed (the start reloads).
        with self.machine.systemd.owed_reload_held():
            result = self.machine.run(["/bin/sh", "-c", _WRITE_FILE, "sh", path], stdin=text.encode(),
                                      purpose="install")
        if not result.ok:
            raise MachineError(f"could not write {path} on {self.machine.name}: {result.stderr.strip()}")
        self._written.append(path)

    def _write_extra_dropins(self) -> None:
        # An inside command is a unit of its own that inherits the unit's settings as properties; the extra drop-in
        # reaches it as what it is, a drop-in, through the directory that applies to every inside command's unit.
        inside = f"{UNIT_DIR}/{self.machine.unit_prefix('inside')}.service.d"
        for file_name, text in self.extra_dropins.items():
            self._write(f"{self.dropin_dir}/{file_name}", text)
            self._write(f"{inside}/{file_name}", text)

    def _remove_written(self) -> bool:
        """Remove the files the test wrote (and a drop-in directory that leaves empty); whether there were any
        (then systemd must reload: :meth:`Machine.reload_units_soon`)."""
        if not self._written:
            return False
        script = ('for f; do rm -f -- "$f" || exit; case "$f" in *.d/*) d=${f%/*}; ! test -d "$d" || '
                  'rmdir --ignore-fail-on-non-empty -- "$d" || exit;; esac; done')
        result = self.machine.run(["sh", "-c", script, "sh", *self._written], purpose="uninstall")
        if not result.ok:
            raise MachineError(f"could not remove {', '.join(self._written)}: {result.stderr.strip()}")
        self._written.clear()
        return True

    def check(self) -> None:
        """Before any test: raise a one-line :class:`SpecError` if the unit cannot be tested as the spec names it
        (a unit the machine does not have, a unit file systemd rejects). Leaves the machine as it found it."""

    @abc.abstractmethod
    def start(self) -> str:
        """Start the unit under the spec's hardening; return systemd's start job result ("done", "failed", ...)."""

    @abc.abstractmethod
    def retire(self) -> str:
        """Stop the unit and undo what the test made (only that); the next start begins from the same place.
        Return how it stopped: "stopped", "killed" (SIGKILL after the stop grace) or "not loaded".

        The files it removes are read by a reload owed to the next call (:meth:`Machine.reload_units_soon`); its own
        calls do not pay one (:meth:`SystemdClient.owed_reload_held`): a retire stops and forgets the unit as it was
        started, and a start (which begins with a retire) writes its files and reloads once for both."""

    @abc.abstractmethod
    def describe(self) -> str:
        """What runs, for failure messages: the command, or the unit file it comes from."""

    def own_settings(self) -> list[Setting]:
        """The unit's ``[Service]`` settings as systemd loaded them (none for a transient unit: the spec is all)."""
        return []

    def loaded_as(self, other: UnitUnderTest) -> None:
        """Know the unit's own settings on this machine before its first start, from ``other``, the same unit on a
        machine of the same image and configuration (the service's, for its twin). Only a unit file of the spec's
        needs it (:class:`UnitFileUnit`): a package's unit is read from this machine itself (what a test changed
        on the other is not this one's), a transient unit has none."""

    def own_directives(self) -> tuple[Directive, ...]:
        """The unit's own hardening directives, each naming its file and line (the spec's are not among them)."""
        if self.replacing_dropin is not None:
            return ()
        return own_directives(self.own_settings(), self.name)

    def command_properties(self) -> list[Property]:
        """What an inside command inherits from the unit itself, besides the spec's hardening (which comes after,
        as the drop-in comes after the unit file)."""
        props = [p for d in self.own_directives() for p in _properties(d)]
        return props + environment_files(self.own_settings(), self.name)

    def effective(self) -> str:
        """The unit as systemd sees it (``systemctl cat``), or "" when there is no file to show."""
        return ""

    def wrapped_exec_start(self, wrapper: Callable[[str], Sequence[str]]) -> tuple[str, list[str]] | None:
        """A drop-in that runs the commands of the unit's own start (``ExecStartPre=``, ``ExecStart=``, ...) under
        ``wrapper(label)`` (``strace ... --``), every other setting as loaded, and the labels of the commands
        wrapped (:func:`~pytest_systemd_harden.spec.unit_file.wrap_exec_start`); None when the spec's
        ``exec_start`` is the command (the caller wraps that). Raises :class:`ValueError` for a command line the
        wrapper cannot take over."""
        return None

    def as_one_file(self) -> str:
        """The unit and the spec's drop-in as one unit file (for ``systemd-analyze security --offline``), or ""
        when the spec itself is the unit (a transient unit: the caller renders it)."""
        return ""


def _properties(directive: Directive) -> list[Property]:
    try:
        return directive.properties()
    except DirectiveError:
        return []  # a value only systemd's own parser reads (e.g. an unexpanded specifier): the unit still has it


class TransientUnit(UnitUnderTest):
    """``service: {exec_start: ...}``: a transient unit made from the spec."""

    def __init__(self, machine: Machine, spec: Spec, name: str, properties: Callable[[], list[Property]]) -> None:
        super().__init__(machine, spec, name)
        self.properties = properties  # asked at each start: they may depend on the machine (the host backend)

    def start(self) -> str:
        systemd = self.machine.systemd
        if self.extra_dropins:
            # systemd reads drop-ins for a transient unit too (252 and 257: NAME.service.d/ after the properties).
            self._write_extra_dropins()
            systemd.reload()
        try:
            return systemd.start_transient_unit(self.name, self.properties(), timeout=self.spec.service.start_timeout)
        except DBusError as exc:
            if exc.type != "org.freedesktop.systemd1.UnitExists":
                raise
        # Loaded still (a killed run's, or one whose stop we did not see): reset it and start once more.
        self.retire()
        try:
            return systemd.start_transient_unit(self.name, self.properties(), timeout=self.spec.service.start_timeout)
        except DBusError as exc:
            raise MachineError(f"{self.name} is still loaded on {self.machine.name} after being stopped and reset "
                               f"({exc.text}); a unit of that name is held by something else") from None

    def retire(self) -> str:
        clean = any(self.spec.directive(d) for d in ("StateDirectory", "CacheDirectory", "LogsDirectory",
                                                      "RuntimeDirectory"))
        with self.machine.systemd.owed_reload_held():  # see UnitUnderTest.retire
            how = self.machine.systemd.retire_unit(self.name, clean=clean, what=CLEANABLE)
            if self._remove_written():
                self.machine.reload_units_soon()
        return how

    def describe(self) -> str:
        return "command: " + shlex.join(self.spec.service.exec_start)


class LoadedUnit(UnitUnderTest):
    """A unit systemd loads from files, started with the spec's hardening as a drop-in on top."""

    # Whether the unit exists only because the test installed it: then its State/Cache/Logs/Runtime directories
    # are the test's too, and are cleaned like a transient unit's.
    made_by_test = False

    def __init__(self, machine: Machine, spec: Spec, name: str, file_name: str) -> None:
        super().__init__(machine, spec, name)
        # The drop-in sits beside the unit's own name: for a template, the template's (as a package ships it).
        self.file_name = file_name
        self.dropin_path = spec.service.dropin_path

    def command_properties(self) -> list[Property]:
        props = super().command_properties()
        own = {d.name: d for d in (*self.own_directives(), *self.spec.hardening)}
        if "DynamicUser" in own and own["DynamicUser"].value == "yes" and "User" not in own:
            # systemd names a unit's dynamic user after the unit's prefix (user_from_unit_name()); an inside command
            # of that User= name shares the service's uid and so its StateDirectory=.
            props.append(("User", Variant("s", self.name.split("@", 1)[0].rsplit(".", 1)[0])))
        return props

    def _spec_error(self, problem: str, hint: str = "") -> SpecError:
        key = "service.unit_file" if self.spec.service.unit_file else "service.unit"
        return SpecError(str(self.spec.path), self.spec.service.line, key, problem, hint)

    @property
    def dropin_dir(self) -> str:
        return f"{UNIT_DIR}/{self.file_name}.d"

    def _install(self) -> None:
        """Put the unit's files in place (the drop-in; a unit file of the spec's), then daemon-reload."""
        self._write(self.dropin_path, self.spec.dropin() if self.replacing_dropin is None else self.replacing_dropin)
        self._write_extra_dropins()
        for file_name, text in self.own_dropins.items():
            self._write(f"{self.dropin_dir}/{file_name}", text)

    def start(self) -> str:
        try:
            self._install()
            self.machine.systemd.reload()
            self._settings = None
            self._check_loaded()
        except SpecError:
            self.retire()  # a unit the test cannot run leaves nothing behind either
            raise
        try:
            return self.machine.systemd.start_unit(self.name, timeout=self.spec.service.start_timeout)
        except DBusError as exc:
            if exc.type != "org.freedesktop.systemd1.UnitMasked":
                raise
            self.retire()  # the drop-in it wrote goes, as for any start the test cannot make
            masked = re.findall(r"Unit (\S+) is masked", exc.text)
            raise self._spec_error(
                f"systemd refuses to start {self.name}: {exc.text.rstrip('.')}",
                f"the machine masks at boot what its packages enable, but for the tested unit and what it requires, "
                f"wants or is activated by: if {self.name} needs it running, add it to machine.services "
                f"({', '.join(masked) or 'the unit named'})") from None

    def _check_loaded(self) -> None:
        props = self.machine.systemd.unit_properties(self.name)
        state = props.get("LoadState", "")
        if state == "loaded":
            return
        if state == "not-found":
            raise self._not_found()
        error = props.get("LoadError", ["", ""])
        raise self._spec_error(f"systemd cannot load {self.name} ({state}: {error[1] or error[0]})",
                               f"see systemctl status {self.name} on the machine")

    @abc.abstractmethod
    def _not_found(self) -> SpecError:
        """The error for a unit systemd does not find."""

    def retire(self) -> str:
        systemd = self.machine.systemd
        with systemd.owed_reload_held():  # see UnitUnderTest.retire
            how = systemd.stop_unit(self.name)
            systemd.wait_settled(self.name, timeout=AFTER_SIGKILL)
            systemd.reset_failed(self.name)
            if self.made_by_test:
                systemd.clean_unit(self.name, CLEANABLE)
            # A unit that exists without the test keeps its state: /var/lib, /etc and /var/cache belong to its
            # package (its postinst made them); only the files the test wrote go.
            if self._remove_written():
                self.machine.reload_units_soon()
        return how

    def own_settings(self) -> list[Setting]:
        if self._settings is None:
            # Without the drop-in: the spec's hardening is applied as the spec's, after the unit's own.
            text = self.effective()
            ours = {self.dropin_path, *(f"{self.dropin_dir}/{name}" for name in self.extra_dropins)}
            self._settings = [s for s in parse_systemctl_cat(text) if s.source not in ours]
        return self._settings

    def effective(self) -> str:
        result = self.machine.run(["systemctl", "cat", "--no-pager", "--", self.name], purpose="cat")
        return result.stdout if result.ok else ""

    def wrapped_exec_start(self, wrapper: Callable[[str], Sequence[str]]) -> tuple[str, list[str]] | None:
        return wrap_exec_start(self.own_settings(), wrapper, self.name)

    def describe(self) -> str:
        return f"unit: {self.name} as systemd loads it, with the hardening as {self.dropin_path}"

    def as_one_file(self) -> str:
        # A section may appear twice in a unit file: the drop-in's [Service] after the unit's reads as it would.
        text = self.effective() if self.spec.service.unit_file is None else self.spec.service.unit_file.read_text()
        if not text:
            raise self._not_found()
        ours = f"# {self.dropin_path}\n"  # the test's drop-ins come last (harden.conf, then the fix's)
        return text.split(ours, 1)[0].rstrip("\n") + "\n\n" + self.spec.dropin()


class UnitFileUnit(LoadedUnit):
    """``service: {unit_file: foo.service}``: a unit file beside the spec, installed as a real unit file."""

    made_by_test = True

    def loaded_as(self, other: UnitUnderTest) -> None:
        # Installed at the first start: until then this machine's systemd does not know the unit. Read again from
        # this machine after each start.
        self._settings = list(other.own_settings())

    def _install(self) -> None:
        assert self.spec.service.unit_file is not None
        self._write(f"{UNIT_DIR}/{self.file_name}", self.spec.service.unit_file.read_text())
        self._check_syntax()
        super()._install()

    def check(self) -> None:
        assert self.spec.service.unit_file is not None
        self._write(f"{UNIT_DIR}/{self.file_name}", self.spec.service.unit_file.read_text())
        try:
            self._check_syntax()
        finally:
            self._remove_written()  # never loaded: no daemon-reload needed

    def _check_syntax(self) -> None:
        """systemd's own verdict on the file (``systemd-analyze verify``, in the machine), as a one-line error
        naming the spec's file and line: a setting systemd ignores is a test of a different unit."""
        path = f"{UNIT_DIR}/{self.name}"  # a template is verified as the instance that runs
        with self.machine.systemd.owed_reload_held():  # verify loads the files into a manager of its own
            result = self.machine.run(["systemd-analyze", "verify", "--man=no", "--", path], purpose="verify")
        ours = f"{UNIT_DIR}/{self.file_name}:"
        for line in result.stderr.splitlines():
            if line.startswith(ours):
                assert self.spec.service.unit_file is not None
                where, _, message = line[len(UNIT_DIR) + 1:].partition(": ")
                line_number = where.rsplit(":", 1)[-1]
                raise SpecError(str(self.spec.service.unit_file), int(line_number) if line_number.isdigit() else None,
                                "", message.strip(), "systemd-analyze verify, on the machine")

    def _not_found(self) -> SpecError:
        return self._spec_error(f"systemd does not find {self.name} after installing {self.file_name}")

    def describe(self) -> str:
        assert self.spec.service.unit_file is not None
        return f"unit: {self.name} from {self.spec.service.unit_file.name}, with the hardening as {self.dropin_path}"


class InstalledUnit(LoadedUnit):
    """``service: {unit: foo.service}``: the unit a package installs, as installed."""

    def check(self) -> None:
        self._check_loaded()  # as booted: the package's unit, before the test writes anything

    def _not_found(self) -> SpecError:
        packages = self.spec.machine.packages
        if not packages:
            return self._spec_error(f"no unit {self.file_name} on the machine",
                                    "add the package that ships it to machine.packages")
        shipped = self._units_shipped(packages)
        listing = "; ".join(f"{p} ships {', '.join(u) or 'no service unit'}" for p, u in shipped.items())
        return self._spec_error(f"no package in machine.packages ships {self.file_name}", listing)

    def _units_shipped(self, packages: tuple[str, ...]) -> dict[str, list[str]]:
        shipped: dict[str, list[str]] = {}
        for package in packages:
            result = self.machine.run(["dpkg-query", "-L", package], purpose="dpkg")
            shipped[package] = sorted(
                line.rsplit("/", 1)[-1] for line in result.stdout.splitlines()
                if re.search(r"/systemd/system/[^/]+\.service$", line))
        return shipped


def check_unit(machine: Machine, spec: Spec) -> None:
    """Before any test runs: the unit ``spec`` names exists on ``machine`` and systemd reads its unit file without
    complaint; else a one-line :class:`SpecError` (the package listing, or systemd's message with file and line)."""
    if spec.service.unit_name:
        unit_under_test(machine, spec, "", list).check()


def unit_under_test(machine: Machine, spec: Spec, transient_name: str,
                    properties: Callable[[], list[Property]]) -> UnitUnderTest:
    """The unit ``spec`` tests on ``machine``: the one place that looks at which kind it is."""
    service = spec.service
    if service.unit_file is not None:
        return UnitFileUnit(machine, spec, service.unit_name, service.unit_file.name)
    if service.unit:
        return InstalledUnit(machine, spec, service.unit_name, service.unit)
    return TransientUnit(machine, spec, transient_name, properties)
