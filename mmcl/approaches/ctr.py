"""CTR, capsules and transfer routing (Ke et al., NeurIPS 2021), on the adapter sites of `bert_adapter`.

Data flow at each adapter site (after the attention-output and the FFN-output dense layers of
every BERT layer, before the residual LayerNorm), for a batch x of shape (B, L, H) and task t:

  knowledge-sharing module (KSM, `KnowledgeSharing`)
    1. task capsule layer: every task j <= t has its own linear map H -> c (c = semantic_cap_size)
       per token, squashed:                                   caps (B, L, J=t+1, c)
    2. pre-route vectors: N = num_semantic_cap transforms c -> c per task:
                                                              votes (B, L, J, D=N*c)
    3. similarity estimator: 1-D convolutions over the sequence (kernel sizes 3, 4, 5, 100 filters
       each) max-pooled over real tokens; the current task's votes summarise into `cur`, every
       task j's votes are scored together with `cur`:         z (B, J, 3*filters)
       -> similarity a_j (B, J, D) and router logits (B, J, 2)
       (the convolutions over every task's votes, the cost that grows with t, run on the
       capsules through weights composed with each task's pre-route transforms: `source_responses`)
    4. task router: a hard Gumbel-softmax picks, per example and task, whether j transfers
       (delta_j in {0, 1}; the argmax at evaluation)
    5. transfer: v = sum_{j<=t} delta_j * a_j * votes_j (B, L, D); the lower-triangular task mask
       is the j <= t: tasks after t are never computed, so they cannot reach task t's output
    6. up-projection D -> H, shared by all tasks:            shared (B, L, H)
  task-specific module (TSM): `HatAdapter` from hat.py (H -> bert_adapter_size -> H, its units
    HAT-masked per task) applied to x + shared; the site outputs x + TSM(x + shared).

The plug-ins read t, s and the batch's token mask from a `CtrContext` the approach sets before
each forward. Training: CE + HAT regulariser over the TSM gates, HAT gradient blocking,
compensation and clamping exactly as in hat.py (`CTR` subclasses `Hat`). As in PyContinual, the
KSM is shared knowledge: the capsules and routing of tasks <= t, the similarity estimator, the
router and the up-projection train with every task (the source of backward transfer), so
earlier tasks' outputs may drift through the KSM; tasks > t get no gradient. BERT is frozen but for
its LayerNorms, which train unmasked as in PyContinual (HAT's options, hat.py: the preset `ctr_cpu`
freezes them and binarises the gates, as `hat_exact` does for HAT).

Domain-incremental (`--scenario dil`, one shared head): training is TIL's; at test time, with no task id,
HAT's `--hat_dil_mask` (hat.py) chooses a task j and the whole site runs as for task j: the TSM under
j's gates and the KSM routing over tasks <= j with j's votes as the current task's (`last`: j the latest
learned task; `confident`: per example, the j whose prediction has the lowest entropy). `union` puts
every TSM gate at the union of the learned tasks' gates and routes as the latest learned task, whose
routing already reads every learned task's capsules. PyContinual's CTR (`bert_adapter_capsule_mask`)
reads neither `--last_id` nor `--ent_id`: its DIL evaluation runs each test set under that test set's
own task id, which a domain-incremental learner is not told; mmcl does not copy that.

The defaults are PyContinual's: the KSM learns at the full learning rate and its up-projection has
nn.Linear's initialisation. The preset `ctr_cpu` (configs/presets/ctr_cpu.yaml) is our tuning for
runs sized for a CPU (lr 1e-3, a few epochs), where the KSM, the one unmasked path by which a new task
changes an old task's output, drifts: it learns at a tenth of the rate (`--ctr_ksm_lr_scale 0.1`) and
its up-projection starts at zero (`--ctr_zero_up`), so each site starts as the TSM alone instead of
adding random shared features that the router's Gumbel samples switch on and off. Its measured effect
is in the preset's comment and docs/fidelity.md.

Differences from PyContinual (`BertAdapterCapsuleMaskImp`, transfer_route, larger_as_share):
- The batch axis is explicit throughout. The original reshapes the (capsule, batch*length)
  layout into (batch, length, capsule) and tiles similarities and decisions length-major
  against batch-major votes, so one example's routing mixes other examples' (and other
  capsules'/tasks') values.
- Squash acts on each capsule's own c dimensions. The original squashes each coordinate across
  the task axis, which couples a task's capsule to every other task's, future tasks included.
- Padding: the estimator zeroes padded positions and max-pools only over positions that exist
  for the unpadded sequence, so an example's output does not depend on the rest of its batch.
  (The original pads every batch to max_seq_length and pools over pad tokens' states.) Both
  convolution banks pad by k-2 (the original's second bank has none, which fails on sequences
  shorter than the kernel once batches are no longer padded to a fixed length).
- At evaluation the router takes the argmax instead of sampling Gumbel noise, so predictions
  are deterministic.
- Gradient gating of the task capsules (the original's `tsv` factors) is structural: tasks > t
  are not in the graph. s reaches smax at the last batch, as in hat.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.approaches import APPROACHES
from mmcl.approaches.base import with_own_lr
from mmcl.approaches.hat import Hat, HatAdapter, HatContext, HatOptions
from mmcl.backbones.adapters import AdapterSite
from mmcl.options import option, positive


@dataclass
class CtrContext(HatContext):
    """HAT's context plus the token mask (B, L) of the batch being encoded (None: all tokens real)."""

    valid: torch.Tensor | None = None


