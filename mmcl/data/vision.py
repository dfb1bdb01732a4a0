"""Image task-sequence readers: `split_fmnist` (Fashion-MNIST), `split_mnist` (MNIST), `split_digits`
(scikit-learn digits), `cifar100` (binary version) and `imagenet_r` (class folders of images).

The first three split a 10-class dataset into tasks of `classes_per_task` classes. Splits have the
columns `image` (uint8 HxW, stored as a datasets Array2D) and `label` (local 0..n-1).
"""
from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from mmcl.data import READERS, DataFormatError, DataNotFoundError, ReaderContext
from mmcl.data.cache import cache_dir
from mmcl.data.files import GZIP_MAGIC, gunzip, read_bytes, read_text_file
from mmcl.data.sequence import Task, TaskSequence, check_labels
from mmcl.data.common import seeded_rng, seeded_subset, split_classes, take_first_tasks, train_cap

if TYPE_CHECKING:
    import datasets


def image_dataset(images: np.ndarray, labels: np.ndarray) -> "datasets.Dataset":
    """A Dataset from (N, H, W[, C]) uint8 images; fixed-shape Array features keep it fast (no per-pixel lists)."""
    import datasets

    images = np.ascontiguousarray(images, dtype=np.uint8)
    shape = tuple(images.shape[1:])
    if len(shape) == 2:
        image_feature = datasets.Array2D(shape, "uint8")
    elif len(shape) == 3:
        image_feature = datasets.Array3D(shape, "uint8")
    else:
        raise ValueError(f"images must be (N, H, W) or (N, H, W, C), got shape {images.shape}")
    features = datasets.Features({"image": image_feature, "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"image": images, "label": np.asarray(labels, dtype=np.int64)}, features=features)


def _class_task(
    reader: str, chunk: list[int], class_names: Sequence[str], arrays: dict[str, tuple[np.ndarray, np.ndarray]],
    max_train: int | None, max_eval: int | None, seed: int, source: str,
) -> Task:
    """One task of a class split: keep the chunk's classes, relabel them 0..k-1, cap each split."""
    name = f"{reader}_{'_'.join(map(str, chunk))}"
    lut = np.full(len(class_names), -1, dtype=np.int64)
    lut[chunk] = np.arange(len(chunk))
    splits = {}
    for split, (x, y) in arrays.items():
        idx = np.flatnonzero(np.isin(y, chunk))
        cap = max_train if split == "train" else max_eval
        idx = idx[seeded_subset(len(idx), cap, seeded_rng(seed, reader, name, split, "cap"))]
        splits[split] = image_dataset(x[idx], lut[y[idx]])
    shape = tuple(next(iter(arrays.values()))[0].shape[1:])
    task = Task(
        id=0, name=name, modality="image", classes=[class_names[c] for c in chunk],
        info={"domain": name, "source": source, "class_ids": list(chunk), "image_shape": shape}, **splits,
    )
    check_labels(task)
    return task


# ----------------------------------------------------------------------------- idx files

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class IdxFormatError(DataFormatError):
    """A file is not a valid (optionally gzipped) idx file; the message names it."""


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (LeCun's MNIST format, gzipped or not) as a numpy array of its declared shape."""
    path = Path(path)
    raw = read_bytes(path, "idx file")
    if raw[:2] == GZIP_MAGIC:  # by content, not suffix: some mirrors store un-gzipped files as .gz
        raw = gunzip(raw, path, "idx file", error=IdxFormatError)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise IdxFormatError(
            f"idx file '{path}': bad magic number {raw[:4].hex() or '(empty file)'}; expected 00 00 <dtype> <ndim>"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxFormatError(f"idx file '{path}': truncated header ({len(raw)} bytes for {ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise IdxFormatError(
            f"idx file '{path}': {len(raw) - header} data bytes, but shape {dims} of {dtype} needs {expected}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="), copy=False)


# ----------------------------------------------------------------------------- Fashion-MNIST and MNIST

FMNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IDX_FILES = {  # the same four file names for MNIST and Fashion-MNIST
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class IdxDataset:
    """A 10-class image set shipped as the four MNIST-format idx files, and where to look for them."""

    reader: str  # the reader's name, e.g. split_fmnist
    prefix: str  # task names: <prefix>_<class>_<class>
    title: str  # in messages
    classes: tuple[str, ...]
    subdirs: tuple[str, ...]  # searched under --data_dir (and MMCL_DATA) besides itself
    torchvision: str  # torchvision.datasets class for a download; its raw/ folder under the cache
    how: str  # how to get the files, for the not-found message
    # folders searched after --data_dir. MNIST has none: its files have Fashion-MNIST's names, so a system
    # folder of the one must never stand in for the other
    system_dirs: tuple[Path, ...] = ()


FMNIST = IdxDataset("split_fmnist", "fmnist", "Fashion-MNIST", tuple(FMNIST_CLASSES),
                    ("fashion-mnist", "FashionMNIST/raw"), "FashionMNIST",
                    "Get it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu, installs "
                    "/usr/share/datasets/fashion-mnist), or",
                    system_dirs=(Path("/usr/share/datasets/fashion-mnist"),))  # Debian: dataset-fashion-mnist
MNIST = IdxDataset("split_mnist", "mnist", "MNIST", tuple(str(c) for c in range(10)), ("mnist", "MNIST/raw"), "MNIST",
                   "Download MNIST's idx files (e.g. torchvision.datasets.MNIST(root, download=True)) and")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("MMCL_OFFLINE") == "1"


def idx_files(folder: Path) -> dict[str, Path] | None:
    """The four idx files in `folder` (plain or .gz), or None if any is missing."""
    found = {}
    for key, stem in IDX_FILES.items():
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                found[key] = folder / name
                break
        else:
            return None
    return found


def idx_search_dirs(spec: IdxDataset, params: dict, ctx: ReaderContext) -> list[Path]:
    dirs = []
    if params.get("path"):
        dirs.append(Path(params["path"]).expanduser())
    root = ctx.data_dir or os.environ.get("MMCL_DATA")
    if root:
        root = Path(root).expanduser()
        dirs += [root, *(root / sub for sub in spec.subdirs)]
    dirs += spec.system_dirs
    dirs.append(cache_dir() / spec.torchvision / "raw")  # where an earlier download landed
    return dirs


def find_idx_files(spec: IdxDataset, params: dict, ctx: ReaderContext) -> dict[str, Path]:
    searched = idx_search_dirs(spec, params, ctx)
    for folder in searched:
        files = idx_files(folder)
        if files:
            return files
    how = (f"{spec.how} pass --data_dir DIR (or MMCL_DATA, or params.path) with the idx files "
           f"({', '.join(IDX_FILES.values())}, optionally .gz).")
    if offline():
        raise DataNotFoundError(
            f"{spec.title} not found in {', '.join(map(str, searched))}; not downloading "
            f"(HF_HUB_OFFLINE/MMCL_OFFLINE=1). {how}"
        )
    try:
        import torchvision

        for train in (True, False):
            getattr(torchvision.datasets, spec.torchvision)(root=str(cache_dir()), train=train, download=True)
    except Exception as e:  # no network, no torchvision, a mirror down: all end in the same advice
        raise DataNotFoundError(
            f"{spec.title} not found in {', '.join(map(str, searched))} and the torchvision download into "
            f"'{cache_dir()}' failed ({type(e).__name__}: {e}). {how}"
        ) from e
    raw = cache_dir() / spec.torchvision / "raw"
    files = idx_files(raw)
    if not files:
        raise DataNotFoundError(f"torchvision downloaded {spec.title} but '{raw}' lacks the idx files. {how}")
    return files


@functools.lru_cache(maxsize=2)
def _load_idx(title: str, files: tuple[tuple[str, Path], ...]) -> dict[str, np.ndarray]:
    # cached: a run builds the sequence once per process, but tests and sweeps build it often
    arrays = {key: read_idx(path) for key, path in files}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise IdxFormatError(
                f"{title} {split}: images {x.shape} ({dict(files)[f'{split}_images']}) do not match "
                f"labels {y.shape} ({dict(files)[f'{split}_labels']})"
            )
        bad = np.flatnonzero((y < 0) | (y >= 10))
        if bad.size:
            raise IdxFormatError(
                f"{title} labels file '{dict(files)[f'{split}_labels']}': label {y[bad[0]]} at index {bad[0]} "
                f"is outside 0..9" + (f" ({bad.size} labels are)" if bad.size > 1 else "")
            )
    for a in arrays.values():
        a.flags.writeable = False  # shared by every caller of the cache
    return arrays


def read_idx_split(spec: IdxDataset, params: dict, ctx: ReaderContext) -> TaskSequence:
    """Tasks of `classes_per_task` (2) classes of an idx image set, in `class_order` (default 0..9).

    The valid split is a seeded `valid_fraction` (0.1) of the training images; test is t10k. Caps:
    max_train_per_task (ctx overrides params), max_eval_per_task (valid and test).
    """
    files = find_idx_files(spec, params, ctx)
    data = _load_idx(spec.title, tuple(sorted(files.items())))
    chunks = split_classes(10, int(params.get("classes_per_task", 2)), params.get("class_order"))
    chunks = take_first_tasks(chunks, ctx.ntasks, spec.reader)
    valid_fraction = float(params.get("valid_fraction", 0.1))
    if not 0 <= valid_fraction < 1:
        raise ValueError(f"{spec.reader}: valid_fraction must be in [0, 1), got {valid_fraction}")
    x_train, y_train = data["train_images"], data["train_labels"]
    # one seeded carve of the whole train set, so a class's valid images do not depend on the task split
    perm = seeded_rng(ctx.seed, spec.reader, "valid").permutation(len(y_train))
    n_valid = int(round(len(y_train) * valid_fraction))
    valid_idx, train_idx = np.sort(perm[:n_valid]), np.sort(perm[n_valid:])
    arrays = {
        "train": (x_train[train_idx], y_train[train_idx]),
        "valid": (x_train[valid_idx], y_train[valid_idx]),
        "test": (data["test_images"], data["test_labels"]),
    }
    source = str(files["train_images"].parent)
    tasks = [
        _class_task(spec.prefix, chunk, spec.classes, arrays, train_cap(params, ctx), params.get("max_eval_per_task"),
                    ctx.seed, source)
        for chunk in chunks
    ]
    return TaskSequence(spec.reader, tasks, info={"source": source, "image_shape": tuple(x_train.shape[1:])})


@READERS.register("split_fmnist")
def read_split_fmnist(params: dict, ctx: ReaderContext) -> TaskSequence:
    """Split Fashion-MNIST (`read_idx_split`). Files: params.path, --data_dir (also its fashion-mnist/ and
    FashionMNIST/raw/), /usr/share/datasets/fashion-mnist, ~/.cache/mmcl, else a torchvision download unless
    offline."""
    return read_idx_split(FMNIST, params, ctx)


@READERS.register("split_mnist")
def read_split_mnist(params: dict, ctx: ReaderContext) -> TaskSequence:
    """Split MNIST (`read_idx_split`; classes are the digits). Files: params.path, --data_dir (also its mnist/
    and MNIST/raw/), ~/.cache/mmcl/MNIST/raw, else a torchvision download unless offline; never a system
    Fashion-MNIST folder, whose files have the same names."""
    return read_idx_split(MNIST, params, ctx)


# ----------------------------------------------------------------------------- scikit-learn digits


@READERS.register("split_digits")
def read_split_digits(params: dict, ctx: ReaderContext) -> TaskSequence:
    """Split digits: scikit-learn's 1,797 8x8 digits (0..16, rescaled to uint8 0..255), 2 classes per task.

    A seeded stratified split of all images: test_fraction (0.2), valid_fraction (0.1), the rest train.
    Same class_order, classes_per_task and caps as split_fmnist. Ships with scikit-learn: no download.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    test_fraction = float(params.get("test_fraction", 0.2))
    valid_fraction = float(params.get("valid_fraction", 0.1))
    if not (0 < test_fraction < 1 and 0 < valid_fraction < 1 and test_fraction + valid_fraction < 1):
        raise ValueError(
            f"split_digits: test_fraction {test_fraction} and valid_fraction {valid_fraction} must be in (0, 1) and sum below 1"
        )
    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=ctx.seed)
    train, valid = train_test_split(
        rest, test_size=valid_fraction / (1 - test_fraction), stratify=labels[rest], random_state=ctx.seed
    )
    arrays = {s: (images[np.sort(i)], labels[np.sort(i)]) for s, i in (("train", train), ("valid", valid), ("test", test))}
    chunks = split_classes(10, int(params.get("classes_per_task", 2)), params.get("class_order"))
    chunks = take_first_tasks(chunks, ctx.ntasks, "split_digits")
    source = "sklearn.datasets.load_digits"
    tasks = [
        _class_task("digits", chunk, [str(c) for c in range(10)], arrays, train_cap(params, ctx),
                    params.get("max_eval_per_task"), ctx.seed, source)
        for chunk in chunks
    ]
    return TaskSequence("split_digits", tasks, info={"source": source, "image_shape": (8, 8)})


# ----------------------------------------------------------------------------- CIFAR-100 (binary version)

# The class orders of DyTox's CIFAR-100 experiments (`--idrandom` 0, 1, 2): iCaRL's order (seed 1993),
# then DyTox's options/data/cifar100_order2.yaml and cifar100_order3.yaml.
CIFAR100_ORDERS = (
    [87, 0, 52, 58, 44, 91, 68, 97, 51, 15, 94, 92, 10, 72, 49, 78, 61, 14, 8, 86, 84, 96, 18, 24, 32, 45, 88, 11, 4,
     67, 69, 66, 77, 47, 79, 93, 29, 50, 57, 83, 17, 81, 41, 12, 37, 59, 25, 20, 80, 73, 1, 28, 6, 46, 62, 82, 53, 9,
     31, 75, 38, 63, 33, 74, 27, 22, 36, 3, 16, 21, 60, 19, 70, 90, 89, 43, 5, 42, 65, 76, 40, 30, 23, 85, 2, 95, 56,
     48, 71, 64, 98, 13, 99, 7, 34, 55, 54, 26, 35, 39],
    [58, 30, 93, 69, 21, 77, 3, 78, 12, 71, 65, 40, 16, 49, 89, 46, 24, 66, 19, 41, 5, 29, 15, 73, 11, 70, 90, 63, 67,
     25, 59, 72, 80, 94, 54, 33, 18, 96, 2, 10, 43, 9, 57, 81, 76, 50, 32, 6, 37, 7, 68, 91, 88, 95, 85, 4, 60, 36, 22,
     27, 39, 42, 34, 51, 55, 28, 53, 48, 38, 17, 83, 86, 56, 35, 45, 79, 99, 84, 97, 82, 98, 26, 47, 44, 62, 13, 31, 0,
     75, 14, 52, 74, 8, 20, 1, 92, 87, 23, 64, 61],
    [71, 54, 45, 32, 4, 8, 48, 66, 1, 91, 28, 82, 29, 22, 80, 27, 86, 23, 37, 47, 55, 9, 14, 68, 25, 96, 36, 90, 58,
     21, 57, 81, 12, 26, 16, 89, 79, 49, 31, 38, 46, 20, 92, 88, 40, 39, 98, 94, 19, 95, 72, 24, 64, 18, 60, 50, 63,
     61, 83, 76, 69, 35, 0, 52, 7, 65, 42, 73, 74, 30, 41, 3, 6, 53, 13, 56, 70, 77, 34, 97, 75, 2, 17, 93, 33, 84,
     99, 51, 62, 87, 5, 15, 10, 78, 67, 44, 59, 85, 43, 11],
)
CIFAR_RECORD = 2 + 3 * 32 * 32  # coarse label, fine label, R, G, B planes of 32x32
CIFAR_HINT = ("Get the binary version (cifar-100-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html) "
              "and pass the folder holding train.bin and test.bin. The python version is a pickle: convert it once "
              "with `python scripts/convert_cifar100.py cifar-100-python/ cifar-100-binary/`.")


def read_cifar100_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N, 32, 32, 3) uint8 images and fine labels of a CIFAR-100 binary file."""
    raw = np.frombuffer(read_bytes(path, "CIFAR-100 file"), dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR_RECORD:
        raise DataFormatError(f"CIFAR-100 file '{path}': {raw.size} bytes is not a whole number of "
                              f"{CIFAR_RECORD}-byte records (coarse label, fine label, 3072 pixels)")
    records = raw.reshape(-1, CIFAR_RECORD)
    labels = records[:, 1].astype(np.int64)
    if labels.max() > 99:
        raise DataFormatError(f"CIFAR-100 file '{path}': fine label {labels.max()} at record "
                              f"{int(np.argmax(labels))} > 99; is it a CIFAR-10 file?")
    images = records[:, 2:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def find_cifar100(root: Path) -> Path:
    for folder in (root, root / "cifar-100-binary", root / "cifar100"):
        if (folder / "train.bin").is_file() and (folder / "test.bin").is_file():
            return folder
    if (root / "cifar-100-python").is_dir() or (root / "train").is_file():
        raise DataNotFoundError(f"'{root}' holds CIFAR-100's python (pickle) version, which mmcl does not unpickle "
                                f"while reading. {CIFAR_HINT}")
    raise DataNotFoundError(f"no CIFAR-100 train.bin/test.bin under '{root}'. {CIFAR_HINT}")


@READERS.register("cifar100")
def read_cifar100(params: dict, ctx: ReaderContext) -> TaskSequence:
    """CIFAR-100 in `classes_per_task` steps (10: 10 steps, 5: 20 steps) in DyTox's class order `--idrandom`.

    valid is a seeded `valid_fraction` of train; test is the official test set."""
    folder = find_cifar100(ctx.resolve_data_dir("cifar100", CIFAR_HINT))
    x, y = read_cifar100_bin(folder / "train.bin")
    xt, yt = read_cifar100_bin(folder / "test.bin")
    if not 0 <= ctx.idrandom < len(CIFAR100_ORDERS):
        raise ValueError(f"--idrandom {ctx.idrandom}: CIFAR-100 has class orders 0..{len(CIFAR100_ORDERS) - 1}")
    rng = seeded_rng(ctx.seed, "cifar100", "valid")
    perm = rng.permutation(len(y))
    n_valid = int(round(float(params.get("valid_fraction", 0.1)) * len(y)))
    valid, train = np.sort(perm[:n_valid]), np.sort(perm[n_valid:])
    arrays = {"train": (x[train], y[train]), "valid": (x[valid], y[valid]), "test": (xt, yt)}
    names = [str(c) for c in range(100)]
    meta = folder / "fine_label_names.txt"
    if meta.is_file():
        names = [line.strip() for line in read_text_file(meta, "CIFAR-100 label-names file").splitlines()
                 if line.strip()]
        if len(names) != 100:
            raise DataFormatError(f"CIFAR-100 label-names file '{meta}' has {len(names)} names (non-blank lines), "
                                  f"expected 100 (one per fine label, in label order)")
    chunks = split_classes(100, int(params.get("classes_per_task", 10)), CIFAR100_ORDERS[ctx.idrandom])
    chunks = take_first_tasks(chunks, ctx.ntasks, "cifar100")
    tasks = [_class_task("cifar100", chunk, names, arrays, train_cap(params, ctx), params.get("max_eval_per_task"),
                         ctx.seed, str(folder)) for chunk in chunks]
    return TaskSequence(params.get("name", "cifar100"), tasks, info={"source": str(folder), "image_shape": (32, 32, 3)})


# ----------------------------------------------------------------------------- ImageNet-R (image folders)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGENET_R_HINT = ("Get ImageNet-R (imagenet-r.tar from https://github.com/hendrycks/imagenet-r: 200 class folders "
                   "of JPEGs) and pass the folder that holds imagenet-r/ (or the class folders) as --data_dir.")


def find_image_folder(root: Path, names: Sequence[str], hint: str) -> Path:
    """The folder of class sub-folders: `root` itself or one of `names` inside it."""
    for folder in [root / n for n in names] + [root]:
        if folder.is_dir() and any(d.is_dir() for d in folder.iterdir()):
            return folder
    raise DataNotFoundError(f"no class folders under '{root}' (looked in {', '.join(names)} and the folder itself). {hint}")


def load_image(path: Path, size: int) -> np.ndarray:
    """(size, size, 3) uint8: RGB, the largest centred square, resized (bilinear)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            return np.asarray(ImageOps.fit(im.convert("RGB"), (size, size), Image.BILINEAR), dtype=np.uint8)
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise DataFormatError(f"image '{path}' cannot be read ({type(e).__name__}: {e})") from e


@READERS.register("imagenet_r")
def read_imagenet_r(params: dict, ctx: ReaderContext) -> TaskSequence:
    """ImageNet-R: class folders of images (200 classes), `classes_per_task` per task (40/20/10: 5/10/20 tasks).

    ImageNet-R has no official split: per class a seeded `test_fraction` (0.2, CODA-Prompt's
    80/20) is test, `valid_fraction` (0.1) valid, the rest train. Class order: sorted folder
    names for --idrandom 0, a seeded permutation otherwise. Images are decoded only for the
    kept (capped) files, made square and resized to `image_size` (224). `num_classes` (200)
    must match the folders found, so a partial download fails loudly.
    """
    folder = find_image_folder(ctx.resolve_data_dir("imagenet_r", IMAGENET_R_HINT),
                               ("imagenet-r", "imagenet_r", "imagenet-r/imagenet-r"), IMAGENET_R_HINT)
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    expected = params.get("num_classes", 200)
    if expected is not None and len(classes) != int(expected):
        raise ValueError(f"imagenet_r: '{folder}' has {len(classes)} class folders, the task sequence expects "
                         f"num_classes {expected}")
    size = int(params.get("image_size", 224))
    test_fraction, valid_fraction = float(params.get("test_fraction", 0.2)), float(params.get("valid_fraction", 0.1))
    if not (0 < test_fraction < 1 and 0 <= valid_fraction < 1 and test_fraction + valid_fraction < 1):
        raise ValueError(f"imagenet_r: test_fraction {test_fraction} and valid_fraction {valid_fraction} must be in "
                         f"[0, 1) and sum below 1")
    order = None
    if ctx.idrandom:
        order = seeded_rng(ctx.idrandom, "imagenet_r", "class_order").permutation(len(classes)).tolist()
    chunks = split_classes(len(classes), int(params.get("classes_per_task", 20)), order)
    chunks = take_first_tasks(chunks, ctx.ntasks, "imagenet_r")
    caps = {"train": train_cap(params, ctx), "valid": params.get("max_eval_per_task"),
            "test": params.get("max_eval_per_task")}
    tasks = []
    for chunk in chunks:
        name = f"imagenet_r_{chunk[0]}_{chunk[-1]}"
        files: dict[str, list[tuple[Path, int]]] = {"train": [], "valid": [], "test": []}
        for local, c in enumerate(chunk):
            paths = sorted(p for p in (folder / classes[c]).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not paths:
                raise DataNotFoundError(f"imagenet_r: class folder '{folder / classes[c]}' holds no images")
            perm = seeded_rng(ctx.seed, "imagenet_r", classes[c]).permutation(len(paths))
            n_test = max(1, int(round(len(paths) * test_fraction)))
            n_valid = int(round(len(paths) * valid_fraction))
            parts = {"test": perm[:n_test], "valid": perm[n_test : n_test + n_valid], "train": perm[n_test + n_valid :]}
            for split, idx in parts.items():
                files[split].extend((paths[i], local) for i in sorted(idx))
        splits = {}
        for split, items in files.items():
            keep = seeded_subset(len(items), caps[split], seeded_rng(ctx.seed, "imagenet_r", name, split, "cap"))
            items = [items[i] for i in keep]
            images = np.stack([load_image(p, size) for p, _ in items]) if items else np.zeros((0, size, size, 3), np.uint8)
            splits[split] = image_dataset(images, np.array([y for _, y in items], dtype=np.int64))
        task = Task(id=0, name=name, modality="image", classes=[classes[c] for c in chunk],
                    info={"domain": name, "source": str(folder), "class_ids": list(chunk),
                          "image_shape": (size, size, 3)}, **splits)
        check_labels(task)
        tasks.append(task)
    return TaskSequence(params.get("name", "imagenet_r"), tasks,
                        info={"source": str(folder), "image_shape": (size, size, 3)})
