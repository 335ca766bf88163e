"""User-facing errors: one line that says what was received, what was expected and how to fix it."""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from imgclf.core.logs import RUN_LOG, log, quiet_native_stderr, setup_logging

F = TypeVar("F", bound=Callable[..., Any])

# Exit code for a user error (bad params, bad data, missing model): distinct from a crash (1).
USER_ERROR_EXIT = 2


class UserError(Exception):
    """A problem the user can fix (params, data, files). Printed as one line, never as a traceback."""


def stage_name() -> str:
    """`features@vgg16` for `python -m stages.features vgg16 ...`: the name dvc.yaml gives the stage."""
    script = Path(sys.argv[0]).stem
    item = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else ""
    return f"{script}@{item}" if item else script


def stage_main(func: F) -> F:
    """Run a stage's main(): quiet stderr, a run log with its duration, and a UserError as `error: ...`
    on stderr with exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        quiet_native_stderr()
        setup_logging(run_log=RUN_LOG)
        start = time.perf_counter()
        try:
            result = func(*args, **kwargs)
        except UserError as exc:
            log.error("error: %s", exc)
            sys.exit(USER_ERROR_EXIT)
        log.info("%s: done in %.1f s", stage_name(), time.perf_counter() - start)
        return result

    return wrapper  # type: ignore[return-value]


__all__ = ["USER_ERROR_EXIT", "UserError", "log", "setup_logging", "stage_main"]
