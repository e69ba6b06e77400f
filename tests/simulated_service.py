"""A simulated service for the search tests (diagnosis, tighten): systemd's filter semantics, declared needs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pytest_systemd_harden.search.diagnosis import TrialResult
from pytest_systemd_harden.search.observe import filter_allows
from pytest_systemd_harden.spec.directives import Directive

PRIVILEGED = ["@chown", "acct", "bpf", "capset", "chroot", "fanotify_init", "open_by_handle_at", "pivot_root",
              "quotactl", "setdomainname", "setfsuid", "setgroups", "setresuid", "setreuid", "setuid", "swapon"]
GROUPS: dict[str, list[str]] = {
    "@memlock": ["mlock", "mlock2", "mlockall", "munlock", "munlockall"],
    "@chown": ["chown", "fchown", "fchownat", "lchown"],
    "@privileged": PRIVILEGED,
    "@pkey": ["pkey_alloc", "pkey_free", "pkey_mprotect"],
    # As systemd lists it: every architecture's names (the *32 ones are i386's).
    "@setuid": ["setgid", "setgid32", "setgroups", "setgroups32", "setregid", "setregid32", "setresgid", "setresgid32",
                "setresuid", "setresuid32", "setreuid", "setreuid32", "setuid", "setuid32"],
    "@system-service": ["@chown", "@memlock", "@setuid", "read", "write", "openat", "mmap", "socket"],
}


def hardening(**directives: object) -> tuple[Directive, ...]:
    return tuple(Directive.parse(name, value, line) for line, (name, value) in enumerate(directives.items(), 10))


GPG_LIKE = {
    "DynamicUser": True, "StateDirectory": "signer", "ProtectSystem": "strict", "ProtectHome": True, "PrivateTmp": True,
    "PrivateDevices": True, "ProtectHostname": True, "ProtectClock": True, "ProtectKernelTunables": True,
    "ProtectKernelModules": True, "ProtectKernelLogs": True, "ProtectControlGroups": True, "LockPersonality": True,
    "MemoryDenyWriteExecute": True, "RestrictRealtime": True, "RestrictSUIDSGID": True, "RestrictNamespaces": True,
    "NoNewPrivileges": True, "CapabilityBoundingSet": "", "SystemCallArchitectures": "native",
    "RestrictAddressFamilies": ["AF_UNIX", "AF_INET", "AF_INET6"], "UMask": "0077",
}


def syscall_allowed(directives: Sequence[Directive], syscall: str) -> bool:
    """systemd's SystemCallFilter= semantics (the first line sets the mode, later lines of the other kind remove, an
    empty line resets), as the observation reads them (test_tighten checks it case by case)."""
    found = [d for d in directives if d.name == "SystemCallFilter"]
    return filter_allows(found[0].assignments if found else (), syscall, GROUPS)


# man systemd.exec, NoNewPrivileges=: what turns it on for a service without CAP_SYS_ADMIN (kept apart from the
# plugin's own table: this is the test's oracle).
SECCOMP_LIKE = ("SystemCallFilter", "SystemCallArchitectures", "RestrictAddressFamilies", "RestrictNamespaces",
                "PrivateDevices", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectClock",
                "ProtectHostname", "MemoryDenyWriteExecute", "RestrictRealtime", "RestrictSUIDSGID", "LockPersonality",
                "SystemCallLog")


def no_new_privileges(by_name: dict[str, Directive]) -> bool:
    def on(name: str) -> bool:
        return name in by_name and by_name[name].value not in ("", "no")

    dynamic = on("DynamicUser")
    unprivileged = dynamic or ("User" in by_name and by_name["User"].value != "root")
    return on("NoNewPrivileges") or dynamic or (unprivileged and any(on(name) for name in SECCOMP_LIKE))


@dataclass
class World:
    """A service with needs; a trial passes when the hardening grants all of them."""

    syscalls: Sequence[str] = ()
    families: Sequence[str] = ()
    capabilities: Sequence[str] = ()
    writes: Sequence[str] = ()
    network: bool = False  # talks to another host: PrivateNetwork= cuts it off
    reads_proc: bool = False  # reads /proc/meminfo: ProcSubset=pid hides it
    shares_files: bool = False  # others read the files it makes: a UMask= without their read bit breaks it
    group_reads: bool = False  # its group reads the files it makes
    namespaces: Sequence[str] = ()  # namespace types it makes (cgroup, ipc, net, ...)
    setuid: bool = False  # runs a setuid helper (sudo): NoNewPrivileges=, set or implied, breaks it
    devices: Sequence[str] = ()  # device nodes it opens (/dev/net/tun): PrivateDevices= hides them
    reads: Sequence[str] = ()  # files it reads that exist on the machine (/tmp/x, /root/x, ...)
    present: Sequence[str] = ()  # files that exist before it starts (a ReadWritePaths=-PATH of a missing PATH is void)
    x86: bool = False  # makes 32-bit (x86) system calls: SystemCallArchitectures=native kills it
    silent: bool = False  # swallows its errors: a failure says nothing about why
    kernel_log: bool = False  # a killed call is named by the kernel's seccomp record, as the trials report it
    broken_anyway: bool = False
    flaky: bool = False
    runs: list[tuple[str, ...]] = field(default_factory=list)

    def trial(self, directives: tuple[Directive, ...]) -> TrialResult:
        result = self._trial(directives)
        return TrialResult(result.passed, "exit status 1") if self.silent and not result.passed else result

    def _trial(self, directives: tuple[Directive, ...]) -> TrialResult:
        self.runs.append(tuple(str(d) for d in directives))
        if self.broken_anyway:
            return TrialResult(False, "exit status 1")
        if self.flaky:  # the failure seen in the test run does not come back
            return TrialResult(True)
        by_name = {d.name: d for d in directives}
        if self.setuid and no_new_privileges(by_name):
            return TrialResult(False, "sudo: effective uid is not 0",
                               "sudo: effective uid is not 0, is /usr/bin/sudo on a file system with the 'nosuid' "
                               "option set or an NFS file system without root privileges?")
        for syscall in self.syscalls:
            if not syscall_allowed(directives, syscall):
                record = f"\nkernel log (seccomp):\nthe kernel killed 4242 (svc) for syscall {syscall}" \
                    if self.kernel_log else ""
                return TrialResult(False, "exit status 159 (SIGSYS)" if self.kernel_log else f"{syscall}: SIGSYS",
                                   record.lstrip("\n"))
        if (self.x86 and "SystemCallArchitectures" in by_name
                and "x86" not in _values(by_name, "SystemCallArchitectures")):
            return TrialResult(False, "exit status 159 (SIGSYS)", "Bad system call")
        for device in self.devices:
            if not self.device_usable(by_name, device):
                return TrialResult(False, f"{device}: ENOENT",
                                   f"open {device}: No such file or directory")
        for path in self.reads:
            if not self.readable(by_name, path):
                return TrialResult(False, f"{path}: ENOENT", f"cat: {path}: No such file or directory")
        if "RestrictAddressFamilies" in by_name:
            allowed = by_name["RestrictAddressFamilies"].value.split()
            if any(f not in allowed for f in self.families):
                return TrialResult(False, "EAFNOSUPPORT")
        if "RestrictNamespaces" in by_name:
            types = by_name["RestrictNamespaces"].value
            if any(not (types == "no" or n in types.split()) for n in self.namespaces):
                return TrialResult(False, "unshare: EPERM")
        if "CapabilityBoundingSet" in by_name:
            allowed = by_name["CapabilityBoundingSet"].value.split()
            if any(c not in allowed for c in self.capabilities):
                return TrialResult(False, "EPERM")
        if self.capabilities and by_name.get("PrivateUsers") is not None and by_name["PrivateUsers"].value == "yes":
            return TrialResult(False, "EPERM")  # a capability in a user namespace of its own: not over the host's
        for path in self.writes:
            if not self.writable(by_name, path):
                return TrialResult(False, f"{path}: EROFS", f"touch: cannot touch '{path}': Read-only file system")
        if self.network and "PrivateNetwork" in by_name:
            return TrialResult(False, "ECONNREFUSED")
        if self.reads_proc and "ProcSubset" in by_name and by_name["ProcSubset"].value == "pid":
            return TrialResult(False, "/proc/meminfo: ENOENT")
        umask = int(by_name["UMask"].value, 8) if "UMask" in by_name else 0o022
        if self.shares_files and umask & 0o004:
            return TrialResult(False, "EACCES: others cannot read its files")
        if self.group_reads and umask & 0o040:
            return TrialResult(False, "EACCES: its group cannot read its files")
        return TrialResult(True)

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists before the service runs: a present file, or a directory holding one or holding
        a file the service writes."""
        return any(p == path or p.startswith(path + "/") for p in self.present) or \
            any(p.startswith(path + "/") for p in self.writes)

    def writable(self, by_name: dict[str, Directive], path: str) -> bool:
        # systemd.exec: yes makes /usr and /boot read-only, full adds /etc, strict the whole tree; DynamicUser=yes
        # implies strict.
        protect_system = by_name["ProtectSystem"].value if "ProtectSystem" in by_name else "no"
        if "DynamicUser" in by_name and by_name["DynamicUser"].value == "yes":
            protect_system = "strict"
        read_only = {"no": (), "yes": ("/usr", "/boot"), "full": ("/usr", "/boot", "/etc"),
                     "strict": ("/",)}[protect_system]
        if not any(path.startswith(r.rstrip("/") + "/") for r in read_only):
            return True
        # A service directory is a directory: a file of the same name cannot be written there.
        made = [f"/var/lib/{n}" for n in _values(by_name, "StateDirectory")]
        made += [f"/var/cache/{n}" for n in _values(by_name, "CacheDirectory")]
        made += [f"/var/log/{n}" for n in _values(by_name, "LogsDirectory")]
        made += [f"/etc/{n}" for n in _values(by_name, "ConfigurationDirectory")]  # writable too (seen, systemd 252)
        if any(path.startswith(d + "/") for d in made):
            return True
        # A "-" path that does not exist is skipped by systemd; one without "-" fails the start (not modelled).
        granted = [p.lstrip("-") for p in _values(by_name, "ReadWritePaths")
                    if not p.startswith("-") or self.exists(p.lstrip("-"))]
        return any(path == g or path.startswith(g + "/") for g in granted)

    @staticmethod
    def device_usable(by_name: dict[str, Directive], device: str) -> bool:
        # PrivateDevices=yes: a private /dev of pseudo devices, and DevicePolicy=closed (the device cgroup denies
        # what DeviceAllow= does not list); BindPaths= brings the node in.
        if "PrivateDevices" not in by_name or by_name["PrivateDevices"].value != "yes":
            return True
        bound = {p.lstrip("-").split(":")[0] for p in _values(by_name, "BindPaths")}
        allowed = {a.split()[0] for a in by_name["DeviceAllow"].assignments} if "DeviceAllow" in by_name else set()
        return device in bound and device in allowed

    @staticmethod
    def readable(by_name: dict[str, Directive], path: str) -> bool:
        bound = {p.lstrip("-").split(":")[0]
                 for p in _values(by_name, "BindReadOnlyPaths") + _values(by_name, "BindPaths")}
        if path.startswith(("/tmp/", "/var/tmp/")) and "PrivateTmp" in by_name and by_name["PrivateTmp"].value == "yes":
            return path in bound
        if path.startswith(("/home/", "/root/", "/run/user/")) and "ProtectHome" in by_name:
            # Seen on systemd 252: under =yes the home trees are inaccessible and a bind into them does not appear;
            # under =tmpfs they are empty but binds show; =read-only hides nothing.
            mode = by_name["ProtectHome"].value
            return {"yes": False, "tmpfs": path in bound}.get(mode, True)
        return True


def _values(by_name: dict[str, Directive], name: str) -> list[str]:
    """Every word of every assignment of ``name`` (paths with spaces are not used here)."""
    return by_name[name].value.split() if name in by_name else []
