"""What a service and its scenarios actually did, read from strace, and what that predicts for each tightening.

:func:`parse_strace` turns the output of ``strace -f -qq -y`` (one traced run of the service, or of one inside
command) into an :class:`Observation`: the syscalls attempted, the socket families opened, the paths written,
read and executed, the addresses bound, reached and accepted from, the namespaces made, the capabilities the
calls imply, and the few calls that specific directives forbid (writable-and-executable memory, realtime
scheduling, setuid bits, personality changes).

:func:`forecast` reads an observation against one tightening step and says whether the step fits as it is,
fits in a narrower form (an allow list holding what was used, the directories written granted), or conflicts
with something observed. Tighten uses the forecast to order and pre-narrow its search; the scenarios stay the
judge, so a wrong forecast costs a run, never a wrong result. The same forecast applied without any checking is what a
profile-only suggester proposes from one observed run (:func:`pytest_systemd_harden.search.tighten.profile_only`).

Everything here is plain text processing: the traced run itself is
:func:`pytest_systemd_harden.search.scenarios.observe`.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields

from ..kernel.flags import CAPABILITIES, NAMESPACE_FLAGS
from ..spec.directives import Directive
from .diagnosis import ADDRESS_FAMILIES, SERVICE_DIRECTORIES, expand_group

# --- strace's output -----------------------------------------------------------------------------------------

_LINE_RE = re.compile(r"^(?:\[pid\s+)?(\d+)\]?\s+(.*)$")
_CALL_RE = re.compile(r"^([a-z_][a-z0-9_]*)\((.*)$", re.DOTALL)
_RESUMED_RE = re.compile(r"^<\.\.\. ([a-z_][a-z0-9_]*) resumed>(.*)$", re.DOTALL)
_RETURN_RE = re.compile(r"\)\s+= ")
_RESULT_RE = re.compile(r"^(-?\d+|0x[0-9a-f]+|\?)(<[^>]*>)?(?:\(deleted\))?(?: ([A-Z][A-Z0-9_]+))?", re.DOTALL)
_FD_RE = re.compile(r"^(-?\d+|AT_FDCWD)<(.*)>(?:\(deleted\))?$", re.DOTALL)
_INET_RE = re.compile(r"sa_family=AF_INET6?,\s*sin6?_port=htons\((\d+)\).*?"
                      r"(?:inet_addr\(\"([^\"]+)\"\)|inet_pton\(AF_INET6,\s*\"([^\"]+)\")", re.DOTALL)
_UNIX_RE = re.compile(r"sa_family=AF_UNIX,\s*sun_path=(@?)\"((?:[^\"\\]|\\.)*)\"")
_NEW_NAMESPACES = {"CLONE_NEWNS": "mnt", "CLONE_NEWUTS": "uts", "CLONE_NEWIPC": "ipc", "CLONE_NEWUSER": "user",
                   "CLONE_NEWPID": "pid", "CLONE_NEWNET": "net", "CLONE_NEWCGROUP": "cgroup"}
_FORKS = frozenset({"clone", "clone3", "fork", "vfork"})

# (syscall, index of the dirfd argument or None, index of the path argument, what the call does to the path)
_PATH_CALLS: dict[str, tuple[int | None, int, str]] = {
    "open": (None, 0, "open"), "creat": (None, 0, "create"), "openat": (0, 1, "open"), "openat2": (0, 1, "open"),
    "execve": (None, 0, "exec"), "execveat": (0, 1, "exec"),
    "mkdir": (None, 0, "create"), "mkdirat": (0, 1, "create"), "mknod": (None, 0, "create"),
    "mknodat": (0, 1, "create"), "unlink": (None, 0, "write"), "unlinkat": (0, 1, "write"),
    "rmdir": (None, 0, "write"), "truncate": (None, 0, "write"), "chmod": (None, 0, "write"),
    "fchmodat": (0, 1, "write"), "chown": (None, 0, "write"), "lchown": (None, 0, "write"),
    "fchownat": (0, 1, "write"), "utimensat": (0, 1, "write"), "utime": (None, 0, "write"),
    "utimes": (None, 0, "write"), "futimesat": (0, 1, "write"), "setxattr": (None, 0, "write"),
    "lsetxattr": (None, 0, "write"), "removexattr": (None, 0, "write"), "lremovexattr": (None, 0, "write"),
    "stat": (None, 0, "stat"), "lstat": (None, 0, "stat"), "newfstatat": (0, 1, "stat"), "statx": (0, 1, "stat"),
    "access": (None, 0, "stat"), "faccessat": (0, 1, "stat"), "faccessat2": (0, 1, "stat"),
    "readlink": (None, 0, "stat"), "readlinkat": (0, 1, "stat"), "chdir": (None, 0, "stat"),
    "statfs": (None, 0, "stat"), "getxattr": (None, 0, "stat"), "lgetxattr": (None, 0, "stat"),
}
DENIAL_ERRORS = ("EROFS", "EACCES", "EPERM", "ENOENT")
HIDDEN_BY_SANDBOX = ("/dev/", "/tmp/", "/var/tmp/", "/home/", "/root/", "/run/user/")
# Calls with two paths, both written: (dirfd, path) pairs.
_TWO_PATH_CALLS: dict[str, tuple[tuple[int | None, int], ...]] = {
    "rename": ((None, 0), (None, 1)), "renameat": ((0, 1), (2, 3)), "renameat2": ((0, 1), (2, 3)),
    "link": ((None, 1),), "linkat": ((2, 3),), "symlink": ((None, 1),), "symlinkat": ((1, 2),),
}
# Calls whose first argument is an fd they change the file of.
_FD_WRITES = frozenset({"fchmod", "fchown", "ftruncate", "fsetxattr", "fremovexattr"})


def split_args(text: str) -> list[str]:
    """strace's argument list, split at the top-level commas (strings, braces and brackets kept whole)."""
    args, depth, current, quoted, escaped = [], 0, [], False, False
    for char in text:
        if quoted:
            current.append(char)
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
            continue
        if char == '"':
            quoted = True
        elif char in "{[(<":  # <...>: the path strace -y shows for an fd
            depth += 1
        elif char in "}])>":
            depth -= 1
        elif char == "," and depth == 0:
            args.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    if "".join(current).strip():
        args.append("".join(current).strip())
    return args


