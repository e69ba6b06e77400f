"""What a command run on a test machine did: exit status or signal, output, and what they mean."""

from __future__ import annotations

import errno
import os
import re
import signal
from dataclasses import dataclass, field

# Exit codes systemd itself uses when it could not even start the command (man systemd.exec,
# "Process Exit Codes"). A hardened unit that dies with one of these never ran the user's program.
SYSTEMD_EXIT_CODES = {
    200: "CHDIR", 201: "NICE", 202: "FDS", 203: "EXEC", 204: "MEMORY", 205: "LIMITS",
    206: "OOM_ADJUST", 207: "SIGNAL_MASK", 208: "STDIN", 209: "STDOUT", 210: "CHROOT", 211: "IOPRIO",
    212: "TIMERSLACK", 213: "SECUREBITS", 214: "SETSCHEDULER", 215: "CPUAFFINITY", 216: "GROUP",
    217: "USER", 218: "CAPABILITIES", 219: "CGROUP", 220: "SETSID", 221: "CONFIRM", 222: "STDERR",
    224: "PAM", 225: "NETWORK", 226: "NAMESPACE", 227: "NO_NEW_PRIVILEGES", 228: "SECCOMP",
    229: "SELINUX_CONTEXT", 230: "PERSONALITY", 231: "APPARMOR_PROFILE", 232: "ADDRESS_FAMILIES",
    233: "RUNTIME_DIRECTORY", 235: "CHOWN", 236: "SMACK_PROCESS_LABEL", 237: "KEYRING",
    238: "STATE_DIRECTORY", 239: "CACHE_DIRECTORY", 240: "LOGS_DIRECTORY", 241: "CONFIGURATION_DIRECTORY",
    242: "NUMA_POLICY", 243: "CREDENTIALS", 245: "BPF",
}

# strerror() texts, so a denial reported on stderr by an ordinary tool can be named by its errno.
_STRERROR_TO_ERRNO = {os.strerror(code): name for code, name in errno.errorcode.items()}
_STRERROR_PATTERN = re.compile("|".join(re.escape(text) for text in sorted(_STRERROR_TO_ERRNO, key=len, reverse=True)))


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@dataclass(frozen=True)
class CommandResult:
    """The outcome of one command run on a machine, in or out of the service's sandbox.

    ``exit_status`` is set when the process exited, ``signal`` when it was killed (then
    ``exit_status`` is None). ``where`` says how it ran ("inside the sandbox of X", "on the machine").
    """

    command: str
    exit_status: int | None
    signal: int | None
    stdout: str
    stderr: str
    where: str = ""
    duration: float = field(default=0.0, compare=False)

    @property
    def ok(self) -> bool:
        return self.exit_status == 0 and self.signal is None

    @property
    def killed_by_seccomp(self) -> bool:
        return self.signal == signal.SIGSYS

    @property
    def errno_names(self) -> list[str]:
        """Errno names whose strerror text appears on stderr (e.g. "Read-only file system" -> EROFS)."""
        found: list[str] = []
        for match in _STRERROR_PATTERN.finditer(self.stderr):
            name = _STRERROR_TO_ERRNO[match.group(0)]
            if name not in found:
                found.append(name)
        return found

    def status_text(self) -> str:
        """One phrase for how the command ended, e.g. "killed by SIGSYS (seccomp: Bad system call)"."""
        if self.signal is not None:
            name = signal_name(self.signal)
            if self.signal == signal.SIGSYS:
                return f"killed by {name} (seccomp: Bad system call)"
            return f"killed by {name}"
        if self.exit_status is None:
            return "did not finish"
        text = f"exit status {self.exit_status}"
        if self.exit_status in SYSTEMD_EXIT_CODES:
            text += (f" ({self.exit_status}/{SYSTEMD_EXIT_CODES[self.exit_status]}: "
                     "systemd could not set up the sandbox)")
        elif self.exit_status == 128 + signal.SIGSYS:
            text += " (a child was killed by SIGSYS: seccomp, Bad system call)"
        errnos = self.errno_names
        if errnos:
            text += f", stderr reports {', '.join(errnos)}"
        return text

    def describe(self, tail_lines: int = 15) -> str:
        """A multi-line account for failure messages: command, where, status, output tails."""
        lines = [f"command: {self.command}"]
        if self.where:
            lines.append(f"ran:     {self.where}")
        lines.append(f"result:  {self.status_text()}")
        for label, text in (("stdout", self.stdout), ("stderr", self.stderr)):
            if text.strip():
                body = text.rstrip("\n").splitlines()
                shown = body[-tail_lines:]
                more = f" (last {len(shown)} of {len(body)} lines)" if len(body) > len(shown) else ""
                lines.append(f"{label}{more}:")
                lines.extend(f"  | {line}" for line in shown)
        return "\n".join(lines)
