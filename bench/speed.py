"""Benchmark: what a hardening test costs on the default (nspawn) backend, measured side by side in one run.

    sudo .venv/bin/python bench/speed.py [--rounds N] [--vm-rounds N] [--cold-start]

Prints, with absolute medians and ratios against a baseline measured in the same run:
1. time to the first scenario result: cold boot of a container (image and capabilities cached) + service start +
   one command, against the bare container boot plus one `systemd-run` (the floor), and against the same work done
   by hand in a bare container with `systemd-run` (what the plugin itself adds); boots with a warm capability
   cache vs a cold one (measured at boot); beside it, the same on a VM of the same image (the qemu backend: what a
   VM-per-test driver pays);
2. per-command overhead: our inside()/client() (a transient unit over D-Bus from the host) vs
   `systemd-run --wait --pipe` invoked inside the same container;
3. the example suite serially vs with `pytest -n 2`;
4. the resident memory (PSS) of one booted machine;
5. with --cold-start: the example suite on a fresh, empty cache (every image built, every capability measured)
   vs the same suite on the warm cache, serially and with `-n 2` (as ./dev.sh examples runs it);
7. with --fresh-machine: `./dev.sh examples` as on a fresh machine (a clean clone, no virtualenv, pip's cache off,
   an empty image cache), this checkout's HEAD and --baseline (a git ref) alternated, each started once the load
   average is under 0.8 (at most 2 min after a sync: the run before is still writing), plus apt's part timed apart:
   `apt-get update` into empty lists and the download of what the machine's own set-up installed (both in
   temporary directories: nothing of the host's apt state changes), and dpkg's part as the set-up's apt history
   recorded it (the packages are installed here already, and are not installed again).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pytest_systemd_harden.machine.backends.nspawn import NspawnMachine
from pytest_systemd_harden.spec.load import load_spec
from pytest_systemd_harden.spec.machine import MachineConfig
from pytest_systemd_harden.spec.releases import DEFAULT_RELEASE
from pytest_systemd_harden.unit.pool import MachinePool
from pytest_systemd_harden.unit.service import HardenedService

ROOT = Path(__file__).resolve().parent.parent
RELEASES = ("trixie", "bookworm")  # the default release and the one before it (machine.release: [bookworm, trixie])
IMAGE_PACKAGES = ("curl",)  # the package set most examples add
SPEC = """
service:
  exec_start: /usr/bin/python3 -m http.server --bind 127.0.0.1 8080
  ready: {tcp: 8080}
hardening:
  DynamicUser: yes
  ProtectSystem: strict
  PrivateTmp: yes
  SystemCallFilter: ["@system-service"]
  RestrictAddressFamilies: [AF_UNIX, AF_INET, AF_INET6]
"""
# Times N systemd-run invocations from inside the container, where a user of `systemd-run` would run them.
SYSTEMD_RUN_LOOP = r"""
import json, subprocess, sys, time
times = []
properties = [arg for line in json.loads(sys.argv[2]) for arg in ("-p", line)]
for _ in range(int(sys.argv[1])):
    started = time.monotonic()
    subprocess.run(["systemd-run", "--wait", "--pipe", "--quiet", "--collect", *properties, "true"], check=True,
                   stdin=subprocess.DEVNULL)
    times.append(time.monotonic() - started)
print(json.dumps(times))
"""


def median_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:7.1f} ms"


def time_to_first_result(spec_path: Path, rounds: int, backend: str = "nspawn", *, remeasure: bool = False,
                         ) -> tuple[list[float], list[float], list[int], str]:
    first, boots, memory = [], [], []
    described = backend
    for _ in range(rounds):
        pool = MachinePool(remeasure=remeasure)
        try:
            started = time.monotonic()
            machine = pool.machine_for(MachineConfig(backend=backend))
            described = machine.describe()
            booted = time.monotonic()
            service = HardenedService(machine, load_spec(spec_path))
            service.start()
            result = service.client("python3 -c \"import urllib.request as u; u.urlopen('http://127.0.0.1:8080/')\"")
            assert result.ok, result.describe()
            first.append(time.monotonic() - started)
            boots.append(booted - started)
            memory.append(machine.resident_memory() or 0)
        finally:
            pool.close()
    return first, boots, memory, described


def bare_boots(rounds: int) -> list[float]:
    """The container alone: nspawn started and its systemd booted, nothing measured or started on it."""
    times = []
    for _ in range(rounds):
        machine = NspawnMachine(MachineConfig(backend="nspawn", release=DEFAULT_RELEASE))  # as the pool fills it in
        started = time.monotonic()
        machine.boot()
        times.append(time.monotonic() - started)
        machine.shutdown()
    return times


# The first result's work done by hand in a bare container, timed inside it: the service started with
# `systemd-run` under the same sandbox, its port polled with `systemd-run` until it answers, then the scenario's
# command with `systemd-run` (what a shell script would do; nothing of the plugin runs).
BY_HAND = r"""
import json, subprocess, sys, time
sandbox = [arg for line in json.loads(sys.argv[1]) for arg in ("-p", line)]
run = ["systemd-run", "--wait", "--pipe", "--quiet", "--collect"]
started = time.monotonic()
subprocess.run(["systemd-run", "--quiet", "--unit=by-hand", *sandbox, "/usr/bin/python3", "-m", "http.server",
                "--bind", "127.0.0.1", "8080"], check=True)
