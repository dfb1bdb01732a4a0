"""The Approach interface: a method owns the model and everything method-specific.

The engine calls, per task t:
    before_task(task) -> [training_step(batch, task) per batch, between
    before_optimizer_step() / after_optimizer_step()] -> after_task(task, loader)
and after every task predict(batch, task_id) on each task's test set. In a task-free scenario
(`--scenario online`) none of the task hooks run: the engine calls observe(batch) once per stream
batch, with the task ids hidden, and the learner steps its own optimiser. Anything the
engine does not know (Fisher matrices, masks, capsules, prompts, memories) stays in
the approach's file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterable

import torch
from torch import nn

from mmcl.backbones.base import Backbone
from mmcl.data.sequence import Scenario, Task, TaskSequence
from mmcl.heads import ContinualModel, Heads
from mmcl.options import Options


@dataclass
class Progress:
    """Where training is inside the current task (HAT anneals s over it)."""

    epoch: int = 0
    num_epochs: int = 1
    batch: int = 0
    num_batches: int = 1
    global_step: int = 0

    def update(self, epoch: int, num_epochs: int, batch: int, num_batches: int, global_step: int) -> None:
        self.epoch, self.num_epochs, self.batch, self.num_batches, self.global_step = (
            epoch, num_epochs, batch, num_batches, global_step)


class Approach(nn.Module):
    name: ClassVar[str] = ""
    scenarios: ClassVar[tuple[str, ...]] = ("til", "dil", "cil")
    needs_task_id: ClassVar[bool] = False  # at test time
    uses_memory: ClassVar[bool] = False
    modalities: ClassVar[tuple[str, ...]] = ("text", "image")
    Options: ClassVar[type[Options] | None] = None  # the approach's own options (mmcl.options), if any
    # what it needs of a backbone, for the compatibility matrix (mmcl/compat.py): capabilities the backbone
    # declares (tokens, prefix, adapter_sites); on a backbone with towers, whether the "whole" backbone, "each"
    # tower, only the "text" tower or "none" must have them; and why a scenario or modality it refuses is
    # refused (a scenario or modality named here is a "no" by design, with this reason)
    requires: ClassVar[tuple[str, ...]] = ()
    tower_use: ClassVar[str] = "whole"
    why_not: ClassVar[dict[str, str]] = {}

    def __init__(self, backbone: Backbone, seq: TaskSequence, scenario: Scenario, cfg) -> None:
        super().__init__()
        self.check_scenario(scenario)
        self.cfg = cfg  # the run's settings (RunConfig); the approach's own options are `self.opts`
        self.opts = self.Options.from_values(cfg.options) if self.Options is not None else None
        self.seq = seq
        self.scenario = scenario
        self.model = self.build_model(backbone)
        self.frozen_backbone = bool(getattr(cfg, "freeze_backbone", False))
        if self.frozen_backbone:
            self.model.backbone.requires_grad_(False)
        self.current_task: Task | None = None
        self.progress = Progress()
        # set by the engine (`bind`): makes batches of dataset rows (mmcl.data.prepare.Batcher)
        self._batcher = None
        self._accelerator = None

    @classmethod
    def check_scenario(cls, scenario: Scenario) -> None:
        """Fail, naming the flags, if this approach cannot run `scenario`."""
        if scenario.name not in cls.scenarios:
            from mmcl.approaches import APPROACHES

            fit = [n for n in APPROACHES.names() if scenario.name in APPROACHES.get(n).scenarios]
            raise ValueError(
                f"--baseline {cls.name} supports scenarios {', '.join(cls.scenarios)}, not '{scenario.name}'"
                + (f" (approaches for '{scenario.name}': {', '.join(fit)})" if fit else "")
            )
        if cls.needs_task_id and not scenario.task_id_at_test:
            raise ValueError(f"--baseline {cls.name} needs the task id at test time; scenario '{scenario.name}' gives none")

    @classmethod
    def modalities_for(cls, cfg) -> tuple[str, ...]:
        """The task modalities this approach handles on `cfg.backbone` (checked at start, before any training)."""
        return cls.modalities

    # -- construction -------------------------------------------------------------------
    def build_model(self, backbone: Backbone) -> nn.Module:
        layout = self.scenario.head_layout(self.seq)
        heads = Heads(backbone.feature_dim, layout, per_task=self.scenario.per_task_heads)
        return ContinualModel(backbone, heads)

    def bind(self, accelerator, batcher) -> None:
        self._accelerator = accelerator
        self._batcher = batcher

    @property
    def world(self) -> tuple[int, int]:
        """(number of processes, this process's index); (1, 0) before the engine binds an accelerator."""
        acc = self._accelerator
        return (acc.num_processes, acc.process_index) if acc is not None else (1, 0)

    def optimizer_step(self, optimizer, params=None, **kwargs):
        """The one optimiser step (`mmcl.optim.OptimizerStep`) for a loop an approach runs itself (DyTox's
        fine-tuning, the online learners): the engine's accelerator, loss scaling, --clipgrad and the
        non-finite guard, as the task loop has them. `optimizer` should come from `prepare_optimizer`."""
        from mmcl.optim import OptimizerStep

        kwargs.setdefault("clipgrad", self.cfg.clipgrad)
        return OptimizerStep(optimizer, params, accelerator=self._accelerator, **kwargs)

    def autocast(self):
        """The run's mixed precision for one forward pass of a loop the approach runs itself. One region
        per step: autocast caches low-precision weights for its region, which would outlive a step."""
        import contextlib

        return self._accelerator.autocast() if self._accelerator is not None else contextlib.nullcontext()

    def prepare_optimizer(self, optimizer):
        """Wrap an approach's own optimiser as the engine's are (fp16 grad scaler); as is before `bind`."""
        return self._accelerator.prepare_optimizer(optimizer) if self._accelerator is not None else optimizer

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def batch_from_rows(self, rows: list[dict]) -> dict:
        """Collate dataset rows (e.g. from a memory) and move them to the model's device."""
        return self.to_device(self._batcher(rows))

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def batch_of(self, dataset, indices) -> dict:
        """The batch of `dataset`'s rows `indices`, on the model's device (an index slice of the split's
        tensors where the backbone has a tensor path: `mmcl.data.prepare.Batcher`)."""
        return self.to_device(self._batcher.rows(dataset, indices))

    def batches_from_refs(self, refs: list[tuple[int, int]]) -> list[dict]:
        """(task, row) references into the train splits -> one batch per modality, text first, rows grouped
        by task (a mean over the rows does not depend on their order).

        A memory of a mixed sequence holds text and image rows; they cannot share a batch (each
        tower of a multimodal backbone takes only its own inputs), so they are batched apart."""
        by_modality: dict[str, dict[int, list[int]]] = {}
        for t, r in refs:
            by_modality.setdefault(self.seq[t].modality, {}).setdefault(t, []).append(r)
        join = self.model.backbone.join_inputs
        return [join([self.batch_of(self.seq[t].train, rows) for t, rows in sorted(tasks.items())])
                for _, tasks in sorted(by_modality.items(), reverse=True)]

    def loss_over(self, batches: list[dict]) -> torch.Tensor:
        """Mean cross-entropy over the examples of several batches (e.g. one per modality)."""
        n = sum(b["labels"].numel() for b in batches)
        return sum(self.model.loss(b) * b["labels"].numel() for b in batches) / n

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "frozen_backbone", False):
            self.model.backbone.eval()  # --freeze_backbone: a fixed feature extractor, dropout off
        return self

    # -- hooks ---------------------------------------------------------------------------
    def train_dataset(self, task: Task):
        """What the engine iterates over while learning `task` (joint widens it)."""
        return task.train

    def trains_task(self, task: Task) -> bool:
        """Whether the engine trains `task` at all (joint's `last_task` schedule trains only the last)."""
        return True

    def selection_tasks(self, task: Task) -> list[Task]:
        """The tasks whose valid splits --select_best scores after each epoch of `task`."""
        return [task]

    def before_task(self, task: Task) -> None:
        self.current_task = task
        heads = getattr(self.model, "heads", None)
        if isinstance(heads, Heads) and not heads.per_task:
            heads.active = self.scenario.active_classes(self.seq, task.id + 1)

    def training_step(self, batch: dict, task: Task) -> torch.Tensor:
        return self.model.loss(batch)

    def before_optimizer_step(self) -> None:
        """After backward, before the step: gradient surgery (HAT masks) goes here."""

    def after_optimizer_step(self) -> None:
        """After the step: clamping, projections."""

    def after_task(self, task: Task, loader) -> None:
        """Fisher information, memory updates, snapshots."""

    def observe(self, batch: dict) -> float | None:
        """Task-free scenarios: learn from one stream batch (no task id, no boundary); return its loss."""
        raise TypeError(f"--baseline {self.name} does not learn from a task-free stream")

    def stream_stats(self) -> dict[str, Any]:
        """Numbers for the log after each hidden segment of a stream (experts, memory fill)."""
        return {}

    @torch.no_grad()
    def predict(self, batch: dict, task_id: int | None) -> torch.Tensor:
        """Logits in the scenario's label space; `task_id` is None unless the scenario gives it."""
        return self.model(batch, task_id)

    def predictable_classes(self) -> int | None:
        """With global labels (CIL): how many leading classes `predict` can output now, or None if unknown.

        A shared head masks the outputs of classes not seen yet to -inf, so a task whose classes all lie
        beyond them scores 0 accuracy and 0 macro-F1 without the model being run (the engine skips it)."""
        heads = getattr(self.model, "heads", None)
        if isinstance(heads, Heads) and not heads.per_task:
            return heads.active
        return None

    def parameters_to_train(self) -> Iterable[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups; a group's "lr" overrides --learning_rate (the scheduler scales all).

        The classifier heads get --head_lr when it is set: a head learns its task fast while the
        shared encoder moves slowly, the usual fine-tuning split of learning rates."""
        groups = [{"params": [p for p in self.parameters_to_train() if p.requires_grad]}]
        heads = getattr(self.model, "heads", None)
        if self.cfg.head_lr is None or not isinstance(heads, nn.Module):
            return groups
        return with_own_lr(groups, heads.parameters(), self.cfg.head_lr)

    def forward(self, batch: dict) -> torch.Tensor:
        # The engine calls the (possibly DDP-wrapped) approach, so gradients synchronise.
        return self.training_step(batch, self.current_task)

    # -- checkpoint state beyond tensors (JSON) ---------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass


class BufferDict(nn.Module):
    """Named tensors saved with the model but never trained (Fisher, anchors, snapshots)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self._keys: dict[str, str] = {}
        for name, t in tensors.items():
            key = name.replace(".", "__")
            self._keys[name] = key
            self.register_buffer(key, t)

    def __getitem__(self, name: str) -> torch.Tensor:
        return getattr(self, self._keys[name])

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        getattr(self, self._keys[name]).copy_(value)

    def keys(self):
        return self._keys.keys()

    def items(self):
        return ((k, self[k]) for k in self._keys)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A snapshot of `model` for distillation: in eval mode, no parameter takes gradients."""
    import copy

    old = copy.deepcopy(model).eval()
    old.requires_grad_(False)
    return old


def with_own_lr(groups: list[dict[str, Any]], params: Iterable[nn.Parameter], lr: float) -> list[dict[str, Any]]:
    """Move `params` out of `groups` into one group of their own at learning rate `lr` (empty groups dropped)."""
    moved = {id(p) for p in params}
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in moved]} for g in groups]
    own = [p for g in groups for p in g["params"] if id(p) in moved]
    return [g for g in rest + [{"params": own, "lr": lr}] if g["params"]]


def trainable_named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
