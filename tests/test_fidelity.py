"""Faithful defaults and how our tuning is kept apart: LwF and CTR as their papers define them, presets,
--eval_split, the CIL macro-F1 and the sample-weighted averages (docs/metrics.md, docs/fidelity.md)."""
import json

import numpy as np
import pytest
import torch

from conftest import synthetic_image_sequence, tiny_config, toy_text_sequence
from mmcl.engine import Engine
from mmcl.flags import build_config, load_preset
from mmcl.metrics import AccuracyMatrix, accuracy_and_macro_f1, weighted_accuracy, weighted_incremental_accuracy


# -- LwF: Li & Hoiem / PyContinual ------------------------------------------------------------------

def test_lwf_default_is_the_papers_cross_entropy_at_t2_summed_over_old_heads(tmp_path):
    cfg = tiny_config(tmp_path, baseline="lwf", num_train_epochs=1)
    engine = Engine(cfg, sequence=synthetic_image_sequence(num_tasks=3))
    engine.setup()
    lwf = engine.approach
    assert (lwf.opts.temperature, lwf.opts.lwf_lambda, lwf.opts.lwf_distill) == (2.0, 1.0, "ce_sum")
    engine.train_task(engine.seq[0])
    engine.train_task(engine.seq[1])
    lwf.before_task(engine.seq[2])
    with torch.no_grad():  # move the model away from the snapshot, so old and new outputs differ
        for p in lwf.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    lwf.eval()
    batch = next(iter(engine.loader(engine.seq[2].train, 16, shuffle=False)))
    features = lwf.model.features(batch)
    old = lwf.old_model
    per_head_ce, per_head_kl = [], []
    for u in range(2):  # the two old tasks' heads
        new = lwf.model.heads(features, u).detach().double() / 2
        ref = old.heads(old.features(batch), u).detach().double() / 2
        q = ref.softmax(-1)
        per_head_ce.append(float(-(q * new.log_softmax(-1)).sum(-1).mean()))
        per_head_kl.append(float((q * (q.log() - new.log_softmax(-1))).sum(-1).mean()))
    got = lwf.distillation_loss(batch, engine.seq[2], features).item()
    assert got == pytest.approx(sum(per_head_ce), rel=1e-5)  # summed, no T^2
    lwf.opts.lwf_distill = "kl_mean_t2"  # the earlier form: KL x T^2, averaged over the old heads
    assert lwf.distillation_loss(batch, engine.seq[2], features).item() == pytest.approx(
        4 * np.mean(per_head_kl), rel=1e-4)


def test_lwf_rejects_an_unknown_distillation_form(tmp_path):
    with pytest.raises(ValueError, match="--lwf_distill"):
        Engine(tiny_config(tmp_path, baseline="lwf", lwf_distill="kl"), sequence=synthetic_image_sequence()).setup()


# -- CTR: PyContinual's KSM by default, ours as the preset ctr_cpu -----------------------------------

def _ctr_plugins(tmp_path):
    from mmcl.approaches.ctr import CtrPlugin
    from mmcl.optim import make_optimizer

    values = dict(task="toytext", backbone="bert_adapter", baseline="ctr", bert_adapter_size=8, max_seq_length=32,
                  learning_rate=1e-3, output_dir=str(tmp_path / "runs"), progress=False, save_checkpoints=False)
    engine = Engine(tiny_config(tmp_path, **values), sequence=toy_text_sequence())
    engine.setup()
    groups = make_optimizer(engine.approach.cfg, engine.approach.parameter_groups()).param_groups
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    return engine, [m for m in engine.approach.modules() if isinstance(m, CtrPlugin)], lr_of


