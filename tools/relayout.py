#!/usr/bin/env python3
"""Move pytest_systemd_harden into its pipeline stages (issue 18), reproducibly.

Run from the repository root on a clean git tree::

    .venv/bin/python tools/relayout.py   # any python that can run ruff (python -m ruff), or with ruff on PATH

It (1) turns the package's relative imports absolute, (2) rewrites every reference to a moved module or to a
definition split out of one - imports, ``from pkg import module`` + ``module.name`` uses, dotted strings such as
``mock.patch("pytest_systemd_harden.x.y")`` and docs' ``pytest_systemd_harden/x.py`` paths - in the package, tests,
bench, examples, docs, README and pyproject, (3) ``git mv``'s the files, (4) splits the modules listed in SPLITS by
top-level definition name (ast), each definition with its decorators and the comment lines right above it, (5)
makes the package's imports relative again and (6) runs ``ruff check --fix`` for imports. Definitions not named in
SPLITS stay where they are (the split's source module), so code others added since still has a home; they are
listed in the output, with everything else the script could not place. The hand edits that follow the generated
commit are listed in tools/RELAYOUT.md.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = "pytest_systemd_harden"

# old module (relative to the package) -> new module. A package listed moves with everything under it.
MOVES: dict[str, str] = {
    # kernel: facts about Linux that everything may use
    "kernel": "kernel.seccomp",
    "syscall_numbers": "kernel.syscall_numbers",
    # probes (unmoved): the actions a sandbox is checked with, and the script that tries them
    # spec: what the user asks for
    "spec": "spec.load",
    "directives": "spec.directives",
    "profiles": "spec.profiles",
    # machine: where it runs
    "backends": "machine.backends",
    "images": "machine.images",
    "cgroups": "machine.cgroups",
    "staging": "machine.staging",
    "systemd": "machine.systemd",
    # sandbox: what the hardening must deny, and the verdict
    "enforcement": "sandbox.expectations",
    "capabilities": "sandbox.capabilities",
    # unit: the unit under test on its machine
    "unit": "unit.under_test",
    "service": "unit.service",
    "pool": "unit.pool",
    "testinfra_backend": "unit.testinfra_host",
    # search: observation, diagnosis, tightening
    "scenarios": "search.scenarios",
    "observe": "search.observe",
    "diagnosis": "search.diagnosis",
    "tighten": "search.tighten",
    # report
    "report": "report.formats",
    "exposure": "report.exposure",
    "baseline": "report.baseline",
}

# old module -> {new module: top-level names moved there}. Everything else stays in MOVES[old module].
SPLITS: dict[str, dict[str, list[str]]] = {
    "directives": {
        "kernel.flags": ["CAPABILITIES", "CAPABILITY_BITS", "NAMESPACE_FLAGS"],
    },
    "backends.base": {
        "spec.machine": ["AUTO", "MachineConfig"],
    },
    "images": {
        "spec.releases": ["Release", "RELEASES", "DEFAULT_RELEASE", "parse_releases"],
    },
    "probes.runner": {
        "machine.probing": ["probe_interpreter", "on_machine", "remember_facts", "machine_facts"],
    },
    "enforcement": {
        "sandbox.verdict": [
            "Runs", "CheckOutcome", "judge", "Verdict", "judge_alone", "aggregate", "SYSCALL_DENIERS",
            "KIND_DENIERS", "READ_DENIERS", "deniers", "suggest", "OWN_MOUNTS", "_mounts_at", "suspects_for",
            "unenforceable_reason", "ProbeHost", "EnforcementFailed", "Report", "service_user", "verify",
            "_verdict", "_device_rules_verdict", "merged_verdict",
        ],
        "unit.probe_host": ["ServiceHost", "verify_service", "check_denials"],
    },
}

PACKAGE_DOCS = {
    "kernel": "Facts about Linux every stage may use: capability and namespace tables, syscall numbers, the kernel's\n"
              "seccomp evidence.",
    "spec": "The spec stage: a hardening spec loaded from YAML (spec.load), its directives, profiles, machine section and\n"
            "releases. It knows backends and releases only by name.",
    "machine": "The machine stage: backends that boot a systemd, their images and cgroups, the systemd D-Bus client, and\n"
               "probe batches run on a machine.",
    "sandbox": "The sandbox stage: what each directive must deny (expectations), the verdict on probe results (verdict,\n"
               "pure: results come through a ProbeHost) and what a machine can enforce (capabilities).",
    "unit": "The unit under test: which unit it is (under_test), the running service (service), its sandbox as a\n"
            "ProbeHost (probe_host), and the pool of machines that run services.",
    "search": "The search stage: observing what a service uses, diagnosing a failure, tightening a spec, and the\n"
              "scenario runs they try.",
    "report": "The report stage: terminal/JSON/JUnit/HTML reports, exposure scores, baselines.",
}

SPLIT_DOCS = {
    "kernel.flags": "The kernel's capability and namespace tables, by name.",
    "spec.machine": "A spec's machine section: what a machine must have. Backends are known here only by name.",
    "spec.releases": "The Debian releases a machine may be built from, by name.",
    "machine.probing": "Probe batches run on a machine (unconfined), and what the machine's systemd knows.",
    "sandbox.verdict": "The verdict: probe results judged against a spec's expectations (pure; probe batches come through\n"
                       "a :class:`ProbeHost`).",
    "unit.probe_host": "A running service as the :class:`~pytest_systemd_harden.sandbox.verdict.ProbeHost` of the\n"
                       "verdict, and the checks of a service's sandbox.",
}

REWRITTEN = ("pytest_systemd_harden", "tests", "bench", "examples")
TEXT_FILES = ("docs", "README.md", "pyproject.toml", "dev.sh", "examples")
TEXT_SUFFIXES = (".md", ".toml", ".sh", ".yaml", ".yml", ".txt", ".cfg", ".ini", "")

notes: list[str] = []


def note(text: str) -> None:
    notes.append(text)


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, text=True, capture_output=True)


# --- names ----------------------------------------------------------------------------------------------------

def old_module_of(dotted: str) -> tuple[str, str] | None:
    """(old module, rest) for the longest old module ``dotted`` (``pytest_systemd_harden.x.y...``) starts with."""
    parts = dotted.split(".")
    if parts[0] != PACKAGE:
        return None
    for end in range(len(parts), 1, -1):
        candidate = ".".join(parts[1:end])
        if candidate in OLD_MODULES:
            return candidate, ".".join(parts[end:])
    return None


def new_module(old: str) -> str:
    if old in MOVES:
        return MOVES[old]
    for prefix, target in MOVES.items():
        if old.startswith(prefix + "."):
            return target + old[len(prefix):]
    return old


def split_target(old: str, name: str) -> str | None:
    for target, names in SPLITS.get(old, {}).items():
        if name in names:
            return target
    return None


def where(old: str, name: str) -> str:
    """The new module that defines what ``old.name`` was."""
    return split_target(old, name) or new_module(old)


def rewrite_dotted(dotted: str) -> str:
    found = old_module_of(dotted)
    if found is None:
        return dotted
    old, rest = found
    head, _, _rest = rest.partition(".")
    if head and split_target(old, head):
        return f"{PACKAGE}.{split_target(old, head)}.{rest}"
    return f"{PACKAGE}.{new_module(old)}" + (f".{rest}" if rest else "")


def is_old_module(old: str) -> bool:
    return old in OLD_MODULES


def modules_now() -> set[str]:
    found = set()
    for path in Path(PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts:
            found.add(".".join(parts))
    return found


OLD_MODULES: set[str] = set()


def resolves(dotted: str) -> bool:
    """Whether ``pytest_systemd_harden.x.y`` names a module of the new layout, or a top-level name of one."""
    parts = dotted.split(".")[1:]
    now = modules_now()
    for end in range(len(parts), -1, -1):
        module = ".".join(parts[:end])
        if end and module not in now:
            continue
        if end == len(parts):
            return True
        path = Path(PACKAGE, *parts[:end])
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        tree = ast.parse(path.read_text())
        names = set()
        for node in tree.body:
            names.update(defined_names(node))
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            if isinstance(node, ast.If):
                for inner in node.body:
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        names.update((a.asname or a.name).split(".")[0] for a in inner.names)
        return parts[end] in names
    return False


# --- python sources ----------------------------------------------------------------------------------------

def module_name(path: Path) -> tuple[str, str]:
    """(module, package) of a file under the package."""
    parts = list(path.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    base = package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def offsets(text: str) -> list[int]:
    starts = [0]
    for line in text.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    return starts


def span(starts: list[int], node: ast.AST) -> tuple[int, int]:
    return (starts[node.lineno - 1] + node.col_offset,  # type: ignore[attr-defined]
            starts[node.end_lineno - 1] + node.end_col_offset)  # type: ignore[attr-defined]


def apply(text: str, edits: list[tuple[int, int, str]]) -> str:
    for start, end, replacement in sorted(edits, reverse=True):
        text = text[:start] + replacement + text[end:]
    return text


def import_text(module: str, aliases: list[tuple[str, str | None]]) -> str:
    names = ", ".join(name if asname is None or asname == name else f"{name} as {asname}" for name, asname in aliases)
    return f"from {module} import {names}"


def make_absolute(path: Path) -> None:
    text = path.read_text()
    tree = ast.parse(text)
    _module, package = module_name(path)
    starts = offsets(text)
    edits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            start, end = span(starts, node)
            edits.append((start, end, import_text(absolute(node, package),
                                                  [(a.name, a.asname) for a in node.names])))
    # Sphinx references relative to the module (:func:`~..images.vm_image`) are made absolute too, so the
    # dotted-name rewrite below places them
    for match in ROLE.finditer(text):
        dots, rest = match.group(3), match.group(4)
        base = [part for part in package.split(".") if part]
        base = base[: len(base) - (len(dots) - 1)]
        target = ".".join([*base, rest])
        here = _module[len(PACKAGE) + 1:]
        if rewrite_dotted(target) != target or new_module(here) != here or here in SPLITS:
            edits.append((match.start(2), match.end(4), "~" + target))
    if edits:
        path.write_text(apply(text, edits))


ROLE = re.compile(r"(:(?:mod|func|class|data|meth|attr|exc):`)(~?)(\.+)([A-Za-z_][\w.]*)")


def rewrite_python(path: Path) -> None:
    """Every import of, attribute of and dotted string naming a moved module or split definition, in one pass."""
    text = path.read_text()
    tree = ast.parse(text)
    starts = offsets(text)
    edits: list[tuple[int, int, str]] = []
    covered: list[tuple[int, int]] = []
    aliases: dict[str, str] = {}  # local name -> old module it is (from pkg import module)
    extra_imports: dict[int, set[str]] = defaultdict(set)  # end offset of an import -> statements to add after
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(PACKAGE):
            start, end = span(starts, node)
            covered.append((start, end))
            old = (node.module or "")[len(PACKAGE) + 1:]
            groups: dict[str, list[tuple[str, str | None]]] = defaultdict(list)
            for alias in node.names:
                submodule = f"{old}.{alias.name}" if old else alias.name
                if is_old_module(submodule):  # from pkg(.x) import module
                    target = new_module(submodule)
                    aliases[alias.asname or alias.name] = submodule
                    parent, _, leaf = f"{PACKAGE}.{target}".rpartition(".")
                    groups[parent].append((leaf, alias.asname or alias.name))
                else:
                    target = where(old, alias.name) if old else ""
                    groups[f"{PACKAGE}.{target}" if target else PACKAGE].append((alias.name, alias.asname))
            statements = [import_text(module, names) for module, names in groups.items()]
            indent = " " * node.col_offset
            new = ("\n" + indent).join(statements)
            if new != text[start:end]:
                edits.append((start, end, new))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE + "."):
                    start, end = span(starts, node)
                    covered.append((start, end))
                    found = old_module_of(alias.name)
                    if found and found[0] in SPLITS:
                        note(f"{path}:{node.lineno}: 'import {alias.name}' of a split module: check its uses")
                    edits.append((start, end, text[start:end].replace(alias.name, rewrite_dotted(alias.name))))
    # module.name where module is a split module imported whole and name moved out of it
    import_ends = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                import_ends[alias.asname or alias.name] = (span(starts, node)[1], node.col_offset)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and split_target(aliases[node.value.id], node.attr)):
            target = split_target(aliases[node.value.id], node.attr)
            assert target is not None
            parent, _, leaf = f"{PACKAGE}.{target}".rpartition(".")
            start, end = span(starts, node)
            edits.append((start, end, f"{leaf}.{node.attr}"))
            covered.append((start, end))
            end_of_import, col = import_ends[node.value.id]
            extra_imports[end_of_import].add(" " * col + f"from {parent} import {leaf}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("setattr", "delattr") and len(node.args) >= 2
              and isinstance(node.args[0], ast.Name) and node.args[0].id in aliases
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and split_target(aliases[node.args[0].id], node.args[1].value)):
            note(f"{path}:{node.lineno}: monkeypatch of {node.args[1].value!r} on module {node.args[0].id}: it moved "
                 f"to {split_target(aliases[node.args[0].id], node.args[1].value)}; patch it where it is used")
    for end, statements in extra_imports.items():
        edits.append((end, end, "".join("\n" + s for s in sorted(statements))))
    edits.extend(dotted_edits(text, covered))
    if edits:
        path.write_text(apply(text, edits))


DOTTED = re.compile(rf"\b{PACKAGE}(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
SLASHED = re.compile(rf"\b{PACKAGE}((?:/[A-Za-z_][A-Za-z0-9_]*)+)(\.py|/)")


def dotted_edits(text: str, covered: list[tuple[int, int]] = ()) -> list[tuple[int, int, str]]:  # type: ignore[assignment]
    edits = []
    for match in DOTTED.finditer(text):
        if any(start <= match.start() < end for start, end in covered):
            continue
        new = rewrite_dotted(match.group())
        if new != match.group():
            edits.append((match.start(), match.end(), new))
    for match in SLASHED.finditer(text):
        old = match.group(1).strip("/").replace("/", ".")
        if old in MOVES or any(old.startswith(p + ".") for p in MOVES):
            new = new_module(old).replace(".", "/")
            edits.append((match.start(), match.end(), f"{PACKAGE}/{new}{match.group(2)}"))
    return edits


def make_relative(path: Path) -> None:
    text = path.read_text()
    tree = ast.parse(text)
    _module, package = module_name(path)
    starts = offsets(text)
    edits = []
    here = package.split(".")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == PACKAGE:
            target = (node.module or "").split(".")
            common = 0
            while common < min(len(here), len(target)) and here[common] == target[common]:
                common += 1
            dots = "." * (len(here) - common + 1)
            rest = ".".join(target[common:])
            start, end = span(starts, node)
            edits.append((start, end, import_text(dots + rest, [(a.name, a.asname) for a in node.names])))
    if edits:
        path.write_text(apply(text, edits))


def file_names(old: str) -> list[str]:
    """The files, relative to the package, that hold what the module ``old`` held."""
    parts = [new_module(old), *SPLITS.get(old, {})]
    return [part.replace(".", "/") + ".py" for part in parts]


def rewrite_file_names(path: Path) -> None:
    """A module that lists the package's source files by name (capabilities hashes the code of its measurement)
    lists them in the new layout, from the package's root."""
    text = path.read_text()
    tree = ast.parse(text)
    starts = offsets(text)
    edits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(".py"):
            old = node.value[:-3].replace("/", ".")
            if old in OLD_MODULES and (old in MOVES or old in SPLITS or any(old.startswith(m + ".") for m in MOVES)):
                start, end = span(starts, node)
                edits.append((start, end, ", ".join(f'"{name}"' for name in file_names(old))))
    if not edits:
        return
    depth = len(path.relative_to(PACKAGE).parts) - 1
    if depth:
        note(f"{path}: source file names rewritten from the package's root: check its base directory")
        text_new = apply(text, edits).replace("Path(__file__).parent\n", f"Path(__file__).parents[{depth}]\n")
    else:
        text_new = apply(text, edits)
    path.write_text(text_new)
    print(f"file names of moved modules rewritten in {path}")


