"""From a task sequence to what the loop consumes: reader settings, model-ready splits, batches.

The engine adds `target` (the scenario's label: local for TIL/DIL, global for CIL) and `task_id` columns
to the backbone's preprocessed splits; `Collator` turns rows into a batch; `make_loader` shards it over
the processes through Accelerate.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from mmcl.backbones.base import BackboneSpec
from mmcl.data import ReaderContext
from mmcl.data.mixed import ModalityGroups
from mmcl.data.sequence import Task, TaskSequence, check_labels


def reader_context(cfg) -> ReaderContext:
    """What the task-sequence readers take from a run's settings."""
    return ReaderContext(
        data_dir=Path(cfg.data_dir) if cfg.data_dir else None, idrandom=cfg.idrandom, ntasks=cfg.ntasks,
        seed=cfg.data_seed if cfg.data_seed is not None else cfg.seed, train_data_size=cfg.train_data_size,
        max_train_per_task=cfg.max_train_per_task,
    )


def backbone_spec(seq: TaskSequence) -> BackboneSpec:
    shapes: dict[str, tuple[int, ...]] = {}
    for task in seq:
        if task.modality == "image" and len(task.train):
            shapes[task.name] = tuple(np.asarray(task.train[0]["image"]).shape)
    if len(set(shapes.values())) > 1:
        # one vision backbone has one patch grid and channel count
        raise ValueError(f"task sequence '{seq.name}': image tasks have different image shapes {shapes}; "
                         "one vision backbone (or tower) takes one shape")
    image_shape = next(iter(shapes.values()), None)
    return BackboneSpec(modalities=tuple(seq.modalities), image_shape=image_shape)


def check_modalities(cfg, seq: TaskSequence, handled: tuple[str, ...], backbone=None) -> None:
    """Every task's modality is one the approach handles (and, given one, the backbone accepts)."""
    bad = [f"{t.name} ({t.modality})" for t in seq if t.modality not in handled]
    if bad:
        raise ValueError(f"--baseline {cfg.baseline} handles {', '.join(handled) or 'no'} tasks on --backbone "
                         f"{cfg.backbone}, not tasks {bad}")
    if backbone is None:
        return
    bad = [f"{t.name} ({t.modality})" for t in seq if not backbone.accepts(t.modality)]
    if bad:
        hint = ("; a sequence mixing text and images needs --backbone dual" if len(seq.modalities) > 1
                else "; choose a backbone for that modality")
        raise ValueError(f"--backbone {cfg.backbone} cannot take tasks {bad}{hint}")


def prepare_task(task: Task, backbone, scenario) -> None:
    """Model-ready splits with scenario targets and task ids, replacing the raw ones."""
    check_labels(task)
    for split in ("train", "valid", "test"):
        ds = backbone.preprocess_task(getattr(task, split), task.modality)
        labels = ds["label"]
        ds = ds.add_column("target", [scenario.target(task, int(y)) for y in labels])
        ds = ds.add_column("task_id", [task.id] * len(labels))
        if split != "train" and "input_ids" in ds.column_names and len(ds):
            # Evaluation splits only: batches of similar length pad less; accuracy and F1 do not depend
            # on the order of the examples.
            lengths = np.array([len(ids) for ids in ds["input_ids"]])
            ds = ds.select(np.argsort(lengths, kind="stable"))
        setattr(task, split, ds)


class Collator:
    def __init__(self, backbone) -> None:
        self.backbone = backbone

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.backbone.collate_inputs(rows)
        batch["labels"] = torch.tensor([int(r["target"]) for r in rows], dtype=torch.long)
        batch["local_labels"] = torch.tensor([int(r["label"]) for r in rows], dtype=torch.long)
        batch["task_ids"] = torch.tensor([int(r["task_id"]) for r in rows], dtype=torch.long)
        return batch


def make_loader(accelerator, collate, dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A seeded loader, sharded over the processes by Accelerate."""
    if isinstance(dataset, ModalityGroups):  # joint training on a mixed sequence: one modality per batch
        dl = DataLoader(dataset, batch_sampler=dataset.batch_sampler(batch_size, shuffle, seed), collate_fn=collate)
        return accelerator.prepare_data_loader(dl)
    gen = torch.Generator().manual_seed(seed)
    dl = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=gen)
    return accelerator.prepare_data_loader(dl)
