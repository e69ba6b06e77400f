"""Built-in profiles: names, merging with a spec, where their directives came from (in a real container:
tests/test_profiles_live.py)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pytest_systemd_harden.errors import SpecError
from pytest_systemd_harden.spec import profiles
from pytest_systemd_harden.spec.directives import Directive
from pytest_systemd_harden.spec.load import Spec, load_spec
from pytest_systemd_harden.spec.profiles import PROFILES, ProfileError, ProfileLine
from pytest_systemd_harden.unit.service import describe_hardening

NAMES = sorted(PROFILES)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "harden.yaml"
    path.write_text(textwrap.dedent(text))
    return path


# --- the profiles themselves ----------------------------------------------------------------------------------

def test_the_three_profiles_exist_and_are_versioned() -> None:
    assert NAMES == ["baseline-2026", "maximum-2026", "minimal-2026"]
    assert all(profiles.VERSIONED_NAME.match(name) for name in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_directive_of_a_profile_is_valid(name: str) -> None:
    directives = PROFILES[name].directives(3)
    assert [d.name for d in directives] == list(PROFILES[name].settings)
    for directive in directives:
        directive.properties()  # converts to D-Bus values without error


def test_maximum_has_everything_baseline_has() -> None:
    baseline, maximum = PROFILES["baseline-2026"].settings, PROFILES["maximum-2026"].settings
    assert set(baseline) <= set(maximum)
    assert {name: maximum[name] for name in baseline} == baseline  # never weaker where both set a directive
    assert maximum["DynamicUser"] == "yes"


def test_baseline_translates_the_pre_rfc_to_debian() -> None:
    baseline = PROFILES["baseline-2026"].settings
    assert baseline["NoExecPaths"] == "/dev/shm /tmp /var/tmp"  # see docs/profiles.md: not / with ExecPaths=
    assert baseline["CapabilityBoundingSet"] == ""
    assert (baseline["IPAddressAllow"], baseline["IPAddressDeny"]) == ("localhost", "any")
    assert "/nix" not in " ".join(baseline.values())


def test_the_table_in_docs_profiles_md_matches_the_profiles() -> None:
    docs = (Path(__file__).resolve().parent.parent / "docs" / "profiles.md").read_text()
    header = "| directive | `minimal-2026` | `baseline-2026` | `maximum-2026` |"
    rows = docs.split(header + "\n| --- | --- | --- | --- |\n", 1)[1].split("\n\n", 1)[0].splitlines()
    documented = {}
    for row in rows:
        directive, *values = (cell.strip().strip("`") for cell in row.strip("|").split("|"))
        documented[directive.rstrip("=")] = values
    expected = {name: [PROFILES[profile].settings.get(name) for profile in ("minimal-2026", "baseline-2026",
                                                                             "maximum-2026")]
                for profile in NAMES for name in PROFILES[profile].settings}
    assert documented == {name: ["" if v is None else v or "(empty)" for v in values]
                          for name, values in expected.items()}


# --- names ----------------------------------------------------------------------------------------------------

def test_an_unversioned_name_is_refused_with_the_versioned_one() -> None:
    with pytest.raises(ProfileError) as info:
        profiles.lookup("baseline")
    assert info.value.problem == "'baseline' has no version"
    assert info.value.hint.startswith("did you mean baseline-2026? profile names end in a year")
    assert info.value.hint.endswith("known profiles: baseline-2026, maximum-2026, minimal-2026")


def test_an_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ProfileError) as info:
        profiles.lookup("strict-2026")
    assert (info.value.problem, info.value.hint) == (
        "unknown profile 'strict-2026'", "known profiles: baseline-2026, maximum-2026, minimal-2026")
    with pytest.raises(ProfileError) as typo:
        profiles.lookup("maximun-2026")
    assert typo.value.hint == "did you mean maximum-2026? known profiles: baseline-2026, maximum-2026, minimal-2026"


def test_an_unknown_profile_in_a_spec_is_a_located_spec_error(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        service:
          exec_start: /bin/true
        profile: hardened
        """)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}:3: profile: 'hardened' has no version (profile names end in a year")


def test_a_profile_must_be_a_name(tmp_path: Path) -> None:
    path = write(tmp_path, "service: {exec_start: /bin/true}\nprofile: [baseline-2026]\n")
    with pytest.raises(SpecError, match=r":2: profile: expected a string$"):
        load_spec(path)


# --- merging --------------------------------------------------------------------------------------------------

def test_merge_replaces_by_name_and_keeps_the_rest_in_order() -> None:
    base = (Directive.parse("PrivateTmp", "yes"), Directive.parse("RestrictAddressFamilies", "AF_UNIX"),
            Directive.parse("ProtectClock", "yes"))
    own = (Directive.parse("RestrictAddressFamilies", ["AF_UNIX", "AF_INET"]), Directive.parse("UMask", "0077"))
    merged = profiles.merge(base, own)
    assert [str(d) for d in merged] == ["PrivateTmp=yes", "ProtectClock=yes",
                                        "RestrictAddressFamilies=AF_UNIX AF_INET", "UMask=0077"]


SPEC = """\
name: api
profile: baseline-2026
service:
  exec_start: /bin/sleep infinity
hardening:
  DynamicUser: yes
  RestrictAddressFamilies: [AF_UNIX, AF_INET]
  IPAddressDeny: ""
  NoExecPaths: /dev/shm /tmp /var/tmp
"""


@pytest.fixture
def profiled(tmp_path: Path) -> Spec:
    return load_spec(write(tmp_path, SPEC))


def test_a_spec_starts_from_its_profile_and_its_own_directives_win(profiled: Spec) -> None:
    assert profiled.profile == "baseline-2026"
    names = [d.name for d in profiled.hardening]
    assert len(names) == len(set(names))  # every directive once
    assert set(names) == set(PROFILES["baseline-2026"].settings) | {"DynamicUser"}
    assert str(profiled.directive("RestrictAddressFamilies")) == "RestrictAddressFamilies=AF_UNIX AF_INET"
    assert str(profiled.directive("NoExecPaths")) == "NoExecPaths=/dev/shm /tmp /var/tmp"  # replaced, not appended
    assert str(profiled.directive("IPAddressDeny")) == "IPAddressDeny="  # an empty value lifts the restriction
    assert profiled.directive("IPAddressDeny").properties()[0][1].value == []  # type: ignore[union-attr]
    assert str(profiled.directive("ProtectClock")) == "ProtectClock=yes"  # the profile's, untouched


def test_directives_say_where_they_came_from(profiled: Spec) -> None:
    own = profiled.directive("DynamicUser")
    inherited = profiled.directive("ProtectClock")
    assert own is not None and inherited is not None
    assert own.line == 6 and type(own.line) is int
    assert inherited.line == 2 and isinstance(inherited.line, ProfileLine)
    assert f"{inherited.line}" == "2, from profile baseline-2026"
    assert f"{inherited.line:d}" == "2" and inherited.line + 1 == 3
    lines = describe_hardening(profiled).splitlines()
    assert "ProtectClock=yes    (harden.yaml:2, from profile baseline-2026)" in lines
    assert "DynamicUser=yes    (harden.yaml:6)" in lines
    assert "RestrictAddressFamilies=AF_UNIX AF_INET    (harden.yaml:7)" in lines


def test_the_dropin_names_the_profile_and_holds_all_of_it(profiled: Spec) -> None:
    dropin = profiled.dropin()
    assert dropin.startswith("# Hardening tested by pytest-systemd-harden (harden.yaml, starting from profile "
                             "baseline-2026)\n[Service]\n")
    assert "\nProtectKernelModules=yes\n" in dropin and "\nDynamicUser=yes\n" in dropin
    assert "RestrictAddressFamilies=AF_UNIX\n" not in dropin  # replaced, not listed twice


def test_without_and_with_hardening_keep_the_profile(profiled: Spec) -> None:
    assert profiled.without(["DynamicUser"]).profile == "baseline-2026"
    assert profiled.with_hardening(()).profile == "baseline-2026"


def test_null_drops_a_directive_of_the_profile(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, """\
        profile: maximum-2026
        service: {exec_start: /bin/true}
        hardening:
          SystemCallFilter: null
          PrivateUsers: ~
          ProtectClock: no
        """))
    names = [d.name for d in spec.hardening]
    assert "SystemCallFilter" not in names and "PrivateUsers" not in names
    assert str(spec.directive("ProtectClock")) == "ProtectClock=no"
    assert len(names) == len(PROFILES["maximum-2026"].settings) - 2


@pytest.mark.parametrize(("line", "message"), [
    ("UMask: null", ("hardening.UMask: null drops a directive of the profile, but baseline-2026 does not set "
                     "UMask (remove the line, or give the directive a value)")),
    ("ProtectClok: null", "hardening.ProtectClok: unknown directive (did you mean ProtectClock?)"),
])
def test_null_must_name_a_directive_of_the_profile(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path, f"profile: baseline-2026\nservice: {{exec_start: /bin/true}}\nhardening:\n  {line}\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == f"{path}:4: {message}"


def test_no_profile_means_exactly_the_specs_directives(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, "service: {exec_start: /bin/true}\nhardening: {PrivateTmp: yes}\n"))
    assert spec.profile == "" and [str(d) for d in spec.hardening] == ["PrivateTmp=yes"]
