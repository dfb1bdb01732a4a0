"""ONE: an independent model per task (the trainable parts are re-initialised and kept per task).

Frozen parts (a frozen BERT under adapters) are shared, as in PyContinual's ONE baseline:
only what would be trained is duplicated. Prediction for task u swaps in task u's copy.
"""
from __future__ import annotations

import torch
from torch.func import functional_call

from mmcl.approaches import APPROACHES
from mmcl.approaches.base import Approach, BufferDict, trainable_named_parameters
from mmcl.data.sequence import Task


@APPROACHES.register("one")
class One(Approach):
    name = "one"
    scenarios = ("til",)
    needs_task_id = True

    def __init__(self, backbone, seq, scenario, cfg) -> None:
        super().__init__(backbone, seq, scenario, cfg)
        params = trainable_named_parameters(self.model)
        self.initial = BufferDict({n: p.detach().clone() for n, p in params.items()})
        self.per_task = torch.nn.ModuleList(
            BufferDict({n: torch.zeros_like(p) for n, p in params.items()}) for _ in range(len(seq))
        )

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        with torch.no_grad():
            for name, p in trainable_named_parameters(self.model).items():
                p.copy_(self.initial[name])

    def after_task(self, task: Task, loader) -> None:
        with torch.no_grad():
            for name, p in trainable_named_parameters(self.model).items():
                self.per_task[task.id][name] = p

    @torch.no_grad()
    def predict(self, batch: dict, task_id: int | None) -> torch.Tensor:
        if self.current_task is not None and task_id == self.current_task.id:
            return self.model(batch, task_id)  # the live weights (mid-task validation)
        weights = dict(self.per_task[task_id].items())
        return functional_call(self.model, weights, (batch, task_id), strict=False)
