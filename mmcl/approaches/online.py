"""Online (task-free) baselines and what they share with LEViT: a stream memory and a learner that
steps its own optimiser.

`--scenario online` hands the learner one stream batch at a time through `observe(batch)`: no task
object, no task id, no boundary (`mmcl/stream.py` guards the batch). So these learners keep one
optimiser for the whole stream and hold their memory as tensors (the examples themselves, not
(task, row) references: a reference names the task). The memory lives in buffers, so it is saved in
the safetensors checkpoints and restored on --resume; the optimiser's moments are not saved (a
resumed stream restarts them at the hidden boundary it resumes from).

  online_finetune  one step (x --online_iters) on each incoming batch, nothing against forgetting
  online_replay    experience replay with a reservoir memory of --memory_size examples: each step
                   trains on the incoming batch plus --replay_batch_size memory examples; the
                   incoming batch enters the reservoir after the step (Chaudhry et al. 2019)
  mir              maximally interfered retrieval (Aljundi et al. 2019): --mir_candidates memory
                   examples are scored by how much their loss rises after a virtual SGD step
                   (lr --mir_virtual_lr) on the incoming batch; the --replay_batch_size highest replay
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.approaches import APPROACHES
from mmcl.approaches.base import Approach
from mmcl.memory import MemoryOptions
from mmcl.options import Options, option, positive


class StreamMemory(nn.Module):
    """A fixed-size store of (image, label) examples: FIFO (a ring) or reservoir.

    Buffers: `x` (size, C, H, W), `y`, `arrival` (stream position of each slot's example),
    `count` (filled slots), `seen` (examples offered) and `draws` (calls of `sample`). Random choices
    come from a generator seeded by (seed, seen, draws): `seen` does not change between the
    --online_iters steps on one batch, so without `draws` every step would replay the same rows; as
    buffers both are in the checkpoint, so a resumed stream draws what the uninterrupted one would."""

    policies = ("fifo", "reservoir")

    def __init__(self, size: int, shape: tuple[int, ...], policy: str, seed: int = 0) -> None:
        super().__init__()
        if size < 0:
            raise ValueError(f"--memory_size must be >= 0, got {size}")
        if policy not in self.policies:
            raise ValueError(f"memory policy must be one of {self.policies}, got '{policy}'")
        self.size, self.policy, self.seed = size, policy, seed
        self.register_buffer("x", torch.zeros(size, *shape))
        self.register_buffer("y", torch.zeros(size, dtype=torch.long))
        self.register_buffer("arrival", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return int(self.count)

    @property
    def full(self) -> bool:
        return self.size > 0 and len(self) == self.size

    def _generator(self, salt: int = 0) -> torch.Generator:
        # one seed per (seed, seen, draws, salt): salt < 8 and draws, seen < 2**20 * 1e6 never collide in practice
        key = ((self.seed * 1_000_003 + int(self.seen)) * 1_000_033 + int(self.draws)) * 8 + salt
        return torch.Generator().manual_seed(key % (2 ** 63))

    @torch.no_grad()
    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.size == 0:
            self.seen += len(y)
            return
        gen = self._generator(1) if self.policy == "reservoir" else None
        for i in range(len(y)):
            n = int(self.seen)
            if self.policy == "fifo":
                slot = n % self.size  # the oldest example's slot once the ring is full
            elif n < self.size:
                slot = n
            else:
                j = int(torch.randint(0, n + 1, (1,), generator=gen))
                slot = j if j < self.size else None
            if slot is not None:
                self.x[slot] = x[i].to(self.x.dtype)
                self.y[slot] = y[i]
                self.arrival[slot] = n
            self.seen += 1
            self.count.fill_(min(int(self.count) + 1, self.size))

    def indices_in_order(self) -> torch.Tensor:
        """Filled slots, oldest example first."""
        filled = torch.arange(len(self), device=self.arrival.device)
        return filled[self.arrival[: len(self)].argsort()]

    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.indices_in_order()
        return self.x[idx], self.y[idx]

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if len(self) == 0 or n <= 0:
            return None
        gen = self._generator(2)
        self.draws += 1  # the next call, even on the same batch, draws other rows
        idx = torch.randperm(len(self), generator=gen)[:n].to(self.x.device)
        return self.x[idx], self.y[idx]


def image_shape(backbone) -> tuple[int, int, int]:
    shape = getattr(backbone, "image_shape", None)
    if not shape:
        raise ValueError("the online learners take image task sequences (the backbone has no image shape)")
    return (shape[2], shape[0], shape[1]) if len(shape) == 3 else (1, shape[0], shape[1])


@dataclass
class OnlineOptions(Options):
    title = "online learner options"
    online_iters: int = option(1, "gradient steps per incoming batch, the same for every online learner")

    def validate(self) -> None:
        positive(self, "online_iters")


@dataclass
class OnlineReplayOptions(OnlineOptions, MemoryOptions):
    title = "online replay options"
    replay_batch_size: int = option(10, "memory examples per step (online_replay, mir, levit)")

    def validate(self) -> None:
        OnlineOptions.validate(self)
        MemoryOptions.validate(self)
        positive(self, "replay_batch_size")


@dataclass
class MIROptions(OnlineReplayOptions):
    title = "MIR options"
    mir_candidates: int = option(50, "memory examples scored per step; the --replay_batch_size most interfered "
                                      "are replayed")
    mir_virtual_lr: float = option(0.1, "SGD step of the virtual update (the paper's lr)")

    def validate(self) -> None:
        super().validate()
        positive(self, "mir_candidates", "mir_virtual_lr")


class OnlineApproach(Approach):
    """A learner of the task-free stream: `observe` takes --online_iters optimiser steps per batch."""

    scenarios = ("online",)
    modalities = ("image",)
    why_not = {"text": "the online learners' memory and stream hold image tensors (no tokenised text yet)"}
    Options = OnlineOptions

    def __init__(self, backbone, seq, scenario, cfg) -> None:
        super().__init__(backbone, seq, scenario, cfg)
        self.input_shape = image_shape(backbone)
        self._step = None

    def stepper(self):
        """One optimiser for the whole stream (no boundary says when to renew it), with its step
        (`Approach.optimizer_step`); built on first use and again after `reset_optimizer` (LEViT adds
        parameters)."""
        if self._step is None:
            from mmcl.optim import make_optimizer

            self._step = self.optimizer_step(self.prepare_optimizer(make_optimizer(self.cfg, self.parameter_groups())))
        return self._step

    def reset_optimizer(self) -> None:
        self._step = None

    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model({"pixel_values": pixel_values})

    def ce(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(x).float(), y)

    def step_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.ce(x, y)

    def after_observe(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """After the steps on a batch: memory updates."""

    def observe(self, batch: dict) -> float:
        x, y = batch["pixel_values"], batch["labels"]
        for k in range(self.opts.online_iters):
            with self.autocast():
                loss = self.step_loss(x, y)
            self.stepper()(loss, {"iteration": f"{k + 1} of {self.opts.online_iters}"})
        self.after_observe(x, y)
        return float(loss.detach())

    @torch.no_grad()
    def predict(self, batch: dict, task_id: int | None) -> torch.Tensor:
        return self.logits(batch["pixel_values"])


@APPROACHES.register("online_finetune", aliases=("online_ncl",))
class OnlineFinetune(OnlineApproach):
    name = "online_finetune"


@APPROACHES.register("online_replay", aliases=("online_er",))
class OnlineReplay(OnlineApproach):
    name = "online_replay"
    uses_memory = True
    Options = OnlineReplayOptions

    def __init__(self, backbone, seq, scenario, cfg) -> None:
        super().__init__(backbone, seq, scenario, cfg)
        self.memory = StreamMemory(self.opts.memory_size, self.input_shape, "reservoir", seed=cfg.seed)

    def replay(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.memory.sample(self.opts.replay_batch_size)

    def step_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mem = self.replay(x, y)
        if mem is not None:
            x, y = torch.cat([x, mem[0]]), torch.cat([y, mem[1]])
        return self.ce(x, y)

    def after_observe(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.memory.add(x, y)

    def stream_stats(self) -> dict[str, Any]:
        return {"memory": len(self.memory), "seen": int(self.memory.seen)}


@APPROACHES.register("mir", aliases=("online_mir",))
class MIR(OnlineReplay):
    name = "mir"
    Options = MIROptions

    def replay(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        cand = self.memory.sample(self.opts.mir_candidates)
        if cand is None:
            return None
        cx, cy = cand
        k = self.opts.replay_batch_size
        if len(cy) <= k:
            return cand
        from torch.func import functional_call

        named = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        grads = torch.autograd.grad(self.ce(x, y), list(named.values()), allow_unused=True)
        with torch.no_grad():
            virtual = {n: p - self.opts.mir_virtual_lr * g if g is not None else p
                       for (n, p), g in zip(named.items(), grads)}
            before = F.cross_entropy(self.logits(cx).float(), cy, reduction="none")
            after = F.cross_entropy(functional_call(self.model, virtual, ({"pixel_values": cx},)).float(), cy,
                                    reduction="none")
            top = (after - before).topk(k).indices  # the examples the plain step would hurt most
        return cx[top], cy[top]
