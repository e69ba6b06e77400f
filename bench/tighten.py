"""Benchmark: tighten with observations vs without, and vs a profile-only suggestion from the same observed run.

For each example spec, for each example stripped bare (its configuration only - StateDirectory=,
AmbientCapabilities=, ... - no profile, and only the scenarios that pass so, its features), and for a bare
``python3 -m http.server`` spec that keeps a cache (the one of tests/test_tighten_live.py), in one run on the same
machine:

- tighten without observations, one step per run (the baseline): restarts, wall time, steps that passed at their
  first run, exposure;
- tighten without observations but with the steps tried together, a failing group split in halves: what group
  testing alone buys, without a forecast to keep failing steps out of the group;
- tighten with observations (one traced run first, counted): steps forecast to fit tried together, the others
  last, one at a time; the same figures, and how often the forecast was right;
- profile-only: what a strace-based suggester proposes from that same traced run (every catalogue step the forecast
  does not see conflict, in the form it forecasts), applied without checking - its exposure, and whether the
  scenarios then pass.

Wall times include the enforcement check of the result (the same for all). With ``--rounds N`` each search runs N
times, rotating which goes first, and medians are shown.

    sudo .venv/bin/python bench/tighten.py [--rounds N] [--json PATH] [EXAMPLE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from pytest_systemd_harden.report import exposure
from pytest_systemd_harden.search.diagnosis import RESTRICTING
from pytest_systemd_harden.search.observe import CONFLICT, UNKNOWN
from pytest_systemd_harden.search.scenarios import (
    all_scenarios_trial,
    machine_syscall_groups,
    run_scenario,
    tighten_service,
)
from pytest_systemd_harden.search.tighten import Tightening, profile_only
from pytest_systemd_harden.spec.load import Spec, load_spec
from pytest_systemd_harden.unit.pool import MachinePool
from pytest_systemd_harden.unit.service import HardenedService

ROOT = Path(__file__).resolve().parent.parent
WEB = """
name: web
service:
  exec_start: /usr/bin/python3 -m http.server --bind 127.0.0.1 8090
  ready: {tcp: 8090}
hardening:
  PrivateTmp: yes
scenarios:
  - name: serves
    client: python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8090/')"
  - name: keeps a cache
    inside: sh -c 'mkdir -p /var/lib/web && touch /var/lib/web/entry'
"""


@dataclass
class Search:
    runs: int
    wall: float
    first_time: int
    tried: int
    exposure: str
    forecast_right: tuple[int, int] = (0, 0)
    forecast_wrong: tuple[str, ...] = ()


SEARCHES = ("one at a time", "grouped", "observed")


@dataclass
class Row:
    name: str
    before: str
    searches: dict[str, list[Search]]
    profile_exposure: str
    profile_passes: bool
    profile_only_lines: list[str]
    tightened_lines: list[str]


def bare(spec: Spec, service_for: HardenedService) -> Spec:
    """The spec's configuration only (no restricting directive, no profile), with the scenarios that pass so."""
    configuration = tuple(d for d in spec.hardening if d.name not in RESTRICTING)
    stripped = replace(spec, hardening=configuration, profile="")
    service = HardenedService(service_for.machine, stripped, unit=service_for.unit)
    service.start()
    try:
        features = tuple(s for s in spec.scenarios if run_scenario(service, s).passed)
    finally:
        service.stop()
    return replace(stripped, scenarios=features)


def search(service: HardenedService, spec: Spec, kind: str) -> tuple[Search, Tightening]:
    started = time.monotonic()
    result = tighten_service(service, keep=spec.tighten_keep, never=spec.tighten_never,
                             observations=kind == "observed", together=kind != "one at a time")
    wall = time.monotonic() - started
    if result.note.startswith("the spec as written"):
        raise SystemExit(f"{spec.path}: {result.note}")
    score = exposure.score(service.machine, spec.with_hardening(result.after))
    wrong = tuple(f"{o.step.name} ({o.forecast}, {o.kept})" for o in result.tried
                  if o.forecast and o.forecast != UNKNOWN and (o.forecast != CONFLICT) != o.first_time)
    return Search(result.runs, wall, result.first_time(), len(result.tried), score.describe(),
                  result.forecasts_right(), wrong), result


def measure(name: str, spec: Spec, pool: MachinePool, rounds: int) -> Row:
    service = pool.service_for(spec)
    machine = service.machine
    before = exposure.score(machine, spec).describe()
    searches: dict[str, list[Search]] = {kind: [] for kind in SEARCHES}
    last: Tightening | None = None
    for index in range(rounds):
        for kind in SEARCHES[index % 3:] + SEARCHES[:index % 3]:
            found, result = search(service, spec, kind)
            searches[kind].append(found)
            if kind == "observed":
                last = result
            print(f"  {name}: {kind}: {found.runs} runs, {found.wall:.1f}s, {found.first_time}/{found.tried} "
                  f"first time, {found.exposure}", file=sys.stderr, flush=True)
    assert last is not None and last.observation is not None, f"{name}: the traced run failed: {last and last.note}"
    suggested = profile_only(spec.hardening, last.observation, keep=spec.tighten_keep, never=spec.tighten_never,
                             syscall_groups=machine_syscall_groups(machine)(),
                             scenarios_from_outside=any(s.where == "client" for s in spec.scenarios))
    profile_score = exposure.score(machine, spec.with_hardening(suggested)).describe()
    passes = all_scenarios_trial(service)(suggested).passed
    service.start()
    return Row(name, before, searches, profile_score, passes,
               [line for d in suggested for line in d.unit_lines()],
               [line for d in last.after for line in d.unit_lines()])


