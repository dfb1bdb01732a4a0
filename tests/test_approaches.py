"""Each approach on two tiny tasks, checking the invariant that defines it."""
import numpy as np
import pytest
import torch

from conftest import synthetic_image_sequence, tiny_config
from mmcl.engine import Engine
from mmcl.memory import Memory


def built(tmp_path, baseline, scenario="til", **kw):
    engine = Engine(tiny_config(tmp_path, baseline=baseline, scenario=scenario, **kw),
                    sequence=synthetic_image_sequence())
    engine.setup()
    return engine


def first_batch(engine, task_id=0, split="train"):
    return next(iter(engine.loader(getattr(engine.seq[task_id], split), 16, shuffle=False)))


def test_ewc_penalty_zero_at_anchor_and_quadratic_away(tmp_path):
    engine = built(tmp_path, "ewc", lamb=10.0)
    ewc = engine.approach
    engine.train_task(engine.seq[0])
    names = list(ewc.fisher.keys())
    assert any(ewc.fisher[n].abs().sum() > 0 for n in names), "Fisher stayed zero after a task"
    assert all((ewc.fisher[n] >= 0).all() for n in names)
    assert ewc.penalty().item() == pytest.approx(0.0, abs=1e-10)
    delta = 0.01
    expected = 0.0
    with torch.no_grad():
        for name, p in ewc.model.named_parameters():
            if name in ewc.fisher.keys():
                p.add_(delta)
                expected += 0.5 * 10.0 * float((ewc.fisher[name] * delta**2).sum())
    assert ewc.penalty().item() == pytest.approx(expected, rel=1e-4)
    with torch.no_grad():
        for name, p in ewc.model.named_parameters():
            if name in ewc.fisher.keys():
                p.add_(delta)  # twice as far: four times the penalty
    assert ewc.penalty().item() == pytest.approx(4 * expected, rel=1e-4)


