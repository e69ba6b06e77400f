"""Tighten, against a simulated service: what is added, narrowed, rejected, and what is never touched."""

from __future__ import annotations

from collections.abc import Callable

from simulated_service import GROUPS, World, hardening, syscall_allowed

from pytest_systemd_harden.kernel.flags import NAMESPACE_FLAGS
from pytest_systemd_harden.search.diagnosis import BudgetExceeded, TrialResult, hardening_key
from pytest_systemd_harden.search.observe import filter_allows, parse_strace
from pytest_systemd_harden.search.scenarios import _tightened
from pytest_systemd_harden.search.tighten import (
    CATALOGUE,
    Step,
    Tightening,
    _applies,
    fall_back,
    profile_only,
    revert,
    tighten,
)
from pytest_systemd_harden.spec.directives import Directive


def run(world: World, **kwargs: object) -> Tightening:
    directives = kwargs.pop("directives", ())
    kwargs.setdefault("syscall_groups", lambda: NETWORK_GROUPS)
    # The search itself, over every step of the catalogue: offline=True lets the network steps in (the policy that
    # keeps them out by default has tests of its own, below).
    kwargs.setdefault("offline", True)
    return tighten(directives, world.trial, **kwargs)  # type: ignore[arg-type]


def outcome(result: Tightening, name: str) -> tuple[str, str]:
    found = next(o for o in result.outcomes if o.step.name.startswith(name))
    return found.kept, found.detail


def lines(result: Tightening) -> list[str]:
    return [line for d in result.after for line in d.unit_lines()]


# The simulated groups, with the socket calls a real @system-service has (the traces below make them).
NETWORK_GROUPS = {**GROUPS, "@system-service": [*GROUPS["@system-service"], "bind", "connect"]}
# Its data file exists from an earlier run: ReadWritePaths=-/var/lib/app/data is a grant, not skipped as missing.
NEEDY = World(families=["AF_INET"], capabilities=["CAP_NET_BIND_SERVICE"], writes=["/var/lib/app/data"],
              present=["/var/lib/app/data"], syscalls=["mlock"], network=True)


def test_every_step_is_tried_and_failed_ones_are_narrowed_to_what_the_service_needs() -> None:
    result = run(NEEDY)
    assert outcome(result, "DynamicUser=yes") == (
        "narrowed", "let systemd create and grant /var/lib/app with StateDirectory=app")
    assert outcome(result, "CapabilityBoundingSet=") == (
        "narrowed", "also allow CAP_NET_BIND_SERVICE in CapabilityBoundingSet=")
    assert outcome(result, "RestrictAddressFamilies=AF_UNIX") == (
        "narrowed", "also allow AF_INET in RestrictAddressFamilies=")
    assert outcome(result, "PrivateNetwork=yes") == ("rejected", "ECONNREFUSED")
    assert outcome(result, "MemoryDenyWriteExecute=yes") == ("added", "")
    assert {"DynamicUser=yes", "StateDirectory=app", "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
            "RestrictAddressFamilies=AF_UNIX AF_INET", "SystemCallFilter=@system-service",
            "SystemCallFilter=~@privileged @resources"} <= set(lines(result))
    assert "PrivateNetwork=yes" not in lines(result)
    assert len(result.outcomes) == len(CATALOGUE)
    assert NEEDY.trial(result.after).passed  # the answer itself passes


def test_the_users_directives_stay_and_keep_never_are_respected() -> None:
    mine = hardening(ProtectSystem="full", PrivateTmp=False, ReadWritePaths="/srv")
    result = run(World(), directives=mine, keep=["PrivateTmp"], never=["DynamicUser", "PrivateNetwork"])
    assert outcome(result, "DynamicUser=yes")[0] == "excluded"
    assert outcome(result, "PrivateNetwork=yes")[0] == "excluded"
    assert outcome(result, "PrivateTmp=yes")[0] == "excluded"  # kept as the user wrote it: PrivateTmp=no
    assert outcome(result, "ProtectSystem=strict")[0] == "added"  # a weaker value is strengthened
    assert "PrivateTmp=no" in lines(result) and "ReadWritePaths=/srv" in lines(result)
    assert "ProtectSystem=full" not in lines(result) and "ProtectSystem=strict" in lines(result)


