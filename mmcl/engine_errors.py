"""Errors of a run, importable without torch (the CLI catches them).

`exit_code` is what `mmcl` exits with: 2 for input that cannot be used (a flag, a file, a
checkpoint), 1 for a run that started and could not go on (divergence, a full disk).
"""
from __future__ import annotations

from typing import Any


class MmclError(Exception):
    exit_code = 2


class CheckpointError(MmclError, RuntimeError):
    """A checkpoint is missing, corrupt or does not belong to this run."""


class ResumeConflictError(MmclError, ValueError):
    """`--resume` was given flags that would change what the run trains."""


class HubError(MmclError, OSError):
    """A model id or path (--bert_model, --backbone, --pretrained, --model) that cannot be loaded."""


class OutputError(MmclError, OSError):
    """The run directory cannot be created or written; the message names the path and the free space."""

    exit_code = 1


class NonFiniteError(MmclError, FloatingPointError):
    """A loss or gradient norm became NaN or infinite; `where` says where training was."""

    exit_code = 1

    def __init__(self, what: str, value: float, where: dict[str, Any]) -> None:
        self.what, self.value, self.where = what, value, dict(where)
        place = ", ".join(f"{k} {v}" for k, v in self.where.items())
        super().__init__(f"non-finite {what} ({value}) at {place}")


class RunFailed(MmclError, RuntimeError):
    """The run stopped before its end; metrics.json marks it failed with `reason`."""

    exit_code = 1

    def __init__(self, message: str, reason: dict[str, Any]) -> None:
        super().__init__(message)
        self.reason = reason