def _unquote(arg: str) -> str | None:
    """A C string argument as strace prints it ("..." with escapes), or None (a pointer strace could not read)."""
    match = re.match(r'^"((?:[^"\\]|\\.)*)"', arg)
    if match is None:
        return None
    raw = match.group(1)
    out = bytearray()
    i = 0
    while i < len(raw):
        char = raw[i]
        if char != "\\" or i + 1 == len(raw):
            out += char.encode()
            i += 1
            continue
        nxt = raw[i + 1]
        if nxt == "x" and re.match(r"[0-9a-fA-F]{2}", raw[i + 2:i + 4]):
            out.append(int(raw[i + 2:i + 4], 16))
            i += 4
        elif nxt in "01234567":
            digits = re.match(r"[0-7]{1,3}", raw[i + 1:])
            assert digits is not None
            out.append(int(digits.group(0), 8) & 0xFF)
            i += 1 + len(digits.group(0))
        else:
            out += {"n": b"\n", "t": b"\t", "r": b"\r", "v": b"\v", "f": b"\f"}.get(nxt, nxt.encode())
            i += 2
    return out.decode(errors="surrogateescape")


def _fd_path(arg: str) -> str | None:
    """The path strace -y shows for an fd argument (``3</etc/passwd>``, ``AT_FDCWD</var/lib>``), if a file."""
    match = _FD_RE.match(arg.strip())
    if match is None or not match.group(2).startswith("/"):
        return None
    return match.group(2)


def normalize(path: str) -> str:
    """An absolute path without ``.``, ``..``, doubled slashes, or DynamicUser's ``private/`` indirection."""
    path = posixpath.normpath(path)
    path = "/" + path.lstrip("/")
    for prefix in ("/var/lib/private/", "/var/cache/private/", "/var/log/private/"):
        if path.startswith(prefix):
            path = prefix.removesuffix("private/") + path[len(prefix):]
    return path


def _mode(arg: str) -> int | None:
    """A mode argument (``0755``, ``S_ISUID|0755``, ``S_IFCHR|0600``) as a number, or None."""
    value = 0
    for part in arg.split("|"):
        part = part.strip()
        named = {"S_ISUID": 0o4000, "S_ISGID": 0o2000, "S_ISVTX": 0o1000, "S_IFCHR": 0o20000,
                 "S_IFBLK": 0o60000, "S_IFREG": 0o100000, "S_IFIFO": 0o10000, "S_IFSOCK": 0o140000}
        if part in named:
            value |= named[part]
        elif re.fullmatch(r"0[0-7]*", part):
            value |= int(part, 8)
        else:
            return None
    return value


# --- the observation -------------------------------------------------------------------------------------------

@dataclass
class Observation:
    """What traced runs did. Each mapping goes from what was seen to where first (program and run), for reasons.

    Only calls that succeeded count, except for ``syscalls``: a seccomp filter acts on the attempt.
    """

    syscalls: dict[str, str] = field(default_factory=dict)
    families: dict[str, str] = field(default_factory=dict)  # socket()s opened
    writes: dict[str, str] = field(default_factory=dict)  # paths created, written, removed, renamed, chmod'ed
    created: dict[str, str] = field(default_factory=dict)  # paths created (a subset of writes)
    directories: dict[str, str] = field(default_factory=dict)  # directories made (a subset of created)
    reads: dict[str, str] = field(default_factory=dict)  # paths opened for reading (files and directories)
    lookups: dict[str, str] = field(default_factory=dict)  # paths only looked up: stat(), access(), chdir()...
    execs: dict[str, str] = field(default_factory=dict)  # programs executed
    exec_maps: dict[str, str] = field(default_factory=dict)  # files mapped executable (shared libraries)
    binds: dict[str, str] = field(default_factory=dict)  # "127.0.0.1:8080" bound (IPv4/IPv6)
    peers: dict[str, str] = field(default_factory=dict)  # "127.0.0.1:53" connected or sent to
    accepted: dict[str, str] = field(default_factory=dict)  # addresses connections were accepted from
    unix_peers: dict[str, str] = field(default_factory=dict)  # unix sockets connected to ("@name": abstract)
    namespaces: dict[str, str] = field(default_factory=dict)  # namespace types made or joined
    capabilities: dict[str, str] = field(default_factory=dict)  # capabilities the successful calls imply
    wx_memory: dict[str, str] = field(default_factory=dict)  # memory made writable and executable, or executable
    realtime: dict[str, str] = field(default_factory=dict)  # realtime scheduling set
    suid: dict[str, str] = field(default_factory=dict)  # setuid/setgid bits set on files
    personality: dict[str, str] = field(default_factory=dict)  # execution domains switched to
    non_native: dict[str, str] = field(default_factory=dict)  # processes run in another ABI (32-bit)
    setuid_execs: dict[str, str] = field(default_factory=dict)  # setuid/setgid programs executed (see observe())
    private_reads: dict[str, str] = field(default_factory=dict)  # files read that others may not read (observe())
    # Paths a call was refused on ("openat EROFS"), for the diagnosis: EROFS, EACCES and EPERM anywhere; ENOENT
    # only where a sandbox hides things (/dev, /tmp, the home trees), not the loader's and importers' probing.
    denied: dict[str, str] = field(default_factory=dict)
    pids: set[int] = field(default_factory=set)
    unreadable: int = 0  # calls whose arguments strace could not read (a non-dumpable process, e.g. gpg-agent)
    lines: int = 0
    runs: list[str] = field(default_factory=list)  # the traced runs this was read from
    failures: list[str] = field(default_factory=list)  # scenarios that failed while traced

    def merge(self, other: Observation) -> Observation:
        """Both observations in one (the first sighting of each item wins)."""
        merged = Observation()
        for f in fields(Observation):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, dict):
                setattr(merged, f.name, {**theirs, **mine})
            elif isinstance(mine, set):
                setattr(merged, f.name, mine | theirs)
            elif isinstance(mine, list):
                setattr(merged, f.name, mine + theirs)
            else:
                setattr(merged, f.name, mine + theirs)
        return merged

    def summary(self) -> str:
        runs = f"{len(self.runs)} run{'s' if len(self.runs) != 1 else ''} traced"
        text = (f"{runs} (the service and its inside scenarios), {len(self.syscalls)} syscalls, families "
                f"{' '.join(sorted(self.families)) or 'none'}, {len(self.writes)} paths written, "
                f"{len(self.execs)} programs run")
        if self.unreadable:
            text += f"; the arguments of {self.unreadable} calls were unreadable (non-dumpable processes)"
        return "; ".join([text, *(f"while traced, {failure}" for failure in self.failures)])


def denial_lines(observation: Observation) -> str:
    """The refused calls of ``observation`` as evidence lines the diagnosis reads ("strace: openat /etc/x: EROFS")."""
    words = {"EROFS": "Read-only file system", "EACCES": "Permission denied", "EPERM": "Operation not permitted",
             "ENOENT": "No such file"}
    lines = []
    for path, what in observation.denied.items():
        call, _, error = what.partition(" ")
        lines.append(f"strace: {call} {path}: {error} ({words.get(error, error)})")
    return "\n".join(lines)


