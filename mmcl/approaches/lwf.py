"""Learning without Forgetting (Li & Hoiem 2016): distil the previous model's outputs on new data.

For task-incremental heads the old tasks' heads are distilled; for a shared or growing head
the outputs that existed before the task. KL at temperature T, scaled by T^2.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmcl.approaches import APPROACHES
from mmcl.approaches.base import Approach, frozen_copy
from mmcl.data.sequence import Task
from mmcl.options import Options, option, positive


def distillation(new_logits: torch.Tensor, old_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    t = temperature
    log_p = F.log_softmax(new_logits.float() / t, dim=-1)
    q = F.softmax(old_logits.float() / t, dim=-1)
    return F.kl_div(log_p, q, reduction="batchmean") * t * t


@dataclass
class LwFOptions(Options):
    title = "LwF options"
    temperature: float = option(2.0, "distillation temperature")
    lwf_lambda: float = option(1.0, "weight of the distillation loss")

    def validate(self) -> None:
        positive(self, "temperature")
        if self.lwf_lambda < 0:
            raise ValueError(f"--lwf_lambda must be >= 0, got {self.lwf_lambda}")


@APPROACHES.register("lwf")
class LwF(Approach):
    name = "lwf"
    Options = LwFOptions

    def __init__(self, backbone, seq, scenario, cfg) -> None:
        super().__init__(backbone, seq, scenario, cfg)
        self._old: list[torch.nn.Module] = []  # a list: the snapshot is not a submodule (not saved, not trained)
        self._old_active = 0

    @property
    def old_model(self) -> torch.nn.Module | None:
        return self._old[0] if self._old else None

    def before_task(self, task: Task) -> None:
        self._old_active = self.scenario.active_classes(self.seq, task.id)
        super().before_task(task)
        if task.id > 0:
            self._old = [frozen_copy(self.model)]

    def distillation_loss(self, batch: dict, task: Task, features: torch.Tensor) -> torch.Tensor:
        old = self.old_model
        with torch.no_grad():
            old_features = old.features(batch)
        heads_new, heads_old = self.model.heads, old.heads
        if heads_new.per_task:
            losses = [distillation(heads_new(features, u), heads_old(old_features, u), self.opts.temperature)
                      for u in range(task.id)]
            return torch.stack(losses).mean()
        k = self._old_active if self.scenario.global_labels else heads_new.layout[0]
        new_logits = heads_new.heads[0](features)[:, :k]
        with torch.no_grad():
            old_logits = heads_old.heads[0](old_features)[:, :k]
        return distillation(new_logits, old_logits, self.opts.temperature)

    def training_step(self, batch: dict, task: Task) -> torch.Tensor:
        features = self.model.features(batch)
        loss = self.model.loss(batch, features)
        if self.old_model is not None:
            loss = loss + self.opts.lwf_lambda * self.distillation_loss(batch, task, features)
        return loss
