"""The continual-learning metrics as an `evaluate` module: loaded offline from its path in the package, it
gives a finished run's metrics.json summary exactly (both call mmcl.metrics.continual_summary)."""
import json

import evaluate
import pytest

from conftest import synthetic_image_sequence, tiny_config
from mmcl.engine import Engine
from mmcl.metrics import EVALUATE_MODULE

KEYS = ("acc_final", "bwt", "fwt", "forgetting", "aia", "acc_final_weighted", "aia_weighted")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    engine = Engine(tiny_config(tmp, num_train_epochs=1), sequence=synthetic_image_sequence(3, n_train=32, n_test=16))
    engine.run()
    return json.loads((engine.run_dir / "metrics.json").read_text())


def test_evaluate_module_equals_the_runs_summary_offline(finished_run, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    matrix, summary = finished_run["matrix"], finished_run["summary"]
    assert summary["fwt"] is not None  # TIL: the untrained baseline is known, so every scalar is defined
    continual = evaluate.load(EVALUATE_MODULE)
    result = continual.compute(accuracy_row=matrix["acc"], baseline=matrix["baseline"], examples=matrix["examples"])
    assert {k: result[k] for k in KEYS} == {k: summary[k] for k in KEYS}
    for row in matrix["acc"]:  # one row after each task, as a run produces them
        continual.add(accuracy_row=row)
    assert continual.compute(baseline=matrix["baseline"], examples=matrix["examples"])["bwt"] == summary["bwt"]


def test_without_baseline_or_sizes_those_scalars_are_none(finished_run):
    result = evaluate.load(EVALUATE_MODULE).compute(accuracy_row=finished_run["matrix"]["acc"])
    assert result["fwt"] is None and result["acc_final_weighted"] is None and result["aia_weighted"] is None
    assert result["acc_final"] == finished_run["summary"]["acc_final"]


def test_a_matrix_that_is_not_square_is_refused():
    with pytest.raises(ValueError, match="square"):
        evaluate.load(EVALUATE_MODULE).compute(accuracy_row=[[50.0, 40.0]])
