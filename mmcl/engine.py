"""The run loop: for each task, train it, then test every task; report and checkpoint row by row.

Runs the same under `python run.py` and `accelerate launch run.py` (Accelerate owns devices, processes,
precision). Task t starts from seed + t, so a run resumed from task t-1's checkpoint ends as the
uninterrupted one. Around it: data/prepare.py, optim.py, evaluation.py, rundir.py, reporting.py.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from accelerate.utils import set_seed

from mmcl.approaches import APPROACHES, Approach
from mmcl.backbones import build_backbone, check_backbone_name
from mmcl.config import RunConfig
from mmcl.data import load_task_sequence
from mmcl.data.prepare import Batcher, backbone_spec, check_modalities, make_loader, prepare_task, reader_context
from mmcl.data.sequence import Task, TaskSequence, get_scenario
from mmcl.devices import make_accelerator, release_prepared
from mmcl.engine_errors import NonFiniteError, OutputError, RunFailed
from mmcl.evaluation import BestEpoch, evaluate
from mmcl.flags import resolve_options, validate_options
from mmcl.metrics import AccuracyMatrix
from mmcl.optim import OptimizerStep, make_optimizer, make_scheduler
from mmcl.reporting import run_meta, write_report
from mmcl.rundir import RunDir, load_approach_weights, writing
from mmcl.stream import learn_stream
from mmcl.trackers import RunTrackers, tracker_names


class Engine:
    def __init__(self, cfg: RunConfig, accelerator=None, sequence: TaskSequence | None = None) -> None:
        self.cfg = resolve_options(cfg).validate()  # before the accelerator: it rejects --mixed_precision its own way
        self._given_sequence = sequence  # tests and notebooks may pass a sequence instead of a task name
        self.accelerator = accelerator or make_accelerator(cfg)
        self.is_main = self.accelerator.is_main_process
        self.rundir: RunDir | None = None
        self.resume_changes: dict[str, list] = {}  # flags --resume changed after a failure (flags.resume_config)
        self.history: list[dict] = []  # failures and resumes of this run directory, oldest first
        self.eval_counts: dict[tuple[int, str], int] = {}  # (task, split) -> examples in the latest evaluation
        self.trackers = RunTrackers(self.accelerator, [], Path("."), {})  # --report_to's, once the run dir exists

    @property
    def run_dir(self) -> Path | None:
        return self.rundir.path if self.rundir is not None else None

    # -- set-up --------------------------------------------------------------------------
    def canonical_names(self) -> type[Approach]:
        """Scenario and approach under their registry names, every name and option checked: before any data."""
        self.scenario = get_scenario(self.cfg.scenario)
        self.cfg.scenario = self.scenario.name
        approach_cls = APPROACHES.get(self.cfg.baseline)
        self.cfg.baseline = approach_cls.name
        check_backbone_name(self.cfg.backbone)
        validate_options(self.cfg)  # each method checks its own options
        tracker_names(self.cfg.report_to)  # a tracker whose package is missing: an error now, not a silent run
        approach_cls.check_scenario(self.scenario)
        return approach_cls

    def setup(self) -> None:
        cfg, acc = self.cfg.validate(), self.accelerator
        set_seed(cfg.seed)
        approach_cls = self.canonical_names()
        if self._given_sequence is not None:
            self.seq = self._given_sequence
        else:
            with acc.main_process_first():
                self.seq = load_task_sequence(cfg.task, reader_context(cfg))
        if len(self.seq) == 0:
            raise ValueError(f"task sequence '{cfg.task}' has no tasks (check --ntasks)")
        check_modalities(cfg, self.seq, approach_cls.modalities_for(cfg))  # before any data is preprocessed
        self.spec = backbone_spec(self.seq)
        self.backbone = build_backbone(cfg, self.spec)
        check_modalities(cfg, self.seq, approach_cls.modalities_for(cfg), self.backbone)
        # seconds per task: data preparation (this process's: a resumed run prepares again), training and the
        # evaluation after it (every task's split); `untrained` is FWT's evaluation before the first task
        self.seconds: dict[str, Any] = {"prepare": [], "train": [], "evaluate": [], "untrained": None}
        with acc.main_process_first():
            for task in self.seq:
                t0 = time.perf_counter()
                prepare_task(task, self.backbone, self.scenario)
                self.seconds["prepare"].append(round(time.perf_counter() - t0, 3))
        self.collate = Batcher(self.backbone)  # a split's tensors once (TensorSplit), or rows collated
        if not self.scenario.task_boundaries and acc.num_processes > 1:
            raise ValueError(f"--scenario {self.scenario.name} is one stream seen in order: run it in one process "
                             f"(python run.py), not {acc.num_processes}")
        run_cfg = cfg.with_batch_scaled_lr(acc.num_processes)  # the approach's rates: --lr_reference_batch
        self.approach: Approach = approach_cls(self.backbone, self.seq, self.scenario, run_cfg)
        self.approach.to(acc.device)
        self.approach.bind(acc, self.collate)
        self.matrix = AccuracyMatrix(len(self.seq), [t.name for t in self.seq])
        if self.scenario.global_labels:
            self.matrix.til_acc = np.full((len(self.seq), len(self.seq)), np.nan)

    def loader(self, dataset, batch_size: int, shuffle: bool, seed: int = 0):
        return make_loader(self.accelerator, self.collate, dataset, batch_size, shuffle, seed)

    # -- evaluation ------------------------------------------------------------------------
    def evaluate_task(self, task: Task, split: str = "test") -> tuple[float, float, float | None]:
        """(accuracy %, macro-F1 %, task-aware accuracy % for CIL or None) on one task's split."""
        loader = self.loader(getattr(task, split), self.cfg.eval_batch_size, shuffle=False)
        seen = [c for t in self.seq.tasks[: self.matrix.rows_done + 1] for c in t.global_classes]  # CIL macro-F1
        score = evaluate(self.approach, loader, task, self.scenario, self.accelerator, seen)
        self.eval_counts[(task.id, split)] = score.examples
        return score.acc, score.macro_f1, score.til_acc

    def selection_score(self, task: Task) -> float:
        """--select_best's score after an epoch: accuracy over the valid examples of the approach's
        `selection_tasks` (the task being trained; joint: every task so far, pooled)."""
        scores = [(self.evaluate_task(t, "valid")[0], self.eval_counts[(t.id, "valid")])
                  for t in self.approach.selection_tasks(task)]
        return sum(a * n for a, n in scores) / max(1, sum(n for _, n in scores))

    def evaluate_all(self) -> tuple[list[float], list[float], list[float] | None]:
        split = self.cfg.eval_split  # valid: for choosing settings
        # CIL: a task whose classes the model cannot output yet (masked, not seen) scores 0 without being run;
        # its task-aware accuracy (the argmax among its own all -inf outputs) means nothing: NaN
        known = self.approach.predictable_classes() if self.scenario.global_labels else None
        rows = []
        for task in self.seq:
            if known is not None and task.class_offset >= known:
                self.eval_counts[(task.id, split)] = len(getattr(task, split))
                rows.append((0.0, 0.0, float("nan")))
            else:
                rows.append(self.evaluate_task(task, split))
        self.matrix.examples = np.array([self.eval_counts[(t.id, split)] for t in self.seq], float)
        til = [r[2] for r in rows] if self.scenario.global_labels else None
        return [r[0] for r in rows], [r[1] for r in rows], til

    # -- training --------------------------------------------------------------------------
    def train_task(self, task: Task) -> None:
        from tqdm.auto import tqdm

        cfg, acc, approach = self.cfg, self.accelerator, self.approach
        set_seed(cfg.seed + task.id)
        if not approach.trains_task(task):  # e.g. joint trained once, at the last task
            self.log({"event": "task_not_trained", "task": task.id})
            return
        approach.before_task(task)
        loader = self.loader(approach.train_dataset(task), cfg.train_batch_size, shuffle=True, seed=cfg.seed + task.id)
        optimizer = make_optimizer(approach.cfg, approach.parameter_groups())  # a fresh one per task
        params = [p for g in optimizer.param_groups for p in g["params"]]
        epochs = cfg.num_train_epochs * task.info.get("epoch_multiplier", 1.0)
        total, num_epochs = max(1, math.ceil(len(loader) * epochs)), math.ceil(epochs)
        scheduler = make_scheduler(optimizer, cfg.lr_scheduler, total, cfg.warmup_proportion)
        model, optimizer, scheduler = acc.prepare(approach, optimizer, scheduler)
        step_once = OptimizerStep(optimizer, params, accelerator=acc, scheduler=scheduler, clipgrad=cfg.clipgrad,
                                  before_step=approach.before_optimizer_step, after_step=approach.after_optimizer_step)
        best, step = BestEpoch(approach) if cfg.select_best and num_epochs > 1 else None, 0
        bar = tqdm(total=total, desc=f"task {task.id} {task.name}", disable=not (cfg.progress and acc.is_local_main_process))
        model.train()
        for epoch in range(num_epochs):
            steps_this_epoch, running, t_epoch = min(len(loader), total - step), 0.0, time.perf_counter()
            for i, batch in enumerate(loader):
                if i >= steps_this_epoch:
                    break
                approach.progress.update(epoch, num_epochs, i, steps_this_epoch, step)
                loss = model(batch)
                step_once(loss, lambda: {"task": f"{task.id} ({task.name})", "epoch": f"{epoch + 1} of {num_epochs}",
                                         "step": f"{i + 1} of {steps_this_epoch} (step {step + 1} of {total} in the task)"})
                step, value = step + 1, loss.item()
                running += value
                self.trackers.log_step(value, optimizer.param_groups[0]["lr"])
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}")
            record: dict[str, Any] = {"event": "epoch", "task": task.id, "epoch": epoch,
                                      "loss": running / max(1, steps_this_epoch),
                                      "seconds": round(time.perf_counter() - t_epoch, 3)}  # training only
            if step_once.skipped:
                record["skipped_steps"] = step_once.skipped  # fp16 grad-scaler overflows, not errors
            if best is not None:  # --select_best, PyContinual's: keep the epoch best on the valid split
                record["valid_acc"] = best.offer(self.selection_score(task))
            self.log(record)
        bar.close()
        if best is not None:
            best.restore()
        approach.after_task(task, self.loader(task.train, cfg.train_batch_size, shuffle=False))
        # drop this task's DDP wrapper, optimiser and loaders: one per task would pile up (gradient
        # buckets), and DDP reducers freed only at exit, after the process group, abort under gloo
        del model, optimizer, scheduler, step_once
        release_prepared(acc)

    def train_stream(self, task: Task) -> None:
        """One pass over `task`'s training examples, each once, in batches of --online_batch_size; the learner
        sees only `observe(batch)` with the task hidden (`stream.learn_stream`)."""
        set_seed(self.cfg.seed + task.id)
        loader = self.loader(task.train, self.cfg.online_batch_size, shuffle=True, seed=self.cfg.seed + task.id)
        self.log(learn_stream(self.approach, loader, task))

    # -- output ----------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        if self.rundir is not None:
            self.rundir.log(record)

    def meta(self) -> dict[str, Any]:
        return run_meta(self.cfg, self.seq, self.spec, self.approach, self.accelerator.num_processes,
                        [round(s / 60, 4) for s in self.seconds["train"]], self.history, self.seconds)

    def identity(self) -> dict[str, Any]:
        """What a checkpoint of this run must match."""
        return {"num_tasks": len(self.seq), "approach": self.cfg.baseline, "scenario": self.scenario.name,
                "backbone": self.cfg.backbone, "task_sequence": self.seq.name, "tasks": [t.name for t in self.seq]}

    def checkpoint(self, t: int) -> None:
        if self.cfg.save_checkpoints:
            state = {"task": t, **self.identity(), "extra": self.approach.extra_state(),
                     "matrix": self.matrix.to_dict(),
                     "seconds": {k: self.seconds[k] for k in ("train", "evaluate", "untrained")}}
            self.rundir.save_checkpoint(t, self.accelerator.unwrap_model(self.approach), state)

    def restore(self) -> int:
        """Load the newest complete checkpoint; return the first task still to train."""
        self.history = list((self.rundir.previous_metrics().get("meta") or {}).get("history") or [])
        path, start = self.rundir.last_checkpoint(), 0
        if path is not None:
            state = self.rundir.read_checkpoint(path, self.identity())
            # extra state first: an approach that grows (LEViT's experts) rebuilds its modules before the weights load
            self.approach.load_extra_state(state["extra"])
            load_approach_weights(self.accelerator.unwrap_model(self.approach), path / "model.safetensors")
            self.matrix = AccuracyMatrix.from_dict(state["matrix"])
            # a checkpoint written before the seconds were recorded has the training minutes alone
            self.seconds.update(state.get("seconds") or {"train": [60 * m for m in state.get("minutes", [])]})
            start = state["task"] + 1
        self.history.append({"event": "resumed", "from_task": start, "changed": self.resume_changes})
        return start

    def report(self, plot: bool = True, **status: Any) -> None:
        if self.is_main:
            with writing(self.run_dir / "metrics.json"):
                write_report(self.run_dir, self.matrix, {**self.meta(), **status}, plot=plot)

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> AccuracyMatrix:
        self.cfg.validate()
        self.canonical_names()
        self.rundir = RunDir.open(self.cfg, self.accelerator)
        try:
            self.setup()
        except BaseException:
            self.rundir.remove_if_unused()  # nothing but our own config.yaml: leave no trace
            raise
        start = self.restore() if self.cfg.resume else 0
        self.trackers = RunTrackers(self.accelerator, tracker_names(self.cfg.report_to), self.run_dir,
                                    self.cfg.to_dict())
        if start == 0 and not self.scenario.global_labels:
            # b_u for FWT: the untrained model on each task (not defined for CIL: unseen classes cannot be predicted)
            t0 = time.perf_counter()
            self.matrix.baseline = np.array(self.evaluate_all()[0], dtype=float)
            self.seconds["untrained"] = round(time.perf_counter() - t0, 3)
        # a task-free scenario streams each task's examples to the learner with the task hidden; the rows of
        # the accuracy matrix are still filled, and checkpoints written, at the (hidden) task boundaries
        learn = self.train_task if self.scenario.task_boundaries else self.train_stream
        try:
            for task in self.seq.tasks[start:]:
                t0 = time.time()
                learn(task)
                self.seconds["train"].append(round(time.time() - t0, 3))
                t1 = time.perf_counter()
                acc_row, f1_row, til_row = self.evaluate_all()
                self.seconds["evaluate"].append(round(time.perf_counter() - t1, 3))
                self.matrix.set_row(task.id, acc_row, f1_row, til_row)
                self.log({"event": "task_done", "task": task.id, "acc": acc_row, "macro_f1": f1_row, "til_acc": til_row})
                self.trackers.log_task(task.id, [t.name for t in self.seq], acc_row, f1_row)
                # drawing the heatmap takes 0.3-1 s: after every task of a run whose tasks take minutes, but only
                # after the last one when tasks take seconds (where it would be most of the run's time)
                self.report(plot=task is self.seq.tasks[-1] or time.time() - t0 > 60)
                self.checkpoint(task.id)
        except NonFiniteError as e:
            raise self.fail("non-finite", str(e), e.where) from e
        except OutputError as e:
            raise self.fail("output", str(e), {}) from e
        self.trackers.log_summary(self.matrix.summary(), self.run_dir / "accuracy_matrix.png")
        self.trackers.end()
        self.accelerator.wait_for_everyone()
        return self.matrix

    def fail(self, kind: str, message: str, where: dict) -> RunFailed:
        """Mark the run failed in metrics.json and results.md (no result is claimed) and build the error."""
        reason = self.rundir.failure(kind, message, where, self.cfg.save_checkpoints)
        self.trackers.end()
        self.history.append({"event": "failed", **reason})
        try:  # best effort: on a full disk even this may not fit; the error itself says everything
            self.log({"event": "failed", **reason})
            self.report(status="failed", failure=reason)
        except OutputError:
            pass
        return RunFailed(reason["message"], reason)
