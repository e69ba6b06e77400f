"""Capture the strace output that tests/test_observe.py reads: sudo .venv/bin/python tests/data/observe/capture.py

Each spec below (the examples, and two small services) is observed once by scenarios.observe(), exactly as tighten
does it; every trace it reads is saved as NAME/RUN.trace.gz, with the machine's syscall groups beside them.
"""

from __future__ import annotations

import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

from pytest_systemd_harden.search import scenarios
from pytest_systemd_harden.search.observe import Observation, parse_strace
from pytest_systemd_harden.spec.load import load_spec
from pytest_systemd_harden.unit.pool import MachinePool

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent.parent.parent / "examples"

WEB = """
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

# Root, unhardened, doing on purpose what directives forbid; every action harmless and undone.
BEHAVIOURS = r"""
service:
  exec_start: /usr/bin/python3 /opt/behaviours/behaviours.py
  ready: {file: /run/behaviours.ready}
machine:
  files: {/opt/behaviours: behaviours/}
scenarios:
  - name: a cache and the memory statistics
    inside: sh -c 'mkdir -p /var/cache/probe && touch /var/cache/probe/x && cat /proc/meminfo >/dev/null'
  - name: a new network namespace
    inside: unshare -n true
"""

BEHAVIOURS_PY = r'''
import ctypes, mmap, os, socket, time
libc = ctypes.CDLL(None, use_errno=True)
m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)   # MemoryDenyWriteExecute=
os.makedirs("/srv/data", exist_ok=True)
with open("/srv/data/out", "w") as f:                                              # ReadWritePaths=
    f.write("x")
os.chmod("/srv/data/out", 0o4755)                                                  # RestrictSUIDSGID=
os.chown("/srv/data/out", 1, 1)                                                    # CAP_CHOWN
old = libc.personality(0xffffffff)
libc.personality(0x0008)                                                           # LockPersonality= (PER_LINUX32)
libc.personality(old)
os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))                         # RestrictRealtime=
os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
open("/root/.bashrc").read()                                                       # ProtectHome=
open("/proc/cpuinfo").read()                                                       # ProcSubset=pid
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind(("127.0.0.1", 81))                                                          # CAP_NET_BIND_SERVICE
s.listen()
socket.socket(socket.AF_PACKET, socket.SOCK_RAW).close()                           # AF_PACKET, CAP_NET_RAW
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.sendto(b"?", ("::1", 9))                                                         # a peer
open("/run/behaviours.ready", "w").close()
while True:
    time.sleep(60)
'''


def capture(name: str, spec_path: Path, pool: MachinePool) -> None:
    spec = load_spec(spec_path)
    target = HERE / name
    target.mkdir(exist_ok=True)
    for old in target.glob("*.trace.gz"):
        old.unlink()
    runs: dict[str, str] = {}  # trace file -> the run it traced (the service, a start command, a scenario)

    def saving(text: str, run: str = "the service", *, cwd: str = "/") -> Observation:
        file = "service" if run == "the service" else f"scenario-{len(runs)}"
        runs[file] = run
        (target / f"{file}.trace.gz").write_bytes(gzip.compress(text.encode(), mtime=0))
        return parse_strace(text, run, cwd=cwd)

    setattr(scenarios, "parse_strace", saving)  # noqa: B010 - observe() looks it up in its module
    service = pool.service_for(spec)
    observation = scenarios.observe(service)
    service.stop()
    (target / "runs.json").write_text(json.dumps({"runs": runs, "setuid_execs": observation.setuid_execs,
                                                  "failures": observation.failures}, indent=2) + "\n")
    print(f"{name}: {observation.summary()}")


def main() -> int:
    pool = MachinePool(progress=lambda line: print(f"  [{line}]", file=sys.stderr))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "web.yaml").write_text(WEB)
            (Path(tmp) / "behaviours").mkdir()
            (Path(tmp) / "behaviours" / "behaviours.py").write_text(BEHAVIOURS_PY)
            (Path(tmp) / "behaviours.yaml").write_text(BEHAVIOURS)
            specs = {"web": Path(tmp) / "web.yaml", "behaviours": Path(tmp) / "behaviours.yaml"}
            examples = ("gpg-signing", "dns-client", "privileged-port")
            specs |= {name: EXAMPLES / name / "harden.yaml" for name in examples}
            for name, path in specs.items():
                capture(name, path, pool)
            machine = pool.machine_for(load_spec(specs["web"]).machine)
            groups = machine.run(["systemd-analyze", "syscall-filter", "--no-pager"])
            (HERE / "syscall-filter.txt").write_text(re.sub(r"[ \t]+\n", "\n", groups.stdout))
    finally:
        pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
