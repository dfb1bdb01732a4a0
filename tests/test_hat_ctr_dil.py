"""HAT and CTR domain-incrementally (`--scenario dil`): one shared head, no task id at test time, and
`--hat_dil_mask` choosing whose gates a prediction applies (last | confident | union). TIL is covered,
unchanged, by test_hat_ctr.py."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import tiny_config, toy_text_sequence
from mmcl.approaches.hat import HatGate, HatOptions
from mmcl.cli import main
from mmcl.engine import Engine


def dil_config(tmp_path, baseline: str, **overrides):
    values = dict(task="toytext", backbone="bert_adapter", baseline=baseline, scenario="dil", bert_adapter_size=8,
                  max_seq_length=32, num_train_epochs=2, learning_rate=5e-3, train_batch_size=16, run_name="r")
    values.update(overrides)
    return tiny_config(tmp_path, **values)


def dil_run(tmp_path, baseline: str, **overrides) -> tuple[Engine, object]:
    engine = Engine(dil_config(tmp_path, baseline, **overrides), sequence=toy_text_sequence())
    return engine, engine.run()


@pytest.fixture(scope="module")
def hat_dil(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hat_dil")
    engine, matrix = dil_run(tmp, "hat")
    return dict(engine=engine, matrix=matrix, tmp=tmp)


@pytest.fixture(scope="module")
def ctr_dil(tmp_path_factory):
    engine, matrix = dil_run(tmp_path_factory.mktemp("ctr_dil"), "ctr", num_train_epochs=1, save_checkpoints=False)
    return dict(engine=engine, matrix=matrix)


@pytest.fixture(params=["hat", "ctr"])
def run_of(request, hat_dil, ctr_dil):
    return {"hat": hat_dil, "ctr": ctr_dil}[request.param]


def mixed_rows(engine, per_task: int = 6) -> list[dict]:
    """Test rows of both tasks (of varied lengths): a DIL learner is not told which domain a row is from."""
    return [engine.seq[u].test[int(i)] for u in (0, 1)
            for i in torch.linspace(0, len(engine.seq[u].test) - 1, per_task).long()]


def mixed_batch(engine, per_task: int = 6) -> dict:
    return engine.approach.batch_from_rows(mixed_rows(engine, per_task))


@pytest.fixture
def dil_rule(run_of):
    """Set --hat_dil_mask on the trained approach for one test (the rule acts only at prediction time)."""
    approach = run_of["engine"].approach
    before = approach.opts.hat_dil_mask

    def use(rule: str):
        approach.opts.hat_dil_mask = rule
        approach.eval()  # no dropout: predictions are compared exactly
        return approach

    yield use
    approach.opts.hat_dil_mask = before
    approach.train()


def test_hat_and_ctr_run_domain_incrementally_on_one_shared_head(run_of):
    engine, matrix = run_of["engine"], run_of["matrix"]
    approach = engine.approach
    assert engine.scenario.name == "dil" and approach.opts.hat_dil_mask == "last"  # the default
    heads = approach.model.heads
    assert not heads.per_task and len(heads.heads) == 1 and heads.heads[0].out_features == 2
    assert matrix.acc.shape == (2, 2) and np.isfinite(matrix.acc).all()
    assert matrix.acc[0, 0] >= 75 and matrix.acc[1, 1] >= 60  # it learns on the shared head
    assert approach.learned_tasks == [0, 1]
    if engine.cfg.save_checkpoints:
        metrics = json.loads((engine.run_dir / "metrics.json").read_text())
        assert metrics["meta"]["scenario"] == "dil" and len(metrics["matrix"]["acc"]) == 2
        assert metrics["summary"]["acc_final"] == pytest.approx(matrix.acc[1].mean())


def test_last_applies_exactly_the_latest_tasks_gates(run_of, dil_rule):
    approach = dil_rule("last")
    batch = mixed_batch(run_of["engine"])
    out = approach.predict(batch, None)
    # the TIL path's gates of task 1 on the same shared head, and not task 0's: the check can fail
    assert torch.equal(out, approach.predict(batch, 1))
    assert not torch.equal(out, approach.predict(batch, 0))
    approach.predict(batch, None)
    assert approach.ctx.task == 1 and approach.ctx.union is None and approach.ctx.s == approach.opts.smax


def test_confident_takes_per_example_the_task_with_the_lowest_entropy(run_of, dil_rule):
    approach = dil_rule("confident")
    rows = mixed_rows(run_of["engine"])
    batch = approach.batch_from_rows(rows)
    per_task = torch.stack([approach.predict(batch, t) for t in (0, 1)]).float()  # (tasks, B, classes)
    logp = per_task.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    expected = entropy.argmin(0)
    clear = [i for i in range(len(rows)) if abs(entropy[0, i] - entropy[1, i]) > 1e-3]  # no near-ties
    out = approach.predict(batch, None)
    choice = approach.last_dil_choice.cpu()
    assert torch.equal(choice[clear], expected[clear].cpu())
    # both tasks win somewhere, so a rule that took one task for the whole batch (last, or PyContinual's
    # per-batch entropy) would fail here
    assert set(expected[clear].tolist()) == {0, 1}, f"the toy run did not separate the tasks: {entropy}"
    torch.testing.assert_close(out.float(), per_task[choice, torch.arange(len(rows))], rtol=0, atol=0)
    # and each example's choice is its own: alone (no batchmates, no padding) it gets the same task and logits
    for i in clear[:: max(1, len(clear) // 3)]:
        alone = approach.predict(approach.batch_from_rows([rows[i]]), None)
        assert approach.last_dil_choice.item() == expected[i].item()
        torch.testing.assert_close(alone.float(), out[i:i + 1].float(), rtol=1e-5, atol=1e-5)


def test_union_applies_hats_cumulative_mask(run_of, dil_rule):
    approach = dil_rule("union")
    batch = mixed_batch(run_of["engine"])
    seen: dict[str, torch.Tensor] = {}
    names = {id(g): n for n, g in approach.hat.gates.items()}
    hooks = [g.register_forward_hook(lambda m, _, out: seen.__setitem__(names[id(m)], out.detach().clone()))
             for g in approach.modules() if isinstance(g, HatGate)]
    try:
        out = approach.predict(batch, None)
    finally:
        for h in hooks:
            h.remove()
    assert set(seen) == set(approach.hat.cumulative.keys())
    for name, gate_out in seen.items():
        torch.testing.assert_close(gate_out, approach.hat.cumulative[name], rtol=0, atol=0)
    assert approach.ctx.union is None  # only for that prediction: training and TIL use their task's gates
    assert not torch.equal(out, approach.predict(batch, 1)) and not torch.equal(out, approach.predict(batch, 0))


def test_before_any_task_every_rule_uses_task0s_gates(run_of, dil_rule):
    """The untrained row (FWT's b) has no learned task to choose: every rule applies task 0's gates."""
    approach = dil_rule("last")
    batch = mixed_batch(run_of["engine"], per_task=2)
    learned, approach.learned_tasks = approach.learned_tasks, []
    try:
        ref = approach.predict(batch, 0)
        for rule in ("last", "confident", "union"):
            approach.opts.hat_dil_mask = rule
            assert torch.equal(approach.predict(batch, None), ref), rule
    finally:
        approach.learned_tasks = learned


def test_dil_resume_restores_the_learned_tasks(hat_dil):
    tmp, full = hat_dil["tmp"], hat_dil["matrix"]
    run_dir = tmp / "runs" / "r"
    state = json.loads((run_dir / "checkpoints" / "task_0" / "state.json").read_text())
    assert state["extra"]["learned_tasks"] == [0]
    resumed_dir = tmp / "resumed"
    # a crash during task 1: its checkpoint never got written (the weights are linked, not copied: resume
    # writes new files and never changes a checkpoint's)
    def link_weights(src, dst):
        return (os.link if src.endswith(".safetensors") else shutil.copy2)(src, dst)

    copy = resumed_dir / "runs" / "r"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("task_1"), copy_function=link_weights)
    engine = Engine(dil_config(resumed_dir, "hat", resume=str(copy)), sequence=toy_text_sequence())
    matrix = engine.run()
    # without the checkpoint's state the resumed learner would know only task 1 (and `confident` would
    # choose among fewer tasks than the uninterrupted run)
    assert engine.approach.learned_tasks == [0, 1]
    np.testing.assert_allclose(matrix.acc, full.acc)


def test_a_bad_dil_mask_rule_names_the_flag(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"--hat_dil_mask must be one of last, confident, union, got 'entropy'"):
        HatOptions(hat_dil_mask="entropy").validate()
    code = main(["run", "--baseline", "ctr", "--backbone", "bert_adapter", "--scenario", "dil", "--hat_dil_mask",
                 "newest", "--output_dir", str(tmp_path / "runs"), "--run_name", "x", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--hat_dil_mask must be one of last, confident, union, got 'newest'" in err, err
    assert not (tmp_path / "runs" / "x").exists()


def test_til_state_is_unchanged_and_cil_still_refused(hat_dil):
    from mmcl.approaches.hat import Hat
    from mmcl.data.sequence import get_scenario

    assert Hat.scenarios == ("til", "dil")
    with pytest.raises(ValueError, match="--baseline hat supports scenarios til, dil, not 'cil'"):
        Hat.check_scenario(get_scenario("cil"))
    approach = hat_dil["engine"].approach
    assert approach.extra_state() == {"binarized_units": [], "learned_tasks": [0, 1]}
    scenario, approach.scenario = approach.scenario, get_scenario("til")
    try:  # TIL checkpoints hold what they held before DIL existed
        assert approach.extra_state() == {"binarized_units": []}
    finally:
        approach.scenario = scenario
