"""Command line: `python -m imgclf predict | export | verify | diff | render-plots ...` (also installed as
`imgclf ...`).

Exit codes: 0 success (every image classified; exported and checked; reproduced; diff printed); 1 `verify` found
a model that differs beyond noise, or an export disagrees with predict beyond its tolerance or its runtime cannot
run it (it is not written);
3 some images could not be read (they get a row with the error and no label); 2 a usage problem (no such model,
unknown backbone or revision, no input, test sets that cannot be paired).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from imgclf.core.errors import USER_ERROR_EXIT, UserError, log
from imgclf.core.logs import quiet_native_stderr, setup_logging

SOME_FAILED_EXIT = 3
PARAMS_DEFAULT = "params.yaml"


def predict_command(args: argparse.Namespace) -> int:
    models_dir = Path(args.models_dir)
    if args.batch_size < 1:
        raise UserError(f"--batch-size={args.batch_size} must be a positive number of images per forward pass")
    from imgclf.results.predict import check_model_dir, chosen_models, find_images

    names, ensemble_temperature = chosen_models(args.backbone, models_dir)
    ray_options = ray_settings(args) if args.engine == "ray" else {}
    # Usage errors before TensorFlow's import (seconds of CPU): a wrong folder or input is answered at once.
    for name in names:
        check_model_dir(models_dir / name)
    paths = find_images(args.inputs)

    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")  # as the stages (repro.seed_everything)
    import tensorflow as tf

    from imgclf.results.predict import Classifier, classify

    tf.get_logger().setLevel("ERROR")  # retracing notices (one predict function per model) are not the user's concern

    classifiers = [Classifier.load(models_dir / name) for name in names]
    if args.engine == "ray":
        from imgclf.results.predict_ray import classify_on_ray

        table = classify_on_ray(classifiers, paths, args.batch_size, ray_options, ensemble_temperature)
    else:
        table = classify(classifiers, paths, args.batch_size, ensemble_temperature)
    if args.out:
        from imgclf.core.io import write_csv

        write_csv(table, args.out)
    else:
        table.to_csv(sys.stdout, index=False, lineterminator="\n")
    failed = int((table.error != "").sum())
    print(
        f"predict: {len(table) - failed} of {len(table)} images classified with {' + '.join(names)}"
        + (f"; {failed} could not be read (see the error column)" if failed else ""),
        file=sys.stderr,
    )
    return SOME_FAILED_EXIT if failed else 0


RAY_DEFAULTS = {"address": "local", "workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 0}


def ray_settings(args: argparse.Namespace) -> dict[str, Any]:
    """predict --engine ray's cluster: `features.ray` of --params (params.yaml, when it exists: the cluster is
    configured in one place), each overridden by its flag; Ray's own defaults outside a project. Returns the
    options and, under "setting", where the address came from (for error messages)."""
    flags = {"address": args.ray_address, "workers": args.ray_workers, "gpus_per_worker": args.ray_gpus}
    params_file = Path(args.params or PARAMS_DEFAULT)
    if args.params and not params_file.is_file():
        raise UserError(f"--params {args.params}: no such file; give the project's params.yaml")
    if all(v is not None for v in flags.values()) or not params_file.is_file():
        options, source = dict(RAY_DEFAULTS), "defaults" if not params_file.is_file() else "flags"
    else:
        from imgclf.params import load_params

        try:
            options = dict(load_params(params_file)["features"]["ray"])
        except UserError as exc:
            raise UserError(
                f"predict --engine ray reads its cluster from features.ray in {params_file}, which cannot be used "
                f"({exc}); fix it, or give --ray-address, --ray-workers and --ray-gpus (or --params)"
            ) from None
        source = f"features.ray in {params_file}"
    setting = f"features.ray.address in {params_file}" if args.ray_address is None and "features" in source else ""
    options.update({k: v for k, v in flags.items() if v is not None})
    if options["workers"] < 1 or options["gpus_per_worker"] < 0:
        raise UserError(
            f"--ray-workers={options['workers']} must be 1 or more and --ray-gpus={options['gpus_per_worker']} "
            "0 or more"
        )
    log.info(
        "predict: Ray at %s, %d workers, %g GPUs per worker (%s%s)",
        options["address"],
        options["workers"],
        options["gpus_per_worker"],
        source,
        ", flags override" if "features" in source else "",
    )
    return {**options, "setting": setting or "--ray-address"}


def export_command(args: argparse.Namespace) -> int:
    from imgclf.results.predict import check_model_dir, chosen_models, find_images

    models_dir = Path(args.models_dir)
    names, ensemble_temperature = chosen_models(args.backbone, models_dir)
    from imgclf.deploy.export import check_options, check_out_dir

    # One line for a bad option or folder before any model loads (the runtime checks import TensorFlow: last).
    check_out_dir(args.out, models_dir, args.force)
    check_options(args.format, args.quantize, args.tolerance)
    if args.check_images:
        paths = find_images(args.check_images)
    else:
        from imgclf.deploy.export import check_images_of
        from imgclf.params import load_params

        root = Path(load_params(args.params)["data"]["root"])
        paths = check_images_of(Path(args.split_dir) / "test.csv", root)
    for name in names:
        check_model_dir(models_dir / name)
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    import tensorflow as tf

    from imgclf.deploy.export import ExportCheckFailed, export
    from imgclf.results.predict import Classifier

    tf.get_logger().setLevel("ERROR")
    classifiers = [Classifier.load(models_dir / name) for name in names]
    try:
        export(classifiers, args.format, args.out, paths, ensemble_temperature, args.quantize, args.tolerance,
               args.force, models_dir)  # fmt: skip
    except ExportCheckFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXPORT_FAILED_EXIT
    return 0


EXPORT_FAILED_EXIT = 1


def render_command(args: argparse.Namespace) -> int:
    from imgclf.results.render import render_plots

    written = render_plots(args.out, args.format, args.revisions)
    print(f"render-plots: {len(written)} charts written to {args.out}", file=sys.stderr)
    for path in written:
        print(path)
    return 0


DIFFERS_EXIT = 1


def verify_command(args: argparse.Namespace) -> int:
    from imgclf.results.experiments import (
        BEYOND,
        DIFFERENT_PREDICTIONS,
        MIN_AGREEMENT,
        WORKSPACE,
        judge_all,
        overall,
        repository_root,
        verify_report,
        verify_verdicts,
    )

    bound = MIN_AGREEMENT if args.min_agreement is None else args.min_agreement
    if not 0 < bound <= 1:  # before the bootstrap runs
        raise UserError(f"--min-agreement={bound} must be a share of test images, above 0 and at most 1")
    judgements, notes = judge_all(args.against, WORKSPACE, args.alpha, args.resamples, 0.95, args.seed)
    judgements = verify_verdicts(judgements, bound, repository_root())
    if notes:  # another list of backbones: not a reproduction of REV, whatever the shared models say
        raise UserError(
            f"the workspace is not a run of {args.against}'s pipeline ({'; '.join(notes)}); verify compares a "
            f"reproduction with its original: use `imgclf diff {args.against} workspace` to compare experiments"
        )
    print(verify_report(judgements, (args.against, WORKSPACE), args.alpha, bound))
    for note in notes:
        print(f"note: {note}")
    return DIFFERS_EXIT if overall(judgements) in (BEYOND, DIFFERENT_PREDICTIONS) else 0


def diff_command(args: argparse.Namespace) -> int:
    from imgclf.results.experiments import diff_report, judge_all

    judgements, notes = judge_all(args.a, args.b, args.alpha, args.resamples, 0.95, args.seed)
    print(diff_report(judgements, (args.a, args.b), args.alpha, markdown=args.md))
    for note in notes:
        print(f"note: {note}")
    return 0


def _significance_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--alpha", type=float, default=0.05, help="family-wise significance level over all models (default: 0.05)"
    )
    parser.add_argument("--resamples", type=int, default=2000, help="paired bootstrap resamples (default: 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: 0)")


def experiments_command(args: argparse.Namespace) -> int:
    import yaml

    from imgclf.results.experiments import repository_root
    from imgclf.results.exptable import HEADLINE, dvc_exp_show, experiments_table, markdown

    # params.yaml's sections (not validated: only their names tell which columns of dvc exp show are params)
    params_file = repository_root() / "params.yaml"
    sections = set(yaml.safe_load(params_file.read_text(encoding="utf-8")) or {}) if params_file.is_file() else set()
    table = experiments_table(dvc_exp_show(Path.cwd(), args.dvc_args), sections, (*HEADLINE, *args.metric))
    print(markdown(table) if args.md else table.to_string(index=False))
    return 0


def serve_command(args: argparse.Namespace) -> int:
    import math

    for name in ("max_batch", "max_queue", "max_inflight", "decode_threads"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}={getattr(args, name)} must be a positive number")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port={args.port} must be 0-65535")
    if not (math.isfinite(args.max_wait_ms) and math.isfinite(args.timeout) and math.isfinite(args.max_body_mb)):
        raise UserError("--max-wait-ms, --timeout and --max-body-mb must be finite numbers")
    if args.max_wait_ms < 0 or args.timeout <= 0 or args.max_body_mb <= 0:
        raise UserError("--max-wait-ms must be 0 or more, --timeout and --max-body-mb more than 0")
    try:
        import prometheus_client  # noqa: F401
        import python_multipart  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UserError(
            f"serve needs {exc.name}, which is not installed; install it with `pip install -r requirements-serve.txt`"
        ) from None
    from imgclf.deploy.serve import ServeOptions, serve

    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    options = ServeOptions(
        backbone=args.backbone, models_dir=Path(args.models_dir), host=args.host, port=args.port,
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, timeout_s=args.timeout,
        max_inflight=args.max_inflight,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024), dicom=args.dicom, decode_threads=args.decode_threads,
        token_file=Path(args.token_file) if args.token_file else None,
    )  # fmt: skip
    return serve(options)


def explain_command(args: argparse.Namespace) -> int:
    from imgclf.features.backbones import BACKBONES

    if args.backbone not in BACKBONES:
        raise UserError(
            f"--backbone={args.backbone!r}: explain one backbone ({', '.join(BACKBONES)}); an ensemble's maps are "
            "its members'"
        )
    from imgclf.results.predict import check_model_dir, find_images

    check_model_dir(Path(args.models_dir) / args.backbone)  # usage errors before TensorFlow's import
    paths = find_images(args.inputs)
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    import tensorflow as tf

    from imgclf.results.explain import explain_files
    from imgclf.results.predict import Classifier

    tf.get_logger().setLevel("ERROR")
    table = explain_files(
        Classifier.load(Path(args.models_dir) / args.backbone), paths, Path(args.out), show_images=not args.no_images
    )
    failed = int((table.error != "").sum())
    log.info("explain: %d of %d images explained in %s", len(table) - failed, len(table), args.out)
    for row in table[table.error != ""].itertuples():
        log.warning("explain: %s: %s", row.path, row.error)
    return SOME_FAILED_EXIT if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgclf", description="imgclf: classify images with trained models")
    sub = parser.add_subparsers(dest="command", required=True)
    predict = sub.add_parser(
        "predict",
        help="classify image files and folders; CSV to stdout or --out",
        description="Classify image files and folders (recursively) with a trained backbone or the ensemble.",
    )
    predict.add_argument("inputs", nargs="+", help="image files and/or folders")
    predict.add_argument("--backbone", required=True, help="vgg16 | vgg19 | mobilenet | xception | ensemble")
    predict.add_argument(
        "--models-dir", default="models", help="folder holding <backbone>/model.keras (default: models)"
    )
    predict.add_argument("--out", help="write the CSV here instead of stdout")
    predict.add_argument("--batch-size", type=int, default=32, help="images per forward pass (memory)")
    predict.add_argument(
        "--engine", choices=["local", "ray"], default="local", help="local (this process) or ray (a Ray cluster)"
    )
    predict.add_argument(
        "--params",
        help="with --engine ray: the params file whose features.ray gives the cluster (default: params.yaml, if any)",
    )
    predict.add_argument(
        "--ray-address", help="with --engine ray: local | auto | host:6379 | ray://host:10001 (features.ray.address)"
    )
    predict.add_argument("--ray-workers", type=int, help="with --engine ray: actors running the model (features.ray)")
    predict.add_argument("--ray-gpus", type=float, help="with --engine ray: GPUs per worker (features.ray)")
    predict.set_defaults(func=predict_command)
    exp = sub.add_parser(
        "export",
        help="export a trained backbone or the ensemble to SavedModel, TFLite or ONNX, checked by its runtime",
        description="Export one model (uint8 images in, calibrated probabilities out) and check it against predict.",
    )
    exp.add_argument("--backbone", required=True, help="vgg16 | vgg19 | mobilenet | xception | ensemble")
    exp.add_argument("--format", required=True, choices=["savedmodel", "tflite", "onnx"])
    exp.add_argument("--out", required=True, help="folder to write (the model and imgclf_model.json)")
    exp.add_argument("--quantize", default="none", help="tflite only: none | float16 | int8 (dynamic range)")
    exp.add_argument(
        "--tolerance",
        type=float,
        help="max |probability difference| from predict (default 1e-4; float16 1e-2; int8 0.1)",
    )
    exp.add_argument("--check-images", nargs="+", help="files/folders to check on (default: the test split)")
    exp.add_argument("--models-dir", default="models", help="folder holding <backbone>/model.keras (default: models)")
    exp.add_argument("--split-dir", default="data/split", help="where test.csv is (default: data/split)")
    exp.add_argument("--params", default=PARAMS_DEFAULT, help="params file whose data.root holds the test images")
    exp.add_argument("--force", action="store_true", help="replace --out if it exists")
    exp.set_defaults(func=export_command)
    verify = sub.add_parser(
        "verify",
        help="is the workspace a reproduction of REV's committed results? identical / within noise / beyond",
        description="Compare the workspace's test predictions with those committed at REV, model by model.",
    )
    verify.add_argument("--against", default="HEAD", help="git revision or experiment name (default: HEAD)")
    verify.add_argument(
        "--min-agreement",
        type=float,
        default=None,
        help="share of test images that must keep their predicted class for 'within noise' (default 0.85: below "
        "the 0.888 lowest measured across CPU types; docs/reproduce.md)",
    )
    _significance_options(verify)
    verify.set_defaults(func=verify_command)
    diff = sub.add_parser(
        "diff",
        help="compare two experiments on the same test images, with paired intervals and a test over groups",
        description="Compare B with A per model: accuracy and macro F1 changes with paired bootstrap intervals.",
    )
    diff.add_argument("a", help="git revision, experiment name (dvc exp show), or workspace")
    diff.add_argument("b", help="git revision, experiment name (dvc exp show), or workspace")
    diff.add_argument("--md", action="store_true", help="a Markdown table, ready to paste into a pull request")
    _significance_options(diff)
    diff.set_defaults(func=diff_command)
    table = sub.add_parser(
        "experiments",
        help="the experiments table a reviewer reads: swept params, validation and test accuracy per model",
        description="dvc exp show, narrowed: per experiment the params that differ and each model's validation "
        "accuracy (choose on it) and test accuracy (report it). Options after -- go to dvc exp show "
        "(e.g. -- -A for every commit, -- --rev main).",
    )
    table.add_argument(
        "--metric", action="append", default=[], help="another metric per model (val_loss, macro_f1, ece, ...)"
    )
    table.add_argument("--md", action="store_true", help="a Markdown table, ready to paste into a pull request")
    table.add_argument("dvc_args", nargs="*", help="after --: arguments for dvc exp show")
    table.set_defaults(func=experiments_command)
    exp_ = sub.add_parser(
        "explain",
        help="Grad-CAM and attention maps of new images, with the calibrated probabilities",
        description="For each image: original | attention | Grad-CAM of the predicted class (docs/explanations.md).",
    )
    exp_.add_argument("inputs", nargs="+", help="image files and/or folders")
    exp_.add_argument("--backbone", required=True, help="vgg16 | vgg19 | mobilenet | xception")
    exp_.add_argument("--out", required=True, help="folder for one PNG per image and explanations.csv")
    exp_.add_argument("--models-dir", default="models", help="where <backbone>/model.keras is (default: models)")
    exp_.add_argument(
        "--no-images", action="store_true", help="draw the maps on black, no pixel of the images (patient data)"
    )
    exp_.set_defaults(func=explain_command)
    srv = sub.add_parser(
        "serve",
        help="serve a trained model over HTTP (Open Inference Protocol V2, /v1/classify, /metrics)",
        description="Serve a trained model over HTTP: the same decoding, model and calibration as predict "
        "(docs/serve.md). Needs `pip install -r requirements-serve.txt`.",
    )
    srv.add_argument("--backbone", help="vgg16 | vgg19 | mobilenet | xception | ensemble (default: compare's pick)")
    srv.add_argument("--models-dir", default="models", help="where <backbone>/model.keras are (default: models)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8080)
    srv.add_argument("--token-file", help="require Authorization: Bearer <the file's content> (health routes excepted)")
    srv.add_argument("--max-batch", type=int, default=32, help="images per backbone pass (1: no batching)")
    srv.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more images")
    srv.add_argument("--max-queue", type=int, default=256, help="images waiting at most; beyond, 503")
    srv.add_argument(
        "--max-inflight", type=int, default=64, help="inference requests taken at once (reading, decoding, queued)"
    )
    srv.add_argument("--timeout", type=float, default=30.0, help="seconds a request may wait; beyond, 503")
    srv.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body, MB (beyond: 413)")
    srv.add_argument("--dicom", action="store_true", help="accept DICOM uploads (patient data: see docs/serve.md)")
    srv.add_argument("--decode-threads", type=int, default=2, help="threads decoding uploads")
    srv.set_defaults(func=serve_command)
    render = sub.add_parser(
        "render-plots",
        help="render the DVC charts to PNG or SVG, offline (vl-convert)",
        description="Render every chart of `dvc plots show` (or of `dvc plots diff REV...`) to PNG or SVG.",
    )
    render.add_argument("revisions", nargs="*", help="revisions to compare (dvc plots diff); none: the workspace")
    render.add_argument("--out", default="rendered_plots", help="output folder (default: rendered_plots)")
    render.add_argument("--format", default="png", help="png | svg")
    render.set_defaults(func=render_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_native_stderr()
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT


if __name__ == "__main__":
    sys.exit(main())