class _Process:
    def __init__(self, program: str = "?", cwd: str = "/", root: bool | None = None) -> None:
        self.program = program
        self.cwd = cwd
        self.root = root


def parse_strace(text: str, run: str = "the service", *, cwd: str = "/") -> Observation:
    """Read ``strace -f -qq -y`` output of one run (see the module). ``cwd`` is the first process' directory."""
    observation = Observation(runs=[run])
    lines = _join_unfinished(text)
    parents = {child: parent for parent, name, _args, result in lines
               if name in _FORKS and result[0] not in ("?", "") and result[0].lstrip("-").isdigit()
               and int(result[0]) > 0 for child in [int(result[0])]}
    processes: dict[int, _Process] = {}

    def process(pid: int) -> _Process:
        if pid not in processes:
            parent = processes.get(parents.get(pid, -1))
            processes[pid] = _Process(parent.program, parent.cwd, parent.root) if parent else _Process(cwd=cwd)
        return processes[pid]

    for pid, name, args, result in lines:
        observation.lines += 1
        if pid < 0:
            if "runs in 32 bit mode" in name or "runs in x32 mode" in name:
                observation.non_native.setdefault(name.strip("[] "), run)
            continue
        observation.pids.add(pid)
        proc = process(pid)
        _record(observation, proc, pid, name, args, result, run if proc.program == "?" else f"{proc.program} ({run})")
    return observation


def _join_unfinished(text: str) -> list[tuple[int, str, str, tuple[str, str, str]]]:
    """(pid, syscall, argument text, (return value, fd path, errno)) per call; ``<unfinished ...>`` joined with
    its ``resumed`` line. Lines that are not calls (signals, exits) are dropped; strace's own notices come back
    with pid -1 and the notice as the name."""
    pending: dict[int, tuple[str, str]] = {}
    out: list[tuple[int, str, str, tuple[str, str, str]]] = []
    for raw in text.splitlines():
        if raw.startswith("[ Process"):
            out.append((-1, raw, "", ("", "", "")))
            continue
        match = _LINE_RE.match(raw.strip())
        if match is None:
            continue
        pid, rest = int(match.group(1)), match.group(2)
        if rest.startswith(("---", "+++")):
            continue
        resumed = _RESUMED_RE.match(rest)
        if resumed:
            name, head = pending.pop(pid, (resumed.group(1), ""))
            rest = f"{name}({head}{resumed.group(2)}"
        elif rest.endswith("<unfinished ...>"):
            call = _CALL_RE.match(rest)
            if call:
                pending[pid] = (call.group(1), call.group(2).removesuffix("<unfinished ...>").rstrip())
            continue
        call = _CALL_RE.match(rest)
        if call is None:
            continue
        body = call.group(2)
        returns = list(_RETURN_RE.finditer(body))  # the last one: a string argument may hold ") = "
        result = _RESULT_RE.match(body[returns[-1].end():]) if returns else None
        if result is None:
            continue
        args = body[:returns[-1].start()]
        fd_path = (result.group(2) or "")[1:-1]
        out.append((pid, call.group(1), args, (result.group(1), fd_path, result.group(3) or "")))
    # A call never resumed: its process was killed in it (by the run's end, or by SIGSYS). Still an attempt.
    out += [(pid, name, head, ("?", "", "")) for pid, (name, head) in pending.items()]
    return out


