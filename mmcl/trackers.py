"""Experiment trackers (`--report_to tensorboard,wandb,...`) through Accelerate's own tracking API.

Accelerate owns the trackers (`log_with`, `init_trackers`, `log`, `end_training`, main process only); this
module checks the names and that each tracker's package is installed (Accelerate would skip a missing one
with a warning: a run that was asked to report must not report nothing), points the local ones at the run
directory, and says what a continual run reports: the loss and learning rate of every step, each task's
accuracy row, the summary metrics at the end, and the accuracy-matrix figure where the tracker takes images.
The run's settings (config.yaml's) are the tracker's config.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

# --report_to name -> the package it needs (the extra: pip install 'mmcl[NAME]')
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                    "aim": "aim", "clearml": "clearml", "dvclive": "dvclive"}
PROJECT = "mmcl"  # the tracker's project; TensorBoard writes under <run dir>/mmcl/


def installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, a broken install
        return False


def tracker_names(report_to: str | None) -> list[str]:
    """The trackers `--report_to` names ('none', 'all' = every installed one, or a comma-separated list),
    each checked: an unknown name or a missing package is an error naming the flag and the package."""
    names = [n.strip() for n in (report_to or "none").split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    if "all" in names:
        return [n for n, pkg in TRACKER_PACKAGES.items() if installed(pkg)]
    unknown = [n for n in names if n not in TRACKER_PACKAGES]
    if unknown:
        raise ValueError(f"--report_to: unknown tracker(s) {', '.join(unknown)}; choose from none, all, "
                         f"{', '.join(TRACKER_PACKAGES)} (comma-separated)")
    missing = [n for n in names if not installed(TRACKER_PACKAGES[n])]
    if missing:
        pkgs = " ".join(TRACKER_PACKAGES[n] for n in missing)
        raise ValueError(f"--report_to {','.join(missing)} needs the package(s) {pkgs}, which are not installed: "
                         f"pip install {pkgs} (or pip install 'mmcl[{','.join(missing)}]')")
    return list(dict.fromkeys(names))


def _config_values(config: dict[str, Any]) -> dict[str, Any]:
    """Settings as scalars every tracker takes (TensorBoard's hparams refuse None and lists)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}


class RunTrackers:
    """The trackers of one run; every method does nothing when `--report_to` is none."""

    def __init__(self, accelerator, names: list[str], run_dir: Path, config: dict[str, Any]) -> None:
        self.accelerator, self.names = accelerator, names
        self.step = 0  # optimiser steps over the whole run: one x axis for every task
        if not names:
            return
        from accelerate.tracking import filter_trackers

        accelerator.project_configuration.set_directories(str(run_dir))
        accelerator.log_with = filter_trackers(names, str(run_dir))
        accelerator.init_trackers(PROJECT, config=_config_values(config),
                                  init_kwargs={"wandb": {"name": run_dir.name}})

    def log_step(self, loss: float, lr: float) -> None:
        self.step += 1
        if self.names:
            self.accelerator.log({"train/loss": loss, "train/learning_rate": lr}, step=self.step)

    def log_task(self, task: int, names: list[str], acc_row: list[float], f1_row: list[float]) -> None:
        if not self.names:
            return
        seen = acc_row[: task + 1]
        values = {f"accuracy/{u}_{name}": a for u, (name, a) in enumerate(zip(names, acc_row))}
        values.update({f"macro_f1/{u}_{name}": f for u, (name, f) in enumerate(zip(names, f1_row))})
        values["accuracy/mean_of_tasks_so_far"] = sum(seen) / len(seen)
        values["task"] = task
        self.accelerator.log(values, step=self.step)

    def log_summary(self, summary: dict[str, Any], figure: Path | None) -> None:
        if not self.names:
            return
        self.accelerator.log({f"summary/{k}": v for k, v in summary.items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=self.step)
        if figure is None or not figure.is_file() or not self.accelerator.is_main_process:
            return
        import matplotlib.image

        image = matplotlib.image.imread(str(figure))[..., :3]  # RGB, floats in [0, 1]
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"accuracy_matrix": image}, step=self.step, dataformats="HWC")
            elif tracker.name == "wandb":
                tracker.log_images({"accuracy_matrix": [image]}, step=self.step)

    def end(self) -> None:
        if self.names:
            self.accelerator.end_training()
