"""The task-free stream's guard: what an online learner may see of a batch.

The engine builds batches with `labels` (global here), `local_labels` and `task_ids`. Local labels
and task ids both tell which task an example came from, so `hide_task` drops them and returns a
`StreamBatch` that raises `TaskIdLeak` on any attempt to read them (by key, `get`, `in`, or as an
attribute such as `.id`): a learner that peeks at the task fails loudly instead of scoring well.
"""
from __future__ import annotations

from typing import Any

HIDDEN_KEYS = ("task_ids", "task_id", "local_labels", "example_ids")  # an example id names its split, so its task
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


def learn_stream(approach, loader, segment) -> dict[str, Any]:
    """Hand a learner one segment of the task-free stream, batch by batch; the segment's log record.

    The learner gets neither the task nor any hook at its end: only `observe(batch)` with the task id
    columns removed; it owns its optimiser, since no boundary tells it when to renew one. No autocast
    here: the learner takes several optimiser steps per batch and wraps each one (`Approach.autocast`),
    since an autocast region caches the low-precision weights for its whole length."""
    from mmcl.engine_errors import NonFiniteError

    approach.train()
    losses = []
    for i, batch in enumerate(loader):
        try:
            loss = approach.observe(hide_task(batch))
        except NonFiniteError as e:  # the learner knows its step; where in the stream is the evaluator's
            where = {"segment": f"{segment.id} ({segment.name})", "stream batch": f"{i + 1} of {len(loader)}", **e.where}
            raise NonFiniteError(e.what, e.value, where) from e
        if loss is not None:
            losses.append(float(loss))
    return {"event": "stream", "segment": segment.id, "batches": len(loader),
            "loss": sum(losses) / len(losses) if losses else None,  # None: nothing trained (LEViT all frozen)
            **approach.stream_stats()}
