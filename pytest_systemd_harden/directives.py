"""systemd directives: from a spec's YAML value to unit-file lines and to the D-Bus properties systemd expects.

Each directive is parsed once into *assignments* - the values exactly as they would stand after ``Name=`` in a
unit file, one per line. Both renderings derive from those: the drop-in a user pastes (what was tested) and the
typed properties sent with StartTransientUnit. The conversions follow systemd's own client
(``bus_append_unit_property_assignment`` in src/shared/bus-unit-util.c), so a directive means here what it means
to ``systemd-run -p``.

Errors are :class:`DirectiveError` with a problem and a hint; the spec loader adds file, line and key.
"""

from __future__ import annotations

import difflib
import errno
import ipaddress
import re
import shlex
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from dbus_next.signature import Variant

Property = tuple[str, Variant]


class DirectiveError(ValueError):
    def __init__(self, problem: str, hint: str = "") -> None:
        self.problem = problem
        self.hint = hint
        super().__init__(problem + (f" ({hint})" if hint else ""))


# --- value vocabularies ---------------------------------------------------------------------------------------

# linux/capability.h
CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
]
CAPABILITY_BITS = {name: index for index, name in enumerate(CAPABILITIES)}
ALL_CAPABILITIES = (1 << len(CAPABILITIES)) - 1

# systemd's namespace_info[] (src/shared/nsflags.c), in its order.
NAMESPACE_FLAGS = {
    "cgroup": 0x02000000, "ipc": 0x08000000, "net": 0x40000000, "mnt": 0x00020000,
    "pid": 0x20000000, "user": 0x10000000, "uts": 0x04000000,
}
ALL_NAMESPACES = sum(NAMESPACE_FLAGS.values())

ADDRESS_FAMILY_RE = re.compile(r"^AF_[A-Z0-9_]+$")
# systemd ignores a syscall group or an address family it does not know, with only a line in its log: the filter
# then differs from what the spec says, silently. So names are checked against these lists when the spec loads
# (the syscalls themselves against the machine's systemd when the service starts, see ignored_by_systemd).
# systemd.exec(5), "System Call Filtering": the groups of systemd 252, and @sandbox (253).
SYSCALL_GROUPS = (
    "@aio", "@basic-io", "@chown", "@clock", "@cpu-emulation", "@debug", "@default", "@file-system", "@io-event",
    "@ipc", "@keyring", "@known", "@memlock", "@module", "@mount", "@network-io", "@obsolete", "@pkey",
    "@privileged", "@process", "@raw-io", "@reboot", "@resources", "@sandbox", "@setuid", "@signal", "@swap",
    "@sync", "@system-service", "@timer",
)
# Linux's address families (include/linux/socket.h), the names systemd's RestrictAddressFamilies= reads.
ADDRESS_FAMILIES = (
    "AF_UNIX", "AF_LOCAL", "AF_INET", "AF_AX25", "AF_IPX", "AF_APPLETALK", "AF_NETROM", "AF_BRIDGE", "AF_ATMPVC",
    "AF_X25", "AF_INET6", "AF_ROSE", "AF_DECnet", "AF_NETBEUI", "AF_SECURITY", "AF_KEY", "AF_NETLINK", "AF_ROUTE",
    "AF_PACKET", "AF_ASH", "AF_ECONET", "AF_ATMSVC", "AF_RDS", "AF_SNA", "AF_IRDA", "AF_PPPOX", "AF_WANPIPE",
    "AF_LLC", "AF_IB", "AF_MPLS", "AF_CAN", "AF_TIPC", "AF_BLUETOOTH", "AF_IUCV", "AF_RXRPC", "AF_ISDN",
    "AF_PHONET", "AF_IEEE802154", "AF_CAIF", "AF_ALG", "AF_NFC", "AF_VSOCK", "AF_KCM", "AF_QIPCRTR", "AF_SMC",
    "AF_XDP", "AF_MCTP",
)
SYSCALL_NAME_RE = re.compile(r"^@?[a-z0-9_-]+(:[A-Za-z0-9_]+)?$")
AF_INET, AF_INET6 = 2, 10

