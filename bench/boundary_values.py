"""Boundary values the spec loader accepts, started on a real machine: which does systemd refuse?

    sudo .venv/bin/python bench/boundary_values.py [SUBSTRING...]

For each directive value below (and a few service sections), loads a one-directive spec and starts its service on
the default backend, then prints one line: REFUSED (the loader said no), OK (started), FAILED (the service did not
start: often right, e.g. a user the machine lacks; REFUSED also when the check against the machine's
systemd refuses it before the start) or EXC (anything else: a D-Bus error, a traceback - a value that
slipped through the loader; there should be none). Run it after changing spec/directives.py or spec/load.py. The values
found this way (TemporaryFileSystem=, errno in an allow list, 0 timeouts, Personality=, RuntimeDirectory=private,
long names, dots in a dynamic user's name) are files of tests/data/malformed/ now.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import yaml

from pytest_systemd_harden.errors import ServiceFailed, SpecError
from pytest_systemd_harden.spec.load import load_spec
from pytest_systemd_harden.spec.machine import MachineConfig
from pytest_systemd_harden.unit.pool import MachinePool
from pytest_systemd_harden.unit.service import HardenedService

VALUES: dict[str, list[str]] = {
    "User": ["nobody", "0", "4294967294", "a" * 40, "app.x", "über", "1a"],
    "Group": ["nogroup", "0"],
    "WorkingDirectory": ["~", "-/nonexistent", "/"],
    "SyslogIdentifier": ["a b", "%n", "é", "x" * 2000, "a=b"],
    "PAMName": ["login"],
    "ReadWritePaths": ["-/x", "+/x", "-+/x", "/", "/tmp/"],
    "ReadOnlyPaths": ["/tmp//x"],
    "TemporaryFileSystem": ["/var", "/var:ro,size=10M", "/var:", "/var:bogus"],
    "SupplementaryGroups": ["1001", "nogroup", "a.b"],
    "StateDirectory": ["a", "a/b", "a:b", "a/", "x" * 300],
    "RuntimeDirectory": ["app", "private"],
    "PassEnvironment": ["A"],
    "UnsetEnvironment": ["A=1", "A"],
    "SystemCallArchitectures": ["native x86", "x32", "loongarch64", "riscv64", "arm"],
    "SystemCallFilter": ["mlock:EPERM", "@known", "_llseek", "@sandbox", "mlock:4095", "~mlock:EPERM"],
    "SystemCallLog": ["~@mount"],
    "RestrictFileSystems": ["ext4", "@anonymous", "@application", "fuse.sshfs", "~nonexistentfs"],
    "CapabilityBoundingSet": ["CAP_BPF CAP_CHECKPOINT_RESTORE"],
    "AmbientCapabilities": ["~CAP_SYS_ADMIN", "CAP_NET_RAW"],
    "SystemCallErrorNumber": ["4095", "EPERM", "ENOTSUP", "EDEADLOCK", "EWOULDBLOCK", "1"],
    "UMask": ["7777", "0"],
    "StateDirectoryMode": ["0", "7777"],
    "LimitNOFILE": ["0", "infinity", "18446744073709551614", "1:infinity", "1048577"],
    "LimitCPU": ["0", "1"],
    "LimitNICE": ["0", "40"],
    "LimitRTPRIO": ["99", "1000"],
    "LimitCORE": ["1T", "infinity"],
    "LimitNPROC": ["1"],
    "LimitSTACK": ["1"],
    "LimitAS": ["1"],
    "MemoryMax": ["1", "1T"],
    "MemoryLow": ["0"], "MemorySwapMax": ["0"], "MemoryHigh": ["1"], "MemoryMin": ["1T"],
    "TasksMax": ["1", "18446744073709551614"],
    "IPAddressAllow": ["::/0", "any", "1.2.3.4/0"],
    "BindPaths": ["/tmp:/mnt", "-/nonexistent", "/tmp:/mnt:norbind", "/tmp:/mnt:rbind", "/tmp:/proc/x"],
    "BindReadOnlyPaths": ["/etc", "/nonexistent"],
    "DeviceAllow": ["char-pts rw", "/dev/null", "block-loop r", "char-nonexistent", "/dev/nonexistent"],
    "LoadCredential": ["a:/etc/hostname", "a:relname", "a:/nonexistent"],
    "Environment": ["A=%n", "A=", "A=$B"],
    "SocketBindAllow": ["any", "ipv6:udp:53", "65535", "tcp:any"],
    "Nice": ["-20"], "OOMScoreAdjust": ["-1000"],
    "TimeoutStartSec": ["0", "infinity", "1us", "5min5", "0.0001"],
    "RuntimeMaxSec": ["0", "1h"],
    "RestartSec": ["0.5"],
    "Personality": ["x86", "arm64", "ppc"],
    "KillMode": ["none"],
    "RootDirectory": ["/nonexistent", "/"],
    "RootImage": ["/nonexistent.img"],
    "ProtectProc": ["ptraceable"],
    "Delegate": ["yes"],
    "NotifyAccess": ["all"],
    "Restart": ["always"],
    "RemainAfterExit": ["yes"],
}
SERVICES: list[str] = [
    "name: " + "d" * 40 + "\nservice:\n  exec_start: /bin/sleep 30\nhardening:\n  DynamicUser: yes\n",
    "name: " + "d" * 200 + "\nservice:\n  exec_start: /bin/sleep 30\nhardening:\n  DynamicUser: yes\n",
    "name: 'a.b'\nservice:\n  exec_start: /bin/sleep 30\nhardening:\n  DynamicUser: yes\n",
    "name: '1234'\nservice:\n  exec_start: /bin/sleep 30\nhardening:\n  DynamicUser: yes\n",
    "service:\n  exec_start: /bin/sleep 30\n  working_directory: '~'\n",
    "service:\n  exec_start: /bin/sleep 30\n  environment: {A: ''}\n",
    "service:\n  exec_start: [/bin/sleep, '30', '$HOME']\n",
    "name: " + "n" * 300 + "\nservice:\n  exec_start: /bin/sleep 30\n",
    "name: 'ünïcode'\nservice:\n  exec_start: /bin/sleep 30\n",
    "name: '...'\nservice:\n  exec_start: /bin/sleep 30\n",
    "name: '@'\nservice:\n  exec_start: /bin/sleep 30\n",
    "service:\n  exec_start: /bin/sleep 30\n  working_directory: /nonexistent\n",
    "service:\n  exec_start: /bin/sleep 30\n  type: forking\n  start_timeout: 3\n",
    "service:\n  exec_start: /bin/sleep 30\n  ready: {file: /tmp/" + "x" * 300 + "}\n",
    "service:\n  exec_start: /bin/sleep 30\n  ready: {unix: /tmp/x.sock, timeout: 0.001}\n",
    "service:\n  exec_start: '/bin/sleep 30 %n'\n",
    "service:\n  exec_start: /bin/sl%eep 30\n",
]

QUOTE = '"'


def cases() -> list[tuple[str, str]]:
    header = "service:\n  exec_start: /bin/sleep 30\n  start_timeout: 10\nhardening:\n  "
    found = [(f"{name}={value[:40]}", f"{header}{name}: {yaml.safe_dump(value, default_style=QUOTE).strip()}\n")
             for name, values in VALUES.items() for value in values]
    return found + [(f"service#{i}: {text.splitlines()[0][:50]}", text) for i, text in enumerate(SERVICES)]


def main() -> None:
    only = sys.argv[1:]
    pool = MachinePool(progress=lambda line: None)
    counts: dict[str, int] = {}
    try:
        machine = pool.machine_for(MachineConfig())
        with tempfile.TemporaryDirectory() as scratch:
            for index, (label, text) in enumerate(cases()):
                if only and not any(word in label for word in only):
                    continue
                path = Path(scratch) / "harden.yaml"
                path.write_text(text)
                try:
                    spec = load_spec(path)
                except SpecError as exc:
                    outcome, detail = "REFUSED", exc.problem
                else:
                    # A unit name of its own per case: one that systemd refused stays loaded for a while.
                    unit = None if label.startswith("service#") else f"boundary-{index}.service"
                    service = HardenedService(machine, spec, unit=unit)
                    started = time.monotonic()
                    try:
                        service.start()
                        outcome, detail = "OK", ""
                    except ServiceFailed as exc:
                        outcome, detail = "FAILED", str(exc).splitlines()[0]
                    except SpecError as exc:  # refused before the start, by the machine's own systemd version
                        outcome, detail = "REFUSED", f"at start: {exc.problem}"
                    except Exception as exc:  # noqa: BLE001 - what slipped through is what this looks for
                        outcome, detail = "EXC", f"{type(exc).__name__}: {exc}".splitlines()[0]
                    finally:
                        service.stop()
                    detail = f"({time.monotonic() - started:.1f}s) {detail}"
                counts[outcome] = counts.get(outcome, 0) + 1
                print(f"{outcome:<8} {label}: {detail[:160]}", flush=True)
    finally:
        pool.close()
    print(", ".join(f"{count} {outcome}" for outcome, count in sorted(counts.items())))


if __name__ == "__main__":
    main()
