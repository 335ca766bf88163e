"""The Ray engine's overhead against the local one, on the same images: `features@` run as the pipeline runs it
(`python -m stages.features`, a fresh process), wall-clock, Ray's start-up included.

    python bench/ray_overhead.py     # the bundled sample (600 images) and 2,000 JPEGs of 512 px; ~10 minutes

On this machine's 2 cores a local Ray instance can only add cost (two workers share the cores the local engine
uses alone); what it costs is the question. Also checks that both engines wrote identical features.
Writes bench/results-ray.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))  # first: `bench` is bench/bench.py here, not the folder

RAY = {"address": "local", "workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 0}


def timed_stage(project: Path, backbone: str, out: str) -> float:
    from helpers import env

    cmd = [sys.executable, "-m", "stages.features", backbone, "--images", "data/split/images.csv", "--out-dir", out]
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=project, env=env(project), capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return time.perf_counter() - start


def case(name: str, root: Path, backbone: str, size: int, tmp: Path) -> dict:
    from helpers import dvc, make_project, update_params

    (tmp / f"project-{name.split()[0]}").mkdir()
    project = make_project(tmp / f"project-{name.split()[0]}", {
        "data.root": str(root), "backbones": [backbone], "features.image_size": size,
        "data.near_duplicates": "off",
    })  # fmt: skip
    dvc(project, "repro", "split")
    images = len((project / "data/split/images.csv").read_text().splitlines()) - 1
    local = timed_stage(project, backbone, "local")
    update_params(project, {"features.engine": "ray", "features.ray": RAY})
    on_ray = timed_stage(project, backbone, "ray")
    same = np.array_equal(np.load(project / "local/features.npy"), np.load(project / "ray/features.npy"))
    row = {
        "images": images, "backbone": backbone, "size": size, "local_s": round(local, 1), "ray_s": round(on_ray, 1),
        "overhead_s": round(on_ray - local, 1), "ratio": round(on_ray / local, 2), "identical": bool(same),
    }  # fmt: skip
    print(name, row, flush=True)
    return row


def main() -> None:
    from scale import jpegs

    from bench import machine

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder = tmp / "jpegs"
        for i, path in enumerate(jpegs(Path(tempfile.gettempdir()) / "imgclf-bench-jpegs-2000", 2000)):
            (folder / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
            (folder / f"c{i % 4}" / path.name).symlink_to(path)
        results = {
            "bundled sample, vgg16 96 px": case("sample vgg16", ROOT / "data/sample", "vgg16", 96, tmp),
            "2,000 JPEGs 512 px, mobilenet 224 px": case("jpegs mobilenet", folder, "mobilenet", 224, tmp),
        }
    (ROOT / "bench/results-ray.json").write_text(json.dumps({"machine": machine(), "ray": RAY, **results}, indent=2))
    print("| images | backbone, size | local s | ray s (2 workers) | overhead | identical |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} ({r['images']} unique) | {r['backbone']} {r['size']} px | {r['local_s']} | {r['ray_s']} | "
            f"+{r['overhead_s']} s ({r['ratio']}×) | {'yes' if r['identical'] else 'NO'} |"
        )


if __name__ == "__main__":
    main()
