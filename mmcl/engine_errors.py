"""Errors of the run engine, importable without torch (the CLI catches them)."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not belong to this run."""
