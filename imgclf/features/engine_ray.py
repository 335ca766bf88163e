"""The Ray engine: the backbone pass of features@ (and predict) on a Ray cluster, same numbers, same files.

    driver: save the extractor once -> its bytes to every worker (Ray's object store) -> one task per batch of
            32 paths -> workers decode the images themselves and run the very same saved model -> the driver
            receives the feature maps in row order, batch by batch, and appends them to features.npy

Each input item is a whole batch (the same paths, in the same order, as the local engine's batch), so every
image goes through the backbone in the same batch composition on both engines: on CPU the features are
bit-identical to the local pass (tested). The driver never holds more than a few batches. Workers need the
data folder at the same path (a shared filesystem); they import this checkout's `imgclf` (shipped with the
job as a Ray `py_modules` entry), not whatever is installed on the nodes.

Ray is imported here only, and installed only on request (`pip install -r requirements-ray.txt`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.core.errors import UserError, log
from imgclf.core.logs import Progress
from imgclf.data.images import ImageRecipe

INSTALL_HINT = "install it with `pip install -r requirements-ray.txt`, or use the local engine"
PROBE_TIMEOUT_S = 120  # each node's machine record (cluster_machines): a TensorFlow import, seconds when idle
CONNECT_TIMEOUT_S = 5  # a quick TCP check first: Ray itself retries an unreachable head for minutes


def import_ray(address: str = "local") -> Any:
    """Import Ray (read its settings at import). A local instance uses token authentication, Ray 2.60's default
    for local clusters, set explicitly so that Ray does not warn about it; a cluster's mode is the user's."""
    global _auth_mode_set_here
    if address == "local" and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        _auth_mode_set_here = True
    try:
        import ray
    except ImportError:
        _restore_auth_mode()
        raise UserError(f"the Ray engine needs Ray, which is not installed; {INSTALL_HINT}") from None
    return ray


_auth_mode_set_here = False


def _restore_auth_mode() -> None:
    """Leave the environment as it was (every later subprocess inherits it): shutdown() and a failed import."""
    global _auth_mode_set_here
    if _auth_mode_set_here:
        os.environ.pop("RAY_AUTH_MODE", None)
        _auth_mode_set_here = False


def check_reachable(address: str, setting: str = "features.ray.address") -> None:
    """Fail in seconds, in the user's terms, when a cluster address cannot be reached at all."""
    if address in ("local", "auto"):
        return
    host_port = address.removeprefix("ray://")
    host, _, port = host_port.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:6379
    if not host or not port.isdigit():
        raise UserError(
            f"{setting}={address!r} is not local, auto, host:port (the head's GCS port, 6379) or "
            "ray://host:port (Ray Client, 10001)"
        )
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise UserError(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); start it (`ray start --head` on "
            f"the head node), check the address and that this machine can reach it, or set {setting} to local "
            "for a Ray instance on this machine"
        ) from None


def connect(options: dict[str, Any], setting: str = "features.ray.address") -> Any:
    """ray.init for `features.ray` (address local | auto | host:port | ray://host:port), quietly, with this
    checkout's imgclf shipped to the workers; checks that the cluster has the CPUs and GPUs the workers ask
    for (Ray would otherwise wait for them forever). Returns the ray module."""
    address = options["address"]
    ray = import_ray(address)
    check_reachable(address, setting)
    if ray.is_initialized():
        return ray
    package = Path(__file__).resolve().parents[1]  # imgclf/, the whole package (this file is imgclf/features/)
    runtime_env = {
        "py_modules": [str(package)],
        "env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0")},
    }
    kwargs: dict[str, Any] = {
        "runtime_env": runtime_env,
        "logging_level": logging.WARNING,
        "log_to_driver": False,  # the workers' TensorFlow start-up lines; errors come back as exceptions
        "include_dashboard": False,
    }
    # "local" always starts a new instance (never RAY_ADDRESS or a cluster `ray start` left running here), with
    # the CPUs the workers need; GPUs as Ray detects them (CUDA_VISIBLE_DEVICES respected), none if not asked for.
    kwargs["address"] = address
    if address == "local":
        kwargs["num_cpus"] = options["workers"] * options["cpus_per_worker"]
        if not options["gpus_per_worker"]:
            kwargs["num_gpus"] = 0
    if address != "local":
        check_token(address, setting)  # before ray.init, which would retry a refusal for 20 s, line by line
    try:
        ray.init(**kwargs)
    except Exception as exc:  # ConnectionError, AuthenticationError, version mismatches: the user's to fix
        if type(exc).__name__ == "AuthenticationError":
            raise token_error(address) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(f"cannot start or join the Ray cluster at {address}: {type(exc).__name__}: {first}") from None
    quiet_console(logging.getLogger("ray.data"))
    resources = ray.cluster_resources()
    for name, per_worker in (("CPU", options["cpus_per_worker"]), ("GPU", options["gpus_per_worker"])):
        needed, available = per_worker * options["workers"], resources.get(name, 0)
        if needed > available:
            ray.shutdown()
            raise UserError(
                f"the Ray cluster at {address} has {available:g} {name}(s); {options['workers']} workers x "
                f"{per_worker:g} need {needed:g}: lower the workers or the {name}s per worker, or add nodes"
            )
    return ray


