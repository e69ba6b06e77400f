"""The layout shows the pipeline (issue 18): the package's imports, read with ast, point only down the stages, form
no circle, and none hides inside a function but those of the optional or slow dependencies listed here.

See docs/architecture.md for what each stage does.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

import pytest_systemd_harden

PACKAGE = "pytest_systemd_harden"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# Lowest first: a module may import its own stage's modules and those of earlier stages, never a later one.
# "shared" are the leaf modules every stage uses; "wiring" is what only connects stages to pytest and the CLI.
STAGES = ("shared", "kernel", "probes", "spec", "machine", "sandbox", "unit", "search", "report", "wiring")
STAGE_OF_TOP_MODULE = {"errors": "shared", "result": "shared", "in_tree": "shared", "": "wiring", "plugin": "wiring",
                       "cli": "wiring"}

# Imports inside a function: only of what is optional or measured slow to import, each with its reason.
# (module, imported module) -> why. Never one of the package's own modules: that hides a circle.
FUNCTION_IMPORTS_ALLOWED = {
    # The probe script runs on the machine, started per batch: it imports a module only for the probe that needs it.
    ("probes.inside", "ipaddress"): "probe script start-up",
    ("probes.inside", "pwd"): "probe script start-up",
    ("probes.inside", "threading"): "probe script start-up",
    ("probes.inside", "resource"): "probe script start-up",
    # systemd-harden's subcommands that do not run tests answer without importing pytest.
    ("cli", "pytest"): "CLI start-up",
    # HardenedService works without pytest; assert_denied() skips a test only when it runs under pytest.
    ("unit.service", "pytest"): "usable without pytest",
}


@dataclass(frozen=True)
class Import:
    importer: str  # module, relative to the package ("" for the package itself)
    imported: str  # a module of the package, relative, or an outside module's full name
    line: int
    in_function: bool
    ours: bool


def module_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_of(path): path for path in sorted(ROOT.rglob("*.py"))}


def imports() -> Iterator[Import]:
    known = modules()
    for importer, path in known.items():
        package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inside = {id(inner) for function in functions for inner in ast.walk(function) if inner is not function}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = [part for part in package.split(".") if part]
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join([PACKAGE, *base, *([node.module] if node.module else [])])
                else:
                    module = node.module or ""
                # from pkg.x import submodule: an import of the submodule itself
                targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}"[len(PACKAGE) + 1:] in known
                           else module for alias in node.names]
            else:
                continue
            for target in dict.fromkeys(targets):
                ours = target == PACKAGE or target.startswith(PACKAGE + ".")
                imported = target[len(PACKAGE) + 1:] if ours else target
                yield Import(importer, imported, node.lineno, id(node) in inside, ours)


def stage(module: str) -> str:
    top = module.split(".")[0]
    if top in STAGE_OF_TOP_MODULE and "." not in module:
        return STAGE_OF_TOP_MODULE[top]
    if top in STAGES and (ROOT / top).is_dir():
        return top
    raise AssertionError(f"{PACKAGE}.{module} is in no stage: put it in one of the stage packages {STAGES[1:-1]} "
                         f"(or, if it only wires, beside plugin.py) and list it in tests/test_layout.py")


def test_every_module_is_in_a_stage() -> None:
    problems = []
    for module in modules():
        try:
            stage(module)
        except AssertionError as exc:
            problems.append(str(exc))
    assert not problems, "\n".join(problems)


def test_imports_point_down_the_pipeline() -> None:
    wrong = []
    for edge in imports():
        if not edge.ours:
            continue
        try:
            importer, imported = STAGES.index(stage(edge.importer)), STAGES.index(stage(edge.imported))
        except AssertionError:
            continue  # test_every_module_is_in_a_stage says which
        if imported > importer:
            wrong.append(f"{PACKAGE}.{edge.importer} (stage {STAGES[importer]}), line {edge.line}, imports "
                         f"{PACKAGE}.{edge.imported} of the later stage {STAGES[imported]}: pass what it needs in")
    assert not wrong, "\n".join(wrong)


def knots(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``graph``: its strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in sorted(graph.get(module, ())):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_no_import_circle() -> None:
    graph: dict[str, set[str]] = {}
    for edge in imports():
        # An import of a.b.c runs the package a.b's __init__ too; a package's own __init__ importing its modules
        # is the usual re-export, so only the module imported is followed.
        if edge.ours and edge.imported != edge.importer:
            graph.setdefault(edge.importer, set()).add(edge.imported)
    circles = knots(graph)
    assert not circles, "import circles (type-checking imports count: they are the same knot):\n" + "\n".join(
        " <-> ".join(f"{PACKAGE}.{m}" if m else PACKAGE for m in circle) for circle in circles)


def test_no_import_inside_a_function_but_optional_ones() -> None:
    hidden = [f"{PACKAGE}.{edge.importer}, line {edge.line}: imports "
              f"{PACKAGE + '.' + edge.imported if edge.ours else edge.imported} inside a function"
              for edge in imports()
              if edge.in_function and (edge.ours or (edge.importer, edge.imported) not in FUNCTION_IMPORTS_ALLOWED)]
    assert not hidden, ("\n".join(hidden) + "\nimport at the top of the module; only an optional or measured-slow "
                        "outside module may be imported where it is used (FUNCTION_IMPORTS_ALLOWED)")


def test_knots_are_found() -> None:
    assert knots({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d", "a"}}) == [["a", "b", "c"], ["d", "e"]]
    assert knots({"a": {"b"}, "b": {"c"}}) == []


@pytest.mark.parametrize("name", ["HardenedService", "Spec", "load_spec", "CommandResult", "SpecError"])
def test_public_names_at_the_top(name: str) -> None:
    assert hasattr(pytest_systemd_harden, name), f"pytest_systemd_harden.{name} is public: keep it importable"


def test_entry_points_resolve() -> None:
    project = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["project"]
    targets = [*project["scripts"].values(), *project["entry-points"]["pytest11"].values()]
    for target in targets:
        module, _, attribute = target.partition(":")
        loaded = importlib.import_module(module)
        assert not attribute or hasattr(loaded, attribute), f"pyproject.toml names {target}, which is gone"

