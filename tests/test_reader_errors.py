"""Bad data files: every reader fails with one line that names the file (and the line or record).

Each case writes a small tree into tmp_path with one bad file, runs the reader, and checks the
exception type (DataFormatError, a ValueError, or IdxFormatError) and that the message holds the
file's path and the given fragments (line number, record key, what is wrong).
"""
from __future__ import annotations

import gzip
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from mmcl.data import DataFormatError, ReaderContext, load_task_sequence
from mmcl.data import READERS
from mmcl.data.common import read_order_file
from mmcl.data.vision import IdxFormatError


def check(exc_info, path: Path, fragments: list[str]) -> None:
    msg = str(exc_info.value)
    assert str(path) in msg, msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    assert "\n" not in msg, msg  # the CLI prints it as one line


def with_bad_byte(text: str, line: int) -> bytes:
    """UTF-8 text with a 0xff byte at the start of `line` (1-based)."""
    lines = text.encode("utf-8").split(b"\n")
    lines[line - 1] = b"\xff" + lines[line - 1]
    return b"\n".join(lines)


# ----------------------------------------------------------------------------- PyContinual ASC

ASC_RECORDS = {
    "0": {"id": 0, "polarity": "+", "sentence": " the screen is great", "term": "screen"},
    "1": {"id": 1, "polarity": "-", "sentence": " the battery died", "term": "battery"},
}


def asc_json(**changes) -> str:
    records = json.loads(json.dumps(ASC_RECORDS))
    for key, rec in changes.items():
        records[key] = rec
    return json.dumps(records, indent=4)


def drop(key: str, field: str) -> dict:
    rec = dict(ASC_RECORDS[key])
    del rec[field]
    return rec


ASC_CASES = [
    pytest.param(b"", ["is empty"], id="empty"),
    pytest.param(asc_json()[:60].encode(), ["not valid JSON", "line 5"], id="truncated"),
    pytest.param(with_bad_byte(asc_json(), 3), ["not UTF-8", "0xff", "line 3"], id="non-utf8"),
    pytest.param(json.dumps(list(ASC_RECORDS.values())).encode(), ["top level", "array", "object"],
                 id="top-level-list"),
    pytest.param(asc_json(**{"1": "the battery died"}).encode(), ["record '1'", "string"], id="record-not-object"),
    pytest.param(asc_json(**{"1": drop("1", "term")}).encode(), ["record '1'", "'term'"], id="missing-term"),
    pytest.param(asc_json(**{"0": drop("0", "sentence")}).encode(), ["record '0'", "'sentence'"],
                 id="missing-sentence"),
    pytest.param(asc_json(**{"1": {**ASC_RECORDS["1"], "polarity": "neutral"}}).encode(),
                 ["record '1'", "'neutral'", "2 classes"], id="polarity-outside-task"),
    pytest.param(b"{}", ["no records"], id="no-records"),
]


@pytest.mark.parametrize("content, fragments", ASC_CASES)
def test_asc_bad_file(tmp_path, content, fragments):
    folder = tmp_path / "asc" / "Bing3Domains" / "asc" / "Speaker"
    folder.mkdir(parents=True)
    for split in ("dev", "test"):
        (folder / f"{split}.json").write_text(asc_json(), encoding="utf-8")
    bad = folder / "train.json"
    bad.write_bytes(content)
    with pytest.raises(DataFormatError) as e:
        READERS.get("pycontinual_asc")({"order_file": None, "domains": ["Bing3domains_Speaker"]},
                                       ReaderContext(data_dir=tmp_path))
    check(e, bad, fragments)


# ----------------------------------------------------------------------------- PyContinual DSC

DSC_TSV = "a fine book\t1\nit fell apart\t-1\n"
DSC_RECORDS = {"0": {"id": 0, "sentence": "a fine book", "term": None, "polarity": "1"},
               "1": {"id": 1, "sentence": "it fell apart", "term": None, "polarity": "-1"}}

DSC_TSV_CASES = [
    pytest.param(b"", ["is empty"], id="empty"),
    pytest.param(with_bad_byte(DSC_TSV, 2), ["not UTF-8", "0xff", "line 2"], id="non-utf8"),
    pytest.param(b"a fine book\t1\nit fell apart -1\n", ["line 2", "no tab"], id="line-without-tab"),
    pytest.param(b"a fine book\t0\nit fell apart\t-1\n", ["line 1", "'0'"], id="label-outside-set"),
]


