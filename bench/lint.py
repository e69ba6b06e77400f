"""Benchmark: what lint costs on malformed specs, measured against lint of the valid examples in the same run.

    .venv/bin/python bench/lint.py [--rounds N]

Prints medians and ratios against the baseline (loading the examples/*/*.yaml specs):
1. in process: one malformed spec of tests/data/malformed/ vs one example spec;
2. a 3.7 MB spec (generated here, never committed) refused by the size cap vs one example spec;
3. libyaml's C parser vs PyYAML's pure-Python one on the example specs (parsing only: what the loader gained);
4. `systemd-harden lint` as a command over the whole corpus vs over the examples (interpreter start included: this
   is the "within 1 s" a user sees).
No root or machine needed.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from pytest_systemd_harden.errors import SpecError
from pytest_systemd_harden.spec.load import load_spec

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(ROOT.glob("examples/*/*.yaml"))
CORPUS = sorted((ROOT / "tests" / "data" / "malformed").glob("*.yaml"))


def median_seconds(work: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def lint_in_process(paths: list[Path]) -> int:
    errors = 0
    for path in paths:
        try:
            load_spec(path)
        except SpecError:
            errors += 1
    return errors


def lint_command(paths: list[Path]) -> tuple[float, float]:
    """Wall and CPU seconds of one `systemd-harden lint` (CPU too: on a shared machine wall time is mostly waiting)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pytest_systemd_harden.cli", "lint", "-q", *map(str, paths)],
                   capture_output=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    rounds = parser.parse_args().rounds
    assert lint_in_process(EXAMPLES) == 0, "the examples must load"
    assert lint_in_process(CORPUS) == len(CORPUS), "every malformed spec must fail"

    example = median_seconds(lambda: lint_in_process(EXAMPLES), rounds) / len(EXAMPLES)
    malformed = median_seconds(lambda: lint_in_process(CORPUS), rounds) / len(CORPUS)
    print(f"baseline: one example spec loads in {example * 1000:.2f} ms (median of {rounds} rounds, "
          f"{len(EXAMPLES)} specs)")
    print(f"one malformed spec fails in      {malformed * 1000:.2f} ms   ratio x{malformed / example:.2f} "
          f"({len(CORPUS)} specs)")

    with tempfile.TemporaryDirectory() as scratch:
        huge = Path(scratch) / "huge.yaml"
        huge.write_text("service:\n  exec_start: /bin/true\nscenarios:\n" + "".join(
            f"  - name: s{i}\n    client: /bin/true\n" for i in range(110_000)))
        refused = median_seconds(lambda: lint_in_process([huge]), rounds)
        print(f"a {huge.stat().st_size / 1e6:.1f} MB spec is refused in   {refused * 1000:.2f} ms   ratio "
              f"x{refused / example:.2f}  (it took 18 s before the size cap)")

    texts = [path.read_bytes() for path in EXAMPLES]
    python = median_seconds(lambda: [yaml.load(t, Loader=yaml.SafeLoader) for t in texts], rounds) / len(texts)
    if yaml.__with_libyaml__:
        c_parser = median_seconds(lambda: [yaml.load(t, Loader=yaml.CSafeLoader) for t in texts], rounds) / len(texts)
        print(f"parsing one example: PyYAML {python * 1000:.2f} ms, libyaml {c_parser * 1000:.2f} ms   "
              f"ratio x{c_parser / python:.2f}")
    else:
        print(f"parsing one example: PyYAML {python * 1000:.2f} ms (libyaml is not available here)")

    command_rounds = max(3, rounds // 4)
    examples_runs = [lint_command(EXAMPLES) for _ in range(command_rounds)]
    corpus_runs = [lint_command(CORPUS) for _ in range(command_rounds)]
    print(f"`systemd-harden lint` (median of {command_rounds}, interpreter start included):")
    for label, index in (("wall", 0), ("CPU ", 1)):
        examples_cmd = statistics.median(run[index] for run in examples_runs)
        corpus_cmd = statistics.median(run[index] for run in corpus_runs)
        print(f"  {label}: {len(EXAMPLES)} examples {examples_cmd:.2f} s, {len(CORPUS)} malformed {corpus_cmd:.2f} s"
              f"   ratio x{corpus_cmd / examples_cmd:.2f}")


if __name__ == "__main__":
    main()
