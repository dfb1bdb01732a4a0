"""DyTox, dynamic token expansion (Douillard, Ramé, Couairon, Cord, CVPR 2022), on any transformer encoder.

The paper's model is a ConViT (`--backbone convit`, the reference setting). mmcl runs the same method on any
backbone of the `TokenEncoder` interface (mmcl/backbones/tokens.py): `vit` (and `vit_adapter`), and text
encoders, `bert` (trained), `bert_frozen` (frozen), `bert_lora`, `bert_adapter` and Hugging Face BERT-family
ids; DyTox on text and on a plain ViT is mmcl's extension (docs/fidelity.md). Other backbones (`dual`, a
`--pretrained` timm CNN) fail at start with an error naming --backbone.

Data flow for a batch while learning task t:

  shared encoder: the backbone's token embedding and its self-attention blocks (SABs), through
    `encode_tokens(depth=..., finish=False)` (no final norm: the TAB normalises its inputs):
                                                                          x (B, N, D), key mask (B, N)
    convit: the patch tokens (no class token) through its gated positional blocks; vit: [CLS] and the
    patch tokens through its blocks; text: [CLS], the word pieces, [SEP] and padding, which the key
    mask marks
  task-attention block (TAB): for each task j <= t, its learned token theta_j is the only query
    and attends to [theta_j; x] (padding masked out, theta_j always visible); LayerNorm-attention-
    residual, LayerNorm-MLP-residual:                                      e_j (B, D)
  classifiers: task j's own LayerNorm + Linear on e_j gives its classes' logits; the logits of
    tasks 0..t are concatenated (CIL: all classes seen; TIL: only the tested task's head).
The TAB has as many heads as the encoder (`num_heads`: --vit_heads, or the text model's own).

Depth (--dytox_tab_in_depth, the default): on image encoders --vit_depth counts the TAB, as the paper and
the reference config do (CIFAR: depth 6 = 5 SABs + 1 TAB, `local_up_to_layer: 5`): the TAB takes the
place of the encoder's last block. `convit` loses that block (the plain one; the --vit_depth - 1 left
are all gated positional), as before, so convit checkpoints keep their keys; `vit` keeps its blocks and
runs only the first --vit_depth - 1 (the last block and the final norm stay in the model, unused: no
gradient reaches them). --no-dytox_tab_in_depth runs all --vit_depth blocks and puts the TAB on top (mmcl
before issue #20). Text encoders always keep every layer and put the TAB on top, whatever the flag: they
are pre-trained, and dropping a pre-trained layer would throw away what it learned; their depth is the
model's, not --vit_depth; and PyContinual's DyTox for text (its v1.0.0 branch, networks/baselines/
dytox.py) runs the whole RoBERTa encoder under its TAB. A `--pretrained` ViT follows the image rule (its
last pre-trained block is skipped); --no-dytox_tab_in_depth keeps it.

Loss (t > 0): (1 - lambda) BCE(sigmoid logits, one-hot) + lambda KD + 0.1 divergence, with
  lambda = old classes / classes seen; KD = KL(softmax(old model's old logits) || softmax(new
  model's old logits)) at temperature 1, averaged over examples and old classes as the reference
  code does (its elementwise mean: the per-example KL counts 1 / old classes); the divergence head
  (LayerNorm + Linear on e_t) classifies the new task's classes plus one "old" class with the same
  sigmoid BCE. Task 0: BCE alone.
Each new task token starts from a fresh truncated normal (std 0.02), as in the reference code.
While task t trains, the tokens and heads of earlier tasks are frozen (the reference's
`freeze_task: [old_task_tokens, old_heads]`); the encoder and the TAB are shared and trained (the
distillation holds them near the previous model). A frozen encoder (`bert_frozen`, `--freeze_backbone`)
stays frozen throughout: the TAB, the tokens and the heads train on top of it.

Rehearsal: a class-balanced memory of --memory_size examples in total (the global budget on any
number of processes: it is chosen from the whole task with the same features everywhere), filled
by herding on the concatenation [e_0; ...; e_t] of every task embedding (the reference's
`rehearsal: icarl_all`; --dytox_herding last ranks on e_t alone, its `icarl_token`); the new task
trains on its data plus the memory.
After each task t > 0, balanced fine-tuning: --dytox_finetune_epochs (20, as the paper) over the
memory alone (class-balanced, the new classes included) at --dytox_finetune_lr_scale (the paper's
0.1) x the learning rate, constant, with the BCE alone (no distillation, no divergence head: the
reference's `head_div_mode: tr`). It trains what the reference trains (`freeze_ft: [sab]`): only the
encoder (patch or word embeddings, positions, SABs) stays frozen (in eval mode); the TAB, every task token
and every head so far are fine-tuned. Afterwards every parameter is trainable again exactly if it was
before (a frozen encoder stays frozen). --no-dytox_finetune_tab keeps the TAB fixed, --no-dytox_finetune_old
the earlier tasks' tokens and heads. docs/results/dytox.md has what each choice measured.

Text memories are rows of the tokenised train splits; every batch drawn from them (training, herding,
fine-tuning) goes through the engine's collate, which pads it, and the key mask keeps the padding out.

Scaled for a CPU and 8-32 px images: mmcl's `convit` defaults (width 192, depth 4 = 3 SABs + 1 TAB
here, 3 heads, patch 4; the paper's CIFAR model is width 384, 5 + 1 blocks, 12 heads).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmcl.approaches import APPROACHES
from mmcl.approaches.base import Approach, frozen_copy
from mmcl.backbones.base import Backbone
from mmcl.backbones.tokens import token_encoder
from mmcl.backbones.vision import TimmConvitBackbone
from mmcl.data.sequence import Task
from mmcl.memory import Memory, MemoryOptions, herding_order
from mmcl.optim import make_optimizer
from mmcl.options import option, positive


class TaskAttentionBlock(nn.Module):
    """A class-attention block whose only query is a task token."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"--vit_embed_dim {dim} must be divisible by --vit_heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, token: torch.Tensor, tokens: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """token (B, 1, D), the encoder's tokens (B, N, D), their key mask (B, N) (True: attend; None: all)
        -> the task embedding (B, 1, D)."""
        B, N, D = tokens.shape
        h = self.norm1(torch.cat([token, tokens], dim=1))
        q = self.q(h[:, :1]).view(B, 1, self.heads, D // self.heads).transpose(1, 2)
        k, v = self.kv(h).view(B, N + 1, 2, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        mask = None
        if key_mask is not None:  # padding is never attended; the task token itself always is
            mask = torch.cat([key_mask.new_ones(B, 1), key_mask], dim=1).bool()[:, None, None, :]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, 1, D)
        token = token + self.proj(attended)
        return token + self.mlp(self.norm2(token))


def classifier(dim: int, n: int) -> nn.Module:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, n))


