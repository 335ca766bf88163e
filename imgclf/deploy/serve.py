"""`python -m imgclf serve`: a trained model behind HTTP, answering as `imgclf predict` does.

    python -m imgclf serve [--backbone NAME|ensemble] [--host 127.0.0.1] [--port 8080] [--token-file FILE]

The model is the one `predict --backbone` loads (default: the one compare picked on validation,
plots/compare/summary.json), with its temperature and its image recipe; each upload is decoded by the same code
as prepare and predict (imgclf.data.images.try_load_image: the allowed formats only, the pixel limit, DICOM with
--dicom). Routes, by the conventions clients already script against:

    GET  /v2/health/live, /v2/health/ready    Open Inference Protocol (KServe / Triton) health; ready once the
                                              model is loaded and has run once
    GET  /v2/models/<name>                    metadata: classes, inputs (BYTES: encoded images, base64 in JSON;
                                              UINT8: [n, S, S, 3] pixels), outputs, version
    POST /v2/models/<name>/infer              OIP V2 inference: calibrated probabilities and classes
    POST /v1/classify                         one raw image body, or multipart files: class and probabilities
    GET  /metrics                             Prometheus: requests, latency, batch sizes, queue depth, errors

Concurrent requests share backbone passes (dynamic batching: up to --max-batch images, waiting at most
--max-wait-ms for more); decoding runs in a thread pool, the model in one thread, never on the event loop. A
bounded queue answers 503 with Retry-After instead of growing; a request that waits longer than --timeout gets
503 too. Every bad request gets a 4xx whose JSON body is one line, {"error": "..."}: what was received, what
is expected; never a stack trace. SIGTERM stops accepting, answers what is in flight, exits 0. One log line per
request (method, route, status, images, milliseconds): never image bytes, file names or patient data.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.core.errors import UserError, log

# Status codes of the errors a client can cause, by kind (the `kind` label of imgclf_errors_total).
ERRORS = {
    "empty": 400, "body": 400, "json": 400, "tensor": 400, "unauthorized": 401, "not_found": 404, "method": 405,
    "too_large": 413, "media_type": 415, "image": 422, "not_ready": 503, "overloaded": 503, "timeout": 503,
}  # fmt: skip
RETRY_AFTER_S = 1  # what a 503 asks the client to wait
HEALTH_PREFIX = "/v2/health/"  # liveness and readiness answer without a token (orchestrators probe them)


@dataclass
class ServeOptions:
    backbone: str | None = None  # None: compare's pick
    models_dir: Path = Path("models")
    host: str = "127.0.0.1"
    port: int = 8080
    max_batch: int = 32  # images per backbone pass
    max_wait_ms: float = 5.0  # how long a batch waits for more images once it has one
    max_queue: int = 256  # images waiting for the model; beyond: 503
    timeout_s: float = 30.0  # per request, queue and model
    max_body_bytes: int = 20 * 1024 * 1024
    token_file: Path | None = None
    dicom: bool = False  # accept DICOM uploads
    decode_threads: int = 2


class ApiError(Exception):
    """A request the service refuses: its status from ERRORS[kind] and one line for the client."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.status = kind, ERRORS[kind]


