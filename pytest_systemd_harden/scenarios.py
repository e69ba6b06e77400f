"""Running a spec's scenarios and explaining their failures."""

from __future__ import annotations

import signal
from dataclasses import dataclass

from .result import CommandResult
from .service import HardenedService, describe_hardening, indent
from .spec import Expectation, Scenario


def mismatches(expect: Expectation, result: CommandResult) -> list[str]:
    """How ``result`` differs from ``expect``; empty when the scenario passed."""
    found = []
    if expect.signal is not None:
        wanted = signal.Signals[expect.signal]
        if result.signal != wanted:
            found.append(f"expected to be killed by {expect.signal}, but got {result.status_text()}")
    elif result.signal is not None:
        found.append(f"expected exit status {expect.exit if expect.exit is not None else 'any'}, "
                     f"but it was {result.status_text()}")
    elif expect.exit is not None and result.exit_status != expect.exit:
        found.append(f"expected exit status {expect.exit}, got {result.status_text()}")
    if expect.stdout is not None and expect.stdout not in result.stdout:
        found.append(f"expected stdout to contain {expect.stdout!r}")
    if expect.stderr is not None and expect.stderr not in result.stderr:
        found.append(f"expected stderr to contain {expect.stderr!r}")
    return found


@dataclass(frozen=True)
class ScenarioOutcome:
    scenario: Scenario
    result: CommandResult
    problems: list[str]

    @property
    def passed(self) -> bool:
        return not self.problems


def run_scenario(service: HardenedService, scenario: Scenario) -> ScenarioOutcome:
    run = service.inside if scenario.where == "inside" else service.client
    result = run(scenario.command, scenario.timeout)
    return ScenarioOutcome(scenario, result, mismatches(scenario.expect, result))


def failure_report(service: HardenedService, outcome: ScenarioOutcome) -> str:
    """Everything needed to fix the unit: the command, how it ended, the service's state and journal, the hardening."""
    scenario = outcome.scenario
    where = f"{service.spec.path.name}:{scenario.line}" if scenario.line else service.spec.path.name
    lines = [f"scenario {scenario.name!r} failed under hardening ({where})"]
    lines += [f"  {problem}" for problem in outcome.problems]
    lines.append(f"expected: {scenario.expect.describe()}")
    lines.append(outcome.result.describe())
    lines.append(f"service {service.unit}: {service.state_text()}")
    lines.append(f"journal of {service.unit} (last lines):")
    lines.append(indent(service.journal() or "(empty)"))
    lines.append(f"hardening in force ({service.spec.path.name}):")
    lines.append(indent(describe_hardening(service.spec)))
    return "\n".join(lines)
