"""The documentation: README as the front door, generated result tables, links that resolve."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "render_docs.py"
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
# a results table: a header naming a metric or a measurement, and numbers in its rows
METRIC_HEADER = re.compile(r"\b(ACC|AIA|BWT|FWT|macro-F1|forgetting|minutes|s/step|examples/s)\b", re.IGNORECASE)
NUMBER = re.compile(r"^\**[+-]?\d[\d,]*(\.\d+)?\**$")


def _render_docs():
    spec = importlib.util.spec_from_file_location("render_docs", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


render_docs = _render_docs()


def doc_pages() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    out, fenced = set(), False
    for line in page.read_text().split("\n"):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            out.add(slug(line.lstrip("#")))
    return out


def without_code(text: str) -> str:
    """The page with fenced code blocks and inline code removed (no links there)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def test_every_table_in_the_docs_matches_its_json():
    done = subprocess.run([sys.executable, str(SCRIPT), "--check"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_readme_is_at_most_200_lines():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= 200, f"README.md has {n} lines; move details to docs/"


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(without_code(page.read_text())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no {dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def results_tables_outside_markers(text: str) -> list[str]:
    """The header line of each markdown results table that is not between table markers."""
    found, inside, lines, i = [], False, text.split("\n"), 0
    while i < len(lines):
        line = lines[i].strip()
        if render_docs.BEGIN.match(line):
            inside = True
        elif line == render_docs.END:
            inside = False
        elif line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1].strip()):
            j = i + 2
            while j < len(lines) and lines[j].strip().startswith("|"):
                j += 1
            body = [c.strip() for row in lines[i + 2:j] for c in row.strip().strip("|").split("|")]
            if not inside and METRIC_HEADER.search(line) and any(NUMBER.match(c) for c in body):
                found.append(line)
            i = j
            continue
        i += 1
    return found


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_results_table_is_typed_by_hand(page):
    assert not results_tables_outside_markers(page.read_text()), (
        f"{page.relative_to(ROOT)}: results tables outside `<!-- table: NAME -->` markers; put their rows in "
        f"docs/results/NAME.json and run scripts/render_docs.py")


def test_the_detector_sees_a_typed_results_table():
    typed = "| approach | ACC | BWT |\n|---|---:|---:|\n| ewc | **85.20** | -0.80 |\n"
    assert results_tables_outside_markers(typed) == ["| approach | ACC | BWT |"]
    assert not results_tables_outside_markers("<!-- table: t -->\n" + typed + "<!-- /table -->\n")
    assert not results_tables_outside_markers("| registry | names |\n|---|---|\n| scenarios | `til` |\n")


# -- the script on a small tree of its own ------------------------------------------------------------

def _tree(tmp_path: Path, rows: list[dict], page_table: str = "") -> Path:
    (tmp_path / "docs" / "results").mkdir(parents=True)
    spec = {"title": "t", "source": "a test", "columns": [
        {"header": "approach", "key": "label"},
        {"header": "ACC", "key": "metrics.acc_final", "format": ".2f", "align": "right"},
        {"header": "BWT", "key": "metrics.bwt", "format": ".2f", "align": "right", "plus": True},
        {"header": "text BWT while image", "key": "metrics.groups.text.bwt_while.image", "format": ".2f",
         "align": "right", "missing": "—"},
        {"header": "minutes", "key": "metrics.minutes", "format": ".1f", "align": "right"},
        {"header": "trainable params", "key": "metrics.trainable_parameters", "format": ",", "align": "right"}],
        "rows": rows, "notes": ["a note"]}
    (tmp_path / "docs" / "results" / "t.json").write_text(json.dumps(spec))
    (tmp_path / "docs" / "page.md").write_text(f"# Page\n\n<!-- table: t -->\n{page_table}<!-- /table -->\n\nafter\n")
    return tmp_path


def _metrics_json(path: Path, status: str = "complete") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = {"acc_final": 82.0512, "macro_f1_final": 80.1, "bwt": 0.0349, "fwt": None, "forgetting": 0.5,
               "aia": 83.0, "til_acc_final": None, "tasks_done": 2, "num_tasks": 2}
    doc = {"status": status, "summary": None if status == "failed" else summary, "matrix": {},
           "meta": {"approach": "ewc", "minutes": 3.14159, "trainable_parameters": 1930, "parameters": 2000},
           "group_summary": {"text": {"acc_final": 80.0, "bwt": -1.0, "bwt_while": {"text": -0.75, "image": -0.25}}}}
    path.write_text(json.dumps(doc))
    return path


def test_a_row_reads_its_numbers_from_a_kept_metrics_json(tmp_path):
    root = _tree(tmp_path, [
        {"label": "finetune", "metrics": {"acc_final": 75.0, "bwt": -7.73, "minutes": 18.9}, "run": None,
         "bold": ["metrics.acc_final"]},
        {"label": "ewc", "run": "kept/ewc/metrics.json"}])
    _metrics_json(root / "docs" / "results" / "kept" / "ewc" / "metrics.json")
    assert render_docs.main(["--check", "--root", str(root)]) == 1  # the page's table is empty
    assert render_docs.main(["--root", str(root)]) == 0
    page = (root / "docs" / "page.md").read_text()
    assert ("| approach | ACC | BWT | text BWT while image | minutes | trainable params |\n"
            "|---|---:|---:|---:|---:|---:|\n"
            "| finetune | **75.00** | -7.73 | — | 18.9 |  |\n"
            "| ewc | 82.05 | +0.03 | -0.25 | 3.1 † | 1,930 |\n\na note\n\n"
            + render_docs.MINUTES_NOTE + "\n<!-- /table -->\n\nafter\n") in page  # a kept run's minutes: training
    assert render_docs.main(["--check", "--root", str(root)]) == 0

    # an edit by hand is caught, and named
    (root / "docs" / "page.md").write_text(page.replace("82.05", "82.06"))
    done = subprocess.run([sys.executable, str(SCRIPT), "--check", "--root", str(root)], capture_output=True, text=True)
    assert done.returncode == 1 and "docs/page.md:3: table t: differs from what docs/results/t.json renders" in done.stderr


def test_a_run_that_did_not_complete_is_not_tabulated(tmp_path):
    root = _tree(tmp_path, [{"label": "ewc", "run": "kept/ewc/metrics.json"}])
    _metrics_json(root / "docs" / "results" / "kept" / "ewc" / "metrics.json", status="failed")
    with pytest.raises(render_docs.TableError, match="the run is failed"):
        render_docs.render(root / "docs" / "results" / "t.json")


def test_a_row_has_its_numbers_from_one_place(tmp_path):
    root = _tree(tmp_path, [{"label": "ewc", "metrics": {"acc_final": 1.0}, "run": "kept/ewc/metrics.json"}])
    _metrics_json(root / "docs" / "results" / "kept" / "ewc" / "metrics.json")
    with pytest.raises(render_docs.TableError, match="both `run` and `metrics`"):
        render_docs.render(root / "docs" / "results" / "t.json")


def test_check_names_a_marker_without_json_and_json_without_marker(tmp_path):
    root = _tree(tmp_path, [{"label": "a", "metrics": {"acc_final": 1.0}, "run": None}])
    render_docs.main(["--root", str(root)])
    (root / "docs" / "other.md").write_text("<!-- table: nowhere -->\n<!-- /table -->\n")
    (root / "docs" / "results" / "orphan.json").write_text((root / "docs" / "results" / "t.json").read_text())
    problems = render_docs.process(root, write=False)
    assert problems == ["docs/other.md:1: table nowhere: no docs/results/nowhere.json",
                        "docs/results/orphan.json: no page has a `<!-- table: orphan -->` marker"]
