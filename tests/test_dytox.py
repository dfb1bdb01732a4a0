"""DyTox: task tokens and heads per task, herding memory, distillation weight, CIL/TIL inference."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import synthetic_image_sequence, tiny_config
from mmcl.approaches.dytox import distillation_weight
from mmcl.engine import Engine
from mmcl.memory import herding_order


def dytox_engine(tmp_path, scenario="cil", **kw):
    cfg = tiny_config(tmp_path, baseline="dytox", backbone="convit", scenario=scenario, memory_size=20,
                      save_checkpoints=False, **kw)
    engine = Engine(cfg, sequence=synthetic_image_sequence(num_tasks=3))
    engine.setup()
    return engine


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("finetune_tab", [False, True])
def test_tokens_and_heads_per_task_and_earlier_ones_stay_fixed(tmp_path, finetune_tab):
    engine = dytox_engine(tmp_path, dytox_finetune_tab=finetune_tab)
    approach, m = engine.approach, engine.approach.model
    assert len(m.task_tokens) == len(m.heads) == 3
    engine.train_task(engine.seq[0])
    assert approach.tasks_seen == 1
    before = snapshot(m)
    finetuned = {}
    original = approach.balanced_finetune

    def watched(task):  # what the balanced fine-tuning phase alone changes
        start = snapshot(m)
        original(task)
        finetuned.update({n: not torch.equal(p, start[n]) for n, p in m.named_parameters()})

    approach.balanced_finetune = watched
    engine.train_task(engine.seq[1])
    after = snapshot(m)
    assert approach.tasks_seen == 2
    for prefix in ("task_tokens.0", "heads.0."):  # task 0's token and head: untouched by task 1 and its fine-tuning
        names = [n for n in before if n.startswith(prefix)]
        assert names and all(torch.equal(before[n], after[n]) for n in names), prefix
    assert not torch.equal(before["task_tokens.1"], after["task_tokens.1"])  # the new token did learn
    changed = {n for n, c in finetuned.items() if c}
    allowed = ("task_tokens.1", "heads.1.") + (("tab.",) if finetune_tab else ())
    assert changed and all(n.startswith(allowed) for n in changed), changed
    assert any(n.startswith("tab.") for n in changed) == finetune_tab


def test_balanced_finetune_steps_on_the_global_batch(tmp_path):
    """k processes each run the whole fine-tuning on k x the batch: the same steps as one process."""
    engine = dytox_engine(tmp_path, train_batch_size=4, dytox_finetune_epochs=1)
    approach = engine.approach
    engine.train_task(engine.seq[0])
    approach.before_task(engine.seq[1])
    sizes = []
    collate = approach.batch_from_rows
    approach.batch_from_rows = lambda rows: sizes.append(len(rows)) or collate(rows)

    real = approach._accelerator

    class TwoProcesses:  # the world size the approach reads; everything else is the real accelerator's
        num_processes, process_index = 2, 1

        def __getattr__(self, name):
            return getattr(real, name)

    approach._accelerator = TwoProcesses()
    assert approach.world == (2, 1)
    approach.balanced_finetune(engine.seq[1])
    assert len(approach.memory) == 20
    assert sizes == [8, 8, 4]  # every memory row once in the epoch, in batches of 2 processes x 4


def test_herding_picks_the_example_closest_to_the_running_mean():
    torch.manual_seed(0)
    x = torch.randn(40, 6)
    order = herding_order(x, 10)
    assert len(order) == len(set(order)) == 10
    xn = F.normalize(x, dim=1)
    target, total = xn.mean(0), torch.zeros(6)
    for i, j in enumerate(order):  # brute force: each pick minimises the distance of the running mean
        dist = [((total + xn[c]) / (i + 1) - target).norm().item() if c not in order[:i] else np.inf
                for c in range(40)]
        assert j == int(np.argmin(dist))
        total += xn[j]
    # the herded prefix tracks the class mean better than random picks of the same size
    herded = (xn[order].mean(0) - target).norm()
    random = np.mean([(xn[torch.randperm(40)[:10]].mean(0) - target).norm().item() for _ in range(50)])
    assert herded < random


def test_memory_keeps_its_size_and_class_balance(tmp_path):
    engine = dytox_engine(tmp_path)
    approach = engine.approach
    for task in engine.seq:
        engine.train_task(task)
        counts = approach.memory.class_counts()
        assert len(approach.memory) <= 20
        assert sorted(counts) == list(range(2 * (task.id + 1)))
        assert max(counts.values()) - min(counts.values()) <= 1


def test_distillation_weight_is_old_over_seen_classes(tmp_path):
    assert [distillation_weight(2 * t, 2 * (t + 1)) for t in (1, 2, 3, 4)] == [1 / 2, 2 / 3, 3 / 4, 4 / 5]
    engine = dytox_engine(tmp_path, dytox_div_weight=0.0)
    approach, m = engine.approach, engine.approach.model
    engine.train_task(engine.seq[0])
    task = engine.seq[1]
    approach.before_task(task)  # the old model is now a copy of the model: KD is exactly 0
    batch = next(iter(engine.loader(approach.train_dataset(task), 16, shuffle=False)))
    m.eval()  # no dropout either way; same numbers as the copy
    loss = approach.training_step(batch, task)
    logits = m.logits(m.embeddings(batch, [0, 1])).float()
    bce = F.binary_cross_entropy_with_logits(logits, F.one_hot(batch["labels"], 4).float())
    torch.testing.assert_close(loss, (1 - 2 / 4) * bce, rtol=1e-5, atol=1e-6)


def test_distillation_is_the_elementwise_mean_kl_on_old_classes_and_new_tokens_start_fresh(tmp_path):
    engine = dytox_engine(tmp_path, dytox_div_weight=0.0)
    approach, m = engine.approach, engine.approach.model
    engine.train_task(engine.seq[0])
    task = engine.seq[1]
    approach.before_task(task)
    assert not torch.equal(m.task_tokens[1], m.task_tokens[0])  # its own initialisation, not a copy
    old = approach._old[0]
    with torch.no_grad():  # move the old model away from the new one: KD is no longer 0
        for p in old.heads[0].parameters():
            p.add_(0.5 * torch.randn_like(p))
    batch = next(iter(engine.loader(approach.train_dataset(task), 16, shuffle=False)))
    m.eval()
    loss = approach.training_step(batch, task)
    logits = m.logits(m.embeddings(batch, [0, 1])).float()
    bce = F.binary_cross_entropy_with_logits(logits, F.one_hot(batch["labels"], 4).float())
    p_old = F.softmax(old.logits(old.embeddings(batch, [0])).float(), -1)
    log_q = F.log_softmax(logits[:, :2], -1)
    kd = (p_old * (p_old.log() - log_q)).sum(-1).mean() / 2  # per-example KL over 2 old classes
    assert kd > 1e-3
    torch.testing.assert_close(loss, (1 - 2 / 4) * bce + 2 / 4 * kd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scenario", ["cil", "til"])
def test_inference_shapes_follow_classes_and_tasks(tmp_path, scenario):
    engine = dytox_engine(tmp_path, scenario=scenario)
    approach = engine.approach
    engine.train_task(engine.seq[0])
    engine.train_task(engine.seq[1])
    batch = next(iter(engine.loader(engine.seq[0].test, 8, shuffle=False)))
    approach.eval()
    if scenario == "cil":
        logits = approach.predict(batch, None)
        assert logits.shape == (8, 6)  # all classes of the sequence
        assert torch.isinf(logits[:, 4:]).all() and torch.isfinite(logits[:, :4]).all()  # unseen task 2
    else:
        for u in range(3):
            assert approach.predict(batch, u).shape == (8, engine.seq[u].num_classes)
    matrix_row = engine.evaluate_all()[0]
    assert len(matrix_row) == 3


def test_dytox_needs_convit(tmp_path):
    cfg = tiny_config(tmp_path, baseline="dytox", backbone="vit", scenario="cil")
    with pytest.raises(ValueError, match="--backbone convit"):
        Engine(cfg, sequence=synthetic_image_sequence()).setup()
