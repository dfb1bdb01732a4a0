"""Run several approaches on one task sequence and write one comparison table.

    python scripts/compare.py --task split_fmnist --backbone vit --scenario cil \
        --baselines finetune replay ewc lwf joint -- --memory_size 500

Flags after `--` go to every run (same names as `mmcl run`). Writes
<out>/<name>.json and <name>.md with ACC, macro-F1, BWT, forgetting, AIA and minutes.

Runs made separately (e.g. two at a time) are tabulated from their run directories:

    python scripts/compare.py --runs runs/a runs/b --name split_fmnist-cil
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def fmt(v) -> str:
    return "—" if v is None else f"{v:.2f}"


def run_comparison(task: str, backbone: str, scenario: str, baselines: list[str], flags: list[str], name: str,
                   out: Path) -> list[dict]:
    """Run each approach with the same flags; return one summary row per approach (also saved as JSON)."""
    from mmcl.engine import Engine
    from mmcl.flags import build_config, parse_run_args
    from mmcl.reporting import modality_groups

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for baseline in baselines:
        # one flag list for every approach: each takes the options it has (the rest are reported, not used)
        run_flags = parse_run_args(["--task", task, "--backbone", backbone, "--baseline", baseline, *flags])
        values = dict(run_flags, task=task, backbone=backbone, scenario=scenario, baseline=baseline,
                      progress=False, run_name=f"{name}-{baseline}", output_dir=str(out / "runs"), overwrite=True)
        cfg = build_config(values)
        t0 = time.time()
        engine = Engine(cfg)
        matrix = engine.run()
        s = matrix.summary()
        groups = modality_groups([t.modality for t in engine.seq])
        if groups:  # a mixed run: per-modality ACC / BWT and the BWT split by modality trained
            s["groups"] = matrix.group_summary(groups)
        s.update(baseline=baseline, minutes=(time.time() - t0) / 60, eval_split=cfg.eval_split)
        rows.append(s)
        print(f"{baseline}: ACC {fmt(s['acc_final'])} BWT {fmt(s['bwt'])} forgetting {fmt(s['forgetting'])} "
              f"AIA {fmt(s['aia'])} ({s['minutes']:.1f} min)", flush=True)
        (out / f"{name}.json").write_text(json.dumps({"flags": flags, "rows": rows}, indent=2, default=str))
    return rows


def rows_from_runs(run_dirs: list[str]) -> list[dict]:
    """One summary row per finished run directory (its metrics.json), named by its approach."""
    rows = []
    for d in run_dirs:
        path = Path(d) / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"--runs {d}: no metrics.json (is the run finished?)")
        metrics = json.loads(path.read_text())
        status = metrics.get("status", "complete")
        if status != "complete":  # a failed or unfinished run has no result to put in a table
            why = (metrics.get("meta") or {}).get("failure", {}).get("message", "tasks still to train")
            raise ValueError(f"--runs {d}: the run is {status} ({why}); finish it with `mmcl run --resume {d}`")
        meta = metrics["meta"]
        row = dict(metrics["summary"], baseline=meta["approach"], minutes=meta["minutes"],
                   eval_split=meta.get("eval_split", "test"))
        if metrics.get("group_summary"):  # a mixed run, as run_comparison reports it
            row["groups"] = metrics["group_summary"]
        rows.append(row)
    return rows


def markdown_table(name: str, flags: list[str], rows: list[dict], paper: dict[str, str] | None = None) -> str:
    splits = {r.get("eval_split", "test") for r in rows}
    if len(splits) > 1:  # a validation figure beside a test figure compares nothing
        raise ValueError(f"{name}: the runs were measured on different splits ({', '.join(sorted(splits))})")
    til = any(r.get("til_acc_final") is not None for r in rows)
    header = ("| approach | ACC | AIA | ACC (weighted) | AIA (weighted) | macro-F1 | BWT | forgetting |"
              + (" task-aware ACC |" if til else "") + " minutes |" + (" paper (Acc / MF1) |" if paper else ""))
    on = " — measured on the **valid** split" if splits == {"valid"} else ""
    lines = [f"**{name}** (flags: `{' '.join(flags) or 'defaults'}`){on}", "", header,
             "|---" * (header.count("|") - 1) + "|"]
    for r in rows:
        cells = [r["baseline"], fmt(r["acc_final"]), fmt(r["aia"]), fmt(r.get("acc_final_weighted")),
                 fmt(r.get("aia_weighted")), fmt(r["macro_f1_final"]), fmt(r["bwt"]),
                 fmt(r["forgetting"])] + ([fmt(r.get("til_acc_final"))] if til else []) + [f"{r['minutes']:.1f}"]
        if paper:
            cells.append(paper.get(r["baseline"], "—"))
        lines.append("| " + " | ".join(cells) + " |")
    groups = next((r["groups"] for r in rows if r.get("groups")), None)
    if groups:
        lines += ["", "Per modality (ACC, BWT, and BWT split by the modality being trained):", ""]
        header = ["approach"]
        for g in groups:
            header += [f"{g} ACC", f"{g} BWT"] + [f"{g} BWT while {h}" for h in groups]
        lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        for r in rows:
            cells = [r["baseline"]]
            for g in groups:
                v = r["groups"][g]
                cells += [fmt(v["acc_final"]), fmt(v["bwt"])] + [fmt(v["bwt_while"][h]) for h in groups]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task")
    ap.add_argument("--backbone")
    ap.add_argument("--scenario")
    ap.add_argument("--baselines", nargs="+")
    ap.add_argument("--runs", nargs="+", help="tabulate these finished run directories instead of running")
    ap.add_argument("--name", default=None)
    ap.add_argument("--out", default="bench_results")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    out = Path(args.out)
    if args.runs:
        name = args.name or "comparison"
        rows = rows_from_runs(args.runs)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps({"runs": args.runs, "rows": rows}, indent=2, default=str))
    else:
        missing = [f"--{k}" for k in ("task", "backbone", "scenario", "baselines") if not getattr(args, k)]
        if missing:
            ap.error(f"{', '.join(missing)} required (or --runs DIR...)")
        name = args.name or f"{Path(args.task).stem}-{args.backbone}-{args.scenario}"
        rows = run_comparison(args.task, args.backbone, args.scenario, args.baselines, extra, name, out)
    table = markdown_table(name, extra, rows)
    (out / f"{name}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
