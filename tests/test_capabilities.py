"""What a machine enforces is measured on it: here, an nspawn container on this host."""

from __future__ import annotations

from pytest_systemd_harden import cgroups
from pytest_systemd_harden.backends.base import Machine
from pytest_systemd_harden.capabilities import machine_capabilities
from pytest_systemd_harden.enforcement import ENFORCED, NOT_ENFORCED
from pytest_systemd_harden.probes.runner import machine_facts


def test_a_container_here_enforces_namespaces_seccomp_and_bpf_firewalls_but_not_what_it_lacks(
        machine: Machine) -> None:
    capabilities = machine_capabilities(machine)
    status = {name: c.status for name, c in capabilities.by_name.items()}
    for name in ("SystemCallFilter", "ProtectSystem", "PrivateNetwork"):
        assert status[name] == ENFORCED, capabilities.by_name[name]
    if machine_facts(machine).user_namespaced:  # the default: BPF firewalls need a privileged container
        assert status["IPAddressDeny"] == NOT_ENFORCED
        assert "machine: {privileged: true}" in capabilities.by_name["IPAddressDeny"].why
    else:
        assert status["IPAddressDeny"] == ENFORCED, capabilities.by_name["IPAddressDeny"]
    if any(tree.name == "unified" for tree in cgroups.hierarchies()):  # hybrid: memory and pids are cgroup v1
        for name in ("MemoryMax", "TasksMax"):
            assert status[name] == NOT_ENFORCED, capabilities.by_name[name]
            assert "hybrid cgroups" in capabilities.by_name[name].why
        assert "allocated and touched 128 MiB" in capabilities.by_name["MemoryMax"].evidence
    if machine_facts(machine).lacks("BPF_FRAMEWORK"):
        assert status["SocketBindDeny"] == NOT_ENFORCED
        assert "BPF_FRAMEWORK" in capabilities.unenforced()["SocketBindDeny"]
    assert set(capabilities.unenforced()) == {name for name, s in status.items() if s == NOT_ENFORCED}
    assert machine_capabilities(machine) is capabilities  # measured once per machine


def test_the_boot_line_names_only_what_was_seen() -> None:
    from pytest_systemd_harden.capabilities import Capabilities, Capability
    from pytest_systemd_harden.enforcement import UNVERIFIABLE

    def measured(*statuses: tuple[str, str]) -> Capabilities:
        return Capabilities("qemu", {name: Capability(f"{name}=x", name, status, "seen") for name, status in statuses})

    assert measured(("MemoryMax", ENFORCED), ("SocketBindDeny", NOT_ENFORCED)).summary() == \
        "enforces MemoryMax=; does NOT enforce SocketBindDeny="  # no "cannot tell here -" on a VM
    assert measured(("ProtectKernelModules", UNVERIFIABLE)).summary() == "cannot tell here ProtectKernelModules="
    assert measured().summary() == "nothing measured"
