"""One directive too many in the drop-in: memcached (started as root by its unit, -u memcache in its config) can
no longer drop to its user. The diagnosis names the directive with the file and line it comes from, and a run with
restarts and a diagnosis leaves the package's files in /etc exactly as installed."""

import pytest

from pytest_systemd_harden import HardenedService
from pytest_systemd_harden.errors import ServiceFailed
from pytest_systemd_harden.spec.load import Spec
from pytest_systemd_harden.unit.pool import MachinePool

pytestmark = pytest.mark.harden("over-hardened.yaml")

ETC_HASH = "find /etc -xdev -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum"


def test_the_start_fails_and_the_diagnosis_names_the_drop_ins_line(harden_pool: MachinePool,
                                                                   harden_spec: Spec) -> None:
    from pytest_systemd_harden.search.scenarios import diagnose_failure

    service = HardenedService(harden_pool.machine_for(harden_spec.machine), harden_spec)
    before = service.client(ETC_HASH).stdout
    with pytest.raises(ServiceFailed) as failed:
        service.start()
    assert "SystemCallFilter=~@setuid    (over-hardened.yaml:" in str(failed.value)  # the report says where
    assert "/lib/systemd/system/memcached.service" in str(failed.value)  # and shows the effective unit
    diagnosis = diagnose_failure(service, None, str(failed.value))
    assert [f.culprit.name for f in diagnosis.findings] == ["SystemCallFilter"], diagnosis.render()
    assert diagnosis.verified, diagnosis.render()
    assert diagnosis.dropin_verified, diagnosis.render()  # the printed drop-in, as a file on top of the unit
    assert "over-hardened.yaml:" in diagnosis.render()
    service.stop()
    assert service.client(ETC_HASH).stdout == before  # no package file changed or removed
    assert not service.client("test -e /etc/systemd/system/memcached.service.d/harden.conf").ok
