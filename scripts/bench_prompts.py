"""Prompting a frozen vit: trainable parameters, step time, peak memory and the query pass's cost, per method.

    python scripts/bench_prompts.py [--task split_fmnist] [--steps 10] [--batch_size 32]

Each method is measured in a fresh process (so its peak RSS is its own) at the LAST task of the
sequence (CODA-Prompt then uses its whole pool, DualPrompt chooses among all e-prompts).
step = query pass + prompted forward + backward + AdamW step, median over --steps batches after
a warm-up step. "saved MB" is what autograd keeps for backward (activations; on a GPU the
peak allocated memory is reported too). Query share = time of the prompt-free no_grad query
pass / step time; "query / prompted fwd" compares it with the prompted forward alone.
Baselines: finetune with --freeze_backbone (FT-frozen, the head alone) and full finetune.
Writes bench_results/bench_prompts.{json,md}.
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
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mmcl.reporting import write_benchmark  # noqa: E402

METHODS = {  # label -> run settings
    "coda_prompt": {"baseline": "coda_prompt"},
    "dualprompt": {"baseline": "dualprompt"},
    "l2p": {"baseline": "l2p"},
    "finetune (frozen backbone)": {"baseline": "finetune", "freeze_backbone": True},
    "finetune (full)": {"baseline": "finetune"},
}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure(label: str, args) -> dict:
    import torch

    from mmcl.flags import build_config
    from mmcl.engine import Engine
    from mmcl.optim import make_optimizer

    cfg = build_config({"task": args.task, "backbone": "vit", "scenario": "cil", "progress": False,
                        "save_checkpoints": False, "train_batch_size": args.batch_size,
                        "max_train_per_task": args.batch_size * (args.steps + 1), **METHODS[label]})
    engine = Engine(cfg)
    engine.setup()
    approach = engine.approach
    for task in engine.seq:
        approach.before_task(task)
    task = engine.seq[-1]
    approach.train()
    optimizer = make_optimizer(cfg, approach.parameter_groups())
    trainable = sum(p.numel() for p in approach.parameters_to_train() if p.requires_grad)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    steps, queries, prompted = [], [], []
    is_prompt = hasattr(approach, "prompt_features")
    for i, batch in zip(range(args.steps + 1), engine.loader(task.train, args.batch_size, shuffle=True)):
        saved.clear()
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = approach.training_step(batch, task)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step = time.perf_counter() - start
        if is_prompt:
            q, tq = timed(lambda: approach.query(batch))
            with torch.no_grad():
                _, tp = timed(lambda: approach.prompt_features(batch, q, task))
        else:
            tq = tp = float("nan")
        if i:  # the first step warms up
            steps.append(step); queries.append(tq); prompted.append(tp)
    cuda = torch.cuda.is_available()
    return {
        "method": label, "trainable_parameters": trainable,
        "total_parameters": sum(p.numel() for p in approach.parameters()),
        "step_s": statistics.median(steps), "query_s": statistics.median(queries),
        "prompted_forward_s": statistics.median(prompted),
        "query_share": statistics.median(queries) / statistics.median(steps),
        "saved_activations_mb": sum(saved) / 2**20,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(), "device": str(engine.accelerator.device),
        "vit": {"embed_dim": cfg.vit_embed_dim, "depth": cfg.vit_depth, "heads": cfg.vit_heads},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="split_fmnist")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--out", default="bench_results")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one method, print JSON
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(args.one, args)))
        return
    rows = []
    for label in METHODS:
        cmd = [sys.executable, __file__, "--one", label, "--task", args.task, "--steps", str(args.steps),
               "--batch_size", str(args.batch_size)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not lines:
            raise SystemExit(f"{label} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][len("RESULT "):]))
        print(f"{label}: {rows[-1]['step_s']:.3f} s/step", flush=True)
    base = next(r for r in rows if r["method"] == "finetune (frozen backbone)")["step_s"]
    lines = ["| method | trainable parameters | s/step | x FT-frozen | query pass s | query share of step | "
             "query / prompted fwd | saved activations MB | max RSS MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fmt = lambda v, f: "—" if v != v else format(v, f)  # noqa: E731 (NaN for the baselines: no query pass)
    for r in rows:
        lines.append(f"| {r['method']} | {r['trainable_parameters']:,} | {r['step_s']:.3f} | {r['step_s'] / base:.2f} | "
                     f"{fmt(r['query_s'], '.3f')} | {fmt(r['query_share'], '.2f')} | "
                     f"{fmt(r['query_s'] / r['prompted_forward_s'], '.2f')} | {r['saved_activations_mb']:.1f} | "
                     f"{r['max_rss_mb']:.0f} |")
    v = rows[0]["vit"]
    table = (f"{args.task} · vit (width {v['embed_dim']}, depth {v['depth']}), CIL, last task, batch {args.batch_size}, "
             f"median of {args.steps} steps, {rows[0]['device']}, {rows[0]['threads']} thread(s)\n\n"
             + "\n".join(lines) + "\n")
    write_benchmark(args.out, "bench_prompts", {"args": vars(args), "rows": rows}, table)
    print(table)


if __name__ == "__main__":
    main()
