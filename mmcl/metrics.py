"""Accuracy / macro-F1 matrices and the continual-learning scalars derived from them.

Convention: ``R[t, u]`` is the test accuracy (percent) on task ``u`` after training task ``t``.
The scalar definitions follow docs/metrics.md to the letter, because ambiguous
or slightly different definitions are what make published numbers impossible to compare.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = [
    "AccuracyMatrix",
    "accuracy_and_macro_f1",
    "average_accuracy",
    "average_incremental_accuracy",
    "weighted_accuracy",
    "weighted_incremental_accuracy",
    "backward_transfer",
    "forgetting",
    "forward_transfer",
    "continual_summary",
    "EVALUATE_MODULE",
]


# -- pure functions on a complete square matrix ------------------------------------------------

def _square(R: Any) -> np.ndarray:
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"expected a non-empty square accuracy matrix, got shape {R.shape}")
    if not np.all(np.isfinite(R)):
        # A NaN here means a row was never evaluated; silently ignoring it would bias every scalar.
        raise ValueError("accuracy matrix has missing (NaN) entries; use its leading block of finished rows")
    return R


def average_accuracy(R: Any) -> float:
    """ACC: mean accuracy over all tasks after the last task."""
    R = _square(R)
    return float(R[-1].mean())


def backward_transfer(R: Any) -> float | None:
    """BWT: mean over u < T-1 of R[T-1, u] - R[u, u]; None for a single task (undefined)."""
    R = _square(R)
    T = R.shape[0]
    if T < 2:
        return None
    u = np.arange(T - 1)
    return float(np.mean(R[T - 1, u] - R[u, u]))


def forward_transfer(R: Any, b: Any) -> float | None:
    """FWT: mean over u > 0 of R[u-1, u] - b[u]; None for a single task or an unknown b[u], u > 0.

    b[0] is never used, so it may be NaN.
    """
    R = _square(R)
    T = R.shape[0]
    b = np.asarray(b, dtype=float).reshape(-1)
    if b.shape[0] != T:
        raise ValueError(f"baseline has {b.shape[0]} entries for {T} tasks")
    if T < 2 or not np.all(np.isfinite(b[1:])):
        return None
    u = np.arange(1, T)
    return float(np.mean(R[u - 1, u] - b[u]))


def forgetting(R: Any) -> float | None:
    """Forgetting (Chaudhry et al. 2018): mean over u < T-1 of max_{u <= t < T-1} R[t, u] - R[T-1, u].

    The max starts at the row where task u was learned: a score on a task not yet trained
    cannot be forgotten. None for a single task.
    """
    R = _square(R)
    T = R.shape[0]
    if T < 2:
        return None
    drops = [R[u : T - 1, u].max() - R[T - 1, u] for u in range(T - 1)]
    return float(np.mean(drops))


def average_incremental_accuracy(R: Any) -> float:
    """AIA (DyTox's "Avg"): mean over t of the mean accuracy on tasks 0..t after task t."""
    R = _square(R)
    return float(np.mean([R[t, : t + 1].mean() for t in range(R.shape[0])]))


def weighted_accuracy(R: Any, n: Any) -> float:
    """Accuracy over all test examples of tasks 0..T-1 after the last task: the tasks' accuracies weighted by
    their test-set sizes `n` (DyTox's and CODA-Prompt's "Last" / final accuracy)."""
    R, n = _square(R), _counts(n, len(R))
    return float(np.dot(R[-1], n) / n.sum())


def weighted_incremental_accuracy(R: Any, n: Any) -> float:
    """AIA with each step's accuracy taken over all test examples of the tasks seen so far (DyTox's "Avg")."""
    R, n = _square(R), _counts(n, len(R))
    return float(np.mean([np.dot(R[t, : t + 1], n[: t + 1]) / n[: t + 1].sum() for t in range(R.shape[0])]))


def continual_summary(R: Any, baseline: Any = None, examples: Any = None) -> dict[str, float | None]:
    """The scalars of a square accuracy matrix: ACC, BWT, FWT (given the untrained model's accuracies
    `baseline`), forgetting, AIA, and the sample-weighted ACC and AIA (given each task's test size `examples`);
    None where undefined. The one place they are computed: every report (`AccuracyMatrix.summary`) and the
    `evaluate` module (`EVALUATE_MODULE`) call it."""
    R = _square(R)
    T = len(R)
    b = np.full(T, np.nan) if baseline is None else baseline
    out: dict[str, float | None] = {
        "acc_final": average_accuracy(R), "bwt": backward_transfer(R), "fwt": forward_transfer(R, b),
        "forgetting": forgetting(R), "aia": average_incremental_accuracy(R),
        "acc_final_weighted": None, "aia_weighted": None}
    n = None if examples is None else np.asarray(examples, dtype=float).reshape(-1)
    if n is not None and np.all(np.isfinite(n)) and np.all(n > 0):  # unknown in metrics.json from before
        out["acc_final_weighted"] = weighted_accuracy(R, n)
        out["aia_weighted"] = weighted_incremental_accuracy(R, n)
    return out


# `evaluate.load(EVALUATE_MODULE)`: the summary above as an `evaluate` metric module (a local file: offline)
EVALUATE_MODULE = str(Path(__file__).with_name("evaluate_modules") / "continual" / "continual.py")


def _counts(n: Any, T: int) -> np.ndarray:
    n = np.asarray(n, dtype=float).reshape(-1)
    if n.shape[0] != T or not np.all(np.isfinite(n)) or np.any(n <= 0):
        raise ValueError(f"expected {T} positive test-set sizes, got {n.tolist()}")
    return n


def accuracy_and_macro_f1(y_true: Any, y_pred: Any, num_classes: int,
                          labels: Sequence[int] | None = None,
                          among: Sequence[int] | None = None) -> tuple[float, float]:
    """(accuracy %, macro-F1 %) from integer labels.

    Macro-F1 averages over `labels` when given (TIL: the task's own classes, as PyContinual);
    over the classes of `among` that occur in y_true or y_pred when that is given (CIL: the classes
    seen so far, so a prediction of another task's class is a false positive of a class in the mean);
    else over the classes present in y_true or y_pred, which is what
    ``sklearn.metrics.f1_score(average="macro")`` does without ``labels``.
    """
    if labels is not None and among is not None:
        raise ValueError("give labels or among, not both")
    y_true = np.asarray(y_true).reshape(-1)
    y_pred = np.asarray(y_pred).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} labels but y_pred has {y_pred.size}")
    if y_true.size == 0:
        raise ValueError("cannot score an empty split")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{name} must hold integer class ids, got dtype {y.dtype}")
        if y.min() < 0 or y.max() >= num_classes:
            raise ValueError(f"{name} has class ids outside [0, {num_classes}): min {y.min()}, max {y.max()}")
    y_true = y_true.astype(np.int64)
    y_pred = y_pred.astype(np.int64)
    hit = y_true == y_pred
    tp = np.bincount(y_true[hit], minlength=num_classes)
    n_true = np.bincount(y_true, minlength=num_classes)
    n_pred = np.bincount(y_pred, minlength=num_classes)
    if labels is None:
        present = (n_true + n_pred) > 0  # denominator 2tp+fp+fn = n_true+n_pred is then never 0
        if among is not None:
            chosen = np.zeros(num_classes, dtype=bool)
            chosen[[c for c in among if 0 <= c < num_classes]] = True
            present &= chosen
    else:
        present = np.zeros(num_classes, dtype=bool)
        present[np.asarray(list(labels), dtype=np.int64)] = True
    denom = n_true[present] + n_pred[present]
    f1 = np.divide(2.0 * tp[present], denom, out=np.zeros(denom.shape), where=denom > 0)
    return float(hit.mean() * 100.0), float(f1.mean() * 100.0)


