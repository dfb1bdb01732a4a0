"""The run directory: config.yaml, log.jsonl, reports and checkpoints, and what goes wrong writing them.

Every write here either completes or leaves the previous complete file: reports through the atomic
writers of `reporting`, checkpoints as a directory written under a temporary name and renamed. A
write that fails (a full disk, a permission) becomes one `OutputError` naming the path and the free
space, after the partial checkpoint is removed, so `--resume` continues from the last complete one
once the cause is fixed.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

from mmcl.engine_errors import CheckpointError, OutputError

CHECKPOINTS = "checkpoints"
CONFIG_FILE = "config.yaml"
LOG_FILE = "log.jsonl"


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_space(path: str | os.PathLike) -> str:
    """Free space on the filesystem that holds (or would hold) `path`, for error messages."""
    try:
        free = shutil.disk_usage(_existing_ancestor(Path(path))).free
    except OSError:
        return "unknown free space"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit} free" if unit == "bytes" else f"{free:.1f} {unit} free"
        free /= 1024
    return ""


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}"


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str = "write") -> Iterator[None]:
    """Turn any failure of the writes inside into an OutputError naming `path` and the free space.

    safetensors reports a full disk as its own SafetensorError, not an OSError, hence the broad catch;
    an interruption (KeyboardInterrupt, a kill) is not caught."""
    try:
        yield
    except OutputError:
        raise
    except Exception as e:  # noqa: BLE001
        raise OutputError(f"cannot {what} '{path}': {_reason(e)} ({free_space(path)})") from e


def check_output_dir(path: Path, flag: str = "--output_dir") -> None:
    """Create `path` (and its parents) and prove it writable, before any data is prepared."""
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            raise OutputError(f"{flag}: cannot create '{path}': '{parent}' is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{flag}: cannot create '{path}': {_reason(e)} ({free_space(path)})") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(f"{flag}: '{path}' is not writable")


class RunDir:
    """One run's directory. Only the main process writes; the others read."""

    def __init__(self, path: str | os.PathLike, is_main: bool = True) -> None:
        self.path = Path(path)
        self.is_main = is_main
        self.created = False  # by this process, now: a run whose set-up fails removes it again

    @classmethod
    def open(cls, cfg, accelerator) -> "RunDir":
        """Create (or, with --resume, reopen) the run directory and write config.yaml, before any data is
        read, so that an output directory that cannot be written fails at once."""
        from accelerate.utils import broadcast_object_list

        if cfg.resume:
            path = Path(cfg.resume)
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            name = cfg.run_name or f"{Path(cfg.task).stem}-{cfg.backbone.replace('/', '_')}-{cfg.baseline}-{stamp}"
            path = Path(cfg.output_dir) / name
        path = Path(broadcast_object_list([str(path)])[0])  # one name for all processes
        run_dir = cls(path, accelerator.is_main_process)
        run_dir.created = not path.exists()
        if not cfg.resume and (path / "metrics.json").exists():
            if not cfg.overwrite:
                raise FileExistsError(f"run directory '{path}' already holds a run: pass --resume {path} to continue "
                                      f"it, --overwrite to replace it, or another --run_name")
            if run_dir.is_main:
                shutil.rmtree(path)
        accelerator.wait_for_everyone()
        if run_dir.is_main:
            if not cfg.resume:
                check_output_dir(Path(cfg.output_dir), "--output_dir")
            check_output_dir(path, "--resume" if cfg.resume else "--run_name")
        run_dir.write_config(cfg)
        return run_dir

    def remove_if_unused(self) -> None:
        """After a failed set-up: remove the directory this run created, if it holds only its config.yaml."""
        if self.created and self.is_main and {p.name for p in self.path.iterdir()} <= {CONFIG_FILE}:
            shutil.rmtree(self.path, ignore_errors=True)

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def write_config(self, cfg) -> None:
        if self.is_main:
            with writing(self.path / CONFIG_FILE):
                cfg.save(self.path / CONFIG_FILE)

    def log(self, record: dict) -> None:
        if self.is_main:
            with writing(self.path / LOG_FILE, "append to"), open(self.path / LOG_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, t: int, model, state: dict[str, Any]) -> Path:
        """`checkpoints/task_t/{model.safetensors,state.json}`, whole or not at all."""
        from safetensors.torch import save_model

        from mmcl.atomic import write_json_atomic

        final, tmp = self.checkpoints / f"task_{t}", self.checkpoints / f".task_{t}.tmp"
        if not self.is_main:
            return final
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with writing(tmp / "model.safetensors"):
                tmp.mkdir(parents=True)
                save_model(model, str(tmp / "model.safetensors"))
            with writing(tmp / "state.json"):
                write_json_atomic(tmp / "state.json", state)
            with writing(final, "replace"):
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
        except OutputError:
            shutil.rmtree(tmp, ignore_errors=True)  # frees what the partial write took; older checkpoints stay
            raise
        return final

    def done_tasks(self) -> list[int]:
        """Tasks with a complete checkpoint, newest first (a `.task_t.tmp` left by a kill is not one)."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for p in self.checkpoints.glob("task_*"):
            suffix = p.name.split("_", 1)[1]
            if suffix.isdigit() and (p / "state.json").is_file():
                found.append(int(suffix))
        return sorted(found, reverse=True)

    def last_checkpoint(self) -> Path | None:
        done = self.done_tasks()
        return self.checkpoints / f"task_{done[0]}" if done else None

    def read_checkpoint(self, path: Path, expected: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint's state; a CheckpointError if it is unreadable or belongs to another run."""
        state = self.read_state(path)
        wrong = {k: (state.get(k), v) for k, v in expected.items() if k in state and state.get(k) != v}
        if wrong:
            raise CheckpointError(f"checkpoint '{path}' does not belong to this run: {wrong} (found, expected)")
        return state

    def failure(self, kind: str, message: str, where: dict[str, Any], checkpoints: bool) -> dict[str, Any]:
        """The reason a failed run records, its message saying where to resume from."""
        last = self.last_checkpoint()
        if last is not None:
            done = int(last.name.split("_")[1])
            resume = (f"last good checkpoint: {last} (tasks 0..{done} finished); `mmcl run --resume {self.path}` "
                      f"continues from task {done + 1}")
        else:
            why = "no task finished" if checkpoints else "checkpoints are off (--no-save_checkpoints)"
            resume = f"{why}, so there is no checkpoint; `mmcl run --resume {self.path}` starts again from task 0"
        if kind == "non-finite":
            resume += " (with, say, a lower --learning_rate: a run that diverged may change its optimisation flags)"
        full = f"{message}. The run stopped and {self.path / 'metrics.json'} marks it failed; {resume}"
        return {"kind": kind, "message": full, **{k: str(v) for k, v in where.items()},
                "last_checkpoint": str(last) if last else None}

    def read_state(self, path: Path) -> dict[str, Any]:
        try:
            with open(path / "state.json", encoding="utf-8") as f:
                state = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"checkpoint '{path / 'state.json'}' is unreadable: {e}") from e
        if not isinstance(state, dict) or "task" not in state:
            raise CheckpointError(f"checkpoint '{path / 'state.json'}' is malformed: no 'task' entry")
        return state

    # -- earlier attempts ----------------------------------------------------------------------
    def previous_metrics(self) -> dict[str, Any]:
        """metrics.json as an earlier attempt left it ({} if there is none or it is unreadable)."""
        try:
            with open(self.path / "metrics.json", encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return doc if isinstance(doc, dict) else {}


def load_approach_weights(approach, file: Path) -> None:
    """safetensors only (never pickle); a clear error when the file is corrupt or does not fit."""
    from safetensors.torch import load_model

    if not file.is_file():
        raise CheckpointError(f"checkpoint file '{file}' is missing")
    try:
        load_model(approach, str(file), strict=True, device=str(next(approach.parameters()).device))
    except Exception as e:  # safetensors raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint '{file}' cannot be loaded into this model: {e}") from e