def picked_backbone(plots_dir: Path = Path("plots/compare")) -> str:
    """The model compare picked on validation (summary.json's `best`), the default of --backbone."""
    summary = plots_dir / "summary.json"
    try:
        return str(json.loads(summary.read_text(encoding="utf-8"))["best"])
    except (OSError, ValueError, KeyError):
        raise UserError(
            f"no model picked yet ({summary} is missing or has no 'best'); run `dvc repro`, or pass --backbone NAME"
        ) from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ServedModel:
    """The classifiers `predict --backbone NAME` uses, their calibration and recipe; `probabilities` is
    classify()'s arithmetic on one batch of decoded images."""

    def __init__(self, name: str, models_dir: Path) -> None:
        from imgclf.results.predict import chosen_models

        self.name = name
        self.names, self.ensemble_temperature = chosen_models(name, models_dir)
        self.files = [models_dir / n / "model.keras" for n in self.names]
        for path in self.files:
            if not path.is_file() or not (path.parent / "info.json").is_file():
                raise UserError(f"no trained model in {path.parent}; run `dvc repro` first, or pass --models-dir")
        # The version clients see: sha256 of model.keras (the ensemble: of its members' and its record).
        if name == "ensemble":
            parts = [file_sha256(p) for p in self.files] + [file_sha256(models_dir / "ensemble.json")]
            self.version = hashlib.sha256("\n".join(parts).encode()).hexdigest()
        else:
            self.version = file_sha256(self.files[0])
        self.classifiers: list[Any] = []

    def load(self) -> None:
        from imgclf.results.predict import Classifier, check_compatible

        self.classifiers = [Classifier.load(p.parent) for p in self.files]
        self.classes = check_compatible(self.classifiers)
        self.recipe = self.classifiers[0].recipe
        self.sizes = sorted({c.image_size for c in self.classifiers})

    def decode(self, data: bytes, tmp_dir: str, dicom: bool) -> dict[int, np.ndarray]:
        """One upload, decoded as predict decodes a file (at each input size the model needs): the bytes go to a
        private temporary file, read by try_load_image, then deleted. ApiError for what cannot be used."""
        from imgclf.data.dicom import has_dicom_marker
        from imgclf.data.images import try_load_image

        fd, name = tempfile.mkstemp(dir=tmp_dir)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            if not dicom and has_dicom_marker(name):
                raise ApiError("media_type", "received a DICOM file; this service was started without --dicom")
            out = {}
            for size in self.sizes:
                image, reason = try_load_image(Path(name), size, self.recipe)
                if image is None:
                    kind = "media_type" if reason.startswith("not a decodable image") else "image"
                    raise ApiError(kind, f"received bytes that are no usable image: {reason}")
                out[size] = image
            return out
        finally:
            os.unlink(name)

    def probabilities(self, images: list[dict[int, np.ndarray]]) -> np.ndarray:
        """Calibrated probabilities (B, K) float64 of decoded images: each classifier on its input size, the
        ensemble's soft vote and temperature (results.predict.classify, one batch)."""
        from imgclf.results.predict import soft_vote

        members = []
        for clf in self.classifiers:
            members.append(clf.predict_images(np.stack([image[clf.image_size] for image in images])))
        return members[0] if len(members) == 1 else soft_vote(members, self.ensemble_temperature)


class Metrics:
    """Prometheus series in a registry of their own (no process-wide state)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("imgclf_requests", "HTTP requests", ["route", "code"], registry=self.registry)
        self.latency = Histogram(
            "imgclf_request_seconds", "request latency", ["route"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )  # fmt: skip
        self.batch = Histogram(
            "imgclf_batch_images", "images per backbone pass", registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )  # fmt: skip
        self.queue = Gauge("imgclf_queue_images", "images waiting for the model", registry=self.registry)
        self.errors = Counter("imgclf_errors", "refused requests by kind", ["kind"], registry=self.registry)
        self.images = Counter("imgclf_images", "images classified", registry=self.registry)


@dataclass
class _Item:
    image: dict[int, np.ndarray]
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Dynamic batching: images from concurrent requests queue here (bounded) and go through the model together,
    up to max_batch at a time, a batch waiting at most max_wait for more once it has one."""

    def __init__(self, model: ServedModel, options: ServeOptions, metrics: Metrics) -> None:
        self.model, self.options, self.metrics = model, options, metrics
        self.queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self.waiting = 0  # images submitted and not yet handed to the model (queued, or in a batch being filled)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="imgclf-model")  # TensorFlow uses every core

    def submit(self, images: list[dict[int, np.ndarray]]) -> list[asyncio.Future]:
        if self.options.max_queue - self.waiting < len(images):
            raise ApiError(
                "overloaded",
                f"the queue holds {self.waiting} of {self.options.max_queue} images; retry in {RETRY_AFTER_S} s",
            )
        loop = asyncio.get_running_loop()
        futures = []
        for image in images:
            future = loop.create_future()
            self.queue.put_nowait(_Item(image, future))
            futures.append(future)
        self.waiting += len(images)
        self.metrics.queue.set(self.waiting)
        return futures

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        wait_s = self.options.max_wait_ms / 1000
        while True:
            first = await self.queue.get()
            if first is None:  # stop(): everything before it has been answered
                return
            items, deadline, stopping = [first], loop.time() + wait_s, False
            while len(items) < self.options.max_batch:
                try:
                    item = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self.queue.get(), remaining)
                    except TimeoutError:
                        break
                if item is None:
                    stopping = True
                    break
                items.append(item)
            self.waiting -= len(items)
            self.metrics.queue.set(self.waiting)
            live = [i for i in items if not i.future.done()]  # a request that timed out no longer waits
            if live:
                self.metrics.batch.observe(len(live))
                try:
                    probs = await loop.run_in_executor(self.executor, self.model.probabilities, [i.image for i in live])
                except Exception as exc:  # the model failed: every waiting request gets a 500, the service stays
                    log.error("serve: the model failed on a batch of %d: %s", len(live), type(exc).__name__)
                    for i in live:
                        if not i.future.done():
                            i.future.set_exception(exc)
                else:
                    self.metrics.images.inc(len(live))
                    for i, p in zip(live, probs, strict=True):
                        if not i.future.done():
                            i.future.set_result(p)
            if stopping:
                return

    async def stop(self) -> None:
        await self.queue.put(None)


