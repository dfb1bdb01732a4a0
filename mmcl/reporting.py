"""Run-directory outputs: metrics.json, results.md and accuracy_matrix.png.

They are rewritten after every task of a run, so every write is atomic: a run killed mid-write
(preemption, OOM) must leave the previous complete file, never a truncated one that breaks resume
or `mmcl report`.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mmcl.atomic import _atomic_write, write_json_atomic, write_text_atomic
from mmcl.metrics import AccuracyMatrix

__all__ = [
    "METRICS_FILE", "RESULTS_FILE", "PLOT_FILE",
    "load_metrics", "plot_accuracy_matrix", "results_markdown", "run_meta", "run_status", "write_benchmark", "write_json_atomic",
    "write_report", "write_text_atomic",
]

METRICS_FILE = "metrics.json"
RESULTS_FILE = "results.md"
PLOT_FILE = "accuracy_matrix.png"
DASH = "—"


def write_benchmark(out_dir: str | os.PathLike, stem: str, result: Any, table: str) -> Path:
    """A benchmark's ``<stem>.json`` and markdown ``<stem>.md`` under ``out_dir``, each written atomically.

    Returns ``out_dir / stem`` for any further file (a plot) the benchmark writes beside them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"{stem}.json", result)
    write_text_atomic(out / f"{stem}.md", table)
    return out / stem


# -- markdown ------------------------------------------------------------------------------------

def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return DASH
    if isinstance(v, (float, np.floating)):
        return DASH if not math.isfinite(v) else f"{v:.{digits}f}"
    return str(v)


def _cell(text: Any) -> str:
    # A '|' inside a task name would split the markdown cell.
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _matrix_table(m: np.ndarray, names: list[str], extra_rows: Sequence[Sequence[Any]] = ()) -> list[str]:
    rows = [list(r) for r in extra_rows]
    rows += [[f"after {t}: {names[t]}"] + [_fmt(float(v)) for v in m[t]] for t in range(m.shape[0])]
    return _table(["", *names], rows)


_META_LABELS = [
    ("task_sequence", "Task sequence"), ("tasks", "Tasks"), ("modalities", "Modalities"),
    ("backbone", "Backbone"), ("approach", "Approach"), ("scenario", "Scenario"), ("seed", "Seed"),
    ("idrandom", "Task order (idrandom)"), ("num_processes", "Processes"), ("mixed_precision", "Mixed precision"),
    ("parameters", "Parameters"), ("trainable_parameters", "Trainable parameters"), ("minutes", "Minutes (training)"),
    ("minutes_per_task", "Minutes per task (training)"), ("seconds_total", "Seconds in all"),
    ("mmcl_version", "mmcl version"),
]


def _meta_value(key: str, v: Any) -> str:
    if isinstance(v, dict):  # seconds_total: data preparation, training, evaluation, the untrained evaluation
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items() if x is not None)
    if isinstance(v, (list, tuple)):
        sep = " → " if key == "tasks" else ", "
        return sep.join(_fmt(x) if isinstance(x, float) else str(x) for x in v)
    if isinstance(v, int) and not isinstance(v, bool) and v >= 10_000:
        return f"{v:,}"
    return _fmt(v)


def _meta_lines(meta: dict[str, Any]) -> list[str]:
    lines = []
    known = {k for k, _ in _META_LABELS}
    for key, label in _META_LABELS:
        if meta.get(key) is not None:
            lines.append(f"- **{label}**: {_meta_value(key, meta[key])}")
    for key, v in meta.items():
        if key in ("status", "failure", "history"):
            continue  # shown in their own place
        # Unknown scalars are shown as-is; unknown containers (class lists of 200 names...) would drown the page.
        if key not in known and (v is None or isinstance(v, (str, int, float, bool))):
            lines.append(f"- **{key}**: {_fmt(v)}")
    return lines


