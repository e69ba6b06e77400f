"""What a command did (CommandResult) and how it differs from a scenario's expectation (mismatches)."""

from __future__ import annotations

import signal

import pytest

from pytest_systemd_harden.result import SYSTEMD_EXIT_CODES, CommandResult, signal_name
from pytest_systemd_harden.search.scenarios import mismatches
from pytest_systemd_harden.spec.load import Expectation

SIGSYS = int(signal.SIGSYS)
SIGKILL = int(signal.SIGKILL)


def result(exit_status: int | None = 0, sig: int | None = None, stdout: str = "", stderr: str = "",
           command: str = "touch /etc/x", where: str = "") -> CommandResult:
    return CommandResult(command, exit_status, sig, stdout, stderr, where)


# --- CommandResult --------------------------------------------------------------------------------------------

def test_ok() -> None:
    assert result(0).ok
    assert not result(1).ok
    assert not result(None, SIGKILL).ok
    assert not result(None, None).ok


def test_killed_by_seccomp() -> None:
    assert result(None, SIGSYS).killed_by_seccomp
    assert not result(None, SIGKILL).killed_by_seccomp
    assert not result(128 + SIGSYS).killed_by_seccomp


def test_signal_name() -> None:
    assert signal_name(SIGSYS) == "SIGSYS"
    assert signal_name(9) == "SIGKILL"
    assert signal_name(999) == "signal 999"


@pytest.mark.parametrize(("stderr", "names"), [
    ("touch: cannot touch '/etc/x': Read-only file system\n", ["EROFS"]),
    ("mkdir: Permission denied\nln: Operation not permitted\nrm: Permission denied\n", ["EACCES", "EPERM"]),
    ("cat: /nope: No such file or directory", ["ENOENT"]),
    ("socket: Address family not supported by protocol", ["EAFNOSUPPORT"]),
    ("all is well", []),
    ("", []),
])
def test_errno_names(stderr: str, names: list[str]) -> None:
    assert result(1, stderr=stderr).errno_names == names


def test_status_text_exit() -> None:
    assert result(0).status_text() == "exit status 0"
    assert result(3).status_text() == "exit status 3"


def test_status_text_with_errno() -> None:
    assert result(1, stderr="touch: cannot touch '/etc/x': Read-only file system").status_text() == (
        "exit status 1, stderr reports EROFS")


def test_status_text_sigsys() -> None:
    assert result(None, SIGSYS).status_text() == "killed by SIGSYS (seccomp: Bad system call)"


def test_status_text_other_signal() -> None:
    assert result(None, SIGKILL).status_text() == "killed by SIGKILL"
    assert result(None, 999).status_text() == "killed by signal 999"


def test_status_text_shell_reports_child_sigsys() -> None:
    assert result(128 + SIGSYS).status_text() == ("exit status 159 "
                                                  "(a child was killed by SIGSYS: seccomp, Bad system call)")


@pytest.mark.parametrize(("status", "name"),
                         [(226, "NAMESPACE"), (203, "EXEC"), (228, "SECCOMP"), (218, "CAPABILITIES")])
def test_status_text_systemd_exit_codes(status: int, name: str) -> None:
    assert SYSTEMD_EXIT_CODES[status] == name
    assert result(status).status_text() == (f"exit status {status} ({status}/{name}: "
                                            "systemd could not set up the sandbox)")


def test_status_text_systemd_exit_code_with_errno() -> None:
    text = result(226, stderr="Failed to set up mount namespacing: /run/x: No such file or directory").status_text()
    assert text == "exit status 226 (226/NAMESPACE: systemd could not set up the sandbox), stderr reports ENOENT"


def test_status_text_did_not_finish() -> None:
    assert result(None, None).status_text() == "did not finish"


def test_describe() -> None:
    res = result(1, stdout="", stderr="touch: cannot touch '/etc/x': Read-only file system\n",
                 where="inside the sandbox of app.service")
    assert res.describe() == (
        "command: touch /etc/x\n"
        "ran:     inside the sandbox of app.service\n"
        "result:  exit status 1, stderr reports EROFS\n"
        "stderr:\n"
        "  | touch: cannot touch '/etc/x': Read-only file system"
    )


