import json
import os

import numpy as np
import pytest

from mmcl.metrics import (
    AccuracyMatrix,
    accuracy_and_macro_f1,
    average_accuracy,
    average_incremental_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
)
from mmcl.reporting import (
    load_metrics,
    plot_accuracy_matrix,
    results_markdown,
    write_benchmark,
    write_json_atomic,
    write_report,
    write_text_atomic,
)

# R[t, u]: accuracy on task u after training task t.
R3 = np.array([
    [90.0, 20.0, 10.0],
    [70.0, 85.0, 30.0],
    [60.0, 75.0, 80.0],
])
B3 = np.array([10.0, 15.0, 25.0])  # untrained model
F3 = R3 - 5.0  # any F1 matrix; only its last row enters the summary
NAMES = ["a", "b", "c"]

# Worked by hand for R3, B3:
# ACC        = (60 + 75 + 80) / 3                           = 215/3  = 71.666...
# BWT        = mean(60 - 90, 75 - 85) = mean(-30, -10)        = -20
# FWT        = mean(R[0,1] - b1, R[1,2] - b2) = mean(20-15, 30-25) = 5
# forgetting = mean(max(90, 70) - 60, max(85) - 75) = mean(30, 10) = 20  (rows from the task's own on)
# AIA        = mean(90, (70+85)/2, 215/3) = (90 + 77.5 + 71.667)/3 = 1435/18 = 79.722...
ACC3, BWT3, FWT3, FGT3, AIA3 = 215 / 3, -20.0, 5.0, 20.0, 1435 / 18


def full_matrix(til: bool = False) -> AccuracyMatrix:
    m = AccuracyMatrix(3, NAMES)
    m.baseline = B3.copy()
    for t in range(3):
        m.set_row(t, R3[t], F3[t], (R3[t] + 1.0) if til else None)
    return m


# -- pure functions --------------------------------------------------------------------------------

def test_pure_functions_hand_computed():
    assert average_accuracy(R3) == pytest.approx(ACC3)
    assert backward_transfer(R3) == pytest.approx(BWT3)
    assert forward_transfer(R3, B3) == pytest.approx(FWT3)
    assert forgetting(R3) == pytest.approx(FGT3)
    assert average_incremental_accuracy(R3) == pytest.approx(AIA3)


def test_forgetting_ignores_rows_before_the_task_was_learned():
    # Task 1 scored 70 after task 0 (before being trained), 40 after task 1, 35 at the end: only rows
    # from task 1 on count, so 40 - 35 = 5. Task 0: max(80, 75) - 70 = 10. Mean = 7.5 (not 22.5).
    R = np.array([[80.0, 70.0, 0.0], [75.0, 40.0, 0.0], [70.0, 35.0, 90.0]])
    assert forgetting(R) == pytest.approx(7.5)


def test_single_task_and_unknown_baseline():
    R = np.array([[42.0]])
    assert average_accuracy(R) == 42.0
    assert average_incremental_accuracy(R) == 42.0
    assert backward_transfer(R) is None and forgetting(R) is None and forward_transfer(R, [np.nan]) is None
    assert forward_transfer(R3, [np.nan, 15.0, np.nan]) is None
    # b_0 is never used.
    assert forward_transfer(R3, [np.nan, 15.0, 25.0]) == pytest.approx(FWT3)


