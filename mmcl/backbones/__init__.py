"""Backbone registry. A backbone embeds one modality's inputs into a feature vector.

Factories take `(cfg: RunConfig, spec: BackboneSpec)` and return a `Backbone`.
Modules import timm / transformers / peft lazily, so listing names stays cheap.
"""
from __future__ import annotations

from mmcl.backbones.base import Backbone, BackboneSpec
from mmcl.registry import Registry

BACKBONES: Registry = Registry("backbone")
BACKBONES.add_loader(lambda: __import__("mmcl.backbones.vision"))
BACKBONES.add_loader(lambda: __import__("mmcl.backbones.text"))
BACKBONES.add_loader(lambda: __import__("mmcl.backbones.dual"))


def check_backbone_name(name: str) -> None:
    """A registered backbone or something that looks like a Hugging Face model (checked at start: a typo
    such as `vitt` gets the registry's did-you-mean error before any data is read)."""
    from mmcl.registry import UnknownNameError

    try:
        BACKBONES.canonical(name)
    except UnknownNameError as e:
        from mmcl.backbones.text import looks_like_hf_model

        if not looks_like_hf_model(name):
            raise UnknownNameError(f"{e} A Hugging Face model is an OWNER/NAME id or a local folder with "
                                   f"config.json.") from None


def build_backbone(cfg, spec: BackboneSpec) -> Backbone:
    """A registered name, or else any Hugging Face model id / local path as a `bert`-style text encoder."""
    from mmcl.registry import UnknownNameError

    try:
        factory = BACKBONES.get(cfg.backbone)
    except UnknownNameError:
        from mmcl.backbones.text import looks_like_hf_model

        if not looks_like_hf_model(cfg.backbone):
            raise
        factory = BACKBONES.get("bert")
        cfg.options["bert_model"] = cfg.backbone
    return factory(cfg, spec)


def backbone_option_classes(name: str, options: dict) -> list[type]:
    """The Options classes a backbone uses: its own, and for a backbone with towers (`dual`) theirs too."""
    from mmcl.registry import UnknownNameError

    try:
        factory = BACKBONES.get(name)
    except UnknownNameError:
        factory = BACKBONES.get("bert")  # a Hugging Face id or folder is a `bert` encoder
    cls = getattr(factory, "Options", None)
    if cls is None:
        return []
    classes = [cls]
    if hasattr(cls, "towers"):
        for tower in cls.from_values(options).towers():
            classes += [c for c in backbone_option_classes(tower, options) if c not in classes]
    return classes


__all__ = ["BACKBONES", "Backbone", "BackboneSpec", "backbone_option_classes", "build_backbone", "check_backbone_name"]
