"""What we send over D-Bus means exactly what the drop-in we show the user means.

The same spec is started once as a transient unit (our D-Bus conversion) and once as a unit file with the
rendered drop-in (systemd's own parser); systemd must report the same settings for both.
"""

from __future__ import annotations

from pytest_systemd_harden.machine.backends.base import Machine
from pytest_systemd_harden.spec.directives import render_dropin
from pytest_systemd_harden.unit.service import HardenedService

EVERYTHING = """
service:
  exec_start: /bin/sleep infinity
hardening:
  DynamicUser: yes
  StateDirectory: parity
  ProtectSystem: strict
  ProtectHome: read-only
  PrivateTmp: yes
  PrivateDevices: yes
  ProtectHostname: yes
  ProtectClock: yes
  ProtectKernelTunables: yes
  ProtectKernelModules: yes
  ProtectKernelLogs: yes
  ProtectControlGroups: yes
  ProtectProc: invisible
  ProcSubset: pid
  LockPersonality: yes
  MemoryDenyWriteExecute: yes
  RestrictRealtime: yes
  RestrictSUIDSGID: yes
  RestrictNamespaces: ~user net
  NoNewPrivileges: yes
  CapabilityBoundingSet: CAP_NET_BIND_SERVICE CAP_CHOWN
  AmbientCapabilities: CAP_NET_BIND_SERVICE
  SystemCallFilter: ["@system-service", "~@privileged @resources", "mlock"]
  SystemCallErrorNumber: EACCES
  SystemCallArchitectures: native
  RestrictAddressFamilies: [AF_UNIX, AF_INET6]
  UMask: "0027"
  ReadWritePaths: /var/tmp
  ReadOnlyPaths: /srv
  InaccessiblePaths: -/root/secret
  NoExecPaths: /
  ExecPaths: /usr /bin
  IPAddressDeny: any
  IPAddressAllow: [localhost, 10.1.0.0/16]
  LimitNOFILE: "1024:4096"
  LimitCORE: 0
  MemoryMax: 64M
  TasksMax: 50
  BindReadOnlyPaths: /etc/hostname:/run/host-name
  Environment: {GREETING: hello}
  TimeoutStopSec: 5s
"""

COMPARED = [
    "DynamicUser", "StateDirectory", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
    "ProtectHostname", "ProtectClock", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
    "ProtectControlGroups", "ProtectProc", "ProcSubset", "LockPersonality", "MemoryDenyWriteExecute",
    "RestrictRealtime", "RestrictSUIDSGID", "RestrictNamespaces", "NoNewPrivileges", "CapabilityBoundingSet",
    "AmbientCapabilities", "SystemCallFilter", "SystemCallErrorNumber", "SystemCallArchitectures",
    "RestrictAddressFamilies", "UMask", "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths", "NoExecPaths",
    "ExecPaths", "IPAddressDeny", "IPAddressAllow", "LimitNOFILE", "LimitNOFILESoft", "LimitCORE", "MemoryMax",
    "TasksMax", "BindReadOnlyPaths", "Environment", "TimeoutStopUSec",
]


def show(machine: Machine, unit: str) -> dict[str, str]:
    result = machine.run(["systemctl", "show", "-p", ",".join(COMPARED), unit])
    assert result.ok, result.describe()
    return dict(line.split("=", 1) for line in result.stdout.splitlines())


def test_transient_unit_and_rendered_dropin_have_the_same_settings(machine: Machine, make_spec) -> None:  # type: ignore[no-untyped-def]
    spec = make_spec(EVERYTHING)
    service = HardenedService(machine, spec, unit="harden-parity-transient.service")
    unit_file = "[Unit]\nDescription=parity\n" + render_dropin(spec.hardening) + "ExecStart=/bin/sleep infinity\n"
    write = machine.run(["/bin/sh", "-c",
                         "cat > /run/systemd/system/harden-parity-file.service && systemctl daemon-reload"],
                        stdin=unit_file.encode())
    assert write.ok, write.describe()
    try:
        machine.systemd.start_transient_unit(service.unit, service.service_properties())
        transient, from_file = show(machine, service.unit), show(machine, "harden-parity-file.service")
    finally:
        service.stop()
        machine.run("rm -f /run/systemd/system/harden-parity-file.service && systemctl daemon-reload")
    assert len(transient) == len(COMPARED)
    # systemd keeps prefixes, syscalls and paths in hash sets: the listing order differs between units.
    differences = {key: (transient[key], from_file.get(key)) for key in COMPARED
                   if sorted(transient[key].split()) != sorted(from_file.get(key, "").split())}
    assert differences == {}
