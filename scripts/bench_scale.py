"""1 vs 2 processes and fp32 vs bf16: step time, throughput and peak memory, as ratios, in one run.

    python scripts/bench_scale.py [--task split_fmnist --backbone vit] [--global_batch 64] [--steps 12]

Each setting runs in its own `accelerate launch` (gloo on the CPU, ACCELERATE_USE_CPU=1), training
the same global batch per step: with k processes each takes global_batch / k examples, and the
machine's cores are shared among them (mmcl's default threads per process). Step time =
forward + backward (with DDP's all-reduce) + optimiser step, median after two warm-up steps;
memory = max RSS summed over the processes. Writes bench_results/bench_scale.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mmcl.reporting import write_benchmark  # noqa: E402
SETTINGS = [(1, "no"), (1, "bf16"), (2, "no"), (2, "bf16")]


def worker(args) -> None:
    import torch

    from mmcl.flags import build_config
    from mmcl.engine import Engine
    from mmcl.optim import make_optimizer

    cfg = build_config({"task": args.task, "backbone": args.backbone, "baseline": "finetune", "progress": False,
                        "save_checkpoints": False, "mixed_precision": args.mixed_precision})
    engine = Engine(cfg)
    engine.setup()
    acc, approach = engine.accelerator, engine.approach
    per_process = args.global_batch // acc.num_processes
    task = engine.seq[0]
    approach.before_task(task)
    loader = engine.loader(task.train, per_process, shuffle=False)
    batches = [b for _, b in zip(range(args.steps + 2), loader)]
    model, optimizer = acc.prepare(approach, make_optimizer(cfg, approach.parameter_groups()))
    model.train()
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        loss = model(batch)
        acc.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - start)
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
    total_rss = acc.reduce(rss, reduction="sum").item()
    step = acc.reduce(torch.tensor([statistics.median(times)]), reduction="mean").item()
    if acc.is_main_process:
        print(json.dumps({"processes": acc.num_processes, "mixed_precision": args.mixed_precision,
                          "threads_per_process": torch.get_num_threads(), "step_s": step,
                          "examples_per_s": args.global_batch / step, "max_rss_mb": total_rss}))
    acc.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def measure(args, processes: int, precision: str) -> dict:
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    launch = [accelerate, "launch", "--num_processes", str(processes), "--num_machines", "1", "--dynamo_backend", "no",
              "--mixed_precision", precision] + (["--multi_gpu"] if processes > 1 else ["--cpu"])
    cmd = launch + [__file__, "--worker", "--task", args.task, "--backbone", args.backbone, "--mixed_precision",
                    precision, "--global_batch", str(args.global_batch), "--steps", str(args.steps)]
    env = dict(os.environ, ACCELERATE_USE_CPU="1")
    env.pop("MMCL_NUM_THREADS", None)  # mmcl's default: the cores shared among the processes
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{processes} process(es), {precision}: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="split_fmnist")
    ap.add_argument("--backbone", default="vit")
    ap.add_argument("--global_batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--mixed_precision", default="no")
    ap.add_argument("--out", default="bench_results")
    ap.add_argument("--worker", action="store_true")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    rows = {(p, m): measure(args, p, m) for p, m in SETTINGS}
    base = rows[(1, "no")]
    lines = ["| processes | precision | threads/process | s/step | examples/s | max RSS MB (all processes) | "
             "step ratio vs 1×fp32 | memory ratio vs 1×fp32 |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for (p, m), r in rows.items():
        lines.append(f"| {p} | {'fp32' if m == 'no' else m} | {r['threads_per_process']} | {r['step_s']:.3f} | "
                     f"{r['examples_per_s']:.1f} | {r['max_rss_mb']:.0f} | {r['step_s'] / base['step_s']:.2f} | "
                     f"{r['max_rss_mb'] / base['max_rss_mb']:.2f} |")
    table = (f"{args.task} · {args.backbone} · finetune, global batch {args.global_batch}, median of {args.steps} steps, "
             f"{os.cpu_count()} CPU cores\n\n" + "\n".join(lines) + "\n")
    write_benchmark(args.out, "bench_scale", {"args": vars(args), "rows": [
        dict(r, setting=f"{p}x{m}") for (p, m), r in rows.items()]}, table)
    print(table)


if __name__ == "__main__":
    main()
