"""Testing a learner on one task's split: accuracy, macro-F1 and (CIL) task-aware accuracy, every example
counted once whatever the number of processes."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from mmcl.data.sequence import Scenario, Task
from mmcl.metrics import accuracy_and_macro_f1
from mmcl.stream import hide_task


class TaskScore(NamedTuple):
    acc: float  # %
    macro_f1: float  # %
    til_acc: float | None  # CIL: the same predictions restricted to the task's own classes, %; else None
    examples: int  # evaluated, padding duplicates of the distributed sampler excluded


@torch.inference_mode()  # no autograd bookkeeping at all (cheaper than no_grad); nothing here is trained
def evaluate(approach, loader, task: Task, scenario: Scenario, accelerator,
             seen_classes: Sequence[int] = ()) -> TaskScore:
    """Score `task`'s split. With global labels (CIL), macro-F1 is over the classes seen so far (`seen_classes`
    and the task's own) that occur among the labels or the predictions: a prediction of another task's class
    counts against that class's precision (docs/metrics.md); otherwise over the task's classes, as PyContinual."""
    approach.eval()
    task_id = task.id if scenario.task_id_at_test else None
    hide = (lambda b: b) if scenario.task_boundaries else hide_task  # a task-free learner never sees ids
    preds, labels, til_preds, local = [], [], [], []
    lo = task.class_offset
    for batch in loader:
        with accelerator.autocast():
            logits = approach.predict(hide(batch), task_id).float()
        p = logits.argmax(-1)
        tp = logits[:, lo : lo + task.num_classes].argmax(-1) if scenario.global_labels else p
        p, y, tp, yl = accelerator.gather_for_metrics((p, batch["labels"], tp, batch["local_labels"]))
        preds.append(p.cpu()); labels.append(y.cpu()); til_preds.append(tp.cpu()); local.append(yl.cpu())  # noqa: E702
    approach.train()
    y_true, y_pred = torch.cat(labels).numpy(), torch.cat(preds).numpy()
    own = task.global_classes if scenario.global_labels else range(task.num_classes)
    num_classes = int(max(y_true.max(), y_pred.max(), max(own)) + 1)
    if scenario.global_labels:
        acc, f1 = accuracy_and_macro_f1(y_true, y_pred, num_classes, among=sorted(set(seen_classes) | set(own)))
    else:
        acc, f1 = accuracy_and_macro_f1(y_true, y_pred, num_classes, labels=own)
    til = float((torch.cat(til_preds) == torch.cat(local)).float().mean() * 100) if scenario.global_labels else None
    return TaskScore(acc, f1, til, len(y_true))


class BestEpoch:
    """--select_best: remember the trainable weights of the epoch with the best validation accuracy."""

    def __init__(self, approach) -> None:
        self.approach, self.best, self.state = approach, -1.0, None

    def offer(self, valid_acc: float) -> float:
        if valid_acc > self.best:
            self.best = valid_acc
            self.state = {n: p.detach().clone() for n, p in self.approach.named_parameters() if p.requires_grad}
        return valid_acc

    @torch.no_grad()
    def restore(self) -> None:
        if self.state is not None:
            for n, p in self.approach.named_parameters():
                if n in self.state:
                    p.copy_(self.state[n])