# -- the matrix a run fills row by row -----------------------------------------------------------

def _nan_matrix(T: int) -> np.ndarray:
    return np.full((T, T), np.nan)


def _to_jsonable(a: np.ndarray | None) -> list | None:
    if a is None:
        return None
    # JSON has no NaN; null keeps metrics.json valid for strict parsers (jq, JavaScript).
    return _nan_to_none(a.tolist())


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _from_jsonable(x: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    try:
        a = np.array(_none_to_nan(x), dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"matrix field '{name}' is not numeric: {e}") from e
    if a.shape != shape:
        raise ValueError(f"matrix field '{name}' has shape {a.shape}, expected {shape}")
    return a


def _none_to_nan(x: Any) -> Any:
    if isinstance(x, list):
        return [_none_to_nan(v) for v in x]
    return np.nan if x is None else x


def _opt_float(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass
class AccuracyMatrix:
    """Accuracy and macro-F1 matrices of a run, in percent, NaN until known.

    Row t = after training task t, column u = tested task u. ``til_acc`` is the task-aware accuracy
    of a CIL run (None otherwise); ``baseline[u]`` is the untrained model's accuracy on task u (for FWT);
    ``examples[u]`` the size of task u's evaluated split (for the sample-weighted averages).
    """

    T: int
    task_names: list[str] = field(default_factory=list)
    acc: np.ndarray | None = None
    f1: np.ndarray | None = None
    til_acc: np.ndarray | None = None
    baseline: np.ndarray | None = None
    examples: np.ndarray | None = None

    def __post_init__(self) -> None:
        T = int(self.T)
        if T < 1:
            raise ValueError(f"an accuracy matrix needs at least one task, got T={self.T}")
        self.T = T
        self.task_names = [str(n) for n in self.task_names] if self.task_names else [f"task{u}" for u in range(T)]
        if len(self.task_names) != T:
            raise ValueError(f"{len(self.task_names)} task names for {T} tasks")
        self.acc = _nan_matrix(T) if self.acc is None else self._checked(self.acc, (T, T), "acc")
        self.f1 = _nan_matrix(T) if self.f1 is None else self._checked(self.f1, (T, T), "f1")
        if self.til_acc is not None:
            self.til_acc = self._checked(self.til_acc, (T, T), "til_acc")
        self.baseline = np.full(T, np.nan) if self.baseline is None else self._checked(self.baseline, (T,), "baseline")
        self.examples = np.full(T, np.nan) if self.examples is None else self._checked(self.examples, (T,), "examples")

    @staticmethod
    def _checked(a: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
        a = np.array(a, dtype=float)  # a copy, so the caller's array is never aliased
        if a.shape != shape:
            raise ValueError(f"{name} has shape {a.shape}, expected {shape}")
        return a

    def set_row(self, t: int, acc_row: Sequence[float], f1_row: Sequence[float],
                til_row: Sequence[float] | None = None) -> None:
        """Record the evaluation of every task after training task t."""
        if not 0 <= t < self.T:
            raise IndexError(f"task index {t} out of range for {self.T} tasks")
        self.acc[t] = self._checked(acc_row, (self.T,), "acc_row")
        self.f1[t] = self._checked(f1_row, (self.T,), "f1_row")
        if til_row is not None:
            if self.til_acc is None:
                self.til_acc = _nan_matrix(self.T)
            self.til_acc[t] = self._checked(til_row, (self.T,), "til_row")

    @property
    def rows_done(self) -> int:
        """Number of consecutive complete rows from row 0 (what a partial run has finished)."""
        complete = np.all(np.isfinite(self.acc), axis=1)
        return int(self.T if complete.all() else np.argmin(complete))

    def to_dict(self) -> dict[str, Any]:
        return {
            "T": self.T,
            "task_names": list(self.task_names),
            "acc": _to_jsonable(self.acc),
            "f1": _to_jsonable(self.f1),
            "til_acc": _to_jsonable(self.til_acc),
            "baseline": _to_jsonable(self.baseline),
            "examples": _to_jsonable(self.examples),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AccuracyMatrix":
        if not isinstance(d, dict) or "T" not in d:
            raise ValueError("not an accuracy-matrix dict (no 'T' key)")
        T = int(d["T"])
        til = d.get("til_acc")
        base, examples = d.get("baseline"), d.get("examples")
        return cls(
            T=T,
            task_names=list(d.get("task_names") or []),
            acc=_from_jsonable(d["acc"], (T, T), "acc") if d.get("acc") is not None else None,
            f1=_from_jsonable(d["f1"], (T, T), "f1") if d.get("f1") is not None else None,
            til_acc=_from_jsonable(til, (T, T), "til_acc") if til is not None else None,
            baseline=_from_jsonable(base, (T,), "baseline") if base is not None else None,
            examples=_from_jsonable(examples, (T,), "examples") if examples is not None else None,
        )

    def summary(self) -> dict[str, Any]:
        """Scalars over the rows done so far: with k rows done, the leading k x k block as if T were k."""
        k = self.rows_done
        out: dict[str, Any] = {
            "tasks_done": k, "num_tasks": self.T,
            "acc_final": None, "macro_f1_final": None, "bwt": None, "fwt": None, "forgetting": None,
            "aia": None, "acc_final_weighted": None, "aia_weighted": None, "acc_per_task_final": [], "macro_f1_per_task_final": [], "til_acc_final": None,
        }
        if k == 0:
            return out
        R = self.acc[:k, :k]
        F = self.f1[:k, :k]
        out.update(continual_summary(R, self.baseline[:k], self.examples[:k]))
        out["macro_f1_final"] = _opt_float(float(np.mean(F[-1])))
        out["acc_per_task_final"] = [float(v) for v in R[-1]]
        out["macro_f1_per_task_final"] = [_opt_float(float(v)) for v in F[-1]]
        if self.til_acc is not None:
            out["til_acc_final"] = _opt_float(float(np.mean(self.til_acc[k - 1, :k])))
        return out

    def group_summary(self, groups: dict[str, Sequence[int]]) -> dict[str, dict[str, Any]]:
        """Per group of tasks (e.g. one modality): ACC and BWT restricted to the group's finished tasks.

        With more than one group, `bwt_while[h]` splits the group's BWT by which group's task was being
        trained: the mean over the group's old tasks u of the sum, over later steps t whose task is in
        group h, of R[t][u] - R[t-1][u]. So bwt = sum over h of bwt_while[h]: e.g. how much the text
        tasks forgot while images were learned, and while the other text tasks were."""
        k = self.rows_done
        out: dict[str, dict[str, Any]] = {}
        for name, tasks in groups.items():
            idx = sorted({int(u) for u in tasks})
            bad = [u for u in idx if not 0 <= u < self.T]
            if bad:
                raise ValueError(f"group '{name}' names tasks {bad} outside 0..{self.T - 1}")
            seen = [u for u in idx if u < k]
            # BWT of the final row needs tasks learned before the final one, as in backward_transfer.
            old = [u for u in seen if u < k - 1]
            out[name] = {
                "tasks": idx,
                "acc_final": float(np.mean(self.acc[k - 1, seen])) if seen else None,
                "bwt": float(np.mean(self.acc[k - 1, old] - self.acc[old, old])) if old else None,
            }
        if len(groups) > 1:
            group_of = {int(u): g for g, tasks in groups.items() for u in tasks}
            for name, tasks in groups.items():
                old = [u for u in sorted({int(u) for u in tasks}) if u < k - 1]
                drift = {h: 0.0 for h in groups}
                for u in old:
                    for t in range(u + 1, k):
                        if t in group_of:
                            drift[group_of[t]] += (self.acc[t, u] - self.acc[t - 1, u]) / len(old)
                out[name]["bwt_while"] = {h: float(v) for h, v in drift.items()} if old else {h: None for h in groups}
        return out
