"""Tensor-native batches: a split becomes tensors once and a batch is an index slice; the batches, and what is
trained from them, equal the row-collated ones. Replay's one forward equals its two passes."""
import numpy as np
import pytest
import torch

from conftest import synthetic_image_sequence, tiny_config, toy_text_sequence
from mmcl.data.mixed import ModalityGroups
from mmcl.data.prepare import Batcher, TensorSplit, make_loader
from mmcl.engine import Engine
from test_multimodal import dual_engine


def image_engine(tmp_path, baseline="finetune", scenario="til", **kw):
    engine = Engine(tiny_config(tmp_path, baseline=baseline, scenario=scenario, **kw),
                    sequence=synthetic_image_sequence())
    engine.setup()
    return engine


def text_engine(tmp_path, baseline="finetune", scenario="til", **kw):
    values = dict(task="toytext", backbone="bert_adapter", bert_adapter_size=8, max_seq_length=16, bert_dropout=0.0)
    values.update(kw)
    engine = Engine(tiny_config(tmp_path, baseline=baseline, scenario=scenario, **values), sequence=toy_text_sequence())
    engine.setup()
    return engine


def assert_same_batch(a: dict, b: dict) -> None:
    """The tensor path's batch `a` equals the row-collated `b`, which has no example ids."""
    assert sorted(a) == sorted([*b, "example_ids"])
    for k in b:
        if torch.is_tensor(a[k]):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def row_loader(engine, dataset, batch_size, shuffle, seed=0):
    """The reference: the same loader with rows collated one batch at a time (the path without tensors)."""
    batcher = Batcher(engine.backbone)
    batcher.tensor_path = False
    return make_loader(engine.accelerator, batcher, dataset, batch_size, shuffle, seed)


@pytest.mark.parametrize("make", ["image", "text", "dual"])
def test_tensor_batches_equal_row_collated_batches(tmp_path, make):
    engine = {"image": image_engine, "text": text_engine, "dual": dual_engine}[make](tmp_path)
    for task in engine.seq:
        for split, shuffle in (("train", True), ("test", False)):
            ds = getattr(task, split)
            loader = engine.loader(ds, 5, shuffle=shuffle, seed=3)
            assert isinstance(loader.dataset, TensorSplit)
            got, want = list(loader), list(row_loader(engine, ds, 5, shuffle, seed=3))
            assert len(got) == len(want)
            for a, b in zip(got, want):
                assert_same_batch(a, b)
    # made once per split: a second loader reuses the tensors
    ds = engine.seq[0].train
    assert engine.loader(ds, 5, shuffle=False).dataset is engine.loader(ds, 7, shuffle=True).dataset


def test_text_batches_hold_no_column_of_padding_only(tmp_path):
    engine = text_engine(tmp_path)
    ds = engine.seq[1].train  # task 1's texts differ in length
    lengths = [len(r) for r in ds["input_ids"]]
    assert len(set(lengths)) > 1  # a test of trimming needs rows of several lengths
    widths = set()
    for batch in engine.loader(ds, 4, shuffle=True, seed=3):
        assert batch["attention_mask"][:, -1].any()
        widths.add(batch["input_ids"].shape[1])
    assert len(widths) > 1


def test_modality_groups_batch_each_modality_from_its_tensors(tmp_path):
    engine = dual_engine(tmp_path, "joint")
    task = engine.seq[-1]
    data = engine.approach.train_dataset(task)
    assert isinstance(data, ModalityGroups)
    seen = set()
    for batch in engine.loader(data, 8, shuffle=True, seed=0):
        seen.add(batch["modality"])
        assert ("pixel_values" in batch) == (batch["modality"] == "image")
    assert seen == {"text", "image"}


def test_join_pads_text_batches_to_the_widest_and_predictions_do_not_change(tmp_path):
    engine = text_engine(tmp_path)
    model = engine.approach.model.eval()
    ds = engine.seq[1].test
    lengths = np.array([len(r) for r in ds["input_ids"]])
    short, long = [int(np.argmin(lengths))], [int(np.argmax(lengths))]
    a, b = engine.approach.batch_of(ds, short), engine.approach.batch_of(ds, long)
    assert a["input_ids"].shape[1] < b["input_ids"].shape[1]
    joined = engine.backbone.join_inputs([a, b])
    assert joined["input_ids"].shape == (2, b["input_ids"].shape[1])
    with torch.no_grad():
        torch.testing.assert_close(model(joined, 1)[:1], model(a, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", ["image", "text"])
def test_replay_one_forward_equals_the_mean_of_two_passes(tmp_path, make):
    engine = (image_engine if make == "image" else text_engine)(tmp_path, "replay", "cil", memory_size=20)
    replay = engine.approach
    engine.train_task(engine.seq[0])
    task = engine.seq[1]
    replay.before_task(task)
    replay.eval()  # no dropout: both computations see the same network
    batch = replay.to_device(next(iter(engine.loader(task.train, 8, shuffle=False))))
    state = replay._rng.bit_generator.state
    one = replay.training_step(batch, task)
    replay._rng.bit_generator.state = state  # the same memory draw
    memory = replay.memory_batches(8)
    assert len(memory) == 1 and memory[0]["labels"].numel() == 8
    two = (replay.model.loss(batch) + replay.loss_over(memory)) / 2
    torch.testing.assert_close(one, two, atol=1e-5, rtol=1e-5)
    calls = []
    handle = replay.model.backbone.register_forward_pre_hook(lambda m, args: calls.append(1))
    replay.training_step(batch, task)
    handle.remove()
    assert len(calls) == 1  # one forward over current and memory examples


def test_replay_on_a_mixed_sequence_runs_the_other_modality_apart(tmp_path):
    engine = dual_engine(tmp_path, "replay", memory_size=40)
    replay = engine.approach
    for task in engine.seq.tasks[:2]:
        engine.train_task(task)
    task = engine.seq[2]  # text, with text and image rows in memory
    replay.before_task(task)
    replay.eval()
    batch = replay.to_device(next(iter(engine.loader(task.train, 8, shuffle=False))))
    state = replay._rng.bit_generator.state
    one = replay.training_step(batch, task)
    replay._rng.bit_generator.state = state
    memory = replay.memory_batches(8)
    assert sorted(b["modality"] for b in memory) == ["image", "text"]
    two = (replay.model.loss(batch) + replay.loss_over(memory)) / 2
    torch.testing.assert_close(one, two, atol=1e-5, rtol=1e-5)
