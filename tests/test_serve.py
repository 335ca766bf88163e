"""`python -m imgclf serve` on the trained tiny project: real servers on free loopback ports, started and
stopped here. It answers as `imgclf predict` does (one backbone and the ensemble, odd image kinds included),
refuses every kind of bad input with its 4xx, enforces the token, flips to ready after loading, sheds load with
503, times out, and drains in-flight requests on SIGTERM."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from dicom_files import write_dicom
from helpers import env
from PIL import Image

TOKEN = "s3cret-token-of-this-test-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, project: Path, tmp: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"serve-{self.port}.log"
        cmd = [sys.executable, "-m", "imgclf", "serve", "--port", str(self.port), *args]
        with open(self.log, "w") as stderr:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                cmd, cwd=project, env=env(project), stdout=subprocess.DEVNULL, stderr=stderr
            )
        self.readiness: list[int] = []  # every /v2/health/ready status seen until 200

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                status = httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            self.readiness.append(status)
            if status == 200:
                return
            time.sleep(0.05)
        raise AssertionError(f"not ready in {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """VGG16 (bfloat16 in the tiny project) with a token, DICOM on, a 1 MB body limit."""
    tmp = tmp_path_factory.mktemp("serve")
    token = tmp / "token"
    token.write_text(TOKEN + "\n")
    srv = Server(trained, tmp, "--backbone", "vgg16", "--token-file", str(token), "--max-body-mb", "1",
                 "--max-wait-ms", "20", "--dicom")  # fmt: skip
    srv.wait_ready()
    yield srv
    assert srv.stop() == 0


def some_images(project: Path, n: int = 6) -> list[Path]:
    return sorted((project / "images").rglob("*.png"))[::7][:n]


def odd_images(project: Path, folder: Path) -> list[Path]:
    """Kinds whose decoding differs by recipe: a large JPEG (draft scaling), RGBA on the background colour, a
    16-bit PNG (the high-bit-depth rule), a grey PNG."""
    folder.mkdir(exist_ok=True)
    base = Image.open(some_images(project, 1)[0]).convert("RGB")
    base.resize((900, 700)).save(folder / "large.jpg", quality=90)
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    rgba.save(folder / "alpha.png")
    deep = (np.asarray(base.convert("L"), np.uint16) * 37).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep.png")
    base.convert("L").save(folder / "grey.png")
    return sorted(folder.iterdir())


def predict_table(project: Path, paths: list[Path], backbone: str) -> pd.DataFrame:
    cmd = [sys.executable, "-m", "imgclf", "predict", "--backbone", backbone, *map(str, paths)]
    out = subprocess.run(cmd, cwd=project, env=env(project), capture_output=True, text=True, check=True).stdout
    return pd.read_csv(io.StringIO(out), keep_default_na=False)


def probabilities(table: pd.DataFrame) -> tuple[list[str], np.ndarray]:
    classes = [c.removeprefix("p_") for c in table.columns if c.startswith("p_")]
    return classes, table[[f"p_{c}" for c in classes]].astype(float).to_numpy()


def test_readiness_flips_after_loading_and_the_token_is_enforced(server: Server, trained: Path) -> None:
    assert server.readiness[0] == 503 and server.readiness[-1] == 200  # not ready while loading, then ready
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}  # health needs no token
    image = some_images(trained, 1)[0].read_bytes()
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": TOKEN}, {"Authorization": "Bearer"}):
        answer = httpx.post(f"{server.url}/v1/classify", content=image, headers=headers)
        assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer", headers
        assert set(answer.json()) == {"error"}
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    assert httpx.get(f"{server.url}/v2/models/vgg16").status_code == 401
    assert httpx.post(f"{server.url}/v1/classify", content=image, headers=auth()).status_code == 200


def test_one_backbone_answers_as_predict_for_odd_images_and_dicom(server: Server, trained: Path, tmp_path) -> None:
    paths = odd_images(trained, tmp_path / "odd") + some_images(trained, 2)
    write_dicom(tmp_path / "scan.dcm", (np.arange(48 * 40).reshape(48, 40) * 7) % 4096)
    paths.append(tmp_path / "scan.dcm")
    expected = predict_table(trained, paths, "vgg16")
    assert (expected.error == "").all(), expected.error
    classes, want = probabilities(expected)
    got, versions = [], set()
    for path in paths:
        answer = httpx.post(f"{server.url}/v1/classify", content=path.read_bytes(), headers=auth(), timeout=60)
        assert answer.status_code == 200, (path.name, answer.text)
        got.append([answer.json()["probabilities"][c] for c in classes])
        versions.add(answer.json()["version"])
    np.testing.assert_allclose(got, want, atol=1e-6)  # a batch of other shapes moves the last float bits only
    assert versions == {hashlib.sha256((trained / "models/vgg16/model.keras").read_bytes()).hexdigest()}


def test_the_ensemble_answers_as_predict_on_every_route(trained: Path, tmp_path: Path) -> None:
    srv = Server(trained, tmp_path, "--backbone", "ensemble", "--max-wait-ms", "20")
    try:
        srv.wait_ready()
        paths = some_images(trained)
        expected = predict_table(trained, paths, "ensemble")
        classes, want = probabilities(expected)
        meta = httpx.get(f"{srv.url}/v2/models/ensemble").json()
        assert meta["parameters"]["classes"] == classes and meta["parameters"]["members"] == ["vgg16", "mobilenet"]
        encoded = [base64.b64encode(p.read_bytes()).decode() for p in paths]
        request = {"id": "r1", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(paths)],
                                           "data": encoded}]}  # fmt: skip
        answer = httpx.post(f"{srv.url}/v2/models/ensemble/infer", json=request, timeout=60).json()
        assert answer["id"] == "r1" and answer["model_version"] == meta["versions"][0]
        probs = np.asarray(answer["outputs"][0]["data"]).reshape(answer["outputs"][0]["shape"])
        np.testing.assert_allclose(probs, want, atol=1e-6)
        assert answer["outputs"][1]["data"] == list(expected.predicted)

        files = [("files", (f"{k}.png", p.read_bytes(), "image/png")) for k, p in enumerate(paths)]
        multi = httpx.post(f"{srv.url}/v1/classify", files=files, timeout=60).json()
        np.testing.assert_allclose(
            [[r["probabilities"][c] for c in classes] for r in multi["results"]], want, atol=1e-6
        )

        # UINT8 pixels already at the model's size (decoded with the model's recipe): the file's answer.
        from imgclf.data.images import ImageRecipe, load_image

        info = json.loads((trained / "models/vgg16/info.json").read_text())
        size = meta["parameters"]["image_size"]
        pixels = load_image(paths[0], size, ImageRecipe.from_params(info["image_recipe"])).astype(np.uint8)
        tensor = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, size, size, 3],
                              "data": pixels.tolist()}]}  # fmt: skip
        answer = httpx.post(f"{srv.url}/v2/models/ensemble/infer", json=tensor, timeout=60).json()
        np.testing.assert_allclose(answer["outputs"][0]["data"], want[0], atol=1e-6)
    finally:
        assert srv.stop() == 0


def bad_requests(tmp: Path, good: bytes, size: int) -> dict[str, tuple[str, str, dict, int]]:
    """name -> (method, route, httpx keyword arguments, expected status)"""
    Image.new("L", (15_000, 15_000)).save(tmp / "bomb.png")  # 225 Mpx: over Pillow's hard limit, 220 KB on disk
    infer = "/v2/models/vgg16/infer"

    def tensor(datatype: str, shape: list, data: list) -> dict:
        return {"json": {"inputs": [{"name": "image", "datatype": datatype, "shape": shape, "data": data}]}}

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is checked while the body streams
        for _ in range(3):
            yield b"\0" * (512 * 1024)

    files = [("f", ("a.png", good, "image/png")), ("f", ("Patient_Quixote_0042.png", b"not an image", "image/png"))]
    fields_only = b'--XyZ\r\nContent-Disposition: form-data; name="a"\r\n\r\nb\r\n--XyZ--\r\n'
    multipart = {"Content-Type": "multipart/form-data; boundary=XyZ", **auth()}
    return {
        "empty body": ("POST", "/v1/classify", {"content": b""}, 400),
        "not an image": ("POST", "/v1/classify", {"content": b"%PDF-1.7 not an image at all"}, 415),
        "truncated": ("POST", "/v1/classify", {"content": good[: len(good) // 2]}, 422),
        "pixel bomb": ("POST", "/v1/classify", {"content": (tmp / "bomb.png").read_bytes()}, 422),
        "too large": ("POST", "/v1/classify", {"content": b"\0" * (1024 * 1024 + 1)}, 413),
        "too large, chunked": ("POST", "/v1/classify", {"content": chunked()}, 413),
        "multipart without files": ("POST", "/v1/classify", {"content": fields_only, "headers": multipart}, 400),
        "a bad file among good ones": ("POST", "/v1/classify", {"files": files}, 415),
        "wrong JSON": ("POST", infer, {"content": b'{"inputs": [{"name": "image",'}, 400),
        "JSON nested too deep": ("POST", infer, {"content": b"[" * 100_000}, 400),
        "JSON without inputs": ("POST", infer, {"json": {"image": "x"}}, 400),
        "wrong dtype": ("POST", infer, tensor("FP32", [1], [0.5]), 400),
        "shape and data disagree": ("POST", infer, tensor("BYTES", [2], [base64.b64encode(good).decode()]), 400),
        "not base64": ("POST", infer, tensor("BYTES", [1], ["***"]), 400),
        "pixels out of range": ("POST", infer, tensor("UINT8", [1, size, size, 3], [256] * (size * size * 3)), 400),
        "pixels not integers": ("POST", infer, tensor("UINT8", [1, size, size, 3], [0.5] * (size * size * 3)), 400),
        "pixels at the wrong size": ("POST", infer, tensor("UINT8", [1, 2, 2, 3], [0] * 12), 400),
        "unknown model": ("POST", "/v2/models/nope/infer", tensor("BYTES", [1], ["AA=="]), 404),
        "unknown route": ("GET", "/v1/nothing", {}, 404),
        "trailing slash": ("POST", "/v1/classify/", {"content": good}, 404),
        "wrong method": ("GET", "/v1/classify", {}, 405),
    }


def test_each_bad_input_gets_its_4xx_with_one_json_line_and_no_5xx(server: Server, trained: Path, tmp_path) -> None:
    good = some_images(trained, 1)[0].read_bytes()
    size = httpx.get(f"{server.url}/v2/models/vgg16", headers=auth()).json()["parameters"]["image_size"]
    before = server.log.read_text().count("\n")
    sent = 0
    for name, (method, route, kwargs, status) in bad_requests(tmp_path, good, size).items():
        answer = httpx.request(method, server.url + route, **{"headers": auth(), "timeout": 30, **kwargs})
        sent += 1
        assert answer.status_code == status, (name, answer.status_code, answer.text)
        body = answer.json()
        assert list(body) == ["error"] and "\n" not in body["error"] and "Traceback" not in body["error"], name
    assert httpx.post(f"{server.url}/v1/classify", content=good, headers=auth()).status_code == 200  # still serving
    metrics = httpx.get(f"{server.url}/metrics", headers=auth()).text
    assert 'code="500"' not in metrics
    assert float(re.search(r'imgclf_errors_total\{kind="image"\} (\S+)', metrics).group(1)) >= 2  # truncated, bomb
    assert "imgclf_batch_images_bucket" in metrics and "imgclf_queue_images 0.0" in metrics
    lines = server.log.read_text().splitlines()[before:]
    requests = [line for line in lines if line.startswith("serve: ")]
    assert len(requests) >= sent + 2 and len(lines) == len(requests), lines  # one line per request, nothing else
    assert all(re.fullmatch(r"serve: (GET|POST) \w+ \d{3} \d+ image\(s\)( [\d.]+ ms)?", line) for line in requests), (
        lines
    )
    assert "Quixote" not in "\n".join(lines)  # a file name never reaches the log


def queued(srv: Server, n: int, timeout: float = 60) -> None:
    """Wait until `n` images wait for the model (the gauge of /metrics)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f"imgclf_queue_images {float(n)}" in httpx.get(f"{srv.url}/metrics").text:
            return
        time.sleep(0.05)
    raise AssertionError(f"never {n} images queued")