# Symbolic IP prefixes systemd accepts (src/core/ip-address-access.c).
IP_SYMBOLS = {
    "any": ["0.0.0.0/0", "::/0"],
    "localhost": ["127.0.0.0/8", "::1/128"],
    "link-local": ["169.254.0.0/16", "fe80::/64"],
    "multicast": ["224.0.0.0/4", "ff00::/8"],
}

TIME_UNITS = {"us": 1, "usec": 1, "ms": 1000, "msec": 1000, "s": 10**6, "sec": 10**6, "second": 10**6,
              "seconds": 10**6, "m": 60 * 10**6, "min": 60 * 10**6, "minute": 60 * 10**6, "minutes": 60 * 10**6,
              "h": 3600 * 10**6, "hr": 3600 * 10**6, "hour": 3600 * 10**6, "hours": 3600 * 10**6}
SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
UINT64_MAX = 2**64 - 1
MS_REC = 16384


# --- YAML value -> unit-file assignments --------------------------------------------------------------------

def _words(value: Any) -> list[str]:
    """A YAML scalar or list, as the whitespace-separated words systemd would see."""
    if value is None:
        return []
    if isinstance(value, list):
        out: list[str] = []
        for item in value:
            if isinstance(item, (list, dict)):
                raise DirectiveError("a list inside a list is not a value", "write one flat list")
            out.extend(str(item).split())
        return out
    if isinstance(value, dict):
        raise DirectiveError("a mapping is not a value here", "write a string or a list")
    if isinstance(value, bool):
        return ["yes" if value else "no"]
    return str(value).split()


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("yes", "true", "on", "1", "y"):
        return True
    if text in ("no", "false", "off", "0", "n"):
        return False
    raise DirectiveError(f"{value!r} is not a boolean", "use yes or no")


def _scalar(value: Any) -> str:
    if isinstance(value, (list, dict)):
        raise DirectiveError("expected a single value, not a list or mapping")
    if isinstance(value, bool):
        return "yes" if value else "no"
    # A number as it was written in the spec (UMask: 0077, LimitNOFILE: 1024:50), not as YAML 1.1 computed it.
    return str(getattr(value, "source", value))


# --- the kinds of directive ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Kind:
    """How one family of directives is written in YAML, in a unit file and on the bus."""

    signature: str
    # YAML value -> unit-file assignments (one per line; validated).
    assignments: Callable[[Any], list[str]]
    # one assignment -> D-Bus value(s) for this directive's bus name(s): [(bus name, value)].
    to_bus: Callable[[str, str], list[tuple[str, Any]]]


def _single(parse: Callable[[str], Any]) -> Callable[[str, str], list[tuple[str, Any]]]:
    return lambda name, text: [(name, parse(text))]


def _bool_assign(value: Any) -> list[str]:
    return ["yes" if _boolean(value) else "no"]


def _choice(*allowed: str) -> Callable[[Any], list[str]]:
    def assign(value: Any) -> list[str]:
        text = _scalar(value)
        if text not in allowed:
            raise DirectiveError(f"{text!r} is not one of {', '.join(allowed)}", _closest_hint(text, allowed))
        return [text]
    return assign


def _string_assign(value: Any) -> list[str]:
    return [_scalar(value)]


def _list_assign(value: Any) -> list[str]:
    words = _words(value)
    return [" ".join(words)] if words else [""]


def _path_list_assign(value: Any) -> list[str]:
    words = _words(value)
    for word in words:
        path = word.lstrip("-+")
        if not path.startswith("/"):
            raise DirectiveError(f"{word!r} is not an absolute path", "paths start with /; prefix - to ignore a missing one")
    return [" ".join(words)] if words else [""]


