"""Shared fixtures. `trained` is one tiny project run through the whole pipeline, once per test session: with
pytest-xdist's workers, the first worker that needs it builds it under a file lock and the others use the same
folder. Tests that run DVC commands in it (DVC locks a repository for its commands) are in one xdist group,
`trained`, so they run one after another on one worker; a test that changes the project works on `copy_of`."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from filelock import FileLock

sys.path.insert(0, str(Path(__file__).parent))

from helpers import TINY, dvc, make_dataset, make_project, run


def build_trained(folder: Path) -> Path:
    project = make_project(folder, TINY)
    make_dataset(project / "images", {"hbar": 16, "vbar": 12, "ring": 10}, size=40, rgb=True)
    dvc(project, "repro")
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline"], project)
    return project


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    if not hasattr(request.config, "workerinput"):  # one process (no xdist, or -p no:xdist)
        return build_trained(tmp_path_factory.mktemp("e2e"))
    shared = tmp_path_factory.getbasetemp().parent  # the same folder for every worker of this session
    with FileLock(str(shared / "trained.lock")):
        done = shared / "trained.done"
        if not done.is_file():
            folder = shared / "trained"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build_trained(folder)
            done.write_text("built\n")
        return shared / "trained" / "project"


@pytest.fixture
def copy_of(trained: Path, tmp_path: Path) -> Path:
    """A private copy (git, DVC cache and all) for a test that changes things."""
    target = tmp_path / "project"
    shutil.copytree(trained, target, symlinks=True)
    return target
