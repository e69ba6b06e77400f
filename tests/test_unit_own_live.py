"""The unit a package ships, tried as a new user would (issue 14, "Done when"): a spec of 15 lines names the unit,
adds hardening and runs two scenarios; a directive added to break a feature is caught and named with its file and
line, its fix printed as a verified drop-in. And a culprit in the unit file itself: named with the unit file's
line, its fix a drop-in that overrides the unit's own setting."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("machine")  # a working backend, like the other live tests

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RUN = ("-p", "no:cacheprovider", "--harden-require-backend", "-v")

MEMCACHED_SPEC = """\
service: {unit: memcached.service, ready: {tcp: 11211}}
machine:
  packages: [memcached]
  files: {/opt/mc: client/}
hardening:
  ProtectHome: yes
  PrivateNetwork: yes
scenarios:
  - name: a value is set and read back
    client: python3 /opt/mc/mc.py set greeting hello
    expect: {stdout: hello}
  - name: the server answers stats
    client: python3 /opt/mc/mc.py stats
    expect: {stdout: STAT pid}
"""


def test_a_package_units_spec_catches_a_directive_that_breaks_a_feature(pytester: pytest.Pytester) -> None:
    shutil.copytree(EXAMPLES / "package-unit" / "client", pytester.path / "client")
    spec = pytester.path / "harden.yaml"
    spec.write_text(MEMCACHED_SPEC)
    assert len(MEMCACHED_SPEC.splitlines()) <= 15
    # PrivateNetwork=yes: memcached listens in a network of its own, where no client of the machine reaches it.
    result = pytester.runpytest(str(spec), *RUN)
    result.stdout.fnmatch_lines_random([
        "*harden.yaml::service starts under hardening PASSED*",
        "*harden.yaml::a value is set and read back FAILED*",
        "*harden.yaml::PrivateTmp=yes (memcached.service:23) is enforced PASSED*",  # the unit's own, proven
        "*harden.yaml::ProtectHome=yes is enforced PASSED*",
    ])
    result.stdout.fnmatch_lines([
        "  culprit: PrivateNetwork=yes (harden.yaml:7)",
        ("  verified: the scenario passes with only this change, and with this drop-in written as a file after the "
        "spec's on a fresh machine (first start and restart):"),
        "    [[]Service]",
        "    PrivateNetwork=no",
    ])


PAGE_UNIT = """\
[Unit]
Description=Serves the pages in /home/pub

[Service]
ExecStart=/usr/bin/python3 -m http.server --bind 127.0.0.1 --directory /home/pub 8089
ProtectHome=yes
PrivateTmp=yes
"""

PAGE_SPEC = """\
service:
  unit_file: debian/pages.service
  ready: {tcp: 8089}
machine:
  files: {/home/pub: pub/}
hardening:
  NoNewPrivileges: yes
scenarios:
  - name: the page is served
    client: python3 -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8089/index.html').read().decode())"
    expect: {stdout: hello}
"""


def test_a_culprit_in_the_unit_file_itself_is_named_and_overridden_by_a_drop_in(pytester: pytest.Pytester) -> None:
    (pytester.path / "debian").mkdir()
    (pytester.path / "debian" / "pages.service").write_text(PAGE_UNIT)
    (pytester.path / "pub").mkdir()
    (pytester.path / "pub" / "index.html").write_text("hello\n")
    spec = pytester.path / "harden.yaml"
    spec.write_text(PAGE_SPEC)
    # The unit's own ProtectHome=yes hides /home: the server starts, and answers 404.
    result = pytester.runpytest(str(spec), *RUN)
    result.stdout.fnmatch_lines_random([
        "*harden.yaml::service starts under hardening PASSED*",
        "*harden.yaml::the page is served FAILED*",
        "*harden.yaml::ProtectHome=yes (pages.service:6) is enforced PASSED*",
    ])
    # The observation (strace of the unit's own ExecStart=) saw the one file the server reads: the narrowest
    # relaxation shows an empty home with just that file, and its drop-in resets the unit's list before adding to it.
    result.stdout.fnmatch_lines([
        "  culprit: ProtectHome=yes (pages.service:6)",
        "    the service needs: read access to /home/pub/index.html",
        "    smallest relaxation: *ProtectHome=tmpfs*BindReadOnlyPaths=-/home/pub/index.html",
        ("  verified: the scenario passes with only this change, and with this drop-in written as a file after the "
        "spec's on a fresh machine (first start and restart):"),
        "    [[]Service]",
        "    ProtectHome=tmpfs",
        "    BindReadOnlyPaths=",
        "    BindReadOnlyPaths=-/home/pub/index.html",
    ])


def test_a_package_unit_not_in_the_image_cache_yet_has_one_item_for_its_own_hardening(
        pytester: pytest.Pytester) -> None:
    shutil.copytree(EXAMPLES / "package-unit" / "client", pytester.path / "client")
    spec = pytester.path / "harden.yaml"
    spec.write_text(MEMCACHED_SPEC.replace("  PrivateNetwork: yes\n", ""))
    # As on a first run, before the image is built: the unit's directives are known only once the machine runs.
    pytester.makeconftest("""
from pytest_systemd_harden.plugin import HardenSession
HardenSession.cached_tree = lambda self, spec: None
""")
    result = pytester.runpytest(str(spec), "-rP", *RUN)
    result.assert_outcomes(passed=5)  # the start, two scenarios, ProtectHome=, and the unit's own hardening
    result.stdout.fnmatch_lines_random([
        "*harden.yaml::the own hardening of memcached.service is enforced PASSED*",
        "PrivateTmp=yes (memcached.service:23) is enforced",  # each of them, in the item's report
        "CapabilityBoundingSet=CAP_SETGID CAP_SETUID CAP_SYS_RESOURCE (memcached.service:39) is enforced",
    ])


def test_a_list_the_unit_file_sets_is_reset_by_the_printed_drop_in(pytester: pytest.Pytester) -> None:
    (pytester.path / "debian").mkdir()
    (pytester.path / "debian" / "pages.service").write_text(
        PAGE_UNIT.replace("ProtectHome=yes\n", "RestrictAddressFamilies=AF_UNIX\n"))
    (pytester.path / "pub").mkdir()
    (pytester.path / "pub" / "index.html").write_text("hello\n")
    spec = pytester.path / "harden.yaml"
    spec.write_text(PAGE_SPEC.replace("  NoNewPrivileges: yes\n", "  RestrictAddressFamilies: [AF_UNIX]\n"))
    # The server cannot open its TCP socket; the spec's list adds to the unit's, so only a reset undoes it.
    result = pytester.runpytest(str(spec), "-k", "starts", *RUN)
    result.stdout.fnmatch_lines([
        "*harden.yaml::service starts under hardening FAILED*",
        "  culprit: RestrictAddressFamilies=AF_UNIX; RestrictAddressFamilies=AF_UNIX (pages.service:6, harden.yaml:7)",
        "    smallest relaxation: also allow AF_INET in RestrictAddressFamilies=",
        ("  verified: the scenario passes with only this change, and with this drop-in written as a file after the "
         "spec's on a fresh machine (first start and restart):"),
        "    [[]Service]",
        "    RestrictAddressFamilies=",
        "    RestrictAddressFamilies=AF_UNIX AF_INET",
        "  or in harden.yaml (hardening:):",
        "    # RestrictAddressFamilies: the unit's own list (pages.service:6, harden.yaml:7) cannot be undone*",
    ])