def _record(obs: Observation, proc: _Process, pid: int, name: str, argtext: str, result: tuple[str, str, str],
            where: str) -> None:
    value, fd_path, error = result
    if not name.startswith("syscall_"):
        obs.syscalls.setdefault(name, where)
    ok = value not in ("?", "-1") and not error
    if name in ("connect",) and error == "EINPROGRESS":
        ok = True  # a non-blocking connect under way: the attempt got through
    args = split_args(argtext)
    path_indexes = [_PATH_CALLS[name][1]] if name in _PATH_CALLS else [i for _d, i in _TWO_PATH_CALLS.get(name, ())]
    if any(i < len(args) and re.fullmatch(r"0x[0-9a-f]+", args[i]) for i in path_indexes):
        obs.unreadable += 1  # strace could not read the tracee's memory: a non-dumpable process
    if name in ("getuid", "geteuid") and value.isdigit():
        proc.root = value == "0"

    if name in _PATH_CALLS:
        dirfd, index, action = _PATH_CALLS[name]
        path = _resolve(proc, args, dirfd, index, fd_path)
        if name == "chdir" and ok and path:
            proc.cwd = path
        if dirfd is not None and index < len(args) and args[dirfd].startswith("AT_FDCWD<"):
            proc.cwd = _fd_path(args[dirfd]) or proc.cwd
        if path is not None and error in DENIAL_ERRORS and (error != "ENOENT" or path.startswith(HIDDEN_BY_SANDBOX)):
            obs.denied.setdefault(path, f"{name} {error}")
        if not ok or path is None:
            return
        if name in ("execve", "execveat"):
            proc.program = posixpath.basename(path)
        if action == "open":
            flags = args[index + 1] if index + 1 < len(args) else ""
            if name == "openat2":
                flags = re.sub(r".*flags=([^,}]*).*", r"\1", flags)
            if "O_CREAT" in flags:
                action = "create"
                mode = _mode(args[index + 2]) if index + 2 < len(args) else None
                if mode is not None and mode & 0o6000:
                    obs.suid.setdefault(f"{path} mode {mode:o}", where)
            elif "O_WRONLY" in flags or "O_RDWR" in flags or "O_TRUNC" in flags:
                action = "write"
            else:
                action = "read"
        if action in ("create", "write"):
            obs.writes.setdefault(path, where)
            if action == "create":
                obs.created.setdefault(path, where)
            if name in ("mkdir", "mkdirat"):
                obs.directories.setdefault(path, where)
        elif action == "exec":
            obs.execs.setdefault(path, where)
        elif action == "read":
            obs.reads.setdefault(path, where)
        else:
            obs.lookups.setdefault(path, where)
        if name in ("chmod", "fchmodat") and len(args) > index + 1:
            mode = _mode(args[index + 1])
            if mode is not None and mode & 0o6000:
                obs.suid.setdefault(f"{path} mode {mode:o}", where)
        if name in ("mkdir", "mkdirat", "mknod", "mknodat") and len(args) > index + 1:
            mode = _mode(args[index + 1])
            if mode is not None and mode & 0o6000:
                obs.suid.setdefault(f"{path} mode {mode:o}", where)
            if name.startswith("mknod") and mode is not None and mode & 0o170000 in (0o20000, 0o60000):
                obs.capabilities.setdefault("CAP_MKNOD", f"mknod {path}, {where}")
        if name in ("chown", "lchown", "fchownat") and proc.root is not False:
            obs.capabilities.setdefault("CAP_CHOWN", f"chown {path}, {where}")
        return
    if name in _TWO_PATH_CALLS:
        for dirfd, index in _TWO_PATH_CALLS[name]:
            path = _resolve(proc, args, dirfd, index, "")
            if ok and path:
                obs.writes.setdefault(path, where)
                obs.created.setdefault(path, where)
        return
    if not ok:
        return
    if name in _FD_WRITES and args:
        path = _fd_path(args[0])
        if path:
            obs.writes.setdefault(normalize(path), where)
        if name == "fchmod" and len(args) > 1:
            mode = _mode(args[1])
            if mode is not None and mode & 0o6000:
                obs.suid.setdefault(f"{path or args[0]} mode {mode:o}", where)
        if name == "fchown" and proc.root is not False:
            obs.capabilities.setdefault("CAP_CHOWN", f"fchown {path or args[0]}, {where}")
    elif name == "fchdir" and args:
        proc.cwd = _fd_path(args[0]) or proc.cwd
    elif name in ("socket", "socketpair") and args:
        family = args[0]
        if family.startswith("AF_"):
            obs.families.setdefault(family, where)
        if family == "AF_PACKET" or (family in ("AF_INET", "AF_INET6") and len(args) > 1 and "SOCK_RAW" in args[1]):
            obs.capabilities.setdefault("CAP_NET_RAW", f"a raw {family} socket, {where}")
    elif name == "bind" and len(args) > 1:
        address = _inet(args[1])
        if address:
            obs.binds.setdefault(address, where)
            port = int(address.rsplit(":", 1)[1])
            if 0 < port < 1024:
                obs.capabilities.setdefault("CAP_NET_BIND_SERVICE", f"bind to port {port}, {where}")
    elif name in ("connect", "sendto", "sendmsg") and len(args) > 1:
        target = args[1] if name == "connect" else (args[4] if name == "sendto" and len(args) > 4 else args[1])
        address = _inet(target)
        if address:
            obs.peers.setdefault(address, where)
        unix = _UNIX_RE.search(target)
        if unix and name == "connect":
            obs.unix_peers.setdefault(unix.group(1) + (_unquote(f'"{unix.group(2)}"') or ""), where)
    elif name in ("accept", "accept4") and len(args) > 1:
        address = _inet(args[1])
        if address:
            obs.accepted.setdefault(address.rsplit(":", 1)[0], where)
    elif name in ("unshare", "setns", "clone", "clone3") and args:
        kinds = [kind for flag, kind in _NEW_NAMESPACES.items() if re.search(rf"\b{flag}\b", argtext)]
        for kind in kinds:
            obs.namespaces.setdefault(kind, where)
        if any(kind != "user" for kind in kinds) and proc.root is not False:
            obs.capabilities.setdefault("CAP_SYS_ADMIN", f"{name} of a {kinds[0]} namespace, {where}")
    elif name in ("mmap", "mprotect", "pkey_mprotect") and len(args) > 2:
        prot = args[2]
        if "PROT_EXEC" in prot and (name != "mmap" or "PROT_WRITE" in prot):
            obs.wx_memory.setdefault(f"{name}({prot})", where)
        if name == "mmap" and "PROT_EXEC" in prot and len(args) > 4:
            path = _fd_path(args[4])
            if path:
                obs.exec_maps.setdefault(normalize(path), where)
    elif name == "shmat" and len(args) > 2 and "SHM_EXEC" in args[2]:
        obs.wx_memory.setdefault("shmat(SHM_EXEC)", where)
    elif name in ("sched_setscheduler", "sched_setattr") and len(args) > 1:
        policy = re.search(r"SCHED_(FIFO|RR|DEADLINE)", argtext)
        if policy:
            obs.realtime.setdefault(f"{name}(SCHED_{policy.group(1)})", where)
            obs.capabilities.setdefault("CAP_SYS_NICE", f"realtime scheduling, {where}")
    elif name == "personality" and args and args[0] not in ("0xffffffff", "PER_LINUX"):
        obs.personality.setdefault(args[0], where)
    elif name in ("setuid", "setreuid", "setresuid", "setfsuid") and proc.root is not False:
        obs.capabilities.setdefault("CAP_SETUID", f"{name}, {where}")
    elif name in ("setgid", "setregid", "setresgid", "setfsgid", "setgroups") and proc.root is not False:
        obs.capabilities.setdefault("CAP_SETGID", f"{name}, {where}")
    elif name == "chroot":
        obs.capabilities.setdefault("CAP_SYS_CHROOT", f"chroot, {where}")
    elif name in ("mount", "umount2", "pivot_root", "sethostname", "setdomainname", "swapon", "swapoff"):
        obs.capabilities.setdefault("CAP_SYS_ADMIN", f"{name}, {where}")
    elif name in ("settimeofday", "clock_settime", "stime"):
        obs.capabilities.setdefault("CAP_SYS_TIME", f"{name}, {where}")
    elif name in ("setpriority", "nice") and args and args[-1].startswith("-"):
        obs.capabilities.setdefault("CAP_SYS_NICE", f"{name}({args[-1]}), {where}")


def _resolve(proc: _Process, args: Sequence[str], dirfd: int | None, index: int, fd_path: str) -> str | None:
    if index >= len(args):
        return None
    path = _unquote(args[index])
    if path is None:
        if args[index] == "NULL" and dirfd is not None:  # utimensat(fd, NULL, ...): the fd's own file
            base = _fd_path(args[dirfd])
            return normalize(base) if base else None
        return None
    if path.startswith("/"):
        return normalize(path)
    base = _fd_path(args[dirfd]) if dirfd is not None and dirfd < len(args) else None
    if base is None and fd_path.startswith("/") and not path:
        return normalize(fd_path)
    return normalize(posixpath.join(base or proc.cwd, path))


def _inet(sockaddr: str) -> str | None:
    match = _INET_RE.search(sockaddr)
    if match is None:
        return None
    address = match.group(2) or match.group(3)
    return f"[{address}]:{match.group(1)}" if ":" in address else f"{address}:{match.group(1)}"


# --- forecasts ---------------------------------------------------------------------------------------------------

FITS, NARROWED, CONFLICT, UNKNOWN = "fits", "narrowed", "conflict", "unknown"

# Where a service may write whatever the hardening: API file systems and the temporary directories.
_ALWAYS_WRITABLE = ("/dev/", "/proc/", "/sys/", "/tmp/", "/var/tmp/")
_TMP = ("/tmp/", "/var/tmp/")
_HOMES = ("/home/", "/root/", "/run/user/")
# The device nodes PrivateDevices= keeps.
_PRIVATE_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty", "/dev/ptmx",
                    "/dev/pts/", "/dev/shm/", "/dev/mqueue/", "/dev/hugepages/", "/dev/log", "/dev/stdin",
                    "/dev/stdout", "/dev/stderr", "/dev/fd/", "/dev/console")
