"""The gitea regression as an expected failure: under memlock-regression.yaml signing must break, the way it broke
for gitea, and every other part of the service must keep working. If this test fails, the example no longer
reproduces the regression (a gpg that stopped calling mlock, a systemd that changed @memlock...)."""

from pathlib import Path

import pytest

from pytest_systemd_harden.service import HardenedService
from pytest_systemd_harden.spec import Spec, load_spec

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