@pytest.mark.parametrize("content, fragments", DSC_TSV_CASES)
def test_dsc_tsv_bad_file(tmp_path, content, fragments):
    folder = tmp_path / "dsc"
    folder.mkdir()
    for split in ("dev", "test"):
        (folder / f"Books_{split}.tsv").write_text(DSC_TSV, encoding="utf-8")
    bad = folder / "Books_train.tsv"
    bad.write_bytes(content)
    with pytest.raises(DataFormatError) as e:
        READERS.get("pycontinual_dsc")({"order_file": None, "domains": ["Books"]}, ReaderContext(data_dir=tmp_path))
    check(e, bad, fragments)


DSC_JSON_CASES = [
    pytest.param(b"", ["is empty"], id="empty"),
    pytest.param(json.dumps(DSC_RECORDS).encode()[:50], ["not valid JSON", "line 1"], id="truncated"),
    pytest.param(with_bad_byte(json.dumps(DSC_RECORDS, indent=2), 4), ["not UTF-8", "0xff", "line 4"],
                 id="non-utf8"),
    pytest.param(json.dumps(list(DSC_RECORDS.values())).encode(), ["top level", "array"], id="top-level-list"),
    pytest.param(json.dumps({"0": DSC_RECORDS["0"], "1": {"id": 1, "polarity": "-1"}}).encode(),
                 ["record '1'", "'sentence'"], id="missing-sentence"),
    pytest.param(b"{}", ["no records"], id="no-records"),
]


@pytest.mark.parametrize("content, fragments", DSC_JSON_CASES)
def test_dsc_json_bad_file(tmp_path, content, fragments):
    folder = tmp_path / "dsc" / "Books"
    folder.mkdir(parents=True)
    for split in ("dev", "test"):
        (folder / f"{split}.json").write_text(json.dumps(DSC_RECORDS), encoding="utf-8")
    bad = folder / "train.json"
    bad.write_bytes(content)
    with pytest.raises(DataFormatError) as e:
        READERS.get("pycontinual_dsc")({"order_file": None, "domains": ["Books"]}, ReaderContext(data_dir=tmp_path))
    check(e, bad, fragments)


# ----------------------------------------------------------------------------- NLI

NLI_RECS = [
    {"genre": "fiction", "sentence1": "A man sleeps.", "sentence2": "A man rests.", "gold_label": "entailment"},
    {"genre": "fiction", "sentence1": "A dog runs.", "sentence2": "A cat sits.", "gold_label": "contradiction"},
]
NLI_JSONL = "".join(json.dumps(r) + "\n" for r in NLI_RECS)
GLUE_HEADER = "index\tgenre\tsentence1\tsentence2\tgold_label\n"
GLUE_TSV = GLUE_HEADER + "".join(f"{i}\t{r['genre']}\t{r['sentence1']}\t{r['sentence2']}\t{r['gold_label']}\n"
                                 for i, r in enumerate(NLI_RECS))

NLI_CASES = [  # (file under data_dir, its content, fragments)
    pytest.param("nli/fiction/train.jsonl", b"", ["is empty"], id="jsonl-empty"),
    pytest.param("nli/fiction/train.jsonl", (NLI_JSONL + NLI_JSONL[:30] + "\n").encode(),
                 ["line 3", "not valid JSON"], id="jsonl-truncated-line"),
    pytest.param("nli/fiction/train.jsonl", with_bad_byte(NLI_JSONL, 2), ["not UTF-8", "0xff", "line 2"],
                 id="jsonl-non-utf8"),
    pytest.param("nli/fiction/train.jsonl", (NLI_JSONL + '["A man", "A woman", "neutral"]\n').encode(),
                 ["line 3", "array"], id="jsonl-record-not-object"),
    pytest.param("nli/fiction/train.jsonl", (NLI_JSONL + json.dumps({**NLI_RECS[0], "gold_label": 7}) + "\n").encode(),
                 ["line 3", "7"], id="jsonl-label-outside-set"),
    pytest.param("nli/fiction/train.json", json.dumps(NLI_RECS)[:70].encode(), ["not valid JSON"],
                 id="json-truncated"),
    pytest.param("nli/fiction/train.json", b'"fiction"', ["top level", "string"], id="json-top-level-string"),
    pytest.param("MNLI/train.tsv", with_bad_byte(GLUE_TSV, 3), ["not UTF-8", "0xff", "line 3"], id="tsv-non-utf8"),
    pytest.param("MNLI/dev_matched.tsv", b"", ["is empty"], id="tsv-empty"),
]