def _split_polarity(value: Any, check: Callable[[str], None]) -> list[str]:
    """Consecutive names of one polarity become one assignment (``~`` starts a deny list).

    Merging is safe: systemd treats two consecutive allow (or deny) lines as one line with both.
    """
    items = value if isinstance(value, list) else [] if value is None else [value]
    assignments: list[str] = []
    for item in items:
        text = _scalar(item).strip()
        if not text:
            continue
        deny = text.startswith("~")
        names = text.lstrip("~").split()
        for name in names:
            check(name)
        if assignments and assignments[-1].startswith("~") == deny:
            assignments[-1] += " " + " ".join(names)
        else:
            assignments.append(("~" if deny else "") + " ".join(names))
    if not assignments:
        raise DirectiveError("is empty", "list what to allow (or ~ what to deny), or remove the line for no filter")
    return assignments


def _check_syscall(name: str) -> None:
    if not SYSCALL_NAME_RE.match(name):
        raise DirectiveError(f"{name!r} is not a syscall or @group name", "e.g. @system-service, ~@mount, mlock")
    group = name.partition(":")[0]  # "@mount:EPERM": the errno is checked by systemd's own parser
    if group.startswith("@") and group not in SYSCALL_GROUPS:
        raise DirectiveError(f"{group!r} is not a syscall group of systemd, which would ignore it",
                             _closest_hint(group, SYSCALL_GROUPS) or "systemd-analyze syscall-filter lists them")


def _check_family(name: str) -> None:
    if name == "none" or name in ADDRESS_FAMILIES:
        return
    if ADDRESS_FAMILY_RE.match(name):
        raise DirectiveError(f"{name!r} is not an address family of Linux, and systemd would ignore it",
                             _closest_hint(name, ADDRESS_FAMILIES) or "e.g. AF_UNIX, AF_INET, AF_INET6, AF_NETLINK")
    raise DirectiveError(f"{name!r} is not an address family", "e.g. AF_UNIX, AF_INET, AF_INET6, AF_NETLINK")


def _bas(text: str) -> list[Any]:
    deny = text.startswith("~")
    names = text.lstrip("~").split()
    return [not deny, names]


def _families_bus(name: str, text: str) -> list[tuple[str, Any]]:
    if text.strip() == "none":  # nothing allowed: an empty allow list
        return [(name, [True, []])]
    return [(name, _bas(text))]


def _caps_assign(value: Any) -> list[str]:
    words = _words(value)
    invert = bool(words) and words[0].startswith("~")
    names = [w.lstrip("~") for w in words]
    for cap in names:
        if cap.upper() not in CAPABILITY_BITS:
            raise DirectiveError(f"{cap!r} is not a capability", _closest_hint(cap.upper(), CAPABILITIES))
    return [("~" if invert else "") + " ".join(n.upper() for n in names)]


def _caps_bus(text: str) -> int:
    invert = text.startswith("~")
    mask = 0
    for cap in text.lstrip("~").split():
        mask |= 1 << CAPABILITY_BITS[cap]
    return (~mask & ALL_CAPABILITIES) if invert else mask


def _namespaces_assign(value: Any) -> list[str]:
    if isinstance(value, bool) or (not isinstance(value, list)
                                   and _scalar(value).lower() in ("yes", "no", "true", "false")):
        return ["yes" if _boolean(value) else "no"]
    words = _words(value)
    for index, word in enumerate(words):
        # systemd reads "~" only at the very start: "~net ipc" allows all but net and ipc.
        if (word[1:] if index == 0 and word.startswith("~") else word) not in NAMESPACE_FLAGS:
            raise DirectiveError(f"{word!r} is not a namespace type",
                                 f"one of {', '.join(NAMESPACE_FLAGS)}; a leading ~ inverts the whole list")
    return [" ".join(words)]


def _namespaces_bus(text: str) -> int:
    """The namespace types *allowed* (systemd's representation): yes allows none."""
    if text in ("yes", "no"):
        return 0 if text == "yes" else ALL_NAMESPACES
    invert = text.startswith("~")
    flags = sum(NAMESPACE_FLAGS[w] for w in text.lstrip("~").split())
    return (~flags & ALL_NAMESPACES) if invert else flags


