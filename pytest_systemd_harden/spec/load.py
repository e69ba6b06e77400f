"""Hardening specs: loading, validation, and what a spec means for systemd.

A spec is a YAML file kept beside the user's package::

    service:
      exec_start: /usr/bin/python3 /opt/app/server.py --port 8080
      ready: {tcp: 8080}
    machine:
      packages: [gnupg]
      files: {/opt/app: app/}
    hardening:
      ProtectSystem: strict
      SystemCallFilter: ["@system-service", "~@privileged"]
    scenarios:
      - name: the API answers
        client: python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/')"

Every problem is reported as one :class:`~pytest_systemd_harden.errors.SpecError` naming file, line and key,
before any machine starts.
"""

from __future__ import annotations

import glob
import re
import shlex
import signal as signal_module
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from dbus_next.signature import Variant

from ..errors import SpecError
from ..probes.catalogue import Denial, DenialError, parse_denial
from . import profiles
from .directives import KNOWN, Directive, DirectiveError, Property, _closest_hint, path_problem, render_dropin
from .machine import AUTO, BACKEND_NAMES, MachineConfig
from .releases import RELEASES

SERVICE_TYPES = ("simple", "exec", "notify", "oneshot", "forking")
# The longest wait a spec may ask for (timeouts, in seconds): a day. NaN, infinity and 1e300 would never end.
MAX_SECONDS = 86400.0
MAX_LABEL = 100  # characters of a spec's name in its unit's name (systemd's own limits are 180-248, see below)
# systemd's env_name_is_valid(): what a shell can name (src/basic/env-util.c).
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# pytest's configuration files, to find the project's root as pytest would when no rootdir is given.
PROJECT_MARKERS = ("pytest.ini", ".pytest.ini", "pyproject.toml", "tox.ini", "setup.cfg")
READY_KINDS = ("tcp", "unix", "file", "active")
# A Debian package name, optionally of another architecture (multiarch: busybox-static:i386).
PACKAGE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(:[a-z0-9]+)?$")


# --- YAML with line numbers ---------------------------------------------------------------------------------

# What a spec file may be. A spec is a page of YAML: these bounds are far above any real one and far below what
# would make loading slow (a 3.7 MB file took 18 s with the pure-Python parser) or blow the stack.
MAX_SPEC_BYTES = 1024 * 1024
MAX_DEPTH = 16  # a real spec nests 5 deep (scenarios[0].expect.stdout)
MAX_VALUES = 10_000  # values after aliases are expanded (`*a` repeated is a "billion laughs"); a spec has hundreds

# libyaml's parser is C and about 20 times faster than PyYAML's own; its nodes carry the same line marks.
_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader) if yaml.__with_libyaml__ \
    else yaml.SafeLoader

# Characters YAML itself does not allow in a file (YAML 1.1 "printable"): C0 and C1 controls but tab, line feed,
# carriage return and NEL, and the non-characters U+FFFE and U+FFFF.
_UNPRINTABLE = re.compile("[^\t\n\r\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


class _Mapping(dict[Any, Any]):
    """A YAML mapping that remembers the line of each key (1-based)."""

    line: int
    key_lines: dict[Any, int]


class _Sequence(list[Any]):
    line: int
    item_lines: list[int]


class _LineLoader(_BaseLoader):  # type: ignore[valid-type,misc]
    def __init__(self, stream: bytes, spec_path: str) -> None:
        super().__init__(stream)
        self.spec_path = spec_path
        # Keys and [indexes] from the document root to the node being constructed, for dotted keys in errors.
        self._path: list[str] = []

    def _dotted(self, key: Any) -> str:
        parts = [*self._path, str(key)]
        return "".join(p if p.startswith("[") or i == 0 else f".{p}" for i, p in enumerate(parts))

    def _construct_at(self, part: str, node: yaml.Node) -> Any:
        self._path = [*self._path, part]
        try:
            return self.construct_object(node, deep=True)
        finally:
            self._path = self._path[:-1]

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        mapping = _Mapping()
        mapping.line = node.start_mark.line + 1
        mapping.key_lines = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                # A list or mapping as a key cannot be hashed; a number, yes/no or null as a key is YAML 1.1
                # reading text the user meant as a name (an environment variable ON, a path).
                shown = f"{key!r}" if not isinstance(key, (dict, list)) else type(key).__name__
                raise SpecError(self.spec_path, line, self._dotted(shown), f"a key must be text, not {shown}",
                                "quote it, e.g. 'ON': or '8080':")
            if key in mapping:
                raise SpecError(self.spec_path, line, self._dotted(key), "duplicate key",
                                "YAML would silently keep only the last one")
            mapping[key] = self._construct_at(key, value_node)
            mapping.key_lines[key] = line
        return mapping

    def construct_sequence(self, node: yaml.SequenceNode, deep: bool = False) -> list[Any]:
        sequence = _Sequence(self._construct_at(f"[{index}]", child) for index, child in enumerate(node.value))
        sequence.line = node.start_mark.line + 1
        sequence.item_lines = [child.start_mark.line + 1 for child in node.value]
        return sequence


class SourceInt(int):
    """An int that remembers how it was written: YAML 1.1 reads 0077 as octal and 1024:50 as base 60, where
    systemd would read "0077" and "1024:50"."""

    source: str


class SourceFloat(float):
    """A float that remembers how it was written (1e3, not 1000.0; .nan), for the same reason as SourceInt."""

    source: str


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    value = SourceInt(loader.construct_yaml_int(node))
    value.source = str(node.value)
    return value


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    value = SourceFloat(loader.construct_yaml_float(node))
    value.source = str(node.value)
    return value


_LineLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_LineLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _LineLoader.construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _LineLoader.construct_sequence)


def _line_of(container: Any, key: Any = None) -> int | None:
    if isinstance(container, _Mapping):
        return container.key_lines.get(key, container.line) if key is not None else container.line
    if isinstance(container, _Sequence):
        if isinstance(key, int) and key < len(container.item_lines):
            return container.item_lines[key]
        return container.line
    return None


# --- the spec model -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Readiness:
    """When the service counts as ready: a TCP port accepts, a socket or file exists, or the unit is active."""

    kind: str
    target: str = ""
    timeout: float = 30.0

    def describe(self) -> str:
        return {"tcp": f"TCP port {self.target} accepts connections", "unix": f"unix socket {self.target} accepts",
                "file": f"{self.target} exists", "active": "the unit is active"}[self.kind]


