"""Experience replay: each step also trains on a batch drawn from a rehearsal memory.

The memory (reservoir or class-balanced, `--memory_size` examples in total) is filled
after each task from the whole task, so every process holds the same memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mmcl.approaches import APPROACHES
from mmcl.approaches.base import Approach
from mmcl.data.sequence import Task
from mmcl.memory import Memory, MemoryOptions
from mmcl.options import option


@dataclass
class ReplayOptions(MemoryOptions):
    title = "replay options"
    buffer: str = option("reservoir", "how the memory is filled: reservoir | class_balanced")

    def validate(self) -> None:
        super().validate()
        if self.buffer not in Memory.strategies:
            raise ValueError(f"--buffer must be one of {', '.join(Memory.strategies)}, got '{self.buffer}'")


@APPROACHES.register("replay", aliases=("er",))
class Replay(Approach):
    name = "replay"
    uses_memory = True
    Options = ReplayOptions

    def __init__(self, backbone, seq, scenario, cfg) -> None:
        super().__init__(backbone, seq, scenario, cfg)
        self.memory = Memory(self.opts.memory_size, self.opts.buffer, seed=cfg.seed)
        self._rng = np.random.default_rng(cfg.seed)

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self._rng = np.random.default_rng(self.cfg.seed + 7919 * (task.id + 1))

    def memory_batches(self, n: int) -> list[dict]:
        """n memory rows for this process, as one batch per modality (a mixed sequence's memory holds both).

        Every process draws the same global batch of n x processes rows and takes its own slice, so
        k processes replay what one process with k x the batch would."""
        world, rank = self.world
        refs = self.memory.sample(n * world, self._rng)[rank * n:(rank + 1) * n]
        return self.batches_from_refs(refs) if refs else []

    def training_step(self, batch: dict, task: Task) -> torch.Tensor:
        """(mean loss of the current examples + mean loss of the memory examples) / 2, from one forward pass
        over both where they share a modality (the maths of two passes; a model whose layers mix examples,
        batch norm, would differ: ours use layer norm). A mixed sequence's memory rows of the other
        modality take their own pass (a tower takes only its own inputs)."""
        n = batch["labels"].shape[0]
        replay = self.memory_batches(n)
        if not replay:
            return self.model.loss(batch)
        backbone = self.model.backbone
        same, other = [], []
        for b in replay:
            (same if backbone.batch_modality(b) == backbone.batch_modality(batch) else other).append(b)
        m = sum(b["labels"].numel() for b in replay)
        if not same:
            return (self.model.loss(batch) + self.loss_over(other)) / 2
        losses = self.model.example_losses(backbone.join_inputs([batch, *same]))
        memory = losses[n:].sum() + sum(self.model.loss(b) * b["labels"].numel() for b in other)
        return (losses[:n].mean() + memory / m) / 2

    def after_task(self, task: Task, loader) -> None:
        self.memory.add_task(task.id, list(task.train["target"]))

    def extra_state(self) -> dict:
        return {"memory": self.memory.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.memory.load_state_dict(state["memory"])
