"""`imgclf serve` under load, on loopback only, bounded in count and time (issue 35).

    pip install -r requirements-serve.txt
    python bench/serve.py                       # the sample's picked model: throughput, soak, overload
    python bench/serve.py --quick               # 10 s per level, a 60 s soak (a smoke run)

Run from the repository root after `dvc repro` (it serves models/ and reads data/sample/).

throughput: images/s and p50/p95/p99 latency of POST /v1/classify (one image per request) at concurrency 1, 8
and 32 (`--seconds` each, 60 by default), with batching (the defaults: --max-batch 32, --max-wait-ms 5) and
without (--max-batch 1), against predict's offline images/s measured in the same run (results.predict.classify
on the same images in batches of 32, in this process, model loading excluded). Target: at concurrency 32, batched,
at least 0.8 of the offline rate.

soak: `--soak-seconds` (600) of mixed requests from 8 clients against a service with a token: good images (on
/v1/classify and /v2/.../infer) and bad ones (empty, truncated, not an image, a pixel bomb, wrong JSON, wrong
dtype, too large, no token). Every good answer must equal predict's (probabilities within 1e-6), every bad one
must be its 4xx, no 5xx; the service's resident memory (VmRSS, sampled every 10 s) after a warm-up (the first
tenth of the soak, at least 30 s, of the same traffic) and at the end: growth at most 10%.

overload: requests sent open-loop at 4x the batched concurrency-32 rate for 20 s (a queue of 64 images), then
at half the rate for 90 s in 10-s windows: 503s with Retry-After during the overload, no crash, and the first
window whose every request was answered 200 (it recovered).

Writes bench/results-serve.json and prints a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_model  # noqa: E402

TOKEN = "bench-token-0123456789abcdef0123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """`python -m imgclf serve` in a subprocess, on a free loopback port."""

    def __init__(self, backbone: str, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)  # noqa: SIM115
        cmd = [sys.executable, "-m", "imgclf", "serve", "--backbone", backbone, "--port", str(self.port), *args]
        self.process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.log)

    def __enter__(self) -> Service:
        import httpx

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(Path(self.log.name).read_text())
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.process.kill()
        raise RuntimeError("the service did not get ready in 180 s")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def __exit__(self, *exc: Any) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.exit_code = self.process.wait(timeout=120)


def percentiles(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan")}
    values = np.asarray(latencies) * 1000
    return {f"p{q}_ms": round(float(np.percentile(values, q)), 1) for q in (50, 95, 99)}


async def closed_loop(
    url: str, bodies: list[bytes], concurrency: int, seconds: float, warmup: float = 3.0
) -> dict[str, Any]:
    """`concurrency` clients, each posting one image after the other: `warmup` seconds unmeasured (new batch
    shapes trace the graph once), then `seconds` measured."""
    import httpx

    latencies: list[float] = []
    codes: dict[int | str, int] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def worker(k: int, stop: float, record: bool) -> None:
            i = k
            while time.perf_counter() < stop:
                started = time.perf_counter()
                try:
                    answer = await client.post(f"{url}/v1/classify", content=bodies[i % len(bodies)])
                    code: int | str = answer.status_code
                except httpx.TransportError as exc:
                    code = type(exc).__name__
                if record:
                    latencies.append(time.perf_counter() - started)
                    codes[code] = codes.get(code, 0) + 1
                i += concurrency

        await asyncio.gather(*(worker(k, time.perf_counter() + warmup, False) for k in range(concurrency)))
        started = time.perf_counter()
        await asyncio.gather(*(worker(k, started + seconds, True) for k in range(concurrency)))
        elapsed = time.perf_counter() - started
    ok = codes.get(200, 0)
    return {"concurrency": concurrency, "seconds": round(elapsed, 1), "requests": sum(codes.values()),
            "images_per_s": round(ok / elapsed, 1), "codes": codes, **percentiles(latencies)}  # fmt: skip


def offline_rate(backbone: str, paths: list[Path]) -> float:
    """predict's images/s on these files (classify(), batches of 32), the models already loaded."""
    from imgclf.results.predict import Classifier, chosen_models, classify

    names, temperature = chosen_models(backbone, ROOT / "models")
    classifiers = [Classifier.load(ROOT / "models" / n) for n in names]
    # Warm-up: a full batch and the run's last, partial one (each batch shape traces the graph once).
    classify(classifiers, paths[: 32 + len(paths) % 32], ensemble_temperature=temperature)
    started = time.perf_counter()
    classify(classifiers, paths, ensemble_temperature=temperature)
    return len(paths) / (time.perf_counter() - started)