@dataclass(frozen=True)
class Expectation:
    """What a scenario's command must do. ``exit`` None means: any exit status (then ``signal`` may be set)."""

    exit: int | None = 0
    signal: str | None = None
    stdout: str | None = None
    stderr: str | None = None

    def describe(self) -> str:
        parts = [f"signal {self.signal}" if self.signal else f"exit status {self.exit}" if self.exit is not None
                 else "any exit status"]
        if self.stdout is not None:
            parts.append(f"stdout containing {self.stdout!r}")
        if self.stderr is not None:
            parts.append(f"stderr containing {self.stderr!r}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Scenario:
    """A feature the service must still have under hardening, checked by one command."""

    name: str
    command: str | tuple[str, ...]  # a shell command line, or an argv run without a shell
    where: str  # "client": unconfined on the machine; "inside": in the service's sandbox
    expect: Expectation
    timeout: float = 60.0
    line: int | None = None


@dataclass(frozen=True)
class ServiceConfig:
    """What the unit under test is (see :mod:`pytest_systemd_harden.unit.under_test`): a transient unit made from
    ``exec_start`` and the fields below, a unit file kept beside the spec (``unit_file``), or a unit a package
    installs (``unit``). The last two are started as systemd loads them, with the hardening as a drop-in."""

    exec_start: tuple[str, ...]
    # exec, not simple: the start job then fails when systemd cannot set up the sandbox or exec the program
    # (217/USER, 203/EXEC, 226/NAMESPACE), instead of "starting" a service that never ran.
    type: str = "exec"
    ready: Readiness = Readiness("active")
    environment: tuple[tuple[str, str], ...] = ()
    working_directory: str | None = None
    start_timeout: float = 30.0
    unit: str = ""  # a unit name installed on the machine (by a package), e.g. redis-server.service
    unit_file: Path | None = None  # a unit file on the host, installed into the machine's /etc/systemd/system
    instance: str = ""  # for a template (foo@.service): the instance to start
    line: int | None = None  # where `unit:`/`unit_file:` is written in the spec, for errors about the unit

    @property
    def unit_name(self) -> str:
        """The name systemd knows the unit by ("" for a transient unit): foo.service, or foo@INSTANCE.service."""
        name = self.unit or (self.unit_file.name if self.unit_file else "")
        if self.instance:
            return name.replace("@.", f"@{self.instance}.", 1)
        return name

    @property
    def dropin_path(self) -> str:
        """Where the hardening ships for a unit systemd loads ("" for a transient unit): beside the unit file's own
        name, for a template the template's, which every instance reads."""
        name = self.unit or (self.unit_file.name if self.unit_file else "")
        return f"/etc/systemd/system/{name}.d/harden.conf" if name else ""

    def properties(self) -> list[Property]:
        props: list[Property] = [
            ("Type", Variant("s", self.type)),
            ("ExecStart", Variant("a(sasb)", [[self.exec_start[0], list(self.exec_start), False]])),
        ]
        if self.environment:
            props.append(("Environment", Variant("as", [f"{k}={v}" for k, v in self.environment])))
        if self.working_directory:
            props.append(("WorkingDirectory", Variant("s", self.working_directory)))
        return props


@dataclass(frozen=True)
class EnforcementSettings:
    """Which enforcement items a spec gets: one per confining directive (default), none (``enforcement: false``),
    or all but those listed (``enforcement: {skip: [MemoryMax]}``)."""

    enabled: bool = True
    skip: tuple[str, ...] = ()


@dataclass(frozen=True)
class Spec:
    """A loaded, validated hardening spec."""

    path: Path
    service: ServiceConfig
    machine: MachineConfig
    hardening: tuple[Directive, ...]
    scenarios: tuple[Scenario, ...]
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    # Actions the sandbox must deny (``deny:``), and which directives get an enforcement item (``enforcement:``).
    denials: tuple[Denial, ...] = ()
    enforcement: EnforcementSettings = EnforcementSettings()
    # The built-in profile the hardening starts from ("" for none); its directives are already in `hardening`.
    profile: str = ""
    # The highest `systemd-analyze security` exposure (0.0-10.0) the rendered unit may score; None: not checked.
    max_exposure: float | None = None
    # For `systemd-harden tighten`: directives never to touch, and directives never to add.
    tighten_keep: tuple[str, ...] = ()
    tighten_never: tuple[str, ...] = ()
    tighten_offline: bool = False  # tighten: {offline: true}: the service needs no network (tighten.policy_exclusions)
    # machine.release as written: the Debian releases the spec is pinned to, one run on each; () for the session's.
    releases: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.name or self.path.stem

    def directive(self, name: str) -> Directive | None:
        return next((d for d in self.hardening if d.name == name), None)

    def hardening_properties(self) -> list[Property]:
        return [prop for directive in self.hardening for prop in directive.properties()]

    def dropin(self) -> str:
        source = self.path.name + (f", starting from profile {self.profile}" if self.profile else "")
        return render_dropin(self.hardening, header=f"Hardening tested by pytest-systemd-harden ({source})")

    def without(self, names: Sequence[str]) -> Spec:
        """The same spec with the named directives removed (for diagnosis and control runs)."""
        return replace(self, hardening=tuple(d for d in self.hardening if d.name not in names))

    def with_hardening(self, directives: Sequence[Directive]) -> Spec:
        return replace(self, hardening=tuple(directives))

    def on_release(self, release: str) -> Spec:
        """The same spec on one Debian release (one of several it pins, or the session's)."""
        return self if self.machine.release == release or not release else \
            replace(self, machine=replace(self.machine, release=release))


# --- loading ------------------------------------------------------------------------------------------------

TOP_KEYS = ("name", "profile", "service", "machine", "hardening", "scenarios", "deny", "enforcement", "max_exposure",
            "tighten")
TIGHTEN_KEYS = ("keep", "never", "offline")
SERVICE_KEYS = ("exec_start", "type", "ready", "environment", "working_directory", "start_timeout", "unit",
                "unit_file", "instance")
# Fields that describe how to make a transient unit: a unit that exists already (unit/unit_file) says all that itself.
TRANSIENT_ONLY_KEYS = ("exec_start", "type", "environment", "working_directory")
UNIT_NAME_RE = re.compile(r"^[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\-]*)?\.service$")
MACHINE_KEYS = ("packages", "files", "backend", "release", "debs", "files_outside_project", "privileged", "services")
# A unit a package may enable at boot: what machine.services names.
BOOT_UNIT_RE = re.compile(r"^[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\-]*)?\.(service|socket|timer|path)$")
SCENARIO_KEYS = ("name", "client", "inside", "expect", "timeout")
EXPECT_KEYS = ("exit", "signal", "stdout", "stderr")


class _Checker:
    """Validation helpers that know the file, so every error carries file and line."""

    def __init__(self, path: Path, root: Path | None = None) -> None:
        self.path = path
        self.root = root

    def error(self, container: Any, key: Any, dotted: str, problem: str, hint: str = "") -> SpecError:
        return SpecError(str(self.path), _line_of(container, key), dotted, problem, hint)

    def mapping(self, value: Any, container: Any, key: Any, dotted: str) -> _Mapping:
        if not isinstance(value, dict):
            raise self.error(container, key, dotted, f"expected a mapping, got {type(value).__name__}")
        return value if isinstance(value, _Mapping) else _as_mapping(value)

    def known_keys(self, mapping: _Mapping, allowed: Sequence[str], prefix: str) -> None:
        for key in mapping:
            if key not in allowed:
                raise self.error(mapping, key, f"{prefix}{key}", "unknown field",
                                 _closest_hint(str(key), allowed) or f"known fields: {', '.join(allowed)}")

    def string(self, mapping: Any, key: Any, dotted: str, empty: bool = True) -> str:
        value = mapping[key]
        if isinstance(value, (dict, list)) or value is None:
            raise self.error(mapping, key, dotted, "expected a string")
        if isinstance(value, bool):  # YAML 1.1 reads yes, no, on, off as booleans
            raise self.error(mapping, key, dotted, f"expected a string, got the boolean {value}",
                             "quote it: YAML reads yes, no, on and off as true and false")
        text = str(getattr(value, "source", value))
        if not empty and not text.strip():
            raise self.error(mapping, key, dotted, "is empty")
        return text

    def number(self, mapping: _Mapping, key: str, dotted: str, maximum: float = MAX_SECONDS) -> float:
        """A number of seconds: positive, finite and at most ``maximum`` (a wait that never ends is a hang)."""
        value = mapping[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= maximum:
            shown = str(getattr(value, "source", repr(value)))
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise self.error(mapping, key, dotted, f"expected a number of seconds above 0 and at most {maximum:g}, "
                                                   f"got {shown}", "e.g. 30 or 2.5")
        return float(value)

    def absolute_path(self, mapping: Any, key: Any, dotted: str, text: str, what: str = "path") -> str:
        problem = path_problem(text)
        if problem:
            raise self.error(mapping, key, dotted, f"{text!r} {problem}", f"an absolute, normalized {what}, "
                                                                          "e.g. /opt/app")
        return text


def _as_mapping(value: dict[Any, Any]) -> _Mapping:
    mapping = _Mapping(value)
    mapping.line = 0
    mapping.key_lines = {}
    return mapping


def load_spec(path: str | Path, root: Path | None = None) -> Spec:
    """Load and validate the spec at ``path``; raise SpecError (file:line: key: problem (hint)) if it is wrong.

    ``root`` is the project's root (pytest's rootdir): ``machine.files`` may come from under it or from the spec's
    own directory. Without it, the nearest directory above the spec holding a pytest configuration file counts.
    """
    path = Path(path).resolve()
    raw = _read_bounded(path)
    text = _decode(raw, path)
    bad = _UNPRINTABLE.search(text)
    if bad:
        raise SpecError(str(path), text.count("\n", 0, bad.start()) + 1, "",
                        f"control character U+{ord(bad.group()):04X} in the file",
                        "remove it: YAML allows only printable text")
    try:
        _check_nesting(raw, path)
        loader = _LineLoader(raw, str(path))
        try:
            document = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        exc = _python_parser_error(raw, exc)
        if isinstance(exc, yaml.MarkedYAMLError):
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark else None
            problem = exc.problem or exc.context
            if isinstance(exc, yaml.composer.ComposerError) and exc.context and exc.problem:
                problem = f"{exc.context}, {exc.problem}"  # "expected a single document in the stream, but ..."
        else:  # e.g. a ReaderError: it has a position in the byte stream, not a mark
            position = getattr(exc, "position", None)
            line = raw.count(b"\n", 0, position) + 1 if isinstance(position, int) else None
            problem = str(exc).splitlines()[0]
        raise SpecError(str(path), line, "", f"not valid YAML: {problem}",
                        "check indentation and quoting; values starting with @ or ~ need quotes") from None
    return parse_spec(document, path, root)


def _python_parser_error(raw: bytes, error: yaml.YAMLError) -> yaml.YAMLError:
    """PyYAML's own message for a syntax error libyaml found: it names the character ("found character '@'
    that cannot start any token"), libyaml's does not. Only for a file of normal size: the pure-Python parser is
    slow, and only its message is wanted."""
    if not yaml.__with_libyaml__ or len(raw) > 64 * 1024 or isinstance(error, yaml.constructor.ConstructorError):
        return error
    loader = yaml.SafeLoader(raw)
    try:
        while loader.check_event():
            loader.get_event()  # type: ignore[no-untyped-call]
    except yaml.YAMLError as exc:
        return exc
    finally:
        loader.dispose()
    return error


def _read_bounded(path: Path) -> bytes:
    """The file's bytes, refusing more than MAX_SPEC_BYTES before reading them."""
    too_big = SpecError(str(path), None, "", f"the spec is larger than {MAX_SPEC_BYTES // 1024 // 1024} MiB",
                        "a spec is a page of YAML; is this the right file?")
    try:
        with path.open("rb") as file:
            if path.stat().st_size > MAX_SPEC_BYTES:
                raise too_big
            raw = file.read(MAX_SPEC_BYTES + 1)  # a file that grows while read, or a pipe, has no honest size
    except OSError as exc:
        raise SpecError(str(path), None, "", f"cannot read the spec: {exc.strerror}") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise too_big
    return raw


def _decode(raw: bytes, path: Path) -> str:
    """The file as text: UTF-8 only (YAML's own default), with one message naming what the file is instead."""
    head = raw[:64]
    # UTF-16 and UTF-32 text that is mostly ASCII has a NUL in every other byte (at odd or even offsets); a binary
    # file has NULs too, but not in that pattern.
    wide = len(head) >= 4 and any(not any(head[start::2]) and any(head[1 - start::2]) for start in (0, 1))
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or wide:
        raise SpecError(str(path), None, "", "the spec is UTF-16 or UTF-32 encoded, not UTF-8",
                        "save it as UTF-8, e.g. iconv -f UTF-16 -t UTF-8")
    if b"\x00" in raw:
        line = raw.count(b"\n", 0, raw.index(b"\x00")) + 1
        raise SpecError(str(path), line, "", "the spec is not a text file (it contains NUL bytes)",
                        "a spec is a YAML text file; is this the right file?")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise SpecError(str(path), line, "", f"the spec is not UTF-8 (byte 0x{raw[exc.start]:02X} cannot be decoded)",
                        "save it as UTF-8; Latin-1 text, e.g., converts with iconv -f LATIN1 -t UTF-8") from None


def _check_nesting(raw: bytes, path: Path) -> None:
    """Refuse nesting deeper than MAX_DEPTH while reading events, before anything recursive sees the document
    (the composer and constructor recurse once per level: 100000 [ would exhaust the stack)."""
    loader = _BaseLoader(raw)
    try:
        depth = 0
        while loader.check_event():
            event = loader.get_event()  # type: ignore[no-untyped-call]
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise SpecError(str(path), event.start_mark.line + 1 if event.start_mark else None, "",
                                    f"nested more than {MAX_DEPTH} levels deep",
                                    "a spec nests a few levels; check the brackets and indentation")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
    finally:
        loader.dispose()


# Where a newline in a value is meant: a scenario's command (a script) and the output it must print. Every other
# value ends up in a unit file, a drop-in or a D-Bus property read as one line, where a newline would start a new
# directive that was never tested.
_MULTILINE_KEYS = re.compile(r"^scenarios\[\d+\]\.(client|inside|expect\.stdout|expect\.stderr)(\[\d+\])?$")
# Control characters never belong in a spec's values: a NUL cannot pass D-Bus or an argv, the others end or
# garble a unit-file line. Tab and newline are decided separately.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
_SCALARS = (str, int, float, bool, type(None))


def _check_values(document: Any, path: Path) -> None:
    """Every value of the document: plain YAML types only, no control characters, newlines only in scripts, a
    bounded depth and count (aliases included)."""
    stack: list[tuple[Any, Any, Any, str, int]] = [(document, None, None, "", 0)]
    seen = 0
    while stack:
        value, container, key, dotted, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES or depth > MAX_DEPTH:
            problem = f"more than {MAX_VALUES} values" if seen > MAX_VALUES else f"nested more than {MAX_DEPTH} " \
                "levels deep"
            raise SpecError(str(path), _line_of(container, key), dotted, problem,
                            "aliases (*name) count once per use; a spec is a page of YAML")
        if isinstance(value, dict):
            for child_key, child in value.items():
                child_dotted = f"{dotted}.{child_key}" if dotted else str(child_key)
                if isinstance(child_key, str):
                    _check_text(child_key, value, child_key, child_dotted, path, multiline=False)
                stack.append((child, value, child_key, child_dotted, depth + 1))
        elif isinstance(value, list):
            for index, child in enumerate(value):
                stack.append((child, value, index, f"{dotted}[{index}]", depth + 1))
        elif isinstance(value, str):
            _check_text(value, container, key, dotted, path, multiline=bool(_MULTILINE_KEYS.match(dotted)))
        elif not isinstance(value, _SCALARS):
            what = {"date": "a date", "datetime": "a date and time", "bytes": "binary data (!!binary)",
                    "set": "a set (!!set)", "tuple": "a pair"}.get(type(value).__name__, type(value).__name__)
            raise SpecError(str(path), _line_of(container, key), dotted, f"{what} is not a value a spec takes",
                            "quote it to make it text")


def _check_text(text: str, container: Any, key: Any, dotted: str, path: Path, multiline: bool) -> None:
    bad = _CONTROL.search(text)
    if bad is None and not multiline and "\n" in text:
        raise SpecError(str(path), _line_of(container, key), dotted, "contains a newline",
                        "this value ends up on one line of a unit file, where a newline would start another "
                        "directive; only scenario commands and expected output may span lines")
    if bad is not None:
        name = {"\x00": "a NUL byte", "\r": "a carriage return"}.get(bad.group(), f"control character "
                                                                                   f"U+{ord(bad.group()):04X}")
        raise SpecError(str(path), _line_of(container, key), dotted, f"contains {name}",
                        "no value may hold control characters: D-Bus, argv and unit files cannot carry them")


def parse_spec(document: Any, path: Path, root: Path | None = None) -> Spec:
    """Validate an already-parsed YAML document (see :func:`load_spec`)."""
    check = _Checker(path, root)
    if not isinstance(document, dict):
        raise SpecError(str(path), 1, "", "a spec must be a YAML mapping", "start with `service:`")
    _check_values(document, path)
    doc = check.mapping(document, None, None, "")
    check.known_keys(doc, TOP_KEYS, "")
    if "service" not in doc:
        raise check.error(doc, None, "service", "missing",
                          "every spec needs `service: {exec_start: /path/to/program ...}`")
    service = _parse_service(check, check.mapping(doc["service"], doc, "service", "service"))
    machine_section = check.mapping(doc.get("machine") or _as_mapping({}), doc, "machine", "machine")
    releases = _parse_releases(check, machine_section)
    machine = _parse_machine(check, machine_section, releases)
    profile = _parse_profile(check, doc)
    hardening = _parse_hardening(check, doc.get("hardening"), doc, profile)
    scenarios = _parse_scenarios(check, doc.get("scenarios"), doc)
    denials = _parse_denials(check, doc.get("deny"), doc)
    enforcement = _parse_enforcement(check, doc, hardening)
    name = check.string(doc, "name", "name", empty=False) if "name" in doc else ""
    _check_unit_name(check, doc, name or path.stem, hardening)
    max_exposure = _parse_max_exposure(check, doc) if "max_exposure" in doc else None
    keep, never = _parse_tighten(check, doc)
    if service.unit_name:
        machine = replace(machine, tested_unit=service.unit_name)  # never masked at boot (machine.images.boot_units)
    if service.unit_file is not None:  # nor what its own file needs to start
        machine = replace(machine, tested_unit_file=str(service.unit_file))
    return Spec(path, service, machine, hardening, scenarios, name, denials=denials, enforcement=enforcement,
                profile=profile.name if profile else "",
                max_exposure=max_exposure, tighten_keep=keep, tighten_never=never,
                tighten_offline=_parse_tighten_offline(check, doc), releases=releases)


def _parse_tighten_offline(check: _Checker, doc: _Mapping) -> bool:
    """``tighten: {offline: true}``: the service needs no network beyond its machine, so tighten may add network
    restrictions that the offline machine cannot show to be harmless otherwise."""
    section = doc.get("tighten")
    if not isinstance(section, dict) or "offline" not in section:
        return False
    value = section["offline"]
    if not isinstance(value, bool):
        raise check.error(section, "offline", "tighten.offline", f"{value!r} is not a boolean",
                          "true if the service needs no network beyond its own machine")
    return value


def _check_unit_name(check: _Checker, doc: _Mapping, label: str, hardening: Sequence[Directive]) -> None:
    """The service runs as harden-<label>.service, and with DynamicUser= (and no User=) as the user of that name:
    what systemd refuses there would fail the start, so it is refused here."""
    source = "name" if "name" in doc else f"the file name {check.path.name!r}"
    unit = unit_name(label)
    if len(unit) - len("harden-.service") > MAX_LABEL:
        # unit_name_is_valid() stops at 255; a dynamic user's files fail with "File name too long" from ~190.
        raise check.error(doc, "name" if "name" in doc else None, "name",
                          f"{source} is {len(label)} characters long, too long for the unit name {unit[:30]}...",
                          f"at most {MAX_LABEL}; give the spec a shorter name:")
    dynamic = next((d for d in hardening if d.name == "DynamicUser"), None)
    user = next((d for d in hardening if d.name == "User"), None)
    if dynamic is not None and dynamic.assignments[-1:] == ("yes",) and user is None and "." in label:
        raise check.error(doc, "name" if "name" in doc else None, "name",
                          f"with DynamicUser: yes the service's user is named after the unit "
                          f"({unit.removesuffix('.service')}), and systemd refuses a . in a dynamic user's name",
                          "give the spec a name: without dots, or set User:")


def _parse_tighten(check: _Checker, doc: _Mapping) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``tighten: {keep: [...], never: [...]}``: directive names, each checked against the known directives."""
    if "tighten" not in doc:
        return (), ()
    section = check.mapping(doc["tighten"], doc, "tighten", "tighten")
    check.known_keys(section, TIGHTEN_KEYS, "tighten.")
    lists: dict[str, tuple[str, ...]] = {}
    for key in ("keep", "never"):
        raw = section.get(key, [])
        names = raw if isinstance(raw, list) else [raw]
        for index, name in enumerate(names):
            if str(name) not in KNOWN:
                raise check.error(names if isinstance(raw, list) else section, index if isinstance(raw, list) else key,
                                  f"tighten.{key}", f"{name!r} is not a directive",
                                  _closest_hint(str(name), list(KNOWN)) or "e.g. PrivateNetwork")
        lists[key] = tuple(str(n) for n in names)
    return lists["keep"], lists["never"]


def _parse_max_exposure(check: _Checker, doc: _Mapping) -> float:
    value = doc["max_exposure"]
    # systemd-analyze security prints exposure with one decimal, from 0.0 (PERFECT) to 10.0 (DANGEROUS).
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 10:
        raise check.error(doc, "max_exposure", "max_exposure", f"expected a number from 0.0 to 10.0, got {value!r}",
                          "the overall exposure level of systemd-analyze security, e.g. 2.0")
    if abs(value * 10 - round(value * 10)) > 1e-9:  # 0.3 * 10 is 3.0000000000000004 in binary floating point
        raise check.error(doc, "max_exposure", "max_exposure", f"{value!r} has more than one decimal",
                          "systemd-analyze security scores in steps of 0.1, e.g. 2.5")
    return float(value)


def _parse_service(check: _Checker, section: _Mapping) -> ServiceConfig:
    check.known_keys(section, SERVICE_KEYS, "service.")
    if "unit" in section or "unit_file" in section:
        return _parse_unit_service(check, section)
    if "instance" in section:
        raise check.error(section, "instance", "service.instance", "only a template unit has instances",
                          "e.g. unit_file: foo@.service with instance: main")
    if "exec_start" not in section:
        raise check.error(section, None, "service.exec_start", "missing",
                          "the command that starts the service, e.g. /usr/bin/python3 /opt/app/server.py")
    argv = _argv(check, section, "exec_start", "service.exec_start")
    if not argv:
        raise check.error(section, "exec_start", "service.exec_start", "is empty")
    if not argv[0].startswith("/"):
        raise check.error(section, "exec_start", "service.exec_start", f"{argv[0]!r} is not an absolute path",
                          f"systemd needs the full path, e.g. /usr/bin/{argv[0]}")
    check.absolute_path(section, "exec_start", "service.exec_start", argv[0], "program path")
    service_type = check.string(section, "type", "service.type") if "type" in section else "exec"
    if service_type not in SERVICE_TYPES:
        raise check.error(section, "type", "service.type", f"{service_type!r} is not a service type",
                          _closest_hint(service_type, SERVICE_TYPES) or f"one of {', '.join(SERVICE_TYPES)}")
    ready = _parse_ready(check, section)
    environment: tuple[tuple[str, str], ...] = ()
    if "environment" in section:
        env = check.mapping(section["environment"], section, "environment", "service.environment")
        environment = tuple((name, _environment_value(check, env, name, f"service.environment.{name}"))
                            for name in env)
    workdir = None
    if "working_directory" in section:
        workdir = check.string(section, "working_directory", "service.working_directory")
        if workdir != "~":  # systemd's WorkingDirectory= takes ~ for the user's home
            check.absolute_path(section, "working_directory", "service.working_directory", workdir.removeprefix("-"),
                                "directory")
    start_timeout = check.number(section, "start_timeout", "service.start_timeout") if "start_timeout" in section \
        else 30.0
    return ServiceConfig(tuple(argv), service_type, ready, environment, workdir, start_timeout)


def _argv(check: _Checker, mapping: _Mapping, key: str, dotted: str) -> list[str]:
    """A command as a list of words, or a string split like a shell would (without running one)."""
    raw = mapping[key]
    if isinstance(raw, list):
        for index, word in enumerate(raw):
            if isinstance(word, (dict, list, bool)) or word is None:
                what = "null" if word is None else "a boolean" if isinstance(word, bool) else \
                    "a mapping" if isinstance(word, dict) else "a list"
                raise check.error(raw, index, f"{dotted}[{index}]", f"expected a word (text or a number), got {what}",
                                  "write one flat list of words; quote words YAML would read otherwise")
        return [str(getattr(word, "source", word)) for word in raw]
    try:
        return shlex.split(check.string(mapping, key, dotted))
    except ValueError as exc:  # "No closing quotation": the command would not run at all
        raise check.error(mapping, key, dotted, f"cannot be split into words: {str(exc).lower()}",
                          "balance the quotes, or write the command as a list of words") from None


def _environment_value(check: _Checker, env: _Mapping, name: Any, dotted: str) -> str:
    """One environment variable, checked as systemd checks them (env_name_is_valid, env_value_is_valid)."""
    if not ENV_NAME_RE.match(str(name)):
        raise check.error(env, name, dotted, f"{name!r} is not an environment variable name",
                          "letters, digits and _, not starting with a digit, e.g. APP_MODE")
    value = env[name]
    if value is None:
        raise check.error(env, name, dotted, "has no value", "write '' for an empty value")
    text = check.string(env, name, dotted)
    if "\t" in text:
        raise check.error(env, name, dotted, "contains a tab", "systemd refuses control characters in an "
                                                               "environment value; use spaces")
    return text


def _parse_unit_service(check: _Checker, section: _Mapping) -> ServiceConfig:
    """``unit: NAME.service`` (installed by a package) or ``unit_file: path`` (beside the spec): an existing unit,
    so the fields that would describe a transient one are refused rather than silently ignored."""
    if "unit" in section and "unit_file" in section:
        raise check.error(section, "unit_file", "service.unit_file", "cannot be given with unit",
                          "unit: a unit a package installs; unit_file: a unit file beside the spec")
    key = "unit" if "unit" in section else "unit_file"
    for other in TRANSIENT_ONLY_KEYS:
        if other in section:
            raise check.error(section, other, f"service.{other}", f"cannot be given with {key}",
                              "the unit file says it; change the unit, or a drop-in's setting under hardening:")
    value = check.string(section, key, f"service.{key}")
    name = Path(value).name
    if not UNIT_NAME_RE.match(name):
        raise check.error(section, key, f"service.{key}", f"{name!r} is not a service unit name",
                          "e.g. redis-server.service, or foo@.service with instance:")
    unit_file = None
    if key == "unit_file":
        unit_file = (check.path.parent / value).resolve()
        if not unit_file.is_file():
            raise check.error(section, key, "service.unit_file", f"{value!r} does not exist",
                              f"paths are relative to the spec's directory ({check.path.parent})")
    template = name.endswith("@.service")
    instance = check.string(section, "instance", "service.instance") if "instance" in section else ""
    if template and not instance:
        raise check.error(section, key, f"service.{key}", f"{name} is a template",
                          "say which instance to start, e.g. instance: main")
    if instance and not template:
        raise check.error(section, "instance", "service.instance", f"{name} is not a template",
                          "only a unit named foo@.service has instances")
    if instance and not re.match(r"^[A-Za-z0-9:_.\\-]+$", instance):
        raise check.error(section, "instance", "service.instance", f"{instance!r} is not a unit instance name",
                          "letters, digits, and : _ . \\ -; systemd-escape makes one of any string")
    ready = _parse_ready(check, section)
    start_timeout = check.number(section, "start_timeout", "service.start_timeout") if "start_timeout" in section \
        else 30.0
    return ServiceConfig((), "", ready, (), None, start_timeout, unit=name if key == "unit" else "",
                         unit_file=unit_file, instance=instance, line=_line_of(section, key))


def _parse_ready(check: _Checker, section: _Mapping) -> Readiness:
    if "ready" not in section:
        return Readiness("active")
    value = section["ready"]
    if value == "active":
        return Readiness("active")
    ready = check.mapping(value, section, "ready", "service.ready")
    kinds = [k for k in ready if k != "timeout"]
    if len(kinds) != 1 or kinds[0] not in READY_KINDS:
        raise check.error(section, "ready", "service.ready", f"expected one of {', '.join(READY_KINDS)}",
                          "e.g. {tcp: 8080}, {unix: /run/app.sock}, {file: /run/app/ready} or active")
    kind = kinds[0]
    if kind == "active":
        raise check.error(ready, kind, "service.ready.active", "is a word, not a key", "write ready: active")
    raw = ready[kind]
    target = str(raw)
    if kind == "tcp" and (isinstance(raw, bool) or not re.fullmatch(r"[0-9]{1,5}", target)
                          or not 0 < int(target) < 65536):
        raise check.error(ready, kind, "service.ready.tcp", f"{target!r} is not a TCP port", "a number 1-65535")
    if kind in ("unix", "file"):
        target = check.string(ready, kind, f"service.ready.{kind}")
        if not target.startswith("/"):
            raise check.error(ready, kind, f"service.ready.{kind}", f"{target!r} is not an absolute path")
        check.absolute_path(ready, kind, f"service.ready.{kind}", target)
        if kind == "unix" and len(target.encode()) > 107:  # sun_path holds 108 bytes with the NUL
            raise check.error(ready, kind, "service.ready.unix", "is longer than a unix socket path can be "
                              "(107 bytes)", "use a shorter path, e.g. /run/app/app.sock")
    timeout = check.number(ready, "timeout", "service.ready.timeout") if "timeout" in ready else 30.0
    return Readiness(kind, target, timeout)


def unit_name(label: str) -> str:
    """The transient unit a spec's service runs as: harden-<label>.service, with characters systemd does not
    take in a unit name replaced by -."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "service"
    return f"harden-{slug}.service"


def project_root(start: Path) -> Path | None:
    """The nearest directory from ``start`` up that holds a pytest configuration file, as pytest finds its
    rootdir; None if there is none."""
    for directory in (start, *start.parents):
        if any((directory / marker).is_file() for marker in PROJECT_MARKERS):
            return directory
    return None


def _parse_machine(check: _Checker, section: _Mapping, releases: tuple[str, ...]) -> MachineConfig:
    check.known_keys(section, MACHINE_KEYS, "machine.")
    packages: list[str] = []
    if "packages" in section:
        raw = section["packages"]
        if not isinstance(raw, list):
            raise check.error(section, "packages", "machine.packages", "expected a list of Debian package names",
                              "e.g. [gnupg, curl]")
        for index, package in enumerate(raw):
            if not isinstance(package, str) or not PACKAGE_NAME_RE.match(package):
                raise check.error(raw, index, f"machine.packages[{index}]", f"{package!r} is not a Debian package name",
                                  "lowercase letters, digits, +, - and ., e.g. gnupg")
            packages.append(package)
    outside = False
    if "files_outside_project" in section:
        outside = section["files_outside_project"]
        if not isinstance(outside, bool):
            raise check.error(section, "files_outside_project", "machine.files_outside_project",
                              f"expected true or false, got {outside!r}")
    files: list[tuple[str, str]] = []
    if "files" in section:
        mapping = check.mapping(section["files"], section, "files", "machine.files")
        spec_dir = check.path.parent
        root = check.root or project_root(spec_dir)
        allowed = [spec_dir, *([root] if root else [])]
        destinations: set[str] = set()
        for dest in mapping:
            dotted = f"machine.files.{dest}"
            if not isinstance(dest, str) or not dest.startswith("/"):
                raise check.error(mapping, dest, dotted, "the path on the machine must be absolute", "e.g. /opt/app")
            check.absolute_path(mapping, dest, dotted, dest)
            if dest == "/" or ":" in dest:
                raise check.error(mapping, dest, dotted, "cannot be bound there", "not / itself, and no : in the "
                                  "path (it separates source and destination on nspawn's command line)")
            if dest.rstrip("/") in destinations:
                raise check.error(mapping, dest, dotted, "is bound twice", "one source per path on the machine")
            destinations.add(dest.rstrip("/"))
            src = check.string(mapping, dest, dotted, empty=False)
            host = (spec_dir / src).resolve()
            if not host.exists():
                raise check.error(mapping, dest, dotted, f"{src!r} does not exist",
                                  f"paths are relative to the spec's directory ({spec_dir})")
            if not outside and not any(host == base or host.is_relative_to(base) for base in allowed):
                where = f"the spec's directory ({spec_dir})" + (f" or the project ({root})" if root and
                                                                 root != spec_dir else "")
                raise check.error(mapping, dest, dotted, f"{src!r} is {host}, outside {where}",
                                  "a spec may bind only its own project's files; move them into the project, or set "
                                  "machine.files_outside_project: true to bind this path anyway")
            if ":" in str(host):
                raise check.error(mapping, dest, dotted, f"{host} contains a :",
                                  "nspawn's --bind-ro= separates source and destination with :; rename the path")
            files.append((dest, str(host)))
    backend = check.string(section, "backend", "machine.backend") if "backend" in section else AUTO
    if backend not in (*BACKEND_NAMES, AUTO):
        raise check.error(section, "backend", "machine.backend", f"unknown backend {backend!r}",
                          _closest_hint(backend, [*BACKEND_NAMES, AUTO])
                          or f"one of {', '.join([*BACKEND_NAMES, AUTO])}")
    privileged = section.get("privileged", False)
    if not isinstance(privileged, bool):
        raise check.error(section, "privileged", "machine.privileged", f"expected true or false, got {privileged!r}",
                          "true runs an nspawn container without a user namespace: its root is root on the host")
    return MachineConfig(tuple(sorted(set(packages))), tuple(sorted(files)), backend, privileged=privileged,
                         release=releases[0] if len(releases) == 1 else "", debs=_parse_debs(check, section),
                         services=_parse_services(check, section))


def _parse_services(check: _Checker, section: _Mapping) -> tuple[str, ...]:
    """machine.services: the units a package enables at boot that keep running (every other one is masked)."""
    if "services" not in section:
        return ()
    raw = section["services"]
    if not isinstance(raw, list):
        raise check.error(section, "services", "machine.services", "expected a list of unit names",
                          "the package daemons the service needs running, e.g. [dnsmasq.service]")
    for index, unit in enumerate(raw):
        if not isinstance(unit, str) or not BOOT_UNIT_RE.match(unit):
            raise check.error(raw, index, f"machine.services[{index}]", f"{unit!r} is not a unit name",
                              "a unit a package enables at boot, with its suffix, e.g. dnsmasq.service")
    return tuple(sorted(set(raw)))


def _parse_releases(check: _Checker, section: _Mapping) -> tuple[str, ...]:
    """``machine.release``: one Debian release or a list of them, pinned (the spec runs once on each); () for the
    session's (--harden-release, else releases.DEFAULT_RELEASE)."""
    if "release" not in section:
        return ()
    raw = section["release"]
    names = raw if isinstance(raw, list) else [check.string(section, "release", "machine.release")]
    if not names:
        raise check.error(section, "release", "machine.release", "is an empty list",
                          f"a release or a list of them: {', '.join(RELEASES)}")
    for index, release in enumerate(names):
        where, key = (raw, index) if isinstance(raw, list) else (section, "release")
        dotted = f"machine.release[{index}]" if isinstance(raw, list) else "machine.release"
        if not isinstance(release, str) or release not in RELEASES:
            raise check.error(where, key, dotted, f"unknown Debian release {release!r}",
                              _closest_hint(str(release), list(RELEASES)) or f"one of {', '.join(RELEASES)}")
    return tuple(dict.fromkeys(names))


def _parse_debs(check: _Checker, section: _Mapping) -> tuple[str, ...]:
    """Local .deb files (paths or globs, relative to the spec), as absolute paths, each found now."""
    if "debs" not in section:
        return ()
    raw = section["debs"]
    if not isinstance(raw, list) or not raw:
        raise check.error(section, "debs", "machine.debs", "expected a list of .deb files",
                          "paths or globs relative to the spec, e.g. [../build/*.deb]")
    found: list[str] = []
    for index, entry in enumerate(raw):
        dotted = f"machine.debs[{index}]"
        if not isinstance(entry, str) or not entry.endswith(".deb"):
            raise check.error(raw, index, dotted, f"{entry!r} is not a .deb file", "e.g. ../build/foo_1.1_amd64.deb")
        matches = sorted(str(p.resolve()) for p in check.path.parent.glob(entry)) if glob.has_magic(entry) \
            else [str((check.path.parent / entry).resolve())]
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            raise check.error(raw, index, dotted, f"{entry!r} matches no file",
                              f"paths are relative to the spec's directory ({check.path.parent}); build the package "
                              "first")
        found.extend(matches)
    return tuple(dict.fromkeys(found))


def _parse_profile(check: _Checker, doc: _Mapping) -> profiles.Profile | None:
    if "profile" not in doc:
        return None
    try:
        return profiles.lookup(check.string(doc, "profile", "profile"))
    except profiles.ProfileError as exc:
        raise check.error(doc, "profile", "profile", exc.problem, exc.hint) from None


DENY_HINT = "a list of one-key entries, e.g. - write: /etc/passwd, - syscall: mount, - connect: 127.0.0.1:53"


def _parse_denials(check: _Checker, section: Any, doc: _Mapping) -> tuple[Denial, ...]:
    """``deny:``: actions the sandbox must deny, each probed in it (see docs/probes.md)."""
    if section is None:
        return ()
    if not isinstance(section, list):
        raise check.error(doc, "deny", "deny", "expected a list of denials", DENY_HINT)
    denials = []
    for index, item in enumerate(section):
        dotted = f"deny[{index}]"
        entry = check.mapping(item, section, index, dotted)
        if len(entry) != 1:
            raise check.error(section, index, dotted, "each entry names exactly one action", DENY_HINT)
        ((kind, value),) = entry.items()
        for one in value if isinstance(value, list) else [value]:  # - syscall: [mount, reboot]
            try:
                denials.append(parse_denial(str(kind), one, _line_of(entry, kind)))
            except DenialError as exc:
                raise check.error(entry, kind, f"{dotted}.{kind}", exc.problem, exc.hint) from None
    return tuple(denials)


def _parse_enforcement(check: _Checker, doc: _Mapping, hardening: Sequence[Directive]) -> EnforcementSettings:
    """``enforcement: false`` switches the enforcement items off; ``{skip: [Directive, ...]}`` drops some."""
    if "enforcement" not in doc:
        return EnforcementSettings()
    value = doc["enforcement"]
    if isinstance(value, bool):
        return EnforcementSettings(enabled=value)
    if not isinstance(value, dict):
        raise check.error(doc, "enforcement", "enforcement", f"expected true, false or a mapping, got {value!r}",
                          "e.g. enforcement: {skip: [MemoryMax, TasksMax]}")
    section = check.mapping(value, doc, "enforcement", "enforcement")
    check.known_keys(section, ("skip",), "enforcement.")
    raw = section.get("skip", [])
    names = raw if isinstance(raw, list) else [raw]
    declared = [d.name for d in hardening]
    for index, name in enumerate(names):
        if str(name) not in declared:
            raise check.error(raw if isinstance(raw, list) else section, index if isinstance(raw, list) else "skip",
                              f"enforcement.skip[{index}]", f"{name!r} is not a directive of this spec's hardening",
                              _closest_hint(str(name), declared) or f"one of {', '.join(declared) or '(none)'}")
    return EnforcementSettings(True, tuple(str(name) for name in names))


def _parse_hardening(check: _Checker, section: Any, doc: _Mapping,
                     profile: profiles.Profile | None = None) -> tuple[Directive, ...]:
    """The spec's directives, on top of its profile's: one of the spec's replaces the profile's of the same
    name, and ``Name: null`` drops the profile's."""
    hardening = check.mapping(section, doc, "hardening", "hardening") if section is not None else _as_mapping({})
    directives = []
    dropped = set()
    for name, value in hardening.items():
        try:
            if value is None and profile is not None:
                dropped.add(profiles.drop(profile, str(name)))
                continue
            directives.append(Directive.parse(str(name), value, _line_of(hardening, name)))
        except (DirectiveError, profiles.ProfileError) as exc:
            raise check.error(hardening, name, f"hardening.{name}", exc.problem, exc.hint) from None
    if profile is None:
        return tuple(directives)
    inherited = [d for d in profile.directives(_line_of(doc, "profile")) if d.name not in dropped]
    return profiles.merge(inherited, directives)


def _parse_scenarios(check: _Checker, section: Any, doc: _Mapping) -> tuple[Scenario, ...]:
    if section is None:
        return ()
    if not isinstance(section, list):
        raise check.error(doc, "scenarios", "scenarios", "expected a list of scenarios",
                          "each item: {name: ..., client: COMMAND} or {name: ..., inside: COMMAND}")
    scenarios = []
    names: set[str] = set()
    for index, item in enumerate(section):
        dotted = f"scenarios[{index}]"
        entry = check.mapping(item, section, index, dotted)
        check.known_keys(entry, SCENARIO_KEYS, f"{dotted}.")
        if "name" not in entry:
            raise check.error(section, index, f"{dotted}.name", "missing", "give every scenario a name")
        name = check.string(entry, "name", f"{dotted}.name", empty=False)
        if name in names:
            raise check.error(entry, "name", f"{dotted}.name", f"another scenario is already named {name!r}",
                              "scenario names must be unique: they name the tests")
        names.add(name)
        places = [k for k in ("client", "inside") if k in entry]
        if len(places) != 1:
            raise check.error(section, index, dotted, "needs exactly one of client: or inside:",
                              "client runs on the machine as a client of the service; inside runs in its sandbox")
        where = places[0]
        raw_command = entry[where]
        command: str | tuple[str, ...]
        if isinstance(raw_command, list):
            command = tuple(_argv(check, entry, where, f"{dotted}.{where}"))  # argv: no shell, so signals are the
            if not command or not command[0]:                                # command's own
                raise check.error(entry, where, f"{dotted}.{where}", "is empty", "a command, e.g. [/bin/true]")
        else:
            command = check.string(entry, where, f"{dotted}.{where}", empty=False)
        expect = _parse_expect(check, entry, dotted)
        timeout = check.number(entry, "timeout", f"{dotted}.timeout") if "timeout" in entry else 60.0
        scenarios.append(Scenario(name, command, where, expect, timeout, _line_of(section, index)))
    return tuple(scenarios)


def _parse_expect(check: _Checker, entry: _Mapping, dotted: str) -> Expectation:
    if "expect" not in entry:
        return Expectation()
    expect = check.mapping(entry["expect"], entry, "expect", f"{dotted}.expect")
    check.known_keys(expect, EXPECT_KEYS, f"{dotted}.expect.")
    exit_status: int | None = 0
    signal_name = None
    if "signal" in expect:
        signal_name = check.string(expect, "signal", f"{dotted}.expect.signal").upper()
        if not signal_name.startswith("SIG"):
            signal_name = "SIG" + signal_name

        if not hasattr(signal_module.Signals, signal_name):
            raise check.error(expect, "signal", f"{dotted}.expect.signal", f"{signal_name} is not a signal",
                              "e.g. SIGSYS (seccomp), SIGKILL")
        exit_status = None
    if "exit" in expect and "signal" in expect:
        raise check.error(expect, "exit", f"{dotted}.expect.exit", "cannot be given with signal",
                          "a command killed by a signal has no exit status")
    if "exit" in expect:
        value = expect["exit"]
        if value in ("any", None):
            exit_status = None
        elif isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
            raise check.error(expect, "exit", f"{dotted}.expect.exit", f"{value!r} is not an exit status",
                              "0-255, or any")
        else:
            exit_status = value
    stdout = check.string(expect, "stdout", f"{dotted}.expect.stdout") if "stdout" in expect else None
    stderr = check.string(expect, "stderr", f"{dotted}.expect.stderr") if "stderr" in expect else None
    return Expectation(exit_status, signal_name, stdout, stderr)
