"""The plugin's exception family.

Three kinds of trouble are kept apart because they call for different reactions:

* :class:`SpecError` - the user's spec is wrong. Reported as one line (file:line: key: problem; hint),
  raised before any machine starts, never with a traceback.
* :class:`BackendUnavailable` - this host cannot run the backend (not root, no systemd-nspawn). Tests skip
  with the reason and the fix, or error under ``--harden-require-backend``.
* :class:`MachineError` - infrastructure broke (a container did not boot, the bus went away). Not the
  user's fault, and said so.

A service that fails to start or a scenario that fails is the user's business: those are
:class:`ServiceFailed` and plain ``AssertionError``.
"""

from __future__ import annotations

import re

# Colour, cursor and erase sequences (CSI): dropped from text a machine or a build printed.
_CONTROL_SEQUENCE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def printable(text: str) -> str:
    """``text`` (printed by a machine, a build or a package: not trusted) as a terminal shows it harmlessly: colour
    and cursor sequences dropped, every other control character (the ESC and BEL of a sequence that sets a title or
    the clipboard) a ``?``; newlines and tabs kept."""
    return "".join(char if char.isprintable() or char in "\n\t" else "?" for char in _CONTROL_SEQUENCE.sub("", text))


class HardenError(Exception):
    """Base class of every error this plugin raises on purpose."""


class SpecError(HardenError):
    """A hardening spec is invalid; the message says where and how to fix it."""

    def __init__(self, path: str, line: int | None, key: str, problem: str, hint: str = "") -> None:
        self.path = path
        self.line = line
        self.key = key
        self.problem = problem
        self.hint = hint
        where = f"{path}:{line}" if line is not None else path
        text = f"{where}: {key}: {problem}" if key else f"{where}: {problem}"
        if hint:
            text += f" ({hint})"
        # One line whatever the spec holds: a key or a file name may carry a newline or a control character.
        super().__init__(_CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text))


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class BackendUnavailable(HardenError):
    """The backend cannot run on this host; the message names the fix."""


class MachineError(HardenError):
    """The test machine itself failed (boot, bus, image build): an infrastructure problem."""


class ImageBuildError(HardenError):
    """A machine image could not be built: often a package name in the spec, sometimes the mirror."""


class ServiceFailed(HardenError, AssertionError):
    """The hardened service failed to start or to become ready.

    An ``AssertionError`` so that pytest reports it as a test failure (the user's unit is at fault),
    not as an error in the test infrastructure.
    """
