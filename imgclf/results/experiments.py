"""Judge results across revisions: `imgclf verify` (is this a reproduction of REV?) and `imgclf diff A B` (did a
change do more than chance?), both on the committed test predictions, paired image by image.

A side is a git revision, an experiment name from `dvc exp show` (a ref under refs/exps), or `workspace`. A
revision's files are read with `git show REV:path`, so no DVC cache is needed: the predictions, metrics and
model records are committed in git.

Decision rule (both commands): a model *differs beyond noise* when the exact sign-flip test over the test
split's groups (significance.grouped_sign_flip: each group's B-only minus A-only right images, the unit the
bootstrap intervals resample too; exact McNemar when every group is one image) gives p < alpha / m, where m is
the number of models judged together (Bonferroni; alpha = 0.05 by default). Under the null (both sides equally
accurate) the chance that any of the m models is flagged is at most alpha, whatever the correlation between
models: a false alarm in at most 1 run of `verify` in 20. The exact test is conservative (its true rate is
below alpha). Otherwise *within noise*; *identical* when the committed
predictions and metrics are the same bytes on both sides.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from imgclf.core.errors import UserError
from imgclf.core.io import TEXT_COLUMNS
from imgclf.results.significance import PairedComparison, paired_bootstrap

WORKSPACE = "workspace"
ENSEMBLE = "ensemble"
IDENTICAL, WITHIN, BEYOND = "identical", "reproduced within noise", "differs beyond noise"
DIFFERENT_PREDICTIONS = "same accuracy, different predictions"  # verify: agreement below --min-agreement
NOT_RERUN = "not rerun here"  # verify: the workspace holds REV's committed results, no model of its own
# verify's default bound on the share of test images whose predicted class is the same on both sides. Measured
# across three CPU types on the bundled sample (89 test images, docs/reproduce.md): 0.888 to 1.0 per model
# (Xception lowest); 0.85 leaves a margin of about 3 images below the lowest.
MIN_AGREEMENT = 0.85
SEVERITY = [IDENTICAL, NOT_RERUN, WITHIN, DIFFERENT_PREDICTIONS, BEYOND]  # overall: the worst model's verdict
# Where each model's committed results are; the same paths as dvc.yaml's evaluate and compare stages
# (tests/test_verify_diff.py checks that they agree).
RESULT_FILES = {
    "predictions": ("plots/backbones/{m}/predictions.csv", "plots/ensemble/predictions.csv"),
    "metrics": ("metrics/backbones/{m}.json", "metrics/ensemble.json"),
    "model": ("plots/backbones/{m}/model.json", None),
}
EXPERIMENT_REF = re.compile(r"refs/exps/[0-9a-f]{2}/[0-9a-f]{38}/[^/]+")
# The flags shown for a platform: the ones that told the measured Intel and AMD machines apart.
SHOWN_FLAGS = ("avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16")


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, check=False)


def repository_root(start: Path | None = None) -> Path:
    found = _git(start or Path.cwd(), "rev-parse", "--show-toplevel")
    if found.returncode:
        raise UserError(f"{start or Path.cwd()} is not inside a git repository; run this in the project's clone")
    return Path(found.stdout.decode().strip())


@dataclass(frozen=True)
class Side:
    """One side of a comparison: the workspace, or a commit (a revision or an experiment's ref)."""

    name: str
    root: Path
    commit: str | None  # None: the workspace

    @classmethod
    def resolve(cls, spec: str, root: Path) -> Side:
        if spec == WORKSPACE:
            return cls(spec, root, None)
        found = _git(root, "rev-parse", "--verify", "--quiet", f"{spec}^{{commit}}")
        if found.returncode == 0:
            return cls(spec, root, found.stdout.decode().strip())
        # DVC keeps an experiment at refs/exps/<2 hex>/<rest of its baseline's sha>/<name>; other refs under
        # refs/exps (exec, celery, stash, ...) are its machinery, not experiments.
        refs = _git(root, "for-each-ref", "--format=%(refname)", "refs/exps").stdout.decode().split()
        matches = [r for r in refs if EXPERIMENT_REF.fullmatch(r) and r.rsplit("/", 1)[-1] == spec]
        if len(matches) > 1:  # the same name on several baselines: the one on HEAD, as dvc exp does
            head = _git(root, "rev-parse", "HEAD").stdout.decode().strip()
            matches = [r for r in matches if "".join(r.split("/")[2:4]) == head] or matches
        if len(matches) > 1:
            baselines = ", ".join("".join(r.split("/")[2:4])[:7] for r in matches)
            raise UserError(
                f"experiment name {spec!r} is ambiguous (baselines {baselines}); give the experiment's commit "
                "from `dvc exp show --sha`"
            )
        if matches:
            return cls(spec, root, _git(root, "rev-parse", matches[0]).stdout.decode().strip())
        raise UserError(
            f"{spec!r} is neither a git revision nor an experiment name (dvc exp show); give a commit, branch, "
            f"tag, experiment name, or {WORKSPACE}"
        )

    def read(self, path: str) -> bytes | None:
        """The file's bytes on this side, None where it does not exist."""
        if self.commit is None:
            file = self.root / path
            return file.read_bytes() if file.is_file() else None
        shown = _git(self.root, "show", f"{self.commit}:{path}")
        return shown.stdout if shown.returncode == 0 else None

    def backbones(self) -> list[str]:
        raw = self.read("params.yaml")
        if raw is None:
            raise UserError(f"{self.name} has no params.yaml; is it a revision of this project?")
        return list(yaml.safe_load(raw).get("backbones") or [])


@dataclass(frozen=True)
class ModelResults:
    predictions: pd.DataFrame  # path, actual, [group,] predicted: sorted by path
    classes: list[str]
    metrics: dict[str, Any]
    platform: Any
    raw: tuple[bytes, bytes]  # predictions.csv and the metrics JSON, as committed


def _path(kind: str, model: str) -> str | None:
    backbone_path, ensemble_path = RESULT_FILES[kind]
    return ensemble_path if model == ENSEMBLE else backbone_path.format(m=model)


def load_results(side: Side, model: str, backbones: list[str]) -> ModelResults:
    """A model's committed test predictions, metrics and platform on one side."""
    predictions_path, metrics_path = _path("predictions", model), _path("metrics", model)
    raw_predictions, raw_metrics = side.read(predictions_path or ""), side.read(metrics_path or "")
    if raw_predictions is None or raw_metrics is None:
        missing = predictions_path if raw_predictions is None else metrics_path
        raise UserError(
            f"{side.name} has no {missing}: its results were not computed or not committed "
            f"(run `dvc repro` first, or choose another revision)"
        )
    header = raw_predictions.split(b"\n", 1)[0].decode().split(",")
    frame = pd.read_csv(
        io.BytesIO(raw_predictions), dtype={c: str for c in header if c in TEXT_COLUMNS}, keep_default_na=False
    )
    classes = [c[2:] for c in frame.columns if c.startswith("p_")]
    frame = frame.sort_values("path", kind="stable").reset_index(drop=True)
    platforms = []
    for name in [model] if model != ENSEMBLE else backbones:
        record = side.read(_path("model", name) or "")
        platforms.append(json.loads(record).get("platform") if record else None)
    platform = platforms[0] if all(p == platforms[0] for p in platforms) else platforms
    return ModelResults(frame, classes, json.loads(raw_metrics), platform, (raw_predictions, raw_metrics))


def check_same_test_set(a: ModelResults, b: ModelResults, model: str, names: tuple[str, str]) -> None:
    """Stop with one line when the two sides were evaluated on different images, labels or classes."""
    if a.classes != b.classes:
        raise UserError(
            f"{model}: {names[0]} has classes {a.classes} and {names[1]} has {b.classes}: the models answer "
            "different questions, so their predictions cannot be paired; compare runs on the same data"
        )
    only_a = sorted(set(a.predictions.path) - set(b.predictions.path))
    only_b = sorted(set(b.predictions.path) - set(a.predictions.path))
    if only_a or only_b:
        example = (only_a or only_b)[0]
        raise UserError(
            f"{model}: the test sets differ ({len(only_a)} images only in {names[0]}, {len(only_b)} only in "
            f"{names[1]}, e.g. {example}): a paired comparison needs the same test images; compare runs whose "
            "data, prepare and split params are the same"
        )
    relabelled = a.predictions.actual.to_numpy() != b.predictions.actual.to_numpy()
    if relabelled.any():
        raise UserError(
            f"{model}: {int(relabelled.sum())} test images have other labels in {names[1]} than in {names[0]} "
            f"(e.g. {a.predictions.path[relabelled.argmax()]}); a paired comparison needs the same labels"
        )


@dataclass(frozen=True)
class Judgement:
    model: str
    verdict: str
    comparison: PairedComparison
    in_interval: bool | None  # B's accuracy inside A's committed interval (None: A has none)
    per_class: pd.DataFrame  # class, support, recall_a, recall_b, f1_a, f1_b
    resampled: str  # "groups" or "images"
    platforms: tuple[Any, Any]


def _per_class(y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, classes: list[str]) -> pd.DataFrame:
    from sklearn.metrics import precision_recall_fscore_support

    k = list(range(len(classes)))
    _, recall_a, f1_a, support = precision_recall_fscore_support(y, pred_a, labels=k, zero_division=0)
    _, recall_b, f1_b, _ = precision_recall_fscore_support(y, pred_b, labels=k, zero_division=0)
    return pd.DataFrame(
        {"class": classes, "support": support, "recall_a": recall_a, "recall_b": recall_b, "f1_a": f1_a, "f1_b": f1_b}
    )


def judge(
    model: str,
    a: ModelResults,
    b: ModelResults,
    threshold: float,
    resamples: int,
    confidence: float,
    seed: int,
    names: tuple[str, str],
) -> Judgement:
    """Compare B with A for one model; `threshold` is the corrected significance level (alpha / m)."""
    check_same_test_set(a, b, model, names)
    index = {c: i for i, c in enumerate(a.classes)}
    y = a.predictions.actual.map(index).to_numpy()
    pred_a = a.predictions.predicted.map(index).to_numpy()
    pred_b = b.predictions.predicted.map(index).to_numpy()
    groups_from = a if "group" in a.predictions else b if "group" in b.predictions else None
    groups = None if groups_from is None else groups_from.predictions.group.to_numpy()
    comparison = paired_bootstrap(y, pred_a, pred_b, len(a.classes), resamples, confidence, seed, groups)
    verdict = IDENTICAL if a.raw == b.raw else BEYOND if comparison.p_value < threshold else WITHIN
    low, high = a.metrics.get("accuracy_low"), a.metrics.get("accuracy_high")
    in_interval = None if low is None or high is None else bool(low <= comparison.accuracy[1] <= high)
    return Judgement(
        model,
        verdict,
        comparison,
        in_interval,
        _per_class(y, pred_a, pred_b, a.classes),
        "groups" if groups is not None else "images",
        (a.platform, b.platform),
    )


def judge_all(
    spec_a: str, spec_b: str, alpha: float, resamples: int, confidence: float, seed: int, root: Path | None = None
) -> tuple[list[Judgement], list[str]]:
    """Judge every model the two sides share (their backbones, and the ensemble). Returns the judgements and
    notes on models only one side has."""
    if not 0 < alpha < 1:
        raise UserError(f"--alpha={alpha} must be a significance level strictly between 0 and 1, e.g. 0.05")
    if resamples < 1:
        raise UserError(f"--resamples={resamples} must be 1 or more (2000 gives stable 95% intervals)")
    root = root or repository_root()
    a, b = Side.resolve(spec_a, root), Side.resolve(spec_b, root)
    backbones_a, backbones_b = a.backbones(), b.backbones()
    shared = [m for m in backbones_a if m in backbones_b]
    notes = [f"{m}: only in {a.name}" for m in backbones_a if m not in shared]
    notes += [f"{m}: only in {b.name}" for m in backbones_b if m not in shared]
    models = [*shared, ENSEMBLE] if backbones_a == backbones_b else shared
    if backbones_a != backbones_b:
        notes.append(f"{ENSEMBLE}: not compared, its backbones differ")
    if not models:
        raise UserError(
            f"{a.name} (backbones {backbones_a}) and {b.name} (backbones {backbones_b}) share no backbone: "
            "there is nothing to compare"
        )
    threshold = alpha / max(len(models), 1)
    judgements = [
        judge(
            m,
            load_results(a, m, backbones_a),
            load_results(b, m, backbones_b),
            threshold,
            resamples,
            confidence,
            seed,
            (a.name, b.name),
        )
        for m in models
    ]
    return judgements, notes


def describe_platform(platform: Any) -> str:
    """One line: CPU vendor, the flags that tell CPU types apart, GPUs, TensorFlow version."""
    if isinstance(platform, list):
        return " / ".join(describe_platform(p) for p in platform)
    if not isinstance(platform, dict):
        return "not recorded"
    stages = [platform[k] for k in ("features", "train") if isinstance(platform.get(k), dict)]
    if stages and all(s == stages[-1] for s in stages):
        platform = stages[-1]
    elif stages:
        return "; ".join(f"{k}: {describe_platform(platform[k])}" for k in ("features", "train"))
    flags = [f for f in SHOWN_FLAGS if f in platform.get("cpu_flags", [])]
    gpus = f", GPU {', '.join(platform['gpus'])}" if platform.get("gpus") else ""
    machine = f"{platform['machine']} " if platform.get("machine") else ""
    return (
        f"{machine}{platform.get('cpu_vendor', '?')} ({' '.join(flags) or 'no avx512'}){gpus}, "
        f"TensorFlow {platform.get('tensorflow', '?')}"
    )


def overall(judgements: list[Judgement]) -> str:
    """The worst verdict of the models (identical < not rerun < within noise < different predictions < beyond)."""
    return max((j.verdict for j in judgements), key=SEVERITY.index, default=IDENTICAL)


def verify_verdicts(judgements: list[Judgement], min_agreement: float, workspace: Path) -> list[Judgement]:
    """verify's reading of each judgement. A reproduction is within noise only when its accuracy is (the grouped
    test) AND its predictions agree with REV's on at least `min_agreement` of the test images: two models can
    be equally accurate on different images. Results identical to REV's with no trained model in the workspace
    (a fresh clone, `dvc repro` not run) were not rerun: nothing was reproduced. (Models fetched by `dvc pull`
    count as present: a pulled workspace reads "identical".) Any other verdict stands."""
    if not 0 < min_agreement <= 1:
        raise UserError(f"--min-agreement={min_agreement} must be a share of test images, above 0 and at most 1")
    out = []
    for j in judgements:
        trained = workspace / ("models/ensemble.json" if j.model == ENSEMBLE else f"models/{j.model}/model.keras")
        verdict = j.verdict
        if verdict == IDENTICAL and not trained.is_file():  # REV's own bytes, and no model here made them
            verdict = NOT_RERUN
        elif verdict == WITHIN and j.comparison.agreement < min_agreement:
            verdict = DIFFERENT_PREDICTIONS
        out.append(dataclasses.replace(j, verdict=verdict))
    return out


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) for row in [header, *rows])


