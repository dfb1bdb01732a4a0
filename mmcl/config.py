"""RunConfig: every setting of a run, with PyContinual's flag names where they exist.

Precedence, lowest first: dataclass defaults < the task sequence's `defaults:` <
`tasks/predefined/<task>.yaml` (with --use_predefine_args) < flags given on the command line.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from mmcl.memory import Memory


@dataclass
class RunConfig:
    # what to run
    task: str = "vader4"
    backbone: str = "bert_adapter"
    baseline: str = "ctr"  # the approach; PyContinual calls it --baseline
    scenario: str = "til"
    idrandom: int = 0
    ntasks: int | None = None
    data_dir: str | None = None
    use_predefine_args: bool = False
    # data sizes
    train_data_size: int | None = None  # PyContinual's "small" variant: n training examples per task
    max_train_per_task: int | None = None
    data_seed: int | None = None  # defaults to seed
    # training
    seed: int = 0
    num_train_epochs: float = 1
    optimizer: str = "adamw"  # adamw | sgd
    momentum: float = 0.0  # sgd only
    learning_rate: float = 1e-3
    head_lr: float | None = None  # classifier heads' learning rate (None: learning_rate)
    # linear scaling rule: every learning rate x global batch / this (DyTox: lr 5e-4 at 512); None: as given
    lr_reference_batch: int | None = None
    weight_decay: float = 0.0
    train_batch_size: int = 32
    eval_batch_size: int = 128
    max_seq_length: int = 128
    lr_scheduler: str = "constant"  # constant | linear | cosine
    warmup_proportion: float = 0.0
    clipgrad: float = 10000.0
    select_best: bool = False  # keep the epoch with the best validation accuracy (PyContinual's default)
    mixed_precision: str = "no"  # no | bf16 | fp16
    cpu: bool = False
    # backbones
    bert_model: str | None = None  # HF id or local path; default: the offline MiniLM
    bert_adapter_size: int = 128
    pooling: str = "mean"
    bert_dropout: float | None = None  # None: the model's own dropout; 0 halves CPU step time of frozen encoders
    lora_r: int = 8
    lora_alpha: int = 16
    pretrained: str | None = None  # timm name or safetensors path for vision backbones
    vit_embed_dim: int = 192
    vit_depth: int = 4
    vit_heads: int = 3
    patch_size: int | None = None
    vit_pool: str = "token"  # token ([CLS]) | avg (mean of patch tokens)
    vit_dropout: float = 0.0  # dropout after attention and MLP projections (less forgetting: Mirzadeh et al. 2020)
    # `dual` (text + image sequences): one tower per modality, projected into one shared feature space
    text_backbone: str = "bert_adapter"  # its text tower: any text backbone (bert, bert_frozen, bert_adapter, bert_lora)
    vision_backbone: str = "vit"  # its vision tower: vit or convit
    dual_dim: int = 256  # the shared feature width both towers are projected to
    dual_shared_layers: int = 1  # residual MLP blocks on top, shared by both modalities (0: the projections only)
    freeze_backbone: bool = False  # train only what lies outside the backbone (heads): linear probe / FT-frozen
    # approaches
    lamb: float = 5000.0  # EWC lambda (PyContinual --lamb)
    ewc_gamma: float | None = None  # None: PyContinual's running mean (F_new + t F_old)/(t+1); else online EWC decay
    temperature: float = 2.0  # LwF distillation temperature
    lwf_lambda: float = 1.0
    memory_size: int = 200  # rehearsal buffer size (examples, global across processes)
    buffer: str = "reservoir"  # reservoir | class_balanced
    smax: float = 400.0  # HAT (and CTR's task-specific module)
    thres_cosh: float = 50.0
    thres_emb: float = 6.0  # HAT embeddings are clamped to +-thres_emb after each step
    hat_c: float = 0.75
    hat_binarize: bool = True  # snap a finished task's gates to exactly 0/1 at smax; False: PyContinual's soft masks
    use_gelu: bool = False  # HAT/CTR adapter activation; PyContinual's default is ReLU
    semantic_cap_size: int = 3  # CTR: dimensions of each task's capsule
    num_semantic_cap: int = 3  # CTR: transfer capsules per task (pre-route vectors of semantic_cap_size each)
    ctr_filters: int = 100  # CTR similarity estimator: convolution filters per kernel size
    ctr_kernel_sizes: str = "3,4,5"
    ctr_ksm_lr_scale: float = 0.1  # CTR: the knowledge-sharing module learns at this x learning_rate (PyContinual: 1)
    ctr_zero_up: bool = True  # CTR: the KSM's up-projection starts at zero (PyContinual: nn.Linear's init)
    dytox_div_weight: float = 0.1  # DyTox divergence head's loss weight
    dytox_finetune_epochs: int = 20  # DyTox balanced fine-tuning after each task > 0 (paper: 20)
    dytox_finetune_lr_scale: float = 0.1  # its lr as a share of learning_rate (paper: 5e-5 vs 5e-4)
    dytox_finetune_tab: bool = False  # the balanced fine-tuning also trains the task-attention block (reference code)
    # online task-free scenario (--scenario online) and its learners
    online_batch_size: int = 10  # examples per stream batch; each example arrives once
    online_iters: int = 1  # gradient steps per incoming batch, the same for every online learner
    replay_batch_size: int = 10  # memory examples per step (online_replay, mir, levit)
    mir_candidates: int = 50  # MIR: memory examples scored per step, the replay_batch_size most interfered kept
    mir_virtual_lr: float = 0.1  # MIR: SGD step of the virtual update (the paper's lr)
    levit_gamma: float = 0.6  # LEViT expansion threshold on the VAE loss (per task sequence in tasks/*.yaml)
    levit_embed_dim: int = 100  # LEViT expert width (paper: 100)
    levit_patch_size: int | None = None  # None: a quarter of the image side (paper: 7 on 28 px)
    levit_heads: int = 4
    levit_mlp_dim: int = 200  # the expert's FC layer (paper: 200)
    levit_latent_dim: int = 50  # VAE latent size (paper: 50 for MNIST)
    levit_vae_hidden: int = 400
    levit_max_experts: int = 20  # growth stops here (a low gamma would otherwise add one per memory fill)
    # prompting a frozen vit (coda_prompt, l2p, dualprompt); block indices as '0,1,2' or '0-2'.
    # Paper sizes except the blocks: ViT-B has 12, the default vit 4, so 0-4 / 2-4 become 0-3 / 2-3.
    coda_pool_size: int = 100  # components, split evenly over the tasks
    coda_length: int = 8  # tokens per component, half to keys and half to values
    coda_layers: str = "0-3"  # paper: 0-4 of 12
    coda_ortho_mu: float = 0.0  # orthogonality penalty weight (the released code: 0)
    l2p_pool_size: int = 10
    l2p_length: int = 5
    l2p_top_k: int = 5
    l2p_key_lambda: float = 0.1  # weight of the key-matching (surrogate) loss
    dualprompt_g_layers: str = "0-1"
    dualprompt_g_length: int = 5  # prefix tokens per key and per value
    dualprompt_e_layers: str = "2-3"  # paper: 2-4 of 12
    dualprompt_e_length: int = 20
    dualprompt_key_lambda: float = 1.0
    # output
    output_dir: str = "runs"
    run_name: str | None = None
    resume: str | None = None
    overwrite: bool = False  # replace an existing run directory of the same name
    save_checkpoints: bool = True
    progress: bool = True
    push_to_hub: bool = False  # upload the finished run's model folder (mmcl/hub.py) to --hub_model_id
    hub_model_id: str | None = None
    hub_private: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    CHOICES = {
        "optimizer": ("adamw", "sgd"), "lr_scheduler": ("constant", "linear", "cosine"),
        "mixed_precision": ("no", "bf16", "fp16"), "pooling": ("mean", "cls"), "vit_pool": ("token", "avg"),
        "buffer": Memory.strategies,
    }

    def with_batch_scaled_lr(self, num_processes: int) -> "RunConfig":
        """A copy whose learning rates follow --lr_reference_batch for this global batch (itself when unset).

        The approaches and the optimiser take their rates from it, so k processes learn at k times the rate
        of one process, as the paper's rule asks; config.yaml keeps the rates as given."""
        if self.lr_reference_batch is None:
            return self
        scale = self.train_batch_size * num_processes / self.lr_reference_batch
        head_lr = None if self.head_lr is None else self.head_lr * scale
        return dataclasses.replace(self, learning_rate=self.learning_rate * scale, head_lr=head_lr)

    def validate(self) -> "RunConfig":
        """Fail before any work starts, naming the flag."""
        for name, choices in self.CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"--{name} must be one of {', '.join(choices)}, got '{getattr(self, name)}'")
        for name in ("head_lr", "ctr_ksm_lr_scale", "dytox_finetune_lr_scale", "lr_reference_batch"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        for name in ("num_train_epochs", "learning_rate", "train_batch_size", "eval_batch_size", "max_seq_length",
                     "online_batch_size", "online_iters", "replay_batch_size", "mir_candidates", "levit_embed_dim",
                     "mir_virtual_lr", "levit_heads", "levit_mlp_dim", "levit_latent_dim", "levit_vae_hidden", "levit_max_experts",
                     "dual_dim"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id OWNER/NAME")
        if self.push_to_hub and not self.save_checkpoints:
            raise ValueError("--push_to_hub uploads the last task's checkpoint: drop --no-save_checkpoints")
        if self.levit_gamma < 0:
            raise ValueError(f"--levit_gamma must be >= 0, got {self.levit_gamma}")
        if self.levit_embed_dim % self.levit_heads:
            raise ValueError(f"--levit_embed_dim {self.levit_embed_dim} must be divisible by --levit_heads {self.levit_heads}")
        if self.dual_shared_layers < 0:
            raise ValueError(f"--dual_shared_layers must be >= 0, got {self.dual_shared_layers}")
        if self.memory_size < 0:
            raise ValueError(f"--memory_size must be >= 0, got {self.memory_size}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "RunConfig":
        unknown = set(values) - cls.field_names()
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {sorted(unknown)}; see `mmcl run --help`")
        return cls(**values)

    def save(self, path: Path) -> None:
        from mmcl.atomic import write_text_atomic

        write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        with open(path) as f:
            return cls.from_dict(yaml.safe_load(f) or {}, source=str(path))


# --resume keeps what the run trains. Flags that only change how it runs may be given freely; the
# optimisation flags may change only when the run stopped on a non-finite loss (recorded in its history);
# every other flag that differs from the run's config.yaml is an error.
RUNTIME_FIELDS = ("progress", "save_checkpoints", "eval_batch_size", "data_dir", "cpu", "push_to_hub",
                  "hub_model_id", "hub_private", "resume", "overwrite")
RECOVERY_FIELDS = ("learning_rate", "head_lr", "lr_reference_batch", "optimizer", "momentum", "weight_decay",
                   "lr_scheduler", "warmup_proportion", "clipgrad", "mixed_precision")


def resume_config(run_dir: str | Path, given: dict[str, Any]) -> tuple[RunConfig, dict[str, list]]:
    """The config of the run in `run_dir` with the flags `given` on the command line applied, and the
    optimisation flags changed after a divergence ({flag: [was, now]}); a flag that would change what a
    healthy run trains is a ResumeConflictError listing each one."""
    import json

    from mmcl.engine_errors import ResumeConflictError

    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"--resume {run_dir}: no {path.name} there; is it an mmcl run directory?")
    try:
        cfg = RunConfig.load(path)
    except (yaml.YAMLError, UnicodeDecodeError, TypeError) as e:
        raise ValueError(f"--resume {run_dir}: {path} is unreadable: {e}") from e
    check_keys(given, "command line")
    try:
        with open(run_dir / "metrics.json", encoding="utf-8") as f:
            failure = (json.load(f).get("meta") or {}).get("failure") or {}
    except (OSError, ValueError, AttributeError):
        failure = {}
    diverged = failure.get("kind") == "non-finite"
    changed, conflicts = {}, []
    for key, value in given.items():
        was = getattr(cfg, key)
        if key in RUNTIME_FIELDS or value == was:
            setattr(cfg, key, value)
        elif key in RECOVERY_FIELDS and diverged:
            changed[key] = [was, value]
            setattr(cfg, key, value)
        else:
            conflicts.append(f"--{key} {value} (the run has {was})")
    if conflicts:
        why = ("they change what the run trains" if not any(k.split()[0][2:] in RECOVERY_FIELDS for k in conflicts)
               else "they change what the run trains (optimisation flags may change only after the run stopped "
                    "on a non-finite loss)")
        raise ResumeConflictError(
            f"--resume {run_dir}: {len(conflicts)} flag(s) differ from {path} and {why}: " + "; ".join(conflicts)
            + f". Drop them to continue the run as it was, or start a new run. Flags --resume may change: "
            + ", ".join(f"--{k}" for k in RUNTIME_FIELDS if k != "resume"))
    cfg.resume = str(run_dir)
    return cfg.validate(), changed


def check_keys(values: dict[str, Any], source: str) -> dict[str, Any]:
    import difflib

    valid = RunConfig.field_names()
    for key in values:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=2)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"{source}: unknown setting '{key}'.{hint}")
    return values


