"""HAT, hard attention to the task (Serra et al. 2018), on the adapter sites of `bert_adapter` or `vit_adapter`.

Data flow. Every adapter site of the frozen BERT (after the attention-output and the
FFN-output dense layers, before the residual LayerNorm; on `vit_adapter` after each timm block's
attention projection and MLP) gets a `HatAdapter`, PyContinual's masked adapter:

    h = act(fc1(x)) * g1,   h = act(fc2(h)) * g2,   out = x + h,   g = sigmoid(s * e_t)

with one embedding row e_t per task for fc1's units and one for fc2's units (`HatGate`).
The plug-ins learn the task id t and the scale s from a `HatContext` that the approach owns
and sets before every forward pass; nothing global.

Training task t: s rises within each epoch from 1/smax at the first batch to smax at the last;
loss = CE + c * sum(m_t * (1 - M)) / sum(1 - M) over all gates, M = the cumulative mask of
tasks < t. After backward (`HatMasks.block_gradients`), the gradient of each weight is
multiplied by 1 - min(M_out, M_in) (an unmasked input counts as used, so 1 - M_out), of each
bias by 1 - M_out; the embedding gradients are compensated for the annealing; after the step
the embeddings are clamped to +-thres_emb. After the task, M = max(M, sigmoid(smax * e_t)).
Test time: s = smax and the given task id (TIL).

Domain-incremental (`--scenario dil`, mmcl's extension: the HAT paper is TIL only). One shared head
(the scenario's layout); training is unchanged (the engine knows the task, so each task trains under its
own mask, with the same regulariser, gradient blocking and consolidation). At test time no task id is
given, and `--hat_dil_mask` decides whose gates to apply; the learned tasks are the masked tasks trained
so far, the one in training included (so `--select_best`'s valid scores use it):
- `last` (default): the gates of the most recently learned task. Its mask may reuse the units of every
  earlier task (their weights frozen), so it is the one mask that could draw on all of them.
- `confident`: every learned task's gates in turn; per example, the prediction of the task whose
  softmax has the lowest entropy. Costs one forward pass per learned task.
- `union`: one pass with every gate at the union (elementwise max) of the learned tasks' gates at smax,
  i.e. HAT's cumulative mask M: every unit any task uses is on. No task was trained under this mask, so
  it is a heuristic (cheap: one pass), offered to be measured, not a guarantee.
Before any task is learned (the untrained row for FWT) every rule applies task 0's gates, as TIL does
for task 0. PyContinual (`bert_adapter_mask`) has two opt-in flags and no default (with neither, its
DIL evaluation fails): `--last_id`, the last trained task's mask (our `last`), and `--ent_id`, the task
whose outputs have the lowest entropy summed over the whole *batch*, one task per batch (ours chooses
per example: an example's prediction must not depend on its batchmates, and mmcl's `predict` has no
notion of a batch being one domain).

On `--backbone dual` (text and image tasks) the masks go on the adapters of its text tower
(`--text_backbone bert_adapter`): HAT is a method for adapters, and the vision tower has none.
Image tasks then train the vision tower and its projection without masks, regulariser or
consolidation (they forget as fine-tuning does), and the text projection and the shared blocks
are frozen at their initial weights, so the masked adapters stay the only trained path of the text
tasks and text keeps HAT's guarantee while images are learned.

What trains: the masked adapters, the per-task heads and, as in PyContinual, BERT's LayerNorms
(unmasked, shared by all tasks); the rest of BERT is frozen.

The defaults are the paper's and PyContinual's (`bert_adapter_mask`). Our variant, the preset
`hat_exact` (configs/presets/hat_exact.yaml, measured there and in docs/fidelity.md), makes the
protection of earlier tasks exact:
- `--no-hat_train_layernorm`: the LayerNorms are frozen (trained, they are an unmasked path by which a
  new task changes an old task's outputs).
- `--hat_binarize`: after a task, embedding entries with 0 < sigmoid(smax*e) < 1 are pushed to
  +-120/smax so that task's gates are exactly 0 or 1. Adam normalises gradient scale, so a factor
  1 - M with 0 < M < 1 hardly slows a weight that an earlier task partly uses; with binary masks the
  blocked gradients are exactly zero and, with weight decay 0 and frozen LayerNorms, earlier tasks'
  outputs are preserved bit for bit.

Other differences from PyContinual, and why:
- s reaches smax at the last batch of an epoch (PyContinual: s = 1/smax + (smax-1/smax)*b/B
  stops one step short).
- Weight decay must be 0: AdamW's decoupled decay would shrink weights whose gradients HAT zeroed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmcl.approaches import APPROACHES
from mmcl.approaches.base import Approach, BufferDict, Progress
from mmcl.backbones.adapters import AdapterSite, AdapterSites
from mmcl.data.sequence import Task
from mmcl.options import Options, option, positive

# sigmoid(+-120) is exactly 1 / 0 in float32 and bfloat16: the logit a binarised gate is pushed to
SNAP_LOGIT = 120.0
# --hat_dil_mask: whose gates a DIL prediction (no task id) applies; the Hat docstring says what each means
DIL_MASK_RULES = ("last", "confident", "union")


@dataclass
class HatContext:
    """What the plug-ins need to know about the forward pass in progress (set by the approach)."""

    task: int = 0
    s: float = 1.0
    # tasks whose gates are combined (elementwise max) instead of `task`'s: `--hat_dil_mask union`
    union: tuple[int, ...] | None = None


def annealed_s(progress: Progress, smax: float) -> float:
    """s for the current batch: 1/smax at the first batch of an epoch, smax at the last."""
    if progress.num_batches <= 1:
        return smax
    frac = progress.batch / (progress.num_batches - 1)
    return 1.0 / smax + (smax - 1.0 / smax) * frac


class HatGate(nn.Module):
    """A per-task embedding over `units`; the gate of task t at scale s is sigmoid(s * e_t)."""

    def __init__(self, ctx: HatContext, ntasks: int, units: int) -> None:
        super().__init__()
        self.ctx = ctx  # shared with the approach, not a submodule
        self.embedding = nn.Embedding(ntasks, units)  # N(0, 1) as in HAT and PyContinual

    def mask(self, task: int, s: float) -> torch.Tensor:
        return torch.sigmoid(s * self.embedding.weight[task])

    def forward(self) -> torch.Tensor:
        if self.ctx.union is not None:
            return torch.stack([self.mask(t, self.ctx.s) for t in self.ctx.union]).amax(0)
        return self.mask(self.ctx.task, self.ctx.s)


@dataclass(frozen=True, eq=False)
class ProtectedLinear:
    """A linear layer whose output units are gated by `out_gate` and inputs by `in_gate`.

    `in_gate` None: the inputs are not masked (BERT hidden states), so every input counts as used.
    """

    linear: nn.Linear
    out_gate: HatGate
    in_gate: HatGate | None = None


def make_activation(use_gelu: bool) -> nn.Module:
    return nn.GELU() if use_gelu else nn.ReLU()


class HatAdapter(nn.Module):
    """PyContinual's masked adapter: gates multiply the activated outputs of fc1 and of fc2."""

    def __init__(self, hidden: int, size: int, ctx: HatContext, ntasks: int, use_gelu: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, size)
        self.fc2 = nn.Linear(size, hidden)
        self.act = make_activation(use_gelu)
        self.gate1 = HatGate(ctx, ntasks, size)
        self.gate2 = HatGate(ctx, ntasks, hidden)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x)) * self.gate1()
        return self.act(self.fc2(h)) * self.gate2()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.transform(x)

    def hat_protected(self) -> list[ProtectedLinear]:
        return [ProtectedLinear(self.fc1, self.gate1), ProtectedLinear(self.fc2, self.gate2, self.gate1)]


