"""--report_to: Accelerate's trackers get the run's steps, accuracy rows, summary and figure (TensorBoard read
back with its own event reader); a tracker whose package is missing is an error naming the package."""
import json

import pytest

import mmcl.trackers as trackers
from mmcl.cli import main

RUN = ["run", "--task", "split_digits", "--backbone", "vit", "--baseline", "replay", "--scenario", "cil",
       "--ntasks", "2", "--max_train_per_task", "64", "--num_train_epochs", "1", "--vit_embed_dim", "32",
       "--vit_depth", "1", "--vit_heads", "2", "--memory_size", "20", "--no-progress"]


def test_tensorboard_gets_steps_task_accuracies_the_summary_and_the_matrix(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main([*RUN, "--report_to", "tensorboard", "--output_dir", str(tmp_path), "--run_name", "r"]) == 0
    run = tmp_path / "r"
    events = list(run.rglob("events.out.tfevents.*"))
    assert events and all(run in e.parents for e in events)
    acc = EventAccumulator(str(events[0].parent), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    metrics = json.loads((run / "metrics.json").read_text())
    final = acc.Scalars("summary/acc_final")[-1]
    assert final.value == pytest.approx(metrics["summary"]["acc_final"], abs=1e-4)
    task_tags = sorted(t for t in scalars if t.startswith("accuracy/") and t[len("accuracy/")].isdigit())
    assert len(task_tags) == 2, scalars  # one per task
    row = [acc.Scalars(t)[-1].value for t in task_tags]  # after the last task: the matrix's last row
    assert row == pytest.approx(metrics["matrix"]["acc"][-1], abs=1e-4)
    steps = acc.Scalars("train/loss")
    assert len(steps) == 2 * 2 and steps[-1].step == 4  # 64 examples in batches of 32, two tasks
    assert "accuracy_matrix" in acc.Tags()["images"]


def test_a_missing_tracker_package_is_an_error_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trackers, "installed", lambda package: package != "tensorboard")
    code = main([*RUN, "--report_to", "tensorboard", "--output_dir", str(tmp_path), "--run_name", "r"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install tensorboard" in err and "mmcl[tensorboard]" in err, err
    assert not (tmp_path / "r").exists()


def test_none_and_all():
    assert trackers.tracker_names("none") == [] and trackers.tracker_names(None) == []
    assert "tensorboard" in trackers.tracker_names("all")  # installed with the dev extra
    with pytest.raises(ValueError, match="unknown tracker"):
        trackers.tracker_names("tensorbord")
