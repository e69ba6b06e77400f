"""Debian root filesystems for the test machines: built once per package set, cached, never modified.

A machine boots its image under a writable layer of its own (backends/nspawn.py), so the cached tree is shared
read-only by every container, run and xdist worker. A release's base is a whole tree; a package set is a layer over
it (what apt added, :func:`install_on_base`), joined with it by an overlay wherever it is used (machine/mounts.py):
in a machine's mount namespace, or a keeper's for host root to read it (:func:`layers_tree`), never on the host.
Builds happen under a lock, into a staging directory renamed into place only
when complete, so a concurrent or interrupted build never leaves a half-made image behind; the builder runs in a
mount namespace of its own and in a cgroup of its own, so whatever ends it, no mount of its reaches the host and
no process of it outlives the build (see machine/staging.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..errors import BackendUnavailable, ImageBuildError, MachineError, printable
from ..in_tree import InTree, as_tree
from ..probes.catalogue import MACHINE_ADDRESS
from ..spec.machine import MachineConfig
from ..spec.releases import DEFAULT_RELEASE, RELEASES
from ..spec.unit_file import needs_named_in, template_of, units_needed
from . import build_sandbox, mounts
from .backends.userns import move_ownership
from .cgroups import Contained, output_lines
from .staging import clean_leftovers, remove_tree, staging_dir, write_atomically

# Bump when the recipe below changes, so old caches are not reused for a different image.
RECIPE_VERSION = 5
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "libnss-systemd", "python3", "iproute2", "procps",
                 "strace")  # strace: tighten observes what the scenarios use in one traced run
# Units a test machine has no use for: they slow the boot or wake up during a run.
MASKED_UNITS = (
    "console-getty.service", "getty@.service", "container-getty@.service", "apt-daily.timer",
    "apt-daily-upgrade.timer", "e2scrub_all.timer", "dpkg-db-backup.timer", "fstrim.timer",
    "systemd-tmpfiles-clean.timer",
)
HOSTNAME = "harden"
# An image whose archive was last checked longer ago than this is checked again: a new upload gives a new image.
DEFAULT_MAX_AGE_DAYS = 7.0

Progress = Callable[[str], None]


def default_cache_dir() -> Path:
    explicit = os.environ.get("HARDEN_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "pytest-systemd-harden"


def default_mirror() -> str:
    return os.environ.get("HARDEN_MIRROR", "http://deb.debian.org/debian")


def default_security_mirror(mirror: str) -> str | None:
    """Where the security suites are: $HARDEN_SECURITY_MIRROR, else beside Debian's own mirror; None for another
    mirror (a local one may have no security suite)."""
    explicit = os.environ.get("HARDEN_SECURITY_MIRROR")
    if explicit is not None:
        return explicit or None
    return mirror.removesuffix("/debian") + "/debian-security" if mirror.endswith("deb.debian.org/debian") \
        else None


@dataclass(frozen=True)
class Image:
    """A built root filesystem and what went into it."""

    key: str
    rootfs: Path
    packages: tuple[str, ...]
    release: str = DEFAULT_RELEASE
    # Every installed package's version, as dpkg records it in the image ({} for images of an older recipe).
    versions: Mapping[str, str] = field(default_factory=dict)
    debs: tuple[str, ...] = ()  # the local .deb files installed on top, as given
    # The trees the image is made of, top first: a package set built on its release's base is its own layer (what
    # apt added) over the base's tree, and ``rootfs`` the empty directory they are joined on where a machine boots
    # it (an overlay in the machine's mount namespace only); an image built in full is ``rootfs`` alone.
    layers: tuple[Path, ...] = ()

    @property
    def systemd_version(self) -> str | None:
        return self.versions.get("systemd")

    @property
    def trees(self) -> tuple[Path, ...]:
        """The directories the image is made of, top first: its layers, or ``rootfs`` alone."""
        return self.layers or (self.rootfs,)

    def tree(self) -> InTree:
        """The image's tree as a machine booted from it sees it, for host root to read (see :func:`layers_tree`)."""
        return layers_tree(self.trees, self.rootfs)


@dataclass(frozen=True)
class ImageWanted:
    """An image a session will need: a release, extra packages, local .debs (as :meth:`ImageCache.get` takes
    them)."""

    release: str = DEFAULT_RELEASE
    packages: tuple[str, ...] = ()
    debs: tuple[str, ...] = ()

    def describe(self) -> str:
        extra = [*self.packages, *(os.path.basename(deb) for deb in self.debs)]
        return f"Debian {self.release}" + (f" + {', '.join(extra)}" if extra else " base")


# dpkg-deb unpacks a spec's own .deb (ar, a compressed tar) to read its control file: not as host root, but as a uid
# of no account (the last of build_sandbox.HELPER_UIDS; QEMU's are below it), the file given open on stdin.
_DEB_READER_UID = build_sandbox.HELPER_UIDS + 0xFFFF


def deb_package_name(path: str) -> str:
    """The package a local .deb file holds (its control file's Package:), or the file name's first part."""
    guessed = Path(path).name.split("_", 1)[0]
    try:
        with open(path, "rb") as deb:
            found = subprocess.run(["setpriv", f"--reuid={_DEB_READER_UID}", f"--regid={_DEB_READER_UID}",
                                    "--clear-groups", "--no-new-privs", "dpkg-deb", "-f", "-", "Package"],
                                   stdin=deb, capture_output=True, text=True, check=False,
                                   env=build_sandbox.helper_environment())
    except OSError:
        return guessed
    return found.stdout.strip() or guessed