@pytest.mark.parametrize("rel, content, fragments", NLI_CASES)
def test_nli_bad_file(tmp_path, rel, content, fragments):
    if rel.startswith("nli/"):
        folder = tmp_path / "nli" / "fiction"
        folder.mkdir(parents=True)
        (folder / "test.jsonl").write_text(NLI_JSONL, encoding="utf-8")
    else:
        (tmp_path / "MNLI").mkdir()
        for name in ("train.tsv", "dev_matched.tsv"):
            (tmp_path / "MNLI" / name).write_text(GLUE_TSV, encoding="utf-8")
    bad = tmp_path / rel
    bad.write_bytes(content)
    with pytest.raises(DataFormatError) as e:
        READERS.get("nli")({"genres": ["fiction"]}, ReaderContext(data_dir=tmp_path))
    check(e, bad, fragments)


# ----------------------------------------------------------------------------- vader4

VADER_TXT = "1_1\t-1.5\tawful\n1_2\t2.0\tgreat\n1_3\t0.9\tnice enough\n"

VADER_CASES = [
    pytest.param("amazonReviewSnippets_GroundTruth.txt", b"", ["is empty"], id="txt-empty"),
    pytest.param("amazonReviewSnippets_GroundTruth.txt", with_bad_byte(VADER_TXT, 3), ["not UTF-8", "0xff", "line 3"],
                 id="txt-non-utf8"),
    pytest.param("amazonReviewSnippets_GroundTruth.txt", b"1_0\tbad\tno score\n" + VADER_TXT.encode(),
                 ["line 1", "'bad'", "not a number"], id="txt-sentiment-not-a-number-line-1"),
    pytest.param("amazonReviewSnippets_GroundTruth.txt", (VADER_TXT + "1_4\tnan\tmeh\n").encode(),
                 ["line 4", "'nan'"], id="txt-sentiment-nan"),
    pytest.param("amazonReviewSnippets_GroundTruth.csv", with_bad_byte("id,sentiment,text\n1,2.0,great\n", 2),
                 ["not UTF-8", "line 2"], id="csv-non-utf8"),
    pytest.param("amazonReviewSnippets_GroundTruth.csv.gz",
                 gzip.compress(b"id,sentiment,text\n1,2.0,great\n2,-1.5,awful\n")[:30], ["gzip"],
                 id="csv-gz-truncated"),
]


@pytest.mark.parametrize("name, content, fragments", VADER_CASES)
def test_vader4_bad_file(tmp_path, name, content, fragments):
    bad = tmp_path / name
    bad.write_bytes(content)
    with pytest.raises(DataFormatError) as e:
        READERS.get("vader4")({"domains": ["amazon"], "path": str(tmp_path)}, ReaderContext())
    check(e, bad, fragments)


# ----------------------------------------------------------------------------- split_fmnist idx files


def idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def fmnist_tree(folder: Path) -> dict[str, bytes]:
    labels = np.arange(20, dtype=np.uint8) % 10
    images = np.zeros((20, 4, 4), dtype=np.uint8)
    return {"train-images-idx3-ubyte": idx_bytes(images), "train-labels-idx1-ubyte": idx_bytes(labels),
            "t10k-images-idx3-ubyte": idx_bytes(images), "t10k-labels-idx1-ubyte": idx_bytes(labels)}


def bad_deflate(raw: bytes) -> bytes:
    """A gzip member with a valid header whose deflate stream is garbage (zlib.error on decompress)."""
    good = gzip.compress(raw)
    return good[:10] + b"\xff" * (len(good) - 10)


