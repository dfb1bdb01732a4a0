"""Tiny runs for tests/test_distributed.py, launched with `accelerate launch` (or plain python).

    distributed_runs.py OUT PER_PROCESS_BATCH APPROACH[,APPROACH...]

Writes, from the main process, per approach:
  OUT/<approach>.json   accuracy matrix (points and counts of correct test examples), processes, examples
                        evaluated, test sizes, the approach's extra state (replay/DyTox memories, HAT's
                        binarized units), the final test predictions with their top-2 logit margins, and the
                        names of the weight snapshots:
  OUT/<approach>.<snapshot>.safetensors   the approach's weights (every tensor of its state dict)
                        `task<t>_step<EARLY_STEPS>`, after the first EARLY_STEPS optimiser steps of task t,
                        and `after_task<t>`, after task t (its after_task hook included; the last one is final)
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from mmcl.cli import _shutdown  # noqa: E402
from mmcl.flags import build_config  # noqa: E402
from mmcl.engine import Engine  # noqa: E402


# SGD with momentum, not AdamW: Adam divides each gradient by its own running scale, so a gradient that is
# zero in exact arithmetic (an attention key bias: softmax ignores a constant added to every score; the old
# heads under LwF's distillation at the first step of a task, where new and old model coincide) becomes a
# step of +-lr whose sign is rounding noise. Those steps differ between 1 and 2 processes (and between CPUs):
# under AdamW the weights differed by up to 2e-2 and an LwF test prediction flipped. With SGD rounding noise
# stays rounding noise. lr 0.02, not 0.03: at 0.03 the second task amplified it in some runs (finetune's
# weights 6e-2 apart, 3 test examples); at 0.02 it did not, but for joint's longer second task once (2e-3).
IMAGE = dict(task="split_digits", max_train_per_task=128, backbone="vit", vit_embed_dim=32, vit_depth=1, vit_heads=2,
             patch_size=4, optimizer="sgd", momentum=0.9, learning_rate=0.02, num_train_epochs=16, memory_size=40,
             eval_batch_size=5)  # 72 test examples in 15 batches: the distributed sampler pads one process
# DyTox keeps its AdamW settings: its training amplifies rounding noise with either optimiser (with SGD its
# task-0 weights ended up 1e-2 to 8e-2 apart in 2 of 3 runs). memory_size 32: the task-1 training set is then
# 128 + 32 = 10 global batches of 16; with 40 (168 examples) the last batch is uneven and `accelerate` pads
# the second process with 8 repeated examples, so two processes would train on other data than one does.
# vit_depth 2: the depth counts the TAB (the reference's rule), so one SAB + the TAB, the model these
# tolerances were set on (depth 1 would leave no SAB). 5 fine-tuning epochs, not 20: the check is about
# processes (accuracies in whole examples, the memory), and 20 only cost time.
DYTOX = dict(IMAGE, backbone="convit", vit_depth=2, optimizer="adamw", momentum=0.0, learning_rate=5e-3,
             dytox_finetune_epochs=5, num_train_epochs=4, memory_size=32)
# bert_dropout 0: dropout draws its masks per process from the same seed, so two processes of 8 would not
# drop what one process of 16 drops
TEXT = dict(task="vader4", max_train_per_task=64, backbone="bert_adapter", bert_adapter_size=16, max_seq_length=32,
            num_train_epochs=2, learning_rate=5e-3, bert_dropout=0.0, memory_size=40)
TEXT_ONLY = ("hat", "ctr")
# These runs check that k processes equal one, on a model that learns both tasks at this tiny scale. CTR's
# paper default (the KSM at the full rate, randomly initialised up-projection) stays at chance on task 1 here
# (253 / 500 at lr 5e-3), so CTR runs with the ctr_cpu preset's values; HAT with hat_exact's (binary gates,
# frozen LayerNorms), the settings the tolerances in test_distributed.py were measured with.
EXACT = dict(hat_binarize=True, hat_train_layernorm=False)
OVERRIDES = {"hat": EXACT, "ctr": dict(ctr_ksm_lr_scale=0.1, ctr_zero_up=True, **EXACT)}
EARLY_STEPS = 4  # a snapshot this many steps into each task: before rounding noise has had time to grow


def counts(acc, sizes) -> list[list[int]]:
    """Accuracy points back to correct examples: entry [t][u] of a task with n test examples is k * 100 / n."""
    return [[round(a * n / 100) for a, n in zip(row, sizes)] for row in acc]


def state_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the state dict once (tied ones are stored under their first name), contiguous on the CPU."""
    out, seen = {}, set()
    for name, t in module.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().cpu().contiguous().clone()
    return out


