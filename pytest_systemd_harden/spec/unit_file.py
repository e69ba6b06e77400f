"""A unit file read as systemd reads it, without a machine: its settings (``systemctl cat`` output or the files
themselves), specifiers, the hardening it sets, and what is in force once a drop-in is read after it.

Pure text logic: the unit stage (:mod:`pytest_systemd_harden.unit.under_test`) uses it on a running machine, the
enforcement engine and the collection of items before any machine boots.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..in_tree import InTree, as_tree
from .directives import BOOL, CAPS, KNOWN, NAMESPACES, Directive

if TYPE_CHECKING:
    from .load import Spec

# Where a unit file of the spec's (unit_file:) and the drop-ins go on the machine.
UNIT_DIR = "/etc/systemd/system"
# Settings of a unit file that describe the unit's own process or lifecycle, not its sandbox: an inside command
# (a unit of its own, running a different program) must not take them over.
NOT_SANDBOX = ("Restart", "RestartSec", "RemainAfterExit", "NotifyAccess", "TimeoutStartSec", "TimeoutStopSec",
                "RuntimeMaxSec", "KillMode", "SyslogIdentifier", "Delegate")


@dataclass(frozen=True)
class Setting:
    """One ``Key=value`` line of a unit as systemd loads it: the file and line it comes from."""

    key: str
    value: str
    source: str
    line: int


def parse_systemctl_cat(text: str) -> list[Setting]:
    """The ``[Service]`` settings of ``systemctl cat`` output, in the order systemd applies them (the unit file,
    then its drop-ins), each with its file and line. Continuation lines (a trailing backslash) are joined."""
    settings: list[Setting] = []
    source, section, number = "", "", 0
    pending: tuple[str, int] | None = None
    previous = ""
    for raw in text.splitlines():
        # A file's header: "# /path" alone on its line, first or after the empty line systemctl puts between
        # files. A comment of the file itself may start "# /proc/..." too (memcached's does).
        if re.fullmatch(r"# /\S+", raw) and not previous.strip():
            source, section, number, pending, previous = raw[2:].strip(), "", 0, None, raw
            continue
        previous = raw
        number += 1
        line = raw.strip()
        if pending is not None:
            text_so_far, start = pending
            line = text_so_far + " " + line
            number_of_setting = start
        else:
            number_of_setting = number
        if line.endswith("\\"):
            pending = (line[:-1].rstrip(), number_of_setting)
            continue
        pending = None
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        if section == "Service" and "=" in line:
            key, value = line.split("=", 1)
            settings.append(Setting(key.strip(), value.strip(), source, number_of_setting))
    return settings


def expand_specifiers(value: str, unit: str) -> str:
    """The unit-name specifiers systemd expands in a unit file (%n %N %p %P %i %I %%), as systemd.unit(5) defines
    them; the others (host, user, paths) are left as they are, and said so by to_bus if they matter."""
    name = unit
    stem = name.rsplit(".", 1)[0]
    prefix, _, instance = stem.partition("@")
    unescape = _unescape
    table = {"n": name, "N": stem, "p": prefix, "P": unescape(prefix), "i": instance, "I": unescape(instance),
             "%": "%"}
    return re.sub(r"%(.)", lambda m: table.get(m.group(1), m.group(0)), value)


def _unescape(text: str) -> str:
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), text).replace("-", "/")


def own_directives(settings: list[Setting], unit: str) -> tuple[Directive, ...]:
    """The unit's own sandbox settings (as :class:`Directive` s naming their file and line): what systemd applies
    after reading the unit file and its drop-ins. An empty assignment resets a list, as in systemd."""
    found: dict[str, Directive] = {}
    for setting in settings:
        if setting.key not in KNOWN or setting.key in NOT_SANDBOX:
            continue
        value = _normalized(setting.key, expand_specifiers(setting.value, unit))
        previous = found.get(setting.key)
        if value == "":
            found.pop(setting.key, None)
            continue
        assignments = (*previous.assignments, value) if previous is not None and accumulates(setting.key) \
            else (value,)
        found[setting.key] = Directive(setting.key, assignments, setting.line, setting.source)
    return tuple(found.values())


_TRUE, _FALSE = ("1", "yes", "y", "true", "t", "on"), ("0", "no", "n", "false", "f", "off")


def _normalized(name: str, value: str) -> str:
    """A boolean as the spec writes it (``yes``/``no``): a unit file may say ``true``, ``on`` or ``1`` (systemd's
    parse_boolean), for a boolean and for the settings whose ``yes`` is a boolean (``ProtectSystem=true``)."""
    kind = KNOWN[name]
    if kind.kind is BOOL or kind.kind is NAMESPACES or "yes" in kind.choices:
        if value.lower() in _TRUE:
            return "yes"
        if value.lower() in _FALSE:
            return "no"
    return value


@dataclass(frozen=True)
class Combined(Directive):
    """A list setting both the unit and the spec's drop-in assign: what systemd puts in force, the unit's
    assignments first (the drop-in adds to them). ``parts`` are the two, each with its file and line."""

    parts: tuple[Directive, ...] = ()


def effective_hardening(own: Sequence[Directive], spec: Sequence[Directive]) -> tuple[Directive, ...]:
    """The directives in force when the spec's drop-in is read after the unit: the unit's own, then the spec's. A
    single value of the spec's replaces the unit's (the unit's is not in force); a list adds to it (one
    :class:`Combined` directive, at the unit's place) unless its first assignment is empty, which resets it."""
    ours = {d.name: d for d in spec}
    out: list[Directive] = []
    for directive in own:
        mine = ours.get(directive.name)
        if mine is None:
            out.append(directive)
        elif accumulates(directive.name) and mine.assignments[:1] != ("",):  # an empty first one resets it
            out.append(Combined(directive.name, directive.assignments + mine.assignments, mine.line,
                                parts=(directive, mine)))
    combined = {d.name for d in out if isinstance(d, Combined)}
    return (*out, *(d for d in spec if d.name not in combined))


def located(directive: Directive, spec_name: str) -> str:
    """Where a directive is written, as a user finds it: ``memcached.service:39``, ``harden.yaml:12``, or both for
    a :class:`Combined` one; "" when unknown."""
    parts = directive.parts if isinstance(directive, Combined) else (directive,)
    return ", ".join(f"{Path(p.source).name if p.source else spec_name}:{p.line}" for p in parts if p.line)


def own_directives_from_files(unit: str, files: Sequence[tuple[str, str]]) -> tuple[Directive, ...]:
    """The unit's own directives from its files ((path as systemd shows it, text), the unit file first, then its
    drop-ins in the order systemd reads them): the same as :meth:`UnitUnderTest.own_directives` finds in the
    machine, known before it boots (for collecting one enforcement item per directive)."""
    text = "\n".join(f"# {path}\n{body}" + ("" if body.endswith("\n") else "\n") for path, body in files)
    return own_directives(parse_systemctl_cat(text), unit)


# Where systemd looks for a package's unit file and drop-ins, most important first (systemd.unit(5)).
UNIT_PATHS = ("/etc/systemd/system", "/run/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system")


def template_of(unit: str) -> str:
    """foo@bar.service -> foo@.service; a unit that is no instance is its own."""
    return re.sub(r"@[^@]*(\.[a-z]+)$", r"@\1", unit)


def unit_files_in(rootfs: Path | InTree, unit: str) -> list[tuple[str, str]] | None:
    """The unit file of ``unit`` in an image's root file system and its drop-ins, as systemd would read them (the
    first unit file found along :data:`UNIT_PATHS`, the template's for an instance; every ``NAME.d/*.conf``, a
    name in an earlier directory hiding the same name in a later one, read in the order of their names); None if
    the image has no such unit."""
    tree = as_tree(rootfs)  # links resolved as in the machine (an alias to /usr/lib/...), never on the host
    template = template_of(unit)
    found: str | None = None
    for directory in UNIT_PATHS:
        for name in dict.fromkeys((unit, template)):
            if found is None and tree.is_file(f"{directory}/{name}"):
                found = f"{directory}/{name}"
    if found is None:
        return None
    dropins: dict[str, str] = {}
    for directory in UNIT_PATHS:
        for name in dict.fromkeys((template, unit)):
            for conf in tree.names(f"{directory}/{name}.d", "*.conf"):
                if tree.is_file(f"{directory}/{name}.d/{conf}"):  # a dangling link is no drop-in for systemd
                    dropins.setdefault(conf, f"{directory}/{name}.d/{conf}")
    files = [found, *(dropins[name] for name in sorted(dropins))]
    return [(path, tree.read_text(path)) for path in files]


# What a unit needs to start as it ships (systemd.unit(5), systemd.service(5)): the units it cannot start without
# (Requires=, Requisite=, BindsTo=), those a host starts with it (Wants=, Upholds=), and the sockets that pass it
# their file descriptors (Sockets=).
_NEEDS = frozenset({("Unit", "Requires"), ("Unit", "Requisite"), ("Unit", "BindsTo"), ("Unit", "Wants"),
                    ("Unit", "Upholds"), ("Service", "Sockets")})


def unit_list_settings(files: Sequence[tuple[str, str]], wanted: frozenset[tuple[str, str]],
                       unit: str) -> list[str]:
    """The unit names that ``files`` (a unit file and its drop-ins, :func:`unit_files_in`) assign to the list settings
    ``wanted`` ((section, key) pairs), specifiers expanded for ``unit``. An empty assignment changes nothing: systemd
    cannot reset a dependency list, nor Sockets= (systemd.unit(5), systemd.service(5))."""
    names: list[str] = []
    for _path, text in files:
        section = ""
        for raw in re.sub(r"\\\n", " ", text).splitlines():
            line = raw.strip()
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
            elif "=" in line and not line.startswith(("#", ";")):
                key, value = (part.strip() for part in line.split("=", 1))
                if (section, key) in wanted:
                    names += expand_specifiers(value, unit).split()
    return names


def needs_named_in(files: Sequence[tuple[str, str]], unit: str) -> tuple[str, ...]:
    """The units ``files`` (a unit file and its drop-ins) say ``unit`` needs to start: Requires=, Requisite=,
    BindsTo=, Wants=, Upholds=, Sockets=."""
    return tuple(dict.fromkeys(unit_list_settings(files, _NEEDS, unit)))


def units_needed(rootfs: Path | InTree, unit: str, candidates: Sequence[str], named: Sequence[str] = ()) -> set[str]:
    """Which of ``candidates`` (a package's enabled units) ``unit`` needs to start in ``rootfs`` as on a host, and
    what those need in turn: named in their files' Requires=, Requisite=, BindsTo=, Wants=, Upholds= or Sockets=,
    linked in their ``.wants/`` or ``.requires/`` directories, or a socket unit that activates them (their own
    name's, or one whose ``Service=`` names them). Only ``unit`` and the candidates are read; ``named`` are what
    ``unit``'s own file names, for a unit file that is not in ``rootfs`` (:func:`needs_named_in`)."""
    tree = as_tree(rootfs)
    activates: dict[str, set[str]] = {}
    for socket in (name for name in candidates if name.endswith(".socket")):
        service = unit_list_settings(unit_files_in(tree, socket) or [], frozenset({("Socket", "Service")}), socket)
        activates.setdefault(service[-1] if service else socket.removesuffix(".socket") + ".service",
                             set()).add(socket)
    needed: set[str] = set()
    queue = [unit]
    while queue:
        current = queue.pop()
        names = {*unit_list_settings(unit_files_in(tree, current) or [], _NEEDS, current),
                 *activates.get(current, ()), current.rsplit(".", 1)[0] + ".socket",
                 *(named if current == unit else ())}
        for directory in UNIT_PATHS:
            for name in dict.fromkeys((current, template_of(current))):
                for kind in (".wants", ".requires"):
                    names.update(tree.names(f"{directory}/{name}{kind}"))
        for name in sorted(names.intersection(candidates) - needed - {unit}):
            needed.add(name)
            queue.append(name)
    return needed


def own_hardening_before_boot(spec: Spec, rootfs: Callable[[], Path | InTree | None]) -> tuple[Directive, ...] | None:
    """The tested unit's own hardening, known before any machine boots: a ``unit_file:`` from the file beside the
    spec; a package's ``unit:`` from the cached image ``rootfs()`` (None: not built yet, or without the unit: then
    it is known only once the machine runs); a transient unit has none."""
    service = spec.service
    if service.unit_file is not None:
        shown = f"{UNIT_DIR}/{service.unit_file.name}"
        return own_directives_from_files(service.unit_name, [(shown, service.unit_file.read_text())])
    if not service.unit:
        return ()
    root = rootfs()
    files = unit_files_in(root, service.unit_name) if root is not None else None
    return own_directives_from_files(service.unit_name, files) if files is not None else None


def accumulates(name: str) -> bool:
    """Whether a second assignment adds to the first (lists, filters, capability and namespace sets) rather than
    replacing it (a boolean, a string, a number), as systemd reads a unit file."""
    kind = KNOWN[name].kind
    return kind.signature.startswith(("a", "(")) or kind in (CAPS, NAMESPACES)


# The commands a start runs under the unit's sandbox, in the order it runs them (ExecStop= runs at the stop).
START_COMMANDS = ("ExecCondition", "ExecStartPre", "ExecStart", "ExecStartPost")


def wrap_exec_start(settings: Sequence[Setting], wrapper: Callable[[str], Sequence[str]],
                    unit: str) -> tuple[str, list[str]]:
    """A drop-in that runs every command of the unit's start (:data:`START_COMMANDS`) under ``wrapper(label)``
    (its last word ``--``; ``label`` names the command: ``ExecStart`` for the first of those, ``ExecStart-2`` for a
    second, ``ExecStartPre-1`` for the first ``ExecStartPre=``, ...), and
    the labels wrapped. Each list is reset and its lines set again: a command line is kept as systemd reads it
    (specifiers, quoting and ``$VAR`` expand as before), its prefixes (``-``, ``!``, ``:``) move in front of the
    wrapper. Everything else (Type=, PIDFile=, User=) stays the unit's. A command other than ``ExecStart=`` with
    the ``+`` prefix runs outside the sandbox (what it needs is not the sandbox's business) and one with ``@``
    cannot be handed through the wrapper: both stay as they are. :class:`ValueError` when there is no ``ExecStart=``
    to wrap, or it has an ``@`` prefix."""
    commands: dict[str, list[Setting]] = {key: [] for key in START_COMMANDS}
    for setting in settings:
        if setting.key not in commands:
            continue
        if not setting.value:
            commands[setting.key] = []
            continue
        commands[setting.key].append(setting)
    if not commands["ExecStart"]:
        raise ValueError(f"{unit} has no ExecStart= to wrap")
    for setting in commands["ExecStart"]:  # those left after the resets
        if "@" in setting.value[:len(setting.value) - len(setting.value.lstrip("-@:+!"))]:
            raise ValueError(f"ExecStart={setting.value} ({setting.source}:{setting.line}) sets its own argv[0] "
                             "with @, which the tracer cannot hand on")
    lines, labels = ["[Service]"], []
    for key, values in commands.items():
        if not values:
            continue
        lines.append(f"{key}=")
        for number, value in enumerate((setting.value for setting in values), 1):
            command = value.lstrip("-@:+!")
            prefix = value[:len(value) - len(command)]
            if key != "ExecStart" and ("+" in prefix or "@" in prefix):
                lines.append(f"{key}={value}")
                continue
            label = key if (key, number) == ("ExecStart", 1) else f"{key}-{number}"  # a trace file each
            labels.append(label)
            lines.append(f"{key}={prefix}{' '.join(shlex.quote(w) for w in wrapper(label))} {command}")
    return "\n".join(["# Observation by pytest-systemd-harden: the unit's own start commands, traced",
                      *lines]) + "\n", labels