class HatMasks(nn.Module):
    """The HAT machinery over every `HatGate` of a model: regulariser, cumulative masks,
    gradient blocking, embedding compensation and clamping.

    Linear layers are protected when a module of the model lists them in `hat_protected()`.
    The cumulative masks are buffers, so they are saved in checkpoints with the model.
    """

    def __init__(self, model: nn.Module, smax: float, thres_cosh: float, thres_emb: float) -> None:
        super().__init__()
        self.smax, self.thres_cosh, self.thres_emb = smax, thres_cosh, thres_emb
        # plain containers: the gates and layers stay registered in the model only
        self._gates: dict[str, HatGate] = {n: m for n, m in model.named_modules() if isinstance(m, HatGate)}
        if not self._gates:
            raise ValueError("HatMasks: the model has no HatGate")
        names = {id(g): n for n, g in self._gates.items()}
        self._protected: list[tuple[nn.Linear, str, str | None]] = []
        seen: set[int] = set()
        for module in model.modules():
            for p in getattr(module, "hat_protected", lambda: [])():
                if id(p.linear) in seen:
                    continue
                seen.add(id(p.linear))
                in_name = names[id(p.in_gate)] if p.in_gate is not None else None
                self._protected.append((p.linear, names[id(p.out_gate)], in_name))
        self.cumulative = BufferDict({n: torch.zeros(g.embedding.embedding_dim) for n, g in self._gates.items()})

    @property
    def gates(self) -> dict[str, HatGate]:
        return self._gates

    @property
    def protected(self) -> list[tuple[nn.Linear, str, str | None]]:
        """(layer, name of its output gate, name of its input gate or None)."""
        return self._protected

    def masks(self, task: int, s: float) -> dict[str, torch.Tensor]:
        return {n: g.mask(task, s) for n, g in self._gates.items()}

    def regulariser(self, task: int, s: float) -> torch.Tensor:
        """sum m_t * (1 - M) / sum (1 - M): the share of still-free units that task t claims."""
        num, den = [], []
        for name, m in self.masks(task, s).items():
            free = 1.0 - self.cumulative[name]
            num.append((m * free).sum())
            den.append(free.sum())
        # clamp: when (almost) every unit is taken, the ratio would divide by ~0
        return torch.stack(num).sum() / torch.stack(den).sum().clamp(min=1.0)

    @torch.no_grad()
    def block_gradients(self) -> None:
        """Zero (scale by 1 - M) the gradients of weights that earlier tasks use."""
        for linear, out_name, in_name in self._protected:
            used_out = self.cumulative[out_name]
            if linear.weight.grad is not None:
                if in_name is None:
                    used = used_out[:, None]
                else:
                    used = torch.minimum(used_out[:, None], self.cumulative[in_name][None, :])
                linear.weight.grad.mul_(1.0 - used)
            if linear.bias is not None and linear.bias.grad is not None:
                linear.bias.grad.mul_(1.0 - used_out)

    @torch.no_grad()
    def compensate(self, s: float) -> None:
        """Undo the annealing's damping: grad_e *= smax (cosh(clamp(s e)) + 1) / (s (cosh(e) + 1))."""
        for gate in self._gates.values():
            grad = gate.embedding.weight.grad
            if grad is None:
                continue
            e = gate.embedding.weight.detach()
            num = torch.cosh(torch.clamp(s * e, -self.thres_cosh, self.thres_cosh)) + 1.0
            den = torch.cosh(e) + 1.0
            grad.mul_(self.smax / s * num / den)

    @torch.no_grad()
    def clamp_embeddings(self) -> None:
        for gate in self._gates.values():
            gate.embedding.weight.clamp_(-self.thres_emb, self.thres_emb)

    @torch.no_grad()
    def binarize(self, task: int) -> int:
        """Push task `task`'s embeddings out of the band where sigmoid(smax * e) is neither 0 nor 1.

        Returns how many units changed their gate value.
        """
        margin = min(SNAP_LOGIT / self.smax, self.thres_emb)
        changed = 0
        for gate in self._gates.values():
            e = gate.embedding.weight[task]
            before = torch.sigmoid(self.smax * e)
            e.copy_(torch.where(e > 0, e.clamp(min=margin), e.clamp(max=-margin)))
            changed += int((torch.sigmoid(self.smax * e) != before).sum())
        return changed

    @torch.no_grad()
    def consolidate(self, task: int) -> None:
        """M = max(M, mask of `task` at smax)."""
        for name, gate in self._gates.items():
            self.cumulative[name] = torch.maximum(self.cumulative[name], gate.mask(task, self.smax))


