"""Readers `pycontinual_asc` and `pycontinual_dsc`: PyContinual's aspect and document sentiment tasks.

The data is read from a directory at run time and never shipped with the package (its licence is
unknown); a PyContinual checkout's own src/ or src/dat tree works as --data_dir.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from mmcl.data import READERS, DataFormatError, DataNotFoundError, ReaderContext
from mmcl.data.common import pycontinual_splits, order_roots, sequence_names
from mmcl.data.files import read_json_file, read_text_file, record
from mmcl.data.sequence import Task, TaskSequence, check_labels


# ----------------------------------------------------------------------------- PyContinual ASC

ASC_LABELS = {"+": 0, "positive": 0, "-": 1, "negative": 1, "neutral": 2}
ASC_GROUPS = ("XuSemEval", "Bing3Domains", "Bing5Domains", "Bing9Domains")
ASC_LAYOUT = (
    "The data is PyContinual's ASC (aspect sentiment) data: <data_dir>/asc/<group>/asc/<domain>/"
    "{train,dev,test}.json, e.g. asc/Bing3Domains/asc/Speaker/train.json and asc/XuSemEval/asc/14/rest/train.json "
    "(a PyContinual checkout's src or src/dat folder, or its dat/absa folder, also works). "
    "Pass it with --data_dir DIR or MMCL_DATA."
)


def asc_domain_folder(name: str) -> tuple[Path, list[str]]:
    """Folder (relative to the ASC root) and class names of a PyContinual ASC task name."""
    m = re.fullmatch(r"XuSemEval(\d+)_(\w+)", name)
    if m:
        return Path("XuSemEval", "asc", m.group(1), m.group(2)), ["positive", "negative", "neutral"]
    m = re.fullmatch(r"Bing(\d+)domains_(\w+)", name)
    if m:
        return Path(f"Bing{m.group(1)}Domains", "asc", m.group(2)), ["positive", "negative"]
    raise ValueError(
        f"ASC task name '{name}' is not of the form XuSemEval<yy>_<domain> or Bing<n>domains_<product> "
        f"(PyContinual's names, e.g. XuSemEval14_rest, Bing3domains_Speaker)"
    )


def asc_root(data_dir: Path) -> Path:
    """The folder holding the ASC groups: <data_dir>/asc (the shared layout), PyContinual's absa folder
    (data_dir = src/dat, or src: src/dat/absa), or the folder itself (data_dir = dat/absa)."""
    candidates = [data_dir / "asc", data_dir / "absa", data_dir / "dat" / "absa", data_dir]
    for root in candidates:
        if any((root / group).is_dir() for group in ASC_GROUPS):
            return root
    raise DataNotFoundError(
        f"no ASC data under '{data_dir}': none of {[str(c) for c in candidates]} holds "
        f"{', '.join(ASC_GROUPS)}. {ASC_LAYOUT}"
    )


def read_asc_file(path: Path, classes: Sequence[str] = ("positive", "negative", "neutral")) -> dict[str, list]:
    """(term, sentence, label) columns of one PyContinual ASC JSON file, in file order.

    `classes` are the task's classes: a polarity whose label is not among them (e.g. `neutral` in a
    2-class Bing task) is an error naming the file and record.
    """
    if not path.is_file():
        raise DataNotFoundError(f"ASC file '{path}' does not exist. {ASC_LAYOUT}")
    what = "ASC file"
    data = read_json_file(path, what, dict, "an object mapping record ids to {id, sentence, term, polarity}")
    if not data:
        raise DataFormatError(f"{what} '{path}' holds no records ({{}})")
    allowed = [p for p, label in ASC_LABELS.items() if label < len(classes)]
    rows: dict[str, list] = {"text": [], "text_pair": [], "label": []}
    for key, rec in data.items():
        where = f"{what} '{path}', record '{key}'"
        record(rec, where, ("sentence", "term", "polarity"), strings=("sentence", "term"))
        polarity = rec["polarity"]
        if not (isinstance(polarity, str) and polarity in allowed):
            raise DataFormatError(f"{where}: polarity {polarity!r} is not a label of this task "
                                  f"({len(classes)} classes: {', '.join(map(repr, allowed))})")
        # PyContinual feeds BERT the pair (term, sentence)
        rows["text"].append(rec["term"])
        rows["text_pair"].append(rec["sentence"])
        rows["label"].append(ASC_LABELS[polarity])
    return rows


@READERS.register("pycontinual_asc")
def read_pycontinual_asc(params: dict, ctx: ReaderContext) -> TaskSequence:
    """PyContinual's aspect sentiment classification (ASC) tasks, one per product/domain.

    Input pair (text, text_pair) = (aspect term, sentence). Labels: `+`/positive -> 0,
    `-`/negative -> 1, neutral -> 2; Bing tasks have 2 classes, SemEval tasks 3.
    Data: <data_dir>/asc/<group>/asc/<domain>/{train,dev,test}.json (the shared layout), or a
    PyContinual checkout's src/ or src/dat/ (data in dat/absa/), or its dat/absa/ folder.
    Task order: line ctx.idrandom of the order file (params.order_file, default
    asc_random, searched under <data_dir>/orders, <data_dir>, <data_dir>/data_prep, beside the
    data folder, and in PyContinual's src/data_prep), first ctx.ntasks names; without an order
    file, params.domains in its order.
    dev.json is the valid split. ctx.train_data_size keeps a seeded n of train (PyContinual
    "small"); params.max_train_per_task / ctx.max_train_per_task and params.max_eval_per_task cap splits.
    """
    data_dir = ctx.resolve_data_dir("pycontinual_asc", ASC_LAYOUT)
    root = asc_root(data_dir)
    names, order_source = sequence_names(params, ctx, order_roots(data_dir, root), "asc_random")
    tasks = []
    for name in names:
        rel, classes = asc_domain_folder(name)
        folder = root / rel
        if not folder.is_dir():
            raise DataNotFoundError(f"ASC task '{name}': folder '{folder}' does not exist. {ASC_LAYOUT}")
        rows = {split: read_asc_file(folder / f"{split}.json", classes) for split in ("train", "dev", "test")}
        splits = pycontinual_splits(rows, name, params, ctx, "asc")
        task = Task(
            id=len(tasks), name=name, modality="text", classes=list(classes),
            info={"domain": name, "source": str(folder)}, **splits,
        )
        check_labels(task)
        tasks.append(task)
    return TaskSequence("pycontinual_asc", tasks, info={"source": str(root), "order": order_source, "idrandom": ctx.idrandom})


# ----------------------------------------------------------------------------- PyContinual DSC

DSC_LABELS = {"-1": 0, "1": 1}
DSC_LAYOUT = (
    "The data is PyContinual's DSC (document sentiment) data: <data_dir>/dsc/<Domain>_{train,dev,test}.tsv "
    "(text<TAB>label, label -1 or 1), or PyContinual's <data_dir>/dsc/<Domain>/{train,dev,test}.json "
    "(a PyContinual checkout's src or src/dat folder also works). Pass it with --data_dir DIR or MMCL_DATA."
)


def dsc_root(data_dir: Path) -> Path:
    """The folder holding the DSC files: <data_dir>/dsc (the shared layout, or data_dir = PyContinual's src/dat),
    <data_dir>/dat/dsc (data_dir = PyContinual's src), or the folder itself."""
    candidates = [data_dir / "dsc", data_dir / "dat" / "dsc", data_dir]
    for root in candidates:
        if root.is_dir() and (any(root.glob("*_train.tsv")) or any(root.glob("*/train.json"))):
            return root
    raise DataNotFoundError(
        f"no DSC data under '{data_dir}': none of {[str(c) for c in candidates]} holds "
        f"<Domain>_train.tsv or <Domain>/train.json. {DSC_LAYOUT}"
    )


def read_dsc_tsv(path: Path) -> dict[str, list]:
    what = "DSC file"
    rows: dict[str, list] = {"text": [], "label": []}
    # split on '\n' only: a few reviews hold \r or other line-break characters
    for lineno, line in enumerate(read_text_file(path, what).split("\n"), 1):
        if not line:
            continue
        text, sep, label = line.rstrip("\r").rpartition("\t")
        if not sep:
            raise DataFormatError(f"{what} '{path}', line {lineno} has no tab; expected text<TAB>label")
        if label not in DSC_LABELS:
            raise DataFormatError(f"{what} '{path}', line {lineno}: label {label!r} is not -1 or 1")
        rows["text"].append(text)
        rows["label"].append(DSC_LABELS[label])
    return rows


def read_dsc_json(path: Path) -> dict[str, list]:
    what = "DSC file"
    data = read_json_file(path, what, dict, "an object mapping record ids to {id, sentence, term, polarity}")
    if not data:
        raise DataFormatError(f"{what} '{path}' holds no records ({{}})")
    rows: dict[str, list] = {"text": [], "label": []}
    for key, rec in data.items():
        where = f"{what} '{path}', record '{key}'"
        record(rec, where, ("sentence", "polarity"), strings=("sentence",))
        polarity = str(rec["polarity"])
        if polarity not in DSC_LABELS:
            raise DataFormatError(f"{where}: polarity {rec['polarity']!r} is not '-1' or '1'")
        rows["text"].append(rec["sentence"])
        rows["label"].append(DSC_LABELS[polarity])
    return rows


def read_dsc_domain(root: Path, name: str) -> tuple[dict[str, dict[str, list]], Path]:
    """train/dev/test rows of one DSC domain from either layout, and the path read."""
    tsv = {s: root / f"{name}_{s}.tsv" for s in ("train", "dev", "test")}
    if all(p.is_file() for p in tsv.values()):
        return {s: read_dsc_tsv(p) for s, p in tsv.items()}, root / f"{name}_{{train,dev,test}}.tsv"
    js = {s: root / name / f"{s}.json" for s in ("train", "dev", "test")}
    if all(p.is_file() for p in js.values()):
        return {s: read_dsc_json(p) for s, p in js.items()}, root / name
    raise DataNotFoundError(
        f"DSC task '{name}': neither {root / (name + '_{train,dev,test}.tsv')} nor "
        f"{root / name / '{train,dev,test}.json'} exists. {DSC_LAYOUT}"
    )


@READERS.register("pycontinual_dsc")
def read_pycontinual_dsc(params: dict, ctx: ReaderContext) -> TaskSequence:
    """PyContinual's document sentiment classification (DSC) tasks: Amazon review categories.

    Labels: -1 -> 0 (negative), 1 -> 1 (positive); no text_pair. Data: <data_dir>/dsc/ (or a
    PyContinual checkout's src/ or src/dat/, data in dat/dsc/), each domain as
    <Domain>_{train,dev,test}.tsv or <Domain>/{train,dev,test}.json. Task order: line
    ctx.idrandom of params.order_file (default dsc_random_10, found as for pycontinual_asc), first ctx.ntasks names;
    without an order file, params.domains. ctx.train_data_size keeps a seeded n of train
    (PyContinual "small"); caps as for pycontinual_asc.
    """
    data_dir = ctx.resolve_data_dir("pycontinual_dsc", DSC_LAYOUT)
    root = dsc_root(data_dir)
    names, order_source = sequence_names(params, ctx, order_roots(data_dir, root), "dsc_random_10")
    tasks = []
    for name in names:
        rows, source = read_dsc_domain(root, name)
        splits = pycontinual_splits(rows, name, params, ctx, "dsc")
        task = Task(
            id=len(tasks), name=name, modality="text", classes=["negative", "positive"],
            info={"domain": name, "source": str(source)}, **splits,
        )
        check_labels(task)
        tasks.append(task)
    return TaskSequence("pycontinual_dsc", tasks, info={"source": str(root), "order": order_source, "idrandom": ctx.idrandom})