def test_overload_is_a_503_and_sigterm_answers_what_is_in_flight(trained: Path, tmp_path: Path) -> None:
    """The default model (compare's pick); a queue of 3 images, batches that wait 30 s for company: three requests
    fill it, a fourth is shed with 503 + Retry-After at once; SIGTERM stops new connections, the three still get
    their answers (the batch runs at once), exit 0. This server runs without --dicom: a DICOM upload is refused."""
    srv = Server(trained, tmp_path, "--max-queue", "3", "--max-wait-ms", "30000", "--max-batch", "8")
    try:
        srv.wait_ready()
        pick = json.loads((trained / "plots/compare/summary.json").read_text())["best"]
        assert httpx.get(f"{srv.url}/v2/models/{pick}").status_code == 200
        write_dicom(tmp_path / "scan.dcm", np.arange(48 * 40).reshape(48, 40) % 4096)
        refused = httpx.post(f"{srv.url}/v1/classify", content=(tmp_path / "scan.dcm").read_bytes(), timeout=30)
        assert refused.status_code == 415 and "without --dicom" in refused.json()["error"]
        image = some_images(trained, 1)[0].read_bytes()
        answers: list[httpx.Response] = []

        def send() -> None:
            answers.append(httpx.post(f"{srv.url}/v1/classify", content=image, timeout=120))

        threads = [threading.Thread(target=send) for _ in range(3)]
        for t in threads:
            t.start()
        queued(srv, 3)
        shed = httpx.post(f"{srv.url}/v1/classify", content=image, timeout=60)
        assert shed.status_code == 503 and shed.headers["retry-after"] == "1", shed.text
        assert "queue holds 3 of 3" in shed.json()["error"]
        srv.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # no longer accepting connections
            try:
                httpx.get(f"{srv.url}/v2/health/live", timeout=2)
            except httpx.TransportError:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("still accepting connections 20 s after SIGTERM")
        for t in threads:
            t.join(timeout=120)
        assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
        assert srv.process.wait(timeout=60) == 0
        assert "serve: stopped" in srv.log.read_text()
    finally:
        srv.stop()