def test_ctr_default_is_pycontinuals_full_rate_randomly_initialised_ksm(tmp_path):
    engine, plugins, lr_of = _ctr_plugins(tmp_path)
    assert plugins and (engine.approach.opts.ctr_ksm_lr_scale, engine.approach.opts.ctr_zero_up) == (1.0, False)
    for plugin in plugins:
        assert all(lr_of[id(p)] == pytest.approx(1e-3) for p in plugin.ksm.parameters())
        assert plugin.ksm.up.weight.abs().sum() > 0  # nn.Linear's initialisation, not zeros


# -- presets ------------------------------------------------------------------------------------------

def test_preset_sits_between_task_defaults_and_the_command_line():
    # what these values do to the built KSM: test_hat_ctr.py::test_ctr_ksm_learning_rate_and_zero_up
    cfg = build_config({"task": "vader4", "baseline": "ctr", "preset": "ctr_cpu"})
    assert (cfg.ctr_ksm_lr_scale, cfg.ctr_zero_up, cfg.preset) == (0.1, True, "ctr_cpu")
    cfg = build_config({"task": "vader4", "baseline": "ctr", "preset": "ctr_cpu", "ctr_ksm_lr_scale": 0.3})
    assert (cfg.ctr_ksm_lr_scale, cfg.ctr_zero_up) == (0.3, True)  # a flag given wins
    assert build_config({"task": "vader4", "baseline": "ctr"}).ctr_ksm_lr_scale == 1.0


def test_preset_errors_name_the_preset_and_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"--preset ctr_cpu is a setting of --baseline ctr, not of --baseline ewc"):
        build_config({"task": "vader4", "baseline": "ewc", "preset": "ctr_cpu"})
    with pytest.raises(ValueError, match=r"--preset ctr_cpx: no preset .*ctr_cpx.yaml\. Did you mean ctr_cpu\?"):
        build_config({"task": "vader4", "baseline": "ctr", "preset": "ctr_cpx"})
    bad = tmp_path / "mine.yaml"
    bad.write_text("approach: ctr\nsettings:\n  task: asc\n")
    with pytest.raises(ValueError, match=r"mine.yaml \[settings\]: a preset may not set 'task'"):
        load_preset(str(bad), "ctr")
    bad.write_text("approach: ctr\nsettings:\n  ctr_ksm_lr_scal: 0.1\n")
    with pytest.raises(ValueError, match=r"mine.yaml \[settings\]: unknown setting 'ctr_ksm_lr_scal'"):
        load_preset(str(bad), "ctr")
    bad.write_text("settings: [1, 2]\n")
    with pytest.raises(ValueError, match=r"mine.yaml must be a mapping with 'approach:'"):
        load_preset(str(bad), "ctr")


def test_every_shipped_preset_loads_and_says_what_it_changes():
    from mmcl.flags import PRESETS_DIR, preset_names
    import yaml

    names = preset_names()
    assert "ctr_cpu" in names
    for name in names:
        text = (PRESETS_DIR / f"{name}.yaml").read_text()
        assert text.startswith("#"), f"{name}.yaml must start with a comment: what it changes and its measured effect"
        approach = yaml.safe_load(text)["approach"]
        for a in approach if isinstance(approach, list) else [approach]:
            assert load_preset(name, a)


# -- --eval_split ---------------------------------------------------------------------------------------

def test_eval_split_valid_measures_the_matrix_on_valid(tmp_path):
    seq = synthetic_image_sequence(n_test=32)
    for t in seq:
        t.valid = t.valid.select(range(20))
    engine = Engine(tiny_config(tmp_path, eval_split="valid", num_train_epochs=1, run_name="v"), sequence=seq)
    engine.run()
    sizes = [len(t.valid) for t in seq]
    assert sizes != [len(t.test) for t in seq]  # else this test could not tell the splits apart
    assert [engine.eval_counts[(t.id, "valid")] for t in seq] == sizes
    assert not any(split == "test" for _, split in engine.eval_counts)
    doc = json.loads((engine.run_dir / "metrics.json").read_text())
    assert doc["meta"]["eval_split"] == "valid" and doc["matrix"]["examples"] == sizes
    assert "**valid** split" in (engine.run_dir / "results.md").read_text()
    with pytest.raises(ValueError, match="--eval_split must be one of test, valid"):
        Engine(tiny_config(tmp_path, eval_split="dev"), sequence=seq)