def predefined_args(task: str, backbone: str, baseline: str, tasks_dir: Path) -> dict[str, Any]:
    """Tuned values from `tasks/predefined/<task>.yaml`.

    The file holds `default:` plus optional sections keyed `backbone`, `baseline` or
    `backbone/baseline`, applied in that order (more specific wins).
    """
    path = tasks_dir / "predefined" / f"{task}.yaml"
    if not path.is_file():
        return {}
    with open(path) as f:
        table = yaml.safe_load(f) or {}
    merged: dict[str, Any] = {}
    for key in ("default", backbone, baseline, f"{backbone}/{baseline}"):
        merged.update(check_keys(table.get(key) or {}, f"{path} [{key}]"))
    return merged


def build_config(cli_values: dict[str, Any]) -> RunConfig:
    """Merge the layers; `cli_values` holds only flags the user gave explicitly."""
    from mmcl.data import TASKS_DIR, task_spec

    check_keys(cli_values, "command line")
    base = RunConfig()
    task = cli_values.get("task", base.task)
    backbone = cli_values.get("backbone", base.backbone)
    baseline = cli_values.get("baseline", base.baseline)
    values: dict[str, Any] = {}
    spec = task_spec(task)
    values.update(check_keys(spec.get("defaults") or {}, f"{spec['_path']} [defaults]"))
    if cli_values.get("use_predefine_args"):
        values.update(predefined_args(spec["name"], backbone, baseline, TASKS_DIR))
    values.update(cli_values)
    cfg = dataclasses.replace(base, **values)
    if cfg.data_seed is None:
        cfg.data_seed = cfg.seed
    return cfg
