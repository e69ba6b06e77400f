"""What a machine enforces is measured on it: here, an nspawn container on this host."""

from __future__ import annotations

from pathlib import Path

from pytest_systemd_harden.machine import cgroups
from pytest_systemd_harden.machine.backends.base import Machine
from pytest_systemd_harden.machine.backends.nspawn import NspawnMachine
from pytest_systemd_harden.machine.images import Image, ImageCache
from pytest_systemd_harden.machine.probing import machine_facts
from pytest_systemd_harden.probes.runner import MachineFacts
from pytest_systemd_harden.sandbox import capabilities as capabilities_module
from pytest_systemd_harden.sandbox.capabilities import Capabilities, Capability, CapabilityCache, machine_capabilities
from pytest_systemd_harden.sandbox.expectations import ENFORCED, NOT_ENFORCED
from pytest_systemd_harden.spec.machine import MachineConfig
from pytest_systemd_harden.unit.pool import MachinePool


def test_a_container_here_enforces_namespaces_seccomp_and_bpf_firewalls_but_not_what_it_lacks(
        machine: Machine) -> None:
    capabilities = machine_capabilities(machine)
    status = {name: c.status for name, c in capabilities.by_name.items()}
    for name in ("SystemCallFilter", "ProtectSystem", "PrivateNetwork"):
        assert status[name] == ENFORCED, capabilities.by_name[name]
    # Privileged, the container's systemd loads its firewall itself; user-namespaced, the test process loads it.
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
    from pytest_systemd_harden.sandbox.expectations import UNVERIFIABLE

    def measured(*statuses: tuple[str, str]) -> Capabilities:
        return Capabilities("qemu", {name: Capability(f"{name}=x", name, status, "seen") for name, status in statuses})

    assert measured(("MemoryMax", ENFORCED), ("SocketBindDeny", NOT_ENFORCED)).summary() == \
        "enforces MemoryMax=; does NOT enforce SocketBindDeny="  # no "cannot tell here -" on a VM
    assert measured(("ProtectKernelModules", UNVERIFIABLE)).summary() == "cannot tell here ProtectKernelModules="
    assert measured().summary() == "nothing measured"


def test_the_cache_gives_back_what_was_stored_and_only_for_its_own_key(tmp_path: Path) -> None:
    cache = CapabilityCache(tmp_path / "capabilities")
    key: dict[str, object] = {"recipe": "1-abc", "kernel": {"release": "6.18"}, "machine": {"image": "k1"}}
    stored = Capabilities("nspawn", {
        "MemoryMax": Capability("MemoryMax=64M", "MemoryMax", NOT_ENFORCED, "touched 128 MiB", "hybrid cgroups"),
        "ProtectSystem": Capability("ProtectSystem=strict", "ProtectSystem", ENFORCED, "/usr read-only")})
    facts = MachineFacts(252, frozenset({"+SECCOMP", "-BPF_FRAMEWORK"}), {"@mount": frozenset({"mount", "umount2"})},
                         frozenset({"mount", "umount2", "read"}))
    assert cache.load(key) is None
    cache.store(key, stored, facts)
    loaded = cache.load(key)
    assert loaded is not None
    found, found_facts = loaded
    assert found == stored and found.how == "cached"
    assert (found_facts, found_facts.syscall_groups, found_facts.known_syscalls) == (
        facts, facts.syscall_groups, facts.known_syscalls)
    assert cache.load({**key, "kernel": {"release": "6.19"}}) is None
    assert [p.name for p in (tmp_path / "capabilities").iterdir()] == [cache.path_for(key).name]  # no temp files left
    read_only = CapabilityCache(Path("/proc/harden-not-writable"))
    read_only.store(key, stored, facts)  # a cache that cannot be written: measured again next time, no error
    assert read_only.load(key) is None
    # A file that does not hold its key (a hash collision, another version's format) is measured again.
    cache.path_for(key).write_text('{"key": {"other": 1}, "backend": "nspawn", "capabilities": []}')
    assert cache.load(key) is None


