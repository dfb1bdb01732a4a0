"""Tasks, task sequences and scenarios.

A reader returns a `TaskSequence`: tasks with their own `datasets.Dataset` splits
and local labels 0..n-1. The `Scenario` decides what the model is told (a task id
or not) and which label space the targets live in, so readers never know about
scenarios and approaches never know about readers.
"""
from __future__ import annotations

import abc

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from mmcl.registry import Registry

if TYPE_CHECKING:  # datasets is imported lazily by the readers
    import datasets

MODALITIES = ("text", "image")


@dataclass
class Task:
    """One task of a sequence.

    Splits are `datasets.Dataset`s with a `label` column (local ids, 0..len(classes)-1)
    and the modality's inputs: `text` (and optionally `text_pair`) for text,
    `image` (uint8 array, HxW or HxWxC) for images.
    """

    id: int
    name: str
    modality: str
    classes: list[str]
    train: "datasets.Dataset"
    valid: "datasets.Dataset"
    test: "datasets.Dataset"
    class_offset: int = 0  # first global class id (set by TaskSequence for CIL)
    info: dict = field(default_factory=dict)  # reader-specific facts (domain, source file, ...)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def global_classes(self) -> range:
        return range(self.class_offset, self.class_offset + self.num_classes)

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"task '{self.name}': modality must be one of {MODALITIES}, got '{self.modality}'")


@dataclass
class TaskSequence:
    name: str
    tasks: list[Task]
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        offset = 0
        for i, task in enumerate(self.tasks):
            task.id = i
            task.class_offset = offset
            offset += task.num_classes

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, i: int) -> Task:
        return self.tasks[i]

    def __iter__(self):
        return iter(self.tasks)

    @property
    def modalities(self) -> list[str]:
        return sorted({t.modality for t in self.tasks})

    @property
    def total_classes(self) -> int:
        return sum(t.num_classes for t in self.tasks)

    def head_layout(self, scenario: "Scenario") -> list[int]:
        """Output sizes of the heads the scenario needs for this sequence."""
        return scenario.head_layout(self)


class Scenario(abc.ABC):
    """What a learner is told and which label space targets live in.

    name: registry name; task_id_at_test: whether `predict` receives the task id; per_task_heads: a
    head per task (TIL) instead of one shared head;
    global_labels: targets are global class ids (the task-aware accuracy is reported beside);
    task_boundaries: False for a task-free stream, which the engine runs as one pass of small
    batches with the task ids hidden (`mmcl/stream.py`).
    """

    name: str = ""
    task_id_at_test: bool = True
    task_boundaries: bool = True
    global_labels: bool = False
    per_task_heads: bool = False  # one output head per task (TIL) rather than one shared head

    @abc.abstractmethod
    def head_layout(self, seq: TaskSequence) -> list[int]:
        """Output sizes of the heads this scenario needs."""

    @abc.abstractmethod
    def target(self, task: Task, local_label: int) -> int:
        """The training/test target of an example with this local label."""

    def active_classes(self, seq: TaskSequence, seen_tasks: int) -> int:
        """How many outputs of a shared/growing head may be predicted after `seen_tasks` tasks."""
        return sum(self.head_layout(seq))

    def describe(self) -> str:
        return self.name


SCENARIOS: Registry[type[Scenario]] = Registry("scenario")


@SCENARIOS.register("til", aliases=("til_classification", "task_incremental"))
class TaskIncremental(Scenario):
    """A head per task; the task id is given at train and test time (PyContinual TIL)."""

    name = "til"
    per_task_heads = True

    def head_layout(self, seq: TaskSequence) -> list[int]:
        return [t.num_classes for t in seq.tasks]

    def target(self, task: Task, local_label: int) -> int:
        return local_label


@SCENARIOS.register("dil", aliases=("dil_classification", "domain_incremental"))
class DomainIncremental(Scenario):
    """One shared head over a shared label space; no task id at test time."""

    name = "dil"
    task_id_at_test = False

    def head_layout(self, seq: TaskSequence) -> list[int]:
        return [max(t.num_classes for t in seq.tasks)]

    def target(self, task: Task, local_label: int) -> int:
        return local_label


@SCENARIOS.register("cil", aliases=("cil_classification", "class_incremental"))
class ClassIncremental(Scenario):
    """Classes get global ids; one head grows with the classes seen; no task id at test time."""

    name = "cil"
    task_id_at_test = False
    global_labels = True

    def head_layout(self, seq: TaskSequence) -> list[int]:
        return [seq.total_classes]

    def target(self, task: Task, local_label: int) -> int:
        return task.class_offset + local_label

    def active_classes(self, seq: TaskSequence, seen_tasks: int) -> int:
        return sum(t.num_classes for t in seq.tasks[:seen_tasks])


@SCENARIOS.register("online", aliases=("task_free", "online_task_free"))
class OnlineTaskFree(ClassIncremental):
    """Task-free online learning: one stream of small batches over the whole sequence, each example
    once, global labels, no task ids and no boundaries for the learner. The evaluator alone knows where
    the distribution changes and fills the accuracy matrix there (after each task's last batch).

    The head covers every class of the sequence from the start: a learner that is not told when
    classes arrive cannot grow its head at a boundary (unseen classes are pushed down by the loss)."""

    name = "online"
    task_boundaries = False

    def active_classes(self, seq: TaskSequence, seen_tasks: int) -> int:
        return seq.total_classes


def get_scenario(name: str) -> Scenario:
    return SCENARIOS.get(name)()


def int_column(dataset, name: str):
    """A column of integers as a numpy array, read through Arrow at once (iterating `dataset[name]`, a lazy
    Column in datasets >= 4, costs about 25 us a row)."""
    import numpy as np

    if not len(dataset):
        return np.zeros(0, dtype=np.int64)
    return np.asarray(dataset.with_format("numpy", columns=[name])[:][name], dtype=np.int64)


def check_labels(task: Task, split_names: Sequence[str] = ("train", "valid", "test")) -> None:
    """Fail early, naming the task and split, if a label is outside 0..num_classes-1."""
    for split in split_names:
        labels = int_column(getattr(task, split), "label")
        if len(labels) and (labels.min() < 0 or labels.max() >= task.num_classes):
            raise ValueError(
                f"task '{task.name}' split '{split}': labels must be in 0..{task.num_classes - 1}, "
                f"found {min(labels)}..{max(labels)}"
            )