SUMMARY_ROWS = [
    ("acc_final", "Final average accuracy (ACC, %)"),
    ("macro_f1_final", "Final macro-F1 (%)"),
    ("bwt", "Backward transfer (BWT, points)"),
    ("fwt", "Forward transfer (FWT, points)"),
    ("forgetting", "Forgetting (points)"),
    ("aia", "Average incremental accuracy (AIA, %)"),
    ("til_acc_final", "Task-aware final accuracy (TIL, %)"),
]


def results_markdown(matrix: AccuracyMatrix, title: str, meta: dict[str, Any],
                     groups: dict[str, list[int]] | None = None) -> str:
    """The human-readable results page: meta, scalars (with their metrics.json keys), matrices."""
    s = matrix.summary()
    names = matrix.task_names
    k = s["tasks_done"]
    lines = [f"# {title}", ""]
    failed = run_status(matrix, meta) == "failed"
    if failed:
        # A failed run has no result: its finished rows stay for diagnosis, without the summary scalars
        # that would read as one.
        failure = meta.get("failure") or {}
        lines += [f"> **FAILED — not a result.** {_cell(failure.get('message', 'the run stopped'))}", ">",
                  f"> Tasks finished before the failure: {k} / {matrix.T}. Their rows are shown below for "
                  "diagnosis only; no summary metric is reported.", ""]
    if meta.get("eval_split") == "valid":
        lines += ["> Measured on each task's **valid** split (`--eval_split valid`): for choosing settings, "
                  "not a test result.", ""]
    lines += _meta_lines(meta)
    if meta.get("history"):
        lines += ["", "History:", ""] + [f"- {_history_line(h)}" for h in meta["history"]]
    if not failed:
        status = "complete" if k == matrix.T else "partial run: scalars over the tasks finished so far"
        lines += ["", f"Tasks done: **{k} / {matrix.T}** ({status}).", "", "## Summary", ""]
        rows = [[label, f"`{key}`", _fmt(s[key])] for key, label in SUMMARY_ROWS
                if key != "til_acc_final" or matrix.til_acc is not None]
        lines += _table(["metric", "key in metrics.json", "value"], rows)

    if groups and not failed:
        lines += ["", "## Per group", ""]
        g = matrix.group_summary(groups)
        header = ["group", "tasks", "ACC (%)", "BWT"]
        if len(groups) > 1:
            header += [f"BWT while {h} trained" for h in groups]
        lines += _table(header,
                        [[name, ", ".join(names[u] for u in v["tasks"]), _fmt(v["acc_final"]), _fmt(v["bwt"])]
                         + [_fmt(v["bwt_while"][h]) for h in groups if len(groups) > 1]
                         for name, v in g.items()])
        if len(groups) > 1:
            lines += ["", "*BWT while h trained*: the group's BWT split by the group of the task being learned "
                      "(the accuracy its earlier tasks lost, or gained, during those steps); the columns sum to BWT."]

    lines += ["", "## Accuracy matrix (%)", "",
              "Row *after t* = evaluated after training task t; column = tested task.", ""]
    base = matrix.baseline
    extra = [["untrained (b)"] + [_fmt(float(v)) for v in base]] if np.any(np.isfinite(base)) else []
    lines += _matrix_table(matrix.acc, names, extra)
    lines += ["", "## Macro-F1 matrix (%)", ""]
    lines += _matrix_table(matrix.f1, names)
    if matrix.til_acc is not None:
        lines += ["", "## Task-aware accuracy matrix (%)", "",
                  "The same CIL predictions restricted to each task's own classes.", ""]
        lines += _matrix_table(matrix.til_acc, names)
    return "\n".join(lines) + "\n"


def run_status(matrix: AccuracyMatrix, meta: dict[str, Any]) -> str:
    """complete | partial (tasks still to train: running or interrupted) | failed (stopped by an error)."""
    if meta.get("status") == "failed":
        return "failed"
    return "complete" if matrix.rows_done == matrix.T else "partial"


def _history_line(h: dict[str, Any]) -> str:
    if h.get("event") == "failed":
        return f"failed: {h.get('message', '')}"
    if h.get("event") == "resumed":
        changed = ", ".join(f"--{k} {v[0]} → {v[1]}" for k, v in (h.get("changed") or {}).items())
        return f"resumed at task {h.get('from_task')}" + (f" with {changed}" if changed else "")
    return json.dumps(h)


