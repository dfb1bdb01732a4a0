"""Reader `nli`: MultiNLI as PyContinual's NLI sequence, one 3-class task per genre.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mmcl.data import READERS, DataFormatError, DataNotFoundError, ReaderContext
from mmcl.data.common import pycontinual_splits, select_rows, seeded_rng, take_first_tasks
from mmcl.data.files import iter_lines, json_type, parse_json, read_json_file
from mmcl.data.sequence import Task, TaskSequence, check_labels


# ----------------------------------------------------------------------------- NLI (MultiNLI genres)

NLI_GENRES = ("fiction", "government", "slate", "telephone", "travel")
NLI_CLASSES = ["entailment", "neutral", "contradiction"]
NLI_LABELS = {name: i for i, name in enumerate(NLI_CLASSES)}
NLI_LAYOUT = (
    "The NLI data is MultiNLI, one task per genre (fiction, government, slate, telephone, travel), from --data_dir "
    "(or MMCL_DATA) holding one of: multinli_1.0_train.jsonl + multinli_1.0_dev_matched.jsonl (the MultiNLI zip, "
    "also under multinli_1.0/); GLUE's MNLI/train.tsv + dev_matched.tsv; or per-genre files "
    "nli/<genre>/{train,dev,test}.{json,jsonl,tsv} (PyContinual-style). Online, `source: hub` reads the "
    "`datasets` hub (nyu-mll/multi_nli)."
)


def _nli_record(rec: Any, where: str) -> tuple[str, str, str, int | None]:
    """(genre, premise, hypothesis, label or None for MultiNLI's '-' = no gold label) of one record."""
    if not isinstance(rec, dict):
        raise DataFormatError(f"{where} is {json_type(rec)}, expected an object with sentence1, sentence2, gold_label")
    premise = rec.get("sentence1", rec.get("premise"))
    hypothesis = rec.get("sentence2", rec.get("hypothesis"))
    if premise is None or hypothesis is None:
        raise DataFormatError(f"{where}: a record needs sentence1/sentence2 (or premise/hypothesis), has {sorted(rec)}")
    label = rec.get("gold_label", rec.get("label"))
    if isinstance(label, str) and label.lstrip("-").isdigit():
        label = int(label)
    if isinstance(label, int) and not isinstance(label, bool):  # the hub's ids (-1: no gold label)
        if label == -1:
            label = "-"
        elif 0 <= label < len(NLI_CLASSES):
            label = NLI_CLASSES[label]
        else:
            raise DataFormatError(f"{where}: label {label} is not a class id 0..{len(NLI_CLASSES) - 1} "
                                  f"({', '.join(NLI_CLASSES)}) or -1 (no gold label)")
    if label in ("-", "", None):
        return str(rec.get("genre", "")), premise, hypothesis, None
    if label not in NLI_LABELS:
        raise DataFormatError(f"{where}: label {label!r}; expected one of {NLI_CLASSES} (or '-' for no gold label)")
    return str(rec.get("genre", "")), premise, hypothesis, NLI_LABELS[label]


def read_nli_file(path: Path) -> list[tuple[str, str, str, int | None]]:
    """Records of a MultiNLI .jsonl, a GLUE MNLI .tsv (header row) or a .json (a list or a dict of records)."""
    if not path.is_file():
        raise DataNotFoundError(f"NLI file '{path}' does not exist. {NLI_LAYOUT}")
    what = "NLI file"
    out = []
    if path.suffix == ".jsonl":  # streamed: MultiNLI's train file is ~450 MB
        for lineno, line in iter_lines(path, what):
            if line.strip():
                where = f"{what} '{path}', line {lineno}"
                out.append(_nli_record(parse_json(line, where, one_line=True), where))
    elif path.suffix == ".tsv":
        # GLUE's MNLI tsv holds unbalanced quotes: no quoting, fields split on tabs (as csv's QUOTE_NONE does)
        header: list[str] | None = None
        for lineno, line in iter_lines(path, what):
            if header is None:
                header = line.split("\t")
            elif line:
                fields = line.split("\t")
                rec = dict(zip(header, fields + [None] * (len(header) - len(fields))))
                out.append(_nli_record(rec, f"{what} '{path}', line {lineno}"))
    else:
        data = read_json_file(path, what, (dict, list), "an array of records or an object mapping ids to records")
        for key, rec in (data.items() if isinstance(data, dict) else enumerate(data)):
            out.append(_nli_record(rec, f"{what} '{path}', record {key!r}"))
    if not out:
        raise DataFormatError(f"{what} '{path}' holds no records")
    return out


def _nli_rows(records, genre: str | None = None) -> dict[str, list]:
    rows: dict[str, list] = {"text": [], "text_pair": [], "label": []}
    for g, premise, hypothesis, label in records:
        if label is None or (genre is not None and g != genre):
            continue
        rows["text"].append(premise)  # a (premise, hypothesis) pair: BERT backbones encode it as a pair
        rows["text_pair"].append(hypothesis)
        rows["label"].append(label)
    return rows


def _first_file(candidates: list[Path]) -> Path | None:
    return next((p for p in candidates if p.is_file()), None)


def nli_genre_rows(root: Path, genres: list[str]) -> tuple[dict[str, dict[str, dict[str, list] | None]], str]:
    """{genre: {"train", "dev", "test": rows or None}} from whichever layout `root` holds, and a description.

    Pooled files (MultiNLI jsonl, GLUE tsv) have no test labels: their matched dev set is the test split
    and dev is None (carved from train by the reader)."""
    for folder in (root / "nli", root):
        per_genre = {}
        for g in genres:
            splits = {s: _first_file([folder / g / f"{s}.{ext}" for ext in ("jsonl", "json", "tsv")])
                      for s in ("train", "dev", "test")}
            per_genre[g] = splits
        if all(per_genre[g]["train"] is not None for g in genres):
            out = {}
            for g, splits in per_genre.items():
                if splits["test"] is None:
                    raise DataNotFoundError(f"NLI genre '{g}': {folder / g} has a train file but no test file. {NLI_LAYOUT}")
                out[g] = {s: (_nli_rows(read_nli_file(p)) if p is not None else None) for s, p in splits.items()}
            return out, str(folder)
    pooled = [
        (["multinli_1.0_train.jsonl", "multinli_1.0/multinli_1.0_train.jsonl"],
         ["multinli_1.0_dev_matched.jsonl", "multinli_1.0/multinli_1.0_dev_matched.jsonl"]),
        (["MNLI/train.tsv", "mnli/train.tsv", "train.tsv"], ["MNLI/dev_matched.tsv", "mnli/dev_matched.tsv", "dev_matched.tsv"]),
    ]
    for train_names, test_names in pooled:
        for folder in (root / "nli", root):
            train = _first_file([folder / n for n in train_names])
            test = _first_file([folder / n for n in test_names])
            if train is None:
                continue
            if test is None:
                raise DataNotFoundError(f"NLI: found '{train}' but not its matched dev file ({' or '.join(test_names)}). {NLI_LAYOUT}")
            train_records, test_records = read_nli_file(train), read_nli_file(test)
            return {g: {"train": _nli_rows(train_records, g), "dev": None, "test": _nli_rows(test_records, g)}
                    for g in genres}, f"{train} + {test.name}"
    raise DataNotFoundError(f"no NLI data under '{root}'. {NLI_LAYOUT}")


def nli_hub_rows(genres: list[str], dataset: str) -> dict[str, dict[str, dict[str, list] | None]]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset)
    except Exception as e:  # noqa: BLE001 - offline, unknown id, ...: one message that says what to do
        raise DataNotFoundError(f"NLI: cannot load '{dataset}' from the datasets hub ({type(e).__name__}: {e}). "
                                f"Offline, pass the files instead. {NLI_LAYOUT}") from e

    def records(split):
        return [_nli_record(r, f"{dataset}[{split}]") for r in ds[split]]

    train, test = records("train"), records("validation_matched")
    return {g: {"train": _nli_rows(train, g), "dev": None, "test": _nli_rows(test, g)} for g in genres}


