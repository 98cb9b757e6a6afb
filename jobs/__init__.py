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
    artifacts, Ray's object store full), 2 bad arguments, 130 interrupted.
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
    except Exception as err:
        full = _object_store_full(err)
        if full is None:
            raise
        print(f"fc7 {command}: error: {full}", file=sys.stderr)
        return 1


def _object_store_full(err: BaseException) -> str | None:
    """What to do when Ray could not store an object (the error, or one it was raised from),
    else None. Ray's own message blames "the local disk" without saying which or why."""
    exceptions = sys.modules.get("ray.exceptions")  # not imported: not a Ray error
    larger = ("give Ray a larger object store (`ray start --object-store-memory BYTES` on a "
              "cluster; RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION, 0.3 of the memory unless "
              "set, for the local Ray a job starts)")
    chain: list[BaseException] = []
    while exceptions is not None and err is not None and err not in chain:
        chain.append(err)
        if isinstance(err, exceptions.OutOfDiskError):
            return ("Ray's object store is full and it may not spill to disk: the disk of Ray's "
                    "temp folder (/tmp/ray unless set) is fuller than Ray allows (95% unless "
                    "RAY_local_fs_capacity_threshold says otherwise; OutOfDiskError). Free disk "
                    f"space there, or {larger}")
        if isinstance(err, exceptions.ObjectStoreFullError):
            return ("Ray's object store is full of objects still in use (ObjectStoreFullError): "
                    f"{larger}")
        err = err.__cause__ or err.__context__
    return None