# -- plot ------------------------------------------------------------------------------------------

def plot_accuracy_matrix(matrix: AccuracyMatrix, path: str | os.PathLike,
                         groups: dict[str, list[int]] | None = None) -> None:
    """Heatmap of the accuracy matrix and per-task accuracy curves, saved as PNG atomically.

    With groups (modalities of a mixed run), the steps are shaded by the group of the task trained, and each
    group gets a dashed curve: the mean accuracy over its tasks seen so far."""
    # Figure + Agg canvas directly: no pyplot global state, no GUI backend, safe on headless nodes.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    T, k = matrix.T, matrix.rows_done
    names = matrix.task_names
    acc = matrix.acc
    size = min(4.0 + 0.45 * T, 14.0)
    fig = Figure(figsize=(2 * size + 1.0, size), layout="constrained")
    FigureCanvasAgg(fig)
    ax_h, ax_c = fig.subplots(1, 2)

    im = ax_h.imshow(np.ma.masked_invalid(acc), vmin=0, vmax=100, cmap="viridis")
    fig.colorbar(im, ax=ax_h, label="accuracy (%)", shrink=0.8)
    ax_h.set_xticks(range(T), [str(u) for u in range(T)] if T > 12 else names, rotation=45 if T <= 12 else 0,
                    ha="right" if T <= 12 else "center")
    ax_h.set_yticks(range(T), [f"after {t}" for t in range(T)])
    ax_h.set_xlabel("tested task")
    ax_h.set_ylabel("trained up to task")
    ax_h.set_title("accuracy matrix")
    if T <= 25:  # beyond that the numbers are unreadable and only clutter
        font = 9 if T <= 8 else 6
        for t in range(T):
            for u in range(T):
                if np.isfinite(acc[t, u]):
                    ax_h.text(u, t, f"{acc[t, u]:.1f}", ha="center", va="center", fontsize=font,
                              color="black" if acc[t, u] > 60 else "white")

    steps = np.arange(k)
    for u in range(min(k, T)):
        # Only from the step the task is learned: earlier points are accuracy before training on it.
        ax_c.plot(steps[u:], acc[u:k, u], marker="o", ms=3, lw=1,
                  label=names[u] if T <= 10 else None)
    if groups and len(groups) > 1:
        shades = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
        for i, (gname, tasks) in enumerate(groups.items()):
            color = shades[i % len(shades)]
            for u in tasks:
                ax_c.axvspan(u - 0.5, u + 0.5, color=color, alpha=0.07, lw=0)
            curve = [(t, float(np.mean(acc[t, [u for u in tasks if u <= t]])))
                     for t in range(k) if any(u <= t for u in tasks)]
            if curve:
                ax_c.plot(*zip(*curve), color=color, lw=2.2, ls="--", marker="D", ms=4,
                          label=f"{gname}: average over seen (shaded: {gname} steps)")
    if k:
        avg = [float(np.mean(acc[t, : t + 1])) for t in range(k)]
        ax_c.plot(steps, avg, color="black", lw=2.5, marker="s", label="average over seen tasks")
    else:
        ax_c.text(0.5, 0.5, "no task finished yet", ha="center", va="center", transform=ax_c.transAxes)
    ax_c.set_xlim(-0.3, max(T - 1, 1) + 0.3)
    ax_c.set_ylim(0, 100)
    ax_c.set_xticks(range(T))
    ax_c.set_xlabel("after training task")
    ax_c.set_ylabel("test accuracy (%)")
    ax_c.set_title("accuracy over time")
    ax_c.grid(alpha=0.3)
    if k:
        ax_c.legend(fontsize=7, loc="lower left")

    # Temp name ends in .png so nothing downstream ever mistakes the format.
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), binary=True, suffix=".png")


