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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that need the trained project last (the order is otherwise kept): with xdist, both workers start on
    independent tests, and the first to reach a trained test builds the project while the other still has work,
    instead of waiting two minutes for it. They are all marked slow (`-m "not slow"` leaves them out)."""
    items.sort(key=lambda item: "trained" in getattr(item, "fixturenames", ()))
    for item in items:  # a test of the trained project is an end-to-end test: never in the quick tier
        if "trained" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


def build_trained(folder: Path) -> Path:
    project = make_project(folder, TINY)
    make_dataset(project / "images", {"hbar": 16, "vbar": 12, "ring": 10}, size=40, rgb=True)
    dvc(project, "repro")
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline"], project)
    return project


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    if not hasattr(request.config, "workerinput"):  # one process (pytest -n 0)
        return build_trained(tmp_path_factory.mktemp("e2e"))
    shared = tmp_path_factory.getbasetemp().parent  # the same folder for every worker of this session
    with FileLock(str(shared / "trained.lock")):
        done, failed = shared / "trained.done", shared / "trained.failed"
        if failed.is_file():  # another worker's build failed: fail at once with its error, do not build again
            pytest.fail(f"building the trained project failed on another worker:\n{failed.read_text()}")
        if not done.is_file():
            folder = shared / "trained"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(exist_ok=True)
            try:
                build_trained(folder)
            except BaseException as exc:
                failed.write_text(str(exc)[-4000:])
                raise
            done.write_text("built\n")
        return shared / "trained" / "project"


@pytest.fixture
def copy_of(trained: Path, tmp_path: Path) -> Path:
    """A private copy (git, DVC cache and all) for a test that changes things."""
    target = tmp_path / "project"
    # .dvc/tmp holds DVC's lock and scratch files of commands that other workers may be running in `trained`
    shutil.copytree(trained, target, symlinks=True, ignore=lambda folder, _: ["tmp"] if folder.endswith(".dvc") else [])
    return target