def test_describe_tails_long_output_and_skips_blank() -> None:
    res = result(0, stdout="\n".join(f"line {i}" for i in range(20)) + "\n", stderr="  \n", command="seq")
    assert res.describe(tail_lines=3) == (
        "command: seq\n"
        "result:  exit status 0\n"
        "stdout (last 3 of 20 lines):\n"
        "  | line 17\n"
        "  | line 18\n"
        "  | line 19"
    )


def test_describe_signal() -> None:
    assert result(None, SIGSYS, command="bad").describe() == (
        "command: bad\nresult:  killed by SIGSYS (seccomp: Bad system call)")


# --- mismatches -----------------------------------------------------------------------------------------------

def test_mismatches_pass() -> None:
    assert mismatches(Expectation(), result(0)) == []
    assert mismatches(Expectation(exit=1, stderr="Read-only"), result(1, stderr="x: Read-only file system")) == []
    assert mismatches(Expectation(exit=None), result(7)) == []
    assert mismatches(Expectation(exit=None, signal="SIGSYS"), result(None, SIGSYS)) == []
    assert mismatches(Expectation(stdout="BEGIN PGP"), result(0, stdout="-----BEGIN PGP SIGNATURE-----")) == []


def test_mismatch_exit_status() -> None:
    assert mismatches(Expectation(), result(1, stderr="Read-only file system")) == [
        "expected exit status 0, got exit status 1, stderr reports EROFS"]


def test_mismatch_namespace_setup_failure() -> None:
    assert mismatches(Expectation(), result(226)) == [
        "expected exit status 0, got exit status 226 (226/NAMESPACE: systemd could not set up the sandbox)"]


def test_mismatch_unexpected_signal() -> None:
    assert mismatches(Expectation(), result(None, SIGSYS)) == [
        "expected exit status 0, but it was killed by SIGSYS (seccomp: Bad system call)"]
    assert mismatches(Expectation(exit=None), result(None, SIGKILL)) == [
        "expected exit status any, but it was killed by SIGKILL"]


def test_mismatch_expected_signal() -> None:
    expect = Expectation(exit=None, signal="SIGSYS")
    assert mismatches(expect, result(0)) == ["expected to be killed by SIGSYS, but got exit status 0"]
    assert mismatches(expect, result(None, SIGKILL)) == ["expected to be killed by SIGSYS, but got killed by SIGKILL"]


def test_mismatch_output() -> None:
    expect = Expectation(exit=0, stdout="BEGIN PGP SIGNATURE", stderr="Good signature")
    assert mismatches(expect, result(0, stdout="nothing", stderr="BAD signature")) == [
        "expected stdout to contain 'BEGIN PGP SIGNATURE'",
        "expected stderr to contain 'Good signature'",
    ]


def test_mismatch_status_and_output_together() -> None:
    assert mismatches(Expectation(stdout="ok"), result(2, stdout="")) == [
        "expected exit status 0, got exit status 2", "expected stdout to contain 'ok'"]


def test_mismatch_did_not_finish() -> None:
    assert mismatches(Expectation(), result(None, None)) == ["expected exit status 0, got did not finish"]


@pytest.mark.parametrize("stderr", ["/bin/sh: 1: curl: not found", "bash: curl: command not found",
                                    "bash: line 1: curl: command not found"])
def test_a_command_missing_from_the_machine_gets_the_fix(stderr: str) -> None:
    from pytest_systemd_harden.search.scenarios import missing_command_hint

    assert missing_command_hint(result(127, stderr=stderr), "harden.yaml", inside=False) == \
        "hint: curl is not on the machine: add the Debian package that has it to machine.packages in harden.yaml"
    assert missing_command_hint(result(127, stderr=stderr), "harden.yaml", inside=True).endswith(  # type: ignore[union-attr]
        ", unless the hardening hides it (the diagnosis, if on, tells)")
    assert missing_command_hint(result(1, stderr=stderr), "harden.yaml", inside=False) is None
    assert missing_command_hint(result(127, stderr="gpg: not found: key 1234"), "harden.yaml", inside=False) is None
