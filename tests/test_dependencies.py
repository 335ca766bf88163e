"""dvc.yaml's deps are exactly the code each stage runs: its script and every imgclf/ module it imports,
directly or through other imgclf/ modules (imports inside functions included). A missing module means a
code change that DVC would not rerun; an extra one reruns a stage (a backbone pass: an hour) for nothing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """imgclf modules a file imports anywhere in it: `import imgclf.x.y`, `from imgclf.x.y import z`, and
    `from imgclf.x import y` where y is a module or sub-package (then both imgclf.x and imgclf.x.y)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name == "imgclf" or a.name.startswith("imgclf.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "imgclf":
            found.add(node.module)
            base = ROOT.joinpath(*node.module.split("."))
            found |= {
                f"{node.module}.{a.name}"
                for a in node.names
                if (base / f"{a.name}.py").exists() or (base / a.name / "__init__.py").exists()
            }
    return found


def module_file(module: str) -> str:
    """imgclf.data.scan -> imgclf/data/scan.py; a package -> its __init__.py."""
    path = ROOT.joinpath(*module.split("."))
    return (path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(ROOT).as_posix()


def code_files(script: str) -> set[str]:
    """The script and every imgclf file it reaches through imports (importing a module runs the __init__.py of
    every package above it)."""
    todo, seen = [script], {script}
    while todo:
        for module in imported_modules(ROOT / todo.pop()):
            parts = module.split(".")
            for file in [module_file(".".join(parts[:i])) for i in range(1, len(parts))] + [module_file(module)]:
                if file not in seen:
                    seen.add(file)
                    todo.append(file)
    return seen


# The library's layers, lowest first: a module may import from its own layer and those below, never above.
LAYERS = ["core", "data", "features", "head", "results", "deploy"]


def layer(file: str) -> int:
    """imgclf/<layer>/... -> its rank; imgclf/__init__.py lowest; the top-level modules (params, lockcheck,
    __main__: configuration and the command line) highest."""
    parts = Path(file).parts
    if parts == ("imgclf", "__init__.py"):
        return -1
    return LAYERS.index(parts[1]) if len(parts) > 2 else len(LAYERS)


def test_no_module_imports_one_above_its_layer() -> None:
    upward = []
    for path in sorted((ROOT / "imgclf").rglob("*.py")):
        file = path.relative_to(ROOT).as_posix()
        for module in imported_modules(path):
            if layer(module_file(module)) > layer(file):
                upward.append(f"{file} imports {module}")
    assert not upward, upward


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_deps_list_exactly_the_code_it_imports(name: str) -> None:
    stage = stages()[name]
    stage = stage.get("do", stage)
    script = f"stages/{name}.py"
    assert f"python -m stages.{name}" in stage["cmd"], "stages run as modules, so they import this checkout's code"
    declared = {d for d in stage["deps"] if isinstance(d, str) and d.endswith(".py")}
    actual = code_files(script)
    assert not actual - declared, f"{name}: imported but not in deps: {sorted(actual - declared)}"
    assert not declared - actual, f"{name}: in deps but never imported: {sorted(declared - actual)}"


def test_the_import_scanner_sees_function_level_and_package_imports(tmp_path: Path) -> None:
    source = tmp_path / "x.py"
    source.write_text("import os\nfrom imgclf.core import io\n\ndef f():\n    from imgclf.head import model\n")
    assert imported_modules(source) == {"imgclf.core", "imgclf.core.io", "imgclf.head", "imgclf.head.model"}
    expected = {"imgclf/__init__.py", "imgclf/head/__init__.py", "imgclf/head/model.py"}
    assert expected <= code_files("stages/train.py")  # a package's __init__.py runs before its module


def test_features_does_not_depend_on_the_data_folder_balancing_or_the_head() -> None:
    deps = set(stages()["features"]["do"]["deps"])
    assert "${data.root}" not in deps and "${balanced_csv}" not in deps
    assert not any(d.startswith(("imgclf/head/", "imgclf/results/")) for d in deps)
    assert "${split_dir}/images.csv" in deps and "${split_dir}/train.csv" not in deps  # not the split ratios


def test_features_tracks_every_features_key_that_shapes_the_numbers_but_not_where_the_pass_runs() -> None:
    """A features key added later must be tracked (or consciously left out here): engine and ray only say where
    the pass runs, cache only whether earlier outputs are reused (the same bytes: test_incremental.py); each
    backbone tracks its own precision override."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    tracked = {p for p in stages()["features"]["do"]["params"] if isinstance(p, str) and p.startswith("features")}
    expected = {
        f"features.{key}" for key in params["features"] if key not in ("engine", "ray", "cache", "precision_overrides")
    }
    assert tracked == expected | {"features.precision_overrides.${item}"}


def test_augment_depends_on_the_extractor_it_reads_not_on_the_features() -> None:
    deps = set(stages()["augment"]["do"]["deps"])
    assert "${features_dir}/${item}" not in deps  # features.npy changes with every new image
    assert {"${features_dir}/${item}/extractor.keras", "${features_dir}/${item}/extractor.json"} <= deps


def test_every_stage_that_decodes_images_tracks_every_image_recipe_key() -> None:
    """A field added to ImageRecipe must be tracked wherever images are decoded (dvc.yaml's *image_recipe)."""
    from dataclasses import fields

    from imgclf.data.images import ImageRecipe

    recipe = {f"data.{f.name}" for f in fields(ImageRecipe)} | {"data.root"}
    for name in ("eda", "features", "augment", "train", "evaluate"):
        stage = stages()[name].get("do", stages()[name])
        tracked = {
            p for entry in stage["params"] for p in ([entry] if isinstance(entry, str) else entry["params.yaml"])
        }
        assert recipe <= tracked, f"{name} does not track {sorted(recipe - tracked)}"
    prepare = set(stages()["prepare"]["params"])  # decodes at full size: jpeg_scaling does not apply
    assert recipe - {"data.jpeg_scaling"} <= prepare
