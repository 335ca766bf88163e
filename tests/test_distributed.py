"""features.engine: ray runs the same backbone pass on a Ray cluster: the same files, bit for bit on CPU, and
one-line errors in the user's terms. The cluster here is a local Ray instance with two workers."""

from __future__ import annotations

import builtins
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY, dvc, env, make_dataset, make_project, update_params

from imgclf.errors import UserError

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray", reason="the Ray engine's tests need `pip install -r requirements-ray.txt`")

RAY = {"address": "local", "workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 0}


def features_stage(project: Path, out: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "stages.features", "mobilenet", "--images", "data/split/images.csv", "--out-dir", out]
    return subprocess.run(cmd, cwd=project, env=env(project), capture_output=True, text=True)


def test_the_ray_engine_writes_the_local_engines_features_bit_for_bit(tmp_path: Path) -> None:
    project = make_project(tmp_path, {**TINY, "backbones": ["mobilenet"], "features.batch_size": 8})
    make_dataset(project / "images", {"hbar": 14, "vbar": 12, "ring": 10}, size=40, rgb=True)
    dvc(project, "repro", "features@mobilenet")  # the local engine, as the pipeline runs it
    local = project / "data/features/mobilenet"

    update_params(project, {"features.engine": "ray", "features.ray": RAY})
    result = features_stage(project, "ray_features")
    assert result.returncode == 0, result.stderr
    remote = project / "ray_features"
    assert np.array_equal(np.load(remote / "features.npy"), np.load(local / "features.npy"))  # 36 images, 5 batches
    for name in ("features.npy", "index.csv", "info.json", "extractor.keras"):
        assert (remote / name).read_bytes() == (local / name).read_bytes(), name
    assert "float32, ray at local, 2 workers)" in (project / "logs/imgclf.log").read_text()
    assert "Traceback" not in result.stderr and "WARNING" not in result.stderr and "core_worker" not in result.stderr
    # Where the pass runs is not a dependency: switching the engine leaves features@ up to date.
    assert "features@mobilenet" not in dvc(project, "status", "features@mobilenet").stdout

    # A worker that cannot read an image: one line naming the file and the shared-filesystem requirement.
    victim = sorted((project / "images/ring").glob("*.png"))[0]
    victim.unlink()
    result = features_stage(project, "ray_features_2")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(error) == 1, result.stderr[-3000:]
    assert victim.name in error[0] and "shared filesystem" in error[0]
    assert not (project / "ray_features_2").exists()  # nothing half-written


def test_ray_not_installed_is_one_line_with_the_install_command(monkeypatch) -> None:
    from imgclf.distributed import import_ray

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(UserError, match=r"Ray is not installed; install it with `pip install -r requirements-ray.txt`"):
        import_ray()


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("127.0.0.1:9", "cannot reach the Ray cluster at 127.0.0.1:9"),
        ("ray://127.0.0.1:9", "cannot reach the Ray cluster at ray://127.0.0.1:9"),
        ("my-head-node", "is not local, auto, host:port"),
    ],
)
def test_an_unreachable_cluster_is_reported_in_seconds(address: str, message: str) -> None:
    from imgclf.distributed import check_reachable

    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        check_reachable(address)