_LOOPBACK = ("127.", "[::1]")


@dataclass(frozen=True)
class Forecast:
    """What an observation predicts for one tightening step.

    ``verdict``: FITS (nothing observed conflicts), NARROWED (``directives`` is the step narrowed to what was used,
    plus the grants it needs), CONFLICT (something observed breaks every form of the step; ``reason`` says what),
    UNKNOWN (the observation says nothing about this directive). ``extras`` are the narrowed-in items that the
    observation cannot prove necessary (a socket family opened but perhaps never needed): tighten confirms them.
    """

    verdict: str
    directives: tuple[Directive, ...]
    reason: str = ""
    extras: tuple[tuple[str, str], ...] = ()  # (directive name, item) pairs

    @property
    def tries_first(self) -> bool:
        return self.verdict != CONFLICT


def forecast(step: Sequence[Directive], observation: Observation, hardening: Sequence[Directive], *,
             groups: Mapping[str, Sequence[str]] | None = None, never: Sequence[str] = (),
             scenarios_from_outside: bool = True) -> Forecast:
    """The forecast for adding ``step`` to ``hardening``, given what ``observation`` saw (see :class:`Forecast`).

    ``groups`` are the machine's syscall groups (``systemd-analyze syscall-filter``); without them syscall filters
    are UNKNOWN. ``scenarios_from_outside``: some scenario is a client outside the sandbox (PrivateNetwork= would
    cut it off from a listening service).
    """
    context = _Context(observation, tuple(hardening), _groups(groups), tuple(never), scenarios_from_outside)
    verdicts = [context.one(directive) for directive in step]
    conflicts = [f for f in verdicts if f.verdict == CONFLICT]
    if conflicts:
        return Forecast(CONFLICT, tuple(step), "; ".join(f.reason for f in conflicts))
    # The step's own directives first, then the grants they bring (an allow list reads "localhost 192.0.2.7").
    directives = _merged([*(f.directives[0] for f in verdicts), *(d for f in verdicts for d in f.directives[1:])])
    extras = tuple(dict.fromkeys(e for f in verdicts for e in f.extras))
    reason = "; ".join(f.reason for f in verdicts if f.reason)
    if any(f.verdict == NARROWED for f in verdicts):
        return Forecast(NARROWED, directives, reason, extras)
    if all(f.verdict == UNKNOWN for f in verdicts):
        return Forecast(UNKNOWN, tuple(step))
    return Forecast(FITS, tuple(step), reason)


def _groups(groups: Mapping[str, Sequence[str]] | None) -> dict[str, list[str]]:
    return {name: list(members) for name, members in (groups or {}).items()}


def _merged(directives: Iterable[Directive]) -> tuple[Directive, ...]:
    """Directives of the same name (a step's own and a grant another of its directives needs) as one."""
    out: dict[str, Directive] = {}
    for directive in directives:
        old = out.get(directive.name)
        if old is None:
            out[directive.name] = directive
        else:
            words = dict.fromkeys([*old.value.split(), *directive.value.split()])
            out[directive.name] = Directive(old.name, (" ".join(words),), old.line)
    return tuple(out.values())


def _first(items: Mapping[str, str], limit: int = 2) -> str:
    shown = [f"{item} ({where})" for item, where in list(items.items())[:limit]]
    more = len(items) - limit
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _under(path: str, prefixes: Iterable[str]) -> bool:
    return any(path.startswith(p) or path == p.rstrip("/") for p in prefixes)


def filter_allows(assignments: Sequence[str], syscall: str, groups: Mapping[str, Sequence[str]]) -> bool:
    """systemd's SystemCallFilter= semantics: the first line sets allow or deny mode, later lines of the other
    kind take names out again; an empty line resets."""
    allow_mode: bool | None = None
    listed: set[str] = set()
    for assignment in assignments:
        if not assignment.strip():
            allow_mode, listed = None, set()
            continue
        deny = assignment.startswith("~")
        names = {s for name in assignment.lstrip("~").split() for s in expand_group(name, _groups(groups))}
        if allow_mode is None:
            allow_mode, listed = not deny, names
        elif allow_mode == (not deny):
            listed |= names
        else:
            listed -= names
    return True if allow_mode is None else (syscall in listed) == allow_mode


def filter_adding(assignments: Sequence[str], added: Sequence[str]) -> tuple[str, ...]:
    """SystemCallFilter= lines ``assignments`` restricted further by the lines ``added`` (one step's, in order).

    The first line decides allow or deny mode (see :func:`filter_allows`). After a deny list, an allow list would
    only take its names out of the deny list: it goes first instead, and the deny lines after it still take their
    names out of it. Anything else goes last, two deny lines in a row written as one. (An allow list added to an
    allow list would widen it: tighten adds none.)
    """
    if assignments and added and assignments[0].startswith("~") and not added[0].startswith("~"):
        return (*added, *assignments)
    out = list(assignments)
    for line in added:
        if out and out[-1].startswith("~") and line.startswith("~"):
            have = out[-1][1:].split()
            new = [word for word in line[1:].split() if word not in have]  # never a name twice
            out[-1] = " ".join([out[-1], *new])
        else:
            out.append(line)
    return tuple(out)


