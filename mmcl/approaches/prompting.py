"""Prompting a frozen transformer encoder: what CODA-Prompt, L2P and DualPrompt share, for any modality.

The encoder is any `TokenEncoder` backbone (mmcl/backbones/tokens.py: a timm `vit`, `bert_frozen`,
`bert`, a Hugging Face BERT-family id), which says how to run its layers with a prefix (extra keys and
values concatenated inside self-attention after the key/value projections, so the prompt changes what
every token attends to without adding output tokens: CODA-Prompt, DualPrompt) or with extra tokens after
its lead [CLS] token (L2P's prompt tuning; padding is masked, prompt and prefix positions never are).
The query of all three methods is the pooled feature of a prompt-free pass of the same frozen encoder,
under no_grad.

On a backbone with one tower per modality (`dual`) every tower gets its own prompt pool (the pools live
in `self.pools`, keyed by modality); a prompted tower's pooled feature then goes through the backbone's
own (frozen) projection into the shared feature space, where the heads are.

`PromptApproach` holds what the three methods share: the frozen backbone (no gradients, kept in eval
mode), the query pass, and the class-incremental loss with the logits of past tasks' classes masked to
-inf (the current task's classes compete only with each other, so the head of earlier classes is not
pushed down: CODA-Prompt, L2P and DualPrompt all do this).
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.approaches.base import Approach
from mmcl.backbones.tokens import Prefix, TokenEncoder, token_encoder
from mmcl.data.sequence import Task
from mmcl.feature_cache import FeatureCache


def parse_layers(text: str, depth: int, flag: str) -> list[int]:
    """'0,1,2' or '0-2' -> [0, 1, 2]; each index must name one of the encoder's `depth` layers."""
    layers: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        try:
            lo, _, hi = part.partition("-")
            layers.extend(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise ValueError(f"--{flag} must be layer indices like '0,1,2' or '0-2', got '{text}'") from None
    if not layers:
        raise ValueError(f"--{flag} names no layer, got '{text}'")
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise ValueError(f"--{flag}: layers {bad} do not exist; the encoder has {depth} layers (0..{depth - 1}; "
                         f"a vit's depth is --vit_depth)")
    return sorted(set(layers))


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
    """Frozen encoder + prompts + the engine's heads; subclasses define `make_pool` and `prompt_features`."""

    modalities = ("text", "image")
    # prefix tuning puts prompts inside self-attention (not possible in convit's gated attention); L2P's prompt
    # tuning requires ("tokens", "insert") instead. The encoders are checked against this at construction.
    requires: tuple[str, ...] = ("prefix",)
    tower_use = "each"  # on `dual`, a prompt pool per tower

    def __init__(self, backbone, seq, scenario, cfg) -> None:
        super().__init__(backbone, seq, scenario, cfg)
        self.model.backbone.requires_grad_(False)
        towers = backbone.towers_by_modality()
        tower_flags = {"text": "--text_backbone", "image": "--vision_backbone"}
        self.encoders: dict[str, TokenEncoder] = {
            m: token_encoder(enc, "--backbone" if enc is backbone else tower_flags[m],
                             prefix="prefix" in self.requires, insert="insert" in self.requires)
            for m, enc in towers.items()}
        self.pools = nn.ModuleDict({m: self.make_pool(enc) for m, enc in self.encoders.items()})
        # tasks learned so far (or being learned): which slices / e-prompts inference may use; saved with the weights
        self.register_buffer("num_learned", torch.zeros((), dtype=torch.long))
        self.query_cache = FeatureCache()

    @property
    def pool(self) -> nn.Module:
        """The prompt pool of a one-encoder backbone."""
        if len(self.pools) != 1:
            raise ValueError(f"the backbone has one prompt pool per modality ({', '.join(self.pools)}): "
                             "use self.pools[modality]")
        return next(iter(self.pools.values()))

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

    def modality(self, batch: dict) -> str:
        return self.model.backbone.batch_modality(batch)

    @torch.no_grad()
    def query(self, batch: dict) -> torch.Tensor:
        """q(x): the pooled feature of the batch's frozen encoder without prompts, computed once per example
        (mmcl/feature_cache.py: the encoder never changes)."""
        encoder = self.encoders[self.modality(batch)]
        return self.query_cache(encoder, batch, lambda: encoder(batch))

    def prefixed_features(self, batch: dict, prefixes: dict[int, Prefix]) -> torch.Tensor:
        """The backbone's features of a pass with prefixes in the given layers (CODA-Prompt, DualPrompt)."""
        m = self.modality(batch)
        enc = self.encoders[m]
        return self.model.backbone.from_tower(m, enc.pool_tokens(*enc.encode_tokens(batch, prefixes)))

    @abstractmethod
    def make_pool(self, encoder: TokenEncoder) -> nn.Module:
        """The method's prompt parameters for one encoder (sized by its `token_dim`, `num_token_layers`)."""

    @abstractmethod
    def prompt_features(self, batch: dict, q: torch.Tensor, task: Task | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(features for the head, auxiliary loss or None); `task` is the task being trained, None at test.

        The hook each prompt method defines (coda_prompt.py, l2p.py, dualprompt.py) with `make_pool`; a
        subclass without them cannot be constructed (TypeError naming the method)."""

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
