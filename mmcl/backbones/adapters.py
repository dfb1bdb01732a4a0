"""Adapter sites shared by the adapter backbones (`bert_adapter`, `vit_adapter`): bottleneck adapters after
a frozen dense layer, and the plug-in protocol HAT and CTR use to put their masked modules there."""
from __future__ import annotations

import torch
from torch import nn


class Adapter(nn.Module):
    """Bottleneck adapter (Houlsby et al. 2019): h + up(act(down(h))), starting as the identity."""

    def __init__(self, hidden: int, size: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, size)
        self.up = nn.Linear(size, hidden)
        self.act = nn.GELU()
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # identity at start: the frozen model's features are kept
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


class PyContinualAdapter(nn.Module):
    """PyContinual's `BertAdapter`: h + relu(fc2(relu(fc1(h)))), `nn.Linear`'s default initialisation.

    Unlike Houlsby's it does not start as the identity: the frozen model's features are perturbed from
    the first step (`--bert_adapter_form pycontinual`)."""

    def __init__(self, hidden: int, size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, size)
        self.fc2 = nn.Linear(size, hidden)
        self.act = nn.ReLU()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.act(self.fc2(self.act(self.fc1(h))))


ADAPTER_FORMS = {"houlsby": Adapter, "pycontinual": PyContinualAdapter}


class AdapterSite(nn.Module):
    """A frozen dense layer followed by a swappable plug-in (an `Adapter` by default).

    Sits in place of the dense layer that ends a transformer block's attention and its MLP: in BERT
    before the residual LayerNorm (where PyContinual puts adapters and CTR/HAT their plug-ins), in a
    timm ViT block before the residual addition.
    """

    def __init__(self, dense: nn.Linear, plugin: nn.Module, layer: int, kind: str) -> None:
        super().__init__()
        self.dense = dense
        self.plugin = plugin
        self.layer = layer
        self.kind = kind  # "attention" or "ffn"

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.plugin(self.dense(hidden))


class AdapterSites:
    """Mixin of a backbone whose frozen layers carry swappable plug-ins (`AdapterSite`s): HAT and CTR find
    `sites`, replace the plug-ins with `set_plugins` and (un)freeze `layer_norm_parameters`."""

    sites: list[AdapterSite]
    adapter_size: int

    def set_plugins(self, factory) -> None:
        """Replace every site's plug-in by `factory(site)`."""
        for site in self.sites:
            site.plugin = factory(site)

    def layer_norm_parameters(self) -> list[nn.Parameter]:
        """The normalisation layers that train with the adapters (HAT's `--no-hat_train_layernorm` freezes them)."""
        raise TypeError(f"{type(self).__name__} must define layer_norm_parameters()")
