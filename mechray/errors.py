"""One hierarchy for every error mechray raises on purpose, so callers can catch them together.

Usage::

    from mechray.errors import MechrayError

    try:
        runner.run_mechint_eval(hidden_shards_path="./mechint_cache")
    except MechrayError as exc:          # a config, layer, store, write or analysis problem
        log.error("%s", exc)             # names the bad value and the fix
        sys.exit(exc.exit_code)          # what `mechray` itself exits with

Each class also derives from the builtin a caller would have caught before it existed
(``ValueError``, ``KeyError``, ``RuntimeError``, ``OSError``), so no existing ``except`` changes.
This module imports nothing from mechray: every package may import it.
"""

from __future__ import annotations


class MechrayError(Exception):
    """Base of mechray's errors; the message names the bad value and the fix."""

    #: the ``mechray`` command's exit status for this kind of error
    exit_code: int = 1


class ConfigError(MechrayError, ValueError):
    """A configuration value is wrong; the message names the field and the fix."""

    exit_code = 2


class UnknownLayerError(MechrayError, KeyError):
    """A requested layer name matches no module; the message lists the closest real names."""

    exit_code = 2

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class AnalysisParamsError(MechrayError, ValueError):
    """Bad analysis parameters; the message names the analysis, the field and the fix."""

    exit_code = 2


class ShardError(MechrayError, RuntimeError):
    """A shard or manifest is missing, unreadable or does not match its checksum; the message
    names it and the command that repairs it."""

    exit_code = 3


class StorageFullError(MechrayError, OSError):
    """No space left where a shard or manifest had to be written; the message says what was kept."""

    exit_code = 4


class ShardBuildError(MechrayError, ValueError):
    """The rows captured for a shard do not fit together (not a disk or S3 problem); the
    message names the layer and what to change in how the model is captured."""

    exit_code = 2


class ShardWriteError(MechrayError, RuntimeError):
    """One or more shards could not be made durable; ``failed`` names them."""

    exit_code = 4

    def __init__(self, failed: dict[str, BaseException]):
        self.failed = failed
        first_name, first_exc = next(iter(failed.items()))
        hint = ("this is not a storage problem and retrying cannot help: change how the model "
                "is captured, as the error says" if isinstance(first_exc, ShardBuildError) else
                "fix the cause (disk space, permissions, S3 credentials/endpoint) and call "
                "retry_failed()")
        super().__init__(
            f"{len(failed)} shard(s) failed to write, first {first_name}: "
            f"{type(first_exc).__name__}: {first_exc}. They are kept in memory: {hint}")

    def __reduce__(self):  # survives pickling across Ray (the default would re-call with a str)
        return (type(self), (self.failed,))
