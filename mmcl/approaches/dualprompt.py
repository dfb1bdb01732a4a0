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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.approaches import APPROACHES
from mmcl.approaches.prompting import PromptApproach, parse_layers, pooled, prompted_tokens
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

    def __init__(self, backbone, seq, scenario, cfg) -> None:
        super().__init__(backbone, seq, scenario, cfg)
        o = self.opts
        self.g_layers = parse_layers(o.dualprompt_g_layers, self.depth, "dualprompt_g_layers")
        self.e_layers = parse_layers(o.dualprompt_e_layers, self.depth, "dualprompt_e_layers")
        both = set(self.g_layers) & set(self.e_layers)
        if both:
            raise ValueError(f"--dualprompt_g_layers and --dualprompt_e_layers share blocks {sorted(both)}")
        D, T = self.embed_dim, len(seq)
        gen = torch.Generator().manual_seed(cfg.seed)
        uniform = lambda *shape: nn.Parameter(torch.rand(*shape, generator=gen) * 2 - 1)  # noqa: E731
        self.g_prompt = uniform(len(self.g_layers), 2, o.dualprompt_g_length, D)
        self.e_prompts = nn.ParameterList(uniform(len(self.e_layers), 2, o.dualprompt_e_length, D) for _ in range(T))
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
        if task is not None and self.opts.dualprompt_key_lambda > 0:
            aux = self.opts.dualprompt_key_lambda * (1 - F.cosine_similarity(q, self.e_keys[task.id][None], dim=-1)).mean()
        return features, aux
