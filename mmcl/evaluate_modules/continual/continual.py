"""Continual-learning metrics of an accuracy matrix, as an `evaluate` metric module.

    import evaluate, mmcl.metrics
    continual = evaluate.load(mmcl.metrics.EVALUATE_MODULE)        # a local path: works offline
    continual.compute(accuracy_row=R, baseline=b)                   # R[t][u]: task u tested after task t, %

Each example is one row of the matrix, in order (`add(accuracy_row=...)` after each task works too). The
result holds ACC (final average accuracy), BWT, FWT (with `baseline`, the untrained model's accuracy on each
task), forgetting and AIA, and the sample-weighted ACC and AIA with `examples` (each task's test size);
undefined values are None. The definitions are mmcl's (docs/metrics.md), computed by the very function mmcl's
own reports use (`mmcl.metrics.continual_summary`), so the two never disagree.
"""
import datasets
import evaluate
import mmcl.metrics

_CITATION = """\
@inproceedings{lopezpaz2017gem,
  title={Gradient Episodic Memory for Continual Learning},
  author={Lopez-Paz, David and Ranzato, Marc'Aurelio},
  booktitle={NeurIPS},
  year={2017}
}
"""

_DESCRIPTION = __doc__

_KWARGS_DESCRIPTION = """
Args:
    accuracy_row: the rows of a T x T accuracy matrix (in %), row t = every task tested after training task t.
    baseline: optional, T accuracies of the untrained model (FWT needs it).
    examples: optional, T test-set sizes (the sample-weighted ACC and AIA need them).
Returns:
    acc_final, bwt, fwt, forgetting, aia, acc_final_weighted, aia_weighted (None where undefined).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Continual(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"accuracy_row": datasets.Sequence(datasets.Value("float64"))}),
            reference_urls=["https://arxiv.org/abs/1706.08840"],
        )

    def _compute(self, accuracy_row, baseline=None, examples=None):
        return mmcl.metrics.continual_summary(accuracy_row, baseline, examples)
