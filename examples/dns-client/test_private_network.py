"""What PrivateNetwork=yes does to this service, checked: each way it breaks is asserted, so the README's account
of the trade-off stays true. If a test here fails, PrivateNetwork= no longer means what the README says."""

import re
from pathlib import Path

import pytest

from pytest_systemd_harden import HardenedService
from pytest_systemd_harden.spec.load import Spec, load_spec

pytestmark = pytest.mark.harden("private-network.yaml")


def test_it_starts_and_counts_as_ready(hardened_service: HardenedService) -> None:
    # The readiness check connects from inside the service's namespaces, where the port is open.
    assert hardened_service.state()["ActiveState"] == "active"
    assert hardened_service.inside("curl -fsS http://127.0.0.1:8080/interfaces").ok


def test_nobody_on_the_machine_can_reach_its_api(hardened_service: HardenedService) -> None:
    api = hardened_service.client("curl -fsS http://127.0.0.1:8080/interfaces")
    # curl 7.88 (bookworm) says "Couldn't connect to server", 8.x (trixie) "Could not connect to server".
    assert api.exit_status == 7 and re.search(r"Could(n't| not) connect to server", api.stderr), api.describe()


def test_it_cannot_reach_the_machines_resolver(hardened_service: HardenedService) -> None:
    # 127.0.0.1 in its namespace is its own loopback, where no dnsmasq listens.
    lookup = hardened_service.inside("getent hosts db.example.test")
    assert lookup.exit_status == 2, lookup.describe()  # "not found"
    assert hardened_service.client("getent hosts db.example.test").ok  # the machine itself resolves it


def test_its_interfaces_are_a_loopback_of_its_own(hardened_service: HardenedService) -> None:
    own = hardened_service.inside("readlink /proc/self/ns/net").stdout
    machine = hardened_service.client("readlink /proc/self/ns/net").stdout
    assert own.startswith("net:[") and own != machine
    assert hardened_service.inside("ip -brief link").stdout.split()[0] == "lo"


def test_the_variant_is_harden_yaml_plus_private_network(harden_spec: Spec) -> None:
    good = load_spec(Path(__file__).with_name("harden.yaml"))
    assert [str(d) for d in harden_spec.without(["PrivateNetwork"]).hardening] == [str(d) for d in good.hardening]
    assert harden_spec.machine == good.machine  # one machine for both
