"""RunConfig: the run-level settings (task, backbone, approach, scenario, data, optimisation, devices,
output), with PyContinual's flag names where they exist. Each approach's and backbone's own options are
declared beside it (`mmcl.options`); `mmcl.flags` merges the layers and builds the command line."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml



def run_field(default: Any, help: str, group: str, **kw: Any) -> Any:  # noqa: A002
    """A run-level setting: its default, its help line and its group in `mmcl run --help`."""
    return field(default=default, metadata={"help": help, "group": group}, **kw)


@dataclass
class RunConfig:
    """The run-level settings. Each approach's and backbone's own options live beside it (`mmcl.options`);
    their values for this run are in `options` and read as `cfg.<name>` too."""

    # what to run
    task: str = run_field("vader4", "task sequence: a name from tasks/ or a YAML path", "what to run")
    backbone: str = run_field("bert_adapter", "backbone name, or a Hugging Face model id / local folder", "what to run")
    baseline: str = run_field("ctr", "the approach (PyContinual's name for it)", "what to run")
    scenario: str = run_field("til", "til | dil | cil | online (PyContinual's *_classification names too)", "what to run")
    preset: str | None = run_field(
        None, "a named setting of the approach (configs/presets/NAME.yaml, or a YAML path): our tuning, not the paper's; "
        "see docs/fidelity.md", "what to run")
    eval_split: str = run_field(
        "test", "test | valid: the split the accuracy matrix is measured on; tune presets and settings on valid",
        "what to run")
    # data
    idrandom: int = run_field(0, "task order: the line of the order file (0-based)", "data")
    ntasks: int | None = run_field(None, "keep the first n tasks of the order", "data")
    data_dir: str | None = run_field(None, "folder with the data (else $MMCL_DATA); see docs/data.md", "data")
    use_predefine_args: bool = run_field(False, "tasks/predefined/<task>.yaml: PyContinual's tuned settings", "data")
    train_data_size: int | None = run_field(None, "PyContinual's \"small\" variant: n training examples per task", "data")
    max_train_per_task: int | None = run_field(None, "cap on training examples per task", "data")
    data_seed: int | None = run_field(None, "seed of splits and subsets (default: --seed)", "data")
    # training
    seed: int = run_field(0, "task t trains from seed + t", "training")
    num_train_epochs: float = run_field(1, "epochs per task", "training")
    optimizer: str = run_field("adamw", "adamw | sgd", "training")
    momentum: float = run_field(0.0, "SGD momentum", "training")
    learning_rate: float = run_field(1e-3, "learning rate", "training")
    head_lr: float | None = run_field(None, "the classifier heads' learning rate (default: --learning_rate)", "training")
    lr_reference_batch: int | None = run_field(
        None, "linear scaling rule: every rate x global batch / this (DyTox: 5e-4 at 512); unset: as given", "training")
    weight_decay: float = run_field(0.0, "weight decay", "training")
    train_batch_size: int = run_field(32, "training batch per process", "training")
    eval_batch_size: int = run_field(128, "evaluation batch per process", "training")
    lr_scheduler: str = run_field("constant", "constant | linear | cosine (per task)", "training")
    warmup_proportion: float = run_field(0.0, "share of a task's steps with linear warm-up", "training")
    clipgrad: float = run_field(10000.0, "gradient-norm clipping (0: none)", "training")
    select_best: bool = run_field(False, "keep the epoch with the best validation accuracy (PyContinual's default)",
                                  "training")
    freeze_backbone: bool = run_field(False, "train only what lies outside the backbone: FT-frozen, linear probe",
                                      "training")
    online_batch_size: int = run_field(10, "--scenario online: examples per stream batch; each arrives once",
                                       "training")
    # devices
    mixed_precision: str = run_field("no", "no | bf16 | fp16 (CUDA)", "devices")
    cpu: bool = run_field(False, "run on the CPU even where a GPU is", "devices")
    # output
    output_dir: str = run_field("runs", "where run directories go", "output")
    run_name: str | None = run_field(None, "the run directory's name (default: task-backbone-approach-time)", "output")
    resume: str | None = run_field(None, "continue the run in this directory from its newest checkpoint", "output")
    overwrite: bool = run_field(False, "replace an existing run directory of the same name", "output")
    save_checkpoints: bool = run_field(True, "a checkpoint after every task (needed by --resume and the Hub)", "output")
    progress: bool = run_field(True, "progress bars (main process only)", "output")
    report_to: str = run_field("none", "experiment trackers through Accelerate, comma-separated: none | all | "
                                       "tensorboard | wandb | mlflow | comet_ml | aim | clearml | dvclive", "output")
    push_to_hub: bool = run_field(False, "upload the finished run's model folder to --hub_model_id", "output")
    hub_model_id: str | None = run_field(None, "OWNER/NAME on the Hugging Face Hub", "output")
    hub_private: bool = run_field(False, "create the Hub repository private", "output")
    # the approach's and backbones' own options (mmcl.options), by flag name
    options: dict[str, Any] = field(default_factory=dict, metadata={"group": None})

    CHOICES = {
        "optimizer": ("adamw", "sgd"), "lr_scheduler": ("constant", "linear", "cosine"),
        "mixed_precision": ("no", "bf16", "fp16"), "eval_split": ("test", "valid"),
    }

    def __getattr__(self, name: str) -> Any:
        # Only reached for names that are not fields: an option of a method this run uses.
        options = self.__dict__.get("options")
        if options is not None and name in options:
            return options[name]
        raise AttributeError(f"RunConfig has no setting '{name}' (not a run setting, nor an option of this run's "
                             f"approach or backbone)")

    def set(self, name: str, value: Any) -> None:
        """Set a run setting or an option by flag name."""
        if name in self.field_names():
            setattr(self, name, value)
        else:
            self.options[name] = value

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
        """Fail before any work starts, naming the flag (the methods check their own options)."""
        for name, choices in self.CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"--{name} must be one of {', '.join(choices)}, got '{getattr(self, name)}'")
        for name in ("head_lr", "lr_reference_batch"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        for name in ("num_train_epochs", "learning_rate", "train_batch_size", "eval_batch_size", "online_batch_size"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id OWNER/NAME")
        if self.push_to_hub and not self.save_checkpoints:
            raise ValueError("--push_to_hub uploads the last task's checkpoint: drop --no-save_checkpoints")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Flat, as config.yaml holds it: the run settings, then the options, each under its flag name."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "options"}
        out.update(self.options)
        return out

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)} - {"options"}

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "RunConfig":
        """Run settings by name; every other key is taken as an option (checked against the methods in use
        by `mmcl.flags.resolve_options`)."""
        if not isinstance(values, dict):
            raise ValueError(f"{source}: expected a mapping of settings, got {type(values).__name__}")
        run = cls.field_names()
        options = dict(values.get("options") or {})
        options.update({k: v for k, v in values.items() if k not in run and k != "options"})
        return cls(**{k: v for k, v in values.items() if k in run}, options=options)

    def save(self, path: Path) -> None:
        from mmcl.atomic import write_text_atomic

        write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        with open(path) as f:
            return cls.from_dict(yaml.safe_load(f) or {}, source=str(path))