def run_meta(cfg, seq, spec, approach, num_processes: int, minutes: list[float], history: list[dict],
             seconds: dict[str, Any] | None = None) -> dict[str, Any]:
    """What metrics.json and results.md say about a run besides its matrices.

    `minutes` counts training only; `seconds` splits the time per task into data preparation, training and
    evaluation (plus FWT's evaluation of the untrained model), and `seconds_total` sums each."""
    from mmcl import __version__

    return {
        "task_sequence": seq.name, "tasks": [t.name for t in seq], "modalities": [t.modality for t in seq],
        "classes": [t.classes for t in seq], "image_shape": list(spec.image_shape) if spec.image_shape else None,
        "backbone": cfg.backbone, "approach": cfg.baseline, "scenario": cfg.scenario, "seed": cfg.seed,
        "idrandom": cfg.idrandom, "eval_split": cfg.eval_split, "preset": cfg.preset, "num_processes": num_processes, "mixed_precision": cfg.mixed_precision,
        "parameters": sum(p.numel() for p in approach.parameters()),
        "trainable_parameters": sum(p.numel() for p in approach.parameters_to_train() if p.requires_grad),
        "minutes_per_task": minutes, "minutes": round(sum(minutes), 3), "mmcl_version": __version__,
        **({"seconds_per_task": seconds, "seconds_total": {
            k: round(sum(v), 3) if isinstance(v, list) else v for k, v in seconds.items()}} if seconds else {}),
        **({"history": history} if history else {}),
    }


# -- run directory ---------------------------------------------------------------------------------

def modality_groups(mods: Any) -> dict[str, list[int]] | None:
    """Task indices per modality, from one modality per task; None unless the run mixes modalities."""
    if not isinstance(mods, list) or len(set(map(str, mods))) < 2:
        return None
    groups: dict[str, list[int]] = {}
    for u, m in enumerate(mods):
        groups.setdefault(str(m), []).append(u)
    return groups


def write_report(run_dir: str | os.PathLike, matrix: AccuracyMatrix, meta: dict[str, Any],
                 groups: dict[str, list[int]] | None = None, plot: bool = True) -> None:
    """Write metrics.json, results.md and (with ``plot``) accuracy_matrix.png into ``run_dir``.

    Without ``groups``, a run mixing modalities is grouped by ``meta["modalities"]``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if groups is None:
        groups = modality_groups(meta.get("modalities"))
    status = run_status(matrix, meta)
    # A failed run's metrics.json holds no summary, so no script can take its partial numbers for a result.
    doc: dict[str, Any] = {"status": status, "summary": None if status == "failed" else matrix.summary(),
                           "matrix": matrix.to_dict(), "meta": meta}
    if groups and status != "failed":
        doc["group_summary"] = matrix.group_summary(groups)
    write_json_atomic(run_dir / METRICS_FILE, doc)
    title = " · ".join(str(meta[k]) for k in ("task_sequence", "backbone", "approach") if meta.get(k)) or run_dir.name
    write_text_atomic(run_dir / RESULTS_FILE, results_markdown(matrix, title, meta, groups))
    if not plot:
        return
    try:
        plot_accuracy_matrix(matrix, run_dir / PLOT_FILE, groups)
    except Exception as e:  # noqa: BLE001
        # The report is rewritten after every task of a long run: a plotting problem must not kill training;
        # metrics.json and results.md are already safely written.
        warnings.warn(f"could not draw {run_dir / PLOT_FILE}: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)


def load_metrics(run_dir: str | os.PathLike) -> tuple[AccuracyMatrix, dict[str, Any]]:
    """Read back ``metrics.json`` of a run directory; errors name the file and what is wrong with it."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is '{run_dir}' an mmcl run directory with a finished task?")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("matrix"), dict):
        raise ValueError(f"{path} is malformed: expected an object with a 'matrix' object")
    try:
        matrix = AccuracyMatrix.from_dict(doc["matrix"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is malformed: 'matrix': {e}") from e
    meta = doc.get("meta") or {}
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is malformed: 'meta' must be an object")
    return matrix, meta