def squash(v: torch.Tensor, dim: int = -1, eps: float = 1e-16) -> torch.Tensor:
    """Capsule non-linearity: keeps the direction, maps the norm n to n^2 / (1 + n^2) < 1."""
    sq = (v * v).sum(dim, keepdim=True) + eps  # eps: finite values and gradients at a zero capsule
    return sq / (1.0 + sq) * v / torch.sqrt(sq)


# far below any real convolution response of squashed capsules (|capsule| < 1), and exact in bfloat16
PAD_SCORE = 2.0**14


def masked_max(y: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Max over the last axis (positions) restricted to the first `count` positions.

    `count` (>= 1) broadcasts against y without its last two axes (channels, positions)."""
    keep = torch.arange(y.shape[-1], device=y.device) < count[..., None]
    return y.masked_fill(~keep.unsqueeze(-2), float("-inf")).max(-1).values


def conv_outputs_of(lengths: torch.Tensor, kernel: int) -> torch.Tensor:
    """How many outputs a padding-(k-2) convolution gives on sequences of `lengths` real tokens:
    exactly the outputs it would give on the unpadded sequences."""
    return lengths + 2 * (kernel - 2) - kernel + 1


class KnowledgeSharing(nn.Module):
    """CTR's KSM: per-task capsules, transfer routing over tasks <= t, shared up-projection."""

    def __init__(self, hidden: int, ntasks: int, cap_size: int = 3, num_caps: int = 3, filters: int = 100,
                 kernel_sizes: tuple[int, ...] = (3, 4, 5)) -> None:
        super().__init__()
        if min(kernel_sizes) < 2:
            raise ValueError(f"--ctr_kernel_sizes must all be >= 2, got {kernel_sizes}")
        self.kernel_sizes = tuple(kernel_sizes)
        # task capsule layer: one H -> c map per task, stacked so that tasks <= t are one einsum
        self.cap_weight = nn.Parameter(torch.empty(ntasks, cap_size, hidden))
        self.cap_bias = nn.Parameter(torch.empty(ntasks, cap_size))
        bound = 1.0 / math.sqrt(hidden)  # nn.Linear's default initialisation
        nn.init.uniform_(self.cap_weight, -bound, bound)
        nn.init.uniform_(self.cap_bias, -bound, bound)
        self.route_weights = nn.Parameter(torch.randn(ntasks, num_caps, cap_size, cap_size))
        dim = num_caps * cap_size
        # padding k-2 as the original's current-task bank (see the module docstring)
        self.conv_current = nn.ModuleList(nn.Conv1d(dim, filters, k, padding=k - 2) for k in self.kernel_sizes)
        self.conv_other = nn.ModuleList(nn.Conv1d(dim, filters, k, padding=k - 2) for k in self.kernel_sizes)
        pooled = filters * len(self.kernel_sizes)
        self.fc_current = nn.Linear(pooled, filters)
        self.fc_similarity = nn.Linear(pooled, dim)
        self.router = nn.Linear(pooled, 2)  # logit 0: transfer, logit 1: do not
        self.up = nn.Linear(dim, hidden)
        self.last_decisions: torch.Tensor | None = None  # (B, t+1) of the latest forward, for inspection

    def task_capsules(self, x: torch.Tensor, ntasks_used: int) -> torch.Tensor:
        """(B, L, H) -> squashed capsules (B, L, J, c) of tasks 0..J-1."""
        w, b = self.cap_weight[:ntasks_used], self.cap_bias[:ntasks_used]
        return squash(torch.einsum("blh,jch->bljc", x, w) + b)

    def pre_route(self, caps: torch.Tensor) -> torch.Tensor:
        """Capsules (B, L, J, c) -> votes (B, L, J, N*c): N learned c x c transforms per task."""
        ntasks_used = caps.shape[2]
        votes = torch.einsum("bljc,jncd->bljnd", caps, self.route_weights[:ntasks_used])
        return votes.flatten(-2)

    def source_responses(self, caps: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """conv_other's responses to every task's votes, max-pooled over real positions: (B, J, filters)
        per kernel size.

        The votes are a per-task linear map of the capsules (`pre_route`), so each convolution
        composes with it into a per-task convolution over c capsule channels instead of N*c vote
        channels: the same numbers with N times fewer multiply-adds, as one batched matmul per
        kernel size (the cost that grows with the number of tasks)."""
        B, L, J, c = caps.shape
        routes = self.route_weights[:J]  # (J, N, c, d)
        x = caps.permute(2, 0, 3, 1)  # (J, B, c, L)
        out = []
        for conv, k in zip(self.conv_other, self.kernel_sizes):
            weight = conv.weight.view(conv.out_channels, routes.shape[1], c, k)  # (filters, N, d, k)
            per_task = torch.einsum("fndk,jncd->jckf", weight, routes).reshape(J, c * k, conv.out_channels)
            windows = F.pad(x, (k - 2, k - 2)).unfold(-1, k, 1)  # (J, B, c, L', k)
            positions = windows.shape[3]
            windows = windows.permute(0, 1, 3, 2, 4).reshape(J, B * positions, c * k)
            # positions past an example's real outputs get one more input, 1, whose weight is -PAD_SCORE:
            # they lose the max without a masking pass over the (J, B, L', filters) responses
            beyond = torch.arange(positions, device=x.device) >= conv_outputs_of(lengths, k)[:, None]  # (B, L')
            beyond = beyond.to(windows.dtype).reshape(1, B * positions, 1).expand(J, -1, -1)
            per_task = torch.cat([per_task, per_task.new_full((J, 1, conv.out_channels), -PAD_SCORE)], dim=1)
            y = torch.bmm(torch.cat([windows, beyond], dim=-1), per_task).view(J, B, positions, conv.out_channels)
            # max with indices: its backward is a scatter, amax's a dense comparison over the whole tensor
            y = y.max(2).values + conv.bias  # (J, B, filters)
            out.append(y.transpose(0, 1))
        return out

    def route(self, votes: torch.Tensor, caps: torch.Tensor, task: int,
              lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Similarity (B, J, D) and router decisions (B, J) of each source task for each example."""
        current = votes[:, :, task].transpose(1, 2)  # (B, D, L)
        # max-pooling commutes with ReLU and with adding a per-channel constant, so pool first:
        # relu(max_l(y_l + c)) = max_l(relu(y_l + c)); the big (B, J, filters, L) tensors see one op
        cur = torch.cat([F.relu(masked_max(conv(current), conv_outputs_of(lengths, k)))
                         for conv, k in zip(self.conv_current, self.kernel_sizes)], dim=-1)
        cur = self.fc_current(cur)  # (B, filters)
        pooled = [F.relu(y + cur[:, None, :]) for y in self.source_responses(caps, lengths)]
        z = torch.cat(pooled, dim=-1)  # (B, J, 3*filters)
        similarity = self.fc_similarity(z)
        logits = self.router(z)
        if self.training:
            # straight-through hard sample: forward 0/1, backward through the soft relaxation
            decisions = F.gumbel_softmax(logits.float(), tau=1.0, hard=True)[..., 0]
        else:
            decisions = (logits[..., 0] >= logits[..., 1]).float()
        return similarity, decisions.to(similarity.dtype)

    def forward(self, x: torch.Tensor, task: int, valid: torch.Tensor | None = None) -> torch.Tensor:
        B, L, _ = x.shape
        valid = x.new_ones(B, L) if valid is None else valid
        lengths = (valid > 0).sum(1)  # integer counts: a low-precision sum would round long sequences
        valid = valid.to(x.dtype)
        # padded positions act like the convolutions' own zero padding
        caps = self.task_capsules(x, task + 1) * valid[:, :, None, None]
        votes = self.pre_route(caps)
        similarity, decisions = self.route(votes, caps, task, lengths)
        self.last_decisions = decisions.detach()
        transferred = torch.einsum("bjd,bljd->bld", similarity * decisions[..., None], votes)
        return self.up(transferred)


class CtrPlugin(nn.Module):
    """One CL-plugin: out = x + TSM(x + KSM(x))."""

    def __init__(self, hidden: int, ctx: CtrContext, ntasks: int, adapter_size: int, use_gelu: bool,
                 cap_size: int, num_caps: int, filters: int, kernel_sizes: tuple[int, ...],
                 zero_up: bool = False) -> None:
        super().__init__()
        self.ctx = ctx  # shared with the approach, not a submodule
        self.ksm = KnowledgeSharing(hidden, ntasks, cap_size, num_caps, filters, kernel_sizes)
        if zero_up:
            # the site starts as the TSM alone: random shared features (flipped on and off by the
            # router's Gumbel samples) would otherwise perturb the first task's adapter input
            nn.init.zeros_(self.ksm.up.weight)
            nn.init.zeros_(self.ksm.up.bias)
        self.tsm = HatAdapter(hidden, adapter_size, ctx, ntasks, use_gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.ksm(x, self.ctx.task, self.ctx.valid)
        return x + self.tsm.transform(x + shared)


def parse_kernel_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(k) for k in str(text).split(",") if k.strip())
    except ValueError as e:
        raise ValueError(f"--ctr_kernel_sizes must be comma-separated integers, got '{text}'") from e
    if not sizes:
        raise ValueError("--ctr_kernel_sizes is empty")
    return sizes


@dataclass
class CtrOptions(HatOptions):
    title = "CTR options"
    semantic_cap_size: int = option(3, "dimensions of each task's capsule")
    num_semantic_cap: int = option(3, "transfer capsules per task (pre-route vectors of semantic_cap_size each)")
    ctr_filters: int = option(100, "similarity estimator: convolution filters per kernel size")
    ctr_kernel_sizes: str = option("3,4,5", "similarity estimator: kernel sizes, comma-separated")
    ctr_ksm_lr_scale: float = option(1.0, "the knowledge-sharing module learns at this x --learning_rate "
                                          "(PyContinual: 1; preset ctr_cpu: 0.1)")
    ctr_zero_up: bool = option(False, "the knowledge-sharing module's up-projection starts at zero (PyContinual: "
                                      "no, nn.Linear's init; preset ctr_cpu: yes)")

    def validate(self) -> None:
        super().validate()
        positive(self, "semantic_cap_size", "num_semantic_cap", "ctr_filters", "ctr_ksm_lr_scale")
        parse_kernel_sizes(self.ctr_kernel_sizes)


@APPROACHES.register("ctr")
class CTR(Hat):
    """HAT's machinery (hat.py) over the TSMs, plus the knowledge-sharing module at every site.

    TIL, or DIL with `--hat_dil_mask` choosing the task a test example is routed and gated as (module
    docstring); the option is HAT's (`CtrOptions` extends `HatOptions`)."""

    name = "ctr"
    Options = CtrOptions
    tower_use = "none"  # its routing reads text attention masks: text backbones only, no `dual`
    why_not = {"image": "CTR's task-similarity routing convolves over a sentence's real tokens (its attention "
                        "mask); on a raster of patches it was not tried",
               "towers": "CTR's routing reads text attention masks, and on `dual` image tasks would go through "
                         "unmasked shared layers"}
    # The similarity estimator convolves over each example's real tokens (the text attention mask) with
    # kernels of 3-5 tokens: on image patches the routing would run, but on a patch sequence in raster
    # order whose neighbours are not a sentence's; not tried, so CTR stays a text method
    modalities = ("text",)
    adapter_backbones = ("bert_adapter",)

    def build_model(self, backbone) -> nn.Module:
        tokenizer = getattr(backbone, "tokenizer", None)
        if tokenizer is not None and getattr(tokenizer, "padding_side", "right") != "right":
            # the similarity estimator takes a sequence's real tokens to be its first ones
            raise ValueError(f"--baseline ctr needs a right-padding tokenizer; --bert_model pads "
                             f"{tokenizer.padding_side}")
        return super().build_model(backbone)

    def make_context(self) -> CtrContext:
        return CtrContext(task=0, s=float(self.opts.smax))

    def make_plugin(self, site: AdapterSite) -> nn.Module:
        o = self.opts
        return CtrPlugin(site.dense.out_features, self.ctx, len(self.seq), self.adapter_size, o.use_gelu,
                         o.semantic_cap_size, o.num_semantic_cap, o.ctr_filters, parse_kernel_sizes(o.ctr_kernel_sizes),
                         o.ctr_zero_up)

    def parameter_groups(self) -> list[dict]:
        """The knowledge-sharing modules learn at --ctr_ksm_lr_scale x --learning_rate: they are shared
        by all tasks and unmasked, so their learning rate sets how far earlier tasks' outputs drift."""
        groups = super().parameter_groups()
        if self.opts.ctr_ksm_lr_scale == 1.0:
            return groups
        ksm = [p for m in self.modules() if isinstance(m, KnowledgeSharing) for p in m.parameters()]
        return with_own_lr(groups, ksm, self.cfg.learning_rate * self.opts.ctr_ksm_lr_scale)

    def set_context(self, task_id: int, s: float, batch: dict) -> None:
        super().set_context(task_id, s, batch)
        self.ctx.valid = batch.get("attention_mask")
