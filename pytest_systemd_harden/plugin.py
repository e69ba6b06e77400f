"""pytest wiring: options, the ``harden`` marker, fixtures, and YAML specs collected as tests.

All logic lives in plain modules (spec, pool, service, scenarios); this file only connects them to pytest.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import os
import sys
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from .errors import BackendUnavailable, HardenError, MachineError, ServiceFailed, SpecError
from .in_tree import InTree
from .machine.backends.base import Machine
from .machine.images import DEFAULT_MAX_AGE_DAYS, ImageCache, ImageWanted
from .report import baseline, exposure
from .report import formats as report
from .report.baseline import Baseline, BaselineError, observe, records_by_spec, spec_key, spec_path_of
from .report.exposure import check_policy
from .report.formats import junit_properties
from .sandbox.expectations import ENFORCED, UNVERIFIABLE, item_names
from .sandbox.verdict import EnforcementFailed
from .search.diagnosis import Diagnosis, yaml_value
from .search.scenarios import diagnose_failure, failure_report, run_scenario, tighten_service
from .search.tighten import Tightening
from .spec.load import Scenario, Spec, load_spec
from .spec.machine import MachineConfig
from .spec.releases import DEFAULT_RELEASE, RELEASES, parse_releases
from .spec.unit_file import own_hardening_before_boot
from .unit.pool import MachinePool
from .unit.probe_host import verify_service
from .unit.service import HardenedService, hardening_in_force
from .unit.under_test import check_unit

DEFAULT_SPEC_PATTERNS = ["harden.yaml", "harden-*.yaml", "*.harden.yaml"]
MAX_IMAGE_BUILDS = 4  # image builds at once in a session, all xdist workers together


@pytest.hookimpl
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("systemd-harden", "systemd hardening regression tests (pytest-systemd-harden)")
    group.addoption("--harden-backend", default=None, metavar="NAME",
                    help="run every spec on this backend: nspawn, qemu, host or auto (default: what each spec says; "
                         "auto: host where PID 1 is systemd and you are root, else nspawn)")
    group.addoption("--harden-require-backend", action="store_true", default=False,
                    help="a backend that cannot run here is an error, not a skip (use this in CI)")
    group.addoption("--harden-strict-enforcement", action="store_true", default=False,
                    help="a directive this machine cannot show in force fails its enforcement item instead of "
                         "skipping it (use this in CI, on machines that should enforce every directive)")
    group.addoption("--harden-cache-dir", default=None, metavar="DIR",
                    help="where built machine images are cached (default: $HARDEN_CACHE_DIR, else "
                         "$XDG_CACHE_HOME/pytest-systemd-harden, else ~/.cache/pytest-systemd-harden)")
    group.addoption("--harden-release", default=None, metavar="RELEASE[,RELEASE...]",
                    help="the Debian release(s) the specs that pin none in machine.release run on; several run "
                         "every such spec once per release, items named SPEC::RELEASE::ITEM (default: "
                         f"{DEFAULT_RELEASE}; of {', '.join(RELEASES)})")
    group.addoption("--harden-refresh-images", action="store_true", default=False,
                    help="look at the Debian archive now: an image whose packages have newer versions there is "
                         "built again (otherwise looked at once the last look is older than --harden-image-max-age)")
    group.addoption("--harden-image-max-age", type=float, default=DEFAULT_MAX_AGE_DAYS, metavar="DAYS",
                    help="how long the archive's state seen last stays trusted before images are checked against it "
                         "again (default: %(default)s days)")
    group.addoption("--harden-remeasure", action="store_true", default=False,
                    help="measure what each machine enforces again, even if the capability cache (beside the "
                         "images) has it for this kernel, image and backend command line")
    group.addoption("--harden-diagnose", choices=("on", "off"), default="on",
                    help="when a scenario fails under hardening, find the directive that broke it and the smallest "
                         "verified relaxation (costs reruns; default: on)")
    group.addoption("--harden-diagnose-runs", type=int, default=40, metavar="N",
                    help="at most N service restarts per diagnosis (default: 40)")
    group.addoption("--harden-diagnose-seconds", type=float, default=180.0, metavar="S",
                    help="at most S seconds per diagnosis (default: 180)")
    group.addoption("--harden-tighten", action="store_true", default=False,
                    help="after each spec's items, find the strictest hardening under which its service still "
                         "starts and passes every scenario, and show it in the summary (costs many restarts)")
    group.addoption("--harden-json", default=None, metavar="PATH",
                    help="write a JSON report of every spec item (outcome, failure, diagnosis) to PATH")
    group.addoption("--harden-html", default=None, metavar="PATH",
                    help="write a self-contained HTML report (scenarios x directives matrix per spec) to PATH")
    group.addoption("--harden-exposure", choices=("auto", "on", "off"), default="auto",
                    help="score each spec's unit with systemd-analyze security as an 'exposure' item (auto: when the "
                         "spec sets max_exposure, or a baseline or report option needs the score)")
    group.addoption("--harden-security-policy", default=None, metavar="FILE",
                    help="a systemd-analyze security policy (JSON) to score exposure with (--security-policy=)")
    group.addoption("--harden-baseline", default=None, metavar="PATH",
                    help="compare each spec with this baseline file (YAML, or JSON by suffix): regressions fail a "
                         "'baseline' item per spec, improvements are reported")
    group.addoption("--harden-baseline-update", action="store_true", default=False,
                    help="rewrite the --harden-baseline file with this run's results instead of failing on changes")
    parser.addini("harden_spec_files", type="args", default=DEFAULT_SPEC_PATTERNS,
                  help="file name patterns of hardening specs collected as tests")


@pytest.hookimpl
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "harden(path): the hardening spec (YAML, relative to the test file) that the "
                                       "hardened_service fixture starts")
    session = HardenSession(config)
    session.check_report_options()
    config.pluginmanager.register(session, HardenSession.NAME)
    if config.pluginmanager.hasplugin("xdist") and getattr(config.option, "dist", "no") == "load":
        # A spec's scenarios run in order against one service and a later one may need what an earlier one
        # made: under `pytest -n` each spec file must stay on one worker. xdist's default (load) becomes
        # loadfile, which the controller alone decides; an explicit --dist is left as the user chose it.
        config.option.dist = "loadfile"


@pytest.hookimpl
def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> SpecFile | None:
    patterns = parent.config.getini("harden_spec_files")
    if any(fnmatch.fnmatch(file_path.name, pattern) for pattern in patterns):
        return SpecFile.from_parent(parent, path=file_path)
    return None


class HardenSession:
    """Per-run state: the machine pool, and how to report a backend that cannot run."""

    NAME = "systemd-harden-session"

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self._pool: MachinePool | None = None
        self.records: list[dict[str, Any]] = []  # for --harden-json
        self.tightenings: list[tuple[Spec, Tightening]] = []  # for --harden-tighten
        self.diagnoses: dict[Path, list[Diagnosis]] = {}  # verified ones, per spec, to try first next time
        self.baseline: Baseline | None = None  # --harden-baseline, loaded by check_report_options()
        self.security_policy: Path | None = None  # --harden-security-policy
        self.stop_notes: list[str] = []  # services that had to be killed at teardown, for the summary
        self.not_started: dict[str, tuple[str, int]] = {}  # spec -> (why its service did not start, items not run)

    @staticmethod
    def of(config: pytest.Config) -> HardenSession:
        session = config.pluginmanager.get_plugin(HardenSession.NAME)
        assert isinstance(session, HardenSession)
        return session

    @property
    def pool(self) -> MachinePool:
        if self._pool is None:
            cache_dir = self.config.getoption("harden_cache_dir")
            self._pool = MachinePool(backend=self.config.getoption("harden_backend"),
                                     default_release=self.releases[0] if len(self.releases) == 1 else None,
                                     image_cache=ImageCache(
                                         Path(cache_dir) if cache_dir else None,
                                         max_age_days=self.config.getoption("harden_image_max_age"),
                                         refresh=self.config.getoption("harden_refresh_images")),
                                     progress=self.progress,
                                     remeasure=self.config.getoption("harden_remeasure"))
        return self._pool

    def progress(self, message: str) -> None:
        """Show progress of long work (image builds, boots) even while output is captured."""
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        if reporter is None:
            print(f"[harden] {message}", file=sys.stderr, flush=True)
            return
        with capture.global_and_fixture_disabled() if capture else nullcontext():
            reporter.write_line(f"[harden] {message}")

    def release(self, service: HardenedService) -> None:
        """Stop ``service`` at teardown. One that had to be killed is noted for the summary; one that could not be
        stopped at all fails the teardown with the reason (no traceback: it is the machine's state, not code)."""
        try:
            note = self.pool.release(service)
        except HardenError as exc:
            pytest.fail(f"infrastructure error (not your unit's fault): stopping {service.unit}: {exc}", pytrace=False)
        if note:
            self.stop_notes.append(f"{service.spec.path.name}: {note}")
            self.progress(note)

    def not_run(self, spec: str, reason: str) -> None:
        """Count an item of ``spec`` not run because its service did not start (``reason``), for the summary."""
        _reason, count = self.not_started.get(spec, (reason, 0))
        self.not_started[spec] = (reason, count + 1)

    def unavailable(self, exc: BackendUnavailable) -> NoReturn:
        if self.config.getoption("harden_require_backend"):
            pytest.fail(f"backend unavailable (--harden-require-backend): {exc}", pytrace=False)
        pytest.skip(f"backend unavailable: {exc}")

    @property
    def releases(self) -> list[str]:
        """--harden-release, split: the Debian releases every spec that pins none runs on."""
        return parse_releases(self.config.getoption("harden_release"))

    def releases_for(self, spec: Spec) -> list[str]:
        """The releases ``spec`` runs on in this session, one run each: its own (machine.release), else
        --harden-release's; "" is the default release."""
        if spec.releases:
            return list(spec.releases)
        return self.releases or [spec.machine.release]

    def cached_tree(self, spec: Spec) -> InTree | None:
        """The tree of ``spec``'s image if it is cached (built by an earlier run), else None."""
        image = self.pool.image_cache.cached(spec.machine.packages,
                                             release=spec.machine.release or self.pool.default_release,
                                             debs=spec.machine.debs)
        if image is None:
            return None
        try:
            return image.tree()
        except MachineError:
            return None  # a layered image whose layers cannot be joined here: the machine's first boot says why

    def start(self, spec: Spec) -> HardenedService:
        """The spec's service, started; a backend that cannot run skips (or fails under --harden-require-backend)."""
        try:
            return self.pool.service_for(spec)
        except BackendUnavailable as exc:
            self.unavailable(exc)

    def diagnose(self, service: HardenedService, scenario: Scenario | None, evidence: str) -> Diagnosis | None:
        """Run the diagnosis if it is switched on (--harden-diagnose), showing that it runs: it takes reruns."""
        if self.config.getoption("harden_diagnose") == "off":
            return None
        what = f"scenario {scenario.name!r}" if scenario else "the start"
        self.progress(f"diagnosing why {what} fails under {service.spec.path.name} (restarting the service under "
                      "relaxed hardening)")
        earlier = self.diagnoses.setdefault(service.spec.path, [])
        diagnosis = diagnose_failure(service, scenario, evidence,
                                     max_runs=self.config.getoption("harden_diagnose_runs"),
                                     max_seconds=self.config.getoption("harden_diagnose_seconds"), previous=earlier)
        if diagnosis.verified and diagnosis not in earlier:
            earlier.append(diagnosis)
        return diagnosis

    def _image_order(self, items: list[pytest.Item]) -> list[MachineConfig]:
        """The machine sections of the collected specs, in the order their images are wanted: first those of the
        specs whose unit is checked before the first test (pytest_collection_finish; not on an xdist worker), then
        in the items' order."""
        runs = list({id(item.parent): item.parent for item in items if isinstance(item, SpecItem)}.values())
        if not hasattr(self.config, "workerinput"):
            runs.sort(key=lambda run: not run.spec.service.unit_name)
        return list(dict.fromkeys(run.spec.machine for run in runs))

    def image_ranks(self, items: list[pytest.Item]) -> dict[Path, int]:
        """Where each directory of ``items`` goes when images must be built first (empty when none must): after
        the last image its specs need, in build order. The first tests then run while later images are still being
        built, rather than after all of them; a directory's items stay together and in order. Directories without
        spec items go last (what they need is built on demand, after the session's own images). Not with
        --collect-only, nor on an xdist worker: every worker must collect the same order, whatever it finds built."""
        if self.config.option.collectonly or hasattr(self.config, "workerinput"):
            return {}
        todo = self.pool.images_to_build(self._image_order(items))
        if not todo:
            return {}
        position = {want: number for number, want in enumerate(todo)}
        ranks: dict[Path, int] = {}
        for item in items:
            if isinstance(item, SpecItem):
                want = self.pool.image_wanted(self.pool.effective_config(item.parent.spec.machine))
                rank = max(position.get(want, -1), position.get(ImageWanted(want.release), -1))
                ranks[item.path.parent] = max(rank, ranks.get(item.path.parent, -1))
        return {item.path.parent: ranks.get(item.path.parent, len(todo)) for item in items}

    def _prepare_images(self, session: pytest.Session) -> None:
        """Start building every container image the collected specs need and the cache lacks, several at once, in
        the background: a test waits for its own machine's image only (see MachinePool.start_preparing_images)."""
        configs = self._image_order(session.items)
        if not configs:
            return
        worker = getattr(self.config, "workerinput", None)
        workers = int(worker["workercount"]) if worker else 1
        # At most one build per core across all xdist workers (more would only make each slower), and four in all:
        # beyond that the mirror and the disk are what is shared.
        threads = max(1, min(os.cpu_count() or 1, MAX_IMAGE_BUILDS) // workers)
        # Under xdist a worker may wait for another's build (its lock), which no wait of its own can raise: there
        # every build runs as anything else.
        self.pool.start_preparing_images(configs, threads=threads,
                                         rotate=int(worker["workerid"].removeprefix("gw")) if worker else 0,
                                         background=workers == 1)

    @pytest.hookimpl
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """Before any test runs: the images the collected specs need start building, several at once; the units
        the selected specs name are checked on their machines (a unit that does not exist, a package that ships no
        such unit, a unit file systemd rejects are one line each, and no test runs). Their images are built first
        (_image_order); the others go on building while the first tests run."""
        if self.config.option.collectonly:
            return
        self._prepare_images(session)
        errors: list[str] = []
        runs: dict[int, SpecRun] = {}
        for item in session.items:
            if isinstance(item.parent, SpecRun):
                runs[id(item.parent)] = item.parent
        if hasattr(self.config, "workerinput"):
            # An xdist worker cannot stop the session (its error only ends the worker, and pytest-xdist then reports
            # an internal error without the line), so checking first gains nothing there: each such spec's start
            # item fails with the same line, and its other items are not run. Nor does every worker boot every unit
            # spec's machine, and wait for its image, before its first test.
            return
        # In the order their images are ready: on a fresh cache the first release's base may still be building
        # while another's is done.
        to_check = [run for run in runs.values() if run.spec.service.unit_name]
        while to_check:
            run = to_check.pop(self.pool.first_ready([run.spec.machine for run in to_check]))
            try:
                check_unit(self.pool.machine_for(run.spec.machine), run.spec)
            except SpecError as exc:
                errors.append(str(exc))
            except HardenError:
                continue  # no machine (or it failed): the start item says why, once
        if errors:
            raise pytest.UsageError("\n".join(dict.fromkeys(errors)))

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # Items pass their record in user_properties: it survives xdist and shows in JUnit XML, which writes a
        # property's str(): JSON text then, not a Python repr (first, before the junitxml plugin reads it). Not on an
        # xdist worker, which sends the report on with execnet, and that serializes plain dicts only.
        if not hasattr(self.config, "workerinput"):
            report.user_properties = [(name, JsonRecord(value) if name == "harden" and isinstance(value, dict)
                                       else value) for name, value in report.user_properties]
        for name, record in report.user_properties:
            if name == "harden" and isinstance(record, dict) and report.when == "call":
                self.records.append({**record, "nodeid": report.nodeid, "outcome": report.outcome,
                                     "message": str(report.longrepr) if report.failed else None})

    @pytest.hookimpl
    def pytest_sessionfinish(self) -> None:
        if self._pool is not None:
            self._pool.close()
        if hasattr(self.config, "workerinput"):
            return  # an xdist worker: the controller has every record and writes the files once

        path = self.config.getoption("harden_json")
        if path:
            Path(path).write_text(report.json_report(self.records, self.config.rootpath))
        html_path = self.config.getoption("harden_html")
        if html_path:
            Path(html_path).write_text(report.render_html(report.summarize(self.records, self.config.rootpath)))
        if self.baseline is not None and self.config.getoption("harden_baseline_update"):
            self.update_baseline(self.baseline)

    # -- exposure, baselines and reports (logic in report/exposure.py, report/baseline.py, report/formats.py) ----------

    def check_report_options(self) -> None:
        """Fail fast, before collection, on report options that cannot work; load the baseline."""
        option = self.config.getoption
        for release in self.releases:
            if release not in RELEASES:
                close = difflib.get_close_matches(release, list(RELEASES), n=1)
                raise pytest.UsageError(f"--harden-release: unknown Debian release {release!r}"
                                        + (f" (did you mean {close[0]}?)" if close else "")
                                        + f"; one of {', '.join(RELEASES)}")
        if option("harden_baseline_update") and not option("harden_baseline"):
            raise pytest.UsageError("--harden-baseline-update needs the file to write: add --harden-baseline=PATH")
        policy = option("harden_security_policy")
        if policy:
            try:
                check_policy(Path(policy))
            except ValueError as exc:
                raise pytest.UsageError(f"--harden-security-policy: {exc}") from None
            self.security_policy = Path(policy).resolve()
        path = option("harden_baseline")
        if path:
            if not Path(path).exists() and not option("harden_baseline_update"):
                raise pytest.UsageError(f"--harden-baseline={path}: no such file; record one first with "
                                        f"--harden-baseline={path} --harden-baseline-update")
            try:
                self.baseline = Baseline.load(path)
            except BaselineError as exc:
                raise pytest.UsageError(f"--harden-baseline: {exc}") from None

    def wants_exposure(self, spec: Spec) -> bool:
        """Whether ``spec`` gets an exposure item (--harden-exposure; auto: when something uses the score)."""
        mode = self.config.getoption("harden_exposure")
        if mode != "auto":
            return bool(mode == "on")
        return spec.max_exposure is not None or any(
            self.config.getoption(name) for name in ("harden_baseline", "harden_json", "harden_html"))

    def update_baseline(self, current: Baseline) -> None:
        """Rewrite the baseline file with what this run observed, keeping what it did not look at."""
        observed = {}
        for spec_path, records in records_by_spec(self.records).items():
            try:
                spec = load_spec(spec_path_of(spec_path))
            except SpecError:
                continue  # a spec that no longer loads has no items, and nothing to record
            observed[spec_path] = (observe(records, spec), spec)
        current.updated(observed).write()
        self.progress(f"baseline {current.path} updated for {len(observed)} spec(s)")

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.not_started:
            terminalreporter.write_sep("=", "systemd hardening: services that did not start")
            for line in report.not_started_lines(self.not_started):
                terminalreporter.write_line(line)
        if self.stop_notes:
            terminalreporter.write_sep("=", "systemd hardening teardown")
            for note in self.stop_notes:
                terminalreporter.write_line(note)
        reports = report.summarize(self.records, self.config.rootpath)
        if not reports:
            return
        terminalreporter.write_sep("=", "systemd hardening summary")
        for line in report.summary_lines(reports):
            terminalreporter.write_line(line)
        for option, what in (("harden_json", "JSON report"), ("harden_html", "HTML report")):
            if self.config.getoption(option):
                terminalreporter.write_line(f"{what}: {self.config.getoption(option)}")


# --- fixtures -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def harden_pool(pytestconfig: pytest.Config) -> MachinePool:
    """Session-scoped :class:`~pytest_systemd_harden.unit.pool.MachinePool` of booted machines.

    One machine per distinct ``machine:`` section, booted on first use and shut down (containers, cgroups,
    processes) when the session ends. ``harden_pool.machine_for(spec.machine)`` gives a
    :class:`~pytest_systemd_harden.machine.backends.base.Machine` for tests that need the machine without a service.
    """
    return HardenSession.of(pytestconfig).pool


@pytest.fixture
def harden_spec(request: pytest.FixtureRequest) -> Spec:
    """The :class:`~pytest_systemd_harden.spec.load.Spec` named by ``@pytest.mark.harden("path.yaml")``.

    The path is relative to the test file. An invalid spec fails the test with the file, line, key and a hint.
    """
    marker = request.node.get_closest_marker("harden")
    if marker is None or not marker.args:
        raise pytest.UsageError(f"{request.node.nodeid}: hardened_service needs @pytest.mark.harden('spec.yaml')")
    path = Path(request.node.path).parent / str(marker.args[0])
    try:
        return load_spec(path, request.config.rootpath)
    except SpecError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def hardened_service(request: pytest.FixtureRequest, harden_spec: Spec) -> Iterator[HardenedService]:
    """The service of ``@pytest.mark.harden(spec)``, started clean under its hardening for this test.

    Yields a :class:`~pytest_systemd_harden.unit.service.HardenedService`:

    * ``client(cmd)`` - run a command unconfined on the machine, as a client of the service;
    * ``inside(cmd)`` - run a command in the service's sandbox (same directives, user and namespaces);
    * ``journal()``, ``state()``, ``state_text()`` - the unit's journal tail and state;
    * ``host`` / ``sandbox_host`` - testinfra ``Host`` objects for the machine and for the sandbox.

    Commands return a :class:`~pytest_systemd_harden.result.CommandResult` (``ok``, ``exit_status``,
    ``signal``, ``stdout``, ``stderr``, ``errno_names``, ``describe()``). The machine is shared by the session;
    the service is stopped and its state directories cleaned after the test.
    """
    session = HardenSession.of(request.config)
    service = session.start(harden_spec)
    yield service
    session.release(service)


# --- YAML specs as tests ------------------------------------------------------------------------------------

class SpecRun:
    """One run of a spec on one machine: its items, and the service they share. The spec file itself where the
    session runs one Debian release, else one :class:`ReleaseRun` per release below the file."""

    spec: Spec
    key: str  # records, reports and baselines know this run by it (baseline.spec_key)
    _service: HardenedService | None = None
    _start_error: BaseException | None = None
    if TYPE_CHECKING:  # what the pytest node it is mixed into has
        path: Path
        nodeid: str
        stash: pytest.Stash
        config: pytest.Config

    @property
    def label(self) -> str:
        """The run as summaries name it: the spec file's name, with ``[release]`` for a run of several."""
        return Path(self.key).name

    def items(self: Any) -> Iterator[pytest.Item]:
        yield StartItem.from_parent(self, name="service starts under hardening")
        for scenario in self.spec.scenarios:
            yield ScenarioItem.from_parent(self, name=scenario.name, scenario=scenario)
        session = HardenSession.of(self.config)
        if self.spec.enforcement.enabled:
            own = own_hardening_before_boot(self.spec, lambda: session.cached_tree(self.spec))
            for subject, title, line in item_names(self.spec, own):
                yield EnforcementItem.from_parent(self, name=title, subject=subject, line=line)
        if session.wants_exposure(self.spec):
            limit = self.spec.max_exposure
            yield ExposureItem.from_parent(self, name="exposure" if limit is None else f"exposure <= {limit:.1f}")
        if session.baseline is not None:
            yield BaselineItem.from_parent(self, name="baseline")  # moved after every other item: see below

    def service(self) -> HardenedService:
        """The spec's service, started once for all its items (an earlier start failure is raised again)."""
        if self._start_error is not None:
            raise self._start_error.with_traceback(None) from None
        if self._service is None:
            try:
                self._service = HardenSession.of(self.config).start(self.spec)
            except (HardenError, pytest.skip.Exception, pytest.fail.Exception) as exc:
                self._start_error = exc
                raise
        return self._service

    def teardown(self: Any) -> None:
        service, self._service = self._service, None
        if service is not None:
            session = HardenSession.of(self.config)
            if self.config.getoption("harden_tighten"):
                session.progress(f"tightening {self.path.name} (restarting the service under stricter hardening)")
                session.tightenings.append((self.spec, tighten_service(
                    service, keep=self.spec.tighten_keep, never=self.spec.tighten_never)))
            session.release(service)


class SpecFile(SpecRun, pytest.File):
    """A hardening spec: one item that the service starts, then one item per scenario (per release, when the
    session runs several: ``harden.yaml::trixie::...``)."""

    def collect(self) -> Iterator[pytest.Item | pytest.Collector]:
        try:
            spec = load_spec(self.path, self.config.rootpath)  # machine.files may come from the project
        except SpecError as exc:
            raise self.CollectError(str(exc)) from None
        releases = HardenSession.of(self.config).releases_for(spec)
        if len(releases) == 1:
            self.spec, self.key = spec.on_release(releases[0]), spec_key(self.path)
            yield from self.items()
            return
        for release in releases:
            yield ReleaseRun.from_parent(self, name=release, spec=spec.on_release(release),
                                         key=spec_key(self.path, release))


class ReleaseRun(SpecRun, pytest.Collector):
    """A spec on one Debian release, when the session runs several (--harden-release=bookworm,trixie)."""

    def __init__(self, *, spec: Spec, key: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec, self.key = spec, key

    def collect(self) -> Iterator[pytest.Item]:
        yield from self.items()


class JsonRecord(dict[str, Any]):
    """An item's ``harden`` record that prints as JSON (JUnit XML properties are their values' str())."""

    def __str__(self) -> str:
        return json.dumps(self, sort_keys=True, default=str)

    __repr__ = __str__


class ScenarioFailed(AssertionError):
    """A scenario did not do what its spec expects; the message is the whole report."""


class MachineCapHit(ScenarioFailed):
    """The machine as a whole hit its memory or tasks cap during an item (a fork bomb, a leak): the item fails with
    that reason first, whatever else it reported."""


class SpecItem(pytest.Item):
    parent: SpecRun  # type: ignore[assignment]  # a SpecFile or a ReleaseRun, both pytest nodes

    def run_item(self) -> None:
        raise NotImplementedError

    def runtest(self) -> None:
        """:meth:`run_item`; if the spec's machine hit a cap meanwhile (cgroups.Caps), the item fails saying so."""
        pool = HardenSession.of(self.config).pool
        machine = pool.running_machine(self.parent.spec.machine)
        before = machine.cap_counters() if machine is not None else {}  # a machine booted by this item starts at 0
        try:
            self.run_item()
        except (KeyboardInterrupt, pytest.skip.Exception):
            raise
        except BaseException as exc:
            self._fail_if_capped(machine, before, exc)
            raise
        self._fail_if_capped(machine, before, None)

    def _fail_if_capped(self, machine: Machine | None, before: dict[str, int], failure: BaseException | None) -> None:
        machine = machine or HardenSession.of(self.config).pool.running_machine(self.parent.spec.machine)
        hits = machine.caps_hit(before) if machine is not None else []
        if hits:
            shown = "" if failure is None else "\n\n" + (str(failure) or type(failure).__name__)
            raise MachineCapHit("\n".join(hits) + shown) from None

    def new_record(self, **fields: Any) -> dict[str, Any]:
        """This item's entry in the JSON report (--harden-json), filled in as the item runs."""
        record: dict[str, Any] = {"spec": self.parent.key, **fields}
        if self.parent.key != str(self.parent.path):
            record["release"] = self.parent.spec.machine.release
        self.user_properties.append(("harden", record))
        return record

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str | Any:
        if isinstance(excinfo.value, (ScenarioFailed, HardenError)):
            prefix = "infrastructure error (not your unit's fault): " if isinstance(excinfo.value, MachineError) else ""
            return prefix + str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"{self.path.name}: {self.name}"

    def started_service(self) -> HardenedService:
        """The spec's service for an item that needs it running. If it did not start, this item is not run (a skip
        pointing at the start item, which fails with why and its diagnosis): one cause is one failure, not one per
        item."""
        try:
            return self.parent.service()
        except (HardenError, pytest.fail.Exception) as exc:
            reason = "no backend" if isinstance(exc, pytest.fail.Exception) else type(exc).__name__
            HardenSession.of(self.config).not_run(self.parent.label, reason)
            raise pytest.skip.Exception(f"not run: the service did not start ({reason}; see "
                                        f"'{self.parent.nodeid}::service starts under hardening')",
                                        _use_item_location=True) from None


class StartItem(SpecItem):
    """The service starts and becomes ready under the spec's hardening."""

    def run_item(self) -> None:
        self.record = self.new_record(check="start", diagnosis=None)
        try:
            started = self.parent.service()
        except ServiceFailed as exc:
            service = HardenedService(HardenSession.of(self.config).pool.machine_for(self.parent.spec.machine),
                                      self.parent.spec)
            self.record["tested"] = _tested(service.machine)
            diagnosis = HardenSession.of(self.config).diagnose(service, None, str(exc))
            if diagnosis is None:
                raise
            self.record["diagnosis"] = diagnosis.as_dict()
            raise ServiceFailed(f"{exc}\n{diagnosis.render()}") from None
        self.record["tested"] = _tested(started.machine)
        if started.spec.service.unit_name:  # a unit systemd loads: its own hardening is in force too (baselines)
            self.record["hardening_in_force"] = hardening_in_force(started)


def _tested(machine: Machine) -> dict[str, Any]:
    """What the reports say was tested (Machine.tested); a machine that cannot say does not fail the item."""
    try:
        return machine.tested()
    except HardenError as exc:
        return {"backend": machine.NAME, "error": str(exc)}


class ScenarioItem(SpecItem):
    """One scenario of a spec, run against the spec's service."""

    def __init__(self, *, scenario: Scenario, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scenario = scenario

    def run_item(self) -> None:
        service = self.started_service()
        outcome = run_scenario(service, self.scenario)
        self.record = self.new_record(check="scenario", scenario=self.scenario.name, diagnosis=None)
        if not outcome.passed:
            report = failure_report(service, outcome)
            diagnosis = HardenSession.of(self.config).diagnose(service, self.scenario, report)
            if diagnosis is not None:
                self.record["diagnosis"] = diagnosis.as_dict()
                report += "\n" + diagnosis.render()
            raise ScenarioFailed(report)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        line = self.scenario.line - 1 if self.scenario.line else None
        return self.path, line, f"{self.path.name}: scenario {self.scenario.name!r}"


# --- enforcement items (logic in sandbox/ and probes/) --------------------------------------------------------

ENFORCEMENT_REPORT = pytest.StashKey[Any]()


class EnforcementItem(SpecItem):
    """One directive of the spec (or one ``deny:`` entry), shown in force by denial probes in the sandbox.

    The probes of all items of a spec run once, as one batch in the sandbox plus control batches without
    hardening; each item then reports its verdict: pass, fail (NOT enforced), or skip (unverifiable here, with
    the reason; a failure under --harden-strict-enforcement).
    """

    def __init__(self, *, subject: str, line: int | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.subject = subject
        self.line = line

    def run_item(self) -> None:
        service = self.started_service()
        report = self.parent.stash.get(ENFORCEMENT_REPORT, None)
        if report is None:
            report = verify_service(service)
            self.parent.stash[ENFORCEMENT_REPORT] = report
        collected = [i.subject for i in self.session.items if isinstance(i, EnforcementItem) and i.parent is self.parent]
        verdict = report.for_item(self.subject, collected)
        record = self.new_record(check="enforcement", status=verdict.status)
        if verdict.status != UNVERIFIABLE:  # what baselines and reports count as enforced or not
            key = "probe" if verdict.subject.denial else "directive"
            record[key] = verdict.subject.denial.probe.key if verdict.subject.denial else self.subject
        else:
            record["unverifiable"] = self.subject
            record["why"] = verdict.message().split("\n", 1)[0]  # the JSON says why, as the short summary does
        if verdict.status == ENFORCED:
            # What each check showed, for -rP and JUnit readers; failures and skips carry it as their message.
            self.add_report_section("call", "enforcement", verdict.message())
            return
        if verdict.status == UNVERIFIABLE and not self.config.getoption("harden_strict_enforcement"):
            raise pytest.skip.Exception(verdict.message(), _use_item_location=True)  # shown at the spec's line
        suffix = "\n(unverifiable here, and --harden-strict-enforcement is set)" if verdict.status == UNVERIFIABLE \
            else ""
        raise EnforcementFailed(verdict.message() + suffix)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str | Any:
        if isinstance(excinfo.value, EnforcementFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, self.line - 1 if self.line else None, f"{self.path.name}: {self.name}"


# --- exposure and baseline items (logic in report/exposure.py and report/baseline.py) ---------------------------------

class ExposureItem(SpecItem):
    """The spec's unit, scored by ``systemd-analyze security`` on the spec's machine; fails above max_exposure."""

    def run_item(self) -> None:
        spec, session = self.parent.spec, HardenSession.of(self.config)
        record = self.new_record(check="exposure", max_exposure=spec.max_exposure)
        try:
            machine = session.pool.machine_for(spec.machine)
        except BackendUnavailable as exc:
            session.unavailable(exc)
        score = exposure.score(machine, spec, session.security_policy)
        record.update(score.as_dict())
        if spec.max_exposure is not None and score.tenths > exposure.tenths_of(spec.max_exposure):
            raise ScenarioFailed(exposure.failure_message(score, spec))


class BaselineItem(SpecItem):
    """This run of the spec against the --harden-baseline file: regressions fail, improvements are reported."""

    def run_item(self) -> None:
        session = HardenSession.of(self.config)
        assert session.baseline is not None
        spec = self.parent.spec
        updating = bool(self.config.getoption("harden_baseline_update"))
        record = self.new_record(check="baseline", baseline=str(session.baseline.path), updating=updating)
        observed = baseline.observe([r for r in session.records if r.get("spec") == self.parent.key], spec)
        old = session.baseline.get(self.parent.key)
        if old is None:
            note = "added to the baseline by this run" if updating else \
                f"not in the baseline {session.baseline.path}: add it with --harden-baseline-update"
            record.update(missing=True, regressions=[], improvements=[], notes=[note])
            return
        changes = baseline.compare(old, observed, spec)
        record.update(changes.as_dict())
        if changes.regressions and not updating:
            raise ScenarioFailed(baseline.render(changes, str(spec.path.name), session.baseline.path))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Baseline items compare what every other item of their spec recorded, so they run after all of them
    (enforcement and other items included, wherever they were collected); their relative order is kept. Where
    images must be built first, directories run in the order their images will be ready (HardenSession.image_ranks);
    on a warm cache the collected order is kept."""
    ranks = HardenSession.of(config).image_ranks(items)
    items.sort(key=lambda item: (isinstance(item, BaselineItem), ranks.get(item.path.parent, 0)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Flat ``harden_*`` properties (spec, exposure, culprit, ...) beside each ``harden`` record, so JUnit XML
    readers see plain values rather than the record's Python repr."""
    if call.when == "call":
        records = [record for name, record in item.user_properties if name == "harden" and isinstance(record, dict)]
        for record in records:
            item.user_properties.extend(junit_properties(record, item.config.rootpath))
    yield


@pytest.hookimpl
def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """--harden-tighten: each spec's tightened hardening, ready to paste into its ``hardening:`` section."""
    for spec, result in HardenSession.of(config).tightenings:
        terminalreporter.write_sep("-", f"tightened: {spec.path.name}")
        for line in result.render().splitlines():
            terminalreporter.write_line(line)
        if not result.ships:  # not what passed where a host starts
            terminalreporter.write_line("no tightened hardening to ship: its drop-in does not pass, or could not be "
                                        "checked (above)")
        elif result.after != result.before:
            terminalreporter.write_line("hardening:")
            for directive in result.after:
                terminalreporter.write_line(f"  {directive.name}: {yaml_value(directive)}")
            if spec.service.dropin_path:  # a unit systemd loads: the drop-in to ship for it
                terminalreporter.write_line(f"# {spec.service.dropin_path} for {spec.service.unit_name}")
                for line in result.dropin().splitlines():
                    terminalreporter.write_line(line)