@dataclass
class HatOptions(Options):
    title = "HAT options"
    smax: float = option(400.0, "s_max of the gates' annealed sigmoid (HAT, and CTR's task-specific module)")
    thres_cosh: float = option(50.0, "clamp of s*e in the gradient compensation's cosh")
    thres_emb: float = option(6.0, "the task embeddings are clamped to +-thres_emb after each step")
    hat_c: float = option(0.75, "weight c of the mask-sparsity regulariser")
    hat_binarize: bool = option(False, "snap a finished task's gates to exactly 0/1 at smax (default: the "
                                       "paper's soft masks; preset hat_exact: on)")
    use_gelu: bool = option(False, "GELU in the masked adapters (PyContinual's default: ReLU)")
    hat_train_layernorm: bool = option(True, "train the encoder's LayerNorms with the plug-ins, unmasked and shared "
                                             "by all tasks, as PyContinual (preset hat_exact: frozen)")
    hat_dil_mask: str = option("last", "--scenario dil, no task id at test time: whose gates to apply. last: the "
                                       "latest learned task's (PyContinual --last_id); confident: per example, the "
                                       "learned task whose prediction has the lowest entropy (PyContinual --ent_id "
                                       "picks one per batch); union: every unit any learned task uses (HAT's "
                                       "cumulative mask). Ignored in TIL (default: last)")

    def validate(self) -> None:
        positive(self, "smax", "thres_cosh", "thres_emb")
        if self.hat_c < 0:
            raise ValueError(f"--hat_c must be >= 0, got {self.hat_c}")
        if self.hat_dil_mask not in DIL_MASK_RULES:
            raise ValueError(f"--hat_dil_mask must be one of {', '.join(DIL_MASK_RULES)}, got '{self.hat_dil_mask}'")


