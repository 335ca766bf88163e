"""The stderr filter (logs.quiet_native_stderr) never loses the last lines: a signal to the whole process group
(a timeout, a scheduler, a closed terminal) must not kill the filter before it has forwarded them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import os, signal, sys, time
from imgclf.core.logs import quiet_native_stderr
quiet_native_stderr()
def last_words(signum, frame):
    print("error: last words after signal", signum, file=sys.stderr, flush=True)
    sys.exit(2)
signal.signal(signal.{sig}, last_words)
time.sleep(1.0)  # the filter process is up and has set its signal dispositions
os.killpg(0, signal.{sig})  # the whole group: this process and its filter, as `timeout` or a closed terminal does
time.sleep(5)
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_signal_to_the_process_group_does_not_lose_the_last_lines(sig: str) -> None:
    environ = {k: v for k, v in os.environ.items() if k != "IMGCLF_RAW_STDERR"}
    environ["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", CHILD.format(sig=sig)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,  # its own process group, so that killpg reaches nothing else
    )
    assert done.returncode == 2, done.stderr
    assert f"error: last words after signal {int(getattr(signal, sig))}" in done.stderr