def test_a_step_the_spec_already_has_is_skipped_not_rerun() -> None:
    world = World()
    result = run(world, directives=hardening(ProtectSystem="strict", NoNewPrivileges=True))
    assert outcome(result, "ProtectSystem=strict")[0] == "skipped"
    assert outcome(result, "NoNewPrivileges=yes")[0] == "skipped"
    assert result.runs == len(world.runs) == len(set(world.runs))


def test_a_spec_that_does_not_pass_as_written_is_not_tightened() -> None:
    result = run(World(broken_anyway=True), directives=hardening(PrivateTmp=True))
    assert result.after == result.before and result.runs == 1
    assert result.note.startswith("the spec as written does not pass")


# --- with observations -------------------------------------------------------------------------------------------

# What strace shows of NEEDY: it serves on port 80, locks memory, writes its state, talks to another host.
NEEDY_TRACE = """\
10    socket(AF_INET, SOCK_STREAM|SOCK_CLOEXEC, IPPROTO_IP) = 3<socket:[1]>
10    bind(3<socket:[1]>, {sa_family=AF_INET, sin_port=htons(80), sin_addr=inet_addr("0.0.0.0")}, 16) = 0
10    mlock(0x7f0000000000, 4096) = 0
10    openat(AT_FDCWD</>, "/var/lib/app/data", O_WRONLY|O_CREAT|O_TRUNC, 0600) = 4</var/lib/app/data>
10    socket(AF_INET, SOCK_STREAM|SOCK_CLOEXEC, IPPROTO_IP) = 5<socket:[2]>
10    connect(5<socket:[2]>, {sa_family=AF_INET, sin_port=htons(443), sin_addr=inet_addr("192.0.2.1")}, 16) = 0
"""


def test_observations_shortcut_the_search_to_the_same_result() -> None:
    blind = run(NEEDY)
    world = World(**{k: getattr(NEEDY, k) for k in ("families", "capabilities", "writes", "syscalls", "network")})
    observed = run(world, observation=parse_strace(NEEDY_TRACE))
    assert hardening_key(observed.after) == hardening_key(blind.after)
    assert observed.runs < blind.runs, (observed.runs, blind.runs)
    assert observed.first_time() > blind.first_time()
    assert outcome(observed, "RestrictAddressFamilies=AF_UNIX") == ("narrowed", "as observed")
    assert outcome(observed, "CapabilityBoundingSet=") == ("narrowed", "as observed")
    # forecast to conflict (it listens, and reaches 192.0.2.1), still tried, last: the scenarios decide
    assert [o.step.name for o in observed.outcomes][-1] == "PrivateNetwork=yes"
    assert outcome(observed, "PrivateNetwork=yes")[0] == "rejected"
    right, made = observed.forecasts_right()
    assert made == len(observed.tried) and right >= made - 1
    text = observed.render()
    assert "observed: also allows AF_INET" in text and "passed at their first run (with observations" in text


def test_a_misleading_observation_costs_runs_not_correctness() -> None:
    # A run that never exercised the state write nor the memory lock: their steps fail and are narrowed as blind.
    partial = parse_strace("\n".join(NEEDY_TRACE.splitlines()[:2]))
    result = run(NEEDY, observation=partial)
    assert NEEDY.trial(result.after).passed
    assert hardening_key(result.after) == hardening_key(run(NEEDY).after)
    # ...while the same observation applied without checking breaks the service
    suggested = profile_only((), partial, syscall_groups=NETWORK_GROUPS)
    assert not NEEDY.trial(suggested).passed


def test_an_observed_item_the_service_does_without_is_dropped_after_a_check() -> None:
    # The trace shows an AF_INET6 socket opened (a probe), but the service never needs it.
    trace = NEEDY_TRACE + "10    socket(AF_INET6, SOCK_DGRAM|SOCK_CLOEXEC, IPPROTO_IP) = 6<socket:[3]>\n"
    result = run(NEEDY, observation=parse_strace(trace))
    assert "RestrictAddressFamilies=AF_UNIX AF_INET" in lines(result)
    assert outcome(result, "RestrictAddressFamilies=AF_UNIX") == (
        "narrowed", "as observed; not needed after all: AF_INET6")
    assert result.confirmations >= 1


