"""CODA-Prompt (Smith et al., CVPR 2023): decomposed, attention-weighted prompts, rehearsal-free.

On any frozen transformer encoder of mmcl/backbones/tokens.py (a ViT, a BERT-family text encoder).
Per prompted layer l, a pool of M components P_m (length L), each with a key K_m and an
attention vector A_m. The query q is the pooled feature of a prompt-free pass of
the frozen encoder; α_m = cos(q ⊙ A_m, K_m) and the prompt Σ_m α_m P_m is split in half into
prefix keys and values (prefix tuning). The pool is cut into one slice per task: task t trains
only its slice (earlier slices are frozen: separate parameters with requires_grad off, so
neither gradients nor weight decay reach them) and uses slices 0..t; a new slice is
initialised orthogonal to the earlier ones (Gram–Schmidt) so it starts in directions the old
tasks do not use. Optional orthogonality penalty --coda_ortho_mu (the released code uses 0).
Loss: CE with past-class logits masked (`PromptApproach`); the paper trains with Adam and a
cosine schedule (`--optimizer adamw --weight_decay 0 --lr_scheduler cosine`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.approaches import APPROACHES
from mmcl.approaches.prompting import PromptApproach, orthogonal_rows, parse_layers
from mmcl.backbones.tokens import TokenEncoder
from mmcl.data.sequence import Task
from mmcl.options import Options, option, positive


def ortho_penalty(rows: torch.Tensor) -> torch.Tensor:
    """Mean squared deviation of the rows' Gram matrix from the identity."""
    eye = torch.eye(rows.shape[0], device=rows.device, dtype=rows.dtype)
    return ((rows @ rows.T - eye) ** 2).mean()


@dataclass
class CodaPromptOptions(Options):
    title = "CODA-Prompt options"
    coda_pool_size: int = option(100, "prompt components, split evenly over the tasks")
    coda_length: int = option(8, "tokens per component, half to keys and half to values")
    coda_layers: str = option("0-3", "blocks that get prompts, '0,1,2' or '0-2' (paper: 0-4 of ViT-B's 12; the "
                                     "default vit has 4)")
    coda_ortho_mu: float = option(0.0, "orthogonality penalty weight (the released code: 0)")

    def validate(self) -> None:
        if self.coda_length < 2 or self.coda_length % 2:
            raise ValueError(f"--coda_length must be even (half to keys, half to values), got {self.coda_length}")
        positive(self, "coda_pool_size")
        if self.coda_ortho_mu < 0:
            raise ValueError(f"--coda_ortho_mu must be >= 0, got {self.coda_ortho_mu}")


@APPROACHES.register("coda_prompt", aliases=("coda",))
class CodaPrompt(PromptApproach):
    name = "coda_prompt"
    Options = CodaPromptOptions

    def __init__(self, backbone, seq, scenario, cfg) -> None:
        super().__init__(backbone, seq, scenario, cfg)
        self._set_trainable(None)

    def make_pool(self, encoder: TokenEncoder) -> nn.Module:
        """Per task t a slice of components, keys and attention vectors in every prompted layer."""
        layers = parse_layers(self.opts.coda_layers, encoder.num_token_layers, "coda_layers")
        pool, length, T = self.opts.coda_pool_size, self.opts.coda_length, len(self.seq)
        if pool < T:
            raise ValueError(f"--coda_pool_size {pool} gives fewer components than the {T} tasks")
        # M/T per task; a remainder goes to the first tasks
        self.slice_sizes = [pool // T + (1 if t < pool % T else 0) for t in range(T)]
        n, D = len(layers), encoder.token_dim
        p = nn.Module()
        p.layers = layers
        p.components = nn.ParameterList(nn.Parameter(torch.zeros(n, m, length, D)) for m in self.slice_sizes)
        p.keys = nn.ParameterList(nn.Parameter(torch.zeros(n, m, D)) for m in self.slice_sizes)
        p.attention = nn.ParameterList(nn.Parameter(torch.zeros(n, m, D)) for m in self.slice_sizes)
        return p

    def _set_trainable(self, t: int | None) -> None:
        for pool in self.pools.values():
            for plist in (pool.components, pool.keys, pool.attention):
                for j, p in enumerate(plist):
                    p.requires_grad_(j == t)

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        for pool in self.pools.values():
            self.init_slice(pool, task.id)
        self._set_trainable(task.id)

    @torch.no_grad()
    def init_slice(self, pool: nn.Module, t: int) -> None:
        """Slice t: unit rows orthogonal to slices 0..t-1 in every layer (seeded, so resume redraws the same)."""
        gen = torch.Generator().manual_seed(self.cfg.seed * 1000 + t)
        for plist in (pool.components, pool.keys, pool.attention):
            new = plist[t]
            for li in range(len(pool.layers)):
                earlier = [plist[j][li].reshape(self.slice_sizes[j], -1) for j in range(t)]
                prev = torch.cat(earlier) if earlier else new.new_zeros(0, new[li][0].numel())
                rows = orthogonal_rows(prev.cpu(), self.slice_sizes[t], gen)
                new[li].copy_(rows.reshape(new[li].shape))

    def pool_in_use(self, pool: nn.Module, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(components (n, M', L, D), keys (n, M', D), attention (n, M', D)) of slices 0..t."""
        return tuple(torch.cat([plist[j] for j in range(t + 1)], dim=1)
                     for plist in (pool.components, pool.keys, pool.attention))

    def alpha(self, q: torch.Tensor, keys: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """α (n_layers, B, M') = cos(q ⊙ A_m, K_m), in [-1, 1]."""
        weighted = q[None, :, None, :] * attention[:, None]  # (n, B, M', D)
        return F.cosine_similarity(weighted, keys[:, None], dim=-1, eps=1e-8)

    def prompt_features(self, batch, q, task):
        pool = self.pools[self.modality(batch)]
        t = (task.id if task is not None else int(self.num_learned) - 1)
        comps, keys, attention = self.pool_in_use(pool, max(0, t))
        alpha = self.alpha(q, keys, attention)
        prompts = torch.einsum("nbm,nmld->nbld", alpha, comps)  # (n, B, L, D)
        half = prompts.shape[2] // 2
        prefixes = {layer: (prompts[i, :, :half], prompts[i, :, half:]) for i, layer in enumerate(pool.layers)}
        features = self.prefixed_features(batch, prefixes)
        aux = None
        if task is not None and self.opts.coda_ortho_mu > 0:
            aux = sum(ortho_penalty(keys[i]) + ortho_penalty(attention[i]) + ortho_penalty(comps[i].flatten(1))
                      for i in range(len(pool.layers))) * self.opts.coda_ortho_mu
        return features, aux
