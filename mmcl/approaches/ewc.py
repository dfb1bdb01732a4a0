"""Elastic weight consolidation (Kirkpatrick et al. 2017) with a merged diagonal empirical Fisher.

Penalty: lamb/2 * sum_i F_i (theta_i - theta*_i)^2, theta* = weights after the last task.
Merge across tasks as PyContinual does, F = (F_new + t F_old) / (t + 1), or online EWC
(F = gamma F_old + F_new) with --ewc_gamma.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mmcl.approaches import APPROACHES
from mmcl.approaches.base import Approach, BufferDict, trainable_named_parameters
from mmcl.data.sequence import Task
from mmcl.options import Options, option


@dataclass
class EWCOptions(Options):
    title = "EWC options"
    lamb: float = option(5000.0, "penalty weight lambda (PyContinual --lamb)")
    ewc_gamma: float | None = option(None, "unset: PyContinual's running mean of Fishers (F_new + t F_old)/(t+1); "
                                           "else online EWC, F = gamma F_old + F_new")
    ewc_fisher_batch: int | None = option(None, "unset: the Fisher over the training batches; N: PyContinual's, "
                                                "batches of N in order, each weighted N (the last, partial one too)")

    def validate(self) -> None:
        if self.lamb < 0:
            raise ValueError(f"--lamb must be >= 0, got {self.lamb}")
        if self.ewc_fisher_batch is not None and self.ewc_fisher_batch < 1:
            raise ValueError(f"--ewc_fisher_batch must be >= 1, got {self.ewc_fisher_batch}")
        if self.ewc_gamma is not None and not 0 <= self.ewc_gamma <= 1:
            raise ValueError(f"--ewc_gamma must be in [0, 1], got {self.ewc_gamma}")


@APPROACHES.register("ewc")
class EWC(Approach):
    name = "ewc"
    Options = EWCOptions

    def __init__(self, backbone, seq, scenario, cfg) -> None:
        super().__init__(backbone, seq, scenario, cfg)
        params = trainable_named_parameters(self.model)
        self.fisher = BufferDict({n: torch.zeros_like(p) for n, p in params.items()})
        self.anchor = BufferDict({n: p.detach().clone() for n, p in params.items()})
        self.lamb = self.opts.lamb

    def penalty(self) -> torch.Tensor:
        total = None
        for name, p in trainable_named_parameters(self.model).items():
            term = (self.fisher[name] * (p.float() - self.anchor[name]) ** 2).sum()
            total = term if total is None else total + term
        return 0.5 * self.lamb * total

    def training_step(self, batch: dict, task: Task) -> torch.Tensor:
        loss = self.model.loss(batch)
        if task.id > 0:
            loss = loss + self.penalty()
        return loss

    def fisher_diagonal(self, loader, fixed_weight: tuple[float, float] | None = None) -> dict[str, torch.Tensor]:
        """Empirical Fisher as PyContinual computes it: the mean over batches of the squared batch-mean
        gradient of the log-likelihood, weighted by the batch size (fp32). `fixed_weight` = (w, total):
        every batch weighted w and the sum divided by total (PyContinual's fixed `sbatch`), no all-reduce.

        With k processes a batch is the global one (k shards): the shards' gradients are averaged before
        squaring, as DDP averages them in training, so k processes get the Fisher of one process with
        k times the batch; squaring each shard's gradient would give another Fisher."""
        params = trainable_named_parameters(self.model)
        fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        count = 0.0
        was_training = self.model.training
        self.model.train()
        processes = self.world[0] if fixed_weight is None else 1
        for batch in loader:
            self.model.zero_grad(set_to_none=True)
            n = batch["labels"].shape[0]
            self.model.loss(batch).backward()
            grads = [(p.grad.detach().float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32))
                     for p in params.values()]
            if processes > 1:
                # one all-reduce per batch: [n * g_shard..., n] summed over the shards -> the global batch mean
                flat = torch.cat([g.reshape(-1) * n for g in grads] + [torch.tensor([float(n)], device=self.device)])
                flat = self._accelerator.reduce(flat, reduction="sum")
                n = float(flat[-1])
                grads = [g.reshape(p.shape) for g, p in zip(torch.split(flat[:-1] / n, [p.numel() for p in params.values()]),
                                                           params.values())]
            if fixed_weight is not None:
                n = fixed_weight[0]
            for name, g in zip(params, grads):
                fisher[name] += g ** 2 * n
            count += n
        self.model.zero_grad(set_to_none=True)
        self.model.train(was_training)
        if fixed_weight is not None:
            count = fixed_weight[1]
        return {n: f / max(count, 1.0) for n, f in fisher.items()}

    def fisher_batches(self, task: Task, loader):
        """What the Fisher is computed over: the engine's loader of the task's training batches, or with
        --ewc_fisher_batch N the training rows in order in batches of N, each weighted N as PyContinual's
        `fisher_matrix_diag_bert` does (every process computes it on all rows: the same Fisher everywhere)."""
        n = self.opts.ewc_fisher_batch
        if n is None:
            return loader, None
        rows = task.train
        batches = (self.batch_of(rows, range(i, min(i + n, len(rows)))) for i in range(0, len(rows), n))
        return batches, (float(n), float(len(rows)))

    def after_task(self, task: Task, loader) -> None:
        new = self.fisher_diagonal(*self.fisher_batches(task, loader))
        t = task.id
        with torch.no_grad():
            for name, p in trainable_named_parameters(self.model).items():
                old = self.fisher[name]
                if self.opts.ewc_gamma is None:
                    self.fisher[name] = (new[name] + t * old) / (t + 1)
                else:
                    self.fisher[name] = self.opts.ewc_gamma * old + new[name]
                self.anchor[name] = p.detach()
