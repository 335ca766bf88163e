"""`python -m imgclf serve` on the trained tiny project: a real server on a free loopback port, started and
stopped here. It answers as `imgclf predict` does, refuses every kind of bad input with its 4xx, enforces the
token, flips to ready after loading, sheds load with 503 and drains in-flight requests on SIGTERM."""

from __future__ import annotations

import base64
import io
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


@pytest.fixture(scope="module")
def server(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("serve")
    token = tmp / "token"
    token.write_text(TOKEN + "\n")
    srv = Server(trained, tmp, "--backbone", "ensemble", "--token-file", str(token), "--max-body-mb", "1",
                 "--max-wait-ms", "20", "--dicom")  # fmt: skip
    srv.wait_ready()
    yield srv
    assert srv.stop() == 0


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def some_images(project: Path, n: int = 6) -> list[Path]:
    return sorted((project / "images").rglob("*.png"))[::7][:n]


def predict_table(project: Path, paths: list[Path], backbone: str = "ensemble") -> pd.DataFrame:
    cmd = [sys.executable, "-m", "imgclf", "predict", "--backbone", backbone, *map(str, paths)]
    out = subprocess.run(cmd, cwd=project, env=env(project), capture_output=True, text=True, check=True).stdout
    return pd.read_csv(io.StringIO(out), keep_default_na=False)


def test_readiness_flips_after_loading_and_the_token_is_enforced(server: Server, trained: Path) -> None:
    assert server.readiness[0] == 503 and server.readiness[-1] == 200  # not ready while loading, then ready
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}  # health needs no token
    image = some_images(trained, 1)[0].read_bytes()
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": TOKEN}):
        answer = httpx.post(f"{server.url}/v1/classify", content=image, headers=headers)
        assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer", headers
        assert set(answer.json()) == {"error"}
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    assert httpx.post(f"{server.url}/v1/classify", content=image, headers=auth()).status_code == 200


def test_infer_and_classify_give_predicts_probabilities(server: Server, trained: Path) -> None:
    paths = some_images(trained)
    expected = predict_table(trained, paths)
    classes = [c.removeprefix("p_") for c in expected.columns if c.startswith("p_")]
    want = expected[[f"p_{c}" for c in classes]].astype(float).to_numpy()

    meta = httpx.get(f"{server.url}/v2/models/ensemble", headers=auth()).json()
    assert meta["parameters"]["classes"] == classes and meta["parameters"]["members"] == ["vgg16", "mobilenet"]
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in paths]
    request = {"id": "r1", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(paths)], "data": encoded}]}
    answer = httpx.post(f"{server.url}/v2/models/ensemble/infer", json=request, headers=auth()).json()
    assert answer["id"] == "r1" and answer["model_version"] == meta["versions"][0]
    probs = np.asarray(answer["outputs"][0]["data"]).reshape(answer["outputs"][0]["shape"])
    # predict writes 8 decimals; a batch of other images moves the last float bits (oneDNN kernels by shape)
    np.testing.assert_allclose(probs, want, atol=1e-6)
    assert answer["outputs"][1]["data"] == list(expected.predicted)

    files = [("files", (f"{k}.png", p.read_bytes(), "image/png")) for k, p in enumerate(paths)]
    multi = httpx.post(f"{server.url}/v1/classify", files=files, headers=auth()).json()
    got = np.array([[r["probabilities"][c] for c in classes] for r in multi["results"]])
    np.testing.assert_allclose(got, want, atol=1e-6)
    one = httpx.post(f"{server.url}/v1/classify", content=paths[0].read_bytes(), headers=auth()).json()
    assert one["class"] == expected.predicted[0] and one["model"] == "ensemble"
    np.testing.assert_allclose([one["probabilities"][c] for c in classes], want[0], atol=1e-6)

    # UINT8 pixels already at the model's size: the same answer as the encoded file they came from.
    size = meta["parameters"]["image_size"]
    from imgclf.data.images import load_image

    pixels = load_image(paths[0], size).astype(np.uint8)
    tensor = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, size, size, 3],
                          "data": pixels.ravel().tolist()}]}  # fmt: skip
    answer = httpx.post(f"{server.url}/v2/models/ensemble/infer", json=tensor, headers=auth()).json()
    np.testing.assert_allclose(answer["outputs"][0]["data"], want[0], atol=1e-6)


