"""Transformer backbones whose layers a method can run itself: prompts inside self-attention, extra tokens,
token outputs for DyTox's task attention. One interface for ViTs and BERT-family encoders.

A backbone that is a `TokenEncoder` says how to embed its inputs into tokens, how to run layer i (with an
optional prefix: extra keys and values concatenated in front of the tokens' own inside self-attention, so
a prompt changes what every token attends to without adding output tokens), how to finish (a final norm)
and how it pools. `encode_tokens` composes them, inserting extra tokens after the lead tokens ([CLS]) when
asked (L2P's prompt tuning) and extending the key mask over them. Methods (mmcl/approaches/prompting.py,
dytox.py) use only this interface, so a new transformer backbone needs only these methods.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Prefix = tuple[torch.Tensor, torch.Tensor]  # (keys, values), each (B, length, embed_dim)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
           prefix: Prefix | None, dropout: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """Multi-head attention of q, k, v (B, heads, N, head_dim), with prefix keys/values (B, P, D) in front.

    `key_mask` (B, N) is True for real tokens (False: padding); prefix positions are always visible."""
    B, h, _, hd = k.shape
    if prefix is not None:
        pk, pv = (p.reshape(B, -1, h, hd).transpose(1, 2).to(q.dtype) for p in prefix)
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        if key_mask is not None:
            key_mask = torch.cat([key_mask.new_ones(B, pk.shape[2]), key_mask], dim=1)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)


class TokenEncoder:
    """Mixin for a `Backbone` that is a stack of transformer layers over tokens.

    A subclass defines `token_dim`, `lead_tokens` (tokens before the content, e.g. 1 for [CLS]),
    `supports_prefix`, `num_token_layers`, `num_heads` and the four methods below; one it lacks raises a
    TypeError naming it, as `Backbone`'s required methods do (nn.Module cannot also be an ABC here)."""

    token_dim: int = 0
    lead_tokens: int = 0
    supports_tokens: bool = True  # False where a backbone class only sometimes is one (a timm CNN)
    supports_prefix: bool = True
    supports_insert: bool = True  # extra tokens between the lead tokens and the content (L2P)

    @property
    def num_token_layers(self) -> int:
        raise TypeError(f"{type(self).__name__} must define num_token_layers (a TokenEncoder)")

    @property
    def num_heads(self) -> int:
        """Attention heads of the layers (DyTox's task-attention block takes as many)."""
        raise TypeError(f"{type(self).__name__} must define num_heads (a TokenEncoder)")

    def embed_tokens(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tokens (B, N, D) before the first layer, key mask (B, N) bool or None when nothing is padding)."""
        raise TypeError(f"{type(self).__name__} must define embed_tokens (a TokenEncoder)")

    def run_token_layer(self, i: int, x: torch.Tensor, key_mask: torch.Tensor | None,
                        prefix: Prefix | None = None) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} must define run_token_layer (a TokenEncoder)")

    def finish_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """What follows the last layer (a final norm); the identity by default."""
        return x

    def pool_tokens(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """The backbone's own pooling of finished tokens into (B, D) features."""
        raise TypeError(f"{type(self).__name__} must define pool_tokens (a TokenEncoder)")

    def encode_tokens(self, inputs: dict, prefixes: dict[int, Prefix] | None = None,
                      insert: torch.Tensor | None = None, depth: int | None = None,
                      finish: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Output tokens and key mask; prefixes by layer index; `insert` (B, P, D) goes right after the lead
        tokens (no position embedding); only the first `depth` layers run when given (DyTox's encoder)."""
        x, mask = self.embed_tokens(inputs)
        if insert is not None and not self.supports_insert:
            raise ValueError(f"{type(self).__name__} cannot take extra tokens")
        if insert is not None:
            n = self.lead_tokens
            x = torch.cat([x[:, :n], insert.to(x.dtype), x[:, n:]], dim=1)
            if mask is not None:
                mask = torch.cat([mask[:, :n], mask.new_ones(mask.shape[0], insert.shape[1]), mask[:, n:]], dim=1)
        prefixes = prefixes or {}
        if prefixes and not self.supports_prefix:
            raise ValueError(f"{type(self).__name__} cannot take prompts inside its attention")
        for i in range(self.num_token_layers if depth is None else depth):
            x = self.run_token_layer(i, x, mask, prefixes.get(i))
        return (self.finish_tokens(x) if finish else x), mask


def token_encoder(backbone, flag: str = "--backbone", prefix: bool = False, insert: bool = False) -> TokenEncoder:
    """`backbone` if it is a TokenEncoder (taking prefixes / extra tokens when asked), else an error naming the
    flag."""
    if not (isinstance(backbone, TokenEncoder) and backbone.supports_tokens):
        raise ValueError(f"{flag}: this method runs the layers of a transformer encoder itself; "
                         f"{type(backbone).__name__} is not one (use vit, bert, bert_frozen or a Hugging Face "
                         f"BERT-family id)")
    if prefix and not backbone.supports_prefix:
        raise ValueError(f"{flag}: prompts go inside self-attention, and {type(backbone).__name__}'s blocks have "
                         f"no standard attention to put them in (use vit, bert, bert_frozen or a Hugging Face "
                         f"BERT-family id; convit's gated positional attention is not supported)")
    if insert and not backbone.supports_insert:
        raise ValueError(f"{flag}: prompt tokens go between [CLS] and the content, and {type(backbone).__name__} "
                         f"cannot take extra tokens (use vit, bert, bert_frozen or a Hugging Face BERT-family id; "
                         f"convit's gated positional attention has one position per patch)")
    return backbone
