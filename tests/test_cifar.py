"""CIFAR-100 reader (binary version) and the conversion of the pickled python version, on small files."""
import pickle
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from mmcl.data import DataNotFoundError, ReaderContext, load_task_sequence
from mmcl.data.vision import CIFAR100_ORDERS, read_cifar100_bin


def fake_cifar(n_per_class: int, seed: int):
    rng = np.random.default_rng(seed)
    fine = np.repeat(np.arange(100), n_per_class)
    images = rng.integers(0, 256, (len(fine), 3, 32, 32), dtype=np.uint8)
    images[:, 0, 0, 0] = fine  # the label is readable from the pixels: checks the record layout
    return images, fine


def write_bin(path, images, fine):
    records = np.concatenate([(fine // 5)[:, None].astype(np.uint8), fine[:, None].astype(np.uint8),
                              images.reshape(len(fine), -1)], axis=1)
    records.tofile(path)


@pytest.fixture
def cifar_dir(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    for split, n, seed in (("train", 5, 0), ("test", 2, 1)):
        write_bin(folder / f"{split}.bin", *fake_cifar(n, seed))
    return tmp_path


def test_binary_reader_layout(cifar_dir):
    images, labels = read_cifar100_bin(cifar_dir / "cifar-100-binary" / "train.bin")
    assert images.shape == (500, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[:, 0, 0, 0], labels)  # HWC with R first
    (cifar_dir / "bad.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="bad.bin"):
        read_cifar100_bin(cifar_dir / "bad.bin")


@pytest.mark.parametrize("task, per_task", [("cifar100_10", 10), ("cifar100_20", 5)])
def test_steps_follow_dytox_class_orders(cifar_dir, task, per_task):
    for order in (0, 2):
        seq = load_task_sequence(task, ReaderContext(data_dir=cifar_dir, idrandom=order))
        assert len(seq) == 100 // per_task
        first = seq[0]
        assert first.info["class_ids"] == CIFAR100_ORDERS[order][:per_task]
        assert len(first.test) == 2 * per_task
        assert len(first.train) + len(first.valid) == 5 * per_task
        pixels = np.asarray(first.test["image"])[:, 0, 0, 0]  # global class id written into each image
        np.testing.assert_array_equal(pixels, np.asarray(first.info["class_ids"])[first.test["label"]])


def test_python_version_is_not_unpickled_but_converted_on_request(tmp_path):
    src = tmp_path / "cifar-100-python"
    src.mkdir()
    for split, n, seed in (("train", 3, 0), ("test", 1, 1)):
        images, fine = fake_cifar(n, seed)
        with open(src / split, "wb") as f:
            pickle.dump({b"data": images.reshape(len(fine), -1), b"fine_labels": fine.tolist(),
                         b"coarse_labels": (fine // 5).tolist()}, f)
    with open(src / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"class{i}".encode() for i in range(100)]}, f)
    with pytest.raises(DataNotFoundError, match="convert_cifar100.py"):
        load_task_sequence("cifar100_10", ReaderContext(data_dir=tmp_path))
    dst = tmp_path / "cifar-100-binary"
    done = subprocess.run([sys.executable, "scripts/convert_cifar100.py", str(src), str(dst)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0 and "unpickling" in done.stderr, done.stderr
    seq = load_task_sequence("cifar100_10", ReaderContext(data_dir=tmp_path))
    assert seq[0].classes == [f"class{c}" for c in CIFAR100_ORDERS[0][:10]]
    pixels = np.asarray(seq[0].test["image"])[:, 0, 0, 0]
    np.testing.assert_array_equal(pixels, np.asarray(seq[0].info["class_ids"])[seq[0].test["label"]])
