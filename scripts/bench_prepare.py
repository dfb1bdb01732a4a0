"""Data preparation of a text sequence, first run against a second run of the same sequence (issue #22):
the second loads the tokenised splits kept under MMCL_CACHE instead of tokenising again. Writes JSON and a
markdown table.

    python scripts/bench_prepare.py [--task vader4] [--backbone bert_adapter]

Each run is a fresh process (nothing shared in memory) that sets the engine up as `mmcl run` does, with an
empty cache folder before the first run. Data preparation is the engine's `seconds_per_task.prepare` (the
backbone's tokenisation and the scenario's targets, every split of every task); reading the files and
loading the model are timed apart.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def child(task: str, backbone: str) -> None:
    from mmcl.engine import Engine
    from mmcl.flags import build_config

    start = time.perf_counter()
    engine = Engine(build_config({"task": task, "backbone": backbone, "baseline": "finetune", "progress": False}))
    engine.setup()
    setup = time.perf_counter() - start
    print(json.dumps({"prepare_s": sum(engine.seconds["prepare"]), "setup_s": setup,
                      "examples": sum(len(t.train) + len(t.valid) + len(t.test) for t in engine.seq)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="vader4")
    ap.add_argument("--backbone", default="bert_adapter")
    ap.add_argument("--out", default="bench_results")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.task, args.backbone)
    from mmcl.reporting import write_benchmark

    runs = []
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, MMCL_CACHE=cache, HF_HUB_OFFLINE="1")
        for _ in range(2):
            out = subprocess.run([sys.executable, __file__, "--child", "--task", args.task, "--backbone", args.backbone],
                                 env=env, check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
    first, second = runs
    ratio = first["prepare_s"] / second["prepare_s"]
    result = {"task": args.task, "backbone": args.backbone, "first": first, "second": second, "ratio": ratio}
    table = ("| task | backbone | examples | preparation s, first run | preparation s, second run | first / second | "
             "set-up s, first | set-up s, second |\n|---|---|---:|---:|---:|---:|---:|---:|\n"
             f"| {args.task} | {args.backbone} | {first['examples']} | {first['prepare_s']:.2f} | "
             f"{second['prepare_s']:.3f} | {ratio:.1f} | {first['setup_s']:.1f} | {second['setup_s']:.1f} |\n")
    write_benchmark(args.out, "bench_prepare", result, table)
    print(table)


if __name__ == "__main__":
    main()
