"""Where and in what precision the backbone runs: Keras mixed-precision policies, GPUs, CPU capabilities.

`features.precision` (float32 | bfloat16 | float16, per backbone with `features.precision_overrides`) picks
the Keras dtype policy the backbone is built under: `mixed_bfloat16` / `mixed_float16` compute in 16 bits
and keep float32 variables. The policy is saved with every layer in extractor.keras and model.keras, so
train (fine-tuning), evaluate and predict run the backbone exactly as features@ did, without a param.
The extractor's output is cast back to float32 (extractor.py) and features are stored as float32: numpy
has no bfloat16, and float16 storage would flush random-init MobileNet's ~1e-20 activations to zero.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from imgclf.core.errors import UserError, log

# The Keras dtype policy of each precision params.py accepts (PRECISIONS there).
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
# CPU flags (Linux /proc/cpuinfo) of native bfloat16 arithmetic: AVX-512 BF16 (Intel Cooper Lake and later,
# AMD Zen 4 and later) and AMX (Intel Sapphire Rapids and later).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def precision_for(features: dict[str, Any], backbone: str) -> str:
    """The precision of one backbone's pass: its entry in `features.precision_overrides`, unless that is null,
    then `features.precision`."""
    return features.get("precision_overrides", {}).get(backbone) or features.get("precision", "float32")


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:  # not Linux: unknown
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


# CPU flags that decide which kernels oneDNN and Eigen pick, and so the last bits of a float result. Two machines
# that agree on the vendor and on these flags ran the same kernels (measured: an Intel Xeon with AMX and an AMD
# EPYC Zen 4 without it gave bit-identical VGG16 features but different MobileNet features and head training).
KERNEL_CPU_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c",
    "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_bf16", "amx_int8",
)  # fmt: skip


def platform_record() -> dict[str, Any]:
    """Where a result was computed, in the terms that decide its bits: architecture, CPU vendor, the
    kernel-selecting flags it has, the GPU models TensorFlow sees, and the versions of TensorFlow, Keras and
    NumPy. No host name, no timing: the same type of machine gives the same record and so the same bytes.
    (/proc/cpuinfo is Linux's: elsewhere the vendor is "unknown" and the flags empty.)"""
    import platform

    import keras
    import numpy as np
    import tensorflow as tf

    vendor = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("vendor_id"):
                vendor = line.split(":", 1)[1].strip()
                break
    except OSError:  # not Linux
        pass
    flags = cpu_flags()
    devices = visible_gpus()
    gpus = [tf.config.experimental.get_device_details(d).get("device_name", d.name) for d in devices]
    record = {
        "machine": platform.machine(),
        "cpu_vendor": vendor,
        "cpu_flags": [f for f in KERNEL_CPU_FLAGS if f in flags],
        "gpus": sorted(gpus),  # models (e.g. "NVIDIA A100-SXM4-40GB"), one entry per device
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
    }
    if devices:  # only where a GPU runs: a CPU machine's record (and the results that hold it) stays as it was
        record["gpu_stack"] = gpu_stack()
    return record


# The NVIDIA libraries that choose a GPU's kernels besides its model. tensorflow[and-cuda] loads them from pip
# wheels (nvidia-cudnn-cu12, nvidia-cublas-cu12): their versions are the wheels'. A system installation has no
# wheel: its library is asked (versioned sonames only, never a bare libcudnn.so that TensorFlow may not load).
GPU_LIBRARIES = {
    "cudnn": ("nvidia-cudnn-cu12", ("libcudnn.so.9", "libcudnn.so.8"), "cudnnGetVersion"),
    "cublas": ("nvidia-cublas-cu12", ("libcublasLt.so.12", "libcublasLt.so.11"), "cublasLtGetVersion"),
}
NVIDIA_DRIVER_FILE = Path("/proc/driver/nvidia/version")


def _library_version(wheel: str, sonames: tuple[str, ...], function: str) -> str | None:
    """A library's version: its pip wheel's, else the number the library reports (cuDNN 9.1.0 -> 90100)."""
    import ctypes
    from importlib import metadata

    try:
        return metadata.version(wheel)
    except metadata.PackageNotFoundError:
        pass
    for name in sonames:
        try:
            call = getattr(ctypes.CDLL(name), function)
        except (OSError, AttributeError):
            continue
        call.restype = ctypes.c_size_t
        return str(call())
    return None


def driver_version() -> str | None:
    """The NVIDIA kernel driver's version (`... Kernel Module  550.54.14 ...` in /proc; None elsewhere)."""
    try:
        first = NVIDIA_DRIVER_FILE.read_text(encoding="utf-8", errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return None
    found = [word for word in first.split() if word[:1].isdigit() and word.count(".") >= 1]
    return found[0] if found else None


def gpu_stack() -> dict[str, Any]:
    """Where a GPU runs, what picks its kernels besides its model: the CUDA and cuDNN TensorFlow was built with,
    the cuDNN and cuBLAS installed for it (GPU_LIBRARIES), and the driver (null when not found: a record never
    claims a version it did not read)."""
    import tensorflow as tf

    build = tf.sysconfig.get_build_info()
    stack: dict[str, Any] = {"cuda": build.get("cuda_version"), "cudnn_build": build.get("cudnn_version")}
    for name, (wheel, sonames, function) in GPU_LIBRARIES.items():
        stack[name] = _library_version(wheel, sonames, function)
    stack["driver"] = driver_version()
    return stack


def visible_gpus() -> list[Any]:
    """The GPUs TensorFlow sees. (Memory growth on them is set once for every stage, by the environment:
    repro.seed_everything sets TF_FORCE_GPU_ALLOW_GROWTH.)"""
    import tensorflow as tf

    return tf.config.list_physical_devices("GPU")


def check_precision(precision: str, backbone: str, gpus: list[Any] | None = None) -> None:
    """Stop on a precision this machine cannot run well; warn where it runs but slower than float32."""
    if precision == "float32":
        return
    gpus = visible_gpus() if gpus is None else gpus
    if gpus:
        return
    if precision == "float16":
        raise UserError(
            f"features.precision for {backbone} is float16, but TensorFlow sees no GPU: on a CPU it emulates "
            "float16 (VGG16 at 224 px ran at 0.6x float32 speed here) and a random-init backbone's tiny "
            "activations underflow it. Use bfloat16 on a CPU with AVX-512 BF16 or AMX, float32 otherwise, or "
            "install the GPU build (docs/scale.md, 'GPU')"
        )
    if not set(BF16_CPU_FLAGS) & cpu_flags():
        log.warning(
            "features.precision for %s is bfloat16, but this CPU has no bfloat16 units (%s): it will run, "
            "slower than float32; use float32 on this machine",
            backbone,
            " or ".join(BF16_CPU_FLAGS),
        )


@contextmanager
def dtype_policy(precision: str) -> Iterator[None]:
    """Layers built inside use the Keras policy of `precision` (e.g. mixed_bfloat16); float32 again after."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(POLICIES[precision])
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def model_precision(model: Any) -> str:
    """The precision a saved extractor or end-to-end model computes its backbone in (from its layers)."""
    names = {getattr(layer.dtype_policy, "name", "float32") for layer in _all_layers(model)}
    for precision in ("bfloat16", "float16"):
        if POLICIES[precision] in names:
            return precision
    return "float32"


def _all_layers(model: Any) -> Iterator[Any]:
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)
