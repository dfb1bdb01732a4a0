"""Multi-task learning on all data seen so far (MTL), the usual upper bound."""
from mmcl.approaches import APPROACHES
from mmcl.approaches.base import Approach
from mmcl.data.sequence import Task


@APPROACHES.register("joint", aliases=("mtl",))
class Joint(Approach):
    name = "joint"

    def train_dataset(self, task: Task):
        from datasets import concatenate_datasets

        return concatenate_datasets([t.train for t in self.seq.tasks[: task.id + 1]])
