"""Repeatable results, safe re-runs after a kill, and a hostile folder run through the whole pipeline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import TINY, dvc, env, make_dataset, make_project, run, write_hostile_files

pytestmark = pytest.mark.slow

METRICS = ["metrics/prepare.json", "metrics/data.json", "metrics/ensemble.json", "metrics/summary.json"] + [
    f"metrics/backbones/{bb}.json" for bb in TINY["backbones"]
]


def metric_bytes(project: Path) -> dict[str, bytes]:
    return {m: (project / m).read_bytes() for m in METRICS}


def test_repro_twice_gives_identical_metrics_files(trained: Path, copy_of: Path) -> None:
    dvc(copy_of, "repro", "-f")
    assert metric_bytes(copy_of) == metric_bytes(trained)
    for bb in TINY["backbones"]:
        path = f"plots/backbones/{bb}/predictions.csv"
        assert (copy_of / path).read_bytes() == (trained / path).read_bytes()


@pytest.mark.parametrize(
    ("stage", "marker"),
    [
        ("features@mobilenet", "data/features/.tmp-*-mobilenet/features.npy"),
        ("train@vgg16", "dvclive/train/.tmp-*-vgg16/plots/metrics/loss.tsv"),
    ],
)
def test_a_stage_killed_part_way_leaves_nothing_complete_and_repro_finishes_the_same(
    trained: Path, copy_of: Path, stage: str, marker: str
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "-f"],
        cwd=copy_of,
        env=env(copy_of),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill reaches the stage's python too
    )
    deadline = time.time() + 600
    while not list(copy_of.glob(marker)):
        assert proc.poll() is None, f"dvc repro ended before {stage} got going"
        assert time.time() < deadline, f"{stage} never started"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    final = {
        "features@mobilenet": copy_of / "data/features/mobilenet/features.npy",
        "train@vgg16": copy_of / "models/vgg16/model.keras",
    }[stage]
    assert not final.exists(), "a killed stage left an output that looks complete"
    assert stage in dvc(copy_of, "status").stdout

    dvc(copy_of, "repro")  # DVC may restore the stage from its run cache rather than rerun it
    assert metric_bytes(copy_of) == metric_bytes(trained)
    assert "Data and pipelines are up to date" in dvc(copy_of, "status").stdout
    # The killed run's partial file is only ever under a hidden .tmp- name, removed when the stage next runs.
    assert all(p.relative_to(copy_of).parts[-2].startswith(".tmp-") for p in copy_of.glob(marker))


def test_hostile_folder_runs_through_the_whole_pipeline(tmp_path: Path) -> None:
    project = make_project(tmp_path, {**TINY, "backbones": ["vgg16"], "data.max_pixels": 10_000})
    images = project / "images"
    make_dataset(images, {"cat": 14, "dog": 14}, size=40, rgb=True)
    written = write_hostile_files(images)  # into cat/ and dog/, plus a stray file at the top
    (images / "dog" / "conflict.png").write_bytes((images / "cat" / "cat_000.png").read_bytes())
    (images / "cat" / "duplicate.png").write_bytes((images / "cat" / "cat_001.png").read_bytes())
    os.symlink(images / "cat", images / "cat" / "loop")
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "hostile data"], project)

    result = dvc(project, "repro")

    manifest = pd.read_csv(project / "data/prepared/manifest.csv", keep_default_na=False)
    on_disk = {p.relative_to(images).as_posix() for p in images.rglob("*") if p.is_file() and "loop" not in p.parts}
    assert set(manifest.path) == on_disk and len(manifest) == len(on_disk)
    assert set(written) <= on_disk
    kept, skipped = (manifest.status == "ok").sum(), (manifest.status == "skipped").sum()
    assert f"found {len(manifest)} files: kept {kept}, skipped {skipped}" in result.stderr + result.stdout
    conflict = manifest.set_index("path").loc[["cat/cat_000.png", "dog/conflict.png"]]
    assert (conflict.status == "skipped").all() and conflict.reason.str.startswith("label conflict").all()
    splits = {s: pd.read_csv(project / f"data/split/{s}.csv") for s in ("train", "val", "test")}
    hashes = {s: set(df.sha256) for s, df in splits.items()}
    assert not (hashes["train"] & hashes["val"] or hashes["train"] & hashes["test"] or hashes["val"] & hashes["test"])
    assert sum(len(df) for df in splits.values()) == kept
    assert (project / "metrics/backbones/vgg16.json").is_file() and (project / "metrics/summary.json").is_file()


def test_missing_data_root_stops_with_its_path(tmp_path: Path) -> None:
    project = make_project(tmp_path, {"data.root": "no_such_folder"})
    result = dvc(project, "repro", "prepare", check=False)
    assert result.returncode != 0
    assert "no_such_folder" in result.stderr and "Traceback" not in result.stderr
