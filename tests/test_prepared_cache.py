"""Prepared (tokenised) text splits kept under MMCL_CACHE: a second preparation of the same rows loads them
instead of tokenising, gives the same splits, and anything that changes the result is prepared again."""
import pytest

from conftest import tiny_config, toy_text_sequence
from mmcl.backbones import build_backbone
from mmcl.backbones.text import BertEncoder
from mmcl.data.prepare import backbone_spec, prepare_task
from mmcl.data.sequence import get_scenario


def prepared(tmp_path, monkeypatch, scenario="til", **kw):
    """(the prepared sequence, how many splits were tokenised)."""
    calls = []
    real = BertEncoder.preprocess
    monkeypatch.setattr(BertEncoder, "preprocess", lambda self, ds: calls.append(1) or real(self, ds))
    seq = toy_text_sequence()
    values = dict(task="toytext", backbone="bert_adapter", bert_adapter_size=8, max_seq_length=16, scenario=scenario)
    values.update(kw)
    backbone = build_backbone(tiny_config(tmp_path, **values), backbone_spec(seq))
    for task in seq:
        prepare_task(task, backbone, get_scenario(scenario))
    return seq, len(calls)


def rows(seq):
    return [[getattr(t, s)[:] for s in ("train", "valid", "test")] for t in seq]


def test_a_second_preparation_loads_the_kept_splits(tmp_path, monkeypatch):
    monkeypatch.setenv("MMCL_CACHE", str(tmp_path / "cache"))
    first, tokenised = prepared(tmp_path, monkeypatch)
    assert tokenised == 6 and len(list((tmp_path / "cache" / "prepared").glob("split-*.arrow"))) == 6
    second, again = prepared(tmp_path, monkeypatch)
    assert again == 0
    assert rows(first) == rows(second)
    assert all(t.test.cache_files for t in second)  # memory-mapped from the kept files


@pytest.mark.parametrize("change", [dict(max_seq_length=8), dict(scenario="cil")])
def test_what_changes_the_result_is_prepared_again(tmp_path, monkeypatch, change):
    monkeypatch.setenv("MMCL_CACHE", str(tmp_path / "cache"))
    prepared(tmp_path, monkeypatch)
    _, tokenised = prepared(tmp_path, monkeypatch, **change)
    assert tokenised == 6


def test_keeping_prepared_splits_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("MMCL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MMCL_KEEP_PREPARED", "0")
    prepared(tmp_path, monkeypatch)
    _, tokenised = prepared(tmp_path, monkeypatch)
    assert tokenised == 6
    assert not list(tmp_path.rglob("*.arrow"))