def test_steps_forecast_to_fit_are_tried_together_and_a_failing_group_is_split() -> None:
    partial = parse_strace("\n".join(NEEDY_TRACE.splitlines()[:2]))  # misses the state write and the peer
    together = run(NEEDY, observation=partial)
    alone = run(NEEDY, observation=partial, together=False)
    assert hardening_key(together.after) == hardening_key(alone.after) == hardening_key(run(NEEDY).after)
    assert together.runs < alone.runs, (together.runs, alone.runs)
    # the split found the step the observation got wrong (no write seen), and refined it as a lone step would be
    assert outcome(together, "ProtectSystem=strict") == (
        "narrowed", "let systemd create and grant /var/lib/app with StateDirectory=app")


def test_a_known_baseline_saves_its_run() -> None:
    observation = parse_strace(NEEDY_TRACE)
    measured = run(NEEDY, observation=observation)
    known = run(NEEDY, observation=observation, baseline=TrialResult(True, "passed while traced"))
    assert known.runs == measured.runs - 1 and known.after == measured.after


def test_a_grant_the_user_excluded_is_neither_forecast_nor_refined() -> None:
    for observation in (parse_strace(NEEDY_TRACE), None):
        result = run(NEEDY, observation=observation, never=["StateDirectory"])
        assert not any(line.startswith("StateDirectory=") for line in lines(result))
        assert NEEDY.trial(result.after).passed
    # (the last, blind:) the refinement passed over the excluded grant, to the next one it knows
    assert outcome(result, "DynamicUser=yes") == (
        "narrowed", "grant /var/lib/app/data with ReadWritePaths=-/var/lib/app/data")


# --- the user's own directives are never loosened ----------------------------------------------------------------

def filter_lines(result: Tightening) -> list[str]:
    return [line for line in lines(result) if line.startswith("SystemCallFilter=")]


def test_an_allow_list_goes_before_the_users_deny_list_which_keeps_denying() -> None:
    # The first SystemCallFilter= line decides allow or deny: after ~@memlock, a line @system-service would take
    # @system-service (and mlock with it) out of the deny list.
    mine = hardening(SystemCallFilter="~@memlock")
    for observation in (None, parse_strace(NEEDY_TRACE)):
        result = run(World(syscalls=["read"]), directives=mine, observation=observation)
        assert outcome(result, "SystemCallFilter=@system-service")[0] == "added"
        assert filter_lines(result) == [
            "SystemCallFilter=@system-service", "SystemCallFilter=~@memlock @privileged @resources"]
        assert not syscall_allowed(result.after, "mlock") and syscall_allowed(result.after, "read")
        # a drop-in comes after the unit's own SystemCallFilter=~@memlock: it resets that first
        assert "[Service]\nSystemCallFilter=\nSystemCallFilter=@system-service\nSystemCallFilter=~@memlock" \
            in result.dropin()


def test_an_observed_syscall_is_confirmed_in_the_allow_list_put_before_the_users_deny_list() -> None:
    # With SystemCallErrorNumber= the service may cope with a denied acct(): the allow list holds it until tried away.
    mine = hardening(SystemCallFilter="~@memlock", SystemCallErrorNumber="EPERM")
    trace = '10    acct(NULL) = -1 EPERM (Operation not permitted)\n10    read(3</etc/hosts>, "", 1) = 0\n'
    result = run(World(syscalls=["read"]), directives=mine, observation=parse_strace(trace))
    assert outcome(result, "SystemCallFilter=@system-service") == (
        "narrowed", "as observed; not needed after all: acct")
    assert filter_lines(result) == [
        "SystemCallFilter=@system-service", "SystemCallFilter=~@memlock @privileged @resources"]


def test_a_spec_with_an_allow_list_gets_no_second_one_which_would_widen_it() -> None:
    result = run(World(syscalls=["read"]), directives=hardening(SystemCallFilter="read write openat mmap"))
    assert outcome(result, "SystemCallFilter=@system-service")[0] == "skipped"
    assert filter_lines(result) == [
        "SystemCallFilter=read write openat mmap", "SystemCallFilter=~@privileged @resources"]
    assert not syscall_allowed(result.after, "mlock")


