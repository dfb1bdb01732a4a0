"""Naive continual learning (NCL): fine-tune on each task in turn, no protection against forgetting."""
from mmcl.approaches import APPROACHES
from mmcl.approaches.base import Approach


@APPROACHES.register("finetune", aliases=("ncl",))
class Finetune(Approach):
    name = "finetune"