class _Context:
    def __init__(self, observation: Observation, hardening: tuple[Directive, ...], groups: dict[str, list[str]],
                 never: tuple[str, ...], outside: bool) -> None:
        self.obs = observation
        self.hardening = hardening
        self.groups = groups
        self.never = never
        self.outside = outside
        self.present = {d.name: d for d in hardening}

    def one(self, directive: Directive) -> Forecast:
        name = directive.name
        method = getattr(self, f"_{name}", None)
        if method is None:
            simple = _SIMPLE.get(name)
            if simple is None:
                return Forecast(UNKNOWN, (directive,))
            found = simple(self.obs)
            return Forecast(CONFLICT, (directive,), f"{name}=: {found}") if found else Forecast(FITS, (directive,))
        result: Forecast = method(directive)
        return result

    # -- helpers -------------------------------------------------------------------------------------

    def _value(self, name: str) -> str:
        directive = self.present.get(name)
        return directive.value if directive else ""

    def _writes_needing_grants(self) -> dict[str, str]:
        """Paths written that a read-only OS would refuse, and that the hardening does not grant already."""
        granted = [f"{prefix}{n}/" for prefix, directive in SERVICE_DIRECTORIES
                   for n in self._value(directive).split()]
        granted += [p.lstrip("-+") .rstrip("/") + "/" for p in self._value("ReadWritePaths").split()]
        return {path: where for path, where in self.obs.writes.items()
                if not _under(path, _ALWAYS_WRITABLE) and not _under(path, granted)
                and not path.startswith("/run/harden-observe")}

    def _grants(self, writes: Mapping[str, str], *, dynamic_user: bool) -> tuple[list[Directive], str]:
        """The directives that let ``writes`` through a read-only OS: a per-service directory where one fits
        (the only grant that works for a dynamic user), else ReadWritePaths= on the directory written in."""
        by_directive: dict[str, list[str]] = {}
        paths: list[str] = []
        conflicts: list[str] = []
        for path in writes:
            for prefix, directory in SERVICE_DIRECTORIES:
                # A directory below /var/lib (and friends), or a file in one: the per-service directory. Not /etc:
                # ConfigurationDirectory= stays read-only. Not a file right in /run: that needs /run itself.
                inside = path[len(prefix):]
                if path.startswith(prefix) and directory != "ConfigurationDirectory" and \
                        ("/" in inside or path in self.obs.directories):
                    name = inside.split("/")[0]
                    if name and name not in by_directive.setdefault(directory, []):
                        by_directive[directory].append(name)
                    break
            else:
                if dynamic_user:
                    conflicts.append(path)
                else:
                    where = path if path not in self.obs.created else posixpath.dirname(path)
                    if where not in paths:
                        paths.append(where)
        if conflicts:
            raise _Conflict(f"writes {_first({p: writes[p] for p in conflicts})} outside the directories a "
                            "dynamic user can be granted")
        grants = [_extend(self.present.get(directory), directory, names) for directory, names in by_directive.items()]
        paths = [p for p in paths if not any(p.startswith(q + "/") for q in paths)]
        if paths:
            grants.append(_extend(self.present.get("ReadWritePaths"), "ReadWritePaths", [f"-{p}" for p in paths]))
        described = ", ".join(f"{d.name}={d.assignments[-1]}" for d in grants)
        return grants, (f"grants {described} for {_first(dict(writes))}" if grants else "")

    # -- one method per directive the catalogue adds ------------------------------------------------------

    def _DynamicUser(self, directive: Directive) -> Forecast:
        needs_root = {cap: why for cap, why in self.obs.capabilities.items()
                      if cap not in self._value("AmbientCapabilities").split()}
        if needs_root:
            return Forecast(CONFLICT, (directive,), f"needs {', '.join(needs_root)} as root: "
                                                     f"{'; '.join(needs_root.values())}")
        if self.obs.setuid_execs:
            return Forecast(CONFLICT, (directive,), f"runs setuid programs: {_first(self.obs.setuid_execs)}")
        # A dynamic user is nobody's owner or group: what only they may read is lost (its own directories are
        # handed to it, and a file the service made there is its own).
        own = ("/var/lib/", "/var/cache/", "/var/log/")
        private = {p: w for p, w in self.obs.private_reads.items() if not _under(p, own)}
        if private:
            return Forecast(CONFLICT, (directive,), f"reads files others may not: {_first(private)}")
        writes = self._writes_needing_grants()
        try:
            grants, reason = self._grants(writes, dynamic_user=True)
        except _Conflict as exc:
            return Forecast(CONFLICT, (directive,), str(exc))
        return Forecast(NARROWED, (directive, *grants), reason) if grants else Forecast(FITS, (directive,))

    def _ProtectSystem(self, directive: Directive) -> Forecast:
        writes = self._writes_needing_grants()
        if directive.value != "strict":  # yes/full: only /usr, /boot, /efi (and /etc for full) read-only
            prefixes = ("/usr/", "/boot/", "/efi/") + (("/etc/",) if directive.value == "full" else ())
            hit = {p: w for p, w in writes.items() if _under(p, prefixes)}
            return Forecast(CONFLICT, (directive,), f"writes {_first(hit)}") if hit else Forecast(FITS, (directive,))
        extra: list[Directive] = []
        tmp_writes = {p: w for p, w in self.obs.writes.items() if _under(p, _TMP)}
        if tmp_writes and self._value("PrivateTmp") != "yes":
            if "PrivateTmp" in self.never or "PrivateTmp" in self.present:
                writes.update(tmp_writes)
            else:
                extra.append(Directive("PrivateTmp", ("yes",)))
        grants, reason = self._grants(writes, dynamic_user=False)
        grants = [*extra, *grants]
        if extra:
            reason = "; ".join(filter(None, [reason, f"a private /tmp for {_first(tmp_writes, 1)}"]))
        return Forecast(NARROWED, (directive, *grants), reason) if grants else Forecast(FITS, (directive,))

    def _ReadOnlyPaths(self, directive: Directive) -> Forecast:
        read_only = [p.lstrip("-+").rstrip("/") for p in directive.value.split()]
        writes = self._writes_needing_grants()
        hit = {p: w for p, w in writes.items() if any(p == r or p.startswith(r + "/") for r in read_only)}
        if not hit:
            return Forecast(FITS, (directive,))
        names = []
        for path in hit:
            parts = path.split("/")
            if path.startswith("/run/") and len(parts) > 3 and parts[2] not in ("systemd", "user"):
                names.append(parts[2])
            else:
                return Forecast(CONFLICT, (directive,), f"writes {_first(hit)}")
        grant = _extend(self.present.get("RuntimeDirectory"), "RuntimeDirectory", list(dict.fromkeys(names)))
        return Forecast(NARROWED, (directive, grant), f"grants RuntimeDirectory={' '.join(names)} for {_first(hit)}")

    def _ProtectHome(self, directive: Directive) -> Forecast:
        writes = {p: w for p, w in self.obs.writes.items() if _under(p, _HOMES)}
        reads = {p: w for p, w in {**self.obs.lookups, **self.obs.reads, **self.obs.execs}.items() if _under(p, _HOMES)
                 and p.rstrip("/") not in ("/home", "/root", "/run/user")}
        if writes:
            return Forecast(CONFLICT, (directive,), f"writes {_first(writes)}")
        if reads and directive.value in ("yes", "tmpfs"):
            weaker = Directive(directive.name, ("read-only",), directive.line)
            if self._value("ProtectHome") == "read-only":
                return Forecast(CONFLICT, (directive,), f"reads {_first(reads)}")
            return Forecast(NARROWED, (weaker,), f"read-only, for {_first(reads)}")
        return Forecast(FITS, (directive,))

    def _CapabilityBoundingSet(self, directive: Directive) -> Forecast:
        if directive.value.startswith("~"):
            denied = set(directive.value[1:].split())
            hit = {c: w for c, w in self.obs.capabilities.items() if c in denied}
            return Forecast(CONFLICT, (directive,), "; ".join(hit.values())) if hit else Forecast(FITS, (directive,))
        ambient = [c for c in self._value("AmbientCapabilities").split() if c in CAPABILITIES]
        wanted = [c for c in CAPABILITIES if c in self.obs.capabilities or c in ambient
                  or c in directive.value.split()]
        if wanted == directive.value.split():
            return Forecast(FITS, (directive,))
        narrowed = Directive(directive.name, (" ".join(wanted),), directive.line)
        reasons = [f"{c} for {self.obs.capabilities[c]}" for c in wanted if c in self.obs.capabilities]
        reasons += [f"{c}, which AmbientCapabilities= raises" for c in wanted if c in ambient
                    and c not in self.obs.capabilities]
        # A port below 1024 bound is proof; the other hints (a chown, a setuid) may be calls that change nothing.
        extras = tuple((directive.name, c) for c in wanted if c in self.obs.capabilities and c not in ambient
                       and not self.obs.capabilities[c].startswith("bind to port"))
        return Forecast(NARROWED, (narrowed,), "; ".join(reasons), extras)

    def _NoNewPrivileges(self, directive: Directive) -> Forecast:
        if self.obs.setuid_execs:
            return Forecast(CONFLICT, (directive,), f"runs setuid programs: {_first(self.obs.setuid_execs)}")
        return Forecast(FITS, (directive,))

    def _SystemCallFilter(self, directive: Directive) -> Forecast:
        if not self.groups:
            return Forecast(UNKNOWN, (directive,))
        current = self.present.get("SystemCallFilter")
        before = current.assignments if current else ()
        # Calls the hardening already denies (answered with SystemCallErrorNumber=) are not needs: it passes so.
        attempted = {s: w for s, w in self.obs.syscalls.items() if filter_allows(before, s, self.groups)}
        known = set(self.groups.get("@known", ()))
        assignments = directive.assignments
        after = filter_adding(before, assignments)
        blocked = {s: w for s, w in attempted.items() if not filter_allows(after, s, self.groups)}
        if not blocked:
            return Forecast(FITS, (directive,))
        unnamed = [s for s in blocked if known and s not in known]
        if unnamed:
            return Forecast(CONFLICT, (directive,), f"calls {', '.join(unnamed)}, unknown to this systemd")
        needed = sorted(blocked)
        where = "; ".join(f"{s}{_group_of(s, self.groups, assignments)} by {blocked[s]}" for s in needed[:4]) + \
            (f" and {len(needed) - 4} more" if len(needed) > 4 else "")
        errno_mode = "SystemCallErrorNumber" in self.present
        extras = tuple((directive.name, s) for s in needed) if errno_mode else ()
        if all(not a.startswith("~") for a in assignments):  # an allow list: widen it with what was called
            narrowed = Directive(directive.name, (" ".join([*assignments, *needed]),), directive.line)
            return Forecast(NARROWED, (narrowed,), f"also allows {where}", extras)
        narrowed = Directive(directive.name, (*assignments, " ".join(needed)), directive.line)
        return Forecast(NARROWED, (narrowed,), f"re-allows {where}", extras)

    def _RestrictAddressFamilies(self, directive: Directive) -> Forecast:
        if directive.value.startswith("~"):
            denied = set(directive.value[1:].split())
            hit = {f: w for f, w in self.obs.families.items() if f in denied}
            return Forecast(CONFLICT, (directive,), f"opens {_first(hit)}") if hit else Forecast(FITS, (directive,))
        allowed = directive.value.split()
        used = [f for f in ADDRESS_FAMILIES if f in self.obs.families and f not in allowed]
        used += [f for f in self.obs.families if f not in ADDRESS_FAMILIES and f not in allowed]
        if not used:
            return Forecast(FITS, (directive,))
        narrowed = Directive(directive.name, (" ".join([*allowed, *used]),), directive.line)
        # A family the service bound a port of is needed; one it only opened may be a probe it can do without.
        serving = {"AF_INET6" if address.startswith("[") else "AF_INET" for address in self.obs.binds
                   if not address.endswith(":0")}
        return Forecast(NARROWED, (narrowed,), f"also allows {_first({f: self.obs.families[f] for f in used}, 3)}",
                        tuple((directive.name, f) for f in used if f not in serving))

    def _RestrictNamespaces(self, directive: Directive) -> Forecast:
        if not self.obs.namespaces:
            return Forecast(FITS, (directive,))
        if directive.value != "yes":
            allowed = set(directive.value.lstrip("~").split())
            deny = directive.value.startswith("~")
            hit = {n: w for n, w in self.obs.namespaces.items() if (n in allowed) == deny}
            if not hit:
                return Forecast(FITS, (directive,))
            return Forecast(CONFLICT, (directive,), f"makes {_first(hit)} namespaces")
        used = [n for n in NAMESPACE_FLAGS if n in self.obs.namespaces]
        return Forecast(NARROWED, (Directive(directive.name, (" ".join(used),), directive.line),),
                        f"allows {_first(self.obs.namespaces, 3)}", tuple((directive.name, n) for n in used))

    def _PrivateTmp(self, directive: Directive) -> Forecast:
        shared = {p: w for p, w in {**self.obs.lookups, **self.obs.reads, **self.obs.unix_peers}.items()
                  if _under(p, _TMP) and p not in self.obs.created and p.rstrip("/") not in ("/tmp", "/var/tmp")}
        if shared:
            return Forecast(CONFLICT, (directive,), f"uses {_first(shared)}, made outside its sandbox")
        return Forecast(FITS, (directive,))

    def _ProtectProc(self, directive: Directive) -> Forecast:
        own = {str(pid) for pid in self.obs.pids} | {"self", "thread-self"}
        others = {p: w for p, w in {**self.obs.lookups, **self.obs.reads, **self.obs.writes}.items()
                  if re.match(r"^/proc/\d+(/|$)", p) and p.split("/")[2] not in own}
        if others:
            return Forecast(CONFLICT, (directive,), f"reads other processes' {_first(others)}")
        return Forecast(FITS, (directive,))

    def _ProcSubset(self, directive: Directive) -> Forecast:
        if directive.value != "pid":
            return Forecast(FITS, (directive,))
        hit = {p: w for p, w in {**self.obs.lookups, **self.obs.reads, **self.obs.writes}.items()
               if p.startswith("/proc/") and p.split("/")[2] not in ("self", "thread-self")
               and not p.split("/")[2].isdigit()}
        if hit:
            return Forecast(CONFLICT, (directive,), f"reads {_first(hit)}")
        return Forecast(FITS, (directive,))

    def _IPAddressDeny(self, directive: Directive) -> Forecast:
        if directive.value != "any":
            return Forecast(UNKNOWN, (directive,))
        allowed = (self._value("IPAddressAllow") + " localhost").split()
        remote = {}
        for peer, where in {**self.obs.peers, **{f"{a}:0": w for a, w in self.obs.accepted.items()}}.items():
            address = peer.rsplit(":", 1)[0].strip("[]")
            if not address.startswith(_LOOPBACK[0]) and address != "::1" and address not in allowed:
                remote[address] = where
        if not remote:
            return Forecast(FITS, (directive,))
        grant = _extend(self.present.get("IPAddressAllow"), "IPAddressAllow", list(remote))
        return Forecast(NARROWED, (directive, grant), f"allows {_first(remote)}",
                        tuple(("IPAddressAllow", a) for a in remote))

    def _PrivateNetwork(self, directive: Directive) -> Forecast:
        own = {b.rsplit(":", 1)[1] for b in self.obs.binds}
        reaches = {p: w for p, w in self.obs.peers.items() if p.rsplit(":", 1)[1] not in own}
        if reaches:
            return Forecast(CONFLICT, (directive,), f"reaches {_first(reaches)} outside its sandbox")
        abstract = {p: w for p, w in self.obs.unix_peers.items() if p.startswith("@")}
        if abstract:
            return Forecast(CONFLICT, (directive,), f"connects to abstract sockets {_first(abstract)}")
        if self.obs.binds and self.outside:
            return Forecast(CONFLICT, (directive,), f"listens on {_first(self.obs.binds)} for clients outside "
                                                    "its sandbox")
        return Forecast(FITS, (directive,))

    def _NoExecPaths(self, directive: Directive) -> Forecast:
        paths = [p.lstrip("-+").rstrip("/") for p in directive.value.split()]
        used = {p: w for p, w in {**self.obs.execs, **self.obs.exec_maps}.items()}
        keep = [p for p in paths if not any(u == p or u.startswith(p + "/") for u in used)]
        if keep == paths:
            return Forecast(FITS, (directive,))
        hit = {u: w for u, w in used.items() if any(u == p or u.startswith(p + "/") for p in paths)}
        if not keep:
            return Forecast(CONFLICT, (directive,), f"executes {_first(hit)}")
        return Forecast(NARROWED, (Directive(directive.name, (" ".join(keep),), directive.line),),
                        f"leaves out the directories it executes from: {_first(hit)}")


