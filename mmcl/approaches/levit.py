"""LEViT, a lifelong expansible vision transformer for task-free online learning (Ye & Bors): a
mixture of small ViT experts that grows by itself, with VAE novelty scores and dynamic knowledge
fusion. Runs in `--scenario online` only (no task ids, no boundaries).

A component = a ViT expert (patch embedding of --levit_embed_dim, default 100, patch
--levit_patch_size, default a quarter of the side: 7 on 28 px as in the paper, 2 on 8 px; one
pre-norm multi-head attention block with an MLP of --levit_mlp_dim, default 200; a class token)
+ a classifier over all classes of the sequence + a VAE (MLP, --levit_vae_hidden units, latent
--levit_latent_dim, default 50 as in the paper for MNIST) whose loss scores how familiar an input is.
VAE loss = negative ELBO per input dimension: Bernoulli reconstruction of the pixels rescaled to
[0, 1] plus the KL term, divided by the number of pixels (so gamma does not scale with image size);
training samples z, scoring uses the posterior mean (deterministic scores).

The stream, per incoming batch of --online_batch_size:
  1. the current (last, unfrozen) component takes --online_iters Adam steps on the incoming batch
     plus --replay_batch_size examples from the short-term memory (cross-entropy + its VAE loss);
  2. the batch enters the FIFO short-term memory of --memory_size examples (paper: 2000 for MNIST);
  3. each time the memory holds --memory_size examples that arrived since the last check (it is full
     of fresh data): the current component is frozen; the novelty score s = the smallest VAE loss,
     over all frozen components, averaged over the memory; if s > gamma (--levit_gamma, defaults
     per task sequence in tasks/*.yaml) a new component is created and becomes the current one.
     Otherwise no component trains until a later memory is novel: a frozen expert already knows it.
The memory is not emptied at a check: FIFO replaces all of it before the next check (the paper's
clear-and-refill schedule), while a new component can train on the examples that triggered it.
Growth stops at --levit_max_experts.

Dynamic knowledge fusion: component j's classifier reads sum_k w_k f_k over the features f_k of the
frozen experts k < j and its own f_j, w = softmax of j's learned gate logits (j + 1 of them, zero at
creation: an even mix); the frozen experts' features get no gradient.
Inference: each input goes to the component whose VAE loss on it is smallest (the paper's
selection) among those that have trained (one created at the stream's last check has a random VAE);
that component's (fused) logits are the prediction.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.approaches import APPROACHES
from mmcl.approaches.online import OnlineApproach, OnlineReplayOptions, StreamMemory, image_shape
from mmcl.options import option, positive


class ViTExpert(nn.Module):
    """Patch embedding, class token and positions, one pre-norm attention block with an MLP."""

    def __init__(self, shape: tuple[int, int, int], patch: int, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        c, h, w = shape
        if h % patch or w % patch:
            raise ValueError(f"--levit_patch_size {patch} does not divide the image size {h}x{w}")
        self.embed = nn.Conv2d(c, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (h // patch) * (w // patch) + 1, dim) * 0.02)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1) + self.pos
        h = self.norm1(tokens)
        tokens = tokens + self.attn(h, h, h, need_weights=False)[0]
        tokens = tokens + self.mlp(self.norm2(tokens))
        return self.norm(tokens[:, 0])


class VAE(nn.Module):
    def __init__(self, dim_in: int, hidden: int, latent: int) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(dim_in, hidden), nn.ReLU())
        self.mu = nn.Linear(hidden, latent)
        self.logvar = nn.Linear(hidden, latent)
        self.dec = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, dim_in))

    def loss(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """Negative ELBO per input dimension, one value per example; x in [-1, 1]."""
        flat = x.flatten(1).float()
        target = ((flat + 1) / 2).clamp(0, 1)
        h = self.enc(flat)
        mu, logvar = self.mu(h), self.logvar(h).clamp(-10, 10)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if sample else mu
        rec = F.binary_cross_entropy_with_logits(self.dec(z), target, reduction="none").sum(1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        return (rec + kl) / flat.shape[1]


class Component(nn.Module):
    """Expert + classifier + VAE + the gate over the features of the `num_prior` earlier experts and its own."""

    def __init__(self, opts, shape: tuple[int, int, int], num_classes: int, num_prior: int) -> None:
        super().__init__()
        patch = opts.levit_patch_size or max(1, shape[1] // 4)
        self.expert = ViTExpert(shape, patch, opts.levit_embed_dim, opts.levit_heads, opts.levit_mlp_dim)
        self.vae = VAE(shape[0] * shape[1] * shape[2], opts.levit_vae_hidden, opts.levit_latent_dim)
        self.gate = nn.Parameter(torch.zeros(num_prior + 1))
        self.classifier = nn.Linear(opts.levit_embed_dim, num_classes)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # optimiser steps taken (saved)

    def gate_weights(self) -> torch.Tensor:
        return self.gate.softmax(0)

    def logits(self, features: list[torch.Tensor]) -> torch.Tensor:
        """`features`: the raw features of experts 0..j (this one last)."""
        w = self.gate_weights()
        fused = sum(w[k] * f for k, f in enumerate(features))
        return self.classifier(fused)


class LEViTModel(nn.Module):
    def __init__(self, opts, shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        self.opts, self.shape, self.num_classes = opts, shape, num_classes
        self.components = nn.ModuleList()

    def add_component(self, device: torch.device | None = None) -> Component:
        comp = Component(self.opts, self.shape, self.num_classes, num_prior=len(self.components))
        self.components.append(comp.to(device) if device is not None else comp)
        return comp

    def expert_features(self, x: torch.Tensor, trainable: int | None = None) -> list[torch.Tensor]:
        """Every expert's features; only component `trainable`'s carry gradients."""
        feats = []
        for j, comp in enumerate(self.components):
            if j == trainable:
                feats.append(comp.expert(x))
            else:
                with torch.no_grad():
                    feats.append(comp.expert(x))
        return feats

    @torch.no_grad()
    def vae_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K): each component's VAE loss on each input (posterior mean)."""
        return torch.stack([comp.vae.loss(x, sample=False) for comp in self.components], dim=1)

    @torch.no_grad()
    def forward(self, batch: dict) -> torch.Tensor:
        x = batch["pixel_values"]
        feats = self.expert_features(x)
        logits = torch.stack([comp.logits(feats[: j + 1]) for j, comp in enumerate(self.components)], dim=1)
        scores = self.vae_scores(x)
        # a component created at the last check and not trained yet has a random VAE: it must not take inputs
        untrained = torch.tensor([int(c.steps) == 0 for c in self.components], device=x.device)
        if not untrained.all():
            scores[:, untrained] = float("inf")
        route = scores.argmin(1)
        return logits[torch.arange(len(x), device=x.device), route]


