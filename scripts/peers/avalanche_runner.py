"""The Avalanche 0.6 side of the mmcl-vs-Avalanche speed benchmark (run with the peers venv's python).

    bash scripts/peers/setup_avalanche.sh          # prints the peers venv's python
    bench_results/.peers-venv/bin/python scripts/peers/avalanche_runner.py DATA.npz INIT.safetensors OUT.json \
        --strategy naive|replay|ewc|lwf --epochs 2 --batch_size 32 --lr 2e-4 --memory_size 500 \
        --ewc_lambda 5000 --lwf_alpha 1.0 --lwf_temperature 2.0 --threads 1 --eval_batch_size 128

DATA.npz: train_x_{t} (N, 28, 28) uint8, train_y_{t} (N,) int64 global labels, test_x_{t}, test_y_{t} for
t = 0..T-1, and num_classes. INIT.safetensors: backbone.* (the timm ViT's state dict) and head.* (the linear
head). Class-incremental: one experience per task, task label 0 everywhere, one shared head.

Everything is used the way a plain Avalanche user would: tensor classification datasets + the generic
`benchmark_from_datasets` generator, the stock Naive/Replay/EWC/LwF strategies with their default plugins
and data loaders, `strategy.train(experience)` per task and `strategy.eval(test_stream)` after it, with an
EvaluationPlugin holding only the per-experience accuracy metric and no logger. Both calls are timed with
time.perf_counter. OUT.json gets the per-task seconds and the accuracy matrix R[t][u] (percent, test
experience u after training task t); the same JSON is also the last line printed on stdout.

Avalanche 0.6's ReplayPlugin calls its own deprecated `storage_policy.update`, whose decorator re-enables
DeprecationWarnings itself (warnings.simplefilter("once")), so a replay run prints that warning on stderr;
it is harmless and cannot be silenced with a filter here.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

os.environ.setdefault("WANDB_MODE", "disabled")  # avalanche imports wandb; nothing here uses it

import numpy as np
import torch
from torch import nn


def build_model(num_classes: int) -> nn.Module:
    import timm

    class ViTClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = timm.create_model(
                "vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=4, in_chans=1, num_classes=0,
                global_pool="token", proj_drop_rate=0.0, embed_dim=192, depth=4, num_heads=3)
            self.head = nn.Linear(192, num_classes)

        def forward(self, x):
            return self.head(self.backbone(x))

    return ViTClassifier()


def load_arrays(path: str):
    """The npz as float tensors, converted once up front exactly as mmcl does: uint8 / 127.5 - 1."""
    with np.load(path) as z:
        num_classes = int(z["num_classes"])
        ntasks = len([k for k in z.files if k.startswith("train_x_")])
        tasks = []
        for t in range(ntasks):
            item = {}
            for split in ("train", "test"):
                x = torch.from_numpy(np.ascontiguousarray(z[f"{split}_x_{t}"]))
                y = torch.from_numpy(np.ascontiguousarray(z[f"{split}_y_{t}"])).long()
                item[split] = (x.float().div_(127.5).sub_(1.0).unsqueeze(1), y)  # (N, 1, 28, 28) in [-1, 1]
            tasks.append(item)
    return tasks, num_classes


def build_benchmark(tasks):
    """One train and one test experience per task, task label 0, via Avalanche 0.6's generic generator."""
    from avalanche.benchmarks.scenarios import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.utils import (
        _make_taskaware_tensor_classification_dataset as tensor_dataset,
    )

    def stream(split):
        return [tensor_dataset(x, y, targets=y, task_labels=0) for x, y in (t[split] for t in tasks)]

    return with_classes_timeline(benchmark_from_datasets(train=stream("train"), test=stream("test")))