def deb_digest(path: str) -> str:
    """The content hash of a local .deb: a rebuilt package is a new image even under the same file name."""
    digest = hashlib.sha256()
    with open(path, "rb") as deb:
        for block in iter(lambda: deb.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ImageCache:
    """Builds and finds images under ``cache_dir/images/<key>/rootfs``.

    An image's key covers the recipe, the release, the package set, the content of every local .deb and the state
    of the archive (the date of each suite's Release file): a new upload to the archive, once seen, or a rebuilt
    .deb always gives a new image. The archive is looked at again when the last look is older than ``max_age``
    days, or at once with ``refresh`` (--harden-refresh-images); without a network the last state seen is used.
    """

    def __init__(self, cache_dir: Path | None = None, mirror: str | None = None, *,
                 max_age_days: float = DEFAULT_MAX_AGE_DAYS, refresh: bool = False) -> None:
        self.cache_dir = cache_dir or default_cache_dir()
        self.mirror = mirror or default_mirror()
        self.security_mirror = default_security_mirror(self.mirror)
        self.max_age = max_age_days * 86400
        self.refresh = refresh
        self._archive_states: dict[str, str] = {}
        self._lock = threading.Lock()
        self._held: dict[str, IO[str]] = {}
        # Builds that failed in this process, by key: every machine needing the image gets the same error at once
        # instead of a build each (prepare() may have tried it before any machine asked).
        self._failed: dict[str, ImageBuildError] = {}

    def _hold(self, final: Path) -> None:
        """Mark the image in use for as long as this process lives (a shared lock on its key's lock file, which
        the kernel drops when the process ends, however it ends): prune skips it."""
        with self._lock:
            if final.name not in self._held:
                try:
                    lock = open(final.parent / f"{final.name}.lock", "a")  # noqa: SIM115 (held until exit)
                except OSError:
                    return  # a read-only cache (restored, or bound into a machine): nobody prunes it
                fcntl.flock(lock, fcntl.LOCK_SH)
                self._held[final.name] = lock

    def sources(self, release: str) -> list[str]:
        """The apt source lines an image of ``release`` is built from."""
        info = RELEASES[release]
        lines = [f"deb {self.mirror} {release} main"]
        if info.updates:
            lines.append(f"deb {self.mirror} {release}-updates main")
        if info.security and self.security_mirror:
            lines.append(f"deb {self.security_mirror} {release}-security main")
        return lines

    def archive_state(self, release: str, progress: Progress = lambda line: None) -> str:
        """A fingerprint of the archive's suites for ``release`` (their Release files' dates), looked up at most
        once per ``max_age`` (each run with ``refresh``); the last one seen where the archive cannot be reached."""
        with self._lock:
            if release in self._archive_states:
                return self._archive_states[release]
            record = self.cache_dir / "archive" / f"{release}.json"
            try:
                known = json.loads(record.read_text())
            except (OSError, ValueError):
                known = None
            fresh = known is not None and not self.refresh and time.time() - known["checked"] < self.max_age
            if fresh:
                state = str(known["state"])
            else:
                try:
                    state = self._fetch_archive_state(release)
                except OSError as exc:
                    if known is None:
                        state = "unknown"
                        progress(f"could not read the {release} archive's state ({exc}); building from it as it is")
                    else:
                        state = str(known["state"])
                        progress(f"could not read the {release} archive's state ({exc}); using the state seen "
                                 f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(known['checked']))}")
                else:
                    with contextlib.suppress(OSError):  # a read-only cache: looked up again next run
                        write_atomically(record, json.dumps({"state": state, "checked": time.time()}))
            self._archive_states[release] = state
            return state

    def _fetch_archive_state(self, release: str) -> str:
        dates = []
        for line in self.sources(release):
            _deb, mirror, suite, _component = line.split()
            request = urllib.request.Request(f"{mirror}/dists/{suite}/InRelease", headers={"Range": "bytes=0-4095"})
            with urllib.request.urlopen(request, timeout=15) as answer:
                head = answer.read(4096).decode(errors="replace")
            date = next((ln.split(":", 1)[1].strip() for ln in head.splitlines() if ln.startswith("Date:")), "")
            dates.append(f"{suite}={date}")
        return hashlib.sha256("\n".join(dates).encode()).hexdigest()[:12]

    @staticmethod
    def key_for(packages: Iterable[str], release: str = DEFAULT_RELEASE, debs: Iterable[str] = (),
                archive: str = "") -> str:
        wanted = sorted(set(BASE_PACKAGES) | set(packages))
        text = json.dumps({"recipe": RECIPE_VERSION, "release": release, "packages": wanted,
                           "debs": sorted(deb_digest(d) for d in debs), "archive": archive}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def path_for(self, packages: Iterable[str], *, release: str = DEFAULT_RELEASE, debs: Iterable[str] = ()) -> Path:
        """Where the image of ``release`` with ``packages`` and ``debs`` is (or will be) cached."""
        return self.cache_dir / "images" / self.key_for(packages, release, debs, self.archive_state(release))

    def get(self, packages: Iterable[str], progress: Progress = lambda line: None, *,
            release: str = DEFAULT_RELEASE, debs: Iterable[str] = ()) -> Image:
        """The image of ``release`` with ``packages`` and the local ``debs`` on top of the base set, built first if
        it is not cached."""
        if release not in RELEASES:
            raise ImageBuildError(f"unknown Debian release {release!r}; known: {', '.join(RELEASES)}")
        extra = tuple(sorted(set(packages)))
        debs = tuple(debs)
        missing = [deb for deb in debs if not os.path.isfile(deb)]
        if missing:
            raise ImageBuildError(f"local package {missing[0]} does not exist (machine.debs)")
        key = self.key_for(extra, release, debs, self.archive_state(release, progress))
        final = self.cache_dir / "images" / key
        if not _complete(final):
            if key in self._failed:
                raise self._failed[key]
            _private(final.parent)
            # A lock file of its own, not KEY.lock: a run using the image holds a shared lock on that one for as long
            # as it lives (_hold), and a second builder waiting there for the first would wait until the first's
            # whole run ended (an xdist worker), or forever (another thread of the same run: prepare()).
            with open(final.parent / f"{key}.build-lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # another worker (or thread, see prepare) may be building it
                clean_leftovers(final.parent, progress)
                if not _complete(final):
                    try:
                        self._build(final, extra, release, debs, progress)
                    except ImageBuildError as exc:
                        self._failed[key] = exc
                        raise
        else:
            with contextlib.suppress(OSError):  # one built before images were kept private, unless read-only
                _private(final.parent)
        return self._found(final, extra, release, debs)

    def cached(self, packages: Iterable[str], *, release: str = DEFAULT_RELEASE, debs: Iterable[str] = ()) \
            -> Image | None:
        """The image of ``release`` with ``packages`` and ``debs`` if it is cached, else None: nothing is built."""
        debs = tuple(debs)
        if release not in RELEASES or any(not os.path.isfile(deb) for deb in debs):
            return None
        extra = tuple(sorted(set(packages)))
        final = self.path_for(extra, release=release, debs=debs)
        return self._found(final, extra, release, debs, use=False) if _complete(final) else None

    def _found(self, final: Path, extra: tuple[str, ...], release: str, debs: tuple[str, ...], *,
               use: bool = True) -> Image:
        """The complete image in ``final``; with ``use``, held in use for as long as this process lives and
        marked as used now (a look at it, :meth:`cached`, is neither)."""
        manifest = json.loads((final / "manifest.json").read_text())
        layers: tuple[Path, ...] = ()
        if manifest.get("base"):  # _complete() checked its name and that it is complete
            base = final.parent / manifest["base"]
            if use:
                self._hold(base)  # prune keeps it while this image is in use
            layers = (final / LAYER, base / "rootfs")
        if use:
            self._hold(final)
            with contextlib.suppress(OSError):  # a read-only cache (restored in CI) is still usable
                os.utime(final / "manifest.json")  # its mtime says when the image was last used (cache list, prune)
        return Image(final.name, final / "rootfs", extra, release, manifest.get("versions", {}), debs, layers)

    def missing(self, wanted: Iterable[ImageWanted]) -> list[ImageWanted]:
        """The images of ``wanted`` not cached yet, each once, the base image of each release among them first
        (every package set is built on its release's base, see :meth:`_on_cached_base`)."""
        needed: dict[str, ImageWanted] = {}
        for want in wanted:
            for one in (ImageWanted(want.release), want) if want.packages or want.debs else (want,):
                if one.release not in RELEASES or any(not os.path.isfile(deb) for deb in one.debs):
                    continue  # get() says what is wrong, for the spec that asks
                key = self.key_for(one.packages, one.release, one.debs, self.archive_state(one.release))
                if key not in needed and not _complete(self.cache_dir / "images" / key):
                    needed[key] = one
        return sorted(needed.values(), key=lambda one: bool(one.packages or one.debs))

    def prepare(self, wanted: Iterable[ImageWanted], progress: Progress = lambda line: None, *, threads: int = 2,
                rotate: int = 0) -> list[tuple[ImageWanted, ImageBuildError | None]]:
        """Build the images of ``wanted`` not cached yet, ``threads`` at a time (bases first), each build's
        progress lines prefixed with its image; return each build tried and its error (None: built).
        :meth:`start_preparing`, waited for."""
        return self.start_preparing(wanted, progress, threads=threads, rotate=rotate).results()

    def start_preparing(self, wanted: Iterable[ImageWanted], progress: Progress = lambda line: None, *,
                        threads: int = 2, rotate: int = 0,
                        then: Callable[[ImageWanted, Image], None] | None = None,
                        background: bool = True) -> Preparation:
        """Start building the images of ``wanted`` not cached yet in the background, ``threads`` at a time, bases
        first and the package sets in the order given; ``then`` runs in the build's thread after each image built.

        A session that needs several images pays for the slowest few, not their sum: a build is mostly dpkg
        unpacking and configuring, one core's work, and apt's downloads overlap the other build's; and its first
        tests run while the images of later ones are still being built (:meth:`Preparation.wait`). ``rotate``
        starts this process at another place in the list (an xdist worker's index), so two workers preparing
        the same session build different images first rather than waiting on one another's lock. A failed build
        is not raised here: the machine that needs the image raises its error (remembered, not built again). With
        ``background``, a build nobody waits for yet takes only the CPU left idle (:class:`BuildPriority`)."""
        todo = self.missing(wanted)
        bases = [one for one in todo if not (one.packages or one.debs)]
        tops = [one for one in todo if one.packages or one.debs]
        if rotate:
            bases = bases[rotate % len(bases):] + bases[:rotate % len(bases)] if bases else bases
            tops = tops[rotate % len(tops):] + tops[:rotate % len(tops)] if tops else tops
        todo = bases + tops
        if todo:
            progress(f"{len(todo)} image(s) to build, {min(threads, len(todo))} at a time: "
                     + "; ".join(one.describe() for one in todo))
        return Preparation(self, todo, progress, threads=threads, then=then, background=background)

    def _build(self, final: Path, extra: tuple[str, ...], release: str, debs: tuple[str, ...],
               progress: Progress) -> None:
        staging = staging_dir(final)
        staging.mkdir(parents=True)
        rootfs = staging / "rootfs"
        packages = sorted(set(BASE_PACKAGES) | set(extra))
        label = "base image" + (f" + {', '.join(extra)}" if extra else "") + \
            (f" + {', '.join(os.path.basename(d) for d in debs)}" if debs else "")
        progress(f"building {label} (Debian {release}, {len(packages) + len(debs)} packages) into {final}")
        started = time.monotonic()

        def run_builder() -> tuple[str, dict[str, str] | None, str | None]:
            on_base = self._on_cached_base(staging, extra, release, debs, progress)
            if on_base is not None:
                return on_base
            lists = None if extra or debs else staging / APT_LISTS  # a base: its package sets install from them
            return self._run_builder(staging, rootfs, packages, release, debs, progress, lists_into=lists), None, None

        try:
            try:
                builder, versions, base = run_builder()
            except build_sandbox.MemoryFilled as exc:
                progress(f"  {str(exc).split(';')[0]}: building it again on the disk")
                remove_tree(rootfs)
                remove_tree(staging / LAYER)
                remove_tree(staging / APT_LISTS)
                with build_sandbox.on_the_disk():
                    builder, versions, base = run_builder()
            if versions is None:
                _customize(InTree(rootfs))
                versions = installed_versions(rootfs)
            else:
                rootfs.mkdir()  # where a machine's mount namespace joins the layer and its base
            (staging / "manifest.json").write_text(json.dumps({
                "release": release, "packages": packages, "debs": [os.path.basename(d) for d in debs],
                "builder": builder, "sources": self.sources(release), "recipe": RECIPE_VERSION,
                "seconds": round(time.monotonic() - started, 1), "built": time.time(), "versions": versions,
                **({"base": base} if base else {}),
            }, indent=2))
            remove_tree(final)
            staging.rename(final)
        finally:
            remove_tree(staging)
        named = ("systemd", *extra, *(deb_package_name(deb) for deb in debs))
        shown = ", ".join(f"{name} {versions[name]}" for name in named if name in versions)
        progress(f"built {label} in {time.monotonic() - started:.0f}s ({shown})")

    def _on_cached_base(self, staging: Path, extra: tuple[str, ...], release: str, debs: tuple[str, ...],
                        progress: Progress) -> tuple[str, dict[str, str], str] | None:
        """Build the image in ``staging`` as a layer over the cached base image: what apt adds installing ``extra``
        (:func:`install_on_base`; about a quarter of a full build's time, see docs/performance.md); its builder,
        package versions and the base's key. None, and nothing left in ``staging``, where a full build must do it:
        no extra packages, a VM's kernel (a VM's disk is made from one tree; its initramfs hooks were measured only
        by full builds), another architecture's package (mmdebstrap sets up multiarch), or apt failing on the base.
        Local .debs are installed with the rest. A base not cached yet is built first: base and packages on top cost
        about half a full build, and every later package set starts from it (a fresh cache's first image is usually
        one with packages)."""
        if not (extra or debs) or set(extra) & set(VM_PACKAGES) or any(":" in p for p in extra):
            return None
        if on_overlayfs(staging):
            progress("  building it in full: the cache is on an overlayfs (a container's own root?), and a layer "
                     "over a base there cannot be built (the build reads the base through an idmapped mount, which "
                     "overlayfs refuses: EINVAL)")
            return None
        try:
            base = self.get((), progress, release=release)
        except ImageBuildError:
            return None  # the full build says what is wrong
        shown = [*extra, *(os.path.basename(d) for d in debs)]
        progress(f"  installing {', '.join(shown)} on the cached base image")
        try:
            versions = install_on_base(base.rootfs, staging / LAYER, extra, progress, debs=debs)
        except AptRefused as exc:
            raise ImageBuildError(f"Debian {release}: {exc}") from None
        except build_sandbox.MemoryFilled:
            raise  # a full build would fill it too: built again on the disk (_build)
        except ImageBuildError as exc:
            progress(f"  that failed, building the image in full instead: {str(exc).splitlines()[0]}")
            remove_tree(staging / LAYER)
            return None
        return f"apt on the cached base image {base.key}", versions, base.key

    def _run_builder(self, staging: Path, rootfs: Path, packages: list[str], release: str, debs: tuple[str, ...],
                     progress: Progress, *, lists_into: Path | None = None) -> str:
        """Build ``rootfs`` (in ``staging``) in full, in the build sandbox (machine/build_sandbox.py): mmdebstrap as
        root of a user namespace, so the packages' maintainer scripts never run as host root. With ``lists_into``,
        the package lists mmdebstrap downloaded are moved there (:func:`_keep_package_lists`)."""
        foreign = sorted({p.partition(":")[2] for p in packages if ":" in p})
        if not shutil.which("mmdebstrap"):
            raise BackendUnavailable("mmdebstrap is not installed: apt-get install mmdebstrap")
        base = build_sandbox.build_base(staging.name)
        inside = Path(build_sandbox.INSIDE)
        command = ["mmdebstrap", "--mode=unshare", "--variant=minbase", f"--include={','.join(packages)}",
                   *(f"--include={inside / 'debs' / os.path.basename(deb)}" for deb in debs), release,
                   str(inside / rootfs.name), *self.sources(release)]
        if foreign:
            command.insert(1, f"--architectures={','.join([_native_architecture(), *foreign])}")
        if debs:  # dpkg in the chroot must see the .deb files at the same paths
            command.insert(1, "--hook-dir=/usr/share/mmdebstrap/hooks/file-mirror-automount")
        if lists_into is not None:  # left in the tree, moved out of it below
            command.insert(1, "--skip=cleanup/apt/lists")
        work = build_sandbox.prepare(staging, base)
        returncode: int | None = None
        try:
            # The .debs are copied in: the build's root may not read them where they are (a uid of no account).
            local = work / "debs"
            local.mkdir()
            for deb in debs:
                shutil.copyfile(deb, local / os.path.basename(deb))
            move_ownership(local, 0, base)
            # The builder's temporary files (mmdebstrap's gpg home, apt config, dpkg's ~/.dpkg.cfg) stay in the build.
            tmp = work / "tmp"
            tmp.mkdir()
            os.chown(tmp, base, base)
            returncode, tail = _run_contained(
                build_sandbox.sandboxed(command, staging, base, self.sources(release)), staging.name, progress,
                lambda line: f"  {command[0]}: {line}" if line.startswith(("I:", "E:", "W:")) else None,
                build_sandbox.environment({"TMPDIR": str(inside / "tmp"), "HOME": str(inside / "tmp")}))
        finally:
            # Only a build that ended well is taken out: after an error or an interruption, some of it may still run.
            made = build_sandbox.finish(staging, rootfs.name, keep=returncode == 0)
        refused = build_sandbox.refusal(returncode, tail)
        if refused:
            raise ImageBuildError(refused)
        if returncode != 0:
            verdict = apt_verdict(tail)
            raise ImageBuildError((f"Debian {release}: {verdict}\n" if verdict else "")
                                  + f"{command[0]} failed (exit status {returncode}) building "
                                  f"{rootfs}:\n" + "\n".join(tail)
                                  + f"\nhint: is every package name a Debian {release} package, and does every "
                                  "local .deb's dependency exist there? Is the mirror "
                                  f"{self.mirror} reachable? (set HARDEN_MIRROR to use another)")
        if made != rootfs:
            raise ImageBuildError(_no_tree_left(command[0], rootfs))
        build_sandbox.take_back(rootfs, base)
        _make_device_nodes(rootfs)
        if lists_into is not None:
            _keep_package_lists(InTree(rootfs), lists_into)
        return command[0]


class BuildPriority:
    """The CPU share of an image's build in the background (:class:`Preparation`): next to nothing while nobody
    waits for the image (:meth:`Contained.set_background`), so that the tests, and the builds of the images they
    wait for, have the cores first and it takes the time they leave idle; as much as any other's from the moment
    someone waits for it (:meth:`wanted`). A serial run's tests keep one core of two busy (docs/performance.md,
    section 9, has the runs)."""

    def __init__(self, *, background: bool) -> None:
        self._background = background
        self._steps: list[Contained] = []
        self._lock = threading.Lock()

    def started(self, step: Contained) -> None:
        """``step`` is a process tree of this build (_run_contained)."""
        with self._lock:
            self._steps.append(step)
            if self._background:
                step.set_background(True)

    @property
    def in_background(self) -> bool:
        return self._background

    def ended(self, step: Contained) -> None:
        """``step`` is about to be reaped: never touched from here on (its pid could be reused). Idempotent."""
        with self._lock:
            if step in self._steps:
                self._steps.remove(step)

    def wanted(self) -> None:
        """Someone waits for the image: its build runs as anything else from now on."""
        with self._lock:
            if not self._background:
                return
            self._background = False
            for step in self._steps:
                step.set_background(False)


# The priority of the image build this thread runs for a Preparation (None: a caller's own build, never lowered).
_BUILD_PRIORITY: contextvars.ContextVar[BuildPriority | None] = contextvars.ContextVar("build_priority",
                                                                                       default=None)


class Preparation:
    """Images being built in the background (:meth:`ImageCache.start_preparing`), ``threads`` at a time in the order
    of ``todo``. A machine that needs one now waits for it if its build is under way, else builds it itself
    (:meth:`wait`): never behind builds of images it does not need. A build nobody waits for yet runs in the
    background (:class:`BuildPriority`)."""

    def __init__(self, cache: ImageCache, todo: list[ImageWanted], progress: Progress, *, threads: int,
                 then: Callable[[ImageWanted, Image], None] | None = None, background: bool = True) -> None:
        self.todo = todo
        self._background = background
        self._cache = cache
        self._progress = progress
        self._then = then
        self._pending = list(todo)  # not started yet, in the order they will be
        self._results: dict[ImageWanted, ImageBuildError | None] = {}
        self._left: set[ImageWanted] = set()  # taken off the list by wait(): the callers' get() builds them
        self._wanted: set[ImageWanted] = set()  # waited for by someone: built at the priority of anything else
        self._priorities: dict[ImageWanted, BuildPriority] = {}  # of the builds under way
        self._changed = threading.Condition()
        self._shown = threading.Lock()  # one line at a time, whole, from every build
        self._stopped = False
        self._threads = [threading.Thread(target=self._work, name=f"harden-image-{number}", daemon=True)
                         for number in range(min(max(1, threads), len(todo)))]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while True:
            with self._changed:
                if self._stopped or not self._pending:
                    return
                one = self._pending.pop(0)
            error = self._build(self.todo.index(one) + 1, one)
            with self._changed:
                self._results[one] = error
                self._changed.notify_all()

    def _build(self, number: int, one: ImageWanted) -> ImageBuildError | None:
        prefix = f"image {number}/{len(self.todo)} ({one.describe()}): "

        def said(line: str) -> None:
            with self._shown:
                self._progress(prefix + line.lstrip())

        with self._changed:
            priority = self._priorities[one] = BuildPriority(background=self._background and one not in self._wanted)
        token = _BUILD_PRIORITY.set(priority)
        try:
            image = self._cache.get(one.packages, said, release=one.release, debs=one.debs)
            if self._then is not None:
                self._then(one, image)
        except ImageBuildError as exc:
            said(f"failed: {str(exc).splitlines()[0]} (the specs that need it will say why)")
            return exc
        except Exception as exc:  # noqa: BLE001 - the machine that needs it meets the same error and says it
            said(f"failed: {exc} (the specs that need it will say why)")
            return ImageBuildError(str(exc))
        finally:
            _BUILD_PRIORITY.reset(token)
            with self._changed:
                del self._priorities[one]
        return None

    def _want(self, wants: Iterable[ImageWanted]) -> None:
        """Someone waits for ``wants``: their builds (and their bases', which they wait for in turn) leave the
        background, those under way at once, the others when they start."""
        with self._changed:
            wanted = {one for want in wants for one in (want, ImageWanted(want.release))}
            self._wanted |= wanted
            under_way = [self._priorities[one] for one in wanted if one in self._priorities]
        for priority in under_way:
            priority.wanted()

    def wait(self, want: ImageWanted, progress: Progress = lambda line: None) -> None:
        """Return once ``want`` is built or failed, if its build is under way here; at once otherwise: when it has not
        started, it (and its base, if not started either) is taken off this preparation's list, and the caller's
        :meth:`ImageCache.get` builds it in the caller's thread, which would only wait. (A build slot may be busy
        for a while with an image needed later: under xdist, one worker's first build is the second release's
        base; a test should not wait behind it.)"""
        # Waited for here, or its base (under way, which the caller's own build would wait for): neither is left
        # in the background.
        self._want([want])
        with self._changed:
            if want in self._pending:
                mine = {want, ImageWanted(want.release)} & set(self._pending)
                self._pending = [one for one in self._pending if one not in mine]
                self._left |= mine
                return
            if self._needs_no_wait(want):
                return  # a base taken off with its package set is the first caller's to build: get() waits for it
            shown = f"waiting for image {self.todo.index(want) + 1}/{len(self.todo)} ({want.describe()}), being built"
        progress(shown)
        with self._changed:
            while want not in self._results:
                self._changed.wait()

    def first_ready(self, wants: Sequence[ImageWanted]) -> int:
        """The index in ``wants`` of the image a caller should take first: one that needs no wait (built, failed,
        not this preparation's, or the caller's own to build); else the first to finish of those being built, waited
        for; else (none started yet) the first. A caller with several machines to boot boots them in the order
        their images are ready, not behind one still building."""
        self._want(wants)  # the caller waits for one of them, and boots the others next
        with self._changed:
            while True:
                for index, want in enumerate(wants):
                    if self._needs_no_wait(want):
                        return index
                if all(want in self._pending for want in wants):
                    return 0
                self._changed.wait()

    def _needs_no_wait(self, want: ImageWanted) -> bool:
        """Built or failed, not this preparation's, or taken off its list for the caller to build (hold _changed)."""
        return want not in self.todo or want in self._results or want in self._left

    def results(self) -> list[tuple[ImageWanted, ImageBuildError | None]]:
        """Every build tried and its error (None: built), once all are done."""
        self._want(self.todo)  # the caller waits for them all
        for thread in self._threads:
            thread.join()
        return [(one, self._results[one]) for one in self.todo if one in self._results]

    def stop(self) -> None:
        """Start no more builds, and wait for those under way: a build is never cut off (its staging directory
        would be left for the next run to clean) and nothing of it outlives the session."""
        with self._changed:
            self._stopped = True
            self._changed.notify_all()
        self._want(self.todo)  # the caller waits for those under way
        for thread in self._threads:
            thread.join()


@dataclass(frozen=True)
class CachedImage:
    """An image in the cache, as ``systemd-harden cache list`` shows it."""

    key: str
    path: Path
    release: str
    packages: tuple[str, ...]
    debs: tuple[str, ...]
    built: float
    used: float  # when a run last booted it
    superseded: bool  # a newer image of the same release, packages and .deb names exists
    base: str | None = None  # the key of the base image its layer is over (None: built in full)

    def size(self) -> int:
        """The bytes it takes on the disk (a layered image: its layer, not its base's)."""
        return sum(entry.lstat().st_blocks * 512 for entry in self.path.rglob("*"))


def cached_images(cache_dir: Path) -> list[CachedImage]:
    """Every complete image under ``cache_dir``, oldest first."""
    found = []
    for folder in sorted((cache_dir / "images").glob("*")):
        if not folder.is_dir() or not _complete(folder):
            continue
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
            used = (folder / "manifest.json").stat().st_mtime
        except (OSError, ValueError):
            continue
        found.append((manifest, folder, used))
    found.sort(key=lambda entry: entry[0].get("built", 0))

    def what(manifest: dict[str, Any]) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
        # An older recipe's manifest says "suite" where a newer one says "release".
        return (str(manifest.get("release", manifest.get("suite", "?"))), tuple(manifest.get("packages", ())),
                tuple(manifest.get("debs", ())))

    newest = {what(manifest): folder.name for manifest, folder, _used in found}  # the last built wins
    return [CachedImage(folder.name, folder, *what(manifest), float(manifest.get("built", used)), used,
                        newest[what(manifest)] != folder.name, manifest.get("base") or None)
            for manifest, folder, used in found]


def prune(cache_dir: Path, unused_days: float = 30.0, progress: Progress = lambda line: None) -> list[CachedImage]:
    """Remove superseded images and images no run has booted for ``unused_days``; never one in use (a run holds
    it), being built, or the base of an image kept (its layer is over it). Return what was removed."""
    images = cached_images(cache_dir)
    stale = {image.key for image in images
             if image.superseded or time.time() - image.used >= unused_days * 86400}
    removed = []
    for image in sorted(images, key=lambda image: image.base is None):  # layers first: their bases may follow
        if image.key not in stale:
            continue
        over = [other.key for other in images if other.base == image.key and other not in removed]
        if over:
            progress(f"kept {image.key}: the base of {', '.join(over)}")
            continue
        with open(image.path.parent / f"{image.key}.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                progress(f"kept {image.key}: a run is using it")
                continue
            remove_tree(image.path)
        progress(f"removed {image.key} (Debian {image.release}"
                 f"{', superseded' if image.superseded else ''}, last used "
                 f"{time.strftime('%Y-%m-%d', time.localtime(image.used))})")
        removed.append(image)
    return removed


# What apt says when a package set cannot be installed, in the words a user acts on.
_APT_PROBLEMS = (
    re.compile(r"^\s*(?P<what>\S+ : (Pre)?Depends: .+)$"),
    re.compile(r"^E: (?P<what>Unable to locate package .+)$"),
    re.compile(r"^E: (?P<what>Package '?\S+?'? has no installation candidate)$"),
    re.compile(r"^E: (?P<what>Version '.+' for '.+' was not found)$"),
)


def apt_verdict(lines: Iterable[str]) -> str:
    """The lines of apt's output that say why the packages cannot be installed, joined; empty if none do."""
    found = []
    for line in lines:
        for pattern in _APT_PROBLEMS:
            match = pattern.match(line)
            if match:
                found.append(" ".join(match["what"].split()))
                break
    return "; ".join(dict.fromkeys(found))


def _complete(final: Path, *, layer: bool = True) -> bool:
    """Whether ``final`` holds a whole image: built in full, or (``layer``) its layer over a base built in full."""
    try:
        base = json.loads((final / "manifest.json").read_text()).get("base")
    except (OSError, ValueError, AttributeError):
        return False
    if base:  # one level: a base is built in full (never the image itself, nor another layer)
        # On an overlayfs (a cache restored into a container) a layer cannot be booted: it is built again, in full.
        return layer and isinstance(base, str) and re.fullmatch(r"[0-9a-f]{16}", base) is not None and \
            (final / LAYER).is_dir() and _complete(final.parent / base, layer=False) and not on_overlayfs(final)
    return (final / "rootfs" / "usr" / "lib" / "systemd" / "systemd").exists()


def _native_architecture() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()


def installed_packages(rootfs: Path | InTree) -> list[dict[str, str]]:
    """The fields of every package installed in ``rootfs`` (its dpkg database; continuation lines left out)."""
    status = as_tree(rootfs).read_text("var/lib/dpkg/status")
    stanzas = (dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line[0].isspace())
               for stanza in status.split("\n\n"))
    return [fields for fields in stanzas if fields.get("Status", "").endswith(" installed")]


def installed_versions(rootfs: Path | InTree) -> dict[str, str]:
    """Every package installed in ``rootfs`` and its version, read from its dpkg database (a foreign-architecture
    package as NAME:ARCH)."""
    versions: dict[str, str] = {}
    native = _native_architecture()
    for fields in installed_packages(rootfs):
        if "Package" in fields and "Version" in fields:
            arch = fields.get("Architecture", native)
            name = fields["Package"] if arch in (native, "all") else f"{fields['Package']}:{arch}"
            versions[name] = fields["Version"]
    return versions


def package_version(rootfs: Path | InTree, package: str) -> str:
    """The version of ``package`` installed in ``rootfs`` (from dpkg's database), or "" if it is not installed."""
    try:
        return installed_versions(rootfs).get(package, "")
    except OSError:
        return ""


# The packages of an image whose versions decide what its systemd can enforce: systemd itself, the libraries it
# enforces with (libseccomp; libbpf, which it loads for RestrictFileSystems= and SocketBind*=; AppArmor's) and the C
# library. A package set on top changes what the machine enforces only through these or the manager's settings.
ENFORCING_PACKAGES = ("systemd", "libsystemd-shared", "libsystemd0", "libseccomp2", "libbpf1", "libbpf0",
                      "libapparmor1", "apparmor", "libselinux1", "libcap2", "libc6")
# The service manager's own settings (DefaultMemoryAccounting=, DefaultLimit*=, ...), where a package may add some.
_MANAGER_SETTINGS = ("etc/systemd/system.conf", "etc/systemd/system.conf.d", "usr/lib/systemd/system.conf.d",
                     "usr/local/lib/systemd/system.conf.d")


def enforcement_identity(image: Image) -> dict[str, object]:
    """What of ``image`` decides which directives a machine booted from it enforces: the release, the versions of
    :data:`ENFORCING_PACKAGES` (absent ones too: libbpf missing is an answer) and the manager's settings. Images
    of one release that differ only in other packages (the spec's package sets) have the same identity, so their
    machines share one capability measurement; an image whose manifest has no versions (an older recipe) is its
    own key."""
    if not image.versions:
        return {"image": image.key}
    settings = hashlib.sha256()
    tree = image.tree()
    for name in _MANAGER_SETTINGS:
        files = [f"{name}/{conf}" for conf in tree.names(name, "*.conf")] if tree.is_dir(name) else \
            [name] if tree.is_file(name) else []
        for file in files:
            settings.update(f"{file}\0".encode())
            with contextlib.suppress(OSError):
                settings.update(tree.read_bytes(file))
    return {"release": image.release, "packages": {name: image.versions.get(name) for name in ENFORCING_PACKAGES},
            "manager_settings": settings.hexdigest()[:16]}


# What a unit of a package can be enabled as: the kinds that start something at boot.
_STARTING_KINDS = (".service", ".socket", ".timer", ".path")


def package_units(rootfs: Path | InTree) -> tuple[str, ...]:
    """The units enabled in ``rootfs`` (wanted or required by another unit, as ``systemctl enable`` leaves them)
    that the machine section's packages brought: shipped by a package a bare image would not have. A bare image
    is mmdebstrap's minbase (every ``Priority: required`` package, and apt) plus :data:`BASE_PACKAGES`, with
    everything they depend on or recommend. Sorted; instances by their own name (``foo@bar.service``)."""
    depends: dict[str, set[str]] = {}
    providers: dict[str, set[str]] = {}
    base = {"apt", *BASE_PACKAGES}
    for fields in installed_packages(rootfs):
        name = fields.get("Package")
        if not name:
            continue
        wanted = ", ".join(fields.get(key, "") for key in ("Depends", "Pre-Depends", "Recommends"))
        # Every alternative of "a | b" that is installed counts: either may be what the base needed.
        depends[name] = {re.split(r"[\s:(]", choice.strip(), maxsplit=1)[0]
                         for choice in re.split(r"[,|]", wanted) if choice.strip()}
        for provided in fields.get("Provides", "").split(","):
            if provided.strip():
                providers.setdefault(re.split(r"[\s(]", provided.strip(), maxsplit=1)[0], set()).add(name)
        if fields.get("Priority") == "required":
            base.add(name)
    queue = list(base)
    while queue:
        for dependency in depends.get(queue.pop(), ()):
            for package in {dependency, *providers.get(dependency, ())}:
                if package in depends and package not in base:
                    base.add(package)
                    queue.append(package)
    tree = as_tree(rootfs)
    shipped: dict[str, str] = {}  # unit file name -> package
    for listing in tree.names("var/lib/dpkg/info", "*.list"):
        package = listing.removesuffix(".list").split(":", 1)[0]
        if package in base:
            continue
        for line in tree.read_text(f"var/lib/dpkg/info/{listing}").splitlines():
            if "/systemd/system/" in line and line.endswith(_STARTING_KINDS):
                shipped[line.rsplit("/", 1)[-1]] = package
    etc = "etc/systemd/system"
    enabled = {name for pattern in ("*.wants", "*.requires") for folder in tree.names(etc, pattern)
               for name in tree.names(f"{etc}/{folder}") if name.endswith(_STARTING_KINDS)}
    return tuple(sorted(unit for unit in enabled if template_of(unit) in shipped))


def boot_units(config: MachineConfig, rootfs: Path | InTree) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What a boot of ``rootfs`` does with its packages' units, read from the image once: (the units to mask, the
    units to hold back).

    Masked (``systemd.mask=`` on the machine's command line): every unit a package of this image enables at boot
    but machine.services, the tested unit and what it needs to start as it ships (its socket, a unit it requires or
    wants, in the image's files or, for a unit file of the spec's, in that file: :func:`units_needed`). MachineError
    for a machine.services entry that no package enables, with the ones that are.

    Held back at boot and released once booted: the tested unit, if a package enables it or a socket it needs can
    start it, and then those sockets too. Its first start must be the test's, under the drop-in, as on a host where
    the drop-in ships with the package: a start at boot without it would make state (a key an ExecStartPre= writes,
    a directory it creates) that the hardened unit then never has to make itself; a socket listening from boot
    would start it on the first connection. The sockets are started once the hold is released
    (:meth:`Machine._release_holds`), as they run on a host."""
    enabled = package_units(rootfs)
    for service in config.services:
        if service not in enabled:
            raise MachineError(f"machine.services: {service} is not a unit a package of this machine enables at "
                               f"boot (those are: {', '.join(enabled) or 'none'}); list only package daemons the "
                               "service needs running")
    needed = units_needed(rootfs, config.tested_unit, enabled, _needs_of_file(config)) if config.tested_unit \
        else set()
    masked = tuple(unit for unit in enabled if unit not in (*config.services, config.tested_unit, *needed))
    sockets = sorted(unit for unit in needed if unit.endswith(".socket"))
    held = (config.tested_unit, *sockets) if config.tested_unit in enabled or sockets else ()
    return masked, held


def _needs_of_file(config: MachineConfig) -> tuple[str, ...]:
    """What the spec's own unit file (machine.tested_unit_file) says the tested unit needs to start; none if it
    cannot be read now (its start, which reads it too, then says why)."""
    if not config.tested_unit_file:
        return ()
    try:
        text = Path(config.tested_unit_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ()
    return needs_named_in([(config.tested_unit_file, text)], config.tested_unit)


def boot_masks(config: MachineConfig, rootfs: Path | InTree) -> tuple[str, ...]:
    """The units to mask at boot (:func:`boot_units`)."""
    return boot_units(config, rootfs)[0]

# The device nodes a build by host root leaves in /dev (mmdebstrap's root mode; a sandboxed build cannot make them):
# apt's maintainer scripts on a copy of the tree need /dev/null; a machine's /dev is its own tmpfs.
_DEVICE_NODES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0),
                 "console": (5, 1), "ptmx": (5, 2)}
_DEVICE_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
                 "stderr": "/proc/self/fd/2"}


def _private(images: Path) -> None:
    """Make the images directory host root's alone: a built tree holds setuid files and file capabilities as the
    packages made them (a hostile package's too), and a build must not reach another build's work directory
    through its read-only view of the host."""
    images.mkdir(parents=True, exist_ok=True, mode=0o700)
    if os.stat(images).st_mode & 0o077:
        os.chmod(images, 0o700)


def _no_tree_left(builder: str, rootfs: Path) -> str:
    return (f"{builder} left no directory tree to take as {rootfs}: something in the build removed it or put a link "
            "there (a link is never followed: host root would write where it points)\nhint: a package's maintainer "
            "script did this; build the image without the packages just added to find which")


def _make_device_nodes(rootfs: Path) -> None:
    tree = InTree(rootfs)
    tree.mkdir("dev")
    for name, (major, minor) in _DEVICE_NODES.items():
        tree.unlink(f"dev/{name}")  # a file the build left in its place
        tree.mknod(f"dev/{name}", 0o666 | stat.S_IFCHR, os.makedev(major, minor))
    for name, target in _DEVICE_LINKS.items():
        tree.symlink(f"dev/{name}", target)
    for name in ("pts", "shm"):
        tree.mkdir(f"dev/{name}")


# What systemd-update-done writes (its /etc/.updated and /var/.updated), their modification time /usr's: its units'
# ConditionNeedsUpdate= then holds only once /usr changes again.
_UPDATE_DONE = """# This file was created by systemd-update-done. Its only
# purpose is to hold a timestamp of the time this directory
# was updated. See man:systemd-update-done.service(8).
TIMESTAMP_NSEC={nanoseconds}
"""


def _customize(tree: InTree) -> None:
    """Make the tree boot fast and quietly as a container. Only what differs is written: on a layer over a base that
    was made so already, nothing of the base is copied up into the layer."""
    if not (tree.is_file("etc/hostname") and tree.read_text("etc/hostname") == HOSTNAME + "\n"):
        tree.write_text("etc/hostname", HOSTNAME + "\n")
    if not (tree.is_file("etc/machine-id") and tree.read_text("etc/machine-id") == ""):
        tree.write_text("etc/machine-id", "")  # every boot gets a fresh one
    tree.mkdir("etc/systemd/system")
    for unit in MASKED_UNITS:
        masked = f"etc/systemd/system/{unit}"
        if not (tree.is_link(masked) and tree.readlink(masked) == "/dev/null"):
            tree.symlink(masked, "/dev/null")
    # Booted as a host boots after its packages are installed, not as after an offline update of /usr: the update
    # units (ConditionNeedsUpdate=: ldconfig, the journal catalog, sysusers, update-done) ran at every boot of the
    # volatile tree, about 80 ms on its critical path, for what the packages' own triggers and postinsts did.
    usr = tree.modified_ns("usr")
    for marker in ("etc/.updated", "var/.updated"):
        if not (tree.is_file(marker) and tree.modified_ns(marker) == usr):
            tree.write_text(marker, _UPDATE_DONE.format(nanoseconds=usr))
            tree.set_modified_ns(marker, usr)


# --- virtual machine disks ------------------------------------------------------------------------------------

# What a VM needs on top of a container's rootfs: a kernel (the cloud flavour: virtio built in or in its
# initramfs, no firmware or sound), the guest agent that reads a command's output files back, and nothing else.
# The machine's generator (a systemd generator, run at boot and at every daemon-reload; bound into a container, part
# of a VM's disk) does two things before anything else starts:
# - it adds MACHINE_ADDRESS to lo, by a unit ordered before sysinit.target (ADDRESS_UNIT): an address of the machine's
#   own that IPAddressDeny= can deny while traffic stays in the machine (see Machine.add_machine_address);
# - it holds the tested unit back at boot (boot_units): it masks each unit named by pytest_systemd_harden.hold= on
#   the machine's command line until HOLD_RELEASED exists: PID 1's arguments in a container (its systemd reads them
#   as its kernel command line; /proc/cmdline is the host's there), the kernel's in a VM. A systemd.mask= could not
#   be taken back: its mask wins over every unit directory and returns at each reload.
HOLD_RELEASED = "/run/pytest-systemd-harden/booted"
HOLD_ARGUMENT = "pytest_systemd_harden.hold"
ADDRESS_UNIT = "pytest-systemd-harden-address.service"
BOOT_GENERATOR_PATH = "/etc/systemd/system-generators/pytest-systemd-harden"
BOOT_GENERATOR = f"""#!/bin/sh
# pytest-systemd-harden: an address of the machine's own on lo, for IPAddressDeny= checks that stay in the machine.
cat > "$1/{ADDRESS_UNIT}" <<EOF
[Unit]
Description=pytest-systemd-harden: {MACHINE_ADDRESS} on lo, an address of the machine's own
DefaultDependencies=no
Before=sysinit.target
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=ip address add {MACHINE_ADDRESS}/32 dev lo
EOF
mkdir -p "$1/sysinit.target.wants"
ln -sf "../{ADDRESS_UNIT}" "$1/sysinit.target.wants/{ADDRESS_UNIT}"
# Hold the unit under test back at boot: its first start is the test's, under its drop-in.
[ -e {HOLD_RELEASED} ] && exit 0
for argument in $(tr '\\0' ' ' < /proc/1/cmdline) $(cat /proc/cmdline 2>/dev/null); do
    case "$argument" in
        {HOLD_ARGUMENT}=*) ln -sf /dev/null "$2/${{argument#*=}}" ;;
    esac
done
"""


VM_PACKAGES = ("linux-image-cloud-amd64", "qemu-guest-agent")
# Bump when the disk recipe below (or the bus bridge shipped into it) changes.
VM_RECIPE_VERSION = 1
BUS_PORT = "org.pytest_systemd_harden.bus"  # the virtio-serial port the system bus is relayed over
OUTPUT_DIR = "/run/harden-io"  # where a command's stdout and stderr are written inside a VM
GUEST_HELPER = "/usr/local/libexec/harden-guest"  # backends/qemu_guest.py
FILES_LABEL = "harden-files"  # the read-only disk of a machine section's files:, see qemu_guest.bind_files
# systemd's name for the port's device (a "-" in a path is escaped as \x2d).
_PORT_DEVICE = r"dev-virtio\x2dports-" + BUS_PORT.replace("-", r"\x2d") + ".device"
# Units of the VM image: (name, text, where it is wanted). The bridge starts when its port appears.
_GUEST_UNITS = (
    ("harden-bus-bridge.service", f"""\
[Unit]
Description=pytest-systemd-harden: the system bus, relayed to the host over virtio-serial
After=dbus.socket
Requires=dbus.socket

[Service]
ExecStart=/usr/bin/python3 -I -S {GUEST_HELPER} bridge
Restart=always
RestartSec=100ms
""", _PORT_DEVICE),
    ("harden-files.service", f"""\
[Unit]
Description=pytest-systemd-harden: files bound in from the host, read-only
DefaultDependencies=no
ConditionKernelCommandLine=harden.files
# Not Requires= on the disk's device unit: that job would be queued whatever the condition says, and a VM without
# a files disk would wait out the device timeout (90 s). The helper waits for the disk itself.
After=systemd-udev-trigger.service local-fs.target
Before=sysinit.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/bin/python3 -I -S {GUEST_HELPER} bind-files
""", "sysinit.target"),
)


@dataclass(frozen=True)
class VmImage:
    """A bootable disk (ext4, the whole device is the root filesystem) with the kernel and initramfs beside it."""

    key: str
    disk: Path
    kernel: Path
    initrd: Path

    @property
    def rootfs(self) -> Path:
        """The container rootfs the disk was made from (cached beside it)."""
        return self.disk.parent.parent / "rootfs"


def _guest_source() -> bytes:
    return (Path(__file__).parent / "backends" / "qemu_guest.py").read_bytes()


def vm_image(cache: ImageCache, packages: Iterable[str], progress: Progress = lambda line: None, *,
             release: str = DEFAULT_RELEASE, debs: Iterable[str] = ()) -> VmImage:
    """The disk of a VM of ``release`` with ``packages`` and ``debs``: the cached rootfs (built first if needed)
    plus that release's kernel, made into an ext4 image once and cached beside it. A VM boots it with
    ``snapshot=on``: the file is never written."""
    wanted = tuple(sorted(set(packages) | set(VM_PACKAGES)))
    image = cache.get(wanted, progress, release=release, debs=debs)
    recipe = hashlib.sha256(json.dumps([_GUEST_UNITS, BOOT_GENERATOR, VM_RECIPE_VERSION]).encode() + _guest_source())
    folder = image.rootfs.parent / f"vm-{recipe.hexdigest()[:12]}"
    found = _vm_files(folder)
    if found is not None:
        return found
    with open(image.rootfs.parent / "vm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = _vm_files(folder)
        if found is None:
            _build_disk(image.rootfs, folder, progress)
            found = _vm_files(folder)
            assert found is not None
    return found


def _vm_files(folder: Path) -> VmImage | None:
    if not (folder / "disk.ext4").exists():
        return None
    return VmImage(folder.name, folder / "disk.ext4", folder / "vmlinuz", folder / "initrd.img")


def _build_disk(rootfs: Path, folder: Path, progress: Progress) -> None:
    started = time.monotonic()
    progress(f"making a VM disk from {rootfs.parent.name} into {folder}")
    tree = InTree(rootfs)
    kernels = tree.names("boot", "vmlinuz-*")
    if not kernels:
        raise ImageBuildError(f"no kernel in {rootfs}/boot: the image was built without {VM_PACKAGES[0]}")
    release = kernels[-1].removeprefix("vmlinuz-")
    # The guest helper, its units, and the directory command output goes to. They are added to this VM-only
    # rootfs (its package set includes a kernel, so no container boots it).
    tree.mkdir(os.path.dirname(GUEST_HELPER))
    tree.write_bytes(GUEST_HELPER, _guest_source())
    units = "etc/systemd/system"
    for name, text, wanted_by in _GUEST_UNITS:
        tree.write_text(f"{units}/{name}", text)
        tree.mkdir(f"{units}/{wanted_by}.wants")
        tree.symlink(f"{units}/{wanted_by}.wants/{name}", f"../{name}")
    tree.mkdir(os.path.dirname(BOOT_GENERATOR_PATH))  # its address unit; it holds nothing unless asked to
    tree.write_text(BOOT_GENERATOR_PATH, BOOT_GENERATOR, mode=0o755)
    tree.mkdir("etc/tmpfiles.d")
    tree.write_text("etc/tmpfiles.d/harden-io.conf", f"d {OUTPUT_DIR} 0700 root root -\n")
    tree.symlink(f"{units}/serial-getty@.service", "/dev/null")  # the console is for boot messages, not logins

    clean_leftovers(folder.parent, progress)
    staging = staging_dir(folder)
    staging.mkdir(parents=True)
    try:
        used = sum(os.lstat(os.path.join(folder_, name)).st_blocks * 512
                   for folder_, dirs, files in os.walk(rootfs) for name in (*dirs, *files))
        size_mib = used // 2**20 + 1024  # room for what tests write; the file is sparse
        made = subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "harden", "-d", str(rootfs),
                               str(staging / "disk.ext4"), f"{size_mib}M"], check=False, capture_output=True,
                              text=True)
        if made.returncode != 0:
            raise ImageBuildError(f"mkfs.ext4 failed making {staging / 'disk.ext4'}:\n{printable(made.stderr.strip())}\n"
                                  "hint: mkfs.ext4 -d needs e2fsprogs 1.43 or later (apt-get install e2fsprogs)")
        tree.copy_out(f"boot/{kernels[-1]}", staging / "vmlinuz")
        tree.copy_out(f"boot/initrd.img-{release}", staging / "initrd.img")
        (staging / "manifest.json").write_text(json.dumps({"kernel": release, "recipe": VM_RECIPE_VERSION,
                                                           "size_mib": size_mib}, indent=2))
        staging.rename(folder)
    finally:
        remove_tree(staging)
    progress(f"made the VM disk ({size_mib} MiB, kernel {release}) in {time.monotonic() - started:.0f}s")


# --- a package set on top of the cached base image (measured against a full build: docs/performance.md) -------

def _run_contained(argv: list[str], name: str, progress: Progress, shown: Callable[[str], str | None],
                   env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Run a build step (``argv``) in a cgroup of its own named after its staging directory ``name`` (so a later
    run can stop what a killed one left, see staging.clean_leftovers), passing on the output lines ``shown`` maps to
    a progress line; return its exit status and its last 30 lines. Interrupted or not, every process of it is gone
    when this returns: nobody removes a directory it still writes to."""
    priority = _BUILD_PRIORITY.get()
    step = Contained.start(argv, "build", name, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, env=env,
                           background=priority is not None and priority.in_background)
    if priority is not None:
        priority.started(step)
    tail: list[str] = []
    try:
        assert step.process.stdout is not None
        for line in output_lines(step.process.stdout):  # the packages' text: printable, of bounded length
            tail = [*tail[-29:], line]
            said = shown(line)
            if said is not None:
                progress(said)
        if priority is not None:
            priority.ended(step)
        step.process.wait()
    finally:
        if priority is not None:
            priority.ended(step)
        step.stop(grace=5.0)
    return step.process.returncode, tail


class AptRefused(ImageBuildError):
    """apt says the packages cannot be installed from this archive (a full build would say the same)."""


# How apt and the packages' maintainer scripts run on a tree, inside the build sandbox (which already makes them a uid
# of no account on the host, in a read-only view of it): in a mount namespace and a PID namespace of their own, the
# chroot's shell their init, and a procfs of that namespace only in the tree, and without the capabilities that
# leave a chroot or reach a kernel's and disks' interfaces (a second chroot, mounts, device nodes,
# open_by_handle_at, modules, raw I/O, ptrace, BPF): a second wall where the first fails.
_DROPPED_FOR_CHROOT = ("sys_chroot", "sys_admin", "mknod", "dac_read_search", "sys_module", "sys_rawio", "sys_ptrace",
                       "bpf", "perfmon", "sys_boot", "sys_time", "mac_admin", "mac_override", "syslog", "net_admin",
                       "sys_resource", "linux_immutable", "wake_alarm", "block_suspend", "audit_control",
                       "checkpoint_restore")


# The host's harmless device nodes, bound over the tree's: the build sees its tree without devices (nodev), so a
# node it finds there (a base's console) opens nothing.
_BOUND_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
_CHROOT = ('tree=$1; shift; for node in ' + " ".join(_BOUND_DEVICES) + '; do [ -e "$tree/dev/$node" ] || '
           ': > "$tree/dev/$node"; mount --bind "/dev/$node" "$tree/dev/$node"; done; '
           'mount -t proc -o nosuid,nodev,noexec proc "$tree/proc"; exec chroot "$tree" "$@"')


def chrooted(tree: Path, command: Sequence[str]) -> list[str]:
    """``command`` run in ``tree`` as described above."""
    # The tree's own setpriv (util-linux is essential in Debian) drops them once inside: chroot(2) itself needs
    # CAP_SYS_CHROOT, and every later exec is bounded.
    return ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child",
            "/bin/sh", "-ec", _CHROOT, "sh", str(tree), "setpriv", "--bounding-set",
            ",".join(f"-{name}" for name in _DROPPED_FOR_CHROOT), "--", *command]


_LISTS = "var/lib/apt/lists"
APT_LISTS = "apt-lists"  # in a base image's directory: the package lists its build downloaded
_SAYS = "harden: "  # a line of the script below for the build's progress
# apt on a base, in two passes. First, online, apt downloads what the install needs: from the package lists the base's
# build downloaded where they were kept ($1 = kept), the archive as that build found it (as old as the base, which
# the image's key bounds), without its indexes downloaded again; apt-get update first where they are not, or where
# the archive has moved on since (a .deb gone from the mirror, a dependency only a newer index has).
_APT_DOWNLOAD = f"""
lists=$1; shift
if [ "$lists" != kept ]; then
    echo "{_SAYS}apt-get update first (the base image kept no package lists)"
    apt-get -q update
elif apt-get -q install -y --no-install-recommends --download-only "$@"; then
    echo "{_SAYS}from the package lists of the base image's build"
    exit 0
else
    echo "{_SAYS}the base image's package lists are out of date for this: apt-get update first"
    apt-get -q update
fi
apt-get -q install -y --no-install-recommends --download-only "$@"
"""
# Then, offline (build_sandbox.sandboxed: a network of the build's own, only lo), dpkg installs them and the
# maintainer scripts run: a port one binds is no host port (postgresql's finds one for its first cluster, which the
# online sandbox refused), and they reach no network, where nothing of the build's needs one any more (apt finds
# every .deb downloaded; not --no-download, which apt refuses beside a local .deb: "Pathname ... is not absolute").
_APT_INSTALL = """
apt-get -q install -y --no-install-recommends "$@"
apt-get -q clean
"""


# What apt keeps in its lists directory for a source: its Release file (signed or beside its signature) and indexes.
_LIST_FILE = re.compile(r"[\w.~+%-]+_(InRelease|Release(\.gpg)?|Packages(\.(gz|xz|lz4|zst))?|Translation-[\w@.-]+)")


def _keep_package_lists(tree: InTree, into: Path) -> None:
    """Move the package lists a base's build left in its ``tree`` to ``into``, outside it: the tree is then as
    mmdebstrap's own cleanup leaves it (no indexes, as before), and a package set built on the base installs from
    them (:func:`install_on_base`) instead of downloading the archive's indexes again (about 2 s and 10 MB each)."""
    into.mkdir()
    for name in _files_in_lists(tree):
        if _LIST_FILE.fullmatch(name):
            tree.move_out(f"{_LISTS}/{name}", into / name)


def _files_in_lists(tree: InTree) -> list[str]:
    """The names of the regular files in ``tree``'s apt lists directory (not links, whatever they lead to)."""
    return [name for name in tree.names(_LISTS)
            if tree.is_file(f"{_LISTS}/{name}") and not tree.is_link(f"{_LISTS}/{name}")]


def script_error(line: str) -> str | None:
    """A progress line for an error a package's maintainer script printed but did not fail on (dpkg goes on, and the
    image lacks what the script would have made; docs/backends.md), else None."""
    said = line.strip()
    if said.startswith(("Error:", "ERROR:", "error:")):
        return f"  a maintainer script said: {said}"
    return None


def install_on_base(base: Path, layer: Path, extra: Iterable[str], progress: Progress = lambda line: None, *,
                    debs: Iterable[str] = (), lists: Path | None = None) -> dict[str, str]:
    """Make ``layer`` what apt adds to the built ``base`` tree installing ``extra`` and the local ``debs``, from the
    sources the base was built with; return every installed package's version. The image is ``layer`` over
    ``base`` (:func:`layers_tree`): nothing of the base is copied.

    apt runs on an overlay of the base (build_sandbox.prepare: the base idmapped to the sandbox's ids, read-only;
    what apt writes goes to the upper layer, which becomes ``layer``), in the build sandbox (machine/build_sandbox.py:
    root of a user namespace, the host read-only, the layer taken back to 0-65535), chrooted as :func:`chrooted`
    says, and in a cgroup of its own (so nothing of it outlives the build, however it ends: see
    machine/staging.py); /dev is the tree's own device nodes (nothing of the host's bound in). Services are not
    started (policy-rc.d), the host's resolv.conf is lent for the download and taken back: the layer holds what
    the packages made, with the tree made to boot as a container (:func:`_customize`), and no apt indexes. apt
    installs from the package lists the base's build downloaded where they were kept beside it (:data:`APT_LISTS`;
    ``lists`` names another directory of them), so the packages are those the archive had when the base was
    built; it runs apt-get update first only where there are none, or where they are out of date for these
    packages (:data:`_APT_DOWNLOAD`), and installs them offline (:data:`_APT_INSTALL`).
    """
    resolv, policy, local = "etc/resolv.conf", "usr/sbin/policy-rc.d", "var/cache/harden-debs"
    kept_lists = sorted(path for path in (lists or base.parent / APT_LISTS).glob("*")
                        if _LIST_FILE.fullmatch(path.name) and path.is_file())
    # apt on the base downloads from the sources the base was built with (its sources.list), as its manifest says.
    sources: list[str] = []
    with contextlib.suppress(OSError, ValueError):  # an older recipe's manifest may not say: HTTP(S) only
        sources = json.loads((base.parent / "manifest.json").read_text()).get("sources", [])
    build = layer.parent
    uid_base = build_sandbox.build_base(build.name)
    work = build_sandbox.prepare(build, uid_base, lower=base)
    returncode: int | None = None
    tail: list[str] = []
    versions: dict[str, str] = {}
    try:
        # The overlay: host root's writes here go to the upper layer, as the build's do.
        tree = InTree(work / build_sandbox.TREE)
        link = tree.readlink(resolv) if tree.is_link(resolv) else None
        kept = tree.read_bytes(resolv) if link is None and tree.is_file(resolv) else None
        with open("/etc/resolv.conf", "rb") as host_resolv:
            tree.write_bytes(resolv, host_resolv.read())
        tree.write_text(policy, "#!/bin/sh\nexit 101\n", mode=0o755)
        tree.mkdir(local)  # apt in the chroot installs the .debs from here
        inside = []
        for deb in debs:
            with open(deb, "rb") as package:
                tree.write_bytes(f"{local}/{os.path.basename(deb)}", package.read())
            inside.append(f"/{local}/{os.path.basename(deb)}")
        indexes = []
        for path in kept_lists:  # the archive's indexes as the base's build downloaded them
            tree.copy_in(path, f"{_LISTS}/{path.name}")
            indexes.append(f"{_LISTS}/{path.name}")
        # What host root wrote is the build's root's, as if it had written it (not host root's: unmapped, nobody)
        for lent in (resolv, policy, local, *(path.removeprefix("/") for path in inside), *indexes):
            tree.chown(lent, uid_base, uid_base)
        shown: set[str] = set()

        def show(line: str) -> str | None:  # each once: the download-only pass says the same as the install
            if line.startswith(_SAYS):
                return f"  {line.removeprefix(_SAYS).strip()}"
            if " newly installed" in line and line not in shown:
                shown.add(line)
                return f"  apt-get: {line.strip()}"
            return script_error(line)

        def apt(script: str, *args: str, offline: bool = False) -> tuple[int, list[str]]:
            return _run_contained(
                build_sandbox.sandboxed(chrooted(Path(build_sandbox.INSIDE) / build_sandbox.TREE,
                                                 ["/bin/sh", "-ec", script, "sh", *args]),
                                        build, uid_base, sources, offline=offline),
                build.name, progress, show,
                build_sandbox.environment({"DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}))

        returncode, tail = apt(_APT_DOWNLOAD, "kept" if indexes else "none", *extra, *inside)
        offline = returncode == 0
        if offline:
            returncode, tail = apt(_APT_INSTALL, *extra, *inside, offline=True)
        if returncode == 0:  # the build is over (nothing of it runs): what it was lent is taken back
            tree.unlink(policy)
            tree.unlink(resolv)
            if link is not None:
                tree.symlink(resolv, link)
            elif kept is not None:
                tree.write_bytes(resolv, kept)
            for name in tree.names(local):
                tree.unlink(f"{local}/{name}")
            tree.rmdir(local)
            for leftover in _files_in_lists(tree):  # as mmdebstrap leaves it: no indexes (its lock file stays)
                if leftover != "lock":
                    tree.unlink(f"{_LISTS}/{leftover}")
            for cached in tree.names("var/cache/apt", "*.bin"):
                tree.unlink(f"var/cache/apt/{cached}")
            _customize(tree)
            versions = installed_versions(tree)
    finally:
        # Only a build that ended well is taken out: after an error or an interruption, some of it may still run.
        made = build_sandbox.finish(build, build_sandbox.UPPER, keep=returncode == 0, into=layer.name)
    refused = build_sandbox.refusal(returncode, tail)
    if refused:  # a full build would meet the same refusal, but for the offline pass's own network
        raise ImageBuildError(refused) if offline else AptRefused(refused)
    if returncode != 0:
        verdict = apt_verdict(tail)
        failed = f"apt-get install {' '.join(extra)} on the base image {base} failed (exit status " \
            f"{returncode}):\n" + "\n".join(tail)
        raise AptRefused(f"{verdict}\n{failed}") if verdict else ImageBuildError(failed)
    if made != layer:
        raise ImageBuildError(_no_tree_left("apt-get", layer))
    build_sandbox.take_back(layer, uid_base)
    _plain_layer(layer)
    return versions


# What an overlay keeps for itself in its upper layer: only the opaque mark means anything to the layer's readers.
_OVERLAY_OWN = "trusted.overlay."
_OVERLAY_KEPT = ("trusted.overlay.opaque",)


def _plain_layer(layer: Path) -> None:
    """Remove from ``layer`` the marks the build's overlay made for its own use (the lower files' handles, "impure"
    directories, its uuid): a layer is files, whiteouts and opaque directories, read the same by any overlay it is
    joined in later, whatever the base's file handles are then."""
    for directory, dirs, files in os.walk(layer):
        for path in (directory, *(os.path.join(directory, name) for name in (*dirs, *files))):
            for name in os.listxattr(path, follow_symlinks=False):
                if name.startswith(_OVERLAY_OWN) and name not in _OVERLAY_KEPT:
                    os.removexattr(path, name, follow_symlinks=False)


# --- the trees of layered images, read by host root ------------------------------------------------------------

_OVERLAYFS_MAGIC = 0x794C7630
_libc = ctypes.CDLL(None, use_errno=True)


def on_overlayfs(path: Path) -> bool:
    """Whether ``path`` is on an overlayfs (statfs's f_type, the first word of struct statfs on Linux)."""
    buffer = ctypes.create_string_buffer(256)
    if _libc.statfs(os.fsencode(path), buffer) != 0:
        return False
    return int.from_bytes(buffer.raw[:8], sys.byteorder) & 0xFFFFFFFF == _OVERLAYFS_MAGIC


LAYER = "layer"  # in an image's directory: its own layer, where it is built on its release's base
_VIEWS: dict[tuple[tuple[Path, int], ...], mounts.Keeper] = {}
_VIEWS_LOCK = threading.Lock()


def layers_tree(layers: Sequence[Path], mount_point: Path) -> InTree:
    """The tree of an image made of ``layers`` (top first) as a machine booted from it sees it, for host root to
    read: the one tree itself, or the layers joined by a read-only overlay on ``mount_point`` (an empty directory)
    in the mount namespace of a keeper (machine/mounts.py), which lives as long as this process: the kernel's own
    overlay decides what a path is (a file the layer removed is gone, a directory it replaced hides the base's),
    as it does in the machine. Nothing is mounted on the host."""
    if len(layers) == 1:
        return InTree(layers[0])
    # By inode too: an image removed and built again under the same key is joined again, not read as it was.
    key = tuple((layer, os.stat(layer).st_ino) for layer in layers)
    with _VIEWS_LOCK:
        keeper = _VIEWS.get(key)
        if keeper is None or keeper.process.poll() is not None:
            try:
                keeper = mounts.keep([{"overlay": str(mount_point), "lower": [str(layer) for layer in layers],
                                       "inert": True}],
                                     mount_point.parent, build_sandbox.helper_environment())
            except OSError as exc:
                raise MachineError(f"could not join the layers of the image {mount_point.parent}: {exc}") from None
            _VIEWS[key] = keeper
    return InTree(keeper.seen / mount_point.name)
