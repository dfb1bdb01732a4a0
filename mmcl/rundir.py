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
