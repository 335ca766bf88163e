"""`imgclf verify` and `imgclf diff` on a constructed repository: committed predictions at one revision,
changed ones in the workspace. The three verdicts, the refusal of unpaired test sets, experiment refs, and the
result paths matching dvc.yaml."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from imgclf.__main__ import main
from imgclf.core.errors import UserError
from imgclf.results.evaluation import write_predictions
from imgclf.results.experiments import (
    BEYOND,
    DIFFERENT_PREDICTIONS,
    IDENTICAL,
    RESULT_FILES,
    WITHIN,
    judge_all,
    verify_verdicts,
)

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "eel"]
N = 150
PLATFORM = {"features": None, "train": {"cpu_vendor": "GenuineIntel", "cpu_flags": ["avx512f", "amx_bf16"],
                                        "gpus": [], "tensorflow": "2.21.0"}}  # fmt: skip


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def write_model(repo: Path, model: str, predicted: np.ndarray, actual: np.ndarray, paths: list[str]) -> None:
    probs = np.full((len(predicted), len(CLASSES)), 0.1)
    probs[np.arange(len(predicted)), predicted] = 0.8
    if model == "ensemble":
        pred_path, metrics_path = repo / "plots/ensemble/predictions.csv", repo / "metrics/ensemble.json"
    else:
        pred_path, metrics_path = (
            repo / f"plots/backbones/{model}/predictions.csv",
            repo / f"metrics/backbones/{model}.json",
        )
        (repo / f"plots/backbones/{model}").mkdir(parents=True, exist_ok=True)
        (repo / f"plots/backbones/{model}/model.json").write_text(json.dumps({"platform": PLATFORM}))
    groups = [p.split("_")[0] for p in paths]  # pairs of images share a group
    labels = list(np.asarray(CLASSES)[actual])
    write_predictions(pred_path, paths, labels, probs, CLASSES, groups)
    accuracy = float(np.mean(predicted == actual))
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps({"accuracy": accuracy, "accuracy_low": accuracy - 0.05,
                                        "accuracy_high": accuracy + 0.05}))  # fmt: skip


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, np.ndarray, list[str], dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    actual = rng.integers(0, 3, N)
    paths = [f"g{i // 2:03d}_{i}.png" for i in range(N)]
    predicted = {m: np.where(rng.random(N) < 0.85, actual, (actual + 1) % 3) for m in ("m1", "m2", "ensemble")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"backbones": ["m1", "m2"]}))
    for model, pred in predicted.items():
        write_model(tmp_path, model, pred, actual, paths)
    for trained in ("models/m1/model.keras", "models/m2/model.keras", "models/ensemble.json"):  # a rerun's models
        (tmp_path / trained).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / trained).write_bytes(b"a trained model")
    git(tmp_path, "init", "-q")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results")
    return tmp_path, actual, paths, predicted


def flipped(pred: np.ndarray, actual: np.ndarray, count: int, make_wrong: bool = True) -> np.ndarray:
    """`count` images changed: the first right ones made wrong (or the last wrong ones made right)."""
    out = pred.copy()
    pick = np.flatnonzero(pred == actual)[:count] if make_wrong else np.flatnonzero(pred != actual)[-count:]
    out[pick] = (actual[pick] + 1) % 3 if make_wrong else actual[pick]
    return out


def verdicts(repo: Path, a: str = "HEAD", b: str = "workspace") -> dict[str, str]:
    judgements, _ = judge_all(a, b, alpha=0.05, resamples=300, confidence=0.95, seed=0, root=repo)
    return {j.model: j.verdict for j in judgements}


def test_verify_gives_each_of_the_three_verdicts(repo, monkeypatch, capsys) -> None:
    path, actual, paths, predicted = repo
    monkeypatch.chdir(path)
    assert verdicts(path) == {"m1": IDENTICAL, "m2": IDENTICAL, "ensemble": IDENTICAL}
    assert main(["verify"]) == 0
    assert "overall: identical" in capsys.readouterr().out
    # Another CPU type: two of 150 images flip each way in m1 (the measured Intel/AMD size of change).
    write_model(path, "m1", flipped(flipped(predicted["m1"], actual, 2), actual, 2, make_wrong=False), actual, paths)
    assert verdicts(path)["m1"] == WITHIN
    assert main(["verify"]) == 0
    out = capsys.readouterr().out
    assert "overall: reproduced within noise" in out and "GenuineIntel (avx512f amx_bf16)" in out
    # A crippled m2: 40 right answers become wrong.
    write_model(path, "m2", flipped(predicted["m2"], actual, 40), actual, paths)
    assert verdicts(path) == {"m1": WITHIN, "m2": BEYOND, "ensemble": IDENTICAL}
    assert main(["verify", "--against", "HEAD"]) == 1
    assert "overall: differs beyond noise" in capsys.readouterr().out


def test_diff_reports_changes_with_paired_intervals_and_markdown(repo, monkeypatch, capsys) -> None:
    path, actual, paths, predicted = repo
    monkeypatch.chdir(path)
    write_model(path, "m2", flipped(predicted["m2"], actual, 40), actual, paths)
    assert main(["diff", "HEAD", "workspace", "--md"]) == 0
    out = capsys.readouterr().out
    m2 = next(line for line in out.splitlines() if line.startswith("| m2 |"))
    cells = [c.strip() for c in m2.strip("|").split("|")]
    assert cells[7:9] == ["40", "0"]  # right→wrong, wrong→right
    low, high = (float(x) for x in cells[3].split("[")[1].rstrip("]").split(","))
    assert high < 0 and low <= -40 / N + 1e-9 <= high
    assert cells[-1] == "beyond noise"
    assert "75 groups resampled" in out  # the group column, not single images
    assert "| m2 | " in out.split("Per class")[1]


def test_sides_with_different_test_sets_are_refused(repo, monkeypatch) -> None:
    path, actual, paths, predicted = repo
    write_model(path, "m1", predicted["m1"][:-1], actual[:-1], paths[:-1])
    with pytest.raises(UserError, match=r"m1: the test sets differ \(1 images only in HEAD, 0 only in workspace"):
        verdicts(path)
    write_model(path, "m1", predicted["m1"], (actual + 1) % 3, paths)
    with pytest.raises(UserError, match="other labels in workspace"):
        verdicts(path)
    monkeypatch.chdir(path)
    assert main(["diff", "HEAD", "no-such-thing"]) == 2


def test_an_experiment_name_resolves_to_its_ref(repo) -> None:
    path, actual, paths, predicted = repo
    write_model(path, "m1", flipped(predicted["m1"], actual, 50), actual, paths)
    git(path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "exp")
    baseline = git(path, "rev-parse", "HEAD~1").strip()
    git(path, "update-ref", f"refs/exps/{baseline[:2]}/{baseline[2:]}/crippled-head", "HEAD")  # as DVC stores it
    git(path, "reset", "-q", "--hard", "HEAD~1")
    assert verdicts(path, "HEAD", "crippled-head")["m1"] == BEYOND


def test_result_paths_are_the_ones_dvc_yaml_declares() -> None:
    text = (ROOT / "dvc.yaml").read_text()
    for backbone_path, ensemble_path in RESULT_FILES.values():
        assert backbone_path.replace("{m}", "${item}") in text
        assert ensemble_path is None or ensemble_path in text


def test_the_threshold_is_corrected_for_the_number_of_models(repo) -> None:
    """6 images of 6 different groups flipped one way and none the other: p = 2 / 2^6 = 0.031, below 0.05 but
    above 0.05 / 3 (three models judged): within noise. Without the correction it would be a false alarm."""
    path, actual, paths, predicted = repo
    pred, used = predicted["m1"].copy(), set()
    for i in np.flatnonzero(pred == actual):
        if i // 2 not in used and len(used) < 6:  # pairs of images share a group (write_model)
            used.add(i // 2)
            pred[i] = (actual[i] + 1) % 3
    write_model(path, "m1", pred, actual, paths)
    judgements, _ = judge_all("HEAD", "workspace", 0.05, 200, 0.95, 0, root=path)
    m1 = next(j for j in judgements if j.model == "m1")
    assert m1.comparison.p_value == pytest.approx(2 / 2**6) and m1.verdict == WITHIN
    judgements, _ = judge_all("HEAD", "workspace", 0.2, 200, 0.95, 0, root=path)  # 0.2 / 3 = 0.067 > 0.031
    assert next(j for j in judgements if j.model == "m1").verdict == BEYOND


def test_interval_membership_and_an_old_revision_without_groups(repo) -> None:
    path, actual, paths, predicted = repo
    # An old commit: predictions without the group column (resampled by image), and an accuracy interval.
    old = path / "plots/backbones/m1/predictions.csv"
    old.write_text("\n".join(",".join(c for i, c in enumerate(line.split(",")) if i != 2)
                             for line in old.read_text().splitlines()) + "\n")  # fmt: skip
    git(path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "old format")
    write_model(path, "m1", flipped(predicted["m1"], actual, 12), actual, paths)  # 8 points below: outside ±5
    judgements, _ = judge_all("HEAD", "workspace", 0.05, 200, 0.95, 0, root=path)
    m1 = next(j for j in judgements if j.model == "m1")
    assert m1.in_interval is False and m1.resampled == "groups"  # the workspace side has groups
    assert next(j for j in judgements if j.model == "m2").in_interval is True


def test_verify_refuses_a_workspace_with_other_backbones_and_diff_notes_them(repo, monkeypatch, capsys) -> None:
    path, *_ = repo
    monkeypatch.chdir(path)
    (path / "params.yaml").write_text(yaml.safe_dump({"backbones": ["m1"]}))
    assert main(["verify"]) == 2
    assert "not a run of HEAD's pipeline (m2: only in HEAD" in capsys.readouterr().err
    assert main(["diff", "HEAD", "workspace"]) == 0
    out = capsys.readouterr().out
    assert "note: m2: only in HEAD" in out and "note: ensemble: not compared" in out
    (path / "params.yaml").write_text(yaml.safe_dump({"backbones": ["m3"]}))
    assert main(["diff", "HEAD", "workspace"]) == 2
    assert "share no backbone" in capsys.readouterr().err


def test_an_experiment_name_on_two_baselines_is_ambiguous_and_dvc_machinery_refs_are_not_names(repo) -> None:
    path, *_ = repo
    head = git(path, "rev-parse", "HEAD").strip()
    git(path, "update-ref", "refs/exps/exec/EXEC_HEAD", head)
    with pytest.raises(UserError, match="neither a git revision nor an experiment name"):
        judge_all("HEAD", "EXEC_HEAD", 0.05, 10, 0.95, 0, root=path)
    other = "f" * 40
    git(path, "update-ref", f"refs/exps/{head[:2]}/{head[2:]}/twin", head)
    git(path, "update-ref", f"refs/exps/{other[:2]}/{other[2:]}/twin", head)
    assert judge_all("HEAD", "twin", 0.05, 10, 0.95, 0, root=path)[0]  # the one on HEAD's baseline
    git(path, "update-ref", "-d", f"refs/exps/{head[:2]}/{head[2:]}/twin")
    git(path, "update-ref", f"refs/exps/{'e' * 2}/{'e' * 38}/twin", head)
    with pytest.raises(UserError, match="experiment name 'twin' is ambiguous"):
        judge_all("HEAD", "twin", 0.05, 10, 0.95, 0, root=path)


def test_verify_needs_agreement_too_and_says_when_nothing_was_rerun(repo, monkeypatch, capsys) -> None:
    """30 images flip right to wrong and 30 wrong to right: the same accuracy (p = 1), but 60 of 150 predictions
    changed, far more than another CPU type changes (agreement 0.89 at the lowest, measured)."""
    path, actual, paths, predicted = repo
    monkeypatch.chdir(path)
    churned = predicted["m1"].copy()
    right, wrong = np.flatnonzero(churned == actual)[:30], np.flatnonzero(churned != actual)[:30]
    churned[right], churned[wrong] = (actual[right] + 1) % 3, actual[wrong]
    write_model(path, "m1", churned, actual, paths)
    judgements, _ = judge_all("HEAD", "workspace", alpha=0.05, resamples=300, confidence=0.95, seed=0, root=path)
    m1 = next(j for j in judgements if j.model == "m1")
    assert m1.verdict == WITHIN and m1.comparison.p_value > 0.5 and m1.comparison.agreement == pytest.approx(0.6)
    assert {j.model: j.verdict for j in verify_verdicts(judgements, 0.85, path)}["m1"] == DIFFERENT_PREDICTIONS
    assert {j.model: j.verdict for j in verify_verdicts(judgements, 0.55, path)}["m1"] == WITHIN  # the flag
    assert main(["verify"]) == 1
    assert "overall: same accuracy, different predictions" in capsys.readouterr().out
    assert main(["verify", "--min-agreement", "0.55"]) == 0
    capsys.readouterr()
    # A fresh clone where dvc repro never ran: the committed results are REV's own, nothing was reproduced.
    git(path, "checkout", "-q", ".")
    for trained in ("models/m1/model.keras", "models/m2/model.keras", "models/ensemble.json"):
        (path / trained).unlink()
    assert main(["verify"]) == 0
    out = capsys.readouterr().out
    assert "overall: not rerun here" in out
    assert "not rerun here (no trained model in this workspace): m1, m2, ensemble" in out
    with pytest.raises(UserError, match="--min-agreement=0"):
        verify_verdicts(judgements, 0, path)


def test_a_difference_is_never_hidden_as_not_rerun(repo, monkeypatch, capsys) -> None:
    """Without trained models in the workspace, results that differ from REV's keep their verdict."""
    path, actual, paths, predicted = repo
    monkeypatch.chdir(path)
    for trained in ("models/m1/model.keras", "models/m2/model.keras", "models/ensemble.json"):
        (path / trained).unlink()
    write_model(path, "m2", flipped(predicted["m2"], actual, 40), actual, paths)
    assert main(["verify"]) == 1
    out = capsys.readouterr().out
    assert (
        "overall: differs beyond noise" in out
        and "not rerun here (no trained model in this workspace): m1, ensemble" in out
    )
