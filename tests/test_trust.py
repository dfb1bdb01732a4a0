"""A run fails loudly rather than report garbage: the non-finite guard, strict --resume, output and disk
errors, and interruptions at any point (kill -9 between tasks, during evaluation, during a checkpoint)."""
import errno
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, synthetic_image_sequence, tiny_config
from mmcl.cli import main
from mmcl.engine import Engine
from mmcl.engine_errors import NonFiniteError, OutputError, ResumeConflictError, RunFailed
from mmcl.optim import OptimizerStep


def run(tmp_path, tasks=3, **kw):
    engine = Engine(tiny_config(tmp_path, **kw), sequence=synthetic_image_sequence(num_tasks=tasks))
    return engine, engine.run()


def metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The tiny finetune run (3 tasks) every interrupted one must end equal to, and its run directory."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    _, matrix = run(tmp, run_name="full")
    return matrix, tmp / "runs" / "full"


def copy_of(run_dir, tmp_path, name):
    shutil.copytree(run_dir, tmp_path / "runs" / name)
    return tmp_path / "runs" / name


# -- the non-finite guard ------------------------------------------------------------------------------

def test_a_diverging_run_exits_non_zero_names_where_and_claims_no_result_then_resumes(tmp_path, capsys):
    """The issue's command: SGD at lr 1e9 on split_digits; then --resume with a sane rate finishes."""
    flags = ["--task", "split_digits", "--backbone", "vit", "--baseline", "finetune", "--optimizer", "sgd",
             "--ntasks", "2", "--max_train_per_task", "64", "--vit_embed_dim", "32", "--vit_depth", "1",
             "--vit_heads", "2", "--patch_size", "4", "--num_train_epochs", "5", "--no-progress",
             "--output_dir", str(tmp_path), "--run_name", "nan"]
    assert main(["run", *flags, "--learning_rate", "1e9"]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "task 0 (digits_0_1)" in err and "step 2 of" in err
    assert "no checkpoint" in err and "--resume" in err
    run_dir = tmp_path / "nan"
    doc = metrics(run_dir)
    assert doc["status"] == "failed" and doc["summary"] is None
    assert doc["meta"]["failure"]["kind"] == "non-finite" and doc["meta"]["failure"]["task"] == "0 (digits_0_1)"
    page = (run_dir / "results.md").read_text()
    assert "FAILED — not a result" in page and "## Summary" not in page and "ACC" not in page

    assert main(["run", "--resume", str(run_dir), "--optimizer", "adamw", "--learning_rate", "3e-3",
                 "--no-progress"]) == 0
    doc = metrics(run_dir)
    assert doc["status"] == "complete" and doc["summary"]["acc_final"] > 50  # TIL, 2 classes: it learned
    assert [h["event"] for h in doc["meta"]["history"]] == ["failed", "resumed"]
    assert doc["meta"]["history"][1]["changed"] == {"optimizer": ["sgd", "adamw"], "learning_rate": [1e9, 3e-3]}
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["learning_rate"] == 3e-3
    assert "FAILED" not in (run_dir / "results.md").read_text()


def test_a_failure_after_a_finished_task_names_the_last_good_checkpoint(tmp_path, monkeypatch, uninterrupted):
    from mmcl.approaches.finetune import Finetune

    real = Finetune.training_step

    def nan_in_task_1(self, batch, task):
        loss = real(self, batch, task)
        return loss * float("nan") if task.id == 1 else loss

    monkeypatch.setattr(Finetune, "training_step", nan_in_task_1)
    with pytest.raises(RunFailed, match=r"task 1 \(toy1\), epoch 1 of 2, step 1 of .*task_0 \(tasks 0..0 finished\)"):
        run(tmp_path, run_name="r")
    run_dir = tmp_path / "runs" / "r"
    doc = metrics(run_dir)
    assert doc["status"] == "failed" and doc["meta"]["failure"]["last_checkpoint"].endswith("task_0")
    assert np.isfinite(doc["matrix"]["acc"][0]).all() and doc["matrix"]["acc"][1][0] is None  # row 0 kept, row 1 not
    monkeypatch.setattr(Finetune, "training_step", real)
    resumed = Engine(tiny_config(tmp_path, resume=str(run_dir)), sequence=synthetic_image_sequence(num_tasks=3))
    resumed.run()
    assert resumed.history[-1] == {"event": "resumed", "from_task": 1, "changed": {}}
    np.testing.assert_allclose(resumed.matrix.acc, uninterrupted[0].acc)


def test_the_guard_covers_the_online_stream(tmp_path):
    with pytest.raises(RunFailed, match=r"segment 0 \(toy0\), stream batch 1 of \d+, iteration 2 of 2"):
        run(tmp_path, scenario="online", baseline="online_replay", online_iters=2, learning_rate=1e30,
            optimizer="sgd", run_name="o")
    assert metrics(tmp_path / "runs" / "o")["status"] == "failed"


def test_the_guard_covers_dytox_balanced_fine_tuning(tmp_path):
    with pytest.raises(RunFailed, match=r"task 1 \(toy1\), phase balanced fine-tuning, epoch \d of 2, step 1 of 1"):
        run(tmp_path, tasks=2, backbone="convit", baseline="dytox", scenario="cil", memory_size=16,
            num_train_epochs=1, dytox_finetune_epochs=2, dytox_finetune_lr_scale=1e36, run_name="d")


def _tiny_step(accelerator=None, clipgrad=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if accelerator is not None:
        model, opt = accelerator.prepare(model, opt)
    return model, opt, OptimizerStep(opt, accelerator=accelerator, clipgrad=clipgrad)


@pytest.mark.parametrize("clipgrad", [1.0, 1e6])
def test_gradients_above_clipgrad_are_scaled_to_it_and_others_left_exactly_as_they_are(clipgrad):
    model, opt, step = _tiny_step(clipgrad=clipgrad)
    (model(torch.full((8, 4), 10.0)).sum() * 100).backward()
    before = [p.grad.clone() for p in model.parameters()]
    norm = step.grad_norm()
    assert float(norm) == pytest.approx(float(torch.nn.utils.get_total_norm(before)))
    after = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    if float(norm) > clipgrad:
        assert float(after) == pytest.approx(clipgrad, rel=1e-5)
    else:
        assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("clipgrad", [None, 1.0])
def test_an_infinite_gradient_with_a_finite_loss_stops_before_the_step(clipgrad):
    model, opt, step = _tiny_step(clipgrad=clipgrad)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.ones(3, 4)
    x.requires_grad_(True)
    loss = model(x).sum()
    model.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    with pytest.raises(NonFiniteError, match=r"non-finite gradient norm \(inf\) at epoch 3"):
        step(loss, {"epoch": 3})
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the step never happened
    assert all(p.grad is None for p in model.parameters())


def test_a_step_the_fp16_grad_scaler_skips_is_not_an_error():
    """Under fp16 an overflow in the scaled gradients makes the scaler skip the step and lower its scale;
    the guard lets it pass (a CPU GradScaler stands in for the CUDA one: Accelerate makes none on a CPU)."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)  # scaled gradients overflow float32
    model, opt, step = _tiny_step(acc, clipgrad=10.0)
    before = [p.detach().clone() for p in model.parameters()]
    applied = step(model(torch.ones(3, 4) * 1e3).sum(), {"step": 1})
    assert applied is False and step.skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert acc.scaler.get_scale() < 2.0 ** 127
    with pytest.raises(NonFiniteError, match="non-finite loss"):  # a NaN loss is an error even under fp16
        step(model(torch.ones(3, 4)).sum() * float("nan"), {"step": 2})


# -- strict --resume -------------------------------------------------------------------------------------

def _finished_cli_run(tmp_path, name="s"):
    flags = ["--task", "split_digits", "--backbone", "vit", "--baseline", "finetune", "--ntasks", "2",
             "--max_train_per_task", "32", "--vit_embed_dim", "32", "--vit_depth", "1", "--vit_heads", "2",
             "--patch_size", "4", "--num_train_epochs", "1", "--no-progress", "--output_dir", str(tmp_path),
             "--run_name", name, "--no-save_checkpoints"]
    assert main(["run", *flags]) == 0
    return tmp_path / name


def test_resume_refuses_flags_that_change_what_is_trained_and_lists_each(tmp_path, capsys):
    run_dir = _finished_cli_run(tmp_path)
    config = (run_dir / "config.yaml").read_text()
    capsys.readouterr()
    code = main(["run", "--resume", str(run_dir), "--backbone", "convit", "--learning_rate", "0.5", "--seed", "3",
                 "--train_batch_size", "32", "--no-progress"])  # the batch as saved: not a conflict
    err = capsys.readouterr().err
    assert code == 2
    assert "3 flag(s) differ" in err
    for part in ("--backbone convit (the run has vit)", "--learning_rate 0.5 (the run has 0.001)", "--seed 3 (the run has 0)"):
        assert part in err
    assert "train_batch_size" not in err.split("Flags --resume may change")[0]
    assert (run_dir / "config.yaml").read_text() == config  # nothing changed on disk


def test_resume_takes_runtime_flags_and_refuses_optimisation_flags_of_a_healthy_run(tmp_path):
    from mmcl.flags import resume_config

    run_dir = _finished_cli_run(tmp_path, "h")
    cfg, changed = resume_config(run_dir, {"progress": True, "eval_batch_size": 7, "data_dir": "/elsewhere"})
    assert (cfg.progress, cfg.eval_batch_size, cfg.data_dir, changed) == (True, 7, "/elsewhere", {})
    with pytest.raises(ResumeConflictError, match=r"only after the run stopped on a non-finite loss"):
        resume_config(run_dir, {"learning_rate": 1e-4})
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        resume_config(tmp_path / "nowhere", {})


def test_a_checkpoint_of_another_backbone_or_sequence_is_refused(tmp_path, uninterrupted):
    run_dir = copy_of(uninterrupted[1], tmp_path, "c")
    shutil.rmtree(run_dir / "checkpoints" / "task_2")
    state = json.loads((run_dir / "checkpoints" / "task_1" / "state.json").read_text())
    state["backbone"] = "convit"
    (run_dir / "checkpoints" / "task_1" / "state.json").write_text(json.dumps(state))
    from mmcl.engine_errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"does not belong to this run: \{'backbone': \('convit', 'vit'\)\}"):
        Engine(tiny_config(tmp_path, resume=str(run_dir)), sequence=synthetic_image_sequence(num_tasks=3)).run()


@pytest.mark.parametrize("content", [b"", b'{"task": 1, "num_ta', b"\xff\xfe", b"[]"],
                         ids=["empty", "truncated", "not-utf8", "not-an-object"])
def test_an_unreadable_checkpoint_state_is_a_clear_error_naming_it(tmp_path, content, uninterrupted):
    from mmcl.engine_errors import CheckpointError

    run_dir = copy_of(uninterrupted[1], tmp_path, "u")
    state = run_dir / "checkpoints" / "task_2" / "state.json"
    state.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"checkpoint '{state}' is (unreadable|malformed)"):
        Engine(tiny_config(tmp_path, resume=str(run_dir)), sequence=synthetic_image_sequence(num_tasks=3)).run()


# -- output and disk errors ------------------------------------------------------------------------------

def test_an_output_dir_under_a_file_fails_before_any_data_is_prepared(tmp_path, monkeypatch, capsys):
    import mmcl.engine as engine_mod

    monkeypatch.setattr(engine_mod, "load_task_sequence", lambda *a: pytest.fail("data was read"))
    (tmp_path / "README.md").write_text("x")
    assert main(["run", "--task", "split_digits", "--output_dir", str(tmp_path / "README.md" / "x"),
                 "--backbone", "vit", "--baseline", "finetune"]) == 1
    err = capsys.readouterr().err
    assert f"--output_dir: cannot create '{tmp_path / 'README.md' / 'x'}'" in err and "is a file" in err


def test_a_failed_setup_leaves_no_empty_run_directory(tmp_path, capsys):
    assert main(["run", "--task", "asc", "--data_dir", str(tmp_path / "nowhere"), "--output_dir",
                 str(tmp_path / "runs"), "--run_name", "x"]) == 2
    assert not (tmp_path / "runs" / "x").exists()


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    PermissionError(errno.EACCES, "Permission denied"),
    RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })"),
], ids=["disk-full", "permission", "safetensors-error"])
def test_a_failed_checkpoint_write_names_the_path_keeps_the_last_checkpoint_and_resumes(tmp_path, monkeypatch, error,
                                                                                        uninterrupted):
    """Fault injection: the second checkpoint's weights write half a file, then fail as a full disk would."""
    import safetensors.torch

    real = safetensors.torch.save_model
    calls = []

    def failing(model, filename, *a, **kw):
        calls.append(filename)
        if len(calls) == 2:
            with open(filename, "wb") as f:
                f.write(b"\0" * 1000)
            raise error
        return real(model, filename, *a, **kw)

    monkeypatch.setattr(safetensors.torch, "save_model", failing)
    with pytest.raises(RunFailed, match=r"cannot write '.*\.task_1\.tmp/model\.safetensors': .* \(\d.* free\)") as e:
        run(tmp_path, run_name="w")
    assert "task_0 (tasks 0..0 finished)" in str(e.value)
    ckpts = tmp_path / "runs" / "w" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["task_0"]  # the partial one is gone, the last complete kept
    assert metrics(tmp_path / "runs" / "w")["status"] == "failed"
    monkeypatch.setattr(safetensors.torch, "save_model", real)  # space freed
    resumed = Engine(tiny_config(tmp_path, resume=str(tmp_path / "runs" / "w")),
                     sequence=synthetic_image_sequence(num_tasks=3)).run()
    np.testing.assert_allclose(resumed.acc, uninterrupted[0].acc)


def _mount_tmpfs(path, size: int) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


@pytest.mark.filterwarnings("ignore:could not draw")  # the plot, too, finds the disk full: a warning, by design
def test_a_real_full_disk_on_tmpfs_stops_with_the_path_and_resumes_once_space_is_freed(tmp_path):
    """Where root may mount a tmpfs: a filesystem with room for the first checkpoint and not the second."""
    probe_dir = tmp_path / "probe"
    _, probe = run(probe_dir, tasks=2, run_name="p")
    used = sum(f.stat().st_size for f in (probe_dir / "runs" / "p").rglob("*") if f.is_file())
    ckpt = sum(f.stat().st_size for f in (probe_dir / "runs" / "p" / "checkpoints" / "task_0").rglob("*"))
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, used - ckpt // 2):  # everything but half of the second checkpoint fits
        pytest.skip("mounting a tmpfs needs root and the mount capability")
    try:
        with pytest.raises(RunFailed, match=r"cannot write '.*task_1.*': .*No space left on device \(.* free\)"):
            run(disk, tasks=2, run_name="p")
        run_dir = disk / "runs" / "p"
        assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["task_0"]
        subprocess.run(["mount", "-o", f"remount,size={4 * used}", str(disk)], check=True)
        resumed = Engine(tiny_config(disk, resume=str(run_dir)), sequence=synthetic_image_sequence(num_tasks=2)).run()
        np.testing.assert_allclose(resumed.acc, probe.acc)  # the probe is the uninterrupted run
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# -- interruptions at any point ------------------------------------------------------------------------

INTERRUPT = str(ROOT / "tests" / "interrupt_run.py")
RUN_FLAGS = ["--task", "split_digits", "--ntasks", "3", "--max_train_per_task", "96", "--backbone", "vit",
             "--vit_embed_dim", "32", "--vit_depth", "1", "--vit_heads", "2", "--patch_size", "4",
             "--baseline", "replay", "--scenario", "cil", "--memory_size", "30", "--num_train_epochs", "2",
             "--learning_rate", "3e-3", "--train_batch_size", "16", "--no-progress"]


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", MMCL_NUM_THREADS="1")


def _killed(point: str, n: int, flags: list[str]) -> None:
    import signal

    done = subprocess.run([sys.executable, INTERRUPT, point, str(n), "--", *flags], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


def test_kill_9_between_tasks_during_evaluation_and_during_a_checkpoint_then_resume_gives_the_same_matrices(
        tmp_path, monkeypatch):
    """SIGKILL at three points of one run (each resume is killed again further on); the run that ends equals
    the uninterrupted one. No sleeps: each kill happens at its point by fault injection."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("MMCL_NUM_THREADS", "1")  # the killed runs' setting: the same kernels, the same sums
    try:
        assert main(["run", *RUN_FLAGS, "--output_dir", str(tmp_path), "--run_name", "ref"]) == 0
    finally:
        torch.set_num_threads(threads)
    run_dir = tmp_path / "killed"
    resume = ["--resume", str(run_dir), "--no-progress"]

    _killed("after_checkpoint", 1, RUN_FLAGS + ["--output_dir", str(tmp_path), "--run_name", "killed"])
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["task_0"]
    assert metrics(run_dir)["summary"]["tasks_done"] == 1

    _killed("evaluate", 2, resume)  # retrains task 1, then dies testing task 1 after task 0 of that row
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["task_0"]
    assert metrics(run_dir)["summary"]["tasks_done"] == 1  # the half-evaluated row was never written

    _killed("checkpoint", 2, resume)  # task 1's checkpoint, then dies inside task 2's
    left = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert left == [".task_2.tmp", "task_0", "task_1"]
    assert (run_dir / "checkpoints" / ".task_2.tmp" / "model.safetensors").is_file()
    assert not (run_dir / "checkpoints" / ".task_2.tmp" / "state.json").exists()

    done = subprocess.run([sys.executable, "run.py", *resume], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["task_0", "task_1", "task_2"]
    want, got = metrics(tmp_path / "ref"), metrics(run_dir)
    assert got["status"] == "complete"
    for key in ("acc", "f1", "til_acc"):
        np.testing.assert_allclose(np.array(got["matrix"][key], dtype=float),
                                   np.array(want["matrix"][key], dtype=float), err_msg=key)
    # the resume killed while evaluating wrote nothing, its own history entry included
    assert [h["from_task"] for h in got["meta"]["history"]] == [1, 2]
