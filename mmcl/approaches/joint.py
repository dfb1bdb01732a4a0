"""Multi-task learning on all data seen so far (MTL), the usual upper bound."""
from mmcl.approaches import APPROACHES
from mmcl.approaches.base import Approach
from mmcl.data.sequence import Task


@APPROACHES.register("joint", aliases=("mtl",))
class Joint(Approach):
    name = "joint"

    def train_dataset(self, task: Task):
        from datasets import concatenate_datasets

        from mmcl.data.mixed import ModalityGroups

        by_modality: dict[str, list] = {}
        for t in self.seq.tasks[: task.id + 1]:
            by_modality.setdefault(t.modality, []).append(t.train)
        parts = {m: concatenate_datasets(ds) for m, ds in by_modality.items()}
        if len(parts) == 1:
            return next(iter(parts.values()))
        # text and image rows have different columns and towers: batches of one modality each
        return ModalityGroups(parts)
