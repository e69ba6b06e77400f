"""The diagnosis search, against a simulated service: exact culprits, relaxations and rerun counts."""

from __future__ import annotations

import math
from collections.abc import Callable

from simulated_service import GPG_LIKE, GROUPS, World, hardening

from pytest_systemd_harden.search.diagnosis import (
    RESTRICTING,
    Context,
    Diagnosis,
    Finding,
    Oracle,
    Relaxation,
    TrialResult,
    ddmin,
    diagnose,
    expand_group,
    no_new_privileges_sources,
    paths_in,
    refine,
)
from pytest_systemd_harden.search.scenarios import _diagnosed
from pytest_systemd_harden.spec.directives import Directive


def run(world: World, directives: tuple[Directive, ...], evidence: str = "", **kwargs: object) -> Diagnosis:
    return diagnose(directives, world.trial, evidence=evidence, syscall_groups=lambda: GROUPS,
                    spec_name="harden.yaml", **kwargs)  # type: ignore[arg-type]


# --- ddmin --------------------------------------------------------------------------------------------------------

def counting(predicate: Callable[[list[int]], bool]) -> tuple[Callable[[list[int]], bool], list[int]]:
    calls: list[int] = []

    def wrapped(subset: list[int]) -> bool:
        calls.append(len(subset))
        return predicate(subset)

    return wrapped, calls


def test_ddmin_finds_one_culprit_in_logarithmic_calls() -> None:
    for n in (10, 20, 30):
        for culprit in range(n):
            interesting, calls = counting(lambda subset, c=culprit: c in subset)
            assert ddmin(list(range(n)), interesting) == [culprit]
            assert len(calls) <= 2 * math.ceil(math.log2(n)) + 2, (n, culprit, len(calls))


def test_ddmin_finds_every_member_of_a_necessary_pair() -> None:
    interesting, _ = counting(lambda subset: 3 in subset and 17 in subset)
    assert sorted(ddmin(list(range(20)), interesting)) == [3, 17]


# --- whole diagnoses ------------------------------------------------------------------------------------------------

def test_the_gitea_regression_names_memlock_and_mlock() -> None:
    directives = hardening(**GPG_LIKE, SystemCallFilter=["@system-service", "~@memlock"])
    diagnosis = run(World(syscalls=["mlock", "read"]), directives)
    assert diagnosis.verdict == "found" and diagnosis.verified
    assert [f.culprit.name for f in diagnosis.findings] == ["SystemCallFilter"]
    relaxation = diagnosis.findings[0].relaxation
    assert relaxation is not None
    assert relaxation.description == "stop denying @memlock in SystemCallFilter="
    assert relaxation.needs == "mlock (in @memlock)"
    assert diagnosis.combined is not None
    assert diagnosis.combined.dropin(directives) == "[Service]\nSystemCallFilter=\nSystemCallFilter=@system-service\n"
    assert diagnosis.combined.spec_change(directives) == 'SystemCallFilter: "@system-service"'
    assert diagnosis.runs <= 25  # 23 directives: control runs, a ddmin, a group and a syscall search


def test_a_large_denied_group_is_narrowed_to_the_subgroup_needed() -> None:
    directives = hardening(ProtectHostname=True, SystemCallFilter=["@system-service", "~@privileged"])
    diagnosis = run(World(syscalls=["fchownat"]), directives)
    relaxation = diagnosis.findings[0].relaxation
    assert relaxation is not None and diagnosis.verified
    assert relaxation.description == "re-allow @chown after the deny list of SystemCallFilter="
    assert relaxation.needs == "fchownat (in @privileged)"
    assert relaxation.apply(directives)[1].unit_lines() == [
        "SystemCallFilter=@system-service", "SystemCallFilter=~@privileged", "SystemCallFilter=@chown"]


def test_the_kernel_names_each_call_a_service_needs_one_rerun_at_a_time() -> None:
    # memcached dropping root under ~@setuid: each rerun is killed at the next call and the kernel names it, so the
    # calls come one rerun each, not from a search over the group's 14 names (7 of them i386's).
    directives = hardening(ProtectHome=True, SystemCallFilter=["@system-service", "~@setuid"])
    needs = ["setgroups", "setgid", "setuid"]
    first = "kernel log (seccomp):\nthe kernel killed 4242 (svc) for syscall setgroups"
    guided = World(syscalls=needs, kernel_log=True)
    diagnosis = run(guided, directives, evidence=first)
    relaxation = diagnosis.findings[0].relaxation
    assert relaxation is not None and diagnosis.verified
    assert relaxation.needs == "setgroups, setgid, setuid (in @setuid)"
    assert relaxation.apply(directives)[1].unit_lines()[-1] == "SystemCallFilter=setgroups setgid setuid"
    # Without the records, a search; with them only what the kernel named, each once.
    searched = run(World(syscalls=needs), directives)
    assert searched.findings[0].relaxation is not None
    assert sorted(searched.findings[0].relaxation.needs.split(" (")[0].split(", ")) == sorted(needs)
    assert diagnosis.runs + 5 <= searched.runs, (diagnosis.runs, searched.runs)


