"""What a run prints: our own messages on stderr, TensorFlow's start-up chatter filtered out, and a run log.

- `quiet_native_stderr` drops the lines TensorFlow's C++ core writes to file descriptor 2 before its own
  log level applies (`oneDNN custom operations are on`, `All log messages before absl::InitializeLog()`,
  `NodeDef mentions attribute use_unbounded_threadpool`). TF_CPP_MIN_LOG_LEVEL cannot silence them: they
  are printed while the library loads. Every other line, ours and any real error, passes through.
- `setup_logging(run_log=...)` also appends every message, with a time stamp, to a run log file
  (`logs/imgclf.log` for stages). It is neither tracked by git nor hashed by DVC: timings live there, not
  in any output.
- `Progress` shows a bar on a terminal and writes a progress line to the run log (and to stderr when it is
  not a terminal, as under `dvc repro` in CI) every `interval` seconds.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import sys
import time
from pathlib import Path
from types import TracebackType

log = logging.getLogger("imgclf")
progress_log = logging.getLogger("imgclf.progress")

RUN_LOG = Path("logs") / "imgclf.log"
# Seconds between progress lines in the run log (IMGCLF_PROGRESS_SECONDS overrides it, e.g. for a test).
PROGRESS_INTERVAL = float(os.environ.get("IMGCLF_PROGRESS_SECONDS", "30"))

# Lines of TensorFlow's native start-up chatter: glog-style info lines, absl's pre-initialisation notice,
# the CPU-instructions hint, and the harmless graph-optimizer notices of this TensorFlow/Keras pairing.
CHATTER = re.compile(
    rb"^(I\d{4} [\d:.]+ +\d+ \S+\] "
    rb"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|To enable the following instructions: .* rebuild TensorFlow"
    rb"|[WE]\d{4} .*(NodeDef mentions attribute|Unable to register cu|computation placer already registered)"
    # Ray Data's map actors always hold their function in the object store; Ray's core worker says so, once per
    # actor, as an error-level line (github.com/ray-project/ray/issues/53727). Not a failure: real ones raise.
    rb"|\[[\d-]+ [\d:,]+ E \d+ \d+\] core_worker\.cc:\d+: Actor with class name: 'MapWorker\(.*"
    rb"has constructor arguments in the object store and max_restarts > 0)"
)

# The filter runs in a child process that reads what this process writes to fd 2 and forwards all but the
# chatter to the real stderr. A child, not a thread: it drains to the end even when this process dies
# (an abort, a fatal signal), so the last lines, often the important ones, are never lost.
FILTER_CODE = r"""
import os, re, signal, sys
# Ctrl-C, a timeout's SIGTERM, a closed terminal's SIGHUP go to the whole process group: they stop the stage, and
# the filter outlives it to forward its last lines (often the error). It exits when the stage's pipe closes.
for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT"):
    if hasattr(signal, name):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
chatter = re.compile(sys.argv[1].encode("latin-1"))
pending = b""
def forward(data):
    try:
        os.write(1, data)
    except OSError:  # the reader went away (a closed pipe or terminal): keep draining, drop the output
        pass
while True:
    try:
        chunk = os.read(0, 65536)
    except OSError:
        break
    if not chunk:
        break
    pending += chunk
    *done, pending = re.split(rb"(?<=[\n\r])", pending)
    out = b"".join(line for line in done if not chatter.match(line))
    if out:
        forward(out)
if pending and not chatter.match(pending):
    forward(pending)
"""

_real_stderr_is_tty: bool | None = None  # recorded before fd 2 becomes the filter's pipe
_filter_installed = False


def stderr_is_tty() -> bool:
    """Whether the user's stderr is a terminal (fd 2 itself is a pipe once the filter is installed)."""
    return _real_stderr_is_tty if _real_stderr_is_tty is not None else sys.stderr.isatty()


def quiet_native_stderr() -> None:
    """Route file descriptor 2 through a filter process that drops TensorFlow's chatter (once per process).

    Call before TensorFlow is imported. Python's own stderr goes through the same filter, in order.
    """
    global _filter_installed, _real_stderr_is_tty
    if _filter_installed or os.environ.get("IMGCLF_RAW_STDERR"):
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's own level, for what it does control
    import subprocess

    try:
        sys.stderr.flush()
        _real_stderr_is_tty = os.isatty(2)
        real = os.dup(2)
        child = subprocess.Popen(
            [sys.executable, "-S", "-c", FILTER_CODE, CHATTER.pattern.decode("latin-1")],
            stdin=subprocess.PIPE,
            stdout=real,
            close_fds=True,
        )
        os.dup2(child.stdin.fileno(), 2)  # type: ignore[union-attr]
        child.stdin.close()  # type: ignore[union-attr]
    except OSError:  # no usable fd 2 (a closed stderr), or no process to spare: nothing is filtered
        return
    _filter_installed = True

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(real, 2)  # closes our last write end of the pipe: the filter sees EOF, forwards the rest, exits
        # A grandchild still holding the pipe open must not hang the exit.
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)

    atexit.register(restore)


class _NotOnTerminal(logging.Filter):
    """Keep progress lines off stderr when it is a terminal (the bar shows progress there)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == progress_log.name and stderr_is_tty())


def setup_logging(level: int = logging.INFO, run_log: str | Path | None = None) -> None:
    """Log `imgclf` messages to stderr as plain lines, and to `run_log` with time stamps (once per process)."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_NotOnTerminal())
        log.addHandler(handler)
        if run_log is not None:
            try:
                Path(run_log).parent.mkdir(parents=True, exist_ok=True)
                file_handler = logging.FileHandler(run_log, encoding="utf-8")
            except OSError as exc:  # a read-only checkout still runs; it just keeps no run log
                log.warning("no run log (%s)", exc)
            else:
                file_handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(message)s"))
                log.addHandler(file_handler)
    log.setLevel(level)
    log.propagate = False


class Progress:
    """Count work done: a tqdm bar on a terminal, and a line every `interval` seconds in the run log
    (`features@vgg16: 512/2000 images (25.6%), 41.3 images/s, about 36 s left`)."""

    def __init__(self, total: int, desc: str, unit: str = "images", interval: float | None = None) -> None:
        from tqdm import tqdm

        self.total, self.desc, self.unit = total, desc, unit
        self.interval = PROGRESS_INTERVAL if interval is None else interval
        self.done = 0
        self.start = self.last = time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, unit="img", mininterval=2, disable=not stderr_is_tty())

    def update(self, n: int) -> None:
        self.done += n
        self.bar.update(n)
        now = time.perf_counter()
        if now - self.last >= self.interval and self.done < self.total:
            self.last = now
            rate = self.done / (now - self.start)
            left = (self.total - self.done) / rate if rate > 0 else float("nan")
            progress_log.info(
                "%s: %d/%d %s (%.1f%%), %.1f %s/s, about %.0f s left",
                self.desc, self.done, self.total, self.unit, 100 * self.done / max(self.total, 1), rate, self.unit,
                left,
            )  # fmt: skip

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.bar.close()