def test_an_allow_list_is_not_refined_into_re_allowing_what_the_user_denies() -> None:
    # acct is in @privileged only, which holds @chown too: "also allow @privileged" would undo the user's ~@chown.
    result = run(World(syscalls=["acct"]), directives=hardening(SystemCallFilter="~@chown"))
    assert outcome(result, "SystemCallFilter=@system-service") == ("rejected", "acct: SIGSYS")
    assert not syscall_allowed(result.after, "chown") and syscall_allowed(result.after, "acct")


def test_the_simulated_filter_reads_mixed_lines_in_order_as_systemd_does() -> None:
    cases = [
        (["@system-service", "~@memlock"], "mlock", False),  # allow list first: a deny line takes names out
        (["@system-service", "~@memlock"], "read", True),
        (["@system-service", "~@memlock", "mlock"], "mlock", True),  # and an allow line puts them back
        (["~@memlock", "@system-service"], "mlock", True),  # deny list first: an allow line takes names out of it
        (["~@memlock", "mlock"], "mlock", True),
        (["~@memlock", "mlock"], "munlock", False),
        (["~@memlock", "", "@chown"], "read", False),  # the empty line resets: then an allow list of @chown
        (["@chown", "", "~@memlock"], "read", True),  # or a deny list of @memlock
    ]
    for assignments, syscall, allowed in cases:
        directives = (Directive("SystemCallFilter", tuple(assignments)),)
        assert syscall_allowed(directives, syscall) is allowed, (assignments, syscall)
        assert filter_allows(assignments, syscall, GROUPS) is allowed, (assignments, syscall)


# --- a narrowing that tightens nothing is a rejection ------------------------------------------------------------

def test_a_step_that_passes_only_at_the_directives_default_is_rejected_not_narrowed() -> None:
    result = run(World(reads_proc=True, shares_files=True))
    assert outcome(result, "ProcSubset=pid") == ("rejected", "/proc/meminfo: ENOENT")  # ProcSubset=all is the default
    assert outcome(result, "UMask=0077") == ("rejected", "EACCES: others cannot read its files")  # 0022 too
    assert not any(line.startswith(("ProcSubset=", "UMask=")) for line in lines(result))
    # a weaker value that still tightens is a narrowing
    assert outcome(run(World(group_reads=True)), "UMask=0077") == ("narrowed", "weaken UMask=0077 to UMask=0027")


def test_an_allow_list_narrowed_to_everything_there_is_is_rejected_not_narrowed() -> None:
    every = run(World(namespaces=list(NAMESPACE_FLAGS)))
    assert outcome(every, "RestrictNamespaces=yes") == ("rejected", "unshare: EPERM")  # as if not set
    assert not any(line.startswith("RestrictNamespaces=") for line in lines(every))
    assert outcome(run(World(namespaces=["net"])), "RestrictNamespaces=yes") == (
        "narrowed", "also allow net in RestrictNamespaces=")


def test_a_read_only_path_that_would_void_a_grant_of_the_same_path_is_skipped() -> None:
    run_only = Step.of("/run read-only too", ReadOnlyPaths="/run")
    assert _applies(run_only, hardening(ReadWritePaths="-/run"), (), ()) == "skipped"
    assert _applies(run_only, hardening(ReadWritePaths="/run/app"), (), ()) == ""  # a deeper grant stays writable


def test_a_deny_list_whose_every_call_is_needed_is_rejected_not_narrowed() -> None:
    # The refinement's answer is to stop denying the group: the step's directive is gone, which is no narrowing.
    result = run(World(syscalls=["mlock", "mlock2", "mlockall", "munlock", "munlockall"]),
                 catalogue=[Step.of("no memory locking", SystemCallFilter="~@memlock")])
    assert outcome(result, "SystemCallFilter=~@memlock")[0] == "rejected"
    assert not any(line.startswith("SystemCallFilter=") for line in lines(result))


def test_an_observation_that_narrows_a_step_to_nothing_is_not_taken_as_a_narrowing() -> None:
    # Every namespace type observed: the forecast's form would allow them all, as if RestrictNamespaces= were unset.
    world = World(namespaces=list(NAMESPACE_FLAGS))
    trace = "10    unshare(CLONE_NEWNS|CLONE_NEWUTS|CLONE_NEWIPC|CLONE_NEWUSER|CLONE_NEWPID|CLONE_NEWNET|" \
            "CLONE_NEWCGROUP) = 0\n"
    result = run(world, observation=parse_strace(trace))
    assert outcome(result, "RestrictNamespaces=yes") == ("rejected", "unshare: EPERM")
    assert not any(line.startswith("RestrictNamespaces=") for line in lines(result))