IDX_CASES = [
    pytest.param("train-images-idx3-ubyte.gz", lambda files: bad_deflate(files.pop("train-images-idx3-ubyte")),
                 ["gzip"], id="gz-corrupt-deflate"),
    pytest.param("train-labels-idx1-ubyte",
                 lambda files: idx_bytes(np.array([0, 1, 2, 12] + [3] * 16, dtype=np.uint8)),
                 ["label 12", "index 3", "0..9"], id="label-outside-0-9"),
]


@pytest.mark.parametrize("name, make, fragments", IDX_CASES)
def test_fmnist_bad_idx_file(tmp_path, name, make, fragments):
    files = fmnist_tree(tmp_path)
    content = make(files)
    for fname, raw in files.items():
        (tmp_path / fname).write_bytes(raw)
    bad = tmp_path / name
    bad.write_bytes(content)
    with pytest.raises(IdxFormatError) as e:
        READERS.get("split_fmnist")({"path": str(tmp_path)}, ReaderContext())
    check(e, bad, fragments)


# ----------------------------------------------------------------------------- CIFAR-100 binary


def cifar_bin(path: Path) -> None:
    fine = np.arange(100, dtype=np.uint8)
    records = np.concatenate([(fine // 5)[:, None], fine[:, None], np.zeros((100, 3072), np.uint8)], axis=1)
    records.tofile(path)


CIFAR_CASES = [
    pytest.param(with_bad_byte("\n".join(f"class{i}" for i in range(100)) + "\n", 2), ["not UTF-8", "line 2"],
                 id="label-names-non-utf8"),
    pytest.param(("\n".join(f"class{i}" for i in range(99)) + "\n").encode(), ["99 names", "100"],
                 id="label-names-99-lines"),
]


@pytest.mark.parametrize("content, fragments", CIFAR_CASES)
def test_cifar100_bad_file(tmp_path, content, fragments):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    for split in ("train", "test"):
        cifar_bin(folder / f"{split}.bin")
    bad = folder / "fine_label_names.txt"
    bad.write_bytes(content)
    with pytest.raises(DataFormatError) as e:
        READERS.get("cifar100")({"valid_fraction": 0.0}, ReaderContext(data_dir=tmp_path, ntasks=1))
    check(e, bad, fragments)


# ----------------------------------------------------------------------------- ImageNet-R image folders


def png(width: int, height: int, pixels: bytes = b"") -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = pixels or b"".join(b"\x00" + b"\x80" * (3 * width) for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


IMAGE_CASES = [
    # a header that claims 20000x20000 pixels: PIL refuses it (DecompressionBombError, not an OSError)
    pytest.param(png(20000, 20000, b"\x00" * 64), ["cannot be read", "pixels"], id="png-header-too-large"),
]


@pytest.mark.parametrize("content, fragments", IMAGE_CASES)
def test_imagenet_r_bad_image(tmp_path, content, fragments):
    root = tmp_path / "imagenet-r"
    for cls in ("n01", "n02"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            (root / cls / f"{i}.png").write_bytes(png(6, 6))
    bad = root / "n02" / "1.png"
    bad.write_bytes(content)
    with pytest.raises(DataFormatError) as e:
        READERS.get("imagenet_r")({"num_classes": 2, "classes_per_task": 2, "image_size": 4},
                                  ReaderContext(data_dir=tmp_path))
    check(e, bad, fragments)


# ----------------------------------------------------------------------------- task-sequence YAML files

YAML_CASES = [
    pytest.param(b"", ["is empty"], id="empty"),
    pytest.param(b"reader: split_digits\nparams: {classes_per_task: [2, 5}\n", ["not valid YAML", "line 2"],
                 id="invalid-syntax"),
    pytest.param(b"name: x\nreader: split_digits\n\xff\n", ["not UTF-8", "0xff", "line 3"], id="non-utf8"),
    pytest.param(b"- reader: split_digits\n", ["top level", "list", "mapping"], id="top-level-list"),
    pytest.param(b"name: x\nparams: {}\n", ["'reader'", "split_digits"], id="missing-reader"),
    pytest.param(b"reader: split_digitz\n", ["unknown reader 'split_digitz'", "split_digits"], id="unknown-reader"),
    pytest.param(b"reader: split_digits\nparams: [classes_per_task, 2]\n", ["'params'", "mapping", "list"],
                 id="params-not-a-mapping"),
]


@pytest.mark.parametrize("content, fragments", YAML_CASES)
def test_task_yaml_bad_file(tmp_path, content, fragments):
    bad = tmp_path / "seq.yaml"
    bad.write_bytes(content)
    with pytest.raises(DataFormatError) as e:
        load_task_sequence(str(bad), ReaderContext())
    check(e, bad, fragments)


MIXED_PART_CASES = [  # (the part's own YAML file, or None for an inline part; the inline part; fragments; bad file)
    pytest.param(b"reader: split_digits\nparams: {a: [1}\n", None, ["not valid YAML", "line 2"],
                 "part", id="part-file-invalid-syntax"),
    pytest.param(b"- reader: split_digits\n", None, ["top level", "mapping"], "part",
                 id="part-file-top-level-list"),
    pytest.param(b"params: {}\n", None, ["'reader'", "split_digits"], "part", id="part-file-missing-reader"),
    pytest.param(b"reader: nope\n", None, ["unknown reader 'nope'"], "part",
                 id="part-file-unknown-reader"),
    pytest.param(b"reader: split_digits\nparams: 3\n", None, ["'params'", "mapping"], "part",
                 id="part-file-params-not-a-mapping"),
    pytest.param(None, {"reader": "nope"}, ["part 'image'", "unknown reader 'nope'"], "mixed",
                 id="inline-unknown-reader"),
    pytest.param(None, {"reader": "split_digits", "params": [1, 2]}, ["part 'image'", "params", "mapping"], "mixed",
                 id="inline-params-not-a-mapping"),
]


@pytest.mark.parametrize("part_yaml, part, fragments, bad_file", MIXED_PART_CASES)
def test_mixed_part_bad(tmp_path, part_yaml, part, fragments, bad_file):
    import yaml

    part_path = tmp_path / "part.yaml"
    if part_yaml is not None:
        part_path.write_bytes(part_yaml)
        part = {"task": str(part_path)}
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text(yaml.safe_dump({"reader": "mixed", "params": {
        "parts": {"image": part, "digits": {"reader": "split_digits"}}, "order": ["image", "digits"]}}))
    with pytest.raises(DataFormatError) as e:
        load_task_sequence(str(mixed), ReaderContext())
    check(e, part_path if bad_file == "part" else mixed, fragments)


# ----------------------------------------------------------------------------- order files

ORDER_CASES = [
    pytest.param(b"", ["is empty"], id="empty"),
    pytest.param(b"\n\n", ["is empty"], id="blank-lines-only"),
    pytest.param(b"Books\tBaby\nBaby\t\xffBooks\n", ["not UTF-8", "0xff", "line 2"], id="non-utf8"),
]


@pytest.mark.parametrize("content, fragments", ORDER_CASES)
def test_order_file_bad(tmp_path, content, fragments):
    bad = tmp_path / "dsc_random_10"
    bad.write_bytes(content)
    with pytest.raises(DataFormatError) as e:
        read_order_file(bad, 0, None)
    check(e, bad, fragments)


# ----------------------------------------------------------------------------- end to end through the CLI


def test_cli_names_truncated_asc_file(tmp_path, capsys):
    """The path reaches the user as one `mmcl: error:` line, exit code 2, before any model is built."""
    from mmcl.cli import main

    folder = tmp_path / "data" / "asc" / "Bing3Domains" / "asc" / "Speaker"
    folder.mkdir(parents=True)
    for split in ("dev", "test"):
        (folder / f"{split}.json").write_text(asc_json(), encoding="utf-8")
    bad = folder / "train.json"
    bad.write_text(asc_json()[:60], encoding="utf-8")
    task = tmp_path / "asc_small.yaml"
    task.write_text("reader: pycontinual_asc\nparams: {order_file: null, domains: [Bing3domains_Speaker]}\n")
    code = main(["run", "--task", str(task), "--data_dir", str(tmp_path / "data"), "--backbone", "bert_adapter",
                 "--baseline", "finetune", "--output_dir", str(tmp_path / "runs"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("mmcl: error:")]
    assert len(lines) == 1 and str(bad) in lines[0] and "not valid JSON" in lines[0], err
    assert "Traceback" not in err