def _installed(rootfs: Path, systemd: str) -> Path:
    (rootfs / "var/lib/dpkg").mkdir(parents=True)
    (rootfs / "var/lib/dpkg/status").write_text(
        "Package: libsystemd0\nStatus: install ok installed\nVersion: 1\n\n"
        f"Package: systemd\nStatus: install ok installed\nPriority: important\nVersion: {systemd}\n"
        "Description: system and service manager\n systemd is a replacement for sysvinit.\n")
    return rootfs


def test_the_key_follows_the_backend_command_line_image_and_systemd_not_the_machine_name(tmp_path: Path) -> None:
    def identity(cls: type[NspawnMachine] = NspawnMachine, image: str = "k1", systemd: str = "252.39-1~deb12u1",
                 files: tuple[tuple[str, str], ...] = ()) -> dict[str, object]:
        rootfs = _installed(tmp_path / f"{image}-{systemd}-{len(list(tmp_path.iterdir()))}" / "rootfs", systemd)
        machine = cls(MachineConfig(files=files), image_cache=ImageCache(tmp_path))
        machine.image = Image(image, rootfs, ())
        return machine.capability_identity()

    class UserNamespaced(NspawnMachine):
        def command_line(self, rootfs: Path) -> list[str]:
            return [*super().command_line(rootfs), "--private-users=pick"]

    base = identity()
    assert base["systemd"] == "252.39-1~deb12u1"
    assert identity() == base  # another machine (name, rootfs path) of the same setup
    assert identity(files=(("/etc/app.conf", str(tmp_path / "app.conf")),)) == base  # the spec's files are content
    assert identity(UserNamespaced) != base  # any flag of the command line, none listed here
    assert identity(image="k2") != base
    assert identity(systemd="252.40-1~deb12u1") != base


def test_images_of_one_release_share_a_key_unless_what_enforces_differs(tmp_path: Path) -> None:
    def identity(key: str, versions: dict[str, str], settings: str = "", held: tuple[str, ...] = ()) -> object:
        rootfs = _installed(tmp_path / key / "rootfs", versions["systemd"])
        if settings:
            (rootfs / "etc/systemd/system.conf.d").mkdir(parents=True)
            (rootfs / "etc/systemd/system.conf.d/pkg.conf").write_text(settings)
        machine = NspawnMachine(MachineConfig(), image_cache=ImageCache(tmp_path))
        machine.image = Image(key, rootfs, (), "trixie", versions)
        machine.held_at_boot = machine.masked_at_boot = held  # a package unit of the spec, held back at boot
        machine.uid_base = 65536 * len(list(tmp_path.iterdir()))  # each image's copy is shifted to a uid range of its own
        return machine.capability_identity()

    base = {"systemd": "257.13-1~deb13u1", "libseccomp2": "2.6.0-2", "bash": "5.2.37-2"}
    same = identity("base", base)
    assert identity("curl", {**base, "curl": "8.14.1-2"}, held=("memcached.service",)) == same  # a package set
    assert identity("bpf", {**base, "libbpf1": "1:1.5.0-3"}) != same  # systemd loads libbpf for two directives
    assert identity("seccomp", {**base, "libseccomp2": "2.6.0-3"}) != same
    assert identity("settings", base, "[Manager]\nDefaultMemoryAccounting=no\n") != same


def test_a_second_machine_of_the_same_setup_reads_the_cache_and_remeasure_measures(
        machine: Machine, harden_pool: MachinePool) -> None:
    first = machine_capabilities(machine)
    assert first.how == "cached" or first.how.startswith("measured in"), first.how
    second_pool = MachinePool(image_cache=harden_pool.image_cache)
    try:
        second = second_pool.machine_for(MachineConfig())
        cached = machine_capabilities(second)
        assert cached.how == "cached", "the first machine's measurement was not stored (a probe batch failed?)"
        assert cached == first
        assert machine_facts(second) == machine_facts(machine)  # cached with them, not asked again
        del capabilities_module._MEASURED[second.name]
        again = machine_capabilities(second, remeasure=True)
        assert again.how.startswith("measured in") and again == first
    finally:
        second_pool.close()
