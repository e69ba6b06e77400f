"""A version bump, as CI meets it: the suite passes on greeter 1.0 and records a baseline; 1.1 counts visits in a
file its shipped unit gives it no place for, and the baseline run names the regression beside the bump."""

import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "package"))

from build_deb import build


def run_suite(project: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", str(project / "harden.yaml"), "-p", "no:cacheprovider",
                           "--harden-require-backend", "--harden-diagnose=off",
                           f"--harden-baseline={project / 'baseline.yaml'}", *options],
                          cwd=project, capture_output=True, text=True, timeout=900, check=False)


def test_the_baseline_notices_the_bump_and_the_regression_it_brought(tmp_path: Path) -> None:
    project = tmp_path / "greeter"
    shutil.copytree(HERE, project, ignore=shutil.ignore_patterns("build", "__pycache__", "test_*.py"))
    (project / "baseline.yaml").write_text("specs: {}\n")

    build("1.0", project / "build")
    first = run_suite(project, "--harden-baseline-update")
    assert first.returncode == 0, first.stdout
    assert "greeter 1.0" in first.stdout  # the summary's "tested" line names the version under test
    assert "package greeter: '1.0'" in (project / "baseline.yaml").read_text()

    for old in (project / "build").glob("*.deb"):
        old.unlink()
    build("1.1", project / "build")
    bumped = run_suite(project)
    assert bumped.returncode == 1, bumped.stdout
    assert "scenario 'says hello' passed in the baseline, now it fails" in bumped.stdout
    assert "package greeter 1.0 -> 1.1" in bumped.stdout
