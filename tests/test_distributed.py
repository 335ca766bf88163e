"""features.engine: ray (and predict --engine ray) runs the same backbone pass on a Ray cluster: the same files,
bit for bit on CPU, and one-line errors in the user's terms. The cluster here is a local Ray instance with two
workers."""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import dvc, env, update_params

from imgclf.core.errors import UserError

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]  # one local Ray instance at a time

RAY = {"address": "local", "workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 0}


def features_stage(project: Path, out: str, environ: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "stages.features", "vgg16", "--images", "data/split/images.csv", "--out-dir", out]
    return subprocess.run(cmd, cwd=project, env=environ or env(project), capture_output=True, text=True)


def predict(project: Path, *args: str, environ: dict[str, str] | None = None) -> pd.DataFrame:
    cmd = [sys.executable, "-m", "imgclf", "predict", "--backbone", "mobilenet", *args]  # its pass in float32
    result = subprocess.run(cmd, cwd=project, env=environ or env(project), capture_output=True, text=True)
    assert result.returncode == 3, result.stderr  # 3: one image could not be read
    assert "Traceback" not in result.stderr and "WARNING" not in result.stderr
    return pd.read_csv(io.StringIO(result.stdout), keep_default_na=False)


def test_the_ray_engine_computes_what_the_local_engine_does(copy_of: Path, tmp_path: Path, token_cluster) -> None:
    """On the trained tiny project: features@vgg16 (bfloat16) on a local Ray instance writes the local engine's
    files bit for bit; on a running cluster (the module's head, so that Ray starts once for the rest) predict
    with MobileNet (float32) gives the local table, and a worker that cannot read an image stops features@
    with one line."""
    project = copy_of
    # The local pass's outputs are in the cache, but not for Ray (its workers may be other machines): all 38 run.
    update_params(project, {"features.engine": "ray", "features.ray": RAY})
    result = features_stage(project, "ray_features")  # 38 images: two batches of up to 32, one per worker
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "WARNING" not in result.stderr and "core_worker" not in result.stderr
    remote, local = project / "ray_features", project / "data/features/vgg16"
    assert np.array_equal(np.load(remote / "features.npy"), np.load(local / "features.npy"))
    for name in ("features.npy", "index.csv", "info.json", "extractor.keras"):
        assert (remote / name).read_bytes() == (local / name).read_bytes(), name
    passes = [line for line in (project / "logs/imgclf.log").read_text().splitlines() if " computed (" in line]
    assert "38 computed (" in passes[-1] and "bfloat16, ray at local, 2 workers)" in passes[-1]
    # Again on Ray: the nodes are asked what they are (one probe), their outputs reused, nothing computed.
    assert features_stage(project, "ray_reused").returncode == 0
    passes = [line for line in (project / "logs/imgclf.log").read_text().splitlines() if " computed (" in line]
    assert ": 0 computed (" in passes[-1] and "38 reused" in passes[-1]
    for name in ("features.npy", "index.csv", "info.json"):
        assert (project / "ray_reused" / name).read_bytes() == (local / name).read_bytes(), name
    # Where the pass runs is not a dependency: switching the engine leaves features@ as it is.
    assert "features@" not in dvc(project, "status").stdout

    folder = tmp_path / "new images"
    folder.mkdir()
    for src in sorted((project / "images").rglob("*.png"))[:10]:
        shutil.copy(src, folder / f"{src.parent.name}_{src.name}")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    address, token = token_cluster
    update_params(project, {"features.ray": {**RAY, "address": address}})
    on_cluster = ray_environ(project, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    on_ray = predict(project, "--engine", "ray", str(folder), environ=on_cluster)
    here = predict(project, str(folder))
    assert list(on_ray.path) == list(here.path) and list(on_ray.predicted) == list(here.predicted)
    assert list(on_ray.error.str.slice(0, 40)) == list(here.error.str.slice(0, 40))  # the corrupt file's row
    columns = [c for c in here.columns if c.startswith("p_")]
    good = here.error == ""
    np.testing.assert_allclose(
        on_ray.loc[good, columns].astype(float), here.loc[good, columns].astype(float), atol=1e-5
    )

    victim = sorted((project / "images/ring").glob("*.png"))[0]
    victim.unlink()
    shutil.rmtree(project / ".imgclf-cache")  # the workers must read it (a reused output is checked by the driver)
    result = features_stage(project, "ray_features_2", on_cluster)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr[-3000:]
    assert victim.name in errors[0] and "shared filesystem" in errors[0]
    assert not (project / "ray_features_2").exists()  # nothing half-written


def test_ray_not_installed_is_one_line_with_the_install_command(monkeypatch) -> None:
    from imgclf.features.engine_ray import import_ray

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(UserError, match=r"needs Ray, which is not installed; install it with `pip install -r req"):
        import_ray()
    # A failed import leaves the environment as it was: every later subprocess (stages, dvc) inherits it.
    assert "RAY_AUTH_MODE" not in os.environ


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("127.0.0.1:9", "cannot reach the Ray cluster at 127.0.0.1:9"),
        ("ray://127.0.0.1:9", "cannot reach the Ray cluster at ray://127.0.0.1:9"),
        ("my-head-node", "is not local, auto, host:port"),
    ],
)
def test_an_unreachable_cluster_is_reported_in_seconds(address: str, message: str) -> None:
    from imgclf.features.engine_ray import check_reachable

    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        check_reachable(address)


