"""The test suite's own guarantee: tests of one `xdist_group` run on one pytest-xdist worker (the shared trained
project takes one DVC command at a time; one Ray instance at a time), with the pinned pytest and xdist."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).with_name("conftest.py")

MODULE = """
import os, time
import pytest

def record(name):
    time.sleep(0.3)  # long enough for both workers to be handed tests
    with open(os.environ["GROUPS_OUT"], "a") as f:
        f.write(f"{name} {os.environ['PYTEST_XDIST_WORKER']}\\n")

@pytest.mark.xdist_group("shared")
@pytest.mark.parametrize("k", range(6))
def test_grouped(k):
    record("grouped")

@pytest.mark.parametrize("k", range(6))
def test_free(k):
    record("free")
"""

# The project's hook, loaded under another name (a conftest module named `conftest` cannot import its namesake).
SHIM = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("project_conftest", {str(CONFTEST)!r})
project = importlib.util.module_from_spec(spec)
spec.loader.exec_module(project)
pytest_collection_modifyitems = project.pytest_collection_modifyitems
"""


def test_a_group_runs_on_one_worker(tmp_path: Path) -> None:
    (tmp_path / "test_module.py").write_text(MODULE)
    (tmp_path / "conftest.py").write_text(SHIM)
    out = tmp_path / "workers.txt"
    cmd = [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider", "-q",
           "-o", "addopts=", str(tmp_path)]  # fmt: skip
    result = subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "GROUPS_OUT": str(out)}
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line.split() for line in out.read_text().splitlines()]
    grouped = {worker for name, worker in rows if name == "grouped"}
    assert len(rows) == 12 and len(grouped) == 1, rows
    assert len({worker for _, worker in rows}) == 2, rows  # the others do spread: two workers were in use