def expected_answers(backbone: str, paths: list[Path]) -> dict[str, np.ndarray]:
    """predict's calibrated probabilities per file name, for the soak's good requests."""
    from imgclf.results.predict import Classifier, chosen_models, classify

    names, temperature = chosen_models(backbone, ROOT / "models")
    table = classify([Classifier.load(ROOT / "models" / n) for n in names], paths, ensemble_temperature=temperature)
    columns = [c for c in table.columns if c.startswith("p_")]
    return {str(p): table.loc[k, columns].astype(float).to_numpy() for k, p in enumerate(table.path)}


def bad_requests(good: bytes, size: int, tmp: Path) -> list[tuple[str, dict[str, Any], int]]:
    """(name, httpx request arguments, expected status): each kind of bad input the soak sends."""
    from PIL import Image

    bomb = tmp / "bomb.png"
    if not bomb.exists():
        Image.new("L", (15_000, 15_000)).save(bomb)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    infer = "/v2/models/{model}/infer"

    def tensor(datatype: str, shape: list[int], data: list[Any]) -> dict[str, Any]:
        return {"json": {"inputs": [{"name": "image", "datatype": datatype, "shape": shape, "data": data}]}}

    return [
        ("empty", {"url": "/v1/classify", "content": b"", "headers": auth}, 400),
        ("truncated", {"url": "/v1/classify", "content": good[: len(good) // 2], "headers": auth}, 422),
        ("not an image", {"url": "/v1/classify", "content": b"GIF89a? no, text", "headers": auth}, 415),
        ("pixel bomb", {"url": "/v1/classify", "content": bomb.read_bytes(), "headers": auth}, 422),
        ("wrong JSON", {"url": infer, "content": b'{"inputs": [', "headers": auth}, 400),
        ("wrong dtype", {"url": infer, **tensor("FP16", [1], [0.0]), "headers": auth}, 400),
        ("too large", {"url": "/v1/classify", "content": b"\0" * (2 * 1024 * 1024 + 1), "headers": auth}, 413),
        ("no token", {"url": "/v1/classify", "content": good}, 401),
    ]


async def soak(service: Service, model: str, goods: list[tuple[str, bytes]], expected: dict[str, np.ndarray],
               bads: list[tuple[str, dict[str, Any], int]], seconds: float) -> dict[str, Any]:  # fmt: skip
    import httpx

    auth = {"Authorization": f"Bearer {TOKEN}"}
    tally: dict[str, int] = {"good": 0, "good_wrong": 0, "bad": 0, "bad_wrong_status": 0, "5xx": 0, "other": 0}
    wrong: list[str] = []
    stop = time.perf_counter() + seconds
    rng = random.Random(0)
    async with httpx.AsyncClient(base_url=service.url, timeout=120) as client:

        async def worker() -> None:
            while time.perf_counter() < stop:
                if rng.random() < 0.5:
                    name, body = goods[rng.randrange(len(goods))]
                    if rng.random() < 0.5:
                        answer = await client.post("/v1/classify", content=body, headers=auth)
                        probs = (
                            list(answer.json().get("probabilities", {}).values()) if answer.status_code == 200 else []
                        )
                    else:
                        request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                               "data": [base64.b64encode(body).decode()]}]}  # fmt: skip
                        answer = await client.post(f"/v2/models/{model}/infer", json=request, headers=auth)
                        probs = answer.json()["outputs"][0]["data"] if answer.status_code == 200 else []
                    if answer.status_code >= 500:
                        tally["5xx"] += 1
                    ok = answer.status_code == 200 and np.allclose(probs, expected[name], atol=1e-6)
                    tally["good"] += 1
                    if not ok:
                        tally["good_wrong"] += 1
                        wrong.append(f"{name}: {answer.status_code} {answer.text[:120]}")
                else:
                    name, kwargs, status = bads[rng.randrange(len(bads))]
                    kwargs = {**kwargs, "url": kwargs["url"].format(model=model)}
                    answer = await client.post(**kwargs)
                    tally["bad"] += 1
                    if answer.status_code >= 500:
                        tally["5xx"] += 1
                    if answer.status_code != status:
                        tally["bad_wrong_status"] += 1
                        wrong.append(f"{name}: {answer.status_code} (expected {status}) {answer.text[:120]}")

        samples: list[tuple[float, float]] = []  # (seconds into the soak, VmRSS MB), every 10 s

        async def sample() -> None:
            started = time.perf_counter()
            while time.perf_counter() < stop:
                samples.append((round(time.perf_counter() - started), round(service.rss_mb(), 1)))
                await asyncio.sleep(10)

        await asyncio.gather(sample(), *(worker() for _ in range(8)))
        samples.append((round(seconds), round(service.rss_mb(), 1)))
    # Warm-up: the first tenth (at least 30 s) of the same traffic, while allocator pools and TensorFlow's buffers
    # for each batch shape settle; growth is measured from there to the end.
    warm = next((mb for t, mb in samples if t >= max(30, seconds / 10)), samples[0][1])
    end = samples[-1][1]
    return {"seconds": seconds, **tally, "rss_mb_after_warmup": warm, "rss_mb_end": end,
            "rss_growth": round(end / warm - 1, 4), "rss_samples": samples, "first_wrong": wrong[:5]}  # fmt: skip


