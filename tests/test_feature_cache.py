"""Frozen features computed once per example: the same results as computing them every time, the encoder
run only on examples (and weights) it has not seen, never where the encoder can change or is random."""
import numpy as np
import pytest
import torch

import mmcl.feature_cache as feature_cache
from conftest import synthetic_image_sequence, tiny_config, toy_text_sequence
from mmcl.engine import Engine


def run(tmp_path, name, baseline="finetune", scenario="cil", cache=True, monkeypatch=None, seq=None, **kw):
    if not cache:
        monkeypatch.setattr(feature_cache, "deterministic_and_frozen", lambda module: False)
    values = dict(baseline=baseline, scenario=scenario, output_dir=str(tmp_path / name), num_train_epochs=3)
    values.update(kw)
    engine = Engine(tiny_config(tmp_path, **values), sequence=seq or synthetic_image_sequence())
    calls = []
    matrix = None
    engine.setup()
    encoder = engine.backbone
    encoder.register_forward_pre_hook(lambda m, args: calls.append(len(next(iter(args[0].values())))))
    engine.setup = lambda: None  # already set up, with the counting hook
    matrix = engine.run()
    monkeypatch and monkeypatch.undo()
    return engine, matrix, sum(calls)


def assert_same_matrix(a, b, examples):
    """Equal within one test example per entry (features computed in other batches round differently)."""
    np.testing.assert_allclose(a.acc, b.acc, atol=100 / examples + 1e-9)


def test_freeze_backbone_runs_the_encoder_once_per_example_with_the_same_results(tmp_path, monkeypatch):
    seq = synthetic_image_sequence(n_train=64, n_test=32)
    engine, cached, n_cached = run(tmp_path, "cached", freeze_backbone=True, seq=seq)
    _, plain, n_plain = run(tmp_path, "plain", cache=False, monkeypatch=monkeypatch, freeze_backbone=True,
                            seq=synthetic_image_sequence(n_train=64, n_test=32))
    assert_same_matrix(cached, plain, 32)
    # every training example once (3 epochs), every test example once (evaluated after both tasks): 2 x 64 + 2 x 32
    assert n_cached == 2 * 64 + 2 * 32
    assert n_plain == 2 * 3 * 64 + 32 + 2 * 32  # task 1's test set is skipped after task 0 (CIL)
    assert engine.approach.model.feature_cache.hits > 0


def test_a_trainable_encoder_is_never_cached(tmp_path):
    _, _, n = run(tmp_path, "trained")
    assert n == 2 * 3 * 64 + 32 + 2 * 32


def test_changed_weights_or_other_data_are_computed_again(tmp_path):
    engine = Engine(tiny_config(tmp_path, freeze_backbone=True), sequence=synthetic_image_sequence())
    engine.setup()
    model = engine.approach.model.eval()
    cache = model.feature_cache
    batch = next(iter(engine.loader(engine.seq[0].test, 8, shuffle=False)))
    first = model.features(batch)
    assert (cache.hits, cache.misses) == (0, 8)
    torch.testing.assert_close(model.features(batch), first, atol=0, rtol=0)
    assert cache.hits == 8
    with torch.no_grad():
        next(model.backbone.parameters()).add_(0.1)  # a weight load or a step: a new weights key
    changed = model.features(batch)
    assert cache.misses == 16 and not torch.equal(changed, first)
    other = next(iter(engine.loader(engine.seq[1].test, 8, shuffle=False)))  # the same row numbers, another split
    model.features(other)
    assert cache.misses == 24
    torch.testing.assert_close(model.features(batch), changed, atol=0, rtol=0)


def test_dropout_in_training_is_never_cached_but_evaluation_is(tmp_path):
    engine = Engine(tiny_config(tmp_path, task="toytext", backbone="bert_frozen", max_seq_length=16, bert_dropout=0.1),
                    sequence=toy_text_sequence())
    engine.setup()
    model = engine.approach.model
    batch = next(iter(engine.loader(engine.seq[0].train, 8, shuffle=False)))
    model.train()
    model.features(batch)
    model.features(batch)
    assert (model.feature_cache.hits, model.feature_cache.misses) == (0, 0)  # random: run every time
    model.eval()
    model.features(batch)
    model.features(batch)
    assert (model.feature_cache.hits, model.feature_cache.misses) == (8, 8)
    model.train()
    model.features(batch)  # training again: the cached eval features are not dropout's
    assert model.feature_cache.hits == 8


@pytest.mark.parametrize("baseline", ["coda_prompt"])
def test_prompt_query_runs_once_per_example_with_the_same_results(tmp_path, monkeypatch, baseline):
    kw = dict(vit_depth=2, coda_pool_size=4, coda_length=2, coda_layers="0,1")
    engine, cached, _ = run(tmp_path, "cached", baseline=baseline, **kw)
    _, plain, _ = run(tmp_path, "plain", baseline=baseline, cache=False, monkeypatch=monkeypatch, **kw)
    assert_same_matrix(cached, plain, 32)
    q = engine.approach.query_cache
    # the query pass: each training example once in 3 epochs, the test sets once
    assert q.misses == 2 * 64 + 2 * 32 and q.hits == 2 * 2 * 64 + 32
