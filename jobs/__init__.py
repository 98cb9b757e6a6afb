"""Entry points: `fc7 COMMAND` (jobs/cli.py) and one script per job, each runnable as
`python jobs/NAME.py` or under `ray job submit`. They parse the options, call the library and
print what it returns; the work itself lives in `pipeline/`."""

from __future__ import annotations

import sys
from collections.abc import Callable

from pipeline.errors import ConfigError, PipelineError


def run(command: str, main: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    """Run a job's `main`, turning our typed errors into one clear line and an exit code.

    Exit status: 0 done, 1 the job could not run (bad input, unreadable source, mismatched
    artifacts), 2 bad arguments, 130 interrupted.
    """
    try:
        return main(argv)
    except ConfigError as err:
        print(f"fc7 {command}: error: {err}", file=sys.stderr)
        return 2
    except PipelineError as err:
        print(f"fc7 {command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fc7 {command}: interrupted", file=sys.stderr)
        return 130
