"""Optimisers, schedules and the one optimiser step every training loop in mmcl takes.

`OptimizerStep` is the only place an optimiser steps: the task loop, DyTox's balanced fine-tuning,
the online learners and LEViT all call it, so each gets loss scaling, gradient clipping, the
scheduler and the non-finite guard alike.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch

from mmcl.engine_errors import NonFiniteError

OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("constant", "linear", "cosine")


def make_optimizer(cfg, params: list) -> torch.optim.Optimizer:
    """`params`: parameters or parameter groups (`Approach.parameter_groups`); rates from `cfg`."""
    if cfg.optimizer == "adamw":
        # torch's fused kernel: the same update in one pass over all parameters (measured 6.5 % faster a step on
        # the CPU ViT of docs/benchmarks.md); the loop kernel where fused is unsupported (a non-float tensor,
        # a device without it)
        try:
            return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)
        except (RuntimeError, ValueError):
            return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got '{cfg.optimizer}'")


def lr_lambda(kind: str, total: int, warmup: int) -> Callable[[int], float]:
    """The learning-rate factor at a step: linear warm-up over `warmup` steps, then `kind` over the rest."""
    if kind not in SCHEDULERS:
        raise ValueError(f"--lr_scheduler must be one of {', '.join(SCHEDULERS)}, got '{kind}'")

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, total: int, warmup_proportion: float):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(kind, total, int(warmup_proportion * total)))


class OptimizerStep:
    """backward → gradient surgery → clipping → non-finite guard → step → scheduler → zero_grad → after-hook.

    With an accelerator the backward goes through it (DDP gradient sync, fp16 loss scaling), and
    the optimiser should be one it prepared, so a step its grad scaler skips (inf gradients under
    fp16) is skipped, counted in `skipped`, and not an error. Otherwise a non-finite loss or
    gradient norm raises `NonFiniteError` before the step, so the weights stay as they were; the
    decision is taken by every process alike (the flags are summed across processes), since one
    process stopping alone would leave the others waiting in the next all-reduce.
    """

    def __init__(self, optimizer, params: Iterable[torch.nn.Parameter] | None = None, *, accelerator=None,
                 scheduler=None, clipgrad: float | None = None, before_step: Callable[[], None] | None = None,
                 after_step: Callable[[], None] | None = None) -> None:
        self.optimizer = optimizer
        self.params = list(params) if params is not None else [p for g in optimizer.param_groups for p in g["params"]]
        self.accelerator = accelerator
        self.scheduler = scheduler
        self.clipgrad = clipgrad
        self.before_step = before_step
        self.after_step = after_step
        self.skipped = 0  # steps the grad scaler skipped (fp16 overflow): expected now and then

    @property
    def _scaled(self) -> bool:
        return getattr(self.accelerator, "scaler", None) is not None

    def grad_norm(self) -> torch.Tensor:
        """The gradients' total norm, clipped to --clipgrad first where it is above it."""
        if self.clipgrad and self._scaled:  # fp16: Accelerate unscales the gradients before it clips them
            return torch.as_tensor(self.accelerator.clip_grad_norm_(self.params, self.clipgrad))
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros(())
        norm = torch.nn.utils.get_total_norm(grads)
        # torch's clip_grad_norm_ multiplies every gradient by min(1, clip / norm), a pass over all of them even
        # when the factor is exactly 1 (no change): only scale when it is not (PyContinual's 10000 rarely bites)
        if self.clipgrad and bool(norm > self.clipgrad):
            torch.nn.utils.clip_grads_with_norm_(self.params, self.clipgrad, norm)
        return norm

    def __call__(self, loss: torch.Tensor, where: Callable[[], dict[str, Any]] | dict[str, Any]) -> bool:
        """One step on `loss`; returns False when the grad scaler skipped it. `where` (or a function
        giving it, called only on failure) says where training is, for the error message."""
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        else:
            loss.backward()
        if self.before_step is not None:
            self.before_step()
        norm = self.grad_norm()
        bad = torch.stack([~torch.isfinite(loss.detach().float()).reshape(()),
                           ~torch.isfinite(norm.detach().float().to(loss.device)).reshape(())]).int()
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        bad_loss, bad_grad = (int(v) > 0 for v in bad.tolist())
        if bad_loss or (bad_grad and not self._scaled):
            self.optimizer.zero_grad(set_to_none=True)
            what = "loss" if bad_loss else "gradient norm"
            value = float(loss.detach().float()) if bad_loss else float(norm)
            raise NonFiniteError(what, value, where() if callable(where) else dict(where))
        self.optimizer.step()
        skipped = bool(getattr(self.optimizer, "step_was_skipped", False))
        self.skipped += skipped
        if self.scheduler is not None:
            self.scheduler.step()  # Accelerate's scheduler wrapper itself holds back after a skipped step
        self.optimizer.zero_grad(set_to_none=True)
        if self.after_step is not None:
            self.after_step()
        return not skipped