@READERS.register("nli")
def read_nli(params: dict, ctx: ReaderContext) -> TaskSequence:
    """MultiNLI as PyContinual's NLI sequence: one 3-class task per genre (entailment, neutral, contradiction).

    Input pair (text, text_pair) = (premise, hypothesis); examples without a gold label ('-') are dropped.
    params: genres (default fiction, government, slate, telephone, travel, in this order), source (`files`,
    default, from --data_dir / MMCL_DATA; `hub` from the datasets hub, params.hub_dataset), valid_fraction
    (0.1: carved from train where the layout has no dev split), max_train_per_task, max_eval_per_task.
    ctx.ntasks keeps the first genres; ctx.train_data_size keeps a seeded n of train (PyContinual "small").
    """
    genres = list(params.get("genres") or NLI_GENRES)
    unknown = [g for g in genres if g not in NLI_GENRES]
    if unknown:
        raise ValueError(f"nli: unknown genre(s) {unknown}; MultiNLI's training genres are {list(NLI_GENRES)}")
    genres = take_first_tasks(genres, ctx.ntasks, "nli")
    source = params.get("source", "files")
    if source == "files":
        rows, where = nli_genre_rows(ctx.resolve_data_dir("nli", NLI_LAYOUT), genres)
    elif source == "hub":
        dataset = params.get("hub_dataset", "nyu-mll/multi_nli")
        rows, where = nli_hub_rows(genres, dataset), f"hub:{dataset}"
    else:
        raise ValueError(f"nli: params.source must be 'files' or 'hub', got {source!r}")
    valid_fraction = float(params.get("valid_fraction", 0.1))
    if not 0 <= valid_fraction < 1:
        raise ValueError(f"nli: valid_fraction must be in [0, 1), got {valid_fraction}")
    tasks = []
    for g in genres:
        split = rows[g]
        if not split["train"]["label"] or not split["test"]["label"]:
            raise ValueError(f"nli: genre '{g}' has no labelled {'train' if not split['train']['label'] else 'test'} "
                             f"examples in {where}")
        if split["dev"] is None:  # carve a seeded valid split from train
            n = len(split["train"]["label"])
            perm = seeded_rng(ctx.seed, "nli", g, "valid").permutation(n)
            n_valid = int(round(n * valid_fraction))
            split = {"train": select_rows(split["train"], np.sort(perm[n_valid:])),
                     "dev": select_rows(split["train"], np.sort(perm[:n_valid])), "test": split["test"]}
        splits = pycontinual_splits(split, g, params, ctx, "nli")
        task = Task(id=len(tasks), name=g, modality="text", classes=list(NLI_CLASSES),
                    info={"domain": g, "source": where}, **splits)
        check_labels(task)
        tasks.append(task)
    return TaskSequence("nli", tasks, info={"source": where})
