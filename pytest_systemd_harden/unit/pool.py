"""Machines shared across a test session: one per distinct machine section, booted on first use."""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

from ..errors import BackendUnavailable, HardenError, ImageBuildError
from ..machine import backends, cgroups
from ..machine.backends import userns
from ..machine.backends.base import Machine
from ..machine.backends.nspawn import sweep_runtime_leftovers
from ..machine.images import Image, ImageCache, ImageWanted, Preparation
from ..sandbox.capabilities import machine_capabilities
from ..spec.load import Spec
from ..spec.machine import MachineConfig
from ..spec.releases import DEFAULT_RELEASE
from .service import HardenedService

Progress = Callable[[str], None]


class MachinePool:
    """Boots machines lazily, reuses them, and shuts every one down on :meth:`close` (or at exit).

    ``backend`` overrides the backend each spec asks for (``--harden-backend``). A machine that failed to boot
    is not retried for every test: its error is remembered and raised again. ``remeasure`` measures what each
    machine enforces even when the capability cache has it (``--harden-remeasure``).
    """

    def __init__(self, *, backend: str | None = None, image_cache: ImageCache | None = None,
                 progress: Progress = lambda line: None, boot_timeout: float = 60.0,
                 default_release: str | None = None, remeasure: bool = False) -> None:
        self.backend = backend
        self.remeasure = remeasure
        # The Debian release of specs that name none (--harden-release), else spec.releases.DEFAULT_RELEASE.
        self.default_release = default_release or DEFAULT_RELEASE
        self.image_cache = image_cache or ImageCache()
        self.progress = progress
        self.boot_timeout = boot_timeout
        self._machines: dict[MachineConfig, Machine] = {}
        self._failures: dict[MachineConfig, HardenError] = {}
        self._services: dict[str, HardenedService] = {}  # machine name -> the service running there
        self._lock = threading.Lock()
        self._reaped = False
        self._preparation: Preparation | None = None  # images being built in the background
        atexit.register(self.close)

    def effective_config(self, config: MachineConfig) -> MachineConfig:
        """``config`` on the backend this run uses: ``--harden-backend``, else the spec's, with ``auto`` resolved."""
        return replace(config, backend=backends.resolve(self.backend or config.backend),
                       release=config.release or self.default_release)

    def running_machine(self, config: MachineConfig) -> Machine | None:
        """The machine booted for ``config``, if there is one yet (never boots one)."""
        with self._lock:
            return self._machines.get(self.effective_config(config))

    def machine_for(self, config: MachineConfig) -> Machine:
        config = self.effective_config(config)
        with self._lock:
            if config in self._failures:
                raise self._failures[config]
            machine = self._machines.get(config)
            if machine is not None:
                return machine
            backends.check_available(config.backend)
            if not self._reaped:
                self._reaped = True
                for name in cgroups.reap_orphans():
                    self.progress(f"removed container {name} left behind by a killed run")
                if config.backend == "nspawn":
                    for path in sweep_runtime_leftovers():
                        self.progress(f"removed {path} left behind by a killed run")
            if config.backend == "nspawn" and self._preparation is not None:
                self._preparation.wait(self.image_wanted(config), self.progress)
            cls = backends.machine_class(config.backend)
            machine = cls(config, boot_timeout=self.boot_timeout, image_cache=self.image_cache)
            self.progress(f"booting {config.backend} machine {machine.name} ({config.describe()})")
            started = time.monotonic()
            try:
                machine.boot(self.progress)
            except HardenError as exc:
                self._failures[config] = exc
                raise
            masked = (f"; masked at boot, enabled by its packages: {', '.join(machine.masked_at_boot)} (keep one "
                      "running with machine.services)") if machine.masked_at_boot else ""
            if machine.held_at_boot:
                tested, *sockets = machine.held_at_boot
                masked += f"; held back at boot, first started by the test under its drop-in: {tested}"
                if sockets:
                    masked += f" (and its {', '.join(sockets)}, listening once booted)"
            self.progress(f"{machine.name} booted in {time.monotonic() - started:.1f}s ({machine.describe()}{masked})")
            self._machines[config] = machine
        # Measured, not assumed from the backend: what this machine can enforce (see sandbox/capabilities.py; cached on
        # disk per kernel, image and backend command line).
        try:
            capabilities = machine_capabilities(machine, remeasure=self.remeasure)
            self.progress(f"{machine.name} {capabilities.summary()} ({capabilities.how})")
        except HardenError as exc:
            self.progress(f"{machine.name}: could not measure what it enforces ({exc})")
        return machine

    def prepare_images(self, configs: Iterable[MachineConfig], *, threads: int = 2,
                       rotate: int = 0) -> list[tuple[ImageWanted, ImageBuildError | None]]:
        """Build the images the machines of ``configs`` will boot from, and wait for them
        (:meth:`start_preparing_images`)."""
        preparation = self.start_preparing_images(configs, threads=threads, rotate=rotate)
        return preparation.results() if preparation is not None else []

    def start_preparing_images(self, configs: Iterable[MachineConfig], *, threads: int = 2,
                               rotate: int = 0, background: bool = True) -> Preparation | None:
        """Start building the container images the machines of ``configs`` will boot from, those not cached yet,
        ``threads`` at a time, in the background (:meth:`ImageCache.start_preparing`; package sets in the order of
        ``configs``); a machine booted meanwhile waits for its own image only, moved to the front. Each image an
        unprivileged machine boots is given its uid-shifted copy in the same build thread where it needs one (a
        filesystem that cannot be idmapped: seconds per image, else paid at the first boot). Only the nspawn
        backend's images: a VM's is built with its kernel when it boots, and the host backend has none. Nothing to do
        where nspawn cannot run (the first boot says why). ``background``: builds nobody waits for yet take only
        the CPU left idle (:class:`~..machine.images.BuildPriority`)."""
        nspawn = self._nspawn_configs(configs)
        if not nspawn:
            return None
        wanted = [self.image_wanted(config) for config in nspawn]
        shifted = {self.image_wanted(config) for config in nspawn if not config.privileged}  # user-namespaced

        def shift(want: ImageWanted, image: Image) -> None:
            # Only where the machine cannot boot the image through an idmapped mount (see backends/userns.py).
            if want in shifted and userns.idmap_refused(image.rootfs) is not None:
                for tree in image.trees:  # a layered image: each layer shifted
                    userns.shifted_rootfs(tree, userns.base_for(image.key))

        with self._lock:
            if self._preparation is not None:
                self._preparation.stop()
            self._preparation = self.image_cache.start_preparing(wanted, self.progress, threads=threads,
                                                                 rotate=rotate, then=shift,
                                                                 background=background)
            return self._preparation

    def first_ready(self, configs: Sequence[MachineConfig]) -> int:
        """The index of the config in ``configs`` whose machine can boot first: one not waiting for an image, else
        the first whose image the background builds finish (:meth:`Preparation.first_ready`)."""
        with self._lock:
            preparation = self._preparation
        effective = [self.effective_config(config) for config in configs]
        no_image = [index for index, config in enumerate(effective) if config.backend != "nspawn"]
        if preparation is None or no_image:
            return no_image[0] if no_image else 0
        return preparation.first_ready([self.image_wanted(config) for config in effective])

    def images_to_build(self, configs: Iterable[MachineConfig]) -> list[ImageWanted]:
        """The images :meth:`start_preparing_images` would build for ``configs``, in its order ([] where nspawn
        cannot run or nothing is missing)."""
        nspawn = self._nspawn_configs(configs)
        return self.image_cache.missing([self.image_wanted(config) for config in nspawn]) if nspawn else []

    def _nspawn_configs(self, configs: Iterable[MachineConfig]) -> list[MachineConfig]:
        """The effective ``configs`` whose machines boot an nspawn image; none where nspawn cannot run here (the
        first boot says why)."""
        found = [config for config in map(self.effective_config, configs) if config.backend == "nspawn"]
        if not found:
            return []
        try:
            backends.check_available("nspawn")
        except BackendUnavailable:
            return []
        return found

    @staticmethod
    def image_wanted(config: MachineConfig) -> ImageWanted:
        """The image the machine of ``config`` (effective: release filled in) boots from."""
        return ImageWanted(config.release, tuple(sorted(set(config.packages))), tuple(config.debs))

    def service_for(self, spec: Spec, *, start: bool = True) -> HardenedService:
        """The spec's service on its machine, (re)started clean; a different service there is stopped first."""
        machine = self.machine_for(spec.machine)
        previous = self._services.get(machine.name)
        if previous is not None and previous.spec != spec:
            previous.stop()
        service = HardenedService(machine, spec)
        self._services[machine.name] = service
        if start:
            service.start()
        return service

    def release(self, service: HardenedService) -> str | None:
        """Stop ``service`` if it is the one running on its machine; say so if it had to be killed
        (:meth:`HardenedService.stop`)."""
        if self._services.get(service.machine.name) is service:
            del self._services[service.machine.name]
        if service.machine.running:
            return service.stop()
        return None

    def close(self) -> None:
        with self._lock:
            machines, self._machines = list(self._machines.values()), {}
            self._services.clear()
            preparation, self._preparation = self._preparation, None
        if preparation is not None:
            preparation.stop()  # an image no test needed any more (a session cut short): built to its end, or not begun
        errors = shut_down(machines)
        if errors:
            raise HardenError("could not shut down every machine: " + "; ".join(errors))


def shut_down(machines: Sequence[Machine]) -> list[str]:
    """Shut every one of ``machines`` down, all at once (each powers off in 0.2-0.6 s, mostly waiting for its
    systemd: a session's eight machines one after another took 1.5 s of its end); return what failed, one line
    each. A first interruption (Ctrl-C) does not cut it short: it is raised once every machine is down; a second
    one is raised at once (a shutdown that hangs can still be left)."""
    errors: list[str] = []

    def shut(machine: Machine) -> None:
        try:
            machine.shutdown()
        except Exception as exc:  # noqa: BLE001 - shut down the others all the same
            errors.append(f"{machine.name}: {exc}")

    threads = []
    for machine in machines:
        thread = threading.Thread(target=shut, args=(machine,), name=f"harden-shutdown-{machine.name}")
        try:
            thread.start()
        except RuntimeError:  # no thread to be had (at the interpreter's exit, or at the host's limit): here, then
            shut(machine)
            continue
        threads.append(thread)
    interrupted: KeyboardInterrupt | None = None
    for thread in threads:
        while thread.is_alive():
            try:
                thread.join()
            except KeyboardInterrupt as exc:
                if interrupted is not None:
                    raise
                interrupted = exc
    if interrupted is not None:
        raise interrupted
    return errors
