"""Growth benchmarks (issue 24): the near-duplicate search and the feature reader at scale.

    python bench/growth.py search   # multi-index hashing vs all pairs: same pairs on 50,000 random hashes (and
                                    # on clustered ones), time and peak RSS at 1,000,000 (all pairs: estimated)
    python bench/growth.py reader   # one shuffled training epoch and one in-order pass over 100,000 rows of
                                    # (3, 3, 1024) float32 (MobileNet at 96 px; 3.7 GB): the reader before issue
                                    # 24 (a pread per run into bytes, copied twice) against the one now

Each measurement runs in a child process of its own, so its peak RSS (VmHWM) is its own. Results go to
bench/results-growth.json (merged) with the CPU model; a markdown table is printed. Run on an idle machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
RESULTS = ROOT / "bench/results-growth.json"
ROW_SHAPE = (3, 3, 1024)


def save(part: str, value: object) -> None:
    from machine import cpu_model

    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results[part] = value
    results["machine"] = cpu_model()
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


def peak_rss_mb() -> int:
    status = Path("/proc/self/status").read_text().splitlines()
    return round(next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024)


def child(args: list[str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "_child", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def random_hashes(n: int, seed: int) -> Any:
    import numpy as np

    return np.random.default_rng(seed).integers(0, 2**64, n, dtype=np.uint64, endpoint=False)


def clustered_hashes(n: int, seed: int) -> Any:
    """n hashes in clusters of 10 copies, each copy with 0-3 random bits flipped: many true pairs."""
    import numpy as np

    rng = np.random.default_rng(seed)
    hashes = np.repeat(random_hashes(n // 10, seed), 10)
    for _ in range(3):
        flip = rng.random(len(hashes)) < 0.5
        hashes[flip] ^= np.uint64(1) << rng.integers(0, 64, int(flip.sum())).astype(np.uint64)
    return hashes


def search_child(kind: str, n: int, method: str) -> dict[str, Any]:
    import numpy as np

    from imgclf.data.groups import hamming_pairs, hamming_pairs_all

    hashes = random_hashes(n, 0) if kind == "random" else clustered_hashes(n, 0)
    start = time.perf_counter()
    found = (hamming_pairs if method == "mih" else hamming_pairs_all)(hashes, 4)
    seconds = time.perf_counter() - start
    digest = hashlib.sha256(
        b"".join(np.ascontiguousarray(part, dtype=np.int64).tobytes() for part in found)
    ).hexdigest()
    return {"seconds": round(seconds, 2), "pairs": len(found[0]), "digest": digest, "peak_rss_mb": peak_rss_mb()}


def search_part() -> None:
    rows = {}
    for kind, n in (("random", 50_000), ("clustered", 50_000)):
        mih, brute = child(["search", kind, str(n), "mih"]), child(["search", kind, str(n), "all"])
        rows[f"{kind} {n}"] = {
            "mih": mih,
            "all_pairs": brute,
            "same_pairs": (mih["pairs"], mih["digest"]) == (brute["pairs"], brute["digest"]),
        }
        print(kind, n, rows[f"{kind} {n}"], flush=True)
    for kind in ("random", "clustered"):
        mih = child(["search", kind, "1000000", "mih"])
        # all pairs grows with n^2: 400x the 50,000 time
        estimate = rows[f"{kind} 50000"]["all_pairs"]["seconds"] * (1_000_000 / 50_000) ** 2
        rows[f"{kind} 1000000"] = {"mih": mih, "all_pairs_estimated_seconds": round(estimate)}
        print(kind, 1_000_000, rows[f"{kind} 1000000"], flush=True)
    save("search", {"max_distance": 4, "rows": rows})
    print("| hashes | multi-index: s | peak RSS MB | pairs | all pairs: s | same pairs |\n|---|---|---|---|---|---|")
    for name, row in rows.items():
        brute = row.get("all_pairs", {}).get("seconds", f"~{row.get('all_pairs_estimated_seconds')} (est.)")
        same = row.get("same_pairs", "n/a")
        print(f"| {name} | {row['mih']['seconds']} | {row['mih']['peak_rss_mb']} | {row['mih']['pairs']} | "
              f"{brute} | {same} |")  # fmt: skip


class BaselineReader:
    """The reader before issue 24: per run of rows one os.pread into a new bytes object, copied into a unique
    buffer, then fancy-indexed into the output (three copies); the batch assembled with one more copy."""

    def __init__(self, path: str) -> None:
        import numpy as np

        with open(path, "rb") as f:
            np.lib.format.read_magic(f)
            self.shape, _, self.dtype = np.lib.format.read_array_header_1_0(f)
            self.offset = f.tell()
        self.row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        self.fd = os.open(path, os.O_RDONLY)

    def __getitem__(self, rows: Any) -> Any:
        import numpy as np

        unique, inverse = np.unique(rows, return_inverse=True)
        out = np.empty((len(unique), *self.shape[1:]), dtype=self.dtype)
        flat = out.reshape(len(unique), -1).view(np.uint8)
        start = 0
        breaks = np.flatnonzero(np.diff(unique) != 1) + 1
        for run in np.split(np.arange(len(unique)), breaks):
            first, count = int(unique[run[0]]), len(run)
            data = os.pread(self.fd, count * self.row_bytes, self.offset + first * self.row_bytes)
            flat[start : start + count] = np.frombuffer(data, dtype=np.uint8).reshape(count, self.row_bytes)
            start += count
        return out[inverse]


def reader_child(path: str, which: str, mode: str) -> dict[str, Any]:
    import numpy as np

    from imgclf.features.rows import RowReader
    from imgclf.features.store import FeatureBatches

    n = int(np.load(path, mmap_mode="r").shape[0])
    labels = np.arange(n) % 10
    rows = np.arange(n)
    batch = 32 if mode == "shuffled" else 256  # train@'s batch; evaluate@'s in-order pass
    seed = 0 if mode == "shuffled" else None
    if which == "now":
        batches = FeatureBatches([(RowReader(path), rows, labels)], batch, shuffle_seed=seed)
        get = batches.__getitem__
    else:
        reader, order = BaselineReader(path), np.random.default_rng(0).permutation(n) if seed is not None else rows

        def get(i: int) -> Any:
            items = order[i * batch : (i + 1) * batch]
            block = reader[items]
            x = np.empty((len(items), *ROW_SHAPE), dtype=np.float32)
            x[np.arange(len(items))] = block  # the old FeatureBatches' copy into the batch
            return x, labels[items]

    count = math.ceil(n / batch)
    checksum = 0.0
    start = time.perf_counter()
    for i in range(count):
        x, _ = get(i)
        checksum += float(x[0, 0, 0, 0])
    return {"seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": peak_rss_mb(), "batches": count}


def reader_part(n: int) -> None:
    import numpy as np

    rows = {}
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as tmp:
        path = Path(tmp) / "features.npy"
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, *ROW_SHAPE))
        rng = np.random.default_rng(0)
        for i in range(0, n, 2000):
            array[i : i + 2000] = rng.random((min(2000, n - i), *ROW_SHAPE), dtype=np.float32)
        array.flush()
        del array
        for mode in ("shuffled", "in order"):
            for which in ("before", "now", "before", "now"):  # twice each, alternating: the page cache is warm
                result = child(["reader", str(path), which, mode])
                rows.setdefault(f"{mode} {which}", []).append(result)
                print(mode, which, result, flush=True)
    summary = {key: min(runs, key=lambda r: r["seconds"]) for key, runs in rows.items()}
    save("reader", {"rows": n, "row_shape": list(ROW_SHAPE), "file_gb": round(n * 36864 / 1e9, 2), "runs": summary})
    print("| pass | batch | before: s | peak RSS MB | now: s | peak RSS MB |\n|---|---|---|---|---|---|")
    for mode, batch in (("shuffled", 32), ("in order", 256)):
        b, w = summary[f"{mode} before"], summary[f"{mode} now"]
        print(f"| {mode} | {batch} | {b['seconds']} | {b['peak_rss_mb']} | {w['seconds']} | {w['peak_rss_mb']} |")


def main() -> None:
    if sys.argv[1:2] == ["_child"]:
        what, *args = sys.argv[2:]
        if what == "search":
            out = search_child(args[0], int(args[1]), args[2])
        else:
            out = reader_child(args[0], args[1], args[2])
        print(json.dumps(out))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["search", "reader"])
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    if args.part == "search":
        search_part()
    else:
        reader_part(args.rows)


if __name__ == "__main__":
    main()