def bad_requests(tmp: Path, good: bytes, size: int) -> dict[str, tuple[str, str, dict, int]]:
    """name -> (method, route, httpx keyword arguments, expected status)"""
    Image.new("L", (15_000, 15_000)).save(tmp / "bomb.png")  # 225 Mpx: over Pillow's hard limit, 220 KB on disk
    infer = "/v2/models/ensemble/infer"

    def tensor(datatype: str, shape: list, data: list) -> dict:
        return {"json": {"inputs": [{"name": "image", "datatype": datatype, "shape": shape, "data": data}]}}

    return {
        "empty body": ("POST", "/v1/classify", {"content": b""}, 400),
        "not an image": ("POST", "/v1/classify", {"content": b"%PDF-1.7 not an image at all"}, 415),
        "truncated": ("POST", "/v1/classify", {"content": good[: len(good) // 2]}, 422),
        "pixel bomb": ("POST", "/v1/classify", {"content": (tmp / "bomb.png").read_bytes()}, 422),
        "too large": ("POST", "/v1/classify", {"content": b"\0" * (1024 * 1024 + 1)}, 413),
        "wrong JSON": ("POST", infer, {"content": b'{"inputs": [{"name": "image",'}, 400),
        "JSON without inputs": ("POST", infer, {"json": {"image": "x"}}, 400),
        "wrong dtype": ("POST", infer, tensor("FP32", [1], [0.5]), 400),
        "shape and data disagree": ("POST", infer, tensor("BYTES", [2], [base64.b64encode(good).decode()]), 400),
        "not base64": ("POST", infer, tensor("BYTES", [1], ["***"]), 400),
        "pixels out of range": ("POST", infer, tensor("UINT8", [1, size, size, 3], [256] * (size * size * 3)), 400),
        "pixels at the wrong size": ("POST", infer, tensor("UINT8", [1, 2, 2, 3], [0] * 12), 400),
        "unknown model": ("POST", "/v2/models/nope/infer", tensor("BYTES", [1], ["AA=="]), 404),
        "unknown route": ("GET", "/v1/nothing", {}, 404),
        "wrong method": ("GET", "/v1/classify", {}, 405),
    }


def test_each_bad_input_gets_its_4xx_with_one_json_line_and_no_5xx(server: Server, trained: Path, tmp_path) -> None:
    good = some_images(trained, 1)[0].read_bytes()
    meta = httpx.get(f"{server.url}/v2/models/ensemble", headers=auth()).json()
    for name, (method, route, kwargs, status) in bad_requests(tmp_path, good, meta["parameters"]["image_size"]).items():
        answer = httpx.request(method, server.url + route, headers=auth(), timeout=30, **kwargs)
        assert answer.status_code == status, (name, answer.status_code, answer.text)
        body = answer.json()
        assert list(body) == ["error"] and "\n" not in body["error"] and "Traceback" not in body["error"], name
    assert httpx.post(f"{server.url}/v1/classify", content=good, headers=auth()).status_code == 200  # still serving
    metrics = httpx.get(f"{server.url}/metrics", headers=auth()).text
    assert 'code="500"' not in metrics and 'imgclf_errors_total{kind="image"}' in metrics
    assert "imgclf_batch_images_bucket" in metrics and "imgclf_queue_images" in metrics
    log = server.log.read_text()
    assert "Traceback" not in log and "bomb" not in log and ".png" not in log  # one line per request, no names


def test_overload_is_a_503_and_sigterm_answers_what_is_in_flight(trained: Path, tmp_path: Path) -> None:
    """A queue of 3 images, batches that wait 2 s for company: three requests fill it, a fourth is shed with
    503 + Retry-After; SIGTERM then stops new connections but the three still get their answers, exit 0. (This
    server runs without --dicom: a DICOM upload is refused first.)"""
    srv = Server(trained, tmp_path, "--backbone", "vgg16", "--max-queue", "3", "--max-wait-ms", "2000",
                 "--max-batch", "8")  # fmt: skip
    try:
        srv.wait_ready()
        write_dicom(tmp_path / "scan.dcm", np.arange(48 * 40).reshape(48, 40) % 4096)
        refused = httpx.post(f"{srv.url}/v1/classify", content=(tmp_path / "scan.dcm").read_bytes(), timeout=30)
        assert refused.status_code == 415 and "without --dicom" in refused.json()["error"]
        image = some_images(trained, 1)[0].read_bytes()
        answers: list[httpx.Response] = []

        def send() -> None:
            answers.append(httpx.post(f"{srv.url}/v1/classify", content=image, timeout=60))

        threads = [threading.Thread(target=send) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.6)  # the three are queued, their batch waiting
        shed = httpx.post(f"{srv.url}/v1/classify", content=image, timeout=60)
        assert shed.status_code == 503 and shed.headers["retry-after"] == "1", shed.text
        srv.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):  # no longer accepting
            httpx.get(f"{srv.url}/v2/health/live", timeout=2)
        for t in threads:
            t.join(timeout=60)
        assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
        assert srv.process.wait(timeout=60) == 0
        assert "serve: stopped" in srv.log.read_text()
    finally:
        srv.stop()


def test_dicom_is_read_with_dicom_on_and_answers_as_predict(server: Server, trained: Path, tmp_path: Path) -> None:
    write_dicom(tmp_path / "scan.dcm", (np.arange(48 * 40).reshape(48, 40) * 7) % 4096)
    answer = httpx.post(f"{server.url}/v1/classify", content=(tmp_path / "scan.dcm").read_bytes(), headers=auth())
    assert answer.status_code == 200, answer.text
    expected = predict_table(trained, [tmp_path / "scan.dcm"])
    classes = [c.removeprefix("p_") for c in expected.columns if c.startswith("p_")]
    got = [answer.json()["probabilities"][c] for c in classes]
    np.testing.assert_allclose(got, expected[[f"p_{c}" for c in classes]].astype(float).to_numpy()[0], atol=1e-6)


def test_a_missing_model_is_one_line_before_listening(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "imgclf", "serve", "--backbone", "vgg16", "--port", str(free_port())],
        cwd=tmp_path, env=env(tmp_path), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: no trained model in models/vgg16")
