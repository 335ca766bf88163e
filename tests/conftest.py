"""Shared fixtures. `trained` is one tiny project run through the whole pipeline, once per test session. Its
build starts in the background as soon as collection shows that a selected test needs it (the first pytest-xdist
worker to get there starts it), so that it runs while the workers take the independent tests instead of one
worker building it while the other waits. Tests that run DVC commands in it (DVC locks a repository for its
commands) are in one xdist group, `trained`, so they run one after another on one worker; a test that changes
the project works on `copy_of`."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import TINY, dvc, make_dataset, make_project, run

BUILD_TIMEOUT = 1800  # seconds: the build takes one to two minutes on 2 cores


def build_trained(folder: Path) -> Path:
    project = make_project(folder, TINY)
    make_dataset(project / "images", {"hbar": 16, "vbar": 12, "ring": 10}, size=40, rgb=True)
    dvc(project, "repro")
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline"], project)
    return project


def build_in_background(shared: str) -> None:
    """The background build's body (run as `python -c`): the project under shared/trained, then `trained.done`,
    or `trained.failed` with the error."""
    shared_dir = Path(shared)
    try:
        (shared_dir / "trained").mkdir()
        build_trained(shared_dir / "trained")
    except BaseException as exc:
        write_marker(shared_dir / "trained.failed", str(exc)[-4000:] or repr(exc))
        raise
    write_marker(shared_dir / "trained.done", "built\n")


def write_marker(path: Path, text: str) -> None:
    """Write a marker whole or not at all (a poller never reads it half-written)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def shared_folder(config: pytest.Config) -> Path:
    """The session's folder for the trained project: the same for every xdist worker (their base temporary
    folders are siblings), the base temporary folder without xdist."""
    base = config._tmp_path_factory.getbasetemp()
    return base.parent if hasattr(config, "workerinput") else base


def start_build(shared: Path) -> None:
    """Start the build unless this session already has: an exclusive create of `trained.claimed` decides which
    worker does; `trained.started` then holds the builder's pid, written whole."""
    try:
        os.close(os.open(shared / "trained.claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import conftest; "
    code += "conftest.build_in_background(sys.argv[1])"
    try:
        with (shared / "trained.log").open("wb") as log:
            builder = subprocess.Popen(
                [sys.executable, "-c", code, str(shared)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
    except BaseException as exc:  # the waiting fixtures fail with this at once instead of at the timeout
        write_marker(shared / "trained.failed", f"could not start the build: {exc!r}")
        raise
    write_marker(shared / "trained.started", str(builder.pid))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The order in which xdist hands tests out (schedule_order; otherwise as collected). The tests of the trained
    project are all marked slow (`-m "not slow"` leaves them out).

    And `--dist loadgroup`'s groups: pytest-xdist 3.8 names a test `<id>@<group>` for its scheduler by setting
    `item._nodeid`, which pytest 9.2 no longer reads (a test's id is `item._id` now), so every test of a group
    could run on any worker: two DVC commands at once in the shared project, two Ray instances at once. Done here
    the way pytest 9.2 reads it (tests/test_xdist_groups.py checks that the groups hold)."""
    items.sort(key=schedule_order)  # with --no-loadscope-reorder, xdist hands tests out in this order
    for item in items:  # a test of the trained project is an end-to-end test: never in the quick tier
        if "trained" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    if getattr(config.option, "loadgroup", False):
        for item in items:
            marks = item.iter_markers("xdist_group")
            names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in marks})
            suffix = f"@{'_'.join(names)}"
            if names and not item.nodeid.endswith(suffix):
                set_nodeid(item, item.nodeid + suffix)


def schedule_order(item: pytest.Item) -> int:
    """0: the `ray` group, the longest chain of tests (about five minutes on 2 cores, much of it waiting for Ray
    to start), first: its worker waits for the build while the builder has that core, then runs it beside
    everything else. 1: the independent tests, while the project builds. 2: the other tests of the trained
    project and the groups that hold them (a group goes to a worker whole, from its first test on)."""
    group = item.get_closest_marker("xdist_group")
    if group is not None and (group.args or ("",))[0] == "ray":
        return 0
    return 2 if "trained" in getattr(item, "fixturenames", ()) or group is not None else 1


def set_nodeid(item: pytest.Item, nodeid: str) -> None:
    """A test's id as pytest reports it and xdist schedules it (pytest 9.2's `_id`; `_nodeid` before)."""
    if hasattr(item, "_id"):
        from _pytest.nodeid import coerce_node_id

        item._id = coerce_node_id(nodeid)
    else:
        item._nodeid = nodeid


def pytest_collection_finish(session: pytest.Session) -> None:
    """After selection (-m, -k): start building the trained project if a selected test needs it (not for
    `--collect-only`, which runs no test)."""
    if session.config.option.collectonly:
        return
    if any("trained" in getattr(item, "fixturenames", ()) for item in session.items):
        start_build(shared_folder(session.config))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The controller (or the only process) stops a build still running when the session ends (interrupted, or
    the tests that needed it failed early): no stray `dvc repro` outlives a pytest that ends normally or by
    Ctrl-C. (A pytest killed outright leaves it to finish on its own, a minute or two.)"""
    if hasattr(session.config, "workerinput") or session.config._tmp_path_factory._basetemp is None:
        return  # a worker, or a session that never made its temporary folder (so started no build)
    shared = shared_folder(session.config)
    if (shared / "trained.done").is_file() or (shared / "trained.failed").is_file():
        return  # ended: its pid may belong to another process by now
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        pid = int((shared / "trained.started").read_text())
        if builder_alive(pid):
            os.killpg(pid, signal.SIGKILL)  # its own process group: the builder, dvc and the stage it runs


def builder_alive(pid: int) -> bool:
    """Whether the builder process still runs (a zombie, ended but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


@pytest.fixture(scope="session")
def trained(request: pytest.FixtureRequest) -> Path:
    shared = shared_folder(request.config)
    start_build(shared)  # started at collection; here only if collection did not (a plugin reordering, say)
    done, failed, started = shared / "trained.done", shared / "trained.failed", shared / "trained.started"
    deadline = time.monotonic() + BUILD_TIMEOUT
    while not done.is_file():
        if failed.is_file():  # fail at once with the build's error, do not build again
            pytest.fail(f"building the trained project failed:\n{failed.read_text()}")
        pid = started.read_text() if started.is_file() else ""
        if pid and not builder_alive(int(pid)) and not done.is_file():
            log = (shared / "trained.log").read_text(errors="replace")[-4000:]
            pytest.fail(f"the trained project's build ended without finishing:\n{log}")
        if time.monotonic() > deadline:
            pytest.fail(f"the trained project was not built in {BUILD_TIMEOUT} s; see {shared / 'trained.log'}")
        time.sleep(0.5)
    return shared / "trained" / "project"


@pytest.fixture
def copy_of(trained: Path, tmp_path: Path) -> Path:
    """A private copy (git, DVC cache and all) for a test that changes things."""
    target = tmp_path / "project"
    # .dvc/tmp holds DVC's lock and scratch files of commands that other workers may be running in `trained`
    shutil.copytree(trained, target, symlinks=True, ignore=lambda folder, _: ["tmp"] if folder.endswith(".dvc") else [])
    return target
