"""Command-line entry: a user's mistake (bad recipe, busy or full output folder, damaged checkpoint, a run
stopped on non-finite losses) prints one `error: ...` line that says what and how to fix it, exit code 2;
a traceback is kept for real bugs."""

from __future__ import annotations

import sys
from typing import Callable


class UsageError(Exception):
    """A command-line mistake (a bad argument, a missing or unreadable input file); the message names the fix."""


def user_errors() -> tuple[type[BaseException], ...]:
    from data.cache import CacheError
    from data.typed_config import ConfigError

    from .checkpoints import CheckpointError
    from .loop import NonFiniteError
    from .run_guard import OutputNotWritableError, RunLockedError

    return (ConfigError, CacheError, CheckpointError, NonFiniteError, OutputNotWritableError, RunLockedError,
            FileNotFoundError, FileExistsError, UsageError)


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run `main(argv)`; our named errors become `error: <message>` on stderr and exit code 2."""
    try:
        return main(argv)
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
