"""Shared fixtures. `trained` is one tiny project run through the whole pipeline, once per test session."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import TINY, dvc, make_dataset, make_project, run


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    project = make_project(tmp_path_factory.mktemp("e2e"), TINY)
    make_dataset(project / "images", {"hbar": 16, "vbar": 12, "ring": 10}, size=40, rgb=True)
    dvc(project, "repro")
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline"], project)
    return project


@pytest.fixture
def copy_of(trained: Path, tmp_path: Path) -> Path:
    """A private copy (git, DVC cache and all) for a test that changes things."""
    target = tmp_path / "project"
    shutil.copytree(trained, target, symlinks=True)
    return target
