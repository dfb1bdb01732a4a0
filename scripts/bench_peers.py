"""mmcl against Avalanche 0.6 on one protocol, in one run: the same split_fmnist arrays, the same timm ViT with
the same initial weights, the same optimiser, for finetune, replay, ewc and lwf. Writes the training,
evaluation and whole-run time ratios and both accuracy matrices to bench_results/bench_peers.{json,md}.

    bash scripts/peers/setup_avalanche.sh            # once: a separate venv with avalanche-lib==0.6.0
    python scripts/bench_peers.py [--strategies finetune,replay,ewc,lwf] [--threads 2]

Protocol (issue #22): split_fmnist as mmcl reads it (5 tasks of 2 classes, 2,000 training and 1,000 test
images per task), class-incremental, ViT of 4 blocks, width 192, 3 heads, patch 4, AdamW lr 2e-4 without
weight decay or schedule, batch 32, 2 epochs, memory 500 (replay), EWC lambda 5000, LwF alpha 1 and T 2,
evaluation batch 128. Each framework runs in its own process with the same number of threads, one after the
other. The arrays and the initial weights are exported from mmcl's own reader and model; Avalanche is never
a dependency of mmcl (its venv lives under bench_results/). Times: training = each framework's time in its
training call per task (mmcl: `meta.seconds_per_task.train`; Avalanche: `strategy.train`), evaluation =
testing after each task as each framework does it (mmcl skips the tasks whose classes a CIL model cannot
output yet; Avalanche tests the whole stream), whole run = the child process's wall time.
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
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEERS_PYTHON = ROOT / "bench_results" / ".peers-venv" / "bin" / "python"
RUNNER = ROOT / "scripts" / "peers" / "avalanche_runner.py"
NAMES = {"finetune": "naive", "replay": "replay", "ewc": "ewc", "lwf": "lwf"}  # mmcl -> Avalanche


def protocol(args) -> dict:
    return {"task": "split_fmnist", "backbone": "vit", "scenario": "cil", "vit_embed_dim": 192, "vit_depth": 4,
            "vit_heads": 3, "patch_size": 4, "optimizer": "adamw", "learning_rate": 2e-4, "weight_decay": 0.0,
            "lr_scheduler": "constant", "train_batch_size": 32, "eval_batch_size": 128, "num_train_epochs": args.epochs,
            "ntasks": args.ntasks, "progress": False, "save_checkpoints": False, "seed": 0}


OWN_OPTIONS = {"replay": {"memory_size": 500}, "ewc": {"lamb": 5000.0}, "lwf": {"lwf_lambda": 1.0, "temperature": 2.0}}


def engine_for(values: dict):
    from mmcl.engine import Engine
    from mmcl.flags import build_config

    return Engine(build_config(values))


def export(args, folder: Path) -> tuple[Path, Path]:
    """The arrays mmcl trains and tests on, and its initial weights (backbone.*, head.*), as files."""
    import numpy as np
    from safetensors.torch import save_file

    engine = engine_for(dict(protocol(args), baseline="finetune", output_dir=str(folder / "export")))
    engine.setup()
    arrays = {"num_classes": np.array(sum(t.num_classes for t in engine.seq))}
    for t in engine.seq:
        for split in ("train", "test"):
            ds = getattr(t, split).with_format("numpy", columns=["image", "target"])[:]
            arrays[f"{split}_x_{t.id}"] = np.ascontiguousarray(ds["image"], dtype=np.uint8)
            arrays[f"{split}_y_{t.id}"] = np.asarray(ds["target"], dtype=np.int64)
    data = folder / "data.npz"
    np.savez(data, **arrays)
    model = engine.approach.model
    state = {f"backbone.{k}": v.contiguous() for k, v in model.backbone.model.state_dict().items()}
    state.update({f"head.{k}": v.contiguous() for k, v in model.heads.heads[0].state_dict().items()})
    init = folder / "init.safetensors"
    save_file(state, str(init))
    return data, init


def mmcl_child(args) -> None:
    """One mmcl run (in its own process); prints its times, matrix and a checksum of its initial weights."""
    import torch

    torch.set_num_threads(args.threads)
    engine = engine_for(dict(protocol(args), **OWN_OPTIONS.get(args.child, {}), baseline=args.child,
                             output_dir=args.out_dir))
    engine.setup()
    init = sum(float(p.double().sum()) for p in engine.approach.model.parameters())
    engine.setup = lambda: None  # set up above: the checksum is of the weights the run starts from
    matrix = engine.run()
    seconds = engine.seconds
    print(json.dumps({"framework": "mmcl", "strategy": args.child, "train_seconds": seconds["train"],
                      "eval_seconds": seconds["evaluate"], "acc": matrix.acc.tolist(), "init_checksum": init,
                      "threads": torch.get_num_threads()}))


def timed(cmd: list[str], env: dict) -> tuple[dict, float]:
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1]), wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategies", default="finetune,replay,ewc,lwf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--ntasks", type=int, default=5)
    ap.add_argument("--out", default="bench_results")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out_dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return mmcl_child(args)
    if not PEERS_PYTHON.is_file():
        raise SystemExit(f"no Avalanche venv at {PEERS_PYTHON}: run `bash scripts/peers/setup_avalanche.sh` first")
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from mmcl.reporting import write_benchmark

    env = dict(os.environ, HF_HUB_OFFLINE="1", MMCL_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data, init = export(args, Path(tmp))
        init_checksum = sum(float(v.double().sum()) for v in load_file(str(init)).values())
        p = {**protocol(args), **OWN_OPTIONS["replay"], **OWN_OPTIONS["ewc"], **OWN_OPTIONS["lwf"]}
        for name in args.strategies.split(","):
            ours, ours_wall = timed([sys.executable, __file__, "--child", name, "--out_dir", f"{tmp}/{name}",
                                     "--threads", str(args.threads), "--epochs", str(args.epochs),
                                     "--ntasks", str(args.ntasks)], env)
            if abs(ours["init_checksum"] - init_checksum) > 1e-6 * max(1.0, abs(init_checksum)):
                raise SystemExit(f"{name}: mmcl started from other weights than the exported ones")
            theirs, theirs_wall = timed([str(PEERS_PYTHON), str(RUNNER), str(data), str(init), f"{tmp}/{name}.json",
                                         "--strategy", NAMES[name], "--epochs", str(args.epochs),
                                         "--batch_size", str(p["train_batch_size"]), "--lr", str(p["learning_rate"]),
                                         "--memory_size", str(p["memory_size"]), "--ewc_lambda", str(p["lamb"]),
                                         "--lwf_alpha", str(p["lwf_lambda"]), "--lwf_temperature", str(p["temperature"]),
                                         "--threads", str(args.threads), "--eval_batch_size", str(p["eval_batch_size"])],
                                        env)
            acc_ours, acc_theirs = float(np.mean(ours["acc"][-1])), float(np.mean(theirs["acc"][-1]))
            rows.append({"strategy": name, "train_mmcl": sum(ours["train_seconds"]),
                         "train_avalanche": sum(theirs["train_seconds"]), "eval_mmcl": sum(ours["eval_seconds"]),
                         "eval_avalanche": sum(theirs["eval_seconds"]), "wall_mmcl": ours_wall,
                         "wall_avalanche": theirs_wall, "acc_mmcl": acc_ours, "acc_avalanche": acc_theirs,
                         "acc_apart": abs(acc_ours - acc_theirs), "mmcl": ours, "avalanche": theirs})
            r = rows[-1]
            r.update(train_ratio=r["train_mmcl"] / r["train_avalanche"], eval_ratio=r["eval_mmcl"] / r["eval_avalanche"],
                     wall_ratio=r["wall_mmcl"] / r["wall_avalanche"])
            print(f"{name}: train {r['train_mmcl']:.1f} vs {r['train_avalanche']:.1f} s, ACC {acc_ours:.2f} vs "
                  f"{acc_theirs:.2f}", flush=True)
    result = {"protocol": protocol(args), "options": OWN_OPTIONS, "threads": args.threads, "torch": torch.__version__,
              "avalanche": rows[0]["avalanche"].get("version") if rows else None, "rows": rows}
    table = ("| approach | train s mmcl | train s Avalanche | train ratio | eval s mmcl | eval s Avalanche | eval ratio "
             "| run s mmcl | run s Avalanche | run ratio | ACC mmcl | ACC Avalanche |\n"
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    table += "".join(f"| {r['strategy']} | {r['train_mmcl']:.1f} | {r['train_avalanche']:.1f} | {r['train_ratio']:.3f} "
                     f"| {r['eval_mmcl']:.1f} | {r['eval_avalanche']:.1f} | {r['eval_ratio']:.3f} | {r['wall_mmcl']:.1f} "
                     f"| {r['wall_avalanche']:.1f} | {r['wall_ratio']:.3f} | {r['acc_mmcl']:.2f} | "
                     f"{r['acc_avalanche']:.2f} |\n" for r in rows)
    write_benchmark(args.out, "bench_peers", result, table)
    print(table)


if __name__ == "__main__":
    main()