# --- splits ------------------------------------------------------------------------------------------------

def defined_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def statement_lines(lines: list[str], node: ast.stmt) -> tuple[int, int]:
    """0-based [first, last] lines of a top-level statement with its decorators and the comments right above."""
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
    while first > 0 and lines[first - 1].startswith("#") and not lines[first - 1].startswith("# ---"):
        first -= 1
    return first, (node.end_lineno or node.lineno) - 1


def used_names(source: str) -> set[str]:
    tree = ast.parse(source)
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    # names in string annotations and docstring references do not count; dataclass field types are ast.Names
    return names


def split(old: str) -> None:
    source_path = Path(PACKAGE, *new_module(old).split("."))
    source_path = source_path / "__init__.py" if source_path.is_dir() else source_path.with_suffix(".py")
    text = source_path.read_text()
    lines = text.splitlines(keepends=True)
    tree = ast.parse(text)
    import_lines: list[str] = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)) or (
                isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)):
            import_lines.append("".join(lines[node.lineno - 1:node.end_lineno]))
    owner: dict[int, str] = {}  # line -> split target
    defined_in: dict[str, str] = {}  # name -> part (split target or the source module)
    source_module = new_module(old)
    for node in tree.body:
        for name in defined_names(node):
            defined_in[name] = source_module
    parts: dict[str, list[str]] = defaultdict(list)
    for target, names in SPLITS[old].items():
        for name in names:
            node_for = next((n for n in tree.body if name in defined_names(n)), None)
            if node_for is None:
                note(f"{old}: {name} is not defined there any more: not moved to {target}")
                continue
            first, last = statement_lines(lines, node_for)
            if any(line in owner for line in range(first, last + 1)):
                continue
            for line in range(first, last + 1):
                owner[line] = target
            for defined in defined_names(node_for):
                defined_in[defined] = target
            parts[target].append("".join(lines[first:last + 1]))
    remaining = "".join(line for index, line in enumerate(lines) if index not in owner)
    remaining = re.sub(r"\n{4,}", "\n\n\n", remaining)
    staying = sorted(name for name, part in defined_in.items() if part == source_module and not name.startswith("__"))
    print(f"split {old}: {', '.join(f'{len(v)} definitions to {k}' for k, v in parts.items())}; "
          f"{len(staying)} stay in {source_module} (new definitions not listed in SPLITS stay there too)")
    bodies = {source_module: remaining}
    for target, chunks in parts.items():
        doc = SPLIT_DOCS.get(target, f"Split out of {source_module} by tools/relayout.py.")
        bodies[target] = (f'"""{doc}"""\n\nfrom __future__ import annotations\n\n' + "".join(
            line for line in import_lines if "__future__" not in line) + "\n\n" + "\n\n".join(
            chunk.rstrip("\n") + "\n" for chunk in chunks))
    # each part imports what it uses from the others; a pair that needs each other is a circle to cut by hand
    needs: dict[str, dict[str, set[str]]] = {}
    for part, body in bodies.items():
        own = {name for name, p in defined_in.items() if p == part}
        used = used_names(body) - own
        needs[part] = defaultdict(set)
        for name in used:
            if name in defined_in and defined_in[name] != part:
                needs[part][defined_in[name]].add(name)
    for part, wanted in needs.items():
        for other in wanted:
            if part in needs.get(other, {}):
                note(f"split {old}: {part} and {other} need each other ({', '.join(sorted(wanted[other]))} / "
                     f"{', '.join(sorted(needs[other][part]))}): an import circle to cut by hand")
        statements = "".join(f"from {PACKAGE}.{other} import {', '.join(sorted(names))}\n"
                             for other, names in sorted(wanted.items()))
        body = bodies[part]
        body_tree = ast.parse(body)
        after = max((n.end_lineno or 0) for n in body_tree.body if isinstance(n, (ast.Import, ast.ImportFrom)))
        body_lines = body.splitlines(keepends=True)
        bodies[part] = "".join(body_lines[:after]) + statements + "".join(body_lines[after:])
    for part, body in bodies.items():
        path = Path(PACKAGE, *part.split(".")).with_suffix(".py")
        if part != source_module and path.exists():
            note(f"split {old}: {path} exists; appended")
            body = path.read_text() + "\n\n" + body
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
        run("git", "add", str(path))