def test_the_filter_line_denying_the_call_the_kernel_named_is_taken_away_first() -> None:
    # One rerun without it finds the culprit: neither the run without any hardening nor a search over the 8 others.
    directives = hardening(ProtectHome=True, PrivateTmp=True, ProtectSystem="full", PrivateDevices=True,
                           ProtectKernelModules=True, RestrictNamespaces=True, RestrictRealtime=True,
                           CapabilityBoundingSet="CAP_SETUID CAP_SETGID", SystemCallFilter=["@system-service", "~@setuid"])
    world = World(syscalls=["setgroups"], kernel_log=True)
    diagnosis = run(world, directives, evidence="the kernel killed 4242 (svc) for syscall setgroups")
    assert [f.culprit.name for f in diagnosis.findings] == ["SystemCallFilter"] and diagnosis.verified
    assert world.runs[1] == tuple(str(d) for d in directives if d.name != "SystemCallFilter"), world.runs
    assert not any(all(not line.startswith(tuple(RESTRICTING)) for line in ran) for ran in world.runs), world.runs
    assert diagnosis.runs <= 6, world.runs  # confirmed, the line taken away, its calls one at a time, the fix


def test_the_filter_line_alone_putting_no_new_privileges_in_force_is_searched_as_before() -> None:
    # Passing without it might be NoNewPrivileges= gone rather than the call: the search proves which.
    directives = hardening(User="svc", ProtectHome=True, PrivateTmp=True, SystemCallFilter="~@setuid")
    world = World(syscalls=["setgroups"], kernel_log=True)
    diagnosis = run(world, directives, evidence="the kernel killed 4242 (svc) for syscall setgroups")
    assert [f.culprit.name for f in diagnosis.findings] == ["SystemCallFilter"] and diagnosis.verified
    assert world.runs[1] == ("User=svc",), world.runs  # the run without any hardening, then the search


def test_a_search_over_a_group_tries_only_calls_a_native_process_can_make() -> None:
    directives = hardening(ProtectHome=True, SystemCallFilter=["@system-service", "~@setuid"])
    world = World(syscalls=["setresuid"])
    diagnosis = run(world, directives)
    relaxation = diagnosis.findings[0].relaxation
    assert relaxation is not None and relaxation.needs == "setresuid (in @setuid)"
    # Every rerun of the search keeps the i386 names denied: what a rerun re-allows of the group is native calls.
    group = set(GROUPS["@setuid"])
    denied_lists = [set(line.split("~", 1)[1].split()) for runs in world.runs for line in runs
                    if line.startswith("SystemCallFilter=") and "~set" in line]
    assert denied_lists, world.runs
    for denied in denied_lists:
        assert all(name.endswith("32") is False for name in group - denied), group - denied


def test_an_allow_list_lacking_a_group_gets_the_group_and_its_syscall_named() -> None:
    directives = hardening(PrivateTmp=True, SystemCallFilter="@system-service")
    diagnosis = run(World(syscalls=["pkey_alloc"]), directives)
    relaxation = diagnosis.findings[0].relaxation
    assert relaxation is not None and diagnosis.verified
    assert relaxation.description == "also allow @pkey in SystemCallFilter="
    assert relaxation.needs == "pkey_alloc (in @pkey)"


def test_a_missing_address_family_is_added_to_the_allow_list() -> None:
    directives = hardening(ProtectSystem="strict", RestrictAddressFamilies=["AF_UNIX", "AF_INET"])
    diagnosis = run(World(families=["AF_INET", "AF_NETLINK"]), directives)
    assert diagnosis.combined is not None and diagnosis.verified
    assert diagnosis.combined.dropin(directives) == \
        "[Service]\nRestrictAddressFamilies=\nRestrictAddressFamilies=AF_UNIX AF_INET AF_NETLINK\n"


def test_a_missing_capability_is_added() -> None:
    directives = hardening(NoNewPrivileges=True, CapabilityBoundingSet="CAP_NET_BIND_SERVICE")
    diagnosis = run(World(capabilities=["CAP_CHOWN"]), directives)
    assert diagnosis.combined is not None and diagnosis.verified
    assert diagnosis.combined.spec_change(directives) == "CapabilityBoundingSet: CAP_NET_BIND_SERVICE CAP_CHOWN"


def test_a_write_gets_the_service_directory_not_a_dropped_protect_system() -> None:
    directives = hardening(ProtectSystem="strict", PrivateTmp=True)
    evidence = "touch: cannot touch '/var/cache/app/entry': Read-only file system"
    diagnosis = run(World(writes=["/var/cache/app/entry"]), directives, evidence)
    assert diagnosis.combined is not None and diagnosis.verified
    assert diagnosis.combined.description == "let systemd create and grant /var/cache/app with CacheDirectory=app"
    assert diagnosis.combined.apply(directives)[0].unit_lines() == ["ProtectSystem=strict"]  # kept


