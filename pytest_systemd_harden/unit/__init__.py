"""The unit under test: which unit it is (under_test), the running service (service), its sandbox as a
ProbeHost (probe_host), and the pool of machines that run services."""
