"""`python -m imgclf serve`: a trained model behind HTTP, answering as `imgclf predict` does.

    python -m imgclf serve [--backbone NAME|ensemble] [--host 127.0.0.1] [--port 8080] [--token-file FILE]

The model is the one `predict --backbone` loads (default: the one compare picked on validation,
plots/compare/summary.json), with its temperature and its image recipe; each upload is decoded by the same code
as prepare and predict (imgclf.data.images.try_load_image: the allowed formats only, the pixel limit, DICOM with
--dicom). Routes, by the conventions clients already script against:

    GET  /v2/health/live, /v2/health/ready    Open Inference Protocol (KServe / Triton) health; ready once the
                                              model is loaded and has run once (also /v2/models/<name>/ready)
    GET  /v2/models/<name>                    metadata: classes, inputs (BYTES: encoded images, base64 in JSON;
                                              UINT8: [n, S, S, 3] pixels), outputs, version
    POST /v2/models/<name>/infer              OIP V2 inference: calibrated probabilities and classes
    POST /v1/classify                         one raw image body, or multipart files: class and probabilities
    GET  /metrics                             Prometheus: requests, latency, batch sizes, queue depth, errors

Concurrent requests share backbone passes (dynamic batching: up to --max-batch images, waiting at most
--max-wait-ms for more); parsing and decoding run in a thread pool, the model in one thread, never on the event
loop. At most --max-inflight inference requests are admitted at once (reading, decoding or queued) and at most
--max-queue images wait for the model; beyond either, 503 with Retry-After at once, before the body is read. A
request not answered within --timeout (reading, decoding, queue and model) gets 503 too. Every bad request gets
a 4xx whose JSON body is one line, {"error": "..."}: what was received, what is expected; never a stack trace.
SIGTERM stops accepting, answers what is in flight, exits 0; a model that cannot be loaded stops the service
(exit 2). One log line per request (method, route, status, images, milliseconds): never image bytes, file names
or patient data.
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
    "too_large": 413, "media_type": 415, "image": 422, "disconnected": 499, "storage": 503, "not_ready": 503,
    "overloaded": 503, "timeout": 503,
}  # fmt: skip
# Decoder reasons (imgclf.data.images / dicom) that say the bytes are of a kind this service does not read: 415;
# any other reason is a file of a readable kind that cannot be used (truncated, corrupt, a pixel bomb): 422.
UNSUPPORTED = ("not a decodable image", "not a DICOM file", "unsupported DICOM")
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
    max_inflight: int = 64  # inference requests admitted at once (reading, decoding, queued); beyond: 503
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

        try:
            fd, name = tempfile.mkstemp(dir=tmp_dir)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        except OSError as exc:  # a full /dev/shm (Docker's is 64 MB): the service's limit, not the client's fault
            if "name" in locals():
                Path(name).unlink(missing_ok=True)
            raise ApiError("storage", f"no room to decode the upload ({exc.strerror or exc}); retry later") from None
        try:
            if not dicom and has_dicom_marker(name):
                raise ApiError("media_type", "received a DICOM file; this service was started without --dicom")
            out = {}
            for size in self.sizes:
                image, reason = try_load_image(Path(name), size, self.recipe)
                if image is None:
                    if reason.startswith("unreadable"):  # the temporary file itself: the service's error
                        raise ApiError("storage", f"the upload could not be read back ({reason}); retry later")
                    kind = "media_type" if reason.startswith(UNSUPPORTED) else "image"
                    expected = " (or DICOM with its DICM marker)" if dicom and kind == "media_type" else ""
                    raise ApiError(kind, f"received bytes that are no usable image: {reason}{expected}")
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
    counted: bool = True  # counted in Batcher.waiting until handed to the model or given up


class Batcher:
    """Dynamic batching: images from concurrent requests queue here and go through the model together, up to
    max_batch at a time, a batch waiting at most max_wait for more once it has one. `waiting` counts the images
    submitted and not yet handed to the model (a request that gives up uncounts its own at once)."""

    def __init__(self, model: ServedModel, options: ServeOptions, metrics: Metrics) -> None:
        self.model, self.options, self.metrics = model, options, metrics
        self.queue: asyncio.Queue[Any] = asyncio.Queue()  # _Item, _WAKE or None (stop)
        self.waiting = 0
        self.draining = False  # shutting down: no batch waits for company any more
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="imgclf-model")  # TensorFlow uses every core

    def _uncount(self, item: _Item) -> None:
        if item.counted:
            item.counted = False
            self.waiting -= 1
            self.metrics.queue.set(self.waiting)

    def submit(self, images: list[dict[int, np.ndarray]]) -> list[asyncio.Future]:
        if self.options.max_queue - self.waiting < len(images):
            raise ApiError(
                "overloaded",
                f"the queue holds {self.waiting} of {self.options.max_queue} images; retry in {RETRY_AFTER_S} s",
            )
        loop = asyncio.get_running_loop()
        futures = []
        for image in images:
            item = _Item(image, loop.create_future())
            item.future.add_done_callback(lambda _, item=item: self._uncount(item))  # answered or given up
            self.queue.put_nowait(item)
            futures.append(item.future)
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
            if first is _WAKE:
                continue
            items, deadline, stopping = [first], loop.time() + (0 if self.draining else wait_s), False
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
                if item is _WAKE:  # drain(): run what there is now
                    break
                items.append(item)
            live = [i for i in items if not i.future.done()]  # a request that timed out no longer waits
            for i in live:
                self._uncount(i)  # handed to the model
            if live:
                self.metrics.batch.observe(len(live))
                try:
                    probs = await loop.run_in_executor(self.executor, self.model.probabilities, [i.image for i in live])
                except Exception as exc:  # the model failed: its requests get a 500, the service stays
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

    def drain(self) -> None:
        """Shutdown has begun (SIGTERM): the batch being filled runs now, and later ones do not wait."""
        self.draining = True
        self.queue.put_nowait(_WAKE)

    async def stop(self) -> None:
        await self.queue.put(None)


_WAKE = object()  # a queue marker: drain() wakes a batch that waits for company


def _private_tmp() -> tempfile.TemporaryDirectory:
    """Where uploads are decoded: memory (/dev/shm) when it can be written, else the system's temporary folder."""
    shm = "/dev/shm"
    usable = os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK)
    return tempfile.TemporaryDirectory(prefix="imgclf-serve-", dir=shm if usable else None)


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ApiError(
            "json", f"received a body that is not JSON ({type(exc).__name__}); expected an OIP V2 request"
        ) from None


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
        self.inflight = 0  # inference requests admitted (reading, decoding, queued or in the model)
        self.decoders = ThreadPoolExecutor(options.decode_threads, thread_name_prefix="imgclf-decode")
        self.tmp = _private_tmp()
        self.batcher: Batcher | None = None
        self.server: Any = None  # the uvicorn server, told to exit when the model cannot be loaded
        self.app = self._build_app()

    # --- lifecycle ---

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Any) -> AsyncIterator[None]:
        self.loop = asyncio.get_running_loop()
        self.batcher = Batcher(self.model, self.options, self.metrics)
        runner = asyncio.create_task(self.batcher.run())
        runner.add_done_callback(self._batcher_ended)
        loader = asyncio.get_running_loop().run_in_executor(self.batcher.executor, self._load)
        yield
        await self.batcher.stop()  # after uvicorn has answered what was in flight
        await asyncio.gather(runner, loader, return_exceptions=True)
        self.batcher.executor.shutdown()
        self.decoders.shutdown()
        self.tmp.cleanup()

    def shutting_down(self) -> None:
        """Called from the signal handler: the batcher stops waiting for company (in-flight requests finish)."""
        if self.batcher is not None and getattr(self, "loop", None) is not None:
            self.loop.call_soon_threadsafe(self.batcher.drain)

    def _batcher_ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:  # a bug: stop answering ready, say why
            self.ready = False
            self.load_error = task.exception()
            log.error(
                "serve: the batcher stopped (%s); the service is no longer ready", type(task.exception()).__name__
            )

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            self.model.load()
            # Every batch shape traces the graph once (Keras generalises after a few): trace before the first client.
            for n in sorted({1, 2, self.options.max_batch}):
                self.model.probabilities([{s: np.zeros((s, s, 3), np.float32) for s in self.model.sizes}] * n)
        except Exception as exc:  # the service cannot serve: it stops with the reason (serve() exits 2)
            self.load_error = exc
            log.error(
                "error: cannot load %s: %s",
                self.model.name,
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            )
            if self.server is not None:
                self.server.should_exit = True
            return
        self.ready = True
        log.info(
            "serve: %s (version %s) ready in %.1f s: %s",
            self.model.name, self.model.version[:12], time.perf_counter() - started, ", ".join(self.model.classes),
        )  # fmt: skip

    # --- the app ---

    def _build_app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.routing import Route

        routes = [
            Route("/v2/health/live", self._wrap("live", self.live, open_route=True), methods=["GET"]),
            Route("/v2/health/ready", self._wrap("ready", self.ready_route, open_route=True), methods=["GET"]),
            Route("/v2/models/{name}", self._wrap("metadata", self.metadata), methods=["GET"]),
            Route("/v2/models/{name}/ready", self._wrap("model_ready", self.model_ready), methods=["GET"]),
            Route("/v2/models/{name}/infer", self._wrap("infer", self.infer, inference=True), methods=["POST"]),
            Route("/v1/classify", self._wrap("classify", self.classify, inference=True), methods=["POST"]),
            Route("/metrics", self._wrap("metrics", self.metrics_route), methods=["GET"]),
        ]
        app = Starlette(routes=routes, lifespan=self._lifespan)
        app.router.redirect_slashes = False  # /v1/classify/ is a 404, not a redirect around the token check

        async def http_error(request: Any, exc: HTTPException) -> Any:  # 404 / 405 from the router, as JSON
            kind = {404: "not_found", 405: "method"}.get(exc.status_code, "body")
            what = "no such route" if exc.status_code == 404 else "method not allowed here"
            response = self._error(ApiError(kind, f"{request.method} {request.url.path}: {what}"), "unrouted")
            response.headers.update(exc.headers or {})  # 405's Allow
            log.info("serve: %s unrouted %d 0 image(s)", request.method, response.status_code)
            return response

        app.add_exception_handler(HTTPException, http_error)
        return app

    def _error(self, error: ApiError, route: str) -> Any:
        from starlette.responses import JSONResponse

        headers = {"Retry-After": str(RETRY_AFTER_S)} if error.status == 503 else {}
        if error.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        self.metrics.errors.labels(error.kind).inc()
        self.metrics.requests.labels(route, str(error.status)).inc()
        line = " ".join(str(error).split())  # one line, whatever a decoder's reason held
        return JSONResponse({"error": line}, status_code=error.status, headers=headers)

    def _wrap(
        self, route: str, handler: Callable[[Any], Awaitable[Any]], open_route: bool = False, inference: bool = False
    ) -> Callable[[Any], Awaitable[Any]]:
        """Token check (not on `open_route`s), admission and the deadline (on `inference` routes), errors as one
        JSON line, metrics, and the one log line of every request."""
        from starlette.requests import ClientDisconnect

        async def endpoint(request: Any) -> Any:
            started = time.perf_counter()
            images, admitted, note = 0, False, ""
            try:
                if self.token is not None and not open_route:
                    check_bearer(request.headers.get("authorization"), self.token)
                if inference:
                    if self.inflight >= self.options.max_inflight:
                        raise ApiError(
                            "overloaded",
                            f"{self.inflight} requests are in progress, the most this service takes; "
                            f"retry in {RETRY_AFTER_S} s",
                        )
                    self.inflight += 1
                    admitted = True
                    try:
                        async with asyncio.timeout(self.options.timeout_s):
                            response, images = await handler(request)
                    except TimeoutError:
                        raise ApiError(
                            "timeout",
                            f"not answered within {self.options.timeout_s:g} s (reading, decoding and the model); "
                            "retry later",
                        ) from None
                else:
                    response, images = await handler(request)
                self.metrics.requests.labels(route, str(response.status_code)).inc()
            except ApiError as error:
                response = self._error(error, route)
            except ClientDisconnect:  # the client went away mid-upload: nobody to answer
                response = self._error(ApiError("disconnected", "the client closed the connection"), route)
            except Exception as exc:  # a bug, not the client's: no trace to the client, the type in the log line
                from starlette.responses import JSONResponse

                note = f" internal error {type(exc).__name__}"
                self.metrics.errors.labels("internal").inc()
                self.metrics.requests.labels(route, "500").inc()
                response = JSONResponse({"error": "internal error; the service log has its type"}, status_code=500)
            finally:
                if admitted:
                    self.inflight -= 1
            elapsed = time.perf_counter() - started
            self.metrics.latency.labels(route).observe(elapsed)
            level = logging.ERROR if note else logging.INFO
            log.log(level, "serve: %s %s %d %d image(s) %.1f ms%s", request.method, route, response.status_code,
                    images, 1000 * elapsed, note)  # fmt: skip
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
            why = f"it failed ({type(self.load_error).__name__})" if self.load_error else "it is loading"
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
            inputs.append({"name": "pixels", "datatype": "UINT8", "shape": [-1, size, size, 3]})
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
                "max_images_per_request": self.options.max_queue,
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

    def _check_count(self, n: int, what: str) -> None:
        if n > self.options.max_queue:
            raise ApiError("too_large", f"received {n} {what}; at most {self.options.max_queue} per request")

    async def _in_pool(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.decoders, function, *args)

    async def _decode_all(self, blobs: list[bytes], what: str) -> list[dict[int, np.ndarray]]:
        self._check_count(len(blobs), f"{what}s")
        for k, blob in enumerate(blobs):
            if not blob:
                raise ApiError("empty", f"{what} {k + 1} of {len(blobs)} is empty; send the image's bytes")
        jobs = [asyncio.ensure_future(self._in_pool(self.model.decode, b, self.tmp.name, self.options.dicom))
                for b in blobs]  # fmt: skip
        try:
            for k, job in enumerate(jobs):  # in order: the first bad one answers, the rest are not waited for
                try:
                    await job
                except ApiError as error:
                    prefix = f"{what} {k + 1} of {len(blobs)}: " if len(blobs) > 1 else ""
                    raise ApiError(error.kind, prefix + str(error)) from None
        finally:
            for job in jobs:
                job.cancel()
        return [job.result() for job in jobs]

    async def _classify_images(self, images: list[dict[int, np.ndarray]]) -> np.ndarray:
        assert self.batcher is not None
        futures = self.batcher.submit(images)
        try:
            return np.stack(await asyncio.gather(*futures))
        finally:
            for future in futures:  # a timeout (or a disconnect): the batcher skips the images nobody waits for
                if not future.done():
                    future.cancel()

    async def infer(self, request: Any) -> tuple[Any, int]:
        from starlette.responses import JSONResponse

        self._check_model(request.path_params["name"])
        self._check_ready()
        body = await self._read_body(request)
        if not body:
            raise ApiError("empty", "received an empty body; expected an Open Inference Protocol V2 JSON request")
        kind, payload, request_id = await self._in_pool(self._infer_inputs, body)
        images = await self._decode_all(payload, "image") if kind == "BYTES" else payload
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

    def _infer_inputs(self, body: bytes) -> tuple[str, Any, Any]:
        """An OIP V2 request's one input, parsed and checked (in the decode pool, off the event loop): ("BYTES",
        the decoded base64 blobs, id) or ("UINT8", the images at the model's size, id)."""
        request = _parse_json(body)
        inputs = request.get("inputs") if isinstance(request, dict) else None
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
            raise ApiError("json", 'expected {"inputs": [one input: {"name", "datatype", "shape", "data"}]}')
        tensor = inputs[0]
        datatype, shape, data = tensor.get("datatype"), tensor.get("shape"), tensor.get("data")
        if (
            not isinstance(shape, list)
            or not all(type(d) is int and d >= 0 for d in shape)
            or not isinstance(data, list)
        ):
            raise ApiError("tensor", "the input needs a shape (a list of sizes) and its data (a list)")
        if shape and shape[0] == 0:
            raise ApiError("tensor", "received no images (shape [0, ...]); send at least one")
        if shape:
            self._check_count(shape[0], "images")
        if datatype == "BYTES":
            if len(shape) != 1 or len(data) != shape[0] or not all(isinstance(v, str) for v in data):
                raise ApiError(
                    "tensor", f"BYTES input: expected shape [n] and n base64 strings; received shape {shape}"
                )
            try:
                return "BYTES", [base64.b64decode(v, validate=True) for v in data], request.get("id")
            except (binascii.Error, ValueError):
                raise ApiError("tensor", "BYTES input: an element is not valid base64 (standard alphabet)") from None
        if datatype == "UINT8":
            size = self.model.sizes[0]
            if len(self.model.sizes) != 1 or len(shape) != 4 or shape[1:] != [size, size, 3]:
                raise ApiError("tensor", f"UINT8 input: expected shape [n, {size}, {size}, 3]; received {shape}")
            try:
                pixels = np.array(data)  # flat or nested, as the protocol allows
            except (ValueError, OverflowError):
                raise ApiError("tensor", "UINT8 input: the data must be integers 0-255") from None
            if pixels.dtype.kind not in "iu" or pixels.size != math.prod(shape):
                raise ApiError("tensor", f"UINT8 input: expected {math.prod(shape)} integers 0-255 for shape {shape}")
            if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
                raise ApiError("tensor", "UINT8 input: the data must be integers 0-255")
            array = pixels.reshape(shape).astype(np.float32)
            return "UINT8", [{size: array[k]} for k in range(shape[0])], request.get("id")
        raise ApiError("tensor", f"received datatype {datatype!r}; expected BYTES (encoded images) or UINT8")

    async def classify(self, request: Any) -> tuple[Any, int]:
        from starlette.requests import Request
        from starlette.responses import JSONResponse

        self._check_ready()
        body = await self._read_body(request)
        multipart = request.headers.get("content-type", "").lower().startswith("multipart/form-data")
        if multipart:

            async def replay() -> dict[str, Any]:
                return {"type": "http.request", "body": body, "more_body": False}

            try:
                form = await Request(request.scope, replay).form(
                    max_files=self.options.max_queue + 1, max_fields=self.options.max_queue + 1,
                    max_part_size=self.options.max_body_bytes,
                )  # fmt: skip
            except Exception as exc:  # python-multipart's and Starlette's parse errors
                raise ApiError(
                    "body", f"received a multipart body that cannot be parsed ({type(exc).__name__})"
                ) from None
            try:
                files = [v for _, v in form.multi_items() if hasattr(v, "read")]
                if not files:
                    raise ApiError("empty", "received a multipart body without files; send images as file fields")
                self._check_count(len(files), "files")
                blobs = [await f.read() for f in files]
            finally:
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
    """`Authorization: Bearer <token>`: the SHA-256 digests compared in constant time (so not even the token's
    length leaks; header bytes as HTTP carries them, latin-1)."""
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise ApiError("unauthorized", "no bearer token; send Authorization: Bearer <token>")
    digest = hashlib.sha256(given.strip().encode("latin-1", errors="replace")).digest()
    if not hmac.compare_digest(digest, hashlib.sha256(token).digest()):
        raise ApiError("unauthorized", "the bearer token is not this service's")


