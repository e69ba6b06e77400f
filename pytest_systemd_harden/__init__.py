"""pytest-systemd-harden: regression tests for systemd service hardening.

Boots a real systemd in a container, starts a service under a declared hardening spec, runs its feature
scenarios, and checks that the sandbox is really in force. The modules work without pytest; ``plugin`` wires
them into pytest. The stages, in the order data flows, are described in docs/architecture.md.
"""

from .errors import BackendUnavailable, HardenError, ImageBuildError, MachineError, ServiceFailed, SpecError
from .result import CommandResult
from .spec.load import Spec, load_spec
from .unit.service import HardenedService

__all__ = ["BackendUnavailable", "CommandResult", "HardenError", "HardenedService", "ImageBuildError", "MachineError",
           "ServiceFailed", "Spec", "SpecError", "load_spec"]
__version__ = "0.1.0"