poll = "import socket; socket.create_connection(('127.0.0.1', 8080), timeout=0.2).close()"
while subprocess.run([*run, "/usr/bin/python3", "-I", "-S", "-c", poll], stdin=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL).returncode != 0:
    time.sleep(0.02)
subprocess.run([*run, "python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/')"],
               check=True, stdin=subprocess.DEVNULL)
print(time.monotonic() - started)
"""


def by_hand(spec_path: Path) -> tuple[float, float]:
    """A bare container boot, then the first result's work by hand inside it (:data:`BY_HAND`): (boot s, work s)."""
    sandbox = [line for d in load_spec(spec_path).hardening for line in d.unit_lines()]
    machine = NspawnMachine(MachineConfig(backend="nspawn", release=DEFAULT_RELEASE))
    started = time.monotonic()
    machine.boot()
    booted = time.monotonic() - started
    try:
        done = machine.run(["/usr/bin/python3", "-c", BY_HAND, json.dumps(sandbox)], timeout=120)
        assert done.ok, done.describe()
        return booted, float(done.stdout)
    finally:
        machine.shutdown()


def command_overhead(spec_path: Path, rounds: int) -> tuple[list[float], list[float], list[float], list[float]]:
    pool = MachinePool()
    try:
        machine = pool.machine_for(MachineConfig())
        service = HardenedService(machine, load_spec(spec_path))
        service.start()
        # Each in a loop of its own, as systemd-run's are timed: alternated, a client() paid for the teardown of
        # the inside() unit before it (its sandbox: dynamic user, mount namespace), which systemd does after
        # reporting that unit done, and inside() looked that much cheaper.
        ours_client, ours_inside = [], []
        for _ in range(rounds):
            started = time.monotonic()
            assert service.client("true").ok
            ours_client.append(time.monotonic() - started)
        for _ in range(rounds):
            started = time.monotonic()
            assert service.inside("true").ok
            ours_inside.append(time.monotonic() - started)
        def systemd_run(lines: list[str]) -> list[float]:
            loop = machine.run(["/usr/bin/python3", "-c", SYSTEMD_RUN_LOOP, str(rounds), json.dumps(lines)],
                               timeout=300)
            assert loop.ok, loop.describe()
            times: list[float] = json.loads(loop.stdout)
            return times

        sandbox = [line for d in service.spec.hardening for line in d.unit_lines()]  # as systemd-run -p takes them
        return ours_client, ours_inside, systemd_run([]), systemd_run(sandbox)
    finally:
        pool.close()


def example_suite(workers: int | None, cache_dir: Path | None = None) -> float:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--harden-require-backend",
               str(ROOT / "examples")]
    if workers:
        command += ["-n", str(workers)]
    env = {**os.environ, "HARDEN_CACHE_DIR": str(cache_dir)} if cache_dir else None
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"example suite failed ({' '.join(command)}):\n{done.stdout[-3000:]}")
    return elapsed


def settle(below: float = 0.8, longest: float = 120.0) -> None:
    """Wait until the one-minute load average is under ``below`` (at most ``longest`` seconds), after ``sync``: a
    fresh run's writes (2 GB of images, then their removal) go on after it ends and slowed the next by up to 25 s."""
    subprocess.run(["sync"], check=False)
    waited = 0.0
    while os.getloadavg()[0] >= below and waited < longest:
        time.sleep(5)
        waited += 5