def _server_class(service: Service) -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but a stop by SIGTERM or Ctrl-C tells the batcher to stop waiting for company, and
        once drained is a clean exit (status 0): uvicorn 0.55 raises the signal again after its graceful
        shutdown, which would end the process with it."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            self._captured_signals.clear()
            service.shutting_down()

    return Server


def check_port(host: str, port: int) -> None:
    """The address is free (checked before the model loads: uvicorn would load it, then fail to bind)."""
    import socket

    try:
        with socket.create_server((host, port), reuse_port=False):
            pass
    except OSError as exc:
        raise UserError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port or --host"
        ) from None


def serve(options: ServeOptions) -> int:
    """Run until SIGTERM or Ctrl-C: 0 after a clean stop, 2 when the model cannot be loaded."""
    import uvicorn
    from starlette.formparsers import MultiPartParser

    check_port(options.host, options.port)
    # Multipart file parts stay in memory up to the body limit (Starlette spools parts over 1 MB to a file in the
    # system's temporary folder: patient images on disk).
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, options.max_body_bytes)
    service = Service(options)
    if options.host not in ("127.0.0.1", "localhost", "::1") and service.token is None:
        log.warning("serve: listening on %s without --token-file: anyone who can reach it can use it", options.host)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.WARNING)
    config = uvicorn.Config(
        service.app, host=options.host, port=options.port, log_config=None, access_log=False,
        timeout_graceful_shutdown=max(1, math.ceil(options.timeout_s) + 5), server_header=False,
    )  # fmt: skip
    server = _server_class(service)(config)
    service.server = server
    log.info("serve: %s on http://%s:%d (%s)", service.model.name, options.host, options.port,
             "token required" if service.token else "no token")  # fmt: skip
    server.run()
    if service.load_error is not None and not service.ready:
        return 2
    log.info("serve: stopped")
    return 0 if server.started else 1
