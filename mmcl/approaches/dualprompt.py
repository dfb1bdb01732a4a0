"""DualPrompt (Wang et al., ECCV 2022): a general prompt for all tasks and per-task expert prompts, frozen ViT.

G-prompt: one prefix (keys and values of --dualprompt_g_length tokens each, as in the
reference PyTorch code) per block of --dualprompt_g_layers, shared and trained by every task.
E-prompts: one per task, a prefix per block of --dualprompt_e_layers, with a key. Training
task t uses e-prompt t (the task is known while training) and pulls its key toward the
queries, λ(1 − cos(q, k_t)); at test each example takes the e-prompt whose key is closest to
its query, among the tasks learned so far. A finished task's e-prompt and key are frozen.
Classifier on the pooled ([CLS]) feature; loss CE with past-class logits masked.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.approaches import APPROACHES
from mmcl.approaches.prompting import PromptApproach, parse_layers, pooled, prompted_tokens
from mmcl.data.sequence import Task


@APPROACHES.register("dualprompt")
class DualPrompt(PromptApproach):
    name = "dualprompt"

    def __init__(self, backbone, seq, scenario, cfg) -> None:
        super().__init__(backbone, seq, scenario, cfg)
        self.g_layers = parse_layers(cfg.dualprompt_g_layers, self.depth, "dualprompt_g_layers")
        self.e_layers = parse_layers(cfg.dualprompt_e_layers, self.depth, "dualprompt_e_layers")
        both = set(self.g_layers) & set(self.e_layers)
        if both:
            raise ValueError(f"--dualprompt_g_layers and --dualprompt_e_layers share blocks {sorted(both)}")
        for flag in ("dualprompt_g_length", "dualprompt_e_length"):
            if getattr(cfg, flag) < 1:
                raise ValueError(f"--{flag} must be >= 1, got {getattr(cfg, flag)}")
        D, T = self.embed_dim, len(seq)
        gen = torch.Generator().manual_seed(cfg.seed)
        uniform = lambda *shape: nn.Parameter(torch.rand(*shape, generator=gen) * 2 - 1)  # noqa: E731
        self.g_prompt = uniform(len(self.g_layers), 2, cfg.dualprompt_g_length, D)
        self.e_prompts = nn.ParameterList(uniform(len(self.e_layers), 2, cfg.dualprompt_e_length, D) for _ in range(T))
        self.e_keys = nn.ParameterList(uniform(D) for _ in range(T))

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        for j in range(len(self.seq)):
            self.e_prompts[j].requires_grad_(j == task.id)
            self.e_keys[j].requires_grad_(j == task.id)

    def select(self, q: torch.Tensor) -> torch.Tensor:
        """Index of the e-prompt per example: the closest key among the tasks learned so far."""
        keys = torch.stack([self.e_keys[j] for j in range(max(1, int(self.num_learned)))])
        return F.cosine_similarity(q[:, None], keys[None], dim=-1).argmax(dim=-1)

    def prompt_features(self, batch, q, task):
        B = q.shape[0]
        if task is not None:
            e = self.e_prompts[task.id].expand(B, *self.e_prompts[task.id].shape)
        else:
            e = torch.stack(list(self.e_prompts))[self.select(q)]  # (B, n_e, 2, L_e, D)
        prefixes = {}
        for i, layer in enumerate(self.g_layers):
            g = self.g_prompt[i].expand(B, *self.g_prompt[i].shape)
            prefixes[layer] = (g[:, 0], g[:, 1])
        for i, layer in enumerate(self.e_layers):
            prefixes[layer] = (e[:, i, 0], e[:, i, 1])
        features = pooled(self.vit, prompted_tokens(self.vit, batch["pixel_values"], prefixes))
        aux = None
        if task is not None and self.cfg.dualprompt_key_lambda > 0:
            aux = self.cfg.dualprompt_key_lambda * (1 - F.cosine_similarity(q, self.e_keys[task.id][None], dim=-1)).mean()
        return features, aux
