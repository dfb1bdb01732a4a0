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
    A backbone that also defines `to_columns` / `inputs_from_columns` has its splits turned into tensors
    once (mmcl/data/prepare.py, `TensorSplit`), and a batch is an index slice of them, not a per-row collate.
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

    # Tensor-native batches (optional: without them batches are collated row by row). The two must give
    # what `collate_inputs` gives for the same rows, so both paths train the same model.
    def to_columns(self, dataset) -> dict[str, Any] | None:
        """A preprocessed split's inputs as whole tensors (first dimension: the rows), once per split; entries
        that are not tensors are constants of the split (e.g. its modality). None: no tensor path."""
        return None

    def inputs_from_columns(self, columns: dict[str, Any]) -> dict[str, Any]:
        """A batch's model inputs from its rows' slices of `to_columns` (scaling, trimming padding)."""
        raise TypeError(f"{type(self).__name__} defines to_columns() and must define inputs_from_columns()")

    def join_inputs(self, batches: list[dict[str, Any]]) -> dict[str, Any]:
        """Several batches of this backbone's inputs (same modality) as one, rows in order (replay's one
        forward over current and memory examples). Tensors are concatenated; constants must agree."""
        out: dict[str, Any] = {}
        for key in batches[0]:
            values = [b[key] for b in batches]
            if torch.is_tensor(values[0]):
                out[key] = torch.cat(values)
            elif any(v != values[0] for v in values):
                raise ValueError(f"{type(self).__name__}: cannot join batches whose '{key}' differ: {values}")
            else:
                out[key] = values[0]
        return out

    def preprocess_key(self, modality: str) -> tuple | None:
        """What `preprocess` depends on besides the rows (tokenizer, lengths), so a prepared split can be kept on
        disk and loaded by a later run (mmcl/data/cache.py); None: nothing worth keeping, prepare every run."""
        return None

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
