"""Build directories in the image cache, the only way this plugin removes a directory tree, and how it copies one.

A build runs in a staging directory beside its final place. Three rules keep the host safe whatever ends the
build (an error, Ctrl-C, SIGKILL):

* The builder mounts nothing the host sees: it runs in mount namespaces of its own (machine/build_sandbox.py), with
  throwaway tmpfs over /tmp, /var/tmp and /dev/shm, so even a bind the builder makes of them reaches no host file,
  and its mounts vanish with its last process. The tmpfs a build may write its tree in is mounted in a namespace of
  its own as well (build_sandbox.prepare), gone when the build's last process and its keeper are.
* Nothing is ever removed across a mount point: :func:`remove_tree` refuses a tree with anything mounted at or
  below it, and never descends into another filesystem.
* A staging directory is named after its owner (pid and start time, as machine/cgroups.py names a container's
  cgroup), so a later run can tell a killed build's leftovers from a build in progress and remove only the former, and a
  reused pid cannot collide with them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import errno
import os
import stat
import subprocess
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

from ..errors import ImageBuildError, printable
from .cgroups import process_start_time, stop_leftovers

_MARK = ".building-"
_MNT_DETACH = 2


def staging_dir(final: Path) -> Path:
    """A new, unique staging directory for ``final``, owned by this process; not created yet."""
    pid = os.getpid()
    return final.with_name(f"{final.name}{_MARK}{pid}-{process_start_time(pid)}-{uuid.uuid4().hex[:8]}")


def _owner_alive(staging: Path) -> bool:
    """Whether the process that named ``staging`` still runs. A name from before owners were recorded
    (``KEY.building-PID``, an older version of the plugin, maybe running beside this one) counts as alive while a
    process with that pid exists."""
    owner = staging.name.split(_MARK, 1)[1].split("-")
    if not owner[0].isdigit():
        return False
    pid = int(owner[0])
    if len(owner) >= 2:
        return process_start_time(pid) == owner[1]
    return process_start_time(pid) is not None


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` in this process's mount namespace, deepest first."""
    resolved = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as mountinfo:
        for line in mountinfo:
            # Field 5 is the mount point, with space, tab, newline and backslash written as octal escapes.
            point = line.split()[4].encode("utf-8", "surrogateescape").decode("unicode_escape", "surrogateescape")
            if point == resolved or point.startswith(resolved.rstrip("/") + "/"):
                found.append(point)
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def remove_tree(path: Path) -> None:
    """Remove ``path`` and everything below it, but never through a mount point.

    Raises ImageBuildError, removing nothing, when anything is mounted at or below ``path`` (a bind there could
    lead to the host's files); a directory on another filesystem found on the way (a mount made after the check)
    is left alone and reported the same way."""
    if not os.path.lexists(path):
        return
    mounted = mounts_under(path)
    if mounted:
        raise ImageBuildError(
            f"not removing {path}: {', '.join(mounted)} {'is' if len(mounted) == 1 else 'are'} mounted there, and "
            "removing through a mount would delete files outside the cache (hint: a killed build left them; "
            f"'umount -R {mounted[-1]}' and run again, or remove the directory after unmounting)")
    try:
        top = os.lstat(path)
        if not stat.S_ISDIR(top.st_mode):
            os.unlink(path)
            return
    except FileNotFoundError:
        return  # removed meanwhile by its owner (a machine's own stop)
    crossed: list[str] = []
    try:
        _remove_contents(str(path), top.st_dev, crossed)
    except (RecursionError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in (errno.ENAMETOOLONG, errno.EMFILE):
            raise
        # A tree deeper than Python's recursion or paths longer than PATH_MAX (a build can make one): rm walks by
        # descriptors, stays on this filesystem and follows no link.
        removed = subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], capture_output=True, text=True,
                                 check=False)
        if removed.returncode != 0:
            raise ImageBuildError(f"could not remove {path}: {removed.stderr.strip()}") from None
        return
    if crossed:
        raise ImageBuildError(f"not removing {', '.join(crossed)} under {path}: another filesystem is there "
                              "(something mounted it during the removal); nothing below it was touched")
    with contextlib.suppress(FileNotFoundError):  # removed meanwhile by its owner (a machine's own stop)
        os.rmdir(path)


