"""Atomic writes: a reader sees the old file or the new one, never a mix; a run killed mid-write
(preemption, OOM) leaves the previous complete file. The lowest layer: config, reports and checkpoints
all write through it."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

def _atomic_write(path: str | os.PathLike, write: Callable[[Any], None], binary: bool, suffix: str) -> None:
    path = Path(path)
    # Same directory as the target: os.replace is only atomic within one filesystem.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            # mkstemp creates 0600; keep an existing file's mode, else the usual 0644, so others can read results.
            os.fchmod(f.fileno(), path.stat().st_mode & 0o777 if path.exists() else 0o644)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable across a power loss; not possible on every platform, hence best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_binary_atomic(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """`write(f)` on a binary file that replaces `path` atomically (e.g. an Arrow stream writer's)."""
    _atomic_write(path, write, binary=True, suffix=".tmp")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers see the old or the new content, never a mix."""
    _atomic_write(path, lambda f: f.write(text), binary=False, suffix=".tmp")


def _jsonable(obj: Any) -> Any:
    # numpy values and NaN reach metrics and meta from many places; convert them here once.
    # Anything else unknown is left for json to reject, so a bug surfaces instead of being stringified.
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, str) else k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # strict JSON has no NaN / Infinity
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Serialise first, then replace ``path`` atomically; a serialisation error leaves the old file untouched."""
    text = json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n"
    write_text_atomic(path, text)
