"""Directive conversion: YAML value -> unit-file assignments -> D-Bus (name, Variant) pairs, and the drop-in."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from dbus_next import Variant

from pytest_systemd_harden.kernel.flags import CAPABILITY_BITS, NAMESPACE_FLAGS
from pytest_systemd_harden.spec.directives import (
    ALL_CAPABILITIES,
    ALL_NAMESPACES,
    KNOWN,
    MS_REC,
    UINT64_MAX,
    Directive,
    DirectiveError,
    lookup,
    render_dropin,
)

AF_INET, AF_INET6 = 2, 10


def props(name: str, value: Any) -> list[tuple[str, str, Any]]:
    """The directive's bus properties as plain (name, signature, value) triples."""
    return [(prop, variant.signature, variant.value) for prop, variant in Directive.parse(name, value).properties()]


def assignments(name: str, value: Any) -> tuple[str, ...]:
    return Directive.parse(name, value).assignments


def directive_error(name: str, value: Any) -> DirectiveError:
    with pytest.raises(DirectiveError) as info:
        Directive.parse(name, value)
    return info.value


def caps(*names: str) -> int:
    mask = 0
    for name in names:
        mask |= 1 << CAPABILITY_BITS[name]
    return mask


def ns(*names: str) -> int:
    return sum(NAMESPACE_FLAGS[name] for name in names)


# --- booleans and enums -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "text", "flag"), [
    (True, "yes", True), (False, "no", False), ("yes", "yes", True), ("no", "no", False),
    ("true", "yes", True), ("off", "no", False), (1, "yes", True), (0, "no", False), ("Y", "yes", True),
])
def test_bool(value: Any, text: str, flag: bool) -> None:
    assert assignments("NoNewPrivileges", value) == (text,)
    assert props("NoNewPrivileges", value) == [("NoNewPrivileges", "b", flag)]


def test_bool_rejects_other_words() -> None:
    error = directive_error("PrivateTmp", "maybe")
    assert error.problem == "'maybe' is not a boolean"
    assert error.hint == "use yes or no"


@pytest.mark.parametrize(("name", "value"), [
    ("ProtectSystem", "strict"), ("ProtectSystem", "full"), ("ProtectHome", "read-only"), ("ProtectHome", "tmpfs"),
    ("ProtectProc", "invisible"), ("ProcSubset", "pid"), ("DevicePolicy", "closed"), ("KeyringMode", "private"),
    ("NotifyAccess", "main"), ("Restart", "on-failure"),
])
def test_enum_choices(name: str, value: str) -> None:
    assert assignments(name, value) == (value,)
    assert props(name, value) == [(name, "s", value)]


def test_enum_yaml_boolean_becomes_yes_no() -> None:
    """`ProtectHome: yes` arrives as a YAML boolean but means the enum value yes."""
    assert props("ProtectHome", True) == [("ProtectHome", "s", "yes")]
    assert props("ProtectSystem", False) == [("ProtectSystem", "s", "no")]


def test_enum_bad_value_with_hint() -> None:
    error = directive_error("ProtectSystem", "stric")
    assert error.problem == "'stric' is not one of yes, no, full, strict"
    assert error.hint == "did you mean strict?"
    assert str(error) == "'stric' is not one of yes, no, full, strict (did you mean strict?)"


def test_enum_bad_value_without_close_match() -> None:
    error = directive_error("ProcSubset", "everything")
    assert error.problem == "'everything' is not one of all, pid"
    assert error.hint == ""
    assert str(error) == "'everything' is not one of all, pid"


def test_enum_rejects_list() -> None:
    error = directive_error("ProtectSystem", ["strict"])
    assert error.problem == "expected a single value, not a list or mapping"


# --- strings and lists of words or paths ----------------------------------------------------------------------

def test_string() -> None:
    assert props("User", "signer") == [("User", "s", "signer")]


def test_strv_from_list_and_scalar() -> None:
    assert assignments("StateDirectory", ["signer", "signer/keys"]) == ("signer signer/keys",)
    assert props("StateDirectory", "signer") == [("StateDirectory", "as", ["signer"])]
    assert props("SystemCallArchitectures", "native") == [("SystemCallArchitectures", "as", ["native"])]