@APPROACHES.register("hat")
class Hat(Approach):
    """HAT-masked adapters at every adapter site of `bert_adapter` or `vit_adapter`.

    TIL: per-task heads, each test batch under its task's gates. DIL (mmcl's extension): one shared head,
    and at test time, with no task id, `--hat_dil_mask` picks the gates (module docstring): `last` the
    latest learned task's, `confident` per example the learned task with the lowest-entropy prediction,
    `union` the union of the learned tasks' gates. PyContinual offers `last` and a per-batch form of
    `confident`, with no default; ours is `last`.
    """

    name = "hat"
    Options = HatOptions
    scenarios = ("til", "dil")
    needs_task_id = False  # TIL gives it; in DIL `--hat_dil_mask` chooses the gates without it
    modalities = ("text", "image")  # whatever the adapter backbone encodes: bert_adapter text, vit_adapter images

    requires = ("adapter_sites",)
    tower_use = "text"  # on `--backbone dual`: mask the text tower, train images unmasked
    adapter_backbones: tuple[str, ...] = ("bert_adapter", "vit_adapter")  # named in the error message

    def __init__(self, backbone, seq, scenario, cfg) -> None:
        if cfg.weight_decay:
            raise ValueError(
                f"--baseline {self.name} needs --weight_decay 0: decoupled weight decay would move weights "
                "whose gradients the task masks zeroed, and earlier tasks would be forgotten"
            )
        super().__init__(backbone, seq, scenario, cfg)
        self.hat = HatMasks(self.model, self.opts.smax, self.opts.thres_cosh, self.opts.thres_emb)
        self._s = float(self.opts.smax)
        self.binarized_units: list[int] = []  # per task, how many gates `hat_binarize` changed
        # the masked tasks whose training has begun, in order: the gates a DIL prediction may apply
        self.learned_tasks: list[int] = []
        self.last_dil_choice: torch.Tensor | None = None  # `confident`: the task chosen per example, last batch

    # -- construction ------------------------------------------------------------------------
    def build_model(self, backbone) -> nn.Module:
        from mmcl.backbones.dual import DualBackbone

        encoder = backbone
        masks_text_tower = self.tower_use == "text"
        if isinstance(backbone, DualBackbone) and masks_text_tower and "text" in backbone.towers:
            encoder = backbone.towers["text"]
        if not isinstance(encoder, AdapterSites) or encoder.modality not in self.modalities:
            raise ValueError(
                f"--baseline {self.name} puts its plug-ins on the adapter sites of --backbone "
                f"{' or '.join(self.adapter_backbones)}"
                f"{' (or --backbone dual --text_backbone bert_adapter)' if masks_text_tower else ''}; "
                f"got --backbone {self.cfg.backbone}"
                + (f" with a {type(encoder).__name__} text tower" if isinstance(backbone, DualBackbone) else "")
            )
        self.adapter_size = encoder.adapter_size
        self.ctx = self.make_context()
        encoder.set_plugins(self.make_plugin)
        if not self.opts.hat_train_layernorm:
            for p in encoder.layer_norm_parameters():
                p.requires_grad_(False)
        if encoder is not backbone:
            # unmasked layers every text task passes through would let text forgetting through
            backbone.proj["text"].requires_grad_(False)
            backbone.shared.requires_grad_(False)
        self.masked_modalities = (encoder.modality,)
        return super().build_model(backbone)

    def masked(self, task: Task | None) -> bool:
        """Whether a task trains under the masks (on `dual`, image tasks do not)."""
        return task is not None and task.modality in self.masked_modalities

    def make_context(self) -> HatContext:
        return HatContext(task=0, s=float(self.opts.smax))

    def make_plugin(self, site: AdapterSite) -> nn.Module:
        return HatAdapter(site.dense.out_features, self.adapter_size, self.ctx, len(self.seq), self.opts.use_gelu)

    def set_context(self, task_id: int, s: float, batch: dict) -> None:
        self.ctx.task = task_id
        self.ctx.s = s

    # -- hooks ---------------------------------------------------------------------------
    def before_task(self, task: Task) -> None:
        super().before_task(task)
        if self.masked(task) and task.id not in self.learned_tasks:
            self.learned_tasks.append(task.id)

    def training_step(self, batch: dict, task: Task) -> torch.Tensor:
        s = annealed_s(self.progress, self.opts.smax)
        self._s = s
        self.set_context(task.id, s, batch)
        loss = self.model.loss(batch)
        if not self.masked(task):
            return loss
        return loss + self.opts.hat_c * self.hat.regulariser(task.id, s)

    def before_optimizer_step(self) -> None:
        if not self.masked(self.current_task):
            return  # the masked layers took no part in this step
        if self.current_task.id > 0:
            self.hat.block_gradients()
        self.hat.compensate(self._s)

    def after_optimizer_step(self) -> None:
        self.hat.clamp_embeddings()

    def after_task(self, task: Task, loader) -> None:
        if not self.masked(task):
            # an image task on `dual` claims no units: its gates never touched its inputs
            self.binarized_units.append(0)
            return
        if self.opts.hat_binarize:
            self.binarized_units.append(self.hat.binarize(task.id))
        self.hat.consolidate(task.id)

    @torch.no_grad()
    def predict(self, batch: dict, task_id: int | None) -> torch.Tensor:
        """Logits under task `task_id`'s gates; without a task id (DIL), under `--hat_dil_mask`'s choice.

        On a shared head (DIL) a given `task_id` only picks the gates: the head is the same for every task."""
        if task_id is None:
            return self.predict_without_task(batch)
        self.set_context(task_id, float(self.opts.smax), batch)
        return self.model(batch, task_id)

    def dil_candidates(self) -> list[int]:
        """The tasks whose gates a DIL prediction may apply, latest last; task 0 before any is learned."""
        return list(self.learned_tasks) or [0]

    def predict_without_task(self, batch: dict) -> torch.Tensor:
        rule, tasks = self.opts.hat_dil_mask, self.dil_candidates()
        if rule == "last" or len(tasks) == 1:
            return self.predict(batch, tasks[-1])
        if rule == "union":
            # `task` is the latest learned one for whatever reads it besides the gates (CTR's routing)
            self.set_context(tasks[-1], float(self.opts.smax), batch)
            self.ctx.union = tuple(tasks)
            try:
                return self.model(batch, None)
            finally:
                self.ctx.union = None  # training and TIL use their own task's gates
        if rule == "confident":
            logits = torch.stack([self.predict(batch, t) for t in tasks])  # (tasks, B, classes)
            # entropy rather than the top probability: it is PyContinual's criterion (--ent_id) and reads the
            # whole distribution; on a binary head (DSC, ASC's 2-class tasks) the two order tasks alike.
            # entr(0) = 0: an output masked to -inf adds nothing (where p * log p would be nan)
            entropy = torch.special.entr(torch.softmax(logits.float(), dim=-1)).sum(-1)  # (tasks, B)
            pick = entropy.argmin(0)  # ties: the earliest task
            self.last_dil_choice = torch.tensor(tasks, device=pick.device)[pick]
            return logits[pick, torch.arange(logits.shape[1], device=logits.device)]
        raise ValueError(f"--hat_dil_mask must be one of {', '.join(DIL_MASK_RULES)}, got '{rule}'")

    def extra_state(self) -> dict:
        state: dict = {"binarized_units": self.binarized_units}
        if not self.scenario.task_id_at_test:
            # which tasks' gates DIL predictions choose among; TIL needs none, and its state stays as it was
            state["learned_tasks"] = list(self.learned_tasks)
        return state

    def load_extra_state(self, state: dict) -> None:
        self.binarized_units = list(state.get("binarized_units", []))
        self.learned_tasks = [int(t) for t in state.get("learned_tasks", [])]