def test_ewc_fisher_running_mean_merge(tmp_path):
    engine = built(tmp_path, "ewc")
    ewc = engine.approach
    engine.train_task(engine.seq[0])
    f0 = {n: ewc.fisher[n].clone() for n in ewc.fisher.keys()}
    engine.train_task(engine.seq[1])
    # recompute task 1's Fisher at the final weights, then check (F1 + 1 * F0) / 2
    f1 = ewc.fisher_diagonal(engine.loader(engine.seq[1].train, 16, shuffle=False))
    for n in f0:
        torch.testing.assert_close(ewc.fisher[n], (f1[n] + f0[n]) / 2, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("scenario", ["til", "cil", "dil"])
def test_lwf_loss_is_zero_when_model_equals_old(tmp_path, scenario):
    # as a KL (the paper's cross-entropy differs from it by the old outputs' entropy, a constant)
    engine = built(tmp_path, "lwf", scenario=scenario, lwf_distill="kl_mean_t2")
    lwf = engine.approach
    engine.train_task(engine.seq[0])
    lwf.before_task(engine.seq[1])
    batch = first_batch(engine, 1)
    lwf.eval()  # no dropout: the old and new model must give identical outputs
    features = lwf.model.features(batch)
    assert lwf.distillation_loss(batch, engine.seq[1], features).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for p in lwf.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    features = lwf.model.features(batch)
    assert lwf.distillation_loss(batch, engine.seq[1], features).item() > 1e-4


def test_reservoir_memory_bound_and_uniformity():
    mem = Memory(50, "reservoir", seed=0)
    for t in range(4):
        mem.add_task(t, [t] * 500)
        assert len(mem) == 50
    counts = mem.class_counts()
    # a uniform sample over 2000 examples: about 12.5 per task, never zero with this seed and size
    assert sum(counts.values()) == 50 and min(counts.values()) >= 5


def test_class_balanced_memory_balance():
    mem = Memory(30, "class_balanced", seed=0)
    mem.add_task(0, [0] * 100 + [1] * 100)
    assert mem.class_counts() == {0: 15, 1: 15}
    mem.add_task(1, [2] * 100 + [3] * 4)  # class 3 is rare: it keeps all it has, others share the rest
    counts = mem.class_counts()
    assert len(mem) == 30 and counts[3] == 4
    assert max(counts[c] for c in (0, 1, 2)) - min(counts[c] for c in (0, 1, 2)) <= 1
    state = mem.state_dict()
    copy = Memory(1)
    copy.load_state_dict(state)
    assert copy.items == mem.items


def test_replay_trains_on_memory_of_old_tasks(tmp_path):
    engine = built(tmp_path, "replay", scenario="cil", memory_size=20, buffer="class_balanced")
    replay = engine.approach
    engine.train_task(engine.seq[0])
    assert len(replay.memory) == 20 and replay.memory.class_counts() == {0: 10, 1: 10}
    replay.before_task(engine.seq[1])
    (mb,) = replay.memory_batches(8)  # one modality: one batch
    assert mb["task_ids"].tolist() == [0] * 8
    assert set(mb["labels"].tolist()) <= {0, 1}


def test_joint_trains_on_all_seen_data(tmp_path):
    engine = built(tmp_path, "joint")
    joint = engine.approach
    ds = joint.train_dataset(engine.seq[1])
    assert len(ds) == len(engine.seq[0].train) + len(engine.seq[1].train)
    assert sorted(set(ds["task_id"])) == [0, 1]
    assert len(joint.train_dataset(engine.seq[0])) == len(engine.seq[0].train)


def test_one_keeps_independent_weights_per_task(tmp_path):
    engine = built(tmp_path, "one")
    one = engine.approach
    engine.train_task(engine.seq[0])
    batch = first_batch(engine, 0, "test")
    one.eval()
    before = one.predict(batch, 0).clone()
    engine.train_task(engine.seq[1])
    one.eval()
    torch.testing.assert_close(one.predict(batch, 0), before)
    w0 = dict(one.per_task[0].items())
    w1 = dict(one.per_task[1].items())
    name = next(n for n in w0 if "blocks" in n)
    assert not torch.equal(w0[name], w1[name])


def test_one_rejects_scenarios_without_task_id(tmp_path):
    with pytest.raises(ValueError, match="one"):
        built(tmp_path, "one", scenario="cil")


def test_finetune_learns_toy_tasks_and_writes_run_dir(tmp_path):
    engine = Engine(tiny_config(tmp_path, baseline="finetune", scenario="til", run_name="ft"),
                    sequence=synthetic_image_sequence())
    matrix = engine.run()
    run = tmp_path / "runs" / "ft"
    for f in ("config.yaml", "metrics.json", "results.md", "accuracy_matrix.png", "log.jsonl",
              "checkpoints/task_0/model.safetensors", "checkpoints/task_1/state.json"):
        assert (run / f).is_file(), f
    assert matrix.rows_done == 2
    assert matrix.acc[0, 0] > 80 and matrix.acc[1, 1] > 80


def test_cil_head_predicts_only_seen_classes(tmp_path):
    engine = built(tmp_path, "finetune", scenario="cil")
    engine.train_task(engine.seq[0])
    logits = engine.approach.predict(first_batch(engine, 1, "test"), None)
    assert logits.shape[1] == 4
    assert torch.isinf(logits[:, 2:]).all() and logits.argmax(-1).max() <= 1


def test_head_lr_gives_heads_their_own_learning_rate(tmp_path):
    from mmcl.optim import make_optimizer

    engine = built(tmp_path, "finetune", learning_rate=1e-4, head_lr=1e-2)
    approach = engine.approach
    opt = make_optimizer(engine.cfg, approach.parameter_groups())
    heads = {id(p) for p in approach.model.heads.parameters()}
    assert len(opt.param_groups) == 2
    encoder, head = opt.param_groups
    assert encoder["lr"] == pytest.approx(1e-4) and head["lr"] == pytest.approx(1e-2)
    assert {id(p) for p in head["params"]} == heads and not heads & {id(p) for p in encoder["params"]}
    trainable = [p for p in approach.parameters_to_train() if p.requires_grad]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)
    # one step with equal gradients moves the heads 100x further than the encoder (AdamW: step ~ lr)
    before = {id(p): p.detach().clone() for p in trainable}
    for p in trainable:
        p.grad = torch.ones_like(p)
    opt.step()
    moved = {id(p): (p.detach() - before[id(p)]).abs().max().item() for p in trainable}
    assert max(moved[i] for i in heads) == pytest.approx(1e-2, rel=1e-3)
    assert max(v for i, v in moved.items() if i not in heads) == pytest.approx(1e-4, rel=1e-3)


def test_head_lr_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="--head_lr"):
        tiny_config(tmp_path, baseline="finetune", head_lr=0.0).validate()
