"""Debian root filesystems for the test machines: built once per package set, cached, never modified.

A machine boots its image with ``--volatile=overlay``, so the cached tree is shared read-only by every
container, run and xdist worker. Builds happen under a lock, into a temporary directory renamed into place only
when complete, so a concurrent or interrupted build never leaves a half-made image behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import BackendUnavailable, ImageBuildError

# Bump when the recipe below changes, so old caches are not reused for a different image.
RECIPE_VERSION = 3
SUITE = "bookworm"
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "libnss-systemd", "python3", "iproute2", "procps",
                 "strace")  # strace: tighten observes what the scenarios use in one traced run
# Units a test machine has no use for: they slow the boot or wake up during a run.
MASKED_UNITS = (
    "console-getty.service", "getty@.service", "container-getty@.service", "apt-daily.timer",
    "apt-daily-upgrade.timer", "e2scrub_all.timer", "dpkg-db-backup.timer", "fstrim.timer",
    "systemd-tmpfiles-clean.timer",
)
HOSTNAME = "harden"

Progress = Callable[[str], None]


def default_cache_dir() -> Path:
    explicit = os.environ.get("HARDEN_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "pytest-systemd-harden"


def default_mirror() -> str:
    return os.environ.get("HARDEN_MIRROR", "http://deb.debian.org/debian")


@dataclass(frozen=True)
class Image:
    """A built root filesystem and what went into it."""

    key: str
    rootfs: Path
    packages: tuple[str, ...]


class ImageCache:
    """Builds and finds images under ``cache_dir/images/<key>/rootfs``."""

    def __init__(self, cache_dir: Path | None = None, mirror: str | None = None) -> None:
        self.cache_dir = cache_dir or default_cache_dir()
        self.mirror = mirror or default_mirror()

    @staticmethod
    def key_for(packages: Iterable[str]) -> str:
        wanted = sorted(set(BASE_PACKAGES) | set(packages))
        text = json.dumps({"recipe": RECIPE_VERSION, "suite": SUITE, "packages": wanted}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def path_for(self, packages: Iterable[str]) -> Path:
        return self.cache_dir / "images" / self.key_for(packages)

    def get(self, packages: Iterable[str], progress: Progress = lambda line: None) -> Image:
        """The image with ``packages`` on top of the base set, built first if it is not cached."""
        extra = tuple(sorted(set(packages)))
        key = self.key_for(extra)
        final = self.cache_dir / "images" / key
        if (final / "rootfs" / "usr" / "lib" / "systemd" / "systemd").exists():
            return Image(key, final / "rootfs", extra)
        final.parent.mkdir(parents=True, exist_ok=True)
        with open(final.parent / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be building the same image
            if not (final / "rootfs" / "usr" / "lib" / "systemd" / "systemd").exists():
                self._build(final, extra, progress)
        return Image(key, final / "rootfs", extra)

    def _build(self, final: Path, extra: tuple[str, ...], progress: Progress) -> None:
        staging = final.with_name(f"{final.name}.building-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        rootfs = staging / "rootfs"
        packages = sorted(set(BASE_PACKAGES) | set(extra))
        label = "base image" + (f" + {', '.join(extra)}" if extra else "")
        progress(f"building {label} ({SUITE}, {len(packages)} packages) into {final}")
        started = time.monotonic()
        try:
            builder = self._on_cached_base(rootfs, extra, progress) or self._run_builder(rootfs, packages, progress)
            _customize(rootfs)
            (staging / "manifest.json").write_text(json.dumps({
                "suite": SUITE, "packages": packages, "builder": builder, "mirror": self.mirror,
                "recipe": RECIPE_VERSION, "seconds": round(time.monotonic() - started, 1),
            }, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        progress(f"built {label} in {time.monotonic() - started:.0f}s")

    def _on_cached_base(self, rootfs: Path, extra: tuple[str, ...], progress: Progress) -> str | None:
        """Build ``rootfs`` as the cached base image plus ``extra`` (about a quarter of a full build's time, see
        docs/performance.md); None, and nothing left at ``rootfs``, where a full build must do it: no extra
        packages, a VM's kernel (its initramfs hooks were measured only by full builds), or apt failing on the copy.
        A base not cached yet is built first: base and packages on top cost about half a full build, and every
        later package set starts from it (a fresh cache's first image is usually one with packages)."""
        if not extra or set(extra) & set(VM_PACKAGES):
            return None
        try:
            base = self.get((), progress).rootfs
        except ImageBuildError:
            return None  # the full build says what is wrong
        progress(f"  installing {', '.join(extra)} on a copy of the cached base image")
        try:
            install_on_base(base, rootfs, extra, progress)
        except ImageBuildError as exc:
            progress(f"  that failed, building the image in full instead: {str(exc).splitlines()[0]}")
            shutil.rmtree(rootfs, ignore_errors=True)
            return None
        return f"apt on the cached base image {base.parent.name}"

    def _run_builder(self, rootfs: Path, packages: list[str], progress: Progress) -> str:
        if shutil.which("mmdebstrap"):
            command = ["mmdebstrap", "--variant=minbase", f"--include={','.join(packages)}", SUITE, str(rootfs),
                       self.mirror]
        elif shutil.which("debootstrap"):
            command = ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}", SUITE, str(rootfs),
                       self.mirror]
        else:
            raise BackendUnavailable("neither mmdebstrap nor debootstrap is installed: apt-get install mmdebstrap")
        tail: list[str] = []
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace") as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip()
                tail = [*tail[-29:], line]
                if line.startswith(("I:", "E:", "W:")):
                    progress(f"  {command[0]}: {line}")
        if proc.returncode != 0:
            raise ImageBuildError(f"{command[0]} failed (exit status {proc.returncode}) building {rootfs}:\n"
                               + "\n".join(tail)
                               + "\nhint: is every package name a Debian bookworm package? Is the mirror "
                               f"{self.mirror} reachable? (set HARDEN_MIRROR to use another)")
        return command[0]