def test_pure_functions_reject_incomplete_or_non_square():
    with pytest.raises(ValueError, match="NaN"):
        average_accuracy(np.array([[1.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="square"):
        backward_transfer(np.ones((2, 3)))


# -- AccuracyMatrix ----------------------------------------------------------------------------------

def test_summary_full_run():
    s = full_matrix().summary()
    assert s["tasks_done"] == 3 and s["num_tasks"] == 3
    assert s["acc_final"] == pytest.approx(ACC3)
    assert s["macro_f1_final"] == pytest.approx(ACC3 - 5.0)
    assert s["bwt"] == pytest.approx(BWT3)
    assert s["fwt"] == pytest.approx(FWT3)
    assert s["forgetting"] == pytest.approx(FGT3)
    assert s["aia"] == pytest.approx(AIA3)
    assert s["acc_per_task_final"] == [60.0, 75.0, 80.0]
    assert s["til_acc_final"] is None


def test_summary_partial_uses_leading_block():
    m = AccuracyMatrix(3, NAMES, baseline=B3)
    assert m.rows_done == 0
    s = m.summary()
    assert s["tasks_done"] == 0 and s["acc_final"] is None and s["acc_per_task_final"] == []

    m.set_row(0, R3[0], F3[0])
    s = m.summary()
    assert m.rows_done == 1
    assert s["acc_final"] == 90.0 and s["aia"] == 90.0
    assert s["bwt"] is None and s["fwt"] is None and s["forgetting"] is None

    m.set_row(1, R3[1], F3[1])
    # Block [[90, 20], [70, 85]]: ACC 77.5, BWT 70-90 = -20, FWT 20-15 = 5, forgetting 90-70 = 20,
    # AIA (90 + 77.5)/2 = 83.75. Column 2 (unseen task) must not leak into ACC.
    s = m.summary()
    assert s["tasks_done"] == 2
    assert s["acc_final"] == pytest.approx(77.5)
    assert s["bwt"] == pytest.approx(-20.0)
    assert s["fwt"] == pytest.approx(5.0)
    assert s["forgetting"] == pytest.approx(20.0)
    assert s["aia"] == pytest.approx(83.75)
    assert s["acc_per_task_final"] == [70.0, 85.0]


def test_rows_done_stops_at_first_gap():
    m = AccuracyMatrix(3, NAMES)
    m.set_row(0, R3[0], F3[0])
    m.set_row(2, R3[2], F3[2])
    assert m.rows_done == 1


def test_set_row_validates():
    m = AccuracyMatrix(3, NAMES)
    with pytest.raises(IndexError):
        m.set_row(3, R3[0], F3[0])
    with pytest.raises(ValueError, match="shape"):
        m.set_row(0, [1.0, 2.0], F3[0])


def test_til_matrix_created_on_demand_and_summarised():
    s = full_matrix(til=True).summary()
    assert s["til_acc_final"] == pytest.approx(ACC3 + 1.0)


def test_dict_round_trip_with_nan_through_strict_json():
    m = AccuracyMatrix(3, NAMES, baseline=[np.nan, 15.0, 25.0])
    m.set_row(0, R3[0], F3[0], R3[0])
    d = m.to_dict()
    assert d["acc"][1] == [None, None, None] and d["baseline"][0] is None
    text = json.dumps(d, allow_nan=False)  # raises if any NaN slipped through
    back = AccuracyMatrix.from_dict(json.loads(text))
    assert back.T == 3 and back.task_names == NAMES
    for name in ("acc", "f1", "til_acc", "baseline"):
        np.testing.assert_array_equal(getattr(back, name), getattr(m, name))  # NaN == NaN here
    assert AccuracyMatrix.from_dict(AccuracyMatrix(2).to_dict()).til_acc is None


def test_from_dict_rejects_wrong_shape():
    d = full_matrix().to_dict()
    d["acc"] = d["acc"][:2]
    with pytest.raises(ValueError, match="acc"):
        AccuracyMatrix.from_dict(d)


def test_group_summary():
    g = full_matrix().group_summary({"text": [0, 2], "image": [1]})
    # text: ACC mean(60, 80) = 70; BWT only over tasks before the last: 60 - 90 = -30.
    assert g["text"]["acc_final"] == pytest.approx(70.0) and g["text"]["bwt"] == pytest.approx(-30.0)
    # image: ACC 75; BWT 75 - 85 = -10.
    assert g["image"]["acc_final"] == pytest.approx(75.0) and g["image"]["bwt"] == pytest.approx(-10.0)


# -- accuracy and macro-F1 ------------------------------------------------------------------------

def test_accuracy_and_macro_f1_hand_computed():
    # Hits at positions 0, 2, 3 -> 3/5 = 60 %. Classes present: 0, 1, 2 (true), 3 (predicted only).
    # F1 = 2tp / (n_true + n_pred): c0 2*1/(2+1) = 2/3, c1 2*2/(2+3) = 4/5, c2 0, c3 0.
    # Macro = (2/3 + 4/5) / 4 = 11/30 = 36.667 %.
    acc, f1 = accuracy_and_macro_f1(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 3]), num_classes=5)
    assert acc == pytest.approx(60.0)
    assert f1 == pytest.approx(1100 / 30)


@pytest.mark.parametrize("seed", range(5))
def test_macro_f1_matches_sklearn(seed):
    from sklearn.metrics import accuracy_score, f1_score

    rng = np.random.default_rng(seed)
    n, c = 200, 7
    y_true = rng.integers(0, c - 2, n)  # classes 5, 6 never true
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, c - 1, n))  # 5 may be predicted, 6 never
    acc, f1 = accuracy_and_macro_f1(y_true, y_pred, num_classes=c)
    assert acc == pytest.approx(accuracy_score(y_true, y_pred) * 100)
    assert f1 == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0.0) * 100)