# --- revert: as if the step had never been kept ------------------------------------------------------------------

def reverted(result: Tightening, *undoing: str) -> Tightening:
    assert revert(result, undoing, "undoes something (enforcement check)")
    return result


def test_revert_takes_back_the_grant_a_step_added_to_the_users_own_directive() -> None:
    world = World(writes=["/var/lib/app/data"])
    mine = hardening(StateDirectory="signer")
    result = run(world, directives=mine, never=["ProtectSystem"])
    assert "StateDirectory=app" in lines(result)  # DynamicUser= brought it
    reverted(result, "DynamicUser")
    never_kept = run(world, directives=mine, never=["ProtectSystem", "DynamicUser"])
    assert hardening_key(result.after) == hardening_key(never_kept.after)
    assert [d for d in result.after if d.name == "StateDirectory"] == list(mine)
    assert outcome(result, "DynamicUser=yes") == ("rejected", "undoes something (enforcement check)")


def test_a_step_that_passed_only_with_a_reverted_one_goes_with_it() -> None:
    # ProtectSystem=strict passed without a grant only because DynamicUser= had brought StateDirectory=app.
    world = World(writes=["/var/lib/app/data"])
    result = reverted(run(world), "DynamicUser")
    check = world.trial(result.after)
    assert not check.passed  # what revert alone leaves: strict, and nowhere to write
    fall_back(result, check.summary)
    assert world.trial(result.after).passed and result.after == ()
    assert outcome(result, "ProtectSystem=strict") == (
        "rejected", f"passed only with DynamicUser=yes, which was reverted; without it: {check.summary}")
    assert outcome(result, "DynamicUser=yes") == ("rejected", "undoes something (enforcement check)")


# Steps that write into the same directives: what revert takes back of the one must leave the other's.
A = Step.of("a", ProtectClock=True, IPAddressAllow="192.0.2.1", SystemCallFilter="~@privileged")
B = Step.of("b", ProtectHostname=True, IPAddressAllow="192.0.2.2", SystemCallFilter="~@resources")


def test_revert_leaves_what_another_kept_step_wrote_into_the_same_directive() -> None:
    result = reverted(run(World(), catalogue=[A, B]), "ProtectClock")
    assert lines(result) == ["IPAddressAllow=192.0.2.2", "SystemCallFilter=~@resources", "ProtectHostname=yes"]
    assert hardening_key(result.after) == hardening_key(run(World(), catalogue=[B]).after)
    result = reverted(run(World(), catalogue=[A, B]), "ProtectHostname")
    assert hardening_key(result.after) == hardening_key(run(World(), catalogue=[A]).after)


def test_revert_puts_back_the_users_value_a_step_replaced() -> None:
    mine = hardening(ProtectSystem="full")
    strict = Step.of("strict, with a private /tmp", ProtectSystem="strict", PrivateTmp=True)
    result = reverted(run(World(), directives=mine, catalogue=[strict, B]), "PrivateTmp")
    assert lines(result) == ["ProtectSystem=full", "ProtectHostname=yes", "IPAddressAllow=192.0.2.2",
                             "SystemCallFilter=~@resources"]


def test_revert_brings_back_no_item_a_run_showed_unneeded() -> None:
    # AF_INET6 and 192.0.2.1 were observed, tried away and dropped: reverting a step brings neither back.
    trace = NEEDY_TRACE + "10    socket(AF_INET6, SOCK_DGRAM|SOCK_CLOEXEC, IPPROTO_IP) = 6<socket:[3]>\n"
    result = reverted(run(NEEDY, observation=parse_strace(trace)), "StateDirectory")  # ProtectSystem=strict's grant
    assert not any(line.startswith(("ProtectSystem=", "StateDirectory=")) for line in lines(result))
    assert {"RestrictAddressFamilies=AF_UNIX AF_INET", "IPAddressAllow=localhost"} <= set(lines(result))
    result = reverted(run(NEEDY, observation=parse_strace(trace)), "IPAddressDeny")
    assert not any(line.startswith("IPAddress") for line in lines(result))