@dataclass
class LEViTOptions(OnlineReplayOptions):
    title = "LEViT options"
    levit_gamma: float = option(0.6, "expansion threshold on the VAE loss (per task sequence in tasks/*.yaml)")
    levit_embed_dim: int = option(100, "expert width (paper: 100)")
    levit_patch_size: int | None = option(None, "expert patch side (default: a quarter of the image side; paper: "
                                                "7 on 28 px)")
    levit_heads: int = option(4, "expert attention heads")
    levit_mlp_dim: int = option(200, "the expert's FC layer (paper: 200)")
    levit_latent_dim: int = option(50, "VAE latent size (paper: 50 for MNIST)")
    levit_vae_hidden: int = option(400, "VAE hidden width")
    levit_max_experts: int = option(20, "growth stops here (a low gamma would otherwise add one per memory fill)")

    def validate(self) -> None:
        super().validate()
        positive(self, "levit_embed_dim", "levit_heads", "levit_mlp_dim", "levit_latent_dim", "levit_vae_hidden",
                 "levit_max_experts")
        if self.levit_gamma < 0:
            raise ValueError(f"--levit_gamma must be >= 0, got {self.levit_gamma}")
        if self.levit_embed_dim % self.levit_heads:
            raise ValueError(f"--levit_embed_dim {self.levit_embed_dim} must be divisible by --levit_heads "
                             f"{self.levit_heads}")
        if self.memory_size <= 0:
            raise ValueError("--baseline levit needs --memory_size > 0 (its short-term memory)")