def fresh_machine(ref: str) -> tuple[float, float]:
    """``./dev.sh examples -q`` in a clean clone of ``ref``: no virtualenv, pip's cache off, an empty image cache.
    (wall seconds, of which pytest's own session)."""
    scratch = Path(tempfile.mkdtemp(prefix="harden-bench-fresh-", dir="/var/tmp"))
    try:
        repo = scratch / "repo"
        subprocess.run(["git", "clone", "-q", "--no-checkout", str(ROOT), str(repo)], check=True)
        subprocess.run(["git", "-C", str(repo), "checkout", "-q", ref], check=True)
        env = {**os.environ, "HARDEN_CACHE_DIR": str(scratch / "cache"), "PIP_NO_CACHE_DIR": "1"}
        started = time.monotonic()
        done = subprocess.run(["./dev.sh", "examples", "-q"], cwd=repo, env=env, capture_output=True, text=True,
                              check=False)
        elapsed = time.monotonic() - started
        if done.returncode != 0:
            raise SystemExit(f"./dev.sh examples failed on {ref}:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
        session = re.findall(r" in ([0-9.]+)s", done.stdout)
        return elapsed, float(session[-1]) if session else elapsed
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def apt_part() -> tuple[float, float, float | None, list[str]]:
    """What a fresh machine's apt does for ``./dev.sh examples``, on this one where it is done already: (update s,
    download s, dpkg s as the set-up recorded it or None, the packages). The packages and dpkg's time come from
    the last apt history entry that installed systemd-container and mmdebstrap; update and download go to
    temporary lists and archives."""
    packages, dpkg = ["systemd-container", "mmdebstrap"], None
    history = Path("/var/log/apt/history.log")
    entries = history.read_text().split("\n\n") if history.exists() else []
    for entry in reversed(entries):
        fields = dict(line.split(": ", 1) for line in entry.strip().splitlines() if ": " in line)
        if "systemd-container" in fields.get("Commandline", "") and "mmdebstrap" in fields.get("Commandline", ""):
            changed = ", ".join(filter(None, [fields.get("Install", ""), fields.get("Upgrade", "")]))
            packages = [name.split(":")[0] for name in re.findall(r"(?:^|, )([^ ,(]+) \(", changed)] or packages
            start, end = (time.mktime(time.strptime(fields[key], "%Y-%m-%d  %H:%M:%S"))
                          for key in ("Start-Date", "End-Date"))
            dpkg = end - start
            break
    scratch = Path(tempfile.mkdtemp(prefix="harden-bench-apt-", dir="/var/tmp"))
    try:
        for sub in ("lists/partial", "archives/partial", "cache"):
            (scratch / sub).mkdir(parents=True)
        private = ["-o", f"Dir::State::Lists={scratch / 'lists'}", "-o", f"Dir::Cache::Archives={scratch / 'archives'}",
                   "-o", f"Dir::Cache={scratch / 'cache'}", "-o", "Debug::NoLocking=1", "-q"]
        started = time.monotonic()
        subprocess.run(["apt-get", *private, "update"], check=True, capture_output=True)
        updated = time.monotonic()
        subprocess.run(["apt-get", *private, "install", "-y", "--reinstall", "--download-only",
                        "--no-install-recommends", *packages], check=True, capture_output=True)
        return updated - started, time.monotonic() - updated, dpkg, packages
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="repetitions of the boot measurement (default 5)")
    parser.add_argument("--commands", type=int, default=30, help="commands per overhead measurement (default 30)")
    parser.add_argument("--suite-rounds", type=int, default=2,
                        help="runs of the example suite each way (default 2; 0: skip)")
    parser.add_argument("--vm-rounds", type=int, default=2, help="repetitions of the VM boot (default 2; 0: skip)")
    parser.add_argument("--image-rounds", type=int, default=1,
                        help=f"package-set builds each way on {' and '.join(RELEASES)} (default 1; 0: skip)")
    parser.add_argument("--cold-start", action="store_true",
                        help="also run the example suite on a fresh cache (builds every image: minutes)")
    parser.add_argument("--fresh-machine", action="store_true",
                        help="also time ./dev.sh examples on a fresh clone, virtualenv and cache, HEAD vs --baseline "
                             "(minutes each), and apt's part")
    parser.add_argument("--baseline", default="main", help="the git ref --fresh-machine compares HEAD with")
    parser.add_argument("--fresh-rounds", type=int, default=1, help="--fresh-machine runs each way (default 1)")
    parser.add_argument("--fresh-only", action="store_true", help="--fresh-machine alone, nothing else measured")
    args = parser.parse_args()
    if args.fresh_only:
        args.fresh_machine = True
        print_fresh_machine(args)
        return 0
    spec_path = Path(tempfile.mkdtemp(prefix="harden-bench-")) / "harden.yaml"
    atexit.register(shutil.rmtree, spec_path.parent, ignore_errors=True)
    spec_path.write_text(SPEC)
    MachinePool().machine_for(MachineConfig()).shutdown()  # warm: the image is built and cached before timing
    if args.vm_rounds:
        MachinePool().machine_for(MachineConfig(backend="qemu")).shutdown()  # and the VM's disk, and KVM's verdict

    first, boots, memory, cold_first, cold_boots, bare = [], [], [], [], [], []
    by_hand_first: list[float] = []
    for _ in range(args.rounds):  # interleaved, so drift in the machine's speed hits all three alike
        warm = time_to_first_result(spec_path, 1)
        first += warm[0]
        boots += warm[1]
        memory += warm[2]
        cold = time_to_first_result(spec_path, 1, remeasure=True)
        cold_first += cold[0]
        cold_boots += cold[1]
        bare += bare_boots(1)
        hand_boot, hand_work = by_hand(spec_path)
        by_hand_first.append(hand_boot + hand_work)
    vm_first, vm_boots, vm_memory, vm_described = (time_to_first_result(spec_path, args.vm_rounds, "qemu")
                                                   if args.vm_rounds else ([], [], [], ""))
    client, inside, systemd_run, systemd_run_sandboxed = command_overhead(spec_path, args.commands)
    serial, parallel = [], []
    for _ in range(args.suite_rounds):  # alternate, so drift in the machine's speed hits both alike
        serial.append(example_suite(None))
        parallel.append(example_suite(2))
    cold_suite: dict[int | None, float] = {}
    for workers in (None, 2) if args.cold_start else ():  # serial, and as ./dev.sh examples runs it
        fresh = Path(tempfile.mkdtemp(prefix="harden-bench-cache-", dir="/var/tmp"))
        try:
            cold_suite[workers] = example_suite(workers, fresh)
        finally:
            shutil.rmtree(fresh, ignore_errors=True)

    release_images: dict[str, list[tuple[float, float, bool, int]]] = {}
    if args.image_rounds:
        from images import full_and_on_base  # bench/images.py

        scratch = Path(tempfile.mkdtemp(prefix="harden-bench-images-", dir="/var/tmp"))
        try:
            for _ in range(args.image_rounds):
                for release in RELEASES:
                    release_images.setdefault(release, []).append(full_and_on_base(IMAGE_PACKAGES, release, scratch))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    print(f"pytest-systemd-harden speed, nspawn backend, {args.rounds} boots, {args.commands} commands, "
          f"{args.suite_rounds} example-suite runs each way (medians)")
    floor = statistics.median(bare) + statistics.median(systemd_run)
    print(f"1. first scenario result (boot+start+command): {median_ms(first)}   of which boot: {median_ms(boots)}"
          "   (capabilities cached)")
    print(f"   bare container boot + one systemd-run:       {floor * 1000:7.1f} ms   "
          f"ratio first result/that: {statistics.median(first) / floor:.2f}")
    print(f"   the same work by hand (bare boot, then the service, a port poll and the command, each with "
          f"systemd-run): {median_ms(by_hand_first).strip()}   ratio first result/that: "
          f"{statistics.median(first) / statistics.median(by_hand_first):.2f}")
    print(f"   boot, capabilities measured (cold cache):    {median_ms(cold_boots)}   "
          f"ratio warm/cold boot: {statistics.median(boots) / statistics.median(cold_boots):.2f}   "
          f"(first result: {median_ms(cold_first).strip()})")
    if vm_first:
        print(f"   the same on a VM of that image:              {median_ms(vm_first)}   of which boot: "
              f"{median_ms(vm_boots)}   ratio VM/nspawn: {statistics.median(vm_first) / statistics.median(first):.1f}"
              f"   ({vm_described}; {args.vm_rounds} boots)")
    print(f"2. client() (transient unit over D-Bus):        {median_ms(client)}")
    print(f"   systemd-run --wait --pipe inside:            {median_ms(systemd_run)}   "
          f"ratio client()/systemd-run: {statistics.median(client) / statistics.median(systemd_run):.2f}")
    print(f"   inside() (the service's sandbox):            {median_ms(inside)}")
    print(f"   systemd-run --wait --pipe -p <same sandbox>: {median_ms(systemd_run_sandboxed)}   "
          f"ratio inside()/systemd-run: {statistics.median(inside) / statistics.median(systemd_run_sandboxed):.2f}")
    if serial:
        print(f"3. example suite serial:                       {statistics.median(serial):7.1f} s")
        print(f"   example suite -n 2:                         {statistics.median(parallel):7.1f} s   "
              f"ratio -n 2/serial: {statistics.median(parallel) / statistics.median(serial):.2f}")
    print(f"4. resident memory of one booted machine (PSS): {statistics.median(memory) / 2**20:6.1f} MiB"
          + (f"   a VM: {statistics.median(vm_memory) / 2**20:6.1f} MiB" if vm_memory else ""))
    if cold_suite:
        print(f"5. example suite on a fresh cache (every image built): {cold_suite[None]:7.1f} s"
              + (f"   ratio fresh/warm (serial): {cold_suite[None] / statistics.median(serial):.1f}" if serial else ""))
        print(f"   the same with -n 2 (./dev.sh examples):      {cold_suite[2]:7.1f} s   "
              f"ratio -n 2/serial: {cold_suite[2] / cold_suite[None]:.2f}")
    for release, builds in release_images.items():
        full = statistics.median(b[0] for b in builds)
        on_base = statistics.median(b[1] for b in builds)
        print(f"6. Debian {release} + {', '.join(IMAGE_PACKAGES)}: full build {full:5.1f} s, on the cached base "
              f"{on_base:5.1f} s   ratio on base/full: {on_base / full:.2f}   same packages: "
              f"{all(b[2] for b in builds)} ({builds[0][3]})")
    if args.fresh_machine:
        print_fresh_machine(args)
    return 0


