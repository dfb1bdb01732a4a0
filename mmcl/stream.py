"""The task-free stream's guard: what an online learner may see of a batch.

The engine builds batches with `labels` (global here), `local_labels` and `task_ids`. Local labels
and task ids both tell which task an example came from, so `hide_task` drops them and returns a
`StreamBatch` that raises `TaskIdLeak` on any attempt to read them (by key, `get`, `in`, or as an
attribute such as `.id`): a learner that peeks at the task fails loudly instead of scoring well.
"""
from __future__ import annotations

from typing import Any

HIDDEN_KEYS = ("task_ids", "task_id", "local_labels")
HIDDEN_ATTRS = ("id", "task_id", "task_ids", "task")


class TaskIdLeak(RuntimeError):
    """A task-free learner asked for the task of an example."""


def _leak(what: str) -> TaskIdLeak:
    return TaskIdLeak(f"the task-free stream (--scenario online) hides task identity from the learner; "
                      f"it asked for '{what}'")


class StreamBatch(dict):
    def __getitem__(self, key: str) -> Any:
        if key in HIDDEN_KEYS:
            raise _leak(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        if key in HIDDEN_KEYS:
            raise _leak(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        if key in HIDDEN_KEYS:
            raise _leak(str(key))
        return super().__contains__(key)

    def __getattr__(self, name: str) -> Any:
        if name in HIDDEN_ATTRS:
            raise _leak(name)
        raise AttributeError(name)


def hide_task(batch: dict) -> StreamBatch:
    return StreamBatch({k: v for k, v in batch.items() if k not in HIDDEN_KEYS})
