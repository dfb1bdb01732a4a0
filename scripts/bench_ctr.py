"""CTR's cost against bert_adapter + finetune on the same batches, as ratios, in one run.

    python scripts/bench_ctr.py [--task vader4] [--steps 8] [--bert_adapter_size 128]
    python scripts/bench_ctr.py --task asc --data_dir ../shared/data     # 19 tasks: the worst case

Each (approach, task index) is measured in its own subprocess so that peak memory (max RSS) is
its own; step time = forward + backward + the approach's gradient hooks + optimiser step.
CTR's knowledge-sharing module grows with the number of earlier tasks, so it is measured at
the first and at the last task of the sequence. Writes bench_results/bench_ctr.{json,md}.
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


def worker(args) -> None:
    import torch

    from mmcl.flags import build_config
    from mmcl.engine import Engine
    from mmcl.optim import make_optimizer

    cfg = build_config(dict(run_settings(args), baseline=args.approach))
    engine = Engine(cfg)
    engine.setup()
    approach = engine.approach
    task = engine.seq[args.task_index]
    approach.before_task(task)
    loader = engine.loader(task.train, cfg.train_batch_size, shuffle=False)
    batches = [b for _, b in zip(range(args.steps + 2), loader)]
    optimizer = make_optimizer(cfg, approach.parameter_groups())
    approach.train()
    times = []
    for i, batch in enumerate(batches):
        approach.progress.__init__(0, 1, i, len(batches), i)
        start = time.perf_counter()
        loss = approach(batch)
        loss.backward()
        approach.before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        approach.after_optimizer_step()
        if i >= 2:  # first two steps warm up allocators and lazy inits
            times.append(time.perf_counter() - start)
    n_train = sum(p.numel() for p in approach.parameters_to_train() if p.requires_grad)
    print(json.dumps({"step_s": statistics.median(times), "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "trainable_parameters": n_train, "threads": torch.get_num_threads()}))


def run_settings(args) -> dict:
    settings = {"task": args.task, "backbone": "bert_adapter", "bert_adapter_size": args.bert_adapter_size,
                "progress": False, "save_checkpoints": False, "train_batch_size": args.batch_size}
    if args.data_dir:
        settings["data_dir"] = args.data_dir
    if args.ntasks:
        settings["ntasks"] = args.ntasks
    return settings


def measure(args, approach: str, task_index: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--approach", approach, "--task_index", str(task_index),
           "--task", args.task, "--steps", str(args.steps), "--batch_size", str(args.batch_size),
           "--bert_adapter_size", str(args.bert_adapter_size)]
    if args.data_dir:
        cmd += ["--data_dir", args.data_dir]
    if args.ntasks:
        cmd += ["--ntasks", str(args.ntasks)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="vader4")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--bert_adapter_size", type=int, default=128)
    ap.add_argument("--data_dir", default=None, help="for asc / dsc")
    ap.add_argument("--ntasks", type=int, default=None)
    ap.add_argument("--out", default="bench_results")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--approach", default="ctr")
    ap.add_argument("--task_index", type=int, default=0)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from mmcl.flags import build_config
    from mmcl.data import load_task_sequence
    from mmcl.data.prepare import reader_context

    # the workers' own sequence (same settings), so the last index is theirs
    last = len(load_task_sequence(args.task, reader_context(build_config(run_settings(args))))) - 1
    rows = []
    for index in (0, last):
        base = measure(args, "finetune", index)
        ctr = measure(args, "ctr", index)
        rows.append({"task_index": index, "finetune": base, "ctr": ctr,
                     "step_ratio": ctr["step_s"] / base["step_s"], "rss_ratio": ctr["max_rss_mb"] / base["max_rss_mb"]})
    lines = ["| task index | adapter+finetune s/step | ctr s/step | step ratio ctr/finetune | finetune max RSS MB | "
             "ctr max RSS MB | memory ratio | ctr trainable params |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['task_index']} | {r['finetune']['step_s']:.3f} | {r['ctr']['step_s']:.3f} | {r['step_ratio']:.2f} | "
                     f"{r['finetune']['max_rss_mb']:.0f} | {r['ctr']['max_rss_mb']:.0f} | {r['rss_ratio']:.2f} | "
                     f"{r['ctr']['trainable_parameters']:,} |")
    table = (f"{args.task}, batch {args.batch_size}, bert_adapter_size {args.bert_adapter_size}, median of {args.steps} steps\n\n"
             + "\n".join(lines) + "\n")
    stem = "bench_ctr" if args.task == "vader4" else f"bench_ctr-{args.task}"
    write_benchmark(args.out, stem, {"args": vars(args), "rows": rows}, table)
    print(table)


if __name__ == "__main__":
    main()