def test_accuracy_and_macro_f1_validates():
    with pytest.raises(ValueError, match="labels"):
        accuracy_and_macro_f1(np.array([0, 1]), np.array([0]), 2)
    with pytest.raises(ValueError, match="outside"):
        accuracy_and_macro_f1(np.array([0, 2]), np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="empty"):
        accuracy_and_macro_f1(np.array([], dtype=int), np.array([], dtype=int), 2)


# -- atomic writes --------------------------------------------------------------------------------

def test_write_json_atomic_failure_keeps_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"x": np.float32(1.5), "y": np.arange(2), "z": float("nan")})
    assert json.loads(path.read_text()) == {"x": 1.5, "y": [0, 1], "z": None}
    old = path.read_text()
    with pytest.raises(TypeError):
        write_json_atomic(path, {"x": object()})
    assert path.read_text() == old
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_write_text_atomic_failure_during_replace_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "results.md"
    write_text_atomic(path, "old")

    def boom(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        write_text_atomic(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["results.md"]
    assert (path.stat().st_mode & 0o777) == 0o644


def test_write_benchmark_writes_both_files_and_keeps_them_on_a_bad_result(tmp_path):
    out = tmp_path / "bench" / "nested"  # created on demand
    stem = write_benchmark(out, "bench_x", {"rows": [{"step_s": np.float64(0.25)}]}, "| a |\n")
    assert stem == out / "bench_x"
    assert json.loads((out / "bench_x.json").read_text()) == {"rows": [{"step_s": 0.25}]}
    assert (out / "bench_x.md").read_text() == "| a |\n"
    with pytest.raises(TypeError):
        write_benchmark(out, "bench_x", {"rows": object()}, "| b |\n")
    assert json.loads((out / "bench_x.json").read_text()) == {"rows": [{"step_s": 0.25}]}
    assert (out / "bench_x.md").read_text() == "| a |\n"  # the JSON failed first: the table is untouched too
    assert sorted(os.listdir(out)) == ["bench_x.json", "bench_x.md"]


# -- report ------------------------------------------------------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_full_and_partial(tmp_path):
    for name, m in (("full.png", full_matrix()), ("empty.png", AccuracyMatrix(3, NAMES))):
        path = tmp_path / name
        plot_accuracy_matrix(m, path)
        assert path.stat().st_size > 1000
        assert path.read_bytes()[:8] == PNG_MAGIC
    assert sorted(os.listdir(tmp_path)) == ["empty.png", "full.png"]


def test_results_markdown_contains_numbers():
    m = full_matrix(til=True)
    m.acc[2, 1] = np.nan  # an unknown cell renders as a dash; summary then covers 2 finished rows
    md = results_markdown(m, "toy run", {"task_sequence": "toy", "backbone": "vit", "approach": "ewc",
                                         "scenario": "cil", "minutes": 1.25, "classes": [["x"] * 500]},
                          groups={"text": [0, 2], "image": [1]})
    assert md.startswith("# toy run")
    assert "**Backbone**: vit" in md and "**Approach**: ewc" in md and "**Minutes (training)**: 1.25" in md
    assert "x, x" not in md  # long containers in meta are not dumped
    assert "| after 0: a | 90.00 | 20.00 | 10.00 |" in md
    assert "| after 2: c | 60.00 | — | 80.00 |" in md
    assert "| untrained (b) | 10.00 | 15.00 | 25.00 |" in md
    assert "`acc_final` | 77.50" in md and "`bwt` | -20.00" in md and "`aia` | 83.75" in md
    assert "Task-aware accuracy matrix" in md and "| after 0: a | 91.00 |" in md
    assert "Macro-F1 matrix" in md and "| after 0: a | 85.00 |" in md
    assert "| image | b |" in md


def test_write_report_and_load_metrics(tmp_path):
    run = tmp_path / "run"
    meta = {"task_sequence": "toy", "backbone": "vit", "approach": "finetune", "scenario": "til",
            "modalities": ["text", "image", "text"], "minutes": 0.5}
    write_report(run, full_matrix(), meta)
    assert sorted(os.listdir(run)) == ["accuracy_matrix.png", "metrics.json", "results.md"]
    doc = json.loads((run / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert doc["summary"]["acc_final"] == pytest.approx(ACC3) and doc["meta"] == meta
    assert doc["group_summary"]["text"]["bwt"] == pytest.approx(-30.0)  # grouped by modality automatically
    assert "71.67" in (run / "results.md").read_text()
    assert (run / "accuracy_matrix.png").read_bytes()[:8] == PNG_MAGIC

    matrix, meta_back = load_metrics(run)
    assert meta_back == meta
    np.testing.assert_array_equal(matrix.acc, R3)
    assert matrix.summary() == full_matrix().summary()


def test_load_metrics_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        load_metrics(tmp_path)
    (tmp_path / "metrics.json").write_text("{ truncated")
    with pytest.raises(ValueError, match="metrics.json"):
        load_metrics(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"summary": {}}))
    with pytest.raises(ValueError, match="metrics.json.*matrix"):
        load_metrics(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"matrix": {"T": 2, "acc": [[1, 2]]}}))
    with pytest.raises(ValueError, match="metrics.json.*shape"):
        load_metrics(tmp_path)


