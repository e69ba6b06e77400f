"""``systemd-harden``: a spec's work outside pytest.

::

    systemd-harden lint SPEC...           validate; errors as file:line: key: problem (hint); exit 1 on any
    systemd-harden dropin SPEC            the hardening as a [Service] drop-in, ready for UNIT.d/
    systemd-harden run-line SPEC          a systemd-run command line that starts the service so hardened
    systemd-harden exposure SPEC          boot the spec's machine and score the unit (systemd-analyze security)
    systemd-harden test SPEC [ARGS...]    run the spec's scenarios: pytest on that one file, ARGS passed on
    systemd-harden cache-key SPEC...      one key for the machine images the specs need (a CI cache key)
    systemd-harden cache list|prune       the cached images; remove the superseded and the unused
    systemd-harden backends [NAME...]     boot each backend and print which directives it enforces here

Exit status: 0 fine, 1 a spec error (or, for ``exposure``, a score above the spec's ``max_exposure``), 2 the
machine could not run (not root, no systemd-nspawn); ``test`` exits with pytest's status.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from .errors import BackendUnavailable, HardenError, ServiceFailed, SpecError
from .machine import backends
from .machine.images import BASE_PACKAGES, ImageCache, cached_images, default_cache_dir, prune
from .report import exposure
from .sandbox.capabilities import Capabilities, machine_capabilities
from .search.diagnosis import yaml_value
from .search.scenarios import diagnosed_failure, tighten_service
from .spec.directives import DropinMismatch
from .spec.load import Spec, load_spec
from .spec.machine import MachineConfig
from .spec.releases import DEFAULT_RELEASE, RELEASES, parse_releases
from .unit.pool import MachinePool
from .unit.service import HardenedService, unit_name_for

if TYPE_CHECKING:
    from .report.exposure import Exposure
    from .search.tighten import Tightening

T = TypeVar("T")


def run_line(spec: Spec, unit: str | None = None) -> str:
    """A ``systemd-run`` command that starts the spec's service under its hardening, as the plugin does."""
    service = spec.service
    argv = ["systemd-run", f"--unit={unit or unit_name_for(spec)}", "-p", f"Type={service.type}"]
    argv += [arg for key, value in service.environment for arg in ("-p", f"Environment={_env_word(key, value)}")]
    if service.working_directory:
        argv += ["-p", f"WorkingDirectory={service.working_directory}"]
    # One -p per unit-file line: systemd-run reads an assignment as a unit file would (an empty one resets).
    argv += [arg for directive in spec.hardening for line in directive.unit_lines() for arg in ("-p", line)]
    return shlex.join([*argv, "--", *service.exec_start])