def pip_beside_apt(ref: str) -> bool:
    """Whether ``ref``'s dev.sh installs the Python packages while apt runs (a background job) or after it."""
    script = subprocess.run(["git", "show", f"{ref}:dev.sh"], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parent.parent).stdout
    return re.search(r'^\s*install_python_packages "\$job" &\s*$', script, re.MULTILINE) is not None


def print_fresh_machine(args: argparse.Namespace) -> None:
    """Section 7: ./dev.sh examples on a fresh clone, HEAD and the baseline alternated, and apt's part."""
    runs: dict[str, list[tuple[float, float]]] = {args.baseline: [], "HEAD": []}
    loads = [os.getloadavg()[0]]
    for _ in range(args.fresh_rounds):  # alternate, so drift in the machine's speed hits both alike
        for ref, times in runs.items():
            settle()
            loads.append(os.getloadavg()[0])
            times.append(fresh_machine(ref))
    update, download, dpkg, packages = apt_part()
    apt = update + download + (dpkg or 0.0)
    print(f"7. a fresh machine, ./dev.sh examples ({args.fresh_rounds} run(s) each, alternated, each started once "
          f"the load average was under 0.8 or 2 min had passed; load at the starts "
          f"{min(loads):.1f}-{max(loads):.1f}):")
    totals = {}
    for ref, times in runs.items():
        wall = statistics.median(t[0] for t in times)
        session = statistics.median(t[1] for t in times)
        setup = wall - session
        # An old dev.sh runs pip after apt; a newer one beside it where python3-venv is there (see dev.sh): as the
        # ref's own dev.sh says.
        beside = pip_beside_apt(ref)
        totals[ref] = (max(apt, setup) if beside else apt + setup) + session
        print(f"   {ref:>10}: {wall:6.1f} s here (virtualenv and pip {setup:5.1f} s, pytest {session:6.1f} s); with "
              f"apt's part {'beside' if beside else 'before'} pip: {totals[ref]:6.1f} s")
    print(f"   apt's part: update {update:.1f} s + download {download:.1f} s + dpkg "
          + (f"{dpkg:.0f} s (the set-up's history)" if dpkg is not None else "not recorded")
          + f" = {apt:.1f} s ({len(packages)} packages: {' '.join(packages)})")
    print(f"   ratio HEAD/{args.baseline}: {totals['HEAD'] / totals[args.baseline]:.2f}   HEAD vs the issue's 164 s: "
          f"{totals['HEAD'] / 164:.2f}")


if __name__ == "__main__":
    sys.exit(main())
