"""Prompting a frozen timm ViT: the forward shared by CODA-Prompt, L2P and DualPrompt.

timm's VisionTransformer is run block by block here (patch embedding, position embedding,
blocks, final norm, pooling), not forked: a block with a prompt gets a prefix-tuning
attention (extra keys and values concatenated after the qkv projection, so the prompt
changes what every token attends to without adding output tokens); L2P's prompt tuning
inserts extra tokens after the [CLS] token instead. The query of all three methods is the
pooled feature of a prompt-free pass of the same frozen model, under no_grad.

`PromptApproach` holds what the three methods share: the frozen backbone (no gradients,
kept in eval mode), the query pass, and the class-incremental loss with the logits of past
tasks' classes masked to -inf (the current task's classes compete only with each other,
so the head of earlier classes is not pushed down: CODA-Prompt, L2P and DualPrompt all do this).
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.approaches.base import Approach
from mmcl.data.sequence import Task

Prefix = tuple[torch.Tensor, torch.Tensor]  # (keys, values), each (B, length, embed_dim)


def check_prompt_vit(vit: nn.Module, flag: str = "--backbone") -> None:
    """The forward below needs a timm VisionTransformer with standard attention blocks."""
    blocks = getattr(vit, "blocks", None)
    ok = blocks is not None and all(hasattr(getattr(b, "attn", None), "qkv") for b in blocks) and hasattr(vit, "_pos_embed")
    if not ok:
        raise ValueError(f"{flag}: prompting needs a timm VisionTransformer (`vit`), got {type(vit).__name__}")


def parse_layers(text: str, depth: int, flag: str) -> list[int]:
    """'0,1,2' or '0-2' -> [0, 1, 2]; each index must name one of the model's `depth` blocks."""
    layers: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        try:
            lo, _, hi = part.partition("-")
            layers.extend(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise ValueError(f"--{flag} must be block indices like '0,1,2' or '0-2', got '{text}'") from None
    if not layers:
        raise ValueError(f"--{flag} names no block, got '{text}'")
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise ValueError(f"--{flag}: blocks {bad} do not exist; the vit has {depth} blocks (0..{depth - 1}, --vit_depth)")
    return sorted(set(layers))


def prefix_attention(attn: nn.Module, x: torch.Tensor, prefix: Prefix) -> torch.Tensor:
    """timm Attention.forward with prompt keys/values concatenated in front of the tokens' own."""
    B, N, _ = x.shape
    h, hd = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(B, N, 3, h, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    pk, pv = (p.reshape(B, -1, h, hd).transpose(1, 2).to(q.dtype) for p in prefix)
    q, k = attn.q_norm(q), attn.k_norm(torch.cat([pk, k], dim=2))
    v = torch.cat([pv, v], dim=2)
    x = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    x = attn.norm(x.transpose(1, 2).reshape(B, N, h * hd))
    gate = getattr(attn, "gate", None)
    if gate is not None:
        x = x * gate(x).sigmoid()
    return attn.proj_drop(attn.proj(x))


def embed(vit: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    x = vit.patch_embed(pixels)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    return vit.norm_pre(x)


def run_blocks(vit: nn.Module, x: torch.Tensor, prefixes: dict[int, Prefix] | None = None) -> torch.Tensor:
    """The blocks (prefix attention where `prefixes` has the block's index) and the final norm."""
    prefixes = prefixes or {}
    for i, blk in enumerate(vit.blocks):
        if i not in prefixes:
            x = blk(x)
            continue
        x = x + blk.drop_path1(blk.ls1(prefix_attention(blk.attn, blk.norm1(x), prefixes[i])))
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return vit.norm(x)


def prompted_tokens(vit: nn.Module, pixels: torch.Tensor, prefixes: dict[int, Prefix] | None = None,
                    prepend: torch.Tensor | None = None) -> torch.Tensor:
    """All output tokens; `prepend` (B, P, D) goes right after the [CLS] token, without position embedding."""
    x = embed(vit, pixels)
    if prepend is not None:
        n = vit.num_prefix_tokens
        x = torch.cat([x[:, :n], prepend.to(x.dtype), x[:, n:]], dim=1)
    return run_blocks(vit, x, prefixes)


def pooled(vit: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The backbone's own pooling ([CLS] or average, --vit_pool) of output tokens."""
    return vit.forward_head(tokens, pre_logits=True)


def mask_past_classes(logits: torch.Tensor, offset: int) -> torch.Tensor:
    """Logits of classes 0..offset-1 (earlier tasks) set to -inf: they get no gradient and no share of the softmax."""
    if offset <= 0:
        return logits
    return torch.cat([torch.full_like(logits[:, :offset], float("-inf")), logits[:, offset:]], dim=-1)


def orthogonal_rows(previous: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """`n` random unit rows orthogonal to each other and to the span of `previous` (k, d) — Gram–Schmidt.

    The earlier rows have been trained since they were initialised, so they are orthonormalised
    first (QR) and the new random rows are projected off that basis, then off each other."""
    d = previous.shape[1]
    if previous.shape[0] + n > d:
        raise ValueError(f"cannot make {n} rows orthogonal to {previous.shape[0]} earlier ones in {d} dimensions "
                         f"(a smaller pool, or a shorter prompt)")
    new = torch.randn(d, n, generator=generator, dtype=torch.float64)
    if previous.shape[0]:
        basis, _ = torch.linalg.qr(previous.detach().to(torch.float64).T)  # (d, k) orthonormal columns
        new = new - basis @ (basis.T @ new)
        new = new - basis @ (basis.T @ new)  # twice: classical Gram–Schmidt loses orthogonality once
    q, _ = torch.linalg.qr(new)  # orthonormal among themselves, still in the complement
    return q.T.to(previous.dtype)


class PromptApproach(Approach, metaclass=ABCMeta):
    """Frozen ViT + prompts + the engine's heads; subclasses define `prompt_features`."""

    modalities = ("image",)

    def __init__(self, backbone, seq, scenario, cfg) -> None:
        super().__init__(backbone, seq, scenario, cfg)
        check_prompt_vit(self.vit)
        self.model.backbone.requires_grad_(False)
        self.embed_dim = self.vit.embed_dim
        self.depth = len(self.vit.blocks)
        # tasks learned so far (or being learned): which slices / e-prompts inference may use; saved with the weights
        self.register_buffer("num_learned", torch.zeros((), dtype=torch.long))

    @property
    def vit(self) -> nn.Module:
        return self.model.backbone.model

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.backbone.eval()  # frozen: no dropout, the same features in the query and the prompted pass
        return self

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self.num_learned.fill_(task.id + 1)

    def parameters_to_train(self):
        # prompts and keys live on the approach, beside the model; the frozen backbone is left out
        return [p for p in self.parameters() if p.requires_grad]

    @torch.no_grad()
    def query(self, batch: dict) -> torch.Tensor:
        """q(x): the pooled feature of the frozen model without prompts."""
        vit = self.vit
        return pooled(vit, vit.forward_features(batch["pixel_values"]))

    @abstractmethod
    def prompt_features(self, batch: dict, q: torch.Tensor, task: Task | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(features for the head, auxiliary loss or None); `task` is the task being trained, None at test.

        The one hook each prompt method defines (coda_prompt.py, l2p.py, dualprompt.py); a subclass
        without it cannot be constructed (TypeError naming the method)."""

    def training_step(self, batch: dict, task: Task) -> torch.Tensor:
        features, aux = self.prompt_features(batch, self.query(batch), task)
        heads = self.model.heads
        if heads.per_task:
            loss = self.model.loss(batch, features)
        else:
            logits = heads(features)
            if self.scenario.global_labels:
                logits = mask_past_classes(logits, task.class_offset)
            loss = F.cross_entropy(logits.float(), batch["labels"])
        return loss if aux is None else loss + aux

    @torch.no_grad()
    def predict(self, batch: dict, task_id: int | None) -> torch.Tensor:
        features, _ = self.prompt_features(batch, self.query(batch), None)
        return self.model.heads(features, task_id)
