"""Head experiments side by side through DVC's queue, and the hand-over between machines through a DVC remote."""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import E2E_BACKBONES, dvc, git_status, run

pytestmark = pytest.mark.slow


def wait_for_queue(project: Path, timeout: float = 600) -> str:
    """Poll `dvc queue status` until no experiment is queued or running; its last output."""
    deadline = time.monotonic() + timeout
    while True:
        status = dvc(project, "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"the queue did not finish in {timeout} s:\n{status}")
        time.sleep(3)


def test_a_queued_sweep_runs_head_experiments_on_the_cached_features_and_keeps_the_winner(copy_of: Path) -> None:
    # A grid of two head experiments on one backbone: `+` adds the key to train.overrides.mobilenet ({} now).
    dvc(copy_of, "exp", "run", "--queue", "-S", "+train.overrides.mobilenet.lr=0.001,0.003")
    dvc(copy_of, "queue", "start", "--jobs", "2")
    status = wait_for_queue(copy_of)
    assert status.count("Success") == 2, status

    show = pd.read_csv(io.StringIO(dvc(copy_of, "exp", "show", "--csv").stdout), keep_default_na=False)
    experiments = show[show.typ.str.startswith("branch")].set_index("Experiment")  # branch_commit, branch_base
    lr = "train.overrides.mobilenet.lr"
    assert sorted(experiments[lr].astype(float)) == [0.001, 0.003]
    for column in ("metrics/backbones/mobilenet.json:val_accuracy", "metrics/ensemble.json:accuracy"):
        assert experiments[column].astype(float).between(0, 1).all()

    for name in experiments.index:  # each reran the head of mobilenet only, on the cached features
        log = dvc(copy_of, "queue", "logs", name).stdout
        assert "Running stage 'train@mobilenet'" in log, log[-2000:]
        assert "Running stage 'train@vgg16'" not in log
        for bb in E2E_BACKBONES:
            assert f"Running stage 'features@{bb}'" not in log and f"Running stage 'augment@{bb}'" not in log

    # The two experiments side by side on the same test images, by name, with their noise.
    first, second = experiments.index
    diff = run([sys.executable, "-m", "imgclf", "diff", first, second, "--md"], copy_of).stdout
    assert "| mobilenet |" in diff and "| ensemble |" in diff and "p (groups)" in diff, diff
    # The winner is chosen on validation (accuracy, then loss), never on a test number.
    ranked = experiments.assign(
        acc=experiments["metrics/ensemble.json:val_accuracy"].astype(float),
        loss=experiments["metrics/ensemble.json:val_loss"].astype(float),
    ).sort_values(["acc", "loss"], ascending=[False, True])
    winner = ranked.index[0]
    dvc(copy_of, "exp", "branch", winner, "winner")
    assert "winner" in run(["git", "branch"], copy_of).stdout
    dvc(copy_of, "exp", "apply", winner)
    assert f"lr: {experiments.loc[winner, lr]}" in (copy_of / "params.yaml").read_text()
    diff = dvc(copy_of, "metrics", "diff", "--all", "--md").stdout  # what a reviewer sees in the pull request
    for bb in E2E_BACKBONES:  # --all: the unchanged vgg16 too
        assert f"metrics/backbones/{bb}.json" in diff
    assert "metrics/ensemble.json" in diff
    dvc(copy_of, "queue", "stop")


def test_a_second_clone_pulls_everything_from_a_local_folder_remote_and_has_nothing_to_run(
    copy_of: Path, tmp_path: Path
) -> None:
    """The hand-over between machines, with a remote that needs no account: a folder."""
    remote = tmp_path / "dvc-remote"
    dvc(copy_of, "remote", "add", "-d", "shared", str(remote))
    run(["git", "commit", "-qam", "a DVC remote"], copy_of)
    assert "files pushed" in dvc(copy_of, "push").stdout

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(copy_of), str(clone)], tmp_path)
    assert not (clone / "models/vgg16/model.keras").exists()  # models and features live in the DVC cache
    dvc(clone, "pull")
    assert (clone / "models/vgg16/model.keras").is_file() and (clone / "data/features/mobilenet/features.npy").is_file()
    assert "Data and pipelines are up to date" in dvc(clone, "status").stdout
    assert "Running stage" not in dvc(clone, "repro").stdout
    assert git_status(clone) == ""
