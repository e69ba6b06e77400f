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
import platform
import re
import shlex
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from dbus_next.signature import Variant

from ..kernel.flags import CAPABILITIES, CAPABILITY_BITS, NAMESPACE_FLAGS

Property = tuple[str, Variant]


class DirectiveError(ValueError):
    def __init__(self, problem: str, hint: str = "") -> None:
        self.problem = problem
        self.hint = hint
        super().__init__(problem + (f" ({hint})" if hint else ""))


# --- value vocabularies ---------------------------------------------------------------------------------------

ALL_CAPABILITIES = (1 << len(CAPABILITIES)) - 1

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
# A syscall (mlock, _llseek) or a @group, optionally with :ERRNO. Not a number: systemd would ignore "42".
SYSCALL_NAME_RE = re.compile(r"^(@[a-z][a-z0-9-]*|[a-z_][a-z0-9_]*)(:[A-Za-z0-9_]+)?$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
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
ERRNO_MAX = 4095  # systemd's ERRNO_MAX: the highest errno it accepts
MS_REC = 16384


# Personality= takes only what the host can run (systemd answers "Invalid Personality setting: arm64" on x86-64):
# the machine shares the host's kernel, so its architecture decides.
ALL_PERSONALITIES = ("x86", "x86-64", "arm64", "arm64-be", "arm", "arm-be", "ppc", "ppc64", "ppc64-le", "s390",
                     "s390x", "mips", "mips-le")
PERSONALITIES = {"x86_64": ("x86", "x86-64"), "i686": ("x86",), "aarch64": ("arm64", "arm"),
                 "s390x": ("s390x", "s390"), "ppc64le": ("ppc64-le",), "ppc64": ("ppc64", "ppc")}


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
            if item is None:
                raise DirectiveError("a list item is null", "remove it, or quote it if the word is meant")
            out.extend(_scalar(item).split())
        return out
    if isinstance(value, dict):
        raise DirectiveError("a mapping is not a value here", "write a string or a list")
    return _scalar(value).split()


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


PATH_MAX = 4096
NAME_MAX = 255


def path_problem(path: str) -> str:
    """What systemd would refuse in an absolute path (path_simplify_and_warn(PATH_CHECK_ABSOLUTE)), or ""."""
    if not path.startswith("/"):
        return "is not an absolute path"
    if len(path.encode()) >= PATH_MAX:
        return f"is longer than PATH_MAX ({PATH_MAX} bytes)"
    if any(part in (".", "..") for part in path.split("/")):
        return "is not normalized (no . or .. components: systemd refuses them)"
    if any(len(part.encode()) > NAME_MAX for part in path.split("/")):
        return f"has a component longer than NAME_MAX ({NAME_MAX} bytes)"
    return ""


def _absolute(word: str, what: str = "path", example: str = "/var/lib/app") -> str:
    problem = path_problem(word)
    if problem:
        raise DirectiveError(f"{word!r} {problem}", f"an absolute, normalized {what}, e.g. {example}")
    return word


def _relative_directory(word: str) -> None:
    """StateDirectory= and friends: relative to /var/lib etc., normalized, never climbing out of it."""
    if word.startswith("/") or any(part in ("", ".", "..") for part in word.split("/")):
        raise DirectiveError(f"{word!r} is not a directory name below the base directory",
                             "relative and normalized, e.g. app or app/cache (no /, ., .. or //)")
    if any(len(part.encode()) > NAME_MAX for part in word.split("/")):
        raise DirectiveError(f"{word[:40]!r}... has a component longer than NAME_MAX ({NAME_MAX} bytes)",
                             "systemd refuses it: path is not normalized")
    if word.split("/")[0] == "private":  # systemd keeps /var/lib/private etc. for DynamicUser=
        raise DirectiveError(f"{word!r}: 'private' is reserved by systemd", "choose another name, e.g. app")


def _check_user(name: str) -> None:
    """A user or group name as systemd's valid_user_group_name(VALID_USER_RELAX|VALID_USER_ALLOW_NUMERIC) takes
    it, minus whitespace (which useradd refuses anyway): a name, or a numeric ID that is not 65535 or 2**32-1."""
    if re.fullmatch(r"-?[0-9]+", name):
        if name.startswith("-") or int(name) >= 2**32 - 1 or int(name) == 65535:
            raise DirectiveError(f"{name!r} is not a valid user or group ID", "0-4294967294, not 65535")
        return
    if (not name or len(name) > 256 or re.search(r"[\s:/]", name) or name.startswith("-")
            or name in (".", "..")):
        raise DirectiveError(f"{name!r} is not a user or group name",
                             "e.g. app or 1000; no whitespace, : or /, not starting with -")


def _user_assign(value: Any) -> list[str]:
    text = _scalar(value)
    if text:
        _check_user(text)
    return [text]


def _working_directory_assign(value: Any) -> list[str]:
    text = _scalar(value)
    if text and text not in ("~", "-~"):
        _absolute(text.removeprefix("-"), "directory (or ~)", "/opt/app")
    return [text]


def _absolute_assign(value: Any) -> list[str]:
    text = _scalar(value)
    if text:
        _absolute(text)
    return [text]


def _words_each(check: Callable[[str], None]) -> Callable[[Any], list[str]]:
    def assign(value: Any) -> list[str]:
        words = _words(value)
        for word in words:
            check(word)
        return [" ".join(words)] if words else [""]
    return assign


def _check_env_name(word: str) -> None:
    if not ENV_NAME_RE.match(word):
        raise DirectiveError(f"{word!r} is not an environment variable name",
                             "letters, digits and _, not starting with a digit, e.g. APP_MODE")


def _check_unset(word: str) -> None:
    _check_env_name(word.partition("=")[0])


def _check_temporary_fs(word: str) -> None:
    path, _, _options = word.partition(":")
    _absolute(path, "mount point", "/var:ro")


def _temporary_fs_bus(text: str) -> list[Any]:
    """TemporaryFileSystem= on the bus is a(ss): (mount point, options); systemd-run splits PATH:OPTIONS."""
    return [list(word.partition(":")[::2]) for word in text.split()]


# seccomp_arch_from_string() in src/shared/seccomp-util.c: the names SystemCallArchitectures= takes, as the
# machine's systemd (252, Debian bookworm) has them: loongarch64 came later, and 252 answers "Invalid argument".
ARCHITECTURE_NAMES = (
    "native", "x86", "x86-64", "x32", "arm", "arm64", "mips", "mips64", "mips64-n32", "mips-le",
    "mips64-le", "mips64-le-n32", "parisc", "parisc64", "ppc", "ppc64", "ppc64-le", "riscv64", "s390", "s390x",
)


def _check_architecture(word: str) -> None:
    if word not in ARCHITECTURE_NAMES:
        raise DirectiveError(f"{word!r} is not a system call architecture",
                             _closest_hint(word, ARCHITECTURE_NAMES) or "e.g. native")


# systemd's file system sets (src/shared/filesystems.c), which RestrictFileSystems= takes besides type names.
FILESYSTEM_GROUPS = ("@anonymous", "@application", "@auxiliary-api", "@basic-api", "@common-block",
                     "@historical-block", "@known", "@network", "@privileged-api", "@security", "@temporary")


def _check_filesystem(name: str) -> None:
    if name.startswith("@"):
        if name not in FILESYSTEM_GROUPS:
            raise DirectiveError(f"{name!r} is not a file system set of systemd, which would ignore it",
                                 _closest_hint(name, FILESYSTEM_GROUPS) or f"one of {', '.join(FILESYSTEM_GROUPS)}")
    elif not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", name):
        raise DirectiveError(f"{name!r} is not a file system type", "e.g. ext4, tmpfs, @basic-api")


def _list_assign(value: Any) -> list[str]:
    words = _words(value)
    return [" ".join(words)] if words else [""]


def _path_list_assign(value: Any) -> list[str]:
    words = _words(value)
    for word in words:
        prefix = re.match(r"^(-\+?|\+-?)?", word)
        path = word[prefix.end() if prefix else 0:]
        if not path.startswith("/"):
            raise DirectiveError(f"{word!r} is not an absolute path",
                                 "paths start with /; prefix - to ignore a missing one")
        _absolute(path)
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
            if ":" in name and not deny:
                # seccomp_parse_syscall_filter(): an errno only means something for a denied call; systemd
                # answers "Invalid argument" over D-Bus and ignores the line in a unit file.
                raise DirectiveError(f"{name!r}: an errno is only allowed in a deny list",
                                     f"write it as a deny item, e.g. \"~{name}\", or use SystemCallErrorNumber")
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
    group, _, action = name.partition(":")  # "@mount:EPERM"
    if action:
        _errno_assign(action)
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
    if re.fullmatch(r"[0-9]+", text):
        if not 1 <= int(text) <= ERRNO_MAX:
            raise DirectiveError(f"{text} is not an errno number", f"1-{ERRNO_MAX}, or a name such as EPERM")
        return [text]
    if text in errno.__dict__ and text.startswith("E"):
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


# How systemd's rlimit_parse() reads each resource: sizes take K/M/G/T, counts and times are plain numbers.
SIZE_LIMITS = ("FSIZE", "DATA", "STACK", "CORE", "RSS", "AS", "MEMLOCK", "MSGQUEUE")


def _limit_assign_for(resource: str) -> Callable[[Any], list[str]]:
    sized = resource in SIZE_LIMITS
    pattern = r"[0-9]+[KMGT]?" if sized else r"[0-9]+"
    hint = ("bytes with an optional K, M, G or T, infinity, or soft:hard" if sized
            else "a plain number (no K/M/G suffix for this limit), infinity, or soft:hard")

    def assign(value: Any) -> list[str]:
        text = _scalar(value)
        parts = text.split(":")
        if len(parts) > 2 or not all(part == "infinity" or re.fullmatch(pattern, part) for part in parts):
            raise DirectiveError(f"{text!r} is not a limit", hint)
        numbers = [_limit_number(part) for part in parts]
        if any(n > UINT64_MAX for n in numbers) or any(n == UINT64_MAX and p != "infinity"
                                                      for n, p in zip(numbers, parts)):
            raise DirectiveError(f"{text!r} is out of range", "at most 2^64-2, or infinity")
        if resource == "NICE" and any(n > 40 and n != UINT64_MAX for n in numbers):
            raise DirectiveError(f"{text!r} is out of range for LimitNICE", "0-40 (20 - nice value)")
        if len(numbers) == 2 and numbers[0] > numbers[1]:
            raise DirectiveError(f"{text!r}: the soft limit is above the hard limit",
                                 "systemd refuses it; write soft:hard with soft <= hard")
        return [text]
    return assign


def _limit_number(part: str) -> int:
    if part == "infinity":
        return UINT64_MAX
    if part[-1] in "KMGT":
        return int(part[:-1]) * SIZE_UNITS[part[-1]]
    return int(part)


def _limit_bus(name: str, text: str) -> list[tuple[str, Any]]:
    soft, _, hard = text.partition(":")
    return [(name, _limit_number(hard or soft)), (f"{name}Soft", _limit_number(soft))]


def _size_assign_for(zero_allowed: bool) -> Callable[[Any], list[str]]:
    def assign(value: Any) -> list[str]:
        text = _scalar(value)
        if text != "infinity" and not re.fullmatch(r"[0-9]+[KMGT]?", text):
            raise DirectiveError(f"{text!r} is not a size", "bytes with an optional K, M, G or T suffix, or infinity")
        if text != "infinity" and _limit_number(text) >= UINT64_MAX:
            raise DirectiveError(f"{text!r} is out of range", "at most 2^64-2 bytes, or infinity")
        if not zero_allowed and text != "infinity" and _limit_number(text) == 0:
            # config_parse_memory_limit: "Memory limit '0' out of range, ignoring" - the drop-in would lose it,
            # though D-Bus takes it: the unit shipped would not be the one tested.
            raise DirectiveError("0 is out of range here", "systemd ignores a zero limit in a unit file; at least 1")
        return [text]
    return assign


def _size_bus(text: str) -> int:
    return _limit_number(text)


def _tasks_assign(value: Any) -> list[str]:
    text = _scalar(value)
    if text != "infinity" and not re.fullmatch(r"[0-9]+", text):
        raise DirectiveError(f"{text!r} is not a task count", "a number or infinity")
    if text != "infinity" and not 1 <= int(text) < UINT64_MAX:
        raise DirectiveError(f"{text} is out of range for a task count", "1 or more, or infinity")
    return [text]


def _time_assign(value: Any) -> list[str]:
    text = _scalar(value).replace(" ", "")
    if text != "infinity" and not re.fullmatch(r"(\d+(\.\d+)?[a-z]*)+", text):
        raise DirectiveError(f"{text!r} is not a time span", "e.g. 30s, 5min, 1h, infinity")
    if _time_bus(text) >= UINT64_MAX and text != "infinity":  # also rejects unknown units, here
        raise DirectiveError(f"{text!r} is out of range", "write infinity for no limit")
    return [text]


def _timeout_assign(value: Any) -> list[str]:
    """A time span that must not be 0: a unit file reads TimeoutStartSec=0 and TimeoutStopSec=0 as "no timeout"
    (parse_sec_fix_0), D-Bus as an immediate one, so the test would not be the unit shipped; RuntimeMaxSec=0
    stops the service at once either way."""
    assignments = _time_assign(value)
    if assignments[0] != "infinity" and _time_bus(assignments[0]) == 0:
        raise DirectiveError(f"{assignments[0]!r} is a timeout of 0", "write infinity for no timeout")
    return assignments


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
        parts = word.removeprefix("-").split(":")
        if not all(p.startswith("/") for p in parts[:2]) or len(parts) > 3:
            raise DirectiveError(f"{word!r} is not SOURCE[:DEST[:OPTIONS]]", "absolute paths, e.g. /srv/data:/data")
        for part in parts[:2]:
            _absolute(part)
        if len(parts) == 3 and parts[2] not in ("rbind", "norbind"):
            raise DirectiveError(f"{parts[2]!r} is not a bind option", "rbind or norbind")
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
            ident, _, path = text.partition(separator)
            if not ident or "/" in ident or ident in (".", "..") or len(ident) > 255:
                raise DirectiveError(f"{ident!r} is not a credential name", "a file name, e.g. token")
            if not path or path.startswith("/") and path_problem(path):
                raise DirectiveError(f"{path!r} {path_problem(path) or 'is empty'}", f"e.g. {example}")
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
        out = []
        for key, val in value.items():
            _check_env_name(str(key))
            if val is None or isinstance(val, (list, dict, bool)):
                raise DirectiveError(f"{key}: expected text, got {'null' if val is None else type(val).__name__}",
                                     "quote it; write '' for an empty value")
            text = _scalar(val)
            if "\t" in text:
                raise DirectiveError(f"{key}: contains a tab", "systemd refuses control characters in a value")
            out.append(_quote_environment(f"{key}={text}"))
        return out
    items = value if isinstance(value, list) else [value]
    for item in items:
        words = _environment_words(_scalar(item))
        if not words or not all("=" in word for word in words):
            raise DirectiveError(f"{item!r} is not NAME=VALUE", "or write a mapping NAME: VALUE")
        for word in words:
            _check_env_name(word.partition("=")[0])
    return [_scalar(item) for item in items]


def _socket_bind_assign(value: Any) -> list[str]:
    words = _words(value)
    for word in words:
        found = re.fullmatch(r"((ipv4|ipv6):)?((tcp|udp):)?([0-9]+(-[0-9]+)?|any)", word)
        if word != "any" and not found:
            raise DirectiveError(f"{word!r} is not a bind rule", "e.g. any, tcp:8080, ipv6:udp:53, 1024-65535")
        ports = found.group(5) if found else "any"
        if ports != "any":
            low, _, high = ports.partition("-")
            if not 1 <= int(low) <= int(high or low) <= 65535:
                raise DirectiveError(f"{word!r}: {ports} is not a port or port range", "ports 1-65535, low-high")
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
FILESYSTEMS = Kind("(bas)", lambda v: _split_polarity(v, _check_filesystem), _single(_bas))
ARCHITECTURES = Kind("as", _words_each(_check_architecture), _single(_strv_bus))
USER = Kind("s", _user_assign, _single(str))
ABSOLUTE = Kind("s", _absolute_assign, _single(str))
WORKING_DIRECTORY = Kind("s", _working_directory_assign, _single(str))
DIRECTORIES = Kind("as", _words_each(_relative_directory), _single(_strv_bus))
GROUPS = Kind("as", _words_each(_check_user), _single(_strv_bus))
ENV_NAMES = Kind("as", _words_each(_check_env_name), _single(_strv_bus))
UNSET_ENV = Kind("as", _words_each(_check_unset), _single(_strv_bus))
TEMPORARY_FS = Kind("a(ss)", _words_each(_check_temporary_fs), _single(_temporary_fs_bus))
CAPS = Kind("t", _caps_assign, _single(_caps_bus))
NAMESPACES = Kind("t", _namespaces_assign, _single(_namespaces_bus))
ERRNO = Kind("i", _errno_assign, _single(_errno_bus))
MODE = Kind("u", _mode_assign, _single(lambda t: int(t, 8)))
LIMITS = {resource: Kind("t", _limit_assign_for(resource), _limit_bus) for resource in (
    "CPU", "FSIZE", "DATA", "STACK", "CORE", "RSS", "NOFILE", "AS", "NPROC", "MEMLOCK", "LOCKS", "SIGPENDING",
    "MSGQUEUE", "NICE", "RTPRIO", "RTTIME")}
SIZE = Kind("t", _size_assign_for(zero_allowed=False), _single(_size_bus))
SIZE_OR_ZERO = Kind("t", _size_assign_for(zero_allowed=True), _single(_size_bus))
TASKS = Kind("t", _tasks_assign, _single(lambda t: UINT64_MAX if t == "infinity" else int(t)))
TIMESPAN = Kind("t", _time_assign, _single(_time_bus))
TIMEOUT = Kind("t", _timeout_assign, _single(_time_bus))
IP_PREFIXES = Kind("a(iayu)", _ip_assign, _single(_ip_bus))
BINDS = Kind("a(ssbt)", _bind_assign, _single(_bind_bus))
def _device_assign(value: Any) -> list[str]:
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        text = _scalar(item)
        path, _, access = text.partition(" ")
        if not (path.startswith(("/dev/", "char-", "block-"))) or access.strip(" rwm"):
            raise DirectiveError(f"{text!r} is not a device rule",
                                 "a /dev path, char-GROUP or block-GROUP, then r, w, m")
        if path.startswith("/"):
            _absolute(path, "device path", "/dev/null")
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
    _enum("Personality", *PERSONALITIES.get(platform.machine(), ALL_PERSONALITIES)),
    *(DirectiveType(n, USER) for n in ("User", "Group")),
    DirectiveType("WorkingDirectory", WORKING_DIRECTORY),
    *(DirectiveType(n, ABSOLUTE) for n in ("RootDirectory", "RootImage")),
    *(DirectiveType(n, STRING) for n in ("SyslogIdentifier", "PAMName")),
    _enum("KillMode", "control-group", "mixed", "process", "none"),
    *(DirectiveType(n, PATHS) for n in ("ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths", "ExecPaths",
                                         "NoExecPaths")),
    *(DirectiveType(n, DIRECTORIES) for n in ("StateDirectory", "CacheDirectory", "LogsDirectory", "RuntimeDirectory",
                                               "ConfigurationDirectory")),
    DirectiveType("TemporaryFileSystem", TEMPORARY_FS),
    DirectiveType("SupplementaryGroups", GROUPS),
    DirectiveType("PassEnvironment", ENV_NAMES),
    DirectiveType("UnsetEnvironment", UNSET_ENV),
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
    *(DirectiveType(f"Limit{resource}", kind) for resource, kind in LIMITS.items()),
    *(DirectiveType(n, SIZE) for n in ("MemoryMax", "MemoryHigh")),
    *(DirectiveType(n, SIZE_OR_ZERO) for n in ("MemoryLow", "MemoryMin", "MemorySwapMax")),
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
    DirectiveType("TimeoutStartSec", TIMEOUT, bus_name="TimeoutStartUSec"),
    DirectiveType("TimeoutStopSec", TIMEOUT, bus_name="TimeoutStopUSec"),
    DirectiveType("RuntimeMaxSec", TIMEOUT, bus_name="RuntimeMaxUSec"),
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
        hint = (_closest_hint(name, list(KNOWN))
                or "see `man systemd.exec` and docs/spec.md for the supported directives")
        raise DirectiveError("unknown directive", hint) from None


@dataclass(frozen=True)
class Directive:
    """One directive of a spec, parsed: its unit-file assignments, in order."""

    name: str
    assignments: tuple[str, ...]
    line: int | None = None
    # The file it is written in, when that is not the spec: a unit file (a unit's own hardening, see
    # unit/under_test.py).
    source: str = ""

    @classmethod
    def parse(cls, name: str, value: Any, line: int | None = None) -> Directive:
        directive_type = lookup(name)
        assignments = tuple(directive_type.kind.assignments(value))
        for assignment in assignments:
            _check_one_line(assignment)
        return cls(name, assignments, line)

    @property
    def type(self) -> DirectiveType:
        return KNOWN[self.name]

    @property
    def value(self) -> str:
        """The assignments joined as they read in a drop-in (for messages)."""
        return " ".join(a for a in self.assignments)

    def unit_lines(self) -> list[str]:
        """``Name=value`` as systemd-run -p and messages take it (no specifier escaping: see dropin_lines)."""
        return [f"{self.name}={assignment}" for assignment in self.assignments]

    def dropin_lines(self) -> list[str]:
        """The lines of a unit file or drop-in: there % starts a specifier (%n, %i), so a literal % is %%."""
        return [f"{self.name}={escape_specifiers(assignment)}" for assignment in self.assignments]

    def properties(self) -> list[Property]:
        """The typed (name, Variant) pairs for StartTransientUnit, in assignment order."""
        kind = self.type.kind
        bus_name = self.type.bus_name or self.name
        out: list[Property] = []
        for assignment in self.assignments:
            for name, value in kind.to_bus(bus_name, assignment):
                signature = "t" if name.endswith("Soft") and kind in LIMITS.values() else kind.signature
                out.append((name, Variant(signature, value)))
        return out

    def __str__(self) -> str:
        return "; ".join(self.unit_lines())


def render_dropin(directives: Sequence[Directive], header: str = "") -> str:
    """A ``[Service]`` drop-in with every directive, ready to paste into ``/etc/systemd/system/UNIT.d/``.

    It is read back as systemd reads it and compared with the directives: a drop-in that would not mean what was
    tested raises DropinMismatch instead of being shown."""
    return render_assignments([(d.name, a) for d in directives for a in d.assignments], header)


def render_assignments(assignments: Sequence[tuple[str, str]], header: str = "") -> str:
    """A ``[Service]`` section of ``Name=value`` lines, verified by reading it back (see :func:`parse_dropin`)."""
    lines = [f"# {line}" for line in header.splitlines()] if header else []
    lines.append("[Service]")
    lines.extend(f"{name}={escape_specifiers(value)}" for name, value in assignments)
    text = "\n".join(lines) + "\n"
    verify_dropin(text, assignments)
    return text


class DropinMismatch(ValueError):
    """A rendered drop-in that systemd would read differently from the directives that were tested."""


# systemd's unit-file reader (src/shared/conf-parser.c): lines split at \n (and \r, \0), comments start with # or
# ;, a trailing backslash joins the next line, whitespace around the key, = and value is dropped.
_UNIT_WHITESPACE = " \t\n\r"


def escape_specifiers(value: str) -> str:
    return value.replace("%", "%%")


def _check_one_line(assignment: str) -> None:
    """A value that a unit file can hold as written: one line, nothing systemd's reader would trim or join."""
    bad = re.search(r"[\x00-\x08\x0a-\x1f\x7f]", assignment)  # a tab inside a value is kept as is
    if bad:
        raise DirectiveError(f"contains control character U+{ord(bad.group()):04X}",
                             "a unit-file value is one line of text")
    if assignment != assignment.strip(_UNIT_WHITESPACE):
        raise DirectiveError(f"{assignment!r} starts or ends with whitespace",
                             "a unit file drops it, so the drop-in would differ from what was tested")
    if assignment.endswith("\\"):
        raise DirectiveError(f"{assignment!r} ends with a backslash",
                             "in a unit file it would join the next line to this one")


def parse_dropin(text: str) -> list[tuple[str, str]]:
    """The (name, value) assignments of a [Service] drop-in, read as systemd's config parser reads them."""
    out: list[tuple[str, str]] = []
    pending = ""
    section = None
    for raw in re.split(r"[\n\r\x00]", text):
        if pending and raw.lstrip(_UNIT_WHITESPACE).startswith(("#", ";")):
            continue  # systemd skips comment lines inside a continuation
        line = pending + raw
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        line = line.strip(_UNIT_WHITESPACE)
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        if section != "Service" or "=" not in line:
            raise DropinMismatch(f"line {line!r} is not an assignment in [Service]")
        name, _, value = line.partition("=")
        out.append((name.strip(_UNIT_WHITESPACE), _unescape_specifiers(value.strip(_UNIT_WHITESPACE))))
    return out


def _unescape_specifiers(value: str) -> str:
    def one(match: re.Match[str]) -> str:
        if match.group() != "%%":
            raise DropinMismatch(f"{value!r}: {match.group()} is a specifier systemd would expand")
        return "%"
    return re.sub(r"%.?", one, value)


def verify_dropin(text: str, assignments: Sequence[tuple[str, str]]) -> None:
    """Raise DropinMismatch unless ``text`` reads back as exactly ``assignments``, in order."""
    found = parse_dropin(text)
    expected = list(assignments)
    if found == expected:
        return
    for index, (want, got) in enumerate(zip(expected, found)):
        if want != got:
            raise DropinMismatch(f"the drop-in would set {got[0]}={got[1]!r} where {want[0]}={want[1]!r} was "
                                 f"tested (assignment {index + 1})")
    extra = found[len(expected):] or expected[len(found):]
    raise DropinMismatch(f"the drop-in has {len(found)} assignments where {len(expected)} were tested "
                         f"(first difference: {extra[0][0]}={extra[0][1]!r})")