class DyToxModel(nn.Module):
    """The shared encoder (a TokenEncoder backbone), the TAB, and per task a token, a head and a divergence head."""

    def __init__(self, backbone: Backbone, layout: list[int], tab_in_depth: bool = True) -> None:
        super().__init__()
        encoder = token_encoder(backbone)
        heads = encoder.num_heads  # the TAB has as many heads as the encoder (read before a block goes)
        self.depth: int | None = None  # encoder layers that run (None: all)
        if tab_in_depth and encoder.modality == "image":
            # The TAB takes the place of the encoder's last block (the paper's depth counts it); with
            # --vit_depth 1 no SAB is left (the TAB reads the embedded patches), as in the reference.
            if isinstance(encoder, TimmConvitBackbone):
                # `convit` builds --vit_depth - 1 gated-positional blocks and one plain one; the plain one is
                # removed, not skipped, so the state dict (and convit DyTox checkpoints) has no keys of it
                encoder.model.blocks = encoder.model.blocks[:len(encoder.model.blocks) - 1]
            else:
                self.depth = encoder.num_token_layers - 1
        # text encoders keep every pre-trained layer and the TAB goes on top (see the module docstring)
        self.backbone = backbone
        dim = encoder.token_dim
        self.tab = TaskAttentionBlock(dim, heads)
        # one token per task, each its own parameter: earlier ones are frozen while later tasks train
        self.task_tokens = nn.ParameterList(nn.Parameter(torch.zeros(1, 1, dim)) for _ in layout)
        for token in self.task_tokens:
            nn.init.trunc_normal_(token, std=0.02)
        self.heads = nn.ModuleList(classifier(dim, n) for n in layout)
        self.divergence = nn.ModuleList(classifier(dim, n + 1) for n in layout)  # new classes + "old"
        self.layout = list(layout)
        self.offsets = np.cumsum([0] + self.layout).tolist()

    def encoder_tokens(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The shared encoder's output tokens (B, N, D), before any final norm, and their key mask (B, N)
        (None where nothing is padding)."""
        return self.backbone.encode_tokens(batch, depth=self.depth, finish=False)

    def embeddings(self, batch: dict, tasks: list[int]) -> torch.Tensor:
        """Task embeddings (B, len(tasks), D) of the listed tasks' tokens."""
        x, mask = self.encoder_tokens(batch)
        return torch.cat([self.tab(self.task_tokens[j].expand(x.shape[0], -1, -1), x, mask) for j in tasks], dim=1)

    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        """Concatenated logits of tasks 0..J-1 from their embeddings (B, J, D)."""
        return torch.cat([self.heads[j](emb[:, j]) for j in range(emb.shape[1])], dim=-1)


def one_hot_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """DyTox's classification loss: sigmoid BCE against one-hot targets over the classes seen (logits' width)."""
    return F.binary_cross_entropy_with_logits(logits, F.one_hot(targets, logits.shape[-1]).float())


def distillation_weight(old_classes: int, seen_classes: int) -> float:
    """lambda of the paper: the share of old classes among the classes seen."""
    return old_classes / seen_classes


HERDING_FEATURES = ("all", "last")


@dataclass
class DyToxOptions(MemoryOptions):
    title = "DyTox options"
    dytox_div_weight: float = option(0.1, "the divergence head's loss weight")
    dytox_finetune_epochs: int = option(20, "balanced fine-tuning epochs after each task > 0 (paper: 20)")
    dytox_finetune_lr_scale: float = option(0.1, "its learning rate as a share of --learning_rate (paper: 5e-5 vs "
                                                 "5e-4)")
    dytox_finetune_tab: bool = option(True, "the balanced fine-tuning trains the task-attention block (reference "
                                            "code; --no-dytox_finetune_tab: it stays fixed, mmcl before issue #20)")
    dytox_finetune_old: bool = option(True, "the balanced fine-tuning trains the earlier tasks' tokens and heads too "
                                            "(reference code; --no-dytox_finetune_old: only the new task's, mmcl "
                                            "before issue #20)")
    dytox_herding: str = option("all", "herding features: all (the concatenated embeddings of every task token, "
                                       "the reference's icarl_all) | last (the new task's embedding alone, "
                                       "icarl_token; mmcl before issue #20)")
    dytox_tab_in_depth: bool = option(True, "--vit_depth counts the task-attention block (paper: 5 SABs + 1 TAB "
                                            "at depth 6); --no-dytox_tab_in_depth adds it on top of --vit_depth "
                                            "encoder blocks (mmcl before issue #20). Image encoders only: on a "
                                            "text encoder the TAB always goes on top of every layer")

    def validate(self) -> None:
        super().validate()
        positive(self, "dytox_finetune_lr_scale")
        if self.dytox_finetune_epochs < 0 or self.dytox_div_weight < 0:
            raise ValueError("--dytox_finetune_epochs and --dytox_div_weight must be >= 0")
        if self.dytox_herding not in HERDING_FEATURES:
            raise ValueError(f"--dytox_herding must be one of {', '.join(HERDING_FEATURES)}, "
                             f"got '{self.dytox_herding}'")


@APPROACHES.register("dytox")
class DyTox(Approach):
    name = "dytox"
    scenarios = ("cil", "til")
    uses_memory = True
    modalities = ("text", "image")
    Options = DyToxOptions
    requires = ("tokens",)  # the encoder's output tokens, for the task-attention block
    why_not = {"towers": "DyTox runs the layers of one transformer encoder; `dual` has two towers, then shared "
                         "blocks over pooled features"}

    @classmethod
    def modalities_for(cls, cfg) -> tuple[str, ...]:
        # DyTox runs the layers of one transformer encoder itself; `dual` (two towers, then shared blocks over
        # pooled features) is none, so it handles no task there and a mixed sequence fails before any data work
        from mmcl.backbones import BACKBONES

        on_dual = cfg.backbone in BACKBONES and BACKBONES.canonical(cfg.backbone) == "dual"
        return () if on_dual else cls.modalities

    def __init__(self, backbone, seq, scenario, cfg) -> None:
        super().__init__(backbone, seq, scenario, cfg)
        self.memory = Memory(self.opts.memory_size, "class_balanced", seed=cfg.seed)
        self._old: list[DyToxModel] = []  # the model after the previous task (not a submodule)
        self.tasks_seen = 0

    def build_model(self, backbone) -> nn.Module:
        return DyToxModel(backbone, [t.num_classes for t in self.seq], tab_in_depth=self.opts.dytox_tab_in_depth)

    # -- data -----------------------------------------------------------------------------------
    def memory_rows(self):
        from datasets import concatenate_datasets

        by_task: dict[int, list[int]] = {}
        for t, row, _ in self.memory.items:
            by_task.setdefault(t, []).append(row)
        parts = [self.seq[t].train.select(rows) for t, rows in sorted(by_task.items())]
        return concatenate_datasets(parts) if parts else None

    def train_dataset(self, task: Task):
        from datasets import concatenate_datasets

        memory = self.memory_rows()
        return task.train if memory is None else concatenate_datasets([task.train, memory])

    def global_targets(self, batch: dict) -> torch.Tensor:
        if self.scenario.global_labels:
            return batch["labels"]
        offsets = torch.tensor(self.model.offsets, device=batch["labels"].device)
        return batch["labels"] + offsets[batch["task_ids"]]

    # -- training -------------------------------------------------------------------------------
    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self.tasks_seen = max(self.tasks_seen, task.id + 1)
        m = self.model
        if task.id > 0:
            self._old = [frozen_copy(m)]
        for j in range(len(self.seq)):
            trainable = j == task.id
            m.task_tokens[j].requires_grad_(trainable)
            m.heads[j].requires_grad_(trainable)
            m.divergence[j].requires_grad_(trainable and j > 0)

    def training_step(self, batch: dict, task: Task) -> torch.Tensor:
        m, t = self.model, task.id
        emb = m.embeddings(batch, list(range(t + 1)))
        logits = m.logits(emb).float()
        targets = self.global_targets(batch)
        seen = m.offsets[t + 1]
        bce = one_hot_bce(logits, targets)
        if t == 0:
            return bce
        old_classes = m.offsets[t]
        with torch.no_grad():
            old = self._old[0]
            old_logits = old.logits(old.embeddings(batch, list(range(t)))).float()
        # the reference's reduction="mean" (over every element), spelled out: torch warns that
        # "mean" will come to mean "batchmean", which would weigh the term old_classes x more
        kd = F.kl_div(F.log_softmax(logits[:, :old_classes], -1), F.log_softmax(old_logits, -1),
                      reduction="none", log_target=True).mean()
        lam = distillation_weight(old_classes, seen)
        new = targets >= old_classes
        div_targets = torch.where(new, targets - old_classes, torch.full_like(targets, m.layout[t]))
        div = one_hot_bce(m.divergence[t](emb[:, t]).float(), div_targets)
        return (1 - lam) * bce + lam * kd + self.opts.dytox_div_weight * div

    @torch.no_grad()
    def herding_features(self, task: Task) -> torch.Tensor:
        """The features herding ranks `task`'s training examples on: (n, (t + 1) D), the task embeddings
        e_0..e_t side by side (--dytox_herding all), or (n, D), e_t alone (last)."""
        tokens = list(range(task.id + 1)) if self.opts.dytox_herding == "all" else [task.id]
        self.model.eval()
        out = []
        for start in range(0, len(task.train), self.cfg.eval_batch_size):
            rows = range(start, min(start + self.cfg.eval_batch_size, len(task.train)))
            out.append(self.model.embeddings(self.batch_of(task.train, rows), tokens).flatten(1))
        self.model.train()
        return torch.cat(out)

    def after_task(self, task: Task, loader) -> None:
        targets = np.asarray(task.train["target"])
        if not self.scenario.global_labels:  # TIL's targets are local: herd per global class
            targets = targets + task.class_offset
        features = self.herding_features(task).cpu()
        quota = max(1, self.opts.memory_size // self.model.offsets[task.id + 1])
        order = []
        for c in np.unique(targets):
            rows = np.flatnonzero(targets == c)
            order += rows[herding_order(features[rows], quota)].tolist()
        self.memory.add_task(task.id, targets.tolist(), order=order)
        if task.id > 0 and self.opts.dytox_finetune_epochs > 0:
            self.balanced_finetune(task)

    def finetuned_parameters(self, task: Task) -> list[nn.Parameter]:
        """What the balanced fine-tuning after `task` trains: the reference's `freeze_ft: [sab]` leaves the
        TAB, every task token and every head trainable (tokens and heads of tasks not seen yet are not in the
        loss). The encoder (its token embedding and SABs) stays fixed; so does the divergence head, which
        the reference uses only while a task trains (`head_div_mode: tr`)."""
        m = self.model
        tasks = range(task.id + 1) if self.opts.dytox_finetune_old else [task.id]
        params = [p for j in tasks for p in (m.task_tokens[j], *m.heads[j].parameters())]
        if self.opts.dytox_finetune_tab:
            params += list(m.tab.parameters())
        return params

    def balanced_finetune(self, task: Task) -> None:
        """The TAB, the task tokens and the heads on the class-balanced memory (see `finetuned_parameters`)."""
        m = self.model
        # what trains afterwards is what trained before (a frozen encoder stays frozen; before_task then
        # sets the tokens and heads of the next task)
        was_trainable = [(p, p.requires_grad) for p in m.parameters()]
        m.requires_grad_(False)
        params = self.finetuned_parameters(task)
        for p in params:
            p.requires_grad_(True)
        m.train()
        m.backbone.eval()  # the frozen encoder in eval mode, as the reference's freeze("sab") (dropout off)
        # the run's optimiser and weight decay, as the reference's create_optimizer; a constant rate
        opt = make_optimizer(self.cfg, params)
        for group in opt.param_groups:
            group["lr"] = self.cfg.learning_rate * self.opts.dytox_finetune_lr_scale
        opt = self.prepare_optimizer(opt)
        # no DDP wrapper here (see below): the step's backward must not wait for other processes' gradients
        step = self.optimizer_step(opt, params)
        data = self.memory_rows()
        rng = np.random.default_rng(self.cfg.seed + 104729 * task.id)
        # Every process holds the same memory and runs this same loop on the global batch (no DDP
        # wrapper here), so k processes fine-tune exactly as one process with k x the batch does.
        bs = self.cfg.train_batch_size * self.world[0]
        steps = -(-len(data) // bs)
        for epoch in range(self.opts.dytox_finetune_epochs):
            order = rng.permutation(len(data))
            for i, start in enumerate(range(0, len(order), bs)):
                batch = self.batch_of(data, order[start:start + bs].tolist())
                with self.autocast():
                    logits = m.logits(m.embeddings(batch, list(range(task.id + 1)))).float()
                loss = one_hot_bce(logits, self.global_targets(batch))
                step(loss, {"task": f"{task.id} ({task.name})", "phase": "balanced fine-tuning",
                            "epoch": f"{epoch + 1} of {self.opts.dytox_finetune_epochs}",
                            "step": f"{i + 1} of {steps}"})
        for p, trainable in was_trainable:
            p.requires_grad_(trainable)
        m.train()

    # -- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, batch: dict, task_id: int | None) -> torch.Tensor:
        m = self.model
        if task_id is not None:  # TIL: the task's own token and head
            return m.heads[task_id](m.embeddings(batch, [task_id])[:, 0])
        seen = max(1, self.tasks_seen)
        logits = m.logits(m.embeddings(batch, list(range(seen))))
        total = m.offsets[-1]
        if logits.shape[-1] < total:  # classes not seen yet cannot be predicted
            unseen = logits.new_full((logits.shape[0], total - logits.shape[-1]), float("-inf"))
            logits = torch.cat([logits, unseen], -1)
        return logits

    def predictable_classes(self) -> int:
        return self.model.offsets[max(1, self.tasks_seen)]  # what `predict` leaves finite

    def extra_state(self) -> dict:
        return {"memory": self.memory.state_dict(), "tasks_seen": self.tasks_seen}

    def load_extra_state(self, state: dict) -> None:
        if "memory" in state:
            self.memory.load_state_dict(state["memory"])
        self.tasks_seen = int(state.get("tasks_seen", 0))
