"""Tiny runs for tests/test_distributed.py, launched with `accelerate launch` (or plain python).

    distributed_runs.py OUT PER_PROCESS_BATCH APPROACH[,APPROACH...]

Writes OUT/<approach>.json (accuracy matrix, processes) from the main process.
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmcl.cli import _shutdown  # noqa: E402
from mmcl.config import build_config  # noqa: E402
from mmcl.engine import Engine  # noqa: E402


IMAGE = dict(task="split_digits", max_train_per_task=128, backbone="vit", vit_embed_dim=32, vit_depth=1, vit_heads=2,
             patch_size=4, num_train_epochs=4, learning_rate=5e-3,
             eval_batch_size=5)  # 72 test examples in 15 batches: the distributed sampler pads one process
TEXT = dict(task="vader4", max_train_per_task=64, backbone="bert_adapter", bert_adapter_size=16, max_seq_length=32,
            num_train_epochs=2, learning_rate=5e-3)
TEXT_ONLY = ("hat", "ctr")


def main() -> None:
    out, batch, approaches = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
    engine = None
    for approach in approaches:
        values = dict(TEXT if approach in TEXT_ONLY else IMAGE, ntasks=2, baseline=approach, scenario="til",
                      **({"backbone": "convit"} if approach == "dytox" else {}),
                      train_batch_size=batch, memory_size=40, lamb=100.0, progress=False, save_checkpoints=False,
                      output_dir=str(out / "runs"), run_name=approach, overwrite=True)
        engine = Engine(build_config(values), accelerator=engine.accelerator if engine else None)
        matrix = engine.run()
        if engine.is_main:
            (out / f"{approach}.json").write_text(json.dumps(
                {"acc": matrix.acc.tolist(), "processes": engine.accelerator.num_processes,
                 "evaluated": [engine.eval_counts[(t.id, "test")] for t in engine.seq],
                 "test_sizes": [len(t.test) for t in engine.seq]}))
    _shutdown(engine.accelerator)


if __name__ == "__main__":
    main()
