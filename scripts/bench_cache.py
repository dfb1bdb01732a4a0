"""Cached frozen features (mmcl/feature_cache.py): training seconds per epoch with the cache and without it
(every epoch running the frozen encoder, as before issue #22), in one run, for `--freeze_backbone` finetune
and for coda_prompt (its query pass). Writes JSON and a markdown table.

    python scripts/bench_cache.py [--task split_fmnist] [--max_train_per_task 1000] [--epochs 3]

Each setting runs twice from the same seed, cache on and off (the order alternating between settings);
the epochs' training seconds come from log.jsonl (training only, no evaluation). The accuracy matrices of the
two runs must agree within one test example per entry (features computed in other batches round
differently), or the script fails.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import mmcl.feature_cache as feature_cache  # noqa: E402
from mmcl.engine import Engine  # noqa: E402
from mmcl.flags import build_config  # noqa: E402
from mmcl.reporting import write_benchmark  # noqa: E402

SETTINGS = {"finetune, --freeze_backbone": {"baseline": "finetune", "freeze_backbone": True},
            "coda_prompt": {"baseline": "coda_prompt"}}


def one_run(values: dict, cache: bool, out: Path) -> dict:
    real = feature_cache.deterministic_and_frozen
    if not cache:
        feature_cache.deterministic_and_frozen = lambda module: False
    try:
        engine = Engine(build_config(dict(values, output_dir=str(out))))
        matrix = engine.run()
    finally:
        feature_cache.deterministic_and_frozen = real
    epochs = [json.loads(line) for line in (engine.run_dir / "log.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e.get("event") == "epoch"]
    first = [e["seconds"] for e in epochs if e["epoch"] == 0]
    later = [e["seconds"] for e in epochs if e["epoch"] > 0]
    test_sizes = [len(t.test) for t in engine.seq]
    return {"acc": matrix.acc.tolist(), "epoch_seconds": [e["seconds"] for e in epochs],
            "first_epoch_s": float(np.sum(first)), "later_epochs_s": float(np.sum(later)),
            "per_epoch_s": float(np.mean([e["seconds"] for e in epochs])), "test_sizes": test_sizes}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="split_fmnist")
    ap.add_argument("--backbone", default="vit")
    ap.add_argument("--scenario", default="cil")
    ap.add_argument("--ntasks", type=int, default=2)
    ap.add_argument("--max_train_per_task", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", default="bench_results")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, setting) in enumerate(SETTINGS.items()):
            values = {"task": args.task, "backbone": args.backbone, "scenario": args.scenario, "ntasks": args.ntasks,
                      "max_train_per_task": args.max_train_per_task, "num_train_epochs": args.epochs,
                      "progress": False, "save_checkpoints": False, **setting}
            order = (True, False) if i % 2 == 0 else (False, True)
            runs = {cache: one_run(values, cache, Path(tmp) / f"{i}-{cache}") for cache in order}
            on, off = runs[True], runs[False]
            tolerance = 100 / min(on["test_sizes"]) + 1e-9  # one test example
            apart = float(np.nanmax(np.abs(np.array(on["acc"], float) - np.array(off["acc"], float))))
            if apart > tolerance:
                raise SystemExit(f"{label}: accuracy matrices {apart:.2f} points apart (> one example, "
                                 f"{tolerance:.2f}): {on['acc']} vs {off['acc']}")
            rows.append({"setting": label, "epochs": args.epochs, "tasks": args.ntasks,
                         "train_per_task": args.max_train_per_task, "acc_apart": apart,
                         "per_epoch_off": off["per_epoch_s"], "per_epoch_on": on["per_epoch_s"],
                         "speedup": off["per_epoch_s"] / on["per_epoch_s"],
                         "later_speedup": off["later_epochs_s"] / on["later_epochs_s"],
                         "final_acc_on": float(np.mean(on["acc"][-1])), "final_acc_off": float(np.mean(off["acc"][-1])),
                         "runs": {"on": on, "off": off}})
    result = {"task": args.task, "backbone": args.backbone, "scenario": args.scenario, "rows": rows}
    table = ("| setting | epochs | s/epoch, no cache | s/epoch, cache | speed-up per epoch | speed-up, epochs after the "
             "first | matrices apart (points) |\n|---|---:|---:|---:|---:|---:|---:|\n")
    table += "".join(f"| {r['setting']} | {r['epochs']} | {r['per_epoch_off']:.2f} | {r['per_epoch_on']:.2f} | "
                     f"{r['speedup']:.2f} | {r['later_speedup']:.2f} | {r['acc_apart']:.2f} |\n" for r in rows)
    write_benchmark(args.out, "bench_cache", result, table)
    print(table)


if __name__ == "__main__":
    main()
