"""timm vision transformers sized for small (8-32 px) images: `vit`, `convit` and `vit_adapter`."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmcl.backbones import BACKBONES
from mmcl.backbones.adapters import Adapter, AdapterSite, AdapterSites
from mmcl.backbones.base import Backbone, BackboneSpec
from mmcl.backbones.tokens import Prefix, TokenEncoder
from mmcl.options import Options, option, positive


def _patch_size(image_size: int, requested: int | None) -> int:
    if requested:
        if image_size % requested:
            raise ValueError(f"--patch_size {requested} does not divide the image size {image_size}")
        return requested
    return 4 if image_size >= 16 else 2


class TimmVisionBackbone(TokenEncoder, Backbone):
    modality = "image"
    input_keys = ("pixel_values",)

    def __init__(self, model: torch.nn.Module, image_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.model = model
        self.image_shape = tuple(image_shape)
        self.in_chans = image_shape[2] if len(image_shape) == 3 else 1
        self.feature_dim = model.num_features
        self.token_dim = getattr(model, "embed_dim", model.num_features)  # (a `--pretrained` CNN has no tokens)
        self.lead_tokens = getattr(model, "num_prefix_tokens", 0)

    def preprocess(self, dataset):
        # Images stay uint8 in Arrow; scaling happens per batch (cheaper than storing floats).
        keep = {"image", "label"}
        return dataset.remove_columns([c for c in dataset.column_names if c not in keep])

    def collate_inputs(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = np.stack([np.asarray(r["image"], dtype=np.uint8) for r in rows])
        return self.inputs_from_columns({"image": torch.from_numpy(images)})

    def to_columns(self, dataset) -> dict[str, torch.Tensor]:
        images = dataset.with_format("numpy", columns=["image"])[:]["image"]
        return {"image": torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))}

    def inputs_from_columns(self, columns: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = columns["image"].float().div_(127.5).sub_(1.0)  # [0,255] -> [-1,1]
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        return {"pixel_values": x.contiguous()}

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(inputs["pixel_values"])

    # -- the token interface (mmcl/backbones/tokens.py): timm's VisionTransformer run block by block --
    @property
    def supports_tokens(self) -> bool:
        return hasattr(self.model, "blocks") and hasattr(self.model, "_pos_embed")  # not a `--pretrained` CNN

    @property
    def supports_prefix(self) -> bool:
        return self.supports_tokens and all(hasattr(getattr(b, "attn", None), "qkv") for b in self.model.blocks)

    @property
    def num_token_layers(self) -> int:
        return len(self.model.blocks)

    @property
    def num_heads(self) -> int:
        return self.model.blocks[0].attn.num_heads  # timm's Attention and ConViT's GPSA/MHSA alike

    def embed_tokens(self, inputs: dict) -> tuple[torch.Tensor, None]:
        vit = self.model
        x = vit._pos_embed(vit.patch_embed(inputs["pixel_values"]))
        return vit.norm_pre(vit.patch_drop(x)), None

    def run_token_layer(self, i: int, x: torch.Tensor, key_mask: None, prefix: Prefix | None = None) -> torch.Tensor:
        blk = self.model.blocks[i]
        if prefix is None:
            return blk(x)
        x = x + blk.drop_path1(blk.ls1(prefix_attention(blk.attn, blk.norm1(x), prefix)))
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    def finish_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(x)

    def pool_tokens(self, x: torch.Tensor, key_mask: None) -> torch.Tensor:
        """The model's own pooling ([CLS] or average, --vit_pool)."""
        return self.model.forward_head(x, pre_logits=True)


def prefix_attention(attn: torch.nn.Module, x: torch.Tensor, prefix: Prefix) -> torch.Tensor:
    """timm Attention.forward with prompt keys/values concatenated in front of the tokens' own."""
    import torch.nn.functional as F

    B, N, _ = x.shape
    h, hd = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(B, N, 3, h, hd).permute(2, 0, 3, 1, 4).unbind(0)
    pk, pv = (p.reshape(B, -1, h, hd).transpose(1, 2).to(q.dtype) for p in prefix)
    q, k = attn.q_norm(q), attn.k_norm(torch.cat([pk, k], dim=2))
    v = torch.cat([pv, v], dim=2)
    x = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    x = attn.norm(x.transpose(1, 2).reshape(B, N, h * hd))
    gate = getattr(attn, "gate", None)
    if gate is not None:
        x = x * gate(x).sigmoid()
    return attn.proj_drop(attn.proj(x))