async def open_loop(url: str, body: bytes, phases: list[tuple[str, float, float]]) -> dict[str, Any]:
    """Requests sent on a schedule whatever the answers (an open loop): for each phase (name, rate per second,
    seconds), one after the other without waiting for the previous phase's answers. Per phase: status counts,
    latency percentiles and the Retry-After values of the 503s."""
    import httpx

    out: dict[str, Any] = {}
    tasks = []
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:

        async def one(phase: str) -> None:
            record = out[phase]
            started = time.perf_counter()
            try:
                answer = await client.post(f"{url}/v1/classify", content=body)
                code = str(answer.status_code)
                if answer.status_code == 503:
                    record["retry_after"].add(answer.headers.get("retry-after", ""))
            except httpx.TransportError as exc:
                code = type(exc).__name__
            record["codes"][code] = record["codes"].get(code, 0) + 1
            record["latencies"].append(time.perf_counter() - started)

        for phase, rate, seconds in phases:
            out[phase] = {"rate_per_s": round(rate, 1), "seconds": seconds, "sent": 0, "codes": {},
                          "retry_after": set(), "latencies": []}  # fmt: skip
            started = time.perf_counter()
            while (now := time.perf_counter() - started) < seconds:
                while out[phase]["sent"] < int(now * rate) + 1:
                    tasks.append(asyncio.create_task(one(phase)))
                    out[phase]["sent"] += 1
                await asyncio.sleep(0.002)
        await asyncio.gather(*tasks)
    for record in out.values():
        record.update(percentiles(record.pop("latencies")))
        record["retry_after"] = sorted(record["retry_after"])
    return out


