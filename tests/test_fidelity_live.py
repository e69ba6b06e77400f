"""What the default backend shows must match a real host: no pass where a host fails (issue 19)."""

from __future__ import annotations

import pytest

from pytest_systemd_harden.backends.base import Machine

pytestmark = pytest.mark.usefixtures("machine")  # a working backend, like the other live tests

# A host refuses the service its own bound device: PrivateDevices=yes implies DevicePolicy=closed.
BOUND_DEVICE = """
service:
  exec_start: /bin/sleep infinity
hardening:
  PrivateDevices: yes
  BindPaths: /dev/net/tun
"""


@pytest.mark.parametrize("privileged", [False, True], ids=["user-namespaced", "privileged"])
def test_a_bound_device_the_policy_denies_fails_as_on_a_host(pytester: pytest.Pytester, machine: Machine,
                                                               privileged: bool) -> None:
    spec = BOUND_DEVICE + ("machine: {privileged: true}\n" if privileged else "")
    pytester.makefile(".yaml", harden=spec)
    result = pytester.runpytest("-v", "-rs", "--harden-diagnose=off")
    output = result.stdout.str()
    assert "PrivateDevices=yes is enforced FAILED" in output, output
    if machine.NAME == "nspawn":  # no device rules in the container: the failure says what a host does
        result.stdout.fnmatch_lines([
            "*expected: opening /dev/net/tun is denied (EPERM) by the closed device policy*",
            "*on a host (or --harden-backend=qemu) opening /dev/net/tun fails with EPERM*add DeviceAllow=/dev/net/tun rw*",
        ])
    allowed = spec.replace("  BindPaths: /dev/net/tun\n", "  BindPaths: /dev/net/tun\n  DeviceAllow: /dev/net/tun rw\n")
    (pytester.path / "harden.yaml").write_text(allowed)
    result = pytester.runpytest("-v", "-rs", "--harden-diagnose=off")
    output = result.stdout.str()
    assert "PrivateDevices=yes is enforced PASSED" in output, output
    assert "DeviceAllow=/dev/net/tun rw is enforced PASSED" in output, output
