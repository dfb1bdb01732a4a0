"""Learning without Forgetting (Li & Hoiem 2016): distil the previous model's outputs on new data.

For task-incremental heads the old tasks' heads are distilled; for a shared or growing head
the outputs that existed before the task.

Default (`--lwf_distill ce_sum`), the paper's and PyContinual's: the cross-entropy between the old
model's and the new model's softmax outputs at temperature T = 2 (the recorded responses as soft
targets), summed over the old tasks' heads, weighted by lambda = 1, with no T^2 factor.
`--lwf_distill kl_mean_t2` is the form mmcl used before: KL at T scaled by T^2 (Hinton's knowledge
distillation), averaged over the old heads; it weighs the distillation T^2 = 4 times more at the
default T, and with k old heads k times less against the sum.

Warm-up (`--lwf_warmup_epochs N`, the paper's, off by default as in mmcl before): the first N of a task's
epochs train the new task's head alone, the shared weights (and old heads) frozen; the remaining epochs
train everything with the distillation. On a shared head (DIL, CIL) the whole head trains in the
warm-up: the new classes' rows cannot be separated from the old ones' there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmcl.approaches import APPROACHES
from mmcl.approaches.base import Approach, frozen_copy
from mmcl.data.sequence import Task
from mmcl.options import Options, option, positive


def distillation(new_logits: torch.Tensor, old_logits: torch.Tensor, temperature: float,
                 form: str = "ce_sum") -> torch.Tensor:
    """One head's distillation, averaged over the batch: soft-target cross-entropy at `temperature`
    (`ce_sum`), or KL x T^2 (`kl_mean_t2`). The two have the same gradient up to the T^2 factor: they
    differ by the old outputs' entropy, a constant."""
    t = temperature
    log_p = F.log_softmax(new_logits.float() / t, dim=-1)
    q = F.softmax(old_logits.float() / t, dim=-1)
    if form == "kl_mean_t2":
        return F.kl_div(log_p, q, reduction="batchmean") * t * t
    return -(q * log_p).sum(-1).mean()


DISTILL_FORMS = ("ce_sum", "kl_mean_t2")


@dataclass
class LwFOptions(Options):
    title = "LwF options"
    temperature: float = option(2.0, "distillation temperature (Li & Hoiem: 2)")
    lwf_lambda: float = option(1.0, "weight of the distillation loss (Li & Hoiem: 1)")
    lwf_distill: str = option("ce_sum", "ce_sum: the paper's cross-entropy at T, summed over old heads | "
                                        "kl_mean_t2: KL x T^2 averaged over old heads (mmcl's earlier form)")
    lwf_warmup_epochs: int = option(0, "the paper's warm-up: the first N epochs of each task train only the new "
                                       "head (0: none)")

    def validate(self) -> None:
        positive(self, "temperature")
        if self.lwf_distill not in DISTILL_FORMS:
            raise ValueError(f"--lwf_distill must be one of {', '.join(DISTILL_FORMS)}, got '{self.lwf_distill}'")
        if self.lwf_warmup_epochs < 0:
            raise ValueError(f"--lwf_warmup_epochs must be >= 0, got {self.lwf_warmup_epochs}")
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
        heads_new, heads_old, o = self.model.heads, old.heads, self.opts
        if heads_new.per_task:
            losses = torch.stack([distillation(heads_new(features, u), heads_old(old_features, u), o.temperature,
                                               o.lwf_distill) for u in range(task.id)])
            return losses.mean() if o.lwf_distill == "kl_mean_t2" else losses.sum()
        k = self._old_active if self.scenario.global_labels else heads_new.layout[0]
        new_logits = heads_new.heads[0](features)[:, :k]
        with torch.no_grad():
            old_logits = heads_old.heads[0](old_features)[:, :k]
        return distillation(new_logits, old_logits, o.temperature, o.lwf_distill)

    def warming_up(self) -> bool:
        return self.progress.epoch < self.opts.lwf_warmup_epochs

    def training_step(self, batch: dict, task: Task) -> torch.Tensor:
        if self.warming_up():
            # the new head alone: no gradient reaches the shared weights, and the old heads are not in the loss
            with torch.no_grad():
                features = self.model.features(batch)
            return self.model.loss(batch, features)
        features = self.model.features(batch)
        loss = self.model.loss(batch, features)
        if self.old_model is not None:
            loss = loss + self.opts.lwf_lambda * self.distillation_loss(batch, task, features)
        return loss
