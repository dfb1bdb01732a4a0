"""The run loop: for each task, train it, then test every task; report and checkpoint row by row.

Runs the same under `python run.py` and `accelerate launch run.py`: Accelerate owns devices,
processes and mixed precision. Each task starts from `seed + t`, so a run resumed from the
checkpoint of task t-1 continues exactly as the uninterrupted run would.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from mmcl.approaches import APPROACHES, Approach
from mmcl.backbones import BackboneSpec, build_backbone, check_backbone_name
from mmcl.config import RunConfig
from mmcl.data import ReaderContext, load_task_sequence
from mmcl.data.mixed import ModalityGroups
from mmcl.data.sequence import Task, TaskSequence, check_labels, get_scenario
from mmcl.engine_errors import CheckpointError, NonFiniteError, OutputError, RunFailed
from mmcl.flags import resolve_options, validate_options
from mmcl.metrics import AccuracyMatrix, accuracy_and_macro_f1
from mmcl.optim import OptimizerStep, lr_lambda, make_optimizer, make_scheduler  # noqa: F401 (re-exported)
from mmcl.reporting import write_report
from mmcl.rundir import CHECKPOINTS, RunDir, check_output_dir, writing  # noqa: F401


def make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # per-task heads leave other tasks' parameters unused in a step
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision, kwargs_handlers=[ddp])
    if accelerator.device.type == "cpu":
        set_cpu_threads(accelerator)
    return accelerator


def set_cpu_threads(accelerator) -> None:
    """Share the cores among this machine's processes.

    `accelerate launch` sets OMP_NUM_THREADS=1 even for a single process, which halves
    CPU speed on two cores; MMCL_NUM_THREADS overrides.
    """
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    threads = int(os.environ.get("MMCL_NUM_THREADS", 0)) or max(1, (os.cpu_count() or 1) // max(1, local))
    torch.set_num_threads(threads)


def reader_context(cfg: RunConfig) -> ReaderContext:
    """What the task-sequence readers take from a run's settings."""
    return ReaderContext(
        data_dir=Path(cfg.data_dir) if cfg.data_dir else None, idrandom=cfg.idrandom, ntasks=cfg.ntasks,
        seed=cfg.data_seed if cfg.data_seed is not None else cfg.seed, train_data_size=cfg.train_data_size,
        max_train_per_task=cfg.max_train_per_task,
    )


def backbone_spec(seq: TaskSequence) -> BackboneSpec:
    shapes: dict[str, tuple[int, ...]] = {}
    for task in seq:
        if task.modality == "image" and len(task.train):
            shapes[task.name] = tuple(np.asarray(task.train[0]["image"]).shape)
    if len(set(shapes.values())) > 1:
        # one vision backbone has one patch grid and channel count
        raise ValueError(f"task sequence '{seq.name}': image tasks have different image shapes {shapes}; "
                         "one vision backbone (or tower) takes one shape")
    image_shape = next(iter(shapes.values()), None)
    return BackboneSpec(modalities=tuple(seq.modalities), image_shape=image_shape)


def prepare_task(task: Task, backbone, scenario) -> None:
    """Model-ready splits with scenario targets and task ids, replacing the raw ones."""
    check_labels(task)
    for split in ("train", "valid", "test"):
        ds = backbone.preprocess_task(getattr(task, split), task.modality)
        labels = ds["label"]
        ds = ds.add_column("target", [scenario.target(task, int(y)) for y in labels])
        ds = ds.add_column("task_id", [task.id] * len(labels))
        if split != "train" and "input_ids" in ds.column_names and len(ds):
            # Evaluation splits only: batches of similar length pad less; accuracy and F1 do not depend
            # on the order of the examples.
            lengths = np.array([len(ids) for ids in ds["input_ids"]])
            ds = ds.select(np.argsort(lengths, kind="stable"))
        setattr(task, split, ds)