@torch.no_grad()
def final_predictions(engine: Engine) -> dict[str, list]:
    """The trained model's test predictions and top-2 logit margins per task, one process, all examples in order.

    Only for diagnosis (how close to a tie the predictions that differ between runs were): the engine's own
    evaluation, which the accuracies come from, batches and shards differently."""
    from torch.utils.data import DataLoader

    approach = engine.accelerator.unwrap_model(engine.approach)
    approach.eval()
    preds, margins = [], []
    for task in engine.seq:
        p, m = [], []
        for batch in DataLoader(task.test, batch_size=engine.cfg.eval_batch_size, collate_fn=engine.collate):
            batch = {k: v.to(engine.accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            logits = approach.predict(batch, task.id if engine.scenario.task_id_at_test else None).float()
            top = logits.topk(2, dim=-1).values
            p += logits.argmax(-1).tolist()
            m += (top[:, 0] - top[:, 1]).tolist()
        preds.append(p)
        margins.append(m)
    approach.train()
    return {"predictions": preds, "margins": margins}


class Recording(Engine):
    """The engine, saving weight snapshots (main process) into OUT/<run_name>.<snapshot>.safetensors."""

    def __init__(self, *args, out: Path, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.out, self.snapshots = out, []

    def snapshot(self, name: str) -> None:
        from safetensors.torch import save_file

        if self.is_main:
            save_file(state_tensors(self.accelerator.unwrap_model(self.approach)),
                      str(self.out / f"{self.cfg.run_name}.{name}.safetensors"))
        self.snapshots.append(name)

    def setup(self) -> None:
        super().setup()
        approach, state = self.approach, {"task": None, "steps": 0}
        before_task, after_step = approach.before_task, approach.after_optimizer_step

        def counting_before_task(task) -> None:
            if state["task"] is not None:
                self.snapshot(f"after_task{state['task']}")
            state.update(task=task.id, steps=0)
            before_task(task)

        def counting_after_step() -> None:
            after_step()
            state["steps"] += 1
            if state["steps"] == EARLY_STEPS:
                self.snapshot(f"task{state['task']}_step{EARLY_STEPS}")

        # on the instance: the engine looks both hooks up on the approach when it starts a task
        approach.before_task, approach.after_optimizer_step = counting_before_task, counting_after_step

    def run(self):
        matrix = super().run()
        self.snapshot(f"after_task{len(self.seq) - 1}")
        return matrix


def main() -> None:
    out, batch, approaches = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
    engine = None
    for approach in approaches:
        values = dict(TEXT if approach in TEXT_ONLY else DYTOX if approach == "dytox" else IMAGE, ntasks=2,
                      baseline=approach, scenario="til", train_batch_size=batch, lamb=100.0, progress=False,
                      save_checkpoints=False, output_dir=str(out / "runs"), run_name=approach, overwrite=True,
                      **OVERRIDES.get(approach, {}))
        engine = Recording(build_config(values), accelerator=engine.accelerator if engine else None, out=out)
        matrix = engine.run()
        if engine.is_main:
            sizes = [len(t.test) for t in engine.seq]
            (out / f"{approach}.json").write_text(json.dumps(
                {"acc": matrix.acc.tolist(), "correct": counts(matrix.acc.tolist(), sizes),
                 "processes": engine.accelerator.num_processes,
                 "evaluated": [engine.eval_counts[(t.id, "test")] for t in engine.seq], "test_sizes": sizes,
                 "extra_state": engine.accelerator.unwrap_model(engine.approach).extra_state(),
                 "snapshots": engine.snapshots, **final_predictions(engine)}))
        engine.accelerator.wait_for_everyone()
    _shutdown(engine.accelerator)


if __name__ == "__main__":
    main()
