"""From a task sequence to what the loop consumes: reader settings, model-ready splits, batches.

The engine adds `target` (the scenario's label: local for TIL/DIL, global for CIL) and `task_id` columns
to the backbone's preprocessed splits; `Batcher` turns a split into tensors once (`TensorSplit`: a batch is an
index slice) or collates rows; `make_loader` shards the batches over the processes through Accelerate.
"""
from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmcl.backbones.base import Backbone, BackboneSpec
from mmcl.data import ReaderContext
from mmcl.data.cache import content_fingerprint, keep_split, prepared_file
from mmcl.data.mixed import ModalityGroups
from mmcl.data.sequence import Task, TaskSequence, check_labels, int_column


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
    """Model-ready splits with scenario targets and task ids, replacing the raw ones. A backbone whose
    preprocessing is worth keeping (`preprocess_key`: tokenisation) has each prepared split kept under
    MMCL_CACHE, named by the raw rows' content, that key and the targets', and a later run loads it."""
    check_labels(task)
    for split in ("train", "valid", "test"):
        raw = getattr(task, split)
        key = backbone.preprocess_key(task.modality)
        path = None
        if key is not None:
            from datasets.fingerprint import Hasher

            path = prepared_file(Hasher.hash((content_fingerprint(raw), key, "mmcl-prepare-1", scenario.name,
                                              task.id, task.class_offset, split == "train")), "split")
        if path is not None and Path(path).is_file():
            setattr(task, split, datasets.Dataset.from_file(path))
            continue
        ds = backbone.preprocess_task(raw, task.modality)
        labels = int_column(ds, "label")  # numpy, not Python lists: cheap to read and to fingerprint
        ds = ds.add_column("target", np.array([scenario.target(task, int(y)) for y in labels], dtype=np.int64))
        ds = ds.add_column("task_id", np.full(len(labels), task.id, dtype=np.int64))
        if split != "train" and "input_ids" in ds.column_names and len(ds):
            # Evaluation splits only: batches of similar length pad less; accuracy and F1 do not depend
            # on the order of the examples.
            import pyarrow.compute as pc

            lengths = pc.list_value_length(ds.with_format("arrow", columns=["input_ids"])[:]["input_ids"])
            ds = ds.select(np.argsort(np.asarray(lengths), kind="stable"))
        setattr(task, split, keep_split(ds, path) if path is not None else ds)


LABEL_COLUMNS = {"labels": "target", "local_labels": "label", "task_ids": "task_id"}  # batch key: split column


class TensorSplit(Dataset):
    """A prepared split as tensors, built once: a batch is an index slice, not a collate of Python rows.

    The backbone's `to_columns` gives the inputs (uint8 images, token ids padded once), `inputs_from_columns`
    turns a slice into model inputs; the scenario's labels and task ids are tensors beside them. A DataLoader
    calls `__getitems__` with a batch's indices (torch's batched fetch), so the sampler and Accelerate's
    sharding are unchanged and the batches equal the row-collated ones."""

    def __init__(self, backbone, dataset, uid: int = 0) -> None:
        columns = backbone.to_columns(dataset)
        if columns is None:
            raise TypeError(f"{type(backbone).__name__} has no tensor path (to_columns)")
        self.backbone = backbone
        self.n = len(dataset)
        self.inputs = {k: v for k, v in columns.items() if torch.is_tensor(v)}
        self.constants = {k: v for k, v in columns.items() if not torch.is_tensor(v)}
        labels = dataset.with_format("numpy", columns=list(LABEL_COLUMNS.values()))[:] if self.n else {}
        self.tags = {key: torch.as_tensor(np.asarray(labels.get(col, []), dtype=np.int64))
                     for key, col in LABEL_COLUMNS.items()}
        # an example's identity for caches of frozen features (mmcl/feature_cache.py): the split, the row
        self.tags["example_ids"] = (uid << 32) + torch.arange(self.n, dtype=torch.long)

    def __len__(self) -> int:
        return self.n

    def __getitems__(self, indices) -> dict[str, Any]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        batch = self.backbone.inputs_from_columns({**{k: v[idx] for k, v in self.inputs.items()}, **self.constants})
        batch.update({k: v[idx] for k, v in self.tags.items()})
        return batch

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i])


class Batcher:
    """Builds batches for the engine and the approaches: from a split's tensors (`TensorSplit`, made once per
    split and kept while the split lives) where the backbone has a tensor path, else by collating rows."""

    def __init__(self, backbone) -> None:
        self.backbone = backbone
        self.tensor_path = type(backbone).to_columns is not Backbone.to_columns
        self._splits: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._uids: dict[str, int] = {}  # a split's datasets fingerprint -> its number in `example_ids`

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Rows (dataset rows, e.g. a memory's) -> a batch."""
        batch = self.backbone.collate_inputs(rows)
        for key, col in LABEL_COLUMNS.items():
            batch[key] = torch.tensor([int(r[col]) for r in rows], dtype=torch.long)
        return batch

    def split(self, dataset):
        """`dataset` as what a DataLoader indexes: its TensorSplit where there is a tensor path."""
        if isinstance(dataset, ModalityGroups):
            return dataset.map_parts(self.split)
        if not self.tensor_path or not isinstance(dataset, datasets.Dataset):
            return dataset
        split = self._splits.get(dataset)
        if split is None:
            uid = self._uids.setdefault(dataset._fingerprint, len(self._uids))
            split = self._splits[dataset] = TensorSplit(self.backbone, dataset, uid)
        return split

    def rows(self, dataset, indices) -> dict[str, Any]:
        """The batch of `dataset`'s rows `indices` (in that order)."""
        split = self.split(dataset)
        if isinstance(split, TensorSplit):
            return split.__getitems__(list(indices))
        return self([dataset[int(i)] for i in indices])

    def for_loader(self, dataset) -> tuple[Any, Any]:
        """(what a DataLoader indexes, its collate function) for `dataset`."""
        data = self.split(dataset)
        parts = data.parts if isinstance(data, ModalityGroups) else [data]
        return data, (_as_is if all(isinstance(p, TensorSplit) for p in parts) else self)


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:  # a TensorSplit's batch is ready
    return batch


def make_loader(accelerator, batcher: Batcher, dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A seeded loader, sharded over the processes by Accelerate."""
    data, collate = batcher.for_loader(dataset)
    if isinstance(data, ModalityGroups):  # joint training on a mixed sequence: one modality per batch
        dl = DataLoader(data, batch_sampler=data.batch_sampler(batch_size, shuffle, seed), collate_fn=collate)
        return accelerator.prepare_data_loader(dl)
    gen = torch.Generator().manual_seed(seed)
    dl = DataLoader(data, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=gen)
    return accelerator.prepare_data_loader(dl)
