"""mmcl's own cache folder (`MMCL_CACHE`, default ~/.cache/mmcl): downloaded raw data, and prepared (tokenised)
splits, so a second run of the same text sequence does not tokenise again.

`datasets` caches a transform's result only for data that lives in a file and names it by a fingerprint
that, for data built in memory (every text reader's), is random per process. `content_fingerprint` names an
in-memory split by what it holds instead, and `prepared_file` gives `Dataset.map` a file to write to and,
in a later run, to load from (`datasets` writes it under a temporary name and renames it).
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("MMCL_CACHE", "~/.cache/mmcl")).expanduser()


def content_fingerprint(dataset) -> str:
    """The same for the same rows in any process: the Arrow table's content (and row selection) for data in
    memory; `datasets`' own fingerprint for data read from files (derived from the files and transforms)."""
    from datasets.fingerprint import Hasher

    if dataset.cache_files:
        return dataset._fingerprint
    indices = dataset._indices.table if dataset._indices is not None else None
    return Hasher.hash((dataset.data.table, indices))


def prepared_file(fingerprint: str, what: str) -> str | None:
    """Where a prepared split with this fingerprint is kept (None: `MMCL_CACHE=off`, nothing kept)."""
    if os.environ.get("MMCL_CACHE", "").lower() == "off":
        return None
    folder = cache_dir() / "prepared"
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / f"{what}-{fingerprint}.arrow")