def test_path_list() -> None:
    value = ["/var/lib/app", "-/run/optional", "+/srv"]
    assert assignments("ReadWritePaths", value) == ("/var/lib/app -/run/optional +/srv",)
    assert props("ReadWritePaths", value) == [("ReadWritePaths", "as", ["/var/lib/app", "-/run/optional", "+/srv"])]


def test_path_list_scalar_with_several_words() -> None:
    assert props("InaccessiblePaths", "/home /root") == [("InaccessiblePaths", "as", ["/home", "/root"])]


def test_empty_path_list_resets() -> None:
    assert assignments("ReadOnlyPaths", None) == ("",)
    assert Directive.parse("ReadOnlyPaths", None).unit_lines() == ["ReadOnlyPaths="]
    assert props("ReadOnlyPaths", []) == [("ReadOnlyPaths", "as", [])]


def test_relative_path_rejected() -> None:
    error = directive_error("ReadWritePaths", ["/var/lib/app", "var/log/app"])
    assert error.problem == "'var/log/app' is not an absolute path"
    assert error.hint == "paths start with /; prefix - to ignore a missing one"


def test_relative_path_with_ignore_prefix_rejected() -> None:
    assert directive_error("ReadOnlyPaths", "-etc").problem == "'-etc' is not an absolute path"


def test_nested_list_rejected() -> None:
    error = directive_error("ReadWritePaths", [["/a"]])
    assert error.problem == "a list inside a list is not a value"
    assert error.hint == "write one flat list"


# --- SystemCallFilter and friends ----------------------------------------------------------------------------

def test_syscall_filter_merges_consecutive_polarity() -> None:
    value = ["@system-service", "~@privileged", "~@memlock"]
    directive = Directive.parse("SystemCallFilter", value)
    assert directive.assignments == ("@system-service", "~@privileged @memlock")
    assert directive.unit_lines() == ["SystemCallFilter=@system-service", "SystemCallFilter=~@privileged @memlock"]
    assert props("SystemCallFilter", value) == [
        ("SystemCallFilter", "(bas)", [True, ["@system-service"]]),
        ("SystemCallFilter", "(bas)", [False, ["@privileged", "@memlock"]]),
    ]


def test_syscall_filter_alternating_polarity_keeps_order() -> None:
    value = ["@system-service", "~@mount", "mlock", "~@swap", "~@reboot"]
    assert assignments("SystemCallFilter", value) == ("@system-service", "~@mount", "mlock", "~@swap @reboot")


def test_syscall_filter_scalar_deny_list() -> None:
    assert props("SystemCallFilter", "~@mount @swap") == [("SystemCallFilter", "(bas)", [False, ["@mount", "@swap"]])]


def test_syscall_filter_allow_items_merge() -> None:
    assert assignments("SystemCallFilter", ["@system-service", "@file-system", "mlock"]) == (
        "@system-service @file-system mlock",)


def test_syscall_filter_with_errno_suffix() -> None:
    assert assignments("SystemCallFilter", ["@system-service", "~mlock:EPERM"]) == ("@system-service", "~mlock:EPERM")


def test_syscall_log() -> None:
    assert props("SystemCallLog", "~@basic-io") == [("SystemCallLog", "(bas)", [False, ["@basic-io"]])]


def test_bad_syscall_name() -> None:
    error = directive_error("SystemCallFilter", ["@system-service", "Open$"])
    assert error.problem == "'Open$' is not a syscall or @group name"
    assert error.hint == "e.g. @system-service, ~@mount, mlock"


def test_a_syscall_group_systemd_does_not_have_is_refused_not_ignored() -> None:
    # systemd would log "Failed to parse system call, ignoring" and start the service with a weaker filter.
    error = directive_error("SystemCallFilter", ["@system-service", "~@privlieged"])
    assert error.problem == "'@privlieged' is not a syscall group of systemd, which would ignore it"
    assert error.hint == "did you mean @privileged?"
    assert directive_error("SystemCallLog", "@nosuchgroupatall").hint == "systemd-analyze syscall-filter lists them"
    assert assignments("SystemCallFilter", "~@mount:EPERM @sandbox") == ("~@mount:EPERM @sandbox",)