def test_the_ray_auth_mode_set_for_a_local_instance_is_removed_at_shutdown(monkeypatch) -> None:
    from imgclf.features.engine_ray import import_ray, shutdown

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    import_ray("local")
    assert os.environ["RAY_AUTH_MODE"] == "token"  # Ray reads it at import and at init
    shutdown()
    assert "RAY_AUTH_MODE" not in os.environ  # later subprocesses (stages, dvc, other tests) never see it
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # the user's own setting is theirs: left alone
    import_ray("local")
    shutdown()
    assert os.environ["RAY_AUTH_MODE"] == "token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def token_cluster() -> Iterator[tuple[str, Path]]:
    """A real Ray head on 127.0.0.1 with token authentication, as README's recipe starts one (2 CPUs), in its
    own temporary folder and process group: stopped at the end without touching any other Ray instance here.
    Returns its address and its token file (mode 600)."""
    folder = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths live under it
    token = folder / "auth_token"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, os.urandom(32).hex().encode())
    os.close(fd)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    environ |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    port, agent_port = free_port(), free_port()
    start = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={port}",
             "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
             f"--temp-dir={folder / 'tmp'}", f"--dashboard-agent-listen-port={agent_port}"]  # fmt: skip
    output = folder / "start.log"  # a file, not a pipe: a blocked head must never wait on a full pipe
    with output.open("wb") as sink:
        head = subprocess.Popen(start, env=environ, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"ray start failed:\n{output.read_text()[-3000:]}") from None
                time.sleep(0.5)
        yield f"127.0.0.1:{port}", token
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)  # ray start --block stops the head's processes on SIGTERM
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:  # its own process group: nothing else on this machine is touched
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(folder, ignore_errors=True)


def ray_environ(project: Path, **auth: str) -> dict[str, str]:
    """The project's environment with exactly the given Ray token settings (none of the caller's)."""
    out = {k: v for k, v in env(project).items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    return {**out, **auth}


def test_a_token_protected_cluster_gives_one_line_without_the_right_token(copy_of: Path, token_cluster) -> None:
    """README's recipe on one machine: with the head's token, features@ runs on the cluster (the local engine's
    bytes); without a token, with a wrong one, or with a token file that is not there, the stage and `predict
    --engine ray` (its address from params.yaml's features.ray) stop with one `error:` line in the user's terms,
    exit 2, in seconds, and none of Ray's C++ retry lines."""
    address, token = token_cluster
    project = copy_of
    update_params(project, {"features.engine": "ray", "features.ray": {**RAY, "address": address}})
    stage = [sys.executable, "-m", "stages.features", "vgg16", "--images", "data/split/images.csv", "--out-dir"]
    folder = project / "images/ring"
    predict = [sys.executable, "-m", "imgclf", "predict", "--backbone", "mobilenet", "--engine", "ray", str(folder)]
    wrong = project / "wrong_token"
    wrong.write_text(os.urandom(32).hex())
    cases = {
        "no token": ({}, "RAY_AUTH_MODE is not set, so this machine gave none"),
        "a wrong token": (
            {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(wrong)},
            f"the token this machine gave (from {wrong}) is not it",
        ),
        "no token file": (
            {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(project / "missing")},
            "cannot be read (No such file or directory)",
        ),
    }
    for case, (auth, detail) in cases.items():
        for cmd in ([*stage, "refused"], predict) if case != "no token file" else [[*stage, "refused"]]:
            # Were the probe gone, ray.init's retries (here 1000 attempts of a second) would overrun the timeout.
            environ = ray_environ(project, **auth, RAY_NUM_REDIS_GET_RETRIES="1000")
            result = subprocess.run(cmd, cwd=project, env=environ, capture_output=True, text=True, timeout=120)
            assert result.returncode == 2, (case, result.stderr[-2000:])
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            errors = [line for line in lines if line.startswith("error:")]
            assert len(errors) == 1 and detail in errors[0], (case, result.stderr[-2000:])
            if case != "no token file":
                assert f"the Ray cluster at {address} refused this machine: it needs the cluster's token" in errors[0]
            assert "gcs_client" not in result.stderr and "Traceback" not in result.stderr, (case, result.stderr)
            assert not (project / "refused").exists()  # nothing half-written
    result = subprocess.run(
        [*stage, "accepted"],
        cwd=project,
        env=ray_environ(project, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    local = (project / "data/features/vgg16/features.npy").read_bytes()
    assert (project / "accepted/features.npy").read_bytes() == local
    assert f"ray at {address}, 2 workers)" in (project / "logs/imgclf.log").read_text()