def package_version(rootfs: Path, package: str) -> str:
    """The version of ``package`` installed in ``rootfs`` (from dpkg's database), or "" if it is not installed."""
    try:
        status = (rootfs / "var" / "lib" / "dpkg" / "status").read_text(errors="replace")
    except OSError:
        return ""
    for stanza in status.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[:1] != " ")
        if fields.get("Package") == package and fields.get("Status", "").endswith(" installed"):
            return fields.get("Version", "")
    return ""


def _customize(rootfs: Path) -> None:
    """Make the tree boot fast and quietly as a container."""
    (rootfs / "etc" / "hostname").write_text(HOSTNAME + "\n")
    machine_id = rootfs / "etc" / "machine-id"
    machine_id.write_text("")  # every boot gets a fresh one
    units = rootfs / "etc" / "systemd" / "system"
    units.mkdir(parents=True, exist_ok=True)
    for unit in MASKED_UNITS:
        link = units / unit
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to("/dev/null")


# --- virtual machine disks ------------------------------------------------------------------------------------

# What a VM needs on top of a container's rootfs: a kernel (the cloud flavour: virtio built in or in its
# initramfs, no firmware or sound), the guest agent that reads a command's output files back, and nothing else.
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


def _guest_source() -> bytes:
    return (Path(__file__).parent / "backends" / "qemu_guest.py").read_bytes()


