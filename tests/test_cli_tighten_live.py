"""`systemd-harden tighten` on a spec that ships on several releases: the result is run on each of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_systemd_harden.cli import main
from pytest_systemd_harden.machine.backends.base import Machine

# On bookworm (systemd 252) the scenario asks nothing; on trixie it writes to /etc, which the tightened result
# forbids (ProtectSystem=): tightened on the first release, the result must be caught failing on the second. (A
# directory, not a file: the diagnosis's trials share the machine, and a file left by one would stand in the way of
# the ConfigurationDirectory= another verifies.)
TWO_RELEASES = """
service:
  exec_start: /bin/sleep infinity
machine:
  release: [bookworm, trixie]
hardening:
  NoNewPrivileges: yes
scenarios:
  - name: writes its marker where the release wants it
    inside: sh -c 'systemctl --version | grep -q "^systemd 252" || \
(mkdir -p /etc/harden-marker && touch /etc/harden-marker/stamp)'
"""


def test_a_result_tightened_on_one_release_is_run_on_every_other_the_spec_ships_on(
        machine: Machine, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if machine.NAME != "nspawn":
        pytest.skip("Debian releases are nspawn's images")
    spec = tmp_path / "harden.yaml"
    spec.write_text(TWO_RELEASES)
    status = main(["tighten", str(spec), "--no-observe", "--max-runs", "60"])
    out, err = capsys.readouterr()
    assert status == 1, out + err
    assert "Debian bookworm" in err  # tightened on the first release the spec pins
    assert "on Debian trixie the result does NOT pass: scenario 'writes its marker where the release wants it'" in out
    assert "culprit: ProtectSystem=strict" in out, out  # the directive of the result that breaks it there, named
    assert "tightened on Debian bookworm, the spec also ships on trixie, where it fails" in err
    assert "every scenario passes under it" not in out

    spec.write_text(TWO_RELEASES.replace("|| (mkdir -p /etc/harden-marker && touch /etc/harden-marker/stamp)",
                                         "|| true"))
    status = main(["tighten", str(spec), "--no-observe", "--max-runs", "60"])
    out, err = capsys.readouterr()
    assert status == 0, out + err
    assert "hardening: (every scenario passes under it on Debian bookworm, trixie)" in out
