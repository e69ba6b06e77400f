"""Host root's way into an image's tree: every path resolved as the machine would resolve it, never outside the tree.

A build leaves whatever its packages' maintainer scripts made: they run as an unprivileged uid
(machine/build_sandbox.py), but they can leave ``etc`` as a link to ``/etc``. Afterwards host root reads and writes
the tree (the image's hostname, its device nodes, a VM's units, the dpkg database, a package's unit file); with
plain paths, a write of ``etc/hostname`` would then follow the link to the host's /etc. Here every path is opened
with ``openat2(RESOLVE_IN_ROOT)``: a link, absolute or relative, resolves inside the tree as in a chroot (so a unit
alias or a link to ``/usr/lib/...`` is read as the machine reads it, not from the host), ``..`` stops at the tree's
top, and no mount point or ``/proc`` magic link is crossed. A write replaces what is at its path (a link
included), never what a link points to. Needs Linux 5.6.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import os
import shutil
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

_OPENAT2 = 437
_RESOLVE_NO_XDEV, _RESOLVE_NO_MAGICLINKS, _RESOLVE_IN_ROOT = 0x01, 0x02, 0x10
_libc = ctypes.CDLL(None, use_errno=True)


def as_tree(root: Path | InTree) -> InTree:
    """``root`` as a tree: an InTree as it is, a path as ``InTree(root)``."""
    return root if isinstance(root, InTree) else InTree(root)


class InTree:
    """Paths (relative, ``/``-separated, an absolute one taken as from the tree's top) under ``root``."""

    def __init__(self, root: Path, *, running: bool = False) -> None:
        self.root = root
        # A running machine's tree is /proc/PID/root, a link by nature (to the root its processes see): followed,
        # and so are the machine's own mounts under it (its /run), which a built tree has none of.
        self._top_flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC | (0 if running else os.O_NOFOLLOW)
        self._resolve = _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS | (0 if running else _RESOLVE_NO_XDEV)

    def open(self, relative: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
        """A file descriptor of ``relative`` opened as the tree resolves it (see above); OSError as open(2) fails."""
        # The tree's top itself is never a link (ENOTDIR): a build could leave one where its tree should be.
        top = os.open(self.root, self._top_flags)
        try:
            how = struct.pack("=QQQ", flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0,  # else EINVAL
                              self._resolve)
            fd = _libc.syscall(_OPENAT2, top, relative.lstrip("/").encode() or b".", how, len(how))
            if fd < 0:
                error = ctypes.get_errno()
                raise OSError(error, os.strerror(error), str(self.root / relative.lstrip("/")))
            return int(fd)
        finally:
            os.close(top)

    @contextlib.contextmanager
    def _parent(self, relative: str) -> Iterator[tuple[int, str]]:
        """The directory holding ``relative`` (resolved in the tree) and the last name of it."""
        folder, _, name = relative.strip("/").rpartition("/")
        if name in ("", ".", ".."):
            raise OSError(errno.EINVAL, "not a name in a directory", str(self.root / relative))
        fd = self.open(folder, os.O_PATH | os.O_DIRECTORY)
        try:
            yield fd, name
        finally:
            os.close(fd)

    # -- reading ---------------------------------------------------------------------------------------------

    def _regular(self, relative: str, limit: int) -> tuple[int, int]:
        """``relative`` opened for reading, and its size, if it is a regular file of at most ``limit`` bytes: a
        build can leave a pipe (a read that never ends), a device node (``dev/zero``: one that never ends) or a huge
        file where host root reads text."""
        path = self.open(relative, os.O_PATH)
        try:
            found = os.fstat(path)
            where = str(self.root / relative.lstrip("/"))
            if not stat.S_ISREG(found.st_mode):
                raise OSError(errno.EINVAL, "not a regular file (a device node, a pipe, a socket or a directory)",
                              where)
            if found.st_size > limit:
                raise OSError(errno.EFBIG, f"larger than the {limit >> 20} MiB read from a tree", where)
            return os.open(f"/proc/self/fd/{path}", os.O_RDONLY | os.O_CLOEXEC), found.st_size
        finally:
            os.close(path)

    def read_bytes(self, relative: str, limit: int = 64 << 20) -> bytes:
        """The content of the regular file ``relative`` (OSError if it is anything else, or above ``limit``)."""
        fd, size = self._regular(relative, limit)
        with os.fdopen(fd, "rb") as file:
            return file.read(size)

    def read_text(self, relative: str) -> str:
        return self.read_bytes(relative).decode(errors="replace")

    def kind(self, relative: str) -> int | None:
        """The file type bits (``stat.S_IFMT``) of what ``relative`` resolves to, None if nothing is there."""
        try:
            fd = self.open(relative, os.O_PATH)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as error:
            if error.errno == errno.ELOOP:
                return None  # a link that never ends in the tree: nothing the machine could open either
            raise
        try:
            return stat.S_IFMT(os.fstat(fd).st_mode)
        finally:
            os.close(fd)

    def modified_ns(self, relative: str) -> int:
        """The modification time of what ``relative`` resolves to, in nanoseconds."""
        fd = self.open(relative, os.O_PATH)
        try:
            return os.fstat(fd).st_mtime_ns
        finally:
            os.close(fd)

    def is_file(self, relative: str) -> bool:
        return self.kind(relative) == stat.S_IFREG

    def is_dir(self, relative: str) -> bool:
        return self.kind(relative) == stat.S_IFDIR

    def is_link(self, relative: str) -> bool:
        """Whether ``relative`` itself (its last name) is a symbolic link."""
        try:
            with self._parent(relative) as (folder, name):
                return stat.S_ISLNK(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def readlink(self, relative: str) -> str:
        """The target of the symbolic link ``relative`` (its last name), as written."""
        with self._parent(relative) as (folder, name):
            return os.readlink(name, dir_fd=folder)

    def names(self, relative: str, pattern: str = "*") -> list[str]:
        """The sorted names in the directory ``relative`` that match ``pattern``; none if it is no directory."""
        try:
            fd = self.open(relative, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            return []
        try:
            return sorted(name for name in os.listdir(fd) if fnmatch.fnmatchcase(name, pattern))
        finally:
            os.close(fd)

    def copy_out(self, relative: str, target: Path, limit: int = 1 << 30) -> None:
        """Copy the regular file ``relative`` (at most ``limit`` bytes: a kernel, an initrd) to ``target``
        (outside the tree, written as usual)."""
        fd, size = self._regular(relative, limit)
        with os.fdopen(fd, "rb") as source, open(target, "wb") as copied:
            while size > 0:
                chunk = source.read(min(size, 1 << 20))
                if not chunk:
                    break
                copied.write(chunk)
                size -= len(chunk)

    def move_out(self, relative: str, target: Path) -> None:
        """Move the regular file ``relative`` (the name itself: a link is refused, never followed; so is a file with
        other names, which would stay in the tree with it) out of the tree to ``target``: renamed where both are on
        one filesystem, else copied and removed."""
        with self._parent(relative) as (folder, name):
            found = os.stat(name, dir_fd=folder, follow_symlinks=False)
            if not stat.S_ISREG(found.st_mode) or found.st_nlink != 1:
                raise OSError(errno.EINVAL, "not a regular file of one name", str(self.root / relative.lstrip("/")))
            try:
                os.rename(name, target, src_dir_fd=folder)
                return
            except OSError as error:
                if error.errno != errno.EXDEV:
                    raise
            self.copy_out(relative, target)
            os.unlink(name, dir_fd=folder)

    # -- writing ---------------------------------------------------------------------------------------------

    def write_bytes(self, relative: str, data: bytes, mode: int = 0o644) -> None:
        """``relative`` made a regular file holding ``data``: whatever was there (a link included) is replaced."""
        with self._parent(relative) as (folder, name), _created(folder, name, mode) as file:
            file.write(data)

    def copy_in(self, source: Path, relative: str, mode: int = 0o644, limit: int = 1 << 30) -> None:
        """``relative`` made a regular file holding a copy of the regular file ``source`` (outside the tree, read as
        usual; at most ``limit`` bytes): whatever was there (a link included) is replaced."""
        with open(source, "rb") as original:
            found = os.fstat(original.fileno())
            if not stat.S_ISREG(found.st_mode) or found.st_size > limit:
                raise OSError(errno.EFBIG, f"not a regular file of at most {limit >> 20} MiB", str(source))
            with self._parent(relative) as (folder, name), _created(folder, name, mode) as copy:
                shutil.copyfileobj(original, copy, 1 << 20)

    def write_text(self, relative: str, text: str, mode: int = 0o644) -> None:
        self.write_bytes(relative, text.encode(), mode)

    def mkdir(self, relative: str, mode: int = 0o755) -> None:
        """``relative`` and its missing parents made directories (each resolved in the tree)."""
        done = ""
        for part in relative.strip("/").split("/"):
            done = f"{done}/{part}" if done else part
            if self.kind(done) == stat.S_IFDIR:
                continue
            with self._parent(done) as (folder, name):
                os.mkdir(name, mode, dir_fd=folder)

    def unlink(self, relative: str) -> None:
        """Remove the file or link ``relative`` (a link itself, never what it points to); nothing if absent."""
        with contextlib.suppress(FileNotFoundError, NotADirectoryError), self._parent(relative) as (folder, name):
            os.unlink(name, dir_fd=folder)

    def chown(self, relative: str, uid: int, gid: int) -> None:
        """Give ``relative`` itself (a link's target never) to ``uid``:``gid``."""
        fd = self.open(relative, os.O_PATH | os.O_NOFOLLOW)
        try:
            os.chown(f"/proc/self/fd/{fd}", uid, gid)  # the magic link leads to what was opened, a link too
        finally:
            os.close(fd)

    def set_modified_ns(self, relative: str, nanoseconds: int) -> None:
        """Give ``relative`` itself (a link's target never) this access and modification time."""
        fd = self.open(relative, os.O_PATH | os.O_NOFOLLOW)
        try:
            os.utime(f"/proc/self/fd/{fd}", ns=(nanoseconds, nanoseconds))  # the magic link leads to what was opened
        finally:
            os.close(fd)

    def rmdir(self, relative: str) -> None:
        """Remove the empty directory ``relative``; nothing if absent."""
        with contextlib.suppress(FileNotFoundError, NotADirectoryError), self._parent(relative) as (folder, name):
            os.rmdir(name, dir_fd=folder)

    def symlink(self, relative: str, target: str) -> None:
        """``relative`` made a link to ``target``, replacing a file or link there."""
        with self._parent(relative) as (folder, name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=folder)
            os.symlink(target, name, dir_fd=folder)

    def mknod(self, relative: str, mode: int, device: int) -> None:
        """A device node at ``relative`` (absent before), with exactly ``mode``'s permission bits."""
        with self._parent(relative) as (folder, name):
            os.mknod(name, mode, device, dir_fd=folder)
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=folder)
            try:
                os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(mode))  # whatever the umask took
            finally:
                os.close(fd)

    def real_path(self, relative: str) -> Path:
        """Where ``relative``'s directory really is under the tree, with its last name: for a caller that removes
        a whole subtree with staging.remove_tree (which follows no link below it)."""
        with self._parent(relative) as (folder, name):
            return Path(os.readlink(f"/proc/self/fd/{folder}")) / name


@contextlib.contextmanager
def _created(folder: int, name: str, mode: int) -> Iterator[BinaryIO]:
    """``name`` in ``folder`` opened for writing as a regular file, empty, with exactly ``mode``: whatever was there
    that is not a regular file (a link, a pipe) is removed first, never followed."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISREG(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode):
            os.unlink(name, dir_fd=folder)
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=folder)
    with os.fdopen(fd, "wb") as file:
        os.fchmod(file.fileno(), mode)
        yield file