# -- metrics ---------------------------------------------------------------------------------------------

def test_cil_macro_f1_counts_predictions_of_other_seen_classes():
    y = np.array([0, 0, 1, 1])  # a task with classes 0 and 1; classes 2, 3 belong to an earlier task
    # perfect, and balanced constant predictors: accuracy and macro-F1 as defined
    assert accuracy_and_macro_f1(y, y, 4, among=[0, 1, 2, 3]) == (100.0, 100.0)
    acc, f1 = accuracy_and_macro_f1(y, np.zeros(4, int), 4, among=[0, 1, 2, 3])
    assert acc == 50.0 and f1 == pytest.approx(100 * (2 / 3 + 0) / 2)  # class 0: P 1/2 R 1; class 1: 0
    # half of each class right, the rest predicted as class 2 of another task: the old definition (own
    # classes only) gave F1 66.7 > ACC 50; over the seen classes class 2 counts, with F1 0
    pred = np.array([0, 2, 1, 2])
    assert accuracy_and_macro_f1(y, pred, 4, labels=[0, 1]) == pytest.approx((50.0, 100 * 2 / 3))
    acc, f1 = accuracy_and_macro_f1(y, pred, 4, among=[0, 1, 2, 3])
    assert acc == 50.0 and f1 == pytest.approx(100 * (2 / 3 + 2 / 3 + 0) / 3) and f1 <= acc
    # a predicted class not seen yet (a future task's) is not in the mean; class 3, never used, neither
    assert accuracy_and_macro_f1(y, np.array([0, 5, 1, 5]), 6, among=[0, 1, 2, 3])[1] == pytest.approx(100 * 2 / 3)


def test_cil_run_reports_macro_f1_within_bounds(tmp_path):
    engine = Engine(tiny_config(tmp_path, scenario="cil", num_train_epochs=1, run_name="c"),
                    sequence=synthetic_image_sequence(num_tasks=3))
    matrix = engine.run()
    learned = np.tril(np.ones((3, 3), bool))
    assert np.all((matrix.f1[learned] >= 0) & (matrix.f1[learned] <= 100))


def test_sample_weighted_averages_are_accuracy_over_all_examples():
    R = np.array([[90.0, 0, 0], [60.0, 80.0, 0], [50.0, 70.0, 100.0]])
    n = np.array([10, 30, 60])
    correct_last = R[2] / 100 * n  # 5, 21, 60 examples right after the last task
    assert weighted_accuracy(R, n) == pytest.approx(100 * correct_last.sum() / n.sum())
    steps = [100 * (R[t, : t + 1] / 100 * n[: t + 1]).sum() / n[: t + 1].sum() for t in range(3)]
    assert weighted_incremental_accuracy(R, n) == pytest.approx(np.mean(steps))
    m = AccuracyMatrix(3, acc=R, f1=R, examples=n)
    s = m.summary()
    assert s["acc_final"] == pytest.approx(R[2].mean()) and s["acc_final_weighted"] == pytest.approx(86.0)
    assert AccuracyMatrix.from_dict(json.loads(json.dumps(m.to_dict()))).summary() == s
    assert AccuracyMatrix(3, acc=R, f1=R).summary()["acc_final_weighted"] is None  # sizes unknown: not guessed
    with pytest.raises(ValueError, match="positive test-set sizes"):
        weighted_accuracy(R, [10, 0, 5])