class TimmConvitBackbone(TimmVisionBackbone):
    """ConViT: its gated positional (GPSA) blocks have no qkv projection to put a prefix into, and its [CLS]
    token joins only at `local_up_to_layer`; as a token encoder it gives the patch tokens through every
    block, with no [CLS] (what DyTox's encoder is)."""

    supports_prefix = False
    supports_insert = False  # its relative position indices are sized to the patches
    supports_tokens = True

    def __init__(self, model: torch.nn.Module, image_shape: tuple[int, ...]) -> None:
        super().__init__(model, image_shape)
        self.lead_tokens = 0

    def embed_tokens(self, inputs: dict) -> tuple[torch.Tensor, None]:
        m = self.model
        x = m.patch_embed(inputs["pixel_values"])
        if m.use_pos_embed:
            x = x + m.pos_embed
        return m.pos_drop(x), None

    def run_token_layer(self, i: int, x: torch.Tensor, key_mask: None, prefix: Prefix | None = None) -> torch.Tensor:
        return self.model.blocks[i](x)

    def finish_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def pool_tokens(self, x: torch.Tensor, key_mask: None) -> torch.Tensor:
        return x.mean(dim=1)


@dataclass
class VitOptions(Options):
    title = "ViT options"
    pretrained: str | None = option(None, "a timm model name (weights from the Hub) or a safetensors file/folder")
    vit_embed_dim: int = option(192, "width")
    vit_depth: int = option(4, "transformer blocks")
    vit_heads: int = option(3, "attention heads")
    patch_size: int | None = option(None, "patch side in pixels (default: 4 on images of 16 px and more, else 2)")
    vit_pool: str = option("token", "token ([CLS]) | avg (mean of the patch tokens)")
    vit_dropout: float = option(0.0, "dropout after the attention and MLP projections (Mirzadeh et al. 2020: "
                                     "less forgetting)")

    def validate(self) -> None:
        positive(self, "vit_embed_dim", "vit_depth", "vit_heads")
        if self.vit_pool not in ("token", "avg"):
            raise ValueError(f"--vit_pool must be one of token, avg, got '{self.vit_pool}'")
        if self.vit_embed_dim % self.vit_heads:
            raise ValueError(f"--vit_embed_dim {self.vit_embed_dim} must be divisible by --vit_heads {self.vit_heads}")


def _timm_model(arch: str, cfg, spec: BackboneSpec, **overrides) -> TimmVisionBackbone:
    import timm

    if spec.image_shape is None:
        raise ValueError(f"--backbone {cfg.backbone} needs an image task sequence; '{cfg.task}' has no images")
    size = spec.image_shape[0]
    in_chans = spec.image_shape[2] if len(spec.image_shape) == 3 else 1
    o = VitOptions.from_values(cfg.options)
    kwargs = dict(img_size=size, patch_size=_patch_size(size, o.patch_size), in_chans=in_chans, num_classes=0,
                  global_pool=o.vit_pool, proj_drop_rate=o.vit_dropout)
    kwargs.update(overrides)
    pretrained = o.pretrained
    if pretrained and not Path(pretrained).exists():
        # A timm model name (e.g. vit_base_patch16_224.augreg_in21k): weights come from the hub.
        try:
            model = timm.create_model(pretrained, pretrained=True, num_classes=0, img_size=size, in_chans=in_chans)
        except Exception as e:  # noqa: BLE001 - unknown name, offline, no cache: one message naming the flag
            from mmcl.engine_errors import HubError

            offline = os.environ.get("HF_HUB_OFFLINE") == "1"
            raise HubError(f"--pretrained '{pretrained}': neither a local path nor a timm model whose weights "
                           f"can be loaded{' (HF_HUB_OFFLINE=1: only cached weights)' if offline else ''}: "
                           f"{type(e).__name__}: {e}") from e
    else:
        model = timm.create_model(arch, pretrained=False, **kwargs)
        if pretrained:
            load_vision_weights(model, Path(pretrained))
    wrapper = TimmConvitBackbone if hasattr(model, "local_up_to_layer") else TimmVisionBackbone
    return wrapper(model, spec.image_shape)


