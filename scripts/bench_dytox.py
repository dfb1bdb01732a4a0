"""DyTox's growth per task: active parameters, step time and memory after each task, as a table.

    python scripts/bench_dytox.py [--task split_fmnist] [--steps 6] [--batch_size 32]

Tokens and heads of all tasks are allocated up front (fixed shapes for checkpoints and DDP);
"active" counts the shared encoder and task-attention block plus the tokens, classifiers and
divergence heads of tasks 0..t, the parameters a model grown task by task would hold. Step time
(forward with t+1 task tokens, the previous model's distillation forward, backward, AdamW step)
is the median over --steps batches of task t. Writes bench_results/bench_dytox.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmcl.reporting import write_benchmark  # noqa: E402


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="split_fmnist")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--out", default="bench_results")
    args = ap.parse_args()
    import torch

    from mmcl.flags import build_config
    from mmcl.engine import Engine
    from mmcl.optim import make_optimizer

    cfg = build_config({"task": args.task, "backbone": "convit", "baseline": "dytox", "scenario": "cil",
                        "progress": False, "save_checkpoints": False, "train_batch_size": args.batch_size})
    engine = Engine(cfg)
    engine.setup()
    approach, m = engine.approach, engine.approach.model
    per_task = [count(m.heads[j]) + count(m.divergence[j]) + m.task_tokens[j].numel() for j in range(len(engine.seq))]
    shared = count(m) - sum(per_task)
    rows = []
    for task in engine.seq:
        approach.before_task(task)
        loader = engine.loader(approach.train_dataset(task), args.batch_size, shuffle=True, seed=task.id)
        optimizer = make_optimizer(cfg, approach.parameter_groups())
        times = []
        for i, batch in zip(range(args.steps + 1), loader):
            start = time.perf_counter()
            loss = approach.training_step(batch, task)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i:  # the first step warms up
                times.append(time.perf_counter() - start)
        approach.after_task(task, None)  # herding memory and balanced fine-tuning, as in a run
        active = shared + sum(per_task[: task.id + 1])
        rows.append({"task": task.id, "active_parameters": active, "growth": per_task[task.id],
                     "growth_percent": 100 * per_task[task.id] / active, "step_s": statistics.median(times),
                     "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                     "memory_examples": len(approach.memory), "threads": torch.get_num_threads()})
    lines = ["| after task | active parameters | added by the task | growth % | s/step | max RSS MB | memory examples |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['active_parameters']:,} | {r['growth']:,} | {r['growth_percent']:.3f} | "
                     f"{r['step_s']:.3f} | {r['max_rss_mb']:.0f} | {r['memory_examples']} |")
    table = (f"{args.task} · convit (width {cfg.vit_embed_dim}, depth {cfg.vit_depth}) · dytox, batch {args.batch_size}, "
             f"median of {args.steps} steps\n\n" + "\n".join(lines) + "\n")
    write_benchmark(args.out, "bench_dytox", {"args": vars(args), "rows": rows}, table)
    print(table)


if __name__ == "__main__":
    main()
