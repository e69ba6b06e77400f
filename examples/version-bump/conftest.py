"""Build the package under test before the spec is collected, as a maintainer's CI builds it before the tests.

The version built is $GREETER_VERSION (default 1.0); test_version_bump.py builds 1.0 and then 1.1 itself."""

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "package"))

from build_deb import build  # the package's own build script, found beside it


def pytest_configure(config: pytest.Config) -> None:
    """Build build/greeter_VERSION_all.deb unless a .deb is there already (a run of test_version_bump.py leaves
    its own)."""
    build_dir = HERE / "build"
    if not list(build_dir.glob("greeter_*.deb")):
        build(os.environ.get("GREETER_VERSION", "1.0"), build_dir)