# --- main --------------------------------------------------------------------------------------------------

def python_files() -> list[Path]:
    return sorted(p for root in REWRITTEN for p in Path(root).rglob("*.py") if ".venv" not in p.parts)


def text_files() -> list[Path]:
    found = []
    for entry in TEXT_FILES:
        path = Path(entry)
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        found += [p for p in candidates if p.suffix in TEXT_SUFFIXES and p.suffix != ".py"]
    return found


def find_ruff() -> list[str] | None:
    for candidate in ([sys.executable, "-m", "ruff"], ["ruff"], [".venv/bin/ruff"]):
        try:
            if run(*candidate, "--version", check=False).returncode == 0:
                return candidate
        except OSError:
            continue
    return None


def main() -> int:
    if run("git", "status", "--porcelain").stdout.strip():
        print("relayout: the git tree is not clean; commit or stash first", file=sys.stderr)
        return 1
    if not Path(PACKAGE, "__init__.py").exists() or Path(PACKAGE, "sandbox").exists():
        print("relayout: run from the repository root, on a tree not yet relaid out", file=sys.stderr)
        return 1
    ruff = find_ruff()
    if ruff is None:
        print("relayout: no ruff found (python -m ruff, ruff on PATH, .venv/bin/ruff): run it as "
              ".venv/bin/python tools/relayout.py", file=sys.stderr)
        return 1
    OLD_MODULES.update(modules_now())
    for old in MOVES:
        if not is_old_module(old):
            note(f"{old}: no such module any more; nothing moved")
    package_files = sorted(Path(PACKAGE).rglob("*.py"))
    for path in package_files:
        make_absolute(path)
    for path in python_files():
        rewrite_python(path)
    for path in text_files():
        text = path.read_text()
        new = apply(text, dotted_edits(text))
        if new != text:
            path.write_text(new)
    for old, target in MOVES.items():
        source = Path(PACKAGE, *old.split("."))
        source = source if source.is_dir() else source.with_suffix(".py")
        if not source.exists():
            continue
        destination = Path(PACKAGE, *target.split("."))
        destination = destination if source.is_dir() else destination.with_suffix(".py")
        destination.parent.mkdir(parents=True, exist_ok=True)
        run("git", "mv", str(source), str(destination))
        print(f"moved {source} -> {destination}")
    for stage, doc in PACKAGE_DOCS.items():
        init = Path(PACKAGE, stage, "__init__.py")
        if init.parent.is_dir() and not init.exists():
            init.write_text(f'"""{doc}"""\n')
            run("git", "add", str(init))
    for old in SPLITS:
        if is_old_module(old):
            split(old)
        else:
            note(f"{old}: no such module to split")
    for path in sorted(Path(PACKAGE).rglob("*.py")):
        rewrite_file_names(path)
        make_relative(path)
    targets = [root for root in REWRITTEN if Path(root).exists()]
    run(*ruff, "check", "--fix", "--select", "F401,I001", *targets, check=False)
    for path in sorted(Path(PACKAGE).rglob("*.py")):  # a TYPE_CHECKING block ruff emptied
        text = path.read_text()
        new = re.sub(r"\nif TYPE_CHECKING:[^\n]*\n    pass\n", "\n", text)
        if new != text:
            path.write_text(new)
    run(*ruff, "check", "--fix", "--select", "F401,I001", *targets, check=False)
    run("git", "add", "-A", *targets, *[p for p in TEXT_FILES if Path(p).exists()])
    # what is left for a human
    for path in python_files() + text_files():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in DOTTED.finditer(line):
                if not resolves(match.group()):
                    note(f"{path}:{number}: {match.group()} names nothing in the new layout")
    old_files = "|".join(re.escape(old.split(".")[-1]) for old in MOVES)
    mention = re.compile(rf"(?<![\w/.])({old_files})\.py\b")
    for path in text_files() + python_files():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in mention.finditer(line):
                note(f"{path}:{number}: mentions {match.group()} (moved: say where by hand)")
    left = run(*ruff, "check", *targets, check=False)
    if left.returncode:
        note("ruff still reports:\n" + left.stdout[-3000:])
    print("\ncould not place (for a human):" if notes else "\neverything placed")
    for text in notes:
        print("  " + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
