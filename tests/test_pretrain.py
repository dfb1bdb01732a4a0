"""scripts/pretrain_vit.py: offline pre-training on data disjoint from split_fmnist, loadable by --pretrained."""
import json
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import pretrain_vit  # noqa: E402

from mmcl.backbones import BackboneSpec, build_backbone  # noqa: E402
from mmcl.config import RunConfig  # noqa: E402

ARCH = ["--vit_embed_dim", "32", "--vit_depth", "1", "--vit_heads", "2", "--patch_size", "4"]


def test_digit_images_are_in_the_backbone_range_and_all_ten_classes():
    x, y = pretrain_vit.digit_images(28)
    assert x.shape == (1797, 1, 28, 28) and x.min() >= -1 and x.max() <= 1
    assert sorted(y.unique().tolist()) == list(range(10))


def test_random_affine_keeps_shape_range_and_changes_images():
    x, _ = pretrain_vit.digit_images(28)
    warped = pretrain_vit.random_affine(x[:16], torch.Generator().manual_seed(0))
    assert warped.shape == (16, 1, 28, 28) and warped.min() >= -1 - 1e-5 and warped.max() <= 1 + 1e-5
    assert not torch.allclose(warped, x[:16])


def test_pretrained_checkpoint_loads_into_the_same_architecture(tmp_path):
    out = tmp_path / "pre"
    info = pretrain_vit.main(["--out", str(out), "--epochs", "1", "--batch_size", "256", *ARCH])
    meta = json.loads((out / "pretrain.json").read_text())
    assert meta["not_fair_for"] == ["split_digits"] and "split_fmnist" in meta["disjoint_from"]
    assert 0 <= info["valid_acc"] <= 100
    from safetensors.torch import load_file

    saved = load_file(str(out / "model.safetensors"))
    assert saved and not any(k.startswith("head") for k in saved)
    cfg = RunConfig.from_dict(dict(backbone="vit", vit_embed_dim=32, vit_depth=1, vit_heads=2, patch_size=4, pretrained=str(out)))
    backbone = build_backbone(cfg, BackboneSpec(modalities=("image",), image_shape=(28, 28)))
    state = backbone.model.state_dict()
    for k, v in saved.items():
        assert torch.equal(state[k], v), k
    wider = RunConfig.from_dict(dict(backbone="vit", vit_embed_dim=48, vit_depth=1, vit_heads=2, patch_size=4, pretrained=str(out)))
    with pytest.raises(ValueError, match="model.safetensors.*vit_embed_dim"):
        build_backbone(wider, BackboneSpec(modalities=("image",), image_shape=(28, 28)))