def median(values: list[float]) -> float:
    return statistics.median(values)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("examples", nargs="*", metavar="EXAMPLE")
    parser.add_argument("--rounds", type=int, default=1, help="searches per side and spec (default: 1)")
    parser.add_argument("--no-bare", action="store_true", help="only the examples as written")
    parser.add_argument("--json", metavar="PATH", help="write every measurement to PATH")
    args = parser.parse_args(argv)
    names = args.examples or sorted(p.parent.name for p in (ROOT / "examples").glob("*/harden.yaml"))
    pool = MachinePool(progress=lambda line: print(f"  [{line}]", file=sys.stderr, flush=True))
    load_before = os.getloadavg()
    started = time.monotonic()
    rows: list[Row] = []
    try:
        for name in names:
            spec = load_spec(ROOT / "examples" / name / "harden.yaml")
            rows.append(measure(name, spec, pool, args.rounds))
            if not args.no_bare:
                stripped = bare(spec, pool.service_for(spec))
                rows.append(measure(f"{name} (bare)", stripped, pool, args.rounds))
        if not args.examples and not args.no_bare:
            with tempfile.TemporaryDirectory() as directory:
                (Path(directory) / "web.yaml").write_text(WEB)
                rows.append(measure("http.server (bare)", load_spec(Path(directory) / "web.yaml"), pool, args.rounds))
    finally:
        pool.close()
    print(f"tighten with and without observations; {args.rounds} round(s), medians; {os.cpu_count()} cores, "
          f"{platform.release()}, load {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}, "
          f"{time.monotonic() - started:.0f}s in all")
    print(f"{'spec':24} {'runs: one at a time':>19} {'grouped':>8} {'observed':>9} {'ratio':>6}  "
          f"{'wall: one at a time':>19} {'grouped':>8} {'observed':>9} {'ratio':>6}  "
          f"{'first time: one at a time':>25} {'observed':>9} {'forecast right':>14}")
    for row in rows:
        runs = {kind: median([s.runs for s in row.searches[kind]]) for kind in SEARCHES}
        wall = {kind: median([s.wall for s in row.searches[kind]]) for kind in SEARCHES}
        one, seen = row.searches["one at a time"][0], row.searches["observed"][0]
        right, made = seen.forecast_right
        print(f"{row.name:24} {runs['one at a time']:>19g} {runs['grouped']:>8g} {runs['observed']:>9g} "
              f"{runs['observed'] / runs['one at a time']:>6.2f}  {wall['one at a time']:>18.1f}s "
              f"{wall['grouped']:>7.1f}s {wall['observed']:>8.1f}s {wall['observed'] / wall['one at a time']:>6.2f}  "
              f"{f'{one.first_time}/{one.tried}':>25} {f'{seen.first_time}/{seen.tried}':>9} {f'{right}/{made}':>14}")
    print()
    print(f"{'spec':24} {'exposure before':16} {'one at a time':16} {'grouped':16} {'observed':16} "
          f"{'profile-only':16} {'profile-only passes?':>20}")
    for row in rows:
        scores = [row.searches[kind][0].exposure.split(" (")[0] for kind in SEARCHES]
        print(f"{row.name:24} {row.before.split(' (')[0]:16} {scores[0]:16} {scores[1]:16} {scores[2]:16} "
              f"{row.profile_exposure.split(' (')[0]:16} {'yes' if row.profile_passes else 'NO':>20}")
    print()
    print("where the profile-only suggestion and the tightened spec differ, and the forecasts that were wrong")
    for row in rows:
        suggested, tightened = set(row.profile_only_lines), set(row.tightened_lines)
        only_tightened = sorted(tightened - suggested)
        only_suggested = sorted(suggested - tightened)
        wrong = row.searches["observed"][0].forecast_wrong
        if only_tightened or only_suggested or wrong:
            print(f"{row.name:24} tightened only: {'; '.join(only_tightened) or '-'}  |  profile-only only: "
                  f"{'; '.join(only_suggested) or '-'}  |  forecast wrong: {'; '.join(wrong) or '-'}")
    if args.json:
        Path(args.json).write_text(json.dumps([{
            "spec": row.name, "before": row.before,
            "searches": {kind: [vars(s) for s in found] for kind, found in row.searches.items()}, "profile_only": {
                "exposure": row.profile_exposure, "passes": row.profile_passes, "hardening": row.profile_only_lines},
            "tightened": row.tightened_lines} for row in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