class _Conflict(Exception):
    pass


def _extend(existing: Directive | None, name: str, items: Sequence[str]) -> Directive:
    """A grant: ``name`` with the ``items`` the hardening lacks. Tighten adds it to the user's own directive of that
    name (see :data:`pytest_systemd_harden.search.tighten.GRANTS`), never replacing it."""
    have = existing.value.split() if existing else []
    return Directive(name, (" ".join(dict.fromkeys(i for i in items if i not in have)),))


def _group_of(syscall: str, groups: Mapping[str, Sequence[str]], assignments: Sequence[str]) -> str:
    """" (in @memlock)": the smallest group holding ``syscall``, preferably one the step names."""
    named = [a.lstrip("~") for assignment in assignments for a in assignment.split()]
    table = _groups(groups)
    fitting = sorted((len(expand_group(g, table)), g) for g in table
                     if g not in ("@known", "@default", "@system-service") and syscall in expand_group(g, table))
    preferred = [g for _n, g in fitting if g in named]
    return f" (in {(preferred or [g for _n, g in fitting] or ['no group'])[0]})"


def _devices(obs: Observation) -> str:
    hit = {p: w for p, w in {**obs.lookups, **obs.reads, **obs.writes}.items()
           if p.startswith("/dev/") and not _under(p, _PRIVATE_DEVICES)}
    return f"opens {_first(hit)}" if hit else ""


