"""The run loop end to end on small data: files, resume, reports, CLI."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import ROOT, synthetic_image_sequence, tiny_config
from mmcl.engine import Engine
from mmcl.engine_errors import CheckpointError


def run(tmp_path, **kw):
    cfg = tiny_config(tmp_path, **kw)
    engine = Engine(cfg, sequence=synthetic_image_sequence(num_tasks=3))
    return engine, engine.run()


def test_resume_from_a_task_checkpoint_gives_the_same_matrix(tmp_path):
    _, full = run(tmp_path, baseline="replay", scenario="cil", run_name="a")
    run_dir = tmp_path / "runs" / "a"
    # simulate a crash during task 2: its checkpoint never got written
    shutil.rmtree(run_dir / "checkpoints" / "task_2")
    cfg = tiny_config(tmp_path, baseline="replay", scenario="cil", resume=str(run_dir))
    resumed = Engine(cfg, sequence=synthetic_image_sequence(num_tasks=3)).run()
    np.testing.assert_allclose(resumed.acc, full.acc)
    np.testing.assert_allclose(resumed.til_acc, full.til_acc)


def test_mismatched_or_corrupt_checkpoint_is_a_clear_error(tmp_path):
    engine, _ = run(tmp_path, baseline="finetune", run_name="b")
    acc = engine.accelerator  # no task's prepared model, optimiser or scheduler outlives its task
    assert (acc._models, acc._optimizers, acc._schedulers) == ([], [], [])
    run_dir = tmp_path / "runs" / "b"
    before = sorted(p.name for p in run_dir.rglob("*"))
    cfg = tiny_config(tmp_path, baseline="ewc", resume=str(run_dir))
    with pytest.raises(CheckpointError, match="does not belong"):
        Engine(cfg, sequence=synthetic_image_sequence(num_tasks=3)).run()
    (run_dir / "checkpoints" / "task_2" / "model.safetensors").write_bytes(b"garbage")
    cfg = tiny_config(tmp_path, baseline="finetune", resume=str(run_dir))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Engine(cfg, sequence=synthetic_image_sequence(num_tasks=3)).run()
    assert sorted(p.name for p in run_dir.rglob("*")) == before


def test_metrics_json_rows_and_report_command(tmp_path, monkeypatch):
    import mmcl.reporting

    drawn = []
    draw = mmcl.reporting.plot_accuracy_matrix
    monkeypatch.setattr(mmcl.reporting, "plot_accuracy_matrix", lambda m, *a: (drawn.append(m.rows_done), draw(m, *a)))
    run(tmp_path, baseline="lwf", scenario="til", run_name="c")
    assert drawn == [3]  # tasks of seconds: the heatmap is drawn once, after the last task
    run_dir = tmp_path / "runs" / "c"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    acc = np.array(metrics["matrix"]["acc"], dtype=float)
    assert acc.shape == (3, 3) and not np.isnan(acc).any()
    assert metrics["summary"]["acc_final"] == pytest.approx(acc[-1].mean())
    assert metrics["meta"]["approach"] == "lwf" and len(metrics["meta"]["minutes_per_task"]) == 3
    seconds, meta = metrics["meta"]["seconds_per_task"], metrics["meta"]
    assert [len(seconds[k]) for k in ("prepare", "train", "evaluate")] == [3, 3, 3]
    assert all(v >= 0 for k in ("prepare", "train", "evaluate") for v in seconds[k]) and seconds["untrained"] > 0
    # training seconds are the span `minutes` counts (rounded apart: to 4 decimals of a minute, 3 of a second)
    assert seconds["train"] == pytest.approx([60 * m for m in meta["minutes_per_task"]], abs=0.01)
    assert meta["seconds_total"]["evaluate"] == pytest.approx(sum(seconds["evaluate"]), abs=1e-6)
    (run_dir / "results.md").unlink()
    (run_dir / "accuracy_matrix.png").unlink()
    from mmcl.cli import main

    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "results.md").is_file() and (run_dir / "accuracy_matrix.png").stat().st_size > 1000
    assert f"{metrics['summary']['acc_final']:.2f}" in (run_dir / "results.md").read_text()


def test_cli_list_names_every_registry():
    out = subprocess.run([sys.executable, "-m", "mmcl.cli", "list"], capture_output=True, text=True, cwd=ROOT,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, check=True).stdout
    for name in ("bert_adapter", "convit", "ewc", "replay", "joint", "vader4", "split_fmnist", "asc", "til_classification"):
        assert name in out


def test_text_run_on_vader4_with_bert_adapter(tmp_path):
    """A real text run through the CLI on a cut-down vader4 (2 tasks, 48 examples each)."""
    spec = yaml.safe_load((ROOT / "tasks" / "vader4.yaml").read_text())
    spec["params"].update(max_train_per_task=48, max_eval_per_task=48, domains=["amazon", "movie"])
    path = tmp_path / "vader_small.yaml"
    path.write_text(yaml.safe_dump(spec))
    from mmcl.cli import main

    code = main(["run", "--task", str(path), "--backbone", "bert_adapter", "--baseline", "ewc",
                 "--bert_adapter_size", "8", "--num_train_epochs", "1", "--output_dir", str(tmp_path / "runs"),
                 "--run_name", "t", "--no-progress"])
    assert code == 0
    metrics = json.loads((tmp_path / "runs" / "t" / "metrics.json").read_text())
    assert metrics["meta"]["tasks"] == ["amazon", "movie"]
    assert metrics["summary"]["tasks_done"] == 2
    cfg = yaml.safe_load((tmp_path / "runs" / "t" / "config.yaml").read_text())
    assert cfg["max_seq_length"] == 64 and cfg["baseline"] == "ewc"  # task defaults reached the run


def test_missing_data_dir_names_path_and_remedy(tmp_path, capsys):
    from mmcl.cli import main

    assert main(["run", "--task", "asc", "--data_dir", str(tmp_path / "nowhere"), "--backbone", "bert_adapter",
                 "--baseline", "finetune"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere") in err and "--data_dir" in err


def test_existing_run_dir_is_never_overwritten_silently(tmp_path):
    run(tmp_path, baseline="finetune", run_name="d")
    metrics = (tmp_path / "runs" / "d" / "metrics.json").read_text()
    with pytest.raises(FileExistsError, match="--resume"):
        run(tmp_path, baseline="finetune", run_name="d")
    assert (tmp_path / "runs" / "d" / "metrics.json").read_text() == metrics
    run(tmp_path, baseline="finetune", run_name="d", overwrite=True)


def test_text_evaluation_splits_are_length_sorted_and_complete():
    from datasets import Dataset

    from mmcl.backbones import BackboneSpec, build_backbone
    from mmcl.config import RunConfig
    from mmcl.data.sequence import Task, get_scenario
    from mmcl.data.prepare import prepare_task

    texts = ["a b c d e f g h", "good", "a fine phone with a long battery life", "bad screen", "ok"]
    split = lambda: Dataset.from_dict({"text": texts, "label": [0, 1, 0, 1, 0]})  # noqa: E731
    task = Task(0, "t", "text", ["neg", "pos"], split(), split(), split())
    backbone = build_backbone(RunConfig.from_dict({"backbone": "bert_frozen", "max_seq_length": 32}), BackboneSpec(("text",)))
    prepare_task(task, backbone, get_scenario("til"))
    lengths = [len(ids) for ids in task.test["input_ids"]]
    assert lengths == sorted(lengths) and lengths != [len(ids) for ids in task.train["input_ids"]]
    tokenised = {tuple(backbone.tokenizer(t)["input_ids"]): y for t, y in zip(texts, [0, 1, 0, 1, 0])}
    assert {tuple(r["input_ids"]): r["label"] for r in task.test} == tokenised  # same examples, same labels
    assert [len(ids) for ids in task.train["input_ids"]] == [len(backbone.tokenizer(t)["input_ids"]) for t in texts]


def test_no_checkpoint_is_loaded_with_pickle():
    """Weights load through safetensors only: no torch.load without weights_only, no pickle, no np.load pickles."""
    import re

    offenders = []
    # the one exemption: the explicit, warned conversion of CIFAR-100's pickled python version (data, not weights)
    exempt = {ROOT / "scripts" / "convert_cifar100.py"}
    for path in list((ROOT / "mmcl").rglob("*.py")) + list((ROOT / "scripts").rglob("*.py")) + [ROOT / "run.py"]:
        if path in exempt:
            continue
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                offenders.append(f"{path}: {m.group(0)}")
        if re.search(r"^\s*(import pickle|from pickle|import dill|import cloudpickle)", text, re.M):
            offenders.append(f"{path}: imports a pickle module")
        if re.search(r"allow_pickle\s*=\s*True", text):
            offenders.append(f"{path}: allow_pickle=True")
    assert not offenders, offenders


def test_lr_reference_batch_scales_every_rate_with_the_global_batch(tmp_path, monkeypatch):
    import mmcl.engine as engine_mod

    cfg = tiny_config(tmp_path, lr_reference_batch=64, head_lr=1e-2, num_train_epochs=1)  # batch 16
    assert cfg.with_batch_scaled_lr(2).learning_rate == pytest.approx(3e-3 * 32 / 64)  # two processes: 2 x 16
    assert cfg.with_batch_scaled_lr(2).head_lr == pytest.approx(1e-2 * 32 / 64)
    unscaled = tiny_config(tmp_path)
    assert unscaled.with_batch_scaled_lr(4) is unscaled  # unset: the rates as given
    with pytest.raises(ValueError, match="--lr_reference_batch"):
        tiny_config(tmp_path, lr_reference_batch=0).validate()

    seen = []
    real = engine_mod.make_optimizer
    monkeypatch.setattr(engine_mod, "make_optimizer", lambda c, p: seen.append(real(c, p)) or seen[-1])
    engine = Engine(cfg, sequence=synthetic_image_sequence(num_tasks=2))
    engine.setup()
    engine.train_task(engine.seq[0])
    rates = sorted({g["initial_lr"] if "initial_lr" in g else g["lr"] for g in seen[0].param_groups})
    assert rates == pytest.approx([3e-3 / 4, 1e-2 / 4])  # one process, 16 / 64: backbone and heads alike
    assert engine.cfg.learning_rate == 3e-3  # what config.yaml records stays as given


@pytest.mark.parametrize("baseline", ["replay", "dytox"])
def test_cil_skips_tasks_whose_classes_cannot_be_predicted_yet_and_the_matrix_is_unchanged(tmp_path, monkeypatch,
                                                                                            baseline):
    """A CIL task not trained yet scores 0 (its classes are masked): the engine does not run the model on it."""
    import mmcl.engine

    real = mmcl.engine.evaluate

    def matrices(name, skip):
        engine = Engine(tiny_config(tmp_path, baseline=baseline, scenario="cil", run_name=name, num_train_epochs=1,
                                    save_checkpoints=False, **({"backbone": "convit"} if baseline == "dytox" else {})),
                        sequence=synthetic_image_sequence(num_tasks=3, n_train=16, n_test=8))
        calls = []
        monkeypatch.setattr(mmcl.engine, "evaluate", lambda a, loader, task, *r: (calls.append(task.id),
                                                                                  real(a, loader, task, *r))[1])
        engine.setup()
        if not skip:  # the model run on every task, as before
            monkeypatch.setattr(engine.approach, "predictable_classes", lambda: None)
        for task in engine.seq:
            engine.train_task(task)
            engine.matrix.set_row(task.id, *engine.evaluate_all())
        return engine.matrix, calls

    skipped, calls = matrices("skip", True)
    full, all_calls = matrices("full", False)
    assert calls == [0, 0, 1, 0, 1, 2] and all_calls == [0, 1, 2] * 3
    np.testing.assert_array_equal(skipped.acc, full.acc)
    np.testing.assert_array_equal(skipped.f1, full.f1)
    assert skipped.acc[0, 1:].tolist() == [0.0, 0.0] and np.isnan(skipped.til_acc[0, 1:]).all()
    np.testing.assert_array_equal(skipped.til_acc[np.tril_indices(3)], full.til_acc[np.tril_indices(3)])
    np.testing.assert_array_equal(skipped.examples, full.examples)
