"""Denial probes: small actions run inside a service's sandbox, each reporting allowed or denied (errno/signal).

* :mod:`.inside` - the standalone script that runs the probes (stdlib only, sent to the image's python3);
* :mod:`.model` - :class:`Probe` and :class:`ProbeResult`;
* :mod:`.catalogue` - the full catalogue and the ``deny:`` vocabulary;
* :mod:`.runner` - a batch as one process, and what a machine's systemd knows; running one on a machine is
  :mod:`pytest_systemd_harden.machine.probing`.

Which probes a spec's directives must deny is in :mod:`pytest_systemd_harden.sandbox.expectations`, the verdicts in
:mod:`pytest_systemd_harden.sandbox.verdict`.
"""

from .catalogue import Denial, DenialError, parse_denial, standard_catalogue
from .model import Probe, ProbeResult
from .runner import Batch, MachineFacts, run_batch

__all__ = ["Batch", "Denial", "DenialError", "MachineFacts", "Probe", "ProbeResult", "parse_denial", "run_batch",
           "standard_catalogue"]