def _paths_or_calls(prefixes: tuple[str, ...], calls: tuple[str, ...], *, writes_only: bool = False
                    ) -> Callable[[Observation], str]:
    def check(obs: Observation) -> str:
        found = [f"calls {_first({c: obs.syscalls[c] for c in calls if c in obs.syscalls})}"] \
            if any(c in obs.syscalls for c in calls) else []
        seen = obs.writes if writes_only else {**obs.lookups, **obs.reads, **obs.writes, **obs.execs}
        hit = {p: w for p, w in seen.items() if _under(p, prefixes)}
        if hit:
            found.append(f"{'writes' if writes_only else 'uses'} {_first(hit)}")
        return "; ".join(found)
    return check


def _items(attribute: str, verb: str) -> Callable[[Observation], str]:
    def check(obs: Observation) -> str:
        found: dict[str, str] = getattr(obs, attribute)
        return f"{verb} {_first(found)}" if found else ""
    return check


# Boolean directives: what observed breaks them ("" when nothing).
_SIMPLE: dict[str, Callable[[Observation], str]] = {
    "SystemCallArchitectures": _items("non_native", "runs a non-native process:"),
    "PrivateDevices": lambda obs: "; ".join(filter(None, [
        _devices(obs), _paths_or_calls((), ("ioperm", "iopl", "pciconfig_read", "pciconfig_write"))(obs)])),
    "ProtectKernelTunables": _paths_or_calls(("/proc/sys/", "/sys/", "/proc/sysrq-trigger"), (), writes_only=True),
    "ProtectKernelModules": _paths_or_calls(("/usr/lib/modules/", "/lib/modules/"),
                                            ("init_module", "finit_module", "delete_module")),
    "ProtectKernelLogs": _paths_or_calls(("/dev/kmsg", "/proc/kmsg"), ("syslog",)),
    "ProtectControlGroups": _paths_or_calls(("/sys/fs/cgroup/",), (), writes_only=True),
    "ProtectClock": _paths_or_calls(("/dev/rtc",), ("settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
                                                    "stime")),
    "ProtectHostname": _paths_or_calls((), ("sethostname", "setdomainname")),
    "LockPersonality": _items("personality", "switches personality to"),
    "MemoryDenyWriteExecute": _items("wx_memory", "maps memory executable:"),
    "RestrictRealtime": _items("realtime", "asks for realtime scheduling:"),
    "RestrictSUIDSGID": _items("suid", "sets setuid/setgid bits:"),
    "RemoveIPC": lambda obs: "",
    # Capabilities in a user namespace of its own act on nothing of the host's (a port below 1024, a file's owner).
    "PrivateUsers": _items("capabilities", "uses capabilities over the host's resources:"),
    # Its mounts stay its own: a service that mounts for others conflicts.
    "PrivateMounts": _paths_or_calls((), ("mount", "umount2", "move_mount", "fsmount")),
    # Its IPC objects stay its own: one it shares with processes outside conflicts (the trace cannot tell).
    "PrivateIPC": _paths_or_calls(("/dev/mqueue/",), ("shmget", "semget", "msgget", "mq_open")),
    "UMask": lambda obs: "",
}