def test_syscalls_the_machines_systemd_does_not_know_are_named_with_the_closest_it_does() -> None:
    from pytest_systemd_harden.spec.directives import Directive, ignored_by_systemd

    hardening = [Directive.parse("SystemCallFilter", ["@system-service", "~mlokc:EPERM"], line=7),
                 Directive.parse("SystemCallLog", "@sandbox"), Directive.parse("ProtectSystem", "strict")]
    problems = ignored_by_systemd(hardening, {"@system-service", "@mount"}, {"mlock", "mount"}, "systemd 252 here")
    assert [(d.name, d.line, problem, hint) for d, problem, hint in problems] == [
        ("SystemCallFilter", 7, ("systemd 252 here does not know the syscall 'mlokc' and would ignore it: the "
                                 "filter would not be the one written here"), "did you mean mlock?"),
        ("SystemCallLog", None, ("systemd 252 here does not know the syscall group '@sandbox' and would ignore it: "
                                 "the filter would not be the one written here"),
         "a newer systemd has it: list its syscalls instead")]
    assert ignored_by_systemd(hardening, set(), set()) == []  # a systemd that does not say: nothing to check


def test_address_families() -> None:
    value = ["AF_UNIX", "AF_INET", "AF_INET6"]
    assert assignments("RestrictAddressFamilies", value) == ("AF_UNIX AF_INET AF_INET6",)
    assert props("RestrictAddressFamilies", value) == [
        ("RestrictAddressFamilies", "(bas)", [True, ["AF_UNIX", "AF_INET", "AF_INET6"]])]


def test_address_families_deny() -> None:
    assert props("RestrictAddressFamilies", "~AF_PACKET AF_NETLINK") == [
        ("RestrictAddressFamilies", "(bas)", [False, ["AF_PACKET", "AF_NETLINK"]])]


def test_address_families_none_is_empty_allow_list() -> None:
    assert assignments("RestrictAddressFamilies", "none") == ("none",)
    assert props("RestrictAddressFamilies", "none") == [("RestrictAddressFamilies", "(bas)", [True, []])]


def test_bad_address_family() -> None:
    error = directive_error("RestrictAddressFamilies", ["AF_UNIX", "inet"])
    assert error.problem == "'inet' is not an address family"
    assert error.hint == "e.g. AF_UNIX, AF_INET, AF_INET6, AF_NETLINK"


def test_an_address_family_linux_does_not_have_is_refused_not_ignored() -> None:
    error = directive_error("RestrictAddressFamilies", ["AF_UNIX", "AF_INTE"])
    assert error.problem == "'AF_INTE' is not an address family of Linux, and systemd would ignore it"
    assert error.hint == "did you mean AF_INET?"
    assert assignments("RestrictAddressFamilies", "AF_DECnet AF_XDP") == ("AF_DECnet AF_XDP",)


def test_restrict_file_systems() -> None:
    assert props("RestrictFileSystems", ["~@privileged-api"]) == [
        ("RestrictFileSystems", "(bas)", [False, ["@privileged-api"]])]


# --- capabilities -----------------------------------------------------------------------------------------------

def test_capabilities_empty_drops_all() -> None:
    assert assignments("CapabilityBoundingSet", "") == ("",)
    assert Directive.parse("CapabilityBoundingSet", "").unit_lines() == ["CapabilityBoundingSet="]
    assert props("CapabilityBoundingSet", "") == [("CapabilityBoundingSet", "t", 0)]


def test_capabilities_named() -> None:
    value = ["cap_net_bind_service", "CAP_CHOWN"]
    assert assignments("CapabilityBoundingSet", value) == ("CAP_NET_BIND_SERVICE CAP_CHOWN",)
    assert props("CapabilityBoundingSet", value) == [("CapabilityBoundingSet", "t", (1 << 10) | (1 << 0))]


def test_capabilities_inverted() -> None:
    expected = ALL_CAPABILITIES & ~((1 << 21) | (1 << 16))  # all but CAP_SYS_ADMIN and CAP_SYS_MODULE
    assert assignments("CapabilityBoundingSet", "~CAP_SYS_ADMIN CAP_SYS_MODULE") == ("~CAP_SYS_ADMIN CAP_SYS_MODULE",)
    assert props("CapabilityBoundingSet", "~CAP_SYS_ADMIN CAP_SYS_MODULE") == [
        ("CapabilityBoundingSet", "t", expected)]
    assert expected == caps(*(c for c in CAPABILITY_BITS if c not in ("CAP_SYS_ADMIN", "CAP_SYS_MODULE")))


