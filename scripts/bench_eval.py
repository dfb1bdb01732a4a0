"""Evaluation time of a class-incremental run: testing every task after every task (as before issue #22)
against skipping the tasks whose classes the model cannot output yet, in one run. Writes JSON and a
markdown table.

    python scripts/bench_eval.py [--task split_fmnist] [--max_train_per_task 200] [--repeats 2]

Both modes share one trained model per task (the same engine): after each task, each mode evaluates the
whole matrix row, interleaved and repeated; the ratio is the skip mode's evaluation seconds over the full
mode's, summed over the run. The accuracy matrices of the two modes must be equal (the script fails if not).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mmcl.engine import Engine  # noqa: E402
from mmcl.flags import build_config  # noqa: E402
from mmcl.reporting import write_benchmark  # noqa: E402


def timed_row(engine: Engine, skip: bool) -> tuple[float, list[float]]:
    approach = engine.approach
    if not skip:  # the model run on every task: what the engine did before it knew future tasks score 0
        approach.predictable_classes = lambda: None
    start = time.perf_counter()
    acc, _, _ = engine.evaluate_all()
    seconds = time.perf_counter() - start
    if not skip:
        del approach.predictable_classes
    return seconds, acc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="split_fmnist")
    ap.add_argument("--backbone", default="vit")
    ap.add_argument("--baseline", default="replay")
    ap.add_argument("--max_train_per_task", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="bench_results")
    args = ap.parse_args()
    cfg = build_config({"task": args.task, "backbone": args.backbone, "baseline": args.baseline, "scenario": "cil",
                        "num_train_epochs": 1, "max_train_per_task": args.max_train_per_task, "progress": False,
                        "save_checkpoints": False})
    engine = Engine(cfg)
    engine.setup()
    full_s, skip_s = [], []
    for task in engine.seq:
        engine.train_task(task)
        full_t, skip_t, rows = [], [], {}
        for _ in range(args.repeats):  # interleaved, so drifts in machine speed hit both modes alike
            for skip, times in ((False, full_t), (True, skip_t)):
                seconds, rows[skip] = timed_row(engine, skip)
                times.append(seconds)
        if rows[False] != rows[True]:
            raise SystemExit(f"after task {task.id} the two modes' accuracies differ: {rows[False]} vs {rows[True]}")
        full_s.append(statistics.median(full_t))
        skip_s.append(statistics.median(skip_t))
        engine.matrix.set_row(task.id, *engine.evaluate_all())
    T = len(engine.seq)
    ratio = sum(skip_s) / sum(full_s)
    result = {"task": args.task, "backbone": args.backbone, "baseline": args.baseline, "tasks": T,
              "test_examples": [len(t.test) for t in engine.seq], "repeats": args.repeats,
              "full_eval_seconds_per_task": full_s, "skip_eval_seconds_per_task": skip_s,
              "full_eval_seconds": sum(full_s), "skip_eval_seconds": sum(skip_s), "ratio": ratio,
              "splits_tested": {"full": T * T, "skip": T * (T + 1) // 2},
              "acc_final": float(np.mean(engine.matrix.acc[-1])), "threads": torch.get_num_threads()}
    table = ("| task | backbone | approach | tasks | evaluation s, every task | evaluation s, seen tasks only | "
             "ratio |\n|---|---|---|---:|---:|---:|---:|\n"
             f"| {args.task} | {args.backbone} | {args.baseline} | {T} | {sum(full_s):.1f} | {sum(skip_s):.1f} | "
             f"{ratio:.3f} |\n")
    write_benchmark(args.out, "bench_eval", result, table)
    print(table)


if __name__ == "__main__":
    main()