def test_dynamic_user_keeps_its_sandbox_and_gets_a_path_grant() -> None:
    directives = hardening(DynamicUser=True, NoNewPrivileges=True)
    evidence = "OSError: [Errno 30] Read-only file system: '/srv/data/out.json'"
    diagnosis = run(World(writes=["/srv/data/out.json"]), directives, evidence)
    assert [f.culprit.name for f in diagnosis.findings] == ["DynamicUser"]
    assert diagnosis.combined is not None and diagnosis.verified
    # out.json does not exist yet: systemd skips a "-" path that is missing, so its directory is the grant.
    assert diagnosis.combined.description == "grant /srv/data with ReadWritePaths=-/srv/data"
    assert "DynamicUser=yes implies ProtectSystem=strict" in diagnosis.render()


def test_two_directives_that_each_block_are_both_culprits() -> None:
    directives = hardening(ProtectSystem="strict", DynamicUser=True, PrivateTmp=True)
    diagnosis = run(World(writes=["/opt/app/x"]), directives)
    assert sorted(f.culprit.name for f in diagnosis.findings) == ["DynamicUser", "ProtectSystem"]
    assert diagnosis.verified  # with no path in the evidence, both are removed, and that is verified


def test_a_failure_without_hardening_is_not_blamed_on_it() -> None:
    diagnosis = run(World(broken_anyway=True), hardening(ProtectSystem="strict"))
    assert diagnosis.verdict == "not-hardening" and diagnosis.runs == 2
    assert diagnosis.render().endswith("fails without hardening too: not a hardening problem. "
                                       "Without any hardening: exit status 1")


def test_a_failure_that_does_not_reproduce_is_called_flaky() -> None:
    diagnosis = run(World(flaky=True, syscalls=["mlock"]), hardening(SystemCallFilter="~@memlock"))
    assert diagnosis.verdict == "inconclusive" and diagnosis.runs == 1
    assert "flaky" in diagnosis.note


def test_the_rerun_budget_stops_the_search_and_says_how_to_raise_it() -> None:
    directives = hardening(**GPG_LIKE, SystemCallFilter=["@system-service", "~@memlock"])
    diagnosis = run(World(syscalls=["mlock"]), directives, max_runs=4)
    assert diagnosis.runs == 4 and diagnosis.verdict == "budget"
    assert "--harden-diagnose-runs" in diagnosis.note


def test_culprits_found_before_the_budget_ends_are_named_unrefined() -> None:
    directives = hardening(**GPG_LIKE, SystemCallFilter=["@system-service", "~@memlock"])
    assert run(World(syscalls=["mlock"]), directives).verified  # with budget enough
    # The culprit is known after 12 reruns; its refinement needs more.
    cut = run(World(syscalls=["mlock"]), directives, max_runs=13)
    assert cut.verdict == "found" and not cut.verified, cut.render()
    assert [(f.culprit.name, f.relaxation) for f in cut.findings] == [("SystemCallFilter", None)]
    assert "--harden-diagnose-runs" in cut.note
    assert "no relaxation was verified" in cut.render()


def test_a_known_relaxation_is_confirmed_in_two_reruns() -> None:
    # The failure confirmed, then the earlier relaxation tried: passing, it also shows hardening is the cause (the
    # run without any is not needed).
    directives = hardening(**GPG_LIKE, SystemCallFilter=["@system-service", "~@memlock"])
    first = run(World(syscalls=["mlock"]), directives)
    second = run(World(syscalls=["mlock"]), directives, previous=[first])
    assert second.runs == 2 and second.verified
    assert second.combined == first.combined
    assert "fixes this one too" in second.note


def test_results_are_cached_per_hardening() -> None:
    world = World(syscalls=["mlock"])
    run(world, hardening(**GPG_LIKE, SystemCallFilter=["@system-service", "~@memlock"]))
    assert len(world.runs) == len(set(world.runs))


# --- helpers ----------------------------------------------------------------------------------------------------------

def test_relaxation_adds_to_a_directive_the_spec_already_has() -> None:
    directives = hardening(ProtectSystem="strict", ReadWritePaths="/var/tmp")
    relaxation = Relaxation("grant", add=(Directive("ReadWritePaths", ("-/srv",)),))
    assert relaxation.apply(directives)[1].unit_lines() == ["ReadWritePaths=/var/tmp", "ReadWritePaths=-/srv"]
    assert relaxation.dropin(directives) == ("[Service]\nReadWritePaths=\nReadWritePaths=/var/tmp\n"
                                             "ReadWritePaths=-/srv\n")


