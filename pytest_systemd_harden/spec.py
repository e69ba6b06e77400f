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

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from dbus_next.signature import Variant

from . import profiles
from .backends.base import AUTO, MachineConfig
from .directives import KNOWN, Directive, DirectiveError, Property, _closest_hint, render_dropin
from .errors import SpecError
from .probes.catalogue import Denial, DenialError, parse_denial

SERVICE_TYPES = ("simple", "exec", "notify", "oneshot", "forking")
READY_KINDS = ("tcp", "unix", "file", "active")
PACKAGE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")


# --- YAML with line numbers ---------------------------------------------------------------------------------

class _Mapping(dict[Any, Any]):
    """A YAML mapping that remembers the line of each key (1-based)."""

    line: int
    key_lines: dict[Any, int]


class _Sequence(list[Any]):
    line: int
    item_lines: list[int]


class _LineLoader(yaml.SafeLoader):
    def __init__(self, stream: str) -> None:
        super().__init__(stream)
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
            if key in mapping:
                raise SpecError(self.name, key_node.start_mark.line + 1, self._dotted(key), "duplicate key",
                                "YAML would silently keep only the last one")
            mapping[key] = self._construct_at(str(key), value_node)
            mapping.key_lines[key] = key_node.start_mark.line + 1
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


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    value = SourceInt(loader.construct_yaml_int(node))
    value.source = str(node.value)
    return value


_LineLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
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
    exec_start: tuple[str, ...]
    # exec, not simple: the start job then fails when systemd cannot set up the sandbox or exec the program
    # (217/USER, 203/EXEC, 226/NAMESPACE), instead of "starting" a service that never ran.
    type: str = "exec"
    ready: Readiness = Readiness("active")
    environment: tuple[tuple[str, str], ...] = ()
    working_directory: str | None = None
    start_timeout: float = 30.0

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


# --- loading ------------------------------------------------------------------------------------------------

TOP_KEYS = ("name", "profile", "service", "machine", "hardening", "scenarios", "deny", "enforcement", "max_exposure",
            "tighten")
TIGHTEN_KEYS = ("keep", "never")
SERVICE_KEYS = ("exec_start", "type", "ready", "environment", "working_directory", "start_timeout")
MACHINE_KEYS = ("packages", "files", "backend", "privileged")
SCENARIO_KEYS = ("name", "client", "inside", "expect", "timeout")
EXPECT_KEYS = ("exit", "signal", "stdout", "stderr")