class Service:
    """The Starlette app and what it serves."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        name = options.backbone or picked_backbone()
        self.model = ServedModel(name, options.models_dir)  # checks the files now: a user error before listening
        self.token = read_token(options.token_file) if options.token_file else None
        self.metrics = Metrics()
        self.ready = False
        self.load_error: BaseException | None = None
        self.decoders = ThreadPoolExecutor(options.decode_threads, thread_name_prefix="imgclf-decode")
        self.tmp = tempfile.TemporaryDirectory(
            prefix="imgclf-serve-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
        )
        self.batcher: Batcher | None = None
        self.app = self._build_app()

    # --- lifecycle ---

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Any) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        self.batcher = Batcher(self.model, self.options, self.metrics)
        runner = asyncio.create_task(self.batcher.run())
        loader = loop.run_in_executor(self.batcher.executor, self._load)
        yield
        await self.batcher.stop()  # after uvicorn has answered what was in flight
        await runner
        await loader
        self.batcher.executor.shutdown()
        self.decoders.shutdown()
        self.tmp.cleanup()

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            self.model.load()
            size = self.model.sizes
            warm = [{s: np.zeros((s, s, 3), np.float32) for s in size}]
            self.model.probabilities(warm)  # the first call traces the graph: before the first client
        except Exception as exc:  # ready stays false; the log says why
            self.load_error = exc
            log.error("serve: cannot load %s: %s", self.model.name, exc)
            return
        self.ready = True
        log.info(
            "serve: %s (version %s) ready in %.1f s: %s",
            self.model.name, self.model.version[:12], time.perf_counter() - started, ", ".join(self.model.classes),
        )  # fmt: skip

    # --- the app ---

    def _build_app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.routing import Route

        routes = [
            Route("/v2/health/live", self._wrap("live", self.live), methods=["GET"]),
            Route("/v2/health/ready", self._wrap("ready", self.ready_route), methods=["GET"]),
            Route("/v2/models/{name}", self._wrap("metadata", self.metadata), methods=["GET"]),
            Route("/v2/models/{name}/ready", self._wrap("model_ready", self.model_ready), methods=["GET"]),
            Route("/v2/models/{name}/infer", self._wrap("infer", self.infer), methods=["POST"]),
            Route("/v1/classify", self._wrap("classify", self.classify), methods=["POST"]),
            Route("/metrics", self._wrap("metrics", self.metrics_route), methods=["GET"]),
        ]
        app = Starlette(routes=routes, lifespan=self._lifespan)
        from starlette.exceptions import HTTPException

        async def http_error(request: Any, exc: HTTPException) -> Any:  # 404 / 405 from the router, as JSON
            kind = {404: "not_found", 405: "method"}.get(exc.status_code, "body")
            what = "no such route" if exc.status_code == 404 else "method not allowed here"
            return self._error(request, ApiError(kind, f"{request.method} {request.url.path}: {what}"), "unrouted")

        app.add_exception_handler(HTTPException, http_error)
        return app

    def _error(self, request: Any, error: ApiError, route: str) -> Any:
        from starlette.responses import JSONResponse

        headers = {"Retry-After": str(RETRY_AFTER_S)} if error.status == 503 else {}
        if error.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        self.metrics.errors.labels(error.kind).inc()
        self.metrics.requests.labels(route, str(error.status)).inc()
        line = " ".join(str(error).split())  # one line, whatever a decoder's reason held
        return JSONResponse({"error": line}, status_code=error.status, headers=headers)

    def _wrap(self, route: str, handler: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
        """Token check, errors as one JSON line, metrics and the one log line of every request."""

        async def endpoint(request: Any) -> Any:
            started = time.perf_counter()
            images = 0
            try:
                if self.token is not None and not request.url.path.startswith(HEALTH_PREFIX):
                    check_bearer(request.headers.get("authorization"), self.token)
                response, images = await handler(request)
                self.metrics.requests.labels(route, str(response.status_code)).inc()
            except ApiError as error:
                response = self._error(request, error, route)
            except Exception as exc:  # a bug, not the client's: no trace to the client, the type in the log
                from starlette.responses import JSONResponse

                log.error("serve: %s %s failed: %s", request.method, route, type(exc).__name__)
                self.metrics.errors.labels("internal").inc()
                self.metrics.requests.labels(route, "500").inc()
                response = JSONResponse({"error": "internal error; the service log has its type"}, status_code=500)
            elapsed = time.perf_counter() - started
            self.metrics.latency.labels(route).observe(elapsed)
            log.info("serve: %s %s %d %d image(s) %.1f ms", request.method, route, response.status_code, images,
                     1000 * elapsed)  # fmt: skip
            return response

        return endpoint

    # --- routes ---

    async def live(self, request: Any) -> tuple[Any, int]:
        from starlette.responses import JSONResponse

        return JSONResponse({"live": True}), 0

    async def ready_route(self, request: Any) -> tuple[Any, int]:
        from starlette.responses import JSONResponse

        return JSONResponse({"ready": self.ready}, status_code=200 if self.ready else 503), 0

    def _check_model(self, name: str) -> None:
        if name != self.model.name:
            raise ApiError("not_found", f"model {name!r} is not served here; this service serves {self.model.name!r}")

    def _check_ready(self) -> None:
        if not self.ready:
            why = f"it failed to load ({type(self.load_error).__name__})" if self.load_error else "it is loading"
            raise ApiError("not_ready", f"the model is not ready: {why}; retry in {RETRY_AFTER_S} s")

    async def model_ready(self, request: Any) -> tuple[Any, int]:
        from starlette.responses import JSONResponse

        self._check_model(request.path_params["name"])
        return JSONResponse({"name": self.model.name, "ready": self.ready}, status_code=200 if self.ready else 503), 0

    async def metadata(self, request: Any) -> tuple[Any, int]:
        from starlette.responses import JSONResponse

        self._check_model(request.path_params["name"])
        self._check_ready()
        size = self.model.sizes[0]
        inputs = [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
        if len(self.model.sizes) == 1:
            inputs.append({"name": "image", "datatype": "UINT8", "shape": [-1, size, size, 3]})
        body = {
            "name": self.model.name,
            "versions": [self.model.version],
            "platform": "tensorflow_keras",
            "inputs": inputs,
            "outputs": [
                {"name": "probabilities", "datatype": "FP64", "shape": [-1, len(self.model.classes)]},
                {"name": "class", "datatype": "BYTES", "shape": [-1]},
            ],
            "parameters": {
                "classes": self.model.classes,
                "members": self.model.names,
                "calibrated": True,
                "image_size": size,
                "bytes_input": "encoded images (PNG, JPEG, ... as prepare reads them), base64 in JSON",
                "uint8_input": "RGB pixels already resized to image_size x image_size, row-major",
                "dicom": self.options.dicom,
                "max_body_bytes": self.options.max_body_bytes,
                "max_batch": self.options.max_batch,
            },
        }
        return JSONResponse(body), 0

    async def metrics_route(self, request: Any) -> tuple[Any, int]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from starlette.responses import Response

        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST), 0

    async def _read_body(self, request: Any) -> bytes:
        limit = self.options.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise ApiError("too_large", f"received a body of {declared} bytes; at most {limit} are accepted")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError("too_large", f"received more than {limit} bytes; at most {limit} are accepted")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _decode_all(self, blobs: list[bytes], what: str) -> list[dict[int, np.ndarray]]:
        loop = asyncio.get_running_loop()
        for k, blob in enumerate(blobs):
            if not blob:
                raise ApiError("empty", f"{what} {k + 1} of {len(blobs)} is empty; send the image's bytes")
        jobs = [
            loop.run_in_executor(self.decoders, self.model.decode, b, self.tmp.name, self.options.dicom) for b in blobs
        ]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for k, result in enumerate(results):
            if isinstance(result, ApiError):
                prefix = f"{what} {k + 1} of {len(blobs)}: " if len(blobs) > 1 else ""
                raise ApiError(result.kind, prefix + str(result))
            if isinstance(result, BaseException):
                raise result
        return list(results)

    async def _classify_images(self, images: list[dict[int, np.ndarray]]) -> np.ndarray:
        if len(images) > self.options.max_queue:
            raise ApiError("too_large", f"received {len(images)} images; at most {self.options.max_queue} per request")
        assert self.batcher is not None
        futures = self.batcher.submit(images)
        try:
            async with asyncio.timeout(self.options.timeout_s):
                return np.stack(await asyncio.gather(*futures))
        except TimeoutError:
            for f in futures:
                f.cancel()
            raise ApiError(
                "timeout", f"not answered within {self.options.timeout_s:g} s (the service is busy); retry later"
            ) from None

    async def infer(self, request: Any) -> tuple[Any, int]:
        from starlette.responses import JSONResponse

        self._check_model(request.path_params["name"])
        self._check_ready()
        body = await self._read_body(request)
        images, request_id = await self._infer_inputs(body)
        probs = await self._classify_images(images)
        classes = self.model.classes
        out = {
            "model_name": self.model.name,
            "model_version": self.model.version,
            "outputs": [
                {"name": "probabilities", "datatype": "FP64", "shape": list(probs.shape),
                 "data": [float(v) for v in probs.ravel()]},
                {"name": "class", "datatype": "BYTES", "shape": [len(probs)],
                 "data": [classes[int(i)] for i in probs.argmax(axis=1)]},
            ],
        }  # fmt: skip
        if request_id is not None:
            out["id"] = request_id
        return JSONResponse(out), len(images)

    async def _infer_inputs(self, body: bytes) -> tuple[list[dict[int, np.ndarray]], Any]:
        """The images of an OIP V2 request: one input, BYTES (base64 encoded images) or UINT8 ([n, S, S, 3])."""
        if not body:
            raise ApiError("empty", "received an empty body; expected an Open Inference Protocol V2 JSON request")
        try:
            request = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise ApiError(
                "json", f"received a body that is not JSON ({type(exc).__name__}); expected an OIP V2 request"
            ) from None
        inputs = request.get("inputs") if isinstance(request, dict) else None
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
            raise ApiError("json", 'expected {"inputs": [one input: {"name", "datatype", "shape", "data"}]}')
        tensor = inputs[0]
        datatype, shape, data = tensor.get("datatype"), tensor.get("shape"), tensor.get("data")
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and d >= 0 for d in shape)
            or not isinstance(data, list)
        ):
            raise ApiError("tensor", "the input needs a shape (a list of sizes) and its data (a flat list)")
        if math.prod(shape) != len(data):
            raise ApiError("tensor", f"received shape {shape} ({math.prod(shape)} values) with {len(data)} values")
        if datatype == "BYTES":
            if len(shape) != 1 or not all(isinstance(v, str) for v in data):
                raise ApiError("tensor", f"BYTES input: expected shape [n] of base64 strings; received shape {shape}")
            try:
                blobs = [base64.b64decode(v, validate=True) for v in data]
            except (binascii.Error, ValueError):
                raise ApiError("tensor", "BYTES input: an element is not valid base64 (standard alphabet)") from None
            images = await self._decode_all(blobs, "image")
        elif datatype == "UINT8":
            size = self.model.sizes[0]
            if len(self.model.sizes) != 1 or len(shape) != 4 or shape[1:] != [size, size, 3]:
                raise ApiError("tensor", f"UINT8 input: expected shape [n, {size}, {size}, 3]; received {shape}")
            if not all(type(v) is int and 0 <= v <= 255 for v in data):
                raise ApiError("tensor", "UINT8 input: the data must be integers 0-255")
            array = np.asarray(data, dtype=np.float32).reshape(shape)
            images = [{size: array[k]} for k in range(shape[0])]
        else:
            raise ApiError("tensor", f"received datatype {datatype!r}; expected BYTES (encoded images) or UINT8")
        if not images:
            raise ApiError("tensor", "received no images (shape [0, ...]); send at least one")
        return images, request.get("id")

    async def classify(self, request: Any) -> tuple[Any, int]:
        from starlette.requests import Request
        from starlette.responses import JSONResponse

        self._check_ready()
        body = await self._read_body(request)
        if request.headers.get("content-type", "").startswith("multipart/form-data"):

            async def replay() -> dict[str, Any]:
                return {"type": "http.request", "body": body, "more_body": False}

            try:
                form = await Request(request.scope, replay).form(
                    max_files=self.options.max_queue, max_fields=self.options.max_queue,
                    max_part_size=self.options.max_body_bytes,
                )  # fmt: skip
            except Exception as exc:  # python-multipart's and Starlette's parse errors
                raise ApiError(
                    "body", f"received a multipart body that cannot be parsed ({type(exc).__name__})"
                ) from None
            files = [v for _, v in form.multi_items() if hasattr(v, "read")]
            if not files:
                raise ApiError("empty", "received a multipart body without files; send images as file fields")
            blobs = [await f.read() for f in files]
            await form.close()
            images = await self._decode_all(blobs, "file")
        else:
            if not body:
                raise ApiError("empty", "received an empty body; send one image's bytes (or multipart files)")
            images = await self._decode_all([body], "image")
        probs = await self._classify_images(images)
        results = [
            {"class": self.model.classes[int(p.argmax())],
             "probabilities": {c: float(v) for c, v in zip(self.model.classes, p, strict=True)}}
            for p in probs
        ]  # fmt: skip
        head = {"model": self.model.name, "version": self.model.version}
        multipart = request.headers.get("content-type", "").startswith("multipart/form-data")
        return JSONResponse({**head, "results": results} if multipart else {**results[0], **head}), len(images)


def read_token(path: Path) -> bytes:
    try:
        token = Path(path).read_bytes().strip()
    except OSError as exc:
        raise UserError(f"--token-file {path}: cannot read it ({exc.strerror or exc})") from None
    if len(token) < 16:
        raise UserError(
            f"--token-file {path} holds {len(token)} bytes; use at least 16 random ones (e.g. `openssl rand -hex 32`)"
        )
    return token


def check_bearer(header: str | None, token: bytes) -> None:
    """`Authorization: Bearer <token>`, compared in constant time."""
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise ApiError("unauthorized", "no bearer token; send Authorization: Bearer <token>")
    if not hmac.compare_digest(given.strip().encode(), token):
        raise ApiError("unauthorized", "the bearer token is not this service's")


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but a stop by SIGTERM or Ctrl-C, once drained, is a clean exit (status 0): uvicorn
        0.55 raises the signal again after its graceful shutdown, which would end the process with it."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

    return Server


def serve(options: ServeOptions) -> int:
    """Run until SIGTERM or Ctrl-C: 0 after a clean stop."""
    import uvicorn

    service = Service(options)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.WARNING)
    config = uvicorn.Config(
        service.app, host=options.host, port=options.port, log_config=None, access_log=False,
        timeout_graceful_shutdown=max(1, int(options.timeout_s) + 5), server_header=False,
    )  # fmt: skip
    server = _server_class()(config)
    log.info("serve: %s on http://%s:%d (%s)", service.model.name, options.host, options.port,
             "token required" if service.token else "no token")  # fmt: skip
    server.run()
    log.info("serve: stopped")
    return 0 if server.started else 1
