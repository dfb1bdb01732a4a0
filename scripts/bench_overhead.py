"""Engine overhead: the same model, data and optimiser trained by the mmcl engine (finetune)
and by a minimal plain PyTorch loop, in one run. Writes JSON and a markdown table.

    python scripts/bench_overhead.py [--task split_fmnist] [--steps 60] [--repeats 3]

Ratio = mmcl seconds per step / plain seconds per step (median over interleaved repeats).
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

import torch  # noqa: E402

from mmcl.flags import build_config  # noqa: E402
from mmcl.engine import Engine  # noqa: E402
from mmcl.reporting import write_benchmark  # noqa: E402


def plain_loop(engine: Engine, steps: int, batch_size: int, lr: float, seed: int) -> float:
    """The baseline: pre-collated tensors, model, AdamW, nothing else. Returns seconds per step."""
    torch.manual_seed(seed)
    task = engine.seq[0]
    approach = engine.approach
    model = approach.model
    rows = [task.train[i] for i in range(min(len(task.train), steps * batch_size))]
    data = engine.collate(rows)
    x = {k: v for k, v in data.items() if k in engine.backbone.input_keys}
    y = data["labels"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    n = y.shape[0]
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, n, (batch_size,))
        logits = model({k: v[idx] for k, v in x.items()}, 0)
        loss = torch.nn.functional.cross_entropy(logits, y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def mmcl_loop(engine: Engine, steps: int) -> float:
    task = engine.seq[0]
    start = time.perf_counter()
    engine.train_task(task)
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="split_fmnist")
    ap.add_argument("--backbone", default="vit")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench_results")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    n_train = args.steps * args.batch_size
    cfg = build_config({"task": args.task, "backbone": args.backbone, "baseline": "finetune", "scenario": "til",
                        "num_train_epochs": 1, "train_batch_size": args.batch_size, "max_train_per_task": n_train,
                        "ntasks": 1, "progress": False, "save_checkpoints": False})
    engine = Engine(cfg)
    engine.setup()
    steps = -(-len(engine.seq[0].train) // args.batch_size)
    mmcl_times, plain_times = [], []
    mmcl_loop(engine, steps)  # warm-up both paths (allocator, lazy imports)
    plain_loop(engine, 5, args.batch_size, cfg.learning_rate, 0)
    for r in range(args.repeats):
        mmcl_times.append(mmcl_loop(engine, steps))
        plain_times.append(plain_loop(engine, steps, args.batch_size, cfg.learning_rate, r))
    m, p = statistics.median(mmcl_times), statistics.median(plain_times)
    result = {"task": args.task, "backbone": args.backbone, "batch_size": args.batch_size, "steps": steps,
              "repeats": args.repeats, "mmcl_s_per_step": m, "plain_s_per_step": p, "ratio": m / p,
              "mmcl_all": mmcl_times, "plain_all": plain_times, "threads": torch.get_num_threads()}
    table = ("| task | backbone | batch | steps | mmcl s/step | plain s/step | ratio mmcl/plain |\n"
             "|---|---|---:|---:|---:|---:|---:|\n"
             f"| {args.task} | {args.backbone} | {args.batch_size} | {steps} | {m:.4f} | {p:.4f} | {m / p:.3f} |\n")
    write_benchmark(args.out, "bench_overhead", result, table)
    print(table)


if __name__ == "__main__":
    main()