def test_run_writes_weighted_accuracy_from_the_evaluated_examples(tmp_path):
    seq = synthetic_image_sequence(num_tasks=2, n_test=32)
    seq.tasks[1].test = seq.tasks[1].test.select(range(12))  # unequal test sets: the two averages differ
    engine = Engine(tiny_config(tmp_path, scenario="cil", num_train_epochs=1, run_name="w"), sequence=seq)
    matrix = engine.run()
    doc = json.loads((engine.run_dir / "metrics.json").read_text())
    assert doc["matrix"]["examples"] == [32, 12]
    # each accuracy is a whole number of examples: the weighted figure is their total over 44
    right = [round(a * k / 100) for a, k in zip(matrix.acc[1], [32, 12])]
    assert doc["summary"]["acc_final_weighted"] == pytest.approx(100 * sum(right) / 44, abs=1e-9)


# -- the reference's settings behind flags (docs/fidelity.md) -----------------------------------------

def test_lwf_warmup_trains_the_new_head_alone(tmp_path):
    cfg = tiny_config(tmp_path, baseline="lwf", num_train_epochs=1, lwf_warmup_epochs=1, save_checkpoints=False)
    engine = Engine(cfg, sequence=synthetic_image_sequence(num_tasks=2))
    engine.setup()
    model = engine.approach.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for task in engine.seq:
        engine.train_task(task)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    heads = {u: {n for n in before if n.startswith(f"heads.heads.{u}.")} for u in (0, 1)}
    assert heads[0] and heads[1] and heads[0] <= changed and heads[1] <= changed
    assert changed == heads[0] | heads[1], "the warm-up moved shared weights"
    with pytest.raises(ValueError, match="--lwf_warmup_epochs"):
        Engine(tiny_config(tmp_path, baseline="lwf", lwf_warmup_epochs=-1), sequence=synthetic_image_sequence()).setup()


def test_ewc_fisher_batch_is_pycontinuals_fixed_batch(tmp_path):
    from mmcl.approaches.base import trainable_named_parameters

    seq = synthetic_image_sequence(num_tasks=1, n_train=12)
    engine = Engine(tiny_config(tmp_path, baseline="ewc", save_checkpoints=False), sequence=seq)
    engine.setup()
    ewc, task = engine.approach, engine.seq[0]
    params = trainable_named_parameters(ewc.model)

    def mean_gradient(rows):
        ewc.model.zero_grad(set_to_none=True)
        ewc.model.loss(ewc.batch_from_rows(rows)).backward()
        return {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for n, p in params.items()}

    rows = [task.train[i] for i in range(12)]
    for n_batch, expected in (
        (12, {n: g ** 2 for n, g in mean_gradient(rows).items()}),  # one batch: the squared mean gradient
        (1, None),  # batches of one: the mean of the squared per-example gradients
        (5, None),  # 5 + 5 + 2, each weighted 5, divided by 12 (PyContinual's sbatch)
    ):
        if expected is None:
            chunks = [rows[i:i + n_batch] for i in range(0, 12, n_batch)]
            grads = [mean_gradient(c) for c in chunks]
            expected = {n: sum(g[n] ** 2 for g in grads) * n_batch / 12 for n in params}
        ewc.opts.ewc_fisher_batch = n_batch
        got = ewc.fisher_diagonal(*ewc.fisher_batches(task, None))
        for n in params:
            torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-10)
    assert any(float(f.abs().sum()) > 0 for f in got.values())


def _text_engine(tmp_path, **overrides):
    values = dict(task="toytext", backbone="bert_adapter", bert_adapter_size=8, max_seq_length=32,
                  learning_rate=1e-3, output_dir=str(tmp_path / "runs"), progress=False, save_checkpoints=False)
    engine = Engine(tiny_config(tmp_path, **{**values, **overrides}), sequence=toy_text_sequence())
    engine.setup()
    return engine