def verdicts(report: dict[str, Any]) -> dict[str, bool]:
    """The issue's targets, each true or false."""
    out = {}
    if "throughput" in report:
        out["c32 batched >= 0.8 x offline"] = report["throughput"]["batched"][-1]["of_offline"] >= 0.8
    if "soak" in report:
        soak = report["soak"]
        out["soak: every good answer is predict's"] = soak["good_wrong"] == 0
        out["soak: every bad request its 4xx"] = soak["bad_wrong_status"] == 0
        out["soak: no 5xx"] = soak["5xx"] == 0
        out["soak: memory growth <= 10%"] = soak["rss_growth"] <= 0.10
    if "overload" in report:
        over = report["overload"]
        out["overload: 503s at 4x"] = over["at_4x"]["codes"].get("503", 0) > 0
        out["overload: no crash"] = over["alive_after"] and over["exit_code"] == 0
        out["overload: all 200 within 90 s of the rate dropping"] = over["first_window_all_200"] is not None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", help="default: compare's pick (plots/compare/summary.json)")
    parser.add_argument("--quick", action="store_true", help="10 s per level, a 60 s soak, a 10 s overload")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--soak-seconds", type=float, default=600.0)
    parser.add_argument("--skip", action="append", default=[], help="throughput | soak | overload")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.soak_seconds = 10.0, 60.0
    os.chdir(ROOT)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from imgclf.deploy.serve import picked_backbone

    model = args.backbone or picked_backbone()
    paths = sorted((ROOT / "data/sample").rglob("*.png"))
    bodies = [p.read_bytes() for p in paths]
    report: dict[str, Any] = {"machine": cpu_model(), "cores": os.cpu_count(), "model": model, "images": len(paths)}
    print(f"{report['machine']}, {report['cores']} cores; serving {model}; {len(paths)} sample images", flush=True)

    if "throughput" not in args.skip:
        report["offline_images_per_s"] = round(offline_rate(model, paths * max(1, 2000 // len(paths))), 1)
        print(f"offline (predict's classify): {report['offline_images_per_s']} images/s", flush=True)
        report["throughput"] = {}
        for label, extra in (("batched", []), ("unbatched", ["--max-batch", "1"])):
            with Service(model, *extra) as service:
                rows = []
                for concurrency in (1, 8, 32):
                    row = asyncio.run(closed_loop(service.url, bodies, concurrency, args.seconds))
                    row["of_offline"] = round(row["images_per_s"] / report["offline_images_per_s"], 3)
                    rows.append(row)
                    print(f"{label} c={concurrency}: {row}", flush=True)
            report["throughput"][label] = rows

    with tempfile.TemporaryDirectory() as tmp:
        token = Path(tmp) / "token"
        token.write_text(TOKEN)
        if "soak" not in args.skip:
            goods = [(str(p), b) for p, b in zip(paths, bodies, strict=True)][::5]
            expected = expected_answers(model, [Path(name) for name, _ in goods])
            with Service(model, "--token-file", str(token), "--max-body-mb", "2") as service:
                import httpx

                meta = httpx.get(f"{service.url}/v2/models/{model}", headers={"Authorization": f"Bearer {TOKEN}"})
                size = meta.json()["parameters"]["image_size"]
                bads = bad_requests(goods[0][1], size, Path(tmp))
                report["soak"] = asyncio.run(soak(service, model, goods, expected, bads, args.soak_seconds))
            report["soak"]["exit_code"] = service.exit_code
            print(f"soak: {report['soak']}", flush=True)

        if "overload" not in args.skip:
            previous = ROOT / "bench/results-serve.json"  # the last full run's rate, when throughput is skipped
            sustainable = (
                report["throughput"]["batched"][-1]["images_per_s"]
                if "throughput" in report
                else json.loads(previous.read_text())["throughput"]["batched"][-1]["images_per_s"]
            )
            seconds = 10.0 if args.quick else 20.0
            with Service(model, "--max-queue", "64") as service:
                # After the overload, half the rate for 90 s in 10-s windows: when does every answer come back 200?
                phases = [("at_4x", 4 * sustainable, seconds)]
                phases += [(f"after_{10 * k}s", 0.5 * sustainable, 10.0) for k in range(1, 10)]
                result = asyncio.run(open_loop(service.url, bodies[0], phases))
                alive = service.process.poll() is None
            recovered = [name for name, record in result.items() if name != "at_4x" and set(record["codes"]) == {"200"}]
            report["overload"] = {**result, "alive_after": alive, "exit_code": service.exit_code,
                                  "first_window_all_200": recovered[0] if recovered else None}  # fmt: skip
            print(f"overload: {report['overload']}", flush=True)

    report["targets"] = verdicts(report)
    for target, met in report["targets"].items():
        print(f"{'met    ' if met else 'NOT MET'}  {target}")
    out = ROOT / "bench/results-serve.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