def test_a_request_not_answered_in_time_is_a_503_and_frees_its_place(trained: Path, tmp_path: Path) -> None:
    """--timeout 1 with batches that wait 30 s: the request gives up after a second with 503; its image no longer
    counts against the queue of 1, so the next request is admitted (and times out too), not shed."""
    srv = Server(trained, tmp_path, "--backbone", "vgg16", "--max-queue", "1", "--max-wait-ms", "30000",
                 "--timeout", "1")  # fmt: skip
    try:
        srv.wait_ready()
        image = some_images(trained, 1)[0].read_bytes()
        for _ in range(2):
            started = time.monotonic()
            answer = httpx.post(f"{srv.url}/v1/classify", content=image, timeout=60)
            assert answer.status_code == 503 and "not answered within 1 s" in answer.json()["error"], answer.text
            assert time.monotonic() - started < 10
    finally:
        assert srv.stop() == 0


def test_a_missing_model_is_one_line_before_listening(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "imgclf", "serve", "--backbone", "vgg16", "--port", str(free_port())],
        cwd=tmp_path, env=env(tmp_path), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: no trained model in models/vgg16")


def test_a_model_that_cannot_be_loaded_stops_the_service(trained: Path, tmp_path: Path) -> None:
    """model.keras present but damaged: the service does not stay up unready for ever; exit 2, one error line."""
    broken = tmp_path / "models"
    shutil.copytree(trained / "models", broken)
    (broken / "vgg16/model.keras").write_bytes(b"PK\x03\x04 damaged")
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "imgclf", "serve", "--backbone", "vgg16", "--models-dir", str(broken), "--port",
         str(port)], cwd=trained, env=env(trained), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot load vgg16" in errors[0] and "Traceback" not in result.stderr
