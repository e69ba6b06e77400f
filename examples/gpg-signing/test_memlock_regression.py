"""The gitea regression as an expected failure: under memlock-regression.yaml signing must break, the way it broke
for gitea, and every other part of the service must keep working. If this test fails, the example no longer
reproduces the regression (a gpg that stopped calling mlock, a systemd that changed @memlock...)."""

from pathlib import Path

import pytest

from pytest_systemd_harden import HardenedService
from pytest_systemd_harden.spec.load import Spec, load_spec

pytestmark = pytest.mark.harden("memlock-regression.yaml")

SIGN = "curl -sS -o /dev/null -w '%{http_code}' -X POST -d hello http://127.0.0.1:8080/sign"


def test_signing_answers_500_because_gpg_was_killed_by_seccomp(hardened_service: HardenedService) -> None:
    assert hardened_service.client("curl -fsS http://127.0.0.1:8080/health").stdout == "ok\n"  # the service is up
    assert hardened_service.client(SIGN).stdout == "500"
    # Only the journal says why - as it was for gitea.
    assert "died with <Signals.SIGSYS: 31>" in hardened_service.journal()


def test_gpg_itself_is_killed_inside_the_sandbox(hardened_service: HardenedService) -> None:
    gpg = hardened_service.inside("gpg --batch --homedir /tmp --list-secret-keys")
    assert gpg.exit_status == 128 + 31 and "Bad system call" in gpg.stderr, gpg.describe()  # the shell saw SIGSYS


def test_the_variant_differs_from_harden_yaml_only_where_it_says(harden_spec: Spec) -> None:
    good = {d.name: d.value for d in load_spec(Path(__file__).with_name("harden.yaml")).hardening}
    variant = {d.name: d.value for d in harden_spec.hardening}
    assert good.pop("SystemCallErrorNumber") == "EPERM"
    assert (good.pop("SystemCallFilter"), variant.pop("SystemCallFilter")) == ("@system-service",
                                                                              "@system-service ~@memlock")
    assert variant == good


def test_the_diagnosis_names_memlock_and_mlock_and_a_verified_fix(hardened_service: HardenedService,
                                                                  harden_spec: Spec) -> None:
    """What the plugin tells a maintainer whose signing broke: the directive, the group, the syscall, the fix."""
    from pytest_systemd_harden.search.scenarios import diagnose_failure, failure_report, run_scenario

    signing = next(s for s in harden_spec.scenarios if "sign" in s.name)
    outcome = run_scenario(hardened_service, signing)
    assert not outcome.passed
    diagnosis = diagnose_failure(hardened_service, signing, failure_report(hardened_service, outcome))
    assert [f.culprit.name for f in diagnosis.findings] == ["SystemCallFilter"], diagnosis.render()
    relaxation = diagnosis.findings[0].relaxation
    assert relaxation is not None and relaxation.needs == "mlock (in @memlock)"
    assert diagnosis.verified  # the scenario passed again with only this change
    assert diagnosis.combined is not None
    assert diagnosis.combined.dropin(harden_spec.hardening) == \
        "[Service]\nSystemCallFilter=\nSystemCallFilter=@system-service\n"