@contextlib.contextmanager
def captured_native_stderr() -> Iterator[Callable[[], bytes]]:
    """Send file descriptor 2 (Ray's C++ client writes there directly, below Python) to a temporary file for
    the block; yields a function returning what was written. Only around one bounded call that starts no
    process (which would inherit the descriptor): the probe of check_token."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)

        def written() -> bytes:
            sys.stderr.flush()
            # pread: fd 2 shares the file's offset, so reading must not move it
            return os.pread(sink.fileno(), os.fstat(sink.fileno()).st_size, 0)

        try:
            yield written
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def token_source() -> str:
    """Where Ray takes this driver's token from in token mode: RAY_AUTH_TOKEN, else the file at
    RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (Ray 2.60's order)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")


def token_error(address: str) -> UserError:
    """The cluster wants a token this driver did not give (RAY_AUTH_MODE not `token`), or gave another one."""
    mode = os.environ.get("RAY_AUTH_MODE", "")
    if mode.lower() == "token":
        return UserError(
            f"the Ray cluster at {address} refused this machine: it needs the cluster's token, and the token this "
            f"machine gave (from {token_source()}) is not it; point RAY_AUTH_TOKEN_PATH at a copy of the head's "
            "token file, see docs/scale.md, 'Beyond one machine'"
        )
    given = f"RAY_AUTH_MODE is {mode}" if mode else "RAY_AUTH_MODE is not set, so this machine gave none"
    return UserError(
        f"the Ray cluster at {address} refused this machine: it needs the cluster's token, and {given} (set "
        "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH to a copy of the head's token file, see docs/scale.md, "
        "'Beyond one machine')"
    )


PROBE_TIMEOUT_MS = 5000  # one attempt to reach the cluster's GCS, and its answer


def check_token(address: str, setting: str = "features.ray.address") -> None:
    """Ask the cluster's GCS once, in at most 5 s, whether it lets this driver in. A refused token would make
    ray.init retry for about 20 s, printing a C++ warning line per attempt, and then end in a bare
    ConnectionError; a port where no Ray GCS answers, for minutes. Ray Client addresses (ray://) are left to
    ray.init (the client server checks the token itself)."""
    source = token_source()
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" and source != "RAY_AUTH_TOKEN":
        try:  # Ray 2.60 aborts the whole process (a failed C++ check) on a token file it cannot read
            empty = not Path(source).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(
                f"RAY_AUTH_MODE=token, but the token file {source} cannot be read "
                f"({getattr(exc, 'strerror', None) or exc}); copy the head's token file there "
                "(or set RAY_AUTH_TOKEN_PATH to it), see docs/scale.md, 'Beyond one machine'"
            ) from None
        if empty:
            raise UserError(
                f"RAY_AUTH_MODE=token, but the token file {source} is empty; copy the head's token file there"
            )
    if address.startswith("ray://"):
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
        from ray._private.services import canonicalize_bootstrap_address
        from ray._raylet import InnerGcsClient
    except ImportError:  # a Ray without these internals (not 2.60): ray.init reports a refusal, slowly
        return
    if address == "auto" and not os.environ.get("RAY_ADDRESS"):
        # What ray.init does for a cluster it finds itself: use the token this machine has, if it has one.
        auth_log = logging.getLogger(maybe_enable_token_auth_if_token_available.__module__)
        level = auth_log.level
        auth_log.setLevel(logging.ERROR)  # its notice that token mode is now on: the expected case here
        try:
            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        finally:
            auth_log.setLevel(level)
    try:
        gcs_address = canonicalize_bootstrap_address(address)
    except Exception:  # e.g. auto with no cluster started here: ray.init says so, at once
        return
    if gcs_address is None:  # auto with RAY_ADDRESS=local: ray.init starts a local instance
        return
    # The address as the user gave it (Ray maps 127.0.0.1 to the node's IP); auto with where it led.
    shown = f"{address} ({gcs_address})" if address == "auto" else address
    if address == "auto":
        check_reachable(gcs_address, setting)  # a stale address file left by a stopped cluster
    with captured_native_stderr() as written:  # the C++ client's line about the failed attempt
        try:
            # Connects and fetches the cluster's ID: one bounded attempt.
            InnerGcsClient.standalone(gcs_address, None, PROBE_TIMEOUT_MS)
            return
        except Exception as exc:
            refused = type(exc).__name__ == "AuthenticationError" or b"InvalidAuthToken" in written()
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if refused:
        raise token_error(shown)
    raise UserError(
        f"nothing answered as a Ray cluster at {shown} ({detail}); check {setting}: the "
        "head's GCS port (6379 by default, not the dashboard's 8265) or ray://host:10001 for Ray Client"
    )


def quiet_console(logger: logging.Logger) -> None:
    """Ray Data prints its progress, plans and (before re-raising) every worker traceback to the console; its
    session log file (ray-data.log) keeps them all. Errors reach the user as one line (ray_batches)."""
    import ray.data  # noqa: F401  (configures Ray Data's loggers on import)

    for handler in logger.handlers:
        if "File" not in type(handler).__name__:
            handler.setLevel(logging.CRITICAL)


class BatchModel:
    """A Ray actor: holds one saved Keras model (here an extractor.keras) and runs it on batches of image
    paths, decoding them on the worker with the pipeline's own image loading. Subclasses change what is
    loaded and how an unreadable image is handled (predict_ray.py)."""

    def __init__(
        self, model: list[Any], image_size: int, recipe: dict[str, Any], gpus: float = 0, batch_size: int = 0
    ) -> None:
        import ray

        from imgclf.core.repro import seed_everything

        seed_everything(0)  # op determinism, as in the local stages
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.keras"
            path.write_bytes(ray.get(model[0]))  # the saved model's bytes, put once in the object store
            self.model = self.load(str(path))
        self.image_size = image_size
        self.recipe = ImageRecipe.from_params(recipe)
        self.gpus = gpus
        self.batch_size = batch_size  # every batch runs at this shape, as locally (backbone_pass.predict_padded)

    def check_device(self) -> None:
        """Once per worker, where the work runs: a worker given a GPU whose TensorFlow cannot see it would silently
        run on its CPU, and a precision this worker cannot run (float16 without a GPU) must stop, whatever the
        driver's machine has."""
        if getattr(self, "checked", False):
            return
        from imgclf.features.device import check_precision, model_precision, visible_gpus

        gpus = visible_gpus()
        if self.gpus and not gpus:
            raise UserError(
                f"a Ray worker on {socket.gethostname()} was given a GPU, but its TensorFlow sees none: install "
                "requirements-gpu.txt on that node (and check `nvidia-smi`), or set gpus_per_worker to 0"
            )
        check_precision(model_precision(self.model), self.model.name, gpus=gpus)
        self.machine = worker_machine()  # what this worker's outputs are keyed by (reuse.compute_features)
        self.checked = True

    def load(self, path: str) -> Any:
        from imgclf.features.extractor import load_extractor

        return load_extractor(path)

    def read(self, path: str) -> tuple[np.ndarray, str]:
        """The model's input for one path, and an error ("" when none): here any unreadable file stops the run."""
        from imgclf.features.backbone_pass import load_or_stop

        return load_or_stop(Path(path), self.image_size, self.recipe), ""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_device()
        rows, outputs, errors = [], [], []
        for start, paths in zip(batch["start"], batch["paths"], strict=True):  # one item = one local batch
            from imgclf.features.backbone_pass import predict_padded

            images, problems = zip(*(self.read(p) for p in paths), strict=True)
            outputs.append(predict_padded(self.model, np.stack(images), max(self.batch_size, len(images))))
            rows.append(np.arange(start, start + len(paths)))
            errors += problems
        rows_ = np.concatenate(rows)
        return {
            "row": rows_,
            "output": np.concatenate(outputs),
            "error": np.array(errors, dtype=str),
            "machine": np.array([self.machine] * len(rows_), dtype=str),
        }


def worker_machine() -> str:
    """This process's machine record (reuse.machine_record) as canonical JSON, after the seeding every worker
    does first (so that a probe and an actor on one node report the same record)."""
    from imgclf.core.repro import seed_everything
    from imgclf.features.reuse import machine_record

    seed_everything(0)
    return json.dumps(machine_record(), sort_keys=True, default=str)


def cluster_machines(options: dict[str, Any]) -> list[str]:
    """The machine records (worker_machine) of the cluster's nodes that can host a worker, one task pinned to each
    node, deduplicated and sorted: whose stored outputs a pass on this cluster may reuse."""
    ray = connect(options)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cpus, gpus = options["cpus_per_worker"], options["gpus_per_worker"]
    nodes = [
        node["NodeID"]
        for node in ray.nodes()
        if node.get("Alive")
        and node.get("Resources", {}).get("CPU", 0) >= cpus
        and node.get("Resources", {}).get("GPU", 0) >= gpus
    ]
    probe = ray.remote(num_cpus=cpus, num_gpus=gpus)(worker_machine)
    pinned = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote() for n in nodes]
    try:
        return sorted(set(ray.get(pinned)))
    except ray.exceptions.RayError as exc:
        cause = unwrap(exc)
        raise UserError(
            f"the Ray engine failed asking its nodes what they are: {type(cause).__name__}: {cause}"
        ) from None


