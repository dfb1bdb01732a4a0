"""Render the result tables of docs/ from their JSON under docs/results/.

    python scripts/render_docs.py            # rewrite every marked table in README.md and docs/
    python scripts/render_docs.py --check    # exit 1 listing every table that differs from its JSON

A table sits in a page between markers, and only the script writes what is between them (the table
`compat` is made from the registries' declarations by mmcl/compat.py, not from JSON):

    <!-- table: vader4-til -->
    | approach | ACC | ... |
    <!-- /table -->

`docs/results/<name>.json` declares the table (every key is described in docs/results.md):

    {"title": ..., "source": ..., "sequence": ..., "scenario": ..., "backbone": ..., "command": ...,
     "columns": [{"header": "ACC", "key": "metrics.acc_final", "format": ".2f", "align": "right",
                  "plus": true, "missing": "—", "over": "seeds", "join": " → "}, ...],
     "rows": [{"label": "finetune", "metrics": {"acc_final": 82.05, ...}, "run": null,
               "bold": ["metrics.acc_final"]}, ...],
     "caption": [lines before the table], "notes": [paragraphs after it]}

A row's `run` names a kept `metrics.json` (a path relative to docs/results/, e.g.
`kept/<run>/metrics.json`); its values then come from that file (`summary`, `meta.minutes`,
`meta.trainable_parameters`, `meta.parameters`, `group_summary` as `groups`) and the row holds no
`metrics` of its own. Only a complete run is read.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path("docs") / "results"
BEGIN = re.compile(r"^<!-- table: ([A-Za-z0-9_.-]+) -->$")
END = "<!-- /table -->"
# metrics.json's summary scalars and the meta fields a table may show
SUMMARY_KEYS = ("acc_final", "acc_final_weighted", "macro_f1_final", "bwt", "fwt", "forgetting", "aia", "aia_weighted",
                "til_acc_final")
META_KEYS = ("minutes", "trainable_parameters", "parameters")


class TableError(ValueError):
    """A table's JSON that cannot be rendered (the message names the file)."""


def pages(root: Path) -> list[Path]:
    """README.md and every markdown page under docs/."""
    found = [root / "README.md"] if (root / "README.md").is_file() else []
    return found + sorted((root / "docs").rglob("*.md"))


def table_specs(root: Path) -> dict[str, Path]:
    """Table name -> its JSON (docs/results/*.json; kept runs live in folders below)."""
    return {p.stem: p for p in sorted((root / RESULTS).glob("*.json"))}


def metrics_from_run(path: Path) -> dict[str, Any]:
    """A row's values from a run's metrics.json, under the names the tables use."""
    if not path.is_file():
        raise TableError(f"run {path}: no such metrics.json")
    doc = json.loads(path.read_text())
    status = doc.get("status", "complete")
    if status != "complete" or not doc.get("summary"):
        raise TableError(f"run {path}: the run is {status}; only a complete run has results to tabulate")
    summary, meta = doc["summary"], doc.get("meta") or {}
    out = {k: summary.get(k) for k in SUMMARY_KEYS}
    out.update({k: meta.get(k) for k in META_KEYS})
    if doc.get("group_summary"):
        out["groups"] = doc["group_summary"]
    return out


def resolve(entry: dict[str, Any], spec_path: Path) -> dict[str, Any]:
    """The entry with `metrics` read from its kept run when `run` is given."""
    run = entry.get("run")
    if not run:
        return entry
    if entry.get("metrics"):
        raise TableError(f"{spec_path}: row {entry.get('label')!r} gives both `run` and `metrics`; "
                         "a row's numbers come from one place")
    return dict(entry, metrics=metrics_from_run(spec_path.parent / run))