def test_paths_in_takes_denied_paths_and_their_ancestors() -> None:
    evidence = ("mkdir: cannot create directory '/var/lib/app/cache': Read-only file system\n"
                "GET /index.html 200\n")
    assert paths_in(evidence) == ["/var/lib/app/cache", "/var/lib/app", "/var/lib"]


def test_expand_group_resolves_nested_groups_once() -> None:
    groups = {"@memlock": ["mlock", "mlock2"], "@known": ["@memlock", "read", "mlock"]}
    assert expand_group("@known", groups) == ["mlock", "mlock2", "read"]
    assert expand_group("read", groups) == ["read"]


def test_a_directive_from_the_profile_is_dropped_with_null_not_deleted() -> None:
    from pytest_systemd_harden.spec.profiles import ProfileLine

    directives = (Directive("PrivateUsers", ("yes",), ProfileLine(3, "maximum-2026")),
                  Directive("PrivateTmp", ("yes",), 5))
    relaxation = Relaxation("remove PrivateUsers=", replace=(("PrivateUsers", None),))
    assert relaxation.spec_change(directives) == "PrivateUsers: null    # drops it from profile maximum-2026"
    own = Relaxation("remove PrivateTmp=", replace=(("PrivateTmp", None),))
    assert own.spec_change(directives) == "PrivateTmp: (remove this line)"


# --- the printed fix is the tried fix -------------------------------------------------------------------------------

def test_a_boolean_is_relaxed_with_its_explicit_no_in_both_drop_in_and_spec() -> None:
    # systemd ignores an empty boolean assignment ("Failed to parse boolean value, ignoring"): a drop-in saying
    # "PrivateUsers=" would change nothing in the real unit.
    directives = hardening(PrivateUsers=True, PrivateTmp=True)
    diagnosis = run(World(capabilities=["CAP_CHOWN"]), directives)
    assert [f.culprit.name for f in diagnosis.findings] == ["PrivateUsers"] and diagnosis.verified
    assert diagnosis.combined.description == "set PrivateUsers=no (systemd's default)"
    assert diagnosis.combined.dropin(directives) == "[Service]\nPrivateUsers=no\n"
    assert diagnosis.combined.spec_change(directives) == "PrivateUsers: no"
    tried = diagnosis.combined.apply(directives)
    assert Directive("PrivateUsers", ("no",), 10) in tried  # what the rerun verified is what is printed


def test_an_enum_relaxed_to_the_default_is_written_out() -> None:
    directives = hardening(ProcSubset="pid")
    diagnosis = run(World(reads_proc=True), directives)
    assert diagnosis.combined.dropin(directives) == "[Service]\nProcSubset=all\n"
    assert diagnosis.combined.spec_change(directives) == "ProcSubset: all"


def test_removing_the_capability_bounding_set_restores_every_capability_not_none() -> None:
    # An empty CapabilityBoundingSet= is the empty set in systemd: the opposite of removing the line.
    directives = hardening(CapabilityBoundingSet="CAP_CHOWN")
    relaxation = Relaxation("remove CapabilityBoundingSet=", replace=(("CapabilityBoundingSet", None),))
    assert relaxation.dropin(directives) == "[Service]\nCapabilityBoundingSet=~\n"
    assert relaxation.spec_change(directives) == "CapabilityBoundingSet: (remove this line)"


def test_a_replacement_with_nothing_left_is_a_removal_the_loader_accepts() -> None:
    directives = hardening(SystemCallFilter="~@memlock")
    emptied = Relaxation("stop denying @memlock", replace=(("SystemCallFilter", Directive("SystemCallFilter", ())),))
    assert emptied.replace == (("SystemCallFilter", None),)
    assert emptied.spec_change(directives) == "SystemCallFilter: (remove this line)"  # not "SystemCallFilter: []"
    assert emptied.dropin(directives) == "[Service]\nSystemCallFilter=\n"
    assert emptied.apply(directives) == ()


# --- implied settings -------------------------------------------------------------------------------------------------

# A realistic unit of a job runner that calls sudo, with 20 restricting directives and a user of its own.
RUNNER = {
    "User": "runner", "ProtectSystem": "strict", "ProtectHome": True, "PrivateTmp": True, "PrivateDevices": True,
    "ProtectHostname": True, "ProtectClock": True, "ProtectKernelTunables": True, "ProtectKernelModules": True,
    "ProtectKernelLogs": True, "ProtectControlGroups": True, "LockPersonality": True, "MemoryDenyWriteExecute": True,
    "RestrictRealtime": True, "RestrictSUIDSGID": True, "RestrictNamespaces": True, "NoNewPrivileges": True,
    "SystemCallArchitectures": "native", "SystemCallFilter": "@system-service",
    "RestrictAddressFamilies": ["AF_UNIX", "AF_INET", "AF_INET6"], "UMask": "0077",
}


