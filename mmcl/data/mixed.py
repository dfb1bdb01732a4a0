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
n steps of the order; --max_train_per_task and --train_data_size reach every part.

`ModalityGroups` serves datasets of several modalities as one training set (joint training on a
mixed sequence) with a batch sampler whose batches each hold one modality, because a tower only
takes its own inputs and text and image rows cannot be collated together.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
from collections import Counter
from typing import Iterator

import torch
from torch.utils.data import Dataset, Sampler

from mmcl.data import READERS, ReaderContext, task_spec
from mmcl.data.sequence import TaskSequence


def _part_spec(name: str, part: dict) -> tuple[str, dict, dict]:
    """(reader, params, epoch_multipliers) of one part: `reader:` + params, or `task:` (a YAML) whose params are overridden."""
    if not isinstance(part, dict) or ("reader" in part) == ("task" in part):
        raise ValueError(f"mixed: part '{name}' needs exactly one of `reader:` (a reader name) or `task:` "
                         f"(a task-sequence name or YAML path), got {part!r}")
    unknown = set(part) - {"reader", "task", "params"}
    if unknown:
        raise ValueError(f"mixed: part '{name}' has unknown field(s) {sorted(unknown)} (allowed: reader, task, params)")
    if "task" in part:
        spec = task_spec(part["task"])
        if spec["reader"] == "mixed":
            raise ValueError(f"mixed: part '{name}' is itself a mixed sequence ('{part['task']}'); nest parts instead")
        return spec["reader"], {**spec["params"], **(part.get("params") or {})}, dict(spec.get("epoch_multipliers") or {})
    return part["reader"], dict(part.get("params") or {}), {}


@READERS.register("mixed")
def read_mixed(params: dict, ctx: ReaderContext) -> TaskSequence:
    parts = params.get("parts")
    if not isinstance(parts, dict) or not parts:
        raise ValueError("mixed: params.parts must map part names to {reader: ..., params: ...} or {task: ...}")
    order = params.get("order")
    if not isinstance(order, list) or not order:
        raise ValueError(f"mixed: params.order must list the part of each step, e.g. {list(parts)}")
    unknown = [p for p in order if p not in parts]
    if unknown:
        raise ValueError(f"mixed: params.order names unknown part(s) {sorted(set(unknown))}; parts are {list(parts)}")
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
        reader, part_params, mult = _part_spec(name, parts[name])
        seq = READERS.get(reader)(part_params, dataclasses.replace(ctx, ntasks=counts[name]))
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