def _errno_assign(value: Any) -> list[str]:
    text = _scalar(value)
    if text.isdigit() or text in errno.__dict__ and text.startswith("E"):
        return [text]
    raise DirectiveError(f"{text!r} is not an errno name", _closest_hint(text, [n for n in errno.errorcode.values()]))


def _errno_bus(text: str) -> int:
    return int(text) if text.isdigit() else int(getattr(errno, text))


def _mode_assign(value: Any) -> list[str]:
    # Modes are octal as in a unit file, however written: 0077, 077, 77 and "0077" all mean 0o077. A plain int
    # without its source text (from Python, not YAML) is taken as the number it is.
    if isinstance(value, int) and not isinstance(value, bool) and not hasattr(value, "source"):
        mode = value
    else:
        text = _scalar(value)
        if not re.fullmatch(r"[0-7]{1,4}", text):
            raise DirectiveError(f"{text!r} is not an octal mode", "e.g. 0077")
        mode = int(text, 8)
    if not 0 <= mode <= 0o7777:
        raise DirectiveError(f"{value!r} is out of range for a mode", "e.g. 0077")
    return [f"{mode:04o}"]


def _limit_assign(value: Any) -> list[str]:
    text = _scalar(value)
    for part in text.split(":"):
        if part != "infinity" and not re.fullmatch(r"\d+[KMGT]?", part):
            raise DirectiveError(f"{text!r} is not a limit", "a number, infinity, or soft:hard")
    return [text]


def _limit_number(part: str) -> int:
    if part == "infinity":
        return UINT64_MAX
    if part[-1] in "KMGT":
        return int(part[:-1]) * SIZE_UNITS[part[-1]]
    return int(part)


def _limit_bus(name: str, text: str) -> list[tuple[str, Any]]:
    soft, _, hard = text.partition(":")
    return [(name, _limit_number(hard or soft)), (f"{name}Soft", _limit_number(soft))]


def _size_assign(value: Any) -> list[str]:
    text = _scalar(value)
    if text != "infinity" and not re.fullmatch(r"\d+[KMGT]?", text):
        raise DirectiveError(f"{text!r} is not a size", "bytes with an optional K, M, G or T suffix, or infinity")
    return [text]


def _size_bus(text: str) -> int:
    return _limit_number(text)


def _tasks_assign(value: Any) -> list[str]:
    text = _scalar(value)
    if text != "infinity" and not text.isdigit():
        raise DirectiveError(f"{text!r} is not a task count", "a number or infinity")
    return [text]


def _time_assign(value: Any) -> list[str]:
    text = _scalar(value).replace(" ", "")
    if text != "infinity" and not re.fullmatch(r"(\d+(\.\d+)?[a-z]*)+", text):
        raise DirectiveError(f"{text!r} is not a time span", "e.g. 30s, 5min, 1h, infinity")
    _time_bus(text)  # reject unknown units while the spec loads, not when the unit starts
    return [text]


def _time_bus(text: str) -> int:
    if text == "infinity":
        return UINT64_MAX
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)([a-z]*)", text):
        if unit not in TIME_UNITS and unit:
            raise DirectiveError(f"unknown time unit {unit!r}", "use us, ms, s, min or h")
        total += float(number) * TIME_UNITS[unit or "s"]
    return int(total)


def _ip_assign(value: Any) -> list[str]:
    words = _words(value)
    for word in words:
        if word in IP_SYMBOLS:
            continue
        try:
            ipaddress.ip_network(word, strict=False)
        except ValueError:
            raise DirectiveError(f"{word!r} is not an address or prefix",
                                 "e.g. 127.0.0.1, 10.0.0.0/8, ::1, any, localhost") from None
    return [" ".join(words)] if words else [""]


