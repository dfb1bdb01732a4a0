"""Convert CIFAR-100's python version (pickled dicts) into its binary version, once, on purpose.

    python scripts/convert_cifar100.py cifar-100-python/ cifar-100-binary/

mmcl's `cifar100` reader reads only the binary version (train.bin, test.bin: per image one byte
coarse label, one byte fine label, 3072 bytes of R, G, B planes), so that reading data never
unpickles. The python version can only be read by unpickling, which runs code from the file:
this script does it after saying so, for files you trust (e.g. checked against the published
md5 sums), and writes the binary files plus fine_label_names.txt.
"""
from __future__ import annotations

import argparse
import pickle  # the python version of CIFAR-100 is a pickle: the one place mmcl unpickles, on request
import sys
from pathlib import Path

import numpy as np


def load(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="folder with train, test, meta (cifar-100-python)")
    ap.add_argument("dst", type=Path)
    args = ap.parse_args()
    print(f"warning: unpickling {args.src}/{{train,test,meta}}; only do this for files you trust", file=sys.stderr)
    args.dst.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        d = load(args.src / split)
        data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3072)
        records = np.concatenate([np.asarray(d[b"coarse_labels"], np.uint8)[:, None],
                                  np.asarray(d[b"fine_labels"], np.uint8)[:, None], data], axis=1)
        records.tofile(args.dst / f"{split}.bin")
        print(f"wrote {args.dst / f'{split}.bin'} ({len(records)} images)")
    names = [n.decode() for n in load(args.src / "meta")[b"fine_label_names"]]
    (args.dst / "fine_label_names.txt").write_text("\n".join(names) + "\n")


if __name__ == "__main__":
    main()
