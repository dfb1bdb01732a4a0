"""L2P, Learning to Prompt (Wang et al., CVPR 2022): a shared prompt pool with query–key matching.

On any frozen transformer encoder of mmcl/backbones/tokens.py (a ViT, a BERT-family text encoder).

A pool of N prompts (length L_p each) with keys k_i. The query q (the frozen encoder's pooled
feature without prompts) picks the top-k keys by cosine similarity; the k selected prompts
are prepended to the input tokens (prompt tuning, after [CLS]) and the classifier reads
the mean of the prompt tokens' outputs, as in the paper. The surrogate loss
λ Σ_selected (1 − cos(q, k_i)) pulls the chosen keys toward the queries that chose them
(q carries no gradient). The whole pool is shared and trained by every task; forgetting is
held off by the frozen backbone, the key matching and the masked past-class logits. The
optional diversity-by-frequency penalty of the paper is not implemented.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.approaches import APPROACHES
from mmcl.approaches.prompting import PromptApproach
from mmcl.backbones.tokens import TokenEncoder
from mmcl.options import Options, option


@dataclass
class L2POptions(Options):
    title = "L2P options"
    l2p_pool_size: int = option(10, "prompts in the pool")
    l2p_length: int = option(5, "tokens per prompt")
    l2p_top_k: int = option(5, "prompts chosen per example")
    l2p_key_lambda: float = option(0.1, "weight of the key-matching (surrogate) loss")

    def validate(self) -> None:
        if not 1 <= self.l2p_top_k <= self.l2p_pool_size:
            raise ValueError(f"--l2p_top_k must be in 1..--l2p_pool_size ({self.l2p_pool_size}), got {self.l2p_top_k}")
        if self.l2p_length < 1:
            raise ValueError(f"--l2p_length must be >= 1, got {self.l2p_length}")


@APPROACHES.register("l2p")
class L2P(PromptApproach):
    name = "l2p"
    Options = L2POptions

    requires = ("tokens", "insert")  # prompt tuning: tokens after [CLS], not inside the attention

    def make_pool(self, encoder: TokenEncoder) -> nn.Module:
        pool, length, D = self.opts.l2p_pool_size, self.opts.l2p_length, encoder.token_dim
        gen = torch.Generator().manual_seed(self.cfg.seed)
        p = nn.Module()
        # the reference implementation's uniform(-1, 1) initialisation of prompts and keys
        p.prompts = nn.Parameter(torch.rand(pool, length, D, generator=gen) * 2 - 1)
        p.prompt_keys = nn.Parameter(torch.rand(pool, D, generator=gen) * 2 - 1)
        return p

    def select(self, q: torch.Tensor, pool: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices (B, k) of the top-k prompts, their cosine similarities (B, k))."""
        sim = F.cosine_similarity(q[:, None], pool.prompt_keys[None], dim=-1)  # (B, N)
        top = sim.topk(self.opts.l2p_top_k, dim=-1)
        return top.indices, top.values

    def prompt_features(self, batch, q, task):
        m = self.modality(batch)
        enc, pool = self.encoders[m], self.pools[m]
        idx, sim = self.select(q, pool)
        chosen = pool.prompts[idx].reshape(q.shape[0], -1, enc.token_dim)  # (B, k * L_p, D)
        tokens, _ = enc.encode_tokens(batch, insert=chosen)
        n = enc.lead_tokens
        features = self.model.backbone.from_tower(m, tokens[:, n : n + chosen.shape[1]].mean(dim=1))
        aux = None
        if task is not None and self.opts.l2p_key_lambda > 0:
            aux = self.opts.l2p_key_lambda * (1 - sim).sum(dim=1).mean()
        return features, aux