class _Checker:
    """Validation helpers that know the file, so every error carries file and line."""

    def __init__(self, path: Path) -> None:
        self.path = path

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

    def string(self, mapping: _Mapping, key: str, dotted: str) -> str:
        value = mapping[key]
        if isinstance(value, (dict, list)) or value is None:
            raise self.error(mapping, key, dotted, "expected a string")
        return str(value)

    def number(self, mapping: _Mapping, key: str, dotted: str) -> float:
        value = mapping[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise self.error(mapping, key, dotted, f"expected a positive number of seconds, got {value!r}")
        return float(value)


def _as_mapping(value: dict[Any, Any]) -> _Mapping:
    mapping = _Mapping(value)
    mapping.line = 0
    mapping.key_lines = {}
    return mapping


def load_spec(path: str | Path) -> Spec:
    """Load and validate the spec at ``path``; raise SpecError (file:line: key: problem (hint)) if it is wrong."""
    path = Path(path).resolve()
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(str(path), None, "", f"cannot read the spec: {exc.strerror}") from None
    try:
        loader = _LineLoader(text)
        loader.name = str(path)
        try:
            document = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        if isinstance(exc, yaml.MarkedYAMLError):
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark else None
            problem = exc.problem or exc.context
        else:  # e.g. a ReaderError for a control character: it has a position, not a mark
            position = getattr(exc, "position", None)
            line = text.count("\n", 0, position) + 1 if isinstance(position, int) else None
            problem = str(exc).splitlines()[0]
        raise SpecError(str(path), line, "", f"not valid YAML: {problem}",
                        "check indentation and quoting; values starting with @ or ~ need quotes") from None
    return parse_spec(document, path)


def parse_spec(document: Any, path: Path) -> Spec:
    """Validate an already-parsed YAML document (see :func:`load_spec`)."""
    check = _Checker(path)
    if not isinstance(document, dict):
        raise SpecError(str(path), 1, "", "a spec must be a YAML mapping", "start with `service:`")
    doc = check.mapping(document, None, None, "")
    check.known_keys(doc, TOP_KEYS, "")
    if "service" not in doc:
        raise check.error(doc, None, "service", "missing", "every spec needs `service: {exec_start: /path/to/program ...}`")
    service = _parse_service(check, check.mapping(doc["service"], doc, "service", "service"))
    machine = _parse_machine(check, check.mapping(doc.get("machine") or _as_mapping({}), doc, "machine", "machine"))
    profile = _parse_profile(check, doc)
    hardening = _parse_hardening(check, doc.get("hardening"), doc, profile)
    scenarios = _parse_scenarios(check, doc.get("scenarios"), doc)
    denials = _parse_denials(check, doc.get("deny"), doc)
    enforcement = _parse_enforcement(check, doc, hardening)
    name = str(doc["name"]) if "name" in doc else ""
    max_exposure = _parse_max_exposure(check, doc) if "max_exposure" in doc else None
    keep, never = _parse_tighten(check, doc)
    return Spec(path, service, machine, hardening, scenarios, name, denials=denials, enforcement=enforcement,
                profile=profile.name if profile else "",
                max_exposure=max_exposure, tighten_keep=keep, tighten_never=never)


def _parse_tighten(check: _Checker, doc: _Mapping) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``tighten: {keep: [...], never: [...]}``: directive names, each checked against the known directives."""
    if "tighten" not in doc:
        return (), ()
    section = check.mapping(doc["tighten"], doc, "tighten", "tighten")
    check.known_keys(section, TIGHTEN_KEYS, "tighten.")
    lists: dict[str, tuple[str, ...]] = {}
    for key in TIGHTEN_KEYS:
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
    if "exec_start" not in section:
        raise check.error(section, None, "service.exec_start", "missing",
                          "the command that starts the service, e.g. /usr/bin/python3 /opt/app/server.py")
    raw = section["exec_start"]
    argv = [str(a) for a in raw] if isinstance(raw, list) else shlex.split(check.string(section, "exec_start",
                                                                                         "service.exec_start"))
    if not argv:
        raise check.error(section, "exec_start", "service.exec_start", "is empty")
    if not argv[0].startswith("/"):
        raise check.error(section, "exec_start", "service.exec_start", f"{argv[0]!r} is not an absolute path",
                          f"systemd needs the full path, e.g. /usr/bin/{argv[0]}")
    service_type = check.string(section, "type", "service.type") if "type" in section else "exec"
    if service_type not in SERVICE_TYPES:
        raise check.error(section, "type", "service.type", f"{service_type!r} is not a service type",
                          _closest_hint(service_type, SERVICE_TYPES) or f"one of {', '.join(SERVICE_TYPES)}")
    ready = _parse_ready(check, section)
    environment: tuple[tuple[str, str], ...] = ()
    if "environment" in section:
        env = check.mapping(section["environment"], section, "environment", "service.environment")
        environment = tuple((str(k), str(v)) for k, v in env.items())
    workdir = check.string(section, "working_directory", "service.working_directory") \
        if "working_directory" in section else None
    start_timeout = check.number(section, "start_timeout", "service.start_timeout") if "start_timeout" in section \
        else 30.0
    return ServiceConfig(tuple(argv), service_type, ready, environment, workdir, start_timeout)


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
    target = str(ready[kind])
    if kind == "tcp" and not (target.isdigit() and 0 < int(target) < 65536):
        raise check.error(ready, kind, "service.ready.tcp", f"{target!r} is not a TCP port", "a number 1-65535")
    if kind in ("unix", "file") and not target.startswith("/"):
        raise check.error(ready, kind, f"service.ready.{kind}", f"{target!r} is not an absolute path")
    timeout = check.number(ready, "timeout", "service.ready.timeout") if "timeout" in ready else 30.0
    return Readiness(kind, target, timeout)


def _parse_machine(check: _Checker, section: _Mapping) -> MachineConfig:
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
    files: list[tuple[str, str]] = []
    if "files" in section:
        mapping = check.mapping(section["files"], section, "files", "machine.files")
        for dest, src in mapping.items():
            dotted = f"machine.files.{dest}"
            if not str(dest).startswith("/"):
                raise check.error(mapping, dest, dotted, "the path on the machine must be absolute", "e.g. /opt/app")
            host = (check.path.parent / str(src)).resolve()
            if not host.exists():
                raise check.error(mapping, dest, dotted, f"{src!r} does not exist",
                                  f"paths are relative to the spec's directory ({check.path.parent})")
            files.append((str(dest), str(host)))
    backend = check.string(section, "backend", "machine.backend") if "backend" in section else AUTO
    from .backends import BACKENDS

    if backend not in (*BACKENDS, AUTO):
        raise check.error(section, "backend", "machine.backend", f"unknown backend {backend!r}",
                          _closest_hint(backend, [*BACKENDS, AUTO]) or f"one of {', '.join([*BACKENDS, AUTO])}")
    privileged = section.get("privileged", False)
    if not isinstance(privileged, bool):
        raise check.error(section, "privileged", "machine.privileged", f"expected true or false, got {privileged!r}",
                          "true runs an nspawn container without a user namespace: its root is root on the host")
    return MachineConfig(tuple(sorted(set(packages))), tuple(sorted(files)), backend, privileged)


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
        name = check.string(entry, "name", f"{dotted}.name")
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
        if isinstance(raw_command, list) and raw_command and all(isinstance(a, (str, int)) for a in raw_command):
            command = tuple(str(a) for a in raw_command)  # argv: no shell, so signals are the command's own
        else:
            command = check.string(entry, where, f"{dotted}.{where}")
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
        import signal as signal_module

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
    stdout = str(expect["stdout"]) if "stdout" in expect else None
    stderr = str(expect["stderr"]) if "stderr" in expect else None
    return Expectation(exit_status, signal_name, stdout, stderr)