def lookup(obj: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def cell_text(value: Any, col: dict[str, Any]) -> str:
    if value is None:
        return col.get("missing", "")
    if isinstance(value, list):
        return col.get("join_list", ", ").join(cell_text(v, {}) for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    text = format(value, col.get("format", ""))
    if col.get("plus") and not text.startswith("-") and re.search(r"[1-9]", text):
        text = "+" + text  # a positive value that does not print as zero
    return text


def render_cell(row: dict[str, Any], col: dict[str, Any], spec_path: Path) -> str:
    key = col["key"]
    if "over" in col:  # one value per entry of row[col["over"]] (e.g. seed 0 → seed 1)
        entries = [resolve(e, spec_path) for e in row.get(col["over"], [])]
        text = col.get("join", " → ").join(cell_text(lookup(e, key), col) for e in entries)
    else:
        text = cell_text(lookup(row, key), col)
    if key in row.get("bold", ()) and text:
        text = f"**{text}**"
    return text


MINUTES_MARK = " †"
MINUTES_NOTE = ("† training only (the kept run's `meta.minutes`: evaluation and data preparation not counted); "
                "the other rows' minutes are as this page states them.")


def render(spec_path: Path) -> str:
    """The markdown a table's JSON renders to (caption, table, notes), without the markers."""
    try:
        spec = json.loads(spec_path.read_text())
    except json.JSONDecodeError as e:
        raise TableError(f"{spec_path}: not valid JSON: {e}") from e
    for field in ("source", "columns", "rows"):
        if field not in spec:
            raise TableError(f"{spec_path}: no `{field}`")
    cols = spec["columns"]
    keys = {c["key"] for c in cols}
    lines: list[str] = []
    for line in spec.get("caption", []):
        lines += [line, ""]
    lines.append("| " + " | ".join(c["header"] for c in cols) + " |")
    lines.append("|" + "|".join("---:" if c.get("align") == "right" else "---" for c in cols) + "|")
    # a kept run's minutes are its meta.minutes, training only; rows transcribed from earlier tables may be
    # wall times with the evaluation in: where one table has both, the kept runs' cells say so
    kept = [bool(r.get("run")) for r in spec["rows"]]
    mark = "metrics.minutes" in keys and any(kept) and not all(kept)
    for i, row in enumerate(spec["rows"]):
        unknown = set(row.get("bold", ())) - keys
        if unknown:
            raise TableError(f"{spec_path}: row {i} bolds {sorted(unknown)}, which no column shows")
        row = resolve(row, spec_path)
        cells = [render_cell(row, c, spec_path) + (MINUTES_MARK if mark and kept[i] and c["key"] == "metrics.minutes"
                                                   else "") for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    for note in spec.get("notes", []):
        lines += ["", note]
    if mark:
        lines += ["", MINUTES_NOTE]
    return "\n".join(lines)


def blocks(text: str) -> list[tuple[str, int, int]]:
    """(name, index of the first line inside = 1-based line of the start marker, index of the end marker)."""
    out, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        m = BEGIN.match(lines[i].strip())
        if m:
            j = next((k for k in range(i + 1, len(lines)) if lines[k].strip() == END), None)
            if j is None:
                raise TableError(f"table {m.group(1)}: no `{END}` after its start marker")
            out.append((m.group(1), i + 1, j))
            i = j
        i += 1
    return out


def generated_tables() -> dict[str, Any]:
    """Tables made from the code, not from JSON: their name -> a function giving the markdown."""
    from mmcl import compat

    return {"compat": compat.markdown}


def process(root: Path, write: bool) -> list[str]:
    """Compare (or rewrite) every marked table; return the problems found."""
    generated = generated_tables()
    specs, problems, placed = table_specs(root), [], set()
    for page in pages(root):
        text = page.read_text()
        try:
            found = blocks(text)
        except TableError as e:
            problems.append(f"{page.relative_to(root)}: {e}")
            continue
        lines = text.split("\n")
        for name, start, end in reversed(found):  # from the bottom, so earlier line numbers stay valid
            where = f"{page.relative_to(root)}:{start}: table {name}"
            placed.add(name)
            if name in generated:
                specs = {**specs, name: None}
            if name not in specs:
                problems.append(f"{where}: no {RESULTS / (name + '.json')}")
                continue
            try:
                want = generated[name]().rstrip("\n") if name in generated else render(specs[name])
            except TableError as e:
                problems.append(f"{where}: {e}")
                continue
            have = "\n".join(lines[start:end])
            if have != want:
                if write:
                    lines[start:end] = want.split("\n")
                else:
                    problems.append(f"{where}: differs from what {RESULTS / (name + '.json')} renders")
        if write:
            new = "\n".join(lines)
            if new != text:
                page.write_text(new)
                print(f"wrote {page.relative_to(root)}")
    for name in sorted(set(specs) - placed - set(generated)):
        problems.append(f"{RESULTS / (name + '.json')}: no page has a `<!-- table: {name} -->` marker")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from its JSON")
    ap.add_argument("--root", type=Path, default=ROOT, help="the repository root (default: this checkout)")
    args = ap.parse_args(argv)
    problems = process(args.root, write=not args.check)
    for p in problems:
        print(p, file=sys.stderr)
    if problems and args.check:
        print("run `python scripts/render_docs.py` to regenerate the tables from their JSON", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
