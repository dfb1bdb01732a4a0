"""Sequences that mix readers and modalities, and batches that never mix modalities.

The `mixed` reader builds one task sequence from parts, each an existing reader (or task-sequence
YAML) with its own params, in an order that names the part each step comes from:

    reader: mixed
    params:
      parts:
        text:  {task: vader4, params: {max_train_per_task: 300}}   # tasks/vader4.yaml, params overridden
        image: {reader: split_fmnist, params: {max_train_per_task: 500}}
      order: [text, image, text, image]   # each entry takes that part's next task

Each part is read with `ntasks` = how often the order names it, so readers keep their own
task order (vader4's domains, split_fmnist's class chunks). The run's --ntasks keeps the first
n steps of the order; --max_train_per_task and --train_data_size reach every part (the readers that
use them). docs/data.md lists where each reader finds its data.

`ModalityGroups` serves datasets of several modalities as one training set (joint training on a
mixed sequence) with a batch sampler whose batches each hold one modality, because a tower only
takes its own inputs and text and image rows cannot be collated together.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
from collections import Counter
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import Dataset, Sampler

from mmcl.data import READERS, DataFormatError, ReaderContext, reader_for, task_spec
from mmcl.data.sequence import TaskSequence


def _part_spec(name: str, part: dict, where: str) -> tuple[str, dict, dict, str, Path | None]:
    """(reader, params, epoch_multipliers, where, file) of one part: `reader:` + params, or `task:` (a YAML)
    whose params are overridden. `where` names the mixed sequence's file and the part; the part's own YAML file
    (None for an inline part) and the `where` returned are what the part's errors name."""
    if not isinstance(part, dict) or ("reader" in part) == ("task" in part):
        raise DataFormatError(f"{where}: needs exactly one of `reader:` (a reader name) or `task:` "
                              f"(a task-sequence name or YAML path), got {part!r}")
    unknown = set(part) - {"reader", "task", "params"}
    if unknown:
        raise DataFormatError(f"{where}: unknown field(s) {sorted(unknown)} (allowed: reader, task, params)")
    params = part.get("params")
    if params is not None and not isinstance(params, dict):
        raise DataFormatError(f"{where}: params must be a mapping, got {type(params).__name__} {params!r}")
    if "task" in part:
        spec = task_spec(part["task"])
        if spec["reader"] == "mixed":
            raise DataFormatError(f"{where} is itself a mixed sequence ('{spec['_path']}'); nest parts instead")
        return (spec["reader"], {**spec["params"], **(params or {})}, dict(spec["epoch_multipliers"]),
                f"task sequence file '{spec['_path']}' (part '{name}')", Path(spec["_path"]))
    return part["reader"], dict(params or {}), {}, where, None


@READERS.register("mixed")
def read_mixed(params: dict, ctx: ReaderContext) -> TaskSequence:
    source = f"task sequence file '{ctx.task_file}'" if ctx.task_file else "mixed"
    parts = params.get("parts")
    if not isinstance(parts, dict) or not parts:
        raise DataFormatError(f"{source}: params.parts must map part names to {{reader: ..., params: ...}} or "
                              f"{{task: ...}}")
    order = params.get("order")
    if not isinstance(order, list) or not order:
        raise DataFormatError(f"{source}: params.order must list the part of each step, e.g. {list(parts)}")
    unknown = [p for p in order if p not in parts]
    if unknown:
        raise DataFormatError(f"{source}: params.order names unknown part(s) {sorted(set(unknown))}; "
                              f"parts are {list(parts)}")
    if ctx.ntasks is not None:
        if not 1 <= ctx.ntasks <= len(order):
            raise ValueError(f"--ntasks {ctx.ntasks}: the mixed sequence has {len(order)} steps")
        order = list(order[: ctx.ntasks])
    counts = Counter(order)
    read: dict[str, list] = {}
    readers: dict[str, str] = {}
    multipliers: dict[str, float] = {}
    for name in parts:
        if name not in counts:
            continue  # a part the (shortened) order does not use is not read at all
        reader, part_params, mult, where, part_file = _part_spec(name, parts[name], f"{source}, part '{name}'")
        part_ctx = dataclasses.replace(ctx, ntasks=counts[name], task_file=part_file or ctx.task_file)
        seq = reader_for(reader, where)(part_params, part_ctx)
        if len(seq) < counts[name]:
            raise ValueError(f"mixed: the order takes {counts[name]} tasks from part '{name}' ({reader}), "
                             f"which has {len(seq)}")
        for task in seq:
            task.info.update(part=name, reader=reader)
        read[name] = list(seq.tasks)
        readers[name] = reader
        multipliers.update(mult)
    next_of = {name: 0 for name in read}
    tasks = []
    for name in order:
        tasks.append(read[name][next_of[name]])
        next_of[name] += 1
    names = [t.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"mixed: task names {dup} occur twice; parts must give distinct task names")
    for task in tasks:
        for prefix, factor in multipliers.items():  # the parts' own per-task epoch factors
            if task.name.startswith(prefix):
                task.info["epoch_multiplier"] = float(factor)
    return TaskSequence("mixed", tasks, info={"parts": readers, "order": list(order)})


class ModalityGroups(Dataset):
    """Several datasets (one per modality) as one indexable dataset, batched per modality."""

    def __init__(self, parts: dict[str, "Dataset"]) -> None:
        self.names = list(parts)
        self.parts = [parts[n] for n in self.names]
        self.starts = [0]
        for p in self.parts:
            self.starts.append(self.starts[-1] + len(p))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int):
        g = bisect.bisect_right(self.starts, i) - 1
        return self.parts[g][i - self.starts[g]]

    def __getitems__(self, indices: list[int]):
        """A batch's rows, all of one group (the batch sampler's): the part's own batch if it makes one
        (a `TensorSplit`), else its rows."""
        g = bisect.bisect_right(self.starts, indices[0]) - 1
        local = [i - self.starts[g] for i in indices]
        if not all(0 <= i < len(self.parts[g]) for i in local):
            raise ValueError("ModalityGroups: a batch must hold rows of one group (use its batch_sampler)")
        part = self.parts[g]
        return part.__getitems__(local) if hasattr(part, "__getitems__") else [part[i] for i in local]

    def map_parts(self, fn) -> "ModalityGroups":
        return ModalityGroups({name: fn(part) for name, part in zip(self.names, self.parts)})

    def group_ranges(self) -> list[range]:
        return [range(self.starts[g], self.starts[g + 1]) for g in range(len(self.parts))]

    def batch_sampler(self, batch_size: int, shuffle: bool, seed: int) -> "GroupedBatchSampler":
        return GroupedBatchSampler(self.group_ranges(), batch_size, shuffle, seed)


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches drawn within groups (shuffled inside each group), then the batches shuffled together.

    Every epoch reshuffles from seed + epoch, so a run is reproducible and epochs differ."""

    def __init__(self, groups: list[range], batch_size: int, shuffle: bool, seed: int = 0) -> None:
        self.groups = [g for g in groups if len(g)]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return sum(math.ceil(len(g) / self.batch_size) for g in self.groups)

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        batches = []
        for g in self.groups:
            idx = torch.randperm(len(g), generator=gen).tolist() if self.shuffle else range(len(g))
            rows = [g[i] for i in idx]
            batches += [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        return iter(batches)
