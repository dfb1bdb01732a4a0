"""Task-sequence readers and the `tasks/*.yaml` catalogue.

A task sequence is a YAML file in `tasks/` (or any path) that names a reader and its
parameters. Readers are functions registered in `READERS`:

    reader(params: dict, ctx: ReaderContext) -> TaskSequence
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from mmcl.data.sequence import SCENARIOS, Scenario, Task, TaskSequence, get_scenario
from mmcl.registry import Registry, UnknownNameError

READERS: Registry = Registry("reader")
READERS.add_loader(lambda: __import__("mmcl.data.text"))
READERS.add_loader(lambda: __import__("mmcl.data.vision"))
READERS.add_loader(lambda: __import__("mmcl.data.mixed"))

TASKS_DIR = Path(os.environ.get("MMCL_TASKS", Path(__file__).resolve().parents[2] / "tasks"))


class DataNotFoundError(FileNotFoundError):
    """A data directory or file is missing; the message names it and how to get the data."""


@dataclass
class ReaderContext:
    """Run-level inputs every reader may use."""

    data_dir: Path | None = None  # --data_dir, else $MMCL_DATA
    idrandom: int = 0  # which line of an order file
    ntasks: int | None = None  # keep the first n tasks of the order
    seed: int = 0  # data seed (splits, subsampling)
    train_data_size: int | None = None  # PyContinual "small" variant: keep n training examples per task
    max_train_per_task: int | None = None  # cap on training examples per task (None = reader default)

    def resolve_data_dir(self, needed_for: str, hint: str) -> Path:
        root = self.data_dir or (Path(os.environ["MMCL_DATA"]) if os.environ.get("MMCL_DATA") else None)
        if root is None:
            raise DataNotFoundError(
                f"task sequence '{needed_for}' reads its data from a directory: pass --data_dir DIR or set MMCL_DATA. {hint}"
            )
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataNotFoundError(f"data directory '{root}' (--data_dir / MMCL_DATA) does not exist. {hint}")
        return root


class TaskSequences(Registry):
    """The registry of task sequences: the YAML files in TASKS_DIR."""

    def _load(self) -> None:
        super()._load()
        if TASKS_DIR.is_dir():
            for path in sorted(TASKS_DIR.glob("*.yaml")):
                self._items.setdefault(path.stem, path)


TASK_SEQUENCES: TaskSequences = TaskSequences("task sequence", flag="task")


def task_spec(name_or_path: str) -> dict:
    """The YAML spec of a task sequence, by registry name or file path."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = TASK_SEQUENCES.get(name_or_path)
    with open(path) as f:
        spec = yaml.safe_load(f) or {}
    for key in ("reader",):
        if key not in spec:
            raise ValueError(f"task sequence file '{path}' lacks the field '{key}'")
    spec.setdefault("name", path.stem)
    spec.setdefault("params", {})
    spec.setdefault("defaults", {})
    spec["_path"] = str(path)
    return spec


def load_task_sequence(name_or_path: str, ctx: ReaderContext) -> TaskSequence:
    spec = task_spec(name_or_path)
    reader = READERS.get(spec["reader"])
    seq = reader(dict(spec["params"]), ctx)
    seq.name = spec["name"]
    # Per-task epoch factors by task-name prefix, e.g. PyContinual trains the small Bing ASC domains 3x longer.
    for prefix, factor in (spec.get("epoch_multipliers") or {}).items():
        for task in seq:
            if task.name.startswith(prefix):
                task.info["epoch_multiplier"] = float(factor)
    return seq


__all__ = [
    "READERS", "TASK_SEQUENCES", "SCENARIOS", "DataNotFoundError", "ReaderContext", "Scenario", "Task",
    "TaskSequence", "get_scenario", "load_task_sequence", "task_spec", "UnknownNameError",
]