def _remove_contents(directory: str, device: int, crossed: list[str]) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return  # gone already: another remover got there first
    try:
        for entry in os.scandir(fd):
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # gone already
            if stat.S_ISDIR(info.st_mode):
                if info.st_dev != device:
                    crossed.append(os.path.join(directory, entry.name))
                    continue
                _remove_contents(os.path.join(directory, entry.name), device, crossed)
                try:
                    os.rmdir(entry.name, dir_fd=fd)
                except FileNotFoundError:
                    pass
                except OSError:
                    if not crossed:
                        raise
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.name, dir_fd=fd)
    finally:
        os.close(fd)


def _detach(point: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(point.encode(), _MNT_DETACH) != 0:
        errno = ctypes.get_errno()
        raise ImageBuildError(f"could not unmount {point} ({os.strerror(errno)}) left by a killed build; "
                              f"hint: umount -R {point}")


def clean_leftovers(folder: Path, progress: Callable[[str], None] = lambda line: None) -> list[Path]:
    """Remove the staging directories under ``folder`` whose builds were killed; return them.

    The dead build's processes are killed first (a package manager may still be writing there). A build of an
    older version of this plugin mounted in the host's namespace: such mounts, below a dead build's staging
    directory only, are detached (unmounting deletes nothing), then the tree is removed without crossing any
    mount. The builder runs as a :class:`~pytest_systemd_harden.machine.cgroups.Contained` named after its staging
    directory."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for staging in sorted(folder.iterdir()):
        if _MARK not in staging.name or _owner_alive(staging):
            continue
        stop_leftovers(staging.name)
        for point in mounts_under(staging):
            _detach(point)
        try:
            remove_tree(staging)
        except ImageBuildError as exc:  # said, and tried again next time: it must not stop every later build
            progress(f"could not remove {staging.name}, left by a build that was killed: {exc}")
            continue
        progress(f"removed {staging.name}, left by a build that was killed")
        removed.append(staging)
    return removed


def check_shape(root: Path, *, depth: int = 256, length: int = 3072) -> None:
    """Raise ImageBuildError if the tree at ``root`` is deeper than ``depth`` directories or holds a path longer than
    ``length`` bytes: no Debian tree does (its deepest are about 20 and 250), but a package's script can make one
    that walks by path would fail on (recursion, PATH_MAX). Follows no link; never descends past either bound."""
    stack = [(str(root), 0)]
    while stack:
        directory, level = stack.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                if level + 1 > depth or len(os.fsencode(entry.path)) > length:
                    what = f"deeper than {depth} directories" if level + 1 > depth else f"longer than {length} bytes"
                    raise ImageBuildError(
                        f"the build left a path {what} in {root} ({printable(entry.path[:160])}...): no Debian tree has one, so "
                        "a package's maintainer script made it\nhint: build the image without the packages just "
                        "added to find which")
                if entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, level + 1))


def write_atomically(path: Path, text: str, *, mode: int | None = None) -> None:
    """Write ``path`` whole or not at all (a temporary file beside it, renamed over it): concurrent runs and xdist
    workers read either the old file or the new one, with ``mode`` already. Raises OSError (a read-only cache),
    leaving nothing behind."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(text)
        if mode is not None:
            temporary.chmod(mode)
        temporary.replace(path)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise


def copy_tree(source: Path, target: Path, *, jobs: int = 8, whole: int = 300) -> None:
    """``cp -a source target``, done by up to ``jobs`` cp processes at once over parts of the tree.

    Creating an inode on some disks (this project's CI machines: 0.7-1 ms each) is mostly waiting, not work: four
    copies of an image at once took as long as one (docs/performance.md). So the tree is cut into subtrees of at
    most ``whole`` entries, each copied by one ``cp -a``, and files beside them in batches; the directories cut
    through are made here and get their owner, mode, extended attributes and times from the source once everything
    below them is in place. Hard links within one part are kept by cp; those across parts are linked again here, so
    the copy has the same inodes' link structure as ``cp -a`` makes. Raises OSError with cp's message if any part
    fails (``target`` is then partly made: the caller removes it)."""
    sizes: dict[str, int] = {}
    links: dict[tuple[int, int], list[str]] = {}
    for directory, dirs, files in os.walk(os.path.normpath(source), topdown=False):
        sizes[directory] = len(dirs) + len(files) + sum(sizes.get(os.path.join(directory, d), 0) for d in dirs)
        for name in files:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            if st.st_nlink > 1 and stat.S_ISREG(st.st_mode):
                links.setdefault((st.st_dev, st.st_ino), []).append(os.path.relpath(path, source))
    made: list[str] = []  # directories cut through, relative to source ("." for the top)
    parts: list[tuple[list[str], str]] = []  # (relative sources, relative destination directory) per cp
    part_of: dict[str, int] = {}

    def cut(relative: str) -> None:
        made.append(relative)
        loose: list[str] = []
        with os.scandir(os.path.normpath(os.path.join(source, relative))) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                child = os.path.normpath(os.path.join(relative, entry.name))
                if entry.is_dir(follow_symlinks=False) and sizes[entry.path] > whole:
                    cut(child)
                elif entry.is_dir(follow_symlinks=False):
                    parts.append(([child], relative))
                else:
                    loose.append(child)
        for start in range(0, len(loose), whole):
            parts.append((loose[start:start + whole], relative))

    cut(".")
    for index, (sources, _) in enumerate(parts):
        for one in sources:
            part_of[one] = index
    os.mkdir(target, 0o700)
    for relative in made[1:]:
        os.mkdir(os.path.join(target, relative), 0o700)  # parents come first in ``made``

    def copy(part: tuple[list[str], str]) -> None:
        sources, into = part
        done = subprocess.run(["cp", "-a", "--reflink=auto", "--", *(os.path.join(source, s) for s in sources),
                               os.path.join(target, into)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise OSError(f"cp -a {source} {target}: {done.stderr.strip()}")

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(copy, parts))
    relinked: set[str] = set()
    for group in links.values():
        first = group[0]
        for other in group[1:]:
            if _part_holding(other, part_of) != _part_holding(first, part_of):
                temporary = os.path.join(target, other + ".harden-link")
                os.link(os.path.join(target, first), temporary)
                os.replace(temporary, os.path.join(target, other))
                relinked.add(os.path.dirname(other))
    for relative in relinked:  # the link changed its directory's times
        times = os.lstat(os.path.join(source, relative))
        os.utime(os.path.join(target, relative), ns=(times.st_atime_ns, times.st_mtime_ns))
    for relative in reversed(made):  # deepest first: a directory's times are set after its children's
        _copy_metadata(os.path.join(source, relative), os.path.join(target, relative))


def _part_holding(relative: str, part_of: dict[str, int]) -> int:
    """The index of the part whose cp copies ``relative`` (the part of it or of its nearest listed ancestor)."""
    while relative not in part_of:
        relative = os.path.dirname(relative)
    return part_of[relative]


def _copy_metadata(source: str, target: str) -> None:
    st = os.lstat(source)
    for name in os.listxattr(source, follow_symlinks=False):
        os.setxattr(target, name, os.getxattr(source, name, follow_symlinks=False), follow_symlinks=False)
    os.chown(target, st.st_uid, st.st_gid, follow_symlinks=False)
    os.chmod(target, stat.S_IMODE(st.st_mode))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