# --- what tighten never proposes -------------------------------------------------------------------------------------

def test_network_restrictions_need_the_spec_to_say_the_service_needs_no_network() -> None:
    # An offline machine never shows a resolver's upstream traffic: IPAddressDeny=any would pass every scenario and
    # break the service in production.
    result = run(World(families=["AF_INET"]), offline=False)
    for name in ("IPAddressDeny=any", "PrivateNetwork=yes"):
        kept, detail = outcome(result, name)
        assert kept == "excluded" and "tighten: {offline: true}" in detail, (name, kept, detail)
    assert not {d.name for d in result.after} & {"IPAddressDeny", "IPAddressAllow", "PrivateNetwork"}
    declared = run(World(families=["AF_INET"]), offline=True)
    assert "IPAddressDeny=any" in lines(declared)


def test_dynamic_user_is_never_stacked_on_a_user_of_the_service() -> None:
    result = run(World(), directives=hardening(User="app"))
    kept, detail = outcome(result, "DynamicUser=yes")
    assert kept == "excluded" and "User=" in detail
    assert "DynamicUser" not in {d.name for d in result.after}
    from_unit = run(World(), own_user=True)  # User= in the unit file rather than the spec
    assert outcome(from_unit, "DynamicUser=yes")[0] == "excluded"


def test_the_search_starts_from_the_unit_as_loaded() -> None:
    # A unit file's own hardening is in force under the drop-in: what it has is not added again, what it has weaker
    # is strengthened, its allow list gets no second one, and only the drop-in (the spec's hardening) changes.
    own = tuple(Directive(d.name, d.assignments, 7, "/etc/systemd/system/app.service")
                for d in hardening(PrivateTmp=True, ProtectSystem="full", User="app",
                                   SystemCallFilter="@system-service"))
    result = run(World(), own=own)
    for name in ("PrivateTmp=yes", "SystemCallFilter=@system-service"):
        assert outcome(result, name)[0] == "skipped", name
    assert outcome(result, "ProtectSystem=strict")[0] in ("added", "narrowed")
    assert outcome(result, "DynamicUser=yes")[0] == "excluded"  # the unit's User= would be replaced
    assert {d.source for d in result.after} == {""}  # the unit's own lines are never written into the drop-in
    assert not any(line.startswith(("PrivateTmp=", "SystemCallFilter=@system-service")) for line in lines(result))
    alone = run(World())  # the same search with nothing of the unit's: the steps are added
    assert outcome(alone, "PrivateTmp=yes")[0] == "added"


def test_a_deny_list_never_repeats_a_name() -> None:
    mine = hardening(SystemCallFilter="~@privileged @resources")
    result = run(World(), directives=mine)
    assert outcome(result, "SystemCallFilter=~@privileged")[0] == "skipped"
    (syscall_filter,) = [d for d in result.after if d.name == "SystemCallFilter"]
    words = [w for a in syscall_filter.assignments for w in a.lstrip("~").split()]
    assert len(words) == len(set(words)), syscall_filter.assignments


def test_a_boolean_refined_to_off_is_rejected_not_written() -> None:
    # memcached (as root, dropping to its user) fails under DynamicUser=yes and PrivateUsers=yes: "=no" is no
    # narrowing, and a drop-in line that restricts nothing is noise.
    result = run(World(setuid=True))
    assert outcome(result, "NoNewPrivileges=yes")[0] == "rejected"
    assert "NoNewPrivileges=no" not in lines(result)


def test_a_template_s_drop_in_names_the_instance_as_a_specifier_in_its_grants() -> None:
    from pytest_systemd_harden.search.tighten import instance_as_specifier

    dropin = ("[Service]\nStateDirectory=notes-8080\nReadWritePaths=/srv/8080/data /srv/app18080\n"
              "LogsDirectory=8080\nSystemCallFilter=@system-service\nEnvironment=PORT=8080\n")
    assert instance_as_specifier(dropin, "8080") == (
        "[Service]\nStateDirectory=notes-%i\nReadWritePaths=/srv/%i/data /srv/app18080\n"
        "LogsDirectory=%i\nSystemCallFilter=@system-service\nEnvironment=PORT=8080\n")  # grants only, whole words


