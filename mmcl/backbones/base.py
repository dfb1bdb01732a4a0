from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class BackboneSpec:
    """What the task sequence tells the backbone about its inputs."""

    modalities: tuple[str, ...]
    image_shape: tuple[int, ...] | None = None  # (H, W) or (H, W, C) of the first image task


class Backbone(nn.Module):
    """Embeds a batch of one modality into `(B, feature_dim)` features.

    `preprocess` turns a task split into model-ready columns once (cached by `datasets`);
    `collate_inputs` turns a list of those rows into tensors; `forward` gives features.
    """

    modality: str = ""
    feature_dim: int = 0
    input_keys: tuple[str, ...] = ()

    # The three methods every backbone defines (nn.Module cannot also be an ABC here).
    def preprocess(self, dataset):  # -> datasets.Dataset
        raise TypeError(f"{type(self).__name__} must define preprocess()")

    def collate_inputs(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        raise TypeError(f"{type(self).__name__} must define collate_inputs()")

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} must define forward()")

    def preprocess_task(self, dataset, modality: str):
        """`preprocess` for a split of a task of `modality` (a multimodal backbone picks its tower by it)."""
        return self.preprocess(dataset)

    def accepts(self, modality: str) -> bool:
        return modality == self.modality

    # A backbone with one encoder per modality (`dual`) exposes them, so a method that runs an encoder's
    # layers itself (prompts) can hold state per modality and still end in this backbone's feature space.
    def towers_by_modality(self) -> dict[str, "Backbone"]:
        """The single-modality encoders inside, by modality: this backbone itself unless it has towers."""
        return {self.modality: self}

    def batch_modality(self, batch: dict[str, Any]) -> str:
        return self.modality

    def from_tower(self, modality: str, features: torch.Tensor) -> torch.Tensor:
        """A tower's pooled features -> this backbone's features (the identity without towers)."""
        return features
