"""Classification heads for the three scenarios, and the backbone+head model.

TIL: one head per task. DIL: one shared head. CIL: one head over all classes of the
sequence whose *active* part grows with the classes seen; inactive outputs are masked
to -inf, so their weights get no gradient and the head behaves exactly like one that
grows, while parameter shapes stay fixed (simple checkpoints, resume and DDP).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.backbones.base import Backbone
from mmcl.feature_cache import FeatureCache


class Heads(nn.Module):
    def __init__(self, feature_dim: int, layout: list[int], per_task: bool) -> None:
        super().__init__()
        self.per_task = per_task
        self.layout = list(layout)
        self.heads = nn.ModuleList(nn.Linear(feature_dim, n) for n in layout)
        self.active = sum(layout)  # outputs that may be predicted (shared head only)

    def forward(self, features: torch.Tensor, task_id: int | None = None) -> torch.Tensor:
        if self.per_task:
            if task_id is None:
                raise ValueError("task-incremental heads need the task id")
            return self.heads[task_id](features)
        logits = self.heads[0](features)
        if self.active < logits.shape[-1]:
            masked = torch.full_like(logits[:, self.active :], float("-inf"))
            logits = torch.cat([logits[:, : self.active], masked], dim=-1)
        return logits


class ContinualModel(nn.Module):
    """Backbone + heads. Approaches that change the architecture wrap or replace this."""

    def __init__(self, backbone: Backbone, heads: Heads) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = heads
        self.feature_cache = FeatureCache()  # used only while the backbone is frozen and deterministic

    def features(self, batch: dict) -> torch.Tensor:
        return self.feature_cache(self.backbone, batch, lambda: self.backbone(batch))

    def forward(self, batch: dict, task_id: int | None = None) -> torch.Tensor:
        return self.heads(self.features(batch), task_id)

    def logits_by_task(self, features: torch.Tensor, task_ids: torch.Tensor):
        """Yield (task_id, example mask, logits) per task present in a batch.

        Replay and joint training mix tasks in one batch; per-task heads must see
        only their own examples.
        """
        if not self.heads.per_task:
            yield None, torch.ones_like(task_ids, dtype=torch.bool), self.heads(features)
            return
        for t in task_ids.unique().tolist():
            mask = task_ids == t
            yield t, mask, self.heads(features[mask], t)

    def loss(self, batch: dict, features: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy over a batch that may mix tasks."""
        features = self.features(batch) if features is None else features
        labels = batch["labels"]
        total = features.new_zeros(())
        for _, mask, logits in self.logits_by_task(features, batch["task_ids"]):
            total = total + F.cross_entropy(logits.float(), labels[mask], reduction="sum")
        return total / labels.numel()

    def example_losses(self, batch: dict) -> torch.Tensor:
        """Each example's cross-entropy, in batch order (a loss that weighs parts of one batch apart)."""
        features = self.features(batch)
        labels = batch["labels"]
        out = features.new_zeros(labels.shape, dtype=torch.float32)
        for _, mask, logits in self.logits_by_task(features, batch["task_ids"]):
            out = out.masked_scatter(mask, F.cross_entropy(logits.float(), labels[mask], reduction="none"))
        return out
