"""Engine overhead: the same model, data and optimiser trained by the mmcl engine and by a minimal plain
PyTorch loop, in one run, for finetune and replay at each batch size. Writes JSON and a markdown table.

    python scripts/bench_overhead.py [--task split_fmnist] [--steps 60] [--repeats 3] [--batch_sizes 32,64]

The timed task is the second one, so replay has a memory (filled by the untimed first task). The plain loop
takes pre-made tensors and does the method's maths and nothing else: finetune, cross-entropy of a batch;
replay, one forward over the batch and as many examples drawn from the memory, loss (mean over the batch +
mean over the memory examples) / 2. Ratio = mmcl seconds per step / plain seconds per step (median over
interleaved repeats).
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
import torch.nn.functional as F  # noqa: E402

from mmcl.engine import Engine  # noqa: E402
from mmcl.flags import build_config  # noqa: E402
from mmcl.optim import make_optimizer  # noqa: E402
from mmcl.reporting import write_benchmark  # noqa: E402


def tensors(engine: Engine, dataset, rows) -> tuple[torch.Tensor, torch.Tensor]:
    batch = engine.collate.rows(dataset, rows)
    return batch["pixel_values"], batch["labels"]


def plain_loop(engine: Engine, steps: int, batch_size: int, seed: int) -> float:
    """The baseline: pre-made tensors, model, the engine's optimiser (fused AdamW), the method's loss, nothing
    else. Seconds per step."""
    torch.manual_seed(seed)
    task, approach = engine.seq[1], engine.approach
    model = approach.model
    x, y = tensors(engine, task.train, range(len(task.train)))
    memory = getattr(approach, "memory", None)
    if memory is not None:  # the memory's rows, once, as tensors
        refs = memory.sample(len(memory), np.random.default_rng(seed))
        parts = [tensors(engine, engine.seq[t].train, [r]) for t, r in refs]
        mx, my = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    opt = make_optimizer(approach.cfg, [p for p in model.parameters() if p.requires_grad])  # the engine's optimiser
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch_size,))
        if memory is None:
            loss = F.cross_entropy(model({"pixel_values": x[idx]}), y[idx])
        else:
            m = torch.randint(0, len(my), (batch_size,))
            logits = model({"pixel_values": torch.cat([x[idx], mx[m]])})
            losses = F.cross_entropy(logits, torch.cat([y[idx], my[m]]), reduction="none")
            loss = (losses[:batch_size].mean() + losses[batch_size:].mean()) / 2
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def mmcl_loop(engine: Engine, steps: int) -> float:
    start = time.perf_counter()
    engine.train_task(engine.seq[1])
    return (time.perf_counter() - start) / steps


def measure(args, baseline: str, batch_size: int) -> dict:
    n_train = args.steps * batch_size
    cfg = build_config({"task": args.task, "backbone": args.backbone, "baseline": baseline, "scenario": "cil",
                        "num_train_epochs": 1, "train_batch_size": batch_size, "max_train_per_task": n_train,
                        "ntasks": 2, "progress": False, "save_checkpoints": False})
    engine = Engine(cfg)
    engine.setup()
    engine.train_task(engine.seq[0])  # fills replay's memory; also warms both paths up (allocator, imports)
    steps = -(-len(engine.seq[1].train) // batch_size)
    plain_loop(engine, 5, batch_size, 0)
    mmcl_times, plain_times = [], []
    for r in range(args.repeats):
        mmcl_times.append(mmcl_loop(engine, steps))
        plain_times.append(plain_loop(engine, steps, batch_size, r))
    m, p = statistics.median(mmcl_times), statistics.median(plain_times)
    return {"task": args.task, "backbone": args.backbone, "baseline": baseline, "batch": batch_size, "steps": steps,
            "repeats": args.repeats, "mmcl_s_per_step": m, "plain_s_per_step": p, "ratio": m / p,
            "mmcl_all": mmcl_times, "plain_all": plain_times}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="split_fmnist")
    ap.add_argument("--backbone", default="vit")
    ap.add_argument("--baselines", default="finetune,replay")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch_sizes", default="32,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench_results")
    args = ap.parse_args()
    rows = [measure(args, b, int(bs)) for b in args.baselines.split(",") for bs in args.batch_sizes.split(",")]
    result = {"rows": rows, "threads": torch.get_num_threads()}
    table = ("| task | backbone | approach | batch | steps | mmcl s/step | plain s/step | ratio mmcl/plain |\n"
             "|---|---|---|---:|---:|---:|---:|---:|\n")
    table += "".join(f"| {r['task']} | {r['backbone']} | {r['baseline']} | {r['batch']} | {r['steps']} | "
                     f"{r['mmcl_s_per_step']:.4f} | {r['plain_s_per_step']:.4f} | {r['ratio']:.3f} |\n" for r in rows)
    write_benchmark(args.out, "bench_overhead", result, table)
    print(table)


if __name__ == "__main__":
    main()
