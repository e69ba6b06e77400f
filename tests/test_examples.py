"""The examples, run as a maintainer runs them, and the failures their READMEs describe, reproduced.

Each example directory is one pytest run (`pytest examples/NAME`): every spec item and Python test in it must
pass. Then each README's "take this line out and see" story is replayed on a copy of the example, and the
report must say what the README quotes. (The gpg-signing variant checks its own failure and diagnosis, in
examples/gpg-signing/test_memlock_regression.py.) Images are shared with ``./dev.sh examples``: one per
package set.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("machine")  # a working backend, like the other live tests

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# The items each example has today; more may come (enforcement items), none may fail.
ITEMS = {
    "gpg-signing": ["harden.yaml::sign a payload through the API PASSED",
                    "harden.yaml::the signature verifies with the service's public key PASSED",
                    "test_memlock_regression.py::test_signing_answers_500_because_gpg_was_killed_by_seccomp PASSED"],
    "dns-client": ["harden.yaml::resolve a name of the local zone PASSED",
                   "harden.yaml::reverse lookup of an address PASSED",
                   "harden.yaml::list the machine's interfaces PASSED",
                   "harden.yaml::no DNS server but the machine's own PASSED",
                   "test_private_network.py::test_nobody_on_the_machine_can_reach_its_api PASSED"],
    "rare-endpoint": ["harden.yaml::list the items (every page, every day) PASSED",
                      "harden.yaml::export for accounting (once a month) PASSED"],
    "package-unit": ["harden.yaml::a value is set and read back PASSED", "harden.yaml::the server answers stats PASSED",
                     "test_over_hardening.py::test_the_start_fails_and_the_diagnosis_names_the_drop_ins_line PASSED"],
    "unit-file": [f"harden.yaml::{release}::{item} PASSED" for release in ("bookworm", "trixie") for item in (
        "a note is stored and read back",
        "the state directory is the instance's own, and the sandbox writes there only")],
    "version-bump": ["harden.yaml::says hello PASSED", "harden.yaml::says hello again, and counts PASSED",
                     "test_version_bump.py::test_the_baseline_notices_the_bump_and_the_regression_it_brought PASSED"],
    "privileged-port": ["harden.yaml::redirects plain HTTP to HTTPS PASSED",
                        "harden.yaml::holds exactly CAP_NET_BIND_SERVICE PASSED"],
}
RUN = ("-p", "no:cacheprovider", "--harden-require-backend")


def test_every_example_is_listed_here_and_has_a_readme() -> None:
    found = sorted(p.name for p in EXAMPLES.iterdir() if (p / "harden.yaml").exists())
    assert found == sorted(ITEMS)
    assert all((EXAMPLES / name / "README.md").exists() for name in found)


@pytest.mark.parametrize("name", sorted(ITEMS))
def test_the_example_passes(pytester: pytest.Pytester, name: str) -> None:
    result = pytester.runpytest(str(EXAMPLES / name), "-v", *RUN)
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("errors", 0) == 0, result.stdout.str()
    assert outcomes["passed"] >= len(ITEMS[name])
    result.stdout.fnmatch_lines_random([f"*{name}/{item}*" for item in ITEMS[name]])


def copy_example(pytester: pytest.Pytester, name: str) -> Path:
    copy = pytester.path / name
    shutil.copytree(EXAMPLES / name, copy, ignore=shutil.ignore_patterns("__pycache__", "test_*.py"))
    return copy


def failed_items(result: pytest.RunResult) -> list[str]:
    """The names of the spec items that failed, from ``-v`` output."""
    return [line.split("::", 1)[1].rsplit(" FAILED", 1)[0] for line in result.stdout.lines
            if ".yaml::" in line and " FAILED" in line and not line.startswith("FAILED ")]


def without_line(spec: Path, line: str) -> None:
    text = spec.read_text()
    assert text.count(line) == 1, f"{line!r} is no longer in {spec}: update this test and the README"
    spec.write_text(text.replace(line, ""))


def test_rare_endpoint_without_its_cache_directory_breaks_the_export_only(pytester: pytest.Pytester) -> None:
    spec = copy_example(pytester, "rare-endpoint") / "harden.yaml"
    without_line(spec, "  CacheDirectory: shop             # /var/cache/shop, writable by the service and nobody "
                       "else: for the export\n")
    result = pytester.runpytest(str(spec), "-v", "-k", "items or export", *RUN)
    assert failed_items(result) == ["export for accounting (once a month)"]
    result.stdout.fnmatch_lines([
        "*harden.yaml::list the items (every page, every day) PASSED*",
        "*harden.yaml::export for accounting (once a month) FAILED*",
        "  | curl: (22) The requested URL returned error: 500",
        "*/admin/export failed: [[]Errno 30] Read-only file system: '/var/cache/shop'",
        "  culprit: ProtectSystem=strict (harden.yaml:4, from profile baseline-2026)",
        "    smallest relaxation: let systemd create and grant /var/cache/shop with CacheDirectory=shop",
    ])


def test_dns_client_without_netlink_cannot_list_interfaces(pytester: pytest.Pytester) -> None:
    spec = copy_example(pytester, "dns-client") / "harden.yaml"
    text = spec.read_text()
    assert "[AF_UNIX, AF_INET, AF_NETLINK]" in text
    spec.write_text(text.replace("[AF_UNIX, AF_INET, AF_NETLINK]", "[AF_UNIX, AF_INET]"))
    result = pytester.runpytest(str(spec), "-v", "-k", "interfaces", *RUN)
    assert failed_items(result) == ["list the machine's interfaces"]
    result.stdout.fnmatch_lines([
        "*harden.yaml::list the machine's interfaces FAILED*",
        "*/interfaces failed: OSError(97, 'getifaddrs: Address family not supported by protocol')",
        "  culprit: RestrictAddressFamilies=AF_UNIX AF_INET (harden.yaml:18)",
        "    smallest relaxation: also allow AF_NETLINK in RestrictAddressFamilies=",
    ])


def test_privileged_port_under_private_users_cannot_bind_port_80(pytester: pytest.Pytester) -> None:
    spec = copy_example(pytester, "privileged-port") / "harden.yaml"
    without_line(spec, "  PrivateUsers: no                 # in a user namespace of its own the capability would "
                       "not count for port 80\n")
    result = pytester.runpytest(str(spec), "-v", "-k", "starts", *RUN)
    assert failed_items(result) == ["service starts under hardening"]
    result.stdout.fnmatch_lines([
        ("harden-redirect.service exited before it was ready (TCP port 80 accepts connections) under the "
         "hardening of harden.yaml"),
        "*PermissionError: [[]Errno 13] Permission denied",
        "  culprit: PrivateUsers=yes (harden.yaml:4, from profile maximum-2026)",
    ])