def load_vision_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a safetensors checkpoint (a file, or a folder with model.safetensors) without pickle."""
    from safetensors.torch import load_file

    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"--pretrained '{path}': no safetensors file found")
    state = load_file(str(file))
    state = {k.removeprefix("model."): v for k, v in state.items() if not k.startswith("head")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches: a checkpoint of another width, depth or patch size
        raise ValueError(f"--pretrained '{file}' does not fit the model (check --vit_embed_dim, --vit_depth, "
                         f"--vit_heads, --patch_size): {e}") from e
    if unexpected or [m for m in missing if not m.startswith("head")]:
        raise ValueError(
            f"--pretrained '{file}' does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


@BACKBONES.register("vit", options=VitOptions, modalities=("image",), provides=("tokens", "insert", "prefix"))
def vit(cfg, spec: BackboneSpec) -> TimmVisionBackbone:
    o = VitOptions.from_values(cfg.options)
    return _timm_model("vit_tiny_patch16_224", cfg, spec, embed_dim=o.vit_embed_dim, depth=o.vit_depth,
                       num_heads=o.vit_heads)


@BACKBONES.register("convit", options=VitOptions, modalities=("image",), provides=("tokens",))
def convit(cfg, spec: BackboneSpec) -> TimmVisionBackbone:
    # timm's ConViT multiplies embed_dim by num_heads; pass the per-head width so the flag means total width.
    o = VitOptions.from_values(cfg.options)
    return _timm_model(
        "convit_tiny", cfg, spec, embed_dim=o.vit_embed_dim // o.vit_heads, depth=o.vit_depth, num_heads=o.vit_heads,
        local_up_to_layer=max(1, o.vit_depth - 1),
    )


class TimmAdapterBackbone(AdapterSites, TimmVisionBackbone):
    """A frozen timm ViT with a bottleneck adapter after the attention projection and the MLP's second layer of
    every block (the places `bert_adapter` has them in BERT), so HAT's masked adapters run on images.

    What trains: the adapters and the LayerNorms (as in `bert_adapter`); the patch embedding, the positions,
    the [CLS] token and every block's weights are frozen (loaded from `--pretrained` when given)."""

    def __init__(self, model: torch.nn.Module, image_shape: tuple[int, ...], adapter_size: int) -> None:
        super().__init__(model, image_shape)
        model.requires_grad_(False)
        self.adapter_size = adapter_size
        self.sites = []
        for i, block in enumerate(model.blocks):
            for parent, name, kind in ((block.attn, "proj", "attention"), (block.mlp, "fc2", "ffn")):
                dense = getattr(parent, name)
                site = AdapterSite(dense, Adapter(dense.out_features, adapter_size), i, kind)
                setattr(parent, name, site)
                self.sites.append(site)
        for p in self.layer_norm_parameters():
            p.requires_grad_(True)

    def layer_norm_parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()]


@dataclass
class VitAdapterOptions(VitOptions):
    title = "ViT adapter options"
    vit_adapter_size: int = option(64, "bottleneck width of the adapters")

    def validate(self) -> None:
        super().validate()
        positive(self, "vit_adapter_size")


@BACKBONES.register("vit_adapter", options=VitAdapterOptions, modalities=("image",),
                    provides=("tokens", "insert", "prefix", "adapter_sites"))
def vit_adapter(cfg, spec: BackboneSpec) -> TimmAdapterBackbone:
    o = VitAdapterOptions.from_values(cfg.options)
    plain = vit(cfg, spec)  # the same ViT `vit` builds, `--pretrained` weights loaded before the sites go in
    return TimmAdapterBackbone(plain.model, spec.image_shape, o.vit_adapter_size)