def unwrap(exc: BaseException) -> BaseException:
    """The worker's own exception inside Ray's wrappers (RayTaskError(UserError) -> the UserError)."""
    seen = exc
    for _ in range(5):
        cause = getattr(seen, "cause", None) or seen.__cause__
        if cause is None or cause is seen:
            break
        seen = cause
    return seen


def ray_batches(
    model_file: Path,
    paths: list[Path],
    image_size: int,
    batch_size: int,
    recipe: ImageRecipe,
    options: dict[str, Any],
    actor: type[BatchModel] = BatchModel,
    setting: str = "features.ray.address",
) -> Iterator[dict[str, np.ndarray]]:
    """The saved model's outputs for `paths` ({"row", "output", "error"} per batch), computed by
    `options['workers']` Ray actors, yielded batch by batch in row order (the same batches as the local
    engine's)."""
    ray = connect(options, setting)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # results in row order
    context.enable_progress_bars = False  # our own progress line reports
    context.print_on_execution_start = False
    context.raise_original_map_exception = True  # the worker's UserError, not "UDF failed"
    # Absolute paths: a worker's working directory is not the driver's.
    items = [
        {"start": start, "paths": [os.path.abspath(p) for p in paths[start : start + batch_size]]}
        for start in range(0, len(paths), batch_size)
    ]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * options["workers"])))
    mapped = dataset.map_batches(
        actor,
        fn_constructor_kwargs={
            # A reference wrapped in a list: fetched by each actor, not resolved as a constructor argument
            # (Ray warns that actors with arguments in the object store cannot be restarted reliably).
            "model": [ray.put(Path(model_file).read_bytes())],
            "image_size": image_size,
            "recipe": recipe.to_dict(),
            "gpus": options["gpus_per_worker"],
            "batch_size": batch_size,
        },
        batch_size=1,  # one item: one batch of batch_size images
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=worker_count(options, len(paths), batch_size)),
        num_cpus=options["cpus_per_worker"],
        num_gpus=options["gpus_per_worker"],
    )
    expected = 0
    try:
        for out in mapped.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2):
            rows = np.asarray(out["row"])
            if not np.array_equal(rows, np.arange(expected, expected + len(rows))):
                raise RuntimeError(f"Ray returned rows out of order at row {expected}")  # preserve_order broken
            expected += len(rows)
            yield out
    except ray.exceptions.RayError as exc:
        cause = unwrap(exc)
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else repr(cause)  # Ray appends retry notes
        if isinstance(cause, UserError):
            shared = (
                " Workers read the images themselves: data.root must be visible at the same path on every node "
                "(a shared filesystem)"
                if "can no longer be read" in first
                else ""
            )
            raise UserError(f"a Ray worker stopped: {first.rstrip('.')}.{shared}") from None
        raise UserError(f"the Ray engine failed: {type(cause).__name__}: {first}") from None
    if expected != len(paths):
        raise RuntimeError(f"Ray returned {expected} rows for {len(paths)} images")