def test_capability_mask_covers_all_known() -> None:
    assert ALL_CAPABILITIES == (1 << 41) - 1
    assert CAPABILITY_BITS["CAP_CHECKPOINT_RESTORE"] == 40
    every = " ".join(CAPABILITY_BITS)
    assert props("CapabilityBoundingSet", every) == [("CapabilityBoundingSet", "t", ALL_CAPABILITIES)]
    assert props("CapabilityBoundingSet", "~" + every) == [("CapabilityBoundingSet", "t", 0)]


def test_ambient_capabilities() -> None:
    assert props("AmbientCapabilities", "CAP_NET_BIND_SERVICE") == [("AmbientCapabilities", "t", 1 << 10)]


def test_bad_capability() -> None:
    error = directive_error("CapabilityBoundingSet", ["CAP_CHOWN", "CAP_SYS_ADMN"])
    assert error.problem == "'CAP_SYS_ADMN' is not a capability"
    assert error.hint == "did you mean CAP_SYS_ADMIN?"


# --- RestrictNamespaces: systemd sends the namespace types *allowed* ---------------------------------------------

@pytest.mark.parametrize(("value", "text", "allowed"), [
    (True, "yes", 0),
    ("yes", "yes", 0),
    (False, "no", ALL_NAMESPACES),
    ("no", "no", ALL_NAMESPACES),
    ("net ipc", "net ipc", 0x40000000 | 0x08000000),
    (["net", "ipc"], "net ipc", 0x40000000 | 0x08000000),
    ("~net", "~net", ALL_NAMESPACES & ~0x40000000),
    ("~user net", "~user net", ALL_NAMESPACES & ~(0x10000000 | 0x40000000)),
    (["~user", "net"], "~user net", ALL_NAMESPACES & ~(0x10000000 | 0x40000000)),
])
def test_restrict_namespaces(value: Any, text: str, allowed: int) -> None:
    assert assignments("RestrictNamespaces", value) == (text,)
    assert props("RestrictNamespaces", value) == [("RestrictNamespaces", "t", allowed)]


def test_all_namespaces_value() -> None:
    assert ALL_NAMESPACES == ns("cgroup", "ipc", "net", "mnt", "pid", "user", "uts") == 0x7E020000


def test_bad_namespace() -> None:
    error = directive_error("RestrictNamespaces", ["net", "network"])
    assert error.problem == "'network' is not a namespace type"
    assert error.hint.startswith("one of cgroup, ipc, net, mnt, pid, user, uts")


def test_tilde_only_at_start_of_namespaces() -> None:
    """systemd inverts the whole list with a leading ~; a ~ later in the list is not a namespace name."""
    assert directive_error("RestrictNamespaces", ["net", "~ipc"]).problem == "'~ipc' is not a namespace type"


# --- errno, modes, limits, sizes, times ----------------------------------------------------------------------

@pytest.mark.parametrize(("value", "text", "number"), [
    ("EPERM", "EPERM", errno.EPERM), ("EACCES", "EACCES", errno.EACCES), ("ENOSYS", "ENOSYS", errno.ENOSYS),
    (1, "1", 1), ("38", "38", 38),
])
def test_syscall_error_number(value: Any, text: str, number: int) -> None:
    assert assignments("SystemCallErrorNumber", value) == (text,)
    assert props("SystemCallErrorNumber", value) == [("SystemCallErrorNumber", "i", number)]


def test_bad_errno() -> None:
    error = directive_error("SystemCallErrorNumber", "EPRM")
    assert error.problem == "'EPRM' is not an errno name"
    assert error.hint == "did you mean EPERM?"


def test_errno_module_attribute_is_not_an_errno() -> None:
    assert directive_error("SystemCallErrorNumber", "errorcode").problem == "'errorcode' is not an errno name"


@pytest.mark.parametrize(("value", "text", "mode"), [
    (0o077, "0077", 0o077),  # YAML 1.1 reads an unquoted 0077 as this octal number
    (0o022, "0022", 0o022),
    ("0077", "0077", 0o077),
    ("027", "0027", 0o027),
    ("7", "0007", 0o007),
    (0, "0000", 0),
])
def test_umask(value: Any, text: str, mode: int) -> None:
    assert assignments("UMask", value) == (text,)
    assert props("UMask", value) == [("UMask", "u", mode)]


def test_directory_mode() -> None:
    assert props("StateDirectoryMode", "0700") == [("StateDirectoryMode", "u", 0o700)]


