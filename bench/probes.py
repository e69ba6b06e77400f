"""Benchmark: the full probe batch against one bare transient unit (``/bin/true``), side by side in one run.

Each round runs, in turn, on one booted container: a bare transient unit, the whole probe catalogue as one batch
unconfined, the same batch inside a hardened service's sandbox, and a spec's full enforcement verification
(sandbox batch + control batches). Prints the median of each and its ratio to the bare unit.

    sudo .venv/bin/python bench/probes.py [ROUNDS]
"""

from __future__ import annotations

import atexit
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pytest_systemd_harden.machine.probing import on_machine
from pytest_systemd_harden.probes import run_batch, standard_catalogue
from pytest_systemd_harden.spec.load import load_spec
from pytest_systemd_harden.spec.machine import MachineConfig
from pytest_systemd_harden.unit.pool import MachinePool
from pytest_systemd_harden.unit.probe_host import verify_service

SPEC = """
name: bench-probes
service:
  exec_start: /bin/sleep infinity
hardening:
  DynamicUser: yes
  ProtectSystem: strict
  ProtectHome: yes
  PrivateTmp: yes
  PrivateDevices: yes
  PrivateNetwork: yes
  ProtectKernelTunables: yes
  ProtectControlGroups: yes
  RestrictNamespaces: yes
  SystemCallFilter: "@system-service"
  SystemCallArchitectures: native
  RestrictAddressFamilies: [AF_UNIX, AF_INET, AF_INET6]
  MemoryDenyWriteExecute: yes
  LockPersonality: yes
  RestrictSUIDSGID: yes
  CapabilityBoundingSet: ""
  IPAddressDeny: any
  UMask: "0077"
"""


def timed(action: Callable[[], object]) -> float:
    started = time.monotonic()
    action()
    return time.monotonic() - started


def main() -> int:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    pool = MachinePool(progress=lambda line: print(f"  [{line}]", file=sys.stderr))
    workdir = Path(tempfile.mkdtemp(prefix="harden-bench-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    (workdir / "harden.yaml").write_text(SPEC)
    try:
        machine = pool.machine_for(MachineConfig())
        service = pool.service_for(load_spec(workdir / "harden.yaml"))
        catalogue = standard_catalogue()
        unconfined = on_machine(machine, purpose="bench")

        def bare_unit() -> None:
            assert machine.run(["/bin/true"], purpose="bench").ok

        def batch_unconfined() -> None:
            batch = run_batch(unconfined, catalogue, "unconfined")
            assert all(probe in batch.results for probe in catalogue)

        def batch_in_sandbox() -> None:
            batch = service.probe(catalogue)
            assert batch[catalogue[0]].allowed

        def verification() -> None:
            verify_service(service)

        runs: dict[str, Callable[[], None]] = {
            "bare transient unit (/bin/true)": bare_unit,
            f"probe batch, unconfined ({len(catalogue)} probes)": batch_unconfined,
            f"probe batch, in the sandbox ({len(catalogue)} probes)": batch_in_sandbox,
            "enforcement of the spec (sandbox + control runs)": verification,
        }
        for action in runs.values():  # warm up: page cache, python bytecode, dynamic user allocation
            action()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(rounds):
            for name, action in runs.items():  # interleaved, so drift hits every kind alike
                times[name].append(timed(action))
    finally:
        pool.close()
    baseline = statistics.median(times["bare transient unit (/bin/true)"])
    print(f"{rounds} rounds on one container; median wall time, and ratio to one bare transient unit")
    width = max(len(name) for name in times)
    for name, samples in times.items():
        median = statistics.median(samples)
        spread = f"{min(samples) * 1000:6.1f}-{max(samples) * 1000:6.1f} ms"
        print(f"  {name:<{width}}  {median * 1000:7.1f} ms  x{median / baseline:5.1f}   (min-max {spread})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