class RayEngine:
    """features.compute_features' `engine` for `features.ray`: ray_batches with a progress line, each block with
    the machine record of the worker that computed each row; `machines()` probes the cluster's nodes."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options

    def machines(self) -> list[str]:
        return cluster_machines(self.options)

    def __call__(
        self, model_file: Path, paths: list[Path], image_size: int, batch_size: int, recipe: ImageRecipe, desc: str
    ) -> Iterator[tuple[np.ndarray, list[str]]]:
        with Progress(len(paths), f"{desc} on ray") as progress:
            for out in ray_batches(model_file, paths, image_size, batch_size, recipe, self.options):
                progress.update(len(out["row"]))
                # One string object per machine type, shared by its rows: the driver's memory stays per batch.
                names, which = np.unique(np.asarray(out["machine"]), return_inverse=True)
                shared = [sys.intern(str(name)) for name in names]
                yield np.asarray(out["output"], dtype=np.float32), [shared[k] for k in which.ravel()]


def ray_engine(options: dict[str, Any]) -> RayEngine:
    return RayEngine(options)


def worker_count(options: dict[str, Any], images: int, batch_size: int) -> int:
    return max(1, min(options["workers"], math.ceil(images / batch_size)))


def shutdown() -> None:
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()
    _restore_auth_mode()
    log.debug("ray: shut down")
