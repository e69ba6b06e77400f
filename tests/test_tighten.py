"""Tighten, against a simulated service: what is added, narrowed, rejected, and what is never touched."""

from __future__ import annotations

from simulated_service import GROUPS, World, hardening

from pytest_systemd_harden.tighten import CATALOGUE, Tightening, tighten


def run(world: World, **kwargs: object) -> Tightening:
    directives = kwargs.pop("directives", ())
    return tighten(directives, world.trial, syscall_groups=lambda: GROUPS, **kwargs)  # type: ignore[arg-type]


def outcome(result: Tightening, name: str) -> tuple[str, str]:
    found = next(o for o in result.outcomes if o.step.name.startswith(name))
    return found.kept, found.detail


def lines(result: Tightening) -> list[str]:
    return [line for d in result.after for line in d.unit_lines()]


NEEDY = World(families=["AF_INET"], capabilities=["CAP_NET_BIND_SERVICE"], writes=["/var/lib/app/data"],
              syscalls=["mlock"], network=True)


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