# --- where the result is checked: the service's machine, then fresh machines (tighten_service's choice) ----------

def searched(*results: Tightening) -> tuple[Callable[[bool, int], Tightening], list[bool]]:
    """A search returning ``results`` in turn, recording whether each was asked for on fresh machines."""
    asked: list[bool] = []

    def search(fresh: bool, max_runs: int) -> Tightening:
        asked.append(fresh)
        return results[len(asked) - 1]

    return search, asked


def tightening(verified: bool | None, runs: int = 10, failure: str = "") -> Tightening:
    return Tightening(before=(), after=(Directive("PrivateTmp", ("yes",)),), runs=runs, dropin_verified=verified,
                      dropin_failure=failure)


def never_called(*_: object) -> TrialResult:
    raise AssertionError("not to be called")


def test_a_result_whose_drop_in_passes_on_a_fresh_machine_is_searched_once() -> None:
    first = tightening(True)
    search, asked = searched(first)
    assert _tightened(search, never_called, never_called, 200) is first and asked == [False]


def test_a_result_failing_on_a_fresh_machine_is_searched_again_there() -> None:
    first, again = tightening(False, failure="start failed"), tightening(True, runs=20)
    search, asked = searched(first, again)
    result = _tightened(search, lambda: TrialResult(True), never_called, 200)
    assert result is again and asked == [False, True]
    assert result.runs == 20 + 10 + 1  # both searches and the control between them
    assert result.note.startswith("the first search's result passed on the machine it ran on")


def test_nothing_more_passing_on_fresh_machines_is_the_result_not_a_failure() -> None:
    # The fresh search kept no step: its result is the spec as written, which the control just passed there.
    first, again = tightening(False), Tightening(before=(), after=(), runs=5)
    search, _ = searched(first, again)
    result = _tightened(search, lambda: TrialResult(True), never_called, 200)
    assert result is again and result.dropin_verified is None


def test_a_result_failing_on_fresh_machines_twice_is_not_verified() -> None:
    first, again = tightening(False, failure="a"), tightening(False, failure="b")
    search, _ = searched(first, again)
    result = _tightened(search, lambda: TrialResult(True), never_called, 200)
    assert result is first and result.dropin_verified is False
    assert "where the result does not pass either (b)" in result.note


def test_scenarios_that_need_the_tests_own_files_check_the_drop_in_on_the_services_machine() -> None:
    first = tightening(False)
    search, asked = searched(first)
    checked: list[Tightening] = []

    def check_here(result: Tightening) -> None:
        checked.append(result)
        result.dropin_verified, result.dropin_on_fresh_machine = True, False

    result = _tightened(search, lambda: TrialResult(False, "no /root/x"), check_here, 200)
    assert result is first and checked == [first] and asked == [False]
    assert result.dropin_verified and "the spec as written fails too (no /root/x)" in result.note


def test_no_time_for_the_second_search_keeps_the_failing_result_marked() -> None:
    first = tightening(False)

    def search(fresh: bool, max_runs: int) -> Tightening:
        if fresh:
            raise BudgetExceeded("the time budget for tighten (900s) is spent")
        return first

    result = _tightened(search, lambda: TrialResult(True), never_called, 200)
    assert result is first and result.dropin_verified is False
    assert "could not be searched again on freshly booted machines: the time budget" in result.note


def test_a_drop_in_failing_only_after_a_restart_is_not_searched_again_on_fresh_machines() -> None:
    # A search on fresh machines sees first starts only: it could not find what a restart needs.
    first = tightening(False, failure="after a restart on that machine: exited")
    first.dropin_failed_after_restart = True
    search, asked = searched(first)
    result = _tightened(search, never_called, never_called, 200)
    assert result is first and asked == [False] and result.dropin_verified is False
    assert "fails when restarted on a freshly booted machine" in result.note


def test_a_drop_in_that_could_not_be_checked_says_so() -> None:
    result = tightening(None)
    result.dropin_unchecked = "the time budget for tighten (900s) is spent"
    assert "the drop-in could NOT be checked on a freshly booted machine: the time budget" in result.render()
