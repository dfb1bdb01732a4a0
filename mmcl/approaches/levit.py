"""LEViT, a lifelong expansible vision transformer for task-free online learning (Ye & Bors): a
mixture of small ViT components that grows by itself when the stream brings data unlike what the
learned components model, with Dynamic Knowledge Fusion (DKF) inside attention. Runs in
`--scenario online` only (no task ids, no boundaries). Our copy of the paper lacks its equations;
the reading below is documented in docs/online.md (section "LEViT: the reading we implement").

Default (the paper's statements):
- a shared backbone (patch embedding of --levit_patch_size, 7 on 28 px, width --levit_embed_dim 100,
  and positions) turns an image into patch tokens; it trains with the first component only, until
  the first expansion, and is frozen from then on;
- a component = a learned token + one multi-head attention module + an MLP of --levit_mlp_dim (100)
  + a classifier over all classes of the sequence, and a VAE on the pixels (encoder and decoder of
  --levit_vae_layers 2 FC layers of --levit_vae_hidden 200 units, latent --levit_latent_dim 50,
  KL weight --levit_beta 0.5);
- DKF (--levit_fusion dkf): component j's sequence is [its token, the tokens of components 0..j-1,
  the patch tokens]; its attention output is a learned softmax-gated sum of its own attention module
  and every earlier component's (frozen) module, all applied to that sequence: capacity grows with
  every component and the gate chooses what to transfer. `fixed` keeps the reuse with even,
  unlearned weights (LEViT-DKF-Fixed); `none` uses the component's own token and module alone
  (LEViT-No-DKF); `output` is our earlier variant: each component a whole ViT expert (its own patch
  embedding, no shared backbone) and the gate mixes the experts' features before the classifier;
- novelty (--levit_novelty latent): each time the FIFO memory of --memory_size examples is full of
  examples that arrived since the last check, the memory is encoded by every frozen component's VAE
  encoder; the aggregate posterior is fitted with a diagonal Gaussian and compared, by the symmetric
  KL divergence (summed over latent dimensions), with the Gaussian fit of the data that component
  was frozen on (its reference, kept as buffers). The smallest distance over the frozen components
  is the novelty; above --levit_gamma the current component has learned novel information: it is
  frozen (its reference taken on the memory it has just learned) and a new component is created.
  Otherwise the current component keeps training. The first check always expands (no learned
  component to compare with). `elbo` is our earlier rule: at every check the current component is
  frozen; a new one is created if the smallest per-pixel VAE loss of all components on the memory
  exceeds gamma, otherwise nothing trains until a later memory is novel.

Training: per incoming batch of --online_batch_size, --online_iters Adam steps (lr --levit_lr, paper
1e-4) of the current component on the batch plus --replay_batch_size memory examples
(cross-entropy + its VAE loss); the batch then enters the memory. Growth stops at --levit_max_experts.
Inference: each input goes to the trained component whose VAE loss on it is smallest.
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

FUSIONS = ("dkf", "fixed", "none", "output")
NOVELTIES = ("latent", "elbo")


def patch_of(opts, shape: tuple[int, int, int]) -> int:
    patch = opts.levit_patch_size or max(1, shape[1] // 4)
    if shape[1] % patch or shape[2] % patch:
        raise ValueError(f"--levit_patch_size {patch} does not divide the image size {shape[1]}x{shape[2]}")
    return patch


def mlp(dim: int, hidden: int) -> nn.Sequential:
    """The component's MLP: one hidden FC layer (paper: 100 units on MNIST)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class PatchEmbedding(nn.Module):
    """Image -> patch tokens with positions: LEViT's shared backbone (or an `output` expert's own)."""

    def __init__(self, shape: tuple[int, int, int], patch: int, dim: int) -> None:
        super().__init__()
        c, h, w = shape
        self.proj = nn.Conv2d(c, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (h // patch) * (w // patch), dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos


class VAE(nn.Module):
    """MLP VAE on the pixels: `layers` FC layers of `hidden` units in the encoder and in the decoder."""

    def __init__(self, dim_in: int, hidden: int, latent: int, layers: int = 2, beta: float = 1.0) -> None:
        super().__init__()
        self.beta = beta

        def stack(first: int) -> list[nn.Module]:
            out: list[nn.Module] = [nn.Linear(first, hidden), nn.ReLU()]
            for _ in range(layers - 1):
                out += [nn.Linear(hidden, hidden), nn.ReLU()]
            return out

        self.enc = nn.Sequential(*stack(dim_in))
        self.mu = nn.Linear(hidden, latent)
        self.logvar = nn.Linear(hidden, latent)
        self.dec = nn.Sequential(*stack(latent), nn.Linear(hidden, dim_in))

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.enc(x.flatten(1).float())
        return self.mu(h), self.logvar(h).clamp(-10, 10)

    def loss(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """(Reconstruction + beta x KL) per input dimension, one value per example; x in [-1, 1]
        (Bernoulli on the pixels rescaled to [0, 1]; divided by the pixels so gamma of the `elbo` rule
        does not scale with the image size). Scoring (`sample=False`) decodes the posterior mean."""
        flat = x.flatten(1).float()
        target = ((flat + 1) / 2).clamp(0, 1)
        mu, logvar = self.posterior(flat)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if sample else mu
        rec = F.binary_cross_entropy_with_logits(self.dec(z), target, reduction="none").sum(1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        return (rec + self.beta * kl) / flat.shape[1]

    @torch.no_grad()
    def latent_fit(self, x: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance per latent dimension of the aggregate posterior of `x` (the mixture of the
        examples' Gaussian posteriors, moment-matched by one diagonal Gaussian)."""
        mus, vars_ = zip(*[(m, lv.exp()) for m, lv in (self.posterior(x[i:i + chunk]) for i in range(0, len(x), chunk))])
        mu, var = torch.cat(mus).float(), torch.cat(vars_).float()
        return mu.mean(0), var.mean(0) + mu.var(0, unbiased=False)


def symmetric_kl(m1: torch.Tensor, v1: torch.Tensor, m2: torch.Tensor, v2: torch.Tensor) -> float:
    """(KL(N1 || N2) + KL(N2 || N1)) / 2 between diagonal Gaussians, summed over dimensions."""
    v1, v2 = v1.clamp_min(1e-6), v2.clamp_min(1e-6)
    d2 = (m1 - m2).pow(2)
    return float(0.25 * ((v1 + d2) / v2 + (v2 + d2) / v1 - 2).sum())


class Component(nn.Module):
    """What every component has: a classifier, a VAE, its latent reference, its step count, a gate."""

    def __init__(self, opts, shape: tuple[int, int, int], num_classes: int, num_prior: int) -> None:
        super().__init__()
        self.fusion = opts.levit_fusion
        self.num_prior = num_prior
        self.vae = VAE(shape[0] * shape[1] * shape[2], opts.levit_vae_hidden, opts.levit_latent_dim,
                       opts.levit_vae_layers, opts.levit_beta)
        self.classifier = nn.Linear(opts.levit_embed_dim, num_classes)
        # DKF's gate over the earlier components' modules and its own (own last); zero logits: an even mix
        self.gate = nn.Parameter(torch.zeros(num_prior + 1), requires_grad=self.fusion in ("dkf", "output"))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # optimiser steps taken (saved)
        # the Gaussian fit of the latent codes of the data this component was frozen on (novelty `latent`)
        self.register_buffer("ref_mean", torch.zeros(opts.levit_latent_dim))
        self.register_buffer("ref_var", torch.ones(opts.levit_latent_dim))
        self.register_buffer("has_ref", torch.zeros((), dtype=torch.bool))

    def gate_weights(self) -> torch.Tensor:
        if self.fusion == "fixed":  # LEViT-DKF-Fixed: the same even weights, never learned
            return torch.full_like(self.gate, 1.0 / len(self.gate))
        return self.gate.softmax(0)

    def set_trainable(self, on: bool) -> None:
        self.requires_grad_(on)
        if self.fusion in ("fixed", "none"):  # their gate is never used or never learned
            self.gate.requires_grad_(False)


class FusedComponent(Component):
    """A token, an attention block and an MLP over the shared backbone's patch tokens (fusion dkf, fixed, none)."""

    def __init__(self, opts, shape: tuple[int, int, int], num_classes: int, num_prior: int) -> None:
        super().__init__(opts, shape, num_classes, num_prior)
        dim = opts.levit_embed_dim
        self.token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, opts.levit_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp(dim, opts.levit_mlp_dim)
        self.norm = nn.LayerNorm(dim)

    def logits(self, patches: torch.Tensor, prior: list["FusedComponent"]) -> torch.Tensor:
        """`patches`: the shared backbone's tokens; `prior`: components 0..j-1 (frozen)."""
        reuse = prior if self.fusion in ("dkf", "fixed") else []
        b = len(patches)
        tokens = [c.token.expand(b, -1, -1) for c in [self] + reuse]  # own token first: it is read out
        seq = torch.cat(tokens + [patches], dim=1)
        h = self.norm1(seq)
        # the earlier modules are applied to this component's sequence: their weights take no gradient,
        # this component's token, norm and gate do through them
        outs = [c.attn(h, h, h, need_weights=False)[0] for c in reuse] + [self.attn(h, h, h, need_weights=False)[0]]
        if reuse:
            w = self.gate_weights()
            fused = sum(w[k] * o for k, o in enumerate(outs))
        else:
            fused = outs[-1]
        seq = seq + fused
        seq = seq + self.mlp(self.norm2(seq))
        return self.classifier(self.norm(seq[:, 0]))


class ViTExpert(nn.Module):
    """`output` fusion: a whole ViT of its own (patch embedding, class token, one pre-norm block)."""

    def __init__(self, shape: tuple[int, int, int], patch: int, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.embed = PatchEmbedding(shape, patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp(dim, mlp_dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), self.embed(x)], dim=1)
        h = self.norm1(tokens)
        tokens = tokens + self.attn(h, h, h, need_weights=False)[0]
        tokens = tokens + self.mlp(self.norm2(tokens))
        return self.norm(tokens[:, 0])


class OutputComponent(Component):
    """`output` fusion: its classifier reads a gated sum of the experts' features (earlier ones frozen)."""

    def __init__(self, opts, shape: tuple[int, int, int], num_classes: int, num_prior: int) -> None:
        super().__init__(opts, shape, num_classes, num_prior)
        self.expert = ViTExpert(shape, patch_of(opts, shape), opts.levit_embed_dim, opts.levit_heads,
                                opts.levit_mlp_dim)

    def fuse(self, features: list[torch.Tensor]) -> torch.Tensor:
        """`features`: the features of experts 0..j (this one last)."""
        w = self.gate_weights()
        return self.classifier(sum(w[k] * f for k, f in enumerate(features)))


class LEViTModel(nn.Module):
    """The components, and the shared backbone they read (fusion dkf, fixed, none; `output` has none)."""

    def __init__(self, opts, shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        self.opts, self.shape, self.num_classes = opts, shape, num_classes
        self.fused = opts.levit_fusion != "output"
        self.shared = PatchEmbedding(shape, patch_of(opts, shape), opts.levit_embed_dim) if self.fused else None
        self.components = nn.ModuleList()

    def add_component(self, device: torch.device | None = None) -> Component:
        cls = FusedComponent if self.fused else OutputComponent
        comp = cls(self.opts, self.shape, self.num_classes, num_prior=len(self.components))
        self.components.append(comp.to(device) if device is not None else comp)
        return comp

    def component_logits(self, x: torch.Tensor, j: int) -> torch.Tensor:
        """Component j's logits; gradients reach only what requires them (the trainable parts)."""
        comps = list(self.components)
        if self.fused:
            return comps[j].logits(self.shared(x), comps[:j])
        feats = []
        for k, comp in enumerate(comps[: j + 1]):
            if k == j:
                feats.append(comp.expert(x))
            else:
                with torch.no_grad():  # a frozen expert's features are constants to the gate and classifier
                    feats.append(comp.expert(x))
        return comps[j].fuse(feats)

    def all_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, classes): every component's logits."""
        if self.fused:
            patches = self.shared(x)
            comps = list(self.components)
            return torch.stack([c.logits(patches, comps[:j]) for j, c in enumerate(comps)], dim=1)
        feats = [c.expert(x) for c in self.components]
        return torch.stack([c.fuse(feats[: j + 1]) for j, c in enumerate(self.components)], dim=1)

    @torch.no_grad()
    def vae_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K): each component's VAE loss on each input (posterior mean)."""
        return torch.stack([comp.vae.loss(x, sample=False) for comp in self.components], dim=1)

    @torch.no_grad()
    def forward(self, batch: dict) -> torch.Tensor:
        x = batch["pixel_values"]
        logits = self.all_logits(x)
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
    levit_novelty: str = option("latent", "expansion rule: latent (the paper's: a distance in each frozen VAE's "
                                          "latent space between the memory and what that component learned) | elbo "
                                          "(our earlier rule: the smallest per-pixel VAE loss on the memory)")
    levit_fusion: str = option("dkf", "dkf (the paper's: earlier tokens and attention modules reused inside "
                                      "attention, learned gate) | fixed (LEViT-DKF-Fixed: even, unlearned weights) | "
                                      "none (LEViT-No-DKF) | output (our earlier variant: whole experts, gate on "
                                      "their features at the classifier)")
    levit_gamma: float = option(0.6, "expansion threshold on the novelty (per task sequence in tasks/*.yaml; its "
                                     "scale depends on --levit_novelty)")
    levit_lr: float | None = option(1e-4, "Adam learning rate of the components (paper: 1e-4); unset: "
                                          "--learning_rate")
    levit_embed_dim: int = option(100, "token width (paper: 100)")
    levit_patch_size: int | None = option(None, "patch side (default: a quarter of the image side; paper: 7 on 28 px)")
    levit_heads: int = option(4, "attention heads")
    levit_mlp_dim: int = option(100, "the component's FC layer (paper: 100 units on MNIST)")
    levit_latent_dim: int = option(50, "VAE latent size (paper: 50 for MNIST)")
    levit_vae_hidden: int = option(200, "VAE hidden width (paper: 200 on MNIST)")
    levit_vae_layers: int = option(2, "FC layers in the VAE's encoder and in its decoder (paper: 2 on MNIST)")
    levit_beta: float = option(0.5, "weight of the VAE's KL term (paper: beta 0.5)")
    levit_max_experts: int = option(20, "growth stops here (a low gamma would otherwise add one per memory fill)")

    def validate(self) -> None:
        super().validate()
        positive(self, "levit_embed_dim", "levit_heads", "levit_mlp_dim", "levit_latent_dim", "levit_vae_hidden",
                 "levit_vae_layers", "levit_max_experts")
        if self.levit_novelty not in NOVELTIES:
            raise ValueError(f"--levit_novelty must be one of {', '.join(NOVELTIES)}, got '{self.levit_novelty}'")
        if self.levit_fusion not in FUSIONS:
            raise ValueError(f"--levit_fusion must be one of {', '.join(FUSIONS)}, got '{self.levit_fusion}'")
        if self.levit_gamma < 0:
            raise ValueError(f"--levit_gamma must be >= 0, got {self.levit_gamma}")
        if self.levit_beta < 0:
            raise ValueError(f"--levit_beta must be >= 0, got {self.levit_beta}")
        if self.levit_lr is not None and not self.levit_lr > 0:
            raise ValueError(f"--levit_lr must be > 0, got {self.levit_lr}")
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
    # it builds its own model from the image shape (the --backbone is not used)
    why_not = {"text": "LEViT's VAEs score pixels (its novelty test is a likelihood of images)"}

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

    @property
    def shared_trains(self) -> bool:
        """The shared backbone learns with the first component only, until it is frozen (the first expansion)."""
        return self.model.shared is not None and self.current and len(self.components) == 1

    def parameters_to_train(self):
        if not self.current:
            return []
        params = [p for p in self.components[-1].parameters() if p.requires_grad]
        return params + (list(self.model.shared.parameters()) if self.shared_trains else [])

    def parameter_groups(self) -> list[dict[str, Any]]:
        group = {"params": self.parameters_to_train()}
        if self.opts.levit_lr is not None:
            group["lr"] = self.opts.levit_lr
        return [group]

    def component_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        comp = self.components[-1]
        logits = self.model.component_logits(x, len(self.components) - 1)
        return F.cross_entropy(logits.float(), y) + comp.vae.loss(x).mean()

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
        if not self.current:
            return
        comp = self.components[-1]
        if self.opts.levit_novelty == "latent" and len(self.memory):  # what it learned last, in its own latent space
            mean, var = comp.vae.latent_fit(self.memory.contents()[0])
            comp.ref_mean.copy_(mean)
            comp.ref_var.copy_(var)
            comp.has_ref.fill_(True)
        comp.set_trainable(False)
        if self.model.shared is not None:
            self.model.shared.requires_grad_(False)  # trained until the first expansion only
        self.current = False
        self.reset_optimizer()

    @torch.no_grad()
    def latent_distances(self, x: torch.Tensor) -> list[float]:
        """Each frozen component's symmetric KL between the latent fit of `x` and its reference."""
        out = []
        for comp in self.components:
            if bool(comp.has_ref):
                mean, var = comp.vae.latent_fit(x)
                out.append(symmetric_kl(mean, var, comp.ref_mean, comp.ref_var))
        return out

    @torch.no_grad()
    def novelty(self) -> float:
        """How unlike the memory is to what the learned components model (inf when none has learned yet)."""
        x, _ = self.memory.contents()
        if self.opts.levit_novelty == "latent":
            return min(self.latent_distances(x), default=float("inf"))
        frozen = self.components if not self.current else self.components[:-1]
        if not len(frozen):
            return float("inf")
        return min(float(torch.cat([c.vae.loss(x[i:i + 256], sample=False)
                                    for i in range(0, len(x), 256)]).mean()) for c in frozen)

    def check_expansion(self) -> None:
        self.last_check = int(self.memory.seen)
        if self.opts.levit_novelty == "elbo":
            self.freeze_current()  # our earlier rule: every check freezes the current component
        score = self.novelty()
        expand = score > self.opts.levit_gamma and len(self.components) < self.opts.levit_max_experts
        if expand:
            self.freeze_current()  # it has learned novel information: keep it as it is
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
            comp.set_trainable(self.current and j == len(self.components) - 1)
        if self.model.shared is not None:
            self.model.shared.requires_grad_(self.shared_trains)
        self.last_check = int(state["last_check"])
        self.created_at = list(state["created_at"])
        self.checks = list(state["checks"])
        self.reset_optimizer()
