"""DualPrompt (Wang et al., ECCV 2022): a general prompt for all tasks and per-task expert prompts.

On any frozen transformer encoder of mmcl/backbones/tokens.py (a ViT, a BERT-family text encoder).

G-prompt: one prefix (keys and values of --dualprompt_g_length tokens each, as in the
reference PyTorch code) per block of --dualprompt_g_layers, shared and trained by every task.
E-prompts: one per task, a prefix per block of --dualprompt_e_layers, with a key. Training
task t uses e-prompt t (the task is known while training) and pulls its key toward the
queries, λ(1 − cos(q, k_t)); at test each example takes the e-prompt whose key is closest to
its query, among the tasks learned so far. A finished task's e-prompt and key are frozen.
Classifier on the pooled ([CLS]) feature; loss CE with past-class logits masked.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.approaches import APPROACHES
from mmcl.approaches.prompting import PromptApproach, parse_layers
from mmcl.backbones.tokens import TokenEncoder
from mmcl.data.sequence import Task
from mmcl.options import Options, option


@dataclass
class DualPromptOptions(Options):
    title = "DualPrompt options"
    dualprompt_g_layers: str = option("0-1", "blocks with the shared G-prompt")
    dualprompt_g_length: int = option(5, "G-prompt prefix tokens per key and per value")
    dualprompt_e_layers: str = option("2-3", "blocks with the per-task E-prompts (paper: 2-4 of ViT-B's 12)")
    dualprompt_e_length: int = option(20, "E-prompt prefix tokens per key and per value")
    dualprompt_key_lambda: float = option(1.0, "weight of the E-key matching loss")

    def validate(self) -> None:
        for flag in ("dualprompt_g_length", "dualprompt_e_length"):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag} must be >= 1, got {getattr(self, flag)}")


@APPROACHES.register("dualprompt")
class DualPrompt(PromptApproach):
    name = "dualprompt"
    Options = DualPromptOptions

    def make_pool(self, encoder: TokenEncoder) -> nn.Module:
        o = self.opts
        p = nn.Module()
        p.g_layers = parse_layers(o.dualprompt_g_layers, encoder.num_token_layers, "dualprompt_g_layers")
        p.e_layers = parse_layers(o.dualprompt_e_layers, encoder.num_token_layers, "dualprompt_e_layers")
        both = set(p.g_layers) & set(p.e_layers)
        if both:
            raise ValueError(f"--dualprompt_g_layers and --dualprompt_e_layers share layers {sorted(both)}")
        D, T = encoder.token_dim, len(self.seq)
        gen = torch.Generator().manual_seed(self.cfg.seed)
        uniform = lambda *shape: nn.Parameter(torch.rand(*shape, generator=gen) * 2 - 1)  # noqa: E731
        p.g_prompt = uniform(len(p.g_layers), 2, o.dualprompt_g_length, D)
        p.e_prompts = nn.ParameterList(uniform(len(p.e_layers), 2, o.dualprompt_e_length, D) for _ in range(T))
        p.e_keys = nn.ParameterList(uniform(D) for _ in range(T))
        return p

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        for pool in self.pools.values():
            for j in range(len(self.seq)):
                pool.e_prompts[j].requires_grad_(j == task.id)
                pool.e_keys[j].requires_grad_(j == task.id)

    def select(self, q: torch.Tensor, pool: nn.Module) -> torch.Tensor:
        """Index of the e-prompt per example: the closest key among the tasks learned so far."""
        keys = torch.stack([pool.e_keys[j] for j in range(max(1, int(self.num_learned)))])
        return F.cosine_similarity(q[:, None], keys[None], dim=-1).argmax(dim=-1)

    def prompt_features(self, batch, q, task):
        pool = self.pools[self.modality(batch)]
        B = q.shape[0]
        if task is not None:
            e = pool.e_prompts[task.id].expand(B, *pool.e_prompts[task.id].shape)
        else:
            e = torch.stack(list(pool.e_prompts))[self.select(q, pool)]  # (B, n_e, 2, L_e, D)
        prefixes = {}
        for i, layer in enumerate(pool.g_layers):
            g = pool.g_prompt[i].expand(B, *pool.g_prompt[i].shape)
            prefixes[layer] = (g[:, 0], g[:, 1])
        for i, layer in enumerate(pool.e_layers):
            prefixes[layer] = (e[:, i, 0], e[:, i, 1])
        features = self.prefixed_features(batch, prefixes)
        aux = None
        if task is not None and self.opts.dualprompt_key_lambda > 0:
            match = F.cosine_similarity(q, pool.e_keys[task.id][None], dim=-1)
            aux = self.opts.dualprompt_key_lambda * (1 - match).mean()
        return features, aux
