"""Backbones build offline, embed their own modality, and train what they should."""
import numpy as np
import pytest
import torch

from mmcl.backbones import BACKBONES, BackboneSpec, build_backbone
from mmcl.config import RunConfig

TEXT = BackboneSpec(modalities=("text",))
IMAGE = BackboneSpec(modalities=("image",), image_shape=(28, 28))


def cfg(**kw):
    base = dict(max_seq_length=32, vit_embed_dim=48, vit_depth=2, vit_heads=3, bert_adapter_size=16)
    base.update(kw)
    return RunConfig.from_dict(base)


def text_batch(backbone, texts=("a fine phone", "the worst screen I ever had")):
    from datasets import Dataset

    ds = backbone.preprocess(Dataset.from_dict({"text": list(texts), "label": [1, 0]}))
    return backbone.collate_inputs([ds[i] for i in range(len(ds))])


def n_trainable(m):
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def minilm():
    return build_backbone(cfg(backbone="bert"), TEXT)


def test_bert_default_is_offline_minilm(minilm):
    feats = minilm(text_batch(minilm))
    assert feats.shape == (2, 384) and minilm.feature_dim == 384
    assert n_trainable(minilm) == sum(p.numel() for p in minilm.parameters())


def test_bert_adapter_starts_as_the_frozen_model_and_trains_only_adapters(minilm):
    adapted = build_backbone(cfg(backbone="bert_adapter"), TEXT)
    minilm.eval(); adapted.eval()
    batch = text_batch(minilm)
    torch.testing.assert_close(adapted(batch), minilm(batch), rtol=1e-5, atol=1e-5)
    assert len(adapted.sites) == 2 * 6 and {s.kind for s in adapted.sites} == {"attention", "ffn"}
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(("plugin" in n) or ("LayerNorm" in n) for n in trainable)
    assert not any("embeddings" in n or "attention.self" in n for n in trainable)


def test_bert_lora_trains_only_lora_weights():
    lora = build_backbone(cfg(backbone="bert_lora", lora_r=4), TEXT)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert lora(text_batch(lora)).shape == (2, 384)


def test_text_pairs_are_encoded_as_pairs(minilm):
    from datasets import Dataset

    ds = minilm.preprocess(Dataset.from_dict({"text": ["screen"], "text_pair": ["the screen is great"], "label": [0]}))
    assert set(ds[0]["token_type_ids"]) == {0, 1}


def test_tokenised_splits_are_named_by_the_data_and_the_tokenizer_settings(minilm):
    """The cache fingerprint of a tokenised split (our own: datasets would pickle the vocabulary for it)."""
    from datasets import Dataset

    data = Dataset.from_dict({"text": ["a fine phone", "bad"], "label": [1, 0]})
    first, again = minilm.preprocess(data), minilm.preprocess(data)
    assert first._fingerprint == again._fingerprint
    assert minilm.preprocess(Dataset.from_dict({"text": ["a fine phone", "worse"], "label": [1, 0]}))._fingerprint \
        != first._fingerprint
    shorter = build_backbone(cfg(backbone="bert", max_seq_length=2), TEXT)
    assert shorter.preprocess(data)._fingerprint != first._fingerprint
    assert len(shorter.preprocess(data)[0]["input_ids"]) == 2


@pytest.mark.parametrize("name", ["vit", "convit"])
def test_vision_backbones_on_small_images(name):
    backbone = build_backbone(cfg(backbone=name), IMAGE)
    rows = [{"image": np.full((28, 28), 255, dtype=np.uint8)}, {"image": np.zeros((28, 28), dtype=np.uint8)}]
    x = backbone.collate_inputs(rows)["pixel_values"]
    assert x.shape == (2, 1, 28, 28) and x.max() == 1.0 and x.min() == -1.0
    assert backbone({"pixel_values": x}).shape == (2, 48)


def test_vit_pretrained_path_loads_safetensors_without_pickle(tmp_path):
    from safetensors.torch import save_file

    source = build_backbone(cfg(backbone="vit"), IMAGE)
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    loaded = build_backbone(cfg(backbone="vit", pretrained=str(tmp_path)), IMAGE)
    for (k, a), (_, b) in zip(source.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), k
    save_file({"nope": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="bad.safetensors"):
        build_backbone(cfg(backbone="vit", pretrained=str(tmp_path / "bad.safetensors")), IMAGE)


def test_modality_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="no images"):
        build_backbone(cfg(backbone="vit", task="vader4"), TEXT)
    with pytest.raises(ValueError, match="no text"):
        build_backbone(cfg(backbone="bert", task="split_digits"), IMAGE)


def test_local_hf_model_path_works_as_backbone_name():
    from mmcl.backbones.text import resolve_bert_model

    path = resolve_bert_model(None)
    backbone = build_backbone(cfg(backbone=path), TEXT)
    assert backbone.feature_dim == 384 and "bert" in BACKBONES