def test_a_setuid_helper_under_implied_no_new_privileges_is_named_as_such_within_budget() -> None:
    directives = hardening(**RUNNER)
    assert sum(d.name in RESTRICTING for d in directives) == 20
    diagnosis = run(World(setuid=True), directives, max_runs=40)
    assert diagnosis.verdict == "found" and diagnosis.verified, diagnosis.render()
    assert diagnosis.runs <= 12, diagnosis.runs
    (finding,) = diagnosis.findings
    assert finding.culprit.name == "NoNewPrivileges"
    implied = {d.name for d in finding.implied_by}
    assert {"SystemCallFilter", "RestrictAddressFamilies", "PrivateDevices", "ProtectClock"} <= implied
    assert "ProtectSystem" not in implied and "UMask" not in implied  # they imply nothing
    text = diagnosis.render()
    assert "in force through: " in text and "setting NoNewPrivileges=no alone changes nothing" in text
    dropin = diagnosis.combined.dropin(directives)
    assert "NoNewPrivileges=no\n" in dropin and "PrivateDevices=no\n" in dropin and "SystemCallFilter=\n" in dropin
    # What the rerun verified is the printed change: NoNewPrivileges=no alone would not have passed.
    assert World(setuid=True).trial(diagnosis.combined.apply(directives)).passed
    alone = Relaxation("", replace=(("NoNewPrivileges", Directive("NoNewPrivileges", ("no",))),))
    assert not World(setuid=True).trial(alone.apply(directives)).passed


def test_no_new_privileges_never_set_in_the_spec_is_named_and_written_out() -> None:
    runner = {k: v for k, v in RUNNER.items() if k != "NoNewPrivileges"}
    directives = hardening(**runner)
    diagnosis = run(World(setuid=True), directives)
    (finding,) = diagnosis.findings
    assert finding.culprit == Directive("NoNewPrivileges", ("yes",)) and finding.implied_by
    assert diagnosis.verified and "NoNewPrivileges=no" in diagnosis.combined.dropin(directives)


def test_a_member_of_the_group_breaking_on_its_own_is_still_found_alone() -> None:
    # The job runner calls mlock: SystemCallFilter= is the culprit, not what it implies.
    runner = {**RUNNER, "SystemCallFilter": ["@system-service", "~@memlock"]}
    diagnosis = run(World(syscalls=["mlock"]), hardening(**runner))
    assert [f.culprit.name for f in diagnosis.findings] == ["SystemCallFilter"] and diagnosis.verified
    assert not diagnosis.findings[0].implied_by


def test_a_root_service_has_no_implied_no_new_privileges() -> None:
    root = hardening(**{k: v for k, v in RUNNER.items() if k not in ("User", "NoNewPrivileges")})
    assert no_new_privileges_sources(root) == []
    assert [d.name for d in no_new_privileges_sources(hardening(**RUNNER))][:3] == [
        "PrivateDevices", "ProtectHostname", "ProtectClock"]
    dynamic = hardening(DynamicUser=True, ProtectClock=True, ProtectKernelLogs=False)
    assert [d.name for d in no_new_privileges_sources(dynamic)] == ["DynamicUser", "ProtectClock"]


# --- narrow relaxations first: a grant, then a weaker value, then removal ---------------------------------------------

def test_a_device_under_private_devices_is_bound_in_and_allowed() -> None:
    directives = hardening(PrivateDevices=True, PrivateTmp=True)
    evidence = "open /dev/net/tun: No such file or directory"
    diagnosis = run(World(devices=["/dev/net/tun"]), directives, evidence)
    assert [f.culprit.name for f in diagnosis.findings] == ["PrivateDevices"] and diagnosis.verified
    relaxation = diagnosis.findings[0].relaxation
    assert relaxation is not None and relaxation.needs == "device /dev/net/tun"
    assert diagnosis.combined.dropin(directives) == (
        "[Service]\nBindPaths=\nBindPaths=/dev/net/tun\nDeviceAllow=\nDeviceAllow=/dev/net/tun rw\n")
    assert diagnosis.combined.apply(directives)[0] == directives[0]  # PrivateDevices=yes stays


def test_a_file_hidden_by_private_tmp_is_bound_in_read_only() -> None:
    directives = hardening(PrivateTmp=True, ProtectSystem="strict")
    diagnosis = run(World(reads=["/tmp/shared.conf"]), directives, "cat: /tmp/shared.conf: No such file or directory")
    assert diagnosis.verified and diagnosis.combined is not None
    assert diagnosis.combined.description == ("bind /tmp/shared.conf into the sandbox with "
                                              "BindReadOnlyPaths=-/tmp/shared.conf")
    assert diagnosis.findings[0].relaxation.needs == "read access to /tmp/shared.conf"  # type: ignore[union-attr]
    assert diagnosis.combined.spec_change(directives) == "BindReadOnlyPaths: -/tmp/shared.conf"


