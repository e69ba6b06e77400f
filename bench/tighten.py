"""Benchmark: tighten on every example - runs, wall time and exposure reached - next to a template applied blind.

For each example spec, in one run on the same machine:
- tighten: restarts, wall time, exposure before -> after, and whether the result passes (it must, by construction);
- a profile-only suggestion: the maximum-2026 template applied without running anything (keeping the spec's own
  configuration such as StateDirectory=), as a profile-only tool would propose it - its exposure, and whether the
  example's scenarios then pass.

    sudo .venv/bin/python bench/tighten.py [EXAMPLE ...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pytest_systemd_harden import exposure
from pytest_systemd_harden.diagnosis import RESTRICTING
from pytest_systemd_harden.pool import MachinePool
from pytest_systemd_harden.profiles import lookup
from pytest_systemd_harden.scenarios import all_scenarios_trial, tighten_service
from pytest_systemd_harden.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent


def main(names: list[str]) -> int:
    examples = [ROOT / "examples" / name / "harden.yaml" for name in names] or \
        sorted((ROOT / "examples").glob("*/harden.yaml"))
    pool = MachinePool(progress=lambda line: print(f"  [{line}]", file=sys.stderr, flush=True))
    rows = []
    try:
        for path in examples:
            spec = load_spec(path)
            service = pool.service_for(spec)
            machine = service.machine
            before = exposure.score(machine, spec)
            started = time.monotonic()
            result = tighten_service(service, keep=spec.tighten_keep, never=spec.tighten_never)
            wall = time.monotonic() - started
            after = exposure.score(machine, spec.with_hardening(result.after))
            configuration = tuple(d for d in spec.hardening if d.name not in RESTRICTING)
            template = spec.with_hardening((*lookup("maximum-2026").directives(), *configuration))
            template_score = exposure.score(machine, template)
            template_passes = all_scenarios_trial(service)(template.hardening).passed
            service.start()
            rows.append((path.parent.name, result.runs, wall, before.describe(), after.describe(),
                         template_score.describe(), template_passes,
                         sum(o.kept in ("added", "narrowed") for o in result.outcomes)))
    finally:
        pool.close()
    print("tighten on each example (one machine per example, this run)")
    print(f"{'example':16} {'runs':>5} {'wall':>7}  {'exposure before':22} {'after tighten':22} "
          f"{'maximum-2026 blind':22} {'blind passes?':>13} {'steps kept':>10}")
    for name, runs, wall, before, after, blind, passes, kept in rows:
        print(f"{name:16} {runs:>5} {wall:>6.1f}s  {before[:22]:22} {after[:22]:22} {blind[:22]:22} "
              f"{'yes' if passes else 'NO':>13} {kept:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