def _ip_bus(text: str) -> list[Any]:
    out: list[Any] = []
    for word in text.split():
        for prefix in IP_SYMBOLS.get(word, [word]):
            net = ipaddress.ip_network(prefix, strict=False)
            family = AF_INET if net.version == 4 else AF_INET6
            out.append([family, net.network_address.packed, net.prefixlen])
    return out


def _bind_assign(value: Any) -> list[str]:
    words = _words(value)
    for word in words:
        parts = word.lstrip("-").split(":")
        if not all(p.startswith("/") for p in parts[:2]) or len(parts) > 3:
            raise DirectiveError(f"{word!r} is not SOURCE[:DEST[:OPTIONS]]", "absolute paths, e.g. /srv/data:/data")
    return [" ".join(words)] if words else [""]


def _bind_bus(text: str) -> list[Any]:
    out = []
    for word in text.split():
        ignore = word.startswith("-")
        parts = word.lstrip("-").split(":")
        source, dest = parts[0], parts[1] if len(parts) > 1 else parts[0]
        flags = 0 if len(parts) > 2 and parts[2] == "norbind" else MS_REC
        out.append([source, dest, ignore, flags])
    return out


def _pairs_assign(separator: str, example: str) -> Callable[[Any], list[str]]:
    def assign(value: Any) -> list[str]:
        items = value if isinstance(value, list) else [value]
        out = []
        for item in items:
            text = _scalar(item)
            if separator not in text:
                raise DirectiveError(f"{text!r} lacks {separator!r}", f"e.g. {example}")
            out.append(text)
        return out
    return assign


def _device_bus(text: str) -> list[Any]:
    path, _, access = text.partition(" ")
    return [[path, access.strip() or "rwm"]]


def _credential_bus(text: str) -> list[Any]:
    ident, _, path = text.partition(":")
    return [[ident, path or ident]]