def vm_image(cache: ImageCache, packages: Iterable[str], progress: Progress = lambda line: None) -> VmImage:
    """The disk of a VM with ``packages``: the cached rootfs (built first if needed) plus a kernel, made into an
    ext4 image once and cached beside it. A VM boots it with ``snapshot=on``: the file is never written."""
    wanted = tuple(sorted(set(packages) | set(VM_PACKAGES)))
    image = cache.get(wanted, progress)
    recipe = hashlib.sha256(json.dumps([_GUEST_UNITS, VM_RECIPE_VERSION]).encode() + _guest_source())
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
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise ImageBuildError(f"no kernel in {rootfs}/boot: the image was built without {VM_PACKAGES[0]}")
    release = kernels[-1].name.removeprefix("vmlinuz-")
    # The guest helper, its units, and the directory command output goes to. They are added to this VM-only
    # rootfs (its package set includes a kernel, so no container boots it).
    helper = rootfs / GUEST_HELPER.lstrip("/")
    helper.parent.mkdir(parents=True, exist_ok=True)
    helper.write_bytes(_guest_source())
    units = rootfs / "etc" / "systemd" / "system"
    for name, text, wanted_by in _GUEST_UNITS:
        (units / name).write_text(text)
        wants = units / f"{wanted_by}.wants"
        wants.mkdir(exist_ok=True)
        link = wants / name
        if not link.is_symlink():
            link.symlink_to(f"../{name}")
    (rootfs / "etc" / "tmpfiles.d").mkdir(exist_ok=True)
    (rootfs / "etc" / "tmpfiles.d" / "harden-io.conf").write_text(f"d {OUTPUT_DIR} 0700 root root -\n")
    serial_getty = units / "serial-getty@.service"  # the console is for reading boot messages, not logins
    if not serial_getty.is_symlink():
        serial_getty.symlink_to("/dev/null")

    staging = folder.with_name(f"{folder.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        used = sum(entry.stat(follow_symlinks=False).st_blocks * 512 for entry in rootfs.rglob("*"))
        size_mib = used // 2**20 + 1024  # room for what tests write; the file is sparse
        made = subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "harden", "-d", str(rootfs),
                               str(staging / "disk.ext4"), f"{size_mib}M"], check=False, capture_output=True,
                              text=True)
        if made.returncode != 0:
            raise ImageBuildError(f"mkfs.ext4 failed making {staging / 'disk.ext4'}:\n{made.stderr.strip()}\n"
                                  "hint: mkfs.ext4 -d needs e2fsprogs 1.43 or later (apt-get install e2fsprogs)")
        shutil.copyfile(kernels[-1], staging / "vmlinuz")
        shutil.copyfile(rootfs / "boot" / f"initrd.img-{release}", staging / "initrd.img")
        (staging / "manifest.json").write_text(json.dumps({"kernel": release, "recipe": VM_RECIPE_VERSION,
                                                           "size_mib": size_mib}, indent=2))
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress(f"made the VM disk ({size_mib} MiB, kernel {release}) in {time.monotonic() - started:.0f}s")


# --- a package set on top of the cached base image (measured against a full build: docs/performance.md) -------

def install_on_base(base: Path, rootfs: Path, extra: Iterable[str], progress: Progress = lambda line: None) -> None:
    """Make ``rootfs`` a copy of the built ``base`` tree with ``extra`` installed by apt in a chroot.

    The chroot's /proc is mounted in a private mount namespace of its own (``unshare -m``), so nothing is mounted
    on the host and it goes when apt ends; /dev is the tree's own device nodes (nothing of the host's bound in).
    Services are not started (policy-rc.d), the host's resolv.conf is lent for the download and taken back.
    """
    made = subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(rootfs)], capture_output=True, text=True,
                          check=False)
    if made.returncode != 0:
        raise ImageBuildError(f"could not copy the base image {base} to {rootfs}: {made.stderr.strip()}")
    resolv = rootfs / "etc" / "resolv.conf"
    kept = resolv.read_bytes() if resolv.exists() and not resolv.is_symlink() else None
    link = os.readlink(resolv) if resolv.is_symlink() else None
    resolv.unlink(missing_ok=True)
    shutil.copyfile("/etc/resolv.conf", resolv)
    policy = rootfs / "usr" / "sbin" / "policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    apt = 'chroot "$0" apt-get -q'
    script = f'mount -t proc proc "$0/proc"; {apt} update; {apt} install -y --no-install-recommends "$@"; {apt} clean'
    tail: list[str] = []
    try:
        with subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-ec", script, str(rootfs), *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace", env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail = [*tail[-29:], line.rstrip()]
                if " newly installed" in line:
                    progress(f"  apt-get: {line.strip()}")
        if proc.returncode != 0:
            raise ImageBuildError(f"apt-get install {' '.join(extra)} on a copy of {base} failed (exit status "
                                  f"{proc.returncode}):\n" + "\n".join(tail))
    finally:
        policy.unlink(missing_ok=True)
        resolv.unlink(missing_ok=True)
        if link is not None:
            resolv.symlink_to(link)
        elif kept is not None:
            resolv.write_bytes(kept)
    for leftover in (rootfs / "var" / "lib" / "apt" / "lists").glob("*"):  # as mmdebstrap leaves it: no indexes
        if leftover.is_file():
            leftover.unlink()
    for cached in (rootfs / "var" / "cache" / "apt").glob("*.bin"):
        cached.unlink()