@pytest.mark.parametrize("value", ["0999", "rwx", "077777"])
def test_bad_umask_string(value: str) -> None:
    error = directive_error("UMask", value)
    assert error.problem == f"{value!r} is not an octal mode"
    assert error.hint == "e.g. 0077"


def test_umask_int_out_of_range() -> None:
    assert directive_error("UMask", 0o10000).problem == "4096 is out of range for a mode"


def test_limit_soft_hard() -> None:
    assert assignments("LimitNOFILE", "1024:4096") == ("1024:4096",)
    assert props("LimitNOFILE", "1024:4096") == [("LimitNOFILE", "t", 4096), ("LimitNOFILESoft", "t", 1024)]


def test_limit_single_value_sets_both() -> None:
    assert props("LimitNOFILE", 1024) == [("LimitNOFILE", "t", 1024), ("LimitNOFILESoft", "t", 1024)]


def test_limit_infinity_and_suffix() -> None:
    assert props("LimitCORE", "0:infinity") == [("LimitCORE", "t", UINT64_MAX), ("LimitCORESoft", "t", 0)]
    assert props("LimitMEMLOCK", "64K") == [("LimitMEMLOCK", "t", 65536), ("LimitMEMLOCKSoft", "t", 65536)]


def test_bad_limit() -> None:
    error = directive_error("LimitNOFILE", "lots")
    assert error.problem == "'lots' is not a limit"
    assert error.hint == "a plain number (no K/M/G suffix for this limit), infinity, or soft:hard"


@pytest.mark.parametrize(("value", "size"), [
    ("512M", 512 * 1024**2), ("1G", 1024**3), ("64K", 65536), ("2T", 2 * 1024**4), (1048576, 1048576),
    ("infinity", UINT64_MAX),
])
def test_memory_sizes(value: Any, size: int) -> None:
    assert props("MemoryMax", value) == [("MemoryMax", "t", size)]


def test_bad_size() -> None:
    error = directive_error("MemoryHigh", "1.5G")
    assert error.problem == "'1.5G' is not a size"
    assert error.hint == "bytes with an optional K, M, G or T suffix, or infinity"


def test_tasks_max() -> None:
    assert props("TasksMax", 64) == [("TasksMax", "t", 64)]
    assert props("TasksMax", "infinity") == [("TasksMax", "t", UINT64_MAX)]
    assert directive_error("TasksMax", "many").problem == "'many' is not a task count"


@pytest.mark.parametrize(("value", "text", "usec"), [
    ("30s", "30s", 30_000_000),
    (30, "30", 30_000_000),  # bare number: seconds
    ("1min 30s", "1min30s", 90_000_000),
    ("2minute", "2minute", 120_000_000),
    ("500ms", "500ms", 500_000),
    ("1.5h", "1.5h", 5_400_000_000),
    ("250us", "250us", 250),
    ("infinity", "infinity", UINT64_MAX),
])
def test_timeout_start_sec(value: Any, text: str, usec: int) -> None:
    directive = Directive.parse("TimeoutStartSec", value)
    assert directive.unit_lines() == [f"TimeoutStartSec={text}"]
    assert props("TimeoutStartSec", value) == [("TimeoutStartUSec", "t", usec)]


def test_other_timespans_use_usec_bus_names() -> None:
    assert props("RestartSec", "5s") == [("RestartUSec", "t", 5_000_000)]
    assert props("RuntimeMaxSec", "1h") == [("RuntimeMaxUSec", "t", 3_600_000_000)]
    assert props("TimeoutStopSec", "10") == [("TimeoutStopUSec", "t", 10_000_000)]


def test_bad_time_span() -> None:
    error = directive_error("TimeoutStartSec", "soon")
    assert error.problem == "'soon' is not a time span"
    assert error.hint == "e.g. 30s, 5min, 1h, infinity"


def test_unknown_time_unit_rejected_when_parsed() -> None:
    """A bad unit must fail while the spec loads, not later when the unit's properties are built."""
    error = directive_error("TimeoutStartSec", "5fortnights")
    assert error.problem == "unknown time unit 'fortnights'"


# --- IP access lists ----------------------------------------------------------------------------------------

ANY4 = (AF_INET, bytes(4), 0)
ANY6 = (AF_INET6, bytes(16), 0)


