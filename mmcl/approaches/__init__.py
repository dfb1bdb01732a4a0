"""Approach registry: one file per method, one `@APPROACHES.register` line each."""
from __future__ import annotations

import importlib

from mmcl.approaches.base import Approach, Progress
from mmcl.registry import Registry

APPROACHES: Registry[type[Approach]] = Registry("approach", flag="baseline")

_MODULES = ("finetune", "joint", "one", "replay", "ewc", "lwf", "hat", "ctr", "dytox", "coda_prompt", "l2p", "dualprompt",
            "online", "levit")
for _name in _MODULES:
    APPROACHES.add_loader(lambda n=_name: importlib.import_module(f"mmcl.approaches.{n}"))

__all__ = ["APPROACHES", "Approach", "Progress"]