def test_a_file_under_protect_home_gets_an_empty_home_and_a_bind_not_a_weaker_value() -> None:
    directives = hardening(ProtectHome=True, PrivateTmp=True)
    diagnosis = run(World(reads=["/root/.netrc"]), directives, "cat: /root/.netrc: No such file or directory")
    assert diagnosis.verified and diagnosis.combined is not None
    assert diagnosis.combined.dropin(directives) == (
        "[Service]\nProtectHome=tmpfs\nBindReadOnlyPaths=\nBindReadOnlyPaths=-/root/.netrc\n")
    assert diagnosis.findings[0].relaxation.needs == "read access to /root/.netrc"  # type: ignore[union-attr]
    # Without the bind, ProtectHome=read-only (the next weaker value) would have been the answer: a broader one.
    assert World(reads=["/root/.netrc"]).trial(hardening(ProtectHome="read-only", PrivateTmp=True)).passed


def test_a_daemon_logging_to_a_file_in_etc_gets_that_directory_not_a_weaker_protect_system() -> None:
    directives = hardening(ProtectSystem="strict", PrivateTmp=True)
    evidence = "appd: cannot open log file /etc/app/app.log: Read-only file system"
    diagnosis = run(World(writes=["/etc/app/app.log"]), directives, evidence)
    assert diagnosis.verified and diagnosis.combined is not None
    assert diagnosis.combined.description == "let systemd create and grant /etc/app with ConfigurationDirectory=app"
    assert diagnosis.findings[0].relaxation.needs == "write access to /etc/app"  # type: ignore[union-attr]
    assert diagnosis.combined.apply(directives)[0].unit_lines() == ["ProtectSystem=strict"]


def test_a_daemon_logging_to_a_file_in_var_log_gets_var_log_granted() -> None:
    directives = hardening(ProtectSystem="strict")
    evidence = "appd: open /var/log/app.log: Read-only file system"
    diagnosis = run(World(writes=["/var/log/app.log"]), directives, evidence)
    assert diagnosis.verified and diagnosis.combined is not None
    # LogsDirectory=app.log would be a directory of that name: tried, and it fails.
    assert diagnosis.combined.description == "grant /var/log with ReadWritePaths=-/var/log"


def test_32_bit_calls_get_the_architecture_added_not_the_directive_removed() -> None:
    directives = hardening(SystemCallArchitectures="native", PrivateTmp=True)
    diagnosis = run(World(x86=True), directives, "Bad system call")
    assert diagnosis.verified and diagnosis.combined is not None
    assert diagnosis.combined.dropin(directives) == ("[Service]\nSystemCallArchitectures=\n"
                                                     "SystemCallArchitectures=native x86\n")
    assert diagnosis.findings[0].relaxation.needs == "x86 system calls (32-bit)"  # type: ignore[union-attr]


def test_when_no_grant_passes_the_weaker_value_still_says_what_was_denied() -> None:
    # An oracle that takes only ProtectSystem=yes (no path grant works): the grants are tried first, in order.
    tried: list[str] = []

    def trial(directives: tuple[Directive, ...]) -> TrialResult:
        tried.append(" ".join(line for d in directives for line in d.unit_lines()))
        return TrialResult(directives[0].value in ("yes", "no"))

    directives = hardening(ProtectSystem="strict")
    context = Context(Oracle(trial), directives, "mkdir: cannot create directory '/etc/new': Read-only file system")
    relaxation = refine(directives[0], context)
    assert relaxation is not None
    assert relaxation.description == "weaken ProtectSystem=strict to ProtectSystem=yes"
    assert relaxation.needs == "access to /etc/new (denied in the failure's output)"
    assert tried == ["ProtectSystem=strict ConfigurationDirectory=new", "ProtectSystem=strict ReadWritePaths=-/etc/new",
                     "ProtectSystem=full", "ProtectSystem=yes"]  # a top-level tree (/etc) is never granted whole


def test_a_file_named_as_denied_is_never_made_a_service_directory() -> None:
    # "LogsDirectory=app.log" would be a directory of that name; the file itself (present) is the grant.
    directives = hardening(ProtectSystem="strict")
    evidence = "appd: open /var/log/app.log: Read-only file system"
    diagnosis = run(World(writes=["/var/log/app.log"], present=["/var/log/app.log"]), directives, evidence)
    assert diagnosis.combined is not None and diagnosis.verified
    assert diagnosis.combined.description == "grant /var/log/app.log with ReadWritePaths=-/var/log/app.log"
    assert not any("LogsDirectory" in run for run in diagnosis_runs(directives, evidence))


def diagnosis_runs(directives: tuple[Directive, ...], evidence: str) -> list[str]:
    world = World(writes=["/var/log/app.log"], present=["/var/log/app.log"])
    run(world, directives, evidence)
    return [" ".join(trial) for trial in world.runs]