def ip_props(name: str, value: Any) -> list[tuple[int, bytes, int]]:
    ((prop, signature, entries),) = props(name, value)
    assert (prop, signature) == (name, "a(iayu)")
    return [(family, bytes(address), prefixlen) for family, address, prefixlen in entries]


def test_ip_deny_any() -> None:
    assert assignments("IPAddressDeny", "any") == ("any",)
    assert ip_props("IPAddressDeny", "any") == [ANY4, ANY6]


def test_ip_allow_localhost() -> None:
    assert ip_props("IPAddressAllow", "localhost") == [
        (AF_INET, bytes([127, 0, 0, 0]), 8),
        (AF_INET6, bytes(15) + b"\x01", 128),
    ]


def test_ip_prefixes_are_normalised() -> None:
    value = ["10.1.2.3/8", "192.168.1.7", "fd00::1/8", "link-local"]
    assert assignments("IPAddressAllow", value) == ("10.1.2.3/8 192.168.1.7 fd00::1/8 link-local",)
    assert ip_props("IPAddressAllow", value) == [
        (AF_INET, bytes([10, 0, 0, 0]), 8),
        (AF_INET, bytes([192, 168, 1, 7]), 32),
        (AF_INET6, b"\xfd" + bytes(15), 8),
        (AF_INET, bytes([169, 254, 0, 0]), 16),
        (AF_INET6, b"\xfe\x80" + bytes(14), 64),
    ]


def test_ip_bad_address() -> None:
    error = directive_error("IPAddressDeny", ["any", "300.1.1.1"])
    assert error.problem == "'300.1.1.1' is not an address or prefix"
    assert error.hint == "e.g. 127.0.0.1, 10.0.0.0/8, ::1, any, localhost"


# --- binds, devices, credentials, environment, socket binds ---------------------------------------------------

def test_bind_read_only_paths() -> None:
    value = ["/srv/data:/data", "-/etc/app:/etc/app:norbind", "/opt/tool", "/a:/b:rbind"]
    assert assignments("BindReadOnlyPaths", value) == (
        "/srv/data:/data -/etc/app:/etc/app:norbind /opt/tool /a:/b:rbind",)
    assert props("BindReadOnlyPaths", value) == [("BindReadOnlyPaths", "a(ssbt)", [
        ["/srv/data", "/data", False, MS_REC],
        ["/etc/app", "/etc/app", True, 0],
        ["/opt/tool", "/opt/tool", False, MS_REC],
        ["/a", "/b", False, MS_REC],
    ])]


@pytest.mark.parametrize("value", ["data:/data", "/srv/data:data", "/a:/b:rbind:extra"])
def test_bad_bind(value: str) -> None:
    error = directive_error("BindPaths", value)
    assert error.problem == f"{value!r} is not SOURCE[:DEST[:OPTIONS]]"
    assert error.hint == "absolute paths, e.g. /srv/data:/data"


def test_device_allow_and_credentials() -> None:
    assert props("DeviceAllow", ["/dev/null rw", "/dev/zero r"]) == [
        ("DeviceAllow", "a(ss)", [["/dev/null", "rw"]]), ("DeviceAllow", "a(ss)", [["/dev/zero", "r"]])]
    assert props("LoadCredential", "token:/etc/app/token") == [
        ("LoadCredential", "a(ss)", [["token", "/etc/app/token"]])]
    error = directive_error("LoadCredential", "token")
    assert (error.problem, error.hint) == ("'token' lacks ':'", "e.g. token:/etc/app/token")


def test_environment_mapping() -> None:
    directive = Directive.parse("Environment", {"LANG": "C.UTF-8", "PORT": 8080})
    assert directive.unit_lines() == ["Environment=LANG=C.UTF-8", "Environment=PORT=8080"]
    assert props("Environment", {"LANG": "C.UTF-8", "PORT": 8080}) == [
        ("Environment", "as", ["LANG=C.UTF-8"]), ("Environment", "as", ["PORT=8080"])]


def test_environment_mapping_value_with_spaces_is_quoted() -> None:
    """The drop-in must mean what was tested: unquoted, systemd would split "x y" into two words."""
    value = {"GREETING": "hello world", "QUOTE": 'say "hi"'}
    assert Directive.parse("Environment", value).unit_lines() == [
        'Environment="GREETING=hello world"', 'Environment="QUOTE=say \\"hi\\""']
    assert props("Environment", value) == [
        ("Environment", "as", ["GREETING=hello world"]), ("Environment", "as", ['QUOTE=say "hi"'])]