def _interval(change: float, bounds: tuple[float, float]) -> str:
    return f"{change:+.4f} [{bounds[0]:+.4f}, {bounds[1]:+.4f}]"


def verify_report(
    judgements: list[Judgement], names: tuple[str, str], alpha: float, min_agreement: float | None = None
) -> str:
    rows = []
    for j in judgements:
        c = j.comparison
        inside = {True: "yes", False: "no", None: "n/a"}[j.in_interval]
        rows.append(
            [j.model, f"{c.agreement:.4f}", f"{c.accuracy[0]:.4f}", f"{c.accuracy[1]:.4f}", inside,
             f"{c.right_to_wrong}/{c.wrong_to_right}", f"{c.p_value:.3g}", j.verdict]
        )  # fmt: skip
    header = ["model", "agreement", f"accuracy {names[0]}", f"accuracy {names[1]}",
              f"in {names[0]}'s interval", "only-A/only-B right", "p (groups)", "verdict"]  # fmt: skip
    platforms = [f"{names[i]}: {describe_platform(judgements[0].platforms[i])}" for i in (0, 1)] if judgements else []
    return "\n".join(
        [
            _table(header, rows, markdown=False),
            "",
            *platforms,
            f"rule: exact sign-flip test over the test split's groups (exact McNemar when each group is one image), "
            f"beyond noise when p < {alpha}/{len(judgements)}"
            + (f"; within noise also needs agreement >= {min_agreement:g}" if min_agreement is not None else ""),
            *(
                [f"not rerun here (no trained model in this workspace): {', '.join(not_rerun)}"]
                if (not_rerun := [j.model for j in judgements if j.verdict == NOT_RERUN])
                else []
            ),
            f"overall: {overall(judgements)}",
        ]
    )


