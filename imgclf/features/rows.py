"""Rows of a .npy file read on demand with positional reads, straight into the caller's buffer.

Rows are read with positional reads (`os.preadv`), not through a memory map: pages of a memory-mapped file
that a process has touched count in its resident memory, so an epoch over a 20 GB feature file would grow it
to 20 GB; here resident memory stays a batch, and the operating system's page cache (which is not the
process's and is given back under pressure) keeps the hot rows fast. No Keras or TensorFlow here: the backbone
pass's output cache (reuse.py) reads with it too.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np

IOV_MAX = 1024  # buffers per preadv call: Linux's limit (sysconf may say -1 for "no limit" elsewhere)


class RowReader:
    """The rows of a .npy file of shape (N, ...) read on demand: `reader[rows]` for an int array of rows,
    in any order and with repeats, returns (len(rows), ...) as a new in-memory array."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(f)
            self.offset = f.tell()
        if fortran or dtype.hasobject:
            raise ValueError(f"{self.path}: expected a C-ordered numeric array. Received: {dtype}, fortran={fortran}")
        self.shape: tuple[int, ...] = tuple(shape)
        self.dtype = dtype
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * dtype.itemsize
        self.fd = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        self.gather(rows, out)
        return out

    def gather(self, rows: np.ndarray, out: np.ndarray, positions: np.ndarray | None = None) -> None:
        """Read row rows[k] into out[positions[k]] (positions: 0..len(rows) - 1 by default) straight from the
        file: the requested rows sorted, one `preadv` per run of consecutive rows whose buffers are the output
        rows themselves, so the bytes are copied once (page cache to output) and a sorted, shuffled or
        sequential batch costs as many system calls as it has runs. A row asked twice is read once and copied."""
        rows = np.asarray(rows, dtype=np.int64)
        positions = np.arange(len(rows)) if positions is None else np.asarray(positions, dtype=np.int64)
        if len(positions) != len(rows) or (positions.size and (positions.min() < 0 or positions.max() >= len(out))):
            raise IndexError(f"positions must be {len(rows)} rows of out (0..{len(out) - 1})")
        if out.dtype != self.dtype or out.shape[1:] != self.shape[1:] or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-ordered {self.dtype} (..., {self.shape[1:]}). Received: {out.shape}")
        if not rows.size:
            return
        if rows.min() < 0 or rows.max() >= self.shape[0]:
            raise IndexError(f"rows outside 0..{self.shape[0] - 1} of {self.path}")
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        first = np.r_[True, ordered[1:] != ordered[:-1]]  # the first request of each distinct row
        distinct, into = ordered[first], positions[order[first]]
        flat = out.reshape(len(out), -1).view(np.uint8)
        breaks = np.r_[0, np.flatnonzero(np.diff(distinct) != 1) + 1, len(distinct)]
        for run_start, run_stop in itertools.pairwise(breaks.tolist()):
            for begin in range(run_start, run_stop, IOV_MAX):  # the kernel takes at most IOV_MAX buffers a call
                stop = min(begin + IOV_MAX, run_stop)
                buffers = [memoryview(flat[p]) for p in into[begin:stop].tolist()]
                self._read_fully(buffers, self.offset + int(distinct[begin]) * self.row_bytes)
        if not first.all():  # repeats (oversampling): copy from the row's first request
            source = order[np.maximum.accumulate(np.where(first, np.arange(len(rows)), 0))]
            again = ~first
            out[positions[order[again]]] = out[positions[source[again]]]

    def _read_fully(self, buffers: list[memoryview], offset: int) -> None:
        """preadv until every buffer is full: a call may read less (a 2 GB cap per call, network filesystems);
        a read of nothing before the end is a file shorter than its header says."""
        buffers = [buffer for buffer in buffers if len(buffer)]
        while buffers:
            got = os.preadv(self.fd, buffers, offset)
            if got == 0:
                raise OSError(f"{self.path} is shorter than its header says (truncated?)")
            offset += got
            while buffers and got >= len(buffers[0]):
                got -= len(buffers[0])
                buffers.pop(0)
            if got:
                buffers[0] = buffers[0][got:]

    def close(self) -> None:
        if getattr(self, "fd", -1) >= 0:  # also after a failed __init__
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()
