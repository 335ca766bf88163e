"""Repeatable results, safe re-runs after a kill, and a hostile folder run through the whole pipeline."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import (
    ROOT,
    TF_CHATTER,
    TINY,
    dvc,
    env,
    git_status,
    make_dataset,
    make_project,
    run,
    update_params,
    write_hostile_files,
)

pytestmark = pytest.mark.slow

METRICS = ["metrics/prepare.json", "metrics/data.json", "metrics/ensemble.json", "plots/compare/summary.json"] + [
    f"metrics/backbones/{bb}.json" for bb in TINY["backbones"]
]


def metric_bytes(project: Path) -> dict[str, bytes]:
    return {m: (project / m).read_bytes() for m in METRICS}


def test_a_forced_rerun_changes_nothing_git_tracks_and_logs_no_tensorflow_chatter(copy_of: Path) -> None:
    """`dvc repro -f` reruns every stage; every output, dvc.lock included, comes out byte-identical. The rerun
    starts as a fresh clone does (no data/features/, no data/augmented/, no reuse cache) and with
    `features.cache: null`, so it also shows that a pass without the cache writes the bytes of one with it."""
    assert git_status(copy_of) == ""
    lock = (copy_of / "dvc.lock").read_bytes()
    for folder in (".imgclf-cache", "data/features", "data/augmented"):
        shutil.rmtree(copy_of / folder)
    update_params(copy_of, {"features.cache": None})  # not a dependency: the outputs must not change
    result = dvc(copy_of, "repro", "-f", environ={**env(copy_of), "IMGCLF_PROGRESS_SECONDS": "0"})
    assert git_status(copy_of) == " M params.yaml\n", "a forced rerun changed tracked files"
    assert (copy_of / "dvc.lock").read_bytes() == lock
    assert not (copy_of / ".imgclf-cache").exists()
    for bb in TINY["backbones"]:
        assert f"Running stage 'features@{bb}'" in result.stdout
        assert f"features@{bb}: " in result.stderr and " computed (" in result.stderr
        assert "0 reused from no cache (features.cache: null)" in result.stderr
    for chatter in TF_CHATTER:
        assert chatter not in result.stderr + result.stdout
    run_log = (copy_of / "logs" / "imgclf.log").read_text()
    assert "features@vgg16: done in" in run_log and "train@vgg16 epoch 1/" in run_log
    assert re.search(r"features@vgg16: \d+/\d+ images \(", run_log)  # progress lines, not only on a terminal


def test_unrelated_changes_rerun_only_what_reads_them(copy_of: Path) -> None:
    """An identical backbone pass changes nothing downstream; a note dropped into the data folder reruns
    prepare but no backbone pass; an override of one backbone's head reruns that backbone only."""
    out = dvc(copy_of, "repro", "-f", "features@mobilenet").stdout
    assert "Running stage 'features@mobilenet'" in out
    assert git_status(copy_of) == ""
    assert "Data and pipelines are up to date" in dvc(copy_of, "status").stdout

    (copy_of / "images" / "README.txt").write_text("scans exported 2024-05-01\n")
    out = dvc(copy_of, "repro").stdout
    assert "Running stage 'prepare'" in out
    for bb in TINY["backbones"]:
        assert f"Running stage 'features@{bb}'" not in out and f"Running stage 'train@{bb}'" not in out

    update_params(copy_of, {"train.overrides.mobilenet": {"dropout": 0.2}})
    status = dvc(copy_of, "status").stdout
    assert "train@mobilenet" in status and "train@vgg16" not in status and "features@mobilenet" not in status

    update_params(copy_of, {"split.val": 0.3})  # other images in each split, the same images in all
    assert "Running stage 'split'" in dvc(copy_of, "repro", "--single-item", "split").stdout
    status = dvc(copy_of, "status").stdout
    assert "features@" not in status and "augment@vgg16" in status  # only the training variants are stale


def test_the_checkouts_own_code_runs_whatever_else_is_importable(tmp_path: Path) -> None:
    """Two clones, one environment: `imgclf` importable from the first (as `pip install -e` does), a change in
    the second clone's imgclf/; `dvc repro` in the second runs the changed code."""
    project = make_project(tmp_path, {**TINY, "backbones": ["vgg16"]})
    make_dataset(project / "images", {"a": 6, "b": 6})
    data_py = project / "imgclf" / "data" / "scan.py"
    changed = data_py.read_text().replace('return f"found {found} files', 'return f"THIS CLONE found {found} files')
    data_py.write_text(changed)
    elsewhere = {**env(project), "PYTHONPATH": str(ROOT)}  # the other clone's imgclf on the import path
    result = dvc(project, "repro", "prepare", environ=elsewhere)
    assert "THIS CLONE found 12 files" in result.stderr


@pytest.mark.parametrize(
    ("stage", "marker"),
    [
        ("features@mobilenet", "data/features/.tmp-*-mobilenet"),  # made when the pass starts computing
        ("train@vgg16", "dvclive/train/.tmp-*-vgg16/plots/metrics/loss.tsv"),
    ],
)
def test_a_stage_killed_part_way_leaves_nothing_complete_and_repro_finishes_the_same(
    trained: Path, copy_of: Path, stage: str, marker: str
) -> None:
    shutil.rmtree(copy_of / ".imgclf-cache")  # the backbone pass computes (reused outputs would end it at once)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "-f", "-s", stage],  # the stage itself, at once
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

    leftovers = list(copy_of.glob(marker))  # the killed run's partial output, under its hidden .tmp- name
    assert leftovers, f"no partial output matching {marker} after the kill"
    dvc(copy_of, "repro")  # DVC may restore the stage's outputs from its cache rather than run it
    assert metric_bytes(copy_of) == metric_bytes(trained)
    assert "Data and pipelines are up to date" in dvc(copy_of, "status").stdout
    # The leftover is removed the next time the stage itself runs (a restore from the cache does not run it).
    dvc(copy_of, "repro", "-f", "-s", stage)
    assert not [p for p in leftovers if p.exists()], "the stage ran and left the killed run's temporary output"
    assert metric_bytes(copy_of) == metric_bytes(trained)


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
    assert (project / "metrics/backbones/vgg16.json").is_file() and (project / "plots/compare/summary.json").is_file()


def test_missing_data_root_stops_with_its_path(tmp_path: Path) -> None:
    project = make_project(tmp_path, {"data.root": "no_such_folder"})
    result = dvc(project, "repro", "prepare", check=False)
    assert result.returncode != 0
    assert "no_such_folder" in result.stderr and "Traceback" not in result.stderr
