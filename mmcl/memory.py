"""Rehearsal memory holding references (task id, row index) into the tasks' train splits.

References instead of copies: a memory is a few integers, saved as JSON in checkpoints,
and identical on every process because selection only uses a seeded generator over
the whole task (not each rank's shard), so the budget is the global one.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from mmcl.options import Options, option


@dataclass
class MemoryOptions(Options):
    """The rehearsal budget, shared by every approach with a memory."""

    title = "memory options"
    memory_size: int = option(200, "rehearsal memory size in examples (global across processes)")

    def validate(self) -> None:
        if self.memory_size < 0:
            raise ValueError(f"--memory_size must be >= 0, got {self.memory_size}")


class Memory:
    strategies = ("reservoir", "class_balanced")

    def __init__(self, size: int, strategy: str = "reservoir", seed: int = 0) -> None:
        if size < 0:
            raise ValueError(f"--memory_size must be >= 0, got {size}")
        if strategy not in self.strategies:
            raise ValueError(f"--buffer must be one of {self.strategies}, got '{strategy}'")
        self.size = size
        self.strategy = strategy
        self.seed = seed
        self.items: list[tuple[int, int, int]] = []  # (task_id, row, class key)
        self.seen = 0  # examples offered so far (reservoir)

    def __len__(self) -> int:
        return len(self.items)

    def add_task(self, task_id: int, labels: list[int], order: list[int] | None = None) -> None:
        """Offer every example of a task once; `labels` are class keys (global per scenario).

        `order` (class_balanced only): rows in order of preference, e.g. `herding_order` per class;
        each class keeps the first rows of it that fit its share. Default: a seeded random order."""
        rng = np.random.default_rng(self.seed + 1000 * (task_id + 1))
        if order is not None and self.strategy != "class_balanced":
            raise ValueError("a preferred order needs --buffer class_balanced")
        order = rng.permutation(len(labels)) if order is None else np.asarray(order)
        if self.strategy == "reservoir":
            for row in order:
                item = (task_id, int(row), int(labels[row]))
                if len(self.items) < self.size:
                    self.items.append(item)
                else:
                    j = int(rng.integers(0, self.seen + 1))
                    if j < self.size:
                        self.items[j] = item
                self.seen += 1
        else:
            by_class: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
            for it in self.items:
                by_class[it[2]].append(it)
            for row in order:
                by_class[int(labels[row])].append((task_id, int(row), int(labels[row])))
            self.items = self._balance(by_class)

    def _balance(self, by_class: dict[int, list]) -> list[tuple[int, int, int]]:
        """Equal share per class; leftovers go to the classes with most examples."""
        classes = sorted(by_class)
        if not classes or self.size == 0:
            return []
        quota = {c: 0 for c in classes}
        budget = self.size
        while budget > 0:
            open_ = [c for c in classes if quota[c] < len(by_class[c])]
            if not open_:
                break
            share = max(1, budget // len(open_))
            for c in open_:
                take = min(share, len(by_class[c]) - quota[c], budget)
                quota[c] += take
                budget -= take
                if budget == 0:
                    break
        return [it for c in classes for it in by_class[c][: quota[c]]]

    def class_counts(self) -> dict[int, int]:
        counts: dict[int, int] = defaultdict(int)
        for _, _, c in self.items:
            counts[c] += 1
        return dict(counts)

    def sample(self, n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
        if not self.items:
            return []
        picks = rng.choice(len(self.items), size=min(n, len(self.items)), replace=False)
        return [(self.items[i][0], self.items[i][1]) for i in picks]

    def state_dict(self) -> dict:
        return {"size": self.size, "strategy": self.strategy, "seed": self.seed, "seen": self.seen,
                "items": [list(it) for it in self.items]}

    def load_state_dict(self, state: dict) -> None:
        self.size, self.strategy, self.seed = state["size"], state["strategy"], state["seed"]
        self.seen = state["seen"]
        self.items = [tuple(it) for it in state["items"]]


def herding_order(features: "torch.Tensor", k: int | None = None) -> list[int]:
    """Herding (Welling 2009, as in iCaRL and DyTox): greedily pick the example that brings the mean of
    the picked ones closest to the class mean. `features` (n, d) of one class; returns k row indices."""
    import torch

    x = torch.nn.functional.normalize(features.float(), dim=1)
    target = x.mean(0)
    k = len(x) if k is None else min(k, len(x))
    picked: list[int] = []
    total = torch.zeros_like(target)
    available = torch.ones(len(x), dtype=torch.bool)
    for i in range(k):
        # distance of the running mean to the class mean if each candidate were added next
        dist = ((total[None] + x) / (i + 1) - target[None]).norm(dim=1)
        dist[~available] = float("inf")
        j = int(dist.argmin())
        picked.append(j)
        available[j] = False
        total += x[j]
    return picked
