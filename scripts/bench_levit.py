"""LEViT on a task-free stream for several gamma values, beside the online baselines at the same memory.

    python scripts/bench_levit.py --task split_fmnist --gammas 5,10,20 --memory_size 500 \
        [--baselines online_finetune,online_replay,mir] [--variants dkf,fixed,none,earlier] \
        [--earlier_gammas 0.36] [--set online_iters=3 --set levit_lr=1e-3 --set eval_split=valid ...]

LEViT variants (--variants): `dkf` the default (the paper's reading: latent novelty, DKF inside
attention), `fixed` (LEViT-DKF-Fixed, --levit_fusion fixed), `none` (LEViT-No-DKF, --levit_fusion
none), each over --gammas; `earlier`, our earlier variant (--levit_novelty elbo --levit_fusion output
with its sizes: VAE one layer of 400, MLP 200, beta 1), over --earlier_gammas (its gamma is a per-pixel
VAE loss, another scale). `--set eval_split=valid` measures on the valid splits (for choosing gamma).

Each run is a full `--scenario online` run (one pass, batches of --online_batch_size, task ids hidden,
the accuracy matrix filled at the hidden boundaries). Per run: final ACC (and AIA), experts created and
the stream positions where they were, the hidden shifts, parameters (all components), and throughput
= stream examples / seconds spent learning (evaluation excluded). Baselines use the `vit` backbone at
the expert's size (width --levit_embed_dim, depth 1, --levit_heads heads, the same patch). "Shifts
detected" counts hidden boundaries followed by an expansion within two memory fills; "other
expansions" the rest. Writes bench_results/bench_levit_<task>.{json,md,png} (`--render JSON` redraws
them from a JSON file).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmcl.reporting import write_benchmark  # noqa: E402


def parse_value(text: str):
    import yaml

    for kind in (int, float):  # YAML reads 1e-3 as a string
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


# flags of each LEViT variant, on top of the defaults
VARIANTS = {
    "dkf": {},
    "fixed": {"levit_fusion": "fixed"},
    "none": {"levit_fusion": "none"},
    "earlier": {"levit_novelty": "elbo", "levit_fusion": "output", "levit_vae_layers": 1, "levit_vae_hidden": 400,
                "levit_mlp_dim": 200, "levit_beta": 1.0},
}
LABELS = {"dkf": "levit", "fixed": "levit DKF-fixed", "none": "levit no-DKF", "earlier": "levit earlier (elbo, output)"}


def run_one(values: dict) -> dict:
    from mmcl.flags import build_config
    from mmcl.engine import Engine

    cfg = build_config({k: v for k, v in values.items() if k != "variant"})
    engine = Engine(cfg)
    start = time.perf_counter()
    matrix = engine.run()
    wall = time.perf_counter() - start
    approach = engine.approach
    examples = sum(len(t.train) for t in engine.seq)
    boundaries = [sum(len(t.train) for t in engine.seq.tasks[: i + 1]) for i in range(len(engine.seq))]
    learn_s = sum(engine.seconds["train"])
    s = matrix.summary()
    row = {"baseline": cfg.baseline, "gamma": cfg.levit_gamma if cfg.baseline == "levit" else None,
           "variant": values.get("variant"), "label": LABELS.get(values.get("variant"), cfg.baseline),
           "acc": s["acc_final"], "aia": s["aia"], "forgetting": s["forgetting"],
           "parameters": sum(p.numel() for p in approach.parameters()),  # the memory is buffers, not counted
           "examples": examples, "shifts": len(engine.seq) - 1, "hidden_boundaries": boundaries[:-1],
           "learn_s": round(learn_s, 2), "wall_s": round(wall, 2),
           "examples_per_s": round(examples / learn_s, 1) if learn_s else None,
           "acc_row": list(map(float, matrix.acc[-1])), "run_dir": str(engine.run_dir)}
    if cfg.baseline == "levit":
        row["experts"] = len(approach.components)
        row["created_at"] = approach.created_at
        row["checks"] = approach.checks
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="split_fmnist")
    ap.add_argument("--gammas", default="0.3,0.4,0.5,0.8")
    ap.add_argument("--memory_size", type=int, default=500)
    ap.add_argument("--baselines", default="online_finetune,online_replay,mir")
    ap.add_argument("--variants", default="dkf", help=f"LEViT variants, of {', '.join(VARIANTS)}")
    ap.add_argument("--earlier_gammas", default="", help="gammas of the `earlier` variant (per-pixel VAE loss)")
    ap.add_argument("--set", action="append", default=[], metavar="FLAG=VALUE",
                    help="any run flag for every run, e.g. --set online_iters=3")
    ap.add_argument("--out", default="bench_results")
    ap.add_argument("--render", metavar="JSON", help="only re-render the table and plot of a bench_levit JSON file")
    ap.add_argument("--docs", nargs=2, metavar=("JSON", "TABLE_JSON"),
                    help="write the docs/results table JSON (TABLE_JSON; its title, notes and command are kept when "
                         "it exists) from a bench_levit JSON file")
    args = ap.parse_args()
    import torch

    if args.docs:
        docs_table(Path(args.docs[0]), Path(args.docs[1]))
        return
    if args.render:
        result = json.loads(Path(args.render).read_text())
        write_outputs(Path(args.render).parent, result["args"]["task"], result, result.get("threads", 0))
        return

    from mmcl.flags import build_config

    common = {"task": args.task, "scenario": "online", "memory_size": args.memory_size, "progress": False,
              "save_checkpoints": False, "overwrite": True, "output_dir": str(Path(args.out) / "levit_runs")}
    for item in args.set:
        key, _, value = item.partition("=")
        common[key] = parse_value(value)
    probe = build_config({**common, "baseline": "levit"})
    # the baselines' network: one ViT block at the expert's width and patch (LEViT's default: a quarter of the side)
    vit = {"backbone": "vit", "vit_depth": 1, "vit_embed_dim": probe.levit_embed_dim, "vit_heads": probe.levit_heads,
           "patch_size": probe.levit_patch_size or max(1, side_of(args.task, common) // 4)}
    rows = []
    for name in [b for b in args.baselines.split(",") if b]:
        values = {**common, **vit, "baseline": name, "run_name": f"{args.task}-{name}"}
        rows.append(run_one(values))
        print(json.dumps({k: rows[-1][k] for k in ("baseline", "acc", "examples_per_s")}), flush=True)
    for variant in [v for v in args.variants.split(",") if v]:
        gammas = args.earlier_gammas if variant == "earlier" else args.gammas
        for gamma in [float(g) for g in gammas.split(",") if g]:
            values = {**common, **VARIANTS[variant], "backbone": "vit", "baseline": "levit", "levit_gamma": gamma,
                      "variant": variant, "run_name": f"{args.task}-levit-{variant}-g{gamma}"}
            rows.append(run_one(values))
            print(json.dumps({k: rows[-1][k] for k in ("label", "gamma", "acc", "experts", "examples_per_s")}),
                  flush=True)
    settings = {k: v for k, v in common.items() if k not in ("output_dir", "overwrite", "progress", "save_checkpoints")}
    write_outputs(Path(args.out), args.task, {"args": vars(args), "settings": settings, "rows": rows,
                                              "threads": torch.get_num_threads()}, torch.get_num_threads())


def shifts_detected(row: dict, memory_size: int) -> tuple[int, int]:
    """(hidden boundaries followed by an expansion within two memory fills, the other expansions).

    A check runs every memory_size examples; the first one after a boundary may see a memory of both
    distributions, the second sees only the new one."""
    created = row.get("created_at", [])[1:]  # the first component is there from the start
    near = {b for b in row["hidden_boundaries"] for c in created if b < c <= b + 2 * memory_size}
    explained = {c for c in created for b in row["hidden_boundaries"] if b < c <= b + 2 * memory_size}
    return len(near), len(created) - len(explained)


def write_outputs(out: Path, task: str, result: dict, threads: int) -> None:
    rows, settings = result["rows"], result["settings"]
    memory = settings["memory_size"]
    lines = [f"{task} as one online stream ({rows[0]['examples']} examples, {rows[0]['shifts']} hidden shifts), "
             f"settings {settings}, {threads} thread(s)", "",
             "| approach | γ | experts | shifts detected | other expansions | created at (stream position) | parameters | "
             "examples/s | ACC | AIA |", "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        det, other = shifts_detected(r, memory) if r["baseline"] == "levit" else ("", "")
        lines.append(f"| {r.get('label', r['baseline'])} | {'' if r['gamma'] is None else r['gamma']} | {r.get('experts', '')} | "
                     f"{det} | {other} | {', '.join(map(str, r.get('created_at', [])))} | {r['parameters']:,} | "
                     f"{r['examples_per_s']} | {r['acc']:.2f} | {r['aia']:.2f} |")
    lines += ["", f"hidden boundaries at stream positions {rows[0]['hidden_boundaries']}"]
    table = "\n".join(lines) + "\n"
    stem = write_benchmark(out, f"bench_levit_{task}", result, table)
    plot(rows, task, stem.with_suffix(".png"))
    print(table)


def docs_table(result_path: Path, table_path: Path) -> None:
    """A bench result as a docs/results table (rendered by scripts/render_docs.py): one row per run."""
    import subprocess

    result = json.loads(result_path.read_text())
    memory = result["settings"]["memory_size"]
    old = json.loads(table_path.read_text()) if table_path.exists() else {}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    rows = []
    for r in result["rows"]:
        row = {"label": r.get("label", r["baseline"]), "baseline": r["baseline"], "parameters": r["parameters"],
               "examples_per_s": r["examples_per_s"], "metrics": {"acc_final": round(r["acc"], 2),
                                                                   "aia": round(r["aia"], 2)}, "run": None,
               "run_dir": r["run_dir"]}
        if r["baseline"] == "levit":
            det, other = shifts_detected(r, memory)
            row.update(gamma=r["gamma"], experts=r["experts"], shifts_detected=det, other_expansions=other,
                       created_at=r["created_at"])
        rows.append(row)
    columns = [{"header": "approach", "key": "label"},
               {"header": "γ", "key": "gamma", "format": "", "align": "right"},
               {"header": "experts", "key": "experts", "format": "", "align": "right"},
               {"header": "shifts detected", "key": "shifts_detected", "format": "", "align": "right"},
               {"header": "other expansions", "key": "other_expansions", "format": "", "align": "right"},
               {"header": "created at (stream position)", "key": "created_at"},
               {"header": "parameters", "key": "parameters", "format": ",", "align": "right"},
               {"header": "examples/s", "key": "examples_per_s", "format": ".1f", "align": "right"},
               {"header": "ACC", "key": "metrics.acc_final", "format": ".2f", "align": "right"},
               {"header": "AIA", "key": "metrics.aia", "format": ".2f", "align": "right"}]
    table = {"title": old.get("title", f"Task-free online stream, {result['args']['task']}"),
             "source": f"measured at commit {commit} with scripts/bench_levit.py ({result_path}); run directories "
                       f"in each row's run_dir (not kept in the repository)",
             **{k: old[k] for k in ("sequence", "scenario", "backbone", "settings", "command") if k in old},
             "columns": columns, "rows": rows,
             "notes": [f"hidden boundaries at stream positions {result['rows'][0]['hidden_boundaries']}"]}
    table_path.write_text(json.dumps(table, indent=2, ensure_ascii=False) + "\n")


def side_of(task: str, common: dict) -> int:
    import numpy as np

    from mmcl.flags import build_config
    from mmcl.data import load_task_sequence
    from mmcl.data.prepare import reader_context

    cfg = build_config({**common, "baseline": "levit", "ntasks": 1})
    seq = load_task_sequence(task, reader_context(cfg))
    return int(np.asarray(seq[0].train[0]["image"]).shape[0])


def plot(rows: list[dict], task: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    labels = list(dict.fromkeys(r.get("label", "levit") for r in rows if r["baseline"] == "levit"))
    for label in labels:  # one line per variant (the earlier variant's gamma is on another scale)
        lv = sorted((r for r in rows if r["baseline"] == "levit" and r.get("label", "levit") == label),
                    key=lambda r: r["gamma"])
        g = [r["gamma"] for r in lv]
        a1.plot(g, [r["acc"] for r in lv], "o-", label=label)
        a2.plot(g, [r["experts"] for r in lv], "o-", label=label)
    if labels:
        a2.axhline(rows[0]["shifts"] + 1, ls="--", c="gray", label="hidden shifts + 1")
        a1.set_xscale("log")
        a2.set_xscale("log")
    for r in rows:
        if r["baseline"] != "levit":
            a1.axhline(r["acc"], ls=":", label=r["baseline"], c=f"C{1 + rows.index(r)}")
    a1.set(xlabel="γ (--levit_gamma)", ylabel="final ACC %", title=f"{task}, online")
    a2.set(xlabel="γ (--levit_gamma)", ylabel="experts", title="mixture size")
    a1.legend(fontsize=8)
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