def _env_word(key: str, value: str) -> str:
    """KEY=VALUE as systemd-run's Environment= reads it back: it splits on whitespace and unquotes."""
    word = f"{key}={value}"
    if not any(c.isspace() or c in "\"'\\" for c in word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _load(path: str) -> Spec | None:
    try:
        return load_spec(path)
    except SpecError as exc:
        print(exc)
        return None


def _lint(args: argparse.Namespace) -> int:
    status = 0
    for path in args.specs:
        spec = _load(path)
        if spec is None:
            status = 1
        elif not args.quiet:
            print(f"{path}: ok ({len(spec.hardening)} directives, {len(spec.scenarios)} scenarios)")
    return status


def _dropin(args: argparse.Namespace) -> int:
    spec = _load(args.spec)
    if spec is None:
        return 1
    try:
        text = spec.dropin()
    except DropinMismatch as exc:  # never print a drop-in that would not mean what was tested
        print(f"{spec.path}: hardening: the drop-in does not read back as the spec's directives: {exc}")
        return 1
    sys.stdout.write(text)
    return 0


def _run_line(args: argparse.Namespace) -> int:
    spec = _load(args.spec)
    if spec is None:
        return 1
    if spec.service.unit_name:
        # systemd-run makes a transient unit from nothing: a unit systemd loads from its file gets the hardening as
        # a drop-in, and no command line reproduces that.
        print(f"systemd-harden run-line: {args.spec}: the spec tests {spec.service.unit_name}, a unit systemd loads "
              f"from its file, not a command (hint: ship the hardening as {spec.service.dropin_path}, printed by "
              f"`systemd-harden dropin {args.spec}`, then `systemctl daemon-reload` and "
              f"`systemctl restart {spec.service.unit_name}`)", file=sys.stderr)
        return 1
    print(run_line(spec, args.unit))
    return 0


def _on_machine(args: argparse.Namespace, command: str, work: Callable[[MachinePool], T]) -> T | None:
    """Run ``work`` with a machine pool that is always shut down; machine trouble is printed, and gives None."""
    pool = MachinePool(image_cache=ImageCache(Path(args.cache_dir) if args.cache_dir else None),
                       progress=lambda line: print(f"[harden] {line}", file=sys.stderr, flush=True),
                       remeasure=getattr(args, "remeasure", False))
    try:
        return work(pool)
    except BackendUnavailable as exc:
        print(f"systemd-harden {command}: cannot boot the machine: {exc}", file=sys.stderr)
    except HardenError as exc:
        print(f"systemd-harden {command}: {exc}", file=sys.stderr)
    finally:
        pool.close()
    return None


def _exposure(args: argparse.Namespace) -> int:
    spec = _load(args.spec)
    if spec is None:
        return 1
    policy = Path(args.security_policy).resolve() if args.security_policy else None
    if policy is not None:
        try:
            exposure.check_policy(policy)
        except ValueError as exc:
            print(f"systemd-harden exposure: --security-policy: {exc}", file=sys.stderr)
            return 1
    found = _on_machine(args, "exposure", lambda pool: exposure.score(pool.machine_for(spec.machine), spec, policy))
    if found is None:
        return 2
    score = found
    over = spec.max_exposure is not None and score.tenths > exposure.tenths_of(spec.max_exposure)
    if args.json:
        print(json.dumps({"spec": str(spec.path), **score.as_dict(args.top), "max_exposure": spec.max_exposure},
                         indent=2))
        return 1 if over else 0
    print(f"{score.unit_name}: exposure {score.describe()}")
    if spec.max_exposure is not None:
        print(f"max_exposure {spec.max_exposure:.1f}: {'EXCEEDED' if over else 'within'}")
    print("the checks that cost the most (exposure, setting, what systemd found):")
    print(score.render_costliest(args.top))
    for warning in score.warnings:
        print(f"systemd-analyze: {warning}")
    return 1 if over else 0


def _test(args: argparse.Namespace) -> int:
    import pytest

    spec = _load(args.spec)
    if spec is None:
        return 1
    # Collect this file whatever its name: the harden_spec_files patterns would skip e.g. web.yaml.
    pattern = shlex.quote(Path(args.spec).name)
    return int(pytest.main([args.spec, "-o", f"harden_spec_files={pattern}", *args.pytest_args]))


def _cache_key(args: argparse.Namespace) -> int:
    specs = [_load(path) for path in args.specs]
    if any(spec is None for spec in specs):
        return 1
    # The image cache is content-addressed (recipe, release, packages, local .debs): the same images, the same key.
    # The archive's state is left out: a restored cache whose archive moved on is refreshed by the run itself.
    releases = parse_releases(args.release)
    keys = sorted({ImageCache.key_for(spec.machine.packages, release, spec.machine.debs)
                   for spec in specs if spec is not None
                   for release in (spec.releases or releases or [DEFAULT_RELEASE])})
    print(hashlib.sha256(" ".join(keys).encode()).hexdigest()[:16])
    return 0


def _cache(args: argparse.Namespace) -> int:
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    if args.action == "prune":
        removed = prune(cache_dir, args.unused_days, progress=print)
        print(f"removed {len(removed)} image(s) from {cache_dir}")
        return 0
    found = cached_images(cache_dir)
    if not found:
        print(f"no image in {cache_dir}")
    for image in found:
        extra = [p for p in image.packages if p not in BASE_PACKAGES] + list(image.debs)
        print(f"{image.key}  {image.release:<9} built {_day(image.built)}  used {_day(image.used)}  "
              f"{image.size() / 2**20:5.0f} MiB  {'superseded  ' if image.superseded else ''}"
              f"{', '.join(extra) or '(base)'}{f'  (a layer over {image.base})' if image.base else ''}")
    return 0


def _day(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d", time.localtime(timestamp))


def _tighten(args: argparse.Namespace) -> int:
    spec = _load(args.spec)
    if spec is None:
        return 1
    # A spec pinned to several releases is tightened on the first and the result run on each other one: the
    # printed hardening must pass everywhere the spec says it ships.
    releases = list(spec.releases) or [DEFAULT_RELEASE]
    first = spec.on_release(releases[0])

    def work(pool: MachinePool) -> tuple[Tightening, Exposure, Exposure, dict[str, str]] | int:
        machine = pool.machine_for(first.machine)
        try:
            service = pool.service_for(first)
        except ServiceFailed as exc:
            print(f"systemd-harden tighten: the spec as written does not start; fix that first:\n{exc}",
                  file=sys.stderr)
            return 1
        before = exposure.score(machine, first)
        tightened = tighten_service(service, keep=(*spec.tighten_keep, *args.keep),
                                    never=(*spec.tighten_never, *args.never), max_runs=args.max_runs,
                                    observations=not args.no_observe)
        elsewhere = {}
        checked = not tightened.note.startswith("the spec as written") and tightened.ships
        for release in releases[1:] if checked else []:
            other = spec.on_release(release).with_hardening(tightened.after)
            elsewhere[release] = diagnosed_failure(HardenedService(pool.machine_for(other.machine), other))
        return tightened, before, exposure.score(machine, first.with_hardening(tightened.after)), elsewhere

    found = _on_machine(args, "tighten", work)
    if found is None:
        return 2
    if isinstance(found, int):
        return found
    result, before, after, elsewhere = found
    print(result.render())
    print(f"exposure: {before.describe()} -> {after.describe()}")
    if result.note.startswith("the spec as written"):
        return 1
    if result.dropin_verified is False:  # what would be printed is not what passed: print nothing to ship
        print("\nsystemd-harden tighten: the tightened drop-in does not pass every scenario (above), so no result "
              "is printed: add the directive it fails on to --never (or tighten: never:) and run it again",
              file=sys.stderr)
        return 1
    if result.dropin_unchecked:  # nor what could not be checked where a host starts
        print("\nsystemd-harden tighten: the tightened drop-in could not be checked on a freshly booted machine "
              f"({result.dropin_unchecked}), so no result is printed", file=sys.stderr)
        return 1
    failing = {release: why for release, why in elsewhere.items() if why}
    for release, why in failing.items():
        print(f"\non Debian {release} the result does NOT pass: {why}")
    if failing:
        print(f"\nsystemd-harden tighten: tightened on Debian {releases[0]}, the spec also ships on "
              f"{', '.join(failing)}, where it fails: add the directive that breaks it to --never "
              "(or tighten: never:), or pin the spec to one release", file=sys.stderr)
        return 1
    print(f"\nhardening: (every scenario passes under it on Debian {', '.join(releases)})")
    for directive in result.after:
        print(f"  {directive.name}: {yaml_value(directive)}")
    print()
    if spec.service.dropin_path:  # the drop-in replaces the spec's own harden.conf for the unit
        print(f"# {spec.service.dropin_path} for {spec.service.unit_name}")
    print(result.dropin(), end="")
    return 0


# The nspawn backend without its user namespace (machine: {privileged: true}), measured as a backend of its own.
PRIVILEGED_NSPAWN = "nspawn-privileged"


def _backends(args: argparse.Namespace) -> int:
    names = args.names or [*sorted(backends.BACKENDS), PRIVILEGED_NSPAWN]
    measured: dict[str, tuple[str, Capabilities]] = {}
    for name in names:
        def measure(pool: MachinePool, name: str = name) -> tuple[str, Capabilities]:
            config = MachineConfig(backend="nspawn", privileged=True, release=args.release) \
                if name == PRIVILEGED_NSPAWN else MachineConfig(backend=name, release=args.release)
            machine = pool.machine_for(config)
            return machine.describe(), machine_capabilities(machine)
        found = _on_machine(args, "backends", measure)
        if found is not None:
            measured[name] = found
    if not measured:
        return 2
    directives = list(dict.fromkeys(d for _, caps in measured.values() for d in caps.by_name))
    if args.markdown:
        print("| directive | " + " | ".join(measured) + " |")
        print("|---|" + "---|" * len(measured))
        for directive in directives:
            cells = []
            for _, caps in measured.values():
                found_cap = caps.by_name.get(directive)
                cells.append("-" if found_cap is None else {"enforced": "yes", "not enforced": "**no**"}.get(
                    found_cap.status, "can't tell"))
            print(f"| {directive}= | " + " | ".join(cells) + " |")
        return 0
    for name, (described, caps) in measured.items():
        print(f"{name}: {described}")
        for capability in caps.by_name.values():
            print(f"  {capability.directive:<34} {capability.status}")
            detail = capability.why or capability.evidence
            if capability.status != "enforced" and detail:
                print(f"      {detail}")
    return 0 if len(measured) == len(names) else 2


def parser() -> argparse.ArgumentParser:
    main_parser = argparse.ArgumentParser(
        prog="systemd-harden", description="Hardening specs outside pytest: lint, render, score and test them.")
    commands = main_parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    lint = commands.add_parser("lint", help="validate specs; print errors as file:line: key: problem (hint)")
    lint.add_argument("specs", nargs="+", metavar="SPEC")
    lint.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    lint.set_defaults(run=_lint)

    dropin = commands.add_parser("dropin", help="print the hardening as a [Service] drop-in")
    dropin.add_argument("spec", metavar="SPEC")
    dropin.set_defaults(run=_dropin)

    line = commands.add_parser("run-line", help="print a systemd-run command that starts the hardened service")
    line.add_argument("spec", metavar="SPEC")
    line.add_argument("--unit", help="unit name (default: harden-NAME.service, as the plugin names it)")
    line.set_defaults(run=_run_line)

    score = commands.add_parser("exposure", help="boot the spec's machine and score the unit with "
                                                 "systemd-analyze security (needs root)")
    score.add_argument("spec", metavar="SPEC")
    score.add_argument("--security-policy", metavar="FILE", help="a systemd-analyze security policy (JSON)")
    score.add_argument("--cache-dir", metavar="DIR", help="image cache (default: $HARDEN_CACHE_DIR or "
                                                          "${XDG_CACHE_HOME:-~/.cache}/pytest-systemd-harden)")
    score.add_argument("--top", type=int, default=8, metavar="N", help="show the N costliest checks (default: 8)")
    score.add_argument("--json", action="store_true", help="print the score as JSON")
    score.set_defaults(run=_exposure)

    test = commands.add_parser("test", help="run the spec's scenarios with pytest (extra arguments go to pytest)")
    test.add_argument("spec", metavar="SPEC")
    test.add_argument("pytest_args", nargs=argparse.REMAINDER, metavar="PYTEST_ARGS")
    test.set_defaults(run=_test)

    tighten = commands.add_parser("tighten", help="find the strictest hardening under which the spec's service "
                                                  "still starts and passes every scenario (needs root)")
    tighten.add_argument("spec", metavar="SPEC")
    tighten.add_argument("--keep", action="append", default=[], metavar="DIRECTIVE",
                         help="never touch this directive (adds to the spec's tighten: keep:)")
    tighten.add_argument("--never", action="append", default=[], metavar="DIRECTIVE",
                         help="never add this directive (adds to the spec's tighten: never:)")
    tighten.add_argument("--max-runs", type=int, default=200, metavar="N", help="at most N service restarts")
    tighten.add_argument("--no-observe", action="store_true",
                         help="skip the first run under strace that orders and pre-narrows the search (slower "
                              "search, same kind of result; for comparison)")
    tighten.add_argument("--cache-dir", metavar="DIR", help="image cache (default: $HARDEN_CACHE_DIR or "
                                                            "${XDG_CACHE_HOME:-~/.cache}/pytest-systemd-harden)")
    tighten.set_defaults(run=_tighten)

    key = commands.add_parser("cache-key", help="print one key for the machine images the specs need (to key a CI "
                                                "cache of HARDEN_CACHE_DIR)")
    key.add_argument("specs", nargs="+", metavar="SPEC")
    key.add_argument("--release", metavar="RELEASE[,RELEASE...]",
                     help="the release(s) the run will use for specs that pin none (as --harden-release)")
    key.set_defaults(run=_cache_key)

    cache = commands.add_parser("cache", help="list the cached machine images, or prune the superseded and unused")
    cache.add_argument("action", choices=("list", "prune"))
    cache.add_argument("--unused-days", type=float, default=30.0, metavar="DAYS",
                       help="prune: also remove images no run has booted for DAYS (default: %(default)s)")
    cache.add_argument("--cache-dir", metavar="DIR", help="image cache (default: $HARDEN_CACHE_DIR or "
                                                          "${XDG_CACHE_HOME:-~/.cache}/pytest-systemd-harden)")
    cache.set_defaults(run=_cache)

    backends = commands.add_parser("backends", help="boot each backend that can run here and print which "
                                                    "directives it enforces, measured (needs root)")
    backends.add_argument("names", nargs="*", metavar="NAME",
                          help=f"nspawn, {PRIVILEGED_NSPAWN}, qemu, host (default: all)")
    backends.add_argument("--markdown", action="store_true", help="print a table (docs/backends.md has one)")
    backends.add_argument("--release", default="", choices=[*RELEASES, ""], metavar="RELEASE",
                          help=f"the Debian release the machines boot (default: {DEFAULT_RELEASE}): what a backend "
                               "enforces depends on its systemd")
    backends.add_argument("--remeasure", action="store_true",
                          help="measure again even if the capability cache has this kernel, image and backend")
    backends.add_argument("--cache-dir", metavar="DIR", help="image cache (default: $HARDEN_CACHE_DIR or "
                                                             "${XDG_CACHE_HOME:-~/.cache}/pytest-systemd-harden)")
    backends.set_defaults(run=_backends)
    return main_parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.run(args))
    except BrokenPipeError:
        # `systemd-harden cache list | head`: the reader left, as it may with any tool; no traceback. Python's own
        # flush of stdout at exit would fail the same way, so stdout goes to /dev/null first (the Python docs' way).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