def test_environment_list_lines_split_as_systemd_does() -> None:
    value = ["A=1 B=2", 'C="x y"']
    assert Directive.parse("Environment", value).unit_lines() == ["Environment=A=1 B=2", 'Environment=C="x y"']
    assert props("Environment", value) == [("Environment", "as", ["A=1", "B=2"]), ("Environment", "as", ["C=x y"])]


def test_bad_environment() -> None:
    error = directive_error("Environment", ["A=1", "DEBUG"])
    assert error.problem == "'DEBUG' is not NAME=VALUE"
    assert error.hint == "or write a mapping NAME: VALUE"


def test_socket_bind() -> None:
    assert props("SocketBindAllow", ["tcp:8080", "ipv6:udp:53", "1024-65535", "any"]) == [
        ("SocketBindAllow", "a(iiqq)", [[0, 6, 1, 8080], [AF_INET6, 17, 1, 53], [0, 0, 64512, 1024], [0, 0, 0, 0]])]
    assert directive_error("SocketBindDeny", "sctp:80").problem == "'sctp:80' is not a bind rule"


def test_integer() -> None:
    assert props("Nice", -5) == [("Nice", "i", -5)]
    assert props("OOMScoreAdjust", "500") == [("OOMScoreAdjust", "i", 500)]


# --- lookup, Directive helpers, drop-in ------------------------------------------------------------------------

@pytest.mark.parametrize(("typo", "name"), [
    ("ProtectSytem", "ProtectSystem"), ("NoNewPrivilege", "NoNewPrivileges"), ("privatetmp", "PrivateTmp"),
    ("SystemCallFilters", "SystemCallFilter"), ("CapabilityBoundingSets", "CapabilityBoundingSet"),
])
def test_unknown_directive_suggests_closest(typo: str, name: str) -> None:
    with pytest.raises(DirectiveError) as info:
        lookup(typo)
    assert info.value.problem == "unknown directive"
    assert info.value.hint == f"did you mean {name}?"
    assert str(directive_error(typo, "yes")) == f"unknown directive (did you mean {name}?)"


def test_unknown_directive_without_close_match() -> None:
    error = directive_error("Frobnicate", "yes")
    assert error.hint == "see `man systemd.exec` and docs/spec.md for the supported directives"


def test_known_table_has_no_duplicates_and_every_directive_parses_something() -> None:
    assert len(KNOWN) == len({d.name for d in KNOWN.values()})
    assert KNOWN["TimeoutStartSec"].bus_name == "TimeoutStartUSec"
    assert KNOWN["ProtectHome"].choices == ("yes", "no", "read-only", "tmpfs")


def test_properties_are_variants() -> None:
    ((name, variant),) = Directive.parse("ProtectSystem", "strict").properties()
    assert name == "ProtectSystem"
    assert isinstance(variant, Variant)
    assert variant == Variant("s", "strict")


def test_directive_value_str_and_line() -> None:
    directive = Directive.parse("SystemCallFilter", ["@system-service", "~@privileged"], line=7)
    assert directive.line == 7
    assert directive.value == "@system-service ~@privileged"
    assert str(directive) == "SystemCallFilter=@system-service; SystemCallFilter=~@privileged"
    assert directive.type is KNOWN["SystemCallFilter"]


def test_render_dropin() -> None:
    directives = [
        Directive.parse("ProtectSystem", "strict"),
        Directive.parse("SystemCallFilter", ["@system-service", "~@privileged", "~@memlock"]),
        Directive.parse("CapabilityBoundingSet", ""),
        Directive.parse("UMask", 0o077),
    ]
    assert render_dropin(directives, header="tested by me\nsecond line") == (
        "# tested by me\n"
        "# second line\n"
        "[Service]\n"
        "ProtectSystem=strict\n"
        "SystemCallFilter=@system-service\n"
        "SystemCallFilter=~@privileged @memlock\n"
        "CapabilityBoundingSet=\n"
        "UMask=0077\n"
    )


def test_render_dropin_without_header() -> None:
    assert render_dropin([Directive.parse("PrivateTmp", True)]) == "[Service]\nPrivateTmp=yes\n"
    assert render_dropin([]) == "[Service]\n"