def test_macro_f1_over_given_labels_counts_foreign_predictions_as_misses():
    from sklearn.metrics import f1_score

    y_true = np.array([4, 4, 5, 5, 5, 4])
    y_pred = np.array([4, 0, 5, 9, 5, 4])  # two predictions of classes from other tasks
    acc, f1 = accuracy_and_macro_f1(y_true, y_pred, num_classes=10, labels=[4, 5])
    assert acc == pytest.approx(400 / 6)
    assert f1 == pytest.approx(100 * f1_score(y_true, y_pred, labels=[4, 5], average="macro"))
    _, f1_union = accuracy_and_macro_f1(y_true, y_pred, num_classes=10)
    assert f1_union < f1  # the union counts classes 0 and 9 with F1 = 0


def test_compare_tabulates_finished_run_directories(tmp_path):
    import sys
    from pathlib import Path

    from conftest import synthetic_image_sequence, tiny_config
    from mmcl.engine import Engine

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from compare import markdown_table, rows_from_runs

    dirs = []
    for baseline in ("finetune", "replay"):
        engine = Engine(tiny_config(tmp_path, baseline=baseline, scenario="cil", num_train_epochs=1, run_name=baseline,
                                    save_checkpoints=False), sequence=synthetic_image_sequence(num_tasks=2))
        matrix = engine.run()
        dirs.append(str(engine.run_dir))
    rows = rows_from_runs(dirs)
    assert [r["baseline"] for r in rows] == ["finetune", "replay"]
    assert rows[1]["acc_final"] == pytest.approx(matrix.summary()["acc_final"])
    table = markdown_table("t", [], rows)
    assert table.count("\n| ") == 3 and "| replay |" in table
    weighted = f"{rows[1]['acc_final_weighted']:.2f}"  # the two tasks' test sets are equal: it equals ACC
    assert weighted == f"{rows[1]['acc_final']:.2f}" and f"| {weighted} |" in table.splitlines()[-1]
    with pytest.raises(ValueError, match="different splits"):
        markdown_table("t", [], [rows[0], {**rows[1], "eval_split": "valid"}])
    assert "**valid** split" in markdown_table("t", [], [{**r, "eval_split": "valid"} for r in rows])
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        rows_from_runs([str(tmp_path / "nowhere")])
    import json

    failed = Path(dirs[0]) / "metrics.json"
    doc = json.loads(failed.read_text())
    failed.write_text(json.dumps({**doc, "status": "failed", "summary": None,
                                  "meta": {**doc["meta"], "failure": {"message": "non-finite loss (nan)"}}}))
    with pytest.raises(ValueError, match=r"the run is failed \(non-finite loss \(nan\)\)"):
        rows_from_runs(dirs)
