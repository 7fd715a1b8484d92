"""The tree is clean under the linter and the formatter configured in pyproject.toml ([tool.ruff])."""

import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

RUFF = [sys.executable, "-m", "ruff"]


@pytest.fixture(scope="module", autouse=True)
def ruff_installed():
    if subprocess.run([*RUFF, "--version"], capture_output=True).returncode and not shutil.which("ruff"):
        pytest.fail("ruff is not installed: bash scripts/setup.sh installs it with the test extras")


def test_ruff_check_is_clean():
    p = subprocess.run([*RUFF, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]


def test_ruff_format_changes_nothing():
    p = subprocess.run([*RUFF, "format", "--check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, "run `ruff format .`:\n" + p.stdout[-4000:]