class Collator:
    def __init__(self, backbone) -> None:
        self.backbone = backbone

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.backbone.collate_inputs(rows)
        batch["labels"] = torch.tensor([int(r["target"]) for r in rows], dtype=torch.long)
        batch["local_labels"] = torch.tensor([int(r["label"]) for r in rows], dtype=torch.long)
        batch["task_ids"] = torch.tensor([int(r["task_id"]) for r in rows], dtype=torch.long)
        return batch


class Engine:
    def __init__(self, cfg: RunConfig, accelerator=None, sequence: TaskSequence | None = None) -> None:
        # every option of the run's methods filled in, and the run settings checked, before the accelerator
        # (which would reject a bad --mixed_precision its own way)
        self.cfg = resolve_options(cfg).validate()
        self._given_sequence = sequence  # tests and notebooks may pass a sequence instead of a task name
        self.accelerator = accelerator or make_accelerator(cfg)
        self.is_main = self.accelerator.is_main_process
        self.run_dir: Path | None = None
        self.rundir: RunDir | None = None
        self.resume_changes: dict[str, list] = {}  # flags --resume changed after a failure (cli.resume_config)
        self.history: list[dict] = []  # failures and resumes of this run directory, oldest first
        self.eval_counts: dict[tuple[int, str], int] = {}  # (task, split) -> examples in the latest evaluation

    # -- set-up --------------------------------------------------------------------------
    def setup(self) -> None:
        from accelerate.utils import set_seed

        cfg = self.cfg.validate()
        set_seed(cfg.seed)
        ctx = reader_context(cfg)
        approach_cls = self.canonical_names()
        if self._given_sequence is not None:
            self.seq = self._given_sequence
        else:
            with self.accelerator.main_process_first():
                self.seq = load_task_sequence(cfg.task, ctx)
        if len(self.seq) == 0:
            raise ValueError(f"task sequence '{cfg.task}' has no tasks (check --ntasks)")
        # Modality checks, all before any data is preprocessed or anything trained.
        handled = approach_cls.modalities_for(cfg)
        bad = [f"{t.name} ({t.modality})" for t in self.seq if t.modality not in handled]
        if bad:
            raise ValueError(f"--baseline {cfg.baseline} handles {', '.join(handled)} tasks on --backbone "
                             f"{cfg.backbone}, not tasks {bad}")
        self.spec = backbone_spec(self.seq)
        self.backbone = build_backbone(cfg, self.spec)
        bad = [f"{t.name} ({t.modality})" for t in self.seq if not self.backbone.accepts(t.modality)]
        if bad:
            hint = ("; a sequence mixing text and images needs --backbone dual" if len(self.seq.modalities) > 1
                    else "; choose a backbone for that modality")
            raise ValueError(f"--backbone {cfg.backbone} cannot take tasks {bad}{hint}")
        with self.accelerator.main_process_first():
            for task in self.seq:
                prepare_task(task, self.backbone, self.scenario)
        self.collate = Collator(self.backbone)
        if not self.scenario.task_boundaries and self.accelerator.num_processes > 1:
            raise ValueError(f"--scenario {self.scenario.name} is one stream seen in order: run it in one process "
                             f"(python run.py), not {self.accelerator.num_processes}")
        run_cfg = cfg.with_batch_scaled_lr(self.accelerator.num_processes)
        self.approach: Approach = approach_cls(self.backbone, self.seq, self.scenario, run_cfg)
        self.approach.to(self.accelerator.device)
        self.approach.bind(self.accelerator, self.collate)
        self.matrix = AccuracyMatrix(len(self.seq), [t.name for t in self.seq])
        if self.scenario.global_labels:
            self.matrix.til_acc = np.full((len(self.seq), len(self.seq)), np.nan)
        self.minutes: list[float] = []

    def canonical_names(self):
        """Scenario and approach under their registry names (aliases resolved); the approach class."""
        self.scenario = get_scenario(self.cfg.scenario)
        self.cfg.scenario = self.scenario.name
        approach_cls = APPROACHES.get(self.cfg.baseline)
        self.cfg.baseline = approach_cls.name
        check_backbone_name(self.cfg.backbone)
        validate_options(self.cfg)  # each method checks its own options
        approach_cls.check_scenario(self.scenario)  # before any data is prepared
        return approach_cls

    def make_run_dir(self) -> bool:
        """Create (or, with --resume, reopen) the run directory and write config.yaml: before any data is
        read, so an output directory that cannot be written fails at once. True if this call created it."""
        from accelerate.utils import broadcast_object_list

        cfg = self.cfg
        if cfg.resume:
            path = Path(cfg.resume)
        else:
            name = cfg.run_name or f"{Path(cfg.task).stem}-{cfg.backbone.replace('/', '_')}-{cfg.baseline}-{time.strftime('%Y%m%d-%H%M%S')}"
            path = Path(cfg.output_dir) / name
        path = Path(broadcast_object_list([str(path)])[0])  # one name for all processes
        created = not path.exists()
        if not cfg.resume and (path / "metrics.json").exists():
            if not cfg.overwrite:
                raise FileExistsError(
                    f"run directory '{path}' already holds a run: pass --resume {path} to continue it, "
                    f"--overwrite to replace it, or another --run_name"
                )
            if self.is_main:
                shutil.rmtree(path)
        self.accelerator.wait_for_everyone()
        if self.is_main:
            if not cfg.resume:
                check_output_dir(Path(cfg.output_dir), "--output_dir")
            check_output_dir(path, "--resume" if cfg.resume else "--run_name")
        self.run_dir = path
        self.rundir = RunDir(path, self.is_main)
        self.rundir.write_config(cfg)
        return created

    # -- data ----------------------------------------------------------------------------
    def loader(self, dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
        if isinstance(dataset, ModalityGroups):  # joint training on a mixed sequence: one modality per batch
            dl = DataLoader(dataset, batch_sampler=dataset.batch_sampler(batch_size, shuffle, seed),
                            collate_fn=self.collate)
            return self.accelerator.prepare_data_loader(dl)
        gen = torch.Generator().manual_seed(seed)
        dl = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=self.collate, generator=gen)
        return self.accelerator.prepare_data_loader(dl)

    # -- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_task(self, task: Task, split: str = "test") -> tuple[float, float, float | None]:
        """(accuracy %, macro-F1 %, task-aware accuracy % for CIL or None) on one task's split."""
        from mmcl.stream import hide_task

        acc = self.accelerator
        approach = self.approach
        approach.eval()
        task_id = task.id if self.scenario.task_id_at_test else None
        preds, labels, til_preds, local = [], [], [], []
        hide = (lambda b: b) if self.scenario.task_boundaries else hide_task  # a task-free learner never sees ids
        for batch in self.loader(getattr(task, split), self.cfg.eval_batch_size, shuffle=False):
            with acc.autocast():
                logits = approach.predict(hide(batch), task_id).float()
            p = logits.argmax(-1)
            lo = task.class_offset
            tp = logits[:, lo : lo + task.num_classes].argmax(-1) if self.scenario.global_labels else p
            p, y, tp, yl = acc.gather_for_metrics((p, batch["labels"], tp, batch["local_labels"]))
            preds.append(p.cpu()); labels.append(y.cpu()); til_preds.append(tp.cpu()); local.append(yl.cpu())
        approach.train()
        y_true, y_pred = torch.cat(labels).numpy(), torch.cat(preds).numpy()
        self.eval_counts[(task.id, split)] = len(y_true)  # every example once, whatever the processes
        own = task.global_classes if self.scenario.global_labels else range(task.num_classes)
        a, f1 = accuracy_and_macro_f1(y_true, y_pred, num_classes=int(max(y_true.max(), y_pred.max(), max(own)) + 1),
                                      labels=own)
        til = None
        if self.scenario.global_labels:
            til = float((torch.cat(til_preds) == torch.cat(local)).float().mean() * 100)
        return a, f1, til

    def evaluate_all(self) -> tuple[list[float], list[float], list[float] | None]:
        rows = [self.evaluate_task(task) for task in self.seq]
        til = [r[2] for r in rows] if self.scenario.global_labels else None
        return [r[0] for r in rows], [r[1] for r in rows], til

    # -- training --------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.approach.named_parameters() if p.requires_grad}

    def train_task(self, task: Task) -> None:
        from accelerate.utils import set_seed
        from tqdm.auto import tqdm

        cfg, acc, approach = self.cfg, self.accelerator, self.approach
        set_seed(cfg.seed + task.id)
        approach.before_task(task)
        loader = self.loader(approach.train_dataset(task), cfg.train_batch_size, shuffle=True, seed=cfg.seed + task.id)
        optimizer = make_optimizer(approach.cfg, approach.parameter_groups())  # its rates: --lr_reference_batch
        params = [p for g in optimizer.param_groups for p in g["params"]]
        epochs = cfg.num_train_epochs * task.info.get("epoch_multiplier", 1.0)
        total = max(1, math.ceil(len(loader) * epochs))
        scheduler = make_scheduler(optimizer, cfg.lr_scheduler, total, cfg.warmup_proportion)
        model, optimizer, scheduler = acc.prepare(approach, optimizer, scheduler)
        step_once = OptimizerStep(optimizer, params, accelerator=acc, scheduler=scheduler, clipgrad=cfg.clipgrad,
                                  before_step=approach.before_optimizer_step, after_step=approach.after_optimizer_step)
        num_epochs = math.ceil(epochs)
        best, best_state = -1.0, None
        step = 0
        bar = tqdm(total=total, desc=f"task {task.id} {task.name}", disable=not (cfg.progress and acc.is_local_main_process))
        model.train()
        for epoch in range(num_epochs):
            steps_this_epoch = min(len(loader), total - step)
            running = 0.0
            for i, batch in enumerate(loader):
                if i >= steps_this_epoch:
                    break
                approach.progress.update(epoch, num_epochs, i, steps_this_epoch, step)
                loss = model(batch)
                step_once(loss, lambda: {"task": f"{task.id} ({task.name})", "epoch": f"{epoch + 1} of {num_epochs}",
                                         "step": f"{i + 1} of {steps_this_epoch} (step {step + 1} of {total} in the task)"})
                step += 1
                value = loss.item()
                running += value
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}")
            record: dict[str, Any] = {"event": "epoch", "task": task.id, "epoch": epoch,
                                      "loss": running / max(1, steps_this_epoch)}
            if step_once.skipped:
                record["skipped_steps"] = step_once.skipped  # fp16 grad-scaler overflows, not errors
            if cfg.select_best and num_epochs > 1:
                valid_acc = self.evaluate_task(task, "valid")[0]
                record["valid_acc"] = valid_acc
                if valid_acc > best:
                    best, best_state = valid_acc, self.trainable_state()
            self.log(record)
        bar.close()
        if best_state is not None:
            with torch.no_grad():
                for n, p in approach.named_parameters():
                    if n in best_state:
                        p.copy_(best_state[n])
        approach.after_task(task, self.loader(task.train, cfg.train_batch_size, shuffle=False))
        # drop this task's DDP wrapper, optimiser and loaders: one per task would pile up (gradient
        # buckets), and DDP reducers freed only at exit, after the process group, abort under gloo
        del model, optimizer, scheduler, step_once
        acc.free_memory()

    def train_stream(self, task: Task) -> None:
        """One pass over `task`'s training examples in batches of --online_batch_size, each example once.

        The learner gets neither `task` nor any hook at its end: only `observe(batch)` with the task id
        columns removed (`hide_task`); it owns its optimiser, since no boundary tells it when to renew one."""
        from accelerate.utils import set_seed

        from mmcl.stream import hide_task

        cfg, approach = self.cfg, self.approach
        set_seed(cfg.seed + task.id)
        loader = self.loader(task.train, cfg.online_batch_size, shuffle=True, seed=cfg.seed + task.id)
        approach.train()
        losses = []
        for i, batch in enumerate(loader):
            # no autocast here: the learner takes several optimiser steps per batch, and autocast caches
            # the low-precision weights for the whole region, so it wraps each step itself (`Approach.autocast`)
            try:
                loss = approach.observe(hide_task(batch))
            except NonFiniteError as e:  # the learner knows its step; the stream position is the engine's
                e.where = {"segment": f"{task.id} ({task.name})", "stream batch": f"{i + 1} of {len(loader)}", **e.where}
                raise NonFiniteError(e.what, e.value, e.where) from e
            if loss is not None:
                losses.append(float(loss))
        self.log({"event": "stream", "segment": task.id, "batches": len(loader),
                  "loss": sum(losses) / len(losses) if losses else None,  # None: nothing trained (LEViT all frozen)
                  **approach.stream_stats()})

    # -- output ----------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        if self.rundir is not None:
            self.rundir.log(record)

    def meta(self) -> dict[str, Any]:
        from mmcl import __version__

        n_params = sum(p.numel() for p in self.approach.parameters())
        n_train = sum(p.numel() for p in self.approach.parameters_to_train() if p.requires_grad)
        meta = {
            "task_sequence": self.seq.name, "tasks": [t.name for t in self.seq],
            "modalities": [t.modality for t in self.seq], "classes": [t.classes for t in self.seq],
            "image_shape": list(self.spec.image_shape) if self.spec.image_shape else None,
            "backbone": self.cfg.backbone, "approach": self.cfg.baseline, "scenario": self.scenario.name,
            "seed": self.cfg.seed, "idrandom": self.cfg.idrandom, "num_processes": self.accelerator.num_processes,
            "mixed_precision": self.cfg.mixed_precision, "parameters": n_params, "trainable_parameters": n_train,
            "minutes_per_task": self.minutes, "minutes": round(sum(self.minutes), 3), "mmcl_version": __version__,
        }
        if self.history:
            meta["history"] = self.history
        return meta

    def checkpoint(self, t: int) -> None:
        if not self.cfg.save_checkpoints:
            return
        state = {"task": t, "num_tasks": len(self.seq), "approach": self.cfg.baseline, "backbone": self.cfg.backbone,
                 "scenario": self.scenario.name, "task_sequence": self.seq.name,
                 "tasks": [task.name for task in self.seq],
                 "extra": self.approach.extra_state(), "matrix": self.matrix.to_dict(), "minutes": self.minutes}
        self.rundir.save_checkpoint(t, self.accelerator.unwrap_model(self.approach), state)

    def restore(self) -> int:
        """Load the newest complete checkpoint; return the first task still to train."""
        earlier = self.rundir.previous_metrics().get("meta") or {}
        self.history = list(earlier.get("history") or [])
        path = self.rundir.last_checkpoint()
        start = 0
        if path is not None:
            state = self.rundir.read_state(path)
            expected = {"num_tasks": len(self.seq), "approach": self.cfg.baseline, "scenario": self.scenario.name,
                        "backbone": self.cfg.backbone, "task_sequence": self.seq.name,
                        "tasks": [t.name for t in self.seq]}
            wrong = {k: (state.get(k), v) for k, v in expected.items() if k in state and state.get(k) != v}
            if wrong:
                raise CheckpointError(f"checkpoint '{path}' does not belong to this run: {wrong} (found, expected)")
            # extra state first: an approach that grows (LEViT's experts) rebuilds its modules before the weights load
            self.approach.load_extra_state(state["extra"])
            load_approach_weights(self.accelerator.unwrap_model(self.approach), path / "model.safetensors")
            self.matrix = AccuracyMatrix.from_dict(state["matrix"])
            self.minutes = list(state.get("minutes", []))
            start = state["task"] + 1
        self.history.append({"event": "resumed", "from_task": start, "changed": self.resume_changes})
        return start

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> AccuracyMatrix:
        self.cfg.validate()
        self.canonical_names()
        created = self.make_run_dir()
        try:
            self.setup()
        except BaseException:
            if created and self.is_main and {p.name for p in self.run_dir.iterdir()} <= {"config.yaml"}:
                shutil.rmtree(self.run_dir, ignore_errors=True)  # nothing but our own config.yaml: leave no trace
            raise
        start = self.restore() if self.cfg.resume else 0
        if start == 0 and not self.scenario.global_labels:
            # b_u for FWT: the untrained model on each task (not defined for CIL: unseen classes cannot be predicted)
            self.matrix.baseline = np.array(self.evaluate_all()[0], dtype=float)
        # a task-free scenario streams each task's examples to the learner with the task hidden; the rows of
        # the accuracy matrix are still filled, and checkpoints written, at the (hidden) task boundaries
        learn = self.train_task if self.scenario.task_boundaries else self.train_stream
        try:
            for task in self.seq.tasks[start:]:
                t0 = time.time()
                learn(task)
                self.minutes.append(round((time.time() - t0) / 60, 4))
                acc_row, f1_row, til_row = self.evaluate_all()
                self.matrix.set_row(task.id, acc_row, f1_row, til_row)
                self.log({"event": "task_done", "task": task.id, "acc": acc_row, "macro_f1": f1_row, "til_acc": til_row})
                self.report()
                self.checkpoint(task.id)
        except NonFiniteError as e:
            raise self.fail("non-finite", str(e), e.where) from e
        except OutputError as e:
            raise self.fail("output", str(e), {}) from e
        self.accelerator.wait_for_everyone()
        return self.matrix

    def fail(self, kind: str, message: str, where: dict) -> RunFailed:
        """Mark the run failed in metrics.json and results.md (no result is claimed) and build the error."""
        last = self.rundir.last_checkpoint()
        if last is not None:
            done = int(last.name.split("_")[1])
            resume = (f"last good checkpoint: {last} (tasks 0..{done} finished); `mmcl run --resume {self.run_dir}` "
                      f"continues from task {done + 1}")
        else:
            why = "no task finished" if self.cfg.save_checkpoints else "checkpoints are off (--no-save_checkpoints)"
            resume = (f"{why}, so there is no checkpoint; `mmcl run --resume {self.run_dir}` "
                      f"starts again from task 0")
        if kind == "non-finite":
            resume += " (with, say, a lower --learning_rate: a run that diverged may change its optimisation flags)"
        full = f"{message}. The run stopped and {self.run_dir / 'metrics.json'} marks it failed; {resume}"
        reason = {"kind": kind, "message": full, **{k: str(v) for k, v in where.items()},
                  "last_checkpoint": str(last) if last else None}
        self.history.append({"event": "failed", **reason})
        if self.is_main:
            try:  # best effort: on a full disk even this may not fit; the error below still says everything
                self.log({"event": "failed", **reason})
                write_report(self.run_dir, self.matrix, {**self.meta(), "status": "failed", "failure": reason})
            except Exception:  # noqa: BLE001
                pass
        return RunFailed(full, reason)

    def report(self) -> None:
        if self.is_main:
            with writing(self.run_dir / "metrics.json"):
                write_report(self.run_dir, self.matrix, self.meta())


def load_approach_weights(approach: torch.nn.Module, file: Path) -> None:
    """safetensors only (never pickle); a clear error when the file is corrupt or does not fit."""
    from safetensors.torch import load_model

    if not file.is_file():
        raise CheckpointError(f"checkpoint file '{file}' is missing")
    try:
        load_model(approach, str(file), strict=True, device=str(next(approach.parameters()).device))
    except Exception as e:  # safetensors raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint '{file}' cannot be loaded into this model: {e}") from e