def test_a_silent_failure_is_observed_once_and_the_traced_denial_gives_the_grant() -> None:
    calls: list[int] = []

    def observe() -> str:
        calls.append(1)
        return "strace: openat /srv/data/out.json: EROFS (Read-only file system)"

    directives = hardening(ProtectSystem="strict", PrivateTmp=True)
    diagnosis = run(World(writes=["/srv/data/out.json"], silent=True), directives, "exit status 1", observe=observe)
    assert diagnosis.verified and diagnosis.combined is not None
    assert diagnosis.combined.description == "grant /srv/data with ReadWritePaths=-/srv/data"
    assert calls == [1]
    # With a denied path in the output already, no traced run is made.
    run(World(writes=["/srv/data/out.json"]), directives, "open /srv/data/out.json: Read-only file system",
        observe=observe)
    assert calls == [1]


def test_a_printed_drop_in_that_fails_as_a_file_is_said_so() -> None:
    from pytest_systemd_harden.search.diagnosis import Directive, TrialResult, diagnose

    hardening = (Directive("MemoryDenyWriteExecute", ("yes",), 3),)

    def trial(candidate: tuple[Directive, ...]) -> TrialResult:
        return TrialResult(all(d.value != "yes" for d in candidate))

    printed: list[str] = []

    def refuses(text: str) -> TrialResult:
        printed.append(text)
        return TrialResult(False, "still EPERM")

    diagnosis = diagnose(hardening, trial, spec_name="harden.yaml", check_dropin=refuses)
    assert diagnosis.verified and diagnosis.dropin_verified is False
    assert printed == [diagnosis.as_dict()["dropin"]]
    assert "does not (still EPERM)" in diagnosis.render()
    assert diagnose(hardening, trial, check_dropin=lambda text: TrialResult(True)).as_dict()["dropin_verified"] is True
    assert diagnose(hardening, trial).as_dict()["dropin_verified"] is None


# --- a culprit among the unit's own directives --------------------------------------------------------------------

UNIT_TEXT = """[Service]
ExecStart=/usr/bin/memcached
PrivateTmp=true
ProtectSystem=full
CapabilityBoundingSet=CAP_SETGID CAP_SETUID
RestrictAddressFamilies=AF_INET AF_UNIX
"""


def _unit_and_spec() -> tuple[tuple[Directive, ...], tuple[Directive, ...]]:
    from pytest_systemd_harden.spec.unit_file import own_directives_from_files

    own = own_directives_from_files("mc.service", [("/lib/systemd/system/mc.service", UNIT_TEXT)])
    spec = (Directive.parse("ProtectHome", "yes", 3), Directive.parse("RestrictAddressFamilies", ["AF_INET6"], 4))
    return own, spec


def test_a_trial_resets_only_what_it_changes_of_the_units_own_directives() -> None:
    from pytest_systemd_harden.search.diagnosis import replacing_dropin
    from pytest_systemd_harden.spec.unit_file import effective_hardening

    own, spec = _unit_and_spec()
    effective = effective_hardening(own, spec)
    # Unchanged: the unit's lines stay the unit's, the spec's are written, the list both set is reset and combined.
    assert replacing_dropin(own, effective) == (
        "[Service]\nRestrictAddressFamilies=\nRestrictAddressFamilies=AF_INET AF_UNIX\n"
        "RestrictAddressFamilies=AF_INET6\nProtectHome=yes\n")
    relaxed = tuple(d for d in effective if d.name not in ("CapabilityBoundingSet", "ProtectSystem"))
    text = replacing_dropin(own, relaxed)
    assert "ProtectSystem=no\n" in text  # a single value: systemd's default, written out
    assert "CapabilityBoundingSet=~\n" in text  # an empty one would mean no capabilities at all


def test_an_own_culprit_is_named_with_the_unit_file_and_its_fix_is_a_drop_in() -> None:
    own, spec = _unit_and_spec()
    from pytest_systemd_harden.spec.unit_file import effective_hardening

    effective = effective_hardening(own, spec)

    def trial(tried: tuple[Directive, ...]) -> TrialResult:  # the service needs CAP_SETUID... and CAP_CHOWN
        caps = next((d for d in tried if d.name == "CapabilityBoundingSet"), None)
        return TrialResult(caps is None or "CAP_CHOWN" in " ".join(caps.assignments))

    diagnosis = diagnose(effective, trial, spec_name="harden.yaml")
    assert [f.culprit.name for f in diagnosis.findings] == ["CapabilityBoundingSet"]
    text = diagnosis.render()
    assert "culprit: CapabilityBoundingSet=CAP_SETGID CAP_SETUID (mc.service:5)" in text, text
    assert diagnosis.verified
    dropin = diagnosis.combined.dropin(effective) if diagnosis.combined else ""
    assert dropin.startswith("[Service]\nCapabilityBoundingSet=\nCapabilityBoundingSet="), dropin
    assert "cannot be undone from the spec" in text  # a spec line would add to the unit's list, not replace it
    assert diagnosis.as_dict()["culprits"][0]["where"] == "mc.service:5"  # type: ignore[index]


