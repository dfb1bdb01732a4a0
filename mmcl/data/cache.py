"""mmcl's own cache folder (`MMCL_CACHE`, default ~/.cache/mmcl): downloaded raw data, and prepared (tokenised)
splits, so a second run of the same text sequence does not tokenise again.

`datasets` caches a transform's result only for data that lives in a file and names it by a fingerprint
that, for data built in memory (every text reader's), is random per process. `content_fingerprint` names an
in-memory split by what it holds instead; `prepared_file` is where a prepared split so named is kept, and
`keep_split` writes it there (Arrow, through mmcl.atomic's temporary file and rename) and reads it back
memory-mapped, as a later run will.
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


def keep_split(dataset, path: str):
    """Write `dataset`'s rows (in its order) to `path` atomically and return the split read from there."""
    import datasets
    import pyarrow as pa

    from mmcl.atomic import write_binary_atomic

    table = dataset.with_format("arrow")[:]  # the rows as selected; the schema carries the features

    def write(f) -> None:
        with pa.ipc.new_stream(f, table.schema) as writer:
            writer.write_table(table)

    try:
        write_binary_atomic(path, write)
    except OSError:  # a full or read-only cache: the run goes on with the split in memory
        return dataset
    return datasets.Dataset.from_file(path)


def prepared_file(fingerprint: str, what: str) -> str | None:
    """Where a prepared split with this fingerprint is kept (None: `MMCL_KEEP_PREPARED=0`, nothing kept)."""
    if os.environ.get("MMCL_KEEP_PREPARED", "1") == "0":
        return None
    folder = cache_dir() / "prepared"
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / f"{what}-{fingerprint}.arrow")