def build_strategy(args, model, device):
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import EWC, LwF, Naive, Replay
    from avalanche.training.plugins import EvaluationPlugin

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No loggers specified")
        evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
    common = {"criterion": nn.CrossEntropyLoss(), "train_mb_size": args.batch_size, "train_epochs": args.epochs,
              "eval_mb_size": args.eval_batch_size, "device": device, "evaluator": evaluator, "eval_every": -1}
    if args.strategy == "naive":
        return Naive(model=model, optimizer=optimizer, **common)
    if args.strategy == "replay":
        return Replay(model=model, optimizer=optimizer, mem_size=args.memory_size, **common)
    if args.strategy == "ewc":
        return EWC(model=model, optimizer=optimizer, ewc_lambda=args.ewc_lambda, mode="separate", **common)
    if args.strategy == "lwf":
        return LwF(model=model, optimizer=optimizer, alpha=args.lwf_alpha, temperature=args.lwf_temperature,
                   **common)
    raise ValueError(args.strategy)


def accuracy_row(metrics: dict, ntasks: int) -> list[float]:
    """Per-test-experience accuracies (percent) from the dict `strategy.eval` returns."""
    row = []
    for u in range(ntasks):
        keys = [k for k in metrics if k.startswith("Top1_Acc_Exp/eval_phase/test_stream/") and k.endswith(f"/Exp{u:03d}")]
        if len(keys) != 1:
            raise RuntimeError(f"no unique accuracy for test experience {u}: {sorted(metrics)}")
        row.append(100.0 * float(metrics[keys[0]]))
    return row


@torch.no_grad()
def plain_accuracy(model, tasks, batch_size) -> list[float]:
    """Independent check of the accuracies (untimed, only with --verify)."""
    was_training = model.training
    model.eval()
    row = []
    for t in tasks:
        x, y = t["test"]
        pred = torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
        row.append(100.0 * float((pred == y).float().mean()))
    model.train(was_training)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("init")
    ap.add_argument("out")
    ap.add_argument("--strategy", required=True, choices=["naive", "replay", "ewc", "lwf"])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--memory_size", type=int, default=500)
    ap.add_argument("--ewc_lambda", type=float, default=5000.0)
    ap.add_argument("--lwf_alpha", type=float, default=1.0)
    ap.add_argument("--lwf_temperature", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval_batch_size", type=int, default=128)
    ap.add_argument("--verify", action="store_true",
                    help="also recompute each accuracy row with a plain loop (untimed) and check it matches")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    import avalanche
    from avalanche.training.determinism.rng_manager import RNGManager
    from safetensors.torch import load_file

    RNGManager.set_random_seeds(0)  # python random, numpy and torch, as Avalanche seeds itself
    device = torch.device("cpu")

    tasks, num_classes = load_arrays(args.data)
    benchmark = build_benchmark(tasks)
    model = build_model(num_classes)
    model.load_state_dict(load_file(args.init), strict=True)
    strategy = build_strategy(args, model, device)

    ntasks = len(tasks)
    train_seconds, eval_seconds, acc = [], [], []
    for t, experience in enumerate(benchmark.train_stream):
        start = time.perf_counter()
        strategy.train(experience)
        train_seconds.append(time.perf_counter() - start)
        start = time.perf_counter()
        metrics = strategy.eval(benchmark.test_stream)
        eval_seconds.append(time.perf_counter() - start)
        acc.append(accuracy_row(metrics, ntasks))
        if args.verify:
            check = plain_accuracy(model, tasks, args.eval_batch_size)
            if not np.allclose(check, acc[-1], atol=1e-6):
                raise SystemExit(f"accuracy mismatch after task {t}: avalanche {acc[-1]} vs plain {check}")
        print(f"task {t}: train {train_seconds[-1]:.2f} s, eval {eval_seconds[-1]:.2f} s, "
              f"acc {[round(a, 2) for a in acc[-1]]}", file=sys.stderr, flush=True)

    result = {"framework": "avalanche", "version": avalanche.__version__, "strategy": args.strategy,
              "train_seconds": train_seconds, "eval_seconds": eval_seconds, "acc": acc,
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