def _quote_environment(text: str) -> str:
    """``NAME=VALUE`` quoted when a unit file would otherwise split it at whitespace or unquote it."""
    if not re.search(r"[\s\"'\\]", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _environment_words(text: str) -> list[str]:
    """The NAME=VALUE words of one Environment= line, split and unquoted as systemd does."""
    try:
        return shlex.split(text)
    except ValueError:
        raise DirectiveError(f"{text!r} has an unbalanced quote", 'e.g. "GREETING=hello world"') from None


def _environment_assign(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [_quote_environment(f"{key}={val}") for key, val in value.items()]
    items = value if isinstance(value, list) else [value]
    for item in items:
        words = _environment_words(_scalar(item))
        if not words or not all("=" in word for word in words):
            raise DirectiveError(f"{item!r} is not NAME=VALUE", "or write a mapping NAME: VALUE")
    return [_scalar(item) for item in items]


def _socket_bind_assign(value: Any) -> list[str]:
    words = _words(value)
    for word in words:
        if word != "any" and not re.fullmatch(r"((ipv4|ipv6):)?((tcp|udp):)?(\d+(-\d+)?|any)", word):
            raise DirectiveError(f"{word!r} is not a bind rule", "e.g. any, tcp:8080, ipv6:udp:53, 1024-65535")
    return [" ".join(words)] if words else [""]


def _socket_bind_bus(text: str) -> list[Any]:
    out = []
    for word in text.split():
        family, protocol, lo, count = 0, 0, 0, 0
        for part in word.split(":"):
            if part in ("ipv4", "ipv6"):
                family = AF_INET if part == "ipv4" else AF_INET6
            elif part in ("tcp", "udp"):
                protocol = 6 if part == "tcp" else 17
            elif part != "any":
                start, _, end = part.partition("-")
                lo, count = int(start), int(end or start) - int(start) + 1
        out.append([family, protocol, count, lo])
    return out


def _strv_bus(text: str) -> list[str]:
    return text.split()


def _env_bus(name: str, text: str) -> list[tuple[str, Any]]:
    return [(name, _environment_words(text))]


BOOL = Kind("b", _bool_assign, _single(lambda t: t == "yes"))
STRING = Kind("s", _string_assign, _single(str))
STRV = Kind("as", _list_assign, _single(_strv_bus))
PATHS = Kind("as", _path_list_assign, _single(_strv_bus))
SYSCALLS = Kind("(bas)", lambda v: _split_polarity(v, _check_syscall), _single(_bas))
FAMILIES = Kind("(bas)", lambda v: _split_polarity(v, _check_family), _families_bus)
FILESYSTEMS = Kind("(bas)", lambda v: _split_polarity(v, lambda n: None), _single(_bas))
ARCHITECTURES = Kind("as", _list_assign, _single(_strv_bus))
CAPS = Kind("t", _caps_assign, _single(_caps_bus))
NAMESPACES = Kind("t", _namespaces_assign, _single(_namespaces_bus))
ERRNO = Kind("i", _errno_assign, _single(_errno_bus))
MODE = Kind("u", _mode_assign, _single(lambda t: int(t, 8)))
LIMIT = Kind("t", _limit_assign, _limit_bus)
SIZE = Kind("t", _size_assign, _single(_size_bus))
TASKS = Kind("t", _tasks_assign, _single(lambda t: UINT64_MAX if t == "infinity" else int(t)))
TIMESPAN = Kind("t", _time_assign, _single(_time_bus))
IP_PREFIXES = Kind("a(iayu)", _ip_assign, _single(_ip_bus))
BINDS = Kind("a(ssbt)", _bind_assign, _single(_bind_bus))
def _device_assign(value: Any) -> list[str]:
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        text = _scalar(item)
        path, _, access = text.partition(" ")
        if not (path.startswith(("/dev/", "char-", "block-"))) or access.strip(" rwm"):
            raise DirectiveError(f"{text!r} is not a device rule", "a /dev path, char-GROUP or block-GROUP, then r, w, m")
        out.append(text)
    return out


DEVICES = Kind("a(ss)", _device_assign, _single(_device_bus))
CREDENTIALS = Kind("a(ss)", _pairs_assign(":", "token:/etc/app/token"), _single(_credential_bus))
ENVIRONMENT = Kind("as", _environment_assign, _env_bus)
SOCKET_BIND = Kind("a(iiqq)", _socket_bind_assign, _single(_socket_bind_bus))
def _integer_in(low: int, high: int) -> Callable[[Any], list[str]]:
    def assign(value: Any) -> list[str]:
        text = _scalar(value)
        if not re.fullmatch(r"-?\d+", text) or not low <= int(text) <= high:
            raise DirectiveError(f"{text!r} is not a whole number from {low} to {high}", f"e.g. {high // 2}")
        return [text]
    return assign


NICE = Kind("i", _integer_in(-20, 19), _single(int))
OOM_SCORE = Kind("i", _integer_in(-1000, 1000), _single(int))


@dataclass(frozen=True)
class DirectiveType:
    """A known directive: its unit-file name, its kind, and its bus name when that differs."""

    name: str
    kind: Kind
    bus_name: str | None = None
    choices: tuple[str, ...] = ()


def _enum(name: str, *choices: str) -> DirectiveType:
    return DirectiveType(name, Kind("s", _choice(*choices), _single(str)), choices=choices)


_TABLE: list[DirectiveType] = [
    *(DirectiveType(n, BOOL) for n in (
        "NoNewPrivileges", "PrivateTmp", "PrivateDevices", "PrivateNetwork", "PrivateUsers", "PrivateMounts",
        "PrivateIPC", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectClock",
        "ProtectControlGroups", "ProtectHostname", "MemoryDenyWriteExecute", "RestrictRealtime",
        "RestrictSUIDSGID", "LockPersonality", "RemoveIPC", "DynamicUser", "MountAPIVFS", "IgnoreSIGPIPE",
        "IPAccounting", "MemoryAccounting", "TasksAccounting", "CPUAccounting", "IOAccounting", "Delegate",
        "RemainAfterExit",
    )),
    DirectiveType("ProtectSystem", Kind("s", lambda v: _choice("yes", "no", "full", "strict")(v), _single(str)),
                  choices=("yes", "no", "full", "strict")),
    DirectiveType("ProtectHome", Kind("s", lambda v: _choice("yes", "no", "read-only", "tmpfs")(v), _single(str)),
                  choices=("yes", "no", "read-only", "tmpfs")),
    _enum("ProtectProc", "noaccess", "invisible", "ptraceable", "default"),
    _enum("ProcSubset", "all", "pid"),
    _enum("DevicePolicy", "auto", "closed", "strict"),
    _enum("KeyringMode", "inherit", "private", "shared"),
    _enum("NotifyAccess", "none", "main", "exec", "all"),
    _enum("Restart", "no", "on-success", "on-failure", "on-abnormal", "on-watchdog", "on-abort", "always"),
    _enum("Personality", "x86", "x86-64", "arm64", "arm64-be", "arm", "arm-be", "ppc", "ppc64", "ppc64-le", "s390",
          "s390x", "mips", "mips-le"),
    *(DirectiveType(n, STRING) for n in ("User", "Group", "WorkingDirectory", "RootDirectory", "RootImage",
                                          "SyslogIdentifier", "KillMode", "PAMName")),
    *(DirectiveType(n, PATHS) for n in ("ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths", "ExecPaths",
                                         "NoExecPaths")),
    *(DirectiveType(n, STRV) for n in ("TemporaryFileSystem", "SupplementaryGroups", "StateDirectory",
                                        "CacheDirectory", "LogsDirectory", "RuntimeDirectory",
                                        "ConfigurationDirectory", "PassEnvironment", "UnsetEnvironment")),
    DirectiveType("SystemCallArchitectures", ARCHITECTURES),
    DirectiveType("SystemCallFilter", SYSCALLS),
    DirectiveType("SystemCallLog", SYSCALLS),
    DirectiveType("RestrictAddressFamilies", FAMILIES),
    DirectiveType("RestrictFileSystems", FILESYSTEMS),
    DirectiveType("CapabilityBoundingSet", CAPS),
    DirectiveType("AmbientCapabilities", CAPS),
    DirectiveType("RestrictNamespaces", NAMESPACES),
    DirectiveType("SystemCallErrorNumber", ERRNO),
    *(DirectiveType(n, MODE) for n in ("UMask", "StateDirectoryMode", "CacheDirectoryMode", "LogsDirectoryMode",
                                        "RuntimeDirectoryMode", "ConfigurationDirectoryMode")),
    *(DirectiveType(f"Limit{n}", LIMIT) for n in ("CPU", "FSIZE", "DATA", "STACK", "CORE", "RSS", "NOFILE", "AS",
                                                   "NPROC", "MEMLOCK", "LOCKS", "SIGPENDING", "MSGQUEUE", "NICE",
                                                   "RTPRIO", "RTTIME")),
    *(DirectiveType(n, SIZE) for n in ("MemoryMax", "MemoryHigh", "MemoryLow", "MemoryMin", "MemorySwapMax")),
    DirectiveType("TasksMax", TASKS),
    DirectiveType("IPAddressAllow", IP_PREFIXES),
    DirectiveType("IPAddressDeny", IP_PREFIXES),
    DirectiveType("BindPaths", BINDS),
    DirectiveType("BindReadOnlyPaths", BINDS),
    DirectiveType("DeviceAllow", DEVICES),
    DirectiveType("LoadCredential", CREDENTIALS),
    DirectiveType("Environment", ENVIRONMENT),
    DirectiveType("SocketBindAllow", SOCKET_BIND),
    DirectiveType("SocketBindDeny", SOCKET_BIND),
    DirectiveType("Nice", NICE),
    DirectiveType("OOMScoreAdjust", OOM_SCORE),
    DirectiveType("TimeoutStartSec", TIMESPAN, bus_name="TimeoutStartUSec"),
    DirectiveType("TimeoutStopSec", TIMESPAN, bus_name="TimeoutStopUSec"),
    DirectiveType("RuntimeMaxSec", TIMESPAN, bus_name="RuntimeMaxUSec"),
    DirectiveType("RestartSec", TIMESPAN, bus_name="RestartUSec"),
]
KNOWN: dict[str, DirectiveType] = {d.name: d for d in _TABLE}


def ignored_by_systemd(directives: Iterable[Directive], groups: Collection[str], known_syscalls: Collection[str],
                       systemd: str = "the machine's systemd") -> list[tuple[Directive, str, str]]:
    """What ``systemd``, with these syscall ``groups`` and ``known_syscalls``, would ignore in ``directives``'
    SystemCallFilter= and SystemCallLog=: (directive, problem, hint) for each name it does not know. It logs
    "Failed to parse system call, ignoring" and starts the service with a filter other than the spec's."""
    problems = []
    for directive in directives:
        if lookup(directive.name).kind is not SYSCALLS:
            continue
        for assignment in directive.assignments:
            for word in assignment.lstrip("~").split():
                name = word.partition(":")[0]
                table = groups if name.startswith("@") else known_syscalls
                if not table or name in table:  # nothing known to check against (systemd < 248: no @known)
                    continue
                what = "syscall group" if name.startswith("@") else "syscall"
                hint = "a newer systemd has it: list its syscalls instead" if name in SYSCALL_GROUPS else \
                    _closest_hint(name, sorted(table)) or "systemd-analyze syscall-filter lists them"
                problem = (f"{systemd} does not know the {what} {name!r} and would ignore it: the filter would "
                           "not be the one written here")
                problems.append((directive, problem, hint))
    return problems


def _closest_hint(word: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    if not close:
        lowered = {c.lower(): c for c in candidates}
        close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
        close = [lowered[c] for c in close]
    return f"did you mean {close[0]}?" if close else ""


def lookup(name: str) -> DirectiveType:
    try:
        return KNOWN[name]
    except KeyError:
        hint = _closest_hint(name, list(KNOWN)) or "see `man systemd.exec` and docs/spec.md for the supported directives"
        raise DirectiveError("unknown directive", hint) from None


@dataclass(frozen=True)
class Directive:
    """One directive of a spec, parsed: its unit-file assignments, in order."""

    name: str
    assignments: tuple[str, ...]
    line: int | None = None
    # The file it is written in, when that is not the spec: a unit file (a unit's own hardening, see unit.py).
    source: str = ""

    @classmethod
    def parse(cls, name: str, value: Any, line: int | None = None) -> Directive:
        directive_type = lookup(name)
        return cls(name, tuple(directive_type.kind.assignments(value)), line)

    @property
    def type(self) -> DirectiveType:
        return KNOWN[self.name]

    @property
    def value(self) -> str:
        """The assignments joined as they read in a drop-in (for messages)."""
        return " ".join(a for a in self.assignments)

    def unit_lines(self) -> list[str]:
        return [f"{self.name}={assignment}" for assignment in self.assignments]

    def properties(self) -> list[Property]:
        """The typed (name, Variant) pairs for StartTransientUnit, in assignment order."""
        kind = self.type.kind
        bus_name = self.type.bus_name or self.name
        out: list[Property] = []
        for assignment in self.assignments:
            for name, value in kind.to_bus(bus_name, assignment):
                signature = "t" if name.endswith("Soft") and kind is LIMIT else kind.signature
                out.append((name, Variant(signature, value)))
        return out

    def __str__(self) -> str:
        return "; ".join(self.unit_lines())


def render_dropin(directives: Sequence[Directive], header: str = "") -> str:
    """A ``[Service]`` drop-in with every directive, ready to paste into ``/etc/systemd/system/UNIT.d/``."""
    lines = [f"# {line}" for line in header.splitlines()] if header else []
    lines.append("[Service]")
    for directive in directives:
        lines.extend(directive.unit_lines())
    return "\n".join(lines) + "\n"