def diff_report(judgements: list[Judgement], names: tuple[str, str], alpha: float, markdown: bool) -> str:
    a, b = names
    rows = []
    for j in judgements:
        c = j.comparison
        rows.append(
            [j.model, f"{c.accuracy[0]:.4f}", f"{c.accuracy[1]:.4f}", _interval(c.accuracy_change,
             c.accuracy_change_interval), f"{c.macro_f1[0]:.4f}", f"{c.macro_f1[1]:.4f}",
             _interval(c.macro_f1_change, c.macro_f1_change_interval), str(c.right_to_wrong), str(c.wrong_to_right),
             f"{c.p_value:.3g}", j.verdict.replace("reproduced ", "").replace("differs ", "")]
        )  # fmt: skip
    header = ["model", f"accuracy {a}", f"accuracy {b}", "change [95% CI]", f"macro F1 {a}", f"macro F1 {b}",
              "change [95% CI]", "right→wrong", "wrong→right", "p (groups)", "verdict"]  # fmt: skip
    resampled = {j.resampled for j in judgements}
    n = judgements[0].comparison if judgements else None
    parts = [
        _table(header, rows, markdown),
        "",
        f"{n.images if n else 0} test images, {n.groups if n else 0} {'/'.join(sorted(resampled))} resampled "
        f"(paired bootstrap); beyond noise: exact sign-flip test over the same units, p < {alpha}/{len(judgements)} "
        f"(Bonferroni). "
        f"{a}: {describe_platform(judgements[0].platforms[0]) if judgements else ''}; "
        f"{b}: {describe_platform(judgements[0].platforms[1]) if judgements else ''}.",
    ]
    changed = []
    for j in judgements:
        moved = j.per_class[(j.per_class.recall_a != j.per_class.recall_b) | (j.per_class.f1_a != j.per_class.f1_b)]
        changed += [
            [j.model, r["class"], str(int(r.support)), f"{r.recall_a:.4f} → {r.recall_b:.4f}",
             f"{r.f1_a:.4f} → {r.f1_b:.4f}"]
            for _, r in moved.iterrows()
        ]  # fmt: skip
    if changed:
        parts += ["", "Per class (where it changed):", "",
                  _table(["model", "class", "test images", "recall", "F1"], changed, markdown)]  # fmt: skip
    return "\n".join(parts)
