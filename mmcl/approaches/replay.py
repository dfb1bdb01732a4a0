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
        loss = self.model.loss(batch)
        replay = self.memory_batches(batch["labels"].shape[0])
        if replay:
            loss = (loss + self.loss_over(replay)) / 2
        return loss

    def after_task(self, task: Task, loader) -> None:
        self.memory.add_task(task.id, list(task.train["target"]))

    def extra_state(self) -> dict:
        return {"memory": self.memory.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.memory.load_state_dict(state["memory"])
