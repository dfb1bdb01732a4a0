"""Task-sequence readers and the `tasks/*.yaml` catalogue.

A task sequence is a YAML file in `tasks/` (or any path) that names a reader and its
parameters. Readers are functions registered in `READERS`:

    reader(params: dict, ctx: ReaderContext) -> TaskSequence
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from mmcl.data.sequence import SCENARIOS, Scenario, Task, TaskSequence, get_scenario
from mmcl.registry import Registry, UnknownNameError

READERS: Registry = Registry("reader")
for _family in ("vader", "pycontinual", "nli", "trec"):  # one module per dataset family
    READERS.add_loader(lambda m=_family: __import__(f"mmcl.data.{m}"))
READERS.add_loader(lambda: __import__("mmcl.data.vision"))
READERS.add_loader(lambda: __import__("mmcl.data.mixed"))

TASKS_DIR = Path(os.environ.get("MMCL_TASKS", Path(__file__).resolve().parents[2] / "tasks"))


class DataNotFoundError(FileNotFoundError):
    """A data directory or file is missing; the message names it and how to get the data."""


class DataFormatError(ValueError):
    """A data or task-sequence file cannot be used as it is: empty, truncated, not UTF-8, a wrong type,
    a missing field, a label outside the task's set. The message names the file (and the line or record)."""


@dataclass
class ReaderContext:
    """Run-level inputs every reader may use."""

    data_dir: Path | None = None  # --data_dir, else $MMCL_DATA
    idrandom: int = 0  # which line of an order file
    ntasks: int | None = None  # keep the first n tasks of the order
    seed: int = 0  # data seed (splits, subsampling)
    train_data_size: int | None = None  # PyContinual "small" variant: keep n training examples per task
    max_train_per_task: int | None = None  # cap on training examples per task (None = reader default)
    task_file: Path | None = None  # the task-sequence YAML being read (set by load_task_sequence; for messages)

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


def _mapping_field(spec: dict, key: str, path: Path) -> dict:
    value = spec.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DataFormatError(f"task sequence file '{path}': '{key}' must be a mapping (key: value lines), "
                              f"got {type(value).__name__} {value!r}")
    return value


def reader_for(name: object, where: str):
    """The registered reader `name`; an unknown name raises DataFormatError at `where` (a file, a part)."""
    if isinstance(name, str) and name in READERS:
        return READERS.get(name)
    valid = READERS.names()
    close = difflib.get_close_matches(str(name), valid, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise DataFormatError(f"{where}: unknown reader {name!r}.{hint} Valid readers: {', '.join(valid)}")


def task_spec(name_or_path: str) -> dict:
    """The YAML spec of a task sequence, by registry name or file path."""
    from mmcl.data.files import read_yaml_file

    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = TASK_SEQUENCES.get(name_or_path)
    spec = read_yaml_file(path, "task sequence file")
    if not isinstance(spec, dict):
        raise DataFormatError(f"task sequence file '{path}': the top level is a {type(spec).__name__}, expected a "
                              f"mapping with `reader:` and `params:` (no leading '- ')")
    if "reader" not in spec:
        raise DataFormatError(f"task sequence file '{path}' lacks the field 'reader' "
                              f"(one of: {', '.join(READERS.names())})")
    for key in ("params", "defaults", "epoch_multipliers"):
        spec[key] = _mapping_field(spec, key, path)
    spec.setdefault("name", path.stem)
    spec["_path"] = str(path)
    return spec


def load_task_sequence(name_or_path: str, ctx: ReaderContext) -> TaskSequence:
    spec = task_spec(name_or_path)
    reader = reader_for(spec["reader"], f"task sequence file '{spec['_path']}'")
    seq = reader(dict(spec["params"]), dataclasses.replace(ctx, task_file=Path(spec["_path"])))
    seq.name = spec["name"]
    # Per-task epoch factors by task-name prefix, e.g. PyContinual trains the small Bing ASC domains 3x longer.
    for prefix, factor in spec["epoch_multipliers"].items():
        for task in seq:
            if task.name.startswith(prefix):
                task.info["epoch_multiplier"] = float(factor)
    return seq


__all__ = [
    "READERS", "TASK_SEQUENCES", "SCENARIOS", "DataFormatError", "DataNotFoundError", "ReaderContext", "Scenario",
    "Task",
    "TaskSequence", "get_scenario", "load_task_sequence", "task_spec", "UnknownNameError",
]
