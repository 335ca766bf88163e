"""User-facing errors: one line that says what was received, what was expected and how to fix it."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger("imgclf")

F = TypeVar("F", bound=Callable[..., Any])

# Exit code for a user error (bad params, bad data, missing model): distinct from a crash (1).
USER_ERROR_EXIT = 2


class UserError(Exception):
    """A problem the user can fix (params, data, files). Printed as one line, never as a traceback."""


def setup_logging(level: int = logging.INFO) -> None:
    """Log `imgclf` messages to stderr as plain lines, once per process."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def stage_main(func: F) -> F:
    """Run a stage's main(): a UserError becomes `error: ...` on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        setup_logging()
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(USER_ERROR_EXIT)

    return wrapper  # type: ignore[return-value]