def test_hat_default_is_the_papers_soft_masks_and_trained_layernorms(tmp_path):
    engine = _text_engine(tmp_path, baseline="hat", num_train_epochs=1)
    assert not engine.approach.opts.hat_binarize
    norms = {n for n, p in engine.approach.named_parameters() if "LayerNorm" in n and p.requires_grad}
    encoder_norms = [n for n, _ in engine.approach.model.backbone.encoder.named_parameters()
                     if "LayerNorm" in n and "embeddings" not in n]
    assert len(norms) == len(encoder_norms) > 0  # every encoder LayerNorm (the embeddings' stays frozen)
    before = {n: p.detach().clone() for n, p in engine.approach.named_parameters() if n in norms}
    engine.train_task(engine.seq[0])
    assert any(not torch.equal(p, before[n]) for n, p in engine.approach.named_parameters() if n in norms)
    m = engine.approach.hat.cumulative
    assert any(bool(((m[k] > 0) & (m[k] < 1)).any()) for k in m.keys()), "soft masks: some gate strictly between"
    # mmcl's exact variant is a preset (test_hat_ctr.py runs its settings: binary gates, frozen LayerNorms)
    exact = dict(hat_binarize=True, hat_train_layernorm=False)
    assert load_preset("hat_exact", "hat") == exact
    assert exact.items() <= load_preset("ctr_cpu", "ctr").items()


def test_bert_adapter_form_pycontinual():
    from mmcl.backbones import build_backbone
    from mmcl.backbones.base import BackboneSpec
    from mmcl.backbones.adapters import Adapter, PyContinualAdapter
    from mmcl.backbones.text import BertAdapterOptions

    spec = BackboneSpec(modalities=("text",))
    default = build_backbone(build_config({"task": "vader4", "baseline": "finetune", "bert_adapter_size": 8}), spec)
    assert all(isinstance(s.plugin, Adapter) for s in default.sites)
    h = torch.randn(2, 3, default.feature_dim)
    torch.testing.assert_close(default.sites[0].plugin(h), h)  # Houlsby's: the identity at the start
    backbone = build_backbone(build_config({"task": "vader4", "baseline": "finetune", "bert_adapter_size": 8,
                                            "bert_adapter_form": "pycontinual"}), spec)
    plugin = backbone.sites[0].plugin
    assert all(isinstance(s.plugin, PyContinualAdapter) for s in backbone.sites)
    torch.testing.assert_close(plugin(h), h + torch.relu(plugin.fc2(torch.relu(plugin.fc1(h)))))
    assert not torch.allclose(plugin(h), h)
    with pytest.raises(ValueError, match="--bert_adapter_form"):
        BertAdapterOptions(bert_adapter_form="lora").validate()


def test_joint_last_task_schedule_trains_once_from_the_initial_model(tmp_path):
    cfg = tiny_config(tmp_path, baseline="joint", joint_schedule="last_task", num_train_epochs=1)
    engine = Engine(cfg, sequence=synthetic_image_sequence(num_tasks=3))
    matrix = engine.run()
    events = [json.loads(line) for line in (engine.run_dir / "log.jsonl").read_text().splitlines()]
    assert [e["task"] for e in events if e.get("event") == "task_not_trained"] == [0, 1]
    assert [e["task"] for e in events if e.get("event") == "epoch"] == [2]
    # the first two rows are the untrained model's: the same as before any training
    np.testing.assert_array_equal(matrix.acc[0], matrix.baseline)
    np.testing.assert_array_equal(matrix.acc[1], matrix.baseline)
    assert np.mean(matrix.acc[2]) > np.mean(matrix.baseline)


def test_select_best_scores_the_pooled_valid_splits_of_joint(tmp_path):
    seq = synthetic_image_sequence(num_tasks=2)
    for baseline, tasks in (("finetune", [1]), ("joint", [0, 1])):
        engine = Engine(tiny_config(tmp_path / baseline, baseline=baseline), sequence=seq)
        engine.setup()
        scores = [(engine.evaluate_task(engine.seq[t], "valid")[0], len(engine.seq[t].valid)) for t in tasks]
        expected = sum(a * n for a, n in scores) / sum(n for _, n in scores)
        assert engine.selection_score(engine.seq[1]) == pytest.approx(expected, abs=1e-9)
