"""`dual`: one backbone for sequences that mix text and image tasks.

A text tower (any text backbone: `--text_backbone bert_adapter`, `bert`, `bert_lora`, ...) and a
vision tower (`--vision_backbone vit` or `convit`) each embed their own modality; a linear
projection per tower maps both into one `--dual_dim` feature space, and `--dual_shared_layers`
residual blocks on top are shared by both modalities. So one approach and one head machinery
serve the whole sequence, and the shared blocks (and, for DIL/CIL, the shared head) are where
learning images can disturb text tasks and the reverse.

A batch holds one modality. `preprocess` adds a `modality` column and `collate_inputs` refuses
rows of two modalities, so a text batch can never reach the vision tower (replay and joint
training collate per modality: `Approach.batches_from_refs`, `ModalityGroups`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmcl.backbones import BACKBONES, build_backbone
from mmcl.backbones.base import Backbone, BackboneSpec
from mmcl.options import Options, option, positive

MODALITY_KEY = "modality"


class SharedBlock(nn.Module):
    """x + GELU(W LayerNorm(x)): a pre-norm residual block of the shared trunk."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.fc(self.norm(x)))


class DualBackbone(Backbone):
    modality = "text+image"

    def __init__(self, towers: dict[str, Backbone], dim: int, shared_layers: int) -> None:
        super().__init__()
        if not towers:
            raise ValueError("--backbone dual needs at least one tower (the sequence has neither text nor images)")
        self.towers = nn.ModuleDict(towers)
        self.proj = nn.ModuleDict({m: nn.Linear(t.feature_dim, dim) for m, t in towers.items()})
        self.shared = nn.Sequential(*(SharedBlock(dim) for _ in range(shared_layers)))
        self.feature_dim = dim

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.towers)

    def accepts(self, modality: str) -> bool:
        return modality in self.towers

    def tower(self, modality: str) -> Backbone:
        if modality not in self.towers:
            raise ValueError(f"--backbone dual has no {modality!r} tower (it was built for {list(self.towers)})")
        return self.towers[modality]

    def preprocess(self, dataset, modality: str | None = None):
        if modality is None:  # a split on its own (hub, notebooks): its columns tell the modality
            modality = "image" if "image" in dataset.column_names else "text"
        ds = self.tower(modality).preprocess(dataset)
        return ds.add_column(MODALITY_KEY, [modality] * len(ds))

    def preprocess_task(self, dataset, modality: str):
        return self.preprocess(dataset, modality)

    def preprocess_key(self, modality: str) -> tuple | None:
        key = self.tower(modality).preprocess_key(modality)
        return None if key is None else ("dual", modality, key)

    def collate_inputs(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        mods = sorted({r.get(MODALITY_KEY) for r in rows})
        if len(mods) != 1 or mods[0] is None:
            raise ValueError(
                f"--backbone dual: a batch must hold one modality, got rows of {mods} "
                "(collate text and image rows separately; each tower takes only its own)"
            )
        batch = self.tower(mods[0]).collate_inputs(rows)
        batch[MODALITY_KEY] = mods[0]
        return batch

    def to_columns(self, dataset) -> dict[str, Any] | None:
        mods = dataset.unique(MODALITY_KEY) if MODALITY_KEY in dataset.column_names else []
        if len(mods) > 1:
            raise ValueError(f"--backbone dual: a split must hold one modality, got rows of {sorted(mods)}")
        modality = mods[0] if mods else ("image" if "image" in dataset.column_names else "text")
        columns = self.tower(modality).to_columns(dataset)
        return None if columns is None else {**columns, MODALITY_KEY: modality}

    def inputs_from_columns(self, columns: dict[str, Any]) -> dict[str, Any]:
        modality = columns[MODALITY_KEY]
        inputs = self.tower(modality).inputs_from_columns({k: v for k, v in columns.items() if k != MODALITY_KEY})
        inputs[MODALITY_KEY] = modality
        return inputs

    def join_inputs(self, batches: list[dict[str, Any]]) -> dict[str, Any]:
        mods = sorted({b.get(MODALITY_KEY) for b in batches}, key=str)
        if len(mods) != 1 or mods[0] is None:
            raise ValueError(f"--backbone dual: batches of {mods} cannot be joined (each tower takes only its own)")
        joined = self.tower(mods[0]).join_inputs([{k: v for k, v in b.items() if k != MODALITY_KEY} for b in batches])
        joined[MODALITY_KEY] = mods[0]
        return joined

    def forward(self, inputs: dict[str, Any]) -> torch.Tensor:
        modality = self.batch_modality(inputs)
        return self.from_tower(modality, self.tower(modality)(inputs))

    def towers_by_modality(self) -> dict[str, Backbone]:
        return dict(self.towers)

    def batch_modality(self, batch: dict[str, Any]) -> str:
        modality = batch.get(MODALITY_KEY)
        if modality is None:
            raise ValueError("--backbone dual: the batch has no 'modality' entry (collate it with the dual backbone)")
        return modality

    def from_tower(self, modality: str, features: torch.Tensor) -> torch.Tensor:
        return self.shared(self.proj[modality](features))


@dataclass
class DualOptions(Options):
    title = "dual backbone options"
    text_backbone: str = option("bert_adapter", "the text tower: any text backbone (bert, bert_frozen, bert_adapter, "
                                                "bert_lora, a Hugging Face id)")
    vision_backbone: str = option("vit", "the vision tower: vit or convit")
    dual_dim: int = option(256, "the shared feature width both towers are projected to")
    dual_shared_layers: int = option(1, "residual MLP blocks on top, shared by both modalities (0: projections only)")

    def validate(self) -> None:
        positive(self, "dual_dim")
        if self.dual_shared_layers < 0:
            raise ValueError(f"--dual_shared_layers must be >= 0, got {self.dual_shared_layers}")
        for flag in ("text_backbone", "vision_backbone"):
            if getattr(self, flag) in DUAL_NAMES:
                raise ValueError(f"--{flag} {getattr(self, flag)}: a tower must be a single-modality backbone")

    def towers(self) -> list[str]:
        return [self.text_backbone, self.vision_backbone]


def _tower(cfg, spec: BackboneSpec, flag: str, modality: str) -> Backbone:
    name = getattr(DualOptions.from_values(cfg.options), flag)
    if name in DUAL_NAMES:
        raise ValueError(f"--{flag} {name}: a tower must be a single-modality backbone")
    sub = dataclasses.replace(cfg, backbone=name, options=dict(cfg.options))  # build_backbone may set bert_model
    tower = build_backbone(sub, spec)  # the whole spec: a tower of the wrong kind is caught just below
    if tower.modality != modality:
        raise ValueError(f"--{flag} {name} encodes {tower.modality!r}, but the {modality} tower needs a {modality} backbone")
    return tower


DUAL_NAMES = ("dual", "text_vision")


@BACKBONES.register("dual", aliases=("text_vision",), options=DualOptions, modalities=("text", "image"), towers=True)
def dual(cfg, spec: BackboneSpec) -> DualBackbone:
    """Towers only for the modalities the sequence has (no MiniLM loaded for an image-only sequence)."""
    o = DualOptions.from_values(cfg.options)
    towers: dict[str, Backbone] = {}
    if "text" in spec.modalities:
        towers["text"] = _tower(cfg, spec, "text_backbone", "text")
    if "image" in spec.modalities:
        towers["image"] = _tower(cfg, spec, "vision_backbone", "image")
    return DualBackbone(towers, o.dual_dim, o.dual_shared_layers)