@APPROACHES.register("levit", aliases=("lifelong_vit",))
class LEViT(OnlineApproach):
    name = "levit"
    uses_memory = True
    Options = LEViTOptions

    def __init__(self, backbone, seq, scenario, cfg) -> None:
        super().__init__(backbone, seq, scenario, cfg)
        self.memory = StreamMemory(self.opts.memory_size, self.input_shape, "fifo", seed=cfg.seed)
        self.current = True  # the last component trains
        self.last_check = 0  # stream position of the last expansion check
        self.created_at: list[int] = [0]  # stream position where each component was created
        self.checks: list[dict[str, Any]] = []  # every expansion check: position, score, expanded

    def build_model(self, backbone) -> nn.Module:
        model = LEViTModel(self.opts, image_shape(backbone), self.seq.total_classes)
        model.add_component()
        return model

    @property
    def components(self) -> nn.ModuleList:
        return self.model.components

    def parameters_to_train(self):
        return list(self.components[-1].parameters()) if self.current else []

    def component_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        j = len(self.components) - 1
        comp = self.components[j]
        feats = self.model.expert_features(x, trainable=j)
        return F.cross_entropy(comp.logits(feats).float(), y) + comp.vae.loss(x).mean()

    def observe(self, batch: dict) -> float | None:
        x, y = batch["pixel_values"], batch["labels"]
        loss = None
        if self.current:
            step = self.stepper()
            for k in range(self.opts.online_iters):
                mem = self.memory.sample(self.opts.replay_batch_size)
                bx, by = (torch.cat([x, mem[0]]), torch.cat([y, mem[1]])) if mem is not None else (x, y)
                with self.autocast():
                    loss = self.component_loss(bx, by)
                step(loss, {"expert": len(self.components) - 1, "iteration": f"{k + 1} of {self.opts.online_iters}"})
                self.components[-1].steps += 1
        self.memory.add(x, y)
        if self.memory.full and int(self.memory.seen) - self.last_check >= self.memory.size:
            with self.autocast():
                self.check_expansion()
        return None if loss is None else float(loss.detach())

    def freeze_current(self) -> None:
        if self.current:
            self.components[-1].requires_grad_(False)
            self.current = False
            self.reset_optimizer()

    @torch.no_grad()
    def novelty(self) -> float:
        """The smallest mean VAE loss on the memory over the frozen components (inf when none)."""
        frozen = self.components if not self.current else self.components[:-1]
        if not len(frozen):
            return float("inf")
        x, _ = self.memory.contents()
        return min(float(torch.cat([c.vae.loss(x[i:i + 256], sample=False)
                                    for i in range(0, len(x), 256)]).mean()) for c in frozen)

    def check_expansion(self) -> None:
        self.last_check = int(self.memory.seen)
        self.freeze_current()
        score = self.novelty()
        expand = score > self.opts.levit_gamma and len(self.components) < self.opts.levit_max_experts
        if expand:
            self.model.add_component(self.device)
            self.current = True
            self.created_at.append(self.last_check)
            self.reset_optimizer()
        self.checks.append({"position": self.last_check, "score": round(score, 5), "expanded": expand})

    def stream_stats(self) -> dict[str, Any]:
        """For the log after each hidden segment: the size of the mixture and the checks made since the last call."""
        new, self._reported = self.checks[getattr(self, "_reported", 0):], len(self.checks)
        return {"experts": len(self.components), "current": self.current, "memory": len(self.memory),
                "seen": int(self.memory.seen), "checks": new}

    # -- checkpoints: the number of components is rebuilt before the weights load ------------------
    def extra_state(self) -> dict[str, Any]:
        return {"experts": len(self.components), "current": self.current, "last_check": self.last_check,
                "created_at": self.created_at, "checks": self.checks}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        while len(self.components) < state["experts"]:
            self.model.add_component(self.device)
        self.current = bool(state["current"])
        for j, comp in enumerate(self.components):
            comp.requires_grad_(self.current and j == len(self.components) - 1)
        self.last_check = int(state["last_check"])
        self.created_at = list(state["created_at"])
        self.checks = list(state["checks"])
        self.reset_optimizer()