# --- the first search's fix fails on a fresh machine (diagnose_failure's choice) ---------------------------------

PROTECT = Directive("ProtectSystem", ("strict",), 4)
FILTER = Directive("SystemCallFilter", ("~@privileged",), 5)
WEAKER = Relaxation("weaken ProtectSystem=strict to ProtectSystem=full",
                    replace=(("ProtectSystem", Directive("ProtectSystem", ("full",))),))


def found(culprit: Directive, relaxation: Relaxation | None, *, verified: bool, dropin: bool | None,
          runs: int = 10, verdict: str = "found", note: str = "") -> Diagnosis:
    return Diagnosis(verdict, findings=[Finding(culprit, relaxation)], combined=relaxation, verified=verified,
                     dropin_verified=dropin, dropin_failure="nginx.service failed to start" if dropin is False else "",
                     runs=runs, hardening=(PROTECT, FILTER), spec_name="harden.yaml", note=note)


def searches(*results: Diagnosis) -> Callable[[bool, int], Diagnosis]:
    def search(fresh: bool, max_runs: int) -> Diagnosis:
        assert fresh == (len(asked) > 0)
        asked.append(fresh)
        return results[len(asked) - 1]
    asked: list[bool] = []
    return search


def test_a_fix_verified_again_on_fresh_machines_replaces_the_first() -> None:
    first = found(PROTECT, WEAKER, verified=True, dropin=False)
    again = found(FILTER, None, verified=True, dropin=True, runs=20)
    result = _diagnosed(searches(first, again), lambda: TrialResult(True), 60)
    assert result is again and result.runs == 31
    assert result.note.startswith("The first search's fix passed on the machine it ran on")


def test_a_first_fix_that_fails_fresh_is_never_printed_when_nothing_fresh_is_verified() -> None:
    first = found(PROTECT, WEAKER, verified=True, dropin=False)
    again = Diagnosis("budget", note="Stopped early: the budget of 30 reruns is spent.", runs=30)
    result = _diagnosed(searches(first, again), lambda: TrialResult(True), 60)
    rendered = result.render()
    assert result.verdict == "budget" and not result.findings and not result.verified
    assert "named ProtectSystem=strict (weaken ProtectSystem=strict to ProtectSystem=full), but its fix" in rendered
    assert "  verified:" not in rendered and "ProtectSystem=full\n" not in rendered and result.as_dict()["dropin"] is None


def test_culprits_found_fresh_are_listed_even_unrefined() -> None:
    first = found(PROTECT, WEAKER, verified=True, dropin=False)
    again = found(FILTER, None, verified=False, dropin=None, note="Stopped early: the budget of 30 reruns is spent.")
    result = _diagnosed(searches(first, again), lambda: TrialResult(True), 60)
    assert result is again and [f.culprit.name for f in result.findings] == ["SystemCallFilter"]
    assert "no relaxation was verified" in result.render()


def test_a_fresh_fix_whose_drop_in_fails_too_is_not_printed_as_verified() -> None:
    first = found(PROTECT, WEAKER, verified=True, dropin=False)
    again = found(FILTER, Relaxation("re-allow @chown"), verified=True, dropin=False)
    result = _diagnosed(searches(first, again), lambda: TrialResult(True), 60)
    assert not result.verified and result.combined is None and "  verified:" not in result.render()
    assert "does not pass there either (nginx.service failed to start)" in result.note


def test_a_check_that_needs_the_tests_own_files_keeps_the_first_fix_as_a_spec_change() -> None:
    first = found(PROTECT, WEAKER, verified=True, dropin=False)
    result = _diagnosed(searches(first), lambda: TrialResult(False, "no /root/x"), 60)
    assert result is first and result.verified
    assert "fails without any hardening too (no /root/x)" in result.note


def test_a_first_fix_failing_only_after_a_restart_keeps_its_culprits_but_is_not_printed() -> None:
    first = found(PROTECT, WEAKER, verified=True, dropin=False)
    first.dropin_failed_after_restart = True

    def search(fresh: bool, max_runs: int) -> Diagnosis:
        assert not fresh, "a search on fresh machines sees first starts only"
        return first

    result = _diagnosed(search, lambda: TrialResult(True), 60)
    assert [f.culprit.name for f in result.findings] == ["ProtectSystem"] and not result.verified
    assert "the service fails when restarted there" in result.note and "  verified" not in result.render()


def test_a_fix_whose_drop_in_could_not_be_checked_is_verified_on_this_machine_only() -> None:
    diagnosis = found(PROTECT, WEAKER, verified=True, dropin=None)
    diagnosis.dropin_unchecked = "the time budget for diagnosis is spent"
    rendered = diagnosis.render()
    assert "verified on the machine the diagnosis ran on only" in rendered
    assert "could not be checked on a fresh machine: the time budget for diagnosis is spent" in rendered
