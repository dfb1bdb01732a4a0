"""Multi-task learning on all data seen so far (MTL), the usual upper bound.

`--joint_schedule every_task` (default, mmcl's): after each task, train on all tasks' training data so
far, continuing from the previous task's weights; every row of the accuracy matrix is an upper bound for
that point of the sequence. `last_task` is PyContinual's MTL: nothing is trained until the last task,
then the initial model trains once on every task's data; only the last row is its result (the earlier
rows are the untrained model's). Either way `--select_best` scores the pooled valid splits of every task
so far, as PyContinual validates MTL on all tasks' valid data.
"""
from __future__ import annotations

from dataclasses import dataclass

from mmcl.approaches import APPROACHES
from mmcl.approaches.base import Approach
from mmcl.data.sequence import Task
from mmcl.options import Options, option

SCHEDULES = ("every_task", "last_task")


@dataclass
class JointOptions(Options):
    title = "joint options"
    joint_schedule: str = option("every_task", "every_task: retrain on all data so far after each task, from the "
                                               "previous weights | last_task: PyContinual's, train once at the "
                                               "last task from the initial model")

    def validate(self) -> None:
        if self.joint_schedule not in SCHEDULES:
            raise ValueError(f"--joint_schedule must be one of {', '.join(SCHEDULES)}, got '{self.joint_schedule}'")


@APPROACHES.register("joint", aliases=("mtl",))
class Joint(Approach):
    name = "joint"
    Options = JointOptions

    def trains_task(self, task: Task) -> bool:
        return self.opts.joint_schedule == "every_task" or task.id == len(self.seq) - 1

    def selection_tasks(self, task: Task) -> list[Task]:
        return self.seq.tasks[: task.id + 1]

    def train_dataset(self, task: Task):
        from datasets import concatenate_datasets

        from mmcl.data.mixed import ModalityGroups

        by_modality: dict[str, list] = {}
        for t in self.seq.tasks[: task.id + 1]:
            by_modality.setdefault(t.modality, []).append(t.train)
        parts = {m: concatenate_datasets(ds) for m, ds in by_modality.items()}
        if len(parts) == 1:
            return next(iter(parts.values()))
        # text and image rows have different columns and towers: batches of one modality each
        return ModalityGroups(parts)
