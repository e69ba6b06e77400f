"""Benchmark: the diagnosis finding one culprit among 10, 20 and 30 directives, next to the naive search.

The naive search removes one directive at a time, in spec order, until the scenario passes - what a maintainer
does by hand. Both run against the same booted container in this one run; the culprit sits in the middle of
the spec (the naive search's average case). Prints reruns and wall time for each, and their ratios.

    sudo .venv/bin/python bench/diagnosis.py
"""

from __future__ import annotations

import atexit
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pytest_systemd_harden.search.diagnosis import Hardening
from pytest_systemd_harden.search.scenarios import _trial, diagnose_failure, failure_report, run_scenario
from pytest_systemd_harden.spec.load import load_spec
from pytest_systemd_harden.spec.machine import MachineConfig
from pytest_systemd_harden.unit.pool import MachinePool
from pytest_systemd_harden.unit.service import HardenedService

# Restricting directives that a W+X mmap in Python does not care about.
HARMLESS = [
    "PrivateTmp: yes", "NoNewPrivileges: yes", "LockPersonality: yes", "RestrictRealtime: yes",
    "ProtectHostname: yes", "ProtectKernelModules: yes", "ProtectKernelTunables: yes", "ProtectKernelLogs: yes",
    "ProtectControlGroups: yes", "ProtectClock: yes", "RestrictSUIDSGID: yes", "PrivateDevices: yes",
    "ProtectHome: yes", "ProtectSystem: strict", "RemoveIPC: yes", "PrivateMounts: yes", "PrivateIPC: yes",
    "RestrictNamespaces: yes", "SystemCallArchitectures: native", "UMask: \"0077\"", "LimitCORE: 0",
    "LimitNOFILE: 1024", "LimitNPROC: 512", "LimitMSGQUEUE: 0", "LimitRTPRIO: 0", "LimitRTTIME: 0",
    "ProtectProc: invisible", "KeyringMode: private", "RestrictAddressFamilies: AF_UNIX", "LimitNICE: 0",
]
CULPRIT = "MemoryDenyWriteExecute: yes"
SCENARIO = "python3 -c 'import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ|mmap.PROT_WRITE|mmap.PROT_EXEC)'"


def spec_text(count: int) -> str:
    directives = HARMLESS[:count - 1]
    directives.insert(len(directives) // 2, CULPRIT)
    body = "\n".join(f"  {d}" for d in directives)
    return (f"service:\n  exec_start: /bin/sleep infinity\nhardening:\n{body}\n"
            f"scenarios:\n  - name: jit\n    inside: {SCENARIO}\n")


def naive(service: HardenedService, hardening: Hardening) -> tuple[int, float]:
    """Remove one directive at a time, in spec order, until the scenario passes."""
    trial = _trial(service, service.spec.scenarios[0])
    started, runs = time.monotonic(), 0
    for directive in hardening:
        runs += 1
        if trial(tuple(d for d in hardening if d is not directive)).passed:
            break
    return runs, time.monotonic() - started


def main() -> int:
    pool = MachinePool(progress=lambda line: print(f"  [{line}]", file=sys.stderr))
    workdir = Path(tempfile.mkdtemp(prefix="harden-bench-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    rows = []
    try:
        machine = pool.machine_for(MachineConfig())
        bare = [machine.run("true").duration for _ in range(20)]
        for count in (10, 20, 30):
            path = workdir / f"harden-{count}.yaml"
            path.write_text(spec_text(count))
            spec = load_spec(path)
            service = HardenedService(machine, spec)
            service.start()
            outcome = run_scenario(service, spec.scenarios[0])
            assert not outcome.passed, "the culprit must break the scenario"
            started = time.monotonic()
            diagnosis = diagnose_failure(service, spec.scenarios[0], failure_report(service, outcome), max_runs=200)
            ours = (diagnosis.runs, time.monotonic() - started)
            assert [f.culprit.name for f in diagnosis.findings] == ["MemoryDenyWriteExecute"], diagnosis.render()
            theirs = naive(service, spec.hardening)
            service.stop()
            rows.append((count, ours, theirs))
    finally:
        pool.close()
    print(f"one culprit (MemoryDenyWriteExecute=) among N directives, in the middle of the spec; one container; "
          f"a bare command costs {statistics.median(bare) * 1000:.0f} ms (median of 20)")
    print(f"{'N':>3} | {'ours: reruns':>12} {'wall':>7} | {'naive: reruns':>13} {'wall':>7} | "
          f"{'reruns ratio':>12} {'wall ratio':>10}")
    for count, (our_runs, our_time), (naive_runs, naive_time) in rows:
        print(f"{count:>3} | {our_runs:>12} {our_time:>6.2f}s | {naive_runs:>13} {naive_time:>6.2f}s | "
              f"{our_runs / naive_runs:>12.2f} {our_time / naive_time:>10.2f}")
    print("ours includes the failure rerun, the control run without hardening and the verification of the "
          "suggested relaxation; naive includes none of these.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
